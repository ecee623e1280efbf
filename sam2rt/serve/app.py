"""The FastAPI application: Roboflow-compatible /sam2 routes, service endpoints, errors as `{"message"}`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from typing import Any, AsyncIterator, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import InputError
from .config import MB, ServeConfig
from .encode import FORMATS
from .errors import ApiError
from .metrics import CONTENT_TYPE
from .schemas import EmbedRequest, SegmentRequest, parse_json_body, parse_mask_input, parse_model, parse_prompts
from .state import Sam2Server, prompt_set_key, to_runtime_prompt

log = logging.getLogger("sam2rt.serve")
ROUTES = ("/sam2/embed_image", "/sam2/segment_image", "/info", "/healthz", "/readiness", "/", "/metrics")


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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) bodies over `limit` bytes without buffering them whole."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"request body is over this server's limit of {limit / MB:g} MB; send a smaller image "
                            "(SAM 2 works at 1024x1024) or start the server with a larger --max-body-mb")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_big
        except ValueError:
            raise ApiError(400, f"invalid Content-Length header {declared[:40]!r}") from None
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


def _presented_key(request: Request, body: dict[str, Any] | None) -> str | None:
    """The API key as the reference resolves it: query `api_key` > `Authorization: Bearer` > body `api_key`."""
    key = request.query_params.get("api_key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    if body is not None and isinstance(body.get("api_key"), str) and body["api_key"]:
        return body["api_key"]
    return None


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

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"message": "internal server error (details are in the server log)"}, status_code=500)

    # --- auth --------------------------------------------------------------------------------------------
    def check_key(request: Request, body: dict[str, Any] | None) -> None:
        if cfg.api_key is None:
            return
        key = _presented_key(request, body)
        if key is None or not hmac.compare_digest(key.encode(), cfg.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: pass it as ?api_key=KEY, an `Authorization: Bearer KEY` "
                                "header, or the body's api_key field")

    async def read_request(request: Request) -> dict[str, Any]:
        if cfg.api_key is not None and _presented_key(request, None) is not None:
            check_key(request, None)  # refuse a wrong query/header key before reading the body
        data = parse_json_body(await read_body(request, cfg.max_body_bytes))
        check_key(request, data)
        return data

    # --- the SAM 2 routes ----------------------------------------------------------------------------------
    @app.post("/sam2/embed_image")
    async def embed_image(request: Request) -> Response:
        """Embed an image (or find it cached) and return the image_id to reuse it with."""
        t0 = time.perf_counter()
        async with srv.admit():
            req: EmbedRequest = parse_model(EmbedRequest, await read_request(request))
            _, image_id = await srv.embedding(req.sam2_version_id, req.image, req.image_id)
            return JSONResponse({"image_id": image_id, "time": time.perf_counter() - t0})

    @app.post("/sam2/segment_image")
    async def segment_image(request: Request) -> Response:
        """Segment with point/box prompts: one prediction (the highest-IoU mask) per prompt, in order."""
        t0 = time.perf_counter()
        async with srv.admit():
            req: SegmentRequest = parse_model(SegmentRequest, await read_request(request))
            if req.format not in FORMATS:
                raise ApiError(400, f"format must be one of {', '.join(FORMATS)} (json: polygons, rle: COCO RLE, "
                                    f"binary: an npz file), got {req.format!r}")
            prompts = parse_prompts(req.prompts)
            if len(prompts) > cfg.max_prompts:
                raise ApiError(400, f"{len(prompts)} prompts in one request; this server takes at most "
                                    f"{cfg.max_prompts}: split them over several requests with the same image_id")
            for i, p in enumerate(prompts):
                if p.points and len(p.points) > cfg.max_points_per_prompt:
                    raise ApiError(400, f"prompts[{i}] has {len(p.points)} points; this server takes at most "
                                        f"{cfg.max_points_per_prompt} per prompt")
            srv.model_for(req.sam2_version_id)
            mask_inputs: list[np.ndarray | None] = [None] * len(prompts)
            if req.mask_input is not None:
                mask_inputs = list(parse_mask_input(req.mask_input, req.mask_input_format, len(prompts)))
            emb, image_id = await srv.embedding(req.sam2_version_id, req.image, req.image_id)
            current = prompt_set_key(prompts)
            if req.load_logits_from_cache and req.mask_input is None:
                for j, logits in srv.prior_logits(req.sam2_version_id, image_id, current).items():
                    mask_inputs[j] = logits[None]
            rt_prompts = [to_runtime_prompt(p, m) for p, m in zip(prompts, mask_inputs)]
            result, low_res = await srv.run(srv.work_pool, srv.decode, req.sam2_version_id, emb, rt_prompts,
                                            req.multimask_output, req.format)
            if req.save_logits_to_cache:
                srv.save_logits(req.sam2_version_id, image_id, current, low_res)
            if isinstance(result, bytes):
                return Response(result, media_type="application/octet-stream")
            return JSONResponse({"predictions": result, "time": time.perf_counter() - t0})

    # --- service endpoints -------------------------------------------------------------------------------
    @app.get("/info")
    async def info() -> dict[str, Any]:
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
    async def metrics() -> Response:
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
