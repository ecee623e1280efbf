"""`sam2rt verify`: the exported model against the official one from the checkpoint, passing and failing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sam2rt.cli import main
from sam2rt.verify import BOUNDS, PHOTOS_DIR, bundled_photos, image_files, violations

ONE_PHOTO = str(PHOTOS_DIR / "astronaut.jpg")


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    """An official-format checkpoint of hiera_tiny with other random weights (seed 99)."""
    import torch

    from sam2rt.export import build_model
    from sam2rt.model_specs import get_spec

    path = tmp_path_factory.mktemp("other") / "sam2.1_hiera_tiny_seed99.pt"
    torch.save({"model": build_model(get_spec("hiera_tiny"), seed=99).state_dict()}, path)
    return path


def _verify(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "verify.json"
    rc = main(["verify", *args, "--json", str(out), "--quiet"])
    return rc, json.loads(out.read_text())


def test_verify_passes_on_the_checkpoint_it_was_exported_from(model_dir, checkpoint_path, tmp_path, capsys):
    rc, report = _verify(tmp_path, "--model-dir", str(model_dir), "--checkpoint", str(checkpoint_path),
                         "--images", ONE_PHOTO, "--backend", "onnxruntime-cpu")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert report["passed"] and report["checkpoint"]["match"]
    assert [b["backend"] for b in report["backends"]] == ["onnxruntime-cpu"]  # no INT8 encoder in this export
    run = report["backends"][0]
    assert run["precision"] == "fp32" and run["passed"] and not run["violations"]
    # the grid reaches every decoder graph the CPU backend loads
    assert {"encoder", "decoder", "decoder_nomask", "decoder_prep", "decoder_fast"} <= set(run["graphs"])
    assert {"point", "box", "box_batch", "mixed_box_points", "many_points", "mask_refine"} <= set(run["cases"])
    overall = run["overall"]
    assert overall["logit_diff_max"] <= 1e-3 and overall["iou_min"] >= 0.99 and overall["masks"] > 20
    assert "PASSED" in printed and "IoU min" in printed and "mask_refine" in printed


def test_verify_refuses_a_directory_exported_from_another_checkpoint(model_dir, other_checkpoint, tmp_path, capsys):
    rc, report = _verify(tmp_path, "--model-dir", str(model_dir), "--checkpoint", str(other_checkpoint))
    err = capsys.readouterr().err
    assert rc == 1 and not report["passed"]
    assert not report["checkpoint"]["match"] and report["backends"] == []  # nothing else ran
    assert "exported from another checkpoint" in err and "re-export" in err


@pytest.mark.slow
def test_verify_finds_the_other_weights_in_the_numbers(model_dir, other_checkpoint, tmp_path, capsys):
    """With the sha256 check waived, the comparison itself fails: the bounds catch different weights.

    Slow: a second full verify (the PyTorch model and the export on a photo). The quick suite keeps the
    passing verify, the refusal of another checkpoint, and test_bounds_are_checked_one_by_one."""
    rc, report = _verify(tmp_path, "--model-dir", str(model_dir), "--checkpoint", str(other_checkpoint),
                         "--images", ONE_PHOTO, "--backend", "onnxruntime-cpu", "--ignore-sha256")
    assert rc == 1 and not report["passed"]
    run = report["backends"][0]
    assert not run["passed"] and any("logits differ" in v for v in run["violations"])
    assert "FAIL" in capsys.readouterr().out


def test_verify_refuses_random_weights_and_bad_arguments(tiny_model_dir, checkpoint_path, tmp_path, capsys):
    rc, report = _verify(tmp_path, "--model-dir", str(tiny_model_dir), "--checkpoint", str(checkpoint_path))
    assert rc == 1 and "RANDOM weights" in report["checkpoint"]["problem"]
    capsys.readouterr()
    assert main(["verify", "--model-dir", str(tiny_model_dir), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["verify", "--model-dir", str(tmp_path / "nodir"), "--checkpoint", str(checkpoint_path)]) == 2


def test_bundled_photos_are_real_and_images_expand(tmp_path):
    from sam2rt.annotate import read_image
    from sam2rt.errors import Sam2rtError

    photos = bundled_photos()
    assert [p.name for p in photos] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
    sizes = {p.name: read_image(p).shape for p in photos}
    assert sizes == {"astronaut.jpg": (512, 512, 3), "chelsea.jpg": (300, 451, 3), "coffee.jpg": (400, 600, 3)}
    assert image_files(None) == photos and image_files([PHOTOS_DIR]) == photos
    (tmp_path / "empty").mkdir()
    with pytest.raises(Sam2rtError, match="without images"):
        image_files([tmp_path / "empty"])
    with pytest.raises(Sam2rtError, match="does not exist"):
        image_files([tmp_path / "missing.png"])


def test_bounds_are_checked_one_by_one():
    good = {"logit_diff_max": 1e-4, "score_diff_max": 1e-5, "iou_min": 0.999, "iou_p5": 1.0}
    assert violations(good, BOUNDS["fp32"]) == []
    for key, bad in (("logit_diff_max", 0.5), ("score_diff_max", 0.1), ("iou_min", 0.5), ("iou_p5", 0.9),
                     ("logit_diff_max", float("nan"))):
        broken = violations({**good, key: bad}, BOUNDS["fp32"])
        assert len(broken) == 1, (key, broken)
    assert violations({**good, "logit_diff_max": 0.5}, BOUNDS["fp16"]) == []
    assert np.isclose(BOUNDS["int8"].min_mask_iou, 0.85)


def test_verify_checks_the_fp16_encoder_on_a_gpu(model_dir, tiny_model_dir):
    """On `onnxruntime-cuda` verify runs its default (TF32) and, where the export made the FP16 encoder, FP16 too:
    FP16 overflow shows only on real weights, so the user's check must reach the fast mode they would run."""
    from sam2rt.manifest import Manifest
    from sam2rt.verify import backends_to_check

    full = Manifest.load(model_dir)
    assert full.variant("encoder", "device_fp16") is not None
    assert backends_to_check(full, "onnxruntime-cuda") == ["onnxruntime-cuda:tf32", "onnxruntime-cuda:fp16"]
    assert backends_to_check(full, "cuda") == ["onnxruntime-cuda:tf32", "onnxruntime-cuda:fp16"]
    assert backends_to_check(full, "onnxruntime-cuda:fp32") == ["onnxruntime-cuda:fp32"]  # one precision asked for
    tiny = Manifest.load(tiny_model_dir)  # the stand-in has no FP16 encoder: TF32 alone
    assert tiny.variant("encoder", "fp16") is None and tiny.variant("encoder", "device_fp16") is None
    assert backends_to_check(tiny, "onnxruntime-cuda") == ["onnxruntime-cuda:tf32"]
