#!/usr/bin/env bash
# Install sam2rt with everything a CPU machine needs to run the whole test suite.
# torch/torchvision are pinned to the builds this workplace serves from local disk; the official
# `sam2` package is built without its optional CUDA extension (SAM2_BUILD_CUDA=0).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
SAM2_BUILD_CUDA=0 python -m pip install -q --no-build-isolation "sam2==1.1.0"
python -m pip install -q -e ".[dev]"
