"""Image-code kNN of runs trained on different labels, scored on the same crops with one set.

A run trained on reviewed labels (``pair.label_corrections``) and its control (the same
split, ``trainer.split_from``) each vote with their *own* training labels (the train
split of their ``latent.h5ad``, as ``stage=evaluate`` does), and both are scored against
the labels of ``--paired`` (the original ``paired.h5ad``) on the same test crops:

* ``all``: every labelled test crop (the issue's target measurement);
* ``unreviewed``: the test crops of specimens the corrections file does not name (a
  reviewed crop's original label is the one in doubt).

Prints one table and writes JSON.

Example (docs/vae.md, "Training on reviewed labels")::

    PYTHONPATH=. python scripts/reviewed_labels_check.py \\
        outputs/real_chain/train/tex_s0 outputs/real_chain/train/revfull_s0 \\
        --paired outputs/real_chain/pair/paired.h5ad \\
        --corrections docs/reviews/bccd_eosinophils_full_review.csv --out revfull_s0.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def compare(
    runs: list[Path], paired: Path, corrections: Path, latent: str = "X_vae_image", k: int = 15
) -> dict[str, dict]:
    """Per run, ``{"all": {...}, "unreviewed": {...}}``: n, kNN accuracy and balanced
    accuracy against ``paired``'s labels, neutrophils called eosinophil, eosinophil recall."""
    import anndata as ad
    import pandas as pd

    from segmentation.io import spreadsheet_unquote
    from vae.analysis import metrics as M
    from vae.inputs.schema import known_labels

    truth_obs = ad.read_h5ad(paired, backed="r").obs
    corr = pd.read_csv(corrections, dtype=str)
    key = "specimen" if "specimen" in corr.columns else "image_ref"
    # an edited label_suspects.csv quotes a crop named "=x.png" as "'=x.png" (evaluate's
    # spreadsheet_safe): read back as pair.label_corrections reads it (stripped, unquoted)
    reviewed = set(corr[key].dropna().astype(str).str.strip().map(spreadsheet_unquote))
    results: dict[str, dict] = {}
    for run in runs:
        lat = ad.read_h5ad(run / "latent.h5ad", backed="r")
        obs = lat.obs
        z = np.asarray(lat.obsm[latent], dtype=np.float64)
        rows = obs["row"].astype(str).to_numpy() if "row" in obs else obs.index.to_numpy()
        missing = set(rows) - set(truth_obs.index.astype(str))
        if missing:
            raise SystemExit(f"{run}/latent.h5ad: {len(missing)} rows are not in {paired}")
        truth = truth_obs["label"].astype(str).reindex(rows).to_numpy()
        own = obs["label"].astype(str).to_numpy()
        split = obs["split"].astype(str).to_numpy()
        coded = np.isfinite(z).all(1)
        ref = np.flatnonzero((split == "train") & coded & known_labels(own))
        test = (split == "test") & coded & known_labels(truth)
        if key in obs:
            ids = obs[key].astype(str)
        elif key == "image_ref":  # latent.h5ad's obs_names are the cell ids
            ids = obs.index.to_series().astype(str)
        else:
            raise SystemExit(
                f"{run}/latent.h5ad: obs[{key!r}] is missing ({corrections} keys by it)"
            )
        in_review = ids.isin(reviewed).to_numpy()
        res = {}
        for name, sel in (("all", test), ("unreviewed", test & ~in_review)):
            idx = np.flatnonzero(sel)
            pred = M.knn_predict(z[idx], truth[idx], k, z[ref], own[ref])
            lt = M.label_transfer(truth[idx], pred)
            lower = np.char.lower(truth[idx].astype(str))
            is_neu = np.char.startswith(lower, "neutrophil")
            is_eos = np.char.startswith(lower, "eosinophil")
            called_eos = np.char.startswith(np.char.lower(pred.astype(str)), "eosinophil")
            res[name] = {
                "n": int(idx.size),
                "knn_accuracy": float(lt.accuracy),
                "knn_balanced_accuracy": float(lt.balanced_accuracy),
                "neutrophils_called_eosinophil": int((is_neu & called_eos).sum()),
                "neutrophils": int(is_neu.sum()),
                "eosinophil_recall": float(called_eos[is_eos].mean()) if is_eos.any() else None,
                "eosinophils": int(is_eos.sum()),
            }
        results[str(run)] = res
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="train run folders (latent.h5ad)")
    ap.add_argument(
        "--paired", type=Path, required=True, help="paired.h5ad with the labels to score"
    )
    ap.add_argument("--corrections", type=Path, required=True, help="the reviewed-labels CSV")
    ap.add_argument("--latent", default="X_vae_image", help="obsm key (default: the image code)")
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = compare(args.runs, args.paired, args.corrections, args.latent, args.k)
    print(
        f"{'run':<34} {'crops':>14} {'n':>4} {'kNN':>6} {'balanced':>8}  "
        "neutrophils called eosinophil   eosinophil recall"
    )
    for run, res in results.items():
        for name, r in res.items():
            rec = "-" if r["eosinophil_recall"] is None else f"{r['eosinophil_recall']:.3f}"
            print(
                f"{Path(run).name:<34} {name:>14} {r['n']:>4} {r['knn_accuracy']:>6.3f} "
                f"{r['knn_balanced_accuracy']:>8.3f}  {r['neutrophils_called_eosinophil']:>3} of "
                f"{r['neutrophils']:<24} {rec} of {r['eosinophils']}"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
