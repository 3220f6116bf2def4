"""Genes a query lacks: imputed from each cell's observed genes vs the reference mean (issue 10).

Runs with no arguments::

    .venv/bin/python scripts/bench_missing_genes.py

Paul15 (``../shared/data/expression/paul15_tradeseq_2660x240.h5ad``, raw UMI; the
cells and genes of ``scripts/bench_imputation.py``) is split 70/15/15 (stratified,
seeded); an NB expression-only β-VAE is trained on the train split
(``bench_imputation.train_one``) and wrapped as a :class:`vae.api.Study` whose
reference latent is the train cells. For each of ``--repeats`` seeded draws,
``--hide`` (20 %) of the model's genes are dropped from the held-out test cells'
expression file (the query holds only the other genes' counts, as a user's file
would), and :meth:`Study.prepare` fills them with

* ``impute="mean"``: the reference mean (what ``stage=embed`` did before), or
* ``impute="model"``: the cell's own reconstruction from its observed genes,
  iterated ``--iterations`` times.

Scored against the true log-normalised values of the hidden genes (all genes'
counts, target sum 1e4): Pearson r per cell across the hidden genes (mean over
cells), per hidden gene across cells (mean over genes; a constant fill has none,
reported as 0), RMSE; and how far the query's latent moved from the latent of
the same cells with all genes (mean L2 of ``X_vae``, kNN(15) label agreement).
Prints a table and writes ``outputs/bench_missing_genes/missing_genes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TARGET_SUM = 1e4


def make_study(model, data, labels, genes, train_rows):
    """A :class:`vae.api.Study` around ``model`` with the train cells as the reference."""
    import anndata as ad

    from vae.api import Study
    from vae.infer import encode_dataset

    lat = encode_dataset(model, data, "cpu", 256, rows=train_rows)
    ns = model.args.n_shared
    ref = ad.AnnData(
        obs=pd.DataFrame({"label": labels[train_rows]}, index=[f"r{i}" for i in train_rows])
    )
    ref.obs["has_expression"] = True
    ref.obsm["X_vae"] = lat.joint[:, :ns]
    ref.obsm["X_vae_full"] = lat.joint
    # each expert's shared means, as stage=train's latent.h5ad holds them: Study.embed's
    # atypical-cell reference reads both (it stopped this script with KeyError
    # 'X_vae_image' since that reference came in); NaN rows where a modality is absent
    ref.obsm["X_vae_image"] = lat.image[:, :ns]
    ref.obsm["X_vae_expression"] = lat.expression[:, :ns]
    a = model.args
    meta = {
        "gene_names": list(genes),
        "n_latent": a.n_latent,
        "n_shared": ns,
        "n_private": a.n_private,
        "crop_size": a.crop_size,
        "n_genes": a.n_genes,
        "has_counts": True,
    }
    # the real preset's path (pipeline/conf/analysis/real.yaml): each query cell gets its
    # maturation position, as stage=embed gives it
    config = {
        "expression": {"target_sum": TARGET_SUM},
        "analysis": {
            "label_key": "label",
            "path_classes": ["GMP", "Neutrophils"],
        },
    }
    return Study(model, meta, ref, config, model_path=Path("bench"), latent_path=Path("bench"))


def query(counts: np.ndarray, genes: list[str], keep: np.ndarray, names: list[str]):
    import anndata as ad

    g = [x for x, k in zip(genes, keep) if k]
    return ad.AnnData(
        X=counts[:, keep].astype(np.float32),
        obs=pd.DataFrame(index=names),
        var=pd.DataFrame(index=g),
    )


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-12), 0.0)


def main(argv: list[str] | None = None) -> int:
    import bench_imputation as B

    from vae.analysis.imputation import lognorm
    from vae.data import stratified_split

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_missing_genes")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--minutes", type=float, default=1.0, help="wall cap of the training")
    ap.add_argument("--hide", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    counts, labels, genes, _, _ = B.paul15(args.shared)
    data = B.tensors(counts, labels, genes)
    split = stratified_split(labels, 0.15, 0.15, args.seed)
    tr, te = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    t0 = time.time()
    model, info = B.train_one(data, split, "nb", False, args.out / "model", args)
    print(f"trained: {info}")
    study = make_study(model, data, labels, genes, tr)
    truth = lognorm(counts[te], TARGET_SUM)
    names = [f"t{i}" for i in te]
    full = study.embed(query(counts[te], genes, np.ones(len(genes), bool), names))
    z_full = full.obsm["X_vae"]
    rng = np.random.default_rng(args.seed)
    rows = []
    for rep in range(args.repeats):
        hidden = np.zeros(len(genes), bool)
        hidden[rng.choice(len(genes), int(round(args.hide * len(genes))), replace=False)] = True
        q = query(counts[te], genes, ~hidden, names)
        for method in ("mean", "model"):
            study.impute, study.impute_iterations = method, args.iterations
            t1 = time.time()
            # the benchmark hides genes on purpose: any share of them (Study.embed refuses
            # an input lacking more than MAX_MISSING_GENES of the model's genes by default)
            out = study.embed(q, max_missing_genes=None)
            sec = time.time() - t1
            order = [genes.index(g) for g in out.uns["imputed_genes"]]
            pred, true = out.obsm["X_vae_imputed"], truth[:, order]
            # r per gene: 0 for a constant fill (impute=mean; float32 leaves it ~1e-8 off
            # constant), undefined (NaN, left out of the mean) for a gene no test cell
            # expresses
            flat = 1e-6
            per_gene = [
                0.0
                if pred[:, j].std() < flat
                else (
                    np.corrcoef(pred[:, j], true[:, j])[0, 1]
                    if true[:, j].std() >= flat
                    else np.nan
                )
                for j in range(pred.shape[1])
            ]
            agree = float(
                np.mean(out.obs["vae_label"].to_numpy() == full.obs["vae_label"].to_numpy())
            )
            rows.append(
                {
                    "repeat": rep,
                    "impute": method,
                    "hidden_genes": int(hidden.sum()),
                    "r_per_cell": float(np.mean(pearson_rows(pred, true))),
                    "r_per_gene": float(np.nanmean(per_gene)),
                    "rmse": float(np.sqrt(np.mean((pred - true) ** 2))),
                    "latent_l2_to_full": float(
                        np.linalg.norm(out.obsm["X_vae"] - z_full, axis=1).mean()
                    ),
                    "label_agreement_with_full": agree,
                    "seconds": round(sec, 2),
                }
            )
    df = pd.DataFrame(rows)
    summary = df.drop(columns="repeat").groupby("impute").mean(numeric_only=True)
    print(
        f"Paul15: {len(te)} held-out cells, {len(genes)} genes, {args.repeats} draws of hidden genes"
    )
    print(summary.round(4).to_string())
    args.out.mkdir(parents=True, exist_ok=True)
    res = {
        "cells_test": int(len(te)),
        "genes": len(genes),
        "hide": args.hide,
        "iterations": args.iterations,
        "train": info,
        "runs": rows,
        "mean_over_repeats": summary.round(4).to_dict(orient="index"),
        "seconds_total": round(time.time() - t0, 1),
    }
    (args.out / "missing_genes.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
