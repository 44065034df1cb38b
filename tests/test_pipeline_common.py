"""The caching contract (tasks/fingerprints.py, tasks/stamps.py) and the flow helpers (flows/stage.py,
flows/reporting.py), without a server."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.reporting import artifact_key, markdown_table
from flows.stage import RunnerParams, StageParams, load_params, load_runner, make_task_runner
from t2iedit.storage import write_json, write_text
from tasks.fingerprints import code_sha256, fingerprint, item_fingerprint
from tasks.stamps import (StampCache, finish, is_done, outputs_valid, prune, run_once, stamp_for,
                          stamp_problem, write_stamp)


class AlphaParams(StageParams):
    alpha: float
    steps: int = 10


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A scratch folder with a library module ``fakelib`` importable by name, as cwd."""
    lib = tmp_path / "fakelib"
    lib.mkdir()
    (lib / "__init__.py").write_text("")
    (lib / "math.py").write_text("def f(x):\n    return 2 * x\n")
    (tmp_path / "input.txt").write_text("a\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.bin").write_bytes(b"xx")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [m for m in sys.modules if m == "fakelib" or m.startswith("fakelib.")]:
        del sys.modules[name]


def _fp(params=AlphaParams(alpha=1.0e-1), inputs=("input.txt", "folder"), code=("fakelib.math",)):
    return fingerprint("values", params=params, inputs=inputs, code=code)


def test_fingerprint_is_stable_and_independent_of_unrelated_changes(workdir):
    base = _fp()
    assert base == _fp()
    # unrelated: another module's source, another file, mtimes, the order of listed modules
    (workdir / "fakelib" / "other.py").write_text("y = 1\n")
    (workdir / "unrelated.txt").write_text("zzz")
    (workdir / "input.txt").touch()
    assert _fp() == base
    assert fingerprint("values", AlphaParams(alpha=0.1), ["input.txt", "folder"], ["fakelib.math"]) == base
    assert _fp(params={"a": AlphaParams(alpha=0.1)}) == _fp(params={"a": {"alpha": 0.1, "steps": 10}})


@pytest.mark.parametrize("change", ["params", "input_file", "input_folder", "code", "stage"])
def test_fingerprint_changes_with_params_inputs_code(workdir, change):
    base = _fp()
    if change == "params":
        assert _fp(params=AlphaParams(alpha=0.2)) != base
        return
    if change == "input_file":
        (workdir / "input.txt").write_text("b\n")
    elif change == "input_folder":
        (workdir / "folder" / "new.bin").write_bytes(b"")
    elif change == "code":
        (workdir / "fakelib" / "math.py").write_text("def f(x):\n    return 3 * x\n")
    elif change == "stage":
        assert fingerprint("edit", AlphaParams(alpha=0.1), ["input.txt", "folder"], ["fakelib.math"]) != base
        return
    assert _fp() != base


def test_code_hash_covers_whole_packages_and_rejects_unknown_modules(workdir):
    pkg = code_sha256(["fakelib"])
    (workdir / "fakelib" / "deep.py").write_text("z = 2\n")
    assert code_sha256(["fakelib"]) != pkg
    with pytest.raises(ModuleNotFoundError):
        code_sha256(["fakelib.nope"])


def test_missing_input_fails_clearly(workdir):
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        fingerprint("x", inputs=["missing.parquet"])


def test_item_fingerprints_differ_per_item_and_stage():
    assert item_fingerprint("a", 1) != item_fingerprint("a", 2)
    assert item_fingerprint("a", 1) != item_fingerprint("b", 1)
    assert item_fingerprint("a", {"batch": 1}) == item_fingerprint("a", {"batch": 1})


def test_stamp_detects_deleted_modified_and_foreign_outputs(tmp_path):
    out = tmp_path / "stats"
    out.mkdir()
    write_text(out / "m.safetensors", "w")
    write_json(out / "sub" / "n.json", {"n": 1})
    stamp = finish(out, "fp1") / "_dir.stamp"
    assert stamp == stamp_for(out) and stamp.is_file()
    assert outputs_valid(stamp, "fp1") and is_done(out, "fp1")
    assert not outputs_valid(stamp, "fp2")
    assert "another fingerprint" in stamp_problem(stamp, "fp2")

    (out / "sub" / "n.json").write_text('{"n": 2}')
    assert "modified" in stamp_problem(stamp, "fp1")
    finish(out, "fp1")
    assert is_done(out, "fp1")
    (out / "m.safetensors").unlink()
    assert "missing" in stamp_problem(stamp, "fp1")
    stamp.unlink()
    assert "no stamp" in stamp_problem(stamp, "fp1")


