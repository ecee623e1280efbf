"""Tiny stand-ins for the video graphs: SAM 2's video graph names, inputs, outputs and manifest, none of its numerics.

`add_tiny_video(manifest)` writes, without torch and in well under a second, the four video graphs and the
constants a VideoTracker loads (`memory_encoder.onnx`, `memory_attention.onnx`, `track_decoder.onnx`,
`mask_downsample.onnx`, `video_constants.npz`, and the tracked frames' `track_decoder.tracking.onnx` edited from
the stand-in's tracking decoder as `sam2rt export` makes it) into a tiny model directory (export.tiny_model), with the
manifest's `video` section and slots as `sam2rt export` records them. Tests of what the tracker does around the
graphs (the CLI, cameras, saving and restoring state) run on it in milliseconds; tests of SAM 2's numerics use a
real export and compare with SAM2VideoPredictor.

Each graph is a small deterministic function of all its inputs, so a mistake in plumbing shows:

- memory_encoder: a seeded 1x1 convolution of image_embed to 64 channels, times the sigmoid of the mask logits
  pooled to 64x64, plus small terms of the object score and the binarize flag;
- memory_attention: image_embed + a 1x1 projection of the mean of the valid memory slots + the mean of the valid
  object pointers, plus small terms of the slots' temporal indices and the pointers' positions (and its compact
  `device` form over the valid slots only, as the export writes one);
- track_decoder: the tiny decoder's blob-and-image-term logits (export.tiny_model) over pix_feat and the
  high-res features, one pointer per token from pix_feat's channel means, and an object score that stays > 0;
- mask_downsample: the mask pooled to 256x256, as logits (x8 - 4).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..manifest import Manifest, sha256_file
from ..model_specs import IMAGE_SIZE, LOW_RES_SIZE
from .optimize import add_tracking_decoder

FEAT = IMAGE_SIZE // 16  # 64: the image_embed grid
HIDDEN, MEM_DIM = 256, 64
SLOTS = {"cond": 1, "recent": 6, "pointers": 16}
# SAM 2.1's video settings (sam2.1_hiera_t.yaml with the video predictor's settings on top), as the export records them
SETTINGS: dict[str, Any] = {
    "num_maskmem": 7, "max_obj_ptrs_in_encoder": 16, "max_cond_frames_in_attn": -1,
    "memory_temporal_stride_for_eval": 1, "use_obj_ptrs_in_encoder": True, "add_tpos_enc_to_obj_ptrs": True,
    "use_signed_tpos_enc_to_obj_ptrs": True, "only_obj_ptrs_in_the_past_for_eval": True,
    "directly_add_no_mem_embed": True, "use_mask_input_as_output_without_sam": True, "multimask_output_in_sam": True,
    "multimask_output_for_tracking": True, "multimask_min_pt_num": 0, "multimask_max_pt_num": 1,
    "use_multimask_token_for_obj_ptr": True, "pred_obj_scores": True, "fixed_no_obj_ptr": True,
    "soft_no_obj_ptr": False, "no_obj_embed_spatial": True, "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05, "dynamic_multimask_stability_thresh": 0.98, "mem_dim": MEM_DIM,
    "hidden_dim": HIDDEN, "binarize_mask_from_pts_for_mem_enc": True, "fill_hole_area": 8, "non_overlap_masks": False,
    "clear_non_cond_mem_around_input": False, "add_all_frames_to_correct_as_cond": False,
}


def _tiny():
    from . import tiny_model

    return tiny_model


def _value(name: str, shape: list, elem: str = "float"):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.INT64 if elem == "int64" else TensorProto.FLOAT, shape)


def build_memory_encoder(rng: np.random.Generator):
    """(image_embed, mask_logits (1,1,256,256), object_score_logits (1,1), binarize (1,)) -> maskmem_features (1,64,64,64)."""
    from onnx import helper

    t = _tiny()
    k = LOW_RES_SIZE // FEAT
    n = helper.make_node
    nodes = [
        n("Conv", ["image_embed", "enc_w", "enc_b"], ["proj"]),
        n("AveragePool", ["mask_logits"], ["mask_pooled"], kernel_shape=[k, k], strides=[k, k]),
        n("Sigmoid", ["mask_pooled"], ["mask_prob"]), n("Mul", ["proj", "mask_prob"], ["masked"]),
        n("Reshape", ["object_score_logits", "shape_1111"], ["score4"]), n("Mul", ["score4", "small"], ["score_term"]),
        n("Reshape", ["binarize", "shape_1111"], ["bin4"]), n("Mul", ["bin4", "tenth"], ["bin_term"]),
        n("Add", ["masked", "score_term"], ["with_score"]), n("Add", ["with_score", "bin_term"], ["maskmem_features"]),
    ]
    inits = [t._const("enc_w", rng.normal(0, 0.2, (MEM_DIM, HIDDEN, 1, 1))), t._const("enc_b", rng.normal(0, 0.1, MEM_DIM)),
             t._i64("shape_1111", [1, 1, 1, 1]), t._const("small", 0.01), t._const("tenth", 0.1)]
    inputs = [_value("image_embed", [1, HIDDEN, FEAT, FEAT]), _value("mask_logits", [1, 1, LOW_RES_SIZE, LOW_RES_SIZE]),
              _value("object_score_logits", [1, 1]), _value("binarize", [1])]
    return t._model(nodes, "sam2rt_tiny_memory_encoder", inputs, [_value("maskmem_features", [1, MEM_DIM, FEAT, FEAT])], inits)


def _valid_mean(n, values: str, valid: str, valid_shape: str, out: str) -> list:
    """Nodes: the mean over axis 0 of `values` weighted by the 0/1 `valid` flags (reshaped to `valid_shape`)."""
    return [
        n("Reshape", [valid, valid_shape], [f"{out}_flags"]), n("Mul", [values, f"{out}_flags"], [f"{out}_masked"]),
        n("ReduceSum", [f"{out}_masked", "axis0"], [f"{out}_sum"], keepdims=1),
        n("ReduceSum", [valid, "axis0"], [f"{out}_count"], keepdims=0), n("Max", [f"{out}_count", "one"], [f"{out}_safe"]),
        n("Div", [f"{out}_sum", f"{out}_safe"], [out]),
    ]


def build_memory_attention(rng: np.random.Generator):
    """The memory attention's seven inputs (static slots, validity flags) -> pix_feat_with_mem (1,256,64,64)."""
    from onnx import helper

    t = _tiny()
    n = helper.make_node
    m, p = SLOTS["cond"] + SLOTS["recent"], SLOTS["pointers"]
    nodes = [
        *_valid_mean(n, "mem_feats", "mem_valid", "shape_m111", "mem_mean"),  # (1,64,64,64)
        n("Conv", ["mem_mean", "attn_w", "attn_b"], ["mem_proj"]), n("Mul", ["mem_proj", "half"], ["mem_term"]),
        *_valid_mean(n, "obj_ptrs", "ptr_valid", "shape_p1", "ptr_mean"),  # (1,256)
        n("Reshape", ["ptr_mean", "shape_1c11"], ["ptr_term"]),
        n("Cast", ["mem_tpos"], ["tpos_f"], to=1), n("Mul", ["tpos_f", "mem_valid"], ["tpos_v"]),
        n("Mul", ["ptr_pos", "ptr_valid"], ["ppos_v"]), n("ReduceSum", ["tpos_v", "axis0"], ["tpos_sum"], keepdims=0),
        n("ReduceSum", ["ppos_v", "axis0"], ["ppos_sum"], keepdims=0), n("Add", ["tpos_sum", "ppos_sum"], ["pos_sum"]),
        n("Mul", ["pos_sum", "small"], ["pos_term"]),
        n("Add", ["image_embed", "mem_term"], ["x1"]), n("Add", ["x1", "ptr_term"], ["x2"]),
        n("Add", ["x2", "pos_term"], ["pix_feat_with_mem"]),
    ]
    inits = [t._const("attn_w", rng.normal(0, 0.2, (HIDDEN, MEM_DIM, 1, 1))), t._const("attn_b", rng.normal(0, 0.1, HIDDEN)),
             t._i64("shape_m111", [m, 1, 1, 1]), t._i64("shape_p1", [p, 1]), t._i64("shape_1c11", [1, HIDDEN, 1, 1]),
             t._i64("axis0", [0]), t._const("one", 1.0), t._const("half", 0.5), t._const("small", 0.01)]
    inputs = [_value("image_embed", [1, HIDDEN, FEAT, FEAT]), _value("mem_feats", [m, MEM_DIM, FEAT, FEAT]),
              _value("mem_tpos", [m], "int64"), _value("mem_valid", [m]), _value("obj_ptrs", [p, HIDDEN]),
              _value("ptr_pos", [p]), _value("ptr_valid", [p])]
    return t._model(nodes, "sam2rt_tiny_memory_attention", inputs, [_value("pix_feat_with_mem", [1, HIDDEN, FEAT, FEAT])], inits)


