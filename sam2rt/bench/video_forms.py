"""Which precision runs each video graph fastest: trackers in several precision configurations, side by side.

    python -m sam2rt.bench.video_forms MODEL_DIR --out DIR [--backend onnxruntime-cuda:fp16] [--frames 40]

Why: on the H100 of GPU run 5 a tracked frame's memory attention, tracking decoder and memory encoder took 18.7 ms in
FP16 (benchmarks/README.md), and ONNX Runtime's profile (launches blocking, so only a hint) had the FP16 tracking
decoder and memory encoder *slower* than their FP32 forms: their casts and FP16 convolutions. Which precision is
fastest can differ per graph; `VideoGraphs(role_precision=...)` runs each role in its own.

How: one image model (the backend's) and one VideoTracker per configuration (CONFIGS: a precision for the video
graphs and per-role exceptions), each prompted with the same box on frame 0 of a 640x480 pan
(`sam2rt.bench.video.pan_frames`). The trackers take turns frame by frame, the order rotating. From frame `settled`
on (by then the full memory bank's shapes replay as CUDA graphs on a GPU) each tracked frame's stages are read from
`tracker.timings` (memory choice and gather, memory attention, tracking decoder, memory encoder with the bank's
write: each graph's run ends when its outputs are ready, so these are its wall times). Each configuration's low-res
logits are compared with the first configuration's on every timed frame. `video_forms.json` and `video_forms.md` go
to OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.backends.fixed_shapes import REPLAY_PARTS, FixedShapeSession
from ..runtime.video.tracker import MEMORY_PARTS, TRACK_STAGES

# name -> (video graphs' precision, {role: precision} exceptions[, other VideoGraphs options]); the first is the
# reference of the comparison. "full decoder on tracked frames": track_decoder.onnx where the export's tracking form
# (export/tracking_decoder.py) would run, as before it: what the tracking form gains.
Config = tuple  # (str, dict[str, str]) or (str, dict[str, str], dict[str, Any])
CONFIGS_GPU: dict[str, Config] = {
    "tf32": ("tf32", {}),
    "fp16": ("fp16", {}),
    "fp16, full decoder on tracked frames": ("fp16", {}, {"tracking_decoder": False}),
    "fp16, tf32 decoder": ("fp16", {"track_decoder": "tf32"}),
    "fp16, tf32 memory encoder": ("fp16", {"memory_encoder": "tf32"}),
    "fp16, tf32 decoder and memory encoder": ("fp16", {"track_decoder": "tf32", "memory_encoder": "tf32"}),
    # the memory encoder's plain run beside its CUDA graph (run 6: the memory stage took ~11 ms in every precision)
    "fp16, memory encoder uncaptured": ("fp16", {}, {"plain_slots": ("memory_encoder",)}),
    # the memory attention (4.7 ms of a 10.7 ms frame in run 8) with other attention kernels than ONNX Runtime's own
    # choice (flash attention where q, k and v share a head size, as in its device form): never measured so far
    "fp16, memory attention on cuDNN flash": ("fp16", {}, {"role_attention": {"memory_attention": "cudnn"}}),
    "fp16, memory attention memory-efficient": ("fp16", {}, {"role_attention": {"memory_attention": "efficient"}}),
}
CONFIGS_CPU: dict[str, Config] = {  # the same flow on the CPU provider (CI)
    "fp32": ("fp32", {}),
    "fp32, full decoder on tracked frames": ("fp32", {}, {"tracking_decoder": False}),
    "fp16": ("fp16", {}),
    "fp16, fp32 decoder and memory encoder": ("fp16", {"track_decoder": "fp32", "memory_encoder": "fp32"}),
}
STAGES = (*TRACK_STAGES, *MEMORY_PARTS, "track_s")


def _replay_seconds(graphs: Any) -> dict[str, tuple[dict[str, float], int]]:
    """Per video graph run through fixed buffers: (its summed seconds per part of a replay, its replays) so far."""
    return {slot: (dict(s.seconds), s.replays) for slot, s in graphs.sessions.items() if isinstance(s, FixedShapeSession)}


def replay_ms(before: dict[str, tuple[dict[str, float], int]], after: dict[str, tuple[dict[str, float], int]]
              ) -> dict[str, dict[str, float]]:
    """Mean ms per replay of each part (inputs in, the replay, outputs out) between two `_replay_seconds` readings,
    per graph that replayed in between."""
    out = {}
    for slot, (seconds, replays) in after.items():
        seconds0, replays0 = before.get(slot, (dict.fromkeys(REPLAY_PARTS, 0.0), 0))
        n = replays - replays0
        if n > 0:
            out[slot] = {part: round(1e3 * (seconds[part] - seconds0[part]) / n, 3) for part in REPLAY_PARTS}
            out[slot]["replays"] = n
    return out

def _log(msg: str) -> None:
    print(f"[video_forms {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(model_dir: Path, backend: str, frames: int, settled: int, threads: int | None = None,
        configs: dict[str, Config] | None = None) -> dict[str, Any]:
    """Track `frames` frames with every configuration (default: CONFIGS_GPU on a GPU backend, else CONFIGS_CPU),
    taking turns; per configuration the p50 of each stage (ms) over the frames from `settled` on, and its logits'
    distance to the first configuration's."""
    from ..runtime import Sam2Model, VideoTracker
    from ..runtime.video.graphs import VideoGraphs
    from .video import BOXES, pan_frames

    model = Sam2Model.from_dir(model_dir, backend=backend, threads=threads)
    if configs is None:
        configs = CONFIGS_GPU if model.backend.device != "cpu" else CONFIGS_CPU
    clip = pan_frames(frames + 1)
    trackers: dict[str, Any] = {}
    for name, (precision, roles, *options) in configs.items():
        graphs = VideoGraphs(model.manifest, model.backend_name, threads, precision=precision, role_precision=roles,
                             **(options[0] if options else {}))
        # memory encoded inline: each stage timed alone, not beside the next frame's work
        trackers[name] = tracker = VideoTracker(model, graphs, fill_hole_area=0, background_memory=False)
        tracker.add_prompt(1, box=BOXES[0], frame=clip[0])
    names = list(trackers)
    diffs: dict[str, list[float]] = {n: [] for n in names}
    replays_before: dict[str, Any] = {}
    for i in range(1, frames + 1):
        if i == settled:
            replays_before = {name: _replay_seconds(trackers[name].graphs) for name in names}
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            trackers[name].track(clip[i])
        if i >= settled:
            ref = trackers[names[0]].low_res_logits[1]
            for name in names:
                diffs[name].append(float(np.mean(np.abs(trackers[name].low_res_logits[1] - ref))))
        if i % 10 == 0 or i == frames:
            _log(f"frame {i}/{frames}")
    results = []
    for name in names:
        tracker = trackers[name]
        timed = [t for t in list(tracker.timings)[-(frames - settled + 1):] if "track_s" in t]
        results.append({
            "config": name,
            "precision": tracker.graphs.precision,
            "role_precision": dict(configs[name][1]),  # the exceptions to `precision`
            "options": dict(configs[name][2]) if len(configs[name]) > 2 else {},
            "tracking_decoder": tracker.graphs.tracking_decoder,
            "files": {role: e["file"] for role, e in tracker.graphs.entries.items()},
            "frames_timed": len(timed),
            "p50_ms": {k.removesuffix("_s"): round(1e3 * float(np.median([t[k] for t in timed])), 3) for k in STAGES},
            "mean_abs_logit_diff_vs_first": {"mean": float(np.mean(diffs[name])), "max": float(np.max(diffs[name]))},
            "fixed_buffers": tracker.graphs.fixed_status,
            # per graph replayed from fixed buffers over the timed frames: ms per replay of each part
            "replay_ms": replay_ms(replays_before.get(name, {}), _replay_seconds(tracker.graphs)),
        })
    model.close()
    return {"backend": model.backend_name, "frames": [settled, frames], "configs": results,
            "reference_config": names[0]}


