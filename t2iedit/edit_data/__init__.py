"""TIMED / RoAD / CAKE / user edit files -> the ``edits`` and ``eval_prompts`` Parquet schema, the
preserved-key corpus, and verified raw files. See README "Data" and METHOD.md §8-9."""

from t2iedit.edit_data.benchmarks import (
    LOADERS, THRESHOLD_FILES, join_thresholds, load_benchmark, load_cake, load_road, load_timed, timed_tags,
)
from t2iedit.edit_data.conflicts import (
    POLICIES, ConflictPolicy, flag_other_sources, report_markdown, resolve_conflicts, source_groups, subset,
)
from t2iedit.edit_data.corpus import CORPUS_SCHEMA, coco_captions, hf_texts
from t2iedit.edit_data.download import (
    GITHUB_RAW, RawFile, fetch_raw, http_get, read_manifest, verify_raw,
)
from t2iedit.edit_data.schema import (
    CATEGORIES, DATASETS, EDITS_SCHEMA, EVAL_PROMPTS_SCHEMA, DatasetError, EditSet, norm_text,
    read_edit_set, validate, write_edit_set,
)
from t2iedit.edit_data.user import MAX_TOKENS, default_tokenizer, load_user_edits, over_length

__all__ = [
    "CATEGORIES", "CORPUS_SCHEMA", "ConflictPolicy", "DATASETS", "DatasetError", "EDITS_SCHEMA",
    "EVAL_PROMPTS_SCHEMA", "EditSet", "GITHUB_RAW", "LOADERS", "MAX_TOKENS", "POLICIES", "RawFile",
    "THRESHOLD_FILES", "coco_captions", "default_tokenizer", "fetch_raw", "flag_other_sources", "hf_texts",
    "http_get", "join_thresholds", "load_benchmark", "load_cake", "load_road", "load_timed",
    "load_user_edits", "norm_text", "over_length", "read_edit_set", "read_manifest", "report_markdown",
    "resolve_conflicts", "source_groups", "subset", "timed_tags", "validate", "verify_raw", "write_edit_set",
]
