"""Lean model directories: `sam2rt export --target` keeps the graphs its targets run, and says so in the manifest.

Which rows a target keeps is graph_table's (`rows_for_targets`: the rows its backends run, and for each of their
slots the first preference the export made); what they are made from is made too (`rows_to_make`: the CPU's
encoder.opt.onnx is made from encoder.fused.onnx) and then removed unless a target runs it, so a CPU export
holds one encoder, not three. Every graph made keeps its manifest entry (with its sha256, so the optimised
copies still show what they were made from); the ones removed say `"stored": false`. Needs no torch:
`keep_only(DIR, ["tensorrt"])` also slims an existing directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from ..errors import ExportError
from ..graph_table import GRAPHS, TARGETS, GraphFile, rows_for_targets, source_of, targets_writing
from ..manifest import Manifest

# What each maker needs from `sam2rt export`'s options (torch.onnx rows are made whenever a target needs them).
MAKER_OPTION = {"onnxruntime": "optimize", "fp16": "fp16", "int8": "int8"}


def default_targets() -> tuple[str, ...]:
    """The targets the runtime installed here can use: `cuda` where onnxruntime offers its CUDA provider (the CPU
    backend runs a cuda export too), else `cpu`; and `tensorrt` besides where TensorRT's Python package imports."""
    targets = ["cpu"]
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            targets = ["cuda"]
    except ImportError:  # pragma: no cover - the exporter itself needs onnxruntime
        pass
    try:
        import tensorrt  # noqa: F401

        targets.append("tensorrt")
    except (ImportError, OSError):
        pass
    return tuple(targets)


def made_by(optimize: bool = True, fp16: bool = True, int8: bool = False) -> Callable[[GraphFile], bool]:
    """Which rows an export with these options makes (when a target needs them)."""
    options = {"optimize": optimize, "fp16": fp16, "int8": int8}
    return lambda g: g.maker not in MAKER_OPTION or options[MAKER_OPTION[g.maker]]


def how_to_write(g: GraphFile) -> str:
    """The export option that writes row `g`, for the manifest's record of what a lean export left out."""
    option = {"int8": " --int8", "fp16": " (without --no-fp16)", "onnxruntime": " (without --no-optimize)"}.get(g.maker, "")
    targets = targets_writing(g)
    if not targets and any(source_of(r) == g and r.maker == "onnxruntime" for r in GRAPHS):
        # made only as the source of another row: kept where that row is not made
        return "kept by an export whose optimised copy of it is not made (--no-optimize)"
    if not targets:  # a form an older export wrote, which a newer row replaced (e.g. encoder.fused.fp16.onnx)
        return "written by exports made before its replacement; no target writes it now"
    return f"--target {' or '.join(targets)}{option}"


def keep_only(model_dir: str | Path | Manifest, targets: Iterable[str]) -> Manifest:
    """Remove every graph file of the table that `targets` do not run from a model directory, mark the manifest
    entries of the removed ones `"stored": false`, and record the targets, the files written and those left out
    under the manifest's `export`. It only narrows: a directory cannot gain graphs it does not hold."""
    manifest = model_dir if isinstance(model_dir, Manifest) else Manifest.load(model_dir)
    targets = tuple(t for t in TARGETS if t in set(targets))
    have = manifest.targets
    if have is not None and not set(targets) <= set(have):
        raise ExportError(f"{manifest.directory} holds the graphs of --target {','.join(have)}; it cannot be narrowed "
                          f"to --target {','.join(targets)}: export it with `{manifest.export_command(targets)}`")

    def stored(g: GraphFile) -> bool:
        entry = manifest.entry(g.role, g.variant)
        return entry is not None and manifest.is_stored(entry)

    keep = set(rows_for_targets(targets, stored))
    left_out = {}
    for g in GRAPHS:
        if g in keep:
            continue
        (manifest.directory / g.file).unlink(missing_ok=True)  # also a stale copy of an earlier export here
        entry = manifest.entry(g.role, g.variant)
        if entry is not None:
            entry["stored"] = False
        left_out[g.file] = f"refused at export: {entry['refused']}" if entry and entry.get("refused") else how_to_write(g)
    manifest.data["export"] = {
        "targets": list(targets),
        "written": [g.file for g in GRAPHS if g in keep],
        "left_out": left_out,
        "use": "graphs whose manifest entry says stored: false were made (and verified) for the ones written, then "
               "removed; `sam2rt export --target` with another target writes the others",
    }
    manifest.save()
    return manifest
