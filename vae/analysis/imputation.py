"""Imputation (LATE's protocol) and denoising scores of an expression model, with baselines.

LATE (Badsha et al. 2020) hides a random share of the *observed non-zero*
entries of held-out cells (sets them to zero, as dropout would), lets the
model reconstruct the cells from what is left, and scores the hidden entries
against their true values. Everything here works on log-normalised values
``log1p(count / library * target_sum)``; functions take plain arrays and
return small dataclasses or frames (no config, no files).

Pieces
------
- :func:`hide_nonzero` seeded choice of the hidden entries; cells with fewer
  than ``min_nonzero`` non-zero entries are skipped (nothing hidden) and counted
- :func:`apply_hiding` the masked inputs (counts and log values zeroed there)
- :func:`score_hidden` Pearson / Spearman / median absolute error, overall and per gene
- predictors: :func:`model_imputation` (the β-VAE through :func:`vae.infer.encode_dataset`),
  :func:`gene_mean_imputation`, :func:`knn_imputation` (kNN smoothing over the expression
  PCA, MAGIC in spirit); scvi-tools runs in ``scripts/scvi_impute.py`` (it may live in
  another environment)
- :func:`denoising_scores` decoded vs noise-free truth against observed vs truth, per program
- :func:`late_figure` predicted vs true, observed and hidden entries in two colours
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats

DEFAULT_FRACTION = 0.1  # share of a cell's non-zero entries that is hidden (LATE)
DEFAULT_MIN_NONZERO = 10  # cells with fewer non-zero entries are skipped
MIN_ENTRIES_PER_GENE = 5  # per-gene scores need this many hidden entries (else NaN)


@dataclass
class Hidden:
    """Which entries are hidden.

    hidden : (n, G) bool, True where a non-zero entry was hidden
    skipped : (n,) bool, cells with fewer than ``min_nonzero`` non-zero entries
        (nothing hidden in them; they are left out of the scores)
    fraction, seed, min_nonzero : the settings used
    """

    hidden: np.ndarray
    skipped: np.ndarray
    fraction: float
    seed: int
    min_nonzero: int

    @property
    def n_skipped(self) -> int:
        return int(self.skipped.sum())

    @property
    def n_hidden(self) -> int:
        return int(self.hidden.sum())


def hide_nonzero(
    values: np.ndarray,
    fraction: float = DEFAULT_FRACTION,
    seed: int = 0,
    min_nonzero: int = DEFAULT_MIN_NONZERO,
) -> Hidden:
    """Choose ``fraction`` of each cell's non-zero entries at random (seeded).

    Parameters
    ----------
    values : (n, G) counts or log-normalised values; entries > 0 are "observed non-zero"
    fraction : share hidden per cell, in (0, 1); at least one entry per kept cell
    seed : NumPy seed; the same seed and input give the same entries
    min_nonzero : cells with fewer non-zero entries are skipped and counted

    Returns
    -------
    Hidden
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction}: must be in (0, 1)")
    v = np.asarray(values)
    if v.ndim != 2:
        raise ValueError(f"values: expected (n, G), got shape {v.shape}")
    nz = v > 0
    rng = np.random.default_rng(seed)
    hidden = np.zeros(v.shape, dtype=bool)
    skipped = nz.sum(1) < max(int(min_nonzero), 1)
    for i in np.flatnonzero(~skipped):
        cols = np.flatnonzero(nz[i])
        k = max(1, int(round(fraction * cols.size)))
        hidden[i, rng.choice(cols, size=k, replace=False)] = True
    return Hidden(hidden, skipped, float(fraction), int(seed), int(min_nonzero))


