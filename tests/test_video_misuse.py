"""VideoTracker and `sam2rt track` under misuse (from a review of the video API): refused calls leave the tracker as
it was, a video's declared length bounds its own `propagate` only, state files round-trip or are refused whole, and
the CLI refuses outputs it cannot write before it tracks anything. On the tiny stand-in's graphs (quick)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_video import BOX_PROMPT, FRAME_HW, pan_clip, patch_mask, point_prompt


@pytest.fixture
def tracker(tiny_video_dir: Path):
    from sam2rt.runtime import VideoTracker

    return VideoTracker.from_dir(tiny_video_dir, backend="onnxruntime-cpu", fill_hole_area=0)


@pytest.fixture(scope="module")
def clip():
    return pan_clip(6)


def _logits(tracker) -> dict:
    return {k: v.copy() for k, v in tracker.low_res_logits.items()}


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_a_refused_prompt_on_a_new_frame_leaves_the_stream_where_it_was(tracker, clip):
    """add_prompt(frame=new) with a bad prompt raises before the frame starts a time step: the caller's next
    track(new) is that frame's first tracking, as for a tracker that never saw the refused call."""
    from sam2rt.errors import InvalidPromptError

    frames, corners = clip
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    bad = [dict(box=[500.0, 10.0, 900.0, 50.0]), dict(points=[[10.0, 10.0]], labels=[1, 1]),
           dict(mask=np.ones((5, 5), bool)), dict(mask=patch_mask(corners[1]), box=BOX_PROMPT["box"])]
    for prompt in bad:
        with pytest.raises(InvalidPromptError):
            tracker.add_prompt(2, frame=frames[1], **prompt)
        assert tracker.frame_idx == 0 and tracker.object_ids == [1]
    tracker.track(frames[1])
    got = _logits(tracker)
    tracker.reset()
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    tracker.track(frames[1])
    assert tracker.frame_idx == 1
    _assert_same(got, _logits(tracker))


@pytest.mark.parametrize("mask", [np.full(FRAME_HW, "x"), np.full(FRAME_HW, None, dtype=object),
                                  np.full(FRAME_HW, np.nan, np.float32)], ids=["str", "object", "nan"])
def test_mask_prompts_that_are_not_masks_are_refused(tracker, clip, mask):
    from sam2rt.errors import InvalidPromptError

    frames, _ = clip
    with pytest.raises(InvalidPromptError, match="mask"):
        tracker.add_prompt(1, frame=frames[0], mask=mask)
    assert tracker.frame_idx == -1 and tracker.object_ids == []


def test_a_numeric_mask_prompt_is_the_bool_mask_of_its_positive_values(tracker, clip):
    frames, corners = clip
    as_bool = tracker.add_prompt(1, frame=frames[0], mask=patch_mask(corners[0]))[1]
    tracker.reset()
    as_uint8 = tracker.add_prompt(1, frame=frames[0], mask=patch_mask(corners[0]).astype(np.uint8) * 255)[1]
    np.testing.assert_array_equal(as_bool, as_uint8)


def test_current_frame_is_a_copy(tracker, clip):
    """Drawing on current_frame does not change the frame the tracker compares with: a second prompt on the same
    frame stays in its time step (the first object is not tracked again)."""
    frames, corners = clip
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    shown = tracker.current_frame
    shown[:] = 0  # an overlay drawn in place
    tracker.add_prompt(2, frame=frames[0], **BOX_PROMPT)
    assert tracker.frame_idx == 0
    np.testing.assert_array_equal(tracker.current_frame, frames[0])


def _record_lengths(monkeypatch) -> list:
    """(frame, the video length the memory selection got) for each tracked object and frame."""
    from sam2rt.runtime.video import tracker as tracker_module

    seen: list = []
    select = tracker_module.select_memory
    monkeypatch.setattr(tracker_module, "select_memory",
                        lambda mem, f, settings, layout, n: (seen.append((f, n)), select(mem, f, settings, layout, n))[1])
    return seen


def test_a_propagate_calls_length_does_not_outlive_it(tracker, clip, monkeypatch):
    """propagate() of a list bounds the object pointers by the list's length during that call only: the frames
    tracked after it are a stream's (before, the length stayed, and from it on every pointer was dropped)."""
    seen = _record_lengths(monkeypatch)
    frames, corners = clip
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    assert [i for i, _ in tracker.propagate(frames[1:3])] == [1, 2]
    assert tracker.num_frames is None
    for f in frames[3:]:
        tracker.track(f)
    assert seen == [(1, 3), (2, 3), (3, None), (4, None), (5, None)]
    tracker.num_frames = 40  # a length the caller set stays through a propagate that says none
    list(tracker.propagate(iter(frames[:2])))
    assert tracker.num_frames == 40 and seen[-2:] == [(6, 40), (7, 40)]