def build_compact_memory_attention(base) -> Any:
    """The compact form of `build_memory_attention`'s function (graph_table's `device` row): only the valid slots and
    pointers, in dynamic numbers, no validity flags; the same weights (read from `base`)."""
    from onnx import helper

    t = _tiny()
    n = helper.make_node
    nodes = []
    for values, out in (("mem_feats", "mem_mean"), ("obj_ptrs", "ptr_mean")):
        nodes += [n("ReduceSum", [values, "axis0"], [f"{out}_sum"], keepdims=1), n("Shape", [values], [f"{out}_shape"]),
                  n("Gather", [f"{out}_shape", "zero"], [f"{out}_n"], axis=0), n("Cast", [f"{out}_n"], [f"{out}_count"], to=1),
                  n("Max", [f"{out}_count", "one"], [f"{out}_safe"]), n("Div", [f"{out}_sum", f"{out}_safe"], [out])]
    nodes += [
        n("Conv", ["mem_mean", "attn_w", "attn_b"], ["mem_proj"]), n("Mul", ["mem_proj", "half"], ["mem_term"]),
        n("Reshape", ["ptr_mean", "shape_1c11"], ["ptr_term"]),
        n("Cast", ["mem_tpos"], ["tpos_f"], to=1), n("ReduceSum", ["tpos_f", "axis0"], ["tpos_sum"], keepdims=0),
        n("ReduceSum", ["ptr_pos", "axis0"], ["ppos_sum"], keepdims=0), n("Add", ["tpos_sum", "ppos_sum"], ["pos_sum"]),
        n("Mul", ["pos_sum", "small"], ["pos_term"]),
        n("Add", ["image_embed", "mem_term"], ["x1"]), n("Add", ["x1", "ptr_term"], ["x2"]),
        n("Add", ["x2", "pos_term"], ["pix_feat_with_mem"]),
    ]
    weights = {i.name: i for i in base.graph.initializer}
    inits = [weights[k] for k in ("attn_w", "attn_b", "shape_1c11", "axis0", "one", "half", "small")] + [t._i64("zero", 0)]
    inputs = [_value("image_embed", [1, HIDDEN, FEAT, FEAT]), _value("mem_feats", ["slots", MEM_DIM, FEAT, FEAT]),
              _value("mem_tpos", ["slots"], "int64"), _value("obj_ptrs", ["pointers", HIDDEN]), _value("ptr_pos", ["pointers"])]
    return t._model(nodes, "sam2rt_tiny_memory_attention_compact", inputs,
                    [_value("pix_feat_with_mem", [1, HIDDEN, FEAT, FEAT])], inits)


