"""Magnification from the image (segmentation/magnification.py) on drawn smears."""

from __future__ import annotations

import numpy as np
import pytest

from segmentation.magnification import (
    WHITE_BOX_PER_DIAMETER,
    estimate_scale,
    red_cell_diameter,
    white_cell_sizes,
)


def _smear(
    diameter: float,
    size: int = 400,
    seed: int = 0,
    white: float | None = None,
    white_at: list[tuple[float, float]] | None = None,
) -> np.ndarray:
    """Pink background, red cells with a paler centre (some touching), white cells.

    ``white``: diameter of each white cell (lilac cytoplasm around a dark purple
    nucleus of 0.6x that diameter) drawn at ``white_at`` (default the centre);
    None draws the old uniform violet disk of 3.6 red radii.
    """
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
    for wy, wx in white_at or [(size / 2, size / 2)]:
        d = np.hypot(yy - wy, xx - wx)
        if white is None:
            img[d <= 1.8 * r] = (120, 80, 170)  # a white cell
        else:
            img[d <= white / 2] = (185, 150, 205)  # cytoplasm
            img[d <= 0.3 * white] = (110, 50, 150)  # nucleus
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("diameter", [14.0, 24.0, 36.0])
def test_red_cell_diameter_recovers_drawn_size(diameter: float):
    d, n = red_cell_diameter(_smear(diameter))
    assert n >= 5
    assert d == pytest.approx(diameter, rel=0.1)


def test_red_ruler_follows_magnification_and_fails_on_blank():
    small = estimate_scale(_smear(16.0), cell_px=40.0, wbc_per_rbc=2.0, ruler="red")
    large = estimate_scale(_smear(32.0), cell_px=40.0, wbc_per_rbc=2.0, ruler="red")
    assert small.ok and large.ok and small.ruler == "red"
    assert small.scale == pytest.approx(40.0 / (2.0 * small.diameter_px))
    assert small.scale / large.scale == pytest.approx(2.0, rel=0.15)
    blank = estimate_scale(np.full((100, 100, 3), 230, np.uint8), 40.0, fallback=0.7)
    assert not blank.ok and blank.scale == 0.7 and np.isnan(blank.diameter_px)
    assert blank.ruler == "none"


@pytest.mark.parametrize("white", [40.0, 64.0, 90.0])
def test_white_cell_sizes_recover_the_whole_cell_not_the_nucleus(white: float):
    """The drawn white cell (cytoplasm included, touching red cells around it) is
    measured at its diameter, not at its nucleus's (0.6x)."""
    img = _smear(white / 2.2, size=500, white=white)
    sizes = white_cell_sizes(img)
    assert sizes.size == 1
    assert sizes[0] == pytest.approx(white, rel=0.12)


def test_white_cells_measured_at_full_resolution_size_and_each_one_counted():
    """Two white cells; the image is measured downscaled (> MEASURE_PX) but sizes
    come back in source px."""
    img = _smear(30.0, size=700, white=70.0, white_at=[(200, 200), (500, 480)])
    sizes = white_cell_sizes(img)
    assert sizes.size == 2
    assert np.allclose(sizes, 70.0, rtol=0.12)


def test_auto_ruler_uses_white_cells_then_red_cells():
    est = estimate_scale(_smear(20.0, size=500, white=50.0), cell_px=40.0)
    assert est.ok and est.ruler == "white" and est.n_cells == 1
    assert est.scale == pytest.approx(40.0 / (WHITE_BOX_PER_DIAMETER * est.white_px))
    # a field without white cells: the red cells are the ruler
    rng = np.random.default_rng(1)
    no_white = _smear(20.0, size=400)
    no_white[...] = np.where(
        (no_white[..., :1] < 140) & (no_white[..., 2:3] > 150),  # the violet disk -> plasma
        np.array([235, 225, 215], np.uint8),
        no_white,
    )
    no_white = np.clip(no_white + rng.normal(0, 1, no_white.shape), 0, 255).astype(np.uint8)
    red = estimate_scale(no_white, cell_px=40.0, wbc_per_rbc=2.0)
    assert red.ok and red.ruler == "red"
    assert red.diameter_px == pytest.approx(20.0, rel=0.1)
    with pytest.raises(ValueError, match="ruler"):
        estimate_scale(no_white, 40.0, ruler="blue")


def test_smear_folder_uses_the_estimate_per_image(tmp_path):
    """The embed reader measures each smear: the white-cell ruler's scale is the one
    recorded for the image, and twice the magnification gives half the scale."""
    import torch
    from PIL import Image

    from segmentation.model import build_maskrcnn, save_checkpoint
    from vae.inputs.query import segment_smear_folder

    torch.manual_seed(0)
    args = {"arch": "resnet18_fpn", "min_size": 128, "max_size": 128}
    save_checkpoint(tmp_path / "det.pt", build_maskrcnn(**args), args)
    (tmp_path / "smears").mkdir()
    Image.fromarray(_smear(12.0, size=300, white=30.0)).save(tmp_path / "smears" / "a.png")
    Image.fromarray(_smear(24.0, size=600, white=60.0)).save(tmp_path / "smears" / "b.png")
    fixed, _ = segment_smear_folder(tmp_path / "smears", tmp_path / "det.pt")
    assert set(fixed.uns["input_scales"].values()) == {1.0}  # the checkpoint's scale
    a, _ = segment_smear_folder(tmp_path / "smears", tmp_path / "det.pt", estimate_cell_px=40.0)
    sc = a.uns["input_scales"]
    assert set(sc) == {"smears/a", "smears/b"}
    sa, sb = sc["smears/a"], sc["smears/b"]
    assert sa == pytest.approx(40.0 / (WHITE_BOX_PER_DIAMETER * 30.0), rel=0.15)
    assert sa / sb == pytest.approx(2.0, rel=0.15)
