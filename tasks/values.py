"""Prefect tasks of the values stage (METHOD.md §5): target values z per edit batch (resumable items),
the cached source-image latents of the visual loss, and the merge into one values file.

Device: the GPU when there is one (the optimisation is device-agnostic; results agree to float
rounding), else the CPU.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from t2iedit.storage import load_meta, load_tensors, read_parquet, save_tensors, sidecar_path, write_parquet
from t2iedit.models import TextEncoderAdapter, default_device, load_pipeline
from t2iedit.ner import ENTITY_SCHEMA, spans_by_edit
from t2iedit.prompts import EditRequest
from t2iedit.values import (LOSS_SCHEMA, LOSS_TERMS, SHARE_TERMS, ValueConfig, ValueResult, VisualInputs, compute_target_values,
                            concat_results, ddpm_scheduler_for, generate_source_latents, losses_table,
                            value_meta, value_tensors)
from tasks.stamps import STAMP_CACHE, run_once
from tasks.model import load_locked_encoder, read_lock


# Mapped tasks run in threads; transformers' lazy imports are not thread-safe (concurrent first
# imports fail with "cannot import name 'AutoModel'"), so model loading is serialised.
_LOAD_LOCK = threading.Lock()


def edit_requests(edits_parquet: Path, entities_parquet: Path) -> list[EditRequest]:
    """The single edits (composites are evaluation-only) with their entity spans from the ner stage."""
    spans = spans_by_edit(read_parquet(entities_parquet, ENTITY_SCHEMA))
    rows = read_parquet(edits_parquet).to_pylist()
    return [EditRequest(r["edit_id"], r["source"], r["target"], spans.get(r["edit_id"], ()))
            for r in rows if r["kind"] == "single"]


def as_dicts(requests: list[EditRequest]) -> list[dict[str, Any]]:
    return [{"edit_id": r.edit_id, "source": r.source, "target": r.target,
             "entities": [list(e) for e in r.entities]} for r in requests]


def from_dicts(rows: list[dict[str, Any]]) -> list[EditRequest]:
    return [EditRequest(r["edit_id"], r["source"], r["target"], tuple(tuple(e) for e in r["entities"]))
            for r in rows]


class StepProgress:
    """The values optimisation's progress, in ``flows.reporting.track``'s style: a log line with the
    step, the current mean loss and the rate every ``every_s`` seconds (and at the last step), plus a
    Prefect progress artifact inside a task run. Use as ``compute_target_values(..., progress=...)``."""

    def __init__(self, desc: str, every_s: float = 10.0):
        self.desc, self.every_s = desc, every_s
        try:
            self.log = get_run_logger()
        except MissingContextError:
            import logging
            self.log = logging.getLogger("t2iedit.tasks")
        self.progress_id = None
        self.start = self.last = time.monotonic()
        if TaskRunContext.get() is not None:
            self.progress_id = create_progress_artifact(0.0, description=desc)

    def __call__(self, step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s or step == total:
            self.last = now
            self.log.info("%s: step %d/%d, loss %.4g (%.2f steps/s)", self.desc, step, total, loss,
                          step / max(now - self.start, 1e-9))
            if self.progress_id is not None:
                update_progress_artifact(self.progress_id, 100.0 * step / max(total, 1))


def losses_file(values_file: Path) -> Path:
    return values_file.with_name(values_file.name.replace(".safetensors", ".losses.parquet"))


@task(cache_policy=STAMP_CACHE)
def source_latents(out: Path, fingerprint: str, models_dir: Path, edit_ids: list[str], prompts: list[str],
                   seed: int, images_per_prompt: int, num_inference_steps: int | None,
                   height: int | None = None, width: int | None = None) -> Path:
    """``out``: latents (n, K, C, H, W) of the unedited model's images of each source prompt (L_V),
    ``height`` × ``width`` pixels (generate.height/width; None: the pipeline's own)."""
    def produce(path: Path) -> None:
        lock = read_lock(models_dir)
        with _LOAD_LOCK:
            pipe = load_pipeline(lock["source"], lock["revision"]).to(default_device())
        steps = num_inference_steps
        if steps is None:
            from t2iedit.models import get_preset
            steps = get_preset(lock["preset"]).num_inference_steps
        lat = generate_source_latents(pipe, edit_ids, prompts, seed, images_per_prompt,
                                      num_inference_steps=steps, height=height, width=width)
        save_tensors(path, {"latents": lat}, meta={"edit_ids": edit_ids, "seed": seed,
                                                   "num_inference_steps": steps})

    return run_once(out, fingerprint, produce, also=[sidecar_path(out)])


@task(cache_policy=STAMP_CACHE)
def values_batch(out: Path, fingerprint: str, models_dir: Path, requests: list[dict[str, Any]],
                 config: dict[str, Any], value_layer: int, latents: Path | None) -> Path:
    """``out``: z, δ, z0 of one batch of edits optimised together (+ sidecar, + per-edit losses)."""
    cfg = ValueConfig(**{**config, "templates": tuple(config["templates"])})

    def produce(path: Path) -> None:
        reqs = from_dicts(requests)
        visual = None
        if cfg.lambda_visual > 0:
            if latents is None:
                raise ValueError("lambda_visual > 0 needs the source latents")
            lock = read_lock(models_dir)
            with _LOAD_LOCK:
                pipe = load_pipeline(lock["source"], lock["revision"]).to(default_device())
            adapter = TextEncoderAdapter(pipe.text_encoder, lock["text_layer_template"],
                                         lock["text_block_template"])
            tokenizer = pipe.tokenizer
            lat = load_tensors(latents)["latents"]
            if load_meta(latents)["edit_ids"] != [r.edit_id for r in reqs]:
                raise ValueError(f"{latents} holds latents of other edits")
            visual = VisualInputs(pipe.unet, ddpm_scheduler_for(pipe), lat)
        else:
            with _LOAD_LOCK:
                _, tokenizer, adapter = load_locked_encoder(models_dir)
            adapter.model.to(default_device())
        res = compute_target_values(tokenizer, adapter.model, adapter.block(value_layer), reqs, cfg,
                                    visual, value_layer,
                                    progress=StepProgress(f"values {path.stem} ({len(reqs)} edits)"))
        save_tensors(path, value_tensors(res), value_meta(res, cfg))
        write_parquet(losses_file(path), losses_table(res), LOSS_SCHEMA)

    return run_once(out, fingerprint, produce, also=[sidecar_path(out), losses_file(out)])


def load_result(values_file: Path) -> ValueResult:
    t, meta = load_tensors(values_file), load_meta(values_file)
    table = read_parquet(losses_file(values_file), LOSS_SCHEMA)
    losses = {k: torch.tensor(table.column(k).to_pylist()) for k in LOSS_TERMS}
    return ValueResult(meta["edit_ids"], t["z"], t["delta"], t["z0"], losses,
                       int(table.column("steps")[0].as_py()), int(meta["value_layer"]))


@task(cache_policy=STAMP_CACHE)
def merge_values(out: Path, fingerprint: str, batches: list[Path], config: dict[str, Any]) -> Path:
    """``out``: every batch's z in one file (``edit_ids`` in the sidecar, the edit stage's input) and
    the per-edit loss table beside it."""
    cfg = ValueConfig(**{**config, "templates": tuple(config["templates"])})

    def produce(path: Path) -> None:
        res = concat_results([load_result(b) for b in batches])
        save_tensors(path, value_tensors(res), value_meta(res, cfg, batches=len(batches)))
        write_parquet(losses_file(path), losses_table(res), LOSS_SCHEMA)

    return run_once(out, fingerprint, produce, also=[sidecar_path(out), losses_file(out)])


def values_metrics(values_file: Path) -> dict[str, Any]:
    table = read_parquet(losses_file(values_file), LOSS_SCHEMA).to_pandas()
    mean = {k: float(table[k].mean()) for k in ("text", "eata", "visual", "total", "total_init",
                                                 "delta_norm", "z0_norm")}
    # each weighted term's share of the total loss (all edits together) at the first and last Adam step
    share = {k: {when: float(table[f"{when}_{k}"].sum() / table[f"{when}_total"].sum())
                 for when in ("first", "last")} for k in SHARE_TERMS if k != "total"}
    return {"n_edits": len(table), "steps": int(table["steps"].iloc[0]), "mean": mean, "share": share,
            "loss_reduced_fraction": float((table["total"] < table["total_init"]).mean())}
