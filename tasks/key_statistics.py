"""Prefect tasks of the statistics stage (METHOD.md §2).

The corpus is cut into shards; each shard's per-layer ``Σ k kᵀ`` is one resumable item (a killed run
keeps finished shards); the shards merge into one second moment per layer.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from t2iedit.storage import load_meta, load_tensors, save_tensors, sidecar_path
from t2iedit.keys import SecondMoment, collect_second_moment
from t2iedit.models import default_device
from tasks.stamps import STAMP_CACHE, run_once
from tasks.model import load_locked_encoder


def moment_file(folder: Path, layer: int) -> Path:
    return Path(folder) / f"layer_{layer:02d}.safetensors"


@task(cache_policy=STAMP_CACHE)
def moment_shard(out: Path, fingerprint: str, models_dir: Path, texts: list[str], layers: list[int],
                 batch_size: int) -> Path:
    """``Σ k kᵀ`` of every layer over one shard of texts: tensors ``"<layer>"``, counts in the sidecar."""
    def produce(path: Path) -> None:
        _, tokenizer, adapter = load_locked_encoder(models_dir)
        adapter.model.to(default_device())
        moments = collect_second_moment(adapter, tokenizer, texts, layers, batch_size=batch_size,
                                        progress=False)
        save_tensors(path, {str(l): m.sum for l, m in moments.items()},
                     meta={"counts": {str(l): m.count for l, m in moments.items()}, "texts": len(texts)})

    return run_once(out, fingerprint, produce, also=[sidecar_path(out)])


@task(cache_policy=STAMP_CACHE)
def merge_moments(out: Path, fingerprint: str, shards: list[Path], layers: list[int]) -> Path:
    """``out``/layer_XX.safetensors: the merged second moment of each layer (+ sidecar with count)."""
    def produce(folder: Path) -> None:
        for layer in layers:
            total = None
            for shard in shards:
                s = load_tensors(shard)[str(layer)]
                part = SecondMoment(s.shape[0], s, int(load_meta(shard)["counts"][str(layer)]))
                total = part if total is None else total.merge(part)
            total.save(moment_file(folder, layer), meta={"layer": layer, "shards": len(shards)})

    return run_once(out, fingerprint, produce)
