"""The benchmark harness: in quick mode on the real export against the reference (slow), and every case
on the tiny model without the reference (quick); its outputs have the right structure.

No timing thresholds here (those live in the benchmark report); only structure and sanity.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

@pytest.fixture(scope="module")
def bench_model_dir(model_dir, tmp_path_factory):
    """A copy of the session model with the opt-in INT8 encoder added, so the INT8 section runs too."""
    from sam2rt.export.onnx_export import copy_model_dir
    from sam2rt.export.optimize import add_variants

    d = copy_model_dir(model_dir, tmp_path_factory.mktemp("bench") / "model")
    add_variants(d, optimized=False, int8=True)
    return d


@pytest.fixture(scope="module")
def bench_run(bench_model_dir, tmp_path_factory):
    from sam2rt.cli import main

    out = tmp_path_factory.mktemp("bench_out")
    rc = main(["bench", "--model-dir", str(bench_model_dir), "--quick", "--out", str(out), "--no-progress",
               "--label", "test-machine"])
    assert rc == 0
    files = sorted(out.iterdir())
    js = [f for f in files if f.suffix == ".json"]
    assert len(js) == 1, files
    return json.loads(js[0].read_text()), out, files


def _check_stats(s: dict) -> None:
    assert s["n"] >= 1
    for k in ("p50", "p90", "p99", "mean", "min", "max"):
        assert math.isfinite(s[k]) and s[k] > 0, (k, s)
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"] + 1e-9
    assert len(s["samples_ms"]) == s["n"]


@pytest.mark.slow
def test_bench_json_structure(bench_run):
    result, _, _ = bench_run
    assert result["schema"] == "sam2rt-bench/1"
    assert isinstance(result["model"]["random_weights"], bool) and result["model"]["weights"]
    m = result["machine"]
    assert m["label"] == "test-machine"
    assert m["cpu"]["model"] and m["cpu"]["usable_cpus"] >= 1
    assert m["peak"]["peak_gflops"] > 0
    assert {"onnxruntime", "numpy", "torch"} <= set(result["versions"])
    assert result["threads"]["sam2rt_intra_op"] == result["threads"]["torch"]
    cases = result["cases"]
    expected = {"embed", "preprocess", "predict_point_cached", "decode_box", "decode_box_points", "batch4", "batch16",
                "batch4_vs_singles", "batch16_vs_singles", "predict_point_cached_1080p", "e2e_640x480", "e2e_1920x1080",
                "decoder_only_point", "postprocess_640x480"}
    assert expected <= set(cases), sorted(set(expected) - set(cases))
    for c in cases.values():
        _check_stats(c["sam2rt"])
        if "reference" in c:
            _check_stats(c["reference"])
            assert c["speedup_p50"] == pytest.approx(c["reference"]["p50"] / c["sam2rt"]["p50"], rel=1e-2)
    for name in expected - {"decoder_only_point", "postprocess_640x480"}:
        assert "reference" in cases[name], name
    # per-prompt figures for batches are per prompt
    assert cases["batch16"]["per"].startswith("per prompt (16")


@pytest.mark.slow
def test_bench_parity_cold_start_memory_sizes(bench_run):
    result, _, _ = bench_run
    for case, p in result["parity_spot_check"].items():  # the timed calls agree with the reference
        assert p["low_res_logits_max_abs_diff"] <= 1e-3, case
        assert p["scores_max_abs_diff"] <= 1e-4, case
    cs = result["cold_start"]
    for who in ("sam2rt", "reference"):
        assert cs[who]["process_wall_s"]["p50"] > 0
        assert 50 < cs[who]["peak_rss_mib"]["p50"] < 64 * 1024
    assert cs["sam2rt"]["torch_imported"] is False and cs["reference"]["torch_imported"] is True
    assert result["peak_rss"]["fraction_of_reference"] > 0
    sizes = result["sizes"]
    assert sizes["files_mib"]["encoder.onnx"] > 1 and sizes["reference_parameters"] > 1e6
    targets = result["targets"]
    assert set(targets) == {"predict_point_cached", "embed", "batch16_vs_singles", "peak_rss"}
    for t in targets.values():
        assert t["met"] in (True, False)


@pytest.mark.slow
def test_bench_flops_and_int8(bench_run):
    result, _, _ = bench_run
    fl = result["flops"]
    # hiera_tiny at 1024x1024: ~290 GFLOP in the encoder's matmuls/convs; the decoder a few GFLOP per prompt
    assert 100 < fl["encoder"]["gflops"] < 1000
    assert 0.5 < fl["decoder"]["gflops"] < 20
    for role in ("encoder", "decoder"):
        assert fl[role]["unmatched_nodes"] == 0
        assert 0 < fl[role]["fraction_of_peak"] < 5
    q = result["int8"]
    assert q["agreement"]["masks_compared"] > 0
    assert 0 <= q["agreement"]["mask_iou_vs_fp32_min"] <= q["agreement"]["mask_iou_vs_fp32_mean"] <= 1
    assert q["speedup_vs_fp32_p50"] > 0


@pytest.mark.slow
def test_bench_markdown_and_plots(bench_run):
    result, out, files = bench_run
    names = {f.name for f in files}
    stem = result["files"]["json"][: -len(".json")]
    assert "test-machine" in stem and stem.startswith(result["created"][:10])
    for suffix in (".md", "_latency.png", "_batch.png"):
        assert stem + suffix in names
    md = (out / (stem + ".md")).read_text()
    assert "| case | sam2rt p50" in md and "predict_point_cached" in md and "Targets" in md
    for png in ("_latency.png", "_batch.png"):
        assert (out / (stem + png)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_and_flop_counter_units():
    from sam2rt.bench.flops import node_flops
    from sam2rt.bench.harness import stats_ms

    s = stats_ms([0.001, 0.002, 0.003, 0.004], per=2)
    assert s["p50"] == pytest.approx(1.25) and s["min"] == pytest.approx(0.5) and s["n"] == 4
    assert node_flops("MatMul", [[1, 4096, 256], [256, 128]], [[1, 4096, 128]], {}) == 2 * 4096 * 256 * 128
    assert node_flops("FusedMatMul", [[1, 256, 4096], [256, 128]], [[1, 4096, 128]], {"transA": 1}) == 2 * 4096 * 256 * 128
    # fused attention: scores (Sq x Sk per head, summed over heads: D) and the weighted sum of v
    assert node_flops("MultiHeadAttention", [[25, 196, 384], [25, 196, 384], [25, 196, 384]], [[25, 196, 384]], {}) == (
        4 * 25 * 196 * 196 * 384)
    assert node_flops("Conv", [[1, 3, 8, 8], [16, 3, 3, 3]], [[1, 16, 8, 8]], {}) == 2 * 16 * 64 * 27
    assert node_flops("ConvTranspose", [[1, 8, 4, 4], [8, 4, 2, 2]], [[1, 4, 8, 8]], {}) == 2 * 8 * 16 * 16
    assert node_flops("Add", [[1, 2]], [[1, 2]], {}) == 0
    assert np.isfinite(s["p99"])


# --- the case list, on the tiny model (no reference, no torch) ---------------------------------------
REFERENCE_ONLY_CASES = {"batch4_vs_singles", "batch16_vs_singles"}


def test_every_case_runs_on_the_tiny_model(tiny_model_dir):
    from sam2rt.bench.harness import CASES, BenchConfig, run_benchmark

    assert len({c.name for c in CASES}) == len(CASES)
    result = run_benchmark(BenchConfig(tiny_model_dir, runs=1, warmup=0, quick=True, reference=False, progress=False,
                                       label="tiny"))
    cases = result["cases"]
    expected = {"embed", "preprocess", "predict_point_cached", "decode_box", "decode_box_points", "batch4", "batch16",
                "predict_point_cached_1080p", "e2e_640x480", "e2e_1920x1080", "decoder_only_point", "postprocess_640x480"}
    assert set(cases) == expected, sorted(set(cases) ^ expected)
    for c in cases.values():
        _check_stats(c["sam2rt"])
        assert "reference" not in c and "speedup_p50" not in c
    assert cases["batch4"]["sam2rt"]["n"] == 1 and cases["e2e_640x480"]["sam2rt"]["n"] == 1
    assert result["parity_spot_check"] == {}
    assert "int8" not in result  # the tiny export has no INT8 encoder: the case does not apply
    assert result["cold_start"]["sam2rt"]["torch_imported"] is False
    assert set(result["peak_rss"]) == {"sam2rt_mib"} and result["peak_rss"]["sam2rt_mib"] > 0
    assert result["sizes"]["files_mib"]["encoder.onnx"] >= 0 and "reference_parameters" not in result["sizes"]
    assert result["flops"]["encoder"]["timed_case"] == "embed"
    assert all(t["met"] is None for t in result["targets"].values())
    assert json.loads(json.dumps(result))["cases"] == cases  # plain JSON (write_outputs and plots: the slow tests)


def test_run_benchmark_runs_the_cases_it_is_given_in_order(tiny_model_dir, monkeypatch):
    from sam2rt.bench import harness
    from sam2rt.bench.harness import CASES, BenchCase, BenchConfig, run_benchmark

    bars = []

    class RecordingProgress(harness.Progress):
        def __init__(self, total, enabled):
            super().__init__(total, False)
            self.total, self.texts = total, []
            bars.append(self)

        def describe(self, text):
            self.texts.append(text)

    monkeypatch.setattr(harness, "Progress", RecordingProgress)

    ran = []

    def note(name):
        def run(ctx):
            ran.append(name)
            ctx.describe(f"case {name}")
            ctx.result.setdefault("seen", []).append(name)
        return run

    def never(ctx):
        raise AssertionError("a case that does not apply ran")

    load = next(c for c in CASES if c.name == "load")
    cases = (BenchCase("first", note("first"), steps=lambda ctx: 3), load,
             BenchCase("skipped", never, applies=lambda ctx: False), BenchCase("last", note("last")))
    result = run_benchmark(BenchConfig(tiny_model_dir, quick=True, reference=False), cases)
    assert ran == ["first", "last"] and result["seen"] == ["first", "last"]
    assert result["cases"] == {} and result["load_in_process_s"]["sam2rt"] > 0
    assert set(result["targets"]) == {"predict_point_cached", "embed", "batch16_vs_singles", "peak_rss"}
    bar = bars[-1]  # the progress of the run: 3 + 1 + 1 steps, each case named as it starts
    assert bar.total == bar.completed == 5
    assert [t for t in bar.texts if t.startswith("case ")] == ["case first", "case last"]


def test_video_bench_targets_and_report_follow_the_measurements():
    """The video benchmark's target rows compare each case's p50 ratio and the RSS growth with issue 12's
    thresholds, and its Markdown shows every case."""
    from sam2rt.bench.video import TARGETS_CPU, markdown, targets

    def case(objects, ours, ref):
        return {"objects": objects, "frames": [8, 40], "backend": "onnxruntime-cpu",
                "sam2rt_ms": {"p50": ours, "p90": ours}, "sam2rt_fps_p50": round(1e3 / ours, 1),
                "reference_ms": {"p50": ref, "p90": ref}, "speedup_p50": round(ref / ours, 3)}

    result = {"what": "video", "created": "2026-11-26T00:00:00", "backend": "onnxruntime-cpu", "threads": 2,
              "frame_hw": [480, 640], "model": "sam2.1_hiera_tiny", "random_weights": True,
              "machine": {"cpu": {"model": "cpu"}, "load_average_at_start": [0.1, 0.1, 0.1]},
              "latency": [case(1, 1000.0, 1300.0), case(3, 3000.0, 3100.0)],
              "rss_sam2rt_mib": {"frame_50": 1000.0, "frame_300": 1060.0}, "rss_growth_50_to_end": 0.06}
    rows = targets(result)
    assert [r["met"] for r in rows] == [1.3 >= TARGETS_CPU["speedup_1_object"],
                                        3100 / 3000 >= TARGETS_CPU["speedup_3_objects"], False]
    assert rows[0]["met"] and not rows[1]["met"]
    result["targets"] = rows
    md = markdown(result)
    assert "| 1 | 8-40 | 1000.0 / 1000.0 | 1.0 | 1300.0 / 1300.0 | 1.3x |" in md and "+6.0%" in md


def test_ort_profile_reports_where_each_graphs_time_goes(tiny_video_dir, tmp_path):
    """`python -m sam2rt.bench.ort_profile` (the GPU check's PROFILE=1 step) on the CPU provider: every graph the
    device path and the tracker load gets a row, its operator times add up to its kernel time, and the heaviest
    nodes are real nodes of that graph; ONNX Runtime's traces are removed."""
    import onnx

    from sam2rt.bench.ort_profile import main

    assert main([str(tiny_video_dir), "--out", str(tmp_path), "--provider", "cpu", "--runs", "2"]) == 0
    report = json.loads((tmp_path / "ort_profile.json").read_text())["graphs"]
    assert {"encoder:tf32", "decoder_fast:16 boxes", "decoder_nomask:16 boxes", "memory_attention:fp32",
            "track_decoder:fp32", "tracking_decoder:fp32", "memory_encoder:fp32"} <= set(report)
    for case, r in report.items():
        assert r["kernel_ms"] > 0 and r["wall_ms_p50"] > 0, case
        assert math.isclose(sum(r["by_op"].values()), r["kernel_ms"], rel_tol=1e-6), case
        graph = onnx.load(tiny_video_dir / r["file"], load_external_data=False).graph
        ops = {n.op_type for n in graph.node}
        assert r["top_nodes"] and all(ms >= 0 for _, _, ms in r["top_nodes"]), case
        # ONNX Runtime fuses nodes at load, so an operator may be a fused one; most are the graph's own
        assert any(op in ops for _, op, _ in r["top_nodes"]), (case, r["top_nodes"])
    md = (tmp_path / "ort_profile.md").read_text()
    assert all(f"| {case} |" in md for case in report)
    assert not list(tmp_path.glob("ort_profile_*.json"))


def test_ort_profile_counts_only_the_measured_runs_kernels():
    """A trace of two warm-up runs (one with a 50 ms algorithm search) and two measured runs: only the kernels that
    start in the measured runs count, and the mean is over those two runs."""
    from sam2rt.bench.ort_profile import measured_kernel_events

    def run(ts):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": 90}

    def kernel(ts, dur):
        return {"cat": "Node", "name": "conv_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": "Conv"}}

    events = [run(0), kernel(1, 50_000), run(100), kernel(101, 10), run(200), kernel(201, 12), run(300), kernel(301, 14),
              {"cat": "Node", "name": "conv_fence_before", "ts": 302, "dur": 1}]
    kernels, runs = measured_kernel_events(events, 2)
    assert runs == 2 and [k["dur"] for k in kernels] == [12, 14]
    assert measured_kernel_events(events, 9)[1] == 4  # no more runs than the trace holds


