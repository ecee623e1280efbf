"""A tiny stand-in model directory for tests: SAM 2's graph names, inputs, outputs and manifest, none of its numerics.

`build_tiny_model_dir(DIR)` writes, in well under a second and without torch, a model directory that the
runtime loads like a real export: `encoder.onnx`, `decoder.onnx` and the CPU backend's decoder variants
(`nomask`, `prep` + `fast`, and `fast_device`, the same tiny graph), each with SAM 2's input and output names and shapes, and a `manifest.json`
in the export's format with every file's sha256 (with `video=True` also the video graphs a VideoTracker
loads: export/tiny_video.py). Tests of what the runtime does around the graphs
(prompt checks, batching, graph choice, errors, the CLI, the server) run on it in milliseconds; tests
of SAM 2's numerics use a real export (tests/conftest.py).

The graphs compute small, deterministic functions of all their inputs, so a mistake in plumbing shows:

- encoder: average pooling of the normalised image to 64, 256 and 128 pixels, then a seeded 1x1
  convolution to 256, 32 and 64 channels;
- decoder: for each prompt a round blob (logits clipped to +-8) of four radii (one per mask token) centred on the mean of its
  points with labels 1, 2, 3 (in the 256x256 low-res frame), plus an image term (the channel means of
  the three features, upsampled to 256x256), plus `mask_input * has_mask_input`; the predicted IoU is
  a sigmoid of each token's mean logit, lowered by each negative (label 0) point;
- nomask: the decoder with `has_mask_input = 0`; prep + fast: the image term once per image
  (`prep_keys0`), then the nomask decoder on it, one prompt per run (its GPU form `decoder_fast.device.onnx`: any
  number per run, as the real export's);
- with `optimize` (the default), ONNX Runtime's optimised copies `*.opt.onnx`, recorded as the export records them.

The manifest says `random: true` and `synthetic: true`: its masks mean nothing. Regenerate a directory
with `python -m sam2rt.export.tiny_model DIR`.
"""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path

import numpy as np

from ..manifest import DECODER_FILE, ENCODER_FILE, FORMAT_VERSION, Manifest, sha256_file
from ..model_specs import IMAGE_SIZE, LOW_RES_SIZE, MASK_THRESHOLD, PIXEL_MEAN, PIXEL_STD
from ..runtime.embedding import FAST_MAX_POINTS, FEATURE_NAMES, PREPARED_NAMES, PROMPTS_PER_RUN_ANY

OPSET = 17
RADII = (30.0, 15.0, 30.0, 60.0)  # per mask token: single, multi_1..3 (low-res pixels)
IOU_BIAS = (0.0, 0.3, -0.2, 0.1)
FEATURES = {"image_embed": (256, 64), "high_res_feats_0": (32, 256), "high_res_feats_1": (64, 128)}
PREPARED_SHAPES = {name: [1, 1, LOW_RES_SIZE, LOW_RES_SIZE] if name == "prep_keys0" else [1] for name in PREPARED_NAMES}
DECODER_INPUTS = [*FEATURE_NAMES, "point_coords", "point_labels", "mask_input", "has_mask_input"]
DECODER_OUTPUTS = ["low_res_masks", "iou_predictions"]


def _helpers():
    from onnx import TensorProto, helper, numpy_helper

    return TensorProto, helper, numpy_helper


def _model(nodes, name, inputs, outputs, initializers):
    import onnx

    _, helper, _ = _helpers()
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, initializer=initializers),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sam2rt-tiny")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _const(name: str, value) -> object:
    _, _, numpy_helper = _helpers()
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def build_encoder(seed: int = 0):
    """image (1,3,1024,1024) -> image_embed (1,256,64,64), high_res_feats_0 (1,32,256,256), high_res_feats_1 (1,64,128,128)."""
    TensorProto, helper, _ = _helpers()
    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    for name, (channels, size) in FEATURES.items():
        k = IMAGE_SIZE // size
        nodes.append(helper.make_node("AveragePool", ["image"], [f"{name}_pooled"], kernel_shape=[k, k], strides=[k, k]))
        inits += [_const(f"{name}_w", rng.normal(0, 0.5, (channels, 3, 1, 1))), _const(f"{name}_b", rng.normal(0, 0.1, channels))]
        nodes.append(helper.make_node("Conv", [f"{name}_pooled", f"{name}_w", f"{name}_b"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, channels, size, size]))
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, IMAGE_SIZE, IMAGE_SIZE])]
    return _model(nodes, "sam2rt_tiny_encoder", inputs, outputs, inits)


