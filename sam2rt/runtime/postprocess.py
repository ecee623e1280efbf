"""Choosing among the decoder's four mask tokens and bringing low-res logits to the original image size."""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

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


def _resize_last(x: np.ndarray, i0: np.ndarray, i1: np.ndarray, lam: np.ndarray, axis: int,
                 tmp: np.ndarray | None = None) -> np.ndarray:
    """x[i0] * (1 - lam) + x[i1] * lam along `axis` (-1 or -2), in one new buffer and one scratch (`tmp`, reused when
    given: its shape is the result's)."""
    out = np.take(x, i0, axis=axis)
    out *= 1 - lam
    if tmp is None:
        tmp = np.empty_like(out)
    np.take(x, i1, axis=axis, out=tmp, mode="clip")  # "clip": unbuffered (the indices are in range)
    tmp *= lam
    out += tmp
    return out


def upsample_logits(logits: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear (align_corners=False, no antialias) resize of (..., h, w) logits to (..., H, W).

    Reproduces `F.interpolate(..., mode="bilinear", align_corners=False)` to float rounding
    (OpenCV's resize differs by ~1e-4, enough to flip pixels near the mask threshold).

    Width first, then height, as ATen (and the runtime's upsampling graph). Where the image has fewer rows than the
    logits (H < h: a wide, short image), the two rows each output row reads are taken first and each is resized in
    width, then blended: per element the same products and sums, so the same values, but the working memory is ~3
    (H, W) float32 buffers instead of two (h, W) ones (a 3 x 8,000,000 image would have needed 16 GB per mask).
    """
    h, w = int(orig_hw[0]), int(orig_hw[1])
    x = np.ascontiguousarray(logits, dtype=np.float32)
    lh, lw = x.shape[-2], x.shape[-1]
    c0, c1, cl = _linear_taps(lw, w) if lw != w else (None, None, None)
    if lh != h and h < lh:
        r0, r1, rl = _linear_taps(lh, h)
        rl = rl[:, None]
        top, bottom = np.take(x, r0, axis=-2), np.take(x, r1, axis=-2)  # (..., H, w): small
        if c0 is not None:
            tmp = np.empty((*x.shape[:-2], h, w), np.float32)
            top = _resize_last(top, c0, c1, cl, -1, tmp)
            bottom = _resize_last(bottom, c0, c1, cl, -1, tmp)
            del tmp
        top *= 1 - rl
        bottom *= rl
        top += bottom
        return top
    if c0 is not None:
        x = _resize_last(x, c0, c1, cl, -1)
    if lh != h:
        r0, r1, rl = _linear_taps(lh, h)
        x = _resize_last(x, r0, r1, rl[:, None], -2)
    return x


def clamp_logits(logits: np.ndarray) -> np.ndarray:
    """Clamp low-res logits to [-32, 32], as the reference returns them."""
    return np.clip(logits, -LOGIT_CLAMP, LOGIT_CLAMP)


_GRAPH_FILE = Path(__file__).resolve().parent / "graphs" / "upsample.onnx"


class Upsampler:
    """Logits to the original size (and masks), on ONNX Runtime's threads where it is installed, else numpy.

    Both give identical results: the graph (sam2rt/runtime/graphs/upsample.onnx, built by
    sam2rt.export.upsample_graph) does upsample_logits's operations in the same order. The graph is
    preferred because it runs on all of ONNX Runtime's intra-op threads and keeps its intermediate
    buffers in ONNX Runtime's arena instead of allocating image-sized numpy arrays per call
    (measurements: benchmarks/README.md).
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._session: Any = None
        self._lock = threading.Lock()

    def _session_or_false(self) -> Any:
        """The graph's ORT session, created on first use; False if onnxruntime or the graph file is missing."""
        if self._session is None:
            with self._lock:
                if self._session is None:
                    try:
                        from .backends.onnxruntime_backend import session_options

                        import onnxruntime as ort

                        so = session_options(self.threads, mem_pattern=False)
                        self._session = ort.InferenceSession(str(_GRAPH_FILE), so, providers=["CPUExecutionProvider"])
                    except Exception:  # no onnxruntime (e.g. a TensorRT-only install): numpy does it
                        self._session = False
        return self._session

    def __call__(
        self, logits: np.ndarray, orig_hw: tuple[int, int], threshold: float | None = None, float_masks: bool = False
    ) -> np.ndarray:
        """(..., h, w) logits -> (..., H, W): the upsampled logits, or with `threshold` the masks above it
        (bool, or float32 0/1 with `float_masks`)."""
        x = np.ascontiguousarray(logits, dtype=np.float32)
        h, w = int(orig_hw[0]), int(orig_hw[1])
        session = self._session_or_false() if x.ndim == 4 and x.size else False
        if not session:
            up = upsample_logits(x, (h, w))
            if threshold is None:
                return up
            masks = up > threshold
            return masks.astype(np.float32) if float_masks else masks
        c0, c1, cl = _linear_taps(x.shape[-1], w)
        r0, r1, rl = _linear_taps(x.shape[-2], h)
        feeds = {
            "logits": x, "c0": c0, "c1": c1, "r0": r0, "r1": r1, "cw0_col": (1 - cl)[:, None], "cw1_col": cl[:, None],
            "rw0": (1 - rl)[:, None], "rw1": rl[:, None], "threshold": np.asarray(threshold or 0.0, np.float32),
        }
        name = "upsampled" if threshold is None else ("mask_values" if float_masks else "masks")
        return session.run([name], feeds)[0]
