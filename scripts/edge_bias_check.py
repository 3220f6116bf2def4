"""How much the border filter skews a differential count, and what the edge weights undo.

``stage=segment`` drops every cell cut by the image edge (``at_border``). Large cells
touch the edge more often than small ones, so a count of the kept cells
under-represents them. This check uses BCCD, whose photos hold one labelled white cell
each (``cells/bccd_cropped/kaggle_labels.csv``, one class per image): among the images
with exactly one confident detection and a single class, it compares

- the class shares of all those cells (the truth: every photo's cell, kept or not),
- the shares of the kept cells (what a plain differential count would report),
- the shares of the kept cells weighted by their edge weight
  (:func:`segmentation.crops.edge_weights`, ``obs["edge_weight"]``),

and prints each class's kept fraction, the three compositions and their total
variation distance to the truth; the JSON holds the same.

    .venv/bin/python scripts/edge_bias_check.py outputs/real_chain/segment \\
        [--labels ../shared/data/cells/bccd_cropped/kaggle_labels.csv] [--source bccd] \\
        [--smears ../shared/data/smears/bccd/JPEGImages] [--out edge_bias.json]

A ``detections.csv`` written before ``edge_weight`` existed is weighted here from its
predicted boxes (an approximation of the mask extents stage=segment now reads), the
images' sizes (read from ``--smears``) and ``input_scale``, with the default border
margin (the run's own ``segmentation.border_margin`` is not read back).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _weights(b: pd.DataFrame, smears: Path) -> np.ndarray:
    """Edge weights of the rows of ``b``: the table's, or computed from the boxes."""
    from PIL import Image

    from segmentation.crops import edge_weights
    from segmentation.schema import BORDER_MARGIN, EDGE_WEIGHT

    if EDGE_WEIGHT in b and b[EDGE_WEIGHT].notna().all():
        return b[EDGE_WEIGHT].to_numpy(float)
    out = np.empty(len(b))
    for i, (_, r) in enumerate(b.iterrows()):
        with Image.open(smears / r["image"]) as im:
            width, height = im.size
        s = float(r["input_scale"])
        box = np.array([[r["x0"], r["y0"], r["x1"], r["y1"]]], float) * s
        out[i] = edge_weights(box, round(height * s), round(width * s), BORDER_MARGIN)[0]
    return out


def check(segment: Path, labels: Path, source: str, smears: Path) -> dict:
    from segmentation.io import spreadsheet_unquote

    k = pd.read_csv(labels)
    k = k[k["Category"].notna() & ~k["Category"].astype(str).str.contains(",")]
    cls = pd.Series(
        k["Category"].astype(str).str.lower().to_numpy(),
        index=[f"BloodImage_{int(i):05d}.jpg" for i in k["Image"]],
    )
    d = pd.read_csv(segment / "detections.csv")
    # stage=segment quotes a name starting = + - @ for spreadsheets ("'=x.jpg"): matched
    # to the labels and the smear files as the files are named
    for c in ("source", "image"):
        d[c] = d[c].map(spreadsheet_unquote)
    b = d[(d["source"] == source) & ~d["low_score"] & ~d["duplicate"]].copy()
    one = b.groupby("image").size()
    b = b[b["image"].isin(one[one == 1].index)]
    b["cls"] = b["image"].map(cls)
    b = b[b["cls"].notna()].reset_index(drop=True)
    if b.empty:
        raise SystemExit(f"{segment / 'detections.csv'}: no {source} image with one labelled cell")
    b["w"] = _weights(b, smears)
    kept = b[b["kept"].astype(bool)]
    truth = b["cls"].value_counts(normalize=True)
    raw = kept["cls"].value_counts(normalize=True)
    wtd = kept.groupby("cls")["w"].sum() / kept["w"].sum()
    tab = pd.DataFrame({"all_cells": truth, "kept": raw, "kept_edge_weighted": wtd}).fillna(0.0)
    tab["kept_fraction"] = b.groupby("cls")["kept"].mean()
    tab["n"] = b["cls"].value_counts()
    tab["median_edge_weight"] = kept.groupby("cls")["w"].median()
    tv = {
        c: float(0.5 * (tab[c] - tab["all_cells"]).abs().sum())
        for c in ("kept", "kept_edge_weighted")
    }
    return {
        "segment": str(segment),
        "source": source,
        "n_images": int(len(b)),
        "n_kept": int(len(kept)),
        "classes": tab.round(4).to_dict(orient="index"),
        "tv_distance_to_all_cells": tv,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("segment", type=Path, help="a stage=segment folder (detections.csv)")
    ap.add_argument(
        "--labels", type=Path, default=SHARED / "cells" / "bccd_cropped" / "kaggle_labels.csv"
    )
    ap.add_argument("--source", default="bccd", help="the detections' source name")
    ap.add_argument("--smears", type=Path, default=SHARED / "smears" / "bccd" / "JPEGImages")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default SEGMENT/edge_bias.json)")
    args = ap.parse_args()
    res = check(args.segment, args.labels, args.source, args.smears)
    out = args.out or args.segment / "edge_bias.json"
    out.write_text(json.dumps(res, indent=2))
    tab = pd.DataFrame(res["classes"]).T
    print(f"{res['n_images']} {res['source']} photos with one labelled cell, {res['n_kept']} kept")
    print(tab.to_string(float_format=lambda v: f"{v:.3f}"))
    tv = res["tv_distance_to_all_cells"]
    print(
        f"total variation distance to all cells: kept {tv['kept']:.4f}, "
        f"edge-weighted {tv['kept_edge_weighted']:.4f}"
    )


if __name__ == "__main__":
    main()
