"""ONNX Runtime sessions for the video graphs: the one place they are created.

Kept to one function so that it can move behind the runtime's backend contract later; the image
encoder itself runs on the model's backend (`Sam2Model.backend.encode`), not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import BackendUnavailableError

# ONNX Runtime providers for the video graphs, by the image backend's name (TensorRT engines exist for the
# image graphs only: with the tensorrt backend the video graphs run on ONNX Runtime's CUDA provider).
VIDEO_PROVIDERS = {
    "onnxruntime-cpu": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def create_session(path: str | Path, backend: str = "onnxruntime-cpu", threads: int | None = None) -> Any:
    """An onnxruntime.InferenceSession for one video graph, on the providers that fit `backend`."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailableError("onnxruntime is needed for video tracking: `pip install 'sam2rt[cpu]'`") from exc
    from ..backends.onnxruntime_backend import session_options

    wanted = VIDEO_PROVIDERS.get(backend.split(":")[0], ["CPUExecutionProvider"])
    available = set(ort.get_available_providers())
    providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), session_options(threads, mem_pattern=False), providers=providers)
