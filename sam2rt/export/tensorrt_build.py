"""`sam2rt build-engine`: TensorRT engines from an exported model directory, built on the GPU that will run them.

    sam2rt build-engine --model-dir DIR [--fp16] [--int8 --calib-images DIR] [--workspace MB]
                        [--max-prompts B] [--max-points N]

Writes DIR/encoder.<precision>.engine and DIR/decoder.<precision>.engine and records them in
manifest.json under "engines" -> precision: TensorRT version, GPU name and compute capability,
the decoder's optimisation profiles, which nodes were kept in FP32, build time, and each engine's
sha256 and source-ONNX sha256 (sam2rt.runtime.engines checks all of these before loading).

Precisions:
- fp32 (default): the exported graphs as they are, TF32 off (so results match the ONNX Runtime CPU path).
- --fp16: a mixed-precision copy of each graph (sam2rt.export.fp16: LayerNorm, softmax and the
  attention logits, the positional encoding's sin/cos stay FP32), built as a strongly typed network,
  which TensorRT 10 and 11 both build.
- --int8: the encoder with INT8 implicit quantisation, calibrated by an entropy calibrator over
  --calib-images through the runtime's own preprocessing, with the same sensitive layers pinned to
  FP32 and FP16 elsewhere; the decoder as in --fp16. TensorRT 11 removed calibrators: there --int8
  is refused with an explanation (use TensorRT 10.x, e.g. JetPack 6, or a Q/DQ-quantised graph).

No tensorrt import at module level: argument checks work, and fail clearly, without TensorRT.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import BackendUnavailableError, ExportError, Sam2rtError
from ..graph_table import Profile
from ..manifest import MANIFEST_NAME, Manifest, sha256_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PROMPTS = 32
DEFAULT_MAX_POINTS = 16
DEFAULT_CALIB_MAX = 64


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, required=True, help="a directory written by `sam2rt export`")
    prec = p.add_argument_group("precision (default FP32)")
    prec.add_argument("--fp16", action="store_true", help="FP16 engines; LayerNorm/softmax/attention logits stay FP32")
    prec.add_argument("--int8", action="store_true",
                      help="INT8 encoder calibrated on --calib-images (TensorRT 10.x only), FP16 decoder")
    prec.add_argument("--calib-images", type=Path, metavar="DIR", help="images for INT8 calibration (jpg/png/...)")
    prec.add_argument("--calib-max", type=_positive_int, default=DEFAULT_CALIB_MAX, metavar="N",
                      help=f"use at most N calibration images (default {DEFAULT_CALIB_MAX})")
    prec.add_argument("--tf32", action="store_true", help="allow TF32 in FP32 layers (faster on Ampere+, ~1e-3 less exact)")
    p.add_argument("--workspace", type=_positive_int, metavar="MB", help="builder workspace limit in MiB (default: TensorRT's)")
    p.add_argument("--max-prompts", type=_positive_int, default=DEFAULT_MAX_PROMPTS, metavar="B",
                   help=f"largest prompt batch one decoder run takes (default {DEFAULT_MAX_PROMPTS}; larger batches are split)")
    p.add_argument("--max-points", type=_positive_int, default=DEFAULT_MAX_POINTS, metavar="N",
                   help=f"most points per prompt, padding and box corners included (default {DEFAULT_MAX_POINTS})")
    p.add_argument("--device", type=int, default=0, help="CUDA device to build on (default 0)")
    p.add_argument("--keep-onnx", action="store_true", help="keep the mixed-precision ONNX graphs beside the engines")
    p.add_argument("--verbose", action="store_true", help="TensorRT's INFO log")
    p.add_argument("--quiet", action="store_true", help="no progress output")


# --- argument checks (no TensorRT needed) -----------------------------------------------------------
def precision_of(args: argparse.Namespace) -> str:
    return "int8" if args.int8 else "fp16" if args.fp16 else "fp32"


def calibration_files(directory: Path, limit: int | None = None) -> list[Path]:
    """Image files in `directory` (sorted, at most `limit`), or ExportError saying what is wrong."""
    if not directory.is_dir():
        raise ExportError(f"--calib-images {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ExportError(f"--calib-images {directory} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files[:limit] if limit else files


def check_arguments(args: argparse.Namespace) -> Manifest:
    """Everything that can be checked before TensorRT is imported; returns the model's manifest."""
    if args.int8 and args.calib_images is None:
        raise ExportError("--int8 needs --calib-images DIR: INT8 calibration runs the encoder over real images")
    if args.calib_images is not None and not args.int8:
        raise ExportError("--calib-images is only used with --int8")
    if args.max_points < 2:
        raise ExportError(f"--max-points must be at least 2 (a click plus its padding point, or a box), got {args.max_points}")
    if args.device < 0:
        raise ExportError(f"--device must be >= 0, got {args.device}")
    manifest = Manifest.load(args.model_dir)
    for role in ("encoder", "decoder"):
        manifest.verify_graph(role)
    if args.int8:
        calibration_files(args.calib_images, args.calib_max)
    return manifest


