"""How much maturation t do simulated pixels and counts carry? A sanity check
for the simulator, independent of the VAE.

    python scripts/sim_signal_check.py [--n-images 24] [--out outputs/sim_signal_check.json]

For the neutrophil-lineage cells of ``n_images`` default smears it measures,
inside each cell's ground-truth mask: cell area, nucleus area fraction
(ground-truth nucleus mask), number of nucleus components, nucleus solidity,
median nucleus optical density, cytoplasm red/blue ratio and dark-speckle
(granule) fraction. A 5-fold cross-validated ridge regression predicts t from
these features, and separately from the top 20 principal components of the
log-normalised expression. Prints and writes R^2 and Spearman rho.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage
from scipy.stats import spearmanr
from skimage.morphology import convex_hull_image
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.simulator import SimulatorParams, make_gene_panel, simulate_image


def decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def features(img: np.ndarray, a: dict) -> list[float]:
    cell = decode(a["segmentation"])
    nuc = decode(a["nucleus_segmentation"]) & cell
    cyto = cell & ~nuc
    od = -np.log(np.clip(img.astype(np.float64), 1, 255) / 255).sum(axis=2)
    rgb = img.astype(np.float64)
    n_comp = ndimage.label(nuc, structure=np.ones((3, 3)))[1] if nuc.any() else 0
    solidity = nuc.sum() / max(convex_hull_image(nuc).sum(), 1) if nuc.any() else 0.0
    cyto_od = od[cyto] if cyto.any() else np.zeros(1)
    return [
        float(cell.sum()),
        float(nuc.sum() / max(cell.sum(), 1)),
        float(n_comp),
        float(solidity),
        float(np.median(od[nuc])) if nuc.any() else 0.0,
        float(rgb[cyto, 0].mean() / max(rgb[cyto, 2].mean(), 1)) if cyto.any() else 0.0,
        float((cyto_od > np.median(cyto_od) + 0.25).mean()),
    ]


def cv_scores(x: np.ndarray, t: np.ndarray) -> dict[str, float]:
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    pred = cross_val_predict(model, x, t, cv=5)
    r2 = 1 - ((pred - t) ** 2).sum() / ((t - t.mean()) ** 2).sum()
    return {"r2": float(r2), "spearman": float(spearmanr(pred, t).statistic)}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n-images", type=int, default=24)
    ap.add_argument("--out", default="outputs/sim_signal_check.json")
    args = ap.parse_args()

    p = SimulatorParams(n_images=args.n_images)
    panel = make_gene_panel(p.n_genes, p.seed)
    feats, counts, ts = [], [], []
    for k in range(p.n_images):
        sim = simulate_image(p, panel, k, "train")
        for a, c in zip(sim.annotations, sim.counts):
            if a["lineage"] != "neutrophil" or a["truncated"]:
                continue
            feats.append(features(sim.image, a))
            counts.append(c)
            ts.append(a["t"])
    t = np.array(ts)
    x_img = np.array(feats)
    c = np.array(counts, dtype=np.float64)
    x_expr = np.log1p(c / c.sum(axis=1, keepdims=True) * 1e4)
    x_pca = PCA(n_components=min(20, len(t) - 1), random_state=0).fit_transform(x_expr)
    result = {
        "n_images": p.n_images,
        "n_lineage_cells_untruncated": int(len(t)),
        "image_features": cv_scores(x_img, t),
        "expression_pca20": cv_scores(x_pca, t),
        "single_feature_spearman_with_t": {
            name: float(spearmanr(x_img[:, i], t).statistic)
            for i, name in enumerate(
                [
                    "cell_area",
                    "nucleus_fraction",
                    "nucleus_components",
                    "nucleus_solidity",
                    "nucleus_median_od",
                    "cytoplasm_red_blue",
                    "cytoplasm_dark_speckle",
                ]
            )
        },
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
