"""The tracking decoder of a tracked frame, made from `track_decoder.onnx` by editing the graph (no torch).

Why: on every tracked frame the tracker runs the tracking decoder without a prompt (the prompt encoder's two padding
points, no mask input) and then chooses one token on the host. Through the general graph that means the mask-input
branch's three convolutions computed on a zero mask and thrown away (`has_mask_input = 0`), a 256x256 zero mask
uploaded and four 256x256 masks brought down every frame, and on a GPU one synchronisation more. The tracking form
takes only what changes from frame to frame:

    inputs:  pix_feat (1,C,64,64), high_res_feats_0, high_res_feats_1
    outputs: mask_logits (1,1,256,256): the chosen token's low-res logits (NO_OBJ_SCORE where the object is absent),
             pointer (1,C): the chosen token's object pointer, object_score_logits (1,1)

Contract: its outputs are what `track_decoder.onnx` with NO_POINTS_COORDS / NO_POINTS_LABELS and no mask input, then
`runtime.video.heads.select_track_output` with the tracking frames' multimask setting (`use_multimask(settings, False,
0)`), give: the prompt inputs become constants, the token choice becomes graph nodes (ArgMax over the multimask
tokens' IoU; or the single-mask token, replaced by the best multimask token where it is unstable), and ONNX Runtime's
basic (provider-independent) optimisations fold everything that depends on the constants alone: the mask branch, the
point embeddings. `make_tracking_decoder` checks the result against the source graph before it returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError
from ..runtime.video.heads import NO_POINTS_COORDS, NO_POINTS_LABELS, select_track_output, use_multimask
from .parity import check_close

TRACKING_INPUTS = ("pix_feat", "high_res_feats_0", "high_res_feats_1")
TRACKING_OUTPUTS = ("mask_logits", "pointer", "object_score_logits")
# the source graph's prompt inputs, each fixed to what a tracked frame gives (mask_input: zeros, as the tracker feeds)
PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input")
TOLERANCE = 1e-4  # relative to the largest magnitude: the same arithmetic, folded
# ONNX Runtime fusions left out of the offline folding and, on the CPU provider, at load (the manifest records them as
# the entry's `ort_disabled_optimizers`, as decoder_fast's): with this graph's static shapes ONNX Runtime fuses MatMul +
# Add into Gemm (with Reshapes) and the residual Add + LayerNorm into SkipLayerNormalization, and on the CPU both are
# slower than the ops they replace (hiera_tiny on the 2-core box: 52.1 ms a run with them, 46.1 without, the full
# track_decoder.onnx 48.4; benchmarks/README.md). GPU providers fuse as they choose at load.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion", "MatMulAddFusion")


def _constant_inputs(low: int) -> dict[str, np.ndarray]:
    return {"point_coords": NO_POINTS_COORDS, "point_labels": NO_POINTS_LABELS,
            "mask_input": np.zeros((1, 1, low, low), np.float32), "has_mask_input": np.zeros(1, np.float32)}


def _selection_nodes(settings: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Nodes (and their constants) from low_res_masks / iou_predictions / obj_ptr to mask_logits / pointer."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: Any, dtype: Any = np.int64) -> Any:
        return numpy_helper.from_array(np.asarray(value, dtype), f"/tracking/{name}")

    n = helper.make_node
    p = "/tracking/"
    inits = [const("one", [1]), const("four", [4]), const("axis1", [1]), const("zero_index", [0]),
             const("ptr_shape", [1, -1]), const("mask_axes", [2, 3])]
    nodes = [  # best multimask token: 1 + argmax of the IoU of tokens 1..3 (first of equal maxima, as numpy)
        n("Slice", ["iou_predictions", f"{p}one", f"{p}four", f"{p}axis1"], [f"{p}iou_multi"], name=f"{p}SliceIoU"),
        n("ArgMax", [f"{p}iou_multi"], [f"{p}argmax"], axis=1, keepdims=0, name=f"{p}ArgMax"),
        n("Add", [f"{p}argmax", f"{p}one"], [f"{p}best"], name=f"{p}AddOne"),
    ]
    if use_multimask(settings, False, 0):
        mask_token = f"{p}best"
        ptr_token = f"{p}best" if settings["use_multimask_token_for_obj_ptr"] else f"{p}zero_index"
    elif settings["dynamic_multimask_via_stability"]:  # the single-mask token unless unstable (postprocess.select_masks)
        delta = float(settings["dynamic_multimask_stability_delta"])
        thresh = float(settings["dynamic_multimask_stability_thresh"])
        inits += [const("delta", delta, np.float32), const("neg_delta", -delta, np.float32),
                  const("thresh", thresh, np.float32), const("fzero", 0.0, np.float32),
                  const("fone", 1.0, np.float32), const("zero", [0])]
        nodes += [
            n("Gather", ["low_res_masks", f"{p}zero_index"], [f"{p}single"], axis=1, name=f"{p}GatherSingle"),
            n("Greater", [f"{p}single", f"{p}delta"], [f"{p}above"], name=f"{p}GreaterDelta"),
            n("Greater", [f"{p}single", f"{p}neg_delta"], [f"{p}above_neg"], name=f"{p}GreaterNegDelta"),
            n("Cast", [f"{p}above"], [f"{p}above_f"], to=TensorProto.FLOAT, name=f"{p}CastAbove"),
            n("Cast", [f"{p}above_neg"], [f"{p}above_neg_f"], to=TensorProto.FLOAT, name=f"{p}CastAboveNeg"),
            n("ReduceSum", [f"{p}above_f", f"{p}mask_axes"], [f"{p}area_i"], keepdims=0, name=f"{p}AreaI"),
            n("ReduceSum", [f"{p}above_neg_f", f"{p}mask_axes"], [f"{p}area_u"], keepdims=0, name=f"{p}AreaU"),
            n("Max", [f"{p}area_u", f"{p}fone"], [f"{p}area_u1"], name=f"{p}MaxOne"),
            n("Div", [f"{p}area_i", f"{p}area_u1"], [f"{p}ratio"], name=f"{p}Ratio"),
            n("Greater", [f"{p}area_u", f"{p}fzero"], [f"{p}nonempty"], name=f"{p}NonEmpty"),
            n("Where", [f"{p}nonempty", f"{p}ratio", f"{p}fone"], [f"{p}stability"], name=f"{p}Stability"),
            n("GreaterOrEqual", [f"{p}stability", f"{p}thresh"], [f"{p}stable"], name=f"{p}Stable"),
            n("Reshape", [f"{p}stable", f"{p}one"], [f"{p}stable1"], name=f"{p}ReshapeStable"),
            n("Where", [f"{p}stable1", f"{p}zero", f"{p}best"], [f"{p}pick"], name=f"{p}Pick"),
        ]
        mask_token, ptr_token = f"{p}pick", f"{p}zero_index"  # the pointer stays the single-mask token's
    else:
        mask_token = ptr_token = f"{p}zero_index"
        nodes = []  # no multimask token is read
    nodes += [
        n("Gather", ["low_res_masks", mask_token], ["mask_logits"], axis=1, name=f"{p}GatherMask"),
        n("Gather", ["obj_ptr", ptr_token], [f"{p}ptr_token"], axis=1, name=f"{p}GatherPointer"),
        n("Reshape", [f"{p}ptr_token", f"{p}ptr_shape"], ["pointer"], name=f"{p}ReshapePointer"),
    ]
    return nodes, inits


def tracking_graph(source: str | Path, settings: dict[str, Any]) -> Any:
    """The edited graph (an onnx.ModelProto), before folding: prompt inputs as constants, the token choice added."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    names = [i.name for i in graph.input]
    missing = [name for name in (*TRACKING_INPUTS, *PROMPT_INPUTS) if name not in names]
    if missing:
        raise ExportError(f"{source} is not a tracking decoder graph: it has no input {', '.join(missing)}")
    low = next(o for o in graph.output if o.name == "low_res_masks").type.tensor_type.shape.dim[-1].dim_value
    hidden = next(o for o in graph.output if o.name == "obj_ptr").type.tensor_type.shape.dim[-1].dim_value
    kept = [i for i in graph.input if i.name not in PROMPT_INPUTS]
    del graph.input[:]
    graph.input.extend(kept)
    for name, value in _constant_inputs(low or 256).items():
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    nodes, inits = _selection_nodes(settings)
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    score = next(o for o in graph.output if o.name == "object_score_logits")
    outputs = [helper.make_tensor_value_info("mask_logits", onnx.TensorProto.FLOAT, [1, 1, low or 256, low or 256]),
               helper.make_tensor_value_info("pointer", onnx.TensorProto.FLOAT, [1, hidden or "hidden"]), score]
    del graph.output[:]
    graph.output.extend(outputs)
    return model


