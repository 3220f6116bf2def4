"""Granule and nucleus quantification on single-cell crops (scikit-image).

Works the same on real crops and on images decoded by the VAE, so the two
can be compared. For one RGB crop and its cell mask:

1. nucleus: Otsu threshold of a nucleus stain (optical density ``G - 1.5 B``)
   inside the cell after a grey opening that removes granules; specks dropped,
   holes filled (:func:`segment_nucleus`);
   touching lobes are cut apart where a pale valley of the stain between two of its
   peaks meets a pinch of the outline (:func:`cut_lobe_valleys`);
2. lobes: watershed basins of the nucleus distance transform, split where the
   neck between two is narrower than ``neck_ratio`` x their half-width
   (:func:`split_lobes`);
3. cytoplasm = cell mask minus a rim at the cell outline and a margin around
   the nucleus (for colour and texture);
4. granules: peaks of the white top-hat of a density that cancels the cell's
   own nucleus colour, over the whole cell (nucleus included) minus the rim;
   touching granules with their own peaks count apart, lines and chromatin
   texture do not count (:func:`detect_granules`); count and density per
   100 px^2 of the searched area;
5. texture: GLCM contrast of the cytoplasm grey levels, and the cytoplasm's grain (root
   mean square of the stain's fine detail, :func:`detail_rms`): how granular the cell
   looks where granules are too small or too dense to count (real smears at 64 px:
   docs/vae.md, "Granularity on real crops");
6. colour: circular mean hue (degrees, 90-450: red is 360) and mean saturation of the cytoplasm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# touching lobes (:func:`cut_lobe_valleys`; docs/vae.md, "Lobes on real crops"): the
# valley's depth as a share of the lower peak's height above the nucleus edge, the pinch
# of the outline (neck / half-width: the "narrowest part under half the widest" rule of a
# segmented nucleus), the smallest part as a share of the nucleus, the peaks' height (OD)
LOBE_VALLEY_RATIO = 0.2
LOBE_PINCH_RATIO = 0.5
LOBE_MIN_FRACTION = 0.1
LOBE_PEAK_H = 0.02
# a second cut rule for pale, touching lobes (off unless asked for: it splits the
# simulator's bands): a valley at least this deep where the outline narrows this much
LOBE_DEEP_PINCH_RATIO = 0.9

# degrees where the cytoplasm hue circle is cut open: yellow-green, a colour no stained
# cytoplasm takes (2 % of the real chain's crops lie in 60-150 degrees)
HUE_ORIGIN_DEG = 90.0

FEATURES = [
    "granule_count",
    "granule_density",
    "glcm_contrast",
    "cytoplasm_grain",
    "cytoplasm_hue",
    "cytoplasm_saturation",
    "lobes",
    "nucleus_fraction",
    "cell_area",
]


@dataclass
class GranuleParams:
    """Detection settings, in pixels of the crop being measured (tuned on 64 px crops)."""

    # granules: local maxima of the granule contrast (see :func:`granule_contrast`)
    radius_px: float = 2.0  # structures narrower than a disc of this radius read as granules
    threshold: float = 0.25  # granule contrast (optical density above its surround)
    smooth_sigma: float = 0.7  # px, Gaussian matched to a granule before peak finding
    min_distance_px: int = 1  # peaks closer than this merge (1: touching granules split)
    nucleus_noise_k: float = 2.0  # over the nucleus: also this many robust sd above its texture
    min_roundness: float = 0.4  # smaller / larger curvature at a granule peak (lines are not)
    border_px: int = 2  # the cell's outermost rim is not searched (blurred outline)
    # cytoplasm (colour, texture, density reference) = cell minus the rim and this margin
    nucleus_margin_px: int = 3
    # nucleus: Otsu threshold of the nucleus stain (see :func:`nucleus_stain`)
    nucleus_min_fraction: float = 0.03  # parts smaller than this share of the cell are dropped
    # touching lobes (:func:`cut_lobe_valleys`): two stain peaks are cut apart when the
    # valley between them falls this share of the way from the lower peak to the nucleus
    # edge level, where the outline pinches (neck <= pinch_ratio x half-width), and each
    # part holds lobe_min_fraction of the nucleus; valley_ratio None: no cuts
    valley_ratio: float | None = LOBE_VALLEY_RATIO
    pinch_ratio: float = LOBE_PINCH_RATIO
    lobe_min_fraction: float = LOBE_MIN_FRACTION
    # a second rule (None: off): a valley this deep where the outline narrows to
    # lobe_deep_pinch_ratio x half-width also cuts (pale touching lobes of real smears)
    lobe_deep_valley_ratio: float | None = None
    lobe_deep_pinch_ratio: float = LOBE_DEEP_PINCH_RATIO
    # lobes: basins of the nucleus distance transform joined by a neck narrower than this
    # share of the smaller basin's half-width count as separate lobes
    neck_ratio: float = 0.3
    min_lobe_radius_px: float = 1.5  # basins thinner than this are not lobes
    glcm_levels: int = 32


@dataclass
class CellFeatures:
    """Measured features of one crop (NaN/0 where the cell is empty)."""

    granule_count: int
    granule_density: float  # granules per 100 px^2 of the searched area (cell minus its rim)
    glcm_contrast: float  # GLCM contrast of the cytoplasm, distance 1, mean of 4 angles
    cytoplasm_grain: float  # RMS fine detail of the stain over the cytoplasm (OD; NaN < 10 px)
    cytoplasm_hue: float  # degrees in [90, 450): red is 360 (HUE_ORIGIN_DEG); circular mean
    cytoplasm_saturation: float  # mean HSV saturation in [0, 1]
    lobes: int  # nucleus lobe count (0: no nucleus found)
    nucleus_fraction: float  # nucleus area / cell area
    cell_area: int  # px
    cytoplasm_area: int  # px
    searched_area: int  # px searched for granules: the cell minus its outer rim


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


# optical-density weights (R, G, B) of the nucleus stain: Romanowsky nuclei absorb green
# and pass blue; blue (basophilic) cytoplasm absorbs mostly red, pink cytoplasm and
# eosinophil granules absorb blue too, so green minus 1.5 x blue separates the nucleus from
# both (chosen on simulated and segmentation_wbc crops against their true nucleus masks;
# docs/vae.md, "Measuring instruments")
NUCLEUS_OD_WEIGHTS = (0.0, 1.0, -1.5)


def optical_density(img: np.ndarray) -> np.ndarray:
    """Optical density -log(I) per channel, (H, W, 3) >= 0 (white = 0; black capped at 5.5)."""
    return -np.log(np.clip(to_float_rgb(img), 1.0 / 255.0, 1.0))


def _fill_outside(x: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``x`` with the pixels outside ``region`` set to the region's median (no edge response)."""
    return np.where(region, x, np.median(x[region]))


