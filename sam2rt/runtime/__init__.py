"""The slim sam2rt runtime: numpy, OpenCV and ONNX Runtime / TensorRT only; it never imports torch."""

from .backends import BACKENDS, available_providers, create_backend
from .embedding import Embedding
from .model import Masks, Sam2Model
from .predictor import Predictor
from .prompts import Prompt
from .video import VideoTracker

__all__ = ["BACKENDS", "Embedding", "Masks", "Predictor", "Prompt", "Sam2Model", "VideoTracker", "available_providers", "create_backend"]
