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


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def edit_grid(rows: Sequence[tuple[str, Image.Image, Image.Image]], path: str | os.PathLike,
              title: str | None = None) -> Path:
    """One row per prompt (label, image before the edit, image after), two columns: before/after.
    Typically the source prompt and a specificity prompt of one edit."""
    if not rows:
        raise ValueError("no rows for the grid")
    fig = Figure(figsize=(5.0, 2.6 * len(rows)))
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
    return _save(fig, path)


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
