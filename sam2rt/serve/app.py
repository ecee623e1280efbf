"""The FastAPI application: Roboflow-compatible /sam2 routes, service endpoints, errors as `{"message"}`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import InputError
from .admission import ClientGone, client_address, header_key, read_body, until_disconnect
from .answers import check_answer_size, stream_npz, working_bytes, iter_decoded
from .config import ServeConfig
from .encode import FORMATS
from .errors import ApiError
from .keys import UNAUTHORIZED_HELP
from .metrics import CONTENT_TYPE
from .schemas import (EmbedRequest, SegmentRequest, max_json_values, parse_json_body, parse_mask_input,
                      parse_model, parse_prompts)
from .state import Sam2Server, check_prompts_inside, prompt_set_key, to_runtime_prompt

log = logging.getLogger("sam2rt.serve")
ROUTES = ("/sam2/embed_image", "/sam2/segment_image", "/info", "/healthz", "/readiness", "/", "/metrics")


def hold_until_sent(response: Response, release: Callable[[], None]) -> Response:
    """`response`, with `release` run (once, on the event loop) when it is done with: at once for a plain response;
    for a streamed one when its body ends (sent, failed, or the client left) or when it is dropped unsent (an async
    generator never started does not run its `finally`). What a streamed answer holds (its admission slot, its
    memory reservation) is held while it is produced, not only until its headers are returned."""
    if not isinstance(response, StreamingResponse):
        release()
        return response
    loop = asyncio.get_running_loop()
    released = [False]

    def once() -> None:
        if not released[0]:
            released[0] = True
            release()

    body = response.body_iterator

    async def guarded() -> AsyncIterator[Any]:
        try:
            async for piece in body:
                yield piece
        finally:
            once()

    gen = guarded()
    weakref.finalize(gen, lambda: loop.is_closed() or loop.call_soon_threadsafe(once))
    response.body_iterator = gen
    return response


class _MetricsMiddleware:
    """Counts every HTTP request by path and status and times it (pure ASGI, no body buffering)."""

    def __init__(self, app: ASGIApp, server: Sam2Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in ROUTES else "other"
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            m = self.server.metrics
            m.requests.labels(path, str(status[0])).inc()
            m.request_seconds.labels(path).observe(time.perf_counter() - t0)


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON parse, in a parse pool off the event loop (read_body has applied the size caps)."""
    return parse_json_body(body)


