"""The device path's graphs and the backend contract, on the CPU (CI has no GPU; tests/test_gpu.py runs them on one).

- the shipped pre/postprocessing graphs are exactly what their builders make, and on ONNX Runtime's CPU
  provider they equal the numpy path (preprocessing within 1e-5 at every size; postprocessing exactly);
- the Backend contract: close() is idempotent, `with` closes, a closed backend refuses work;
- the GPU backends' refusals: unknown precisions, a missing CUDA provider, TensorRT's libraries absent;
- the export's FP16 encoder variant is recorded and keeps LayerNorm in FP32.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sam2rt.errors import BackendUnavailableError
from sam2rt.manifest import Manifest
from sam2rt.runtime.backends import Backend, BackendClosedError, MaskRequest, TokenChoice, create_backend


@pytest.fixture(scope="module")
def pipeline():
    import onnxruntime as ort

    from sam2rt.runtime.backends.onnxruntime_backend import session_options
    from sam2rt.runtime.backends.ort_pipeline import OrtPipeline

    return OrtPipeline(ort, ["CPUExecutionProvider"], "cpu", 0, lambda: session_options(2))


class _HostOnly(Backend):
    """The base class's host postprocessing, nothing else."""

    name = "host"
    threads = 2

    def encode(self, image):  # pragma: no cover - not used
        raise NotImplementedError

    def decode(self, *args):  # pragma: no cover - not used
        raise NotImplementedError


def test_shipped_device_graphs_are_what_the_builders_make():
    from sam2rt.export.device_graphs import BUILDERS

    for path, build in BUILDERS.items():
        assert path.read_bytes() == build().SerializeToString(), f"{path.name} is stale: python -m sam2rt.export.device_graphs"


@pytest.mark.parametrize("hw", [(512, 512), (300, 200), (1080, 1920), (1920, 1080), (1024, 1024), (7, 3000)])
def test_preprocessing_graph_equals_numpy(pipeline, hw):
    from sam2rt.runtime.preprocess import preprocess

    img = np.random.default_rng(hw[1]).integers(0, 256, (*hw, 3), np.uint8)
    got = pipeline.preprocess(img, 1024).numpy()
    assert got.shape == (1, 3, 1024, 1024) and got.dtype == np.float32
    assert float(np.abs(got - preprocess(img, 1024)).max()) <= 1e-5


@pytest.mark.parametrize("n_in, n_out", [(1920, 1024), (3840, 1024), (200, 1024), (1024, 1024), (3, 1024), (1, 1024),
                                         (100, 90), (1000, 96)])
def test_resize_windows_hold_every_tap(n_in, n_out):
    """The block-banded windows are the antialiased resize's whole tap table: laid out densely they give the
    resize of a random signal (rows summing to 1), within bounds, and each block reads fewer inputs than all of
    them where the image is larger than a block's reach."""
    from sam2rt.runtime.preprocess import RESIZE_BLOCK, _resize_axis, resize_windows

    index, taps = resize_windows(n_in, n_out)
    g, b, length = taps.shape
    assert g * b == n_out and index.shape == (g, length) and b == (RESIZE_BLOCK if n_out % RESIZE_BLOCK == 0 else n_out)
    assert index.min() >= 0 and index.max() < n_in and np.all(np.diff(index, axis=1) == 1)  # contiguous windows
    dense = np.zeros((n_out, n_in))
    for k in range(g):
        dense[k * b : (k + 1) * b, index[k]] += taps[k]
    np.testing.assert_allclose(dense.sum(1), 1.0, atol=1e-5)
    x = np.random.default_rng(n_in).random((n_in, 1), np.float32)
    np.testing.assert_allclose(dense @ x, _resize_axis(x, n_out, axis=0), atol=1e-5)
    if n_in >= 1000 and b == RESIZE_BLOCK:
        assert length < n_in / 4, length  # banded: a block's window is a small part of the row


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("orig_hw", [(480, 640), (1080, 1920), (77, 100)])
def test_postprocessing_graph_equals_the_host_path(pipeline, multimask, orig_hw):
    rng = np.random.default_rng(orig_hw[0])
    low = (rng.standard_normal((5, 4, 256, 256)) * 3).astype(np.float32)
    low[1, 0] = 9.0  # stable single-mask token: kept
    low[2, 0, :128] = 0.02  # unstable one: replaced by the best multimask token
    low[3, 0, 10:20, 10:20] = 0.0  # exact zeros at the threshold
    iou = rng.random((5, 4)).astype(np.float32)
    iou[4, 1:] = 0.5  # a tie: the first multimask token wins, as numpy's argmax
    host = _HostOnly()
    for choice in (TokenChoice(), TokenChoice(dynamic_via_stability=False)):
        for threshold, float_masks in ((0.0, False), (0.0, True), (0.5, False), (None, False)):
            request = MaskRequest(multimask, orig_hw, threshold, float_masks, choice)
            got, ref = pipeline.postprocess(low, iou, request), host.postprocess(low, iou, request)
            for a, b in ((got.masks, ref.masks), (got.scores, ref.scores), (got.low_res_logits, ref.low_res_logits)):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(a, b)


