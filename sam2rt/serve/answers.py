"""Building answers within bounded memory: the answer-size limit, decoding in pieces, streamed npz.

- An answer may carry at most `max_answer_pixels` = masks returned x the image's pixels (413 above it,
  saying how to ask for less), checked before anything is decoded.
- Small images decode through the runtime's batched path (chunks within `upsample_budget_bytes`).
  Large images (>= `budget_min_pixels`) decode the low-res logits of all prompts at once, then bring
  one prompt at a time to full size with numpy (the same arithmetic as the runtime's upsampling graph),
  whose buffers go back to the OS after each prompt instead of growing ONNX Runtime's arena.
- `format: binary` is streamed: the npz (a zip) is written prompt by prompt into a bounded pipe that the
  response reads from, so a large answer is never built whole.
"""

from __future__ import annotations

import asyncio
import io
import threading
import zipfile
from collections import defaultdict
from typing import Any, AsyncIterator, Callable, Iterator

import numpy as np

from ..runtime import Embedding, Prompt, Sam2Model
from ..runtime.postprocess import upsample_logits
from .config import MB, ServeConfig
from .errors import ApiError

# working memory per pixel of one prompt decoded at full size on the large path: the float32 logits
# and the upsampling's second buffer, the bool mask, and the encoders' copies of it
ANSWER_BYTES_PER_PIXEL = 12
PIPE_CHUNK = 1 * MB
PIPE_DEPTH = 4


def check_answer_size(n_masks: int, hw: tuple[int, int], fmt: str, cfg: ServeConfig) -> None:
    """413 when the answer would carry more than cfg.max_answer_pixels (masks x image pixels)."""
    h, w = hw
    pixels = n_masks * h * w
    if pixels > cfg.max_answer_pixels:
        fixes = "send fewer prompts per request (the same image_id avoids re-embedding), or a smaller image"
        if fmt == "binary":
            fixes = "use format 'rle' (one bit per pixel, run-length coded) instead of float32 logits, " + fixes
        raise ApiError(413, f"the answer would carry {n_masks} masks of {w}x{h} = {pixels} pixels, over this server's "
                            f"limit of {cfg.max_answer_pixels} (--max-answer-pixels); {fixes}")


def is_large(hw: tuple[int, int], cfg: ServeConfig) -> bool:
    return hw[0] * hw[1] >= cfg.budget_min_pixels


def working_bytes(hw: tuple[int, int], cfg: ServeConfig) -> int:
    """Memory to reserve for decoding an answer on an image of size hw (0: small images are not counted)."""
    return hw[0] * hw[1] * ANSWER_BYTES_PER_PIXEL if is_large(hw, cfg) else 0


