"""The tracked frames' decoder (export/tracking_decoder.py): track_decoder.onnx edited to take the features only and to
choose the token itself. It must compute exactly what the tracking decoder + the host's token choice compute, for every
token rule SAM 2's configs can select, and the tracker must track the same through it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from test_video import pan_clip, patch_mask, point_prompt

FEATURES = ("pix_feat", "high_res_feats_0", "high_res_feats_1")


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _features(session, seed: int, scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: (rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]) * scale).astype(np.float32)
            for i in session.get_inputs() if i.name in FEATURES}


# token rules: (what changes in the stand-in's SAM 2.1 settings, the token of the mask, the token of the pointer) on the
# stand-in, whose best multimask token is 1 and whose single-mask token's stability is 0.985-0.99
RULES = {
    "multimask, pointer of the best token (SAM 2.1)": ({}, 1, 1),
    "multimask, pointer of the single-mask token": ({"use_multimask_token_for_obj_ptr": False}, 1, 0),
    "single-mask token, stable": ({"multimask_output_for_tracking": False}, 0, 0),
    "single-mask token, unstable: the best multimask token": (
        {"multimask_output_for_tracking": False, "dynamic_multimask_stability_thresh": 0.999}, 1, 0),
    "single-mask token, no stability rule": (
        {"multimask_output_for_tracking": False, "dynamic_multimask_via_stability": False,
         "dynamic_multimask_stability_thresh": 0.999}, 0, 0),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_the_tracking_form_computes_the_decoder_and_the_hosts_token_choice(tiny_video_dir: Path, tmp_path: Path, rule):
    """On features of three magnitudes: the same mask, pointer and score as track_decoder.onnx with a tracked frame's
    inputs and `select_track_output`, and the token the rule names (the stand-in's tokens differ: a wrong choice shows)."""
    from sam2rt.export.tiny_video import SETTINGS
    from sam2rt.export.tracking_decoder import TRACKING_INPUTS, _constant_inputs, make_tracking_decoder
    from sam2rt.runtime.video.heads import select_track_output, use_multimask

    changes, mask_token, ptr_token = RULES[rule]
    settings = {**SETTINGS, **changes}
    src = tiny_video_dir / "track_decoder.onnx"
    dst = tmp_path / "tracking.onnx"
    make_tracking_decoder(src, dst, settings)
    full, ours = _session(src), _session(dst)
    assert tuple(i.name for i in ours.get_inputs()) == TRACKING_INPUTS
    for seed, scale in ((1, 0.1), (2, 1.0), (3, 10.0)):
        feeds = _features(ours, seed, scale)
        lr, iou, ptrs, score = full.run(None, {**feeds, **_constant_inputs(256)})
        want_mask, want_ptr = select_track_output(settings, lr, iou, ptrs, use_multimask(settings, False, 0))
        mask, ptr, got_score = ours.run(None, feeds)
        assert mask.shape == (1, 1, 256, 256) and ptr.shape == (1, ptrs.shape[-1])
        np.testing.assert_allclose(mask[0, 0], want_mask, atol=1e-5)
        np.testing.assert_allclose(ptr[0], want_ptr, atol=1e-6)
        np.testing.assert_allclose(got_score, score, atol=1e-6)
        np.testing.assert_allclose(mask[0, 0], lr[0, mask_token], atol=1e-5)
        np.testing.assert_allclose(ptr[0], ptrs[0, ptr_token], atol=1e-6)
    other = {0: 1, 1: 0}[mask_token]
    assert np.abs(lr[0, other] - lr[0, mask_token]).max() > 1.0  # the rule's choice is visible in the output


def test_a_wrong_token_choice_or_graph_is_refused(tiny_video_dir: Path, tmp_path: Path):
    """The check of make_tracking_decoder refuses a form whose choice differs from the settings' (ExportError naming
    the output), and a graph that is not a tracking decoder."""
    import onnx

    from sam2rt.errors import ExportError
    from sam2rt.export.tiny_video import SETTINGS
    from sam2rt.export.tracking_decoder import check_tracking_decoder, make_tracking_decoder, tracking_graph

    src = tiny_video_dir / "track_decoder.onnx"
    wrong = tmp_path / "wrong.onnx"
    onnx.save(tracking_graph(src, {**SETTINGS, "multimask_output_for_tracking": False}), str(wrong))  # token 0
    with pytest.raises(ExportError, match="tracking decoder mask_logits"):
        check_tracking_decoder(src, wrong, SETTINGS)  # SAM 2.1 tracks with the best multimask token
    with pytest.raises(ExportError, match="not a tracking decoder graph: it has no input pix_feat, .*point_coords"):
        make_tracking_decoder(tiny_video_dir / "memory_encoder.onnx", tmp_path / "x.onnx", SETTINGS)


def test_the_export_makes_the_tracking_form_without_the_mask_branch(model_dir: Path):
    """The real export records track_decoder.tracking.onnx (and its FP16 copy) as variants of the tracking decoder,
    checked against it; the mask input's three convolutions are folded away with the prompt inputs."""
    import onnx

    from sam2rt.manifest import Manifest
    from sam2rt.runtime.backends.onnxruntime_backend import _fresh_variant

    m = Manifest.load(model_dir)
    entry = _fresh_variant(m, "track_decoder", "tracking")
    assert entry is not None and entry["file"] == "track_decoder.tracking.onnx"
    assert max(entry["check_max_abs_diff"].values()) < 1e-3
    assert [i["name"] for i in entry["inputs"]] == ["pix_feat", "high_res_feats_0", "high_res_feats_1"]
    fp16 = _fresh_variant(m, "track_decoder", "tracking_fp16")
    assert fp16 is not None and fp16["source"] == "tracking" and fp16["precision"] == "fp16"

    def count(name: str, op: str) -> int:
        return sum(n.op_type == op for n in onnx.load(str(model_dir / name)).graph.node)

    full, tracking = "track_decoder.onnx", "track_decoder.tracking.onnx"
    assert count(full, "Conv") - count(tracking, "Conv") == 3  # mask_downscaling's
    # the fusions that are slower on the CPU were left out of the folding (no MatMul + Add became a Gemm), and the CPU
    # provider's session leaves them out
    assert entry["ort_disabled_optimizers"] == ["SkipLayerNormFusion", "MatMulAddFusion"]
    assert count(tracking, "Gemm") == count(full, "Gemm") and count(tracking, "MatMul") > 0


def _run(tracker, frames, corners) -> list[dict]:
    out = [tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))]
    logits = []
    for i, f in enumerate(frames[1:], start=1):
        out.append(tracker.track(f))
        if i == 3:
            out.append(tracker.add_prompt(2, mask=patch_mask(corners[i])))
        if i == 7:
            out.append(tracker.add_prompt(1, points=[[100.0, 100.0]], labels=[0]))  # a correction
        logits.append({k: v.copy() for k, v in tracker.low_res_logits.items()})
    return out + logits


