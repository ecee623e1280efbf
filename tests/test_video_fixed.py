"""Fixed-shape sessions (runtime/backends/fixed_shapes.py: CUDA graphs on a GPU) and the video graphs' use of them, on
the CPU provider.

- which input shapes get fixed buffers: those run on CAPTURE_AFTER distinct frames, at most MAX_FIXED_SHAPES per
  graph, a stale one giving way; a fixed session that computes something else, or cannot be made, is never used;
- results are the caller's own (a later replay never changes them) and equal the plain session's;
- the tracker with fixed buffers tracks exactly as without, through the memory bank's warm-up (never captured),
  a correction and a second object added mid-stream.
tests/test_gpu.py runs the same tracker on CUDA with real graph capture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from test_video import pan_clip, patch_mask, point_prompt


def _scale_graph(path: Path, factor: float) -> Path:
    """y = factor * x for x of shape (n, 4): a graph with one symbolic dimension."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])], "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor("k", TensorProto.FLOAT, [], [factor])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


class _Clock:
    def __init__(self) -> None:
        self.frame = 0

    def __call__(self) -> int:
        return self.frame


@pytest.fixture
def scaled(tmp_path):
    from sam2rt.runtime.backends.ort_pipeline import GRAPH_DIR
    from sam2rt.runtime.backends.fixed_shapes import FixedShapeSession
    from sam2rt.runtime.backends.bound_session import BoundSession
    from sam2rt.runtime.backends.device_copy import DeviceCopier
    from sam2rt.runtime.video.sessions import create_session

    path = _scale_graph(tmp_path / "double.onnx", 2.0)
    clock = _Clock()
    copy = DeviceCopier(lambda name: create_session(GRAPH_DIR / f"{name}.onnx"))
    make = {"session": lambda graph, dims: create_session(path, graph=graph, dims=dims)}  # tests may replace it
    session = FixedShapeSession(BoundSession(create_session(path)), lambda graph, dims: make["session"](graph, dims),
                                copy, clock)
    session.make = make
    return session, clock, tmp_path


