"""The mixed-FP16 converter's casts (sam2rt/export/fp16.py): FP32 nodes compute in FP32 from end to end of a chain, and
no cast is left that changes nothing (each is a kernel launch over a whole activation on a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxconverter_common")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from sam2rt.export.fp16 import FLOAT, FLOAT16, convert_to_mixed_fp16  # noqa: E402


def _save(nodes, inputs, outputs, path: Path, initializers=()) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(path: Path, **feeds: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written, casts included
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _casts(path: Path) -> list[tuple[str, int]]:
    """(input, to) of every Cast of the graph."""
    g = onnx.load(str(path)).graph
    return [(n.input[0], next(a.i for a in n.attribute if a.name == "to")) for n in g.node if n.op_type == "Cast"]


def _norm_graph(tmp_path: Path) -> Path:
    """y = sqrt(mean(x ** 2) + eps) * w + x_mean: a normalisation's FP32 chain (Pow, ReduceMean, Add next to it,
    Sqrt) between FP16 arithmetic; x ** 2 is beyond FP16's range for |x| > 256, and eps = 1e-7 is subnormal in FP16."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Constant", [], ["two"], value=helper.make_tensor("two_v", f, [], [2.0])),
        helper.make_node("Constant", [], ["eps"], value=helper.make_tensor("eps_v", f, [], [1e-7])),
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[1], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["ms_eps"]),
        helper.make_node("Sqrt", ["ms_eps"], ["rms"]),
        helper.make_node("Mul", ["rms", "w"], ["scaled"]),
        helper.make_node("ReduceMean", ["x"], ["x_mean"], axes=[1], keepdims=1),
        helper.make_node("Add", ["scaled", "x_mean"], ["y"]),
    ]
    return _save(nodes, [helper.make_tensor_value_info("x", f, [1, 4])], [helper.make_tensor_value_info("y", f, [1, 1])],
                 tmp_path / "norm.onnx", [helper.make_tensor("w", f, [], [0.5])])


def test_an_fp32_chain_is_not_rounded_to_fp16_between_its_nodes(tmp_path):
    """x = 300: x ** 2 = 90000 overflows FP16. The converter cast each FP32 node's output to FP16 and back for the
    next FP32 node, so the chain gave inf; with the casts between FP32 nodes folded it computes in FP32 throughout."""
    src = _norm_graph(tmp_path)
    dst = tmp_path / "norm.fp16.onnx"
    convert_to_mixed_fp16(src, dst)
    x = np.full((1, 4), 300.0, np.float32)
    want = np.sqrt(np.float64(90000.0) + 1e-7) * 0.5 + 300.0
    (got,) = _run(dst, x=x)
    assert np.isfinite(got).all(), "the FP32 chain was rounded to FP16 between its nodes"
    assert abs(float(got[0, 0]) - want) <= 0.25, got  # the FP16 Mul/Add at the end round to 0.25 at 450
    # and no FP32 -> FP16 -> FP32 round trip is left anywhere
    g = onnx.load(str(dst)).graph
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:
        p = producer.get(n.input[0]) if n.op_type == "Cast" else None
        if p is not None and p.op_type == "Cast":
            pair = (next(a.i for a in p.attribute if a.name == "to"), next(a.i for a in n.attribute if a.name == "to"))
            assert pair != (FLOAT16, FLOAT), f"{p.name} -> {n.name} rounds an FP32 tensor to FP16 and back"


def test_constants_read_only_by_fp32_nodes_keep_their_fp32_value(tmp_path):
    """eps = 1e-7 is subnormal in FP16 (1.19e-7); x = 0 makes the result sqrt(eps) * 0.5, where that shows."""
    src = _norm_graph(tmp_path)
    dst = tmp_path / "norm.fp16.onnx"
    keep = convert_to_mixed_fp16(src, dst)
    assert list(keep.values()).count("Constant read by FP32 nodes") == 2, keep  # eps and the exponent
    (got,) = _run(dst, x=np.zeros((1, 4), np.float32))
    assert float(got[0, 0]) == pytest.approx(np.sqrt(1e-7) * 0.5, rel=2e-3)  # the FP16 Mul's rounding, not eps's


