"""The comparison flow on the tiny preset: all methods on two TIMED edits through the same generation
and metrics, one table (Markdown + Parquet + plot; the threshold test is the headline, its first row
"Oracle (unedited)" the unedited model on the test prompts); a rerun is served from the stamps; the
main run's source latents and unedited images are reused with identical results."""

from __future__ import annotations

import shutil

from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pytest
import torch
import yaml

from t2iedit.edit_data import EVAL_PROMPTS_SCHEMA, EDITS_SCHEMA
from t2iedit.edit_data.benchmarks import load_timed
from t2iedit.storage import read_parquet, write_parquet
from t2iedit.methods import METHODS
from t2iedit.methods.compare import COMPARISON_SCHEMA, comparison_table, requests_from_edits
from tasks.model import lock_model

ROOT = Path(__file__).parents[1]
FAST = {"values": {"steps": 2, "log_every": 0}}


def _tiny_dataset(folder: Path) -> None:
    es = load_timed(ROOT / "data" / "raw")
    ids = ["timed-test-000", "timed-test-001"]
    edits = es.edits.filter(pc.is_in(es.edits["edit_id"], pa_array(ids)))
    ep = es.eval_prompts.to_pandas()
    ep = ep[ep["edit_id"].isin(ids) & ep["prompt_id"].str.endswith("/0")]  # 3 prompts per edit
    write_parquet(folder / "data/processed/datasets/edits.parquet", edits, EDITS_SCHEMA)
    write_parquet(folder / "data/processed/datasets/eval_prompts.parquet", ep, EVAL_PROMPTS_SCHEMA)
    # what the metrics stage leaves with metrics.thresholds: shipped (CAKE's TIMED thresholds)
    write_parquet(folder / "data/eval/metrics/thresholds/eval_prompts.parquet", ep, EVAL_PROMPTS_SCHEMA)
    caps = pd.read_csv(ROOT / "data/raw/coco/coco_30k.csv", usecols=["prompt"], nrows=300)
    # compare's text-space part reads held-out captions from the raw COCO file, as in the repo
    (folder / "data/raw/coco").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "data/raw/coco/coco_30k.csv", folder / "data/raw/coco/coco_30k.csv")
    from t2iedit.edit_data import CORPUS_SCHEMA

    write_parquet(folder / "data/processed/corpus/corpus.parquet",
                  pd.DataFrame({"text": caps["prompt"], "source": "coco-30k",
                                "source_id": caps.index.astype(str)}), CORPUS_SCHEMA)


def _main_run_outputs(folder: Path) -> None:
    """What the main pipeline's statistics, projector and ner stages leave for compare (their tasks)."""
    from t2iedit.models import get_preset
    from tasks.ner import extract_entities
    from tasks.projector import build_projector, projector_file
    from tasks.key_statistics import merge_moments, moment_file, moment_shard

    layers = list(get_preset("tiny").edit_layers)
    texts = read_parquet(folder / "data/processed/corpus/corpus.parquet").column("text").to_pylist()
    shard = moment_shard.fn(folder / "data/statistics/shards/shard_00000.safetensors", "fp",
                            folder / "data/models", texts, layers, 64)
    moments = merge_moments.fn(folder / "data/statistics/moments", "fp", [shard], layers)
    for layer in layers:
        build_projector.fn(projector_file(folder / "data/projector/layers", layer), "fp",
                           moment_file(moments, layer), "relative", 1.0e-2)
    extract_entities.fn(folder / "data/ner/entities.parquet", "fp",
                        folder / "data/processed/datasets/edits.parquet", "heuristic", "", None, "simple", 0.0)


def pa_array(values):
    import pyarrow as pa

    return pa.array(values)


def test_requests_from_edits_and_table_layout():
    es = load_timed(ROOT / "data" / "raw")
    reqs = requests_from_edits(es.edits.to_pandas())
    assert len(reqs) == 104 and reqs[0].source == "A banana" and reqs[0].entities == ()
    summary = {"categories": {"efficacy": {"mean": 80.0, "std": 1.0},
                              "specificity": {"mean": 20.0, "std": 0.0}},
               "score": {"mean": 40.0, "std": 2.0}, "seeds": [0, 1]}
    t = comparison_table({"ours": {"binary": summary}}).to_pandas()
    assert t["category"].tolist() == ["Efficacy", "Specificity", "Score"]
    assert t["n_seeds"].tolist() == [2, 2, 2]


def _run_compare(tmp_path, monkeypatch, methods):
    from flows.compare import compare

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: OpenMP hand-offs dominate on a shared CPU
    monkeypatch.chdir(tmp_path)
    _tiny_dataset(tmp_path)
    lock_model.fn(tmp_path / "data/models/lock.json", "fp", "tiny", 0)  # what prepare_model writes
    _main_run_outputs(tmp_path)
    params = {
        "metrics": {"clip": "tiny"},
        "compare": {"methods": methods, "seeds": [0, 1], "batch_size": 6,
                    "method_params": {"ours": FAST, "ours-no-projector": FAST, "ours-no-eata": FAST,
                                      "ours-no-visual": FAST, "emcid": FAST,
                                      "refact": {"layer": 3, "max_steps": 3}}},
    }
    params["compare"]["method_params"] = {k: v for k, v in params["compare"]["method_params"].items()
                                          if k in methods}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        table = compare(params_file="params.yaml")
        t = read_parquet(table / "table.parquet", COMPARISON_SCHEMA).to_pandas()
        before = {p: p.stat().st_mtime_ns for p in (tmp_path / "data/compare").rglob("*") if p.is_file()}
        compare(params_file="params.yaml")  # a rerun recomputes nothing (every output is stamped)
        assert before == {p: p.stat().st_mtime_ns for p in before}
    finally:
        torch.set_num_threads(threads)
    return table, t


