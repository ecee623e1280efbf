"""Thin CUDA runtime helpers over `cuda-python` (no torch, no pycuda): device buffers, pinned host buffers,
streams and CUDA graphs for the TensorRT backend, and a pool of pinned result arrays for ONNX Runtime's.

`cuda-python` is imported lazily and in either of its layouts (`cuda.bindings.runtime` from cuda-python
>= 12.6 / cuda-bindings, `cuda.cudart` from older releases), so the module imports everywhere and
nothing here assumes x86-64: on Jetson the same code runs against JetPack's CUDA.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, Sam2rtError
from .tensors import DeviceTensor

log = logging.getLogger("sam2rt")

_CUDART: Any = None


class CudaError(Sam2rtError):
    """A CUDA runtime call failed (out of memory, a lost device, an illegal address...)."""


def import_cudart():
    """The CUDA runtime bindings of cuda-python, or BackendUnavailableError saying how to install them."""
    global _CUDART
    if _CUDART is None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 (cuda-bindings)
        except ImportError:
            try:
                from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
            except ImportError as exc:
                raise BackendUnavailableError(
                    "cuda-python is not installed: `pip install 'cuda-python>=12'` (its major version must match the "
                    "CUDA of your driver / JetPack: 12.x for JetPack 6, 13.x for a CUDA 13 driver)"
                ) from exc
        _CUDART = cudart
    return _CUDART


def _error_text(cudart, err) -> str:
    try:
        name = cudart.cudaGetErrorName(err)[1]
        text = cudart.cudaGetErrorString(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        text = text.decode() if isinstance(text, bytes) else str(text)
        return f"{name}: {text}"
    except Exception:  # pragma: no cover - only when the bindings themselves misbehave
        return str(err)


def call(fn, *args):
    """Call a cuda-python function, raise CudaError on failure, return its result(s) without the error code."""
    out = fn(*args)
    err, rest = out[0], out[1:]
    if int(err) != 0:
        raise CudaError(f"{getattr(fn, '__name__', fn)} failed: {_error_text(import_cudart(), err)}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "8.7", "9.0"
    total_memory: int
    integrated: bool  # True on Jetson (the GPU shares the SoC's memory)

    @property
    def sm(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")


def gpu_info(device: int = 0) -> GpuInfo:
    """Name, compute capability and memory of CUDA device `device` (CudaError if there is none)."""
    cudart = import_cudart()
    props = call(cudart.cudaGetDeviceProperties, device)
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return GpuInfo(device, str(name).strip(), f"{props.major}.{props.minor}", int(props.totalGlobalMem), bool(props.integrated))


def cuda_status(device: int = 0) -> str:
    """'available' or why no CUDA device can be used (never raises)."""
    try:
        cudart = import_cudart()
    except BackendUnavailableError as exc:
        return f"unavailable: {exc}"
    try:
        count = call(cudart.cudaGetDeviceCount)
    except CudaError as exc:
        return f"unavailable: no usable CUDA device ({exc}); is an NVIDIA GPU with its driver present?"
    if count <= device:
        return f"unavailable: CUDA device {device} requested but {count} present"
    return "available"


def set_device(device: int = 0) -> None:
    call(import_cudart().cudaSetDevice, device)


# --- memory ---------------------------------------------------------------------------------------
def _memcpy_kind(name: str):
    return getattr(import_cudart().cudaMemcpyKind, name)


class DeviceArray(DeviceTensor):
    """A C-contiguous array in GPU memory: `shape`, `dtype`, `nbytes`, `ptr`; `to_host()` copies it back.

    Each allocation gets a unique `token`, so a consumer can tell "the same buffer as last time" without
    relying on `id()` (which Python reuses after garbage collection).
    """

    _tokens = itertools.count(1)

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.float32, device: int = 0) -> None:
        self._cudart = import_cudart()
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.device_index = device
        self.ptr = 0
        self.ptr = int(call(self._cudart.cudaMalloc, max(self.nbytes, 1)))
        self.token = next(DeviceArray._tokens)

    @property
    def device(self) -> str:
        return f"cuda:{self.device_index}"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def from_host(cls, array: np.ndarray, device: int = 0) -> "DeviceArray":
        array = np.ascontiguousarray(array)
        out = cls(array.shape, array.dtype, device)
        out.copy_from_host(array)
        return out

    def copy_from_host(self, array: np.ndarray, stream: "Stream | None" = None) -> None:
        """Copy a host array of the same size and dtype into this buffer (synchronously unless `stream`)."""
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.nbytes != self.nbytes:
            raise ValueError(f"cannot copy {array.shape} {array.dtype} into a device array of {self.shape} {self.dtype}")
        kind = _memcpy_kind("cudaMemcpyHostToDevice")
        if stream is None:
            call(self._cudart.cudaMemcpy, self.ptr, array.ctypes.data, self.nbytes, kind)
        else:
            call(self._cudart.cudaMemcpyAsync, self.ptr, array.ctypes.data, self.nbytes, kind, stream.handle)
            stream.synchronize()  # the host array may be pageable and temporary: finish before returning

    def to_host(self) -> np.ndarray:
        """A numpy copy of the buffer (synchronous)."""
        out = np.empty(self.shape, self.dtype)
        if self.nbytes:
            call(self._cudart.cudaMemcpy, out.ctypes.data, self.ptr, self.nbytes, _memcpy_kind("cudaMemcpyDeviceToHost"))
        return out

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            try:
                self._cudart.cudaFree(ptr)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    def __del__(self) -> None:
        self.free()

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device={self.device!r})"


class PinnedBuffer:
    """Page-locked host memory with a numpy view (`array`), for fast and asynchronous uploads."""

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
        self._cudart = import_cudart()
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = 0
        self.ptr = int(call(self._cudart.cudaMallocHost, max(self.nbytes, 1)))
        raw = (ctypes.c_byte * max(self.nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=self.dtype, count=int(np.prod(self.shape))).reshape(self.shape)

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        """The first prod(shape) elements, reshaped (for dynamic shapes inside a max-size buffer)."""
        n = int(np.prod(shape, dtype=np.int64))
        return self.array.reshape(-1)[:n].reshape(shape)

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.array = None  # type: ignore[assignment]
            try:
                self._cudart.cudaFreeHost(ptr)
            except Exception:  # pragma: no cover
                pass

    def __del__(self) -> None:
        self.free()


class _PinnedBlock:
    """One page-locked block, exposed to numpy through `__array_interface__`: the arrays made from it keep it alive
    (as their `base`), and when the last of them is gone the block goes back to its pool."""

    def __init__(self, pool: "PinnedPool", ptr: int, nbytes: int) -> None:
        self.pool, self.ptr, self.nbytes = pool, ptr, nbytes
        self.__array_interface__: dict[str, Any] = {}

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        self.__array_interface__ = {"data": (self.ptr, False), "shape": tuple(shape), "typestr": dtype.str, "version": 3}
        return np.asarray(self)

    def __del__(self) -> None:
        try:
            self.pool._release(self.ptr, self.nbytes)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


# Arrays under this many bytes are copied to and from pageable memory. At 256 KiB a click's three 512x512 masks and
# its low-res logits (768 KiB each), a 512x512 image and a 640x480 video frame (768 and 900 KiB), and a tracked
# object's 640x480 mask (300 KiB) are pinned. Run 8 (H200) measured 0.22 ms for a click's outputs to come down into
# pageable arrays (the threshold was 1 MiB then); gpu_bench.py times that threshold beside this one.
PIN_MIN_BYTES = 256 * 2**10


class PinnedPool:
    """A caching allocator of page-locked host arrays for device-to-host results and host-to-device uploads.

    Why: a copy into pageable memory runs at a fraction of the bus's speed (the driver stages it through its own
    pinned buffers). On the H100 three 1920x1080 float masks took ~5 ms to come down (benchmarks/README.md), the
    largest part of the 1080p overhead. Allocating page-locked memory costs more than the copy it saves, so blocks
    are reused: `empty(shape, dtype)` returns a numpy array over a cached block, and the block goes back to the pool
    when the caller has dropped that array and every view of it (numpy keeps the block as the array's base). The
    caller owns the array like any other.

    Bounds: at most `max_bytes` page-locked in all, cached blocks evicted (least recently released first) to make
    room; at most `per_size` blocks of one size in use at once (a caller keeping every result would otherwise
    allocate on every call, slower than a pageable copy). `empty` returns None when a bound says no: the caller
    then uses pageable memory. Arrays under `min_bytes` are not worth a block (None as well).
    """

    def __init__(self, max_bytes: int = 512 * 2**20, per_size: int = 4, min_bytes: int = PIN_MIN_BYTES) -> None:
        self._cudart = import_cudart()
        self.max_bytes, self.per_size, self.min_bytes = int(max_bytes), int(per_size), int(min_bytes)
        self._free: dict[int, list[int]] = {}  # nbytes -> free block pointers
        self._order: list[tuple[int, int]] = []  # (nbytes, ptr) of free blocks, least recently released first
        self._in_use: dict[int, int] = {}  # nbytes -> blocks held by callers
        self.total = 0  # bytes page-locked (free and in use)
        self.allocations = 0  # cudaMallocHost calls so far (tests read it)
        self._closed = False
        # reentrant: a block whose last array is collected while this thread allocates returns itself here
        self._lock = threading.RLock()

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray | None:
        """A page-locked array, or None where a bound says no."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < self.min_bytes or nbytes == 0:
            return None
        with self._lock:
            if self._closed or self._in_use.get(nbytes, 0) >= self.per_size:
                return None
            free = self._free.get(nbytes)
            if free:
                ptr = free.pop()
                self._order.remove((nbytes, ptr))
            else:
                while self.total + nbytes > self.max_bytes and self._order:
                    self._drop(*self._order.pop(0))
                if self.total + nbytes > self.max_bytes:
                    return None
                try:
                    ptr = int(call(self._cudart.cudaMallocHost, nbytes))
                except CudaError as exc:  # e.g. no usable driver for these bindings: pageable results from now on
                    log.warning("sam2rt: no page-locked result buffers (%s); results come down into pageable memory", exc)
                    self._closed = True
                    return None
                self.total += nbytes
                self.allocations += 1
            self._in_use[nbytes] = self._in_use.get(nbytes, 0) + 1
        return _PinnedBlock(self, ptr, nbytes).array(tuple(int(d) for d in shape), dtype)

    def _drop(self, nbytes: int, ptr: int) -> None:
        self._free[nbytes].remove(ptr)
        self.total -= nbytes
        self._cudart.cudaFreeHost(ptr)

    def _release(self, ptr: int, nbytes: int) -> None:
        with self._lock:
            self._in_use[nbytes] -= 1
            if self._closed:
                self.total -= nbytes
                self._cudart.cudaFreeHost(ptr)
                return
            self._free.setdefault(nbytes, []).append(ptr)
            self._order.append((nbytes, ptr))

    @property
    def cached(self) -> int:
        """Free blocks kept for reuse."""
        with self._lock:
            return len(self._order)

    def close(self) -> None:
        """Free the cached blocks; blocks still in callers' arrays are freed when those arrays go."""
        with self._lock:
            self._closed = True
            while self._order:
                self._drop(*self._order.pop(0))


def download(value: Any, pool: PinnedPool, dtype: Any) -> np.ndarray | None:
    """A host copy of an ONNX Runtime OrtValue on a CUDA device (or any buffer at `value.data_ptr()`) in a pinned
    array of `pool`; None where the pool declines (the caller copies into pageable memory then)."""
    shape = tuple(int(d) for d in value.shape())
    out = pool.empty(shape, dtype)
    if out is not None and out.nbytes:
        call(pool._cudart.cudaMemcpy, out.ctypes.data, int(value.data_ptr()), out.nbytes,
             _memcpy_kind("cudaMemcpyDeviceToHost"))
    return out


class Stream:
    """A non-blocking CUDA stream; `handle` is the integer TensorRT's execute_async_v3 takes."""

    def __init__(self) -> None:
        self._cudart = import_cudart()
        self.stream = call(self._cudart.cudaStreamCreateWithFlags, self._cudart.cudaStreamNonBlocking)
        self.handle = int(self.stream)

    def synchronize(self) -> None:
        call(self._cudart.cudaStreamSynchronize, self.stream)

    def memcpy_htod(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        call(self._cudart.cudaMemcpyAsync, dst_ptr, src_ptr, nbytes, _memcpy_kind("cudaMemcpyHostToDevice"), self.stream)

    def memcpy_dtoh(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        call(self._cudart.cudaMemcpyAsync, dst_ptr, src_ptr, nbytes, _memcpy_kind("cudaMemcpyDeviceToHost"), self.stream)

    def memcpy_dtod(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        call(self._cudart.cudaMemcpyAsync, dst_ptr, src_ptr, nbytes, _memcpy_kind("cudaMemcpyDeviceToDevice"), self.stream)

    def destroy(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            try:
                self._cudart.cudaStreamDestroy(stream)
            except Exception:  # pragma: no cover
                pass

    def __del__(self) -> None:
        self.destroy()


class CudaGraph:
    """A CUDA graph captured from the work `fn()` enqueues on `stream`; `launch()` replays it as one launch."""

    def __init__(self, stream: Stream, fn) -> None:
        self._cudart = cudart = import_cudart()
        self.stream = stream
        self.graph = self.exec = None
        call(cudart.cudaStreamBeginCapture, stream.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            fn()
        except BaseException:
            try:  # end the capture so the stream is usable again
                cudart.cudaStreamEndCapture(stream.stream)
            except Exception:  # pragma: no cover
                pass
            raise
        self.graph = call(cudart.cudaStreamEndCapture, stream.stream)
        self.exec = call(cudart.cudaGraphInstantiate, self.graph, 0)

    def launch(self) -> None:
        call(self._cudart.cudaGraphLaunch, self.exec, self.stream.stream)

    def destroy(self) -> None:
        try:
            if self.exec is not None:
                self._cudart.cudaGraphExecDestroy(self.exec)
            if self.graph is not None:
                self._cudart.cudaGraphDestroy(self.graph)
        except Exception:  # pragma: no cover
            pass
        self.exec = self.graph = None

    def __del__(self) -> None:
        self.destroy()
