"""`sam2rt bench --video`: per-frame tracking latency beside SAM2VideoPredictor, and memory over long streams.

- latency: a 640x480 camera pan (synthetic photo-like frames with a moving object); 1 and 3 objects
  prompted by boxes on frame 0; the reference's `propagate_in_video` and the tracker's `track()` advance
  one frame each in turn (order flipped every frame, a pause before each), and frames FIRST..LAST are
  timed. The reference preprocesses its frames when the video is loaded (init_state); the tracker
  preprocesses each frame inside track(), as a live stream must: its times include that.
- memory: RSS of a fresh process tracking 1 object over 300 frames (at frame 50 and at the end), and
  of the reference over 60 frames (it keeps every frame's state, so it grows).
- each tracker step is timed with its memory encoding (`track()` then `wait()`): with background memory (the GPU's
  default) that encoding runs after the masks are returned, so the time to the masks (`sam2rt_to_masks_ms`, what a
  live camera waits for) is also recorded; the per-frame times and targets are the whole work.
- throughput (GPU backends): a video file's frames through `propagate` with 1 object, with and without prefetch
  (the next frame read and encoded on a worker thread while this one is tracked), two runs of each in turn;
  frames/s from the time between the yields of the frames after SETTLED_FRAME. Latency is what a live camera
  sees; throughput is how fast a file is processed.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.backends.fixed_shapes import CAPTURE_AFTER
from .child import synthetic_image

COOLDOWN_S = 0.05
FRAME_HW = (480, 640)


def pan_frames(n: int, hw: tuple[int, int] = FRAME_HW) -> list[np.ndarray]:
    """n frames of a pan over a larger synthetic photo, with a bright disc moving through them."""
    h, w = hw
    big = synthetic_image(h + 2 * n + 8, w + 4 * n + 8, seed=3)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for i in range(n):
        f = big[2 * i : 2 * i + h, 4 * i : 4 * i + w].copy()
        cy, cx = h // 2 + int(60 * np.sin(i / 9)), w // 4 + 5 * (i % 60)
        f[(yy - cy) ** 2 + (xx - cx) ** 2 < 40**2] = (240, 200, 40)
        frames.append(np.ascontiguousarray(f))
    return frames


BOXES = [[100.0, 160.0, 260.0, 320.0], [300.0, 60.0, 460.0, 200.0], [420.0, 260.0, 620.0, 460.0]]


def _reference_checkpoint(manifest, workdir: Path) -> tuple[str, str]:
    from ..export.checkpoint import reference_checkpoint
    from ..model_specs import get_spec

    spec = get_spec(manifest.model_name, manifest.model.get("version", "2.1"))
    return spec.config_name, str(reference_checkpoint(manifest, workdir))


def _reference_state(predictor, frames: list[np.ndarray], workdir: Path) -> dict:
    import cv2

    folder = workdir / "frames"
    folder.mkdir(exist_ok=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), f[..., ::-1])
    return predictor.init_state(str(folder))


GPU_BACKENDS = ("onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")
# hiera's default memory (16 pointers) is full from frame 16; that shape gets fixed buffers CAPTURE_AFTER frames later
SETTLED_FRAME = 16 + CAPTURE_AFTER + 1


def latency(model_dir: Path, objects: int, first: int, last: int, threads: int, reference: bool = True,
            backend: str = "onnxruntime-cpu", fixed_buffers: bool | None = None) -> dict[str, Any]:
    """Per-frame seconds for frames first..last, tracker and reference alternating.

    On a GPU backend the reference runs on CUDA (eager FP32) and each of its steps ends with a
    synchronisation, as the tracker's does when its masks reach the host. `fixed_buffers` False runs the video
    graphs without their fixed buffers (CUDA graphs): what those are worth.
    """
    from ..manifest import Manifest
    from ..runtime import Sam2Model, VideoTracker
    from ..runtime.video.graphs import VideoGraphs

    on_gpu = backend.split(":")[0] in GPU_BACKENDS
    frames = pan_frames(last + 1)
    if fixed_buffers is None:
        tracker = VideoTracker.from_dir(model_dir, backend=backend, fill_hole_area=0, threads=threads)
    else:
        model = Sam2Model.from_dir(model_dir, backend=backend, threads=threads)
        graphs = VideoGraphs(model.manifest, model.backend_name, threads, precision=model.backend.precision,
                             fixed_buffers=fixed_buffers)
        tracker = VideoTracker(model, graphs, fill_hole_area=0)
    for k in range(objects):
        tracker.add_prompt(k + 1, box=BOXES[k], frame=frames[0])
    ref_gen = None
    with tempfile.TemporaryDirectory() as tmp:
        if reference:
            import torch
            from sam2.build_sam import build_sam2_video_predictor

            torch.set_num_threads(threads)
            config, ckpt = _reference_checkpoint(Manifest.load(model_dir), Path(tmp))
            predictor = build_sam2_video_predictor(config, ckpt_path=ckpt, device="cuda" if on_gpu else "cpu")
            sync = torch.cuda.synchronize if on_gpu else (lambda: None)
            predictor.fill_hole_area = 0
            state = _reference_state(predictor, frames, Path(tmp))
            for k in range(objects):
                predictor.add_new_points_or_box(state, 0, k + 1, box=BOXES[k])
            ref_gen = predictor.propagate_in_video(state)
            next(ref_gen)  # frame 0: the prompts' outputs
        ours, ref, to_masks = [], [], []

        def ours_step(i: int) -> None:  # a frame's whole work: its masks, then its memory (background memory: after)
            t0 = time.perf_counter()
            tracker.track(frames[i])
            to_masks.append(time.perf_counter() - t0)
            tracker.wait()

        for i in range(1, last + 1):
            steps = [("ours", lambda i=i: ours_step(i))]
            if ref_gen is not None:
                steps.append(("ref", lambda: (next(ref_gen), sync())))
            if i % 2:
                steps.reverse()
            for who, fn in steps:
                gc.collect()
                time.sleep(COOLDOWN_S)
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if i >= first:
                    (ours if who == "ours" else ref).append(dt)
    timed = list(tracker.timings)[-len(ours):] if ours else []
    masks_ms = to_masks[-len(ours):] if ours else []
    out: dict[str, Any] = {"objects": objects, "frames": [first, last], "backend": backend, "sam2rt_ms": _stats(ours),
                           "sam2rt_fps_p50": round(1e3 / _stats(ours)["p50"], 1),
                           # track() alone: when the masks are there (background memory: before the memory encoding)
                           "sam2rt_to_masks_ms": _stats(masks_ms), "background_memory": tracker.background_memory,
                           # which video graphs ran (the FP16 ones for an FP16 image backend)
                           "video_precision": tracker.graphs.precision,
                           # where a timed frame's time went (median seconds -> ms of each stage `track()` records)
                           "sam2rt_stage_ms_p50": {
                               k.removesuffix("_s"): round(1e3 * float(np.median([t[k] for t in timed])), 2)
                               for k in (timed[0] if timed else {})},
                           "video_graphs": {role: e["file"] for role, e in tracker.graphs.entries.items()},
                           # which video graphs ran from fixed buffers (CUDA graphs on a GPU: runtime/backends/fixed_shapes.py)
                           "fixed_buffers": tracker.graphs.fixed_status}
    settled = [dt for i, dt in enumerate(ours, start=first) if i >= SETTLED_FRAME]
    if out["fixed_buffers"] and settled:  # frames whose every graph could replay (the bank full, then captured)
        out["sam2rt_ms_settled"] = {**_stats(settled), "from_frame": SETTLED_FRAME}
    if ref:
        out["reference_ms"] = _stats(ref)
        out["speedup_p50"] = round(out["reference_ms"]["p50"] / out["sam2rt_ms"]["p50"], 3)
    return out


def throughput(model_dir: Path, last: int, threads: int, backend: str, repeats: int = 2, objects: int = 1) -> dict[str, Any]:
    """Frames per second of `propagate` over frames 0..last with `objects` objects, prefetch off and on (`repeats`
    runs of each, in turn, on one tracker reset between runs: its sessions and CUDA graphs stay), counted over the
    frames from SETTLED_FRAME on (or all after the first when the clip is shorter)."""
    from ..runtime import VideoTracker

    frames = pan_frames(last + 1)
    start = SETTLED_FRAME if last > SETTLED_FRAME + 1 else 1
    tracker = VideoTracker.from_dir(model_dir, backend=backend, fill_hole_area=0, threads=threads)
    background = tracker.background_memory
    # mode -> (prefetch, background memory); where background memory is the default, prefetch without it beside
    modes = {"off": (False, background), "on": (True, background)}
    if background:
        modes["on_inline_memory"] = (True, False)
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    try:
        for _ in range(repeats):
            for mode, (prefetch, background_memory) in modes.items():
                tracker.background_memory = background_memory
                tracker.reset()
                for k in range(objects):
                    tracker.add_prompt(k + 1, box=BOXES[k], frame=frames[0])
                gc.collect()
                stamps: dict[int, float] = {}
                for idx, _ in tracker.propagate(frames, prefetch=prefetch):
                    stamps[idx] = time.perf_counter()
                runs[mode].append((last - start) / (stamps[last] - stamps[start]))
    finally:
        tracker.close()
        tracker.model.close()
    def sig(x: float) -> float:  # 3 significant digits: ~100 frames/s on a GPU, ~0.2 on a CPU
        return float(f"{x:.3g}")

    fps = {mode: sig(float(np.median(v))) for mode, v in runs.items()}
    out = {"objects": objects, "frames": [start, last], "backend": backend, "background_memory": background,
           "fps_prefetch_off": fps["off"], "fps_prefetch_on": fps["on"], "runs": {k: [sig(x) for x in v] for k, v in runs.items()}}
    if "on_inline_memory" in fps:
        out["fps_prefetch_on_inline_memory"] = fps["on_inline_memory"]
    return out


def _stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"p50": round(float(np.percentile(a, 50)), 1), "p90": round(float(np.percentile(a, 90)), 1),
            "mean": round(float(a.mean()), 1), "n": int(a.size)}


_RSS_CHILD = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from sam2rt.bench.video import pan_frames, BOXES, _reference_checkpoint, _reference_state
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
which, n, model_dir, threads = {which!r}, {n}, {model_dir!r}, {threads}
frames = pan_frames(min(n, 60))  # frames repeat after 60 (the pan goes back and forth)
samples = {{}}
if which == "sam2rt":
    from sam2rt.runtime import VideoTracker
    t = VideoTracker.from_dir(model_dir, backend="onnxruntime-cpu", fill_hole_area=0, threads=threads)
    t.add_prompt(1, box=BOXES[0], frame=frames[0])
    for i in range(1, n):
        t.track(frames[i % 60] if (i // 60) % 2 == 0 else frames[59 - i % 60])
        if i + 1 in (10, 50, n):
            samples[i + 1] = rss_mib()
else:
    import tempfile, torch
    from sam2.build_sam import build_sam2_video_predictor
    from sam2rt.manifest import Manifest
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp())
    config, ckpt = _reference_checkpoint(Manifest.load(model_dir), tmp)
    p = build_sam2_video_predictor(config, ckpt_path=ckpt, device="cpu")
    p.fill_hole_area = 0
    state = _reference_state(p, frames[:n], tmp)
    p.add_new_points_or_box(state, 0, 1, box=BOXES[0])
    for idx, _, _ in p.propagate_in_video(state):
        if idx + 1 in (10, 50, n):
            samples[idx + 1] = rss_mib()
print(json.dumps(samples))
"""


