"""Editing metrics (METHOD.md §8): CAKE adaptive thresholds, CLIP zero-shot binary test, summaries.

Two image tests, both on L2-normalised CLIP features (see :mod:`t2iedit.clip_eval`):

- Adaptive threshold (CAKE, Gu et al. 2024) — the **headline** test for all three datasets (the
  paper's Tables 2–3 follow Gu et al.: TIME Efficacy 0.00, Oracle Specificity 94.65 / 96.36 are what
  the thresholds give): success iff ``cos(img, eval_text) >= mean − kσ`` of the unedited model's
  scores of images *of the evaluation text itself* (CAKE: 50 images per text, seeds 0..49; k = 2).
  σ: ``np.std(ddof=1)`` as CAKE's code (init_Bootstrap_evaluation.py:97-107 ``wrap_stats``), a
  parameter (``ddof``).
- Binary test (TIME / ReFACT / EMCID) — the second table: ``softmax(100 · [cos(img, original),
  cos(img, edited)])`` over the two lower-cased class texts. Efficacy, generality (and CAKE's KgeMap /
  Compo) succeed iff the edited class wins; specificity succeeds iff the original class wins.

A metric is the success rate in percent per (category, seed); it is reported as mean ± std over seeds
(sample std, ddof=1; 0 for one seed). Score = geometric mean of the category means (this reproduces
the paper's Score column, e.g. TIMED 73.85 / 69.15 / 71.88 → 71.60); its ± is the std over seeds of
the per-seed geometric means.

Fast text-space metrics need no images: with [EOS] features of the text encoder (un-projected, as in
the target-value loss) the same binary question is asked in feature space — is the edited encoder's
feature of a prompt closer (L2) to the frozen feature of the edited class text than to that of the
original class text?
"""

from __future__ import annotations

import logging
import math
import os
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

logger = logging.getLogger(__name__)

# Order and display names of the paper's Tables 2 and 3.
CATEGORY_ORDER = ("efficacy", "generality", "kgemap", "compo", "specificity")
DISPLAY = {"efficacy": "Efficacy", "generality": "Generality", "kgemap": "KgeMap",
           "compo": "Compo", "specificity": "Specificity", "score": "Score"}
# Which class must win the binary test, per category.
EDITED_MUST_WIN = {"efficacy": True, "generality": True, "kgemap": True, "compo": True,
                   "specificity": False}
TESTS = ("threshold", "binary")  # headline first (the paper's tables use the threshold test)
HEADLINE_TEST = "threshold"
TEST_TITLES = {
    "threshold": "Headline: CAKE adaptive-threshold test (Gu et al.; the paper's Tables 2–3)",
    "binary": "Second table: two-class CLIP test (ReFACT / TIME / EMCID)",
}
# Rows of the paper-layout tables: the paper's Oracle is the unedited model on the *test* prompts
# (METHOD.md §7: CAKE Efficacy 0, RoAD 3.56, TIMED 25); the oracle-prompt images are another row.
ROW_LABELS = {"unedited": "Oracle (unedited)", "oracle": "Oracle prompts (unedited model)"}
# CAKE's threshold std (Hengrui-Gu/T2IKnowledgeEditing init_Bootstrap_evaluation.py:102-107:
# ``data.std(ddof=1)``); its reference images: t2iedit.protocol (50 per evaluation text).
CAKE_DDOF = 1
SIGMA_KEYS = ("1sigma", "2sigma", "3sigma")

