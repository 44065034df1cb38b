"""Prefect tasks of the ner stage (METHOD.md §4): named entities of every edit's source prompt as
character spans (Parquet), the entities dropped or trimmed as not-the-edit with their reasons, and the
recall against labelled entities: the dataset's own (CAKE) where it has them, and two fixed benchmarks
— CAKE's 100 single edits and RoAD's 41 Role sources (hand-labelled, data/raw/RoAD)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

from prefect import task

from t2iedit.storage import read_parquet, write_parquet
from t2iedit.ner import (ENTITY_SCHEMA, FILTER_SCHEMA, Entity, dataset_entities, entities_table, entity_recall,
                         filter_entities, filtered_table, heuristic_entities, hf_entities, load_hf_tagger,
                         role_entity_scores)
from tasks.stamps import STAMP_CACHE, run_once


def read_sources(edits_parquet: Path) -> tuple[list[str], list[str], list[str | None]]:
    """(edit ids, source prompts, dataset entities) of every row of the ``edits`` table."""
    rows = read_parquet(edits_parquet).select(["edit_id", "source", "entity"]).to_pylist()
    return [r["edit_id"] for r in rows], [r["source"] for r in rows], [r["entity"] for r in rows]


def filtered_file(entities_parquet: Path) -> Path:
    """Where the dropped/trimmed entities of ``entities_parquet`` go (data/ner/entities.filtered.parquet)."""
    p = Path(entities_parquet)
    return p.with_name(f"{p.stem}.filtered.parquet")


def raw_entities(backend: str, ids: Sequence[str], sources: Sequence[str], given: Sequence[str | None],
                 model: str, revision: str | None, aggregation: str, min_score: float, tagger=None) -> list[Entity]:
    """The backend's entities, before :func:`t2iedit.ner.filter_entities`."""
    if backend == "dataset":
        return dataset_entities(ids, sources, given)
    if backend == "heuristic":
        return heuristic_entities(ids, sources)
    if backend == "hf":
        return hf_entities(tagger or load_hf_tagger(model, revision, aggregation), ids, sources, min_score)
    raise ValueError(f"unknown NER backend {backend!r}")


@task(cache_policy=STAMP_CACHE)
def extract_entities(out: Path, fingerprint: str, edits_parquet: Path, backend: str, model: str,
                     revision: str | None, aggregation: str, min_score: float) -> Path:
    """``out``: one row per kept entity (``t2iedit.ner.ENTITY_SCHEMA``), each recording its backend;
    beside it ``<stem>.filtered.parquet``: every dropped or trimmed entity with its reason (``FILTER_SCHEMA``)."""
    def produce(path: Path) -> None:
        ids, sources, given = read_sources(edits_parquet)
        kept, records = filter_entities(raw_entities(backend, ids, sources, given, model, revision,
                                                     aggregation, min_score))
        write_parquet(filtered_file(path), filtered_table(records), FILTER_SCHEMA)
        write_parquet(path, entities_table(kept), ENTITY_SCHEMA)

    return run_once(out, fingerprint, produce, also=[filtered_file(out)])


def read_role_labels(path: Path) -> dict[str, tuple[str, str | None]]:
    """data/raw/RoAD/RoAD_role_entities.csv: ``road-role-XX → (prompt, entity or None)``."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or {"prompt", "entity"} - set(rows[0]):
        raise ValueError(f"{path}: needs columns prompt, entity")
    out = {}
    for i, r in enumerate(rows):
        ent = r["entity"] or None
        if ent and ent.lower() not in r["prompt"].lower():
            raise ValueError(f"{path}:{i + 2}: entity {ent!r} does not occur in prompt {r['prompt']!r}")
        out[f"road-role-{i:02d}"] = (r["prompt"], ent)
    return out


def read_cake_labels(path: Path) -> dict[str, tuple[str, str]]:
    """CAKE's single edits: ``cake-XXX → (source prompt, CAKE's entity field)``."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))["single_edit"]
    return {f"cake-{i:03d}": (r["edit_prompt"].format(r["entity"]), r["entity"]) for i, r in enumerate(rows)}


def benchmark_scores(backend: str, road_labels: Path, cake_json: Path, model: str, revision: str | None,
                     aggregation: str, min_score: float) -> dict:
    """The configured backend (after the filter) on RoAD's Role sources and CAKE's single edits.

    RoAD has no entity field, so the ``dataset`` backend has nothing to say there (``null``).
    """
    tagger = load_hf_tagger(model, revision, aggregation) if backend == "hf" else None
    road = read_role_labels(road_labels)
    cake = read_cake_labels(cake_json)
    out: dict = {"backend": backend}
    if backend == "dataset":
        out["road_roles"] = None
    else:
        ids, srcs = list(road), [s for s, _ in road.values()]
        before = raw_entities(backend, ids, srcs, [None] * len(ids), model, revision, aggregation, min_score, tagger)
        kept, records = filter_entities(before)
        out["road_roles"] = {**role_entity_scores(kept, road),
                             "before_filter": role_entity_scores(before, road),
                             "dropped": sum(r["action"] == "dropped" for r in records),
                             "trimmed": sum(r["action"] == "trimmed" for r in records)}
    ids, srcs, ents = list(cake), [s for s, _ in cake.values()], [e for _, e in cake.values()]
    kept, records = filter_entities(raw_entities(backend, ids, srcs, ents, model, revision, aggregation,
                                                 min_score, tagger))
    out["cake_single"] = {**entity_recall(entities_table(kept), cake), "dropped_or_trimmed": len(records)}
    return out


def ner_metrics(entities_parquet: Path, edits_parquet: Path, backend: str, benchmarks: dict | None = None) -> dict:
    """Counts, the dropped/trimmed entities by reason, recall vs the dataset's entities (CAKE) when
    the edit set has any, and the fixed benchmarks (:func:`benchmark_scores`) when given."""
    ids, sources, given = read_sources(edits_parquet)
    table = read_parquet(entities_parquet, ENTITY_SCHEMA)
    found = set(table.column("edit_id").to_pylist())
    metrics = {"backend": backend, "n_edits": len(ids), "n_entities": table.num_rows,
               "edits_with_entities": sum(i in found for i in ids)}
    filtered = filtered_file(entities_parquet)
    if filtered.exists():
        reasons: dict[str, int] = {}
        for r in read_parquet(filtered, FILTER_SCHEMA).select(["action", "reason"]).to_pylist():
            key = f"{r['action']}:{r['reason']}"
            reasons[key] = reasons.get(key, 0) + 1
        metrics["filtered"] = dict(sorted(reasons.items()))
    truth = {i: (s, e) for i, s, e in zip(ids, sources, given) if e}
    if truth:
        metrics["recall"] = entity_recall(table, truth)
    if benchmarks is not None:
        metrics["benchmarks"] = benchmarks
    return metrics
