"""Pictures of the evaluation: before/after image grids per edit and summary plots.

Plots are written as PNG together with the tidy data behind them (CSV), so ``dvc plots`` can draw the
same data from the CSV. matplotlib runs headless (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from t2iedit.storage import atomic_path
from t2iedit.metrics import CATEGORY_ORDER, DISPLAY

logger = logging.getLogger(__name__)


def _save(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def edit_grid(rows: Sequence[tuple[str, Image.Image, Image.Image]], path: str | os.PathLike,
              title: str | None = None, dpi: int = 100) -> Path:
    """One row per prompt (label, image before the edit, image after), two columns: before/after.
    Typically the source prompt, a generality and a specificity prompt of one edit."""
    if not rows:
        raise ValueError("no rows for the grid")
    fig = Figure(figsize=(4.2, 2.0 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for r, (label, before, after) in enumerate(rows):
        for c, (im, head) in enumerate(((before, "before"), (after, "after"))):
            ax = axes[r][c]
            ax.imshow(im)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(head)
        axes[r][0].set_ylabel("\n".join(textwrap.wrap(label, 28)), fontsize=8)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    return _save(fig, path, dpi)


def category_data(results: Mapping[str, Mapping]) -> pd.DataFrame:
    """Tidy (method, category, mean, std) rows from ``{method: metrics.summarize(...)}``, Score last."""
    out = []
    for method, r in results.items():
        for c in CATEGORY_ORDER:
            if c in r["categories"]:
                e = r["categories"][c]
                out.append({"method": method, "category": DISPLAY[c], "mean": e["mean"], "std": e["std"]})
        out.append({"method": method, "category": "Score", "mean": r["score"]["mean"],
                    "std": r["score"]["std"]})
    return pd.DataFrame(out)


def category_bars(data: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Grouped bars: one group per category, one bar per method, error bars = std over seeds."""
    cats = list(dict.fromkeys(data["category"]))
    methods = list(dict.fromkeys(data["method"]))
    width = 0.8 / max(len(methods), 1)
    fig = Figure(figsize=(1.3 * len(cats) + 2, 3.5))
    ax = fig.subplots()
    for i, m in enumerate(methods):
        sub = data[data["method"] == m].set_index("category").reindex(cats)
        ax.bar([j + i * width for j in range(len(cats))], sub["mean"], width, yerr=sub["std"],
               label=m, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def metric_vs_edits(data: pd.DataFrame, path: str | os.PathLike, metric: str = "Score") -> Path:
    """Line plot of ``metric`` against ``n_edits``, one line per method. ``data`` columns:
    method, n_edits, category, mean (, std)."""
    sub = data[data["category"] == metric]
    if sub.empty:
        raise ValueError(f"no rows for {metric!r}")
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    for m, g in sub.groupby("method", sort=False):
        g = g.sort_values("n_edits")
        ax.errorbar(g["n_edits"], g["mean"], yerr=g.get("std"), marker="o", label=m, capsize=2)
    ax.set_xscale("log")
    ax.set_xlabel("number of edits")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def text_space_bars(results: Mapping[str, Mapping], columns: Mapping[str, str], path: str | os.PathLike,
                    title: str = "") -> Path:
    """Text-space metrics (``{method: t2iedit.text_space.text_space_metrics}``) as two panels: the
    success rates (%) per category, one bar per method, and the drifts (1 − cos; the columns named
    ``*drift``) per method. ``columns``: metric key → display name, in order."""
    COLUMNS, TS_DISPLAY = tuple(columns), dict(columns)
    methods = list(results)
    rates = [c for c in COLUMNS if not c.endswith("drift") and any(r.get(c) is not None for r in results.values())]
    drifts = [c for c in COLUMNS if c.endswith("drift") and any(r.get(c) is not None for r in results.values())]
    fig = Figure(figsize=(1.4 * len(rates) + 1.2 * len(drifts) + 3, 3.6))
    ax_rate, ax_drift = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(len(rates), 1), max(len(drifts), 1)]})
    width = 0.8 / max(len(methods), 1)
    for ax, cols in ((ax_rate, rates), (ax_drift, drifts)):
        for i, m in enumerate(methods):
            vals = [results[m].get(c) for c in cols]
            ax.bar([j + i * width for j in range(len(cols))], [v if v is not None else 0.0 for v in vals],
                   width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))],
                      [TS_DISPLAY[c].replace(" ", "\n", 1) for c in cols], fontsize=8)
    ax_rate.set_ylabel("% of prompts")
    ax_rate.set_ylim(0, 100)
    ax_drift.set_ylabel("mean 1 − cos (frozen vs edited)")
    ax_rate.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