def markdown(label: str, doc: dict[str, Any]) -> str:
    first = doc["reference_config"]
    lines = [f"# Video graphs per precision: {label}", "",
             f"`{doc['backend']}` image backend; one object; p50 ms of each tracked frame's stages over frames "
             f"{doc['frames'][0]}-{doc['frames'][1]}, the configurations taking turns; logits against `{first}`.", "",
             "| configuration | gather | memory attention | tracking decoder | memory encoder | of which hole filling "
             "| of which bank store | track (all) | mean abs logit diff (max over frames) | CUDA graphs |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in doc["configs"]:
        p = r["p50_ms"]
        captured = sum(v == "captured" for s in r["fixed_buffers"].values() for v in s.values())
        fixed = sum(len(s) for s in r["fixed_buffers"].values())
        lines.append(f"| {r['config']} | {p['gather']:.3f} | {p['attention']:.3f} | {p['decoder']:.3f} | {p['memory']:.3f} "
                     f"| {p['memory_fill']:.3f} | {p['memory_store']:.3f} | {p['track']:.3f} "
                     f"| {r['mean_abs_logit_diff_vs_first']['max']:.2e} | {captured} of {fixed} |")
    replayed = [(r["config"], slot, ms) for r in doc["configs"] for slot, ms in r.get("replay_ms", {}).items()]
    if replayed:
        lines += ["", "Graphs replayed from fixed buffers, mean ms per replay over the timed frames: inputs copied into "
                      "their buffers, the replay until its outputs are ready, outputs copied out (device) or down (host).",
                  "", "| configuration | graph | inputs in | replay | outputs out | replays |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {config} | {slot} | {ms['load']:.3f} | {ms['replay']:.3f} | {ms['out']:.3f} | {ms['replays']} |"
                  for config, slot, ms in replayed]
    best = min(doc["configs"], key=lambda r: r["p50_ms"]["track"])
    lines += ["", f"Fastest: `{best['config']}` ({best['p50_ms']['track']:.3f} ms per tracked frame); "
                  f"`VideoGraphs(..., precision={best['precision']!r}, role_precision={best['role_precision']}"
                  + "".join(f", {k}={v!r}" for k, v in best.get("options", {}).items()) + ")` runs it."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sam2rt.bench.video_forms", description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backend", default="onnxruntime-cuda:fp16", help="the image backend (default onnxruntime-cuda:fp16)")
    ap.add_argument("--frames", type=int, default=40, help="frames tracked (default 40)")
    ap.add_argument("--settled", type=int, default=21, help="the first timed frame (default 21: CUDA graphs replay)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)
    if not 1 <= args.settled <= args.frames:
        ap.error(f"--settled {args.settled} must be between 1 and --frames {args.frames}")
    doc = run(args.model_dir, args.backend, args.frames, args.settled, args.threads)
    doc["label"] = args.label
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "video_forms.json").write_text(json.dumps(doc, indent=1))
    text = markdown(args.label or doc["backend"], doc)
    (args.out / "video_forms.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
