"""One object's memory features kept where the video graphs run (the GPU with the CUDA provider).

The tracker keeps each memory as bfloat16 bits on the host (what the reference stores, what state files
hold). Building the memory attention's (slots, C, h, w) float32 input from them on every frame would expand
and upload ~7 MB per object per frame (7 slots of 64x64x64). Instead each memory's float32 values go to the
device once, into a free row of the object's bank (`memory_write.onnx`), and each frame the rows the
selection names are gathered into the input on the device (`memory_gather.onnx`). They are the same floats,
so the result is the same function bit for bit; a tracked frame uploads one new row per object.

Rows are kept for the memories the latest selection used; a memory not selected on a frame gives its row up
(and is uploaded again should a later selection pick it, as a memory temporal stride > 1 can). Row 0 stays
zero: empty slots gather it (they are masked out of the attention; zeros keep them finite).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .memory import from_bf16_bits
from ..backends.bound_session import BoundSession


class MemoryBank:
    """The rows of one object's memories on the graphs' device; `gather(slots)` -> the mem_feats input there."""

    def __init__(self, write: BoundSession, gather: BoundSession, slots: int, entry_shape: tuple[int, ...]) -> None:
        self._write, self._gather = write, gather
        self.capacity = slots + 1  # every slot its own row, and the zero row
        self.entry_shape = tuple(int(d) for d in entry_shape)
        self._bank: Any = np.zeros((self.capacity, *self.entry_shape), np.float32)  # uploaded by the first write
        # id(bits) -> (row, bits): the arrays are held so that their ids stay theirs while they own a row
        self._rows: dict[int, tuple[int, np.ndarray]] = {}
        self.uploads = 0  # memories written to the device so far (tests and benchmarks read it)

    def gather(self, slots: list[np.ndarray | None]) -> Any:
        """Each slot's memory (bfloat16 bits, or None for an empty slot) -> (slots, C, h, w) float32 on the device."""
        wanted = {id(b): b for b in slots if b is not None}
        self._rows = {k: v for k, v in self._rows.items() if k in wanted}  # rows of unselected memories are free
        free = sorted(set(range(1, self.capacity)) - {row for row, _ in self._rows.values()})
        new = [b for k, b in wanted.items() if k not in self._rows]
        if new:
            rows = free[: len(new)]
            entries = np.stack([from_bf16_bits(b).reshape(self.entry_shape) for b in new])
            self._bank = self._write.run(
                {"bank": self._bank, "rows": np.asarray(rows, np.int64)[:, None], "entries": entries}, ("bank_out",))[0]
            self._rows.update({id(b): (row, b) for row, b in zip(rows, new)})
            self.uploads += len(new)
        index = np.array([0 if b is None else self._rows[id(b)][0] for b in slots], np.int64)
        return self._gather.run({"bank": self._bank, "index": index}, ("mem_feats",))[0]