def _x(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def test_a_shape_gets_fixed_buffers_after_capture_after_frames(scaled):
    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER

    session, clock, _ = scaled
    for i in range(2 * CAPTURE_AFTER):  # many runs on one frame: one frame
        session.run({"x": _x(2, i)})
    assert session.status == {} and session.replays == 0
    for frame in range(2, CAPTURE_AFTER + 1):  # distinct frames 1..CAPTURE_AFTER: fixed on the last
        clock.frame = frame
        np.testing.assert_array_equal(session.run({"x": _x(2, frame)})[0], 2 * _x(2, frame))
    assert list(session.status.values()) == ["fixed buffers"] and session.replays == 0
    assert set(session.seconds.values()) == {0.0}  # plain runs are not replays
    results = [session.run({"x": _x(2, 100 + i)})[0] for i in range(3)]
    assert session.replays == 3
    assert all(v > 0 for v in session.seconds.values()), session.seconds  # inputs in, the replay, outputs out
    for i, y in enumerate(results):  # each result the caller's own: later replays did not touch it
        np.testing.assert_array_equal(y, 2 * _x(2, 100 + i))
    np.testing.assert_array_equal(session.run({"x": _x(5, 7)})[0], 2 * _x(5, 7))  # another shape: the plain session
    assert session.replays == 3


def test_a_device_input_is_copied_into_its_buffer_only_when_it_is_another_tensor(scaled):
    """Device inputs (a frame's features, shared by its objects): the same tensor again is not copied again; another
    tensor, even with the same values, is; every result is right."""
    import onnxruntime as ort

    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER
    from sam2rt.runtime.backends.onnxruntime_backend import OrtDeviceTensor

    session, clock, _ = scaled

    def device(x):
        return OrtDeviceTensor(ort.OrtValue.ortvalue_from_numpy(x))

    for frame in range(1, CAPTURE_AFTER + 1):  # fixed on the last
        clock.frame = frame
        session.run({"x": device(_x(2, frame))})
    before = session._copy.runs  # copy runs (the outputs here come down to the host: none copied out)
    shared = device(_x(2, 50))
    for _ in range(3):  # three objects of one frame
        np.testing.assert_array_equal(session.run({"x": shared})[0], 2 * _x(2, 50))
    assert session._copy.runs - before == 1 and session.replays == 3
    np.testing.assert_array_equal(session.run({"x": device(_x(2, 50))})[0], 2 * _x(2, 50))  # another tensor
    np.testing.assert_array_equal(session.run({"x": device(_x(2, 51))})[0], 2 * _x(2, 51))
    assert session._copy.runs - before == 3


def test_at_most_max_fixed_shapes_and_stale_ones_give_way(scaled):
    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER, MAX_FIXED_SHAPES

    session, clock, _ = scaled
    sizes = list(range(1, MAX_FIXED_SHAPES + 2))  # one shape more than fit
    for frame in range(1, CAPTURE_AFTER + 1):
        clock.frame = frame
        for n in sizes:
            session.run({"x": _x(n, frame)})
    assert len(session.status) == MAX_FIXED_SHAPES
    assert all(f"(('x', ({sizes[-1]}, 4)),)" != k for k in session.status)  # no room: the last one runs plain
    for frame in range(CAPTURE_AFTER + 1, 3 * CAPTURE_AFTER + 1):  # only the last shape is used: the others go stale
        clock.frame = frame
        np.testing.assert_array_equal(session.run({"x": _x(sizes[-1], frame)})[0], 2 * _x(sizes[-1], frame))
    assert f"(('x', ({sizes[-1]}, 4)),)" in session.status and len(session.status) == MAX_FIXED_SHAPES
    assert f"(('x', ({sizes[0]}, 4)),)" not in session.status  # the least recently used gave way


@pytest.mark.parametrize("failure", ["differs", "cannot be made"])
def test_a_fixed_session_that_differs_or_fails_is_never_used(scaled, failure):
    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER
    from sam2rt.runtime.video.sessions import create_session

    session, clock, tmp = scaled
    wrong = _scale_graph(tmp / "triple.onnx", 3.0)

    def fake(graph, dims):
        if failure == "differs":  # as if ONNX Runtime's fixed-dimension fusions computed something else
            return create_session(wrong, graph=graph, dims=dims)
        raise RuntimeError("This session cannot use the graph capture feature: a node is on the CPU")

    session.make["session"] = fake
    for frame in range(1, 3 * CAPTURE_AFTER):
        clock.frame = frame
        np.testing.assert_array_equal(session.run({"x": _x(3, frame)})[0], 2 * _x(3, frame))
    [status] = session.status.values()
    assert status.startswith("rejected" if failure == "differs" else "not captured"), status
    assert session.replays == 0


def test_a_fixed_session_whose_masks_differ_at_all_is_never_used(tmp_path):
    """Bool outputs (masks) are held to equality, not to the float tolerance: one value of 400 flipped rejects."""
    import onnx
    from onnx import TensorProto, helper

    from sam2rt.runtime.backends.bound_session import BoundSession
    from sam2rt.runtime.backends.device_copy import DeviceCopier
    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER, FixedShapeSession
    from sam2rt.runtime.backends.ort_pipeline import GRAPH_DIR
    from sam2rt.runtime.video.sessions import create_session

    def above(name: str, k: float) -> Path:
        graph = helper.make_graph(
            [helper.make_node("Greater", ["x", "k"], ["y"])], "above",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
            [helper.make_tensor_value_info("y", TensorProto.BOOL, ["n", 4])],
            [helper.make_tensor("k", TensorProto.FLOAT, [], [k])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / name)
        return tmp_path / name

    right, wrong = above("right.onnx", 0.5), above("wrong.onnx", 0.55)
    clock = _Clock()
    session = FixedShapeSession(BoundSession(create_session(right)),
                                lambda graph, dims: create_session(wrong, graph=graph, dims=dims),
                                DeviceCopier(lambda name: create_session(GRAPH_DIR / f"{name}.onnx")), clock)
    x = np.full((100, 4), 0.1, np.float32)
    x[50, 2] = 0.52  # the one value between the two thresholds
    for frame in range(1, 2 * CAPTURE_AFTER):
        clock.frame = frame
        np.testing.assert_array_equal(session.run({"x": x})[0], x > 0.5)
    [status] = session.status.values()
    assert status.startswith("rejected") and "1 of 400 values differ" in status, status
    assert session.replays == 0


@pytest.mark.parametrize("as_float", [False, True], ids=["bool masks", "float mask_values"])
@pytest.mark.parametrize("flips", [1, 2])
def test_bool_flips_admits_that_many_flipped_mask_values_and_no_more(tmp_path, flips: int, as_float: bool):
    """`bool_flips` (the merged decode graphs': their TF32 logits may round across the threshold) admits that fraction
    of a bool output's values differing in the first replay; one more rejects. The same holds for float 0/1 masks
    (`mask_values`, what the Predictor asks for), not held to the float tolerance. `capture_after=1` fixes a
    signature on its first run."""
    import onnx
    from onnx import TensorProto, helper

    from sam2rt.runtime.backends.bound_session import BoundSession
    from sam2rt.runtime.backends.device_copy import DeviceCopier
    from sam2rt.runtime.backends.fixed_shapes import FixedShapeSession
    from sam2rt.runtime.backends.ort_pipeline import GRAPH_DIR
    from sam2rt.runtime.video.sessions import create_session

    out = "mask_values" if as_float else "y"

    def above(name: str, k: float) -> Path:
        nodes = [helper.make_node("Greater", ["x", "k"], ["y"])]
        if as_float:
            nodes.append(helper.make_node("Cast", ["y"], [out], to=TensorProto.FLOAT))
        graph = helper.make_graph(
            nodes, "above", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT if as_float else TensorProto.BOOL, ["n", 4])],
            [helper.make_tensor("k", TensorProto.FLOAT, [], [k])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / name)
        return tmp_path / name

    right, rounded = above("right.onnx", 0.5), above("rounded.onnx", 0.55)
    session = FixedShapeSession(BoundSession(create_session(right)),
                                lambda graph, dims: create_session(rounded, graph=graph, dims=dims),
                                DeviceCopier(lambda name: create_session(GRAPH_DIR / f"{name}.onnx")), _Clock(),
                                capture_after=1, bool_flips=1 / 400)
    x = np.full((100, 4), 0.1, np.float32)
    x[50, :flips] = 0.52  # values between the two thresholds: `flips` of 400 differ
    np.testing.assert_array_equal(session.run({"x": x})[0], x > 0.5)  # the first run: the plain session's result
    [status] = session.status.values()
    if flips == 1:
        assert status == "fixed buffers" and session.refused({"x": x}) is None
        np.testing.assert_array_equal(session.run({"x": x})[0], x > 0.55)  # replayed: the fixed session's rounding
        assert session.replays == 1
    else:
        assert status.startswith("rejected") and "2 of 400 values differ" in status, status
        assert session.refused({"x": x}) == status and session.replays == 0


def test_tracker_with_fixed_buffers_tracks_exactly_as_without(tiny_video_dir: Path):
    """24 frames (the bank fills at frame 16), a second object added on frame 6 and a correction on frame 21:
    the fixed-buffer graphs give the same results bit for bit; the bank's warm-up shapes were never fixed."""
    from sam2rt.graph_table import VIDEO_DEVICE_SLOTS
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Sam2Model, VideoTracker
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend
    from sam2rt.runtime.video.graphs import VideoGraphs

    m = Manifest.load(tiny_video_dir)
    frames, corners = pan_clip(24)
    runs = {}
    for fixed in (False, True):
        graphs = VideoGraphs(m, "onnxruntime-cpu", slots=VIDEO_DEVICE_SLOTS, fixed_buffers=fixed)
        # fixed=True: the image backend and its pre/postprocessing through fixed buffers too, the whole GPU flow
        backend = OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=fixed)
        tracker = VideoTracker(Sam2Model(m, backend), graphs, fill_hole_area=0)
        out = [tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))]
        logits = []
        for i, f in enumerate(frames[1:], start=1):
            out.append(tracker.track(f))
            if i == 6:
                out.append(tracker.add_prompt(2, mask=patch_mask(corners[i])))
            if i == 21:
                out.append(tracker.add_prompt(1, points=[[100.0, 100.0]], labels=[0]))
            logits.append({k: v.copy() for k, v in tracker.low_res_logits.items()})
        runs[fixed] = (out, logits, graphs, backend)
    (plain_out, plain_logits, _, _), (fixed_out, fixed_logits, graphs, backend) = runs[False], runs[True]
    for a, b in zip(plain_logits + plain_out, fixed_logits + fixed_out):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    status = graphs.fixed_status
    # the stand-in has the tracked frames' decoder (track_decoder.tracking.onnx): it replaces the tracking decoder there
    assert graphs.fixed_slots == ("memory_attention", "tracking_decoder", "memory_encoder")
    assert set(status) == set(graphs.fixed_slots)
    for role in graphs.fixed_slots:
        assert graphs.sessions[role].replays > 0, role
        assert set(status[role].values()) == {"fixed buffers"}, status[role]
    pipeline = backend.pipeline_graphs  # each frame preprocessed, each object's masks upsampled: one shape each
    assert [set(pipeline[g].values()) for g in ("preprocess", "upsample")] == [{"fixed buffers"}] * 2, pipeline
    layout = graphs.layout
    [memory_shape] = status["memory_attention"]  # only the full bank: (all memories, all pointers)
    assert f"('mem_feats', ({layout.mem_slots}, " in memory_shape and f"('obj_ptrs', ({layout.ptr_slots}, " in memory_shape


