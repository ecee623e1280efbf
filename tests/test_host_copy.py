"""parallel_copy (runtime/host_copy.py): np.copyto on several threads for large arrays, the same result always."""

from __future__ import annotations

import numpy as np
import pytest

from sam2rt.runtime import host_copy
from sam2rt.runtime.host_copy import MIN_PART_BYTES, parallel_copy


class _CountingPool:
    """The copy's executor, counting the parts handed to other threads."""

    def __init__(self, pool) -> None:
        self.pool, self.parts = pool, 0

    def submit(self, fn, *args):
        self.parts += 1
        return self.pool.submit(fn, *args)


@pytest.fixture
def counting(monkeypatch):
    pool = _CountingPool(host_copy._executor())
    monkeypatch.setattr(host_copy, "_executor", lambda: pool)
    return pool


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_a_large_copy_is_split_over_threads_and_equals_copyto(counting, threads):
    rng = np.random.default_rng(threads)
    src = rng.integers(0, 256, (1080, 1920, 3), np.uint8)
    dst = np.zeros_like(src)
    parallel_copy(dst, src, threads=threads)
    np.testing.assert_array_equal(dst, src)
    assert counting.parts == threads - 1  # the calling thread copies one part itself


def test_sources_of_any_layout_and_a_cast_as_copyto(counting):
    rng = np.random.default_rng(0)
    chw = rng.standard_normal((1, 3, 1024, 1024))  # float64 into a float32 block: TensorRT's staged image
    dst = np.empty(chw.shape, np.float32)
    parallel_copy(dst, chw, threads=4)
    np.testing.assert_array_equal(dst, chw.astype(np.float32))
    assert counting.parts == 3  # contiguous: split along the elements, not the single first axis
    hwc = rng.integers(0, 256, (3, 1080, 1920), np.uint8).transpose(1, 2, 0)  # not contiguous: split by rows
    dst = np.empty(hwc.shape, np.uint8)
    parallel_copy(dst, hwc, threads=2)
    np.testing.assert_array_equal(dst, hwc)
    assert counting.parts == 4


def test_a_small_copy_stays_on_the_calling_thread(counting):
    src = np.arange(MIN_PART_BYTES // 8, dtype=np.float64)  # one part's worth: not worth a thread
    dst = np.empty_like(src)
    parallel_copy(dst, src, threads=4)
    np.testing.assert_array_equal(dst, src)
    assert counting.parts == 0
    with pytest.raises(ValueError, match="one shape"):
        parallel_copy(np.empty((2, 3)), np.empty((3, 2)))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_a_forked_child_copies_with_threads_of_its_own():
    """The copy's threads do not survive a fork: a child that copies after its parent did must not wait for them."""
    import os

    src = np.random.default_rng(1).integers(0, 256, (1080, 1920, 3), np.uint8)
    parallel_copy(np.empty_like(src), src, threads=2)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # child: exit 0 only if the threaded copy finishes and is right
        import signal

        signal.alarm(20)
        dst = np.empty_like(src)
        parallel_copy(dst, src, threads=2)
        os._exit(0 if np.array_equal(dst, src) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_overlapping_arrays_and_copies_on_a_copy_thread_stay_whole(counting):
    """Arrays sharing memory are copied by np.copyto itself (which handles the overlap), and a copy asked for on one
    of the copy threads runs there whole (its parts would otherwise queue behind the threads that wait for them)."""
    buf = np.arange(8 * MIN_PART_BYTES // 8, dtype=np.float64)
    want = buf.copy()
    want[1:] = buf[:-1].copy()
    parallel_copy(buf[1:], buf[:-1], threads=4)
    np.testing.assert_array_equal(buf, want)
    assert counting.parts == 0
    src = np.random.default_rng(2).integers(0, 256, (1080, 1920, 3), np.uint8)
    dst = np.zeros_like(src)
    counting.submit(parallel_copy, dst, src, 4).result()  # on a copy thread: one submit, the test's own
    np.testing.assert_array_equal(dst, src)
    assert counting.parts == 1


def test_an_executor_that_refuses_work_leaves_the_rest_to_the_caller(monkeypatch):
    """At interpreter shutdown the executor refuses new parts: what it has not taken is copied on the calling thread."""

    class Refusing(_CountingPool):
        def submit(self, fn, *args):
            if self.parts:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            return super().submit(fn, *args)

    monkeypatch.setattr(host_copy, "_executor", lambda: Refusing(host_copy.ThreadPoolExecutor(2)))
    src = np.random.default_rng(3).integers(0, 256, (2160, 3840, 3), np.uint8)
    dst = np.zeros_like(src)
    parallel_copy(dst, src, threads=4)
    np.testing.assert_array_equal(dst, src)