def iter_calibration_images(files: list[Path], image_size: int = 1024) -> Iterator["Any"]:
    """Each calibration image as the encoder's input (1,3,S,S) float32, through the runtime's preprocessing."""
    import cv2

    from ..runtime.preprocess import check_image, preprocess

    for path in files:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ExportError(f"calibration image {path} could not be read")
        yield preprocess(check_image(bgr, "BGR"), image_size)


# --- progress -------------------------------------------------------------------------------------
class _Printer:
    """One status line on stderr (rewritten in place on a terminal, one line per phase otherwise)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def line(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        msg = f"[{self.label} {time.perf_counter() - self.t0:6.1f}s] {text}"
        if self.tty and not final:
            sys.stderr.write("\r\033[K" + msg[:160])
        else:
            sys.stderr.write(("\r\033[K" if self.tty else "") + msg + "\n")
        sys.stderr.flush()


def _progress_monitor(trt, printer: _Printer):
    """A trt.IProgressMonitor that reports TensorRT's build phases (None where TensorRT lacks the interface)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.phases: dict[str, list] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.phases[phase_name] = [parent_phase, num_steps, 0]
            self._show(phase_name)

        def step_complete(self, phase_name, step):
            if phase_name in self.phases:
                self.phases[phase_name][2] = step + 1
                self._show(phase_name)
            return True  # keep building

        def phase_finish(self, phase_name):
            self.phases.pop(phase_name, None)

        def _show(self, phase_name):
            chain, name = [], phase_name
            while name is not None and name in self.phases:
                parent, total, done = self.phases[name]
                chain.append(f"{name} {done}/{total}")
                name = parent
            printer.line(" > ".join(reversed(chain)))

    return Monitor()


# --- TensorRT -------------------------------------------------------------------------------------
def _import_trt():
    from ..runtime.engines import tensorrt_missing_message

    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(f"`sam2rt build-engine` needs TensorRT. {tensorrt_missing_message()}") from exc
    return trt


def supports_calibration(trt) -> bool:
    return hasattr(trt, "IInt8EntropyCalibrator2") and hasattr(trt.BuilderFlag, "INT8")


def _make_calibrator(trt, files: list[Path], cache_path: Path, image_size: int, printer: _Printer):
    """An IInt8EntropyCalibrator2 feeding preprocessed images one at a time through a device buffer."""
    import numpy as np

    from ..runtime.gpu import DeviceArray

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.images = iter_calibration_images(files, image_size)
            self.buffer = DeviceArray((1, 3, image_size, image_size), np.float32)
            self.count = 0

        def get_batch_size(self):
            return 1

        def get_batch(self, names, *args):
            try:
                image = next(self.images)
            except StopIteration:
                return None
            self.buffer.copy_from_host(image)
            self.count += 1
            printer.line(f"calibrating: image {self.count}/{len(files)}")
            return [self.buffer.ptr]

        def read_calibration_cache(self, *args):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache, *args):
            cache_path.write_bytes(bytes(cache))

    return Calibrator()


def _pin_fp32_layers(trt, network, fp32_nodes: dict[str, str]) -> list[str]:
    """Weakly typed builds (INT8): force FP32 on the sensitive layers; returns the layer names pinned."""
    kinds = {getattr(trt.LayerType, k) for k in ("NORMALIZATION", "SOFTMAX", "REDUCE") if hasattr(trt.LayerType, k)}
    float_types = {trt.float32, trt.float16}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        name = layer.name
        base = name.split(" ", 1)[0]
        if not (layer.type in kinds or name in fp32_nodes or base in fp32_nodes):
            continue
        if layer.num_outputs == 0 or any(layer.get_output(j).dtype not in float_types for j in range(layer.num_outputs)):
            continue  # shape/index arithmetic: not a float layer
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned.append(name)
    return pinned


