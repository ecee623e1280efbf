"""Graph variants saved next to an export: ORT-optimised graphs and the opt-in INT8 encoder.

Needs onnxruntime (and onnx for quantisation), not torch, so it can also upgrade an existing
model directory: `add_variants(DIR, int8=True)`. Each variant is recorded in the manifest under
`graphs.<role>.variants.<name>` with its file and sha256, and verified like the base graphs.

- `optimized`: the graph after ONNX Runtime's EXTENDED graph optimisations (constant folding,
  fusions of MatMul+Add, GELU, LayerNorm, ...), saved once so loading skips that work. The
  hardware-specific layout passes (NCHWc, ORT_ENABLE_ALL) still run at load, so the file is
  portable between CPUs. It computes the same function as the base graph.
  The encoder's is made from its `fused` variant where the export wrote one (attention as ONNX
  Runtime's MultiHeadAttention; recorded as `source: fused`), otherwise from encoder.onnx.
- `device_fp16` (`fp16` in exports before the `device` form): the encoder for ONNX Runtime's CUDA provider in FP16
  (`onnxruntime-cuda:fp16`): made from its `device` form, else its `fused` one (attention as MultiHeadAttention,
  which the CUDA provider runs as fused FP16 kernels with FP32 softmax statistics), FP16 weights and activations except the Casts of shape arithmetic; LayerNormalization
  runs on FP16 tensors with FP32 statistics (its stash_type; sam2rt.export.fp16); inputs and outputs stay FP32.
  Not written where these weights' activations on a real photo pass FP16's range (export/fp16_check.py; the
  manifest says why). REDUCED PRECISION: used only when asked for.
- `fp16` of the video graphs (memory encoder, memory attention, tracking decoder): the VideoTracker's graphs
  for `onnxruntime-cuda:fp16`, made from the base graphs the same way (add_fp16_video). REDUCED PRECISION.
- `tracking` of the tracking decoder: the decoder of a tracked frame (no prompt inputs, the token chosen in the
  graph), edited from track_decoder.onnx by export/tracking_decoder.py and checked against it; its `tracking_fp16`
  is converted from it as the other FP16 video graphs.
- `decode_multi` / `decode_single` of the decoder: the GPU fast decoder (`fast_device`) followed by the package's
  device postprocessing in one graph (export/decode_graphs.py, checked against the two): a decode to masks in one
  ONNX Runtime run.
- `decode_multi_fp16` / `decode_single_fp16`: the merged decode graphs of `onnxruntime-cuda:fp16`, their decoder part
  in FP16 and their postprocessing FP32 (add_fp16_decode), checked against the FP32 merged graphs; not written where
  that check fails. REDUCED PRECISION.
- `int8`: the encoder with dynamic INT8 quantisation of its MatMul weights (onnxruntime.quantization,
  per-channel, activations quantised at run time). REDUCED PRECISION: opt-in only
  (`precision="int8"`), never the default; its mask IoU against FP32 is measured by `sam2rt bench`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Collection

from ..graph_table import graph_file, optimized_variants
from ..manifest import Manifest, sha256_file
from .fp16_check import check_fp16_encoder



def save_optimized(src: str | Path, dst: str | Path, disabled_optimizers: tuple[str, ...] | list[str] = ()) -> Path:
    """Run ORT's EXTENDED optimisations (less `disabled_optimizers`) on `src` once and write the result to `dst`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers))
    return Path(dst)


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic INT8 quantisation (per-channel signed weights) of the MatMul/Gemm ops of `src`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
        weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
    )
    return Path(dst)


def _entry(path: Path, derived_from: str, **extra) -> dict:
    import onnxruntime as ort

    return {"file": path.name, "sha256": sha256_file(path), "derived_from_sha256": derived_from,
            "onnxruntime": ort.__version__, **extra}


# The FP16 encoder of each MultiHeadAttention form: the GPU's `device` form where the export made it, else `fused`
FP16_ENCODER_ROWS = (("device", "device_fp16"), ("fused", "fp16"))


