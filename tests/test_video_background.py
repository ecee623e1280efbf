"""VideoTracker with background memory: a tracked frame's memory encoding and bank store on the tracker's memory thread,
after its masks are returned (the GPU's default).

On the tiny stand-in's graphs (quick), CPU provider: the same results as encoding inline, through prompts, a new object,
a correction, a removal, prefetch and state files; the memory work really running after the masks; fixed buffers (whose
captures need the GPU lock exclusively from the memory thread) without a deadlock; and a failure of the memory work
raised, with the tracker refusing to go on until reset().
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from test_video import BOX_PROMPT, pan_clip, point_prompt
from test_video_prefetch import _assert_same


def _tracker(model, background: bool, fixed_buffers: bool | None = None):
    from sam2rt.runtime import VideoTracker
    from sam2rt.runtime.video.graphs import VideoGraphs

    graphs = VideoGraphs(model.manifest, model.backend_name, precision=model.backend.precision, fixed_buffers=fixed_buffers)
    return VideoTracker(model, graphs, fill_hole_area=0, background_memory=background)


@pytest.fixture(scope="module")
def model(tiny_video_dir: Path):
    from sam2rt.runtime import Sam2Model

    m = Sam2Model.from_dir(tiny_video_dir, backend="onnxruntime-cpu")
    yield m
    m.close()


def _stream(tracker, frames, corners, tmp_path: Path, prefetch: bool = False) -> list:
    """Prompts on frame 0, a new object at frame 2, a correction at frame 4, a removal at frame 5, a state saved at
    frame 3 and loaded back, and the masks, logits and frames of every step."""
    tracker.reset()
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    out = []
    for idx, masks in tracker.propagate(frames, prefetch=prefetch):
        if idx == 2:
            masks = tracker.add_prompt(2, **BOX_PROMPT)
        if idx == 3:
            path = tracker.save_state(tmp_path / f"state-{tracker.background_memory}.npz")
            tracker.load_state(path)
        if idx == 4:
            masks = tracker.add_prompt(1, points=[[10.0, 10.0]], labels=[0])
        if idx == 5:
            tracker.remove(2)
            masks = {k: v for k, v in masks.items() if k != 2}
        out.append((idx, {k: m.copy() for k, m in masks.items()},
                    {k: v.copy() for k, v in tracker.low_res_logits.items()}, tracker.current_frame.copy()))
    tracker.wait()
    return out


def test_background_memory_gives_the_same_results(model, tmp_path: Path):
    """Inline and background memory: the same masks and logits at every step, through a new object, a correction, a
    removal and a state saved and loaded mid-stream (with prefetch too); the state files are equal."""
    frames, corners = pan_clip(8)
    inline, background = _tracker(model, False), _tracker(model, True)
    assert not inline.background_memory and background.background_memory
    want = _stream(inline, frames, corners, tmp_path)
    _assert_same(want, _stream(background, frames, corners, tmp_path))
    _assert_same(want, _stream(background, frames, corners, tmp_path, prefetch=True))
    with np.load(tmp_path / "state-False.npz") as a, np.load(tmp_path / "state-True.npz") as b:
        assert sorted(a.files) == sorted(b.files) and any(k.endswith(".mem") for k in a.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [t.name for t in threading.enumerate() if t.name.startswith("sam2rt-memory")]
    background.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("sam2rt-memory")]


def test_a_tracked_frames_memory_is_encoded_after_its_masks_are_returned(model, monkeypatch):
    """track() returns while the frame's memory encoding still waits (on the memory thread); the next call waits for
    it, and the frame's output then holds its memory. Inline, the encoding happens inside track()."""
    frames, corners = pan_clip(4)
    for background in (True, False):
        tracker = _tracker(model, background)
        tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
        tracker.track(frames[1])
        release, threads = threading.Event(), []
        original = tracker.graphs.encode_memory

        def encode_memory(*args, threads=threads, release=release, original=original, **kwargs):
            threads.append(threading.current_thread().name)
            release.wait(timeout=2)  # inline: track() itself stalls here until the timeout
            return original(*args, **kwargs)

        monkeypatch.setattr(tracker.graphs, "encode_memory", encode_memory)
        tracker.track(frames[2])
        current = tracker.objects[1].current
        assert (current.maskmem is None) is background and not release.is_set()
        release.set()
        tracker.wait()
        assert current.maskmem is not None and current.maskmem.ndim == 3  # (mem_dim, h, w), bfloat16 values
        assert threads[0].startswith("sam2rt-memory") if background else threads[0] == "MainThread"
        monkeypatch.undo()
        tracker.close()


def test_background_memory_with_fixed_buffers_and_prefetch(model, tmp_path: Path):
    """The video graphs through fixed buffers (each new shape's capture holds the GPU lock exclusively, here from the
    memory thread beside the prefetch thread's encoder) give the same results as inline, without a deadlock."""
    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER

    frames, corners = pan_clip(CAPTURE_AFTER + 4)
    inline, background = _tracker(model, False, fixed_buffers=True), _tracker(model, True, fixed_buffers=True)
    runs = []
    for tracker, prefetch in ((inline, False), (background, True)):
        tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
        runs.append([(i, {k: m.copy() for k, m in masks.items()}, {k: v.copy() for k, v in tracker.low_res_logits.items()},
                      tracker.current_frame.copy()) for i, masks in tracker.propagate(frames, prefetch=prefetch)])
        tracker.wait()
    _assert_same(*runs)
    assert background.graphs.sessions["memory_encoder"].replays > 0  # the memory thread replayed its fixed buffers
    background.close()


def test_a_failed_memory_encoding_is_raised_and_reset_recovers(model, monkeypatch):
    """A memory encoding that fails on the memory thread: that frame's masks are returned; the next call raises
    Sam2rtError naming the failure, and so does every call after it, until reset()."""
    from sam2rt.errors import Sam2rtError

    frames, corners = pan_clip(4)
    tracker = _tracker(model, True)
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    tracker.track(frames[1])  # (the prompted frame's memory is encoded inline, when its time step ends)

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(tracker.graphs, "encode_memory", broken)
    masks = tracker.track(frames[2])
    assert set(masks) == {1}
    monkeypatch.undo()
    for call in (lambda: tracker.track(frames[3]), lambda: tracker.add_prompt(2, **BOX_PROMPT), tracker.wait):
        with pytest.raises(Sam2rtError, match=r"background memory encoding failed \(RuntimeError: device lost\).*reset\(\)"):
            call()
    tracker.reset()
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    assert set(tracker.track(frames[1])) == {1}
    tracker.wait()
    tracker.close()


def test_background_memory_is_on_where_the_backend_computes_on_a_gpu(model, monkeypatch):
    from sam2rt.runtime import VideoTracker

    assert _tracker(model, None).background_memory is False  # the CPU: both threads would share its cores
    monkeypatch.setattr(model.backend, "device", "cuda:0")
    graphs = _tracker(model, False).graphs
    assert VideoTracker(model, graphs).background_memory is True
    assert VideoTracker(model, graphs, background_memory=False).background_memory is False
