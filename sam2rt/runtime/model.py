"""Sam2Model: the low-level runtime API, `embed(image)` once and `decode(embedding, prompts)` many times."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InvalidEmbeddingError, InvalidPromptError
from ..manifest import Manifest
from ..model_specs import LOW_RES_SIZE
from .backends import Backend, MaskRequest, TokenChoice, create_backend
from .embedding import Embedding
from .preprocess import check_image
from .prompts import CheckedPrompt, Prompt, check_prompt_batch

log = logging.getLogger("sam2rt")


_NO_MASK = np.zeros((1, 1, LOW_RES_SIZE, LOW_RES_SIZE), np.float32)  # mask_input of prompts without a mask
_NO_MASK.setflags(write=False)


@dataclass
class Masks:
    """Decoded masks for B prompts with C masks each (C = 3 with multimask_output, else 1).

    masks: (B,C,H,W) bool at the original image size (float32 logits if return_logits);
    scores: (B,C) predicted IoU; low_res_logits: (B,C,256,256) clamped to [-32, 32].
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray

    def best(self) -> "Masks":
        """Keep, for each prompt, the mask with the highest predicted IoU (C becomes 1)."""
        idx = np.argmax(self.scores, axis=1)
        rows = np.arange(len(idx))
        return Masks(self.masks[rows, idx][:, None], self.scores[rows, idx][:, None], self.low_res_logits[rows, idx][:, None])


