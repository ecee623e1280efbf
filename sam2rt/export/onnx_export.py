"""`sam2rt export`: SAM 2 checkpoint -> encoder.onnx + decoder.onnx + manifest.json, checked against PyTorch."""

from __future__ import annotations

import datetime as _dt
import platform
import shutil
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import ExportError
from ..graph_table import graph_file
from ..manifest import DECODER_FILE, ENCODER_FILE, FORMAT_VERSION, Manifest, sha256_file
from ..models import IMAGE_SIZE, LOW_RES_SIZE, MASK_THRESHOLD, PIXEL_MEAN, PIXEL_STD, ModelSpec
from .checkpoint import build_model, download_checkpoint, load_checkpoint
from .graphs import (
    DECODER_INPUTS,
    DECODER_NOMASK_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    ImageEncoderGraph,
    PromptDecoderGraph,
    PromptDecoderNoMaskGraph,
    MHA_DOMAIN,
    chunked_encoder_attention,
    fused_encoder_attention,
)
from .fast_decoder import (
    FAST_DISABLED_OPTIMIZERS, FAST_INPUTS, FAST_MAX_POINTS, PREP_INPUTS, PREP_OUTPUTS, DecoderPrepGraph, FastDecoderGraph,
)
from .optimize import add_variants
from .video_export import export_video_graphs

DEFAULT_OPSET = 17
# Largest differences tolerated between ONNX Runtime and PyTorch before an export is refused.
ENCODER_TOLERANCE = 1e-3
DECODER_LOGIT_TOLERANCE = 1e-3
DECODER_IOU_TOLERANCE = 1e-4

# File names come from the table of what a model directory holds (sam2rt.graph_table).
DECODER_NOMASK_FILE = graph_file("decoder", "nomask").file
DECODER_PREP_FILE = graph_file("decoder", "prep").file
DECODER_FAST_FILE = graph_file("decoder", "fast").file
ENCODER_FUSED_FILE = graph_file("encoder", "fused").file

DYNAMIC_AXES = {
    "point_coords": {0: "num_prompts", 1: "num_points"},
    "point_labels": {0: "num_prompts", 1: "num_points"},
    "mask_input": {0: "num_prompts"},
    "has_mask_input": {0: "num_prompts"},
    "low_res_masks": {0: "num_prompts"},
    "iou_predictions": {0: "num_prompts"},
}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


