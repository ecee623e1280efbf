"""SAM 2's pre- and postprocessing as ONNX Runtime sessions on the device that runs the model.

The graphs ship with the package (sam2rt/runtime/graphs, built by sam2rt.export.device_graphs):
preprocessing is the exact antialiased resize + normalisation as two block-banded matrix products; postprocessing is
the token choice, the clamp, the bilinear upsampling and the threshold. On a GPU provider the image goes up
once as uint8 and only the final masks, scores and 256x256 logits come down. The sessions always compute in
true FP32 (TF32 off), whatever the model's precision: they must equal the numpy path (sam2rt.runtime.
preprocess / postprocess) within 1e-5, and they are cheap in arithmetic.

They are not cheap in launches: on an H100 the 38-node postprocessing took 1.2-1.5 ms around a 0.5 ms decoder
(benchmarks/README.md, run 4), ONNX Runtime's per-node host overhead on a graph with symbolic dimensions. With
`fixed_buffers` (the GPU default, set by OrtDeviceBackend) each of these graphs runs through a FixedShapeSession
(fixed_shapes.py): an image size, prompt count and output choice used on CAPTURE_AFTER calls is replayed as one CUDA
graph from fixed buffers; the upsampling taps and resize matrices, set by the sizes, are copied into them once.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..postprocess import _linear_taps
from ..preprocess import _OFFSET, _SCALE, resize_windows
from ..staging import UploadStaging
from .base import DecodedMasks, MaskRequest
from .bound_session import BoundSession
from .capture_lock import gpu_work
from .device_copy import DeviceCopier
from .fixed_shapes import FixedShapeSession
from .onnxruntime_backend import OrtDeviceTensor

log = logging.getLogger("sam2rt")

GRAPH_DIR = Path(__file__).resolve().parent.parent / "graphs"
CACHED_SIZES = 8  # image sizes whose resize matrices / upsampling taps stay on the device
TAP_NAMES = ("c0", "c1", "r0", "r1", "cw0_col", "cw1_col", "rw0", "rw1")
# per graph, the inputs whose values follow from the input shapes alone (FixedShapeSession's static inputs)
RESIZE_INPUTS = ("index_w", "taps_w", "index_h", "taps_h")  # preprocess.onnx's resize windows (resize_windows)
STATIC_INPUTS = {"preprocess": (*RESIZE_INPUTS, "scale", "offset"), "postprocess_single": TAP_NAMES,
                 "postprocess_multi": TAP_NAMES, "upsample": TAP_NAMES}
FIXED_SHAPES_PER_GRAPH = 4  # e.g. one click and a batch of boxes, at two image sizes
FIXED_BUFFER_BYTES = 64 * 2**20  # three 1920x1080 float masks fit (25 MB); larger runs are bound by their copies


def graph_sha256(name: str) -> str:
    """The sha256 of the package's graph `name` (e.g. "postprocess_single"): the merged decode graphs of a model
    directory record the postprocessing's they were made with (export/decode_graphs.py)."""
    return hashlib.sha256((GRAPH_DIR / f"{name}.onnx").read_bytes()).hexdigest()


def resize_feeds(h: int, w: int, size: int) -> dict[str, np.ndarray]:
    """preprocess.onnx's resize inputs (RESIZE_INPUTS) for an HxW image: the width's and the height's windows."""
    index_w, taps_w = resize_windows(w, size)
    index_h, taps_h = resize_windows(h, size)
    return {"index_w": index_w, "taps_w": taps_w, "index_h": index_h, "taps_h": taps_h}


def bind_host_outputs(io: Any, outputs: dict[str, tuple[tuple[int, ...], Any]],
                      allocate: Callable[[tuple[int, ...], Any], np.ndarray | None] | None = None) -> dict[str, np.ndarray]:
    """Fresh host arrays ({name: (shape, dtype)}) bound as a run's outputs, by address (from `allocate` where it
    gives one, e.g. a pinned array of the pipeline's pool; else np.empty).

    ONNX Runtime then writes them in place (copied straight from the device with a GPU provider). Outputs bound by
    device name instead land in ONNX Runtime's memory, and `copy_outputs_to_cpu` copies them once more: 25 MB for
    three 1920x1080 float masks, ~3 ms of the CPU provider's 20 ms postprocessing (benchmarks/README.md). Each
    call returns new arrays: no result is ever overwritten by a later one.
    """
    arrays = {}
    for name, (shape, dtype) in outputs.items():
        array = allocate(shape, dtype) if allocate is not None else None
        arrays[name] = array if array is not None else np.empty(shape, dtype)
    for name, array in arrays.items():
        io.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
    return arrays


