"""Image-branch check of a finished ``stage=train`` run: one table, one JSON (issue 9).

Reads ``model.pt``, ``split.csv`` and the ``paired.h5ad`` the run trained on,
and measures on the test split (rows never used for early stopping):

- kNN(15) class accuracy of the image-only, expression-only and fused latents
  (5-fold CV inside the test split; ``obs['label']``), with the majority-class rate;
- active units: latent dims whose mean KL of the fused posterior exceeds 0.01 nats;
- masked SSIM of the fused reconstructions (decoded from the posterior mean);
- raw-pixel PCA baseline: kNN accuracy of the first ``n_latent`` PCs of the masked crops;
- with simulator truth in ``obs``: best single latent dim vs true t (|Spearman|),
  granule density measured by ``vae.analysis.granules`` on the reconstructions vs the
  true azurophilic density, decoded lobes vs true lobes (neutrophil lineage);
- with ``--traverse RUN/traverse``: the path numbers ``stage=traverse`` wrote.

    .venv/bin/python scripts/image_branch_check.py outputs/demo/train \
        [--paired outputs/demo/pair/paired.h5ad] [--out outputs/demo/train/image_branch.json]

The last line reads ``image-only kNN X.XX | joint kNN Y.YY | active units A/D | SSIM S.SS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _knn(z: np.ndarray, y: np.ndarray, k: int = 15, seed: int = 0) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    ok = np.isfinite(z).all(1)
    z, y = z[ok], y[ok]
    counts = np.unique(y, return_counts=True)[1]
    folds = int(min(5, counts.min())) if counts.size > 1 else 0
    if folds < 2:
        return float("nan")
    clf = KNeighborsClassifier(n_neighbors=min(k, len(y) - len(y) // folds - 1))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, z, y, cv=cv).mean())


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import stats

    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(stats.spearmanr(a[ok], b[ok])[0])


def check(run: Path, paired: Path | None, traverse: Path | None) -> dict:
    import anndata as ad
    import pandas as pd
    import torch

    from vae.checkpoint import load_model
    from vae.data import from_anndata, raw_batch, to_batch
    from vae.infer import encode_dataset
    from vae.losses import kl_normal, masked_ssim

    try:
        from vae.analysis import granules as G
    except ImportError:  # layout before the vae/analysis package
        from vae import granules as G

    model, meta = load_model(run / "model.pt")
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else {}
    if paired is None:
        src = manifest.get("inputs", {}).get("paired", {})
        paired = Path(src.get("path", "")) if isinstance(src, dict) else Path(str(src))
    adata = ad.read_h5ad(paired)
    split = pd.read_csv(run / "split.csv", index_col=0)["split"].reindex(adata.obs_names)
    data = from_anndata(adata, image_size=model.args.crop_size)
    test = np.flatnonzero(split.to_numpy() == "test")
    lat = encode_dataset(model, data, rows=test)
    obs = adata.obs.iloc[test]
    y = obs["label"].astype(str).to_numpy() if "label" in obs else None
    has_i = data.has_image.numpy()[test].astype(bool)
    has_e = data.has_expression.numpy()[test].astype(bool)

    res: dict = {"run": str(run), "paired": str(paired), "n_test": int(test.size)}
    if y is not None:
        lab = y != "nan"
        vals, cnt = np.unique(y[lab & has_i], return_counts=True)
        res["majority_image_rows"] = float(cnt.max() / cnt.sum()) if cnt.size else float("nan")
        res["knn_image"] = _knn(lat.image[lab & has_i], y[lab & has_i])
        res["knn_expression"] = _knn(lat.expression[lab & has_e], y[lab & has_e])
        res["knn_joint"] = _knn(lat.joint[lab], y[lab])
        crops = data.crops[test].float().div(255) * data.masks[test].float()
        flat = crops[lab & has_i].flatten(1).numpy()
        from sklearn.decomposition import PCA

        n = min(model.n_latent, flat.shape[0] - 1, flat.shape[1])
        pcs = PCA(n, random_state=0).fit_transform(flat) if n >= 1 else flat
        res["knn_pixel_pca"] = _knn(pcs, y[lab & has_i])

    kl = kl_normal((torch.from_numpy(lat.joint), torch.from_numpy(lat.joint_logvar)))
    kl_dim = kl.mean(0).numpy()
    res["kl_per_dim"] = [round(float(v), 4) for v in kl_dim]
    res["active_units"] = int((kl_dim > 0.01).sum())
    res["n_latent"] = int(model.n_latent)

    # reconstructions from the fused posterior mean, image rows only
    rows = test[has_i]
    ssim, dec_imgs = [], []
    with torch.no_grad():
        for s in range(0, rows.size, 256):
            b = to_batch(raw_batch(data, torch.as_tensor(rows[s : s + 256])), torch.device("cpu"))
            post = model.encode(b.image, b.x, b.has_image, b.has_expression, b.mask, b.log_library)
            dec = model.decode(post.joint[0])
            ssim.append(masked_ssim(b.image, dec.image, b.mask).numpy())
            dec_imgs.append((dec.image * b.mask).permute(0, 2, 3, 1).numpy())
    res["ssim_joint"] = float(np.concatenate(ssim).mean()) if ssim else float("nan")

    o = obs[has_i]
    if "t" in o and rows.size:
        t = o["t"].to_numpy(float)
        z = lat.joint[has_i]
        rho = [abs(_spearman(z[:, j], t)) for j in range(z.shape[1])]
        res["best_dim_vs_t_spearman"] = float(np.nanmax(rho)) if rho else float("nan")
        neut = np.isfinite(t) & o.get("lineage", pd.Series("", index=o.index)).astype(str).eq(
            "neutrophil"
        ).to_numpy()
        if neut.sum() >= 3:
            from pipeline.simulator.morphology import azurophilic_density

            imgs = np.concatenate(dec_imgs)[neut]
            masks = data.masks[rows][neut, 0].numpy().astype(bool)
            fd = G.measure_batch(imgs, masks, G.GranuleParams())
            azu = np.array([azurophilic_density(v) for v in t[neut]])
            res["decoded_granules_vs_true_azurophilic_spearman"] = _spearman(
                fd["granule_density"].to_numpy(float), azu
            )
            if "lobes" in o:
                res["decoded_lobes_vs_true_spearman"] = _spearman(
                    fd["lobes"].to_numpy(float), o["lobes"].to_numpy(float)[neut]
                )
            crops = data.crops[rows][neut].permute(0, 2, 3, 1).numpy()
            fr = G.measure_batch(crops, masks, G.GranuleParams())
            res["input_granules_vs_true_azurophilic_spearman"] = _spearman(
                fr["granule_density"].to_numpy(float), azu
            )
    if traverse is not None and (traverse / "truth.json").exists():
        res["traverse"] = json.loads((traverse / "truth.json").read_text())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", type=Path, help="finished stage=train folder")
    ap.add_argument("--paired", type=Path, default=None, help="default: the run's manifest input")
    ap.add_argument("--traverse", type=Path, default=None, help="stage=traverse folder")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default RUN/image_branch.json)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    res = check(args.run, args.paired, args.traverse)
    out = args.out or args.run / "image_branch.json"
    out.write_text(json.dumps(res, indent=2, default=float))
    width = max(len(k) for k in res)
    for k, v in res.items():
        if k in ("kl_per_dim", "traverse"):
            continue
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(
        f"image-only kNN {res.get('knn_image', float('nan')):.2f} | joint kNN "
        f"{res.get('knn_joint', float('nan')):.2f} | active units {res['active_units']}/"
        f"{res['n_latent']} | SSIM {res['ssim_joint']:.2f}"
    )


if __name__ == "__main__":
    main()
