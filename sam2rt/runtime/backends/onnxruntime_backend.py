"""ONNX Runtime backend: sessions over the exported graphs, tuned for SAM 2's embed-once / decode-many use."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ...errors import BackendUnavailableError, ModelFileError
from ...manifest import Manifest

PROVIDERS = {
    "onnxruntime-cpu": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailableError(
            "onnxruntime is not installed: `pip install 'sam2rt[cpu]'` (or 'sam2rt[gpu]' for CUDA)"
        ) from exc
    return ort


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (empty if onnxruntime is missing)."""
    try:
        return list(_import_ort().get_available_providers())
    except BackendUnavailableError:
        return []


def default_threads() -> int:
    """Threads for intra-op parallelism: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None):
    """Session options for SAM 2 graphs: full graph optimisation, arena on, one op at a time, quiet logs."""
    ort = _import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = True
    so.log_severity_level = 3
    return so


class OnnxRuntimeBackend:
    """Runs encoder.onnx and decoder.onnx with ONNX Runtime on the given execution providers."""

    device = "cpu"

    def __init__(self, manifest: Manifest, name: str = "onnxruntime-cpu", threads: int | None = None) -> None:
        ort = _import_ort()
        if name not in PROVIDERS:
            raise BackendUnavailableError(f"unknown onnxruntime backend {name!r}; choose one of {sorted(PROVIDERS)}")
        wanted = PROVIDERS[name]
        if wanted[0] not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"backend {name!r} needs {wanted[0]}, which this onnxruntime does not offer "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use backend='onnxruntime-cpu'"
            )
        self.name = name
        self.threads = threads or default_threads()
        self._encoder = self._session(ort, manifest, "encoder", wanted)
        self._decoder = self._session(ort, manifest, "decoder", wanted)
        self._enc_outputs = [o.name for o in self._encoder.get_outputs()]

    def _session(self, ort, manifest: Manifest, role: str, providers: list[str]):
        path = manifest.graph_path(role)
        try:
            return ort.InferenceSession(str(path), sess_options=session_options(self.threads), providers=providers)
        except Exception as exc:
            raise ModelFileError(f"{path} could not be loaded by onnxruntime ({exc}); re-run `sam2rt export`") from exc

    def encode(self, image: np.ndarray) -> dict[str, Any]:
        outs = self._encoder.run(self._enc_outputs, {"image": image})
        return dict(zip(self._enc_outputs, outs))

    def decode(
        self,
        features: dict[str, Any],
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray,
        has_mask_input: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        feeds = dict(features)
        feeds.update(
            point_coords=point_coords,
            point_labels=point_labels,
            mask_input=mask_input,
            has_mask_input=has_mask_input,
        )
        low_res, iou = self._decoder.run(["low_res_masks", "iou_predictions"], feeds)
        return low_res, iou
