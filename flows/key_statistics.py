"""Stage statistics: the preserved keys' second moment C0 of every edited layer (METHOD.md §2).

``python -m flows.key_statistics`` (DVC stage ``statistics``) reads params.yaml ``statistics``, the locked
model (data/models) and the corpus (data/processed/corpus/corpus.parquet); writes one resumable
shard per ``shard_size`` texts under data/statistics/shards/ and the merged moments
data/statistics/moments/layer_XX.safetensors (float64 Σ k kᵀ, token count in the sidecar), and the
same moments of ``heldout_texts`` COCO captions outside the K0 sample and outside the first
``corpus.holdout_first`` rows (the FID-5K prompts) in data/statistics/heldout/ — the projector stage
reports how much of their key energy the null space leaves alone (METHOD.md §3).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import Field

from flows.reporting import logger
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from flows.stage import read_params
from t2iedit.storage import read_parquet
from tasks.fingerprints import fingerprint, item_fingerprint
from tasks.stamps import prune
from tasks.model import read_lock
from tasks.key_statistics import heldout_captions, merge_moments, moment_shard

MODELS_DIR = Path("data/models")
CORPUS = Path("data/processed/corpus/corpus.parquet")
OUT = Path("data/statistics")
SHARDS, MOMENTS = OUT / "shards", OUT / "moments"
HELDOUT = OUT / "heldout"
COCO = Path("data/raw/coco/coco_30k.csv")
CODE = ["t2iedit.keys", "t2iedit.models", "t2iedit.storage", "tasks.model", "tasks.key_statistics"]


class StatisticsParams(StageParams):
    layers: list[int] | None = None         # None: the model preset's edit layers (SD: 0..10)
    max_texts: int | None = Field(default=None, ge=1)  # None: the whole corpus
    batch_size: int = Field(default=64, ge=1)
    shard_size: int = Field(default=2000, ge=1)  # texts per resumable task
    heldout_texts: int = Field(default=1000, ge=1)  # COCO captions outside K0 (and the FID head)


def stat_layers(p: StatisticsParams, lock: dict) -> list[int]:
    return sorted(set(p.layers if p.layers is not None else lock["edit_layers"]))


@flow(name="statistics")
def statistics(params_file: str = PARAMS_FILE) -> Path:
    p = load_params("statistics", StatisticsParams, params_file)
    layers = stat_layers(p, read_lock(MODELS_DIR))
    corpus = read_parquet(CORPUS)
    texts = corpus.column("text").to_pylist()[: p.max_texts]
    holdout_first = int((read_params(params_file).get("corpus") or {}).get("holdout_first") or 0)
    fp = fingerprint("statistics", p, inputs=[MODELS_DIR, CORPUS, COCO], code=CODE,
                     extra={"holdout_first": holdout_first})
    chunks = [texts[i:i + p.shard_size] for i in range(0, len(texts), p.shard_size)]
    outs = [SHARDS / f"shard_{i:05d}.safetensors" for i in range(len(chunks))]
    futures = moment_shard.map(outs, [item_fingerprint(fp, c) for c in chunks], MODELS_DIR, chunks,
                               [layers] * len(chunks), p.batch_size)
    shards = [f.result() for f in futures]
    moments = merge_moments(MOMENTS, fp, shards, layers)
    heldout_ids = set(corpus.column("source_id").to_pylist())  # the whole K0 sample, even past max_texts
    held = heldout_captions(COCO, heldout_ids, holdout_first, p.heldout_texts)
    held_shard = moment_shard(SHARDS / "heldout.safetensors", item_fingerprint(fp, held), MODELS_DIR, held,
                              layers, p.batch_size)
    merge_moments(HELDOUT, item_fingerprint(fp, "heldout"), [held_shard], layers)
    prune(SHARDS, keep=[*shards, held_shard])
    logger().info("second moments of layers %s over %d texts (%d shards) in %s",
                  layers, len(texts), len(shards), moments)
    return moments


if __name__ == "__main__":
    run_stage(statistics)
