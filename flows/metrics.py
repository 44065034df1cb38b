"""Stage metrics: CLIP zero-shot tests of every generated image, summaries and text-space metrics.

``python -m flows.metrics`` (DVC stage ``metrics``) reads params.yaml ``generate.methods`` and
``metrics``, the eval prompts, data/eval/index/ and data/eval/images/ (and, for the text-space
metrics, data/edit/artifact and the locked model data/models/lock.json); the tiny preset's CLIP
classifier is built, seeded, in a temporary folder. Each method's images are scored in mapped batches
of prompts (``metrics.task_batches`` images each, fanned out by the ``runner``; stamped under
data/eval/metrics_batches/, so a killed run resumes) and merged. Writes data/eval/metrics/thresholds/
(the evaluation prompts with the adaptive thresholds used: ``metrics.thresholds`` shipped, or recomputed
by CAKE's recipe from the ``reference`` images of each evaluation text, scored under thresholds/reference/),
data/eval/metrics/<method>/{per_image.parquet, summary.json} (every generate method but ``reference``),
and summary/{metrics.json (dvc metrics; text_space.<method>: the text_space stage's metrics), table.md (paper layout: the threshold test is the
headline table, the two-class test the second; ``unedited`` is the row "Oracle (unedited)"), categories.csv}.
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
from t2iedit.metrics import CAKE_DDOF
from t2iedit.protocol import method_seeds
from tasks.evaluate import (PER_IMAGE, TABLE_MD, THRESHOLD_PROMPTS, merge_scores, score_batch,
                            threshold_prompts, write_metrics)

METRICS_DIR = OUT / "metrics"
THRESHOLDS_DIR = METRICS_DIR / "thresholds"
BATCHES = OUT / "metrics_batches"  # scored prompt batches (DVC persist: a killed run resumes)
TEXT_SPACE_METRICS = Path("data/text_space/summary/metrics.json")  # the text_space stage's
TINY_CLIP_SEED = 0
CODE = ["t2iedit.metrics", "t2iedit.clip_eval", "t2iedit.generate", "t2iedit.plots", "t2iedit.protocol",
        "tasks.evaluate"]


class MetricsParams(StageParams):
    clip: str = "tiny"          # tiny | CLIP hub id or folder (paper: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)
    clip_revision: str | None = None
    sigma: str = Field(default="2sigma", pattern="^(mean|1sigma|2sigma|3sigma)$")  # CAKE criterion
    # shipped: the dataset's thresholds (CAKE's, for SD-1.4 + ViT-bigG: the paper protocol); recompute: CAKE's
    # recipe with this model and classifier (the `reference` images: generate.reference_images per eval text)
    thresholds: Literal["shipped", "recompute"] = "shipped"
    threshold_ddof: int = Field(default=CAKE_DDOF, ge=0, le=1)  # std of recompute (CAKE's code: 1)
    batch_size: int = Field(default=32, ge=1)      # images per classifier forward
    task_batches: int = Field(default=256, ge=1)   # images per mapped scoring task (unit of resumption)
    title: str = "Evaluation"


def judge_source(name: str, scratch: Path) -> str:
    """A CLIP judge: a hub id / folder as given, or for ``tiny`` the seeded tiny CLIP built under
    ``scratch`` (bit-identical every time; never a stage output, so no other stage's output changes)."""
    if name != "tiny":
        return name
    from t2iedit.clip_eval import build_tiny_clip

    return str(build_tiny_clip(scratch / "tiny-clip", seed=TINY_CLIP_SEED))


def judge_id(name: str) -> str:
    """What a judge is fingerprinted by (``tiny`` names its seed)."""
    return name if name != "tiny" else f"tiny-seed{TINY_CLIP_SEED}"


def clip_source(p: MetricsParams, scratch: Path) -> str:
    """The classifier of ``metrics.clip`` (:func:`judge_source`)."""
    return judge_source(p.clip, scratch)


@flow(name="metrics")
def metrics(params_file: str = PARAMS_FILE) -> Path:
    g = load_params("generate", GenerateParams, params_file)
    p = load_params("metrics", MetricsParams, params_file)
    if p.thresholds == "recompute" and "reference" not in g.methods:
        raise ValueError("metrics.thresholds: recompute needs 'reference' in generate.methods (CAKE's recipe: "
                         "the unedited model's images of each evaluation text, generate.reference_images per "
                         f"text, are the reference), got methods {g.methods}")
    extra = {"clip": judge_id(p.clip)}
    score = p.model_dump(exclude={"title", "thresholds", "threshold_ddof", "task_batches"})
    with tempfile.TemporaryDirectory(prefix="t2iedit-clip-") as scratch:
        clip = clip_source(p, Path(scratch))

        ep = read_parquet(EVAL_PROMPTS).to_pandas()
        batch_files: list[Path] = []

        def scored(out: Path, method: str, prompts: Path) -> Path:
            """Score the method's images in mapped batches of prompts (each stamped: a killed run
            resumes), then merge them into ``out``."""
            ids = (ep["prompt_id"] if method != "reference" else ep.loc[ep["eval_text"].notna(), "prompt_id"]).tolist()
            per_task = max(1, p.task_batches // len(method_seeds(method, g.seeds, g.reference_images)))
            chunks = [ids[i:i + per_task] for i in range(0, len(ids), per_task)]
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

        # CAKE's reference: the unedited model's images of each eval text, scored against that text
        reference = scored(THRESHOLDS_DIR / "reference", "reference", EVAL_PROMPTS) / PER_IMAGE \
            if p.thresholds == "recompute" else None
        fp = fingerprint("metrics/thresholds", {"thresholds": p.thresholds, "ddof": p.threshold_ddof},
                         inputs=[EVAL_PROMPTS, *([reference] if reference else [])], code=CODE)
        prompts = threshold_prompts(THRESHOLDS_DIR, fp, EVAL_PROMPTS, p.thresholds, reference,
                                    p.threshold_ddof) / THRESHOLD_PROMPTS
        summaries = {method: scored(METRICS_DIR / method, method, prompts)
                     for method in g.methods if method != "reference"}  # reference: not a table row
        prune(BATCHES, keep=batch_files)
    # the text-space metrics of every method (stage text_space, METHOD.md §8a): metrics.json text_space.<method>
    text = TEXT_SPACE_METRICS if TEXT_SPACE_METRICS.is_file() else None
    fp = fingerprint("metrics/summary", {"title": p.title, "note": (note := threshold_note(p, g))},
                     inputs=[*(s / "summary.json" for s in summaries.values()), *([text] if text else [])],
                     code=CODE)
    out = write_metrics(METRICS_DIR / "summary", fp, summaries, text, p.title, note)
    markdown_artifact("eval-metrics", (out / TABLE_MD).read_text(encoding="utf-8"))
    logger().info("metrics in %s", out)
    return out


def threshold_note(p: MetricsParams, g: GenerateParams) -> str:
    """Which thresholds the headline (threshold) test used, in words (the table's note)."""
    criterion = "the mean" if p.sigma == "mean" else f"mean − {p.sigma[0]}σ"
    std = "population std" if p.threshold_ddof == 0 else "sample std, ddof=1"
    if p.thresholds == "shipped":
        return (f"Headline table: the threshold test with the dataset's shipped thresholds ({criterion} of "
                "CAKE's SD-1.4 / ViT-bigG scores over 50 images of each evaluation text). Second table: the "
                "two-class CLIP test.")
    return (f"Headline table: the threshold test with thresholds recomputed for this model and classifier by "
            f"CAKE's recipe ({criterion}, {std}, over the unedited model's {g.reference_images} images of "
            "each evaluation text). Second table: the two-class CLIP test.")


if __name__ == "__main__":
    run_stage(metrics)