def test_gpu_bench_script_runs_end_to_end_on_the_cpu_provider(tiny_model_dir, tmp_path):
    """benchmarks/gpu_bench.py only runs for real on a lent GPU (minutes of device time): here it runs whole on the CPU
    provider, so a change that breaks it (a stage, the parity pass, the report) fails CI instead of a GPU session."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", path)
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    out = tmp_path / "out"
    rc = gpu_bench.main(["--model-dir", str(tiny_model_dir), "--backends", "onnxruntime-cpu", "--no-reference",
                         "--runs", "2", "--warmup", "0", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 0
    [js] = sorted(out.glob("*.json"))
    doc = json.loads(js.read_text())
    assert doc["errors"] == []
    stages = {r["stage"] for r in doc["results"] if r["backend"] == "onnxruntime-cpu"}
    assert stages == {"encoder", "preprocess_512", "preprocess_1080", "embed_512", "decode_1", "decode_16",
                      "postprocess_512", "postprocess_1080", "end_to_end_512", "end_to_end_1080"}
    for r in doc["results"]:
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    parity = doc["parity"]["onnxruntime-cpu"]
    assert "error" not in parity, parity
    assert parity["low_res_logits_max_abs"] == 0.0 and parity["mask_iou_single_min"] == 1.0  # the CPU path against itself
    assert js.with_suffix(".md").read_text().count("onnxruntime-cpu") >= len(stages)
    assert not list((tmp_path / "work").glob("*.pt"))  # no checkpoint written: nothing here reads one


def test_gpu_bench_reference_checkpoint_is_marked_random(tiny_model_dir, tmp_path):
    """The seeded random checkpoint gpu_bench.py writes for the PyTorch reference (and exports from on a fresh GPU
    machine) carries the random-weights record, so an export from it, and the video benchmark reading that export, say
    RANDOM weights (GPU run 7's video report called such an export "trained")."""
    import importlib.util
    from pathlib import Path

    from sam2rt.export import build_model
    from sam2rt.export.checkpoint import load_checkpoint
    from sam2rt.model_specs import get_spec

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench_checkpoint", path)
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    model_dir, checkpoint, weights = gpu_bench.prepare("hiera_tiny", tmp_path, tiny_model_dir, None, print)
    assert model_dir == tiny_model_dir and weights["random"] is True
    record = load_checkpoint(build_model(get_spec("hiera_tiny", "2.1")), checkpoint)
    assert record is not None and record["seed"] == 0, record


def test_gpu_bench_times_the_device_measures_off_in_the_same_run(tiny_model_dir, monkeypatch):
    """On a GPU, gpu_bench.py times the 1080p postprocessing with pageable results, the preprocessing with pageable
    uploads, one click and 16 boxes in two
    graphs instead of the merged one, one click with the postprocessing uncaptured and 16 boxes on decoder_nomask,
    beside the stages with every measure on; here on the
    CPU provider with fixed buffers and emulated cuda-python. Each measure is back on afterwards; a backend
    without a measure gets no stage for it."""
    import importlib.util
    from pathlib import Path

    import sam2rt.runtime.gpu as gpu
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Prompt, Sam2Model
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend
    from conftest import photo
    from test_tensorrt_backend_emulated import FakeCudart

    coffee = photo("coffee")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench_measures", path)
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    monkeypatch.setattr(gpu, "_CUDART", FakeCudart())
    m = Manifest.load(tiny_model_dir)
    model = Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=True))
    pool = model.backend._pipeline.pinned = gpu.PinnedPool()
    emb = model.embed(coffee)
    prompt = Prompt(points=np.array([[100.0, 80.0]]), labels=np.array([1]))
    low, iou = model.decode_raw(emb, np.array([[[400.0, 300.0], [0, 0]]], np.float32), np.array([[1, -1]], np.float32), None)
    boxes = [Prompt(box=np.array([10.0 * i, 5.0, 200.0 + i, 150.0])) for i in range(16)]
    images = {"512": coffee, "1080": np.zeros((1080, 1920, 3), np.uint8)}
    pipeline = model.backend._pipeline
    staged_before = pipeline.staging.uploads  # the embed's upload was staged
    asked = []  # (the pool's threshold, bytes asked for, pinned?) of each result block asked for
    empty = pool.empty

    def spy(shape, dtype):
        got = empty(shape, dtype)
        asked.append((pool.min_bytes, int(np.prod(shape)) * np.dtype(dtype).itemsize, got is not None))
        return got

    pool.empty = spy
    real_preprocess, preprocessed = pipeline.preprocess, []

    def count_preprocess(*args, **kwargs):
        preprocessed.append(pipeline.pinned_uploads)
        return real_preprocess(*args, **kwargs)

    pipeline.preprocess = count_preprocess
    out = gpu_bench.measures_off(model, emb, prompt, boxes, low, iou, (1080, 1920), 2, 1, images)
    del pool.empty, pipeline.preprocess
    # the pageable-upload stages preprocessed both images (1 warm-up + 2 runs each) with staging off
    assert preprocessed == [False] * 6 and pipeline.staging.uploads == staged_before
    # the old-threshold stage: a click's 768 KiB masks and logits asked for under 1 MiB and not pinned
    assert (gpu_bench.OLD_PIN_MIN_BYTES, 3 * 2**18, False) in asked and (gpu.PIN_MIN_BYTES, 3 * 2**18, True) in asked
    two_graphs = out.pop("_parts_two_graphs")  # where the click's time went in two graphs
    assert set(two_graphs) == {"decoder upload", "decoder replay", "postprocess_multi load", "postprocess_multi replay",
                               "postprocess_multi out", "rest"}, two_graphs
    assert set(out) == {"postprocess_1080_pageable", "preprocess_512_pageable_upload", "preprocess_1080_pageable_upload",
                        "decode_1_pinned_from_1mib", "decode_1_two_graphs", "decode_16_two_graphs", "decode_1_postprocess_uncaptured", "decode_16_nomask"}
    assert all(0 < r["p50_ms"] <= r["p99_ms"] and r["runs"] == 2 for r in out.values())
    assert model.backend._pipeline.pinned is pool and model.backend._pipeline.fixed_buffers
    assert model.backend._pipeline.pinned_uploads and pool.min_bytes == gpu.PIN_MIN_BYTES
    assert model.backend.fast_prompts is None and model.backend.use_merged_decode  # every measure back on
    # the two-graph stage ran the fast decoder's fixed buffers, the nomask stage decoder_nomask's, for the 16 boxes
    assert {key[0] for key in model.backend._captured if isinstance(key, tuple) and key[1] == 16} == \
        {"decoder_fast", "decoder_nomask"}
    # without pinned results and fixed buffers only the batched fast decoder can be turned off; an export whose
    # fast decoder takes one prompt per run has none of the three
    plain = Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cpu"))
    assert set(gpu_bench.measures_off(plain, plain.embed(coffee), prompt, boxes, low, iou, (1080, 1920), 2, 1)) == \
        {"decode_1_two_graphs", "decode_16_two_graphs", "decode_16_nomask"}
    old = Manifest.load(tiny_model_dir)  # as exported before the batched fast decoder and the merged decode graphs
    old.data["graphs"]["decoder"]["variants"]["fast_device"]["prompts_per_run"] = 1
    for variant in ("decode_multi", "decode_single"):
        del old.data["graphs"]["decoder"]["variants"][variant]
    plain = Sam2Model(old, OrtDeviceBackend(old, "onnxruntime-cpu"))
    assert gpu_bench.measures_off(plain, plain.embed(coffee), prompt, boxes, low, iou, (1080, 1920), 2, 1) == {}


