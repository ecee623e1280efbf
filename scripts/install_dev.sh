#!/usr/bin/env bash
# Install sam2rt with everything a CPU machine needs to run the whole test suite.
# torch/torchvision are pinned to the builds this workplace serves from local disk; the official
# `sam2` package is built without its optional CUDA extension (SAM2_BUILD_CUDA=0).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
SAM2_BUILD_CUDA=0 python -m pip install -q --no-build-isolation "sam2==1.1.0"
python -m pip install -q -e ".[dev]"
# One OpenCV: sam2rt depends on opencv-python-headless, inference-sdk (a test dependency) on opencv-python.
# Both install the same `cv2` package, file over file, so `import cv2` would load a mix of whichever wrote
# last. Keep the headless build: remove the others, then reinstall it so that its files are whole again.
python -m pip uninstall -q -y opencv-python opencv-contrib-python opencv-contrib-python-headless 2>/dev/null || true
headless=$(python -c 'from importlib.metadata import version; print(version("opencv-python-headless"))')
python -m pip install -q --force-reinstall --no-deps "opencv-python-headless==$headless"
