"""Inference backends and the choice among them (`backend="auto"` picks the fastest available)."""

from __future__ import annotations

import logging

from ...errors import BackendUnavailableError, EngineMismatchError, GraphNotExportedError
from ...manifest import Manifest
from .base import Backend, BackendClosedError, DecodedMasks, MaskRequest, TokenChoice
from .onnxruntime_backend import PROVIDERS, OnnxRuntimeBackend, available_providers
from .ort_device_backend import GPU_PRECISIONS, OrtDeviceBackend, tensorrt_libraries_status

ALIASES = {"cpu": "onnxruntime-cpu", "onnxruntime": "onnxruntime-cpu", "cuda": "onnxruntime-cuda"}
BACKENDS = ("auto", "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")


def auto_order() -> list[str]:
    """Backends `auto` tries, fastest first: tensorrt > onnxruntime CUDA > onnxruntime CPU."""
    return ["tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"]


def available_backends() -> dict[str, str]:
    """Each backend name with 'available' or the reason it is not (cheap: loads no model)."""
    providers = available_providers()
    status = {}
    for name, wanted in PROVIDERS.items():
        status[name] = "available" if wanted[0] in providers else f"unavailable: onnxruntime lacks {wanted[0]}"
    if status["onnxruntime-tensorrt"] == "available" and tensorrt_libraries_status():
        status["onnxruntime-tensorrt"] = f"unavailable: {tensorrt_libraries_status()}"
    try:
        from .tensorrt_backend import tensorrt_status

        status["tensorrt"] = tensorrt_status()
    except ImportError as exc:  # pragma: no cover - module always present
        status["tensorrt"] = f"unavailable: {exc}"
    return status


def create_backend(manifest: Manifest, name: str = "auto", threads: int | None = None) -> Backend:
    """Instantiate backend `name` for a model directory; `auto` falls back down auto_order().

    `tensorrt` loads the fastest engines built for the directory; `tensorrt:fp32`, `tensorrt:fp16` or
    `tensorrt:int8` asks for one precision. `onnxruntime-cpu:int8` runs the opt-in INT8 encoder
    (reduced precision; exports made with --int8); plain `onnxruntime-cpu` is FP32. `onnxruntime-cuda:fp32`,
    `:tf32` (the default) and `:fp16` name the GPU precision modes (see OrtDeviceBackend).
    """
    name = ALIASES.get(name, name)
    precision = None
    if ":" in name:  # "tensorrt:fp16", "onnxruntime-cuda:fp16": one precision
        name, precision = name.split(":", 1)
        name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        reasons = []
        for candidate in auto_order():
            try:
                return create_backend(manifest, candidate, threads)
            except BackendUnavailableError as exc:
                reasons.append(f"{candidate}: {exc}")
            except GraphNotExportedError as exc:  # a lean export for other targets: the next backend may run it
                reasons.append(f"{candidate}: {exc}")
            except EngineMismatchError as exc:  # engines for another GPU/TensorRT: say so, then fall back
                logging.getLogger("sam2rt").warning("backend 'auto' skips %s: %s", candidate, exc)
                reasons.append(f"{candidate}: {exc}")
        raise BackendUnavailableError("no backend is available:\n  " + "\n  ".join(reasons))
    if name == "onnxruntime-cpu":
        return OnnxRuntimeBackend(manifest, name, threads, precision=precision)
    if name in PROVIDERS:
        return OrtDeviceBackend(manifest, name, precision=precision, threads=threads)
    from .tensorrt_backend import TensorRTBackend  # imported lazily: needs tensorrt + cuda-python

    return TensorRTBackend(manifest, threads=threads, precision=precision)


__all__ = ["Backend", "BackendClosedError", "BACKENDS", "DecodedMasks", "GPU_PRECISIONS", "MaskRequest", "OnnxRuntimeBackend",
           "OrtDeviceBackend", "TokenChoice", "available_backends", "available_providers", "create_backend", "auto_order"]
