"""`sam2rt verify`: an exported model directory against the official PyTorch model, on the user's own images.

Nobody can check an export's fidelity on trained weights better than the person who has them: FP16
overflow, TF32 drift or INT8 error show on real weights and real photos, not on the random weights the
test suite uses. This command loads the checkpoint with the official `sam2` package
(`SAM2ImagePredictor`, the reference), runs it and sam2rt side by side on the given images (or the
photos bundled in `sam2rt/data/photos`) over a grid of point, box and mixed prompts, and compares:

- low-res logits (256x256, clamped to +-32 as both predictors return them): largest absolute difference;
- predicted IoU scores: largest absolute difference;
- masks at the original image size: IoU of each mask with the reference's (min and percentiles).

It does this for every precision the chosen backend would run (`onnxruntime-cpu`: FP32, and the opt-in
INT8 encoder when the export has one; `onnxruntime-cuda`: TF32, its default, and FP16 when the export has the FP16
encoder; `tensorrt`: each engine precision built into the directory), and
the prompt grid reaches every decoder graph the CPU backend loads: plain prompts of up to 10 points
(the fast decoder), a prompt of more points (the mask-free decoder) and a mask prompt (the full decoder).

Exit status: 0 when every bound holds, 1 when a bound is broken or the directory was exported from
another checkpoint (the checkpoint's sha256 differs from the one in manifest.json), 2 when it cannot run.
It imports torch (for the reference), so it lives outside `sam2rt.runtime`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import Sam2rtError

PHOTOS_DIR = Path(__file__).resolve().parent / "data" / "photos"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
FAILED = 1  # exit status of a verification that ran and failed


@dataclass(frozen=True)
class Bounds:
    """What one precision must meet against the reference, over all prompts and images."""

    max_logit_diff: float  # largest |low-res logit difference|
    max_score_diff: float  # largest |predicted IoU difference|
    min_mask_iou: float  # the worst mask's IoU with the reference's
    p5_mask_iou: float  # the 5th percentile of mask IoU


# FP32 differs from PyTorch only by the order of float operations (the test suite sees ~1e-4 on random
# weights); the bounds leave room for real weights' larger activations but not for a wrong graph. FP16
# and INT8 are reduced precision: their masks must agree, their logits cannot to the last digit.
BOUNDS = {
    "fp32": Bounds(max_logit_diff=0.05, max_score_diff=0.01, min_mask_iou=0.98, p5_mask_iou=0.995),
    "fp16": Bounds(max_logit_diff=1.0, max_score_diff=0.03, min_mask_iou=0.90, p5_mask_iou=0.97),
    "int8": Bounds(max_logit_diff=2.0, max_score_diff=0.05, min_mask_iou=0.85, p5_mask_iou=0.95),
}


# --- inputs -----------------------------------------------------------------------------------
def bundled_photos() -> list[Path]:
    """The real photographs shipped with sam2rt (see sam2rt/data/photos/README.md for their sources)."""
    return sorted(p for p in PHOTOS_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def image_files(paths: list[Path] | None) -> list[Path]:
    """The files named, with directories expanded to the images in them; the bundled photos when none."""
    if not paths:
        return bundled_photos()
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise Sam2rtError(f"--images {path} is a directory without images ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise Sam2rtError(f"--images {path} does not exist; pass image files or directories of images")
    return out


def prompt_grid(h: int, w: int) -> list[tuple[str, dict[str, Any]]]:
    """(case, SAM2ImagePredictor.predict keyword arguments) placed relative to an HxW image.

    Cases "many_points" (more points than the CPU's fast decoder takes) and "mask_refine" (with a
    mask prompt, added by `compare`) reach the mask-free and the full decoder graphs.
    """
    def p(fx: float, fy: float) -> list[float]:
        return [fx * (w - 1), fy * (h - 1)]

    box = np.array([*p(0.15, 0.2), *p(0.75, 0.9)])
    many = [p(fx, fy) for fx in (0.2, 0.4, 0.6, 0.8) for fy in (0.25, 0.5, 0.75)]
    return [
        *((f"point@{fx:.2f},{fy:.2f}", dict(point_coords=np.array([p(fx, fy)]), point_labels=np.array([1])))
          for fx, fy in ((0.5, 0.45), (0.3, 0.3), (0.7, 0.65))),
        ("point_single", dict(point_coords=np.array([p(0.5, 0.45)]), point_labels=np.array([1]), multimask_output=False)),
        ("points_pos_neg", dict(point_coords=np.array([p(0.35, 0.4), p(0.6, 0.55), p(0.85, 0.9)]),
                                point_labels=np.array([1, 1, 0]))),
        ("box", dict(box=box, multimask_output=False)),
        ("box_multimask", dict(box=box)),
        ("box_batch", dict(box=np.array([[*p(0.0, 0.0), *p(0.5, 0.5)], [*p(0.3, 0.2), *p(0.9, 0.8)],
                                         [*p(0.55, 0.5), *p(1.0, 1.0)]]), multimask_output=False)),
        ("mixed_box_points", dict(box=box, point_coords=np.array([p(0.45, 0.55), p(0.2, 0.85)]),
                                  point_labels=np.array([1, 0]), multimask_output=False)),
        ("many_points", dict(point_coords=np.array(many), point_labels=np.array([1, 0] * 6))),
    ]


# --- metrics ----------------------------------------------------------------------------------
def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU over the last two axes of two mask stacks (1.0 where both are empty)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    inter = np.logical_and(a, b).sum(axis=(-1, -2))
    union = np.logical_or(a, b).sum(axis=(-1, -2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@dataclass
class Samples:
    """Per-call logit and score differences and per-mask IoUs of one group of calls."""

    logit_diffs: list[float]
    score_diffs: list[float]
    ious: list[float]

    @classmethod
    def empty(cls) -> "Samples":
        return cls([], [], [])

    def add(self, ours: tuple, ref: tuple) -> None:
        """One call's (masks, scores, low-res logits) from each side, as `predict` returns them."""
        (masks, scores, logits), (ref_masks, ref_scores, ref_logits) = ours, ref
        self.logit_diffs.append(float(np.abs(np.asarray(logits) - np.asarray(ref_logits)).max()))
        self.score_diffs.append(float(np.abs(np.asarray(scores) - np.asarray(ref_scores)).max()))
        self.ious.extend(np.ravel(mask_iou(masks, ref_masks)).astype(float).tolist())

    def extend(self, other: "Samples") -> None:
        self.logit_diffs += other.logit_diffs
        self.score_diffs += other.score_diffs
        self.ious += other.ious

    def summary(self) -> dict[str, Any]:
        lg, sc, iou = (np.asarray(v, dtype=np.float64) for v in (self.logit_diffs, self.score_diffs, self.ious))
        return {
            "calls": int(lg.size), "masks": int(iou.size),
            "logit_diff_max": float(lg.max()), "logit_diff_p50": float(np.percentile(lg, 50)),
            "score_diff_max": float(sc.max()), "score_diff_p50": float(np.percentile(sc, 50)),
            "iou_min": float(iou.min()), "iou_p1": float(np.percentile(iou, 1)),
            "iou_p5": float(np.percentile(iou, 5)), "iou_p50": float(np.percentile(iou, 50)),
        }


