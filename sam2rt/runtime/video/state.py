"""A VideoTracker's state in one .npz file (no pickle): save it, stop, and go on tracking later.

The file holds a JSON header (frame index, video length, object ids, which frames each object keeps)
and the arrays: each kept frame's bfloat16 memory (as uint16 bits), object pointer and score, the
current frame's outputs, its image features and each object's memory-conditioned features (so a
correction after a restore is exactly what it would have been). Restoring needs the same model
directory (the encoder's sha256 is checked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import Sam2rtError
from ..tensors import as_host
from .memory import NO_MASKS, FrameOutput, ObjectMemory, from_bf16_bits, to_bf16_bits

if TYPE_CHECKING:
    from .tracker import VideoTracker

STATE_FORMAT = "sam2rt-video-state"
STATE_VERSION = 1


def _put(arrays: dict[str, np.ndarray], key: str, out: FrameOutput) -> dict[str, Any]:
    arrays[f"{key}.ptr"] = out.obj_ptr
    if out.maskmem is not None:
        arrays[f"{key}.mem"] = to_bf16_bits(out.maskmem)  # exact: the values are bfloat16 ones
    if out.pred_masks.size:
        arrays[f"{key}.masks"] = out.pred_masks
    return {"score": out.object_score, "mem": out.maskmem is not None, "masks": bool(out.pred_masks.size)}


def _get(data: Any, key: str, meta: dict[str, Any]) -> FrameOutput:
    return FrameOutput(
        np.array(data[f"{key}.masks"]) if meta["masks"] else NO_MASKS,
        np.array(data[f"{key}.ptr"]),
        float(meta["score"]),
        from_bf16_bits(np.array(data[f"{key}.mem"])) if meta["mem"] else None,
    )


def save_state(tracker: "VideoTracker", path: str | Path) -> Path:
    """Write the tracker's state to `path` (.npz). Object ids must be ints or strings: those come back from the file's
    JSON header as they went in (a tuple would come back a list, which cannot be a dict key)."""
    arrays: dict[str, np.ndarray] = {}
    objects = []
    bad = [k for k in tracker.objects if type(k) not in (int, str)]
    if bad:
        raise Sam2rtError(f"object ids must be ints or strings to be saved, got {bad[0]!r} ({type(bad[0]).__name__}); "
                          "track the object under an int or str id")
    for i, (obj_id, obj) in enumerate(tracker.objects.items()):
        entry: dict[str, Any] = {"id": obj_id, "origin": obj.origin, "cond": {}, "non_cond": {}}
        for kind in ("cond", "non_cond"):
            for t, out in getattr(obj.memory, kind).items():
                entry[kind][str(t)] = _put(arrays, f"o{i}.{kind}.{t}", out)
        if obj.current is not None:
            entry["current"] = _put(arrays, f"o{i}.current", obj.current)
        if obj.pix_feat_with_mem is not None:
            arrays[f"o{i}.pix"] = as_host(obj.pix_feat_with_mem)
        objects.append(entry)
    if tracker._feats is not None:
        arrays.update({f"feat.{k}": as_host(v) for k, v in tracker._feats.items()})
        arrays["frame"] = np.asarray(tracker._frame)
    header = {
        "format": STATE_FORMAT, "version": STATE_VERSION, "model_key": tracker.model.model_key,
        "frame_idx": tracker.frame_idx, "num_frames": tracker.num_frames,
        "orig_hw": list(tracker._orig_hw) if tracker._orig_hw else None, "objects": objects,
    }
    try:
        header_text = json.dumps(header)
    except TypeError as exc:
        raise Sam2rtError(f"object ids must be ints or strings to be saved: {exc}") from exc
    path = Path(path)
    with open(path, "wb") as f:
        np.savez(f, __header__=np.array(header_text), **arrays)
    return path


def load_state(tracker: "VideoTracker", path: str | Path) -> None:
    """Replace the tracker's state with the one saved in `path` by save_state."""
    try:
        data = np.load(path, allow_pickle=False)
        header = json.loads(str(data["__header__"]))
    except Exception as exc:
        raise Sam2rtError(f"{path} is not a sam2rt video state file ({exc})") from exc
    with data:
        if not isinstance(header, dict) or header.get("format") != STATE_FORMAT or header.get("version", 0) > STATE_VERSION:
            raise Sam2rtError(f"{path} is not a sam2rt video state file this version reads")
        if header.get("model_key") != tracker.model.model_key:
            raise Sam2rtError(f"{path} was saved with another model (encoder sha256 {str(header.get('model_key'))[:12]}...)")
        try:  # everything read before the tracker's state is replaced: a damaged file leaves it as it was
            state = _read(data, header)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise Sam2rtError(f"{path} is a damaged sam2rt video state file ({type(exc).__name__}: {exc})") from exc
    tracker.reset()
    for name, value in state.items():
        setattr(tracker, name, value)


def _read(data: Any, header: dict[str, Any]) -> dict[str, Any]:
    """The tracker's attributes from a state file's header and arrays (KeyError etc. where the file is damaged)."""
    from .tracker import _Object

    state: dict[str, Any] = {
        "frame_idx": int(header["frame_idx"]),
        "num_frames": None if header["num_frames"] is None else int(header["num_frames"]),
        "_orig_hw": tuple(int(d) for d in header["orig_hw"]) if header["orig_hw"] else None,
        "objects": {},
    }
    if "frame" in data.files:
        state["_frame"] = np.array(data["frame"])
        state["_feats"] = {k[len("feat."):]: np.array(data[k]) for k in data.files if k.startswith("feat.")}
    for i, entry in enumerate(header["objects"]):
        if type(entry["id"]) not in (int, str):
            raise TypeError(f"object id {entry['id']!r} is not an int or a string")
        obj = _Object(ObjectMemory(), None, str(entry["origin"]), None)
        for kind in ("cond", "non_cond"):
            for t, meta in entry[kind].items():
                getattr(obj.memory, kind)[int(t)] = _get(data, f"o{i}.{kind}.{t}", meta)
        if "current" in entry:
            obj.current = _get(data, f"o{i}.current", entry["current"])
        if f"o{i}.pix" in data.files:
            obj.pix_feat_with_mem = np.array(data[f"o{i}.pix"])
        state["objects"][entry["id"]] = obj
    return state
