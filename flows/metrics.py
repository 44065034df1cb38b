"""Stage metrics: CLIP zero-shot tests of every generated image, summaries and text-space metrics.

``python -m flows.metrics`` (DVC stage ``metrics``) reads params.yaml ``generate.methods`` and
``metrics``, the eval prompts, data/eval/index/ and data/eval/images/ (and, for the text-space
metrics, data/edit/artifact and the locked model data/models/lock.json); the tiny preset's CLIP
classifier is built, seeded, in a temporary folder; writes data/eval/metrics/<method>/{per_image.parquet, summary.json},
text_space.json and summary/{metrics.json (dvc metrics), table.md (paper layout), categories.csv}.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow
from pydantic import Field

from flows._common import PARAMS_FILE, StageParams, load_params, logger, markdown_artifact, run_stage
from flows.generate import (EDIT_ARTIFACT, EVAL_PROMPTS, IMAGES, INDEX_DIR, MODELS_DIR, OUT,
                            PROMPT_COLUMN, GenerateParams)
from tasks._common import fingerprint
from tasks.evaluate import TABLE_MD, score_method, text_space, write_metrics
from tasks.model import LOCK_FILE, read_lock

METRICS_DIR = OUT / "metrics"
TINY_CLIP_SEED = 0
CODE = ["t2iedit.metrics", "t2iedit.clip_eval", "t2iedit.generate", "t2iedit.plots", "tasks.evaluate"]


class MetricsParams(StageParams):
    clip: str = "tiny"          # tiny | CLIP hub id or folder (paper: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)
    clip_revision: str | None = None
    sigma: str = Field(default="2sigma", pattern="^(mean|1sigma|2sigma|3sigma)$")  # CAKE criterion
    batch_size: int = Field(default=32, ge=1)
    title: str = "Evaluation"


def clip_source(p: MetricsParams, scratch: Path) -> str:
    """The classifier: ``metrics.clip``, or for ``tiny`` the seeded tiny CLIP built under ``scratch``
    (bit-identical every time; never a stage output, so no other stage's output changes)."""
    if p.clip != "tiny":
        return p.clip
    from t2iedit.clip_eval import build_tiny_clip

    return str(build_tiny_clip(scratch / "tiny-clip", seed=TINY_CLIP_SEED))


@flow(name="metrics")
def metrics(params_file: str = PARAMS_FILE) -> Path:
    g = load_params("generate", GenerateParams, params_file)
    p = load_params("metrics", MetricsParams, params_file)
    with tempfile.TemporaryDirectory(prefix="t2iedit-clip-") as scratch:
        clip = clip_source(p, Path(scratch))
        summaries = {}
        for method in g.methods:
            index = INDEX_DIR / f"{method}.parquet"
            fp = fingerprint(f"metrics/{method}", p, inputs=[EVAL_PROMPTS, index], code=CODE,
                             extra={"clip": p.clip if p.clip != "tiny" else f"tiny-seed{TINY_CLIP_SEED}"})
            summaries[method] = score_method(METRICS_DIR / method, fp, method, PROMPT_COLUMN[method],
                                             EVAL_PROMPTS, index, IMAGES, clip, p.clip_revision, p.sigma,
                                             p.batch_size)
    text = None
    if "edited" in g.methods:
        lock = read_lock(MODELS_DIR)
        fp = fingerprint("metrics/text_space", inputs=[MODELS_DIR / LOCK_FILE, EVAL_PROMPTS, EDIT_ARTIFACT],
                         code=["t2iedit.metrics", "t2iedit.edit", "tasks.evaluate"])
        text = text_space(METRICS_DIR / "text_space.json", fp, lock["preset"], lock["source"],
                          lock["revision"], EDIT_ARTIFACT, EVAL_PROMPTS)
    fp = fingerprint("metrics/summary", {"title": p.title}, inputs=[*(s / "summary.json" for s in summaries.values()),
                                                                    *([text] if text else [])], code=CODE)
    out = write_metrics(METRICS_DIR / "summary", fp, summaries, text, p.title)
    markdown_artifact("eval-metrics", (out / TABLE_MD).read_text(encoding="utf-8"))
    logger().info("metrics in %s", out)
    return out


if __name__ == "__main__":
    run_stage(metrics)
