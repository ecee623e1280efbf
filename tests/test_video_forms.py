"""Per-role precision of the video graphs, the tracker's per-stage timings, and `sam2rt.bench.video_forms`, which
times trackers in several precision configurations side by side (on a GPU: which precision runs each graph fastest;
here the same flow on the CPU provider)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_role_precision_runs_the_named_roles_in_their_own_precision(model_dir: Path):
    """FP16 video graphs except the tracking decoder and the memory encoder, which load their FP32 graphs; a role or
    precision that does not exist is refused, naming the choices."""
    from sam2rt.errors import InputError
    from sam2rt.manifest import Manifest
    from sam2rt.runtime.video.graphs import VideoGraphs

    m = Manifest.load(model_dir)
    graphs = VideoGraphs(m, "onnxruntime-cpu", precision="fp16",
                         role_precision={"track_decoder": "fp32", "memory_encoder": "fp32"})
    assert {role: e["file"] for role, e in graphs.entries.items()} == {
        "memory_encoder": "memory_encoder.onnx", "memory_attention": "memory_attention.fp16.onnx",
        "track_decoder": "track_decoder.onnx", "mask_downsample": "mask_downsample.onnx",
        "tracking_decoder": "track_decoder.tracking.onnx"}  # the tracked frames' decoder in the tracking decoder's
    assert graphs.role_precision["memory_attention"] == "fp16" and graphs.compact_memory
    with pytest.raises(InputError, match="roles are memory_encoder, memory_attention"):
        VideoGraphs(m, "onnxruntime-cpu", role_precision={"decoder": "fp32"})
    with pytest.raises(InputError, match="precisions fp32, tf32, fp16"):
        VideoGraphs(m, "onnxruntime-cpu", role_precision={"track_decoder": "int8"})


def test_tracked_frames_record_where_their_time_goes(tiny_video_dir: Path):
    """Each tracked frame's timing holds the memory gather, memory attention, tracking decoder and memory encoder,
    summed over its objects, which together take no more than the frame's tracking."""
    from sam2rt.runtime import VideoTracker
    from test_video import BOX_PROMPT, pan_clip, point_prompt

    tracker = VideoTracker.from_dir(tiny_video_dir, backend="onnxruntime-cpu", fill_hole_area=0)
    frames, corners = pan_clip(4)
    tracker.add_prompt(1, frame=frames[0], **point_prompt(corners[0]))
    tracker.add_prompt(2, **BOX_PROMPT)
    for frame in frames[1:]:
        tracker.track(frame)
    for t in list(tracker.timings)[-3:]:
        stages = [t["gather_s"], t["attention_s"], t["decoder_s"], t["memory_s"]]
        assert all(s > 0 for s in stages), t
        assert sum(stages) <= t["track_s"] + 1e-6, t
        # the parts after the memory encoder's graph: hole filling (off here, a call that returns) and the bank store
        assert 0 <= t["memory_fill_s"] < t["memory_store_s"] and t["memory_fill_s"] + t["memory_store_s"] < t["memory_s"], t


def test_video_forms_times_each_configuration_side_by_side(tiny_video_dir: Path):
    """Three configurations (on the CPU provider the same graphs, so equal logits; the second runs the graphs of every
    tracked frame from fixed buffers but the memory encoder; the third runs the full decoder on tracked frames instead
    of its tracking form: the same function), 6 frames, timed from frame 3: each has a p50 per stage over 4 frames and
    its files, and the second the ms per replay of its fixed-buffer graphs; the report names the fastest and how to
    run it."""
    from sam2rt.bench import video_forms
    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER

    configs = {"fp32": ("fp32", {}),
               "fp32, tf32 decoder, fixed buffers": ("fp32", {"track_decoder": "tf32"},
                                                     {"fixed_buffers": True, "plain_slots": ("memory_encoder",)}),
               "fp32, full decoder": ("fp32", {}, {"tracking_decoder": False})}
    doc = video_forms.run(tiny_video_dir, "onnxruntime-cpu", frames=6, settled=3, configs=configs)
    assert [r["config"] for r in doc["configs"]] == list(configs) and doc["reference_config"] == "fp32"
    for r in doc["configs"]:
        assert r["frames_timed"] == 4
        assert set(r["p50_ms"]) == {"gather", "attention", "decoder", "memory", "memory_fill", "memory_store", "track"}
        assert all(v > 0 for v in r["p50_ms"].values()), r
        assert r["files"]["track_decoder"] == "track_decoder.onnx"
    first, fixed, full = doc["configs"]
    for r in (first, fixed):  # the same graphs on the same provider; tracked frames through the tracking form
        assert r["tracking_decoder"] and r["files"]["tracking_decoder"] == "track_decoder.tracking.onnx"
    assert first["mean_abs_logit_diff_vs_first"]["max"] == 0.0 and first["replay_ms"] == {}
    assert fixed["mean_abs_logit_diff_vs_first"]["max"] < 1e-5  # sessions with fixed dimensions fuse differently
    # fixed once a shape ran on CAPTURE_AFTER frames (frame 4 here), replayed on frames 5 and 6; the memory encoder
    # stays on its plain session, as asked
    assert set(fixed["replay_ms"]) == {"memory_attention", "tracking_decoder"}, fixed["replay_ms"]
    for ms in fixed["replay_ms"].values():
        assert ms["replays"] == 6 - CAPTURE_AFTER and all(ms[part] > 0 for part in ("load", "replay", "out")), ms
    assert "memory_encoder" not in fixed["fixed_buffers"]
    assert not full["tracking_decoder"] and "tracking_decoder" not in full["files"]
    assert full["mean_abs_logit_diff_vs_first"]["max"] < 1e-5 and full["options"] == {"tracking_decoder": False}
    assert fixed["role_precision"] == {"track_decoder": "tf32"}
    text = video_forms.markdown("test", doc)
    assert text.count("\n| fp32") == 3 + 2 and "Fastest: `" in text and "role_precision=" in text
    assert "| fp32, tf32 decoder, fixed buffers | memory_attention |" in text


