"""Image checks and the exact SAM 2 preprocessing (torchvision's antialiased resize + ImageNet normalisation) in numpy."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import InvalidImageError
from ..model_specs import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD

COLOR_ORDERS = ("RGB", "BGR")


def check_image(image: object, color_order: str = "RGB") -> np.ndarray:
    """Validate an HxWx3 uint8 image and return it as contiguous RGB.

    `color_order` says how the channels are ordered: "RGB" (PIL, skimage, the SAM 2 reference)
    or "BGR" (what `cv2.imread` returns); BGR images are flipped to RGB.
    """
    if color_order not in COLOR_ORDERS:
        raise InvalidImageError(f"color_order must be 'RGB' or 'BGR', got {color_order!r}")
    if not isinstance(image, np.ndarray):
        try:  # PIL images and other array-likes
            image = np.asarray(image)
        except Exception as exc:  # pragma: no cover - exotic objects
            raise InvalidImageError(f"image must be a numpy array (H, W, 3) of uint8, got {type(image).__name__}") from exc
        if image.dtype == object:
            raise InvalidImageError("image must be a numpy array (H, W, 3) of uint8, got an object array")
    if image.dtype != np.uint8:
        raise InvalidImageError(
            f"image dtype must be uint8 with values 0..255, got {image.dtype}; "
            "convert with `(img * 255).clip(0, 255).astype(np.uint8)` if it is a float image in [0, 1]"
        )
    if image.ndim != 3:
        raise InvalidImageError(
            f"image must have shape (H, W, 3), got {image.shape}; "
            "stack a grayscale image to 3 channels with `np.stack([img] * 3, -1)`"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidImageError(f"image is empty (shape {image.shape}); pass an image with at least one pixel")
    if image.shape[2] != 3:
        hint = " (drop the alpha channel with `img[..., :3]`)" if image.shape[2] == 4 else ""
        raise InvalidImageError(f"image must have 3 channels (RGB), got {image.shape[2]}{hint}")
    if color_order == "BGR":
        image = image[..., ::-1]
    return np.ascontiguousarray(image)


@lru_cache(maxsize=32)
def _aa_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (out_size x K) of torch's antialiased bilinear resize along one axis.

    Mirrors ATen's `_compute_indices_min_size_weights_aa` (align_corners=False, triangle filter
    stretched by the scale when downsampling), which torchvision's `Resize` uses on tensors.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(out_size) + 0.5)
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    taps = int((xmax - xmin).max())
    j = np.arange(taps)[None, :]
    idx = xmin[:, None] + j
    valid = idx < xmax[:, None]
    w = np.clip(1.0 - np.abs((idx - centers[:, None] + 0.5) * invscale), 0.0, None) * valid
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    return np.minimum(idx, in_size - 1), w.astype(np.float32)


RESIZE_BLOCK = 64  # output pixels per window of resize_windows


@lru_cache(maxsize=16)
def resize_windows(in_size: int, out_size: int, block: int = RESIZE_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """_aa_taps as a block-banded matrix: index (G, L) int64 and taps (G, b, L) float32, G = out_size / b.

    Output pixels g*b .. g*b+b-1 read only the L input pixels index[g] (a contiguous window, the same length L for
    every block so that the blocks stack; a window is moved left where it would pass the input's end), with weights
    taps[g]: out[g*b + r] = sum_k taps[g, r, k] * x[index[g, k]]. These are the weights of `resize_matrix`, less its
    zeros: a dense 1920 -> 1024 product multiplies ~95% zeros, this one ~1 - 1/(1 + 2/b) at 1080p.
    b = `block` where it divides out_size, else out_size (one block, L = in_size at most). The arrays are cached
    and read-only (the runtime uploads them once per image size)."""
    idx, w = _aa_taps(in_size, out_size)
    b = block if out_size % block == 0 else out_size
    g = out_size // b
    rows = np.arange(out_size)
    starts, spans = [], []
    for k in range(g):
        sel = w[k * b : (k + 1) * b] > 0
        used = idx[k * b : (k + 1) * b][sel]
        starts.append(int(used.min()))
        spans.append(int(used.max()) + 1 - starts[-1])
    length = max(spans)
    starts = [min(s, in_size - length) for s in starts]
    index = np.asarray([np.arange(s, s + length) for s in starts], np.int64)
    taps = np.zeros((g, b, length), np.float64)
    block_of = rows // b
    for k in range(idx.shape[1]):  # clipped taps (weight 0) may point outside a window: they add nothing
        col = idx[:, k] - np.asarray(starts)[block_of]
        inside = (w[:, k] > 0)
        np.add.at(taps, (block_of[inside], rows[inside] % b, col[inside]), w[inside, k].astype(np.float64))
    index.setflags(write=False)
    taps = taps.astype(np.float32)
    taps.setflags(write=False)
    return index, taps


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    idx, w = _aa_taps(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    out = np.take(x, idx[:, 0], axis=axis) * w[:, 0].reshape(shape)
    for k in range(1, idx.shape[1]):
        out += np.take(x, idx[:, k], axis=axis) * w[:, k].reshape(shape)
    return out


def resize_antialiased(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Resize an HxWxC float32 image to size x size exactly as torchvision's antialiased bilinear Resize."""
    x = image
    if x.shape[1] != size:  # width first, as ATen's separable kernel does
        x = _resize_axis(x, size, axis=1)
    if x.shape[0] != size:
        x = _resize_axis(x, size, axis=0)
    return x


_MEAN = np.asarray(PIXEL_MEAN, dtype=np.float32)
_STD = np.asarray(PIXEL_STD, dtype=np.float32)


_SCALE = (1.0 / (255.0 * np.asarray(PIXEL_STD, dtype=np.float64))).astype(np.float32)  # ToTensor + Normalize's 1/std
_OFFSET = (np.asarray(PIXEL_MEAN, dtype=np.float64) / np.asarray(PIXEL_STD, dtype=np.float64)).astype(np.float32)


def _resize_last_axis(x: np.ndarray, out_size: int, scale: np.ndarray | None = None) -> np.ndarray:
    """Resize (C, R, W) float32 along W; `scale` (C,) is folded into the tap weights (one pass, no temporaries)."""
    idx, w = _aa_taps(x.shape[-1], out_size)
    out = np.empty((*x.shape[:-1], out_size), np.float32)
    tmp = np.empty_like(out)
    for k in range(idx.shape[1]):
        wk = w[:, k][None, None, :]
        if scale is not None:
            wk = wk * scale[:, None, None]
        dst = out if k == 0 else tmp
        np.take(x, idx[:, k], axis=-1, out=dst)
        dst *= wk
        if k:
            out += tmp
    return out


def _resize_rows(x: np.ndarray, out_size: int, scale: np.ndarray | None = None) -> np.ndarray:
    """Resize (C, H, W) float32 along H (row gathers are contiguous copies)."""
    idx, w = _aa_taps(x.shape[1], out_size)
    out = np.empty((x.shape[0], out_size, x.shape[2]), np.float32)
    tmp = np.empty_like(out)
    for k in range(idx.shape[1]):
        wk = w[:, k][None, :, None]
        if scale is not None:
            wk = wk * scale[:, None, None]
        dst = out if k == 0 else tmp
        np.take(x, idx[:, k], axis=1, out=dst)
        dst *= wk
        if k:
            out += tmp
    return out


def preprocess(image_rgb: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB uint8 HxWx3 -> normalised float32 1x3xSIZExSIZE, as SAM2Transforms (ToTensor, Resize, Normalize).

    The same separable antialiased resize as `resize_antialiased` (width first, as ATen), done
    channel-first so the result needs no transpose, with ToTensor's 1/255 and Normalize's 1/std
    folded into the first pass's tap weights and the mean subtracted once at the end (the resize
    weights sum to 1): one pass over the image fewer than resize-then-normalise. Equal to the reference
    to ~1e-6 (tests/test_preprocess.py; timings in benchmarks/README.md).
    """
    x = np.ascontiguousarray(image_rgb.transpose(2, 0, 1), dtype=np.float32)  # (3, H, W), one pass from uint8
    scale = _SCALE
    if x.shape[2] != size:
        x = _resize_last_axis(x, size, scale)
        scale = None
    if x.shape[1] != size:
        x = _resize_rows(x, size, scale)
        scale = None
    if scale is not None:  # already size x size: only normalise
        x *= scale[:, None, None]
    x -= _OFFSET[:, None, None]
    return x[None]
