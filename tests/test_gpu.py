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


# --- ONNX Runtime CUDA / TensorRT providers: the device path and its precision modes -----------------------
CUDA_REASON = _ort_skip_reason("CUDAExecutionProvider")
requires_ort_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=CUDA_REASON or "")
FP32_DEVICE_LOGIT_ATOL = 1e-5  # onnxruntime-cuda:fp32 (TF32 off) against the CPU
TF32_LOGIT_ATOL = 2e-3
FP16_LOGIT_MEAN_ATOL = 0.05
FP16_SAME_CHOICE = 0.95
FP16_MAX_FLIPPED = 0.01  # of the pixels where the FP32 logit's magnitude exceeds 0.5


def _ort_trt_reason() -> str | None:
    reason = _ort_skip_reason("TensorrtExecutionProvider")
    if reason is None:
        from sam2rt.runtime.backends.ort_device_backend import tensorrt_libraries_status

        reason = tensorrt_libraries_status()
    return reason


@pytest.fixture(scope="module")
def cuda_models(model_dir):
    if CUDA_REASON is not None:
        pytest.skip(CUDA_REASON)
    from sam2rt.runtime import Sam2Model

    models = {mode: Sam2Model.from_dir(model_dir, backend=f"onnxruntime-cuda:{mode}") for mode in ("fp32", "tf32", "fp16")}
    yield models
    for m in models.values():
        m.close()


@requires_ort_cuda
@pytest.mark.parametrize("hw", [(512, 512), (300, 200), (1080, 1920), (1920, 1080), (2000, 3000)])
def test_device_preprocessing_equals_numpy(cuda_models, hw):
    from sam2rt.runtime.preprocess import preprocess

    img = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), np.uint8)
    model = cuda_models["tf32"]  # the preprocessing sessions run TF32-off in every mode
    got = model.backend.preprocess(img, model.image_size).to_host()
    diff = float(np.abs(got - preprocess(img, model.image_size)).max())
    assert diff <= 1e-5, f"device preprocessing differs from numpy by {diff:.2e} at {hw}"


@requires_ort_cuda
@pytest.mark.parametrize("multimask", [True, False])
def test_device_postprocessing_equals_host(cuda_models, multimask):
    from sam2rt.runtime.backends import Backend, MaskRequest

    rng = np.random.default_rng(3)
    low = (rng.standard_normal((6, 4, 256, 256)) * 3).astype(np.float32)
    low[1, 0] = 8.0  # a stable single-mask token: kept
    iou = rng.random((6, 4)).astype(np.float32)
    backend = cuda_models["fp32"].backend
    for threshold, float_masks in ((0.0, False), (0.0, True), (None, False)):
        request = MaskRequest(multimask, (1080, 1920), threshold, float_masks)
        got, ref = backend.postprocess(low, iou, request), Backend.postprocess(backend, low, iou, request)
        np.testing.assert_array_equal(got.scores, ref.scores)
        np.testing.assert_array_equal(got.low_res_logits, ref.low_res_logits)
        assert got.masks.dtype == ref.masks.dtype and got.masks.shape == ref.masks.shape
        if threshold is None:
            assert np.abs(got.masks - ref.masks).max() <= 1e-5
        else:
            mismatched = float((got.masks != ref.masks).mean())
            assert mismatched <= 1e-6, f"{mismatched:.2e} of the pixels differ from the host path"


def _mode_outputs(model, cpu_model, image_name):
    img = photo(image_name)
    prompts = parity_prompts(*img.shape[:2])
    emb, ref_emb = model.embed(img), cpu_model.embed(img)
    return model.decode(emb, prompts), cpu_model.decode(ref_emb, prompts)


@requires_ort_cuda
@pytest.mark.parametrize("image_name", IMAGES)
def test_fp32_mode_equals_cpu(cuda_models, cpu_model, image_name):
    got, ref = _mode_outputs(cuda_models["fp32"], cpu_model, image_name)
    diff = float(np.abs(got.low_res_logits - ref.low_res_logits).max())
    assert diff <= FP32_DEVICE_LOGIT_ATOL, f"fp32 (TF32 off) logits differ from the CPU by {diff:.2e}"
    assert mask_iou(got.masks, ref.masks).min() >= FP32_MIN_IOU


