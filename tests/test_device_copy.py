"""Device-to-device copies several per run (runtime/backends/device_copy.py), on the CPU provider, and the fixed-buffer
sessions' use of them: a replay's device inputs go in with one run and its device outputs come out with one run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _copier():
    from sam2rt.runtime.backends.device_copy import DeviceCopier
    from sam2rt.runtime.backends.ort_pipeline import GRAPH_DIR
    from sam2rt.runtime.video.sessions import create_session

    made = []
    copier = DeviceCopier(lambda name: (made.append(name), create_session(GRAPH_DIR / f"{name}.onnx"))[1])
    return copier, made


def _tensors(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(3,), (2, 5), (1, 4, 6), (2, 3, 4, 5), (7, 1), (1, 256, 8, 8), (4,), (2, 2, 2), (1, 1, 1, 9)]
    return [rng.standard_normal(shapes[i % len(shapes)]).astype(np.float32) for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9])
def test_copies_out_are_new_tensors_equal_to_their_sources(n):
    import onnxruntime as ort

    from sam2rt.runtime.backends.device_copy import MAX_COPIES_PER_GRAPH
    from sam2rt.runtime.backends.onnxruntime_backend import OrtDeviceTensor

    copier, made = _copier()
    arrays = _tensors(n)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    sources = [OrtDeviceTensor(v) if i % 2 else v for i, v in enumerate(values)]  # OrtValues or device tensors
    copies = copier.out(sources)
    assert copier.runs == -(-n // MAX_COPIES_PER_GRAPH)  # one run per group of at most four
    assert set(made) <= {"copy", "copy_2", "copy_3", "copy_4"}
    want = [a.copy() for a in arrays]
    for a in arrays:
        a += 100.0  # the sources change afterwards (an OrtValue made from numpy shares its memory): the copies do not
    for got, w in zip(copies, want):
        np.testing.assert_array_equal(got.numpy(), w)


@pytest.mark.parametrize("n", [1, 3, 4, 6])
def test_copies_into_buffers_write_each_buffer_whole(n):
    import onnxruntime as ort

    copier, _ = _copier()
    arrays = _tensors(n, seed=1)
    buffers = [ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), np.float32, "cpu", 0) for a in arrays]
    before = [b.data_ptr() for b in buffers]
    copier.into([(ort.OrtValue.ortvalue_from_numpy(a), b) for a, b in zip(arrays, buffers)])
    assert [b.data_ptr() for b in buffers] == before  # written where they are (a captured graph reads these addresses)
    for a, b in zip(arrays, buffers):
        np.testing.assert_array_equal(b.numpy(), a)
    assert copier.runs == (1 if n <= 4 else 2)


def _three_in_two_out(path: Path) -> Path:
    """sum = a + b, twice = 2 c: three float inputs of one symbolic size, two outputs."""
    import onnx
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["c", "k"], ["twice"])], "three",
        [helper.make_tensor_value_info(n, f, ["n", 4]) for n in "abc"],
        [helper.make_tensor_value_info(n, f, ["n", 4]) for n in ("sum", "twice")],
        [helper.make_tensor("k", f, [], [2.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_replay_copies_its_device_inputs_in_one_run_and_its_device_outputs_out_in_one(tmp_path):
    import onnxruntime as ort

    from sam2rt.runtime.backends.bound_session import BoundSession
    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER, FixedShapeSession
    from sam2rt.runtime.backends.onnxruntime_backend import OrtDeviceTensor
    from sam2rt.runtime.video.sessions import create_session

    path = _three_in_two_out(tmp_path / "three.onnx")
    copier, _ = _copier()
    clock = {"t": 0}
    session = FixedShapeSession(BoundSession(create_session(path)), lambda graph, dims: create_session(path, dims=dims),
                                copier, lambda: clock["t"])

    def feeds(seed: int) -> tuple[dict, list[np.ndarray]]:
        arrays = [np.random.default_rng(seed + i).standard_normal((2, 4)).astype(np.float32) for i in range(3)]
        return {n: OrtDeviceTensor(ort.OrtValue.ortvalue_from_numpy(a)) for n, a in zip("abc", arrays)}, arrays

    for t in range(1, CAPTURE_AFTER + 1):  # fixed buffers from the last of these
        clock["t"] = t
        session.run(feeds(t)[0], device_outputs=("sum", "twice"))
    assert session.replays == 0 and list(session.status.values()) == ["fixed buffers"]
    results = []
    for seed in (100, 200):
        before = copier.runs
        f, (a, b, c) = feeds(seed)
        out = session.run(f, device_outputs=("sum", "twice"))
        assert copier.runs - before == 2  # three tensors in, two out: a run each way
        results.append((out, a + b, 2 * c))
    assert session.replays == 2
    for (got_sum, got_twice), want_sum, want_twice in results:  # each result its own: the second replay kept the first's
        assert isinstance(got_sum, OrtDeviceTensor) and isinstance(got_twice, OrtDeviceTensor)
        np.testing.assert_allclose(got_sum.to_host(), want_sum, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got_twice.to_host(), want_twice, rtol=0, atol=1e-6)
