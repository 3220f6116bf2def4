"""Can the red-cell ruler give segmentation_wbc crops a size? (issue 9, the cell's size)

segmentation_wbc's two subsets are single-cell crops of unknown magnification, so their
rows of ``paired.h5ad`` have no ``cell_diameter``. This measures, on every ``--every``-th
image of each subset, whether :func:`segmentation.magnification.red_cell_diameter` finds
red cells at all, and the ratio of the white cell's equivalent diameter (its true mask)
to the red-cell diameter found: one microscope and a sound ruler would give one tight
ratio (a neutrophil is ~1.6-2x a 7.5 um red cell)::

    .venv/bin/python scripts/segwbc_ruler_check.py [--every 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segmentation.magnification import red_cell_diameter  # noqa: E402

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cells" / "segmentation_wbc"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=10, help="measure every k-th image")
    ap.add_argument("--root", type=Path, default=ROOT)
    a = ap.parse_args()
    print("subset    images  ruler found  median red px  median WBC px  WBC/red median (10-90 %)")
    for sub in ("dataset1", "dataset2"):
        files = sorted((a.root / sub).glob("*.bmp"))[:: a.every]
        rows = []
        for f in files:
            img = np.asarray(Image.open(f).convert("RGB"))
            mask = np.asarray(Image.open(f.with_suffix(".png")).convert("L")) > 0
            red, _ = red_cell_diameter(img)
            rows.append((red, np.sqrt(4 * mask.sum() / np.pi)))
        r = np.array(rows)
        ok = np.isfinite(r[:, 0])
        ratio = r[ok, 1] / r[ok, 0]
        q = np.percentile(ratio, [10, 90]) if ok.any() else [np.nan, np.nan]
        print(
            f"{sub:9s} {len(files):6d}  {ok.mean():11.2f}  {np.nanmedian(r[:, 0]):13.1f}  "
            f"{np.median(r[:, 1]):13.1f}  {np.median(ratio) if ok.any() else np.nan:.2f} "
            f"({q[0]:.2f}-{q[1]:.2f})"
        )


if __name__ == "__main__":
    main()
