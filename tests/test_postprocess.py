"""The ONNX Runtime upsampling graph: shipped as built, and identical to the numpy path it speeds up."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam2rt.runtime.postprocess import Upsampler, upsample_logits


def test_shipped_graph_is_the_one_the_builder_makes():
    """sam2rt/runtime/graphs/upsample.onnx is exactly build_upsample_graph()'s output (regenerate with
    `python -m sam2rt.export.upsample_graph`)."""
    from sam2rt.export.upsample_graph import UPSAMPLE_GRAPH, build_upsample_graph

    assert UPSAMPLE_GRAPH.read_bytes() == build_upsample_graph().SerializeToString()


@pytest.mark.parametrize("hw", [(480, 640), (1080, 1920), (100, 77), (256, 256), (1023, 513)])
def test_graph_equals_numpy_and_interpolate(hw):
    rng = np.random.default_rng(hw[0])
    x = (rng.standard_normal((2, 3, 256, 256)) * 4).astype(np.float32)
    x[0, 0, 100:110, 100:110] = 0.0  # exact zeros: the threshold's edge case
    up = Upsampler(threads=2)
    assert up._session_or_false(), "onnxruntime is installed here: the graph path must be the one tested"
    ours, ref = up(x, hw), upsample_logits(x, hw)
    np.testing.assert_array_equal(ours, ref)  # same operations in the same order: identical, not close
    torch_ref = F.interpolate(torch.from_numpy(x), hw, mode="bilinear", align_corners=False).numpy()
    assert np.abs(ours - torch_ref).max() < 1e-5
    for thr in (0.0, 0.37, -1.5):
        masks = up(x, hw, threshold=thr)
        assert masks.dtype == np.bool_ and masks.shape == (2, 3, *hw)
        np.testing.assert_array_equal(masks, ref > thr)
        values = up(x, hw, threshold=thr, float_masks=True)
        assert values.dtype == np.float32
        np.testing.assert_array_equal(values, (ref > thr).astype(np.float32))


def test_without_onnxruntime_numpy_gives_the_same(monkeypatch):
    """Where the graph cannot be loaded (no onnxruntime, e.g. a TensorRT-only install), numpy does the work."""
    import builtins

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime here")
        return real_import(name, *args, **kwargs)

    x = np.random.default_rng(3).standard_normal((1, 3, 256, 256)).astype(np.float32)
    with_graph = Upsampler(threads=2)(x, (300, 400), threshold=0.0, float_masks=True)
    monkeypatch.setattr(builtins, "__import__", no_ort)
    plain = Upsampler(threads=2)
    out = plain(x, (300, 400), threshold=0.0, float_masks=True)
    assert plain._session is False
    np.testing.assert_array_equal(out, with_graph)
