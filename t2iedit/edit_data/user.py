"""User edit files: CSV (header ``source,target[,entity]``) or YAML (a list of mappings with those
keys, optionally under a top-level ``edits:``). Rows are numbered from 1 (the CSV header is not a
row); every error names the file, the row and the field.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import yaml
from transformers import CLIPTokenizer

from t2iedit.edit_data.conflicts import flag_other_sources
from t2iedit.edit_data.schema import EditSet, DatasetError, edits_table, eval_prompts_table, norm_text

MAX_TOKENS = 77  # CLIP's context, BOS and EOS included
FIELDS = ("source", "target", "entity")
REQUIRED = ("source", "target")
TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip-tokenizer"


def default_tokenizer() -> Any:
    """The vendored CLIP tokenizer (SD v1.x), loaded offline."""

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            _check_fields(path, None, header)
            rows = []
            for n, row in enumerate(reader, start=1):
                if None in row:  # more cells than header names
                    raise DatasetError(f"{path}: row {n}: {len(row[None])} cells beyond the header {header}")
                rows.append(row)
            return rows
    if suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and set(data) == {"edits"}:
            data = data["edits"]
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a list of edits (or a mapping with the key 'edits')")
        for n, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise DatasetError(f"{path}: row {n}: expected a mapping with keys source, target[, entity]")
            _check_fields(path, n, list(row))
        return data
    raise DatasetError(f"{path}: unsupported edit file type {suffix!r} (use .csv, .yaml or .yml)")


def _check_fields(path: Path, row: int | None, names: list[str]) -> None:
    where = f"{path}: " + ("header" if row is None else f"row {row}")
    unknown = [k for k in names if k not in FIELDS]
    if unknown:
        raise DatasetError(f"{where}, field {unknown[0]!r}: unknown field (allowed: {', '.join(FIELDS)})")
    for k in REQUIRED:
        if k not in names:
            raise DatasetError(f"{where}, field {k!r}: missing")


def load_user_edits(path: str | os.PathLike, tokenizer: Any | None = None,
                    max_tokens: int = MAX_TOKENS) -> EditSet:
    """Validate a user edit file into an EditSet (one efficacy prompt per edit: source vs target).

    Rejected: an empty source or target, an entity that does not occur in its source (an empty entity
    means none), a source repeated (case/space-insensitively) — with a different target or
    not — and a source/target/entity longer than ``max_tokens`` CLIP tokens.
    """
    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    seen: dict[str, tuple[int, str]] = {}
    edits, prompts = [], []
    for n, row in enumerate(_rows(path), start=1):
        values: dict[str, str | None] = {}
        for field in FIELDS:
            value = row.get(field)
            if value is not None and not isinstance(value, str):
                raise DatasetError(f"{path}: row {n}, field {field!r}: expected text, got {type(value).__name__}")
            value = None if value is None else value.strip()
            if field in REQUIRED and not value:
                raise DatasetError(f"{path}: row {n}, field {field!r}: empty")
            values[field] = value or None
            if value:
                n_tokens = len(tokenizer(value).input_ids)
                if n_tokens > max_tokens:
                    raise DatasetError(f"{path}: row {n}, field {field!r}: {n_tokens} CLIP tokens, "
                                       f"more than {max_tokens}")
        source, target, entity = values["source"], values["target"], values["entity"]
        if entity is not None and norm_text(entity) not in norm_text(source):
            raise DatasetError(f"{path}: row {n}, field 'entity': {entity!r} does not occur in the source {source!r}")
        key = norm_text(source)
        if key in seen:
            first, first_target = seen[key]
            what = ("a different target " + repr(first_target)) if norm_text(first_target) != norm_text(target) \
                else "the same target"
            raise DatasetError(f"{path}: row {n}, field 'source': {source!r} duplicates row {first} with {what}")
        seen[key] = (n, target)
        eid = f"user-{path.stem}-{n - 1:03d}"
        edits.append({"edit_id": eid, "dataset": "user", "split": path.stem, "kind": "single", "source": source,
                      "target": target, "subject": source, "entity": entity, "oracle": target,
                      "row_type": None, "composite_of": None})
        prompts.append({"prompt_id": f"{eid}/efficacy/0", "edit_id": eid, "category": "efficacy",
                        "prompt": source, "class_original": source, "class_edited": target,
                        "eval_text": target, "oracle_prompt": target, "is_other_source": False,
                        **{f"threshold_{s}": None for s in ("mean", "1sigma", "2sigma", "3sigma")}})
    if not edits:
        raise DatasetError(f"{path}: no edits")
    return flag_other_sources(EditSet(edits_table(edits), eval_prompts_table(prompts)))


def over_length(edit_set: EditSet, tokenizer: Any | None = None, max_tokens: int = MAX_TOKENS) -> list[str]:
    """Ids of edits/eval prompts whose text exceeds ``max_tokens`` CLIP tokens (it would be truncated)."""
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    too_long = lambda text: text is not None and len(tokenizer(text).input_ids) > max_tokens  # noqa: E731
    ids = [f"{r['edit_id']}:{f}" for r in edit_set.edits.to_pylist() for f in ("source", "target") if too_long(r[f])]
    return ids + [r["prompt_id"] for r in edit_set.eval_prompts.select(["prompt_id", "prompt"]).to_pylist()
                  if too_long(r["prompt"])]
