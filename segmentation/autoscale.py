"""Segment one smear at its own magnification: the image ruler, then the detector's boxes.

:func:`segment_estimated` is what ``stage=segment``, ``stage=embed`` and
:func:`vae.inputs.query.segment_smear_folder` run per image when the scale is
estimated (``segmentation.estimate_scale``): the ruler of
:func:`segmentation.magnification.estimate_scale` gives ``s0``; with ``refine``
the detector's own confident white boxes then correct it
(:func:`segmentation.magnification.refine_scale`). :func:`pooled_estimates`
measures the images of one folder and one pixel size (one microscope) together and
holds each estimate near their median.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from segmentation.cells import ImageCells, ImageTruth, SegmentSettings, segment_images
from segmentation.inference import Detector
from segmentation.magnification import (
    RefineSettings,
    ScaleEstimate,
    ScaleRefinement,
    estimate_scale,
    hold_to_pool,
    pool_scales,
    refine_scale,
)
from segmentation.schema import CELL_DIAMETER, MIXED_QUARTILE_RATIO, SCALE_SPREAD

log = logging.getLogger(__name__)


def pool_key(path: str | Path, size: tuple[int, int]) -> tuple[str, int, int]:
    """The group an image's scale is pooled in: its folder and its (width, height) in px.

    Images of one folder with one pixel size are taken as one microscope at one
    magnification (a camera or objective change shows as another image size or is
    put in another folder, e.g. one sub-folder per sample).
    """
    return (str(Path(path).parent), int(size[0]), int(size[1]))


def hold_estimates(
    estimates: list[ScaleEstimate], keys: Sequence, spread: float = SCALE_SPREAD
) -> list[ScaleEstimate]:
    """Each estimate held within ``spread`` of the median of the estimates of its group.

    Parameters
    ----------
    estimates : per-image :func:`estimate_scale` results
    keys : the group of each (:func:`pool_key`), same length
    spread : :func:`segmentation.magnification.hold_to_pool`'s

    Returns
    -------
    list of ScaleEstimate in the same order; an image alone in its group, or in a
    group where no image measured a cell, keeps its own estimate.
    """
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out = list(estimates)
    for members in groups.values():
        if len(members) < 2:
            continue
        pooled = pool_scales([estimates[i] for i in members])
        if pooled is None:
            continue
        for i in members:
            out[i] = hold_to_pool(estimates[i], pooled, spread)
    return out


def folder_medians(estimates: dict) -> dict[Path, float]:
    """Folder -> median of its images' own scale estimates (measured ones only), from
    :func:`pooled_estimates`' result: the scale of a second pass for a crop whose own
    scale finds no cell at its centre (:func:`segmentation.sources.centre_cell`)."""
    per: dict[Path, list[float]] = {}
    for path, e in estimates.items():
        if e.ok:
            own = e.own_scale if np.isfinite(e.own_scale) else e.scale
            per.setdefault(Path(path).parent, []).append(float(own))
    return {k: float(np.median(v)) for k, v in per.items() if v}


def pooled_estimates(
    paths: Sequence[str | Path],
    cell_px: float,
    fallback: float,
    spread: float = SCALE_SPREAD,
) -> dict[Path, ScaleEstimate]:
    """Every image's scale estimate, held to the median of its folder and image size.

    Parameters
    ----------
    paths : image files
    cell_px : wanted white-cell box side in working px
    fallback : :func:`estimate_scale`'s ``fallback`` (an image where nothing is measured)
    spread : how far an estimate may lie from its group's median (:func:`hold_estimates`)

    Returns
    -------
    path -> :class:`ScaleEstimate`. Each image is measured once (what the per-image
    estimate costs anyway), so the images are read one more time, nothing more.
    Unreadable images are absent (rejected, with the reason, where they are segmented).
    """
    from segmentation.io import read_rgb

    ok_paths, keys, ests = [], [], []
    for p in map(Path, paths):
        rd = read_rgb(p)
        if not rd.ok:
            continue
        h, w = rd.image.shape[:2]
        ok_paths.append(p)
        keys.append(pool_key(p, (w, h)))
        ests.append(estimate_scale(rd.image, cell_px, fallback=fallback))
    held = hold_estimates(ests, keys, spread)
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    for key, members in groups.items():
        own = [ests[i].scale for i in members if ests[i].ok]
        if len(own) >= 8:
            q25, q75 = np.percentile(own, [25, 75])
            if q75 / q25 > MIXED_QUARTILE_RATIO:
                log.warning(
                    "scale: the estimates of the %d images of %s %dx%d spread %.2fx between "
                    "their quartiles (one microscope: 1.1-1.4x): the folder may mix "
                    "magnifications; put each in a folder of its own or set "
                    "segmentation.scale_spread=null",
                    len(own),
                    *key,
                    q75 / q25,
                )
        if np.isfinite(held[members[0]].group_scale):
            log.info(
                "scale: %d images of %s %dx%d, median estimate %.4g; each held within %.3gx",
                len(members),
                *key,
                held[members[0]].group_scale,
                spread,
            )
    return dict(zip(ok_paths, held))


@dataclass
class ScaleChoice:
    """How one image's scale was found.

    estimate : the image ruler's result (``estimate.scale`` = s0)
    refinement : what the detector pass(es) did (None without ``refine``)
    scale : the working scale of the kept cells (working px per source px)
    """

    estimate: ScaleEstimate
    refinement: ScaleRefinement | None
    scale: float

    def describe(self) -> str:
        """One log line: ruler, s0, the detector's s1 and the scale used."""
        e, r = self.estimate, self.refinement
        size = e.white_px if e.ruler == "white" else e.diameter_px
        ruler = f"{e.ruler} ruler {size:.1f} px ({e.n_cells} cells)" if e.ok else "no ruler"
        if e.ok and e.ruler == "red" and np.isfinite(e.white_px):
            ruler += f" (white ruler {e.white_px:.1f} px: smaller than a red cell, not used)"
        if e.ruler == "pooled":  # nothing measured on this image: its microscope's median
            ruler = "no ruler of its own"
        if np.isfinite(e.group_scale):  # held to its microscope's median (hold_to_pool)
            held = e.ruler != "pooled" and e.scale != e.own_scale
            ruler += f", median of {e.n_images} images {e.group_scale:.4g}"
            ruler += f", own {e.own_scale:.4g} held" if held else ""
        if r is None:
            return f"{ruler}: s0 {e.scale:.4g} used"
        s1 = f"{r.s1:.4g} ({r.n_boxes} boxes)" if np.isfinite(r.s1) else "none (no confident box)"
        used = f"used {r.scale:.4g}"
        if r.scale != r.measured:  # a probe pass was more confident (RefineSettings.probe)
            used += f" (probe; measured {r.measured:.4g})"
        return f"{ruler}: s0 {e.scale:.4g}, detector s1 {s1}, {used}"


