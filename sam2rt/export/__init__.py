"""Export of SAM 2 checkpoints to ONNX graphs (and TensorRT engines). This subpackage imports torch."""

from .checkpoint import build_model, download_checkpoint, load_checkpoint, save_checkpoint
from .onnx_export import DEFAULT_OPSET, export_model

__all__ = ["DEFAULT_OPSET", "build_model", "download_checkpoint", "export_model", "load_checkpoint", "save_checkpoint"]
