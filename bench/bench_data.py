"""Inputs shared by the benchmarks (no timing here)."""

from __future__ import annotations

import json
from pathlib import Path

from t2iedit.ner import dataset_entities
from t2iedit.prompts import EditRequest


def cake_requests(cake_json: Path, n: int) -> list[EditRequest]:
    """``n`` edit requests from CAKE's single edits (cycled when ``n`` exceeds them), ids ``e000``…, each
    with the dataset's entity span (what the values stage's EATA term protects)."""
    rows = json.loads(Path(cake_json).read_text(encoding="utf-8"))["single_edit"]
    rows = [rows[i % len(rows)] for i in range(n)]
    ids = [f"e{i:03d}" for i in range(n)]
    srcs = [r["edit_prompt"].format(r["entity"]) for r in rows]
    spans = {e.edit_id: ((e.start, e.end),) for e in dataset_entities(ids, srcs, [r["entity"] for r in rows])}
    return [EditRequest(i, src, r["target"], spans[i]) for i, src, r in zip(ids, srcs, rows)]
