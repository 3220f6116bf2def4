"""Atypical-cell (anomaly) scores of a trained β-VAE, per modality and combined.

Three signals per modality, each "how unlike the training cells is this one":

- **reconstruction**: the cost of reconstructing the row from its own posterior
  mean (:func:`vae.infer.reconstruction_nll`: masked image MSE per value,
  expression NLL per gene);
- **latent kNN distance**: the mean Euclidean distance from the row's unimodal
  posterior mean to its ``k`` nearest *reference* (training) means, a density
  estimate that assumes no shape;
- **class distance**: the relative Mahalanobis distance (Ren et al. 2021, "A simple
  fix to Mahalanobis distance for improving near-OOD detection") of the unimodal
  mean to the nearest training class: per labelled class a Gaussian with a tied,
  Ledoit-Wolf-shrunk within-class covariance, minus the squared distance to one
  Gaussian of all reference rows. Subtracting the background term removes what
  every class shares, so a cell that lies off the classes' own directions (e.g. past
  the end of a maturation continuum) scores higher than one that is merely far from
  the centre. Without two labelled classes it is the squared distance to the one
  background Gaussian.

The modality's latent is what its decoder reads: the shared block plus its own
private block. Each raw score is turned into a robust z-score against the
reference rows' own scores (median and MAD; a reference row's kNN distance leaves
the row itself out), and the combined score is the mean of the z-scores the row
has (an image-only row averages its three image scores). The obs column names are
owned by :mod:`vae.inputs.schema` (``ANOMALY_COLUMNS``); ``stage=train`` writes
them into ``latent.h5ad`` (:func:`anomaly_scores`) and ``stage=embed`` into
``query.h5ad`` against the study's training rows (:func:`reference_from_latent`,
:func:`score_rows`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vae.inputs.schema import ANOMALY_COLUMNS, ANOMALY_SCORE, known_labels

log = logging.getLogger(__name__)

DEFAULT_K = 15
MODALITIES = ("image", "expression")
MIN_CLASS_ROWS = 3  # a labelled class with fewer reference rows defines no Gaussian
# rows of the query whose (rows, classes, d) float64 differences are held at once by
# _sq_mahalanobis: 8192 x 10 classes x 32 dims = 20 MiB
MAHALANOBIS_ROWS = 8192
RAW_KEYS = tuple(
    f"{m}_{s}" for s in ("reconstruction", "latent", "class_distance") for m in MODALITIES
)


def fit_knn(z_ref: np.ndarray, k: int = DEFAULT_K):
    """The neighbour index :func:`knn_distance` reads ``z_ref`` (m, d) by: a fitted
    ``sklearn.neighbors.NearestNeighbors`` of ``min(k + 1, m)`` neighbours (one extra: a
    row's own entry in the reference). Fitted once, it scores any number of query blocks
    (:meth:`Reference.fitted`)."""
    from sklearn.neighbors import NearestNeighbors

    z_ref = np.asarray(z_ref, dtype=np.float64)
    return NearestNeighbors(n_neighbors=min(k + 1, z_ref.shape[0])).fit(z_ref)


def knn_distance(
    z: np.ndarray,
    z_ref: np.ndarray | None,
    k: int = DEFAULT_K,
    self_in_ref: np.ndarray | None = None,
    index=None,
) -> np.ndarray:
    """Mean distance of each row of ``z`` to its ``k`` nearest rows of ``z_ref``, (n,).

    Parameters
    ----------
    z : (n, d); z_ref : (m, d), or None with ``index``
    self_in_ref : (n,) bool, rows of ``z`` that are also in ``z_ref`` (their zero
        distance to themselves is left out)
    index : :func:`fit_knn` of ``z_ref`` and ``k`` when already fitted (the same
        distances; not fitted again for every block of a query)
    """
    z = np.asarray(z, dtype=np.float64)
    nn = index if index is not None else fit_knn(z_ref, k)
    kk = int(nn.n_neighbors)
    d, _ = nn.kneighbors(z)
    own = np.zeros(z.shape[0], bool) if self_in_ref is None else np.asarray(self_in_ref, bool)
    m = max(kk - 1, 1)
    out = d[:, :m].mean(1)
    if kk > 1:
        out = np.where(own, d[:, 1:kk].mean(1), out)
    return out


def _sq_mahalanobis(
    z: np.ndarray, centres: np.ndarray, precision: np.ndarray, block: int = MAHALANOBIS_ROWS
) -> np.ndarray:
    """(n, c) squared Mahalanobis distance of each row of z to each centre.

    ``block`` rows at a time: the (n, c, d) float64 differences of every row at once
    grow with the query (200k cells, 10 classes, 32 dims: 512 MB); each row's value
    is the same.
    """
    out = np.empty((z.shape[0], centres.shape[0]), np.result_type(z, centres, precision))
    for i in range(0, z.shape[0], block):
        d = z[i : i + block, None, :] - centres[None]
        out[i : i + block] = np.einsum("ncd,de,nce->nc", d, precision, d)
    return out


@dataclass
class ClassGaussians:
    """The Gaussians :func:`class_distance` reads a code against, fitted on the
    reference (:func:`fit_class_gaussians`).

    location : (d,) mean and precision : (d, d) of one Gaussian of all reference rows;
    centres : (c, d) class means and tied : (d, d) their tied within-class precision, or
    None when fewer than two classes qualify.
    """

    location: np.ndarray
    precision: np.ndarray
    centres: np.ndarray | None
    tied: np.ndarray | None

    def distance(self, z: np.ndarray) -> np.ndarray:
        """(n,) relative Mahalanobis distance of each row of ``z`` (n, d)
        (:func:`class_distance`)."""
        z = np.asarray(z, dtype=np.float64)
        if z.shape[0] == 0:
            return np.zeros(0)
        d0 = _sq_mahalanobis(z, self.location[None], self.precision)[:, 0]
        if self.centres is None:
            return d0
        return (_sq_mahalanobis(z, self.centres, self.tied) - d0[:, None]).min(1)


def fit_class_gaussians(
    z_ref: np.ndarray, labels_ref: np.ndarray, min_class: int = MIN_CLASS_ROWS
) -> ClassGaussians:
    """The background and per-class Gaussians of reference codes ``z_ref`` (m, d) with
    labels ``labels_ref`` (m,) (both covariances Ledoit-Wolf shrunk; see
    :func:`class_distance`)."""
    from sklearn.covariance import LedoitWolf

    z_ref = np.asarray(z_ref, dtype=np.float64)
    lab = np.asarray(labels_ref).astype(str)
    bg = LedoitWolf().fit(z_ref)
    names, counts = np.unique(lab[known_labels(lab)], return_counts=True)
    classes = names[counts >= min_class]
    if classes.size < 2:
        return ClassGaussians(bg.location_, bg.precision_, None, None)
    centres = np.stack([z_ref[lab == c].mean(0) for c in classes])
    resid = np.concatenate([z_ref[lab == c] - centres[i] for i, c in enumerate(classes)])
    tied = LedoitWolf(assume_centered=True).fit(resid)
    return ClassGaussians(bg.location_, bg.precision_, centres, tied.precision_)


def class_distance(
    z: np.ndarray, z_ref: np.ndarray, labels_ref: np.ndarray, min_class: int = MIN_CLASS_ROWS
) -> np.ndarray:
    """Relative Mahalanobis distance of each row of ``z`` to the nearest reference class, (n,).

    Parameters
    ----------
    z : (n, d) latent means to score; z_ref : (m, d) reference (training) means
    labels_ref : (m,) class of each reference row; unknown labels (``vae.inputs.schema.UNKNOWN_LABELS``)
        and classes with fewer than ``min_class`` rows define no Gaussian but count
        in the background one
    min_class : rows a class needs

    Returns
    -------
    (n,) ``min_c [D_c(z)^2 - D_0(z)^2]``, ``D_c`` the Mahalanobis distance to class
    ``c``'s mean under the tied within-class covariance and ``D_0`` the distance
    under one Gaussian of all reference rows (both covariances Ledoit-Wolf shrunk);
    ``D_0(z)^2`` alone when fewer than two classes qualify. Unitless; higher = more
    atypical. Fitted once, the Gaussians score any number of query blocks
    (:func:`fit_class_gaussians`, :meth:`Reference.fitted`).
    """
    if np.asarray(z).shape[0] == 0:
        return np.zeros(0)
    return fit_class_gaussians(z_ref, labels_ref, min_class).distance(z)


def modality_latent(z_full: np.ndarray, n_shared: int, n_private: int, modality: str) -> np.ndarray:
    """The part of a unimodal posterior mean (n, d) that the modality's decoder reads.

    ``image``: shared + image-private dims; ``expression``: shared + expression-private
    (the layout of :class:`vae.model.TwoBranchVAE`), (n, n_shared + n_private).
    """
    z = np.asarray(z_full)
    if modality == "image":
        return z[:, : n_shared + n_private]
    return np.concatenate([z[:, :n_shared], z[:, n_shared + n_private :]], 1)


@dataclass
class Reference:
    """What "typical" is: the training rows' latents, labels and raw scores.

    latents : modality -> (m, d_mod) unimodal means (:func:`modality_latent`), NaN
        rows where the row lacks the modality
    labels : (m,) class names (unknown labels allowed)
    raw : score key (``RAW_KEYS``) -> (m,) the reference rows' own raw scores, the
        scale of each z-score; a key that is missing is left out of the combined score
    """

    latents: dict[str, np.ndarray]
    labels: np.ndarray
    raw: dict[str, np.ndarray]
    # modality, k -> what fitted() returns: fitted on first use, then kept (stage=embed
    # scores a large query a block at a time; each block fitted the index and the
    # Gaussians on the same reference rows again). The latents are not changed after.
    _fits: dict = field(default_factory=dict, repr=False, compare=False)

    def fitted(self, modality: str, k: int = DEFAULT_K):
        """``(rows, index, gaussians)`` of one modality's reference rows: ``rows`` (m,)
        bool, the rows with a code; :func:`fit_knn` of them and :func:`fit_class_gaussians`
        of them with their labels (both None with fewer than two such rows). Fitted once
        per modality and ``k``."""
        key = (modality, int(k))
        if key not in self._fits:
            zr = np.asarray(self.latents[modality], dtype=np.float64)
            okr = np.isfinite(zr).all(1)
            if okr.sum() >= 2:
                lab = np.asarray(self.labels)[okr]
                self._fits[key] = (okr, fit_knn(zr[okr], k), fit_class_gaussians(zr[okr], lab))
            else:
                self._fits[key] = (okr, None, None)
        return self._fits[key]


def latent_scores(
    latents: Mapping[str, np.ndarray],
    ref: Reference,
    k: int = DEFAULT_K,
    self_in_ref: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """kNN and class distances of each modality, key (``RAW_KEYS``) -> (n,) (NaN: no modality).

    Parameters
    ----------
    latents : modality -> (n, d_mod) unimodal means of the rows to score
    ref : the reference (its ``raw`` is not read)
    self_in_ref : (n,) bool, rows that are themselves reference rows, in the same
        order as the reference (their own kNN entry is left out)
    """
    out = {}
    for mod in MODALITIES:
        z = np.asarray(latents[mod], dtype=np.float64)
        ok = np.isfinite(z).all(1)
        knn = np.full(z.shape[0], np.nan)
        cls = np.full(z.shape[0], np.nan)
        index, gaussians = ref.fitted(mod, k)[1:] if ok.any() else (None, None)
        if index is not None:
            own = None if self_in_ref is None else np.asarray(self_in_ref, bool)[ok]
            knn[ok] = knn_distance(z[ok], None, k, self_in_ref=own, index=index)
            cls[ok] = gaussians.distance(z[ok])
        out[f"{mod}_latent"] = knn
        out[f"{mod}_class_distance"] = cls
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


def combine(raw: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Raw scores plus the combined score: the mean of their robust z-scores.

    Parameters
    ----------
    raw : score name -> (n,) raw score (NaN where the row lacks the modality)
    reference : score name -> (m,) the reference rows' raw scores (the scale of the
        z-score); a score without a reference is kept but not combined

    Returns
    -------
    frame with the raw columns and ``ANOMALY_SCORE`` = mean of the z-scores present
    (NaN when the row has none).
    """
    df = pd.DataFrame({c: np.asarray(v, dtype=np.float64) for c, v in raw.items()})
    zs = [robust_z(df[c].to_numpy(), reference[c]) for c in df.columns if c in reference]
    zs = np.stack(zs, 1) if zs else np.full((len(df), 1), np.nan)
    with np.errstate(invalid="ignore"):
        n = np.isfinite(zs).sum(1)
        total = np.where(np.isfinite(zs), zs, 0.0).sum(1)
        df[ANOMALY_SCORE] = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    return df


def score_rows(
    reconstruction: Mapping[str, np.ndarray],
    latents: Mapping[str, np.ndarray],
    ref: Reference,
    k: int = DEFAULT_K,
    self_in_ref: np.ndarray | None = None,
) -> pd.DataFrame:
    """Every score of ``n`` rows against ``ref`` (columns ``ANOMALY_COLUMNS``' values).

    Parameters
    ----------
    reconstruction : ``image`` / ``expression`` -> (n,) reconstruction costs
        (:func:`vae.infer.reconstruction_nll`)
    latents : modality -> (n, d_mod) unimodal means (:func:`modality_latent`)
    ref : :class:`Reference`
    self_in_ref : see :func:`latent_scores`
    """
    return _frame(_raw(reconstruction, latents, ref, k, self_in_ref), ref)


def _raw(reconstruction, latents, ref: Reference, k: int, self_in_ref) -> dict[str, np.ndarray]:
    raw = {f"{m}_reconstruction": np.asarray(reconstruction[m], np.float64) for m in MODALITIES}
    raw.update(latent_scores(latents, ref, k, self_in_ref))
    return {key: raw[key] for key in RAW_KEYS}


def _frame(raw: dict[str, np.ndarray], ref: Reference) -> pd.DataFrame:
    df = combine(raw, ref.raw)
    return df.rename(columns={key: ANOMALY_COLUMNS[key] for key in RAW_KEYS})


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
    reference : (N,) bool, the training rows (what is "typical"); their labels
        (``data.labels``) define the classes of the class distance
    latents : vae.infer.Latents of ``data`` when already computed (else encoded here)

    Returns
    -------
    frame (N rows, same order as ``data``) with the per-modality raw scores and
    the combined robust-z score.
    """
    from vae.infer import encode_dataset, reconstruction_nll

    refm = np.asarray(reference, bool)
    lat = latents if latents is not None else encode_dataset(model, data, device, batch_size)
    rec = reconstruction_nll(model, data, device, batch_size)
    ns, npv = int(model.args.n_shared), int(model.args.n_private)
    z = {
        "image": modality_latent(lat.image, ns, npv, "image"),
        "expression": modality_latent(lat.expression, ns, npv, "expression"),
    }
    labels = np.asarray(data.label_names, dtype=object)[np.asarray(data.labels)].astype(str)
    ref = Reference({m: v[refm] for m, v in z.items()}, labels[refm], {})
    raw = _raw({"image": rec.image, "expression": rec.expression}, z, ref, k, refm)
    ref.raw = {key: v[refm] for key, v in raw.items()}  # the training rows' own scores
    return _frame(raw, ref)


def _train_rows(latent) -> np.ndarray:
    """(n_obs,) bool: ``obs["split"] == "train"`` (every row when there is no split)."""
    obs = latent.obs
    if "split" not in obs:
        return np.ones(latent.n_obs, bool)
    return obs["split"].astype(str).to_numpy() == "train"


def latent_modalities(latent, n_shared: int, n_private: int) -> dict[str, np.ndarray]:
    """Every row's modality latents (:func:`modality_latent`) from a ``latent.h5ad``'s obsm.

    ``X_vae_<modality>`` (the expert's shared dims) plus ``X_vae_private_<modality>``
    when the model has private dims; modality -> (n_obs, n_shared + n_private).
    """
    z = {}
    for mod in MODALITIES:
        zs = np.asarray(latent.obsm[f"X_vae_{mod}"], np.float64)
        pv = latent.obsm.get(f"X_vae_private_{mod}")
        full = zs if pv is None or n_private == 0 else np.concatenate([zs, np.asarray(pv)], 1)
        z[mod] = full[:, : n_shared + n_private]
    return z


def reference_from_latent(
    latent, n_shared: int, n_private: int, k: int = DEFAULT_K, label_key: str = "label"
) -> Reference:
    """The training rows of a study's ``latent.h5ad`` as a :class:`Reference`.

    Rows with ``obs["split"] == "train"`` (all rows when there is no split); latents
    from ``obsm["X_vae_<modality>"]`` (+ ``X_vae_private_<modality>``); reconstruction
    scales from the obs columns ``stage=train`` wrote (left out, with a warning, in a
    latent that predates them); latent-score scales recomputed here, as
    :func:`anomaly_scores` computed them for the training rows.
    """
    obs = latent.obs
    tr = _train_rows(latent)
    z = {m: v[tr] for m, v in latent_modalities(latent, n_shared, n_private).items()}
    labels = (
        obs[label_key].astype(str).to_numpy()[tr]
        if label_key in obs
        else np.full(int(tr.sum()), "NA")
    )
    ref = Reference(z, labels, {})
    raw = latent_scores(z, ref, k, self_in_ref=np.ones(int(tr.sum()), bool))
    for mod in MODALITIES:
        col = ANOMALY_COLUMNS[f"{mod}_reconstruction"]
        if col in obs:
            raw[f"{mod}_reconstruction"] = obs[col].to_numpy(dtype=np.float64)[tr]
        else:
            log.warning("latent obs has no %s: that score is not combined", col)
    ref.raw = raw
    return ref


def held_out_thresholds(latent, ref: Reference, quantile: float) -> dict[str, float]:
    """The combined score a study's own held-out cells stay under, per modality set.

    A query cell's ``anomaly_score`` is the mean of the z-scores of the modalities it
    has, so an image-only cell averages three z-scores and a paired cell six: the
    spread differs, and one threshold for both would flag image-only cells more
    often. Here each set gets its own: the ``quantile`` of the score that the
    held-out rows (``obs["split"] != "train"``; every row when there is no split, or
    no held-out row) that have the set's modalities reach on those modalities alone.

    Parameters
    ----------
    latent : a study's ``latent.h5ad`` (raw score columns of ``ANOMALY_COLUMNS``)
    ref : its :class:`Reference` (:func:`reference_from_latent`): the z-score scales
    quantile : in (0, 1], e.g. 0.99: one held-out cell in a hundred scores above

    Returns
    -------
    ``"image"``, ``"expression"``, ``"both"`` -> threshold (NaN when no held-out row
    has the set, or the latent holds no score columns).
    """
    obs = latent.obs
    rows = ~_train_rows(latent)
    if not rows.any():
        rows = np.ones(latent.n_obs, bool)
    out = {}
    for name, mods in (
        ("image", ("image",)),
        ("expression", ("expression",)),
        ("both", MODALITIES),
    ):
        keys = [k for k in RAW_KEYS if k.split("_", 1)[0] in mods]
        cols = [ANOMALY_COLUMNS[k] for k in keys]
        if not all(c in obs for c in cols):
            out[name] = float("nan")
            continue
        raw = {k: obs[c].to_numpy(dtype=np.float64)[rows] for k, c in zip(keys, cols)}
        has = np.ones(int(rows.sum()), bool)
        for m in mods:  # a row counts for the set when it has every modality of it
            has &= np.isfinite(raw[f"{m}_reconstruction"])
        score = combine(raw, ref.raw)[ANOMALY_SCORE].to_numpy()[has]
        score = score[np.isfinite(score)]
        out[name] = float(np.quantile(score, quantile)) if score.size else float("nan")
    return out


def rescore_latent(
    latent, n_shared: int, n_private: int, k: int = DEFAULT_K, label_key: str = "label"
) -> pd.DataFrame:
    """Every row's scores recomputed with this module from a finished ``latent.h5ad``.

    What ``stage=train`` would write now (same functions, same training rows as the
    reference): the reconstruction costs are read from the obs columns the run wrote
    (they depend on the model only), the latent scores and the combined score are
    recomputed from the obsm latents. For re-scoring finished runs after a change of
    the latent scores or the combination (``scripts/bench_anomaly.py --rescore``).

    Returns
    -------
    frame (n_obs rows, latent's order) with the columns ``ANOMALY_COLUMNS``' values.
    """
    ref = reference_from_latent(latent, n_shared, n_private, k, label_key)
    rec = {
        m: latent.obs[ANOMALY_COLUMNS[f"{m}_reconstruction"]].to_numpy(dtype=np.float64)
        for m in MODALITIES
    }
    z = latent_modalities(latent, n_shared, n_private)
    return score_rows(rec, z, ref, k, self_in_ref=_train_rows(latent))


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