def add_fp16_encoder(manifest: Manifest) -> None:
    """Write the FP16 copy of the encoder's MultiHeadAttention form (FP16_ENCODER_ROWS: encoder.device.fp16.onnx
    from `device`, else encoder.fused.fp16.onnx from `fused`) and record it as that form's FP16 variant."""
    from .fp16 import convert_to_mixed_fp16, summarize

    entry = manifest.graph("encoder")
    variants = entry.get("variants") or {}
    made = [(form, fp16) for form, fp16 in FP16_ENCODER_ROWS
            if (variants.get(form) or {}).get("derived_from_sha256") == entry["sha256"] and manifest.is_stored(variants[form])]
    if not made:
        return  # exports without a MultiHeadAttention form: the CUDA provider's FP16 mode needs one
    form, variant = made[0]
    source = variants[form]
    src = manifest.verify_file(source)
    # encoder.*.fp16.onnx: not encoder.fp16.onnx, the name of build-engine's temporary TensorRT graph
    out = manifest.directory / graph_file("encoder", variant).file
    keep = convert_to_mixed_fp16(src, out, ort_kernels=True)
    check = check_fp16_encoder(src, keep)  # these weights' activations within FP16's range? (export/fp16_check.py)
    record = dict(precision="fp16", source=form, fp32_summary=summarize(keep), check=check,
                  use="onnxruntime-cuda:fp16 (reduced precision): FP16 weights and activations, LayerNorm statistics in FP32")
    if check["refused"]:
        out.unlink()
        entry["variants"][variant] = {"file": out.name, "derived_from_sha256": source["sha256"], "stored": False,
                                      "refused": check["refused"], **record}
        warnings.warn(f"sam2rt export: the FP16 encoder is not usable with these weights and was not written: "
                      f"{check['refused']}. onnxruntime-cuda runs TF32 (its default) and FP32.", stacklevel=2)
        return
    if check["near_limit"]:
        warnings.warn(f"sam2rt export: the FP16 encoder was written, but {check['near_limit']} of its FP16 tensors come "
                      "within 4x of FP16's range on the check's photo; other images may pass it: check yours with "
                      "`sam2rt verify --backend onnxruntime-cuda:fp16`", stacklevel=2)
    entry["variants"][variant] = _entry(out, source["sha256"], **record)


FP16_VIDEO_ROWS = ("memory_encoder.fp16", "memory_attention.fp16", "track_decoder.fp16", "track_decoder.tracking_fp16")


def add_tracking_decoder(manifest: Manifest) -> None:
    """Write track_decoder.tracking.onnx (export/tracking_decoder.py: the tracked frames' decoder, edited from the
    base graph and checked against it) and record it as the tracking decoder's `tracking` variant."""
    from .tracking_decoder import CPU_DISABLED_OPTIMIZERS, io_spec, make_tracking_decoder

    entry = manifest.entry("track_decoder")
    if entry is None or not manifest.is_stored(entry) or "video" not in manifest.data:
        return  # an export from before video tracking, or one whose tracking decoder a lean export removed
    row = graph_file("track_decoder", "tracking")
    out = manifest.directory / row.file
    check = make_tracking_decoder(manifest.verify_file(entry), out, manifest.data["video"])
    entry.setdefault("variants", {})["tracking"] = _entry(
        out, entry["sha256"], precision="fp32", use=row.use, check_max_abs_diff=check,
        ort_disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS), **io_spec(out))


DECODE_ROWS = ("decoder.decode_multi", "decoder.decode_single")


