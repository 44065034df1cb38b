"""Stages share one local Prefect server (flows.shared_server, issue 17 item 4): the second stage
process reuses the server the first one started, the server stops once idle, and a server or stage
killed at any point is recovered by the next stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STAGE = '''
import sys, time
from prefect import flow
from prefect.settings import get_current_settings
from flows.stage import run_stage

@flow(name="probe")
def probe(params_file: str = "params.yaml", sleep: float = 0.0) -> None:
    print("API", get_current_settings().api.url, flush=True)
    time.sleep(sleep)

if __name__ == "__main__":
    run_stage(probe, sleep=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0)
'''


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT), **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def _stage(tmp_path: Path, env: dict[str, str], sleep: float = 0.0) -> str:
    out = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(sleep)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("API "))


def _state(home: Path) -> dict | None:
    f = home / "t2iedit-server" / "state.json"
    return json.loads(f.read_text()) if f.exists() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.5)
    return False


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "probe.py").write_text(STAGE)
    (tmp_path / "params.yaml").write_text("runner: {kind: thread}\n")
    yield tmp_path
    st = _state(tmp_path / "home")  # never leave a server behind, whatever failed
    if st and _alive(st["pid"]):
        os.kill(st["pid"], signal.SIGKILL)


def test_stages_share_one_server_leased_while_running_stopped_when_idle(workdir):
    home = workdir / "home"
    idle = 20.0  # > the probe stage's start-up (Prefect import, ~3 s quiet) with a margin for a loaded machine
    env = _env(home, T2IEDIT_PREFECT_SERVER_IDLE=str(idle))
    first = _stage(workdir, env)
    st = _state(home)
    assert st is not None and first == st["url"], (first, st)

    # the next stage reuses it and holds a lease while it runs, past the idle time
    proc = subprocess.Popen([sys.executable, str(workdir / "probe.py"), "600"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("API ") and line.split()[1] == first, (line, first)
        assert _state(home)["pid"] == st["pid"], "the second stage started its own server"
        assert (home / "t2iedit-server" / "leases" / str(proc.pid)).exists()
        time.sleep(idle + 5)
        assert _alive(st["pid"]), "the server stopped while a stage held its lease"
    finally:
        proc.kill()  # killed mid-run: its lease stays behind, with a dead pid
        proc.wait()
    assert _wait_dead(st["pid"], idle + 60), "a killed stage's lease kept the server alive"
    assert _state(home) is None
    assert not list((home / "t2iedit-server" / "leases").iterdir())


def test_killed_server_is_replaced_by_the_next_stage(workdir):
    home = workdir / "home"
    env = _env(home, T2IEDIT_PREFECT_SERVER_IDLE="60")
    first = _stage(workdir, env)
    old = _state(home)
    os.kill(old["pid"], signal.SIGKILL)  # the server dies between two stages; its state file stays
    assert _wait_dead(old["pid"], 10) and _state(home) == old
    second = _stage(workdir, env)
    new = _state(home)
    assert new["pid"] != old["pid"] and second == new["url"] != first


def test_ephemeral_mode_leaves_it_unused_and_a_bad_mode_fails(workdir):
    home = workdir / "home"
    url = _stage(workdir, _env(home, T2IEDIT_PREFECT_SERVER="ephemeral"))
    assert url and not (home / "t2iedit-server" / "state.json").exists()
    bad = subprocess.run([sys.executable, str(workdir / "probe.py")], cwd=workdir, capture_output=True,
                         text=True, env=_env(home, T2IEDIT_PREFECT_SERVER="sharde"), timeout=120)
    assert bad.returncode != 0 and "T2IEDIT_PREFECT_SERVER='sharde'" in bad.stderr
