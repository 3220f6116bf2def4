"""Whole slides segmented window by window, each cell counted once.

A scanner's slide (several gigapixels) does not fit in memory as one array. It is read
and segmented in square windows that overlap (:class:`segmentation.io.SlideReader`
reads each one alone), and every window owns a *core*: the windows' cores tile the
slide exactly, the boundary between two neighbours halfway across their overlap. A
cell belongs to the window whose core holds its box centre; the same cell found by the
neighbour is dropped there. A cell narrower than half the overlap lies whole inside the
window that owns it (its centre is at least half the overlap from that window's inner
edges), so it is never cut, and never counted twice; at the slide's own edge the usual
``at_border`` filter applies.

Pure geometry and table arithmetic; the stages read the slide and run the detector.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from segmentation.cells import ImageCells, SegmentSettings, segment_images
from segmentation.crops import Crops, edge_weights
from segmentation.schema import EDGE_WEIGHT


@dataclass(frozen=True)
class Window:
    """One window of a slide, slide px.

    ``x0, y0, x1, y1``: the region read (``x1``, ``y1`` exclusive). ``cx0 .. cy1``: its
    core, where the box centres of the cells it owns lie. ``k`` of ``n``: its place in
    row-major order.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    cx0: int
    cy0: int
    cx1: int
    cy1: int
    k: int
    n: int

    @property
    def name(self) -> str:
        """``x<x0>_y<y0>``: the window's origin, in its cells' ids and its mask file."""
        return f"x{self.x0}_y{self.y0}"


