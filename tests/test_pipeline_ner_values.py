"""Tasks of the ner and values stages through ``.fn`` on the tiny model: outputs, stamps (resume),
and the contract with the edit stage (``tasks.edit.aligned_targets`` reads our values file); the values
flow's latents folder (a DVC output) after a history of runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from t2iedit.edit_data import load_benchmark, subset
from t2iedit.storage import load_meta, load_tensors, read_parquet, write_json, write_parquet
from t2iedit.models import get_preset
from t2iedit.ner import ENTITY_SCHEMA
from t2iedit.values import LOSS_SCHEMA, ValueConfig

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory, tiny_dir):
    if not (RAW / "CAKE" / "CAKE.json").exists():
        pytest.skip("vendored CAKE data not present")
    root = tmp_path_factory.mktemp("stages")
    edits = write_parquet(root / "edits.parquet", subset(load_benchmark("cake", RAW), 4).edits)
    pre = get_preset("tiny")  # the fields tasks.model.lock_model records for the tiny preset
    models = root / "models"
    write_json(models / "lock.json", {
        "preset": "tiny", "seed": 0, "source": str(tiny_dir), "revision": None, "base_model_id": "tiny",
        "base_revision": None, "text_layer_template": pre.text_layer_template,
        "text_block_template": pre.text_block_template, "edit_layers": list(pre.edit_layers),
        "value_layer": pre.value_layer, "files": {}})
    return root, edits, models


def test_ner_task_writes_spans_and_recall(stage_inputs):
    from tasks.ner import extract_entities, ner_metrics

    root, edits, _ = stage_inputs
    out = extract_entities.fn(root / "ner" / "entities.parquet", "fp-ner", edits, "heuristic",
                              "unused", None, "simple", 0.0)
    table = read_parquet(out, ENTITY_SCHEMA)
    assert set(table.column("backend").to_pylist()) == {"heuristic"}
    for row in table.to_pylist():
        assert row["source"][row["start"]:row["end"]] == row["text"]
    m = ner_metrics(out, edits, "heuristic")
    assert m["recall"]["n"] == m["n_edits"] and m["recall"]["exact"] == 1.0
    mtime = out.stat().st_mtime_ns  # a second call with the same fingerprint reuses the output
    extract_entities.fn(out, "fp-ner", edits, "heuristic", "unused", None, "simple", 0.0)
    assert out.stat().st_mtime_ns == mtime
    dataset = extract_entities.fn(root / "ner" / "ds.parquet", "fp-ds", edits, "dataset", "x", None, "simple", 0.0)
    assert read_parquet(dataset).num_rows == read_parquet(edits).num_rows  # one entity per CAKE row


def test_values_tasks_batches_merge_and_edit_contract(stage_inputs):
    from dataclasses import asdict

    from tasks.edit import aligned_targets, edit_requests as edit_stage_requests
    from tasks.ner import extract_entities
    from tasks.values import (as_dicts, edit_requests, losses_file, merge_values, source_latents,
                              values_batch, values_metrics)

    root, edits, models = stage_inputs
    ents = extract_entities.fn(root / "ner" / "entities.parquet", "fp-ner", edits, "heuristic",
                               "unused", None, "simple", 0.0)
    reqs = edit_requests(edits, ents)
    n = len(reqs)  # 4 facts + their CAKE composite partners
    assert n >= 4 and all(r.entities for r in reqs)
    layer = get_preset("tiny").value_layer
    cfg = ValueConfig(steps=3)
    config = {**asdict(cfg), "templates": list(cfg.templates)}
    batches = [reqs[:3], reqs[3:]]  # two resumable items
    lats = [source_latents.fn(root / "values" / "latents" / f"b{i}.safetensors", f"lat{i}", models,
                              [r.edit_id for r in b], [r.source for r in b], 0, 1, 2)
            for i, b in enumerate(batches)]
    assert load_tensors(lats[0])["latents"].shape[:2] == (3, 1)
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # the progress logger outside a Prefect run (tasks.values.StepProgress)
    log = logging.getLogger("t2iedit.tasks")
    level, log.level = log.level, logging.INFO
    log.addHandler(handler)
    try:
        outs = [values_batch.fn(root / "values" / "batches" / f"b{i}.safetensors", f"v{i}", models, as_dicts(b),
                                config, layer, lat) for i, (b, lat) in enumerate(zip(batches, lats))]
    finally:
        log.removeHandler(handler)
        log.level = level
    # progress (issue 18 item 5): each batch logs its step, the current loss and the rate
    lines = [r.getMessage() for r in records if "step 3/3" in r.getMessage()]
    assert len(lines) == 2 and all("loss" in x and "steps/s" in x for x in lines), lines
    merged = merge_values.fn(root / "values" / "values.safetensors", "v", outs, config)
    meta = load_meta(merged)
    assert meta["edit_ids"] == [r.edit_id for r in reqs] and meta["value_layer"] == layer
    losses = read_parquet(losses_file(merged), LOSS_SCHEMA)
    assert losses.column("steps").to_pylist() == [3] * n
    metrics = values_metrics(merged)
    assert metrics["n_edits"] == n
    # each weighted term's share of the loss at the first and last Adam step, all edits together
    assert set(metrics["share"]) == {"text", "eata", "visual"}
    for when in ("first", "last"):
        want = sum(losses.column(f"{when}_visual").to_pylist()) / sum(losses.column(f"{when}_total").to_pylist())
        assert metrics["share"]["visual"][when] == pytest.approx(want)
        assert 0 < metrics["share"]["visual"][when] < 1
        assert sum(metrics["share"][k][when] for k in ("text", "eata", "visual")) <= 1 + 1e-9
    # the edit stage reads z by edit id, in its own request order
    stage_reqs = edit_stage_requests(edits)
    z = aligned_targets(merged, stage_reqs[::-1], layer)
    full = load_tensors(merged)["z"]
    assert torch.equal(z, full.flip(0))
    # resumability: a stamped batch is not recomputed, a new fingerprint is
    mtime = outs[0].stat().st_mtime_ns
    values_batch.fn(outs[0], "v0", models, as_dicts(batches[0]), config, layer, lats[0])
    assert outs[0].stat().st_mtime_ns == mtime
    text_only = {**config, "lambda_visual": 0.0}
    values_batch.fn(outs[0], "v0-text", models, as_dicts(batches[0]), text_only, layer, None)
    assert outs[0].stat().st_mtime_ns != mtime
    assert load_meta(outs[0])["config"]["lambda_visual"] == 0.0


def test_values_params_refuse_the_emcid_reading_without_lambda(tmp_path):
    """λ = 0 is the text-only mode of the paper reading; under ``emcid`` it would drop the text term."""
    import yaml
    from pydantic import ValidationError

    from flows.stage import load_params
    from flows.values import ValuesParams

    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"values": {"weighting": "emcid", "lambda_visual": 0.0}}))
    with pytest.raises(ValidationError, match="text-only mode"):
        load_params("values", ValuesParams, f)
    f.write_text(yaml.safe_dump({"values": {"weighting": "paper", "lambda_visual": 0.0}}))
    assert load_params("values", ValuesParams, f).lambda_visual == 0.0
    assert ValuesParams().weighting == "emcid"  # the default reading (METHOD.md §5)


def test_step_progress_inside_a_task_run(prefect_harness):
    """Inside a Prefect task run the values progress goes to the run logger and a progress artifact."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client

    from tasks.values import StepProgress

    @task
    def optimise() -> str:
        progress = StepProgress("values test-batch (2 edits)", every_s=0.0)
        for step in range(1, 4):
            progress(step, 3, 1.0 / step)
        return str(progress.progress_id)

    @flow
    def run() -> str:
        return optimise()

    artifact_id = run()
    assert artifact_id != "None"

    async def read():
        async with get_client() as client:
            return await client.read_artifacts()

    import asyncio

    arts = [a for a in asyncio.run(read()) if str(a.id) == artifact_id]
    assert arts and arts[0].type == "progress" and float(arts[0].data) == 100.0


