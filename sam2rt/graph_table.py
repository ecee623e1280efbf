"""Everything a model directory can hold, in one table, and the typed shape profiles of its dynamic graphs.

`GRAPHS` lists every ONNX file an export writes: which manifest entry records it (`graphs.<role>` for a base
graph, `graphs.<role>.variants.<variant>` for the others), what it is made from, its precision and what
runs it. The exporter names its files from here, `export.optimize` derives its variants from here, each
backend chooses its graphs by slot from here (`CPU_SLOTS`, `DEVICE_SLOTS`), and `sam2rt export --target`
keeps the rows its targets run (`TARGETS`, `rows_for_targets`), so a new graph is one row.
TensorRT engines are not in the table: `sam2rt build-engine` makes them on the GPU that runs them
(runtime/engines.py names them and records them under the manifest's `engines`).

`ShapeTuple` / `Profile` (after Polygraphy's) describe the decoder's dynamic dimensions for TensorRT
optimisation profiles and ONNX Runtime's TensorRT provider, instead of nested dicts; the manifest stores
them with `Profile.to_dict()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

CPU, CUDA, TENSORRT = "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"


@dataclass(frozen=True)
class GraphFile:
    """One file of a model directory.

    role: the manifest's `graphs.<role>`; variant: None for the role's base graph, else the key under
    `graphs.<role>.variants`; made_from: the variant it is derived from (None: the base graph, or PyTorch for
    the files `sam2rt export` writes with torch.onnx); maker: "torch.onnx", "onnxruntime" (offline
    optimisation), "fp16" (export.fp16), "int8" (onnxruntime.quantization), "sam2rt" (a graph edit of sam2rt's own,
    e.g. export.tracking_decoder); runs_on: the backends that load it
    where the export made what they prefer (their slots fall back to other rows: CPU_SLOTS, DEVICE_SLOTS), which
    is also what `sam2rt export --target` keeps (rows_for_targets).
    """

    role: str
    variant: str | None
    file: str
    precision: str
    maker: str
    made_from: str | None
    runs_on: tuple[str, ...]
    use: str
    optional: bool = False  # written only when asked (--int8) or when its source exists

    @property
    def key(self) -> str:
        return self.role if self.variant is None else f"{self.role}.{self.variant}"


GRAPHS: tuple[GraphFile, ...] = (
    GraphFile("encoder", None, "encoder.onnx", "fp32", "torch.onnx", None, (TENSORRT,),
              "image (1,3,1024,1024) -> the three features; standard ONNX ops (TensorRT, INT8 quantisation)"),
    GraphFile("encoder", "fused", "encoder.fused.onnx", "fp32", "torch.onnx", None, (),
              "the same encoder with attention as com.microsoft MultiHeadAttention (ONNX Runtime only); the CPU's "
              "form (first stages in chunks, padding after the linears), whose optimised copy the CPU runs"),
    GraphFile("encoder", "optimized", "encoder.opt.onnx", "fp32", "onnxruntime", "fused", (CPU,),
              "`fused` after ONNX Runtime's offline optimisations: the CPU encoder"),
    GraphFile("encoder", "fp16", "encoder.fused.fp16.onnx", "fp16", "fp16", "fused", (),
              "`fused` in FP16: what onnxruntime-cuda:fp16 ran before the `device` form (exports made before it)"),
    # the GPU's encoder form (export.encoder_fusion.fused_encoder_attention(chunked=False, pad_first=True)): on an
    # H100 (GPU run 6, sam2rt.bench.encoder_forms) 3.51 ms in FP16 and 7.18 ms in TF32 against the `fused` form's
    # 7.74 and 11.36, the same features
    GraphFile("encoder", "device", "encoder.device.onnx", "fp32", "torch.onnx", None, (CUDA,),
              "the MultiHeadAttention encoder for a GPU: each stage's attention and MLP whole, padded windows padded "
              "once before the linears by concatenation (no Pad node)"),
    GraphFile("encoder", "device_fp16", "encoder.device.fp16.onnx", "fp16", "fp16", "device", (CUDA,),
              "onnxruntime-cuda:fp16: `device` with FP16 weights and activations, LayerNorm statistics in FP32 "
              "(reduced precision)"),
    GraphFile("encoder", "int8", "encoder.int8.onnx", "int8", "int8", None, (CPU,),
              "onnxruntime-cpu:int8: dynamically quantised MatMul weights (reduced precision, opt-in)", optional=True),
    GraphFile("decoder", None, "decoder.onnx", "fp32", "torch.onnx", None, (CUDA, TENSORRT),
              "features + prompts (+ mask_input) -> four tokens' low-res logits and IoU; B and N dynamic"),
    GraphFile("decoder", "optimized", "decoder.opt.onnx", "fp32", "onnxruntime", None, (CPU,),
              "decoder.onnx after ONNX Runtime's offline optimisations"),
    GraphFile("decoder", "nomask", "decoder_nomask.onnx", "fp32", "torch.onnx", None, (CUDA,),
              "prompts without mask_input: the same outputs without the mask convolutions"),
    GraphFile("decoder", "nomask_optimized", "decoder_nomask.opt.onnx", "fp32", "onnxruntime", "nomask", (CPU,),
              "decoder_nomask after ONNX Runtime's offline optimisations"),
    GraphFile("decoder", "prep", "decoder_prep.onnx", "fp32", "torch.onnx", None, (CUDA,),
              "once per image: the prompt-independent part of decoder_fast"),
    GraphFile("decoder", "prep_optimized", "decoder_prep.opt.onnx", "fp32", "onnxruntime", "prep", (CPU,),
              "decoder_prep after ONNX Runtime's offline optimisations"),
    GraphFile("decoder", "fast", "decoder_fast.onnx", "fp32", "torch.onnx", None, (),
              "one plain prompt of <= 10 points over decoder_prep's tensors (decoder_nomask's function, rewritten); "
              "its upscaling in the CPU's layout"),
    GraphFile("decoder", "fast_optimized", "decoder_fast.opt.onnx", "fp32", "onnxruntime", "fast", (CPU,),
              "decoder_fast after ONNX Runtime's offline optimisations (less the fusions it records)"),
    GraphFile("decoder", "fast_device", "decoder_fast.device.onnx", "fp32", "torch.onnx", None, (CUDA,),
              "the same function for a batch of prompts per run, every product a plain or strided-batched GEMM: what "
              "ONNX Runtime's CUDA provider computes correctly and captures in CUDA graphs (export/cuda_matmul.py)"),
    # decoder_fast.device + the package's postprocessing (runtime/graphs) as one graph: a decode to masks is one run
    # (export/decode_graphs.py; maker "sam2rt": a graph merge, no torch)
    GraphFile("decoder", "decode_multi", "decoder_fast.device.multi.onnx", "fp32", "sam2rt", "fast_device", (CUDA,),
              "fast_device followed by the device postprocessing of the three multimask tokens (postprocess_multi): "
              "prompts -> masks, scores and low-res logits in one CUDA-graph replay"),
    GraphFile("decoder", "decode_single", "decoder_fast.device.single.onnx", "fp32", "sam2rt", "fast_device", (CUDA,),
              "fast_device followed by the device postprocessing of the single-mask token, with the stability "
              "fallback (postprocess_single): prompts -> masks, scores and low-res logits in one CUDA-graph replay"),
    # the merged graphs of onnxruntime-cuda:fp16 (export.optimize.add_fp16_decode): the decoder part in FP16, its
    # postprocessing FP32 as in every mode (the upsampling and threshold must equal the host path's)
    GraphFile("decoder", "decode_multi_fp16", "decoder_fast.device.multi.fp16.onnx", "fp16", "fp16", "decode_multi", (CUDA,),
              "onnxruntime-cuda:fp16 (reduced precision): decode_multi with the decoder in FP16 weights and activations "
              "(softmax, its logits' products and the positional encoding's sin/cos in FP32), the postprocessing FP32"),
    GraphFile("decoder", "decode_single_fp16", "decoder_fast.device.single.fp16.onnx", "fp16", "fp16", "decode_single",
              (CUDA,), "onnxruntime-cuda:fp16 (reduced precision): decode_single with the decoder in FP16 as "
              "decode_multi_fp16"),
    # video tracking (sam2rt.export.video_export): the VideoTracker runs them on ONNX Runtime beside every image
    # backend (beside tensorrt on ONNX Runtime's CUDA provider), so they go with every export target
    GraphFile("memory_encoder", None, "memory_encoder.onnx", "fp32", "torch.onnx", None, (CPU, CUDA, TENSORRT),
              "a frame's features + its mask -> the memory features and positional encoding it stores"),
    GraphFile("memory_attention", None, "memory_attention.onnx", "fp32", "torch.onnx", None, (TENSORRT,),
              "the current frame's features attend to the memory bank (static slots with validity masks); "
              "standard ONNX ops (the CUDA provider's fallback in exports without the `device` form)"),
    GraphFile("memory_attention", "fused", "memory_attention.fused.onnx", "fp32", "torch.onnx", None, (CPU,),
              "the same function with attention as com.microsoft MultiHeadAttention: ONNX Runtime's CPU flash kernel"),
    GraphFile("memory_attention", "device", "memory_attention.device.onnx", "fp32", "torch.onnx", None, (CUDA,),
              "the valid slots only (dynamic counts, no key mask), attention as com.microsoft MultiHeadAttention: "
              "ONNX Runtime's fused CUDA kernels"),
    GraphFile("track_decoder", None, "track_decoder.onnx", "fp32", "torch.onnx", None, (CPU, CUDA, TENSORRT),
              "the mask decoder's tracking path: masks, object score, occlusion-aware object pointers"),
    # the tracker's graphs for onnxruntime-cuda:fp16 (export.optimize.add_fp16_video), made from the base graphs
    GraphFile("memory_encoder", "fp16", "memory_encoder.fp16.onnx", "fp16", "fp16", None, (CUDA,),
              "onnxruntime-cuda:fp16 (reduced precision): FP16 weights and activations, normalisation statistics in FP32"),
    GraphFile("memory_attention", "fp16", "memory_attention.fp16.onnx", "fp16", "fp16", "device", (CUDA,),
              "onnxruntime-cuda:fp16 (reduced precision): FP16 weights and activations; LayerNorm statistics, softmax, "
              "the attention logits and the RoPE tables' sin/cos in FP32"),
    GraphFile("track_decoder", "fp16", "track_decoder.fp16.onnx", "fp16", "fp16", None, (CUDA,),
              "onnxruntime-cuda:fp16 (reduced precision): FP16 weights and activations; LayerNorm statistics, softmax, "
              "the attention logits, the positional encoding and the object-score test in FP32"),
    GraphFile("mask_downsample", None, "mask_downsample.onnx", "fp32", "torch.onnx", None, (CPU, CUDA, TENSORRT),
              "a mask prompt brought to the decoder's low-res mask input"),
    # a tracked frame's decoder, edited from track_decoder.onnx (export/tracking_decoder.py; maker "sam2rt": no torch)
    GraphFile("track_decoder", "tracking", "track_decoder.tracking.onnx", "fp32", "sam2rt", None, (CPU, CUDA, TENSORRT),
              "the tracking decoder of a tracked frame: no prompt inputs (their constants folded in, so no mask "
              "convolutions), the reference's token choice in the graph: the chosen mask, pointer and object score"),
    GraphFile("track_decoder", "tracking_fp16", "track_decoder.tracking.fp16.onnx", "fp16", "fp16", "tracking", (CUDA,),
              "onnxruntime-cuda:fp16 (reduced precision): the tracked frames' decoder as the `fp16` tracking decoder"),
)


def graph_file(role: str, variant: str | None = None) -> GraphFile:
    """The table's row for a manifest entry (KeyError for one the table does not know)."""
    for g in GRAPHS:
        if g.role == role and g.variant == variant:
            return g
    raise KeyError(f"{role}.{variant}")


