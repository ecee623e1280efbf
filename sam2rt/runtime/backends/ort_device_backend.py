"""ONNX Runtime on a GPU: the whole image -> mask path on the device, in a named precision, with CUDA graphs.

- Preprocessing, postprocessing and the model all run on the device (OrtPipeline): the uint8 image goes up
  once, the features and the decoder's logits never leave the device, only the final masks, scores and
  256x256 logits come down.
- Precisions (`onnxruntime-cuda:<mode>`): `fp32` (TF32 off: equal to the CPU path to float rounding),
  `tf32` (the default: TF32 tensor cores for matrix products and convolutions), `fp16` (the encoder's
  FP16 variant with fused MultiHeadAttention, made at export, and the merged decode graphs' FP16 copies where the
  export made them: the decoder part in FP16, its postprocessing FP32; the export checks their parity against
  the FP32 graphs. The two-graph path's decoders stay FP32 weights with TF32).
  The pre/postprocessing sessions always run in true FP32.
- CUDA graphs (ONNX Runtime's `enable_cuda_graph`): the encoder and each decoder shape (slot, prompts,
  points) seen, up to MAX_CAPTURED_SHAPES, run from fixed device buffers; data is copied into them on the
  device (`copy.onnx`), so a run is one graph replay. Where ONNX Runtime refuses to capture a graph (a
  node it places on the CPU), or a fixed-buffer session fails its first run, that session runs without one and
  `cuda_graphs` says why (the caller gets the plain session's results, never an error). The pre/postprocessing
  graphs' steady shapes (an image size, a prompt count, an output choice) are captured too (ort_pipeline.py,
  fixed_shapes.py); `pipeline_graphs` says which.
- The same class runs on the CPU provider (`OrtDeviceBackend(manifest, "onnxruntime-cpu")`, CUDA graphs
  off): CI tests the device path's data flow that way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
import threading
import time
from typing import Any

import numpy as np

from ...errors import BackendUnavailableError, InvalidEmbeddingError, ModelFileError
from ...manifest import Manifest
from ..embedding import FAST_MAX_POINTS, FEATURE_NAMES, PREPARED_NAMES, fast_prompts_per_run
from ..prompts import pack_point_prompts
from .base import Backend, DecodedMasks, MaskRequest
from ...graph_table import DEVICE_SLOTS
from .onnxruntime_backend import (
    PROVIDERS, OrtDeviceTensor, _fresh_variant, _import_ort, _trt_profile_option, attention_for, cuda_provider_options, required_variant,
    session_options,
    slot_entries,
)
from .capture_lock import GPU_WORK, ThreadRuns
from .fixed_shapes import relative_difference
from .ort_pipeline import TAP_NAMES, OrtPipeline, graph_sha256
from .bound_session import BoundSession

log = logging.getLogger("sam2rt")

GPU_PRECISIONS = ("fp32", "tf32", "fp16")
DEFAULT_GPU_PRECISION = "tf32"
MAX_CAPTURED_SHAPES = 8
# A fixed-shape decoder session whose first outputs differ from the dynamic session's by more than this, relative to
# their largest magnitude (fixed_shapes.relative_difference), is not used.
FIXED_SHAPE_TOLERANCE = 1e-3
# decoder_fast against decoder_nomask on the backend's provider (TF32 rounding included), relative in the same way.
FAST_DECODER_TOLERANCE = 1e-2
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")
# multimask_output -> the merged decode graph (graph_table's decode_multi / decode_single: decoder_fast.device + the
# postprocessing in one graph, export/decode_graphs.py) and the package's postprocessing graph it was made with
MERGED_DECODE = {True: ("decode_multi", "postprocess_multi"), False: ("decode_single", "postprocess_single")}


def fp16_slot(slot: str) -> str:
    """The slot of a merged decode graph's FP16 copy (graph_table's decode_*_fp16, onnxruntime-cuda:fp16 only)."""
    return f"{slot}_fp16"


# the fraction of a merged decode's mask pixels its first CUDA-graph replay may flip against its plain session: the
# decoder part computes in TF32, and another fusion's rounding moves a logit lying on the threshold across it
MERGED_MASK_FLIPS = 1e-3
# Prompts per decoder run. A run's intermediate tensors grow with its batch (the image tokens alone are 4 MiB per
# prompt per tensor, in every decoder), so a large batch (automatic mask generation's grids: 1024 points) runs in
# chunks of this many: device memory stays bounded, and such a batch costs at most two captured shapes.
MAX_PROMPTS_PER_RUN = 64


def tensorrt_libraries_status() -> str | None:
    """None when TensorRT's runtime library (libnvinfer) can be loaded, else why not."""
    names = [ctypes.util.find_library("nvinfer")] + [f"libnvinfer.so.{v}" for v in (10, 11, 8)]
    for name in filter(None, names):
        try:
            ctypes.CDLL(name)
            return None
        except OSError:
            continue
    return ("TensorRT libraries not found (libnvinfer could not be loaded): install TensorRT "
            "(`pip install tensorrt`, or JetPack's) or use backend='onnxruntime-cuda'")