def test_postprocessing_results_are_the_callers_own(pipeline):
    """Results are written straight into new host arrays (no second copy): a later call never overwrites them."""
    rng = np.random.default_rng(3)
    iou = rng.random((2, 4)).astype(np.float32)
    lows = [(rng.standard_normal((2, 4, 256, 256)) * 3).astype(np.float32) for _ in range(2)]
    for request in (MaskRequest(True, (120, 90), 0.0, float_masks=True), MaskRequest(False, (120, 90), 0.0)):
        first = pipeline.postprocess(lows[0], iou, request)
        kept = [a.copy() for a in (first.masks, first.scores, first.low_res_logits)]
        second = pipeline.postprocess(lows[1], iou, request)
        assert not np.array_equal(second.masks, kept[0])
        for a, b in zip((first.masks, first.scores, first.low_res_logits), kept):
            assert a.flags.owndata and a.flags.writeable
            np.testing.assert_array_equal(a, b)
    up = [pipeline.upsample_masks(low[:, :1], (120, 90), 0.0) for low in lows]
    assert up[0].dtype == np.bool_ and up[0].shape == (2, 1, 120, 90)
    np.testing.assert_array_equal(up[0], _HostOnly().upsample_masks(lows[0][:, :1], (120, 90), 0.0))
    assert not np.array_equal(up[0], up[1])


@pytest.fixture(scope="module")
def fixed_pipeline():
    """The pipeline with fixed buffers, as on a GPU (there each captured signature is one CUDA-graph replay)."""
    import onnxruntime as ort

    from sam2rt.runtime.backends.onnxruntime_backend import session_options
    from sam2rt.runtime.backends.ort_pipeline import OrtPipeline

    return OrtPipeline(ort, ["CPUExecutionProvider"], "cpu", 0, lambda: session_options(2), fixed_buffers=True)


def test_fixed_buffer_pipeline_equals_the_plain_one(pipeline, fixed_pipeline):
    """Every operation, at two image sizes used in turn and with every output choice, run past the point where its
    signature gets fixed buffers: the results equal the plain pipeline's exactly, each call's its own (a later
    replay never changes them), and the upsampling taps and resize matrices loaded once per signature are the
    right size's. A signature whose buffers would exceed the cap keeps running on the plain session."""
    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER

    rng = np.random.default_rng(5)
    sizes = [(120, 90), (61, 203)]
    requests = [MaskRequest(True, (0, 0), 0.0), MaskRequest(False, (0, 0), 0.0, float_masks=True),
                MaskRequest(False, (0, 0), None, choice=TokenChoice(dynamic_via_stability=False))]
    kept: list[tuple[np.ndarray, np.ndarray]] = []  # (a result, its copy when it was returned)
    for _ in range(CAPTURE_AFTER + 3):
        for hw in sizes:
            img = rng.integers(0, 256, (*hw, 3), np.uint8)
            got, ref = fixed_pipeline.preprocess(img, 64).numpy(), pipeline.preprocess(img, 64).numpy()
            np.testing.assert_array_equal(got, ref)
            kept.append((got, got.copy()))
            low = (rng.standard_normal((2, 4, 16, 16)) * 3).astype(np.float32)
            low[0, 0] = 9.0  # a stable single-mask token; the other prompt's tokens are noise: unstable
            iou = rng.random((2, 4)).astype(np.float32)
            for r in requests:
                request = MaskRequest(r.multimask_output, hw, r.threshold, r.float_masks, r.choice)
                got_m, ref_m = fixed_pipeline.postprocess(low, iou, request), pipeline.postprocess(low, iou, request)
                for a, b in ((got_m.masks, ref_m.masks), (got_m.scores, ref_m.scores),
                             (got_m.low_res_logits, ref_m.low_res_logits)):
                    assert a.dtype == b.dtype and a.shape == b.shape
                    np.testing.assert_array_equal(a, b)
                    kept.append((a, a.copy()))
            up = fixed_pipeline.upsample_masks(low[:, :1], hw, 0.0)
            np.testing.assert_array_equal(up, pipeline.upsample_masks(low[:, :1], hw, 0.0))
            kept.append((up, up.copy()))
    for result, copy in kept:
        np.testing.assert_array_equal(result, copy)
    status = fixed_pipeline.fixed_status
    assert set(status) == {"preprocess", "postprocess_single", "postprocess_multi", "upsample"}
    assert sum(len(v) for v in status.values()) == len(sizes) * (2 + len(requests)), status
    assert all(v == "fixed buffers" for graph in status.values() for v in graph.values()), status
    assert fixed_pipeline.replays >= len(sizes) * (2 + len(requests)) * 2

    import sam2rt.runtime.backends.ort_pipeline as ort_pipeline

    big = MaskRequest(True, (700, 800), 0.0, float_masks=True)  # 2 x 3 x 700 x 800 float32: 13 MB of outputs
    low, iou = low.copy(), iou.copy()
    cap = ort_pipeline.FIXED_BUFFER_BYTES
    try:
        ort_pipeline.FIXED_BUFFER_BYTES = 8 * 2**20
        fresh = type(fixed_pipeline)(fixed_pipeline._ort, ["CPUExecutionProvider"], "cpu", 0, fixed_pipeline._so,
                                     fixed_buffers=True)
        for _ in range(CAPTURE_AFTER + 1):
            np.testing.assert_array_equal(fresh.postprocess(low, iou, big).masks, pipeline.postprocess(low, iou, big).masks)
    finally:
        ort_pipeline.FIXED_BUFFER_BYTES = cap
    [why] = fresh.fixed_status["postprocess_multi"].values()
    assert why.startswith("not captured: its buffers would hold") and fresh.replays == 0, why


