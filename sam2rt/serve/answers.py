"""Building answers within bounded memory: the answer-size limit, decoding in pieces, streamed npz.

- An answer may carry at most `max_answer_pixels` = masks returned x the image's pixels (413 above it,
  saying how to ask for less), checked before anything is decoded.
- Every decoder run takes at most as many prompts as fit `upsample_budget_bytes` by `decode_bytes` (the
  decoder's activations grow with prompts x tokens: 256 prompts of 128 points took ~13 GB in one run).
- Small images decode through the runtime's batched path (its upsampling graph: chunks within
  `upsample_budget_bytes` by `upsample_bytes`). Large images (>= `budget_min_pixels`), and images whose one mask's
  upsampling alone would exceed that budget (a wide, short image: the graph's width pass makes (256, W) buffers
  whatever the height), decode the low-res logits, then bring one prompt at a time to full size with numpy (the
  same arithmetic, rows first where the image has fewer than 256 rows), whose buffers go back to the OS after each
  prompt instead of growing ONNX Runtime's arena.
- `working_bytes` is what a request reserves from the memory budget for all that, at every image size.
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

# working memory per pixel of one prompt brought to full size with numpy (the large path): upsample_logits' buffers
# (at most four float32 (H, W) ones: two for the width pass, whose 256 rows are at most H there, and two for the
# height pass), the bool mask, and the encoders' copies of it
ANSWER_BYTES_PER_PIXEL = 20
# and per column of the image: the upsampling's column taps (two int64 indices, two float32 weights), which matter
# where an image has few rows (measured: 16 bytes per pixel at 1 x 400,000, 9 at 1920x1080, 12 at 255 x 4000)
TAP_BYTES_PER_COLUMN = 32
# one decoder run's activations per prompt: the image embedding repeated for each prompt (256x64x64 float32, 4 MiB)
# and per token of the prompt (its points, a padding point, the output tokens) the attention over the image's 4096
# tokens. Measured on the CPU provider (hiera_tiny; the decoder is the same at every model size): ~3.4 MB a prompt
# of one point, ~50 MB one of 128 points; the constants round those up.
DECODE_BYTES_PER_PROMPT = 4 * MB
DECODE_BYTES_PER_TOKEN = MB // 2
LOW_RES = 256
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


def upsample_bytes(hw: tuple[int, int]) -> int:
    """Working memory of the runtime's upsampling graph for one mask of size hw: width first, its (256, W) buffers
    whatever H is, then the height pass's (H, W) ones (float32, two each)."""
    h, w = hw
    return 4 * 2 * (LOW_RES * w + h * w)


def decode_bytes(tokens: int) -> int:
    """One prompt's share of a decoder run's activations (`tokens`: its points, with a box's two corners)."""
    return DECODE_BYTES_PER_PROMPT + (int(tokens) + 1) * DECODE_BYTES_PER_TOKEN


def _tokens(prompt: Prompt) -> int:
    return (0 if prompt.points is None else int(np.size(prompt.points)) // 2) + (0 if prompt.box is None else 2)


def is_large(hw: tuple[int, int], cfg: ServeConfig, multimask: bool = True) -> bool:
    """Whether an answer's masks are brought to full size one prompt at a time with numpy (module docstring)."""
    return hw[0] * hw[1] >= cfg.budget_min_pixels or (3 if multimask else 1) * upsample_bytes(hw) > cfg.upsample_budget_bytes


def prompts_per_run(hw: tuple[int, int], tokens: int, multimask: bool, cfg: ServeConfig) -> int:
    """How many prompts of up to `tokens` tokens one decoder run takes: within `upsample_budget_bytes` (at least one)."""
    per_prompt = decode_bytes(tokens)
    if not is_large(hw, cfg, multimask):
        per_prompt += (3 if multimask else 1) * upsample_bytes(hw)
    return max(1, cfg.upsample_budget_bytes // per_prompt)


def working_bytes(hw: tuple[int, int], cfg: ServeConfig, prompts: list[Prompt] | None = None,
                  multimask: bool = True) -> int:
    """Memory to reserve for decoding an answer of `prompts` on an image of size hw: one decoder run (its prompts'
    activations and, on the batched path, their upsampling) and, on the large path, one prompt at full size.
    Without prompts (before they are known): the large path's full-size share only."""
    full = (hw[0] * ANSWER_BYTES_PER_PIXEL + TAP_BYTES_PER_COLUMN) * hw[1] if is_large(hw, cfg, multimask) else 0
    if not prompts:
        return full
    tokens = max(_tokens(p) for p in prompts)
    n = min(len(prompts), prompts_per_run(hw, tokens, multimask, cfg))
    per_prompt = decode_bytes(tokens) + (0 if full else (3 if multimask else 1) * upsample_bytes(hw))
    return full + n * per_prompt


def _runs(idx: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(idx), size):
        yield idx[start:start + size]


def _low_res_best(model: Sam2Model, emb: Embedding, prompts: list[Prompt], multimask: bool,
                  cfg: ServeConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoder runs for all prompts at 256x256: (chosen logits (B,256,256), scores (B,), clamped low-res (B,256,256)).

    The grouping is Sam2Model.decode's (prompts with the same token count and mask presence run together), each
    group in runs of `prompts_per_run`; the token choice is Sam2Model.finish's at the low-res size, where
    upsampling is the identity."""
    checked = [p.checked(emb.original_size) for p in prompts]
    groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
    for i, prompt in enumerate(checked):
        groups[(prompt.coords.shape[1], prompt.mask is not None)].append(i)
    low_res = np.empty((len(prompts), 4, LOW_RES, LOW_RES), np.float32)
    iou = np.empty((len(prompts), 4), np.float32)
    for (tokens, has_mask), idx in groups.items():
        for run in _runs(idx, prompts_per_run(emb.original_size, tokens, multimask, cfg)):
            xy = np.concatenate([checked[i].coords for i in run])
            lab = np.concatenate([checked[i].labels for i in run])
            mask = np.concatenate([checked[i].mask for i in run]) if has_mask else None
            low_res[run], iou[run] = model.decode_raw(emb, xy, lab, mask)
    best = model.finish(low_res, iou, (LOW_RES, LOW_RES), multimask, return_logits=True).best()
    return best.masks[:, 0], best.scores[:, 0], best.low_res_logits[:, 0]


def iter_decoded(model: Sam2Model, emb: Embedding, prompts: list[Prompt], multimask: bool,
                 cfg: ServeConfig) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (full-size logits (k,H,W) float32, scores (k,), clamped low-res logits (k,256,256)) in prompt
    order, a few prompts at a time; each prompt's result equals decoding it alone."""
    h, w = emb.original_size
    if not is_large((h, w), cfg, multimask):
        chunk = prompts_per_run((h, w), max(_tokens(p) for p in prompts), multimask, cfg)
        for start in range(0, len(prompts), chunk):
            out = model.decode(emb, prompts[start:start + chunk], multimask_output=multimask, return_logits=True).best()
            yield out.masks[:, 0], out.scores[:, 0], out.low_res_logits[:, 0]
        return
    chosen, scores, low = _low_res_best(model, emb, prompts, multimask, cfg)
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