def row(key: str) -> GraphFile:
    """The row of a GraphFile.key ("encoder", "decoder.fast", ...)."""
    role, _, variant = key.partition(".")
    return graph_file(role, variant or None)


def source_of(g: GraphFile) -> GraphFile | None:
    """The row `g` is made from: its `made_from` variant, or the role's base graph for the other variants (those
    exported with torch record the base graph's sha256 as what they were exported with); None for a base graph."""
    if g.variant is None:
        return None
    return graph_file(g.role, g.made_from)


def optimized_variants() -> Iterable[GraphFile]:
    """The rows ONNX Runtime's offline optimisation makes (export.optimize writes them)."""
    return (g for g in GRAPHS if g.maker == "onnxruntime")


# A backend's slots: which manifest entry serves each, first fresh one wins (None = the role's base graph).
CPU_SLOTS: dict[str, tuple[str, tuple[str | None, ...]]] = {
    "encoder": ("encoder", ("optimized", "fused", None)),
    "decoder": ("decoder", ("optimized", None)),
    "decoder_nomask": ("decoder", ("nomask_optimized", "nomask")),
    "decoder_prep": ("decoder", ("prep_optimized", "prep")),
    "decoder_fast": ("decoder", ("fast_optimized", "fast", "fast_device")),
}
# The video graphs' slots (runtime.video.graphs.VideoGraphs), on the CPU provider and on a GPU provider (the
# VideoTracker runs them on ONNX Runtime beside every image backend).
VIDEO_CPU_SLOTS: dict[str, tuple[str, tuple[str | None, ...]]] = {
    "memory_encoder": ("memory_encoder", (None,)),
    "memory_attention": ("memory_attention", ("fused", None)),
    "track_decoder": ("track_decoder", (None,)),
    "mask_downsample": ("mask_downsample", (None,)),
    # optional (exports before it lack it: the tracker then runs track_decoder and chooses the token on the host)
    "tracking_decoder": ("track_decoder", ("tracking",)),
}
VIDEO_DEVICE_SLOTS: dict[str, tuple[str, tuple[str | None, ...]]] = {
    **VIDEO_CPU_SLOTS, "memory_attention": ("memory_attention", ("device", None)),
}
# An FP16 image backend's (the mask's downsampling, a resize, stays FP32). The FP32 graphs are the fallback where
# an export has no FP16 ones (a `tensorrt` export); onnxruntime-cuda:fp16 requires them (runtime.video.graphs).
# The tracked frames' decoder runs in the tracking decoder's precision (runtime.video.graphs drops a mismatch).
VIDEO_FP16_SLOTS: dict[str, tuple[str, tuple[str | None, ...]]] = {
    "memory_encoder": ("memory_encoder", ("fp16", None)),
    "memory_attention": ("memory_attention", ("fp16", "device", None)),
    "track_decoder": ("track_decoder", ("fp16", None)),
    "mask_downsample": ("mask_downsample", (None,)),
    "tracking_decoder": ("track_decoder", ("tracking_fp16", "tracking")),
}
# On a GPU provider the exported graphs themselves: ONNX Runtime optimises them for the device at load (the
# CPU-optimised copies hold CPU-only fused kernels).
DEVICE_SLOTS: dict[str, tuple[str, tuple[str | None, ...]]] = {
    "encoder": ("encoder", ("device", "fused", None)),
    "decoder": ("decoder", (None,)),
    "decoder_nomask": ("decoder", ("nomask",)),
    "decoder_prep": ("decoder", ("prep",)),
    "decoder_fast": ("decoder", ("fast_device",)),
    # optional: decoder_fast + postprocessing in one graph (exports before them decode in two runs)
    "decode_multi": ("decoder", ("decode_multi",)),
    "decode_single": ("decoder", ("decode_single",)),
    # optional, onnxruntime-cuda:fp16 only: the same in FP16 (exports before them, or with --no-fp16, decode in FP32)
    "decode_multi_fp16": ("decoder", ("decode_multi_fp16",)),
    "decode_single_fp16": ("decoder", ("decode_single_fp16",)),
}


