"""Magnification of a smear from the image itself.

The detector wants white cells of about ``cell_px`` px, so the most direct ruler
is the white cell itself: :func:`white_cell_sizes` finds white-cell nuclei by
their stain (the only dark *and* purple objects of a Romanowsky-stained smear),
grows each nucleus to its whole cell and measures the cell's diameter.
:func:`red_cell_diameter` (red cells: the most numerous objects, about 7.5 µm)
is the fallback for an image where no white cell is found. :func:`estimate_scale`
turns either into the detector's working scale (network px per source px).

Both rulers were calibrated on TXL-PBC *train* only (docs/segmentation_infer.md,
"Automatic magnification"): the constants below are medians of
(ground-truth white box side / measured size) there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# median over images of (median ground-truth white-cell box side / red_cell_diameter) on
# TXL-PBC *train* (1003 images with white cells: `scripts/eval_segmentation.py --scale-only
# --scale estimate --ruler red --wbc-per-rbc 1 ... --split train` -> median_ratio_to_oracle
# 2.2846; docs/segmentation_infer.md, "Automatic magnification"). White boxes of every type.
WBC_PER_RBC = 2.28
# median over images of (median ground-truth white-cell box side / white_cell_sizes) on
# TXL-PBC *train* (every 4th image, 250 with white cells: `scripts/eval_segmentation.py
# --scale-only --scale estimate --ruler white --white-box-per-diameter 1 --every 4 ...
# --split train` -> median_ratio_to_oracle 1.0386 with FOREGROUND_MIX 0.5; same doc section)
WHITE_BOX_PER_DIAMETER = 1.04
# images are measured at most this many px on their longer side (speed; sizes are
# returned in source px)
MEASURE_PX = 320
# a nucleus pixel is at least this much more purple ((R + B) / 2 - G, 0-255 units) than
# the median of the other cell pixels (red cells: ~15-35 on TXL-PBC, nuclei: ~50-90)
NUCLEUS_MARGIN = 20.0
# a white cell is larger than a red cell (~10-20 um vs ~7.5 um): a white ruler below this
# many red-cell diameters measured pieces (a basophil's dark granules taken as small
# nuclei: 24-36 px for a 137 px cell on TXL-PBC val), so ruler="auto" reads the red cells
# instead. On TXL-PBC train (every 4th image) the white / red ratio's 1 % quantile is
# 1.34: the bound flags none of them (docs/segmentation_infer.md, "Automatic magnification")
MIN_WHITE_PER_RED = 1.0
# The rulers were tuned on single fields of view (every shared smear image is at most
# 640 px on its longer side). An image longer than RULER_WHOLE_PX on a side (a whole-slide
# scan, stitched fields; a camera frame up to 2048 px is measured whole, as before) is
# measured on RULER_WINDOW_PX squares that cover it, overlapping by at least
# RULER_OVERLAP_PX (so a white cell cut by one window's inner edge is whole in the next,
# and the cut copy is left out), at most RULER_MAX_WINDOWS of them spread evenly, their
# measurements pooled. Measured whole, a 14000 px scan shrank its white cells to 2-3 px on
# the 320 px copy, and the red-cell watershed at full size held 22.8 GB (~100 bytes per
# pixel, 196 MP); 2048 px whole is ~0.4 GB.
RULER_WHOLE_PX = 2048
RULER_WINDOW_PX = 768
RULER_OVERLAP_PX = 192
RULER_MAX_WINDOWS = 48
# cell foreground threshold: Otsu of the green channel (0) ... the plasma's median (1).
# 0.5: pale cytoplasm (Raabin fields) counts as cell; on TXL-PBC train (every 4th image)
# within 15 % of the oracle 0.77 at 0, 0.83 at 0.5 (docs/segmentation_infer.md)
FOREGROUND_MIX = 0.5


@dataclass
class ScaleEstimate:
    """Result of :func:`estimate_scale` for one image.

    diameter_px : typical red-cell diameter in source px (NaN when not measured)
    n_cells : cells the estimate rests on (white cells for ``ruler="white"``,
        red cells for ``"red"``)
    scale : working px per source px (``fallback`` when nothing was measured)
    ok : whether the image gave an estimate
    ruler : ``white`` | ``red`` | ``none`` (fallback) | ``pooled`` (:func:`pool_scales`);
        ``red`` with a finite ``white_px``: the white ruler was implausible (smaller than
        ``MIN_WHITE_PER_RED`` red cells) and the red cells were read instead
    white_px : median white-cell diameter in source px (NaN when none was found)
    n_images : images the estimate rests on (1 unless pooled)
    group_scale : the median estimate of the image's microscope when the scale was
        held to it (:func:`hold_to_pool`), else NaN
    own_scale : the image's own estimate when it was held to ``group_scale``, else NaN
    """

    diameter_px: float
    n_cells: int
    scale: float
    ok: bool
    ruler: str = "red"
    white_px: float = float("nan")
    n_images: int = 1
    group_scale: float = float("nan")
    own_scale: float = float("nan")

    @property
    def white_implausible(self) -> bool:
        """The white ruler measured less than a red cell, so the red cells were read."""
        return self.ruler == "red" and bool(np.isfinite(self.white_px))


def pool_scales(estimates: list[ScaleEstimate]) -> ScaleEstimate | None:
    """The median of the estimates of images taken at one magnification.

    Parameters
    ----------
    estimates : per-image results of :func:`estimate_scale`; those that measured
        nothing (``ok`` False) are left out

    Returns
    -------
    ScaleEstimate with ``ruler="pooled"`` (scale: median working px per source px;
    ``white_px`` / ``diameter_px``: medians of the images that had that ruler;
    ``n_cells`` / ``n_images``: totals), or None when no estimate is ``ok``.
    """
    ok = [e for e in estimates if e.ok]
    if not ok:
        return None

    def med(v: list[float]) -> float:
        v = [x for x in v if np.isfinite(x)]
        return float(np.median(v)) if v else float("nan")

    return ScaleEstimate(
        diameter_px=med([e.diameter_px for e in ok]),
        n_cells=int(sum(e.n_cells for e in ok)),
        scale=float(np.median([e.scale for e in ok])),
        ok=True,
        ruler="pooled",
        white_px=med([e.white_px for e in ok]),
        n_images=int(sum(e.n_images for e in ok)),
    )


def hold_to_pool(est: ScaleEstimate, pooled: ScaleEstimate, spread: float) -> ScaleEstimate:
    """One image's estimate held within ``spread`` x of its microscope's median.

    Images from one microscope share their magnification; what still moves the scale
    the detector wants from one field to the next is the cells in it (its oracle is
    the median white box: a field of small lymphocytes wants a larger scale than one
    of monocytes). So the image keeps its own estimate, which follows its cells, as
    long as it lies within ``spread`` of the median of its microscope's images; an
    estimate further off is more likely a ruler failure (pale cytoplasm cut short, a
    bilobed nucleus measured as two cells, a field with one odd cell) and is held at
    that bound. ``spread=1`` gives every image the median. An image that measured
    nothing takes the median, and so does one whose white ruler was implausible
    (:attr:`ScaleEstimate.white_implausible`: its red-cell estimate counts in the median,
    which in a folder of one microscope rests on the other images too). (docs/segmentation_infer.md, "One magnification per
    microscope": TXL-PBC val box AP50 0.955 with spread 1.25 and with 1, 0.902
    without; scale within 15 % of the oracle 0.899 / 0.826 / 0.868.)

    Parameters
    ----------
    est : the image's own :func:`estimate_scale` result
    pooled : :func:`pool_scales` of its microscope's images
    spread : >= 1

    Returns
    -------
    ScaleEstimate: ``est`` with ``scale`` held to ``[median / spread, median *
    spread]`` (or the median when ``est`` is not ``ok``), ``own_scale`` its own
    estimate, ``group_scale`` / ``n_images`` the median and how many images it rests on.
    """
    if not spread >= 1:
        raise ValueError(f"spread={spread}: must be >= 1")
    m = pooled.scale
    if est.ok and not est.white_implausible:
        s = float(np.clip(est.scale, m / spread, m * spread))
        base = est
    elif est.ok:  # its white cells were mismeasured: the field's red cells, at most
        s, base = m, est  # its microscope's median, which rests on the whole folder
    else:
        s, base = m, pooled
    return replace(
        base, scale=s, ok=True, own_scale=float(est.scale), group_scale=m, n_images=pooled.n_images
    )


def _nuclei(image: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(H, W) bool nucleus pixels and the nucleus masks, lobes joined (one per cell)."""
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, threshold_multiotsu, threshold_otsu
    from skimage.measure import label, regionprops
    from skimage.morphology import disk

    f = image.astype(np.float32)
    # purple = red and blue kept, green absorbed: (R + B) / 2 - G is high on nuclei only
    # (red cells absorb green too, but also blue); the nucleus is also dark in green
    p = gaussian((f[..., 0] + f[..., 2]) / 2 - f[..., 1], sigma=1.0, preserve_range=True)
    g = gaussian(f[..., 1], sigma=1.0, preserve_range=True)
    if np.ptp(p) < 10 or np.ptp(g) < 10:
        return np.zeros(g.shape, bool), []
    # three classes each (plasma / red cells / nuclei): the top purple class that is
    # also in the darkest green class
    top = p > threshold_multiotsu(p, classes=3)[-1]
    nuc = top & (g < threshold_multiotsu(g, classes=3)[0])
    # and clearly more purple than the other cells (red cells): when the nuclei are a
    # tiny share of the field the top class can hold red cells too
    cells = g < threshold_otsu(g)
    rest = cells & ~nuc
    if rest.any():
        nuc &= p > np.median(p[rest]) + NUCLEUS_MARGIN
    nuc = ndi.binary_opening(nuc, disk(2))
    lab0 = label(nuc)
    if lab0.max() == 0:
        return nuc, []
    big = max(r.area for r in regionprops(lab0))
    # join the lobes of a segmented nucleus: closing by half the largest piece's radius
    # (two distance transforms: a disk closing of any radius at the same cost)
    rad = max(1.0, 0.5 * np.sqrt(big / np.pi))
    joined = ndi.distance_transform_edt(ndi.distance_transform_edt(~nuc) <= rad) > rad
    lab = label(joined | nuc)
    rs = regionprops(lab)
    amax = max(r.area for r in rs)
    # a nucleus piece under 0.3x the largest is a platelet or debris (nuclei of one smear
    # differ less than that)
    return nuc, [lab == r.label for r in rs if r.area >= 0.3 * amax]


