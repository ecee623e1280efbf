"""GPU tests: TensorRT engines and the ONNX Runtime CUDA / TensorRT providers against ONNX Runtime CPU.

Marked `gpu`; each test skips with the reason when its GPU stack is missing (CI has no GPU), so they
are counted as skipped, never as passed. On a GPU machine (`pytest -m gpu -rs`) they build FP32 and
FP16 engines for the random-weight hiera_tiny export of conftest and check:

- FP32 engines: low-res logits max abs diff <= 1e-3 and mask IoU >= 0.999 against ONNX Runtime CPU;
- FP16 engines: mask IoU >= 0.98 for every prompt of the parity set, scores within 0.02;
- an embedding kept on the GPU and the same embedding moved to the host (and back) give the same masks;
- engines are refused on a GPU / TensorRT version they were not built for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import photo

pytestmark = pytest.mark.gpu

FP32_LOGIT_ATOL = 1e-3
FP32_MIN_IOU = 0.999
FP16_MIN_IOU = 0.98
FP16_SCORE_ATOL = 0.02


def _trt_skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'sam2rt[trt]'; on Jetson it comes with JetPack)"
    from sam2rt.runtime.gpu import cuda_status

    status = cuda_status()
    return None if status == "available" else f"no CUDA GPU for TensorRT: {status}"


def _ort_skip_reason(provider: str) -> str | None:
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return f"onnxruntime lacks {provider} (install onnxruntime-gpu; on Jetson NVIDIA's wheel for your JetPack)"
    try:
        from sam2rt.runtime.gpu import cuda_status

        status = cuda_status()
    except Exception as exc:  # pragma: no cover
        status = f"unavailable: {exc}"
    return None if status == "available" else f"no CUDA GPU: {status}"


TRT_REASON = _trt_skip_reason()
requires_trt = pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")


# --- the parity set ---------------------------------------------------------------------------------
def parity_prompts(h: int, w: int) -> list:
    """Points, negative points, boxes, box + point: spread over the image."""
    from sam2rt.runtime import Prompt

    rng = np.random.default_rng(7)
    prompts = []
    for _ in range(6):
        prompts.append(Prompt(points=np.array([[rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h]]), labels=np.array([1])))
    prompts.append(Prompt(points=np.array([[0.5 * w, 0.5 * h], [0.2 * w, 0.3 * h]]), labels=np.array([1, 0])))
    prompts.append(Prompt(points=np.array([[0.3 * w, 0.6 * h], [0.35 * w, 0.65 * h], [0.8 * w, 0.2 * h]]), labels=np.array([1, 1, 0])))
    for _ in range(6):
        x0, y0 = rng.uniform(0, 0.5) * w, rng.uniform(0, 0.5) * h
        prompts.append(Prompt(box=np.array([x0, y0, x0 + rng.uniform(0.2, 0.5) * w, y0 + rng.uniform(0.2, 0.5) * h])))
    prompts.append(Prompt(points=np.array([[0.5 * w, 0.4 * h]]), labels=np.array([1]), box=np.array([0.2 * w, 0.1 * h, 0.8 * w, 0.9 * h])))
    return prompts


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU over the last two axes (1.0 where both masks are empty)."""
    inter = (a & b).sum(axis=(-2, -1))
    union = (a | b).sum(axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


IMAGES = ("coffee", "astronaut")


# --- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_dir(model_dir, tmp_path_factory) -> Path:
    """A copy of the conftest export with FP32 and FP16 engines built on this GPU."""
    if TRT_REASON is not None:
        pytest.skip(TRT_REASON)
    from sam2rt.export.tensorrt_build import build_engines
    from sam2rt.manifest import Manifest

    d = Path(shutil.copytree(model_dir, tmp_path_factory.mktemp("engines") / "hiera_tiny"))
    for precision in ("fp32", "fp16"):
        build_engines(Manifest.load(d), precision, max_prompts=32, max_points=8, progress=True)
    return d


@pytest.fixture(scope="module")
def cpu_model(model_dir):
    from sam2rt.runtime import Sam2Model

    return Sam2Model.from_dir(model_dir, backend="onnxruntime-cpu")


@pytest.fixture(scope="module")
def trt32(engine_dir):
    from sam2rt.runtime import Sam2Model

    return Sam2Model.from_dir(engine_dir, backend="tensorrt:fp32")


@pytest.fixture(scope="module")
def trt16(engine_dir):
    from sam2rt.runtime import Sam2Model

    return Sam2Model.from_dir(engine_dir, backend="tensorrt:fp16")


def _compare(ref_model, model, image_name):
    img = photo(image_name)
    h, w = img.shape[:2]
    prompts = parity_prompts(h, w)
    ref_emb, emb = ref_model.embed(img), model.embed(img)
    ref = ref_model.decode(ref_emb, prompts, multimask_output=True)
    got = model.decode(emb, prompts, multimask_output=True)
    # the raw decoder outputs too: all four tokens, with and without a mask prompt
    coords = np.array([[[0.5 * 1024, 0.5 * 1024], [0, 0]]], np.float32)
    labels = np.array([[1, -1]], np.float32)
    ref_raw = ref_model.decode_raw(ref_emb, coords, labels, None)
    got_raw = model.decode_raw(emb, coords, labels, None)
    mask_in = np.clip(ref_raw[0][:, :1], -32, 32)
    ref_masked = ref_model.decode_raw(ref_emb, coords, labels, mask_in)
    got_masked = model.decode_raw(emb, coords, labels, mask_in)
    return ref, got, (ref_raw, ref_masked), (got_raw, got_masked)


# --- TensorRT: parity -------------------------------------------------------------------------------
@requires_trt
@pytest.mark.parametrize("image_name", IMAGES)
def test_tensorrt_fp32_matches_onnxruntime_cpu(cpu_model, trt32, image_name):
    ref, got, ref_raw, got_raw = _compare(cpu_model, trt32, image_name)
    diff = float(np.abs(got.low_res_logits - ref.low_res_logits).max())
    assert diff <= FP32_LOGIT_ATOL, f"low-res logits differ by up to {diff:.2e}"
    for (r_lr, r_iou), (g_lr, g_iou) in zip(ref_raw, got_raw):
        assert np.abs(g_lr - r_lr).max() <= FP32_LOGIT_ATOL
        assert np.abs(g_iou - r_iou).max() <= FP32_LOGIT_ATOL
    iou = mask_iou(got.masks, ref.masks)
    assert iou.min() >= FP32_MIN_IOU, f"mask IoU down to {iou.min():.5f} (prompt {np.unravel_index(iou.argmin(), iou.shape)})"
    assert np.abs(got.scores - ref.scores).max() <= FP32_LOGIT_ATOL


@requires_trt
@pytest.mark.parametrize("image_name", IMAGES)
def test_tensorrt_fp16_keeps_masks(cpu_model, trt16, image_name):
    ref, got, ref_raw, got_raw = _compare(cpu_model, trt16, image_name)
    iou = mask_iou(got.masks, ref.masks)
    worst = np.unravel_index(iou.argmin(), iou.shape)
    assert iou.min() >= FP16_MIN_IOU, f"FP16 mask IoU down to {iou.min():.4f} (prompt {worst[0]}, mask {worst[1]})"
    score_diff = float(np.abs(got.scores - ref.scores).max())
    assert score_diff <= FP16_SCORE_ATOL, f"FP16 scores differ by up to {score_diff:.4f}"
    for (r_lr, r_iou), (g_lr, g_iou) in zip(ref_raw, got_raw):
        assert mask_iou(g_lr > 0, r_lr > 0).min() >= FP16_MIN_IOU
        assert np.abs(g_iou - r_iou).max() <= FP16_SCORE_ATOL


@requires_trt
def test_fp16_manifest_lists_fp32_layers(engine_dir):
    entry = json.loads((engine_dir / "manifest.json").read_text())["engines"]["fp16"]
    for role in ("encoder", "decoder"):
        summary = entry[role]["fp32_summary"]
        assert summary.get("LayerNormalization", 0) > 0 and summary.get("Softmax", 0) > 0
        assert summary.get("MatMul feeding Softmax", 0) == summary["Softmax"]
    assert entry["tensorrt"] and entry["gpu"]["name"] and entry["gpu"]["compute_capability"]


# --- TensorRT: device-resident embeddings, CUDA graphs, batching --------------------------------------------
@requires_trt
def test_embedding_stays_on_device_and_moves_both_ways(trt32):
    from sam2rt.runtime.gpu import DeviceArray

    img = photo("coffee")
    emb = trt32.embed(img)
    assert emb.device == "cuda:0"
    assert all(isinstance(v, DeviceArray) for v in emb.features.values())
    assert emb.nbytes == 4 * (256 * 64 * 64 + 32 * 256 * 256 + 64 * 128 * 128)
    prompts = parity_prompts(*img.shape[:2])
    on_device = trt32.decode(emb, prompts)
    host = emb.to_host()
    assert host.device == "cpu" and all(isinstance(v, np.ndarray) for v in host.features.values())
    from_host = trt32.decode(host, prompts)
    back = host.to_device(trt32)
    assert back.device == "cuda:0" and isinstance(back.features["image_embed"], DeviceArray)
    round_trip = trt32.decode(back, prompts)
    for other in (from_host, round_trip):
        np.testing.assert_array_equal(other.masks, on_device.masks)
        np.testing.assert_array_equal(other.low_res_logits, on_device.low_res_logits)
        np.testing.assert_array_equal(other.scores, on_device.scores)


@requires_trt
def test_two_embeddings_do_not_mix(trt32, cpu_model):
    """The decoder's feature buffers follow whichever embedding is decoded (device-to-device copy on switch)."""
    a, b = photo("coffee"), photo("astronaut")
    ea, eb = trt32.embed(a), trt32.embed(b)
    from sam2rt.runtime import Prompt

    p = Prompt(points=np.array([[100.0, 100.0]]), labels=np.array([1]))
    ra1, rb, ra2 = trt32.decode(ea, p), trt32.decode(eb, p), trt32.decode(ea, p)
    np.testing.assert_array_equal(ra1.low_res_logits, ra2.low_res_logits)
    assert not np.array_equal(ra1.low_res_logits, rb.low_res_logits)
    ref_b = cpu_model.decode(cpu_model.embed(b), p)
    assert mask_iou(rb.masks, ref_b.masks).min() >= FP32_MIN_IOU


@requires_trt
def test_decoder_runs_as_cuda_graphs(trt32):
    from sam2rt.runtime import Prompt

    emb = trt32.embed(photo("coffee"))
    trt32.decode(emb, Prompt(points=np.array([[50.0, 60.0]]), labels=np.array([1])))
    trt32.decode(emb, [Prompt(box=np.array([10.0, 10.0, 200.0, 200.0 + i])) for i in range(16)])
    shapes = trt32.backend.captured_shapes
    assert shapes.get((1, 2)) is True, f"single-click decode not captured as a CUDA graph: {shapes}"
    assert shapes.get((16, 3)) is True, f"16-box decode (2 corners + padding) not captured as a CUDA graph: {shapes}"


@requires_trt
def test_batches_beyond_the_profile_are_split(trt32, cpu_model):
    from sam2rt.runtime import Prompt

    img = photo("astronaut")
    boxes = [Prompt(box=np.array([5.0 * i, 4.0 * i, 200.0 + 5 * i, 220.0 + 4 * i])) for i in range(40)]  # > max_prompts 32
    got = trt32.decode(trt32.embed(img), boxes)
    ref = cpu_model.decode(cpu_model.embed(img), boxes)
    assert got.masks.shape == ref.masks.shape
    assert mask_iou(got.masks, ref.masks).min() >= FP32_MIN_IOU


@requires_trt
def test_too_many_points_is_a_clear_error(trt32):
    from sam2rt.errors import InvalidPromptError
    from sam2rt.runtime import Prompt

    emb = trt32.embed(photo("coffee"))
    pts = np.stack([np.linspace(10, 300, 12), np.linspace(10, 200, 12)], axis=1)
    with pytest.raises(InvalidPromptError, match="--max-points"):
        trt32.decode(emb, Prompt(points=pts, labels=np.ones(12)))


@requires_trt
def test_predictor_on_tensorrt(engine_dir, cpu_model):
    from sam2rt import Predictor

    img = photo("coffee")
    p = Predictor.from_dir(engine_dir, backend="tensorrt:fp32")
    p.set_image(img)
    masks, scores, logits = p.predict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]))
    ref = Predictor(cpu_model)
    ref.set_image(img)
    rmasks, rscores, rlogits = ref.predict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]))
    assert masks.shape == rmasks.shape and np.abs(logits - rlogits).max() <= FP32_LOGIT_ATOL
    assert p.get_image_embedding().shape == (1, 256, 64, 64)


