"""ONNX Runtime sessions for the video graphs: the one place they are created and run.

The image encoder itself runs on the model's backend (`Sam2Model.backend.encode`), not here. The video
graphs run through IO binding (`VideoSession`): the features the backend left on its GPU are bound where
they are, and outputs asked for on the device (the memory-conditioned features) stay there for the next
graph, so a tracked frame's ~16 MB of features and ~8 MB of memory-conditioned features never cross
PCIe. On the CPU provider the same code runs with host buffers; CI tests the data flow that way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BackendUnavailableError
from ..backends.onnxruntime_backend import OrtDeviceTensor
from ..tensors import DeviceTensor, as_host

# ONNX Runtime providers for the video graphs, by the image backend's name (TensorRT engines exist for the
# image graphs only: with the tensorrt backend the video graphs run on ONNX Runtime's CUDA provider).
CPU_PROVIDERS = ["CPUExecutionProvider"]
VIDEO_PROVIDERS = {
    "onnxruntime-cpu": CPU_PROVIDERS,
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def create_session(
    path: str | Path, backend: str = "onnxruntime-cpu", threads: int | None = None, tf32: bool = True,
    graph: bool = False, dims: dict[str, int] | None = None,
) -> Any:
    """An onnxruntime.InferenceSession for one video graph, on the providers that fit `backend` (`tf32`: whether
    the CUDA provider may use TF32 tensor cores for FP32 products; `graph`: CUDA-graph capture, which ONNX Runtime
    refuses, with an error here, for a graph with a node on the CPU; `dims`: symbolic dimensions fixed, so that
    ONNX Runtime folds the shape arithmetic into constants, as capture needs)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailableError("onnxruntime is needed for video tracking: `pip install 'sam2rt[cpu]'`") from exc
    from ..backends.onnxruntime_backend import session_options

    wanted = VIDEO_PROVIDERS.get(backend.split(":")[0], ["CPUExecutionProvider"])
    available = set(ort.get_available_providers())
    providers: list[Any] = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    cuda = {"use_tf32": "1" if tf32 else "0", "enable_cuda_graph": "1" if graph else "0"}
    providers = [(p, cuda) if p == "CUDAExecutionProvider" else p for p in providers]
    so = session_options(threads, mem_pattern=False)
    for name, value in (dims or {}).items():
        so.add_free_dimension_override_by_name(name, int(value))
    return ort.InferenceSession(str(path), so, providers=providers)


def run(session: Any, feeds: dict[str, Any]) -> list[Any]:
    """session.run with the feeds the graph has: inputs a model's config leaves unused (e.g. the object
    score where SAM 2.0 has no `no_obj_embed_spatial`, pointer positions without temporal encoding)
    are dropped from the graph by the exporter."""
    names = getattr(session, "_sam2rt_inputs", None)
    if names is None:
        names = session._sam2rt_inputs = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


class VideoSession:
    """One video graph's session, run with IO binding so that tensors stay on the session's device.

    `run(feeds, device_outputs)` takes host arrays, OrtDeviceTensors (bound where they are) or CUDA device
    arrays with a `ptr` (the TensorRT backend's float32 features, bound by address), and returns the graph's
    outputs in order: those named in `device_outputs` as OrtDeviceTensors on the session's device ("cuda" with
    the CUDA provider, else "cpu"), the others as numpy arrays. Feeds the graph does not take are dropped (as `run`).
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_names = {i.name for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        on_cuda = "CUDAExecutionProvider" in session.get_providers()
        self.device = "cuda" if on_cuda else "cpu"
        options = session.get_provider_options().get("CUDAExecutionProvider", {}) if on_cuda else {}
        self.device_id = int(options.get("device_id", 0))

    def _bind_input(self, io: Any, name: str, value: Any) -> None:
        if isinstance(value, OrtDeviceTensor):
            io.bind_ortvalue_input(name, value.value)  # ONNX Runtime copies it if it lives elsewhere
        elif (self.device == "cuda" and isinstance(value, DeviceTensor) and hasattr(value, "ptr")
              and value.dtype == np.float32 and str(value.device).startswith("cuda")):
            io.bind_input(name, "cuda", self.device_id, np.float32, list(value.shape), int(value.ptr))
        else:
            host = as_host(value)
            if host.dtype == np.float16:  # an FP16 engine's features: the graphs take float32
                host = host.astype(np.float32)
            io.bind_cpu_input(name, np.ascontiguousarray(host))

    def run_into(self, feeds: dict[str, Any], outputs: dict[str, Any]) -> None:
        """One run writing its outputs into the given OrtValues (e.g. a fixed buffer on the device)."""
        io = self.session.io_binding()
        for name, value in feeds.items():
            self._bind_input(io, name, value)
        for name, value in outputs.items():
            io.bind_ortvalue_output(name, value)
        self.session.run_with_iobinding(io)

    def run(self, feeds: dict[str, Any], device_outputs: tuple[str, ...] = ()) -> list[Any]:
        io = self.session.io_binding()
        for name, value in feeds.items():
            if name in self.input_names:
                self._bind_input(io, name, value)
        for name in self.output_names:
            if name in device_outputs:
                io.bind_output(name, self.device, self.device_id)
            else:
                io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        values = io.get_outputs()
        return [OrtDeviceTensor(v) if name in device_outputs else v.numpy()
                for name, v in zip(self.output_names, values)]