def _ray_lengths(region: np.ndarray, cy: float, cx: float, n: int = 32) -> np.ndarray:
    """Distances (px) from (cy, cx) to the edge of ``region`` along ``n`` rays.

    A ray that leaves the image while still inside the region has no length (the
    cell is cut by the image edge there) and is left out.
    """
    h, w = region.shape
    t = np.arange(int(np.hypot(h, w)) + 1, dtype=np.float32)
    out = []
    for th in np.linspace(0, 2 * np.pi, n, endpoint=False):
        ys = np.round(cy + t * np.sin(th)).astype(int)
        xs = np.round(cx + t * np.cos(th)).astype(int)
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        v = np.zeros(t.size, bool)
        v[inside] = region[ys[inside], xs[inside]]
        k = int(np.argmin(v)) if not v.all() else t.size - 1
        if k == 0 or not inside[k]:
            continue
        out.append(float(k))
    return np.asarray(out)


@dataclass
class WhiteCellRegions:
    """What :func:`white_cell_sizes` measures on one image (at its measuring size).

    Attributes
    ----------
    image : (h, w, 3) uint8, the image at the measuring size
    factor : measuring size / source size (<= 1)
    nucleus : (h, w) bool, every nucleus pixel (:func:`_nuclei`)
    regions : (h, w) int, the watershed: 0 outside the cell foreground, ``2 .. n + 1``
        the white cells (one per nucleus, in the order of ``centres``), above ``n + 1``
        the red-cell segments
    red_seeds : (h, w) int, labelled red-cell seeds (0 elsewhere)
    centres : (k, cy, cx) per white cell: its region label and nucleus-hull centre
    """

    image: np.ndarray
    factor: float
    nucleus: np.ndarray
    regions: np.ndarray
    red_seeds: np.ndarray
    centres: list[tuple[int, float, float]]