def add_decode_graphs(manifest: Manifest, keys: Collection[str] = DECODE_ROWS) -> None:
    """Write the merged decode graphs (graph_table's rows `keys` of DECODE_ROWS: export/decode_graphs.py, the GPU fast
    decoder followed by the package's postprocessing, checked against the two) and record each as a variant of the
    decoder made from `fast_device`, with the postprocessing graph's sha256 (the runtime uses a merged graph only
    while the package ships that postprocessing)."""
    from .decode_graphs import make_decode_graph, postprocess_sha256
    from .tracking_decoder import io_spec

    source = manifest.variant("decoder", "fast_device")
    if source is None or not manifest.is_stored(source):
        return  # an export without the GPU fast decoder
    src = manifest.verify_file(source)
    for key in keys:
        row = graph_file(*key.split("."))
        multimask = row.variant == "decode_multi"
        out = manifest.directory / row.file
        check = make_decode_graph(src, out, multimask)
        manifest.graph("decoder")["variants"][row.variant] = _entry(
            out, source["sha256"], precision="fp32", source=row.made_from, use=row.use, check_max_abs_diff=check,
            postprocess_sha256=postprocess_sha256(multimask),
            **{k: source[k] for k in ("max_points", "prompts_per_run") if k in source}, **io_spec(out))


def add_fp16_video(manifest: Manifest, keys: Collection[str] = FP16_VIDEO_ROWS) -> None:
    """Write the video graphs of onnxruntime-cuda:fp16 (graph_table's rows `keys` of FP16_VIDEO_ROWS) from what each
    is made from, each recorded as its role's variant. FP32 stays where export.fp16 keeps it, and in the comparisons
    (the object-score test, the token choice's IoU comparison). The memory attention is made from its compact `device`
    form (no key mask: FP16 MultiHeadAttention runs as ONNX Runtime's fused CUDA kernels), or from its standard-ops
    graph in an export without one (never from `fused`, whose key mask sits in one extra q/k channel whose -1e9 FP16
    cannot hold). The tracked frames' decoder is made from its FP32 `tracking` form, and only from it."""
    from .fp16 import COMPARISON_OP_TYPES, convert_to_mixed_fp16, summarize

    for key in keys:
        row = graph_file(*key.split("."))
        entry = manifest.entry(row.role)
        if entry is None:
            continue  # an export from before video tracking
        out = manifest.directory / row.file
        source = (entry.get("variants") or {}).get(row.made_from) if row.made_from else None
        if source is not None and not manifest.is_stored(source):
            source = None
        if source is None and row.made_from == "tracking":
            continue  # no tracking form to convert: the FP16 tracker runs the `fp16` tracking decoder
        made_from = source if source is not None else entry
        keep = convert_to_mixed_fp16(manifest.verify_file(made_from), out, extra_fp32_ops=COMPARISON_OP_TYPES,
                                     ort_kernels=True)
        origin = {"source": row.made_from} if made_from is not entry else {}
        entry.setdefault("variants", {})[row.variant] = _entry(
            out, made_from["sha256"], precision="fp16", fp32_summary=summarize(keep), use=row.use, **origin,
            **{k: made_from[k] for k in ("inputs", "outputs") if k in made_from},
        )


FP16_DECODE_ROWS = ("decoder.decode_multi_fp16", "decoder.decode_single_fp16")


def add_fp16_decode(manifest: Manifest, keys: Collection[str] = FP16_DECODE_ROWS) -> None:
    """Write the FP16 copies of the merged decode graphs (graph_table's rows `keys` of FP16_DECODE_ROWS,
    export/decode_graphs.make_fp16_decode_graph: the decoder part FP16, the postprocessing FP32) and record each as
    a variant of the decoder made from its FP32 merged graph. A copy whose check against the FP32 graph fails
    (overflow, or a parity bound passed) is not written: onnxruntime-cuda:fp16 then decodes in FP32 and the
    manifest says why."""
    from .decode_graphs import make_fp16_decode_graph

    for key in keys:
        row = graph_file(*key.split("."))
        source = manifest.variant("decoder", row.made_from)
        if source is None or not manifest.is_stored(source):
            continue  # an export without the merged graphs
        out = manifest.directory / row.file
        check = make_fp16_decode_graph(manifest.verify_file(source), out, row.made_from == "decode_multi")
        carried = {k: source[k] for k in ("postprocess_sha256", "max_points", "prompts_per_run", "inputs", "outputs")
                   if k in source}
        record = dict(precision="fp16", source=row.made_from, use=row.use, fp32_summary=check.pop("fp32_summary"),
                      check=check, **carried)
        if check["refused"]:
            out.unlink(missing_ok=True)
            manifest.graph("decoder")["variants"][row.variant] = {
                "file": out.name, "derived_from_sha256": source["sha256"], "stored": False, "refused": check["refused"],
                **record}
            warnings.warn(f"sam2rt export: {out.name} is not usable with these weights and was not written: "
                          f"{check['refused']}. onnxruntime-cuda:fp16 decodes with the FP32 merged graphs.", stacklevel=2)
            continue
        manifest.graph("decoder")["variants"][row.variant] = _entry(out, source["sha256"], **record)


