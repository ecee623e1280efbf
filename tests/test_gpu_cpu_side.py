"""The GPU half, checked without a GPU: build-engine arguments, the manifest's engine checks (refusal of a
foreign / stale / altered engine), backend choice and its errors, ONNX Runtime IO binding, the
mixed-precision FP16 graph, INT8 calibration input, and an engine build against a stand-in TensorRT.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import cv2
import numpy as np

from sam2rt.runtime.tensors import DeviceTensor
import pytest

from conftest import photo
from sam2rt.cli import main
from sam2rt.errors import (
    BackendUnavailableError,
    EngineMismatchError,
    ExportError,
    InvalidEmbeddingError,
    ManifestError,
    ModelFileError,
)
from sam2rt.manifest import Manifest, sha256_file
from sam2rt.runtime.engines import (
    EngineEnvironment,
    check_engines,
    decoder_profiles,
    engine_filename,
    max_decoder_shape,
    profile_for,
    select_precision,
)

HERE_TRT = "10.3.0"
HERE_GPU = EngineEnvironment(HERE_TRT, "NVIDIA Jetson AGX Orin", "8.7")


# --- helpers --------------------------------------------------------------------------------------
def fake_model_dir(tmp_path: Path) -> Path:
    """A minimal model directory: tiny stand-in graph files and a manifest with their sha256."""
    d = tmp_path / "model"
    d.mkdir()
    graphs = {}
    for role in ("encoder", "decoder"):
        (d / f"{role}.onnx").write_bytes(f"not really {role}".encode())
        graphs[role] = {"file": f"{role}.onnx", "sha256": sha256_file(d / f"{role}.onnx")}
    data = {
        "format": "sam2rt", "format_version": 1, "image_size": 1024, "low_res_size": 256,
        "model": {"name": "hiera_tiny", "model_id": "sam2.1_hiera_tiny",
                  "weights": {"random": True, "seed": 0, "checkpoint": None, "checkpoint_sha256": None}},
        "graphs": graphs, "engines": {},
    }
    (d / "manifest.json").write_text(json.dumps(data))
    return d


def add_engines(d: Path, precision: str = "fp16", env: EngineEnvironment = HERE_GPU) -> Manifest:
    """Write stand-in engine files and a manifest entry for them, as build-engine would on `env`."""
    m = Manifest.load(d)
    entry = {"precision": precision, "tensorrt": env.tensorrt_version, "gpu": env.as_dict(), "built": "2026-01-01T00:00:00+00:00"}
    for role in ("encoder", "decoder"):
        path = d / engine_filename(role, precision)
        path.write_bytes(f"plan of {role} {precision}".encode())
        entry[role] = {"file": path.name, "sha256": sha256_file(path), "onnx_sha256": m.graph(role)["sha256"]}
    entry["decoder"]["profiles"] = [p.to_dict() for p in decoder_profiles(32, 16)]
    m.data["engines"][precision] = entry
    m.save()
    return Manifest.load(d)


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail, whatever is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


# --- build-engine: argument handling ----------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["build-engine"], "--model-dir"),
        (["build-engine", "--model-dir", "x", "--max-prompts", "0"], "--max-prompts"),
        (["build-engine", "--model-dir", "x", "--workspace", "lots"], "--workspace"),
        (["build-engine", "--model-dir", "x", "--max-points", "-3"], "--max-points"),
        (["build-engine", "--model-dir", "x", "--precision", "fp8"], "unrecognized arguments"),
    ],
)
def test_build_engine_rejects_bad_arguments(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--int8"], "--int8 needs --calib-images"),
        (["--calib-images", "."], "only used with --int8"),
        (["--max-points", "1"], "at least 2"),
    ],
)
def test_build_engine_inconsistent_arguments(tmp_path, extra, fragment, capsys, no_tensorrt):
    rc = main(["build-engine", "--model-dir", str(fake_model_dir(tmp_path)), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and "Traceback" not in err


def test_build_engine_checks_model_dir_and_calibration_images(tmp_path, capsys, no_tensorrt):
    assert main(["build-engine", "--model-dir", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    d = fake_model_dir(tmp_path)
    empty = tmp_path / "calib"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert main(["build-engine", "--model-dir", str(d), "--int8", "--calib-images", str(empty)]) == 2
    assert "holds no images" in capsys.readouterr().err
    (d / "encoder.onnx").write_bytes(b"changed after export")
    assert main(["build-engine", "--model-dir", str(d), "--fp16"]) == 2
    assert "does not match manifest.json" in capsys.readouterr().err


def test_build_engine_without_tensorrt_fails_clearly(tiny_model_dir, capsys, no_tensorrt):
    before = json.loads((tiny_model_dir / "manifest.json").read_text())
    rc = main(["build-engine", "--model-dir", str(tiny_model_dir), "--fp16", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "needs TensorRT" in err and "pip install 'sam2rt[trt]'" in err and "Jetson" in err
    assert "Traceback" not in err
    assert not list(tiny_model_dir.glob("*.engine"))
    assert json.loads((tiny_model_dir / "manifest.json").read_text()) == before


def test_build_engine_cli_subprocess_exit_code(tmp_path):
    """The installed entry point: no TensorRT here -> exit status 2 and one clear line (no traceback)."""
    code = "import sys; sys.modules['tensorrt'] = None; from sam2rt.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, "build-engine", "--model-dir", str(fake_model_dir(tmp_path))],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: `sam2rt build-engine` needs TensorRT")
    assert "Traceback" not in res.stderr


# --- manifest engine checks -------------------------------------------------------------------------
def test_matching_engine_is_accepted(tmp_path):
    m = add_engines(fake_model_dir(tmp_path))
    paths = check_engines(m, "fp16", HERE_GPU)
    assert paths == {r: m.directory / engine_filename(r, "fp16") for r in ("encoder", "decoder")}


@pytest.mark.parametrize(
    "env, fragments",
    [
        (EngineEnvironment(HERE_TRT, "NVIDIA H100 80GB HBM3", "9.0"),
         ["NVIDIA Jetson AGX Orin (compute capability 8.7)", "NVIDIA H100 80GB HBM3 (compute capability 9.0)"]),
        (EngineEnvironment("10.8.0.43", HERE_GPU.gpu_name, "8.7"), ["TensorRT 10.3.0", "TensorRT 10.8.0.43"]),
        (EngineEnvironment(HERE_TRT, "NVIDIA Jetson Orin Nano", "8.7"), ["tuned on NVIDIA Jetson AGX Orin", "Orin Nano"]),
    ],
)
def test_foreign_engine_is_refused(tmp_path, env, fragments):
    m = add_engines(fake_model_dir(tmp_path))
    with pytest.raises(EngineMismatchError) as exc:
        check_engines(m, "fp16", env)
    msg = str(exc.value)
    for f in fragments:
        assert f in msg
    assert "sam2rt build-engine --model-dir" in msg and "--fp16" in msg


def test_altered_engine_file_is_refused(tmp_path):
    m = add_engines(fake_model_dir(tmp_path))
    (m.directory / "decoder.fp16.engine").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="does not match manifest.json"):
        check_engines(m, "fp16", HERE_GPU)
    check_engines(m, "fp16", HERE_GPU, verify_sha=False)  # the sha check is what refused it
    (m.directory / "encoder.fp16.engine").unlink()
    with pytest.raises(ModelFileError, match="encoder.fp16.engine is missing"):
        check_engines(m, "fp16", HERE_GPU)


def test_engine_from_another_export_is_refused(tmp_path):
    m = add_engines(fake_model_dir(tmp_path))
    m.data["engines"]["fp16"]["encoder"]["onnx_sha256"] = "0" * 64
    with pytest.raises(EngineMismatchError, match="another export"):
        check_engines(m, "fp16", HERE_GPU)


def test_precision_selection(tmp_path):
    d = fake_model_dir(tmp_path)
    with pytest.raises(BackendUnavailableError, match="no TensorRT engines .*`sam2rt build-engine"):
        select_precision(Manifest.load(d))
    add_engines(d, "fp32")
    assert select_precision(Manifest.load(d)) == "fp32"
    m = add_engines(d, "fp16")
    assert select_precision(m) == "fp16"  # the fastest built
    assert select_precision(m, "fp32") == "fp32"
    with pytest.raises(BackendUnavailableError, match=r"no int8 TensorRT engines .*built: fp32, fp16"):
        select_precision(m, "int8")
    with pytest.raises(BackendUnavailableError, match="unknown engine precision"):
        select_precision(m, "fp8")


def test_decoder_profiles_cover_interactive_and_batch_use():
    from sam2rt.graph_table import Profile

    profiles = decoder_profiles(32, 16)
    assert [p.name for p in profiles] == ["single", "batch"]
    for p in profiles:
        assert set(p.shapes) == {"point_coords", "point_labels", "mask_input", "has_mask_input"}
        for s in p.shapes.values():
            assert all(lo <= opt <= hi for lo, opt, hi in zip(s.min, s.opt, s.max))
        assert Profile.from_dict(p.to_dict()) == p  # what the manifest stores reads back the same
    for form in (profiles, [p.to_dict() for p in profiles]):  # typed, or as read from a manifest
        assert max_decoder_shape(form) == (32, 16)
        assert profile_for(form, 1, 2) == 0 and profile_for(form, 16, 2) == 1 and profile_for(form, 3, 5) == 0
        assert profile_for(form, 33, 2) is None and profile_for(form, 1, 17) is None
    assert [p.name for p in decoder_profiles(4, 8)] == ["single"]
    with pytest.raises(ValueError):
        decoder_profiles(0, 8)
    with pytest.raises(ValueError):
        decoder_profiles(4, 1)


# --- backends ---------------------------------------------------------------------------------------
def test_auto_falls_back_to_cpu_here(tiny_model_dir):
    from sam2rt.runtime import Sam2Model
    from sam2rt.runtime.backends import available_backends

    status = available_backends()
    if status["tensorrt"] == "available" or status["onnxruntime-cuda"] == "available":
        pytest.fail("this test describes a machine without a GPU backend; run tests/test_gpu.py on GPU machines")
    model = Sam2Model.from_dir(tiny_model_dir, backend="auto")
    assert model.backend_name == "onnxruntime-cpu" and model.backend.device == "cpu"


def test_tensorrt_backend_unavailable_without_tensorrt(tiny_model_dir, no_tensorrt):
    from sam2rt.runtime.backends import available_backends, create_backend

    m = Manifest.load(tiny_model_dir)
    for name in ("tensorrt", "tensorrt:fp16"):
        with pytest.raises(BackendUnavailableError) as exc:
            create_backend(m, name)
        assert "TensorRT's Python package is not installed" in str(exc.value)
        assert "pip install 'sam2rt[trt]'" in str(exc.value) and "JetPack" in str(exc.value)
    assert available_backends()["tensorrt"].startswith("unavailable: TensorRT")


def test_tensorrt_backend_unavailable_without_gpu(tiny_model_dir, monkeypatch):
    """TensorRT importable but no usable CUDA device: a clear BackendUnavailableError, and `auto` moves on."""
    from sam2rt.runtime.backends import create_backend, tensorrt_backend

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(tensorrt_backend, "cuda_status", lambda device=0: "unavailable: no usable CUDA device (test)")
    m = Manifest.load(tiny_model_dir)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU: no usable CUDA device"):
        create_backend(m, "tensorrt")
    assert create_backend(m, "auto").name == "onnxruntime-cpu"


def test_tensorrt_backend_unavailable_without_engines(tiny_model_dir, monkeypatch):
    from sam2rt.runtime.backends import create_backend, tensorrt_backend

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(tensorrt_backend, "cuda_status", lambda device=0: "available")
    with pytest.raises(BackendUnavailableError, match="no TensorRT engines in .*build-engine --model-dir"):
        create_backend(Manifest.load(tiny_model_dir), "tensorrt")


def test_onnxruntime_gpu_backends_unavailable_on_cpu_onnxruntime(tiny_model_dir, monkeypatch):
    import onnxruntime as ort

    from sam2rt.runtime.backends import create_backend

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    m = Manifest.load(tiny_model_dir)
    for name, provider in (("onnxruntime-cuda", "CUDAExecutionProvider"), ("cuda", "CUDAExecutionProvider"),
                           ("onnxruntime-tensorrt", "TensorrtExecutionProvider")):
        with pytest.raises(BackendUnavailableError) as exc:
            create_backend(m, name)
        assert provider in str(exc.value) and "onnxruntime-gpu" in str(exc.value)


def test_gpu_modules_stay_torch_free(tiny_model_dir):
    code = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        import sam2rt.runtime.gpu, sam2rt.runtime.engines, sam2rt.runtime.backends.tensorrt_backend
        import sam2rt.export.tensorrt_build, sam2rt.export.fp16
        from sam2rt.runtime import Sam2Model, Prompt
        from sam2rt.runtime.backends import available_backends
        available_backends()
        model = Sam2Model.from_dir({str(tiny_model_dir)!r}, backend="auto")
        emb = model.embed(np.full((64, 80, 3), 127, np.uint8))
        model.decode(emb.to_device(model), Prompt(points=np.array([[10.0, 20.0]]), labels=np.array([1])))
        print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


# --- embeddings across devices, ONNX Runtime IO binding ----------------------------------------------
class _FakeDeviceTensor(DeviceTensor):
    """Stands for a GPU buffer: only reachable through to_host()."""

    def __init__(self, array):
        self._array = np.array(array)
        self.shape, self.dtype, self.nbytes = self._array.shape, self._array.dtype, self._array.nbytes

    @property
    def device(self) -> str:
        return "cuda:0"

    def to_host(self):
        return self._array.copy()


@pytest.fixture(scope="module")
def coffee():
    return photo("coffee")


def _prompts():
    from sam2rt.runtime import Prompt

    return [
        Prompt(points=np.array([[300.0, 200.0]]), labels=np.array([1])),
        Prompt(points=np.array([[300.0, 200.0], [100.0, 90.0]]), labels=np.array([1, 0])),
        Prompt(box=np.array([50.0, 40.0, 500.0, 350.0])),
    ]


def test_embedding_moves_between_devices(tiny_model, coffee):
    from sam2rt.runtime import Embedding, Predictor

    emb = tiny_model.embed(coffee)
    assert emb.to_device(tiny_model) is emb and emb.to_device(Predictor(tiny_model)) is emb
    on_dev = Embedding({k: _FakeDeviceTensor(v) for k, v in emb.features.items()}, emb.original_size, emb.model_key, "cuda:0")
    back = on_dev.to_device(tiny_model)  # a CPU backend: to the host
    assert back.device == "cpu" and all(isinstance(v, np.ndarray) for v in back.features.values())
    for k in emb.features:
        np.testing.assert_array_equal(back.features[k], emb.features[k])
    ref = tiny_model.decode(emb, _prompts())
    got = tiny_model.decode(back, _prompts())
    np.testing.assert_array_equal(got.masks, ref.masks)


def _same_masks(got, ref_model, ref_emb, multimask=True) -> None:
    """Masks equal to ref_model's wherever its logit is clear of the threshold: the device path runs the
    un-optimised graphs, whose logits agree with the CPU backend's to ~1e-6, so only a pixel within that of
    the threshold may differ."""
    ref = ref_model.decode(ref_emb, _prompts(), multimask)
    logits = ref_model.decode(ref_emb, _prompts(), multimask, return_logits=True).masks
    clear = np.abs(logits) > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], ref.masks[clear])


@pytest.mark.parametrize("fixed_buffers", [False, True], ids=["fresh-buffers", "fixed-buffers"])
@pytest.mark.parametrize("which", ["tiny", pytest.param("real", marks=pytest.mark.slow)])
def test_device_backend_on_the_cpu_provider_matches_the_cpu_backend(request, which, coffee, fixed_buffers):
    """OrtDeviceBackend's whole path (device pre/postprocessing, IO binding, the fixed buffers its CUDA graphs
    replay from) on the CPU provider equals the CPU backend: on the tiny model (the plumbing, quick) and on
    the real export (its graphs, slow)."""
    import onnxruntime as ort

    from sam2rt.runtime import Predictor, Prompt, Sam2Model
    from sam2rt.runtime.backends import OrtDeviceBackend
    from sam2rt.runtime.backends.onnxruntime_backend import OrtDeviceTensor

    model_dir = request.getfixturevalue("tiny_model_dir" if which == "tiny" else "model_dir")
    cpu_model = request.getfixturevalue("tiny_model" if which == "tiny" else "sam2rt_model")
    m = Manifest.load(model_dir)
    with Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=fixed_buffers)) as bound:
        # the fast decoder's GPU form, checked against decoder_nomask at load
        assert bound.backend.files["decoder_fast"]["file"] == "decoder_fast.device.onnx"
        assert bound.backend.fast_decoder_check.startswith("on"), bound.backend.fast_decoder_check
        ref_emb, emb = cpu_model.embed(coffee), bound.embed(coffee)
        assert all(isinstance(v, OrtDeviceTensor) for v in emb.features.values())
        for k in ref_emb.features:
            np.testing.assert_allclose(emb.features[k].to_host(), ref_emb.features[k], rtol=0, atol=1e-5)
        for multimask in (True, False):
            ref, got = cpu_model.decode(ref_emb, _prompts(), multimask), bound.decode(emb, _prompts(), multimask)
            np.testing.assert_allclose(got.low_res_logits, ref.low_res_logits, rtol=0, atol=1e-5)
            np.testing.assert_allclose(got.scores, ref.scores, rtol=0, atol=1e-6)
            _same_masks(got.masks, cpu_model, ref_emb, multimask)
        # a mask prompt (the full decoder: points, labels, mask and its flag packed into one buffer), twice over
        for seed in (0, 1):
            prev = cpu_model.decode(ref_emb, _prompts()[seed:seed + 1], False).low_res_logits[0]
            masked = [Prompt(points=np.array([[300.0 - 90 * seed, 200.0]]), labels=np.array([1]), mask_input=prev)]
            ref, got = cpu_model.decode(ref_emb, masked, False), bound.decode(emb, masked, False)
            np.testing.assert_allclose(got.low_res_logits, ref.low_res_logits, rtol=0, atol=1e-5)
        # a second image through the same fixed buffers, then back to the first: nothing mixes
        other = coffee[::-1].copy()
        ref_other, emb_other = cpu_model.embed(other), bound.embed(other)
        _same_masks(bound.decode(emb_other, _prompts()).masks, cpu_model, ref_other)
        _same_masks(bound.decode(emb, _prompts()).masks, cpu_model, ref_emb)
        # raw decoder outputs are the caller's own: a later run through the same buffers leaves them as they were
        pad = ([0.0, 0.0], -1)
        first = bound.decode_raw(emb, np.array([[[300.0, 200.0], pad[0]]], np.float32), np.array([[1, pad[1]]], np.float32), None)
        kept = [a.copy() for a in first]
        second = bound.decode_raw(emb, np.array([[[50.0, 60.0], pad[0]]], np.float32), np.array([[1, pad[1]]], np.float32), None)
        assert not np.array_equal(second[0], kept[0])
        for a, b in zip(first, kept):
            np.testing.assert_array_equal(a, b)
        # host features (a loaded embedding) and OrtValues made elsewhere decode the same
        host = emb.to_host()
        got = bound.decode(emb, _prompts())
        np.testing.assert_array_equal(bound.decode(host, _prompts()).masks, got.masks)
        as_values = {k: OrtDeviceTensor(ort.OrtValue.ortvalue_from_numpy(np.array(v, np.float32))) for k, v in host.features.items()}
        dev_emb = type(emb)(as_values, emb.original_size, emb.model_key, "cpu")
        np.testing.assert_array_equal(bound.decode(dev_emb, _prompts()).masks, got.masks)
        # the Predictor's outputs keep their dtypes and shapes
        p, r = Predictor(bound), Predictor(cpu_model)
        p.set_image(coffee), r.set_image(coffee)
        for a, b in zip(p.predict(point_coords=np.array([[300, 200]]), point_labels=np.array([1])),
                        r.predict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]))):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_a_decode_uploads_its_prompts_in_one_copy(tiny_model_dir, coffee, monkeypatch):
    """With fixed buffers (the CUDA-graph path) a decode's prompt inputs (points and labels; with a mask prompt also the
    mask and its flag) sit in one device buffer: one host-to-device copy per decode, not one per input. Plain prompts
    decode through the merged decode graph (one packed input, point_prompts), mask prompts through the full decoder;
    the merged graph's packed prompts go up only when they changed (the same click again: no copy)."""
    import onnxruntime as ort

    from sam2rt.runtime import Prompt, Sam2Model
    from sam2rt.runtime.backends import OrtDeviceBackend

    m = Manifest.load(tiny_model_dir)
    with Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=True)) as model:
        emb = model.embed(coffee)
        prev = model.decode(emb, _prompts()[:1], False).low_res_logits[0]
        cases = {"points": _prompts()[1:2], "boxes": [_prompts()[2]] * 3,
                 "mask": [Prompt(points=np.array([[300.0, 200.0]]), labels=np.array([1]), mask_input=prev)]}
        uploads: list[tuple[int, ...]] = []
        real = ort.OrtValue.update_inplace

        def counted(value, array):
            uploads.append(array.shape)
            real(value, array)

        def moved(prompts):  # the same prompts 7 pixels to the right: another click of the same shape
            return [Prompt(points=None if p.points is None else p.points + [7.0, 0.0], labels=p.labels,
                           box=None if p.box is None else p.box + [7.0, 0.0, 7.0, 0.0], mask_input=p.mask_input)
                    for p in prompts]

        for name, prompts in cases.items():
            model.decode(emb, prompts, False)  # its fixed buffers are made (and checked) on the first decode
            for again, want in ((moved(prompts), 1), (moved(prompts), 0 if name != "mask" else 1)):
                uploads.clear()
                monkeypatch.setattr(ort.OrtValue, "update_inplace", counted)
                model.decode(emb, again, False)
                monkeypatch.undo()
                assert len(uploads) == want, (name, uploads)
        status = model.backend.pipeline_graphs["decode_single"]
        assert len(status) == 3 and set(status.values()) == {"fixed buffers"}, status  # one click, two points, 3 boxes
        assert {k[0] for k in model.backend._captured if isinstance(k, tuple)} == {"decoder"}  # the mask prompt's