def build_engine(
    trt,
    onnx_path: Path,
    engine_path: Path,
    *,
    label: str,
    strongly_typed: bool,
    profiles: list[Profile] | None = None,
    workspace_mb: int | None = None,
    tf32: bool = False,
    int8_calibrator: Any = None,
    fp32_nodes: dict[str, str] | None = None,
    verbose: bool = False,
    progress: bool = True,
    printer: _Printer | None = None,
) -> dict[str, Any]:
    """Parse `onnx_path`, build, write `engine_path`; return what the manifest records for it."""
    printer = printer or _Printer(label, progress)
    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    st = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed and st is not None:
        flags |= 1 << int(st)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    printer.line(f"parsing {onnx_path.name}", final=True)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    monitor = _progress_monitor(trt, printer) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    for prof in profiles or []:
        p = builder.create_optimization_profile()
        for name, shape in prof.shapes.items():
            p.set_shape(name, list(shape.min), list(shape.opt), list(shape.max))
        config.add_optimization_profile(p)
    pinned: list[str] = []
    if int8_calibrator is not None:
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        config.int8_calibrator = int8_calibrator
        pinned = _pin_fp32_layers(trt, network, fp32_nodes or {})
        printer.line(f"{len(pinned)} sensitive layers pinned to FP32", final=True)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build {engine_path.name} (see TensorRT's messages above; "
                          "--workspace or a smaller --max-prompts may help)")
    engine_path.write_bytes(memoryview(plan))
    seconds = time.perf_counter() - t0
    printer.line(f"wrote {engine_path.name} ({engine_path.stat().st_size / 2**20:.1f} MiB) in {seconds:.0f} s", final=True)
    out: dict[str, Any] = {
        "file": engine_path.name,
        "sha256": sha256_file(engine_path),
        "strongly_typed": bool(strongly_typed and st is not None),
        "tf32": bool(tf32),
        "build_seconds": round(seconds, 1),
    }
    if pinned:
        out["fp32_layers"] = pinned
    if profiles:
        out["profiles"] = [p.to_dict() for p in profiles]
    return out


