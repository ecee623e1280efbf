"""Sam2Server: the models, caches, single-flight embedding and bounded queue behind the HTTP routes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, TypeVar

import numpy as np

from ..errors import InputError, Sam2rtError
from ..runtime import Embedding, Prompt, Sam2Model
from .cache import ByteLRU, LogitsEntry, PromptSetKey, find_prior_logits
from .config import ServeConfig
from .encode import mask_to_polygons, mask_to_rle, to_npz
from .errors import ApiError
from .images import content_id, decode_image
from .metrics import Metrics
from .schemas import Sam2Prompt

log = logging.getLogger("sam2rt.serve")
T = TypeVar("T")
EmbKey = tuple[str, str]  # (sam2_version_id, image_id)


# hiera's three feature maps in float32 (the same for every variant): image_embed, high_res_feats_0/1
EMBEDDING_BYTES_FP32 = 4 * (256 * 64 * 64 + 32 * 256 * 256 + 64 * 128 * 128)


def embedding_bytes(emb: Embedding) -> int:
    """Bytes an embedding holds, for the cache bound; device buffers that report no size count as fp32."""
    return emb.nbytes or EMBEDDING_BYTES_FP32


def prompt_set_key(prompts: list[Sam2Prompt]) -> PromptSetKey:
    """A hashable identity of a request's prompts (boxes exactly, points as a set), for the logits cache."""
    return tuple(
        (p.box.xyxy() if p.box else None, frozenset((pt.x, pt.y, pt.positive) for pt in p.points or []))
        for p in prompts
    )


def to_runtime_prompt(p: Sam2Prompt, mask_input: np.ndarray | None) -> Prompt:
    """A wire prompt -> sam2rt's Prompt (box corners from the centre; positive -> label 1)."""
    pts = labels = None
    if p.points:
        pts = np.array([[pt.x, pt.y] for pt in p.points], dtype=np.float64)
        labels = np.array([1.0 if pt.positive else 0.0 for pt in p.points])
    box = np.array(p.box.xyxy(), dtype=np.float64) if p.box else None
    return Prompt(pts, labels, box, mask_input)


