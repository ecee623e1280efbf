"""sam2rt.Predictor against the PyTorch reference (SAM2ImagePredictor) on the same checkpoint and real photos."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import photo

LOGIT_TOL = 1e-3
SCORE_TOL = 1e-4
MIN_MASK_IOU = 0.999


def _images() -> dict[str, np.ndarray]:
    coffee = photo("coffee")  # 400x600 landscape
    return {
        "astronaut_512x512": photo("astronaut"),
        "coffee_400x600": coffee,
        "coffee_portrait_600x400": np.ascontiguousarray(np.rot90(coffee)),
        "chelsea_300x451": photo("chelsea"),
    }


def _cases(h: int, w: int) -> dict[str, dict]:
    """The prompt kinds the issue names, placed relative to the image size."""
    p = lambda fx, fy: [fx * w, fy * h]  # noqa: E731
    return {
        "one_point": dict(point_coords=np.array([p(0.5, 0.4)]), point_labels=np.array([1])),
        "one_point_single": dict(point_coords=np.array([p(0.5, 0.4)]), point_labels=np.array([1]), multimask_output=False),
        "pos_neg_points": dict(point_coords=np.array([p(0.3, 0.3), p(0.6, 0.5), p(0.8, 0.9)]), point_labels=np.array([1, 1, 0])),
        "pos_neg_points_single": dict(
            point_coords=np.array([p(0.3, 0.3), p(0.6, 0.5), p(0.8, 0.9)]), point_labels=np.array([1, 1, 0]), multimask_output=False
        ),
        "box": dict(box=np.array([*p(0.1, 0.2), *p(0.7, 0.9)])),
        "box_single": dict(box=np.array([*p(0.1, 0.2), *p(0.7, 0.9)]), multimask_output=False),
        "box_points": dict(box=np.array([*p(0.1, 0.2), *p(0.7, 0.9)]), point_coords=np.array([p(0.4, 0.5), p(0.2, 0.8)]),
                           point_labels=np.array([1, 0]), multimask_output=False),
        "box_batch": dict(box=np.array([[*p(0.0, 0.0), *p(0.5, 0.5)], [*p(0.3, 0.2), *p(0.9, 0.8)], [*p(0.6, 0.6), *p(1.0, 1.0)]])),
        "box_batch_single": dict(box=np.array([[*p(0.0, 0.0), *p(0.5, 0.5)], [*p(0.3, 0.2), *p(0.9, 0.8)]]), multimask_output=False),
        "normalized_coords": dict(point_coords=np.array([[0.25, 0.75]]), point_labels=np.array([1]), normalize_coords=False),
    }


def _mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a > 0, b > 0
    inter = np.logical_and(a, b).sum(axis=(-1, -2))
    union = np.logical_or(a, b).sum(axis=(-1, -2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _assert_same(ref: tuple, ours: tuple, what: str) -> None:
    for name, r, o in zip(("masks", "scores", "low_res_logits"), ref, ours):
        assert o.shape == r.shape, f"{what}: {name} shape {o.shape} != reference {r.shape}"
        assert o.dtype == r.dtype, f"{what}: {name} dtype {o.dtype} != reference {r.dtype}"
    assert np.abs(ours[2] - ref[2]).max() <= LOGIT_TOL, f"{what}: low-res logits differ by {np.abs(ours[2] - ref[2]).max()}"
    assert np.abs(ours[1] - ref[1]).max() <= SCORE_TOL, f"{what}: scores differ by {np.abs(ours[1] - ref[1]).max()}"
    iou = _mask_iou(ours[0], ref[0])
    assert iou.min() >= MIN_MASK_IOU, f"{what}: mask IoU {iou.min()}"


@pytest.fixture(scope="module")
def predictors(model_dir, reference_predictor):
    from sam2rt import Predictor

    return reference_predictor, Predictor.from_dir(model_dir, backend="onnxruntime-cpu")


@pytest.mark.parametrize("image_name", list(_images()))
def test_predict_matches_reference(predictors, image_name):
    ref, ours = predictors
    image = _images()[image_name]
    ref.set_image(image)
    ours.set_image(image)
    emb_ref = ref.get_image_embedding().numpy()
    assert np.abs(ours.get_image_embedding() - emb_ref).max() <= LOGIT_TOL
    h, w = image.shape[:2]
    for case, kwargs in _cases(h, w).items():
        _assert_same(ref.predict(**kwargs), ours.predict(**kwargs), f"{image_name}/{case}")
    # mask_input taken from a previous call's logits (interactive refinement), with and without points
    kwargs = _cases(h, w)["one_point"]
    _, scores, logits = ref.predict(**kwargs)
    prev = logits[np.argmax(scores)][None]
    refine = dict(point_coords=np.array([[0.5 * w, 0.4 * h], [0.2 * w, 0.7 * h]]), point_labels=np.array([1, 0]), mask_input=prev)
    _assert_same(ref.predict(**refine), ours.predict(**refine), f"{image_name}/mask_input+points")
    _assert_same(ref.predict(mask_input=prev, multimask_output=False), ours.predict(mask_input=prev, multimask_output=False),
                 f"{image_name}/mask_input_only")
    # return_logits returns the upsampled logits themselves
    ref_l, ours_l = ref.predict(**kwargs, return_logits=True), ours.predict(**kwargs, return_logits=True)
    assert np.abs(ours_l[0] - ref_l[0]).max() <= LOGIT_TOL
    # the low-level decode() of a box prompt on the same embedding equals the reference's predict() of that box
    _decode_matches_reference_predict(ours.model, ours.embedding, ref, np.array([0.15 * w, 0.1 * h, 0.65 * w, 0.85 * h]))


def _decode_matches_reference_predict(model, emb, ref, box: np.ndarray) -> None:
    from sam2rt.runtime import Prompt

    ref_masks, ref_scores, ref_logits = ref.predict(box=box, multimask_output=False)
    out = model.decode(emb, Prompt(box=box), multimask_output=False)
    assert np.abs(out.low_res_logits[0] - ref_logits).max() <= LOGIT_TOL
    assert np.abs(out.scores[0] - ref_scores).max() <= SCORE_TOL
    assert _mask_iou(out.masks[0].astype(np.float32), ref_masks).min() >= MIN_MASK_IOU


def test_bgr_input_equals_rgb(predictors):
    _, ours = predictors
    image = photo("chelsea")
    ours.set_image(image)
    a = ours.predict(point_coords=np.array([[200, 150]]), point_labels=np.array([1]))
    ours.set_image(np.ascontiguousarray(image[..., ::-1]), color_order="BGR")
    b = ours.predict(point_coords=np.array([[200, 150]]), point_labels=np.array([1]))
    np.testing.assert_array_equal(a[2], b[2])


def test_decode_batch_equals_single_prompts(sam2rt_model):
    """Low-level decode: many prompts of different kinds in one call give each prompt's result alone."""
    from sam2rt.runtime import Prompt

    image = photo("astronaut")
    emb = sam2rt_model.embed(image)
    prompts = [
        Prompt(points=np.array([[100.0, 120.0]]), labels=np.array([1])),
        Prompt(box=np.array([50.0, 60.0, 300.0, 400.0])),
        Prompt(points=np.array([[200.0, 200.0], [250.0, 100.0]]), labels=np.array([1, 0]), box=np.array([100.0, 100.0, 400.0, 400.0])),
        Prompt(box=np.array([10.0, 10.0, 100.0, 100.0])),
    ]
    together = sam2rt_model.decode(emb, prompts)
    assert together.masks.shape == (4, 3, 512, 512) and together.scores.shape == (4, 3)
    for i, p in enumerate(prompts):
        alone = sam2rt_model.decode(emb, p)
        np.testing.assert_allclose(together.low_res_logits[i], alone.low_res_logits[0], atol=1e-5)
        np.testing.assert_allclose(together.scores[i], alone.scores[0], atol=1e-6)
