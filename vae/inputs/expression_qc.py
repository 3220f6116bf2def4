"""Checks and QC of an expression matrix before :func:`vae.inputs.expression.preprocess`
normalises it: where raw counts are and whether a matrix holds them (:func:`counts_from`,
:func:`validate_matrix`), case-insensitive gene matching (:func:`match_genes`), the
settings and results of preprocessing (:class:`PreprocessParams`, :class:`QCReport`,
:class:`PreprocessResult`), the per-cell QC metrics and per-gene cell counts read by row
blocks, repeated gene names made unique, the settings checked before any work, and scanpy's
seurat HVG selection computed by row blocks on a sparse matrix
(:func:`seurat_hvg_sparse`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vae.inputs.expression_read import ExpressionInputError
from vae.inputs.schema import VALUE_KINDS

# the logger of vae.inputs.expression, where this code was moved from: log lines and
# their filters keep that name
log = logging.getLogger("vae.inputs.expression")


# sc.pp.highly_variable_genes flavors; the seurat_v3 ones rank raw counts with
# scikit-misc's loess (module skmisc, an optional scanpy dependency)
HVG_FLAVORS = ("seurat", "cell_ranger", "seurat_v3", "seurat_v3_paper")
HVG_FLAVORS_ON_COUNTS = ("seurat_v3", "seurat_v3_paper")


# a sparse input whose dense X (cells x genes x 4 bytes) would be larger stays sparse
# (CSR) through normalisation, HVG selection, scores, PCA and into expression.h5ad: 20k x
# 20k genes made dense took 6.5 GiB and a 1.9 GB file, 100k cells more than 17 GiB. Up to
# this size X is dense as it always was (e.g. 10k cells x 13k genes, Paul15 2660 x 240)
DENSE_X_MAX_BYTES = 512 * 2**20
# rows per block where a whole-matrix temporary (e.g. counts > 0) would copy every entry
ROW_BLOCK = 8192


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------


def _values(m) -> np.ndarray:
    return m.data if sp.issparse(m) else np.asarray(m)


def _is_counts(m) -> bool:
    """Whether a matrix holds raw counts: numeric, finite, non-negative integers."""
    v = _values(m)
    if not np.issubdtype(v.dtype, np.number) or v.size == 0:
        return False
    return bool(np.all(np.isfinite(v)) and (v >= 0).all() and np.all(v == np.round(v)))


def counts_elsewhere(adata: ad.AnnData) -> list[str]:
    """Integer-valued matrices besides ``X`` and ``layers["counts"]``: where raw counts are,
    as ``expression.counts_layer`` names them (``".raw"``, a layer's name)."""
    found = []
    if adata.raw is not None and adata.raw.n_obs == adata.n_obs and _is_counts(adata.raw.X):
        found.append(".raw")
    found += [n for n, m in adata.layers.items() if n != "counts" and _is_counts(m)]
    return found


# obs column :func:`counts_from` sets for ``counts_layer=".raw"``: each cell's total
# counts over every gene of ``.raw``, the library :func:`preprocess` normalises by
RAW_LIBRARY = "raw_total_counts"


def counts_from(adata: ad.AnnData, layer: str, src: str = "") -> ad.AnnData:
    """``adata`` with ``layers["counts"]`` set (in place) to ``layer``, where
    :func:`validate_matrix` reads counts; ``".raw"``: ``.raw.X`` restricted to ``X``'s
    genes, and ``obs[RAW_LIBRARY]`` each cell's total over *every* gene of ``.raw``.

    ``X``'s genes stay the features (the user's own selection, QC on them as before);
    the library is the sum of all the cell's counts, as ``stage=embed`` (``Study``)
    normalises the same file: normalised by the sum of a few variable genes, training
    saw other values than embedding did.
    """
    if layer == ".raw":
        raw = adata.raw
        if raw is None:
            raise ExpressionInputError(
                "the file has no .raw", field="expression.counts_layer", source=src
            )
        if raw.n_obs != adata.n_obs:
            raise ExpressionInputError(
                f".raw has {raw.n_obs} cells, X {adata.n_obs}",
                field="expression.counts_layer",
                source=src,
            )
        adata.layers["counts"] = raw[:, adata.var_names].X.copy()
        adata.obs[RAW_LIBRARY] = np.asarray(raw.X.sum(1), np.float64).ravel()
        log.info(
            "%s: counts from .raw (expression.counts_layer): X's %d genes, each cell "
            "normalised by its total over all %d genes of .raw",
            src,
            adata.n_vars,
            raw.n_vars,
        )
        return adata
    if layer not in adata.layers:
        raise ExpressionInputError(
            f"no layer {layer!r}; layers: {list(adata.layers) or 'none'}"
            + ("; .raw" if adata.raw is not None else ""),
            field="expression.counts_layer",
            source=src,
        )
    adata.layers["counts"] = adata.layers[layer].copy()
    log.info("%s: counts from %s (expression.counts_layer)", src, layer)
    return adata


def _counts_hint(adata: ad.AnnData) -> str:
    found = counts_elsewhere(adata)
    if not found:
        return ""
    where = " and ".join(".raw.X" if n == ".raw" else f"layers[{n!r}]" for n in found)
    return (
        f". Raw integer counts were found in {where}: to use them (NB likelihood, QC on "
        f"counts) set expression.counts_layer={found[0]}"
    )


def validate_matrix(adata: ad.AnnData, *, values: str = "auto", source: str = "") -> bool:
    """Check an input matrix; return whether it holds raw counts.

    Parameters
    ----------
    adata
        Cells x genes. Counts are taken from ``layers["counts"]`` if present, else ``X``.
    values
        ``counts``: require non-negative integers; ``lognorm``: ``X`` is already
        log-normalised (no counts); ``auto``: counts if integer-valued, else an
        error (the user says ``lognorm``: never a silent guess).
    source
        Named in error messages.

    Raises
    ------
    ExpressionInputError
        Empty matrix, duplicate cell or gene names (``obs_names``/``var_names``),
        NaN/inf or negative values, non-integer values where counts are required.
    """
    if values not in VALUE_KINDS:
        raise ExpressionInputError(
            f"unknown value kind {values!r}; valid: {', '.join(VALUE_KINDS)}",
            field="expression.values",
            source=source,
        )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ExpressionInputError(
            f"empty matrix ({adata.n_obs} cells x {adata.n_vars} genes)", field="X", source=source
        )
    for what, names in (("obs_names", adata.obs_names), ("var_names", adata.var_names)):
        dup = names[names.duplicated()].unique()
        if len(dup):
            kind = "cell" if what == "obs_names" else "gene"
            raise ExpressionInputError(
                f"{len(dup)} duplicate {kind} names, e.g. {list(dup[:5])}",
                field=what,
                source=source,
            )
    key = "layers['counts']" if "counts" in adata.layers else "X"
    m = adata.layers["counts"] if "counts" in adata.layers else adata.X
    v = _values(m)
    if not np.issubdtype(v.dtype, np.number):
        raise ExpressionInputError(f"dtype {v.dtype} is not numeric", field=key, source=source)
    bad = ~np.isfinite(v)
    if bad.any():
        raise ExpressionInputError(f"{int(bad.sum())} NaN/inf values", field=key, source=source)
    if (v < 0).any():
        hint = (
            " (looks scaled; give unscaled counts or log-normalised values)"
            if values != "counts"
            else ""
        )
        raise ExpressionInputError(
            f"{int((v < 0).sum())} negative values{hint}", field=key, source=source
        )
    integer = bool(np.all(v == np.round(v)))
    declared = adata.uns.get("input_values", values)
    if values == "counts" and not integer:
        raise ExpressionInputError(
            f"{int((v != np.round(v)).sum())} non-integer values, but expression.values="
            "counts requires raw counts (set values=lognorm for log-normalised input)"
            + _counts_hint(adata),
            field=key,
            source=source,
        )
    if values == "lognorm" or declared == "lognorm":
        if values == "lognorm" and integer:
            # log1p of a normalised profile is never all integers: these are counts that
            # would be treated as log values (no normalisation, Gaussian likelihood)
            log.warning(
                "%s: expression.values=lognorm, but every value of %s is a non-negative "
                "integer: these look like raw counts. Set expression.values=counts (or auto) "
                "if they are",
                source,
                key,
            )
        hint = _counts_hint(adata)
        if hint:
            log.warning("%s: expression.values=lognorm: counts not used%s", source, hint)
        return False
    if not integer:
        # never guess: counts and log-normalised values train different likelihoods
        raise ExpressionInputError(
            f"{int((v != np.round(v)).sum())} non-integer values, so these are not raw "
            "counts. Set expression.values=lognorm if they are log-normalised (no counts, "
            "Gaussian likelihood downstream), or give raw integer counts" + _counts_hint(adata),
            field="expression.values",
            source=source,
        )
    return True


# ----------------------------------------------------------------------------
# gene matching
# ----------------------------------------------------------------------------


@dataclass
class GeneMatch:
    """Case-insensitive match of requested symbols to ``var_names``.

    Attributes
    ----------
    matched
        Requested symbol -> symbol as spelled in the data (``MPO -> Mpo``).
    missing
        Requested symbols with no match.
    """

    matched: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def genes(self) -> list[str]:
        """Matched symbols as spelled in the data, in request order, unique."""
        return list(dict.fromkeys(self.matched.values()))


def match_genes(var_names, requested: list[str]) -> GeneMatch:
    """Match gene symbols case-insensitively (mouse ``Mpo`` for human ``MPO``).

    When two data genes differ only by case, the exact spelling wins, else the first.
    """
    names = [str(g) for g in var_names]
    exact = set(names)
    lower: dict[str, str] = {}
    for g in names:
        lower.setdefault(g.lower(), g)
    out = GeneMatch()
    for g in requested:
        if g in exact:
            out.matched[g] = g
        elif g.lower() in lower:
            out.matched[g] = lower[g.lower()]
        else:
            out.missing.append(g)
    return out


# ----------------------------------------------------------------------------
# preprocessing settings, results and QC
# ----------------------------------------------------------------------------


@dataclass
class PreprocessParams:
    """Settings of :func:`preprocess`; see ``ExpressionConfig`` for each meaning."""

    values: str = "auto"
    counts_layer: str | None = None
    min_genes: int = 0
    min_counts: int = 0
    max_pct_mito: float | None = None
    mito_prefix: str = "MT-"
    min_cells: int = 0
    target_sum: float = 1e4
    n_top_genes: int | None = 2000
    hvg_flavor: str = "seurat"
    subset_hvg: bool = False
    genes_of_interest: list[str] = field(default_factory=list)
    programs: dict[str, list[str]] = field(default_factory=dict)
    require_program_match: bool = True
    score_ctrl_size: int = 50
    score_n_bins: int = 25
    label_key: str | None = None
    maturation: str = "auto"
    maturation_key: str | None = None
    root_label: str | None = None
    scale: bool = False
    n_pcs: int = 30
    n_neighbors: int = 15
    umap: bool = True
    seed: int = 0
    batch_key: str | None = None
    # not a setting of ExpressionConfig: tests lower it to run the sparse path on small data
    dense_max_bytes: int = DENSE_X_MAX_BYTES


@dataclass
class QCReport:
    """What the QC filters did (counts of cells/genes in, dropped and out)."""

    n_cells_in: int
    n_genes_in: int
    dropped_min_genes: int = 0
    dropped_min_counts: int = 0
    dropped_mito: int = 0
    dropped_genes_min_cells: int = 0
    n_mito_genes: int = 0
    n_cells_out: int = 0
    n_genes_out: int = 0


@dataclass
class PreprocessResult:
    """Output of :func:`preprocess`.

    Attributes
    ----------
    adata
        Processed AnnData (contract of ``docs/artifacts.md``, section *expression*).
    qc
        Filter counts.
    programs
        Program -> matched genes (data spelling); empty list if nothing matched.
    missing
        Program -> requested symbols not found (also for ``genes_of_interest``).
    qc_frame
        Per-cell QC metrics of the input *before* filtering (for the QC figure),
        with a bool column ``kept``.
    """

    adata: ad.AnnData
    qc: QCReport
    programs: dict[str, list[str]]
    missing: dict[str, list[str]]
    qc_frame: pd.DataFrame


def _qc_metrics(counts, var_names, mito_prefix: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-cell total counts, detected genes and % mitochondrial counts."""
    mito = np.array([str(g).lower().startswith(mito_prefix.lower()) for g in var_names])
    if sp.issparse(counts):
        counts = counts.tocsr()
        total = np.asarray(counts.sum(1)).ravel()
        # by row blocks: counts > 0 of the whole matrix copies its index array (0.8 GB at
        # 100k cells x 20k genes, 10 % non-zero)
        n_genes = np.concatenate(
            [
                np.asarray((counts[s : s + ROW_BLOCK] > 0).sum(1)).ravel()
                for s in range(0, counts.shape[0], ROW_BLOCK)
            ]
        )
        mito_counts = np.asarray(counts[:, mito].sum(1)).ravel() if mito.any() else 0 * total
    else:
        counts = np.asarray(counts)
        total = counts.sum(1)
        n_genes = (counts > 0).sum(1)
        mito_counts = counts[:, mito].sum(1) if mito.any() else 0 * total
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = np.where(total > 0, 100.0 * mito_counts / np.maximum(total, 1e-12), 0.0)
    df = pd.DataFrame(
        {"total_counts": total.astype(float), "n_genes": n_genes.astype(int), "pct_mito": pct}
    )
    return df, mito


def _cells_per_gene(m) -> np.ndarray:
    """Number of cells with a positive value in each gene (column) of ``m`` (n, g).

    Returns
    -------
    (g,) int64. A sparse ``m`` is read by row blocks (``m > 0`` of all of it would copy
    its index array).
    """
    if not sp.issparse(m):
        return np.asarray((np.asarray(m) > 0).sum(0)).ravel()
    m = m.tocsr()
    out = np.zeros(m.shape[1], np.int64)
    for s in range(0, m.shape[0], ROW_BLOCK):
        b = m[s : s + ROW_BLOCK]
        out += np.bincount(b.indices[b.data > 0], minlength=m.shape[1])
    return out


def _release(adata: ad.AnnData) -> None:
    """Drop ``adata``'s matrices (``X``, layers), in place: a consumed input whose subset
    was copied (:func:`preprocess` with ``copy=False``) no longer holds a second copy."""
    adata.X = None
    for k in list(adata.layers):
        del adata.layers[k]


def make_gene_names_unique(adata: ad.AnnData, source: str = "") -> None:
    """Suffix repeated gene symbols ``-1``, ``-2``, ... like scanpy's ``var_names_make_unique``
    (in place, logged).

    10x ``features.tsv`` often names two Ensembl genes by one symbol. The first
    occurrence keeps the name, so a program gene matches it.
    """
    names = adata.var_names
    dup = names[names.duplicated()].unique()
    if not len(dup):
        return
    adata.var_names_make_unique()
    log.warning(
        "%s: %d gene names occur more than once (%d extra columns), e.g. %s; made unique "
        "like scanpy's var_names_make_unique (the repeats are NAME-1, NAME-2, ...; program "
        "genes match the first)",
        source,
        len(dup),
        int(names.duplicated().sum()),
        list(dup[:5]),
    )


def _check_settings(adata: ad.AnnData, p: PreprocessParams, src: str) -> None:
    """Settings that name input columns or optional code: checked before any work, so the
    message lists the input's own obs columns (not those preprocessing adds)."""
    cols = list(adata.obs.columns)
    keys = [("expression.label_key", p.label_key), ("expression.batch_key", p.batch_key)]
    if p.maturation in ("auto", "column"):
        keys.append(("expression.maturation_key", p.maturation_key))
    for name, key in keys:
        if key is not None and key not in adata.obs:
            raise ExpressionInputError(
                f"no obs column {key!r}; available: {cols}", field=name, source=src
            )
    if p.hvg_flavor not in HVG_FLAVORS:
        raise ExpressionInputError(
            f"unknown flavor {p.hvg_flavor!r}; valid: {', '.join(HVG_FLAVORS)}",
            field="expression.hvg_flavor",
            source=src,
        )
    if p.n_top_genes is not None and p.hvg_flavor in HVG_FLAVORS_ON_COUNTS:
        require_skmisc(p.hvg_flavor, field="expression.hvg_flavor", source=src)


def require_skmisc(flavor: str, *, field: str, source: str = "") -> None:
    """Raise :class:`ExpressionInputError` when ``flavor`` needs scikit-misc and it is absent."""
    try:
        import skmisc  # noqa: F401
    except ImportError:
        raise ExpressionInputError(
            f"hvg_flavor={flavor} needs the optional package scikit-misc (module skmisc; "
            "pip install scikit-misc), which is not installed; use hvg_flavor=seurat or "
            "cell_ranger, or n_top_genes=null (every gene highly variable)",
            field=field,
            source=source,
        ) from None


# ----------------------------------------------------------------------------
# highly variable genes
# ----------------------------------------------------------------------------


def seurat_hvg_sparse(x: sp.csr_matrix, n_top_genes: int, n_bins: int = 20) -> pd.DataFrame:
    """Scanpy's ``flavor="seurat"`` HVG selection of a log1p CSR matrix, by row blocks.

    The same steps and numbers as ``sc.pp.highly_variable_genes(flavor="seurat",
    n_top_genes=...)`` (one batch, natural-log ``log1p``): per gene, mean and unbiased
    variance of ``expm1(x)``; dispersion = variance / mean, log of both (``log1p`` of the
    mean); genes binned by mean into ``n_bins`` equal-width bins, each dispersion
    z-scored within its bin (a bin of one gene: 1); the ``n_top_genes`` highest normalised
    dispersions are highly variable. Scanpy copies the whole matrix twice for
    ``expm1`` (100k cells x 20k genes, 10 % non-zero: +3.2 GB); here one block of
    :data:`ROW_BLOCK` rows at a time is exponentiated and summed.

    Parameters
    ----------
    x
        (cells, genes) CSR, ``log1p`` (natural) of normalised counts, one stored value per
        entry; float32 as :func:`preprocess` passes it (equal to scanpy's to the bit; in
        float64, genes tied in normalised dispersion at the cut-off can be broken
        otherwise than scanpy breaks them).
    n_top_genes
        How many genes to flag (all genes when larger than the number of genes).
    n_bins
        Mean bins for the dispersion normalisation (scanpy's default, 20).

    Returns
    -------
    pandas.DataFrame
        One row per gene (in ``x``'s column order): ``highly_variable`` (bool),
        ``means`` (log1p of the mean), ``dispersions`` (log), ``dispersions_norm``
        (float32), as scanpy writes them to ``var``.
    """
    n, g = x.shape
    s1, s2 = np.zeros(g), np.zeros(g)
    for s in range(0, n, ROW_BLOCK):
        lo, hi = x.indptr[s], x.indptr[min(s + ROW_BLOCK, n)]  # the block's entries (views)
        v = np.expm1(x.data[lo:hi])  # the input's dtype; squared in it too, as scanpy's kernel
        s1 += np.bincount(x.indices[lo:hi], weights=v, minlength=g)
        s2 += np.bincount(x.indices[lo:hi], weights=v * v, minlength=g)
    mean = s1 / n
    var = s2 / n - mean**2
    if n != 1:
        var *= n / (n - 1)  # the unbiased estimator, as scanpy
    mean[mean == 0] = 1e-12
    disp = var / mean
    disp[disp == 0] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        disp = np.log(disp)
    df = pd.DataFrame({"means": np.log1p(mean), "dispersions": disp})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    one = stats["dev"].isnull()  # a bin holding one gene: its normalised dispersion is 1
    stats.loc[one, "dev"] = stats.loc[one, "avg"]
    stats.loc[one, "avg"] = 0
    stats = stats.loc[df["mean_bin"]].set_index(df.index)
    norm = ((df["dispersions"] - stats["avg"]) / stats["dev"]).to_numpy()
    ranked = np.sort(norm[~np.isnan(norm)])[::-1]
    k = min(int(n_top_genes), ranked.size)
    if k < n_top_genes:  # scanpy warns the same
        log.warning(
            "n_top_genes=%d but only %d genes have a normalised dispersion: all %d flagged",
            n_top_genes,
            ranked.size,
            k,
        )
    hv = np.nan_to_num(norm, nan=-np.inf) >= ranked[k - 1] if k else np.zeros(g, bool)
    return pd.DataFrame(
        {
            "highly_variable": hv,
            "means": df["means"].to_numpy(),
            "dispersions": df["dispersions"].to_numpy(),
            "dispersions_norm": norm.astype(np.float32),
        }
    )
