"""Stage statistics: the preserved keys' second moment C0 of every edited layer (METHOD.md §2).

``python -m flows.key_statistics`` (DVC stage ``statistics``) reads params.yaml ``statistics``, the locked
model (data/models) and the corpus (data/processed/corpus/corpus.parquet); writes one resumable
shard per ``shard_size`` texts under data/statistics/shards/ and the merged moments
data/statistics/moments/layer_XX.safetensors (float64 Σ k kᵀ, token count in the sidecar).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import Field

from flows.reporting import logger
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from t2iedit.storage import read_parquet
from tasks.fingerprints import fingerprint, item_fingerprint
from tasks.stamps import prune
from tasks.model import read_lock
from tasks.key_statistics import merge_moments, moment_shard

MODELS_DIR = Path("data/models")
CORPUS = Path("data/processed/corpus/corpus.parquet")
OUT = Path("data/statistics")
SHARDS, MOMENTS = OUT / "shards", OUT / "moments"
CODE = ["t2iedit.keys", "t2iedit.models", "t2iedit.storage", "tasks.model", "tasks.key_statistics"]


class StatisticsParams(StageParams):
    layers: list[int] | None = None         # None: the model preset's edit layers (SD: 0..10)
    max_texts: int | None = Field(default=None, ge=1)  # None: the whole corpus
    batch_size: int = Field(default=64, ge=1)
    shard_size: int = Field(default=2000, ge=1)  # texts per resumable task


def stat_layers(p: StatisticsParams, lock: dict) -> list[int]:
    return sorted(set(p.layers if p.layers is not None else lock["edit_layers"]))


@flow(name="statistics")
def statistics(params_file: str = PARAMS_FILE) -> Path:
    p = load_params("statistics", StatisticsParams, params_file)
    layers = stat_layers(p, read_lock(MODELS_DIR))
    texts = read_parquet(CORPUS).column("text").to_pylist()[: p.max_texts]
    fp = fingerprint("statistics", p, inputs=[MODELS_DIR, CORPUS], code=CODE)
    chunks = [texts[i:i + p.shard_size] for i in range(0, len(texts), p.shard_size)]
    outs = [SHARDS / f"shard_{i:05d}.safetensors" for i in range(len(chunks))]
    futures = moment_shard.map(outs, [item_fingerprint(fp, c) for c in chunks], MODELS_DIR, chunks,
                               [layers] * len(chunks), p.batch_size)
    shards = [f.result() for f in futures]
    moments = merge_moments(MOMENTS, fp, shards, layers)
    prune(SHARDS, keep=shards)
    logger().info("second moments of layers %s over %d texts (%d shards) in %s",
                  layers, len(texts), len(shards), moments)
    return moments


if __name__ == "__main__":
    run_stage(statistics)
