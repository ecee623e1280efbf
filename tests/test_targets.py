"""Lean exports (`sam2rt export --target`): which graphs each target keeps, what the manifest says about the
others, and the typed error a backend raises for a directory exported for other targets.

Quick tests narrow copies of a directory with `export.targets.keep_only` (the export's own last step): the tiny
stand-in model, and hard links to the session's full export (tests/conftest.py). Real `--target` exports are
in the slow suite.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from sam2rt.errors import ExportError, GraphNotExportedError
from sam2rt.graph_table import CPU, CUDA, GRAPHS, TENSORRT, graph_file, parse_targets, rows_for_targets, rows_to_make
from sam2rt.manifest import Manifest

# the video graphs go with every target (with the tracked frames' tracking form of the tracking decoder); the CPU's
# memory attention is its com.microsoft MultiHeadAttention variant
VIDEO = {"memory_encoder.onnx", "memory_attention.onnx", "track_decoder.onnx", "mask_downsample.onnx",
         "track_decoder.tracking.onnx"}
CPU_VIDEO = VIDEO - {"memory_attention.onnx"} | {"memory_attention.fused.onnx"}


def files_of(rows) -> set[str]:
    return {g.file for g in rows}


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy whose graph files are hard links (no 700 MB copy); manifest.json is a real copy, since keep_only
    rewrites it."""
    def link_or_copy(s: str, d: str) -> None:
        if Path(s).name == "manifest.json":
            shutil.copy2(s, d)
        else:
            os.link(s, d)

    return Path(shutil.copytree(src, dst, copy_function=link_or_copy))


def made_by_default(g) -> bool:  # sam2rt export's defaults: optimised copies and the FP16 encoder, no INT8
    return g.maker != "int8"


# --- the table -----------------------------------------------------------------------------------
def test_each_target_keeps_the_rows_its_backend_runs():
    cpu = rows_for_targets(["cpu"], made_by_default)
    assert files_of(cpu) == {g.file for g in GRAPHS if CPU in g.runs_on and g.maker != "int8"}
    assert files_of(cpu) == {"encoder.opt.onnx", "decoder.opt.onnx", "decoder_nomask.opt.onnx", "decoder_prep.opt.onnx",
                             "decoder_fast.opt.onnx"} | CPU_VIDEO  # one encoder, not three
    cuda = rows_for_targets(["cuda"], made_by_default)
    assert files_of(cuda) == {g.file for g in GRAPHS if CUDA in g.runs_on and g.maker != "int8"}
    # the GPU's memory attention is its compact form (valid slots only), the static one is TensorRT's
    assert "memory_attention.device.onnx" in files_of(cuda) and "memory_attention.onnx" not in files_of(cuda)
    assert files_of(rows_for_targets(["tensorrt"], made_by_default)) == {"encoder.onnx", "decoder.onnx"} | VIDEO
    # every graph but the opt-in INT8 encoder, decoder_fast.onnx and encoder.fused.onnx, which are made only as the
    # sources of the CPU's optimised copies (their GPU forms are decoder_fast.device.onnx and encoder.device.onnx),
    # and the FP16 copy of the fused encoder, which exports made before the `device` form hold
    assert files_of(rows_for_targets(parse_targets("all"), made_by_default)) == \
        {g.file for g in GRAPHS if g.maker != "int8"} - {"decoder_fast.onnx", "encoder.fused.onnx", "encoder.fused.fp16.onnx"}
    assert {"encoder.device.onnx", "encoder.device.fp16.onnx"} <= files_of(cuda)
    # the CPU's encoder is made from the fused one, which is made (and verified) but not kept; no FP16 encoder
    made = files_of(rows_to_make(cpu))
    assert {"encoder.fused.onnx", "encoder.onnx", "decoder_fast.onnx"} <= made and "encoder.fused.fp16.onnx" not in made
    assert "encoder.device.onnx" not in made  # the GPU's encoder form: not for a cpu export
    assert "memory_attention.onnx" in made  # every role's base graph is made: its sha256 identifies the export
    assert files_of(rows_to_make(rows_for_targets(["tensorrt"], made_by_default))) == {"encoder.onnx", "decoder.onnx"} | VIDEO
    # without the optimised copies the CPU keeps what its slots fall back to
    from sam2rt.export.targets import made_by

    plain = rows_for_targets(["cpu"], made_by(optimize=False, fp16=False))  # torch.onnx's and sam2rt's own rows
    assert files_of(plain) == {"encoder.fused.onnx", "decoder.onnx", "decoder_nomask.onnx", "decoder_prep.onnx",
                               "decoder_fast.onnx"} | CPU_VIDEO
    assert parse_targets("tensorrt,cpu") == ("cpu", "tensorrt")
    with pytest.raises(ValueError, match="choose from cpu, cuda, tensorrt, all"):
        parse_targets("gpu")