def fp16_encoder_variant(manifest: Manifest) -> str:
    """The encoder variant onnxruntime-cuda:fp16 runs: `device_fp16` (the FP16 copy of the GPU's `device` form), or
    `fp16` (of the `fused` form) in exports made before the `device` form."""
    variants = manifest.graph("encoder").get("variants") or {}
    return "fp16" if "fp16" in variants and "device_fp16" not in variants else "device_fp16"


def fp16_encoder_entry(manifest: Manifest) -> dict[str, Any] | None:
    """The stored, fresh FP16 encoder entry of fp16_encoder_variant, or None."""
    entry = _fresh_variant(manifest, "encoder", fp16_encoder_variant(manifest))
    return entry if entry is not None and manifest.is_stored(entry) else None


def device_graph_entries(manifest: Manifest, precision: str, backend: str = "onnxruntime-cuda") -> dict[str, dict[str, Any]]:
    """Manifest entries of the graphs the device backend loads, by slot.

    The encoder: the FP16 copy of its GPU form (`device_fp16`; `fp16`, of the `fused` form, in exports before it) for
    precision fp16, else its GPU form `device`, else `fused` (the base graph where an export has neither). Decoders: the exported (not CPU-optimised) graphs; ONNX Runtime
    optimises them for the device at load. decoder_prep + decoder_fast serve plain prompts (the GPU form: a whole
    batch per run). The merged decode graphs' FP16 copies (`decode_*_fp16` slots) are kept for precision fp16 only.
    """
    manifest.require_backend(backend)
    out = slot_entries(manifest, DEVICE_SLOTS)
    if precision != "fp16":
        for slot, _ in MERGED_DECODE.values():
            out.pop(fp16_slot(slot), None)
    if precision == "fp16":
        out["encoder"] = required_variant(
            manifest, "encoder", fp16_encoder_variant(manifest),
            f"export it with `{manifest.export_command(manifest.targets or ('cuda',))}` (without --no-fp16), "
            "or run `sam2rt.export.optimize.add_variants(DIR, fp16=True)`")
    return out


def max_prompts_per_run(backend: str) -> int:
    """The most prompts one decoder run takes on `backend`: MAX_PROMPTS_PER_RUN, and on ONNX Runtime's TensorRT
    provider no more than its decoder profiles' largest batch (a larger one would fall outside every profile)."""
    if backend != "onnxruntime-tensorrt":
        return MAX_PROMPTS_PER_RUN
    from ..engines import decoder_profiles

    return min(MAX_PROMPTS_PER_RUN, max(p.shapes["point_coords"].max[0] for p in decoder_profiles()))


PACK_ALIGN = 64  # float32 elements (256 bytes) between packed prompt inputs: each starts aligned, as CUDA kernels expect


class _Captured:
    """A session run from fixed buffers: `inputs`/`outputs` OrtValues bound once in `binding` (a CUDA graph replays it).

    A decoder's prompt inputs (points, labels, and mask inputs where the graph takes them) are bound at aligned offsets
    of one device buffer, `packed` ({name: (offset, shape)} in `layout`), so that a decode uploads them in one copy.
    """

    def __init__(self, session: Any, binding: Any, inputs: dict[str, Any], outputs: dict[str, Any],
                 packed: Any = None, layout: dict[str, tuple[int, tuple[int, ...]]] | None = None) -> None:
        self.session, self.binding, self.inputs, self.outputs = session, binding, inputs, outputs
        self.packed, self.layout = packed, layout or {}
        self.checked = False  # whether its first outputs were compared with the dynamic session's
        self.runs = ThreadRuns()  # the threads that ran it: each one's first run captures (capture_lock.py)

    def upload_prompts(self, prompts: dict[str, np.ndarray]) -> None:
        """All prompt inputs into the packed device buffer, in one host-to-device copy."""
        host = np.zeros(self.packed.shape(), np.float32)
        for name, (offset, shape) in self.layout.items():
            host[offset:offset + int(np.prod(shape))] = prompts[name].ravel()
        self.packed.update_inplace(host)


