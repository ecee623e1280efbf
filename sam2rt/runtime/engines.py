"""TensorRT engine entries of manifest.json, and the checks that refuse a foreign, stale or altered engine.

An engine (a TensorRT "plan") only runs on the TensorRT version that built it and is tuned for the GPU
it was built on, so `sam2rt build-engine` records both and the runtime compares them with what is
present before it deserialises anything. This module imports neither tensorrt nor CUDA: the checks
run, and are tested, on machines without a GPU.

Manifest layout (`"engines"`, keyed by precision, several may coexist):

    "engines": {
      "fp16": {
        "precision": "fp16", "tensorrt": "10.3.0", "built": "...",
        "gpu": {"name": "Orin (nvgpu)", "compute_capability": "8.7"},
        "encoder": {"file": "encoder.fp16.engine", "sha256": "...", "onnx_sha256": "...", "precision": "fp16",
                    "fp32_nodes": [...], "profiles": [...]},
        "decoder": {... "profiles": [{"name": "single", "shapes": {"point_coords": {"min": [1,1,2], "opt": ..., "max": ...}}}]}
      }
    }
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, EngineMismatchError, ManifestError, ModelFileError
from ..graph_table import Profile, ShapeTuple
from ..manifest import MANIFEST_NAME, Manifest, sha256_file

PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_ROLES = ("encoder", "decoder")
# When no precision is asked for, the fastest engine present is used.
PREFERENCE = ("int8", "fp16", "fp32")


def engine_filename(role: str, precision: str) -> str:
    return f"{role}.{precision}.engine"


@dataclass(frozen=True)
class EngineEnvironment:
    """What an engine must match: the TensorRT version and the GPU (name and compute capability)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    @classmethod
    def detect(cls, device: int = 0) -> "EngineEnvironment":
        """The environment of this process (imports tensorrt and cuda-python; BackendUnavailableError without them)."""
        from .gpu import gpu_info

        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendUnavailableError(tensorrt_missing_message()) from exc
        info = gpu_info(device)
        return cls(str(trt.__version__), info.name, info.compute_capability)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.gpu_name, "compute_capability": self.compute_capability}


def tensorrt_missing_message() -> str:
    return (
        "TensorRT's Python package is not installed: on x86-64 `pip install 'sam2rt[trt]'` (tensorrt + cuda-python); "
        "on Jetson use JetPack's own TensorRT (`sudo apt install python3-libnvinfer`, or the TensorRT in your "
        "JetPack container) and `pip install cuda-python`"
    )


