"""The host's share of a decode on the device path: everything `Sam2Model.decode` does outside the graph run.

The merged decode graph's run (FixedShapeSession._run: inputs into their buffers, the replay, outputs out) is
replaced by its last outputs, so what is timed is the Python and numpy work around it: prompt checks, feeds,
signature look-ups, result arrays. On a GPU this is the `rest` of gpu_bench's decode_parts; here it runs on ONNX
Runtime's CPU provider with fixed buffers (the GPU's data flow), so it can be measured on any machine.

    python benchmarks/host_work.py MODEL_DIR     # an export with the cuda target (`--target cuda` or `all`)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args(argv)

    from sam2rt.bench.child import synthetic_image
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Prompt, Sam2Model
    from sam2rt.runtime.backends import fixed_shapes
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend

    m = Manifest.load(args.model_dir)
    model = Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=True))
    image = synthetic_image(512, 512)
    emb = model.embed(image)
    rng = np.random.default_rng(0)
    cases = {"one click (3 masks)": (Prompt(points=[[200, 200]], labels=[1]), True),
             "16 boxes (1 mask each)": ([Prompt(box=[x, y, x + 100, y + 120]) for x, y in rng.integers(0, 380, (16, 2))],
                                        False)}
    for prompts, multimask in cases.values():
        for _ in range(3):  # the shapes are captured (fixed buffers) and replayed
            model.decode(emb, prompts, multimask_output=multimask)
    run, last = fixed_shapes.FixedShapeSession._run, {}

    def stub(self, feeds, device_outputs, outputs):
        key = (self.name, tuple(sorted((k, fixed_shapes._shape(v)) for k, v in feeds.items())), outputs)
        if key not in last:
            last[key] = run(self, feeds, device_outputs, outputs)
        return last[key]

    fixed_shapes.FixedShapeSession._run = stub
    print(f"host work of Sam2Model.decode outside the graph run, median of 5 x {args.calls} calls "
          f"({platform.processor() or platform.machine()}, {Path(args.model_dir).name}):")
    for name, (prompts, multimask) in cases.items():
        rounds = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(args.calls):
                model.decode(emb, prompts, multimask_output=multimask)
            rounds.append((time.perf_counter() - t) / args.calls)
        print(f"- {name}: {1e3 * float(np.median(rounds)):.3f} ms")
    fixed_shapes.FixedShapeSession._run = run
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
