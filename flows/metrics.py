"""Stage metrics: CLIP zero-shot tests of every generated image, summaries and text-space metrics.

``python -m flows.metrics`` (DVC stage ``metrics``) reads params.yaml ``generate.methods`` and
``metrics``, the eval prompts, data/eval/index/ and data/eval/images/ (and, for the text-space
metrics, data/edit/artifact and the locked model data/models/lock.json); the tiny preset's CLIP
classifier is built, seeded, in a temporary folder. Each method's images are scored in mapped batches
of prompts (``metrics.task_batches`` images each, fanned out by the ``runner``; stamped under
data/eval/metrics_batches/, so a killed run resumes) and merged. Writes data/eval/metrics/thresholds/
(the evaluation prompts with the adaptive thresholds used: ``metrics.thresholds`` shipped, or recomputed
from the oracle images scored under thresholds/reference/), data/eval/metrics/<method>/
{per_image.parquet, summary.json}, text_space.json and summary/{metrics.json (dvc metrics), table.md
(paper layout), categories.csv}.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from prefect import flow, unmapped
from pydantic import Field

from flows.reporting import logger, markdown_artifact
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from flows.generate import (EDIT_ARTIFACT, EVAL_PROMPTS, IMAGES, INDEX_DIR, MODELS_DIR, OUT,
                            PROMPT_COLUMN, GenerateParams)
from t2iedit.storage import read_parquet
from tasks.fingerprints import fingerprint, item_fingerprint
from tasks.stamps import prune
from tasks.evaluate import (PER_IMAGE, TABLE_MD, THRESHOLD_PROMPTS, merge_scores, retest_scores,
                            score_batch, text_space, threshold_prompts, write_metrics)
from tasks.model import LOCK_FILE, locked_model

METRICS_DIR = OUT / "metrics"
THRESHOLDS_DIR = METRICS_DIR / "thresholds"
BATCHES = OUT / "metrics_batches"  # scored prompt batches (DVC persist: a killed run resumes)
TINY_CLIP_SEED = 0
CODE = ["t2iedit.metrics", "t2iedit.clip_eval", "t2iedit.generate", "t2iedit.plots", "tasks.evaluate"]


class MetricsParams(StageParams):
    clip: str = "tiny"          # tiny | CLIP hub id or folder (paper: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)
    clip_revision: str | None = None
    sigma: str = Field(default="2sigma", pattern="^(mean|1sigma|2sigma|3sigma)$")  # CAKE criterion
    # shipped: the dataset's thresholds (CAKE's, for SD-1.4 + EVA-CLIP bigG: the paper protocol);
    # recompute: from this classifier's scores of the unedited model's oracle images over generate.seeds
    thresholds: Literal["shipped", "recompute"] = "shipped"
    batch_size: int = Field(default=32, ge=1)      # images per classifier forward
    task_batches: int = Field(default=256, ge=1)   # images per mapped scoring task (unit of resumption)
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
    if p.thresholds == "recompute" and ("oracle" not in g.methods or len(g.seeds) < 2):
        raise ValueError("metrics.thresholds: recompute needs 'oracle' in generate.methods (the unedited "
                         "model's oracle images are the reference) and at least 2 generate.seeds, got "
                         f"methods {g.methods}, seeds {g.seeds}")
    extra = {"clip": p.clip if p.clip != "tiny" else f"tiny-seed{TINY_CLIP_SEED}"}
    score = p.model_dump(exclude={"title", "thresholds", "task_batches"})
    with tempfile.TemporaryDirectory(prefix="t2iedit-clip-") as scratch:
        clip = clip_source(p, Path(scratch))

        ids = read_parquet(EVAL_PROMPTS).column("prompt_id").to_pylist()
        per_task = max(1, p.task_batches // max(1, len(g.seeds)))  # prompts per mapped task
        chunks = [ids[i:i + per_task] for i in range(0, len(ids), per_task)]
        batch_files: list[Path] = []

        def scored(out: Path, method: str, prompts: Path) -> Path:
            """Score the method's images in mapped batches of prompts (each stamped: a killed run
            resumes), then merge them into ``out``."""
            index = INDEX_DIR / f"{method}.parquet"
            fp = fingerprint(f"metrics/{method}", score, inputs=[prompts, index], code=CODE, extra=extra)
            outs = [BATCHES / out.relative_to(METRICS_DIR) / f"{i:05d}.parquet" for i in range(len(chunks))]
            futures = score_batch.map(
                outs, [item_fingerprint(fp, c) for c in chunks], unmapped(method),
                unmapped(PROMPT_COLUMN[method]), unmapped(prompts), chunks, unmapped(index),
                unmapped(IMAGES), unmapped(clip), unmapped(p.clip_revision), unmapped(p.sigma),
                unmapped(p.batch_size))
            done = [f.result() for f in futures]
            batch_files.extend(done)
            return merge_scores(out, fingerprint(f"metrics/{method}/merge", inputs=done, code=CODE), done)

        reference = scored(THRESHOLDS_DIR / "reference", "oracle", EVAL_PROMPTS) / PER_IMAGE \
            if p.thresholds == "recompute" else None
        fp = fingerprint("metrics/thresholds", {"thresholds": p.thresholds},
                         inputs=[EVAL_PROMPTS, *([reference] if reference else [])], code=CODE)
        prompts = threshold_prompts(THRESHOLDS_DIR, fp, EVAL_PROMPTS, p.thresholds, reference) / THRESHOLD_PROMPTS
        summaries = {}
        for method in g.methods:
            if method == "oracle" and reference is not None:
                # the oracle images are the reference: their scores are re-tested, not computed twice
                fp = fingerprint("metrics/oracle/retest", {"sigma": p.sigma}, inputs=[reference, prompts],
                                 code=CODE)
                summaries[method] = retest_scores(METRICS_DIR / method, fp, reference, prompts, p.sigma)
            else:
                summaries[method] = scored(METRICS_DIR / method, method, prompts)
        prune(BATCHES, keep=batch_files)
    text = None
    if "edited" in g.methods:
        model = locked_model(MODELS_DIR)
        fp = fingerprint("metrics/text_space", inputs=[MODELS_DIR / LOCK_FILE, EVAL_PROMPTS, EDIT_ARTIFACT],
                         code=["t2iedit.metrics", "t2iedit.edit", "tasks.evaluate"])
        text = text_space(METRICS_DIR / "text_space.json", fp, model.preset, model.source,
                          model.revision, EDIT_ARTIFACT, EVAL_PROMPTS)
    criterion = "the mean" if p.sigma == "mean" else f"mean − {p.sigma[0]}σ"
    note = ("Threshold test: the dataset's shipped thresholds "
            f"({criterion} of CAKE's SD-1.4 / EVA-CLIP scores)." if p.thresholds == "shipped" else
            f"Threshold test: thresholds recomputed for this model and classifier ({criterion} over "
            f"the unedited model's oracle images of seeds {g.seeds}).")
    fp = fingerprint("metrics/summary", {"title": p.title, "note": note},
                     inputs=[*(s / "summary.json" for s in summaries.values()), *([text] if text else [])],
                     code=CODE)
    out = write_metrics(METRICS_DIR / "summary", fp, summaries, text, p.title, note)
    markdown_artifact("eval-metrics", (out / TABLE_MD).read_text(encoding="utf-8"))
    logger().info("metrics in %s", out)
    return out


if __name__ == "__main__":
    run_stage(metrics)
