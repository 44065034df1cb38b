"""The comparison of methods: edit requests from the dataset table, which prompts each method is
evaluated on, and the results table in the layout of the paper's Tables 2/3 (rows = methods, the
Oracle — ``unedited`` on the test prompts — first; columns = categories + Score, mean ± std over seeds;
the threshold test is the headline table, the two-class test the second)."""

from __future__ import annotations

from typing import Mapping

import pandas as pd
import pyarrow as pa

from t2iedit.metrics import CATEGORY_ORDER, DISPLAY, ROW_LABELS, TESTS, paper_rows
from t2iedit.prompts import EditRequest

COMPARISON_SCHEMA = pa.schema([
    pa.field("method", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),       # row label of the paper layout ("Oracle (unedited)")
    pa.field("test", pa.string(), nullable=False),        # threshold (headline) | binary
    pa.field("category", pa.string(), nullable=False),    # Efficacy … Specificity, Score
    pa.field("mean", pa.float64(), nullable=False),       # success rate in %, mean over seeds
    pa.field("std", pa.float64(), nullable=False),        # std over seeds (ddof=1; 0 for one seed)
    pa.field("n_seeds", pa.int64(), nullable=False),
])


def requests_from_edits(edits: pd.DataFrame) -> list[EditRequest]:
    """The edits to apply: rows of kind ``single`` (CAKE composites are evaluation-only), with the
    dataset's entity (if any, and if it occurs in the source) as an EATA character span."""
    out = []
    for row in edits[edits["kind"] == "single"].itertuples(index=False):
        spans: tuple[tuple[int, int], ...] = ()
        entity = getattr(row, "entity", None)
        if isinstance(entity, str) and entity and entity.lower() in row.source.lower():
            start = row.source.lower().index(entity.lower())
            spans = ((start, start + len(entity)),)
        old = getattr(row, "old", None)  # RoAD's Old: ReFACT's contrast text (BASELINES.md)
        out.append(EditRequest(row.edit_id, row.source, row.target, spans,
                               old if isinstance(old, str) and old else None))
    if not out:
        raise ValueError("the edit table has no single edits")
    return out


def prompt_column(oracle_prompts: bool) -> str:
    """The eval-prompt column a method's images are generated from (the oracle row uses the
    dataset's oracle prompts, falling back to the prompt where there is none)."""
    return "oracle_prompt" if oracle_prompts else "prompt"


def comparison_table(results: Mapping[str, Mapping[str, Mapping]]) -> pa.Table:
    """``{method: {test: metrics.summarize(...)}}`` → long table (:data:`COMPARISON_SCHEMA`): the
    headline test first, rows in the paper's order (:func:`t2iedit.metrics.paper_rows`)."""
    rows = []
    for test in TESTS:
        for method in paper_rows(results):
            if test not in results[method]:
                continue
            s = results[method][test]
            n = len(s.get("seeds", [])) or 1
            label = ROW_LABELS.get(method, method)
            for c in CATEGORY_ORDER:
                if c in s["categories"]:
                    e = s["categories"][c]
                    rows.append((method, label, test, DISPLAY[c], e["mean"], e["std"], n))
            rows.append((method, label, test, "Score", s["score"]["mean"], s["score"]["std"], n))
    cols = list(zip(*rows)) if rows else [[]] * len(COMPARISON_SCHEMA)
    return pa.table(dict(zip(COMPARISON_SCHEMA.names, map(list, cols))), schema=COMPARISON_SCHEMA)
