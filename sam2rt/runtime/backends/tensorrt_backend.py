"""TensorRT backend: the engines from `sam2rt build-engine`, run natively through `tensorrt` + `cuda-python`.

- No torch and no pycuda: device memory, pinned host memory, the stream and CUDA graphs come from
  cuda-python's runtime bindings (sam2rt.runtime.gpu).
- `encode` uploads the preprocessed image through a pinned host buffer and returns the three features
  as `DeviceArray`s that stay on the GPU: an Embedding from this backend never round-trips to the host.
- The decoder's inputs live in fixed device buffers sized for the largest profile; each (B, N) shape
  gets its own execution context, set up once and captured (prompt upload + enqueue + result download)
  into a CUDA graph, so a decode is one graph launch and one synchronisation. A new embedding's
  features are copied device-to-device into the decoder's buffers once, on its first decode.
- The engines are checked against this machine (TensorRT version, GPU name and compute capability,
  sha256, the ONNX export they came from) before they are deserialised: see sam2rt.runtime.engines.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ...errors import BackendUnavailableError, InvalidEmbeddingError, InvalidPromptError, ModelFileError
from ...manifest import Manifest
from ..embedding import FEATURE_NAMES
from ..engines import (
    DECODER_PROMPT_INPUTS,
    EngineEnvironment,
    check_engines,
    engine_entries,
    max_decoder_shape,
    min_decoder_points,
    profile_for,
    prompt_shapes,
    select_precision,
    tensorrt_missing_message,
)
from ..gpu import CudaError, CudaGraph, DeviceArray, PinnedBuffer, Stream, cuda_status, set_device
from ..host_copy import parallel_copy
from ..tensors import as_host
from .base import Backend

log = logging.getLogger("sam2rt")

DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")
MAX_CAPTURED_SHAPES = 12  # each holds a copy of the decoder engine (a few MB of weights)


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(tensorrt_missing_message()) from exc
    return trt


def tensorrt_status() -> str:
    """'available' or why the TensorRT backend cannot run here (cheap: loads no engine)."""
    try:
        _import_trt()
    except BackendUnavailableError as exc:
        return f"unavailable: {exc}"
    status = cuda_status()
    return status


class _Engine:
    """A deserialised engine, its IO tensors, and execution contexts that may share one scratch buffer.

    TensorRT lets only one execution context use an optimisation profile at a time, so each decoder
    shape gets its own copy of the engine (`fresh=True`; the decoder's weights are a few MB) rather
    than a second context on a shared profile.
    """

    def __init__(self, trt, runtime, path, stream: Stream) -> None:
        self.trt = trt
        self.path = path
        self.stream = stream
        self.runtime = runtime
        self.plan = path.read_bytes()
        self.engine = self._deserialize()
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.dtypes: dict[str, np.dtype] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)
            self.dtypes[name] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
        self._scratch: DeviceArray | None = None
        self._scratch_size = self._device_memory_size(self.engine)

    def _deserialize(self):
        engine = self.runtime.deserialize_cuda_engine(self.plan)
        if engine is None:
            raise ModelFileError(
                f"TensorRT could not deserialise {self.path} (see TensorRT's log above); rebuild it with `sam2rt build-engine`"
            )
        return engine

    def static_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.engine.get_tensor_shape(name))

    @staticmethod
    def _device_memory_size(engine) -> int | None:
        for attr in ("device_memory_size_v2", "device_memory_size"):
            try:
                size = getattr(engine, attr)
            except Exception:
                continue
            if isinstance(size, int) and size >= 0:
                return size
        return None

    def new_context(self, profile: int | None, fresh: bool = False):
        """(engine, context) on `profile`; with `fresh`, on a new copy of the engine (see the class doc).

        Contexts share one scratch allocation where TensorRT allows it (they all run on one stream).
        """
        trt = self.trt
        engine = self._deserialize() if fresh else self.engine
        ctx = None
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None and self._scratch_size is not None:
            try:
                ctx = engine.create_execution_context(strategy.USER_MANAGED)
            except Exception:  # an older/newer API: fall back to TensorRT's own allocation
                ctx = None
            if ctx is not None:
                if self._scratch is None:
                    self._scratch = DeviceArray((max(self._scratch_size, 1),), np.uint8)
                if hasattr(ctx, "set_device_memory"):
                    ctx.set_device_memory(self._scratch.ptr, self._scratch.nbytes)
                else:
                    ctx.device_memory = self._scratch.ptr
        if ctx is None:
            ctx = engine.create_execution_context()
        if ctx is None:
            raise CudaError(f"TensorRT could not create an execution context for {self.path.name} (out of GPU memory?)")
        if profile is not None and engine.num_optimization_profiles > 1:
            if not ctx.set_optimization_profile_async(profile, self.stream.handle):
                raise CudaError(f"TensorRT refused optimisation profile {profile} of {self.path.name}")
            self.stream.synchronize()
        return engine, ctx


class _ShapeExec:
    """One decoder shape: its engine copy, context and (when capture worked) its CUDA graph."""

    def __init__(self, engine, ctx, graph: CudaGraph | None) -> None:
        self.engine = engine
        self.ctx = ctx
        self.graph = graph

    def destroy(self) -> None:
        if self.graph is not None:
            self.graph.destroy()
        self.graph = None
        self.ctx = None
        self.engine = None


class TensorRTBackend(Backend):
    """Runs encoder.<precision>.engine and decoder.<precision>.engine on CUDA device `device`.

    Preprocessing and postprocessing are the base class's host (numpy) paths: the device pipeline of
    OrtDeviceBackend is ONNX Runtime's, and TensorRT could not be installed to build and measure one here.
    """

    name = "tensorrt"

    def __init__(
        self,
        manifest: Manifest,
        threads: int | None = None,
        precision: str | None = None,
        device: int = 0,
        use_cuda_graph: bool = True,
        verify: bool = True,
    ) -> None:
        super().__init__()
        trt = _import_trt()
        status = cuda_status(device)
        if status != "available":
            raise BackendUnavailableError(f"the tensorrt backend needs a CUDA GPU: {status.removeprefix('unavailable: ')}")
        manifest.require_backend(self.name)  # engines are built from a --target tensorrt export's graphs
        if not engine_entries(manifest):
            raise BackendUnavailableError(
                f"no TensorRT engines in {manifest.directory}: build them on this machine with "
                f"`sam2rt build-engine --model-dir {manifest.directory} --fp16`"
            )
        self.precision = select_precision(manifest, precision)
        self.threads = threads
        set_device(device)
        env = EngineEnvironment.detect(device)
        paths = check_engines(manifest, self.precision, env, verify_sha=verify)
        self.manifest = manifest
        self.device = f"cuda:{device}"
        self.device_index = device
        self.use_cuda_graph = use_cuda_graph
        self.environment = env
        entry = engine_entries(manifest)[self.precision]
        self.files = {"encoder": entry["encoder"], "decoder": entry["decoder"]}
        # FP32 engines compute what the ONNX graphs compute; reduced-precision embeddings get their own key
        self.encoder_key = manifest.graph("encoder")["sha256"] if self.precision == "fp32" else entry["encoder"]["sha256"]
        self._profiles = entry["decoder"]["profiles"]
        self._max_b, self._max_n = max_decoder_shape(self._profiles)
        self._min_n = min_decoder_points(self._profiles)
        self.low_res = int(manifest.data.get("low_res_size", 256))

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.stream = Stream()
        self._enc = _Engine(trt, self._runtime, paths["encoder"], self.stream)
        self._dec = _Engine(trt, self._runtime, paths["decoder"], self.stream)

        # encoder: pinned upload buffer -> device input; outputs are allocated per embedding
        self._img_shape = self._enc.static_shape("image")
        self._img_pin = PinnedBuffer(self._img_shape, self._enc.dtypes["image"])
        self._img_dev = DeviceArray(self._img_shape, self._enc.dtypes["image"], device)
        _, self._enc_ctx = self._enc.new_context(0)
        self._enc_ctx.set_input_shape("image", self._img_shape)
        self._enc_ctx.set_tensor_address("image", self._img_dev.ptr)
        self._feature_shapes = {n: self._enc.static_shape(n) for n in FEATURE_NAMES}

        # decoder: fixed device buffers (largest profile) so captured graphs stay valid
        self._feat_dev = {n: DeviceArray(self._dec.static_shape(n), self._dec.dtypes[n], device) for n in FEATURE_NAMES}
        max_in = prompt_shapes(self._max_b, self._max_n, self.low_res)
        self._in_dev = {n: DeviceArray(max_in[n], self._dec.dtypes[n], device) for n in DECODER_PROMPT_INPUTS}
        self._in_pin = {n: PinnedBuffer(max_in[n], self._dec.dtypes[n]) for n in DECODER_PROMPT_INPUTS}
        max_out = {"low_res_masks": (self._max_b, 4, self.low_res, self.low_res), "iou_predictions": (self._max_b, 4)}
        self._out_dev = {n: DeviceArray(max_out[n], self._dec.dtypes[n], device) for n in DECODER_OUTPUTS}
        self._out_pin = {n: PinnedBuffer(max_out[n], self._dec.dtypes[n]) for n in DECODER_OUTPUTS}
        for buf in (*self._in_pin.values(), *self._out_pin.values()):
            buf.array[...] = 0
        self._loaded_token: tuple[int, ...] | None = None
        self._shapes: OrderedDict[tuple[int, int], _ShapeExec] = OrderedDict()
        # one stream, one set of staging buffers: calls from several threads (a server) take turns
        self._lock = threading.RLock()

    # --- encoder ------------------------------------------------------------------------------
    def encode(self, image: np.ndarray) -> dict[str, Any]:
        """Normalised (1,3,S,S) image -> the three features as DeviceArrays (they stay on the GPU)."""
        self._check_open()
        with self._lock:
            return self._encode(image)

    def _encode(self, image: np.ndarray) -> dict[str, Any]:
        if tuple(image.shape) != self._img_shape:
            raise ValueError(f"the encoder engine takes an image of shape {self._img_shape}, got {image.shape}")
        parallel_copy(self._img_pin.array, image)  # 12 MiB of float32 into the pinned block, on a few threads
        self.stream.memcpy_htod(self._img_dev.ptr, self._img_pin.ptr, self._img_pin.nbytes)
        feats = {n: DeviceArray(self._feature_shapes[n], self._enc.dtypes[n], self.device_index) for n in FEATURE_NAMES}
        for n, buf in feats.items():
            self._enc_ctx.set_tensor_address(n, buf.ptr)
        if not self._enc_ctx.execute_async_v3(self.stream.handle):
            raise CudaError("TensorRT failed to run the encoder engine (see TensorRT's log above)")
        self.stream.synchronize()  # the pinned buffer is reused by the next encode
        return feats

    def upload_features(self, features: dict[str, Any]) -> dict[str, DeviceArray]:
        """Host features (numpy) -> DeviceArrays on this backend's GPU (Embedding.to_device uses this)."""
        out = {}
        for n in FEATURE_NAMES:
            arr = np.ascontiguousarray(np.asarray(features[n]), dtype=self._enc.dtypes[n])
            if arr.shape != self._feature_shapes[n]:
                raise InvalidEmbeddingError(f"feature {n} has shape {arr.shape}, this model's is {self._feature_shapes[n]}")
            out[n] = DeviceArray.from_host(arr, self.device_index)
        return out

    # --- decoder ------------------------------------------------------------------------------
    def _load_features(self, features: dict[str, Any]) -> None:
        """Make the decoder's feature buffers hold `features` (a no-op when they already do)."""
        missing = [n for n in FEATURE_NAMES if n not in features]
        if missing:
            raise InvalidEmbeddingError(f"embedding lacks features {missing}")
        if all(isinstance(features[n], DeviceArray) for n in FEATURE_NAMES):
            token = tuple(features[n].token for n in FEATURE_NAMES)
            if token == self._loaded_token:
                return
            for n in FEATURE_NAMES:
                src, dst = features[n], self._feat_dev[n]
                if src.nbytes != dst.nbytes or src.dtype != dst.dtype:
                    raise InvalidEmbeddingError(f"feature {n} is {src.shape} {src.dtype}, the decoder takes {dst.shape} {dst.dtype}")
                self.stream.memcpy_dtod(dst.ptr, src.ptr, dst.nbytes)
            self._loaded_token = token
            return
        for n in FEATURE_NAMES:  # host (numpy) or another device: copy in every time
            value = features[n]
            arr = np.ascontiguousarray(as_host(value), dtype=self._dec.dtypes[n])
            if arr.shape != self._dec.static_shape(n):
                raise InvalidEmbeddingError(f"feature {n} has shape {arr.shape}, the decoder takes {self._dec.static_shape(n)}")
            self._feat_dev[n].copy_from_host(arr, self.stream)
        self._loaded_token = None

    def _enqueue(self, ctx, b: int, n: int) -> None:
        """Upload the staged prompts, run the decoder, download its outputs (all async on the stream)."""
        shapes = prompt_shapes(b, n, self.low_res)
        for name in DECODER_PROMPT_INPUTS:
            nbytes = int(np.prod(shapes[name])) * self._in_pin[name].dtype.itemsize
            self.stream.memcpy_htod(self._in_dev[name].ptr, self._in_pin[name].ptr, nbytes)
        if not ctx.execute_async_v3(self.stream.handle):
            raise CudaError("TensorRT failed to run the decoder engine (see TensorRT's log above)")
        for name, shape in (("low_res_masks", (b, 4, self.low_res, self.low_res)), ("iou_predictions", (b, 4))):
            nbytes = int(np.prod(shape)) * self._out_pin[name].dtype.itemsize
            self.stream.memcpy_dtoh(self._out_pin[name].ptr, self._out_dev[name].ptr, nbytes)

    def _executor(self, b: int, n: int) -> _ShapeExec:
        key = (b, n)
        ex = self._shapes.get(key)
        if ex is not None:
            self._shapes.move_to_end(key)
            return ex
        profile = profile_for(self._profiles, b, n)
        if profile is None:  # pragma: no cover - decode() splits and checks first
            raise InvalidPromptError(f"no decoder profile admits {b} prompts of {n} points")
        engine, ctx = self._dec.new_context(profile, fresh=True)
        for name, shape in prompt_shapes(b, n, self.low_res).items():
            if not ctx.set_input_shape(name, shape):
                raise CudaError(f"TensorRT rejected decoder input {name} of shape {shape}")
        for name in FEATURE_NAMES:
            ctx.set_input_shape(name, self._dec.static_shape(name))
            ctx.set_tensor_address(name, self._feat_dev[name].ptr)
        for name in DECODER_PROMPT_INPUTS:
            ctx.set_tensor_address(name, self._in_dev[name].ptr)
        for name in DECODER_OUTPUTS:
            ctx.set_tensor_address(name, self._out_dev[name].ptr)
        got = tuple(ctx.get_tensor_shape("low_res_masks"))
        if got != (b, 4, self.low_res, self.low_res):
            raise CudaError(f"decoder engine produces low_res_masks of shape {got} for {b} prompts; rebuild the engines")
        self._enqueue(ctx, b, n)  # one plain run first: TensorRT settles its shape-dependent state before capture
        self.stream.synchronize()
        graph = None
        if self.use_cuda_graph:
            try:
                graph = CudaGraph(self.stream, lambda: self._enqueue(ctx, b, n))
            except CudaError as exc:
                log.warning("CUDA graph capture failed for %d prompt(s) x %d point(s), running without it: %s", b, n, exc)
                self.stream.synchronize()
        ex = self._shapes[key] = _ShapeExec(engine, ctx, graph)
        while len(self._shapes) > MAX_CAPTURED_SHAPES:
            _, old = self._shapes.popitem(last=False)
            old.destroy()
        return ex

    def _decode_chunk(self, coords, labels, mask, has_mask) -> tuple[np.ndarray, np.ndarray]:
        b, n = coords.shape[:2]
        ex = self._executor(b, n)
        np.copyto(self._in_pin["point_coords"].view((b, n, 2)), coords, casting="same_kind")
        np.copyto(self._in_pin["point_labels"].view((b, n)), labels, casting="same_kind")
        np.copyto(self._in_pin["mask_input"].view((b, 1, self.low_res, self.low_res)), mask, casting="same_kind")
        np.copyto(self._in_pin["has_mask_input"].view((b,)), has_mask, casting="same_kind")
        if ex.graph is not None:
            ex.graph.launch()
        else:
            self._enqueue(ex.ctx, b, n)
        self.stream.synchronize()
        low_res = np.array(self._out_pin["low_res_masks"].view((b, 4, self.low_res, self.low_res)), dtype=np.float32)
        iou = np.array(self._out_pin["iou_predictions"].view((b, 4)), dtype=np.float32)
        return low_res, iou

    def decode(
        self,
        features: dict[str, Any],
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray,
        has_mask_input: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        self._check_open()
        with self._lock:
            return self._decode(features, point_coords, point_labels, mask_input, has_mask_input)

    def _decode(self, features, point_coords, point_labels, mask_input, has_mask_input) -> tuple[np.ndarray, np.ndarray]:
        b, n = point_coords.shape[:2]
        if not self._min_n <= n <= self._max_n:
            raise InvalidPromptError(
                f"the decoder engine takes {self._min_n} to {self._max_n} points per prompt (padding included), got {n}; "
                "rebuild with `sam2rt build-engine --max-points N` for more, or use backend='onnxruntime-cuda'"
            )
        self._load_features(features)
        if b <= self._max_b:
            return self._decode_chunk(point_coords, point_labels, mask_input, has_mask_input)
        parts = [
            self._decode_chunk(point_coords[i : i + self._max_b], point_labels[i : i + self._max_b],
                               mask_input[i : i + self._max_b], has_mask_input[i : i + self._max_b])
            for i in range(0, b, self._max_b)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @property
    def captured_shapes(self) -> dict[tuple[int, int], bool]:
        """The decoder shapes set up so far, and whether each runs as a CUDA graph."""
        return {k: v.graph is not None for k, v in self._shapes.items()}

    def close(self) -> None:
        """Destroy the captured CUDA graphs and contexts; the engines and buffers go with the object."""
        with self._lock:
            for ex in self._shapes.values():
                ex.destroy()
            self._shapes.clear()
        super().close()