def test_default_targets_follow_the_installed_runtime(monkeypatch):
    import sys
    import types

    import onnxruntime

    from sam2rt.export.targets import default_targets

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert default_targets() == ("cpu",)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert default_targets() == ("cuda",)
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert default_targets() == ("cuda", "tensorrt")


# --- the tiny stand-in model ------------------------------------------------------------------------
@pytest.fixture()
def tiny_copy(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny"))


def test_tensorrt_export_on_the_cpu_backend_names_the_export_that_fixes_it(tiny_copy):
    from sam2rt.export.targets import keep_only
    from sam2rt.runtime import Sam2Model

    keep_only(tiny_copy, ["tensorrt"])
    assert sorted(p.name for p in tiny_copy.iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json"]
    fix = f"sam2rt export --model tiny_test --random-weights 0 --target cpu,tensorrt --out {tiny_copy}"
    with pytest.raises(GraphNotExportedError, match="exported with --target tensorrt") as info:
        Sam2Model.from_dir(tiny_copy, backend="onnxruntime-cpu")
    assert fix in str(info.value)
    with pytest.raises(Exception) as info:  # `auto` tries every backend and lists why each cannot run it
        Sam2Model.from_dir(tiny_copy, backend="auto")
    assert f"onnxruntime-cpu: {tiny_copy} was exported with --target tensorrt" in str(info.value)
    # and what is left out is recorded, with the option that writes it
    export = Manifest.load(tiny_copy).data["export"]
    assert export["targets"] == ["tensorrt"] and export["written"] == ["encoder.onnx", "decoder.onnx"]
    assert export["left_out"]["encoder.opt.onnx"].startswith("--target cpu")


def test_cpu_and_cuda_exports_run_on_the_cpu_backend_with_the_same_masks(tiny_copy, tiny_model, tmp_path):
    from sam2rt.export.targets import keep_only
    from sam2rt.runtime import Prompt, Sam2Model

    image = (np.arange(300 * 400 * 3) % 251).astype(np.uint8).reshape(300, 400, 3)
    prompts = [Prompt(points=np.array([[10.0, 20.0]]), labels=np.array([1])), Prompt(box=np.array([0, 0, 50, 60])),
               Prompt(points=np.array([[5.0, 5.0]] * 12), labels=np.array([1] * 12))]
    full = tiny_model.decode(tiny_model.embed(image), prompts)
    cuda_copy = Path(shutil.copytree(tiny_copy, tmp_path / "cuda"))
    keep_only(tiny_copy, ["cpu"])
    keep_only(cuda_copy, ["cuda"])
    assert {p.name for p in tiny_copy.iterdir()} == {"manifest.json", "encoder.opt.onnx", "decoder.opt.onnx",
                                                     "decoder_nomask.opt.onnx", "decoder_prep.opt.onnx",
                                                     "decoder_fast.opt.onnx"}
    m = Manifest.load(tiny_copy)
    assert m.graph("encoder")["stored"] is False and m.graph("encoder")["sha256"]  # still says what it was
    for directory in (tiny_copy, cuda_copy):
        model = Sam2Model.from_dir(directory, backend="onnxruntime-cpu")
        out = model.decode(model.embed(image), prompts)
        assert np.array_equal(out.masks, full.masks) and np.allclose(out.low_res_logits, full.low_res_logits, atol=1e-5)
    assert Sam2Model.from_dir(cuda_copy, backend="onnxruntime-cpu").backend.files["encoder"]["file"] == "encoder.onnx"


def test_a_left_out_graph_names_the_export_that_writes_it(tiny_copy, capsys):
    from sam2rt.cli import main
    from sam2rt.export.targets import keep_only

    keep_only(tiny_copy, ["cpu"])
    m = Manifest.load(tiny_copy)
    with pytest.raises(GraphNotExportedError, match=r"encoder.onnx is not in this export.*--target cpu,tensorrt"):
        m.verify_graph("encoder")
    # build-engine needs encoder.onnx + decoder.onnx: it says which export writes them, before TensorRT is imported
    assert main(["build-engine", "--model-dir", str(tiny_copy), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--target cpu,tensorrt" in err and "Traceback" not in err
    # the INT8 encoder: the export option that writes it
    with pytest.raises(GraphNotExportedError, match=r"--target cpu --out .* --int8"):
        from sam2rt.runtime.backends.onnxruntime_backend import cpu_graph_entries

        cpu_graph_entries(m, "int8")
    # a directory is only narrowed
    with pytest.raises(ExportError, match="cannot be narrowed"):
        keep_only(tiny_copy, ["cpu", "tensorrt"])


def test_export_refuses_int8_without_the_cpu_target(tmp_path):
    from sam2rt.export import export_model
    from sam2rt.model_specs import get_spec

    with pytest.raises(ExportError, match="add cpu to --target"):
        export_model(get_spec("hiera_tiny"), tmp_path, random_seed=0, int8=True, targets=["cuda"], progress=False)
    with pytest.raises(ExportError, match="unknown export target"):
        export_model(get_spec("hiera_tiny"), tmp_path, random_seed=0, targets=["gpu"], progress=False)


# --- the session's real export -------------------------------------------------------------------------
def test_session_export_records_every_target(model_dir):
    m = Manifest.load(model_dir)
    export = m.data["export"]
    assert export["targets"] == ["cpu", "cuda", "tensorrt"]
    sources = {"decoder_fast.onnx", "encoder.fused.onnx"}  # made only as the sources of the CPU's optimised copies
    assert set(export["written"]) == {g.file for g in GRAPHS if g.maker != "int8"} - sources - {"encoder.fused.fp16.onnx"}
    assert all((model_dir / f).is_file() for f in export["written"])
    assert set(export["left_out"]) == sources | {"encoder.int8.onnx", "encoder.fused.fp16.onnx"}
    # no target's graphs: said so
    for name in sources:
        assert "--no-optimize" in export["left_out"][name] and "--target" not in export["left_out"][name]
    assert "no target writes it now" in export["left_out"]["encoder.fused.fp16.onnx"]  # replaced by encoder.device.fp16


def test_cpu_lean_copy_of_the_real_export(model_dir, sam2rt_model, tmp_path):
    """The real export narrowed to --target cpu: its CPU graphs plus the video graphs, masks equal to the full one's."""
    from sam2rt.export.targets import keep_only
    from sam2rt.runtime import Prompt, Sam2Model

    from conftest import photo

    lean = linked_copy(model_dir, tmp_path / "cpu")
    keep_only(lean, ["cpu"])
    expected = {g.file for g in GRAPHS if CPU in g.runs_on and g.maker != "int8"}
    assert {p.name for p in lean.iterdir()} == expected | {"manifest.json", "video_constants.npz"}
    m = Manifest.load(lean)
    fused = m.variant("encoder", "fused")
    assert fused["stored"] is False and m.variant("encoder", "optimized")["derived_from_sha256"] == fused["sha256"]
    for role in ("memory_encoder", "track_decoder", "mask_downsample", "video_constants"):
        m.verify_graph(role)
    assert m.graph("memory_attention")["stored"] is False  # the CPU runs its fused variant
    m.verify_file(m.variant("memory_attention", "fused"))
    image = photo("coffee")
    prompts = [Prompt(points=np.array([[300.0, 200.0]]), labels=np.array([1])), Prompt(box=np.array([50, 50, 500, 350])),
               Prompt(points=np.array([[300.0, 200.0]] * 11), labels=np.array([1] * 11))]
    model = Sam2Model.from_dir(lean, backend="onnxruntime-cpu")
    assert {e["file"] for e in model.backend.files.values()} <= expected
    emb, ref_emb = model.embed(image), sam2rt_model.embed(image)
    out, ref = model.decode(emb, prompts), sam2rt_model.decode(ref_emb, prompts)
    assert np.array_equal(out.masks, ref.masks) and np.array_equal(out.low_res_logits, ref.low_res_logits)
    refine = [Prompt(points=np.array([[300.0, 200.0]]), labels=np.array([1]), mask_input=ref.low_res_logits[0, 0])]
    assert np.array_equal(model.decode(emb, refine).low_res_logits, sam2rt_model.decode(ref_emb, refine).low_res_logits)


def test_tensorrt_lean_copy_of_the_real_export_passes_build_engine_checks(model_dir, tmp_path):
    import argparse

    from sam2rt.export.targets import keep_only
    from sam2rt.export.tensorrt_build import check_arguments

    lean = linked_copy(model_dir, tmp_path / "trt")
    keep_only(lean, ["tensorrt"])
    assert {p.name for p in lean.iterdir()} == {"encoder.onnx", "decoder.onnx", "manifest.json", "video_constants.npz"} | VIDEO
    args = argparse.Namespace(int8=False, calib_images=None, max_points=16, device=0, model_dir=lean)
    assert check_arguments(args).directory == lean


# --- real lean exports (slow: a full export each) --------------------------------------------------------------
def _export(out: Path, *options: str) -> tuple[str, str]:
    """`sam2rt export --model hiera_tiny --out OUT --quiet OPTIONS` in this process -> (stdout, stderr)."""
    from sam2rt.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["export", "--model", "hiera_tiny", "--out", str(out), "--quiet", *options])
    assert rc == 0, stderr.getvalue()
    return stdout.getvalue(), stderr.getvalue()


@pytest.mark.slow
def test_cpu_export(checkpoint_path, sam2rt_model, tmp_path):
    """`sam2rt export --target cpu`: the CPU's graphs and the video graphs, every graph made on the way verified,
    masks equal to the full export's."""
    from sam2rt.runtime import Prompt, Sam2Model

    from conftest import photo

    out = tmp_path / "cpu"
    printed, _ = _export(out, "--checkpoint", str(checkpoint_path), "--target", "cpu")
    assert "--target cpu: 10 graphs" in printed
    expected = {g.file for g in GRAPHS if CPU in g.runs_on and g.maker != "int8"}
    assert {p.name for p in out.iterdir()} == expected | {"manifest.json", "video_constants.npz"}
    m = Manifest.load(out)
    diffs = m.data["verification"]["max_abs_diff"]
    for label in ("encoder.", "encoder_fused.", "decoder.", "decoder_nomask.", "decoder_fast.", "memory_attention"):
        assert any(k.startswith(label) for k in diffs), label
    assert m.variant("encoder", "fp16") is None  # the CUDA provider's encoder is not made for the CPU
    assert m.graph("encoder")["sha256"] == sam2rt_model.manifest.graph("encoder")["sha256"]  # the same export
    image = photo("astronaut")
    prompts = [Prompt(points=np.array([[260.0, 120.0]]), labels=np.array([1])), Prompt(box=np.array([140, 20, 380, 300]))]
    model = Sam2Model.from_dir(out, backend="onnxruntime-cpu")
    got, ref = model.decode(model.embed(image), prompts), sam2rt_model.decode(sam2rt_model.embed(image), prompts)
    assert np.array_equal(got.masks, ref.masks) and np.allclose(got.low_res_logits, ref.low_res_logits, atol=1e-4)


@pytest.mark.slow
def test_tensorrt_export_of_random_weights(tmp_path):
    """`sam2rt export --target tensorrt --random-weights 7`: the two graphs TensorRT builds engines from and the video
    graphs; the ONNX Runtime forms are not even made. Built without a checkpoint, the export says RANDOM where it
    prints and where it records (one export for both: each costs over a minute)."""
    from sam2rt.runtime import Sam2Model

    out = tmp_path / "trt"
    stdout, stderr = _export(out, "--random-weights", "7", "--target", "tensorrt")
    assert "RANDOM" in stdout and "RANDOM" in stderr
    weights = json.loads((out / "manifest.json").read_text())["model"]["weights"]
    assert weights == {"random": True, "seed": 7, "checkpoint": None, "checkpoint_sha256": None}
    assert Manifest.load(out).describe_weights().startswith("RANDOM weights (seed 7)")
    assert {p.name for p in out.iterdir()} == {"encoder.onnx", "decoder.onnx", "manifest.json", "video_constants.npz"} | VIDEO
    m = Manifest.load(out)
    assert not m.graph("encoder").get("variants") and not m.graph("decoder").get("variants")
    assert {k.split(".")[0] for k in m.data["verification"]["max_abs_diff"] if k.startswith(("encoder", "decoder"))} == \
        {"encoder", "decoder"}
    with pytest.raises(GraphNotExportedError, match="--target cpu,tensorrt"):
        Sam2Model.from_dir(out, backend="onnxruntime-cpu")
    assert graph_file("encoder").runs_on == (TENSORRT,)