# inputs of these operators that are shapes, sizes or axes: computed ones make ONNX Runtime's CUDA provider place the
# arithmetic behind them on the CPU, and a graph with a node on the CPU cannot be captured as a CUDA graph
SHAPE_INPUTS = {"Reshape": [1], "Slice": [1, 2, 3, 4], "Tile": [1], "Expand": [1], "ConstantOfShape": [0],
                "Unsqueeze": [1], "Squeeze": [1], "Range": [0, 1, 2], "Resize": [1, 2, 3], "Split": [1], "Pad": [1],
                "ReduceSum": [1], "ReduceMean": [1], "TopK": [1]}


def _computed_shape_inputs(path: Path, dims: dict[str, int], out: Path) -> list[str]:
    """Nodes left with a computed shape input after ONNX Runtime's basic (provider-independent) optimisation."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    for name, size in dims.items():
        so.add_free_dimension_override_by_name(name, size)
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(out), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    return [f"{n.op_type} {n.name}" for n in graph.node for i in SHAPE_INPUTS.get(n.op_type, [])
            if i < len(n.input) and n.input[i] and n.input[i] not in constants]


def test_settled_shapes_leave_no_shape_arithmetic_for_the_cpu(model_dir: Path, tmp_path: Path):
    """The real export's GPU video graphs (FP32 and FP16), with their dimensions fixed at the tracker's steady shapes
    as FixedShapeSession fixes them, fold every shape computation into constants: nothing for ONNX Runtime to put on
    the CPU, so CUDA-graph capture is possible. With the dimensions left symbolic, the memory attention and the
    tracking decoder do compute shapes (the check sees them)."""
    from sam2rt.graph_table import VIDEO_DEVICE_SLOTS, VIDEO_FP16_SLOTS
    from sam2rt.manifest import Manifest
    from sam2rt.runtime.backends.onnxruntime_backend import slot_entries
    from sam2rt.runtime.backends.fixed_shapes import fixed_dims
    from sam2rt.runtime.video.graphs import FIXED_ROLES, TRACKING_SLOT, VideoGraphs
    from sam2rt.runtime.video.heads import NO_POINTS_COORDS, NO_POINTS_LABELS

    m = Manifest.load(model_dir)
    layout = VideoGraphs(m, "onnxruntime-cpu").layout
    c, h, w = layout.mem_dim, *layout.feat_hw
    steady = {"mem_feats": (layout.mem_slots, c, h, w), "mem_tpos": (layout.mem_slots,),
              "obj_ptrs": (layout.ptr_slots, layout.hidden_dim), "ptr_pos": (layout.ptr_slots,),
              "point_coords": NO_POINTS_COORDS.shape, "point_labels": NO_POINTS_LABELS.shape}
    import onnx

    checked = 0
    for table in (VIDEO_DEVICE_SLOTS, VIDEO_FP16_SLOTS):
        entries = slot_entries(m, table)
        for role in (*FIXED_ROLES, TRACKING_SLOT):  # the tracked frames' decoder: the tracking form or the full one
            path = model_dir / entries[role]["file"]
            inputs = onnx.load(str(path), load_external_data=False).graph.input
            symbolic = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in inputs}
            dims = fixed_dims(symbolic, {k: v for k, v in steady.items() if k in symbolic})
            left = _computed_shape_inputs(path, dims, tmp_path / f"fixed_{path.name}")
            assert left == [], f"{path.name} with {dims}: {left[:5]}"
            if role not in ("memory_encoder", TRACKING_SLOT):  # their shapes are static: nothing to fix
                assert dims and _computed_shape_inputs(path, {}, tmp_path / f"free_{path.name}"), path.name
            checked += 1
    assert checked == 2 * (len(FIXED_ROLES) + 1)