def lognorm(counts: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    """``log1p(counts / library * target_sum)`` per row, (n, G) float32."""
    c = np.asarray(counts, dtype=np.float64)
    lib = np.maximum(c.sum(1, keepdims=True), 1.0)
    return np.log1p(c / lib * target_sum).astype(np.float32)


def apply_hiding(
    x: np.ndarray, counts: np.ndarray | None, h: Hidden
) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs with the hidden entries set to zero (dropout), (x, counts) copies.

    The other log values are kept as they were (the library size the model sees
    comes from the masked counts, as it would for a cell that lost those reads).
    """
    xm = np.where(h.hidden, 0.0, np.asarray(x, dtype=np.float32)).astype(np.float32)
    cm = None
    if counts is not None:
        cm = np.where(h.hidden, 0.0, np.asarray(counts, dtype=np.float32)).astype(np.float32)
    return xm, cm


@dataclass
class ImputationScore:
    """Scores of the hidden entries (log-normalised values).

    pearson, spearman : over all hidden entries of the scored cells
    median_abs_error : median |predicted - true|
    gene_pearson, gene_spearman : mean of the per-gene values (genes with
        >= ``MIN_ENTRIES_PER_GENE`` hidden entries and some spread)
    n_entries, n_cells, n_skipped : hidden entries scored, cells scored, cells skipped
    per_gene : frame gene, n, pearson, spearman, median_abs_error
    """

    pearson: float
    spearman: float
    median_abs_error: float
    gene_pearson: float
    gene_spearman: float
    n_entries: int
    n_cells: int
    n_skipped: int
    per_gene: pd.DataFrame

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "per_gene"}


def _r(a: np.ndarray, b: np.ndarray, kind: str) -> float:
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    f = stats.pearsonr if kind == "pearson" else stats.spearmanr
    return float(f(a, b)[0])


def score_hidden(
    pred: np.ndarray,
    truth: np.ndarray,
    h: Hidden,
    genes: list[str] | None = None,
    min_per_gene: int = MIN_ENTRIES_PER_GENE,
) -> ImputationScore:
    """Score predictions on the hidden entries of ``h``.

    Parameters
    ----------
    pred, truth : (n, G) log-normalised predicted and true values
    h : the hidden entries (skipped cells hold none)
    genes : G names for the per-gene frame (default ``g0, g1, ...``)
    min_per_gene : fewer hidden entries than this give NaN for that gene
    """
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape or pred.shape != h.hidden.shape:
        raise ValueError(
            f"shapes differ: pred {pred.shape}, truth {truth.shape}, hidden {h.hidden.shape}"
        )
    m = h.hidden
    p, t = pred[m], truth[m]
    rows = []
    names = genes if genes is not None else [f"g{j}" for j in range(m.shape[1])]
    for j, g in enumerate(names):
        mj = m[:, j]
        n = int(mj.sum())
        ok = n >= min_per_gene
        pj, tj = pred[mj, j], truth[mj, j]
        rows.append(
            {
                "gene": g,
                "n": n,
                "pearson": _r(pj, tj, "pearson") if ok else np.nan,
                "spearman": _r(pj, tj, "spearman") if ok else np.nan,
                "median_abs_error": float(np.median(np.abs(pj - tj))) if n else np.nan,
            }
        )
    per_gene = pd.DataFrame(rows)
    return ImputationScore(
        pearson=_r(p, t, "pearson"),
        spearman=_r(p, t, "spearman"),
        median_abs_error=float(np.median(np.abs(p - t))) if p.size else float("nan"),
        gene_pearson=float(np.nanmean(per_gene["pearson"]))
        if per_gene["pearson"].notna().any()
        else float("nan"),
        gene_spearman=float(np.nanmean(per_gene["spearman"]))
        if per_gene["spearman"].notna().any()
        else float("nan"),
        n_entries=int(m.sum()),
        n_cells=int((m.any(1)).sum()),
        n_skipped=h.n_skipped,
        per_gene=per_gene,
    )


# --------------------------------------------------------------------------- predictors


def gene_mean_imputation(x_ref: np.ndarray, n: int) -> np.ndarray:
    """Each gene's mean log value over the reference cells (zeros included), (n, G)."""
    mu = np.asarray(x_ref, dtype=np.float64).mean(0)
    return np.broadcast_to(mu, (n, mu.size)).astype(np.float32).copy()


def knn_imputation(
    x_query: np.ndarray, x_ref: np.ndarray, k: int = 15, n_pcs: int = 20, seed: int = 0
) -> np.ndarray:
    """kNN smoothing over the expression PCA (MAGIC's idea without diffusion powers).

    PCA is fitted on the reference cells' log values; each (masked) query cell
    takes the mean log profile of its ``k`` nearest reference cells in that PCA
    space. The query's own (zeroed) values never enter its prediction.

    Parameters
    ----------
    x_query : (n, G) masked log values; x_ref : (m, G) reference log values
    """
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    x_ref = np.asarray(x_ref, dtype=np.float64)
    n_pcs = max(1, min(n_pcs, x_ref.shape[0] - 1, x_ref.shape[1]))
    pca = PCA(n_components=n_pcs, random_state=seed).fit(x_ref)
    nn = NearestNeighbors(n_neighbors=min(k, x_ref.shape[0])).fit(pca.transform(x_ref))
    idx = nn.kneighbors(pca.transform(np.asarray(x_query, dtype=np.float64)), return_distance=False)
    return x_ref[idx].mean(1).astype(np.float32)


def masked_tensors(data, rows: np.ndarray, x: np.ndarray, counts: np.ndarray | None):
    """The ``rows`` of ``data`` (PairedTensors) as expression-only rows with new values.

    Images are dropped (``has_image`` False) so the model imputes from the masked
    profile alone, as LATE does; library sizes come from the masked counts.
    """
    import torch

    idx = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    n = idx.numel()
    c = torch.from_numpy(np.asarray(counts, dtype=np.float32)) if counts is not None else None
    if c is not None:
        lib = c.sum(1)
    else:
        lib = torch.from_numpy(np.expm1(np.asarray(x, dtype=np.float64)).sum(1).astype(np.float32))
    lib = torch.where(lib > 0, lib, torch.ones_like(lib))
    return replace(
        data,
        crops=data.crops.index_select(0, idx),
        masks=data.masks.index_select(0, idx),
        x=torch.from_numpy(np.asarray(x, dtype=np.float32)),
        counts=c,
        library=lib,
        has_image=torch.zeros(n, dtype=torch.bool),
        has_expression=torch.ones(n, dtype=torch.bool),
        labels=data.labels.index_select(0, idx),
        obs_names=[data.obs_names[i] for i in np.asarray(rows)],
    )


def model_imputation(model, data, device="cpu", batch_size: int = 256) -> np.ndarray:
    """Log-normalised expression decoded from the fused posterior mean, (n, G).

    ``data`` is typically :func:`masked_tensors`' output; the decoding is
    :func:`vae.infer.encode_dataset` with ``decode=True`` (``rec_expression``).
    """
    from vae.infer import encode_dataset

    lat = encode_dataset(model, data, device, batch_size, decode=True)
    return lat.decoded.rec_expression.astype(np.float32)


# --------------------------------------------------------------------------- denoising


def denoising_scores(
    decoded: np.ndarray,
    observed: np.ndarray,
    truth: np.ndarray,
    program_of_gene: list[str] | np.ndarray,
) -> pd.DataFrame:
    """Per gene programme: mean per-gene Pearson of decoded vs truth and observed vs truth.

    Parameters
    ----------
    decoded : (n, G) model output (log-normalised)
    observed : (n, G) the noisy input (log-normalised counts)
    truth : (n, G) noise-free log-normalised expression (simulator)
    program_of_gene : (G,) programme name of each gene

    Returns
    -------
    frame program, n_genes, decoded_pearson, observed_pearson, gain (decoded - observed);
    genes constant in the truth (no signal to recover) are left out; an ``all`` row last.
    """
    prog = np.asarray(program_of_gene).astype(str)
    truth = np.asarray(truth, dtype=np.float64)

    def per_gene(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        return np.array([_r(a[:, j], truth[:, j], "pearson") for j in range(truth.shape[1])])

    rd, ro = per_gene(decoded), per_gene(observed)
    ok = np.isfinite(rd) & np.isfinite(ro)
    rows = []
    for p in [*sorted(set(prog[ok])), "all"]:
        sel = ok & ((prog == p) if p != "all" else True)
        if not sel.any():
            continue
        d, o = float(rd[sel].mean()), float(ro[sel].mean())
        rows.append(
            {
                "program": p,
                "n_genes": int(sel.sum()),
                "decoded_pearson": d,
                "observed_pearson": o,
                "gain": d - o,
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- figure


def late_figure(
    pred: dict[str, np.ndarray],
    truth: np.ndarray,
    h: Hidden,
    max_points: int = 4000,
    seed: int = 0,
):
    """LATE's figure: predicted vs true log values, one panel per predictor.

    Observed non-zero entries (kept in the input) in grey, hidden (imputed)
    entries in red; each panel's title gives the Pearson r of the hidden ones.
    """
    from vae.analysis import figures as F

    plt = F.plt
    rng = np.random.default_rng(seed)
    truth = np.asarray(truth)
    obs_m = (truth > 0) & ~h.hidden & ~h.skipped[:, None]

    def sample(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r, c = np.nonzero(m)
        if r.size > max_points:
            keep = rng.choice(r.size, max_points, replace=False)
            r, c = r[keep], c[keep]
        return r, c

    ro, co = sample(obs_m)
    rh, ch = sample(h.hidden)
    fig, axes = plt.subplots(1, len(pred), figsize=(3.6 * len(pred), 3.6), squeeze=False)
    hi = float(truth.max()) if truth.size else 1.0
    for ax, (name, p) in zip(axes[0], pred.items()):
        ax.scatter(
            truth[ro, co], p[ro, co], s=3, alpha=0.3, c="0.6", label="observed", rasterized=True
        )
        ax.scatter(
            truth[rh, ch],
            p[rh, ch],
            s=3,
            alpha=0.5,
            c="tab:red",
            label="imputed (hidden)",
            rasterized=True,
        )
        ax.plot([0, hi], [0, hi], "k--", lw=0.7)
        r = _r(np.asarray(p)[h.hidden], truth[h.hidden], "pearson")
        ax.set_title(f"{name}: hidden r = {r:.2f}", fontsize=9)
        ax.set_xlabel("true log-normalised value")
    axes[0][0].set_ylabel("predicted")
    axes[0][0].legend(fontsize=7, markerscale=3, loc="upper left")
    fig.tight_layout()
    return fig