def violations(summary: dict[str, Any], bounds: Bounds) -> list[str]:
    """The bounds `summary` breaks, each as a sentence (empty when it meets them all)."""
    out = []
    if not summary["logit_diff_max"] <= bounds.max_logit_diff:
        out.append(f"low-res logits differ by up to {summary['logit_diff_max']:.3g} (bound {bounds.max_logit_diff:g})")
    if not summary["score_diff_max"] <= bounds.max_score_diff:
        out.append(f"scores differ by up to {summary['score_diff_max']:.3g} (bound {bounds.max_score_diff:g})")
    if not summary["iou_min"] >= bounds.min_mask_iou:
        out.append(f"worst mask IoU {summary['iou_min']:.4f} (bound {bounds.min_mask_iou:g})")
    if not summary["iou_p5"] >= bounds.p5_mask_iou:
        out.append(f"5th percentile mask IoU {summary['iou_p5']:.4f} (bound {bounds.p5_mask_iou:g})")
    return out


# --- the two sides ------------------------------------------------------------------------------
def backends_to_check(manifest, backend: str) -> list[str]:
    """Every backend:precision that `backend` would run on this model directory."""
    from .runtime.backends import ALIASES, create_backend
    from .runtime.engines import engine_entries

    name = ALIASES.get(backend, backend)
    if ":" in name:  # one precision asked for
        return [name]
    if name == "auto":
        name = create_backend(manifest, "auto").name
    if name == "onnxruntime-cpu":
        int8 = manifest.variant("encoder", "int8")
        return ["onnxruntime-cpu"] + (["onnxruntime-cpu:int8"] if int8 and manifest.is_stored(int8) else [])
    if name == "tensorrt":
        return [f"tensorrt:{p}" for p in engine_entries(manifest)] or ["tensorrt"]
    if name == "onnxruntime-cuda":  # its default, and FP16 where the export made its encoder (where overflow would show)
        from .runtime.backends.ort_device_backend import fp16_encoder_entry

        return ["onnxruntime-cuda:tf32"] + (["onnxruntime-cuda:fp16"] if fp16_encoder_entry(manifest) else [])
    return [name]