def white_cell_regions(image: np.ndarray, measure_px: int = MEASURE_PX) -> WhiteCellRegions | None:
    """The white-cell regions of a smear image (see :func:`white_cell_sizes` for the
    method); None when the image is not RGB or holds no nucleus."""
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label
    from skimage.morphology import convex_hull_image, h_maxima
    from skimage.segmentation import watershed
    from skimage.transform import rescale

    if image.ndim != 3 or image.shape[2] < 3:
        return None
    image = image[..., :3]
    f = min(1.0, measure_px / max(image.shape[:2]))
    if f < 1:
        image = (
            rescale(image, f, channel_axis=-1, anti_aliasing=True, preserve_range=True)
            .round()
            .astype(np.uint8)
        )
    nuc, nuclei = _nuclei(image)
    if not nuclei:
        return None
    g = gaussian(image.astype(np.float32) / 255, sigma=1.5, channel_axis=-1)[..., 1]
    t = threshold_otsu(g)
    # FOREGROUND_MIX > 0 moves the threshold toward the plasma (pale cytoplasm counts as cell)
    t = t + FOREGROUND_MIX * (np.median(g[g >= t]) - t)
    fg = g < t
    markers = np.zeros(g.shape, np.int32)
    centres = []
    for k, m in enumerate(nuclei, start=2):
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        hull = np.zeros(g.shape, bool)
        hull[y0:y1, x0:x1] = convex_hull_image(m[y0:y1, x0:x1])
        markers[hull] = k
        hy, hx = np.nonzero(hull)
        centres.append((k, hy.mean(), hx.mean()))
    fg = ndi.binary_fill_holes(fg | (markers > 0))
    dist = ndi.distance_transform_edt(fg)
    near = ndi.distance_transform_edt(markers == 0)
    rad = np.sqrt(max(m.sum() for m in nuclei) / np.pi)
    # red-cell seeds: distance maxima at least half a nucleus radius from every nucleus
    peaks = h_maxima(gaussian(dist, sigma=1.0), 1.0) & (near > 0.5 * rad) & (markers == 0)
    pl = label(peaks)
    markers[pl > 0] = pl[pl > 0] + len(nuclei) + 2
    ws = watershed(-dist, markers, mask=fg)
    return WhiteCellRegions(image, f, nuc, ws, pl, centres)


