"""How far apart do the two experts put one class? (`vae.align_centroid_weight`)

Pairing by label gives a crop no cell-level tie to a profile, and the class alignment
(`vae.align=class`: InfoNCE on L2-normalised means) compares directions only. This
script reads a finished run's latent table and prints, per class with crops and
profiles, in the shared dims:

* ``expert_gap``: distance between the class's mean image-expert code (rows with a
  crop) and its mean expression-expert code (rows with a profile);
* ``fused_shift``: distance between the fused codes' means of its rows with a crop and
  its profile-only rows (what the UMAP shows as two islands);
* ``within_sd``: the class's mean per-dim sd of the fused codes (the yardstick);
* and ``vae.analysis.metrics.modality_mixing`` of the fused codes (separation 0-1).

Usage::

    python scripts/expert_gap_check.py outputs/real_chain/train[/VARIANT] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def expert_gaps(z, zi, ze, has_image, has_expression, labels) -> list[dict]:
    """Per class with >= 2 crop rows and >= 2 profile rows: the gaps described above.

    z, zi, ze : (n, d) fused, image-expert and expression-expert means (shared dims)
    """
    from vae.inputs.schema import known_labels

    out = []
    lab = np.asarray(labels).astype(str)
    for c in sorted(set(lab[known_labels(labels)])):
        crop = (lab == c) & has_image
        prof = (lab == c) & has_expression
        only = (lab == c) & has_expression & ~has_image
        if crop.sum() < 2 or prof.sum() < 2:
            continue
        row = {
            "class": c,
            "n_crop": int(crop.sum()),
            "n_profile_only": int(only.sum()),
            "expert_gap": float(np.linalg.norm(zi[crop].mean(0) - ze[prof].mean(0))),
            "within_sd": float(z[lab == c].std(0).mean()),
        }
        row["fused_shift"] = (
            float(np.linalg.norm(z[crop].mean(0) - z[only].mean(0))) if only.sum() >= 2 else None
        )
        out.append(row)
    return out


def main() -> None:
    import anndata as ad

    from vae.analysis.metrics import modality_mixing

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", help="a finished train folder (its latent.h5ad)")
    ap.add_argument("--label-key", default="label")
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    lat = ad.read_h5ad(Path(a.run) / "latent.h5ad")
    z = np.asarray(lat.obsm["X_vae"], np.float64)
    zi = np.asarray(lat.obsm["X_vae_image"], np.float64)
    ze = np.asarray(lat.obsm["X_vae_expression"], np.float64)
    hi = lat.obs["has_image"].to_numpy().astype(bool)
    he = lat.obs["has_expression"].to_numpy().astype(bool)
    labels = lat.obs[a.label_key].astype(str).to_numpy()
    rows = expert_gaps(z, zi, ze, hi, he, labels)
    mix = modality_mixing(z, hi, labels, k=a.k)
    print(
        f"{'class':24} {'crops':>6} {'prof.only':>9} {'expert_gap':>10} {'fused_shift':>11} {'within_sd':>9}"
    )
    for r in rows:
        fs = "n/a" if r["fused_shift"] is None else f"{r['fused_shift']:.2f}"
        print(
            f"{r['class']:24} {r['n_crop']:6d} {r['n_profile_only']:9d} "
            f"{r['expert_gap']:10.2f} {fs:>11} {r['within_sd']:9.2f}"
        )
    if mix:
        print(
            f"modality mixing: same-kind share {mix['same_kind_share']:.3f} vs "
            f"{mix['if_mixed']:.3f} if mixed, separation {mix['separation']:.3f}"
        )
    if a.out:
        Path(a.out).write_text(json.dumps({"run": a.run, "classes": rows, "mixing": mix}, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
