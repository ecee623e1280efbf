"""Preprocessing on the CPU: the numpy path against the package's preprocess.onnx (block-banded resize) on ONNX
Runtime's CPU provider, side by side at several image sizes, with the largest difference between the two.

    python benchmarks/preprocess_forms.py [--threads 1 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = ((512, 512), (480, 640), (1080, 1920), (2160, 3840))


def _median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=9)
    args = p.parse_args(argv)

    import onnxruntime as ort

    from sam2rt.runtime.backends.onnxruntime_backend import session_options
    from sam2rt.runtime.backends.ort_pipeline import OrtPipeline
    from sam2rt.runtime.preprocess import preprocess

    print(f"{platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, median of {args.runs} runs")
    print("| threads | image | numpy ms | preprocess.onnx ms | numpy / graph | max difference |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for threads in args.threads:
        pipeline = OrtPipeline(ort, ["CPUExecutionProvider"], "cpu", 0,
                               lambda t=threads: session_options(t, False, mem_pattern=False))
        for h, w in SIZES:
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            graph = _median_ms(lambda p=pipeline, x=img: p.preprocess_to_host(x, 1024), args.runs)
            host = _median_ms(lambda x=img: preprocess(x, 1024), args.runs)
            diff = float(np.abs(pipeline.preprocess_to_host(img, 1024) - preprocess(img, 1024)).max())
            print(f"| {threads} | {w}x{h} | {host:.1f} | {graph:.1f} | {host / graph:.2f} | {diff:.1e} |")
        pipeline.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
