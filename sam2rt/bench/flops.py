"""Operation counts of the exported graphs, from ONNX Runtime's own record of a real run.

ONNX's static shape inference cannot resolve the Hiera encoder's computed reshapes, so the
counter runs each graph once in an ONNX Runtime session with profiling on (EXTENDED
optimisations, i.e. the same fused MatMul/Gemm/Conv nodes the runtime executes, without the
CPU-specific NCHWc weight layout) and reads every node's concrete input/output shapes and
kernel time from the profile. FLOPs (multiply + add = 2) are counted for the compute-bound ops:

- MatMul-like (MatMul, FusedMatMul, Gemm, MatMulInteger*, DynamicQuantizeMatMul): 2 * |out| * K,
  K = last dim of input A;
- com.microsoft MultiHeadAttention with q (B,Sq,D), k (B,Sk,D): 4 * B * Sq * Sk * D (scores and weighted sum);
- Conv / FusedConv: 2 * |out| * (Cin / groups) * kh * kw (from the weight's shape);
- ConvTranspose: 2 * |in| * (Cout / groups) * kh * kw.

Elementwise ops, softmax and normalisations are not counted (they are memory-bound); their time
is reported separately, so "where the time goes" is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
              "FusedGemm", "QGemm"}
CONV_OPS = {"Conv", "FusedConv", "NchwcConv", "QLinearConv", "ConvInteger"}
CONVT_OPS = {"ConvTranspose"}


def _shapes(entries: list[dict] | None) -> list[list[int]]:
    out = []
    for e in entries or []:
        for _, shape in e.items():
            out.append([int(d) for d in shape])
    return out


def node_flops(op: str, inputs: list[list[int] | None], outputs: list[list[int]], attrs: dict[str, Any]) -> int:
    """FLOPs of one executed node (0 for ops not counted). `inputs` in the node's input order."""
    if not outputs or not inputs or inputs[0] is None:
        return 0
    out = int(np.prod(outputs[0], dtype=np.int64))
    if op in MATMUL_OPS:
        a = inputs[0]
        k = (a[-2] if attrs.get("transA") else a[-1]) if len(a) >= 2 else (a[-1] if a else 1)
        return 2 * out * int(k)
    if op == "MultiHeadAttention":  # com.microsoft, q (B,Sq,D) and k (B,Sk,D): q k^T and the weights times v
        k = inputs[1] if len(inputs) > 1 else None
        if k is None or len(inputs[0]) != 3 or len(k) != 3:
            return 0
        b, sq, d = inputs[0]
        return 2 * 2 * int(b) * int(sq) * int(k[1]) * int(d)
    w = inputs[1] if len(inputs) > 1 else None
    if w is None or len(w) < 3:
        return 0
    if op in CONV_OPS:
        return 2 * out * int(np.prod(w[1:], dtype=np.int64))
    if op in CONVT_OPS:
        return 2 * int(np.prod(inputs[0], dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    return 0


def _graph_index(path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Node name -> (op, inputs, attrs) and initializer name -> shape, of an ONNX file (weights not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: [int(d) for d in i.dims] for i in model.graph.initializer}
    nodes = {}
    for n in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute if a.type == onnx.AttributeProto.INT}
        nodes[n.name] = (n.op_type, list(n.input), attrs)
    return nodes, inits


def profile_graph(path: str | Path, feeds: dict[str, np.ndarray], threads: int, runs: int = 1) -> dict[str, Any]:
    """Run the (already optimised) graph `path` with ORT profiling; return FLOPs and kernel time by op type.

    The session runs with graph optimisations disabled so the executed nodes are exactly the
    file's nodes: each profiled node is matched by name to get its attributes and weight shapes
    (the profile lists only the non-constant inputs' shapes).
    """
    import onnxruntime as ort

    path = Path(path)
    nodes, inits = _graph_index(path)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):  # the first run (allocations) is dropped below
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first = run_starts[-runs] if len(run_starts) >= runs + 1 else None
    flops: dict[str, int] = defaultdict(int)
    time_us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    unmatched = 0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if first is not None and e["ts"] < first:
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        name = e["name"][: -len("_kernel_time")]
        dynamic = iter(_shapes(args.get("input_type_shape")))
        if name in nodes:
            _, inputs, attrs = nodes[name]
            shapes = [inits[i] if i in inits else next(dynamic, None) if i else None for i in inputs]
        else:
            unmatched += 1
            shapes, attrs = list(dynamic), {}
        flops[op] += node_flops(op, shapes, _shapes(args.get("output_type_shape")), attrs)
        time_us[op] += float(e.get("dur", 0))
        count[op] += 1
    total_time = sum(time_us.values()) / runs / 1e6
    total_flops = sum(flops.values()) / runs
    by_op = {
        op: {
            "gflops": round(flops[op] / runs / 1e9, 4),
            "time_ms": round(time_us[op] / runs / 1e3, 3),
            "nodes": count[op] // runs,
            "achieved_gflops_per_s": round(flops[op] / (time_us[op] / 1e6) / 1e9, 2) if flops[op] and time_us[op] else None,
        }
        for op in sorted(time_us, key=lambda o: -time_us[o])
    }
    return {
        "gflops": round(total_flops / 1e9, 4),
        "kernel_time_s": round(total_time, 4),
        "achieved_gflops_per_s_in_kernels": round(total_flops / total_time / 1e9, 2) if total_time else None,
        "unmatched_nodes": unmatched,
        "by_op": by_op,
    }


def decoder_feeds(session_inputs: list, batch: int = 1, points: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for a decoder graph (a point + padding per prompt; no mask)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session_inputs:
        if i.name == "point_coords":
            feeds[i.name] = (rng.random((batch, points, 2)) * 1024).astype(np.float32)
        elif i.name == "point_labels":
            lab = np.ones((batch, points), np.float32)
            lab[:, -1] = -1
            feeds[i.name] = lab
        elif i.name == "mask_input":
            feeds[i.name] = np.zeros((batch, 1, 256, 256), np.float32)
        elif i.name == "has_mask_input":
            feeds[i.name] = np.zeros((batch,), np.float32)
        else:
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def count_model(model_dir: str | Path, threads: int, decoder_batch: int = 1) -> dict[str, Any]:
    """FLOPs and kernel time by op for the encoder (one 1024x1024 image) and decoder (B prompts of 1 point)."""
    import onnxruntime as ort

    from ..export.optimize import save_optimized
    from ..manifest import Manifest

    manifest = Manifest.load(model_dir)
    out: dict[str, Any] = {"method": __doc__.strip().splitlines()[0] + " (see sam2rt/bench/flops.py)", "precision": "fp32"}
    with tempfile.TemporaryDirectory() as tmp:

        def optimised(role: str, base_variant: str | None, opt_variant: str) -> Path:
            entry = manifest.variant(role, opt_variant)
            if entry is not None:
                return manifest.directory / entry["file"]
            base = manifest.variant(role, base_variant) if base_variant else manifest.graph(role)
            src = manifest.directory / base["file"]
            return save_optimized(src, Path(tmp) / (src.stem + ".opt.onnx"))

        enc_path = optimised("encoder", None, "optimized")
        image = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
        out["encoder"] = {"graph": enc_path.name, **profile_graph(enc_path, {"image": image}, threads)}
        # the decoder graph the CPU backend runs for a 1-point prompt: fast > nomask > full
        if manifest.variant("decoder", "fast") is not None and manifest.variant("decoder", "prep") is not None:
            dec_path = optimised("decoder", "fast", "fast_optimized")
            prep_path = optimised("decoder", "prep", "prep_optimized")
            so = ort.SessionOptions()
            so.log_severity_level = 3
            probe = ort.InferenceSession(str(prep_path), so, providers=["CPUExecutionProvider"])
            feeds = decoder_feeds(probe.get_inputs())
            del probe
            out["decoder_prep"] = {"graph": prep_path.name, "per": "image, at embed",
                                   **profile_graph(prep_path, feeds, threads, runs=3)}
        elif manifest.variant("decoder", "nomask") is not None:
            dec_path = optimised("decoder", "nomask", "nomask_optimized")
        else:
            dec_path = optimised("decoder", None, "optimized")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        probe = ort.InferenceSession(str(dec_path), so, providers=["CPUExecutionProvider"])
        feeds = decoder_feeds(probe.get_inputs(), batch=decoder_batch)
        del probe
        out["decoder"] = {"graph": dec_path.name, "batch": decoder_batch, **profile_graph(dec_path, feeds, threads, runs=3)}
    return out