def make_tracking_decoder(source: str | Path, dst: str | Path, settings: dict[str, Any], seed: int = 0) -> dict[str, float]:
    """Write the tracking form of `source` (track_decoder.onnx) to `dst`, folded, and check it against `source` and
    the host's token choice on seeded inputs (ExportError if they differ); returns the largest differences."""
    import onnx
    import onnxruntime as ort

    dst = Path(dst)
    edited = dst.with_name(dst.name + ".edited.onnx")
    onnx.save(tracking_graph(source, settings), str(edited))
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # constant folding; no device kernels
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        ort.InferenceSession(str(edited), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))
    finally:
        edited.unlink(missing_ok=True)
    try:
        onnx.checker.check_model(str(dst), full_check=True)
    except Exception as exc:
        raise ExportError(f"{dst} fails onnx.checker: {exc}") from exc
    return check_tracking_decoder(source, dst, settings, seed)


def check_tracking_decoder(source: str | Path, tracking: str | Path, settings: dict[str, Any], seed: int = 0) -> dict[str, float]:
    """The tracking form against the source graph + `select_track_output` on seeded features (ExportError if not equal
    within TOLERANCE); returns the largest absolute difference of each output."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = ort.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])
    ours = ort.InferenceSession(str(tracking), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
             for i in ours.get_inputs()}
    low = int(src.get_outputs()[0].shape[-1]) if isinstance(src.get_outputs()[0].shape[-1], int) else 256
    lr, iou, ptrs, score = src.run(None, {**feeds, **_constant_inputs(low)})
    mask, ptr = select_track_output(settings, lr, iou, ptrs, use_multimask(settings, False, 0))
    got = dict(zip([o.name for o in ours.get_outputs()], ours.run(None, feeds)))
    return {
        "mask_logits": check_close("tracking decoder mask_logits", got["mask_logits"], mask[None, None], TOLERANCE),
        "pointer": check_close("tracking decoder pointer", got["pointer"], ptr[None], TOLERANCE),
        "object_score_logits": check_close("tracking decoder object score", got["object_score_logits"], score, TOLERANCE),
    }


def io_spec(path: str | Path) -> dict[str, list[dict]]:
    """The graph's inputs and outputs as the manifest records them (name, shape with symbolic names, dtype)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def one(v) -> dict:
        return {"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in v.shape], "dtype": v.type}

    return {"inputs": [one(v) for v in session.get_inputs()], "outputs": [one(v) for v in session.get_outputs()]}
