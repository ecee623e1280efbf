"""One object's memory features kept where the video graphs run (the GPU with the CUDA provider).

The reference stores each memory rounded to bfloat16; the tracker keeps those values as float32 arrays on the
host (state files hold their bfloat16 bits). Building the memory attention's (slots, C, h, w) input from the host
on every frame would upload ~7 MB per object per frame (7 slots of 64x64x64). Instead each memory lives in a
row of the object's bank on the device:

- `store(features)`: a new memory, straight from the memory encoder's output where it was computed, is rounded
  to bfloat16 and written into a free row by one run of `memory_write.onnx`, whose output is bound to that row's
  address (the bank is allocated once and only the new row is written), and which also brings the rounded values
  down (what the tracker keeps). No host rounding and no upload on the tracking path.
- `gather(slots)`: the rows the frame's selection names are gathered into the input on the device
  (`memory_gather.onnx`). A selected memory without a row (a restored state's, or one whose row was given up) is
  uploaded from its host values first: the same floats, so the result is the same function bit for bit.

Rows are kept for the memories the latest selection used and for those stored since; a memory not selected on a
frame gives its row up. Row 0 stays zero: empty slots gather it (they are masked out of the attention; zeros
keep them finite).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.bound_session import BoundSession
from ..backends.onnxruntime_backend import OrtDeviceTensor
from ..tensors import as_host
from .memory import round_bf16

# Rows beyond one per slot: memories stored between two gathers (a tracked frame's, and a correction's re-encoding on
# the same time step). A store that finds none free keeps its memory on the host only (gather uploads it).
STORE_ROWS = 2


class MemoryBank:
    """The rows of one object's memories on the graphs' device: `store()` a new memory, `gather(slots)` -> mem_feats."""

    def __init__(self, write: BoundSession, gather: BoundSession, slots: int, entry_shape: tuple[int, ...]) -> None:
        import onnxruntime as ort

        self._write, self._gather = write, gather
        self.capacity = slots + 1 + STORE_ROWS  # every slot its own row, the zero row, the rows of new memories
        self.entry_shape = tuple(int(d) for d in entry_shape)
        # allocated (and zeroed: row 0 must be) once on the write's device; writes go into its rows in place
        self._bank = OrtDeviceTensor(ort.OrtValue.ortvalue_from_numpy(
            np.zeros((self.capacity, *self.entry_shape), np.float32), write.device, write.device_id))
        self._row_bytes = int(np.prod(self.entry_shape)) * 4
        # id(values) -> (row, values): the arrays are held so that their ids stay theirs while they own a row
        self._rows: dict[int, tuple[int, np.ndarray]] = {}
        self.stores = 0  # memories written from the memory encoder's output so far
        self.uploads = 0  # memories written from host values so far (tests and benchmarks read both)

    def _write_row(self, row: int, entries: Any, keep: bool) -> np.ndarray | None:
        """Round one (1,C,h,w) memory to bfloat16 into `row`; with `keep`, also its rounded values on the host."""
        at = {"entries_rounded": (self._bank.value.data_ptr() + row * self._row_bytes, (1, *self.entry_shape))}
        kept = self._write.run_at({"entries": entries}, at, ("kept",) if keep else ())
        return kept[0] if keep else None

    def _free_rows(self) -> list[int]:
        return sorted(set(range(1, self.capacity)) - {row for row, _ in self._rows.values()})

    def store(self, features: Any) -> np.ndarray:
        """A new memory, the memory encoder's (1,C,h,w) output (on the device or the host), rounded to bfloat16 into a
        free row. Returns the rounded values, (C,h,w) float32 on the host: what the tracker keeps and selects."""
        free = self._free_rows()
        if not free:  # not on the tracker's path (STORE_ROWS): round on the host, upload when selected
            return round_bf16(as_host(features).reshape(self.entry_shape))
        rounded = self._write_row(free[0], features, keep=True)
        values = np.ascontiguousarray(rounded.reshape(self.entry_shape))
        self._rows[id(values)] = (free[0], values)
        self.stores += 1
        return values

    def gather(self, slots: list[np.ndarray | None]) -> Any:
        """Each slot's memory (host values, or None for an empty slot) -> (slots, C, h, w) float32 on the device."""
        wanted = {id(b): b for b in slots if b is not None}
        self._rows = {k: v for k, v in self._rows.items() if k in wanted}  # rows of unselected memories are free
        free = self._free_rows()
        new = [b for k, b in wanted.items() if k not in self._rows]
        for row, b in zip(free, new):  # rare (a restored state's memories): one write each, into its row
            self._write_row(row, np.asarray(b, np.float32).reshape(1, *self.entry_shape), keep=False)
            self._rows[id(b)] = (row, b)
            self.uploads += 1
        index = np.array([0 if b is None else self._rows[id(b)][0] for b in slots], np.int64)
        return self._gather.run({"bank": self._bank, "index": index}, ("mem_feats",))[0]
