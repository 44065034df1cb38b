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
    assert r["toy"] is True and r["device"] == "cpu"
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
