"""Per-cell filters and fixed-size, background-free crops.

:func:`filter_detections` flags every detection of one image (low score, too
small/large, cut by the image border, overlapping another cell, mask in
several pieces) and says which are kept; :func:`extract_crops` cuts a square
window centred on each kept cell, resizes it to ``crop_size`` when the cell is
larger, and paints everything outside the instance mask with
``background_value``. :func:`match_truth` pairs detections with ground-truth
masks (mask IoU, Hungarian).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment
from skimage.measure import label

from segmentation.inference import Detections, local_overlap, mask_iou_matrix
from segmentation.schema import (
    BORDER_MARGIN,
    EDGE_WEIGHT_MAX,
    MAX_AREA_RATIO,
    MIN_CELLS_AREA_RATIO,
    MIN_SOLIDITY,
    SCORE_THRESHOLD,
    TOUCH_PX,
)

FLAGS = (
    "low_score",
    "too_small",
    "too_large",
    "at_border",
    "duplicate",
    "overlapping",
    "multi_piece",
    "tile_cut",
    "touching",
    "low_solidity",
    "area_outlier",
)
# why each flag keeps a detection out (rejects.csv, the report's rejected examples)
REASONS = {
    "low_score": "score below the threshold",
    "too_small": "mask smaller than min_area",
    "too_large": "mask larger than max_area",
    "at_border": "cut by the image edge",
    "duplicate": "second detection of a cell",
    "overlapping": "overlaps another cell",
    "multi_piece": "mask in several pieces",
    "tile_cut": "cut by a tile edge",
    "touching": "touches another cell (cut by or stuck to a neighbour)",
    "low_solidity": "not convex: two touching cells kept as one",
    "area_outlier": "far larger than the image's other cells: a doublet",
}


@dataclass
class FilterSettings:
    """Which detections become cells. Every threshold is in the frame the masks are in."""

    score_threshold: float = SCORE_THRESHOLD
    min_area: int = 0  # px
    max_area: int | None = None  # px
    drop_border: bool = True
    border_margin: int = BORDER_MARGIN  # px
    max_overlap_iou: float | None = 0.2  # None: never drop for overlap
    duplicate_containment: float | None = 0.6  # None: no duplicate test
    drop_multi_piece: bool = True
    min_piece_area: int = 10  # px; smaller components are specks, not pieces
    drop_tile_cut: bool = True  # a tile fragment left after merging is part of a cell
    touch_px: int | None = TOUCH_PX  # px gap under which two cells touch; None: no test
    min_solidity: float | None = MIN_SOLIDITY  # None: no test
    max_area_ratio: float | None = MAX_AREA_RATIO  # x the image's median cell; None: no test
    min_cells_area_ratio: int = MIN_CELLS_AREA_RATIO


@dataclass
class FilterResult:
    """Flags of one image's detections; each array is (N,).

    ``flags[name]`` is True when the detection fails that test (computed for
    every detection, whether or not the filter is enabled); ``kept`` is the
    AND of the enabled filters.
    """

    flags: dict[str, np.ndarray]
    kept: np.ndarray
    area: np.ndarray  # mask px
    n_pieces: np.ndarray
    max_overlap_iou: np.ndarray  # highest mask IoU with another scored, non-duplicate one
    solidity: np.ndarray  # mask area / convex hull area (1 for a convex cell)
    area_ratio: np.ndarray  # area / median area of the image's scored, non-duplicate cells
    # (N, 4) int: the mask's pixel extent x_min, y_min, x_max, y_max (inclusive) in the
    # image frame, what the border test reads; -1 for an empty mask
    extent: np.ndarray | None = None


def count_pieces(mask: np.ndarray, min_piece_area: int = 1) -> int:
    """Connected components (8-connectivity) with at least ``min_piece_area`` px."""
    if not mask.any():
        return 0
    lab = label(mask, connectivity=2)
    sizes = np.bincount(lab.ravel())[1:]
    return int((sizes >= max(1, min_piece_area)).sum())


def solidity(mask: np.ndarray) -> float:
    """Mask area over its convex hull area (1.0 = convex; 1.0 for an empty mask)."""
    from skimage.morphology import convex_hull_image

    if mask.sum() < 3:
        return 1.0
    hull = convex_hull_image(mask)
    return float(mask.sum() / max(hull.sum(), 1))


def touching_pairs(det: Detections, idx: np.ndarray, gap_px: int) -> np.ndarray:
    """(N,) bool: detection ``k`` of ``idx`` lies within ``gap_px`` px of another of ``idx``.

    Both masks are compared on their bounding boxes grown by ``gap_px``; the
    test is a dilation of one mask by ``gap_px`` (a square) meeting the other.
    """
    from scipy.ndimage import binary_dilation

    out = np.zeros(len(det), bool)
    g = int(gap_px)
    for a_pos, a in enumerate(idx):
        ma, (ax, ay) = det.masks[a], det.origins[a]
        ha, wa = ma.shape
        for b in idx[a_pos + 1 :]:
            mb, (bx, by) = det.masks[b], det.origins[b]
            hb, wb = mb.shape
            if bx > ax + wa + g or ax > bx + wb + g or by > ay + ha + g or ay > by + hb + g:
                continue  # boxes farther apart than the gap
            # frame covering a (grown by g); b pasted into it
            fx, fy = ax - g, ay - g
            grown = binary_dilation(np.pad(ma, g), np.ones((2 * g + 1, 2 * g + 1), bool))
            other = np.zeros_like(grown)
            x0, y0 = bx - fx, by - fy
            sx0, sy0 = max(0, -x0), max(0, -y0)
            ex, ey = min(wb, grown.shape[1] - x0), min(hb, grown.shape[0] - y0)
            if ex <= sx0 or ey <= sy0:
                continue
            other[y0 + sy0 : y0 + ey, x0 + sx0 : x0 + ex] = mb[sy0:ey, sx0:ex]
            if (grown & other).any():
                out[a] = out[b] = True
    return out


def filter_detections(
    det: Detections, height: int, width: int, settings: FilterSettings
) -> FilterResult:
    """Flag the detections of one image (H x W px frame) and decide which are kept.

    Only detections that pass the score threshold are compared with each
    other, so low-score noise never removes a confident cell. Among them, in
    descending score, one lying at least ``duplicate_containment`` of its area
    inside a better one is a ``duplicate`` (a second detection of the same
    cell); of the rest, both cells of a pair with mask IoU above
    ``max_overlap_iou`` are ``overlapping`` (neither crop would be clean).

    Cells a morphologist would not accept: ``at_border`` (within ``border_margin``
    px of the image edge), ``tile_cut`` (a tile fragment left after merging),
    ``touching`` (within ``touch_px`` px of another cell: one of the two is
    usually cut by the other), ``low_solidity`` (area / convex hull below
    ``min_solidity``: two cells kept as one have a waist) and ``area_outlier``
    (area above ``max_area_ratio`` x the median of the image's cells, tested when
    the image has at least ``min_cells_area_ratio`` of them: a doublet).
    """
    n = len(det)
    s = settings
    area = det.areas()
    n_pieces = np.array([count_pieces(m, s.min_piece_area) for m in det.masks], np.int64)
    scored = det.scores >= s.score_threshold
    duplicate = np.zeros(n, bool)
    if s.duplicate_containment is not None:
        ref: list[int] = []
        for i in sorted(np.nonzero(scored)[0], key=lambda k: -det.scores[k]):
            for j in ref:
                inter, _, _ = local_overlap(
                    det.masks[i], det.origins[i], det.masks[j], det.origins[j]
                )
                if area[i] and inter / area[i] >= s.duplicate_containment:
                    duplicate[i] = True
                    break
            if not duplicate[i]:
                ref.append(i)
    idx = np.nonzero(scored & ~duplicate)[0]
    iou = mask_iou_matrix(
        [det.masks[i] for i in idx], det.origins[idx], [det.masks[i] for i in idx], det.origins[idx]
    )
    np.fill_diagonal(iou, 0.0)
    max_iou = np.zeros(n, np.float64)
    if len(idx):
        max_iou[idx] = iou.max(axis=1)
    at_border = np.zeros(n, bool)
    extent = np.full((n, 4), -1, np.int64)
    for k, (m, (ox, oy)) in enumerate(zip(det.masks, det.origins)):
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        extent[k] = (ox + xs.min(), oy + ys.min(), ox + xs.max(), oy + ys.max())
        at_border[k] = (
            extent[k, 0] <= s.border_margin - 1
            or extent[k, 1] <= s.border_margin - 1
            or extent[k, 2] >= width - s.border_margin
            or extent[k, 3] >= height - s.border_margin
        )
    solid = np.array([solidity(m) for m in det.masks], np.float64)
    ratio = np.full(n, np.nan)
    if len(idx):
        med = float(np.median(area[idx]))
        if med > 0:
            ratio[idx] = area[idx] / med
    area_test = s.max_area_ratio is not None and len(idx) >= max(1, s.min_cells_area_ratio)
    flags = {
        "low_score": ~scored,
        "too_small": area < s.min_area,
        "too_large": area > s.max_area if s.max_area is not None else np.zeros(n, bool),
        "at_border": at_border,
        "duplicate": duplicate,
        "overlapping": max_iou > s.max_overlap_iou
        if s.max_overlap_iou is not None
        else np.zeros(n, bool),
        "multi_piece": n_pieces > 1,
        "tile_cut": np.asarray(det.cut, bool) & scored,
        "touching": touching_pairs(det, idx, s.touch_px)
        if s.touch_px is not None
        else np.zeros(n, bool),
        "low_solidity": scored & (solid < s.min_solidity)
        if s.min_solidity is not None
        else np.zeros(n, bool),
        "area_outlier": np.nan_to_num(ratio) > s.max_area_ratio if area_test else np.zeros(n, bool),
    }
    enabled = {
        "low_score": True,
        "too_small": True,
        "too_large": True,
        "at_border": s.drop_border,
        "duplicate": s.duplicate_containment is not None,
        "overlapping": s.max_overlap_iou is not None,
        "multi_piece": s.drop_multi_piece,
        "tile_cut": s.drop_tile_cut,
        "touching": s.touch_px is not None,
        "low_solidity": s.min_solidity is not None,
        "area_outlier": s.max_area_ratio is not None,
    }
    kept = np.ones(n, bool)
    for name, on in enabled.items():
        if on:
            kept &= ~flags[name]
    kept &= area > 0  # an empty mask is never a cell
    return FilterResult(flags, kept, area, n_pieces, max_iou, solid, ratio, extent)


def edge_weights(
    extents: np.ndarray,
    height: int,
    width: int,
    margin: float = BORDER_MARGIN,
    cap: float = EDGE_WEIGHT_MAX,
) -> np.ndarray:
    """Miles-Lantuejoul edge correction of cells kept only when clear of the image edge.

    Dropping every cell that touches the edge (``at_border``) drops large cells more
    often than small ones: a mask spanning pixels ``x_min .. x_max`` is kept only
    where ``margin <= x_min`` and ``x_max <= width - 1 - margin``, at
    ``width - 2 margin - (x_max - x_min)`` of the field's ``width`` column positions (and
    likewise in y), so a count of kept cells under-represents monocytes and
    promyelocytes against lymphocytes. Weighting each kept cell by the inverse of its
    chance to be kept, ``width * height / ((width - 2 margin - dx) (height - 2 margin -
    dy))`` with ``dx = x_max - x_min``, ``dy = y_max - y_min``, makes a class's weighted
    share estimate its share of all cells in the fields (for cells placed at random; a
    photo centred on its cell is kept more often, but the weights' ratios, which are
    what a share depends on, still follow cell size).

    Parameters
    ----------
    extents : (n, 4) the masks' pixel extents x_min, y_min, x_max, y_max (inclusive;
        :attr:`FilterResult.extent`, what the border test reads) in the frame
        ``height`` x ``width`` (px) is in; continuous boxes work alike.
    height, width : the image's size in that frame (px).
    margin : px from the edge that counts as touching it (``FilterSettings.border_margin``).
    cap : the largest weight: a cell nearly as large as the field has almost no room to
        be kept, and its weight would dominate a sample's shares.

    Returns
    -------
    (n,) float64 in [1, cap].
    """
    b = np.asarray(extents, dtype=np.float64).reshape(-1, 4)
    room_x = width - 2.0 * margin - (b[:, 2] - b[:, 0])
    room_y = height - 2.0 * margin - (b[:, 3] - b[:, 1])
    room = np.clip(room_x, 0.0, None) * np.clip(room_y, 0.0, None)
    with np.errstate(divide="ignore"):
        w = np.where(room > 0, float(width) * float(height) / np.where(room > 0, room, 1.0), cap)
    return np.clip(w, 1.0, cap)


@dataclass
class Crops:
    """Crops of the kept cells of one image.

    Attributes
    ----------
    images
        (N, S, S, 3) uint8, outside the mask = ``background_value``.
    masks
        (N, S, S) bool instance masks.
    scale
        (N,) crop px per image px (1.0 unless the cell was larger than the crop).
    centers
        (N, 2) float ``(x, y)`` crop centre in image px.
    windows
        (N, 3) int ``(x0, y0, side)``: the square of the image, in image px, that each
        crop shows (resized to S); x0, y0 of its top-left pixel's corner, 0-based, and
        may lie outside the image (padded with the background). A crop pixel (i, j) covers
        image px ``x0 + (j + 0.5) * side / S - 0.5`` (centre). See :func:`crop_window`.
    """

    images: np.ndarray
    masks: np.ndarray
    scale: np.ndarray
    centers: np.ndarray
    windows: np.ndarray | None = None


def label_image(
    shape: tuple[int, int], masks: Sequence[np.ndarray], origins: np.ndarray
) -> np.ndarray:
    """One image's instance masks as a label image (ImageJ, napari, QuPath read it).

    Parameters
    ----------
    shape
        (H, W) of the image, px.
    masks
        Local (h, w) bool masks, in image px.
    origins
        (N, 2) int ``(x, y)`` image px of each mask's top-left pixel.

    Returns
    -------
    np.ndarray
        (H, W) uint16 (uint32 above 65534 cells): 0 background, ``k + 1`` where mask
        ``k`` is; a pixel two masks share keeps the first one's label.
    """
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((h, w), np.uint16 if len(masks) < 65535 else np.uint32)
    for k, (m, (x, y)) in enumerate(zip(masks, np.asarray(origins).reshape(-1, 2))):
        x0, y0 = max(int(x), 0), max(int(y), 0)
        x1, y1 = min(int(x) + m.shape[1], w), min(int(y) + m.shape[0], h)
        if x1 <= x0 or y1 <= y0:
            continue
        part = m[y0 - int(y) : y1 - int(y), x0 - int(x) : x1 - int(x)]
        region = out[y0:y1, x0:x1]
        region[part & (region == 0)] = k + 1
    return out


def _window_with_pad(image: np.ndarray, x0: int, y0: int, side: int, fill: int) -> np.ndarray:
    """(side, side, C) window of ``image`` at (x0, y0); outside the image = ``fill``."""
    h, w = image.shape[:2]
    out = np.full((side, side, *image.shape[2:]), fill, dtype=image.dtype)
    ax0, ay0, ax1, ay1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if ax1 > ax0 and ay1 > ay0:
        out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = image[ay0:ay1, ax0:ax1]
    return out


def crop_window(cx: float, cy: float, side: int) -> tuple[int, int]:
    """Top-left corner (x0, y0), image px, of the ``side`` px square a crop centred on
    ``(cx, cy)`` shows (:func:`extract_crop`'s rule, the one owner of it)."""
    return int(math.floor(cx - side / 2.0)), int(math.floor(cy - side / 2.0))


def extract_crop(
    image: np.ndarray,
    mask: np.ndarray,
    origin: Sequence[int],
    crop_size: int,
    background_value: int = 0,
    margin: float = 0.1,
    paint: bool = True,
    fill: bool = False,
) -> tuple[np.ndarray, np.ndarray, float, tuple[float, float]]:
    """One square crop centred on a cell.

    Parameters
    ----------
    image
        (H, W, 3) uint8.
    mask
        (h, w) bool local mask, top-left at ``origin = (x, y)`` in image px.
    crop_size
        Output side S, px.
    background_value
        Value of every channel outside the mask.
    margin
        A cell whose side plus ``margin`` of it on each side exceeds S is
        taken in a larger window that is then resized down to S.
    paint
        Paint outside the mask with ``background_value`` (False: keep the
        neighbourhood, e.g. to show why a cell was rejected).
    fill
        A smaller cell is enlarged to the same framing (window = its side plus
        ``margin``, resized up to S), so every cell fills its crop alike; False keeps
        a cell that fits at its source px (its size stays visible).

    Returns
    -------
    crop, crop_mask, scale, center
        (S, S, 3) uint8, (S, S) bool, crop px per image px, ``(x, y)`` centre.
    """
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise ValueError("extract_crop: empty mask")
    mx0, mx1 = origin[0] + xs.min(), origin[0] + xs.max() + 1
    my0, my1 = origin[1] + ys.min(), origin[1] + ys.max() + 1
    cx, cy = (mx0 + mx1) / 2.0, (my0 + my1) / 2.0
    extent = max(mx1 - mx0, my1 - my0)
    side = math.ceil(extent * (1.0 + 2.0 * margin))
    side = max(side, 2) if fill else max(side, crop_size)
    wx0, wy0 = crop_window(cx, cy, side)
    win = _window_with_pad(image, wx0, wy0, side, background_value)
    # local mask into the window frame
    wmask = np.zeros((side, side), bool)
    ox, oy = origin[0] - wx0, origin[1] - wy0
    h, w = mask.shape
    ax0, ay0, ax1, ay1 = max(ox, 0), max(oy, 0), min(ox + w, side), min(oy + h, side)
    wmask[ay0:ay1, ax0:ax1] = mask[ay0 - oy : ay1 - oy, ax0 - ox : ax1 - ox]
    scale = crop_size / side
    if side != crop_size:
        # resize the real pixels (neighbours included) so the cell edge never blends
        # with the background value, then cut with the resized mask
        up = Image.Resampling.BILINEAR if side < crop_size else Image.Resampling.BOX
        win = np.asarray(Image.fromarray(win).resize((crop_size, crop_size), up))
        fm = Image.fromarray(wmask.astype(np.float32)).resize(
            (crop_size, crop_size), Image.Resampling.BILINEAR
        )
        wmask = np.asarray(fm) >= 0.5
    crop = win.copy()
    if paint:
        crop[~wmask] = background_value
    return crop, wmask, scale, (cx, cy)


def extract_crops(
    image: np.ndarray,
    det: Detections,
    crop_size: int,
    background_value: int = 0,
    margin: float = 0.1,
    paint: bool = True,
    fill: bool = False,
) -> Crops:
    """Crops of every detection in ``det`` (select the kept ones first); ``paint``,
    ``fill``: see :func:`extract_crop`."""
    n = len(det)
    imgs = np.zeros((n, crop_size, crop_size, 3), np.uint8)
    masks = np.zeros((n, crop_size, crop_size), bool)
    scale = np.ones(n, np.float32)
    centers = np.zeros((n, 2), np.float32)
    for k in range(n):
        imgs[k], masks[k], scale[k], centers[k] = extract_crop(
            image, det.masks[k], det.origins[k], crop_size, background_value, margin, paint, fill
        )
    # the window each crop shows: its side from the scale (crop_size / side, exact for
    # any side below 10^6 px in float32), its corner by extract_crop's own rule
    sides = np.rint(crop_size / scale.astype(np.float64)).astype(np.int64)
    windows = np.array(
        [(*crop_window(cx, cy, int(sd)), int(sd)) for (cx, cy), sd in zip(centers, sides)],
        np.int64,
    ).reshape(-1, 3)
    return Crops(imgs, masks, scale, centers, windows)


@dataclass
class TruthMatch:
    """Detection -> ground-truth assignment of one image.

    ``truth_index[k]`` is the matched ground-truth index of detection ``k``
    or -1; ``iou[k]`` its mask IoU (0 when unmatched).
    """

    truth_index: np.ndarray
    iou: np.ndarray


def match_truth(
    det: Detections,
    truth_masks: Sequence[np.ndarray],
    truth_origins: np.ndarray,
    min_iou: float = 0.5,
    candidates: np.ndarray | None = None,
) -> TruthMatch:
    """One-to-one matching by mask IoU (Hungarian on IoU, pairs below ``min_iou`` dropped).

    Parameters
    ----------
    candidates
        (N,) bool: detections allowed to match (e.g. score >= threshold); all if None.
    """
    n = len(det)
    out = TruthMatch(np.full(n, -1, np.int64), np.zeros(n, np.float64))
    idx = np.arange(n) if candidates is None else np.nonzero(candidates)[0]
    if not len(idx) or not len(truth_masks):
        return out
    iou = mask_iou_matrix(
        [det.masks[i] for i in idx], det.origins[idx], truth_masks, np.asarray(truth_origins)
    )
    rows, cols = linear_sum_assignment(-iou)
    for r, c in zip(rows, cols):
        if iou[r, c] >= min_iou:
            out.truth_index[idx[r]] = c
            out.iou[idx[r]] = iou[r, c]
    return out


# background_od reads every pixel up to this many (4 MP: every shared smear image),
# a regular subsample of a larger image
BACKGROUND_SAMPLE_PX = 4_000_000


def background_od(image: np.ndarray, quantile: float = 0.1) -> float:
    """Optical density of a smear's background (glass and plasma): the median summed
    optical density of the image's palest ``quantile`` of pixels.

    Parameters
    ----------
    image : (H, W, 3) uint8

    Returns
    -------
    float, sum over RGB of ``-log(I / 255)`` (0 = white).
    """
    # a regular subsample of at most BACKGROUND_SAMPLE_PX pixels: the quantile of a
    # whole-slide scan is the same, and its float copies held 3 GB at 196 MP
    h, w = image.shape[:2]
    step = max(1, int(math.ceil(math.sqrt(h * w / BACKGROUND_SAMPLE_PX))))
    od = _od_sum(image[::step, ::step]).ravel()
    k = max(1, int(round(quantile * od.size)))
    return float(np.median(np.partition(od, k - 1)[:k]))


def _od_sum(pixels: np.ndarray) -> np.ndarray:
    """Summed optical density over RGB of uint8 pixels (..., 3)."""
    return -np.log(np.maximum(pixels.astype(np.float32), 1.0) / 255.0).sum(-1)


def trim_rim(
    image: np.ndarray,
    mask: np.ndarray,
    origin: Sequence[int],
    bg_od: float,
    max_px: int,
    max_loss: float = 0.3,
) -> np.ndarray:
    """Peel background off the edge of a cell mask, at most ``max_px`` pixels deep.

    A mask predicted at the detector's working scale and enlarged to the source image is
    a few source pixels too coarse; where it overshoots, the crop carries a rim of pale
    background that the image branch would score as cell. The edge is peeled one pixel
    layer at a time: a pixel on the mask's edge goes when its optical density is nearer
    the background's than the cell's own just inside the peelable band (the median of the
    mask pixels ``max_px`` to ``2 * max_px`` from the edge), so pale cytoplasm stays where
    the cell around it is pale too.

    Parameters
    ----------
    image : (H, W, 3) uint8 source image.
    mask : (h, w) bool local mask whose top-left lies at ``origin = (x, y)`` in ``image``.
    bg_od : the background's summed optical density (:func:`background_od`).
    max_px : layers to peel at most (0: the mask is returned as it is).
    max_loss : a cell that would lose more than this share of its area keeps its mask
        (a cell as pale as the background, or a tiny one).

    Returns
    -------
    (h, w) bool mask, never larger than ``mask``.
    """
    from scipy import ndimage as ndi

    m = np.asarray(mask, bool)
    if max_px <= 0 or not m.any():
        return m
    x, y = int(origin[0]), int(origin[1])
    h, w = m.shape
    win = _window_with_pad(image, x, y, max(h, w), 255)[:h, :w]
    od = _od_sum(win)
    depth = ndi.distance_transform_edt(m)
    band = (depth > max_px) & (depth <= 2 * max_px)
    if band.sum() < 10:
        return m
    cut = 0.5 * (bg_od + float(np.median(od[band])))
    out = m.copy()
    for _ in range(int(max_px)):
        edge = out & ~ndi.binary_erosion(out, border_value=0)
        peel = edge & (od < cut)
        if not peel.any():
            break
        out &= ~peel
    if out.sum() < (1.0 - max_loss) * m.sum():
        return m
    return out