def test_compare_flow_on_tiny_preset(prefect_harness, tmp_path, monkeypatch):
    """One method of each kind (no edit, UNet edit, text-encoder edit): the default-suite check. The
    Oracle row is the unedited model on the *test* prompts: its per-image results equal scoring
    images generated here, independently, from the test prompts with the unedited pipeline."""
    from t2iedit import metrics as M
    from t2iedit.clip_eval import ClipEncoder, build_tiny_clip
    from t2iedit.generate import SamplingConfig, generate_images, model_hash
    from t2iedit.models import get_preset, load_pipeline
    from tasks.model import locked_model

    methods = ["unedited", "oracle", "time", "ours-no-visual"]
    table, t = _run_compare(tmp_path, monkeypatch, methods)
    headline = t[t["test"] == "threshold"]
    assert t["test"].iloc[0] == "threshold" and set(headline["method"]) == set(methods)
    assert headline["method"].iloc[0] == "unedited" and headline["label"].iloc[0] == "Oracle (unedited)"
    binary = t[t["test"] == "binary"]
    assert set(binary["category"]) == {"Efficacy", "Generality", "Specificity", "Score"}
    assert ((binary["mean"] >= 0) & (binary["mean"] <= 100)).all()
    md = (table / "table.md").read_text()
    assert md.index("Headline: CAKE adaptive-threshold test") < md.index("Second table: two-class CLIP test")
    rows = [line for line in md.splitlines() if line.startswith("| ") and "Method" not in line]
    assert rows[0].startswith("| Oracle (unedited) |") and rows[1].startswith("| Oracle prompts")
    assert all(any(r.startswith(f"| {name} |") for r in rows) for name in methods[2:])
    assert (table / "table.png").read_bytes()[:4] == b"\x89PNG"

    # the Oracle row = the unedited model on the test prompts, generated and scored here directly
    model = locked_model(tmp_path / "data/models")
    pre = get_preset("tiny")
    ep = read_parquet(tmp_path / "data/eval/metrics/thresholds/eval_prompts.parquet").to_pandas()
    root = tmp_path / "direct"
    cfg = SamplingConfig(num_inference_steps=pre.num_inference_steps, guidance_scale=pre.guidance_scale,
                         height=pre.resolution, width=pre.resolution)
    index = generate_images(load_pipeline(model.source), [(p, s) for p in ep["prompt"] for s in (0, 1)], root,
                            model_hash("direct"), cfg, batch_size=6, progress=False).to_pandas()
    enc = ClipEncoder.from_pretrained(build_tiny_clip(tmp_path / "clip", seed=0))
    want = M.per_image_table(M.evaluate_images(enc, ep, index, root, "unedited")).to_pandas()
    got = read_parquet(tmp_path / "data/compare/eval/unedited/per_image.parquet").to_pandas()
    cols = ["prompt_id", "seed", "p_edited", "binary_success", "eval_score", "threshold_success"]
    # (thread counts differ between the flow and here: float noise of ~1e-5, amplified by the 100·cos softmax)
    pd.testing.assert_frame_equal(got[cols], want[cols], check_exact=False, rtol=1e-3, atol=1e-6)
    eff = lambda df: df[df["category"] == "efficacy"]["threshold_success"].astype(float).mean()  # noqa: E731
    got_eff = headline[(headline["method"] == "unedited") & (headline["category"] == "Efficacy")]["mean"].item()
    assert got_eff == pytest.approx(100 * eff(want))


