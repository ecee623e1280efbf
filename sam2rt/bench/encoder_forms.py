"""Which form of the image encoder, and which of ONNX Runtime's attention kernels, runs fastest on this GPU.

    python -m sam2rt.bench.encoder_forms MODEL_DIR --out DIR [--provider cuda|cpu] [--rounds 4] [--runs 25]
                                         [--no-unchunked] [--work DIR] [--only CONFIGS]

Why: on the H100 of run 4 (benchmarks/README.md) the FP16 encoder took 8.9 ms and TF32 12.8 ms. Were the encoder
bound by its tensor-core work, FP16 would take about half of TF32; ~5 ms of it do not scale with the precision.
Two choices the export and the runtime make for the CPU have never been compared on a GPU:

- the encoder the device path loads (`exported`: the `fused` form, and its FP16 copy) runs Hiera's first stages in
  chunks (window attention over groups of windows, MLPs over row chunks) that bound the CPU's peak memory; on a GPU
  each chunk is more kernels and a concatenation. `unchunked` is the same graph with each of them whole, exported
  here from the model directory's weights (needs torch and sam2) and checked against PyTorch as `sam2rt export`
  checks every graph;
- the attention of every Hiera block is com.microsoft MultiHeadAttention, whose CUDA kernel ONNX Runtime chooses
  per call (flash, memory-efficient, cuDNN, or the unfused "math" path) unless the CUDA provider option
  `sdpa_kernel` restricts it.

Every (form, precision, attention kernel) runs as the runtime runs the encoder: its own session, CUDA graph
captured, input and outputs bound on the device. The configurations take turns, `--runs` runs each per round over
`--rounds` rounds, so drifting clocks hit them alike; p50 per configuration. Each configuration's image embedding is
compared with the exported form's in TF32 with ONNX Runtime's default kernel choice (`max_abs_vs_reference`), so a
fast configuration that computes something else shows as such. `encoder_forms.json` and `encoder_forms.md` go to
DIR.

Which kernel each MultiHeadAttention node actually ran is recorded too (`kernels_run`): a restriction is a wish,
not an order. ONNX Runtime falls back to the unfused kernel where the one asked for does not take the shapes or the
type (flash has no FP32 kernel; cuDNN's needs cuDNN >= 9.3), and without a restriction its FP32 path uses the
memory-efficient kernel only from 256 tokens on, above every Hiera window but the global blocks'. ONNX Runtime
prints the route of each node when ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO is set (read when a session is made); its
lines are taken from the process's standard output while each configuration warms up.

On the CPU provider (`--provider cpu`) only ONNX Runtime's default kernel exists; tests run it that way.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..graph_table import DEVICE_SLOTS
from ..manifest import Manifest
from ..runtime.backends.onnxruntime_backend import (
    SDPA_KERNELS, _import_ort, cuda_provider_options, session_options, slot_entries,
)
from ..runtime.backends.ort_device_backend import fp16_encoder_entry

# Flash attention has no FP32 kernel: TF32 graphs are measured with the others.
FP32_KERNELS = ("default", "efficient", "math")
REFERENCE = ("exported", "tf32", "default")


@dataclass(frozen=True)
class Config:
    form: str  # "exported" (the encoder the device path loads: graph_table.DEVICE_SLOTS) or one of FORMS_MADE_HERE
    precision: str  # "tf32" or "fp16" ("fp32" on the CPU provider)
    kernel: str  # a key of SDPA_KERNELS

    @property
    def name(self) -> str:
        return f"{self.form}:{self.precision}:{self.kernel}"


# The forms exported here, beside the model directory's own: the `fused` encoder's rewrites with these arguments of
# export.encoder_fusion.fused_encoder_attention. `unchunked`: without the CPU's memory chunks; `padfirst`: also with
# padded windows padded once, before the linears, by concatenation (no Pad node: run 5's profile had ONNX Runtime's
# 15 Pads at 0.27-0.5 ms each).
FORMS_MADE_HERE: dict[str, dict[str, bool]] = {"unchunked": {"chunked": False},
                                               "padfirst": {"chunked": False, "pad_first": True}}


def export_unchunked(manifest: Manifest, work: Path, form: str = "unchunked") -> tuple[Path, float]:
    """The model directory's `fused` encoder in one of FORMS_MADE_HERE (default: without its CPU memory chunks),
    exported from the same weights (its checkpoint, or the same seeded random weights), checked against PyTorch's
    forward_image as every exported graph is. Returns the file (encoder.FORM.onnx) and its largest difference to
    PyTorch."""
    import torch

    from ..export.checkpoint import build_model, load_checkpoint, reference_checkpoint
    from ..export.encoder_fusion import fused_encoder_attention
    from ..export.graphs import ImageEncoderGraph
    from ..export.onnx_export import IMAGE_GRAPH_SPECS, ExportRun, check_graph, export_graph, open_session
    from ..model_specs import IMAGE_SIZE, get_spec

    work.mkdir(parents=True, exist_ok=True)
    spec = get_spec(manifest.model_name, manifest.model.get("version", "2.1"))
    model = build_model(spec)
    load_checkpoint(model, reference_checkpoint(manifest, work))
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = ImageEncoderGraph(model).eval()(image)
    run = ExportRun(model, work, int(manifest.data.get("opset", 17)), image, tuple(feats))
    fused = next(s for s in IMAGE_GRAPH_SPECS if s.key == "encoder.fused")
    made = replace(fused, context=lambda: fused_encoder_attention(**FORMS_MADE_HERE[form]))
    path = check_graph(export_graph(made, run))
    diffs = made.verify(run, open_session(path))  # ExportError beyond the export's tolerance
    out = path.with_name(f"encoder.{form}.onnx")
    path.replace(out)
    return out, max(diffs.values())


def fp16_copy(src: Path, dst: Path) -> Path:
    """The FP16 form of an encoder graph, converted as the export converts the `fused` one (export.optimize)."""
    from ..export.fp16 import convert_to_mixed_fp16

    convert_to_mixed_fp16(src, dst, ort_kernels=True)
    return dst


# ONNX Runtime's CUDA MultiHeadAttention prints its route per run where this environment variable is set
KERNEL_DEBUG_ENV = "ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO"
_ROUTE = re.compile(r"Operator=MultiHeadAttention Node=(\S*) DataType=(\S+) SdpaKernel=([A-Z_]+)")


@contextlib.contextmanager
def captured_stdout() -> Iterator[list[str]]:
    """The lines written to the process's standard output (file descriptor 1, where ONNX Runtime's C++ code prints)
    while active; the list is filled when the block ends."""
    lines: list[str] = []
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield lines
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            lines += tmp.read().decode(errors="replace").splitlines()


def kernels_run(lines: list[str]) -> dict[str, int]:
    """How many MultiHeadAttention nodes ran each attention kernel, from ONNX Runtime's debug lines (a node's last
    route counts once)."""
    route = {}
    for line in lines:
        m = _ROUTE.search(line)
        if m:
            route[m.group(1)] = m.group(3)
    return dict(sorted(collections.Counter(route.values()).items()))


class _Timed:
    """One configuration's session with its input and outputs bound on the device (a CUDA graph on CUDA)."""

    def __init__(self, path: Path, config: Config, provider: str, image: np.ndarray) -> None:
        with captured_stdout() as lines:
            self._start(path, config, provider, image)
        self.kernels = kernels_run(lines)
        sys.stdout.write("".join(f"{line}\n" for line in lines if not _ROUTE.search(line)))  # the rest as it came

    def _start(self, path: Path, config: Config, provider: str, image: np.ndarray) -> None:
        ort = _import_ort()
        device = "cuda" if provider == "cuda" else "cpu"
        if provider == "cuda":
            options = cuda_provider_options(tf32=True, graph=True, attention=config.kernel)
            providers: list[Any] = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), sess_options=session_options(mem_pattern=True), providers=providers)
        self.io = self.session.io_binding()
        inp = self.session.get_inputs()[0]
        self.image = ort.OrtValue.ortvalue_from_numpy(image.astype(np.float16 if "float16" in inp.type else np.float32),
                                                      device, 0)
        self.io.bind_ortvalue_input(inp.name, self.image)
        self.outputs = {}
        for o in self.session.get_outputs():
            dtype = np.float16 if "float16" in o.type else np.float32
            self.outputs[o.name] = ort.OrtValue.ortvalue_from_shape_and_type([int(d) for d in o.shape], dtype, device, 0)
            self.io.bind_ortvalue_output(o.name, self.outputs[o.name])
        self.times: list[float] = []
        for _ in range(3):  # the first run captures the CUDA graph; then warm
            self.run()

    def run(self) -> float:
        t0 = time.perf_counter()
        self.session.run_with_iobinding(self.io)
        self.io.synchronize_outputs()
        return time.perf_counter() - t0

    def embedding(self) -> np.ndarray:
        return np.asarray(self.outputs["image_embed"].numpy(), np.float32)


