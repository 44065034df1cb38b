"""Prefect tasks of the ner stage (METHOD.md §4): named entities of every edit's source prompt as
character spans (Parquet), and the recall against the dataset's own entities where it has them."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from t2iedit.storage import read_parquet, write_parquet
from t2iedit.ner import (ENTITY_SCHEMA, dataset_entities, entities_table, entity_recall, heuristic_entities,
                         hf_entities, load_hf_tagger)
from tasks.stamps import STAMP_CACHE, run_once


def read_sources(edits_parquet: Path) -> tuple[list[str], list[str], list[str | None]]:
    """(edit ids, source prompts, dataset entities) of every row of the ``edits`` table."""
    rows = read_parquet(edits_parquet).select(["edit_id", "source", "entity"]).to_pylist()
    return [r["edit_id"] for r in rows], [r["source"] for r in rows], [r["entity"] for r in rows]


@task(cache_policy=STAMP_CACHE)
def extract_entities(out: Path, fingerprint: str, edits_parquet: Path, backend: str, model: str,
                     revision: str | None, aggregation: str, min_score: float) -> Path:
    """``out``: one row per entity (``t2iedit.ner.ENTITY_SCHEMA``), each recording its backend."""
    def produce(path: Path) -> None:
        ids, sources, given = read_sources(edits_parquet)
        if backend == "dataset":
            ents = dataset_entities(ids, sources, given)
        elif backend == "heuristic":
            ents = heuristic_entities(ids, sources)
        elif backend == "hf":
            ents = hf_entities(load_hf_tagger(model, revision, aggregation), ids, sources, min_score)
        else:
            raise ValueError(f"unknown NER backend {backend!r}")
        write_parquet(path, entities_table(ents), ENTITY_SCHEMA)

    return run_once(out, fingerprint, produce)


def ner_metrics(entities_parquet: Path, edits_parquet: Path, backend: str) -> dict:
    """Counts, and recall vs the dataset's entities (CAKE) when the edit set has any."""
    ids, sources, given = read_sources(edits_parquet)
    table = read_parquet(entities_parquet, ENTITY_SCHEMA)
    found = set(table.column("edit_id").to_pylist())
    metrics = {"backend": backend, "n_edits": len(ids), "n_entities": table.num_rows,
               "edits_with_entities": sum(i in found for i in ids)}
    truth = {i: (s, e) for i, s, e in zip(ids, sources, given) if e}
    if truth:
        metrics["recall"] = entity_recall(table, truth)
    return metrics
