"""The benchmark's Markdown table and PNG plots (latency distributions; per-prompt decode cost vs batch size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CASE_ORDER = [
    "embed", "preprocess", "predict_point_cached", "decode_box", "decode_box_points", "predict_point_cached_1080p",
    "batch4", "batch16", "batch64", "batch4_vs_singles", "batch16_vs_singles", "e2e_640x480", "e2e_1920x1080",
    "decoder_only_point", "postprocess_640x480",
]


def _ordered(cases: dict[str, Any]) -> list[str]:
    return [c for c in CASE_ORDER if c in cases] + [c for c in cases if c not in CASE_ORDER]


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def results_table(result: dict[str, Any]) -> str:
    """The main latency table (ms; p50 / p90 / p99; speedup = reference p50 / sam2rt p50)."""
    lines = [
        "| case | sam2rt p50 | p90 | p99 | reference p50 | p90 | p99 | speedup (p50) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in _ordered(result["cases"]):
        c = result["cases"][name]
        o, r = c["sam2rt"], c.get("reference", {})
        per = " (per prompt)" if c.get("per") else ""
        sp = c.get("speedup_p50")
        lines.append(
            f"| {name}{per} | {_fmt(o.get('p50'))} | {_fmt(o.get('p90'))} | {_fmt(o.get('p99'))} | "
            f"{_fmt(r.get('p50'))} | {_fmt(r.get('p90'))} | {_fmt(r.get('p99'))} | "
            f"{'–' if sp is None else f'**{sp:.2f}x**'} |"
        )
    return "\n".join(lines)


def targets_table(result: dict[str, Any]) -> str:
    lines = ["| target | threshold | measured | met |", "| --- | --- | --- | --- |"]
    for t in result.get("targets", {}).values():
        m = t["measured"]
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else f"**NO** ({t.get('shortfall', '')})")
        lines.append(f"| {t['description']} | {t['threshold']} | {_fmt(m, 2)} | {met} |")
    return "\n".join(lines)


def markdown_report(result: dict[str, Any]) -> str:
    m = result["machine"]
    cpu = m["cpu"]
    v = result["versions"]
    isa = ", ".join(k for k, on in cpu["isa"].items() if on) or "none listed"
    out = [
        f"# sam2rt benchmark: {result['model']['model_id']} on {result['config']['backend']}",
        "",
        f"- when: {result['created']}; machine: {m['label']}: {cpu['model']}, {cpu['usable_cpus']} usable CPUs "
        f"({cpu['logical_cpus']} logical), {m.get('memory_gib')} GiB; ISA: {isa}",
        f"- load average at start / end: {m.get('load_average_at_start')} / {m.get('load_average_at_end')}",
        f"- threads: sam2rt {result['threads']['sam2rt_intra_op']}, torch {result['threads']['torch']}; "
        f"runs {result['config']['runs']} after {result['config']['warmup']} warm-up, interleaved with the reference"
        + (" (QUICK mode)" if result["config"].get("quick") else ""),
        "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "sam2rt", "numpy", "onnxruntime", "torch", "sam2") if k in v),
        f"- weights: {result['model']['weights']}",
        f"- sam2rt graphs: {result.get('sam2rt_backend', {}).get('graph_files')}",
        "",
        "Latency in ms per call (per prompt for batches). The reference is `SAM2ImagePredictor` (PyTorch eager, "
        "same thread count) on the same inputs in the same process run.",
        "",
        results_table(result),
        "",
    ]
    if result.get("targets"):
        out += ["## Targets", "", targets_table(result), ""]
    cs = result.get("cold_start")
    if cs:
        out += ["## Cold start and peak memory (fresh processes)", "",
                "| | process wall s (p50) | import s | load s | first result s | peak RSS MiB | torch imported |",
                "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for who in ("sam2rt", "sam2rt_low_memory_opt_in", "reference"):
            if who in cs:
                c = cs[who]
                out.append(f"| {who} | {c['process_wall_s']['p50']:.2f} | {c['import_s']['p50']:.2f} | {c['load_s']['p50']:.2f} | "
                           f"{c['first_result_s']['p50']:.2f} | {c['peak_rss_mib']['p50']:.0f} | {c['torch_imported']} |")
        if "peak_rss" in result and "fraction_of_reference" in result["peak_rss"]:
            out.append("")
            out.append(f"Peak RSS: sam2rt is {result['peak_rss']['fraction_of_reference']:.2f} of the reference's.")
            if "low_memory_opt_in_fraction_of_reference" in result["peak_rss"]:
                out.append(f"With the opt-in low-memory mode (SAM2RT_LOW_MEMORY=1: encoder without ORT's arena, "
                           f"large blocks returned to the OS; slower set_image) it is "
                           f"{result['peak_rss']['low_memory_opt_in_fraction_of_reference']:.2f}.")
        out.append("")
    q = result.get("int8")
    if q:
        a = q["agreement"]
        out += ["## Opt-in INT8 encoder (reduced precision, never the default)", "",
                f"- {q['what']}",
                f"- embed p50: INT8 {q['embed_int8']['p50']:.0f} ms vs FP32 {q['embed_fp32']['p50']:.0f} ms "
                f"(**{q['speedup_vs_fp32_p50']:.2f}x**)",
                f"- mask IoU vs FP32 over {a['masks_compared']} masks ({', '.join(a['images'])}): mean "
                f"{a['mask_iou_vs_fp32_mean']:.4f}, 5th percentile {a['mask_iou_vs_fp32_p05']:.4f}, min {a['mask_iou_vs_fp32_min']:.4f}; "
                f"low-res logits differ by up to {a['low_res_logits_max_abs_diff']:.3g}, scores by {a['scores_max_abs_diff']:.3g}",
                f"- {a['parity_with_reference']}", ""]
    fl = result.get("flops")
    if fl and "encoder" in fl:
        peak = m["peak"]
        out += ["## Where the time goes", "",
                f"Peak: {peak['peak_gflops']:.1f} GFLOP/s ({peak['method']}, {peak['blas']}).", "",
                "| graph | GFLOP | p50 ms | achieved GFLOP/s | fraction of peak | top ops by kernel time |",
                "| --- | ---: | ---: | ---: | ---: | --- |"]
        for role in ("encoder", "decoder"):
            g = fl[role]
            top = ", ".join(f"{op} {v['time_ms']:.0f} ms" for op, v in list(g["by_op"].items())[:4])
            p50 = result["cases"][g["timed_case"]]["sam2rt"]["p50"]
            out.append(f"| {role} ({g['graph']}) | {g['gflops']:.2f} | {p50:.1f} | {g['achieved_gflops_per_s_end_to_end']:.1f} | "
                       f"{100 * g['fraction_of_peak']:.1f}% | {top} |")
        prep = fl.get("decoder_prep")
        if prep:
            out.append(f"| decoder_prep, once per image at embed ({prep['graph']}) | {prep['gflops']:.2f} | "
                       f"{1e3 * prep['kernel_time_s']:.1f} (kernels) | – | – | – |")
        out.append("")
    sz = result.get("sizes")
    if sz:
        out += ["## Sizes", "", "| file | MiB |", "| --- | ---: |"]
        out += [f"| {k} | {v:.1f} |" for k, v in sz["files_mib"].items()]
        if "reference_checkpoint_mib" in sz:
            out.append(f"| reference checkpoint (.pt) | {sz['reference_checkpoint_mib']:.1f} |")
        out.append("")
    par = result.get("parity_spot_check")
    if par:
        out += ["## Parity spot check (the timed calls' outputs)", "",
                "| case | low-res logits max abs diff | scores max abs diff | mask IoU |", "| --- | ---: | ---: | ---: |"]
        out += [f"| {k} | {v['low_res_logits_max_abs_diff']:.2e} | {v['scores_max_abs_diff']:.2e} | {v['mask_iou']:.4f} |"
                for k, v in par.items()]
        out.append("")
    if result.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    files = result.get("files", {})
    for key in ("latency_png", "batch_png"):
        if key in files:
            out.append(f"![{key}]({files[key]})")
    out.append("")
    return "\n".join(out)


def plot_latency(result: dict[str, Any], path: Path) -> Path:
    """Box plots of every case's latency samples, sam2rt next to the reference (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in _ordered(result["cases"]) if not n.startswith(("decoder_only", "postprocess"))]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)), 5))
    pos, data, colors, ticks = [], [], [], []
    for i, n in enumerate(names):
        c = result["cases"][n]
        data.append(c["sam2rt"]["samples_ms"])
        pos.append(3 * i)
        colors.append("tab:blue")
        if "reference" in c:
            data.append(c["reference"]["samples_ms"])
            pos.append(3 * i + 1)
            colors.append("tab:orange")
        ticks.append(3 * i + 0.5)
    bp = ax.boxplot(data, positions=pos, widths=0.8, patch_artist=True, showfliers=True)
    for patch, col in zip(bp["boxes"], colors):
        patch.set_facecolor(col)
    ax.set_xticks(ticks)
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (per prompt for batches)")
    m = result["machine"]["cpu"]
    ax.set_title(f"{result['model']['model_id']} latency: sam2rt (blue) vs PyTorch reference (orange)\n"
                 f"{m['model']}, {m['usable_cpus']} CPUs, {result['created'][:10]}"
                 + (" (random weights)" if result["model"]["random_weights"] else ""), fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_batch(result: dict[str, Any], path: Path) -> Path:
    """Per-prompt decode cost (p50) against batch size, sam2rt and the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    sizes = [1] + sorted(int(n[5:]) for n in cases if n.startswith("batch") and n[5:].isdigit())
    ours, ref = [], []
    for b in sizes:
        c = cases["decode_box"] if b == 1 else cases[f"batch{b}"]
        ours.append(c["sam2rt"]["p50"])
        ref.append(c.get("reference", {}).get("p50"))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(sizes, ours, "o-", label="sam2rt (one batched call)")
    if all(r is not None for r in ref):
        ax.plot(sizes, ref, "s-", label="reference (one batched call)")
    singles = [(b, cases[f"batch{b}_vs_singles"]["reference"]["p50"]) for b in sizes
               if f"batch{b}_vs_singles" in cases and "reference" in cases[f"batch{b}_vs_singles"]]
    if singles:
        ax.plot([s[0] for s in singles], [s[1] for s in singles], "^--", label="reference (B single calls)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("boxes per call")
    ax.set_ylabel("ms per prompt (p50, masks at 640x480)")
    ax.set_title(f"Per-prompt decode cost vs batch size ({result['model']['model_id']})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
