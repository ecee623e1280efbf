"""Diagnose CUDA-graph replays of OrtDeviceBackend against plain sessions (run on the GPU machine)."""
import sys
import numpy as np

def main(model_dir: str) -> None:
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Sam2Model, Prompt
    from sam2rt.runtime.backends import OrtDeviceBackend
    from sam2rt.runtime.backends import ort_device_backend as odb
    from skimage import data
    m = Manifest.load(model_dir)
    img = np.ascontiguousarray(data.astronaut()[..., :3])
    img2 = np.ascontiguousarray(data.coffee()[..., :3])
    one = Prompt(points=np.array([[200.0, 150.0]]), labels=np.array([1]))
    boxes = [Prompt(box=np.array([10.0 + i, 20.0, 300.0, 400.0 - i])) for i in range(16)]
    plain = Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cuda", precision="fp32", cuda_graphs=False))
    ref = {}
    for name, im in (("a", img), ("b", img2)):
        e = plain.embed(im)
        ref[name] = (e, {k: v.to_host() for k, v in e.features.items()}, plain.decode(e, one).low_res_logits, plain.decode(e, boxes).low_res_logits)
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        cudart = None
    for variant in ("sync_outputs", "device_sync"):
        if variant == "device_sync":
            orig = odb.OrtDeviceBackend._replay
            def _replay(fixed, orig=orig):
                orig(fixed)
                cudart.cudaDeviceSynchronize()
            odb.OrtDeviceBackend._replay = staticmethod(_replay)
        g = Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cuda", precision="fp32"))
        for it in range(5):
            for name, im in (("a", img), ("b", img2)):
                e = g.embed(im)
                fd = max(float(np.abs(e.features[k].to_host() - ref[name][1][k]).max()) for k in ref[name][1])
                d1 = float(np.abs(g.decode(e, one).low_res_logits - ref[name][2]).max())
                # decoder alone: the plain embedding's features (uploaded) through the graph decoder
                d1p = float(np.abs(g.decode(ref[name][0], one).low_res_logits - ref[name][2]).max())
                d16 = float(np.abs(g.decode(ref[name][0], boxes).low_res_logits - ref[name][3]).max())
                print(f"{variant} it{it} {name}: features {fd:.2e} one(own emb) {d1:.2e} one(plain emb) {d1p:.2e} boxes(plain emb) {d16:.2e}", flush=True)
        print(variant, g.backend.cuda_graphs, flush=True)
        g.close()

if __name__ == "__main__":
    main(sys.argv[1])
