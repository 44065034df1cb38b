"""Stage values: target values z (V1*) of every single edit (METHOD.md §5, paper eq. 4–6).

``python -m flows.values`` (DVC stage ``values``) reads params.yaml ``values`` and ``edit.value_layer``,
the locked model (data/models), the edit set (data/processed/datasets/edits.parquet) and the
entities (data/ner/entities.parquet). Edits are optimised ``batch_size`` at a time (one resumable
item per batch under data/values/batches/); with the visual loss, the unedited model's source-image
latents are generated once per batch under data/values/latents/ (their fingerprint ignores the loss
settings, so tuning α or a visual λ reuses them; a text-only run, λ = 0, leaves the folder its index
alone). Writes data/values/values.safetensors (``z``, ``delta``,
``z0``; ``edit_ids``, ``value_layer`` and the config hash in the sidecar — the edit stage's input),
data/values/values.losses.parquet (per-edit final losses, the weighted terms at the first and last Adam
step, steps, norms) and data/values/metrics.json (mean losses and ``share.{text,eata,visual}.{first,last}``:
each weighted term's share of the total loss). Each batch logs its step, loss and rate (``StepProgress``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Literal

from prefect import flow, unmapped
from pydantic import Field, model_validator

from flows.reporting import logger
from flows.stage import PARAMS_FILE, StageParams, load_params, read_params, run_stage
from t2iedit.models import get_preset
from t2iedit.storage import write_json
from t2iedit.prompts import DEFAULT_TEMPLATES
from t2iedit.values import DEFAULT_WEIGHTING, weighted_config
from tasks.fingerprints import fingerprint, item_fingerprint
from tasks.stamps import prune
from tasks.model import read_lock
from tasks.values import (as_dicts, edit_requests, losses_file, merge_values, source_latents, values_batch,
                          values_metrics)

MODELS_DIR = Path("data/models")
EDITS = Path("data/processed/datasets/edits.parquet")
ENTITIES = Path("data/ner/entities.parquet")
OUT = Path("data/values")
BATCHES, LATENTS = OUT / "batches", OUT / "latents"
LATENT_INDEX = LATENTS / "index.json"
VALUES, METRICS = OUT / "values.safetensors", OUT / "metrics.json"
CODE = ["t2iedit.values", "t2iedit.losses", "t2iedit.ner", "t2iedit.models", "t2iedit.prompts",
        "t2iedit.storage", "tasks.values", "tasks.model"]
LATENT_CODE = ["t2iedit.models", "tasks.values", "tasks.model"]


class ValuesParams(StageParams):
    alpha: float = Field(default=0.11, ge=0)          # EATA weight (0: the no-EATA ablation)
    lambda_visual: float = Field(default=0.01, ge=0)  # the paper's λ (eq. 6); `weighting` says which term it weights
    weighting: Literal["paper", "emcid"] = DEFAULT_WEIGHTING  # emcid: λ·text + L_V; paper: text + λ·L_V
                                                      # (λ = 0, text-only mode: paper only) METHOD.md §5
    steps: int = Field(default=200, ge=0)
    lr: float = Field(default=0.2, gt=0)
    clamp: float = Field(default=1.5, gt=0)           # ‖δ‖ ≤ clamp · ‖z0‖
    weight_decay: float = Field(default=1.0e-3, ge=0)
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1)
    # None: the preset's (CLIP: eos, the pooled [EOS] feature; tiny-minilm: mean, as MiniLM was trained)
    pooling: Literal["eos", "cls", "mean"] | None = None
    seed: int = 0                                     # draws of t and noise; source-image seeds
    batch_size: int = Field(default=32, ge=1)         # edits optimised together (one resumable item)
    latent_images: int = Field(default=1, ge=1)       # source images per edit for L_V
    latent_steps: int | None = Field(default=None, ge=1)  # None: the preset's sampling steps

    @model_validator(mode="after")
    def _text_only_needs_paper(self):
        if self.weighting == "emcid" and self.lambda_visual == 0:
            raise ValueError("values.weighting 'emcid' puts lambda_visual on the text term, so 0 would drop "
                             "the text loss; for the text-only mode set weighting: paper, lambda_visual: 0")
        return self


def edit_value_layer(params_file: str, lock: dict) -> int:
    """The value layer the edit stage will use (``edit.value_layer``, else the preset's)."""
    layer = (read_params(params_file).get("edit") or {}).get("value_layer")
    return int(layer) if layer is not None else int(lock["value_layer"])


@flow(name="values")
def values(params_file: str = PARAMS_FILE) -> Path:
    p = load_params("values", ValuesParams, params_file)
    lock = read_lock(MODELS_DIR)
    value_layer = edit_value_layer(params_file, lock)
    cfg = weighted_config(p.weighting, lam=p.lambda_visual, alpha=p.alpha, steps=p.steps, lr=p.lr,
                          clamp_factor=p.clamp, weight_decay=p.weight_decay, templates=tuple(p.templates),
                          pooling=p.pooling or get_preset(lock["preset"]).pooling, seed=p.seed)
    config = {**asdict(cfg), "templates": list(cfg.templates)}
    requests = edit_requests(EDITS, ENTITIES)
    batches = [requests[i:i + p.batch_size] for i in range(0, len(requests), p.batch_size)]
    fp = fingerprint("values", p, inputs=[MODELS_DIR, EDITS, ENTITIES], code=CODE,
                     extra={"value_layer": value_layer})
    latents: list[Path | None] = [None] * len(batches)
    if cfg.lambda_visual > 0:
        from flows.stage import generate_hw
        from tasks.model import image_size, locked_model

        height, width = image_size(locked_model(MODELS_DIR), *generate_hw(params_file))  # generate.height/width
        lat_fp = fingerprint("values-latents", {"seed": p.seed, "images": p.latent_images,
                                                "steps": p.latent_steps, "height": height, "width": width},
                             inputs=[MODELS_DIR], code=LATENT_CODE)
        lat_outs = [LATENTS / f"batch_{i:05d}.safetensors" for i in range(len(batches))]
        ids = [[r.edit_id for r in b] for b in batches]
        prompts = [[r.source for r in b] for b in batches]
        futures = source_latents.map(lat_outs, [item_fingerprint(lat_fp, [i, s]) for i, s in zip(ids, prompts)],
                                     unmapped(MODELS_DIR), ids, prompts, unmapped(p.seed),
                                     unmapped(p.latent_images), unmapped(p.latent_steps),
                                     unmapped(height), unmapped(width))
        latents = [f.result() for f in futures]
    # The folder is a DVC output (persist: true): it holds this run's latents and their index only, on
    # text-only runs (λ = 0) the index alone, so its hash in dvc.lock is that of a fresh clone's run of
    # the same params, whatever ran in this workspace before (a later visual run regenerates them).
    write_json(LATENT_INDEX, {"files": [p.name for p in latents if p is not None]})
    prune(LATENTS, keep=[*(p for p in latents if p is not None), LATENT_INDEX])
    outs = [BATCHES / f"batch_{i:05d}.safetensors" for i in range(len(batches))]
    items = [as_dicts(b) for b in batches]
    futures = values_batch.map(outs, [item_fingerprint(fp, it) for it in items], unmapped(MODELS_DIR), items,
                               unmapped(config), unmapped(value_layer), latents)
    done = [f.result() for f in futures]
    out = merge_values(VALUES, fp, done, config)
    prune(BATCHES, keep=[*done, *(losses_file(d) for d in done)])
    metrics = values_metrics(out)
    write_json(METRICS, metrics)
    logger().info("values of %d edits at layer %d in %d batches: mean loss %.4g → %.4g", metrics["n_edits"],
                  value_layer, len(batches), metrics["mean"]["total_init"], metrics["mean"]["total"])
    return out


if __name__ == "__main__":
    run_stage(values)
