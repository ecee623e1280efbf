"""One graph from a prompt to the caller's masks on the GPU: the fast decoder followed by the device postprocessing.

Why: on ONNX Runtime's CUDA provider a click decoded to masks was four ONNX Runtime runs, each ending in a
synchronisation: the fast decoder's CUDA graph, two device copies of its outputs into the postprocessing's fixed
buffers, and the postprocessing's CUDA graph. GPU run 5 found the click's 1.8 ms to be "the decoder run and ONNX
Runtime's per-run cost" (capturing the postprocessing saved nothing: its runs cost what they cost before). The merged
graph is one run, so one CUDA-graph replay: the decoder's logits go into the upsampling without leaving the graph.

Contract of `merge_decode_graph(decoder, multimask)`: inputs are decoder_fast.device.onnx's (decoder_prep's tensors,
then its point_coords and point_labels packed into one input, point_prompts (B,N,3): x, y, label) followed by the postprocessing graph's other inputs (upsampling taps, threshold, and for
the single-mask graph stability_delta / stability_thresh); outputs are the postprocessing graph's (low_res_logits,
scores, upsampled, masks, mask_values); its function is the two graphs run one after the other. The postprocessing
graph is the one the package ships (runtime/graphs/postprocess_{multi,single}.onnx): the manifest records its sha256,
and the runtime uses the merged file only while the package's graph is that one (another sam2rt version may ship
another postprocessing). `make_decode_graph` writes it and checks it against the two graphs on seeded inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError
from .device_graphs import POSTPROCESS_MULTI_GRAPH, POSTPROCESS_SINGLE_GRAPH

DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")
PACKED_PROMPTS = "point_prompts"  # the merged graph's one prompt input: (B,N,3) x, y, label
POST_PREFIX = "postprocess/"  # the postprocessing's nodes and inner tensors, kept apart from the decoder's names
TOLERANCE = 1e-5  # the same arithmetic in one session instead of two
# a merged run's mask may differ from the two graphs' only at pixels this close to the threshold (rounding)
FLIP_MARGIN = 1e-4


def postprocess_graph_path(multimask: bool) -> Path:
    return POSTPROCESS_MULTI_GRAPH if multimask else POSTPROCESS_SINGLE_GRAPH


def postprocess_sha256(multimask: bool) -> str:
    """The sha256 of the package's postprocessing graph (what a merged graph records, and the runtime compares)."""
    from ..runtime.backends.ort_pipeline import graph_sha256

    return graph_sha256(postprocess_graph_path(multimask).stem)


def merge_decode_graph(decoder: str | Path, multimask: bool) -> Any:
    """decoder_fast.device.onnx + the package's postprocessing graph -> one onnx.ModelProto (module docstring)."""
    import onnx
    from onnx import compose

    dec = onnx.load(str(decoder))
    post = onnx.load(str(postprocess_graph_path(multimask)))
    outputs = [o.name for o in dec.graph.output]
    if any(name not in outputs for name in DECODER_OUTPUTS):
        raise ExportError(f"{decoder} is not a decoder graph: its outputs are {outputs}, not {list(DECODER_OUTPUTS)}")
    post_inputs = [i.name for i in post.graph.input]
    clash = sorted({i.name for i in dec.graph.input} & (set(post_inputs) - set(DECODER_OUTPUTS)))
    if clash:
        raise ExportError(f"{decoder} and the postprocessing graph both take inputs named {clash}")
    if dec.ir_version != post.ir_version:  # onnx.compose merges models of one IR version; the ops are opset-bound
        post.ir_version = dec.ir_version
    post = compose.add_prefix(post, POST_PREFIX, rename_inputs=False, rename_outputs=False)
    merged = compose.merge_models(
        dec, post, io_map=[(name, name) for name in DECODER_OUTPUTS],
        inputs=[i.name for i in dec.graph.input] + [n for n in post_inputs if n not in DECODER_OUTPUTS],
        outputs=[o.name for o in post.graph.output],
        name=f"sam2rt_decode_{'multi' if multimask else 'single'}", producer_name="sam2rt")
    _pack_prompt_inputs(merged.graph)
    onnx.checker.check_model(merged)
    return merged


