"""Export of SAM 2 checkpoints to ONNX graphs (and TensorRT engines).

The ONNX export imports torch; the TensorRT engine build (`sam2rt.export.tensorrt_build`) does not, so
engines can be built on a device (a Jetson) that has TensorRT but no torch. The names below are
therefore imported lazily, on first use.
"""

from __future__ import annotations

_LAZY = {
    "build_model": "checkpoint",
    "download_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "DEFAULT_OPSET": "onnx_export",
    "export_model": "onnx_export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_OPSET", "build_model", "download_checkpoint", "export_model", "load_checkpoint", "save_checkpoint"]
