"""Segment one smear at its own magnification: the image ruler, then the detector's boxes.

:func:`segment_estimated` is what ``stage=segment``, ``stage=embed`` and
:func:`vae.inputs.query.segment_smear_folder` run per image when the scale is
estimated (``segmentation.estimate_scale``): the ruler of
:func:`segmentation.magnification.estimate_scale` gives ``s0``; with ``refine``
the detector's own confident white boxes then correct it
(:func:`segmentation.magnification.refine_scale`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from segmentation.cells import ImageCells, ImageTruth, SegmentSettings, segment_images
from segmentation.inference import Detector
from segmentation.magnification import (
    RefineSettings,
    ScaleEstimate,
    ScaleRefinement,
    estimate_scale,
    refine_scale,
)

log = logging.getLogger(__name__)


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

    Returns
    -------
    (ImageCells of the kept pass, ScaleChoice)
    """
    est = estimate_scale(image, cell_px, fallback=settings.input_scale)

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
