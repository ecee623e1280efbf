"""The benchmark: sam2rt against the PyTorch reference (SAM2ImagePredictor, eager) on the same inputs, interleaved.

Every timed case runs sam2rt and the reference alternately (the order flips every run), after
warm-up, with the same thread count, so background load hits both sides alike and the ratios
stay fair on a shared machine. Figures are per call in milliseconds with p50/p90/p99; the
ratio of a case is reference p50 / sam2rt p50 (> 1: sam2rt is faster).

Torch and sam2 are imported only here (the reference side); the runtime being measured never
imports them.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .child import synthetic_image

# What sam2rt must reach against the reference on the CPU, each as (description, kind, threshold): speedups
# are ratios of medians from one interleaved run (hiera_tiny); rss_fraction is sam2rt's peak RSS over the
# reference's. evaluate_targets reports each as met or missed.
TARGETS = {
    "predict_point_cached": ("single-point predict on a cached embedding (640x480)", "speedup", 3.0),
    "embed": ("set_image / embed, default FP32 (640x480)", "speedup", 1.5),
    "batch16_vs_singles": ("16-box batch decode per prompt vs 16 single reference calls", "speedup", 3.0),
    "peak_rss": ("peak RSS of a process that loads hiera_tiny and answers one prompt", "rss_fraction", 0.5),
}


@dataclass
class BenchConfig:
    model_dir: Path
    backend: str = "onnxruntime-cpu"
    runs: int = 10
    warmup: int = 2
    quick: bool = False
    out: Path | None = None
    threads: int | None = None
    reference: bool = True
    subprocesses: bool = True
    int8: bool = True
    flops: bool = True
    label: str | None = None
    progress: bool = True
    batch_sizes: tuple[int, ...] = (4, 16, 64)
    single_call_batches: tuple[int, ...] = (4, 16)
    cold_repeats: int = 3
    notes: list[str] = field(default_factory=list)

    def finalize(self) -> "BenchConfig":
        if self.quick:
            self.runs = min(self.runs, 2)
            self.warmup = min(self.warmup, 1)
            self.batch_sizes = tuple(b for b in self.batch_sizes if b <= 16) or (4,)
            self.single_call_batches = tuple(b for b in self.single_call_batches if b <= 16) or (16,)
            self.cold_repeats = 1
        if self.threads is None:
            try:
                self.threads = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover
                self.threads = os.cpu_count() or 1
        self.model_dir = Path(self.model_dir)
        return self


# --- statistics ---------------------------------------------------------------------------
def stats_ms(samples_s: list[float], per: int = 1) -> dict[str, Any]:
    """p50/p90/p99/mean/min/max in milliseconds (divided by `per`, e.g. prompts per call)."""
    a = np.asarray(samples_s, dtype=np.float64) * 1e3 / per
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "p50": round(float(np.percentile(a, 50)), 3),
        "p90": round(float(np.percentile(a, 90)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
        "min": round(float(a.min()), 3),
        "max": round(float(a.max()), 3),
        "samples_ms": [round(float(x), 3) for x in a],
    }


class Progress:
    """A rich progress bar over the benchmark's steps (plain lines on stderr without rich)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.completed = 0
        self._bar = None
        if not enabled:
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(
                TextColumn("[bold]bench[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("starting", total=total)
        except ImportError:
            self._bar = None

    def describe(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, description=text)
        else:
            print(f"bench: {text}", file=sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        self.completed += n
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def advance_to(self, completed: int) -> None:
        """Move on to `completed` steps (never back): where a case ends, whatever it advanced itself."""
        if completed > self.completed:
            self.advance(completed - self.completed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description="done")
            self._bar.stop()


COOLDOWN_S = 0.02


def interleaved(
    ours: Callable[[], Any], ref: Callable[[], Any] | None, runs: int, warmup: int, progress: Progress | None = None
) -> tuple[list[float], list[float]]:
    """Time `ours` and `ref` alternately (order flipped every run) after `warmup` untimed rounds.

    Before each timed call: a garbage collection and a COOLDOWN_S pause, so worker threads still
    spinning after the previous call (PyTorch's OpenMP pool busy-waits after a parallel region)
    do not eat into the next call's cores; this keeps the two sides from slowing each other down.
    """
    t_ours: list[float] = []
    t_ref: list[float] = []
    for i in range(warmup + runs):
        order = [("ours", ours), ("ref", ref)] if i % 2 == 0 else [("ref", ref), ("ours", ours)]
        for who, fn in order:
            if fn is None:
                continue
            gc.collect()
            time.sleep(COOLDOWN_S)
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                (t_ours if who == "ours" else t_ref).append(dt)
        if progress is not None:
            progress.advance()
    return t_ours, t_ref


# --- the reference ------------------------------------------------------------------------
def build_reference(manifest, threads: int, workdir: Path) -> tuple[Any, dict[str, Any]]:
    """SAM2ImagePredictor with the model directory's weights, and how to rebuild it in a child process."""
    import torch
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from ..export.checkpoint import reference_checkpoint
    from ..model_specs import get_spec

    torch.set_num_threads(threads)
    spec = get_spec(manifest.model_name, manifest.model.get("version", "2.1"))
    ckpt = reference_checkpoint(manifest, workdir)
    model = build_sam2(spec.config_name, ckpt_path=str(ckpt), device="cpu")
    return SAM2ImagePredictor(model), {"config": spec.config_name, "checkpoint": str(ckpt)}


def _parity(ours: tuple, ref: tuple) -> dict[str, float]:
    lr = float(np.abs(np.asarray(ours[2]) - np.asarray(ref[2])).max())
    sc = float(np.abs(np.asarray(ours[1]) - np.asarray(ref[1])).max())
    a, b = np.asarray(ours[0]) > 0, np.asarray(ref[0]) > 0
    inter, union = np.logical_and(a, b).sum(), np.logical_or(a, b).sum()
    return {"low_res_logits_max_abs_diff": lr, "scores_max_abs_diff": sc, "mask_iou": float(inter / union) if union else 1.0}


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a > 0, b > 0
    inter = np.logical_and(a, b).sum(axis=(-1, -2))
    union = np.logical_or(a, b).sum(axis=(-1, -2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# --- cold start / peak memory ----------------------------------------------------------------
def run_child(args: list[str], timeout: float = 600, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m sam2rt.bench.child ARGS` in a fresh process; its JSON plus the spawn-to-exit wall time."""
    env = dict(os.environ, **(env_extra or {}))
    env.setdefault("PYTHONWARNINGS", "ignore")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sam2rt.bench.child", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SAM2RT_BENCH_CHILD ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"benchmark child {args[0]} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(line.split(" ", 1)[1])
    out["process_wall_s"] = wall
    return out


def _summ(values: list[float], digits: int = 3) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.median(a)), digits), "min": round(float(a.min()), digits),
            "max": round(float(a.max()), digits), "n": int(a.size), "samples": [round(float(x), digits) for x in a]}


# --- sizes ------------------------------------------------------------------------------------
def model_sizes(model_dir: Path, ref_info: dict[str, Any] | None) -> dict[str, Any]:
    from ..manifest import Manifest

    manifest = Manifest.load(model_dir)
    files = {}
    for g in manifest.data["graphs"].values():
        if (model_dir / g["file"]).is_file():  # a lean export (--target) leaves some base graphs out
            files[g["file"]] = (model_dir / g["file"]).stat().st_size
        for v in (g.get("variants") or {}).values():
            p = model_dir / v["file"]
            if p.is_file():
                files[v["file"]] = p.stat().st_size
    for sub in ("engines",):
        d = model_dir / sub
        if d.is_dir():
            for p in d.rglob("*"):
                if p.is_file():
                    files[str(p.relative_to(model_dir))] = p.stat().st_size
    mib = {k: round(v / 2**20, 2) for k, v in sorted(files.items())}
    out: dict[str, Any] = {"files_mib": mib, "total_dir_mib": round(sum(files.values()) / 2**20, 2)}
    try:
        from ..runtime.backends.onnxruntime_backend import cpu_graph_entries

        loaded = cpu_graph_entries(manifest, "fp32")
        out["loaded_by_cpu_fp32_mib"] = round(sum(files.get(e["file"], 0) for e in loaded.values()) / 2**20, 2)
    except Exception:  # pragma: no cover
        pass
    if ref_info and ref_info.get("checkpoint") and Path(ref_info["checkpoint"]).is_file():
        out["reference_checkpoint_mib"] = round(Path(ref_info["checkpoint"]).stat().st_size / 2**20, 2)
    return out


# --- the benchmark: a context, and the list of cases that run in it -------------------------
@dataclass
class BenchContext:
    """What the cases share: the configuration, the result document they fill in, the two predictors
    (set by the `load` case) and the test images. A case that leaves a predictor on another image than
    the one `use_image` last set says so with `ctx.image_set = None`."""

    cfg: BenchConfig
    manifest: Any
    result: dict[str, Any]
    progress: Progress
    workdir: Path
    images: dict[str, np.ndarray] = field(default_factory=dict)
    ours: Any = None
    ref: Any = None
    ref_info: dict[str, Any] | None = None
    image_set: str | None = None

    @property
    def heavy_runs(self) -> int:
        """Timed runs of the end-to-end cases (two embeds per run, so fewer than `runs`)."""
        return 1 if self.cfg.quick else max(1, self.cfg.runs // 3)

    @property
    def rounds(self) -> int:
        """Progress steps of one interleaved case: one per warm-up or timed round."""
        return self.cfg.warmup + self.cfg.runs

    @property
    def has_int8(self) -> bool:
        return (self.manifest.variant("encoder", "int8") is not None and self.cfg.int8
                and self.cfg.backend == "onnxruntime-cpu")

    def describe(self, text: str) -> None:
        self.progress.describe(text)

    def timed(self, ours: Callable[[], Any], ref: Callable[[], Any] | None, runs: int | None = None,
             warmup: int | None = None) -> tuple[list[float], list[float]]:
        """`interleaved` with the configured runs and warm-up (ref None: sam2rt alone), advancing the progress."""
        return interleaved(ours, ref, self.cfg.runs if runs is None else runs,
                           self.cfg.warmup if warmup is None else warmup, self.progress)

    def record(self, name: str, desc: str, t_ours: list[float], t_ref: list[float], per: int = 1, **extra) -> None:
        """One entry of result["cases"]: sam2rt's figures, the reference's and their p50 ratio (per prompt if per > 1)."""
        entry = {"description": desc, "sam2rt": stats_ms(t_ours, per), **extra}
        if t_ref:
            entry["reference"] = stats_ms(t_ref, per)
            entry["speedup_p50"] = round(entry["reference"]["p50"] / entry["sam2rt"]["p50"], 3)
        if per > 1:
            entry["per"] = f"per prompt ({per} prompts per call)"
        self.result["cases"][name] = entry

    def use_image(self, size: str) -> np.ndarray:
        """Set images[size] on sam2rt and the reference (skipped when it is already set); return it."""
        img = self.images[size]
        if self.image_set != size:
            self.ours.set_image(img)
            if self.ref is not None:
                self.ref.set_image(img)
            self.image_set = size
        return img

    def ref_or_none(self, fn: Callable[[], Any]) -> Callable[[], Any] | None:
        """fn when the reference is loaded, else None (sam2rt timed alone)."""
        return fn if self.ref is not None else None


@dataclass(frozen=True)
class BenchCase:
    """One case: `run(ctx)` measures and writes into ctx.result; `steps(ctx)` is how many progress steps it
    takes; `applies(ctx)` says whether it runs with this configuration."""

    name: str
    run: Callable[[BenchContext], None]
    steps: Callable[[BenchContext], int] = lambda ctx: 1
    applies: Callable[[BenchContext], bool] = lambda ctx: True


def case_machine_peak(ctx: BenchContext) -> None:
    """This machine's peak FP32 matmul rate (the FLOPs case reports fractions of it)."""
    from .machine import measure_peak_flops

    ctx.describe("measuring this machine's peak FP32 matmul")
    quick = ctx.cfg.quick
    ctx.result["machine"]["peak"] = measure_peak_flops(n=1024 if quick else 2048, repeats=3 if quick else 5)


def case_load(ctx: BenchContext) -> None:
    """Load sam2rt's Predictor and (unless --no-reference) SAM2ImagePredictor; every later case uses them."""
    from ..runtime import Predictor

    cfg, result = ctx.cfg, ctx.result
    ctx.describe("loading sam2rt and the reference")
    t0 = time.perf_counter()
    ours = ctx.ours = Predictor.from_dir(cfg.model_dir, backend=cfg.backend, threads=cfg.threads)
    result["load_in_process_s"] = {"sam2rt": round(time.perf_counter() - t0, 3)}
    result["sam2rt_backend"] = {
        "name": ours.model.backend_name,
        "precision": getattr(ours.model.backend, "precision", "fp32"),
        "graph_files": {k: v["file"] for k, v in getattr(ours.model.backend, "files", {}).items()},
        "spinning": getattr(ours.model.backend, "spinning", None),
    }
    if cfg.reference:
        t0 = time.perf_counter()
        ctx.ref, ctx.ref_info = build_reference(ctx.manifest, cfg.threads, ctx.workdir)
        result["load_in_process_s"]["reference"] = round(time.perf_counter() - t0, 3)


def case_embed(ctx: BenchContext) -> None:
    """set_image / embed at 640x480 (leaves that image set on both sides)."""
    img = ctx.images["640x480"]
    ctx.describe("embed / set_image 640x480")
    t_o, t_r = ctx.timed(lambda: ctx.ours.set_image(img), ctx.ref_or_none(lambda: ctx.ref.set_image(img)))
    ctx.image_set = "640x480"
    ctx.record("embed", "set_image / embed, 640x480 image (preprocess + encoder)", t_o, t_r)


def case_preprocess(ctx: BenchContext) -> None:
    """Preprocessing alone (resize to 1024, normalise): what `embed` runs, the backend's preprocess (on the CPU
    backend the package's preprocess.onnx; a device backend's leaves its image on the device)."""
    img = ctx.images["640x480"]
    ctx.describe("preprocessing 640x480")
    model = ctx.ours.model
    t_o, t_r = ctx.timed(lambda: model.backend.preprocess(img, model.image_size),
                         ctx.ref_or_none(lambda: ctx.ref._transforms(img)))
    ctx.record("preprocess", "preprocessing alone (resize to 1024, normalise), 640x480", t_o, t_r)


PROMPT_CASES = ("predict_point_cached", "decode_box", "decode_box_points")


def case_predict_prompts(ctx: BenchContext) -> None:
    """predict on a cached 640x480 embedding (postprocessing included) for a point, a box, a box + points;
    each checked against the reference (parity_spot_check)."""
    h, w = ctx.use_image("640x480").shape[:2]
    box = np.array([0.2 * w, 0.2 * h, 0.7 * w, 0.8 * h])
    prompt_cases = {
        "predict_point_cached": ("1 point, multimask, cached embedding, masks at 640x480",
                                 dict(point_coords=np.array([[0.5 * w, 0.45 * h]]), point_labels=np.array([1]))),
        "decode_box": ("1 box, single mask, cached embedding, masks at 640x480", dict(box=box, multimask_output=False)),
        "decode_box_points": ("1 box + 2 points, single mask, cached embedding, masks at 640x480",
                              dict(box=box, point_coords=np.array([[0.4 * w, 0.5 * h], [0.25 * w, 0.7 * h]]),
                                   point_labels=np.array([1, 0]), multimask_output=False)),
    }
    assert tuple(prompt_cases) == PROMPT_CASES
    parity = {}
    for name, (desc, kw) in prompt_cases.items():
        ctx.describe(name)
        t_o, t_r = ctx.timed(lambda kw=kw: ctx.ours.predict(**kw), ctx.ref_or_none(lambda kw=kw: ctx.ref.predict(**kw)))
        ctx.record(name, desc, t_o, t_r)
        if ctx.ref is not None:
            parity[name] = _parity(ctx.ours.predict(**kw), ctx.ref.predict(**kw))
    ctx.result["parity_spot_check"] = parity


def case_decoder_only(ctx: BenchContext) -> None:
    """sam2rt's decoder graph alone and its postprocessing alone, to split predict's time (no reference side)."""
    h, w = ctx.use_image("640x480").shape[:2]
    model, emb = ctx.ours.model, ctx.ours.embedding
    ctx.describe("decoder only (sam2rt)")
    xy = np.array([[[0.5 * 1024, 0.45 * 1024], [0.0, 0.0]]], np.float32)
    lab = np.array([[1.0, -1.0]], np.float32)
    t_o, _ = ctx.timed(lambda: model.decode_raw(emb, xy, lab, None), None)
    ctx.record("decoder_only_point", "sam2rt decoder graph alone, 1 point, no postprocessing (no reference counterpart)",
               t_o, [])
    low_res, iou = model.decode_raw(emb, xy, lab, None)
    t_o, _ = ctx.timed(lambda: model.finish(low_res, iou, (h, w), True), None)
    ctx.record("postprocess_640x480", "sam2rt postprocessing alone: token choice + upsample 3 masks to 640x480 + threshold",
               t_o, [])


def case_batches(ctx: BenchContext) -> None:
    """Batches of random boxes in one predict call, per prompt; for single_call_batches also a sam2rt batch
    against as many single reference calls."""
    h, w = ctx.use_image("640x480").shape[:2]
    ours, ref = ctx.ours, ctx.ref
    rng = np.random.default_rng(3)
    for b in ctx.cfg.batch_sizes:
        x0 = rng.uniform(0, 0.6 * w, b)
        y0 = rng.uniform(0, 0.6 * h, b)
        boxes = np.stack([x0, y0, x0 + rng.uniform(0.1, 0.4, b) * w, y0 + rng.uniform(0.1, 0.4, b) * h], axis=1)
        ctx.describe(f"{b} boxes in one call")
        kw = dict(box=boxes, multimask_output=False)
        t_o, t_r = ctx.timed(lambda kw=kw: ours.predict(**kw), ctx.ref_or_none(lambda kw=kw: ref.predict(**kw)))
        ctx.record(f"batch{b}", f"{b} boxes in one predict call (reference batched too), masks at 640x480", t_o, t_r, per=b)
        if b in ctx.cfg.single_call_batches and ref is not None:
            ctx.describe(f"{b} boxes: sam2rt batch vs {b} single reference calls")

            def ref_singles(boxes=boxes):
                for bx in boxes:
                    ref.predict(box=bx, multimask_output=False)

            t_o, t_r = ctx.timed(lambda kw=kw: ours.predict(**kw), ref_singles)
            ctx.record(f"batch{b}_vs_singles", f"{b} boxes: one sam2rt batch call vs {b} single reference calls",
                       t_o, t_r, per=b)


def _batch_steps(ctx: BenchContext) -> int:
    singles = [b for b in ctx.cfg.batch_sizes if b in ctx.cfg.single_call_batches] if ctx.cfg.reference else []
    return ctx.rounds * (len(ctx.cfg.batch_sizes) + len(singles))


def case_predict_1080p(ctx: BenchContext) -> None:
    """1-point predict on a cached 1920x1080 embedding (masks upsampled to 1920x1080)."""
    H, W = ctx.use_image("1920x1080").shape[:2]
    kw = dict(point_coords=np.array([[0.5 * W, 0.45 * H]]), point_labels=np.array([1]))
    ctx.describe("predict 1920x1080 (cached embedding)")
    t_o, t_r = ctx.timed(lambda: ctx.ours.predict(**kw), ctx.ref_or_none(lambda: ctx.ref.predict(**kw)))
    ctx.record("predict_point_cached_1080p", "1 point, multimask, cached embedding, masks at 1920x1080", t_o, t_r)


def case_end_to_end(ctx: BenchContext) -> None:
    """set_image + 1-point predict at each image size (heavy_runs timed runs, at most 1 warm-up)."""
    ours, ref = ctx.ours, ctx.ref
    for size, im in ctx.images.items():
        ih, iw = im.shape[:2]
        kw = dict(point_coords=np.array([[0.5 * iw, 0.45 * ih]]), point_labels=np.array([1]))
        ctx.describe(f"set_image + predict end to end {size}")

        def e2e_ours(im=im, kw=kw):
            ours.set_image(im)
            return ours.predict(**kw)

        def e2e_ref(im=im, kw=kw):
            ref.set_image(im)
            return ref.predict(**kw)

        t_o, t_r = ctx.timed(e2e_ours, ctx.ref_or_none(e2e_ref), ctx.heavy_runs, min(ctx.cfg.warmup, 1))
        ctx.image_set = None
        ctx.record(f"e2e_{size}", f"set_image + 1-point predict end to end, {size} image", t_o, t_r)


def case_int8(ctx: BenchContext) -> None:
    """The opt-in INT8 encoder: its embed time against FP32, and the masks it keeps against FP32's."""
    from ..runtime import Predictor

    img = ctx.images["640x480"]
    ctx.describe("INT8 encoder (opt-in): speed")
    q = Predictor.from_dir(ctx.cfg.model_dir, backend="onnxruntime-cpu:int8", threads=ctx.cfg.threads)
    t_q, t_f = interleaved(lambda: q.set_image(img), lambda: ctx.ours.set_image(img), ctx.cfg.runs, ctx.cfg.warmup, None)
    ctx.progress.advance()
    ctx.describe("INT8 encoder (opt-in): mask IoU vs FP32")
    ctx.result["int8"] = {
        "what": "encoder MatMul/Gemm weights INT8 (dynamic quantisation, per-channel); decoder FP32; OPT-IN "
                "(backend='onnxruntime-cpu:int8'), never the default",
        "embed_int8": stats_ms(t_q),
        "embed_fp32": stats_ms(t_f),
        "speedup_vs_fp32_p50": round(float(np.median(t_f) / np.median(t_q)), 3),
        **int8_agreement(ctx.ours, q, quick=ctx.cfg.quick),
    }
    ctx.image_set = None
    ctx.progress.advance()


def case_cold_start(ctx: BenchContext) -> None:
    """Cold start and peak RSS, each in a fresh process; sam2rt and the reference alternate, and sam2rt's
    opt-in low-memory mode runs once."""
    cfg, result, ref_info = ctx.cfg, ctx.result, ctx.ref_info
    ours_runs, ref_runs, lowmem_runs = [], [], []
    ours_args = ["sam2rt", "--model-dir", str(cfg.model_dir), "--backend", cfg.backend, "--threads", str(cfg.threads)]
    ref_args = (["reference", "--config", ref_info["config"], "--checkpoint", ref_info["checkpoint"],
                 "--threads", str(cfg.threads)] if ref_info else None)
    for i in range(cfg.cold_repeats):
        ctx.describe(f"cold start + peak RSS in fresh processes ({i + 1}/{cfg.cold_repeats})")
        order = [(ours_runs, ours_args), (ref_runs, ref_args)]
        for bucket, args in (order if i % 2 == 0 else order[::-1]):
            if args is not None:
                bucket.append(run_child(args))
        if cfg.backend == "onnxruntime-cpu" and i == 0:
            lowmem_runs.append(run_child(ours_args, env_extra={"SAM2RT_LOW_MEMORY": "1"}))
        ctx.progress.advance()
    cold = result["cold_start"] = {
        "what": "fresh process: interpreter start + import + load model + set_image + 1-point predict (640x480); "
                "process wall time from spawn to exit",
        "sam2rt": cold_summary(ours_runs),
    }
    if lowmem_runs:
        cold["sam2rt_low_memory_opt_in"] = cold_summary(lowmem_runs)
    if not ref_runs:
        result["peak_rss"] = {"sam2rt_mib": cold["sam2rt"]["peak_rss_mib"]["p50"]}
        return
    cold["reference"] = cold_summary(ref_runs)
    cold["speedup_p50"] = round(cold["reference"]["process_wall_s"]["p50"] / cold["sam2rt"]["process_wall_s"]["p50"], 3)
    rss = result["peak_rss"] = {
        "what": "ru_maxrss of a fresh process that loads hiera_tiny and answers one prompt",
        "sam2rt_mib": cold["sam2rt"]["peak_rss_mib"]["p50"],
        "reference_mib": cold["reference"]["peak_rss_mib"]["p50"],
    }
    rss["fraction_of_reference"] = round(rss["sam2rt_mib"] / rss["reference_mib"], 3)
    if lowmem_runs:
        lm = cold["sam2rt_low_memory_opt_in"]["peak_rss_mib"]["p50"]
        rss["sam2rt_low_memory_opt_in_mib"] = lm
        rss["low_memory_opt_in_fraction_of_reference"] = round(lm / rss["reference_mib"], 3)


def case_sizes(ctx: BenchContext) -> None:
    """File sizes of the model directory, what the CPU backend loads, and the reference's parameters."""
    ctx.describe("model sizes")
    sizes = ctx.result["sizes"] = model_sizes(ctx.cfg.model_dir, ctx.ref_info)
    if ctx.ref is not None:
        n_params = sum(p.numel() for p in ctx.ref.model.parameters())
        sizes["reference_parameters"] = int(n_params)
        sizes["reference_parameters_fp32_mib"] = round(n_params * 4 / 2**20, 2)


def case_flops(ctx: BenchContext) -> None:
    """FLOPs counted from a profiled ONNX Runtime run of each graph, and the fraction of this machine's peak
    that the timed embed and decoder_only_point cases reach."""
    ctx.describe("counting FLOPs (profiled ORT run of each graph)")
    try:
        from .flops import count_model
    except ImportError as exc:
        ctx.result["flops"] = {"skipped": f"needs onnx ({exc})"}
        return
    fl = count_model(ctx.cfg.model_dir, ctx.cfg.threads)
    peak = ctx.result["machine"]["peak"]["peak_gflops"]
    for role, case in (("encoder", "embed"), ("decoder", "decoder_only_point")):
        timed = ctx.result["cases"].get(case)
        if timed is None:
            continue
        p50_s = timed["sam2rt"]["p50"] / 1e3
        fl[role]["achieved_gflops_per_s_end_to_end"] = round(fl[role]["gflops"] / p50_s, 2)
        fl[role]["fraction_of_peak"] = round(fl[role]["gflops"] / p50_s / peak, 4)
        fl[role]["timed_case"] = case
    ctx.result["flops"] = fl


# The benchmark, in the order it runs. `load` comes before every case that uses a predictor; `flops`
# after `embed` and `decoder_only`, whose times it divides by.
CASES: tuple[BenchCase, ...] = (
    BenchCase("machine_peak", case_machine_peak),
    BenchCase("load", case_load),
    BenchCase("embed", case_embed, steps=lambda ctx: ctx.rounds),
    BenchCase("preprocess", case_preprocess, steps=lambda ctx: ctx.rounds),
    BenchCase("predict_prompts", case_predict_prompts, steps=lambda ctx: ctx.rounds * len(PROMPT_CASES)),
    BenchCase("decoder_only", case_decoder_only, steps=lambda ctx: ctx.rounds * 2),
    BenchCase("batches", case_batches, steps=_batch_steps),
    BenchCase("predict_1080p", case_predict_1080p, steps=lambda ctx: ctx.rounds),
    BenchCase("end_to_end", case_end_to_end,
              steps=lambda ctx: len(ctx.images) * (ctx.heavy_runs + min(ctx.cfg.warmup, 1))),
    BenchCase("int8", case_int8, steps=lambda ctx: 2, applies=lambda ctx: ctx.has_int8),
    BenchCase("cold_start", case_cold_start, steps=lambda ctx: ctx.cfg.cold_repeats, applies=lambda ctx: ctx.cfg.subprocesses),
    BenchCase("sizes", case_sizes),
    BenchCase("flops", case_flops, applies=lambda ctx: ctx.cfg.flops),
)


def new_result(cfg: BenchConfig, manifest) -> dict[str, Any]:
    """The result document before any case has run: what was measured, where, with what."""
    from .machine import machine_info, versions

    result: dict[str, Any] = {
        "schema": "sam2rt-bench/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "dir": str(cfg.model_dir),
            "model_id": manifest.model.get("model_id"),
            "weights": manifest.describe_weights(),
            "random_weights": manifest.random_weights,
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": machine_info(cfg.label),
        "versions": versions(),
        "threads": {"sam2rt_intra_op": cfg.threads, "torch": cfg.threads, "numpy_blas": "default (all usable cores)"},
        "cases": {},
        "notes": list(cfg.notes),
    }
    if manifest.random_weights:
        result["notes"].append(
            "RANDOM seeded weights (no checkpoint can be downloaded here): timings and memory are those of the real "
            "architecture, but masks are meaningless, so IoU figures only compare implementations, not quality."
        )
    return result


def run_benchmark(cfg: BenchConfig, cases: tuple[BenchCase, ...] = CASES) -> dict[str, Any]:
    """Run each case of `cases` that applies, in order, with progress; return the result document
    (see write_outputs for the files)."""
    import logging

    from ..manifest import Manifest
    from .machine import load_average

    cfg.finalize()
    logging.getLogger("sam2rt").setLevel(logging.ERROR)
    manifest = Manifest.load(cfg.model_dir)
    result = new_result(cfg, manifest)
    with tempfile.TemporaryDirectory(prefix="sam2rt-bench-") as tmp:
        ctx = BenchContext(cfg, manifest, result, Progress(0, False), Path(tmp),
                           images={"640x480": synthetic_image(480, 640, seed=1),
                                   "1920x1080": synthetic_image(1080, 1920, seed=2)})
        todo = [case for case in cases if case.applies(ctx)]
        ctx.progress = Progress(sum(case.steps(ctx) for case in todo), cfg.progress)
        try:
            done = 0
            for case in todo:
                case.run(ctx)
                done += case.steps(ctx)
                ctx.progress.advance_to(done)  # a case that advanced less (a skipped part) still lands here
            result["machine"]["load_average_at_end"] = load_average()
            result["targets"] = evaluate_targets(result)
        finally:
            ctx.progress.close()
    return result


def cold_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "process_wall_s": _summ([r["process_wall_s"] for r in runs]),
        "import_s": _summ([r["import_s"] for r in runs]),
        "load_s": _summ([r["load_s"] for r in runs]),
        "first_result_s": _summ([r["first_result_s"] for r in runs]),
        "peak_rss_mib": _summ([r["peak_rss_mib"] for r in runs], 1),
        "torch_imported": any(r["torch_imported"] for r in runs),
    }


def int8_agreement(fp32, int8, quick: bool = False) -> dict[str, Any]:
    """Mask IoU (thresholded, at original size) and logit/score differences of the INT8 encoder vs FP32.

    Over several images (synthetic, plus scikit-image's photos when installed) and prompts (1 point,
    a 3x3 grid of single points, a box); all three multimask outputs of point prompts count.
    """
    imgs = {"synthetic_640x480": synthetic_image(480, 640, seed=5)}
    if not quick:
        imgs["synthetic_1920x1080"] = synthetic_image(1080, 1920, seed=6)
        try:
            from skimage import data

            for name in ("astronaut", "coffee", "chelsea"):
                im = getattr(data, name)()
                imgs[name] = np.ascontiguousarray(im[..., :3])
        except ImportError:
            pass
    ious, lr_diff, sc_diff = [], [], []
    for im in imgs.values():
        fp32.set_image(im)
        int8.set_image(im)
        h, w = im.shape[:2]
        prompts = [dict(point_coords=np.array([[fx * w, fy * h]]), point_labels=np.array([1]))
                   for fx in (0.25, 0.5, 0.75) for fy in (0.25, 0.5, 0.75)]
        prompts.append(dict(box=np.array([0.2 * w, 0.2 * h, 0.7 * w, 0.8 * h]), multimask_output=False))
        for kw in prompts:
            a, b = fp32.predict(**kw), int8.predict(**kw)
            ious.extend(np.atleast_1d(mask_iou(a[0], b[0])).tolist())
            lr_diff.append(float(np.abs(a[2] - b[2]).max()))
            sc_diff.append(float(np.abs(a[1] - b[1]).max()))
    ious_a = np.asarray(ious)
    return {
        "agreement": {
            "images": list(imgs),
            "masks_compared": int(ious_a.size),
            "mask_iou_vs_fp32_mean": round(float(ious_a.mean()), 4),
            "mask_iou_vs_fp32_p05": round(float(np.percentile(ious_a, 5)), 4),
            "mask_iou_vs_fp32_min": round(float(ious_a.min()), 4),
            "low_res_logits_max_abs_diff": round(max(lr_diff), 4),
            "scores_max_abs_diff": round(max(sc_diff), 4),
            "parity_with_reference": "NO: INT8 breaks the 1e-3 logit parity by design; opt-in only",
        }
    }


def evaluate_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Each of TARGETS: the measured value, the threshold, met or missed (and by how much)."""
    cases = result["cases"]
    out = {}

    def speed(key: str, case: str) -> None:
        desc, _, thr = TARGETS[key]
        c = cases.get(case, {})
        val = c.get("speedup_p50")
        out[key] = {"description": desc, "case": case, "threshold": f">= {thr}x", "measured": val,
                    "met": None if val is None else bool(val >= thr)}
        if val is not None and val < thr:
            out[key]["shortfall"] = f"{val:.2f}x of {thr}x ({100 * (thr - val) / thr:.0f}% short)"

    speed("predict_point_cached", "predict_point_cached")
    speed("embed", "embed")
    speed("batch16_vs_singles", "batch16_vs_singles")
    desc, _, thr = TARGETS["peak_rss"]
    frac = result.get("peak_rss", {}).get("fraction_of_reference")
    out["peak_rss"] = {"description": desc, "threshold": f"<= {thr} of the reference", "measured": frac,
                       "met": None if frac is None else bool(frac <= thr)}
    if frac is not None and frac > thr:
        out["peak_rss"]["shortfall"] = f"{frac:.2f} of the reference's RSS (target {thr})"
    return out


# --- output files -----------------------------------------------------------------------------
def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def result_stem(result: dict[str, Any]) -> str:
    date = result["created"][:10]
    cpu = result["machine"]["cpu"]
    label = result["config"].get("label") or f"{slug(cpu['model'])}-{cpu['usable_cpus']}cpu"
    model = slug(str(result["model"].get("model_id") or "model"))
    return f"{date}_{slug(label)}_{model}_{slug(result['config']['backend'])}"


def write_outputs(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write STEM.json, STEM.md and the PNG plots (when matplotlib is installed) to out_dir."""
    from .report import markdown_report, plot_batch, plot_latency

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(result)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    try:
        paths["latency_png"] = plot_latency(result, out_dir / f"{stem}_latency.png")
        paths["batch_png"] = plot_batch(result, out_dir / f"{stem}_batch.png")
    except ImportError as exc:
        result["notes"].append(f"plots skipped: {exc}")
    result["files"] = {k: p.name for k, p in paths.items()}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["markdown"].write_text(markdown_report(result))
    return paths
