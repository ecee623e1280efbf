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

# The targets (hiera_tiny, CPU, medians, same run).
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
        if self._bar is not None:
            self._bar.advance(self._task, n)

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
    from ..models import get_spec

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
    for role, g in manifest.data["graphs"].items():
        if (model_dir / g["file"]).is_file():  # a lean export (--target) leaves some base graphs out
            files[g["file"]] = (model_dir / g["file"]).stat().st_size
        for name, v in (g.get("variants") or {}).items():
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


# --- the benchmark --------------------------------------------------------------------------
def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Run every case; return the result document (see write_outputs for the files)."""
    import logging

    from ..manifest import Manifest
    from ..runtime import Predictor
    from ..runtime.preprocess import preprocess
    from .machine import load_average, machine_info, measure_peak_flops, versions

    cfg.finalize()
    logging.getLogger("sam2rt").setLevel(logging.ERROR)
    manifest = Manifest.load(cfg.model_dir)
    threads = cfg.threads
    runs, warmup = cfg.runs, cfg.warmup
    heavy_runs = max(1, runs // 3) if not cfg.quick else 1  # set_image + predict end to end (two embeds per run)
    has_int8 = manifest.variant("encoder", "int8") is not None and cfg.int8 and cfg.backend == "onnxruntime-cpu"

    n_steps = (
        2  # peak flops, load
        + (warmup + runs) * 10  # embed, preprocess, point/box/box+points, 2 sizes predict, decoder-only, ...
        + (warmup + runs) * (len(cfg.batch_sizes) * 2 + len(cfg.single_call_batches))
        + (warmup + heavy_runs) * 2
        + (cfg.cold_repeats if cfg.subprocesses else 0)
        + (2 if has_int8 else 0) + (1 if cfg.flops else 0)
    )
    prog = Progress(n_steps, cfg.progress)
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
        "threads": {"sam2rt_intra_op": threads, "torch": threads, "numpy_blas": "default (all usable cores)"},
        "cases": {},
        "notes": list(cfg.notes),
    }
    if manifest.random_weights:
        result["notes"].append(
            "RANDOM seeded weights (no checkpoint can be downloaded here): timings and memory are those of the real "
            "architecture, but masks are meaningless, so IoU figures only compare implementations, not quality."
        )
    try:
        with tempfile.TemporaryDirectory(prefix="sam2rt-bench-") as tmp:
            prog.describe("measuring this machine's peak FP32 matmul")
            result["machine"]["peak"] = measure_peak_flops(n=1024 if cfg.quick else 2048, repeats=3 if cfg.quick else 5)
            prog.advance()

            prog.describe("loading sam2rt and the reference")
            t0 = time.perf_counter()
            ours = Predictor.from_dir(cfg.model_dir, backend=cfg.backend, threads=threads)
            result["load_in_process_s"] = {"sam2rt": round(time.perf_counter() - t0, 3)}
            result["sam2rt_backend"] = {
                "name": ours.model.backend_name,
                "precision": getattr(ours.model.backend, "precision", "fp32"),
                "graph_files": {k: v["file"] for k, v in getattr(ours.model.backend, "files", {}).items()},
                "spinning": getattr(ours.model.backend, "spinning", None),
            }
            ref = ref_info = None
            if cfg.reference:
                t0 = time.perf_counter()
                ref, ref_info = build_reference(manifest, threads, Path(tmp))
                result["load_in_process_s"]["reference"] = round(time.perf_counter() - t0, 3)
            prog.advance()

            images = {"640x480": synthetic_image(480, 640, seed=1), "1920x1080": synthetic_image(1080, 1920, seed=2)}
            cases = result["cases"]

            def record(name: str, desc: str, t_ours: list[float], t_ref: list[float], per: int = 1, **extra) -> None:
                entry = {"description": desc, "sam2rt": stats_ms(t_ours, per), **extra}
                if t_ref:
                    entry["reference"] = stats_ms(t_ref, per)
                    entry["speedup_p50"] = round(entry["reference"]["p50"] / entry["sam2rt"]["p50"], 3)
                if per > 1:
                    entry["per"] = f"per prompt ({per} prompts per call)"
                cases[name] = entry

            # 1. embed (set_image) and preprocessing alone
            img = images["640x480"]
            prog.describe("embed / set_image 640x480")
            t_o, t_r = interleaved(lambda: ours.set_image(img), (lambda: ref.set_image(img)) if ref else None,
                                   runs, warmup, prog)
            record("embed", "set_image / embed, 640x480 image (preprocess + encoder)", t_o, t_r)
            prog.describe("preprocessing 640x480")
            t_o, t_r = interleaved(lambda: preprocess(img), (lambda: ref._transforms(img)) if ref else None,
                                   runs, warmup, prog)
            record("preprocess", "preprocessing alone (resize to 1024, normalise), 640x480", t_o, t_r)

            # 2. decode on a cached embedding (Predictor.predict, postprocessing to 640x480 included)
            ours.set_image(img)
            if ref:
                ref.set_image(img)
            h, w = img.shape[:2]
            prompt_cases = {
                "predict_point_cached": ("1 point, multimask, cached embedding, masks at 640x480",
                                         dict(point_coords=np.array([[0.5 * w, 0.45 * h]]), point_labels=np.array([1]))),
                "decode_box": ("1 box, single mask, cached embedding, masks at 640x480",
                               dict(box=np.array([0.2 * w, 0.2 * h, 0.7 * w, 0.8 * h]), multimask_output=False)),
                "decode_box_points": ("1 box + 2 points, single mask, cached embedding, masks at 640x480",
                                      dict(box=np.array([0.2 * w, 0.2 * h, 0.7 * w, 0.8 * h]),
                                           point_coords=np.array([[0.4 * w, 0.5 * h], [0.25 * w, 0.7 * h]]),
                                           point_labels=np.array([1, 0]), multimask_output=False)),
            }
            parity = {}
            for name, (desc, kw) in prompt_cases.items():
                prog.describe(name)
                t_o, t_r = interleaved(lambda: ours.predict(**kw), (lambda: ref.predict(**kw)) if ref else None,
                                       runs, warmup, prog)
                record(name, desc, t_o, t_r)
                if ref:
                    parity[name] = _parity(ours.predict(**kw), ref.predict(**kw))
            result["parity_spot_check"] = parity

            # decoder alone (no postprocessing), to split decode time from postprocessing
            prog.describe("decoder only (sam2rt)")
            emb = ours.embedding
            xy = np.array([[[0.5 * 1024, 0.45 * 1024], [0.0, 0.0]]], np.float32)
            lab = np.array([[1.0, -1.0]], np.float32)
            t_o, _ = interleaved(lambda: ours.model.decode_raw(emb, xy, lab, None), None, runs, warmup, prog)
            record("decoder_only_point", "sam2rt decoder graph alone, 1 point, no postprocessing (no reference counterpart)",
                   t_o, [])
            low_res, iou = ours.model.decode_raw(emb, xy, lab, None)
            t_o, _ = interleaved(lambda: ours.model.finish(low_res, iou, (h, w), True), None, runs, warmup, prog)
            record("postprocess_640x480", "sam2rt postprocessing alone: token choice + upsample 3 masks to 640x480 + threshold",
                   t_o, [])

            # 3. batches of boxes: per-prompt cost
            rng = np.random.default_rng(3)
            for b in cfg.batch_sizes:
                x0 = rng.uniform(0, 0.6 * w, b)
                y0 = rng.uniform(0, 0.6 * h, b)
                boxes = np.stack([x0, y0, x0 + rng.uniform(0.1, 0.4, b) * w, y0 + rng.uniform(0.1, 0.4, b) * h], axis=1)
                prog.describe(f"{b} boxes in one call")
                kw = dict(box=boxes, multimask_output=False)
                t_o, t_r = interleaved(lambda: ours.predict(**kw), (lambda: ref.predict(**kw)) if ref else None,
                                       runs, warmup, prog)
                record(f"batch{b}", f"{b} boxes in one predict call (reference batched too), masks at 640x480",
                       t_o, t_r, per=b)
                if b in cfg.single_call_batches and ref:
                    prog.describe(f"{b} boxes: sam2rt batch vs {b} single reference calls")

                    def ref_singles(boxes=boxes):
                        for bx in boxes:
                            ref.predict(box=bx, multimask_output=False)

                    t_o, t_r = interleaved(lambda: ours.predict(**kw), ref_singles, runs, warmup, prog)
                    record(f"batch{b}_vs_singles", f"{b} boxes: one sam2rt batch call vs {b} single reference calls",
                           t_o, t_r, per=b)

            # 4. predict at 1920x1080 on a cached embedding, and set_image + predict end to end
            big = images["1920x1080"]
            ours.set_image(big)
            if ref:
                ref.set_image(big)
            H, W = big.shape[:2]
            kw = dict(point_coords=np.array([[0.5 * W, 0.45 * H]]), point_labels=np.array([1]))
            prog.describe("predict 1920x1080 (cached embedding)")
            t_o, t_r = interleaved(lambda: ours.predict(**kw), (lambda: ref.predict(**kw)) if ref else None,
                                   runs, warmup, prog)
            record("predict_point_cached_1080p", "1 point, multimask, cached embedding, masks at 1920x1080", t_o, t_r)
            for size, im in images.items():
                ih, iw = im.shape[:2]
                kw2 = dict(point_coords=np.array([[0.5 * iw, 0.45 * ih]]), point_labels=np.array([1]))
                prog.describe(f"set_image + predict end to end {size}")

                def e2e_ours(im=im, kw2=kw2):
                    ours.set_image(im)
                    return ours.predict(**kw2)

                def e2e_ref(im=im, kw2=kw2):
                    ref.set_image(im)
                    return ref.predict(**kw2)

                t_o, t_r = interleaved(e2e_ours, e2e_ref if ref else None, heavy_runs, min(warmup, 1), prog)
                record(f"e2e_{size}", f"set_image + 1-point predict end to end, {size} image", t_o, t_r)

            # 5. INT8 (opt-in): speed and the mask IoU it keeps against FP32
            if has_int8:
                prog.describe("INT8 encoder (opt-in): speed")
                q = Predictor.from_dir(cfg.model_dir, backend="onnxruntime-cpu:int8", threads=threads)
                t_q, t_f = interleaved(lambda: q.set_image(img), lambda: ours.set_image(img), runs, warmup, None)
                prog.advance()
                prog.describe("INT8 encoder (opt-in): mask IoU vs FP32")
                result["int8"] = {
                    "what": "encoder MatMul/Gemm weights INT8 (dynamic quantisation, per-channel); decoder FP32; OPT-IN "
                            "(backend='onnxruntime-cpu:int8'), never the default",
                    "embed_int8": stats_ms(t_q),
                    "embed_fp32": stats_ms(t_f),
                    "speedup_vs_fp32_p50": round(float(np.median(t_f) / np.median(t_q)), 3),
                    **int8_agreement(ours, q, quick=cfg.quick),
                }
                del q
                prog.advance()

            # 6. cold start + peak RSS, each in a fresh process, alternating
            if cfg.subprocesses:
                ours_runs, ref_runs, lowmem_runs = [], [], []
                for i in range(cfg.cold_repeats):
                    prog.describe(f"cold start + peak RSS in fresh processes ({i + 1}/{cfg.cold_repeats})")
                    ours_args = ["sam2rt", "--model-dir", str(cfg.model_dir), "--backend", cfg.backend,
                                 "--threads", str(threads)]
                    ref_args = (["reference", "--config", ref_info["config"], "--checkpoint", ref_info["checkpoint"],
                                 "--threads", str(threads)] if ref_info else None)
                    order = [(ours_runs, ours_args), (ref_runs, ref_args)]
                    for bucket, args in (order if i % 2 == 0 else order[::-1]):
                        if args is not None:
                            bucket.append(run_child(args))
                    if cfg.backend == "onnxruntime-cpu" and i == 0:  # the opt-in low-memory mode, once
                        lowmem_runs.append(run_child(ours_args, env_extra={"SAM2RT_LOW_MEMORY": "1"}))
                    prog.advance()
                result["cold_start"] = {
                    "what": "fresh process: interpreter start + import + load model + set_image + 1-point predict (640x480); "
                            "process wall time from spawn to exit",
                    "sam2rt": cold_summary(ours_runs),
                }
                if lowmem_runs:
                    result["cold_start"]["sam2rt_low_memory_opt_in"] = cold_summary(lowmem_runs)
                if ref_runs:
                    result["cold_start"]["reference"] = cold_summary(ref_runs)
                    result["cold_start"]["speedup_p50"] = round(
                        result["cold_start"]["reference"]["process_wall_s"]["p50"]
                        / result["cold_start"]["sam2rt"]["process_wall_s"]["p50"], 3)
                    result["peak_rss"] = {
                        "what": "ru_maxrss of a fresh process that loads hiera_tiny and answers one prompt",
                        "sam2rt_mib": result["cold_start"]["sam2rt"]["peak_rss_mib"]["p50"],
                        "reference_mib": result["cold_start"]["reference"]["peak_rss_mib"]["p50"],
                    }
                    result["peak_rss"]["fraction_of_reference"] = round(
                        result["peak_rss"]["sam2rt_mib"] / result["peak_rss"]["reference_mib"], 3)
                    if lowmem_runs:
                        lm = result["cold_start"]["sam2rt_low_memory_opt_in"]["peak_rss_mib"]["p50"]
                        result["peak_rss"]["sam2rt_low_memory_opt_in_mib"] = lm
                        result["peak_rss"]["low_memory_opt_in_fraction_of_reference"] = round(
                            lm / result["peak_rss"]["reference_mib"], 3)
                else:
                    result["peak_rss"] = {"sam2rt_mib": result["cold_start"]["sam2rt"]["peak_rss_mib"]["p50"]}

            result["sizes"] = model_sizes(cfg.model_dir, ref_info)
            if ref is not None:
                n_params = sum(p.numel() for p in ref.model.parameters())
                result["sizes"]["reference_parameters"] = int(n_params)
                result["sizes"]["reference_parameters_fp32_mib"] = round(n_params * 4 / 2**20, 2)

            # 7. where the time goes: FLOPs from the graphs, and the fraction of this machine's peak
            if cfg.flops:
                prog.describe("counting FLOPs (profiled ORT run of each graph)")
                try:
                    from .flops import count_model

                    fl = count_model(cfg.model_dir, threads)
                    peak = result["machine"]["peak"]["peak_gflops"]
                    for role, case in (("encoder", "embed"), ("decoder", "decoder_only_point")):
                        p50_s = cases[case]["sam2rt"]["p50"] / 1e3
                        fl[role]["achieved_gflops_per_s_end_to_end"] = round(fl[role]["gflops"] / p50_s, 2)
                        fl[role]["fraction_of_peak"] = round(fl[role]["gflops"] / p50_s / peak, 4)
                        fl[role]["timed_case"] = case
                    result["flops"] = fl
                except ImportError as exc:
                    result["flops"] = {"skipped": f"needs onnx ({exc})"}
                prog.advance()
            result["machine"]["load_average_at_end"] = load_average()
            result["targets"] = evaluate_targets(result)
    finally:
        prog.close()
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
    """Each target of the issue: the measured value, the threshold, met or missed (and by how much)."""
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
