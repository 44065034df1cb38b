"""Tasks of the ner and values stages through ``.fn`` on the tiny model: outputs, stamps (resume),
and the contract with the edit stage (``tasks.edit.aligned_targets`` reads our values file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
    outs = [values_batch.fn(root / "values" / "batches" / f"b{i}.safetensors", f"v{i}", models, as_dicts(b),
                            config, layer, lat) for i, (b, lat) in enumerate(zip(batches, lats))]
    merged = merge_values.fn(root / "values" / "values.safetensors", "v", outs, config)
    meta = load_meta(merged)
    assert meta["edit_ids"] == [r.edit_id for r in reqs] and meta["value_layer"] == layer
    losses = read_parquet(losses_file(merged), LOSS_SCHEMA)
    assert losses.column("steps").to_pylist() == [3] * n
    assert values_metrics(merged)["n_edits"] == n
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
