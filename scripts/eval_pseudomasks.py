"""Pseudo-mask quality on real masks: box from the true mask -> pseudo-mask -> IoU.

Usage: python scripts/eval_pseudomasks.py [--root ../shared/data/cells/segmentation_wbc]
Prints a table (method x folder: mean IoU, share of watershed masks) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from segmentation.datasets import load_rgb, read_mask_pngs
from segmentation.pseudomask import pseudo_mask_in_box


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="../shared/data/cells/segmentation_wbc")
    ap.add_argument("--out", default="outputs/pseudomask_eval.json")
    a = ap.parse_args()
    ds = read_mask_pngs(a.root, val_fraction=0.0)
    rows: dict[str, dict[str, list]] = {}
    for rec in ds:
        folder = rec.path.parent.name
        img = load_rgb(rec.path)
        inst = rec.instances[0]
        gt = inst.decode_mask(rec.height, rec.width)
        for method in ("watershed", "ellipse"):
            m, how = pseudo_mask_in_box(img, np.array(inst.bbox), method)
            iou = (m & gt).sum() / (m | gt).sum()
            r = rows.setdefault(f"{method}/{folder}", {"iou": [], "ws": []})
            r["iou"].append(float(iou))
            r["ws"].append(how == "watershed")
    out = {}
    print(f"{'method/folder':28s} {'n':>4s} {'mean IoU':>9s} {'watershed used':>15s}")
    for k, r in sorted(rows.items()):
        out[k] = {
            "n": len(r["iou"]),
            "mean_iou": float(np.mean(r["iou"])),
            "watershed_share": float(np.mean(r["ws"])),
        }
        print(
            f"{k:28s} {out[k]['n']:4d} {out[k]['mean_iou']:9.3f} {out[k]['watershed_share']:15.2f}"
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
