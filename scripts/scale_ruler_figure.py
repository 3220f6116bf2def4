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
from scipy import ndimage as ndi
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import label
from skimage.morphology import convex_hull_image, h_maxima
from skimage.segmentation import find_boundaries, watershed
from skimage.transform import rescale

import segmentation.magnification as M
from segmentation.datasets import READERS, auto_scale
from segmentation.io import read_rgb


def panel(rec, cell_px: float = 40.0) -> Image.Image:
    """One image with the ruler's regions drawn (the steps of M.white_cell_sizes)."""
    img = read_rgb(rec.path).image[..., :3]
    f = min(1.0, M.MEASURE_PX / max(img.shape[:2]))
    im = img
    if f < 1:
        im = rescale(img, f, channel_axis=-1, anti_aliasing=True, preserve_range=True)
        im = im.round().astype(np.uint8)
    nuc, nuclei = M._nuclei(im)
    g = gaussian(im.astype(np.float32) / 255, sigma=1.5, channel_axis=-1)[..., 1]
    t = threshold_otsu(g)
    fg = g < t + M.FOREGROUND_MIX * (np.median(g[g >= t]) - t)
    markers = np.zeros(g.shape, np.int32)
    for k, m in enumerate(nuclei, start=2):
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        markers[y0:y1, x0:x1][convex_hull_image(m[y0:y1, x0:x1])] = k
    fg = ndi.binary_fill_holes(fg | (markers > 0))
    dist = ndi.distance_transform_edt(fg)
    near = ndi.distance_transform_edt(markers == 0)
    rad = np.sqrt(max(m.sum() for m in nuclei) / np.pi) if nuclei else 1.0
    peaks = h_maxima(gaussian(dist, sigma=1.0), 1.0) & (near > 0.5 * rad) & (markers == 0)
    pl = label(peaks)
    markers[pl > 0] = pl[pl > 0] + len(nuclei) + 2
    ws = watershed(-dist, markers, mask=fg)
    out = im.copy()
    out[find_boundaries(ws) & (ws > len(nuclei) + 1)] = (0, 200, 255)
    for k in range(2, len(nuclei) + 2):
        out[find_boundaries(ws == k)] = (255, 255, 0)
    out[find_boundaries(nuc)] = (255, 0, 255)
    out[pl > 0] = (0, 0, 0)
    z = 4 / 3
    p = Image.fromarray(out).resize((round(out.shape[1] * z), round(out.shape[0] * z)))
    d = ImageDraw.Draw(p)
    for a in rec.instances:
        if a.category == "wbc":
            d.rectangle([v * f * z for v in a.bbox], outline=(0, 255, 0), width=2)
    w = M.white_cell_sizes(img)
    side = cell_px / auto_scale(rec, cell_px)
    d.text((4, 4), f"{rec.width}px: white {np.round(w).astype(int)}, oracle {side:.0f}", fill=0)
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
