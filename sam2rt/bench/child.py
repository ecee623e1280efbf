"""One fresh process for the cold-start and peak-memory figures: import, load hiera_tiny, answer one prompt.

    python -m sam2rt.bench.child sam2rt --model-dir DIR --threads 2
    python -m sam2rt.bench.child reference --config configs/sam2.1/sam2.1_hiera_t.yaml --checkpoint CKPT --threads 2

Prints one JSON line: seconds for import, load and the first result (set_image + predict of one
point on a 640x480 image), the process's peak resident set size (ru_maxrss), and whether torch
was imported. The parent also times the whole process from spawn to exit.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

T_START = time.perf_counter()


def synthetic_image(h: int, w: int, seed: int = 0):
    """A deterministic photo-like RGB uint8 image: smooth colour gradients with a few solid shapes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([
        127 + 100 * np.sin(xx / (w / 3.0) + 0.5),
        127 + 100 * np.cos(yy / (h / 2.5)),
        127 + 80 * np.sin((xx + yy) / ((w + h) / 4.0)),
    ], axis=-1)
    for _ in range(6):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        r = int(rng.integers(min(h, w) // 12, min(h, w) // 4))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM).

    Not ru_maxrss: Linux carries the parent's high-water mark across fork + exec into it, so a child
    of a big benchmark process would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_sam2rt(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    import numpy as np

    from sam2rt.runtime import Predictor

    t1 = time.perf_counter()
    pred = Predictor.from_dir(args.model_dir, backend=args.backend, threads=args.threads)
    t2 = time.perf_counter()
    image = synthetic_image(480, 640)
    pred.set_image(image)
    masks, scores, _ = pred.predict(point_coords=np.array([[320.0, 240.0]]), point_labels=np.array([1]))
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "first_result_s": t3 - t2, "masks_shape": list(masks.shape)}


def run_reference(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    t1 = time.perf_counter()
    torch.set_num_threads(args.threads)
    model = build_sam2(args.config, ckpt_path=args.checkpoint, device="cpu")
    pred = SAM2ImagePredictor(model)
    t2 = time.perf_counter()
    image = synthetic_image(480, 640)
    pred.set_image(image)
    masks, scores, _ = pred.predict(point_coords=np.array([[320.0, 240.0]]), point_labels=np.array([1]))
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "first_result_s": t3 - t2, "masks_shape": list(masks.shape)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sam2rt.bench.child")
    p.add_argument("impl", choices=("sam2rt", "reference"))
    p.add_argument("--model-dir")
    p.add_argument("--backend", default="onnxruntime-cpu")
    p.add_argument("--config")
    p.add_argument("--checkpoint")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)  # the random-weights warning is reported by the parent
    result = run_sam2rt(args) if args.impl == "sam2rt" else run_reference(args)
    result.update(
        impl=args.impl,
        in_process_total_s=time.perf_counter() - T_START,
        peak_rss_mib=peak_rss_mib(),
        torch_imported="torch" in sys.modules,
    )
    print("SAM2RT_BENCH_CHILD " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
