"""The TensorRT backend's data flow, run on the CPU against emulated `cuda-python` and `tensorrt` modules.

This is not a GPU test (tests/test_gpu.py is): "device memory" is host memory, "kernels" run at once or
when a captured graph is replayed, and the "engines" run the exported ONNX graphs with ONNX Runtime CPU.
What it checks is sam2rt's own logic around TensorRT: buffer binding and sizes, pinned staging, shapes
and profiles (TensorRT's one-context-per-profile rule is enforced), CUDA-graph capture and replay with
the addresses captured at capture time, feature loading when embeddings change, splitting of large
batches, device-resident embeddings and their moves to the host and back. Results must equal the ONNX
Runtime CPU backend's exactly, since the same graphs compute them.
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import photo
from sam2rt.manifest import Manifest, sha256_file
from sam2rt.runtime.engines import decoder_profiles, engine_filename

FEATURES = ("image_embed", "high_res_feats_0", "high_res_feats_1")
PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input")


# --- emulated cuda-python runtime ------------------------------------------------------------------------
class FakeCudart:
    class cudaError_t:  # noqa: N801
        cudaSuccess = 0

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1, cudaStreamCaptureModeGlobal=0)
    cudaStreamNonBlocking = 1

    def __init__(self):
        self.blocks: dict[int, ctypes.Array] = {}
        self.streams: dict[int, "FakeCudart.Stream"] = {}
        self.launches = 0
        self.allocs = 0

    class Stream:
        def __init__(self, handle):
            self.handle, self.capture = handle, None

        def __int__(self):
            return self.handle

    def _alloc(self, size):
        buf = ctypes.create_string_buffer(int(size))
        addr = ctypes.addressof(buf)
        self.blocks[addr] = buf
        self.allocs += 1
        return 0, addr

    def cudaMalloc(self, size):
        return self._alloc(size)

    def cudaMallocHost(self, size):
        return self._alloc(size)

    def cudaFree(self, ptr):
        self.blocks.pop(int(ptr), None)
        return (0,)

    cudaFreeHost = cudaFree

    def cudaMemcpy(self, dst, src, count, kind):
        ctypes.memmove(int(dst), int(src), int(count))
        return (0,)

    def enqueue(self, stream, op):
        s = self.streams[int(stream)]
        if s.capture is not None:
            s.capture.append(op)
        else:
            op()

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        dst, src, count = int(dst), int(src), int(count)
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, count))
        return (0,)

    def cudaStreamCreateWithFlags(self, flags):
        s = self.Stream(1000 + len(self.streams))
        self.streams[s.handle] = s
        return 0, s

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.streams[int(stream)].capture = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        s = self.streams[int(stream)]
        ops, s.capture = s.capture, None
        return 0, ops

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphLaunch(self, exe, stream):
        self.launches += 1
        for op in exe:
            op()
        return (0,)

    def cudaGraphExecDestroy(self, exe):
        return (0,)

    cudaGraphDestroy = cudaGraphExecDestroy

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaSetDevice(self, device):
        return (0,)

    def cudaGetDeviceProperties(self, device):
        return 0, types.SimpleNamespace(name=b"Emulated GPU\0\0", major=8, minor=9, totalGlobalMem=1 << 34, integrated=0)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorEmulated"

    def cudaGetErrorString(self, err):
        return 0, b"emulated failure"


def _view(addr: int, shape, dtype=np.float32) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_byte * max(n, 1)).from_address(addr)
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


# --- emulated tensorrt -------------------------------------------------------------------------------------
def make_fake_trt(cudart: FakeCudart, model_dir: Path, profiles: list[dict], encoder_graph: Path | None = None):
    """A stand-in `tensorrt` module whose engines run the ONNX graphs with ONNX Runtime on the CPU.

    `encoder_graph`: the encoder graph its engine runs (default model_dir/encoder.onnx); the fixture passes
    the CPU backend's encoder, so GPU-path results can be compared bit for bit with the CPU backend's.
    """
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(STATIC=0, USER_MANAGED=2)
    trt.nptype = lambda dt: np.float32
    so = ort.SessionOptions()
    so.log_severity_level = 3
    graphs = {"encoder": encoder_graph or model_dir / "encoder.onnx", "decoder": model_dir / "decoder.onnx"}
    sessions = {r: ort.InferenceSession(str(g), so, providers=["CPUExecutionProvider"]) for r, g in graphs.items()}
    trt.stats = {"contexts": 0, "engines": 0}

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Engine:
        def __init__(self, role):
            trt.stats["engines"] += 1
            self.role = role
            self.sess = sessions[role]
            self.ios = [(i.name, "in") for i in self.sess.get_inputs()] + [(o.name, "out") for o in self.sess.get_outputs()]
            self.num_io_tensors = len(self.ios)
            self.num_optimization_profiles = len(profiles) if role == "decoder" else 1
            self.device_memory_size_v2 = 4096
            self.profiles_taken: set[int] = set()

        def get_tensor_name(self, i):
            return self.ios[i][0]

        def get_tensor_mode(self, name):
            return dict(self.ios)[name]

        def get_tensor_dtype(self, name):
            return "float32"

        def get_tensor_shape(self, name):
            if self.role == "encoder":
                return {"image": (1, 3, 1024, 1024), "image_embed": (1, 256, 64, 64),
                        "high_res_feats_0": (1, 32, 256, 256), "high_res_feats_1": (1, 64, 128, 128)}[name]
            shapes = {"image_embed": (1, 256, 64, 64), "high_res_feats_0": (1, 32, 256, 256),
                      "high_res_feats_1": (1, 64, 128, 128), "point_coords": (-1, -1, 2), "point_labels": (-1, -1),
                      "mask_input": (-1, 1, 256, 256), "has_mask_input": (-1,), "low_res_masks": (-1, 4, 256, 256),
                      "iou_predictions": (-1, 4)}
            return shapes[name]

        def create_execution_context(self, strategy=0):
            trt.stats["contexts"] += 1
            ctx = Context(self, user_memory=strategy == 2)
            if 0 in self.profiles_taken and self.role == "decoder":
                ctx.profile = None  # TensorRT: no free profile for a second context
            else:
                self.profiles_taken.add(0)
            return ctx

    class Context:
        def __init__(self, engine, user_memory):
            self.engine, self.user_memory, self.memory = engine, user_memory, None
            self.profile = 0
            self.shapes: dict[str, tuple] = {}
            self.addresses: dict[str, int] = {}

        def set_device_memory(self, ptr, size):
            assert size >= self.engine.device_memory_size_v2
            self.memory = ptr

        def set_optimization_profile_async(self, index, stream):
            if index in self.engine.profiles_taken and index != self.profile:
                return False  # one context per profile, as TensorRT
            self.engine.profiles_taken.discard(self.profile)
            self.engine.profiles_taken.add(index)
            self.profile = index
            return True

        def set_input_shape(self, name, shape):
            shape = tuple(int(d) for d in shape)
            if self.engine.role == "decoder" and name in PROMPT_INPUTS:
                if self.profile is None:
                    return False
                p = profiles[self.profile]["shapes"][name]
                if not all(lo <= d <= hi for lo, d, hi in zip(p["min"], shape, p["max"])):
                    return False
            self.shapes[name] = shape
            return True

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = int(ptr)

        def get_tensor_shape(self, name):
            if self.engine.role == "encoder":
                return self.engine.get_tensor_shape(name)
            b = self.shapes["point_coords"][0]
            return {"low_res_masks": (b, 4, 256, 256), "iou_predictions": (b, 4)}[name]

        def execute_async_v3(self, stream):
            if self.engine.user_memory_required and self.memory is None and self.user_memory:
                return False
            # what a kernel launch captures: the addresses and shapes as they are now
            addrs, shapes = dict(self.addresses), dict(self.shapes)
            sess, ins = self.engine.sess, [i.name for i in self.engine.sess.get_inputs()]
            outs = [o.name for o in self.engine.sess.get_outputs()]
            out_shapes = {n: tuple(self.get_tensor_shape(n)) for n in outs}

            def run():
                feeds = {n: _view(addrs[n], shapes.get(n) or self.engine.get_tensor_shape(n)).copy() for n in ins}
                for n, value in zip(outs, sess.run(outs, feeds)):
                    assert value.shape == out_shapes[n]
                    _view(addrs[n], out_shapes[n])[...] = value

            cudart.enqueue(stream, run)
            return True

    Engine.user_memory_required = True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine(bytes(plan).decode().split()[0])

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


# --- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture
def emulated(tiny_model_dir, tmp_path, monkeypatch):
    """A model directory with 'engines' for the emulated GPU, and the emulated modules installed.

    The tiny stand-in model (tests/conftest.py): what is checked is the backend's logic, not SAM 2's numerics."""
    from sam2rt.runtime import gpu

    d = tmp_path / "m"
    d.mkdir()
    for f in ("encoder.onnx", "decoder.onnx"):
        (d / f).symlink_to(tiny_model_dir / f)
    manifest = json.loads((tiny_model_dir / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(manifest))
    profiles = [p.to_dict() for p in decoder_profiles(8, 6)]  # as build-engine stores them
    m = Manifest.load(d)
    entry = {"precision": "fp32", "tensorrt": "10.99.0", "gpu": {"name": "Emulated GPU", "compute_capability": "8.9"}}
    for role in ("encoder", "decoder"):
        path = d / engine_filename(role, "fp32")
        path.write_bytes(f"{role} plan".encode())
        entry[role] = {"file": path.name, "sha256": sha256_file(path), "onnx_sha256": m.graph(role)["sha256"]}
    entry["decoder"]["profiles"] = profiles
    m.data["engines"] = {"fp32": entry}
    m.save()
    cudart = FakeCudart()
    # the CPU backend's encoder is encoder.opt.onnx (made from the MultiHeadAttention form, equal to
    # encoder.onnx within float rounding): the emulated engine runs the same graph, for bitwise comparisons
    from sam2rt.runtime.backends.onnxruntime_backend import cpu_graph_entries

    cpu_encoder = tiny_model_dir / cpu_graph_entries(Manifest.load(tiny_model_dir))["encoder"]["file"]
    trt = make_fake_trt(cudart, d, profiles, encoder_graph=cpu_encoder)
    monkeypatch.setattr(gpu, "_CUDART", cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return types.SimpleNamespace(dir=d, cudart=cudart, trt=trt)


@pytest.fixture(scope="module")
def plain_cpu_model(tiny_model_dir):
    """The CPU backend running the same decoder graphs as the emulated engines (no fast decoder), and preprocessing
    as the TensorRT backend does, in numpy (the CPU backend's own preprocess.onnx differs from it by ~1e-6)."""
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Sam2Model
    from sam2rt.runtime.backends.base import Backend
    from sam2rt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    class NumpyPreprocessing(OnnxRuntimeBackend):
        preprocess = Backend.preprocess

    manifest = Manifest.load(tiny_model_dir)
    return Sam2Model(manifest, NumpyPreprocessing(manifest, "onnxruntime-cpu", fast_decoder=False))


@pytest.fixture
def models(emulated, plain_cpu_model):
    from sam2rt.runtime import Sam2Model

    return Sam2Model.from_dir(emulated.dir, backend="tensorrt"), plain_cpu_model


def _prompts(h, w, n=3):
    from sam2rt.runtime import Prompt

    out = [Prompt(points=np.array([[0.3 * w + 20 * i, 0.4 * h]]), labels=np.array([1])) for i in range(n)]
    out.append(Prompt(box=np.array([0.1 * w, 0.1 * h, 0.7 * w, 0.8 * h])))
    out.append(Prompt(points=np.array([[0.5 * w, 0.5 * h], [0.2 * w, 0.2 * h]]), labels=np.array([1, 0])))
    return out


# --- tests ----------------------------------------------------------------------------------------------------
def test_emulated_tensorrt_matches_onnxruntime_cpu(models, emulated):
    trt_model, cpu_model = models
    from sam2rt.runtime.gpu import DeviceArray

    assert trt_model.backend_name == "tensorrt" and trt_model.backend.precision == "fp32"
    img = photo("coffee")
    emb = trt_model.embed(img)
    assert emb.device == "cuda:0" and all(isinstance(v, DeviceArray) for v in emb.features.values())
    ref_emb = cpu_model.embed(img)
    for k in FEATURES:
        np.testing.assert_array_equal(emb.features[k].to_host(), ref_emb.features[k])
    prompts = _prompts(*img.shape[:2])
    got, ref = trt_model.decode(emb, prompts), cpu_model.decode(ref_emb, prompts)
    np.testing.assert_array_equal(got.low_res_logits, ref.low_res_logits)
    np.testing.assert_array_equal(got.scores, ref.scores)
    np.testing.assert_array_equal(got.masks, ref.masks)
    # mask prompts go through the same staging
    lr, _ = cpu_model.decode_raw(ref_emb, np.array([[[500.0, 400.0], [0, 0]]], np.float32), np.array([[1, -1]], np.float32), None)
    mask = np.clip(lr[:, :1], -32, 32)
    a = trt_model.decode_raw(emb, np.array([[[500.0, 400.0], [0, 0]]], np.float32), np.array([[1, -1]], np.float32), mask)
    b = cpu_model.decode_raw(ref_emb, np.array([[[500.0, 400.0], [0, 0]]], np.float32), np.array([[1, -1]], np.float32), mask)
    np.testing.assert_array_equal(a[0], b[0])


def test_emulated_decodes_replay_cuda_graphs(models, emulated):
    trt_model, cpu_model = models
    img = photo("astronaut")
    emb = trt_model.embed(img)
    from sam2rt.runtime import Prompt

    p = Prompt(points=np.array([[200.0, 150.0]]), labels=np.array([1]))
    first = trt_model.decode(emb, p)
    launches = emulated.cudart.launches
    for _ in range(3):
        np.testing.assert_array_equal(trt_model.decode(emb, p).low_res_logits, first.low_res_logits)
    assert emulated.cudart.launches == launches + 3, "a repeated decode must be one graph launch"
    shapes = trt_model.backend.captured_shapes
    assert shapes[(1, 2)] is True
    # a second shape on the same profile works (its own engine copy: TensorRT's one-context-per-profile rule)
    two = trt_model.decode(emb, [p, Prompt(points=np.array([[100.0, 100.0], [50, 60]]), labels=np.array([1, 1]))])
    assert trt_model.backend.captured_shapes == {(1, 2): True, (1, 3): True}
    np.testing.assert_array_equal(two.low_res_logits[0], first.low_res_logits[0])
    np.testing.assert_array_equal(trt_model.decode(emb, p).low_res_logits, first.low_res_logits)  # old graph still valid


def test_emulated_embeddings_switch_and_move(models, emulated):
    trt_model, cpu_model = models
    from sam2rt.runtime import Prompt
    from sam2rt.runtime.gpu import DeviceArray

    a, b = photo("coffee"), photo("astronaut")
    ea, eb = trt_model.embed(a), trt_model.embed(b)
    p = Prompt(points=np.array([[120.0, 110.0]]), labels=np.array([1]))
    ra, rb, ra2 = trt_model.decode(ea, p), trt_model.decode(eb, p), trt_model.decode(ea, p)
    np.testing.assert_array_equal(ra.low_res_logits, ra2.low_res_logits)
    np.testing.assert_array_equal(rb.low_res_logits, cpu_model.decode(cpu_model.embed(b), p).low_res_logits)
    host = ea.to_host()
    assert host.device == "cpu" and all(isinstance(v, np.ndarray) for v in host.features.values())
    np.testing.assert_array_equal(trt_model.decode(host, p).low_res_logits, ra.low_res_logits)
    back = host.to_device(trt_model)
    assert back.device == "cuda:0" and isinstance(back.features["image_embed"], DeviceArray)
    np.testing.assert_array_equal(trt_model.decode(back, p).low_res_logits, ra.low_res_logits)
    # a device embedding decoded by the CPU backend comes to the host by itself
    np.testing.assert_array_equal(cpu_model.decode(ea.to_device(cpu_model), p).low_res_logits, ra.low_res_logits)


def test_emulated_large_batches_are_split_and_points_checked(models, emulated):
    trt_model, cpu_model = models
    from sam2rt.errors import InvalidPromptError
    from sam2rt.runtime import Prompt

    img = photo("coffee")
    boxes = [Prompt(box=np.array([10.0 + 7 * i, 12.0 + 5 * i, 300.0 + 3 * i, 260.0 + 2 * i])) for i in range(19)]  # max 8
    got = trt_model.decode(trt_model.embed(img), boxes)
    ref = cpu_model.decode(cpu_model.embed(img), boxes)
    np.testing.assert_array_equal(got.low_res_logits, ref.low_res_logits)
    assert set(trt_model.backend.captured_shapes) == {(8, 3), (3, 3)}  # box corners + padding point
    pts = np.stack([np.linspace(10, 300, 6), np.linspace(10, 200, 6)], axis=1)  # 6 + padding > max 6
    with pytest.raises(InvalidPromptError, match="--max-points"):
        trt_model.decode(trt_model.embed(img), Prompt(points=pts, labels=np.ones(6)))


def test_emulated_predictor_and_embedding_save(models, emulated, tmp_path):
    trt_model, cpu_model = models
    from sam2rt.runtime import Embedding, Predictor

    img = photo("coffee")
    p, ref = Predictor(trt_model), Predictor(cpu_model)
    p.set_image(img)
    ref.set_image(img)
    kw = dict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]))
    for x, y in zip(p.predict(**kw), ref.predict(**kw)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(p.get_image_embedding(), ref.get_image_embedding())
    path = p.embedding.save(tmp_path / "e.npz")
    loaded = Embedding.load(path)
    np.testing.assert_array_equal(trt_model.decode(loaded, _prompts(400, 600)).masks,
                                  cpu_model.decode(cpu_model.embed(img), _prompts(400, 600)).masks)


def test_emulated_backend_is_safe_across_threads(models, emulated):
    """A server decodes from several threads: staging buffers and the loaded embedding must not mix."""
    from concurrent.futures import ThreadPoolExecutor

    from sam2rt.runtime import Prompt

    trt_model, _ = models
    embs = [trt_model.embed(photo("coffee")), trt_model.embed(photo("astronaut"))]
    prompts = [Prompt(points=np.array([[80.0 + 40 * i, 90.0]]), labels=np.array([1])) for i in range(3)]
    expected = {(e, p): trt_model.decode(embs[e], prompts[p]).low_res_logits for e in range(2) for p in range(3)}
    jobs = [(e, p) for _ in range(3) for e in range(2) for p in range(3)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: trt_model.decode(embs[job[0]], prompts[job[1]]).low_res_logits, jobs))
    for job, got in zip(jobs, results):
        np.testing.assert_array_equal(got, expected[job])