def _low_res_best(model: Sam2Model, emb: Embedding, prompts: list[Prompt], multimask: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoder runs for all prompts at 256x256: (chosen logits (B,256,256), scores (B,), clamped low-res (B,256,256)).

    The grouping is Sam2Model.decode's (prompts with the same token count and mask presence run together);
    the token choice is Sam2Model.finish's at the low-res size, where upsampling is the identity."""
    checked = [p.checked(emb.original_size) for p in prompts]
    groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
    for i, prompt in enumerate(checked):
        groups[(prompt.coords.shape[1], prompt.mask is not None)].append(i)
    low_res = np.empty((len(prompts), 4, 256, 256), np.float32)
    iou = np.empty((len(prompts), 4), np.float32)
    for (_, has_mask), idx in groups.items():
        xy = np.concatenate([checked[i].coords for i in idx])
        lab = np.concatenate([checked[i].labels for i in idx])
        mask = np.concatenate([checked[i].mask for i in idx]) if has_mask else None
        low_res[idx], iou[idx] = model.decode_raw(emb, xy, lab, mask)
    best = model.finish(low_res, iou, (256, 256), multimask, return_logits=True).best()
    return best.masks[:, 0], best.scores[:, 0], best.low_res_logits[:, 0]


def iter_decoded(model: Sam2Model, emb: Embedding, prompts: list[Prompt], multimask: bool,
                 cfg: ServeConfig) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (full-size logits (k,H,W) float32, scores (k,), clamped low-res logits (k,256,256)) in prompt
    order, a few prompts at a time; each prompt's result equals decoding it alone."""
    h, w = emb.original_size
    if not is_large((h, w), cfg):
        chunk = max(1, cfg.upsample_budget_bytes // ((3 if multimask else 1) * h * w * 4))
        for start in range(0, len(prompts), chunk):
            out = model.decode(emb, prompts[start:start + chunk], multimask_output=multimask, return_logits=True).best()
            yield out.masks[:, 0], out.scores[:, 0], out.low_res_logits[:, 0]
        return
    chosen, scores, low = _low_res_best(model, emb, prompts, multimask)
    for i in range(len(prompts)):
        yield upsample_logits(chosen[i:i + 1], (h, w)), scores[i:i + 1], low[i:i + 1]


class _Stopped(Exception):
    """The response's reader went away (client disconnected): stop writing."""


class _Pipe(io.RawIOBase):
    """A write-only stream that hands PIPE_CHUNK pieces to the event loop, at most PIPE_DEPTH ahead of it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | None]) -> None:
        self.loop, self.queue = loop, queue
        self.room = threading.Semaphore(PIPE_DEPTH)
        self.stop = threading.Event()
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.stop.is_set():
            raise _Stopped()
        self.buf += b
        if len(self.buf) >= PIPE_CHUNK:
            self.flush_piece()
        return len(b)

    def flush_piece(self) -> None:
        while not self.room.acquire(timeout=0.1):
            if self.stop.is_set():
                raise _Stopped()
        piece, self.buf = bytes(self.buf), bytearray()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)


def _npy_header(f: Any, shape: tuple[int, ...]) -> None:
    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})


def write_npz(pipe: _Pipe, n: int, hw: tuple[int, int], pieces: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
              on_low_res: Callable[[np.ndarray], None]) -> None:
    """The `binary` answer, as np.savez_compressed lays it out (masks (N,H,W), low_res_masks (N,256,256),
    float32), written piece by piece. Runs in a worker thread."""
    lows = []
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as zf:
        with zf.open("masks.npy", "w", force_zip64=True) as f:
            _npy_header(f, (n, *hw))
            for logits, _, low in pieces:
                f.write(np.ascontiguousarray(logits, dtype="<f4").data)
                lows.append(low)
                del logits
        low_res = np.ascontiguousarray(np.concatenate(lows), dtype="<f4")
        with zf.open("low_res_masks.npy", "w", force_zip64=True) as f:
            _npy_header(f, low_res.shape)
            f.write(low_res.data)
    on_low_res(low_res)


async def stream_npz(pool: Any, n: int, hw: tuple[int, int], pieces: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
                     on_low_res: Callable[[np.ndarray], None], on_done: Callable[[], None]) -> AsyncIterator[bytes]:
    """Async bytes of the npz, produced in `pool`; `on_done` runs once the producer has finished (also when
    the client left midway: the producer then stops at its next write)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
    pipe = _Pipe(loop, queue)  # type: ignore[arg-type]

    def produce() -> None:
        try:
            write_npz(pipe, n, hw, pieces, on_low_res)
            if pipe.buf:
                pipe.flush_piece()
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except _Stopped:
            pass
        except BaseException as exc:  # reported to the reader, which ends the response
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(on_done)

    job = pool.submit(produce)
    try:
        while True:
            piece = await queue.get()
            if piece is None:
                return
            if isinstance(piece, BaseException):
                raise piece
            pipe.room.release()
            yield piece
    finally:
        pipe.stop.set()
        if job.cancel():  # never started (the client left while it was queued): its finally will not run
            on_done()