def create_app(cfg: ServeConfig, server: Sam2Server | None = None,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """Build the app. Without a ready `server`, models load in the background (/readiness says when)."""
    srv = server or Sam2Server(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None if srv.ready else asyncio.create_task(srv.load_in_background(on_load_error))
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
            srv.close()

    app = FastAPI(title="sam2rt", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sam2 = srv
    app.add_middleware(_MetricsMiddleware, server=srv)

    # --- errors: always {"message": ...}, never a traceback ----------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"message": str(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = str(exc.detail)
        if exc.status_code == 404:
            msg = f"no route {request.url.path}; the SAM 2 routes are POST /sam2/embed_image and POST /sam2/segment_image"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse({"message": msg}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        srv.metrics.client_gone.inc()
        return Response(status_code=499)  # nobody reads it; recorded as 499 (client closed request)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"message": "internal server error (details are in the server log)"}, status_code=500)

    # --- admission: key, slot, body, then the work (cancelled if the client leaves) ---------------------
    max_values = max_json_values(cfg.max_prompts, cfg.max_points_per_prompt)
    Route = Callable[[str, dict[str, Any]], Awaitable[Response]]

    def unauthorized() -> ApiError:
        return ApiError(401, UNAUTHORIZED_HELP)

    async def admit(request: Request, route: Route) -> Response:
        """Run `route(namespace, body)` for a /sam2 request once it is admitted (see admission.py)."""
        srv.check_ready()
        address = client_address(request)
        key = header_key(request)
        if key is not None or not srv.keys.required:
            ns = srv.keys.namespace(key)
            if ns is None:
                raise unauthorized()  # before a slot is taken or a byte of the body is read
            slot = contextlib.ExitStack()
            slot.enter_context(srv.limits.slot(ns, address, keyed=srv.keys.required))
            try:
                body, _ = await read_body(request, cfg, authenticated=True, max_values=max_values)
                data = await srv.run(srv.parse_pool, parse_body, body)
                del body
                response = await until_disconnect(request, route(ns, data))
            except BaseException:
                slot.close()
                raise
            return hold_until_sent(response, slot.close)  # a streamed answer keeps its slot until it ends
        # the key can only be in the body (inference-sdk): read it apart, under the unauthenticated budget
        body, counted = await read_body(request, cfg, authenticated=False, max_values=max_values, unauth=srv.unauth)
        try:
            data = await srv.run(srv.unauth_parse_pool, parse_body, body)
        finally:
            srv.unauth.used -= counted
            del body
        ns = srv.keys.namespace(data.get("api_key") if isinstance(data.get("api_key"), str) else None)
        if ns is None:
            raise unauthorized()
        slot = contextlib.ExitStack()
        slot.enter_context(srv.limits.slot(ns, address, keyed=True))
        try:
            response = await until_disconnect(request, route(ns, data))
        except BaseException:
            slot.close()
            raise
        return hold_until_sent(response, slot.close)

    def authorized(request: Request) -> bool:
        return not srv.keys.required or srv.keys.namespace(header_key(request)) is not None

    # --- the SAM 2 routes ----------------------------------------------------------------------------------
    async def embed_route(ns: str, data: dict[str, Any]) -> Response:
        t0 = time.perf_counter()
        req: EmbedRequest = parse_model(EmbedRequest, data)
        _, image_id, _ = await srv.embedding(ns, req.sam2_version_id, req.image, req.image_id)
        return JSONResponse({"image_id": image_id, "time": time.perf_counter() - t0})

    async def segment_route(ns: str, data: dict[str, Any]) -> Response:
        t0 = time.perf_counter()
        req: SegmentRequest = parse_model(SegmentRequest, data)
        if req.format not in FORMATS:
            raise ApiError(400, f"format must be one of {', '.join(FORMATS)} (json: polygons, rle: COCO RLE, "
                                f"binary: an npz file), got {req.format!r}")
        prompts = parse_prompts(req.prompts, cfg.max_prompts, cfg.max_points_per_prompt)
        vid = req.sam2_version_id
        model = srv.model_for(vid)
        mask_inputs: list[np.ndarray | None] = [None] * len(prompts)
        if req.mask_input is not None:
            mask_inputs = list(parse_mask_input(req.mask_input, req.mask_input_format, len(prompts)))
        rt_prompts = [to_runtime_prompt(p, m) for p, m in zip(prompts, mask_inputs)]
        multimask, fmt = req.multimask_output, req.format
        too_big = ("the answer needs more working memory than this server allows; use multimask_output=false, fewer "
                   "prompts per request, format 'rle', or a smaller image")

        def check_size(hw: tuple[int, int]) -> None:
            """Everything that depends only on the image's size, before any embedding is computed."""
            check_prompts_inside(rt_prompts, hw)
            check_answer_size(len(prompts), hw, fmt, cfg)
            if working_bytes(hw, cfg, rt_prompts, multimask) > srv.memory.total:
                raise ApiError(413, too_big)

        emb, _, cid = await srv.embedding(ns, vid, req.image, req.image_id, check_size)
        current = prompt_set_key(prompts)
        if req.load_logits_from_cache and req.mask_input is None:
            prior = srv.prior_logits(ns, vid, cid, current)
            if prior:
                rt_prompts = [to_runtime_prompt(p, prior[j][None] if j in prior else None) for j, p in enumerate(prompts)]
        cost = working_bytes(emb.original_size, cfg, rt_prompts, multimask)

        def keep_logits(low_res: np.ndarray) -> None:
            if req.save_logits_to_cache:
                srv.save_logits(ns, vid, cid, current, low_res)

        if fmt == "binary":
            held = await srv.memory.acquire(cost, too_big)  # before the headers: a 413 is still an answer
            released, started = [False], [False]

            def release() -> None:  # when the producer ends (stream_npz's on_done), or below if it never started
                if not released[0]:
                    released[0] = True
                    srv.memory.release(held)

            async def npz() -> AsyncIterator[bytes]:
                started[0] = True
                pieces = iter_decoded(model, emb, rt_prompts, multimask, cfg)
                async for piece in stream_npz(srv.work_pool, len(rt_prompts), emb.original_size, pieces, keep_logits,
                                              release):
                    yield piece

            body = npz()
            loop = asyncio.get_running_loop()
            weakref.finalize(body, lambda: started[0] or loop.is_closed() or loop.call_soon_threadsafe(release))
            return StreamingResponse(body, media_type="application/octet-stream")
        async with srv.memory.hold(cost, too_big):
            preds, low_res = await srv.run(srv.work_pool, srv.decode, vid, emb, rt_prompts, multimask, fmt)
        keep_logits(low_res)
        return JSONResponse({"predictions": preds, "time": time.perf_counter() - t0})

    @app.post("/sam2/embed_image")
    async def embed_image(request: Request) -> Response:
        """Embed an image (or find it cached) and return the image_id to reuse it with."""
        return await admit(request, embed_route)

    @app.post("/sam2/segment_image")
    async def segment_image(request: Request) -> Response:
        """Segment with point/box prompts: one prediction (the highest-IoU mask) per prompt, in order."""
        return await admit(request, segment_route)

    # --- service endpoints -------------------------------------------------------------------------------
    @app.get("/info")
    async def info(request: Request) -> dict[str, Any]:
        """Name, version, instance uuid and model ids for anyone; details (backends, weights) only with the key.
        The uuid (random per process) stays public because inference-sdk's get_server_info requires it."""
        if not authorized(request):
            return {"name": "sam2rt", "version": __version__, "uuid": srv.uuid, "models": sorted(srv.models)}
        models = [
            {
                "sam2_version_id": vid,
                "model_id": m.manifest.model.get("model_id"),
                "release": m.manifest.model.get("version"),
                "backend": m.backend_name,
                "random_weights": m.manifest.random_weights,
                "weights": m.manifest.describe_weights(),
            }
            for vid, m in sorted(srv.models.items())
        ]
        return {"name": "sam2rt", "version": __version__, "uuid": srv.uuid, "models": models}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "healthy"}

    @app.get("/readiness")
    async def readiness() -> JSONResponse:
        if srv.ready:
            return JSONResponse({"status": "ready"})
        if srv.load_error:
            return JSONResponse({"status": "failed", "message": srv.load_error}, status_code=503)
        return JSONResponse({"status": "loading", "message": "models are loading"}, status_code=503,
                            headers={"Retry-After": str(cfg.retry_after_s)})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not cfg.metrics_open and not authorized(request):
            raise ApiError(401, "/metrics needs the API key (?api_key=KEY or `Authorization: Bearer KEY`), or start "
                                "the server with --metrics-open for a scraper")
        return Response(srv.metrics.render(srv.refresh_gauges), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def landing() -> str:
        loaded = ", ".join(sorted(srv.models)) or "(loading)"
        return (
            "<!doctype html><html><head><title>sam2rt</title></head><body>"
            f"<h1>sam2rt {__version__}</h1><p>Roboflow-compatible SAM 2 server. Models: {loaded}.</p>"
            "<p>POST /sam2/embed_image, POST /sam2/segment_image; GET /info, /healthz, /readiness, /metrics.</p>"
            "</body></html>"
        )

    return app
