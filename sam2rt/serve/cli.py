"""`sam2rt serve`: arguments and entry point (fastapi/uvicorn are imported only when it runs)."""

from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from ..errors import Sam2rtError
from ..model_specs import canonical_serve_id


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the serve options on `p`."""
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
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require a key (?api_key=, Bearer, or body api_key); repeat for several keys, each its own "
                   "cache namespace; default $SAM2RT_API_KEY")
    p.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help="more keys, one per line (# comments); each key is its own cache namespace")
    p.add_argument("--metrics-open", action="store_true",
                   help="serve /metrics without the key (for a scraper); by default it needs the key when one is set")
    p.add_argument("--allow-url-images", action="store_true",
                   help="accept {\"type\": \"url\"} images (the server fetches them; off by default)")
    p.add_argument("--max-body-mb", type=float, default=32, help="largest request body in MB (default 32)")
    p.add_argument("--max-image-pixels", type=int, default=25_000_000,
                   help="largest decoded image in pixels (default 25e6); larger ones get 413")
    p.add_argument("--max-queue", type=int, default=64,
                   help="authenticated /sam2 requests admitted at once; more get 503 with Retry-After (default 64)")
    p.add_argument("--max-inflight-per-key", type=int, default=48,
                   help="requests in flight per API key; more get 429 with Retry-After (default 48)")
    p.add_argument("--max-inflight-per-address", type=int, default=64,
                   help="requests in flight per client address; more get 429 with Retry-After (default 64)")
    p.add_argument("--max-answer-pixels", type=int, default=100_000_000,
                   help="masks returned x image pixels that one answer may carry; 413 above (default 1e8)")
    p.add_argument("--memory-budget-mb", type=float, default=1536,
                   help="working memory that large images and answers may reserve at once; requests wait for it, "
                   "and one that alone needs more gets 413 (default 1536)")
    p.add_argument("--header-timeout-s", type=float, default=10, help="deadline for a request's headers (default 10)")
    p.add_argument("--body-timeout-s", type=float, default=10,
                   help="first deadline for a body sent with a header/query key, extended by 1 s per 256 KiB "
                   "received, at most 60 s; 408 after it (default 10)")
    p.add_argument("--unauth-body-timeout-s", type=float, default=2,
                   help="the same for bodies with the key only inside (inference-sdk) or no key (default 2)")
    p.add_argument("--unauth-buffer-mb", type=float, default=256,
                   help="bytes buffered at once by bodies not yet authenticated; 503 beyond (default 256)")
    p.add_argument("--decode-workers", type=int, default=2, help="threads for decoding and image work (default 2)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _return_freed_memory() -> None:
    """Ask glibc to mmap large blocks, so evicted embeddings go back to the OS (keeps RSS near the bound)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (also turns off its dynamic growth)
    except (OSError, AttributeError):  # not glibc
        pass


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; Sam2rtError (exit status 2) with the reason when it cannot bind."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise Sam2rtError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart without waiting for TIME_WAIT
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise Sam2rtError(f"port {port} on {host} is already in use (another sam2rt serve or another program); "
                              "stop it, or pick another port with --port") from None
        raise Sam2rtError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    """Start the server; returns 2 if a model directory cannot be loaded."""
    from ..manifest import Manifest
    from .config import MB, ServeConfig

    for name, value in (("--cache-mb", args.cache_mb), ("--logits-cache-mb", args.logits_cache_mb)):
        if value < 0:
            raise Sam2rtError(f"{name} must be >= 0, got {value}")
    for name, value in (("--max-body-mb", args.max_body_mb), ("--max-image-pixels", args.max_image_pixels),
                        ("--max-queue", args.max_queue), ("--decode-workers", args.decode_workers),
                        ("--max-inflight-per-key", args.max_inflight_per_key),
                        ("--max-inflight-per-address", args.max_inflight_per_address),
                        ("--max-answer-pixels", args.max_answer_pixels), ("--memory-budget-mb", args.memory_budget_mb),
                        ("--header-timeout-s", args.header_timeout_s), ("--body-timeout-s", args.body_timeout_s),
                        ("--unauth-body-timeout-s", args.unauth_body_timeout_s),
                        ("--unauth-buffer-mb", args.unauth_buffer_mb)):
        if value <= 0:
            raise Sam2rtError(f"{name} must be > 0, got {value}")
    seen: dict[str, Path] = {}
    for d in args.model_dir:  # fail fast on a wrong directory, before binding the port
        vid = canonical_serve_id(str(Manifest.load(d).model.get("serve_id")))
        if vid in seen:
            raise Sam2rtError(f"--model-dir {seen[vid]} and {d} both hold {vid}; give one directory per version")
        seen[vid] = d
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise Sam2rtError(f"`sam2rt serve` needs the serve extra: pip install 'sam2rt[serve]' ({exc})") from None

    from .keys import KeyRing, read_key_file

    keys = list(args.api_key or ([os.environ["SAM2RT_API_KEY"]] if os.environ.get("SAM2RT_API_KEY") else []))
    if args.api_key_file is not None:
        keys += read_key_file(args.api_key_file)
    if any(not k for k in keys):
        raise Sam2rtError("--api-key must not be empty")
    KeyRing(keys)  # refuses duplicates
    cfg = ServeConfig(
        model_dirs=list(args.model_dir), host=args.host, port=args.port, backend=args.backend, threads=args.threads,
        cache_bytes=int(args.cache_mb * MB), logits_cache_bytes=int(args.logits_cache_mb * MB), api_keys=tuple(keys),
        metrics_open=args.metrics_open, allow_url_images=args.allow_url_images, max_body_bytes=int(args.max_body_mb * MB),
        max_image_pixels=args.max_image_pixels, max_queue=args.max_queue, decode_workers=args.decode_workers,
        max_inflight_per_key=args.max_inflight_per_key, max_inflight_per_address=args.max_inflight_per_address,
        max_answer_pixels=args.max_answer_pixels, memory_budget_bytes=int(args.memory_budget_mb * MB),
        header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s,
        unauth_body_timeout_s=args.unauth_body_timeout_s, unauth_buffer_bytes=int(args.unauth_buffer_mb * MB),
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        public = not ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        public = args.host != "localhost"
    if public and not cfg.api_keys:
        print(f"WARNING: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    _return_freed_memory()

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    from .protocol import with_header_timeout

    sock = bind_socket(args.host, args.port)  # before anything says "serving": a taken port fails here
    app = create_app(cfg, on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level == "debug",
        timeout_graceful_shutdown=5, http=with_header_timeout(cfg.header_timeout_s),
        timeout_keep_alive=int(max(1, cfg.keep_alive_s)), h11_max_incomplete_event_size=16 * 1024,
    ))
    key_note = f"{len(keys)} API key{'s' if len(keys) != 1 else ''}" if keys else "no API key"
    print(f"sam2rt serve: serving on http://{args.host}:{sock.getsockname()[1]} ({', '.join(seen)}; "
          f"cache {args.cache_mb:g} MB, {key_note})", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if failure:
        raise Sam2rtError(f"could not load the models: {failure[0]}")
    return 0