def _image_term_nodes(out: str, sources: dict[str, str] | None = None) -> list:
    """The three features' channel means, upsampled (nearest) to 256x256 and summed: (1,1,256,256).

    `sources` renames inputs (the tracking decoder reads `pix_feat` where the decoder reads `image_embed`)."""
    _, helper, _ = _helpers()
    nodes, parts = [], []
    for name in FEATURES:
        source = (sources or {}).get(name, name)
        nodes.append(helper.make_node("ReduceMean", [source], [f"{name}_mean"], axes=[1], keepdims=1))
        nodes.append(helper.make_node("Resize", [f"{name}_mean", "", f"{name}_scales"], [f"{name}_up"], mode="nearest"))
        parts.append(f"{name}_up")
    nodes.append(helper.make_node("Sum", parts, [out]))
    return nodes


def _image_term_inits() -> list:
    return [_const(f"{name}_scales", [1, 1, LOW_RES_SIZE / size, LOW_RES_SIZE / size]) for name, (_, size) in FEATURES.items()]


def _prompt_nodes(image_term: str, with_mask: bool) -> tuple[list, list]:
    """Nodes computing low_res_masks and iou_predictions from point_coords, point_labels and the image term."""
    _, helper, _ = _helpers()
    n = helper.make_node
    grid = (np.arange(LOW_RES_SIZE, dtype=np.float32) + 0.5)
    inits = [
        _const("half", 0.5), _const("eps", 1e-6), _const("to_low_res", LOW_RES_SIZE / IMAGE_SIZE),
        _const("grid_x", grid.reshape(1, 1, 1, -1)), _const("grid_y", grid.reshape(1, 1, -1, 1)),
        _const("inv_r2", 1.0 / np.square(np.array(RADII, np.float32)).reshape(1, 4, 1, 1)),
        _const("blob_gain", 8.0), _const("blob_min", -8.0), _const("one", 1.0), _const("image_gain", 4.0), _const("iou_gain", 0.3),
        _const("iou_bias", np.array(IOU_BIAS, np.float32).reshape(1, 4)), _const("neg_gain", 0.3),
        _const("zero", 0.0),
    ]
    nodes = [
        # weights of the points that place the blob: labels 1, 2, 3 (foreground, box corners)
        n("Greater", ["point_labels", "half"], ["is_pos"]), n("Cast", ["is_pos"], ["w"], to=1),
        n("Unsqueeze", ["w", "axis2"], ["w3"]),
        n("Mul", ["point_coords", "w3"], ["wxy"]), n("ReduceSum", ["wxy", "axis1"], ["sum_xy"], keepdims=0),
        n("ReduceSum", ["w", "axis1"], ["sum_w"], keepdims=1), n("Max", ["sum_w", "eps"], ["sum_w_safe"]),
        n("Div", ["sum_xy", "sum_w_safe"], ["centre"]), n("Mul", ["centre", "to_low_res"], ["centre_lr"]),  # (B,2)
        n("Split", ["centre_lr", "split2"], ["cx", "cy"], axis=1),
        n("Unsqueeze", ["cx", "axes23"], ["cx4"]), n("Unsqueeze", ["cy", "axes23"], ["cy4"]),  # (B,1,1,1)
        n("Sub", ["grid_x", "cx4"], ["dx"]), n("Sub", ["grid_y", "cy4"], ["dy"]),
        n("Mul", ["dx", "dx"], ["dx2"]), n("Mul", ["dy", "dy"], ["dy2"]), n("Add", ["dx2", "dy2"], ["d2"]),  # (B,1,256,256)
        n("Mul", ["d2", "inv_r2"], ["d2r"]), n("Sub", ["one", "d2r"], ["blob0"]), n("Mul", ["blob0", "blob_gain"], ["blob1"]),
        n("Clip", ["blob1", "blob_min", "blob_gain"], ["blob"]),
        n("Mul", [image_term, "image_gain"], ["image_part"]), n("Add", ["blob", "image_part"], ["logits0"]),
    ]
    inits += [_i64("axis1", [1]), _i64("axis2", [2]), _i64("axes23", [2, 3]), _i64("split2", [1, 1])]
    if with_mask:
        nodes += [n("Unsqueeze", ["has_mask_input", "axes123"], ["has4"]), n("Mul", ["mask_input", "has4"], ["mask_part"]),
                  n("Add", ["logits0", "mask_part"], ["low_res_masks"])]
        inits.append(_i64("axes123", [1, 2, 3]))
    else:
        nodes.append(n("Identity", ["logits0"], ["low_res_masks"]))
    nodes += [
        n("ReduceMean", ["low_res_masks"], ["mean_logit"], axes=[2, 3], keepdims=0),  # (B,4)
        n("Equal", ["point_labels", "zero"], ["is_neg"]), n("Cast", ["is_neg"], ["neg"], to=1),
        n("ReduceSum", ["neg", "axis1"], ["n_neg"], keepdims=1), n("Mul", ["n_neg", "neg_gain"], ["neg_part"]),
        n("Mul", ["mean_logit", "iou_gain"], ["iou_a"]), n("Add", ["iou_a", "iou_bias"], ["iou_b"]),
        n("Sub", ["iou_b", "neg_part"], ["iou_c"]), n("Sigmoid", ["iou_c"], ["iou_predictions"]),
    ]
    return nodes, inits