# --- FP16 mixed precision (what FP16 engines are built from) -----------------------------------------
@pytest.fixture(scope="module")
def mixed_fp16(model_dir, tmp_path_factory):
    from sam2rt.export.fp16 import convert_to_mixed_fp16

    out = tmp_path_factory.mktemp("fp16")
    kept = {role: convert_to_mixed_fp16(model_dir / f"{role}.onnx", out / f"{role}.fp16.onnx") for role in ("encoder", "decoder")}
    return out, kept


def test_fp16_graph_keeps_sensitive_layers_fp32(model_dir, mixed_fp16):
    import onnx

    out, kept = mixed_fp16
    for role in ("encoder", "decoder"):
        src = onnx.load(str(model_dir / f"{role}.onnx"), load_external_data=False).graph
        by_type = {}
        for n in src.node:
            by_type.setdefault(n.op_type, []).append(n.name)
        for op in ("LayerNormalization", "Softmax"):
            assert by_type.get(op) and set(by_type[op]) <= set(kept[role]), f"{role}: a {op} would run in FP16"
        assert sum(r == "MatMul feeding Softmax" for r in kept[role].values()) == len(by_type["Softmax"])
        g = onnx.load(str(out / f"{role}.fp16.onnx")).graph
        fp16_weights = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in g.initializer)
        assert fp16_weights > len(g.initializer) // 2, "most weights should be FP16"
        io = list(g.input) + list(g.output)
        assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in io), "IO must stay FP32"
    assert {"Sin", "Cos"} <= set(kept["decoder"].values())
    assert {"MatMul feeding Sin", "MatMul feeding Cos"} & set(kept["decoder"].values()), "the PE projection runs in FP16"
    assert any(r == "ReduceMean" for r in kept["decoder"].values())  # LayerNorm2d of the mask decoder


