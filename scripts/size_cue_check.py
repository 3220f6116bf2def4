"""Would the cell's size help the image latent tell the kinds apart? (issue 9)

The crops of the real chain are cut around each cell and resized, so every cell fills
its crop (mask box ~53 px of 64 for smear cells, ~58 for segmentation_wbc) and its size
is lost. This adds the size back next to a finished run's image latent, without any
training: sqrt(mask area) in the working frame of its source (source px x the preset's
``scale`` / ``scale_by_width``; segmentation_wbc, whose magnification is unknown, by
each subset's median mapped to the smear cells' median), log, z-scored on the fitted
rows, weighted w = 0 / 1 / 2 as extra latent dims, and scores kNN(15) on the test
crops (as ``knn_image``), plus the size alone and the median size per source and kind::

    .venv/bin/python scripts/size_cue_check.py lobe_s0 lobe_s1 lobe_s2

(run names under outputs/real_chain/train; needs outputs/real_chain/segment/cells.h5ad
and outputs/real_chain/pair/paired.h5ad).
"""

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import yaml
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier

from vae.checkpoint import load_model
from vae.data import UNKNOWN_LABEL, from_anndata
from vae.infer import encode_dataset

root = Path(__file__).resolve().parents[1]
shared = root.parent / "shared" / "data"  # paths.shared_data
cells = ad.read_h5ad(root / "outputs/real_chain/segment/cells.h5ad", backed="r").obs
# source scales of the real preset (pipeline/conf/preset/real.yaml)
cfg = yaml.safe_load(open(root / "pipeline/conf/preset/real.yaml"))
scales = {}
for s in cfg["data"]["segment_sources"]:
    scales[s["name"]] = (
        s.get("scale"),
        {int(k): v for k, v in (s.get("scale_by_width") or {}).items()},
    )
size = {}
for cid, r in cells.iterrows():
    sc, byw = scales[r.source]
    if byw:
        sub = {"txl_pbc_train": "train", "txl_pbc_val": "val"}[r.source]
        p = shared / "smears/txl_pbc/images" / sub / r.image
        w = Image.open(p).size[0]
        sc = byw.get(w, sc)
    size[cid] = np.sqrt(r.area) * sc
med_smear = np.median(list(size.values()))
seg = {}
for sub in ("dataset1", "dataset2"):
    d = shared / "cells/segmentation_wbc" / sub
    a = {
        f"segmentation_wbc/{sub}/{p.stem}": np.sqrt(
            (np.asarray(Image.open(p).convert("L")) > 0).sum()
        )
        for p in sorted(d.glob("*.png"))
    }
    m = np.median(list(a.values()))
    seg.update({k: v / m * med_smear for k, v in a.items()})
size.update(seg)
paired = ad.read_h5ad(root / "outputs/real_chain/pair/paired.h5ad")
ref = paired.obs.image_ref.astype(str).to_numpy()
logsize = np.array([np.log(size.get(r, np.nan)) for r in ref])
for v in sys.argv[1:]:
    run = root / "outputs/real_chain/train" / v
    model, _ = load_model(run / "model.pt")
    from vae.analysis.run import read_split

    split = read_split(run / "split.csv").reindex(paired.obs_names).to_numpy().astype(str)
    data = from_anndata(paired, image_size=model.args.crop_size)
    lat = encode_dataset(model, data, views=int(model.args.encode_views)).image
    y = np.asarray(data.label_names)[data.labels.numpy()]
    hi = data.has_image.numpy().astype(bool)
    lab = (y != UNKNOWN_LABEL) & hi
    fit, te = lab & (split != "test"), lab & (split == "test")
    assert np.isfinite(logsize[lab]).all(), np.flatnonzero(~np.isfinite(logsize[lab]))[:5]
    zs = (logsize - np.nanmean(logsize[fit])) / np.nanstd(logsize[fit])
    out = []
    for w in (0, 1, 2):
        X = np.column_stack([lat, w * zs])
        clf = KNeighborsClassifier(15).fit(X[fit], y[fit])
        out.append((w, round(float((clf.predict(X[te]) == y[te]).mean()), 3)))
    # size alone
    clf = KNeighborsClassifier(15).fit(zs[fit, None], y[fit])
    print(v, out, "size alone", round(float((clf.predict(zs[te, None]) == y[te]).mean()), 3))
    df = pd.DataFrame(
        {
            "y": y[lab],
            "size": np.exp(logsize[lab]),
            "src": paired.obs.image_source.astype(str).to_numpy()[lab],
        }
    )
print(df.groupby(["src", "y"])["size"].median().unstack().round(1).to_string())
