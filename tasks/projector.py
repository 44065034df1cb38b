"""Prefect tasks of the projector stage (METHOD.md §3): one null-space projector per layer."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from t2iedit.storage import load_meta, read_json, sidecar_path, write_json
from t2iedit.keys import SecondMoment
from t2iedit.projector import null_space_projector
from tasks.stamps import STAMP_CACHE, run_once


def projector_file(folder: Path, layer: int) -> Path:
    return Path(folder) / f"layer_{layer:02d}.safetensors"


@task(cache_policy=STAMP_CACHE)
def build_projector(out: Path, fingerprint: str, moment: Path, mode: str, value: float) -> Path:
    """The null-space projector of one layer's moment (+ sidecar with its null rank and threshold)."""
    def produce(path: Path) -> None:
        m = SecondMoment.load(moment)
        proj = null_space_projector(m.moment(), mode, value)
        proj.save(path, meta={"layer": load_meta(moment).get("layer"), "count": m.count})

    return run_once(out, fingerprint, produce, also=[sidecar_path(out)])


def write_projector_metrics(path: Path, projectors: dict[int, Path]) -> Path:
    """Null-space rank per layer as DVC metrics (METHOD.md §3: always record it)."""
    rows = {}
    for layer, p in sorted(projectors.items()):
        meta = load_meta(p)
        dim = read_json(sidecar_path(p))["tensors"]["eigenvalues"]["shape"][0]
        rows[f"layer_{layer:02d}"] = {"null_rank": meta["null_rank"], "dim": dim,
                                      "null_fraction": meta["null_rank"] / dim, "threshold": meta["threshold"]}
    return write_json(path, rows)