def test_gpu_bench_says_where_a_decodes_time_goes(tiny_model_dir):
    """gpu_bench.py's decode breakdown on the device backend (CPU provider, fixed buffers): once the shapes replay, a
    click's time splits into the decoder's prompt upload and replay, the postprocessing graph's inputs in, replay
    and outputs out, and the rest, each positive; without fixed buffers there is nothing to split."""
    import importlib.util
    from pathlib import Path

    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Prompt, Sam2Model
    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend
    from conftest import photo

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench_parts", path)
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    m = Manifest.load(tiny_model_dir)
    prompt = Prompt(points=np.array([[100.0, 80.0]]), labels=np.array([1]))
    model = Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=True))
    emb = model.embed(photo("coffee"))
    for _ in range(CAPTURE_AFTER + 1):
        model.decode(emb, prompt)
    # the merged decode graph (export/decode_graphs.py): one fixed-buffer run, its inputs in, replay, outputs out
    parts = gpu_bench.decode_parts(model, lambda: model.decode(emb, prompt), 3)
    assert set(parts) == {"decode_multi load", "decode_multi replay", "decode_multi out", "rest"}, parts
    assert all(v > 0 for v in parts.values()), parts
    model.backend.use_merged_decode = False  # the two graphs: the decoder's replay, then the postprocessing's
    for _ in range(CAPTURE_AFTER + 1):
        model.decode(emb, prompt)
    parts = gpu_bench.decode_parts(model, lambda: model.decode(emb, prompt), 3)
    assert set(parts) == {"decoder upload", "decoder replay", "postprocess_multi load", "postprocess_multi replay",
                          "postprocess_multi out", "rest"}, parts
    assert all(v > 0 for v in parts.values()), parts
    plain = Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cpu"))
    emb = plain.embed(photo("coffee"))
    assert gpu_bench.decode_parts(plain, lambda: plain.decode(emb, prompt), 2) == {}
    doc = {"environment": {}, "date": "d", "weights": {}, "runs": 1, "warmup": 0, "results": [], "parity": {},
           "end_to_end_speedup_p50_vs_pytorch_eager_fp32": {}, "end_to_end_speedup_p50_vs_pytorch_bf16_autocast": {},
           "cuda_graphs": {}, "errors": [], "decode_parts": {"onnxruntime-cuda:fp16": {"decode_1": parts}}}
    assert "- onnxruntime-cuda:fp16 decode_1: decoder upload " in gpu_bench.markdown(doc)


