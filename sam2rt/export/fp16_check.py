"""Whether the weights being exported keep the FP16 encoder within FP16's range, checked where the weights are.

FP16 holds magnitudes up to 65504. Random weights (all the test suite has) keep Hiera's activations near 1; a trained
ViT may carry activations of thousands, and a tensor that passes FP16's range becomes inf, then NaN, and the masks
are silently wrong. So before the FP16 encoder is written (`sam2rt export`) or built into a TensorRT engine
(`sam2rt build-engine --fp16`), the FP32 encoder runs on ONNX Runtime's CPU provider over a real photo (bundled with
the package) with the largest magnitude of every tensor the mixed-precision graph holds in FP16 (the outputs of its
FP16 nodes and what they read) reduced inside the graph to two scalars each, so that no activation is kept.

Why measured on the FP32 graph rather than by running the FP16 one on the CPU: ONNX Runtime's CPU provider runs most
FP16 operators in FP32 and removes the casts between them, so an FP16 graph can run there without ever holding an
FP16 value that overflows on a GPU. The magnitudes are the same on any hardware.

The weights those FP16 nodes read are measured too (a weight beyond 65504 cannot be held in FP16).

Verdict (`refused`): a tensor or weight beyond 65504 on this photo. A tensor beyond MARGIN of it is reported as close
(`near_limit`): other images may pass the range; `sam2rt verify` checks the masks on the GPU itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PHOTO = Path(__file__).resolve().parents[1] / "data" / "photos" / "astronaut.jpg"
FP16_MAX = 65504.0
MARGIN = 0.25  # a tensor above MARGIN * FP16_MAX on the photo is near the limit (the export warns)
TOP = 5  # the largest tensors reported


def _photo_input() -> np.ndarray:
    from ..annotate import read_image
    from ..runtime.preprocess import preprocess

    return preprocess(read_image(PHOTO))


# element types of node outputs where ONNX's inference stops (it does not know com.microsoft's MultiHeadAttention)
_INT64_OPS = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})
_BOOL_OPS = frozenset({"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not",
                       "IsNaN", "IsInf"})


def _element_types(graph: Any) -> dict[str, int]:
    """Every tensor's element type: ONNX's shape inference where it reaches, else carried forward through the nodes
    (in order) from their inputs by op type."""
    import onnx
    from onnx import TensorProto, shape_inference

    try:
        inferred = shape_inference.infer_shapes(onnx.helper.make_model(graph)).graph
    except Exception:
        inferred = graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]
             if v.type.tensor_type.elem_type}
    types.update({i.name: i.data_type for i in graph.initializer})
    for n in graph.node:
        if all(o in types for o in n.output if o):
            continue
        if n.op_type == "Cast":
            t = next(a.i for a in n.attribute if a.name == "to")
        elif n.op_type in _INT64_OPS:
            t = TensorProto.INT64
        elif n.op_type in _BOOL_OPS:
            t = TensorProto.BOOL
        elif n.op_type == "Constant":
            t = next((a.t.data_type for a in n.attribute if a.HasField("t")), TensorProto.FLOAT)
        elif n.op_type == "Where":
            t = types.get(n.input[1], 0)
        else:  # elementwise, data movement, linear algebra, com.microsoft attention: the first input's type
            t = next((types[i] for i in n.input if i in types), 0)
        for o in n.output:
            if o and o not in types and t:
                types[o] = t
    return types


def fp16_tensors(graph: Any, fp32_nodes: set[str]) -> list[str]:
    """Float tensors of an FP32 graph that its mixed-precision copy holds in FP16: the outputs of every node that
    is not kept in FP32 (`fp32_nodes`, as export/fp16.py chose them) and the activations those nodes read."""
    import onnx

    types = _element_types(graph)
    weights = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    names: dict[str, None] = {}
    for n in graph.node:
        if n.name in fp32_nodes or n.op_type in ("Shape", "Cast"):
            continue
        for name in [*n.input, *n.output]:
            if name and name not in weights and types.get(name) == onnx.TensorProto.FLOAT:
                names[name] = None
    return list(names)


def fp16_weight_magnitudes(graph: Any, fp32_nodes: set[str]) -> dict[str, float]:
    """max |w| of each float weight (initializer or Constant) that a node the FP16 graph runs in FP16 reads."""
    from onnx import numpy_helper

    weights = {i.name: i for i in graph.initializer}
    weights.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute
                    if a.HasField("t")})
    out = {}
    for n in graph.node:
        if n.name in fp32_nodes or n.op_type in ("Shape", "Cast"):
            continue
        for name in n.input:
            if name in weights and name not in out:
                w = numpy_helper.to_array(weights[name])
                if w.dtype == np.float32 and w.size:
                    out[name] = float(np.abs(w).max())
    return out


def activation_magnitudes(model: Any, names: list[str], image: np.ndarray) -> dict[str, float]:
    """max |x| of each named tensor of an FP32 model on `image`, reduced inside the graph (ReduceMax, ReduceMin);
    `model` (an onnx ModelProto) gets those reductions as its only outputs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ..runtime.backends.onnxruntime_backend import session_options

    graph = model.graph
    wanted = set(names)
    order: list[str] = []  # the tensors in the order they are computed

    def reductions(name: str) -> list[Any]:
        """ReduceMax and ReduceMin of `name` (two reads, no copy), placed right after the node that computes it. With
        the priority-based order below each runs as soon as its tensor exists, which is then freed as before; in
        ONNX Runtime's default order they held every activation of the encoder at once (hiera_large: over 24 GiB)."""
        if name not in wanted or name in order:
            return []
        i = len(order)
        order.append(name)
        return [helper.make_node(op, [name], [f"sam2rt_peak_{i:06d}_{op[-3:].lower()}"], name=f"sam2rt_peak_{i:06d}_{op}",
                                 keepdims=0) for op in ("ReduceMax", "ReduceMin")]

    nodes = [r for i in graph.input for r in reductions(i.name)]
    for n in graph.node:
        nodes.append(n)
        nodes += [r for o in n.output for r in reductions(o)]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(f"sam2rt_peak_{i:06d}_{kind}", TensorProto.FLOAT, [])
                        for i in range(len(order)) for kind in ("max", "min"))
    so = session_options()
    # Kahn's order, lowest node first among those ready: each reduction runs as soon as its tensor exists (the default
    # order walks back from the last output, which needs the whole encoder before any other reduction runs)
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = session.run(None, {session.get_inputs()[0].name: image})
    return {name: float(max(abs(values[2 * i]), abs(values[2 * i + 1]))) for i, name in enumerate(order)}