@requires_ort_cuda
@pytest.mark.parametrize("image_name", IMAGES)
def test_tf32_mode_within_bound(cuda_models, cpu_model, image_name):
    got, ref = _mode_outputs(cuda_models["tf32"], cpu_model, image_name)
    diff = float(np.abs(got.low_res_logits - ref.low_res_logits).max())
    assert diff <= TF32_LOGIT_ATOL, f"tf32 logits differ from the CPU by {diff:.2e}"


@requires_ort_cuda
@pytest.mark.parametrize("image_name", IMAGES)
def test_fp16_mode_within_bounds(cuda_models, cpu_model, image_name):
    got, ref = _mode_outputs(cuda_models["fp16"], cpu_model, image_name)
    mean_abs = float(np.abs(got.low_res_logits - ref.low_res_logits).mean())
    assert mean_abs <= FP16_LOGIT_MEAN_ATOL, f"fp16 low-res logits differ by {mean_abs:.4f} on average"
    assert np.abs(got.scores - ref.scores).max() <= FP16_SCORE_ATOL
    same = float((np.argmax(got.scores, 1) == np.argmax(ref.scores, 1)).mean())
    assert same >= FP16_SAME_CHOICE, f"fp16 picks another multimask token for {1 - same:.0%} of the prompts"
    strong = np.abs(ref.low_res_logits) > 0.5
    flipped = float(((got.low_res_logits > 0) != (ref.low_res_logits > 0))[strong].mean())
    assert flipped <= FP16_MAX_FLIPPED, f"fp16 flips {flipped:.2%} of the confident pixels"


@requires_ort_cuda
@pytest.mark.parametrize("kernel", ["efficient", "math"])
def test_attention_kernel_choice_changes_no_result(model_dir, cuda_models, monkeypatch, kernel):
    """SAM2RT_CUDA_ATTENTION reaches the CUDA provider (its `sdpa_kernel`) and computes what ONNX Runtime's own
    choice computes, to FP16's rounding."""
    from sam2rt.runtime import Sam2Model
    from sam2rt.runtime.backends.onnxruntime_backend import SDPA_KERNELS

    monkeypatch.setenv("SAM2RT_CUDA_ATTENTION", kernel)
    model = Sam2Model.from_dir(model_dir, backend="onnxruntime-cuda:fp16")
    try:
        options = model.backend._session("encoder").get_provider_options()["CUDAExecutionProvider"]
        assert options.get("sdpa_kernel") == str(SDPA_KERNELS[kernel]), options
        img = photo("coffee")
        prompts = parity_prompts(*img.shape[:2])
        got, ref = model.decode(model.embed(img), prompts), cuda_models["fp16"].decode(cuda_models["fp16"].embed(img), prompts)
    finally:
        model.close()
    mean_abs = float(np.abs(got.low_res_logits - ref.low_res_logits).mean())
    assert mean_abs <= 0.01, f"{kernel} attention moves the low-res logits by {mean_abs:.4f} on average"
    assert mask_iou(got.masks, ref.masks).min() >= FP16_MIN_IOU


@requires_ort_cuda
def test_cuda_embedding_round_trips_through_the_host(cuda_models):
    from sam2rt.runtime.backends.onnxruntime_backend import OrtDeviceTensor

    model = cuda_models["fp32"]
    img = photo("coffee")
    emb = model.embed(img)
    assert emb.device == "cuda:0" and all(isinstance(v, OrtDeviceTensor) for v in emb.features.values())
    assert "cuda" in emb.features["image_embed"].device.lower()
    prompts = parity_prompts(*img.shape[:2])
    got = model.decode(emb, prompts)
    host = emb.to_host()
    for other in (model.decode(host, prompts), model.decode(host.to_device(model), prompts)):
        np.testing.assert_array_equal(other.masks, got.masks)
        np.testing.assert_allclose(other.low_res_logits, got.low_res_logits, rtol=0, atol=1e-6)


