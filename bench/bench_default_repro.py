"""Wall time of the default `dvc repro` as a new user runs it (issue 17 item 4: ≤ 5 min on 2 cores,
Prefect's start-up included), in a fresh copy of the working tree with an empty DVC cache.

Each stage is timed from DVC's "Running stage" line to the next one (so a stage's time includes its
process start, imports and its own ephemeral Prefect server, unless ``--prefect-url`` points every
stage at one running server); ``startup_s`` is the part before the stage's flow run began. The
machine's load average is recorded beside: on a shared machine the times are upper bounds.

Run: ``python bench/bench_default_repro.py [--keep DIR] [--prefect-url URL]`` →
bench/results/default_repro.json (then ``T2IEDIT_DEFAULT_RUN=DIR pytest -m slow tests/test_default_run.py``
checks that copy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "default_repro.json"
sys.path.insert(0, str(ROOT / "tests"))


def run(dst: Path, prefect_url: str | None) -> dict:
    from test_pipeline_dvc import copy_worktree

    copy_worktree(dst)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    env.pop("PREFECT_API_URL", None)
    if prefect_url:
        env["PREFECT_API_URL"] = prefect_url
    stages: list[dict] = []
    load0 = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro"], cwd=dst, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    log = []
    for line in proc.stdout:
        now = time.perf_counter() - start
        log.append(line)
        m = re.match(r"Running stage '([^']+)'", line)
        if m:
            if stages:
                stages[-1]["end_s"] = now
            stages.append({"stage": m.group(1), "start_s": now})
        elif stages and "Beginning flow run" in line and "flow_start_s" not in stages[-1]:
            stages[-1]["flow_start_s"] = now
    rc = proc.wait()
    total = time.perf_counter() - start
    if stages:
        stages[-1]["end_s"] = total
    for s in stages:
        s["seconds"] = round(s["end_s"] - s["start_s"], 1)
        s["startup_s"] = round(s.get("flow_start_s", s["end_s"]) - s["start_s"], 1)
    (dst / "bench-repro.log").write_text("".join(log))
    return {"returncode": rc, "total_s": round(total, 1), "stages": stages,
            "startup_total_s": round(sum(s["startup_s"] for s in stages), 1),
            "prefect": ("one server: " + prefect_url if prefect_url else
                        "an ephemeral server per stage" if os.environ.get("T2IEDIT_PREFECT_SERVER") == "ephemeral"
                        else "the stages' shared local server (flows/shared_server.py)"),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
            "loadavg_before": load0, "loadavg_after": os.getloadavg(),
            "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="reproduce in this (new) folder and keep it")
    ap.add_argument("--prefect-url", help="PREFECT_API_URL of a running server for every stage")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    dst = args.keep or Path(tempfile.mkdtemp(prefix="t2iedit-repro-")) / "repo"
    try:
        res = run(dst, args.prefect_url)
    finally:
        if not args.keep:
            shutil.rmtree(dst.parent, ignore_errors=True)
    from t2iedit.storage import write_json

    write_json(args.out, res)
    print(json.dumps({k: v for k, v in res.items() if k != "stages"}, indent=1))
    for s in res["stages"]:
        print(f"{s['stage']:<18} {s['seconds']:>7.1f} s  (start-up {s['startup_s']:.1f} s)")


if __name__ == "__main__":
    main()
