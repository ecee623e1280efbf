"""`sam2rt segment`: one image, point and box prompts, masks printed (or as JSON) and drawn."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .cli import parse_box, parse_point
from .errors import Sam2rtError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--point", type=parse_point, action="append", default=[], metavar="X,Y[,LABEL]",
                   help="a point prompt in pixels; LABEL 1 foreground (default) or 0 background; repeatable")
    p.add_argument("--box", type=parse_box, action="append", default=[], metavar="X0,Y0,X1,Y1",
                   help="a box prompt in pixels; several boxes segment several objects")
    p.add_argument("--out", type=Path, help="write an annotated PNG here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime-cpu, onnxruntime-cuda, tensorrt, ...")
    p.add_argument("--single-mask", action="store_true", help="multimask_output=False")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from .annotate import annotate, read_image, write_image
    from .runtime import Prompt, Sam2Model

    if not args.point and not args.box:
        raise Sam2rtError("give at least one --point X,Y[,LABEL] or --box X0,Y0,X1,Y1")
    pts = np.array([p[:2] for p in args.point], dtype=np.float64).reshape(-1, 2)
    labels = np.array([p[2] for p in args.point], dtype=np.float64)
    if args.box:
        prompts = [Prompt(pts if len(pts) else None, labels if len(pts) else None, np.array(b)) for b in args.box]
    else:
        prompts = [Prompt(pts, labels)]
    t0 = time.perf_counter()
    model = Sam2Model.from_dir(args.model_dir, backend=args.backend)
    t_load = time.perf_counter() - t0
    image = read_image(args.image)
    Sam2Model.check_prompts(prompts, image.shape[:2])  # a bad prompt fails here, not after the encoder
    t0 = time.perf_counter()
    emb = model.embed(image)
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = model.decode(emb, prompts, multimask_output=not args.single_mask).best()
    t_decode = time.perf_counter() - t0
    masks = result.masks[:, 0]
    timings = {"load_s": t_load, "embed_s": t_embed, "decode_s": t_decode}
    weights = model.manifest.describe_weights()
    if args.out:
        write_image(args.out, annotate(image, masks, points=args.point, boxes=args.box,
                                       random_weights=model.manifest.random_weights))
    if args.json:
        print(json.dumps({
            "model": model.manifest.model["model_id"], "weights": weights, "backend": model.backend_name,
            "image_size": list(emb.original_size), "timings": timings,
            "objects": [{"score": float(s), "area": int(m.sum())} for s, m in zip(result.scores[:, 0], masks)],
            "annotated": str(args.out) if args.out else None,
        }, indent=2))
    else:
        print(f"model {model.manifest.model['model_id']} on {model.backend_name}; weights: {weights}")
        print(f"load {t_load * 1e3:.0f} ms, embed {t_embed * 1e3:.0f} ms, decode {t_decode * 1e3:.1f} ms "
              f"({len(prompts)} prompt(s))")
        for i, (s, m) in enumerate(zip(result.scores[:, 0], masks)):
            print(f"object {i}: predicted IoU {s:.3f}, {int(m.sum())} pixels")
        if args.out:
            print(f"annotated image written to {args.out}")
    return 0
