"""Stage prepare_model: pin the model every later stage uses.

``python -m flows.prepare_model`` (DVC stage ``prepare_model``) reads params.yaml ``model`` and writes
data/models/lock.json (preset, source, revision, sha256 of every file) — plus the tiny preset's
weights under data/models/<preset>-seed<seed>/; a hub preset's weights live in the Hugging Face cache;
``model.source`` (a local folder) replaces both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow

from flows.reporting import logger
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from t2iedit.storage import tree_sha256
from tasks.fingerprints import fingerprint
from tasks.model import LOCK_FILE, lock_model

MODELS_DIR = Path("data/models")
CODE = ["t2iedit.models", "t2iedit.storage", "tasks.model"]


class ModelParams(StageParams):
    preset: Literal["tiny", "tiny-minilm", "sd-v1-4", "sd-v1-5"] = "tiny-minilm"
    seed: int = 0  # seed of the tiny model's weights (ignored by hub presets)
    # a local pipeline folder (save_pretrained) of the preset's architecture, instead of the hub
    # snapshot / the built tiny weights; outside the repo, so DVC does not watch it: after changing
    # its files, `dvc repro -f prepare_model` (the lock then re-hashes them)
    source: str | None = None
    # what the UNet and VAE (and the text encoder at inference) run in on CUDA; the CPU stays float32
    # (t2iedit.models.resolve_dtype); part of the images' model identity (tasks.evaluate.images_key)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


@flow(name="prepare_model")
def prepare_model(params_file: str = PARAMS_FILE) -> Path:
    p = load_params("model", ModelParams, params_file)
    extra = {"source_files": tree_sha256(p.source)} if p.source and Path(p.source).is_dir() else None
    fp = fingerprint("prepare_model", p, code=CODE, extra=extra)
    lock = lock_model(MODELS_DIR / LOCK_FILE, fp, p.preset, p.seed, p.source, p.dtype)
    logger().info("model %s locked in %s", p.preset, lock)
    return lock


if __name__ == "__main__":
    run_stage(prepare_model)
