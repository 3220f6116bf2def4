"""How many kept cells of ``stage=segment`` a morphologist would reject, by simulator truth.

For each ``detections.csv`` given (e.g. one run with the crop filters off and one
with them on, same model and smears), every kept detection is checked against the
simulator's COCO annotations:

* cut: its matched true cell is ``truncated`` (partly outside the image) or lies
  within 2 px of another true cell (touching cells overlap: one hides part of the other);
* doublet: its box covers at least 60 % of the boxes of two or more true cells;
* unmatched: no true cell matched (mask IoU below segmentation.match_iou).

Usage::

    python scripts/crop_filter_check.py ANNOTATIONS.json NAME=DETECTIONS.csv [NAME=...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def truth_tables(annotations: Path) -> tuple[pd.DataFrame, dict[str, set[str]]]:
    """Per true cell: image, box, truncated; and the ids each cell touches (2 px)."""
    from scipy.ndimage import binary_dilation

    from segmentation.io import decode_coco_mask

    coco = json.loads(Path(annotations).read_text())
    images = {im["id"]: im for im in coco["images"]}
    rows, touching = [], {}
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for iid, anns in by_image.items():
        im = images[iid]
        h, w = int(im["height"]), int(im["width"])
        masks = [decode_coco_mask(a["segmentation"], h, w) for a in anns]
        grown = [binary_dilation(m, iterations=2) for m in masks]
        for i, a in enumerate(anns):
            x, y, bw, bh = a["bbox"]
            cid = str(a["cell_id"])
            rows.append(
                {
                    "image": Path(im["file_name"]).name,
                    "cell_id": cid,
                    "x0": x,
                    "y0": y,
                    "x1": x + bw,
                    "y1": y + bh,
                    "truncated": bool(a.get("truncated", False)),
                }
            )
            touching[cid] = {
                str(anns[j]["cell_id"])
                for j in range(len(anns))
                if j != i and (grown[i] & masks[j]).any()
            }
    return pd.DataFrame(rows), touching


def check(det: pd.DataFrame, truth: pd.DataFrame, touching: dict[str, set[str]]) -> dict:
    kept = det[det["kept"].astype(bool)]
    tru = truth.set_index("cell_id")
    cut = doublet = unmatched = 0
    for _, r in kept.iterrows():
        tid = str(r.get("truth_cell_id", "") or "")
        if tid in ("", "nan"):
            unmatched += 1
        elif bool(tru.loc[tid, "truncated"]) or touching.get(tid):
            cut += 1
        t = truth[truth["image"] == r["image"]]
        ix = np.clip(np.minimum(r["x1"], t["x1"]) - np.maximum(r["x0"], t["x0"]), 0, None)
        iy = np.clip(np.minimum(r["y1"], t["y1"]) - np.maximum(r["y0"], t["y0"]), 0, None)
        cover = ix * iy / ((t["x1"] - t["x0"]) * (t["y1"] - t["y0"]))
        if int((cover >= 0.6).sum()) >= 2:
            doublet += 1
    n = len(kept)
    return {
        "kept": n,
        "kept_cut": cut,
        "kept_doublet": doublet,
        "kept_unmatched": unmatched,
        "share_bad": round((cut + doublet) / max(n, 1), 3),
    }


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    from segmentation.io import spreadsheet_unquote

    truth, touching = truth_tables(Path(argv[0]))
    print(
        f"true cells: {len(truth)}, truncated {int(truth['truncated'].sum())}, "
        f"touching another {sum(bool(v) for v in touching.values())}"
    )
    for arg in argv[1:]:
        name, _, path = arg.partition("=")
        det = pd.read_csv(path, keep_default_na=False, na_values=[""])
        # stage=segment quotes a name starting = + - @ for spreadsheets ("'=x.png"):
        # matched to the annotations' file names and cell ids as they are written there
        for c in ("image", "truth_cell_id"):
            if c in det:
                det[c] = det[c].map(spreadsheet_unquote)
        print(name, check(det, truth, touching))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
