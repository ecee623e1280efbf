"""ONNX Runtime backend: sessions over the exported graphs, tuned for SAM 2's embed-once / decode-many use."""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ...errors import BackendUnavailableError, GraphNotExportedError, ModelFileError
from ...graph_table import CPU_SLOTS, Profile, graph_file
from ...manifest import Manifest
from ...model_specs import LOW_RES_SIZE
from ..embedding import FAST_BATCH, FAST_MAX_POINTS, FEATURE_NAMES, PREPARED_NAMES
from ..tensors import DeviceTensor, as_host
from .base import Backend

# At most this many single-threaded fast-decoder sessions decode the prompts of a batch side by side.
MAX_LANES = 8

PROVIDERS = {
    "onnxruntime-cpu": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


_QUIETED = False


def _import_ort():
    """onnxruntime, with its process-wide logger at ERROR.

    ONNX Runtime logs warnings through its default logger before any session option applies (e.g. "No
    registered plugin EP device found for 'CUDAExecutionProvider'" at every CUDA session): sam2rt reports
    what matters itself, so those warnings are silenced once, when sam2rt first loads onnxruntime.
    """
    global _QUIETED
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailableError(
            "onnxruntime is not installed: `pip install -e '.[cpu]'` (or '.[gpu]' for CUDA)"
        ) from exc
    if not _QUIETED:
        ort.set_default_logger_severity(3)
        _QUIETED = True
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


CPU_PRECISIONS = ("fp32", "int8")
# Slots every backend needs filled (the others are faster paths for some prompts).
REQUIRED_SLOTS = ("encoder", "decoder")


def spinning_default() -> bool:
    """Whether ORT's worker threads busy-wait between ops (env SAM2RT_ORT_SPINNING=1 turns it on).

    Off by default: where cores are shared (other processes, a server's threads, PyTorch in the
    same process), spinning workers steal the cores the next op needs, which costs more than the
    wake-up latency spinning saves on an idle machine. Measurements: benchmarks/README.md, "Measurements
    behind the CPU backend's defaults".
    """
    return os.environ.get("SAM2RT_ORT_SPINNING", "0").strip().lower() in ("1", "true", "yes", "on")


# ONNX Runtime's CUDA provider option `sdpa_kernel` (contrib_ops/cuda/bert/attention_kernel_options.h): the attention
# kernels com.microsoft MultiHeadAttention may choose from, as a bit mask; without it ONNX Runtime chooses per call.
SDPA_KERNELS = {"default": 0, "flash": 1, "efficient": 2, "cudnn": 8, "math": 16}


def attention_kernel_default() -> str:
    """The attention kernel the CUDA provider's MultiHeadAttention nodes use (env SAM2RT_CUDA_ATTENTION, a key of
    SDPA_KERNELS; default: ONNX Runtime's own choice per call).

    Every choice computes the same attention; which is fastest depends on the GPU and the shapes (Hiera attends
    within windows of 49-196 tokens and globally over 4096), and `python -m sam2rt.bench.encoder_forms` measures
    them on the GPU at hand. BackendUnavailableError for a name ONNX Runtime does not know.
    """
    name = os.environ.get("SAM2RT_CUDA_ATTENTION", "default").strip().lower() or "default"
    if name not in SDPA_KERNELS:
        raise BackendUnavailableError(
            f"SAM2RT_CUDA_ATTENTION={name!r} is not an attention kernel of ONNX Runtime's CUDA provider; "
            f"choose one of {', '.join(SDPA_KERNELS)} (or unset it)")
    return name


# The attention kernel each graph's sessions ask for by default, per precision mode, where ONNX Runtime's own choice
# was measured slower: the TF32 encoder ran 11.4 ms with the unfused ("math") kernel in all 17 blocks against 12.4 ms
# with ONNX Runtime's choice (memory-efficient from 256 tokens, unfused below) and 12.1 ms memory-efficient
# throughout (H100, GPU run 5, `sam2rt.bench.encoder_forms`; benchmarks/README.md). FP16 keeps ONNX Runtime's
# choice (cuDNN flash attention, the fastest there); FP32 (TF32 off) was not measured.
ATTENTION_BY_ROLE = {("encoder", "tf32"): "math"}


def attention_for(role: str, precision: str) -> str | None:
    """The kernel for `role`'s sessions in `precision` mode: SAM2RT_CUDA_ATTENTION where set, else ATTENTION_BY_ROLE's
    (None: attention_kernel_default(), ONNX Runtime's choice)."""
    if os.environ.get("SAM2RT_CUDA_ATTENTION", "").strip():
        return None
    return ATTENTION_BY_ROLE.get((role, precision))


def cuda_provider_options(device_id: int = 0, tf32: bool = True, graph: bool = False,
                          attention: str | None = None) -> dict[str, str]:
    """CUDAExecutionProvider options for a SAM 2 graph: TF32 tensor cores for FP32 products or not, CUDA-graph capture
    or not, and the attention kernel (`attention`, else attention_kernel_default())."""
    options = {"device_id": str(device_id), "use_tf32": "1" if tf32 else "0", "enable_cuda_graph": "1" if graph else "0"}
    kernel = attention or attention_kernel_default()
    if SDPA_KERNELS[kernel]:
        options["sdpa_kernel"] = str(SDPA_KERNELS[kernel])
    return options


def low_memory_default() -> bool:
    """Whether the CPU backend trades encoder speed for a lower peak RSS (opt-in: env SAM2RT_LOW_MEMORY=1).

    With it the encoder runs without ONNX Runtime's memory arena and large allocations go back to the OS
    when freed (release_large_allocations), so a process's peak RSS is lower; every set_image then pays
    for page faults on fresh memory, hence opt-in. Measurements: benchmarks/README.md.
    """
    return os.environ.get("SAM2RT_LOW_MEMORY", "0").strip().lower() in ("1", "true", "yes", "on")


_HEAP_TUNED = False


def release_large_allocations() -> bool:
    """glibc only: serve allocations of 128 KiB and more with mmap, so freeing them returns them to the OS.

    glibc raises its mmap threshold after large frees (up to 32 MiB) and then keeps big tensors on
    the heap, where the freed space stays resident: with the encoder's arena off, that would keep most of
    what the arena would have kept. Process-wide (mallopt). Measurements: benchmarks/README.md.
    """
    global _HEAP_TUNED
    if _HEAP_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _HEAP_TUNED = bool(libc.mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        _HEAP_TUNED = False
    return _HEAP_TUNED


def session_options(
    threads: int | None = None, spinning: bool | None = None, mem_pattern: bool = True, arena: bool = True
):
    """Session options for SAM 2 graphs: full graph optimisation, arena on, one op at a time, no spinning, quiet logs.

    mem_pattern=False (the CPU backend's choice): the memory pattern is planned after the first run
    and then allocated on top of the arena's blocks, which raises the encoder's peak RSS from the second
    image on, for no measurable speed gain (benchmarks/README.md).
    """
    ort = _import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = arena
    so.enable_mem_pattern = mem_pattern
    so.log_severity_level = 3
    spin = spinning_default() if spinning is None else spinning
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return so


def _fresh_variant(manifest: Manifest, role: str, name: str) -> dict[str, Any] | None:
    """Variant `name` of `role`, or None if absent or stale (made from another version of the base graph).

    A variant records the sha256 of what it was made from (`derived_from_sha256`): the base graph,
    or the variant named by its `source` (the encoder's `optimized` is made from `fused`), or for
    `X_optimized` (X = nomask, prep, fast) the variant X. If the base graph was replaced (and the
    manifest updated to it), its old variants no longer describe it and are ignored.
    """
    entry = manifest.variant(role, name)
    if entry is None:
        return None
    source = manifest.graph(role)
    parent = name[: -len("_optimized")] if name.endswith("_optimized") else entry.get("source")
    if parent:  # made from another variant (e.g. the encoder's `optimized` from `fused`): that one must be fresh
        source = _fresh_variant(manifest, role, parent)
        if source is None:
            return None
    if entry.get("derived_from_sha256") not in (None, source.get("sha256")):
        return None
    return entry


def cpu_graph_entries(manifest: Manifest, precision: str = "fp32") -> dict[str, dict[str, Any]]:
    """Manifest entries of the graph files the CPU backend loads, by slot.

    Slots: encoder, decoder, decoder_nomask, and decoder_prep + decoder_fast (the fast mask-free
    decoder and its per-image part; both or neither). Prefers the ORT-optimised copies saved at export
    time (`optimized` / `X_optimized`, same function, faster to load; the encoder's is made from its
    MultiHeadAttention form `fused`), then the encoder's `fused` form; the INT8 encoder only with precision="int8".
    Exports without variants fall back to the base encoder.onnx / decoder.onnx.
    """
    if precision not in CPU_PRECISIONS:
        raise BackendUnavailableError(
            f"unknown precision {precision!r} for onnxruntime-cpu; choose one of {', '.join(CPU_PRECISIONS)}"
        )
    manifest.require_backend("onnxruntime-cpu")
    out = slot_entries(manifest, CPU_SLOTS)
    if precision == "int8":
        out["encoder"] = required_variant(
            manifest, "encoder", "int8",
            f"export it with `{manifest.export_command(manifest.targets or ('cpu',))} --int8` "
            "(or run `sam2rt.export.optimize.add_variants(DIR, int8=True)` on a directory that holds encoder.onnx)")
    return out


def required_variant(manifest: Manifest, role: str, variant: str, fix: str) -> dict[str, Any]:
    """A fresh, stored variant a precision needs (e.g. the INT8 or FP16 encoder), or GraphNotExportedError saying how
    to make it."""
    entry = _fresh_variant(manifest, role, variant)
    if entry is not None and entry.get("refused"):  # made and checked at export, and found unusable with these weights
        raise GraphNotExportedError(f"{manifest.directory} has no {variant.upper()} {role}: the export refused it "
                                    f"({entry['refused']}); use another precision")
    if entry is None or not manifest.is_stored(entry):
        raise GraphNotExportedError(f"{manifest.directory} has no {variant.upper()} {role} (`{role}` variant `{variant}`); {fix}")
    return entry


def slot_entries(manifest: Manifest, slots: dict[str, tuple[str, tuple[str | None, ...]]]) -> dict[str, dict[str, Any]]:
    """For each slot of a backend (graph_table.CPU_SLOTS / DEVICE_SLOTS), the first fresh entry of its preference
    list (None = the role's base graph) whose file the export stored; a slot none of whose entries exists is left
    out. The fast decoder's two slots come together or not at all. The encoder and decoder slots must be filled:
    GraphNotExportedError names the export that writes their graphs."""
    out: dict[str, dict[str, Any]] = {}
    for slot, (role, preferences) in slots.items():
        for variant in preferences:
            entry = manifest.graph(role) if variant is None else _fresh_variant(manifest, role, variant)
            if entry is not None and manifest.is_stored(entry):
                out[slot] = entry
                break
        else:
            if slot in REQUIRED_SLOTS:
                files = [graph_file(role, v).file for v in preferences]
                if manifest.targets is not None:  # a lean export for other targets (or one whose graph went stale)
                    raise manifest.left_out_error(files[0])
                raise ModelFileError(f"{manifest.directory} holds no usable {slot} graph (any of {', '.join(files)}); "
                                     "re-run `sam2rt export` into it")
    if ("decoder_prep" in out) != ("decoder_fast" in out):
        out.pop("decoder_prep", None), out.pop("decoder_fast", None)
    if "decoder_fast" not in out:  # the merged decode graphs run over decoder_prep's tensors
        for slot in ("decode_multi", "decode_single", "decode_multi_fp16", "decode_single_fp16"):
            out.pop(slot, None)
    return out


class OrtDeviceTensor(DeviceTensor):
    """A tensor kept where ONNX Runtime put it (GPU memory with the CUDA/TensorRT providers).

    Wraps an `onnxruntime.OrtValue`; `to_host()` copies it to a numpy array.
    """

    _FLOAT32 = np.dtype(np.float32)

    def __init__(self, value: Any) -> None:
        # made on every decode for each device input (~20): plain Python, no numpy reductions (~3 us, not ~17)
        self.value = value
        self.shape = tuple(value.shape())
        self.dtype = self._FLOAT32
        self.nbytes = math.prod(self.shape) * 4

    @property
    def device(self) -> str:
        return str(self.value.device_name())

    def to_host(self) -> np.ndarray:
        return np.asarray(self.value.numpy())

    def __repr__(self) -> str:
        return f"OrtDeviceTensor(shape={self.shape}, device={self.device!r})"


def _trt_profile_option(profiles: list[Profile]) -> dict[str, str]:
    """ORT TensorRT EP options trt_profile_{min,opt,max}_shapes for the decoder's dynamic inputs."""
    widest = profiles[-1]  # ORT builds one engine per session
    opts = {}
    for key in ("min", "opt", "max"):
        opts[f"trt_profile_{key}_shapes"] = ",".join(
            f"{name}:{'x'.join(str(d) for d in getattr(shape, key))}" for name, shape in widest.shapes.items()
        )
    return opts


class OnnxRuntimeBackend(Backend):
    """Runs the exported graphs on ONNX Runtime's CPU provider, tuned for SAM 2's embed-once / decode-many use.

    GPU providers run through OrtDeviceBackend (ort_device_backend.py), which keeps the whole path on the device.
    """

    name = "onnxruntime-cpu"
    device = "cpu"

    def __init__(
        self,
        manifest: Manifest,
        name: str = "onnxruntime-cpu",
        threads: int | None = None,
        precision: str | None = None,
        spinning: bool | None = None,
        low_memory: bool | None = None,
        fast_decoder: bool = True,
    ) -> None:
        super().__init__()
        ort = _import_ort()
        if name != "onnxruntime-cpu":
            raise BackendUnavailableError(
                f"OnnxRuntimeBackend runs the CPU provider only; {name!r} is served by OrtDeviceBackend "
                "(create_backend picks it)"
            )
        self.threads = threads or default_threads()
        self._ort = ort
        self.spinning = spinning_default() if spinning is None else bool(spinning)
        # low memory: the encoder runs without ORT's arena, with large blocks given back to the OS
        self.low_memory = low_memory_default() if low_memory is None else bool(low_memory)
        if self.low_memory:
            self.low_memory = release_large_allocations()
        self.precision = precision or "fp32"
        self.files = cpu_graph_entries(manifest, self.precision)
        # embeddings of the INT8 encoder differ from FP32 ones: they get their own model key
        self.encoder_key = manifest.graph("encoder")["sha256"] if self.precision == "fp32" else self.files["encoder"]["sha256"]
        self._manifest = manifest
        self._sessions: dict[str, Any] = {}
        self._sessions_lock = threading.Lock()
        self._preprocessing: Any = None  # an OrtPipeline on the CPU provider, made on first use (preprocess)
        self._fast_lanes: list[Any] | None = None
        self._lane_pool: ThreadPoolExecutor | None = None
        if not fast_decoder:  # the plain graphs only
            self.files.pop("decoder_prep", None), self.files.pop("decoder_fast", None)
        fast = self.files.get("decoder_fast")
        self.fast_max_points = int(fast.get("max_points", FAST_MAX_POINTS)) if fast else 0
        # a batch goes prompt by prompt whatever the graph takes (its manifest's `prompts_per_run`): a batched
        # run costs no less per prompt on the CPU
        self.fast_batch = FAST_BATCH
        self._encoder = self._session(manifest, "encoder")
        # Loaded now: the decoder graphs that plain point/box prompts use. The others (the full decoder for
        # mask prompts, the mask-free one for prompts of many points) load on first use: most processes never
        # need them, and their weights would add to every process's peak memory.
        if "decoder_fast" in self.files:
            eager = ["decoder_prep", "decoder_fast"]
        else:
            eager = ["decoder_nomask"] if "decoder_nomask" in self.files else ["decoder"]
        for slot in eager:
            self._decoder_session(slot)
        self._enc_outputs = [o.name for o in self._encoder.get_outputs()]

    def close(self) -> None:
        """Drop the sessions and shut the lane threads down."""
        with self._sessions_lock:
            if self._lane_pool is not None:
                self._lane_pool.shutdown(wait=True)
            self._lane_pool, self._fast_lanes = None, None
            self._sessions.clear()
            if self._preprocessing is not None:
                self._preprocessing.close()
            self._preprocessing = None
        super().close()

    def preprocess(self, image_rgb: np.ndarray, size: int) -> np.ndarray:
        """The package's preprocess.onnx (the block-banded resize + normalisation the device path runs) on this
        backend's CPU threads, into a new host array: the numpy path's result within ~1e-6, and faster than it at
        every size measured (2-core Xeon, 2026-11-28: 1.8x at 512x512 on one thread, 2.0x at 1920x1080, 2.6x at
        3840x2160; 2.6x / 3.8x / 5.4x on two; benchmarks/README.md)."""
        self._check_open()
        pipeline = self._preprocessing
        if pipeline is None:
            from .ort_pipeline import OrtPipeline

            with self._sessions_lock:
                if self._preprocessing is None:
                    self._preprocessing = OrtPipeline(
                        self._ort, ["CPUExecutionProvider"], "cpu", 0,
                        lambda: session_options(self.threads, self.spinning, mem_pattern=False))
                pipeline = self._preprocessing
        return pipeline.preprocess_to_host(image_rgb, size)

    def _decoder_session(self, slot: str):
        """The session of decoder slot `slot` (see cpu_graph_entries), created on first use."""
        session = self._sessions.get(slot)
        if session is None:
            with self._sessions_lock:
                session = self._sessions.get(slot)
                if session is None:
                    session = self._sessions[slot] = self._session(self._manifest, slot)
        return session

    def _session(self, manifest: Manifest, slot: str):
        entry = self.files[slot]
        if entry is manifest.data["graphs"].get(slot):
            path = manifest.graph_path(slot)  # a base graph: Sam2Model.from_dir verifies it
        else:
            path = manifest.verify_file(entry)  # a variant: check its sha256 here
        try:
            so = session_options(self.threads, self.spinning, mem_pattern=False,
                                 arena=not (self.low_memory and slot == "encoder"))
            return self._ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"],
                                              disabled_optimizers=list(entry.get("ort_disabled_optimizers", [])))
        except Exception as exc:
            raise ModelFileError(f"{path} could not be loaded by onnxruntime ({exc}); re-run `sam2rt export`") from exc

    def encode(self, image: Any) -> dict[str, Any]:
        self._check_open()
        outs = self._encoder.run(self._enc_outputs, {"image": as_host(image)})
        return dict(zip(self._enc_outputs, outs))

    def prepare(self, features: dict[str, Any]) -> dict[str, Any]:
        """The per-image tensors of the fast mask-free decoder (PREPARED_NAMES), or {} without one.

        Run once per image (Sam2Model.embed does, or the first decode of an embedding that lacks them).
        """
        if "decoder_prep" not in self.files:
            return {}
        self._check_open()
        feeds = {n: as_host(features[n]) for n in FEATURE_NAMES}
        return dict(zip(PREPARED_NAMES, self._decoder_session("decoder_prep").run(list(PREPARED_NAMES), feeds)))

    def decode(
        self,
        features: dict[str, Any],
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray,
        has_mask_input: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode a batch; `features` may also hold `prepare()`'s tensors, which enable the fast decoder.

        Graph choice (all give the same outputs): no prompt with a mask, prepared tensors present and at
        most `fast_max_points` points -> decoder_fast, one prompt per run (the graph's shapes are
        constants but for the point count; a batched run would cost no less per prompt on the CPU); no
        mask -> decoder_nomask; else the full decoder.
        """
        self._check_open()
        prompts = dict(point_coords=point_coords, point_labels=point_labels)
        no_mask = not np.any(has_mask_input)
        if (no_mask and "decoder_fast" in self.files and point_coords.shape[1] <= self.fast_max_points
                and all(n in features for n in PREPARED_NAMES)):
            decoder = self._decoder_session("decoder_fast")
            features = {n: features[n] for n in PREPARED_NAMES}
            b = point_coords.shape[0]
            if b <= self.fast_batch:
                return self._run(decoder, features, prompts)
            if b > 1 and self.threads > 1:
                return self._run_lanes(features, prompts)
            step = self.fast_batch
            parts = [self._run(decoder, features, {k: v[i : i + step] for k, v in prompts.items()})
                     for i in range(0, b, step)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if no_mask and "decoder_nomask" in self.files:
            # no prompt carries a mask: the mask-free graph gives the same outputs without the mask convolutions
            decoder = self._decoder_session("decoder_nomask")
        else:
            decoder = self._decoder_session("decoder")
            prompts.update(mask_input=np.ascontiguousarray(mask_input, dtype=np.float32), has_mask_input=has_mask_input)
        return self._run(decoder, {n: features[n] for n in FEATURE_NAMES}, prompts)

    def _lanes(self) -> tuple[list[Any], ThreadPoolExecutor]:
        """`threads` single-threaded sessions of decoder_fast (max MAX_LANES) and a pool to run them side by side.

        Created on the first batch: a single prompt runs on the multi-threaded session.
        """
        with self._sessions_lock:
            if self._fast_lanes is None:
                n = min(self.threads, MAX_LANES)
                path = self._manifest.verify_file(self.files["decoder_fast"])
                disabled = list(self.files["decoder_fast"].get("ort_disabled_optimizers", []))
                self._fast_lanes = [
                    self._ort.InferenceSession(str(path), sess_options=session_options(1, self.spinning, mem_pattern=False),
                                               providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
                    for _ in range(n)
                ]
                self._lane_pool = ThreadPoolExecutor(n - 1, thread_name_prefix="sam2rt-decode")
        return self._fast_lanes, self._lane_pool

    def _run_lanes(self, features: dict[str, Any], prompts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """A batch on the fast decoder, prompts dealt round-robin to single-threaded sessions running in parallel.

        A lone prompt's small ops leave the other cores idle between the large ones; prompts side by side keep
        them busy (benchmarks/README.md has the measurements).
        """
        lanes, pool = self._lanes()
        b = next(iter(prompts.values())).shape[0]
        feeds = {k: as_host(v) for k, v in features.items()}
        low_res = np.empty((b, 4, LOW_RES_SIZE, LOW_RES_SIZE), np.float32)
        iou = np.empty((b, 4), np.float32)

        def lane(k: int) -> None:
            for i in range(k, b, len(lanes)):
                out = lanes[k].run(["low_res_masks", "iou_predictions"],
                                   {**feeds, **{n: v[i : i + 1] for n, v in prompts.items()}})
                low_res[i], iou[i] = out[0][0], out[1][0]

        others = [pool.submit(lane, k) for k in range(1, min(len(lanes), b))]
        lane(0)
        for f in others:
            f.result()
        return low_res, iou

    def _run(self, decoder, features: dict[str, Any], prompts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One decoder run: `features` (numpy or device tensors) and host `prompts` -> (low_res, iou) on the host."""
        feeds = {k: as_host(v) for k, v in features.items()}
        feeds.update(prompts)
        low_res, iou = decoder.run(["low_res_masks", "iou_predictions"], feeds)
        return low_res, iou
