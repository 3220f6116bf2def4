"""Magnification of a smear from the image itself: the red cell is the ruler.

Red cells are the most numerous objects of a peripheral smear and have a
narrow size distribution (about 7.5 µm), so their typical diameter in pixels
gives the magnification. :func:`red_cell_diameter` measures it with
scikit-image; :func:`estimate_scale` turns it into the detector's working
scale (network px per source px) so that a white cell is about ``cell_px`` px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# median over images of (median ground-truth white-cell box side / red_cell_diameter) on
# TXL-PBC *train* (1003 images with white cells: `scripts/eval_segmentation.py --scale-only
# --scale estimate --wbc-per-rbc 1 ... --split train` -> median_ratio_to_oracle 2.2846;
# docs/segmentation_infer.md, "Automatic magnification"). White boxes of every type.
WBC_PER_RBC = 2.28


@dataclass
class ScaleEstimate:
    """Result of :func:`estimate_scale` for one image.

    diameter_px : typical red-cell diameter in source px (NaN when not found)
    n_cells : red-cell peaks it is based on
    scale : working px per source px (``fallback`` when not found)
    ok : whether the image gave an estimate
    """

    diameter_px: float
    n_cells: int
    scale: float
    ok: bool


def red_cell_diameter(
    image: np.ndarray, min_cells: int = 2, min_solidity: float = 0.85
) -> tuple[float, int]:
    """Typical red-cell diameter (px) of a smear image, and how many cells it rests on.

    Method: the green channel (haemoglobin absorbs green; white-cell nuclei
    too, but they are few) is smoothed and thresholded with Otsu, so cells are
    foreground and the plasma is not; holes (the central pallor of red cells)
    are filled. Touching cells are split by a watershed of the distance
    transform from its h-maxima (h = 1 px: one marker per cell centre).
    Segments that are convex (solidity >= ``min_solidity``: single cells, not
    unsplit clumps) and do not touch the border count; the median of their
    equivalent diameters is the answer (red cells outnumber white cells, and
    platelets fall below the minimum area).

    Parameters
    ----------
    image : (H, W, 3) uint8 RGB
    min_cells : fewer single cells than this -> (NaN, n)
    min_solidity : area / convex-hull area of a single cell

    Returns
    -------
    (diameter_px, n_cells)
    """
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label, regionprops
    from skimage.morphology import h_maxima
    from skimage.segmentation import clear_border, watershed

    g = image[..., 1] if image.ndim == 3 else image
    g = gaussian(g.astype(np.float32) / 255.0, sigma=1.0)
    if np.ptp(g) < 0.05:
        return float("nan"), 0
    fg = ndi.binary_fill_holes(g < threshold_otsu(g))
    dist = ndi.distance_transform_edt(fg)
    markers = label(h_maxima(gaussian(dist, sigma=1.0), 1.0))
    lab = clear_border(watershed(-dist, markers, mask=fg))
    # specks (platelets, debris): below 1/5000 of the image (8x8 px in 640x480)
    min_area = max(30, fg.size // 5000)
    d = [
        r.equivalent_diameter_area
        for r in regionprops(lab)
        if r.area >= min_area and r.solidity >= min_solidity
    ]
    if len(d) < min_cells:
        return float("nan"), len(d)
    return float(np.median(d)), len(d)


def estimate_scale(
    image: np.ndarray,
    cell_px: float,
    wbc_per_rbc: float = WBC_PER_RBC,
    fallback: float = 1.0,
) -> ScaleEstimate:
    """Working scale that makes a white cell about ``cell_px`` px, from the red cells.

    ``scale = cell_px / (wbc_per_rbc * diameter)``; ``fallback`` when the image
    has too few red cells to measure.
    """
    d, n = red_cell_diameter(image)
    if not np.isfinite(d) or d <= 0:
        return ScaleEstimate(float("nan"), n, float(fallback), False)
    return ScaleEstimate(d, n, float(cell_px / (wbc_per_rbc * d)), True)
