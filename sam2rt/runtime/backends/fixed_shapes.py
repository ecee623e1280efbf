"""A graph's steady input shapes run from fixed device buffers, replayed as CUDA graphs.

Why: ONNX Runtime's CUDA provider spends a few microseconds of host time on every node it launches, and more on a
graph with symbolic dimensions (shape inference and allocation per run). The video graphs are ~2,500 nodes per
object and frame (1171 + 1120 + 183 for hiera_tiny's compact memory attention, before fusions): by arithmetic
alone more than the 10 ms a 100 frames/s stream has. The image path's postprocessing is only 38 nodes, yet on an
H100 it took 1.2-1.5 ms around a 0.5 ms decoder (benchmarks/README.md, run 4): overhead, not arithmetic. In steady
use the shapes settle (a tracked object's decoder and memory encoder never change theirs, the memory attention's
are constant once the memory is full; a user decodes many prompts on images of one size), so a shape in steady use
is captured once (ONNX Runtime's `enable_cuda_graph`, as the encoder and decoders of ort_device_backend.py) and
each later run is copies into its input buffers and one graph replay.

Contract of `FixedShapeSession.run`: the same as BoundSession.run (the same outputs, in order; device outputs as
new OrtDeviceTensors, host outputs as new numpy arrays, never a buffer a later run overwrites). Which shapes are
captured:
- a signature (the inputs' shapes and the outputs asked for) qualifies once it has been run on CAPTURE_AFTER
  distinct ticks of the owner's clock (the tracker's frames; the pipeline's calls): the memory bank's warm-up
  shapes, each used on one or two frames, never do;
- at most `max_shapes` (MAX_FIXED_SHAPES) per graph; when a new one qualifies beyond that, a captured signature
  unused for CAPTURE_AFTER ticks gives way (else the new one runs without);
- buffers are device memory held for as long as the signature stays captured: one whose inputs and outputs exceed
  `max_buffer_bytes` is not captured (sixteen 1920x1080 float masks would hold 400 MB; a run that moves that much
  is bound by the copies, not the launches);
- its first replay is compared with the plain session's result of the same inputs: ONNX Runtime optimises a
  session with fixed dimensions differently, and a fusion that computed something else must never reach a caller
  (the image path found one: benchmarks/README.md, run 3). Float outputs may differ by the tolerance, relative to
  their largest magnitude; bool outputs must be equal (but for `bool_flips`). A disagreement, or a graph ONNX Runtime cannot capture (a
  node it places on the CPU), leaves that signature on the plain session for good; `status` says why.
- `capture_after` (default CAPTURE_AFTER): the distinct ticks a signature needs; 1 captures on its first run (the
  image path's merged decode graph: a click must not run three times uncaptured first).
- `bool_flips`: the fraction of a bool output's values (or of a float mask's, MASK_VALUE_OUTPUTS) the first replay may differ in (default 0: equal), for a graph
  whose bool outputs threshold floats that another fusion rounds differently (the merged decode graph's masks, where
  its TF32 decoder part's logits lie on the threshold); its float outputs are held to the tolerance all the same.
- `download`: how host outputs come down (the pipeline's pool of pinned arrays on a GPU); by default `numpy()`.
- device inputs (OrtDeviceTensors) are copied into their buffers only when they are another tensor than the one the buffers hold: a
  tracked frame's objects share its features (image_embed, high_res_feats), so the second object's memory attention,
  decoder and memory encoder find them in place. Callers never change a device tensor's values after passing it
  (the runtime's device tensors are each run's own new outputs).
- `seconds`: where a replayed run's wall time went, summed over replays ({"load", "replay", "out"}: inputs into
  their buffers, the replay until its outputs are ready, outputs copied out or down): the video benchmark reads
  it to tell a graph's own time from the copies around it.
- `static_inputs`: inputs whose values are a function of the signature alone (the pipeline's upsampling taps, set
  by the sizes): copied into their buffers when the signature is captured, never again. Small host inputs (a
  threshold, a flag: up to SMALL_HOST_INPUT bytes) are copied only when their value changes: each copy is a
  synchronisation with the device.
On the CPU provider the same flow runs without graph capture (`capture=False`): CI tests it that way.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from ..tensors import DeviceTensor, as_host
from .bound_session import BoundSession
from .capture_lock import GPU_WORK, ThreadRuns
from .device_copy import DeviceCopier
from .onnxruntime_backend import OrtDeviceTensor

log = logging.getLogger("sam2rt")

# float outputs that hold thresholded masks (0.0/1.0; the postprocessing and merged decode graphs' `mask_values`, what
# SAM2ImagePredictor-style callers get): compared as masks, a flipped pixel counted against `bool_flips`, not as a
# float difference of 1 (GPU run 7 rejected the merged decode graph for the Predictor's float masks over one pixel)
MASK_VALUE_OUTPUTS = frozenset({"mask_values"})
CAPTURE_AFTER = 4  # distinct clock ticks a signature is run on before it gets fixed buffers
MAX_FIXED_SHAPES = 2  # fixed-buffer sessions (each with its own CUDA graph and buffers) per graph
# a fixed session's first outputs may differ from the plain session's by this much, relative to the outputs' largest
# magnitude (floor 1): other fusions round differently, and FP16 rounds more
FIXED_TOLERANCE = {"fp16": 1e-2}
DEFAULT_FIXED_TOLERANCE = 1e-3
SMALL_HOST_INPUT = 256  # bytes: a host input this small (a threshold, a flag) is uploaded only when its value changes
ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8}

REPLAY_PARTS = ("load", "replay", "out")  # FixedShapeSession.seconds: where a replayed run's time goes
Shapes = tuple[tuple[str, tuple[int, ...]], ...]
Signature = tuple[Shapes, tuple[str, ...] | None]  # (input shapes, the outputs asked for; None: all)
# (graph, dims) -> an onnxruntime.InferenceSession of the same graph, with CUDA-graph capture when `graph` and the
# symbolic dimensions `dims` fixed (so that ONNX Runtime folds the shape arithmetic into constants, as capture needs)
SessionFactory = Callable[[bool, dict[str, int]], Any]


def _shape(value: Any) -> tuple[int, ...]:
    shape = value.shape
    return tuple(shape()) if callable(shape) else tuple(shape)  # numpy's and ONNX Runtime's dimensions are ints


def fixed_dims(symbolic: dict[str, list[Any]], shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The sizes of a graph's symbolic dimensions ({input: its declared shape, str for symbolic}) in one run's shapes."""
    dims: dict[str, int] = {}
    for name, shape in shapes.items():
        for sym, size in zip(symbolic.get(name, []), shape):
            if isinstance(sym, str):
                dims[sym] = int(size)
    return dims


