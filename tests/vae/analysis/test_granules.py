"""Granule counter and lobe counter on hand-drawn cells with known answers."""

import numpy as np
import pytest
from skimage.draw import disk, ellipse, line

from vae.analysis import granules as G

PINK = (0.93, 0.78, 0.82)
PURPLE = (0.35, 0.2, 0.5)
GRANULE = (0.55, 0.35, 0.6)
BG = (1.0, 1.0, 1.0)


def _cell(n_dots: int, size: int = 100, nucleus: str = "round"):
    """A pink disk (r=40) with a purple nucleus and ``n_dots`` dark dots (r=1.5)."""
    img = np.ones((size, size, 3)) * BG
    c = size // 2
    cell = np.zeros((size, size), bool)
    cell[disk((c, c), 40, shape=cell.shape)] = True
    img[cell] = PINK
    draw_nucleus(img, nucleus, c)
    # dots on a ring well away from nucleus and border, evenly spaced
    for k in range(n_dots):
        a = 2 * np.pi * k / max(n_dots, 1)
        rr, cc = disk((c + 28 * np.sin(a), c + 28 * np.cos(a)), 1.6, shape=cell.shape)
        img[rr, cc] = GRANULE
    return img, cell


def draw_nucleus(img, kind, c):
    if kind == "round":
        img[disk((c, c), 12, shape=img.shape[:2])] = PURPLE
    elif kind == "three_lobes":
        for dc in (-14, 0, 14):
            img[disk((c, c + dc), 5.5, shape=img.shape[:2])] = PURPLE
        rr, cc = line(c, c - 14, c, c + 14)
        img[rr, cc] = PURPLE  # one-pixel filaments between the lobes
    elif kind == "band":
        img[ellipse(c, c, 5, 16, shape=img.shape[:2])] = PURPLE


@pytest.mark.parametrize("n", [0, 1, 7, 12])
def test_granule_count_on_hand_drawn_disk_is_exact(n):
    img, cell = _cell(n)
    m = G.measure_cell(img, cell)
    assert m.features.granule_count == n
    assert m.features.lobes == 1
    # density per 100 px^2 of cytoplasm
    assert m.features.granule_density == pytest.approx(100 * n / m.features.cytoplasm_area)


def test_granules_are_not_counted_in_the_nucleus_or_outside_the_cell():
    img, cell = _cell(5)
    # dark dots inside the nucleus and on the background must not count
    img[disk((50, 50), 1.6)] = (0.1, 0.05, 0.15)
    img[disk((3, 3), 1.6)] = GRANULE
    assert G.measure_cell(img, cell).features.granule_count == 5


@pytest.mark.parametrize("kind,lobes", [("round", 1), ("band", 1), ("three_lobes", 3)])
def test_lobe_count_on_hand_drawn_nuclei(kind, lobes):
    img, cell = _cell(0, nucleus=kind)
    m = G.measure_cell(img, cell)
    assert m.features.lobes == lobes


def test_count_lobes_on_masks():
    m = np.zeros((40, 60), bool)
    assert G.count_lobes(m) == 0
    m[disk((20, 15), 6)] = True
    assert G.count_lobes(m) == 1
    m[disk((20, 40), 6)] = True  # two separate lobes
    assert G.count_lobes(m) == 2
    m[20, 15:40] = True  # joined by a filament: still two
    assert G.count_lobes(m) == 2


def test_nucleus_segmentation_matches_drawn_nucleus():
    img, cell = _cell(0)
    nuc = G.segment_nucleus(img, cell)
    truth = np.zeros_like(cell)
    truth[disk((50, 50), 12)] = True
    iou = (nuc & truth).sum() / (nuc | truth).sum()
    assert iou > 0.9


def test_texture_and_hue():
    img, cell = _cell(0)
    grainy, _ = _cell(12)
    a = G.measure_cell(img, cell).features
    b = G.measure_cell(grainy, cell).features
    assert a.glcm_contrast == pytest.approx(0.0)
    assert b.glcm_contrast > 0
    # pink cytoplasm: hue near red/magenta (> 300 or < 30 degrees)
    assert a.cytoplasm_hue > 300 or a.cytoplasm_hue < 30
    blue = img.copy()
    blue[cell & ~G.segment_nucleus(img, cell)] = (0.6, 0.7, 0.95)
    h = G.measure_cell(blue, cell).features.cytoplasm_hue
    assert 200 < h < 240


def test_mask_from_background_and_batch():
    img, cell = _cell(3)
    m = G.mask_from_background(img, BG)
    assert (m == cell).mean() > 0.99
    df = G.measure_batch(np.stack([img, img]), np.stack([cell, cell]))
    assert list(df["granule_count"]) == [3, 3]
    assert set(G.FEATURES) <= set(df.columns)
    # uint8 input gives the same count
    u8 = (img * 255).round().astype(np.uint8)
    assert G.measure_cell(u8, cell).features.granule_count == 3


def test_bad_shapes_fail_loudly():
    with pytest.raises(ValueError, match="RGB"):
        G.measure_cell(np.zeros((10, 10)), np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="cell_mask shape"):
        G.measure_cell(np.zeros((10, 10, 3)), np.ones((9, 10), bool))
