"""VideoTracker against the official SAM2VideoPredictor on the same checkpoint (random weights, FP32).

Both sides get the same preprocessed frames: the reference's loader resizes JPEG frames with PIL, so its
`inference_state["images"]` is replaced with sam2rt's preprocessing of the very frames the tracker sees
(and the frame-0 features init_state cached are dropped). The reference runs without its CUDA extension,
so it skips hole filling: the tracker runs with fill_hole_area=0. Clips are camera pans over a real
photograph (skimage's astronaut) with a pasted object (a patch of skimage's chelsea) moving across them.

Checked on every frame: each object's low-res logits within LOGIT_TOL of the reference, mask IoU >= 0.999.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import photo

LOGIT_TOL = 1e-3
MIN_IOU = 0.999
FRAME_HW = (240, 320)
PATCH_HW = (70, 80)


def pan_clip(n: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """n RGB frames of a camera pan over a photograph, with a pasted patch moving through them.

    Returns the frames and the patch's top-left corner (y, x) in each frame.
    """
    bg, cat = photo("astronaut"), photo("chelsea")
    patch = cat[60 : 60 + PATCH_HW[0], 130 : 130 + PATCH_HW[1]]
    h, w = FRAME_HW
    frames, corners = [], []
    for i in range(n):
        y0, x0 = 20 + 3 * i, 10 + 4 * i  # the camera pans down-right
        frame = bg[y0 : y0 + h, x0 : x0 + w].copy()
        py, px = 120 - 2 * i, 30 + 5 * i  # the object moves up-right in the frame
        frame[py : py + PATCH_HW[0], px : px + PATCH_HW[1]] = patch
        frames.append(np.ascontiguousarray(frame))
        corners.append((py, px))
    return frames, corners


def patch_mask(corner: tuple[int, int]) -> np.ndarray:
    m = np.zeros(FRAME_HW, bool)
    m[corner[0] : corner[0] + PATCH_HW[0], corner[1] : corner[1] + PATCH_HW[1]] = True
    return m


# Prompts of the clips' objects on a frame whose patch corner is (py, px).
def point_prompt(corner):
    py, px = corner
    return {"points": [[px + 40.0, py + 35.0]], "labels": [1]}


BOX_PROMPT = {"box": [150.0, 10.0, 260.0, 110.0]}  # the astronaut's helmet region (moves with the pan only)


@pytest.fixture(scope="module")
def video_reference(checkpoint_path: Path):
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    predictor = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=str(checkpoint_path), device="cpu")
    predictor.fill_hole_area = 0  # what the reference does without its CUDA extension, said explicitly
    return predictor


def reference_state(predictor, frames: list[np.ndarray], tmp_path: Path) -> dict:
    """init_state over JPEGs of `frames`, then its images replaced by sam2rt's preprocessing of `frames`."""
    import cv2
    import torch

    from sam2rt.runtime.preprocess import preprocess

    folder = tmp_path / "frames"
    folder.mkdir(exist_ok=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), f[..., ::-1])
    state = predictor.init_state(str(folder))
    state["images"] = torch.from_numpy(np.concatenate([preprocess(f) for f in frames]))
    state["cached_features"] = {}
    assert (state["video_height"], state["video_width"]) == FRAME_HW
    return state


def reference_logits(state: dict, frame_idx: int) -> dict:
    """{obj_id: (256,256) low-res logits} the reference holds for frame_idx."""
    out = {}
    for obj_id, idx in state["obj_id_to_idx"].items():
        d = state["output_dict_per_obj"][idx]
        entry = d["cond_frame_outputs"].get(frame_idx) or d["non_cond_frame_outputs"].get(frame_idx)
        if entry is not None:
            out[obj_id] = entry["pred_masks"][0, 0].float().numpy()
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


