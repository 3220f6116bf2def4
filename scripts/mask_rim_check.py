"""Do the crops' masks end at the cell, or carry a rim of background? (`segmentation.trim_rim_px`)

The detector predicts masks at its working scale (cells ~40 px); ``stage=segment``
enlarges them to the source image, where one working pixel is several source pixels,
so a mask that overshoots leaves a pale rim of background around the cell in its crop.
This script measures, with and without :func:`segmentation.crops.trim_rim`:

* segmentation_wbc's held-out 20 % (true masks): mean whole-cell mask IoU of the
  detector's best detection, enlarged to the source image as ``stage=segment`` does;
* on smears without masks (TXL-PBC val per source, BCCD val): the share of each mask's
  outer 2 source px that is background-coloured (summed optical density within a quarter
  of the way from the image's background to the cell's median), averaged over the cells.

Usage::

    python scripts/mask_rim_check.py outputs/real_chain/segment_train/model.pt \
        [--shared ../shared/data] [--out outputs/mask_rim_check.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def background_share(image: np.ndarray, full_mask: np.ndarray, bg_od: float) -> float:
    """Share of the mask's outer 2 px whose summed optical density lies within a quarter
    of the way from the background's to the cell's median: glass and plasma, not cell."""
    from scipy import ndimage as ndi

    from segmentation.crops import _od_sum

    m = full_mask
    outer = m & ~ndi.binary_erosion(m, iterations=2)
    if outer.sum() < 5:
        return float("nan")
    od = _od_sum(image)
    cut = bg_od + 0.25 * (float(np.median(od[m])) - bg_od)
    return float((od[outer] < cut).mean())


def main() -> None:
    import torch

    from segmentation.cells import scale_local_masks
    from segmentation.crops import background_od, trim_rim
    from segmentation.datasets import read_mask_pngs, read_voc, read_yolo, with_scale
    from segmentation.inference import Detections, MaskRCNNDetector, resize_image
    from segmentation.io import decode_coco_mask, load_rgb
    from segmentation.model import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--cell-px", type=float, default=40.0)
    ap.add_argument("--rim-factor", type=float, default=1.0, help="trim depth = factor / scale px")
    ap.add_argument("--max-images", type=int, default=None, help="per source (quick runs)")
    ap.add_argument("--out", default="outputs/mask_rim_check.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    shared = Path(a.shared)
    model, _ = load_checkpoint(a.checkpoint)
    model.eval()
    det = MaskRCNNDetector(model, "cpu")

    def cells(rec, image):
        """Kept-looking detections (score >= 0.5) as source-px (mask, origin) pairs."""
        work = resize_image(image, rec.scale)
        d = det([work])[0]
        d = d.select(np.flatnonzero(d.scores >= 0.5))
        ms, os_ = scale_local_masks(d.masks, d.origins, 1.0 / rec.scale, smooth=True)
        return Detections(d.boxes / rec.scale, d.scores, ms, os_)

    def full(m, o, h, w):
        out = np.zeros((h, w), bool)
        x, y = int(o[0]), int(o[1])
        mh, mw = m.shape
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + mw, w), min(y + mh, h)
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1] = m[y0 - y : y1 - y, x0 - x : x1 - x]
        return out

    res: dict = {"checkpoint": a.checkpoint, "rim_factor": a.rim_factor}
    # 1. true masks
    segwbc = with_scale(
        read_mask_pngs(shared / "cells/segmentation_wbc", val_fraction=0.2, seed=0), None, a.cell_px
    ).split("val")
    iou = {"as_is": [], "trimmed": []}
    for rec in list(segwbc)[: a.max_images]:
        image = load_rgb(rec.path)
        h, w = image.shape[:2]
        inst = [i for i in rec.instances if i.mask is not None]
        if not inst:
            continue
        g = decode_coco_mask(inst[0].mask, h, w).astype(bool)
        d = cells(rec, image)
        if not len(d):
            iou["as_is"].append(0.0)
            iou["trimmed"].append(0.0)
            continue
        k = int(np.argmax(d.scores))
        px = math.ceil(a.rim_factor / rec.scale)
        bg = background_od(image)
        for name, m in (
            ("as_is", d.masks[k]),
            ("trimmed", trim_rim(image, d.masks[k], d.origins[k], bg, px)),
        ):
            f = full(m, d.origins[k], h, w)
            iou[name].append(float((f & g).sum() / max(1, (f | g).sum())))
    res["segmentation_wbc_val"] = {
        "n": len(iou["as_is"]),
        **{f"mean_mask_iou_{k}": float(np.mean(v)) for k, v in iou.items()},
    }
    # 2. rims on smears
    txl = read_yolo(shared / "smears/txl_pbc", splits=["val"])
    bccd = with_scale(read_voc(shared / "smears/bccd", splits=["val"]), 0.21, a.cell_px)
    widths = {360: 0.28, 366: 0.28, 416: 0.23, 575: 0.15, 640: 0.18}
    names = {360: "PBC", 366: "PBC", 416: "BCD", 575: "Raabin", 640: "BCCD-type"}
    groups: dict[str, list] = {}
    for rec in list(bccd)[: a.max_images]:
        groups.setdefault("BCCD", []).append(rec)
    for rec in txl:
        if rec.width in widths:
            rec.scale = widths[rec.width]
            groups.setdefault(f"TXL {names[rec.width]}", []).append(rec)
    for src, recs in groups.items():
        r0, r1 = [], []
        for rec in recs[: a.max_images]:
            image = load_rgb(rec.path)
            h, w = image.shape[:2]
            d = cells(rec, image)
            bg = background_od(image)
            px = math.ceil(a.rim_factor / rec.scale)
            for m, o in zip(d.masks, d.origins):
                r0.append(background_share(image, full(m, o, h, w), bg))
                t = trim_rim(image, m, o, bg, px)
                r1.append(background_share(image, full(t, o, h, w), bg))
        r0, r1 = np.asarray(r0), np.asarray(r1)
        res[f"rim_{src}"] = {
            "cells": int(r0.size),
            "edge_background_share_as_is": float(np.nanmean(r0)) if r0.size else None,
            "edge_background_share_trimmed": float(np.nanmean(r1)) if r1.size else None,
        }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    for k, v in res.items():
        print(f"{k:28s} {v}")


if __name__ == "__main__":
    main()