def _pack_prompt_inputs(graph: Any) -> None:
    """Replace the inputs point_coords (B,N,2) and point_labels (B,N) by one, point_prompts (B,N,3) (x, y, label):
    a decode's prompts go up in one host-to-device copy (each copy is a synchronisation), as the two-graph path's
    decoder takes them packed into one buffer."""
    from onnx import TensorProto, helper, numpy_helper

    coords = next(i for i in graph.input if i.name == "point_coords")
    dims = [d.dim_param or d.dim_value for d in coords.type.tensor_type.shape.dim][:2]
    packed = helper.make_tensor_value_info(PACKED_PROMPTS, TensorProto.FLOAT, [*dims, 3])
    inputs = [packed if i.name == "point_coords" else i for i in graph.input if i.name != "point_labels"]
    del graph.input[:]
    graph.input.extend(inputs)
    p = "prompts/"
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), p + n)
                             for n, v in (("zero", [0]), ("two", [2]), ("three", [3]), ("axis2", [2])))
    unpack = [helper.make_node("Slice", [PACKED_PROMPTS, p + "zero", p + "two", p + "axis2"], ["point_coords"], name=p + "coords"),
              helper.make_node("Slice", [PACKED_PROMPTS, p + "two", p + "three", p + "axis2"], [p + "labels3"], name=p + "labels"),
              helper.make_node("Squeeze", [p + "labels3", p + "axis2"], ["point_labels"], name=p + "squeeze")]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(unpack + nodes)



def _check_feeds(session: Any, low: int, multimask: bool, seed: int) -> list[dict[str, np.ndarray]]:
    """Seeded inputs of the merged graph (`low`: the decoder's low-res size): a click, and a batch of two boxes and
    a click, on a landscape and a portrait image."""
    from ..runtime.embedding import PREPARED_NAMES
    from ..runtime.postprocess import _linear_taps
    from ..runtime.prompts import pack_point_prompts

    rng = np.random.default_rng(seed)
    prepared = {i.name: rng.standard_normal([int(d) for d in i.shape]).astype(np.float32)
                for i in session.get_inputs() if i.name in PREPARED_NAMES}
    size = 1024.0
    click = (np.array([[[0.4 * size, 0.55 * size], [0.0, 0.0]]], np.float32), np.array([[1, -1]], np.float32))
    boxes = (np.array([[[0.1, 0.2], [0.7, 0.8], [0.0, 0.0]], [[0.3, 0.1], [0.9, 0.5], [0.0, 0.0]],
                       [[0.6, 0.3], [0.0, 0.0], [0.0, 0.0]]], np.float32) * size,
             np.array([[2, 3, -1], [2, 3, -1], [1, -1, -1]], np.float32))
    feeds = []
    for (coords, labels), (h, w) in ((click, (300, 400)), (boxes, (517, 333))):
        c0, c1, cl = _linear_taps(low, w)
        r0, r1, rl = _linear_taps(low, h)
        feed = {**prepared, "point_coords": coords, "point_labels": labels, PACKED_PROMPTS: pack_point_prompts(coords, labels),
                "c0": c0, "c1": c1, "r0": r0, "r1": r1,
                "cw0_col": (1 - cl)[:, None], "cw1_col": cl[:, None], "rw0": (1 - rl)[:, None], "rw1": rl[:, None],
                "threshold": np.asarray(0.0, np.float32)}
        if not multimask:
            feed.update(stability_delta=np.asarray(0.05, np.float32), stability_thresh=np.asarray(0.98, np.float32))
        feeds.append({k: np.ascontiguousarray(v) for k, v in feed.items()})
    return feeds


def check_decode_graph(decoder: str | Path, merged: str | Path, multimask: bool, seed: int = 0) -> dict[str, float]:
    """The merged graph against the decoder and the postprocessing graph run one after the other, on seeded inputs
    (ExportError where they differ: floats by more than TOLERANCE of their largest magnitude, masks anywhere but
    within FLIP_MARGIN of the threshold); returns the largest difference of each float output."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    dec = ort.InferenceSession(str(decoder), so, providers=["CPUExecutionProvider"])
    post = ort.InferenceSession(str(postprocess_graph_path(multimask)), so, providers=["CPUExecutionProvider"])
    ours = ort.InferenceSession(str(merged), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in ours.get_outputs()]
    low = dec.get_outputs()[0].shape[-1]
    worst: dict[str, float] = {}
    for feeds in _check_feeds(ours, low if isinstance(low, int) else 256, multimask, seed):
        low_res, iou = dec.run(list(DECODER_OUTPUTS), {i.name: feeds[i.name] for i in dec.get_inputs()})
        post_feeds = {i.name: feeds[i.name] for i in post.get_inputs() if i.name not in DECODER_OUTPUTS}
        want = dict(zip(names, post.run(names, {**post_feeds, "low_res_masks": low_res, "iou_predictions": iou})))
        got = dict(zip(names, ours.run(names, {i.name: feeds[i.name] for i in ours.get_inputs()})))
        for name in names:
            if want[name].dtype == np.bool_:
                flipped = got[name] != want[name]
                if np.any(flipped & (np.abs(want["upsampled"]) > FLIP_MARGIN)):
                    raise ExportError(f"the merged decode graph's {name} differ from the decoder + postprocessing's at "
                                      f"{int(flipped.sum())} pixels away from the threshold")
                continue
            diff = float(np.abs(got[name].astype(np.float64) - want[name]).max(initial=0.0))
            scale = max(1.0, float(np.abs(want[name]).max(initial=0.0)))
            if not np.isfinite(diff) or diff > TOLERANCE * scale:
                raise ExportError(f"the merged decode graph's {name} differ from the decoder + postprocessing's by "
                                  f"{diff:.3g} (tolerance {TOLERANCE:g} x {scale:.3g}); it is not usable")
            worst[name] = max(worst.get(name, 0.0), diff)
    return worst


def make_decode_graph(decoder: str | Path, dst: str | Path, multimask: bool, seed: int = 0) -> dict[str, float]:
    """Write the merged graph of `decoder` (decoder_fast.device.onnx) and the package's postprocessing to `dst`, and
    check it (check_decode_graph); returns the check's largest differences."""
    import onnx

    dst = Path(dst)
    onnx.save(merge_decode_graph(decoder, multimask), str(dst))
    try:
        return check_decode_graph(decoder, dst, multimask, seed)
    except Exception:
        dst.unlink(missing_ok=True)
        raise


