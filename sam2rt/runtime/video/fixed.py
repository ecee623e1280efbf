"""The video graphs' steady state from fixed device buffers, replayed as CUDA graphs.

Why: per object, a tracked frame runs the memory attention, the tracking decoder and the memory encoder:
~2,500 ONNX nodes (1171 + 1120 + 183 for hiera_tiny's compact memory attention, before ONNX Runtime's fusions).
Launched one at a time, ONNX Runtime's CUDA provider spends a few microseconds of host time on each, which by
arithmetic alone exceeds the 10 ms a 100 frames/s stream has, whatever the GPU does meanwhile. The inputs'
shapes settle: the decoder and the memory encoder never change theirs while tracking, and the compact memory
attention's (memories, pointers) are constant once the object's memory is full (7, 16 from frame 16 on). A
shape in steady use is therefore captured once (ONNX Runtime's `enable_cuda_graph`, the image path's mechanism:
ort_device_backend.py) and each later run is a copy into its input buffers and one graph replay.

Contract of `FixedShapeSession.run`: the same as VideoSession.run (same outputs, in order; device outputs as new
OrtDeviceTensors, host outputs as new numpy arrays, never a buffer a later run overwrites). Which shapes are
captured:
- a shape (the inputs' shapes, its "signature") qualifies once it has been run on CAPTURE_AFTER distinct frames
  (the tracker's frame clock): the memory bank's warm-up shapes, each used on one or two frames, never do;
- at most MAX_FIXED_SHAPES per graph; when a new one qualifies beyond that, a captured shape unused for
  CAPTURE_AFTER frames gives way (else the new one runs without);
- its first replay is compared with the plain session's result of the same inputs: ONNX Runtime optimises a
  session with fixed dimensions differently, and a fusion that computed something else must never reach a caller
  (the image path found one: benchmarks/README.md, run 3). A disagreement, or a graph ONNX Runtime cannot
  capture (a node it places on the CPU), leaves that shape on the plain session for good; `status` says why.
On the CPU provider the same flow runs without graph capture (`capture=False`): CI tests it that way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..backends.onnxruntime_backend import OrtDeviceTensor
from ..tensors import DeviceTensor, as_host
from .sessions import VideoSession, create_session

log = logging.getLogger("sam2rt")

CAPTURE_AFTER = 4  # distinct frames a signature is run on before it gets fixed buffers
MAX_FIXED_SHAPES = 2  # fixed-buffer sessions (each with its own CUDA graph and buffers) per video graph
# a fixed session's first outputs may differ from the plain session's by this much, relative to the outputs' largest
# magnitude (floor 1): other fusions round differently, and FP16 rounds more
FIXED_TOLERANCE = {"fp16": 1e-2}
DEFAULT_FIXED_TOLERANCE = 1e-3
ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_}

Signature = tuple[tuple[str, tuple[int, ...]], ...]


def _shape(value: Any) -> tuple[int, ...]:
    shape = value.shape() if callable(getattr(value, "shape", None)) else value.shape
    return tuple(int(d) for d in shape)


def fixed_dims(symbolic: dict[str, list[Any]], shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The sizes of a graph's symbolic dimensions ({input: its declared shape, str for symbolic}) in one run's shapes."""
    dims: dict[str, int] = {}
    for name, shape in shapes.items():
        for sym, size in zip(symbolic.get(name, []), shape):
            if isinstance(sym, str):
                dims[sym] = int(size)
    return dims