def segment_estimated(
    detector: Detector,
    image: np.ndarray,
    name: str,
    settings: SegmentSettings,
    cell_px: float,
    truth: ImageTruth | None = None,
    id_prefix: str | None = None,
    refine: RefineSettings | None = None,
    estimate: ScaleEstimate | None = None,
) -> tuple[ImageCells, ScaleChoice]:
    """:func:`segment_images` of one image at the scale measured from the image.

    Parameters
    ----------
    detector, settings, truth, id_prefix : as for :func:`segment_images`
        (``settings.input_scale`` is the fallback when the image shows no cell to
        measure)
    image : (H, W, 3) uint8 RGB
    name : image name (table, ids)
    cell_px : wanted white-cell box side in working px
    refine : None: the ruler's scale; else the detector's boxes refine it
        (:func:`segmentation.magnification.refine_scale` with these thresholds)
    estimate : the scale estimate when already measured (e.g. pooled over the
        image's folder by :func:`pooled_estimates`); None: this image's own

    Returns
    -------
    (ImageCells of the kept pass, ScaleChoice)
    """
    est = estimate or estimate_scale(image, cell_px, fallback=settings.input_scale)

    def detect(s: float):
        cells = segment_images(
            detector,
            [image],
            [name],
            replace(settings, input_scale=float(s)),
            truths=[truth],
            id_prefixes=[id_prefix],
        )[0]
        t = cells.table
        return cells, t[["x0", "y0", "x1", "y1"]].to_numpy(float), t["score"].to_numpy(float)

    if refine is None:
        cells = detect(est.scale)[0]
        _size_by_ruler(cells, est, float(est.scale), own_ruler=est.ruler == "red")
        return cells, ScaleChoice(est, None, float(est.scale))
    cells, r = refine_scale(detect, est.scale, image.shape[:2], cell_px, refine)
    _size_by_ruler(cells, est, float(r.scale), own_ruler=False)
    return cells, ScaleChoice(est, r, float(r.scale))


def _size_by_ruler(cells: ImageCells, est: ScaleEstimate, used: float, own_ruler: bool) -> None:
    """The cells' diameters on a frame that does not depend on this image's white cells.

    A scale measured on the image's own white cells (the white ruler, the detector's
    boxes) makes them ~``cell_px`` whatever their true size, so the diameter a model
    reads would echo the ruler. With its microscope's median scale
    (``est.group_scale``, :func:`hold_estimates`) each cell is measured against the
    typical white cell of all that microscope's images, as a fixed per-source scale
    does; an image measured by its red cells alone (``own_ruler``) keeps its scale;
    otherwise (one image, a fallback guess) the size is unknown (NaN).
    """
    if CELL_DIAMETER not in cells.table:
        return
    g = float(est.group_scale)
    if np.isfinite(g) and g > 0:
        cells.table[CELL_DIAMETER] = cells.table[CELL_DIAMETER] * (g / used)
    elif not own_ruler:
        cells.table[CELL_DIAMETER] = np.nan
