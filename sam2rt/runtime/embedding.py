"""Embedding: the encoder's three feature maps for one image, plus what is needed to decode against them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidEmbeddingError
from .tensors import as_host

FEATURE_NAMES = ("image_embed", "high_res_feats_0", "high_res_feats_1")
# Per-image tensors the fast mask-free decoder reads instead of FEATURE_NAMES (decoder_prep.onnx makes
# them from the features; see sam2rt.export.fast_decoder).
PREPARED_NAMES = ("prep_keys0", "prep_t2i_k0", "prep_t2i_v0", "prep_i2t_q0", "prep_feat_s1", "prep_feat_s0")
# With more points per prompt (6 + points > 16 tokens) the fast decoder's rewrite costs more than it saves.
FAST_MAX_POINTS = 10
# Prompts per fast-decoder run (the manifest's `prompts_per_run`, for exports that record none): the
# graph is exported for one prompt, so that every shape but the point count is a constant.
FAST_BATCH = 1
# `prompts_per_run` of a fast decoder that takes any batch in one run (the GPU form, decoder_fast.device.onnx).
PROMPTS_PER_RUN_ANY = "any"


def fast_prompts_per_run(entry: dict[str, Any]) -> int | None:
    """The prompts a fast-decoder graph takes per run, from its manifest entry: None for any number, FAST_BATCH
    where the entry records none (exports from before the field)."""
    value = entry.get("prompts_per_run", FAST_BATCH)
    return None if value == PROMPTS_PER_RUN_ANY else int(value)


@dataclass
class Embedding:
    """Image features from `embed()`; reusable for any number of `decode()` calls.

    `features` maps image_embed (1,256,64,64), high_res_feats_0 (1,32,256,256) and
    high_res_feats_1 (1,64,128,128) to arrays. On the CPU backends they are numpy arrays; a
    GPU backend may hold device buffers there, with `device` saying where they live.
    `model_key` identifies the encoder that made them (its graph's sha256).

    `prepared` holds what a backend derived from the features once per image to decode faster
    (the CPU backend's PREPARED_NAMES, ~22 MiB for 1024 input); it is a cache: `save()` leaves it
    out, and a backend that wants it and finds it empty fills it on the first decode.
    """

    features: dict[str, Any]
    original_size: tuple[int, int]
    model_key: str
    device: str = "cpu"
    meta: dict[str, Any] = field(default_factory=dict)
    prepared: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        arrays = list(self.features.values()) + list(self.prepared.values())
        return int(sum(getattr(f, "nbytes", 0) for f in arrays))

    def to_host(self) -> "Embedding":
        """Return an Embedding whose features are numpy arrays in host memory."""
        if self.device == "cpu":
            return self
        feats = {k: as_host(v) for k, v in self.features.items()}
        return Embedding(feats, self.original_size, self.model_key, "cpu", dict(self.meta))

    def to_device(self, target: Any) -> "Embedding":
        """Return an Embedding whose features live where `target` computes.

        `target` is a backend, a Sam2Model or a Predictor. On a GPU backend (tensorrt, onnxruntime-cuda)
        the host features are uploaded once, so later decodes need no copy from the host; on a CPU
        backend this is `to_host()`. An embedding already on that device is returned as is.
        """
        from .backends.base import Backend

        if isinstance(target, Backend):
            backend = target
        elif isinstance(getattr(target, "backend", None), Backend):  # a Sam2Model
            backend = target.backend
        else:  # a Predictor
            backend = target.model.backend
        if backend.device == self.device:
            return self
        host = self.to_host()
        if backend.device == "cpu":
            return host
        return Embedding(backend.upload_features(host.features), self.original_size, self.model_key, backend.device,
                         dict(self.meta))

    def save(self, path: str | Path) -> Path:
        """Write the embedding to an .npz file (no pickling); load it back with Embedding.load."""
        host = self.to_host()
        header = {"original_size": list(self.original_size), "model_key": self.model_key, "meta": self.meta}
        path = Path(path)
        with open(path, "wb") as f:
            np.savez(f, __header__=np.array(json.dumps(header)), **{n: host.features[n] for n in FEATURE_NAMES})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Embedding":
        """Read an embedding written by save(); raises InvalidEmbeddingError if the file is not one."""
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["__header__"]))
                feats = {name: np.ascontiguousarray(data[name]) for name in FEATURE_NAMES}
        except FileNotFoundError:
            raise InvalidEmbeddingError(f"embedding file {path} does not exist") from None
        except Exception as exc:
            raise InvalidEmbeddingError(f"{path} is not a sam2rt embedding file ({exc}); write one with Embedding.save") from exc
        h, w = header["original_size"]
        return cls(feats, (int(h), int(w)), str(header["model_key"]), "cpu", header.get("meta", {}))
