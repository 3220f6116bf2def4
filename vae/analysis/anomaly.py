"""Atypical-cell (anomaly) scores of a trained β-VAE, per modality and combined.

Two signals per modality, both "how unlike the training cells is this one":

- **reconstruction**: the cost of reconstructing the row from its own posterior
  mean (:func:`vae.infer.reconstruction_nll`: masked image MSE per value,
  expression NLL per gene);
- **latent density**: the mean Euclidean distance from the row's unimodal
  posterior mean to its ``k`` nearest *reference* (training) means, a kNN density
  estimate that does not assume one Gaussian blob.

Each raw score is turned into a robust z-score against the reference rows
(median and MAD), and the combined score is the mean of the z-scores the row
has (an image-only row averages its two image scores). The obs column names are
owned by :mod:`vae.inputs.schema` (``ANOMALY_COLUMNS``); ``stage=train`` writes
them into ``latent.h5ad``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vae.inputs.schema import ANOMALY_COLUMNS, ANOMALY_SCORE

DEFAULT_K = 15


def knn_distance(
    z: np.ndarray, z_ref: np.ndarray, k: int = DEFAULT_K, self_in_ref: np.ndarray | None = None
) -> np.ndarray:
    """Mean distance of each row of ``z`` to its ``k`` nearest rows of ``z_ref``, (n,).

    Parameters
    ----------
    z : (n, d); z_ref : (m, d)
    self_in_ref : (n,) bool, rows of ``z`` that are also in ``z_ref`` (their zero
        distance to themselves is left out)
    """
    from sklearn.neighbors import NearestNeighbors

    z = np.asarray(z, dtype=np.float64)
    z_ref = np.asarray(z_ref, dtype=np.float64)
    kk = min(k + 1, z_ref.shape[0])  # one extra: a row's own entry in the reference
    d, _ = NearestNeighbors(n_neighbors=kk).fit(z_ref).kneighbors(z)
    own = np.zeros(z.shape[0], bool) if self_in_ref is None else np.asarray(self_in_ref, bool)
    m = max(kk - 1, 1)
    out = d[:, :m].mean(1)
    if kk > 1:
        out = np.where(own, d[:, 1:kk].mean(1), out)
    return out


def robust_z(score: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(score - median(ref)) / (1.4826 MAD(ref)); NaN stays NaN."""
    r = np.asarray(ref, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return np.full(np.shape(score), np.nan)
    med = np.median(r)
    mad = 1.4826 * np.median(np.abs(r - med))
    scale = mad if mad > 0 else (r.std() if r.std() > 0 else 1.0)
    return (np.asarray(score, dtype=np.float64) - med) / scale


def combine(raw: dict[str, np.ndarray], reference: np.ndarray) -> pd.DataFrame:
    """Raw scores (name -> (n,)) plus their robust z-scores and the combined score.

    Parameters
    ----------
    raw : column name -> (n,) raw score (NaN where the row lacks the modality)
    reference : (n,) bool, rows that define "typical" (the training rows)

    Returns
    -------
    frame with the raw columns and ``ANOMALY_SCORE`` = mean of the z-scores present
    (NaN when the row has none).
    """
    ref = np.asarray(reference, bool)
    df = pd.DataFrame({k: np.asarray(v, dtype=np.float64) for k, v in raw.items()})
    zs = np.stack([robust_z(df[c].to_numpy(), df[c].to_numpy()[ref]) for c in df.columns], 1)
    with np.errstate(invalid="ignore"):
        n = np.isfinite(zs).sum(1)
        total = np.where(np.isfinite(zs), zs, 0.0).sum(1)
        df[ANOMALY_SCORE] = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    return df


def anomaly_scores(
    model,
    data,
    reference: np.ndarray,
    device="cpu",
    batch_size: int = 256,
    k: int = DEFAULT_K,
    latents=None,
) -> pd.DataFrame:
    """Every row's anomaly scores (columns :data:`vae.inputs.schema.ANOMALY_COLUMNS`).

    Parameters
    ----------
    model : TwoBranchVAE
    data : vae.data.PairedTensors
    reference : (N,) bool, the training rows (what is "typical")
    latents : vae.infer.Latents of ``data`` when already computed (else encoded here)

    Returns
    -------
    frame (N rows, same order as ``data``) with the per-modality raw scores and
    the combined robust-z score.
    """
    from vae.infer import encode_dataset, reconstruction_nll

    ref = np.asarray(reference, bool)
    lat = latents if latents is not None else encode_dataset(model, data, device, batch_size)
    rec = reconstruction_nll(model, data, device, batch_size)
    raw = {
        ANOMALY_COLUMNS["image_reconstruction"]: rec.image,
        ANOMALY_COLUMNS["expression_reconstruction"]: rec.expression,
    }
    for mod, z in (("image", lat.image), ("expression", lat.expression)):
        ok = np.isfinite(z).all(1)
        out = np.full(z.shape[0], np.nan)
        rref = ref & ok
        if rref.sum() >= 2 and ok.any():
            out[ok] = knn_distance(z[ok], z[rref], k, self_in_ref=rref[ok])
        raw[ANOMALY_COLUMNS[f"{mod}_latent"]] = out
    return combine(raw, ref)


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``score`` for finding ``positive`` rows (NaN scores left out)."""
    from sklearn.metrics import roc_auc_score

    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(positive, bool)
    ok = np.isfinite(s)
    if len(set(y[ok].tolist())) < 2:
        return float("nan")
    return float(roc_auc_score(y[ok], s[ok]))


def top_cells_figure(images: np.ndarray, titles: list[str], title: str):
    """A row of crops (n, S, S, 3) in [0, 1] with a title each (the top-scoring cells)."""
    from vae.analysis import figures as F

    plt = F.plt
    n = max(len(images), 1)
    fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 2.0), squeeze=False)
    for ax in axes[0]:
        ax.axis("off")
    for ax, im, t in zip(axes[0], images, titles):
        ax.imshow(np.clip(im, 0, 1))
        ax.set_title(t, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
