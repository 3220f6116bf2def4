"""Tiny hand-made smear sets for the segmentation tests (no simulator needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# an untrained resnet18_fpn Mask R-CNN for behaviour tests, ~25x faster than the full
# heads (an untrained net keeps 100 boxes per image and the 4-conv 256-channel mask head
# on all of them was most of each test's time); never for accuracy
LIGHT_HEADS = {"fpn_channels": 32, "box_representation": 64, "mask_head_layers": 1}


def untrained_checkpoint(path: Path, side: int = 128) -> Path:
    """Save an untrained light ``resnet18_fpn`` Mask R-CNN (seed 0) working at ``side``
    px to ``path``: a detector checkpoint for behaviour tests."""
    import torch

    from segmentation.model import build_maskrcnn, save_checkpoint

    torch.manual_seed(0)
    args = {"arch": "resnet18_fpn", "min_size": side, "max_size": side, **LIGHT_HEADS}
    save_checkpoint(path, build_maskrcnn(**args), args)
    return path


def disk(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def make_coco_smears(
    folder: Path,
    n_images: int = 3,
    size: int = 128,
    cells: int = 2,
    radius: float = 12.0,
    val: int = 1,
    seed: int = 0,
) -> Path:
    """Pink smears with violet round 'white cells'; COCO JSON with RLE masks and splits.

    Returns the annotations.json path. Cells never overlap and never touch
    the border; image k < n_images - val is split train, the rest val.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for k in range(n_images):
        img = np.zeros((size, size, 3), np.uint8)
        img[:] = (235, 205, 210)
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        placed: list[tuple[float, float]] = []
        while len(placed) < cells:
            cx, cy = rng.uniform(radius + 3, size - radius - 3, 2)
            if all((cx - a) ** 2 + (cy - b) ** 2 > (2 * radius + 4) ** 2 for a, b in placed):
                placed.append((cx, cy))
        for cx, cy in placed:
            m = disk(size, size, cx, cy, radius)
            img[m] = (170, 120, 200)
            img[disk(size, size, cx, cy, radius * 0.55)] = (90, 40, 130)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            ys, xs = np.nonzero(m)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": k + 1,
                    "category_id": 1,
                    "bbox": [
                        float(xs.min()),
                        float(ys.min()),
                        float(xs.max() - xs.min() + 1),
                        float(ys.max() - ys.min() + 1),
                    ],
                    "area": float(m.sum()),
                    "segmentation": {"size": [size, size], "counts": rle["counts"].decode()},
                    "iscrowd": 0,
                    "cell_id": f"t{k:02d}_c{len(anns):02d}",
                }
            )
        name = f"sim_{k:04d}.png"
        Image.fromarray(img).save(folder / name)
        images.append(
            {
                "id": k + 1,
                "file_name": name,
                "width": size,
                "height": size,
                "split": "val" if k >= n_images - val else "train",
            }
        )
    ann = folder / "annotations.json"
    ann.write_text(
        json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "wbc"}]}
        )
    )
    return ann