class _Steps:
    """Progress over the export's named steps (a tqdm bar on stderr)."""

    def __init__(self, names: list[str], enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=len(names), desc="export", unit="step", disable=not enabled, leave=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.set_description(name)
        yield
        self.bar.update(1)

    def close(self) -> None:
        self.bar.set_description("export done")
        self.bar.close()


def _sample_decoder_inputs(feats: tuple[torch.Tensor, ...], batch: int, points: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(batch, points, 2, generator=g) * IMAGE_SIZE
    labels = torch.randint(0, 4, (batch, points), generator=g).float()
    labels[:, -1] = -1.0  # SAM's padding point
    mask = torch.randn(batch, 1, LOW_RES_SIZE, LOW_RES_SIZE, generator=g)
    has_mask = (torch.arange(batch) % 2).float()
    return (*feats, coords, labels, mask, has_mask)


def _io_spec(session) -> dict[str, list[dict]]:
    def one(v) -> dict:
        return {"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in v.shape], "dtype": v.type}

    return {"inputs": [one(v) for v in session.get_inputs()], "outputs": [one(v) for v in session.get_outputs()]}


def _check_close(name: str, ours: np.ndarray, ref: np.ndarray, tol: float) -> float:
    diff = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    if not np.isfinite(diff) or diff > tol:
        raise ExportError(
            f"{name}: ONNX Runtime and PyTorch disagree (largest difference {diff:.3g} > {tol:g}); the export is not usable"
        )
    return diff


def export_model(
    spec: ModelSpec,
    out_dir: str | Path,
    checkpoint: str | Path | None = None,
    random_seed: int | None = None,
    opset: int = DEFAULT_OPSET,
    progress: bool = True,
    optimize: bool = True,
    int8: bool = False,
    fp16: bool = True,
) -> Manifest:
    """Export `spec` to out_dir and return its manifest.

    Weights come from `checkpoint` (an official .pt file), or from `random_seed` (random weights,
    recorded as such), or else from the official download (CheckpointError when offline).
    Besides the two graphs it writes the mask-free decoder (decoder_nomask.onnx, used for prompts
    without mask_input), ORT-optimised copies of each graph (`optimize`), and with `int8` the
    opt-in INT8 encoder, and with `fp16` the encoder for `onnxruntime-cuda:fp16`; all are recorded in the manifest with their sha256 (see export.optimize).
    """
    if checkpoint is not None and random_seed is not None:
        raise ExportError("give at most one of --checkpoint and --random-weights")
    import onnx
    import onnxruntime as ort

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(
        ["weights", "encoder", "encoder_fused", "decoder", "decoder_nomask", "decoder_fast", "check", "verify",
         "video", "manifest", "variants"],
        progress,
    )
    try:
        with steps.step("building model + loading weights"):
            if random_seed is None and checkpoint is None:
                checkpoint = download_checkpoint(spec, progress=progress)
            model = build_model(spec, seed=random_seed)
            record = load_checkpoint(model, checkpoint) if checkpoint is not None else None
            weights = {
                "random": checkpoint is None or record is not None,
                "seed": random_seed if record is None else record.get("seed"),
                **({} if record is None else {"random_checkpoint": record}),
                "checkpoint": None if checkpoint is None else str(checkpoint),
                "checkpoint_sha256": None if checkpoint is None else sha256_file(checkpoint),
            }
            encoder, decoder = ImageEncoderGraph(model).eval(), PromptDecoderGraph(model).eval()
            image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                feats = encoder(image)  # the reference: the model's own forward_image path
            exported_encoder = ImageEncoderGraph(model, fold=True).eval()  # neck convolutions folded
        enc_path, dec_path, nomask_path = out / ENCODER_FILE, out / DECODER_FILE, out / DECODER_NOMASK_FILE
        prep_path, fast_path = out / DECODER_PREP_FILE, out / DECODER_FAST_FILE
        fused_path = out / ENCODER_FUSED_FILE
        decoder_nomask = PromptDecoderNoMaskGraph(model).eval()
        decoder_prep, decoder_fast = DecoderPrepGraph(model).eval(), FastDecoderGraph(model).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with steps.step("exporting encoder.onnx"), torch.no_grad(), chunked_encoder_attention():
                torch.onnx.export(
                    exported_encoder, (image,), str(enc_path), input_names=ENCODER_INPUTS,
                    output_names=ENCODER_OUTPUTS, opset_version=opset, dynamo=False,
                )
            with steps.step("exporting encoder.fused.onnx"), torch.no_grad(), fused_encoder_attention():
                torch.onnx.export(
                    exported_encoder, (image,), str(fused_path), input_names=ENCODER_INPUTS,
                    output_names=ENCODER_OUTPUTS, opset_version=opset, dynamo=False, custom_opsets={MHA_DOMAIN: 1},
                )
            with steps.step("exporting decoder.onnx"), torch.no_grad():
                torch.onnx.export(
                    decoder, _sample_decoder_inputs(feats, 2, 3), str(dec_path), input_names=DECODER_INPUTS,
                    output_names=DECODER_OUTPUTS, dynamic_axes=DYNAMIC_AXES, opset_version=opset, dynamo=False,
                )
            with steps.step("exporting decoder_nomask.onnx"), torch.no_grad():
                torch.onnx.export(
                    decoder_nomask, _sample_decoder_inputs(feats, 2, 3)[:5], str(nomask_path),
                    input_names=DECODER_NOMASK_INPUTS, output_names=DECODER_OUTPUTS,
                    dynamic_axes={k: v for k, v in DYNAMIC_AXES.items() if k in DECODER_NOMASK_INPUTS + DECODER_OUTPUTS},
                    opset_version=opset, dynamo=False,
                )
            with steps.step("exporting decoder_prep.onnx + decoder_fast.onnx"), torch.no_grad():
                torch.onnx.export(
                    decoder_prep, feats, str(prep_path), input_names=PREP_INPUTS, output_names=PREP_OUTPUTS,
                    opset_version=opset, dynamo=False,
                )
                prep_feats = decoder_prep(*feats)
                torch.onnx.export(  # one prompt per run: only the number of points is dynamic
                    decoder_fast, (*prep_feats, *_sample_decoder_inputs(feats, 1, 3)[3:5]), str(fast_path),
                    input_names=FAST_INPUTS, output_names=DECODER_OUTPUTS,
                    dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                    opset_version=opset, dynamo=False,
                )
        with steps.step("onnx.checker"):
            for path in (enc_path, fused_path, dec_path, nomask_path, prep_path, fast_path):
                try:
                    onnx.checker.check_model(str(path), full_check=True)
                except Exception as exc:
                    raise ExportError(f"{path} fails onnx.checker: {exc}") from exc
        with steps.step("verifying against PyTorch"):
            so = ort.SessionOptions()
            so.log_severity_level = 3
            enc_sess = ort.InferenceSession(str(enc_path), so, providers=["CPUExecutionProvider"])
            dec_sess = ort.InferenceSession(str(dec_path), so, providers=["CPUExecutionProvider"])
            nomask_sess = ort.InferenceSession(str(nomask_path), so, providers=["CPUExecutionProvider"])
            prep_sess = ort.InferenceSession(str(prep_path), so, providers=["CPUExecutionProvider"])
            fast_sess = ort.InferenceSession(str(fast_path), so, providers=["CPUExecutionProvider"])
            fused_sess = ort.InferenceSession(str(fused_path), so, providers=["CPUExecutionProvider"])
            diffs = {}
            for label, sess in (("encoder", enc_sess), ("encoder_fused", fused_sess)):
                ort_feats = sess.run(ENCODER_OUTPUTS, {"image": image.numpy()})
                diffs.update({
                    f"{label}.{n}": _check_close(f"{label} output {n}", o, t.numpy(), ENCODER_TOLERANCE)
                    for n, o, t in zip(ENCODER_OUTPUTS, ort_feats, feats)
                })
            del fused_sess
            # the fast decoder runs on the CPU encoder's (fused graph's) outputs, as in the runtime
            prep_out = dict(zip(PREP_OUTPUTS, prep_sess.run(PREP_OUTPUTS, dict(zip(PREP_INPUTS, ort_feats)))))
            for batch, points in ((1, 2), (3, 5), (2, FAST_MAX_POINTS)):
                inputs = _sample_decoder_inputs(feats, batch, points, seed=batch)
                with torch.no_grad():
                    ref_masks, ref_iou = decoder(*inputs)
                got_masks, got_iou = dec_sess.run(DECODER_OUTPUTS, dict(zip(DECODER_INPUTS, (t.numpy() for t in inputs))))
                diffs[f"decoder.low_res_masks[B={batch},N={points}]"] = _check_close(
                    "decoder low_res_masks", got_masks, ref_masks.numpy(), DECODER_LOGIT_TOLERANCE
                )
                diffs[f"decoder.iou_predictions[B={batch},N={points}]"] = _check_close(
                    "decoder iou_predictions", got_iou, ref_iou.numpy(), DECODER_IOU_TOLERANCE
                )
                # the mask-free decoder against the full decoder's torch module with has_mask_input = 0
                no_mask = (*inputs[:6], torch.zeros_like(inputs[6]))
                with torch.no_grad():
                    ref_masks, ref_iou = decoder(*no_mask)
                got_masks, got_iou = nomask_sess.run(
                    DECODER_OUTPUTS, dict(zip(DECODER_NOMASK_INPUTS, (t.numpy() for t in inputs[:5])))
                )
                diffs[f"decoder_nomask.low_res_masks[B={batch},N={points}]"] = _check_close(
                    "decoder_nomask low_res_masks", got_masks, ref_masks.numpy(), DECODER_LOGIT_TOLERANCE
                )
                diffs[f"decoder_nomask.iou_predictions[B={batch},N={points}]"] = _check_close(
                    "decoder_nomask iou_predictions", got_iou, ref_iou.numpy(), DECODER_IOU_TOLERANCE
                )
                # the fast decoder (over the prepared features of ONNX Runtime's encoder outputs) likewise;
                # torch's reference runs on the same encoder outputs
                with torch.no_grad():
                    ref_masks, ref_iou = decoder(*(torch.from_numpy(f) for f in ort_feats), *no_mask[3:])
                fast_runs = [  # one prompt per run, as the runtime decodes a batch
                    fast_sess.run(DECODER_OUTPUTS, {**prep_out, "point_coords": inputs[3][i : i + 1].numpy(),
                                                    "point_labels": inputs[4][i : i + 1].numpy()})
                    for i in range(batch)
                ]
                got_masks, got_iou = (np.concatenate(parts) for parts in zip(*fast_runs))
                diffs[f"decoder_fast.low_res_masks[B={batch},N={points}]"] = _check_close(
                    "decoder_fast low_res_masks", got_masks, ref_masks.numpy(), DECODER_LOGIT_TOLERANCE
                )
                diffs[f"decoder_fast.iou_predictions[B={batch},N={points}]"] = _check_close(
                    "decoder_fast iou_predictions", got_iou, ref_iou.numpy(), DECODER_IOU_TOLERANCE
                )
        with steps.step("exporting + verifying the video graphs"):
            video = export_video_graphs(model, out, feats, opset)  # memory encoder/attention, tracking decoder
            diffs.update(video["verification"])
        with steps.step("writing manifest.json"):
            md = model.sam_mask_decoder
            manifest = Manifest(
                out,
                {
                    "format": "sam2rt",
                    "format_version": FORMAT_VERSION,
                    "model": {
                        "name": spec.name,
                        "version": spec.version,
                        "model_id": spec.model_id,
                        "serve_id": spec.serve_id,
                        "config": spec.config_name,
                        "weights": weights,
                    },
                    "image_size": IMAGE_SIZE,
                    "low_res_size": LOW_RES_SIZE,
                    "normalization": {
                        "color_order": "RGB",
                        "scale": 1 / 255,
                        "mean": list(PIXEL_MEAN),
                        "std": list(PIXEL_STD),
                        "resize": "bilinear, antialiased (torchvision Resize on tensors), to image_size x image_size",
                    },
                    "mask_threshold": MASK_THRESHOLD,
                    "decoder": {
                        "dynamic_multimask_via_stability": bool(md.dynamic_multimask_via_stability),
                        "dynamic_multimask_stability_delta": float(md.dynamic_multimask_stability_delta),
                        "dynamic_multimask_stability_thresh": float(md.dynamic_multimask_stability_thresh),
                        "tokens": ["single", "multi_1", "multi_2", "multi_3"],
                        "low_res_logit_clamp": 32.0,
                    },
                    "graphs": {
                        "encoder": {
                            "file": ENCODER_FILE, "sha256": sha256_file(enc_path), **_io_spec(enc_sess),
                            "variants": {
                                "fused": {
                                    "file": ENCODER_FUSED_FILE, "sha256": sha256_file(fused_path), "precision": "fp32",
                                    "derived_from_sha256": sha256_file(enc_path),  # exported with this encoder
                                    "use": "ONNX Runtime (CPU): attention as com.microsoft MultiHeadAttention, same function",
                                    **_io_spec(enc_sess),
                                },
                            },
                        },
                        "decoder": {
                            "file": DECODER_FILE, "sha256": sha256_file(dec_path), **_io_spec(dec_sess),
                            "variants": {
                                "nomask": {
                                    "file": DECODER_NOMASK_FILE, "sha256": sha256_file(nomask_path), "precision": "fp32",
                                    "derived_from_sha256": sha256_file(dec_path),  # exported with this decoder
                                    "use": "prompts without mask_input (same outputs as has_mask_input = 0)",
                                    **_io_spec(nomask_sess),
                                },
                                "prep": {
                                    "file": DECODER_PREP_FILE, "sha256": sha256_file(prep_path), "precision": "fp32",
                                    "derived_from_sha256": sha256_file(dec_path),
                                    "use": "once per image: the per-image part of decoder_fast (see sam2rt.export.fast_decoder)",
                                    **_io_spec(prep_sess),
                                },
                                "fast": {
                                    "file": DECODER_FAST_FILE, "sha256": sha256_file(fast_path), "precision": "fp32",
                                    "derived_from_sha256": sha256_file(dec_path), "max_points": FAST_MAX_POINTS,
                                    "prompts_per_run": 1,
                                    "ort_disabled_optimizers": list(FAST_DISABLED_OPTIMIZERS),
                                    "use": f"prompts without mask_input and at most {FAST_MAX_POINTS} points (padding "
                                           "included), one prompt per run, over decoder_prep's outputs (same outputs "
                                           "as nomask)",
                                    **_io_spec(fast_sess),
                                },
                            },
                        },
                        **video["graphs"],
                    },
                    "video": video["video"],
                    "opset": opset,
                    "verification": {"max_abs_diff": diffs},
                    "exported_with": {
                        "sam2rt": _version("sam2rt"),
                        "torch": torch.__version__,
                        "sam2": _version("sam2"),
                        "onnx": onnx.__version__,
                        "onnxruntime": ort.__version__,
                        "python": platform.python_version(),
                    },
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "engines": {},
                },
            )
            manifest.save()
        with steps.step("saving optimised graph variants"):
            if optimize or int8 or fp16:
                manifest = add_variants(out, optimized=optimize, int8=int8, fp16=fp16)
    except Exception:
        steps.bar.close()
        raise
    steps.close()
    return manifest


def copy_model_dir(src: str | Path, dst: str | Path) -> Path:
    """Copy an exported model directory (used by tests and tools that must not alter the original)."""
    return Path(shutil.copytree(src, dst, dirs_exist_ok=True))