def white_cell_sizes(image: np.ndarray, measure_px: int = MEASURE_PX) -> np.ndarray:
    """Diameters (source px) of the white cells of a smear image, uncalibrated.

    Method: nuclei are the pixels both in the most purple and in the darkest of
    three Otsu classes (lobes joined by a closing, specks dropped); each nucleus
    (its convex hull) seeds a watershed of the distance transform of the cell
    foreground (green channel below Otsu, holes filled) against seeds at the
    red-cell centres (distance maxima away from the nucleus), so the nucleus
    grows over its cytoplasm and stops at the touching red cells
    (:func:`white_cell_regions`). The diameter is twice the **median** distance
    from the nucleus centre to the region's edge over 32 rays: a leak into one
    touching red cell moves a few rays, not the median. Rays cut by the image
    edge are left out.

    Parameters
    ----------
    image : (H, W, 3) uint8 RGB
    measure_px : the image is measured at most this many px on its longer side

    Returns
    -------
    (n,) float diameters in source px, one per white cell found (may be empty)
    """
    return np.asarray([d for d, _, _ in _white_cells(image, measure_px)], float)


def _white_cells(
    image: np.ndarray, measure_px: int = MEASURE_PX
) -> list[tuple[float, float, float]]:
    """(diameter, centre y, centre x) in source px of each white cell
    :func:`white_cell_sizes` measures (its method); empty when none is found."""
    w = white_cell_regions(image, measure_px)
    if w is None:
        return []
    out = []
    for k, cy, cx in w.centres:
        r = _ray_lengths(w.regions == k, cy, cx)
        if r.size >= 4:
            out.append((2.0 * float(np.median(r)) / w.factor, cy / w.factor, cx / w.factor))
    return out


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