def test_file_stamp_lives_beside_and_covers_sidecars(tmp_path):
    out, side = tmp_path / "d.safetensors", tmp_path / "d.safetensors.json"
    assert stamp_for(out) == tmp_path / "d.safetensors.stamp"
    out.write_bytes(b"t")
    side.write_text("{}")
    finish(out, "fp", also=[side])
    assert is_done(out, "fp")
    side.write_text('{"changed": 1}')
    assert not is_done(out, "fp")
    with pytest.raises(FileNotFoundError):
        write_stamp(tmp_path / "s.stamp", "fp", [tmp_path / "never-written"])


def test_run_once_computes_once_and_recomputes_stale(tmp_path):
    calls = []

    def produce(p: Path):
        calls.append(p)
        write_text(p, f"run {len(calls)}")

    out = tmp_path / "a.txt"
    assert run_once(out, "fp1", produce) == out and len(calls) == 1
    run_once(out, "fp1", produce)
    assert len(calls) == 1
    run_once(out, "fp2", produce)  # new fingerprint: recompute
    assert len(calls) == 2
    out.unlink()  # DVC removed the output
    run_once(out, "fp2", produce)
    assert len(calls) == 3 and out.read_text() == "run 3"


def test_run_once_failure_leaves_no_valid_stamp(tmp_path):
    out = tmp_path / "a.txt"
    run_once(out, "fp1", lambda p: write_text(p, "old"))

    def boom(p):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_once(out, "fp2", boom)
    assert not is_done(out, "fp1") and not is_done(out, "fp2")


def test_prune_removes_outputs_of_older_runs(tmp_path):
    keep = []
    for i in range(3):
        p = tmp_path / f"b{i}.png"
        run_once(p, f"fp{i}", lambda q: q.write_bytes(b"png"))
        keep.append(p)
    (tmp_path / "b0.png.json").write_text("{}")
    (tmp_path / "b9.png").write_bytes(b"old")
    (tmp_path / "b9.png.stamp").write_text("{}")
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "g.png").write_bytes(b"g")
    removed = prune(tmp_path, keep=[*keep[:2], tmp_path / "grid"])
    assert sorted(p.name for p in removed) == ["b2.png", "b2.png.stamp", "b9.png", "b9.png.stamp"]
    assert (tmp_path / "grid" / "g.png").is_file() and (tmp_path / "b0.png.json").is_file()
    assert all(is_done(p, f"fp{i}") for i, p in enumerate(keep[:2]))


def test_stamp_cache_key_only_while_outputs_valid(tmp_path):
    class Ctx:  # the part of TaskRunContext the policy reads
        class task:
            @staticmethod
            def fn():
                pass

    policy = StampCache()
    out = tmp_path / "a.txt"
    inputs = {"out": out, "fingerprint": "fp", "model": object()}
    assert policy.compute_key(Ctx, inputs, {}) is None
    run_once(out, "fp", lambda p: write_text(p, "x"))
    key = policy.compute_key(Ctx, inputs, {})
    assert key and key == policy.compute_key(Ctx, {**inputs, "model": object()}, {})
    assert policy.compute_key(Ctx, {**inputs, "fingerprint": "fp2"}, {}) is None
    out.write_text("edited")
    assert policy.compute_key(Ctx, inputs, {}) is None
    with pytest.raises(TypeError, match="fingerprint"):
        policy.compute_key(Ctx, {"out": out}, {})


def test_load_params_validates_sections(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(textwrap.dedent("""\
        values:
          alpha: 1.0e-1
        bad:
          alpha: 1.0
          typo: 3
        runner:
          kind: dask
          n_workers: 2
        """))
    vals = load_params("values", AlphaParams, p)
    assert vals == AlphaParams(alpha=0.1, steps=10)
    with pytest.raises(ValidationError):
        vals.alpha = 2.0  # frozen
    with pytest.raises(ValidationError, match="typo"):
        load_params("bad", AlphaParams, p)
    with pytest.raises(KeyError, match="missing"):
        load_params("missing", AlphaParams, p)
    assert load_runner(p) == RunnerParams(kind="dask", n_workers=2)


def test_task_runner_factory():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert isinstance(make_task_runner(RunnerParams()), ThreadPoolTaskRunner)
    dask = make_task_runner(RunnerParams(kind="dask", n_workers=3))
    assert isinstance(dask, DaskTaskRunner) and dask.cluster_kwargs["n_workers"] == 3
    assert make_task_runner(RunnerParams(kind="dask", address="tcp://h:8786")).address == "tcp://h:8786"
    with pytest.raises(ValidationError):
        RunnerParams(kind="ray")


def test_artifact_key_and_markdown_table():
    assert artifact_key("Metrics Table (CAKE)_v1") == "metrics-table-cake-v1"
    md = markdown_table([{"method": "ours", "score": 0.12345}, {"method": "time", "score": 1}])
    assert md.splitlines() == ["| method | score |", "|---|---|", "| ours | 0.1235 |", "| time | 1 |"]
