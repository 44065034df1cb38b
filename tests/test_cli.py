"""The ``t2iedit`` command line on the tiny preset through typer's CliRunner: edit two files of facts,
list, generate, export and load back with ``StableDiffusionPipeline.from_pretrained`` (edited weights
= base + ΔA + ΔB exactly), revert; bad files and another base model fail with a clear message and a
non-zero exit code."""

from __future__ import annotations

import json
import os
import re

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


EDIT_OUTPUT: dict[str, str] = {}  # what `edit` printed while building the module's store


@pytest.fixture(scope="module")
def store(tmp_path_factory, files):
    """A store with two batches: facts.csv (2 facts) then more.yaml (1 fact)."""
    folder = tmp_path_factory.mktemp("cli") / "store"
    for f in ("facts.csv", "more.yaml"):
        result, text = run("edit", files / f, "--store", folder, "--preset", "tiny", *FAST)
        assert result.exit_code == 0, text
        EDIT_OUTPUT[f] = text
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
    # --height/--width (issue 16 item 1; default: the model's own 32 x 32)
    result, text = run("generate", "a dog", "--steps", "1", "--height", "16", "--width", "24",
                       "--out", tmp_path / "small.png", "--store", store)
    assert result.exit_code == 0, text
    assert np.asarray(Image.open(tmp_path / "small.png")).shape == (16, 24, 3)
    result, text = run("generate", "a dog", "--height", "12", "--out", tmp_path / "bad.png", "--store", store)
    assert result.exit_code != 0 and "--height must be a positive multiple of 8" in text


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
    assert "bad.csv: line 3 (row 2), field 'target': empty" in " ".join(text.split())
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



# ----------------------------------------------------------------------- issue 18 items 3 and 5: a new user
def _no_traceback(result) -> bool:
    """CliRunner catches what would reach the terminal as a traceback in ``result.exception``."""
    return result.exception is None or isinstance(result.exception, SystemExit)


def test_the_value_stage_shows_adam_steps_and_the_loss(store):
    # the bar counts steps (10 of them), not facts ("0/2" for minutes), and shows the current loss
    text = " ".join(EDIT_OUTPUT["facts.csv"].split())
    assert re.search(r"target values \(2 facts\): step 10/10, loss \d", text), text
    assert "10/10" in text


def test_no_torchvision_warning_on_any_command():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "t2iedit.cli", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0
    assert "torchvision" not in res.stdout + res.stderr


def test_the_filters_drop_only_those_warnings():
    import logging

    from t2iedit.cli import DIFFUSERS_PIPELINE_LOGGER, QUIET_WARNINGS, TRANSFORMERS_IMPORT_LOGGER, MessageFilter
    from t2iedit.library_warnings import DIFFUSERS_MODELING_LOGGER

    def passes(logger, msg):
        record = logging.LogRecord(logger, logging.WARNING, __file__, 1, msg, None, None)
        return all(f.filter(record) for f in logging.getLogger(logger).filters if isinstance(f, MessageFilter))

    assert set(QUIET_WARNINGS) == {TRANSFORMERS_IMPORT_LOGGER, DIFFUSERS_PIPELINE_LOGGER, DIFFUSERS_MODELING_LOGGER}
    fp32 = ("There are modules in UNet2DConditionModel that should be kept in float32: []. Casting directly "
            "with `to()` can lead to inconsistent results; set `torch_dtype` in `from_pretrained()` instead.")
    assert not passes(DIFFUSERS_MODELING_LOGGER, fp32)
    assert passes(DIFFUSERS_MODELING_LOGGER, fp32.replace("[]", "['conv_norm_out']"))
    assert not passes(TRANSFORMERS_IMPORT_LOGGER, "`CLIPImageProcessor` requires torchvision (not installed); "
                      "falling back to `CLIPImageProcessorPil` for backward compatibility. Install torchvision ...")
    assert passes(TRANSFORMERS_IMPORT_LOGGER, "`CLIPImageProcessor` could not be imported")
    assert passes(TRANSFORMERS_IMPORT_LOGGER, "torchvision is required for video processing")
    bert = ("Expected types for text_encoder: (<class 'transformers.models.clip.modeling_clip.CLIPTextModel'>,), "
            "got <class 'transformers.models.bert.modeling_bert.BertModel'>.")
    assert not passes(DIFFUSERS_PIPELINE_LOGGER, bert)
    assert passes(DIFFUSERS_PIPELINE_LOGGER, bert.replace("text_encoder", "unet"))
    assert passes(DIFFUSERS_PIPELINE_LOGGER, bert.replace("BertModel", "T5EncoderModel").replace("bert", "t5"))


