"""A least-recently-used cache bounded in bytes, and the prompt-set bookkeeping of the logits cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Iterator, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """An LRU mapping whose values' total size (by `sizeof`) never exceeds `max_bytes`.

    A value larger than the whole bound is not stored. Thread-safe. `hits`/`misses` count get().
    """

    def __init__(self, max_bytes: int, sizeof: Callable[[V], int]) -> None:
        self.max_bytes = int(max_bytes)
        self._sizeof = sizeof
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: K, count: bool = True) -> V | None:
        """The value for key (marking it most recently used), or None."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                if count:
                    self.misses += 1
                return None
            self._data.move_to_end(key)
            if count:
                self.hits += 1
            return item[0]

    def put(self, key: K, value: V) -> bool:
        """Store value under key, evicting least recently used entries to stay in bounds; False if too big."""
        size = int(self._sizeof(value))
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return False
            while self._data and self._bytes + size > self.max_bytes:
                _, (_, s) = self._data.popitem(last=False)
                self._bytes -= s
                self.evictions += 1
            self._data[key] = (value, size)
            self._bytes += size
            return True

    def items_newest_first(self) -> list[tuple[K, V]]:
        """A snapshot of (key, value), most recently used first (does not touch recency)."""
        with self._lock:
            return [(k, v) for k, (v, _) in reversed(self._data.items())]

    def __iter__(self) -> Iterator[K]:
        with self._lock:
            return iter(list(self._data))


# --- the logits cache: prompt sets and the reference's subset rule ------------------------------
PointKey = tuple[float, float, bool]
PromptKey = tuple[tuple[float, float, float, float] | None, frozenset[PointKey]]
PromptSetKey = tuple[PromptKey, ...]


@dataclass
class LogitsEntry:
    """Low-res logits (P,256,256) saved for one request's prompt set (P prompts, in order)."""

    prompts: PromptSetKey
    logits: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.logits.nbytes)


def num_points(prompts: PromptSetKey) -> int:
    return sum(len(points) for _, points in prompts)


def strict_subset_match(sub: PromptSetKey, sup: PromptSetKey) -> dict[int, int] | None:
    """If `sub` is a strict subset of `sup` (each of its prompts matches a distinct prompt of `sup` with
    the same box and a subset of its points, and the sets differ), map sub's prompt indices to sup's."""
    if sub == sup:
        return None
    free = list(range(len(sup)))
    mapping: dict[int, int] = {}
    for i, (box, points) in enumerate(sub):
        for j in free:
            sup_box, sup_points = sup[j]
            if sup_box == box and points <= sup_points:
                mapping[i] = j
                free.remove(j)
                break
        else:
            return None
    return mapping


def find_prior_logits(entries: list[LogitsEntry], current: PromptSetKey) -> dict[int, np.ndarray]:
    """Pick the cached prompt set to refine from, as the reference: a strict subset of `current`,
    preferring exactly one point fewer, else the one with most points (newest first on ties).

    `entries` come newest first. Returns {index of a current prompt: its (256,256) mask input}.
    """
    want = num_points(current) - 1
    best: tuple[int, LogitsEntry, dict[int, int]] | None = None
    for entry in entries:
        mapping = strict_subset_match(entry.prompts, current)
        if mapping is None:
            continue
        size = num_points(entry.prompts)
        if size == want:
            best = (size, entry, mapping)
            break
        if best is None or size > best[0]:
            best = (size, entry, mapping)
    if best is None:
        return {}
    _, entry, mapping = best
    return {j: entry.logits[i] for i, j in mapping.items()}