def check_fp16_encoder(fp32: str | Path, fp32_nodes: dict[str, str] | set[str]) -> dict[str, Any]:
    """The FP32 encoder's activations on the bundled photo, against FP16's range, for the mixed-precision copy that
    keeps `fp32_nodes` in FP32: the largest tensors, how many were measured, and `refused` (why the FP16 encoder is
    unusable with these weights) or None."""
    import onnx

    from .fp16 import _name_unnamed

    model = onnx.load(str(fp32))
    _name_unnamed(model.graph)  # the names the conversion gave the nodes `fp32_nodes` names
    names = fp16_tensors(model.graph, set(fp32_nodes))
    weights = fp16_weight_magnitudes(model.graph, set(fp32_nodes))
    peaks = {**activation_magnitudes(model, names, _photo_input()), **weights}
    top = sorted(peaks.items(), key=lambda kv: -kv[1] if np.isfinite(kv[1]) else -np.inf)[:TOP]
    over = [(n, v) for n, v in peaks.items() if not np.isfinite(v) or v > FP16_MAX]
    refused = None
    if over:
        name, value = max(over, key=lambda kv: kv[1] if np.isfinite(kv[1]) else np.inf)
        refused = (f"{len(over)} of its FP16 tensors pass FP16's range of {FP16_MAX:g} on a photo, the largest "
                   f"{name} at {value:.4g}")
    return {"image": PHOTO.name, "tensors_measured": len(peaks), "fp16_max": FP16_MAX,
            "largest": [{"tensor": n, "max_abs": v} for n, v in top],
            "near_limit": sum(1 for v in peaks.values() if np.isfinite(v) and MARGIN * FP16_MAX < v <= FP16_MAX),
            "refused": refused}