def nucleus_stain(
    img: np.ndarray,
    cell_mask: np.ndarray,
    od_weights: tuple[float, float, float] = NUCLEUS_OD_WEIGHTS,
    granule_radius_px: float = 2.0,
    smooth_sigma: float = 1.0,
) -> np.ndarray:
    """How much nucleus stain each pixel holds, with granules taken out, (H, W).

    The optical density weighted by ``od_weights`` (a blue-passing stain axis), a grey
    opening with a disc of ``granule_radius_px`` (granules narrower than the disc are
    removed; a nucleus, even a thin band, is wider) and a Gaussian of ``smooth_sigma``.
    Pixels outside ``cell_mask`` hold the cell's median.
    """
    from skimage.filters import gaussian
    from skimage.morphology import disk, opening

    cell = np.asarray(cell_mask, dtype=bool)
    s = optical_density(img) @ np.asarray(od_weights, dtype=np.float64)
    s = _fill_outside(s, cell)
    if granule_radius_px > 0:
        s = opening(s, disk(max(1, int(round(granule_radius_px)))))
    return gaussian(s, smooth_sigma) if smooth_sigma > 0 else s


def segment_nucleus(
    img: np.ndarray,
    cell_mask: np.ndarray,
    min_fraction: float = 0.03,
    od_weights: tuple[float, float, float] = NUCLEUS_OD_WEIGHTS,
    granule_radius_px: float = 2.0,
    valley_ratio: float | None = LOBE_VALLEY_RATIO,
    pinch_ratio: float = LOBE_PINCH_RATIO,
    lobe_min_fraction: float = LOBE_MIN_FRACTION,
    deep_valley_ratio: float | None = None,
    deep_pinch_ratio: float = LOBE_DEEP_PINCH_RATIO,
) -> np.ndarray:
    """Nucleus mask: Otsu threshold of :func:`nucleus_stain` inside the cell.

    Parameters
    ----------
    img : (H, W, 3) crop.
    cell_mask : (H, W) bool.
    min_fraction : connected parts smaller than this share of the cell area (and than
        a quarter of the largest part) are dropped (noise, granule clusters).
    od_weights : (3,) optical-density weights of the nucleus stain.
    granule_radius_px : granules narrower than this disc are opened away first.
    valley_ratio, pinch_ratio, lobe_min_fraction, deep_valley_ratio, deep_pinch_ratio :
        touching lobes are cut apart (:func:`cut_lobe_valleys`); ``valley_ratio`` None
        leaves the mask whole.

    Returns
    -------
    (H, W) bool, empty when the cell has no contrast.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    cell = np.asarray(cell_mask, dtype=bool)
    if cell.sum() < 10:
        return np.zeros_like(cell)
    s = nucleus_stain(img, cell, od_weights, granule_radius_px)
    vals = s[cell]
    if np.ptp(vals) < 0.05:
        return np.zeros_like(cell)
    edge = threshold_otsu(vals)
    nuc = (s > edge) & cell
    nuc = ndi.binary_opening(nuc, iterations=1)
    lab, n = ndi.label(nuc)
    if n == 0:
        return nuc
    # small parts go, but not the separate lobes of a segmented nucleus: a part is kept
    # when it holds min_fraction of the cell or a quarter of the largest part
    largest = float(np.max(ndi.sum(nuc, lab, range(1, n + 1))))
    small = min(min_fraction * cell.sum(), 0.25 * largest)
    nuc = remove_small_objects(nuc, max_size=max(1, int(small)))
    nuc = ndi.binary_fill_holes(nuc) & cell
    if valley_ratio is None:
        return nuc
    return cut_lobe_valleys(
        s,
        nuc,
        edge,
        valley_ratio,
        pinch_ratio,
        lobe_min_fraction,
        deep_valley_ratio=deep_valley_ratio,
        deep_pinch_ratio=deep_pinch_ratio,
    )


# the two 4-neighbour pixel pairings of an image: (left, right) and (top, bottom)
_NEIGHBOUR_PAIRS = ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1, :], np.s_[1:, :]))


def _border_max(labels: np.ndarray, *fields: np.ndarray) -> list[dict[tuple[int, int], float]]:
    """Per pair of touching labels, the largest ``min(field)`` over their shared border.

    For every pair of 4-neighbour pixels in different labels (> 0) the smaller of the
    two field values; per label pair (i < j) the largest of those: the neck of the
    distance transform, or the saddle of a stain, between two basins.
    """
    out: list[dict[tuple[int, int], float]] = [{} for _ in fields]
    for a_sl, b_sl in _NEIGHBOUR_PAIRS:
        a, b = labels[a_sl], labels[b_sl]
        sel = (a != b) & (a > 0) & (b > 0)
        lo, hi = np.minimum(a[sel], b[sel]), np.maximum(a[sel], b[sel])
        for f, d in zip(fields, out):
            for i, j, v in zip(lo, hi, np.minimum(f[a_sl], f[b_sl])[sel]):
                key = (int(i), int(j))
                if v > d.get(key, -np.inf):
                    d[key] = float(v)
    return out


def _find(parent: list[int], i: int) -> int:
    """Root of ``i`` in the union-find forest ``parent`` (path halving) of a merge tree."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def cut_lobe_valleys(
    stain: np.ndarray,
    nucleus: np.ndarray,
    edge_level: float,
    valley_ratio: float = LOBE_VALLEY_RATIO,
    pinch_ratio: float = LOBE_PINCH_RATIO,
    min_fraction: float = LOBE_MIN_FRACTION,
    peak_h: float = LOBE_PEAK_H,
    deep_valley_ratio: float | None = None,
    deep_pinch_ratio: float = LOBE_DEEP_PINCH_RATIO,
) -> np.ndarray:
    """The nucleus mask with touching lobes cut apart along the pale valleys between them.

    On a real smear a segmented neutrophil's lobes often touch or overlap, so its mask
    is one blob with wide necks that :func:`split_lobes` (outline only) reads as one
    lobe (68 % of labelled real neutrophil crops, docs/vae.md, "Lobes on real crops").
    Between two touching lobes the stain still dips. So: the stain's peaks (h-maxima of
    height ``peak_h``) seed a watershed of the stain inside the mask, and two basins
    are merged (a merge tree from the highest saddle down) unless all three hold:

    * **valley**: the saddle between them lies below the lower peak by at least
      ``valley_ratio`` x (that peak - ``edge_level``), the stain's own depth;
    * **pinch**: the outline narrows there: the widest distance-transform value on
      their border is <= ``pinch_ratio`` x the smaller basin's half-width (chromatin
      clumps inside a round lymphocyte nucleus dip too, but the outline does not pinch);
    * **size**: each holds >= ``min_fraction`` of the nucleus area.

    With ``deep_valley_ratio`` set, a second rule replaces the first two where it holds:
    a valley of at least ``deep_valley_ratio`` of the depth where the outline narrows
    to <= ``deep_pinch_ratio`` x the half-width. Pale real nuclei (BCCD) touch through
    wide bridges that only this rule cuts; it also cuts a band's bends, so the
    simulator's lobe counts leave it off (docs/vae.md, "Lobe targets on real crops").

    Both sides of a kept border leave the mask (a cut 2 px wide, no diagonal contact),
    so :func:`split_lobes` finds the parts as separate lobes.

    Parameters
    ----------
    stain : (H, W) float nucleus stain (:func:`nucleus_stain`), optical density.
    nucleus : (H, W) bool nucleus mask.
    edge_level : the stain level of the nucleus outline (its Otsu threshold).

    Returns
    -------
    (H, W) bool, a subset of ``nucleus``.
    """
    from scipy import ndimage as ndi
    from skimage.measure import label
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    nuc = np.asarray(nucleus, dtype=bool)
    if nuc.sum() < 10:
        return nuc
    s = np.where(nuc, stain, stain[nuc].min())
    markers = label(h_maxima(s, peak_h) & nuc, connectivity=2)
    if markers.max() <= 1:
        return nuc
    basins = watershed(-s, markers, mask=nuc, connectivity=1)
    n = int(basins.max())
    idx = range(1, n + 1)
    dt = ndi.distance_transform_edt(np.pad(nuc, 1))[1:-1, 1:-1]
    peak = np.concatenate([[0.0], np.asarray(ndi.maximum(s, basins, idx))])
    half = np.concatenate([[0.0], np.asarray(ndi.maximum(dt, basins, idx))])
    area = np.concatenate([[0.0], np.asarray(ndi.sum(nuc, basins, idx), float)])
    saddle, neck = _border_max(basins, s, dt)
    parent = list(range(n + 1))
    total = float(nuc.sum())
    for (i, j), v in sorted(saddle.items(), key=lambda kv: -kv[1]):
        ri, rj = _find(parent, i), _find(parent, j)
        if ri == rj:
            continue
        low = min(peak[ri], peak[rj])
        depth, thin = max(low - edge_level, 1e-6), min(half[ri], half[rj])
        split = low - v >= valley_ratio * depth and neck[(i, j)] <= pinch_ratio * thin
        if deep_valley_ratio is not None and not split:
            split = low - v >= deep_valley_ratio * depth and neck[(i, j)] <= deep_pinch_ratio * thin
        big = min(area[ri], area[rj]) >= min_fraction * total
        if not (split and big):
            parent[rj] = ri
            peak[ri], half[ri] = max(peak[ri], peak[rj]), max(half[ri], half[rj])
            area[ri] += area[rj]
    lobes = np.array([_find(parent, i) for i in range(n + 1)])[basins]
    cut = np.zeros_like(nuc)
    for a_sl, b_sl in _NEIGHBOUR_PAIRS:
        a, b = lobes[a_sl], lobes[b_sl]
        border = (a != b) & (a > 0) & (b > 0)
        cut[a_sl] |= border
        cut[b_sl] |= border
    return nuc & ~cut