def test_video_bench_gpu_target_reads_the_settled_frames():
    """On a GPU backend the 1-object case gets issue 12's >= 100 frames/s row, measured on the frames where every
    video graph replays from fixed buffers when the benchmark recorded them (else on all timed frames)."""
    from sam2rt.bench.video import TARGET_GPU_FPS, markdown, targets

    def gpu_case(p50, settled=None):
        lat = {"objects": 1, "frames": [8, 40], "backend": "onnxruntime-cuda:fp16", "sam2rt_ms": {"p50": p50, "p90": p50},
               "sam2rt_fps_p50": round(1e3 / p50, 1), "fixed_buffers": {}}
        if settled is not None:
            lat["sam2rt_ms_settled"] = {"p50": settled, "p90": settled, "from_frame": 21}
            lat["fixed_buffers"] = {"memory_attention": {"sig": "captured"}}
        return lat

    base = {"what": "video", "created": "2026-11-27T00:00:00", "backend": "onnxruntime-cuda:fp16", "threads": 8,
            "frame_hw": [480, 640], "model": "sam2.1_hiera_tiny", "random_weights": True,
            "machine": {"cpu": {"model": "cpu"}, "load_average_at_start": [0.1, 0.1, 0.1]}}
    slow_then_fast = {**base, "latency": [gpu_case(12.0, settled=9.5)]}
    [row] = targets(slow_then_fast)
    assert row["met"] and "105.3 frames/s" in row["measured"] and "frames 21-40" in row["measured"]
    [row] = targets({**base, "latency": [gpu_case(12.0)]})
    assert not row["met"] and f">= {TARGET_GPU_FPS}" in row["threshold"]
    slow_then_fast["targets"] = targets(slow_then_fast)
    md = markdown(slow_then_fast)
    assert "frames 21-40 (every video graph from fixed buffers): sam2rt p50 9.5 ms" in md and "**no**" not in md
    assert "background memory" not in md
    # background memory: the time to the masks is reported beside the whole work, which the rows keep reading
    slow_then_fast["latency"][0].update(background_memory=True, sam2rt_to_masks_ms={"p50": 6.5, "p90": 7.0})
    [row] = targets(slow_then_fast)
    assert "105.3 frames/s" in row["measured"]
    assert "background memory: the masks after p50 6.5 ms (p90 7.0)" in markdown(slow_then_fast)


