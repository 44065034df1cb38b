#!/usr/bin/env bash
# On the lent GPU machine (issue 16 item 6), as one `device` run from the repository root:
#   run(command="bash bench/gpu_device.sh", carry=[".whl"], timeout_s=600)
# after bench/gpu_wheels.sh here. Installs the carried wheels into /tmp/site, records the GPU, runs
# bench/bench_gpu.py (SD-1.4 architecture built there with random weights; it writes its JSON after every
# part, so a run stopped at the limit keeps what it measured) and leaves gpu.json, its log and
# nvidia-smi's line under $OUT. Commit $OUT/gpu.json as bench/results/gpu.json with its table in
# docs/BENCHMARKS.md. Split the parts over two runs with BENCH_PARTS if one run does not fit;
# BENCH_ARGS=--toy runs it at toy scale (how tests/test_bench_gpu.py checks this script on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/bench-gpu-out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.csv" || true
python3 -c "import diffusers, transformers, torch; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout "${BENCH_TIMEOUT_S:-560}" python3 bench/bench_gpu.py --out "$out/gpu.json" \
    --parts "${BENCH_PARTS:-generation,values,statistics}" ${BENCH_ARGS:-} 2>&1 | tee "$out/gpu.log"