def split_lobes(
    nucleus: np.ndarray, neck_ratio: float = 0.3, min_radius_px: float = 1.5
) -> np.ndarray:
    """Label the lobes of a nucleus mask: watershed of its distance transform, necks split.

    Every regional maximum of the distance transform (the nucleus half-width) seeds a
    basin; two touching basins are one lobe unless the widest point of their shared
    border (the neck, in half-width) is narrower than ``neck_ratio`` x the half-width
    of the thinner of the two. Merging goes from the widest neck down (a merge tree),
    so a band's even ridge stays one lobe and a filament or a pinch splits lobes.

    Parameters
    ----------
    nucleus : (H, W) bool mask.
    neck_ratio : neck / half-width below which two basins are separate lobes, in (0, 1).
    min_radius_px : basins whose half-width stays below this (specks, filaments) are
        not lobes; they join their widest neighbour.

    Returns
    -------
    (H, W) int: 0 outside, 1..L one label per lobe.
    """
    from scipy import ndimage as ndi
    from skimage.measure import label
    from skimage.morphology import local_maxima
    from skimage.segmentation import watershed

    nuc = np.asarray(nucleus, dtype=bool)
    if not nuc.any():
        return np.zeros(nuc.shape, dtype=int)
    dt = ndi.distance_transform_edt(np.pad(nuc, 1))[1:-1, 1:-1]
    markers = label(local_maxima(dt, connectivity=2) & nuc, connectivity=2)
    basins = watershed(-dt, markers, mask=nuc, connectivity=1)
    n = int(basins.max())
    if n <= 1:
        return basins
    peak = np.asarray(ndi.maximum(dt, basins, range(1, n + 1)))  # half-width per basin
    # the neck of two basins: the widest half-width along their shared border
    (necks,) = _border_max(basins, dt)
    parent = list(range(n + 1))
    top = np.concatenate([[0.0], peak])  # widest half-width of each merged set
    for (i, j), v in sorted(necks.items(), key=lambda kv: -kv[1]):
        ri, rj = _find(parent, i), _find(parent, j)
        if ri == rj:
            continue
        thin = min(top[ri], top[rj])
        if v >= neck_ratio * thin or thin < min_radius_px:
            parent[rj] = ri
            top[ri] = max(top[ri], top[rj])
    roots = np.array([_find(parent, i) for i in range(n + 1)])
    lab = roots[basins]
    lab[~nuc] = 0
    # renumber 1..L
    u = np.unique(lab[lab > 0])
    out = np.zeros_like(lab)
    for k, r in enumerate(u, 1):
        out[lab == r] = k
    return out