def _check_fp16_encoder(src: Path, fp32_nodes: dict[str, str], printer: _Printer) -> dict[str, Any] | None:
    """The FP32 encoder's activations on a photo against FP16's range, for the mixed-precision graph that keeps
    `fp32_nodes` in FP32, before minutes of engine building: the graph is strongly typed, so TensorRT holds those
    tensors in FP16 (export/fp16_check.py). ExportError where the weights pass the range; None without onnxruntime."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        printer.line("FP16 encoder not checked against FP32 (onnxruntime is not installed)", final=True)
        return None
    from .fp16_check import check_fp16_encoder

    printer.line("checking the encoder's activations on a photo against FP16's range (CPU)", final=True)
    check = check_fp16_encoder(src, fp32_nodes)
    if check["refused"]:
        raise ExportError(f"the FP16 encoder is not usable with these weights: {check['refused']}. Build FP32 engines "
                          "(without --fp16; --tf32 lets them use TF32 tensor cores)")
    return check


def build_engines(
    manifest: Manifest,
    precision: str = "fp32",
    *,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    max_points: int = DEFAULT_MAX_POINTS,
    workspace_mb: int | None = None,
    calib_images: Path | None = None,
    calib_max: int = DEFAULT_CALIB_MAX,
    tf32: bool = False,
    device: int = 0,
    keep_onnx: bool = False,
    verbose: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build both engines of `manifest`'s model directory at `precision` and record them; returns the entry."""
    from ..runtime.engines import decoder_profiles, engine_filename
    from ..runtime.gpu import gpu_info, set_device

    trt = _import_trt()
    if precision == "int8" and not supports_calibration(trt):
        raise ExportError(
            f"TensorRT {trt.__version__} has no INT8 calibration (TensorRT 11 removed implicit quantisation): "
            "build INT8 with TensorRT 10.x (e.g. JetPack 6), or use --fp16"
        )
    set_device(device)
    gpu = gpu_info(device)
    directory = manifest.directory
    profiles = decoder_profiles(max_prompts, max_points, int(manifest.data.get("low_res_size", 256)))
    entry: dict[str, Any] = {
        "precision": precision,
        "tensorrt": str(trt.__version__),
        "gpu": {"name": gpu.name, "compute_capability": gpu.compute_capability},
        "built": None,
        "max_prompts": max_prompts,
        "max_points": max_points,
        "workspace_mb": workspace_mb,
    }
    common: dict[str, Any] = dict(workspace_mb=workspace_mb, tf32=tf32, verbose=verbose, progress=progress)
    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="sam2rt-trt-", dir=directory if os.access(directory, os.W_OK) else None))
    try:
        for role in ("encoder", "decoder"):
            src = manifest.graph_path(role)
            label = f"{role} {precision}"
            engine_path = directory / engine_filename(role, precision)
            role_precision = "fp16" if precision in ("fp16", "int8") else "fp32"
            printer = _Printer(label, progress)
            common["printer"] = printer
            kept: dict[str, str] = {}
            if precision == "int8" and role == "encoder":
                from .fp16 import _import_onnx, select_fp32_nodes

                kept = select_fp32_nodes(_import_onnx().load(str(src), load_external_data=False).graph)
                files = calibration_files(calib_images, calib_max) if calib_images else []
                calibrator = _make_calibrator(trt, files, directory / "encoder.int8.calib", manifest.image_size, printer)
                info = build_engine(trt, src, engine_path, label=label, strongly_typed=False,
                                    int8_calibrator=calibrator, fp32_nodes=kept, **common)
                info.update(precision="int8", calibration={"images": len(files), "calibrator": "entropy2",
                                                           "cache": "encoder.int8.calib"})
            elif role_precision == "fp16":
                from .fp16 import convert_to_mixed_fp16, summarize

                mixed = (directory if keep_onnx else work) / f"{role}.fp16.onnx"
                printer.line(f"writing mixed-precision {mixed.name}", final=True)
                kept = convert_to_mixed_fp16(src, mixed)
                printer.line(
                    "kept in FP32: " + ", ".join(f"{n} {r}" for r, n in summarize(kept).items()), final=True
                )
                check = _check_fp16_encoder(src, kept, printer) if role == "encoder" else None
                info = build_engine(trt, mixed, engine_path, label=label, strongly_typed=True,
                                    profiles=profiles if role == "decoder" else None, **common)
                info.update(precision="fp16", fp32_nodes=sorted(kept), fp32_summary=summarize(kept))
                if check is not None:
                    info["fp16_check"] = check
            else:
                info = build_engine(trt, src, engine_path, label=label, strongly_typed=True,
                                    profiles=profiles if role == "decoder" else None, **common)
                info.update(precision="fp32")
            info["onnx_sha256"] = manifest.graph(role)["sha256"]
            entry[role] = info
    finally:
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()
    entry["built"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    entry["build_seconds"] = round(time.perf_counter() - t_all, 1)
    fresh = Manifest.load(directory)  # re-read: keep whatever else was written meanwhile
    engines = fresh.data.get("engines")
    if not isinstance(engines, dict):
        engines = {}
    engines[precision] = entry
    fresh.data["engines"] = engines
    fresh.save()
    return entry


def run(args: argparse.Namespace) -> int:
    manifest = check_arguments(args)
    precision = precision_of(args)
    if args.int8 and args.fp16:
        print("note: --int8 already builds FP16 where INT8 does not apply; --fp16 adds nothing", file=sys.stderr)
    try:
        entry = build_engines(
            manifest, precision, max_prompts=args.max_prompts, max_points=args.max_points,
            workspace_mb=args.workspace, calib_images=args.calib_images, calib_max=args.calib_max, tf32=args.tf32,
            device=args.device, keep_onnx=args.keep_onnx, verbose=args.verbose, progress=not args.quiet,
        )
    except Sam2rtError:
        raise
    except Exception as exc:  # a TensorRT / CUDA failure: report it as a build failure, not a traceback
        raise ExportError(f"engine build failed: {type(exc).__name__}: {exc}") from exc
    gpu = entry["gpu"]
    print(f"built {precision} engines for {manifest.model['model_id']} with TensorRT {entry['tensorrt']} on "
          f"{gpu['name']} (compute capability {gpu['compute_capability']}) in {entry['build_seconds']:.0f} s; "
          f"recorded in {manifest.directory / MANIFEST_NAME}")
    print(f"use them with backend='tensorrt' (or 'tensorrt:{precision}')")
    return 0
