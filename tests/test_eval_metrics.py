"""Metric arithmetic on hand-made probabilities, features and scores (no models)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from t2iedit import metrics as M


def _unit(v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm(dim=-1, keepdim=True)


def test_binary_probability_is_softmax_of_100_cos():
    img = _unit([[1.0, 0.0], [0.0, 1.0]])
    orig = _unit([[1.0, 0.0], [1.0, 0.0]])
    edit = _unit([[0.6, 0.8], [0.6, 0.8]])
    p = M.binary_probability(img, orig, edit)
    # row 0: cos 1.0 vs 0.6 -> p = 1 / (1 + e^{40}); row 1: cos 0 vs 0.8 -> p = 1 / (1 + e^{-80})
    assert p[0].item() == pytest.approx(1 / (1 + math.exp(40.0)), rel=1e-6)
    assert p[1].item() == pytest.approx(1 / (1 + math.exp(-80.0)), rel=1e-9)
    assert M.binary_probability(img, orig, edit, scale=1.0)[1].item() == pytest.approx(
        math.exp(0.8) / (1 + math.exp(0.8)), rel=1e-6)


def test_binary_success_direction_per_category():
    p = [0.9, 0.9, 0.1, 0.1, 0.5, 0.5]
    cats = ["efficacy", "specificity", "generality", "specificity", "efficacy", "specificity"]
    assert M.binary_success(p, cats).tolist() == [True, False, False, True, False, False]
    with pytest.raises(ValueError, match="unknown categories"):
        M.binary_success([0.9], ["locality"])


def test_threshold_stats_match_ddof1_and_shipped_layout():
    s = [0.40, 0.42, 0.38, 0.44, 0.36]
    st = M.threshold_stats(s)  # CAKE's wrap_stats: np.std(ddof=1)
    mean, std = np.mean(s), np.std(s, ddof=1)
    assert st["mean"] == pytest.approx(mean)
    assert st["2sigma"] == pytest.approx(mean - 2 * std)
    assert st["+3sigma"] == pytest.approx(mean + 3 * std)
    assert set(st) == {"mean", "1sigma", "2sigma", "3sigma", "+1sigma", "+2sigma", "+3sigma"}
    pop = M.threshold_stats(s, ddof=0)  # the population-std reading
    assert pop["2sigma"] == pytest.approx(mean - 2 * np.std(s)) and pop["2sigma"] > st["2sigma"]
    with pytest.raises(ValueError):
        M.threshold_stats([0.4])
    with pytest.raises(ValueError, match="ddof"):
        M.threshold_stats(s, ddof=2)


def test_thresholds_from_reference_images_of_the_eval_text():
    """One threshold per prompt from the scores of its eval text's reference images, over however many
    reference images there are (not the evaluation seeds), std with the given ddof."""
    rng = np.random.default_rng(0)
    n = 7  # reference images per eval text; the evaluation might use 2 or 5 seeds
    rows = pd.DataFrame({"prompt_id": np.repeat(["e/efficacy/0", "e/specificity/0"], n),
                         "seed": np.tile(np.arange(n), 2), "eval_score": rng.uniform(0.1, 0.4, 2 * n)})
    rows.loc[0, "eval_score"] = None  # an unscored row is left out
    for ddof in (0, 1):
        th = M.thresholds_from_reference(rows, ddof=ddof).set_index("prompt_id")
        for pid, group in rows.dropna().groupby("prompt_id"):
            v = group["eval_score"].to_numpy(float)
            assert th.loc[pid, "n_images"] == len(v)
            assert th.loc[pid, "threshold_2sigma"] == pytest.approx(v.mean() - 2 * v.std(ddof=ddof))
            assert th.loc[pid, "threshold_mean"] == pytest.approx(v.mean())
    assert th["n_images"].tolist() == [n - 1, n]


def test_compute_thresholds_groups_by_tag_and_prompt():
    df = pd.DataFrame({"tag": ["a"] * 4 + ["b"] * 2, "prompt": ["x", "x", "y", "y", "x", "x"],
                       "score": [0.1, 0.3, 0.5, 0.5, 0.2, 0.4]})
    th = M.compute_thresholds(df)
    assert set(th) == {"a", "b"} and set(th["a"]) == {"x", "y"}
    assert th["a"]["y"]["2sigma"] == pytest.approx(0.5)  # zero spread
    assert th["a"]["x"]["1sigma"] == pytest.approx(0.2 - np.std([0.1, 0.3], ddof=1))
    assert M.lookup_threshold(th, "A", "X", "1sigma") == th["a"]["x"]["1sigma"]
    with pytest.raises(KeyError, match="tag 'c'"):
        M.lookup_threshold(th, "c", "x")


def test_lookup_threshold_in_shipped_file():
    import json
    from pathlib import Path

    path = Path(__file__).parents[2] / "shared/data/CAKE/eva_clip_thresholds/stable-diffusion-v1-4/TIMED/seed-50.json"
    if not path.exists():
        pytest.skip("shared/ data not present")
    th = json.loads(path.read_text())
    assert M.lookup_threshold(th, "A banana", "A bowl of bananas") == pytest.approx(0.4023759969550915)


def test_threshold_success_is_inclusive_and_rejects_missing():
    assert M.threshold_success([0.3, 0.2999, 0.5], [0.3, 0.3, 0.6]).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="no threshold"):
        M.threshold_success([0.3], [float("nan")])


def test_geometric_mean_with_zeros_and_paper_score():
    assert M.geometric_mean([73.85, 69.15, 71.88]) == pytest.approx(71.60, abs=0.01)
    assert M.geometric_mean([63.40, 43.12, 34.67, 28.60, 38.07]) == pytest.approx(40.06, abs=0.01)
    assert M.geometric_mean([50.0, 0.0, 80.0]) == 0.0
    assert M.geometric_mean([4.0, 1.0]) == pytest.approx(2.0)
    for bad in ([], [1.0, -1.0], [float("nan")]):
        with pytest.raises(ValueError):
            M.geometric_mean(bad)


def _rows():
    # 2 seeds; efficacy: seed 0 -> 2/2, seed 1 -> 1/2; specificity: seed 0 -> 1/2, seed 1 -> 0/2
    return pd.DataFrame({
        "category": ["efficacy"] * 4 + ["specificity"] * 4,
        "seed": [0, 0, 1, 1] * 2,
        "binary_success": [True, True, True, False, True, False, False, False],
    })


def test_summarize_mean_std_over_seeds_and_score():
    out = M.summarize(_rows(), "binary_success")
    eff, spe = out["categories"]["efficacy"], out["categories"]["specificity"]
    assert eff["per_seed"] == {"0": 100.0, "1": 50.0}
    assert eff["mean"] == pytest.approx(75.0) and eff["std"] == pytest.approx(np.std([100, 50], ddof=1))
    assert spe["mean"] == pytest.approx(25.0)
    assert out["score"]["mean"] == pytest.approx(math.sqrt(75.0 * 25.0))
    # seed 1 has a zero category -> its geometric mean is 0
    assert out["score"]["per_seed"] == {"0": pytest.approx(math.sqrt(100 * 50)), "1": 0.0}


def test_summarize_skips_null_and_rejects_empty_cells():
    rows = _rows().astype({"binary_success": "boolean"})
    rows.loc[0, "binary_success"] = pd.NA
    assert M.summarize(rows, "binary_success")["categories"]["efficacy"]["per_seed"]["0"] == 100.0
    rows.loc[1, "binary_success"] = pd.NA
    with pytest.raises(ValueError, match="no images"):
        M.summarize(rows, "binary_success")


def test_markdown_table_layout():
    a = M.summarize(_rows(), "binary_success")
    b = M.summarize(_rows().assign(binary_success=True), "binary_success")
    md = M.markdown_table({"ours": b, "emcid": a}, title="TIMED")
    lines = md.strip().splitlines()
    assert lines[0] == "### TIMED"
    assert lines[2] == "| Method | Efficacy | Specificity | Score |"
    assert lines[4].startswith("| ours | **100.00 ± 0.00** |")
    assert "| emcid | 75.00 ± 35.36 | 25.00 ± 35.36 | 43.30 ± " in lines[5]


def test_paper_layout_oracle_row_first_and_threshold_test_headline():
    a = M.summarize(_rows(), "binary_success")
    results = {"ours": a, "oracle": a, "unedited": a}
    rows = M.paper_rows(results)
    assert rows == ["unedited", "ours", "oracle"]
    md = M.markdown_table({m: results[m] for m in rows}, labels=M.ROW_LABELS).strip().splitlines()
    assert md[2].startswith("| Oracle (unedited) |")  # the paper's first row: unedited, test prompts
    assert md[4].startswith("| Oracle prompts (unedited model) |")
    assert M.TESTS[0] == M.HEADLINE_TEST == "threshold" and "Headline" in M.TEST_TITLES["threshold"]
