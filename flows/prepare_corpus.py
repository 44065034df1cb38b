"""Stage prepare_corpus: the preserved-key texts K0 (METHOD.md §2).

``python -m flows.prepare_corpus`` (DVC stage ``prepare_corpus``) reads params.yaml ``corpus`` and,
for ``source: coco``, the sha256-verified data/raw/coco/coco_30k.csv; writes
data/processed/corpus/corpus.parquet. Its own stage (not part of prepare_datasets): changing the
edit dataset never touches the statistics' inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow
from pydantic import Field

from flows.reporting import logger
from flows.stage import PARAMS_FILE, StageParams, load_params, run_stage
from tasks.fingerprints import fingerprint
from tasks.edit_data import prepare_corpus as corpus_task
from tasks.edit_data import verified_raw

RAW_DIR = Path("data/raw")
MANIFEST = RAW_DIR / "MANIFEST.json"
DOWNLOAD_DIR = Path("data/interim/raw")
CORPUS_DIR = Path("data/processed/corpus")
COCO_CSV = "coco/coco_30k.csv"
CODE = ["t2iedit.edit_data", "t2iedit.storage", "tasks.edit_data"]


class CorpusParams(StageParams):
    source: Literal["coco", "hf"] = "coco"
    size: int = Field(gt=0)
    seed: int = 0
    holdout_first: int = Field(default=5000, ge=0)  # COCO rows kept out (FID-5K captions)
    download: Literal["offline", "online", "auto"] = "offline"  # coco: vendored file or GitHub
    hf_name: str = "wikitext"
    hf_config: str | None = "wikitext-103-raw-v1"
    hf_split: str = "train"
    hf_text_field: str = "text"


@flow(name="prepare_corpus")
def prepare_corpus(params_file: str = PARAMS_FILE) -> Path:
    c = load_params("corpus", CorpusParams, params_file)
    if c.source == "coco":
        raw = verified_raw(RAW_DIR, MANIFEST, c.download, DOWNLOAD_DIR, only=[COCO_CSV])
        inputs = [RAW_DIR / COCO_CSV]  # the fetched bytes equal the vendored ones (both verified)
    else:
        raw, inputs = RAW_DIR, []
    fp = fingerprint("prepare_corpus", c.model_dump(exclude={"download"}), inputs=inputs, code=CODE)
    hf = {"name": c.hf_name, "config": c.hf_config, "split": c.hf_split, "text_field": c.hf_text_field}
    corpus = corpus_task(CORPUS_DIR, fp, raw / COCO_CSV, c.source, c.size, c.seed, c.holdout_first, hf)
    logger().info("preserved-key corpus (%s, size %d) in %s", c.source, c.size, corpus)
    return corpus


if __name__ == "__main__":
    run_stage(prepare_corpus)
