"""Speed (and, with a trained checkpoint, WBC AP50) of stage=segment-style inference.

Times, in one process on this CPU, over the same 640x480 BCCD smears:

* ``ours``: the CPU default config (``segmentation=small_cpu data=bccd``, read
  through Hydra exactly as ``stage=segment`` reads it): image read, rescale to
  the trained cell size, tiled Mask R-CNN, merge, filters and crops
  (``segmentation.cells.segment_image``);
* ``torchvision``: the default ``maskrcnn_resnet50_fpn`` recipe (min_size 800,
  max_size 1333, 1000 proposals), untrained weights (no downloads here), image
  read + ``model([image])`` only (no cropping).

Untrained networks are fine for timing; both then return about the maximum
number of detections, so the mask heads work as hard as they can. With
``--checkpoint`` (a ``stage=segment_train`` model.pt) "ours" uses it, and
WBC box AP50 / recall at the crop threshold are computed against the VOC
boxes (BCCD test split).

Usage::

    .venv/bin/python scripts/bench_segmentation.py --n 8 \
        --out outputs/bench/segmentation.json [--checkpoint outputs/X/segment_train/model.pt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.stages.segment import (  # noqa: E402
    detector_kwargs,
    resolve_input_scale,
    settings_from_config,
)
from segmentation.cells import segment_image  # noqa: E402
from segmentation.inference import MaskRCNNDetector  # noqa: E402
from segmentation.io import read_rgb  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as h_compose
    from hydra import initialize_config_dir

    from pipeline.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "pipeline" / "conf"), version_base=None):
        return h_compose(config_name="config", overrides=overrides)


def load_or_build(cfg, checkpoint: str | None):
    """``(model, ckpt)``: a trained checkpoint, or the untrained model of ``cfg``.

    Untrained: exactly what stage=segment_train would build (its ``model_args_from``).
    """
    from segmentation.model import build_maskrcnn, load_checkpoint

    if checkpoint:
        return load_checkpoint(checkpoint)
    from pipeline.stages.segment_train import model_args_from

    margs = model_args_from(cfg)
    return build_maskrcnn(**margs), {"model_args": margs}


def voc_wbc_boxes(xml: Path) -> np.ndarray:
    """(M, 4) float ``x0, y0, x1, y1`` of the WBC objects of one VOC file."""
    boxes = []
    for obj in ET.parse(xml).getroot().iter("object"):
        if (obj.findtext("name") or "").strip().lower() not in ("wbc", "white blood cell"):
            continue
        b = obj.find("bndbox")
        x0, y0, x1, y1 = (float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x0, y0, x1, y1])
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def box_ap50(gt: list[np.ndarray], dets: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """pycocotools box AP50 (single class) + recall over all detections given."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, res = [], [], []
    for i, (g, (b, s)) in enumerate(zip(gt, dets)):
        images.append({"id": i, "width": 640, "height": 480})
        for x0, y0, x1, y1 in g:
            w, h = x1 - x0, y1 - y0
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for (x0, y0, x1, y1), sc in zip(b, s):
            res.append(
                {
                    "image_id": i,
                    "category_id": 1,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "score": float(sc),
                }
            )
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "wbc"}]}
    coco.createIndex()
    if not res:
        return {"ap50": 0.0, "ap": 0.0, "n_truth": len(anns), "n_det": 0}
    dt = coco.loadRes(res)
    ev = COCOeval(coco, dt, "bbox")
    ev.params.maxDets = [1, 10, 100]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {
        "ap": float(ev.stats[0]),
        "ap50": float(ev.stats[1]),
        "n_truth": len(anns),
        "n_det": len(res),
    }