def build_reference(manifest, checkpoint: Path, threads: int | None):
    """SAM2ImagePredictor from the official package with the checkpoint's weights, for the directory's model."""
    import torch
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from .export.checkpoint import build_model, load_checkpoint
    from .model_specs import get_spec

    if threads:
        torch.set_num_threads(threads)
    spec = get_spec(manifest.model_name, manifest.model.get("version", "2.1"))
    model = build_model(spec)
    load_checkpoint(model, checkpoint)
    return SAM2ImagePredictor(model), spec


def _with_mask(kwargs: dict[str, Any], previous: tuple) -> dict[str, Any]:
    """A refinement click: the first point again, with the best low-res logits of a previous call as mask_input."""
    _, scores, logits = previous
    return dict(point_coords=kwargs["point_coords"][:1], point_labels=kwargs["point_labels"][:1],
                mask_input=logits[int(np.argmax(scores))][None], multimask_output=False)


def compare(ref, ours, images: dict[str, np.ndarray], ref_cache: dict, log: Callable[[str], None]) -> dict[str, Samples]:
    """Run the prompt grid on every image through both predictors; samples by case.

    The reference's outputs are computed once per image and kept in `ref_cache` (shared by precisions).
    """
    by_case: dict[str, Samples] = {}
    for name, image in images.items():
        h, w = image.shape[:2]
        t0 = time.perf_counter()
        grid = prompt_grid(h, w)
        first_case, first_kwargs = grid[0]
        if name not in ref_cache:
            ref.set_image(image)
            cache = ref_cache[name] = {case: ref.predict(**kwargs) for case, kwargs in grid}
            # the mask prompt is the reference's own earlier answer, for both sides alike
            cache["mask_refine"] = ref.predict(**_with_mask(first_kwargs, cache[first_case]))
            ref.reset_predictor()
        cache = ref_cache[name]
        refine = _with_mask(first_kwargs, cache[first_case])
        ours.set_image(image)
        for case, kwargs in [*grid, ("mask_refine", refine)]:
            by_case.setdefault(case.split("@")[0], Samples.empty()).add(ours.predict(**kwargs), cache[case])
        log(f"  {name} ({w}x{h}) in {time.perf_counter() - t0:.1f} s")
    return by_case


