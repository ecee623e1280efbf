#!/usr/bin/env python
"""GPU benchmark: sam2rt's precision modes beside the PyTorch reference, same GPU, same run.

    python benchmarks/gpu_bench.py                               # hiera_tiny, onnxruntime-cuda fp32/tf32/fp16
    python benchmarks/gpu_bench.py --model-dir DIR --runs 300    # an existing export

For the model it exports the ONNX graphs (random weights, seed 0, unless --checkpoint names an official
checkpoint; latency does not depend on the weights' values) or uses --model-dir, then times, after
--warmup runs, --runs runs (>= 200) of each stage, p50/p90/p99/mean in milliseconds:

  encoder          sam2rt: backend.encode of the image already on the device; reference: set_image
  preprocess_*     sam2rt: uint8 image (host) -> normalised 1024x1024 input on the device, 512x512 / 1920x1080
  postprocess_*    sam2rt: one click's four tokens (host) -> three float 0/1 masks on the host (Predictor's output)
  embed_512        sam2rt: Sam2Model.embed of the 512x512 photo (preprocessing included)
  decode_1         one click through Sam2Model.decode, masks on the host (reference: predict)
  decode_16        16 boxes through Sam2Model.decode, masks on the host (reference: predict(box=16 boxes))
  end_to_end_512   Predictor.set_image + predict(one click), 512x512 RGB uint8 photo (both sides)
  end_to_end_1080  the same at 1920x1080

for every sam2rt backend named (default onnxruntime-cuda:fp32, :tf32, :fp16; TensorRT ones when TensorRT
is installed) and for the reference SAM2ImagePredictor in eager FP32 and under bf16 autocast. It also
measures each mode's parity against ONNX Runtime CPU FP32 on the parity prompt set (points, boxes, mixed;
two photos) and records which sessions ran as CUDA graphs. Writes benchmarks/results/<date>-<gpu>.json,
.md and .png. A stage that fails is recorded with its error instead of stopping the run. Needs a CUDA GPU,
onnxruntime-gpu, torch with CUDA and the official `sam2`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
OLD_PIN_MIN_BYTES = 2**20  # PinnedPool's threshold until run 8, timed beside today's (measures_off)
BACKENDS = ("onnxruntime-cuda:fp32", "onnxruntime-cuda:tf32", "onnxruntime-cuda:fp16")
# Issue 11's targets for hiera_tiny on an H100/H200 (recorded beside the measurements, not asserted).
TARGETS = {
    "end_to_end_512 speedup vs pytorch-eager-fp32, onnxruntime-cuda:tf32": ">= 2.0",
    "end_to_end_512 speedup vs pytorch-eager-fp32, onnxruntime-cuda:fp16": ">= 3.0",
    "end_to_end_512 speedup vs pytorch-bf16-autocast, onnxruntime-cuda:fp16": ">= 2.0",
    "end_to_end_1080 / end_to_end_512 (p50), every mode": "<= 1.2",
    "decode_1 p50 ms, onnxruntime-cuda:fp16": "<= 1.0",
    "decode_16 p50 ms, onnxruntime-cuda:fp16": "<= 3.0",
    "encoder p50 ms, onnxruntime-cuda:fp16": "<= 5.0",
}


STAGES = {
    "encoder": "sam2rt: backend.encode of the image already preprocessed on the device; reference: set_image (its preprocessing included)",
    "preprocess_512 / preprocess_1080": "sam2rt backend.preprocess: host uint8 image -> normalised input on the device",
    "embed_512": "sam2rt Sam2Model.embed of the 512x512 photo, preprocessing included",
    "decode_1": "one click, masks at the image size on the host (sam2rt Sam2Model.decode; reference predict)",
    "decode_16": "16 boxes, one mask each, on the host (sam2rt Sam2Model.decode; reference predict(box=...))",
    "postprocess_512 / postprocess_1080": "sam2rt Sam2Model.finish: 4 tokens (host) -> 3 float32 0/1 masks on the host",
    "end_to_end_512 / end_to_end_1080": "Predictor.set_image + predict(1 click) from an RGB uint8 image",
    "postprocess_1080_pageable": "postprocess_1080 with pageable instead of page-locked results (same run; GPU only)",
    "preprocess_512_pageable_upload / preprocess_1080_pageable_upload": "preprocess_512 / preprocess_1080 uploading "
    "from the caller's pageable array instead of through a page-locked block (same run; GPU only)",
    "decode_1_pinned_from_1mib": "decode_1 with results pinned from 1 MiB (the threshold until run 8: a click's "
    "768 KiB masks and logits come down pageable) instead of 256 KiB (same run; GPU only)",
    "decode_1_two_graphs / decode_16_two_graphs": "decode_1 / decode_16 as the decoder's and the postprocessing's runs, "
    "each captured, instead of the merged decode graph's one (same run; exports with the merged graphs)",
    "decode_1_postprocess_uncaptured": "decode_1 in two graphs with the postprocessing not captured as a CUDA graph (same run; GPU only)",
    "decode_16_nomask": "decode_16 on decoder_nomask instead of the batched fast decoder (same run; exports with the batched one)",
    "decode_1_fp32_decoder / decode_16_fp32_decoder": "fp16 only: decode_1 / decode_16 through the FP32 merged decode "
    "graphs instead of their FP16 copies (same run; exports with the FP16 copies)",
}


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "runs": int(ms.size),
    }


def timed(fn: Callable[[], Any], runs: int, warmup: int, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return percentiles(samples)


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def photos() -> dict[str, np.ndarray]:
    """Real photographs: scikit-image's astronaut (512x512) and coffee (400x600), and the astronaut at 1920x1080."""
    import cv2
    from skimage import data

    astronaut = np.ascontiguousarray(data.astronaut()[..., :3])
    return {"512": astronaut, "1080": cv2.resize(astronaut, (1920, 1080), interpolation=cv2.INTER_LINEAR),
            "coffee": np.ascontiguousarray(data.coffee()[..., :3])}


