"""Detector WBC box AP50 at the estimated scale times a factor, and picking the factor
by the detector's own confidence.

Usage:
  python scripts/scale_factor_check.py CKPT --s0-from EST.json --format yolo \
      --path ../shared/data/smears/txl_pbc --split train --every 4 [--out FILE.pkl]

``EST.json``: a ``scripts/eval_segmentation.py --scale estimate`` output (its per-image
scales s0; images without a row are left out). For every image the detector runs at
``s0 * f`` for each factor (``--factors``); printed per rule: box AP50 overall and per
source (image width) and the fraction of images within 15 % of the oracle scale:

- ``fixed f``: every image at ``s0 * f``;
- ``top{k} margin m``: per image the factor whose top-k detection scores average highest,
  if it beats f = 1 by more than m (the detector's confidence as the judge of scale);
- ``nearest-oracle``: the factor nearest the ground-truth-box scale (a bound, not a method).

Docs: docs/segmentation_infer.md, "Detector-refined scale".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from segmentation.datasets import READERS, DetectionDataset, SmearDataset, auto_scale
from segmentation.engine import evaluate, predict
from segmentation.model import load_checkpoint


def run_grid(model, ds, cache: dict, factors: list[float]) -> list[dict]:
    """Per image: s0 and the detections (source px) at every ``s0 * f``."""
    res = []
    for rec in ds:
        row = cache.get(Path(rec.path).name)
        if row is None:
            continue
        s0, per = float(row["scale"]), {}
        for f in factors:
            s = s0 * f
            p = predict(model, DetectionDataset([replace(rec, scale=s)]), torch.device("cpu"))[0]
            per[f] = {"boxes": p["boxes"] / s, "scores": p["scores"]}
        res.append({"rec": rec, "s0": s0, "per": per})
    return res


def score(res: list[dict], choice: list[float], cell_px: float) -> tuple[dict, float]:
    """Box AP50 (all + per width) with each image at its chosen factor; within-15 %."""
    recs, preds = [], []
    for r, f in zip(res, choice):
        s = r["s0"] * f
        recs.append(replace(r["rec"], scale=s))
        p = r["per"][f]
        k = len(p["scores"])
        preds.append(
            {"boxes": p["boxes"] * s, "scores": p["scores"], "masks": np.zeros((k, 1, 1), bool)}
        )
    groups: dict = {"all": list(range(len(recs)))}
    for i, rc in enumerate(recs):
        groups.setdefault(rc.width, []).append(i)
    out = {}
    for g, idx in groups.items():
        with contextlib.redirect_stdout(io.StringIO()):
            e = evaluate(
                None,
                DetectionDataset([recs[i] for i in idx]),
                torch.device("cpu"),
                0.5,
                predictions=[preds[i] for i in idx],
            )
        out[g] = round(e.box_ap50, 3)
    w = [
        abs(r["s0"] * f / auto_scale(r["rec"], cell_px) - 1) <= 0.15
        for r, f in zip(res, choice)
        if r["rec"].wbcs
    ]
    return out, round(float(np.mean(w)), 3)


def pick(res: list[dict], factors: list[float], k: int, margin: float) -> list[float]:
    """Per image the factor with the highest mean top-k score (f = 1 unless beaten by
    more than ``margin``; ties go to the factor nearest 1)."""

    def conf(p) -> float:
        s = np.sort(p["scores"])[::-1][:k]
        return float(s.mean()) if s.size else 0.0

    out = []
    for r in res:
        c = {f: conf(r["per"][f]) for f in factors}
        best = max(factors, key=lambda f: (c[f], -abs(np.log(f))))
        out.append(best if c[best] > c[1.0] + margin else 1.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--s0-from", required=True)
    ap.add_argument("--format", required=True, choices=["yolo", "voc"])
    ap.add_argument("--path", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--cell-px", type=float, default=40.0)
    ap.add_argument("--factors", default="0.8,0.9,1.0,1.12,1.25")
    ap.add_argument("--out", default=None, help="pickle of the detections (reuse: --grid)")
    ap.add_argument("--grid", default=None, help="pickle of an earlier run: no detector runs")
    a = ap.parse_args()
    torch.set_num_threads(1)
    factors = [float(f) for f in a.factors.split(",")]
    if 1.0 not in factors:
        ap.error("--factors must include 1.0 (the estimate itself)")
    if a.grid:
        res = pickle.loads(Path(a.grid).read_bytes())["res"]
    else:
        ds = READERS[a.format](a.path, splits=[a.split])
        ds = SmearDataset(list(ds)[:: a.every]).renumber()
        cache = {
            r["image"]: r
            for r in json.loads(Path(a.s0_from).read_text())["scale_estimate"]["per_image"]
        }
        model, _ = load_checkpoint(a.checkpoint)
        res = run_grid(model, ds, cache, factors)
        if a.out:
            Path(a.out).write_bytes(pickle.dumps({"F": factors, "res": res}))
    print(f"{len(res)} images, factors {factors}")
    for f in factors:
        print(f"fixed {f}", *score(res, [f] * len(res), a.cell_px))
    for k in (1, 2, 3):
        for m in (0.0, 0.02, 0.05):
            print(f"top{k} margin {m}", *score(res, pick(res, factors, k, m), a.cell_px))
    near = [
        min(factors, key=lambda f: abs(np.log(r["s0"] * f / auto_scale(r["rec"], a.cell_px))))
        for r in res
    ]
    print("nearest-oracle", *score(res, near, a.cell_px))


if __name__ == "__main__":
    main()
