"""Training augmentation (albumentations), applied consistently to image, boxes and masks.

Geometric transforms (flips, 90-degree rotations, rescaling, random crops)
move image, masks and boxes together. After them, the box of every instance
that has a real mask is recomputed from its transformed mask, so box and mask
always agree exactly; box-only instances keep the transformed box and their
"unknown" mask stays unknown. Photometric transforms (colour / stain jitter,
blur, noise) touch the image only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import numpy as np

from segmentation.datasets import MASK_UNKNOWN, Sample, mask_bbox


@dataclass
class AugmentOptions:
    """What :func:`build_train_transform` does (all in the loaded, scaled frame).

    Attributes
    ----------
    flips
        Horizontal and vertical flips (p = 0.5 each).
    rot90
        Random multiples of 90 degrees.
    scale_range
        ``(lo, hi)`` random rescale factor (image size changes); ``(1, 1)`` = off.
    crop_size
        Random square crop of this many px (padded when the image is smaller);
        0 = whole image. Speeds up training on large smears.
    border_crop
        Up to this fraction of the width / height cut from each side, independently
        (no resize), on half of the images; 0 = off. Cells at the new edge are cut and
        keep their (cut) boxes (a masked cell while >= ``min_area`` px of it are left, a
        box-only cell while >= 1/4 of its box is), as annotators box cut cells: without
        it a detector trained on whole fields rarely sees a cut cell (TXL-PBC train: 8
        of 358 Raabin boxes) and gives such slivers no box at all.
    cut_cell
        Probability that a field is cropped (before every other transform, no resize) so
        that its new edge runs through one of its white cells, chosen at random, leaving
        a fraction in ``cut_keep`` of that cell's box width (or height) inside; 0 = off.
        :attr:`border_crop` cuts at random places, so on fields centred on one cell
        (Raabin's) it seldom reaches a cell; this makes the slivers annotators box at the
        edge of such fields (TXL-PBC val: 0.14-0.67 of a whole cell's side).
    cut_keep
        ``(lo, hi)`` fraction of the chosen cell's box left inside the field.
    color_jitter
        Strength of brightness/contrast/saturation jitter (hue gets a quarter).
    stain_jitter
        Probability of a haematoxylin/eosin-like stain perturbation.
    blur_p, noise_p
        Probabilities of a Gaussian blur and of Gaussian noise.
    min_area
        Instances with fewer px than this after the transform are dropped.
    """

    flips: bool = True
    rot90: bool = True
    scale_range: tuple[float, float] = (0.8, 1.25)
    crop_size: int = 0
    border_crop: float = 0.0
    cut_cell: float = 0.0
    cut_keep: tuple[float, float] = (0.1, 0.7)
    color_jitter: float = 0.2
    stain_jitter: float = 0.2
    blur_p: float = 0.2
    noise_p: float = 0.2
    min_area: float = 16.0


# the least of the field's width (or height) that a cut through a cell leaves: a field
# centred on one large cell (Raabin: the cell spans ~0.47 of the width) has no cut that
# keeps half of it, and a quarter is still several cells wide on every TXL-PBC source
CUT_MIN_FIELD = 0.25


def cut_through_cell(
    s: Sample,
    rng: np.random.Generator,
    keep: tuple[float, float] = (0.1, 0.7),
    min_field: float = CUT_MIN_FIELD,
) -> Sample:
    """Crop ``s`` so that the new field edge runs through one of its cells.

    Parameters
    ----------
    s
        Sample in the loaded frame: image (H, W, 3), boxes (N, 4) xyxy px, masks (N, H, W).
    rng
        Picks the cell, the kept fraction ``U(keep)`` of its box and the side cut.
    keep
        Fraction of the chosen cell's box width (left/right cut) or height (top/bottom)
        left inside the field.
    min_field
        A cut is only made where it leaves at least this fraction of the field's width
        (or height) and 32 px; when no side allows it the sample is returned unchanged.

    Returns
    -------
    Sample
        The cropped sample (no resize). Boxes are shifted and clipped to the new field;
        instances left with no width or height are dropped (a masked instance's box is
        recomputed from its cut mask by :class:`Augment` afterwards).
    """
    n = len(s.boxes)
    if n == 0:
        return s
    h, w = s.image.shape[:2]
    i = int(rng.integers(n))
    x0, y0, x1, y1 = (float(v) for v in s.boxes[i])
    v = float(rng.uniform(*keep))
    # candidate windows (cx0, cy0, cx1, cy1): the field minus the side beyond the cut
    cands = []
    for lo, hi, size, axis in ((x0, x1, w, 0), (y0, y1, h, 1)):
        need = max(32.0, min_field * size)
        e = hi - v * (hi - lo)  # cut from the low side: the cell's far part stays
        if size - e >= need and e > 0:
            cands.append((int(round(e)), 0, w, h) if axis == 0 else (0, int(round(e)), w, h))
        e = lo + v * (hi - lo)  # cut from the high side: the cell's near part stays
        if e >= need and e < size:
            cands.append((0, 0, int(round(e)), h) if axis == 0 else (0, 0, w, int(round(e))))
    if not cands:
        return s
    cx0, cy0, cx1, cy1 = cands[int(rng.integers(len(cands)))]
    b = s.boxes.astype(np.float32) - np.array([cx0, cy0, cx0, cy0], np.float32)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, cx1 - cx0)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, cy1 - cy0)
    ok = (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)
    return Sample(
        image=np.ascontiguousarray(s.image[cy0:cy1, cx0:cx1]),
        boxes=b[ok].reshape(-1, 4),
        masks=np.ascontiguousarray(s.masks[ok][:, cy0:cy1, cx0:cx1]),
        has_mask=np.asarray(s.has_mask)[ok],
    )


class Augment:
    """``fn(sample, seed) -> sample`` around an albumentations pipeline.

    ``cut_cell`` > 0: with that probability the sample is first cut through one of its
    cells (:func:`cut_through_cell`, drawn from ``seed`` so that resume stays exact).
    """

    def __init__(
        self,
        compose: A.Compose,
        min_area: float = 16.0,
        cut_cell: float = 0.0,
        cut_keep: tuple[float, float] = (0.1, 0.7),
    ):
        self.compose = compose
        self.min_area = min_area
        self.cut_cell = float(cut_cell)
        self.cut_keep = (float(cut_keep[0]), float(cut_keep[1]))

    def __call__(self, s: Sample, seed: int) -> Sample:
        if self.cut_cell > 0:
            # its own stream, so that turning it on does not move albumentations' draws
            rng = np.random.default_rng([int(seed), 0xC07])
            if rng.random() < self.cut_cell:
                s = cut_through_cell(s, rng, self.cut_keep)
        self.compose.set_random_seed(int(seed))
        n = len(s.boxes)
        kw = {"image": s.image, "bboxes": s.boxes.reshape(n, 4), "idx": np.arange(n)}
        if n:
            kw["masks"] = s.masks
        out = self.compose(**kw)
        img = out["image"]
        h, w = img.shape[:2]
        masks_t = np.asarray(out["masks"]) if n else np.zeros((0, h, w), np.uint8)
        box_of = {int(i): b for i, b in zip(out["idx"], out["bboxes"])}
        boxes, masks, has = [], [], []
        for i in range(n):
            if s.has_mask[i]:
                m = masks_t[i] == 1
                bb = mask_bbox(m)
                if bb is None or m.sum() < self.min_area:
                    continue
                boxes.append(bb)
                masks.append(m.astype(np.uint8))
                has.append(True)
            else:
                if i not in box_of:
                    continue
                x0, y0, x1, y1 = (float(v) for v in box_of[i])
                if (x1 - x0) * (y1 - y0) < self.min_area or x1 - x0 < 1 or y1 - y0 < 1:
                    continue
                boxes.append((x0, y0, x1, y1))
                masks.append(np.full((h, w), MASK_UNKNOWN, np.uint8))
                has.append(False)
        return Sample(
            image=img,
            boxes=np.array(boxes, np.float32).reshape(-1, 4),
            masks=np.stack(masks) if masks else np.zeros((0, h, w), np.uint8),
            has_mask=np.array(has, bool),
        )


def build_train_transform(opt: AugmentOptions) -> Augment:
    """Albumentations pipeline for training (see :class:`AugmentOptions`)."""
    t: list[A.BasicTransform] = []
    if opt.flips:
        t += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if opt.rot90:
        t.append(A.RandomRotate90(p=1.0))
    lo, hi = opt.scale_range
    if lo != 1.0 or hi != 1.0:
        # RandomScale's limit is relative to 1 and the factor is 1 + U(limit)
        t.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0))
    if opt.border_crop > 0:
        f = float(opt.border_crop)
        t.append(
            A.RandomCropFromBorders(crop_left=f, crop_right=f, crop_top=f, crop_bottom=f, p=0.5)
        )
    if opt.crop_size:
        c = int(opt.crop_size)
        t += [
            A.PadIfNeeded(min_height=c, min_width=c, border_mode=0, fill=0, fill_mask=0),
            A.RandomCrop(height=c, width=c),
        ]
    if opt.color_jitter > 0:
        j = opt.color_jitter
        t.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4), p=0.8))
    if opt.stain_jitter > 0:
        t.append(A.HEStain(method="random_preset", p=opt.stain_jitter))
    if opt.blur_p > 0:
        t.append(A.GaussianBlur(blur_limit=(3, 5), p=opt.blur_p))
    if opt.noise_p > 0:
        t.append(A.GaussNoise(std_range=(0.01, 0.05), p=opt.noise_p))
    compose = A.Compose(
        t,
        bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["idx"], min_visibility=0.25, clip=True
        ),
    )
    return Augment(compose, opt.min_area, cut_cell=opt.cut_cell, cut_keep=opt.cut_keep)


def boxes_match_masks(boxes: np.ndarray, masks: np.ndarray, has_mask: Sequence[bool]) -> bool:
    """True when every box with a real mask equals the bbox of that mask."""
    for b, m, h in zip(boxes, masks, has_mask):
        if h and not np.allclose(b, mask_bbox(m == 1)):
            return False
    return True