def test_video_bench_runs_whole_on_the_tiny_model(tiny_video_dir, tmp_path, monkeypatch):
    """`sam2rt bench --video` (the GPU check's VIDEO=1 step) end to end on the tiny stand-in, its GPU-only parts
    included (the provider named a GPU one here): a case without the video graphs' CUDA graphs, the GPU target
    row; JSON and Markdown written. A change that breaks it fails CI instead of a GPU session."""
    import sam2rt.bench.video as video

    from sam2rt.runtime import VideoTracker

    monkeypatch.setattr(video, "GPU_BACKENDS", ("onnxruntime-cpu",))
    from_dir = VideoTracker.from_dir.__func__

    def gpu_like(cls, *args, **kwargs):  # background memory, the GPU's default
        return from_dir(cls, *args, **{**kwargs, "background_memory": True})

    monkeypatch.setattr(VideoTracker, "from_dir", classmethod(gpu_like))
    result = video.run_video_benchmark(tiny_video_dir, tmp_path, threads=1, first=2, last=5, objects=(1,),
                                       rss_frames=0, reference=False, backend="onnxruntime-cpu")
    [lat] = result["latency"]
    assert lat["sam2rt_ms"]["n"] == 4 and lat["fixed_buffers"] == {}  # the CPU provider: no fixed buffers by default
    assert lat["sam2rt_to_masks_ms"]["n"] == 4 and lat["background_memory"] is True
    assert result["latency_without_cuda_graphs"]["sam2rt_ms"]["n"] == 4
    assert [t["target"] for t in result["targets"]] == ["GPU per-frame tracking, 1 object, onnxruntime-cpu",
                                                         "GPU tracking a video file (propagate, prefetch), 1 object, onnxruntime-cpu"]
    tp = result["throughput"]
    assert tp["frames"] == [1, 5] and tp["background_memory"] is True
    assert len(tp["runs"]["off"]) == len(tp["runs"]["on"]) == len(tp["runs"]["on_inline_memory"]) == 2
    assert tp["fps_prefetch_on"] > 0 and tp["fps_prefetch_off"] > 0 and tp["fps_prefetch_on_inline_memory"] > 0
    [js] = tmp_path.glob("*_video.json")
    assert json.loads(js.read_text())["latency_without_cuda_graphs"]["fixed_buffers"] == {}
    md = js.with_suffix(".md").read_text()
    assert "without CUDA graphs" in md and "frames/s with prefetch" in md and "the memory encoded inline" in md
    assert "background memory: the masks after p50" in md


