"""The fast mask-free decoder for GPU providers: FastDecoderGraph's function for a batch of prompts in one run.

On the CPU the fast decoder runs one prompt per run (fast_decoder.py, point 6). On a GPU a run costs its
kernel launches whatever its size, so B prompts belong in one run; and the mask-free decoder that served
batches there (decoder_nomask) repeats the image tokens per prompt, projects all of them in every
cross-attention and upscales through two transposed convolutions and an NCHW LayerNorm2d. This graph keeps
the fast decoder's arithmetic (the image-side projections moved to the few tokens, the per-image work in
decoder_prep, the upscaling as products channels-last with one fused LayerNorm) and adds a batch axis:

- Every MatMul is one ONNX Runtime's CUDA provider computes correctly and a CUDA graph can replay
  (export/cuda_matmul.py): a right operand that is a matrix (one GEMM), or equal batch shapes on both sides
  (strided-batched). A product of per-prompt tensors with per-head weights, (B,h,T,k) @ (h,k,l), would be a
  broadcast; it runs as (h, B*T, k) @ (h,k,l) instead (`_per_head`), a transpose of a few KB each way.
- Layer 0's image->token scores of all prompts come from one GEMM against block-diagonal keys whose columns
  are (prompt, head, token); its token->image attention reads the prepared keys and values of all heads with
  the prompts' tokens stacked, (h, B*T, d) @ (h, d, N).
- From there the image tokens are per prompt, (B, 4096, 256): each attention is a strided-batched product.

Inputs are FAST_INPUTS with point_coords (B,N,2) / point_labels (B,N), B and N dynamic; outputs low_res_masks
(B,4,256,256) and iou_predictions (B,4), equal to decoder_nomask's on the same prompts (checked at export with
whole batches, and by the device backend at load on its provider).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fast_decoder import FastDecoderGraph


def _per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B,h,T,k) @ w (h,k,l) -> (B,h,T,l), as one strided-batched product over the heads (no broadcast batch)."""
    b, h = x.shape[0], w.shape[0]
    y = torch.matmul(x.transpose(0, 1).reshape(h, -1, x.shape[-1]), w)  # (h, B*T, l)
    return y.reshape(h, b, -1, w.shape[-1]).transpose(0, 1)


