"""`sam2rt serve` as a real process on 127.0.0.1, driven by the real inference-sdk client and httpx.

Masks are compared with the runtime's own (tests/conftest.py's random-weight hiera_tiny). Random
weights give ragged masks with many holes, which polygons cannot carry (the spec: "holes are not
represented"); so filled-back polygons are compared with the runtime mask with its holes filled,
and the `rle` format (which keeps holes) must equal the runtime mask exactly.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from scipy import ndimage  # noqa: E402

from conftest import photo  # noqa: E402
from sam2rt.runtime import Prompt  # noqa: E402
from sam2rt.serve.encode import polygons_to_mask, rle_to_mask  # noqa: E402
from sam2rt.serve.images import content_id  # noqa: E402

MB = 1 << 20
CACHE_MB = 400  # ten hiera CPU embeddings (38 MB each, fast-decoder tensors included): the eight load-test images fit
LOAD_SECONDS = float(os.environ.get("SAM2RT_LOAD_SECONDS", "20"))
LOAD_CLIENTS = 32
MIN_STEADY_S = 4.0  # load after the first round, even when embedding the images took most of LOAD_SECONDS
RSS_MARGIN_MB = 300
# eight photos, cropped small so that decoding and polygons stay cheap (the encoder always sees 1024x1024)
LOAD_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry", "moon")


# --- helpers ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `python -m sam2rt serve` subprocess on a free loopback port."""

    def __init__(self, model_dir: Path, log: Path, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "sam2rt", "serve", "--model-dir", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", *extra]
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> "Server":
        """Poll /readiness until the models are loaded (the process started in __init__)."""
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/readiness", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready in {timeout:g} s:\n{self.log.read_text()}")
            time.sleep(0.2)

    def rss(self) -> int:
        """The server process's resident memory in bytes."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value}."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


def _png_b64(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return base64.b64encode(buf.tobytes()).decode()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _poly_iou(polygons: list, expected: np.ndarray) -> float:
    """IoU of filled-back polygons with the expected mask, holes filled (polygons carry no holes)."""
    return _iou(polygons_to_mask(polygons, expected.shape), ndimage.binary_fill_holes(expected))


def load_image(name: str) -> np.ndarray:
    img = photo(name)
    return np.ascontiguousarray(img[:200, :240])


def _runtime_prompt(p: dict[str, Any]) -> Prompt:
    pts = labels = box = None
    if p.get("points"):
        pts = np.array([[q["x"], q["y"]] for q in p["points"]], float)
        labels = np.array([1.0 if q["positive"] else 0.0 for q in p["points"]])
    if p.get("box"):
        b = p["box"]
        box = np.array([b["x"] - b["width"] / 2, b["y"] - b["height"] / 2, b["x"] + b["width"] / 2, b["y"] + b["height"] / 2])
    return Prompt(pts, labels, box)


POINT = {"points": [{"x": 120, "y": 90, "positive": True}]}
BOX = {"box": {"x": 110, "y": 100, "width": 120, "height": 90}}  # centre (110, 100): corners (50, 55)-(170, 145)
CLICKS = {"points": [{"x": 60, "y": 50, "positive": True}, {"x": 180, "y": 150, "positive": False}]}
BOX_AND_POINT = {"box": {"x": 100, "y": 100, "width": 80, "height": 60}, "points": [{"x": 100, "y": 100, "positive": True}]}


# --- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """Two servers, started together: the default one, and a locked-down one with an API key, small limits,
    a one-request queue and room for ONE embedding."""
    logs = tmp_path_factory.mktemp("serve")
    main = Server(model_dir, logs / "server.log", "--cache-mb", str(CACHE_MB))
    locked = Server(model_dir, logs / "locked.log", "--api-key", "s3cret", "--max-body-mb", "1",
                    "--max-image-pixels", "100000", "--max-queue", "1", "--cache-mb", "60", "--decode-workers", "1")
    try:
        yield main.wait_ready(), locked.wait_ready()
    finally:
        main.stop()
        locked.stop()
    for s in (main, locked):  # nothing the tests sent made the server log a traceback
        assert "Traceback" not in s.log.read_text(), s.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def server(servers: tuple[Server, Server]) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def locked(servers: tuple[Server, Server]) -> Server:
    return servers[1]


@pytest.fixture(scope="module")
def astro(sam2rt_model) -> dict[str, Any]:
    """The first load-test image, its PNG file, and its embedding made by the runtime in this process."""
    rgb = load_image("astronaut")
    return {"rgb": rgb, "b64": _png_b64(rgb), "emb": sam2rt_model.embed(rgb), "id": content_id(rgb)}


def _runtime_best(model, emb, prompts: list[dict], multimask: bool = True, masks_in=None):
    rt = [_runtime_prompt(p) for p in prompts]
    if masks_in is not None:
        for r, m in zip(rt, masks_in):
            r.mask_input = m
    return model.decode(emb, rt, multimask_output=multimask).best()


def _post(url: str, body: Any, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url, content=content, headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                      timeout=kw.pop("timeout", 120), **kw)


# --- the real client ---------------------------------------------------------------------------------------
def test_service_endpoints(server: Server) -> None:
    from inference_sdk import InferenceHTTPClient

    info = InferenceHTTPClient(api_url=server.url).get_server_info()
    assert info.name == "sam2rt" and info.uuid
    body = httpx.get(server.url + "/info").json()
    assert [m["sam2_version_id"] for m in body["models"]] == ["hiera_tiny"]
    assert httpx.get(server.url + "/healthz").json() == {"status": "healthy"}
    assert httpx.get(server.url + "/readiness").json() == {"status": "ready"}
    assert "sam2rt" in httpx.get(server.url + "/").text
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'sam2rt_requests_total{path="/healthz",status="200"}' in r.text
    assert "sam2rt_embedding_cache_max_bytes" in r.text


def test_sdk_client_point_box_and_multi_prompt(server: Server, astro: dict, sam2rt_model, tmp_path: Path) -> None:
    """inference-sdk's sam2_segment_image on a PNG file: polygons match the runtime's masks."""
    from inference_sdk import InferenceHTTPClient

    path = tmp_path / "astro.png"
    cv2.imwrite(str(path), astro["rgb"][..., ::-1])
    client = InferenceHTTPClient(api_url=server.url)
    cases = [[POINT], [BOX], [POINT, BOX, CLICKS, BOX_AND_POINT]]
    for prompts in cases:
        result = client.sam2_segment_image(str(path), prompts=prompts)
        expected = _runtime_best(sam2rt_model, astro["emb"], prompts)
        preds = result["predictions"]
        assert len(preds) == len(prompts)
        for pred, mask, score in zip(preds, expected.masks[:, 0], expected.scores[:, 0]):
            assert pred["format"] == "polygon"
            assert abs(pred["confidence"] - float(score)) < 1e-4
            assert _poly_iou(pred["masks"], mask) >= 0.98
    # each prompt of the batch equals asking for it alone (mixed box / no-box, different point counts)
    for p, alone in zip(cases[2], [_runtime_best(sam2rt_model, astro["emb"], [p]) for p in cases[2]]):
        r = client.sam2_segment_image(str(path), prompts=[p], mask_input_format="rle")
        assert np.array_equal(rle_to_mask(r["predictions"][0]["masks"]), alone.masks[0, 0])
    # single-mask output and the rle format: exactly the runtime's mask
    r = client.sam2_segment_image(str(path), prompts=[CLICKS], multimask_output=False, mask_input_format="rle")
    expected = _runtime_best(sam2rt_model, astro["emb"], [CLICKS], multimask=False)
    assert np.array_equal(rle_to_mask(r["predictions"][0]["masks"]), expected.masks[0, 0])


def test_prompt_shapes_and_binary_format(server: Server, astro: dict, sam2rt_model) -> None:
    expected = _runtime_best(sam2rt_model, astro["emb"], [BOX])
    for prompts in ({"prompts": [BOX]}, [BOX], BOX):
        r = _post(server.url + "/sam2/segment_image", {"image": {"type": "base64", "value": astro["b64"]},
                                                        "prompts": prompts, "format": "rle"})
        assert r.status_code == 200, r.text
        assert np.array_equal(rle_to_mask(r.json()["predictions"][0]["masks"]), expected.masks[0, 0])
    r = _post(server.url + "/sam2/segment_image", {"image_id": astro["id"], "prompts": [BOX, POINT], "format": "binary"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
        masks, low = z["masks"], z["low_res_masks"]
    assert masks.shape == (2, 200, 240) and low.shape == (2, 256, 256)
    assert np.array_equal(masks[0] > 0, expected.masks[0, 0])
    np.testing.assert_allclose(low[0], expected.low_res_logits[0, 0], atol=1e-4)


def test_image_id_reuses_cached_embedding(server: Server) -> None:
    """embed_image once; then segment_image with only the image_id: no encoder run, a cache hit, faster."""
    rgb = load_image("coffee")
    before = server.metrics()
    r = _post(server.url + "/sam2/embed_image", {"image": {"type": "base64", "value": "data:image/png;base64," + _png_b64(rgb)}})
    assert r.status_code == 200, r.text
    embed = r.json()
    assert embed["image_id"] == content_id(rgb)  # no id given: the content hash of the decoded pixels
    mid = server.metrics()
    assert mid['sam2rt_embeddings_computed_total{model="hiera_tiny"}'] - before.get(
        'sam2rt_embeddings_computed_total{model="hiera_tiny"}', 0) == 1
    t0 = time.perf_counter()
    r = _post(server.url + "/sam2/segment_image", {"image_id": embed["image_id"], "prompts": [POINT]})
    wall = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    after = server.metrics()
    assert after['sam2rt_embeddings_computed_total{model="hiera_tiny"}'] == mid['sam2rt_embeddings_computed_total{model="hiera_tiny"}']
    assert after["sam2rt_embedding_cache_hits_total"] == mid["sam2rt_embedding_cache_hits_total"] + 1
    assert r.json()["time"] < embed["time"] and wall < embed["time"]
    # a second embed_image of the same image is a cache hit too
    r = _post(server.url + "/sam2/embed_image", {"image_id": embed["image_id"]})
    assert r.status_code == 200 and r.json()["image_id"] == embed["image_id"]
    assert server.metrics()['sam2rt_embeddings_computed_total{model="hiera_tiny"}'] == mid[
        'sam2rt_embeddings_computed_total{model="hiera_tiny"}']


def test_logits_saved_then_loaded(server: Server, astro: dict, sam2rt_model) -> None:
    """save_logits_to_cache stores a prompt set's low-res logits; a later load_logits_from_cache request with
    one more point feeds them as mask_input (interactive refinement), exactly as the runtime would."""
    first = {"points": [{"x": 70, "y": 60, "positive": True}]}
    refined = {"points": first["points"] + [{"x": 150, "y": 130, "positive": False}]}
    url = server.url + "/sam2/segment_image"
    r = _post(url, {"image": {"type": "base64", "value": astro["b64"]}, "prompts": [first], "save_logits_to_cache": True,
                    "format": "rle"})
    assert r.status_code == 200, r.text
    prior = _runtime_best(sam2rt_model, astro["emb"], [first]).low_res_logits[:, 0]  # (1,256,256)
    with_prior = _runtime_best(sam2rt_model, astro["emb"], [refined], masks_in=[prior])
    without = _runtime_best(sam2rt_model, astro["emb"], [refined])
    assert not np.array_equal(with_prior.masks, without.masks)  # else this test could not tell them apart
    hits = server.metrics()["sam2rt_logits_cache_hits_total"]
    r = _post(url, {"image_id": astro["id"], "prompts": [refined], "load_logits_from_cache": True, "format": "rle"})
    assert r.status_code == 200, r.text
    assert np.array_equal(rle_to_mask(r.json()["predictions"][0]["masks"]), with_prior.masks[0, 0])
    assert server.metrics()["sam2rt_logits_cache_hits_total"] == hits + 1
    # without load_logits_from_cache the saved logits are not used
    r = _post(url, {"image_id": astro["id"], "prompts": [refined], "format": "rle"})
    assert np.array_equal(rle_to_mask(r.json()["predictions"][0]["masks"]), without.masks[0, 0])
    # the same logits sent explicitly as mask_input (json nested lists) give the same answer
    r = _post(url, {"image_id": astro["id"], "prompts": [refined], "mask_input": prior[0].tolist(), "format": "rle"})
    assert r.status_code == 200, r.text
    assert np.array_equal(rle_to_mask(r.json()["predictions"][0]["masks"]), with_prior.masks[0, 0])


# --- bad input: a 4xx {"message"}, never a 500, and the cache keeps what it had ---------------------------------
def _bad_cases(image_id: str, b64: str) -> list[tuple[str, Any, int, str]]:
    ok = {"image_id": image_id, "prompts": [POINT]}
    seg = "/sam2/segment_image"
    return [
        ("malformed JSON", b'{"image_id": ', 400, "malformed JSON"),
        ("not an object", b"[1, 2]", 422, "object"),
        ("empty body", b"", 400, "empty"),
        ("NaN", b'{"image_id": "%s", "prompts": [{"points": [{"x": NaN, "y": 1, "positive": true}]}]}' % image_id.encode(), 400, "NaN"),
        ("infinity", b'{"image_id": "%s", "prompts": [{"box": {"x": 1e999, "y": 1, "width": 1, "height": 1}}]}' % image_id.encode(), 400, "finite"),
        ("wrong type", {**ok, "prompts": [{"points": [{"x": "ten", "y": 1, "positive": True}]}]}, 422, "points[0].x"),
        ("wrong bool", {**ok, "multimask_output": "maybe"}, 422, "multimask_output"),
        ("negative box", {**ok, "prompts": [{"box": {"x": 5, "y": 5, "width": -2, "height": 3}}]}, 422, "width"),
        ("point outside", {**ok, "prompts": [{"points": [{"x": 500, "y": 10, "positive": True}]}]}, 400, "outside the image"),
        ("box outside", {**ok, "prompts": [POINT, {"box": {"x": 230, "y": 100, "width": 40, "height": 10}}]}, 400, "prompts[1]"),
        ("no prompts", {"image_id": image_id, "prompts": []}, 400, "prompt"),
        ("missing prompts", {"image_id": image_id}, 400, "prompt"),
        ("empty prompt", {**ok, "prompts": [{}]}, 400, "neither a box nor points"),
        ("unknown format", {**ok, "format": "svg"}, 400, "format must be one of"),
        ("unknown version", {**ok, "sam2_version_id": "hiera_large"}, 404, "loaded: hiera_tiny"),
        ("unknown image_id", {"image_id": "never-seen", "prompts": [POINT]}, 404, "not cached"),
        ("no image at all", {"prompts": [POINT]}, 422, "image"),
        ("undecodable image", {"image": {"type": "base64", "value": base64.b64encode(b"GIF89a junk").decode()}, "prompts": [POINT]}, 400, "Could not load input image"),
        ("bad base64", {"image": {"type": "base64", "value": "@@@"}, "prompts": [POINT]}, 400, "Could not load input image"),
        ("pickled numpy", {"image": {"type": "numpy", "value": base64.b64encode(b"\x80\x04K\x01.").decode()}, "prompts": [POINT]}, 400, "pickle"),
        ("url disabled", {"image": {"type": "url", "value": "http://127.0.0.1:9/a.png"}, "prompts": [POINT]}, 400, "--allow-url-images"),
        ("bad mask_input", {**ok, "mask_input": [[1, 2], [3, 4]]}, 422, "mask_input"),
        ("image list", {"image": [{"type": "base64", "value": b64}], "prompts": [POINT]}, 400, "one image per request"),
        ("embed unknown id", ("/sam2/embed_image", {"image_id": "nope"}), 404, "not cached"),
        ("unknown route", ("/sam2/nothing", {}), 404, "no route"),
    ]


def test_bad_inputs_get_4xx_and_lose_nothing(server: Server, astro: dict) -> None:
    r = _post(server.url + "/sam2/embed_image", {"image": {"type": "base64", "value": astro["b64"]}})
    assert r.status_code == 200 and r.json()["image_id"] == astro["id"]
    before = server.metrics()
    failures = []
    for name, body, status, fragment in _bad_cases(astro["id"], astro["b64"]):
        path = "/sam2/segment_image"
        if isinstance(body, tuple):
            path, body = body
        r = _post(server.url + path, body)
        msg = r.json().get("message", "") if r.headers.get("content-type", "").startswith("application/json") else ""
        if r.status_code != status or fragment not in msg or "Traceback" in r.text:
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    after = server.metrics()
    for key in ("sam2rt_embedding_cache_entries", "sam2rt_embedding_cache_bytes", "sam2rt_embedding_cache_evictions"):
        assert after[key] == before[key], key
    assert not any(k.startswith("sam2rt_requests_total") and 'status="500"' in k for k in after)
    r = _post(server.url + "/sam2/segment_image", {"image_id": astro["id"], "prompts": [POINT]})
    assert r.status_code == 200  # still cached
    # unknown fields (the real client and others send their own) are ignored
    r = _post(server.url + "/sam2/segment_image", {"image_id": astro["id"], "prompts": [POINT], "source": "sdk",
                                                    "usage_billable": True, "id": "x", "disable_model_monitoring": True,
                                                    "api_key": None, "model_id": None})
    assert r.status_code == 200, r.text


# --- the locked-down server: key, limits, queue, cache bound ------------------------------------------------------
def test_api_key_required(locked: Server) -> None:
    from inference_sdk import InferenceHTTPClient
    from inference_sdk.http.errors import HTTPCallErrorError

    url = locked.url + "/sam2/segment_image"
    body = {"image_id": "unknown", "prompts": [POINT]}
    assert _post(url, body).status_code == 401
    assert _post(url, {**body, "api_key": "wrong"}).status_code == 401
    assert _post(url + "?api_key=wrong", {**body, "api_key": "s3cret"}).status_code == 401  # query wins over body
    assert _post(url, body, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = _post(url, body)
    assert "API key" in r.json()["message"]
    # with the key (body, Bearer, query), the request gets past auth: 404 for the unknown image_id
    assert _post(url, {**body, "api_key": "s3cret"}).status_code == 404
    assert _post(url, body, headers={"Authorization": "Bearer s3cret"}).status_code == 404
    assert _post(url + "?api_key=s3cret", body).status_code == 404
    with pytest.raises(HTTPCallErrorError) as ei:
        InferenceHTTPClient(api_url=locked.url).sam2_segment_image("aGVsbG8=", prompts=[POINT])
    assert ei.value.status_code == 401 and "API key" in ei.value.api_message
    with pytest.raises(HTTPCallErrorError) as ei:  # with the key, the client's body api_key passes auth
        InferenceHTTPClient(api_url=locked.url, api_key="s3cret").sam2_segment_image("aGVsbG8=", prompts=[POINT])
    assert ei.value.status_code == 400 and "Could not load input image" in ei.value.api_message


def test_size_limits_413(locked: Server) -> None:
    url = locked.url + "/sam2/segment_image?api_key=s3cret"
    big = {"image": {"type": "base64", "value": "A" * (2 * MB)}, "prompts": [POINT]}
    r = _post(url, big)
    assert r.status_code == 413 and "--max-body-mb" in r.json()["message"]
    too_many = {"image": {"type": "base64", "value": _png_b64(np.zeros((400, 400, 3), np.uint8))}, "prompts": [POINT]}
    r = _post(url, too_many)
    assert r.status_code == 413 and "--max-image-pixels" in r.json()["message"]
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")  # ~50 kB claiming 400 megapixels
    bomb = {"image": {"type": "base64", "value": base64.b64encode(buf.getvalue()).decode()}, "prompts": [POINT]}
    r = _post(url, bomb)
    assert r.status_code == 413, r.text


def test_full_queue_answers_503_with_retry_after(locked: Server) -> None:
    """--max-queue 1: a request stuck uploading its body holds the only slot; the next one gets 503."""
    with socket.create_connection(("127.0.0.1", locked.port)) as slow:
        slow.sendall(b"POST /sam2/segment_image?api_key=s3cret HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"image_id\": ")
        deadline = time.time() + 10
        while time.time() < deadline:
            r = _post(locked.url + "/sam2/segment_image?api_key=s3cret", {"image_id": "x", "prompts": [POINT]})
            if r.status_code == 503:
                break
            time.sleep(0.1)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "--max-queue" in r.json()["message"]
    deadline = time.time() + 10  # the slot comes back once the slow client has gone
    while time.time() < deadline:
        r = _post(locked.url + "/sam2/segment_image?api_key=s3cret", {"image_id": "x", "prompts": [POINT]})
        if r.status_code != 503:
            break
        time.sleep(0.1)
    assert r.status_code == 404
    assert locked.metrics()["sam2rt_rejected_queue_full_total"] >= 1


def test_cache_is_bounded_in_bytes(locked: Server) -> None:
    """--cache-mb 60 holds one 38 MB CPU embedding (16 MB features + 22 MB fast-decoder tensors): a second evicts the first."""
    url = locked.url + "/sam2/embed_image?api_key=s3cret"
    ids = []
    for name in ("page", "text"):
        rgb = load_image(name)[:150, :150]  # under the 100k-pixel limit
        r = _post(url, {"image": {"type": "base64", "value": _png_b64(rgb)}, "image_id": name})
        assert r.status_code == 200, r.text
        ids.append(r.json()["image_id"])
    m = locked.metrics()
    assert m["sam2rt_embedding_cache_entries"] == 1 and m["sam2rt_embedding_cache_evictions"] == 1
    assert 30 * MB < m["sam2rt_embedding_cache_bytes"] <= 60 * MB
    assert _post(url, {"image_id": ids[0]}).status_code == 404  # evicted
    assert _post(url, {"image_id": ids[1]}).status_code == 200


# --- load -------------------------------------------------------------------------------------------------------------
def test_load_32_clients_8_images(server: Server, astro: dict, sam2rt_model, capsys: pytest.CaptureFixture) -> None:
    """32 concurrent clients send segment requests over 8 images for LOAD_SECONDS (and at least two rounds):
    the first round all at once (one encoder run per uncached image, however many ask), then each client
    sends again as soon as it has its answer. Zero non-200s, every mask checked, RSS within the cache bound."""
    images = [load_image(n) for n in LOAD_PHOTOS]
    b64s = [_png_b64(x) for x in images]
    ids = [content_id(x) for x in images]
    prompts = [POINT, BOX]
    url = server.url + "/sam2/segment_image"
    # warm the server: ONNX Runtime's arena grows over the first TWO encoder runs (memory pattern planning),
    # then stays; take the memory baseline after them
    for b in b64s[:2]:
        assert _post(url, {"image": {"type": "base64", "value": b}, "prompts": [POINT]}).status_code == 200
    cached = sum(_post(server.url + "/sam2/embed_image", {"image_id": i}).status_code == 200 for i in ids)
    baseline = server.rss()
    computed0 = server.metrics()['sam2rt_embeddings_computed_total{model="hiera_tiny"}']

    expected: dict[tuple[int, int], np.ndarray] = {}  # (image, prompt) -> mask; the first answer, checked below
    wrong: list[str] = []
    statuses: dict[int, int] = {}
    peak = [baseline]

    def check(i: int, k: int, fmt: str, body: dict) -> None:
        (pred,) = body["predictions"]
        if fmt == "rle":
            mask = rle_to_mask(pred["masks"])
            ref = expected.setdefault((i, k), mask)
            if not np.array_equal(mask, ref):
                wrong.append(f"image {i} prompt {k}: rle mask differs from the first answer")
        else:
            ref = expected.get((i, k))
            if ref is None or _poly_iou(pred["masks"], ref) < 0.98:
                wrong.append(f"image {i} prompt {k}: polygons differ")

    async def one(client: httpx.AsyncClient, i: int, k: int, fmt: str, by_id: bool, lat: list[float]) -> None:
        body = {"prompts": [prompts[k]], "format": fmt}
        body.update({"image_id": ids[i]} if by_id else {"image": {"type": "base64", "value": b64s[i]}})
        t0 = time.perf_counter()
        r = await client.post(url, json=body)
        lat.append(time.perf_counter() - t0)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code == 200:
            check(i, k, fmt, r.json())
        else:
            wrong.append(f"status {r.status_code}: {r.text[:200]}")

    async def sample_rss(stop: asyncio.Event) -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], server.rss())
            await asyncio.sleep(0.2)

    async def main() -> tuple[list[float], list[float], float, float]:
        limits = httpx.Limits(max_connections=LOAD_CLIENTS, max_keepalive_connections=LOAD_CLIENTS)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(stop))
            cold: list[float] = []
            t0 = time.perf_counter()
            deadline = t0 + LOAD_SECONDS
            # first round, all at once: 4 clients per image, each (image, prompt) twice; the images not yet
            # cached are embedded now, while 32 requests wait on them
            await asyncio.gather(*(one(client, c % 8, (c // 8) % 2, "rle", False, cold) for c in range(LOAD_CLIENTS)))
            cold_s = time.perf_counter() - t0
            deadline = max(deadline, time.perf_counter() + MIN_STEADY_S)
            steady: list[float] = []
            rng = random.Random(0)

            async def worker() -> None:
                done = 0  # every client keeps sending until the deadline
                while done == 0 or time.perf_counter() < deadline:
                    fmt = "json" if rng.random() < 0.25 else "rle"
                    await one(client, rng.randrange(8), rng.randrange(2), fmt, rng.random() < 0.5, steady)
                    done += 1

            await asyncio.gather(*(worker() for _ in range(LOAD_CLIENTS)))
            total_s = time.perf_counter() - t0
            stop.set()
            await sampler
            return cold, steady, cold_s, total_s

    cold, steady, cold_s, total_s = asyncio.run(main())
    m = server.metrics()
    lat = cold + steady
    p50, p99 = (float(np.percentile(lat, q)) for q in (50, 99))
    s50, s99 = (float(np.percentile(steady, q)) for q in (50, 99))
    with capsys.disabled():
        print(f"\nload: {LOAD_CLIENTS} clients, 8 images, {total_s:.1f} s, {len(lat)} requests "
              f"({len(lat) / total_s:.1f} req/s), statuses {statuses}: p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms; "
              f"first round {cold_s:.1f} s ({8 - cached} encoder runs); after it: {len(steady)} requests, "
              f"p50 {s50 * 1e3:.0f} ms, p99 {s99 * 1e3:.0f} ms; RSS baseline {baseline / MB:.0f} MB, "
              f"peak {peak[0] / MB:.0f} MB (cache bound {CACHE_MB} MB, margin {RSS_MARGIN_MB} MB)")
    assert not wrong, wrong[:5]
    assert set(statuses) == {200}
    assert len(steady) >= LOAD_CLIENTS
    # single flight: one encoder run per image that was not cached, though 4 clients asked at once
    assert m['sam2rt_embeddings_computed_total{model="hiera_tiny"}'] - computed0 == 8 - cached
    assert m["sam2rt_embedding_cache_bytes"] <= CACHE_MB * MB
    assert peak[0] <= baseline + CACHE_MB * MB + RSS_MARGIN_MB * MB
    # answers are per image: the same prompt gives different masks on different images
    assert len({expected[(i, 0)].tobytes() for i in range(8) if expected[(i, 0)].shape == (200, 240)}) > 1
    # and image 0's answers are the runtime's own masks
    for k, p in enumerate(prompts):
        assert np.array_equal(expected[(0, k)], _runtime_best(sam2rt_model, astro["emb"], [p]).masks[0, 0])
