"""Tasks of the prepare_model → statistics → projector → edit stages on the tiny model, through
``.fn()`` (no Prefect server): outputs, stamps, resumable shards, and an edit that applies."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from t2iedit.edit import EditArtifact, edited
from t2iedit.storage import file_sha256, load_meta, read_json, save_tensors, write_parquet
from t2iedit.keys import SecondMoment, collect_second_moment, compute_hidden
from t2iedit.prompts import EditRequest
from tasks.fingerprints import item_fingerprint
from tasks.stamps import is_done
from tasks.edit import closed_form_edit
from tasks.model import load_locked_encoder, lock_model
from tasks.projector import build_projector, projector_file, write_projector_metrics
from tasks.key_statistics import merge_moments, moment_file, moment_shard

CORPUS = [f"{a} {b} {c}" for a in ("A red", "The old", "Two small", "A shiny")
          for b in ("dog", "car", "house", "bottle", "woman") for c in ("on the beach.", "in a city")]
EDITS = [("e0", "The president of the United States", "Joe Biden"), ("e1", "A dog", "A cat"),
         ("e2", "The CEO of Amazon", "Andy Jassy")]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    models = root / "models"
    lock = lock_model.fn(models / "lock.json", "fp-model", "tiny", 0)
    return root, models, lock


def test_lock_model_builds_tiny_and_pins_it(stages):
    root, models, lock = stages
    data = read_json(lock)
    assert data["preset"] == "tiny" and data["base_model_id"] == "tiny" and data["revision"] is None
    assert data["edit_layers"] == [0, 1, 2, 3, 4] and data["value_layer"] == 4
    assert "text_encoder/model.safetensors" in data["files"]
    assert is_done(lock, "fp-model")
    before = (models / "tiny-seed0" / "text_encoder" / "model.safetensors").stat().st_mtime_ns
    lock_model.fn(models / "lock.json", "fp-model", "tiny", 0)  # valid stamp: nothing rebuilt
    assert (models / "tiny-seed0" / "text_encoder" / "model.safetensors").stat().st_mtime_ns == before


def test_lock_model_pins_a_local_pipeline_folder(tmp_path):
    """model.source: a save_pretrained folder replaces the built tiny weights (and the hub snapshot)."""
    from t2iedit.models import build_tiny_pipeline, load_text_encoder

    folder = build_tiny_pipeline(tmp_path / "my-sd", seed=3)
    models = tmp_path / "models"
    data = read_json(lock_model.fn(models / "lock.json", "fp", "tiny", 0, str(folder)))
    assert data["source"] == folder.resolve().as_posix() and data["seed"] is None
    assert data["files"]["text_encoder/model.safetensors"] == file_sha256(
        folder / "text_encoder/model.safetensors")
    assert not (models / "tiny-seed0").exists()  # nothing built
    _, _, adapter = load_locked_encoder(models)  # later stages load the folder's weights
    _, seed3 = load_text_encoder(folder)
    for a, b in zip(adapter.model.parameters(), seed3.parameters()):
        assert torch.equal(a, b)

    with pytest.raises(ValueError, match=r"model.source: .*nowhere has no model_index.json"):
        lock_model.fn(tmp_path / "m2/lock.json", "fp", "tiny", 0, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"model.source: .*field 'hidden_size' is 64 but preset 'sd-v1-4'"):
        lock_model.fn(tmp_path / "m3/lock.json", "fp", "sd-v1-4", 0, str(folder))
    assert not (tmp_path / "m2/lock.json").exists() and not (tmp_path / "m3/lock.json").exists()


def test_statistics_projector_edit_chain(stages):
    root, models, _ = stages
    layers = [2, 4]
    halves = [CORPUS[:20], CORPUS[20:]]
    shards = [moment_shard.fn(root / "shards" / f"shard_{i:05d}.safetensors", item_fingerprint("fp", i),
                              models, texts, layers, 8) for i, texts in enumerate(halves)]
    merged = merge_moments.fn(root / "moments", "fp", shards, layers)
    lock, tokenizer, adapter = load_locked_encoder(models)
    whole = collect_second_moment(adapter, tokenizer, CORPUS, layers, progress=False)
    for layer in layers:
        m = SecondMoment.load(moment_file(merged, layer))
        assert m.count == whole[layer].count
        # float32 per-batch products, prefixes deduplicated per shard (issue 16 item 8): rounding 1e-7
        torch.testing.assert_close(m.moment(), whole[layer].moment(), rtol=1e-5, atol=1e-7)

    projectors = {l: build_projector.fn(projector_file(root / "projector", l), f"fp{l}",
                                        moment_file(merged, l), "relative", 1.0e-3) for l in layers}
    metrics = read_json(write_projector_metrics(root / "projector_metrics.json", projectors))
    assert set(metrics) == {f"layer_{l:02d}" for l in layers}
    assert all(0 < row["null_rank"] < 256 and row["dim"] == 256 for row in metrics.values())
    assert metrics["layer_04"]["null_rank"] == load_meta(projectors[4])["null_rank"]

    # the edit stage's inputs: the edit set and the values stage's z (value_tensors / value_meta format)
    edits = root / "edits.parquet"
    write_parquet(edits, pa.table({"edit_id": [e[0] for e in EDITS] + ["c0"],
                                   "kind": ["single"] * 3 + ["composite"],
                                   "source": [e[1] for e in EDITS] + ["x"],
                                   "target": [e[2] for e in EDITS] + ["y"]}))
    targets = [EditRequest(i, t, t) for i, _, t in EDITS]
    z = compute_hidden(adapter, tokenizer, targets, 4).float()
    values = save_tensors(root / "values.safetensors", {"z": z.flip(0)},  # stored in another order
                          meta={"edit_ids": [e[0] for e in EDITS][::-1], "value_layer": 4})
    out = closed_form_edit.fn(root / "edit" / "artifact", "fp-edit", models, edits, values,
                              root / "projector", layers, None, 1.0, ["A photo of {}", "{}"], {"beta": 1.0})
    art = EditArtifact.load(out)
    assert art.manifest.method == "ours" and art.manifest.n_edits == 3  # the composite row is not applied
    assert art.manifest.layers == tuple(layers) and art.manifest.extra["edit_ids"] == ["e0", "e1", "e2"]
    requests = [EditRequest(i, s, t) for i, s, t in EDITS]
    h0 = compute_hidden(adapter, tokenizer, requests, 4)
    with edited({"text_encoder": adapter.model}, art, lock["base_model_id"], lock["base_revision"]):
        h = compute_hidden(adapter, tokenizer, requests, 4)
    assert ((h - z.double()).norm(dim=1) < (h0 - z.double()).norm(dim=1)).all()

    with pytest.raises(ValueError, match="layer"):
        bad = save_tensors(root / "bad.safetensors", {"z": z}, meta={"edit_ids": ["e0", "e1", "e2"],
                                                                     "value_layer": 3})
        closed_form_edit.fn(root / "edit" / "bad", "fp-bad", models, edits, bad, root / "projector",
                            layers, None, 1.0, ["{}"], {})