# --- export targets ----------------------------------------------------------------------------------
# `sam2rt export --target T` writes the graphs the backends of T run. A directory exported for some targets
# runs on the backends that accept one of them (BACKEND_TARGETS); exports made before targets existed hold
# every graph and run everywhere. onnxruntime-cpu also accepts a `cuda` export: its slots fall back to the
# graphs before ONNX Runtime's offline optimisation (same function; ONNX Runtime optimises them at load).
# A `tensorrt` export holds the standard-ONNX encoder that TensorRT builds engines from, which the CPU would
# run slower than the fused one: onnxruntime-cpu refuses it and says which export to make.
TARGETS: dict[str, tuple[str, ...]] = {"cpu": (CPU,), "cuda": (CUDA,), "tensorrt": (TENSORRT,)}
ORT_TENSORRT = "onnxruntime-tensorrt"
BACKEND_TARGETS: dict[str, tuple[str, ...]] = {
    CPU: ("cpu", "cuda"),
    CUDA: ("cuda",),
    ORT_TENSORRT: ("cuda", "tensorrt"),  # the device slots: the fused encoder, else the standard one
    TENSORRT: ("tensorrt",),  # engines, built by `sam2rt build-engine` from encoder.onnx + decoder.onnx
}
BACKEND_SLOTS: dict[str, dict[str, tuple[str, tuple[str | None, ...]]]] = {
    CPU: {**CPU_SLOTS, **VIDEO_CPU_SLOTS}, CUDA: {**DEVICE_SLOTS, **VIDEO_DEVICE_SLOTS},
}