class Sam2Model:
    """An exported SAM 2 model directory loaded on one backend."""

    def __init__(self, manifest: Manifest, backend: Backend) -> None:
        self.manifest = manifest
        self.backend = backend
        self.model_key = backend.encoder_key
        cfg = manifest.decoder_config
        self.token_choice = TokenChoice(
            dynamic_via_stability=bool(cfg.get("dynamic_multimask_via_stability", True)),
            stability_delta=float(cfg.get("dynamic_multimask_stability_delta", 0.05)),
            stability_thresh=float(cfg.get("dynamic_multimask_stability_thresh", 0.98)),
        )
        self.mask_threshold = manifest.mask_threshold
        self.image_size = manifest.image_size

    @classmethod
    def from_dir(cls, model_dir: str | Path, backend: str = "auto", threads: int | None = None, verify: bool = True) -> "Sam2Model":
        """Load DIR (from `sam2rt export`), checking each graph's sha256 against the manifest."""
        manifest = Manifest.load(model_dir)
        if verify:
            manifest.verify_stored_graphs()
        if manifest.random_weights:
            log.warning("%s holds %s", model_dir, manifest.describe_weights())
        return cls(manifest, create_backend(manifest, backend, threads))

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def close(self) -> None:
        """Free the backend's sessions, threads and device memory (also on leaving a `with` block)."""
        self.backend.close()

    def __enter__(self) -> "Sam2Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- embed --------------------------------------------------------------------------
    def embed(self, image: Any, color_order: str = "RGB") -> Embedding:
        """Run the image encoder once on an HxWx3 uint8 image (RGB unless color_order="BGR")."""
        rgb = check_image(image, color_order)
        t0 = time.perf_counter()
        x = self.backend.preprocess(rgb, self.image_size)
        t1 = time.perf_counter()
        feats = self.backend.encode(x)
        t2 = time.perf_counter()
        prepared = self.backend.prepare(feats)
        t3 = time.perf_counter()
        return Embedding(
            feats,
            (int(rgb.shape[0]), int(rgb.shape[1])),
            self.model_key,
            self.backend.device,
            {"preprocess_s": t1 - t0, "encoder_s": t2 - t1, "prepare_s": t3 - t2},
            prepared,
        )

    # --- decode -------------------------------------------------------------------------
    def _check_embedding(self, embedding: Embedding) -> None:
        if not isinstance(embedding, Embedding):
            raise InvalidEmbeddingError(f"expected an Embedding from embed(), got {type(embedding).__name__}")
        if embedding.model_key != self.model_key:
            raise InvalidEmbeddingError(
                "this embedding was made by another model's encoder; embed the image again with this model"
            )

    def _inputs(
        self, embedding: Embedding, point_coords: np.ndarray, point_labels: np.ndarray, mask_input: np.ndarray | None
    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The backend's decoder inputs for an assembled batch: features (+ prepared tensors), prompts, mask."""
        self._check_embedding(embedding)
        b = point_coords.shape[0]
        features = embedding.features
        if mask_input is None:
            prepared = embedding.prepared
            if not prepared:
                prepared = self.backend.prepare(features)
                if embedding.device == self.backend.device:
                    embedding.prepared = prepared  # e.g. an Embedding.load()ed file: once
                # else (a host embedding on a GPU backend) for this decode only: kept, it would hold device memory
                # in a host object. Prepared all the same, so that the embedding decodes with the same decoder
                # (and the same masks) wherever it lives.
            if prepared:
                features = {**features, **prepared}
            # a read-only view, not 256 KiB of zeros per prompt (the decoders of plain prompts never read it; a
            # backend that feeds it to a graph makes it contiguous: Backend.decode's contract)
            mask = np.broadcast_to(_NO_MASK, (b, 1, LOW_RES_SIZE, LOW_RES_SIZE))
            has_mask = np.zeros((b,), np.float32)
        else:
            if mask_input.shape[0] not in (1, b):
                raise InvalidPromptError(f"mask_input has {mask_input.shape[0]} masks for {b} prompts; give one per prompt")
            mask = np.ascontiguousarray(np.broadcast_to(mask_input, (b, 1, LOW_RES_SIZE, LOW_RES_SIZE)), dtype=np.float32)
            has_mask = np.ones((b,), np.float32)
        return (features, np.ascontiguousarray(point_coords, dtype=np.float32),
                np.ascontiguousarray(point_labels, dtype=np.float32), mask, has_mask)

    def mask_request(
        self, orig_hw: tuple[int, int], multimask_output: bool, return_logits: bool = False,
        threshold: float | None = None, float_masks: bool = False,
    ) -> MaskRequest:
        """What postprocessing makes: masks above `threshold` (default the manifest's), or logits with return_logits."""
        thr = None if return_logits else (self.mask_threshold if threshold is None else float(threshold))
        return MaskRequest(bool(multimask_output), (int(orig_hw[0]), int(orig_hw[1])), thr, float_masks, self.token_choice)

    def decode_raw(
        self, embedding: Embedding, point_coords: np.ndarray, point_labels: np.ndarray, mask_input: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One decoder run over an already assembled batch in the 1024 input frame.

        point_coords (B,N,2), point_labels (B,N) (padding included), mask_input (B,1,256,256)
        or None. Returns all four tokens on the host: low-res logits (B,4,256,256) and IoU (B,4).
        """
        return self.backend.decode(*self._inputs(embedding, point_coords, point_labels, mask_input))

    def decode_batch(
        self, embedding: Embedding, point_coords: np.ndarray, point_labels: np.ndarray, mask_input: np.ndarray | None,
        request: MaskRequest,
    ) -> Masks:
        """decode_raw + finish in one backend call: on a device backend the logits never leave the device."""
        out = self.backend.decode_masks(*self._inputs(embedding, point_coords, point_labels, mask_input), request)
        return Masks(out.masks, out.scores, out.low_res_logits)

    def finish(
        self,
        low_res: np.ndarray,
        iou: np.ndarray,
        orig_hw: tuple[int, int],
        multimask_output: bool,
        return_logits: bool = False,
        threshold: float | None = None,
        float_masks: bool = False,
    ) -> Masks:
        """Select tokens, upsample to the original size and threshold, as the reference predictor.

        Masks are bool (float32 0/1 with `float_masks`) above `threshold` (default the manifest's), or
        the upsampled float32 logits with `return_logits`.
        """
        out = self.backend.postprocess(low_res, iou, self.mask_request(orig_hw, multimask_output, return_logits,
                                                                       threshold, float_masks))
        return Masks(out.masks, out.scores, out.low_res_logits)

    def decode(
        self,
        embedding: Embedding,
        prompts: Prompt | Sequence[Prompt],
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Masks:
        """Decode one or many prompts (original-image pixel coordinates) against one embedding.

        Prompts are batched into as few decoder runs as possible; each prompt's result equals
        decoding it alone (prompts with different token counts run in separate batches, so no
        extra padding ever changes a result). Results come back in prompt order.
        """
        self._check_embedding(embedding)
        checked = self.check_prompts(prompts, embedding.original_size)
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for i, prompt in enumerate(checked):
            groups[(prompt.coords.shape[1], prompt.mask is not None)].append(i)
        request = self.mask_request(embedding.original_size, multimask_output, return_logits)
        parts = []
        for (_, has_mask), idx in groups.items():
            xy = np.concatenate([checked[i].coords for i in idx])
            lab = np.concatenate([checked[i].labels for i in idx])
            mask = np.concatenate([checked[i].mask for i in idx]) if has_mask else None
            parts.append((idx, self.decode_batch(embedding, xy, lab, mask, request)))
        _, first = parts[0]
        if len(parts) == 1:
            return first
        n = len(checked)
        out = Masks(*(np.empty((n, *a.shape[1:]), a.dtype) for a in (first.masks, first.scores, first.low_res_logits)))
        for idx, part in parts:
            out.masks[idx], out.scores[idx], out.low_res_logits[idx] = part.masks, part.scores, part.low_res_logits
        return out

    @staticmethod
    def check_prompts(prompts: Prompt | Sequence[Prompt], image_size: tuple[int, int]) -> list[CheckedPrompt]:
        """Validate prompts against an image of image_size (H, W) without running anything.

        Raises InvalidPromptError for the first bad prompt (e.g. a point outside the image). `decode`
        calls it; call it yourself before `embed` to reject bad prompts without the encoder's cost.
        """
        if isinstance(prompts, Prompt):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise InvalidPromptError("decode() needs at least one Prompt")
        # many prompts of one form, all valid: checked as one batch (a single prompt gains nothing from it)
        batch = check_prompt_batch(prompts, image_size) if len(prompts) > 1 else None
        return batch if batch is not None else [p.checked(image_size) for p in prompts]