class Comparison:
    """Collects per-frame, per-object differences and checks them at the end (so a failure shows them all)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, object, float, float]] = []

    def add(self, frame_idx: int, ours_logits: dict, ref_logits: dict, ours_masks: dict, ref_masks: dict) -> None:
        assert set(ours_logits) == set(ref_logits), (frame_idx, set(ours_logits), set(ref_logits))
        for obj_id in ref_logits:
            diff = float(np.max(np.abs(ours_logits[obj_id] - ref_logits[obj_id])))
            self.rows.append((frame_idx, obj_id, diff, iou(ours_masks[obj_id], ref_masks[obj_id])))

    def check(self) -> None:
        assert self.rows
        worst = max(r[2] for r in self.rows)
        lowest = min(r[3] for r in self.rows)
        bad = [r for r in self.rows if r[2] > LOGIT_TOL or r[3] < MIN_IOU]
        print(f"\n{len(self.rows)} frame x object results: max |logit diff| {worst:.3g}, min IoU {lowest:.5f}")
        assert not bad, f"frames/objects beyond tolerance (frame, obj, max diff, IoU): {bad[:10]}"


def video_masks(ids, video_res_masks) -> dict:
    return {obj_id: video_res_masks[i, 0].numpy() > 0 for i, obj_id in enumerate(ids)}


@pytest.fixture(scope="module")
def tracker(model_dir: Path):
    from sam2rt.runtime import VideoTracker

    return VideoTracker.from_dir(model_dir, backend="onnxruntime-cpu", fill_hole_area=0)


# Tests of what the tracker and its CLI do around the graphs run quick on the tiny stand-in's video graphs
# (export/tiny_video.py) and again, marked slow, on the real export.
AROUND_THE_GRAPHS = ["tiny", pytest.param("real", marks=pytest.mark.slow)]


@pytest.fixture(params=AROUND_THE_GRAPHS)
def video_model_dir(request) -> Path:
    return request.getfixturevalue("tiny_video_dir" if request.param == "tiny" else "model_dir")


@pytest.fixture(params=AROUND_THE_GRAPHS)
def any_tracker(request):
    if request.param == "real":
        return request.getfixturevalue("tracker")
    from sam2rt.runtime import VideoTracker

    return VideoTracker.from_dir(request.getfixturevalue("tiny_video_dir"), backend="onnxruntime-cpu", fill_hole_area=0)


def test_propagate_quick_two_objects(tracker, video_reference, tmp_path: Path):
    """4 frames, a point and a box on frame 0: propagate() against propagate_in_video."""
    frames, corners = pan_clip(4)
    state = reference_state(video_reference, frames, tmp_path)
    video_reference.add_new_points_or_box(state, 0, 1, **point_prompt(corners[0]))
    video_reference.add_new_points_or_box(state, 0, 2, **BOX_PROMPT)
    ref = {}
    for idx, ids, masks in video_reference.propagate_in_video(state):
        ref[idx] = (reference_logits(state, idx), video_masks(ids, masks))

    tracker.reset()
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    tracker.add_prompt(2, **BOX_PROMPT)
    cmp = Comparison()
    seen = []
    for idx, masks in tracker.propagate(frames):
        seen.append(idx)
        cmp.add(idx, tracker.low_res_logits, ref[idx][0], masks, ref[idx][1])
        assert all(m.shape == FRAME_HW and m.dtype == bool for m in masks.values())
    assert seen == [0, 1, 2, 3]
    cmp.check()


@pytest.fixture(scope="module")
def _encoded_frames() -> dict:
    return {}


@pytest.fixture
def encode_each_frame_once(tracker, video_reference, _encoded_frames, monkeypatch):
    """Both sides' image encoders run once per distinct frame across the streaming tests, which share the frames of
    one pan clip (its first 12 or 14): each encoder is deterministic, so a repeat returns what it computed (read-only), and the reference's
    memory attention, ~3 s per object and frame, is what those tests spend their time on and compare. The first
    streaming test runs both encoders for real; the image parity tests check the encoder itself."""
    import hashlib

    def memo(side: str, encode, key_of, copy):
        def encode_once(x):
            key = (side, hashlib.sha1(key_of(x)).hexdigest())
            if key not in _encoded_frames:
                _encoded_frames[key] = encode(x)
            return copy(_encoded_frames[key])
        return encode_once

    def frozen(features: dict) -> dict:
        for v in features.values():
            if isinstance(v, np.ndarray):
                v.setflags(write=False)  # an in-place change of a shared frame's features would fail loudly
        return dict(features)

    backend = tracker.model.backend
    monkeypatch.setattr(backend, "encode", memo("sam2rt", backend.encode, lambda x: np.asarray(x).tobytes(), frozen))
    monkeypatch.setattr(video_reference, "forward_image", memo(
        "reference", video_reference.forward_image, lambda t: t.detach().cpu().numpy().tobytes(),
        lambda out: {k: list(v) if isinstance(v, list) else v for k, v in out.items()}))


@pytest.mark.slow
@pytest.mark.usefixtures("encode_each_frame_once")
def test_stream_three_objects_point_box_mask(tracker, video_reference, tmp_path: Path):
    """3 objects prompted by point, box and mask on frame 0; track() frame by frame vs propagate_in_video.

    12 frames: the memory bank is full (num_maskmem 7) from frame 7, so five frames track with every slot in use and
    the oldest memory leaving each frame (16 frames took 6-8 of the slow suite's 30 minutes on 2 cores)."""
    n = 12
    frames, corners = pan_clip(n)
    state = reference_state(video_reference, frames, tmp_path)
    video_reference.add_new_points_or_box(state, 0, 1, **point_prompt(corners[0]))
    video_reference.add_new_points_or_box(state, 0, 2, **BOX_PROMPT)
    video_reference.add_new_mask(state, 0, 3, patch_mask(corners[0]))
    ref = {idx: (reference_logits(state, idx), video_masks(ids, m)) for idx, ids, m in video_reference.propagate_in_video(state)}

    tracker.reset()
    cmp = Comparison()
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    tracker.add_prompt(2, **BOX_PROMPT)
    masks = tracker.add_prompt(3, mask=patch_mask(corners[0]))
    cmp.add(0, tracker.low_res_logits, ref[0][0], masks, ref[0][1])
    for i in range(1, n):
        masks = tracker.track(frames[i])
        cmp.add(i, tracker.low_res_logits, ref[i][0], masks, ref[i][1])
    cmp.check()


@pytest.mark.slow
@pytest.mark.usefixtures("encode_each_frame_once")
def test_stream_new_object_then_a_correction_click(tracker, video_reference, tmp_path: Path):
    """Two of the streaming cases on one 14-frame clip (each object and frame costs ~3 s a side, so one clip for both):

    - a new object at frame K_NEW: the reference propagates 0..K_NEW-1, adds object 2 at K_NEW and propagates on; the
      tracker gets the prompt with frame K_NEW while streaming;
    - a correction click at frame K_FIX on a tracked object (a negative click on object 2): the reference propagates
      through K_FIX, adds the click there, then propagates from K_FIX+1; the tracker gets the click after
      track(frame K_FIX). Object 1 is tracked throughout, so the correction of one object must also leave the other
      as the reference has it.
    """
    n, k_new, k_fix = 14, 5, 10  # three frames tracked after the correction, from its memory
    frames, corners = pan_clip(n)
    click = {"points": [[corners[k_fix][1] + 10.0, corners[k_fix][0] + 60.0]], "labels": [0]}
    state = reference_state(video_reference, frames, tmp_path)
    video_reference.add_new_points_or_box(state, 0, 1, **BOX_PROMPT)
    ref = {}
    for idx, ids, m in video_reference.propagate_in_video(state, max_frame_num_to_track=k_new - 1):
        ref[idx] = (reference_logits(state, idx), video_masks(ids, m))
    assert max(ref) == k_new - 1
    video_reference.add_new_points_or_box(state, k_new, 2, **point_prompt(corners[k_new]))
    for idx, ids, m in video_reference.propagate_in_video(state, start_frame_idx=k_new,
                                                          max_frame_num_to_track=k_fix - k_new):
        ref[idx] = (reference_logits(state, idx), video_masks(ids, m))
    assert max(ref) == k_fix
    _, ids, m = video_reference.add_new_points_or_box(state, k_fix, 2, **click)
    ref_corrected = (reference_logits_temp(state, k_fix), video_masks(ids, m))
    for idx, ids, m in video_reference.propagate_in_video(state, start_frame_idx=k_fix + 1):
        ref[idx] = (reference_logits(state, idx), video_masks(ids, m))
    assert sorted(ref) == list(range(n))

    tracker.reset()
    cmp = Comparison()
    masks = tracker.add_prompt(1, frame=frames[0], **BOX_PROMPT)
    cmp.add(0, tracker.low_res_logits, ref[0][0], masks, ref[0][1])
    for i in range(1, n):
        if i == k_new:
            masks = tracker.add_prompt(2, frame=frames[k_new], **point_prompt(corners[k_new]))
        else:
            masks = tracker.track(frames[i])
        cmp.add(i, tracker.low_res_logits, ref[i][0], masks, ref[i][1])
        if i == k_fix:
            before = tracker.low_res_logits[2]
            masks = tracker.add_prompt(2, **click)
            assert not np.array_equal(tracker.low_res_logits[2], before), "the click changed nothing"
            cmp.add(k_fix, tracker.low_res_logits, ref_corrected[0], masks, ref_corrected[1])
    cmp.check()


def reference_logits_temp(state: dict, frame_idx: int) -> dict:
    """Like reference_logits, but the prompt outputs not yet consolidated (temp_output_dict_per_obj) win."""
    out = reference_logits(state, frame_idx)
    for obj_id, idx in state["obj_id_to_idx"].items():
        d = state["temp_output_dict_per_obj"][idx]
        entry = d["cond_frame_outputs"].get(frame_idx) or d["non_cond_frame_outputs"].get(frame_idx)
        if entry is not None:
            out[obj_id] = entry["pred_masks"][0, 0].float().numpy()
    return out


def test_remove_object_leaves_others_unchanged(tiny_video_dir: Path):
    """Removing object 2 after a few frames: object 1's masks and logits stay exactly what they were.

    On the tiny stand-in's graphs (quick): objects are independent by construction (each its own memory and bank),
    which is the tracker's bookkeeping, not SAM 2's numerics; the parity tests run the real graphs with 3 objects."""
    from sam2rt.runtime import VideoTracker

    tracker = VideoTracker.from_dir(tiny_video_dir, backend="onnxruntime-cpu", fill_hole_area=0)
    frames, corners = pan_clip(6)

    def run(remove_at: int | None) -> list[np.ndarray]:
        tracker.reset()
        tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
        tracker.add_prompt(2, **BOX_PROMPT)
        logits = []
        for i in range(1, len(frames)):
            if i == remove_at:
                tracker.remove(2)
            masks = tracker.track(frames[i])
            assert (2 in masks) == (remove_at is None or i < remove_at)
            logits.append(tracker.low_res_logits[1].copy())
        return logits

    for a, b in zip(run(None), run(3)):
        np.testing.assert_array_equal(a, b)


def test_tracker_keeps_features_and_memory_on_the_device(tiny_video_dir: Path, monkeypatch, tmp_path: Path):
    """On the device backend (its CPU-provider form, as CI runs it) a frame's features, the memory-conditioned
    features and the memory bank stay device tensors: none is brought to the host while tracking, each memory goes
    into the bank from the memory encoder's output where it was computed (none is uploaded), the gathered memory
    equals the host selection's, and the results are exactly those of the same tracker fed host features (masks:
    those of the host upsampler)."""
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Sam2Model, VideoTracker
    from sam2rt.runtime.backends.onnxruntime_backend import OrtDeviceTensor
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend
    from sam2rt.runtime.postprocess import Upsampler
    from sam2rt.runtime.tensors import as_host
    from sam2rt.runtime.video.bank import MemoryBank
    from sam2rt.runtime.video.graphs import VideoGraphs

    manifest = Manifest.load(tiny_video_dir)
    backend = OrtDeviceBackend(manifest, "onnxruntime-cpu")
    tracker = VideoTracker(Sam2Model(manifest, backend), VideoGraphs(manifest, "onnxruntime-cpu"), fill_hole_area=0)
    frames, corners = pan_clip(5)
    gathered = []
    real_gather = MemoryBank.gather

    def checked_gather(bank, slots):
        out = real_gather(bank, slots)
        expected = np.stack([np.zeros(bank.entry_shape, np.float32) if b is None else b for b in slots])
        gathered.append(np.array_equal(out.value.numpy(), expected))  # (read past to_host: it is counted below)
        return out

    monkeypatch.setattr(MemoryBank, "gather", checked_gather)

    def run():
        tracker.reset()
        masks = [tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0])), tracker.add_prompt(2, **BOX_PROMPT)]
        logits = []
        for f in frames[1:]:
            masks.append(tracker.track(f))
            logits.append({k: v.copy() for k, v in tracker.low_res_logits.items()})
        return masks, logits

    brought_home = []
    real_to_host = OrtDeviceTensor.to_host
    monkeypatch.setattr(OrtDeviceTensor, "to_host", lambda self: brought_home.append(self.shape) or real_to_host(self))
    device_masks, device_logits = run()
    assert brought_home == []
    assert isinstance(tracker._feats["image_embed"], OrtDeviceTensor)
    assert all(isinstance(tracker.objects[k].pix_feat_with_mem, OrtDeviceTensor) for k in (1, 2))
    banks = [tracker.objects[k].bank for k in (1, 2)]
    assert [(b.stores, b.uploads) for b in banks] == [(5, 0), (5, 0)]  # frame 0's memory, then one per tracked frame
    assert len(gathered) == 8 and all(gathered)
    up = Upsampler()
    for masks, logits in zip(device_masks[2:], device_logits):
        for k in (1, 2):
            np.testing.assert_array_equal(masks[k], up(logits[k][None, None], FRAME_HW, 0.0)[0, 0])
    state = tracker.save_state(tmp_path / "device.npz")  # device tensors are saved as host arrays

    real_encode = backend.encode
    monkeypatch.setattr(backend, "encode", lambda x: {k: as_host(v) for k, v in real_encode(x).items()})
    host_masks, host_logits = run()
    assert not isinstance(tracker._feats["image_embed"], OrtDeviceTensor)
    for a, b in zip(device_logits, host_logits):
        for k in (1, 2):
            np.testing.assert_array_equal(a[k], b[k])
    for a, b in zip(device_masks, host_masks):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    tracker.load_state(state)
    assert tracker.frame_idx == 4 and isinstance(tracker._feats["image_embed"], np.ndarray)


