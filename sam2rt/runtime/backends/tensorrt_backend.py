"""TensorRT backend (native TensorRT + cuda-python)."""

from __future__ import annotations

from ...errors import BackendUnavailableError
from ...manifest import Manifest


class TensorRTBackend:
    """Placeholder until engines are supported: always reports itself unavailable."""

    def __init__(self, manifest: Manifest, threads: int | None = None) -> None:
        raise BackendUnavailableError(
            "the tensorrt backend is not available: no TensorRT engines are supported in this build"
        )


def tensorrt_status() -> str:
    """'available' or why the TensorRT backend cannot run here."""
    return "unavailable: TensorRT engines are not supported in this build"
