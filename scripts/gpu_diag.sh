#!/usr/bin/env bash
# One-off diagnosis of CUDA-graph replays on the GPU machine (see gpu_diag_graphs.py).
set -uo pipefail
cd "$(dirname "$0")/.."
W=/tmp/sam2rt-diag; mkdir -p $W
export PYTHONUNBUFFERED=1
timeout 90 python3 -m sam2rt export --model hiera_tiny --random-weights 0 --out $W/tiny --quiet --no-fp16 2>&1 | tail -2
timeout 120 python3 scripts/gpu_diag_graphs.py $W/tiny 2>&1 | grep -v "RANDOM\|onnxruntime:" | tee ${OUT:-/tmp}/diag.log
