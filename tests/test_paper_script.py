"""scripts/paper.sh TABLE --dry-run: the paper's settings, and counts of images and UNet evaluations
that agree with a count made here directly from the dataset files, without loading any model."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2iedit.edit_data.benchmarks import load_timed

REPO = Path(__file__).resolve().parents[1]


def _paper():
    spec = importlib.util.spec_from_file_location("paper_script", REPO / "scripts" / "paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(text: str) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"\| ([\w/]+) \| ([^|]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|$", line)
        if m:
            out[(m[1], m[2].strip())] = tuple(int(g.replace(",", "")) for g in m.groups()[2:])
    return out


def test_dry_run_loads_no_model_and_counts_what_the_pipeline_generates(monkeypatch):
    paper = _paper()
    warm = paper.dry_run("timed", None, None)  # imports done (some libraries build modules at import)

    def no_model(*args, **kwargs):
        raise AssertionError("the dry run built a torch module")

    monkeypatch.setattr(torch.nn.Module, "__init__", no_model)  # every model load builds modules
    text = paper.dry_run("timed", None, None)
    monkeypatch.undo()
    assert text == warm

    for line in ("model.preset=sd-v1-4", "datasets.max_edits=null", "generate.seeds=[0, 1, 2, 3, 4]",
                 "values.steps=200", "ner.model=dslim/bert-large-NER", "metrics.thresholds=shipped",
                 "metrics.clip=laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "fid.n_captions=5000",
                 "fid.clip_score_model=laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"):
        assert f"    {line}" in text.splitlines(), line
    rows = _rows(text)

    # direct count from the dataset file: one image per distinct text and seed, 50 steps x 2 (CFG)
    ep = load_timed(REPO / "data" / "raw").eval_prompts.to_pandas()
    n_prompt = ep["prompt"].nunique() * 5
    oracle = set(ep["oracle_prompt"].fillna(ep["prompt"]))
    n_oracle = len(oracle) * 5
    assert rows[("generate", "edited")][:2] == (n_prompt, n_prompt * 50 * 2)
    # oracle: only the oracle prompts that are not evaluation prompts (the others are unedited images)
    assert rows[("generate", "unedited")][0] == n_prompt
    assert rows[("generate", "oracle")][0] == len(oracle - set(ep["prompt"])) * 5
    assert rows[("generate", "oracle")][3] == len(oracle & set(ep["prompt"])) * 5
    assert rows[("generate", "edited")][2] == -(-n_prompt // 8) * 50  # batched calls, 8 prompts each
    # compare: edited methods generate all over again; unedited/oracle are the main run's images
    assert rows[("compare/generate", "time")][0] == n_prompt
    assert rows[("compare/generate", "unedited")] == (0, 0, 0, n_prompt)
    assert rows[("compare/generate", "oracle")] == (0, 0, 0, n_oracle)
    # the value optimisation: 104 edits, (200 steps + 2 evaluations) x 2 UNet forwards each
    assert rows[("compare/values", "ours-no-projector")][1] == 104 * 202 * 2
    # ours (value_batch_size 32, the values stage's) is the main run's edit: no values, no images
    assert ("compare/values", "ours") not in rows and rows[("compare/generate", "ours")] == (0, 0, 0, n_prompt)
    assert ("compare/values", "ours-no-visual") not in rows and ("compare/values", "time") not in rows
    assert rows[("fid", "edited")][:2] == (5000, 5000 * 50 * 2)
    total = [line for line in text.splitlines() if line.startswith("| **total**")][0]
    images, forwards = (int(g.replace(",", "")) for g in re.findall(r"\*\*([\d,]+)\*\*", total)[:2])
    assert images == sum(r[0] for r in rows.values()) and forwards == sum(r[1] for r in rows.values())
    assert "No model was loaded" in text


def test_paper_sh_dry_run_exits_zero_and_rejects_bad_tables():
    run = lambda *a: subprocess.run(["bash", str(REPO / "scripts/paper.sh"), *a], capture_output=True,  # noqa: E731
                                    text=True, env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
                                                    "HF_HUB_OFFLINE": "1"})
    out = run("road", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "the paper's Table 2 (RoAD)" in out.stdout and "| **total** |" in out.stdout
    assert "    datasets.name=road" in out.stdout.splitlines()
    assert run("imagenet", "--dry-run").returncode == 2 and run("road", "--fast").returncode == 2
    fid = run("road")  # a real run needs the FID inputs: refused before anything starts
    assert fid.returncode == 2 and "COCO_IMAGES" in fid.stderr


@pytest.mark.parametrize("table", ["timed", "road", "cake"])
def test_dvc_args_are_valid_params(table):
    """Every -S key of the paper settings exists in params.yaml (a typo would be silently added)."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key in _paper().settings(table):
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, key
            node = node[part]