def test_frames_past_a_declared_length_are_tracked_as_a_stream(tracker, clip, monkeypatch):
    """A container's frame count can be short: past the declared num_frames the memory selection gets no length
    (a stream's), instead of a length that drops every pointer."""
    seen = _record_lengths(monkeypatch)
    frames, corners = clip
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    assert [i for i, _ in tracker.propagate(iter(frames), num_frames=3)] == [0, 1, 2, 3, 4, 5]
    assert seen == [(1, 3), (2, 3), (3, None), (4, None), (5, None)]
    assert tracker.num_frames is None


@pytest.mark.parametrize("num_frames", [10.0, "10", 0, -5])
def test_num_frames_must_be_a_positive_int(tracker, clip, num_frames):
    from sam2rt.errors import InputError

    frames, corners = clip
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    with pytest.raises(InputError, match="num_frames"):
        list(tracker.propagate(frames[1:3], num_frames=num_frames))
    assert tracker.frame_idx == 0 and tracker.num_frames is None
    assert [i for i, _ in tracker.propagate(frames[1:3], num_frames=np.int64(3))] == [1, 2]  # numpy ints are ints


def test_propagate_refuses_a_none_first_frame(tracker, clip):
    from sam2rt.errors import InvalidImageError

    frames, corners = clip
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    with pytest.raises(InvalidImageError):
        list(tracker.propagate([None, frames[1]]))


def test_state_ids_must_come_back_as_they_went(tracker, clip, tmp_path: Path):
    from sam2rt.errors import Sam2rtError

    frames, corners = clip
    tracker.add_prompt(7, frame=frames[0], **point_prompt(corners[0]))
    tracker.add_prompt("car", **BOX_PROMPT)
    path = tracker.save_state(tmp_path / "ok.npz")
    tracker.add_prompt((1, "bus"), mask=patch_mask(corners[0]))
    with pytest.raises(Sam2rtError, match="ints or strings"):
        tracker.save_state(tmp_path / "tuple.npz")
    assert not (tmp_path / "tuple.npz").exists()
    tracker.load_state(path)
    assert tracker.object_ids == [7, "car"]


def _rewrite(src: Path, dst: Path, drop: str | None = None, header: str | None = None) -> Path:
    with np.load(src, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != drop}
    if header is not None:
        arrays["__header__"] = np.array(header)
    with open(dst, "wb") as f:
        np.savez(f, **arrays)
    return dst


def test_a_damaged_state_file_is_refused_and_leaves_the_tracker_as_it_was(tracker, clip, tmp_path: Path):
    import json

    from sam2rt.errors import Sam2rtError

    frames, corners = clip
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    tracker.track(frames[1])
    saved = tracker.save_state(tmp_path / "state.npz")
    with np.load(saved, allow_pickle=False) as data:
        header = json.loads(str(data["__header__"]))
        array = next(k for k in data.files if k.startswith("o0."))
    no_key = {k: v for k, v in header.items() if k != "model_key"}
    bad_id = {**header, "objects": [{**header["objects"][0], "id": [1, 2]}]}
    damaged = [_rewrite(saved, tmp_path / "missing.npz", drop=array),
               _rewrite(saved, tmp_path / "list.npz", header="[1, 2]"),
               _rewrite(saved, tmp_path / "no_key.npz", header=json.dumps(no_key)),
               _rewrite(saved, tmp_path / "bad_id.npz", header=json.dumps(bad_id))]
    tracker.reset()
    tracker.add_prompt(9, frame=frames[2], **BOX_PROMPT)
    before = _logits(tracker)
    for path in damaged:
        with pytest.raises(Sam2rtError, match="state file|another model"):
            tracker.load_state(path)
        assert tracker.object_ids == [9] and tracker.frame_idx == 0
        _assert_same(_logits(tracker), before)
    tracker.track(frames[3])  # and it goes on
    assert tracker.frame_idx == 1


def _clip_file(tmp_path: Path) -> Path:
    import cv2

    frames, _ = pan_clip(2)
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, FRAME_HW[::-1])
    for f in frames:
        writer.write(f[..., ::-1])
    writer.release()
    return video


@pytest.mark.parametrize("case", ["no extension", "json is a folder", "out under a file"])
def test_track_cli_refuses_outputs_it_cannot_write_before_tracking(tiny_video_dir: Path, tmp_path: Path, case: str):
    """Exit 2 with one line naming the output, no traceback, and nothing tracked (the model is never loaded: a model
    directory that does not exist is not what is reported)."""
    video = _clip_file(tmp_path)
    (tmp_path / "a_file").write_text("x")
    out = {"no extension": ["--out", str(tmp_path / "tracked")],
           "json is a folder": ["--out", str(tmp_path / "t.mp4"), "--json", str(tmp_path)],
           "out under a file": ["--out", str(tmp_path / "a_file" / "t.mp4")]}[case]
    res = subprocess.run([sys.executable, "-m", "sam2rt", "track", "--model-dir", str(tmp_path / "no_model"),
                          "--video", str(video), "--box", "10,10,100,100", "--quiet", *out],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "cannot write --" in res.stderr, res.stderr
    assert not (tmp_path / "tracked").exists()
