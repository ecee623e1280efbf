"""The server's memory and admission bounds found missing by an adversarial review: a wide, short image's upsampling,
decoder runs of many prompts and points, streamed answers keeping their admission slot, integer images, and strict
mask_input parsing. No server process."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import tracemalloc

import numpy as np
import pytest

pytest.importorskip("fastapi")

from sam2rt.serve.config import ServeConfig  # noqa: E402
from sam2rt.serve.errors import ApiError  # noqa: E402


def _width_then_height(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The upsampling as ATen orders it (the runtime's graph too): width first, then height."""
    from sam2rt.runtime.postprocess import _linear_taps

    c0, c1, cl = _linear_taps(x.shape[-1], hw[1])
    x = np.take(x, c0, axis=-1) * (1 - cl) + np.take(x, c1, axis=-1) * cl
    r0, r1, rl = _linear_taps(x.shape[-2], hw[0])
    return np.take(x, r0, axis=-2) * (1 - rl[:, None]) + np.take(x, r1, axis=-2) * rl[:, None]


@pytest.mark.parametrize("hw", [(1, 4000), (3, 1000), (100, 37), (255, 300), (256, 256), (257, 31), (1080, 1920)])
def test_upsampling_rows_first_gives_the_same_values(hw):
    from sam2rt.runtime.postprocess import upsample_logits

    x = (np.random.default_rng(hw[1]).standard_normal((2, 3, 256, 256)) * 8).astype(np.float32)
    np.testing.assert_array_equal(upsample_logits(x, hw), _width_then_height(x, hw))


