"""Shared fixtures.

- `tiny_model_dir` / `tiny_model`: a stand-in model directory with SAM 2's graph names, inputs, outputs and
  manifest but tiny graphs (sam2rt/export/tiny_model.py), built in milliseconds without torch. Tests of
  what the runtime does around the graphs (prompt checks, batching, graph choice, errors, CLI) use it.
  `tiny_video_dir` adds tiny video graphs (sam2rt/export/tiny_video.py) for the tracker's CLI and state tests.
- `checkpoint_path` / `model_dir` / `sam2rt_model` / `reference_predictor`: a seeded random-weight SAM 2.1
  hiera_tiny saved as an official checkpoint and exported once per session, for the tests of SAM 2's
  numerics (parity with the reference, the export itself).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest

SEED = 1234
MODEL_NAME = "hiera_tiny"
OBJ_SCORE_BIAS = 10.0


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-format checkpoint ({'model': state_dict}) of a seeded random hiera_tiny, built with `sam2`.

    Random weights give object scores just below 0: SAM 2.1's video path would declare every object absent
    and every mask empty. The object-score head's output is raised so the video tests track objects that
    stay present (the image path never reads this head). The file is marked random, so exports say so.
    """
    from sam2rt.export.checkpoint import random_checkpoint
    from sam2rt.model_specs import get_spec

    path = tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny_random.pt"
    return random_checkpoint(get_spec(MODEL_NAME), SEED, path, object_score_bias=OBJ_SCORE_BIAS)


@pytest.fixture(scope="session")
def model_dir(checkpoint_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hiera_tiny exported from checkpoint_path by `sam2rt export --target all` (in this process; what it printed
    is saved beside the directory for tests/test_cli.py): the session's one real export, with every graph."""
    from sam2rt.cli import main

    out = tmp_path_factory.mktemp("model") / MODEL_NAME
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["export", "--model", MODEL_NAME, "--checkpoint", str(checkpoint_path), "--out", str(out),
                   "--target", "all", "--quiet"])
    (out.parent / "export_stdout.txt").write_text(stdout.getvalue())
    (out.parent / "export_stderr.txt").write_text(stderr.getvalue())
    assert rc == 0, stderr.getvalue()
    return out


@pytest.fixture(scope="session")
def reference_predictor(checkpoint_path: Path):
    """The PyTorch oracle: SAM2ImagePredictor on the same checkpoint, built by the official loader."""
    import torch
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=str(checkpoint_path), device="cpu")
    return SAM2ImagePredictor(model)


@pytest.fixture(scope="session")
def sam2rt_model(model_dir: Path):
    from sam2rt.runtime import Sam2Model

    return Sam2Model.from_dir(model_dir, backend="onnxruntime-cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny stand-in model directory (SAM 2's names and shapes, none of its numerics); do not modify it."""
    from sam2rt.export.tiny_model import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model").directory


@pytest.fixture(scope="session")
def tiny_video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny stand-in with tiny video graphs too (export/tiny_video.py): a VideoTracker loads it; do not modify it."""
    from sam2rt.export.tiny_model import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_video") / "model", video=True).directory


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    from sam2rt.runtime import Sam2Model

    return Sam2Model.from_dir(tiny_model_dir, backend="onnxruntime-cpu")


def photo(name: str) -> np.ndarray:
    """Real photographs shipped with scikit-image, as RGB uint8 (several sizes and aspect ratios)."""
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])
