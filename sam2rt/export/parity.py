"""The export's parity check: each graph's outputs under ONNX Runtime against PyTorch's on the same inputs.

Contract: `check_close` raises ExportError (the export is refused, nothing is recorded) when the largest difference
exceeds the tolerance relative to the reference's largest magnitude, floor 1; it returns the largest absolute
difference, which the manifest records. Relative because float32 rounding (ONNX Runtime orders and fuses the
arithmetic differently) scales with the values: a trained model's logits reach tens and its activations more, where
the random weights the tests export stay near 1, so an absolute bound tuned on the latter could refuse a correct
export of the former. Values up to 1 keep the absolute bound; a wrong graph is off by far more than either.
"""

from __future__ import annotations

import numpy as np

from ..errors import ExportError


def check_close(name: str, ours: np.ndarray, ref: np.ndarray, tol: float) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.size == ref.size:  # e.g. a (1, 1) score against a scalar: the same values
        ours = ours.reshape(ref.shape)
    else:
        raise ExportError(f"{name}: ONNX Runtime's output has shape {ours.shape}, PyTorch's {ref.shape}; the export is "
                          "not usable")
    diff = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    if not np.isfinite(diff) or diff > tol * scale:
        raise ExportError(
            f"{name}: ONNX Runtime and PyTorch disagree (largest difference {diff:.3g} > {tol:g} x {scale:.3g}, the "
            "tolerance times the reference's largest magnitude); the export is not usable"
        )
    return diff