@requires_ort_cuda
def test_cuda_graphs_are_captured_and_change_nothing(model_dir, cuda_models):
    from sam2rt.runtime import Prompt, Sam2Model

    model = cuda_models["fp32"]  # the same graphs as a fresh backend without CUDA graphs: same outputs
    img = photo("astronaut")
    one = Prompt(points=np.array([[200.0, 150.0]]), labels=np.array([1]))
    boxes = [Prompt(box=np.array([10.0 + i, 20.0, 300.0, 400.0 - i])) for i in range(16)]
    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER

    emb = model.embed(img)
    results = [model.decode(emb, one), model.decode(emb, boxes)]
    replays = model.backend._pipeline.replays
    for _ in range(CAPTURE_AFTER + 2):  # replays, the pre/postprocessing's included
        again = [model.decode(model.embed(img), one), model.decode(emb, boxes)]
    graphs = model.backend.cuda_graphs
    assert graphs.get("encoder") == "captured", f"the encoder did not run as a CUDA graph: {graphs}"
    pipeline = model.backend.pipeline_graphs
    # the image's size; one click and 16 boxes, multimask, each decoded to masks by the merged decode graph
    for graph in ("preprocess", "decode_multi"):
        assert set(pipeline[graph].values()) == {"captured"}, (graph, pipeline[graph])
    assert model.backend._pipeline.replays > replays
    if model.backend._pipeline.pinned is not None:  # cuda-python installed: 16 x 3 masks (>= 1 MiB) come down pinned
        from test_pinned_results import _pinned

        assert _pinned(again[1].masks)
    from sam2rt.manifest import Manifest
    from sam2rt.runtime.backends import OrtDeviceBackend

    m = Manifest.load(model_dir)
    with Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cuda", precision="fp32", cuda_graphs=False)) as plain:
        pe = plain.embed(img)
        for got, ref in zip(again, [plain.decode(pe, one), plain.decode(pe, boxes)]):
            np.testing.assert_allclose(got.low_res_logits, ref.low_res_logits, rtol=0, atol=1e-5)
    # the first decodes ran before any capture, on the plain sessions' kernels: in FP32 they round differently from
    # the replays by ~1e-7, which flips a pixel only where the upsampled logit is that close to 0 (H200 run 7: 2 of
    # 12.6M pixels of the 16 boxes). The logits agree as above; the masks may differ in such pixels alone.
    for a, b in zip(results, again):
        np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, rtol=0, atol=1e-5)
        assert np.count_nonzero(a.masks != b.masks) <= 1e-6 * a.masks.size, np.count_nonzero(a.masks != b.masks)


@requires_ort_cuda
def test_fast_decoder_runs_on_cuda(cuda_models, cpu_model):
    """decoder_fast.device.onnx (the fast decoder without the broadcast MatMul ONNX Runtime's CUDA provider gets
    wrong: export/cuda_matmul.py) passes the load-time probe on CUDA, serves one click and 16 boxes in one run,
    and equals the CPU."""
    from sam2rt.runtime import Prompt

    model = cuda_models["fp32"]
    check = model.backend.fast_decoder_check
    assert check.startswith("on"), f"the fast decoder was turned off on CUDA: {check}"
    assert model.backend.files["decoder_fast"]["file"] == "decoder_fast.device.onnx"
    img = photo("astronaut")
    one = Prompt(points=np.array([[200.0, 150.0], [260.0, 90.0]]), labels=np.array([1, 0]))
    emb, ref_emb = model.embed(img), cpu_model.embed(img)
    for _ in range(3):  # the first run, the capture, a replay
        got = model.decode(emb, one)
        np.testing.assert_allclose(got.low_res_logits, cpu_model.decode(ref_emb, one).low_res_logits, rtol=0, atol=1e-4)
    # decoded to masks in one graph, the fast decoder's and the postprocessing's (export/decode_graphs.py)
    assert model.backend.merged_decode == "on", model.backend.merged_decode
    assert "captured" in model.backend.pipeline_graphs["decode_multi"].values(), model.backend.pipeline_graphs
    h, w = img.shape[:2]
    boxes = [Prompt(box=np.array([10.0 * i, 5.0 * i, w / 2 + 10.0 * i, h / 2 + 8.0 * i])) for i in range(16)]
    ref = cpu_model.decode(ref_emb, boxes, multimask_output=False)
    for _ in range(3):
        got = model.decode(emb, boxes, multimask_output=False)
        np.testing.assert_allclose(got.low_res_logits, ref.low_res_logits, rtol=0, atol=1e-4)
    assert "captured" in model.backend.pipeline_graphs["decode_single"].values(), model.backend.pipeline_graphs