def count_lobes(nucleus: np.ndarray, neck_ratio: float = 0.3, min_radius_px: float = 1.5) -> int:
    """Nucleus lobe count (0: empty mask); see :func:`split_lobes`.

    Lobes whose half-width stays below ``min_radius_px`` (specks left by the
    segmentation) are not counted unless nothing else is left.
    """
    from scipy import ndimage as ndi

    lab = split_lobes(nucleus, neck_ratio, min_radius_px)
    n = int(lab.max())
    if n <= 1:
        return n
    dt = ndi.distance_transform_edt(np.pad(lab > 0, 1))[1:-1, 1:-1]
    width = np.asarray(ndi.maximum(dt, lab, range(1, n + 1)))
    return max(1, int((width >= min_radius_px).sum()))


def granule_channel(img: np.ndarray, nucleus: np.ndarray | None = None) -> np.ndarray:
    """Optical density along which granules stand out and the nucleus does not, (H, W).

    ``OD_G - k OD_R`` with ``k`` the cell's own nucleus green/red density ratio (median
    over ``nucleus``), so the nucleus, its chromatin clumps and the filaments between
    lobes read ~0 and a granule (magenta-purple: it passes red, absorbs green) adds its
    own density on top of cytoplasm and nucleus alike. Without a nucleus: ``OD_G``.
    """
    od = optical_density(img)
    nuc = None if nucleus is None else np.asarray(nucleus, dtype=bool)
    if nuc is None or nuc.sum() < 4:
        return od[..., 1]
    r = od[..., 0][nuc]
    k = float(np.median(od[..., 1][nuc]) / max(np.median(r), 1e-3))
    return od[..., 1] - np.clip(k, 0.0, 3.0) * od[..., 0]


