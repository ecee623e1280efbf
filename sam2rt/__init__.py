"""sam2rt: an optimized inference runtime for SAM 2 (export to ONNX/TensorRT, a torch-free runtime, a server)."""

from __future__ import annotations

from .errors import Sam2rtError

__version__ = "0.1.0"

_LAZY = {"Predictor", "Sam2Model", "Embedding", "Prompt", "Masks", "VideoTracker"}


def __getattr__(name: str):
    if name in _LAZY:  # the runtime is imported on first use so `import sam2rt` stays light
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'sam2rt' has no attribute {name!r}")


__all__ = ["Sam2rtError", "__version__", *sorted(_LAZY)]
