"""CUDA graph captures exclude all other GPU work of the process: a shared/exclusive lock.

Why: ONNX Runtime captures a CUDA graph (`enable_cuda_graph`, on a session's first run) in CUDA's global capture
mode. While one thread captures, any other thread's "unsafe" CUDA call (a stream synchronisation, an allocation, a
synchronous copy) fails with "operation not permitted when stream is capturing" and invalidates the capture. On an
H100 (GPU run 5, benchmarks/results/gpu-runs) that is what `VideoTracker.propagate`'s prefetch did: the next frame's
preprocessing graph was captured on the worker thread while the main thread ran the memory encoder, and both failed.

The contract: GPU work that may run beside other threads' work holds `GPU_WORK.shared()`; a run that may capture a
CUDA graph holds `GPU_WORK.exclusive()`, which waits until no other thread holds either and keeps new shared holders
out meanwhile. Both nest. A thread that holds shared and asks for exclusive gives its shared hold up while it waits
(two threads upgrading at once would otherwise wait for each other) and has it back when the exclusive section ends.

Deadlock rule: a thread waiting for exclusive must not hold a lock that a shared holder of another thread waits for.
The tracker's two threads keep it: the worker's encode holds the backend's encoder lock and the preprocess graph's
lock, the main thread's tracking holds the video graphs' and the upsampling graph's; neither waits for the other's.
Captures happen once per session, shape and thread, so the exclusion costs nothing once shapes have settled.

Per thread: ONNX Runtime's CUDA provider keeps a session's captured graph in the running thread's context
(`CUDAExecutionProvider::PerThreadContext`, kept for the thread while `enable_cuda_graph` is on), so a session captured
on one thread is captured again on its first run on another. `ThreadRuns` records which threads ran a session: each
thread's first run holds exclusive, not only the session's first. GPU run 6 (H100) found this: `propagate`'s worker
re-captured the encoder, captured on the main thread by `add_prompt`, beside the main thread's memory encoder.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class CaptureLock:
    """Shared holders run concurrently; an exclusive holder runs alone. Reentrant per thread; writers preferred."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads holding shared
        self._writer: int | None = None  # the thread holding exclusive
        self._writers_waiting = 0
        self._local = threading.local()

    def _depth(self) -> tuple[int, int]:
        return getattr(self._local, "shared", 0), getattr(self._local, "exclusive", 0)

    @property
    def shared_holders(self) -> int:
        """Threads holding shared now (tests and diagnostics)."""
        with self._cond:
            return self._readers

    def holds_shared(self) -> bool:
        return self._depth()[0] > 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        shared, exclusive = self._depth()
        if shared or exclusive:  # nested: this thread already holds it
            self._local.shared = shared + 1
            try:
                yield
            finally:
                self._local.shared -= 1
            return
        with self._cond:
            while self._writer is not None or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        self._local.shared = 1
        try:
            yield
        finally:
            self._local.shared = 0
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        shared, exclusive = self._depth()
        if exclusive:
            self._local.exclusive = exclusive + 1
            try:
                yield
            finally:
                self._local.exclusive -= 1
            return
        me = threading.get_ident()
        with self._cond:
            if shared:  # give the shared hold up while waiting (module docstring)
                self._readers -= 1
                self._cond.notify_all()
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: the shared hold back, as it was
                if shared:
                    self._readers += 1
                raise
            finally:
                self._writers_waiting -= 1
                self._cond.notify_all()
            self._writer = me
        self._local.exclusive = 1
        try:
            yield
        finally:
            self._local.exclusive = 0
            with self._cond:
                self._writer = None
                if shared:  # back to the shared hold this thread had (no wait: it was holding the lock)
                    self._readers += 1
                self._cond.notify_all()


# the process's one lock: CUDA graph captures of every session exclude every other thread's GPU work
GPU_WORK = CaptureLock()


class ThreadRuns:
    """Which threads have run one CUDA-graph session (module docstring: ONNX Runtime captures per thread).

    `guard()`: the lock a run of it on this thread holds, exclusive where this thread has not run it yet (its run
    captures); `mark()` after a run that succeeded; `any`: whether any thread has (a later failure is then an error,
    not a capture to give up)."""

    def __init__(self) -> None:
        self._local = threading.local()  # a new thread sees no mark, even one reusing a dead thread's ident
        self.any = False

    def here(self) -> bool:
        return getattr(self._local, "ran", False)

    def guard(self) -> Any:
        return GPU_WORK.shared() if self.here() else GPU_WORK.exclusive()

    def mark(self) -> None:
        self._local.ran = True
        self.any = True


def gpu_work(fn: F) -> F:
    """Decorator: the function's GPU work holds GPU_WORK shared (it may run beside other threads' work)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with GPU_WORK.shared():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
