"""The exported encoder's rewritten forms compute what SAM 2's own modules compute (torch level, no export)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sam2rt.export import encoder_fusion as fusion
from sam2rt.export import graphs


@pytest.mark.parametrize("shape", [(1, 8, 8, 5), (3, 4, 12, 7)])
def test_channels_last_max_pool_is_maxpool2d(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    pool = nn.MaxPool2d(kernel_size=2, stride=2)
    expected = pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert torch.equal(fusion._max_pool_channels_last(x, pool), expected)


def _block(dim: int, dim_out: int, heads: int, window: int, q_stride) -> nn.Module:
    from sam2.modeling.backbones.hieradet import MultiScaleBlock

    torch.manual_seed(0)
    block = MultiScaleBlock(dim, dim_out, heads, q_stride=q_stride, window_size=window).eval()
    with torch.no_grad():  # non-trivial biases and norms, so dropping or folding one would show
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return block


@pytest.mark.parametrize(
    "dim,dim_out,heads,window,q_stride,hw",
    [
        (16, 16, 2, 4, None, 8),  # windows, no padding
        (16, 16, 2, 5, None, 12),  # windows padded 12 -> 15: linears before the padding
        (16, 32, 2, 6, (2, 2), 14),  # q pooling at a stage change, padded windows
        (16, 32, 4, 4, (2, 2), 8),  # q pooling, no padding
        (32, 32, 4, 0, None, 6),  # global attention
    ],
)
@pytest.mark.parametrize("pad_first", [False, True])
def test_fused_block_matches_hieradet(dim, dim_out, heads, window, q_stride, hw, pad_first):
    block = _block(dim, dim_out, heads, window, q_stride)
    x = torch.randn(2, hw, hw, dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = block(x)
        assert fusion._fusable_block(block, hw, hw)
        with fusion.fused_encoder_attention(pad_first=pad_first):
            got = block(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert block.forward.__func__ is type(block).forward  # the patch is undone


def test_unfusable_block_keeps_the_original_forward():
    """Pooling windows that would straddle padding: the patched class falls back to hieradet's forward."""
    block = _block(16, 32, 2, 6, (2, 2))
    assert not fusion._fusable_block(block, 13, 13)


@pytest.fixture(scope="module")
def tiny_model():
    from sam2rt.export import build_model
    from sam2rt.model_specs import get_spec

    return build_model(get_spec("hiera_tiny"), seed=0)


def test_folded_encoder_matches_forward_image(tiny_model):
    """Folded neck + fused trunk blocks against SAM2Base.forward_image + _prepare_backbone_features."""
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    reference = graphs.ImageEncoderGraph(tiny_model).eval()
    folded = graphs.ImageEncoderGraph(tiny_model, fold=True).eval()
    assert folded.folded is not None and reference.folded is None
    with torch.no_grad():
        expected = reference(image)
        with fusion.fused_encoder_attention():
            got = folded(image)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert float((g - e).abs().max()) < 1e-4


def test_fold_needs_the_expected_neck(tiny_model, monkeypatch):
    monkeypatch.setattr(tiny_model.image_encoder, "scalp", 0)
    assert graphs.ImageEncoderGraph(tiny_model, fold=True).folded is None


def test_chunked_block_matches_hieradet(monkeypatch):
    """With tiny chunk budgets the MLP runs over row chunks and the window attention over window groups."""
    block = _block(16, 32, 2, 4, (2, 2))
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    calls = []
    original = fusion._fused_attention_forward
    monkeypatch.setattr(fusion, "_fused_attention_forward", lambda attn, w: calls.append(w.shape[0]) or original(attn, w))
    monkeypatch.setattr(fusion, "ATTENTION_KV_CHUNK_BYTES", 1024)
    monkeypatch.setattr(fusion, "MLP_HIDDEN_CHUNK_BYTES", 1024)
    with torch.no_grad():
        expected = block(x)
        with fusion.fused_encoder_attention():
            got = block(x)
    assert len(calls) > 1 and sum(calls) == 16  # 16 windows of 4x4, in groups
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_window_partition_by_concat_is_sam2s():
    """The pad-first form's partition: sam2's window_partition (F.pad) with the padding as concatenated zeros."""
    from sam2.modeling.backbones.utils import window_partition

    for hw, ws in (((12, 12), 5), ((14, 9), 7), ((8, 8), 4)):
        x = torch.randn(2, *hw, 3, generator=torch.Generator().manual_seed(2))
        got, got_hw = fusion._window_partition_by_concat(x, ws)
        want, want_hw = window_partition(x, ws)
        assert got_hw == tuple(want_hw) and torch.equal(got, want)