def test_memory_bank_rounds_new_memories_where_they_were_computed(tiny_video_dir: Path):
    """MemoryBank.store rounds a memory encoder output to bfloat16 exactly as torch does (bit for bit, ties to even)
    while writing it into a free row; a stored memory is gathered without an upload, a memory given as host values
    (a restored state's) is uploaded once; a store that finds no free row still returns the rounded values, and the
    gather that first selects them uploads them. Gathered rows are the values, empty slots zeros."""
    from sam2rt.manifest import Manifest
    from sam2rt.runtime.video.bank import STORE_ROWS
    from sam2rt.runtime.video.graphs import VideoGraphs
    from sam2rt.runtime.video.memory import round_bf16, to_bf16_bits

    graphs = VideoGraphs(Manifest.load(tiny_video_dir), "onnxruntime-cpu")
    bank = graphs.new_bank()
    shape = bank.entry_shape
    rng = np.random.default_rng(0)

    def features() -> np.ndarray:
        x = rng.standard_normal((1, *shape)).astype(np.float32)
        u = x.view(np.uint32)
        u[0, 0, 0, :4] = (u[0, 0, 0, :4] & 0xFFFF0000) | 0x8000  # exact ties: round half to even
        return x

    raw = [features() for _ in range(STORE_ROWS)]
    address = bank._bank.value.data_ptr()
    kept = [bank.store(x) for x in raw]
    for x, v in zip(raw, kept):
        assert v.shape == shape and v.dtype == np.float32
        assert np.array_equal(to_bf16_bits(v), to_bf16_bits(x[0])) and np.array_equal(v, round_bf16(x[0]))
    restored = round_bf16(features()[0])
    out = bank.gather([kept[0], None, restored, kept[1]])
    assert (bank.stores, bank.uploads) == (STORE_ROWS, 1)
    np.testing.assert_array_equal(out.to_host(), np.stack([kept[0], np.zeros(shape, np.float32), restored, kept[1]]))
    assert bank._bank.value.data_ptr() == address  # written in place: a store moves one memory, not the bank
    for _ in range(bank.capacity):  # more stores than rows: the last ones are kept on the host only
        late = bank.store(extra := features())
    rows = bank.capacity - 1  # all but the zero row; 3 held by the gathered memories
    assert np.array_equal(late, round_bf16(extra[0])) and bank.stores == STORE_ROWS + rows - 3
    uploads = bank.uploads
    np.testing.assert_array_equal(bank.gather([late]).to_host(), late[None])
    assert bank.uploads == uploads + 1