def test_copy_graph_copies_into_a_bound_buffer(pipeline):
    import onnxruntime as ort

    src = np.random.default_rng(0).random((2, 3, 4), np.float32)
    out = ort.OrtValue.ortvalue_from_shape_and_type([2, 3, 4], np.float32, "cpu", 0)
    assert pipeline.copy(pipeline.to_device(src), out) is out
    np.testing.assert_array_equal(out.numpy(), src)
    np.testing.assert_array_equal(pipeline.copy(pipeline.to_device(src[0])).numpy(), src[0])


def test_backend_close_is_idempotent_and_final(tiny_model_dir):
    from sam2rt.runtime import Sam2Model

    with Sam2Model.from_dir(tiny_model_dir, backend="onnxruntime-cpu") as model:
        emb = model.embed(np.zeros((32, 48, 3), np.uint8))
        backend = model.backend
        assert not backend.closed
    assert backend.closed
    backend.close()  # a second close is harmless
    with pytest.raises(BackendClosedError, match="closed"):
        model.embed(np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(BackendClosedError):
        backend.decode(emb.features, np.zeros((1, 1, 2), np.float32), np.ones((1, 1), np.float32),
                       np.zeros((1, 1, 256, 256), np.float32), np.zeros(1, np.float32))


def test_lane_threads_end_at_close(tiny_model_dir):
    import threading

    from sam2rt.runtime import Prompt, Sam2Model

    model = Sam2Model.from_dir(tiny_model_dir, backend="onnxruntime-cpu", threads=2)
    emb = model.embed(np.zeros((64, 64, 3), np.uint8))
    before = set(threading.enumerate())
    model.decode(emb, [Prompt(box=np.array([1.0, 2.0, 30.0, 40.0 + i])) for i in range(4)])  # lanes start
    lanes = [t for t in set(threading.enumerate()) - before if t.name.startswith("sam2rt-decode")]
    assert lanes, "a batch on two threads runs on lane threads"
    model.close()
    assert not any(t.is_alive() for t in lanes)


def test_gpu_backends_refuse_clearly_here(tiny_model_dir, monkeypatch):
    import onnxruntime as ort

    from sam2rt.runtime.backends import ort_device_backend

    m = Manifest.load(tiny_model_dir)
    with pytest.raises(BackendUnavailableError, match="fp32, tf32, fp16"):
        create_backend(m, "onnxruntime-cuda:bf16")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        create_backend(m, "onnxruntime-cuda:fp16")
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort_device_backend, "tensorrt_libraries_status",
                        lambda: "TensorRT libraries not found (libnvinfer could not be loaded)")
    with pytest.raises(BackendUnavailableError, match="TensorRT libraries not found"):
        create_backend(m, "onnxruntime-tensorrt")


