"""Registry of the SAM 2 / SAM 2.1 model variants sam2rt knows how to export and serve (no torch here)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import Sam2rtError

MODEL_NAMES = ("hiera_tiny", "hiera_small", "hiera_base_plus", "hiera_large")
VERSIONS = ("2.1", "2.0")
# Other spellings accepted wherever a model name is: Roboflow's `sam2_version_id` spells base_plus b_plus.
MODEL_ALIASES = {"hiera_b_plus": "hiera_base_plus"}
ACCEPTED_MODEL_NAMES = MODEL_NAMES + tuple(MODEL_ALIASES)

_SHORT = {"hiera_tiny": "t", "hiera_small": "s", "hiera_base_plus": "b+", "hiera_large": "l"}
# Roboflow Inference's `sam2_version_id` for each model (it spells base_plus as b_plus).
_SERVE_ID = {
    "hiera_tiny": "hiera_tiny",
    "hiera_small": "hiera_small",
    "hiera_base_plus": "hiera_b_plus",
    "hiera_large": "hiera_large",
}
_CKPT_BASE = {
    "2.0": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/",
    "2.1": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/",
}

IMAGE_SIZE = 1024
LOW_RES_SIZE = 256
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
MASK_THRESHOLD = 0.0


@dataclass(frozen=True)
class ModelSpec:
    """One exportable SAM 2 variant: its name, release, bundled config and official checkpoint."""

    name: str
    version: str

    @property
    def model_id(self) -> str:
        prefix = "sam2.1" if self.version == "2.1" else "sam2"
        return f"{prefix}_{self.name}"

    @property
    def config_name(self) -> str:
        """The config path inside the `sam2` package, as `build_sam2` expects it."""
        folder, prefix = ("sam2.1", "sam2.1") if self.version == "2.1" else ("sam2", "sam2")
        return f"configs/{folder}/{prefix}_hiera_{_SHORT[self.name]}.yaml"

    @property
    def checkpoint_filename(self) -> str:
        return f"{self.model_id}.pt"

    @property
    def checkpoint_url(self) -> str:
        """The official download URL; $SAM2RT_CHECKPOINT_URL_BASE points it at a mirror instead."""
        base = os.environ.get("SAM2RT_CHECKPOINT_URL_BASE") or _CKPT_BASE[self.version]
        return base.rstrip("/") + "/" + self.checkpoint_filename

    @property
    def serve_id(self) -> str:
        return _SERVE_ID[self.name]


def canonical_name(name: str) -> str:
    """The model name for any accepted spelling (hiera_b_plus -> hiera_base_plus); unknown names unchanged."""
    return MODEL_ALIASES.get(name, name)


def get_spec(name: str, version: str = "2.1") -> ModelSpec:
    """Return the spec of a model (any accepted spelling), or raise Sam2rtError naming the valid choices."""
    name = canonical_name(name)
    if name not in MODEL_NAMES:
        raise Sam2rtError(f"unknown model {name!r}: choose one of {', '.join(ACCEPTED_MODEL_NAMES)}")
    if version not in VERSIONS:
        raise Sam2rtError(f"unknown SAM 2 release {version!r}: choose one of {', '.join(VERSIONS)}")
    return ModelSpec(name, version)


def serve_id_for(name: str) -> str:
    """Roboflow's `sam2_version_id` for a model name (hiera_base_plus -> hiera_b_plus)."""
    return _SERVE_ID[canonical_name(name)]


def canonical_serve_id(version_id: str) -> str:
    """The `sam2_version_id` a server keys its models by, for any accepted spelling of a model name
    (hiera_base_plus and hiera_b_plus -> hiera_b_plus); ids that name no known model come back unchanged
    (the server answers 404 for them, listing what it has loaded)."""
    name = canonical_name(version_id)
    return _SERVE_ID[name] if name in _SERVE_ID else version_id
