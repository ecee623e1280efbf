"""The runtime must never import torch, directly or indirectly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_runtime_embed_decode_without_torch(tiny_model_dir):
    code = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        import sam2rt
        from sam2rt.runtime import Sam2Model, Prompt, Predictor
        model = Sam2Model.from_dir({str(tiny_model_dir)!r}, backend="auto")
        img = (np.arange(200 * 300 * 3) % 251).astype(np.uint8).reshape(200, 300, 3)
        emb = model.embed(img)
        out = model.decode(emb, [Prompt(points=np.array([[10.0, 20.0]]), labels=np.array([1])), Prompt(box=np.array([0, 0, 50, 60]))])
        p = Predictor(model)
        p.set_image(img)
        masks, scores, logits = p.predict(point_coords=np.array([[5, 5]]), point_labels=np.array([1]))
        import sam2rt.cli, sam2rt.annotate, sam2rt.manifest
        print(json.dumps({{"torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
                           "shape": list(out.masks.shape), "backend": model.backend_name}}))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["shape"] == [2, 3, 200, 300]
    assert info["backend"] == "onnxruntime-cpu"
    assert info["torch"] == [], f"torch was imported: {info['torch'][:5]}"