def test_cpu_load_prints_no_onnxruntime_warnings(tiny_model_dir):
    code = ("import numpy as np; from sam2rt.runtime import Sam2Model, Prompt; "
            f"m = Sam2Model.from_dir({str(tiny_model_dir)!r}, backend='onnxruntime-cpu'); "
            "e = m.embed(np.zeros((40, 50, 3), np.uint8)); m.decode(e, Prompt(points=np.array([[5, 5]]), labels=np.array([1])))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert ":onnxruntime:" not in run.stderr, run.stderr[-2000:]


def test_export_records_the_fp16_encoder(model_dir):
    """The FP16 encoder is made from the GPU's encoder form (`device`), and only from it (no FP16 copy of the CPU's
    `fused` form beside it)."""
    import onnx

    m = Manifest.load(model_dir)
    entry = m.variant("encoder", "device_fp16")
    assert entry is not None and entry["source"] == "device" and entry["precision"] == "fp16"
    assert entry["derived_from_sha256"] == m.variant("encoder", "device")["sha256"]
    assert m.variant("encoder", "fp16") is None
    assert entry["file"] != "encoder.fp16.onnx"  # that name is build-engine's temporary TensorRT graph
    graph = onnx.load(str(m.verify_file(entry)), load_external_data=False).graph
    halves = sum(1 for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    assert halves > 50, "the FP16 encoder's weights are not FP16"
    # ONNX Runtime's LayerNormalization keeps FP32 statistics (stash_type) on FP16 tensors, and Max is exact in FP16:
    # neither sits in an FP32 island with casts around it (export/fp16.py, ORT_FP16_OP_TYPES)
    assert "LayerNormalization" not in entry["fp32_summary"] and "Max" not in entry["fp32_summary"]
    check = entry["check"]  # the activations on a real photo against FP16's range, at export (export/fp16_check.py)
    assert check["refused"] is None and check["tensors_measured"] > 500 and check["near_limit"] == 0, check
    assert 0 < check["largest"][0]["max_abs"] < 100, check  # random weights stay far inside FP16's range
    inits = {t.name: t for t in graph.initializer}
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in norms)
    assert all(a.i == onnx.TensorProto.FLOAT for n in norms for a in n.attribute if a.name == "stash_type")
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type in ("LayerNormalization", "Max"):
            for name in n.input:
                src = producer.get(name)
                assert src is None or src.op_type != "Cast", f"{n.name} is fed by a cast"
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # FP32 in and out
    from sam2rt.runtime.backends.ort_device_backend import device_graph_entries

    assert device_graph_entries(m, "fp16")["encoder"]["file"] == entry["file"]
    assert device_graph_entries(m, "tf32")["encoder"]["file"] == m.variant("encoder", "device")["file"] == "encoder.device.onnx"


def test_fp16_encoder_within_the_fp16_bounds_on_the_cpu_provider(model_dir, sam2rt_model):
    """encoder.device.fp16.onnx (LayerNorm and max pooling on FP16 tensors) run by ONNX Runtime's CPU provider: its
    features, through the FP32 decoder, keep the FP16 bounds of onnxruntime-cuda:fp16 against the FP32 encoder
    (mean |logit diff| <= 0.05, mask IoU >= 0.98) for clicks and boxes. The CUDA kernels are checked on a GPU
    (tests/test_gpu.py::test_fp16_mode_within_bounds)."""
    import onnxruntime as ort

    from conftest import photo
    from sam2rt.runtime.backends.onnxruntime_backend import session_options
    from sam2rt.runtime.preprocess import preprocess

    m = Manifest.load(model_dir)
    names = ("image_embed", "high_res_feats_0", "high_res_feats_1")
    x = preprocess(photo("coffee"), m.image_size)
    feats = {}
    for precision in ("fp32", "fp16"):
        entry = m.variant("encoder", "device" if precision == "fp32" else "device_fp16")
        session = ort.InferenceSession(str(m.verify_file(entry)), session_options(), providers=["CPUExecutionProvider"])
        feats[precision] = dict(zip(names, session.run(None, {"image": x})))
    rng = np.random.default_rng(1)
    clicks = np.concatenate([rng.uniform(50, 950, (4, 1, 2)), np.zeros((4, 1, 2))], axis=1)
    boxes = np.sort(rng.uniform(50, 950, (4, 2, 2)), axis=1)
    for coords, labels in ((clicks, [[1, -1]] * 4), (boxes, [[2, 3]] * 4)):
        coords, labels = coords.astype(np.float32), np.asarray(labels, np.float32)
        none = np.zeros((4, 1, 256, 256), np.float32), np.zeros((4,), np.float32)
        ref, _ = sam2rt_model.backend.decode(feats["fp32"], coords, labels, *none)
        got, _ = sam2rt_model.backend.decode(feats["fp16"], coords, labels, *none)
        assert float(np.abs(got - ref).mean()) <= 0.05
        for a, b in zip(got.reshape(-1, *got.shape[-2:]) > 0, ref.reshape(-1, *ref.shape[-2:]) > 0):
            union = np.logical_or(a, b).sum()
            assert union == 0 or np.logical_and(a, b).sum() / union >= 0.98


@pytest.mark.parametrize("fixed_buffers", [False, True], ids=["fresh-buffers", "fixed-buffers"])
def test_a_large_batch_is_decoded_in_bounded_runs(tiny_model_dir, monkeypatch, fixed_buffers):
    """The device backend decodes a batch larger than MAX_PROMPTS_PER_RUN in runs of at most that many (device memory
    stays bounded): the results, raw and postprocessed, plain prompts and mask prompts, are those of one run over the
    whole batch, in order; with fixed buffers the batch costs two shapes (the full run and the remainder)."""
    import sam2rt.runtime.backends.ort_device_backend as device
    from conftest import photo
    from sam2rt.runtime import Prompt, Sam2Model

    image = photo("coffee")
    h, w = image.shape[:2]
    rng = np.random.default_rng(5)
    prompts = [Prompt(points=rng.uniform(0, [w, h], size=(2, 2)), labels=np.array([1, 0])) for _ in range(6)]
    prompts += [Prompt(box=np.array([5.0 + 9 * i, 4.0, 120.0 + 9 * i, 150.0])) for i in range(4)]
    xy = rng.uniform(0, 1024, size=(10, 3, 2)).astype(np.float32)
    labels = np.tile(np.array([[1, 0, -1]], np.float32), (10, 1))
    m = Manifest.load(tiny_model_dir)

    def run(limit: int):
        monkeypatch.setattr(device, "MAX_PROMPTS_PER_RUN", limit)
        with Sam2Model(m, device.OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=fixed_buffers)) as model:
            emb = model.embed(image)
            out = [model.decode(emb, prompts, multimask_output=True) for _ in range(2)]  # the second from fixed buffers
            masked = [Prompt(points=p.points, labels=p.labels, mask_input=low[0]) if p.box is None else
                      Prompt(box=p.box, mask_input=low[0]) for p, low in zip(prompts, out[0].low_res_logits)]
            out.append(model.decode(emb, masked, multimask_output=False))
            raw = [model.decode_raw(emb, xy, labels, None), model.decode_raw(emb, xy, labels, out[0].low_res_logits[:, :1])]
            return out, raw, {k for k in model.backend._captured if isinstance(k, tuple)}

    whole, whole_raw, _ = run(64)
    parts, parts_raw, shapes = run(4)
    for got, ref in zip(parts, whole):
        assert got.masks.shape[0] == len(prompts)
        np.testing.assert_array_equal(got.masks, ref.masks)
        np.testing.assert_allclose(got.low_res_logits, ref.low_res_logits, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.scores, ref.scores, rtol=0, atol=1e-6)
    for got, ref in zip(parts_raw, whole_raw):
        for a, b in zip(got, ref):
            assert a.shape[0] == len(xy)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    if fixed_buffers:
        assert {b for _, b, _ in shapes} == {4, 2}, shapes


