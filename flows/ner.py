"""Stage ner: named entities of the source prompts (METHOD.md §4).

``python -m flows.ner`` (DVC stage ``ner``) reads params.yaml ``ner`` and the edit set
(data/processed/datasets/edits.parquet); writes data/ner/entities.parquet (character spans, one row
per kept entity, with its backend), data/ner/entities.filtered.parquet (each entity dropped or trimmed as not the
edit — whole subject, role words — with its reason) and the DVC metrics data/ner/metrics.json (counts,
filtered entities by reason; recall against the dataset's ground-truth entities, exact span and
article/case-insensitive, when the dataset has them; ``benchmarks``: the backend on RoAD's 41 Role
sources, hand-labelled in data/raw/RoAD/RoAD_role_entities.csv, and on CAKE's 100 single edits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow
from pydantic import Field

from flows.reporting import logger
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from t2iedit.storage import write_json
from tasks.fingerprints import fingerprint
from tasks.ner import benchmark_scores, extract_entities, filtered_file, ner_metrics

EDITS = Path("data/processed/datasets/edits.parquet")
ROAD_LABELS = Path("data/raw/RoAD/RoAD_role_entities.csv")
CAKE = Path("data/raw/CAKE/CAKE.json")
OUT = Path("data/ner")
ENTITIES, METRICS = OUT / "entities.parquet", OUT / "metrics.json"
CODE = ["t2iedit.ner", "t2iedit.prompts", "t2iedit.storage", "tasks.ner"]


class NerParams(StageParams):
    backend: Literal["hf", "dataset", "heuristic"] = "heuristic"
    model: str = "dslim/bert-large-NER"    # hf backend: hub id or local folder (paper's tagger)
    revision: str | None = None
    aggregation: Literal["simple", "first", "average", "max"] = "simple"
    min_score: float = Field(default=0.0, ge=0.0, le=1.0)


@flow(name="ner")
def ner(params_file: str = PARAMS_FILE) -> Path:
    p = load_params("ner", NerParams, params_file)
    extra = {"model": p.model, "revision": p.revision} if p.backend == "hf" else None
    fp = fingerprint("ner", p, inputs=[EDITS], code=CODE, extra=extra)
    out = extract_entities(ENTITIES, fp, EDITS, p.backend, p.model, p.revision, p.aggregation, p.min_score)
    bench = benchmark_scores(p.backend, ROAD_LABELS, CAKE, p.model, p.revision, p.aggregation, p.min_score)
    metrics = ner_metrics(out, EDITS, p.backend, bench)
    write_json(METRICS, metrics)
    logger().info("ner (%s): %d entities in %d/%d edits (%s filtered in %s); recall %s; benchmarks %s",
                  p.backend, metrics["n_entities"], metrics["edits_with_entities"], metrics["n_edits"],
                  metrics.get("filtered"), filtered_file(out), metrics.get("recall"), bench)
    return out


if __name__ == "__main__":
    run_stage(ner)
