"""Magnification from the red cells (segmentation/magnification.py) on drawn smears."""

from __future__ import annotations

import numpy as np
import pytest

from segmentation.magnification import estimate_scale, red_cell_diameter


def _smear(diameter: float, size: int = 400, seed: int = 0) -> np.ndarray:
    """Pink background, red cells with a paler centre (some touching), one large violet cell."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.float32)
    img[:] = (235, 225, 215)
    yy, xx = np.mgrid[:size, :size]
    r = diameter / 2
    centres = []
    while len(centres) < 40:
        c = rng.uniform(r + 2, size - r - 2, 2)
        if all(np.hypot(*(c - d)) > 1.6 * r for d in centres):  # some cells touch
            centres.append(c)
    for cy, cx in centres:
        d = np.hypot(yy - cy, xx - cx)
        img[d <= r] = (200, 120, 130)
        img[d <= 0.35 * r] = (220, 170, 175)  # central pallor
    d = np.hypot(yy - size / 2, xx - size / 2)
    img[d <= 1.8 * r] = (120, 80, 170)  # a white cell
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("diameter", [14.0, 24.0, 36.0])
def test_red_cell_diameter_recovers_drawn_size(diameter: float):
    d, n = red_cell_diameter(_smear(diameter))
    assert n >= 5
    assert d == pytest.approx(diameter, rel=0.1)


def test_estimate_scale_follows_magnification_and_fails_on_blank():
    small = estimate_scale(_smear(16.0), cell_px=40.0, wbc_per_rbc=2.0)
    large = estimate_scale(_smear(32.0), cell_px=40.0, wbc_per_rbc=2.0)
    assert small.ok and large.ok
    assert small.scale == pytest.approx(40.0 / (2.0 * small.diameter_px))
    assert small.scale / large.scale == pytest.approx(2.0, rel=0.15)
    blank = estimate_scale(np.full((100, 100, 3), 230, np.uint8), 40.0, fallback=0.7)
    assert not blank.ok and blank.scale == 0.7 and np.isnan(blank.diameter_px)