def build_track_decoder():
    """The tracking decoder's inputs -> low_res_masks (1,4,256,256), iou_predictions (1,4), obj_ptr (1,4,256),
    object_score_logits (1,1)."""
    from onnx import helper

    t = _tiny()
    n = helper.make_node
    nodes = t._image_term_nodes("image_term", {"image_embed": "pix_feat"})
    prompt_nodes, prompt_inits = t._prompt_nodes("image_term", with_mask=True)
    nodes += prompt_nodes + [
        n("ReduceMean", ["pix_feat"], ["pix_mean"], axes=[2, 3], keepdims=0),  # (1,256)
        n("Unsqueeze", ["pix_mean", "axis1"], ["pix_mean3"]), n("Add", ["pix_mean3", "token_offsets"], ["obj_ptr"]),
        n("ReduceMean", ["pix_feat"], ["pix_all"], axes=[1, 2, 3], keepdims=0), n("Mul", ["pix_all", "score_gain"], ["s0"]),
        n("Add", ["s0", "score_bias"], ["s1"]), n("Reshape", ["s1", "shape_11"], ["object_score_logits"]),
    ]
    inits = t._image_term_inits() + prompt_inits + [
        t._const("token_offsets", np.arange(4, dtype=np.float32).reshape(1, 4, 1) * 0.1),
        t._const("score_gain", 0.01), t._const("score_bias", 2.0), t._i64("shape_11", [1, 1]),
    ]
    inputs = [_value("pix_feat", [1, HIDDEN, FEAT, FEAT]), _value("high_res_feats_0", [1, 32, 256, 256]),
              _value("high_res_feats_1", [1, 64, 128, 128]), _value("point_coords", [1, "num_points", 2]),
              _value("point_labels", [1, "num_points"]), _value("mask_input", [1, 1, LOW_RES_SIZE, LOW_RES_SIZE]),
              _value("has_mask_input", [1])]
    outputs = [_value("low_res_masks", [1, 4, LOW_RES_SIZE, LOW_RES_SIZE]), _value("iou_predictions", [1, 4]),
               _value("obj_ptr", [1, 4, HIDDEN]), _value("object_score_logits", [1, 1])]
    return t._model(nodes, "sam2rt_tiny_track_decoder", inputs, outputs, inits)