def add_variants(
    model_dir: str | Path, optimized: bool = True, int8: bool = False, fp16: bool = False,
    only: Collection[str] | None = None,
) -> Manifest:
    """Add the `optimized` (and, if asked, `int8` / `fp16`) variants of each graph to a model directory's manifest.

    `only`: the GraphFile keys to make (`sam2rt export --target` makes the rows its targets need); None: all asked.
    """
    manifest = Manifest.load(model_dir)
    d = manifest.directory

    def wanted(role: str, variant: str) -> bool:
        return only is None or f"{role}.{variant}" in only

    for row in optimized_variants() if optimized else ():
        if not wanted(row.role, row.variant):
            continue
        entry = manifest.graph(row.role)
        variants = entry.setdefault("variants", {})
        source = variants.get(row.made_from) if row.made_from else None
        if source is not None and source.get("derived_from_sha256") not in (None, entry["sha256"]):
            source = None  # made from another version of the base graph: stale
        if row.made_from and source is None:
            if row.variant != "optimized":
                continue  # e.g. an export without decoder_fast: nothing to optimise
            # the role's main optimised copy falls back to the base graph (exports without the fused encoder)
        if source is None:
            src, derived, origin = manifest.verify_graph(row.role), entry["sha256"], {}
        else:
            src, derived, origin = manifest.verify_file(source), source["sha256"], {"source": row.made_from}
        disabled = (source or {}).get("ort_disabled_optimizers", [])
        out = save_optimized(src, d / row.file, disabled)
        carried = {k: source[k] for k in ("inputs", "outputs", "max_points", "prompts_per_run", "ort_disabled_optimizers")
                   if source and k in source}
        if row.role == "encoder" and origin:  # recorded as before: the encoder's copy names its source
            carried.update(origin)
        variants[row.variant] = _entry(out, derived, precision="fp32", optimization="ORT_ENABLE_EXTENDED", **carried)
    if fp16 and (wanted("encoder", "fp16") or wanted("encoder", "device_fp16")):
        add_fp16_encoder(manifest)
    if wanted("track_decoder", "tracking"):
        add_tracking_decoder(manifest)
    add_decode_graphs(manifest, [key for key in DECODE_ROWS if wanted(*key.split("."))])
    if fp16:
        add_fp16_decode(manifest, [key for key in FP16_DECODE_ROWS if wanted(*key.split("."))])
        add_fp16_video(manifest, [key for key in FP16_VIDEO_ROWS if wanted(*key.split("."))])
    if int8 and wanted("encoder", "int8"):
        entry = manifest.graph("encoder")
        base = manifest.graph_path("encoder")
        # quantised from the base graph (ORT's fused graph has contrib ops the quantiser cannot type)
        out = quantize_int8(base, d / graph_file("encoder", "int8").file)
        entry["variants"]["int8"] = _entry(
            out, entry["sha256"], precision="int8",
            quantization="onnxruntime.quantization.quantize_dynamic, MatMul/Gemm weights per-channel QInt8",
        )
    manifest.save()
    return manifest
