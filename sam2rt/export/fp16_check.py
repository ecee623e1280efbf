"""The FP16 encoder checked against its FP32 source at export, where the weights are the user's.

FP16 holds values up to 65504. Random weights (all the test suite has) keep Hiera's activations near 1; a trained
ViT may carry activations of thousands, and where one exceeds FP16's range the encoder's outputs turn to inf or
NaN, or lose precision wholesale. Nothing downstream would say so: masks would just be wrong. So the export runs
both encoders on ONNX Runtime's CPU provider over a real photo (bundled with the package) and refuses the FP16
encoder when an output is not finite or its mean difference exceeds MAX_RELATIVE_MEAN of the FP32 output's mean
magnitude (random weights: ~0.1%). A refused FP16 encoder is not written; the manifest records why, and asking for
`onnxruntime-cuda:fp16` says so (TF32 and FP32 still run). The CPU's FP16 execution stores every FP16 tensor as
FP16, as the GPU does, so an overflow shows the same way; `sam2rt verify` checks the masks on the GPU itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PHOTO = Path(__file__).resolve().parents[1] / "data" / "photos" / "astronaut.jpg"
MAX_RELATIVE_MEAN = 0.05  # mean |FP16 - FP32| / mean |FP32| per output


def _photo_input() -> np.ndarray:
    from ..annotate import read_image
    from ..runtime.preprocess import preprocess

    return preprocess(read_image(PHOTO))


def check_fp16_encoder(fp32: str | Path, fp16: str | Path) -> dict[str, Any]:
    """Both encoders on the bundled photo: per output whether it is finite, its largest and mean |difference| and the
    mean relative to the FP32 output's mean magnitude; `refused`: why the FP16 encoder is unusable, or None."""
    import onnxruntime as ort

    from ..runtime.backends.onnxruntime_backend import session_options

    image = _photo_input()
    runs = []
    for path in (fp32, fp16):
        session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        runs.append(dict(zip([o.name for o in session.get_outputs()], session.run(None, {name: image}))))
    outputs: dict[str, dict[str, Any]] = {}
    problems = []
    for name, ref in runs[0].items():
        got = np.asarray(runs[1][name], np.float64)
        ref = np.asarray(ref, np.float64)
        finite = bool(np.isfinite(got).all())
        diff = np.abs(got - ref)
        mean_ref = float(np.abs(ref).mean()) or 1.0
        row = {"finite": finite, "max_abs": float(diff.max()) if finite else None,
               "mean_abs": float(diff.mean()) if finite else None,
               "relative_mean": float(diff.mean()) / mean_ref if finite else None}
        outputs[name] = row
        if not finite:
            problems.append(f"{name} has {int(np.size(got) - np.isfinite(got).sum())} values that are not finite "
                            "(an activation beyond FP16's range)")
        elif row["relative_mean"] > MAX_RELATIVE_MEAN:
            problems.append(f"{name} differs from FP32 by {row['relative_mean']:.1%} of its mean magnitude "
                            f"(bound {MAX_RELATIVE_MEAN:.0%})")
    return {"image": PHOTO.name, "bound_relative_mean": MAX_RELATIVE_MEAN, "outputs": outputs,
            "refused": "; ".join(problems) or None}
