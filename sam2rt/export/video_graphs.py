"""The torch modules of SAM 2's video path that sam2rt exports: memory encoder, memory attention, tracking decoder.

Each wraps an official `SAM2Base` and computes what `SAM2Base.track_step` computes for one object
(batch 1), with every shape static so that no input grows with the length of a stream:

- `MemoryEncoderGraph`: `_encode_new_memory` from the 256x256 mask logits the reference stores
  (upsampled to the model's input size inside the graph, as `track_step` / the predictor's preflight do).
- `MemoryAttentionGraph`: `_prepare_memory_conditioned_features` for a non-initial frame over a fixed
  number of memory slots (conditioning frames + the `num_maskmem - 1` most recent frames) and pointer
  slots, each with a validity flag; RoPE is applied with real cos/sin tables (no complex numbers) and
  invalid slots are masked out of the cross-attention softmax. `CompactMemoryAttentionGraph`, for GPU
  providers, takes the valid slots only (counts bounded by the same slots) and needs no mask.
- `TrackDecoderGraph`: `_forward_sam_heads` (prompt encoder + mask decoder) with the tracking outputs:
  all four tokens' masks (NO_OBJ_SCORE where the object is predicted absent), IoU, object score and one
  object pointer per token with the occlusion handling applied; the runtime picks the token as the
  reference does.
- `MaskDownsampleGraph`: the `mask_downsample` convolution used for mask prompts.

The image encoder is not repeated here: the video path reads the image graphs' features
(`image_embed` carries `no_mem_embed` when `directly_add_no_mem_embed`, which these graphs undo).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .encoder_fusion import OrtMultiHeadAttention
from .graphs import PromptDecoderGraph

NO_OBJ_SCORE = -1024.0  # sam2.modeling.sam2_base.NO_OBJ_SCORE: logits of an absent object

# What `build_sam2_video_predictor` (apply_postprocessing=True) and `SAM2VideoPredictor.__init__` set on
# top of the bundled config; the runtime follows them (manifest "video" section).
VIDEO_PREDICTOR_SETTINGS = {
    "binarize_mask_from_pts_for_mem_enc": True,
    "fill_hole_area": 8,
    "non_overlap_masks": False,
    "clear_non_cond_mem_around_input": False,
    "add_all_frames_to_correct_as_cond": False,
}

MEMORY_ENCODER_INPUTS = ["image_embed", "mask_logits", "object_score_logits", "binarize"]
MEMORY_ENCODER_OUTPUTS = ["maskmem_features"]
MEMORY_ATTENTION_INPUTS = ["image_embed", "mem_feats", "mem_tpos", "mem_valid", "obj_ptrs", "ptr_pos", "ptr_valid"]
MEMORY_ATTENTION_OUTPUTS = ["pix_feat_with_mem"]
# The compact form (CompactMemoryAttentionGraph): only the valid slots, so no validity inputs and no key mask.
MEMORY_ATTENTION_COMPACT_INPUTS = ["image_embed", "mem_feats", "mem_tpos", "obj_ptrs", "ptr_pos"]
MEMORY_ATTENTION_COMPACT_AXES = {"mem_feats": {0: "slots"}, "mem_tpos": {0: "slots"}, "obj_ptrs": {0: "pointers"},
                                 "ptr_pos": {0: "pointers"}}
TRACK_DECODER_INPUTS = [
    "pix_feat", "high_res_feats_0", "high_res_feats_1", "point_coords", "point_labels", "mask_input", "has_mask_input",
]
TRACK_DECODER_OUTPUTS = ["low_res_masks", "iou_predictions", "obj_ptr", "object_score_logits"]
MASK_DOWNSAMPLE_INPUTS = ["mask"]
MASK_DOWNSAMPLE_OUTPUTS = ["mask_input"]

# Queries per attention chunk of the standard graph: a (1, heads, chunk, ~28.7k) score matrix instead of
# (1, heads, 4096, ~28.7k) (118 MiB instead of 470 MiB per layer); softmax is per query row, so the result is the same.
QUERY_CHUNK = 1024
# Bias of an invalid key in the fused graph's extra key channel: finite, so a block of keys that are all invalid
# cannot turn the flash kernel's running maximum into -inf - (-inf) = NaN; exp(-1e9 * scale - max) is 0 in float32.
INVALID_KEY_BIAS = -1e9


def _raw_image_features(model: nn.Module, image_embed: torch.Tensor) -> torch.Tensor:
    """The backbone's top-level features without the `no_mem_embed` the image graph adds."""
    if model.directly_add_no_mem_embed:
        return image_embed - model.no_mem_embed.reshape(1, -1, 1, 1)
    return image_embed


