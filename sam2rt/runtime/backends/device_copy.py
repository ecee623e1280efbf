"""Device-to-device copies of float32 tensors through ONNX Runtime, up to four in one run.

Why several per run: ONNX Runtime has no copy call of its own for device tensors that works with every provider, so
a copy is a run of a shipped Identity graph (export/device_graphs.py: `copy.onnx`, `copy_2.onnx` .. `copy_4.onnx`).
Each run costs host time whatever it moves (an IO binding, a launch, and the wait for the session's stream): on the
2-core Xeon of benchmarks/README.md ~0.15-0.25 ms, about what a tracked frame's tensors take to copy on a GPU. A
fixed-buffer session (fixed_shapes.py) copies its device inputs in and its device outputs out on every replay: the
tracking decoder three inputs, the encoder three outputs; one run per group instead of one per tensor.

Contract: `into(pairs)` writes each source's values into its destination (same shape; the destination is a buffer
someone else owns, e.g. a fixed session's input) and returns when they are there; `out(values)` returns a new
OrtValue per source, a copy on the same device that no later run overwrites. Sources are OrtValues, OrtDeviceTensors
or CUDA device arrays with a `ptr` (the TensorRT backend's features), all float32.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .bound_session import BoundSession
from .onnxruntime_backend import OrtDeviceTensor

MAX_COPIES_PER_GRAPH = 4  # the widest copy graph shipped (copy_4.onnx)


def copy_graph_name(count: int) -> str:
    """The shipped graph (its file's stem) that copies `count` tensors in one run."""
    return "copy" if count == 1 else f"copy_{count}"


def copy_names(count: int) -> list[tuple[str, str]]:
    """(input, output) names of the copy graph of `count` tensors: x -> y for one, x0 -> y0, x1 -> y1, ... for more."""
    return [("x", "y")] if count == 1 else [(f"x{i}", f"y{i}") for i in range(count)]


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i:i + MAX_COPIES_PER_GRAPH] for i in range(0, len(items), MAX_COPIES_PER_GRAPH)]


class DeviceCopier:
    """Copies on one device (module docstring). `session(name)` makes the ONNX Runtime session of the shipped copy
    graph `name` ("copy", "copy_2", ...) on that device; each is made on first use and kept."""

    def __init__(self, session: Callable[[str], Any]) -> None:
        self._make = session
        self._sessions: dict[int, BoundSession] = {}
        self.runs = 0  # ONNX Runtime runs made (tests read it)

    def _session(self, count: int) -> BoundSession:
        s = self._sessions.get(count)
        if s is None:
            s = self._sessions[count] = BoundSession(self._make(copy_graph_name(count)))
        return s

    @property
    def device(self) -> str:
        return self._session(1).device

    @staticmethod
    def _source(value: Any) -> Any:
        return value if not hasattr(value, "data_ptr") or isinstance(value, OrtDeviceTensor) else OrtDeviceTensor(value)

    def into(self, pairs: Sequence[tuple[Any, Any]]) -> None:
        """Copy each (source, destination OrtValue) pair: one run per MAX_COPIES_PER_GRAPH pairs."""
        for chunk in _chunks(list(pairs)):
            names = copy_names(len(chunk))
            self._session(len(chunk)).run_into({x: self._source(src) for (x, _), (src, _) in zip(names, chunk)},
                                               {y: dst for (_, y), (_, dst) in zip(names, chunk)})
            self.runs += 1

    def out(self, values: Sequence[Any]) -> list[Any]:
        """New OrtValues on the device, copies of `values` in order: one run per MAX_COPIES_PER_GRAPH values."""
        result: list[Any] = []
        for chunk in _chunks(list(values)):
            names = copy_names(len(chunk))
            outputs = tuple(y for _, y in names)
            copies = self._session(len(chunk)).run({x: self._source(v) for (x, _), v in zip(names, chunk)},
                                                   device_outputs=outputs, outputs=outputs)
            result.extend(c.value for c in copies)
            self.runs += 1
        return result