def granule_contrast(
    img: np.ndarray, region: np.ndarray, nucleus: np.ndarray | None = None, radius_px: float = 2.0
) -> np.ndarray:
    """Granule contrast: white top-hat of :func:`granule_channel`, (H, W), >= 0.

    The channel minus its grey opening with a disc of ``radius_px``: what is narrower
    than the disc and denser than its surround (a granule), in optical density.
    Pixels outside ``region`` hold the region's median first, so its outline does not
    respond.
    """
    from skimage.morphology import disk, white_tophat

    reg = np.asarray(region, dtype=bool)
    s = _fill_outside(granule_channel(img, nucleus), reg)
    return white_tophat(s, disk(max(1, int(round(radius_px)))))


def detect_granules(
    img: np.ndarray,
    region: np.ndarray,
    nucleus: np.ndarray | None = None,
    radius_px: float = 2.0,
    threshold: float = 0.25,
    smooth_sigma: float = 0.7,
    min_distance_px: int = 1,
    nucleus_noise_k: float = 2.0,
    min_roundness: float = 0.4,
) -> np.ndarray:
    """Granules: local maxima of the smoothed :func:`granule_contrast` inside ``region``.

    Every local maximum above ``threshold`` (optical density) is one granule, so
    touching granules, each with its own peak, count separately; the Gaussian of
    ``smooth_sigma`` (matched to a granule) keeps pixel noise from splitting one.

    Parameters
    ----------
    img : (H, W, 3) crop.
    region : (H, W) bool where granules are searched (the cell, nucleus included).
    nucleus : (H, W) bool nucleus mask (sets the granule channel); None: green density.
    nucleus_noise_k : over the nucleus (and 1 px around it) a granule must also stand
        ``nucleus_noise_k`` robust sd (1.4826 MAD) above the median contrast there, so
        chromatin texture and colour fringes at the nuclear border, which the granule
        channel cancels only in part on real stains, do not count; granules on a pale,
        even nucleus (early cells) still do.
    min_roundness : a peak must curve down in every direction: the smaller Hessian
        eigenvalue of the contrast (Gaussian ``max(smooth_sigma, 1)``) at least this share of
        the larger one, so lines (the nuclear envelope, filaments between lobes, the
        outline) are not granules; 0 keeps every peak.

    Returns
    -------
    (k, 3) float: row, col, sigma (``radius_px`` / sqrt 2) of each granule.
    """
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian

    reg = np.asarray(region, dtype=bool)
    if reg.sum() < 4:
        return np.zeros((0, 3))
    c = granule_contrast(img, reg, nucleus, radius_px)
    if smooth_sigma > 0:
        c = gaussian(c, smooth_sigma)
    pk = peak_local_max(
        c,
        min_distance=max(1, int(min_distance_px)),
        threshold_abs=threshold,
        labels=reg.astype(np.int32),
        exclude_border=False,
    )
    if len(pk) > 1:  # a flat top (ties, e.g. uint8 input) gives adjacent peaks: one granule
        from scipy import ndimage as ndi

        on = np.zeros(c.shape, dtype=bool)
        on[pk[:, 0], pk[:, 1]] = True
        lab, n = ndi.label(on, structure=np.ones((3, 3)))
        if n < len(pk):
            cen = np.asarray(ndi.center_of_mass(on, lab, range(1, n + 1)))
            pk = np.rint(cen).astype(int)
    if len(pk) and min_roundness > 0:
        from skimage.feature import hessian_matrix, hessian_matrix_eigvals

        ev = hessian_matrix_eigvals(
            hessian_matrix(
                c, sigma=max(smooth_sigma, 1.0), order="rc", use_gaussian_derivatives=False
            )
        )  # (2, H, W), ev[0] >= ev[1]; a peak has both < 0
        e_big = -ev[1][pk[:, 0], pk[:, 1]]
        e_small = -ev[0][pk[:, 0], pk[:, 1]]
        pk = pk[(e_big > 0) & (e_small >= min_roundness * e_big)]
    nuc = None if nucleus is None else np.asarray(nucleus, dtype=bool)
    if len(pk) and nuc is not None and nuc.sum() >= 16 and nucleus_noise_k > 0:
        from scipy import ndimage as ndi

        v = c[nuc]
        med = float(np.median(v))
        floor = med + nucleus_noise_k * 1.4826 * float(np.median(np.abs(v - med)))
        near = ndi.binary_dilation(nuc, iterations=1)
        keep = ~near[pk[:, 0], pk[:, 1]] | (c[pk[:, 0], pk[:, 1]] >= floor)
        pk = pk[keep]
    if len(pk) == 0:
        return np.zeros((0, 3))
    return np.column_stack([pk.astype(np.float64), np.full(len(pk), radius_px / np.sqrt(2))])


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
    """Circular mean hue (degrees, in [``HUE_ORIGIN_DEG``, + 360)) and mean saturation.

    The hue circle is cut open at ``HUE_ORIGIN_DEG`` rather than at red: stained
    cytoplasm runs blue (~220) - purple - pink - red (360) - orange (~390), across
    red, so with the cut at 0 a pink and a red cell (350 vs 5) would read as the two
    ends of the scale and every correlation with the hue would break there.
    """
    from skimage.color import rgb2hsv

    reg = np.asarray(region, dtype=bool)
    if not reg.any():
        return float("nan"), float("nan")
    hsv = rgb2hsv(to_float_rgb(img))
    ang = hsv[..., 0][reg] * 2 * np.pi
    hue = np.degrees(np.arctan2(np.sin(ang).mean(), np.cos(ang).mean()))
    hue = (hue - HUE_ORIGIN_DEG) % 360.0 + HUE_ORIGIN_DEG
    return float(hue), float(hsv[..., 1][reg].mean())


