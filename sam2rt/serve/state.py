"""Sam2Server: the models, caches, single-flight embedding and admission state behind the HTTP routes.

Caches are scoped by namespace (one per API key, see keys.py): every key below starts with it, so a
client never reads or overwrites what another key made. Embeddings are stored under content ids (a
keyed hash of the pixels, see ids.py); a client-chosen image_id is an alias to the content id of the
image it was first bound to, and is never rebound to a different image while that embedding lives.
A request that carries an image is always answered from that image's pixels.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import numpy as np

from ..errors import InputError, Sam2rtError
from ..model_specs import canonical_serve_id
from ..runtime import Embedding, Prompt, Sam2Model
from .admission import ByteBudget, InflightLimits
from .answers import iter_decoded
from .budget import MemoryBudget
from .cache import ByteLRU, LogitsEntry, PromptSetKey, find_prior_logits
from .config import MB, ServeConfig
from .encode import mask_to_polygons, mask_to_rle
from .errors import ApiError
from .ids import ContentIds, check_image_id, is_content_id
from .images import decode_probed, probe_image
from .keys import KeyRing
from .metrics import Metrics
from .schemas import Sam2Prompt

log = logging.getLogger("sam2rt.serve")
T = TypeVar("T")
EmbKey = tuple[str, str, str]  # (namespace, sam2_version_id, content id)
ALIAS_CACHE_BYTES = 16 * MB
SOURCE_CACHE_BYTES = 8 * MB
# working memory of decoding an image and running the encoder's preprocessing on it, per pixel
EMBED_BYTES_PER_PIXEL = 16

# hiera's three feature maps in float32 (the same for every variant): image_embed, high_res_feats_0/1
EMBEDDING_BYTES_FP32 = 4 * (256 * 64 * 64 + 32 * 256 * 256 + 64 * 128 * 128)


def embedding_bytes(emb: Embedding) -> int:
    """Bytes an embedding holds, for the cache bound; device buffers that report no size count as fp32."""
    return emb.nbytes or EMBEDDING_BYTES_FP32


def check_prompts_inside(prompts: list[Prompt], hw: tuple[int, int]) -> None:
    """400 naming the first prompt outside an image of size hw (checked before any embedding is computed)."""
    for i, p in enumerate(prompts):
        try:
            p.checked(hw)
        except InputError as exc:
            h, w = hw
            raise ApiError(400, f"prompts[{i}]: {exc} (image is {w}x{h})") from None


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


class _Flight:
    """One encoder run that requests wait for; dropped when its last waiter leaves before it starts."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Embedding] | None = None
        self.job: Future[Embedding] | None = None  # the encoder pool's job, once submitted
        self.waiters = 0
        self.abandoned = False


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
        self.keys = KeyRing(cfg.api_keys)
        self.ids = ContentIds()
        self.limits = InflightLimits(cfg, self.metrics)
        self.unauth = ByteBudget(cfg.unauth_buffer_bytes)
        self.memory = MemoryBudget(cfg.memory_budget_bytes)
        self.embeddings: ByteLRU[EmbKey, Embedding] = ByteLRU(cfg.cache_bytes, embedding_bytes)
        self.aliases: ByteLRU[tuple[str, str, str], str] = ByteLRU(ALIAS_CACHE_BYTES, lambda v: 300 + len(v))
        self.sources: ByteLRU[tuple[str, bytes], str] = ByteLRU(SOURCE_CACHE_BYTES, lambda v: 300 + len(v))
        self.logits: ByteLRU[tuple[str, str, str, PromptSetKey], LogitsEntry] = ByteLRU(cfg.logits_cache_bytes,
                                                                                       lambda e: e.nbytes)
        self.inflight: dict[EmbKey, _Flight] = {}
        self.encode_pool = ThreadPoolExecutor(1, thread_name_prefix="sam2rt-encode")
        self.work_pool = ThreadPoolExecutor(max(1, cfg.decode_workers), thread_name_prefix="sam2rt-work")
        self.parse_pool = ThreadPoolExecutor(2, thread_name_prefix="sam2rt-parse")
        self.unauth_parse_pool = ThreadPoolExecutor(max(1, cfg.unauth_parsers), thread_name_prefix="sam2rt-parse-anon")
        self.metrics.cache_max_bytes.set(cfg.cache_bytes)

    @property
    def active(self) -> int:
        return self.limits.active

    # --- lifecycle ------------------------------------------------------------------------
    def load_models(self) -> None:
        """Load every --model-dir (blocking); each is served under its manifest's serve_id."""
        for d in self.cfg.model_dirs:
            model = Sam2Model.from_dir(d, backend=self.cfg.backend, threads=self.cfg.threads)
            vid = canonical_serve_id(str(model.manifest.model["serve_id"]))
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
        for pool in (self.encode_pool, self.work_pool, self.parse_pool, self.unauth_parse_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    # --- helpers ----------------------------------------------------------------------------
    async def run(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in `pool`; cancelling the caller before it starts means it never runs."""
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def check_ready(self) -> None:
        if not self.ready:
            retry = {"Retry-After": str(self.cfg.retry_after_s)}
            raise ApiError(503, "the server is still loading its models; retry shortly" if self.load_error is None
                           else f"model loading failed: {self.load_error}", headers=retry)

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
        m.queue.set(self.limits.active)
        m.memory_reserved.set(self.memory.used)

    # --- embeddings: cache + single flight -------------------------------------------------------
    def _embed(self, model: Sam2Model, version_id: str, rgb: np.ndarray) -> Embedding:
        t0 = time.perf_counter()
        emb = model.embed(rgb)
        self.metrics.embed_seconds.labels(version_id).observe(time.perf_counter() - t0)
        self.metrics.embeddings.labels(version_id).inc()
        return emb

    async def _encode(self, flight: _Flight, key: EmbKey, model: Sam2Model, rgb: np.ndarray) -> Embedding:
        """The encoder run of a flight. Cancelled while queued, it never starts; ONNX Runtime cannot stop a
        run midway, so one that has started finishes and its embedding is cached for whoever asks next."""
        job = flight.job = self.encode_pool.submit(self._embed, model, key[1], rgb)
        try:
            emb = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            if job.cancelled():
                self.metrics.embeddings_cancelled.inc()
                raise
            emb = await asyncio.wrap_future(job)  # running already: keep what it costs
        self.embeddings.put(key, emb)
        return emb

    async def _wait(self, flight: _Flight) -> Embedding:
        assert flight.task is not None
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            # nobody waits and the run has not started: drop it; a running one is kept for later requests to join
            if flight.waiters == 0 and not flight.task.done() and (flight.job is None or not flight.job.running()):
                flight.abandoned = True
                flight.task.cancel()

    async def _find_or_compute(self, key: EmbKey, model: Sam2Model, rgb: np.ndarray | None) -> Embedding | None:
        """The embedding for key: cached, joined from a run in flight, or (with rgb) computed now.
        None when it is neither cached nor in flight and there are no pixels to compute it from."""
        while True:
            emb = self.embeddings.get(key)
            if emb is not None:
                self.metrics.cache_hits.inc()
                return emb
            flight = self.inflight.get(key)
            if flight is None or flight.abandoned:
                if rgb is None:
                    return None
                self.metrics.cache_misses.inc()
                flight = _Flight()
                flight.task = asyncio.ensure_future(self._encode(flight, key, model, rgb))
                self.inflight[key] = flight

                def _done(task: asyncio.Task[Embedding], key: EmbKey = key, flight: _Flight = flight) -> None:
                    if self.inflight.get(key) is flight:
                        del self.inflight[key]
                    if not task.cancelled():
                        task.exception()  # retrieved: no "exception never retrieved" warning

                flight.task.add_done_callback(_done)
            else:
                self.metrics.cache_joins.inc()
            try:
                return await self._wait(flight)
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if flight.task is not None and flight.task.cancelled() and me is not None and not me.cancelling():
                    continue  # the run was dropped by others leaving, not by us: ask again
                raise

    async def embedding(self, ns: str, version_id: str, image: Any, image_id: str | None,
                        check_size: Callable[[tuple[int, int]], None] | None = None) -> tuple[Embedding, str, str]:
        """(embedding, image_id to report, content id) for a request in namespace `ns`.

        An id alone finds the embedding it names (404 if none). A request with an image is answered from
        that image: its content id comes from its pixels (or from identical bytes seen before, without
        decoding them again), and a client-chosen id is bound to it only if the id is free; an id bound
        to a different image keeps its entry and the answer reports the image's content id instead.
        `check_size(hw)` runs before any pixels are decoded or embedded (prompts outside the image)."""
        model = self.model_for(version_id)
        if image_id is not None:
            check_image_id(image_id)
        if image is None:
            if image_id is None:
                raise ApiError(422, "give `image` (or the `image_id` of an embedding cached by an earlier request)")
            cid = image_id if is_content_id(image_id) else self.aliases.get((ns, version_id, image_id))
            emb = await self._find_or_compute((ns, version_id, cid), model, None) if cid else None
            if emb is None:
                self.metrics.cache_misses.inc()
                raise ApiError(404, f"image_id {image_id!r} is not cached for {version_id} (never embedded with this "
                                    "API key, or evicted); send the image with it")
            if check_size is not None:
                check_size(emb.original_size)
            return emb, image_id, cid

        source = await self.run(self.work_pool, self.ids.of_source, image)
        cid = self.sources.get((ns, source)) if source is not None else None
        emb = await self._find_or_compute((ns, version_id, cid), model, None) if cid else None
        if emb is not None:
            if check_size is not None:
                check_size(emb.original_size)
        else:
            probe = await self.run(self.work_pool, probe_image, image, self.cfg)
            if check_size is not None:
                check_size((probe.height, probe.width))
            cost = probe.pixels * EMBED_BYTES_PER_PIXEL if probe.pixels >= self.cfg.budget_min_pixels else 0
            async with self.memory.hold(cost, f"the {probe.width}x{probe.height} image is too large to decode and "
                                              "embed on this server; downscale it (SAM 2 works at 1024x1024)"):
                rgb = await self.run(self.work_pool, decode_probed, probe, self.cfg)
                del probe
                cid = await self.run(self.work_pool, self.ids.of_pixels, rgb)
                if source is not None:
                    self.sources.put((ns, source), cid)
                emb = await self._find_or_compute((ns, version_id, cid), model, rgb)
                del rgb
            assert emb is not None
        return emb, self._bind(ns, version_id, image_id, cid), cid

    def _bind(self, ns: str, version_id: str, image_id: str | None, cid: str) -> str:
        """The image_id to report for an image whose content id is cid, binding a free client-chosen id."""
        if image_id is None or is_content_id(image_id):
            if image_id is not None and image_id != cid:
                self.metrics.id_mismatches.inc()
            return cid
        key = (ns, version_id, image_id)
        bound = self.aliases.get(key)
        if bound is None or bound == cid or (ns, version_id, bound) not in self.embeddings:
            self.aliases.put(key, cid)  # free, the same image, or its embedding is gone: (re)bind
            return image_id
        self.metrics.id_mismatches.inc()
        log.info("image_id %r names another image; answered from the request's image (%s)", image_id, cid)
        return cid

    # --- decoding -------------------------------------------------------------------------------
    def decode(self, version_id: str, emb: Embedding, prompts: list[Prompt], multimask: bool,
               fmt: str) -> tuple[list[dict[str, Any]], np.ndarray]:
        """Decode (in a worker thread) and encode json/rle predictions; returns (predictions, low-res logits)."""
        model = self.models[version_id]
        t0 = time.perf_counter()
        preds: list[dict[str, Any]] = []
        low_parts = []
        for logits, scores, low in iter_decoded(model, emb, prompts, multimask, self.cfg):
            masks = logits > model.mask_threshold
            del logits
            low_parts.append(low)
            if fmt == "rle":
                preds += [{"masks": mask_to_rle(m), "confidence": float(s), "format": "rle"} for m, s in zip(masks, scores)]
            else:
                preds += [{"masks": mask_to_polygons(m), "confidence": float(s), "format": "polygon"}
                          for m, s in zip(masks, scores)]
            del masks
        self.metrics.decode_seconds.labels(version_id).observe(time.perf_counter() - t0)
        return preds, np.ascontiguousarray(np.concatenate(low_parts), dtype=np.float32)

    def prior_logits(self, ns: str, version_id: str, cid: str, current: PromptSetKey) -> dict[int, np.ndarray]:
        entries = [e for (n, v, i, _), e in self.logits.items_newest_first() if (n, v, i) == (ns, version_id, cid)]
        found = find_prior_logits(entries, current)
        (self.metrics.logits_hits if found else self.metrics.logits_misses).inc()
        return found

    def save_logits(self, ns: str, version_id: str, cid: str, current: PromptSetKey, low_res: np.ndarray) -> None:
        self.logits.put((ns, version_id, cid, current), LogitsEntry(current, np.ascontiguousarray(low_res, np.float32)))
