"""Unit tests of the server's pieces (no server process): caches, the logits subset rule, mask
encodings, image decoding and request parsing."""

from __future__ import annotations

import base64
import io
import pickle
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
from PIL import Image  # noqa: E402

from sam2rt.serve.cache import ByteLRU, LogitsEntry, find_prior_logits, strict_subset_match  # noqa: E402
from sam2rt.serve.config import ServeConfig  # noqa: E402
from sam2rt.serve.encode import mask_to_polygons, mask_to_rle, polygons_to_mask, rle_to_mask, to_npz  # noqa: E402
from sam2rt.serve.errors import ApiError  # noqa: E402
from sam2rt.serve.ids import ContentIds  # noqa: E402
from sam2rt.serve.images import decode_image  # noqa: E402
from sam2rt.serve.schemas import parse_json_body, parse_mask_input, parse_prompts  # noqa: E402


# --- ByteLRU ------------------------------------------------------------------------------------
def test_byte_lru_bounds_bytes_and_evicts_least_recent() -> None:
    c: ByteLRU[str, bytes] = ByteLRU(10, len)
    assert c.put("a", b"1234") and c.put("b", b"1234")
    assert c.get("a") == b"1234"  # a is now the most recent
    assert c.put("c", b"1234")  # 12 > 10: evicts b, the least recently used
    assert "b" not in c and "a" in c and "c" in c
    assert c.nbytes == 8 <= c.max_bytes and c.evictions == 1
    assert not c.put("huge", b"x" * 11)  # larger than the bound: not stored, nothing evicted
    assert len(c) == 2 and c.nbytes == 8
    assert c.get("missing") is None and c.misses == 1 and c.hits == 1
    assert c.put("a", b"12") and c.nbytes == 6  # replacing an entry re-counts its size


# --- logits cache: the reference's strict-subset rule ----------------------------------------------
def _ps(*prompts: tuple) -> tuple:
    return tuple((box, frozenset(points)) for box, points in prompts)


P1, P2, P3 = (1.0, 1.0, True), (2.0, 2.0, False), (3.0, 3.0, True)


def test_strict_subset_rule() -> None:
    assert strict_subset_match(_ps((None, [P1])), _ps((None, [P1, P2]))) == {0: 0}
    assert strict_subset_match(_ps((None, [P1])), _ps((None, [P1]))) is None  # equal is not strict
    assert strict_subset_match(_ps(((0, 0, 5, 5), [P1])), _ps((None, [P1, P2]))) is None  # boxes must match
    assert strict_subset_match(_ps((None, [P3])), _ps((None, [P1, P2]))) is None
    # two prompts: each sub prompt needs its own super prompt
    assert strict_subset_match(_ps((None, [P1]), (None, [P2])), _ps((None, [P1, P2]))) is None
    assert strict_subset_match(_ps((None, [P2])), _ps((None, [P1]), (None, [P2, P3]))) == {0: 1}


def test_find_prior_prefers_one_point_fewer_else_largest() -> None:
    cur = _ps((None, [P1, P2, P3]))
    one = LogitsEntry(_ps((None, [P1])), np.full((1, 256, 256), 1.0, np.float32))
    two = LogitsEntry(_ps((None, [P1, P2])), np.full((1, 256, 256), 2.0, np.float32))
    other = LogitsEntry(_ps(((0, 0, 1, 1), [P1])), np.full((1, 256, 256), 9.0, np.float32))
    got = find_prior_logits([one, other, two], cur)  # newest first; `two` has exactly one point fewer
    assert list(got) == [0] and got[0][0, 0] == 2.0
    got = find_prior_logits([other, one], _ps((None, [P1, P2, P3, (4.0, 4.0, True)])))
    assert got[0][0, 0] == 1.0  # no one-fewer match: the largest strict subset
    assert find_prior_logits([other], cur) == {}


# --- mask encodings ---------------------------------------------------------------------------------
def test_polygons_of_masks() -> None:
    assert mask_to_polygons(np.zeros((8, 8), bool)) == [[]]
    m = np.zeros((20, 30), bool)
    m[2:6, 3:9] = True  # a rectangle: four corners, (x, y) order
    m[10, 20] = True  # a one-pixel component is kept too
    polys = mask_to_polygons(m)
    assert len(polys) == 2
    rect = next(p for p in polys if len(p) == 4)
    assert sorted(map(tuple, rect)) == [(3, 2), (3, 5), (8, 2), (8, 5)]
    assert [[20, 10]] in polys
    assert np.array_equal(polygons_to_mask(polys, m.shape), m)