def cell_nucleus(
    img: np.ndarray, cell_mask: np.ndarray, params: GranuleParams | None = None
) -> np.ndarray:
    """The nucleus mask :func:`measure_cell` counts lobes on, (H, W) bool.

    :func:`segment_nucleus` with the settings of ``params``; one owner, so the
    nucleus layer of the VAE (``vae.data.nucleus_masks``) trains on the very
    nucleus the lobe counter reads.
    """
    p = params or GranuleParams()
    return segment_nucleus(
        img,
        np.asarray(cell_mask, dtype=bool),
        p.nucleus_min_fraction,
        granule_radius_px=p.radius_px,
        valley_ratio=p.valley_ratio,
        pinch_ratio=p.pinch_ratio,
        lobe_min_fraction=p.lobe_min_fraction,
        deep_valley_ratio=p.lobe_deep_valley_ratio,
        deep_pinch_ratio=p.lobe_deep_pinch_ratio,
    )


def measure_cell(
    img: np.ndarray,
    cell_mask: np.ndarray,
    params: GranuleParams | None = None,
    grain: bool = True,
) -> CellMeasurement:
    """All features of one crop.

    Parameters
    ----------
    img : (H, W, 3) uint8 or float [0, 1] RGB crop.
    cell_mask : (H, W) bool, True inside the cell.
    params : detection settings (pixels of this crop).
    grain : False skips :attr:`CellFeatures.cytoplasm_grain` (NaN; a torch pass, ~2-5 ms
        a crop) for callers that read only the blobs and the nucleus (the VAE's crop
        targets, ``stage=pair``'s granule centres).
    """
    from scipy import ndimage as ndi

    p = params or GranuleParams()
    cell = np.asarray(cell_mask, dtype=bool)
    if cell.shape != np.asarray(img).shape[:2]:
        raise ValueError(f"cell_mask shape {cell.shape} does not match image {np.shape(img)}")
    nuc = cell_nucleus(img, cell, p)
    inner = ndi.binary_erosion(cell, iterations=p.border_px) if p.border_px > 0 else cell
    # granules are searched over the whole cell, nucleus included (the granule channel
    # cancels the nucleus stain); colour and texture are read on the cytoplasm only
    cyto = inner & ~ndi.binary_dilation(nuc, iterations=max(1, p.nucleus_margin_px))
    blobs = detect_granules(
        img,
        inner,
        nuc,
        p.radius_px,
        p.threshold,
        p.smooth_sigma,
        p.min_distance_px,
        p.nucleus_noise_k,
        p.min_roundness,
    )
    searched = int(inner.sum())
    hue, sat = cytoplasm_colour(img, cyto)
    feats = CellFeatures(
        granule_count=len(blobs),
        granule_density=float(100.0 * len(blobs) / searched) if searched else float("nan"),
        glcm_contrast=glcm_contrast(img, cyto, p.glcm_levels),
        cytoplasm_grain=float(detail_rms(img, cell, nuc, [cyto])[0]) if grain else float("nan"),
        cytoplasm_hue=hue,
        cytoplasm_saturation=sat,
        lobes=count_lobes(nuc, p.neck_ratio, p.min_lobe_radius_px),
        nucleus_fraction=float(nuc.sum() / cell.sum()) if cell.any() else float("nan"),
        cell_area=int(cell.sum()),
        cytoplasm_area=int(cyto.sum()),
        searched_area=searched,
    )
    return CellMeasurement(features=feats, nucleus=nuc, cytoplasm=cyto, blobs=blobs)


