"""vae.stain: Reinhard colour matching of crops in CIELAB, group by group."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2lab

from vae.stain import lab_stats, match_stain


def _crops(n: int = 6, size: int = 12, tint=(180, 120, 200), seed: int = 0):
    """Disc cells of one tint with per-cell variation on a grey background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size * 0.35) ** 2
    crops = np.full((n, size, size, 3), 128, np.uint8)
    for i in range(n):
        colour = np.clip(np.asarray(tint) + rng.normal(0, 12, 3), 0, 255)
        noise = rng.normal(0, 6, (size, size, 3))
        crops[i][disc] = np.clip(colour + noise[disc], 0, 255).astype(np.uint8)
    return crops, np.repeat(disc[None], n, 0)


def test_lab_stats_pool_the_cell_pixels_of_every_crop():
    crops, masks = _crops()
    mean, sd = lab_stats(crops, masks)
    px = rgb2lab(crops)[masks]
    np.testing.assert_allclose(mean, px.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sd, px.std(0), rtol=1e-6)
    with pytest.raises(ValueError, match="no cell pixel"):
        lab_stats(crops, np.zeros_like(masks))
    with pytest.raises(ValueError, match=r"\(n, S, S, 3\)"):
        lab_stats(crops[..., 0], masks)


def test_each_group_reaches_the_target_and_keeps_its_cells_apart():
    ref = _crops(8, tint=(200, 110, 170), seed=1)
    target = lab_stats(*ref)
    a, ma = _crops(6, tint=(150, 150, 220), seed=2)  # a bluish microscope
    b, mb = _crops(6, tint=(220, 190, 120), seed=3)  # a yellowish one
    crops, masks = np.concatenate([a, b]), np.concatenate([ma, mb])
    groups = np.array(["a"] * 6 + ["b"] * 6)
    out = match_stain(crops, masks, *target, groups=groups)
    assert out.dtype == np.uint8 and out.shape == crops.shape
    assert not np.shares_memory(out, crops)
    np.testing.assert_array_equal(out[~masks], crops[~masks])  # background untouched
    for g in ("a", "b"):
        mean, sd = lab_stats(out[groups == g], masks[groups == g])
        np.testing.assert_allclose(mean, target[0], atol=1.5)  # uint8 rounding, gamut clip
        np.testing.assert_allclose(sd, target[1], rtol=0.15, atol=0.5)
    # within a group, the cells keep their order on each channel (a cast is removed,
    # not the differences between cells)
    before = np.array([rgb2lab(c)[m].mean(0) for c, m in zip(a, ma)])
    after = np.array([rgb2lab(c)[m].mean(0) for c, m in zip(out[:6], masks[:6])])
    for ch in range(3):
        assert (np.argsort(before[:, ch]) == np.argsort(after[:, ch])).all()
    # one group for all: the pooled statistics reach the target, each source keeps its cast
    pooled = match_stain(crops, masks, *target)
    np.testing.assert_allclose(lab_stats(pooled, masks)[0], target[0], atol=1.5)
    assert abs(lab_stats(pooled[:6], ma)[0][2] - lab_stats(pooled[6:], mb)[0][2]) > 10


def test_a_flat_channel_is_shifted_not_scaled_and_bad_groups_are_refused():
    crops = np.zeros((2, 6, 6, 3), np.uint8)
    crops[:] = (120, 120, 120)  # a grey cell: no spread in any channel
    masks = np.ones((2, 6, 6), bool)
    target = (np.array([60.0, 0.0, 0.0]), np.array([10.0, 5.0, 5.0]))
    out = match_stain(crops, masks, *target)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(lab_stats(out, masks)[0], target[0], atol=1.0)
    with pytest.raises(ValueError, match="groups must be"):
        match_stain(crops, masks, *target, groups=np.array([0, 1, 2]))
