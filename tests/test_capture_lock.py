"""CUDA graph captures exclude every other thread's GPU work (runtime/backends/capture_lock.py).

On an H100, VideoTracker.propagate's prefetch failed: one thread captured a CUDA graph while the other synchronised
a stream ("operation not permitted when stream is capturing"). CI has no GPU, so these tests check the rule itself on
the CPU provider, where the same code paths run (the fixed-buffer sessions' first runs, where a GPU captures): no
capture while the other thread is inside its work, in either direction, and no deadlock.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sam2rt.runtime.backends.capture_lock import CaptureLock

WAIT = 10.0  # seconds before a test calls a wait a deadlock


def _run(target) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def test_exclusive_waits_for_shared_holders_and_keeps_new_ones_out():
    lock = CaptureLock()
    events: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def reader():
        with lock.shared():
            events.append("reader in")
            holding.set()
            release.wait(WAIT)
            events.append("reader out")

    def writer():
        with lock.exclusive():
            events.append("writer in")
            time.sleep(0.05)
            events.append("writer out")

    def late_reader():
        with lock.shared():
            events.append("late reader in")

    r = _run(reader)
    assert holding.wait(WAIT)
    w = _run(writer)
    time.sleep(0.05)
    late = _run(late_reader)  # asks while the writer waits: let in only after the writer
    time.sleep(0.05)
    assert events == ["reader in"], events
    release.set()
    for t in (r, w, late):
        t.join(WAIT)
        assert not t.is_alive(), "deadlock"
    assert events == ["reader in", "reader out", "writer in", "writer out", "late reader in"], events


def test_two_threads_upgrading_at_once_take_turns():
    """Each thread holds shared and asks for exclusive (both capture a graph in the middle of their work): neither
    waits for the other's shared hold, both get their turn alone, and each has its shared hold back afterwards."""
    lock = CaptureLock()
    both_in = threading.Barrier(2, timeout=WAIT)
    inside: list[int] = []
    overlaps: list[int] = []
    after: list[bool] = []

    def worker():
        with lock.shared():
            both_in.wait()
            with lock.exclusive():
                inside.append(1)
                overlaps.append(len(inside))
                time.sleep(0.05)
                inside.pop()
            after.append(lock.holds_shared())

    threads = [_run(worker) for _ in range(2)]
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive(), "deadlock"
    assert overlaps == [1, 1] and after == [True, True]
    assert lock.shared_holders == 0


def test_nested_holds_are_reentrant():
    lock = CaptureLock()
    with lock.shared():
        with lock.shared():
            with lock.exclusive():
                with lock.exclusive():
                    assert lock.shared_holders == 0  # this thread's own hold is given up while exclusive
                with lock.shared():
                    pass
            assert lock.shared_holders == 1
        assert lock.holds_shared()
    assert lock.shared_holders == 0 and not lock.holds_shared()


def _device_tracker(tiny_video_dir: Path):
    """A tracker whose image path and video graphs all run through fixed-buffer sessions on the CPU provider (the
    GPU's flow: each shape's first fixed run is where a GPU captures its CUDA graph)."""
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Sam2Model, VideoTracker
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend
    from sam2rt.runtime.video.graphs import VideoGraphs

    m = Manifest.load(tiny_video_dir)
    model = Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=True))
    graphs = VideoGraphs(m, model.backend_name, fixed_buffers=True)
    return VideoTracker(model, graphs, fill_hole_area=0)


