"""`sam2rt export`: a SAM 2 checkpoint -> the ONNX graphs of a model directory + manifest.json, each checked against PyTorch.

Each image graph is one `GraphSpec` (keyed by its graph_table row: file name, role, variant, precision and
use come from the table) run through one chain, the way Polygraphy composes loaders:

    export (torch.onnx) -> onnx.checker -> verify (ONNX Runtime against the PyTorch module) -> manifest entry

then the video graphs (video_export), the manifest, the variants ONNX Runtime and the FP16/INT8 converters
make from them (export.optimize), and last the lean step (export.targets): the export makes what its
`--target`s run and what that is made from, and keeps only the former.
"""

from __future__ import annotations

import datetime as _dt
import platform
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch

from ..errors import ExportError
from ..graph_table import CUDA, GraphFile, parse_targets, rows_for_targets, rows_to_make
from ..graph_table import row as table_row
from ..manifest import FORMAT_VERSION, Manifest, sha256_file
from ..runtime.embedding import PROMPTS_PER_RUN_ANY
from ..model_specs import IMAGE_SIZE, LOW_RES_SIZE, MASK_THRESHOLD, PIXEL_MEAN, PIXEL_STD, ModelSpec
from .checkpoint import build_model, download_checkpoint, load_checkpoint
from .cuda_matmul import refuse_cuda_problems
from .fast_decoder import (
    FAST_DISABLED_OPTIMIZERS, FAST_INPUTS, FAST_MAX_POINTS, PREP_INPUTS, PREP_OUTPUTS, DecoderPrepGraph, FastDecoderGraph,
)
from .fast_decoder_device import DeviceFastDecoderGraph
from .graphs import (
    DECODER_INPUTS,
    DECODER_NOMASK_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    MHA_DOMAIN,
    ImageEncoderGraph,
    PromptDecoderGraph,
    PromptDecoderNoMaskGraph,
    chunked_encoder_attention,
    device_encoder_attention,
    fused_encoder_attention,
)
from .optimize import add_variants
from .parity import check_close
from .targets import default_targets, keep_only, made_by
from .video_export import export_video_graphs