def test_fp16_graph_keeps_masks(model_dir, mixed_fp16, sam2rt_model, coffee):
    """The mixed FP16 graphs on ONNX Runtime CPU: mask IoU >= 0.98 and scores within 0.02 of FP32.

    (ONNX Runtime's CPU kernels may compute some FP16 ops in FP32; this checks the graph, not TensorRT's
    kernels: tests/test_gpu.py checks the engines on a GPU.)
    """
    import onnxruntime as ort

    from sam2rt.runtime.backends.onnxruntime_backend import session_options
    from sam2rt.runtime.preprocess import preprocess

    out, _ = mixed_fp16
    so = session_options()
    enc = ort.InferenceSession(str(out / "encoder.fp16.onnx"), so, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(out / "decoder.fp16.onnx"), so, providers=["CPUExecutionProvider"])
    feats = dict(zip(["image_embed", "high_res_feats_0", "high_res_feats_1"], enc.run(None, {"image": preprocess(coffee)})))
    ref_emb = sam2rt_model.embed(coffee)
    b = 6
    rng = np.random.default_rng(0)
    coords = np.concatenate([rng.uniform(50, 950, (b, 1, 2)), np.zeros((b, 1, 2))], axis=1).astype(np.float32)
    labels = np.tile(np.array([[1.0, -1.0]], np.float32), (b, 1))
    mask, has_mask = np.zeros((b, 1, 256, 256), np.float32), np.zeros(b, np.float32)
    lr16, iou16 = dec.run(None, {**feats, "point_coords": coords, "point_labels": labels, "mask_input": mask, "has_mask_input": has_mask})
    lr32, iou32 = sam2rt_model.backend.decode(ref_emb.features, coords, labels, mask, has_mask)
    m16, m32 = lr16 > 0, lr32 > 0
    union = (m16 | m32).sum(axis=(2, 3))
    iou = np.where(union > 0, (m16 & m32).sum(axis=(2, 3)) / np.maximum(union, 1), 1.0)
    assert iou.min() >= 0.98, f"mask IoU FP16 vs FP32 down to {iou.min():.4f}"
    assert np.abs(iou16 - iou32).max() <= 0.02


