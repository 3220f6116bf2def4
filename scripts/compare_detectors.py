"""Score several detector checkpoints on one annotated set, side by side.

Usage:
  python scripts/compare_detectors.py CKPT [CKPT ...] --format yolo \
      --path ../shared/data/smears/txl_pbc --split val --scale estimate [--by-source] \
      [--out FILE.json]

The same measurement as ``scripts/eval_segmentation.py`` (pycocotools WBC box AP50,
recall/precision at ``--threshold``; ``--scale estimate`` measures each image's
magnification, ``auto`` is the ground-truth-box ORACLE, a number is a fixed scale),
but the scaled data set is built once for all checkpoints and the per-source
scores (``--by-source``: image width = TXL-PBC's microscope) reuse each model's
predictions, so comparing N models costs N detection passes and one scale estimate.
Used to decide whether a retrained model replaces the shipped detector
(docs/segmentation_train.md, "Shipped detector"). Prints JSON: checkpoint -> metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_segmentation import estimated  # noqa: E402

from segmentation.datasets import READERS, DetectionDataset, SmearDataset, with_scale  # noqa: E402
from segmentation.engine import evaluate, predict  # noqa: E402
from segmentation.model import load_checkpoint  # noqa: E402

KEYS = ("n_images", "n_gt", "box_ap", "box_ap50", "mask_ap50", "recall", "precision")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--format", required=True, choices=sorted(READERS))
    ap.add_argument("--path", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--scale", default="estimate")
    ap.add_argument("--cell-px", type=float, default=40.0)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--by-source", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = READERS[a.format](a.path, splits=[a.split])
    out: dict = {"scale": a.scale, "split": a.split, "path": a.path}
    if a.scale == "estimate":
        ds, extra = estimated(ds, a.cell_px, None, "auto", None)
        se = extra["scale_estimate"]
        out["scale_estimate"] = {k: v for k, v in se.items() if k != "per_image"}
    else:
        ds = with_scale(ds, None if a.scale == "auto" else float(a.scale), a.cell_px)
    ds = ds.renumber()
    recs = list(ds)
    dev = torch.device("cpu")
    for ck in a.checkpoints:
        model, _ = load_checkpoint(ck)
        full = DetectionDataset(ds.images)
        preds = predict(model, full, dev, 2, None)
        d = evaluate(model, full, dev, a.threshold, predictions=preds).as_dict()
        res = {k: d.get(k) for k in KEYS}
        if a.by_source:
            groups: dict[str, list[int]] = {}
            for i, rec in enumerate(recs):
                groups.setdefault(f"width_{rec.width}", []).append(i)
            res["by_source"] = {}
            for name, idx in sorted(groups.items()):
                sub = DetectionDataset(SmearDataset([recs[i] for i in idx]).images)
                s = evaluate(model, sub, dev, a.threshold, predictions=[preds[i] for i in idx])
                res["by_source"][name] = {k: s.as_dict().get(k) for k in KEYS}
        out[ck] = res
        print(json.dumps({ck: res}), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