def boxes16(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x0, y0 = rng.uniform(0, 0.5 * w, 16), rng.uniform(0, 0.5 * h, 16)
    return np.stack([x0, y0, x0 + rng.uniform(0.1, 0.5) * w, y0 + rng.uniform(0.1, 0.5) * h], 1)


def parity_prompts(h: int, w: int) -> list:
    """Points, negative points, boxes, box + point, spread over the image (the GPU tests' set)."""
    from sam2rt.runtime import Prompt

    rng = np.random.default_rng(7)
    prompts = [Prompt(points=np.array([[rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h]]), labels=np.array([1]))
               for _ in range(8)]
    prompts.append(Prompt(points=np.array([[0.5 * w, 0.5 * h], [0.2 * w, 0.3 * h]]), labels=np.array([1, 0])))
    prompts.append(Prompt(points=np.array([[0.3 * w, 0.6 * h], [0.35 * w, 0.65 * h], [0.8 * w, 0.2 * h]]), labels=np.array([1, 1, 0])))
    for _ in range(8):
        x0, y0 = rng.uniform(0, 0.5) * w, rng.uniform(0, 0.5) * h
        prompts.append(Prompt(box=np.array([x0, y0, x0 + rng.uniform(0.2, 0.5) * w, y0 + rng.uniform(0.2, 0.5) * h])))
    prompts.append(Prompt(points=np.array([[0.5 * w, 0.4 * h]]), labels=np.array([1]), box=np.array([0.2 * w, 0.1 * h, 0.8 * w, 0.9 * h])))
    return prompts


# --- model preparation -----------------------------------------------------------------------------
def prepare(
    name: str, work: Path, model_dir: Path | None, checkpoint: Path | None, log, reference: bool = True,
) -> tuple[Path, Path, dict]:
    """(model dir, checkpoint, weights record): the given export, or an export of `checkpoint` / seeded random weights.

    The seeded random checkpoint is only written when something reads it: an export, or the PyTorch reference.
    """
    from sam2rt.export import export_model
    from sam2rt.export.checkpoint import random_checkpoint
    from sam2rt.model_specs import get_spec

    spec = get_spec(name, "2.1")
    if checkpoint is not None:
        weights = {"random": False, "checkpoint": str(checkpoint)}
    else:
        checkpoint = work / f"{spec.model_id}_random_seed0.pt"
        if not checkpoint.is_file() and (reference or model_dir is None):
            # marked random in the file, so every export from it (and what reads that export) says RANDOM weights
            random_checkpoint(spec, 0, checkpoint)
        weights = {"random": True, "seed": 0, "note": "random weights: latency does not depend on the weights' values"}
    if model_dir is None:
        model_dir = work / name
        if not (model_dir / "manifest.json").is_file():
            log(f"exporting {name}")
            # the GPU's graphs and the CPU's: parity() holds every GPU mode against ONNX Runtime CPU FP32
            export_model(spec, model_dir, checkpoint=checkpoint, targets=("cpu", "cuda"), progress=False)
    return model_dir, checkpoint, weights


# --- measurements ----------------------------------------------------------------------------------
def bench_sam2rt(model_dir: Path, backend: str, images: dict[str, np.ndarray], runs: int, warmup: int) -> dict[str, Any]:
    from sam2rt.runtime import Predictor, Prompt, Sam2Model

    model = Sam2Model.from_dir(model_dir, backend=backend)
    out: dict[str, Any] = {}
    image = images["512"]
    h, w = image.shape[:2]
    x = model.backend.preprocess(image, model.image_size)
    out["encoder"] = timed(lambda: model.backend.encode(x), runs, warmup)
    for key in ("512", "1080"):  # where end to end time goes: the image path's two ends
        img = images[key]
        out[f"preprocess_{key}"] = timed(lambda img=img: model.backend.preprocess(img, model.image_size), runs, warmup)
    out["embed_512"] = timed(lambda: model.embed(image), runs, warmup)
    emb = model.embed(image)
    prompt = Prompt(points=np.array([[0.5 * w, 0.45 * h]]), labels=np.array([1]))
    out["decode_1"] = timed(lambda: model.decode(emb, prompt), runs, warmup)
    boxes = [Prompt(box=b) for b in boxes16(h, w)]
    out["decode_16"] = timed(lambda: model.decode(emb, boxes, multimask_output=False), runs, warmup)
    low, iou = model.decode_raw(emb, np.array([[[0.5 * 1024, 0.45 * 1024], [0, 0]]], np.float32), np.array([[1, -1]], np.float32), None)
    for key in ("512", "1080"):
        hw = images[key].shape[:2]
        out[f"postprocess_{key}"] = timed(lambda hw=hw: model.finish(low, iou, hw, True, float_masks=True), runs, warmup)
    pred = Predictor(model)
    for key in ("512", "1080"):
        img = images[key]
        pt, lab = np.array([[0.5 * img.shape[1], 0.45 * img.shape[0]]]), np.array([1])

        def end_to_end(img=img, pt=pt, lab=lab):
            pred.set_image(img)
            pred.predict(point_coords=pt, point_labels=lab, multimask_output=True)

        out[f"end_to_end_{key}"] = timed(end_to_end, runs, warmup)
    out["_parts"] = {"decode_1": decode_parts(model, lambda: model.decode(emb, prompt), runs),
                     "decode_16": decode_parts(model, lambda: model.decode(emb, boxes, multimask_output=False), runs)}
    out.update(measures_off(model, emb, prompt, boxes, low, iou, images["1080"].shape[:2], runs, warmup, images))
    two_graphs = out.pop("_parts_two_graphs", None)
    if two_graphs:
        out["_parts"]["decode_1_two_graphs"] = two_graphs
    fp32_decoder = out.pop("_parts_fp32_decoder", None)
    if fp32_decoder:
        out["_parts"]["decode_16_fp32_decoder"] = fp32_decoder
    out["_cuda_graphs"] = dict(getattr(model.backend, "cuda_graphs", {}))
    out["_cuda_graphs"]["fast_decoder"] = getattr(model.backend, "fast_decoder_check", "n/a")
    out["_cuda_graphs"]["merged_decode"] = getattr(model.backend, "merged_decode", "n/a")
    # the pre/postprocessing graphs' captured shapes (one per image size, prompt count and output): counted by outcome
    pipeline = getattr(model.backend, "_pipeline", None)
    if pipeline is not None:  # results (and uploads) of 256 KiB and more through page-locked arrays (runtime/gpu.py PinnedPool)?
        out["_cuda_graphs"]["pinned_results"] = "on" if pipeline.pinned is not None else "off"
    for graph, shapes in getattr(model.backend, "pipeline_graphs", {}).items():
        outcomes = [v.split(":")[0] for v in shapes.values()]
        out["_cuda_graphs"][graph] = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    out["_files"] = {k: v.get("file") for k, v in model.backend.files.items()}
    out["_model"] = model
    return out


def decode_parts(model: Any, fn: Callable[[], Any], runs: int) -> dict[str, float]:
    """Where a decode's time goes, mean ms per call over `runs` calls (after the stage's own timed runs, so every
    shape replays): the decoder's prompt upload and replay, each postprocessing graph's (or merged decode graph's)
    inputs in / replay / outputs out (from fixed buffers), and the rest of the call (Python, the host arrays). Empty where the backend does not
    count them (not the device backend, or nothing replayed)."""
    backend, pipeline = model.backend, getattr(model.backend, "_pipeline", None)
    if not hasattr(backend, "decoder_seconds") or pipeline is None:
        return {}
    dec0, post0 = dict(backend.decoder_seconds), pipeline.replay_seconds
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    total = time.perf_counter() - t0
    dec, post = backend.decoder_seconds, pipeline.replay_seconds
    parts = {f"decoder {k}": dec[k] - dec0[k] for k in ("upload", "replay")} if dec["replays"] > dec0["replays"] else {}
    for graph, (seconds, _) in post.items():  # the postprocessing's graphs, and the merged decode graphs
        before = post0.get(graph, ({k: 0.0 for k in seconds}, 0))[0]
        parts.update({f"{graph} {k}": seconds[k] - before[k] for k in seconds if seconds[k] > before[k]})
    if not parts:
        return {}
    parts["rest"] = total - sum(parts.values())
    return {k: round(1e3 * v / runs, 3) for k, v in parts.items()}


def measures_off(model: Any, emb: Any, prompt: Any, boxes: list, low: Any, iou: Any, hw_1080: tuple[int, int],
                 runs: int, warmup: int, images: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Stages once more with one measure of the device path off, side by side in the same run (what each brings):
    the 1080p postprocessing with pageable instead of page-locked results; the preprocessing of `images` uploaded
    from the caller's pageable array instead of through a page-locked block; one click with results pinned from
    1 MiB (the threshold until run 8) instead of 256 KiB; one click and 16 boxes as the decoder's and
    the postprocessing's runs instead of the merged decode graph's one (and where the time of the click went then);
    one click in two graphs with the postprocessing run as plain ONNX Runtime sessions instead of captured CUDA
    graphs; 16 boxes through decoder_nomask instead of the batched fast decoder. Only where the backend has the
    measure on (a GPU with cuda-python; merged decode graphs; fixed buffers; an export whose fast decoder takes
    batches)."""
    pipeline = getattr(model.backend, "_pipeline", None)
    out: dict[str, Any] = {}
    if pipeline is not None and pipeline.pinned is not None:
        pool, pipeline.pinned = pipeline.pinned, None
        try:
            out["postprocess_1080_pageable"] = timed(lambda: model.finish(low, iou, hw_1080, True, float_masks=True),
                                                     runs, warmup)
        finally:
            pipeline.pinned = pool
        pipeline.pinned_uploads = False
        try:
            for key, img in (images or {}).items():
                out[f"preprocess_{key}_pageable_upload"] = timed(
                    lambda img=img: model.backend.preprocess(img, model.image_size), runs, warmup)
        finally:
            pipeline.pinned_uploads = True
        threshold, pool.min_bytes = pool.min_bytes, OLD_PIN_MIN_BYTES
        try:  # a click's masks and logits (768 KiB each) came down pageable under the old threshold
            out["decode_1_pinned_from_1mib"] = timed(lambda: model.decode(emb, prompt), runs, warmup)
        finally:
            pool.min_bytes = threshold
    backend = model.backend
    merged = bool(getattr(backend, "use_merged_decode", False))
    try:
        backend.use_merged_decode = False  # what run 6 measured: the decoder's replay, then the postprocessing's
        if merged:
            out["decode_1_two_graphs"] = timed(lambda: model.decode(emb, prompt), runs, warmup)
            out["decode_16_two_graphs"] = timed(lambda: model.decode(emb, boxes, multimask_output=False), runs, warmup)
            parts = decode_parts(model, lambda: model.decode(emb, prompt), runs)
            if parts:
                out["_parts_two_graphs"] = parts
        if pipeline is not None and pipeline.fixed_buffers:
            pipeline.fixed_buffers = False
            try:
                out["decode_1_postprocess_uncaptured"] = timed(lambda: model.decode(emb, prompt), runs, warmup)
            finally:
                pipeline.fixed_buffers = True
    finally:
        if merged:
            backend.use_merged_decode = True
    if pipeline is not None and "decoder_fast" in backend.files and backend.fast_prompts is None:
        backend.fast_prompts = 1  # batches go to decoder_nomask, as before the batched fast decoder
        try:
            out["decode_16_nomask"] = timed(lambda: model.decode(emb, boxes, multimask_output=False), runs, warmup)
        finally:
            backend.fast_prompts = None
    if getattr(backend, "use_fp16_decoder", False):  # fp16 with the merged graphs' FP16 copies: their FP32 ones beside
        backend.use_fp16_decoder = False
        try:
            out["decode_1_fp32_decoder"] = timed(lambda: model.decode(emb, prompt), runs, warmup)
            out["decode_16_fp32_decoder"] = timed(lambda: model.decode(emb, boxes, multimask_output=False), runs, warmup)
            parts = decode_parts(model, lambda: model.decode(emb, boxes, multimask_output=False), runs)
            if parts:
                out["_parts_fp32_decoder"] = parts
        finally:
            backend.use_fp16_decoder = True
    return out


def parity(model_dir: Path, model: Any, images: dict[str, np.ndarray], cpu_cache: dict) -> dict[str, Any]:
    """`model` (after its timed runs: CUDA-graph replays included) against ONNX Runtime CPU FP32 on the parity
    prompts (two photos), and single clicks decoded one at a time (the one-click path): what the modes cost."""
    from sam2rt.runtime import Sam2Model

    if "model" not in cpu_cache:
        cpu_cache["model"] = Sam2Model.from_dir(model_dir, backend="onnxruntime-cpu")
    cpu = cpu_cache["model"]
    lr, sc, choice, flips, ious, click = [], [], [], [], [], []
    for key in ("512", "coffee"):
        img = images[key]
        prompts = parity_prompts(*img.shape[:2])
        if key not in cpu_cache:
            emb = cpu.embed(img)
            cpu_cache[key] = (cpu.decode(emb, prompts, multimask_output=True), cpu.decode(emb, prompts, multimask_output=False))
        ref_multi, ref_single = cpu_cache[key]
        emb = model.embed(img)
        got_multi, got_single = model.decode(emb, prompts, multimask_output=True), model.decode(emb, prompts, multimask_output=False)
        lr.append(np.abs(got_multi.low_res_logits - ref_multi.low_res_logits).reshape(len(prompts), -1))
        sc.append(np.abs(got_multi.scores - ref_multi.scores).ravel())
        choice.append(np.argmax(got_multi.scores, 1) == np.argmax(ref_multi.scores, 1))
        strong = np.abs(ref_multi.low_res_logits) > 0.5
        flips.append(float(((got_multi.low_res_logits > 0) != (ref_multi.low_res_logits > 0))[strong].mean()) if strong.any() else 0.0)
        inter = (got_single.masks & ref_single.masks).sum(axis=(-2, -1))
        union = (got_single.masks | ref_single.masks).sum(axis=(-2, -1))
        ious.append(np.where(union > 0, inter / np.maximum(union, 1), 1.0).ravel())
        ref_emb = cpu_cache.setdefault(f"emb_{key}", cpu.embed(img))
        for p in prompts[:4]:  # single clicks, one per call
            click.append(float(np.abs(model.decode(emb, p).low_res_logits - cpu.decode(ref_emb, p).low_res_logits).max()))
    lr_all, iou_all = np.concatenate(lr), np.concatenate(ious)
    return {
        "low_res_logits_max_abs": float(lr_all.max()),
        "low_res_logits_mean_abs": float(lr_all.mean()),
        "scores_max_abs": float(np.concatenate(sc).max()),
        "same_multimask_choice_fraction": float(np.concatenate(choice).mean()),
        "pixels_flipped_where_abs_logit_gt_0.5": float(np.mean(flips)),
        "mask_iou_single_min": float(iou_all.min()),
        "mask_iou_single_p5": float(np.percentile(iou_all, 5)),
        "prompts": int(lr_all.shape[0]),
        "single_click_low_res_logits_max_abs": float(max(click)),
    }


def bench_reference(name: str, ckpt: Path, images: dict[str, np.ndarray], runs: int, warmup: int, bf16: bool) -> dict[str, dict]:
    import contextlib

    import torch
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from sam2rt.model_specs import get_spec

    spec = get_spec(name, "2.1")
    model = build_sam2(spec.config_name, ckpt_path=str(ckpt), device="cuda")
    pred = SAM2ImagePredictor(model)
    sync = torch.cuda.synchronize
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    image = images["512"]
    h, w = image.shape[:2]
    pt, lab = np.array([[0.5 * w, 0.45 * h]]), np.array([1])
    b = boxes16(h, w)
    out: dict[str, dict] = {}
    with torch.inference_mode(), ctx():
        out["encoder"] = timed(lambda: pred.set_image(image), runs, warmup, sync)
        out["decode_1"] = timed(lambda: pred.predict(point_coords=pt, point_labels=lab, multimask_output=True), runs, warmup, sync)
        out["decode_16"] = timed(lambda: pred.predict(box=b, multimask_output=False), runs, warmup, sync)
        for key in ("512", "1080"):
            img = images[key]
            ipt = np.array([[0.5 * img.shape[1], 0.45 * img.shape[0]]])

            def end_to_end(img=img, ipt=ipt):
                pred.set_image(img)
                pred.predict(point_coords=ipt, point_labels=lab, multimask_output=True)

            out[f"end_to_end_{key}"] = timed(end_to_end, runs, warmup, sync)
    del pred, model
    torch.cuda.empty_cache()
    return out


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version()}
    try:
        from sam2rt.runtime.gpu import gpu_info, import_cudart

        info = gpu_info(0)
        env.update(gpu=info.name, compute_capability=info.compute_capability,
                   gpu_memory_gib=round(info.total_memory / 2**30, 1), integrated_gpu=info.integrated)
        cudart = import_cudart()
        env["cuda_driver"] = int(cudart.cudaDriverGetVersion()[1])
        env["cuda_runtime"] = int(cudart.cudaRuntimeGetVersion()[1])
    except Exception as exc:  # cuda-python missing: ask torch
        try:
            import torch

            env.update(gpu=torch.cuda.get_device_name(0), note=f"cuda-python: {exc}")
        except Exception as exc2:
            env.update(gpu="no GPU", note=f"{exc}; {exc2}")
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except ImportError:
        env["tensorrt"] = None
    for dist in ("sam2rt", "onnxruntime-gpu", "onnxruntime", "torch", "sam2", "cuda-bindings", "numpy"):
        env[dist] = version(dist)
    try:
        import onnxruntime

        env["onnxruntime_loaded"] = onnxruntime.__version__
    except ImportError:
        pass
    return env


# --- report ----------------------------------------------------------------------------------------
def speedups(results: list[dict], reference: str, stage: str = "end_to_end_512") -> dict[str, float]:
    out = {}
    for model in sorted({r["model"] for r in results}):
        ref = next((r for r in results if r["model"] == model and r["backend"] == reference and r["stage"] == stage), None)
        for r in results:
            if ref and r["model"] == model and r["stage"] == stage and not r["backend"].startswith("pytorch"):
                out[f"{model} {r['backend']}"] = round(ref["p50_ms"] / r["p50_ms"], 2)
    return out


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# GPU benchmark {doc['date']}: {env.get('gpu')}", "",
             f"hiera_tiny, {'RANDOM seeded weights' if any(w.get('random') for w in doc['weights'].values()) else 'checkpoint weights'}; "
             f"onnxruntime {env.get('onnxruntime_loaded')}, torch {env.get('torch')}; {doc['runs']} runs after {doc['warmup']} warm-up, ms.", "",
             "| backend | stage | p50 | p90 | p99 |", "| --- | --- | ---: | ---: | ---: |"]
    for r in doc["results"]:
        lines.append(f"| {r['backend']} | {r['stage']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} |")
    lines += ["", "End to end (512x512, p50) speedup:", ""]
    for key, label in (("end_to_end_speedup_p50_vs_pytorch_eager_fp32", "vs PyTorch eager FP32"),
                       ("end_to_end_speedup_p50_vs_pytorch_bf16_autocast", "vs PyTorch bf16 autocast")):
        for k, v in doc[key].items():
            lines.append(f"- {k} {label}: **{v}x**")
    lines += ["", "Parity against ONNX Runtime CPU FP32 (parity prompts, two photos):", "",
              "| backend | logits max | logits mean | scores max | same multimask choice | flipped (abs logit > 0.5) | single-mask IoU min |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b, p in doc["parity"].items():
        if "error" in p:
            lines.append(f"| {b} | error: {p['error']} | | | | | |")
            continue
        lines.append(f"| {b} | {p['low_res_logits_max_abs']:.2e} | {p['low_res_logits_mean_abs']:.2e} | {p['scores_max_abs']:.2e} | "
                     f"{p['same_multimask_choice_fraction']:.3f} | {p['pixels_flipped_where_abs_logit_gt_0.5']:.2e} | {p['mask_iou_single_min']:.4f} |")
    parts = {b: p for b, p in doc.get("decode_parts", {}).items() if any(p.values())}
    if parts:
        lines += ["", "Where a decode's time goes (mean ms per call, after the timed runs):", ""]
        lines += [f"- {b} {stage}: " + ", ".join(f"{k} {v:.3f}" for k, v in p.items()) for b, stages in parts.items()
                  for stage, p in stages.items() if p]
    if doc["cuda_graphs"]:
        lines += ["", "CUDA graphs:", ""] + [f"- {b}: {g}" for b, g in doc["cuda_graphs"].items()]
    if doc["errors"]:
        lines += ["", "Failures:", ""] + [f"- {e['backend']}: {e['error']}" for e in doc["errors"]]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["encoder", "decode_1", "decode_16", "end_to_end_512", "end_to_end_1080"]
    backends = list(dict.fromkeys(r["backend"] for r in doc["results"]))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        vals = [next((r["p50_ms"] for r in doc["results"] if r["backend"] == b and r["stage"] == s), np.nan) for s in stages]
        ax.bar(np.arange(len(stages)) + i * width, vals, width, label=b)
    ax.set_xticks(np.arange(len(stages)) + 0.4 - width / 2, stages)
    ax.set_ylabel("p50 latency (ms, log)")
    ax.set_yscale("log")
    ax.set_title(f"hiera_tiny on {doc['environment'].get('gpu')} ({doc['date']}; random weights)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="hiera_tiny", choices=("hiera_tiny", "hiera_small", "hiera_base_plus", "hiera_large"))
    p.add_argument("--model-dir", type=Path, help="an existing export of --model (else one is made under --work)")
    p.add_argument("--checkpoint", type=Path, help="the official checkpoint (else seeded random weights)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS))
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--work", type=Path, default=HERE / "work", help="where exports are kept between runs")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.runs < 200:
        print(f"note: --runs {args.runs} is below the 200 the project reports", file=sys.stderr)

    def log(msg: str) -> None:
        print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    env = environment()
    log(f"GPU: {env.get('gpu')}")
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / ".gitignore").write_text("*\n")  # checkpoints and exports stay out of git
    images = photos()
    model_dir, ckpt, weights = prepare(args.model, args.work, args.model_dir, args.checkpoint, log,
                                       reference=not args.no_reference)
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    graphs: dict[str, Any] = {}
    decode_parts_of: dict[str, Any] = {}
    parities: dict[str, Any] = {}
    cpu_cache: dict[str, Any] = {}

    today = dt.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", str(env.get("gpu", "gpu")).lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{today}-{slug}"

    def document() -> dict[str, Any]:
        return {
            "date": today, "environment": env, "runs": args.runs, "warmup": args.warmup,
            "images": {k: list(v.shape) for k, v in images.items()}, "weights": {args.model: weights},
            "results": results, "errors": errors, "parity": parities, "cuda_graphs": graphs, "decode_parts": decode_parts_of,
            "end_to_end_speedup_p50_vs_pytorch_eager_fp32": speedups(results, "pytorch-eager-fp32"),
            "end_to_end_speedup_p50_vs_pytorch_bf16_autocast": speedups(results, "pytorch-bf16-autocast"),
            "end_to_end_1080_speedup_p50_vs_pytorch_eager_fp32": speedups(results, "pytorch-eager-fp32", "end_to_end_1080"),
            "targets_hiera_tiny": TARGETS,
            "stages": STAGES,
        }

    def write() -> None:
        """After every backend: a run cut short still leaves what it measured."""
        doc = document()
        Path(f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
        Path(f"{stem}.md").write_text(markdown(doc))

    def record(backend: str, stages: dict[str, Any]) -> None:
        for stage, stats in stages.items():
            if not stage.startswith("_"):
                results.append({"model": args.model, "backend": backend, "stage": stage, **stats})
                log(f"  {stage:16s} p50 {stats['p50_ms']:8.3f} ms  p99 {stats['p99_ms']:8.3f} ms")

    for backend in args.backends:
        log(f"{args.model} on {backend}")
        try:
            stages = bench_sam2rt(model_dir, backend, images, args.runs, args.warmup)
            record(backend, stages)
            graphs[backend] = stages.get("_cuda_graphs", {})
            decode_parts_of[backend] = stages.get("_parts", {})
            log(f"  graphs {graphs[backend]}")
        except Exception as exc:
            errors.append({"backend": backend, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=4)})
            log(f"  failed: {exc}")
            continue
        try:
            parities[backend] = parity(model_dir, stages["_model"], images, cpu_cache)
            log(f"  parity {parities[backend]}")
        except Exception as exc:
            parities[backend] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  parity failed: {exc}")
        stages["_model"].close()
        write()
    if not args.no_reference:
        for label, bf16 in (("pytorch-eager-fp32", False), ("pytorch-bf16-autocast", True)):
            log(f"{args.model} on {label}")
            try:
                record(label, bench_reference(args.model, ckpt, images, args.runs, args.warmup, bf16))
            except Exception as exc:
                errors.append({"backend": label, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=4)})
                log(f"  failed: {exc}")
            write()

    write()
    doc = document()
    try:
        plot(doc, Path(f"{stem}.png"))
    except Exception as exc:  # matplotlib missing: the JSON and Markdown still stand
        log(f"no plot: {exc}")
    print(markdown(doc))
    print(f"written {stem}.json/.md/.png")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