@pytest.mark.parametrize("failure", ["capture refused", "first run fails", "first run differs"])
def test_a_fixed_buffer_session_that_fails_leaves_the_plain_results(tiny_model_dir, monkeypatch, failure):
    """The encoder's and the decoders' fixed-buffer sessions (CUDA graphs on a GPU) can fail where CI cannot see it:
    ONNX Runtime may refuse to capture a graph, its first replay (where it captures) may raise, or a fixed-dimension
    session may compute something else. Each way, the caller gets the plain session's results (no error), the
    session is not used again, and `cuda_graphs` says why."""
    import sam2rt.runtime.backends.ort_device_backend as device
    from conftest import photo
    from sam2rt.runtime import Prompt, Sam2Model

    image = photo("coffee")
    prompts = [Prompt(points=np.array([[200.0, 150.0]]), labels=np.array([1]))]
    boxes = [Prompt(box=np.array([10.0 + 7 * i, 20.0, 150.0 + 7 * i, 180.0])) for i in range(3)]
    m = Manifest.load(tiny_model_dir)
    with Sam2Model(m, device.OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=False)) as plain:
        emb = plain.embed(image)
        want = [plain.decode(emb, p, multimask_output=True) for p in (prompts, boxes)]
        want_embed = {k: plain.backend.to_host(v) for k, v in emb.features.items()}

    class Refusing(device.OrtDeviceBackend):
        """Asks for CUDA graphs, and is refused them as the CUDA provider does where a node would run on the CPU."""

        use_cuda_graphs = property(lambda self: True, lambda self, value: None)

        def _new_session(self, slot, graph, dims=None):
            if graph:
                raise RuntimeError("This session cannot use the CUDA Graph feature: nodes are on the CPU")
            return super()._new_session(slot, graph, dims)

    replay = device.OrtDeviceBackend._replay
    if failure == "first run fails":
        seen: set[int] = set()

        def fail_first(fixed):
            if id(fixed) not in seen:
                seen.add(id(fixed))
                raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")
            replay(fixed)

        monkeypatch.setattr(device.OrtDeviceBackend, "_replay", staticmethod(fail_first))
    elif failure == "first run differs":
        def wrong(fixed):
            replay(fixed)
            if "low_res_masks" in fixed.outputs:  # a decoder whose fixed-dimension fusions compute something else
                low = fixed.outputs["low_res_masks"]
                low.update_inplace(low.numpy() + 1.0)

        monkeypatch.setattr(device.OrtDeviceBackend, "_replay", staticmethod(wrong))
    backend = (Refusing if failure == "capture refused" else device.OrtDeviceBackend)(m, "onnxruntime-cpu", fixed_buffers=True)
    backend.use_merged_decode = False  # the decoders' own fixed buffers (the merged graphs': test_decode_graphs.py)
    with Sam2Model(m, backend) as model:
        for _ in range(3):  # the first run of each shape makes its session, later ones use it (or not)
            emb = model.embed(image)
            for k, v in want_embed.items():
                np.testing.assert_array_equal(backend.to_host(emb.features[k]), v)
            for p, ref in zip((prompts, boxes), want):
                got = model.decode(emb, p, multimask_output=True)
                np.testing.assert_array_equal(got.masks, ref.masks)
                np.testing.assert_array_equal(got.low_res_logits, ref.low_res_logits)
                np.testing.assert_array_equal(got.scores, ref.scores)
        encoder_fixed, captured = backend._encoder_fixed, dict(backend._captured)  # close() drops them
    status = dict(backend.cuda_graphs)
    decoders = {k: v for k, v in status.items() if k != "encoder"}
    assert len(decoders) == 2, status  # the click's shape and the boxes' shape
    if failure == "capture refused":
        assert all(v.startswith("not captured: This session cannot use the CUDA Graph") for v in status.values()), status
        assert "encoder" in status and encoder_fixed is not None  # fixed buffers, without a graph
    elif failure == "first run fails":
        assert all(v.startswith("failed: RuntimeError: CUDA failure 900") for v in status.values()), status
        assert "encoder" in status and encoder_fixed is None
        assert not any(isinstance(k, tuple) for k in captured), captured
    else:
        assert all(v.startswith("rejected: the fixed-shape session differs") for v in decoders.values()), status