def test_encoder_forms_measures_each_exported_form(tiny_model_dir, tmp_path):
    """`python -m sam2rt.bench.encoder_forms` (the GPU check's FORMS=1 step) on the CPU provider, exported forms only:
    the configuration runs, gets its timings and its difference to the reference configuration (itself: 0), and
    both reports name it."""
    from sam2rt.bench.encoder_forms import main

    assert main([str(tiny_model_dir), "--out", str(tmp_path), "--provider", "cpu", "--rounds", "2", "--runs", "2",
                 "--no-unchunked", "--only", "unchunked"]) == 1  # nothing to measure: the filter left no configuration
    assert main([str(tiny_model_dir), "--out", str(tmp_path), "--provider", "cpu", "--rounds", "2", "--runs", "2",
                 "--no-unchunked", "--only", "exported:fp32"]) == 0
    doc = json.loads((tmp_path / "encoder_forms.json").read_text())
    [(name, r)] = doc["configurations"].items()
    assert name == "exported:fp32:default" and r["file"] == "encoder.onnx" and r["runs"] == 4
    assert 0 < r["p50_ms"] <= r["p90_ms"] and r["max_abs_vs_reference"] == 0.0
    assert r["kernels_run"] == {}  # the CPU provider prints no routes
    assert "| exported | fp32 | default | not reported |" in (tmp_path / "encoder_forms.md").read_text()
    assert doc["fastest"] == {"fp32": "exported:fp32:default"}


