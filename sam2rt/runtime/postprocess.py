"""Choosing among the decoder's four mask tokens and bringing low-res logits to the original image size."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

LOGIT_CLAMP = 32.0


def stability_scores(logits: np.ndarray, delta: float) -> np.ndarray:
    """IoU between the masks thresholded at +delta and -delta, over the last two axes (1.0 where empty)."""
    flat = logits.reshape(*logits.shape[:-2], -1)
    area_i = np.count_nonzero(flat > delta, axis=-1).astype(np.float32)
    area_u = np.count_nonzero(flat > -delta, axis=-1).astype(np.float32)
    return np.where(area_u > 0, area_i / np.maximum(area_u, 1), np.float32(1.0))


def select_masks(
    low_res: np.ndarray,
    iou: np.ndarray,
    multimask_output: bool,
    *,
    dynamic_via_stability: bool = True,
    stability_delta: float = 0.05,
    stability_thresh: float = 0.98,
) -> tuple[np.ndarray, np.ndarray]:
    """Pick output tokens as SAM 2's MaskDecoder.forward does at inference.

    `low_res` (B,4,h,w) and `iou` (B,4) hold the single-mask token then the three multimask
    tokens. multimask_output -> the three multimask tokens; otherwise the single-mask token,
    replaced by the best multimask token where its stability score is below the threshold.
    """
    if multimask_output:
        return low_res[:, 1:], iou[:, 1:]
    if not dynamic_via_stability:
        return low_res[:, :1], iou[:, :1]
    rows = np.arange(low_res.shape[0])
    best = np.argmax(iou[:, 1:], axis=-1) + 1
    stable = stability_scores(low_res[:, 0], stability_delta) >= stability_thresh
    pick = np.where(stable, 0, best)
    return low_res[rows, pick][:, None], iou[rows, pick][:, None]


@lru_cache(maxsize=64)
def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-tap indices and weights of bilinear interpolation with align_corners=False (ATen's rule)."""
    scale = np.float32(in_size) / np.float32(out_size)  # float, then double arithmetic, as ATen
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def upsample_logits(logits: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear (align_corners=False, no antialias) resize of (..., h, w) logits to (..., H, W).

    Reproduces `F.interpolate(..., mode="bilinear", align_corners=False)` to float rounding
    (OpenCV's resize differs by ~1e-4, enough to flip pixels near the mask threshold).
    """
    h, w = int(orig_hw[0]), int(orig_hw[1])
    x = np.ascontiguousarray(logits, dtype=np.float32)
    # the same arithmetic as x[i0] * (1 - l) + x[i1] * l, in two preallocated buffers (no temporaries)
    if x.shape[-1] != w:
        c0, c1, cl = _linear_taps(x.shape[-1], w)
        out = np.take(x, c0, axis=-1)
        out *= 1 - cl
        tmp = np.take(x, c1, axis=-1)
        tmp *= cl
        out += tmp
        x = out
    if x.shape[-2] != h:
        r0, r1, rl = _linear_taps(x.shape[-2], h)
        rl = rl[:, None]
        out = np.take(x, r0, axis=-2)
        out *= 1 - rl
        tmp = np.take(x, r1, axis=-2)
        tmp *= rl
        out += tmp
        x = out
    return x

def clamp_logits(logits: np.ndarray) -> np.ndarray:
    """Clamp low-res logits to [-32, 32], as the reference returns them."""
    return np.clip(logits, -LOGIT_CLAMP, LOGIT_CLAMP)
