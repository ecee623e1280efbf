"""An ONNX Runtime session run with IO binding: inputs bound where they live, chosen outputs left on the device.

The video graphs run through it (runtime/video), and so do the fixed-shape sessions (fixed_shapes.py) that the video
graphs and the device pre/postprocessing (ort_pipeline.py) replay as CUDA graphs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..tensors import DeviceTensor, as_host
from .capture_lock import GPU_WORK
from .onnxruntime_backend import OrtDeviceTensor


class BoundSession:
    """One ONNX Runtime session run with IO binding, so that tensors stay on the session's device.

    `run(feeds, device_outputs, outputs)` takes host arrays, OrtDeviceTensors (bound where they are) or CUDA device
    arrays with a `ptr` (the TensorRT backend's float32 features, bound by address), and returns the graph's
    outputs (or only those named in `outputs`: ONNX Runtime then computes only what they need) in order: those
    named in `device_outputs` as OrtDeviceTensors on the session's device ("cuda" with the CUDA provider, else
    "cpu"), the others as new numpy arrays. Feeds the graph does not take are dropped (as `run`).
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
        with GPU_WORK.shared():
            self.session.run_with_iobinding(io)

    def run_at(self, feeds: dict[str, Any], at: dict[str, tuple[int, tuple[int, ...]]],
               outputs: tuple[str, ...] = ()) -> list[np.ndarray]:
        """One run writing each output named in `at` into memory the caller owns, (address, shape) of float32 on the
        session's device (e.g. one row of a larger tensor, which no OrtValue can stand for), and returning those named
        in `outputs` as new numpy arrays, in order."""
        io = self.session.io_binding()
        for name, value in feeds.items():
            if name in self.input_names:
                self._bind_input(io, name, value)
        for name, (address, shape) in at.items():
            io.bind_output(name, self.device, self.device_id, np.float32, list(shape), int(address))
        for name in outputs:
            io.bind_output(name, "cpu")
        with GPU_WORK.shared():
            self.session.run_with_iobinding(io)
            return [v.numpy() for v in io.get_outputs()[len(at):]]

    def run(self, feeds: dict[str, Any], device_outputs: tuple[str, ...] = (),
            outputs: tuple[str, ...] | None = None) -> list[Any]:
        io = self.session.io_binding()
        for name, value in feeds.items():
            if name in self.input_names:
                self._bind_input(io, name, value)
        names = self.output_names if outputs is None else list(outputs)
        for name in names:
            if name in device_outputs:
                io.bind_output(name, self.device, self.device_id)
            else:
                io.bind_output(name, "cpu")
        with GPU_WORK.shared():  # the run and the outputs' copies to the host
            self.session.run_with_iobinding(io)
            values = io.get_outputs()
            return [OrtDeviceTensor(v) if name in device_outputs else v.numpy()
                    for name, v in zip(names, values)]
