"""VideoTracker: SAM 2's streaming multi-object tracker on the exported graphs (torch-free).

It computes what `SAM2VideoPredictor` computes when a video is tracked forward, one frame at a time:

- each frame is preprocessed and encoded exactly as the image path (`preprocess` + the model's image
  encoder graph on its backend);
- a new object's first prompt makes its conditioning frame (no memory, as `is_init_cond_frame`); a prompt
  for an object already tracked on the current frame is a correction (the object's memory-conditioned
  features of that frame and its previous logits as mask input, as `add_new_points_or_box` does) and,
  as in the reference (`add_all_frames_to_correct_as_cond=False`), stays a non-conditioning frame;
- prompted frames are encoded into memory when the time step ends (the predictor's preflight, with the
  binarised mask); tracked frames right away (sigmoid of the logits);
- memory features are stored rounded to bfloat16, as the reference stores them; per object the bank holds
  its conditioning frame(s), the `num_maskmem - 1` most recent memories and `max_obj_ptrs - 1` pointers
  (older entries are dropped), so its size does not grow with the stream.

Objects are independent (the reference's defaults: no non-overlap constraint, no memory clearing), so
removing one leaves the others' results unchanged.

Background memory (`background_memory`, on by default where the backend computes on a GPU): a tracked frame's masks
do not depend on its memory encoding, only the next frame does. So a tracked frame's memory encoder and bank store
run on the tracker's memory thread after its decoder, while its masks are made and returned, and while the next frame
is preprocessed and encoded; the next time step (and every call that reads or changes the tracker's state) waits for
them first (`wait()`). Results are the same function; a live stream sees its masks without the memory stage's time.
"""

from __future__ import annotations

import logging
import operator
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ...errors import InputError, InvalidPromptError, Sam2rtError
from ...model_specs import LOW_RES_SIZE
from ..backends.capture_lock import gpu_work
from ..model import Sam2Model
from ..postprocess import LOGIT_CLAMP
from ..preprocess import check_image
from ..tensors import DeviceTensor, as_host
from ..prompts import Prompt
from .graphs import VideoGraphs
from .heads import NO_POINTS_COORDS, NO_POINTS_LABELS, mask_prompt_inputs, select_track_output, use_multimask
from .bank import MemoryBank
from .memory import NO_MASKS, FrameOutput, ObjectMemory, compact_feeds, select_memory

log = logging.getLogger("sam2rt")

ObjId = Any  # any hashable id (ints in the reference)
TIMINGS_KEPT = 1000  # per-step timings of the most recent steps (bounded, like everything else per stream)
# where a tracked frame's `track_s` goes, summed over its objects: choosing and gathering the memory, the memory
# attention, the tracking decoder (with the output's choice), the memory encoder (with the bank's write)
TRACK_STAGES = ("gather_s", "attention_s", "decoder_s", "memory_s")
# parts of memory_s after the memory encoder's graph (_track_object): hole filling of the frame's output, and the
# new memory's store into the object's bank (GPU run 6 found memory_s ~11 ms where the graph profiled at ~4)
MEMORY_FILL_STAGE = "memory_fill_s"
MEMORY_STORE_STAGE = "memory_store_s"
MEMORY_PARTS = (MEMORY_FILL_STAGE, MEMORY_STORE_STAGE)


def fill_holes(logits: np.ndarray, max_area: int) -> np.ndarray:
    """Fill background components (logits <= 0) of at most `max_area` pixels with 0.1, as the reference's
    `fill_holes_in_mask_scores` (8-connected components, here with OpenCV instead of its CUDA extension)."""
    import cv2

    background = (logits <= 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=8)
    if n <= 1:
        return logits
    small = np.zeros(n, bool)
    small[1:] = stats[1:, cv2.CC_STAT_AREA] <= max_area
    holes = small[labels]
    if not holes.any():
        return logits
    return np.where(holes, np.float32(0.1), logits).astype(np.float32)


_END = object()  # the end of a frame source


