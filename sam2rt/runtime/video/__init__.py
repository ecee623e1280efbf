"""Video tracking with SAM 2's memory on the exported graphs (torch-free)."""

from .tracker import VideoTracker

__all__ = ["VideoTracker"]
