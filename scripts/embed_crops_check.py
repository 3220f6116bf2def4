"""What a user gets from ``stage=embed`` on a folder of crops, against the study's own crops.

A finished real-chain study was trained on masked crops: ``stage=segment`` cut each
cell with the detector's instance mask (``bccd_cropped`` through its crop-folder
mode) and ``segmentation_wbc`` came with true masks. A user who embeds a folder of
single-cell crop images gets each crop read by :meth:`vae.api.Study.read`
(``kind="crops"``) with ``crop_masks``:

* ``whole``: the whole image is the cell (red cells and background included);
* ``detector``: the study's detector (here the shipped one) finds the crop's centre
  cell, its instance mask and framing, each crop's magnification estimated from
  the image (the default).

This script copies the original image files of the study's **test-split** crops
from crop folders (``bccd_cropped``, ``segmentation_wbc``; never trained on) into a
temporary folder, embeds them both ways, and scores the transferred label
(``vae_label``, kNN(15) on the reference latent) against the crop's own label; the
reference row is the same cells as the study's training chain cut them (their
``paired.h5ad`` crops, image only). Prints a table, writes JSON::

    PYTHONPATH=. .venv/bin/python scripts/embed_crops_check.py outputs/real_chain \\
        --variants view_s0 view_s1 --paired outputs/real_chain/pair/paired.h5ad \\
        --out outputs/embed_crops_check.json

Needs ``../shared/data`` (``paths.shared_data``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SOURCES = ("bccd_cropped", "segmentation_wbc")


def source_file(shared: Path, image_source: str, image_ref: str) -> Path:
    """The original image of a crop-folder row of ``paired.h5ad``."""
    if image_source == "bccd_cropped":  # bccd_cropped/<Class>/<file>.jpg
        return shared / "cells" / image_ref
    return shared / "cells" / f"{image_ref}.bmp"  # segmentation_wbc/datasetN/NNN


def score(q: ad.AnnData, truth: pd.Series, source: pd.Series) -> dict:
    """Label-transfer accuracy overall and per source; rows matched by obs name."""
    call = q.obs["vae_label"].astype(str)
    ok = call.to_numpy() == truth.reindex(q.obs_names).to_numpy()
    src = source.reindex(q.obs_names).to_numpy()
    out = {"n": int(len(ok)), "accuracy": float(ok.mean()) if len(ok) else float("nan")}
    for s in SOURCES:
        k = src == s
        out[s] = {"n": int(k.sum()), "accuracy": float(ok[k].mean()) if k.any() else None}
    return out


def check(study_dir: Path, variant: str, paired: ad.AnnData, shared: Path) -> dict:
    from vae.api import Study

    study = Study.load(study_dir, variant=variant)
    lat = ad.read_h5ad(study_dir / "train" / variant / "latent.h5ad", backed="r")
    o = lat.obs
    rows = o[(o["split"] == "test") & o["image_source"].isin(SOURCES)]
    truth, source, files = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "crops"
        for name, r in rows.iterrows():
            src = source_file(shared, str(r.image_source), str(r.image_ref))
            dst = folder / str(r.image_source) / f"{len(files):04d}{src.suffix}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
            key = f"{r.image_source}/{dst.name}"  # Study.read's obs name: sample/file
            files[key] = name
            truth[key], source[key] = str(r.label), str(r.image_source)
        truth, source = pd.Series(truth), pd.Series(source)
        # the study's own crops of the same cells, image only
        ref = ad.AnnData(obs=pd.DataFrame(index=list(files)))
        idx = paired.obs_names.get_indexer(o.loc[list(files.values()), "row"].astype(str))
        ref.obsm["crops"] = paired.obsm["crops"][idx]
        ref.obsm["masks"] = paired.obsm["masks"][idx]
        res = {"variant": variant, "n_test_crops": len(files)}
        t = time.perf_counter()
        res["study_crops"] = score(study.embed(ref, "study crops"), truth, source)
        for mode in ("whole", "detector"):
            t = time.perf_counter()
            a = study.read(folder, kind="crops", crop_masks=mode)
            q = study.embed(a, mode)
            res[mode] = score(q, truth, source)
            res[mode]["rejects"] = len(a.uns["rejects"])
            res[mode]["seconds"] = round(time.perf_counter() - t, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", type=Path, help="outputs/<experiment> of a real-chain study")
    ap.add_argument("--variants", nargs="+", required=True, help="train/<variant> runs")
    ap.add_argument("--paired", type=Path, required=True, help="the study's paired.h5ad")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    paired = ad.read_h5ad(args.paired)
    results = [check(args.study, v, paired, args.shared) for v in args.variants]
    cols = ["study_crops", "whole", "detector"]
    print(f"{'variant':10s} {'n':>4s} " + " ".join(f"{c:>22s}" for c in cols))
    for r in results:
        cells = [
            f"{r[c]['accuracy']:.3f} ({r[c]['bccd_cropped']['accuracy']:.2f}/"
            f"{r[c]['segmentation_wbc']['accuracy']:.2f})"
            for c in cols
        ]
        print(f"{r['variant']:10s} {r['n_test_crops']:4d} " + " ".join(f"{x:>22s}" for x in cells))
    mean = {c: float(np.mean([r[c]["accuracy"] for r in results])) for c in cols}
    print(f"{'mean':10s} {'':4s} " + " ".join(f"{mean[c]:>22.3f}" for c in cols))
    print(
        "(label-transfer accuracy on the test-split crops: all (bccd_cropped / segmentation_wbc))"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": results, "mean": mean}, indent=2))


if __name__ == "__main__":
    main()