def _checked_mask(mask: Any, hw: tuple[int, int]) -> np.ndarray:
    """A mask prompt as (H, W) bool at the frame's size `hw`: bool, or numbers where > 0 is the object."""
    arr = np.asarray(mask)
    if arr.dtype != np.bool_ and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InvalidPromptError(f"mask must be bool or numeric (> 0: the object), got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape != tuple(hw):
        raise InvalidPromptError(f"mask must be (H, W) = {tuple(hw)}, the frame's size; got {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InvalidPromptError("mask has NaN or infinite values")
    return arr > 0


@dataclass(frozen=True)
class _Encoded:
    """One frame, checked, copied and encoded (`VideoTracker._encode`), ready to become the current frame."""

    frame: np.ndarray  # a copy of the frame as given
    hw: tuple[int, int]
    feats: dict[str, Any]  # the encoder's features: host arrays or the backend's device tensors
    timing: dict[str, float]


class _Prefetch:
    """The frames of a source, each read and encoded (`encode`) on the worker thread of `pool` (one thread) one frame
    ahead of the caller: the next frame's work starts when this is made and whenever the caller takes a frame. An
    error of a frame (or of the source) is raised when that frame's turn comes, as without prefetching. `close()`
    waits for the frame in flight (which the source has then given up: leaving early consumes one frame more)."""

    def __init__(self, frames: Iterator[Any], encode: Any, pool: Any) -> None:
        self._frames, self._encode, self._pool = frames, encode, pool
        self._future = self._pool.submit(self._read_and_encode)

    def _read_and_encode(self) -> _Encoded | None:
        frame = next(self._frames, _END)
        return None if frame is _END else self._encode(frame)

    def __iter__(self) -> Iterator[_Encoded]:
        while True:
            encoded = self._future.result()
            if encoded is None:
                return
            self._future = self._pool.submit(self._read_and_encode)
            yield encoded

    def close(self) -> None:
        from concurrent.futures import wait

        wait([self._future])  # its error, if any, belongs to a frame nobody asked for


@dataclass
class _Object:
    """One tracked object: its memory bank and its output on the current frame."""

    memory: ObjectMemory = field(default_factory=ObjectMemory)
    current: FrameOutput | None = None
    origin: str = ""  # how `current` was made: "init" (first prompt), "tracked", "correction"
    pix_feat_with_mem: Any = None  # memory-conditioned features of the current frame (corrections), on the graphs' device
    bank: MemoryBank | None = None  # its memories' values on the graphs' device (made on first use; not saved)

    @property
    def needs_memory(self) -> bool:
        return self.current is not None and self.current.maskmem is None


class VideoTracker:
    """Track objects through a video or a live stream with SAM 2's memory.

    >>> tracker = VideoTracker.from_dir("models/hiera_tiny")
    >>> masks = tracker.add_prompt(1, box=[10, 20, 200, 220], frame=first_rgb_frame)
    >>> for rgb in stream: masks = tracker.track(rgb)          # {obj_id: HxW bool mask}
    """

    def __init__(self, model: Sam2Model, graphs: VideoGraphs, fill_hole_area: int | None = None,
                 background_memory: bool | None = None) -> None:
        self.model = model
        self.graphs = graphs
        self.settings = graphs.settings
        self.fill_hole_area = int(self.settings.get("fill_hole_area", 0) if fill_hole_area is None else fill_hole_area)
        self.image_size = model.image_size
        self.timings: deque[dict[str, float]] = deque(maxlen=TIMINGS_KEPT)  # per time step: seconds per stage
        self._prefetch_pool: Any = None  # propagate's worker thread (`_prefetcher`), one for the tracker's life
        # tracked frames' memory encoding after their masks (module docstring); on the CPU both would share its cores
        self.background_memory = model.backend.device != "cpu" if background_memory is None else bool(background_memory)
        self._memory_pool: Any = None  # the memory thread, one for the tracker's life (CUDA graphs are per thread)
        self._pending: list[Any] = []  # futures of memory work in flight
        self._failed: BaseException | None = None  # memory work that failed: the state is incomplete until reset()
        self.reset()

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, backend: str = "auto", fill_hole_area: int | None = None, threads: int | None = None,
        background_memory: bool | None = None,
    ) -> "VideoTracker":
        """Load an exported model directory (its image graphs on `backend`, the video graphs on ONNX Runtime).

        fill_hole_area: None keeps the model's setting (the video predictor's 8 pixels of the low-res mask);
        0 turns hole filling off (the reference skips it without its CUDA extension).
        background_memory: encode tracked frames into memory on the tracker's memory thread, after their masks (module
        docstring); None: where the backend computes on a GPU.
        """
        model = Sam2Model.from_dir(model_dir, backend=backend, threads=threads)
        graphs = VideoGraphs(model.manifest, model.backend_name, threads, precision=model.backend.precision)
        return cls(model, graphs, fill_hole_area, background_memory)

    # --- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every object and frame (after the memory work in flight; a failure of it goes with the state)."""
        self._drain()
        if self._failed is not None:
            log.warning("sam2rt: reset() drops a state whose memory encoding failed: %s", self._failed)
        self._failed = None
        self.objects: dict[ObjId, _Object] = {}
        self.frame_idx = -1
        self.num_frames: int | None = None  # the video's length when known (pointer count as the reference)
        self._length_warned = False
        self._frame: np.ndarray | None = None
        self._feats: dict[str, Any] | None = None  # the current frame's features: host arrays or device tensors
        self._orig_hw: tuple[int, int] | None = None

    def remove(self, obj_id: ObjId) -> None:
        """Stop tracking `obj_id` (KeyError-free: unknown ids are ignored, as the reference's strict=False)."""
        self.wait()
        self.objects.pop(obj_id, None)

    def save_state(self, path: str | Path) -> Path:
        """Save the whole tracking state to an .npz file (no pickle); see `load_state`."""
        from .state import save_state

        self.wait()
        return save_state(self, path)

    def load_state(self, path: str | Path) -> None:
        """Replace this tracker's state with one saved by `save_state` (same model directory)."""
        from .state import load_state

        self._drain()  # the file replaces the state (load_state resets it once the file is read)
        load_state(self, path)

    def wait(self) -> None:
        """Wait for the memory work in flight (background memory: the last tracked frame's memory encoding). Every
        call that reads or changes the tracking state waits first; benchmarks call it to time a frame's whole work.

        Raises Sam2rtError if memory work failed (then or before): the objects' memory misses that frame, so the
        tracker refuses to go on until `reset()` or `load_state()`."""
        self._drain()
        if self._failed is not None:
            raise Sam2rtError(f"the tracker's background memory encoding failed ({type(self._failed).__name__}: "
                              f"{self._failed}); its memory is incomplete: call reset() or load_state()") from self._failed

    @property
    def object_ids(self) -> list[ObjId]:
        return list(self.objects)

    @property
    def low_res_logits(self) -> dict[ObjId, np.ndarray]:
        """Each object's (256,256) low-res mask logits on the current frame (the reference's pred_masks)."""
        return {k: o.current.pred_masks for k, o in self.objects.items() if o.current is not None}

    @property
    def current_frame(self) -> np.ndarray | None:
        """A copy of the current frame, as it was given (None before the first). A copy: a caller drawing on it must
        not change the frame the tracker compares new frames with (`add_prompt(frame=...)`) or saves."""
        return None if self._frame is None else self._frame.copy()

    def _prefetcher(self, frames: Iterator[Any]) -> _Prefetch:
        """`frames` read and encoded one ahead on the tracker's one worker thread. One thread for every `propagate`:
        ONNX Runtime captures a CUDA-graph session again on each new thread that runs it, and keeps each capture
        while the session lives (backends/capture_lock.py), so a thread per call would capture the encoder again
        per call and keep every copy."""
        if self._prefetch_pool is None:
            import weakref
            from concurrent.futures import ThreadPoolExecutor

            self._prefetch_pool = ThreadPoolExecutor(1, thread_name_prefix="sam2rt-prefetch")
            weakref.finalize(self, self._prefetch_pool.shutdown, wait=False)
        return _Prefetch(frames, self._encode, self._prefetch_pool)

    def _drain(self) -> None:
        """Wait for the memory work in flight; a failure is kept in `_failed` (wait() raises it)."""
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001 - kept, raised by wait() until reset()
                self._failed = self._failed or exc

    def close(self) -> None:
        """Stop `propagate`'s worker thread (after the frame in flight) and the memory thread (after its work). The
        tracker stays usable: later calls start new ones. The model and its sessions are the caller's."""
        self._drain()  # a failure stays kept: wait() raises it
        for name in ("_prefetch_pool", "_memory_pool"):
            pool = getattr(self, name)
            setattr(self, name, None)
            if pool is not None:
                pool.shutdown(wait=True)

    def _in_background(self, work: Any) -> None:
        """Run `work()` on the memory thread (one for the tracker's life: ONNX Runtime captures a CUDA graph again
        on each new thread that runs a session, and keeps each capture)."""
        if self._memory_pool is None:
            import weakref
            from concurrent.futures import ThreadPoolExecutor

            self._memory_pool = ThreadPoolExecutor(1, thread_name_prefix="sam2rt-memory")
            weakref.finalize(self, self._memory_pool.shutdown, wait=False)
        self._pending.append(self._memory_pool.submit(work))

    @property
    def prefetch_default(self) -> bool:
        """Whether `propagate` encodes the next frame beside the tracking of this one by default: where the backend
        computes on a GPU."""
        return self.model.backend.device != "cpu"

    @property
    def object_scores(self) -> dict[ObjId, float]:
        return {k: o.current.object_score for k, o in self.objects.items() if o.current is not None}

    # --- time steps ---------------------------------------------------------------------------
    def _is_current(self, frame: Any) -> bool:
        cur = self._frame  # a copy: a camera buffer refilled in place is a new frame
        if cur is None or frame is None:
            return False
        arr = np.asarray(frame)
        return arr.shape == cur.shape and np.array_equal(arr, cur)

    def _finish_step(self) -> None:
        """End the current time step: encode prompted outputs into memory, move outputs into the banks, prune. The
        caller has waited for the memory work in flight (`wait()`, outside GPU_WORK: the memory thread may need it
        exclusively for a capture)."""
        assert not self._pending, "wait() before a time step ends"
        if self._feats is None:
            return
        f = self.frame_idx
        for obj in self.objects.values():
            out = obj.current
            if out is None:
                continue
            if out.maskmem is None:  # prompted on this frame: the preflight's memory encoding
                mem = self.graphs.encode_memory(
                    self._feats["image_embed"], out.pred_masks, out.object_score,
                    binarize=bool(self.settings["binarize_mask_from_pts_for_mem_enc"]),
                )
                if obj.bank is None:
                    obj.bank = self.graphs.new_bank()
                out.maskmem = obj.bank.store(mem)
            stored = FrameOutput(NO_MASKS, out.obj_ptr, out.object_score, out.maskmem)
            is_cond = obj.origin == "init" or (obj.origin == "correction" and self.settings["add_all_frames_to_correct_as_cond"])
            if is_cond:
                obj.memory.cond[f] = stored
                obj.memory.non_cond.pop(f, None)
                cap = self.graphs.layout.cond_slots  # bounded: keep the most recent conditioning frames
                for t in sorted(obj.memory.cond)[:-cap]:
                    del obj.memory.cond[t]
            else:
                obj.memory.non_cond[f] = stored
            stride = int(self.settings["memory_temporal_stride_for_eval"])
            obj.memory.prune(f + 1, keep_mem=int(self.settings["num_maskmem"]) * stride,
                             keep_ptr=int(self.settings["max_obj_ptrs_in_encoder"]))
            obj.current = None
            obj.origin = ""
            obj.pix_feat_with_mem = None

    @gpu_work  # beside the prefetch worker's (backends/capture_lock.py)
    def _encode(self, frame: Any) -> _Encoded:
        """Check, copy, preprocess and encode one frame. Touches no tracker state, so it may run on the prefetch
        thread (`propagate`): the frame is copied before it returns, so a buffer the frame source refills in place
        (a camera's) can be read again as soon as this returns."""
        rgb = check_image(frame)
        copy = np.array(frame if isinstance(frame, np.ndarray) else rgb, copy=True)
        t0 = time.perf_counter()
        x = self.model.backend.preprocess(rgb, self.image_size)  # on the backend's device where it has one
        t1 = time.perf_counter()
        feats = self.model.backend.encode(x)
        # features stay where the backend computed them (the video graphs bind device tensors in place)
        feats = {k: v if isinstance(v, DeviceTensor) else np.ascontiguousarray(v, dtype=np.float32) for k, v in feats.items()}
        t2 = time.perf_counter()
        return _Encoded(copy, (int(rgb.shape[0]), int(rgb.shape[1])), feats, {"preprocess_s": t1 - t0, "encoder_s": t2 - t1})

    def _start_step(self, encoded: _Encoded) -> dict[str, float]:
        """Make an encoded frame the current frame (the next time step)."""
        self._finish_step()
        self.graphs.step()
        self._feats = encoded.feats
        self._frame = encoded.frame
        self._orig_hw = encoded.hw
        self.frame_idx += 1
        return dict(encoded.timing)

    @gpu_work  # beside the prefetch worker's (backends/capture_lock.py)
    def _step(self, encoded: _Encoded) -> dict[ObjId, np.ndarray]:
        """One time step of a stream: the encoded frame becomes the current one, every object is tracked on it."""
        timing = self._start_step(encoded)
        timing.update(self._track_all())
        t0 = time.perf_counter()
        masks = self._masks()
        timing["postprocess_s"] = time.perf_counter() - t0
        self.timings.append(timing)
        return masks

    def _video_length(self) -> int | None:
        """The video's length as the memory selection uses it (the reference's num_frames): `num_frames` while the
        stream is within it; None (a stream of unknown length) once the stream has gone past it, where a container's
        frame count was short: a declared length the frames contradict must not drop every object pointer."""
        n = self.num_frames
        if n is not None and self.frame_idx >= n:
            if not self._length_warned:
                log.warning("sam2rt: frame %d is past the video's declared length (%d frames): tracking it as a stream "
                            "of unknown length", self.frame_idx, n)
                self._length_warned = True
            return None
        return n

    def _fill(self, logits: np.ndarray) -> np.ndarray:
        return fill_holes(logits, self.fill_hole_area) if self.fill_hole_area > 0 else logits

    def _track_object(self, obj: _Object, timing: dict[str, float]) -> None:
        """Track one object on the current frame from its memory (a non-conditioning frame); each stage's seconds are
        added to `timing` (each graph's run ends when its outputs are ready, so no extra synchronisation is needed)."""
        assert self._feats is not None
        t0 = time.perf_counter()
        slots, feeds = select_memory(obj.memory, self.frame_idx, self.settings, self.graphs.layout, self._video_length())
        if self.graphs.compact_memory:  # the valid slots only, in the same order
            slots, feeds = [b for b in slots if b is not None], compact_feeds(feeds)
        if obj.bank is None:
            obj.bank = self.graphs.new_bank()
        feeds["mem_feats"] = obj.bank.gather(slots)
        t1 = time.perf_counter()
        pix = self.graphs.memory_attention(self._feats["image_embed"], feeds)
        t2 = time.perf_counter()
        mask, ptr, score = self.graphs.track(pix, self._feats, self.settings)
        t3 = time.perf_counter()
        out = obj.current = FrameOutput(self._fill(mask), ptr, score, None)
        obj.origin = "tracked"
        obj.pix_feat_with_mem = pix
        t_fill = time.perf_counter()
        for key, dt in zip((*TRACK_STAGES[:3], MEMORY_FILL_STAGE), (t1 - t0, t2 - t1, t3 - t2, t_fill - t3)):
            timing[key] += dt
        timing["memory_s"] += t_fill - t3
        image_embed, bank = self._feats["image_embed"], obj.bank

        def encode() -> None:  # the memory of the frame's raw (unfilled) mask, as the reference's track_step
            t_start = time.perf_counter()
            mem = self.graphs.encode_memory(image_embed, mask, score, binarize=False)
            t_graph = time.perf_counter()
            out.maskmem = bank.store(mem)
            t_end = time.perf_counter()
            timing["memory_s"] += t_end - t_start
            timing[MEMORY_STORE_STAGE] += t_end - t_graph

        if self.background_memory:
            self._in_background(gpu_work(encode))  # beside the main thread's work (backends/capture_lock.py)
        else:
            encode()

    def _track_all(self) -> dict[str, float]:
        timing = dict.fromkeys((*TRACK_STAGES, *MEMORY_PARTS), 0.0)
        t0 = time.perf_counter()
        for obj in self.objects.values():
            if obj.memory.cond or obj.memory.non_cond:
                self._track_object(obj, timing)
        timing["track_s"] = time.perf_counter() - t0
        return timing

    @gpu_work  # beside the prefetch worker's (backends/capture_lock.py)
    def _masks(self) -> dict[ObjId, np.ndarray]:
        """Every object with an output on the current frame: its mask at the frame's size."""
        ids = [k for k, o in self.objects.items() if o.current is not None]
        if not ids:
            return {}
        logits = np.stack([self.objects[k].current.pred_masks for k in ids])[:, None]
        masks = self.model.backend.upsample_masks(logits, self._orig_hw, 0.0)  # on the backend's device
        return {k: masks[i, 0] for i, k in enumerate(ids)}

    # --- public API -----------------------------------------------------------------------------
    def add_prompt(
        self,
        obj_id: ObjId,
        points: Any = None,
        labels: Any = None,
        box: Any = None,
        mask: Any = None,
        frame: Any = None,
    ) -> dict[ObjId, np.ndarray]:
        """Prompt `obj_id` on the current frame (or on `frame`, which then becomes the current frame).

        points (N,2) x,y pixels with labels (N,) 1/0; box (4,) x0,y0,x1,y1; or mask (H,W) bool at the frame's
        size (not with points or box). A frame given here that is not the current one starts a new time step:
        the objects already tracked are tracked on it first. Prompts before the next `track()` belong to the
        same time step. Returns {obj_id: HxW bool mask} for every object on the current frame.
        """
        self.wait()
        new_frame = frame is not None and not self._is_current(frame)
        # the prompt is checked before a new frame starts its time step: a refused call leaves the tracker as it was
        hw = tuple(check_image(frame).shape[:2]) if new_frame else self._orig_hw
        if hw is None:
            raise InvalidPromptError("no current frame: pass the frame to prompt on with add_prompt(..., frame=rgb)")
        if mask is not None:
            if points is not None or box is not None:
                raise InvalidPromptError("give either a mask or points/box for one prompt, not both")
            mask = _checked_mask(mask, hw)
        else:
            xy, lab, _ = Prompt(points=points, labels=labels, box=box).checked(hw)
        if new_frame:
            timing = self._start_step(self._encode(frame))
            timing.update(self._track_all())
            self.timings.append(timing)
            self.wait()  # the prompt may correct an object just tracked: its memory first (prompts are rare)
        assert self._feats is not None
        obj = self.objects.get(obj_id) or _Object()  # added to self.objects once the prompt is accepted
        is_init = obj.current is None or obj.origin == "init"
        if not is_init and obj.pix_feat_with_mem is None:
            raise Sam2rtError(f"object {obj_id!r} has no memory-conditioned features on this frame")
        feats = self._feats
        if mask is not None:
            out = self._mask_prompt(mask, feats)
        else:
            multimask = use_multimask(self.settings, is_init, xy.shape[1] - 1)  # padding point not counted
            prev = None
            if obj.current is not None and obj.current.pred_masks.size:
                prev = np.clip(obj.current.pred_masks, -LOGIT_CLAMP, LOGIT_CLAMP)
            pix = feats["image_embed"] if is_init else obj.pix_feat_with_mem  # directly_add_no_mem_embed
            lr, iou, ptrs, score = self.graphs.decode(pix, feats, xy, lab, prev)
            low, ptr = select_track_output(self.settings, lr, iou, ptrs, multimask)
            out = FrameOutput(self._fill(low), ptr, score, None)
        obj.current = out
        obj.origin = "init" if is_init else "correction"
        self.objects.setdefault(obj_id, obj)
        return self._masks()

    def _mask_prompt(self, mask: np.ndarray, feats: dict[str, Any]) -> FrameOutput:
        """`_use_mask_as_output`: the mask (bool, checked by `_checked_mask`) is the output; the decoder only makes its
        object pointer."""
        full, low = mask_prompt_inputs(mask, self.image_size, LOW_RES_SIZE)
        raw = as_host(feats["image_embed"]) - self.graphs.no_mem_embed  # the backbone features without no_mem_embed
        mask_input = self.graphs.mask_downsample(full)
        lr, iou, ptrs, _ = self.graphs.decode(raw, feats, NO_POINTS_COORDS, NO_POINTS_LABELS, mask_input)
        _, ptr = select_track_output(self.settings, lr, iou, ptrs, False)
        appearing = np.float32(1.0 if (full > 0).any() else 0.0)
        if self.settings["pred_obj_scores"]:
            if self.settings["fixed_no_obj_ptr"]:
                ptr = appearing * ptr
            ptr = ptr + (1 - appearing) * self.graphs.no_obj_ptr
        score = float(20.0 * appearing - 10.0)
        return FrameOutput(self._fill(low), ptr.astype(np.float32), score, None)

    def track(self, frame: Any) -> dict[ObjId, np.ndarray]:
        """Track every object on the next frame of a stream; returns {obj_id: HxW bool mask}. With background memory
        the frame's memory encoding goes on after this returns (the next call waits for it)."""
        encoded = self._encode(frame)  # beside the previous frame's memory work
        self.wait()
        return self._step(encoded)

    def propagate(
        self, frames: Iterable[Any], num_frames: int | None = None, prefetch: bool | None = None,
    ) -> Iterator[tuple[int, dict[ObjId, np.ndarray]]]:
        """Track through `frames` (a video file's frames from the current one on); yields (frame_index, masks).

        If the first frame is the current one (its pixels equal the current frame's: prompts were just given on it),
        its results are yielded as they are, not tracked again. The video's length (`num_frames`, a positive int,
        else len(frames) when it has one) bounds the pointers used as the reference's `propagate_in_video` does for
        a video of that length, for this call only: afterwards `num_frames` is as it was (None, a stream of unknown
        length, unless set). Frames past a declared length (a container's frame count can be short) are tracked as
        a stream of unknown length. `current_frame` is the frame whose masks were yielded last.

        prefetch: read and encode the next frame on a worker thread while this one is tracked (the results are the
        same). The encoder does not depend on the objects' memory, so on a GPU the next frame's encoder runs
        beside this frame's memory attention and decoders, and the frame source's decoding beside both. None: on
        where the backend computes on a GPU; on the CPU both halves would share the same cores. Leaving early
        consumes one frame more from `frames` (the one read ahead).
        """
        if num_frames is not None:
            try:
                num_frames = operator.index(num_frames)
            except TypeError:
                raise InputError(f"num_frames must be an int (the video's frame count), got {num_frames!r}; "
                                 "e.g. int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), or None if unknown") from None
            if num_frames < 1:
                raise InputError(f"num_frames must be at least 1 (the video's frame count), got {num_frames}; "
                                 "pass None if it is unknown")
        it = iter(frames)
        length = len(frames) if hasattr(frames, "__len__") else None  # type: ignore[arg-type]
        first = next(it, _END)
        if first is _END:
            return
        if prefetch is None:
            prefetch = self.prefetch_default
        ahead: _Prefetch | None = None
        outer_length = self.num_frames  # restored when this call ends (the docstring)
        if num_frames is None and length is None:
            num_frames = outer_length  # nothing said of this call's length: as set before (e.g. by load_state)
        try:
            if self._is_current(first):
                if num_frames is None and length is not None:
                    num_frames = self.frame_idx + length
                self._set_video_length(num_frames)
                ahead = self._prefetcher(it) if prefetch else None  # frame 1 is read while 0's masks are made
                yield self.frame_idx, self._masks()
            else:
                if num_frames is None and length is not None:
                    num_frames = self.frame_idx + 1 + length
                self._set_video_length(num_frames)
                encoded = self._encode(first)
                ahead = self._prefetcher(it) if prefetch else None
                self.wait()
                masks = self._step(encoded)
                yield self.frame_idx, masks
            for encoded in ahead if ahead is not None else (self._encode(frame) for frame in it):
                self.wait()
                masks = self._step(encoded)
                yield self.frame_idx, masks
        finally:
            if ahead is not None:
                ahead.close()
            self._set_video_length(outer_length)

    def _set_video_length(self, n: int | None) -> None:
        if n != self.num_frames:
            self.num_frames, self._length_warned = n, False
