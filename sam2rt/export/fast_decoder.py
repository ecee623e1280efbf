"""The fast mask-free decoder: the same function as PromptDecoderNoMaskGraph with half the work per prompt.

SAM 2's two-way transformer projects all 4096 image tokens (256 channels) to 128-dim queries, keys
and values in every cross-attention, once per prompt. Two exact rewrites remove most of that:

1. **Per image, not per prompt.** Without a mask prompt the first layer's image tokens are
   `image_embed + no_mask_embed` for every prompt, so its token->image keys and values and its
   image->token queries are computed once per image by `DecoderPrepGraph` (as are the high-res
   features, rearranged to the channels-last layout the upscaling below uses, with the transposed
   convolutions' biases folded in).
2. **Project the few tokens, not the many image tokens.** A prompt has T = 6 + points tokens
   (T <= 16 for up to 10 points) and 8 heads of 16 dims. `q_h . (W_k,h x + b_k,h)` equals
   `(W_k,h^T q_h) . x` plus a term that is constant along the softmax axis (so it drops out), and
   `softmax(S) (x W_v,h^T + b_v,h)` equals `(softmax(S) x) W_v,h^T + b_v,h`; likewise for the
   image->token queries and output projection. The image side then costs 8*T x 256 per token
   instead of 128 x 256 per projection: with T <= 16 never more, with one point or a box half.

The upscaling runs channels-last as plain matrix products (a 2x2 stride-2 transposed convolution is
a per-pixel 256 -> 4*64 product), so no per-prompt transposes of the 64x64x256 map remain.
Token-side layers (self-attention, MLPs, IoU and hypernetwork heads) are the official modules.
The results equal the reference to float32 rounding (checked at export, and by tests/test_parity.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.embedding import FAST_MAX_POINTS, FEATURE_NAMES, PREPARED_NAMES

PREP_INPUTS = list(FEATURE_NAMES)
PREP_OUTPUTS = list(PREPARED_NAMES)
FAST_INPUTS = PREP_OUTPUTS + ["point_coords", "point_labels"]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads*d) -> (B, heads, T, d)."""
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).transpose(1, 2)


