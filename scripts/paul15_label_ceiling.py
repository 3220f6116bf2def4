"""How well Paul15's cell-type labels can be told apart from expression at all.

The real preset's joint kNN is scored on every labelled test row, and about 70 % of
them are Paul15 profiles without a crop: their fused code is the expression code, so
the joint number cannot exceed what Paul15's labels allow. This prints the 5-fold
stratified accuracy of a *supervised* logistic regression (standardised log-normalised
expression, all 240 genes) and of kNN(15) on 50 PCs, and writes JSON.

    .venv/bin/python scripts/paul15_label_ceiling.py [--shared ../shared/data] [--out F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PAUL15 = "expression/paul15_tradeseq_2660x240.h5ad"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data"
    )
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/paul15_label_ceiling.json"))
    args = ap.parse_args()
    import anndata as ad
    import scipy.sparse as sp
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    a = ad.read_h5ad(args.shared / PAUL15)
    c = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    x = np.log1p(c / np.maximum(c.sum(1, keepdims=True), 1) * 1e4)
    y = a.obs["celltype"].astype(str).to_numpy()
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    models = {
        "logistic_regression": make_pipeline(
            StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)
        ),
        "knn15_pca50": make_pipeline(PCA(50, random_state=0), KNeighborsClassifier(15)),
    }
    res = {k: float(cross_val_score(m, x, y, cv=cv).mean()) for k, m in models.items()}
    _, cnt = np.unique(y, return_counts=True)
    res["majority"] = float(cnt.max() / cnt.sum())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print("| model (5-fold, Paul15 celltype) | accuracy |\n|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:.3f} |")


if __name__ == "__main__":
    main()
