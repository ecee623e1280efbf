"""`sam2rt bench`: benchmark a model directory against the PyTorch reference (a thin command over harness.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `sam2rt bench` (light: imports nothing heavy)."""
    p.add_argument("--model-dir", type=Path, required=True, help="an exported model directory (sam2rt export)")
    p.add_argument("--backend", default="onnxruntime-cpu", help="sam2rt backend to measure (default onnxruntime-cpu)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per case (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs per case (default 2)")
    p.add_argument("--quick", action="store_true", help="a short smoke run: 2 runs, 1 warm-up, batches up to 16")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="where to write STEM.json / STEM.md / PNGs (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None, help="threads for sam2rt and torch (default: usable CPUs)")
    p.add_argument("--label", default=None, help="machine label used in file names (default: CPU model + CPUs)")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference (no ratios)")
    p.add_argument("--no-subprocess", action="store_true", help="skip cold start / peak RSS (fresh processes)")
    p.add_argument("--no-int8", action="store_true", help="skip the opt-in INT8 encoder even if the export has one")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--video", action="store_true",
                   help="video tracking instead: per-frame latency (frames 8-40, 1 and 3 objects) beside "
                        "SAM2VideoPredictor, RSS over 300 frames (reference: 60); see sam2rt.bench.video")


def run(args: argparse.Namespace) -> int:
    if args.video:
        import json
        import os

        from .video import run_video_benchmark

        threads = args.threads or len(os.sched_getaffinity(0))
        quick = dict(last=10, first=8, objects=(1,), rss_frames=60, ref_rss_frames=20) if args.quick else {}
        res = run_video_benchmark(args.model_dir, args.out, threads, reference=not args.no_reference,
                                  label=args.label, backend=args.backend, **quick)
        print(json.dumps(res, indent=2))
        return 0
    from .harness import BenchConfig, run_benchmark, write_outputs

    cfg = BenchConfig(
        model_dir=args.model_dir, backend=args.backend, runs=args.runs, warmup=args.warmup, quick=args.quick,
        out=args.out, threads=args.threads, reference=not args.no_reference, subprocesses=not args.no_subprocess,
        int8=not args.no_int8, flops=not args.no_flops, label=args.label, progress=not args.no_progress,
    )
    result = run_benchmark(cfg)
    paths = write_outputs(result, args.out)
    from .report import results_table, targets_table

    print(results_table(result))
    if result.get("targets"):
        print()
        print(targets_table(result))
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}", file=sys.stderr)
    return 0
