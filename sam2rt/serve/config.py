"""ServeConfig: every operator setting of `sam2rt serve`, with the defaults of the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MB = 1 << 20


@dataclass
class ServeConfig:
    """Settings of one server. Sizes in bytes; `max_queue` bounds the /sam2 requests admitted at once."""

    model_dirs: list[Path] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 9001
    backend: str = "auto"
    threads: int | None = None
    cache_bytes: int = 1024 * MB
    logits_cache_bytes: int = 64 * MB
    api_key: str | None = None
    allow_url_images: bool = False
    max_body_bytes: int = 32 * MB
    max_image_pixels: int = 25_000_000
    max_queue: int = 64
    url_timeout_s: float = 10.0
    decode_workers: int = 2
    retry_after_s: int = 1
    max_prompts: int = 256
    max_points_per_prompt: int = 128
    upsample_budget_bytes: int = 256 * MB
    max_binary_bytes: int = 512 * MB
