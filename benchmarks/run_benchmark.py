#!/usr/bin/env python
"""Export hiera_tiny (with the opt-in INT8 encoder), wait for a quiet CPU, then run `sam2rt bench` into benchmarks/results.

    python benchmarks/run_benchmark.py                          # RANDOM weights (seed 0), labelled as such
    python benchmarks/run_benchmark.py --checkpoint sam2.1_hiera_tiny.pt
    python benchmarks/run_benchmark.py --quick                  # smoke run
    python benchmarks/run_benchmark.py -- --runs 20             # anything after -- goes to `sam2rt bench`
    python benchmarks/run_benchmark.py --video                  # video tracking (sam2rt bench --video)

Without --checkpoint the video benchmark exports from a seeded random checkpoint whose object-score head
is biased up (export.checkpoint.random_checkpoint): plain random SAM 2.1 weights declare every tracked
object absent, which is not the work a tracker does. The file is marked random and so is the export.

Timing figures need a machine that is otherwise idle: before starting it waits (up to --max-wait
seconds) for the 1-minute load average to drop below --max-load. Interleaving sam2rt with the
reference keeps the ratios fair under residual load; absolute figures still move with it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    t0 = time.time()
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.time() - t0 > max_wait:
            print(f"load average {load:.2f} (waited {time.time() - t0:.0f} s)", file=sys.stderr)
            return load
        print(f"load average {load:.2f} >= {max_load}: waiting for a quiet CPU...", file=sys.stderr)
        time.sleep(20)


def main() -> int:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="official SAM 2.1 hiera_tiny checkpoint (default: random weights)")
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "bench_hiera_tiny")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--max-load", type=float, default=1.0)
    p.add_argument("--max-wait", type=float, default=600.0)
    p.add_argument("--label", default=None)
    p.add_argument("--video", action="store_true", help="the video-tracking benchmark instead")
    args = p.parse_args(argv)
    if args.video and args.model_dir == p.get_default("model_dir"):
        args.model_dir = ROOT / "models" / "bench_video_hiera_tiny"

    if not (args.model_dir / "manifest.json").is_file():
        checkpoint = args.checkpoint
        if checkpoint is None and args.video:
            from sam2rt.export.checkpoint import random_checkpoint
            from sam2rt.model_specs import get_spec

            checkpoint = random_checkpoint(get_spec("hiera_tiny"), 0, args.model_dir.parent / "random_video_hiera_tiny.pt",
                                           object_score_bias=10.0)
        cmd = [sys.executable, "-m", "sam2rt", "export", "--model", "hiera_tiny", "--out", str(args.model_dir)]
        cmd += [] if args.video else ["--int8"]
        cmd += ["--checkpoint", str(checkpoint)] if checkpoint else ["--random-weights", "0"]
        subprocess.run(cmd, check=True)
    wait_for_quiet(args.max_load, args.max_wait)
    cmd = [sys.executable, "-m", "sam2rt", "bench", "--model-dir", str(args.model_dir), "--out", str(args.out)]
    if args.video:
        cmd.append("--video")
    if args.quick:
        cmd.append("--quick")
    if args.label:
        cmd += ["--label", args.label]
    return subprocess.run(cmd + extra).returncode


if __name__ == "__main__":
    sys.exit(main())
