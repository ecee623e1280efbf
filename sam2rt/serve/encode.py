"""Mask encodings of the wire contract: polygons (`json`), COCO RLE (`rle`) and an npz file (`binary`)."""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np

FORMATS = ("json", "rle", "binary")


def mask_to_polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """External contours of a (H,W) bool mask as lists of [x, y] points, in OpenCV's order.

    `cv2.findContours(..., RETR_EXTERNAL, CHAIN_APPROX_SIMPLE)`, every contour kept (one- and
    two-point ones too); holes are not represented. An empty mask gives `[[]]`, as the reference.
    """
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = [c.reshape(-1, 2).tolist() for c in contours]
    return polygons or [[]]


def polygons_to_mask(polygons: list[list[list[int]]], hw: tuple[int, int]) -> np.ndarray:
    """Fill polygons back into a (H,W) bool mask (what a client does with the `json` format)."""
    out = np.zeros(hw, np.uint8)
    pts = [np.asarray(p, np.int32).reshape(-1, 1, 2) for p in polygons if len(p)]
    if pts:
        cv2.fillPoly(out, pts, 1)
        cv2.polylines(out, pts, True, 1)
    return out.astype(bool)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a (H,W) bool mask: `{"size": [H, W], "counts": str}` (pycocotools reads it)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode `mask_to_rle`'s output back to a (H,W) bool mask."""
    import warnings

    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():  # pycocotools' __array__ predates numpy 2's copy keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def to_npz(masks_logits: np.ndarray, low_res: np.ndarray) -> bytes:
    """`binary` format: np.savez_compressed with `masks` (N,H,W) logits and `low_res_masks` (N,256,256)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, masks=masks_logits.astype(np.float32), low_res_masks=low_res.astype(np.float32))
    return buf.getvalue()
