"""Device tensors: features that stay where a GPU backend computed them, and the one way to bring any tensor home."""

from __future__ import annotations

import abc
from typing import Any

import numpy as np


class DeviceTensor(abc.ABC):
    """A tensor in a backend's device memory (OrtDeviceTensor, DeviceArray): shape, dtype, nbytes, device, to_host()."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """Where it lives, e.g. "cuda:0"."""

    @abc.abstractmethod
    def to_host(self) -> np.ndarray:
        """A host copy as a numpy array."""

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        host = self.to_host()
        return host if dtype is None else host.astype(dtype)


def as_host(value: Any) -> np.ndarray:
    """A numpy array or DeviceTensor as a host numpy array (numpy arrays are returned as they are)."""
    if isinstance(value, DeviceTensor):
        return value.to_host()
    return np.asarray(value)