def engine_entries(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """The manifest's engine builds by precision ({} when none was built)."""
    engines = manifest.data.get("engines") or {}
    if not isinstance(engines, dict):
        raise ManifestError(f"{manifest.directory / MANIFEST_NAME}: 'engines' must be an object; re-run `sam2rt build-engine`")
    return {k: v for k, v in engines.items() if isinstance(v, dict) and k in PRECISIONS}


def select_precision(manifest: Manifest, precision: str | None = None) -> str:
    """The precision to load: the one asked for, else the fastest built (int8 > fp16 > fp32)."""
    entries = engine_entries(manifest)
    hint = f"build them with `sam2rt build-engine --model-dir {manifest.directory} --fp16` on this machine"
    if precision is not None:
        if precision not in PRECISIONS:
            raise BackendUnavailableError(f"unknown engine precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision not in entries:
            built = ", ".join(entries) or "none"
            raise BackendUnavailableError(
                f"no {precision} TensorRT engines in {manifest.directory} (built: {built}); {hint}"
                if precision != "fp32"
                else f"no fp32 TensorRT engines in {manifest.directory} (built: {built}); build them with "
                f"`sam2rt build-engine --model-dir {manifest.directory}`"
            )
        return precision
    for p in PREFERENCE:
        if p in entries:
            return p
    raise BackendUnavailableError(f"no TensorRT engines in {manifest.directory}; {hint}")


def mismatch_reasons(entry: dict[str, Any], env: EngineEnvironment) -> list[str]:
    """Why an engine entry cannot run in `env` (empty when it can)."""
    reasons = []
    built_trt = str(entry.get("tensorrt"))
    if built_trt != env.tensorrt_version:
        reasons.append(f"it was built with TensorRT {built_trt}, this machine has TensorRT {env.tensorrt_version}")
    gpu = entry.get("gpu") or {}
    built_cc, built_name = str(gpu.get("compute_capability")), str(gpu.get("name"))
    if built_cc != env.compute_capability:
        reasons.append(
            f"it was built for {built_name} (compute capability {built_cc}), this GPU is {env.gpu_name} "
            f"(compute capability {env.compute_capability})"
        )
    elif built_name != env.gpu_name:
        reasons.append(f"it was built and tuned on {built_name}, this GPU is {env.gpu_name}")
    return reasons


def check_engines(
    manifest: Manifest, precision: str, env: EngineEnvironment, verify_sha: bool = True
) -> dict[str, Path]:
    """Check the `precision` engines against `env` and the files on disk; return their paths by role.

    Raises EngineMismatchError for an engine built for another TensorRT version or GPU, or from
    another export of the ONNX graphs; ModelFileError / ManifestError for a missing or altered file.
    """
    entries = engine_entries(manifest)
    if precision not in entries:
        select_precision(manifest, precision)  # raises with the right message
    entry = entries[precision]
    rebuild = f"rebuild them here with `sam2rt build-engine --model-dir {manifest.directory}" + (
        "`" if precision == "fp32" else f" --{precision}`"
    )
    reasons = mismatch_reasons(entry, env)
    if reasons:
        raise EngineMismatchError(
            f"refusing the {precision} TensorRT engines in {manifest.directory}: " + "; ".join(reasons)
            + f". TensorRT engines only run on the TensorRT version and GPU they were built for: {rebuild}"
        )
    paths = {}
    for role in ENGINE_ROLES:
        info = entry.get(role)
        if not isinstance(info, dict) or "file" not in info:
            raise ManifestError(f"{manifest.directory / MANIFEST_NAME}: the {precision} engine entry has no {role}; {rebuild}")
        path = manifest.directory / info["file"]
        if not path.is_file():
            raise ModelFileError(f"{path} is missing; {rebuild}")
        if verify_sha:
            actual = sha256_file(path)
            if actual != info.get("sha256"):
                raise ManifestError(
                    f"{path} does not match {MANIFEST_NAME} (sha256 {actual[:12]}... != {str(info.get('sha256'))[:12]}...): "
                    f"the engine file was changed or replaced; {rebuild}"
                )
        graph_sha = manifest.graph(role).get("sha256")
        if info.get("onnx_sha256") != graph_sha:
            raise EngineMismatchError(
                f"{path} was built from another export of {manifest.graph(role)['file']} "
                f"(ONNX sha256 {str(info.get('onnx_sha256'))[:12]}... != {str(graph_sha)[:12]}...); {rebuild}"
            )
        paths[role] = path
    return paths


def profile_for(profiles: list[Profile] | list[dict[str, Any]], batch: int, points: int) -> int | None:
    """Index of the decoder profile that admits (batch, points), preferring the one whose opt batch is nearest."""
    best, best_key = None, None
    for i, prof in enumerate(map(Profile.from_dict, profiles)):
        coords = prof.shapes["point_coords"]
        if coords.admits((batch, points, 2)):
            key = (abs(coords.opt[0] - batch), i)
            if best_key is None or key < best_key:
                best, best_key = i, key
    return best


def max_decoder_shape(profiles: list[Profile] | list[dict[str, Any]]) -> tuple[int, int]:
    """The largest prompt batch and point count any decoder profile admits."""
    coords = [Profile.from_dict(p).shapes["point_coords"] for p in profiles]
    return int(max(c.max[0] for c in coords)), int(max(c.max[1] for c in coords))


def min_decoder_points(profiles: list[Profile] | list[dict[str, Any]]) -> int:
    """The fewest points per prompt every decoder profile admits."""
    return int(min(Profile.from_dict(p).shapes["point_coords"].min[1] for p in profiles))


DECODER_PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input")


def _prompt_shapes(b: int, n: int, low_res: int) -> dict[str, list[int]]:
    return {
        "point_coords": [b, n, 2],
        "point_labels": [b, n],
        "mask_input": [b, 1, low_res, low_res],
        "has_mask_input": [b],
    }


def decoder_profiles(max_prompts: int = 32, max_points: int = 16, low_res: int = 256) -> list[Profile]:
    """Optimisation profiles for the decoder's dynamic prompt-batch (B) and points (N) dimensions.

    "single" (B 1..4, tuned for one click: B=1, N=2, the click plus SAM's padding point) and, when
    max_prompts > 4, "batch" (B 1..max_prompts, tuned for 16 boxes: N=3, two corners plus padding).
    N runs 1..max_points in both. The manifest stores them with Profile.to_dict().
    """
    if max_prompts < 1:
        raise ValueError(f"--max-prompts must be at least 1, got {max_prompts}")
    if max_points < 2:
        raise ValueError(f"--max-points must be at least 2 (a click plus its padding point, or a box), got {max_points}")

    def profile(name: str, bmax: int, bopt: int, nopt: int) -> Profile:
        nopt = min(nopt, max_points)
        lo, opt, hi = _prompt_shapes(1, 1, low_res), _prompt_shapes(bopt, nopt, low_res), _prompt_shapes(bmax, max_points, low_res)
        return Profile(name, {k: ShapeTuple(tuple(lo[k]), tuple(opt[k]), tuple(hi[k])) for k in DECODER_PROMPT_INPUTS})

    profiles = [profile("single", min(4, max_prompts), 1, 2)]
    if max_prompts > 4:
        profiles.append(profile("batch", max_prompts, min(16, max_prompts), 3))
    return profiles


def prompt_shapes(b: int, n: int, low_res: int = 256) -> dict[str, tuple[int, ...]]:
    """The decoder's prompt-input shapes for B prompts of N points."""
    return {k: tuple(v) for k, v in _prompt_shapes(b, n, low_res).items()}