def test_rle_and_npz_round_trip() -> None:
    rng = np.random.default_rng(0)
    m = rng.random((37, 53)) > 0.5
    rle = mask_to_rle(m)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    assert np.array_equal(rle_to_mask(rle), m)
    data = to_npz(rng.normal(size=(2, 37, 53)), rng.normal(size=(2, 256, 256)))
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        assert z["masks"].shape == (2, 37, 53) and z["low_res_masks"].shape == (2, 256, 256)


# --- images ---------------------------------------------------------------------------------------------
CFG = ServeConfig(max_image_pixels=100_000)


def _png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", **kw)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _status(image: object, cfg: ServeConfig = CFG) -> tuple[int, str]:
    with pytest.raises(ApiError) as ei:
        decode_image(image, cfg)
    return ei.value.status, ei.value.message


def test_decode_base64_png_with_and_without_data_prefix() -> None:
    arr = np.random.default_rng(1).integers(0, 255, (21, 34, 3), dtype=np.uint8)
    data = _png(arr)
    assert np.array_equal(decode_image({"type": "base64", "value": _b64(data)}, CFG), arr)
    assert np.array_equal(decode_image({"type": "base64", "value": "data:image/png;base64," + _b64(data)}, CFG), arr)
    gray = decode_image({"type": "base64", "value": _b64(_png(arr[..., 0]))}, CFG)
    assert gray.shape == (21, 34, 3) and np.array_equal(gray[..., 2], arr[..., 0])


def test_exif_orientation_is_applied() -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # left band
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image({"type": "base64", "value": _b64(_png(arr, exif=exif))}, CFG)
    assert out.shape == (40, 20, 3)
    assert np.array_equal(out, np.rot90(arr, -1))  # the left band is now on top


