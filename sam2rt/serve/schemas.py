"""Request models of the wire contract, parsed leniently (unknown fields ignored) but typed strictly.

Bodies are parsed with a JSON reader that refuses NaN/Infinity (and numbers that overflow to them) and
integers of absurd length; schema violations become ApiError(422) whose message names each bad field.
Size caps come before per-element work: `check_structure` bounds the number of JSON values with a byte
count before parsing, and `parse_prompts` checks the prompt and point counts before validating any.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, TypeAdapter, ValidationError

from ..model_specs import MODEL_NAMES, canonical_serve_id, serve_id_for
from .errors import ApiError
from .images import _b64decode

Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]
# The ids models are served under (Roboflow's spelling: hiera_b_plus). A request may spell a model any way
# `sam2rt export` accepts (hiera_base_plus too): the id is mapped to this form before anything is looked up,
# so both spellings share one model, one embedding cache and one metrics label.
VERSION_IDS = tuple(serve_id_for(name) for name in MODEL_NAMES)
VersionId = Annotated[StrictStr, AfterValidator(canonical_serve_id)]
MAX_INT_DIGITS = 40
JSON_MASK_MAX_PROMPTS = 4  # json mask_input beyond this many 256x256 masks must be sent as binary


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Point(_Lenient):
    """A click: x, y in original-image pixels; positive -> label 1 (foreground), else 0."""

    x: Finite
    y: Finite
    positive: StrictBool


class Box(_Lenient):
    """A box given by its CENTRE x, y and its width, height (corners x ± width/2, y ± height/2)."""

    x: Finite
    y: Finite
    width: NonNegative
    height: NonNegative

    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x - self.width / 2, self.y - self.height / 2, self.x + self.width / 2, self.y + self.height / 2)


class Sam2Prompt(_Lenient):
    """One object's prompt: a box, points, or both."""

    box: Box | None = None
    points: list[Point] | None = None


class EmbedRequest(_Lenient):
    """POST /sam2/embed_image."""

    image: Any = None
    image_id: StrictStr | None = None
    sam2_version_id: VersionId = "hiera_tiny"
    api_key: Any = None


class SegmentRequest(EmbedRequest):
    """POST /sam2/segment_image (`prompts` is normalised separately: it comes in three shapes)."""

    prompts: Any = None
    multimask_output: StrictBool = True
    save_logits_to_cache: StrictBool = False
    load_logits_from_cache: StrictBool = False
    mask_input: Any = None
    mask_input_format: StrictStr = "json"
    format: StrictStr = "json"


_PROMPT_LIST = TypeAdapter(list[Sam2Prompt])


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number; send finite numbers only")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows to infinity; send finite numbers only")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"an integer with {len(text)} digits; send numbers of at most {MAX_INT_DIGITS} digits")
    return int(text)


def max_json_values(max_prompts: int, max_points: int) -> int:
    """An upper bound on the JSON values (objects, arrays, elements) a valid request needs: every prompt
    at its point cap, a json mask_input for JSON_MASK_MAX_PROMPTS prompts, and room for other fields."""
    return max_prompts * (max_points * 4 + 16) + JSON_MASK_MAX_PROMPTS * (256 * 256 + 300) + 4096


def count_json_values(data: bytes) -> int:
    """Commas and opening brackets: at least one per JSON value or container outside strings."""
    return data.count(b",") + data.count(b"{") + data.count(b"[")


def check_structure(body: bytes, max_values: int) -> None:
    """Refuse (413), before parsing, a body with more JSON values than any valid request has.

    Counts commas and opening brackets, one per value or container (base64 has neither, so an image
    costs nothing): parsing a million tiny objects is what made large bodies slow, not their bytes."""
    count = count_json_values(body)
    if count > max_values:
        raise too_many_values(count, max_values)


def too_many_values(count: int, max_values: int) -> ApiError:
    return ApiError(413, f"the body holds {count} or more JSON values; a request here needs at most {max_values} "
                         "(at most the prompt and point limits of this server); send fewer prompts or points, "
                         "or mask_input as binary")


