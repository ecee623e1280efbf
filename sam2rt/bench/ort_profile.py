"""Where a GPU run's time goes, per graph and per operator: ONNX Runtime's own profiler over the graphs the
device path loads (the encoder in each precision, the decoders of one click and 16 boxes, the video graphs).

    python -m sam2rt.bench.ort_profile MODEL_DIR --out DIR [--provider cuda|cpu] [--runs 20]

Each graph runs in its own session with the provider options the runtime gives it (TF32 on or off as the
precision says), inputs bound on the device, a few warm-up runs, then `--runs` profiled runs. ONNX Runtime's
trace (a JSON of kernel events) is summed per operator type and per node and written as `ort_profile.md` and
`ort_profile.json` in DIR; the traces themselves are deleted.

On CUDA the profiler times each node's host-side call, and kernels launch asynchronously: run it with
CUDA_LAUNCH_BLOCKING=1 (scripts/gpu_check.sh does, PROFILE=1) so that a node's time is its kernels' GPU time
(plus one synchronisation each, which also inflates the wall time: gpu_bench.py measures latency, this says
which operators dominate it).

On the CPU provider (`--provider cpu`) the same code runs; tests check the report that way.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..graph_table import DEVICE_SLOTS, VIDEO_DEVICE_SLOTS, VIDEO_FP16_SLOTS
from ..manifest import Manifest
from ..runtime.backends.onnxruntime_backend import (
    _import_ort, cuda_provider_options, session_options, slot_entries,
)
from ..runtime.embedding import fast_prompts_per_run
from ..runtime.backends.ort_device_backend import fp16_encoder_entry

TOP_NODES = 12
DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8}


def graph_cases(manifest: Manifest) -> list[tuple[str, dict[str, Any], str, dict[str, int]]]:
    """(case name, manifest entry, precision, symbolic dimensions) for each graph profiled."""
    device = slot_entries(manifest, DEVICE_SLOTS)
    cases: list[tuple[str, dict[str, Any], str, dict[str, int]]] = []
    fp16 = fp16_encoder_entry(manifest)
    for precision in ("tf32", "fp16"):
        entry = fp16 if precision == "fp16" else device.get("encoder")
        if entry is not None:
            cases.append((f"encoder:{precision}", entry, precision, {}))
    if "decoder_fast" in device:
        cases.append(("decoder_fast:1 click", device["decoder_fast"], "tf32", {"num_prompts": 1, "num_points": 2}))
        if fast_prompts_per_run(device["decoder_fast"]) is None:  # the GPU form serves 16 boxes in one run
            cases.append(("decoder_fast:16 boxes", device["decoder_fast"], "tf32", {"num_prompts": 16, "num_points": 3}))
    if "decoder_nomask" in device:  # what served 16 boxes before (and with exports of a one-prompt fast decoder)
        cases.append(("decoder_nomask:16 boxes", device["decoder_nomask"], "tf32", {"num_prompts": 16, "num_points": 3}))
    if "video" in manifest.data:
        # a full memory bank (the compact memory attention's counts are dynamic: the steady state is every slot)
        layout = manifest.graph("memory_attention").get("slots", {})
        bank = {"num_points": 1, "slots": int(layout.get("cond", 1)) + int(layout.get("recent", 6)),
                "pointers": int(layout.get("pointers", 16))}
        for precision, slots in (("fp32", VIDEO_DEVICE_SLOTS), ("fp16", VIDEO_FP16_SLOTS)):
            entries = slot_entries(manifest, slots)
            # the tracked frames' decoder: the tracking form where the export made it (tracking_decoder)
            for role in ("memory_attention", "track_decoder", "tracking_decoder", "memory_encoder"):
                if role in entries and (precision == "fp32" or "fp16" in entries[role]["file"]):
                    cases.append((f"{role}:{precision}", entries[role], precision, bank))
    return cases


def _inputs(session: Any, dims: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else dims.get(str(d), 1) for d in i.shape]
        dtype = DTYPES.get(i.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(shape).astype(dtype)
            if "valid" in i.name or i.name.startswith("has_") or i.name == "binarize":
                value = np.ones(shape, dtype)
        elif dtype == np.bool_:
            value = np.ones(shape, bool)
        else:
            value = np.zeros(shape, dtype)
        feeds[i.name] = value
    if "point_coords" in feeds:
        feeds["point_coords"] = np.abs(feeds["point_coords"]) * 100
        feeds["point_labels"] = np.ones_like(feeds["point_labels"])
    return feeds


def measured_kernel_events(events: list[dict[str, Any]], runs: int) -> tuple[list[dict[str, Any]], int]:
    """The node kernel events of the last `runs` runs of a trace, and how many runs those are.

    The profiled session's warm-up runs are in its trace too, and they hold the CUDA provider's convolution algorithm
    searches: counted in, they made FP16 depthwise convolutions look like 8 ms a run (GPU run 6). Runs are the trace's
    `model_run` events; a kernel belongs to the run it starts in."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    measured = starts[-runs:] if runs > 0 else []
    first = measured[0] if measured else float("inf")
    kernels = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
               and e.get("ts", 0) >= first]
    return kernels, max(len(measured), 1)


