"""The export's guard against MatMuls that ONNX Runtime's CUDA provider mis-runs (sam2rt/export/cuda_matmul.py).

No GPU is needed: the CUDA MatMul's choice of path is a function of the two operand shapes, which these tests
take from the graphs' runs on the CPU provider. What runs on a GPU is checked by tests/test_gpu.py there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sam2rt.errors import ExportError
from sam2rt.export.cuda_matmul import (
    GEMM, POINTER_ARRAYS, STRIDED, WRONG, cuda_matmul_path, cuda_matmul_problems, refuse_cuda_problems,
)
from sam2rt.graph_table import CUDA, GRAPHS


@pytest.mark.parametrize("left, right, path", [
    ((2, 1, 8192, 64), (2, 64, 64), WRONG),  # decoder_fast's upscaling: products 2 == 2, broadcast to (2, 2)
    ((1, 2, 5, 3), (2, 1, 3, 4), WRONG),
    ((2, 2, 5, 3), (2, 2, 3, 4), STRIDED),
    ((1, 8, 6, 16), (8, 16, 4096), STRIDED),  # equal once left-padded with ones
    ((2, 5, 3), (3, 4), GEMM),  # B a matrix: A's batch folds into its rows
    ((1, 1, 5, 3), (1, 3, 4), GEMM),  # one output matrix
    ((4096, 256), (2, 256, 128), POINTER_ARRAYS),  # A a matrix, B batched
    ((2, 2, 5, 3), (2, 3, 4), POINTER_ARRAYS),  # products 4 != 2
])
def test_the_cuda_path_of_each_operand_pair(left, right, path):
    assert cuda_matmul_path(left, right) == path


def _matmul_graph(b_shape: list[int], points: str | int = "num_points") -> onnx.ModelProto:
    """x (2, 1, P, 3) @ w (b_shape): the broadcast decoder_fast had, with a dynamic dimension in A."""
    w = numpy_helper.from_array(np.arange(np.prod(b_shape), dtype=np.float32).reshape(b_shape) / 10, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="upscale")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, points, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_broadcast_the_cuda_provider_gets_wrong_is_found_and_refused(tmp_path: Path):
    found = cuda_matmul_problems(_matmul_graph([2, 3, 4]))
    assert [(f.node, f.left, f.right, f.path) for f in found] == [("upscale", (2, 1, 2, 3), (2, 3, 4), WRONG)]
    bad = tmp_path / "bad.onnx"
    onnx.save(_matmul_graph([2, 3, 4]), bad)
    with pytest.raises(ExportError, match=r"bad.onnx .*'upscale' \(2, 1, 2, 3\) @ \(2, 3, 4\): batch shapes differ"):
        refuse_cuda_problems(bad)
    # the same product with a weight matrix, or with equal batch shapes, is fine
    assert cuda_matmul_problems(_matmul_graph([3, 4])) == []
    assert cuda_matmul_problems(_matmul_graph([2, 1, 3, 4])) == []
    onnx.save(_matmul_graph([3, 4]), tmp_path / "ok.onnx")
    refuse_cuda_problems(tmp_path / "ok.onnx")  # no error


def test_the_runtimes_own_device_graphs_compute_right_on_cuda_and_replay():
    """The pre/postprocessing graphs run on the GPU as captured CUDA graphs (fixed_shapes.py): none may hold a
    product the CUDA provider gets wrong, nor one whose pointer arrays a replay would read from freed host memory
    (preprocess.onnx's dense row resize did, a matrix times a batch, until it became block-banded)."""
    graphs = sorted((Path(__file__).parents[1] / "sam2rt" / "runtime" / "graphs").glob("*.onnx"))
    assert "preprocess.onnx" in [p.name for p in graphs]
    for path in graphs:
        assert cuda_matmul_problems(path, captured=True) == [], path.name


def test_the_fast_decoder_ships_a_gpu_form_without_them(model_dir):
    """The CPU's decoder_fast holds the broadcast the CUDA provider gets wrong (what made it disagree on the H100);
    the export's GPU form of it holds none, and every graph the export wrote for the CUDA provider passed the same
    check (the export refuses one that fails). Both forms equal decoder_nomask on the CPU provider."""
    import onnxruntime as ort

    from sam2rt.manifest import Manifest

    cpu_form, gpu_form = model_dir / "decoder_fast.opt.onnx", model_dir / "decoder_fast.device.onnx"
    assert {f.path for f in cuda_matmul_problems(cpu_form)} == {WRONG, POINTER_ARRAYS}
    assert cuda_matmul_problems(gpu_form) == []
    assert "decoder_fast.device.onnx" in {g.file for g in GRAPHS if CUDA in g.runs_on}
    assert "decoder_fast.onnx" not in {g.file for g in GRAPHS if CUDA in g.runs_on}

    m = Manifest.load(model_dir)
    rng = np.random.default_rng(1)
    shapes = {o["name"]: o["shape"] for o in m.graph("encoder")["outputs"]}
    feats = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}

    def session(name: str):
        return ort.InferenceSession(str(model_dir / name), providers=["CPUExecutionProvider"])

    prepared = dict(zip([o.name for o in session("decoder_prep.opt.onnx").get_outputs()],
                        session("decoder_prep.opt.onnx").run(None, feats)))
    prompt = {"point_coords": np.array([[[300.0, 500.0], [700.0, 200.0], [0.0, 0.0]]], np.float32),
              "point_labels": np.array([[1, 0, -1]], np.float32)}
    ref = session("decoder_nomask.opt.onnx").run(None, {**feats, **prompt})
    for form in (cpu_form, gpu_form):
        got = session(form.name).run(None, {**prepared, **prompt})
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
