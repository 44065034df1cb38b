"""bench/bench_gpu.py at toy scale on the CPU (issue 16 item 6): every part runs and records both sides."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from t2iedit.storage import read_json

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"


@pytest.mark.usefixtures("one_thread")
def test_bench_gpu_toy_scale_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "gpu.json"
    mod.main(["--toy", "--out", str(out)])
    r = read_json(out)
    assert r["toy"] is True and r["device"] == "cpu" and r["finished"] is True
    g = r["generation"]
    assert g["naive_float32"]["images"] == 2 and g["naive_float32"]["images_per_s"] > 0
    f32 = [x for x in g["runs"] if x["dtype"] == "float32"]
    assert [x["batch"] for x in f32] == [1, 2]
    # batched generation gives the naive per-prompt loop's images (same initial noise per seed)
    assert all(x["max_abs_diff_vs_naive"] <= 1 for x in f32)
    assert any("skipped" in x for x in g["runs"] if x["dtype"] == "float16")  # the CPU stays float32
    v = r["values"]
    assert v["edits"] == 4 and v["batched_s"] > 0 and v["per_edit_s_extrapolated"] > 0
    st = r["statistics"]
    assert st["tokens"] > st["captions"] and st["tokens_per_s"] > 0


def test_bench_gpu_keeps_finished_parts_when_a_later_one_stops(tmp_path, monkeypatch):
    """On the device a run can be stopped at its time limit: the JSON written after each part keeps
    what was measured (``finished`` false); an unknown part is refused before any work."""
    spec = importlib.util.spec_from_file_location("bench_gpu_partial", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit):
        mod.main(["--toy", "--out", str(out), "--parts", "statistics,generaton"])
    assert not out.exists()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # what a kill at the limit looks like from inside

    monkeypatch.setattr(mod, "bench_values", stopped)
    with pytest.raises(KeyboardInterrupt):
        mod.main(["--toy", "--out", str(out), "--parts", "statistics,values"])
    r = read_json(out)
    assert r["finished"] is False and r["statistics"]["tokens_per_s"] > 0 and "values" not in r


def test_device_script_runs_the_bench_and_leaves_its_files_under_out(tmp_path):
    """bench/gpu_device.sh, the one command a lent GPU machine runs, at toy scale on the CPU: it finds
    no carried wheels here (.whl/ is for the device), runs the bench and leaves gpu.json and the log
    under $OUT."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "BENCH_ARGS": "--toy", "BENCH_PARTS": "statistics",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3 = this venv's
    proc = subprocess.run(["bash", str(BENCH.parent / "gpu_device.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = read_json(out / "gpu.json")
    assert r["finished"] is True and r["statistics"]["tokens"] > 0 and "generation" not in r
    assert "tokens_per_s" in (out / "gpu.log").read_text()