def parse_targets(text: str) -> tuple[str, ...]:
    """"cpu", "cpu,tensorrt" or "all" -> the targets in table order (ValueError naming the choices)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if "all" in names:
        return tuple(TARGETS)
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"unknown export target {', '.join(unknown) or repr(text)}; choose from "
                         f"{', '.join(TARGETS)}, all (or several: cpu,tensorrt)")
    return tuple(t for t in TARGETS if t in names)


def rows_for_targets(targets: Iterable[str], made: Callable[[GraphFile], bool]) -> tuple[GraphFile, ...]:
    """The rows an export for `targets` keeps, given which rows it makes at all (`made`: e.g. no `onnxruntime`
    rows with --no-optimize): every made row a target's backend runs, and for each slot of that backend the first
    of its preferences that is made (so --no-optimize keeps the graphs the optimised copies would be made from)."""
    keep: set[str] = set()
    for target in targets:
        for backend in TARGETS[target]:
            keep.update(g.key for g in GRAPHS if backend in g.runs_on and made(g))
            for role, preferences in BACKEND_SLOTS.get(backend, {}).values():
                first = next((graph_file(role, v) for v in preferences if made(graph_file(role, v))), None)
                if first is not None:
                    keep.add(first.key)
    return tuple(g for g in GRAPHS if g.key in keep)


def rows_to_make(keep: Iterable[GraphFile]) -> tuple[GraphFile, ...]:
    """`keep`, what it is made from (recursively) and the base graph of each of its roles (the manifest's
    `graphs.<role>`, whose sha256 identifies the export and which every variant records), in table order."""
    keep = tuple(keep)
    keys = {g.key for g in keep} | {graph_file(g.role).key for g in keep}
    todo = [row(k) for k in keys]
    while todo:
        src = source_of(todo.pop())
        if src is not None and src.key not in keys:
            keys.add(src.key)
            todo.append(src)
    return tuple(g for g in GRAPHS if g.key in keys)


def targets_writing(g: GraphFile) -> tuple[str, ...]:
    """The export targets whose backends run row `g`: the `--target` that writes it."""
    return tuple(t for t, backends in TARGETS.items() if set(backends) & set(g.runs_on))


# --- shape profiles ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeTuple:
    """The smallest, the tuned-for and the largest shape of one dynamic input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ValueError(f"min/opt/max of a shape need one rank: {self.min}, {self.opt}, {self.max}")
        if any(lo > o or o > hi for lo, o, hi in zip(self.min, self.opt, self.max)):
            raise ValueError(f"need min <= opt <= max in every dimension: {self.min}, {self.opt}, {self.max}")

    def admits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: a name and a ShapeTuple per dynamic input."""

    name: str
    shapes: dict[str, ShapeTuple]

    def admits(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return all(self.shapes[k].admits(tuple(v)) for k, v in shapes.items() if k in self.shapes)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name,
                "shapes": {k: {"min": list(s.min), "opt": list(s.opt), "max": list(s.max)} for k, s in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: "dict[str, Any] | Profile") -> "Profile":
        if isinstance(data, Profile):
            return data
        return cls(str(data["name"]), {k: ShapeTuple(tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
                                       for k, v in data["shapes"].items()})
