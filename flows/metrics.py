"""Stage metrics: CLIP zero-shot tests of every generated image, summaries and text-space metrics.

``python -m flows.metrics`` (DVC stage ``metrics``) reads params.yaml ``model``, ``generate.methods``
and ``metrics``, the eval prompts, data/eval/index/ and data/eval/images/ (and data/edit/artifact for
the text-space metrics); writes data/eval/metrics/<method>/{per_image.parquet, summary.json},
text_space.json and summary/{metrics.json (dvc metrics), table.md (paper layout), categories.csv}.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import Field

from flows._common import PARAMS_FILE, StageParams, load_params, logger, markdown_artifact, run_stage
from flows.generate import (EDIT_ARTIFACT, EVAL_PROMPTS, IMAGES, INDEX_DIR, MODELS_DIR, OUT,
                            PROMPT_COLUMN, GenerateParams, ModelParams)
from t2iedit.models import get_preset
from tasks._common import fingerprint
from tasks.evaluate import TABLE_MD, model_source, score_method, text_space, write_metrics

METRICS_DIR = OUT / "metrics"
TINY_CLIP = MODELS_DIR / "tiny-clip"
CODE = ["t2iedit.metrics", "t2iedit.clip_eval", "t2iedit.generate", "t2iedit.plots", "tasks.evaluate"]


class MetricsParams(StageParams):
    clip: str = "tiny"          # tiny | CLIP hub id or folder (paper: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)
    clip_revision: str | None = None
    sigma: str = Field(default="2sigma", pattern="^(mean|1sigma|2sigma|3sigma)$")  # CAKE criterion
    batch_size: int = Field(default=32, ge=1)
    title: str = "Evaluation"


def clip_source(p: MetricsParams) -> str:
    if p.clip != "tiny":
        return p.clip
    from t2iedit.clip_eval import build_tiny_clip

    if not (TINY_CLIP / "config.json").exists():
        build_tiny_clip(TINY_CLIP, seed=0)
    return str(TINY_CLIP)


@flow(name="metrics")
def metrics(params_file: str = PARAMS_FILE) -> Path:
    m = load_params("model", ModelParams, params_file)
    g = load_params("generate", GenerateParams, params_file)
    p = load_params("metrics", MetricsParams, params_file)
    clip = clip_source(p)
    summaries = {}
    for method in g.methods:
        index = INDEX_DIR / f"{method}.parquet"
        fp = fingerprint(f"metrics/{method}", p, inputs=[EVAL_PROMPTS, index], code=CODE,
                         extra={"clip": p.clip if p.clip != "tiny" else "tiny-seed0"})
        summaries[method] = score_method(METRICS_DIR / method, fp, method, PROMPT_COLUMN[method],
                                         EVAL_PROMPTS, index, IMAGES, clip, p.clip_revision, p.sigma,
                                         p.batch_size)
    text = None
    if "edited" in g.methods:
        source, revision = model_source(m.preset, m.seed, MODELS_DIR)
        fp = fingerprint("metrics/text_space", m, inputs=[EVAL_PROMPTS, EDIT_ARTIFACT],
                         code=["t2iedit.metrics", "t2iedit.edit", "tasks.evaluate"],
                         extra=None if get_preset(m.preset).tiny else {"source": source, "revision": revision})
        text = text_space(METRICS_DIR / "text_space.json", fp, m.preset, source, revision,
                          EDIT_ARTIFACT, EVAL_PROMPTS)
    fp = fingerprint("metrics/summary", {"title": p.title}, inputs=[*(s / "summary.json" for s in summaries.values()),
                                                                    *([text] if text else [])], code=CODE)
    out = write_metrics(METRICS_DIR / "summary", fp, summaries, text, p.title)
    markdown_artifact("eval-metrics", (out / TABLE_MD).read_text(encoding="utf-8"))
    logger().info("metrics in %s", out)
    return out


if __name__ == "__main__":
    run_stage(metrics)
