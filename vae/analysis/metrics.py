"""Latent-space and reconstruction metrics of the two-branch beta-VAE.

Every function takes plain arrays (NumPy) and returns a small named dataclass
or a float. Nothing here reads the config; ``pipeline.stage_analysis`` wires
them to the run's artifacts.

Groups
------
- latent structure: :func:`knn_predict`, :func:`knn_accuracy`, :func:`knn_vote_share`,
  :func:`knn_call_voters`, :func:`label_transfer`, :func:`code_classifier`,
  :func:`code_classifier_cv`,
  :func:`silhouette`, :func:`leiden_agreement`, :func:`modality_mixing`,
  :func:`batch_mixing`
- matching of paired rows: :func:`retrieval`
- disentanglement against known factors: :func:`mig`, :func:`dci`,
  :func:`best_dim_spearman`
- reconstruction: :func:`masked_mse`, :func:`masked_ssim`, :func:`per_gene_correlation`,
  :func:`nb_log_likelihood`
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import special, stats

# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _check_2d(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n, d), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: contains NaN or inf ({int((~np.isfinite(x)).sum())} entries)")
    return x


def _check_rows(name: str, x: np.ndarray, n: int) -> None:
    if len(x) != n:
        raise ValueError(f"{name}: has {len(x)} rows, expected {n}")


def _labels(y: np.ndarray) -> np.ndarray:
    """Integer codes of any label array (strings, ints, categoricals)."""
    return np.unique(np.asarray(y).astype(str), return_inverse=True)[1]


# ----------------------------------------------------------------------------
# latent structure
# ----------------------------------------------------------------------------


def knn_predict(
    z: np.ndarray,
    labels: np.ndarray,
    k: int = 15,
    z_ref: np.ndarray | None = None,
    labels_ref: np.ndarray | None = None,
) -> np.ndarray:
    """Majority vote of each cell's k nearest labelled neighbours in latent space.

    Parameters
    ----------
    z : (n, d) latent codes of the cells to classify.
    labels : (n,) their labels (used only for leave-one-out, when ``z_ref`` is None).
    k : neighbours that vote (clipped to the reference size).
    z_ref, labels_ref : (m, d), (m,) labelled reference cells (e.g. the training
        split). When omitted, each cell is classified by the *other* cells of
        ``z`` (leave-one-out).

    Returns
    -------
    (n,) str: the predicted label of each cell.
    """
    from sklearn.neighbors import KNeighborsClassifier

    z = _check_2d("z", z)
    labels = np.asarray(labels).astype(str)
    _check_rows("labels", labels, len(z))
    if z_ref is None:
        if len(z) < 2:
            raise ValueError("knn_predict: leave-one-out needs at least 2 cells")
        kk = min(k, len(z) - 1)
        clf = KNeighborsClassifier(n_neighbors=kk + 1).fit(z, labels)
        idx = clf.kneighbors(z, return_distance=False)
        # drop each cell itself (the first neighbour unless there are exact ties)
        preds = []
        for i, row in enumerate(idx):
            row = [j for j in row if j != i][:kk]
            vals, counts = np.unique(labels[row], return_counts=True)
            preds.append(vals[np.argmax(counts)])
        return np.asarray(preds, dtype=str)
    z_ref = _check_2d("z_ref", z_ref)
    labels_ref = np.asarray(labels_ref).astype(str)
    _check_rows("labels_ref", labels_ref, len(z_ref))
    clf = KNeighborsClassifier(n_neighbors=min(k, len(z_ref))).fit(z_ref, labels_ref)
    return np.asarray(clf.predict(z)).astype(str)


def _neighbours(
    z: np.ndarray,
    labels: np.ndarray,
    k: int,
    z_ref: np.ndarray | None,
    labels_ref: np.ndarray | None,
    what: str,
) -> tuple[list[np.ndarray], np.ndarray]:
    """The k nearest labelled neighbours :func:`knn_predict` votes with.

    Returns each cell's neighbour indices (into ``z_ref``, or into ``z`` for
    leave-one-out, the cell itself left out) and the labels they index.
    """
    from sklearn.neighbors import NearestNeighbors

    z = _check_2d("z", z)
    labels = np.asarray(labels).astype(str)
    _check_rows("labels", labels, len(z))
    if z_ref is None:
        if len(z) < 2:
            raise ValueError(f"{what}: leave-one-out needs at least 2 cells")
        kk = min(k, len(z) - 1)
        idx = NearestNeighbors(n_neighbors=kk + 1).fit(z).kneighbors(z, return_distance=False)
        return [np.asarray([j for j in row if j != i][:kk]) for i, row in enumerate(idx)], labels
    z_ref = _check_2d("z_ref", z_ref)
    labels_ref = np.asarray(labels_ref).astype(str)
    _check_rows("labels_ref", labels_ref, len(z_ref))
    nn = NearestNeighbors(n_neighbors=min(k, len(z_ref))).fit(z_ref)
    return list(nn.kneighbors(z, return_distance=False)), labels_ref


def knn_vote_share(
    z: np.ndarray,
    labels: np.ndarray,
    call: np.ndarray,
    k: int = 15,
    z_ref: np.ndarray | None = None,
    labels_ref: np.ndarray | None = None,
) -> np.ndarray:
    """Share of each cell's k nearest labelled neighbours that carry ``call``.

    The neighbours are those :func:`knn_predict` votes with (same arguments), so for
    its own calls this is the winning vote's share: how sure the latent is.

    Parameters
    ----------
    z, labels, k, z_ref, labels_ref : as in :func:`knn_predict`.
    call : (n,) str, the label whose share is wanted for each cell (e.g. the
        :func:`knn_predict` call, or the cell's own label).

    Returns
    -------
    (n,) float in [0, 1].
    """
    call = np.asarray(call).astype(str)
    _check_rows("call", call, len(np.asarray(z)))
    idx, ref = _neighbours(z, labels, k, z_ref, labels_ref, "knn_vote_share")
    return np.asarray([float(np.mean(ref[i] == c)) for i, c in zip(idx, call)], dtype=np.float64)


def knn_call_voters(
    z: np.ndarray,
    labels: np.ndarray,
    call: np.ndarray,
    k: int = 15,
    z_ref: np.ndarray | None = None,
    labels_ref: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Which of each cell's k nearest labelled neighbours carry ``call``.

    Where a call is wrong, these are the labelled cells that made it: the first
    labels to re-check (one mislabelled reference cell can mislead many).

    Parameters
    ----------
    z, labels, k, z_ref, labels_ref : as in :func:`knn_predict`.
    call : (n,) str, as in :func:`knn_vote_share`.

    Returns
    -------
    n int arrays: indices into ``z_ref`` (into ``z`` for leave-one-out) of the
    neighbours labelled ``call[i]``, nearest first.
    """
    call = np.asarray(call).astype(str)
    _check_rows("call", call, len(np.asarray(z)))
    idx, ref = _neighbours(z, labels, k, z_ref, labels_ref, "knn_call_voters")
    return [np.asarray(i[ref[i] == c], dtype=np.int64) for i, c in zip(idx, call)]


def knn_accuracy(
    z: np.ndarray,
    labels: np.ndarray,
    k: int = 15,
    z_ref: np.ndarray | None = None,
    labels_ref: np.ndarray | None = None,
) -> float:
    """Accuracy of a k-nearest-neighbour vote of cell labels in latent space.

    Parameters are those of :func:`knn_predict`.

    Returns
    -------
    float in [0, 1]: share of cells whose majority-vote label is right.
    """
    pred = knn_predict(z, labels, k, z_ref, labels_ref)
    return float(np.mean(pred == np.asarray(labels).astype(str)))


def code_classifier(z: np.ndarray, labels: np.ndarray, seed: int = 0):
    """A multinomial logistic regression fitted on standardised codes.

    What a handful of labelled cells per class reads best from an image code: on a
    microscope a real-preset study never saw (``scripts/unseen_source_check.py``, 20
    labelled crops per class, two sources x two seeds, 20 draws) it was right
    0.65-0.79 of the time where a kNN(15) vote on the same crops was 0.50-0.74, and the
    same classifier on as many pixel PCs 0.36-0.42 (docs/embed.md, "Labelled crops of
    your own microscope"). scikit-learn's default ``C=1``: the results moved by under
    0.05 over ``C`` in 0.01-10 there.

    Parameters
    ----------
    z : (n, d) codes of the labelled cells.
    labels : (n,) their labels; at least two classes.
    seed : random state of the solver.

    Returns
    -------
    sklearn ``Pipeline`` (``StandardScaler`` -> ``LogisticRegression``) with
    ``predict_proba`` and ``classes_``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    z = _check_2d("z", z)
    labels = np.asarray(labels).astype(str)
    _check_rows("labels", labels, len(z))
    if np.unique(labels).size < 2:
        raise ValueError("code_classifier: needs labelled cells of at least two classes")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    return clf.fit(z, labels)


def code_classifier_cv(
    z: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0
) -> np.ndarray | None:
    """Out-of-fold calls of :func:`code_classifier`, stratified ``folds``-fold.

    Parameters
    ----------
    z : (n, d) codes; labels : (n,) their labels.
    folds : at most this many folds; fewer where the smallest class has fewer cells.
    seed : shuffling of the folds and the solver's random state.

    Returns
    -------
    (n,) str: each cell's call by the classifier fitted without its fold; None where a
    class has a single cell or there are fewer than two classes (nothing to hold out).
    """
    from sklearn.model_selection import StratifiedKFold

    z = _check_2d("z", z)
    labels = np.asarray(labels).astype(str)
    _check_rows("labels", labels, len(z))
    _, counts = np.unique(labels, return_counts=True)
    if counts.size < 2 or counts.min() < 2:
        return None
    pred = np.empty(len(labels), dtype=object)
    cv = StratifiedKFold(min(folds, int(counts.min())), shuffle=True, random_state=seed)
    for fit, test in cv.split(z, labels):
        pred[test] = code_classifier(z[fit], labels[fit], seed).predict(z[test])
    return pred.astype(str)


def per_cell_weights(specimens: np.ndarray, sources: np.ndarray | None = None) -> np.ndarray:
    """Weights that count each cell once when it enters through several image sources.

    A specimen is one source image (``obs['specimen']``): a BCCD smear photo and the
    curated crops cut from it share one. Its rows through one source are different
    cells; a second source shows the same cells again. So a specimen holds as many
    cells as its largest source has rows, and each of its rows weighs
    ``cells / rows``: an accuracy weighted by these counts each cell once, whatever
    the number of copies.

    Parameters
    ----------
    specimens : (n,) specimen id of each scored row; missing (None, NaN, pandas NA,
        "", "nan", "None") marks a row that is its own specimen (weight 1).
    sources : (n,) image source of each row, or None (then every row of a specimen is a
        copy of one cell).

    Returns
    -------
    (n,) float64 in (0, 1]; ``weights.sum()`` is the number of distinct cells.
    """
    import pandas as pd

    s = pd.Series(np.asarray(specimens, dtype=object))
    own = s.isna().to_numpy() | s.astype(str).isin(["", "nan", "None", "<NA>"]).to_numpy()
    w = np.ones(len(s), np.float64)
    if (~own).any():
        spec = s[~own].astype(str).to_numpy()
        src = (
            np.arange(len(spec)).astype(str)  # each row a source of its own: all copies
            if sources is None
            else pd.Series(np.asarray(sources, dtype=object))[~own].astype(str).to_numpy()
        )
        t = pd.DataFrame({"spec": spec, "src": src})
        rows = t.groupby("spec")["src"].transform("size").to_numpy()
        cells = (
            t.groupby(["spec", "src"])["src"].transform("size").groupby(t["spec"]).transform("max")
        ).to_numpy()
        w[~own] = cells / rows
    return w


def weighted_accuracy(true: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> float:
    """Share of right calls, each row counted with its weight (e.g. :func:`per_cell_weights`).

    Parameters
    ----------
    true, pred : (n,) labels.
    weights : (n,) non-negative row weights.

    Returns
    -------
    float in [0, 1]; NaN when the weights sum to 0.
    """
    w = np.asarray(weights, np.float64)
    _check_rows("pred", pred, len(true))
    _check_rows("weights", w, len(true))
    total = w.sum()
    if total <= 0:
        return float("nan")
    hit = np.asarray(true).astype(str) == np.asarray(pred).astype(str)
    return float((w * hit).sum() / total)


@dataclass
class LabelTransfer:
    """How well predicted labels match the true ones, class by class."""

    accuracy: float  # share of cells whose predicted label is right
    balanced_accuracy: float  # mean recall over the true classes (chance: 1 / classes)
    classes: list[str]  # sorted union of true and predicted labels
    confusion: np.ndarray  # (C, C) int: row = true class, column = predicted class
    recall: np.ndarray  # (C,) right / cells of the class (NaN: no cell of it)
    precision: np.ndarray  # (C,) right / cells predicted as it (NaN: none predicted)
    support: np.ndarray  # (C,) int cells of each true class


def label_transfer(true: np.ndarray, pred: np.ndarray) -> LabelTransfer:
    """Per-class recall, precision and the confusion matrix of predicted labels.

    Parameters
    ----------
    true : (n,) the cells' labels.
    pred : (n,) the predicted labels (e.g. :func:`knn_predict`).

    Returns
    -------
    LabelTransfer; ``balanced_accuracy`` averages the recall of the classes that
    have cells in ``true`` (a class only predicted adds a column, no recall).
    """
    t = np.asarray(true).astype(str)
    p = np.asarray(pred).astype(str)
    _check_rows("pred", p, len(t))
    if not len(t):
        raise ValueError("label_transfer: no cells")
    classes = sorted(set(t) | set(p))
    ix = {c: i for i, c in enumerate(classes)}
    conf = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(conf, ([ix[v] for v in t], [ix[v] for v in p]), 1)
    support = conf.sum(1)
    predicted = conf.sum(0)
    right = np.diag(conf).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, right / support, np.nan)
        precision = np.where(predicted > 0, right / predicted, np.nan)
    return LabelTransfer(
        accuracy=float(right.sum() / len(t)),
        balanced_accuracy=float(np.nanmean(recall[support > 0])),
        classes=classes,
        confusion=conf,
        recall=recall,
        precision=precision,
        support=support,
    )


def silhouette(z: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette width of the labels in latent space (Euclidean), in [-1, 1].

    NaN when fewer than 2 labels or every label has one cell.
    """
    from sklearn.metrics import silhouette_score

    z = _check_2d("z", z)
    y = _labels(labels)
    _check_rows("labels", y, len(z))
    n_lab = len(np.unique(y))
    if n_lab < 2 or n_lab >= len(z):
        return float("nan")
    return float(silhouette_score(z, y))


@dataclass
class ClusterAgreement:
    """Leiden clusters of the latent kNN graph against the labels."""

    ari: float  # adjusted Rand index, 1 = same partition
    nmi: float  # normalised mutual information, in [0, 1]
    n_clusters: int
    clusters: np.ndarray  # (n,) cluster id of each cell (str)


def leiden_agreement(
    z: np.ndarray,
    labels: np.ndarray,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    seed: int = 0,
) -> ClusterAgreement:
    """Leiden clustering (scanpy) of the latent kNN graph, compared with labels.

    Parameters
    ----------
    z : (n, d) latent codes.
    labels : (n,) reference labels.
    n_neighbors : size of the kNN graph (clipped to n - 1).
    resolution : Leiden resolution (higher -> more clusters).
    """
    import anndata as ad
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from vae.inputs.neighbors import knn_graph

    z = _check_2d("z", z)
    y = _labels(labels)
    _check_rows("labels", y, len(z))
    a = ad.AnnData(np.zeros((len(z), 1), dtype=np.float32))
    a.obsm["X_lat"] = z.astype(np.float32)
    # not sc.pp.neighbors itself: it stopped at >= 8192 rows (vae.inputs.neighbors)
    knn_graph(a, n_neighbors=n_neighbors, use_rep="X_lat", random_state=seed)
    sc.tl.leiden(
        a,
        resolution=resolution,
        random_state=seed,
        flavor="igraph",
        n_iterations=2,
        directed=False,
    )
    cl = a.obs["leiden"].astype(str).to_numpy()
    return ClusterAgreement(
        ari=float(adjusted_rand_score(y, cl)),
        nmi=float(normalized_mutual_info_score(y, cl)),
        n_clusters=len(np.unique(cl)),
        clusters=cl,
    )


# ----------------------------------------------------------------------------
# matching
# ----------------------------------------------------------------------------


@dataclass
class Retrieval:
    """Retrieval of the paired partner across modalities (row i <-> row i)."""

    recall_at_1: float  # share of queries whose true partner is the nearest
    recall_at_5: float
    recall_at_10: float
    foscttm: float  # fraction of samples closer than the true match (0 = perfect, 0.5 = random)
    n: int


# distances held at once by retrieval (float64: 256 MB)
RETRIEVAL_BLOCK_VALUES = 2**25


def retrieval(z_query: np.ndarray, z_target: np.ndarray) -> Retrieval:
    """Find each query's partner among all targets (Euclidean distance).

    Parameters
    ----------
    z_query : (n, d) e.g. image-only latents.
    z_target : (n, d) e.g. expression-only latents; row i is the partner of query i.

    Notes
    -----
    Recall@k is computed query -> target. FOSCTTM (Liu et al. 2019) is the
    mean of both directions: for each row, the fraction of the other n - 1
    rows that lie closer than its true partner.
    """
    from scipy.spatial.distance import cdist

    q = _check_2d("z_query", z_query)
    t = _check_2d("z_target", z_target)
    if q.shape != t.shape:
        raise ValueError(f"retrieval: z_query {q.shape} and z_target {t.shape} differ")
    n = len(q)
    if n < 2:
        raise ValueError("retrieval: needs at least 2 pairs")
    # the (n, n) distances a block of queries at a time (at most RETRIEVAL_BLOCK_VALUES
    # each): whole, 50k pairs took 20 GB (expression-at-scale audit); cdist gives a pair
    # the same distance in any block, so ranks and ties are those of the whole matrix
    step = max(1, RETRIEVAL_BLOCK_VALUES // n)
    true = np.empty(n)
    for s in range(0, n, step):
        e = min(n, s + step)
        true[s:e] = np.diagonal(cdist(q[s:e], t[s:e]))
    rank = np.empty(n, np.int64)  # of the true partner (0 = nearest); ties count against
    closer_t = np.zeros(n, np.int64)
    for s in range(0, n, step):
        d = cdist(q[s : s + step], t)  # rows: these queries, columns: every target
        rank[s : s + step] = (d < true[s : s + step, None]).sum(1)
        closer_t += (d < true[None, :]).sum(0)
    closer_q = rank / (n - 1)
    closer_t = closer_t / (n - 1)
    return Retrieval(
        recall_at_1=float(np.mean(rank < 1)),
        recall_at_5=float(np.mean(rank < 5)),
        recall_at_10=float(np.mean(rank < 10)),
        foscttm=float((closer_q.mean() + closer_t.mean()) / 2),
        n=n,
    )


# ----------------------------------------------------------------------------
# disentanglement
# ----------------------------------------------------------------------------


def _discretize(x: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins of each column; (n, d) -> (n, d) int."""
    out = np.zeros(x.shape, dtype=np.int64)
    for j in range(x.shape[1]):
        col = x[:, j]
        edges = np.histogram_bin_edges(col, bins=bins)
        out[:, j] = np.digitize(col, edges[1:-1])
    return out


def known_rows(v: np.ndarray) -> np.ndarray:
    """(n,) bool: rows where a factor is known (finite number, or a label other than NaN/None/"")."""
    v = np.asarray(v)
    if v.dtype.kind in "fiub":
        return np.isfinite(v.astype(np.float64))
    s = v.astype(str)
    return ~np.isin(s, ["nan", "None", "", "NA", "<NA>"])


def _factor_codes(v: np.ndarray, bins: int) -> np.ndarray:
    """Discrete codes of a factor: categorical as is, numeric binned if many values."""
    v = np.asarray(v)
    if v.dtype.kind in "fiub":
        v = v.astype(np.float64)
        uniq = np.unique(v)
        if len(uniq) <= bins:
            return np.searchsorted(uniq, v)
        return _discretize(v[:, None], bins)[:, 0]
    return _labels(v)


@dataclass
class MIG:
    """Mutual information gap (Chen et al. 2018)."""

    mig: float  # mean over factors of the normalised gap, in [0, 1]
    per_factor: dict[str, float]  # normalised gap of each factor
    best_dim: dict[str, int]  # latent dimension with the highest MI for each factor
    mutual_info: np.ndarray  # (d, n_factors) MI in nats


def mig(z: np.ndarray, factors: dict[str, np.ndarray], bins: int = 20) -> MIG:
    """Mutual information gap of a code against known factors.

    Parameters
    ----------
    z : (n, d) latent codes.
    factors : name -> (n,) factor values; numeric factors with more than
        ``bins`` distinct values are binned, others used as categories. Rows
        where a factor is unknown (NaN) are left out for that factor.
    bins : histogram bins of each latent dimension (and numeric factor).

    Returns
    -------
    MIG; a factor with zero entropy (constant) is skipped.
    """
    from sklearn.metrics import mutual_info_score

    z = _check_2d("z", z)
    if not factors:
        raise ValueError("mig: no factors given")
    names = list(factors)
    mi = np.zeros((z.shape[1], len(names)))
    per, best = {}, {}
    for j, name in enumerate(names):
        raw = np.asarray(factors[name])
        _check_rows(f"factors[{name!r}]", raw, len(z))
        ok = known_rows(raw)  # e.g. maturation t is unknown for lymphocytes
        if ok.sum() < 2:
            continue
        v = _factor_codes(raw[ok], bins)
        zd = _discretize(z[ok], bins)
        for i in range(z.shape[1]):
            mi[i, j] = mutual_info_score(v, zd[:, i])
        h = stats.entropy(np.bincount(v))
        if h <= 0:
            continue
        top = np.sort(mi[:, j])[::-1]
        gap = top[0] - (top[1] if len(top) > 1 else 0.0)
        per[name] = float(gap / h)
        best[name] = int(np.argmax(mi[:, j]))
    return MIG(
        mig=float(np.mean(list(per.values()))) if per else float("nan"),
        per_factor=per,
        best_dim=best,
        mutual_info=mi,
    )


@dataclass
class DCI:
    """Disentanglement, completeness, informativeness (Eastwood & Williams 2018)."""

    disentanglement: float  # in [0, 1]: each latent dim explains one factor
    completeness: float  # in [0, 1]: each factor is captured by one dim
    informativeness: dict[str, float]  # held-out R^2 (numeric) or accuracy (categorical)
    importance: np.ndarray  # (d, n_factors) feature importances, columns sum to 1
    factors: list[str]


def dci(
    z: np.ndarray,
    factors: dict[str, np.ndarray],
    n_estimators: int = 50,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> DCI:
    """DCI with random-forest regressors/classifiers (scikit-learn).

    Parameters
    ----------
    z : (n, d) latent codes.
    factors : name -> (n,) values; numeric factors with more than 10 distinct
        values are regressed, others classified. Rows where a factor is
        unknown (NaN) are left out for that factor.
    n_estimators : trees per forest.
    test_fraction : share of rows held out for informativeness.
    """
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    z = _check_2d("z", z)
    d = z.shape[1]
    names, cols, info = [], [], {}
    rng = np.random.default_rng(seed)
    for name, v in factors.items():
        v = np.asarray(v)
        _check_rows(f"factors[{name!r}]", v, len(z))
        ok = known_rows(v)  # unknown rows (NaN) are left out for this factor
        if ok.sum() < 4 or len(np.unique(v[ok])) < 2:
            continue
        numeric = v.dtype.kind in "fiu" and len(np.unique(v[ok])) > 10
        rows = np.flatnonzero(ok)
        perm = rng.permutation(rows)
        n_te = max(1, int(round(test_fraction * len(rows))))
        idx_te, idx_tr = perm[:n_te], perm[n_te:]
        if numeric:
            m = RandomForestRegressor(
                n_estimators=n_estimators, max_depth=8, random_state=seed, n_jobs=1
            )
            y = v.astype(np.float64)
        else:
            m = RandomForestClassifier(
                n_estimators=n_estimators, max_depth=8, random_state=seed, n_jobs=1
            )
            y = np.asarray(v).astype(str)
        m.fit(z[idx_tr], y[idx_tr])
        info[name] = float(m.score(z[idx_te], y[idx_te]))
        imp = np.abs(m.feature_importances_)
        cols.append(imp / imp.sum() if imp.sum() > 0 else np.full(d, 1.0 / d))
        names.append(name)
    if not names:
        raise ValueError("dci: no factor with at least 2 distinct values")
    R = np.stack(cols, axis=1)  # (d, K)
    K = R.shape[1]
    # disentanglement: 1 - entropy (base K) of each dim's importance over factors
    rowsum = R.sum(1)
    p_dim = R / np.maximum(rowsum[:, None], 1e-12)
    h_dim = stats.entropy(p_dim.T, base=K) if K > 1 else np.zeros(d)
    rho = rowsum / max(rowsum.sum(), 1e-12)
    dis = float(np.sum(rho * (1 - h_dim)))
    # completeness: 1 - entropy (base d) of each factor's importance over dims
    h_fac = stats.entropy(R, base=d) if d > 1 else np.zeros(K)
    comp = float(np.mean(1 - h_fac))
    return DCI(
        disentanglement=dis, completeness=comp, informativeness=info, importance=R, factors=names
    )


@dataclass
class BestDim:
    dim: int  # latent dimension with the largest |Spearman rho|
    spearman: float  # its signed rho
    abs_spearman: float


def best_dim_spearman(z: np.ndarray, factor: np.ndarray) -> BestDim:
    """The latent dimension most monotonically related to a numeric factor.

    Rows where the factor is NaN are ignored.
    """
    z = _check_2d("z", z)
    f = np.asarray(factor, dtype=np.float64)
    _check_rows("factor", f, len(z))
    ok = np.isfinite(f)
    if ok.sum() < 3 or np.unique(f[ok]).size < 2:
        return BestDim(dim=-1, spearman=float("nan"), abs_spearman=float("nan"))
    rhos = np.array([_spearman(z[ok, i], f[ok]) for i in range(z.shape[1])])
    a = np.nan_to_num(np.abs(rhos), nan=-1)
    i = int(np.argmax(a))
    return BestDim(dim=i, spearman=float(rhos[i]), abs_spearman=float(abs(rhos[i])))


def feature_prediction(
    z_fit: np.ndarray,
    features_fit: np.ndarray,
    z: np.ndarray,
    features: np.ndarray,
    alphas: np.ndarray | None = None,
    min_rows: int = 10,
) -> np.ndarray:
    """How well a code predicts measured cell features on held-out cells.

    One ridge regression per feature (standardised codes, penalty chosen by
    efficient leave-one-out CV over ``alphas``), fitted on ``z_fit`` and scored
    on ``z`` by the Spearman correlation of its predictions with the measured
    values. A code that keeps a cell's morphology beyond its label scores high
    on features that vary *within* a class (nucleus shape, granularity, colour).

    Parameters
    ----------
    z_fit : (m, d) codes of the reference cells.
    features_fit : (m, q) their measured features; NaN rows are skipped per feature.
    z : (n, d) codes of the held-out cells.
    features : (n, q) their measured features.
    alphas : ridge penalties tried (default ``logspace(-3, 3, 13)``).
    min_rows : a feature with fewer finite fitted or held-out rows scores NaN.

    Returns
    -------
    (q,) Spearman rho per feature, NaN where it is undefined.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    z_fit, z = _check_2d("z_fit", z_fit), _check_2d("z", z)
    f_fit = np.asarray(features_fit, dtype=np.float64).reshape(len(z_fit), -1)
    f = np.asarray(features, dtype=np.float64).reshape(len(z), -1)
    if f_fit.shape[1] != f.shape[1] or z_fit.shape[1] != z.shape[1]:
        raise ValueError(
            f"feature_prediction: fitted ({z_fit.shape}, {f_fit.shape}) and held-out "
            f"({z.shape}, {f.shape}) arrays do not match"
        )
    alphas = np.logspace(-3, 3, 13) if alphas is None else np.asarray(alphas, float)
    out = np.full(f.shape[1], np.nan)
    for j in range(f.shape[1]):
        a, b = np.isfinite(f_fit[:, j]), np.isfinite(f[:, j])
        if a.sum() < min_rows or b.sum() < min_rows or np.ptp(f_fit[a, j]) == 0:
            continue
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas))
        model.fit(z_fit[a], f_fit[a, j])
        out[j] = _spearman(model.predict(z[b]), f[b, j])
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def correlation_matrix(x: np.ndarray, y: np.ndarray, method: str = "spearman") -> np.ndarray:
    """Correlation of every column of ``x`` (n, p) with every column of ``y`` (n, q).

    NaN rows of a column pair are dropped; constant columns give NaN.
    Returns (p, q).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if y.ndim == 1:
        y = y[:, None]
    _check_rows("y", y, len(x))
    f = _spearman if method == "spearman" else _pearson
    out = np.full((x.shape[1], y.shape[1]), np.nan)
    for i in range(x.shape[1]):
        for j in range(y.shape[1]):
            ok = np.isfinite(x[:, i]) & np.isfinite(y[:, j])
            if ok.sum() >= 3:
                out[i, j] = f(x[ok, i], y[ok, j])
    return out


def correlation_within_groups(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, min_rows: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Spearman of every column of ``x`` with ``y`` inside each group, pooled.

    The mean of the per-group correlations weighted by the rows each rests on, over the
    groups with at least ``min_rows`` rows where both values are defined and a defined
    correlation: what a correlation reads once the groups' offsets (image sources with
    their own stain and sharpness) are taken out, where a pooled correlation can follow
    the groups instead of the cells. Rows of no known group (None, NaN, "", "nan",
    :data:`vae.inputs.schema.UNKNOWN_LABELS`) are left out. A column whose value rests on
    fewer than two groups is NaN: it is not a comparison within groups.

    Parameters
    ----------
    x : (n, p) features; y : (n,) values; groups : (n,) group of each row.
    min_rows : a group with fewer defined rows for a column is left out of that column.

    Returns
    -------
    (p,) pooled within-group correlations, and (p,) int the number of groups behind each.
    """
    from vae.inputs.schema import known_labels

    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    y = np.asarray(y, dtype=np.float64)
    groups = np.asarray(groups, dtype=object)
    _check_rows("y", y[:, None], len(x))
    _check_rows("groups", groups[:, None], len(x))
    known = known_labels(groups)
    names = groups.astype(str)
    num = np.zeros(x.shape[1])
    den = np.zeros(x.shape[1])
    used = np.zeros(x.shape[1], dtype=int)
    for g in np.unique(names[known]):
        rows = known & (names == g)
        for j in range(x.shape[1]):
            ok = rows & np.isfinite(x[:, j]) & np.isfinite(y)
            if ok.sum() < min_rows:
                continue
            r = correlation_matrix(x[ok, j], y[ok])[0, 0]
            if np.isfinite(r):
                num[j] += ok.sum() * r
                den[j] += ok.sum()
                used[j] += 1
    out = np.where(used >= 2, num / np.where(den > 0, den, 1.0), np.nan)
    return out, used


# ----------------------------------------------------------------------------
# reconstruction
# ----------------------------------------------------------------------------


def masked_mse(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean squared error over the cell mask, per image.

    Parameters
    ----------
    pred, target : (n, H, W, C) or (n, C, H, W) float images in [0, 1]; same layout.
    mask : (n, H, W) bool, True inside the cell.

    Returns
    -------
    (n,) MSE per image over masked pixels and all channels (NaN for an empty mask).
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"masked_mse: pred {pred.shape} and target {target.shape} differ")
    m = np.asarray(mask, dtype=bool)
    cl = _channel_last(pred, m)
    pred, target = (pred, target) if cl else (np.moveaxis(pred, 1, -1), np.moveaxis(target, 1, -1))
    err = ((pred - target) ** 2).mean(-1)  # (n, H, W)
    n_in = m.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_in > 0, (err * m).sum((1, 2)) / n_in, np.nan)


