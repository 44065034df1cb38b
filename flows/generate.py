"""Stage generate: images of every evaluation prompt × seed for each evaluated model.

``python -m flows.generate`` (DVC stage ``generate``) reads params.yaml ``generate``, the model that
prepare_model locked (data/models/lock.json), data/processed/datasets/eval_prompts.parquet and, for
the ``edited`` method, the edit stage's artifact folder data/edit/artifact (an ``EditArtifact``). Methods: ``edited`` (edit applied,
evaluation prompts), ``unedited`` (evaluation prompts), ``oracle`` (unedited, oracle prompts) and
``reference`` (unedited, each prompt's eval_text at seeds 0..``reference_images``−1: CAKE's threshold images).
Writes content-addressed PNGs under data/eval/images/ (persist: an image is never generated twice;
images no index of the finished run lists are pruned, so the folder depends only on this run),
one index per batch under data/eval/batches/ (mapped tasks: a killed run keeps finished batches) and
one index per method data/eval/index/<method>.parquet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, unmapped
from pydantic import Field

from flows.reporting import logger
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from t2iedit.storage import read_parquet
from t2iedit.models import get_preset
from t2iedit.protocol import CAKE_REFERENCE_IMAGES, PROMPT_COLUMN, generation_items
from tasks.fingerprints import fingerprint, item_fingerprint
from tasks.stamps import prune
from tasks.evaluate import generate_batch, images_key, merge_index, prune_images
from tasks.model import LOCK_FILE, image_size, locked_model

EVAL_PROMPTS = Path("data/processed/datasets/eval_prompts.parquet")
EDIT_ARTIFACT = Path("data/edit/artifact")
MODELS_DIR = Path("data/models")  # prepare_model's lock (+ the tiny preset's weights)
OUT = Path("data/eval")
IMAGES, BATCHES, INDEX_DIR = OUT / "images", OUT / "batches", OUT / "index"
CODE = ["t2iedit.generate", "t2iedit.models", "t2iedit.edit", "t2iedit.storage", "t2iedit.protocol", "tasks.evaluate",
        "tasks.model"]
# reference: the unedited model on each prompt's eval_text, CAKE's threshold images (t2iedit.protocol)
Method = Literal["edited", "unedited", "oracle", "reference"]


class GenerateParams(StageParams):
    methods: list[Method] = Field(default_factory=lambda: ["edited", "unedited", "oracle"])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    num_inference_steps: int | None = Field(default=None, ge=1)  # None: the preset's (SD 50, tiny 4)
    guidance_scale: float = 7.5
    batch_size: int = Field(default=8, ge=1)        # prompts per pipeline call
    task_batches: int = Field(default=64, ge=1)     # images per mapped task (unit of resumption)
    reference_images: int = Field(default=CAKE_REFERENCE_IMAGES, ge=2)  # per eval text, seeds 0..n-1 (CAKE: 50)
    # image size in pixels (multiples of 8); None: the model's own unet.config.sample_size ×
    # vae_scale_factor (SD 1.x 512, tiny 32). Also used by compare, fid and the values latents.
    height: int | None = Field(default=None, ge=8, multiple_of=8)  # tasks.model.image_size
    width: int | None = Field(default=None, ge=8, multiple_of=8)


def sampling_for(model, p: GenerateParams) -> dict:
    pre = get_preset(model.preset)
    height, width = image_size(model, p.height, p.width)
    return {"num_inference_steps": p.num_inference_steps or pre.num_inference_steps,
            "guidance_scale": p.guidance_scale, "height": height, "width": width}


@flow(name="generate")
def generate(params_file: str = PARAMS_FILE) -> dict[str, Path]:
    p = load_params("generate", GenerateParams, params_file)
    log = logger()
    model = locked_model(MODELS_DIR)
    sampling = sampling_for(model, p)
    ep = read_parquet(EVAL_PROMPTS).to_pandas()
    outs: dict[str, Path] = {}
    batch_files: list[Path] = []
    for method in p.methods:
        artifact = EDIT_ARTIFACT if method == "edited" else None
        inputs = [EVAL_PROMPTS, *([artifact] if artifact else [])]
        fp = fingerprint(f"generate/{method}", p, inputs=[MODELS_DIR / LOCK_FILE, *inputs], code=CODE)
        mh = images_key(model, artifact)
        items = generation_items(ep, method, p.seeds, p.reference_images)
        chunks = [items[i:i + p.task_batches] for i in range(0, len(items), p.task_batches)]
        outs_b = [BATCHES / method / f"{i:05d}.parquet" for i in range(len(chunks))]
        futures = generate_batch.map(
            outs_b, [item_fingerprint(fp, c) for c in chunks], unmapped(model.preset),
            unmapped(model.source), unmapped(model.revision), unmapped(artifact), chunks,
            unmapped(IMAGES), unmapped(mh), unmapped(sampling), unmapped(p.batch_size),
            unmapped(model.dtype))
        done = [f.result() for f in futures]
        batch_files += done
        outs[method] = merge_index(INDEX_DIR / f"{method}.parquet", fp, done)
        log.info("%s: %d images in %d batches (model %s)", method, len(items), len(chunks), mh[:16])
    prune(BATCHES, keep=batch_files)
    removed = prune_images(IMAGES, list(outs.values()))  # only this run's images: a reproducible output
    if removed:
        log.info("pruned %d images no index of this run lists (earlier models or settings)", len(removed))
    return outs


if __name__ == "__main__":
    run_stage(generate)
