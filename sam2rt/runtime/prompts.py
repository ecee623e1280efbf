"""Validation of point/box/mask prompts and their conversion to the decoder's batched inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..errors import InvalidPromptError
from ..model_specs import IMAGE_SIZE, LOW_RES_SIZE

VALID_LABELS = (-1, 0, 1, 2, 3)
PAD_LABEL = -1.0


def _as_float_array(value: object, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidPromptError(f"{name} must be numeric, got {value!r:.80}") from exc
    if not np.all(np.isfinite(arr)):
        raise InvalidPromptError(f"{name} contains NaN or infinite values: {arr.tolist()!r:.120}; pass finite numbers")
    return arr


def valid_labels(labels: np.ndarray) -> np.ndarray:
    """Elementwise: the label is one of VALID_LABELS, the integers -1..3 (np.isin's test; np.isin sorts, ~40 us
    a click)."""
    return (labels == np.floor(labels)) & (labels >= VALID_LABELS[0]) & (labels <= VALID_LABELS[-1])


def check_points(coords: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N,2) or (B,N,2) coordinates with (N,) or (B,N) labels; returns (B,N,2), (B,N)."""
    if labels is None:
        raise InvalidPromptError("point_labels must be given with point_coords (1 = foreground, 0 = background)")
    pts = _as_float_array(coords, "point_coords")
    lab = _as_float_array(labels, "point_labels")
    if pts.ndim == 2:
        pts = pts[None]
    if lab.ndim == 1:
        lab = lab[None]
    if pts.ndim != 3 or pts.shape[-1] != 2:
        raise InvalidPromptError(f"point_coords must have shape (N, 2) or (B, N, 2) as (x, y), got {np.shape(coords)}")
    if lab.ndim != 2 or lab.shape != pts.shape[:2]:
        raise InvalidPromptError(
            f"point_labels shape {np.shape(labels)} does not match point_coords shape {np.shape(coords)}: "
            "give one label per point"
        )
    bad = ~valid_labels(lab)
    if bad.any():
        raise InvalidPromptError(
            f"point_labels must be in {{-1, 0, 1, 2, 3}} (1 foreground, 0 background, 2/3 box corners, "
            f"-1 padding), got {sorted(set(lab[bad].tolist()))}"
        )
    return pts, lab


def check_boxes(box: object) -> np.ndarray:
    """Validate a (4,) or (B,4) XYXY box array; returns (B,4)."""
    arr = _as_float_array(box, "box")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[-1] != 4:
        raise InvalidPromptError(f"box must have shape (4,) or (B, 4) as x0, y0, x1, y1, got {np.shape(box)}")
    if np.any(arr[:, 2] < arr[:, 0]) or np.any(arr[:, 3] < arr[:, 1]):
        raise InvalidPromptError(
            f"box corners are reversed in {arr.tolist()!r:.120}: boxes are (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0"
        )
    return arr


def check_mask_input(mask_input: object) -> np.ndarray:
    """Validate low-res mask logits (256,256), (1,256,256) or (B,1,256,256); returns (B,1,256,256) float32."""
    arr = _as_float_array(mask_input, "mask_input")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != (1, LOW_RES_SIZE, LOW_RES_SIZE):
        raise InvalidPromptError(
            f"mask_input must be low-res logits of shape (1, 256, 256) or (B, 1, 256, 256), got {np.shape(mask_input)}; "
            "pass the low_res_logits of a previous prediction, e.g. logits[best][None]"
        )
    return arr.astype(np.float32)


def check_inside(xy: np.ndarray, limits: tuple[float, float], name: str, unit: str) -> None:
    """Raise if any (x, y) lies outside [0, limit_x] x [0, limit_y]."""
    lx, ly = limits
    flat = xy.reshape(-1, 2)
    out = (flat[:, 0] < 0) | (flat[:, 0] > lx) | (flat[:, 1] < 0) | (flat[:, 1] > ly)
    if out.any():
        raise InvalidPromptError(
            f"{name} {flat[out][0].tolist()} lies outside the image ({unit}: x in [0, {lx:g}], y in [0, {ly:g}]); "
            "pass coordinates inside the image"
        )


def to_input_frame(xy: np.ndarray, orig_hw: tuple[int, int], normalized: bool) -> np.ndarray:
    """Map (x, y) pixel (or [0,1] normalised) coordinates of the original image to the 1024 input frame."""
    if normalized:
        return xy * IMAGE_SIZE
    h, w = orig_hw
    return xy / np.array([w, h], dtype=np.float64) * IMAGE_SIZE