class OrtDeviceBackend(Backend):
    """Runs a model directory on ONNX Runtime's CUDA (or TensorRT) provider with the whole path on the GPU."""

    def __init__(
        self,
        manifest: Manifest,
        name: str = "onnxruntime-cuda",
        precision: str | None = None,
        device_id: int = 0,
        threads: int | None = None,
        cuda_graphs: bool = True,
        fixed_buffers: bool | None = None,
    ) -> None:
        super().__init__()
        ort = _import_ort()
        if name not in PROVIDERS:
            raise BackendUnavailableError(f"unknown onnxruntime backend {name!r}; choose one of {sorted(PROVIDERS)}")
        precision = precision or (DEFAULT_GPU_PRECISION if name == "onnxruntime-cuda" else "fp32")
        # on the CPU provider (CI's vehicle for the device path) fp16 runs the FP16 graphs' data flow
        allowed = GPU_PRECISIONS if name == "onnxruntime-cuda" else ("fp32", "fp16") if name == "onnxruntime-cpu" else ("fp32",)
        if precision not in allowed:
            raise BackendUnavailableError(f"backend {name!r} offers precisions {', '.join(allowed)}, not {precision!r}")
        wanted = PROVIDERS[name]
        if wanted[0] not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"backend {name!r} needs {wanted[0]}, which this onnxruntime does not offer "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                "(on Jetson: NVIDIA's onnxruntime-gpu wheel for your JetPack) or use backend='onnxruntime-cpu'"
            )
        if name == "onnxruntime-tensorrt":
            missing = tensorrt_libraries_status()
            if missing:
                raise BackendUnavailableError(missing)
        self._ort, self._manifest, self._wanted = ort, manifest, wanted
        self.name = name
        self.precision = precision
        self.device_id = device_id
        self.threads = threads
        on_gpu = name != "onnxruntime-cpu"
        self.device = f"cuda:{device_id}" if on_gpu else "cpu"
        self.ort_device = "cuda" if on_gpu else "cpu"
        self.files = device_graph_entries(manifest, precision, name)
        # TF32 and FP16 compute other numbers than the FP32 graph: their embeddings get their own key
        base_key = manifest.graph("encoder")["sha256"]
        self.encoder_key = base_key if precision == "fp32" else f"{self.files['encoder']['sha256']}:{precision}"
        fast = self.files.get("decoder_fast")
        self.fast_max_points = int(fast.get("max_points", FAST_MAX_POINTS)) if fast else 0
        # prompts per fast-decoder run: the GPU form takes a whole batch (None), older exports' one prompt
        self.fast_prompts = fast_prompts_per_run(fast) if fast else 1
        self.max_prompts_per_run = max_prompts_per_run(name)
        # CUDA graphs need the CUDA provider; fixed buffers (their data flow) can be forced on the CPU for tests
        self.use_cuda_graphs = bool(cuda_graphs) and name == "onnxruntime-cuda"
        self.fixed_buffers = self.use_cuda_graphs if fixed_buffers is None else bool(fixed_buffers)
        self.cuda_graphs: dict[str, str] = {}  # session -> "captured" or why not
        # decoder runs from fixed buffers, summed: seconds uploading prompts, seconds replaying until the outputs are
        # ready, and how many (gpu_bench reads it to tell the decoder's time from the postprocessing's)
        self.decoder_seconds: dict[str, float] = {"upload": 0.0, "replay": 0.0, "replays": 0}
        self._lock = threading.RLock()
        self._pipeline = OrtPipeline(ort, self._providers("pipeline", tf32=False, graph=False), self.ort_device, device_id,
                                     lambda: session_options(threads), fixed_buffers=self.fixed_buffers,
                                     cuda_graphs=self.use_cuda_graphs)
        self._sessions: dict[str, Any] = {}
        self._captured: dict[Any, _Captured] = {}
        self._slot_buffers: dict[str, dict[str, Any]] = {}
        self._slot_loaded: dict[str, tuple[int, ...]] = {}  # which embedding's tensors each slot's buffers hold
        self._slot_owner: dict[str, list[Any]] = {}  # and those tensors, kept alive so their ids stay unique
        self._encoder_fixed: _Captured | None = None
        self._rejected: set[Any] = set()  # fixed-shape sessions that disagreed with the dynamic session or failed to run
        self._load_encoder()
        self.fast_decoder_check = self._check_fast_decoder()
        self.merged_decode = self._check_merged_decode()
        # whether a plain-prompt decode to masks runs as the merged graph (gpu_bench turns it off to time the two)
        self.use_merged_decode = self.merged_decode == "on"
        # onnxruntime-cuda:fp16: whether the merged graphs run in their FP16 copies, where the export made them
        # (gpu_bench turns it off to time the FP32 ones beside them)
        self.use_fp16_decoder = any(fp16_slot(slot) in self.files for slot, _ in MERGED_DECODE.values())
        self._merged_refused: dict[Any, str] = {}  # merged-graph signatures that are not captured: they run in two
        if on_gpu:
            providers = self._session("encoder").get_providers()
            if wanted[0] not in providers:
                raise BackendUnavailableError(
                    f"backend {name!r}: onnxruntime could not initialise {wanted[0]} (is a CUDA GPU with a matching "
                    f"CUDA/cuDNN present?); providers in use: {', '.join(providers)}"
                )

    # --- sessions ---------------------------------------------------------------------------------
    def _providers(self, role: str, tf32: bool, graph: bool) -> list:
        out: list = []
        for provider in self._wanted:
            if provider == "CUDAExecutionProvider":
                out.append((provider, cuda_provider_options(self.device_id, tf32, graph, attention_for(role, self.precision))))
            elif provider == "TensorrtExecutionProvider":
                opts: dict[str, Any] = {"device_id": self.device_id, "trt_fp16_enable": False}
                cache = self._manifest.directory / "ort_trt_cache"
                try:
                    cache.mkdir(exist_ok=True)
                    opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache),
                                trt_timing_cache_enable=True, trt_timing_cache_path=str(cache))
                except OSError:  # read-only model directory: build engines at every start instead
                    pass
                if role.startswith("decoder"):
                    from ..engines import decoder_profiles

                    opts.update(_trt_profile_option(decoder_profiles()))
                out.append((provider, opts))
            else:
                out.append(provider)
        return out

    def _new_session(self, slot: str, graph: bool, dims: dict[str, int] | None = None) -> Any:
        """A session of `slot`; `dims` fixes symbolic dimensions (e.g. num_prompts) so that ONNX Runtime folds the
        shape arithmetic into constants and every node runs on the device, as a CUDA graph requires."""
        entry = self.files[slot]
        path = self._manifest.verify_file(entry)
        tf32 = self.precision in ("tf32", "fp16")
        so = session_options(self.threads, mem_pattern=True)
        for name, value in (dims or {}).items():
            so.add_free_dimension_override_by_name(name, int(value))
        try:
            return self._ort.InferenceSession(str(path), sess_options=so, providers=self._providers(slot, tf32, graph))
        except Exception as exc:
            if graph:
                raise
            raise ModelFileError(f"{path} could not be loaded by onnxruntime ({exc}); re-run `sam2rt export`") from exc

    def _session(self, slot: str) -> Any:
        """The plain (no CUDA graph) session of `slot`, created on first use."""
        s = self._sessions.get(slot)
        if s is None:
            with self._lock:
                s = self._sessions.get(slot)
                if s is None:
                    s = self._sessions[slot] = self._new_session(slot, graph=False)
        return s

    def _fixed(self, key: Any, slot: str, input_shapes: dict[str, tuple[int, ...]], shared: dict[str, Any]) -> _Captured | None:
        """A session of `slot` bound to fixed buffers for one input shape (a CUDA graph when the provider allows it).

        `shared` holds buffers several shapes of the slot bind (the features), `input_shapes` the others.
        None when no more shapes may be captured: the caller runs the plain session.
        """
        cap = self._captured.get(key)
        if cap is not None or len(self._captured) >= MAX_CAPTURED_SHAPES + 1:  # +1: the encoder
            return cap
        if key in self._rejected:
            return None
        dims = {}
        if "point_coords" in input_shapes:
            dims = {"num_prompts": input_shapes["point_coords"][0], "num_points": input_shapes["point_coords"][1]}
        session = None
        if self.use_cuda_graphs:
            try:
                session = self._new_session(slot, graph=True, dims=dims)
                self.cuda_graphs[str(key)] = "captured"
            except Exception as exc:  # ONNX Runtime refuses graphs with nodes it runs on the CPU
                self.cuda_graphs[str(key)] = f"not captured: {str(exc).splitlines()[0][:200]}"
                log.info("sam2rt: no CUDA graph for %s: %s", key, exc)
        if session is None:
            session = self._new_session(slot, graph=False, dims=dims) if dims else self._session(slot)
        inputs = dict(shared)
        io = session.io_binding()
        packed, layout = None, {}
        if dims:  # a decoder: its prompt inputs at aligned offsets of one buffer
            offset = 0
            for name, shape in input_shapes.items():
                layout[name] = (offset, tuple(int(d) for d in shape))
                offset += -(-max(int(np.prod(shape)), 1) // PACK_ALIGN) * PACK_ALIGN
            packed = self._ort.OrtValue.ortvalue_from_shape_and_type([offset], np.float32, self.ort_device, self.device_id)
            for name, (start, shape) in layout.items():
                io.bind_input(name, self.ort_device, self.device_id, np.float32, list(shape), packed.data_ptr() + 4 * start)
        else:
            for name, shape in input_shapes.items():
                inputs[name] = self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, self.ort_device,
                                                                                self.device_id)
        for name, value in inputs.items():
            io.bind_ortvalue_input(name, value)
        outputs = {}
        for name, shape in self._output_shapes(session, input_shapes).items():
            outputs[name] = self._ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.ort_device, self.device_id)
            io.bind_ortvalue_output(name, outputs[name])
        cap = self._captured[key] = _Captured(session, io, inputs, outputs, packed, layout)
        cap.checked = not dims  # a static-shape session is checked against the dynamic one on its first run
        return cap

    def _output_shapes(self, session: Any, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
        """Output shapes of a run with `input_shapes`: the encoder's are static; a decoder's follow its prompt count."""
        if "point_coords" not in input_shapes:
            return {o.name: [int(d) for d in o.shape] for o in session.get_outputs()}
        b, low = int(input_shapes["point_coords"][0]), int(self._manifest.data.get("low_res_size", 256))
        return {"low_res_masks": [b, 4, low, low], "iou_predictions": [b, 4]}

    def _buffers_like(self, names: tuple[str, ...], values: dict[str, Any]) -> dict[str, Any]:
        return {n: self._ort.OrtValue.ortvalue_from_shape_and_type(list(self._shape_of(values[n])), np.float32,
                                                                   self.ort_device, self.device_id) for n in names}

    @staticmethod
    def _replay(fixed: _Captured) -> None:
        """Run a fixed-buffer session and wait for it: a CUDA-graph replay returns before the GPU is done, and the
        next step (a copy, the postprocessing) runs on another session's stream."""
        fixed.session.run_with_iobinding(fixed.binding)
        fixed.binding.synchronize_outputs()

    @staticmethod
    def _shape_of(value: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in (value.shape if isinstance(value, (np.ndarray, OrtDeviceTensor)) else value.shape()))

    def _check_fast_decoder(self) -> str:
        """decoder_fast computes decoder_nomask's function with rewritten arithmetic, and ONNX Runtime fuses and runs
        it differently on each provider: probes (a click and a box over seeded features, and a batch of prompts where
        the graph takes batches) compare the two here, and a disagreement turns the fast path off for this backend.
        Returns what was found."""
        if "decoder_fast" not in self.files or "decoder_nomask" not in self.files:
            return "no fast decoder in this export"
        shapes = {o["name"]: [int(d) for d in o["shape"]] for o in self._manifest.graph("encoder")["outputs"]}
        rng = np.random.default_rng(0)
        feats = {n: OrtDeviceTensor(self._pipeline.to_device(rng.standard_normal(shapes[n]).astype(np.float32)))
                 for n in FEATURE_NAMES}
        prepared = self.prepare(feats)
        size = float(self._manifest.image_size)
        probes = [(np.array([[[0.4 * size, 0.55 * size], [0.0, 0.0]]], np.float32), np.array([[1, -1]], np.float32)),
                  (np.array([[[0.1 * size, 0.2 * size], [0.7 * size, 0.8 * size], [0.0, 0.0]]], np.float32),
                   np.array([[2, 3, -1]], np.float32))]
        if self.fast_prompts is None:  # a graph that takes batches is probed with one: three boxes and a click
            corners = np.array([[0.1, 0.2, 0.7, 0.8], [0.3, 0.1, 0.9, 0.5], [0.0, 0.5, 0.4, 1.0]], np.float32) * size
            coords = np.concatenate([corners.reshape(3, 2, 2), np.zeros((3, 1, 2), np.float32)], axis=1)
            coords[2] = [[0.6 * size, 0.3 * size], [0.0, 0.0], [0.0, 0.0]]
            labels = np.array([[2, 3, -1], [2, 3, -1], [1, -1, -1]], np.float32)
            probes.append((coords, labels))
        worst = 0.0
        for coords, labels in probes:
            prompts = {"point_coords": coords, "point_labels": labels}
            # copies: numpy() of a CPU OrtValue is a view that does not keep the OrtValue alive
            fast = [np.array(v.numpy()) for v in self._run_plain("decoder_fast", prepared, prompts)]
            ref = [np.array(v.numpy()) for v in self._run_plain("decoder_nomask", feats, prompts)]
            worst = max(worst, relative_difference(fast, ref))
        if worst > FAST_DECODER_TOLERANCE:
            self.files.pop("decoder_fast"), self.files.pop("decoder_prep")
            self._sessions.pop("decoder_fast", None), self._sessions.pop("decoder_prep", None)
            message = f"off: on {self.name} it differs from decoder_nomask by {worst:.3g}"
            log.warning("sam2rt: fast decoder %s; every prompt runs on the mask-free decoder", message)
            return message
        return f"on: within {worst:.2g} of decoder_nomask"

    def _check_merged_decode(self) -> str:
        """Whether decodes to masks run as the merged decode graphs: where the export made them, the fast decoder is
        on, the provider is not TensorRT (whose decoder profiles name the decoder's inputs alone), and the package's
        postprocessing graph is the one each was made with (another sam2rt version's may compute otherwise).
        Returns what was found; the graphs not used leave `files`."""
        pairs = [(slot, post) for slot, post in MERGED_DECODE.values()]
        pairs += [(fp16_slot(slot), post) for slot, post in pairs]
        slots = [slot for slot, _ in pairs if slot in self.files]
        if not slots:
            return "no merged decode graphs in this export"
        why = None
        if "decoder_fast" not in self.files:
            why = "the fast decoder is off"
        elif self.name == "onnxruntime-tensorrt":
            why = "not on ONNX Runtime's TensorRT provider"
        else:
            stale = [slot for slot, post in pairs
                     if slot in self.files and self.files[slot].get("postprocess_sha256") != graph_sha256(post)]
            if stale:
                why = (f"{', '.join(self.files[s]['file'] for s in stale)} made with another sam2rt's postprocessing; "
                       "re-run `sam2rt export`, or `sam2rt.export.optimize.add_variants(DIR, optimized=False)`")
        if why is None:
            return "on"
        for slot in slots:
            self.files.pop(slot)
        log.info("sam2rt: merged decode graphs off: %s", why)
        return f"off: {why}"

    @property
    def pipeline_graphs(self) -> dict[str, dict[str, str]]:
        """The pre/postprocessing graphs' fixed shapes: per graph, each signature -> "captured" or why not."""
        return self._pipeline.fixed_status

    # --- lifecycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._captured.clear()
            self._slot_buffers.clear()
            self._slot_loaded.clear()
            self._slot_owner.clear()
            self._sessions.clear()
            self._encoder_fixed = None
            self._pipeline.close()
        super().close()

    # --- values on the device --------------------------------------------------------------------------
    def _as_value(self, value: Any) -> Any:
        """A numpy array or device tensor -> an OrtValue on this backend's device."""
        if isinstance(value, OrtDeviceTensor) and value.value.device_name().lower() == self.ort_device:
            return value.value
        return self._pipeline.to_device(np.ascontiguousarray(self.to_host(value), dtype=np.float32))

    def upload_features(self, features: dict[str, Any]) -> dict[str, Any]:
        return {k: OrtDeviceTensor(self._as_value(v)) for k, v in features.items()}

    # --- image path -------------------------------------------------------------------------------------
    def preprocess(self, image_rgb: np.ndarray, size: int) -> OrtDeviceTensor:
        self._check_open()
        return OrtDeviceTensor(self._pipeline.preprocess(image_rgb, size))

    def _load_encoder(self) -> None:
        if not self.fixed_buffers:
            self._session("encoder")
            return
        shape = tuple(int(d) for d in self._new_session_shape())
        self._encoder_fixed = self._fixed("encoder", "encoder", {"image": shape}, {})
        self._sessions.setdefault("encoder", self._encoder_fixed.session)

    def _new_session_shape(self) -> list[int]:
        size = self._manifest.image_size
        return [1, 3, size, size]

    def encode(self, image: Any) -> dict[str, Any]:
        self._check_open()
        with self._lock, GPU_WORK.shared():
            src = self._as_value(image)
            fixed = self._encoder_fixed
            if fixed is None:
                session = self._session("encoder")
                io = session.io_binding()
                io.bind_ortvalue_input("image", src)
                names = [o.name for o in session.get_outputs()]
                for name in names:
                    io.bind_output(name, self.ort_device, self.device_id)
                session.run_with_iobinding(io)
                return {n: OrtDeviceTensor(v) for n, v in zip(names, io.get_outputs())}
            self._pipeline.copy(src, fixed.inputs["image"])
            try:
                with fixed.runs.guard():  # each thread's first run captures (capture_lock.py)
                    self._replay(fixed)
            except Exception as exc:
                if fixed.runs.here():  # a replay failed: an error (a capture that failed: the plain session)
                    raise
                # its first replay (where ONNX Runtime captures the CUDA graph) failed: the plain session from now on
                self._encoder_fixed = None
                self._captured.pop("encoder", None)
                if self._sessions.get("encoder") is fixed.session:
                    del self._sessions["encoder"]
                self._note_failure("encoder", exc)
                return self.encode(image)
            fixed.runs.mark()
            # the fixed outputs are overwritten by the next image: each embedding gets its own copy
            return {n: OrtDeviceTensor(v) for n, v in zip(fixed.outputs, self._pipeline.copy_many(list(fixed.outputs.values())))}

    def _note_failure(self, key: Any, exc: Exception) -> None:
        """A fixed-buffer session failed its first run: never used again, and `cuda_graphs` says why."""
        self._rejected.add(key)
        self.cuda_graphs[str(key)] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        log.warning("sam2rt: fixed-buffer session %s %s; it runs on the plain session", key, self.cuda_graphs[str(key)])

    def prepare(self, features: dict[str, Any]) -> dict[str, Any]:
        if "decoder_prep" not in self.files:
            return {}
        self._check_open()
        with self._lock, GPU_WORK.shared():
            session = self._session("decoder_prep")
            io = session.io_binding()
            for n in FEATURE_NAMES:
                io.bind_ortvalue_input(n, self._as_value(features[n]))
            for n in PREPARED_NAMES:
                io.bind_output(n, self.ort_device, self.device_id)
            session.run_with_iobinding(io)
            return {n: OrtDeviceTensor(v) for n, v in zip(PREPARED_NAMES, io.get_outputs())}

    def _slot(self, features: dict[str, Any], b: int, n: int, has_mask: bool) -> tuple[str, tuple[str, ...]]:
        """Which decoder serves this batch, and the per-image tensors it reads.

        Plain prompts of few points: the fast decoder over prepare()'s tensors, the whole batch in one run (an
        export whose fast decoder takes one prompt per run: single prompts only); other batches without masks:
        the mask-free decoder in one run (on a GPU one batched run beats B single-prompt runs); masks: the full one.
        """
        fits = self.fast_prompts is None or b <= self.fast_prompts
        if (not has_mask and fits and "decoder_fast" in self.files and n <= self.fast_max_points
                and all(k in features for k in PREPARED_NAMES)):
            return "decoder_fast", PREPARED_NAMES
        if not has_mask and "decoder_nomask" in self.files:
            return "decoder_nomask", FEATURE_NAMES
        return "decoder", FEATURE_NAMES

    def _decode_device(self, features, point_coords, point_labels, mask_input, has_mask_input) -> tuple[Any, Any]:
        """One decoder run -> (low_res_masks, iou_predictions) as OrtValues on the device (valid until the next decode)."""
        missing = [k for k in FEATURE_NAMES if k not in features]
        if missing:
            raise InvalidEmbeddingError(f"embedding lacks features {missing}")
        b, n = int(point_coords.shape[0]), int(point_coords.shape[1])
        has_mask = bool(np.any(has_mask_input))
        slot, tensor_names = self._slot(features, b, n, has_mask)
        prompts = {"point_coords": point_coords, "point_labels": point_labels}
        if slot == "decoder":
            prompts.update(mask_input=mask_input, has_mask_input=has_mask_input)
        prompts = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in prompts.items()}
        tensors = {k: features[k] for k in tensor_names}
        fixed = None
        if self.fixed_buffers:
            shared = self._slot_buffers.get(slot)
            if shared is None:
                shared = self._slot_buffers[slot] = self._buffers_like(tensor_names, tensors)
            fixed = self._fixed((slot, b, n), slot, {k: v.shape for k, v in prompts.items()}, shared)
        if fixed is None:
            return self._run_plain(slot, tensors, prompts)
        token = tuple(id(tensors[k]) for k in tensor_names)  # the embedding's own objects, kept alive below
        if self._slot_loaded.get(slot) != token:  # a new embedding: its tensors into the slot's buffers, on the device
            self._pipeline.copy_many([self._as_value(tensors[k]) for k in tensor_names],
                                     [self._slot_buffers[slot][k] for k in tensor_names])
            self._slot_loaded[slot] = token
            self._slot_owner[slot] = [tensors[k] for k in tensor_names]
        try:
            with fixed.runs.guard():  # each thread's first run captures (capture_lock.py)
                t0 = time.perf_counter()
                fixed.upload_prompts(prompts)
                t1 = time.perf_counter()
                self._replay(fixed)
                t2 = time.perf_counter()
            self.decoder_seconds["upload"] += t1 - t0
            self.decoder_seconds["replay"] += t2 - t1
            self.decoder_seconds["replays"] += 1
        except Exception as exc:
            if fixed.runs.here():  # a replay failed: an error (a capture that failed: the plain session)
                raise
            self._captured.pop((slot, b, n), None)
            self._note_failure((slot, b, n), exc)
            return self._run_plain(slot, tensors, prompts)
        fixed.runs.mark()
        low_res, iou = fixed.outputs["low_res_masks"], fixed.outputs["iou_predictions"]
        if not fixed.checked:
            # ONNX Runtime optimises a session with fixed dimensions differently from the dynamic one; a fusion
            # that computes something else must never reach a caller, so the first run is compared
            ref_low, ref_iou = self._run_plain(slot, tensors, prompts)
            diff = relative_difference([low_res.numpy(), iou.numpy()], [ref_low.numpy(), ref_iou.numpy()])
            if diff > FIXED_SHAPE_TOLERANCE:
                key = (slot, b, n)
                self._captured.pop(key, None)
                self._rejected.add(key)
                self.cuda_graphs[str(key)] = (f"rejected: the fixed-shape session differs from the dynamic one by {diff:.3g} "
                                              "of its largest magnitude")
                log.warning("sam2rt: %s", self.cuda_graphs[str(key)])
                return ref_low, ref_iou
            fixed.checked = True
        return low_res, iou

    def _run_plain(self, slot: str, tensors: dict[str, Any], prompts: dict[str, np.ndarray]) -> tuple[Any, Any]:
        """One run of the dynamic-shape session of `slot` -> (low_res_masks, iou_predictions) OrtValues on the device."""
        session = self._session(slot)
        io = session.io_binding()
        for k, v in tensors.items():
            io.bind_ortvalue_input(k, self._as_value(v))
        for k, v in prompts.items():
            io.bind_cpu_input(k, v)
        for k in DECODER_OUTPUTS:
            io.bind_output(k, self.ort_device, self.device_id)
        session.run_with_iobinding(io)
        low_res, iou = io.get_outputs()
        return low_res, iou

    def _runs(self, point_coords, point_labels, mask_input, has_mask_input) -> list[tuple[Any, Any, Any, Any]]:
        """A batch's prompts in runs of at most `max_prompts_per_run` (MAX_PROMPTS_PER_RUN says why), in order."""
        b, step = int(point_coords.shape[0]), self.max_prompts_per_run
        return [(point_coords[i : i + step], point_labels[i : i + step], mask_input[i : i + step], has_mask_input[i : i + step])
                for i in range(0, b, step)]

    def decode(self, features, point_coords, point_labels, mask_input, has_mask_input) -> tuple[np.ndarray, np.ndarray]:
        self._check_open()
        with self._lock, GPU_WORK.shared():
            parts = []
            for prompts in self._runs(point_coords, point_labels, mask_input, has_mask_input):
                low_res, iou = self._decode_device(features, *prompts)
                parts.append((self._host(low_res), self._host(iou)))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _host(self, value: Any) -> np.ndarray:
        """A new host array of a device OrtValue. With the CPU provider OrtValue.numpy() is a view, and a fixed
        buffer's view would change under the caller at the next run."""
        out = np.asarray(value.numpy())
        return out.copy() if self.ort_device == "cpu" else out

    def decode_masks(self, features, point_coords, point_labels, mask_input, has_mask_input,
                     request: MaskRequest) -> DecodedMasks:
        self._check_open()
        with self._lock, GPU_WORK.shared():
            parts = []
            for prompts in self._runs(point_coords, point_labels, mask_input, has_mask_input):
                merged = self._decode_merged(features, prompts[0], prompts[1], prompts[3], request)
                if merged is not None:
                    parts.append(merged)
                    continue
                low_res, iou = self._decode_device(features, *prompts)
                parts.append(self._pipeline.postprocess(low_res, iou, request))
        if len(parts) == 1:
            return parts[0]
        return DecodedMasks(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(DecodedMasks)))

    def _decode_merged(self, features, point_coords, point_labels, has_mask_input, request: MaskRequest) -> DecodedMasks | None:
        """One run of plain prompts to masks through the merged decode graph (one CUDA-graph replay where captured);
        None where the two-graph path serves the batch: no merged graph for it, prompts the fast decoder does not
        take, or a signature the merged graph's fixed buffers refused (a cheaper replay of the two captured graphs
        than one uncaptured run)."""
        if not self.use_merged_decode:
            return None
        slot = MERGED_DECODE[bool(request.multimask_output)][0]
        if self.use_fp16_decoder and fp16_slot(slot) in self.files:
            slot = fp16_slot(slot)
        b, n = int(point_coords.shape[0]), int(point_coords.shape[1])
        if slot not in self.files or self._slot(features, b, n, bool(np.any(has_mask_input)))[0] != "decoder_fast":
            return None
        key = (slot, b, n, tuple(int(d) for d in request.orig_hw), request.threshold is None, request.float_masks)
        if key in self._merged_refused:
            return None
        low = int(self._manifest.data.get("low_res_size", 256))
        _, feeds, wanted = self._pipeline.postprocess_feeds(request, (low, low))
        feeds.update({k: features[k] for k in PREPARED_NAMES})
        # one input, so one host-to-device copy (export/decode_graphs.py); none where the prompts are the last ones
        feeds["point_prompts"] = pack_point_prompts(point_coords, point_labels)
        outputs = ("low_res_logits", "scores", wanted)
        if not self._pipeline.fixed_buffers:
            logits, scores, masks = BoundSession(self._session(slot)).run(feeds, (), outputs)
            return DecodedMasks(masks, scores, logits)
        self._pipeline.add_graph(slot, self._session(slot), lambda graph, dims: self._new_session(slot, graph, dims),
                                 TAP_NAMES, precision=self.precision, capture_after=1, bool_flips=MERGED_MASK_FLIPS,
                                 max_shapes=MAX_CAPTURED_SHAPES)
        logits, scores, masks = self._pipeline.run_fixed(slot, feeds, outputs)
        why = self._pipeline.refused(slot, feeds, outputs)
        if why is not None:
            self._merged_refused[key] = why
            log.info("sam2rt: %s %s: decoded in two graphs from now on", slot, why)
        return DecodedMasks(masks, scores, logits)

    def postprocess(self, low_res: np.ndarray, iou: np.ndarray, request: MaskRequest) -> DecodedMasks:
        self._check_open()
        return self._pipeline.postprocess(low_res, iou, request)

    def upsample_masks(self, logits: np.ndarray, orig_hw: tuple[int, int], threshold: float) -> np.ndarray:
        self._check_open()
        return self._pipeline.upsample_masks(logits, orig_hw, threshold)
