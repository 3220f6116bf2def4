"""Rescore finished held-out-kind runs with variants of the atypical-cell score (issue 15).

The tuning record of ``vae/analysis/anomaly.py``: every variant listed here was
compared on the runs given (the tuning seeds), and the one chosen became the
default. Reads what ``scripts/bench_anomaly.py`` left (``latent.h5ad`` of each
``without_<kind>_seed<s>`` run: obsm latents, obs reconstruction scores,
split, label) and trains nothing::

    .venv/bin/python scripts/anomaly_variants.py outputs/bench_anomaly/train/without_*_seed[01]

Prints one row per variant (ROC AUC for the held-out kind among the test rows,
per run, and the minimum and mean over the runs) and writes
``anomaly_variants.json`` next to the first run's directory.

Variants:

* the latent a modality is scored in: ``full`` (shared + own private block, what
  its decoder reads) or ``shared`` (the shared block only), and the fused
  posterior (``joint``, both modalities' evidence);
* ``k`` of the kNN distance;
* the class distance: relative Mahalanobis (Ren et al. 2021) or plain
  nearest-class Mahalanobis;
* the combination of the robust z-scores: mean, max, mean of the per-modality
  maxima, and a rank mean (each score's empirical CDF under the training rows,
  averaged);
* which scores enter the combination.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae.analysis import anomaly as A  # noqa: E402
from vae.inputs.schema import ANOMALY_COLUMNS  # noqa: E402


def load(run: Path) -> dict:
    import anndata as ad

    lat = ad.read_h5ad(run / "latent.h5ad")
    obs = lat.obs
    kind = re.match(r"without_(.+)_seed\d+$", run.name).group(1)
    man = json.loads((run / "train_summary.json").read_text())["model_args"]
    ns, npv = int(man["n_shared"]), int(man["n_private"])
    z = {}
    for mod in A.MODALITIES:
        sh = np.asarray(lat.obsm[f"X_vae_{mod}"], np.float64)
        pv = lat.obsm.get(f"X_vae_private_{mod}")
        z[f"{mod}_shared"] = sh
        z[f"{mod}_full"] = sh if pv is None else np.concatenate([sh, np.asarray(pv)], 1)
    z["joint_full"] = np.asarray(lat.obsm["X_vae_full"], np.float64)
    z["joint_shared"] = z["joint_full"][:, :ns]
    logvar = np.asarray(lat.obsm["X_vae_logvar"], np.float64)
    split = obs["split"].astype(str).to_numpy()
    return {
        "name": run.name,
        "kind": kind,
        "z": z,
        "rec": {
            m: obs[ANOMALY_COLUMNS[f"{m}_reconstruction"]].to_numpy(np.float64)
            for m in A.MODALITIES
        },
        "labels": obs["label"].astype(str).to_numpy(),
        "train": split == "train",
        "test": split == "test",
        "pos": obs["label"].astype(str).to_numpy() == kind,
        "n_private": npv,
        "logvar": logvar,
    }


def plain_mahalanobis(z, z_ref, labels_ref):
    """Nearest-class squared Mahalanobis distance, tied Ledoit-Wolf covariance, (n,)."""
    from sklearn.covariance import LedoitWolf

    names, counts = np.unique(labels_ref, return_counts=True)
    classes = names[counts >= A.MIN_CLASS_ROWS]
    centres = np.stack([z_ref[labels_ref == c].mean(0) for c in classes])
    resid = np.concatenate([z_ref[labels_ref == c] - centres[i] for i, c in enumerate(classes)])
    prec = LedoitWolf(assume_centered=True).fit(resid).precision_
    return A._sq_mahalanobis(z, centres, prec).min(1)


def lof(z, z_ref, k, self_in_ref):
    """Local outlier factor of each row of z against z_ref (a reference row: its own, (n,))."""
    from sklearn.neighbors import LocalOutlierFactor

    fit = LocalOutlierFactor(n_neighbors=k, novelty=True).fit(z_ref)
    out = -fit.score_samples(z)
    out[self_in_ref] = -fit.negative_outlier_factor_
    return out


def raw_scores(r: dict, space: str, k: int) -> dict[str, np.ndarray]:
    """Every component score of run ``r`` with its modality latents in ``space``."""
    tr = r["train"]
    out = {f"{m}_reconstruction": r["rec"][m] for m in A.MODALITIES}
    # the fused posterior's mean log-variance: an encoder unsure of an unseen input
    out["joint_logvar"] = r["logvar"].mean(1)
    for mod in (*A.MODALITIES, "joint"):
        z = r["z"][f"{mod}_{space}"]
        out[f"{mod}_latent"] = A.knn_distance(z, z[tr], k, self_in_ref=tr)
        out[f"{mod}_class_distance"] = A.class_distance(z, z[tr], r["labels"][tr])
        out[f"{mod}_plain_class"] = plain_mahalanobis(z, z[tr], r["labels"][tr])
        out[f"{mod}_lof"] = lof(z, z[tr], k, tr)
    return out


def rank_score(score, ref):
    """Empirical CDF of ``score`` under ``ref`` (fraction of reference rows below)."""
    ref = np.sort(ref[np.isfinite(ref)])
    return np.searchsorted(ref, score, side="left") / max(ref.size, 1)


def p_value(score, ref):
    """Conformal p-value: (1 + #reference rows scoring at least ``score``) / (m + 1)."""
    ref = np.sort(ref[np.isfinite(ref)])
    above = ref.size - np.searchsorted(ref, score, side="left")
    return (1.0 + above) / (ref.size + 1.0)


def combos(raw: dict, tr: np.ndarray, keys: list[str]) -> dict[str, np.ndarray]:
    zs = {k: A.robust_z(raw[k], raw[k][tr]) for k in keys}
    Z = np.stack([zs[k] for k in keys], 1)
    R = np.stack([rank_score(raw[k], raw[k][tr]) for k in keys], 1)
    P = np.stack([p_value(raw[k], raw[k][tr]) for k in keys], 1)
    mods = sorted({k.split("_")[0] for k in keys})
    per_mod_max = np.stack(
        [np.stack([zs[k] for k in keys if k.startswith(m + "_")], 1).max(1) for m in mods], 1
    )
    per_mod_mean = np.stack(
        [np.stack([zs[k] for k in keys if k.startswith(m + "_")], 1).mean(1) for m in mods], 1
    )
    return {
        "mean z": Z.mean(1),
        "max z": Z.max(1),
        "mean of per-modality max z": per_mod_max.mean(1),
        "max of per-modality mean z": per_mod_mean.max(1),
        "rank mean": R.mean(1),
        "Fisher (-2 sum log p)": -2.0 * np.log(P).sum(1),
    }


SETS = {
    "six (current)": list(A.RAW_KEYS),  # what vae.analysis.anomaly scores today
    "four latent": [
        "image_latent",
        "expression_latent",
        "image_class_distance",
        "expression_class_distance",
    ],
    "six, plain Mahalanobis": [
        "image_reconstruction",
        "expression_reconstruction",
        "image_latent",
        "expression_latent",
        "image_plain_class",
        "expression_plain_class",
    ],
    "six + joint kNN and class": [
        "image_reconstruction",
        "expression_reconstruction",
        "image_latent",
        "expression_latent",
        "image_class_distance",
        "expression_class_distance",
        "joint_latent",
        "joint_class_distance",
    ],
    "recon + joint kNN and class": [
        "image_reconstruction",
        "expression_reconstruction",
        "joint_latent",
        "joint_class_distance",
    ],
    "four latent, LOF for kNN": [
        "image_lof",
        "expression_lof",
        "image_class_distance",
        "expression_class_distance",
    ],
    "six, LOF for kNN": [
        "image_reconstruction",
        "expression_reconstruction",
        "image_lof",
        "expression_lof",
        "image_class_distance",
        "expression_class_distance",
    ],
    "six + joint logvar": [
        "image_reconstruction",
        "expression_reconstruction",
        "image_latent",
        "expression_latent",
        "image_class_distance",
        "expression_class_distance",
        "joint_logvar",
    ],
    "two class distances": ["image_class_distance", "expression_class_distance"],
    "two class distances + two recon": [
        "image_reconstruction",
        "expression_reconstruction",
        "image_class_distance",
        "expression_class_distance",
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="run directories (without_<kind>_seed<s>)")
    ap.add_argument("--k", type=int, nargs="+", default=[5, 15, 30])
    args = ap.parse_args()
    runs = [load(r) for r in args.runs]
    rows = {}
    for space in ("full", "shared"):
        for k in args.k:
            raws = [raw_scores(r, space, k) for r in runs]
            for key in raws[0]:
                rows[f"single {key} | {space} k={k}"] = [
                    A.roc_auc(raw[key][r["test"]], r["pos"][r["test"]])
                    for r, raw in zip(runs, raws)
                ]
            for set_name, keys in SETS.items():
                cs = [combos(raw, r["train"], keys) for r, raw in zip(runs, raws)]
                for rule in cs[0]:
                    rows[f"{set_name} | {rule} | {space} k={k}"] = [
                        A.roc_auc(c[rule][r["test"]], r["pos"][r["test"]]) for r, c in zip(runs, cs)
                    ]
    names = [r["name"] for r in runs]
    width = max(len(n) for n in rows)
    print(f"{'variant':<{width}} " + " ".join(f"{n[-22:]:>22}" for n in names) + "    min   mean")
    for name, aucs in sorted(rows.items(), key=lambda kv: -np.nanmin(kv[1])):
        cells = " ".join(f"{a:>22.3f}" for a in aucs)
        print(f"{name:<{width}} {cells} {np.nanmin(aucs):6.3f} {np.nanmean(aucs):6.3f}")
    out = args.runs[0].parent / "anomaly_variants.json"
    out.write_text(json.dumps({"runs": names, "auc": rows}, indent=1, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
