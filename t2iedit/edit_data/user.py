"""User edit files: CSV (header ``source,target[,entity]``) or YAML (a list of mappings with those
keys, optionally under a top-level ``edits:``), UTF-8 with or without a byte-order mark. Rows are
numbered from 1 (the CSV header is not a row); every error names the file, its line, the row and the
field, and every bad row is reported (not only the first).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import yaml

from t2iedit.edit_data.conflicts import flag_other_sources
from t2iedit.edit_data.schema import EditSet, DatasetError, edits_table, eval_prompts_table, norm_text

MAX_TOKENS = 77  # CLIP's context, BOS and EOS included
FIELDS = ("source", "target", "entity")
REQUIRED = ("source", "target")
TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip-tokenizer"


def default_tokenizer() -> Any:
    """The vendored CLIP tokenizer (SD v1.x), loaded offline."""
    from transformers import CLIPTokenizer  # here: importing transformers costs seconds per stage

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


MAX_REPORTED = 20  # bad rows listed in one error; the rest are counted


def read_text(path: Path) -> str:
    """The file as text: UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8" writes one).

    Any other encoding is a :class:`DatasetError` naming the file, the line and the offending byte.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the file ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DatasetError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                           f"{e.start}); save the file as UTF-8 (in Excel: \"CSV UTF-8\")") from None


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(first line of the record, row) for every CSV record; a syntax error (an unterminated quote,
    text after a closing quote) stops with the line it starts on."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, header, last = [], None, 0
    while True:
        start = last + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise DatasetError(f"{path}: line {start}: unterminated quote: a '\"' opened in the record "
                                   f"starting on this line is never closed") from None
            raise DatasetError(f"{path}: line {reader.line_num}: CSV syntax error: {e}") from None
        last = reader.line_num
        if not cells:  # a blank line
            continue
        if header is None:
            header = [c.strip() for c in cells]
            _check_header(path, header)
            continue
        row: dict[str, Any] = {h: (cells[i] if i < len(cells) else "") for i, h in enumerate(header)}
        if len(cells) > len(header):
            row[None] = cells[len(header):]
        rows.append((start, row))
    if header is None:
        raise DatasetError(f"{path}: empty file (expected a header line source,target[,entity])")
    return rows


def _yaml_rows(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line, item) for every item of the YAML list (optionally under ``edits:``)."""
    try:
        data, root = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise DatasetError(f"{path}: {where}invalid YAML: {problem}") from None
    if isinstance(data, dict) and set(data) == {"edits"}:
        data = data["edits"]
        root = next(v for k, v in root.value if k.value == "edits")
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a list of edits (or a mapping with the key 'edits')")
    return [(node.start_mark.line + 1, row) for node, row in zip(root.value, data)]


def _rows(path: Path) -> list[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".yaml", ".yml"):
        raise DatasetError(f"{path}: unsupported edit file type {suffix!r} (use .csv, .yaml or .yml)")
    text = read_text(path)
    return _csv_rows(path, text) if suffix == ".csv" else _yaml_rows(path, text)


def _check_header(path: Path, names: list[str]) -> None:
    where = f"{path}: header"
    unknown = [k for k in names if k not in FIELDS]
    if unknown:
        raise DatasetError(f"{where}, field {unknown[0]!r}: unknown field (allowed: {', '.join(FIELDS)})")
    for k in REQUIRED:
        if k not in names:
            raise DatasetError(f"{where}, field {k!r}: missing")


def _row_problems(row: Any, tokenizer: Any, max_tokens: int) -> tuple[dict[str, str | None], list[str]]:
    """The cleaned fields of one row and what is wrong with it ("field 'x': why", in field order)."""
    if not isinstance(row, dict):
        return {}, ["expected a mapping with keys source, target[, entity]"]
    if None in row:  # CSV: more cells than header names
        return {}, [f"{len(row[None])} cells beyond the header {[k for k in row if k is not None]}"]
    problems = [f"field {k!r}: unknown field (allowed: {', '.join(FIELDS)})" for k in row if k not in FIELDS]
    problems += [f"field {k!r}: missing" for k in REQUIRED if k not in row]
    values: dict[str, str | None] = {}
    for field in FIELDS:
        value = row.get(field)
        if value is not None and not isinstance(value, str):
            problems.append(f"field {field!r}: expected text, got {type(value).__name__}")
            values[field] = None
            continue
        value = None if value is None else value.strip()
        if field in REQUIRED and field in row and not value:
            problems.append(f"field {field!r}: empty")
        values[field] = value or None
        if value:
            n_tokens = len(tokenizer(value).input_ids)
            if n_tokens > max_tokens:
                problems.append(f"field {field!r}: {n_tokens} CLIP tokens, more than {max_tokens}")
    source, entity = values.get("source"), values.get("entity")
    if source and entity is not None and norm_text(entity) not in norm_text(source):
        problems.append(f"field 'entity': {entity!r} does not occur in the source {source!r}")
    return values, problems


def _raise_all(path: Path, errors: list[str]) -> None:
    if len(errors) == 1:
        raise DatasetError(errors[0])
    shown = errors[:MAX_REPORTED]
    more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    raise DatasetError(f"{path}: {len(errors)} errors\n" + "\n".join(f"  {e}" for e in shown) + more)


def load_user_edits(path: str | os.PathLike, tokenizer: Any | None = None,
                    max_tokens: int = MAX_TOKENS) -> EditSet:
    """Validate a user edit file into an EditSet (one efficacy prompt per edit: source vs target).

    Rejected: an empty source or target, an entity that does not occur in its source (an empty entity
    means none), a source repeated (case/space-insensitively) — with a different target or
    not — and a source/target/entity longer than ``max_tokens`` CLIP tokens. Every bad row is
    reported (the first :data:`MAX_REPORTED` in the message), each as
    ``<file>: line <l> (row <n>), field '<field>': <why>`` — ``l`` the file's line, ``n`` the row
    (1 = the first fact; the CSV header is not a row).
    """
    path = Path(path)
    rows = _rows(path)  # syntax and encoding first: no tokenizer needed to reject those
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    seen: dict[str, tuple[str, str]] = {}
    edits, prompts, errors = [], [], []
    for n, (line, row) in enumerate(rows, start=1):
        where = f"{path}: line {line} (row {n})"
        values, problems = _row_problems(row, tokenizer, max_tokens)
        source, target, entity = values.get("source"), values.get("target"), values.get("entity")
        if source:
            key = norm_text(source)
            if key in seen:
                first, first_target = seen[key]
                what = ("a different target " + repr(first_target))\
                    if norm_text(first_target or "") != norm_text(target or "") else "the same target"
                problems.append(f"field 'source': {source!r} duplicates {first} with {what}")
            else:
                seen[key] = (f"line {line} (row {n})", target)
        errors += [f"{where}{', ' if p.startswith('field') else ': '}{p}" for p in problems]
        if problems:
            continue
        eid = f"user-{path.stem}-{n - 1:03d}"
        edits.append({"edit_id": eid, "dataset": "user", "split": path.stem, "kind": "single", "source": source,
                      "target": target, "subject": source, "entity": entity, "oracle": target,
                      "row_type": None, "composite_of": None})
        prompts.append({"prompt_id": f"{eid}/efficacy/0", "edit_id": eid, "category": "efficacy",
                        "prompt": source, "class_original": source, "class_edited": target,
                        "eval_text": target, "oracle_prompt": target, "is_other_source": False,
                        **{f"threshold_{s}": None for s in ("mean", "1sigma", "2sigma", "3sigma")}})
    if errors:
        _raise_all(path, errors)
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
