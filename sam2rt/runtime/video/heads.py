"""Choosing the tracking decoder's token as `SAM2Base._forward_sam_heads` does, and mask prompts (numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..postprocess import select_masks
from ..preprocess import _resize_axis

MASK_OUT_SCALE, MASK_OUT_BIAS = 20.0, -10.0  # `_use_mask_as_output`: a binary mask as logits -10 / +10

# The decoder's points when there is no point prompt (tracking, mask prompts): `_forward_sam_heads` passes
# one padding point, and the prompt encoder appends its own padding point (boxes=None), so two.
NO_POINTS_COORDS = np.zeros((1, 2, 2), np.float32)
NO_POINTS_LABELS = np.full((1, 2), -1.0, np.float32)


def use_multimask(settings: dict[str, Any], is_init_cond_frame: bool, num_points: int) -> bool:
    """`SAM2Base._use_multimask`: num_points counts the prompt's points (a box is two), no padding."""
    return bool(
        settings["multimask_output_in_sam"]
        and (is_init_cond_frame or settings["multimask_output_for_tracking"])
        and settings["multimask_min_pt_num"] <= num_points <= settings["multimask_max_pt_num"]
    )


def select_track_output(
    settings: dict[str, Any], low_res: np.ndarray, iou: np.ndarray, obj_ptr: np.ndarray, multimask: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(1,4,256,256) masks, (1,4) IoU, (1,4,C) pointers -> the reference's (256,256) mask and (C,) pointer.

    Multimask: the multimask token with the highest IoU (its pointer too, with
    `use_multimask_token_for_obj_ptr`, else the single-mask token's). Otherwise the single-mask token,
    replaced by the best multimask token where it is unstable (dynamic_multimask_via_stability); the
    pointer stays the single-mask token's, as MaskDecoder.forward returns it.
    """
    if multimask:
        best = int(np.argmax(iou[0, 1:])) + 1
        mask = low_res[0, best]
        token = best if settings["use_multimask_token_for_obj_ptr"] else 0
    else:
        chosen, _ = select_masks(
            low_res, iou, False,
            dynamic_via_stability=bool(settings["dynamic_multimask_via_stability"]),
            stability_delta=float(settings["dynamic_multimask_stability_delta"]),
            stability_thresh=float(settings["dynamic_multimask_stability_thresh"]),
        )
        mask = chosen[0, 0]
        token = 0
    return np.ascontiguousarray(mask, dtype=np.float32), np.ascontiguousarray(obj_ptr[0, token], dtype=np.float32)


def _resize_aa(mask: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(H,W) float32 -> out_hw with torch's antialiased bilinear interpolation (width first, as ATen)."""
    x = mask[:, :, None]
    if x.shape[1] != out_hw[1]:
        x = _resize_axis(x, out_hw[1], axis=1)
    if x.shape[0] != out_hw[0]:
        x = _resize_axis(x, out_hw[0], axis=0)
    return np.ascontiguousarray(x[:, :, 0], dtype=np.float32)


def mask_prompt_inputs(mask: np.ndarray, image_size: int, low_res_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A user's (H,W) mask -> (the binary mask at image_size x image_size, its low-res logits).

    As `SAM2VideoPredictor.add_new_mask` (antialiased resize to the input size, >= 0.5) then
    `_use_mask_as_output` (logits -10/+10, antialiased downsampling to the low-res size).
    """
    m = np.asarray(mask).astype(np.float32)
    if m.shape != (image_size, image_size):
        m = (_resize_aa(m, (image_size, image_size)) >= 0.5).astype(np.float32)
    low_res = _resize_aa(m * MASK_OUT_SCALE + MASK_OUT_BIAS, (low_res_size, low_res_size))
    return m, low_res