def test_compact_memory_attention_takes_the_valid_slots_only(tiny_video_dir: Path, monkeypatch):
    """The GPU providers' compact memory attention (graph_table's `device` row; here the tiny stand-in's, on the CPU
    provider) gets exactly the valid memory slots and pointers, in order and without validity flags, while the bank
    fills up (frames 1-7: 1 to 7 memories and pointers), and tracks as the masked graph does."""
    from sam2rt.graph_table import VIDEO_DEVICE_SLOTS
    from sam2rt.runtime import VideoTracker
    from sam2rt.runtime.video.graphs import VideoGraphs

    masked = VideoTracker.from_dir(tiny_video_dir, backend="onnxruntime-cpu", fill_hole_area=0)
    compact = VideoTracker(masked.model, VideoGraphs(masked.model.manifest, "onnxruntime-cpu", slots=VIDEO_DEVICE_SLOTS),
                           fill_hole_area=0)
    assert compact.graphs.entries["memory_attention"]["file"] == "memory_attention.device.onnx"
    assert compact.graphs.compact_memory and not masked.graphs.compact_memory
    seen = []
    real = type(compact.graphs).memory_attention

    def spy(graphs, image_embed, feeds):
        if graphs is compact.graphs:
            seen.append((feeds["mem_feats"].shape[0], feeds["obj_ptrs"].shape[0], sorted(feeds)))
        return real(graphs, image_embed, feeds)

    monkeypatch.setattr(type(compact.graphs), "memory_attention", spy)
    frames, corners = pan_clip(8)
    for t in (masked, compact):
        t.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
        t.add_prompt(2, **BOX_PROMPT)
    for (i, a), (j, b) in zip(masked.propagate(frames), compact.propagate(frames)):
        assert i == j
        for k in (1, 2):
            np.testing.assert_allclose(compact.low_res_logits[k], masked.low_res_logits[k], rtol=0, atol=1e-5)
            np.testing.assert_array_equal(a[k], b[k])
    names = ["image_embed", "mem_feats", "mem_tpos", "obj_ptrs", "ptr_pos"]
    # frame t: the conditioning frame 0 and frames 1..t-1 (memories and pointers alike: frame 0 is not a non-cond entry)
    assert [s[:2] for s in seen[::2]] == [(t, t) for t in range(1, 8)] and seen[1::2] == seen[::2]
    assert all(s[2] == sorted(names[1:]) for s in seen)