def _spans(length: int, side: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, end, core start, core end) of windows along one axis: the fewest windows
    of at most ``side`` px that cover it overlapping by ``overlap``, all of one size
    (shrunk to fit: windows of ``side`` spread evenly overlapped by far more than asked,
    a 20000 px slide read 24576 px, 1.5x the pixels); cores split each overlap in half."""
    if length <= side:
        return [(0, length, 0, length)]
    n = math.ceil((length - overlap) / (side - overlap))
    size = math.ceil((length + (n - 1) * overlap) / n)  # <= side
    starts = [min(i * (size - overlap), length - size) for i in range(n)]
    ends = [s + size for s in starts]
    cuts = [0] + [(ends[i] + starts[i + 1]) // 2 for i in range(n - 1)] + [length]
    return [(starts[i], ends[i], cuts[i], cuts[i + 1]) for i in range(n)]


def slide_windows(height: int, width: int, side: int, overlap: int) -> list[Window]:
    """Overlapping windows covering a ``height`` x ``width`` slide (px), row-major.

    Parameters
    ----------
    side : window side, px (a slide side shorter than it gives one window that long)
    overlap : px shared by neighbouring windows (at least 2 cell diameters: a cell
        narrower than ``overlap / 2`` is whole in the window that owns it)

    Raises
    ------
    ValueError
        ``overlap`` not in ``[0, side)``.
    """
    if not 0 <= overlap < side:
        raise ValueError(f"window overlap {overlap} must be >= 0 and < the window side {side}")
    ys, xs = _spans(height, side, overlap), _spans(width, side, overlap)
    n = len(ys) * len(xs)
    out = []
    for y0, y1, cy0, cy1 in ys:
        for x0, x1, cx0, cx1 in xs:
            out.append(Window(x0, y0, x1, y1, cx0, cy0, cx1, cy1, len(out), n))
    return out


def own_cells(
    cells: ImageCells,
    win: Window,
    height: int,
    width: int,
    border_margin: float,
    seen: list[np.ndarray] | None = None,
) -> ImageCells:
    """One window's cells as the slide's: only those it owns, in slide px.

    Parameters
    ----------
    cells : the window segmented as an image (:func:`segmentation.cells.segment_images`;
        table and crops in window px)
    win : the window
    height, width : the slide's size, px
    border_margin : ``FilterSettings.border_margin`` (working px): the edge weights are
        recomputed for the slide, whose edges are the only ones a kept cell can touch
    seen : the slide's kept boxes so far (slide px, one array per window, appended to),
        shared by its windows in the order they are read. A cell is found by each window
        that holds it with a box some px apart (another context, another working-px
        grid), so its box centre can fall on either side of a cut in either window: it
        was kept twice, or by neither. With ``seen`` a kept row is also the window's when
        its centre lies within half the core's margin beyond the core (there it is still
        whole for a cell narrower than half the overlap), unless its box matches one
        kept before (IoU >= :data:`SAME_CELL_IOU`). None: the core alone decides.

    Returns
    -------
    ImageCells
        The rows (kept or not) whose box centre lies in the window's core, with
        ``x0 .. y1`` and ``crop_x0``, ``crop_y0`` in slide px, ``mask_label`` renumbered
        over the kept rows left, ``window_x0`` / ``window_y0`` naming the window (its
        mask file's frame is the window's), and the crops, kept masks and example
        rejects of those rows. ``image`` and ``detections`` stay the window's.
    """
    t = cells.table
    cx = (t["x0"].to_numpy(float) + t["x1"].to_numpy(float)) / 2 + win.x0
    cy = (t["y0"].to_numpy(float) + t["y1"].to_numpy(float)) / 2 + win.y0
    own = (cx >= win.cx0) & (cx < win.cx1) & (cy >= win.cy0) & (cy < win.cy1)
    kept = t["kept"].to_numpy(bool)
    if seen is not None:
        boxes = t[["x0", "y0", "x1", "y1"]].to_numpy(float) + [win.x0, win.y0] * 2
        gx0 = win.cx0 - (win.cx0 - win.x0) // 2
        gy0 = win.cy0 - (win.cy0 - win.y0) // 2
        gx1 = win.cx1 + (win.x1 - win.cx1) // 2
        gy1 = win.cy1 + (win.y1 - win.cy1) // 2
        near = kept & (cx >= gx0) & (cx < gx1) & (cy >= gy0) & (cy < gy1)
        own = (own | near) & ~(near & _seen_before(boxes, seen, win))
        seen.append(boxes[own & kept])
    crop_keep = own[kept]  # the crops are the kept rows, in order
    t = t[own].copy()
    for c in ("x0", "x1", "crop_x0"):
        if c in t:
            t[c] = t[c] + win.x0
    for c in ("y0", "y1", "crop_y0"):
        if c in t:
            t[c] = t[c] + win.y0
    k_own = t["kept"].to_numpy(bool)
    t["mask_label"] = 0
    t.loc[k_own, "mask_label"] = np.arange(1, int(k_own.sum()) + 1)
    t["window_x0"] = win.x0
    t["window_y0"] = win.y0
    if EDGE_WEIGHT in t and len(t):
        # the window's edges inside the slide cut no owned cell: only the slide's count,
        # from the masks' pixel extents (what the border filter reads), working px
        s = float(cells.scale)
        ext = _extents(cells, np.nonzero(own)[0]) + np.array([win.x0, win.y0] * 2) * s
        t[EDGE_WEIGHT] = edge_weights(ext, round(height * s), round(width * s), border_margin)
    c = cells.crops
    crops = Crops(
        c.images[crop_keep],
        c.masks[crop_keep],
        np.asarray(c.scale)[crop_keep],
        np.asarray(c.centers)[crop_keep] + [win.x0, win.y0],
        None if c.windows is None else c.windows[crop_keep] + [win.x0, win.y0, 0],
    )
    kept_det = None if cells.kept is None else cells.kept.select(np.nonzero(crop_keep)[0])
    ids = set(t["cell_id"])
    rej = [i for i, r in enumerate(cells.reject_ids) if r in ids]
    rej_crops = None
    if cells.reject_crops is not None and rej:
        rej_crops = cells.reject_crops[rej]
    return replace(
        cells,
        table=t.reset_index(drop=True),
        crops=crops,
        kept=kept_det,
        reject_crops=rej_crops,
        reject_ids=[cells.reject_ids[i] for i in rej],
    )


# box IoU from which two windows' kept detections are one cell: the tiles' merge within
# a window (segmentation.merge_iou, 0.5); kept cells of one window overlap far less (the
# overlapping / duplicate filters)
SAME_CELL_IOU = 0.5


def _seen_before(boxes: np.ndarray, seen: list[np.ndarray], win: Window) -> np.ndarray:
    """Whether each box (slide px) matches a box kept by an earlier window."""
    if not len(boxes) or not seen:
        return np.zeros(len(boxes), bool)
    old = np.concatenate(seen).reshape(-1, 4)
    old = old[(old[:, 2] > win.x0) & (old[:, 0] < win.x1)]
    old = old[(old[:, 3] > win.y0) & (old[:, 1] < win.y1)]
    if not len(old):
        return np.zeros(len(boxes), bool)
    from segmentation.engine import box_iou

    return (box_iou(boxes, old) >= SAME_CELL_IOU).any(axis=1)


def _extents(cells: ImageCells, rows: np.ndarray) -> np.ndarray:
    """(n, 4) float pixel extents x_min, y_min, x_max, y_max (inclusive) of the masks of
    detections ``rows``, working px of the window (a mask with no pixel: its box)."""
    det = cells.detections
    out = np.asarray(det.boxes, np.float64)[rows].reshape(-1, 4).copy()
    for i, k in enumerate(rows):
        ys, xs = np.nonzero(det.masks[k])
        if len(xs):
            ox, oy = det.origins[k]
            out[i] = (ox + xs.min(), oy + ys.min(), ox + xs.max(), oy + ys.max())
    return out


# (image index, path, window or None): what a stage reads and segments, one at a time
Unit = tuple[int, Path, "Window | None"]


def slide_units(
    items: Sequence[tuple[int, Path]], megapixels: float, side: int, overlap: int
) -> list[Unit]:
    """The images of ``items`` (index, path), each TIFF over ``megapixels`` (level 0 of
    the series read) expanded into its windows (:func:`slide_windows`, ``side`` and
    ``overlap`` px); every other image stays whole (window None)."""
    out: list[Unit] = []
    for index, path in items:
        hw = slide_size(path, megapixels)
        if hw is None:
            out.append((index, path, None))
        else:
            out.extend((index, path, w) for w in slide_windows(hw[0], hw[1], side, overlap))
    return out


def slide_size(path: Path, megapixels: float) -> tuple[int, int] | None:
    """(height, width) px of ``path`` when it is read window by window (a TIFF over
    ``megapixels``, level 0 of the series read), else None: it is read whole."""
    from segmentation.io import tiff_size

    hw = tiff_size(path)
    return hw if hw is not None and hw[0] * hw[1] > megapixels * 1e6 else None


def is_slide(path: Path, megapixels: float) -> bool:
    """Whether :func:`slide_units` reads ``path`` window by window, never whole."""
    return slide_size(path, megapixels) is not None


def unit_groups(units: Sequence[Unit], size: int) -> Iterator[list[Unit]]:
    """Consecutive whole images up to ``size`` at a time (their tiles share detector
    batches); a slide's window always alone (it is already many tiles)."""
    cur: list[Unit] = []
    for u in units:
        if u[2] is not None or len(cur) >= size:
            if cur:
                yield cur
            cur = []
        if u[2] is not None:
            yield [u]
        else:
            cur.append(u)
    if cur:
        yield cur


