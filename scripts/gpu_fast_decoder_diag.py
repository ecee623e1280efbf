"""Why does decoder_fast disagree with decoder_nomask on ONNX Runtime's CUDA provider? (run on the GPU machine)

On the lent H100 (ONNX Runtime 1.31, CUDA provider) decoder_fast's one-click logits differed from
decoder_nomask's by 0.3-2.6, in FP32 with TF32 off as well, while both agree to 1e-6 on the CPU provider;
OrtDeviceBackend's probe therefore turns the fast path off on CUDA. The expected cause, found by reading ONNX
Runtime's CUDA MatMul (export/cuda_matmul.py): the upscaling's broadcast (2,1,M,K) @ (2,K,N), which the CUDA
provider's strided-batched shortcut computes wrongly; the export now writes a GPU form without it,
decoder_fast.device.onnx. This script confirms or refutes that, in one short run:

0. the GPU form on CUDA against the CPU (expected: ~1e-6);

1. does it depend on ONNX Runtime's graph optimisations? decoder_fast on CUDA at every optimisation level,
   with and without the optimisers the export disables, against the CPU's result;
2. which node first goes wrong (expected: the MatMul after the first upscaling's GELU)? every node output of the
   CPU-layout decoder_fast made a graph output, run unoptimised on
   CPU and on CUDA, compared in graph order (the first nodes beyond 1e-3 relative are printed with their
   op types and input shapes).

    python3 scripts/gpu_fast_decoder_diag.py MODEL_DIR
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's sam2rt


def _inputs(manifest, size: float) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    shapes = {o["name"]: [int(d) for d in o["shape"]] for o in manifest.graph("encoder")["outputs"]}
    feats = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    prompt = {"point_coords": np.array([[[0.4 * size, 0.55 * size], [0.0, 0.0]]], np.float32),
              "point_labels": np.array([[1, -1]], np.float32)}
    return feats, prompt


def _bare_matmul(ort, cuda: list) -> None:
    """The product itself, alone: (2,1,64,8) @ (2,8,16) on the CUDA provider against numpy's broadcast."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "bare",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 1, 64, 8]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 8, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 64, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 1, 64, 8)).astype(np.float32), rng.standard_normal((2, 8, 16)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=cuda)
    y = sess.run(None, {"a": a, "b": b})[0]
    diff = np.abs(y - np.matmul(a, b)).reshape(4, -1).max(axis=1)
    print(f"bare MatMul (2,1,64,8) @ (2,8,16) on {sess.get_providers()[0]}: max |diff| per output matrix "
          f"[a,c] = {', '.join(f'{x:.3g}' for x in diff)} (the strided shortcut would leave [0,1], [1,0], [1,1] wrong)")


