"""The small ONNX graphs that move SAM 2's pre- and postprocessing onto the device running the model.

They ship in the package (sam2rt/runtime/graphs/*.onnx), because the runtime has no `onnx` dependency;
tests/test_device_graphs.py checks that each shipped file is exactly what its builder here makes.
Regenerate them with `python -m sam2rt.export.device_graphs`.

- `preprocess.onnx`: uint8 HxWx3 RGB -> normalised float32 1x3xSxS, as SAM2Transforms (ToTensor, the
  antialiased bilinear Resize of torchvision, Normalize). The antialiased resize is linear and
  separable, so it is two matrix products with the tap weights of `sam2rt.runtime.preprocess._aa_taps`,
  block-banded (`resize_windows`: each block of 64 output pixels against the window of input pixels it
  reads; inputs, cached per image size by the runtime): width first, then height, as ATen does. ONNX Runtime's own antialiased Resize differs from torchvision when downscaling, so it is
  not used. The products must run in true FP32 (TF32 would move pixels by ~1e-3): the runtime loads
  this graph with TF32 off whatever the model's precision.
- `postprocess_multi.onnx` / `postprocess_single.onnx`: the decoder's four tokens -> the masks a caller
  asked for: token choice (the three multimask tokens, or the single-mask token replaced by the best
  multimask token where its stability score is below the threshold, as SAM 2's MaskDecoder), the
  low-res logits clamped to +-32, bilinear upsampling to the original size (the operations of
  upsample.onnx in the same order) and the threshold. Outputs the masks as bool (`masks`) or float 0/1
  (`mask_values`), or the upsampled logits, so only what the caller needs leaves the device.
- `memory_write.onnx` / `memory_gather.onnx`: the video tracker's memory bank on the device. Each object's
  memory features (float32 values of their bfloat16 rounding, which the write makes) live in rows of one
  (N,C,h,w) tensor the tracker allocates once. A new memory is rounded once and written straight into its row: the
  write's output is bound to the row's address (IO binding), so a write moves one memory, not the bank (the
  ScatterND this replaced made a new bank of all N rows on every store: 10.3 ms of a 23.9 ms tracked frame on an
  H200, benchmarks/README.md). Each frame the rows the memory selection names are gathered into the memory
  attention's static (slots,C,h,w) input (Gather), so the bank never crosses PCIe.
- `copy.onnx`: one Identity: a device-to-device copy of a float tensor into a buffer bound as its output
  (how the CUDA-graph path moves tensors in and out of its fixed buffers without a host round trip);
  `copy_2.onnx` .. `copy_4.onnx`: 2 to 4 of them in one graph (x0 -> y0, x1 -> y1, ...), so that the tensors a fixed
  buffer session takes in or gives out move in one run (runtime/backends/device_copy.py says why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runtime.backends.device_copy import MAX_COPIES_PER_GRAPH, copy_graph_name, copy_names
from .upsample_graph import add_upsample_nodes

GRAPH_DIR = Path(__file__).resolve().parent.parent / "runtime" / "graphs"
PREPROCESS_GRAPH = GRAPH_DIR / "preprocess.onnx"
POSTPROCESS_MULTI_GRAPH = GRAPH_DIR / "postprocess_multi.onnx"
POSTPROCESS_SINGLE_GRAPH = GRAPH_DIR / "postprocess_single.onnx"
COPY_GRAPH = GRAPH_DIR / "copy.onnx"
MEMORY_WRITE_GRAPH = GRAPH_DIR / "memory_write.onnx"
MEMORY_GATHER_GRAPH = GRAPH_DIR / "memory_gather.onnx"
OPSET = 17
LOGIT_CLAMP = 32.0
POSTPROCESS_OUTPUTS = ("low_res_logits", "scores", "upsampled", "masks", "mask_values")


def _model(nodes: list, name: str, inputs: list, outputs: list, initializers: list | None = None,
           check: bool = True) -> Any:
    from onnx import checker, helper

    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, initializer=initializers or []),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sam2rt")
    model.ir_version = 8
    if check:
        checker.check_model(model)
    return model


def build_preprocess_graph() -> Any:
    """image uint8 (H,W,3), index_w (Gw,Lw) int64, taps_w (Gw,bw,Lw), index_h (Gh,Lh) int64, taps_h (Gh,bh,Lh),
    scale (3,1,1), offset (3,1,1) -> image (1,3,S,S), S = Gw*bw = Gh*bh.

    image = resize_h(resize_w(image as CHW)) * scale - offset, scale = 1/(255 std), offset = mean/std; each resize
    is the block-banded product of sam2rt.runtime.preprocess.resize_windows (its windows and taps are inputs,
    cached per image size by the runtime): a block's output pixels are one product of its taps with the input
    pixels of its window, Gathered. Width first, as ATen. Why banded: the dense products (resize_matrix) multiplied
    ~95% zeros at 1920x1080, 12.7 GFLOP in FP32 (the graph runs TF32 off) for a 6 MB image; and their row resize,
    a matrix times a batch, took ONNX Runtime's CUDA pointer-array path, which a captured CUDA graph replays from
    freed host memory (export/cuda_matmul.py). Both products here are strided-batched with equal batches. The
    uint8 image is transposed and gathered before its Cast (a quarter of the bytes moved).
    """
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("image", TensorProto.UINT8, ["H", "W", 3]),
        helper.make_tensor_value_info("index_w", i64, ["Gw", "Lw"]),
        helper.make_tensor_value_info("taps_w", f32, ["Gw", "bw", "Lw"]),
        helper.make_tensor_value_info("index_h", i64, ["Gh", "Lh"]),
        helper.make_tensor_value_info("taps_h", f32, ["Gh", "bh", "Lh"]),
        helper.make_tensor_value_info("scale", f32, [3, 1, 1]),
        helper.make_tensor_value_info("offset", f32, [3, 1, 1]),
    ]
    # reshapes by 0 (keep that dimension) and -1 only: no Shape arithmetic, so a session with symbolic dimensions
    # runs nothing on the host, and every dimension of a fixed-shape one is known
    consts = {"windows_flat": [0, 0, -1], "split_rgb_h": [0, 0, 3, -1], "h_by_pixels": [0, -1],
              "split_j_rgb": [0, 0, -1, 3], "nchw": [1, 3, -1, 0]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in consts.items()]
    node = helper.make_node
    nodes = [
        # width: the windows of columns, (Gw, Lw, 3*H), against each block's taps -> (Gw, bw, 3*H)
        node("Transpose", ["image"], ["wch"], perm=[1, 2, 0]),  # (W,3,H)
        node("Gather", ["wch", "index_w"], ["win_w"], axis=0),  # (Gw,Lw,3,H)
        node("Reshape", ["win_w", "windows_flat"], ["win_w_flat"]),  # (Gw,Lw,3H)
        node("Cast", ["win_w_flat"], ["win_w_f"], to=f32),
        node("MatMul", ["taps_w", "win_w_f"], ["cols"]),  # (Gw,bw,3H)
        # height: the rows, (H, 3S) with columns (j, c), in windows (Gh, Lh, 3S) -> (Gh, bh, 3S)
        node("Reshape", ["cols", "split_rgb_h"], ["cols_4d"]),  # (Gw,bw,3,H)
        node("Transpose", ["cols_4d"], ["h_cols"], perm=[3, 0, 1, 2]),  # (H,Gw,bw,3)
        node("Reshape", ["h_cols", "h_by_pixels"], ["h_jc"]),  # (H,3S)
        node("Gather", ["h_jc", "index_h"], ["win_h"], axis=0),  # (Gh,Lh,3S)
        node("MatMul", ["taps_h", "win_h"], ["rows"]),  # (Gh,bh,3S)
        node("Reshape", ["rows", "split_j_rgb"], ["rows_4d"]),  # (Gh,bh,S,3)
        node("Transpose", ["rows_4d"], ["rgb_rows"], perm=[3, 0, 1, 2]),  # (3,Gh,bh,S)
        node("Reshape", ["rgb_rows", "nchw"], ["resized"]),  # (1,3,S,S)
        node("Mul", ["resized", "scale"], ["scaled"]),
        node("Sub", ["scaled", "offset"], ["image_out"]),
    ]
    outputs = [helper.make_tensor_value_info("image_out", f32, [1, 3, "S", "S"])]
    return _model(nodes, "sam2rt_preprocess", inputs, outputs, inits)


def build_postprocess_graph(multimask: bool) -> Any:
    """low_res_masks (B,4,h,w), iou_predictions (B,4) + upsampling taps -> the chosen tokens' outputs.

    Outputs: low_res_logits (B,C,h,w) clamped, scores (B,C), upsampled (B,C,H,W) float, masks bool
    (upsampled > threshold), mask_values float 0/1; C = 3 (multimask) or 1. The single-token graph takes
    stability_delta and stability_thresh (-inf turns the stability fallback off).
    """
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    node = helper.make_node
    inputs = [helper.make_tensor_value_info("low_res_masks", f32, ["B", 4, "h", "w"]),
              helper.make_tensor_value_info("iou_predictions", f32, ["B", 4])]
    inputs += [helper.make_tensor_value_info(n, i64, [d]) for n, d in (("c0", "W"), ("c1", "W"), ("r0", "H"), ("r1", "H"))]
    inputs += [helper.make_tensor_value_info(n, f32, s) for n, s in
               (("cw0_col", ["W", 1]), ("cw1_col", ["W", 1]), ("rw0", ["H", 1]), ("rw1", ["H", 1]), ("threshold", []))]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
             (("one", [1]), ("four", [4]), ("zero", [0]), ("axis1", [1]), ("axes_hw", [2, 3]))]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("clamp_lo", -LOGIT_CLAMP), ("clamp_hi", LOGIT_CLAMP), ("f_zero", 0.0), ("f_one", 1.0))]
    if multimask:  # the three multimask tokens
        nodes = [node("Slice", ["low_res_masks", "one", "four", "axis1"], ["chosen"]),
                 node("Slice", ["iou_predictions", "one", "four", "axis1"], ["scores"])]
    else:
        inputs += [helper.make_tensor_value_info("stability_delta", f32, []),
                   helper.make_tensor_value_info("stability_thresh", f32, [])]
        inits.append(numpy_helper.from_array(np.arange(4, dtype=np.int64)[None], "tokens"))
        nodes = [
            # stability score of the single-mask token: IoU of its masks thresholded at +delta and -delta
            node("Slice", ["low_res_masks", "zero", "one", "axis1"], ["single"]),
            node("Neg", ["stability_delta"], ["neg_delta"]),
            node("Greater", ["single", "stability_delta"], ["inner_b"]), node("Cast", ["inner_b"], ["inner"], to=f32),
            node("Greater", ["single", "neg_delta"], ["outer_b"]), node("Cast", ["outer_b"], ["outer"], to=f32),
            node("ReduceSum", ["inner", "axes_hw"], ["area_i"], keepdims=0),
            node("ReduceSum", ["outer", "axes_hw"], ["area_u"], keepdims=0),
            node("Max", ["area_u", "f_one"], ["area_u1"]), node("Div", ["area_i", "area_u1"], ["ratio"]),
            node("Greater", ["area_u", "f_zero"], ["nonempty"]),
            node("Where", ["nonempty", "ratio", "f_one"], ["stability"]),
            node("GreaterOrEqual", ["stability", "stability_thresh"], ["stable"]),  # (B,1)
            # else the multimask token with the highest predicted IoU (first on ties, as numpy's argmax)
            node("Slice", ["iou_predictions", "one", "four", "axis1"], ["multi_iou"]),
            node("ArgMax", ["multi_iou"], ["best0"], axis=1, keepdims=1),
            node("Add", ["best0", "one"], ["best"]),
            node("Where", ["stable", "zero", "best"], ["pick"]),
            node("Equal", ["tokens", "pick"], ["onehot"]),  # (B,4)
            # one token's values plus three zeros: exact
            node("Where", ["onehot", "iou_predictions", "f_zero"], ["iou_masked"]),
            node("ReduceSum", ["iou_masked", "axis1"], ["scores"], keepdims=1),
            node("Unsqueeze", ["onehot", "axes_hw"], ["onehot4"]),
            node("Where", ["onehot4", "low_res_masks", "f_zero"], ["masked"]),
            node("ReduceSum", ["masked", "axis1"], ["chosen"], keepdims=1),
        ]
    nodes.append(node("Clip", ["chosen", "clamp_lo", "clamp_hi"], ["low_res_logits"]))
    nodes += add_upsample_nodes("chosen", "upsampled")
    nodes += [node("Greater", ["upsampled", "threshold"], ["masks"]), node("Cast", ["masks"], ["mask_values"], to=f32)]
    c = 3 if multimask else 1
    shape = ["B", c, "H", "W"]
    outputs = [
        helper.make_tensor_value_info("low_res_logits", f32, ["B", c, "h", "w"]),
        helper.make_tensor_value_info("scores", f32, ["B", c]),
        helper.make_tensor_value_info("upsampled", f32, shape),
        helper.make_tensor_value_info("masks", TensorProto.BOOL, shape),
        helper.make_tensor_value_info("mask_values", f32, shape),
    ]
    return _model(nodes, f"sam2rt_postprocess_{'multi' if multimask else 'single'}", inputs, outputs, inits)


def build_copy_graph(count: int = 1) -> Any:
    """x -> y (Identity) for a float tensor of any rank; for `count` > 1, that many independent Identities.

    onnx.checker insists on a rank for graph inputs; ONNX Runtime does not, and these graphs must take
    tensors of every rank, so they are the graphs here not passed through the checker (their loading and
    their results are tested).
    """
    from onnx import TensorProto, helper

    pairs = copy_names(count)
    return _model([helper.make_node("Identity", [x], [y]) for x, y in pairs],
                  "sam2rt_copy" if count == 1 else f"sam2rt_copy_{count}",
                  [helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x, _ in pairs],
                  [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for _, y in pairs], check=False)


def build_memory_write_graph() -> Any:
    """entries (K,C,h,w) -> entries_rounded (K,C,h,w): the entries rounded to bfloat16 (Cast there and back: round to
    nearest even, as torch's `.to(torch.bfloat16)`), which the caller binds to the bank rows they go to; and kept, the
    same values, which the caller brings to the host. Entries that are bfloat16 values already (a memory restored from
    its bits) are written unchanged."""
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    shape = ["K", "C", "h", "w"]
    inputs = [helper.make_tensor_value_info("entries", f32, shape)]
    outputs = [helper.make_tensor_value_info("entries_rounded", f32, shape),
               helper.make_tensor_value_info("kept", f32, shape)]
    nodes = [helper.make_node("Cast", ["entries"], ["entries_bf16"], to=TensorProto.BFLOAT16),
             helper.make_node("Cast", ["entries_bf16"], ["entries_rounded"], to=f32),
             helper.make_node("Identity", ["entries_rounded"], ["kept"])]
    return _model(nodes, "sam2rt_memory_write", inputs, outputs)


def build_memory_gather_graph() -> Any:
    """bank (N,C,h,w), index (S,) int64 -> mem_feats (S,C,h,w) = bank[index] (Gather on axis 0)."""
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("bank", f32, ["N", "C", "h", "w"]),
              helper.make_tensor_value_info("index", TensorProto.INT64, ["S"])]
    outputs = [helper.make_tensor_value_info("mem_feats", f32, ["S", "C", "h", "w"])]
    return _model([helper.make_node("Gather", ["bank", "index"], ["mem_feats"], axis=0)], "sam2rt_memory_gather",
                  inputs, outputs)


BUILDERS = {
    PREPROCESS_GRAPH: build_preprocess_graph,
    POSTPROCESS_MULTI_GRAPH: lambda: build_postprocess_graph(True),
    POSTPROCESS_SINGLE_GRAPH: lambda: build_postprocess_graph(False),
    COPY_GRAPH: build_copy_graph,
    **{GRAPH_DIR / f"{copy_graph_name(k)}.onnx": (lambda k=k: build_copy_graph(k)) for k in range(2, MAX_COPIES_PER_GRAPH + 1)},
    MEMORY_WRITE_GRAPH: build_memory_write_graph,
    MEMORY_GATHER_GRAPH: build_memory_gather_graph,
}


def main() -> None:
    GRAPH_DIR.mkdir(parents=True, exist_ok=True)
    for path, build in BUILDERS.items():
        path.write_bytes(build().SerializeToString())
        print(path)


if __name__ == "__main__":
    main()
