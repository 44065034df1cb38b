"""Metric vs number of edits: scripts/scale_sweep.py turns `dvc exp show --json` into the plot's data;
scripts/scale_sweep.sh runs real `dvc exp run --temp` experiments on a toy stage and collects them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
METRICS = "data/eval/metrics/summary/metrics.json"

spec = importlib.util.spec_from_file_location("scale_sweep", REPO / "scripts/scale_sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def metrics_json(n: int) -> dict:
    """The layout flows.metrics writes: method -> test -> category means + score; text_space apart."""
    return {"edited": {"binary": {"efficacy": 90.0 - n, "specificity": 80.0, "score": 85.0 - n},
                       "threshold": {"efficacy": 70.0 - n, "score": 60.0 - n}},
            "unedited": {"binary": {"efficacy": 10.0, "score": 20.0}},
            "text_space": {"efficacy": {"success": 100.0, "drift": 0.1, "n_prompts": 3}}}


def rev(name, sha, ts, n, metrics=True):
    data = {"rev": sha, "timestamp": ts,
            "params": {"params.yaml": {"data": {"datasets": {"max_edits": n}}}},
            "metrics": {METRICS: {"data": metrics_json(n or 0)} if metrics else
                        {"error": {"type": "FileNotFoundError", "msg": "no file"}}}}
    return {"rev": sha, "name": name, "data": data, "error": None, "experiments": None}


def test_sweep_table_flattens_experiments_latest_wins_and_skips_unusable_revisions():
    show = [
        {**rev(None, "workspace", None, 99), "rev": "workspace"},            # never counted
        {**rev("main", "a" * 40, "2026-01-01T00:00:00", 10, metrics=False),  # no metrics: skipped
         "experiments": [
             {"name": "scale-3", "revs": [rev("scale-3", "b" * 40, "2026-01-02T00:00:00", 3)]},
             {"name": "old-3", "revs": [rev("old-3", "c" * 40, "2026-01-01T12:00:00", 3)]},
             {"name": "scale-30", "revs": [rev("scale-30", "d" * 40, "2026-01-03T00:00:00", 30)]},
             {"name": "all", "revs": [rev("all", "e" * 40, "2026-01-04T00:00:00", None)]},  # no N
         ]},
    ]
    table = sweep.sweep_table(show)
    assert sorted(set(table["n_edits"])) == [3, 30]
    assert set(table[table["n_edits"] == 3]["exp"]) == {"scale-3"}  # the later of the two N=3 runs
    assert set(table["method"]) == {"edited", "unedited"} and set(table["test"]) == {"binary", "threshold"}
    score = table[(table["method"] == "edited") & (table["test"] == "binary") & (table["category"] == "Score")]
    assert score.set_index("n_edits")["mean"].to_dict() == {3: 82.0, 30: 55.0}
    assert "Specificity" in set(table["category"])


def test_write_sweep_plots_each_test_and_refuses_an_empty_sweep(tmp_path):
    show = [{**rev("main", "a" * 40, "2026-01-01T00:00:00", 5),
             "experiments": [{"name": "s", "revs": [rev("s", "b" * 40, "2026-01-02T00:00:00", 50)]}]}]
    paths = sweep.write_sweep(sweep.sweep_table(show), tmp_path / "out")
    # the threshold test is the headline (issue 14 item 2): its plot comes first
    assert [p.name for p in paths] == ["metric_vs_edits.csv", "metric_vs_edits_threshold.png",
                                       "metric_vs_edits_binary.png"]
    assert Image.open(paths[1]).size[0] > 100
    data = pd.read_csv(paths[0])
    assert sorted(set(data["n_edits"])) == [5, 50]
    with pytest.raises(ValueError, match="no experiment"):
        sweep.write_sweep(sweep.sweep_table([]), tmp_path / "none")


TOY_STAGE = """\
    import json, os, yaml
    n = yaml.safe_load(open("params.yaml"))["datasets"]["max_edits"]
    os.makedirs("data/eval/metrics/summary", exist_ok=True)
    m = {"edited": {"binary": {"efficacy": 100.0 - n, "score": 90.0 - n}}}
    json.dump(m, open("data/eval/metrics/summary/metrics.json", "w"))
    """

TOY_DVC = """\
    stages:
      metrics:
        cmd: python toy.py
        deps: [toy.py]
        params: [datasets.max_edits]
        metrics:
          - data/eval/metrics/summary/metrics.json:
              cache: false
    """


def test_scale_sweep_script_runs_dvc_experiments_and_collects(tmp_path):
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("scale_sweep.sh", "scale_sweep.py"):
        shutil.copy2(REPO / "scripts" / name, root / "scripts" / name)
    (root / "toy.py").write_text(textwrap.dedent(TOY_STAGE))
    (root / "dvc.yaml").write_text(textwrap.dedent(TOY_DVC))
    params = "datasets:\n  max_edits: 10   # kept as is by the sweep\n"
    (root / "params.yaml").write_text(params)
    (root / ".gitignore").write_text("/data/*\n!/data/eval/\n")  # metrics.json must reach the exp commits
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "SWEEP_OUT": "sweep",
           "PYTHONPATH": str(REPO),  # t2iedit for the collector (the toy repo has none)
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run = lambda *args: subprocess.run(args, cwd=root, env=env, capture_output=True, text=True,  # noqa: E731
                                       timeout=300)
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                 ["git", "commit", "-qm", "toy"]):
        assert run(*args).returncode == 0
    res = run("bash", "scripts/scale_sweep.sh", "run", "40")  # one real experiment (several: unit test)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = pd.read_csv(root / "sweep/metric_vs_edits.csv")
    score = data[data["category"] == "Score"].set_index("n_edits")
    assert score["mean"].to_dict() == {40: 50.0}
    assert set(score["exp"]) == {"scale-40"}
    assert (root / "sweep/metric_vs_edits_binary.png").is_file()
    assert (root / "params.yaml").read_text() == params  # --temp: the workspace is untouched
    bad = run("bash", "scripts/scale_sweep.sh", "run", "x")
    assert bad.returncode == 2 and "positive integer" in bad.stderr

    (root / ".gitignore").write_text("/data/\n")  # as this repository's .gitignore has it today
    ignored = run("bash", "scripts/scale_sweep.sh", "run", "5")
    assert ignored.returncode == 3 and "git-ignored" in ignored.stderr, ignored.stderr
    assert "scale-5" not in run("dvc", "exp", "list", "--name-only").stdout  # refused before running
