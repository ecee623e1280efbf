"""The two torch modules sam2rt exports: the image encoder and the prompt encoder + mask decoder.

They wrap an official `sam2.modeling.sam2_base.SAM2Base` and compute exactly what
`SAM2ImagePredictor.set_image` and `SAM2ImagePredictor._predict` compute, minus the
choice among output tokens, which the runtime makes (it needs all four tokens' logits).
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Iterator

import torch
import torch.nn.functional as F
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
# The mask-free decoder variant (no mask_input): what most prompts need, without running the
# mask-downscaling convolutions whose result `has_mask_input = 0` throws away.
DECODER_NOMASK_INPUTS = DECODER_INPUTS[:5]


# Hiera's global-attention blocks attend over 64x64 = 4096 tokens: traced as plain MatMul + Softmax,
# one block materialises a (1, heads, 4096, 4096) float32 score matrix (256 MiB) plus its softmax.
# Splitting the queries into chunks computes exactly the same rows (softmax is per query row) and
# bounds that to (1, heads, CHUNK, 4096): the exported encoder's peak memory drops by ~0.4 GiB.
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


# ONNX Runtime's com.microsoft MultiHeadAttention: on CPU a fused (flash-style, no materialised
# score matrix) kernel that takes q, k, v as (B, S, heads * head_dim), so the head split/merge
# transposes go into the kernel. Exported only into the CPU/CUDA encoder variant (`fused_encoder_attention`);
# encoder.onnx keeps standard ONNX ops for TensorRT and other runtimes.
MHA_DOMAIN = "com.microsoft"


class _OrtMultiHeadAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(head_dim)) v per head, for (B, S, D) inputs; exported as com.microsoft::MultiHeadAttention."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:  # type: ignore[override]
        b, s, d = q.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], num_heads, d // num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return out.transpose(1, 2).reshape(b, s, d)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int):  # pragma: no cover - called by torch.onnx.export
        out = g.op(f"{MHA_DOMAIN}::MultiHeadAttention", q, k, v, num_heads_i=num_heads)
        out.setType(q.type())
        return out


def _max_pool_channels_last(x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """nn.MaxPool2d(k, stride=k) over (B, H, W, C) without leaving channels-last (H, W divisible by k).

    As elementwise maxima of contiguous slices (ONNX Split + Max): ReduceMax over the strided
    window axes, or MaxPool between two transposes, are slower on ONNX Runtime's CPU provider.
    """
    k = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
    b, h, w, c = x.shape
    rows = x.reshape(b, h // k, k, w // k, k * c).unbind(2)  # the k rows of each window
    x = functools.reduce(torch.maximum, rows).reshape(b, h // k, w // k, k, c).unbind(3)  # then its k columns
    return functools.reduce(torch.maximum, x)


def _linear(x: torch.Tensor, linear: nn.Linear, part: int, width: int, bias: bool = True) -> torch.Tensor:
    """Output channels [part * width, (part + 1) * width) of `linear(x)`, as a Linear of its own (without its bias if not `bias`)."""
    sl = slice(part * width, (part + 1) * width)
    return F.linear(x, linear.weight[sl], linear.bias[sl] if bias and linear.bias is not None else None)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of (..., D) q over k, v (any leading shape, flattened to (B, S, D)) -> (B, Sq, D)."""
    b, d = q.shape[0], attn.dim_out
    return _OrtMultiHeadAttention.apply(q.reshape(b, -1, d), k.reshape(b, -1, d), v.reshape(b, -1, d), attn.num_heads)


