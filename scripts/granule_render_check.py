"""Decoded granules and lobes vs the simulator's truth as the drawn dots' gain varies.

Post hoc on a finished ``stage=train`` run (no retraining, nothing written): the
held-out neutrophil-lineage test cells are encoded, decoded from the fused mean and
drawn (:func:`vae.model.render_granules`) with each dot's peak optical density set to
``gain`` x the decoded granule density (``cal``: :func:`vae.model.granule_dot_gain`,
the calibration to the granule counter), then measured by ``vae.analysis.granules``;
prints Spearman of the granule density with ``azurophilic_density(t)``, of the lobes
with the true lobes, and the mean granules found per cell (drawn and input).

    .venv/bin/python scripts/granule_render_check.py outputs/exp/train/RUN \
        --paired outputs/exp/paired_sim.h5ad --gains 1,1.16,1.5,cal,2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", type=Path, help="finished stage=train folder (model.pt, split.csv)")
    ap.add_argument("--paired", type=Path, required=True, help="the simulator paired.h5ad it used")
    ap.add_argument("--gains", default="1,cal", help="comma-separated dot gains; cal = calibrated")
    args = ap.parse_args()

    import anndata as ad
    import torch
    from scipy.stats import spearmanr

    import vae.model as vm
    from pipeline.simulator.morphology import azurophilic_density
    from vae.analysis import granules as G
    from vae.checkpoint import load_model
    from vae.data import from_anndata
    from vae.infer import encode_dataset

    torch.set_num_threads(1)
    model, _ = load_model(args.run / "model.pt")
    a = ad.read_h5ad(args.paired)
    from vae.analysis.run import read_split

    split = read_split(args.run / "split.csv").reindex(a.obs_names)
    data = from_anndata(a, image_size=model.args.crop_size)
    test = np.flatnonzero(split.to_numpy().astype(str) == "test")
    o = a.obs.iloc[test]
    neut = o["lineage"].astype(str).eq("neutrophil").to_numpy()
    rows = test[neut]
    t = o["t"].to_numpy(float)[neut]
    azu = np.array([azurophilic_density(v) for v in t])
    lobes = o["lobes"].to_numpy(float)[neut]
    calibrated = vm.granule_dot_gain()
    for g in args.gains.split(","):
        gain = calibrated if g.strip() == "cal" else float(g)
        vm.granule_dot_gain = lambda v=gain: v  # what render_granules reads
        dec = encode_dataset(model, data, rows=rows, decode=True).decoded
        fd = G.measure_batch(dec.rec_image * dec.mask[..., None], dec.mask)
        fi = G.measure_batch(dec.image, dec.mask)
        print(
            f"gain {gain:.3f}: decoded granules vs azurophilic "
            f"{spearmanr(fd['granule_density'], azu)[0]:.3f}, lobes vs truth "
            f"{spearmanr(fd['lobes'], lobes)[0]:.3f}, granules found per cell "
            f"{fd['granule_count'].mean():.1f} (input {fi['granule_count'].mean():.1f}; "
            f"{len(rows)} cells)"
        )


if __name__ == "__main__":
    main()
