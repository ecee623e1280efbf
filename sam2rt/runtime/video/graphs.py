"""The exported video graphs of a model directory, loaded and run.

Inputs are host arrays or tensors on the graphs' device; the memory-conditioned features
(`memory_attention`), the memory features (for the object's memory bank) and the downsampled mask prompt come back
as device tensors (OrtDeviceTensor), everything the tracker reads on the host (logits, pointers, scores) as numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import InputError, ManifestError
from ...graph_table import VIDEO_CPU_SLOTS, VIDEO_DEVICE_SLOTS, VIDEO_FP16_SLOTS, graph_file
from ...manifest import Manifest
from ..backends.onnxruntime_backend import SDPA_KERNELS, OrtDeviceTensor, required_variant, slot_entries
from ..backends.ort_pipeline import GRAPH_DIR
from .bank import MemoryBank
from .heads import NO_POINTS_COORDS, NO_POINTS_LABELS, select_track_output, use_multimask
from ..backends.bound_session import BoundSession
from ..backends.device_copy import DeviceCopier
from ..backends.fixed_shapes import FixedShapeSession
from .memory import SlotLayout
from .sessions import CPU_PROVIDERS, VIDEO_PROVIDERS, create_session

VIDEO_ROLES = ("memory_encoder", "memory_attention", "track_decoder", "mask_downsample")
# The tracked frames' decoder (graph_table's `track_decoder.tracking`): an optional slot, in the tracking decoder's
# precision; without it (exports from before it) the tracker runs track_decoder and chooses the token on the host.
TRACKING_SLOT = "tracking_decoder"
SLOT_ROLES = {**{role: role for role in VIDEO_ROLES}, TRACKING_SLOT: "track_decoder"}
FIXED_ROLES = ("memory_attention", "track_decoder", "memory_encoder")  # run on every tracked frame (`fixed_slots`)
PRECISIONS = ("fp32", "tf32", "fp16")
FP16_FIX = ("export it again with `sam2rt export ... --target cuda` (without --no-fp16), or run "
            "`sam2rt.export.optimize.add_variants(DIR, optimized=False, fp16=True)`")


class VideoGraphs:
    """Sessions over memory_encoder / memory_attention / track_decoder / mask_downsample, and the constants.

    Which file serves each role comes from graph_table's video slots: on the CPU provider the memory attention's
    `fused` variant where the export made it; for `precision="fp16"` (the image backend's) the `fp16` variants,
    which onnxruntime-cuda:fp16 requires and an FP16 TensorRT engine uses where the export made them; on a GPU provider
    the memory attention's compact `device` form (valid slots only: fused attention kernels). `slots` (graph_table's
    VIDEO_*_SLOTS) overrides the choice for FP32 (tests run the GPU's graphs on the CPU provider that way).
    `role_precision` ({role: "fp32" | "tf32" | "fp16"}) runs the named roles in another precision than `precision`
    (their FP16 graphs, or the FP32 ones with TF32 on or off): which precision is fastest differs per graph
    (`python -m sam2rt.bench.video_forms` measures it). Tracked frames run the tracking form of the decoder
    (graph_table's `track_decoder.tracking`) where the export made it in the tracking decoder's precision;
    `tracking_decoder=False` runs track_decoder on them instead, as for exports from before it (video_forms compares
    the two). `plain_slots` names graphs of `fixed_slots` left on their plain session where fixed buffers are on
    (video_forms times a graph's CUDA graph against its plain run that way). `role_attention` ({role: a key of
    SDPA_KERNELS}) asks the CUDA provider for one attention kernel in the named roles' MultiHeadAttention nodes (else
    ONNX Runtime's choice, or SAM2RT_CUDA_ATTENTION's): video_forms times the memory attention's choices. Every file is
    checked against its sha256 before it is loaded.
    """

    def __init__(
        self, manifest: Manifest, backend: str = "onnxruntime-cpu", threads: int | None = None,
        precision: str | None = None, slots: dict[str, tuple[str, tuple[str | None, ...]]] | None = None,
        fixed_buffers: bool | None = None, cuda_graphs: bool = True, role_precision: dict[str, str] | None = None,
        tracking_decoder: bool = True, plain_slots: tuple[str, ...] = (), role_attention: dict[str, str] | None = None,
    ) -> None:
        graphs = manifest.data.get("graphs", {})
        if "video" not in manifest.data or any(role not in graphs for role in VIDEO_ROLES):
            raise ManifestError(
                f"{manifest.directory} has no video graphs (exported before video tracking was added); "
                "re-run `sam2rt export` into it"
            )
        self.settings: dict[str, Any] = dict(manifest.data["video"])
        on_cpu = VIDEO_PROVIDERS.get(backend.split(":")[0], CPU_PROVIDERS) == CPU_PROVIDERS
        self.precision = precision or ("fp32" if on_cpu else "tf32")
        self.role_precision = {role: self.precision for role in VIDEO_ROLES}
        for role, p in (role_precision or {}).items():
            if role not in VIDEO_ROLES or p not in PRECISIONS:
                raise InputError(f"role_precision: {role!r}: {p!r}; roles are {', '.join(VIDEO_ROLES)}, precisions "
                                 f"{', '.join(PRECISIONS)}")
            self.role_precision[role] = p
        self.role_attention: dict[str, str] = {}
        for role, kernel in (role_attention or {}).items():
            if role not in VIDEO_ROLES or kernel not in SDPA_KERNELS:
                raise InputError(f"role_attention: {role!r}: {kernel!r}; roles are {', '.join(VIDEO_ROLES)}, attention "
                                 f"kernels {', '.join(SDPA_KERNELS)}")
            self.role_attention[role] = kernel
        by_precision = {p: self._entries(manifest, backend, p, on_cpu, slots) for p in set(self.role_precision.values())}
        self.entries = {slot: by_precision[self.role_precision[role]][slot] for slot, role in SLOT_ROLES.items()
                        if slot in by_precision[self.role_precision[role]]}
        missing = [role for role in VIDEO_ROLES if role not in self.entries]
        if missing:
            raise manifest.left_out_error(graph_file(missing[0]).file)
        tracking = self.entries.get(TRACKING_SLOT)
        if tracking is not None and (not tracking_decoder or tracking.get("precision", "fp32")
                                     != self.entries["track_decoder"].get("precision", "fp32")):
            del self.entries[TRACKING_SLOT]  # not asked for, or an FP32 form beside the FP16 tracking decoder: not mixed
        paths = {slot: manifest.verify_file(entry) for slot, entry in self.entries.items()}
        # fp32 on a GPU: TF32 off, as the image graphs (the CUDA provider's default is TF32 on)
        tf32 = {slot: self.role_precision[SLOT_ROLES[slot]] != "fp32" for slot in self.entries}
        disabled = {slot: tuple(entry.get("ort_disabled_optimizers", ())) for slot, entry in self.entries.items()}
        attention = {slot: self.role_attention.get(SLOT_ROLES[slot]) for slot in self.entries}
        self.sessions: dict[str, Any] = {
            slot: BoundSession(create_session(paths[slot], backend, threads, tf32=tf32[slot],
                                              cpu_disabled_optimizers=disabled[slot], attention=attention[slot]))
            for slot in self.entries}
        self.device = self.sessions["memory_attention"].device  # "cuda" or "cpu": where device outputs live
        # the graphs run on every tracked frame go through fixed buffers (CUDA graphs) once their shapes settle:
        # by default on a GPU (backends/fixed_shapes.py says why); `fixed_buffers=True` runs that flow on the CPU provider (tests)
        self.frame = 0  # the tracker's frame clock (`step()`): which shapes are in steady use
        if self.device == "cuda" if fixed_buffers is None else fixed_buffers:
            unknown = set(plain_slots) - set(self.fixed_slots)
            if unknown:
                raise InputError(f"plain_slots: {sorted(unknown)} are not graphs run through fixed buffers; those are "
                                 f"{', '.join(self.fixed_slots)}")
            copy = DeviceCopier(lambda name: create_session(GRAPH_DIR / f"{name}.onnx", backend, threads, tf32=False))
            for role in self.fixed_slots:
                if role in plain_slots:
                    continue
                def factory(graph: bool, dims: dict[str, int], path=paths[role], tf32=tf32[role],
                            disabled=disabled[role], kernel=attention[role]) -> Any:
                    return create_session(path, backend, threads, tf32=tf32, graph=graph, dims=dims,
                                          cpu_disabled_optimizers=disabled, attention=kernel)

                self.sessions[role] = FixedShapeSession(self.sessions[role], factory, copy, lambda: self.frame,
                                                        self.role_precision[SLOT_ROLES[role]], capture=cuda_graphs,
                                                        name=f"video graph {role}")
        # the compact memory attention (graph_table's `device` row) takes the valid slots only, without validity flags
        self.compact_memory = "mem_valid" not in self.sessions["memory_attention"].input_names
        self._bank_sessions = tuple(BoundSession(create_session(GRAPH_DIR / f"{name}.onnx", backend, threads, tf32=False))
                                    for name in ("memory_write", "memory_gather"))
        with np.load(manifest.verify_graph("video_constants"), allow_pickle=False) as data:
            self.no_mem_embed = np.ascontiguousarray(data["no_mem_embed"], np.float32).reshape(1, -1, 1, 1)
            self.no_obj_ptr = np.ascontiguousarray(data["no_obj_ptr"], np.float32).reshape(-1)
        slots = manifest.graph("memory_attention")["slots"]
        s = self.settings
        feat = manifest.image_size // 16
        self.layout = SlotLayout(int(slots["cond"]), int(slots["recent"]), int(slots["pointers"]), int(s["mem_dim"]),
                                 int(s["hidden_dim"]), (feat, feat))

    @staticmethod
    def _entries(manifest: Manifest, backend: str, precision: str, on_cpu: bool,
                 slots: dict[str, tuple[str, tuple[str | None, ...]]] | None) -> dict[str, dict[str, Any]]:
        """The graph entry of each role for one precision."""
        if precision == "fp16":  # FP16 graphs, on whichever provider the backend's name gives
            entries = slot_entries(manifest, VIDEO_FP16_SLOTS)
            if backend.split(":")[0] in ("onnxruntime-cuda", "onnxruntime-cpu"):  # asked for by name: must exist
                for slot, (role, preferences) in VIDEO_FP16_SLOTS.items():
                    if "fp16" in preferences:
                        entries[slot] = required_variant(manifest, role, "fp16", FP16_FIX)
            return entries
        return slot_entries(manifest, slots or (VIDEO_CPU_SLOTS if on_cpu else VIDEO_DEVICE_SLOTS))

    @property
    def tracking_decoder(self) -> bool:
        """Whether tracked frames run the tracking form of the decoder (graph_table's `track_decoder.tracking`)."""
        return TRACKING_SLOT in self.entries

    @property
    def fixed_slots(self) -> tuple[str, ...]:
        """The graphs run on every tracked frame: the memory attention, the tracked frames' decoder (the tracking form
        where the export made it, else the tracking decoder) and the memory encoder."""
        return ("memory_attention", TRACKING_SLOT if self.tracking_decoder else "track_decoder", "memory_encoder")

    def step(self) -> None:
        """A new frame begins (the tracker calls it once per time step)."""
        self.frame += 1

    @property
    def fixed_status(self) -> dict[str, dict[str, str]]:
        """Per video graph run through fixed buffers: each captured input signature -> "captured" (a CUDA graph),
        "fixed buffers" (CPU provider) or why it runs on the plain session."""
        return {role: dict(s.status) for role, s in self.sessions.items() if isinstance(s, FixedShapeSession)}

    def new_bank(self) -> MemoryBank:
        """An empty memory bank for one object, on these graphs' device."""
        h, w = self.layout.feat_hw
        return MemoryBank(*self._bank_sessions, self.layout.mem_slots, (self.layout.mem_dim, h, w))

    def memory_attention(self, image_embed: Any, feeds: dict[str, Any]) -> OrtDeviceTensor:
        """The frame's features conditioned on one object's memory, (1,C,64,64), left on the graphs' device."""
        return self.sessions["memory_attention"].run({"image_embed": image_embed, **feeds}, ("pix_feat_with_mem",))[0]

    def encode_memory(self, image_embed: Any, mask_logits: np.ndarray, score: float, binarize: bool) -> OrtDeviceTensor:
        """(1,mem_dim,64,64) float32 memory features of one object's (256,256) mask logits, left on the graphs'
        device (MemoryBank.store rounds them into the object's bank there)."""
        session = self.sessions["memory_encoder"]
        return session.run({
            "image_embed": image_embed,
            "mask_logits": np.ascontiguousarray(mask_logits, np.float32).reshape(1, 1, *mask_logits.shape[-2:]),
            "object_score_logits": np.array([[score]], np.float32),
            "binarize": np.array([1.0 if binarize else 0.0], np.float32),
        }, tuple(session.output_names[:1]), tuple(session.output_names[:1]))[0]

    def decode(
        self, pix_feat: Any, feats: dict[str, Any], coords: np.ndarray, labels: np.ndarray, mask_input: Any | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Tracking decoder: host (low_res_masks (1,4,256,256), iou (1,4), obj_ptr (1,4,C), object score)."""
        low = 4 * self.layout.feat_hw[0]
        has_mask = mask_input is not None
        if isinstance(mask_input, np.ndarray):
            mask_input = np.ascontiguousarray(mask_input, np.float32).reshape(1, 1, low, low)
        lr, iou, ptr, score = self.sessions["track_decoder"].run({
            "pix_feat": pix_feat,
            "high_res_feats_0": feats["high_res_feats_0"], "high_res_feats_1": feats["high_res_feats_1"],
            "point_coords": np.ascontiguousarray(coords, np.float32), "point_labels": np.ascontiguousarray(labels, np.float32),
            "mask_input": mask_input if has_mask else np.zeros((1, 1, low, low), np.float32),
            "has_mask_input": np.array([1.0 if has_mask else 0.0], np.float32),
        })
        return lr, iou, ptr, float(score.reshape(-1)[0])

    def track(self, pix_feat: Any, feats: dict[str, Any], settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
        """A tracked frame's decoder output, as the reference chooses it: host ((256,256) mask logits, (C,) object
        pointer, object score). Through the tracking form where the export made it (no prompt inputs to send, the token
        chosen on the device, one mask brought down), else through track_decoder and `select_track_output`."""
        if not self.tracking_decoder:
            lr, iou, ptrs, score = self.decode(pix_feat, feats, NO_POINTS_COORDS, NO_POINTS_LABELS, None)
            mask, ptr = select_track_output(settings, lr, iou, ptrs, use_multimask(settings, False, 0))
            return mask, ptr, score
        mask, ptr, score = self.sessions[TRACKING_SLOT].run({
            "pix_feat": pix_feat, "high_res_feats_0": feats["high_res_feats_0"],
            "high_res_feats_1": feats["high_res_feats_1"],
        }, (), ("mask_logits", "pointer", "object_score_logits"))
        return (np.ascontiguousarray(mask.reshape(mask.shape[-2:]), np.float32),
                np.ascontiguousarray(ptr.reshape(-1), np.float32), float(score.reshape(-1)[0]))

    def mask_downsample(self, mask: np.ndarray) -> OrtDeviceTensor:
        """(S,S) binary float mask at the input size -> (1,1,256,256) decoder mask input, on the graphs' device."""
        session = self.sessions["mask_downsample"]
        return session.run({"mask": np.ascontiguousarray(mask, np.float32)[None, None]}, tuple(session.output_names))[0]