@requires_trt
def test_auto_picks_tensorrt_when_engines_exist(engine_dir):
    from sam2rt.runtime import Sam2Model

    model = Sam2Model.from_dir(engine_dir, backend="auto")
    assert model.backend_name == "tensorrt" and model.backend.precision == "fp16"


@requires_trt
def test_engine_for_another_gpu_is_refused_at_load(engine_dir, tmp_path):
    from sam2rt.errors import EngineMismatchError
    from sam2rt.runtime import Sam2Model

    d = Path(shutil.copytree(engine_dir, tmp_path / "foreign"))
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["engines"]["fp32"]["gpu"] = {"name": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"}
    manifest["engines"]["fp16"]["tensorrt"] = "9.9.9"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match="Jetson AGX Orin"):
        Sam2Model.from_dir(d, backend="tensorrt:fp32")
    with pytest.raises(EngineMismatchError, match="TensorRT 9.9.9"):
        Sam2Model.from_dir(d, backend="tensorrt:fp16")
    assert Sam2Model.from_dir(d, backend="auto").backend_name != "tensorrt"


# --- ONNX Runtime CUDA / TensorRT providers ----------------------------------------------------------------
def _ort_case(backend: str, provider: str):
    reason = _ort_skip_reason(provider)
    return pytest.param(backend, marks=pytest.mark.skipif(reason is not None, reason=reason or ""), id=backend)


