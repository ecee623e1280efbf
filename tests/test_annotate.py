"""Annotated images: masks and prompts drawn, and a random-weight model's pictures marked as such."""

from __future__ import annotations

import numpy as np

from sam2rt.annotate import BANNER_COLOR, annotate


def _banner_rows(img: np.ndarray, background: int) -> int:
    """How many rows from the top are covered by a red banner (no pixel left at the uniform background value)."""
    covered = ~np.any(np.all(img == background, axis=-1), axis=1)
    rows = 0
    while rows < len(covered) and covered[rows]:
        rows += 1
    red = np.all(img[:rows] == np.array(BANNER_COLOR, np.uint8), axis=-1)
    return rows if rows and red.mean() > 0.2 else 0


def test_random_weights_banner_is_drawn_in_pixels():
    gray = np.full((400, 600, 3), 120, np.uint8)
    masks = np.zeros((1, 400, 600), bool)
    masks[0, 200:300, 250:350] = True
    plain = annotate(gray, masks)
    marked = annotate(gray, masks, random_weights=True)
    assert _banner_rows(plain, 120) == 0
    band = _banner_rows(marked, 120)
    assert band == 400 // 12
    top = marked[:band]
    white_text = np.all(top > 200, axis=-1)
    assert white_text.sum() > 200, "the banner carries white text"
    assert white_text[:, :300].any() and white_text[:, 300:].any(), "the text spans the width"
    np.testing.assert_array_equal(marked[band + 2:], plain[band + 2:])  # the rest of the picture is untouched
    np.testing.assert_array_equal(gray, np.full((400, 600, 3), 120, np.uint8))  # the input is not modified


def test_banner_fits_small_images():
    for h, w in ((10, 10), (40, 50), (30, 2000)):
        marked = annotate(np.zeros((h, w, 3), np.uint8), np.zeros((0, h, w), bool), random_weights=True)
        assert marked.shape == (h, w, 3) and _banner_rows(marked, 0) == min(h, max(16, h // 12))
