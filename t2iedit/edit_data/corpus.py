"""The preserved-key corpus: texts whose fc2 keys K0 the edit must leave untouched (METHOD.md §2).

Default: a seeded sample of the 30,000 COCO captions shipped in data/raw/coco. Optional: any Hugging
Face ``datasets`` text dataset (e.g. wikitext-103) for users with a network — install the ``hf`` extra.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from t2iedit.edit_data.schema import DatasetError

CORPUS_SCHEMA = pa.schema([
    pa.field("text", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),  # coco-30k | hf:<name>/<config>/<split>
    pa.field("source_id", pa.string(), nullable=False),  # coco_id, or the row index in the HF split
])


def coco_captions(path: str | os.PathLike, size: int, seed: int, holdout_first: int = 0) -> pa.Table:
    """``size`` captions sampled without replacement (numpy PCG64 seeded with ``seed``), in file order.

    ``holdout_first`` rows at the head of the file are never sampled: the FID-5K evaluation uses the
    first 5,000 captions, and keys built from them would protect exactly the prompts FID measures.
    """
    path = Path(path)
    df = pd.read_csv(path, dtype={"prompt": str, "coco_id": str}, keep_default_na=False)
    for col in ("prompt", "coco_id"):
        if col not in df.columns:
            raise DatasetError(f"{path}: missing column {col!r}")
    pool = df.iloc[holdout_first:]
    pool = pool[pool["prompt"].str.strip() != ""]
    if not 0 < size <= len(pool):
        raise DatasetError(f"{path}: corpus size {size} not in 1..{len(pool)} "
                           f"(rows after holding out the first {holdout_first})")
    rows = np.sort(np.random.default_rng(seed).choice(len(pool), size=size, replace=False))
    picked = pool.iloc[rows]
    # some captions span several physical lines; a key corpus wants one line per text
    texts = [" ".join(t.split()) for t in picked["prompt"]]
    return pa.table({"text": texts, "source": ["coco-30k"] * size, "source_id": picked["coco_id"].tolist()},
                    schema=CORPUS_SCHEMA)


def hf_texts(name: str, config: str | None, split: str, text_field: str, size: int, seed: int,
             min_chars: int = 20) -> pa.Table:
    """``size`` non-trivial texts (stripped, >= ``min_chars`` characters, no wikitext ``= heading =``
    lines) sampled with ``seed`` from a Hugging Face dataset split. Needs the optional ``datasets``."""
    try:
        hf = importlib.import_module("datasets")
    except ImportError as err:
        raise DatasetError("the Hugging Face corpus needs the optional dependency 'datasets': "
                           "pip install -c constraints.txt 't2iedit[hf]'") from err
    ds = hf.load_dataset(name, config, split=split)
    if text_field not in ds.column_names:
        raise DatasetError(f"{name}/{config}/{split}: no field {text_field!r} (has {ds.column_names})")
    texts = ds[text_field]
    keep = [(i, t.strip()) for i, t in enumerate(texts)
            if isinstance(t, str) and len(t.strip()) >= min_chars and not t.strip().startswith("=")]
    if not 0 < size <= len(keep):
        raise DatasetError(f"{name}/{config}/{split}: corpus size {size} not in 1..{len(keep)} usable texts")
    rows = np.sort(np.random.default_rng(seed).choice(len(keep), size=size, replace=False))
    picked = [keep[r] for r in rows]
    tag = f"hf:{name}/{config or ''}/{split}"
    return pa.table({"text": [t for _, t in picked], "source": [tag] * size,
                     "source_id": [str(i) for i, _ in picked]}, schema=CORPUS_SCHEMA)
