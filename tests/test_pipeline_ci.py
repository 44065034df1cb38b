"""The GitHub workflow (.github/workflows/repro.yml): valid, and wired to scripts/ci_repro.sh.

Validated with check-jsonschema's vendored SchemaStore github-workflows schema (offline; the
actionlint wrappers on PyPI download a binary, which this project's CI cannot).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "repro.yml"
WATCHED = {"params.yaml", "dvc.yaml", "flows/**", "tasks/**", "t2iedit/**"}


def _validate(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert exe, "check-jsonschema is a dev dependency (pip install -e '.[dev]')"
    return subprocess.run([exe, "--builtin-schema", "vendor.github-workflows", str(path)],
                          capture_output=True, text=True, timeout=60)


def _load(path: Path = WORKFLOW) -> dict:
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def test_workflow_matches_github_schema():
    res = _validate(WORKFLOW)
    assert res.returncode == 0, res.stdout + res.stderr


def test_validator_rejects_a_broken_workflow(tmp_path):
    broken = WORKFLOW.read_text().replace("runs-on: ubuntu-latest", "runs_on: ubuntu-latest")
    (tmp_path / "broken.yml").write_text(broken)
    assert _validate(tmp_path / "broken.yml").returncode != 0


def test_workflow_triggers_caches_and_summarises():
    wf = _load()
    for event in ("push", "pull_request"):
        assert WATCHED <= set(wf["on"][event]["paths"]), f"{event} must watch {sorted(WATCHED)}"
    steps = wf["jobs"]["repro"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("actions/checkout@") for u in uses)
    assert next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))["with"]["fetch-depth"] == 0
    cache = next(s for s in steps if s.get("uses", "").startswith("actions/cache@"))
    run = next(s["run"] for s in steps if "scripts/ci_repro.sh" in s.get("run", ""))
    assert 'CI_SUMMARY="$GITHUB_STEP_SUMMARY"' in run
    cache_dir = run.split('DVC_CACHE_DIR="')[1].split('"')[0]
    assert cache_dir.replace("$HOME", "~") == cache["with"]["path"], "cache the dir ci_repro.sh uses"
    assert steps.index(cache) < [i for i, s in enumerate(steps) if "ci_repro.sh" in s.get("run", "")][0]


def test_project_ci_runs_the_same_script():
    assert "scripts/ci_repro.sh" in (REPO / ".ci" / "run").read_text()
