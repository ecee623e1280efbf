"""Reading images from disk and drawing masks and prompts on them (OpenCV; RGB in, RGB out)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .errors import InvalidImageError

PALETTE = np.array(
    [[30, 144, 255], [255, 99, 71], [50, 205, 50], [255, 215, 0], [186, 85, 211], [0, 206, 209], [255, 140, 0]],
    dtype=np.float32,
)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 HxWx3 (alpha dropped, grayscale expanded)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidImageError(f"image file {path} does not exist")
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise InvalidImageError(f"{path} could not be decoded as an image (PNG, JPEG, BMP, TIFF, WebP ...)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_image(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image (format from the extension)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InvalidImageError(f"could not encode an image for {path}; use a .png or .jpg name")
    buf.tofile(str(path))
    return path


RANDOM_WEIGHTS_TEXT = "RANDOM WEIGHTS: masks are meaningless"
BANNER_COLOR = (200, 0, 0)  # RGB: the banner's background; its text is white


def mark_random_weights(rgb: np.ndarray, text: str = RANDOM_WEIGHTS_TEXT) -> np.ndarray:
    """Draw a red banner across the top of the image saying its masks come from random weights (in place).

    The banner is 1/12 of the image height (at least 16 pixels, at most the image), the text scaled
    to fit its width, so anyone who sees the picture without the command's output sees the warning.
    """
    h, w = rgb.shape[:2]
    band = min(h, max(16, h // 12))
    rgb[:band] = BANNER_COLOR
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, max(1, band // 16)
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, thickness)
    scale = min((band * 0.6) / th, (w * 0.95) / tw)
    (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    origin = (max(0, (w - tw) // 2), (band + th) // 2)
    cv2.putText(rgb, text, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return rgb


def annotate(
    rgb: np.ndarray,
    masks: np.ndarray,
    points: Sequence[Sequence[float]] = (),
    boxes: Sequence[Sequence[float]] = (),
    alpha: float = 0.5,
    random_weights: bool = False,
) -> np.ndarray:
    """Overlay (K,H,W) boolean masks in distinct colours with their outlines, plus the prompts.

    With `random_weights` (a model exported with random weights) a red "RANDOM WEIGHTS" banner is
    drawn across the top, so the picture cannot be mistaken for a trained model's result.
    """
    out = rgb.astype(np.float32)
    for i, mask in enumerate(np.asarray(masks, dtype=bool)):
        color = PALETTE[i % len(PALETTE)]
        out[mask] = out[mask] * (1 - alpha) + color * alpha
    out = out.clip(0, 255).astype(np.uint8)
    for i, mask in enumerate(np.asarray(masks, dtype=bool)):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in PALETTE[i % len(PALETTE)]), 2)
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), (255, 255, 255), 2)
    for p in points:
        x, y = int(p[0]), int(p[1])
        label = int(p[2]) if len(p) > 2 else 1
        cv2.circle(out, (x, y), 6, (0, 255, 0) if label == 1 else (255, 0, 0), -1)
        cv2.circle(out, (x, y), 6, (255, 255, 255), 1)
    if random_weights:
        mark_random_weights(out)
    return out