def test_compare_reuses_the_main_runs_latents_and_unedited_images(tmp_path, monkeypatch, one_thread):
    """With the main run's source latents and unedited images the results are identical to generating
    them again, and nothing is generated (the generators are made to fail)."""
    import tasks.compare as TC
    from flows.compare import sampling_config, CompareParams
    from t2iedit.clip_eval import build_tiny_clip
    from t2iedit.edit import EditArtifact
    from t2iedit.generate import SamplingConfig, generate_images
    from t2iedit.models import load_pipeline
    from tasks.evaluate import images_key
    from tasks.model import locked_model
    from tasks.values import edit_requests, source_latents

    monkeypatch.chdir(tmp_path)
    _tiny_dataset(tmp_path)
    lock_model.fn(tmp_path / "data/models/lock.json", "fp", "tiny", 0)
    _main_run_outputs(tmp_path)
    model = locked_model(tmp_path / "data/models")
    edits, ent = tmp_path / "data/processed/datasets/edits.parquet", tmp_path / "data/ner/entities.parquet"
    moments, layers = tmp_path / "data/statistics/moments", tmp_path / "data/projector/layers"
    prompts = tmp_path / "data/eval/metrics/thresholds/eval_prompts.parquet"
    sampling = sampling_config(CompareParams(), "tiny")
    ep = read_parquet(prompts).to_pandas()

    # what the main run left: the values stage's source latents, the generate stage's unedited images
    reqs = edit_requests(edits, ent)
    latents_dir = tmp_path / "data/values/latents"
    source_latents.fn(latents_dir / "batch_00000.safetensors", "fp", tmp_path / "data/models",
                      [r.edit_id for r in reqs], [r.source for r in reqs], 0, 1, None)
    main_images = tmp_path / "data/eval/images"
    generate_images(load_pipeline(model.source), [(p, s) for p in ep["prompt"] for s in (0, 1)], main_images,
                    images_key(model, None), SamplingConfig(**sampling), batch_size=6, progress=False)

    clip = str(build_tiny_clip(tmp_path / "clip", seed=0))
    none = TC.edit_method.fn(tmp_path / "none", "fp", "unedited", {}, model, edits, ent, moments, layers)

    def run(folder: str, share: bool):
        art = TC.edit_method.fn(tmp_path / folder / "edits", "fp", "ours", FAST, model, edits, ent, moments,
                                layers, latents_dir if share else None)
        ev = TC.evaluate_method.fn(tmp_path / folder / "eval", "fp", "unedited", model, none, prompts,
                                   tmp_path / folder / "images", [0, 1], sampling, clip, None, 6, "2sigma",
                                   main_images if share else None)
        return EditArtifact.load(art), read_parquet(ev / "per_image.parquet").to_pandas()

    fresh_art, fresh_rows = run("fresh", share=False)
    fail = lambda *a, **k: (_ for _ in ()).throw(AssertionError("generated although shared"))  # noqa: E731
    monkeypatch.setattr(TC, "generate_source_latents", fail)  # the latents must come from the main run
    shared_art, shared_rows = run("shared", share=True)
    assert fresh_art.deltas.keys() == shared_art.deltas.keys() and fresh_art.deltas
    assert all(torch.equal(fresh_art.deltas[k], shared_art.deltas[k]) for k in fresh_art.deltas)
    monkeypatch.setattr(TC, "cached_pipeline", fail)  # every unedited image is the main run's: no model
    ev = TC.evaluate_method.fn(tmp_path / "again/eval", "fp", "unedited", model, none, prompts,
                               tmp_path / "again/images", [0, 1], sampling, clip, None, 6, "2sigma", main_images)
    pd.testing.assert_frame_equal(shared_rows, fresh_rows)
    pd.testing.assert_frame_equal(read_parquet(ev / "per_image.parquet").to_pandas(), fresh_rows)


@pytest.mark.slow
def test_compare_flow_all_methods_on_tiny_preset(prefect_harness, tmp_path, monkeypatch):
    """All eight methods (about 2 minutes on 2 shared CPU cores)."""
    table, t = _run_compare(tmp_path, monkeypatch, list(METHODS))
    binary = t[t["test"] == "binary"]
    assert set(binary["method"]) == set(METHODS)
    assert set(binary["category"]) == {"Efficacy", "Generality", "Specificity", "Score"}
    md = (table / "table.md").read_text()
    assert all(f"| {name} |" in md for name in METHODS)
    assert (tmp_path / "data/compare/edits/oracle/manifest.json").exists()
    assert (tmp_path / "data/compare/edits/unedited/manifest.json").exists()


def test_stats_are_the_main_runs_and_missing_ones_name_the_stage(tmp_path):
    from t2iedit.keys import SecondMoment
    from t2iedit.projector import NullSpaceProjector
    from tasks.compare import load_stats

    with pytest.raises(FileNotFoundError, match="run the statistics stage first"):
        load_stats(tmp_path / "moments", tmp_path / "layers")
    _tiny_dataset(tmp_path)
    lock_model.fn(tmp_path / "data/models/lock.json", "fp", "tiny", 0)
    _main_run_outputs(tmp_path)
    moments, layers = tmp_path / "data/statistics/moments", tmp_path / "data/projector/layers"
    stats = load_stats(moments, layers)
    assert sorted(stats.moments) == sorted(stats.projectors) == [0, 1, 2, 3, 4]
    m = SecondMoment.load(moments / "layer_03.safetensors")
    assert torch.equal(stats.moment(3), m.sum / m.count)
    assert torch.equal(stats.projectors[3], NullSpaceProjector.load(layers / "layer_03.safetensors").P)
    (layers / "layer_02.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="layer_02.safetensors: no projector for layer 2"):
        load_stats(moments, layers)


def test_dvc_stage_reads_the_main_runs_outputs_and_declares_its_code():
    from test_pipeline_dvc import side_pipeline_stage

    _, deps, made = side_pipeline_stage("compare")
    for d in ("data/statistics/moments", "data/projector/layers", "data/ner/entities.parquet", "data/models"):
        assert d in deps and d in made, d