RULERS = ("auto", "white", "red")


@dataclass
class RulerWindow:
    """A view of the image the rulers measure, and which of its edges lie inside the
    image (``top, left, bottom, right``): a cell cut there is whole in a neighbour."""

    view: np.ndarray
    inner: tuple[bool, bool, bool, bool] = (False, False, False, False)


def _starts(length: int, window: int, overlap: int) -> list[int]:
    """Window starts covering ``length``: evenly spaced, neighbours overlapping by at
    least ``overlap``, the last flush with the end."""
    if length <= window:
        return [0]
    n = int(np.ceil((length - overlap) / (window - overlap)))
    return [round(k * (length - window) / (n - 1)) for k in range(n)]


def ruler_windows(
    image: np.ndarray,
    whole_px: int = RULER_WHOLE_PX,
    window_px: int = RULER_WINDOW_PX,
    max_windows: int = RULER_MAX_WINDOWS,
    overlap_px: int = RULER_OVERLAP_PX,
) -> list[RulerWindow]:
    """The views of ``image`` the rulers measure: the image itself when neither side is
    longer than ``whole_px``, else ``window_px`` squares (views, no copies) covering it,
    neighbours overlapping by at least ``overlap_px``, at most ``max_windows`` of them
    spread evenly over the grid (row-major order).

    Parameters
    ----------
    image : (H, W, 3) uint8 RGB
    whole_px : longest side measured whole (px)
    window_px : side of a window (px)
    max_windows : most windows measured
    overlap_px : least overlap of neighbouring windows (px)

    Returns
    -------
    list of :class:`RulerWindow`
    """
    h, w = image.shape[:2]
    if max(h, w) <= whole_px:
        return [RulerWindow(image)]
    ys, xs = _starts(h, window_px, overlap_px), _starts(w, window_px, overlap_px)
    cells = [(y, x) for y in ys for x in xs]
    if len(cells) > max_windows:  # evenly spread over the grid, first and last kept
        idx = np.unique(np.round(np.linspace(0, len(cells) - 1, max_windows)).astype(int))
        cells = [cells[k] for k in idx]
    out = []
    for y, x in cells:
        y1, x1 = min(h, y + window_px), min(w, x + window_px)
        out.append(RulerWindow(image[y:y1, x:x1], (y > 0, x > 0, y1 < h, x1 < w)))
    return out


def _white_pooled(windows: list[RulerWindow]) -> np.ndarray:
    """:func:`white_cell_sizes` over ``windows``: every window's white cells, less those
    whose centre lies within their own radius of an inner window edge (cut there,
    measured small; whole in the neighbouring window)."""
    out: list[float] = []
    for win in windows:
        hh, ww = win.view.shape[:2]
        top, left, bottom, right = win.inner
        for d, y, x in _white_cells(win.view):
            rad = d / 2.0
            cut = (
                (top and y < rad)
                or (left and x < rad)
                or (bottom and y > hh - rad)
                or (right and x > ww - rad)
            )
            if not cut:
                out.append(d)
    return np.asarray(out, float)