def test_encoder_forms_exports_the_pad_first_form_it_is_asked_for(model_dir, tmp_path):
    """`--only padfirst` exports that form alone (from the model directory's seeded weights, checked against PyTorch
    at export): no Pad node is left, and it is the export's GPU encoder (encoder.device.onnx): the same nodes, and on
    the CPU provider the same embedding to float rounding."""
    import onnx
    import onnxruntime as ort

    from sam2rt.bench.encoder_forms import main

    assert main([str(model_dir), "--out", str(tmp_path), "--provider", "cpu", "--rounds", "1", "--runs", "1",
                 "--only", "padfirst"]) == 0
    doc = json.loads((tmp_path / "encoder_forms.json").read_text())
    assert list(doc["configurations"]) == ["padfirst:fp32:default"], doc["configurations"]
    assert not (tmp_path / "work" / "encoder.unchunked.onnx").exists()  # not asked for, not made
    made = tmp_path / "work" / "encoder.padfirst.onnx"
    ops = [n.op_type for n in onnx.load(str(made), load_external_data=False).graph.node]
    device = [n.op_type for n in onnx.load(str(model_dir / "encoder.device.onnx"), load_external_data=False).graph.node]
    assert ops.count("Pad") == 0 and ops.count("MultiHeadAttention") == 12  # one per block
    assert sorted(ops) == sorted(device)
    image = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    got, want = (ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, {"image": image})
                 for f in (made, model_dir / "encoder.device.onnx"))
    for g, w in zip(got, want):
        assert np.abs(g - w).max() < 1e-3