def test_runs_fit_the_tensorrt_providers_profiles():
    """On ONNX Runtime's TensorRT provider a run never holds more prompts than its decoder profiles' largest batch."""
    from sam2rt.runtime.backends.ort_device_backend import MAX_PROMPTS_PER_RUN, max_prompts_per_run
    from sam2rt.runtime.engines import decoder_profiles

    largest = max(p.shapes["point_coords"].max[0] for p in decoder_profiles())
    assert largest < MAX_PROMPTS_PER_RUN
    assert max_prompts_per_run("onnxruntime-tensorrt") == largest
    assert max_prompts_per_run("onnxruntime-cuda") == max_prompts_per_run("onnxruntime-cpu") == MAX_PROMPTS_PER_RUN


def test_cuda_attention_kernel_is_chosen_by_name(monkeypatch):
    """SAM2RT_CUDA_ATTENTION restricts the CUDA provider's MultiHeadAttention kernels (ONNX Runtime's `sdpa_kernel`
    mask); unset, ONNX Runtime chooses; a name ONNX Runtime does not know is refused with the choices."""
    from sam2rt.errors import BackendUnavailableError
    from sam2rt.runtime.backends.onnxruntime_backend import SDPA_KERNELS, cuda_provider_options

    monkeypatch.delenv("SAM2RT_CUDA_ATTENTION", raising=False)
    options = cuda_provider_options(3, tf32=False, graph=True)
    assert options == {"device_id": "3", "use_tf32": "0", "enable_cuda_graph": "1"}
    for name, mask in SDPA_KERNELS.items():
        monkeypatch.setenv("SAM2RT_CUDA_ATTENTION", name.upper())
        assert cuda_provider_options().get("sdpa_kernel") == (str(mask) if mask else None)
    assert cuda_provider_options(attention="math")["sdpa_kernel"] == "16"  # an explicit choice wins over the env
    monkeypatch.setenv("SAM2RT_CUDA_ATTENTION", "fastest")
    with pytest.raises(BackendUnavailableError, match="choose one of default, flash, efficient, cudnn, math"):
        cuda_provider_options()


def test_the_tf32_encoder_asks_for_the_kernel_measured_fastest(monkeypatch):
    """The TF32 encoder's sessions ask for the unfused attention kernel (the fastest on an H100, GPU run 5); FP16, FP32
    and the other graphs leave the choice to ONNX Runtime; SAM2RT_CUDA_ATTENTION, where set, decides for all."""
    from sam2rt.runtime.backends.onnxruntime_backend import attention_for, cuda_provider_options

    monkeypatch.delenv("SAM2RT_CUDA_ATTENTION", raising=False)
    assert cuda_provider_options(0, True, True, attention_for("encoder", "tf32"))["sdpa_kernel"] == "16"
    for role, precision in (("encoder", "fp16"), ("encoder", "fp32"), ("decoder_fast", "tf32"), ("decoder_nomask", "tf32")):
        assert "sdpa_kernel" not in cuda_provider_options(0, True, True, attention_for(role, precision)), (role, precision)
    monkeypatch.setenv("SAM2RT_CUDA_ATTENTION", "efficient")
    assert cuda_provider_options(0, True, True, attention_for("encoder", "tf32"))["sdpa_kernel"] == "2"


