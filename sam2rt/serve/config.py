"""ServeConfig: every operator setting of `sam2rt serve`, with the defaults of the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MB = 1 << 20


@dataclass
class ServeConfig:
    """Settings of one server. Sizes in bytes, times in seconds.

    Admission: `max_queue` bounds the authenticated /sam2 requests admitted at once (503 beyond it: the
    server is full); `max_inflight_per_key` / `max_inflight_per_address` bound one key's / one client
    address's share of it (429 beyond it: that client's own excess). `api_keys` empty means no key is
    required and every client shares one cache namespace; otherwise each key is its own namespace.
    """

    model_dirs: list[Path] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 9001
    backend: str = "auto"
    threads: int | None = None
    cache_bytes: int = 1024 * MB
    logits_cache_bytes: int = 64 * MB
    api_keys: tuple[str, ...] = ()
    metrics_open: bool = False
    allow_url_images: bool = False
    max_body_bytes: int = 32 * MB
    max_image_pixels: int = 25_000_000
    max_queue: int = 64
    max_inflight_per_key: int = 48
    max_inflight_per_address: int = 64
    url_timeout_s: float = 10.0
    decode_workers: int = 2
    retry_after_s: int = 1
    max_prompts: int = 256
    max_points_per_prompt: int = 128
    upsample_budget_bytes: int = 256 * MB
    # the pixels one answer may carry: masks returned x the image's pixels (413 above it)
    max_answer_pixels: int = 100_000_000
    # in-flight memory for large images and answers, reserved before the work starts
    memory_budget_bytes: int = 1536 * MB
    budget_min_pixels: int = 4_000_000
    # slow clients: a header deadline, and mod_reqtimeout-style body deadlines (an initial time,
    # extended by one second per `body_min_rate` bytes received, never past the max)
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    body_timeout_max_s: float = 60.0
    body_min_rate: int = 256 * 1024
    # requests whose key is only in the body (inference-sdk) are read before they are authenticated:
    # a shorter first deadline, a byte budget for what they buffer, and a small parse pool
    unauth_body_timeout_s: float = 2.0
    unauth_buffer_bytes: int = 256 * MB
    unauth_parsers: int = 2
    keep_alive_s: float = 5.0

    @property
    def api_key(self) -> str | None:
        """The first key (kept for code that asks whether a key is required)."""
        return self.api_keys[0] if self.api_keys else None
