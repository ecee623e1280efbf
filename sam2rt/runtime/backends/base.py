"""The interface every inference backend implements."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    """Runs the exported encoder and decoder graphs.

    `encode` takes the normalised (1,3,1024,1024) float32 image and returns the three features
    by name (numpy arrays, or device buffers for GPU backends with `device != "cpu"`).
    `decode` takes those features plus the prompt tensors and returns host numpy arrays
    low_res_masks (B,4,256,256) and iou_predictions (B,4).

    GPU backends also offer `upload_features(host_features) -> features on their device`, which
    `Embedding.to_device` uses; their `decode` accepts host (numpy) features as well, copying them in.
    """

    name: str
    device: str

    def encode(self, image: np.ndarray) -> dict[str, Any]: ...

    def decode(
        self,
        features: dict[str, Any],
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray,
        has_mask_input: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]: ...
