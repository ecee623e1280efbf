"""Rewrites of SAM 2's image encoder for export: the same function with fewer, cheaper ONNX ops.

- `fused_encoder_attention()`: while active, Hiera's blocks trace with the attention as ONNX Runtime's
  com.microsoft MultiHeadAttention (the CPU encoder variant encoder.fused.onnx), q/k/v as three GEMMs,
  the key/value biases folded away, window padding after the linears, channels-last max pooling and
  the large first-stage activations chunked.
- `FoldedNeck`: the FPN neck + the mask decoder's conv_s0/conv_s1 + no_mem_embed folded, channels-last
  (used by `graphs.ImageEncoderGraph(fold=True)`, i.e. every exported encoder).

Each is checked against the original modules in tests/test_encoder_graph.py and, at export, against
PyTorch's forward_image.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# ONNX Runtime's com.microsoft MultiHeadAttention: on CPU a fused (flash-style, no materialised
# score matrix) kernel that takes q, k, v as (B, S, heads * head_dim), so the head split/merge
# transposes go into the kernel (with no mask or bias input: the CPU kernel has no flash path for those).
# Exported only into the `fused` variants ONNX Runtime loads (the encoder's, `fused_encoder_attention`, and the
# memory attention's, export/video_graphs.py); the base graphs keep standard ONNX ops for TensorRT and other runtimes.
MHA_DOMAIN = "com.microsoft"


class OrtMultiHeadAttention(torch.autograd.Function):
    """softmax(scale * q k^T) v per head for (B, S, heads * d) inputs; exports as com.microsoft::MultiHeadAttention.

    scale None: 1/sqrt(head size of q). q and k may have another head size than v (the memory attention's fused
    cross-attention attends with 257-channel q and k over the 64-channel memory); the output has v's.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float | None = None
    ) -> torch.Tensor:
        b, s, _ = q.shape
        if torch.jit.is_tracing():
            # torch.onnx.export records `symbolic` for this call and keeps only the shape of what it returns, which
            # nothing downstream branches on: tracing skips the attention itself (~10% of an export's time, more for
            # the larger models). Every exported graph is then checked against PyTorch's own forward.
            return q.new_zeros(b, s, v.shape[2])

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], num_heads, t.shape[2] // num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=scale)
        return out.transpose(1, 2).reshape(b, s, v.shape[2])

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int, scale: float | None = None):  # pragma: no cover - called by torch.onnx.export
        attrs = {"num_heads_i": num_heads} if scale is None else {"num_heads_i": num_heads, "scale_f": scale}
        out = g.op(f"{MHA_DOMAIN}::MultiHeadAttention", q, k, v, **attrs)
        q_sizes, v_sizes = q.type().varyingSizes(), v.type().varyingSizes()  # None for a dynamic dimension
        out.setType(v.type().with_sizes([q_sizes[0], q_sizes[1], v_sizes[2]]))
        return out


