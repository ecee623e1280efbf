"""VideoTracker.propagate with prefetch: the next frame read and encoded on a worker thread while this one is tracked.

On the tiny stand-in's graphs (quick), CPU provider: what the GPU's default relies on is bookkeeping, not numerics —
the same results in the same order, each frame encoded once, the worker really running ahead, errors at their frame's
turn, a frame buffer refilled in place by its source, and leaving early.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from test_video import BOX_PROMPT, pan_clip, point_prompt


def _tracker(tiny_video_dir: Path):
    from sam2rt.runtime import VideoTracker

    return VideoTracker.from_dir(tiny_video_dir, backend="onnxruntime-cpu", fill_hole_area=0)


def _prompted(tracker, frames, corners):
    tracker.reset()
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    tracker.add_prompt(2, **BOX_PROMPT)


def _run(tracker, source, prefetch: bool) -> list[tuple[int, dict, dict, np.ndarray]]:
    out = []
    for idx, masks in tracker.propagate(source, prefetch=prefetch):
        logits = {k: v.copy() for k, v in tracker.low_res_logits.items()}
        out.append((idx, {k: m.copy() for k, m in masks.items()}, logits, tracker.current_frame.copy()))
    return out


def _assert_same(a, b) -> None:
    assert [r[0] for r in a] == [r[0] for r in b]
    for (_, masks_a, logits_a, frame_a), (_, masks_b, logits_b, frame_b) in zip(a, b):
        assert masks_a.keys() == masks_b.keys() and logits_a.keys() == logits_b.keys()
        for k in masks_a:
            np.testing.assert_array_equal(masks_a[k], masks_b[k])
            np.testing.assert_array_equal(logits_a[k], logits_b[k])
        np.testing.assert_array_equal(frame_a, frame_b)


def test_prefetch_gives_the_same_results_encoding_each_frame_once(tiny_video_dir: Path, monkeypatch):
    """The same masks, logits and frames in the same order; every frame encoded once, those after the current one on
    the prefetch thread; `current_frame` is the frame the yielded masks belong to."""
    tracker = _tracker(tiny_video_dir)
    frames, corners = pan_clip(7)
    encoded: list[tuple[str, bytes]] = []
    original = tracker.model.backend.preprocess

    def preprocess(rgb, size):
        encoded.append((threading.current_thread().name, rgb.tobytes()))
        return original(rgb, size)

    monkeypatch.setattr(tracker.model.backend, "preprocess", preprocess)
    _prompted(tracker, frames, corners)
    plain = _run(tracker, frames, prefetch=False)
    assert [t for t, _ in encoded] == ["MainThread"] * 7  # frame 0 when prompted, then 1..6
    encoded.clear()
    _prompted(tracker, frames, corners)
    ahead = _run(tracker, frames, prefetch=True)
    assert [b for _, b in encoded] == [f.tobytes() for f in frames]  # each frame once, in order
    assert encoded[0][0] == "MainThread" and all(t.startswith("sam2rt-prefetch") for t, _ in encoded[1:])
    _assert_same(plain, ahead)
    assert [r[0] for r in ahead] == list(range(7))
    for (_, _, _, frame), given in zip(ahead, frames):
        np.testing.assert_array_equal(frame, given)


def test_prefetch_reads_the_next_frame_while_this_one_is_handled(tiny_video_dir: Path):
    """While the caller still holds frame k's masks, the source has been asked for frame k + 1 (the worker runs ahead);
    without prefetch it has not."""
    tracker = _tracker(tiny_video_dir)
    frames, corners = pan_clip(5)
    for prefetch in (True, False):
        _prompted(tracker, frames, corners)
        read = [threading.Event() for _ in frames]

        def source(read=read):
            for i, f in enumerate(frames):
                read[i].set()
                yield f

        seen = []
        for idx, _ in tracker.propagate(source(), prefetch=prefetch):
            if idx + 1 < len(frames):
                seen.append(read[idx + 1].wait(timeout=30 if prefetch else 0.2))
        assert seen == [prefetch] * (len(frames) - 1)


def test_prefetch_raises_a_bad_frame_at_its_turn(tiny_video_dir: Path):
    """A frame the tracker refuses (float pixels) raises InvalidImageError when its turn comes: the frames before it are
    all tracked and yielded, and the tracker stays on the last good frame."""
    from sam2rt.errors import InvalidImageError

    tracker = _tracker(tiny_video_dir)
    frames, corners = pan_clip(5)
    bad = [*frames[:3], frames[3].astype(np.float32), frames[4]]
    _prompted(tracker, frames, corners)
    got = []
    with pytest.raises(InvalidImageError, match="uint8"):
        for idx, _ in tracker.propagate(bad, prefetch=True):
            got.append(idx)
    assert got == [0, 1, 2] and tracker.frame_idx == 2
    np.testing.assert_array_equal(tracker.current_frame, frames[2])
    # the worker is the tracker's for its life (a thread per call would capture CUDA graphs again); close() stops it
    workers = [t for t in threading.enumerate() if t.name.startswith("sam2rt-prefetch")]
    assert len(workers) == 1, workers
    tracker.close()
    assert not workers[0].is_alive()
    assert [idx for idx, _ in tracker.propagate(frames[3:], prefetch=True)] == [3, 4]  # usable after close()
    tracker.close()


def test_prefetch_copies_a_buffer_the_source_refills(tiny_video_dir: Path):
    """A camera-like source that refills one buffer in place for every frame: with the next frame read while this one
    is tracked, results still equal those of distinct frames (each frame is copied before the next is read)."""
    tracker = _tracker(tiny_video_dir)
    frames, corners = pan_clip(6)
    _prompted(tracker, frames, corners)
    plain = _run(tracker, iter(frames), prefetch=False)  # a source without a length, as the refilled one

    def refilled():
        buf = np.empty_like(frames[0])
        for f in frames:
            buf[...] = f
            yield buf

    _prompted(tracker, frames, corners)
    _assert_same(plain, _run(tracker, refilled(), prefetch=True))


def test_leaving_prefetch_early_stops_the_worker(tiny_video_dir: Path):
    """Breaking out of propagate waits for the frame in flight, and the worker reads nothing more (one frame read
    ahead is consumed); tracking goes on. The idle worker thread is the tracker's until close()."""
    tracker = _tracker(tiny_video_dir)
    frames, corners = pan_clip(6)
    _prompted(tracker, frames, corners)
    read: list[int] = []

    def source():
        for i, f in enumerate(frames):
            read.append(i)
            yield f

    stream = tracker.propagate(source(), prefetch=True)
    for idx, _ in stream:
        if idx == 2:
            break
    stream.close()
    assert read == [0, 1, 2, 3]  # frame 3 was read ahead, and nothing after it
    time.sleep(0.1)
    assert read == [0, 1, 2, 3]
    assert tracker.frame_idx == 2
    tracker.track(frames[5])
    assert tracker.frame_idx == 3
    tracker.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("sam2rt-prefetch")]