# --- INT8 calibration input ------------------------------------------------------------------------
def test_calibration_images_use_runtime_preprocessing(tmp_path):
    from sam2rt.export.tensorrt_build import calibration_files, iter_calibration_images
    from sam2rt.runtime.preprocess import preprocess

    d = tmp_path / "calib"
    d.mkdir()
    images = {"a.png": photo("coffee"), "b.jpg": photo("astronaut")}
    for name, rgb in images.items():
        cv2.imwrite(str(d / name), rgb[..., ::-1])
    (d / "readme.txt").write_text("skip me")
    files = calibration_files(d)
    assert [f.name for f in files] == ["a.png", "b.jpg"]
    assert [f.name for f in calibration_files(d, limit=1)] == ["a.png"]
    batches = list(iter_calibration_images(files))
    assert all(x.shape == (1, 3, 1024, 1024) and x.dtype == np.float32 for x in batches)
    np.testing.assert_array_equal(batches[0], preprocess(images["a.png"]))  # PNG is lossless
    (d / "c.png").write_bytes(b"broken")
    with pytest.raises(ExportError, match="could not be read"):
        list(iter_calibration_images(calibration_files(d)))


# --- the engine build's bookkeeping, against a stand-in TensorRT ---------------------------------------
class _FakeTrt(types.ModuleType):
    """Just enough of the tensorrt module for build_engines' control flow (no GPU code runs)."""

    def __init__(self):
        super().__init__("tensorrt")
        self.__version__ = "10.3.0.99"
        self.calls = []
        trt = self

        class Enum:
            def __init__(self, *names):
                for i, n in enumerate(names):
                    setattr(self, n, i)

        self.NetworkDefinitionCreationFlag = Enum("EXPLICIT_BATCH", "STRONGLY_TYPED")
        self.BuilderFlag = Enum("FP16", "INT8", "TF32", "OBEY_PRECISION_CONSTRAINTS")
        self.MemoryPoolType = Enum("WORKSPACE")

        class Logger:
            WARNING, INFO = 1, 2

            def __init__(self, level):
                pass

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class Config:
            def __init__(self):
                self.flags, self.profiles, self.pools = set(), [], {}

            def set_memory_pool_limit(self, pool, size):
                self.pools[pool] = size

            def clear_flag(self, flag):
                self.flags.discard(flag)

            def set_flag(self, flag):
                self.flags.add(flag)

            def add_optimization_profile(self, p):
                self.profiles.append(p)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return types.SimpleNamespace(flags=flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                trt.calls.append((network.flags, sorted(config.flags), [p.shapes for p in config.profiles], dict(config.pools)))
                return b"fake plan %d" % sum(c[0] != "parse" for c in trt.calls)

        class OnnxParser:
            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                trt.calls.append(("parse", Path(path).name))
                return Path(path).is_file()

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser


def test_build_engines_records_what_the_runtime_checks(model_dir, tmp_path, monkeypatch):
    import shutil

    from sam2rt.runtime import gpu

    d = Path(shutil.copytree(model_dir, tmp_path / "m"))
    fake = _FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(gpu, "set_device", lambda device=0: None)
    monkeypatch.setattr(gpu, "gpu_info", lambda device=0: gpu.GpuInfo(0, "NVIDIA Test GPU", "8.9", 1 << 34, False))
    rc = main(["build-engine", "--model-dir", str(d), "--fp16", "--workspace", "512", "--max-prompts", "24",
               "--max-points", "10", "--quiet"])
    assert rc == 0
    parses = [c for c in fake.calls if c[0] == "parse"]
    assert [p[1] for p in parses] == ["encoder.fp16.onnx", "decoder.fp16.onnx"]  # the mixed-precision graphs
    builds = [c for c in fake.calls if c[0] != "parse"]
    enc_flags, enc_cfg, enc_profiles, enc_pools = builds[0]
    assert enc_flags == 1 << fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert fake.BuilderFlag.TF32 not in enc_cfg and enc_profiles == [] and enc_pools == {0: 512 << 20}
    dec_profiles = builds[1][2]
    assert [p["point_coords"] for p in dec_profiles] == [([1, 1, 2], [1, 2, 2], [4, 10, 2]), ([1, 1, 2], [16, 3, 2], [24, 10, 2])]
    temporary = [d / "encoder.fp16.onnx", d / "decoder.fp16.onnx"]  # not the export's encoder.fused.fp16.onnx
    assert not any(p.exists() for p in temporary), "the mixed graphs are temporary unless --keep-onnx"

    m = Manifest.load(d)
    entry = m.data["engines"]["fp16"]
    assert entry["tensorrt"] == "10.3.0.99" and entry["gpu"] == {"name": "NVIDIA Test GPU", "compute_capability": "8.9"}
    assert entry["decoder"]["profiles"][1]["name"] == "batch"
    assert "LayerNormalization" in entry["encoder"]["fp32_summary"] and entry["encoder"]["fp32_nodes"]
    check = entry["encoder"]["fp16_check"]  # the activations on a photo against FP16's range, before the build
    assert check["refused"] is None and check["tensors_measured"] > 500, check
    env = EngineEnvironment("10.3.0.99", "NVIDIA Test GPU", "8.9")
    paths = check_engines(m, "fp16", env)
    assert paths["decoder"].read_bytes() == b"fake plan 2"
    with pytest.raises(EngineMismatchError):
        check_engines(m, "fp16", EngineEnvironment("10.3.0.99", "NVIDIA A100-SXM4-80GB", "8.0"))
    # INT8 is refused where TensorRT has no calibrators (TensorRT 11), before anything is built
    calib = tmp_path / "calib"
    calib.mkdir()
    cv2.imwrite(str(calib / "a.png"), photo("coffee")[..., ::-1])
    assert main(["build-engine", "--model-dir", str(d), "--int8", "--calib-images", str(calib), "--quiet"]) == 2
    assert "int8" not in Manifest.load(d).data["engines"]


def test_embedding_features_must_fit_the_model(tiny_model, coffee):
    """A GPU backend refuses features of the wrong shape when uploading (checked here on the TensorRT helper)."""
    from sam2rt.runtime.backends.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend.__new__(TensorRTBackend)  # no engines: only the shape check runs
    backend._feature_shapes = {"image_embed": (1, 256, 64, 64), "high_res_feats_0": (1, 32, 256, 256),
                               "high_res_feats_1": (1, 64, 128, 128)}
    backend._enc = types.SimpleNamespace(dtypes={k: np.dtype(np.float32) for k in backend._feature_shapes})
    with pytest.raises(InvalidEmbeddingError, match="image_embed has shape"):
        backend.upload_features({"image_embed": np.zeros((1, 256, 32, 32), np.float32),
                                 "high_res_feats_0": np.zeros((1, 32, 256, 256), np.float32),
                                 "high_res_feats_1": np.zeros((1, 64, 128, 128), np.float32)})


def test_build_engine_refuses_fp16_where_the_weights_overflow_it(model_dir, tmp_path, monkeypatch, capsys):
    """An encoder whose activations pass FP16's range (as a trained model's may): `build-engine --fp16` says so and
    builds nothing (on a Jetson that saves minutes of building an engine that would give NaN masks)."""
    import json
    import shutil

    from sam2rt.manifest import sha256_file
    from sam2rt.runtime import gpu
    from test_device_path import _scaled_layernorm_encoder

    d = Path(shutil.copytree(model_dir, tmp_path / "m"))
    _scaled_layernorm_encoder(d / "encoder.onnx", 300.0)
    data = json.loads((d / "manifest.json").read_text())
    data["graphs"]["encoder"]["sha256"] = sha256_file(d / "encoder.onnx")
    (d / "manifest.json").write_text(json.dumps(data))
    fake = _FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(gpu, "set_device", lambda device=0: None)
    monkeypatch.setattr(gpu, "gpu_info", lambda device=0: gpu.GpuInfo(0, "NVIDIA Test GPU", "8.9", 1 << 34, False))
    assert main(["build-engine", "--model-dir", str(d), "--fp16", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the FP16 encoder is not usable with these weights: 1 of its FP16 tensors pass FP16's range" in err, err
    assert fake.calls == [] and "fp16" not in (Manifest.load(d).data.get("engines") or {})