def _red_pooled(windows: list[RulerWindow]) -> tuple[float, int]:
    """:func:`red_cell_diameter` over ``windows`` (cells cut by any window edge are left
    out by it): the median of the windows' medians, weighted by their cell counts (NaN
    when no window measured any), and the cells."""
    got = [red_cell_diameter(w.view) for w in windows]
    if len(got) == 1:
        return got[0]
    d = np.array([g[0] for g in got], float)
    n = np.array([g[1] for g in got], float)
    ok = np.isfinite(d) & (n > 0)
    if not ok.any():
        return float("nan"), int(n.sum())
    order = np.argsort(d[ok])
    cum = np.cumsum(n[ok][order])
    mid = int(np.searchsorted(cum, cum[-1] / 2.0))
    return float(d[ok][order][mid]), int(n[ok].sum())


def estimate_scale(
    image: np.ndarray,
    cell_px: float,
    wbc_per_rbc: float = WBC_PER_RBC,
    fallback: float = 1.0,
    ruler: str = "auto",
    white_box_per_diameter: float = WHITE_BOX_PER_DIAMETER,
) -> ScaleEstimate:
    """Working scale that makes a white cell about ``cell_px`` px.

    Parameters
    ----------
    image : (H, W, 3) uint8 RGB
    cell_px : wanted white-cell box side in working px
    wbc_per_rbc : white box side per red-cell diameter (red ruler)
    fallback : scale returned when nothing could be measured
    ruler : ``white`` (the white cells themselves: ``scale = cell_px /
        (white_box_per_diameter * median diameter)``), ``red`` (``scale =
        cell_px / (wbc_per_rbc * red diameter)``), or ``auto``: white, else red
        when the image shows no white cell
    white_box_per_diameter : white box side per measured white-cell diameter

    Returns
    -------
    ScaleEstimate

    Notes
    -----
    An image longer than :data:`RULER_WHOLE_PX` on a side is measured on windows
    (:func:`ruler_windows`): the white cells of all windows together (less those cut by
    an inner window edge), the red-cell
    diameter as the count-weighted median of the windows'.
    """
    if ruler not in RULERS:
        raise ValueError(f"ruler={ruler!r}; valid: {', '.join(RULERS)}")
    views = ruler_windows(
        image, RULER_WHOLE_PX, RULER_WINDOW_PX, RULER_MAX_WINDOWS, RULER_OVERLAP_PX
    )
    wpx = float("nan")
    if ruler in ("auto", "white"):
        w = _white_pooled(views)
        if w.size:
            wpx = float(np.median(w))
            s = cell_px / (white_box_per_diameter * wpx)
            white = ScaleEstimate(float("nan"), int(w.size), float(s), True, "white", wpx)
            if ruler == "white":
                return white
            d, n = _red_pooled(views)
            if not (np.isfinite(d) and wpx < MIN_WHITE_PER_RED * d):
                return white
            # smaller than a red cell: not a white cell's size; the red cells are the ruler
            return ScaleEstimate(d, n, float(cell_px / (wbc_per_rbc * d)), True, "red", wpx)
        if ruler == "white":
            return ScaleEstimate(float("nan"), 0, float(fallback), False, "none")
    d, n = _red_pooled(views)
    if not np.isfinite(d) or d <= 0:
        return ScaleEstimate(float("nan"), n, float(fallback), False, "none")
    return ScaleEstimate(d, n, float(cell_px / (wbc_per_rbc * d)), True, "red", wpx)


# --- detector-refined scale -------------------------------------------------------------
# The oracle scale is cell_px / (median ground-truth white box side); the detector finds
# white boxes itself, so a first pass at the image ruler's scale s0 gives a second
# estimate s1 = cell_px / (median side of its confident boxes), free of the ruler's
# per-cell-type bias (dense lymphocytes measured large, pale cytoplasm measured small).
# Defaults chosen on TXL-PBC *train* (every 4th image; docs/segmentation_infer.md,
# "Detector-refined scale"); no ground truth is used at inference.
REFINE_MIN_SCORE = 0.8  # detections at least this confident measure the cell size
REFINE_EDGE_PX = 2.0  # working px: boxes this close to the image edge are cut, not measured
REFINE_TOLERANCE = 0.1  # |s1 / s - 1| at most this: keep the pass (no re-run)
REFINE_MAX_PASSES = 2  # detector passes per image, the first at s0 included
REFINE_CHOOSE = ("last", "score")


