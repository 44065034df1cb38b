"""Prefect tasks of the statistics stage (METHOD.md §2).

The corpus is cut into shards; each shard's per-layer ``Σ k kᵀ`` is one resumable item (a killed run
keeps finished shards); the shards merge into one second moment per layer. A held-out moment of
captions outside the K0 sample (:func:`heldout_captions`) measures what the projector protects beyond
the keys it was built from (METHOD.md §3).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

import pandas as pd

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


def heldout_captions(coco_csv: Path, corpus_ids: set[str], holdout_first: int, n: int) -> list[str]:
    """The first ``n`` captions of ``coco_csv`` (file order) after its first ``holdout_first`` rows
    (the FID-5K prompts: never used here either) whose ``coco_id`` is not in the K0 sample."""
    df = pd.read_csv(coco_csv, dtype={"prompt": str, "coco_id": str}, keep_default_na=False)
    for col in ("prompt", "coco_id"):
        if col not in df.columns:
            raise ValueError(f"{coco_csv}: missing column {col!r}")
    pool = df.iloc[holdout_first:]
    pool = pool[~pool["coco_id"].isin(corpus_ids) & (pool["prompt"].str.strip() != "")]
    if len(pool) < n:
        raise ValueError(f"{coco_csv}: only {len(pool)} captions outside the K0 sample and the first "
                         f"{holdout_first} rows; statistics.heldout_texts asks for {n}")
    return [" ".join(t.split()) for t in pool["prompt"].iloc[:n]]