class MemoryEncoderGraph(nn.Module):
    """(image_embed, 256x256 mask logits, object score, binarize flag) -> maskmem_features (1, mem_dim, 64, 64).

    `binarize` (1,) is 1 for frames whose mask came from a prompt (the reference's `is_mask_from_pts`
    with `binarize_mask_from_pts_for_mem_enc`), 0 for tracked frames (sigmoid of the logits).
    The positional encoding of the memory is a constant (same for every frame): MemoryAttentionGraph holds it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embed, mask_logits, object_score_logits, binarize):
        m = self.model
        pix_feat = _raw_image_features(m, image_embed)
        high_res = F.interpolate(mask_logits, size=(m.image_size, m.image_size), mode="bilinear", align_corners=False)
        mask_for_mem = torch.where(binarize.reshape(1, 1, 1, 1) > 0.5, (high_res > 0).float(), torch.sigmoid(high_res))
        if m.sigmoid_scale_for_mem_enc != 1.0:
            mask_for_mem = mask_for_mem * m.sigmoid_scale_for_mem_enc
        if m.sigmoid_bias_for_mem_enc != 0.0:
            mask_for_mem = mask_for_mem + m.sigmoid_bias_for_mem_enc
        feats = m.memory_encoder(pix_feat, mask_for_mem, skip_mask_sigmoid=True)["vision_features"]
        if m.no_obj_embed_spatial is not None:
            absent = 1.0 - (object_score_logits > 0).float()
            feats = feats + absent.reshape(-1, 1, 1, 1) * m.no_obj_embed_spatial.reshape(1, -1, 1, 1)
        return feats


def rope_tables(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (N, head_dim/2) of a RoPEAttention's complex `freqs_cis` (64x64 tokens at 1024 input)."""
    cis = attn.freqs_cis.cpu()
    return cis.real.float().contiguous(), cis.imag.float().contiguous()


def half_split_order(head_dim: int, heads: int) -> torch.Tensor:
    """Channel order that moves each head's RoPE pairs (2j, 2j+1) to (j, j + head_dim/2).

    q and k projected in this order give the same scores q.k (one permutation on both sides of a dot product), and
    their rotation becomes two elementwise products (`apply_rope_half`) instead of an interleave.
    """
    one = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return torch.cat([one + h * head_dim for h in range(heads)])