def test_a_tensor_is_cast_once_per_type(tmp_path):
    """An FP16 tensor read by three FP32 nodes is cast to FP32 once, not once per reader; an output stays FP32."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["m"]),  # FP16
        helper.make_node("Relu", ["m"], ["h"]),  # FP16
        helper.make_node("Sqrt", ["h"], ["a"]),  # three FP32 readers of h
        helper.make_node("Sin", ["h"], ["b"]),
        helper.make_node("Cos", ["h"], ["c"]),
        helper.make_node("Sum", ["a", "b", "c"], ["y"]),
    ]
    src = _save(nodes, [helper.make_tensor_value_info("x", f, [8])], [helper.make_tensor_value_info("y", f, [8])],
                tmp_path / "fan.onnx", [helper.make_tensor("w", f, [], [0.5])])
    dst = tmp_path / "fan.fp16.onnx"
    convert_to_mixed_fp16(src, dst)
    casts = _casts(dst)
    assert casts.count(("h", FLOAT)) == 1, casts
    assert len(casts) == len(set(casts)), f"duplicate casts: {casts}"
    x = np.linspace(0.1, 3.0, 8).astype(np.float32)
    (got,) = _run(dst, x=x)
    assert got.dtype == np.float32
    h = np.maximum(np.float16(x) * np.float16(0.5), np.float16(0))
    assert np.allclose(got, np.sqrt(h.astype(np.float32)) + np.sin(h.astype(np.float32)) + np.cos(h.astype(np.float32)),
                       atol=4e-3)
    assert onnx.load(str(dst)).graph.output[0].type.tensor_type.elem_type == FLOAT


def test_an_output_made_by_an_fp32_node_stays_fp32(tmp_path):
    """onnxconverter-common's keep_io_types declared such an output FP16 (a cast to FP16 under its name): the caller
    got float16 arrays, and a graph reading that output inside failed to load. It stays FP32, with its FP32 value."""
    src = _norm_graph(tmp_path)  # y comes from an Add next to a ReduceMean: an FP32 node
    dst = tmp_path / "norm.fp16.onnx"
    convert_to_mixed_fp16(src, dst)
    assert onnx.load(str(dst)).graph.output[0].type.tensor_type.elem_type == FLOAT
    x = np.array([[1.0, 2.0, 3.0, 4.00390625]], np.float32)  # a mean FP16 cannot hold: 2.5009765625
    (got,) = _run(dst, x=x)
    assert got.dtype == np.float32
    want = np.sqrt(np.mean(np.float64(x) ** 2) + 1e-7) * 0.5 + np.mean(np.float64(x))
    assert abs(float(got[0, 0]) - want) < 1e-5, (float(got[0, 0]), want)


def test_an_output_read_inside_the_graph_reaches_fp32_and_fp16_readers_in_their_types(tmp_path):
    """y (an FP32 node's result, a graph output) is also read by an FP32 node (ReduceMean -> z) and an FP16 one
    (Relu -> r): each reads it in its own type, and the graph loads (the converter gave the FP32 reader FP16)."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["x", "m"], ["y"]),  # next to a ReduceMean: FP32
        helper.make_node("ReduceMean", ["y"], ["z"], axes=[1], keepdims=1),
        helper.make_node("Relu", ["y"], ["r"]),
    ]
    outs = [helper.make_tensor_value_info("y", f, [1, 4]), helper.make_tensor_value_info("z", f, [1, 1]),
            helper.make_tensor_value_info("r", f, [1, 4])]
    src = _save(nodes, [helper.make_tensor_value_info("x", f, [1, 4])], outs, tmp_path / "read.onnx")
    dst = tmp_path / "read.fp16.onnx"
    convert_to_mixed_fp16(src, dst)
    x = np.array([[1.0, 2.0, 3.0, 4.0009765625]], np.float32)
    y, z, r = _run(dst, x=x)
    assert {a.dtype for a in (y, z, r)} == {np.dtype(np.float32)}
    want = x - x.mean(axis=1, keepdims=True)
    assert np.abs(y - want).max() < 1e-6  # FP32: 1.0009765625 - 2.500244140625 is not an FP16 number
    assert abs(float(z[0, 0])) < 1e-6
    assert np.abs(r - np.maximum(want, 0)).max() < 2e-3  # the FP16 reader: FP16 rounding


def test_the_tiny_stand_ins_fp16_video_graphs_load_and_track(tmp_path):
    """The stand-in's tracking decoder has an output an FP32 node reads inside: its FP16 copy failed to load."""
    from sam2rt.export.optimize import add_variants
    from sam2rt.export.tiny_model import build_tiny_model_dir
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Sam2Model, VideoTracker
    from sam2rt.runtime.video.graphs import VideoGraphs

    d = build_tiny_model_dir(tmp_path / "model", video=True).directory
    add_variants(d, optimized=False, fp16=True)
    model = Sam2Model.from_dir(d, backend="onnxruntime-cpu")
    tracker = VideoTracker(model, VideoGraphs(Manifest.load(d), "onnxruntime-cpu", precision="fp16"), fill_hole_area=0)
    assert tracker.graphs.entries["track_decoder"]["file"] == "track_decoder.fp16.onnx"
    assert tracker.graphs.entries["tracking_decoder"]["file"] == "track_decoder.tracking.fp16.onnx"
    frame = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    masks = tracker.add_prompt(1, box=[8, 8, 40, 30], frame=frame)
    for _ in range(3):
        masks = tracker.track(frame)
    assert set(masks) == {1} and masks[1].shape == (48, 64) and masks[1].dtype == bool
