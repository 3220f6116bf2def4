"""How well the QuPath outlines of a finished ``stage=segment`` lie on their cells.

Fills each outline of ``qupath/*.geojson`` (the pixels whose centres it encloses) and
compares it with the cell's own mask in ``masks/<stem>.tif`` (the label of the same cell
id in ``cells.h5ad``): IoU per cell. Images read whole only (a slide's label TIFFs are per
window). Prints a table and writes JSON.

    python scripts/qupath_check.py outputs/demo/segment --out qupath_check.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def outline_ious(segment_dir: Path) -> dict[str, float]:
    """Cell id -> IoU of its filled outline with its label-TIFF mask."""
    import anndata as ad
    from skimage import io as skio
    from skimage.draw import polygon

    obs = ad.read_h5ad(segment_dir / "cells.h5ad", backed="r").obs
    out: dict[str, float] = {}
    for f in sorted((segment_dir / "qupath").glob("*.geojson")):
        tif = segment_dir / "masks" / f"{f.stem}.tif"
        if not tif.is_file():
            continue
        labels = skio.imread(tif)
        for feat in json.loads(f.read_text())["features"]:
            cid = feat["properties"]["name"]
            ring = np.asarray(feat["geometry"]["coordinates"][0], float)
            rr, cc = polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, labels.shape)
            drawn = np.zeros(labels.shape, bool)
            drawn[rr, cc] = True
            cell = labels == int(obs.loc[cid, "mask_label"])
            out[cid] = float((drawn & cell).sum() / max(1, (drawn | cell).sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("segment_dir", type=Path, help="a finished stage=segment folder")
    ap.add_argument("--out", type=Path, default=Path("qupath_check.json"))
    a = ap.parse_args()
    ious = outline_ious(a.segment_dir)
    if not ious:
        raise SystemExit(f"{a.segment_dir}: no qupath/*.geojson beside a masks/<stem>.tif")
    v = np.array(list(ious.values()))
    row = {
        "cells": len(v),
        "iou_min": float(v.min()),
        "iou_p05": float(np.quantile(v, 0.05)),
        "iou_median": float(np.median(v)),
        "below_0.9": int((v < 0.9).sum()),
    }
    print(f"{'cells':>6} {'IoU min':>8} {'IoU p05':>8} {'median':>8} {'< 0.9':>6}")
    print(
        f"{row['cells']:>6} {row['iou_min']:>8.3f} {row['iou_p05']:>8.3f} "
        f"{row['iou_median']:>8.3f} {row['below_0.9']:>6}"
    )
    a.out.write_text(json.dumps({"segment_dir": str(a.segment_dir), **row}, indent=1))


if __name__ == "__main__":
    main()
