"""`sam2rt serve`: arguments and entry point (fastapi/uvicorn are imported only when it runs)."""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import logging
import os
import sys
from pathlib import Path

from ..errors import Sam2rtError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the serve options on `p`."""
    env_key = os.environ.get("SAM2RT_API_KEY") or None
    p.add_argument("--model-dir", type=Path, action="append", required=True, metavar="DIR",
                   help="an exported model directory; repeat to serve several versions (one per sam2_version_id)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=9001, help="port (default 9001, as Roboflow Inference)")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime-cpu, onnxruntime-cuda, tensorrt, ...")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per model (default: all CPUs)")
    p.add_argument("--cache-mb", type=float, default=1024, help="embedding cache bound in MB (default 1024; "
                   "a hiera embedding is 38 MB on the CPU backend (16 MB of features + 22 MB of fast-decoder "
                   "tensors), 16 MB on GPU backends)")
    p.add_argument("--logits-cache-mb", type=float, default=64, help="logits cache bound in MB (default 64)")
    p.add_argument("--api-key", default=env_key, help="require this key (?api_key=, Bearer, or body api_key); "
                   "default $SAM2RT_API_KEY")
    p.add_argument("--allow-url-images", action="store_true",
                   help="accept {\"type\": \"url\"} images (the server fetches them; off by default)")
    p.add_argument("--max-body-mb", type=float, default=32, help="largest request body in MB (default 32)")
    p.add_argument("--max-image-pixels", type=int, default=25_000_000,
                   help="largest decoded image in pixels (default 25e6); larger ones get 413")
    p.add_argument("--max-queue", type=int, default=64,
                   help="/sam2 requests admitted at once; more get 503 with Retry-After (default 64)")
    p.add_argument("--decode-workers", type=int, default=2, help="threads for decoding and image work (default 2)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _return_freed_memory() -> None:
    """Ask glibc to mmap large blocks, so evicted embeddings go back to the OS (keeps RSS near the bound)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (also turns off its dynamic growth)
    except (OSError, AttributeError):  # not glibc
        pass


def run(args: argparse.Namespace) -> int:
    """Start the server; returns 2 if a model directory cannot be loaded."""
    from ..manifest import Manifest
    from .config import MB, ServeConfig

    for name, value in (("--cache-mb", args.cache_mb), ("--logits-cache-mb", args.logits_cache_mb)):
        if value < 0:
            raise Sam2rtError(f"{name} must be >= 0, got {value}")
    for name, value in (("--max-body-mb", args.max_body_mb), ("--max-image-pixels", args.max_image_pixels),
                        ("--max-queue", args.max_queue), ("--decode-workers", args.decode_workers)):
        if value <= 0:
            raise Sam2rtError(f"{name} must be > 0, got {value}")
    seen: dict[str, Path] = {}
    for d in args.model_dir:  # fail fast on a wrong directory, before binding the port
        vid = str(Manifest.load(d).model.get("serve_id"))
        if vid in seen:
            raise Sam2rtError(f"--model-dir {seen[vid]} and {d} both hold {vid}; give one directory per version")
        seen[vid] = d
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise Sam2rtError(f"`sam2rt serve` needs the serve extra: pip install 'sam2rt[serve]' ({exc})") from None

    cfg = ServeConfig(
        model_dirs=list(args.model_dir), host=args.host, port=args.port, backend=args.backend, threads=args.threads,
        cache_bytes=int(args.cache_mb * MB), logits_cache_bytes=int(args.logits_cache_mb * MB), api_key=args.api_key,
        allow_url_images=args.allow_url_images, max_body_bytes=int(args.max_body_mb * MB),
        max_image_pixels=args.max_image_pixels, max_queue=args.max_queue, decode_workers=args.decode_workers,
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        public = not ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        public = args.host != "localhost"
    if public and cfg.api_key is None:
        print(f"WARNING: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    _return_freed_memory()

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(cfg, on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=args.log_level == "debug", timeout_graceful_shutdown=5))
    print(f"sam2rt serve: {', '.join(seen)} on http://{args.host}:{args.port} "
          f"(cache {args.cache_mb:g} MB, api key {'on' if cfg.api_key else 'off'})", file=sys.stderr, flush=True)
    server.run()
    if failure:
        raise Sam2rtError(f"could not load the models: {failure[0]}")
    return 0
