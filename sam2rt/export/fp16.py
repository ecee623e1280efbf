"""Mixed-precision ONNX graphs for FP16 TensorRT engines: FP16 everywhere except the layers that need FP32.

TensorRT 11 builds only strongly typed networks (the FP16 builder flag is gone) and TensorRT 10 accepts
them too, so sam2rt makes the precision explicit in the graph: every float tensor becomes FP16
except around the nodes chosen by `select_fp32_nodes`, which keep FP32 with casts at their borders.
The same graph builds on both TensorRT generations, and the list of FP32 nodes goes to the manifest.

Kept in FP32, and why:
- LayerNormalization, and the ReduceMean / Pow / Sqrt of the hand-written LayerNorm2d (plus the
  Add / Sub / Mul / Div next to them, which also catches the sqrt'd attention scale applied to q and k):
  squares of activations overflow FP16's 65504 and variances lose bits;
- Softmax, and the MatMul computing the attention logits that feed it (Hiera's and the two-way
  transformer's attention): large logits overflow and saturate the softmax;
- Sin / Cos of the prompt encoder's random-Fourier positional encoding, and the MatMul feeding
  them: pixel coordinates times the Gaussian matrix reach tens of radians, where FP16 keeps 2 decimals;
- Cast (shape arithmetic, cheap) so integer-to-float conversions never change type under the converter;
- Constants read by FP32 nodes only (a normalisation's epsilon, an exponent): an FP16 copy cast back would lose
  their precision (1e-6 is subnormal in FP16).

The converter casts at every FP32 node's borders, also between two FP32 nodes (FP32 -> FP16 -> FP32: a rounding
nobody asked for) and once per consumer; `fold_casts` then removes those casts (module `fold_casts` says which).
Needs `onnx` and `onnxconverter-common` (no torch): `pip install 'sam2rt[trt]'`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

from ..errors import ExportError

# Comparisons of a float tensor with a constant (the video graphs' object-score test, `score > 0`): kept FP32 so
# that a graph output compared inside the graph and its constant keep one type (keep_io_types leaves outputs FP32).
COMPARISON_OP_TYPES = frozenset({"Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal"})
FP32_OP_TYPES = frozenset({"Cast", "LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Sin", "Cos"})
# For ONNX Runtime's kernels (the onnxruntime-cuda:fp16 graphs) these stay FP16, with no casts around them:
# LayerNormalization computes its mean and variance in the type its `stash_type` names (FP32, the default) whatever
# its input's, so an FP16 LayerNorm still keeps FP32 statistics; Max and Min return one of their inputs, exact in any
# float type (onnxconverter-common blocks them by default). In hiera_tiny's encoder that removes ~135 cast kernels
# over image-sized activations and lets ONNX Runtime fuse Add + LayerNorm. TensorRT graphs keep LayerNorm FP32.
ORT_FP16_OP_TYPES = frozenset({"LayerNormalization", "Max", "Min"})
NORM_OP_TYPES = frozenset({"ReduceMean", "Pow", "Sqrt"})
# Weights beyond this become it (onnxconverter-common clamps at 1e4 by default, which would change a weight FP16 can
# hold exactly); export/fp16_check.py refuses an encoder whose FP16 weights pass it.
FP16_MAX_FINITE = 65504.0
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div"})
# Nodes a MatMul's result may pass through on its way to a softmax / sin / cos and still count as "feeding" it.
PASS_THROUGH = frozenset({"Mul", "Div", "Add", "Sub", "Reshape", "Transpose"})
SENSITIVE_CONSUMERS = frozenset({"Softmax", "Sin", "Cos"})


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ExportError("building FP16 engines needs the `onnx` package: `pip install 'sam2rt[trt]'`") from exc
    return onnx


def _import_float16():
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise ExportError(
            "building FP16 engines needs `onnxconverter-common` to write the mixed-precision graph: "
            "`pip install 'sam2rt[trt]'` (or `pip install onnxconverter-common`)"
        ) from exc
    return float16


def select_fp32_nodes(graph: Any, max_hops: int = 4, fp32_ops: frozenset[str] = FP32_OP_TYPES) -> dict[str, str]:
    """Names of the nodes of an ONNX graph that must stay FP32, each with the reason (`fp32_ops`: the op types kept
    FP32 as such)."""
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    keep: dict[str, str] = {}
    for n in graph.node:
        if n.op_type in fp32_ops:
            keep[n.name] = n.op_type
    for n in graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            frontier, hit = [n], None
            for _ in range(max_hops):
                nxt = []
                for node in frontier:
                    for out in node.output:
                        for c in consumers.get(out, []):
                            if c.op_type in SENSITIVE_CONSUMERS:
                                hit = c.op_type
                            elif c.op_type in PASS_THROUGH:
                                nxt.append(c)
                if hit or not nxt:
                    break
                frontier = nxt
            if hit:
                keep[n.name] = f"{n.op_type} feeding {hit}"
        elif n.op_type in ELEMENTWISE:
            ins = [producer.get(i) for i in n.input]
            outs = [c for o in n.output for c in consumers.get(o, [])]
            near = [p.op_type for p in ins if p is not None and p.op_type in NORM_OP_TYPES]
            near += [c.op_type for c in outs if c.op_type in NORM_OP_TYPES]
            if near:  # the arithmetic of a normalisation (x - mean, var + eps, / sqrt) or of a sqrt'd scale
                keep[n.name] = f"{n.op_type} next to {sorted(set(near))[0]}"
    return keep


def keep_fp32_constants(graph: Any, keep: dict[str, str]) -> None:
    """Add to `keep` the Constant nodes whose every reader stays FP32 (module docstring: their precision)."""
    readers: dict[str, list[str]] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n.name)
    for n in graph.node:
        users = [r for out in n.output for r in readers.get(out, [])]
        if n.op_type == "Constant" and users and all(r in keep for r in users):
            keep.setdefault(n.name, "Constant read by FP32 nodes")


FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto's element types


def _subgraph_names(graph: Any) -> set[str]:
    """Every tensor name a node of a subgraph (an If's or a Loop's body, at any depth) reads or writes."""
    names: set[str] = set()
    for n in graph.node:
        for attr in n.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for m in sub.node:
                    names.update(m.input)
                    names.update(m.output)
                names |= _subgraph_names(sub)
    return names


def _restore_output_types(graph: Any, types: dict[str, int], fp32_nodes: Iterable[str]) -> None:
    """Outputs FP32 in the source graph stay FP32. onnxconverter-common's keep_io_types misses an output made by an FP32
    node: it casts that node's result to FP16 under the output's name, declares the output FP16, and FP32 nodes that
    read the output inside the graph get the FP16 tensor (the tiny stand-in's tracking decoder failed to load that
    way). Such an output gets a cast back to FP32, which its FP32 readers read; its FP16 readers read the FP16 value as
    before (fold_casts then folds the pair)."""
    producer = {out: n for n in graph.node for out in n.output}
    fp32_nodes = set(fp32_nodes)
    for o in graph.output:
        if types.get(o.name) != FLOAT or o.type.tensor_type.elem_type != FLOAT16:
            continue
        inner = f"{o.name}_sam2rt_fp16"
        node = producer[o.name]
        node.output[list(node.output).index(o.name)] = inner
        for n in graph.node:
            if n.name not in fp32_nodes:
                for k, name in enumerate(n.input):
                    if name == o.name:
                        n.input[k] = inner
        cast = onnx_helper().make_node("Cast", [inner], [o.name], name=f"{o.name}_sam2rt_to_fp32", to=FLOAT)
        graph.node.insert(list(graph.node).index(node) + 1, cast)
        vi = graph.value_info.add()
        vi.CopyFrom(o)
        vi.name = inner
        o.type.tensor_type.elem_type = FLOAT


def onnx_helper() -> Any:
    return _import_onnx().helper


def fold_casts(graph: Any) -> int:
    """Remove the casts the FP16 converter leaves that change nothing or only lose precision; returns how many.

    - a Cast to the type its input already has;
    - FP16 -> FP32 -> FP16 (exact both ways): the second cast's readers read the FP16 tensor;
    - FP32 -> FP16 -> FP32 between two FP32 nodes: the readers read the FP32 tensor, as the FP32 nodes were meant to
      (the converter casts at every FP32 node's borders, so a chain of them rounded to FP16 between each two);
    - the same tensor cast to the same type more than once (once per reader): one cast.
    Graph outputs and tensors a subgraph reads keep their names (an Identity where their cast folds away). On ONNX Runtime's CUDA provider each
    cast is a kernel launch over a whole activation: hiera_tiny's FP16 memory encoder had 129 casts around 9 convs.
    """
    types: dict[str, int] = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({i.name: i.data_type for i in graph.initializer})
    outputs = {o.name for o in graph.output}
    frozen = _subgraph_names(graph) | outputs
    producer = {out: n for n in graph.node for out in n.output}
    replaced: dict[str, str] = {}
    first_cast: dict[tuple[str, int], str] = {}

    def resolve(name: str) -> str:
        while name in replaced:
            name = replaced[name]
        return name

    for n in graph.node:
        for k, name in enumerate(n.input):
            if name in replaced:
                n.input[k] = resolve(name)
        if n.op_type != "Cast":
            continue
        to = next(a.i for a in n.attribute if a.name == "to")
        src, out = n.input[0], n.output[0]
        types[out] = to
        same = src if types.get(src) == to else None
        before = producer.get(src)
        if same is None and before is not None and before.op_type == "Cast":
            origin = before.input[0]
            if types.get(origin) == to and {to, types.get(src)} == {FLOAT, FLOAT16}:
                same = origin
        if same is None and (src, to) in first_cast:
            same = first_cast[(src, to)]
        if same is None:
            first_cast[(src, to)] = out
        elif out in frozen:  # the name must stay: an Identity of the same value
            n.op_type = "Identity"
            del n.attribute[:]
            n.input[0] = same
        else:
            replaced[out] = same
    # drop the replaced casts, then every cast nothing reads any more (the first halves of folded pairs)
    kept = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in replaced)]
    while True:
        read = {name for n in kept for name in n.input} | frozen
        dead = [n for n in kept if n.op_type == "Cast" and n.output[0] not in read]
        if not dead:
            break
        kept = [n for n in kept if n not in dead]
    removed = len(graph.node) - len(kept)
    live = {name for n in kept for name in n.output}
    vi = [v for v in graph.value_info if v.name in live]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.value_info[:]
    graph.value_info.extend(vi)
    return removed


def _name_unnamed(graph: Any) -> None:
    for i, n in enumerate(graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}_sam2rt"


def _inline_initializer_aliases(graph: Any) -> int:
    """Replace `Identity(initializer)` aliases (torch's shared weights) by the initializer itself.

    The FP16 converter otherwise converts the alias and the FP32 node reading it disagrees on its type.
    """
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias, kept = {}, []
    for n in graph.node:
        if n.op_type == "Identity" and n.input and n.input[0] in inits and n.output[0] not in outputs:
            alias[n.output[0]] = n.input[0]
        else:
            kept.append(n)
    for n in kept:
        for k, name in enumerate(n.input):
            if name in alias:
                n.input[k] = alias[name]
    del graph.node[:]
    graph.node.extend(kept)
    return len(alias)


def downstream_nodes(graph: Any, tensors: Iterable[str]) -> list[str]:
    """Names of the nodes that read `tensors` or anything computed from them (graph order is topological)."""
    seen, out = set(tensors), []
    for n in graph.node:
        if any(name in seen for name in n.input):
            out.append(n.name)
            seen.update(n.output)
    return out


def convert_to_mixed_fp16(
    src: str | Path, dst: str | Path, extra_fp32: Iterable[str] = (), extra_fp32_ops: Iterable[str] = (),
    ort_kernels: bool = False, fp32_from: Iterable[str] = (),
) -> dict[str, str]:
    """Write `dst`: `src` with FP16 weights and activations except the FP32 nodes; inputs/outputs stay FP32.

    `extra_fp32`: more node names to keep in FP32; `extra_fp32_ops`: more op types (e.g. COMPARISON_OP_TYPES);
    `fp32_from`: tensor names whose every consumer, and all that follows from them, stays FP32 (a merged graph's
    postprocessing after its decoder); `ort_kernels`: the graph is for ONNX Runtime, whose kernels keep
    ORT_FP16_OP_TYPES exact enough in FP16. Returns the FP32 node names with their reasons (what the manifest records).
    """
    onnx = _import_onnx()
    float16 = _import_float16()
    model = onnx.load(str(src))
    graph = model.graph
    _name_unnamed(graph)
    _inline_initializer_aliases(graph)
    keep = select_fp32_nodes(graph, fp32_ops=FP32_OP_TYPES - ORT_FP16_OP_TYPES if ort_kernels else FP32_OP_TYPES)
    for name in extra_fp32:
        keep.setdefault(name, "requested")
    for name in downstream_nodes(graph, fp32_from):
        keep.setdefault(name, "after the FP16 part")
    ops = set(extra_fp32_ops)
    for n in graph.node:
        if n.op_type in ops:
            keep.setdefault(n.name, n.op_type)
    keep_fp32_constants(graph, keep)
    output_types = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    # onnxconverter-common's cast clean-up pass crashes on some graphs (a list where a node is expected): fold_casts
    # below does that work instead.
    original_cleanup = getattr(float16, "remove_unnecessary_cast_node", None)
    if original_cleanup is not None:
        float16.remove_unnecessary_cast_node = lambda graph: None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the float32 number 1e-08 will be truncated to 1e-07", per weight
            converted = float16.convert_float_to_float16(
                model,
                keep_io_types=True,
                max_finite_val=FP16_MAX_FINITE,
                node_block_list=sorted(keep),
                op_block_list=[op for op in float16.DEFAULT_OP_BLOCK_LIST if not (ort_kernels and op in ORT_FP16_OP_TYPES)],
            )
    except Exception as exc:
        raise ExportError(f"could not convert {src} to mixed FP16 ({type(exc).__name__}: {exc})") from exc
    finally:
        if original_cleanup is not None:
            float16.remove_unnecessary_cast_node = original_cleanup
    _restore_output_types(converted.graph, output_types, keep)
    fold_casts(converted.graph)
    onnx.save(converted, str(dst))
    try:
        onnx.checker.check_model(str(dst))
    except Exception as exc:
        raise ExportError(f"the mixed FP16 graph {dst} fails onnx.checker: {exc}") from exc
    return keep


def summarize(keep: dict[str, str]) -> dict[str, int]:
    """Counts of FP32 nodes by reason (for progress output and the manifest)."""
    out: dict[str, int] = {}
    for reason in keep.values():
        out[reason] = out.get(reason, 0) + 1
    return dict(sorted(out.items()))