# An FP16 copy's bounds against its FP32 merged graph (issue 11's, for onnxruntime-cuda:fp16 against CPU FP32): the
# low-res logits' mean difference, the scores' largest, and the share of mask pixels flipped where the FP32 logit's
# magnitude exceeds CONFIDENT_LOGIT (pixels near the threshold may flip with any rounding)
FP16_BOUNDS = {"low_res_logits_mean": 0.05, "scores_max": 0.02, "confident_flipped": 0.01}
CONFIDENT_LOGIT = 0.5


def make_fp16_decode_graph(merged: str | Path, dst: str | Path, multimask: bool, seed: int = 0) -> dict[str, Any]:
    """Write the FP16 copy of a merged decode graph to `dst`: its decoder part in FP16 (export.fp16, ONNX Runtime's
    kernels), everything from the decoder's outputs on (the postprocessing) in FP32, inputs and outputs FP32. Checked
    against the FP32 graph on the seeded inputs of check_decode_graph (on the CPU provider): returns the check's
    figures with `refused` (why the copy must not be used: non-finite outputs or a bound of FP16_BOUNDS passed;
    None when within them) and the FP32 nodes' summary."""
    import onnxruntime as ort

    from .fp16 import COMPARISON_OP_TYPES, convert_to_mixed_fp16, summarize

    keep = convert_to_mixed_fp16(merged, dst, extra_fp32_ops=COMPARISON_OP_TYPES, ort_kernels=True,
                                 fp32_from=DECODER_OUTPUTS)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(str(merged), so, providers=["CPUExecutionProvider"])
    ours = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
    names = ["low_res_logits", "scores", "upsampled", "masks"]
    low = ref.get_outputs()[0].shape[-1]
    diffs: dict[str, list[float]] = {"low_res_logits_mean": [], "low_res_logits_max": [], "scores_max": [],
                                     "confident_flipped": [], "best_token_same": []}
    finite = True
    for feeds in _check_feeds(ref, low if isinstance(low, int) else 256, multimask, seed):
        feeds = {i.name: feeds[i.name] for i in ref.get_inputs()}
        want = dict(zip(names, ref.run(names, feeds)))
        got = dict(zip(names, ours.run(names, feeds)))
        finite &= all(bool(np.isfinite(got[n]).all()) for n in names if got[n].dtype != np.bool_)
        d = np.abs(got["low_res_logits"].astype(np.float64) - want["low_res_logits"])
        diffs["low_res_logits_mean"].append(float(d.mean()))
        diffs["low_res_logits_max"].append(float(d.max()))
        diffs["scores_max"].append(float(np.abs(got["scores"] - want["scores"]).max()))
        confident = np.abs(want["upsampled"]) > CONFIDENT_LOGIT
        diffs["confident_flipped"].append(float(np.count_nonzero((got["masks"] != want["masks"]) & confident))
                                          / max(1, int(np.count_nonzero(confident))))
        diffs["best_token_same"].append(float(np.mean(got["scores"].argmax(1) == want["scores"].argmax(1))))
    check: dict[str, Any] = {k: (min(v) if k == "best_token_same" else max(v)) for k, v in diffs.items()}
    check = {k: round(v, 6) for k, v in check.items()}
    passed = [f"{k} {check[k]:.3g} > {bound:g}" for k, bound in FP16_BOUNDS.items() if not check[k] <= bound]
    check["refused"] = ("non-finite outputs (FP16 overflow)" if not finite
                        else "; ".join(passed) if passed else None)
    check["fp32_summary"] = summarize(keep)
    return check