def build_mask_downsample():
    """mask (1,1,1024,1024) -> mask_input (1,1,256,256)."""
    from onnx import helper

    t = _tiny()
    k = IMAGE_SIZE // LOW_RES_SIZE
    n = helper.make_node
    nodes = [n("AveragePool", ["mask"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
             n("Mul", ["pooled", "gain"], ["scaled"]), n("Sub", ["scaled", "offset"], ["mask_input"])]
    inits = [t._const("gain", 8.0), t._const("offset", 4.0)]
    return t._model(nodes, "sam2rt_tiny_mask_downsample", [_value("mask", [1, 1, IMAGE_SIZE, IMAGE_SIZE])],
                    [_value("mask_input", [1, 1, LOW_RES_SIZE, LOW_RES_SIZE])], inits)


def _io_spec(model) -> dict[str, list[dict]]:
    from onnx import TensorProto

    def one(v) -> dict:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        dtype = "tensor(int64)" if v.type.tensor_type.elem_type == TensorProto.INT64 else "tensor(float)"
        return {"name": v.name, "shape": dims, "dtype": dtype}

    return {"inputs": [one(v) for v in model.graph.input], "outputs": [one(v) for v in model.graph.output]}


def add_tiny_video(manifest: Manifest, seed: int = 0) -> Manifest:
    """Write the tiny video graphs and constants into a tiny model directory and record them; returns the manifest."""
    rng = np.random.default_rng(seed + 1)
    out = manifest.directory
    graphs = {
        "memory_encoder": build_memory_encoder(rng), "memory_attention": build_memory_attention(rng),
        "track_decoder": build_track_decoder(), "mask_downsample": build_mask_downsample(),
    }
    entries: dict[str, dict[str, Any]] = {}
    for role, model in graphs.items():
        path = out / f"{role}.onnx"
        path.write_bytes(model.SerializeToString())
        entries[role] = {"file": path.name, "sha256": sha256_file(path), "precision": "fp32", **_io_spec(model)}
    entries["memory_attention"]["slots"] = {**SLOTS, "use": "tiny stand-in: the export's slot layout"}
    compact = build_compact_memory_attention(graphs["memory_attention"])
    path = out / "memory_attention.device.onnx"
    path.write_bytes(compact.SerializeToString())
    entries["memory_attention"]["variants"] = {"device": {
        "file": path.name, "sha256": sha256_file(path), "precision": "fp32",
        "derived_from_sha256": entries["memory_attention"]["sha256"], "use": "tiny stand-in: the compact form",
        **_io_spec(compact)}}
    constants = out / "video_constants.npz"
    with open(constants, "wb") as f:
        np.savez(f, no_mem_embed=rng.normal(0, 0.1, HIDDEN).astype(np.float32),
                 no_obj_ptr=rng.normal(0, 0.1, HIDDEN).astype(np.float32))
    entries["video_constants"] = {"file": constants.name, "sha256": sha256_file(constants),
                                  "use": "no_mem_embed and no_obj_ptr (float32), for mask prompts"}
    manifest.data["graphs"].update(entries)
    manifest.data["video"] = dict(SETTINGS)
    add_tracking_decoder(manifest)  # track_decoder.tracking.onnx, edited from the stand-in as from a real export
    manifest.save()
    return manifest