def detail_rms(
    img: np.ndarray, cell_mask: np.ndarray, nucleus: np.ndarray, parts: list[np.ndarray]
) -> np.ndarray:
    """Root-mean-square fine detail of the stain over each of ``parts``, (len(parts),).

    The detail is what the texture layer of the VAE learns
    (:func:`vae.losses.texture_detail`: optical density minus its local mean at 1.5 px,
    the nucleus and the cytoplasm averaged apart so the nuclear outline does not leak in;
    three channels, their squares summed). NaN for a part under 10 px.

    Parameters
    ----------
    img : (H, W, 3) uint8 or float [0, 1] RGB crop.
    cell_mask, nucleus : (H, W) bool.
    parts : (H, W) bool masks to average over (e.g. the cytoplasm of :func:`measure_cell`).
    """
    energy = _detail(img, cell_mask, nucleus)[0].pow(2).sum(1)[0].numpy()  # (H, W)
    out = np.full(len(parts), np.nan)
    for j, part in enumerate(parts):
        part = np.asarray(part, dtype=bool)
        if part.sum() >= 10:
            out[j] = float(np.sqrt(energy[part].mean()))
    return out


def _detail(img: np.ndarray, cell_mask: np.ndarray, nucleus: np.ndarray):
    """The texture layer's detail of one crop (:func:`vae.losses.texture_detail`) and its
    cell mask, torch (1, 3, H, W) and (1, 1, H, W)."""
    import torch

    from vae.losses import texture_detail

    cell = np.asarray(cell_mask, dtype=bool)
    x = torch.from_numpy(to_float_rgb(img).astype(np.float32)).permute(2, 0, 1)[None]
    m = torch.from_numpy(cell.astype(np.float32))[None, None]
    n = torch.from_numpy((np.asarray(nucleus, dtype=bool) & cell).astype(np.float32))[None, None]
    return texture_detail(x, m, n), m


