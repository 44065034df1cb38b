"""The metrics stage on the tiny preset: scoring fanned out over mapped batches of prompts (each
stamped, merged per method), equal to scoring every image in one pass; recomputed thresholds by CAKE's
recipe (the unedited model's images of each eval text, their own number of seeds, std ddof); the
threshold test is the headline table and "Oracle (unedited)" its first row; a changed batch size
re-chunks and prunes the old batches."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from t2iedit import metrics as M
from t2iedit.clip_eval import ClipEncoder, build_tiny_clip
from t2iedit.edit_data import EVAL_PROMPTS_SCHEMA
from t2iedit.edit_data.benchmarks import load_timed
from t2iedit.generate import load_image
from t2iedit.storage import read_json, read_parquet, write_parquet
from tasks.model import lock_model

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"
METHODS, SEEDS, N_REF = ["unedited", "oracle", "reference"], [0, 1], 3

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(folder: Path, task_batches: int) -> str:
    (folder / "params.yaml").write_text(yaml.safe_dump({
        "generate": {"methods": METHODS, "seeds": SEEDS, "batch_size": 8, "task_batches": 64,
                     "reference_images": N_REF},
        "metrics": {"thresholds": "recompute", "task_batches": task_batches, "batch_size": 5}}))
    return "params.yaml"


@pytest.fixture()
def generated(prefect_harness, tmp_path, monkeypatch):
    """Three TIMED edits' evaluation prompts (9), their unedited/oracle images over two seeds and the
    reference images of their eval texts over three."""
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
                       "oracle": [f"{i:05d}.parquet" for i in range(5)],
                       "reference": [f"{i:05d}.parquet" for i in range(9)]}  # 1 prompt × 3 images per task

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

    # CAKE's thresholds: from the unedited model's images of each prompt's eval text, at seeds 0..N_REF-1
    # (not generate.seeds), scored against that text; mean - 2 std with ddof=1 (CAKE's code)
    ref_index = read_parquet(root / "data/eval/index/reference.parquet").to_pandas()
    assert set(ref_index["prompt"]) == set(ep["eval_text"]) and sorted(ref_index["seed"].unique()) == [0, 1, 2]
    cos = {}
    for text, group in ref_index.groupby("prompt"):
        ims = [load_image(root / "data/eval/images", p) for p in group["path"]]
        cos[text] = (enc.encode_images(ims) * enc.encode_texts([text])).sum(-1).double().numpy()
    th = prompts.set_index("prompt_id")
    for row in ep.itertuples():
        v = cos[row.eval_text]
        assert th.loc[row.prompt_id, "threshold_2sigma"] == pytest.approx(v.mean() - 2 * v.std(ddof=1), abs=1e-5)
    assert read_json(root / METRICS_DIR / "thresholds/thresholds.json")["n_images"] == [N_REF]

    # the headline table is the threshold test, its first row the paper's Oracle (unedited, test prompts)
    md = (out / "table.md").read_text()
    assert md.index("Headline: CAKE adaptive-threshold test") < md.index("Second table: two-class CLIP test")
    first_row = [line for line in md.splitlines() if line.startswith("| ") and "Method" not in line][0]
    assert first_row.startswith("| Oracle (unedited) |")
    assert "reference" not in read_json(out / "metrics.json")  # the reference is not a row

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


def test_recompute_needs_the_reference_images(tmp_path, monkeypatch):
    from flows.metrics import metrics

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "generate": {"methods": ["edited", "unedited", "oracle"], "seeds": [0, 1, 2]},
        "metrics": {"thresholds": "recompute"}}))
    with pytest.raises(ValueError, match="recompute needs 'reference' in generate.methods"):
        metrics.fn(params_file="params.yaml")
