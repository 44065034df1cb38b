"""The metrics stage on the tiny preset: scoring fanned out over mapped batches of prompts (each
stamped, merged per method), equal to scoring every image in one pass; the oracle reference re-tested
rather than scored twice; a changed batch size re-chunks and prunes the old batches."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from t2iedit import metrics as M
from t2iedit.clip_eval import ClipEncoder, build_tiny_clip
from t2iedit.edit_data import EVAL_PROMPTS_SCHEMA
from t2iedit.edit_data.benchmarks import load_timed
from t2iedit.storage import read_json, read_parquet, write_parquet
from tasks.model import lock_model

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"
METHODS, SEEDS = ["unedited", "oracle"], [0, 1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(folder: Path, task_batches: int) -> str:
    (folder / "params.yaml").write_text(yaml.safe_dump({
        "generate": {"methods": METHODS, "seeds": SEEDS, "batch_size": 8, "task_batches": 64},
        "metrics": {"thresholds": "recompute", "task_batches": task_batches, "batch_size": 5}}))
    return "params.yaml"


@pytest.fixture()
def generated(prefect_harness, tmp_path, monkeypatch):
    """Three TIMED edits' evaluation prompts (9) and their unedited/oracle images over two seeds."""
    from flows.generate import generate

    monkeypatch.chdir(tmp_path)
    ep = load_timed(RAW).eval_prompts.to_pandas()
    ep = ep[ep["edit_id"].isin(["timed-test-000", "timed-test-001", "timed-test-002"])
            & ep["prompt_id"].str.endswith("/0")].reset_index(drop=True)
    assert len(ep) == 9
    write_parquet(tmp_path / "data/processed/datasets/eval_prompts.parquet", ep, EVAL_PROMPTS_SCHEMA)
    lock_model.fn(tmp_path / "data/models/lock.json", "fp", "tiny", 0)
    generate(params_file=_params(tmp_path, 4))
    return tmp_path, ep


def test_scoring_is_fanned_out_and_equals_one_pass(generated, tmp_path):
    from flows.metrics import BATCHES, METRICS_DIR, TINY_CLIP_SEED, metrics

    root, ep = generated
    out = metrics(params_file=_params(root, 4))  # 2 prompts (4 images) per task: 5 tasks per method
    batches = {d.name: sorted(p.name for p in d.glob("*.parquet")) for d in (root / BATCHES).rglob("*")
               if d.is_dir() and any(d.glob("*.parquet"))}
    assert batches == {"unedited": [f"{i:05d}.parquet" for i in range(5)],
                       "reference": [f"{i:05d}.parquet" for i in range(5)]}  # oracle: re-tested only

    # the merged batches equal scoring every image in one pass with the same classifier
    enc = ClipEncoder.from_pretrained(build_tiny_clip(tmp_path / "clip", seed=TINY_CLIP_SEED))
    index = read_parquet(root / "data/eval/index/unedited.parquet").to_pandas()
    prompts = read_parquet(root / METRICS_DIR / "thresholds/eval_prompts.parquet").to_pandas()
    whole = M.per_image_table(M.evaluate_images(enc, prompts, index, root / "data/eval/images", "unedited",
                                                batch_size=5)).to_pandas()
    merged = read_parquet(root / METRICS_DIR / "unedited/per_image.parquet").to_pandas()
    pd.testing.assert_frame_equal(merged, whole, check_exact=False, rtol=1e-5)
    summary = read_json(root / METRICS_DIR / "unedited/summary.json")
    want = M.summarize(whole, "binary_success")
    assert summary["binary"]["score"]["mean"] == pytest.approx(want["score"]["mean"])
    assert {c: v["mean"] for c, v in summary["binary"]["categories"].items()} == pytest.approx(
        {c: v["mean"] for c, v in want["categories"].items()})

    # the oracle's rows are the reference's, re-tested against the recomputed thresholds
    ref = read_parquet(root / METRICS_DIR / "thresholds/reference/per_image.parquet").to_pandas()
    oracle = read_parquet(root / METRICS_DIR / "oracle/per_image.parquet").to_pandas()
    assert oracle["eval_score"].tolist() == ref["eval_score"].tolist()
    pd.testing.assert_frame_equal(oracle, M.per_image_table(M.retest_thresholds(ref, prompts)).to_pandas())
    assert (out / "metrics.json").is_file()

    # a new batch size re-chunks: other batch files, the old ones pruned, the same merged result
    metrics(params_file=_params(root, 6))  # 3 prompts per task: 3 tasks per method
    assert sorted(p.name for p in (root / BATCHES / "unedited").glob("*.parquet")) == [
        f"{i:05d}.parquet" for i in range(3)]
    pd.testing.assert_frame_equal(read_parquet(root / METRICS_DIR / "unedited/per_image.parquet").to_pandas(),
                                  merged)


def test_classifier_is_loaded_once_per_process_and_replaced_by_another(tmp_path):
    from tasks.evaluate import clip_encoder

    a, b = build_tiny_clip(tmp_path / "a", seed=0), build_tiny_clip(tmp_path / "b", seed=1)
    first = clip_encoder(str(a))
    assert clip_encoder(str(a)) is first  # mapped batches share one copy
    other = clip_encoder(str(b))
    assert other is not first and other.name == str(b)
    assert clip_encoder(str(a)) is not first  # one resident at a time: reloaded after b