def _segmented(images: np.ndarray, masks: np.ndarray, params: GranuleParams | None):
    """``(i, image, mask, CellMeasurement)`` of each crop, its parts as
    :func:`measure_cell` segments them (the grain itself not read)."""
    images = np.asarray(images)
    masks = np.asarray(masks, dtype=bool)
    for i in range(len(images)):
        yield i, images[i], masks[i], measure_cell(images[i], masks[i], params, grain=False)


def stain_grain(
    images: np.ndarray, masks: np.ndarray, params: GranuleParams | None = None
) -> np.ndarray:
    """Root-mean-square fine detail of the stain per crop, (n, 2): cytoplasm, nucleus.

    :func:`detail_rms` over each crop's own cytoplasm and nucleus as :func:`measure_cell`
    segments them (the nucleus shrunk by 1 px, so its outline, an edge rather than grain,
    is left out; the cytoplasm column is :attr:`CellFeatures.cytoplasm_grain`). How
    granular a cell looks: eosinophil and basophil granules, chromatin clumps; a smooth
    decoded cell reads near 0. NaN where a part has under 10 px.

    Parameters
    ----------
    images : (n, H, W, 3) uint8 or float [0, 1]
    masks : (n, H, W) bool cell masks
    """
    from scipy import ndimage as ndi

    out = np.full((len(images), 2), np.nan)
    for i, img, cell, mc in _segmented(images, masks, params):  # both parts at once below
        inner_nuc = ndi.binary_erosion(mc.nucleus, iterations=1)
        out[i] = detail_rms(img, cell, mc.nucleus, [mc.cytoplasm, inner_nuc])
    return out


def grain_coarse_share(
    images: np.ndarray, masks: np.ndarray, params: GranuleParams | None = None
) -> np.ndarray:
    """How much of each crop's cytoplasm detail lies in the coarse band, (n,) in [0, 1].

    The root-mean-square of the coarse band of the stain's detail
    (:func:`vae.losses.texture_bands`: the detail's Gaussian average at
    ``TEXTURE_COARSE_SIGMA``, the split the two-band texture layer learns) over that of the
    whole detail, both over the cytoplasm as :func:`measure_cell` segments it. Blobs
    2-4 px across (coarse granules, the blotches of a smooth crop) read high, a 1 px
    grain low: what decides whether a drawn cell's grain looks like its crop's. NaN
    where the cytoplasm has under 10 px or no detail.

    Parameters
    ----------
    images : (n, H, W, 3) uint8 or float [0, 1]
    masks : (n, H, W) bool cell masks
    """
    from vae.losses import texture_bands

    out = np.full(len(images), np.nan)
    for i, img, cell, mc in _segmented(images, masks, params):
        if mc.cytoplasm.sum() < 10:
            continue
        detail, m = _detail(img, cell, mc.nucleus)
        whole = float(detail.pow(2).sum(1)[0].numpy()[mc.cytoplasm].mean())
        if whole > 0:
            coarse = texture_bands(detail, m)[1].pow(2).sum(1)[0].numpy()
            out[i] = float(np.sqrt(coarse[mc.cytoplasm].mean() / whole))
    return out


def grain_ratio(drawn: np.ndarray, inputs: np.ndarray, min_rows: int = 3) -> float:
    """Median over the rows of a drawing's grain over its input's (:func:`stain_grain`,
    one part): 1 drawn as granular as the crop, 2 twice as grainy.

    Rows where either is NaN (no such part to read) or the input has no grain at all
    (a ratio without meaning) are left out.

    Parameters
    ----------
    drawn, inputs : (n,) grain of the drawn cells and of their input crops
    min_rows : fewer usable rows give NaN

    Returns
    -------
    float, NaN under ``min_rows`` usable rows
    """
    drawn, inputs = np.asarray(drawn, float), np.asarray(inputs, float)
    ok = np.isfinite(drawn) & np.isfinite(inputs) & (inputs > 0)
    return float(np.median(drawn[ok] / inputs[ok])) if ok.sum() >= min_rows else float("nan")


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
