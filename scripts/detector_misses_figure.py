"""The detector's misses and false positives on one source, drawn (issue 10).

Runs a detector on the images of one TXL-PBC source (image width tells its four
microscopes apart) at the oracle scale (median ground-truth WBC box side -> ``cell_px``,
so the scale estimate is out of the picture), matches detections with score >= 0.5 to
the ground-truth WBC boxes at IoU 0.5, prints how many images have a miss or a false
positive, and draws up to 12 of them: ground truth green, detections red (dashed, with
their score)::

    PYTHONPATH=. .venv/bin/python scripts/detector_misses_figure.py \\
        segmentation/weights/wbc_detector.pt --width 575 --out misses.png

Docs: docs/segmentation_train.md ("Whole cells").
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def misses(model, records, cell_px: float, threshold: float = 0.5) -> list[dict]:
    """Per image with an error: its record, ground-truth and detected boxes (source px),
    scores, and the counts of misses (``fn``) and false positives (``fp``)."""
    from torchvision.ops import box_iou

    from segmentation.datasets import DetectionDataset, auto_scale
    from segmentation.engine import predict

    out = []
    for rec in records:
        s = auto_scale(rec, cell_px)
        p = predict(model, DetectionDataset([replace(rec, scale=s)]), torch.device("cpu"))[0]
        keep = p["scores"] >= threshold
        det = torch.as_tensor(p["boxes"][keep] / s, dtype=torch.float32).reshape(-1, 4)
        gt = torch.as_tensor(
            np.array([a.bbox for a in rec.wbcs], np.float32).reshape(-1, 4), dtype=torch.float32
        )
        iou = box_iou(gt, det) if len(gt) and len(det) else torch.zeros(len(gt), len(det))
        fn = int((iou.max(1).values < 0.5).sum()) if len(det) else len(gt)
        fp = int((iou.max(0).values < 0.5).sum()) if len(gt) else len(det)
        if fn or fp:
            out.append(
                {"rec": rec, "gt": gt.numpy(), "det": det.numpy(), "scores": p["scores"][keep]}
                | {"fn": fn, "fp": fp}
            )
    return out


def figure(errors: list[dict], path: Path, n: int = 12) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(2, 6, figsize=(18, 6))
    for a in ax.ravel():
        a.axis("off")
    for a, e in zip(ax.ravel(), errors[:n]):
        a.imshow(Image.open(e["rec"].path).convert("RGB"))
        for b in e["gt"]:
            a.add_patch(plt.Rectangle(b[:2], b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=2))
        for b, sc in zip(e["det"], e["scores"]):
            a.add_patch(
                plt.Rectangle(b[:2], b[2] - b[0], b[3] - b[1], fill=False, ec="red", ls="--")
            )
            a.text(b[0], b[1], f"{sc:.2f}", color="red", fontsize=7)
        a.set_title(f"missed {e['fn']}, false positive {e['fp']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def main() -> None:
    from segmentation.datasets import READERS
    from segmentation.model import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--path", default=str(ROOT.parent / "shared" / "data" / "smears" / "txl_pbc"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--width", type=int, required=True, help="image width of the source")
    ap.add_argument("--cell-px", type=float, default=40.0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = load_checkpoint(a.checkpoint)
    recs = [r for r in READERS["yolo"](a.path, splits=[a.split]) if r.width == a.width]
    errors = misses(model, recs, a.cell_px)
    print(
        f"{len(recs)} images; {len(errors)} with errors; missed {sum(e['fn'] for e in errors)}, "
        f"false positives {sum(e['fp'] for e in errors)}"
    )
    figure(errors, a.out)


if __name__ == "__main__":
    main()