def window_prefix(path: Path, win: Window | None) -> str | None:
    """Cell-id prefix of a window's cells (``<stem>_x<x0>_y<y0>``: ids stay unique over
    the slide); None for a whole image (its stem, the default)."""
    return None if win is None else f"{path.stem}_{win.name}"


def window_file(name: str, win: Window, suffix: str) -> str:
    """A window's own file beside its slide's (``<stem>_x<x0>_y<y0><suffix>``, e.g. its
    overlay PNG and its masks TIFF, whose frame is the window's)."""
    return f"{Path(name).stem}_{win.name}{suffix}"


# cells a window's ruler must rest on to set its slide's one scale (review: a first window
# with 3 white cells gave 0.198 where the slide read whole gave 0.181 from 18); a window
# with fewer is read at its own estimate and the next one is measured
SLIDE_RULER_CELLS = 10


def window_cells(
    detector: Any,
    image: np.ndarray,
    name: str,
    prefix: str,
    settings: SegmentSettings,
    scale: float | None,
    measure: Callable[[], tuple[ImageCells, Any]],
) -> tuple[ImageCells, float | None]:
    """One window's cells at its slide's one magnification.

    ``scale``: the slide's scale once a window measured it; then the window is read at it
    (one detector pass). None: ``measure()`` (:func:`segmentation.autoscale.
    segment_estimated` of the window, returning ``(cells, ScaleChoice)``) reads it, and
    its scale becomes the slide's when its ruler rests on at least
    :data:`SLIDE_RULER_CELLS` cells. Measuring
    every window cost two passes each and gave one slide scales 8 % apart (0.273-0.305
    on the 400 MP test slide).

    Returns
    -------
    (cells with an ``input_scale`` column, the slide's scale or None)
    """
    if scale is not None:
        cells = segment_images(
            detector, [image], [name], replace(settings, input_scale=scale), id_prefixes=[prefix]
        )[0]
    else:
        cells, choice = measure()
        if choice.estimate.ok and choice.estimate.n_cells >= SLIDE_RULER_CELLS:
            scale = float(choice.scale)
    if "input_scale" not in cells.table:
        cells.table.insert(2, "input_scale", float(cells.scale))
    return cells, scale