def test_gpu_form_restores_state_after_mask_prompts_and_corrections(tiny_video_dir: Path, tmp_path: Path):
    """The GPU's data flow (device backend, compact memory attention, device memory bank; here on the CPU provider):
    a mask prompt, a correction click and a state saved and loaded mid-stream continue exactly as going on directly
    (the restored tracker rebuilds its banks from the saved bfloat16 memories)."""
    from sam2rt.graph_table import VIDEO_DEVICE_SLOTS
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Sam2Model, VideoTracker
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend
    from sam2rt.runtime.video.graphs import VideoGraphs

    m = Manifest.load(tiny_video_dir)
    tracker = VideoTracker(Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cpu")),
                           VideoGraphs(m, "onnxruntime-cpu", slots=VIDEO_DEVICE_SLOTS), fill_hole_area=0)
    assert tracker.graphs.compact_memory
    frames, corners = pan_clip(6)
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    tracker.add_prompt(2, mask=patch_mask(corners[0]))
    for f in frames[1:3]:
        tracker.track(f)
    tracker.add_prompt(1, points=[[100.0, 100.0]], labels=[0])  # a correction on frame 2
    path = tracker.save_state(tmp_path / "gpu_form.npz")
    direct = [tracker.track(f) for f in frames[3:]]
    direct_logits = {k: v.copy() for k, v in tracker.low_res_logits.items()}
    tracker.load_state(path)
    assert all(o.bank is None for o in tracker.objects.values())
    restored = [tracker.track(f) for f in frames[3:]]
    for a, b in zip(direct, restored):
        assert set(a) == set(b) == {1, 2}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    for k, v in direct_logits.items():
        np.testing.assert_array_equal(tracker.low_res_logits[k], v)


def test_state_save_restore_continues_identically(any_tracker, tmp_path: Path):
    """An npz state saved mid-stream and loaded back gives the same next frame as going on directly."""
    tracker = any_tracker
    frames, corners = pan_clip(3)
    tracker.reset()
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    tracker.track(frames[1])
    path = tracker.save_state(tmp_path / "state.npz")
    with np.load(path, allow_pickle=False) as data:  # a plain npz: no pickled objects
        assert "__header__" in data.files
    direct = tracker.track(frames[2])
    direct_logits = tracker.low_res_logits[1].copy()
    tracker.reset()
    tracker.load_state(path)
    assert tracker.frame_idx == 1 and tracker.object_ids == [1]
    restored = tracker.track(frames[2])
    np.testing.assert_array_equal(tracker.low_res_logits[1], direct_logits)
    np.testing.assert_array_equal(restored[1], direct[1])


