"""The β-VAE acceptance targets on held-out cells (issue 5), computed from a train run.

* best single latent dim |Spearman| with true maturation t (neutrophil lineage) >= 0.9
* expression predicted from the image alone: mean Pearson r over granule genes >= 0.7
* kNN (k = 15) cell-kind accuracy from the fused latent >= 0.9, image-only >= 0.85

Held-out = the ``test`` rows of ``split.csv``; kNN references are the ``train`` rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from segmentation.io import MANIFEST, blank_as_read

TARGETS = {
    "t_best_dim_abs_spearman": 0.9,
    "granule_expression_from_image_mean_pearson": 0.7,
    "knn15_kind_accuracy_joint": 0.9,
    "knn15_kind_accuracy_image": 0.85,
}


@dataclass
class TargetReport:
    """Measured values (NaN when the data lack the needed truth), targets and pass flags."""

    values: dict[str, float]
    targets: dict[str, float]
    passed: dict[str, bool]
    details: dict[str, object]

    def to_dict(self) -> dict:
        return asdict(self)


def compute_targets(
    model,
    data,
    obs: pd.DataFrame,
    split: np.ndarray,
    granule_genes: list[int],
    device: str = "cpu",
    k: int = 15,
    expected: np.ndarray | None = None,
    programs: dict[str, list[int]] | None = None,
) -> TargetReport:
    """Targets of a trained model on ``data`` (PairedTensors) with truth columns in ``obs``.

    Parameters
    ----------
    model : TwoBranchVAE (eval mode is set here)
    data : vae.data.PairedTensors
    obs : paired obs (needs ``kind`` or ``label``; ``t`` and ``lineage`` for the t target)
    split : (N,) train/val/test
    granule_genes : column indices of the granule-program genes
    expected : (N, G), optional
        Noise-free log-normalised expression (simulator truth); adds the
        cross-modal r against it to ``details``.

    Notes
    -----
    ``details["truth_ceiling_granule_pearson"]`` is the same r for a kNN
    regressor (k = 30) fitted on the *true* kind and t of the train rows: how
    far noisy counts let any predictor go.
    """
    from vae.analysis.metrics import best_dim_spearman, knn_accuracy, per_gene_correlation
    from vae.infer import encode_dataset

    ns = model.args.n_shared
    lat = encode_dataset(model, data, device)
    test = split == "test"
    train = split == "train"
    hi = data.has_image.numpy()
    he = data.has_expression.numpy()
    kind = (obs["kind"] if "kind" in obs else obs["label"]).astype(str).to_numpy()
    # by_label real data: an image row's own class is image_label
    kind_img = kind
    if "kind" not in obs and "image_label" in obs:
        kind_img = obs["image_label"].astype(str).to_numpy()
    values: dict[str, float] = {}
    details: dict[str, object] = {"n_test": int(test.sum()), "n_train": int(train.sum())}

    # maturation: best single dim, neutrophil-lineage held-out cells
    if "t" in obs:
        t = pd.to_numeric(obs["t"], errors="coerce").to_numpy(dtype=float)
        lin = obs["lineage"].astype(str).to_numpy() == "neutrophil" if "lineage" in obs else True
        rows = test & np.isfinite(t) & lin
        bd = best_dim_spearman(lat.joint[rows, :ns], t[rows])
        values["t_best_dim_abs_spearman"] = bd.abs_spearman
        rows_i = rows & hi
        bdi = best_dim_spearman(lat.image[rows_i, :ns], t[rows_i])
        details["t_best_dim"] = bd.dim
        details["t_best_dim_image_only_abs_spearman"] = bdi.abs_spearman
        details["n_t_cells"] = int(rows.sum())
    else:
        values["t_best_dim_abs_spearman"] = float("nan")

    # cross-modal: expression from the image alone, granule genes
    rows = test & hi & he
    if rows.sum() >= 3 and granule_genes:
        g = np.asarray(granule_genes)
        pred = lat.expression_from_image[rows][:, g]
        obs_x = data.x.numpy()[rows][:, g]
        gc = per_gene_correlation(pred, obs_x)
        values["granule_expression_from_image_mean_pearson"] = gc.mean_pearson
        details["granule_gene_pearson"] = {
            data.gene_names[i]: float(r) for i, r in zip(g, gc.pearson)
        }
        allg = per_gene_correlation(lat.expression_from_image[rows], data.x.numpy()[rows])
        details["all_genes_from_image_mean_pearson"] = allg.mean_pearson
        # program scores (mean over a program's genes) average the count noise out
        for name, gi in (programs or {}).items():
            sp = lat.expression_from_image[rows][:, gi].mean(1, keepdims=True)
            so = data.x.numpy()[rows][:, gi].mean(1, keepdims=True)
            details[f"score_{name}_from_image_pearson"] = per_gene_correlation(sp, so).mean_pearson
        if expected is not None:
            ex = per_gene_correlation(pred, expected[rows][:, g])
            details["granule_from_image_vs_noise_free_mean_pearson"] = ex.mean_pearson
        if "t" in obs and "kind" in obs:
            details["truth_ceiling_granule_pearson"] = _truth_ceiling(
                obs, data.x.numpy()[:, g], train & he, rows
            )
    else:
        values["granule_expression_from_image_mean_pearson"] = float("nan")

    # kNN kind accuracy: train rows vote for test rows
    values["knn15_kind_accuracy_joint"] = knn_accuracy(
        lat.joint[test, :ns], kind[test], k, lat.joint[train, :ns], kind[train]
    )
    ti, tr = test & hi, train & hi
    values["knn15_kind_accuracy_image"] = (
        knn_accuracy(lat.image[ti, :ns], kind_img[ti], k, lat.image[tr, :ns], kind_img[tr])
        if ti.any() and tr.any()
        else float("nan")
    )
    te, tre = test & he, train & he
    if te.any() and tre.any():
        details["knn15_kind_accuracy_expression"] = knn_accuracy(
            lat.expression[te, :ns], kind[te], k, lat.expression[tre, :ns], kind[tre]
        )
    passed = {
        k_: bool(np.isfinite(values[k_]) and values[k_] >= thr) for k_, thr in TARGETS.items()
    }
    return TargetReport(values=values, targets=dict(TARGETS), passed=passed, details=details)


def _truth_ceiling(obs: pd.DataFrame, x: np.ndarray, fit: np.ndarray, test: np.ndarray) -> float:
    from sklearn.neighbors import KNeighborsRegressor

    from vae.analysis.metrics import per_gene_correlation

    kinds = pd.get_dummies(obs["kind"].astype(str)).to_numpy(dtype=float) * 3.0
    t = pd.to_numeric(obs["t"], errors="coerce").to_numpy(dtype=float)
    feats = np.hstack([kinds, np.nan_to_num(t, nan=-1.0)[:, None] * 3.0])
    reg = KNeighborsRegressor(min(30, int(fit.sum()))).fit(feats[fit], x[fit])
    return per_gene_correlation(reg.predict(feats[test]), x[test]).mean_pearson


class RunManifestError(ValueError):
    """A train run's ``manifest.json`` cannot say which paired input the run read."""


