"""ONNX Runtime sessions for the video graphs: the one place they are created and run.

The image encoder itself runs on the model's backend (`Sam2Model.backend.encode`), not here. The video
graphs run through IO binding (`BoundSession`, backends/bound_session.py): the features the backend left on
its GPU are bound where they are, and outputs asked for on the device (the memory-conditioned features) stay
there for the next graph, so a tracked frame's ~16 MB of features and ~8 MB of memory-conditioned features
never cross PCIe. On the CPU provider the same code runs with host buffers; CI tests the data flow that way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import BackendUnavailableError

# ONNX Runtime providers for the video graphs, by the image backend's name (TensorRT engines exist for the
# image graphs only: with the tensorrt backend the video graphs run on ONNX Runtime's CUDA provider).
CPU_PROVIDERS = ["CPUExecutionProvider"]
VIDEO_PROVIDERS = {
    "onnxruntime-cpu": CPU_PROVIDERS,
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def create_session(
    path: str | Path, backend: str = "onnxruntime-cpu", threads: int | None = None, tf32: bool = True,
    graph: bool = False, dims: dict[str, int] | None = None, cpu_disabled_optimizers: tuple[str, ...] | list[str] = (),
    attention: str | None = None,
) -> Any:
    """An onnxruntime.InferenceSession for one video graph, on the providers that fit `backend` (`tf32`: whether
    the CUDA provider may use TF32 tensor cores for FP32 products; `graph`: CUDA-graph capture, which ONNX Runtime
    refuses, with an error here, for a graph with a node on the CPU; `dims`: symbolic dimensions fixed, so that
    ONNX Runtime folds the shape arithmetic into constants, as capture needs; `cpu_disabled_optimizers`: ONNX Runtime
    fusions left out on the CPU provider, as a graph's manifest entry records them in `ort_disabled_optimizers`;
    `attention`: the CUDA provider's MultiHeadAttention kernel, a key of SDPA_KERNELS, None for the default)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailableError("onnxruntime is needed for video tracking: `pip install 'sam2rt[cpu]'`") from exc
    from ..backends.onnxruntime_backend import cuda_provider_options, session_options

    wanted = VIDEO_PROVIDERS.get(backend.split(":")[0], ["CPUExecutionProvider"])
    available = set(ort.get_available_providers())
    providers: list[Any] = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    cuda = cuda_provider_options(tf32=tf32, graph=graph, attention=attention)
    providers = [(p, cuda) if p == "CUDAExecutionProvider" else p for p in providers]
    so = session_options(threads, mem_pattern=False)
    for name, value in (dims or {}).items():
        so.add_free_dimension_override_by_name(name, int(value))
    disabled = list(cpu_disabled_optimizers) if providers == ["CPUExecutionProvider"] else []
    return ort.InferenceSession(str(path), so, providers=providers, disabled_optimizers=disabled)


def run(session: Any, feeds: dict[str, Any]) -> list[Any]:
    """session.run with the feeds the graph has: inputs a model's config leaves unused (e.g. the object
    score where SAM 2.0 has no `no_obj_embed_spatial`, pointer positions without temporal encoding)
    are dropped from the graph by the exporter."""
    names = getattr(session, "_sam2rt_inputs", None)
    if names is None:
        names = session._sam2rt_inputs = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})
