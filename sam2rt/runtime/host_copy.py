"""Large host-to-host copies on several threads: filling a page-locked staging block with an image.

Why: an image goes up to the GPU fastest from page-locked memory, so the device pipeline copies it into a pinned
block first (backends/ort_pipeline.py). That copy is the host's memory bandwidth at work, and one thread uses only a
part of it; numpy releases the GIL while it copies plain arrays, so parts of the rows copied on a few threads add
up. On the 2-core development VM a 1920x1080x3 uint8 image took 0.80 ms on one thread and 0.68 ms on two, a
3840x2160 one 5.0 and 3.2 ms (benchmarks/upload_staging.py, benchmarks/README.md); a GPU server's host has more cores
and memory channels.

The contract: `parallel_copy(dst, src)` is `np.copyto(dst, src)` for arrays of one shape, whatever the threads.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

# More threads than this stop paying on a copy of a few MiB (each part's hand-off costs ~20-50 us).
MAX_COPY_THREADS = 4
# A part under this is copied faster than a thread is handed it.
MIN_PART_BYTES = 1 << 20
THREAD_PREFIX = "sam2rt-copy"  # the copy threads' names: a copy asked for on one of them runs there, whole

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool_after_fork() -> None:
    # a forked child has none of the parent's threads: a pool it inherited would never run a part (a hang)
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def copy_threads() -> int:
    """Threads a large copy uses: the CPUs this process may run on, at most MAX_COPY_THREADS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_COPY_THREADS, cpus))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:  # made once: a copy must not pay for starting threads
            _pool = ThreadPoolExecutor(max_workers=MAX_COPY_THREADS, thread_name_prefix=THREAD_PREFIX)
        return _pool


def parallel_copy(dst: np.ndarray, src: Any, threads: int | None = None) -> None:
    """np.copyto(dst, src) for arrays of the same shape, split over up to `threads` threads (default copy_threads())
    in parts of at least MIN_PART_BYTES of `dst`: runs of elements where both arrays are C-contiguous, else rows
    (the first axis). A small copy, arrays that share memory, and a copy asked for on one of the copy threads run
    on the calling thread. Returns when every part is written, whatever fails."""
    src = np.asarray(src)
    if dst.shape != src.shape:
        raise ValueError(f"parallel_copy needs arrays of one shape, got {dst.shape} and {src.shape}")
    n = copy_threads() if threads is None else max(1, min(MAX_COPY_THREADS, int(threads)))
    if dst.flags.c_contiguous and src.flags.c_contiguous:
        dst, src = dst.reshape(-1), src.reshape(-1)
    rows = dst.shape[0] if dst.ndim else 0
    parts = min(n, rows, dst.nbytes // MIN_PART_BYTES)
    if parts <= 1 or np.may_share_memory(dst, src) or threading.current_thread().name.startswith(THREAD_PREFIX):
        np.copyto(dst, src)
        return
    edges = np.linspace(0, rows, parts + 1).astype(int)
    futures: list[Future] = []
    try:
        pool = _executor()
        for a, b in zip(edges[1:-1], edges[2:]):
            futures.append(pool.submit(np.copyto, dst[a:b], src[a:b]))
    except RuntimeError:  # the executor refuses new work (interpreter shutdown): the rest on this thread
        done = int(edges[1 + len(futures)])
        np.copyto(dst[done:], src[done:])
    try:
        np.copyto(dst[: edges[1]], src[: edges[1]])  # the first part on this thread, beside the others
    finally:
        wait(futures)  # no part may still be writing when this returns, not even after an error
    for f in futures:
        f.result()  # an error of a part, raised here
