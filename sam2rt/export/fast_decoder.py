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

Per prompt, the image side is then nothing but large products and the unavoidable per-token passes:

3. **Biases folded into constants.** Each image->token output-projection bias is added to the image
   tokens once: layer 0's in `prep_keys0`, the next layer's in the LayerNorm beta that makes the tokens
   (the positional encoding and the token->image values take the constant shift back exactly).
4. **No transposes of image-sized tensors.** Layer 0's image->token scores come from one product with
   block-diagonal token keys (heads stay inner); the final token->image attention runs only for the
   IoU and mask tokens (the others' results are unused); the upscaling runs channels-last as plain
   products, one per kernel row of each transposed convolution, so the masks come out in row-major
   blocks and only the 1 MB result is interleaved.
5. **The CPU's layout.** The upscaling multiplies each kernel row of the first transposed convolution with
   each of the second's in one broadcast MatMul, (2,1,M,K) @ (2,K,N). ONNX Runtime's CUDA MatMul computes that
   broadcast wrongly (export/cuda_matmul.py explains why): GPU providers run `DeviceFastDecoderGraph`
   (fast_decoder_device.py), the same function for a batch of prompts in plain and strided-batched GEMMs.
6. **One prompt per run.** Every shape but the point count is a graph constant, so no shape arithmetic
   runs per prompt; a batch is decoded prompt by prompt (on the CPU, on parallel single-threaded
   sessions; see the ONNX Runtime backend). ONNX Runtime's SkipLayerNormalization and MatMul+Add->Gemm
   fusions, which the static shapes would enable, are slower on the CPU and left out (FAST_DISABLED_OPTIMIZERS).

Token-side layers (self-attention, MLPs, IoU and hypernetwork heads) are the official modules' weights.
The results equal the reference to float32 rounding (checked at export, and by tests/test_parity.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.embedding import FAST_MAX_POINTS, FEATURE_NAMES, PREPARED_NAMES  # noqa: F401 (FAST_MAX_POINTS: re-exported)

# ONNX Runtime fusions left out when decoder_fast is optimised and loaded (recorded in the manifest as
# `ort_disabled_optimizers`): with the graph's static shapes ORT would fuse the image-token residual
# Add + LayerNorm into SkipLayerNormalization and MatMul + full-size Add into Gemm; on the CPU both are
# slower than the ops they replace (measurements: benchmarks/README.md), so the manifest records them
# and the optimiser and the runtime's session leave them out.
FAST_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion", "MatMulAddFusion")

PREP_INPUTS = list(FEATURE_NAMES)
PREP_OUTPUTS = list(PREPARED_NAMES)
FAST_INPUTS = PREP_OUTPUTS + ["point_coords", "point_labels"]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads*d) -> (B, heads, T, d)."""
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).transpose(1, 2)


class DecoderPrepGraph(nn.Module):
    """Per-image tensors of the fast decoder, from the encoder's three features.

    Outputs: prep_keys0 (4096,256) = image tokens + no_mask_embed + the first layer's image->token
    output-projection bias; prep_t2i_k0 (1,8,16,4096) and prep_t2i_v0 (1,8,4096,16), the first layer's
    token->image keys (transposed) and values; prep_i2t_q0 (4096,128), its image->token queries (head
    h in channels 16h..16h+15); prep_feat_s1 (2,8192,64) and prep_feat_s0 (2,2,16384,32), the high-res
    features (+ transposed-convolution biases) channels-last in the upscaling's pixel order.
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
        q0 = i2t.q_proj(keys0 + key_pe)  # (1,N,heads*d): heads stay in the channels (see FastDecoderGraph)
        # high-res features in the order the upscaling below produces pixels: s1 pixel (2y+a, 2x+b) ->
        # [a, (y*w+x)*2+b, channel]; s0 pixel (4y+2a+c, 4x+2b+d) -> [a, c, (y*w+x)*4+b*2+d, channel]
        s1 = high_res_feats_1 + self.dc1_bias.reshape(1, -1, 1, 1)
        c1 = s1.shape[1]
        s1 = s1.reshape(c1, h, 2, w, 2).permute(2, 1, 3, 4, 0).reshape(2, h * w * 2, c1)
        s0 = high_res_feats_0 + self.dc2_bias.reshape(1, -1, 1, 1)
        c0 = s0.shape[1]
        s0 = s0.reshape(c0, h, 2, 2, w, 2, 2).permute(2, 3, 1, 4, 5, 6, 0).reshape(2, 2, h * w * 4, c0)
        # layer 0's image->token output bias, added to the image tokens here once instead of per prompt
        return keys0[0] + i2t.out_proj.bias, k0, v0, q0[0], s1, s0


class FastDecoderGraph(nn.Module):
    """Mask-free prompt decoder over DecoderPrepGraph's outputs (inputs FAST_INPUTS), one prompt per run.

    point_coords (1,N,2) / point_labels (1,N) as PromptDecoderGraph; outputs low_res_masks
    (1,4,256,256) and iou_predictions (1,4), equal to PromptDecoderNoMaskGraph's. Every shape but the
    token count is a constant of the graph (no shape arithmetic at run time); the runtime decodes a
    batch one prompt after another, which on the CPU costs no more per prompt than a batched run.
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
        self.grid = tuple(int(g) for g in self.prompt_encoder.image_embedding_size)
        self.n = self.grid[0] * self.grid[1]
        dc1, ln1, _, dc2, _ = md.output_upscaling
        c, c1 = dc1.weight.shape[:2]
        c2 = dc2.weight.shape[1]
        # ConvTranspose2d weights (in, out, kh, kw) -> (kh, in, [kw, out]): one channels-last product per kernel row
        self.register_buffer("w1", dc1.weight.detach().permute(2, 0, 3, 1).reshape(2, c, 2 * c1).clone())
        self.register_buffer("w2", dc2.weight.detach().permute(2, 0, 3, 1).reshape(2, c1, 2 * c2).clone())
        self.ln1_weight, self.ln1_bias, self.ln1_eps = ln1.weight, ln1.bias, float(ln1.eps)
        self.dim, self.c1, self.c2 = int(c), int(c1), int(c2)

    # --- attention rewrites (shapes from the modules' constants; -1 is the token axis) -----------
    @staticmethod
    def _split(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(1,T,internal) -> (1,heads,T,d)."""
        h = attn.num_heads
        return x.reshape(1, -1, h, attn.internal_dim // h).transpose(1, 2)

    @staticmethod
    def _merge(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(1,heads,T,d) -> out_proj of (1,T,internal)."""
        return attn.out_proj(x.transpose(1, 2).reshape(1, -1, attn.internal_dim))

    def _self_attention(self, attn: nn.Module, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """attn(q=qk, k=qk, v=v) over the tokens, as SAM 2's Attention.forward."""
        q, k = self._split(attn, attn.q_proj(qk)), self._split(attn, attn.k_proj(qk))
        return self._merge(attn, F.scaled_dot_product_attention(q, k, self._split(attn, attn.v_proj(v))))

    def _token_to_image(
        self, attn: nn.Module, q_tokens: torch.Tensor, keys: torch.Tensor, keys_pe: torch.Tensor,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """attn(q=q_tokens, k=keys_pe, v=keys - shift) with the projections moved to the token side.

        q_tokens (1,T,C); keys, keys_pe (N,C) -> (1,T,C). The image tokens stay 2-D: ONNX Runtime would
        fuse a 3-D residual Add + LayerNorm into SkipLayerNormalization, slower on the CPU than the two here
        (see FAST_DISABLED_OPTIMIZERS).
        """
        h, c = attn.num_heads, self.dim
        d = attn.internal_dim // h
        q = self._scaled_heads(attn, attn.q_proj(q_tokens))  # (1,h,T,d)
        wk = attn.k_proj.weight.reshape(h, d, c)
        qk = torch.matmul(q, wk).reshape(1, -1, c)  # (1,hT,C); k_proj's bias only shifts each row
        weights = torch.softmax(torch.matmul(qk, keys_pe.transpose(0, 1)), dim=-1)  # (1,hT,N)
        ax = torch.matmul(weights, keys).reshape(1, h, -1, c)  # (1,h,T,C)
        if shift is not None:
            ax = ax - shift  # rows of softmax sum to 1: the shift of every value comes off once
        wv = attn.v_proj.weight.reshape(h, d, c).transpose(1, 2)  # (h,C,d)
        return self._merge(attn, torch.matmul(ax, wv) + attn.v_proj.bias.reshape(1, h, 1, d))

    def _image_output(self, attn: nn.Module, weights: torch.Tensor, v_tokens: torch.Tensor) -> torch.Tensor:
        """out_proj(heads(softmax) @ v) without out_proj's bias, as one product: weights (N,h,T), v_tokens (1,T,internal) -> (N,C)."""
        h, c = attn.num_heads, self.dim
        wo = attn.out_proj.weight.transpose(0, 1).reshape(h, attn.internal_dim // h, c)  # (h,d,C)
        u = torch.matmul(self._split(attn, v_tokens), wo).reshape(-1, c)  # (hT,C)
        return torch.matmul(weights.reshape(self.n, -1), u)

    def _image_to_token(self, attn: nn.Module, keys_pe: torch.Tensor, q_tokens: torch.Tensor, v_tokens: torch.Tensor) -> torch.Tensor:
        """attn(q=keys_pe, k=q_tokens, v=v_tokens) less out_proj's bias, with the image-side projections moved to the tokens."""
        h, c = attn.num_heads, self.dim
        d = attn.internal_dim // h
        k = self._scaled_heads(attn, attn.k_proj(q_tokens))  # (1,h,T,d)
        wq = attn.q_proj.weight.reshape(h, d, c)
        g = torch.matmul(k, wq).reshape(-1, c)  # (hT,C)
        shift = torch.matmul(k, attn.q_proj.bias.reshape(h, d, 1)).reshape(1, -1)  # q_proj's bias
        scores = torch.matmul(keys_pe, g.transpose(0, 1)) + shift  # (N,hT)
        weights = torch.softmax(scores.reshape(self.n, h, -1), dim=-1)
        return self._image_output(attn, weights, attn.v_proj(v_tokens))

    def _scaled_heads(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A projection's output split into heads and scaled by 1/sqrt(head size), as the scores take it."""
        return self._split(attn, x) * (1.0 / math.sqrt(attn.internal_dim // attn.num_heads))

    def _output_tokens(self) -> torch.Tensor:
        """(S,C): the object-score token (SAM 2.1), the IoU token and the mask tokens, before the prompt's."""
        md = self.md
        tokens = [md.obj_score_token.weight] if md.pred_obj_scores else []
        return torch.cat(tokens + [md.iou_token.weight, md.mask_tokens.weight], dim=0)

    def _key_pe(self) -> torch.Tensor:
        """(N,C): the image tokens' positional encoding, a constant of the graph."""
        return self.prompt_encoder.get_dense_pe().reshape(self.dim, self.n).transpose(0, 1)

    # --- the layers both forms share (the attention helpers above give each form its shapes) ------
    def _carries(self) -> list[torch.Tensor | None]:
        """Each layer's image tokens are held as `keys + carry`, carry being the next layer's image->token
        output bias (folded into the LayerNorm's beta that makes them): a constant shift that the positional
        encoding, the token->image values and the next residual sum take back exactly, each on a constant or on
        the few tokens, so no per-prompt bias pass over the image tokens remains. Returns layer i's carry at i."""
        return [layer.cross_attn_image_to_token.out_proj.bias for layer in self.transformer.layers[1:]] + [None]

    def _image_norm(self, layer: nn.Module, x: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
        """layer.norm4 of the image tokens, its beta shifted by the carry."""
        n4 = layer.norm4
        return F.layer_norm(x, (self.dim,), n4.weight, n4.bias if carry is None else n4.bias + carry, n4.eps)

    def _later_layers(
        self, queries: torch.Tensor, keys: torch.Tensor, point_emb: torch.Tensor, key_pe: torch.Tensor,
        carries: list[torch.Tensor | None],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way layers after the first: (queries, keys) -> (queries, keys), keys held with their carry."""
        carry = carries[0]
        for i, layer in enumerate(self.transformer.layers[1:], start=1):
            queries = layer.norm1(queries + self._self_attention(layer.self_attn, queries + point_emb, queries))
            keys_pe = keys + (key_pe if carry is None else key_pe - carry)
            queries = layer.norm2(
                queries
                + self._token_to_image(layer.cross_attn_token_to_image, queries + point_emb, keys, keys_pe, carry)
            )
            queries = layer.norm3(queries + layer.mlp(queries))
            i2t = layer.cross_attn_image_to_token
            carry = carries[i]  # this layer's output bias was the carry: the residual sum needs no bias pass
            keys = self._image_norm(layer, keys + self._image_to_token(i2t, keys_pe, queries + point_emb, queries), carry)
        return queries, keys

    def _final_attention(self, queries: torch.Tensor, point_emb: torch.Tensor, keys: torch.Tensor, key_pe: torch.Tensor) -> torch.Tensor:
        """The final token->image attention, only for the tokens read after it (IoU + mask tokens): the others'
        results are unused. Returns those tokens."""
        tr, s, m = self.transformer, self.s, self.md.num_mask_tokens
        used = queries[:, s : s + 1 + m]
        return tr.norm_final_attn(
            used + self._token_to_image(tr.final_attn_token_to_image, used + point_emb[:, s : s + 1 + m], keys, keys + key_pe)
        )

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
        sparse = self._points._embed_points(point_coords, point_labels)
        point_emb = torch.cat((self._output_tokens().unsqueeze(0), sparse), dim=1)  # (1,T,C)
        key_pe = self._key_pe()
        carries = self._carries()

        # layer 0: the image side of both cross-attentions comes precomputed from DecoderPrepGraph
        l0 = tr.layers[0]
        queries = l0.norm1(self._self_attention(l0.self_attn, point_emb, point_emb))
        a = l0.cross_attn_token_to_image
        h, d = a.num_heads, a.internal_dim // a.num_heads
        q = self._scaled_heads(a, a.q_proj(queries + point_emb))
        o = torch.matmul(torch.softmax(torch.matmul(q, prep_t2i_k0), dim=-1), prep_t2i_v0)  # (1,h,T,d)
        queries = l0.norm2(queries + self._merge(a, o))
        queries = l0.norm3(queries + l0.mlp(queries))
        a = l0.cross_attn_image_to_token
        k = self._scaled_heads(a, a.k_proj(queries + point_emb))  # (1,h,T,d)
        # block-diagonal keys (h*d, h*T): one product gives every head's scores, heads-inner, with no transpose
        eye = torch.eye(h, dtype=k.dtype).reshape(h, 1, h, 1)
        kbd = (k[0].transpose(1, 2).unsqueeze(2) * eye).reshape(h * d, -1)
        weights = torch.softmax(torch.matmul(prep_i2t_q0, kbd).reshape(n, h, -1), dim=-1)  # (N,h,T)
        keys = self._image_norm(l0, prep_keys0 + self._image_output(a, weights, a.v_proj(queries)), carries[0])  # prep_keys0 holds the output bias
        queries, keys = self._later_layers(queries, keys, point_emb, key_pe, carries)
        used = self._final_attention(queries, point_emb, keys, key_pe)
        m = md.num_mask_tokens

        # upscaling, channels-last, one product per kernel row so that the masks come out in row-major
        # blocks: pixel (4y+2a+c, 4x+2b+d) of a mask is element [a, c, y*4w + x*4 + b*2 + d]
        c1, c2 = self.c1, self.c2
        gh, gw = self.grid
        hyper = torch.stack([mlp(used[0, 1 + i]) for i, mlp in enumerate(md.output_hypernetworks_mlps)])  # (m,c2)
        up = torch.matmul(keys, self.w1).reshape(2, 2 * n, c1)  # [a, (y,x,b), c1]
        up = F.gelu(F.layer_norm(up + prep_feat_s1, (c1,), self.ln1_weight, self.ln1_bias, self.ln1_eps))
        up = torch.matmul(up.unsqueeze(1), self.w2).reshape(2, 2, 4 * n, c2)  # [a, c, (y,x,b,d), c2]
        up = F.gelu(up + prep_feat_s0)
        masks = torch.matmul(hyper, up.transpose(2, 3))  # [a, c, mask, (y,x,b,d)]
        masks = masks.reshape(2, 2, m, gh, 4 * gw).permute(2, 3, 0, 1, 4).reshape(1, m, 4 * gh, 4 * gw)
        iou = md.iou_prediction_head(used[:, 0, :])
        return masks, iou
