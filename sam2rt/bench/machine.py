"""What the benchmark ran on (CPU, cores, ISA features, versions) and this machine's measured peak FLOP/s."""

from __future__ import annotations

import os
import platform
import socket
import time
from importlib import metadata
from typing import Any

import numpy as np

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
PACKAGES = ("sam2rt", "numpy", "opencv-python-headless", "onnxruntime", "onnxruntime-gpu", "onnx", "torch",
            "torchvision", "sam2", "matplotlib", "psutil", "rich")


def cpu_info() -> dict[str, Any]:
    """CPU model name, logical CPUs, CPUs this process may use, and the SIMD/AMX flags that matter here."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "isa": {f: (f in flags) for f in ISA_FLAGS},
    }


def memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def machine_info(label: str | None = None) -> dict[str, Any]:
    """Everything about the machine a reader needs to interpret the figures."""
    return {
        "label": label or socket.gethostname(),
        "cpu": cpu_info(),
        "gpu": None,
        "memory_gib": memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "load_average_at_start": load_average(),
    }


def measure_peak_flops(n: int = 2048, repeats: int = 5, threads: int | None = None) -> dict[str, Any]:
    """This machine's practical FP32 peak: the best of `repeats` n x n x n float32 numpy matmuls (2 n^3 FLOPs each).

    numpy's BLAS uses all usable cores (or `threads` when threadpoolctl is installed); the best
    run is taken as the peak, so the 'fraction of peak' figures are upper bounds of efficiency
    only in that sense: a hand-tuned kernel could go somewhat higher.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    limiter = None
    if threads:
        try:
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(limits=threads, user_api="blas")
        except ImportError:
            limiter = None
    try:
        a @ b  # warm-up
        best = float("inf")
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            dt = time.perf_counter() - t0
            times.append(dt)
            best = min(best, dt)
    finally:
        if limiter is not None:
            limiter.unregister() if hasattr(limiter, "unregister") else None
    flops = 2.0 * n**3
    return {
        "method": f"numpy float32 matmul {n}x{n}x{n}, best of {repeats} (after one warm-up)",
        "blas": _blas_name(),
        "peak_gflops": round(flops / best / 1e9, 2),
        "median_gflops": round(flops / float(np.median(times)) / 1e9, 2),
    }


def _blas_name() -> str:
    try:
        cfg = np.show_config(mode="dicts")  # numpy >= 1.25
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # pragma: no cover - older numpy
        return "unknown"