class DecoderPrepGraph(nn.Module):
    """Per-image tensors of the fast decoder, from the encoder's three features.

    Outputs: prep_keys0 (1,4096,256) = image tokens + no_mask_embed; prep_t2i_k0 (1,8,16,4096) and
    prep_t2i_v0 (1,8,4096,16), the first layer's token->image keys (transposed) and values;
    prep_i2t_q0 (1,8,4096,16), its image->token queries; prep_feat_s1 (1,4096,4,64) and prep_feat_s0
    (1,4096,16,32), the high-res features (+ transposed-convolution biases) channels-last in the
    upscaling's pixel order.
    """

    def __init__(self, sam_model: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam_model.sam_prompt_encoder
        self.layer0 = sam_model.sam_mask_decoder.transformer.layers[0]
        dc1, _, _, dc2, _ = sam_model.sam_mask_decoder.output_upscaling
        self.dc1_bias, self.dc2_bias = dc1.bias, dc2.bias

    def forward(
        self, image_embed: torch.Tensor, high_res_feats_0: torch.Tensor, high_res_feats_1: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        pe_mod = self.prompt_encoder
        c, h, w = image_embed.shape[1:]
        keys0 = (image_embed + pe_mod.no_mask_embed.weight.reshape(1, -1, 1, 1)).flatten(2).transpose(1, 2)
        key_pe = pe_mod.get_dense_pe().flatten(2).transpose(1, 2)
        t2i, i2t = self.layer0.cross_attn_token_to_image, self.layer0.cross_attn_image_to_token
        k0 = _heads(t2i.k_proj(keys0 + key_pe), t2i.num_heads).transpose(2, 3)
        v0 = _heads(t2i.v_proj(keys0), t2i.num_heads)
        q0 = _heads(i2t.q_proj(keys0 + key_pe), i2t.num_heads)
        # high-res features in the order the upscaling below produces pixels:
        # s1 pixel (2y+a, 2x+b) -> [y*w+x, a*2+b, channel]; s0 pixel (4y+2a+c, 4x+2b+d) -> [y*w+x, (a,b,c,d), channel]
        s1 = high_res_feats_1 + self.dc1_bias.reshape(1, -1, 1, 1)
        c1 = s1.shape[1]
        s1 = s1.reshape(1, c1, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1).reshape(1, h * w, 4, c1)
        s0 = high_res_feats_0 + self.dc2_bias.reshape(1, -1, 1, 1)
        c0 = s0.shape[1]
        s0 = s0.reshape(1, c0, h, 2, 2, w, 2, 2).permute(0, 2, 5, 3, 6, 4, 7, 1).reshape(1, h * w, 16, c0)
        return keys0, k0, v0, q0, s1, s0


class FastDecoderGraph(nn.Module):
    """Mask-free prompt decoder over DecoderPrepGraph's outputs (inputs FAST_INPUTS).

    point_coords (B,N,2) / point_labels (B,N) as PromptDecoderGraph; outputs low_res_masks
    (B,4,256,256) and iou_predictions (B,4), equal to PromptDecoderNoMaskGraph's.
    """

    def __init__(self, sam_model: nn.Module) -> None:
        super().__init__()
        from .graphs import PromptDecoderGraph

        self._points = PromptDecoderGraph(sam_model)  # for its point embedding (shared weights)
        self.prompt_encoder = sam_model.sam_prompt_encoder
        md = sam_model.sam_mask_decoder
        self.md = md
        self.transformer = md.transformer
        self.s = 1 if md.pred_obj_scores else 0
        self.grid = tuple(self.prompt_encoder.image_embedding_size)
        dc1, ln1, _, dc2, _ = md.output_upscaling
        c, c1 = dc1.weight.shape[:2]
        c2 = dc2.weight.shape[1]
        # ConvTranspose2d weights (in, out, 2, 2) -> (in, [a, b, out]) for a channels-last product
        self.register_buffer("w1", dc1.weight.detach().permute(0, 2, 3, 1).reshape(c, 4 * c1).clone())
        self.register_buffer("w2", dc2.weight.detach().permute(0, 2, 3, 1).reshape(c1, 4 * c2).clone())
        self.ln1_weight, self.ln1_bias, self.ln1_eps = ln1.weight, ln1.bias, float(ln1.eps)
        self.c1, self.c2 = c1, c2

    # --- attention rewrites -------------------------------------------------------------------
    @staticmethod
    def _token_to_image(attn: nn.Module, q_tokens: torch.Tensor, keys: torch.Tensor, keys_pe: torch.Tensor) -> torch.Tensor:
        """attn(q=q_tokens, k=keys_pe, v=keys) with the projections moved to the token side."""
        h = attn.num_heads
        b, t, _ = q_tokens.shape
        d = attn.internal_dim // h
        q = _heads(attn.q_proj(q_tokens), h) * (1.0 / math.sqrt(d))  # (B,h,T,d)
        wk = attn.k_proj.weight.reshape(h, d, -1)  # (h,d,C)
        qk = torch.matmul(q, wk).reshape(b, h * t, -1)  # (B,hT,C); k_proj's bias only shifts each row
        weights = torch.softmax(torch.matmul(qk, keys_pe.transpose(1, 2)), dim=-1)  # (B,hT,N)
        ax = torch.matmul(weights, keys).reshape(b, h, t, -1)  # (B,h,T,C)
        wv = attn.v_proj.weight.reshape(h, d, -1).transpose(1, 2)  # (h,C,d)
        out = torch.matmul(ax, wv) + attn.v_proj.bias.reshape(1, h, 1, d)  # rows of softmax sum to 1
        return attn.out_proj(out.transpose(1, 2).reshape(b, t, h * d))

    @staticmethod
    def _image_output(attn: nn.Module, weights: torch.Tensor, v_tokens: torch.Tensor) -> torch.Tensor:
        """out_proj(heads(softmax) @ v) as one product: weights (B,N,h,T), v_tokens (B,T,internal) -> (B,N,C)."""
        h = attn.num_heads
        b, n, _, t = weights.shape
        d = attn.internal_dim // h
        wo = attn.out_proj.weight.transpose(0, 1).reshape(h, d, -1)  # (h,d,C)
        u = torch.matmul(_heads(v_tokens, h), wo).reshape(b, h * t, -1)  # (B,hT,C)
        return torch.matmul(weights.reshape(b, n, h * t), u) + attn.out_proj.bias

    def _image_to_token(self, attn: nn.Module, keys_pe: torch.Tensor, q_tokens: torch.Tensor, v_tokens: torch.Tensor) -> torch.Tensor:
        """attn(q=keys_pe, k=q_tokens, v=v_tokens) with the image-side projections moved to the tokens."""
        h = attn.num_heads
        b, t, _ = q_tokens.shape
        d = attn.internal_dim // h
        k = _heads(attn.k_proj(q_tokens), h) * (1.0 / math.sqrt(d))  # (B,h,T,d)
        wq = attn.q_proj.weight.reshape(h, d, -1)  # (h,d,C)
        g = torch.matmul(k, wq).reshape(b, h * t, -1)  # (B,hT,C)
        shift = torch.matmul(k, attn.q_proj.bias.reshape(h, d, 1)).reshape(b, 1, h * t)  # q_proj's bias
        scores = torch.matmul(keys_pe, g.transpose(1, 2)) + shift  # (B,N,hT)
        weights = torch.softmax(scores.reshape(b, -1, h, t), dim=-1)
        return self._image_output(attn, weights, attn.v_proj(v_tokens))

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self,
        prep_keys0: torch.Tensor,
        prep_t2i_k0: torch.Tensor,
        prep_t2i_v0: torch.Tensor,
        prep_i2t_q0: torch.Tensor,
        prep_feat_s1: torch.Tensor,
        prep_feat_s0: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        md, tr = self.md, self.transformer
        sparse = self._points._embed_points(point_coords, point_labels)
        b = sparse.shape[0]
        out_tokens = [md.obj_score_token.weight] if md.pred_obj_scores else []
        out_tokens = torch.cat(out_tokens + [md.iou_token.weight, md.mask_tokens.weight], dim=0)
        point_emb = torch.cat((out_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)  # (B,T,C)
        t = point_emb.shape[1]
        key_pe = self.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)  # (1,N,C), a constant

        # layer 0: the image side of both cross-attentions comes precomputed from DecoderPrepGraph
        l0 = tr.layers[0]
        queries = l0.norm1(l0.self_attn(q=point_emb, k=point_emb, v=point_emb))
        a = l0.cross_attn_token_to_image
        h, d = a.num_heads, a.internal_dim // a.num_heads
        q = _heads(a.q_proj(queries + point_emb), h) * (1.0 / math.sqrt(d))
        o = torch.matmul(torch.softmax(torch.matmul(q, prep_t2i_k0), dim=-1), prep_t2i_v0)  # (B,h,T,d)
        queries = l0.norm2(queries + a.out_proj(o.transpose(1, 2).reshape(b, t, h * d)))
        queries = l0.norm3(queries + l0.mlp(queries))
        a = l0.cross_attn_image_to_token
        k = _heads(a.k_proj(queries + point_emb), h) * (1.0 / math.sqrt(d))  # (B,h,T,d)
        weights = torch.softmax(torch.matmul(prep_i2t_q0, k.transpose(2, 3)), dim=-1).transpose(1, 2)  # (B,N,h,T)
        keys = l0.norm4(prep_keys0 + self._image_output(a, weights, a.v_proj(queries)))

        for layer in tr.layers[1:]:
            queries = layer.norm1(queries + layer.self_attn(q=queries + point_emb, k=queries + point_emb, v=queries))
            keys_pe = keys + key_pe
            queries = layer.norm2(
                queries + self._token_to_image(layer.cross_attn_token_to_image, queries + point_emb, keys, keys_pe)
            )
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = layer.norm4(
                keys + self._image_to_token(layer.cross_attn_image_to_token, keys_pe, queries + point_emb, queries)
            )
        queries = tr.norm_final_attn(
            queries + self._token_to_image(tr.final_attn_token_to_image, queries + point_emb, keys, keys + key_pe)
        )

        # upscaling, channels-last: (B,N,C) -> (B,N,4,c1) -> (B,N,16,c2)
        up = torch.matmul(keys, self.w1).reshape(b, -1, 4, self.c1) + prep_feat_s1
        up = F.gelu(F.layer_norm(up, (self.c1,), self.ln1_weight, self.ln1_bias, self.ln1_eps))
        up = torch.matmul(up, self.w2).reshape(b, -1, 16, self.c2) + prep_feat_s0
        up = F.gelu(up).reshape(b, -1, self.c2)  # (B, N*16, c2)

        s = self.s
        mask_tokens = queries[:, s + 1 : s + 1 + md.num_mask_tokens, :]
        hyper = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], dim=1)
        masks = torch.matmul(up, hyper.transpose(1, 2))  # (B, N*16, 4), pixels in (y, x, a, b, c, d) order
        gh, gw = self.grid
        m = hyper.shape[1]
        masks = masks.reshape(b, gh, gw, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, m, 4 * gh, 4 * gw)
        iou = md.iou_prediction_head(queries[:, s, :])
        return masks, iou