def profile_graph(path: Path, provider: str, precision: str, dims: dict[str, int], runs: int, warmup: int = 3,
                  work: Path | None = None) -> dict[str, Any]:
    """Profile one graph: mean ms per run by operator type and by node, and the wall time per run."""
    ort = _import_ort()
    so = session_options(mem_pattern=True)
    for name, value in dims.items():
        so.add_free_dimension_override_by_name(name, int(value))
    providers: list[Any] = ["CPUExecutionProvider"]
    device = "cpu"
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", cuda_provider_options(tf32=precision != "fp32")), "CPUExecutionProvider"]
        device = "cuda"
    feeds: dict[str, Any] = {}

    def warm_session() -> tuple[Any, Any]:
        session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        if not feeds:
            feeds.update({k: ort.OrtValue.ortvalue_from_numpy(v, device, 0) for k, v in _inputs(session, dims).items()})
        io = session.io_binding()
        for k, v in feeds.items():
            io.bind_ortvalue_input(k, v)
        for o in session.get_outputs():
            io.bind_output(o.name, device, 0)
        for _ in range(warmup):
            session.run_with_iobinding(io)
        return session, io

    warm_session()  # the first runs (allocations, algorithm searches) ...
    # ... stay out of the trace: the profiled session is a second one
    so.enable_profiling = True
    so.profile_file_prefix = str((work or Path.cwd()) / f"ort_profile_{os.getpid()}_{path.stem}")
    session, io = warm_session()
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run_with_iobinding(io)
        io.synchronize_outputs()
        walls.append(time.perf_counter() - t0)
    trace_path = Path(session.end_profiling())
    events = json.loads(trace_path.read_text())
    trace_path.unlink(missing_ok=True)
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    op_of: dict[str, str] = {}
    kernels_of_runs, traced = measured_kernel_events(events, runs)
    for e in kernels_of_runs:
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"] / 1000.0 / traced
        by_node[node] += e["dur"] / 1000.0 / traced
        op_of[node] = op
    kernels = sum(by_op.values())
    return {
        "file": path.name, "provider": provider, "precision": precision, "dims": dims,
        "wall_ms_p50": 1000 * float(np.median(walls)), "kernel_ms": kernels,
        "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "top_nodes": [(n, op_of[n], ms) for n, ms in sorted(by_node.items(), key=lambda kv: -kv[1])[:TOP_NODES]],
    }


def markdown(label: str, results: dict[str, dict[str, Any]]) -> str:
    lines = [f"# ONNX Runtime profile: {label}", "",
             "Mean milliseconds per run from ONNX Runtime's profiler (kernel events), per graph: the operator types "
             "that take the time, then the heaviest nodes.", "",
             "| graph | file | wall p50 ms | kernels ms | top operator types (ms) |", "| --- | --- | ---: | ---: | --- |"]
    for case, r in results.items():
        ops = ", ".join(f"{op} {ms:.3f}" for op, ms in list(r["by_op"].items())[:6])
        lines.append(f"| {case} | {r['file']} | {r['wall_ms_p50']:.3f} | {r['kernel_ms']:.3f} | {ops} |")
    for case, r in results.items():
        lines += ["", f"## {case}: heaviest nodes", "", "| node | op | ms |", "| --- | --- | ---: |"]
        lines += [f"| {n} | {op} | {ms:.3f} |" for n, op, ms in r["top_nodes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sam2rt.bench.ort_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated case names (prefixes) to profile, e.g. encoder,memory_attention")
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)
    manifest = Manifest.load(args.model_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = [w for w in args.only.split(",") if w]
    results: dict[str, dict[str, Any]] = {}
    for case, entry, precision, dims in graph_cases(manifest):
        if wanted and not any(case.startswith(w) for w in wanted):
            continue
        print(f"profiling {case} ({entry['file']})", flush=True)
        try:
            results[case] = profile_graph(manifest.verify_file(entry), args.provider, precision, dims, args.runs,
                                          work=args.out)
        except Exception as exc:  # one graph's failure must not lose the others' figures
            print(f"  {case} failed: {str(exc).splitlines()[0][:300]}", flush=True)
            continue
        r = results[case]
        print(f"  wall p50 {r['wall_ms_p50']:.3f} ms, kernels {r['kernel_ms']:.3f} ms; "
              + ", ".join(f"{op} {ms:.3f}" for op, ms in list(r["by_op"].items())[:5]), flush=True)
    label = args.label or args.provider
    (args.out / "ort_profile.json").write_text(json.dumps({"label": label, "graphs": results}, indent=1))
    (args.out / "ort_profile.md").write_text(markdown(label, results))
    print(f"wrote {args.out / 'ort_profile.md'}")
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
