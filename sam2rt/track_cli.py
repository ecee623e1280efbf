"""`sam2rt track`: follow prompted objects through a video file or a camera, write an overlay video and masks.

    sam2rt track --model-dir D --video in.mp4 --box 10,20,200,220 --obj --point 300,200 --out tracked.mp4 \\
                 [--json masks.jsonl]

Prompts apply to the first frame. They belong to object 1 until the first `--obj [ID]`, which starts the
next object (ID defaults to the next integer). The JSON Lines file has one line per frame with, per
object, its area, bounding box, object score and the mask as COCO-style uncompressed RLE (column-major).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import Sam2rtError


class _PromptAction(argparse.Action):
    """Keeps --box / --point / --obj in command-line order (they are grouped into objects afterwards)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, "prompts", None) or [])
        items.append((self.dest, values))
        namespace.prompts = items


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import parse_box as _parse_box, parse_point as _parse_point

    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--video", required=True, help="a video file, or a camera index (0, 1, ...)")
    p.add_argument("--box", type=_parse_box, action=_PromptAction, metavar="X0,Y0,X1,Y1", help="a box on the first frame")
    p.add_argument("--point", type=_parse_point, action=_PromptAction, metavar="X,Y[,LABEL]",
                   help="a point on the first frame (LABEL 1 foreground, 0 background); repeatable")
    p.add_argument("--obj", nargs="?", const="", action=_PromptAction, metavar="ID",
                   help="start the next object (prompts before the first --obj belong to object 1)")
    p.add_argument("--out", type=Path, help="write the overlay video here (.mp4)")
    p.add_argument("--json", type=Path, help="write per-frame masks as JSON Lines here")
    p.add_argument("--backend", default="auto")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames (cameras: default 300)")
    p.add_argument("--fill-hole-area", type=int, default=None, help="hole filling in low-res pixels (0: off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(prompts=[])


def group_prompts(items: list[tuple[str, Any]]) -> dict[Any, dict[str, Any]]:
    """[("box", b), ("point", p), ("obj", id), ...] -> {obj_id: {"box": b, "points": [...], "labels": [...]}}."""
    objects: dict[Any, dict[str, Any]] = {}
    current: Any = 1
    for kind, value in items:
        if kind == "obj":
            if value:
                current = int(value) if value.isdigit() else value
            elif current in objects:  # the next free integer id
                current = max([k for k in objects if isinstance(k, int)] + [0]) + 1
            continue
        obj = objects.setdefault(current, {"box": None, "points": [], "labels": []})
        if kind == "box":
            if obj["box"] is not None:
                raise Sam2rtError(f"object {current} has two --box prompts; start another object with --obj")
            obj["box"] = list(value)
        else:
            obj["points"].append(list(value[:2]))
            obj["labels"].append(int(value[2]))
    if not objects:
        raise Sam2rtError("give at least one prompt: --box X0,Y0,X1,Y1 or --point X,Y[,LABEL]")
    return objects


def rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO-style uncompressed RLE of a bool mask (column-major run lengths, starting with zeros)."""
    flat = np.asarray(mask, bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _frames(cap: Any, limit: int | None) -> Iterator[np.ndarray]:
    import cv2

    n = 0
    while limit is None or n < limit:
        ok, bgr = cap.read()
        if not ok:
            return
        n += 1
        yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _open_output(path: Path, flag: str) -> Any:
    """`path` opened for writing (its folder made), or a Sam2rtError that says why it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w")
    except OSError as exc:
        raise Sam2rtError(f"cannot write {flag} {path}: {exc.strerror or exc}") from exc


def _open_writer(cv2: Any, path: Path, fps: float, size: tuple[int, int]) -> Any:
    """An OpenCV mp4 writer for `path`, or a Sam2rtError: OpenCV reports a writer it cannot open only by isOpened(),
    and then drops every frame written to it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Sam2rtError(f"cannot write --out {path}: {exc.strerror or exc}") from exc
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        writer.release()
        raise Sam2rtError(f"cannot write --out {path}: OpenCV could not open a video writer for it (give a writable "
                          "path ending in .mp4)")
    return writer


def _release(writer: Any, cap: Any, jsonl: Any = None) -> None:
    if writer is not None:
        writer.release()
    if jsonl is not None:
        jsonl.close()
    cap.release()


def run(args: argparse.Namespace) -> int:
    import cv2

    from .annotate import annotate
    from .runtime import VideoTracker

    objects = group_prompts(args.prompts)
    source: Any = int(args.video) if str(args.video).isdigit() else str(args.video)
    if isinstance(source, str) and not Path(source).is_file():
        raise Sam2rtError(f"video file {source} does not exist")
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise Sam2rtError(f"could not open {'camera' if isinstance(source, int) else 'video'} {args.video}")
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if isinstance(source, str) else 0
    limit = args.max_frames if args.max_frames is not None else (None if isinstance(source, str) else 300)
    if total > 0 and limit is not None:
        total = min(total, limit)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer, jsonl = None, None
    try:
        frames = _frames(cap, limit)
        first = next(frames, None)
        if first is None:
            raise Sam2rtError(f"{args.video} has no frames")
        # the outputs are opened before the model loads and anything is tracked: a path that cannot be written is
        # an error now, not a video tracked for nothing
        if args.out:
            writer = _open_writer(cv2, args.out, fps, (first.shape[1], first.shape[0]))
        if args.json:
            jsonl = _open_output(args.json, "--json")
    except BaseException:
        _release(writer, cap)
        raise

    t0 = time.perf_counter()
    try:
        tracker = VideoTracker.from_dir(args.model_dir, backend=args.backend, fill_hole_area=args.fill_hole_area)
        t_load = time.perf_counter() - t0
        for obj_id, p in objects.items():
            tracker.add_prompt(obj_id, points=p["points"] or None, labels=p["labels"] or None, box=p["box"],
                               frame=first)  # the first object makes it the current frame, the rest join it
    except BaseException:
        _release(writer, cap, jsonl)
        raise
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional for the runtime
        tqdm = None
    bar = tqdm(total=total or None, unit="frame", desc="track", disable=args.quiet, file=sys.stderr) if tqdm else None
    step_times: list[float] = []
    ids = list(objects)

    def from_first() -> Iterator[np.ndarray]:
        yield first
        yield from frames

    try:
        t_prev = time.perf_counter()
        # on a GPU the next frame is read and encoded while this one is tracked: the overlay takes the frame the masks
        # belong to from the tracker
        for idx, masks in tracker.propagate(from_first(), num_frames=total or None):
            now = time.perf_counter()
            if idx > 0:
                step_times.append(now - t_prev)
            t_prev = now
            rgb = tracker.current_frame
            if writer is not None:
                stack = np.stack([masks.get(k, np.zeros(rgb.shape[:2], bool)) for k in ids]) if ids else np.zeros((0, *rgb.shape[:2]), bool)
                writer.write(cv2.cvtColor(annotate(rgb, stack), cv2.COLOR_RGB2BGR))
            if jsonl is not None:
                scores = tracker.object_scores
                line = {"frame": idx, "objects": {}}
                for k, m in masks.items():
                    ys, xs = np.nonzero(m)
                    bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if xs.size else None
                    line["objects"][str(k)] = {"area": int(m.sum()), "bbox": bbox, "score": scores.get(k), "rle": rle(m)}
                jsonl.write(json.dumps(line) + "\n")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        _release(writer, cap, jsonl)

    tracker.wait()  # the last frame's memory encoding (background memory): its time belongs to the stages below
    tracker.close()
    n = len(step_times) + 1
    print(f"tracked {len(ids)} object(s) over {n} frame(s) on {tracker.model.backend_name} "
          f"(weights: {tracker.model.manifest.describe_weights()}); load {t_load:.2f} s")
    if step_times:
        st = np.array(step_times) * 1e3
        print(f"per frame (frames 1..{n - 1}): mean {st.mean():.0f} ms, p50 {np.percentile(st, 50):.0f} ms, "
              f"p90 {np.percentile(st, 90):.0f} ms ({1e3 / st.mean():.2f} frames/s)")
        stages = [t for t in list(tracker.timings)[1:] if "track_s" in t]
        if stages:
            parts = {k: 1e3 * float(np.mean([t.get(k, 0.0) for t in stages])) for k in stages[0]}
            print("  stages (mean ms): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in parts.items()))
    if args.out:
        print(f"overlay video written to {args.out}")
    if args.json:
        print(f"masks written to {args.json}")
    return 0
