"""The benchmark harness in quick mode: it runs end to end and its outputs have the right structure.

No timing thresholds here (those live in the benchmark report); only structure and sanity.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytestmark = pytest.mark.slow


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
