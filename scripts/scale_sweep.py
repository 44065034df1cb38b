"""Metric vs number of edits: the data and plot of a ``datasets.max_edits`` sweep of DVC experiments.

Reads the JSON of ``dvc exp show --json`` (DVC 3: a list of baseline commits, each with
``experiments[*].revs[*]``; the ``workspace`` entry is skipped — it is one of the experiments or
uncommitted state), takes every commit/experiment that has ``datasets.max_edits`` and the evaluation
metrics file, and writes

    OUT/metric_vs_edits.csv          exp, rev, timestamp, n_edits, method, test, category, mean
    OUT/metric_vs_edits_<test>.png   t2iedit.plots.metric_vs_edits, one line per method

Several experiments with the same N: the latest (timestamp) wins. ``n_edits`` is the requested
``datasets.max_edits`` (CAKE composite partners may add a few edits; null = all is skipped: no N).

    dvc exp show --json | python scripts/scale_sweep.py --out data/reports/scale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from t2iedit import metrics as M
from t2iedit import plots

METRICS_FILE = "data/eval/metrics/summary/metrics.json"
PARAM = "datasets.max_edits"
COLUMNS = ["exp", "rev", "timestamp", "n_edits", "method", "test", "category", "mean"]


def _revisions(exp_show: list[dict]) -> Iterator[dict]:
    """Every baseline commit and experiment revision of ``dvc exp show --json`` (workspace skipped)."""
    for entry in exp_show:
        if entry.get("rev") == "workspace":
            continue
        yield entry
        for exp in entry.get("experiments") or []:
            yield from exp.get("revs") or []


def _lookup(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def sweep_table(exp_show: list[dict], metrics_file: str = METRICS_FILE, param: str = PARAM,
                params_file: str = "params.yaml") -> pd.DataFrame:
    """Tidy rows (``COLUMNS``) of every revision with an integer ``param`` and ``metrics_file``."""
    by_n: dict[int, tuple[str, list[dict]]] = {}
    for rev in _revisions(exp_show):
        data = rev.get("data") or {}
        n = _lookup(((data.get("params") or {}).get(params_file) or {}).get("data"), param)
        metrics = ((data.get("metrics") or {}).get(metrics_file) or {}).get("data")
        if not isinstance(n, int) or isinstance(n, bool) or not metrics:
            continue
        stamp = data.get("timestamp") or ""
        rows = [{"exp": rev.get("name") or rev["rev"][:7], "rev": rev["rev"], "timestamp": stamp,
                 "n_edits": n, "method": method, "test": test,
                 "category": M.DISPLAY.get(category, category), "mean": float(value)}
                for method, tests in metrics.items() if isinstance(tests, dict)
                for test in M.TESTS if isinstance(tests.get(test), dict)
                for category, value in tests[test].items()]
        if rows and (n not in by_n or stamp >= by_n[n][0]):
            by_n[n] = (stamp, rows)
    table = pd.DataFrame([r for n in sorted(by_n) for r in by_n[n][1]], columns=COLUMNS)
    return table


def write_sweep(table: pd.DataFrame, out: str | Path, metric: str = "Score") -> list[Path]:
    """``out``/metric_vs_edits.csv and one plot per test present; returns the written paths."""
    from t2iedit.storage import atomic_path

    if table.empty:
        raise ValueError(f"no experiment with {PARAM} and {METRICS_FILE}: run `scripts/scale_sweep.sh run N ...` first")
    out = Path(out)
    written = []
    with atomic_path(out / "metric_vs_edits.csv") as tmp:
        table.to_csv(tmp, index=False)
    written.append(out / "metric_vs_edits.csv")
    for test, sub in table.groupby("test", sort=False):
        written.append(plots.metric_vs_edits(sub, out / f"metric_vs_edits_{test}.png", metric=metric))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default="-", help="dvc exp show --json output (default: stdin)")
    ap.add_argument("--out", default="data/reports/scale")
    ap.add_argument("--metric", default="Score", help="category to plot: Score, Efficacy, Generality, ...")
    ap.add_argument("--metrics-file", default=METRICS_FILE)
    args = ap.parse_args(argv)
    text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text(encoding="utf-8")
    table = sweep_table(json.loads(text), metrics_file=args.metrics_file)
    for path in write_sweep(table, args.out, metric=args.metric):
        print(path)
    print(f"N = {sorted(set(table['n_edits']))} from {table['exp'].nunique()} experiment(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