def test_prefetch_never_captures_beside_the_other_threads_work(tiny_video_dir: Path, monkeypatch):
    """propagate with prefetch, both halves slowed so that they overlap: every fixed-buffer session made (a capture on
    a GPU) on the main thread while the worker encodes waits for it, and every one made on the worker waits for
    the main thread's tracking. Both threads make some; the results equal those without prefetch."""
    from sam2rt.runtime.backends.fixed_shapes import FixedShapeSession
    from test_video import pan_clip, point_prompt

    frames, corners = pan_clip(12)
    results = {}
    for prefetch in (False, True):
        tracker = _device_tracker(tiny_video_dir)
        busy = {"encode": 0, "track": 0}
        made: list[tuple[str, dict[str, int]]] = []
        encode, track_all = tracker.model.backend.encode, tracker._track_all

        def slow_encode(x, encode=encode, busy=busy):
            busy["encode"] += 1
            try:
                time.sleep(0.03)
                return encode(x)
            finally:
                busy["encode"] -= 1

        def slow_track(track_all=track_all, busy=busy):
            busy["track"] += 1
            try:
                time.sleep(0.03)
                return track_all()
            finally:
                busy["track"] -= 1

        original = FixedShapeSession._make_fixed

        def make_fixed(self, *args, made=made, busy=busy, original=original):
            made.append((threading.current_thread().name, dict(busy)))
            return original(self, *args)

        monkeypatch.setattr(tracker.model.backend, "encode", slow_encode)
        monkeypatch.setattr(tracker, "_track_all", slow_track)
        monkeypatch.setattr(FixedShapeSession, "_make_fixed", make_fixed)
        tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
        results[prefetch] = [{k: v.copy() for k, v in masks.items()} for _, masks in tracker.propagate(frames, prefetch=prefetch)]
        tracker.model.close()
        if prefetch:
            on_worker = [b for name, b in made if name.startswith("sam2rt-prefetch")]
            on_main = [b for name, b in made if not name.startswith("sam2rt-prefetch")]
            assert on_worker and on_main, made  # both directions were exercised
            assert all(b["track"] == 0 for b in on_worker), made  # the worker's waited for the tracking
            assert all(b["encode"] == 0 for b in on_main), made  # the main thread's waited for the encoder
    assert len(results[True]) == len(results[False]) == len(frames)
    for a, b in zip(results[False], results[True]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_each_threads_first_replay_of_a_session_waits_for_the_other_thread(tiny_video_dir: Path, monkeypatch):
    """ONNX Runtime's CUDA provider captures a CUDA-graph session again on the first run of each thread that runs it
    (its per-thread contexts; GPU run 6 on an H100: the encoder, captured on the main thread by add_prompt, was
    captured again on propagate's worker beside the main thread's tracking, and both failed). So every thread's first
    replay of every fixed-buffer session waits until the other thread is outside its work. Two propagate calls: the
    worker thread is the tracker's one, so the second captures nothing again."""
    from sam2rt.runtime.backends.fixed_shapes import FixedShapeSession
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend
    from test_video import pan_clip, point_prompt

    frames, corners = pan_clip(16)
    tracker = _device_tracker(tiny_video_dir)
    busy: dict[str, set[str]] = {"encode": set(), "track": set()}
    replays: list[tuple[threading.Thread, int, set[str]]] = []  # (thread, session buffers, others inside their work)
    encode, track_all = tracker.model.backend.encode, tracker._track_all

    def slowed(fn, what):
        def run(*args):
            me = threading.current_thread().name
            busy[what].add(me)
            try:
                time.sleep(0.02)
                return fn(*args)
            finally:
                busy[what].discard(me)
        return run

    def recording(original):
        def replay(fixed):
            me = threading.current_thread()
            replays.append((me, id(fixed), {t for ts in busy.values() for t in ts if t != me.name}))
            return original(fixed)
        return staticmethod(replay)

    monkeypatch.setattr(tracker.model.backend, "encode", slowed(encode, "encode"))
    monkeypatch.setattr(tracker, "_track_all", slowed(track_all, "track"))
    for cls in (OrtDeviceBackend, FixedShapeSession):
        monkeypatch.setattr(cls, "_replay", recording(cls._replay))
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    # each call's first frame is encoded on the main thread, the next on the worker while the main thread tracks
    got = [m for _, m in tracker.propagate(frames[1:9], prefetch=True)]
    got += [m for _, m in tracker.propagate(frames[9:], prefetch=True)]
    tracker.model.close()
    assert len(got) == len(frames) - 1
    seen: set[tuple[str, int]] = set()
    firsts = []
    for i, (thread, fixed, others) in enumerate(replays):
        if (thread, fixed) not in seen:
            seen.add((thread, fixed))
            firsts.append((i, thread, fixed, others))
    on_worker = [f for f in firsts if f[1] is not threading.main_thread()]
    on_main = {f[2] for f in firsts if f[1] is threading.main_thread()}
    assert any(f[2] in on_main for f in on_worker), firsts  # a session the main thread ran, run again on the worker
    assert all(not others for _, _, _, others in firsts), firsts  # each first replay with the other thread outside
    assert len({f[1] for f in on_worker}) == 1, on_worker  # one worker thread for both calls


@pytest.mark.parametrize("where", ["worker", "main"])
def test_a_capture_waits_for_the_other_thread_then_runs(where):
    """The exclusive section starts only once the other thread's shared work has ended, whichever thread captures."""
    lock = CaptureLock()
    started, log = threading.Event(), []

    def other():
        with lock.shared():
            started.set()
            time.sleep(0.1)
            log.append("other done")

    def capturer():
        with lock.shared():
            started.wait(WAIT)
            with lock.exclusive():
                log.append("capture")

    threads = [_run(other), _run(capturer)] if where == "worker" else [_run(capturer), _run(other)]
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive(), "deadlock"
    assert log == ["other done", "capture"]