@requires_ort_cuda
@pytest.mark.parametrize("mode", ["fp32", "tf32", "fp16"])
def test_merged_decode_on_cuda_equals_the_two_graphs(cuda_models, mode):
    """One click (three masks) and 16 boxes (one mask each) decoded to masks by the merged decode graph's CUDA graph
    and by the decoder's and the postprocessing's: the same logits to rounding (the merged session may fuse the
    decoder part otherwise), masks differing at no more than MERGED_MASK_FLIPS of the pixels. In fp16 the same holds
    of the FP32 merged graphs, and their FP16 copies (fp16's default) stay within FP16's rounding of them."""
    from sam2rt.runtime import Prompt
    from sam2rt.runtime.backends.ort_device_backend import MERGED_MASK_FLIPS

    model = cuda_models[mode]
    backend = model.backend
    assert backend.merged_decode == "on", backend.merged_decode
    assert backend.use_fp16_decoder == (mode == "fp16"), backend.files
    img = photo("astronaut")
    h, w = img.shape[:2]
    one = Prompt(points=np.array([[200.0, 150.0]]), labels=np.array([1]))
    boxes = [Prompt(box=np.array([10.0 * i, 5.0 * i, w / 2 + 10.0 * i, h / 2 + 8.0 * i])) for i in range(16)]
    emb = model.embed(img)
    out = {}
    try:
        for case in ("merged", "two graphs", "merged fp16"):
            backend.use_merged_decode = case != "two graphs"
            backend.use_fp16_decoder = case == "merged fp16"
            if case == "merged fp16" and mode != "fp16":
                break
            for _ in range(6):  # captures, then replays (the postprocessing's after CAPTURE_AFTER calls)
                got = [model.decode(emb, one), model.decode(emb, boxes, multimask_output=False)]
            out[case] = got
    finally:
        backend.use_merged_decode, backend.use_fp16_decoder = True, mode == "fp16"
    tol = 1e-5 if mode == "fp32" else 2e-3
    for a, b in zip(out["merged"], out["two graphs"]):
        scale = max(1.0, float(np.abs(b.low_res_logits).max()))
        assert np.abs(a.low_res_logits - b.low_res_logits).max() <= tol * scale
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=tol * scale)
        assert (a.masks != b.masks).mean() <= MERGED_MASK_FLIPS
    pipeline = backend.pipeline_graphs
    assert "captured" in pipeline["decode_multi"].values() and "captured" in pipeline["decode_single"].values(), pipeline
    if mode == "fp16":  # the FP16 decoder against the FP32 one (the export's check bounds it the same way)
        for a, b in zip(out["merged fp16"], out["merged"]):
            assert np.abs(a.low_res_logits - b.low_res_logits).mean() <= 0.01
            assert np.abs(a.scores - b.scores).max() <= 0.02
            assert (a.masks != b.masks).mean() <= 0.01
        assert "captured" in pipeline["decode_multi_fp16"].values(), pipeline
        assert "captured" in pipeline["decode_single_fp16"].values(), pipeline


@requires_ort_cuda
def test_memory_bank_rounds_on_cuda_as_torch_does(model_dir):
    """The bank's bfloat16 rounding of a memory on the GPU (ONNX Runtime's CUDA Cast) equals torch's bit for bit, ties
    included, and the stored memory is gathered from the bank without an upload."""
    import onnxruntime as ort

    from sam2rt.manifest import Manifest
    from sam2rt.runtime.backends.onnxruntime_backend import OrtDeviceTensor
    from sam2rt.runtime.video.graphs import VideoGraphs
    from sam2rt.runtime.video.memory import to_bf16_bits

    graphs = VideoGraphs(Manifest.load(model_dir), "onnxruntime-cuda")
    bank = graphs.new_bank()
    x = np.random.default_rng(0).standard_normal((1, *bank.entry_shape)).astype(np.float32)
    u = x.view(np.uint32)
    u[0, 0, :, :8] = (u[0, 0, :, :8] & 0xFFFF0000) | 0x8000  # exact ties: half to even
    kept = bank.store(OrtDeviceTensor(ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)))
    assert np.array_equal(to_bf16_bits(kept), to_bf16_bits(x[0]))
    np.testing.assert_array_equal(bank.gather([kept]).to_host()[0], kept)
    assert (bank.stores, bank.uploads) == (1, 0)


