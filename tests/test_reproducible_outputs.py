"""Outputs that depend only on their inputs (issue 18 item 4): a clean clone's `dvc repro` must write
the same bytes as the committed dvc.lock records. Two things broke that: the generate stage's
``persist: true`` image folder kept the images of every earlier model (1,830 files committed vs 750
produced), and the edit manifest's wall-clock ``created_at`` changed the edit artifact's hash on every
rerun."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml

from t2iedit.edit import EditArtifact, EditManifest
from t2iedit.edit_data import EVAL_PROMPTS_SCHEMA
from t2iedit.edit_data.benchmarks import load_timed
from t2iedit.generate import read_index
from t2iedit.storage import tree_sha256, write_parquet

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"

pytestmark = pytest.mark.usefixtures("one_thread")


def _artifact() -> EditArtifact:
    g = torch.Generator().manual_seed(0)
    deltas = {"text_encoder:text_model.encoder.layers.0.mlp.fc2": torch.randn(4, 8, generator=g)}
    return EditArtifact(deltas, EditManifest("ours", "tiny", None, "abc", (0,), 1))


def test_the_same_edit_saved_twice_is_the_same_bytes(tmp_path):
    first = tree_sha256(_artifact().save(tmp_path / "a"))
    time.sleep(1.1)  # created_at had a resolution of one second
    assert tree_sha256(_artifact().save(tmp_path / "b")) == first


def test_continual_batches_still_record_when_they_were_applied(tiny_dir, tmp_path):
    from t2iedit.continual import ContinualEditor, ContinualState, base_model_of
    from t2iedit.keys import compute_hidden
    from t2iedit.models import TextEncoderAdapter, load_text_encoder
    from t2iedit.prompts import EditRequest

    tokenizer, model = load_text_encoder(tiny_dir)
    adapter = TextEncoderAdapter(model)
    editor = ContinualEditor(ContinualState.in_memory(base_model_of(adapter, "tiny", None)), adapter)
    req = [EditRequest("a0", "A dog", "A cat")]
    z = compute_hidden(adapter, tokenizer, req, 4) * 1.1
    batch = editor.apply_batch(req, z, tokenizer, layers=(3, 4), value_layer=4, projectors=None)
    assert batch.manifest.created_at and batch.manifest.created_at[:2] == "20"


def _params(folder: Path) -> str:
    (folder / "params.yaml").write_text(yaml.safe_dump({
        "generate": {"methods": ["unedited"], "seeds": [0], "batch_size": 8, "task_batches": 64}}))
    return "params.yaml"


def test_the_image_folder_holds_only_the_current_models_images(prefect_harness, tmp_path, monkeypatch):
    from flows.generate import IMAGES, INDEX_DIR, generate
    from tasks.model import lock_model

    monkeypatch.chdir(tmp_path)
    ep = load_timed(RAW).eval_prompts.to_pandas()
    ep = ep[ep["edit_id"].isin(["timed-test-000", "timed-test-001"]) & ep["prompt_id"].str.endswith("/0")]
    write_parquet(tmp_path / "data/processed/datasets/eval_prompts.parquet", ep.reset_index(drop=True),
                  EVAL_PROMPTS_SCHEMA)

    def images() -> set[str]:
        return {p.relative_to(tmp_path / IMAGES).as_posix() for p in (tmp_path / IMAGES).rglob("*.png")}

    lock_model.fn(tmp_path / "data/models/lock.json", "seed0", "tiny", 0)
    generate(params_file=_params(tmp_path))
    first = images()
    assert first == set(read_index(tmp_path / INDEX_DIR / "unedited.parquet").column("path").to_pylist())

    lock_model.fn(tmp_path / "data/models/lock.json", "seed1", "tiny", 1)  # another model
    generate(params_file=_params(tmp_path))
    second = set(read_index(tmp_path / INDEX_DIR / "unedited.parquet").column("path").to_pylist())
    assert second.isdisjoint(first)  # new model, new image keys
    assert images() == second, "images of the earlier model are still in the stage output"
    assert [d.name for d in (tmp_path / IMAGES).iterdir()] == [next(iter(second)).split("/")[0]]


def test_the_embedded_model_folder_does_not_depend_on_the_environment(tmp_path):
    """prepare_model's tiny-minilm folder is the same bytes whether or not the hub is offline: transformers
    writes the tokenizer's ``local_files_only`` into tokenizer_config.json, and taken from HF_HUB_OFFLINE
    it made a fresh clone's data/models (and so every downstream hash in dvc.lock) differ from a working
    copy run offline."""
    import os
    import subprocess
    import sys

    code = ("import sys, tasks; from t2iedit.models import build_tiny_minilm_pipeline; "
            "build_tiny_minilm_pipeline(sys.argv[1], seed=0)")
    root = Path(__file__).resolve().parents[1]
    hashes = []
    for offline in ("1", "0"):
        out = tmp_path / f"offline{offline}"
        env = {**os.environ, "HF_HUB_OFFLINE": offline, "PYTHONPATH": str(root)}
        res = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        hashes.append(tree_sha256(out))
    assert hashes[0] == hashes[1]