def test_prefetch_is_on_where_the_backend_computes_on_a_gpu(tiny_video_dir: Path, monkeypatch):
    tracker = _tracker(tiny_video_dir)
    assert tracker.prefetch_default is False  # the CPU: the encoder and the tracking would share its cores
    monkeypatch.setattr(tracker.model.backend, "device", "cuda:0")
    assert tracker.prefetch_default is True


def test_prefetch_with_a_new_object_and_a_correction_mid_stream(tiny_video_dir: Path):
    """Prompts given between two yields apply to the frame just yielded, as without prefetch (the frame read ahead
    is only encoded): a new object at frame 2 and a correction click at frame 4 give the same results either way."""
    tracker = _tracker(tiny_video_dir)
    frames, corners = pan_clip(7)
    runs = {}
    for prefetch in (False, True):
        tracker.reset()
        tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
        out = []
        for idx, masks in tracker.propagate(frames, prefetch=prefetch):
            if idx == 2:
                masks = tracker.add_prompt(2, **BOX_PROMPT)
            if idx == 4:
                masks = tracker.add_prompt(1, points=[[10.0, 10.0]], labels=[0])
            out.append((idx, {k: m.copy() for k, m in masks.items()},
                        {k: v.copy() for k, v in tracker.low_res_logits.items()}, tracker.current_frame.copy()))
        runs[prefetch] = out
    assert [sorted(r[1]) for r in runs[True]] == [[1]] * 2 + [[1, 2]] * 5
    _assert_same(runs[False], runs[True])