def test_encoder_forms_recommends_the_fastest_configuration_that_computes_the_same():
    """The fastest configuration per precision is named with how to use it, unless its embedding is off the
    reference's (a kernel computing something else is never recommended) or it failed."""
    from sam2rt.bench.encoder_forms import advice, fastest

    def row(form, precision, kernel, ms, diff):
        return {"form": form, "precision": precision, "kernel": kernel, "p50_ms": ms, "max_abs_vs_reference": diff}

    results = {"a": row("exported", "fp16", "default", 8.9, 0.01), "b": row("exported", "fp16", "efficient", 7.0, 0.01),
               "c": row("unchunked", "fp16", "flash", 5.0, 3.0), "d": {"error": "no cuDNN"},
               "e": row("exported", "tf32", "default", 12.8, 0.0)}
    best = fastest(results)
    assert best["fp16"] is results["b"] and best["tf32"] is results["e"]  # c is faster but computes something else
    assert advice(best["fp16"]) == "SAM2RT_CUDA_ATTENTION=efficient"
    assert advice(best["tf32"]) == "what the runtime does already"
    assert "unchunked encoder" in advice(row("unchunked", "fp16", "math", 1.0, 0.0))


def test_encoder_forms_records_which_attention_kernel_each_node_ran(capfd):
    """ONNX Runtime's CUDA MultiHeadAttention prints its route per node (C++ std::cout, file descriptor 1) when
    ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO is set: the lines are taken from the process's output while a
    configuration warms up and counted per kernel, a node's last route once; other output passes through."""
    import os

    from sam2rt.bench.encoder_forms import captured_stdout, describe_kernels, kernels_run

    route = "\x1b[36mOperator=MultiHeadAttention Node=/trunk/blocks.{}/attn/MHA DataType=fp16 SdpaKernel={}\x1b[0m\n"
    with captured_stdout() as lines:
        os.write(1, route.format(0, "EFFICIENT_ATTENTION").encode())  # as C++ writes it, past Python's sys.stdout
        for block, kernel in ((0, "FLASH_ATTENTION"), (1, "FLASH_ATTENTION"), (2, "MATH")):
            os.write(1, route.format(block, kernel).encode())
        os.write(1, b"AttentionKernelOptions: FLASH_ATTENTION=1\n")
    assert len(lines) == 5 and lines[-1] == "AttentionKernelOptions: FLASH_ATTENTION=1"
    assert "SdpaKernel" not in capfd.readouterr().out  # nothing reached the real output meanwhile
    kernels = kernels_run(lines)
    assert kernels == {"FLASH_ATTENTION": 2, "MATH": 1}  # block 0 counted once, with its last route
    assert describe_kernels(kernels) == "FLASH_ATTENTION x2, MATH x1" and describe_kernels({}) == "not reported"
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"  # the real output is back


def test_encoder_forms_on_cuda_try_every_attention_kernel():
    """On a GPU every form is measured in TF32 with the kernels FP32 has and in FP16 with all of ONNX Runtime's."""
    from sam2rt.bench.encoder_forms import FP32_KERNELS, configs
    from sam2rt.runtime.backends.onnxruntime_backend import SDPA_KERNELS

    cuda = configs("cuda", ["exported", "unchunked"])
    assert len(cuda) == len(set(cuda)) == 2 * (len(FP32_KERNELS) + len(SDPA_KERNELS))
    assert {c.kernel for c in cuda if c.precision == "fp16"} == set(SDPA_KERNELS)
    assert {c.kernel for c in cuda if c.precision == "tf32"} == set(FP32_KERNELS) and "flash" not in FP32_KERNELS
    assert [c.name for c in configs("cpu", ["exported"])] == ["exported:fp32:default"]


@pytest.mark.slow
def test_encoder_forms_exports_the_unchunked_encoder(model_dir, tmp_path):
    """The forms made here, by default all of them: the unchunked form is the CPU's encoder form with Hiera's first
    stages whole (one attention node per block, as the exported GPU form) and its padding after the linears (Pad
    nodes, which the exported GPU form has none of); each is checked against PyTorch when made, and computes what
    the exported form computes."""
    import collections

    import onnx

    from sam2rt.bench.encoder_forms import main

    assert main([str(model_dir), "--out", str(tmp_path), "--provider", "cpu", "--rounds", "1", "--runs", "1"]) == 0
    doc = json.loads((tmp_path / "encoder_forms.json").read_text())
    got = doc["configurations"]
    assert set(got) == {"exported:fp32:default", "unchunked:fp32:default", "padfirst:fp32:default"}
    for form in ("unchunked", "padfirst"):
        assert got[f"{form}:fp32:default"]["max_abs_vs_reference"] <= 1e-4
        assert any(n.startswith(f"{form}: exported") and "difference to PyTorch" in n for n in doc["notes"]), doc["notes"]

    def ops(path):
        return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)

    assert got["exported:fp32:default"]["file"] == "encoder.device.onnx"
    device, unchunked = ops(model_dir / "encoder.device.onnx"), ops(tmp_path / "work" / "encoder.unchunked.onnx")
    assert unchunked["MultiHeadAttention"] == device["MultiHeadAttention"] == 12
    assert unchunked["Pad"] > 0 == device["Pad"]