class DeviceFastDecoderGraph(FastDecoderGraph):
    """FastDecoderGraph's function for B prompts of N points each in one run (see the module docstring)."""

    def __init__(self, sam_model: nn.Module) -> None:
        super().__init__(sam_model)
        c, c1, c2 = self.dim, self.c1, self.c2
        # the transposed convolutions' weights stacked: columns (kernel row, kernel column, channel), one GEMM each
        self.register_buffer("w1_stacked", self.w1.permute(1, 0, 2).reshape(c, 4 * c1).clone())
        self.register_buffer("w2_stacked", self.w2.permute(1, 0, 2).reshape(c1, 4 * c2).clone())

    # --- FastDecoderGraph's helpers with a batch axis --------------------------------------------
    @staticmethod
    def _split(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B,T,internal) -> (B,heads,T,d)."""
        h = attn.num_heads
        return x.reshape(x.shape[0], -1, h, attn.internal_dim // h).transpose(1, 2)

    @staticmethod
    def _merge(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B,heads,T,d) -> out_proj of (B,T,internal)."""
        return attn.out_proj(x.transpose(1, 2).reshape(x.shape[0], -1, attn.internal_dim))

    def _token_to_image(
        self, attn: nn.Module, q_tokens: torch.Tensor, keys: torch.Tensor, keys_pe: torch.Tensor,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """attn(q=q_tokens, k=keys_pe, v=keys - shift) per prompt: q_tokens (B,T,C); keys, keys_pe (B,N,C) -> (B,T,C)."""
        h, c, b = attn.num_heads, self.dim, q_tokens.shape[0]
        d = attn.internal_dim // h
        q = self._scaled_heads(attn, attn.q_proj(q_tokens))  # (B,h,T,d)
        qk = _per_head(q, attn.k_proj.weight.reshape(h, d, c)).reshape(b, -1, c)  # (B,hT,C); k_proj's bias drops out
        weights = torch.softmax(torch.matmul(qk, keys_pe.transpose(1, 2)), dim=-1)  # (B,hT,N)
        ax = torch.matmul(weights, keys).reshape(b, h, -1, c)  # (B,h,T,C)
        if shift is not None:
            ax = ax - shift
        wv = attn.v_proj.weight.reshape(h, d, c).transpose(1, 2)  # (h,C,d)
        return self._merge(attn, _per_head(ax, wv) + attn.v_proj.bias.reshape(1, h, 1, d))

    def _image_output(self, attn: nn.Module, weights: torch.Tensor, v_tokens: torch.Tensor) -> torch.Tensor:
        """out_proj(heads(softmax) @ v) less out_proj's bias: weights (B,N,h*T), v_tokens (B,T,internal) -> (B,N,C)."""
        h, c = attn.num_heads, self.dim
        wo = attn.out_proj.weight.transpose(0, 1).reshape(h, attn.internal_dim // h, c)  # (h,d,C)
        u = _per_head(self._split(attn, v_tokens), wo).reshape(v_tokens.shape[0], -1, c)  # (B,hT,C)
        return torch.matmul(weights, u)

    def _image_to_token(self, attn: nn.Module, keys_pe: torch.Tensor, q_tokens: torch.Tensor, v_tokens: torch.Tensor) -> torch.Tensor:
        """attn(q=keys_pe, k=q_tokens, v=v_tokens) less out_proj's bias, per prompt: keys_pe (B,N,C) -> (B,N,C)."""
        h, c, b = attn.num_heads, self.dim, q_tokens.shape[0]
        d = attn.internal_dim // h
        k = self._scaled_heads(attn, attn.k_proj(q_tokens))  # (B,h,T,d)
        g = _per_head(k, attn.q_proj.weight.reshape(h, d, c)).reshape(b, -1, c)  # (B,hT,C)
        shift = _per_head(k, attn.q_proj.bias.reshape(h, d, 1)).reshape(b, 1, -1)  # q_proj's bias, (B,1,hT)
        scores = torch.matmul(keys_pe, g.transpose(1, 2)) + shift  # (B,N,hT)
        weights = torch.softmax(scores.reshape(b, self.n, h, -1), dim=-1).reshape(b, self.n, -1)
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
        md, tr, n = self.md, self.transformer, self.n
        b = point_coords.shape[0]
        sparse = self._points._embed_points(point_coords, point_labels)  # (B,N,C)
        point_emb = torch.cat((self._output_tokens().unsqueeze(0).expand(b, -1, -1), sparse), dim=1)  # (B,T,C)
        key_pe = self._key_pe()
        carries = self._carries()  # image tokens held as `keys + carry`, as in FastDecoderGraph.forward

        # layer 0: the image side of both cross-attentions comes precomputed from DecoderPrepGraph
        l0 = tr.layers[0]
        queries = l0.norm1(self._self_attention(l0.self_attn, point_emb, point_emb))
        a = l0.cross_attn_token_to_image
        h, d = a.num_heads, a.internal_dim // a.num_heads
        q = self._scaled_heads(a, a.q_proj(queries + point_emb))  # (B,h,T,d)
        q = q.transpose(0, 1).reshape(h, -1, d)  # every prompt's tokens against the shared keys: (h, B*T, d)
        o = torch.matmul(torch.softmax(torch.matmul(q, prep_t2i_k0[0]), dim=-1), prep_t2i_v0[0])  # (h,B*T,d)
        queries = l0.norm2(queries + self._merge(a, o.reshape(h, b, -1, d).transpose(0, 1)))
        queries = l0.norm3(queries + l0.mlp(queries))
        a = l0.cross_attn_image_to_token
        k = self._scaled_heads(a, a.k_proj(queries + point_emb))  # (B,h,T,d)
        # block-diagonal keys (h*d, B*h*T), columns (prompt, head, token): one GEMM gives every prompt's scores
        eye = torch.eye(h, dtype=k.dtype).reshape(h, 1, 1, h, 1)
        kbd = (k.permute(3, 0, 1, 2).unsqueeze(0) * eye).reshape(h * d, -1)
        weights = torch.softmax(torch.matmul(prep_i2t_q0, kbd).reshape(n, b, h, -1), dim=-1)  # (N,B,h,T)
        weights = weights.reshape(n, b, -1).transpose(0, 1)  # (B,N,hT)
        keys = self._image_norm(l0, prep_keys0 + self._image_output(a, weights, a.v_proj(queries)), carries[0])  # (B,N,C)
        queries, keys = self._later_layers(queries, keys, point_emb, key_pe, carries)
        used = self._final_attention(queries, point_emb, keys, key_pe)
        m = md.num_mask_tokens

        # upscaling channels-last, each transposed convolution one GEMM against its stacked weights; pixel
        # (4y+2a+c, 4x+2b+d) of a prompt's mask is element [a, c, y*4w + x*4 + b*2 + d] of its block
        c1, c2 = self.c1, self.c2
        gh, gw = self.grid
        hyper = torch.stack([mlp(used[:, 1 + i]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], dim=1)  # (B,m,c2)
        up = torch.matmul(keys, self.w1_stacked).reshape(b, n, 2, 2 * c1).transpose(1, 2).reshape(b, 2, 2 * n, c1)
        up = F.gelu(F.layer_norm(up + prep_feat_s1, (c1,), self.ln1_weight, self.ln1_bias, self.ln1_eps))
        up = torch.matmul(up, self.w2_stacked).reshape(b, 2, 2 * n, 2, 2 * c2).transpose(2, 3).reshape(b, 2, 2, 4 * n, c2)
        up = F.gelu(up + prep_feat_s0)
        masks = torch.matmul(up.reshape(b, 16 * n, c2), hyper.transpose(1, 2))  # (B, (a,c,y,x,b,d), m)
        masks = masks.reshape(b, 2, 2, gh, 4 * gw, m).permute(0, 5, 3, 1, 2, 4).reshape(b, m, 4 * gh, 4 * gw)
        iou = md.iou_prediction_head(used[:, 0, :])
        return masks, iou