def recall_at(gt: list[np.ndarray], dets: list[tuple[np.ndarray, np.ndarray]], thr: float) -> float:
    """Share of truth boxes matched (IoU >= 0.5, greedy by score) by detections scoring >= thr."""
    from torchvision.ops import box_iou

    hit = total = 0
    for g, (b, s) in zip(gt, dets):
        total += len(g)
        keep = s >= thr
        if not len(g) or not keep.any():
            continue
        iou = box_iou(torch.as_tensor(b[keep]), torch.as_tensor(g)).numpy()
        used = set()
        for r in np.argsort(-s[keep]):
            c = int(np.argmax(np.where([j in used for j in range(len(g))], -1, iou[r])))
            if iou[r, c] >= 0.5 and c not in used:
                used.add(c)
        hit += len(used)
    return hit / total if total else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "../shared/data/smears/bccd"))
    ap.add_argument("--split", default="test", help="BCCD ImageSets/Main split")
    ap.add_argument("--n", type=int, default=8, help="images timed per model")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint", default=None, help="our trained model.pt (else untrained)")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra overrides")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument(
        "--baseline-dets",
        type=int,
        default=0,
        help="also time the baseline capped at N detections/image (what a trained model returns)",
    )
    ap.add_argument("--out", default=str(ROOT / "outputs/bench/segmentation.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = Path(args.data)
    ids = (data / "ImageSets/Main" / f"{args.split}.txt").read_text().split()
    paths = [data / "JPEGImages" / f"{i}.jpg" for i in ids]
    n_eval = len(paths) if args.checkpoint else args.n
    paths = paths[: max(n_eval, args.n)]
    gt = [voc_wbc_boxes(data / "Annotations" / f"{p.stem}.xml") for p in paths]

    cfg = compose(["stage=segment", "data=bccd", *args.override])
    sc = cfg.segmentation
    settings = settings_from_config(sc)
    model, ckpt = load_or_build(cfg, args.checkpoint)
    if args.checkpoint:
        ours_name = f"ours (trained {sc.arch}, epoch {ckpt.get('epoch', '?')})"
    else:
        ours_name = f"ours ({sc.arch}, untrained)"
    settings.input_scale, scale_from = resolve_input_scale(cfg, ckpt)
    detector = MaskRCNNDetector(model, "cpu", **detector_kwargs(sc))

    def run_ours(p: Path):
        rd = read_rgb(p)
        cells = segment_image(detector, rd.image, p.name, settings)
        t = cells.table
        boxes = t[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
        return boxes, t.score.to_numpy(np.float64), len(t), int(t.kept.sum())

    def run_baseline(model_tv, p: Path):
        rd = read_rgb(p)
        x = torch.from_numpy(rd.image).permute(2, 0, 1).float().div_(255.0)
        with torch.inference_mode():
            out = model_tv([x])[0]
        return out["boxes"].numpy(), out["scores"].numpy(), len(out["scores"]), 0

    def timed(fn, name: str, input_desc: str) -> tuple[dict, list]:
        for p in paths[: args.warmup]:
            fn(p)
        load0 = os.getloadavg()[0]
        results, secs = [], []
        for p in paths[: args.n]:
            t0 = time.perf_counter()
            results.append(fn(p))
            secs.append(time.perf_counter() - t0)
        row = {
            "name": name,
            "input": input_desc,
            "images": len(secs),
            "seconds": round(float(np.sum(secs)), 3),
            "images_per_s": round(len(secs) / float(np.sum(secs)), 4),
            "median_s_per_image": round(float(np.median(secs)), 4),
            "mean_detections": round(float(np.mean([r[2] for r in results])), 1),
            "loadavg_1min_before": round(load0, 2),
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
        }
        return row, results

    h = w = None
    img0 = read_rgb(paths[0]).image
    h, w = img0.shape[:2]
    sw, sh = round(w * settings.input_scale), round(h * settings.input_scale)
    rows = []
    row_ours, res_ours = timed(
        run_ours, ours_name, f"{w}x{h} -> {sw}x{sh} (input_scale {settings.input_scale:g})"
    )
    rows.append(row_ours)
    if not args.skip_baseline:
        from torchvision.models.detection import maskrcnn_resnet50_fpn

        tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2).eval()
        s = min(800 / min(h, w), 1333 / max(h, w))
        row_tv, _ = timed(
            lambda p: run_baseline(tv, p),
            "torchvision maskrcnn_resnet50_fpn (min_size 800, untrained)",
            f"{w}x{h} -> {round(w * s)}x{round(h * s)}",
        )
        rows.append(row_tv)
        if args.baseline_dets:
            tv.roi_heads.detections_per_img = args.baseline_dets
            row_cap, _ = timed(
                lambda p: run_baseline(tv, p),
                f"torchvision maskrcnn_resnet50_fpn, capped at {args.baseline_dets} detections",
                f"{w}x{h} -> {round(w * s)}x{round(h * s)}",
            )
            rows.append(row_cap)
        del tv
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "note": "CPU shared with other jobs; see loadavg per row",
        },
        "images": [p.name for p in paths[: args.n]],
        "config": {
            "model_args": {k: v for k, v in ckpt["model_args"].items() if "train" not in k},
            "arch": sc.arch,
            "input_scale": settings.input_scale,
            "input_scale_from": scale_from,
            "tile_size": settings.tile_size,
            "rpn_post_nms_top_n": int(sc.rpn_post_nms_top_n),
            "max_detections_per_tile": int(sc.max_detections_per_tile),
            "score_threshold": float(sc.score_threshold),
        },
        "rows": rows,
    }
    if len(rows) >= 2:
        report["speedup"] = round(rows[0]["images_per_s"] / rows[1]["images_per_s"], 2)
    if len(rows) == 3:
        report["speedup_vs_capped"] = round(rows[0]["images_per_s"] / rows[2]["images_per_s"], 2)
    if args.checkpoint:
        # accuracy over the whole split (the timed images are its first --n)
        all_res = res_ours + [run_ours(p) for p in paths[args.n :]]
        dets = [(r[0], r[1]) for r in all_res]
        acc = box_ap50(gt, dets)
        acc["recall_at_score_threshold"] = recall_at(gt, dets, float(sc.score_threshold))
        acc["images"] = len(paths)
        report["accuracy_ours"] = acc
        report["accuracy_baseline"] = "n/a: no trained ResNet-50 checkpoint (untrained weights)"

    print(
        f"\nstage=segment-style inference, {args.n} BCCD {args.split} images, {args.threads} thread(s)"
    )
    print(f"{'model':62s} {'input':34s} {'img/s':>8s} {'s/img':>7s} {'dets':>6s} {'load':>5s}")
    for r in rows:
        print(
            f"{r['name'][:62]:62s} {r['input'][:34]:34s} {r['images_per_s']:8.3f} "
            f"{r['median_s_per_image']:7.3f} {r['mean_detections']:6.1f} {r['loadavg_1min_before']:5.2f}"
        )
    if "speedup" in report:
        print(f"speedup ours / torchvision default: {report['speedup']:.2f}x (target >= 3x)")
    if "speedup_vs_capped" in report:
        print(f"speedup ours / torchvision capped: {report['speedup_vs_capped']:.2f}x")
    if "accuracy_ours" in report:
        a = report["accuracy_ours"]
        print(
            f"ours WBC box AP50 {a['ap50']:.3f} (AP {a['ap']:.3f}), recall@{sc.score_threshold} "
            f"{a['recall_at_score_threshold']:.3f} on {a['images']} images"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
