"""Image checks and the exact SAM 2 preprocessing (torchvision's antialiased resize + ImageNet normalisation) in numpy."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import InvalidImageError
from ..models import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD

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


def preprocess(image_rgb: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB uint8 HxWx3 -> normalised float32 1x3xSIZExSIZE, as SAM2Transforms (ToTensor, Resize, Normalize)."""
    x = image_rgb.astype(np.float32) / np.float32(255.0)
    x = resize_antialiased(x, size)
    x = (x - _MEAN) / _STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))[None]
