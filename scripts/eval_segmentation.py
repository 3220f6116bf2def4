"""Evaluate a segment_train checkpoint on any annotated smear set (pycocotools).

Usage:
  python scripts/eval_segmentation.py CKPT --format yolo --path ../shared/data/smears/txl_pbc \
      --split val [--scale auto|estimate|FLOAT] [--cell-px 40] [--threshold 0.5] [--out FILE.json] \
      [--by-source] [--score-floor 0.05]
  python scripts/eval_segmentation.py --scale-only --scale estimate --format yolo --path ... \
      --split val [--ruler auto|white|red] [--out FILE.json]

`--scale auto` is an ORACLE: it scales each image so its median WBC box side is `--cell-px`
using the ground-truth boxes (a user never has them; boxes cut by the image edge are not
measured unless every box is: `segmentation.datasets.auto_scale`). `--scale estimate` measures the scale
from the image itself (segmentation/magnification.py: `--ruler white` the white cells found
by their nuclei, `red` the red-cell diameter, `auto` white else red, as inference does),
and adds to the JSON how close it came to the oracle scale (`scale_estimate`: within 15 %
overall and per source = image width, ruler used, and every image's ratio in `per_image`).
By default each estimate is held within 1.25x of the median estimate of the images of its
size (TXL-PBC: one microscope), as `stage=segment` does (`segmentation.scale_spread`;
`--scale-spread 1`: the median for all; `none`: each image its own;
`within_15pct_of_oracle_image` is the image's own estimate's agreement).
`--scale-only` skips the detector (no checkpoint needed) and reports only that comparison.
Calibrating a ruler: run it on the *train* split with its constant set to 1
(`--white-box-per-diameter 1` or `--wbc-per-rbc 1`); `median_ratio_to_oracle` is the
constant. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from segmentation.datasets import READERS, DetectionDataset, with_scale
from segmentation.engine import evaluate, predict
from segmentation.model import load_checkpoint
from segmentation.schema import SCALE_SPREAD


def estimated(
    ds,
    cell_px: float,
    wbc_per_rbc: float | None,
    ruler: str,
    white_k: float | None,
    cached: dict | None = None,
    spread: float | None = None,
):
    """Per-image scale from the image; agreement with the ground-truth-box (oracle) scale.

    ``cached``: image name -> ``per_image`` row of an earlier run's JSON (``--s0-from``),
    whose scale is reused instead of measuring the image again. ``spread``: each estimate
    is held within this factor of the median estimate of the images of its size, as
    ``segmentation.scale_spread`` does in ``stage=segment`` (None: each image its own)."""
    from dataclasses import replace

    import numpy as np

    from segmentation.autoscale import hold_estimates, pool_key
    from segmentation.datasets import SmearDataset, auto_scale
    from segmentation.io import read_rgb
    from segmentation.magnification import (
        WBC_PER_RBC,
        WHITE_BOX_PER_DIAMETER,
        ScaleEstimate,
        estimate_scale,
    )

    k = WBC_PER_RBC if wbc_per_rbc is None else wbc_per_rbc
    kw = WHITE_BOX_PER_DIAMETER if white_k is None else white_k
    recs, ratio, failed, per_source, ruler_gt, per_image = [], [], 0, {}, [], []
    ratio_own, ratio_all = [], []  # own estimate; the every-box oracle
    used: dict[str, int] = {}
    ds = list(ds)
    own = []  # each image's own estimate
    for rec in ds:
        row = (cached or {}).get(Path(rec.path).name)
        if row is not None:
            r0 = row.get("ruler_image", row["ruler"])  # files before pooling: own scale only
            s0 = float(row.get("scale_image", row["scale"]))
            wpx = row.get("white_px_image")  # files before 2026-12-03: not recorded
            wpx = float("nan") if wpx is None else float(wpx)
            own.append(ScaleEstimate(float("nan"), 0, s0, r0 != "none", r0, wpx))
        else:
            own.append(
                estimate_scale(
                    read_rgb(rec.path).image,
                    cell_px,
                    k,
                    fallback=1.0,
                    ruler=ruler,
                    white_box_per_diameter=kw,
                )
            )
    chosen = list(own)
    if spread is not None:
        keys = [pool_key(rec.path, (rec.width, rec.height)) for rec in ds]
        chosen = hold_estimates(own, keys, spread)
    for rec, est, est_own in zip(ds, chosen, own):
        used[est.ruler] = used.get(est.ruler, 0) + 1
        recs.append(replace(rec, scale=est.scale))
        if not est.ok:
            failed += 1
        if rec.wbcs:
            oracle = auto_scale(rec, cell_px)
            oracle_all = auto_scale(rec, cell_px, edge_px=None)
            q = est.scale / oracle if est.ok else np.nan
            ratio.append(q)
            ratio_all.append(est.scale / oracle_all if est.ok else np.nan)
            per_source.setdefault(f"width_{rec.width}", []).append(q)
            per_image.append(
                {
                    "image": Path(rec.path).name,
                    "width": rec.width,
                    "ruler": est.ruler,
                    "scale": round(est.scale, 5),
                    "ruler_image": est_own.ruler,
                    "scale_image": round(est_own.scale, 5),
                    "white_px_image": None
                    if not np.isfinite(est_own.white_px)
                    else round(est_own.white_px, 2),
                    "oracle": round(oracle, 5),
                    "oracle_all_boxes": round(oracle_all, 5),
                }
            )
            ratio_own.append(est_own.scale / oracle if est_own.ok else np.nan)
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
            "scale_spread": spread,
            "within_15pct_of_oracle": within(ratio),
            # each image's own estimate (the same number as the above without pooling)
            "within_15pct_of_oracle_image": within(np.asarray(ratio_own, float)),
            "median_ratio_to_oracle": round(float(np.nanmedian(ratio)), 4),
            # the oracle measured on every box, cut ones included (before 2026-12-04)
            "within_15pct_of_oracle_all_boxes": within(np.asarray(ratio_all, float)),
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


def refined(model, ds, cell_px: float, settings, autocast=None) -> tuple[object, list, dict]:
    """Detector-refined scale per image (segmentation.magnification.refine_scale, from
    each record's estimated scale s0): the dataset at the kept scales, the kept passes'
    predictions (for :func:`evaluate`) and how close s0, s1 and the kept scale came to
    the oracle scale (within 15 % overall and per source)."""
    from dataclasses import replace

    import numpy as np

    from segmentation.datasets import SmearDataset, auto_scale
    from segmentation.engine import predict
    from segmentation.magnification import refine_scale

    recs, preds, per_image, n_passes = [], [], [], {}
    for rec in ds:

        def detect(s, rec=rec):
            one = DetectionDataset([replace(rec, scale=s)])
            p = predict(model, one, torch.device("cpu"), 1, autocast)[0]
            return (s, p), p["boxes"] / s, p["scores"]

        (s, p), r = refine_scale(detect, rec.scale, (rec.height, rec.width), cell_px, settings)
        recs.append(replace(rec, scale=s))
        preds.append(p)
        n_passes[len(r.scales)] = n_passes.get(len(r.scales), 0) + 1
        if rec.wbcs:
            per_image.append(
                {
                    "image": Path(rec.path).name,
                    "width": rec.width,
                    "s0": round(r.s0, 5),
                    "s1": None if not np.isfinite(r.s1) else round(r.s1, 5),
                    "n_boxes": r.n_boxes,
                    "scale": round(r.scale, 5),
                    "measured": round(r.measured, 5),
                    "passes": len(r.scales),
                    "oracle": round(auto_scale(rec, cell_px), 5),
                    "oracle_all_boxes": round(auto_scale(rec, cell_px, edge_px=None), 5),
                }
            )

    def within(q) -> float:
        q = np.asarray(q, float)
        return round(float(np.mean(np.abs(np.nan_to_num(q, nan=9.0) - 1) <= 0.15)), 4)

    def table(key: str) -> dict:
        q, q_all = {}, []
        for row in per_image:
            v = row[key] if row[key] is not None else row["s0"]  # no s1: s0 is kept
            q.setdefault(f"width_{row['width']}", []).append(v / row["oracle"])
            q_all.append(v / row["oracle_all_boxes"])
        allq = [v for vs in q.values() for v in vs]
        return {
            "within_15pct_of_oracle": within(allq),
            "median_ratio_to_oracle": round(float(np.median(allq)), 4),
            # the oracle measured on every box, cut ones included (before 2026-12-04)
            "within_15pct_of_oracle_all_boxes": within(q_all),
            "within_15pct_by_source": {k: within(v) for k, v in sorted(q.items())},
        }

    out = {
        "settings": vars(settings),
        "images_by_passes": n_passes,
        "images_without_s1": int(sum(r["s1"] is None for r in per_image)),
        "kept": table("scale"),
        # the scale before any probe pass (--refine-probe): the measured magnification
        "measured": table("measured"),
        "s1": table("s1"),
        "s0": table("s0"),
        "per_image": per_image,
    }
    return SmearDataset(recs), preds, {"scale_refined": out}


def predict_padded(model, dataset, pad_px: float, mode: str) -> list[dict]:
    """:func:`segmentation.engine.predict` on each image padded by ``pad_px`` working px
    (``reflect``: mirrored at the edge; ``constant``: the image's median colour), boxes
    shifted back and clipped to the image, detections left with less than 2 px inside
    dropped, masks cropped to the image."""
    import torch.nn.functional as F

    model.eval()
    p = int(round(pad_px))
    out = []
    with torch.no_grad():
        for i in range(len(dataset)):
            img = dataset[i][0]
            h, w = img.shape[1:]
            if mode == "constant":
                bg = img.flatten(1).median(1).values[:, None, None]
                x = bg.expand(3, h + 2 * p, w + 2 * p).clone()
                x[:, p : p + h, p : p + w] = img
            else:
                x = F.pad(img[None], (p, p, p, p), mode="reflect")[0]
            r = model([x])[0]
            b = r["boxes"].float().numpy() - p
            b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
            b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
            keep = (b[:, 2] - b[:, 0] >= 2) & (b[:, 3] - b[:, 1] >= 2)
            masks = (r["masks"][:, 0, p : p + h, p : p + w] > 0.5).numpy()
            out.append(
                {
                    "boxes": b[keep],
                    "scores": r["scores"].float().numpy()[keep],
                    "masks": masks[keep],
                }
            )
    return out


def by_source(
    model, ds, threshold: float, preds: list, ignore_edge_px: float | None = None
) -> dict[str, dict]:
    """WBC box/mask AP of each source (``width_W``: image width tells TXL-PBC's four
    microscopes apart, docs/segmentation_infer.md) scored on its own images
    (``preds``: the predictions of ``ds``'s images in order)."""
    from segmentation.datasets import SmearDataset

    groups: dict[str, list] = {}
    for i, rec in enumerate(ds):
        groups.setdefault(f"width_{rec.width}", []).append(i)
    out = {}
    for name, idx in sorted(groups.items()):
        sub = SmearDataset([ds.images[i] for i in idx])
        r = evaluate(
            model,
            DetectionDataset(sub.images),
            torch.device("cpu"),
            threshold,
            predictions=[preds[i] for i in idx],
            ignore_edge_px=ignore_edge_px,
        )
        d = r.as_dict()
        out[name] = {
            k: d.get(k)
            for k in ("n_images", "n_gt", "box_ap50", "mask_ap50", "recall", "precision")
        }
    return out


def main(argv: list[str] | None = None) -> None:
    t_start = time.perf_counter()  # the JSON's "seconds" times the scoring only
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
    ap.add_argument(
        "--scale",
        default="auto",
        help="auto (ORACLE: ground-truth boxes) | estimate (from the image) | refine "
        "(estimate, then the detector's own boxes: refine_scale) | a number",
    )
    ap.add_argument(
        "--s0-from",
        default=None,
        help="JSON of an earlier --scale estimate/refine run: reuse its per-image estimates",
    )
    ap.add_argument("--refine-min-score", type=float, default=None)
    ap.add_argument("--refine-edge-px", type=float, default=None)
    ap.add_argument("--refine-tolerance", type=float, default=None)
    ap.add_argument("--refine-passes", type=int, default=None)
    ap.add_argument("--refine-choose", default=None, choices=["last", "score"])
    ap.add_argument(
        "--refine-probe",
        default=None,
        help="comma-separated factors: extra passes at the kept scale times each, kept "
        "when their top-k mean score beats it by --refine-probe-margin (RefineSettings.probe)",
    )
    ap.add_argument("--refine-probe-margin", type=float, default=None)
    ap.add_argument(
        "--scale-spread",
        default=str(SCALE_SPREAD),
        help="with --scale estimate/refine: each estimate held within this factor of the "
        "median estimate of the images of its size, as stage=segment does "
        "(segmentation.scale_spread); 1: the median for all; none: each image its own",
    )
    ap.add_argument("--cell-px", type=float, default=40.0)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--by-source",
        action="store_true",
        help="also score each source (image width: TXL-PBC's microscopes) on its own",
    )
    ap.add_argument(
        "--bf16",
        default="off",
        choices=["off", "backbone", "all"],
        help="bf16 on the CPU: the backbone only (segmentation.cpu_bf16) or every op",
    )
    ap.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    ap.add_argument(
        "--ignore-edge-px",
        type=float,
        default=None,
        help="ground-truth cells cut by the image edge (box within this many px of it) are "
        "ignore regions: the whole-cell score (default: every box counts)",
    )
    ap.add_argument(
        "--edge-pad",
        type=float,
        default=0.0,
        help="experiment (not the pipeline's behaviour): pad each image by this many working "
        "px (--edge-pad-mode) before the detector, boxes clipped back to the image, so cells "
        "cut by the edge look whole-ish; scored at the kept scales (measured: no gain)",
    )
    ap.add_argument("--edge-pad-mode", default="reflect", choices=["reflect", "constant"])
    ap.add_argument(
        "--score-floor",
        type=float,
        default=None,
        help="the detector keeps boxes scoring at least this (its ROI heads' score_thresh; "
        "default: the checkpoint's own, torchvision's 0.05). AP integrates the ranking to its "
        "end, so a lower floor can only add low-ranked boxes: an evaluation convention, not "
        "what stage=segment keeps (segmentation.score_threshold)",
    )
    ap.add_argument(
        "--gt-review",
        default=None,
        help="CSV of reviewed ground-truth boxes (image,x0,y0,x1,y1,category[,note]; "
        "docs/reviews/txl_pbc_val_wbc_boxes.csv): each listed white-cell box takes the "
        "reviewed category before scoring (the oracle scale reads the corrected boxes too); "
        "default: the annotations as published",
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.bf16 == "all" else None
    if a.format in ("voc", "yolo"):
        ds = READERS[a.format](a.path, splits=[a.split])
    elif a.format == "mask_png":
        ds = READERS["mask_png"](a.path).split(a.split)
    else:
        ds = READERS["coco"](a.path).split(a.split)
    if not len(ds):  # scoring nothing printed AP 0.0 as if measured
        raise FileNotFoundError(
            f"{a.path}: no image of split {a.split!r} (a COCO file without per-image 'split' "
            f"fields has only 'train'; --split train scores them all)"
        )
    extra, reviewed = {}, {}
    if a.gt_review:
        from segmentation.datasets import apply_box_review, read_box_review

        reviewed = {"gt_review": {"file": a.gt_review}}
        reviewed["gt_review"] |= apply_box_review(ds, read_box_review(a.gt_review))
    if a.every > 1:
        from segmentation.datasets import SmearDataset

        ds = SmearDataset(list(ds)[:: a.every])
    if a.scale in ("estimate", "refine"):
        cached = None
        if a.s0_from:
            prev = json.loads(Path(a.s0_from).read_text())
            rows = prev.get("scale_estimate", {}).get("per_image") or [
                {**r, "scale": r["s0"], "ruler": "white"}
                for r in prev.get("scale_refined", {}).get("per_image", [])
            ]
            # scales are proportional to cell_px: rescale the earlier run's to this one's
            k = a.cell_px / float(prev.get("cell_px", 40.0))
            cached = {r["image"]: {**r, "scale": r["scale"] * k} for r in rows}
        ds, extra = estimated(
            ds,
            a.cell_px,
            a.wbc_per_rbc,
            a.ruler,
            a.white_box_per_diameter,
            cached,
            None if a.scale_spread.lower() in ("none", "null") else float(a.scale_spread),
        )
    else:
        ds = with_scale(ds, None if a.scale == "auto" else float(a.scale), a.cell_px)
    ds = ds.renumber()
    if a.scale_only:
        out = {**extra, "cell_px": a.cell_px}
    else:
        if not a.checkpoint:
            ap.error("checkpoint is required unless --scale-only")
        model, _ = load_checkpoint(a.checkpoint)
        if a.score_floor is not None:
            model.roi_heads.score_thresh = float(a.score_floor)
        if a.bf16 == "backbone":
            from segmentation.inference import use_bf16_backbone

            use_bf16_backbone(model)
        preds = None
        if a.scale == "refine":
            from segmentation.magnification import RefineSettings

            given = {
                "min_score": a.refine_min_score,
                "edge_px": a.refine_edge_px,
                "tolerance": a.refine_tolerance,
                "max_passes": a.refine_passes,
                "choose": a.refine_choose,
                "probe": None
                if a.refine_probe is None
                else tuple(float(f) for f in a.refine_probe.split(",") if f),
                "probe_margin": a.refine_probe_margin,
            }
            st = RefineSettings(**{k: v for k, v in given.items() if v is not None})
            ds, preds, more = refined(model, ds, a.cell_px, st, autocast)
            extra.update(more)
        if a.edge_pad > 0:  # the same scales, the detector on padded images
            preds = predict_padded(model, DetectionDataset(ds.images), a.edge_pad, a.edge_pad_mode)
            extra.update({"edge_pad": a.edge_pad, "edge_pad_mode": a.edge_pad_mode})
        if preds is None:  # once, shared by the overall and the per-source scores
            preds = predict(
                model, DetectionDataset(ds.images), torch.device("cpu"), a.batch_size, autocast
            )
        r = evaluate(
            model,
            DetectionDataset(ds.images),
            torch.device("cpu"),
            a.threshold,
            predictions=preds,
            ignore_edge_px=a.ignore_edge_px,
        )
        out = {**r.as_dict(), **extra, "cell_px": a.cell_px, "bf16": a.bf16}
        out["score_floor"] = float(model.roi_heads.score_thresh)
        out["ignore_edge_px"] = a.ignore_edge_px
        if a.by_source:
            out["by_source"] = by_source(model, ds, a.threshold, preds, a.ignore_edge_px)
    out.update(reviewed)
    out["seconds_total"] = round(time.perf_counter() - t_start, 1)  # reading, scale, detector
    shown = out
    for key in ("scale_estimate", "scale_refined"):  # the per-image lists go to --out only
        if key in out:
            shown = {**shown, key: {k: v for k, v in out[key].items() if k != "per_image"}}
    print(json.dumps(shown, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    from segmentation.datasets import AnnotationError
    from segmentation.io import UnsafeCheckpointError

    try:
        main()
    except (AnnotationError, UnsafeCheckpointError, FileNotFoundError) as e:
        # bad input (a folder given for --format coco's JSON, a damaged checkpoint):
        # one line, no traceback
        sys.exit(f"eval_segmentation.py: {e}")
