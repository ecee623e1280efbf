"""Page-locked result arrays (runtime/gpu.py PinnedPool) and the device pipeline's use of them, on the CPU.

cuda-python is emulated (test_tensorrt_backend_emulated.FakeCudart: host memory and memmove), so what is checked is
sam2rt's bookkeeping: a block is reused only once every array over it is gone, the bounds hold, a failure to pin
falls back to ordinary arrays, and the pipeline's results are the same numbers either way. Real page-locking and its
speed need a GPU (tests/test_gpu.py, benchmarks/gpu_bench.py).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from test_tensorrt_backend_emulated import FakeCudart

MIB = 2**20


@pytest.fixture
def cudart(monkeypatch):
    import sam2rt.runtime.gpu as gpu

    fake = FakeCudart()
    monkeypatch.setattr(gpu, "_CUDART", fake)
    return fake


def _pinned(array: np.ndarray) -> bool:
    from sam2rt.runtime.gpu import _PinnedBlock

    base = array
    while base is not None and not isinstance(base, _PinnedBlock):
        base = getattr(base, "base", None)
    return base is not None


def test_a_block_is_reused_only_when_every_array_over_it_is_gone(cudart):
    from sam2rt.runtime.gpu import PinnedPool

    pool = PinnedPool()
    a = pool.empty((512, 1024), np.float32)  # 2 MiB
    assert a is not None and _pinned(a) and a.shape == (512, 1024) and a.flags.writeable
    a[:] = 7.0
    view = a[3]
    del a
    gc.collect()
    b = pool.empty((512, 1024), np.float32)
    assert pool.allocations == 2 and b.ctypes.data != view.ctypes.data  # the view still holds the first block
    np.testing.assert_array_equal(view, 7.0)
    del view
    gc.collect()
    assert pool.cached == 1
    c = pool.empty((1024, 512), np.float32)  # same size, another shape: the freed block
    assert pool.allocations == 2 and pool.cached == 0 and c.shape == (1024, 512)
    assert pool.empty((10, 10), np.float32) is None  # under min_bytes: not worth a block


def test_pool_bounds_and_close(cudart):
    from sam2rt.runtime.gpu import PinnedPool

    pool = PinnedPool(max_bytes=6 * MIB, per_size=2)
    held = [pool.empty((MIB,), np.uint8), pool.empty((MIB,), np.uint8)]
    assert all(x is not None for x in held)
    assert pool.empty((MIB,), np.uint8) is None  # per_size: a caller keeping every result gets pageable ones
    del held
    gc.collect()
    assert pool.cached == 2 and pool.total == 2 * MIB
    big = pool.empty((5 * MIB,), np.uint8)  # room made by evicting one cached block, the other kept
    assert big is not None and pool.total == 6 * MIB and pool.cached == 1
    assert pool.empty((2 * MIB,), np.uint8) is None  # over max_bytes even with every cached block evicted
    assert pool.total == 5 * MIB and pool.cached == 0
    del big
    gc.collect()
    pool.close()
    assert pool.cached == 0 and pool.total == 0 and not cudart.blocks
    assert pool.empty((2 * MIB,), np.uint8) is None


def test_a_failure_to_pin_falls_back_for_good(cudart, monkeypatch):
    from sam2rt.runtime.gpu import PinnedPool

    monkeypatch.setattr(cudart, "cudaMallocHost", lambda size: (2,))  # cudaErrorMemoryAllocation
    pool = PinnedPool()
    assert pool.empty((2 * MIB,), np.uint8) is None
    monkeypatch.undo()
    assert pool.empty((2 * MIB,), np.uint8) is None  # not tried again


@pytest.mark.parametrize("fixed", [False, True])
def test_pipeline_results_in_pinned_arrays_are_the_same_numbers(cudart, fixed):
    """Postprocessing and mask upsampling with pinned results, through the plain sessions and through fixed buffers:
    equal to the pipeline without, large results pinned (with fixed buffers: from the first replay on), small ones
    not, every result the caller's own although blocks are reused once the caller drops them."""
    import onnxruntime as ort

    from sam2rt.runtime.backends import MaskRequest
    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER
    from sam2rt.runtime.backends.onnxruntime_backend import session_options
    from sam2rt.runtime.backends.ort_pipeline import OrtPipeline

    def make(pinned: bool) -> OrtPipeline:
        return OrtPipeline(ort, ["CPUExecutionProvider"], "cpu", 0, lambda: session_options(2), fixed_buffers=fixed,
                           pinned_results=pinned)

    pinned, plain = make(True), make(False)
    assert pinned.pinned is not None and plain.pinned is None
    rng = np.random.default_rng(11)
    request = MaskRequest(True, (600, 700), 0.0, float_masks=True)  # 2 x 3 x 600 x 700 float32: 10 MB of masks
    kept = []
    for i in range(CAPTURE_AFTER + 3):
        low = (rng.standard_normal((2, 4, 256, 256)) * 3).astype(np.float32)
        iou = rng.random((2, 4)).astype(np.float32)
        got, ref = pinned.postprocess(low, iou, request), plain.postprocess(low, iou, request)
        for a, b in ((got.masks, ref.masks), (got.scores, ref.scores), (got.low_res_logits, ref.low_res_logits)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
        replay = i >= CAPTURE_AFTER  # with fixed buffers, results before capture come from the plain session
        if replay or not fixed:
            assert _pinned(got.masks) and _pinned(got.low_res_logits) and not _pinned(got.scores)
        up = pinned.upsample_masks(low[:, :1], (1100, 1000), 0.0)  # 2.2 MB of bool masks
        np.testing.assert_array_equal(up, plain.upsample_masks(low[:, :1], (1100, 1000), 0.0))
        assert _pinned(up) or (fixed and not replay)
        if i < 2:
            kept.append((got.masks, got.masks.copy()))  # kept by the caller: its blocks must never be reused
        del got, up
        gc.collect()
    for result, copy in kept:
        np.testing.assert_array_equal(result, copy)
    assert pinned.replays > 0 if fixed else pinned.replays == 0
    # blocks are reused: per call three pinned results, but far fewer allocations than results
    assert pinned.pinned.allocations <= 3 + len(kept) + 2, pinned.pinned.allocations
    pinned.close()


def test_a_pipeline_whose_pinned_copy_fails_returns_the_same_numbers_unpinned(cudart, monkeypatch):
    """A device-to-host copy that fails (cuda-python and the driver disagreeing) turns pinning off, not the results."""
    import onnxruntime as ort

    from sam2rt.runtime.backends import MaskRequest
    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER
    from sam2rt.runtime.backends.onnxruntime_backend import session_options
    from sam2rt.runtime.backends.ort_pipeline import OrtPipeline

    pipe = OrtPipeline(ort, ["CPUExecutionProvider"], "cpu", 0, lambda: session_options(2), fixed_buffers=True,
                       pinned_results=True)
    monkeypatch.setattr(cudart, "cudaMemcpy", lambda *args: (700,))  # cudaErrorIllegalAddress
    rng = np.random.default_rng(2)
    low = (rng.standard_normal((2, 4, 256, 256)) * 3).astype(np.float32)
    iou = rng.random((2, 4)).astype(np.float32)
    request = MaskRequest(True, (600, 700), 0.0, float_masks=True)
    want = [(r.masks, r.low_res_logits) for r in [pipe.postprocess(low, iou, request)]][0]
    for _ in range(CAPTURE_AFTER + 1):  # through the replays, where the pinned download is tried
        got = pipe.postprocess(low, iou, request)
        np.testing.assert_array_equal(got.masks, want[0])
        np.testing.assert_array_equal(got.low_res_logits, want[1])
    assert pipe.replays > 0 and pipe.pinned is None and not _pinned(got.masks)


@pytest.mark.parametrize("fixed", [False, True])
def test_images_go_up_through_a_pinned_block_with_the_same_numbers(cudart, fixed):
    """An image of 256 KiB and more is copied into a page-locked block of the pipeline's UploadStaging and uploaded
    from there (plain sessions and fixed buffers): the same preprocessing as without, one block reused call after call
    (a smaller image's too) and free again when the call returns; an image under 256 KiB, or `pinned_uploads` off,
    goes up as it is. The results' pool gives no block to uploads."""
    import onnxruntime as ort

    from sam2rt.runtime.backends.fixed_shapes import CAPTURE_AFTER
    from sam2rt.runtime.backends.onnxruntime_backend import session_options
    from sam2rt.runtime.backends.ort_pipeline import OrtPipeline

    def make(pinned: bool) -> OrtPipeline:
        return OrtPipeline(ort, ["CPUExecutionProvider"], "cpu", 0, lambda: session_options(2), fixed_buffers=fixed,
                           pinned_results=pinned)

    staged, plain = make(True), make(False)
    rng = np.random.default_rng(5)
    big = rng.integers(0, 256, (1080, 1920, 3), np.uint8)  # 6 MB
    small = rng.integers(0, 256, (200, 300, 3), np.uint8)  # 180 KB
    for i in range(CAPTURE_AFTER + 2):
        img = big if i % 2 == 0 else 255 - big  # new pixels each call: a stale block would show
        np.testing.assert_array_equal(staged.preprocess(img, 1024).numpy(), plain.preprocess(img, 1024).numpy())
        assert staged.staging.uploads == i + 1 and staged.staging.allocations == 1
        assert len(staged.staging._free) == 1  # back when the call returned
    half = big[:540]  # a smaller image: the same block
    np.testing.assert_array_equal(staged.preprocess(half, 1024).numpy(), plain.preprocess(half, 1024).numpy())
    np.testing.assert_array_equal(staged.preprocess(small, 1024).numpy(), plain.preprocess(small, 1024).numpy())
    assert staged.staging.uploads == CAPTURE_AFTER + 3 and staged.staging.allocations == 1  # small: not staged
    assert staged.pinned.allocations == 0  # the results' pool: untouched by uploads
    staged.pinned_uploads = False
    np.testing.assert_array_equal(staged.preprocess(big, 1024).numpy(), plain.preprocess(big, 1024).numpy())
    assert staged.staging.uploads == CAPTURE_AFTER + 3
    assert plain.staging is None  # no pinning, no staging
    staged.close()
    assert staged.staging.closed and not staged.staging._free


def test_upload_staging_grows_its_blocks_and_bounds_them(cudart):
    """Blocks are reused for any array that fits, replaced by a power of two when one does not; at most `blocks` are
    taken at once (more go as they are); arrays out of [min_bytes, max_bytes] are not staged; a failure to allocate
    turns staging off for good; the staged copy is the array's while the context lasts."""
    from sam2rt.runtime.staging import UploadStaging, block_bytes

    assert block_bytes(1) == MIB and block_bytes(MIB) == MIB and block_bytes(MIB + 1) == 2 * MIB
    staging = UploadStaging(blocks=2, max_bytes=16 * MIB, min_bytes=1024)
    a = np.arange(3 * MIB // 4, dtype=np.float32).reshape(-1, 4)  # 3 MiB
    with staging.take(a[:100]) as s:
        assert s is not a and _in_block(s) and s.dtype == a.dtype and s.shape == (100, 4)
        np.testing.assert_array_equal(s, a[:100])
    assert staging.allocations == 1 and staging._free[0].nbytes == MIB
    with staging.take(a[:100]) as s, staging.take(a) as t:  # two at once: the free 1 MiB block and a new 4 MiB one
        assert _in_block(s) and _in_block(t) and staging.allocations == 2
        np.testing.assert_array_equal(t, a)
        with staging.take(a) as u:  # a third: every block taken, not staged
            assert u is a
    big = np.zeros(5 * MIB, np.uint8)
    with staging.take(big) as s:  # fits no free block: the smaller one (1 MiB) is replaced by an 8 MiB one
        assert _in_block(s) and staging.allocations == 3 and staging._made == 2
    assert sorted(b.nbytes for b in staging._free) == [4 * MIB, 8 * MIB]
    with staging.take(a) as s:  # the smallest block that fits: the 4 MiB one, the 8 MiB one stays free
        assert _in_block(s) and [b.nbytes for b in staging._free] == [8 * MIB] and staging.allocations == 3
    for out_of_range in (np.zeros(100, np.uint8), np.zeros(17 * MIB, np.uint8)):
        with staging.take(out_of_range) as s:
            assert s is out_of_range
    staging.close()
    assert not staging._free and staging._made == 0 and not cudart.blocks

    failing = UploadStaging()
    cudart_malloc = cudart.cudaMallocHost
    cudart.cudaMallocHost = lambda size: (2,)  # cudaErrorMemoryAllocation
    try:
        with failing.take(a) as s:
            assert s is a
    finally:
        cudart.cudaMallocHost = cudart_malloc
    with failing.take(a) as s:  # off for good
        assert s is a and failing.closed


def _in_block(array: np.ndarray) -> bool:
    """Whether `array` lies in page-locked memory of the emulated driver (a PinnedBuffer's)."""
    import ctypes

    import sam2rt.runtime.gpu as gpu

    ptr = array.__array_interface__["data"][0]
    return any(start <= ptr < start + ctypes.sizeof(buf) for start, buf in gpu._CUDART.blocks.items())


def test_a_clicks_masks_and_logits_come_down_pinned(cudart):
    """One click on a 512x512 image: three 512x512 bool masks and three 256x256 logits, 768 KiB each, are over the
    pool's 256 KiB and come down pinned (under the old 1 MiB threshold they came down pageable); the scores do not."""
    import onnxruntime as ort

    from sam2rt.runtime.backends import MaskRequest
    from sam2rt.runtime.backends.onnxruntime_backend import session_options
    from sam2rt.runtime.backends.ort_pipeline import OrtPipeline
    from sam2rt.runtime.gpu import PIN_MIN_BYTES

    pipe = OrtPipeline(ort, ["CPUExecutionProvider"], "cpu", 0, lambda: session_options(2), pinned_results=True)
    plain = OrtPipeline(ort, ["CPUExecutionProvider"], "cpu", 0, lambda: session_options(2), pinned_results=False)
    rng = np.random.default_rng(4)
    low = (rng.standard_normal((1, 4, 256, 256)) * 3).astype(np.float32)
    iou = rng.random((1, 4)).astype(np.float32)
    request = MaskRequest(True, (512, 512), 0.0)
    got, ref = pipe.postprocess(low, iou, request), plain.postprocess(low, iou, request)
    assert got.masks.nbytes == got.low_res_logits.nbytes == 3 * 2**18 and PIN_MIN_BYTES <= got.masks.nbytes < 2**20
    assert _pinned(got.masks) and _pinned(got.low_res_logits) and not _pinned(got.scores)
    for a, b in ((got.masks, ref.masks), (got.scores, ref.scores), (got.low_res_logits, ref.low_res_logits)):
        np.testing.assert_array_equal(a, b)
    pipe.close()