def test_validate_checks_a_file_without_a_model(files, tmp_path):
    result, text = run("validate", files / "facts.csv")
    assert result.exit_code == 0, text
    assert len(text.strip().splitlines()) == 1 and "2 facts, valid (1 with an entity)" in text
    result, text = run("validate", files / "bad.csv")
    assert result.exit_code == 1 and "line 3 (row 2), field 'target': empty" in " ".join(text.split())
    assert not (tmp_path / "s").exists()


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts with EF BB BF
    path.write_bytes("source,target\nThe capital of France,Tokyo\n".encode("utf-8-sig"))
    result, text = run("validate", path)
    assert result.exit_code == 0, text
    assert "1 facts, valid" in text


def test_every_bad_row_is_reported_with_its_line(tmp_path):
    path = tmp_path / "many.csv"
    lines = ["source,target", "A dog,A cat", '"A multi', 'line source",A cow', "A pig,"]
    lines += [f"A thing {i}," for i in range(30)]  # 31 empty targets in all
    path.write_text("\n".join(lines) + "\n")
    result, text = run("validate", path)
    flat = " ".join(text.split())
    assert result.exit_code == 1 and _no_traceback(result)
    assert "many.csv: 31 errors" in flat
    assert "line 5 (row 3), field 'target': empty" in flat  # the quoted record spans lines 3-4
    assert "line 6 (row 4), field 'target': empty" in flat
    assert text.count("field 'target': empty") == 20 and "and 11 more" in flat


def test_an_unterminated_quote_is_named(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('source,target\nA dog,A cat\n"A cow,A horse\nA pig,A hen\n')
    result, text = run("validate", path)
    assert result.exit_code == 1 and _no_traceback(result)
    assert "quote.csv: line 3: unterminated quote" in " ".join(text.split())


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("source,target\nA dog,A cat\nThe café,A bar\n".encode("latin-1"))
    for cmd in (["validate", path], ["edit", path, "--store", tmp_path / "s", *FAST]):
        result, text = run(*cmd)
        flat = " ".join(text.split())
        assert result.exit_code == 1 and _no_traceback(result), text
        assert "bad edit file" in flat and "latin1.csv: line 3: not UTF-8 text (byte 0xe9" in flat
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args,message", [
    (["--steps", "-3"], "--steps must be at least 1, got -3"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--projector-mode", "bogus", "--projector-value", "0.01"], "--projector-mode must be one of"),
    (["--projector-mode", "energy"], "--projector-mode and --projector-value go together"),
    (["--projector-mode", "energy", "--projector-value", "2"], "--projector-value: the energy mode takes a fraction"),
    (["--layers", "0,99"], "--layers: 99 not in 0.."),
    (["--layers", "0,x"], "--layers must be comma-separated integers"),
    (["--method", "nope"], "--method must be one of"),
])
def test_bad_options_are_named_before_any_model_loads(files, tmp_path, args, message):
    # even with a bad file: the option is what is wrong first, and it is not called a bad edit file
    for facts in ("facts.csv", "bad.csv"):
        result, text = run("edit", files / facts, "--store", tmp_path / "s", *FAST, *args)
        flat = " ".join(text.split())
        assert result.exit_code == 2 and _no_traceback(result), text
        assert f"bad option: {message}" in flat and "bad edit file" not in flat
    assert not (tmp_path / "s").exists()  # no store, and no model was built into it


