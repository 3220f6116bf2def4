"""How well vae/analysis/granules.py reads simulator truth off real (not decoded) crops.

Reads a paired.h5ad with simulator truth in ``obs`` (``lobes``, ``t``,
``granule_density``), measures every crop (or a random subset) and prints a
table: lobe-count accuracy, Spearman of the measured granule density with the
true total density and with the true large (azurophilic) granule density.
Writes the numbers as JSON.

    .venv/bin/python scripts/vae_targets.py build --n-images 120 --out outputs/analysis_sim/paired.h5ad
    .venv/bin/python scripts/granule_check.py outputs/analysis_sim/paired.h5ad --n 300 \
        --out outputs/analysis_sim/granule_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("paired", type=Path)
    ap.add_argument("--n", type=int, default=300, help="cells measured (random subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import anndata as ad
    import pandas as pd
    from scipy import stats

    from pipeline.simulator.morphology import azurophilic_density
    from vae.analysis import granules as G

    a = ad.read_h5ad(args.paired)
    for col in ("lobes", "t", "granule_density", "kind"):
        if col not in a.obs:
            sys.exit(f"{args.paired}: obs['{col}'] missing (not simulator data?)")
    rows = np.flatnonzero(a.obs["has_image"].to_numpy().astype(bool))
    rng = np.random.default_rng(args.seed)
    if rows.size > args.n:
        rows = np.sort(rng.choice(rows, args.n, replace=False))
    df = G.measure_batch(a.obsm["crops"][rows], a.obsm["masks"][rows].astype(bool))
    obs = a.obs.iloc[rows]
    lobes = obs["lobes"].to_numpy().astype(int)
    t = obs["t"].to_numpy().astype(float)
    dens = obs["granule_density"].to_numpy().astype(float)
    azu = np.array([azurophilic_density(x) if np.isfinite(x) else np.nan for x in t])
    neut = np.isfinite(t)
    meas = df["granule_density"].to_numpy(float)

    def rho(x, y, m):
        m = m & np.isfinite(x) & np.isfinite(y)
        return float(stats.spearmanr(x[m], y[m]).statistic)

    res = {
        "n_cells": int(rows.size),
        "lobe_accuracy": float((df["lobes"].to_numpy() == lobes).mean()),
        "lobe_accuracy_neutrophil_lineage": float(
            (df["lobes"].to_numpy()[neut] == lobes[neut]).mean()
        ),
        "lobes_spearman": rho(df["lobes"].to_numpy(float), lobes.astype(float), np.ones_like(neut)),
        "density_vs_true_total_spearman_all": rho(meas, dens, np.ones_like(neut)),
        "density_vs_true_total_spearman_neutrophil": rho(meas, dens, neut),
        "density_vs_true_azurophilic_spearman_neutrophil": rho(meas, azu, neut),
        "glcm_contrast_vs_true_total_spearman_neutrophil": rho(
            df["glcm_contrast"].to_numpy(float), dens, neut
        ),
    }
    print(pd.crosstab(pd.Series(lobes, name="true lobes"), pd.Series(df["lobes"], name="measured")))
    print()
    print(pd.Series(res).to_string())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