@requires_ort_cuda
def test_video_tracker_on_cuda_keeps_its_data_on_the_device(model_dir, cuda_models, monkeypatch):
    """The tracker on onnxruntime-cuda: features, memory-conditioned features and the memory bank stay on the GPU
    (none is brought to the host), and it tracks like the CPU tracker: fp32 within 1e-3 / IoU 0.999, fp16 within
    the FP16 video bounds (mean |logit diff| 0.05, IoU 0.98). The one exception: a new fixed-buffer session's first
    outputs are compared on the host with the plain session's, once per session and shape (fixed_shapes.py; GPU
    run 6 found those, and only those, brought down)."""
    from sam2rt.runtime import VideoTracker
    from sam2rt.runtime.backends.fixed_shapes import FixedShapeSession
    from sam2rt.runtime.backends.onnxruntime_backend import OrtDeviceTensor
    from sam2rt.runtime.video.graphs import VideoGraphs

    img = photo("astronaut")
    frames = [np.ascontiguousarray(img[10 + 4 * i: 250 + 4 * i, 20 + 5 * i: 340 + 5 * i]) for i in range(4)]
    prompt = {"points": [[160.0, 60.0]], "labels": [1]}
    cpu = VideoTracker.from_dir(model_dir, backend="onnxruntime-cpu", fill_hole_area=0)
    cpu.add_prompt(1, frame=frames[0], **prompt)
    ref = [(cpu.low_res_logits[1].copy(), m[1]) for _, m in cpu.propagate(frames[1:])]
    homed: list = []
    real = OrtDeviceTensor.to_host
    checking = [0]  # inside a new fixed-buffer session's one-time check
    make_fixed = FixedShapeSession._make_fixed

    def checked(self, *args):
        checking[0] += 1
        try:
            return make_fixed(self, *args)
        finally:
            checking[0] -= 1

    def recorded(self):
        if not checking[0]:
            homed.append(self.shape)
        return real(self)

    monkeypatch.setattr(FixedShapeSession, "_make_fixed", checked)
    for mode, logit_tol, min_iou in (("fp32", 1e-3, 0.999), ("fp16", None, 0.98)):
        model = cuda_models[mode]
        gpu = VideoTracker(model, VideoGraphs(model.manifest, model.backend_name, precision=mode), fill_hole_area=0)
        assert gpu.graphs.device == "cuda"
        gpu.add_prompt(1, frame=frames[0], **prompt)
        homed.clear()
        monkeypatch.setattr(OrtDeviceTensor, "to_host", recorded)
        got = [(gpu.low_res_logits[1].copy(), m[1]) for _, m in gpu.propagate(frames[1:])]
        monkeypatch.setattr(OrtDeviceTensor, "to_host", real)
        assert homed == [], f"{mode}: tensors brought to the host while tracking: {homed}"
        assert str(gpu._feats["image_embed"].device).lower().startswith("cuda")
        assert str(gpu.objects[1].pix_feat_with_mem.device).lower().startswith("cuda")
        for (a, ma), (b, mb) in zip(got, ref):
            diff = np.abs(a - b)
            if logit_tol is None:
                assert float(diff.mean()) <= FP16_LOGIT_MEAN_ATOL, (mode, float(diff.mean()))
            else:
                assert float(diff.max()) <= logit_tol, (mode, float(diff.max()))
            union = np.logical_or(ma, mb).sum()
            assert union == 0 or np.logical_and(ma, mb).sum() / union >= min_iou, mode


@requires_ort_cuda
@pytest.mark.parametrize("mode", ["tf32", "fp16"])
def test_video_graphs_replay_as_cuda_graphs_once_their_shapes_settle(cuda_models, mode):
    """24 tracked frames (the memory bank is full from frame 16): the memory attention, the tracking decoder and the
    memory encoder (the tracked frames' tracking form) are captured as CUDA graphs and replayed, and the results equal the same tracker's without them
    (tf32: logits within 1e-3, masks IoU >= 0.998; fp16: the FP16 logit bound, IoU >= 0.99). FP16 rounds differently
    in a session with fixed dimensions, and tracking feeds each frame's mask into the next frame's memory: on an H100
    (run 5) one frame's masks overlapped 0.998."""
    from sam2rt.runtime import VideoTracker
    from sam2rt.runtime.video.graphs import VideoGraphs

    img = photo("astronaut")
    frames = [np.ascontiguousarray(img[10 + 4 * i: 250 + 4 * i, 20 + 5 * i: 340 + 5 * i]) for i in range(24)]
    model = cuda_models[mode]
    runs = {}
    for fixed in (False, True):
        graphs = VideoGraphs(model.manifest, model.backend_name, precision=mode, fixed_buffers=fixed)
        tracker = VideoTracker(model, graphs, fill_hole_area=0)
        tracker.add_prompt(1, frame=frames[0], points=[[160.0, 60.0]], labels=[1])
        runs[fixed] = [(tracker.low_res_logits[1].copy(), m[1]) for _, m in tracker.propagate(frames[1:])]
    status = graphs.fixed_status
    assert graphs.tracking_decoder  # the export made the tracked frames' decoder: it runs in the tracking decoder's place
    for role in graphs.fixed_slots:
        assert set(status[role].values()) == {"captured"}, (role, status[role])
        assert graphs.sessions[role].replays > 0, role
    for (a, ma), (b, mb) in zip(runs[False], runs[True]):
        diff = np.abs(a - b)
        if mode == "fp16":
            assert float(diff.mean()) <= FP16_LOGIT_MEAN_ATOL
        else:
            assert float(diff.max()) <= 1e-3
        union = np.logical_or(ma, mb).sum()
        # tf32: 0.998 (GPU run 6, H100: one frame 0.99899 with every logit within 1e-3: random-weight masks have
        # pixels at the threshold, and each frame's mask goes into the next frame's memory)
        assert union == 0 or np.logical_and(ma, mb).sum() / union >= (0.99 if mode == "fp16" else 0.998), mode


