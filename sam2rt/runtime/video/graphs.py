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
from ..backends.onnxruntime_backend import OrtDeviceTensor, required_variant, slot_entries
from ..backends.ort_pipeline import GRAPH_DIR
from .bank import MemoryBank
from ..backends.bound_session import BoundSession
from ..backends.fixed_shapes import FixedShapeSession
from .memory import SlotLayout
from .sessions import CPU_PROVIDERS, VIDEO_PROVIDERS, create_session

VIDEO_ROLES = ("memory_encoder", "memory_attention", "track_decoder", "mask_downsample")
FIXED_ROLES = ("memory_attention", "track_decoder", "memory_encoder")  # run on every tracked frame
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
    (`python -m sam2rt.bench.video_forms` measures it). Every file is checked against its sha256 before it is loaded.
    """

    def __init__(
        self, manifest: Manifest, backend: str = "onnxruntime-cpu", threads: int | None = None,
        precision: str | None = None, slots: dict[str, tuple[str, tuple[str | None, ...]]] | None = None,
        fixed_buffers: bool | None = None, cuda_graphs: bool = True, role_precision: dict[str, str] | None = None,
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
        by_precision = {p: self._entries(manifest, backend, p, on_cpu, slots) for p in set(self.role_precision.values())}
        self.entries = {role: by_precision[p][role] for role, p in self.role_precision.items() if role in by_precision[p]}
        missing = [role for role in VIDEO_ROLES if role not in self.entries]
        if missing:
            raise manifest.left_out_error(graph_file(missing[0]).file)
        paths = {role: manifest.verify_file(self.entries[role]) for role in VIDEO_ROLES}
        # fp32 on a GPU: TF32 off, as the image graphs (the CUDA provider's default is TF32 on)
        tf32 = {role: p != "fp32" for role, p in self.role_precision.items()}
        self.sessions: dict[str, Any] = {role: BoundSession(create_session(paths[role], backend, threads, tf32=tf32[role]))
                                         for role in VIDEO_ROLES}
        self.device = self.sessions["memory_attention"].device  # "cuda" or "cpu": where device outputs live
        # the graphs run on every tracked frame go through fixed buffers (CUDA graphs) once their shapes settle:
        # by default on a GPU (backends/fixed_shapes.py says why); `fixed_buffers=True` runs that flow on the CPU provider (tests)
        self.frame = 0  # the tracker's frame clock (`step()`): which shapes are in steady use
        if self.device == "cuda" if fixed_buffers is None else fixed_buffers:
            copy = BoundSession(create_session(GRAPH_DIR / "copy.onnx", backend, threads, tf32=False))
            for role in FIXED_ROLES:
                def factory(graph: bool, dims: dict[str, int], path=paths[role], tf32=tf32[role]) -> Any:
                    return create_session(path, backend, threads, tf32=tf32, graph=graph, dims=dims)

                self.sessions[role] = FixedShapeSession(self.sessions[role], factory, copy, lambda: self.frame,
                                                        self.role_precision[role], capture=cuda_graphs,
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

    def mask_downsample(self, mask: np.ndarray) -> OrtDeviceTensor:
        """(S,S) binary float mask at the input size -> (1,1,256,256) decoder mask input, on the graphs' device."""
        session = self.sessions["mask_downsample"]
        return session.run({"mask": np.ascontiguousarray(mask, np.float32)[None, None]}, tuple(session.output_names))[0]