def assemble(
    coords: np.ndarray | None, labels: np.ndarray | None, boxes: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate box corners (labels 2, 3) before points and append SAM's padding point, as the reference.

    Inputs are already in the input frame: coords (B,N,2), labels (B,N), boxes (B,4). Returns float32
    (B, M, 2) and (B, M); M is 0 when there is neither a point nor a box.
    """
    parts_xy, parts_lab = [], []
    if boxes is not None:
        parts_xy.append(boxes.reshape(-1, 2, 2))
        parts_lab.append(np.tile(np.array([[2.0, 3.0]]), (boxes.shape[0], 1)))
    if coords is not None:
        parts_xy.append(coords)
        parts_lab.append(labels)
    if not parts_xy:
        return np.zeros((1, 0, 2), np.float32), np.zeros((1, 0), np.float32)
    batch = {p.shape[0] for p in parts_xy}
    if len(batch) > 1:
        raise InvalidPromptError(
            f"{boxes.shape[0]} boxes cannot be combined with point prompts for {coords.shape[0]} objects: "
            "give the same number of boxes and point sets (B, N, 2), or one of each"
        )
    b = batch.pop()
    xy = np.concatenate(parts_xy + [np.zeros((b, 1, 2))], axis=1)
    lab = np.concatenate(parts_lab + [np.full((b, 1), PAD_LABEL)], axis=1)
    return xy.astype(np.float32), lab.astype(np.float32)


class CheckedPrompt(NamedTuple):
    """One validated prompt in the decoder's input frame: coords (1,M,2), labels (1,M) (padding point
    included), mask (1,1,256,256) or None."""

    coords: np.ndarray
    labels: np.ndarray
    mask: np.ndarray | None


@dataclass
class Prompt:
    """One object's prompt, in original-image pixel coordinates.

    points: (N,2) x,y; labels: (N,) 1 foreground / 0 background; box: (4,) x0,y0,x1,y1;
    mask_input: (256,256) or (1,256,256) low-res logits of an earlier prediction.
    """

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None

    def checked(self, orig_hw: tuple[int, int]) -> CheckedPrompt:
        """Validate against an image of size orig_hw; return it in the decoder's input frame."""
        h, w = orig_hw
        coords = labels = boxes = None
        if self.points is not None and np.size(self.points) > 0:
            coords, labels = check_points(self.points, self.labels)
            if coords.shape[0] != 1:
                raise InvalidPromptError(f"a Prompt holds one object's points (N, 2), got shape {np.shape(self.points)}")
            check_inside(coords, (w, h), "point", "pixels")
            coords = to_input_frame(coords, orig_hw, normalized=False)
        elif self.labels is not None and np.size(self.labels) > 0:
            raise InvalidPromptError("labels were given without points; give points (N, 2) with labels (N,)")
        if self.box is not None:
            boxes = check_boxes(self.box)
            if boxes.shape[0] != 1:
                raise InvalidPromptError(f"a Prompt holds one box (4,), got shape {np.shape(self.box)}")
            check_inside(boxes.reshape(-1, 2), (w, h), "box corner", "pixels")
            boxes = to_input_frame(boxes.reshape(-1, 2), orig_hw, normalized=False).reshape(-1, 4)
        mask = None if self.mask_input is None else check_mask_input(self.mask_input)
        if mask is not None and mask.shape[0] != 1:
            raise InvalidPromptError(f"a Prompt holds one mask_input (1, 256, 256), got shape {np.shape(self.mask_input)}")
        if coords is None and boxes is None and mask is None:
            raise InvalidPromptError("a prompt needs at least one point, a box or a mask_input")
        xy, lab = assemble(coords, labels, boxes)
        return CheckedPrompt(xy, lab, mask)


def check_prompt_batch(prompts: list[Prompt], orig_hw: tuple[int, int]) -> list[CheckedPrompt] | None:
    """Prompts of one form (the same number of points, each with or each without a box, no mask_input), all valid:
    the same CheckedPrompts `Prompt.checked` gives one by one, each value computed by the same operations, validated
    and converted as one batch (benchmarks/README.md: 16 boxes 0.79 ms one by one, 0.093 ms as a batch).
    None for anything else, an invalid prompt included: the caller then checks them one by one, which raises the
    first bad prompt's own error."""
    first = prompts[0]
    with_points, with_box = first.points is not None, first.box is not None
    for p in prompts:
        if (p.mask_input is not None or (p.points is not None) != with_points or (p.box is not None) != with_box
                or (p.labels is not None) != with_points):
            return None
    if not (with_points or with_box):
        return None
    h, w = orig_hw
    try:
        coords = labels = boxes = None
        if with_points:
            coords = np.asarray([p.points for p in prompts], dtype=np.float64)
            labels = np.asarray([p.labels for p in prompts], dtype=np.float64)
            if coords.ndim != 3 or coords.shape[1] == 0 or coords.shape[2] != 2 or labels.shape != coords.shape[:2]:
                return None
        if with_box:
            boxes = np.asarray([p.box for p in prompts], dtype=np.float64)
            if boxes.shape != (len(prompts), 4):
                return None
    except (TypeError, ValueError):  # ragged, or not numbers
        return None
    for arr in (coords, labels, boxes):
        if arr is not None and not np.all(np.isfinite(arr)):
            return None
    if labels is not None and not valid_labels(labels).all():
        return None
    corners = [] if coords is None else [coords.reshape(-1, 2)]
    if boxes is not None:
        if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
            return None
        corners.append(boxes.reshape(-1, 2))
    for xy in corners:
        if np.any((xy[:, 0] < 0) | (xy[:, 0] > w) | (xy[:, 1] < 0) | (xy[:, 1] > h)):
            return None
    if coords is not None:
        coords = to_input_frame(coords, orig_hw, normalized=False)
    if boxes is not None:
        boxes = to_input_frame(boxes.reshape(-1, 2), orig_hw, normalized=False).reshape(-1, 4)
    xy, lab = assemble(coords, labels, boxes)
    return [CheckedPrompt(xy[i:i + 1], lab[i:i + 1], None) for i in range(len(prompts))]


def pack_point_prompts(point_coords: np.ndarray, point_labels: np.ndarray) -> np.ndarray:
    """(B,N,2) coordinates and (B,N) labels -> (B,N,3) float32 (x, y, label): the merged decode graphs' one prompt
    input (export/decode_graphs.py), so that a decode's prompts go up in one copy."""
    return np.concatenate([np.asarray(point_coords, np.float32), np.asarray(point_labels, np.float32)[..., None]], axis=-1)