@requires_ort_cuda
def test_video_prefetch_on_cuda_changes_nothing(cuda_models):
    """On the GPU the next frame's encoder runs on the prefetch thread beside this frame's tracking, and (background
    memory, the GPU's default) each tracked frame's memory encoding on the memory thread after its masks (other CUDA
    streams, each thread's first replay of a CUDA graph capturing it): the masks and logits are those of the same
    tracker with neither (logits within 1e-3, masks IoU >= 0.999: later runs may replay video graphs the first
    captured, which round within that)."""
    from sam2rt.runtime import VideoTracker
    from sam2rt.runtime.video.graphs import VideoGraphs

    img = photo("astronaut")
    frames = [np.ascontiguousarray(img[10 + 4 * i: 250 + 4 * i, 20 + 5 * i: 340 + 5 * i]) for i in range(10)]
    model = cuda_models["tf32"]
    tracker = VideoTracker(model, VideoGraphs(model.manifest, model.backend_name, precision="tf32"), fill_hole_area=0)
    assert tracker.prefetch_default and tracker.background_memory
    runs = {}
    for prefetch, background in ((False, False), (False, True), (True, True)):
        tracker.background_memory = background
        tracker.reset()
        tracker.add_prompt(1, frame=frames[0], points=[[160.0, 60.0]], labels=[1])
        tracker.add_prompt(2, box=[20.0, 20.0, 200.0, 180.0])
        runs[prefetch, background] = [({k: v.copy() for k, v in tracker.low_res_logits.items()}, m)
                                      for _, m in tracker.propagate(frames[1:], prefetch=prefetch)]
    tracker.close()
    want = runs.pop((False, False))
    for config, got in runs.items():
        assert len(got) == len(want) == len(frames) - 1
        for (la, ma), (lb, mb) in zip(want, got):
            for k in (1, 2):
                assert float(np.abs(la[k] - lb[k]).max()) <= 1e-3, (config, k)
                union = np.logical_or(ma[k], mb[k]).sum()
                assert union == 0 or np.logical_and(ma[k], mb[k]).sum() / union >= 0.999, (config, k)


@requires_ort_cuda
def test_no_onnxruntime_warnings_at_load(model_dir):
    import subprocess
    import sys

    code = (f"from sam2rt.runtime import Sam2Model; import numpy as np; m = Sam2Model.from_dir({str(model_dir)!r}, "
            "backend='onnxruntime-cuda:fp16'); m.embed(np.zeros((64, 64, 3), np.uint8))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    noise = [line for line in run.stderr.splitlines() if ":onnxruntime:" in line]
    assert not noise, "ONNX Runtime printed warnings at load:\n" + "\n".join(noise[:5])


@pytest.mark.skipif(_ort_trt_reason() is not None, reason=_ort_trt_reason() or "")
def test_onnxruntime_tensorrt_matches_cpu(model_dir, cpu_model, tmp_path):
    from sam2rt.runtime import Sam2Model

    d = Path(shutil.copytree(model_dir, tmp_path / "m"))  # the TensorRT provider writes its engine cache here
    model = Sam2Model.from_dir(d, backend="onnxruntime-tensorrt")
    img = photo("coffee")
    prompts = parity_prompts(*img.shape[:2])
    got, ref = model.decode(model.embed(img), prompts), cpu_model.decode(cpu_model.embed(img), prompts)
    assert np.abs(got.low_res_logits - ref.low_res_logits).max() <= FP32_LOGIT_ATOL
    assert mask_iou(got.masks, ref.masks).min() >= FP32_MIN_IOU