def _i64(name: str, value) -> object:
    _, _, numpy_helper = _helpers()
    return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)


def _feature_inputs() -> list:
    TensorProto, helper, _ = _helpers()
    return [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, c, s, s]) for name, (c, s) in FEATURES.items()]


def _prompt_inputs(batch="num_prompts") -> list:
    TensorProto, helper, _ = _helpers()
    return [helper.make_tensor_value_info("point_coords", TensorProto.FLOAT, [batch, "num_points", 2]),
            helper.make_tensor_value_info("point_labels", TensorProto.FLOAT, [batch, "num_points"])]


def _decoder_outputs(batch="num_prompts") -> list:
    TensorProto, helper, _ = _helpers()
    return [helper.make_tensor_value_info("low_res_masks", TensorProto.FLOAT, [batch, 4, LOW_RES_SIZE, LOW_RES_SIZE]),
            helper.make_tensor_value_info("iou_predictions", TensorProto.FLOAT, [batch, 4])]


def build_decoder(with_mask: bool = True):
    """decoder.onnx (with_mask) or decoder_nomask.onnx: SAM 2's decoder inputs -> low_res_masks (B,4,256,256), iou_predictions (B,4)."""
    TensorProto, helper, _ = _helpers()
    nodes, inits = _image_term_nodes("image_term"), _image_term_inits()
    more_nodes, more_inits = _prompt_nodes("image_term", with_mask)
    inputs = _feature_inputs() + _prompt_inputs()
    if with_mask:
        inputs += [helper.make_tensor_value_info("mask_input", TensorProto.FLOAT, ["num_prompts", 1, LOW_RES_SIZE, LOW_RES_SIZE]),
                   helper.make_tensor_value_info("has_mask_input", TensorProto.FLOAT, ["num_prompts"])]
    name = "sam2rt_tiny_decoder" if with_mask else "sam2rt_tiny_decoder_nomask"
    return _model(nodes + more_nodes, name, inputs, _decoder_outputs(), inits + more_inits)


def build_prep():
    """decoder_prep.onnx: the three features -> PREPARED_NAMES (the image term as prep_keys0, the rest placeholders)."""
    TensorProto, helper, _ = _helpers()
    nodes, inits = _image_term_nodes("prep_keys0"), _image_term_inits()
    outputs = [helper.make_tensor_value_info("prep_keys0", TensorProto.FLOAT, PREPARED_SHAPES["prep_keys0"])]
    for name in PREPARED_NAMES[1:]:
        nodes.append(helper.make_node("ReduceMean", ["image_embed"], [f"{name}_scalar"], axes=[0, 1, 2, 3], keepdims=0))
        nodes.append(helper.make_node("Reshape", [f"{name}_scalar", "shape1"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, PREPARED_SHAPES[name]))
    inits.append(_i64("shape1", [1]))
    return _model(nodes, "sam2rt_tiny_decoder_prep", _feature_inputs(), outputs, inits)


def build_fast(batch: int | str = 1):
    """decoder_fast.onnx (batch 1) or its GPU form (batch "num_prompts", any number per run): PREPARED_NAMES +
    prompts -> the nomask decoder's outputs."""
    TensorProto, helper, _ = _helpers()
    nodes, inits = _prompt_nodes("prep_keys0", with_mask=False)
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in PREPARED_SHAPES.items()]
    return _model(nodes, "sam2rt_tiny_decoder_fast", inputs + _prompt_inputs(batch), _decoder_outputs(batch), inits)


