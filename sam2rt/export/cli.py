"""`sam2rt export`: a SAM 2 checkpoint to a model directory of ONNX graphs (sam2rt.export.onnx_export).

Importing this module is light (no torch): `add_arguments` runs whenever `sam2rt export` is parsed, and
torch is imported by `run` only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..graph_table import parse_targets
from ..model_specs import ACCEPTED_MODEL_NAMES, VERSIONS


def _targets(text: str) -> tuple[str, ...]:
    try:
        return parse_targets(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=ACCEPTED_MODEL_NAMES, required=True,
                   help="SAM 2 variant (hiera_b_plus is another spelling of hiera_base_plus)")
    p.add_argument("--version", choices=VERSIONS, default="2.1", help="SAM release (default 2.1)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="official SAM 2 checkpoint (.pt) to export")
    src.add_argument(
        "--random-weights", type=int, metavar="SEED",
        help="use seeded random weights (tests/benchmarks only; the manifest records it)",
    )
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--target", type=_targets, default=None, metavar="{cpu,cuda,tensorrt,all}",
                   help="write only the graphs these backends run: cpu (onnxruntime-cpu), cuda (onnxruntime-cuda and "
                        "-tensorrt), tensorrt (what `sam2rt build-engine` builds engines from), all, or several "
                        "(cpu,tensorrt); the video graphs go with every target. Default: what the runtime installed "
                        "here can use (cuda where onnxruntime has its CUDA provider, else cpu; tensorrt too where "
                        "the tensorrt package imports)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--int8", action="store_true",
                   help="also write the opt-in INT8 (reduced precision) encoder, used only with precision='int8'")
    p.add_argument("--no-optimize", action="store_true", help="skip the ORT-optimised graph copies")
    p.add_argument("--no-fp16", action="store_true",
                   help="skip encoder.fused.fp16.onnx, the encoder of onnxruntime-cuda:fp16 (reduced precision, GPU only)")


def run(args: argparse.Namespace) -> int:
    from ..model_specs import get_spec
    from .onnx_export import DEFAULT_OPSET, export_model

    spec = get_spec(args.model, args.version)
    if args.random_weights is not None:
        print(f"WARNING: exporting {spec.model_id} with RANDOM weights (seed {args.random_weights}); "
              "its masks are meaningless. Use --checkpoint for a trained model.", file=sys.stderr)
    t0 = time.perf_counter()
    manifest = export_model(
        spec, args.out, checkpoint=args.checkpoint, random_seed=args.random_weights,
        opset=args.opset or DEFAULT_OPSET, progress=not args.quiet,
        optimize=not args.no_optimize, int8=args.int8, fp16=not args.no_fp16, targets=args.target,
    )
    worst = max(manifest.data["verification"]["max_abs_diff"].values())
    written = manifest.data["export"]["written"]
    size = sum((manifest.directory / f).stat().st_size for f in written) / 1e6
    print(f"exported {spec.model_id} to {args.out} in {time.perf_counter() - t0:.1f} s "
          f"(weights: {manifest.describe_weights()}; largest ONNX-vs-PyTorch difference {worst:.2g})")
    print(f"--target {','.join(manifest.targets or ())}: {len(written)} graphs, {size:.0f} MB "
          f"({', '.join(written)})")
    return 0
