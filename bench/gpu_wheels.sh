#!/usr/bin/env bash
# Here (with network to the package registry), before a device run of bench/gpu_device.sh: the wheels the
# lent GPU machine lacks, into .whl/ (git-ignored; the `device` tool's `carry: [".whl"]` takes it along).
# That machine's image (/work/.library/device/KINDS.md, 2026-11) has Python 3.12, torch, transformers,
# huggingface_hub, safetensors, accelerate, pandas, pyarrow, scipy — everything bench/bench_gpu.py imports
# except diffusers (checked: the toy bench runs under Python 3.12 with transformers 5.17.0 and
# huggingface_hub 1.33.0, that image's versions, and diffusers 0.42.1). Nothing can be fetched there.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${DIFFUSERS_VERSION:-0.42.1}"  # the version this project's tests ran with
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "diffusers==${version}"
ls -l .whl
