"""Do the kept cells hold the whole white cell, or only its nucleus?

A detector trained with every image scaled so its white cells are ``cell_px`` boxes only
the nucleus (or the nucleus and part of the cytoplasm) of a cell much larger than its
neighbours: a monocyte or a blast with broad pale cytoplasm. Box AP50 hides it (a nucleus
box often still overlaps the cell's box by 0.5); the crop that reaches the image branch
has lost the cytoplasm, and with it the nucleus : cytoplasm ratio that tells maturation
stages apart. This script segments annotated smears the way ``stage=segment`` does
(scale estimated from the image and refined by the detector; the default filters and
``trim_rim``) with each of ``--models``, and scores the *kept* cells against the
ground-truth white-cell boxes (boxes cut by the image edge ignored):

* ``recall50`` / ``recall75``: truth cells matched by a kept cell at box IoU >= 0.5 / 0.75;
* ``precision50``: kept cells that match a truth cell at IoU >= 0.5;
* ``partial``: of the truth cells a kept cell overlaps (IoU >= 0.1), the share whose best
  kept box covers < 70 % of the truth box (the cell cut down to its nucleus);
* ``mean_iou``: mean best box IoU over those truth cells; ``s_per_image``: wall time
  (state the machine's load).

Usage::

    python scripts/whole_cell_check.py [--models shipped outputs/X/segment_train/model.pt] \
        [--shared ../shared/data] [--every N] [--max-images N] [--out outputs/whole_cell_check.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) xyxy -> (N, M) IoU and (N, M) share of each ``b`` box covered
    (the evaluation's own box geometry, ``segmentation.engine``)."""
    from segmentation.engine import box_intersection
    from segmentation.engine import box_iou as iou_of

    if not len(a) or not len(b):
        return np.zeros((len(a), len(b))), np.zeros((len(a), len(b)))
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return iou_of(a, b), box_intersection(a, b) / area_b[None]


def score_image(kept: np.ndarray, truth: np.ndarray) -> dict[str, list]:
    """Per-image counts: kept boxes (K, 4) vs truth boxes (T, 4), source px."""
    iou, cover = box_iou(kept, truth)
    out = {"iou": [], "cover": [], "hit50": [], "hit75": []}
    for t in range(len(truth)):
        col = iou[:, t] if len(kept) else np.zeros(0)
        best = int(np.argmax(col)) if col.size else -1
        b_iou = float(col[best]) if best >= 0 else 0.0
        out["hit50"].append(b_iou >= 0.5)
        out["hit75"].append(b_iou >= 0.75)
        if b_iou >= 0.1:
            out["iou"].append(b_iou)
            out["cover"].append(float(cover[best, t]))
    out["kept_hit50"] = [
        bool((iou[k] >= 0.5).any()) if len(truth) else False for k in range(len(kept))
    ]
    return out


def summary(rows: list[dict[str, list]], seconds: float) -> dict:
    """The table's numbers over ``rows`` (:func:`score_image` of each image)."""
    keys = ("iou", "cover", "hit50", "hit75", "kept_hit50")
    cat = {k: [v for r in rows for v in r[k]] for k in keys}
    n_truth = len(cat["hit50"])
    nan = float("nan")
    return {
        "images": len(rows),
        "truth_cells": n_truth,
        "kept_cells": len(cat["kept_hit50"]),
        "recall50": float(np.mean(cat["hit50"])) if n_truth else nan,
        "recall75": float(np.mean(cat["hit75"])) if n_truth else nan,
        "precision50": float(np.mean(cat["kept_hit50"])) if cat["kept_hit50"] else nan,
        "partial": float(np.mean(np.asarray(cat["cover"]) < 0.7)) if cat["cover"] else nan,
        "mean_iou": float(np.mean(cat["iou"])) if cat["iou"] else nan,
        "s_per_image": seconds / max(1, len(rows)),
    }


def main() -> None:
    import torch

    from pipeline.config import SegmentationConfig
    from pipeline.stages.segment import settings_from_config
    from segmentation.autoscale import pooled_estimates, segment_estimated
    from segmentation.datasets import read_voc, read_yolo
    from segmentation.inference import MaskRCNNDetector
    from segmentation.io import read_rgb
    from segmentation.magnification import RefineSettings, whole_boxes
    from segmentation.model import load_checkpoint
    from segmentation.shipped import shipped_detector

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shipped"], help="'shipped' or model.pt files")
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--every", type=int, default=1, help="every N-th image of each set")
    ap.add_argument("--max-images", type=int, default=None, help="per set (quick runs)")
    ap.add_argument("--sets", nargs="+", default=["txl_val", "bccd_test"])
    ap.add_argument("--out", default="outputs/whole_cell_check.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    shared = Path(a.shared)
    base = settings_from_config(SegmentationConfig())  # stage=segment's defaults
    readers = {
        "txl_val": lambda: read_yolo(shared / "smears/txl_pbc", ["val"]),
        "bccd_test": lambda: read_voc(shared / "smears/bccd", ["test"]),
    }
    records = {n: list(readers[n]().images)[:: a.every][: a.max_images] for n in a.sets}
    result: dict = {"models": {}}
    for name in a.models:
        path = shipped_detector() if name == "shipped" else Path(name)
        model, ckpt = load_checkpoint(path)
        model.eval()
        det = MaskRCNNDetector(model, "cpu")
        cell_px = float(ckpt.get("cell_px") or 40.0)
        per_set = {}
        for set_name, recs in records.items():
            pooled = pooled_estimates([r.path for r in recs], cell_px, base.input_scale)
            by_source: dict[str, list] = {}
            secs: dict[str, float] = {}
            for r in recs:
                rd = read_rgb(Path(r.path))
                if not rd.ok:
                    continue
                src = f"{r.width}x{r.height}"  # TXL-PBC: one microscope per image size
                t0 = time.perf_counter()
                cells, _ = segment_estimated(
                    det,
                    rd.image,
                    Path(r.path).name,
                    base,
                    cell_px,
                    refine=RefineSettings(),
                    estimate=pooled.get(Path(r.path)),
                )
                secs[src] = secs.get(src, 0.0) + time.perf_counter() - t0
                kept = cells.table[cells.table.kept][["x0", "y0", "x1", "y1"]].to_numpy(float)
                truth = np.asarray([w.bbox for w in r.wbcs], float).reshape(-1, 4)
                truth = truth[whole_boxes(truth, r.width, r.height, 2.0)]
                by_source.setdefault(src, []).append(score_image(kept, truth))
            rows = {s: summary(v, secs[s]) for s, v in sorted(by_source.items())}
            rows["all"] = summary([x for v in by_source.values() for x in v], sum(secs.values()))
            per_set[set_name] = rows
        result["models"][str(path)] = {"cell_px": cell_px, "sets": per_set}
    keys = ("recall50", "recall75", "precision50", "partial", "mean_iou", "s_per_image")
    print(f"{'model':28} {'set':10} {'source':9} " + " ".join(f"{k:>11}" for k in keys))
    for path, res in result["models"].items():
        short = path if len(path) <= 28 else "..." + path[-25:]
        for set_name, rows in res["sets"].items():
            for src, row in rows.items():
                vals = " ".join(f"{row[k]:11.3f}" for k in keys)
                print(f"{short:28} {set_name:10} {src:9} {vals}  (n={row['truth_cells']})")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