def test_plain_slots_names_only_graphs_run_through_fixed_buffers(tiny_video_dir: Path):
    from sam2rt.errors import InputError
    from sam2rt.manifest import Manifest
    from sam2rt.runtime.video.graphs import VideoGraphs

    with pytest.raises(InputError, match="plain_slots: \\['mask_downsample'\\] are not graphs run through fixed "
                                         "buffers; those are memory_attention, tracking_decoder, memory_encoder"):
        VideoGraphs(Manifest.load(tiny_video_dir), "onnxruntime-cpu", fixed_buffers=True, plain_slots=("mask_downsample",))


def test_video_forms_refuses_a_first_timed_frame_past_the_last(tiny_video_dir: Path, tmp_path: Path, capsys):
    from sam2rt.bench import video_forms

    with pytest.raises(SystemExit) as exc:
        video_forms.main([str(tiny_video_dir), "--out", str(tmp_path), "--frames", "5", "--settled", "9"])
    assert exc.value.code == 2 and "--settled 9 must be between 1 and --frames 5" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_role_attention_asks_the_cuda_provider_for_one_kernel_in_the_named_roles(tiny_video_dir: Path, monkeypatch):
    """The memory attention's sessions (its plain one and the fixed-dimension ones made once its shapes settle) ask
    for cuDNN's kernel; every other graph for the default. On the CPU provider the CUDA options are made and not used,
    so what is checked is which options each session would take. An unknown role or kernel is refused."""
    import numpy as np

    from sam2rt.errors import InputError
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Sam2Model, VideoTracker
    from sam2rt.runtime.backends import onnxruntime_backend
    from sam2rt.runtime.video.graphs import VideoGraphs
    from test_video import BOX_PROMPT, pan_clip

    asked: list[tuple[str | None, dict[str, str]]] = []
    real = onnxruntime_backend.cuda_provider_options

    def spy(*args, **kwargs):
        options = real(*args, **kwargs)
        asked.append((kwargs.get("attention"), options))
        return options

    monkeypatch.setattr(onnxruntime_backend, "cuda_provider_options", spy)
    m = Manifest.load(tiny_video_dir)
    graphs = VideoGraphs(m, "onnxruntime-cpu", fixed_buffers=True, role_attention={"memory_attention": "cudnn"})
    plain = len(asked)
    # + the bank's write and gather (the copy graphs are made on first use)
    assert [a for a, _ in asked].count("cudnn") == 1 and plain == len(graphs.entries) + 2
    tracker = VideoTracker(Sam2Model.from_dir(tiny_video_dir, backend="onnxruntime-cpu"), graphs, fill_hole_area=0)
    frames, _ = pan_clip(6)
    tracker.add_prompt(1, frame=frames[0], **BOX_PROMPT)
    for frame in frames[1:]:
        tracker.track(frame)
    fixed = asked[plain:]  # the fixed-dimension sessions made as shapes settled: the memory attention's ask for cuDNN
    assert fixed and any(a == "cudnn" for a, _ in fixed)
    for attention, options in asked:
        assert (options.get("sdpa_kernel") == "8") == (attention == "cudnn"), (attention, options)
    assert np.isfinite(tracker.low_res_logits[1]).all()
    with pytest.raises(InputError, match="attention kernels default, flash, efficient, cudnn, math"):
        VideoGraphs(m, "onnxruntime-cpu", role_attention={"memory_attention": "fastest"})
    with pytest.raises(InputError, match="roles are memory_encoder"):
        VideoGraphs(m, "onnxruntime-cpu", role_attention={"encoder": "cudnn"})