def configs(provider: str, forms: list[str]) -> list[Config]:
    if provider != "cuda":
        return [Config(form, "fp32", "default") for form in forms]
    out = []
    for form in forms:
        out += [Config(form, "tf32", k) for k in FP32_KERNELS]
        out += [Config(form, "fp16", k) for k in SDPA_KERNELS]
    return out


def measure(files: dict[tuple[str, str], Path], cfgs: list[Config], provider: str, rounds: int, runs: int,
            log=print) -> dict[str, dict[str, Any]]:
    """Every configuration's p50 / p90 ms over rounds x runs interleaved runs, and its embedding's largest
    difference to the reference configuration's; a configuration ONNX Runtime refuses gets its error instead."""
    image = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    timed: dict[Config, _Timed] = {}
    results: dict[str, dict[str, Any]] = {}
    for c in cfgs:
        path = files.get((c.form, "fp16" if c.precision == "fp16" else "fp32"))
        if path is None:
            continue
        try:
            timed[c] = _Timed(path, c, provider, image)
        except Exception as exc:  # e.g. a kernel this GPU or build lacks: recorded, the others still measured
            results[c.name] = {"error": str(exc).splitlines()[0][:300]}
            log(f"  {c.name}: {results[c.name]['error']}")
    for _ in range(rounds):
        for t in timed.values():
            t.times += [t.run() for _ in range(runs)]
    ref_cfg = next((c for c in timed if (c.form, c.precision, c.kernel) == REFERENCE), next(iter(timed), None))
    ref = timed[ref_cfg].embedding() if ref_cfg is not None else None
    for c, t in timed.items():
        ms = 1000 * np.asarray(t.times)
        emb = t.embedding()
        results[c.name] = {"form": c.form, "precision": c.precision, "kernel": c.kernel, "file": files[
            (c.form, "fp16" if c.precision == "fp16" else "fp32")].name, "runs": int(ms.size),
            "p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "max_abs_vs_reference": float(np.abs(emb - ref).max()) if ref is not None else None,
            "mean_abs_vs_reference": float(np.abs(emb - ref).mean()) if ref is not None else None,
            "kernels_run": t.kernels}
        log(f"  {c.name:32s} p50 {results[c.name]['p50_ms']:8.3f} ms  max |diff| "
            f"{results[c.name]['max_abs_vs_reference']:.2e}  {describe_kernels(t.kernels)}")
    return results