def main(model_dir: str) -> int:
    import onnx
    import onnxruntime as ort

    from sam2rt.manifest import Manifest

    cuda = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    cpu = ["CPUExecutionProvider"]
    GO = ort.GraphOptimizationLevel
    _bare_matmul(ort, cuda)

    m = Manifest.load(model_dir)
    d = Path(model_dir)
    variants = m.graph("decoder")["variants"]
    files = {k: d / variants[k]["file"] for k in ("prep", "nomask", "fast_device") if k in variants}
    # the CPU-layout form: decoder_fast.onnx where it is kept, else the CPU's optimised copy of it (a `cuda`
    # export holds neither: export with --target cpu,cuda for this part)
    cpu_form = next((k for k in ("fast", "fast_optimized") if k in variants and m.is_stored(variants[k])), None)
    if cpu_form is not None:
        files["fast"] = d / variants[cpu_form]["file"]
    print(f"CPU-layout form: {files['fast'].name if 'fast' in files else 'none'}; "
          f"GPU form: {files['fast_device'].name if 'fast_device' in files else 'none'}")
    feats, prompt = _inputs(m, float(m.image_size))

    def session(path, providers, level=GO.ORT_ENABLE_ALL, disabled=()):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = level
        return ort.InferenceSession(str(path), so, providers=providers, disabled_optimizers=list(disabled))

    prep = dict(zip([o.name for o in session(files["prep"], cpu).get_outputs()],
                    session(files["prep"], cpu).run(None, feats)))
    fast_feeds = {**prep, **prompt}
    ref_nomask = session(files["nomask"], cpu).run(None, {**feats, **prompt})
    if "fast_device" in files:  # the GPU form (no broadcast MatMul the CUDA provider gets wrong: export/cuda_matmul.py)
        got = session(files["fast_device"], cuda).run(None, fast_feeds)
        print(f"CUDA decoder_fast.device vs CPU decoder_nomask: {max(float(np.abs(a - b).max()) for a, b in zip(got, ref_nomask)):.3g}")
    if "fast" not in files:
        return 0
    ref_fast = session(files["fast"], cpu).run(None, fast_feeds)
    print(f"CPU: fast vs nomask {max(float(np.abs(a - b).max()) for a, b in zip(ref_fast, ref_nomask)):.3g}")

    prep_cuda = session(files["prep"], cuda).run(None, feats)
    print(f"CUDA decoder_prep vs CPU: {max(float(np.abs(a - b).max()) for a, b in zip(prep_cuda, prep.values())):.3g}")
    nomask_cuda = session(files["nomask"], cuda).run(None, {**feats, **prompt})
    print(f"CUDA decoder_nomask vs CPU: {max(float(np.abs(a - b).max()) for a, b in zip(nomask_cuda, ref_nomask)):.3g}")
    disabled_sets = {"none": (), "export's": tuple(variants[cpu_form].get("ort_disabled_optimizers", []))}
    for level in (GO.ORT_DISABLE_ALL, GO.ORT_ENABLE_BASIC, GO.ORT_ENABLE_EXTENDED, GO.ORT_ENABLE_ALL):
        for name, disabled in disabled_sets.items():
            try:
                got = session(files["fast"], cuda, level, disabled).run(None, fast_feeds)
                diff = max(float(np.abs(a - b).max()) for a, b in zip(got, ref_fast))
                print(f"CUDA decoder_fast {level.name:20s} disabled={name:9s}: vs CPU {diff:.3g}")
            except Exception as exc:  # noqa: BLE001 - a diagnosis prints everything
                print(f"CUDA decoder_fast {level.name} disabled={name}: failed: {str(exc)[:200]}")


    # every node output of the CPU-layout form as a graph output, unoptimised on both providers
    model = onnx.shape_inference.infer_shapes(onnx.load(str(files["fast"])))
    known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    have = {o.name for o in model.graph.output}
    order = []
    for node in model.graph.node:
        for out in node.output:
            if out and out in known and out not in have:
                model.graph.output.append(known[out])
                have.add(out)
            if out:
                order.append((out, node))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fast_all_outputs.onnx"
        onnx.save(model, str(path))
        names = [o.name for o in model.graph.output]
        a = dict(zip(names, session(path, cpu, GO.ORT_DISABLE_ALL).run(None, fast_feeds)))
        b = dict(zip(names, session(path, cuda, GO.ORT_DISABLE_ALL).run(None, fast_feeds)))
    shown = 0
    shape = {v.name: [x.dim_value for x in v.type.tensor_type.shape.dim] for v in known.values()}
    for out, node in order:
        if out not in a or a[out].dtype.kind != "f":
            continue
        diff = float(np.abs(a[out] - b[out]).max()) if a[out].size else 0.0
        scale = float(np.abs(a[out]).max()) if a[out].size else 0.0
        if diff > 1e-3 * max(1.0, scale):
            ins = ", ".join(f"{i}{shape.get(i, '')}" for i in node.input)
            print(f"first bad nodes: {node.op_type} {node.name} -> {out} diff {diff:.3g} (scale {scale:.3g}); inputs {ins}")
            shown += 1
            if shown >= 10:
                break
    if not shown:
        print("unoptimised, every node output agrees within 1e-3 relative")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
