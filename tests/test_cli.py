"""The ``t2iedit`` command line on the tiny preset through typer's CliRunner: edit two files of facts,
list, generate, export and load back with ``StableDiffusionPipeline.from_pretrained`` (edited weights
= base + ΔA + ΔB exactly), revert; bad files and another base model fail with a clear message and a
non-zero exit code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from t2iedit.cli import app
from t2iedit.continual import ContinualState
from t2iedit.models import CLIP_FC2_TEMPLATE, PRESETS, TextEncoderAdapter, load_pipeline

runner = CliRunner()
FAST = ["--steps", "10", "--corpus-size", "200"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output  # click ≥ 8.2: stdout and stderr interleaved


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("facts")
    (d / "facts.csv").write_text("source,target,entity\n"
                                 "The president of the United States,Tim Cook,the United States\n"
                                 "A dog,A cat,\n")
    (d / "more.yaml").write_text("edits:\n  - {source: The CEO of Amazon, target: Andy Jassy}\n")
    (d / "bad.csv").write_text("source,target\nA banana,A blue banana\nAn apple,\n")
    (d / "badfield.csv").write_text("source,goal\nA banana,A blue banana\n")
    return d


@pytest.fixture(scope="module")
def store(tmp_path_factory, files):
    """A store with two batches: facts.csv (2 facts) then more.yaml (1 fact)."""
    folder = tmp_path_factory.mktemp("cli") / "store"
    for f in ("facts.csv", "more.yaml"):
        result, text = run("edit", files / f, "--store", folder, "--preset", "tiny", *FAST)
        assert result.exit_code == 0, text
    return folder


def _fc2(pipe):
    ad = TextEncoderAdapter(pipe.text_encoder, CLIP_FC2_TEMPLATE)
    return {l: ad.layer(l).weight.detach().clone() for l in range(ad.num_layers)}


def test_edit_and_list(store):
    state = ContinualState.open(store)
    assert [b.edit_id for b in state.batches] == ["001-facts", "002-more"]
    first, second = state.batches
    assert first.requests[0].entities == ((17, 34),)  # the file's entity column → EATA span
    assert second.manifest.extra["continual"]["prior_key_counts"] == {str(l): 2 for l in range(5)}
    assert state.key_counts() == {l: 3 for l in PRESETS["tiny"].edit_layers}
    assert second.manifest.method == "ours" and second.manifest.base_model_id == "tiny"

    result, text = run("list", "--store", store, "--facts")
    assert result.exit_code == 0, text
    assert "001-facts" in text and "002-more" in text and "Andy Jassy" in text
    result, text = run("list", "--store", store, "--json")
    doc = json.loads(result.stdout)
    assert [b["edit_id"] for b in doc["batches"]] == ["001-facts", "002-more"]
    assert doc["batches"][1]["manifest"]["n_edits"] == 1 and doc["base"]["model_id"] == "tiny"
    assert doc["batches"][0]["files"]["deltas.safetensors"] == state.files("001-facts")["deltas.safetensors"]


def test_export_loads_back_with_the_edited_weights(store, tmp_path):
    from diffusers import StableDiffusionPipeline

    result, text = run("export", tmp_path / "out", "--store", store)
    assert result.exit_code == 0, text
    exported = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"), safety_checker=None,
                                                       requires_safety_checker=False)
    base = _fc2(load_pipeline(store / "base-model"))
    state = ContinualState.open(store)
    got = _fc2(exported)
    ad = TextEncoderAdapter(exported.text_encoder, CLIP_FC2_TEMPLATE)
    for l in range(6):
        key = f"text_encoder:{ad.module_name(l)}"
        total = state.total_delta(key)
        if total is None:  # layer 5 is never edited (value layer 4)
            assert torch.equal(got[l], base[l])
            continue
        dA, dB = (b.artifact.deltas[key] for b in state.batches)
        assert torch.equal(got[l], (base[l].double() + dA + dB).float()), l
        assert not torch.equal(got[l], base[l])
    assert json.loads((tmp_path / "out" / "t2iedit_edits.json").read_text())["batches"][1]["edit_id"] == "002-more"
    result, text = run("export", tmp_path / "out", "--store", store)
    assert result.exit_code == 1 and "not empty" in text


def test_generate_is_seeded_and_uses_the_edits(store, tmp_path):
    paths = {}
    for tag, extra in (("a", []), ("b", []), ("base", ["--unedited"])):
        paths[tag] = tmp_path / f"{tag}.png"
        result, text = run("generate", "The president of the United States", "--seed", "3", "--steps", "2",
                           "--out", paths[tag], "--store", store, *extra)
        assert result.exit_code == 0, text
    a, b, base = (np.asarray(Image.open(paths[t])) for t in ("a", "b", "base"))
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, base)


def test_revert_then_list(store, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    result, text = run("revert", "002", "--store", copy)
    assert result.exit_code == 0, text
    assert "reverted 002-more" in text
    result, text = run("revert", "001-facts", "--store", copy)
    assert result.exit_code == 0, text
    assert "1 facts" not in text and "0 batches remain" in text
    result, text = run("list", "--store", copy)
    assert "001-facts" not in text and "no edits applied" in text
    result, text = run("revert", "001-facts", "--store", copy)
    assert result.exit_code == 1 and "no applied edit matches '001-facts'" in text
    # reverting everything leaves the base weights: the exported model equals the base bit for bit
    result, text = run("export", tmp_path / "out", "--store", copy)
    assert result.exit_code == 0, text
    got, base = _fc2(load_pipeline(tmp_path / "out")), _fc2(load_pipeline(store / "base-model"))
    assert all(torch.equal(got[l], base[l]) for l in got)


def test_bad_files_fail_clearly(files, tmp_path):
    result, text = run("edit", files / "bad.csv", "--store", tmp_path / "s", *FAST)
    assert result.exit_code == 1
    assert "bad.csv: row 2, field 'target': empty" in " ".join(text.split())
    result, text = run("edit", files / "badfield.csv", "--store", tmp_path / "s", *FAST)
    assert result.exit_code == 1 and "field 'goal': unknown field" in " ".join(text.split())
    result, text = run("edit", tmp_path / "missing.csv", "--store", tmp_path / "s")
    assert result.exit_code == 1 and "edit file not found" in text
    assert not (tmp_path / "s").exists()  # nothing created for a bad file
    result, text = run("list", "--store", tmp_path / "s")
    assert result.exit_code == 1 and "no continual-editing store" in text


def test_another_base_model_is_refused(store, files, tmp_path):
    from t2iedit.models import build_tiny_pipeline

    result, text = run("edit", files / "facts.csv", "--store", store, "--preset", "sd-v1-4", *FAST)
    assert result.exit_code == 1
    assert "base model mismatch" in text and "'tiny'" in text and "'sd-v1-4'" in text
    other = build_tiny_pipeline(tmp_path / "tiny-seed1", seed=1)  # same preset and id, other weights
    result, text = run("generate", "A dog", "--store", store, "--source", other, "--out", tmp_path / "x.png")
    assert result.exit_code == 1
    assert "were made on base model 'tiny'" in " ".join(text.split())
    assert not (tmp_path / "x.png").exists()