# How far a configuration's embedding may be from the reference's and still be the same computation (TF32 rounding
# moves it by ~1e-3 on an H100, FP16 by ~1e-2; tests/test_gpu.py's bounds are on the masks).
SAME_COMPUTATION = {"tf32": 1e-2, "fp16": 0.1, "fp32": 1e-4}


def fastest(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per precision, the fastest configuration that computes what the reference computes."""
    best: dict[str, dict[str, Any]] = {}
    for r in results.values():
        if "error" in r or (r["max_abs_vs_reference"] or 0.0) > SAME_COMPUTATION.get(r["precision"], 0.1):
            continue
        if r["precision"] not in best or r["p50_ms"] < best[r["precision"]]["p50_ms"]:
            best[r["precision"]] = r
    return best


def advice(r: dict[str, Any]) -> str:
    """What gets a configuration in use: the attention kernel by environment, the form by export."""
    how = [] if r["kernel"] == "default" else [f"SAM2RT_CUDA_ATTENTION={r['kernel']}"]
    if r["form"] == "padfirst":
        how.append("an export made since the `device` encoder (`sam2rt export --target cuda` writes the padfirst form "
                   "as encoder.device.onnx)")
    elif r["form"] != "exported":
        how.append(f"an export of the {r['form']} encoder (not made by `sam2rt export`)")
    return " and ".join(how) or "what the runtime does already"


def describe_kernels(kernels: dict[str, int]) -> str:
    """"FLASH_ATTENTION x12, MATH x5"; "not reported" where ONNX Runtime printed no route (the CPU provider)."""
    return ", ".join(f"{k} x{n}" for k, n in kernels.items()) or "not reported"


def markdown(label: str, results: dict[str, dict[str, Any]], notes: list[str]) -> str:
    lines = [f"# Image encoder forms and attention kernels: {label}", "",
             "Each configuration ran as the runtime runs the encoder (its own session, CUDA graph, input and outputs "
             "on the device), taking turns with the others; p50 over all its runs. `max |diff|`: its image embedding "
             f"against {':'.join(REFERENCE)}.", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "| form | precision | attention kernel | kernels run (nodes) | p50 ms | p90 ms | max abs diff | "
              "mean abs diff |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    ok = {k: r for k, r in results.items() if "error" not in r}
    for r in sorted(ok.values(), key=lambda r: (r["precision"], r["p50_ms"])):
        lines.append(f"| {r['form']} | {r['precision']} | {r['kernel']} | {describe_kernels(r.get('kernels_run', {}))} | "
                     f"{r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['max_abs_vs_reference']:.2e} | "
                     f"{r['mean_abs_vs_reference']:.2e} |")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | | | | failed: {r['error']} | | | |")
    lines += ["", "Fastest per precision (among those within SAM_COMPUTATION of the reference):", ""]
    lines += [f"- {precision}: {r['form']} with {r['kernel']} attention, {r['p50_ms']:.3f} ms: {advice(r)}"
              for precision, r in sorted(fastest(results).items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sam2rt.bench.encoder_forms", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="where the unchunked graphs are written (default: OUT/work)")
    ap.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--no-unchunked", action="store_true", help="only the model directory's forms, none made here "
                    "(no torch / sam2 needed)")
    ap.add_argument("--only", default="", help="comma-separated configurations (prefixes of form:precision:kernel, e.g. "
                    "exported:fp16,unchunked:fp16:flash): each one holds its own session and CUDA graph, ~1-2 GB of GPU "
                    "memory, so a small GPU measures a few at a time")
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)
    manifest = Manifest.load(args.model_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.provider == "cuda":
        os.environ.setdefault(KERNEL_DEBUG_ENV, "1")  # read as each session is made: every route gets printed
    work = args.work or args.out / "work"
    files: dict[tuple[str, str], Path] = {}
    notes: list[str] = []
    encoder = slot_entries(manifest, DEVICE_SLOTS).get("encoder")
    if encoder is None:
        print(f"{args.model_dir} holds no encoder the device path runs: export it with --target cuda")
        return 1
    files[("exported", "fp32")] = manifest.verify_file(encoder)
    fp16 = fp16_encoder_entry(manifest)
    if fp16 is not None:
        files[("exported", "fp16")] = manifest.verify_file(fp16)
    wanted = [w for w in args.only.split(",") if w]
    for form in () if args.no_unchunked else FORMS_MADE_HERE:
        if wanted and not any(w.split(":")[0] == form for w in wanted):
            continue  # not asked for: not exported either
        t0 = time.perf_counter()
        try:
            path, diff = export_unchunked(manifest, work, form)
            files[(form, "fp32")] = path
            if args.provider == "cuda":
                files[(form, "fp16")] = fp16_copy(path, path.with_name(f"encoder.{form}.fp16.onnx"))
            notes.append(f"{form}: exported and converted here in {time.perf_counter() - t0:.0f} s; largest "
                         f"difference to PyTorch {diff:.2e}")
        except Exception as exc:  # no torch / sam2 here: the exported forms are still compared
            notes.append(f"{form}: not made ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        print(notes[-1], flush=True)
    forms = sorted({form for form, _ in files}, key=lambda f: (f != "exported", f))
    cfgs = [c for c in configs(args.provider, forms) if not wanted or any(c.name.startswith(w) for w in wanted)]
    print(f"measuring {len(cfgs)} configurations: {args.rounds} rounds x {args.runs} runs each", flush=True)
    results = measure(files, cfgs, args.provider, args.rounds, args.runs, log=lambda s: print(s, flush=True))
    label = args.label or args.provider
    best = fastest(results)
    for precision, r in sorted(best.items()):
        print(f"fastest {precision}: {r['form']}:{r['kernel']} {r['p50_ms']:.3f} ms -> {advice(r)}", flush=True)
    doc = {"label": label, "model": manifest.model_name, "rounds": args.rounds, "runs_per_round": args.runs,
           "notes": notes, "configurations": results,
           "fastest": {p: f"{r['form']}:{p}:{r['kernel']}" for p, r in best.items()}}
    (args.out / "encoder_forms.json").write_text(json.dumps(doc, indent=1))
    (args.out / "encoder_forms.md").write_text(markdown(label, results, notes))
    print(f"wrote {args.out / 'encoder_forms.md'}")
    return 0 if any("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