@dataclass
class RefineSettings:
    """Thresholds of :func:`refine_scale` (see the ``REFINE_*`` constants).

    min_score : detections at least this confident are measured
    edge_px : a box within this many *working* px of the image edge is cut by it
        and not measured
    tolerance : a new estimate within this relative distance of the pass's scale
        ends the refinement (the pass is kept)
    max_passes : detector passes per image (>= 1; 1 = no refinement)
    choose : ``last`` keeps the last pass; ``score`` the pass whose confident
        detections score highest (mean of its top ``top_k`` scores)
    top_k : scores averaged by ``choose="score"`` and by the probe
    probe : factors (e.g. ``(0.8, 1.25)``): after the passes above, one more pass at
        the kept scale times each factor; a probe pass replaces the kept one when its
        top-``top_k`` mean score beats it by more than ``probe_margin`` (the detector's
        confidence as the judge of the scale it sees best; empty: no probe)
    probe_margin : score margin a probe pass must beat the kept pass by
    """

    min_score: float = REFINE_MIN_SCORE
    edge_px: float = REFINE_EDGE_PX
    tolerance: float = REFINE_TOLERANCE
    max_passes: int = REFINE_MAX_PASSES
    choose: str = "last"
    top_k: int = 3
    probe: tuple[float, ...] = ()
    probe_margin: float = 0.05


@dataclass
class ScaleRefinement:
    """What :func:`refine_scale` did for one image.

    s0 : the ruler's scale (first pass)
    s1 : the detector's estimate from the first pass (NaN: no confident, uncut box)
    n_boxes : boxes s1 rests on
    scale : the scale whose pass was kept
    scales : scale of every pass run, in order
    confidence : per pass, mean of its top ``top_k`` scores (0 without detections)
    measured : the scale kept before any probe pass (the image's measured
        magnification: the detector's box size where it was re-run, else ``s0``)
    """

    s0: float
    s1: float
    n_boxes: int
    scale: float
    scales: list[float]
    confidence: list[float]
    measured: float = float("nan")


def whole_boxes(boxes: np.ndarray, width: float, height: float, margin: float) -> np.ndarray:
    """(K,) bool: the boxes that stay more than ``margin`` px inside every image edge.

    A box closer to an edge is cut by it: its side is the visible part, not the cell's
    size. The one rule of the detector's ruler (:func:`detector_scale`), the oracle scale
    (``segmentation.datasets.auto_scale``) and the evaluation's ignore regions
    (``segmentation.engine.mark_edge_cut``).

    Parameters
    ----------
    boxes : (K, 4) xyxy, in the same px as ``width``, ``height`` and ``margin``
    """
    b = np.asarray(boxes, float).reshape(-1, 4)
    m = float(margin)
    return (b[:, 0] > m) & (b[:, 1] > m) & (b[:, 2] < width - m) & (b[:, 3] < height - m)


def detector_scale(
    boxes: np.ndarray,
    scores: np.ndarray,
    image_hw: tuple[int, int],
    scale: float,
    cell_px: float,
    min_score: float = REFINE_MIN_SCORE,
    edge_px: float = REFINE_EDGE_PX,
) -> tuple[float, int]:
    """Scale that makes the detector's own white boxes ``cell_px`` px.

    Parameters
    ----------
    boxes : (K, 4) float xyxy white-cell boxes in *source* px
    scores : (K,) detection scores
    image_hw : (H, W) of the source image
    scale : working px per source px of the pass that found the boxes (the edge
        margin ``edge_px`` is in working px)
    cell_px : wanted white-cell box side in working px
    min_score : boxes scoring below are not measured
    edge_px : boxes within this many working px of the image edge are cut by it and
        not measured

    Returns
    -------
    (scale, n) : ``cell_px / median(sqrt(w * h))`` over the measured boxes (the same
        box side as the ground-truth oracle, ``segmentation.datasets.auto_scale``) and
        how many boxes it rests on; ``(NaN, 0)`` when none qualifies
    """
    b = np.asarray(boxes, float).reshape(-1, 4)
    s = np.asarray(scores, float).reshape(-1)
    h, w = image_hw
    m = float(edge_px) / float(scale)  # margin in source px
    ok = (s >= min_score) & whole_boxes(b, w, h, m) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    if not ok.any():
        return float("nan"), 0
    side = np.sqrt((b[ok, 2] - b[ok, 0]) * (b[ok, 3] - b[ok, 1]))
    return float(cell_px / np.median(side)), int(ok.sum())


