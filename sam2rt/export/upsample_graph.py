"""The ONNX graph that brings low-res logits to the original image size (shipped as sam2rt/runtime/graphs/upsample.onnx).

The runtime has no `onnx` dependency, so the graph is built here and the file is part of the package;
tests/test_postprocess.py checks that the shipped file is exactly what `build_upsample_graph()` makes.
Regenerate it with `python -m sam2rt.export.upsample_graph`.

It does the arithmetic of `sam2rt.runtime.postprocess.upsample_logits` (F.interpolate's bilinear,
align_corners=False) with the same operations in the same order, so its results are identical:
per column `x[c0] * (1 - l) + x[c1] * l`, then per row likewise, then `> threshold`. The taps and
weights are inputs (they depend on the original size). ONNX Runtime runs it on all intra-op threads.
"""

from __future__ import annotations

from pathlib import Path

UPSAMPLE_GRAPH = Path(__file__).resolve().parent.parent / "runtime" / "graphs" / "upsample.onnx"
UPSAMPLE_OUTPUTS = ("upsampled", "masks", "mask_values")


def add_upsample_nodes(src: str, dst: str) -> list:
    """Nodes that upsample `src` (B,C,h,w) to `dst` (B,C,H,W) with the taps c0/c1/r0/r1 and weights
    cw0_col/cw1_col/rw0/rw1 (graph inputs), as upsample_logits does (the same operations in the same order)."""
    from onnx import helper

    node = helper.make_node
    # Gathers along the last axis copy element by element (slow in ONNX Runtime): the column pass runs on
    # the transposed logits, gathering whole rows, and its result is transposed back for the row pass.
    return [
        node("Transpose", [src], ["xt"], perm=[0, 1, 3, 2]),
        node("Gather", ["xt", "c0"], ["x0"], axis=2), node("Mul", ["x0", "cw0_col"], ["a0"]),
        node("Gather", ["xt", "c1"], ["x1"], axis=2), node("Mul", ["x1", "cw1_col"], ["a1"]),
        node("Add", ["a0", "a1"], ["cols_t"]),
        node("Transpose", ["cols_t"], ["cols"], perm=[0, 1, 3, 2]),
        node("Gather", ["cols", "r0"], ["y0"], axis=2), node("Mul", ["y0", "rw0"], ["b0"]),
        node("Gather", ["cols", "r1"], ["y1"], axis=2), node("Mul", ["y1", "rw1"], ["b1"]),
        node("Add", ["b0", "b1"], [dst]),
    ]


def build_upsample_graph():
    """logits (B,C,h,w) + taps -> upsampled (B,C,H,W) float, masks bool (> threshold), mask_values float 0/1."""
    from onnx import TensorProto, checker, helper

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("logits", f32, ["B", "C", "h", "w"])]
    inputs += [helper.make_tensor_value_info(n, i64, [d]) for n, d in (("c0", "W"), ("c1", "W"), ("r0", "H"), ("r1", "H"))]
    inputs += [helper.make_tensor_value_info(n, f32, s) for n, s in
               (("cw0_col", ["W", 1]), ("cw1_col", ["W", 1]), ("rw0", ["H", 1]), ("rw1", ["H", 1]), ("threshold", []))]
    node = helper.make_node
    nodes = add_upsample_nodes("logits", "upsampled") + [
        node("Greater", ["upsampled", "threshold"], ["masks"]),
        node("Cast", ["masks"], ["mask_values"], to=f32),
    ]
    shape = ["B", "C", "H", "W"]
    outputs = [helper.make_tensor_value_info("upsampled", f32, shape), helper.make_tensor_value_info("masks", TensorProto.BOOL, shape),
               helper.make_tensor_value_info("mask_values", f32, shape)]
    model = helper.make_model(helper.make_graph(nodes, "sam2rt_upsample_logits", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)], producer_name="sam2rt")
    model.ir_version = 8
    checker.check_model(model)
    return model


def main() -> None:
    UPSAMPLE_GRAPH.parent.mkdir(parents=True, exist_ok=True)
    UPSAMPLE_GRAPH.write_bytes(build_upsample_graph().SerializeToString())
    print(UPSAMPLE_GRAPH)


if __name__ == "__main__":
    main()
