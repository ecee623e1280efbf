"""Prometheus metrics of one server (its own registry): requests, latencies, cache and queue state."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-exported)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The server's counters, histograms and gauges, in a private CollectorRegistry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sam2rt_requests", "HTTP requests by path and status code", ["path", "status"], registry=r)
        self.request_seconds = Histogram("sam2rt_request_seconds", "HTTP request latency", ["path"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.embed_seconds = Histogram("sam2rt_embed_seconds", "image encoder latency (one embedding)", ["model"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_seconds = Histogram("sam2rt_decode_seconds", "mask decoder + postprocess latency (one request)",
                                        ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.embeddings = Counter("sam2rt_embeddings_computed", "image encoder runs", ["model"], registry=r)
        self.cache_hits = Counter("sam2rt_embedding_cache_hits", "requests answered from a cached embedding", registry=r)
        self.cache_misses = Counter("sam2rt_embedding_cache_misses", "requests whose embedding was not cached", registry=r)
        self.cache_joins = Counter("sam2rt_embedding_inflight_joins",
                                   "requests that waited for an embedding another request was computing", registry=r)
        self.logits_hits = Counter("sam2rt_logits_cache_hits", "load_logits_from_cache requests that found prior logits", registry=r)
        self.logits_misses = Counter("sam2rt_logits_cache_misses", "load_logits_from_cache requests that found none", registry=r)
        self.rejected = Counter("sam2rt_rejected_queue_full", "requests answered 503 because the queue was full", registry=r)
        self.throttled = Counter("sam2rt_rejected_client_limit", "requests answered 429: over their key's or address's "
                                 "in-flight limit", registry=r)
        self.client_gone = Counter("sam2rt_client_disconnects", "requests whose client left before the answer", registry=r)
        self.embeddings_cancelled = Counter("sam2rt_embeddings_cancelled",
                                            "queued encoder runs dropped because nobody waited for them", registry=r)
        self.id_mismatches = Counter("sam2rt_image_id_mismatches", "requests whose image_id named a different image than "
                                     "the one they carried (answered from the carried image)", registry=r)
        self.memory_reserved = Gauge("sam2rt_memory_reserved_bytes", "working memory reserved by in-flight requests",
                                     registry=r)
        self.cache_bytes = Gauge("sam2rt_embedding_cache_bytes", "bytes held by the embedding cache", registry=r)
        self.cache_entries = Gauge("sam2rt_embedding_cache_entries", "embeddings held by the cache", registry=r)
        self.cache_max_bytes = Gauge("sam2rt_embedding_cache_max_bytes", "the embedding cache's bound", registry=r)
        self.cache_evictions = Gauge("sam2rt_embedding_cache_evictions", "embeddings evicted so far", registry=r)
        self.logits_bytes = Gauge("sam2rt_logits_cache_bytes", "bytes held by the logits cache", registry=r)
        self.queue = Gauge("sam2rt_queue_depth", "/sam2 requests admitted and not finished", registry=r)

    def render(self, refresh: Callable[[], None] | None = None) -> bytes:
        """Prometheus text exposition (refresh() updates the gauges first)."""
        if refresh is not None:
            refresh()
        return generate_latest(self.registry)