def test_a_wide_short_mask_is_upsampled_in_memory_of_its_own_size():
    """1 x 400,000: the width-first order's (256, W) buffers were ~800 MB per mask; rows first, a few (H, W) ones."""
    from sam2rt.runtime.postprocess import upsample_logits

    x = np.random.default_rng(0).standard_normal((1, 1, 256, 256)).astype(np.float32)
    tracemalloc.start()
    try:
        out = upsample_logits(x, (1, 400_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (1, 1, 1, 400_000)
    assert peak < 16 * 1.6e6 + 2**20, peak  # a few 1.6 MB (H, W) float32 buffers, not 800 MB


def test_a_wide_short_image_goes_to_the_one_prompt_at_a_time_path():
    from sam2rt.serve.answers import is_large, upsample_bytes, working_bytes

    cfg = ServeConfig()
    assert not is_large((512, 512), cfg) and not is_large((1080, 1920), cfg)
    assert upsample_bytes((1, 400_000)) > cfg.upsample_budget_bytes  # the graph's width pass alone
    assert is_large((1, 400_000), cfg) and is_large((3, 8_000_000), cfg)
    # what such an answer reserves is its own size's share, within the default budget
    assert working_bytes((3, 8_000_000), cfg) <= cfg.memory_budget_bytes


def test_decoder_runs_are_cut_by_prompts_times_tokens():
    from sam2rt.runtime import Prompt
    from sam2rt.serve.answers import decode_bytes, prompts_per_run, working_bytes

    cfg = ServeConfig()
    many_points = prompts_per_run((64, 64), 128, True, cfg)
    one_point = prompts_per_run((64, 64), 1, True, cfg)
    assert 1 <= many_points * decode_bytes(128) <= cfg.upsample_budget_bytes
    assert one_point > 8 * many_points
    # a request at the documented maxima reserves one run's worth, which the default budget holds
    prompts = [Prompt(points=[[1.0 + i % 60, 2.0]] * 128, labels=[1] * 128) for i in range(256)]
    need = working_bytes((64, 64), cfg, prompts, True)
    assert need >= many_points * decode_bytes(128) and need <= cfg.memory_budget_bytes


@pytest.mark.parametrize("large", [False, True], ids=["batched path", "one prompt at a time"])
def test_decoding_in_runs_changes_no_answer(tiny_model, large: bool, monkeypatch):
    """Prompts split into decoder runs give each prompt the answer of one run of all (the batched path's runs
    through Sam2Model.decode, the other's through decode_raw)."""
    from sam2rt.runtime import Prompt
    from sam2rt.serve import answers

    rng = np.random.default_rng(0)
    hw = (48, 40)
    emb = tiny_model.embed(rng.integers(0, 256, (*hw, 3), np.uint8))
    prompts = [Prompt(points=rng.uniform(0, 39, (3, 2)), labels=[1, 0, 1]) for _ in range(7)]
    cfg = ServeConfig(budget_min_pixels=1 if large else 10**9)
    whole = list(answers.iter_decoded(tiny_model, emb, prompts, True, cfg))
    runs: list[int] = []
    name = "decode_raw" if large else "decode"
    method = getattr(tiny_model, name)
    monkeypatch.setattr(tiny_model, name, lambda e, p, *a, **k: (runs.append(len(p)), method(e, p, *a, **k))[1])
    monkeypatch.setattr(answers, "prompts_per_run", lambda *a: 3)
    cut = list(answers.iter_decoded(tiny_model, emb, prompts, True, cfg))
    assert runs == [3, 3, 1]
    got = [np.concatenate([part[i] for part in cut]) for i in range(3)]
    want = [np.concatenate([part[i] for part in whole]) for i in range(3)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_a_streamed_answer_holds_what_it_holds_until_its_body_ends():
    """hold_until_sent: released once, when the body has been read to its end; for a response dropped before its body
    started, when it is collected; at once for a plain response."""
    from fastapi.responses import JSONResponse, StreamingResponse

    from sam2rt.serve.app import hold_until_sent

    async def scenario() -> list[str]:
        events: list[str] = []

        async def body():
            for i in range(3):
                events.append(f"piece {i}")
                yield b"x"

        sent = hold_until_sent(StreamingResponse(body()), lambda: events.append("released"))
        assert events == []  # returned, not yet sent: still held
        async for _ in sent.body_iterator:
            pass
        dropped = hold_until_sent(StreamingResponse(body()), lambda: events.append("dropped released"))
        del dropped
        gc.collect()
        await asyncio.sleep(0)  # the release is scheduled on the loop
        hold_until_sent(JSONResponse({}), lambda: events.append("plain released"))
        return events

    assert asyncio.run(scenario()) == ["piece 0", "piece 1", "piece 2", "released", "dropped released", "plain released"]


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG" if arr.dtype != np.int32 else "TIFF")
    return buf.getvalue()


def test_integer_images_keep_their_high_byte_and_negative_ones_are_refused():
    from sam2rt.serve.images import decode_file_bytes

    cfg = ServeConfig()
    grey16 = np.full((4, 5), 4096, np.uint16)
    grey16[0, 0] = 65535
    rgb = decode_file_bytes(_png(grey16), cfg)
    assert rgb.shape == (4, 5, 3) and rgb[1, 1, 0] == 16 and rgb[0, 0, 0] == 255  # as OpenCV reads 16-bit: >> 8
    ramp = np.linspace(-1000, 1000, 20, dtype=np.int32).reshape(4, 5)
    with pytest.raises(ApiError, match="0..65535"):
        decode_file_bytes(_png(ramp), cfg)


def test_mask_input_is_parsed_strictly():
    from sam2rt.serve.schemas import parse_mask_input

    buf = io.BytesIO()
    np.save(buf, np.zeros((256, 256), np.float32))
    good = base64.b64encode(buf.getvalue()).decode()
    assert parse_mask_input(good, "binary", 2)[0].shape == (1, 256, 256)
    with pytest.raises(ApiError, match="not valid base64") as err:
        parse_mask_input(good[:10] + "!!!" + good[10:], "binary", 1)
    assert err.value.status == 400
    assert len(parse_mask_input([[0.5] * 256] * 256, "json", 1)) == 1
    for leaf, name in (("1.5", "str"), (True, "bool")):
        with pytest.raises(ApiError, match=f"found {name}") as err:
            parse_mask_input([[leaf] * 256] * 256, "json", 1)
        assert err.value.status == 422
