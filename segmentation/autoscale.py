"""Segment one smear at its own magnification: the image ruler, then the detector's boxes.

:func:`segment_estimated` is what ``stage=segment``, ``stage=embed`` and
:func:`vae.inputs.query.segment_smear_folder` run per image when the scale is
estimated (``segmentation.estimate_scale``): the ruler of
:func:`segmentation.magnification.estimate_scale` gives ``s0``; with ``refine``
the detector's own confident white boxes then correct it
(:func:`segmentation.magnification.refine_scale`). :func:`pooled_estimates`
measures the images of one folder and one pixel size (one microscope) together,
so each gets their median as ``s0``.
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
    pool_scales,
    refine_scale,
)

log = logging.getLogger(__name__)

# images measured per pooled group: all of them (None). Each image is measured once,
# as the per-image estimate did, so pooling costs one more read of the file, not more
# measuring; a cap (e.g. 64, evenly spaced) bounds the time on folders of thousands of
# fields. On TXL-PBC val: all images 0.955 box AP50, a cap of 64 0.947
# (docs/segmentation_infer.md, "One scale per microscope").
POOL_MAX_IMAGES: int | None = None


def pool_key(path: str | Path, size: tuple[int, int]) -> tuple[str, int, int]:
    """The group an image's scale is pooled in: its folder and its (width, height) in px.

    Images of one folder with one pixel size are taken as one microscope at one
    magnification (a camera or objective change shows as another image size or is
    put in another folder, e.g. one sub-folder per sample).
    """
    return (str(Path(path).parent), int(size[0]), int(size[1]))


def pool_sample(n: int, max_images: int | None = POOL_MAX_IMAGES) -> np.ndarray:
    """Indices of the images of a group of ``n`` (in name order) that are measured: all,
    or ``max_images`` evenly spaced."""
    if max_images is None or n <= max_images:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_images).round().astype(int))


def pooled_estimates(
    paths: Sequence[str | Path],
    cell_px: float,
    fallback: float,
    max_images: int | None = POOL_MAX_IMAGES,
) -> dict[Path, ScaleEstimate]:
    """One scale estimate per folder and image size, shared by its images.

    Parameters
    ----------
    paths : image files
    cell_px : wanted white-cell box side in working px
    fallback : :func:`estimate_scale`'s ``fallback`` (unused by a pooled result)
    max_images : None: every image of a group is measured; else at most this many,
        evenly spaced in name order

    Returns
    -------
    path -> the pooled :class:`ScaleEstimate` (``ruler="pooled"``) of its group
    (:func:`segmentation.magnification.pool_scales`). Images that cannot be read,
    and groups where no image showed a cell to measure, are absent: each such image
    is measured on its own (and an unreadable one rejected) where it is segmented.
    """
    from PIL import Image

    from segmentation.io import read_rgb

    groups: dict[tuple[str, int, int], list[Path]] = {}
    for p in map(Path, paths):
        try:
            with Image.open(p) as im:
                size = im.size
        except Exception:  # noqa: BLE001 - read_rgb rejects it later, with the reason
            continue
        groups.setdefault(pool_key(p, size), []).append(p)
    out: dict[Path, ScaleEstimate] = {}
    for key, members in groups.items():
        members = sorted(members)
        ests = []
        for i in pool_sample(len(members), max_images):
            rd = read_rgb(members[i])
            if rd.ok:
                ests.append(estimate_scale(rd.image, cell_px, fallback=fallback))
        pooled = pool_scales(ests)
        if pooled is None:
            log.warning("scale: no cell measured on %d images of %s %dx%d", len(ests), *key)
            continue
        log.info(
            "scale pooled over %d of %d images of %s %dx%d: %.4g",
            pooled.n_images,
            len(members),
            *key,
            pooled.scale,
        )
        out.update({p: pooled for p in members})
    return out


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
        if e.ruler == "pooled":
            ruler = f"pooled ruler over {e.n_images} images ({e.n_cells} cells)"
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
        return cells, ScaleChoice(est, None, float(est.scale))
    cells, r = refine_scale(detect, est.scale, image.shape[:2], cell_px, refine)
    return cells, ScaleChoice(est, r, float(r.scale))
