"""The environment the project's install scripts make: one OpenCV distribution, so `import cv2` is not a mix."""

from __future__ import annotations

from importlib import metadata

OPENCV_DISTRIBUTIONS = {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}


def test_exactly_one_opencv_distribution():
    installed = sorted({(d.metadata["Name"] or "").lower() for d in metadata.distributions()} & OPENCV_DISTRIBUTIONS)
    assert installed == ["opencv-python-headless"], (
        f"OpenCV distributions installed: {installed}; they share the cv2 package. Run scripts/install_dev.sh "
        "(it keeps opencv-python-headless only)")


def test_cv2_is_the_installed_headless_build():
    import cv2

    assert metadata.version("opencv-python-headless").startswith(cv2.__version__)
