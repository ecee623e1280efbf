"""The old name of sam2rt.model_specs (model names, releases, checkpoints, image constants); import that instead.

Kept so that code written against `sam2rt.models` keeps working; it holds nothing of its own.
"""

from __future__ import annotations

from .model_specs import (  # noqa: F401
    ACCEPTED_MODEL_NAMES,
    IMAGE_SIZE,
    LOW_RES_SIZE,
    MASK_THRESHOLD,
    MODEL_ALIASES,
    MODEL_NAMES,
    PIXEL_MEAN,
    PIXEL_STD,
    VERSIONS,
    ModelSpec,
    canonical_name,
    get_spec,
    serve_id_for,
)
