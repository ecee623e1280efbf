"""The two torch modules sam2rt exports: the image encoder and the prompt encoder + mask decoder.

They wrap an official `sam2.modeling.sam2_base.SAM2Base` and compute exactly what
`SAM2ImagePredictor.set_image` and `SAM2ImagePredictor._predict` compute, minus the
choice among output tokens, which the runtime makes (it needs all four tokens' logits).
"""

from __future__ import annotations

import torch
from torch import nn

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


class ImageEncoderGraph(nn.Module):
    """Normalised 1x3x1024x1024 image -> (image_embed + no_mem_embed, high_res_feats_0, high_res_feats_1)."""

    def __init__(self, sam_model: nn.Module) -> None:
        super().__init__()
        self.model = sam_model
        size = sam_model.image_size
        self.feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        sparse = self._embed_points(point_coords, point_labels)
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        dense = has_mask * pe.mask_downscaling(mask_input) + (1.0 - has_mask) * pe.no_mask_embed.weight.reshape(
            1, -1, 1, 1
        )
        masks, iou_pred, _, _ = self.mask_decoder.predict_masks(
            image_embeddings=image_embed,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            repeat_image=True,
            high_res_features=[high_res_feats_0, high_res_feats_1],
        )
        return masks, iou_pred
