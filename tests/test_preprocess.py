"""Pre/postprocessing reproduce the reference's torchvision resize and F.interpolate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam2rt.runtime.postprocess import select_masks, stability_scores, upsample_logits
from sam2rt.runtime.preprocess import preprocess


@pytest.mark.parametrize("hw", [(480, 640), (1080, 1920), (300, 200), (1024, 1024), (17, 33), (1024, 777), (2100, 1500)])
def test_preprocess_matches_sam2_transforms(hw):
    from sam2.utils.transforms import SAM2Transforms

    img = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ref = SAM2Transforms(1024, 0.0)(img)[None].numpy()
    ours = preprocess(img)
    assert ours.shape == (1, 3, 1024, 1024) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.parametrize("hw", [(480, 640), (1080, 1920), (17, 33), (1024, 777), (2100, 1500)])
def test_the_cpu_backends_preprocessing_matches_sam2_transforms(sam2rt_model, hw):
    """The CPU backend preprocesses with the package's block-banded graph (what `embed` runs): the reference's
    transforms within 1e-5, each call's result a new array of its own."""
    from sam2.utils.transforms import SAM2Transforms

    backend = sam2rt_model.backend
    assert backend.name == "onnxruntime-cpu"
    img = np.random.default_rng(hw[1]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ref = SAM2Transforms(1024, 0.0)(img)[None].numpy()
    ours = backend.preprocess(img, 1024)
    assert isinstance(ours, np.ndarray) and ours.shape == (1, 3, 1024, 1024) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-5
    kept = ours.copy()
    backend.preprocess(255 - img, 1024)
    np.testing.assert_array_equal(ours, kept)


@pytest.mark.parametrize("hw", [(480, 640), (1080, 1920), (100, 77), (256, 256), (1023, 513)])
def test_upsample_matches_interpolate(hw):
    x = np.random.default_rng(1).standard_normal((2, 3, 256, 256)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), hw, mode="bilinear", align_corners=False).numpy()
    assert np.abs(upsample_logits(x, hw) - ref).max() < 1e-5


def test_select_masks_follows_mask_decoder():
    """Token choice equals SAM 2's MaskDecoder (multimask, single, stability fallback)."""
    from sam2.modeling.sam.mask_decoder import MaskDecoder

    rng = np.random.default_rng(0)
    low = rng.standard_normal((6, 4, 256, 256)).astype(np.float32)
    low[:3, 0] = np.where(low[:3, 0] > 0, 5.0, -5.0)  # stable single-mask tokens for half the batch
    iou = rng.random((6, 4)).astype(np.float32)
    dec = MaskDecoder.__new__(MaskDecoder)
    dec.dynamic_multimask_stability_delta, dec.dynamic_multimask_stability_thresh = 0.05, 0.98
    ref_l, ref_s = dec._dynamic_multimask_via_stability(torch.from_numpy(low), torch.from_numpy(iou))
    our_l, our_s = select_masks(low, iou, multimask_output=False)
    np.testing.assert_array_equal(our_l, ref_l.numpy())
    np.testing.assert_array_equal(our_s, ref_s.numpy())
    multi_l, multi_s = select_masks(low, iou, multimask_output=True)
    np.testing.assert_array_equal(multi_l, low[:, 1:])
    assert set(np.round(stability_scores(low[:3, 0], 0.05), 6)) == {1.0}
