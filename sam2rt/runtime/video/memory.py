"""One object's memory bank and its selection into the memory-attention graph's static slots (numpy only).

The selection is `SAM2Base._prepare_memory_conditioned_features` for a non-initial frame, tracking
forward: the conditioning frames (chosen as `select_closest_cond_frames` does), then the frames
t_rel = num_maskmem-1 .. 1 before the current one (every `memory_temporal_stride_for_eval`-th, the last
frame always), then the object pointers of the selected conditioning frames (in the past only when the
model says so) and of up to `max_obj_ptrs - 1` frames before the current one. What the reference
concatenates the runtime writes into fixed slots with validity flags; slots the reference would not have
are masked out of the attention, so the result is the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


NO_MASKS = np.zeros((0, 0), np.float32)  # pred_masks of frames that are no longer current (never read again)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as torch's `.to(torch.bfloat16)`."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> the float32 values they stand for (exact)."""
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> float32 values rounded to bfloat16 (nearest even), as the reference stores memories."""
    return from_bf16_bits(to_bf16_bits(x))


@dataclass
class FrameOutput:
    """What the tracker keeps of one object on one frame (the reference's compact per-frame output).

    pred_masks: (256,256) float32 low-res logits (after hole filling); obj_ptr: (C,) float32;
    object_score: the object-score logit; maskmem: (mem_dim,64,64) float32 memory features rounded to bfloat16
    (the values the reference stores; state files hold their bits), or None until the memory encoder has run
    (prompted frames are encoded when the time step ends).
    """

    pred_masks: np.ndarray
    obj_ptr: np.ndarray
    object_score: float
    maskmem: np.ndarray | None = None


@dataclass
class ObjectMemory:
    """One object's conditioning and non-conditioning frame outputs, by frame index."""

    cond: dict[int, FrameOutput] = field(default_factory=dict)
    non_cond: dict[int, FrameOutput] = field(default_factory=dict)

    def prune(self, next_frame: int, keep_mem: int, keep_ptr: int) -> None:
        """Forget what no frame >= next_frame can select: memory features older than `keep_mem` frames,
        whole entries older than `keep_ptr` frames (tracking forward only). Keeps the bank's size constant."""
        for t in list(self.non_cond):
            if t < next_frame - keep_ptr:
                del self.non_cond[t]
            elif t < next_frame - keep_mem and self.non_cond[t].maskmem is not None:
                e = self.non_cond[t]
                self.non_cond[t] = FrameOutput(NO_MASKS, e.obj_ptr, e.object_score, None)


def select_closest_cond_frames(frame_idx: int, cond: dict[int, Any], max_num: int) -> tuple[dict, dict]:
    """`sam2.modeling.sam2_utils.select_closest_cond_frames`: up to `max_num` (-1: all) conditioning frames
    closest to frame_idx (the closest before, the closest after, then the nearest others)."""
    if max_num == -1 or len(cond) <= max_num:
        return dict(cond), {}
    selected: dict[int, Any] = {}
    before = max((t for t in cond if t < frame_idx), default=None)
    if before is not None:
        selected[before] = cond[before]
    after = min((t for t in cond if t >= frame_idx), default=None)
    if after is not None:
        selected[after] = cond[after]
    rest = sorted((t for t in cond if t not in selected), key=lambda t: abs(t - frame_idx))[: max_num - len(selected)]
    selected.update((t, cond[t]) for t in rest)
    return selected, {t: v for t, v in cond.items() if t not in selected}


@dataclass(frozen=True)
class SlotLayout:
    """The static shapes of the memory-attention graph: conditioning slots, recent-frame slots, pointer slots."""

    cond_slots: int
    recent_slots: int
    ptr_slots: int
    mem_dim: int
    hidden_dim: int
    feat_hw: tuple[int, int] = (64, 64)

    @property
    def mem_slots(self) -> int:
        return self.cond_slots + self.recent_slots


def memory_feeds(
    mem: ObjectMemory, frame_idx: int, settings: dict[str, Any], layout: SlotLayout, num_frames: int | None
) -> dict[str, np.ndarray]:
    """The memory-attention graph's inputs (all but image_embed) for `frame_idx`, on the host.

    `num_frames`: the video's length when known (the reference clamps the pointer count to it), else None
    (a stream: `max_obj_ptrs_in_encoder` pointers).
    """
    slots, feeds = select_memory(mem, frame_idx, settings, layout, num_frames)
    h, w = layout.feat_hw
    mem_feats = np.zeros((layout.mem_slots, layout.mem_dim, h, w), np.float32)
    for i, values in enumerate(slots):
        if values is not None:
            mem_feats[i] = values
    return {"mem_feats": mem_feats, **feeds}


def select_memory(
    mem: ObjectMemory, frame_idx: int, settings: dict[str, Any], layout: SlotLayout, num_frames: int | None
) -> tuple[list[np.ndarray | None], dict[str, np.ndarray]]:
    """memory_feeds without mem_feats: each memory slot's features (None: an empty slot), and the other inputs.

    The caller turns the slots into `mem_feats` where the graphs run (MemoryBank keeps them on the device).
    """
    num_maskmem = int(settings["num_maskmem"])
    stride = int(settings["memory_temporal_stride_for_eval"])
    selected, unselected = select_closest_cond_frames(frame_idx, mem.cond, int(settings["max_cond_frames_in_attn"]))
    if len(selected) > layout.cond_slots:  # more than the export's cap: keep the temporally closest
        keep = sorted(selected, key=lambda t: abs(t - frame_idx))[: layout.cond_slots]
        unselected.update({t: v for t, v in selected.items() if t not in keep})
        selected = {t: selected[t] for t in selected if t in keep}

    slots: list[np.ndarray | None] = [None] * layout.mem_slots
    mem_tpos = np.zeros((layout.mem_slots,), np.int64)
    mem_valid = np.zeros((layout.mem_slots,), np.float32)
    for i, out in enumerate(selected.values()):  # conditioning frames: t_pos = 0
        slots[i] = out.maskmem
        mem_tpos[i] = num_maskmem - 1
        mem_valid[i] = 1.0
    for t_pos in range(1, num_maskmem):
        t_rel = num_maskmem - t_pos
        if t_rel == 1:
            prev = frame_idx - 1
        else:
            prev = ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride
        out = mem.non_cond.get(prev)
        if out is None:
            out = unselected.get(prev)
        if out is None or out.maskmem is None:
            continue
        i = layout.cond_slots + t_pos - 1
        slots[i] = out.maskmem
        mem_tpos[i] = num_maskmem - t_pos - 1
        mem_valid[i] = 1.0

    obj_ptrs = np.zeros((layout.ptr_slots, layout.hidden_dim), np.float32)
    ptr_pos = np.zeros((layout.ptr_slots,), np.float32)
    ptr_valid = np.zeros((layout.ptr_slots,), np.float32)
    if settings["use_obj_ptrs_in_encoder"]:
        max_ptrs = int(settings["max_obj_ptrs_in_encoder"])
        if num_frames is not None:
            max_ptrs = min(num_frames, max_ptrs)
        ptr_cond = selected
        if settings["only_obj_ptrs_in_the_past_for_eval"]:
            ptr_cond = {t: v for t, v in selected.items() if t <= frame_idx}
        signed = bool(settings["use_signed_tpos_enc_to_obj_ptrs"])
        pos_and_ptrs = [((frame_idx - t) if signed else abs(frame_idx - t), out.obj_ptr) for t, out in ptr_cond.items()]
        for t_diff in range(1, max_ptrs):
            t = frame_idx - t_diff
            if t < 0 or (num_frames is not None and t >= num_frames):
                break
            out = mem.non_cond.get(t, unselected.get(t))
            if out is not None:
                pos_and_ptrs.append((t_diff, out.obj_ptr))
        t_diff_max = np.float32(max(max_ptrs - 1, 1))
        for i, (pos, ptr) in enumerate(pos_and_ptrs[: layout.ptr_slots]):
            obj_ptrs[i] = ptr
            ptr_pos[i] = np.float32(pos) / t_diff_max  # float32 division, as torch's int tensor / int
            ptr_valid[i] = 1.0
    return slots, {
        "mem_tpos": mem_tpos, "mem_valid": mem_valid, "obj_ptrs": obj_ptrs, "ptr_pos": ptr_pos, "ptr_valid": ptr_valid,
    }


def compact_feeds(feeds: dict[str, Any]) -> dict[str, Any]:
    """The memory attention's inputs for its compact form: the valid memory slots and pointers only, in order, and no
    validity flags (`mem_feats` is compacted where present; the tracker's memory bank gathers the valid rows itself)."""
    mem = np.flatnonzero(feeds["mem_valid"] > 0.5)
    ptr = np.flatnonzero(feeds["ptr_valid"] > 0.5)
    out = {k: v for k, v in feeds.items() if k not in ("mem_valid", "ptr_valid")}
    for name, keep in (("mem_feats", mem), ("mem_tpos", mem), ("obj_ptrs", ptr), ("ptr_pos", ptr)):
        if name in out:
            out[name] = np.ascontiguousarray(out[name][keep])
    return out