class _Fixed:
    """One signature's session bound once to its input and output buffers."""

    def __init__(self, session: Any, binding: Any, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        self.session, self.binding, self.inputs, self.outputs = session, binding, inputs, outputs
        self.last_used = -1


class FixedShapeSession:
    """A video graph's VideoSession with its steady input shapes run from fixed buffers (module docstring)."""

    def __init__(
        self,
        plain: VideoSession,
        path: str | Path,
        backend: str,
        threads: int | None,
        tf32: bool,
        precision: str,
        copy: VideoSession,
        clock: Callable[[], int],
        capture: bool = True,
    ) -> None:
        self.plain, self._path, self._backend, self._threads, self._tf32 = plain, path, backend, threads, tf32
        self._copy, self._clock, self._capture = copy, clock, capture
        self.tolerance = FIXED_TOLERANCE.get(precision, DEFAULT_FIXED_TOLERANCE)
        self.input_names, self.output_names = plain.input_names, plain.output_names
        self.device, self.device_id = plain.device, plain.device_id
        meta = plain.session.get_inputs()
        self._symbolic = {i.name: list(i.shape) for i in meta}  # str entries are symbolic dimensions
        self._types = {i.name: ORT_TYPES.get(i.type, np.float32) for i in meta}
        self._frames_seen: dict[Signature, set[int]] = {}
        self._fixed: dict[Signature, _Fixed] = {}
        self._pending: set[Signature] = set()  # qualified: captured on its next run
        self.status: dict[str, str] = {}  # str(signature) -> "captured" / "fixed buffers" / why not
        self.replays = 0  # runs served from fixed buffers (tests and benchmarks read it)

    # --- which shapes --------------------------------------------------------------------------------
    def _signature(self, feeds: dict[str, Any]) -> Signature:
        return tuple(sorted((k, _shape(v)) for k, v in feeds.items()))

    def _note(self, sig: Signature) -> None:
        """Count the frame this signature ran on; mark it for capture once it qualifies and there is room."""
        if sig in self._fixed or str(sig) in self.status:
            return
        frames = self._frames_seen.setdefault(sig, set())
        frames.add(self._clock())
        if len(frames) < CAPTURE_AFTER:
            return
        del self._frames_seen[sig]
        if len(self._fixed) >= MAX_FIXED_SHAPES:
            now = self._clock()
            stale = [s for s, f in self._fixed.items() if now - f.last_used >= CAPTURE_AFTER]
            if not stale:
                return  # counted again from scratch: it may qualify once a captured shape goes stale
            self.release(min(stale, key=lambda s: self._fixed[s].last_used))
        self._pending.add(sig)

    def release(self, sig: Signature) -> None:
        """Drop one signature's session and buffers (a later qualification captures it again)."""
        self._fixed.pop(sig, None)
        self.status.pop(str(sig), None)

    # --- runs ------------------------------------------------------------------------------------------
    def run(self, feeds: dict[str, Any], device_outputs: tuple[str, ...] = ()) -> list[Any]:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        sig = self._signature(feeds)
        fixed = self._fixed.get(sig)
        if fixed is None:
            self._note(sig)
            result = self.plain.run(feeds, device_outputs)
            if sig in self._pending:
                self._pending.discard(sig)
                self._make_fixed(sig, feeds, result)
            return result
        fixed.last_used = self._clock()
        self._load(fixed, feeds)
        self._replay(fixed)
        self.replays += 1
        return [OrtDeviceTensor(self._copy_out(fixed.outputs[n])) if n in device_outputs else self._host(fixed.outputs[n])
                for n in self.output_names]

    def _host(self, value: Any) -> np.ndarray:
        """A new host array of an output buffer (OrtValue.numpy() of a CPU buffer is a view of it, not a copy)."""
        out = value.numpy()
        return out.copy() if self.device == "cpu" else out

    def _load(self, fixed: _Fixed, feeds: dict[str, Any]) -> None:
        """Each input into its fixed buffer: host arrays copied up in place, device tensors copied on the device."""
        for name, value in feeds.items():
            buf = fixed.inputs[name]
            if isinstance(value, OrtDeviceTensor) or (isinstance(value, DeviceTensor) and hasattr(value, "ptr")
                                                      and self.device == "cuda"):
                self._copy.run_into({"x": value}, {"y": buf})
            else:
                buf.update_inplace(np.ascontiguousarray(as_host(value), dtype=self._types[name]))

    def _copy_out(self, value: Any) -> Any:
        """A device copy of an output buffer: the next replay overwrites the buffer, the caller keeps the copy."""
        return self._copy.run({"x": OrtDeviceTensor(value)}, ("y",))[0].value

    @staticmethod
    def _replay(fixed: _Fixed) -> None:
        # a CUDA-graph replay returns before the GPU is done; the next step runs on another session's stream
        fixed.session.run_with_iobinding(fixed.binding)
        fixed.binding.synchronize_outputs()

    def _make_fixed(self, sig: Signature, feeds: dict[str, Any], reference: list[Any]) -> None:
        """A session with this signature's dimensions fixed, bound to new buffers; kept only if its first
        replay of `feeds` reproduces `reference` (the plain session's outputs of the same feeds)."""
        import onnxruntime as ort

        shapes = dict(sig)
        dims = fixed_dims(self._symbolic, shapes)
        key = str(sig)
        graph = self._capture and self.device == "cuda"
        try:
            session = create_session(self._path, self._backend, self._threads, tf32=self._tf32, graph=graph, dims=dims)
        except Exception as exc:  # ONNX Runtime refuses to capture graphs with nodes it runs on the CPU
            self.status[key] = f"not captured: {str(exc).splitlines()[0][:200]}"
            log.info("sam2rt: video graph %s: %s", Path(self._path).name, self.status[key])
            return
        dev, dev_id = self.device, self.device_id
        io = session.io_binding()
        inputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(s), self._types[n], dev, dev_id) for n, s in shapes.items()}
        for n, v in inputs.items():
            io.bind_ortvalue_input(n, v)
        outputs = {}
        for n, ref in zip(self.output_names, reference):
            dtype = ref.dtype if isinstance(ref, np.ndarray) else np.float32  # device outputs are float32 (OrtDeviceTensor)
            outputs[n] = ort.OrtValue.ortvalue_from_shape_and_type(list(_shape(ref)), dtype, dev, dev_id)
            io.bind_ortvalue_output(n, outputs[n])
        fixed = _Fixed(session, io, inputs, outputs)
        try:
            self._load(fixed, feeds)
            self._replay(fixed)
            diff, scale = 0.0, 1.0
            for n, ref in zip(self.output_names, reference):
                want = as_host(ref)
                diff = max(diff, float(np.abs(outputs[n].numpy() - want).max(initial=0.0)))
                scale = max(scale, float(np.abs(want).max(initial=0.0)))
        except Exception as exc:
            self.status[key] = f"failed: {str(exc).splitlines()[0][:200]}"
            log.warning("sam2rt: video graph %s: %s", Path(self._path).name, self.status[key])
            return
        if diff > self.tolerance * scale:
            self.status[key] = f"rejected: the fixed-shape session differs from the plain one by {diff:.3g}"
            log.warning("sam2rt: video graph %s: %s", Path(self._path).name, self.status[key])
            return
        fixed.last_used = self._clock()
        self._fixed[sig] = fixed
        self.status[key] = "captured" if graph else "fixed buffers"