def _channel_last(img: np.ndarray, mask: np.ndarray) -> bool:
    if img.ndim != 4 or mask.ndim != 3:
        raise ValueError(
            f"images must be (n, H, W, C) or (n, C, H, W), masks (n, H, W); got {img.shape}, {mask.shape}"
        )
    if img.shape[1:3] == mask.shape[1:]:
        return True
    if img.shape[2:] == mask.shape[1:]:
        return False
    raise ValueError(f"image shape {img.shape} does not match mask shape {mask.shape}")


def masked_ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """SSIM (skimage.metrics.structural_similarity) averaged over the cell mask.

    Same arguments as :func:`masked_mse`. Returns (n,) mean SSIM of the local
    SSIM map over masked pixels (NaN for an empty mask).
    """
    from skimage.metrics import structural_similarity

    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if not _channel_last(pred, m):
        pred, target = np.moveaxis(pred, 1, -1), np.moveaxis(target, 1, -1)
    out = np.full(len(pred), np.nan)
    win = min(7, min(pred.shape[1:3]) // 2 * 2 - 1)
    for i in range(len(pred)):
        if not m[i].any():
            continue
        _, smap = structural_similarity(
            target[i], pred[i], data_range=1.0, channel_axis=-1, full=True, win_size=win
        )
        out[i] = smap.mean(-1)[m[i]].mean()
    return out


@dataclass
class GeneCorrelation:
    """Per-gene agreement of predicted and observed expression across cells."""

    pearson: np.ndarray  # (G,) NaN for constant genes
    spearman: np.ndarray  # (G,)
    mean_pearson: float  # nanmean over genes
    mean_spearman: float


def per_gene_correlation(pred: np.ndarray, obs: np.ndarray) -> GeneCorrelation:
    """Pearson and Spearman r of each gene across cells.

    Parameters
    ----------
    pred, obs : (n, G) predicted and observed (log-normalised) expression.
    """
    pred = _check_2d("pred", pred)
    obs = _check_2d("obs", obs)
    if pred.shape != obs.shape:
        raise ValueError(f"per_gene_correlation: pred {pred.shape} and obs {obs.shape} differ")
    G = pred.shape[1]
    p = np.array([_pearson(pred[:, g], obs[:, g]) for g in range(G)])
    s = np.array([_spearman(pred[:, g], obs[:, g]) for g in range(G)])
    return GeneCorrelation(
        pearson=p,
        spearman=s,
        mean_pearson=float(np.nanmean(p)) if np.isfinite(p).any() else float("nan"),
        mean_spearman=float(np.nanmean(s)) if np.isfinite(s).any() else float("nan"),
    )


def nb_log_likelihood(counts: np.ndarray, mu: np.ndarray, theta: np.ndarray | float) -> np.ndarray:
    """Negative-binomial log-likelihood, mean/inverse-dispersion form.

    ``log NB(x; mu, theta) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
    + theta log(theta / (theta + mu)) + x log(mu / (theta + mu))``

    Parameters
    ----------
    counts : (n, G) non-negative counts.
    mu : (n, G) positive means.
    theta : (G,), (n, G) or scalar positive inverse dispersion.

    Returns
    -------
    (n,) log-likelihood per cell in nats (summed over genes).
    """
    x = np.asarray(counts, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    th = np.broadcast_to(np.asarray(theta, dtype=np.float64), x.shape)
    if mu.shape != x.shape:
        raise ValueError(f"nb_log_likelihood: mu {mu.shape} and counts {x.shape} differ")
    if (x < 0).any() or (mu <= 0).any() or (th <= 0).any():
        raise ValueError("nb_log_likelihood: counts must be >= 0, mu and theta > 0")
    ll = (
        special.gammaln(x + th)
        - special.gammaln(th)
        - special.gammaln(x + 1)
        + th * (np.log(th) - np.log(th + mu))
        + x * (np.log(mu) - np.log(th + mu))
    )
    return ll.sum(1)


def to_dict(obj) -> dict:
    """A metric dataclass as a JSON-friendly dict (arrays dropped)."""
    return {k: v for k, v in asdict(obj).items() if not isinstance(v, np.ndarray)}


def batch_mixing(
    z: np.ndarray,
    batches: np.ndarray,
    labels: np.ndarray,
    k: int = 15,
    min_per_batch: int = 5,
) -> dict | None:
    """Do cells of one class from different batches share one region of the latent?

    Within each class holding at least ``min_per_batch`` cells of two or more batches
    (batches with fewer are left out of that class) and more than ``k + 1`` cells (with
    fewer, every cell's neighbours are its whole class and the share is the expected one
    whatever the layout: such a class would read as perfectly mixed), each cell's ``k``
    nearest cells *of its class* are found; the share of them from its own batch is compared with the
    share expected if the batch did not matter (the other cells of its batch over the
    other cells of its class). Scoring within a class keeps a difference in the
    batches' make-up (one patient with more blasts) from reading as a batch effect, as
    a plain kNN batch classifier would. The class-wise form of kBET / LISI's question.

    Parameters
    ----------
    z : (n, d) codes
    batches : (n,) batch names; unknown ones (:func:`vae.inputs.schema.known_labels`)
        are left out
    labels : (n,) class labels; unknown ones are left out
    k : neighbours per cell
    min_per_batch : cells a batch needs within a class to be scored there

    Returns
    -------
    dict with ``same_batch_share`` (mean over the scored cells), ``if_mixed`` (its
    expectation), ``separation`` = (share - if_mixed) / (1 - if_mixed) (0: mixed as
    chance has it, 1: every neighbour from one's own batch), ``n_cells``, ``n_batches``,
    ``classes`` (the classes scored), ``classes_too_small`` (classes with two batches
    left out for having ``k + 1`` cells or fewer); None when no class qualifies.
    """
    from sklearn.neighbors import NearestNeighbors

    from vae.inputs.schema import known_labels

    z = np.asarray(z, np.float64)
    bat = np.asarray(batches, dtype=object)
    lab = np.asarray(labels, dtype=object)
    keep = known_labels(bat) & known_labels(lab) & np.isfinite(z).all(1)
    bat, lab = bat.astype(str), lab.astype(str)
    obs, exp, classes, small, seen = [], [], [], [], set()
    for c in np.unique(lab[keep]):
        rows = np.flatnonzero(keep & (lab == c))
        names, sizes = np.unique(bat[rows], return_counts=True)
        big = set(names[sizes >= min_per_batch])
        rows = rows[np.isin(bat[rows], list(big))]
        if len(big) < 2:
            continue
        if len(rows) <= k + 1:
            small.append(str(c))
            continue
        kk = k
        nn = NearestNeighbors(n_neighbors=kk + 1).fit(z[rows])
        idx = nn.kneighbors(z[rows], return_distance=False)[:, 1:]  # self first: dropped
        mine = bat[rows]
        obs.append((mine[idx] == mine[:, None]).mean(1))
        _, inv, cnt = np.unique(mine, return_inverse=True, return_counts=True)
        exp.append((cnt[inv] - 1) / (len(rows) - 1))
        classes.append(str(c))
        seen |= big
    if not classes:
        return None
    o, e = np.concatenate(obs), np.concatenate(exp)
    so, se = float(o.mean()), float(e.mean())
    return {
        "same_batch_share": so,
        "if_mixed": se,
        # 0: the batches mixed as chance has it, 1: every neighbour of one's own batch
        "separation": (so - se) / (1.0 - se) if se < 1 else float("nan"),
        "n_cells": int(len(o)),
        "n_batches": len(seen),
        "classes": classes,
        "classes_too_small": small,
    }


def modality_mixing(
    z: np.ndarray,
    has_image: np.ndarray,
    labels: np.ndarray,
    k: int = 15,
    min_per_group: int = 5,
) -> dict | None:
    """Do cells with a crop and profile-only cells of one class share one region of the latent?

    :func:`batch_mixing` with the two kinds as the batches: within each class that has at
    least ``min_per_group`` cells of both kinds and more than ``k + 1`` cells, each cell's
    ``k`` nearest cells *of its class* are found; the share of them that are of its own
    kind (crop or profile only) is compared with the share expected if the kind did not
    matter (the other cells of its kind over the other cells of its class). A shared latent
    whose kinds sit in separate islands scores near 1 against a lower expectation: one
    class drawn as two groups on a UMAP, by the pairing, not by biology.

    Parameters
    ----------
    z : (n, d) codes
    has_image : (n,) bool, the row has a crop
    labels : (n,) class labels; unknown ones (:func:`vae.inputs.schema.known_labels`)
        are left out
    k : neighbours per cell
    min_per_group : cells of each kind a class needs to be scored

    Returns
    -------
    dict with ``same_kind_share`` (mean over the scored cells), ``if_mixed`` (its
    expectation), ``separation`` = (share - if_mixed) / (1 - if_mixed) (0: mixed as
    chance has it, 1: islands by kind), ``n_cells``, ``classes`` (the classes scored),
    ``classes_too_small`` (both kinds, ``k + 1`` cells or fewer: a class whose cells'
    neighbours are all of it scores as mixed whatever its layout, so it is left out);
    None when no class qualifies.
    """
    kind = np.where(np.asarray(has_image, bool), "crop", "profile only")
    m = batch_mixing(z, kind, labels, k=k, min_per_batch=min_per_group)
    if m is None:
        return None
    # the same within-class neighbour count as batch_mixing, the two kinds as batches
    return {
        "same_kind_share": m["same_batch_share"],
        "if_mixed": m["if_mixed"],
        # 0: the kinds mixed as chance has it, 1: every neighbour of one's own kind
        "separation": m["separation"],
        "n_cells": m["n_cells"],
        "classes": m["classes"],
        "classes_too_small": m["classes_too_small"],
    }