@pytest.mark.parametrize("fixed", [False, True], ids=["sessions", "fixed buffers"])
def test_the_tracker_tracks_the_same_through_the_tracking_form(tiny_video_dir: Path, tmp_path: Path, fixed: bool):
    """10 frames, a second object and a correction: the tracker with the tracking form (which runs it on every tracked
    frame, not track_decoder) gives the masks and logits of the tracker without it, as an export from before it loads
    (the variant not in its manifest)."""
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Sam2Model, VideoTracker
    from sam2rt.runtime.video.graphs import VideoGraphs

    old = tmp_path / "old"
    shutil.copytree(tiny_video_dir, old)
    m_old = Manifest.load(old)
    del m_old.data["graphs"]["track_decoder"]["variants"]["tracking"]
    m_old.save()
    frames, corners = pan_clip(10)
    results, calls = [], []
    for d in (tiny_video_dir, old):
        m = Manifest.load(d)
        graphs = VideoGraphs(m, "onnxruntime-cpu", fixed_buffers=fixed)
        counted = {}
        for slot, session in graphs.sessions.items():
            def run(*args, _run=session.run, _slot=slot, _counted=counted, **kwargs):
                _counted[_slot] = _counted.get(_slot, 0) + 1
                return _run(*args, **kwargs)
            session.run = run
        tracker = VideoTracker(Sam2Model.from_dir(d, backend="onnxruntime-cpu"), graphs, fill_hole_area=0)
        results.append(_run(tracker, frames, corners))
        calls.append((graphs.tracking_decoder, counted))
    (new_uses, new_calls), (old_uses, old_calls) = calls
    assert new_uses and not old_uses
    tracked = 9 + 6  # object 1 on frames 1-9, object 2 (prompted on frame 3) on frames 4-9
    assert new_calls["tracking_decoder"] == tracked
    assert new_calls["track_decoder"] == 3 == old_calls["track_decoder"] - tracked  # the three prompts only
    for a, b in zip(*results):
        assert set(a) == set(b)
        for k in a:
            if a[k].dtype == bool:
                np.testing.assert_array_equal(a[k], b[k])
            else:
                np.testing.assert_allclose(a[k], b[k], atol=1e-5)
