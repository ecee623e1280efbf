"""Every bad input gets a typed Sam2rtError whose message says what was wrong (on the tiny stand-in model)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sam2rt.errors import (
    ImageNotSetError,
    InvalidEmbeddingError,
    InvalidImageError,
    InvalidPromptError,
    ManifestError,
    ModelFileError,
    Sam2rtError,
)
from sam2rt.manifest import sha256_file


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    from sam2rt import Predictor

    return Predictor.from_dir(tiny_model_dir, backend="onnxruntime-cpu")


@pytest.fixture(scope="module")
def image_predictor(tiny_model_dir):
    """A predictor with an image set, used only by tests that never call set_image."""
    from sam2rt import Predictor

    p = Predictor.from_dir(tiny_model_dir, backend="onnxruntime-cpu")
    p.set_image(np.zeros((100, 200, 3), np.uint8))
    return p


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_all_errors_share_one_root():
    for cls in (ImageNotSetError, InvalidImageError, InvalidPromptError, ManifestError, ModelFileError, InvalidEmbeddingError):
        assert issubclass(cls, Sam2rtError)


@pytest.mark.parametrize(
    "image, fragment",
    [
        (np.zeros((10, 10, 3), np.float32), "dtype must be uint8"),
        (np.zeros((10, 10), np.uint8), "shape (H, W, 3)"),
        (np.zeros((10, 10, 4), np.uint8), "3 channels"),
        (np.zeros((10, 10, 1), np.uint8), "3 channels"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        ("not an image", "uint8"),
    ],
)
def test_bad_images(predictor, image, fragment):
    with pytest.raises(InvalidImageError) as info:
        predictor.set_image(image)
    assert fragment in str(info.value)


def test_bad_color_order(predictor):
    with pytest.raises(InvalidImageError, match="color_order"):
        predictor.set_image(np.zeros((10, 10, 3), np.uint8), color_order="HSV")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(point_coords=np.array([[250.0, 50.0]]), point_labels=np.array([1])), "outside the image"),
        (dict(point_coords=np.array([[-1.0, 50.0]]), point_labels=np.array([1])), "outside the image"),
        (dict(point_coords=np.array([[np.nan, 50.0]]), point_labels=np.array([1])), "NaN or infinite"),
        (dict(point_coords=np.array([[10.0, np.inf]]), point_labels=np.array([1])), "NaN or infinite"),
        (dict(point_coords=np.array([[10.0, 50.0]]), point_labels=np.array([7])), "point_labels must be in"),
        (dict(point_coords=np.array([[10.0, 50.0]]), point_labels=np.array([0.5])), "point_labels must be in"),
        (dict(point_coords=np.array([[10.0, 50.0]])), "point_labels must be given"),
        (dict(point_coords=np.array([[10.0, 50.0], [1, 2]]), point_labels=np.array([1])), "does not match"),
        (dict(point_coords=np.array([10.0, 50.0, 3.0]), point_labels=np.array([1])), "shape (N, 2)"),
        (dict(box=np.array([100.0, 10.0, 50.0, 90.0])), "reversed"),
        (dict(box=np.array([10.0, 90.0, 50.0, 10.0])), "reversed"),
        (dict(box=np.array([10.0, 10.0, 50.0])), "shape (4,)"),
        (dict(box=np.array([10.0, 10.0, 500.0, 50.0])), "outside the image"),
        (dict(mask_input=np.zeros((1, 64, 64))), "mask_input must be"),
        (dict(point_coords=np.array([[0.5, 1.5]]), point_labels=np.array([1]), normalize_coords=False), "outside the image"),
        (dict(box=np.array([[0, 0, 10, 10], [0, 0, 20, 20]]), point_coords=np.array([[[1.0, 1.0]]] * 3), point_labels=np.ones((3, 1))),
         "cannot be combined"),
    ],
)
def test_bad_prompts(image_predictor, kwargs, fragment):
    with pytest.raises(InvalidPromptError) as info:
        image_predictor.predict(**kwargs)
    assert fragment in str(info.value)


def test_predict_before_set_image(tiny_model_dir):
    from sam2rt import Predictor

    p = Predictor.from_dir(tiny_model_dir, backend="onnxruntime-cpu")
    with pytest.raises(ImageNotSetError, match="set_image"):
        p.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))


def test_empty_prompt_to_decode(tiny_model):
    from sam2rt.runtime import Prompt

    emb = tiny_model.embed(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InvalidPromptError, match="at least one point"):
        tiny_model.decode(emb, Prompt())
    with pytest.raises(InvalidPromptError, match="at least one Prompt"):
        tiny_model.decode(emb, [])


def test_missing_model_dir(tmp_path):
    from sam2rt.runtime import Sam2Model

    with pytest.raises(ModelFileError, match="does not exist"):
        Sam2Model.from_dir(tmp_path / "nope")
    with pytest.raises(ManifestError, match="manifest.json is missing"):
        Sam2Model.from_dir(tmp_path)


def test_missing_graph(model_copy):
    from sam2rt.runtime import Sam2Model

    (model_copy / "decoder.onnx").unlink()
    with pytest.raises(ModelFileError, match="decoder.onnx is missing"):
        Sam2Model.from_dir(model_copy)


def test_manifest_not_matching_graph(model_copy):
    from sam2rt.runtime import Sam2Model

    with open(model_copy / "encoder.onnx", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(ManifestError, match="does not match manifest.json"):
        Sam2Model.from_dir(model_copy)


def test_corrupt_graph_with_matching_manifest(model_copy):
    """A graph that is garbage (and the manifest updated to its hash) fails to load with ModelFileError."""
    from sam2rt.runtime import Sam2Model

    path = model_copy / "decoder.onnx"
    path.write_bytes(b"\x00garbage" * 100)
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["graphs"]["decoder"]["sha256"] = sha256_file(path)
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="could not be loaded by onnxruntime"):
        Sam2Model.from_dir(model_copy, backend="onnxruntime-cpu")


def test_corrupt_manifest(model_copy):
    from sam2rt.runtime import Sam2Model

    (model_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Sam2Model.from_dir(model_copy)
    (model_copy / "manifest.json").write_text('{"hello": 1}')
    with pytest.raises(ManifestError, match="not a sam2rt manifest"):
        Sam2Model.from_dir(model_copy)


def test_unknown_backend(tiny_model_dir):
    from sam2rt.errors import BackendUnavailableError
    from sam2rt.runtime import Sam2Model

    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        Sam2Model.from_dir(tiny_model_dir, backend="magic")


def test_embedding_from_other_model_and_bad_file(tiny_model, tmp_path):
    from sam2rt.runtime import Embedding, Prompt

    emb = tiny_model.embed(np.zeros((40, 50, 3), np.uint8))
    path = emb.save(tmp_path / "e.npz")
    back = Embedding.load(path)
    assert back.original_size == (40, 50)
    a = tiny_model.decode(emb, Prompt(box=np.array([1, 1, 30, 30])))
    b = tiny_model.decode(back, Prompt(box=np.array([1, 1, 30, 30])))
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)
    back.model_key = "another-model"
    with pytest.raises(InvalidEmbeddingError, match="another model"):
        tiny_model.decode(back, Prompt(box=np.array([1, 1, 30, 30])))
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(InvalidEmbeddingError, match="not a sam2rt embedding"):
        Embedding.load(tmp_path / "bad.npz")
