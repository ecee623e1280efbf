"""Image ids: server-derived content ids, client-chosen ids, and how the two are kept apart.

Content ids are a keyed hash (BLAKE2b keyed with a per-process random secret) of an image's shape and
pixels, with a reserved prefix. Nobody without the secret can compute the id of an image they do not
hold, so an id cannot be forged to claim another image, and an upload cannot be probed by id. Ids a
client chooses live in a separate table (an alias to the content id of the image they were first
bound to); a client-chosen id that starts with the reserved prefix is read as a content id.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from .errors import ApiError

CONTENT_PREFIX = "sam2rt-"
MAX_ID_CHARS = 256


class ContentIds:
    """Keyed digests of one server process: `of_pixels` names an image, `of_source` names its request bytes."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or os.urandom(32)

    def of_pixels(self, rgb: np.ndarray) -> str:
        """The content id of decoded pixels (shape included): CONTENT_PREFIX + 32 hex digits."""
        h = hashlib.blake2b(key=self._secret, digest_size=16, person=b"pixels")
        h.update(repr(rgb.shape).encode())
        h.update(np.ascontiguousarray(rgb).data)
        return CONTENT_PREFIX + h.hexdigest()

    def of_source(self, image: Any) -> bytes | None:
        """A digest of the request's encoded image (type + value), to skip decoding bytes seen before;
        None for images that are not self-contained (a URL's content may change)."""
        if not isinstance(image, dict) or not isinstance(image.get("type"), str) or not isinstance(image.get("value"), str):
            return None
        kind = image["type"].lower()
        if kind not in ("base64", "numpy"):
            return None
        h = hashlib.blake2b(key=self._secret, digest_size=16, person=b"source")
        h.update(kind.encode() + b"\0")
        h.update(image["value"].encode("utf-8", "surrogatepass"))
        return h.digest()


def is_content_id(image_id: str) -> bool:
    return image_id.startswith(CONTENT_PREFIX)


def check_image_id(image_id: str) -> None:
    """Refuse ids that cannot be stored or echoed back: too long, not encodable as UTF-8, control characters."""
    if len(image_id) > MAX_ID_CHARS:
        raise ApiError(422, f"image_id is {len(image_id)} characters; use at most {MAX_ID_CHARS}")
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, "image_id holds a lone surrogate (e.g. \\udcff), which is not valid Unicode; "
                            "use printable text") from None
    if not image_id or any(ord(c) < 32 or ord(c) == 127 for c in image_id):
        raise ApiError(422, "image_id must be non-empty printable text (no control characters)")
