"""The `sam2rt` command line: export, segment, info (and the commands later modules register)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import Sam2rtError
from .models import ACCEPTED_MODEL_NAMES, VERSIONS

# Subcommands contributed by other modules: name -> (module path, help). Each module defines
# `add_arguments(parser)` and `run(args) -> int`; they are imported only when used.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "build-engine": ("sam2rt.export.tensorrt_build", "build TensorRT engines from an exported model directory"),
    "bench": ("sam2rt.bench.cli", "benchmark a model directory against the PyTorch reference"),
    "serve": ("sam2rt.serve.cli", "run the Roboflow-compatible SAM 2 HTTP server"),
    "verify": ("sam2rt.verify", "compare an exported model directory with the official model from its checkpoint"),
    "track": ("sam2rt.track_cli", "track prompted objects through a video file or camera (SAM 2 memory)"),
}


def _parse_point(text: str) -> tuple[float, float, int]:
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--point expects X,Y or X,Y,LABEL, got {text!r}")
    try:
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"--point expects numbers X,Y[,LABEL], got {text!r}") from None
    return x, y, label


def _parse_box(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--box expects numbers X0,Y0,X1,Y1, got {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--box expects X0,Y0,X1,Y1, got {text!r}")
    return values  # type: ignore[return-value]


# --- export ----------------------------------------------------------------------------
def _add_export(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--int8", action="store_true",
                   help="also write the opt-in INT8 (reduced precision) encoder, used only with precision='int8'")
    p.add_argument("--no-optimize", action="store_true", help="skip the ORT-optimised graph copies")
    p.add_argument("--no-fp16", action="store_true",
                   help="skip encoder.fused.fp16.onnx, the encoder of onnxruntime-cuda:fp16 (reduced precision, GPU only)")


def _run_export(args: argparse.Namespace) -> int:
    from .export import DEFAULT_OPSET, export_model
    from .models import get_spec

    spec = get_spec(args.model, args.version)
    if args.random_weights is not None:
        print(f"WARNING: exporting {spec.model_id} with RANDOM weights (seed {args.random_weights}); "
              "its masks are meaningless. Use --checkpoint for a trained model.", file=sys.stderr)
    t0 = time.perf_counter()
    manifest = export_model(
        spec, args.out, checkpoint=args.checkpoint, random_seed=args.random_weights,
        opset=args.opset or DEFAULT_OPSET, progress=not args.quiet,
        optimize=not getattr(args, "no_optimize", False), int8=getattr(args, "int8", False),
        fp16=not getattr(args, "no_fp16", False),
    )
    worst = max(manifest.data["verification"]["max_abs_diff"].values())
    print(f"exported {spec.model_id} to {args.out} in {time.perf_counter() - t0:.1f} s "
          f"(weights: {manifest.describe_weights()}; largest ONNX-vs-PyTorch difference {worst:.2g})")
    return 0


# --- segment ---------------------------------------------------------------------------
def _add_segment(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--point", type=_parse_point, action="append", default=[], metavar="X,Y[,LABEL]",
                   help="a point prompt in pixels; LABEL 1 foreground (default) or 0 background; repeatable")
    p.add_argument("--box", type=_parse_box, action="append", default=[], metavar="X0,Y0,X1,Y1",
                   help="a box prompt in pixels; several boxes segment several objects")
    p.add_argument("--out", type=Path, help="write an annotated PNG here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime-cpu, onnxruntime-cuda, tensorrt, ...")
    p.add_argument("--single-mask", action="store_true", help="multimask_output=False")


def _run_segment(args: argparse.Namespace) -> int:
    import numpy as np

    from .annotate import annotate, read_image, write_image
    from .runtime import Prompt, Sam2Model

    if not args.point and not args.box:
        raise Sam2rtError("give at least one --point X,Y[,LABEL] or --box X0,Y0,X1,Y1")
    pts = np.array([p[:2] for p in args.point], dtype=np.float64).reshape(-1, 2)
    labels = np.array([p[2] for p in args.point], dtype=np.float64)
    if args.box:
        prompts = [Prompt(pts if len(pts) else None, labels if len(pts) else None, np.array(b)) for b in args.box]
    else:
        prompts = [Prompt(pts, labels)]
    t0 = time.perf_counter()
    model = Sam2Model.from_dir(args.model_dir, backend=args.backend)
    t_load = time.perf_counter() - t0
    image = read_image(args.image)
    Sam2Model.check_prompts(prompts, image.shape[:2])  # a bad prompt fails here, not after the encoder
    t0 = time.perf_counter()
    emb = model.embed(image)
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = model.decode(emb, prompts, multimask_output=not args.single_mask).best()
    t_decode = time.perf_counter() - t0
    masks = result.masks[:, 0]
    timings = {"load_s": t_load, "embed_s": t_embed, "decode_s": t_decode}
    weights = model.manifest.describe_weights()
    if args.out:
        write_image(args.out, annotate(image, masks, points=args.point, boxes=args.box,
                                       random_weights=model.manifest.random_weights))
    if args.json:
        print(json.dumps({
            "model": model.manifest.model["model_id"], "weights": weights, "backend": model.backend_name,
            "image_size": list(emb.original_size), "timings": timings,
            "objects": [{"score": float(s), "area": int(m.sum())} for s, m in zip(result.scores[:, 0], masks)],
            "annotated": str(args.out) if args.out else None,
        }, indent=2))
    else:
        print(f"model {model.manifest.model['model_id']} on {model.backend_name}; weights: {weights}")
        print(f"load {t_load * 1e3:.0f} ms, embed {t_embed * 1e3:.0f} ms, decode {t_decode * 1e3:.1f} ms "
              f"({len(prompts)} prompt(s))")
        for i, (s, m) in enumerate(zip(result.scores[:, 0], masks)):
            print(f"object {i}: predicted IoU {s:.3f}, {int(m.sum())} pixels")
        if args.out:
            print(f"annotated image written to {args.out}")
    return 0


# --- info ------------------------------------------------------------------------------
def _run_info(args: argparse.Namespace) -> int:
    from importlib import metadata

    from .runtime.backends import available_backends

    versions = {}
    for dist in ("sam2rt", "numpy", "opencv-python-headless", "opencv-python", "onnxruntime", "onnxruntime-gpu",
                 "tensorrt", "cuda-python", "onnx", "torch", "sam2", "fastapi"):
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam2rt", description="Optimized SAM 2 inference: export, segment, serve.")
    parser.add_argument("--version", action="version", version=f"sam2rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    p = sub.add_parser("export", help="export a SAM 2 checkpoint to ONNX")
    _add_export(p)
    handlers["export"] = _run_export
    p = sub.add_parser("segment", help="segment an image with point/box prompts")
    _add_segment(p)
    handlers["segment"] = _run_segment
    p = sub.add_parser("info", help="show available backends and versions")
    p.add_argument("--json", action="store_true")
    handlers["info"] = _run_info
    for name, (module, help_text) in EXTRA_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        try:
            mod = __import__(module, fromlist=["add_arguments"])
        except ImportError:
            p.set_defaults(_missing=module)
            continue
        mod.add_arguments(p)
    parser.set_defaults(_handlers=handlers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in args._handlers:
            return args._handlers[args.command](args)
        if getattr(args, "_missing", None):
            raise Sam2rtError(f"`sam2rt {args.command}` is not available: module {args._missing} is missing or "
                              "its extra is not installed")
        mod = __import__(args._module, fromlist=["run"])
        return int(mod.run(args) or 0)
    except Sam2rtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