def relative_difference(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """The largest |got - want| over paired float arrays, relative to the largest |want| (floor 1).

    Why relative: two runs of one function that round differently (TF32, other fusions or kernels) differ in
    proportion to the values' magnitude. A trained model's logits reach tens where random weights give a few, and an
    absolute bound tuned on the latter would reject the former's rounding; a wrong computation (run 3's decoder was
    off by 0.8-2.6 on logits of ~2) stays far above a relative one."""
    diff, scale = 0.0, 1.0
    for a, b in zip(got, want):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff = max(diff, float(np.abs(a - b).max(initial=0.0)))
        scale = max(scale, float(np.abs(b).max(initial=0.0)))
    return diff / scale


@lru_cache(maxsize=256)  # asked on every merged decode (OrtDeviceBackend checks whether its signature was refused)
def status_key(sig: Signature) -> str:
    """How `status` names a signature: its input shapes, and the outputs asked for where not all."""
    shapes, outputs = sig
    return str(shapes) if outputs is None else f"{shapes} -> {outputs}"


class _Fixed:
    """One signature's session bound once to its input and output buffers."""

    def __init__(self, session: Any, binding: Any, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        self.session, self.binding, self.inputs, self.outputs = session, binding, inputs, outputs
        self.last_used = -1
        self.small: dict[str, np.ndarray] = {}  # the small host inputs' values now in their buffers
        self.loaded: dict[str, Any] = {}  # device inputs now in their buffers (held: their identity stays theirs)
        self.runs = ThreadRuns()  # the threads that replayed it: each one's first replay captures (capture_lock.py)


class FixedShapeSession:
    """A BoundSession with its steady input shapes run from fixed buffers (module docstring).

    `plain`: the graph's BoundSession; `factory`: makes fixed-dimension sessions of the same graph; `copy`: a
    DeviceCopier on the same device (device-to-device copies in and out of the buffers); `clock`: the owner's tick
    counter; `name`: the graph's name in logs.
    """

    def __init__(
        self,
        plain: BoundSession,
        factory: SessionFactory,
        copy: DeviceCopier,
        clock: Callable[[], int],
        precision: str = "fp32",
        capture: bool = True,
        static_inputs: tuple[str, ...] = (),
        name: str = "graph",
        max_shapes: int = MAX_FIXED_SHAPES,
        max_buffer_bytes: int | None = None,
        download: Callable[[Any, np.dtype], np.ndarray | None] | None = None,
        capture_after: int = CAPTURE_AFTER,
        bool_flips: float = 0.0,
    ) -> None:
        self.plain, self._factory, self._copy, self._clock, self._capture = plain, factory, copy, clock, capture
        self.name, self._static = name, frozenset(static_inputs)
        self.max_shapes, self.max_buffer_bytes = int(max_shapes), max_buffer_bytes
        self._download = download  # (output buffer, dtype) -> a new host array (e.g. pinned), or None: numpy()
        self.tolerance = FIXED_TOLERANCE.get(precision, DEFAULT_FIXED_TOLERANCE)
        self.capture_after, self.bool_flips = max(1, int(capture_after)), float(bool_flips)
        self.input_names, self.output_names = plain.input_names, plain.output_names
        self.device, self.device_id = plain.device, plain.device_id
        meta = plain.session.get_inputs()
        self._symbolic = {i.name: list(i.shape) for i in meta}  # str entries are symbolic dimensions
        self._types = {i.name: ORT_TYPES.get(i.type, np.float32) for i in meta}
        self._frames_seen: dict[Signature, set[int]] = {}
        self._fixed: dict[Signature, _Fixed] = {}
        self._pending: set[Signature] = set()  # qualified: captured on its next run
        self.status: dict[str, str] = {}  # status_key(signature) -> "captured" / "fixed buffers" / why not
        self.replays = 0  # runs served from fixed buffers (tests and benchmarks read it)
        self.seconds = dict.fromkeys(REPLAY_PARTS, 0.0)  # summed over replays (module docstring)

    # --- which shapes --------------------------------------------------------------------------------
    def _signature(self, feeds: dict[str, Any], outputs: tuple[str, ...] | None) -> Signature:
        return tuple(sorted((k, _shape(v)) for k, v in feeds.items())), outputs

    def _note(self, sig: Signature) -> None:
        """Count the tick this signature ran on; mark it for capture once it qualifies and there is room."""
        if sig in self._fixed or status_key(sig) in self.status:
            return
        frames = self._frames_seen.setdefault(sig, set())
        frames.add(self._clock())
        if len(frames) < self.capture_after:
            return
        del self._frames_seen[sig]
        if len(self._fixed) >= self.max_shapes:
            now = self._clock()
            stale = [s for s, f in self._fixed.items() if now - f.last_used >= self.capture_after]
            if not stale:
                return  # counted again from scratch: it may qualify once a captured shape goes stale
            self.release(min(stale, key=lambda s: self._fixed[s].last_used))
        self._pending.add(sig)

    def refused(self, feeds: dict[str, Any], outputs: tuple[str, ...] | None = None) -> str | None:
        """Why runs of these feeds' signature stay on the plain session for good (not captured, rejected, failed);
        None while it is captured or may still be."""
        key = status_key(self._signature({k: v for k, v in feeds.items() if k in self.input_names}, outputs))
        why = self.status.get(key)
        return None if why in (None, "captured", "fixed buffers") else why

    def release(self, sig: Signature) -> None:
        """Drop one signature's session and buffers (a later qualification captures it again)."""
        self._fixed.pop(sig, None)
        self.status.pop(status_key(sig), None)

    # --- runs ------------------------------------------------------------------------------------------
    def run(self, feeds: dict[str, Any], device_outputs: tuple[str, ...] = (),
            outputs: tuple[str, ...] | None = None) -> list[Any]:
        with GPU_WORK.shared():
            return self._run(feeds, device_outputs, outputs)

    def _run(self, feeds: dict[str, Any], device_outputs: tuple[str, ...], outputs: tuple[str, ...] | None) -> list[Any]:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        sig = self._signature(feeds, outputs)
        fixed = self._fixed.get(sig)
        if fixed is None:
            self._note(sig)
            result = self.plain.run(feeds, device_outputs, outputs)
            if sig in self._pending:
                self._pending.discard(sig)
                with GPU_WORK.exclusive():  # its first replay captures the CUDA graph (capture_lock.py)
                    self._make_fixed(sig, feeds, result)
            return result
        fixed.last_used = self._clock()
        t0 = time.perf_counter()
        self._load(fixed, feeds, first=False)
        t1 = time.perf_counter()
        with fixed.runs.guard():  # on a thread that has not replayed it, ONNX Runtime captures it again
            self._replay(fixed)
        fixed.runs.mark()
        t2 = time.perf_counter()
        self.replays += 1
        # device outputs copied out (the next replay overwrites the buffers; the caller keeps the copies), in one run
        copies = iter(self._copy.out([v for n, v in fixed.outputs.items() if n in device_outputs]) if device_outputs else ())
        out = [OrtDeviceTensor(next(copies)) if n in device_outputs else self._host(fixed.outputs[n]) for n in fixed.outputs]
        for part, dt in zip(REPLAY_PARTS, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
            self.seconds[part] += dt
        return out

    def _host(self, value: Any) -> np.ndarray:
        """A new host array of an output buffer (OrtValue.numpy() of a CPU buffer is a view of it, not a copy)."""
        if self._download is not None:
            out = self._download(value, np.dtype(ORT_TYPES.get(value.data_type(), np.float32)))
            if out is not None:
                return out
        out = value.numpy()
        return out.copy() if self.device == "cpu" else out

    def _load(self, fixed: _Fixed, feeds: dict[str, Any], first: bool) -> None:
        """Each input into its fixed buffer: host arrays copied up in place, float device tensors copied on the device
        (copy graphs, all of them in one run: device_copy.py; they are float32, others, e.g. int64 upsampling taps,
        come through the host); static inputs only when the buffers are new (`first`)."""
        on_device: list[tuple[str, Any]] = []
        for name, value in feeds.items():
            if name in self._static and not first:
                continue
            buf = fixed.inputs[name]
            if self._types[name] == np.float32 and (
                    isinstance(value, OrtDeviceTensor)
                    or (isinstance(value, DeviceTensor) and hasattr(value, "ptr") and self.device == "cuda")):
                if not first and isinstance(value, OrtDeviceTensor) and fixed.loaded.get(name) is value:
                    continue  # already in its buffer (module docstring; ONNX Runtime's outputs, each run's own)
                on_device.append((name, value))
            else:
                host = np.ascontiguousarray(as_host(value), dtype=self._types[name])
                if host.nbytes <= SMALL_HOST_INPUT:  # compared, not copied, when unchanged: a copy is a synchronisation
                    if not first and np.array_equal(fixed.small.get(name), host):
                        continue
                    fixed.small[name] = host.copy()
                buf.update_inplace(host)
        if on_device:
            self._copy.into([(value, fixed.inputs[name]) for name, value in on_device])
            for name, value in on_device:
                fixed.loaded[name] = value

    @staticmethod
    def _replay(fixed: _Fixed) -> None:
        # a CUDA-graph replay returns before the GPU is done; the next step runs on another session's stream
        fixed.session.run_with_iobinding(fixed.binding)
        fixed.binding.synchronize_outputs()

    def _disagreement(self, got: dict[str, np.ndarray], want: list[np.ndarray]) -> str | None:
        """Why a fixed session's first outputs are not the plain session's (None: they agree). Float outputs may
        differ by the tolerance relative to their largest magnitude (floor 1); bool outputs, and the float masks of
        MASK_VALUE_OUTPUTS, in `bool_flips` of their values at most."""
        floats = []
        for (name, value), ref in zip(got.items(), want):
            if ref.dtype == np.bool_ or name in MASK_VALUE_OUTPUTS:
                flipped = int(np.count_nonzero(value != ref))
                if flipped > self.bool_flips * ref.size:
                    return f"{name}: {flipped} of {ref.size} values differ"
                continue
            floats.append((value, ref))
        rel = relative_difference([v for v, _ in floats], [r for _, r in floats])
        return f"differs from the plain one by {rel:.3g} of its largest magnitude" if rel > self.tolerance else None

    def _make_fixed(self, sig: Signature, feeds: dict[str, Any], reference: list[Any]) -> None:
        """A session with this signature's dimensions fixed, bound to new buffers; kept only if its first
        replay of `feeds` reproduces `reference` (the plain session's outputs of the same feeds)."""
        import onnxruntime as ort

        shapes, wanted = dict(sig[0]), sig[1]
        key = status_key(sig)
        graph = self._capture and self.device == "cuda"
        size = sum(int(np.prod(s)) * np.dtype(self._types[n]).itemsize for n, s in shapes.items())
        size += sum(int(as_host(r).nbytes) if isinstance(r, np.ndarray) else 4 * int(np.prod(_shape(r))) for r in reference)
        if self.max_buffer_bytes is not None and size > self.max_buffer_bytes:
            self.status[key] = (f"not captured: its buffers would hold {size / 2**20:.0f} MiB of device memory "
                                f"(cap {self.max_buffer_bytes / 2**20:.0f} MiB)")
            log.info("sam2rt: %s: %s", self.name, self.status[key])
            return
        try:
            session = self._factory(graph, fixed_dims(self._symbolic, shapes))
        except Exception as exc:  # ONNX Runtime refuses to capture graphs with nodes it runs on the CPU
            self.status[key] = f"not captured: {str(exc).splitlines()[0][:200]}"
            log.info("sam2rt: %s: %s", self.name, self.status[key])
            return
        dev, dev_id = self.device, self.device_id
        io = session.io_binding()
        inputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(s), self._types[n], dev, dev_id) for n, s in shapes.items()}
        for n, v in inputs.items():
            io.bind_ortvalue_input(n, v)
        outputs = {}
        for n, ref in zip(self.output_names if wanted is None else wanted, reference):
            dtype = ref.dtype if isinstance(ref, np.ndarray) else np.float32  # device outputs are float32 (OrtDeviceTensor)
            outputs[n] = ort.OrtValue.ortvalue_from_shape_and_type(list(_shape(ref)), dtype, dev, dev_id)
            io.bind_ortvalue_output(n, outputs[n])
        fixed = _Fixed(session, io, inputs, outputs)
        try:
            self._load(fixed, feeds, first=True)
            self._replay(fixed)  # under GPU_WORK.exclusive (_run)
            fixed.runs.mark()
            wrong = self._disagreement({n: v.numpy() for n, v in outputs.items()}, [as_host(r) for r in reference])
        except Exception as exc:
            self.status[key] = f"failed: {str(exc).splitlines()[0][:200]}"
            log.warning("sam2rt: %s: %s", self.name, self.status[key])
            return
        if wrong is not None:
            self.status[key] = f"rejected: the fixed-shape session {wrong}"
            log.warning("sam2rt: %s: %s", self.name, self.status[key])
            return
        fixed.last_used = self._clock()
        self._fixed[sig] = fixed
        self.status[key] = "captured" if graph else "fixed buffers"