def test_an_unreachable_hub_model_is_one_message_and_no_store(files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    result, text = run("edit", files / "facts.csv", "--store", tmp_path / "s", "--preset", "sd-v1-4", *FAST)
    assert result.exit_code == 1 and _no_traceback(result), text
    assert "cannot load the model: CompVis/stable-diffusion-v1-4" in " ".join(text.split())
    assert len(text.strip().splitlines()) <= 6, text
    assert not (tmp_path / "s").exists()


def test_list_never_cuts_the_ids_revert_takes(store):
    ids = [b.edit_id for b in ContinualState.open(store).batches]
    for columns in ("30", "200"):
        result = runner.invoke(app, ["list", "--store", str(store)], env={"COLUMNS": columns})
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        for edit_id in ids:
            assert any(edit_id in line.split() for line in lines), (columns, result.output)


def _cli(*args, env=None, **kw):
    import subprocess
    import sys

    import signal

    # SIGINT back to its default in the child: a test run started in the background (nohup, `cmd &`) has it
    # ignored, and Python then never installs its KeyboardInterrupt handler, so Ctrl-C would do nothing
    return subprocess.Popen([sys.executable, "-m", "t2iedit.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "stats" not in p.parts}


@pytest.mark.parametrize("which", ["existing store", "new store"])
def test_ctrl_c_prints_one_line_and_leaves_the_store_as_it_was(store, files, tmp_path, which):
    import shutil
    import signal
    import time

    copy = tmp_path / "store"
    if which == "existing store":
        shutil.copytree(store, copy)
    before = _snapshot(copy) if copy.exists() else None
    proc = _cli("edit", files / "more.yaml", "--store", copy, "--preset", "tiny", "--steps", "100000",
                "--corpus-size", "200", env={"OMP_NUM_THREADS": "1"})
    time.sleep(30)  # imports, the model, then the 100000-step Adam loop (a Ctrl-C at any time must do)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert [l for l in output.splitlines() if "interrupted" in l] == [
        "interrupted (Ctrl-C): stopped; the store is as it was before this command"]
    if before is None:
        assert not copy.exists(), "an interrupted first edit leaves no store"
    else:
        assert _snapshot(copy) == before


def test_an_edit_killed_after_writing_its_batch_is_adopted_by_the_next_command(store, files, tmp_path):
    import shutil

    from t2iedit.continual import FAULT_ENV

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    proc = _cli("edit", files / "more.yaml", "--store", copy, "--name", "again", *FAST,
                env={FAULT_ENV: "add:renamed", "OMP_NUM_THREADS": "1"})
    out_text = proc.communicate(timeout=300)[0]
    assert proc.returncode == -9, out_text  # SIGKILL between the batch folder and state.json
    assert (copy / "batches" / "003-again").is_dir()
    result, text = run("list", "--store", copy)  # today: 003-again exists but is not listed
    assert result.exit_code == 0, text
    assert "recovered: adopted batch 003-again" in " ".join(text.split())
    assert "003-again" in [line.split()[1] for line in text.splitlines() if line[:1].isdigit()]
    result, text = run("revert", "003-again", "--store", copy)
    assert result.exit_code == 0 and "reverted 003-again" in text


def test_the_default_preset_is_the_pretrained_minilm(files, tmp_path):
    """What a new user gets without --preset: tiny-minilm (a real pretrained text encoder), its edit
    layers (0..3, value layer 3) and pooling (mean)."""
    result, text = run("edit", files / "facts.csv", "--store", tmp_path / "s", "--steps", "5",
                       "--corpus-size", "50")
    assert result.exit_code == 0, text
    state = ContinualState.open(tmp_path / "s")
    assert state.settings["preset"] == "tiny-minilm" and state.base.template == "encoder.layer.{}.output.dense"
    assert state.batches[0].manifest.layers == (0, 1, 2, 3)
    assert state.batches[0].manifest.extra["config"]["values"]["pooling"] == "mean"
    # the projector: the preset's calibrated rule (as the pipeline's projector stage), not relative 1e-2,
    # and the output says what it protects (METHOD.md §3)
    assert state.batches[0].manifest.extra["config"]["projector"] == ["energy", 0.01]
    protected = min(m["protected_energy"] for m in state.batches[0].manifest.extra["projectors"].values())
    assert protected >= 0.99
    assert f"projector energy 0.01: at least {protected:.1%} of the preserved keys' energy" in " ".join(text.split())
