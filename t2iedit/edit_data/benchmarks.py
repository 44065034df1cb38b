"""Loaders for the three benchmarks (raw files as vendored in data/raw/, see each SOURCE.md).

Category mapping: TIMED/RoAD source -> efficacy, positives -> generality, negatives -> specificity;
CAKE efficacy -> efficacy, generality_a -> generality, generality_b -> kgemap, specificity ->
specificity, compositionality -> compo. The CLIP class texts follow ReFACT's evaluation
(test_clip_score.py), the evaluation texts and threshold tags follow CAKE's ``unify_dataset_format``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from t2iedit.edit_data.schema import (
    EditSet, DatasetError, clean_text, edits_table, eval_prompts_table, norm_text,
)
from t2iedit.edit_data.conflicts import flag_other_sources

log = logging.getLogger(__name__)

TIMED_FILES = {
    "test": "TIMED/TIMED_test_set_filtered_SD14.csv",  # 104 rows, the SD-1.4 filtered default
    "test_full": "TIMED/TIMED_test_set.csv",  # 147 rows
    "validation": "TIMED/TIMED_validation_set.csv",  # 8 rows
}
ROAD_FILES = {"test": "RoAD/RoAD_test.csv", "validation": "RoAD/RoAD_validation.csv"}
CAKE_FILE = "CAKE/CAKE.json"
THRESHOLD_FILES = {  # CAKE's SD-1.4 thresholds; computed for these splits only
    ("timed", "test"): "CAKE/eva_clip_thresholds/stable-diffusion-v1-4/TIMED/seed-50.json",
    ("road", "test"): "CAKE/eva_clip_thresholds/stable-diffusion-v1-4/RoAD/seed-50.json",
    ("cake", "test"): "CAKE/eva_clip_thresholds/stable-diffusion-v1-4/CAKE/seed-50.json",
}
N_POS = N_NEG = 5


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    # keep_default_na=False: a prompt such as "None" must stay text, and empty cells are caught below
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: missing columns {missing}")
    for i, row in df[required].iterrows():
        for col in required:
            if not row[col].strip():
                raise DatasetError(f"{path}: row {i + 1}, field {col!r}: empty")
    return df


def _prompt(edit_id: str, category: str, index: int, prompt: str, *, original: str | None = None,
            edited: str | None = None, eval_text: str | None = None, oracle: str | None = None) -> dict:
    c = lambda s: None if s is None else clean_text(s)  # noqa: E731
    return {"prompt_id": f"{edit_id}/{category}/{index}", "edit_id": edit_id, "category": category,
            "prompt": clean_text(prompt), "class_original": c(original), "class_edited": c(edited),
            "eval_text": c(eval_text), "oracle_prompt": c(oracle), "is_other_source": False,
            **{f"threshold_{s}": None for s in ("mean", "1sigma", "2sigma", "3sigma")}}


def _edit(edit_id: str, dataset: str, split: str, source: str, target: str, *, entity: str | None = None,
          oracle: str | None = None, row_type: str | None = None, kind: str = "single",
          composite_of: list[str] | None = None, old: str | None = None) -> dict:
    return {"edit_id": edit_id, "dataset": dataset, "split": split, "kind": kind,
            "source": clean_text(source), "target": clean_text(target), "subject": clean_text(source),
            "entity": entity, "oracle": None if oracle is None else clean_text(oracle),
            "row_type": row_type, "composite_of": composite_of,
            "old": None if old is None else clean_text(old)}


def timed_tags(sources: list[str]) -> list[str]:
    """CAKE's threshold tags for TIMED rows: lower-cased source, duplicates suffixed _0, _1, ... in order."""
    lowered = [s.lower() for s in sources]
    counts = pd.Series(lowered).value_counts()
    seen: dict[str, int] = {}
    tags = []
    for s in lowered:
        if counts[s] > 1:
            tags.append(f"{s}_{seen.get(s, 0)}")
            seen[s] = seen.get(s, 0) + 1
        else:
            tags.append(s)
    return tags


