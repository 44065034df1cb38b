"""Flows under Prefect: a killed run resumes, the Dask runner fans out, flows.pipeline chains stages."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow, task

from flows.stage import RunnerParams, make_task_runner

REPO = Path(__file__).resolve().parents[1]

# A toy stage: N items, each its own output + stamp. KILL_AT makes the process SIGKILL itself while
# computing that item (after the items before it were written) — a real kill, no cleanup runs.
TOY = '''
import os, signal
from pathlib import Path

from prefect import flow, task

from t2iedit.storage import write_text
from tasks.fingerprints import fingerprint, item_fingerprint
from tasks.stamps import STAMP_CACHE, run_once


@task(cache_policy=STAMP_CACHE)
def square(out: Path, fingerprint: str, i: int) -> Path:
    def produce(p: Path) -> None:
        with open("computed.log", "a") as f:
            f.write(f"{i}\\n")
        if i == int(os.environ.get("KILL_AT", "-1")):
            os.kill(os.getpid(), signal.SIGKILL)
        write_text(p, str(i * i * int(Path("input.txt").read_text())))
    return run_once(out, fingerprint, produce)


@flow(name="toy")
def toy(n: int = 6):
    fp = fingerprint("toy", {"n": n}, inputs=["input.txt"])
    # sequential on purpose: the kill point is deterministic
    return [square(Path(f"out/{i}.txt"), item_fingerprint(fp, i), i, return_state=True) for i in range(n)]


if __name__ == "__main__":
    toy()
'''


def _computed(folder: Path) -> list[int]:
    log = folder / "computed.log"
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def test_killed_run_resumes_only_unfinished_items(prefect_harness, tmp_path, monkeypatch):
    (tmp_path / "toy_stage.py").write_text(TOY)
    (tmp_path / "input.txt").write_text("1")
    env = {**os.environ, "PREFECT_API_URL": prefect_harness, "KILL_AT": "3",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    killed = subprocess.run([sys.executable, "toy_stage.py"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _computed(tmp_path) == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"{i}.txt{s}" for i in range(3) for s in ("", ".stamp")]  # item 3 left nothing behind

    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("toy_stage", tmp_path / "toy_stage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    states = mod.toy()  # rerun in-process, no kill
    assert _computed(tmp_path) == [0, 1, 2, 3, 3, 4, 5]
    assert all(s.is_completed() for s in states)
    assert [(tmp_path / "out" / f"{i}.txt").read_text() for i in range(6)] == [str(i * i) for i in range(6)]

    # Items 3-5 ran without a cache key (their stamp was invalid when the key was computed): this run
    # finds their stamps valid and returns at once, storing the cache record the next run serves.
    states = mod.toy()
    assert [s.name for s in states] == ["Cached"] * 3 + ["Completed"] * 3
    states = mod.toy()
    assert [s.name for s in states] == ["Cached"] * 6
    assert _computed(tmp_path) == [0, 1, 2, 3, 3, 4, 5]

    (tmp_path / "out" / "4.txt").unlink()  # as DVC does before a rerun
    (tmp_path / "out" / "5.txt").write_text("tampered")
    mod.toy()
    assert _computed(tmp_path)[7:] == [4, 5]
    assert (tmp_path / "out" / "5.txt").read_text() == "25"

    (tmp_path / "input.txt").write_text("2")  # input content changed: every item recomputes
    mod.toy()
    assert sorted(_computed(tmp_path)[9:]) == list(range(6))
    assert (tmp_path / "out" / "5.txt").read_text() == "50"


@task
def _worker_pid(i: int) -> tuple[int, int]:
    import time

    time.sleep(0.3)
    return i * i, os.getpid()


@flow
def _fan_out(n: int) -> list[tuple[int, int]]:
    return [f.result() for f in _worker_pid.map(list(range(n)))]


def test_dask_runner_with_two_local_workers(prefect_harness):
    runner = make_task_runner(RunnerParams(kind="dask", n_workers=2))
    results = _fan_out.with_options(task_runner=runner)(8)
    assert [r for r, _ in results] == [i * i for i in range(8)]
    pids = {pid for _, pid in results}
    assert os.getpid() not in pids  # ran in the cluster's worker processes
    assert len(pids) == 2


@task
def _visible_device(i: int) -> tuple[int, str | None, int]:
    import time

    time.sleep(0.3)
    return i, os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid()


@flow
def _fan_out_devices(n: int) -> list[tuple[int, str | None, int]]:
    return [f.result() for f in _visible_device.map(list(range(n)))]


def test_dask_runner_one_worker_per_gpu(prefect_harness):
    """issue 16 item 7: runner.gpus starts one worker process per device id, each seeing only its own
    GPU through CUDA_VISIBLE_DEVICES (CPU workers here: the variable is what a GPU worker would read)."""
    from flows.stage import gpu_ids

    runner = make_task_runner(RunnerParams(kind="dask", gpus=[0, 1]))
    results = _fan_out_devices.with_options(task_runner=runner)(8)
    assert [i for i, _, _ in results] == list(range(8))
    by_pid: dict[int, set] = {}
    for _, dev, pid in results:
        by_pid.setdefault(pid, set()).add(dev)
    assert os.getpid() not in by_pid and len(by_pid) == 2
    assert sorted(d for devs in by_pid.values() for d in devs) == ["0", "1"]  # one GPU per worker
    assert gpu_ids(3) == [0, 1, 2] and gpu_ids([2, 5]) == [2, 5]
    with pytest.raises(ValueError, match="distinct device ids"):
        gpu_ids([1, 1])
    with pytest.raises(ValueError, match="no GPU is visible"):
        gpu_ids("all")  # this machine has none


def test_pipeline_runs_available_stage_flows_in_order(prefect_harness, monkeypatch, tmp_path):
    import flows.pipeline as pl

    calls = []

    def fake_stage(name):
        @flow(name=name)
        def stage(params_file: str = "params.yaml") -> str:
            calls.append((name, params_file))
            return name
        return stage

    fakes = {mod: fake_stage(name) for name, mod in pl.STAGES[:3]}
    monkeypatch.setattr(pl, "stage_flow", lambda mod: fakes.get(mod))
    (tmp_path / "params.yaml").write_text("runner:\n  kind: thread\n  max_workers: 2\n")
    params = str(tmp_path / "params.yaml")
    out = pl.pipeline(params_file=params)
    assert calls == [(name, params) for name, _ in pl.STAGES[:3]]
    assert out == {name: name for name, _ in pl.STAGES[:3]}
    calls.clear()
    pl.pipeline(params_file=params, only=[pl.STAGES[2][0]])
    assert calls == [(pl.STAGES[2][0], params)]


def test_stage_flow_discovery(tmp_path, monkeypatch):
    import flows.pipeline as pl

    assert pl.stage_flow("flows.no_such_stage_module") is None
    pkg = tmp_path / "fakeflows"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from prefect import flow\n@flow\ndef one():\n    return 1\n")
    (pkg / "two.py").write_text("from prefect import flow\n@flow\ndef a():\n    pass\n@flow\ndef b():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert pl.stage_flow("fakeflows.one").name == "one"
    with pytest.raises(RuntimeError, match="exactly one flow"):
        pl.stage_flow("fakeflows.two")


@pytest.mark.slow
def test_pipeline_chain_on_tiny_preset_then_rerun_reuses_everything(prefect_harness, tmp_path, monkeypatch):
    """`python -m flows.pipeline` in a copy of this working tree: every stage runs; a second run
    recomputes nothing (every output byte-identical, stamps valid) and is much faster."""
    import time

    from test_pipeline_dvc import copy_worktree

    import flows.pipeline as pl
    from t2iedit.storage import file_sha256

    root = copy_worktree(tmp_path / "repo")
    monkeypatch.chdir(root)

    def snapshot() -> dict[str, str]:
        return {str(p.relative_to(root)): file_sha256(p) for p in sorted((root / "data").rglob("*"))
                if p.is_file() and "raw" not in p.relative_to(root / "data").parts[:1]}

    t0 = time.monotonic()
    results = pl.pipeline()
    first = time.monotonic() - t0
    assert set(results) == {name for name, _ in pl.STAGES}
    before = snapshot()
    assert before, "the pipeline wrote no outputs under data/"

    t0 = time.monotonic()
    pl.pipeline()
    second = time.monotonic() - t0
    after = snapshot()
    assert after == before
    assert second < first / 2, f"rerun took {second:.0f} s vs {first:.0f} s: something recomputed"