@pytest.mark.parametrize("fast_error", ["rounding", "half unwritten"])
def test_the_fast_decoder_probe_holds_rounding_to_the_logits_magnitude(tiny_model_dir, monkeypatch, fast_error):
    """The probe at load compares decoder_fast with decoder_nomask relative to the logits' magnitude: a trained model's
    logits reach tens, and TF32 rounding of two arrangements of one function differs in proportion (2e-3 of it here:
    0.2 on logits of 100, which an absolute bound of 1e-2 would call a broken decoder and turn the fast path off for
    good); half the output left unwritten, as ONNX Runtime's CUDA MatMul did in run 3, is still caught."""
    import onnxruntime as ort

    import sam2rt.runtime.backends.ort_device_backend as device

    run = device.OrtDeviceBackend._run_plain

    def trained_magnitudes(self, slot, tensors, prompts):
        low, iou = (np.array(v.numpy()) for v in run(self, slot, tensors, prompts))
        low = 100.0 * low / max(float(np.abs(low).max()), 1e-6)  # logits up to 100, as trained weights give
        if slot == "decoder_fast":
            if fast_error == "rounding":
                low = low * (1.0 + 2e-3)
            else:
                low[..., ::2] = 0.0
        return tuple(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x, np.float32)) for x in (low, iou))

    monkeypatch.setattr(device.OrtDeviceBackend, "_run_plain", trained_magnitudes)
    m = Manifest.load(tiny_model_dir)
    with device.OrtDeviceBackend(m, "onnxruntime-cpu") as backend:
        check = backend.fast_decoder_check
        kept = "decoder_fast" in backend.files
    if fast_error == "rounding":
        assert check.startswith("on: within 0.002") and kept, check
    else:
        assert check.startswith("off: on onnxruntime-cpu it differs from decoder_nomask by 1") and not kept, check


def _scaled_layernorm_encoder(path, factor: float) -> None:
    """A stand-in `fused` encoder: LayerNorm(image * factor * factor) over the last axis. Finite in FP32 for any
    factor; in FP16 the product overflows (inf, then NaN) once factor^2 x |image| passes 65504, as a trained model's
    large activations would."""
    import onnx
    from onnx import TensorProto, helper

    k = helper.make_tensor("k", TensorProto.FLOAT, [], [factor])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [1024], [1.0] * 1024)
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [1024], [0.0] * 1024)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["image", "k"], ["a"]), helper.make_node("Mul", ["a", "k"], ["b"]),
         helper.make_node("LayerNormalization", ["b", "scale", "bias"], ["image_embed"], axis=-1)],
        "stand_in", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 1024, 1024])],
        [helper.make_tensor_value_info("image_embed", TensorProto.FLOAT, [1, 3, 1024, 1024])], [k, scale, bias])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("factor", [3.0, 100.0, 300.0], ids=["within-range", "near-the-limit", "overflows"])
def test_the_export_refuses_an_fp16_encoder_these_weights_overflow(tiny_model_dir, tmp_path, factor):
    """The FP16 encoder is checked when it is made: the FP32 encoder's activations on a real photo against FP16's
    range, for every tensor the FP16 graph holds in FP16. Kept with the numbers where they fit; where one passes the
    range (which only real weights can show), not written, the manifest says why, the lean export lists it as
    refused, and asking for onnxruntime-cuda:fp16 says so."""
    import shutil

    from sam2rt.errors import GraphNotExportedError
    from sam2rt.export.optimize import add_fp16_encoder
    from sam2rt.export.targets import keep_only
    from sam2rt.manifest import sha256_file
    from sam2rt.runtime.backends.onnxruntime_backend import required_variant

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    m = Manifest.load(d)
    _scaled_layernorm_encoder(d / "encoder.fused.onnx", factor)
    entry = m.graph("encoder")
    entry["variants"]["fused"] = {"file": "encoder.fused.onnx", "sha256": sha256_file(d / "encoder.fused.onnx"),
                                  "derived_from_sha256": entry["sha256"]}
    entry["variants"].pop("device", None)  # the FP16 copy is then made from `fused`, as in exports before `device`
    if factor < 200:  # written; within 4x of the range (26400 here) it warns that other images may pass it
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            add_fp16_encoder(m)
        fp16 = m.variant("encoder", "fp16")
        check = fp16["check"]
        assert check["refused"] is None and check["largest"][0] == {"tensor": "b", "max_abs": pytest.approx(2.64 * factor ** 2, rel=1e-3)}
        assert (d / fp16["file"]).exists() and required_variant(m, "encoder", "fp16", "") is fp16
        near = [str(w.message) for w in caught if "come within 4x of FP16's range" in str(w.message)]
        assert (check["near_limit"], len(near)) == ((1, 1) if factor > 10 else (0, 0)), (check, near)
        return
    with pytest.warns(UserWarning, match="FP16 encoder is not usable with these weights"):
        add_fp16_encoder(m)
    fp16 = m.variant("encoder", "fp16")
    assert fp16["stored"] is False and not (d / fp16["file"]).exists()
    assert fp16["refused"] == "1 of its FP16 tensors pass FP16's range of 65504 on a photo, the largest b at 2.376e+05"
    assert fp16["check"]["largest"][0]["tensor"] == "b"
    with pytest.raises(GraphNotExportedError, match="the export refused it .1 of its FP16 tensors pass FP16's range"):
        required_variant(m, "encoder", "fp16", "")
    m.save()
    left_out = keep_only(Manifest.load(d), ["cpu", "cuda"]).data["export"]["left_out"]
    assert left_out[fp16["file"]].startswith("refused at export: 1 of its FP16 tensors"), left_out


