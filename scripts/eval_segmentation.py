"""Evaluate a segment_train checkpoint on any annotated smear set (pycocotools).

Usage:
  python scripts/eval_segmentation.py CKPT --format yolo --path ../shared/data/smears/txl_pbc \
      --split val [--scale auto|FLOAT] [--cell-px 40] [--threshold 0.5] [--out FILE.json]

`--scale auto` scales each image so its median WBC box side is `--cell-px` (uses the
ground-truth boxes, like `scale: null` sources in training). Prints the metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from segmentation.datasets import READERS, DetectionDataset, with_scale
from segmentation.engine import evaluate
from segmentation.model import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--format", required=True, choices=sorted(READERS))
    ap.add_argument("--path", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--scale", default="auto")
    ap.add_argument("--cell-px", type=float, default=40.0)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.format in ("voc", "yolo"):
        ds = READERS[a.format](a.path, splits=[a.split])
    elif a.format == "mask_png":
        ds = READERS["mask_png"](a.path).split(a.split)
    else:
        ds = READERS["coco"](a.path).split(a.split)
    scale = None if a.scale == "auto" else float(a.scale)
    ds = with_scale(ds, scale, a.cell_px).renumber()
    model, _ = load_checkpoint(a.checkpoint)
    r = evaluate(model, DetectionDataset(ds.images), torch.device("cpu"), a.threshold)
    out = r.as_dict()
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
