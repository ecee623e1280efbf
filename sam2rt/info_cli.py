"""`sam2rt info`: the backends available here (or why not) and the versions of what sam2rt uses."""

from __future__ import annotations

import argparse
import json
import sys

# Distributions whose versions `info` reports (those installed).
DISTRIBUTIONS = ("sam2rt", "numpy", "opencv-python-headless", "opencv-python", "onnxruntime", "onnxruntime-gpu",
                 "tensorrt", "cuda-python", "onnx", "torch", "sam2", "fastapi")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from importlib import metadata

    from . import __version__
    from .runtime.backends import available_backends

    versions = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info = {"sam2rt": __version__, "python": sys.version.split()[0], "backends": available_backends(), "versions": versions}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"sam2rt {__version__} (python {info['python']})")
        print("backends:")
        for name, status in info["backends"].items():
            print(f"  {name:22s} {status}")
        print("versions:")
        for k, v in versions.items():
            print(f"  {k:22s} {v}")
    return 0