class _SizeCache:
    """A small LRU of per-size device tensors (resize matrices, upsampling taps)."""

    def __init__(self, make) -> None:
        self._make = make
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, key: Any) -> Any:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        value = self._make(*key)
        with self._lock:
            self._items[key] = value
            while len(self._items) > CACHED_SIZES:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class OrtPipeline:
    """preprocess / postprocess / copy on one ONNX Runtime provider, with their inputs cached on its device.

    `ort_device` is ONNX Runtime's device name for OrtValues ("cuda" or "cpu"); `providers` the session
    providers (with options). `fixed_buffers`: run preprocess / postprocess / upsample_masks through fixed-shape
    sessions (module docstring), replayed as CUDA graphs where `cuda_graphs` and the provider allow.
    `pinned_results`: masks and logits of the pool's `min_bytes` (256 KiB) and more come down into page-locked arrays
    of a PinnedPool (runtime/gpu.py: a copy into pageable memory runs at a fraction of the bus's speed); None: on a
    CUDA device where cuda-python is installed. Where it pins, images of as many bytes go up through a page-locked
    block of `staging` (runtime/staging.py) while `pinned_uploads` is on (the default; the GPU benchmark turns it off
    to time what it brings). The CPU provider runs the same graphs, every way: that is how CI tests them.
    """

    def __init__(self, ort: Any, providers: list, ort_device: str, device_id: int, session_options,
                 fixed_buffers: bool = False, cuda_graphs: bool = True, pinned_results: bool | None = None) -> None:
        self._ort = ort
        self._providers = providers
        self.ort_device = ort_device
        self.device_id = device_id
        self._so = session_options
        self._sessions: dict[str, Any] = {}
        self._copier: DeviceCopier | None = None  # `copier`, made on first use
        self._lock = threading.RLock()
        self._resize = _SizeCache(self._make_resize)
        self._taps = _SizeCache(self._make_taps)
        self._consts: dict[str, Any] = {}
        self.fixed_buffers, self._cuda_graphs = bool(fixed_buffers), bool(cuda_graphs)
        self._fixed: dict[str, tuple[FixedShapeSession, threading.Lock]] = {}
        self._calls = 0  # the fixed-shape sessions' clock: one tick per pipeline call
        self.pinned = self._pinned_pool(ort_device == "cuda" if pinned_results is None else pinned_results,
                                        required=bool(pinned_results))
        self.pinned_uploads = True
        self.staging: UploadStaging | None = None  # made on the first staged upload

    @staticmethod
    def _pinned_pool(wanted: bool, required: bool) -> Any:
        """A PinnedPool, or None when not wanted or (unless `required`) when cuda-python is missing."""
        if not wanted:
            return None
        from ..gpu import PinnedPool

        try:
            return PinnedPool()
        except Exception:
            if required:
                raise
            return None  # pageable results: cuda-python (`pip install cuda-python`) is what pins them

    def _allocate(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray | None:
        pool = self.pinned
        return self._pinning(lambda: pool.empty(shape, dtype)) if pool is not None else None

    def _staged(self, image: np.ndarray) -> Any:
        """A context giving `image` (contiguous) as the upload's source: its copy in a page-locked block of the
        pipeline's UploadStaging (runtime/staging.py) where `pinned_uploads` is on and cuda-python pins (`pinned`),
        else the image itself. The upload must be done when the context ends."""
        if not self.pinned_uploads or self.pinned is None:
            return nullcontext(image)
        with self._lock:
            if self.staging is None:
                self.staging = UploadStaging()
        return self.staging.take(image)

    def _download(self, value: Any, dtype: np.dtype) -> np.ndarray | None:
        from ..gpu import download

        pool = self.pinned
        return self._pinning(lambda: download(value, pool, dtype)) if pool is not None else None

    def _pinning(self, step: Callable[[], np.ndarray | None]) -> np.ndarray | None:
        """A pinned-results step; should it fail (cuda-python and the driver disagreeing, say), results come down
        into pageable memory from then on, as without cuda-python: the numbers never depend on pinning."""
        try:
            return step()
        except Exception as exc:
            log.warning("sam2rt: page-locked results off (%s); results come down into pageable memory", exc)
            self.pinned = None
            return None

    # --- sessions and device constants -------------------------------------------------------
    def session(self, name: str) -> Any:
        s = self._sessions.get(name)
        if s is None:
            with self._lock:
                s = self._sessions.get(name)
                if s is None:
                    s = self._sessions[name] = self._ort.InferenceSession(
                        str(GRAPH_DIR / f"{name}.onnx"), sess_options=self._so(), providers=self._providers)
        return s

    def _new_session(self, name: str, graph: bool, dims: dict[str, int]) -> Any:
        """A session of graph `name` with `dims` fixed, captured as a CUDA graph when `graph` (FixedShapeSession's factory)."""
        so = self._so()
        for dim, size in dims.items():
            so.add_free_dimension_override_by_name(dim, int(size))
        providers = [(p[0], {**p[1], "enable_cuda_graph": "1" if graph else "0"})
                     if isinstance(p, tuple) and p[0] == "CUDAExecutionProvider" else p for p in self._providers]
        return self._ort.InferenceSession(str(GRAPH_DIR / f"{name}.onnx"), sess_options=so, providers=providers)

    def _run_fixed(self, name: str, feeds: dict[str, Any], outputs: tuple[str, ...],
                   device_outputs: tuple[str, ...] = ()) -> list[Any]:
        """One run of graph `name` through its FixedShapeSession: `outputs` in order, host arrays except `device_outputs`
        (OrtDeviceTensors). OrtValues among `feeds` are on this pipeline's device."""
        with self._lock:
            entry = self._fixed.get(name)
            if entry is None:
                self.add_graph(name, self.session(name), lambda graph, dims: self._new_session(name, graph, dims),
                               STATIC_INPUTS.get(name, ()))
                entry = self._fixed[name]
            self._calls += 1
        fixed, lock = entry
        feeds = {k: OrtDeviceTensor(v) if isinstance(v, self._ort.OrtValue) else v for k, v in feeds.items()}
        with lock:
            return fixed.run(feeds, device_outputs, outputs)

    def add_graph(self, name: str, session: Any, factory: Callable[[bool, dict[str, int]], Any],
                  static_inputs: tuple[str, ...] = (), precision: str = "fp32", **options: Any) -> None:
        """Run graph `name` (`session`: its plain session; `factory`: its fixed-dimension sessions) through a
        FixedShapeSession of this pipeline: the pipeline's own graphs on first use, and the backend's merged decode
        graphs (its providers, its precision), whose replays then count in `fixed_status` and `replay_seconds` as
        the pipeline's. `options`: FixedShapeSession's (capture_after, bool_flips, max_shapes)."""
        with self._lock:
            if name in self._fixed:
                return
            options.setdefault("max_shapes", FIXED_SHAPES_PER_GRAPH)
            fixed = FixedShapeSession(
                BoundSession(session), factory, self.copier, lambda: self._calls,
                precision=precision, capture=self._cuda_graphs, static_inputs=static_inputs, name=f"{name} graph",
                max_buffer_bytes=FIXED_BUFFER_BYTES, download=self._download if self.pinned is not None else None,
                **options)
            self._fixed[name] = (fixed, threading.Lock())

    def run_fixed(self, name: str, feeds: dict[str, Any], outputs: tuple[str, ...]) -> list[Any]:
        """One run of a graph added with add_graph: `outputs` in order, as host arrays."""
        return self._run_fixed(name, feeds, outputs)

    def refused(self, name: str, feeds: dict[str, Any], outputs: tuple[str, ...]) -> str | None:
        """Why graph `name`'s runs of these feeds stay on its plain session for good (FixedShapeSession.refused)."""
        with self._lock:
            entry = self._fixed.get(name)
        return None if entry is None else entry[0].refused(feeds, outputs)

    @property
    def fixed_status(self) -> dict[str, dict[str, str]]:
        """Per graph run through fixed buffers: each captured signature -> "captured" (a CUDA graph), "fixed
        buffers" (CPU provider) or why it runs on the plain session."""
        with self._lock:
            return {name: dict(fixed.status) for name, (fixed, _) in self._fixed.items()}

    @property
    def replay_seconds(self) -> dict[str, tuple[dict[str, float], int]]:
        """Per graph run through fixed buffers: its seconds per part of a replay summed so far (inputs in, replay,
        outputs out: FixedShapeSession.seconds) and its replays."""
        with self._lock:
            return {name: (dict(fixed.seconds), fixed.replays) for name, (fixed, _) in self._fixed.items()}

    @property
    def replays(self) -> int:
        """Runs served from fixed buffers so far, over all graphs."""
        with self._lock:
            return sum(fixed.replays for fixed, _ in self._fixed.values())

    def to_device(self, array: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.ort_device, self.device_id)

    def _const(self, name: str, value: np.ndarray) -> Any:
        v = self._consts.get(name)
        if v is None:
            v = self._consts[name] = self.to_device(value)
        return v

    def _make_resize(self, h: int, w: int, size: int) -> dict[str, Any]:
        return {k: self.to_device(v) for k, v in resize_feeds(h, w, size).items()}

    def _make_taps(self, h: int, w: int, lh: int, lw: int) -> dict[str, Any]:
        c0, c1, cl = _linear_taps(lw, w)
        r0, r1, rl = _linear_taps(lh, h)
        host = {"c0": c0, "c1": c1, "r0": r0, "r1": r1, "cw0_col": (1 - cl)[:, None], "cw1_col": cl[:, None],
                "rw0": (1 - rl)[:, None], "rw1": rl[:, None]}
        return {k: self.to_device(v) for k, v in host.items()}

    # --- the three operations -----------------------------------------------------------------
    @gpu_work
    def preprocess(self, image_rgb: np.ndarray, size: int, out: Any | None = None) -> Any:
        """uint8 HxWx3 RGB (host) -> normalised (1,3,size,size) float32 OrtValue on the device (into `out` if given)."""
        h, w = int(image_rgb.shape[0]), int(image_rgb.shape[1])
        with self._staged(np.ascontiguousarray(image_rgb, dtype=np.uint8)) as image:
            feeds = {"image": image, **self._resize((h, w, size)), "scale": self._const("scale", _SCALE.reshape(3, 1, 1)),
                     "offset": self._const("offset", _OFFSET.reshape(3, 1, 1))}
            if self.fixed_buffers and out is None:
                return self._run_fixed("preprocess", feeds, ("image_out",), ("image_out",))[0].value
            sess = self.session("preprocess")
            io = sess.io_binding()
            io.bind_cpu_input("image", feeds.pop("image"))
            for name, value in feeds.items():
                io.bind_ortvalue_input(name, value)
            if out is None:
                io.bind_output("image_out", self.ort_device, self.device_id)
            else:
                io.bind_ortvalue_output("image_out", out)
            sess.run_with_iobinding(io)  # returns when the upload and the run are done: the block may go back
            return out if out is not None else io.get_outputs()[0]

    def preprocess_to_host(self, image_rgb: np.ndarray, size: int) -> np.ndarray:
        """preprocess() into a new host array, on the CPU provider (the CPU backend's preprocessing)."""
        h, w = int(image_rgb.shape[0]), int(image_rgb.shape[1])
        feeds = {"image": np.ascontiguousarray(image_rgb, dtype=np.uint8), **resize_feeds(h, w, size),
                 "scale": _SCALE.reshape(3, 1, 1), "offset": _OFFSET.reshape(3, 1, 1)}
        return self.session("preprocess").run(["image_out"], feeds)[0]

    @property
    def copier(self) -> DeviceCopier:
        """Device-to-device copies on this pipeline's device, several per run (device_copy.py)."""
        if self._copier is None:
            with self._lock:
                if self._copier is None:
                    self._copier = DeviceCopier(self.session)
        return self._copier

    @gpu_work
    def copy(self, value: Any, out: Any | None = None) -> Any:
        """A device-to-device copy of a float32 OrtValue (into `out`, or a fresh allocation)."""
        if out is None:
            return self.copier.out([value])[0]
        self.copier.into([(value, out)])
        return out

    @gpu_work
    def copy_many(self, values: list[Any], outs: list[Any] | None = None) -> list[Any]:
        """copy() of several float32 OrtValues in as few runs as the copy graphs allow (device_copy.py)."""
        if outs is None:
            return self.copier.out(values)
        self.copier.into(list(zip(values, outs)))
        return outs

    @gpu_work
    def upsample_masks(self, logits: np.ndarray, orig_hw: tuple[int, int], threshold: float) -> np.ndarray:
        """(B,C,h,w) host logits -> (B,C,H,W) bool masks above `threshold`, upsampled on the device (upsample.onnx:
        the arithmetic of the host Upsampler); only the masks come down."""
        x = np.ascontiguousarray(logits, dtype=np.float32)
        h, w = (int(d) for d in orig_hw)
        taps = self._taps((h, w, int(x.shape[-2]), int(x.shape[-1])))
        if self.fixed_buffers:
            feeds = {"logits": x, **taps, "threshold": np.asarray(threshold, np.float32)}
            return self._run_fixed("upsample", feeds, ("masks",))[0]
        sess = self.session("upsample")
        io = sess.io_binding()
        io.bind_cpu_input("logits", x)
        for name, value in taps.items():
            io.bind_ortvalue_input(name, value)
        io.bind_cpu_input("threshold", np.asarray(threshold, np.float32))
        out = bind_host_outputs(io, {"masks": ((*x.shape[:2], h, w), np.bool_)}, self._allocate)
        sess.run_with_iobinding(io)
        return out["masks"]

    def postprocess_feeds(self, request: MaskRequest, low_hw: tuple[int, int]) -> tuple[str, dict[str, Any], str]:
        """The postprocessing graph `request` runs on (lh, lw) logits, its inputs but the decoder's two (the
        upsampling taps on the device, the threshold, the stability test's settings), and the output it wants (the
        masks as bool or float 0/1, or the upsampled logits). The merged decode graphs take the same inputs."""
        single = not request.multimask_output
        h, w = (int(d) for d in request.orig_hw)
        feeds: dict[str, Any] = dict(self._taps((h, w, int(low_hw[0]), int(low_hw[1]))))
        feeds["threshold"] = np.asarray(0.0 if request.threshold is None else request.threshold, np.float32)
        if single:
            choice = request.choice
            feeds["stability_delta"] = np.asarray(choice.stability_delta, np.float32)
            feeds["stability_thresh"] = np.asarray(choice.stability_thresh if choice.dynamic_via_stability else -np.inf,
                                                   np.float32)
        wanted = "upsampled" if request.threshold is None else ("mask_values" if request.float_masks else "masks")
        return ("postprocess_single" if single else "postprocess_multi"), feeds, wanted

    @gpu_work
    def postprocess(self, low_res: Any, iou: Any, request: MaskRequest) -> DecodedMasks:
        """The decoder's (B,4,h,w) logits and (B,4) scores (OrtValues on the device, or numpy) -> host results.

        Only what `request` asks for comes back: the masks (bool, or float32 0/1) or the upsampled logits,
        and the chosen tokens' scores and clamped low-res logits.
        """
        b, _, lh, lw = (int(d) for d in (low_res.shape() if callable(getattr(low_res, "shape", None)) else low_res.shape))
        h, w = (int(d) for d in request.orig_hw)
        graph, feeds, wanted = self.postprocess_feeds(request, (lh, lw))
        for name, value in (("low_res_masks", low_res), ("iou_predictions", iou)):
            feeds[name] = np.ascontiguousarray(value, dtype=np.float32) if isinstance(value, np.ndarray) else value
        single = graph == "postprocess_single"
        if self.fixed_buffers:
            logits, scores, masks = self._run_fixed(graph, feeds, ("low_res_logits", "scores", wanted))
            return DecodedMasks(masks, scores, logits)
        sess = self.session(graph)
        io = sess.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                io.bind_cpu_input(name, value)
            else:
                io.bind_ortvalue_input(name, value)
        c = 1 if single else 3
        out = bind_host_outputs(io, {"low_res_logits": ((b, c, lh, lw), np.float32), "scores": ((b, c), np.float32),
                                     wanted: ((b, c, h, w), np.bool_ if wanted == "masks" else np.float32)},
                                self._allocate)
        sess.run_with_iobinding(io)
        return DecodedMasks(out[wanted], out["scores"], out["low_res_logits"])

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._copier = None
            self._fixed.clear()
            if self.pinned is not None:
                self.pinned.close()
            if self.staging is not None:
                self.staging.close()
        self._resize.clear()
        self._taps.clear()
        self._consts.clear()
