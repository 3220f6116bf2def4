"""Draw what the white-cell ruler measured on a few smear images (failure gallery).

Usage:
  python scripts/scale_ruler_figure.py --path ../shared/data/smears/txl_pbc --split train \
      --out docs/figures/scale_ruler_failures.jpg NAME.jpg [NAME.jpg ...]

Per image (at the ruler's measuring size, shown 4/3x): magenta the nucleus pixels,
yellow the white-cell region that was measured, cyan the red-cell segments of the same
watershed (black dots: their seeds), green the ground-truth white boxes; the caption
gives the measured white-cell diameters and the oracle box side (source px). The
panels are tiled two per row. Docs: docs/segmentation_infer.md, "Automatic magnification".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries
from skimage.transform import rescale

import segmentation.magnification as M
from segmentation.datasets import READERS, auto_scale
from segmentation.io import read_rgb


def panel(rec, cell_px: float = 40.0) -> Image.Image:
    """One image with the ruler's regions drawn (:func:`M.white_cell_regions`)."""
    img = read_rgb(rec.path).image[..., :3]
    w = M.white_cell_regions(img)
    if w is None:  # no nucleus: the image at the measuring size, nothing drawn
        f = min(1.0, M.MEASURE_PX / max(img.shape[:2]))
        out = rescale(img, f, channel_axis=-1, anti_aliasing=True, preserve_range=True)
        out, n_white = out.round().astype(np.uint8), 0
    else:
        f, out, n_white = w.factor, w.image.copy(), len(w.centres)
        out[find_boundaries(w.regions) & (w.regions > n_white + 1)] = (0, 200, 255)
        for k, _, _ in w.centres:
            out[find_boundaries(w.regions == k)] = (255, 255, 0)
        out[find_boundaries(w.nucleus)] = (255, 0, 255)
        out[w.red_seeds > 0] = (0, 0, 0)
    z = 4 / 3
    p = Image.fromarray(out).resize((round(out.shape[1] * z), round(out.shape[0] * z)))
    d = ImageDraw.Draw(p)
    for a in rec.instances:
        if a.category == "wbc":
            d.rectangle([v * f * z for v in a.bbox], outline=(0, 255, 0), width=2)
    sizes = M.white_cell_sizes(img)
    side = cell_px / auto_scale(rec, cell_px)
    d.text((4, 4), f"{rec.width}px: white {np.round(sizes).astype(int)}, oracle {side:.0f}", fill=0)
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="+")
    ap.add_argument("--path", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    recs = {Path(r.path).name: r for r in READERS["yolo"](a.path, splits=[a.split])}
    ims = [panel(recs[n]) for n in a.names]
    w, h = max(i.width for i in ims), max(i.height for i in ims)
    sheet = Image.new("RGB", (2 * w, h * ((len(ims) + 1) // 2)), (255, 255, 255))
    for k, im in enumerate(ims):
        sheet.paste(im, ((k % 2) * w, (k // 2) * h))
    sheet.save(a.out, quality=80)


if __name__ == "__main__":
    main()
