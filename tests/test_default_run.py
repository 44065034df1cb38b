"""The default run shows the edit working (issue 17): the README's `dvc repro` on the default preset
tiny-minilm — the pretrained MiniLM text encoder — measured in text space, against the pipeline's own
outputs (not paper numbers). Slow: it reproduces the whole default pipeline in a copy of the tree.

``T2IEDIT_DEFAULT_RUN=<folder>``: check a copy that was already reproduced there instead (e.g. the one
bench/bench_default_repro.py leaves behind with ``--keep``)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from test_pipeline_dvc import BIN, REPO, copy_worktree, sh, stage_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, request) -> Path:
    if os.environ.get("T2IEDIT_DEFAULT_RUN"):
        return Path(os.environ["T2IEDIT_DEFAULT_RUN"])
    harness = request.getfixturevalue("prefect_harness")
    root = copy_worktree(tmp_path_factory.mktemp("default") / "repo")
    sh([str(BIN / "dvc"), "repro"], root, stage_env(harness, tmp_path_factory.mktemp("cache")),
       timeout=7200)
    return root


def _text_space(root: Path) -> dict:
    return json.loads((root / "data/eval/metrics/summary/metrics.json").read_text())["text_space"]


def test_the_default_preset_is_the_pretrained_minilm(default_run):
    assert yaml.safe_load((REPO / "params.yaml").read_text())["model"]["preset"] == "tiny-minilm"
    lock = json.loads((default_run / "data/models/lock.json").read_text())
    assert lock["preset"] == "tiny-minilm"
    cfg = json.loads((default_run / lock["source"] / "text_encoder/config.json").read_text()
                     if not Path(lock["source"]).is_absolute() else
                     (Path(lock["source"]) / "text_encoder/config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["hidden_size"] == 384 and cfg["num_hidden_layers"] == 6


def test_text_space_has_every_method_with_real_numbers(default_run):
    ts = _text_space(default_run)
    assert {"unedited", "ours", "ours-no-projector", "ours-no-eata", "ours-no-visual", "emcid",
            "refact"} <= set(ts)
    for method, r in ts.items():
        for key in ("efficacy", "generality", "kgemap", "compo", "specificity", "entity_drift",
                    "caption_drift"):
            assert isinstance(r[key], float), (method, key)  # CAKE has every category
    for method in set(ts) - {"unedited"}:  # every edit moved the encoder
        assert ts[method]["caption_drift"] > 0.0 and ts[method]["efficacy"] > 0.0, method


def test_unedited_efficacy_is_the_floor_and_ours_is_well_above(default_run):
    ts = _text_space(default_run)
    assert ts["unedited"]["efficacy"] <= 5.0
    assert ts["ours"]["efficacy"] >= 60.0


def test_removing_the_projector_increases_held_out_drift(default_run):
    ts = _text_space(default_run)
    assert ts["ours-no-projector"]["caption_drift"] > ts["ours"]["caption_drift"]


def test_the_report_leads_with_the_text_space_and_shows_eatas_entity_drift(default_run):
    md = (default_run / "data/eval/report/report.md").read_text(encoding="utf-8")
    ts = _text_space(default_run)
    lines = md.splitlines()
    assert "What is real" in lines[2] and "smoke test" in lines[3]
    assert md.index("## Text space") < md.index("## Image metrics")
    a, b = ts["ours"]["entity_drift"], ts["ours-no-eata"]["entity_drift"]
    assert f"(ours, α > 0): **{a:.4f}**; without it (ours-no-eata, α = 0): **{b:.4f}**" in md
    for row in ("ours", "ours-no-eata", "ours-no-projector", "emcid", "refact"):
        assert re.search(rf"^\| {re.escape(row)} \|", md, re.M), row
    # one grid per edit, titled source → target, every picture beside the report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert all((default_run / "data/eval/report" / link).is_file() for link in links)
    assert re.search(r"^### cake-test-000: The president of the United States → Tim Cook$", md, re.M)