PER_IMAGE_SCHEMA = pa.schema([
    pa.field("method", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("edit_id", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("p_edited", pa.float64()),          # binary test: probability of the edited class
    pa.field("binary_success", pa.bool_()),
    pa.field("eval_score", pa.float64()),        # cos(image, eval text)
    pa.field("threshold", pa.float64()),
    pa.field("threshold_success", pa.bool_()),
])


def _check_categories(categories: Iterable[str]) -> list[str]:
    cats = list(categories)
    unknown = sorted(set(cats) - set(EDITED_MUST_WIN))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; expected {list(CATEGORY_ORDER)}")
    return cats


# --- binary test -------------------------------------------------------------------------------

def binary_probability(image_feats: torch.Tensor, original_feats: torch.Tensor,
                       edited_feats: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """p(edited class) = softmax(scale · [cos(img, original), cos(img, edited)])[1], row-wise.

    All inputs (n, d), L2-normalised; returns (n,).
    """
    if not (image_feats.shape == original_feats.shape == edited_feats.shape):
        raise ValueError(f"shape mismatch: {image_feats.shape}, {original_feats.shape}, "
                         f"{edited_feats.shape}")
    logits = scale * torch.stack([(image_feats * original_feats).sum(-1),
                                  (image_feats * edited_feats).sum(-1)], dim=-1)  # (n, 2)
    return logits.double().softmax(-1)[:, 1]


def binary_success(p_edited: Sequence[float], categories: Sequence[str]) -> np.ndarray:
    """Success per image: the edited class wins (p > 0.5) for edit categories, the original class
    wins (p < 0.5) for specificity. A tie is a failure either way."""
    p = np.asarray(p_edited, dtype=np.float64)
    cats = _check_categories(categories)
    if len(cats) != len(p):
        raise ValueError("p_edited and categories differ in length")
    want_edit = np.array([EDITED_MUST_WIN[c] for c in cats], dtype=bool)
    return np.where(want_edit, p > 0.5, p < 0.5)


# --- adaptive thresholds (CAKE) ------------------------------------------------------------------

def threshold_success(scores: Sequence[float], thresholds: Sequence[float]) -> np.ndarray:
    """CAKE's adaptive test: success iff ``score >= threshold``. NaN thresholds are an error."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    if np.isnan(t).any():
        raise ValueError(f"{int(np.isnan(t).sum())} images have no threshold")
    return s >= t


def threshold_stats(scores: Sequence[float], ddof: int = CAKE_DDOF) -> dict[str, float]:
    """CAKE's statistics of one prompt's scores over seeds: mean, ``k sigma`` = mean − k·std and
    ``+k sigma`` = mean + k·std for k = 1, 2, 3 (``wrap_stats``, init_Bootstrap_evaluation.py:97-107:
    std with ddof=1; ``ddof=0`` is the population std)."""
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof!r}")
    s = np.asarray(scores, dtype=np.float64)
    if s.size < 2:
        raise ValueError(f"need at least 2 scores for a standard deviation, got {s.size}")
    mean, std = float(s.mean()), float(s.std(ddof=ddof))
    out = {"mean": mean}
    for k in (1, 2, 3):
        out[f"{k}sigma"] = mean - k * std
        out[f"+{k}sigma"] = mean + k * std
    return out


def compute_thresholds(scores: pd.DataFrame, tag_column: str = "tag",
                       prompt_column: str = "prompt", score_column: str = "score",
                       ddof: int = CAKE_DDOF) -> dict[str, dict[str, dict[str, float]]]:
    """Recompute adaptive thresholds for another model: ``scores`` holds one row per (tag, prompt,
    seed) with the unedited model's ``cos(image, eval text)``. Returns the shipped file's layout
    ``{tag: {prompt: {mean, 1sigma, ...}}}``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (tag, prompt), group in scores.groupby([tag_column, prompt_column], sort=True):
        out.setdefault(str(tag), {})[str(prompt)] = threshold_stats(group[score_column].to_numpy(), ddof)
    return out


def thresholds_from_reference(rows: pd.DataFrame, ddof: int = CAKE_DDOF) -> pd.DataFrame:
    """Adaptive thresholds of another base model or classifier, in the ``eval_prompts`` columns.

    ``rows``: per-image rows of the *unedited* model's images of each prompt's evaluation text
    (CAKE's recipe: ``evaluate_images(..., prompt_column="eval_text")`` over N reference seeds,
    CAKE: 50), with their ``eval_score`` = cos(image, eval text). Returns one row per ``prompt_id``
    with ``n_images``, ``threshold_mean`` and ``threshold_{1,2,3}sigma`` (mean − kσ, std with
    ``ddof``).
    """
    rows = rows[rows["eval_score"].notna()]
    if rows.empty:
        raise ValueError("no eval scores to compute thresholds from")
    out = []
    for pid, group in rows.groupby("prompt_id", sort=True):
        st = threshold_stats(group["eval_score"].astype(float).to_numpy(), ddof)
        out.append({"prompt_id": pid, "n_images": len(group),
                    **{f"threshold_{k}": st[k] for k in ("mean", *SIGMA_KEYS)}})
    return pd.DataFrame(out)


def with_thresholds(eval_prompts: pd.DataFrame, thresholds: pd.DataFrame) -> pd.DataFrame:
    """``eval_prompts`` with its threshold columns replaced by ``thresholds`` (per prompt_id); every
    prompt that has an eval text must get one."""
    cols = [f"threshold_{k}" for k in ("mean", *SIGMA_KEYS)]
    out = eval_prompts.drop(columns=cols).merge(thresholds[["prompt_id", *cols]], on="prompt_id",
                                                how="left")
    lacking = out["eval_text"].notna() & out["threshold_2sigma"].isna()
    if lacking.any():
        raise ValueError(f"{int(lacking.sum())} prompts have no recomputed threshold, e.g. "
                         f"{out.loc[lacking, 'prompt_id'].tolist()[:3]}")
    return out


def lookup_threshold(thresholds: Mapping[str, Mapping[str, Mapping[str, float]]], tag: str,
                     prompt: str, key: str = "2sigma") -> float:
    """Threshold of (tag, prompt); CAKE's TIMED/RoAD files key them lower-cased, so fall back to
    the lower-cased tag and prompt. Missing entries raise with the tag named."""
    for t in (tag, tag.lower()):
        if t in thresholds:
            entry = thresholds[t]
            for p in (prompt, prompt.lower()):
                if p in entry:
                    return float(entry[p][key])
            raise KeyError(f"no threshold for prompt {prompt!r} under tag {t!r}")
    raise KeyError(f"no thresholds for tag {tag!r}")


# --- aggregation -----------------------------------------------------------------------------

def geometric_mean(values: Iterable[float]) -> float:
    """Geometric mean of non-negative values; 0 if any value is 0 (no log(0) warnings)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("geometric mean of nothing")
    if np.isnan(v).any() or (v < 0).any():
        raise ValueError(f"geometric mean needs non-negative numbers, got {v.tolist()}")
    if (v == 0).any():
        return 0.0
    return float(np.exp(np.log(v).mean()))


def _std(v: np.ndarray) -> float:
    return float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize(rows: pd.DataFrame, success_column: str) -> dict:
    """Per category: success rate (%) per seed, mean ± std over seeds; plus the Score.

    ``rows``: per-image rows with ``category``, ``seed`` and a boolean ``success_column`` (rows where
    it is null are left out — e.g. images without a threshold under the binary-only datasets).
    Returns ``{"categories": {cat: {mean, std, per_seed, n_images}}, "score": {mean, std, per_seed}}``.
    """
    rows = rows[rows[success_column].notna()]
    if rows.empty:
        raise ValueError(f"no rows with a value in {success_column!r}")
    cats = [c for c in CATEGORY_ORDER if c in set(_check_categories(rows["category"].unique()))]
    seeds = sorted(int(s) for s in rows["seed"].unique())
    table = (rows.assign(success=rows[success_column].astype(bool).astype(float) * 100.0)
             .pivot_table(index="seed", columns="category", values="success", aggfunc="mean"))
    missing = table[cats].isna()
    if missing.to_numpy().any():
        raise ValueError(f"some (seed, category) cells have no images: "
                         f"{missing.stack()[missing.stack()].index.tolist()}")
    out: dict = {"categories": {}, "seeds": seeds}
    for c in cats:
        v = table[c].to_numpy(dtype=np.float64)
        out["categories"][c] = {
            "mean": float(v.mean()), "std": _std(v),
            "per_seed": {str(s): float(x) for s, x in zip(table.index, v)},
            "n_images": int((rows["category"] == c).sum()),
        }
    per_seed_score = np.array([geometric_mean(table.loc[s, cats]) for s in table.index])
    out["score"] = {
        "mean": geometric_mean(out["categories"][c]["mean"] for c in cats),
        "std": _std(per_seed_score),
        "per_seed": {str(s): float(x) for s, x in zip(table.index, per_seed_score)},
    }
    return out


def paper_rows(methods: Iterable[str]) -> list[str]:
    """Row order of the paper's tables: the Oracle (``unedited``) first, then the others as given."""
    methods = list(methods)
    return [m for m in methods if m == "unedited"] + [m for m in methods if m != "unedited"]


def markdown_table(results: Mapping[str, Mapping], title: str | None = None,
                   digits: int = 2, labels: Mapping[str, str] | None = None) -> str:
    """Rows = methods, columns = categories present (paper order) + Score, cells ``mean ± std``;
    the best mean of each column is bold (layout of the paper's Tables 2 and 3).

    ``results``: ``{method: summarize(...)}``, rows in its order (see :func:`paper_rows`);
    ``labels``: a row's display name by method (e.g. :data:`ROW_LABELS`), else the method name.
    """
    labels = labels or {}
    if not results:
        raise ValueError("no results to tabulate")
    present = set().union(*(r["categories"] for r in results.values()))
    cols = [c for c in CATEGORY_ORDER if c in present] + ["score"]

    def cell(r: Mapping, c: str) -> tuple[float | None, str]:
        entry = r["score"] if c == "score" else r["categories"].get(c)
        if entry is None:
            return None, "–"
        return entry["mean"], f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"

    best = {c: max((m for m in (cell(r, c)[0] for r in results.values()) if m is not None),
                   default=None) for c in cols}
    lines = [f"### {title}", ""] if title else []
    lines.append("| Method | " + " | ".join(DISPLAY[c] for c in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for method, r in results.items():
        cells = []
        for c in cols:
            mean, text = cell(r, c)
            bold = len(results) > 1 and mean is not None and math.isclose(mean, best[c])
            cells.append(f"**{text}**" if bold else text)
        lines.append(f"| {labels.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- scoring images ------------------------------------------------------------------------------

def score_images(encoder, rows: pd.DataFrame, images: Sequence, batch_size: int = 32) -> pd.DataFrame:
    """Run both image tests on ``images`` (PIL, one per row of ``rows``).

    ``rows`` columns: ``category``, ``class_original``, ``class_edited`` (binary test; null → no
    binary result), and optionally ``eval_text`` + ``threshold`` (adaptive test; null → none).
    Returns ``rows`` with ``p_edited``, ``binary_success``, ``eval_score``, ``threshold_success``.
    Class texts are lower-cased (protocol); the eval text is used as given, like CAKE.
    """
    if len(images) != len(rows):
        raise ValueError(f"{len(images)} images for {len(rows)} rows")
    rows = rows.reset_index(drop=True).copy()
    img = encoder.encode_images(list(images), batch_size=batch_size)  # (n, d)

    def text_feats(texts: pd.Series) -> torch.Tensor:
        uniq = sorted(set(texts))
        feats = encoder.encode_texts(uniq)
        pos = {t: i for i, t in enumerate(uniq)}
        return feats[[pos[t] for t in texts]]

    rows["p_edited"] = pd.Series([None] * len(rows), dtype="Float64")
    rows["binary_success"] = pd.Series([None] * len(rows), dtype="boolean")
    mask = np.array(rows["class_original"].notna() & rows["class_edited"].notna(), dtype=bool)
    if mask.any():
        sub = rows[mask]
        p = binary_probability(img[torch.from_numpy(mask)],
                               text_feats(sub["class_original"].str.lower()),
                               text_feats(sub["class_edited"].str.lower())).numpy()
        rows.loc[mask, "p_edited"] = p
        rows.loc[mask, "binary_success"] = binary_success(p, sub["category"].tolist())

    rows["eval_score"] = pd.Series([None] * len(rows), dtype="Float64")
    rows["threshold_success"] = pd.Series([None] * len(rows), dtype="boolean")
    if "eval_text" in rows:
        mask = np.array(rows["eval_text"].notna(), dtype=bool)
        if mask.any():
            cos = (img[torch.from_numpy(mask)] * text_feats(rows.loc[mask, "eval_text"])).sum(-1)
            rows.loc[mask, "eval_score"] = cos.double().numpy()
        if "threshold" in rows:
            rows = _test_thresholds(rows)
    return rows


def _test_thresholds(rows: pd.DataFrame) -> pd.DataFrame:
    """``threshold_success`` of the rows that have both an ``eval_score`` and a ``threshold``."""
    rows["threshold_success"] = pd.Series([None] * len(rows), dtype="boolean")
    mask = np.array(rows["eval_score"].notna() & rows["threshold"].notna(), dtype=bool)
    if mask.any():
        rows.loc[mask, "threshold_success"] = threshold_success(
            rows.loc[mask, "eval_score"].astype(float).to_numpy(),
            rows.loc[mask, "threshold"].astype(float).to_numpy())
    return rows


def retest_thresholds(rows: pd.DataFrame, eval_prompts: pd.DataFrame,
                      sigma: str = "2sigma") -> pd.DataFrame:
    """Per-image ``rows`` (:data:`PER_IMAGE_SCHEMA`) tested against other thresholds — those of
    ``eval_prompts``, per ``prompt_id`` — without scoring the images again (``eval_score`` depends on
    the image and the eval text only). Every row's prompt must be in ``eval_prompts``."""
    if sigma not in ("mean", *SIGMA_KEYS):
        raise ValueError(f"sigma must be one of mean, {', '.join(SIGMA_KEYS)}; got {sigma!r}")
    th = eval_prompts.set_index("prompt_id")[f"threshold_{sigma}"]
    unknown = sorted(set(rows["prompt_id"]) - set(th.index))
    if unknown:
        raise ValueError(f"{len(unknown)} scored prompts are not in the evaluation prompts, "
                         f"e.g. {unknown[:3]}")
    rows = rows.reset_index(drop=True).copy()
    rows["threshold"] = rows["prompt_id"].map(th).astype("Float64")
    return _test_thresholds(rows)


def join_images(eval_prompts: pd.DataFrame, index: pd.DataFrame, method: str,
                prompt_column: str = "prompt", sigma: str = "2sigma") -> pd.DataFrame:
    """One row per (evaluation prompt, seed): ``eval_prompts`` joined with an image index
    (:data:`t2iedit.generate.INDEX_SCHEMA`) on the prompt that generated the image.

    ``prompt_column``: which text was fed to the model (``prompt``; ``oracle_prompt`` for the oracle
    baseline, falling back to ``prompt`` where it is null). ``sigma``: CAKE threshold column used
    (``threshold_<sigma>``). Every prompt must have an image for every seed of the index.
    """
    if sigma not in ("mean", *SIGMA_KEYS):
        raise ValueError(f"sigma must be one of mean, {', '.join(SIGMA_KEYS)}; got {sigma!r}")
    ep = eval_prompts.copy()
    ep["generated_prompt"] = ep[prompt_column].fillna(ep["prompt"])
    ep["threshold"] = ep[f"threshold_{sigma}"].astype("Float64")
    idx = index[["prompt", "seed", "path"]].rename(columns={"prompt": "generated_prompt"})
    seeds = sorted(int(s) for s in idx["seed"].unique())
    merged = ep.merge(idx, on="generated_prompt", how="left")
    counts = merged.groupby("prompt_id")["path"].count()
    short = counts[counts < len(seeds)]
    if seeds == [] or len(short):
        raise ValueError(f"{len(short) if seeds else len(ep)} evaluation prompts lack images for "
                         f"some of the seeds {seeds} (method {method!r}), e.g. "
                         f"{short.index.tolist()[:3]}")
    merged["seed"] = merged["seed"].astype("int64")
    merged["method"] = method
    return merged.reset_index(drop=True)


def per_image_table(rows: pd.DataFrame) -> pa.Table:
    """Per-image results in :data:`PER_IMAGE_SCHEMA` (extra columns dropped)."""
    df = rows[PER_IMAGE_SCHEMA.names].copy()
    for c in ("p_edited", "eval_score", "threshold"):
        df[c] = df[c].astype("float64")
    for c in ("binary_success", "threshold_success"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return pa.Table.from_pandas(df, schema=PER_IMAGE_SCHEMA, preserve_index=False)


def evaluate_images(encoder, eval_prompts: pd.DataFrame, index: pd.DataFrame,
                    image_root: str | os.PathLike, method: str, prompt_column: str = "prompt",
                    sigma: str = "2sigma", batch_size: int = 32) -> pd.DataFrame:
    """Per-image results of one method: join prompts and images (:func:`join_images`), load the
    images and run both tests (:func:`score_images`), chunk by chunk to bound memory."""
    from t2iedit.generate import load_image

    rows = join_images(eval_prompts, index, method, prompt_column, sigma)
    parts = []
    for i in range(0, len(rows), batch_size):
        chunk = rows.iloc[i:i + batch_size]
        images = [load_image(image_root, p) for p in chunk["path"]]
        parts.append(score_images(encoder, chunk, images, batch_size=batch_size))
    return pd.concat(parts, ignore_index=True)
