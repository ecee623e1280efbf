"""Admission: who may take a slot of the model queue, how bodies are read, and leaving on disconnect.

Order of a /sam2 request (app.py drives it):
1. A key in the query or the Authorization header is checked before anything else (401 at once).
   Such a request takes its queue slot (per-key, per-address and global limits) before its body is read.
2. A request with no such key (inference-sdk sends its key in the JSON body only) is read without a
   queue slot, with a short first deadline and a byte budget shared by all such requests, parsed in
   a small separate pool, and enters the queue only once the body's key is valid.
3. Bodies have mod_reqtimeout-style deadlines: an initial time, extended by one second per
   `body_min_rate` bytes received, never past `body_timeout_max_s` (a client sending 1 byte/s is cut
   off after the initial time, a large upload on a normal link is not).
4. Once the body is in, the work runs under `until_disconnect`: a client that disconnects cancels its
   request, which frees its slot and stops whatever it was waiting for (see state.py for the encoder).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any, Awaitable, TypeVar

from starlette.requests import Request

from .config import MB, ServeConfig
from .errors import ApiError
from .schemas import count_json_values, too_many_values

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


def header_key(request: Request) -> str | None:
    """The API key from the query (`api_key`) or `Authorization: Bearer`, in the reference's precedence."""
    key = request.query_params.get("api_key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    return None


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class InflightLimits:
    """Counts admitted requests: all of them (--max-queue, 503: the server is full) and per key and per
    client address (429: that client's own excess; it may retry after Retry-After)."""

    def __init__(self, cfg: ServeConfig, metrics: Any = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.active = 0
        self.per_key: collections.Counter[str] = collections.Counter()
        self.per_address: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def slot(self, namespace: str, address: str, keyed: bool) -> Any:
        cfg = self.cfg
        retry = {"Retry-After": str(cfg.retry_after_s)}
        over_key = keyed and self.per_key[namespace] >= cfg.max_inflight_per_key
        if (over_key or self.per_address[address] >= cfg.max_inflight_per_address) and self.metrics is not None:
            self.metrics.throttled.inc()
        elif self.active >= cfg.max_queue and self.metrics is not None:
            self.metrics.rejected.inc()
        if over_key:
            raise ApiError(429, f"too many requests in flight with this API key ({self.per_key[namespace]}, limit "
                                f"--max-inflight-per-key {cfg.max_inflight_per_key}); wait for answers before "
                                f"sending more, or retry after {cfg.retry_after_s} s", headers=retry)
        if self.per_address[address] >= cfg.max_inflight_per_address:
            raise ApiError(429, f"too many requests in flight from this address ({self.per_address[address]}, limit "
                                f"--max-inflight-per-address {cfg.max_inflight_per_address}); wait for answers "
                                f"before sending more, or retry after {cfg.retry_after_s} s", headers=retry)
        if self.active >= cfg.max_queue:
            raise ApiError(503, f"server busy: {self.active} requests already queued (limit --max-queue "
                                f"{cfg.max_queue}); retry after {cfg.retry_after_s} s", headers=retry)
        self.active += 1
        self.per_key[namespace] += 1
        self.per_address[address] += 1
        try:
            yield
        finally:
            self.active -= 1
            for counter, k in ((self.per_key, namespace), (self.per_address, address)):
                counter[k] -= 1
                if counter[k] <= 0:
                    del counter[k]


class ByteBudget:
    """Bytes buffered by requests not yet authenticated (event-loop only)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0


def _too_big(limit: int) -> ApiError:
    return ApiError(413, f"request body is over this server's limit of {limit / MB:g} MB; send a smaller image "
                         "(SAM 2 works at 1024x1024) or start the server with a larger --max-body-mb")


async def read_body(request: Request, cfg: ServeConfig, *, authenticated: bool, max_values: int,
                    unauth: ByteBudget | None = None) -> tuple[bytes, int]:
    """The request body, refusing bodies over --max-body-mb (413, without buffering them), bodies with more
    JSON values than any valid request (413 as soon as the count passes `max_values`, see
    schemas.check_structure) and bodies that miss their deadline (408). Unauthenticated bytes are counted
    in `unauth` (503 when it is full); returns (body, bytes counted there), which the caller gives back
    once the body's key is checked."""
    limit = cfg.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_big(limit)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length header {declared[:40]!r}") from None
    initial = cfg.body_timeout_s if authenticated else cfg.unauth_body_timeout_s
    start = time.monotonic()
    chunks: list[bytes] = []
    size = counted = values = 0
    try:
        while True:
            deadline = start + min(initial + size / cfg.body_min_rate, cfg.body_timeout_max_s)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await request.receive()
            except TimeoutError:
                raise ApiError(408, f"the request body did not arrive in time ({size} bytes in "
                                    f"{time.monotonic() - start:.1f} s; bodies get {initial:g} s plus one second "
                                    f"per {cfg.body_min_rate // 1024} KiB received); send the whole body at once",
                               headers={"Connection": "close"}) from None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_big(limit)
            values += count_json_values(chunk)
            if values > max_values:
                raise too_many_values(values, max_values)  # before the rest is even received
            if unauth is not None and chunk:
                if unauth.used + len(chunk) > unauth.total:
                    raise ApiError(503, "server busy reading other uploads that carry no Authorization header; "
                                        f"retry after {cfg.retry_after_s} s, or send the key as "
                                        "`Authorization: Bearer KEY`", headers={"Retry-After": str(cfg.retry_after_s)})
                unauth.used += len(chunk)
                counted += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), counted
    except BaseException:
        if unauth is not None:
            unauth.used -= counted
        raise


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then raises ClientGone).

    Call only once the body has been read: from then on the only message the server can receive for
    this request is the disconnect."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()
