"""Mask quality on real full fields: held-out masked cells pasted onto real smears.

The real full-field sets have no masks. This puts held-out segmentation_wbc cells
(with their true masks, never seen in training) onto BCCD validation smears with
segmentation.copy_paste.CopyPaste (same seed per image for every model), runs each
checkpoint and scores the pasted cells: recall (a detection >= threshold with box
IoU >= 0.5) and mean best mask IoU (0 when missed). The BCCD images' own WBCs have
no masks and are not scored.

Usage: python scripts/eval_pasted_masks.py outputs/A/segment_train/model.pt [...]
       [--shared ../shared/data] [--out outputs/pasted_mask_eval.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from segmentation.copy_paste import CopyPaste
from segmentation.datasets import load_sample, read_mask_pngs, read_voc, to_tensors, with_scale
from segmentation.engine import box_iou
from segmentation.model import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--bccd-scale", type=float, default=0.21)
    ap.add_argument("--cell-px", type=float, default=40.0)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/pasted_mask_eval.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    shared = Path(a.shared)
    bccd = with_scale(read_voc(shared / "smears/bccd", splits=["val"]), a.bccd_scale, a.cell_px)
    donors = with_scale(
        read_mask_pngs(shared / "cells/segmentation_wbc", val_fraction=0.2, seed=a.seed),
        None,
        a.cell_px,
    ).split("val")
    cp = CopyPaste(donors.images, p=1.0, max_cells=2)
    samples = []
    for i, rec in enumerate(bccd):
        s = cp(load_sample(rec, "ignore"), a.seed * 100_003 + i)
        samples.append(s)
    results = {}
    print(f"{'checkpoint':60s} {'pasted':>6s} {'recall':>7s} {'mask IoU':>9s}")
    for ck in a.checkpoints:
        model, _ = load_checkpoint(ck)
        model.eval()
        ious, hits = [], 0
        with torch.inference_mode():
            for s in samples:
                img, _ = to_tensors(s, 0)
                p = model([img])[0]
                keep = p["scores"] >= a.threshold
                boxes = p["boxes"][keep].numpy()
                masks = (p["masks"][keep, 0] > 0.5).numpy()
                for b, m, has in zip(s.boxes, s.masks, s.has_mask):
                    if not has:
                        continue
                    g = m == 1
                    iou_b = box_iou(np.asarray(b)[None], boxes)
                    hits += int(iou_b.size > 0 and iou_b.max() >= 0.5)
                    best = max([(g & d).sum() / max(1, (g | d).sum()) for d in masks], default=0.0)
                    ious.append(float(best))
        results[ck] = {
            "n_pasted": len(ious),
            "recall": hits / max(1, len(ious)),
            "mean_mask_iou": float(np.mean(ious)) if ious else None,
        }
        r = results[ck]
        print(f"{ck:60s} {r['n_pasted']:6d} {r['recall']:7.3f} {r['mean_mask_iou']:9.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
