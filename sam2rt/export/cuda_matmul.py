"""Finds the MatMuls that ONNX Runtime's CUDA provider computes wrongly or cannot replay, before a graph ships.

ONNX Runtime's CUDA MatMul (and com.microsoft FusedMatMul) takes a strided-batched cuBLAS shortcut whenever
both operands have batch dimensions with the same *product* (`CanUseStridedBatchedGemm` in
onnxruntime/core/providers/cuda/math/matmul.cc, 1.2x-1.31). The shortcut pairs batch p of A with batch p of B,
which is numpy broadcasting only when the two batch shapes are equal once left-padded with ones. For A
(2,1,M,K) @ B (2,K,N) the products are both 2, but broadcasting gives a (2,2,M,N) output of four products:
the shortcut writes two of them (one in the wrong place) and leaves the rest of the output unwritten. The CPU
provider broadcasts correctly, so such a graph passes every CPU check and is wrong on a GPU. Other broadcast
batches take a path that uploads pointer arrays from the host on every run: correct when run eagerly, but a
captured CUDA graph would replay that upload from host memory freed after the capture.

Of all the exported graphs only decoder_fast held such products (one of each kind, in its upscaling), and it
is the one graph that disagreed with its reference on the H100, by 0.3-2.6 from its first run (runs 2-3 in
benchmarks/results/gpu-runs/); the encoder and the other decoders were exact. The export now checks every graph
exported for the CUDA provider (graph_table rows that run on onnxruntime-cuda; the FP16 copies have their
sources' shapes) with `refuse_cuda_problems`, and exports decoder_fast's GPU form without them.

The operands' shapes are taken from one run on the CPU provider (static shape inference does not resolve the
encoder's windowing reshapes), with every symbolic input dimension set to 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ExportError

MATMUL_OPS = {("", "MatMul"), ("com.microsoft", "FusedMatMul")}


# What ORT's CUDA MatMul does with a pair of operand shapes (see cuda_matmul_path).
GEMM, STRIDED, WRONG, POINTER_ARRAYS = "gemm", "strided batched", "wrong", "pointer arrays"
PROBLEMS = {
    WRONG: "batch shapes differ but their products are equal: ONNX Runtime's CUDA MatMul pairs the batches up "
           "instead of broadcasting them and leaves part of the output unwritten",
    POINTER_ARRAYS: "a broadcast batch: ONNX Runtime's CUDA MatMul copies per-batch pointer arrays from the host on "
                    "every run, which a captured CUDA graph replays from freed host memory",
}


@dataclass(frozen=True)
class MatMulFinding:
    """A MatMul that a GPU graph must not hold: its operands' shapes and the CUDA path they take."""

    node: str
    left: tuple[int, ...]
    right: tuple[int, ...]
    path: str

    def __str__(self) -> str:
        return f"MatMul {self.node!r} {self.left} @ {self.right}: {PROBLEMS[self.path]}"


def _padded(a: tuple[int, ...], rank: int) -> tuple[int, ...]:
    return (1,) * (rank - len(a)) + tuple(a)


def cuda_matmul_path(left: tuple[int, ...], right: tuple[int, ...]) -> str:
    """How ORT's CUDA MatMul computes A @ B for these shapes (matmul.cc, 1.2x-1.31): one GEMM when B is a matrix
    (A's batch folds into its rows) or the output has one matrix; strided-batched cuBLAS when both are batched
    (A rank >= 3, B rank >= 3) with equal batch products, which is right only for equal batch shapes (left-padded
    with ones); otherwise cuBLAS over pointer arrays uploaded from the host on each run."""
    if len(right) <= 2:
        return GEMM
    lb, rb = left[:-2], right[:-2]
    rank = max(len(lb), len(rb))
    if math.prod(max(x, y) for x, y in zip(_padded(lb, rank), _padded(rb, rank))) == 1:
        return GEMM
    if len(left) >= 3 and math.prod(lb) == math.prod(rb):
        return STRIDED if _padded(lb, rank) == _padded(rb, rank) else WRONG
    return POINTER_ARRAYS


