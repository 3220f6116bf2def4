"""Granule and nucleus quantification on single-cell crops (scikit-image).

Works the same on real crops and on images decoded by the VAE, so the two
can be compared. For one RGB crop and its cell mask:

1. nucleus: the darkest (most stained) pixels inside the cell, Otsu
   threshold of a stain score, small specks (granules) removed, holes filled;
2. lobes: connected parts of the nucleus core (pixels farther than
   ``core_fraction`` x the widest half-width from the nucleus border), so
   thin bridges between lobes do not join them;
3. cytoplasm = cell mask minus a rim at the cell outline and a margin around
   the nucleus (both dark and blurred, they would read as granules);
4. granules: Laplacian-of-Gaussian blobs of the stain score inside the
   cytoplasm; count and density (per 100 px^2 of cytoplasm);
5. texture: GLCM contrast of the cytoplasm grey levels;
6. colour: circular mean hue (degrees) and mean saturation of the cytoplasm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

FEATURES = [
    "granule_count",
    "granule_density",
    "glcm_contrast",
    "cytoplasm_hue",
    "cytoplasm_saturation",
    "lobes",
    "nucleus_fraction",
    "cell_area",
]


@dataclass
class GranuleParams:
    """Detection settings, in pixels of the crop being measured."""

    min_sigma: float = 1.0  # smallest granule LoG scale (radius ~ sigma * sqrt(2))
    max_sigma: float = 2.0  # largest granule scale
    num_sigma: int = 5
    threshold: float = 0.10  # LoG response threshold on the stain score (0..1 units)
    border_px: int = 2  # cytoplasm excludes this rim of the cell mask (dark outline)
    nucleus_margin_px: int = 3  # ... and this margin around the nucleus (blurred edge)
    # nucleus parts smaller than this share of the cell are dropped
    nucleus_min_fraction: float = 0.03
    core_fraction: float = 0.35  # lobe cores: distance to border > this x max distance
    glcm_levels: int = 32


@dataclass
class CellFeatures:
    """Measured features of one crop (NaN/0 where the cell is empty)."""

    granule_count: int
    granule_density: float  # granules per 100 px^2 of cytoplasm
    glcm_contrast: float  # GLCM contrast of the cytoplasm, distance 1, mean of 4 angles
    cytoplasm_hue: float  # degrees in [0, 360), circular mean
    cytoplasm_saturation: float  # mean HSV saturation in [0, 1]
    lobes: int  # nucleus lobe count (0: no nucleus found)
    nucleus_fraction: float  # nucleus area / cell area
    cell_area: int  # px
    cytoplasm_area: int  # px


@dataclass
class CellMeasurement:
    """Features plus the masks and blobs they came from (for figures and tests)."""

    features: CellFeatures
    nucleus: np.ndarray  # (H, W) bool
    cytoplasm: np.ndarray  # (H, W) bool
    blobs: np.ndarray  # (k, 3): row, col, sigma of each granule


def to_float_rgb(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 or float image -> float64 in [0, 1]."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float64) / 255.0
    return np.clip(img.astype(np.float64), 0.0, 1.0)


def stain_score(img: np.ndarray) -> np.ndarray:
    """How stained each pixel is: 1 - luminance, (H, W) in [0, 1].

    Nuclei and granules (dark purple) score high, pale cytoplasm low.
    """
    from skimage.color import rgb2gray

    return 1.0 - rgb2gray(to_float_rgb(img))


def mask_from_background(
    img: np.ndarray, background: float | tuple[float, float, float], tol: float = 0.08
) -> np.ndarray:
    """Cell mask of a crop whose background was filled with a constant colour.

    Parameters
    ----------
    img : (H, W, 3) image.
    background : the fill value, in the image's [0, 1] scale (a grey level or RGB).
    tol : max per-channel distance from the background still counted as background.
    """
    from scipy import ndimage as ndi

    f = to_float_rgb(img)
    bg = np.broadcast_to(np.asarray(background, dtype=np.float64), (3,))
    m = np.abs(f - bg).max(-1) > tol
    m = ndi.binary_opening(m, iterations=1)
    lab, n = ndi.label(m)
    if n > 1:  # keep the largest part
        sizes = ndi.sum(m, lab, range(1, n + 1))
        m = lab == (1 + int(np.argmax(sizes)))
    return ndi.binary_fill_holes(m)


def segment_nucleus(
    img: np.ndarray, cell_mask: np.ndarray, min_fraction: float = 0.03
) -> np.ndarray:
    """Nucleus mask: Otsu threshold of the stain score inside the cell.

    Parameters
    ----------
    img : (H, W, 3) crop.
    cell_mask : (H, W) bool.
    min_fraction : connected parts smaller than this share of the cell area
        are dropped (granules, noise).

    Returns
    -------
    (H, W) bool, empty when the cell has no contrast.
    """
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_objects

    cell = np.asarray(cell_mask, dtype=bool)
    if cell.sum() < 10:
        return np.zeros_like(cell)
    # light smoothing so granules (a few px) do not survive the threshold
    s = gaussian(stain_score(img), sigma=1.0)
    vals = s[cell]
    if np.ptp(vals) < 0.05:
        return np.zeros_like(cell)
    nuc = (s > threshold_otsu(vals)) & cell
    nuc = ndi.binary_opening(nuc, iterations=1)
    nuc = remove_small_objects(nuc, max_size=max(1, int(min_fraction * cell.sum())))
    return ndi.binary_fill_holes(nuc) & cell


def count_lobes(nucleus: np.ndarray, core_fraction: float = 0.35, min_core_px: int = 2) -> int:
    """Nucleus lobe count from the cores of its distance transform.

    A lobe is a connected region of pixels whose distance to the nucleus
    border exceeds ``core_fraction`` times the largest such distance of the
    nucleus; thin filaments between lobes fall below the threshold and split
    them, a round, kidney or band nucleus keeps one core.

    Parameters
    ----------
    nucleus : (H, W) bool mask.
    core_fraction : share of the maximum half-width that defines a core.
    min_core_px : cores smaller than this are ignored.
    """
    from scipy import ndimage as ndi

    nuc = np.asarray(nucleus, dtype=bool)
    if not nuc.any():
        return 0
    dt = ndi.distance_transform_edt(np.pad(nuc, 1))[1:-1, 1:-1]
    core = dt > core_fraction * dt.max()
    lab, n = ndi.label(core)
    if n == 0:
        return 1
    sizes = ndi.sum(core, lab, range(1, n + 1))
    return max(1, int((sizes >= min_core_px).sum()))


def detect_granules(
    img: np.ndarray,
    cytoplasm: np.ndarray,
    min_sigma: float = 1.0,
    max_sigma: float = 2.0,
    num_sigma: int = 5,
    threshold: float = 0.10,
) -> np.ndarray:
    """Granule-like blobs (LoG) of the stain score inside the cytoplasm.

    Pixels outside the cytoplasm are set to the cytoplasm's median score, so
    the nucleus border and the cell outline do not respond.

    Returns
    -------
    (k, 3) float: row, col, sigma of each blob whose centre lies in the cytoplasm.
    """
    from skimage.feature import blob_log

    cyto = np.asarray(cytoplasm, dtype=bool)
    if cyto.sum() < 4:
        return np.zeros((0, 3))
    s = stain_score(img)
    flat = np.where(cyto, s, np.median(s[cyto]))
    blobs = blob_log(
        flat,
        min_sigma=min_sigma,
        max_sigma=max_sigma,
        num_sigma=num_sigma,
        threshold=threshold,
        exclude_border=False,
    )
    if len(blobs) == 0:
        return np.zeros((0, 3))
    r = blobs[:, 0].astype(int)
    c = blobs[:, 1].astype(int)
    return blobs[cyto[r, c]]


def glcm_contrast(img: np.ndarray, region: np.ndarray, levels: int = 32) -> float:
    """GLCM contrast of the grey levels inside ``region`` (distance 1, 4 angles).

    Level 0 is reserved for pixels outside the region, and pairs touching it
    are dropped, so the region outline adds no contrast. NaN for < 4 px.
    """
    from skimage.color import rgb2gray
    from skimage.feature import graycomatrix

    reg = np.asarray(region, dtype=bool)
    if reg.sum() < 4:
        return float("nan")
    g = rgb2gray(to_float_rgb(img))
    q = np.zeros(g.shape, dtype=np.uint8)
    q[reg] = 1 + np.clip((g[reg] * (levels - 1)).astype(int), 0, levels - 2)
    P = graycomatrix(q, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=levels)
    P = P.astype(np.float64)
    P[0, :] = 0
    P[:, 0] = 0
    tot = P.sum((0, 1))[0]  # (4,) pairs per angle
    if not (tot > 0).any():
        return float("nan")
    i, j = np.ogrid[:levels, :levels]
    w = ((i - j) ** 2)[..., None]  # (L, L, 1)
    per_angle = (P[:, :, 0, :] * w).sum((0, 1))[tot > 0] / tot[tot > 0]
    return float(per_angle.mean())


def cytoplasm_colour(img: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """Circular mean hue (degrees) and mean saturation of ``region``."""
    from skimage.color import rgb2hsv

    reg = np.asarray(region, dtype=bool)
    if not reg.any():
        return float("nan"), float("nan")
    hsv = rgb2hsv(to_float_rgb(img))
    ang = hsv[..., 0][reg] * 2 * np.pi
    hue = np.degrees(np.arctan2(np.sin(ang).mean(), np.cos(ang).mean())) % 360.0
    return float(hue), float(hsv[..., 1][reg].mean())


def measure_cell(
    img: np.ndarray, cell_mask: np.ndarray, params: GranuleParams | None = None
) -> CellMeasurement:
    """All features of one crop.

    Parameters
    ----------
    img : (H, W, 3) uint8 or float [0, 1] RGB crop.
    cell_mask : (H, W) bool, True inside the cell.
    params : detection settings (pixels of this crop).
    """
    from scipy import ndimage as ndi

    p = params or GranuleParams()
    cell = np.asarray(cell_mask, dtype=bool)
    if cell.shape != np.asarray(img).shape[:2]:
        raise ValueError(f"cell_mask shape {cell.shape} does not match image {np.shape(img)}")
    nuc = segment_nucleus(img, cell, p.nucleus_min_fraction)
    cyto = cell & ~ndi.binary_dilation(nuc, iterations=max(1, p.nucleus_margin_px))
    if p.border_px > 0:
        cyto &= ndi.binary_erosion(cell, iterations=p.border_px)
    blobs = detect_granules(img, cyto, p.min_sigma, p.max_sigma, p.num_sigma, p.threshold)
    area = int(cyto.sum())
    hue, sat = cytoplasm_colour(img, cyto)
    feats = CellFeatures(
        granule_count=len(blobs),
        granule_density=float(100.0 * len(blobs) / area) if area else float("nan"),
        glcm_contrast=glcm_contrast(img, cyto, p.glcm_levels),
        cytoplasm_hue=hue,
        cytoplasm_saturation=sat,
        lobes=count_lobes(nuc, p.core_fraction),
        nucleus_fraction=float(nuc.sum() / cell.sum()) if cell.any() else float("nan"),
        cell_area=int(cell.sum()),
        cytoplasm_area=area,
    )
    return CellMeasurement(features=feats, nucleus=nuc, cytoplasm=cyto, blobs=blobs)


def measure_batch(images: np.ndarray, masks: np.ndarray, params: GranuleParams | None = None):
    """Features of many crops as a pandas DataFrame (one row per crop).

    Parameters
    ----------
    images : (n, H, W, 3) uint8 or float [0, 1].
    masks : (n, H, W) bool cell masks.
    """
    import pandas as pd

    images = np.asarray(images)
    masks = np.asarray(masks, dtype=bool)
    if images.ndim != 4 or masks.shape != images.shape[:3]:
        raise ValueError(
            f"measure_batch: images (n, H, W, 3) and masks (n, H, W) expected, got "
            f"{images.shape} and {masks.shape}"
        )
    rows = [asdict(measure_cell(images[i], masks[i], params).features) for i in range(len(images))]
    return pd.DataFrame(rows)