def parse_json_body(body: bytes) -> dict[str, Any]:
    """Parse a request body as a JSON object, refusing NaN/Infinity; ApiError(400/422) otherwise."""
    if not body.strip():
        raise ApiError(400, "the request body is empty; send a JSON object such as "
                            '{"image": {"type": "base64", "value": "..."}, "prompts": [...]}')
    try:
        data = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 JSON; send Content-Type: application/json") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError; so are our NaN/inf refusals
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"the JSON body must be an object with named fields, got {type(data).__name__}")
    return data


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_error(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> ApiError:
    """A 422 ApiError whose message lists each invalid field and why."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    parts = [f"{_where(prefix + tuple(e['loc']))}: {e['msg']}" for e in errors[:8]]
    more = f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""
    detail = [{"loc": list(prefix + tuple(e["loc"])), "msg": e["msg"], "type": e["type"]} for e in errors]
    return ApiError(422, "invalid request: " + "; ".join(parts) + more, detail=detail)


def parse_model(cls: type[BaseModel], data: dict[str, Any]) -> Any:
    """Validate `data` as `cls`; fields sent as null take their defaults (as the reference's Optionals)."""
    data = {k: v for k, v in data.items() if v is not None}
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_prompts(raw: Any, max_prompts: int = 256, max_points: int = 128) -> list[Sam2Prompt]:
    """`prompts` as {"prompts": [...]}, a bare list, or one prompt object -> a non-empty list of prompts.

    The counts are checked before any prompt is validated, so an oversized request costs no validation."""
    where: tuple[Any, ...] = ("prompts",)
    if isinstance(raw, dict) and "prompts" in raw:
        raw, where = raw["prompts"], ("prompts", "prompts")
    if raw is None or raw == [] or raw == {}:
        raise ApiError(400, "no prompts given: send at least one prompt, e.g. "
                            '"prompts": {"prompts": [{"points": [{"x": 10, "y": 20, "positive": true}]}]} '
                            'or a box {"box": {"x": cx, "y": cy, "width": w, "height": h}}')
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise ApiError(422, f"prompts must be a list of prompt objects (or {{\"prompts\": [...]}}), got {type(raw).__name__}")
    if len(raw) > max_prompts:
        raise ApiError(400, f"{len(raw)} prompts in one request; this server takes at most {max_prompts}: "
                            "split them over several requests with the same image_id")
    for i, p in enumerate(raw):
        points = p.get("points") if isinstance(p, dict) else None
        if isinstance(points, list) and len(points) > max_points:
            raise ApiError(400, f"prompts[{i}] has {len(points)} points; this server takes at most "
                                f"{max_points} per prompt")
    try:
        prompts = _PROMPT_LIST.validate_python(raw)
    except ValidationError as exc:
        raise validation_error(exc, where) from None
    for i, p in enumerate(prompts):
        if p.box is None and not p.points:
            raise ApiError(400, f"{_where(where + (i,))} has neither a box nor points; give a box "
                                '{"x": cx, "y": cy, "width": w, "height": h} and/or points [{"x", "y", "positive"}]')
    return prompts


def parse_mask_input(value: Any, fmt: str, n_prompts: int) -> list[np.ndarray | None]:
    """`mask_input` (256x256 low-res logits; json nested lists or base64 .npy) -> one (1,256,256) per prompt."""
    import io

    if fmt == "binary":
        if not isinstance(value, str):
            raise ApiError(422, "mask_input with mask_input_format 'binary' must be base64 of np.save() bytes")
        try:
            raw = _b64decode(value, "mask_input")  # strict: junk characters are an error, never dropped
        except ApiError as exc:
            raise ApiError(400, exc.message.split("Cause: ", 1)[-1]) from None
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as exc:
            raise ApiError(400, f"mask_input is not base64 of an .npy file ({type(exc).__name__}); "
                                "write it with np.save (no pickles)") from None
        if not isinstance(arr, np.ndarray):
            raise ApiError(400, "mask_input must be one .npy array, not an .npz archive")
    elif fmt == "json":
        if isinstance(value, list) and len(value) > JSON_MASK_MAX_PROMPTS and len(value) != 256:
            raise ApiError(413, f"json mask_input with {len(value)} masks; send at most {JSON_MASK_MAX_PROMPTS} as json, "
                                "more with mask_input_format 'binary' (base64 of np.save() bytes)")
        shape_help = "mask_input must be nested lists of numbers of shape (256, 256), (1, 256, 256) or (N, 1, 256, 256)"
        try:
            arr = np.asarray(value, dtype=object)
        except (ValueError, TypeError):
            raise ApiError(422, shape_help) from None
        leaves = arr.reshape(-1)
        if arr.dtype != object or not all(type(v) in (int, float) for v in leaves):
            bad = next((v for v in leaves if type(v) not in (int, float)), None)
            raise ApiError(422, f"{shape_help}; found {type(bad).__name__} {str(bad)[:20]!r} (numbers only: not strings, "
                                "booleans or nested lists of uneven length)")
        arr = arr.astype(np.float32)
    else:
        raise ApiError(400, f"mask_input_format must be 'json' or 'binary', got {fmt!r}")
    try:
        arr = arr.astype(np.float32)
    except (ValueError, TypeError):
        raise ApiError(422, "mask_input must hold numbers") from None
    if not np.all(np.isfinite(arr)):
        raise ApiError(422, "mask_input contains NaN or infinite values; send finite logits")
    if arr.shape in ((256, 256), (1, 256, 256), (1, 1, 256, 256)):
        return [arr.reshape(1, 256, 256)] * n_prompts
    if arr.ndim in (3, 4) and arr.shape[0] == n_prompts and arr.shape[-2:] == (256, 256) and arr.size == n_prompts * 65536:
        return [a.reshape(1, 256, 256) for a in arr]
    raise ApiError(422, f"mask_input must have shape (256, 256), (1, 256, 256) or ({n_prompts}, 1, 256, 256) "
                        f"(one per prompt), got {tuple(arr.shape)}; pass the low-res logits of a previous call")
