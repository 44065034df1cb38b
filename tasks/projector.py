"""Prefect tasks of the projector stage (METHOD.md §3): one null-space projector per layer, what it
protects (on C0 and on held-out keys) and its eigen-spectrum with the chosen cut."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch
from prefect import task

from t2iedit.storage import atomic_path, load_meta, read_json, sidecar_path, write_json
from t2iedit.keys import SecondMoment
from t2iedit.projector import NullSpaceProjector, null_space_projector, protected_energy
from tasks.stamps import STAMP_CACHE, run_once


def projector_file(folder: Path, layer: int) -> Path:
    return Path(folder) / f"layer_{layer:02d}.safetensors"


@task(cache_policy=STAMP_CACHE)
def build_projector(out: Path, fingerprint: str, moment: Path, mode: str, value: float,
                    heldout: Path | None = None) -> Path:
    """The null-space projector of one layer's moment (+ sidecar with its null rank, threshold,
    ``protected_energy`` on C0 and ``heldout_energy`` on the held-out moment when given)."""
    def produce(path: Path) -> None:
        m = SecondMoment.load(moment)
        C0 = m.moment()
        proj = null_space_projector(C0, mode, value)
        meta = {"layer": load_meta(moment).get("layer"), "count": m.count,
                "protected_energy": protected_energy(proj.P, C0)}
        if heldout is not None:
            h = SecondMoment.load(heldout)
            meta.update(heldout_energy=protected_energy(proj.P, h.moment()), heldout_count=h.count)
        proj.save(path, meta=meta)

    return run_once(out, fingerprint, produce, also=[sidecar_path(out)])


def write_projector_metrics(path: Path, projectors: dict[int, Path]) -> Path:
    """Per layer (METHOD.md §3: always record them): null rank, threshold, ``protected_energy``
    = 1 − tr(P C0)/tr(C0) and ``heldout_energy`` (the same on keys of captions outside K0)."""
    rows = {}
    for layer, p in sorted(projectors.items()):
        meta = load_meta(p)
        dim = read_json(sidecar_path(p))["tensors"]["eigenvalues"]["shape"][0]
        rows[f"layer_{layer:02d}"] = {"null_rank": meta["null_rank"], "dim": dim,
                                      "null_fraction": meta["null_rank"] / dim, "threshold": meta["threshold"],
                                      "protected_energy": meta["protected_energy"],
                                      "heldout_energy": meta.get("heldout_energy")}
    return write_json(path, rows)


def spectrum_table(proj: NullSpaceProjector) -> pd.DataFrame:
    """One row per eigen-direction, ascending: index, log10 eigenvalue, the share of tr(C0) in the
    directions up to it, and whether it lies in the null space (the chosen cut)."""
    lam = proj.eigenvalues.clamp_min(0)
    cum = torch.cumsum(lam, 0) / lam.sum()
    return pd.DataFrame({
        "index": range(proj.dim),
        "log10_eigenvalue": [math.log10(v) if v > 0 else float("nan") for v in lam.tolist()],
        "cumulative_energy": cum.tolist(),
        "null_space": [int(i < proj.null_rank) for i in range(proj.dim)]})


def write_spectrum(folder: Path, png: Path, projectors: dict[int, Path]) -> list[Path]:
    """``folder``/layer_XX.csv (the DVC plot data) and one PNG of every layer's spectrum with its cut
    (``dvc plots show`` needs a CDN; the PNG does not)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    for layer, p in sorted(projectors.items()):
        proj = NullSpaceProjector.load(p)
        df = spectrum_table(proj)
        out = folder / f"layer_{layer:02d}.csv"
        with atomic_path(out) as tmp:
            df.to_csv(tmp, index=False)
        written.append(out)
        line, = ax.plot(df["index"], df["log10_eigenvalue"], lw=1, label=f"layer {layer}")
        if 0 < proj.null_rank <= proj.dim:
            ax.axvline(proj.null_rank - 0.5, color=line.get_color(), ls=":", lw=1)
    meta = load_meta(next(iter(projectors.values())))
    ax.set_xlabel("eigen-direction of C0 (ascending); dotted: null-space cut")
    ax.set_ylabel("log10 eigenvalue")
    ax.set_title(f"key spectrum, projector {meta['mode']} {meta['value']:g}")
    ax.legend(fontsize=7)
    FigureCanvasAgg(fig)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return [*written, Path(png)]