def _top_mean(scores, k: int) -> float:
    """A pass's confidence: the mean of its ``k`` highest detection scores (0 without any)."""
    top = np.sort(np.asarray(scores, float).reshape(-1))[::-1][:k]
    return float(top.mean()) if top.size else 0.0


def refine_scale(
    detect,
    s0: float,
    image_hw: tuple[int, int],
    cell_px: float,
    settings: RefineSettings | None = None,
):
    """Run a detector at the ruler's scale ``s0``, then at its own estimate if that differs.

    Pass 1 runs at ``s0``; :func:`detector_scale` of its boxes gives ``s1``. When ``s1``
    differs from the pass's scale by more than ``tolerance``, the next pass runs at
    ``s1`` (and so on, up to ``max_passes``). No confident, uncut box: the pass is
    kept as it is (an empty field stays at ``s0``).

    Parameters
    ----------
    detect : ``fn(scale) -> (result, boxes, scores)``: any detection of the image at
        ``scale``; ``boxes`` (K, 4) xyxy in *source* px, ``scores`` (K,)
    s0 : first scale (working px per source px)
    image_hw : (H, W) of the source image
    cell_px : wanted white-cell box side in working px
    settings : thresholds (:class:`RefineSettings`; None: the defaults)

    Returns
    -------
    (result, ScaleRefinement) : the kept pass's ``result`` and what was done
    """
    st = settings or RefineSettings()
    if st.choose not in REFINE_CHOOSE:
        raise ValueError(f"choose={st.choose!r}; valid: {', '.join(REFINE_CHOOSE)}")
    if st.max_passes < 1:
        raise ValueError(f"max_passes={st.max_passes}: must be >= 1")
    if any(not float(f) > 0 for f in st.probe):
        raise ValueError(f"probe={st.probe}: factors must be > 0")
    s = float(s0)
    passes = []  # (scale, result, confidence)
    s1, n1 = float("nan"), 0
    while True:
        result, boxes, scores = detect(s)
        passes.append((s, result, _top_mean(scores, st.top_k)))
        nxt, n = detector_scale(boxes, scores, image_hw, s, cell_px, st.min_score, st.edge_px)
        if len(passes) == 1:  # the detector's estimate, reported even without a re-run
            s1, n1 = nxt, n
        if len(passes) >= st.max_passes or not np.isfinite(nxt) or abs(nxt / s - 1) <= st.tolerance:
            break
        s = nxt
    k = len(passes) - 1
    if st.choose == "score":
        k = int(np.argmax([c for _, _, c in passes]))  # first of equals: the earlier pass
    measured = passes[k][0]
    best = k
    for f in st.probe:
        s = measured * float(f)
        result, _, scores = detect(s)
        passes.append((s, result, _top_mean(scores, st.top_k)))
        if passes[-1][2] > max(passes[best][2], passes[k][2] + st.probe_margin):
            best = len(passes) - 1
    return passes[best][1], ScaleRefinement(
        s0=float(s0),
        s1=s1,
        n_boxes=n1,
        scale=passes[best][0],
        scales=[p[0] for p in passes],
        confidence=[p[2] for p in passes],
        measured=float(measured),
    )
