"""The `sam2rt` command line: one table of commands, each a module with `add_arguments(parser)` and `run(args) -> int`.

A command's module is imported only when that command is on the command line (`sam2rt --help` imports
none), and its `add_arguments` must stay light: heavy imports (torch, onnxruntime, TensorRT, the server)
belong in `run`. A command whose module cannot be imported (an extra that is not installed) still shows
in `sam2rt --help` and fails with one clear line. Errors rooted in Sam2rtError exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from . import __version__
from .errors import Sam2rtError

# name -> (module, help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("sam2rt.export.cli", "export a SAM 2 checkpoint to ONNX"),
    "segment": ("sam2rt.segment_cli", "segment an image with point/box prompts"),
    "info": ("sam2rt.info_cli", "show available backends and versions"),
    "build-engine": ("sam2rt.export.tensorrt_build", "build TensorRT engines from an exported model directory"),
    "bench": ("sam2rt.bench.cli", "benchmark a model directory against the PyTorch reference"),
    "serve": ("sam2rt.serve.cli", "run the Roboflow-compatible SAM 2 HTTP server"),
    "verify": ("sam2rt.verify", "compare an exported model directory with the official model from its checkpoint"),
    "track": ("sam2rt.track_cli", "track prompted objects through a video file or camera (SAM 2 memory)"),
}


# --- argument types shared by commands (segment, track) ---------------------------------
def parse_point(text: str) -> tuple[float, float, int]:
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--point expects X,Y or X,Y,LABEL, got {text!r}")
    try:
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"--point expects numbers X,Y[,LABEL], got {text!r}") from None
    return x, y, label


def parse_box(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--box expects numbers X0,Y0,X1,Y1, got {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--box expects X0,Y0,X1,Y1, got {text!r}")
    return values  # type: ignore[return-value]


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The command named on a command line (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: every command is listed, only the one `argv` names imports its module and adds
    its arguments. Without argv, every command's module is imported (for tests and documentation tools)."""
    parser = argparse.ArgumentParser(prog="sam2rt", description="Optimized SAM 2 inference: export, segment, serve.")
    parser.add_argument("--version", action="version", version=f"sam2rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = None if argv is None else _chosen_command(argv)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv is not None and name != chosen:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError:
            p.set_defaults(_run=None, _module=module)
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    try:
        if args._run is None:  # its module is missing: its arguments are unknown, and beside the point
            raise Sam2rtError(f"`sam2rt {args.command}` is not available: module {args._module} is missing or "
                              "its extra is not installed")
        if unknown:
            parser.parse_args(argv)  # argparse's own error for them (exit status 2)
        return int(args._run(args) or 0)
    except Sam2rtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
