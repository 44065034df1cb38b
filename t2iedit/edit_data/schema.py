"""The two tables every later stage reads: ``edits`` and ``eval_prompts`` (explicit pyarrow schemas).

``edits`` holds one row per fact to write into the model; ``eval_prompts`` one row per prompt that the
evaluation generates images for, linked to its edit by ``edit_id``. Benchmarks (TIMED, RoAD, CAKE) and
user files all end up in this form, so generation and metrics never look at a raw file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from t2iedit.storage import read_parquet, write_parquet

# Paper names (Table 1-3): CAKE generality_a -> Generality, generality_b -> KgeMap,
# compositionality -> Compo; TIMED/RoAD positives -> Generality, negatives -> Specificity.
CATEGORIES = ("efficacy", "generality", "kgemap", "specificity", "compo")
DATASETS = ("timed", "road", "cake", "user")
KINDS = ("single", "composite")

THRESHOLD_STATS = ("mean", "1sigma", "2sigma", "3sigma")  # CAKE's adaptive thresholds, k sigma = mean - k*std


class DatasetError(ValueError):
    """Invalid dataset input; the message names the file, row and field when there is one."""


def _f(name: str, type_: pa.DataType, nullable: bool, doc: str) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": doc})


EDITS_SCHEMA = pa.schema([
    _f("edit_id", pa.string(), False, "unique id, e.g. timed-test-000, cake-test-000, cake-test-compo-000"),
    _f("dataset", pa.string(), False, "timed | road | cake | user"),
    _f("split", pa.string(), False, "timed: test (104, SD-1.4 filtered) | test_full (147) | validation; "
                                    "road: test | validation; cake: test; user: the file's stem"),
    _f("kind", pa.string(), False, "single (an edit to apply) | composite (a CAKE pair of single edits, "
                                   "evaluated by the compo prompts; never applied by itself)"),
    _f("source", pa.string(), False, "source (edit) prompt whose meaning changes, e.g. 'A banana'"),
    _f("target", pa.string(), False, "target prompt the source should now mean, e.g. 'A blue banana'"),
    _f("subject", pa.string(), False, "phrase placed in prompt templates ('A photo of {}') whose last token "
                                      "is the edit position; the source prompt for every shipped dataset"),
    _f("entity", pa.string(), True, "named entity inside the source given by the dataset (CAKE, user files)"),
    _f("oracle", pa.string(), True, "prompt that realises the edit in the unedited model"),
    _f("row_type", pa.string(), True, "RoAD Type (Role | Appearance); CAKE role_type (1..10)"),
    _f("composite_of", pa.list_(pa.string()), True, "for kind=composite: the edit_ids of its two single edits"),
    _f("old", pa.string(), True, "what the source denotes in the unedited model when it is not the source "
                                 "text itself (RoAD Old, e.g. 'Justin Trudeau'); ReFACT contrasts the target "
                                 "with it (ReFACT clip_edit.py:263, compute_v.py:76); null: the source"),
])

EVAL_PROMPTS_SCHEMA = pa.schema([
    _f("prompt_id", pa.string(), False, "unique id: <edit_id>/<category>/<index>"),
    _f("edit_id", pa.string(), False, "the edit this prompt evaluates (edits.edit_id)"),
    _f("category", pa.string(), False, "efficacy | generality | kgemap | specificity | compo"),
    _f("prompt", pa.string(), False, "the prompt fed to the (edited) model"),
    _f("class_original", pa.string(), True, "binary CLIP test: text of the unedited content"),
    _f("class_edited", pa.string(), True, "binary CLIP test: text of the edited content "
                                          "(efficacy/generality: must win; specificity: must lose)"),
    _f("eval_text", pa.string(), True, "CAKE evaluation text scored against the image (cos(bigG))"),
    _f("threshold_mean", pa.float64(), True, "CAKE SD-1.4 threshold: mean cos over 50 unedited images"),
    _f("threshold_1sigma", pa.float64(), True, "mean - 1 std"),
    _f("threshold_2sigma", pa.float64(), True, "mean - 2 std (CAKE's default criterion: score >= this)"),
    _f("threshold_3sigma", pa.float64(), True, "mean - 3 std"),
    _f("oracle_prompt", pa.string(), True, "prompt giving the edited content in the unedited model"),
    _f("is_other_source", pa.bool_(), False, "a specificity prompt equal (case/space-insensitive) to the "
                                             "source of another edit in the same table (METHOD.md §9)"),
])


@dataclass(frozen=True)
class EditSet:
    """An ``edits`` table and its ``eval_prompts``; constructed only through ``validate``-ing code paths."""

    edits: pa.Table
    eval_prompts: pa.Table

    def __post_init__(self) -> None:
        validate(self.edits, self.eval_prompts)


def norm_text(text: str) -> str:
    """The CLIP tokenizer's view of a prompt for equality tests: lower case, collapsed whitespace."""
    return " ".join(text.lower().split())


