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
    color_jitter: float = 0.2
    stain_jitter: float = 0.2
    blur_p: float = 0.2
    noise_p: float = 0.2
    min_area: float = 16.0


class Augment:
    """``fn(sample, seed) -> sample`` around an albumentations pipeline."""

    def __init__(self, compose: A.Compose, min_area: float = 16.0):
        self.compose = compose
        self.min_area = min_area

    def __call__(self, s: Sample, seed: int) -> Sample:
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
    return Augment(compose, opt.min_area)


def boxes_match_masks(boxes: np.ndarray, masks: np.ndarray, has_mask: Sequence[bool]) -> bool:
    """True when every box with a real mask equals the bbox of that mask."""
    for b, m, h in zip(boxes, masks, has_mask):
        if h and not np.allclose(b, mask_bbox(m == 1)):
            return False
    return True