def test_fp16_weights_are_kept_to_fp16s_range_and_checked_against_it(tmp_path):
    """A weight FP16 can hold (30000) goes into the FP16 graph unchanged (onnxconverter-common would clamp it to
    1e4 by default, a silently different model); one it cannot hold (1e5) makes the check refuse the encoder even
    where the activations stay small."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sam2rt.export.fp16 import convert_to_mixed_fp16
    from sam2rt.export.fp16_check import check_fp16_encoder

    for divisor, refused in ((3.0e4, False), (1.0e5, True)):
        graph = helper.make_graph(
            [helper.make_node("Div", ["image", "k"], ["image_embed"])], "divide",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 1024, 1024])],
            [helper.make_tensor_value_info("image_embed", TensorProto.FLOAT, [1, 3, 1024, 1024])],
            [helper.make_tensor("k", TensorProto.FLOAT, [], [divisor])])
        src, dst = tmp_path / f"d{divisor:g}.onnx", tmp_path / f"d{divisor:g}.fp16.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
        keep = convert_to_mixed_fp16(src, dst)
        check = check_fp16_encoder(src, keep)
        if refused:
            assert check["refused"] and "the largest k at 1e+05" in check["refused"], check
        else:
            k = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(dst)).graph.initializer}["k"]
            assert k.dtype == np.float16 and float(k) == 30000.0
            assert check["refused"] is None and check["largest"][0] == {"tensor": "k", "max_abs": 30000.0}, check


def test_the_fp16_range_check_frees_each_activation_as_it_goes(tmp_path):
    """The range check reduces every activation inside one run; each tensor must still be freed as soon as it is
    reduced, or a deep encoder holds all of them at once (hiera_large's export ran out of 24 GiB that way). A chain
    of 30 tensors of 64 MiB, measured in a fresh process: peak memory about one run's, not 30 tensors'."""
    import subprocess
    import sys
    import textwrap

    import onnx
    from onnx import TensorProto, helper

    n, size = 30, 16 * 2**20  # float32 elements: 64 MiB a tensor
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"t{i - 1}", "one"], [f"t{i}"]) for i in range(n)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
                              [helper.make_tensor_value_info(f"t{n - 1}", TensorProto.FLOAT, [size])],
                              [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "chain.onnx"))
    script = textwrap.dedent(f"""
        import resource, numpy as np, onnx
        from sam2rt.export.fp16_check import activation_magnitudes
        model = onnx.load({str(tmp_path / "chain.onnx")!r})
        x = np.zeros({size}, np.float32)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peaks = activation_magnitudes(model, [f"t{{i}}" for i in range({n})], x)
        assert peaks == {{f"t{{i}}": float(i + 1) for i in range({n})}}, peaks
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**10)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grown_mib = float(out.stdout.split()[-1])
    assert grown_mib < 10 * 64, f"the check held {grown_mib:.0f} MiB: the activations were not freed as they went"


def test_an_embedding_decodes_the_same_on_the_host_and_on_the_device(tiny_model_dir):
    """An embedding brought to the host (a cache, a file) and decoded on a GPU backend gives the masks and logits of
    the same embedding on the device, bit for bit: both decode with the fast decoder (H100 run 5: the host copy went
    through the mask-free decoder instead, and one pixel in 10.8 million flipped). The CPU provider stands in for
    the GPU here, with the backend's device renamed so that the host copy is not on it."""
    from conftest import photo
    from sam2rt.runtime import Prompt, Sam2Model
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend

    m = Manifest.load(tiny_model_dir)
    backend = OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=True)
    backend.device = "gpu-stand-in:0"
    prompts = [Prompt(points=np.array([[200.0, 150.0]]), labels=np.array([1])),
               Prompt(box=np.array([10.0, 20.0, 150.0, 180.0]))]
    slots: list[str] = []
    choose = backend._slot
    backend._slot = lambda *a: slots.append(choose(*a)[0]) or choose(*a)  # which decoder each run takes
    with Sam2Model(m, backend) as model:
        emb = model.embed(photo("coffee"))
        assert emb.device == "gpu-stand-in:0" and emb.prepared
        got = model.decode(emb, prompts, multimask_output=True)
        host = emb.to_host()
        assert host.device == "cpu" and not host.prepared
        for other in (model.decode(host, prompts, multimask_output=True),
                      model.decode(host.to_device(model), prompts, multimask_output=True)):
            np.testing.assert_array_equal(other.masks, got.masks)
            np.testing.assert_array_equal(other.low_res_logits, got.low_res_logits)
            np.testing.assert_array_equal(other.scores, got.scores)
        assert not host.prepared  # prepared for the decode only: a host embedding holds no device memory
    assert set(slots) == {"decoder_fast"}, slots  # the same decoder each way (here the two round alike)