DEFAULT_OPSET = 17
# Largest differences tolerated between ONNX Runtime and PyTorch before an export is refused.
ENCODER_TOLERANCE = 1e-3
DECODER_LOGIT_TOLERANCE = 1e-3
DECODER_IOU_TOLERANCE = 1e-4
# (prompts, points) at which every decoder graph is run against PyTorch; the last is the fast decoder's limit.
DECODER_CASES = ((1, 2), (3, 5), (2, FAST_MAX_POINTS))

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

    def __init__(self, count: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=count, desc="export", unit="step", disable=not enabled, leave=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.set_description(name)
        yield
        self.bar.update(1)

    def close(self) -> None:
        self.bar.set_description("export done")
        self.bar.close()


def _sample_decoder_inputs(feats: Sequence[torch.Tensor], batch: int, points: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
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


# --- what the specifications share ------------------------------------------------------------------
@dataclass
class ExportRun:
    """One export's model, reference tensors and results, shared by the graph specifications in order."""

    model: torch.nn.Module
    out: Path
    opset: int
    image: torch.Tensor  # the sample image every encoder graph is exported with and checked on
    features: tuple[torch.Tensor, ...]  # the model's own forward_image path on `image`: the reference
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # the traced modules, by GraphFile.key
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)  # manifest entries by role
    diffs: dict[str, float] = field(default_factory=dict)  # largest ONNX Runtime vs PyTorch differences
    # ONNX Runtime's outputs of the last encoder graph checked (the fused one where it is made: the CPU's
    # encoder), and decoder_prep's on them: the fast decoder is checked on them, as the runtime runs it
    onnx_features: list[np.ndarray] | None = None
    prepared: dict[str, np.ndarray] | None = None

    def module(self, key: str, make: Callable[[torch.nn.Module], torch.nn.Module]) -> torch.nn.Module:
        """The torch module for `key`, made (in eval mode) on first use."""
        if key not in self.modules:
            self.modules[key] = make(self.model).eval()
        return self.modules[key]

    @property
    def reference_decoder(self) -> torch.nn.Module:
        """The prompt encoder + mask decoder every decoder graph is checked against (with has_mask_input = 0 for
        the mask-free ones)."""
        return self.module("decoder", PromptDecoderGraph)


@dataclass(frozen=True)
class GraphSpec:
    """How `sam2rt export` makes one torch.onnx row of graph_table (`key` = GraphFile.key).

    module / sample: the torch module and the sample inputs it is traced with; input_names, output_names,
    dynamic_axes, custom_opsets: as torch.onnx.export takes them; context: a context manager active while tracing
    (how attention is traced); verify: runs the graph's ONNX Runtime session against PyTorch and returns
    {name: largest difference} (ExportError beyond tolerance); record: extra fields of its manifest entry.
    """

    key: str
    module: Callable[[ExportRun], torch.nn.Module]
    sample: Callable[[ExportRun], tuple[torch.Tensor, ...]]
    input_names: Sequence[str]
    output_names: Sequence[str]
    verify: Callable[[ExportRun, Any], dict[str, float]]
    dynamic_axes: dict[str, dict[int, str]] | None = None
    custom_opsets: dict[str, int] | None = None
    context: Callable[[], ContextManager[Any]] = nullcontext
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def row(self) -> GraphFile:
        return table_row(self.key)


# --- verification against PyTorch ------------------------------------------------------------------------
def _verify_encoder(label: str) -> Callable[[ExportRun, Any], dict[str, float]]:
    def verify(run: ExportRun, session) -> dict[str, float]:
        outputs = session.run(ENCODER_OUTPUTS, {"image": run.image.numpy()})
        run.onnx_features = outputs
        return {f"{label}.{n}": check_close(f"{label} output {n}", o, t.numpy(), ENCODER_TOLERANCE)
                for n, o, t in zip(ENCODER_OUTPUTS, outputs, run.features)}
    return verify


def _compare(label: str, case: tuple[int, int], got: Sequence[np.ndarray], ref: Sequence[torch.Tensor]) -> dict[str, float]:
    """A decoder graph's (low_res_masks, iou_predictions) against PyTorch's, named as the manifest records them."""
    b, n = case
    return {
        f"{label}.low_res_masks[B={b},N={n}]": check_close(f"{label} low_res_masks", got[0], ref[0].numpy(), DECODER_LOGIT_TOLERANCE),
        f"{label}.iou_predictions[B={b},N={n}]": check_close(f"{label} iou_predictions", got[1], ref[1].numpy(), DECODER_IOU_TOLERANCE),
    }


def _cases(run: ExportRun) -> Iterator[tuple[tuple[int, int], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """Each DECODER_CASES shape with its sample inputs, and the same inputs without a mask (has_mask_input = 0)."""
    for batch, points in DECODER_CASES:
        inputs = _sample_decoder_inputs(run.features, batch, points, seed=batch)
        yield (batch, points), inputs, (*inputs[:6], torch.zeros_like(inputs[6]))


def _numpy(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    return [t.numpy() for t in tensors]


def _verify_decoder(run: ExportRun, session) -> dict[str, float]:
    diffs = {}
    for case, inputs, _ in _cases(run):
        with torch.no_grad():
            ref = run.reference_decoder(*inputs)
        diffs.update(_compare("decoder", case, session.run(DECODER_OUTPUTS, dict(zip(DECODER_INPUTS, _numpy(inputs)))), ref))
    return diffs


def _verify_nomask(run: ExportRun, session) -> dict[str, float]:
    """The mask-free decoder against the full decoder's torch module with has_mask_input = 0."""
    diffs = {}
    for case, inputs, no_mask in _cases(run):
        with torch.no_grad():
            ref = run.reference_decoder(*no_mask)
        got = session.run(DECODER_OUTPUTS, dict(zip(DECODER_NOMASK_INPUTS, _numpy(inputs[:5]))))
        diffs.update(_compare("decoder_nomask", case, got, ref))
    return diffs


def _verify_prep(run: ExportRun, session) -> dict[str, float]:
    """decoder_prep is checked through decoder_fast, which runs on its outputs: here they are computed (from
    ONNX Runtime's encoder outputs, as in the runtime)."""
    run.prepared = dict(zip(PREP_OUTPUTS, session.run(PREP_OUTPUTS, dict(zip(PREP_INPUTS, run.onnx_features)))))
    return {}


def _verify_fast(label: str, batched: bool = False) -> Callable[[ExportRun, Any], dict[str, float]]:
    """The fast decoder over decoder_prep's outputs, one prompt per run (the CPU form) or each case's whole batch
    in one run (`batched`, the device form), against the full decoder's torch module with has_mask_input = 0 on
    the same (ONNX Runtime) encoder outputs."""

    def verify(run: ExportRun, session) -> dict[str, float]:
        if run.prepared is None:
            raise ExportError(f"{label} is checked on decoder_prep's outputs: its specification must come first")
        diffs = {}
        for case, inputs, no_mask in _cases(run):
            with torch.no_grad():
                ref = run.reference_decoder(*(torch.from_numpy(f) for f in run.onnx_features), *no_mask[3:])
            step = case[0] if batched else 1
            runs = [session.run(DECODER_OUTPUTS, {**run.prepared, "point_coords": inputs[3][i : i + step].numpy(),
                                                  "point_labels": inputs[4][i : i + step].numpy()})
                    for i in range(0, case[0], step)]
            diffs.update(_compare(label, case, [np.concatenate(parts) for parts in zip(*runs)], ref))
        return diffs
    return verify


def _folded_encoder(run: ExportRun) -> torch.nn.Module:
    """The encoder with its neck convolutions folded: what both encoder graphs are traced from."""
    return run.module("encoder", lambda model: ImageEncoderGraph(model, fold=True))


def _decoder_sample(batch: int, points: int, inputs: int = 7) -> Callable[[ExportRun], tuple[torch.Tensor, ...]]:
    return lambda run: _sample_decoder_inputs(run.features, batch, points)[:inputs]


def _fast_sample(run: ExportRun, batch: int = 1) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        prepared = run.module("decoder.prep", DecoderPrepGraph)(*run.features)
    return (*prepared, *_sample_decoder_inputs(run.features, batch, 3)[3:5])


FAST_DYNAMIC_AXES = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
# the device form takes a batch of prompts per run
FAST_DEVICE_DYNAMIC_AXES = {**{k: {0: "num_prompts", **v} for k, v in FAST_DYNAMIC_AXES.items()},
                            **{k: {0: "num_prompts"} for k in DECODER_OUTPUTS}}

# The image graphs, in the order they are made (a base graph before its variants, decoder_prep before decoder_fast).
IMAGE_GRAPH_SPECS: tuple[GraphSpec, ...] = (
    GraphSpec("encoder", _folded_encoder, lambda run: (run.image,), ENCODER_INPUTS, ENCODER_OUTPUTS,
              _verify_encoder("encoder"), context=chunked_encoder_attention),
    GraphSpec("encoder.fused", _folded_encoder, lambda run: (run.image,), ENCODER_INPUTS, ENCODER_OUTPUTS,
              _verify_encoder("encoder_fused"), custom_opsets={MHA_DOMAIN: 1}, context=fused_encoder_attention),
    GraphSpec("encoder.device", _folded_encoder, lambda run: (run.image,), ENCODER_INPUTS, ENCODER_OUTPUTS,
              _verify_encoder("encoder_device"), custom_opsets={MHA_DOMAIN: 1}, context=device_encoder_attention),
    GraphSpec("decoder", lambda run: run.reference_decoder, _decoder_sample(2, 3), DECODER_INPUTS, DECODER_OUTPUTS,
              _verify_decoder, dynamic_axes=DYNAMIC_AXES),
    GraphSpec("decoder.nomask", lambda run: run.module("decoder.nomask", PromptDecoderNoMaskGraph),
              _decoder_sample(2, 3, inputs=5), DECODER_NOMASK_INPUTS, DECODER_OUTPUTS, _verify_nomask,
              dynamic_axes={k: v for k, v in DYNAMIC_AXES.items() if k in DECODER_NOMASK_INPUTS + DECODER_OUTPUTS}),
    GraphSpec("decoder.prep", lambda run: run.module("decoder.prep", DecoderPrepGraph), lambda run: run.features,
              PREP_INPUTS, PREP_OUTPUTS, _verify_prep),
    GraphSpec("decoder.fast", lambda run: run.module("decoder.fast", FastDecoderGraph), _fast_sample,
              FAST_INPUTS, DECODER_OUTPUTS, _verify_fast("decoder_fast"),
              # one prompt per run: only the number of points is dynamic
              dynamic_axes=FAST_DYNAMIC_AXES,
              record={"max_points": FAST_MAX_POINTS, "prompts_per_run": 1,
                      "ort_disabled_optimizers": list(FAST_DISABLED_OPTIMIZERS)}),
    GraphSpec("decoder.fast_device", lambda run: run.module("decoder.fast_device", DeviceFastDecoderGraph),
              lambda run: _fast_sample(run, batch=2), FAST_INPUTS, DECODER_OUTPUTS,
              _verify_fast("decoder_fast_device", batched=True), dynamic_axes=FAST_DEVICE_DYNAMIC_AXES,
              record={"max_points": FAST_MAX_POINTS, "prompts_per_run": PROMPTS_PER_RUN_ANY}),
)


# --- the chain: export -> check -> verify -> manifest entry -------------------------------------------------
def export_graph(spec: GraphSpec, run: ExportRun) -> Path:
    """torch.onnx.export of the spec's module at its sample inputs, into the row's file."""
    path = run.out / spec.row.file
    module = spec.module(run)
    with warnings.catch_warnings(), torch.no_grad(), spec.context():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, spec.sample(run), str(path), input_names=list(spec.input_names),
            output_names=list(spec.output_names), dynamic_axes=spec.dynamic_axes, opset_version=run.opset,
            custom_opsets=spec.custom_opsets, dynamo=False,
        )
    return path


def check_graph(path: Path) -> Path:
    """onnx.checker (full check) or ExportError."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{path} fails onnx.checker: {exc}") from exc
    return path


def open_session(path: Path):
    """A quiet ONNX Runtime CPU session: what the export verifies with."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def record_graph(spec: GraphSpec, run: ExportRun, path: Path, session) -> dict[str, Any]:
    """The graph's manifest entry, under graphs.<role> (a base graph) or graphs.<role>.variants.<variant>."""
    g = spec.row
    entry: dict[str, Any] = {"file": g.file, "sha256": sha256_file(path)}
    if g.variant is None:
        run.graphs[g.role] = {**entry, **spec.record, **_io_spec(session)}
        return run.graphs[g.role]
    base = run.graphs[g.role]  # a base graph is made before its variants
    entry.update(precision=g.precision, derived_from_sha256=base["sha256"], use=g.use, **spec.record, **_io_spec(session))
    base.setdefault("variants", {})[g.variant] = entry
    return entry


def make_graph(spec: GraphSpec, run: ExportRun) -> dict[str, Any]:
    """One specification through the chain; returns its manifest entry."""
    path = check_graph(export_graph(spec, run))
    if CUDA in spec.row.runs_on:
        refuse_cuda_problems(path)  # ONNX Runtime's CUDA MatMul gets some broadcasts wrong (export.cuda_matmul)
    session = open_session(path)
    run.diffs.update(spec.verify(run, session))
    return record_graph(spec, run, path, session)


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
    targets: Sequence[str] | None = None,
) -> Manifest:
    """Export `spec` to out_dir and return its manifest.

    Weights come from `checkpoint` (an official .pt file), or from `random_seed` (random weights,
    recorded as such), or else from the official download (CheckpointError when offline).
    `targets` ("cpu", "cuda", "tensorrt"; default: export.targets.default_targets(), what the runtime here can
    use) choose the graphs written (graph_table.rows_for_targets); the video graphs go with every target.
    `optimize`: ONNX Runtime's optimised copies (the CPU's graphs); `fp16`: the encoder of onnxruntime-cuda:fp16;
    `int8`: the opt-in INT8 encoder of onnxruntime-cpu:int8. Every graph is recorded in the manifest with its sha256.
    """
    if checkpoint is not None and random_seed is not None:
        raise ExportError("give at most one of --checkpoint and --random-weights")
    try:
        targets = parse_targets(",".join(targets)) if targets else default_targets()
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if int8 and "cpu" not in targets:
        raise ExportError("--int8 writes encoder.int8.onnx, which only onnxruntime-cpu runs: add cpu to --target")
    import onnx
    import onnxruntime as ort

    keep = rows_for_targets(targets, made_by(optimize=optimize, fp16=fp16, int8=int8))
    make = {g.key for g in rows_to_make(keep)}
    specs = [s for s in IMAGE_GRAPH_SPECS if s.key in make]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(len(specs) + 5, progress)
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
            image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                feats = ImageEncoderGraph(model).eval()(image)  # the reference: the model's own forward_image path
            run = ExportRun(model, out, opset, image, tuple(feats))
        for graph_spec in specs:
            with steps.step(f"{graph_spec.row.file}: export, check, verify"):
                make_graph(graph_spec, run)
        with steps.step("exporting + verifying the video graphs"):
            video = export_video_graphs(model, out, feats, opset)  # memory encoder/attention, tracking decoder
            run.diffs.update(video["verification"])
        with steps.step("writing manifest.json"):
            manifest = Manifest(out, _manifest_data(spec, model, weights, {**run.graphs, **video["graphs"]}, video,
                                                    opset, run.diffs, targets, onnx.__version__, ort.__version__))
            manifest.save()
        with steps.step("saving optimised graph variants"):
            variants = {k for k in make if table_row(k).maker != "torch.onnx"}  # ONNX Runtime's, FP16, INT8
            if variants:
                manifest = add_variants(out, optimized=optimize, int8=int8, fp16=fp16, only=variants)
        with steps.step(f"keeping the graphs of --target {','.join(targets)}"):
            manifest = keep_only(manifest, targets)
    except Exception:
        steps.bar.close()
        raise
    steps.close()
    return manifest


def _manifest_data(spec: ModelSpec, model, weights: dict, graphs: dict, video: dict, opset: int, diffs: dict,
                   targets: Sequence[str], onnx_version: str, ort_version: str) -> dict[str, Any]:
    md = model.sam_mask_decoder
    return {
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
        "graphs": graphs,
        "video": video["video"],
        "opset": opset,
        "verification": {"max_abs_diff": diffs},
        "exported_with": {
            "sam2rt": _version("sam2rt"),
            "torch": torch.__version__,
            "sam2": _version("sam2"),
            "onnx": onnx_version,
            "onnxruntime": ort_version,
            "python": platform.python_version(),
        },
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "export": {"targets": list(targets)},
        "engines": {},
    }


def copy_model_dir(src: str | Path, dst: str | Path) -> Path:
    """Copy an exported model directory (used by tests and tools that must not alter the original)."""
    return Path(shutil.copytree(src, dst, dirs_exist_ok=True))
