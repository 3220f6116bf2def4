"""Do the detector's own features of a cell tell its type? (issue 9: "encode the RoI features")

The seed paper encodes each detected cell's Mask R-CNN RoI features. Before building
that input, this measures what those features know about cell type on a
``paired.h5ad``: every masked crop goes through the ``segment_train`` detector's
backbone + FPN, and two kinds of per-cell features are scored with the same kNN(15)
on the same seeded specimen split as ``scripts/image_branch_check.py``:

* ``fpn{0..3}``: each FPN level's map averaged inside the cell mask (128-d each),
* ``roi``: the box head's representation of the crop's whole box (RoIAlign over the
  FPN levels -> TwoMLPHead), i.e. the RoI feature the detector classifies with.

Each is standardised, reduced to 16 principal components (as the latent has 16
shared dims) and scored by kNN; a logistic regression on all dims gives the linear
ceiling. Raw-pixel PCA is printed for reference.

    .venv/bin/python scripts/detector_features_check.py PAIRED DETECTOR.pt [--seeds 0 1]

The last line reads ``best detector feature kNN: X.XXX (NAME) | pixel PCA P.PPP``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _features(model, crops, masks, batch: int = 64) -> dict[str, np.ndarray]:
    """Per-cell detector features of masked crops (N, 3, S, S) in [0, 1]."""
    import torch
    import torch.nn.functional as F

    t = model.transform
    mean = torch.tensor(t.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(t.image_std).view(1, 3, 1, 1)
    out: dict[str, list] = {}
    with torch.inference_mode():
        for j in range(0, crops.shape[0], batch):
            img = crops[j : j + batch].float() / 255
            m = masks[j : j + batch].float()
            # the cell on a light, uniform smear background (what the detector saw)
            x = ((img * m + (1 - m) * 0.9) - mean) / std
            feats = model.backbone(x)
            for i, k in enumerate(["0", "1", "2", "3"]):
                mk = F.interpolate(m, size=feats[k].shape[-2:], mode="area")
                pooled = (feats[k] * mk).sum((2, 3)) / mk.sum((2, 3)).clamp_min(1e-3)
                out.setdefault(f"fpn{i}", []).append(pooled)
            s = x.shape[-1]
            boxes = [torch.tensor([[0.0, 0.0, s, s]])] * x.shape[0]
            levels = {k: feats[k] for k in ["0", "1", "2", "3"]}
            roi = model.roi_heads.box_roi_pool(levels, boxes, [(s, s)] * x.shape[0])
            out.setdefault("roi", []).append(model.roi_heads.box_head(roi))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("paired", type=Path)
    ap.add_argument("detector", type=Path, help="a segment_train model.pt")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=Path("detector_features_check.json"))
    args = ap.parse_args()

    import anndata as ad
    import torch
    from image_branch_check import _knn
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pipeline.stages.train import split_groups
    from segmentation.model import load_checkpoint
    from vae.data import UNKNOWN_LABEL, from_anndata, stratified_split

    torch.set_num_threads(1)
    adata = ad.read_h5ad(args.paired)
    d = from_anndata(adata, str(args.paired))
    model, _ = load_checkpoint(args.detector)
    model.eval()
    lab = d.labels.numpy()
    known = np.asarray(d.label_names)[lab] != UNKNOWN_LABEL
    has = d.has_image.numpy().astype(bool)
    img_rows = np.flatnonzero(has)
    feats = _features(model, d.crops[img_rows], d.masks[img_rows])
    feats["pixels"] = (
        (d.crops[img_rows].float() / 255 * d.masks[img_rows].float()).flatten(1).numpy()
    )
    at = np.full(d.n, -1)
    at[img_rows] = np.arange(img_rows.size)
    groups = split_groups(adata.obs, "specimen", args.paired)
    res: dict = {"paired": str(args.paired), "detector": str(args.detector), "seeds": {}}
    for seed in args.seeds:
        split = stratified_split(lab, 0.15, 0.15, seed, groups=groups)
        fit = np.flatnonzero(has & known & (split != "test"))
        test = np.flatnonzero(has & known & (split == "test"))
        row = {"n_test": int(test.size)}
        for name, f in feats.items():
            # pixels unscaled, as image_branch_check.py's pixel PCA
            z = f if name == "pixels" else StandardScaler().fit(f[at[fit]]).transform(f)
            pc = PCA(16, random_state=0).fit(z[at[fit]]).transform(z)
            row[f"{name}_knn"] = _knn(pc[at[fit]], lab[fit], pc[at[test]], lab[test])
            if name != "pixels":
                lr = LogisticRegression(max_iter=2000, C=0.1).fit(z[at[fit]], lab[fit])
                row[f"{name}_logreg"] = float((lr.predict(z[at[test]]) == lab[test]).mean())
        res["seeds"][str(seed)] = row
    names = [k for k in feats if k != "pixels"]
    print(
        f"{'feature':10s} "
        + " ".join(f"{'s' + s + ' kNN':>9s} {'s' + s + ' logreg':>10s}" for s in res["seeds"])
    )
    for name in [*names, "pixels"]:
        cells = []
        for row in res["seeds"].values():
            lr = row.get(f"{name}_logreg")
            cells.append(f"{row[f'{name}_knn']:9.3f} {lr if lr is None else round(lr, 3)!s:>10s}")
        print(f"{name:10s} " + " ".join(cells))
    mean = {n: float(np.mean([r[f"{n}_knn"] for r in res["seeds"].values()])) for n in feats}
    best = max(names, key=mean.get)
    res["mean_knn"] = mean
    args.out.write_text(json.dumps(res, indent=2))
    print(f"best detector feature kNN: {mean[best]:.3f} ({best}) | pixel PCA {mean['pixels']:.3f}")


if __name__ == "__main__":
    main()