def _max_pool_channels_last(x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """nn.MaxPool2d(k, stride=k) over (B, H, W, C) without leaving channels-last (H, W divisible by k).

    As elementwise maxima of contiguous slices (ONNX Split + Max): ReduceMax over the strided
    window axes, or MaxPool between two transposes, are slower on ONNX Runtime's CPU provider.
    """
    k = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
    b, h, w, c = x.shape
    rows = x.reshape(b, h // k, k, w // k, k * c).unbind(2)  # the k rows of each window
    cols = functools.reduce(torch.maximum, rows).reshape(b, h // k, w // k, k, c).unbind(3)  # its k columns
    return functools.reduce(torch.maximum, cols)


def _linear(x: torch.Tensor, linear: nn.Linear, part: int, width: int, bias: bool = True) -> torch.Tensor:
    """Output channels [part * width, (part + 1) * width) of `linear(x)`, as a Linear of its own (without its bias if not `bias`)."""
    sl = slice(part * width, (part + 1) * width)
    return F.linear(x, linear.weight[sl], linear.bias[sl] if bias and linear.bias is not None else None)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of (..., D) q over k, v (any leading shape, flattened to (B, S, D)) -> (B, Sq, D)."""
    b, d = q.shape[0], attn.dim_out
    return OrtMultiHeadAttention.apply(q.reshape(b, -1, d), k.reshape(b, -1, d), v.reshape(b, -1, d), attn.num_heads)


def _constant(t: torch.Tensor) -> torch.Tensor:
    """`t`'s values as a tensor the ONNX tracer records as one constant, not as the ops that computed it (the export
    would otherwise store their float64 operands and compute at every load what is fixed at export)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # "treated as a constant": what is wanted here
        out = torch.from_numpy(t.detach().cpu().numpy().copy())
    return out if t.device.type == "cpu" else out.to(t.device)


def _project(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """attn.proj(x + v_bias): the value bias left out of v (softmax rows sum to 1) folded into proj's bias (formed in
    float64 and rounded once, a constant of the graph)."""
    d = attn.dim_out
    w = attn.proj.weight
    with torch.no_grad():
        bias = attn.proj.bias.double() if attn.proj.bias is not None else torch.zeros(d, dtype=torch.float64)
        if attn.qkv.bias is not None:
            bias = bias + w.double() @ attn.qkv.bias[2 * d:].double()
    return F.linear(x, w, _constant(bias.float()))


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


# Hiera's first stages attend within 1024 windows of 8x8 tokens: k and v of all windows (and their
# copies inside MultiHeadAttention) are up to 4 x 48 MiB; groups of windows bound that.
ATTENTION_KV_CHUNK_BYTES = 32 * 2**20


def _chunked_window_attention(attn: nn.Module, windows: torch.Tensor, chunked: bool = True) -> torch.Tensor:
    """`_fused_attention_forward` over groups of windows (windows are independent: same result); all at once
    unless `chunked`."""
    n_win = windows.shape[0]
    if not chunked:
        return _fused_attention_forward(attn, windows)
    kv_bytes = 2 * windows[0].numel() * attn.dim_out // windows.shape[-1] * n_win * 4
    n = 1
    while kv_bytes // n > ATTENTION_KV_CHUNK_BYTES and n_win % (2 * n) == 0:
        n *= 2
    if n == 1:
        return _fused_attention_forward(attn, windows)
    return torch.cat([_fused_attention_forward(attn, part) for part in torch.split(windows, n_win // n)], dim=0)


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


def _window_partition_by_concat(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """sam2's `window_partition` (zero padding to a multiple of `ws`, then (B * windows, ws, ws, C)) with the padding
    as concatenations of zeros: one Concat per padded axis in ONNX instead of a Pad (`pad_first` says why)."""
    b, h, w, c = x.shape
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
    if ph:
        x = torch.cat([x, x.new_zeros(b, ph, w, c)], dim=1)
    if pw:
        x = torch.cat([x, x.new_zeros(b, h + ph, pw, c)], dim=2)
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
    return x, (hp, wp)


def _fused_block_forward(self, x: torch.Tensor, chunked: bool = True, pad_first: bool = False) -> torch.Tensor:
    """hieradet.MultiScaleBlock.forward with channels-last pooling and padding after the attention's linears
    (`chunked`: the large first-stage activations in chunks, see ATTENTION_KV_CHUNK_BYTES, MLP_HIDDEN_CHUNK_BYTES;
    `pad_first`: padded windows as the original pads them, before the linears, once, see `fused_encoder_attention`)."""
    from sam2.modeling.backbones.utils import window_partition, window_unpartition

    shortcut = x
    x = self.norm1(x)
    if self.dim != self.dim_out:
        shortcut = self.proj(x)
        if self.pool is not None:
            shortcut = _max_pool_channels_last(shortcut, self.pool)
    h, w = x.shape[1:3]
    ws = self.window_size
    if ws > 0 and (h % ws or w % ws) and not pad_first:
        x = _padded_window_attention(self.attn, x, ws)
    elif ws > 0:
        x, pad_hw = _window_partition_by_concat(x, ws) if pad_first else window_partition(x, ws)
        x = _chunked_window_attention(self.attn, x, chunked)
        wq = x.shape[1]
        x = window_unpartition(x, wq, (pad_hw[0] * wq // ws, pad_hw[1] * wq // ws), shortcut.shape[1:3])
    else:
        x = _fused_attention_forward(self.attn, x)
    x = shortcut + x
    return _chunked_mlp(self, x) if chunked else x + self.mlp(self.norm2(x))


# The MLP's hidden activation is 4x the block's width: (65536, 384) floats = 96 MiB in Hiera's first
# stage, and with GELU's output 192 MiB live at once, the encoder's peak. Row chunks of the map bound it.
MLP_HIDDEN_CHUNK_BYTES = 32 * 2**20


def _chunked_mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x + block.mlp(block.norm2(x)) over row chunks of the (B, H, W, C) map (per-token ops: same result)."""
    b, h, w, c = x.shape
    hidden = block.mlp.layers[0].out_features
    n = 1
    while b * h * w * hidden * 4 // n > MLP_HIDDEN_CHUNK_BYTES and h % (2 * n) == 0:
        n *= 2
    if n == 1:
        return x + block.mlp(block.norm2(x))
    return torch.cat([part + block.mlp(block.norm2(part)) for part in torch.split(x, h // n, dim=1)], dim=1)


def _poolable(module: nn.Module) -> bool:
    pool = getattr(module, "q_pool", getattr(module, "pool", None))
    if pool is None:
        return True
    return isinstance(pool, nn.MaxPool2d) and pool.kernel_size == pool.stride and not pool.ceil_mode and pool.padding in (0, (0, 0))


@contextlib.contextmanager
def fused_encoder_attention(chunked: bool = True, pad_first: bool = False) -> Iterator[None]:
    """While active, the Hiera trunk's blocks export with com.microsoft::MultiHeadAttention (same function).

    Patches hieradet.MultiScaleBlock.forward (see `_fused_block_forward`); blocks it cannot reproduce
    exactly (`_fusable_block`) keep the original forward. `chunked` (the exported `fused` form): the first stages'
    window attention and MLPs run in chunks that bound the CPU's peak memory; without, each runs whole (one kernel
    each: what a GPU may prefer, measured by `python -m sam2rt.bench.encoder_forms`).

    `pad_first`: windows that need padding (hiera_tiny's 14-windows on 64x64 tokens, 7-windows on 32x32) pad the block's
    input once, by concatenating zeros, as the original does, instead of padding q, k and v after their linears (the
    exported form: ~20% fewer GEMM rows, which the CPU wants). On the H100 of GPU run 5 ONNX Runtime's Pad took
    0.27-0.5 ms per node in the exported form's 15 (profiled with launches blocking, in TF32 and FP16 alike), about
    as much as the windowed blocks' attention; this form has no Pad and a third of the window partitions. With
    `chunked=False` it is the GPU's encoder (`device_encoder_attention`, graph_table's `encoder.device`).
    """
    from sam2.modeling.backbones import hieradet

    cls = hieradet.MultiScaleBlock
    original = cls.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[1]), int(x.shape[2])
        return _fused_block_forward(self, x, chunked, pad_first) if _fusable_block(self, h, w) else original(self, x)

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


class FoldedNeck(nn.Module):
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


def device_encoder_attention() -> contextlib.AbstractContextManager[None]:
    """The GPU's encoder form (`encoder.device.onnx`): `fused_encoder_attention` with each stage's attention and MLP
    whole and padded windows padded once before the linears. GPU run 6 (H100, `sam2rt.bench.encoder_forms`): 3.51 ms
    in FP16 and 7.18 ms in TF32, against 7.74 and 11.36 for the CPU's form (`fused`), the same features."""
    return fused_encoder_attention(chunked=False, pad_first=True)