def _io_spec(model) -> dict[str, list[dict]]:
    def one(v) -> dict:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "shape": dims, "dtype": "tensor(float)"}

    return {"inputs": [one(v) for v in model.graph.input], "outputs": [one(v) for v in model.graph.output]}


def build_tiny_model_dir(
    out_dir: str | Path, seed: int = 0, variants: bool = True, optimize: bool = True, video: bool = False
) -> Manifest:
    """Write the tiny stand-in model directory (see the module docstring) to out_dir; return its manifest.

    `variants=False` writes only encoder.onnx and decoder.onnx (the plain graphs the GPU backends run);
    `optimize` adds ONNX Runtime's optimised copies as the export does (sam2rt.export.optimize); `video` adds
    tiny video graphs (export.tiny_video), so that a VideoTracker loads the directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graphs = {ENCODER_FILE: build_encoder(seed), DECODER_FILE: build_decoder(with_mask=True)}
    if variants:
        graphs.update({"decoder_nomask.onnx": build_decoder(with_mask=False), "decoder_prep.onnx": build_prep(),
                       "decoder_fast.onnx": build_fast(), "decoder_fast.device.onnx": build_fast("num_prompts")})
    for name, model in graphs.items():
        (out / name).write_bytes(model.SerializeToString())
    sha = {name: sha256_file(out / name) for name in graphs}

    def entry(name: str, **extra) -> dict:
        return {"file": name, "sha256": sha[name], **extra, **_io_spec(graphs[name])}

    decoder = entry(DECODER_FILE)
    if variants:
        derived = {"precision": "fp32", "derived_from_sha256": sha[DECODER_FILE]}
        decoder["variants"] = {
            "nomask": entry("decoder_nomask.onnx", **derived, use="prompts without mask_input"),
            "prep": entry("decoder_prep.onnx", **derived, use="once per image: the per-image part of decoder_fast"),
            "fast": entry("decoder_fast.onnx", **derived, max_points=FAST_MAX_POINTS, prompts_per_run=1,
                          ort_disabled_optimizers=[], use="prompts without mask_input, one prompt per run"),
            "fast_device": entry("decoder_fast.device.onnx", **derived, max_points=FAST_MAX_POINTS,
                                 prompts_per_run=PROMPTS_PER_RUN_ANY,
                                 use="decoder_fast for GPU providers, a batch per run (here the same tiny nodes)"),
        }
    manifest = Manifest(out, {
        "format": "sam2rt",
        "format_version": FORMAT_VERSION,
        "model": {
            "name": "tiny_test", "version": "2.1", "model_id": "sam2rt_tiny_test", "serve_id": "tiny_test",
            "config": None, "synthetic": True,
            "weights": {"random": True, "seed": seed, "checkpoint": None, "checkpoint_sha256": None},
        },
        "image_size": IMAGE_SIZE,
        "low_res_size": LOW_RES_SIZE,
        "normalization": {"color_order": "RGB", "scale": 1 / 255, "mean": list(PIXEL_MEAN), "std": list(PIXEL_STD),
                          "resize": "bilinear, antialiased (torchvision Resize on tensors), to image_size x image_size"},
        "mask_threshold": MASK_THRESHOLD,
        "decoder": {"dynamic_multimask_via_stability": True, "dynamic_multimask_stability_delta": 0.05,
                    "dynamic_multimask_stability_thresh": 0.98, "tokens": ["single", "multi_1", "multi_2", "multi_3"],
                    "low_res_logit_clamp": 32.0},
        "graphs": {"encoder": entry(ENCODER_FILE), "decoder": decoder},
        "opset": OPSET,
        "verification": {"max_abs_diff": {}},
        "exported_with": {"sam2rt": "tiny_model", "torch": None, "sam2": None},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "engines": {},
    })
    manifest.save()
    if optimize:
        from .optimize import add_variants

        manifest = add_variants(out, optimized=True)
    if video:
        from .tiny_video import add_tiny_video

        manifest = add_tiny_video(manifest, seed)
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sam2rt.export.tiny_model OUT_DIR", file=sys.stderr)
        return 2
    print(build_tiny_model_dir(args[0]).directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