def test_numpy_npy_accepted_pickle_refused() -> None:
    bgr = np.random.default_rng(2).integers(0, 255, (9, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, bgr)
    out = decode_image({"type": "numpy", "value": _b64(buf.getvalue())}, CFG)
    assert np.array_equal(out, bgr[..., ::-1])  # numpy images are BGR, as the reference and the client
    status, msg = _status({"type": "numpy", "value": _b64(pickle.dumps(bgr))})
    assert status == 400 and "pickle" in msg and "base64" in msg
    status, msg = _status({"type": "numpy_object", "value": [[1]]})
    assert status == 400 and "accepted image types" in msg


def test_bad_images_are_4xx() -> None:
    assert _status({"type": "base64", "value": _b64(b"not an image")})[0] == 400
    assert _status({"type": "base64", "value": "!!!"})[0] == 400
    assert _status({"type": "base64", "value": _b64(_png(np.zeros((10, 10, 3), np.uint8))[:40])})[0] == 400
    assert _status({"type": "url", "value": "http://127.0.0.1:1/x.png"})[1].count("--allow-url-images") == 1
    assert _status({"type": "file", "value": "/etc/passwd"})[0] == 400
    assert _status({"value": "x"})[0] == 400
    assert _status(123)[0] == 400
    # over the pixel limit, and a decompression bomb (a 1-bit PNG claiming 400 megapixels): 413
    assert _status({"type": "base64", "value": _b64(_png(np.zeros((400, 400, 3), np.uint8)))})[0] == 413
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 200_000
    assert _status({"type": "base64", "value": _b64(buf.getvalue())}, ServeConfig())[0] == 413


def test_content_id_depends_on_pixels_shape_and_the_server_secret() -> None:
    content_id = ContentIds().of_pixels
    a = np.zeros((4, 6, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    assert content_id(a) == content_id(a.copy()) != content_id(b)
    assert content_id(a) != content_id(a.reshape(6, 4, 3))
    assert content_id(a).startswith("sam2rt-") and len(content_id(a)) == len("sam2rt-") + 32
    # keyed: another server (another secret) gives another id, so nobody can compute a server's ids
    assert ContentIds().of_pixels(a) != content_id(a)
    import hashlib
    assert hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:32] not in content_id(a)


# --- request parsing -------------------------------------------------------------------------------------
def test_json_body_refuses_nan_inf_and_non_objects() -> None:
    for raw in (b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1e400}', b"{", b"", b"\xff\xfe"):
        with pytest.raises(ApiError) as ei:
            parse_json_body(raw)
        assert ei.value.status == 400
    with pytest.raises(ApiError) as ei:
        parse_json_body(b"[1, 2]")
    assert ei.value.status == 422
    assert parse_json_body(b'{"a": 1.5}') == {"a": 1.5}


def test_prompts_in_three_shapes_and_errors() -> None:
    one = {"box": {"x": 5, "y": 6, "width": 4, "height": 2}, "points": [{"x": 1, "y": 2, "positive": False}]}
    for raw in ({"prompts": [one]}, [one], one):
        (p,) = parse_prompts(raw)
        assert p.box.xyxy() == (3.0, 5.0, 7.0, 7.0)  # x, y is the box centre
        assert p.points[0].positive is False
    for raw in (None, [], {"prompts": []}, {"prompts": None}, [{}]):
        with pytest.raises(ApiError) as ei:
            parse_prompts(raw)
        assert ei.value.status == 400 and "prompt" in ei.value.message
    for raw in ([{"points": [{"x": "1", "y": 2, "positive": True}]}], [{"points": [{"x": 1, "y": 2, "positive": "yes"}]}],
                [{"box": {"x": 1, "y": 2, "width": -1, "height": 1}}], "box", [{"points": [{"x": 1, "y": 2}]}]):
        with pytest.raises(ApiError) as ei:
            parse_prompts(raw)
        assert ei.value.status == 422, raw


def test_mask_input_shapes() -> None:
    lo = np.zeros((256, 256), np.float32)
    assert len(parse_mask_input(lo.tolist(), "json", 3)) == 3
    buf = io.BytesIO()
    np.save(buf, np.stack([lo, lo + 1])[:, None])
    got = parse_mask_input(_b64(buf.getvalue()), "binary", 2)
    assert got[1].shape == (1, 256, 256) and got[1][0, 0, 0] == 1
    for value, fmt in ((np.zeros((2, 256, 256)).tolist(), "json"), ([[1, 2], [3]], "json"), ("x", "xml")):
        with pytest.raises(ApiError):
            parse_mask_input(value, fmt, 3)


# --- the app without a model (FastAPI's TestClient, in process) -------------------------------------------
def test_url_images_only_when_allowed(tmp_path) -> None:
    import http.server
    import threading

    arr = np.random.default_rng(3).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(_png(arr))
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/a.png"
        assert "--allow-url-images" in _status({"type": "url", "value": url})[1]
        allowed = ServeConfig(allow_url_images=True)
        assert np.array_equal(decode_image({"type": "url", "value": url}, allowed), arr)
        assert _status({"type": "url", "value": url.replace("a.png", "missing.png")}, allowed)[0] == 400
        assert _status({"type": "url", "value": "file:///etc/passwd"}, allowed)[0] == 400
    finally:
        httpd.shutdown()


def test_app_routing_checks_without_a_model() -> None:
    from fastapi.testclient import TestClient

    from sam2rt.serve.app import create_app
    from sam2rt.serve.state import Sam2Server

    cfg = ServeConfig(api_keys=("k",), max_body_bytes=1000, max_queue=4)
    with TestClient(create_app(cfg, Sam2Server(cfg, models={}))) as client:
        ok = {"image_id": "i", "prompts": [{"points": [{"x": 1, "y": 1, "positive": True}]}]}
        assert client.post("/sam2/segment_image", json=ok).status_code == 401
        assert client.post("/sam2/segment_image?api_key=k", json=ok).status_code == 404  # no model loaded
        r = client.post("/sam2/segment_image", json={**ok, "api_key": "k", "sam2_version_id": "hiera_small"})
        assert r.status_code == 404 and "loaded: none" in r.json()["message"]
        r = client.post("/sam2/segment_image", headers={"Authorization": "Bearer k"}, content=b"x" * 2000)
        assert r.status_code == 413 and "--max-body-mb" in r.json()["message"]
        many = {**ok, "api_key": "k", "prompts": [ok["prompts"][0]] * 300}
        cfg.max_body_bytes = 1 << 20
        r = client.post("/sam2/segment_image", json=many)
        assert r.status_code == 400 and "at most 256" in r.json()["message"]
        clicks = {**ok, "api_key": "k", "prompts": [{"points": [{"x": 1, "y": 1, "positive": True}] * 129}]}
        r = client.post("/sam2/segment_image", json=clicks)
        assert r.status_code == 400 and "at most 128 per prompt" in r.json()["message"]
        assert client.get("/nowhere").json()["message"].startswith("no route")
        assert client.get("/sam2/segment_image").status_code == 405
        assert client.get("/readiness").json() == {"status": "ready"}


def test_readiness_while_loading_and_after_a_failed_load(tmp_path) -> None:
    from fastapi.testclient import TestClient

    from sam2rt.serve.app import create_app

    errors: list[str] = []
    cfg = ServeConfig(model_dirs=[tmp_path / "missing"])
    app = create_app(cfg, on_load_error=errors.append)
    client = TestClient(app)
    assert client.get("/readiness").status_code == 503  # lifespan not started: models not loaded
    with client:
        for _ in range(200):
            if errors:
                break
            time.sleep(0.05)
        r = client.get("/readiness")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "does not exist" in r.json()["message"]
        r = client.post("/sam2/embed_image", json={"image_id": "x"})
        assert r.status_code == 503 and "Retry-After" in r.headers
    assert errors and "does not exist" in errors[0]


def test_cli_refuses_a_wrong_model_dir(tmp_path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sam2rt", "serve", "--model-dir", str(tmp_path / "nope"), "--port", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_embedding_bytes_counts_device_buffers() -> None:
    from sam2rt.runtime import Embedding
    from sam2rt.serve.state import embedding_bytes

    host = Embedding({"image_embed": np.zeros((1, 256, 64, 64), np.float32)}, (10, 10), "k")
    assert embedding_bytes(host) == 256 * 64 * 64 * 4
    device = Embedding({"image_embed": object()}, (10, 10), "k", device="cuda")  # a buffer without nbytes
    assert embedding_bytes(device) == 16 * (1 << 20)


# --- issue 10: keys, ids, caps, memory budget ---------------------------------------------------------------
def test_key_ring_namespaces() -> None:
    from sam2rt.errors import Sam2rtError
    from sam2rt.serve.keys import PUBLIC, KeyRing

    assert KeyRing().namespace(None) == PUBLIC and not KeyRing().required
    ring = KeyRing(["alpha", "beta"])
    assert ring.namespace("alpha") == "key0" and ring.namespace("beta") == "key1"
    for bad in (None, "", "alph", "alpha ", "\ud800", 5):
        assert ring.namespace(bad) is None  # a lone surrogate is just a wrong key, never an error
    with pytest.raises(Sam2rtError):
        KeyRing(["a", "a"])


def test_key_file(tmp_path) -> None:
    from sam2rt.errors import Sam2rtError
    from sam2rt.serve.keys import read_key_file

    (tmp_path / "k").write_text("# team keys\none\n\n  two  \n")
    assert read_key_file(tmp_path / "k") == ["one", "two"]
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(Sam2rtError, match="no keys"):
        read_key_file(tmp_path / "empty")
    with pytest.raises(Sam2rtError):
        read_key_file(tmp_path / "missing")


def test_image_id_checks() -> None:
    from sam2rt.serve.ids import check_image_id

    check_image_id("photo.jpg")
    for bad, fragment in (("\udcff", "surrogate"), ("x" * 300, "at most"), ("a\nb", "control"), ("", "non-empty")):
        with pytest.raises(ApiError, match=fragment) as ei:
            check_image_id(bad)
        assert ei.value.status == 422


def test_source_digest_only_for_self_contained_images() -> None:
    ids = ContentIds()
    a = ids.of_source({"type": "base64", "value": "QUJD"})
    assert a == ids.of_source({"type": "BASE64", "value": "QUJD"}) != ids.of_source({"type": "numpy", "value": "QUJD"})
    assert ids.of_source({"type": "url", "value": "http://x"}) is None and ids.of_source("QUJD") is None


def test_structure_cap_before_parsing() -> None:
    from sam2rt.serve.schemas import check_structure, max_json_values

    limit = max_json_values(256, 128)
    point = b'{"x":1,"y":2,"positive":true}'
    check_structure(b'{"prompts": [{"points": [' + b",".join([point] * 128) + b"]}]}", limit)
    check_structure(b'{"image": {"type": "base64", "value": "' + b"A" * 10_000_000 + b'"}}', limit)  # base64 is free
    with pytest.raises(ApiError) as ei:
        check_structure(b"[" + b",".join([point] * 200_000) + b"]", limit)
    assert ei.value.status == 413 and "at most" in ei.value.message


def test_prompt_counts_checked_before_validation() -> None:
    bad_point = {"x": "not a number", "y": 1, "positive": True}
    with pytest.raises(ApiError) as ei:  # the count is refused first, without validating 129 bad points
        parse_prompts([{"points": [bad_point] * 129}], 256, 128)
    assert ei.value.status == 400 and "at most 128" in ei.value.message
    with pytest.raises(ApiError) as ei:
        parse_prompts([{"box": {"x": 1, "y": 1, "width": 1, "height": 1}}] * 257, 256, 128)
    assert ei.value.status == 400 and "at most 256" in ei.value.message


def test_long_integers_get_a_plain_message() -> None:
    with pytest.raises(ApiError) as ei:
        parse_json_body(b'{"a": ' + b"1" * 5000 + b"}")
    assert ei.value.status == 400 and "digits" in ei.value.message and "sys.set_int_max_str_digits" not in ei.value.message


def test_strict_base64_and_float_images() -> None:
    status, msg = _status({"type": "base64", "value": "!!!!@@@@####"})
    assert status == 400 and "not valid base64" in msg and "'!'" in msg
    arr = np.random.default_rng(4).integers(0, 255, (12, 10, 3), dtype=np.uint8)
    wrapped = "\n".join(_b64(_png(arr))[i:i + 76] for i in range(0, len(_b64(_png(arr))), 76))  # MIME line breaks
    assert np.array_equal(decode_image({"type": "base64", "value": wrapped}, CFG), arr)
    gray = arr[..., 0]
    for scale in (1 / 255, 1.0):
        buf = io.BytesIO()
        Image.fromarray(gray.astype(np.float32) * scale).save(buf, "TIFF")
        out = decode_image({"type": "base64", "value": _b64(buf.getvalue())}, CFG)
        assert np.array_equal(out[..., 0], gray)  # [0, 1] scaled, [0, 255] kept; not clipped to black
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 300.0, np.float32)).save(buf, "TIFF")
    assert "[0, 1]" in _status({"type": "base64", "value": _b64(buf.getvalue())})[1]


def test_probe_reads_size_without_decoding() -> None:
    from sam2rt.serve.images import probe_image

    arr = np.zeros((20, 40, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    probe = probe_image({"type": "base64", "value": _b64(_png(arr, exif=exif))}, CFG)
    assert (probe.width, probe.height) == (20, 40)  # rotated, as the decoded image will be


def test_memory_budget_waits_first_come_first_served_and_refuses_the_impossible() -> None:
    import asyncio

    from sam2rt.serve.budget import MemoryBudget

    async def main() -> None:
        budget = MemoryBudget(100)
        order: list[str] = []
        with pytest.raises(ApiError) as ei:
            await budget.acquire(101, "too big; ask for less")
        assert ei.value.status == 413 and "ask for less" in ei.value.message
        first = await budget.acquire(60, "")

        async def take(name: str, n: int) -> None:
            async with budget.hold(n, ""):
                order.append(name)
                await asyncio.sleep(0.01)

        waiting = asyncio.ensure_future(take("b", 60))
        gone = asyncio.ensure_future(take("gone", 60))
        await asyncio.sleep(0.01)
        assert order == [] and budget.used == 60
        gone.cancel()  # a waiter that leaves holds nothing
        budget.release(first)
        await waiting
        await asyncio.gather(gone, return_exceptions=True)
        assert order == ["b"] and budget.used == 0

    asyncio.run(main())


def test_answer_pixel_limit_says_how_to_ask_for_less() -> None:
    from sam2rt.serve.answers import check_answer_size

    cfg = ServeConfig(max_answer_pixels=1000)
    check_answer_size(10, (10, 10), "binary", cfg)
    with pytest.raises(ApiError) as ei:
        check_answer_size(11, (10, 10), "binary", cfg)
    assert ei.value.status == 413 and "rle" in ei.value.message and "--max-answer-pixels" in ei.value.message


def test_streamed_npz_reads_back_like_savez() -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from sam2rt.serve.answers import stream_npz

    rng = np.random.default_rng(5)
    pieces = [(rng.normal(size=(1, 30, 40)).astype(np.float32), np.ones(1), rng.normal(size=(1, 256, 256)).astype(np.float32))
              for _ in range(3)]
    done: list[bool] = []
    saved: list[np.ndarray] = []

    async def main() -> bytes:
        with ThreadPoolExecutor(1) as pool:
            return b"".join([p async for p in stream_npz(pool, 3, (30, 40), iter(pieces), saved.append, lambda: done.append(True))])

    data = asyncio.run(main())
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        assert np.array_equal(z["masks"], np.concatenate([p[0] for p in pieces]))
        assert np.array_equal(z["low_res_masks"], np.concatenate([p[2] for p in pieces]))
    assert done == [True] and saved[0].shape == (3, 256, 256)


def test_streamed_npz_stops_when_the_reader_leaves() -> None:
    """A client that disconnects mid-answer: the producer stops at its next write (it does not decode the
    remaining prompts) and the memory it held is released (on_done)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from sam2rt.serve.answers import stream_npz

    taken: list[int] = []

    def pieces():
        for i in range(50):
            taken.append(i)
            yield np.random.default_rng(i).normal(size=(1, 1000, 1000)).astype(np.float32), np.ones(1), np.zeros((1, 256, 256), np.float32)

    done: list[bool] = []

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            stream = stream_npz(pool, 50, (1000, 1000), pieces(), lambda low: None, lambda: done.append(True))
            await stream.__anext__()
            await stream.aclose()
            for _ in range(200):
                if done:
                    break
                await asyncio.sleep(0.02)

    asyncio.run(main())
    assert done == [True]
    assert len(taken) < 50


# --- model ids: both spellings of base-plus ---------------------------------------------------------
def _tiny_dir_served_as(tiny_model_dir, dst, serve_id: str):
    """A copy of the tiny model whose manifest says it is base-plus, served under `serve_id`."""
    import json
    import shutil

    d = shutil.copytree(tiny_model_dir, dst)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["model"].update(name="hiera_base_plus", model_id="sam2.1_hiera_base_plus", serve_id=serve_id)
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_canonical_serve_id() -> None:
    from sam2rt.model_specs import canonical_serve_id
    from sam2rt.serve.schemas import VERSION_IDS

    assert VERSION_IDS == ("hiera_tiny", "hiera_small", "hiera_b_plus", "hiera_large")
    assert canonical_serve_id("hiera_base_plus") == canonical_serve_id("hiera_b_plus") == "hiera_b_plus"
    for vid in VERSION_IDS:
        assert canonical_serve_id(vid) == vid
    assert canonical_serve_id("hiera_huge") == "hiera_huge"  # unknown: left for the 404 that lists what is loaded


@pytest.mark.parametrize("manifest_id", ["hiera_b_plus", "hiera_base_plus"])
def test_server_accepts_both_spellings_of_base_plus(tiny_model_dir, tmp_path, manifest_id) -> None:
    from fastapi.testclient import TestClient

    from sam2rt.serve.app import create_app
    from sam2rt.serve.state import Sam2Server

    cfg = ServeConfig(model_dirs=[_tiny_dir_served_as(tiny_model_dir, tmp_path / "bplus", manifest_id)])
    srv = Sam2Server(cfg)
    srv.load_models()
    assert sorted(srv.models) == ["hiera_b_plus"]  # whatever the manifest spells, served under Roboflow's id
    image = {"type": "base64", "value": _b64(_png(np.full((40, 60, 3), 90, np.uint8)))}
    prompt = [{"points": [{"x": 20, "y": 10, "positive": True}]}]
    with TestClient(create_app(cfg, srv)) as client:
        r = client.post("/sam2/embed_image", json={"image": image, "sam2_version_id": "hiera_base_plus"})
        assert r.status_code == 200, r.text
        image_id = r.json()["image_id"]
        answers = {}
        for vid in ("hiera_b_plus", "hiera_base_plus"):
            # by image_id alone: the embedding cached under one spelling is found under the other
            r = client.post("/sam2/segment_image", json={"image_id": image_id, "prompts": prompt, "sam2_version_id": vid,
                                                          "format": "rle"})
            assert r.status_code == 200, (vid, r.text)
            answers[vid] = r.json()["predictions"]
        assert answers["hiera_b_plus"] == answers["hiera_base_plus"]
        r = client.post("/sam2/segment_image", json={"image_id": image_id, "prompts": prompt, "sam2_version_id": "hiera_large"})
        assert r.status_code == 404 and "loaded: hiera_b_plus" in r.json()["message"]
        assert [m["sam2_version_id"] for m in client.get("/info").json()["models"]] == ["hiera_b_plus"]


def test_two_dirs_of_one_model_in_two_spellings_are_refused(tiny_model_dir, tmp_path) -> None:
    from sam2rt.errors import Sam2rtError
    from sam2rt.serve.state import Sam2Server

    dirs = [_tiny_dir_served_as(tiny_model_dir, tmp_path / vid, vid) for vid in ("hiera_b_plus", "hiera_base_plus")]
    with pytest.raises(Sam2rtError, match="hiera_b_plus"):
        Sam2Server(ServeConfig(model_dirs=dirs)).load_models()
