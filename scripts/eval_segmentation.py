"""Evaluate a segment_train checkpoint on any annotated smear set (pycocotools).

Usage:
  python scripts/eval_segmentation.py CKPT --format yolo --path ../shared/data/smears/txl_pbc \
      --split val [--scale auto|estimate|FLOAT] [--cell-px 40] [--threshold 0.5] [--out FILE.json] \
      [--by-source]
  python scripts/eval_segmentation.py --scale-only --scale estimate --format yolo --path ... \
      --split val [--ruler auto|white|red] [--out FILE.json]

`--scale auto` is an ORACLE: it scales each image so its median WBC box side is `--cell-px`
using the ground-truth boxes (a user never has them). `--scale estimate` measures the scale
from the image itself (segmentation/magnification.py: `--ruler white` the white cells found
by their nuclei, `red` the red-cell diameter, `auto` white else red, as inference does),
and adds to the JSON how close it came to the oracle scale (`scale_estimate`: within 15 %
overall and per source = image width, ruler used, and every image's ratio in `per_image`).
`--scale-only` skips the detector (no checkpoint needed) and reports only that comparison.
Calibrating a ruler: run it on the *train* split with its constant set to 1
(`--white-box-per-diameter 1` or `--wbc-per-rbc 1`); `median_ratio_to_oracle` is the
constant. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from segmentation.datasets import READERS, DetectionDataset, with_scale
from segmentation.engine import evaluate
from segmentation.model import load_checkpoint


def estimated(ds, cell_px: float, wbc_per_rbc: float | None, ruler: str, white_k: float | None):
    """Per-image scale from the image; agreement with the ground-truth-box (oracle) scale."""
    from dataclasses import replace

    import numpy as np

    from segmentation.datasets import SmearDataset, auto_scale
    from segmentation.io import read_rgb
    from segmentation.magnification import WBC_PER_RBC, WHITE_BOX_PER_DIAMETER, estimate_scale

    k = WBC_PER_RBC if wbc_per_rbc is None else wbc_per_rbc
    kw = WHITE_BOX_PER_DIAMETER if white_k is None else white_k
    recs, ratio, failed, per_source, ruler_gt, per_image = [], [], 0, {}, [], []
    used: dict[str, int] = {}
    for rec in ds:
        est = estimate_scale(
            read_rgb(rec.path).image,
            cell_px,
            k,
            fallback=1.0,
            ruler=ruler,
            white_box_per_diameter=kw,
        )
        used[est.ruler] = used.get(est.ruler, 0) + 1
        recs.append(replace(rec, scale=est.scale))
        if not est.ok:
            failed += 1
        if rec.wbcs:
            oracle = auto_scale(rec, cell_px)
            q = est.scale / oracle if est.ok else np.nan
            ratio.append(q)
            per_source.setdefault(f"width_{rec.width}", []).append(q)
            per_image.append(
                {
                    "image": Path(rec.path).name,
                    "width": rec.width,
                    "ruler": est.ruler,
                    "scale": round(est.scale, 5),
                    "oracle": round(oracle, 5),
                }
            )
            # the best a red-cell ruler can do: the ground-truth red boxes as the ruler
            rb = [
                np.sqrt((a.bbox[2] - a.bbox[0]) * (a.bbox[3] - a.bbox[1]))
                for a in rec.instances
                if a.category == "rbc"
            ]
            ruler_gt.append(1.0 / (np.median(rb) * oracle) if rb else np.nan)
    ratio = np.asarray(ratio, float)
    ruler_gt = np.asarray(ruler_gt, float)
    ruler_gt = ruler_gt / np.nanmedian(ruler_gt)  # best single constant for the ground-truth ruler

    def within(x: np.ndarray) -> float:
        return round(float(np.mean(np.abs(np.nan_to_num(x, nan=9.0) - 1) <= 0.15)), 4)

    return SmearDataset(recs), {
        "scale_estimate": {
            "ruler": ruler,
            "rulers_used": used,
            "wbc_per_rbc": k,
            "white_box_per_diameter": kw,
            "images": len(recs),
            "failed": failed,
            "images_with_wbc": int(ratio.size),
            "within_15pct_of_oracle": within(ratio),
            "median_ratio_to_oracle": round(float(np.nanmedian(ratio)), 4),
            "within_15pct_by_source": {s: within(np.asarray(v)) for s, v in per_source.items()},
            "median_ratio_by_source": {
                s: round(float(np.nanmedian(v)), 4) for s, v in per_source.items()
            },
            "images_by_source": {s: len(v) for s, v in per_source.items()},
            # same check with the ground-truth red-cell boxes as the ruler (an upper bound
            # for any red-cell estimate: white-cell size varies with the cell type)
            "ground_truth_rbc_ruler_within_15pct": within(ruler_gt),
            "images_with_wbc_and_rbc_boxes": int(np.isfinite(ruler_gt).sum()),
            "per_image": per_image,
        }
    }


def by_source(model, ds, threshold: float) -> dict[str, dict]:
    """WBC box/mask AP of each source (``width_W``: image width tells TXL-PBC's four
    microscopes apart, docs/segmentation_infer.md) scored on its own images."""
    from segmentation.datasets import SmearDataset

    groups: dict[str, list] = {}
    for rec in ds:
        groups.setdefault(f"width_{rec.width}", []).append(rec)
    out = {}
    for name, recs in sorted(groups.items()):
        sub = SmearDataset(list(recs))
        r = evaluate(model, DetectionDataset(sub.images), torch.device("cpu"), threshold)
        d = r.as_dict()
        out[name] = {
            k: d.get(k)
            for k in ("n_images", "n_gt", "box_ap50", "mask_ap50", "recall", "precision")
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--scale-only", action="store_true")
    ap.add_argument("--wbc-per-rbc", type=float, default=None)
    ap.add_argument("--white-box-per-diameter", type=float, default=None)
    ap.add_argument("--ruler", default="auto", choices=["auto", "white", "red"])
    ap.add_argument("--every", type=int, default=1, help="every N-th image only (calibration)")
    ap.add_argument("--format", required=True, choices=sorted(READERS))
    ap.add_argument("--path", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--scale", default="auto")
    ap.add_argument("--cell-px", type=float, default=40.0)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--by-source",
        action="store_true",
        help="also score each source (image width: TXL-PBC's microscopes) on its own",
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.format in ("voc", "yolo"):
        ds = READERS[a.format](a.path, splits=[a.split])
    elif a.format == "mask_png":
        ds = READERS["mask_png"](a.path).split(a.split)
    else:
        ds = READERS["coco"](a.path).split(a.split)
    extra = {}
    if a.every > 1:
        from segmentation.datasets import SmearDataset

        ds = SmearDataset(list(ds)[:: a.every])
    if a.scale == "estimate":
        ds, extra = estimated(ds, a.cell_px, a.wbc_per_rbc, a.ruler, a.white_box_per_diameter)
    else:
        ds = with_scale(ds, None if a.scale == "auto" else float(a.scale), a.cell_px)
    ds = ds.renumber()
    if a.scale_only:
        out = extra
    else:
        if not a.checkpoint:
            ap.error("checkpoint is required unless --scale-only")
        model, _ = load_checkpoint(a.checkpoint)
        r = evaluate(model, DetectionDataset(ds.images), torch.device("cpu"), a.threshold)
        out = {**r.as_dict(), **extra}
        if a.by_source:
            out["by_source"] = by_source(model, ds, a.threshold)
    shown = out
    if "scale_estimate" in out:  # the per-image list goes to --out only
        se = {k: v for k, v in out["scale_estimate"].items() if k != "per_image"}
        shown = {**out, "scale_estimate": se}
    print(json.dumps(shown, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