def _feeds(model: onnx.ModelProto, dim_value: int) -> dict[str, np.ndarray]:
    """Inputs for one run: symbolic dimensions set to `dim_value`; floats random, integers and booleans zero."""
    rng = np.random.default_rng(0)
    init = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dim_value for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        feeds[inp.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                           else np.zeros(shape, dtype))
    return feeds


def matmul_operand_shapes(model: onnx.ModelProto, dim_value: int = 2) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{node name: (A's shape, B's shape)} for every MatMul / FusedMatMul of the main graph, as they are in one
    run on ONNX Runtime's CPU provider, unoptimised (the graph as written), with symbolic input dimensions set
    to `dim_value`. The operands' shapes come back through added Shape nodes, not the tensors themselves."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    probes: dict[str, tuple[str, str]] = {}
    for i, node in enumerate(list(m.graph.node)):
        if (node.domain, node.op_type) not in MATMUL_OPS:
            continue
        names = (f"_sam2rt_mm{i}_a", f"_sam2rt_mm{i}_b")
        for src, name in zip(node.input[:2], names):
            m.graph.node.append(helper.make_node("Shape", [src], [name]))
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, None))
        probes[node.name or f"#{i}"] = names
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    wanted = [n for pair in probes.values() for n in pair]
    got = dict(zip(wanted, sess.run(wanted, _feeds(model, dim_value))))
    return {k: (tuple(int(d) for d in got[a]), tuple(int(d) for d in got[b])) for k, (a, b) in probes.items()}


def _weight_matrices(model: onnx.ModelProto) -> set[str]:
    """Names of the constant tensors of rank <= 2: initializers, Constant nodes, and Identity of either."""
    out = {i.name for i in model.graph.initializer if len(i.dims) <= 2}
    for node in model.graph.node:  # in graph order, so an Identity follows what it copies
        if node.op_type == "Constant" and any(a.name == "value" and len(a.t.dims) <= 2 for a in node.attribute):
            out.add(node.output[0])
        elif node.op_type == "Identity" and node.input[0] in out:
            out.add(node.output[0])
    return out


def cuda_matmul_problems(
    model: onnx.ModelProto | str | Path, captured: bool = True, dim_value: int = 2
) -> list[MatMulFinding]:
    """Every MatMul / FusedMatMul of `model` that ORT's CUDA provider computes wrongly, and with `captured` (a
    graph the device backend replays as a CUDA graph: the exported encoders and decoders) also those it cannot
    replay (PROBLEMS). Shapes from matmul_operand_shapes with symbolic input dimensions set to `dim_value` (2,
    not 1, so that a dynamic batch or point count cannot hide a broadcast)."""
    problems = set(PROBLEMS) if captured else {WRONG}
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    matrices = _weight_matrices(model)
    if all(n.input[1] in matrices for n in model.graph.node if (n.domain, n.op_type) in MATMUL_OPS):
        return []  # every B is a weight matrix: all plain GEMMs, no run needed to know
    found = []
    for name, (a, b) in matmul_operand_shapes(model, dim_value).items():
        path = cuda_matmul_path(a, b)
        if path in problems:
            found.append(MatMulFinding(name, a, b, path))
    return found


def refuse_cuda_problems(path: str | Path) -> None:
    """ExportError naming every MatMul of the graph file that the CUDA provider would get wrong (the export's
    check of each graph a GPU backend loads)."""
    found = cuda_matmul_problems(path)
    if found:
        raise ExportError(f"{Path(path).name} is meant for ONNX Runtime's CUDA provider, which would mis-run it: "
                          + "; ".join(map(str, found))
                          + ". Rewrite those products as plain GEMMs (a matrix as B) or with equal batch shapes.")
