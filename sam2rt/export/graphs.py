"""The two torch modules sam2rt exports: the image encoder and the prompt encoder + mask decoder.

They wrap an official `sam2.modeling.sam2_base.SAM2Base` and compute exactly what
`SAM2ImagePredictor.set_image` and `SAM2ImagePredictor._predict` compute, minus the
choice among output tokens, which the runtime makes (it needs all four tokens' logits).
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .encoder_fusion import MHA_DOMAIN, FoldedNeck, device_encoder_attention, fused_encoder_attention

__all__ = ["MHA_DOMAIN", "device_encoder_attention", "fused_encoder_attention"]  # re-exported for onnx_export

ENCODER_INPUTS = ["image"]
ENCODER_OUTPUTS = ["image_embed", "high_res_feats_0", "high_res_feats_1"]
DECODER_INPUTS = [
    "image_embed",
    "high_res_feats_0",
    "high_res_feats_1",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
]
DECODER_OUTPUTS = ["low_res_masks", "iou_predictions"]
# The mask-free decoder variant (no mask_input): what most prompts need, without running the
# mask-downscaling convolutions whose result `has_mask_input = 0` throws away.
DECODER_NOMASK_INPUTS = DECODER_INPUTS[:5]


# Hiera's global-attention blocks attend over 64x64 = 4096 tokens: traced as plain MatMul + Softmax,
# one block materialises a (1, heads, 4096, 4096) float32 score matrix (256 MiB) plus its softmax.
# Splitting the queries into chunks computes exactly the same rows (softmax is per query row) and
# bounds that to (1, heads, CHUNK, 4096), which lowers the exported encoder's peak memory.
ATTENTION_QUERY_CHUNK = 1024


def _chunked_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    n = query.shape[-2]
    if args or kwargs or n <= ATTENTION_QUERY_CHUNK:
        return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)
    parts = [
        F.scaled_dot_product_attention(query[..., i : i + ATTENTION_QUERY_CHUNK, :], key, value)
        for i in range(0, n, ATTENTION_QUERY_CHUNK)
    ]
    return torch.cat(parts, dim=-2)


@contextlib.contextmanager
def chunked_encoder_attention() -> Iterator[None]:
    """While active, the Hiera trunk's attention runs query-chunked (same results, bounded memory)."""
    from sam2.modeling.backbones import hieradet

    original = hieradet.F
    shim = types.ModuleType("sam2rt_chunked_functional")
    shim.__dict__.update({k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    shim.scaled_dot_product_attention = _chunked_sdpa
    hieradet.F = shim
    try:
        yield
    finally:
        hieradet.F = original


class ImageEncoderGraph(nn.Module):
    """Normalised 1x3x1024x1024 image -> (image_embed + no_mem_embed, high_res_feats_0, high_res_feats_1).

    fold=True (what is exported): the neck and decoder convolutions folded by `FoldedNeck` where the
    model allows it; the same function up to float rounding (the export verifies it against fold=False).
    """

    def __init__(self, sam_model: nn.Module, fold: bool = False) -> None:
        super().__init__()
        self.model = sam_model
        size = sam_model.image_size
        self.feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
        self.folded = FoldedNeck(sam_model) if fold and FoldedNeck.supported(sam_model) else None

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.folded is not None:
            return self.folded(self.model.image_encoder.trunk(image))
        backbone_out = self.model.forward_image(image)
        _, vision_feats, _, _ = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        feats = [
            feat.permute(1, 2, 0).reshape(1, -1, h, w)
            for feat, (h, w) in zip(vision_feats, self.feat_sizes)
        ]
        return feats[2], feats[0], feats[1]


class PromptDecoderGraph(nn.Module):
    """Prompt encoder + mask decoder for a batch of B prompts of N points each.

    Inputs: the three encoder features (batch 1), `point_coords` (B,N,2) in the 1024x1024
    input frame, `point_labels` (B,N) float (1 pos, 0 neg, 2/3 box corners, -1 padding),
    `mask_input` (B,1,256,256) and `has_mask_input` (B,). Outputs: `low_res_masks`
    (B,4,256,256), the single-mask token first then the three multimask tokens, and
    `iou_predictions` (B,4).
    """

    def __init__(self, sam_model: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam_model.sam_prompt_encoder
        self.mask_decoder = sam_model.sam_mask_decoder
        self.image_size = float(sam_model.image_size)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        coords = (coords + 0.5) / self.image_size  # pixel centre, then [0, 1] as forward_with_coords
        emb = pe.pe_layer._pe_encoding(coords)
        labels = labels.unsqueeze(-1)
        emb = torch.where(labels == -1, torch.zeros_like(emb) + pe.not_a_point_embed.weight, emb)
        for i in range(pe.num_point_embeddings):
            emb = torch.where(labels == i, emb + pe.point_embeddings[i].weight, emb)
        return emb

    def forward(
        self,
        image_embed: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self.prompt_encoder
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        dense = has_mask * pe.mask_downscaling(mask_input) + (1.0 - has_mask) * pe.no_mask_embed.weight.reshape(
            1, -1, 1, 1
        )
        return self._decode(image_embed, high_res_feats_0, high_res_feats_1, point_coords, point_labels, dense)

    def _decode(self, image_embed, high_res_feats_0, high_res_feats_1, point_coords, point_labels, dense):
        pe = self.prompt_encoder
        sparse = self._embed_points(point_coords, point_labels)
        masks, iou_pred, _, _ = self.mask_decoder.predict_masks(
            image_embeddings=image_embed,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            repeat_image=True,
            high_res_features=[high_res_feats_0, high_res_feats_1],
        )
        return masks, iou_pred


class PromptDecoderNoMaskGraph(PromptDecoderGraph):
    """PromptDecoderGraph for prompts without mask_input (inputs DECODER_NOMASK_INPUTS).

    The dense prompt is the `no_mask_embed`, exactly what PromptDecoderGraph computes when
    has_mask_input is 0 (and what the reference's prompt encoder does with masks=None), so the
    outputs are the same; it skips the mask-downscaling convolutions over a mask nobody uses.
    """

    def forward(  # type: ignore[override]
        self,
        image_embed: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return self._decode(image_embed, high_res_feats_0, high_res_feats_1, point_coords, point_labels, dense)