def load_timed(raw_dir: str | os.PathLike, split: str = "test") -> EditSet:
    """TIMED: 104 edits / 1,144 prompts for ``test`` (1 efficacy + 5 generality + 5 specificity each)."""
    if split not in TIMED_FILES:
        raise DatasetError(f"TIMED has no split {split!r} (choose from {sorted(TIMED_FILES)})")
    raw_dir = Path(raw_dir)
    cols = ["old", "new"] + [f"{p}{i}" for i in range(1, 6) for p in ("positive", "gt", "negative", "gn")]
    df = _read_csv(raw_dir / TIMED_FILES[split], cols)
    edits, prompts, keys = [], [], []
    tags = timed_tags(df["old"].tolist())
    for n, (row, tag) in enumerate(zip(df.to_dict("records"), tags)):
        eid = f"timed-{split}-{n:03d}"
        edits.append(_edit(eid, "timed", split, row["old"], row["new"], oracle=row["new"]))
        # CAKE scores TIMED efficacy/generality against the edited text, specificity against the prompt itself
        group = [_prompt(eid, "efficacy", 0, row["old"], original=row["old"], edited=row["new"],
                         eval_text=row["new"], oracle=row["new"])]
        group += [_prompt(eid, "generality", i - 1, row[f"positive{i}"], original=row[f"positive{i}"],
                          edited=row[f"gt{i}"], eval_text=row[f"gt{i}"], oracle=row[f"gt{i}"])
                  for i in range(1, N_POS + 1)]
        group += [_prompt(eid, "specificity", i - 1, row[f"negative{i}"], original=row[f"negative{i}"],
                          edited=row[f"gn{i}"], eval_text=row[f"negative{i}"], oracle=row[f"negative{i}"])
                  for i in range(1, N_NEG + 1)]
        raw_tests = [row["old"]] + [row[f"positive{i}"] for i in range(1, 6)] + [row[f"negative{i}"] for i in range(1, 6)]
        prompts += group
        keys += [(tag, t.lower()) for t in raw_tests]
    return _finish("timed", split, raw_dir, edits, prompts, keys)


def load_road(raw_dir: str | os.PathLike, split: str = "test") -> EditSet:
    """RoAD: 90 edits / 990 prompts for ``test``. Validation has no Positive_oracle columns (oracle null)."""
    if split not in ROAD_FILES:
        raise DatasetError(f"RoAD has no split {split!r} (choose from {sorted(ROAD_FILES)})")
    raw_dir = Path(raw_dir)
    cols = ["Type", "Prompt", "Oracle", "Old", "New"]
    cols += [f"{p}{i}" for i in range(1, 6) for p in ("Positive", "Positive_old", "Positive_new", "Negative", "Negative_new")]
    df = _read_csv(raw_dir / ROAD_FILES[split], cols)
    has_oracles = "Positive_oracle1" in df.columns
    edits, prompts, keys = [], [], []
    for n, row in enumerate(df.to_dict("records")):
        eid = f"road-{split}-{n:03d}"
        edits.append(_edit(eid, "road", split, row["Prompt"], row["New"], oracle=row["Oracle"], row_type=row["Type"],
                           old=row["Old"]))
        # ReFACT's efficacy classes are the referents (Old vs New), not the prompts
        prompts.append(_prompt(eid, "efficacy", 0, row["Prompt"], original=row["Old"], edited=row["New"],
                               eval_text=row["New"], oracle=row["Oracle"]))
        prompts += [_prompt(eid, "generality", i - 1, row[f"Positive{i}"], original=row[f"Positive_old{i}"],
                            edited=row[f"Positive_new{i}"], eval_text=row[f"Positive_new{i}"],
                            oracle=row[f"Positive_oracle{i}"] if has_oracles else None)
                    for i in range(1, N_POS + 1)]
        prompts += [_prompt(eid, "specificity", i - 1, row[f"Negative{i}"], original=row[f"Negative{i}"],
                            edited=row[f"Negative_new{i}"], eval_text=row[f"Negative{i}"], oracle=row[f"Negative{i}"])
                    for i in range(1, N_NEG + 1)]
        tag = row["Prompt"].lower()
        keys += [(tag, t.lower()) for t in [row["Prompt"]] + [row[f"Positive{i}"] for i in range(1, 6)]
                 + [row[f"Negative{i}"] for i in range(1, 6)]]
    return _finish("road", split, raw_dir, edits, prompts, keys)


CAKE_CATEGORIES = {"generality_a": "generality", "generality_b": "kgemap", "specificity": "specificity"}


