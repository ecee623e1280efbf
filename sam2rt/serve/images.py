"""Decoding the request's `image` (base64, numpy .npy, URL) into an RGB uint8 array, safely.

Never unpickles anything; refuses images over the pixel limit before decoding them (decompression
bombs included); applies EXIF orientation; strips a `data:...;base64,` prefix.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import MB, ServeConfig
from .errors import ApiError

_DATA_URL = re.compile(r"^data:[^,]{0,200}?;base64,", re.IGNORECASE)
_PICKLED_TYPES = ("numpy_object", "pil", "pickle")


def _accepted(cfg: ServeConfig) -> str:
    kinds = ['{"type": "base64", "value": <base64 of a PNG/JPEG/... file>}',
             '{"type": "numpy", "value": <base64 of np.save() bytes, HxWx3 uint8 in BGR order>}']
    if cfg.allow_url_images:
        kinds.append('{"type": "url", "value": "http(s)://..."}')
    return "accepted image types: " + ", ".join(kinds)


def _bad(message: str) -> ApiError:
    return ApiError(400, f"Could not load input image. Cause: {message}")


_NOT_B64 = re.compile(r"[^A-Za-z0-9+/=]")


def _b64decode(value: Any, what: str) -> bytes:
    """Strict base64 (line breaks allowed, URL-safe -_ accepted): junk characters are an error, never
    silently dropped (dropping them turned "!!!!" into an empty image)."""
    if not isinstance(value, str):
        raise _bad(f"{what} value must be a base64 string, got {type(value).__name__}")
    value = _DATA_URL.sub("", value.strip(), count=1)
    if any(c in value for c in " \t\r\n"):
        value = "".join(value.split())
    if "-" in value or "_" in value:
        value = value.replace("-", "+").replace("_", "/")
    bad = _NOT_B64.search(value)
    if bad is not None:
        raise _bad(f"{what} value is not valid base64: character {bad.group()!r} at position {bad.start()}; send "
                   "standard base64 (A-Z a-z 0-9 + /, = padding) of the file's bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"{what} value is not valid base64 ({exc}); check that the string is complete") from None


def _check_pixels(w: int, h: int, cfg: ServeConfig) -> None:
    if w * h > cfg.max_image_pixels:
        raise ApiError(
            413,
            f"image is {w}x{h} = {w * h} pixels, over this server's limit of {cfg.max_image_pixels}; "
            "downscale it (SAM 2 works at 1024x1024 anyway) or start the server with a larger --max-image-pixels",
        )


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """A float image (PIL mode F): [0, 1] is scaled to [0, 255]; [0, 255] is kept; anything else is refused
    (clipping it would silently give a black or white image)."""
    if not np.all(np.isfinite(arr)):
        raise _bad("the float image holds NaN or infinite values; send finite values in [0, 1] or [0, 255]")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 1:
        return np.rint(arr * 255).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.rint(arr).astype(np.uint8)
    raise _bad(f"the float image's values span [{lo:g}, {hi:g}]; send floats in [0, 1] or [0, 255], or an 8-bit image")


@dataclass
class ImageProbe:
    """An image whose header has been read but whose pixels have not been decoded yet.

    `width`/`height` are the decoded image's (EXIF rotation applied where the header says so), so prompts
    can be checked and memory reserved before the pixels are decoded."""

    kind: str  # "file" (PNG/JPEG/...) or "npy"
    data: bytes
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        """Working memory of decoding it: the decoder's image, its RGB conversion and the array."""
        return 3 * 3 * self.pixels


def _pil_errors(exc: BaseException) -> ApiError:
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ApiError(413, f"image refused as a decompression bomb ({exc}); send a smaller image")
    if isinstance(exc, UnidentifiedImageError):
        return _bad("the bytes are not an image file this server can read (PNG, JPEG, WebP, BMP, TIFF, GIF); "
                    "send base64 of the file's bytes")
    return _bad(f"the image file is corrupt or truncated ({type(exc).__name__}: {exc})")


_PIL_FAILURES = (OSError, ValueError, SyntaxError, EOFError, TypeError, MemoryError, ApiError)