def clean_text(text: str) -> str:
    """Strip surrounding whitespace (RoAD has 'Azalea '); the CLIP tokenizer ignores it anyway."""
    return text.strip()


def validate(edits: pa.Table, eval_prompts: pa.Table) -> None:
    """Raise ``DatasetError`` unless both tables match their schemas and reference each other."""
    for name, table, schema in (("edits", edits, EDITS_SCHEMA), ("eval_prompts", eval_prompts, EVAL_PROMPTS_SCHEMA)):
        if not table.schema.equals(schema, check_metadata=False):
            raise DatasetError(f"{name}: schema differs from {name.upper()}_SCHEMA:\n{table.schema}")
        for field in schema:
            if not field.nullable and table.column(field.name).null_count:
                raise DatasetError(f"{name}: column {field.name!r} has nulls")
    ids = edits.column("edit_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise DatasetError("edits: edit_id is not unique")
    bad = set(edits.column("dataset").to_pylist()) - set(DATASETS)
    if bad:
        raise DatasetError(f"edits: unknown dataset {sorted(bad)}")
    bad = set(edits.column("kind").to_pylist()) - set(KINDS)
    if bad:
        raise DatasetError(f"edits: unknown kind {sorted(bad)}")
    known = set(ids)
    for row in edits.select(["edit_id", "kind", "composite_of"]).to_pylist():
        links = row["composite_of"]
        if (row["kind"] == "composite") != (links is not None):
            raise DatasetError(f"edits: {row['edit_id']}: composite_of must be set iff kind is composite")
        if links is not None and not set(links) <= known:
            raise DatasetError(f"edits: {row['edit_id']}: composite_of names unknown edits {links}")
    pids = eval_prompts.column("prompt_id").to_pylist()
    if len(set(pids)) != len(pids):
        raise DatasetError("eval_prompts: prompt_id is not unique")
    dangling = set(eval_prompts.column("edit_id").to_pylist()) - known
    if dangling:
        raise DatasetError(f"eval_prompts: edit_ids not in edits: {sorted(dangling)[:5]}")
    bad = set(eval_prompts.column("category").to_pylist()) - set(CATEGORIES)
    if bad:
        raise DatasetError(f"eval_prompts: unknown categories {sorted(bad)}")


def edits_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EDITS_SCHEMA)


def eval_prompts_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EVAL_PROMPTS_SCHEMA)


def write_edit_set(edit_set: EditSet, edits_path: str | os.PathLike,
                   eval_prompts_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write both tables as Parquet with their explicit schemas (atomic)."""
    return (write_parquet(edits_path, edit_set.edits, EDITS_SCHEMA),
            write_parquet(eval_prompts_path, edit_set.eval_prompts, EVAL_PROMPTS_SCHEMA))


def read_edit_set(edits_path: str | os.PathLike, eval_prompts_path: str | os.PathLike) -> EditSet:
    """Read and validate both tables (columns selected and cast to the schemas)."""
    return EditSet(read_parquet(edits_path, EDITS_SCHEMA), read_parquet(eval_prompts_path, EVAL_PROMPTS_SCHEMA))