def test_values_flow_latents_folder_is_that_of_a_fresh_run(prefect_harness, tmp_path, monkeypatch):
    """data/values/latents is a ``persist: true`` DVC output: after a text-only run (λ = 0) that
    follows a visual one it holds what a fresh workspace's text-only run leaves (the index, naming no
    latents), not the earlier run's latents — else its hash in dvc.lock depends on the history."""
    from flows.values import LATENTS, LATENT_INDEX, values
    from t2iedit.storage import read_json
    from tasks.model import lock_model
    from tasks.ner import extract_entities
    from test_methods_compare import _tiny_dataset

    visual = {"steps": 1, "batch_size": 1, "latent_steps": 2}
    text_only = {**visual, "weighting": "paper", "lambda_visual": 0.0}

    def workspace(root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(root)
        _tiny_dataset(root)
        lock_model.fn(root / "data/models/lock.json", "fp", "tiny", 0)
        extract_entities.fn(root / "data/ner/entities.parquet", "fp",
                            root / "data/processed/datasets/edits.parquet", "heuristic", "", None, "simple", 0.0)

    def run(section: dict) -> dict[str, bytes]:
        Path("params.yaml").write_text(yaml.safe_dump({"values": section}))
        values(params_file="params.yaml")
        return {str(p.relative_to(LATENTS)): p.read_bytes() for p in sorted(LATENTS.rglob("*")) if p.is_file()}

    workspace(tmp_path / "history")
    first = run(visual)
    assert sorted(n for n in first if n.endswith(".safetensors")) == ["batch_00000.safetensors",
                                                                      "batch_00001.safetensors"]
    after = run(text_only)
    assert read_json(LATENT_INDEX) == {"files": []}
    workspace(tmp_path / "fresh")
    assert after == run(text_only)  # same files, same bytes