def test_int8_build_calibrates_with_runtime_preprocessing(model_dir, tmp_path, monkeypatch):
    """--int8 against a stand-in TensorRT 10 (with calibrators) and the emulated CUDA runtime: the
    calibrator feeds each image through the runtime's preprocessing, writes its cache, sensitive layers
    are pinned to FP32, the decoder is built from the mixed FP16 graph, and the manifest says so."""
    import shutil

    import cv2

    from sam2rt.cli import main
    from sam2rt.runtime import gpu
    from sam2rt.runtime.preprocess import preprocess
    from test_gpu_cpu_side import _FakeTrt

    cudart = FakeCudart()
    monkeypatch.setattr(gpu, "_CUDART", cudart)
    fake = _FakeTrt()
    fake.float32, fake.float16, fake.int32 = "f32", "f16", "i32"
    fake.LayerType = types.SimpleNamespace(NORMALIZATION="norm", SOFTMAX="softmax", REDUCE="reduce", CONVOLUTION="conv", SHAPE="shape")
    fed: list[np.ndarray] = []

    class Calibrator:  # trt.IInt8EntropyCalibrator2
        def __init__(self):
            pass

    fake.IInt8EntropyCalibrator2 = Calibrator

    class Layer:
        def __init__(self, name, kind, dtype="f32"):
            self.name, self.type, self.num_outputs = name, kind, 1
            self.precision, self.out_types, self._dtype = None, {}, dtype

        def get_output(self, j):
            return types.SimpleNamespace(dtype=self._dtype)

        def set_output_type(self, j, t):
            self.out_types[j] = t

    # node names of encoder.onnx (the folded export traces the trunk directly: "/trunk/...")
    layers = [Layer("/trunk/blocks.0/norm1/LayerNormalization", "norm"),
              Layer("/trunk/blocks.0/attn/Softmax", "softmax"),
              Layer("/trunk/blocks.0/attn/MatMul", "matmul"),
              Layer("/trunk/patch_embed/proj/Conv", "conv"),
              Layer("/image_encoder/Shape_3", "shape", dtype="i32")]
    base_builder = fake.Builder

    class Builder(base_builder):
        def create_network(self, flags):
            net = super().create_network(flags)
            net.num_layers, net.get_layer = len(layers), layers.__getitem__
            return net

        def build_serialized_network(self, network, config):
            calib = getattr(config, "int8_calibrator", None)
            if calib is not None:
                assert calib.get_batch_size() == 1 and calib.read_calibration_cache() is None
                while (ptrs := calib.get_batch(["image"])) is not None:
                    fed.append(_view(ptrs[0], (1, 3, 1024, 1024)).copy())
                calib.write_calibration_cache(b"calibration table")
            return super().build_serialized_network(network, config)

    fake.Builder = Builder
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    d = Path(shutil.copytree(model_dir, tmp_path / "m"))
    calib_dir = tmp_path / "calib"
    calib_dir.mkdir()
    images = [photo("coffee"), photo("astronaut")]
    for i, img in enumerate(images):
        cv2.imwrite(str(calib_dir / f"{i}.png"), img[..., ::-1])
    assert main(["build-engine", "--model-dir", str(d), "--int8", "--calib-images", str(calib_dir), "--quiet"]) == 0
    assert len(fed) == 2
    for got, img in zip(fed, images):
        np.testing.assert_array_equal(got, preprocess(img))
    assert (d / "encoder.int8.calib").read_bytes() == b"calibration table"
    pinned = {l.name for l in layers if l.precision == "f32"}
    assert pinned == {layers[0].name, layers[1].name, layers[2].name}, "norm, softmax and the attention-logit MatMul"
    assert all(l.out_types == {0: "f32"} for l in layers[:3]) and layers[4].precision is None
    builds = [c for c in fake.calls if c[0] != "parse"]
    enc_flags, enc_cfg = builds[0][0], set(builds[0][1])
    assert enc_flags == 0, "INT8 calibration needs a weakly typed network"
    assert {fake.BuilderFlag.INT8, fake.BuilderFlag.FP16, fake.BuilderFlag.OBEY_PRECISION_CONSTRAINTS} <= enc_cfg
    assert [c[1] for c in fake.calls if c[0] == "parse"] == ["encoder.onnx", "decoder.fp16.onnx"]
    entry = Manifest.load(d).data["engines"]["int8"]
    assert entry["encoder"]["precision"] == "int8" and entry["encoder"]["calibration"]["images"] == 2
    assert entry["encoder"]["fp32_layers"] == sorted(pinned, key=[l.name for l in layers].index)
    assert entry["decoder"]["precision"] == "fp16"


def test_engines_run_only_from_a_tensorrt_export(emulated):
    """A directory exported for --target tensorrt loads its engines; one exported for cpu only is refused with the
    export that fixes it (its engines could not have come from its graphs)."""
    from sam2rt.errors import GraphNotExportedError
    from sam2rt.runtime import Sam2Model

    m = Manifest.load(emulated.dir)
    m.data["export"] = {"targets": ["tensorrt"]}
    m.save()
    assert Sam2Model.from_dir(emulated.dir, backend="tensorrt").backend_name == "tensorrt"
    m.data["export"] = {"targets": ["cpu"]}
    m.save()
    with pytest.raises(GraphNotExportedError, match="--target cpu,tensorrt"):
        Sam2Model.from_dir(emulated.dir, backend="tensorrt")