def paired_of_run(train_dir: str | Path) -> Path:
    """The ``paired.h5ad`` a train run read, from its ``manifest.json``.

    Inside the experiment the file is looked up where it is now (a moved or copied
    experiment reads its own file; the manifest records the path within it as well).

    Raises
    ------
    RunManifestError
        The manifest is missing, not JSON, or names no paired input with a path: the
        message names the file and says to give the paired.h5ad explicitly.
    """
    import json

    man_path = Path(train_dir) / MANIFEST
    try:
        rec = json.loads(man_path.read_text())["inputs"]["paired"]
        path = rec["path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        # a run folder copied without its manifest, or one of another stage: say which
        # file and what to give instead, not a bare KeyError / JSONDecodeError
        raise RunManifestError(
            f"{man_path}: cannot read the paired input the run trained on "
            f"({type(e).__name__}: {e}); give the paired.h5ad explicitly (--paired)"
        ) from e
    rel = rec.get("in_experiment")
    here = [b / rel for b in Path(train_dir).resolve().parents if rel and (b / rel).is_file()]
    return here[0] if here else Path(path)


def targets_for_run(
    train_dir: str | Path, paired: str | Path | None = None, expected: np.ndarray | None = None
) -> TargetReport:
    """Load ``model.pt``, ``split.csv`` and the paired input of a train run, compute targets."""

    import anndata as ad

    from vae.checkpoint import load_model
    from vae.data import from_anndata

    train_dir = Path(train_dir)
    if paired is None:
        paired = paired_of_run(train_dir)
    model, meta = load_model(train_dir / "model.pt")
    adata = blank_as_read(ad.read_h5ad(paired))
    data = from_anndata(adata, str(paired), model.args.crop_size)
    from vae.analysis.run import read_split

    split = read_split(train_dir / "split.csv").to_numpy()
    names = meta.get("granule_genes") or []
    idx = [data.gene_names.index(g) for g in names if g in data.gene_names]
    programs = None
    if "program" in adata.var:
        prog = adata.var["program"].astype(str).to_numpy()
        programs = {
            p: np.flatnonzero(prog == p).tolist() for p in sorted(set(prog)) if "granul" in p
        }
    return compute_targets(model, data, adata.obs, split, idx, expected=expected, programs=programs)