def probe_file_bytes(data: bytes, cfg: ServeConfig) -> ImageProbe:
    """Read an encoded image file's header: its size (refusing 413 over the pixel limit), nothing decoded."""
    from PIL import Image

    if not data:
        raise _bad("the image is empty (0 bytes); send the bytes of an image file, base64-encoded")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only (PIL refuses gross bombs here)
        w, h = img.width, img.height
        _check_pixels(w, h, cfg)
        try:
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap width and height
                w, h = h, w
        except Exception:  # an unreadable EXIF block is ignored here, as exif_transpose ignores it
            pass
    except (*_PIL_FAILURES, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _pil_errors(exc) from None
    return ImageProbe("file", data, w, h)


def _int_to_uint8(arr: np.ndarray) -> np.ndarray:
    """A 16- or 32-bit integer image (PIL's I;16 / I modes) as 8 bits: its high byte, as OpenCV reads a 16-bit file
    and PIL converts 16-bit RGB (values of a 32-bit image above 65535 are refused); negative values are refused,
    never wrapped round."""
    lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
    if lo < 0 or hi > 65535:
        raise _bad(f"integer image values must lie in 0..65535 (16-bit), got {lo}..{hi}; send an 8- or 16-bit image")
    return (arr.astype(np.uint32) >> 8).astype(np.uint8)


def decode_file_bytes(data: bytes, cfg: ServeConfig) -> np.ndarray:
    """An encoded image file (PNG, JPEG, WebP, ...) -> RGB uint8 (H,W,3), EXIF orientation applied."""
    from PIL import Image, ImageOps

    if not data:
        raise _bad("the image is empty (0 bytes); send the bytes of an image file, base64-encoded")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only (PIL refuses gross bombs here)
        _check_pixels(img.width, img.height, cfg)
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = Image.fromarray(_int_to_uint8(np.asarray(img)))
            elif img.mode == "F":
                img = Image.fromarray(_float_to_uint8(np.asarray(img, dtype=np.float32)))
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    except (*_PIL_FAILURES, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _pil_errors(exc) from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _bad(f"decoded image has unsupported shape {arr.shape}")
    return np.ascontiguousarray(arr)


def probe_npy(data: bytes, cfg: ServeConfig) -> ImageProbe:
    """Read an .npy header: its shape and dtype (refusing pickles, wrong dtypes and 413 sizes), no data."""
    if data[:6] != b"\x93NUMPY":
        if data[:1] == b"\x80":
            raise _bad("pickled numpy payloads are not accepted (unpickling request data would let a client run "
                       "code on this server); send base64 of np.save() bytes, or the image as an encoded file. "
                       + _accepted(cfg))
        raise _bad("numpy value is not base64 of an .npy file (np.save); " + _accepted(cfg))
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        shape, _, dtype = np.lib.format._read_array_header(buf, version)  # header only, no data read
    except Exception as exc:
        raise _bad(f"malformed .npy header ({exc})") from None
    if dtype != np.uint8 or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 3):
        raise _bad(f"numpy image must be uint8 with shape (H, W, 3) in BGR order or (H, W), got {dtype} {shape}")
    _check_pixels(int(shape[1]), int(shape[0]), cfg)
    return ImageProbe("npy", data, int(shape[1]), int(shape[0]))


def decode_npy(data: bytes, cfg: ServeConfig) -> np.ndarray:
    """np.save() bytes of a (H,W,3) BGR or (H,W) uint8 array -> RGB; pickled payloads are refused."""
    probe_npy(data, cfg)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise _bad(f"the .npy payload could not be read ({exc})") from None
    if arr.size == 0:
        raise _bad(f"numpy image is empty (shape {arr.shape})")
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., ::-1])


def fetch_url(url: str, cfg: ServeConfig) -> bytes:
    """GET an http(s) URL, reading at most the body limit (only with --allow-url-images)."""
    if not re.match(r"^https?://", url, re.IGNORECASE):
        raise _bad(f"url images must be http:// or https://, got {url[:60]!r}")
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "sam2rt"})
        with urllib.request.urlopen(req, timeout=cfg.url_timeout_s) as resp:  # noqa: S310 (scheme checked)
            data = resp.read(cfg.max_body_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _bad(f"could not fetch {url[:100]!r} ({exc})") from None
    if len(data) > cfg.max_body_bytes:
        raise ApiError(413, f"the image at the URL is over {cfg.max_body_bytes // MB} MB; send a smaller image")
    return data


def probe_image(image: Any, cfg: ServeConfig) -> ImageProbe:
    """The request's `image` field -> its bytes and size, pixels not decoded. Raises ApiError (400/413) with a fix."""
    if isinstance(image, list):
        raise _bad("send one image per request (got a list); make one request per image")
    if isinstance(image, str):  # a bare string: a URL or base64, as the reference infers it
        kind = "url" if re.match(r"^https?://", image, re.IGNORECASE) else "base64"
        image = {"type": kind, "value": image}
    if not isinstance(image, dict):
        raise _bad(f"image must be an object {{\"type\": ..., \"value\": ...}}, got {type(image).__name__}; " + _accepted(cfg))
    kind, value = image.get("type"), image.get("value")
    if not isinstance(kind, str):
        raise _bad("image.type is missing or not a string; " + _accepted(cfg))
    if value is None:
        raise _bad("image.value is missing")
    kind = kind.lower()
    if kind == "base64":
        return probe_file_bytes(_b64decode(value, "base64"), cfg)
    if kind == "numpy":
        return probe_npy(_b64decode(value, "numpy"), cfg)
    if kind == "url":
        if not cfg.allow_url_images:
            raise _bad("url images are disabled on this server (fetching arbitrary URLs is a security risk); "
                       "send the image as base64, or start the server with --allow-url-images")
        if not isinstance(value, str):
            raise _bad("image.value must be a URL string")
        return probe_file_bytes(fetch_url(value, cfg), cfg)
    if kind in _PICKLED_TYPES:
        raise _bad(f"image type {kind!r} is not accepted (it is a pickle, and this server never unpickles request "
                   "data). " + _accepted(cfg))
    raise _bad(f"unknown image type {kind!r}. " + _accepted(cfg))


def decode_probed(probe: ImageProbe, cfg: ServeConfig) -> np.ndarray:
    """Decode the pixels of a probed image -> RGB uint8 (H,W,3)."""
    return decode_file_bytes(probe.data, cfg) if probe.kind == "file" else decode_npy(probe.data, cfg)


def decode_image(image: Any, cfg: ServeConfig) -> np.ndarray:
    """The request's `image` field -> RGB uint8 (H,W,3). Raises ApiError (400/413) with a fix."""
    return decode_probed(probe_image(image, cfg), cfg)