def load_cake(raw_dir: str | os.PathLike, split: str = "test") -> EditSet:
    """CAKE: 100 single + 100 composite edits / 1,500 prompts (100 efficacy, 500 generality, 300 kgemap,
    300 specificity, 300 compo). A composite edit links two single edits (composite_edit[i].edits[0] is
    single_edit[i]; edits[1] is matched to the single edit with identical fields)."""
    if split != "test":
        raise DatasetError(f"CAKE has only the split 'test', not {split!r}")
    raw_dir = Path(raw_dir)
    path = raw_dir / CAKE_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    fields = ("edit_prompt", "entity", "target", "oracle", "role_type")
    key = lambda e: tuple(e[f] for f in fields)  # noqa: E731
    singles = data["single_edit"]
    index = {key(e): n for n, e in enumerate(singles)}
    if len(index) != len(singles):
        raise DatasetError(f"{path}: single_edit has duplicated entries")
    edits, prompts, keys = [], [], []
    for n, e in enumerate(singles):
        eid = f"cake-{split}-{n:03d}"
        source = e["edit_prompt"].format(e["entity"])
        edits.append(_edit(eid, "cake", split, source, e["target"], entity=e["entity"], oracle=e["oracle"],
                           row_type=str(e["role_type"])))
        prompts.append(_prompt(eid, "efficacy", 0, source, eval_text=e["target"], oracle=e["oracle"]))
        keys.append((source, source))
        for raw_cat, cat in CAKE_CATEGORIES.items():
            for i, t in enumerate(e[raw_cat]):
                prompts.append(_prompt(eid, cat, i, t["test"], eval_text=t["test_eval"], oracle=t["test_oracle"]))
                keys.append((source, t["test"]))
    for n, c in enumerate(data["composite_edit"]):
        try:
            members = [index[key(m)] for m in c["edits"]]
        except KeyError as err:
            raise DatasetError(f"{path}: composite_edit[{n}]: an edit is not among single_edit: {err}") from None
        if members[0] != n:
            raise DatasetError(f"{path}: composite_edit[{n}].edits[0] is single_edit[{members[0]}], not [{n}]")
        second = singles[members[1]]
        eid = f"cake-{split}-compo-{n:03d}"
        edits.append(_edit(eid, "cake", split, second["edit_prompt"].format(second["entity"]), second["target"],
                           entity=second["entity"], oracle=second["oracle"], row_type=str(second["role_type"]),
                           kind="composite", composite_of=[f"cake-{split}-{m:03d}" for m in members]))
        tag = "composite/" + singles[n]["edit_prompt"].format(singles[n]["entity"])
        for i, t in enumerate(c["compositionality"]):
            prompts.append(_prompt(eid, "compo", i, t["test"], eval_text=t["test_eval"], oracle=t["test_oracle"]))
            keys.append((tag, t["test"]))
    return _finish("cake", split, raw_dir, edits, prompts, keys)


def _finish(dataset: str, split: str, raw_dir: Path, edits: list[dict], prompts: list[dict],
            keys: list[tuple[str, str]]) -> EditSet:
    rel = THRESHOLD_FILES.get((dataset, split))
    if rel is not None:
        join_thresholds(prompts, keys, json.loads((raw_dir / rel).read_text(encoding="utf-8")), raw_dir / rel)
    edit_set = EditSet(edits_table(edits), eval_prompts_table(prompts))
    return flag_other_sources(edit_set)


def join_thresholds(prompts: list[dict], keys: list[tuple[str, str]], thresholds: dict[str, Any],
                    origin: str | os.PathLike) -> None:
    """Fill ``threshold_*`` of each prompt from ``thresholds[tag][test prompt]`` (in place).

    The thresholds were computed for exactly these prompts, so a missing entry means the tags or the
    data drifted: that is an error, not a silently empty column.
    """
    missing = []
    for p, (tag, test) in zip(prompts, keys, strict=True):
        stats = thresholds.get(tag, {}).get(test)
        if stats is None:
            missing.append(f"{tag!r}/{test!r}")
            continue
        for s in ("mean", "1sigma", "2sigma", "3sigma"):
            p[f"threshold_{s}"] = float(stats[s])
    if missing:
        raise DatasetError(f"{origin}: no threshold for {len(missing)} prompts, e.g. {missing[:3]}")


LOADERS = {"timed": load_timed, "road": load_road, "cake": load_cake}


def load_benchmark(name: str, raw_dir: str | os.PathLike, split: str = "test") -> EditSet:
    """Load ``name`` (timed | road | cake) from the raw folder."""
    if name not in LOADERS:
        raise DatasetError(f"unknown benchmark {name!r} (choose from {sorted(LOADERS)})")
    edit_set = LOADERS[name](raw_dir, split)
    log.info("%s/%s: %d edits, %d eval prompts", name, split, edit_set.edits.num_rows, edit_set.eval_prompts.num_rows)
    return edit_set
