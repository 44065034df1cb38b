"""`prefect server start` + `python -m flows.serve`: the deployment appears in the API with its schedule,
and a run of it (`prefect deployment run pipeline/t2iedit`) goes through the whole pipeline to COMPLETED
(issue 18 item 1: Prefect loads the entrypoint by file path, which put `flows/` first on `sys.path`; a
project module named like a stdlib one, `flows/statistics.py`, then broke torch's `import statistics`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The smallest settings that still run every stage of flows.pipeline (a served run takes ~1-2 min).
FAST_PARAMS = {
    ("model", "preset"): "tiny", ("datasets", "max_edits"): 1, ("corpus", "size"): 300,
    ("statistics", "shard_size"): 300, ("values", "steps"): 2, ("values", "latent_steps"): 2,
    ("generate", "seeds"): [0, 1], ("generate", "num_inference_steps"): 2, ("runner", "kind"): "thread",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: timed out after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture()
def prefect_server(tmp_path):
    """A real `prefect server start` on a free port with its own PREFECT_HOME; yields its API URL."""
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": ""}
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, 120,
              "prefect server start", proc)
        yield url
    finally:
        _stop(proc)


def test_served_deployment_with_schedule_is_registered(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "home")}
    serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--name", "nightly-test",
                              "--cron", "15 4 * * *"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
            found = {}

            def registered() -> bool:
                found["d"] = client.read_deployment_by_name("pipeline/nightly-test")
                return True

            _wait(registered, 90, "python -m flows.serve", serve)
            deployment = found["d"]
            assert deployment.parameters == {"params_file": "params.yaml"}
            crons = [s.schedule.cron for s in deployment.schedules]
            assert crons == ["15 4 * * *"] and all(s.active for s in deployment.schedules)
            assert client.read_flow(deployment.flow_id).name == "pipeline"
            # the server scheduled future runs of it
            _wait(lambda: len(client.read_flow_runs(limit=5)) > 0, 60, "scheduled runs", serve)
            runs = client.read_flow_runs(limit=5)
            assert all(r.deployment_id == deployment.id and r.state.is_scheduled() for r in runs)
    finally:
        _stop(serve)


def _copy_worktree(dst: Path) -> Path:
    """Tracked and untracked (not ignored) files of this working tree, as a plain folder."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _fast_params(root: Path) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for (section, key), value in FAST_PARAMS.items():
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_a_served_deployment_run_completes(prefect_server, tmp_path):
    """What a user does: serve the pipeline, trigger a run with the Prefect CLI, and the run reaches
    COMPLETED (today: FAILED with an ImportError from inside torch)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = _copy_worktree(tmp_path / "repo")
    _fast_params(root)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "home"),
           "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--cron", "0 3 1 1 *"], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
            found = {}

            def registered() -> bool:
                found["d"] = client.read_deployment_by_name("pipeline/t2iedit")
                return True

            _wait(registered, 120, "python -m flows.serve", serve)
            res = subprocess.run([str(BIN / "prefect"), "deployment", "run", "pipeline/t2iedit"], cwd=root,
                                 env=env, capture_output=True, text=True, timeout=120)
            assert res.returncode == 0, res.stdout + res.stderr
            run_id = re.search(r"UUID: ([0-9a-f-]{36})", res.stdout).group(1)

            def finished() -> bool:
                return client.read_flow_run(run_id).state.is_final()

            _wait(finished, 900, f"flow run {run_id}", serve)
            state = client.read_flow_run(run_id).state
            log = ""
            if not state.is_completed():
                serve.terminate()
                log = serve.communicate(timeout=30)[0][-6000:]
            assert state.is_completed(), f"{state.type.value}: {state.message}\n{log}"
        assert (root / "data" / "eval" / "report" / "report.md").is_file()
    finally:
        _stop(serve)
