"""The contract every inference backend fulfils: read this class to write a new one.

A backend runs one exported model directory on one device. Sam2Model drives it through the image path

    preprocess(rgb) -> encode(image) -> prepare(features)        once per image   (Sam2Model.embed)
    decode_masks(features, prompts, request)                      per prompt batch (Sam2Model.decode)
        = decode(...) -> postprocess(low_res, iou, request)

and VideoTracker through preprocess -> encode per frame and upsample_masks(low-res logits) for its masks (with
prefetch, `VideoTracker.propagate` runs the next frame's preprocess -> encode on a worker thread while this frame's
upsample_masks runs: a backend's methods must be safe to call from two threads at once; each backend here guards its
own state with a lock), and nothing else: Sam2Model, Embedding, Predictor and VideoTracker never probe a backend for optional methods. The base
class implements the host (numpy) versions of preprocess, postprocess and upsample_masks and a no-op prepare; a backend
overrides them to keep the work on its device (OrtDeviceBackend does the whole path on the GPU).

Lifecycle (as Polygraphy's runners): construction loads everything the backend needs or raises
BackendUnavailableError / ModelFileError saying what is missing; `close()` frees sessions, engines,
threads and device memory, is idempotent, and runs on leaving a `with` block. A closed backend raises
BackendClosedError.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ...errors import BackendUnavailableError
from ..postprocess import Upsampler, clamp_logits, select_masks
from ..preprocess import preprocess as host_preprocess


class BackendClosedError(BackendUnavailableError):
    """The backend was closed; create a new one (Sam2Model.from_dir) to keep going."""


@dataclass(frozen=True)
class TokenChoice:
    """How SAM 2's MaskDecoder picks among its four output tokens (the manifest's decoder settings)."""

    dynamic_via_stability: bool = True
    stability_delta: float = 0.05
    stability_thresh: float = 0.98


@dataclass(frozen=True)
class MaskRequest:
    """What a caller wants from the decoder's four tokens.

    multimask_output: the three multimask tokens (else one token, chosen as `choice` says);
    orig_hw: the original image size the masks are brought to;
    threshold: masks are `upsampled > threshold`; None returns the upsampled float32 logits instead;
    float_masks: masks as float32 0/1 (what SAM2ImagePredictor returns) rather than bool.
    """

    multimask_output: bool
    orig_hw: tuple[int, int]
    threshold: float | None
    float_masks: bool = False
    choice: TokenChoice = TokenChoice()


@dataclass
class DecodedMasks:
    """Host results: masks (B,C,H,W) bool / float32 0/1 / float32 logits, scores (B,C), low-res logits (B,C,256,256) clamped."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


class Backend(abc.ABC):
    """Runs the exported graphs (or engines) of one model directory on one device.

    Attributes every backend sets in __init__:
      name: the backend's name as `create_backend` takes it ("onnxruntime-cpu", "onnxruntime-cuda", ...);
      device: "cpu" or "cuda:N", where encode()'s features live;
      precision: "fp32", "tf32", "fp16" or "int8" (what the numbers are computed in);
      threads: host threads for intra-op work;
      encoder_key: identifies the encoder whose features an embedding holds (embeddings of another key are
        refused by Sam2Model): the base encoder graph's sha256 for FP32-exact backends, the reduced-precision
        graph's or engine's for others;
      files: the manifest entries of the graphs/engines it loaded, by slot (recorded by benchmarks).
    """

    name: str
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    encoder_key: str
    files: Mapping[str, dict[str, Any]]

    def __init__(self) -> None:
        self._closed = False
        self._upsampler: Upsampler | None = None
        self._upsampler_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Free what the backend holds. Idempotent; subclasses free their own resources, then call this."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosedError(f"backend {self.name!r} was closed; load the model again to keep using it")

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the image path ----------------------------------------------------------------------
    def preprocess(self, image_rgb: np.ndarray, size: int) -> Any:
        """Checked HxWx3 uint8 RGB -> the normalised (1,3,size,size) float32 image in the form encode() takes.

        Host numpy here (exact to ~1e-6 against SAM2Transforms); device backends resize on the device.
        """
        return host_preprocess(image_rgb, size)

    @abc.abstractmethod
    def encode(self, image: Any) -> dict[str, Any]:
        """preprocess()'s image (or a host (1,3,S,S) float32 array) -> the three features by name
        (FEATURE_NAMES), as numpy arrays on "cpu" or device tensors with `to_host()` elsewhere."""

    def prepare(self, features: dict[str, Any]) -> dict[str, Any]:
        """Per-image tensors some decoders derive from the features once (Embedding.prepared); {} if none."""
        return {}

    @abc.abstractmethod
    def decode(
        self,
        features: dict[str, Any],
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray,
        has_mask_input: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One decoder pass over a batch of B prompts in the 1024 input frame -> host low_res_masks (B,4,256,256)
        and iou_predictions (B,4). `features` holds FEATURE_NAMES (host or this backend's device) and may
        hold prepare()'s tensors too. `mask_input` (B,1,256,256) float32 may be a read-only broadcast view (the
        zeros of prompts without a mask, has_mask_input 0): a backend that feeds it to a graph makes it
        contiguous (np.ascontiguousarray) first."""

    def postprocess(self, low_res: np.ndarray, iou: np.ndarray, request: MaskRequest) -> DecodedMasks:
        """The four tokens -> the requested masks, scores and clamped low-res logits (host numpy path)."""
        choice = request.choice
        logits, scores = select_masks(
            low_res, iou, request.multimask_output, dynamic_via_stability=choice.dynamic_via_stability,
            stability_delta=choice.stability_delta, stability_thresh=choice.stability_thresh,
        )
        upsample = self._host_upsampler()
        if request.threshold is None:
            masks = upsample(logits, request.orig_hw)
        else:
            masks = upsample(logits, request.orig_hw, request.threshold, request.float_masks)
        return DecodedMasks(masks, scores, clamp_logits(logits))

    def upsample_masks(self, logits: np.ndarray, orig_hw: tuple[int, int], threshold: float) -> np.ndarray:
        """(B,C,h,w) host low-res logits -> (B,C,H,W) bool masks `upsampled > threshold` at the original size (the
        video tracker's masks). Host here; device backends upsample on their device and bring only the masks down."""
        return self._host_upsampler()(logits, orig_hw, threshold)

    def decode_masks(
        self,
        features: dict[str, Any],
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray,
        has_mask_input: np.ndarray,
        request: MaskRequest,
    ) -> DecodedMasks:
        """decode() then postprocess(); device backends override it to keep the logits on the device."""
        low_res, iou = self.decode(features, point_coords, point_labels, mask_input, has_mask_input)
        return self.postprocess(low_res, iou, request)

    # --- embeddings between host and device ---------------------------------------------------
    def upload_features(self, features: dict[str, np.ndarray]) -> dict[str, Any]:
        """Host features -> features on this backend's device (Embedding.to_device). Host backends: as they are."""
        return dict(features)

    @staticmethod
    def to_host(value: Any) -> np.ndarray:
        """A feature (numpy array or device tensor) as a host numpy array."""
        to_host = getattr(value, "to_host", None)  # device tensors (OrtDeviceTensor, DeviceArray) define it
        return np.asarray(to_host() if to_host is not None else value)

    # --- helpers for subclasses ----------------------------------------------------------------
    def _host_upsampler(self) -> Upsampler:
        if self._upsampler is None:
            with self._upsampler_lock:
                if self._upsampler is None:
                    self._upsampler = Upsampler(self.threads)
        return self._upsampler