def test_track_cli_writes_overlay_video_and_jsonl_without_torch(video_model_dir: Path, tmp_path: Path):
    """`sam2rt track` on a 2-frame clip writes the overlay video and one JSON line per frame; the process that
    ran it (the CLI, VideoTracker and the video graphs) never imported torch."""
    import json
    import subprocess
    import sys
    import textwrap

    import cv2

    frames, corners = pan_clip(2)
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, FRAME_HW[::-1])
    for f in frames:
        writer.write(f[..., ::-1])
    writer.release()
    out, jsonl = tmp_path / "tracked.mp4", tmp_path / "masks.jsonl"
    px, py = point_prompt(corners[0])["points"][0]
    args = ["track", "--model-dir", str(video_model_dir), "--video", str(video),
            "--box", ",".join(str(v) for v in BOX_PROMPT["box"]), "--obj", "7", "--point", f"{px},{py}",
            "--out", str(out), "--json", str(jsonl), "--backend", "onnxruntime-cpu", "--quiet"]
    code = textwrap.dedent(
        f"""
        import json, sys
        from sam2rt import VideoTracker  # noqa: F401 (the public API, imported as users do)
        from sam2rt.cli import main
        rc = main({args!r})
        print(json.dumps({{"rc": rc, "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}}))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["rc"] == 0, res.stderr
    assert info["torch"] == [], f"torch was imported: {info['torch'][:5]}"
    assert "per frame" in res.stdout and "weights:" in res.stdout
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["frame"] for line in lines] == [0, 1]
    assert set(lines[0]["objects"]) == {"1", "7"}
    rle = lines[1]["objects"]["1"]["rle"]
    assert rle["size"] == list(FRAME_HW) and sum(rle["counts"]) == FRAME_HW[0] * FRAME_HW[1]
    cap = cv2.VideoCapture(str(out))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 2


def test_track_cli_groups_prompts_into_objects():
    from sam2rt.track_cli import group_prompts, rle

    objs = group_prompts([("box", (1, 2, 3, 4)), ("point", (5, 6, 1)), ("obj", ""), ("point", (7, 8, 0)), ("obj", "x"),
                          ("box", (0, 0, 1, 1))])
    assert objs == {1: {"box": [1, 2, 3, 4], "points": [[5, 6]], "labels": [1]},
                    2: {"box": None, "points": [[7, 8]], "labels": [0]},
                    "x": {"box": [0, 0, 1, 1], "points": [], "labels": []}}
    m = np.array([[1, 0], [1, 1]], bool)
    assert rle(m) == {"size": [2, 2], "counts": [0, 2, 1, 1]}


def test_export_records_static_video_graphs(model_dir: Path):
    """The video graphs are in the manifest with their sha256, pass onnx.checker, use no complex ops, and
    every memory input has a static shape (slots fixed by the export, validity flags instead of lengths). The
    GPU providers' compact form takes the valid slots only (counts bounded by the same slots), without a key mask."""
    import onnx

    from sam2rt.manifest import Manifest, sha256_file

    m = Manifest.load(model_dir)
    for role in ("memory_encoder", "memory_attention", "track_decoder", "mask_downsample", "video_constants"):
        entry = m.graph(role)
        assert entry["sha256"] == sha256_file(model_dir / entry["file"])
    attn = m.graph("memory_attention")
    assert attn["slots"] == {**attn["slots"], "cond": 1, "recent": 6, "pointers": 16}
    shapes = {i["name"]: i["shape"] for i in attn["inputs"]}
    assert shapes["mem_feats"] == [7, 64, 64, 64] and shapes["mem_valid"] == [7] and shapes["obj_ptrs"] == [16, 256]
    assert all(isinstance(d, int) for s in shapes.values() for d in s)
    graph = onnx.load(str(model_dir / attn["file"]))
    onnx.checker.check_model(graph, full_check=True)
    graph = onnx.shape_inference.infer_shapes(graph)
    tensor_types = {t.type.tensor_type.elem_type for t in [*graph.graph.value_info, *graph.graph.input, *graph.graph.output]}
    assert not tensor_types & {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
    v = m.data["video"]
    assert v["num_maskmem"] == 7 and v["use_signed_tpos_enc_to_obj_ptrs"] is True and v["no_obj_embed_spatial"] is True
    assert v["binarize_mask_from_pts_for_mem_enc"] is True and v["fill_hole_area"] == 8
    diffs = m.data["verification"]["max_abs_diff"]
    assert {k for k in diffs if k.startswith("memory_attention[")} and max(diffs.values()) < 1e-3
    # the CPU's variant: the same inputs, com.microsoft MultiHeadAttention, verified against PyTorch like the base
    fused = m.variant("memory_attention", "fused")
    assert fused["sha256"] == sha256_file(model_dir / fused["file"]) and fused["derived_from_sha256"] == attn["sha256"]
    assert fused["inputs"] == attn["inputs"] and {k for k in diffs if k.startswith("memory_attention.fused[")}
    fused_graph = onnx.load(str(model_dir / fused["file"]))
    assert {n.op_type for n in fused_graph.graph.node if n.domain == "com.microsoft"} == {"MultiHeadAttention"}
    assert not [n for n in graph.graph.node if n.domain not in ("", "ai.onnx")]  # the base: standard ops (TensorRT)
    # one RoPE table pair for all layers (a copy per use made the file 145 MB)
    assert (model_dir / attn["file"]).stat().st_size < 30e6
    from sam2rt.runtime.video.graphs import VideoGraphs

    assert VideoGraphs(m, "onnxruntime-cpu").entries["memory_attention"]["file"] == fused["file"]
    # the GPU's: valid slots only (M <= 7 memories, P <= 16 pointers), MultiHeadAttention without a mask input
    device = m.variant("memory_attention", "device")
    assert device["derived_from_sha256"] == attn["sha256"] and {k for k in diffs if k.startswith("memory_attention.device[")}
    device_shapes = {i["name"]: i["shape"] for i in device["inputs"]}
    assert device_shapes == {"image_embed": [1, 256, 64, 64], "mem_feats": ["slots", 64, 64, 64], "mem_tpos": ["slots"],
                             "obj_ptrs": ["pointers", 256], "ptr_pos": ["pointers"]}
    device_graph = onnx.load(str(model_dir / device["file"]))
    heads = [n for n in device_graph.graph.node if n.domain == "com.microsoft"]
    assert {n.op_type for n in heads} == {"MultiHeadAttention"} and all(len(n.input) == 3 for n in heads)
    assert VideoGraphs(m, "onnxruntime-cuda").entries["memory_attention"]["file"] == device["file"]
    assert m.variant("memory_attention", "fp16")["source"] == "device"


def test_rope_in_half_split_order_is_the_reference_rotation():
    """The exported memory attention rotates q and k with channels in half-split order (two products, no
    interleave): the same numbers as sam2's complex `apply_rotary_enc`, channel for channel after the reordering,
    and the same scores q.k."""
    import torch
    from sam2.modeling.position_encoding import apply_rotary_enc, compute_axial_cis

    from sam2rt.export.video_graphs import apply_rope_half, half_split_order

    cis = compute_axial_cis(dim=256, end_x=64, end_y=64, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 4096, 256, generator=g), torch.randn(1, 1, 4096, 256, generator=g)
    ref_q, ref_k = apply_rotary_enc(q, k, cis)
    order = half_split_order(256, 1)
    cos2, sin2 = torch.cat([cis.real] * 2, -1).float(), torch.cat([cis.imag] * 2, -1).float()
    got_q, got_k = apply_rope_half(q[..., order], cos2, sin2), apply_rope_half(k[..., order], cos2, sin2)
    assert torch.allclose(got_q, ref_q[..., order], atol=1e-6) and torch.allclose(got_k, ref_k[..., order], atol=1e-6)
    scores, ref_scores = got_q[0, 0, :64] @ got_k[0, 0, :64].T, ref_q[0, 0, :64] @ ref_k[0, 0, :64].T
    assert torch.allclose(scores, ref_scores, atol=1e-4)
    assert not torch.equal(order, torch.arange(256))  # the test would pass trivially without a reordering


def _scipy_connected_components(mask):
    """sam2.utils.misc.get_connected_components's contract (8-connected labels and each pixel's component
    area, 0 off the mask) from scipy, standing in for the reference's CUDA extension."""
    import torch
    from scipy import ndimage

    m = mask.to(torch.uint8).numpy()
    labels, areas = np.zeros(m.shape, np.int32), np.zeros(m.shape, np.int32)
    for i in range(m.shape[0]):
        lab, n = ndimage.label(m[i, 0], structure=np.ones((3, 3), int))
        labels[i, 0] = lab
        counts = np.bincount(lab.ravel(), minlength=n + 1)
        counts[0] = 0
        areas[i, 0] = counts[lab]
    return torch.from_numpy(labels), torch.from_numpy(areas)


@pytest.mark.parametrize("max_area", [1, 8, 40])
def test_fill_holes_equals_the_reference_function(monkeypatch, max_area: int):
    """The tracker's hole filling (OpenCV) against sam2's `fill_holes_in_mask_scores` with its connected
    components computed by scipy: the same pixels become 0.1, nothing else changes."""
    import torch
    import sam2.utils.misc as misc

    from sam2rt.runtime.video.tracker import fill_holes

    monkeypatch.setattr(misc, "get_connected_components", _scipy_connected_components)
    rng = np.random.default_rng(max_area)
    logits = rng.normal(2.0, 1.0, (256, 256)).astype(np.float32)  # mostly foreground...
    logits[rng.random((256, 256)) < 0.04] = -3.0                   # ...with 1-pixel holes,
    logits[100:103, 50:53] = -1.0                                  # a 9-pixel hole,
    logits[10:17, 200:207] = -1.0                                  # a 49-pixel hole
    logits[:, 240:] = -5.0                                         # and a large background band
    ref = misc.fill_holes_in_mask_scores(torch.from_numpy(logits)[None, None], max_area)[0, 0].numpy()
    ours = fill_holes(logits, max_area)
    np.testing.assert_array_equal(ours, ref)
    filled = (ours != logits)
    assert filled.any(), "the clip has holes to fill"
    assert np.all(ours[filled] == np.float32(0.1)) and not filled[:, 240:].any()
    assert filled[101, 51] == (max_area >= 9) and filled[12, 202] == (max_area >= 49)


@pytest.mark.slow
def test_hole_filling_through_tracking_matches_the_reference(model_dir: Path, video_reference, monkeypatch,
                                                              tmp_path: Path):
    """fill_hole_area=8 (the model's setting) on both sides, the reference's connected components from scipy:
    holes filled in the stored logits feed the next frames' memory and corrections identically."""
    import sam2.sam2_video_predictor as svp
    import sam2.utils.misc as misc

    from sam2rt.runtime import VideoTracker

    monkeypatch.setattr(misc, "get_connected_components", _scipy_connected_components)
    filled_pixels = []

    def counting_fill(mask, max_area):
        out = misc.fill_holes_in_mask_scores(mask, max_area)
        filled_pixels.append(int((out != mask).sum()))
        return out

    monkeypatch.setattr(svp, "fill_holes_in_mask_scores", counting_fill)
    monkeypatch.setattr(video_reference, "fill_hole_area", 8)
    n = 4  # frames 1-3 read memories made from filled logits (6 frames took 170 s of the slow suite)
    frames, corners = pan_clip(n)
    state = reference_state(video_reference, frames, tmp_path)
    video_reference.add_new_points_or_box(state, 0, 1, **point_prompt(corners[0]))
    video_reference.add_new_points_or_box(state, 0, 2, **BOX_PROMPT)
    ref = {idx: (reference_logits(state, idx), video_masks(ids, m)) for idx, ids, m in video_reference.propagate_in_video(state)}
    assert sum(filled_pixels) > 0, "the clip's masks have holes of <= 8 pixels to fill"

    tracker = VideoTracker.from_dir(model_dir, backend="onnxruntime-cpu")  # the model's own setting
    assert tracker.fill_hole_area == 8
    cmp = Comparison()
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    masks = tracker.add_prompt(2, **BOX_PROMPT)
    cmp.add(0, tracker.low_res_logits, ref[0][0], masks, ref[0][1])
    for i in range(1, n):
        masks = tracker.track(frames[i])
        cmp.add(i, tracker.low_res_logits, ref[i][0], masks, ref[i][1])
    cmp.check()


class _FakeCamera:
    """cv2.VideoCapture for a camera index: frames as BGR, no frame count, then the stream ends."""

    def __init__(self, frames: list[np.ndarray], opened: bool = True) -> None:
        self.frames, self.opened, self.released = list(frames), opened, False

    def isOpened(self) -> bool:
        return self.opened

    def get(self, prop: int) -> float:
        return 0.0  # cameras report neither a frame count nor (often) a rate

    def read(self):
        if not self.frames:
            return False, None
        return True, np.ascontiguousarray(self.frames.pop(0)[..., ::-1])

    def release(self) -> None:
        self.released = True


def test_track_cli_reads_a_camera_index(video_model_dir: Path, tmp_path: Path, monkeypatch, capsys):
    """`--video 0` opens camera 0 (cv2.VideoCapture(0)) and tracks until the stream ends; a camera that
    cannot be opened is a clear error with exit status 2."""
    import json

    import cv2

    from sam2rt.cli import main

    frames, corners = pan_clip(2)
    opened: list = []

    def capture(source):
        opened.append(source)
        cam = _FakeCamera(frames, opened=source == 0)
        return cam

    monkeypatch.setattr(cv2, "VideoCapture", capture)
    jsonl = tmp_path / "cam.jsonl"
    rc = main(["track", "--model-dir", str(video_model_dir), "--video", "0", "--box",
               ",".join(str(v) for v in BOX_PROMPT["box"]), "--json", str(jsonl), "--backend", "onnxruntime-cpu",
               "--quiet"])
    assert rc == 0 and opened == [0]
    assert [json.loads(line)["frame"] for line in jsonl.read_text().splitlines()] == [0, 1]
    assert "tracked 1 object(s) over 2 frame(s)" in capsys.readouterr().out

    rc = main(["track", "--model-dir", str(video_model_dir), "--video", "3", "--box", "1,2,30,40", "--quiet"])
    assert rc == 2 and opened[-1] == 3
    assert "could not open camera 3" in capsys.readouterr().err


# --- FP16 video graphs (onnxruntime-cuda:fp16's) ------------------------------------------------------
# Bounds of the FP16 graphs against the FP32 ones, per frame and object: issue 11's for FP16 images (mean
# |logit difference| of the low-res logits, and the mask IoU `sam2rt verify` holds trained weights to).
FP16_MEAN_LOGIT_TOL = 0.05
FP16_MIN_IOU = 0.98


def test_fp16_video_graphs_are_chosen_by_precision(model_dir: Path, tiny_video_dir: Path):
    """precision="fp16" loads the export's FP16 memory encoder, memory attention and tracking decoder (the mask
    downsampling stays FP32); onnxruntime-cuda:fp16 (here: its name on the CPU provider) requires them, and
    says how to make them where the export has none; an FP16 TensorRT engine falls back to the FP32 graphs."""
    from sam2rt.errors import GraphNotExportedError
    from sam2rt.manifest import Manifest
    from sam2rt.runtime.video.graphs import VideoGraphs

    graphs = VideoGraphs(Manifest.load(model_dir), "onnxruntime-cpu", precision="fp16")
    assert {role: e["file"] for role, e in graphs.entries.items()} == {
        "memory_encoder": "memory_encoder.fp16.onnx", "memory_attention": "memory_attention.fp16.onnx",
        "track_decoder": "track_decoder.fp16.onnx", "mask_downsample": "mask_downsample.onnx",
        "tracking_decoder": "track_decoder.tracking.fp16.onnx"}
    tiny = Manifest.load(tiny_video_dir)
    with pytest.raises(GraphNotExportedError, match=r"no FP16 memory_encoder .*add_variants\(DIR, optimized=False, fp16=True\)"):
        VideoGraphs(tiny, "onnxruntime-cpu", precision="fp16")
    assert graphs.compact_memory  # made from the compact `device` form
    fallback = VideoGraphs(tiny, "tensorrt", precision="fp16")  # the FP32 graphs a GPU provider loads
    assert fallback.entries["memory_attention"]["file"] == "memory_attention.device.onnx"
    assert fallback.entries["tracking_decoder"]["file"] == "track_decoder.tracking.onnx"  # as the FP32 track_decoder


@pytest.mark.slow
def test_fp16_video_graphs_track_like_fp32(tracker):
    """The FP16 video graphs (on the CPU provider here; the CUDA provider runs them on a GPU), fed the same FP32
    image features, track a point and a box through 4 frames within the FP16 bounds of the FP32 graphs."""
    from sam2rt.runtime import VideoTracker
    from sam2rt.runtime.video.graphs import VideoGraphs

    fp16 = VideoTracker(tracker.model, VideoGraphs(tracker.model.manifest, "onnxruntime-cpu", precision="fp16"),
                        fill_hole_area=0)
    frames, corners = pan_clip(4)
    rows = []
    for t in (tracker, fp16):
        t.reset()
        t.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
        t.add_prompt(2, **BOX_PROMPT)
    steps = zip(tracker.propagate(frames), fp16.propagate(frames))
    for (idx, ref_masks), (idx16, masks) in steps:
        assert idx == idx16 and set(masks) == set(ref_masks) == {1, 2}
        for obj in (1, 2):
            mean = float(np.mean(np.abs(fp16.low_res_logits[obj] - tracker.low_res_logits[obj])))
            rows.append((idx, obj, mean, iou(masks[obj], ref_masks[obj]), int(ref_masks[obj].sum())))
    print("\n(frame, object, mean |logit diff|, IoU, FP32 mask pixels):", rows)
    assert len(rows) == 8 and all(r[4] > 0 for r in rows)  # objects present: the comparison means something
    assert all(r[2] <= FP16_MEAN_LOGIT_TOL and r[3] >= FP16_MIN_IOU for r in rows), rows