def _project(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """attn.proj(x + v_bias): the value bias left out of v (softmax rows sum to 1) folded into proj's bias."""
    d = attn.dim_out
    w = attn.proj.weight
    bias = attn.proj.bias.double() if attn.proj.bias is not None else torch.zeros(d, dtype=torch.float64)
    if attn.qkv.bias is not None:
        bias = bias + w.double() @ attn.qkv.bias[2 * d:].double()
    return F.linear(x, w, bias.float())


def _qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as three Linears (ORT copies every Split output; separate GEMMs are cheaper).

    k and v without their biases: the key bias adds q . b_k to every score of a query, which softmax
    ignores; the value bias comes out of the attention unchanged and is added by `_project`. Bias-free
    k and v of zero-padded tokens are zero, so they can also be computed before padding.
    """
    d = attn.dim_out
    return _linear(x, attn.qkv, 0, d), _linear(x, attn.qkv, 1, d, bias=False), _linear(x, attn.qkv, 2, d, bias=False)


def _fused_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """hieradet.MultiScaleAttention.forward with the attention as one MultiHeadAttention node."""
    q, k, v = _qkv(self, x)
    if self.q_pool is not None:
        q = _max_pool_channels_last(q, self.q_pool)
    out = _attend(self, q, k, v)
    return _project(self, out.reshape(q.shape))


def _padded_window_attention(attn: nn.Module, x: torch.Tensor, ws: int) -> torch.Tensor:
    """Window attention of a (B, H, W, C) map whose windows need padding, padded after the linears.

    The original pads the normalised input and runs qkv and proj over the padded tokens too (~20%
    more tokens for 14-windows on 64x64); here q, k, v are computed on the real tokens and then
    zero-padded (padded queries are dropped; bias-free padded keys / values are what the original's are,
    see `_qkv`), and proj runs after the padding is cropped.
    """
    from sam2.modeling.backbones.utils import window_partition, window_unpartition

    h, w = x.shape[1:3]
    q, k, v = _qkv(attn, x)
    (q, pad_hw), (k, _), (v, _) = (window_partition(t, ws) for t in (q, k, v))
    if attn.q_pool is not None:
        q = _max_pool_channels_last(q, attn.q_pool)
        s = ws // q.shape[1]
        h, w, pad_hw = h // s, w // s, (pad_hw[0] // s, pad_hw[1] // s)
    out = _attend(attn, q, k, v).reshape(q.shape)
    return _project(attn, window_unpartition(out, q.shape[1], pad_hw, (h, w)))


def _fusable_block(block: nn.Module, h: int, w: int) -> bool:
    """Whether `_fused_block_forward` computes exactly what this block does for an (h, w) input."""
    if not _poolable(block.attn) or (block.pool is not None and not _poolable(block)):
        return False
    if block.q_stride:
        s = block.q_stride[0]
        ws = block.window_size
        # pooling windows never straddle real and padded tokens
        return block.q_stride[0] == block.q_stride[1] and h % s == 0 and w % s == 0 and (ws == 0 or ws % s == 0)
    return True


def _fused_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """hieradet.MultiScaleBlock.forward with channels-last pooling and padding after the attention's linears."""
    from sam2.modeling.backbones.utils import window_partition, window_unpartition

    shortcut = x
    x = self.norm1(x)
    if self.dim != self.dim_out:
        shortcut = self.proj(x)
        if self.pool is not None:
            shortcut = _max_pool_channels_last(shortcut, self.pool)
    h, w = x.shape[1:3]
    ws = self.window_size
    if ws > 0 and (h % ws or w % ws):
        x = _padded_window_attention(self.attn, x, ws)
    elif ws > 0:
        x, pad_hw = window_partition(x, ws)
        x = _fused_attention_forward(self.attn, x)
        wq = x.shape[1]
        x = window_unpartition(x, wq, (pad_hw[0] * wq // ws, pad_hw[1] * wq // ws), shortcut.shape[1:3])
    else:
        x = _fused_attention_forward(self.attn, x)
    x = shortcut + x
    return x + self.mlp(self.norm2(x))


def _poolable(module: nn.Module) -> bool:
    pool = getattr(module, "q_pool", getattr(module, "pool", None))
    if pool is None:
        return True
    return isinstance(pool, nn.MaxPool2d) and pool.kernel_size == pool.stride and not pool.ceil_mode and pool.padding in (0, (0, 0))


@contextlib.contextmanager
def fused_encoder_attention() -> Iterator[None]:
    """While active, the Hiera trunk's blocks export with com.microsoft::MultiHeadAttention (same function).

    Patches hieradet.MultiScaleBlock.forward (see `_fused_block_forward`); blocks it cannot reproduce
    exactly (`_fusable_block`) keep the original forward.
    """
    from sam2.modeling.backbones import hieradet

    cls = hieradet.MultiScaleBlock
    original = cls.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[1]), int(x.shape[2])
        return _fused_block_forward(self, x) if _fusable_block(self, h, w) else original(self, x)

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


def _fold_linear(conv: nn.Conv2d, after: nn.Conv2d | None = None, bias_extra: torch.Tensor | None = None):
    """(weight, bias) of a 1x1 conv (then, if given, the 1x1 conv `after`) as one Linear on channels-last input.

    Two 1x1 convolutions with nothing between them are one linear map; the product is formed in
    float64 and rounded once. `bias_extra` (per output channel) is added to the bias.
    """
    w = conv.weight.detach().double().flatten(1)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if after is not None:
        wa = after.weight.detach().double().flatten(1)
        ba = after.bias.detach().double() if after.bias is not None else torch.zeros(wa.shape[0], dtype=torch.float64)
        w, b = wa @ w, wa @ b + ba
    if bias_extra is not None:
        b = b + bias_extra.detach().double().flatten()
    return w.float(), b.float()


def _is_pointwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in (0, (0, 0)) and conv.groups == 1)


class _FoldedNeck(nn.Module):
    """SAM 2's FPN neck + the mask decoder's conv_s0/conv_s1 + no_mem_embed, folded for export.

    Same function as `forward_image` + `_prepare_backbone_features` for SAM2ImagePredictor's
    outputs: each high-resolution level's lateral 1x1 conv and the decoder's 1x1 conv_s0/conv_s1 after
    it become one 1x1 map (96->32 and 192->64 channels instead of 96->256->32 and 192->256->64), the
    no-memory embedding becomes a bias, and the neck runs channels-last (GEMMs on the trunk's
    (B, H, W, C) layout, one transpose per output). `supported(model)` says whether the model has
    the structure this assumes (SAM 2 / 2.1 image configs); otherwise the graph keeps the original path.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        neck = model.image_encoder.neck
        convs = [seq.conv for seq in neck.convs]  # convs[n - i] is level i's lateral conv
        n = len(convs) - 1
        lateral = [convs[n - i] for i in range(n + 1)]
        md = model.sam_mask_decoder
        no_mem = model.no_mem_embed if model.directly_add_no_mem_embed else None
        self.top_down = sorted(neck.fpn_top_down_levels)
        weights = {}
        weights["l0"] = _fold_linear(lateral[0], md.conv_s0)
        weights["l1"] = _fold_linear(lateral[1], md.conv_s1)
        weights["l2"] = _fold_linear(lateral[2], None, no_mem)
        weights["l3"] = _fold_linear(lateral[3])
        for name, (w, b) in weights.items():
            self.register_buffer(f"{name}_w", w, persistent=False)
            self.register_buffer(f"{name}_b", b, persistent=False)

    @staticmethod
    def supported(model: nn.Module) -> bool:
        enc = model.image_encoder
        neck = getattr(enc, "neck", None)
        try:
            return (
                len(neck.convs) == 4 and enc.scalp == 1 and model.num_feature_levels == 3
                and model.use_high_res_features_in_sam and sorted(neck.fpn_top_down_levels) == [2, 3]
                and neck.fpn_interp_model == "nearest" and neck.fuse_type == "sum"
                and all(_is_pointwise(seq.conv) for seq in neck.convs)
                and _is_pointwise(model.sam_mask_decoder.conv_s0) and _is_pointwise(model.sam_mask_decoder.conv_s1)
            )
        except AttributeError:
            return False

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cl = [x.permute(0, 2, 3, 1) for x in xs]  # the trunk's NCHW outputs back to its (B, H, W, C)
        l0 = F.linear(cl[0], self.l0_w, self.l0_b)
        l1 = F.linear(cl[1], self.l1_w, self.l1_b)
        top = F.linear(cl[3], self.l3_w, self.l3_b)
        b, h, w, c = top.shape  # nearest 2x upsampling, channels-last
        up = top[:, :, None, :, None, :].expand(b, h, 2, w, 2, c).reshape(b, 2 * h, 2 * w, c)
        l2 = F.linear(cl[2], self.l2_w, self.l2_b) + up
        return tuple(t.permute(0, 3, 1, 2).contiguous() for t in (l2, l0, l1))  # type: ignore[return-value]


class ImageEncoderGraph(nn.Module):
    """Normalised 1x3x1024x1024 image -> (image_embed + no_mem_embed, high_res_feats_0, high_res_feats_1).

    fold=True (what is exported): the neck and decoder convolutions folded by `_FoldedNeck` where the
    model allows it; the same function up to float rounding (the export verifies it against fold=False).
    """

    def __init__(self, sam_model: nn.Module, fold: bool = False) -> None:
        super().__init__()
        self.model = sam_model
        size = sam_model.image_size
        self.feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
        self.folded = _FoldedNeck(sam_model) if fold and _FoldedNeck.supported(sam_model) else None

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