class Sam2Server:
    """State shared by all requests of one server process. Async methods run on the event loop;
    inference runs in thread pools (one encoder worker, `decode_workers` for decoding and images)."""

    def __init__(self, cfg: ServeConfig, models: dict[str, Sam2Model] | None = None) -> None:
        self.cfg = cfg
        self.uuid = str(uuid.uuid4())
        self.metrics = Metrics()
        self.models: dict[str, Sam2Model] = dict(models or {})
        self.model_dirs: dict[str, str] = {}
        self.ready = models is not None
        self.load_error: str | None = None
        self.embeddings: ByteLRU[EmbKey, Embedding] = ByteLRU(cfg.cache_bytes, embedding_bytes)
        self.logits: ByteLRU[tuple[str, str, PromptSetKey], LogitsEntry] = ByteLRU(cfg.logits_cache_bytes, lambda e: e.nbytes)
        self.inflight: dict[EmbKey, asyncio.Future[Embedding]] = {}
        self.encode_pool = ThreadPoolExecutor(1, thread_name_prefix="sam2rt-encode")
        self.work_pool = ThreadPoolExecutor(max(1, cfg.decode_workers), thread_name_prefix="sam2rt-work")
        self.active = 0
        self.metrics.cache_max_bytes.set(cfg.cache_bytes)

    # --- lifecycle ------------------------------------------------------------------------
    def load_models(self) -> None:
        """Load every --model-dir (blocking); each is served under its manifest's serve_id."""
        for d in self.cfg.model_dirs:
            model = Sam2Model.from_dir(d, backend=self.cfg.backend, threads=self.cfg.threads)
            vid = str(model.manifest.model["serve_id"])
            if vid in self.models:
                raise Sam2rtError(f"two --model-dir hold {vid} ({self.model_dirs[vid]} and {d}); serve one per version")
            self.models[vid] = model
            self.model_dirs[vid] = str(d)
            log.info("loaded %s from %s on %s (%s)", vid, d, model.backend_name, model.manifest.describe_weights())
        self.ready = True

    async def load_in_background(self, on_error: Callable[[str], None] | None = None) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.load_models)
        except Exception as exc:  # reported on /readiness and by the CLI
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model loading failed: %s", self.load_error)
            if on_error is not None:
                on_error(self.load_error)

    def close(self) -> None:
        self.encode_pool.shutdown(wait=False, cancel_futures=True)
        self.work_pool.shutdown(wait=False, cancel_futures=True)

    # --- helpers ----------------------------------------------------------------------------
    async def run(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Admit a /sam2 request, or answer 503 + Retry-After when --max-queue requests are already in."""
        retry = {"Retry-After": str(self.cfg.retry_after_s)}
        if not self.ready:
            raise ApiError(503, "the server is still loading its models; retry shortly" if self.load_error is None
                           else f"model loading failed: {self.load_error}", headers=retry)
        if self.active >= self.cfg.max_queue:
            self.metrics.rejected.inc()
            raise ApiError(503, f"server busy: {self.active} requests already queued (limit --max-queue "
                                f"{self.cfg.max_queue}); retry after {self.cfg.retry_after_s} s", headers=retry)
        self.active += 1
        self.metrics.queue.set(self.active)
        try:
            yield
        finally:
            self.active -= 1
            self.metrics.queue.set(self.active)

    def model_for(self, version_id: str) -> Sam2Model:
        model = self.models.get(version_id)
        if model is None:
            loaded = ", ".join(sorted(self.models)) or "none"
            raise ApiError(404, f"sam2_version_id {version_id!r} is not loaded on this server; loaded: {loaded} "
                                "(start `sam2rt serve` with a --model-dir exported for it)")
        return model

    def refresh_gauges(self) -> None:
        m = self.metrics
        m.cache_bytes.set(self.embeddings.nbytes)
        m.cache_entries.set(len(self.embeddings))
        m.cache_evictions.set(self.embeddings.evictions)
        m.logits_bytes.set(self.logits.nbytes)
        m.queue.set(self.active)

    # --- embeddings: cache + single flight -------------------------------------------------------
    def _embed(self, model: Sam2Model, version_id: str, rgb: np.ndarray) -> Embedding:
        t0 = time.perf_counter()
        emb = model.embed(rgb)
        self.metrics.embed_seconds.labels(version_id).observe(time.perf_counter() - t0)
        self.metrics.embeddings.labels(version_id).inc()
        return emb

    async def embedding(self, version_id: str, image: Any, image_id: str | None) -> tuple[Embedding, str]:
        """The embedding for (version, image_id): from the cache, from a computation already in flight
        for the same key (one encoder run per burst), or computed now and cached. Without an image_id
        the key is the content hash of the decoded pixels."""
        model = self.model_for(version_id)
        rgb = None
        if image_id is None:
            if image is None:
                raise ApiError(422, "give `image` (or the `image_id` of an embedding cached by an earlier request)")
            rgb = await self.run(self.work_pool, decode_image, image, self.cfg)
            image_id = content_id(rgb)
        key = (version_id, image_id)
        while True:
            emb = self.embeddings.get(key)
            if emb is not None:
                self.metrics.cache_hits.inc()
                return emb, image_id
            fut = self.inflight.get(key)
            if fut is not None:
                self.metrics.cache_joins.inc()
                try:
                    return await asyncio.shield(fut), image_id
                except asyncio.CancelledError:
                    if fut.cancelled():
                        continue  # the computing request went away: try again (maybe computing it here)
                    raise
                except Exception:
                    continue  # its image failed; ours may not: try again
            self.metrics.cache_misses.inc()
            if image is None:
                raise ApiError(404, f"image_id {image_id!r} is not cached for {version_id} (never embedded, or "
                                    "evicted); send the image with it")
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception never retrieved"
            self.inflight[key] = fut
            try:
                if rgb is None:
                    rgb = await self.run(self.work_pool, decode_image, image, self.cfg)
                emb = await self.run(self.encode_pool, self._embed, model, version_id, rgb)
                self.embeddings.put(key, emb)
                fut.set_result(emb)
                return emb, image_id
            except Exception as exc:
                fut.set_exception(exc)
                raise
            except BaseException:
                fut.cancel()
                raise
            finally:
                if self.inflight.get(key) is fut:
                    del self.inflight[key]

    # --- decoding -------------------------------------------------------------------------------
    def decode(
        self, version_id: str, emb: Embedding, prompts: list[Prompt], multimask: bool, fmt: str
    ) -> tuple[list[dict[str, Any]] | bytes, np.ndarray]:
        """Decode (in a worker thread) and encode the answer; returns (predictions or npz bytes, low-res logits)."""
        model = self.models[version_id]
        for i, p in enumerate(prompts):
            try:
                p.checked(emb.original_size)
            except InputError as exc:
                h, w = emb.original_size
                raise ApiError(400, f"prompts[{i}]: {exc} (image is {w}x{h})") from None
        h, w = emb.original_size
        if fmt == "binary" and len(prompts) * h * w * 4 > self.cfg.max_binary_bytes:
            raise ApiError(413, f"the binary answer ({len(prompts)} x {h} x {w} float32 logits) would be over "
                                f"{self.cfg.max_binary_bytes >> 20} MB; use format 'rle', or fewer prompts per request")
        # decode in chunks so that the full-size logits of many prompts on a large image stay within a budget
        # (each prompt's result equals decoding it alone, so chunking changes no result)
        chunk = max(1, self.cfg.upsample_budget_bytes // ((3 if multimask else 1) * h * w * 4))
        t0 = time.perf_counter()
        preds: list[dict[str, Any]] = []
        logit_parts, low_parts = [], []
        for start in range(0, len(prompts), chunk):
            out = model.decode(emb, prompts[start:start + chunk], multimask_output=multimask, return_logits=True).best()
            logits, scores, low_res = out.masks[:, 0], out.scores[:, 0], out.low_res_logits[:, 0]
            low_parts.append(low_res)
            if fmt == "binary":
                logit_parts.append(logits)
                continue
            masks = logits > model.mask_threshold
            if fmt == "rle":
                preds += [{"masks": mask_to_rle(m), "confidence": float(s), "format": "rle"} for m, s in zip(masks, scores)]
            else:
                preds += [{"masks": mask_to_polygons(m), "confidence": float(s), "format": "polygon"}
                          for m, s in zip(masks, scores)]
        low_res = np.concatenate(low_parts)
        result: list[dict[str, Any]] | bytes = to_npz(np.concatenate(logit_parts), low_res) if fmt == "binary" else preds
        self.metrics.decode_seconds.labels(version_id).observe(time.perf_counter() - t0)
        return result, np.ascontiguousarray(low_res, dtype=np.float32)

    def prior_logits(self, version_id: str, image_id: str, current: PromptSetKey) -> dict[int, np.ndarray]:
        entries = [e for (v, i, _), e in self.logits.items_newest_first() if v == version_id and i == image_id]
        found = find_prior_logits(entries, current)
        (self.metrics.logits_hits if found else self.metrics.logits_misses).inc()
        return found

    def save_logits(self, version_id: str, image_id: str, current: PromptSetKey, low_res: np.ndarray) -> None:
        self.logits.put((version_id, image_id, current), LogitsEntry(current, low_res))

