"""The host's part of staging an upload: an image copied into a page-locked block, on 1..N threads (host_copy.py).

On a GPU the device pipeline uploads each image of 256 KiB and more from a page-locked block (ort_pipeline.py
`pinned_uploads`); gpu_bench.py times the preprocessing with and without it. What can be timed on any machine is
the copy that fills the block: `parallel_copy` into an ordinary array (the same memory traffic; page-locking only
changes what the DMA engine may read), each thread count in turn, interleaved, medians.

    python benchmarks/upload_staging.py [--runs 300]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {  # name -> (shape, source dtype, block dtype)
    "512x512 uint8": ((512, 512, 3), np.uint8, np.uint8),
    "640x480 uint8": ((480, 640, 3), np.uint8, np.uint8),
    "1920x1080 uint8": ((1080, 1920, 3), np.uint8, np.uint8),
    "3840x2160 uint8": ((2160, 3840, 3), np.uint8, np.uint8),
    "1x3x1024x1024 float32 (TensorRT's)": ((1, 3, 1024, 1024), np.float32, np.float32),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=300)
    args = p.parse_args(argv)

    from sam2rt.runtime.host_copy import copy_threads, parallel_copy

    counts = sorted({1, 2, copy_threads()})
    rng = np.random.default_rng(0)
    print(f"{platform.processor() or platform.machine()}, {copy_threads()} copy threads usable; median of {args.runs}")
    print("| array | MB | " + " | ".join(f"{n} thread{'s' * (n > 1)} ms" for n in counts) + " | best speedup |")
    print("| --- | ---: | " + " | ".join("---:" for _ in counts) + " | ---: |")
    for name, (shape, src_dtype, dst_dtype) in CASES.items():
        src = rng.integers(0, 256, shape).astype(src_dtype)
        dst = np.ones(shape, dst_dtype)  # touched once: no first-touch page faults in the timings (a pinned block has none)
        samples: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(args.runs):
            for n in counts:  # interleaved: the machine's drift falls on every count alike
                t0 = time.perf_counter()
                parallel_copy(dst, src, threads=n)
                samples[n].append(time.perf_counter() - t0)
        assert np.array_equal(dst, src)
        med = {n: 1e3 * float(np.median(s)) for n, s in samples.items()}
        print(f"| {name} | {src.nbytes / 1e6:.1f} | " + " | ".join(f"{med[n]:.3f}" for n in counts)
              + f" | {med[1] / min(med.values()):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
