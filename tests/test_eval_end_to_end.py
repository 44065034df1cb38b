"""A full evaluation of a few TIMED prompts on the tiny preset: tiny SD pipeline + tiny CLIP,
through generation, both image tests, thresholds recomputed from the oracle, summaries, the Markdown
table, metrics.json, pictures and the text-space metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from t2iedit import metrics as M
from t2iedit import plots
from t2iedit.clip_eval import ClipEncoder, build_tiny_clip
from t2iedit.edit_data.benchmarks import load_timed
from t2iedit.generate import SamplingConfig, generate_images, load_image, model_hash, write_index
from t2iedit.storage import read_json, read_parquet, write_json, write_parquet

RAW = Path(__file__).parents[1] / "data" / "raw"
CFG = SamplingConfig(num_inference_steps=4, height=32, width=32)
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def prompts():
    ep = load_timed(RAW).eval_prompts.to_pandas()
    ep = ep[ep["edit_id"] == "timed-test-001"]
    ep = ep[ep["prompt_id"].str.endswith(("/0", "/1")) & ~ep["prompt_id"].str.contains("generality/1")]
    return ep.reset_index(drop=True)  # efficacy, generality 0, specificity 0 and 1 of 'A bear'


def test_full_tiny_evaluation(tiny_pipe, tiny_dir, prompts, tmp_path):
    assert len(prompts) == 4
    enc = ClipEncoder.from_pretrained(build_tiny_clip(tmp_path / "clip"))
    mh = model_hash(str(tiny_dir))
    root = tmp_path / "images"
    tables = {}
    for method, col in (("unedited", "prompt"), ("oracle", "oracle_prompt")):
        texts = prompts[col].fillna(prompts["prompt"])
        tables[method] = generate_images(tiny_pipe, [(t, s) for t in texts for s in SEEDS], root, mh,
                                         CFG, batch_size=16, progress=False)
    index = read_parquet(write_index(tmp_path / "index.parquet", list(tables.values()))).to_pandas()

    results, per_image = {}, []
    for method, col in (("unedited", "prompt"), ("oracle", "oracle_prompt")):
        rows = M.evaluate_images(enc, prompts, index, root, method, prompt_column=col, batch_size=5)
        assert len(rows) == len(prompts) * len(SEEDS)
        p = rows["p_edited"].astype(float).to_numpy()
        assert ((p >= 0) & (p <= 1)).all()
        want = np.where(rows["category"] == "specificity", p < 0.5, p > 0.5)
        assert (rows["binary_success"].astype(bool).to_numpy() == want).all()
        assert np.allclose(rows["threshold"].astype(float), rows["threshold_2sigma"])
        assert (rows["threshold_success"].astype(bool).to_numpy()
                == (rows["eval_score"].astype(float) >= rows["threshold"].astype(float)).to_numpy()).all()
        per_image.append(rows)
        results[method] = {t: M.summarize(rows, f"{t}_success") for t in M.TESTS}

    table = M.per_image_table(pd.concat(per_image, ignore_index=True))
    path = write_parquet(tmp_path / "per_image.parquet", table, M.PER_IMAGE_SCHEMA)
    assert read_parquet(path, M.PER_IMAGE_SCHEMA).num_rows == 2 * len(prompts) * len(SEEDS)

    s = results["unedited"]["binary"]
    assert set(s["categories"]) == {"efficacy", "generality", "specificity"}
    assert s["categories"]["efficacy"]["n_images"] == len(SEEDS)
    write_json(tmp_path / "metrics.json", results)
    assert read_json(tmp_path / "metrics.json")["oracle"]["threshold"]["seeds"] == list(SEEDS)
    md = M.markdown_table({m: r["binary"] for m, r in results.items()}, title="TIMED (tiny)")
    assert "| unedited |" in md and "| oracle |" in md and "Score" in md

    # thresholds recomputed for this model from its oracle images: mean - 2 sd over the seeds
    oracle = per_image[1]
    th = M.thresholds_from_reference(oracle)
    one = oracle[oracle["prompt_id"] == th.loc[0, "prompt_id"]]["eval_score"].astype(float)
    assert th.loc[0, "threshold_2sigma"] == pytest.approx(one.mean() - 2 * one.std(ddof=1))
    again = M.evaluate_images(enc, M.with_thresholds(prompts, th), index, root, "oracle",
                              prompt_column="oracle_prompt")
    # with its own thresholds, an image scoring at least its prompt's mean always passes
    above = again["eval_score"].astype(float) >= again["prompt_id"].map(th.set_index("prompt_id")["threshold_mean"])
    assert again.loc[above, "threshold_success"].astype(bool).all()
    # re-testing the already-scored rows against the new thresholds equals scoring the images again
    for sigma in ("2sigma", "mean"):
        again = M.evaluate_images(enc, M.with_thresholds(prompts, th), index, root, "oracle",
                                  prompt_column="oracle_prompt", sigma=sigma)
        retested = M.retest_thresholds(oracle, M.with_thresholds(prompts, th), sigma)
        assert retested["threshold"].astype(float).tolist() == pytest.approx(
            again["threshold"].astype(float).tolist())
        assert retested["threshold_success"].tolist() == again["threshold_success"].tolist()
    # two seeds per prompt: against its own mean, exactly the better-scoring image passes
    assert (retested.groupby("prompt_id")["threshold_success"].sum() == 1).all()
    with pytest.raises(ValueError, match="not in the evaluation prompts"):
        M.retest_thresholds(oracle, prompts.iloc[1:], "2sigma")

    # pictures: before/after grid of one edit, category bars
    eff = prompts[prompts["category"] == "efficacy"].iloc[0]
    spec = prompts[prompts["category"] == "specificity"].iloc[0]
    pick = lambda m, r: load_image(root, per_image[m].query("prompt_id == @r.prompt_id and seed == 0")["path"].iloc[0])  # noqa: E731
    grid = plots.edit_grid([(eff["prompt"], pick(0, eff), pick(1, eff)),
                            (spec["prompt"], pick(0, spec), pick(1, spec))], tmp_path / "grid.png")
    data = plots.category_data({m: r["binary"] for m, r in results.items()})
    bars = plots.category_bars(data, tmp_path / "bars.png")
    scaling = plots.metric_vs_edits(
        pd.concat([data.assign(n_edits=n) for n in (1, 10)]), tmp_path / "scaling.png")
    for f in (grid, bars, scaling):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