@pytest.mark.parametrize("backend", [_ort_case("onnxruntime-cuda", "CUDAExecutionProvider"),
                                     _ort_case("onnxruntime-tensorrt", "TensorrtExecutionProvider")])
def test_onnxruntime_gpu_providers_match_cpu(model_dir, cpu_model, backend, tmp_path):
    from sam2rt.runtime import Sam2Model
    from sam2rt.runtime.backends.onnxruntime_backend import OrtDeviceTensor

    d = Path(shutil.copytree(model_dir, tmp_path / "m"))  # the TensorRT provider writes its engine cache here
    model = Sam2Model.from_dir(d, backend=backend)
    img = photo("coffee")
    emb = model.embed(img)
    assert emb.device == "cuda:0" and all(isinstance(v, OrtDeviceTensor) for v in emb.features.values())
    assert "cuda" in emb.features["image_embed"].device.lower()
    prompts = parity_prompts(*img.shape[:2])
    got, ref = model.decode(emb, prompts), cpu_model.decode(cpu_model.embed(img), prompts)
    assert np.abs(got.low_res_logits - ref.low_res_logits).max() <= FP32_LOGIT_ATOL
    assert mask_iou(got.masks, ref.masks).min() >= FP32_MIN_IOU
    host = emb.to_host()
    np.testing.assert_array_equal(model.decode(host, prompts).masks, got.masks)
    np.testing.assert_array_equal(model.decode(host.to_device(model), prompts).masks, got.masks)