def apply_rope_half(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """RoPE for channels in `half_split_order`, with real arithmetic: x * [cos, cos] + [-x1, x0] * [sin, sin].

    The same products as the reference's complex multiplication `view_as_complex(x) * freqs_cis`, pair by pair.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos2 + rotated * sin2


class _MemoryRoPEAttention(nn.Module):
    """A RoPEAttention of the memory attention, with the same function and less work.

    - q and k are projected in `half_split_order`, so RoPE is two products with the graph's shared tables.
    - Keys may come as `slots` repeats of the query grid (rope_k_repeat) followed by unrotated pointer tokens,
      with an additive key mask (0 / -inf).
    - Cross-attention (`value_first`): the reference projects the 64-channel memory to v (256 channels) before
      attending. With one head, out_proj(P (X Wv^T + bv)) = (P X)(Wo Wv)^T + (Wo bv + bo) because each row of
      P sums to 1, so the graph attends over the memory itself and applies one folded projection after:
      P X costs a quarter of P V.
    - `fused`: attention as com.microsoft MultiHeadAttention (ONNX Runtime's CPU flash kernel). That kernel takes
      no mask, so the key mask rides in one extra channel: q gets 1, k gets bias / scale, and
      scale * (q.k + 1 * bias / scale) = scale * q.k + bias. Otherwise MatMul -> Softmax -> MatMul in query chunks.
    """

    def __init__(self, attn: nn.Module, value_first: bool, fused: bool) -> None:
        super().__init__()
        self.attn = attn
        self.heads = int(attn.num_heads)
        self.head_dim = int(attn.internal_dim) // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.value_first = value_first and self.heads == 1
        self.fused = fused
        order = half_split_order(self.head_dim, self.heads)
        with torch.no_grad():
            self.q_weight = nn.Parameter(attn.q_proj.weight[order].clone(), requires_grad=False)
            self.q_bias = nn.Parameter(attn.q_proj.bias[order].clone(), requires_grad=False)
            self.k_weight = nn.Parameter(attn.k_proj.weight[order].clone(), requires_grad=False)
            self.k_bias = nn.Parameter(attn.k_proj.bias[order].clone(), requires_grad=False)
            if self.value_first:
                o, v = attn.out_proj, attn.v_proj
                self.vo_weight = nn.Parameter(o.weight @ v.weight, requires_grad=False)
                self.vo_bias = nn.Parameter(o.weight @ v.bias + o.bias, requires_grad=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).flatten(2)

    def forward(self, q, k, v, cos2, sin2, slots: int = 0, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn
        q = apply_rope_half(self._heads(F.linear(q, self.q_weight, self.q_bias)), cos2, sin2)
        k = self._heads(F.linear(k, self.k_weight, self.k_bias))
        n = q.shape[-2]
        if slots == 0:  # self-attention: keys on the query grid
            k = apply_rope_half(k, cos2, sin2)
        else:  # `slots` memory frames on the query grid (same angles each), then pointer tokens without RoPE
            b, h, _, d = k.shape
            k_mem = apply_rope_half(k[:, :, : slots * n].reshape(b, h, slots, n, d), cos2, sin2)
            k = torch.cat([k_mem.reshape(b, h, slots * n, d), k[:, :, slots * n :]], dim=2)
        v = v[:, None] if self.value_first else self._heads(a.v_proj(v))
        if self.fused:
            if key_bias is not None:
                bias = key_bias.clamp(min=INVALID_KEY_BIAS).reshape(1, 1, -1, 1).expand(k.shape[0], k.shape[1], -1, 1)
                q = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)
                k = torch.cat([k, bias / self.scale], dim=-1)
            out = OrtMultiHeadAttention.apply(self._merge(q), self._merge(k), self._merge(v), self.heads, self.scale)
        else:
            kt = k.transpose(-2, -1)
            outs = []
            for i in range(0, n, QUERY_CHUNK):
                s = torch.matmul(q[:, :, i : i + QUERY_CHUNK] * self.scale, kt)
                if key_bias is not None:
                    s = s + key_bias
                outs.append(torch.matmul(torch.softmax(s, dim=-1), v))
            out = self._merge(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])
        if self.value_first:
            return F.linear(out, self.vo_weight, self.vo_bias)
        return a.out_proj(out)


class MemoryAttentionGraph(nn.Module):
    """Memory-conditioned features of a non-initial frame for one object, over static memory/pointer slots.

    Inputs: image_embed (1,C,H,W) as the image graph gives it; mem_feats (M,mem_dim,H,W) memory features
    (bfloat16-rounded values in float32, as the reference stores them); mem_tpos (M,) int64: index into
    `maskmem_tpos_enc` (num_maskmem-1 for conditioning frames, t_rel-1 for the frame t_rel before);
    mem_valid (M,) 1/0; obj_ptrs (P,C); ptr_pos (P,) the pointer's temporal distance already divided by
    `max_obj_ptrs - 1` (signed or absolute per the model); ptr_valid (P,) 1/0. At least one slot is valid.
    Output: pix_feat_with_mem (1,C,H,W).

    `fused=True` makes the ONNX Runtime CPU variant (attention as com.microsoft MultiHeadAttention); the default
    uses standard ONNX ops only (TensorRT); GPU providers run `CompactMemoryAttentionGraph`. One RoPE table pair serves every layer: the
    reference's layers all hold the same angles (checked here), so the file holds them once.
    """

    def __init__(self, model: nn.Module, feat_hw: tuple[int, int] = (64, 64), fused: bool = False) -> None:
        super().__init__()
        self.model = model
        ma = model.memory_attention
        assert ma.batch_first, "memory attention with batch_first=False is not supported"
        h, w = feat_hw
        c = model.hidden_dim
        with torch.no_grad():
            curr_pos = model.image_encoder.neck.position_encoding(torch.zeros(1, c, h, w))  # (1,C,H,W)
            mem_pos = model.memory_encoder.position_encoding(torch.zeros(1, model.mem_dim, h, w))
        self.register_buffer("curr_pos", curr_pos.flatten(2).transpose(1, 2).contiguous(), persistent=False)  # (1,HW,C)
        self.register_buffer("mem_pos", mem_pos.flatten(2).transpose(1, 2).contiguous(), persistent=False)  # (1,HW,m)
        attns = [a for layer in ma.layers for a in (layer.self_attn, layer.cross_attn_image)]
        cos, sin = rope_tables(attns[0])
        for a in attns[1:]:
            other_cos, other_sin = rope_tables(a)
            if not (torch.equal(cos, other_cos) and torch.equal(sin, other_sin)):
                raise ValueError("the memory attention's layers hold different RoPE angles; one table cannot serve them")
        # persistent buffers export as one initializer each, shared by every layer (non-persistent ones would be
        # copied into a constant at every use)
        self.register_buffer("rope_cos", torch.cat([cos, cos], dim=-1))
        self.register_buffer("rope_sin", torch.cat([sin, sin], dim=-1))
        self.self_attn = nn.ModuleList(_MemoryRoPEAttention(layer.self_attn, False, fused) for layer in ma.layers)
        self.cross_attn = nn.ModuleList(_MemoryRoPEAttention(layer.cross_attn_image, True, fused) for layer in ma.layers)

    def _pointer_tokens(self, obj_ptrs: torch.Tensor, ptr_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from sam2.modeling.sam2_utils import get_1d_sine_pe

        m = self.model
        c, mem_dim = m.hidden_dim, m.mem_dim
        p = obj_ptrs.shape[0]
        if m.add_tpos_enc_to_obj_ptrs:
            tpos_dim = c if m.proj_tpos_enc_in_obj_ptrs else mem_dim
            obj_pos = m.obj_ptr_tpos_proj(get_1d_sine_pe(ptr_pos, dim=tpos_dim))  # (P, mem_dim)
        else:
            obj_pos = torch.zeros(p, mem_dim, dtype=obj_ptrs.dtype)
        split = c // mem_dim
        if split > 1:  # a pointer becomes C / mem_dim tokens, as the reference splits it
            obj_ptrs = obj_ptrs.reshape(p, split, mem_dim).reshape(p * split, mem_dim)
            obj_pos = obj_pos.repeat_interleave(split, dim=0)
        return obj_ptrs, obj_pos

    def forward(self, image_embed, mem_feats, mem_tpos, mem_valid, obj_ptrs, ptr_pos, ptr_valid):
        return self._attend_memory(image_embed, mem_feats, mem_tpos, obj_ptrs, ptr_pos, mem_valid, ptr_valid)

    def _attend_memory(self, image_embed, mem_feats, mem_tpos, obj_ptrs, ptr_pos, mem_valid=None, ptr_valid=None):
        """The memory attention over the given slots; without validity flags every slot is used (no key mask)."""
        m = self.model
        ma = m.memory_attention
        b, c, h, w = image_embed.shape
        n = h * w
        slots = mem_feats.shape[0]
        curr = _raw_image_features(m, image_embed).flatten(2).transpose(1, 2)  # (1,HW,C)
        memory = mem_feats.flatten(2).transpose(1, 2)  # (M,HW,m)
        tpos = m.maskmem_tpos_enc.reshape(m.num_maskmem, -1)[mem_tpos]  # (M,m)
        memory_pos = self.mem_pos + tpos[:, None, :]
        memory = memory.reshape(1, slots * n, -1)
        memory_pos = memory_pos.reshape(1, slots * n, -1)
        split = c // m.mem_dim
        masked = mem_valid is not None
        key_valid = mem_valid.repeat_interleave(n) if masked else None
        if m.use_obj_ptrs_in_encoder:
            ptr_tokens, ptr_pos_tokens = self._pointer_tokens(obj_ptrs, ptr_pos)
            memory = torch.cat([memory, ptr_tokens[None]], dim=1)
            memory_pos = torch.cat([memory_pos, ptr_pos_tokens[None]], dim=1)
            if masked:
                key_valid = torch.cat([key_valid, ptr_valid.repeat_interleave(split)])
        key_bias = torch.where(key_valid > 0.5, 0.0, float("-inf")).reshape(1, 1, 1, -1) if masked else None
        tables = (self.rope_cos, self.rope_sin)

        output = curr
        if ma.pos_enc_at_input:
            output = output + 0.1 * self.curr_pos
        for layer, sa, ca in zip(ma.layers, self.self_attn, self.cross_attn):
            tgt2 = layer.norm1(output)
            qk = tgt2 + self.curr_pos if layer.pos_enc_at_attn else tgt2
            output = output + sa(qk, qk, tgt2, *tables)
            tgt2 = layer.norm2(output)
            output = output + ca(
                tgt2 + self.curr_pos if layer.pos_enc_at_cross_attn_queries else tgt2,
                memory + memory_pos if layer.pos_enc_at_cross_attn_keys else memory,
                memory,
                *tables,
                slots=slots,
                key_bias=key_bias,
            )
            tgt2 = layer.norm3(output)
            output = output + layer.linear2(layer.activation(layer.linear1(tgt2)))
        output = ma.norm(output)
        return output.transpose(1, 2).reshape(b, c, h, w)


class CompactMemoryAttentionGraph(MemoryAttentionGraph):
    """The memory attention over the valid slots only, for GPU providers: (image_embed, mem_feats (M,...), mem_tpos
    (M,), obj_ptrs (P,C), ptr_pos (P,)) with M and P dynamic, M >= 1.

    Without invalid slots there is no key mask, so every attention is a plain com.microsoft MultiHeadAttention, which
    ONNX Runtime's CUDA provider runs with its fused (flash / memory-efficient) kernels instead of materialising the
    (4096 x ~28.7k) score matrix of each cross-attention; the values are projected before attending (the fused
    kernels want one head size for q, k and v). The runtime passes the valid slots in the order the masked graph
    holds them, so it computes the same function (checked at export against PyTorch at two bank sizes).
    """

    def __init__(self, model: nn.Module, feat_hw: tuple[int, int] = (64, 64)) -> None:
        super().__init__(model, feat_hw, fused=True)
        ma = model.memory_attention
        self.cross_attn = nn.ModuleList(_MemoryRoPEAttention(layer.cross_attn_image, False, True) for layer in ma.layers)

    def forward(self, image_embed, mem_feats, mem_tpos, obj_ptrs, ptr_pos):  # type: ignore[override]
        return self._attend_memory(image_embed, mem_feats, mem_tpos, obj_ptrs, ptr_pos)


class TrackDecoderGraph(PromptDecoderGraph):
    """`_forward_sam_heads` for one object: all four tokens plus the tracking outputs.

    Inputs: pix_feat (1,C,64,64) (memory-conditioned features, or image_embed on an initial conditioning
    frame, or the raw features for a mask prompt's pointer), the two high-res features, point_coords (1,N,2)
    in the input frame with the padding point appended, point_labels (1,N), mask_input (1,1,256,256) logits
    and has_mask_input (1,). Outputs: low_res_masks (1,4,256,256) (NO_OBJ_SCORE everywhere when the object
    score is <= 0), iou_predictions (1,4), obj_ptr (1,4,C): each token's object pointer after the occlusion
    handling (`fixed_no_obj_ptr` / `soft_no_obj_ptr` / `no_obj_ptr`), object_score_logits (1,1).
    """

    def __init__(self, sam_model: nn.Module) -> None:
        super().__init__(sam_model)
        self.model = sam_model

    def forward(self, pix_feat, high_res_feats_0, high_res_feats_1, point_coords, point_labels, mask_input, has_mask_input):
        m = self.model
        pe = self.prompt_encoder
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        dense = has_mask * pe.mask_downscaling(mask_input) + (1.0 - has_mask) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        sparse = self._embed_points(point_coords, point_labels)
        masks, iou_pred, mask_tokens, score = self.mask_decoder.predict_masks(
            image_embeddings=pix_feat,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            repeat_image=False,
            high_res_features=[high_res_feats_0, high_res_feats_1],
        )
        ptrs = m.obj_ptr_proj(mask_tokens)  # (1,4,C)
        if m.pred_obj_scores:
            appearing = score > 0
            masks = torch.where(appearing[:, :, None, None], masks, torch.full_like(masks, NO_OBJ_SCORE))
            lam = torch.sigmoid(score) if m.soft_no_obj_ptr else appearing.float()
            lam = lam[:, :, None]
            if m.fixed_no_obj_ptr:
                ptrs = lam * ptrs
            ptrs = ptrs + (1 - lam) * m.no_obj_ptr[:, None, :]
        return masks, iou_pred, ptrs, score


class MaskDownsampleGraph(nn.Module):
    """(1,1,1024,1024) binary mask -> `mask_downsample` conv -> (1,1,256,256): a mask prompt's decoder input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.conv = model.mask_downsample

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.conv(mask)


def video_settings(model: nn.Module) -> dict:
    """The config values the runtime's tracking logic needs (read from the built model), plus the video
    predictor's settings."""
    md = model.sam_mask_decoder
    return {
        "num_maskmem": int(model.num_maskmem),
        "max_obj_ptrs_in_encoder": int(model.max_obj_ptrs_in_encoder),
        "max_cond_frames_in_attn": int(model.max_cond_frames_in_attn),
        "memory_temporal_stride_for_eval": int(model.memory_temporal_stride_for_eval),
        "use_obj_ptrs_in_encoder": bool(model.use_obj_ptrs_in_encoder),
        "add_tpos_enc_to_obj_ptrs": bool(model.add_tpos_enc_to_obj_ptrs),
        "use_signed_tpos_enc_to_obj_ptrs": bool(model.use_signed_tpos_enc_to_obj_ptrs),
        "only_obj_ptrs_in_the_past_for_eval": bool(model.only_obj_ptrs_in_the_past_for_eval),
        "directly_add_no_mem_embed": bool(model.directly_add_no_mem_embed),
        "use_mask_input_as_output_without_sam": bool(model.use_mask_input_as_output_without_sam),
        "multimask_output_in_sam": bool(model.multimask_output_in_sam),
        "multimask_output_for_tracking": bool(model.multimask_output_for_tracking),
        "multimask_min_pt_num": int(model.multimask_min_pt_num),
        "multimask_max_pt_num": int(model.multimask_max_pt_num),
        "use_multimask_token_for_obj_ptr": bool(model.use_multimask_token_for_obj_ptr),
        "pred_obj_scores": bool(model.pred_obj_scores),
        "fixed_no_obj_ptr": bool(model.fixed_no_obj_ptr),
        "soft_no_obj_ptr": bool(model.soft_no_obj_ptr),
        "no_obj_embed_spatial": model.no_obj_embed_spatial is not None,
        "dynamic_multimask_via_stability": bool(md.dynamic_multimask_via_stability),
        "dynamic_multimask_stability_delta": float(md.dynamic_multimask_stability_delta),
        "dynamic_multimask_stability_thresh": float(md.dynamic_multimask_stability_thresh),
        "mem_dim": int(model.mem_dim),
        "hidden_dim": int(model.hidden_dim),
        **VIDEO_PREDICTOR_SETTINGS,
    }
