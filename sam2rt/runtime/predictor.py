"""Predictor: a drop-in for `sam2.sam2_image_predictor.SAM2ImagePredictor` on the sam2rt runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageNotSetError
from .embedding import Embedding
from .model import Sam2Model
from .prompts import assemble, check_boxes, check_inside, check_mask_input, check_points, to_input_frame


class Predictor:
    """Same `set_image` / `predict` contract as SAM2ImagePredictor: numpy in, numpy out.

    Switching from the reference is one import and one constructor:
    `Predictor.from_dir("models/hiera_tiny")` instead of `SAM2ImagePredictor(build_sam2(...))`.
    """

    def __init__(self, model: Sam2Model, mask_threshold: float | None = None) -> None:
        self.model = model
        self.mask_threshold = model.mask_threshold if mask_threshold is None else float(mask_threshold)
        self._embedding: Embedding | None = None

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, backend: str = "auto", mask_threshold: float | None = None, threads: int | None = None
    ) -> "Predictor":
        return cls(Sam2Model.from_dir(model_dir, backend=backend, threads=threads), mask_threshold)

    # --- image state --------------------------------------------------------------------
    def set_image(self, image: Any, color_order: str = "RGB") -> None:
        """Compute the embedding of an HxWx3 uint8 image (or PIL image); RGB unless color_order="BGR"."""
        self.reset_predictor()
        self._embedding = self.model.embed(image, color_order=color_order)

    def set_embedding(self, embedding: Embedding) -> None:
        """Use a previously computed (or loaded) embedding instead of calling set_image."""
        self.model._check_embedding(embedding)
        self._embedding = embedding

    @property
    def embedding(self) -> Embedding:
        if self._embedding is None:
            raise ImageNotSetError("An image must be set with .set_image(...) before mask prediction.")
        return self._embedding

    def get_image_embedding(self) -> np.ndarray:
        """The (1,256,64,64) image embedding of the current image."""
        return np.asarray(self.embedding.to_host().features["image_embed"])

    def reset_predictor(self) -> None:
        self._embedding = None

    @property
    def _is_image_set(self) -> bool:
        return self._embedding is not None

    @property
    def _orig_hw(self) -> list[tuple[int, int]]:
        return [self.embedding.original_size]

    # --- prediction ---------------------------------------------------------------------
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for the current image, exactly as SAM2ImagePredictor.predict.

        Returns masks (C,H,W) float32 0/1 (logits if return_logits), scores (C,) and low-res
        logits (C,256,256); with B objects (boxes (B,4) or points (B,N,2)) each gains a leading B.
        Coordinates are pixels of the original image, or [0,1] when normalize_coords=False.
        """
        emb = self.embedding
        h, w = emb.original_size
        limits, unit = ((w, h), "pixels") if normalize_coords else ((1.0, 1.0), "normalized coordinates")
        coords = labels = boxes = None
        if point_coords is not None:
            coords, labels = check_points(point_coords, point_labels)
            check_inside(coords, limits, "point", unit)
            coords = to_input_frame(coords, (h, w), normalized=not normalize_coords)
        if box is not None:
            boxes = check_boxes(box)
            check_inside(boxes.reshape(-1, 2), limits, "box corner", unit)
            boxes = to_input_frame(boxes.reshape(-1, 2), (h, w), normalized=not normalize_coords).reshape(-1, 4)
        mask = None if mask_input is None else check_mask_input(mask_input)
        xy, lab = assemble(coords, labels, boxes)
        if mask is not None and xy.shape[1] == 0:
            xy, lab = np.zeros((mask.shape[0], 0, 2), np.float32), np.zeros((mask.shape[0], 0), np.float32)
        request = self.model.mask_request((h, w), multimask_output, return_logits, self.mask_threshold, float_masks=True)
        out = self.model.decode_batch(emb, xy, lab, mask, request)
        masks = out.masks  # float32: 0/1 masks, or the logits
        if masks.shape[0] == 1:
            return masks[0], out.scores[0], out.low_res_logits[0]
        return masks, out.scores, out.low_res_logits
