"""Classical pseudo-masks of white cells inside annotated boxes (scikit-image).

Real full-field smear sets have WBC boxes but no masks. A white cell fills its
(tight) box and is darker / more violet than the plasma and the pink red
cells around it, so inside each box:

1. stain colour: the Lab colour distance from the background (median colour
   of the box corners, outside the inscribed ellipse) plus the haematoxylin
   density (``rgb2hed``) give a "WBC-ness" image, thresholded with Otsu;
2. markers: above-threshold px in the inner 70 % ellipse are sure cell;
   below-threshold px outside it, and px outside the box ellipse, sure background;
3. a watershed on the gradient of that image places the boundary between them;
4. the result is cleaned (largest piece, holes filled) and kept only if it
   is plausible against the inscribed ellipse of the box; otherwise the
   ellipse itself is the pseudo-mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed, rgb2lab
from skimage.filters import sobel, threshold_otsu
from skimage.measure import label
from skimage.segmentation import watershed


@dataclass
class PseudoMaskStats:
    """How the masks of one call were made: ``watershed`` or ``ellipse`` fallback counts."""

    watershed: int = 0
    ellipse: int = 0


def ellipse_in_box(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    """(H, W) bool: the ellipse inscribed in ``box`` = (x0, y0, x1, y1)."""
    h, w = shape
    x0, y0, x1, y1 = (float(v) for v in box)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = (x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5
    rx, ry = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def pseudo_mask_in_box(
    image: np.ndarray, box: np.ndarray, method: str = "watershed"
) -> tuple[np.ndarray, str]:
    """Pseudo-mask of the cell in ``box``.

    Parameters
    ----------
    image
        (H, W, 3) uint8 RGB smear.
    box
        (4,) ``x0, y0, x1, y1`` px (tight box of one white cell).
    method
        ``watershed`` (with ellipse fallback) or ``ellipse``.

    Returns
    -------
    (mask, how)
        (H, W) bool mask and ``"watershed"`` or ``"ellipse"``.
    """
    h, w = image.shape[:2]
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    full = np.zeros((h, w), bool)
    if x1 - x0 < 4 or y1 - y0 < 4:
        full[y0:y1, x0:x1] = True
        return full, "ellipse"
    ell = ellipse_in_box((y1 - y0, x1 - x0), np.array([0, 0, x1 - x0, y1 - y0]))
    if method == "ellipse":
        full[y0:y1, x0:x1] = ell
        return full, "ellipse"
    crop = image[y0:y1, x0:x1].astype(np.float64) / 255.0
    ch, cw = crop.shape[:2]
    lab = rgb2lab(crop)
    # plasma / red-cell colour from the box corners (outside the inscribed ellipse)
    corners = ~ell
    bg = np.median(lab[corners], axis=0) if corners.sum() >= 8 else np.median(lab, axis=(0, 1))
    # (h, w) colour distance from the background, plus violet stain density
    feat = _unit(np.linalg.norm(lab - bg, axis=2)) + 0.5 * _unit(rgb2hed(crop)[..., 0])
    try:
        t = threshold_otsu(feat)
    except ValueError:
        t = feat.mean()
    cand = feat > t
    inner = ellipse_in_box(
        (ch, cw), np.array([0.15 * cw, 0.15 * ch, 0.85 * cw, 0.85 * ch])
    )  # ellipse at 70 % of the radii
    outer = ellipse_in_box((ch, cw), np.array([-0.05 * cw, -0.05 * ch, 1.05 * cw, 1.05 * ch]))
    markers = np.zeros((ch, cw), np.int32)
    markers[(~cand & ~inner) | ~outer] = 1
    markers[cand & inner] = 2
    if (markers == 2).sum() < 4 or (markers == 1).sum() < 4:
        full[y0:y1, x0:x1] = ell
        return full, "ellipse"
    ws = watershed(sobel(feat), markers) == 2
    ws = ndi.binary_fill_holes(ws)
    lab = label(ws)
    if lab.max() > 1:
        ws = lab == (np.bincount(lab.ravel())[1:].argmax() + 1)
    area, ea = ws.sum(), ell.sum()
    inside = (ws & ell).sum() / max(1, area)
    # plausible: covers most of the ellipse and does not leak far outside it
    if area < 0.6 * ea or area > 1.3 * ea or inside < 0.85:
        full[y0:y1, x0:x1] = ell
        return full, "ellipse"
    full[y0:y1, x0:x1] = ws
    return full, "watershed"


def _unit(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)


def pseudo_masks(image: np.ndarray, boxes: np.ndarray, method: str = "watershed") -> np.ndarray:
    """(N, H, W) bool pseudo-masks, one per box (see :func:`pseudo_mask_in_box`)."""
    h, w = image.shape[:2]
    out = np.zeros((len(boxes), h, w), bool)
    for i, b in enumerate(boxes):
        out[i], _ = pseudo_mask_in_box(image, b, method)
    return out


class PseudoMasker:
    """Callable ``(image, boxes) -> (N, H, W) bool`` with counts of how masks were made."""

    def __init__(self, method: str = "watershed"):
        if method not in ("watershed", "ellipse"):
            raise ValueError(f"pseudo-mask method={method!r}; valid: watershed, ellipse")
        self.method = method
        self.stats = PseudoMaskStats()

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        out = np.zeros((len(boxes), h, w), bool)
        for i, b in enumerate(boxes):
            out[i], how = pseudo_mask_in_box(image, b, self.method)
            setattr(self.stats, how, getattr(self.stats, how) + 1)
        return out
