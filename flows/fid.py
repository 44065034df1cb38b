"""Stage fid: image quality of the edited model — FID-5K against COCO val2014 and the CLIP score.

``python -m flows.fid`` (DVC stage ``fid`` in pipelines/fid/dvc.yaml, outside the default
``dvc repro``: it needs the real COCO images and the Inception weights, which the offline set-up does
not have) reads params.yaml ``fid``, the locked model (data/models/lock.json), data/raw/coco/coco_30k.csv (the first
``fid.n_captions`` captions with their ``evaluation_seed``; METHOD.md §8) and, for ``fid.method:
edited``, the edit stage's artifact data/edit/artifact. It checks the reference images
(``fid.coco_images``) and Inception weights (``fid.inception_weights``) first, then generates one image
per caption through the content-addressed generation cache (mapped, resumable batches) and writes
data/eval/fid/{images/, batches/, index.parquet, metrics.json (FID, CLIP score), clip_scores.parquet}.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from prefect import flow
from pydantic import Field

from flows.reporting import logger, table_artifact
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from flows.generate import EDIT_ARTIFACT, MODELS_DIR, OUT
from flows.stage import generate_hw
from flows.metrics import judge_id, judge_source
from t2iedit.clip_eval import DEFAULT_CLIP_SCORE_MODEL
from t2iedit.fid import FID_SUBSET_SIZE, fid_captions
from t2iedit.storage import read_json
from t2iedit.models import get_preset
from tasks.fingerprints import fingerprint, item_fingerprint
from tasks.stamps import prune
from tasks.evaluate import generate_batch, images_key, merge_index, prune_images
from tasks.model import LOCK_FILE, image_size, locked_model
from tasks.fid import (METRICS_JSON, inception_weights_file, reference_images, references_sha256,
                       score_fid)

COCO_CSV = Path("data/raw/coco/coco_30k.csv")
FID_DIR = OUT / "fid"
IMAGES, BATCHES, INDEX = FID_DIR / "images", FID_DIR / "batches", FID_DIR / "index.parquet"
GENERATE_CODE = ["t2iedit.generate", "t2iedit.models", "t2iedit.edit", "t2iedit.storage", "tasks.evaluate",
                 "tasks.model"]
SCORE_CODE = ["t2iedit.fid", "t2iedit.clip_eval", "t2iedit.generate", "t2iedit.storage", "tasks.fid"]
GENERATE_KEYS = {"method", "n_captions", "sampling", "batch_size", "task_batches"}


class FidSampling(StageParams):
    num_inference_steps: int | None = Field(default=None, ge=1)  # None: the preset's (SD 50, tiny 4)
    guidance_scale: float = 7.5


class FidParams(StageParams):
    method: Literal["edited", "unedited"] = "edited"  # edited: data/edit/artifact applied
    n_captions: int = Field(default=FID_SUBSET_SIZE, ge=2)
    coco_images: str | None = None        # folder of COCO_val2014_<id:012d>.jpg
    inception_weights: str | None = None  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth
    # the CLIP-score judge: hub id, local folder or tiny (the seeded tiny CLIP, offline runs); default the
    # paper's ViT-bigG-class model (its 0.465 is a plain mean cosine, METHOD.md §8)
    clip_score_model: str = DEFAULT_CLIP_SCORE_MODEL
    clip_score_revision: str | None = None
    sampling: FidSampling = Field(default_factory=FidSampling)
    batch_size: int = Field(default=8, ge=1)           # prompts per pipeline call
    task_batches: int = Field(default=64, ge=1)        # images per mapped task (unit of resumption)
    feature_batch_size: int = Field(default=50, ge=1)  # images per Inception / CLIP forward


@flow(name="fid")
def fid(params_file: str = PARAMS_FILE) -> Path:
    p = load_params("fid", FidParams, params_file)
    log = logger()
    caps = fid_captions(COCO_CSV, p.n_captions)
    # Missing user inputs fail here, before hours of generation (never a skipped metric).
    real = reference_images(p.coco_images, caps["coco_id"])
    weights = inception_weights_file(p.inception_weights)

    model = locked_model(MODELS_DIR)
    preset = get_preset(model.preset)
    artifact = EDIT_ARTIFACT if p.method == "edited" else None
    height, width = image_size(model, *generate_hw(params_file))  # generate.height/width (None: the model's)
    sampling = {"num_inference_steps": p.sampling.num_inference_steps or preset.num_inference_steps,
                "guidance_scale": p.sampling.guidance_scale, "height": height, "width": width}
    fp = fingerprint("fid/generate", p.model_dump(mode="json", include=GENERATE_KEYS),
                     inputs=[MODELS_DIR / LOCK_FILE, COCO_CSV, *([artifact] if artifact else [])],
                     code=GENERATE_CODE)
    mh = images_key(model, artifact)
    items = list(dict.fromkeys(zip(caps["prompt"], caps["evaluation_seed"].astype(int).tolist())))
    chunks = [items[i:i + p.task_batches] for i in range(0, len(items), p.task_batches)]
    outs_b = [BATCHES / f"{i:05d}.parquet" for i in range(len(chunks))]
    # One batch task at a time: with concurrent pipeline loads in runner threads the later Inception
    # forward failed here with "Tensor on device meta" (2026-11, before d459d1e's import fix; not
    # re-checked since). Each batch is still its own stamped task run, so a killed run resumes.
    done = [generate_batch(out_b, item_fingerprint(fp, chunk), model.preset, model.source,
                           model.revision, artifact, chunk, IMAGES, mh, sampling, p.batch_size,
                           model.dtype)
            for out_b, chunk in zip(outs_b, chunks)]
    index = merge_index(INDEX, fp, done)
    prune(BATCHES, keep=done)
    # images/ is a DVC output (persist: true): only this run's images, as in generate (issue 18 item 4)
    removed = prune_images(IMAGES, [index])
    if removed:
        log.info("fid: pruned %d images of earlier models or settings", len(removed))
    log.info("fid: %d caption images in %d batches (model %s)", len(items), len(chunks), mh[:16])

    fp = fingerprint("fid/score", p, inputs=[MODELS_DIR / LOCK_FILE, COCO_CSV, index, weights],
                     code=SCORE_CODE, extra={"real": references_sha256(real), "generated": fp,
                                             "judge": judge_id(p.clip_score_model)})
    with tempfile.TemporaryDirectory(prefix="t2iedit-clip-") as scratch:
        out = score_fid(FID_DIR / METRICS_JSON, fp, COCO_CSV, p.n_captions, index, IMAGES, p.coco_images,
                        str(weights), judge_source(p.clip_score_model, Path(scratch)),
                        p.clip_score_revision, min(height, width), p.feature_batch_size)
    result = read_json(out)
    table_artifact("fid", [result], description="FID-5K and CLIP score")
    log.info("FID %.3f, CLIP score %.4f (%s, %s) over %d captions", result["fid"], result["clip_score"],
             result["clip_score_unit"], p.clip_score_model, result["n_captions"])
    return out


if __name__ == "__main__":
    run_stage(fid)