def checkpoint_check(manifest, checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's sha256 against the one recorded at export."""
    from .manifest import sha256_file

    weights = manifest.model["weights"]
    actual = sha256_file(checkpoint)
    recorded = weights.get("checkpoint_sha256")
    if recorded is None and weights.get("random"):
        problem = (f"{manifest.directory} was exported with RANDOM weights (seed {weights.get('seed')}), "
                   f"not from {checkpoint}")
    elif recorded != actual:
        problem = (f"{manifest.directory} was exported from another checkpoint ({weights.get('checkpoint')}, "
                   f"sha256 {str(recorded)[:12]}...) than {checkpoint} (sha256 {actual[:12]}...); "
                   "re-export it with `sam2rt export --checkpoint` from this file")
    else:
        problem = None
    return {"checkpoint": str(checkpoint), "sha256": actual, "manifest_sha256": recorded, "match": problem is None,
            "problem": problem}


def verify(
    model_dir: Path,
    checkpoint: Path,
    images: list[Path] | None = None,
    backend: str = "auto",
    threads: int | None = None,
    ignore_sha256: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Compare an exported model directory with the official model from `checkpoint`; the report as a dict.

    report["passed"] is False when a bound is broken or the checkpoint is not the one the directory
    was exported from (then, unless `ignore_sha256`, nothing else runs).
    """
    from .annotate import read_image
    from .manifest import Manifest
    from .runtime import Predictor, Sam2Model
    from .runtime.backends import create_backend

    t_start = time.perf_counter()
    manifest = Manifest.load(model_dir)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise Sam2rtError(f"checkpoint {checkpoint} does not exist; pass the official SAM 2 .pt file")
    files = image_files(images)
    report: dict[str, Any] = {
        "model_dir": str(model_dir), "model_id": manifest.model.get("model_id"),
        "checkpoint": checkpoint_check(manifest, checkpoint), "images": [], "backends": [], "passed": False,
    }
    if not report["checkpoint"]["match"] and not ignore_sha256:
        report["seconds"] = time.perf_counter() - t_start
        return report
    loaded = {f.name if f.parent == PHOTOS_DIR else str(f): read_image(f) for f in files}
    report["images"] = [{"image": k, "size": [int(v.shape[1]), int(v.shape[0])]} for k, v in loaded.items()]
    manifest.verify_stored_graphs()
    names = backends_to_check(manifest, backend)
    log(f"building the reference (SAM2ImagePredictor) from {checkpoint}")
    ref, _ = build_reference(manifest, checkpoint, threads)
    ref_cache: dict[str, dict] = {}
    passed = True
    for name in names:
        model = Sam2Model(manifest, create_backend(manifest, name, threads))
        precision = str(getattr(model.backend, "precision", "fp32"))
        log(f"{model.backend_name} ({precision}): {len(loaded)} image(s)")
        by_case = compare(ref, Predictor(model), loaded, ref_cache, log)
        overall = Samples.empty()
        for samples in by_case.values():
            overall.extend(samples)
        summary = overall.summary()
        bounds = BOUNDS.get(precision, BOUNDS["fp32"])
        broken = violations(summary, bounds)
        passed &= not broken
        files_used = {slot: entry["file"] for slot, entry in (getattr(model.backend, "files", None) or {}).items()}
        report["backends"].append({
            "backend": name, "device": model.backend.device, "precision": precision, "graphs": files_used,
            "cases": {case: s.summary() for case, s in by_case.items()}, "overall": summary,
            "bounds": asdict(bounds), "violations": broken, "passed": not broken,
        })
        del model
    report["passed"] = passed and report["checkpoint"]["match"]
    report["seconds"] = time.perf_counter() - t_start
    return report


# --- presentation -----------------------------------------------------------------------------
def format_report(report: dict[str, Any]) -> str:
    """The report as the table `sam2rt verify` prints."""
    lines = [f"sam2rt verify: {report['model_id']} in {report['model_dir']}"]
    ck = report["checkpoint"]
    lines.append(f"checkpoint {ck['checkpoint']} (sha256 {ck['sha256'][:12]}...): "
                 + ("the one this directory was exported from" if ck["match"] else f"MISMATCH: {ck['problem']}"))
    if report["images"]:
        lines.append("images: " + ", ".join(f"{i['image']} ({i['size'][0]}x{i['size'][1]})" for i in report["images"]))
    head = (f"{'case':18s} {'calls':>5s} {'masks':>5s} {'logits max':>10s} {'p50':>9s} {'scores max':>10s} "
            f"{'IoU min':>8s} {'p1':>7s} {'p5':>7s} {'p50':>7s}")
    for b in report["backends"]:
        lines += ["", f"{b['backend']} ({b['precision']}, {b['device']}); graphs: "
                  + (", ".join(f"{k} {v}" for k, v in b["graphs"].items()) or "engines")]
        lines.append(head)
        for case, s in [*b["cases"].items(), ("all", b["overall"])]:
            lines.append(f"{case:18s} {s['calls']:5d} {s['masks']:5d} {s['logit_diff_max']:10.3g} {s['logit_diff_p50']:9.3g} "
                         f"{s['score_diff_max']:10.3g} {s['iou_min']:8.4f} {s['iou_p1']:7.4f} {s['iou_p5']:7.4f} "
                         f"{s['iou_p50']:7.4f}")
        bd = b["bounds"]
        lines.append(f"bounds: logits <= {bd['max_logit_diff']:g}, scores <= {bd['max_score_diff']:g}, "
                     f"IoU min >= {bd['min_mask_iou']:g}, IoU p5 >= {bd['p5_mask_iou']:g}: "
                     + ("PASS" if b["passed"] else "FAIL: " + "; ".join(b["violations"])))
    lines += ["", f"{'PASSED' if report['passed'] else 'FAILED'} in {report.get('seconds', 0):.1f} s"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `sam2rt verify` (light: imports nothing heavy)."""
    p.add_argument("--model-dir", type=Path, required=True, help="the exported model directory to check")
    p.add_argument("--checkpoint", type=Path, required=True, help="the official SAM 2 checkpoint (.pt) it was exported from")
    p.add_argument("--images", type=Path, nargs="+", metavar="PATH",
                   help="images or directories of images (default: the photos bundled with sam2rt)")
    p.add_argument("--backend", default="auto",
                   help="backend to check, every precision it would run (default auto); e.g. tensorrt:fp16")
    p.add_argument("--json", type=Path, default=Path("verify.json"), metavar="PATH",
                   help="where to write the report as JSON (default ./verify.json)")
    p.add_argument("--threads", type=int, default=None, help="threads for both sides (default: usable CPUs)")
    p.add_argument("--ignore-sha256", action="store_true",
                   help="compare even if the checkpoint's sha256 is not the one in manifest.json "
                        "(e.g. the same weights saved again); the mismatch still fails the run")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    def log(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    report = verify(args.model_dir, args.checkpoint, args.images, args.backend, args.threads, args.ignore_sha256, log)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"report written to {args.json}", file=sys.stderr)
    if not report["checkpoint"]["match"]:
        print(f"error: {report['checkpoint']['problem']}", file=sys.stderr)
    return 0 if report["passed"] else FAILED
