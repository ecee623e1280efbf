"""Page-locked blocks that uploads are staged through, reused whatever the image's size.

Why: the GPU reads page-locked host memory at the bus's speed and pageable memory at a fraction of it (in GPU run 5,
three 1920x1080 float masks came down in 1.33 ms into page-locked arrays and 2.87 ms into pageable ones), so the
device pipeline copies an image into a page-locked block (on a few threads: host_copy.py) and uploads it from there.

Why not gpu.PinnedPool, the results' pool: its blocks are per exact byte count. Images of many sizes (a server's)
would each allocate one (cudaMallocHost costs more than the copy it saves; evicting calls cudaFreeHost, which waits
for the device), and a 512x512 image would compete for the pool's per-size slots with a click's masks of the same
768 KiB. Here a block is taken for one upload and given back after it; a block too small for an image is replaced
by one of the next power of two (1 MiB at least), so any stream of sizes settles on a block or two.

The contract: `take(image)` is a context manager giving the image's copy in a block (or the image itself where it is
not staged); the caller's upload from it must be complete when the context ends (ONNX Runtime's run and
OrtValue.update_inplace return when their copies are done).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .gpu import PIN_MIN_BYTES, PinnedBuffer
from .host_copy import parallel_copy

log = logging.getLogger("sam2rt")

STAGING_BLOCKS = 2  # uploads staged at once (a tracker's prefetch thread beside its caller); more go up pageable
STAGING_MAX_BYTES = 64 * 2**20  # the largest block: a 3840x2160 image (24.9 MB) fits; larger ones go up pageable
MIN_BLOCK_BYTES = 2**20


def block_bytes(nbytes: int) -> int:
    """The capacity of a block made for `nbytes`: the next power of two, MIN_BLOCK_BYTES at least."""
    return max(MIN_BLOCK_BYTES, 1 << max(0, int(nbytes) - 1).bit_length())


class UploadStaging:
    """At most `blocks` page-locked blocks of up to `max_bytes`, for arrays of `min_bytes` and more (module docstring).

    `uploads` counts the arrays staged, `allocations` the blocks made (tests and benchmarks read them). A failure to
    allocate (no usable driver for these bindings, no page-locked memory left) turns staging off for good: arrays go up
    as they are, the numbers never depend on it.
    """

    def __init__(self, blocks: int = STAGING_BLOCKS, max_bytes: int = STAGING_MAX_BYTES,
                 min_bytes: int = PIN_MIN_BYTES) -> None:
        self.blocks, self.max_bytes, self.min_bytes = int(blocks), int(max_bytes), int(min_bytes)
        self._free: list[PinnedBuffer] = []
        self._made = 0  # blocks alive: free or taken
        self._lock = threading.Lock()
        self.uploads = 0
        self.allocations = 0
        self.closed = False

    def _acquire(self, nbytes: int) -> PinnedBuffer | None:
        with self._lock:
            if self.closed:
                return None
            fits = [b for b in self._free if b.nbytes >= nbytes]
            if fits:
                block = min(fits, key=lambda b: b.nbytes)
                self._free.remove(block)
                return block
            if self._made >= self.blocks:
                if not self._free:
                    return None  # every block taken: this one goes up pageable
                smallest = min(self._free, key=lambda b: b.nbytes)  # too small, as every free one: replaced
                self._free.remove(smallest)
                smallest.free()
                self._made -= 1
            self._made += 1
        try:
            block = PinnedBuffer((min(block_bytes(nbytes), self.max_bytes),), np.uint8)
        except Exception as exc:  # CudaError, or bindings that disagree with the driver
            log.warning("sam2rt: uploads not staged in page-locked memory (%s); images go up from pageable memory", exc)
            with self._lock:
                self._made -= 1
                self.closed = True
            return None
        with self._lock:
            self.allocations += 1
        return block

    def _release(self, block: PinnedBuffer) -> None:
        with self._lock:
            if self.closed:
                self._made -= 1
                block.free()
            else:
                self._free.append(block)

    @contextmanager
    def take(self, array: np.ndarray) -> Iterator[np.ndarray]:
        """`array` (C-contiguous) copied into a block while the context lasts, or `array` itself where it is under
        min_bytes, over max_bytes, every block is taken or staging is off."""
        nbytes = int(array.nbytes)
        block = self._acquire(nbytes) if self.min_bytes <= nbytes <= self.max_bytes else None
        if block is None:
            yield array
            return
        try:
            staged = block.array[:nbytes].view(array.dtype).reshape(array.shape)
            parallel_copy(staged, array)
            with self._lock:
                self.uploads += 1
            yield staged
        finally:
            self._release(block)

    def close(self) -> None:
        """Free the free blocks; a taken one is freed when it comes back."""
        with self._lock:
            self.closed = True
            free, self._free = self._free, []
            self._made -= len(free)
        for block in free:
            block.free()

    def __enter__(self) -> "UploadStaging":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
