"""The sam2rt exception hierarchy: every error sam2rt raises on purpose derives from Sam2rtError."""

from __future__ import annotations


class Sam2rtError(Exception):
    """Base class of every error sam2rt raises; its message says what was wrong and how to fix it."""


class ModelFileError(Sam2rtError):
    """A model directory, graph or engine file is missing, unreadable or corrupt."""


class ManifestError(ModelFileError):
    """manifest.json is missing, malformed, or does not match the files beside it."""


class GraphNotExportedError(ModelFileError):
    """A graph a backend or tool needs was left out of a lean export (`sam2rt export --target`); the message names
    the export command that writes it."""


class CheckpointError(Sam2rtError):
    """A SAM 2 checkpoint could not be found, downloaded, read or loaded into the model."""


class ExportError(Sam2rtError):
    """The export to ONNX (or a TensorRT engine build) failed or produced a graph that disagrees with PyTorch."""


class BackendUnavailableError(Sam2rtError):
    """The requested inference backend (or its execution provider / GPU) is not available here."""


class EngineMismatchError(ModelFileError):
    """A TensorRT engine was built for another GPU or TensorRT version than the one present."""


class InputError(Sam2rtError, ValueError):
    """Base class for bad inputs given to the runtime (images, prompts, embeddings)."""


class InvalidImageError(InputError):
    """The image has the wrong type, dtype, shape, channel count or is empty."""


class InvalidPromptError(InputError):
    """A point, label, box or mask prompt is malformed, non-finite or outside the image."""


class InvalidEmbeddingError(InputError):
    """An embedding does not belong to this model or its file is corrupt."""


class ImageNotSetError(Sam2rtError, RuntimeError):
    """predict() was called before set_image()."""
