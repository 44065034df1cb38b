"""`prefect server start` + `python -m flows.serve`: the deployment appears in the API with its schedule."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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