def rss(model_dir: Path, which: str, n: int, threads: int) -> dict[str, float]:
    """RSS (MiB) of a fresh process tracking 1 object, at frames 10, 50 and n."""
    root = str(Path(__file__).resolve().parents[2])
    code = _RSS_CHILD.format(root=root, which=which, n=n, model_dir=str(model_dir), threads=threads)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=7200)
    if res.returncode != 0:
        raise RuntimeError(f"RSS child ({which}) failed: {res.stderr[-2000:]}")
    return {f"frame_{k}": round(v, 1) for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


# Issue 12's CPU targets (hiera_tiny, FP32, side by side): reference p50 / sam2rt p50 per frame, by objects;
# tracker RSS growth from frame 50 to the last frame.
TARGETS_CPU = {"speedup_1_object": 1.2, "speedup_3_objects": 1.1, "rss_growth_50_to_end": 0.05}
TARGET_GPU_FPS = 100  # and on a GPU: one object, fp16 (issue 12)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for lat in result["latency"]:
        key = "speedup_1_object" if lat["objects"] == 1 else f"speedup_{lat['objects']}_objects"
        if key in TARGETS_CPU and "speedup_p50" in lat:
            rows.append({"target": f"per-frame tracking, {lat['objects']} object(s), vs reference", "threshold":
                         f">= {TARGETS_CPU[key]}x", "measured": f"{lat['speedup_p50']}x "
                         f"({lat['sam2rt_ms']['p50']} vs {lat['reference_ms']['p50']} ms)",
                         "met": lat["speedup_p50"] >= TARGETS_CPU[key]})
        if lat["objects"] == 1 and lat.get("backend", "").split(":")[0] in GPU_BACKENDS:
            steady = lat.get("sam2rt_ms_settled", lat["sam2rt_ms"])
            fps = round(1e3 / steady["p50"], 1)
            rows.append({"target": f"GPU per-frame tracking, 1 object, {lat['backend']}", "threshold": f">= {TARGET_GPU_FPS} frames/s",
                         "measured": f"{fps} frames/s (p50 {steady['p50']} ms, frames {steady.get('from_frame', lat['frames'][0])}-"
                                     f"{lat['frames'][1]})", "met": fps >= TARGET_GPU_FPS})
    if "throughput" in result:
        tp = result["throughput"]
        rows.append({"target": f"GPU tracking a video file (propagate, prefetch), 1 object, {tp['backend']}",
                     "threshold": f">= {TARGET_GPU_FPS} frames/s",
                     "measured": f"{tp['fps_prefetch_on']} frames/s (without prefetch {tp['fps_prefetch_off']}; frames "
                                 f"{tp['frames'][0]}-{tp['frames'][1]})", "met": tp["fps_prefetch_on"] >= TARGET_GPU_FPS})
    if "rss_growth_50_to_end" in result:
        g = result["rss_growth_50_to_end"]
        rows.append({"target": "tracker RSS growth, frame 50 to the end", "threshold": "<= 5%",
                     "measured": f"{100 * g:+.1f}%", "met": g <= TARGETS_CPU["rss_growth_50_to_end"]})
    return rows


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# Video tracking: {result['model']} ({'RANDOM weights' if result['random_weights'] else 'trained'}), "
             f"{result['backend']}, {m['cpu']['model']}, {result['threads']} threads", "",
             f"{result['created']}; frames {result['frame_hw'][1]}x{result['frame_hw'][0]}; load average at start "
             f"{m['load_average_at_start']}; {result['what']}", "",
             "| objects | frames | sam2rt p50 / p90 (ms) | sam2rt frames/s (p50) | reference p50 / p90 (ms) | speedup p50 |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for lat in result["latency"]:
        ref = lat.get("reference_ms")
        lines.append(f"| {lat['objects']} | {lat['frames'][0]}-{lat['frames'][1]} | {lat['sam2rt_ms']['p50']} / "
                     f"{lat['sam2rt_ms']['p90']} | {lat['sam2rt_fps_p50']} | " + (f"{ref['p50']} / {ref['p90']} | {lat['speedup_p50']}x |"
                                                        if ref else "- | - |"))
    for lat in result["latency"]:
        if lat.get("background_memory") and "sam2rt_to_masks_ms" in lat:
            tm = lat["sam2rt_to_masks_ms"]
            lines += ["", f"{lat['objects']} object(s), background memory: the masks after p50 {tm['p50']} ms (p90 "
                      f"{tm['p90']}); the frame's memory encoding then goes on beside the next frame's work (the "
                      "per-frame times above include it)"]
    for lat in result["latency"]:
        if "sam2rt_ms_settled" in lat:
            st = lat["sam2rt_ms_settled"]
            lines += ["", f"{lat['objects']} object(s), frames {st['from_frame']}-{lat['frames'][1]} (every video graph from "
                      f"fixed buffers): sam2rt p50 {st['p50']} ms, {round(1e3 / st['p50'], 1)} frames/s; "
                      f"fixed buffers: {lat['fixed_buffers']}"]
    if "latency_without_cuda_graphs" in result:
        off = result["latency_without_cuda_graphs"]["sam2rt_ms"]
        lines += ["", f"1 object, frames {result['latency_without_cuda_graphs']['frames'][0]}-"
                  f"{result['latency_without_cuda_graphs']['frames'][1]}, the video graphs without CUDA graphs: sam2rt p50 "
                  f"{off['p50']} ms ({round(1e3 / off['p50'], 1)} frames/s)"]
    if "throughput" in result:
        tp = result["throughput"]
        lines += ["", f"A video file through `propagate`, {tp['objects']} object(s), frames {tp['frames'][0]}-{tp['frames'][1]}: "
                  f"{tp['fps_prefetch_on']} frames/s with prefetch, {tp['fps_prefetch_off']} without"
                  + (f", {tp['fps_prefetch_on_inline_memory']} with prefetch and the memory encoded inline (background "
                     "memory off)" if "fps_prefetch_on_inline_memory" in tp else "") + f" (runs: {tp['runs']})"]
    for who in ("sam2rt", "reference"):
        if f"rss_{who}_mib" in result:
            lines += ["", f"RSS of {who} (MiB): " + ", ".join(f"{k.replace('_', ' ')}: {v}"
                                                           for k, v in result[f"rss_{who}_mib"].items())]
    if result.get("targets"):
        lines += ["", "| target | threshold | measured | met |", "| --- | --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['threshold']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |"
                  for t in result["targets"]]
    return "\n".join(lines) + "\n"


def run_video_benchmark(model_dir: Path, out: Path, threads: int, first: int = 8, last: int = 40,
                        objects: tuple[int, ...] = (1, 3), rss_frames: int = 300, ref_rss_frames: int = 60,
                        reference: bool = True, label: str | None = None,
                        backend: str = "onnxruntime-cpu") -> dict[str, Any]:
    """Run the latency cases and the RSS children; write DATE_MACHINE_MODEL_video.{json,md} to `out`."""
    import datetime as _dt

    from ..manifest import Manifest
    from .machine import machine_info, versions
    from .harness import slug

    manifest = Manifest.load(model_dir)
    result: dict[str, Any] = {
        "what": __doc__.strip().splitlines()[0], "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(label), "versions": versions(), "threads": threads, "frame_hw": list(FRAME_HW),
        "model": manifest.model.get("model_id") or manifest.model_name, "random_weights": manifest.random_weights,
        "weights": manifest.model["weights"], "backend": backend, "latency": [],
    }
    for k in objects:
        print(f"video bench: {k} object(s), frames 1..{last} (timed {first}..{last})", file=sys.stderr, flush=True)
        result["latency"].append(latency(model_dir, k, first, last, threads, reference, backend))
    if backend.split(":")[0] in GPU_BACKENDS and 1 in objects:  # the video graphs' CUDA graphs, off: what they bring
        print(f"video bench: 1 object without the video graphs' CUDA graphs (timed {first}..{last})", file=sys.stderr, flush=True)
        result["latency_without_cuda_graphs"] = latency(model_dir, 1, first, last, threads, False, backend, fixed_buffers=False)
        print(f"video bench: 1 object through propagate, prefetch off and on (frames 0..{last})", file=sys.stderr, flush=True)
        result["throughput"] = throughput(model_dir, last, threads, backend)
    if rss_frames and backend.split(":")[0] in GPU_BACKENDS:
        result["notes"] = ["RSS is measured on the CPU backend only (host memory of a GPU run says little)"]
    elif rss_frames:
        print(f"video bench: tracker RSS over {rss_frames} frames", file=sys.stderr, flush=True)
        ours = rss(model_dir, "sam2rt", rss_frames, threads)
        result["rss_sam2rt_mib"] = ours
        if "frame_50" in ours:
            result["rss_growth_50_to_end"] = round(ours[f"frame_{rss_frames}"] / ours["frame_50"] - 1, 4)
        if reference and ref_rss_frames:
            print(f"video bench: reference RSS over {ref_rss_frames} frames", file=sys.stderr, flush=True)
            result["rss_reference_mib"] = rss(model_dir, "reference", ref_rss_frames, threads)
    result["targets"] = targets(result)
    cpu = result["machine"]["cpu"]
    machine = label or f"{slug(cpu['model'])}-{cpu['usable_cpus']}cpu"
    stem = f"{result['created'][:10]}_{slug(machine)}_{slug(result['model'])}_video"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    return result
