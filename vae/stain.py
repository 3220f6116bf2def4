"""Colour matching of crops between microscopes (Reinhard et al. 2001, in CIELAB).

A model trained on some microscopes places the cells of another one elsewhere in its
latent space: their stain, lamp and camera shift every colour, and a label transfer by
nearest neighbours then reads the shift as a class (``scripts/unseen_source_check.py``).
Moving the cell pixels of a group of crops (one microscope, slide or sample) to the
mean and standard deviation that the model's training crops have, channel by channel
in CIELAB, removes the group's colour cast and keeps the colour differences between
its cells (an eosinophil stays more orange than its neutrophils). Pure functions: no
file is read here.
"""

from __future__ import annotations

import warnings

import numpy as np


def lab_stats(crops: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the cell pixels of ``crops`` in CIELAB.

    Parameters
    ----------
    crops : (n, S, S, 3) uint8 RGB crops.
    masks : (n, S, S) bool, the cell's pixels.

    Returns
    -------
    (mean, sd) : two (3,) float64 arrays, L* (0-100), a*, b*; over every masked pixel
        of every crop pooled.

    Raises
    ------
    ValueError
        Shapes that do not match, or no masked pixel at all.
    """
    from skimage.color import rgb2lab

    crops, masks = _check(crops, masks)
    if not masks.any():
        raise ValueError("lab_stats: no cell pixel in the masks")
    cells = masks.any((1, 2))  # crops with a cell pixel: the others add nothing
    px = rgb2lab(crops[cells])[masks[cells]]
    return px.mean(0), px.std(0)


def match_stain(
    crops: np.ndarray,
    masks: np.ndarray,
    target_mean: np.ndarray,
    target_sd: np.ndarray,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Crops whose cell pixels have, group by group, the target's CIELAB mean and sd.

    Parameters
    ----------
    crops : (n, S, S, 3) uint8 RGB crops.
    masks : (n, S, S) bool, the cell's pixels; pixels outside stay as they are.
    target_mean, target_sd : (3,) the statistics to reach (:func:`lab_stats` of the
        reference crops).
    groups : (n,) group of each crop (microscope, slide, sample), or None: one group.
        A group's statistics are pooled over all its crops, so the differences between
        its cells are kept.

    Returns
    -------
    (n, S, S, 3) uint8: the matched crops (a new array).
    """
    from skimage.color import lab2rgb, rgb2lab

    crops, masks = _check(crops, masks)
    target_mean = np.asarray(target_mean, np.float64).reshape(3)
    target_sd = np.asarray(target_sd, np.float64).reshape(3)
    out = crops.copy()
    groups = np.zeros(len(crops), int) if groups is None else np.asarray(groups)
    if groups.shape != (len(crops),):
        raise ValueError(f"match_stain: groups must be ({len(crops)},); got {groups.shape}")
    for g in np.unique(groups):
        rows = np.flatnonzero((groups == g) & masks.any((1, 2)))
        if rows.size == 0:  # no cell pixel in the group: nothing to match
            continue
        lab = rgb2lab(crops[rows])
        m = masks[rows]
        mean, sd = lab[m].mean(0), lab[m].std(0)
        # a channel without spread (a flat test image) is shifted, not scaled
        scale = np.where(sd > 1e-6, target_sd / np.maximum(sd, 1e-6), 1.0)
        moved = (lab - mean) * scale + target_mean
        with warnings.catch_warnings():
            # colours moved outside sRGB: skimage clips them (and says so); so do we
            warnings.filterwarnings("ignore", message=".*negative Z values.*")
            rgb = (np.clip(lab2rgb(moved), 0, 1) * 255).round().astype(np.uint8)
        block = out[rows]
        block[m] = rgb[m]
        out[rows] = block
    return out


def _check(crops: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    crops, masks = np.asarray(crops), np.asarray(masks).astype(bool)
    if crops.ndim != 4 or crops.shape[-1] != 3 or masks.shape != crops.shape[:3]:
        raise ValueError(
            f"crops must be (n, S, S, 3) and masks (n, S, S); got {crops.shape}, {masks.shape}"
        )
    return crops, masks
