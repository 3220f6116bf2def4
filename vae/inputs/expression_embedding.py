"""The embedding and cell annotation steps of :func:`vae.inputs.expression.preprocess`: PCA
(with ``expression.batch_key``, of the HVG and genes of interest ComBat-corrected per
batch: :func:`_pca`, :func:`_batch_labels`, :func:`_combat_block`), the kNN graph, each
cell's label (a configured or found obs column, else Leiden clusters) and its maturation
(a column rescaled to [0, 1], or diffusion pseudotime from a root cell type), with the
fewest cells each step needs."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vae.inputs.expression_qc import PreprocessParams
from vae.inputs.expression_read import ExpressionInputError
from vae.inputs.schema import MATURATION_MODES

# the logger of vae.inputs.expression, where this code was moved from: log lines and
# their filters keep that name
log = logging.getLogger("vae.inputs.expression")


# obs columns searched, in order, when no label / maturation column is configured;
# "label" first: a column the user named so is meant as the labels
LABEL_CANDIDATES = (
    "label",
    "kind",
    "celltype",
    "cell_type",
    "bulk_labels",
    "paul_cluster",
    "louvain",
)
MATURATION_CANDIDATES = ("t", "maturation", "pseudotime", "dpt_pseudotime")
# an obs column of text or categories with this many distinct values looks like labels
# (named in the warning when no LABEL_CANDIDATES column is found)
LABEL_LIKE_VALUES = (2, 100)


# fewest cells each step runs on (measured with scanpy 1.11): PCA needs 2 (one
# component); UMAP's spectral start asks for 3 eigenvectors of the kNN graph, so 4;
# diffusion pseudotime needs diffmap with more than 2 components (n_cells - 2), so 5
MIN_CELLS_PCA = 2
MIN_CELLS_UMAP = 4
MIN_CELLS_DPT = 5


# ----------------------------------------------------------------------------
# PCA and batches
# ----------------------------------------------------------------------------


def _pca(adata: ad.AnnData, p: PreprocessParams, dense_x: bool, src: str) -> None:
    """``obsm["X_pca"]`` (n, n_pcs), ``varm["PCs"]`` (n_genes, n_pcs), ``uns["pca"]``.

    Dense ``X``: PCA of all genes (scaled first if ``p.scale``), as always. Sparse ``X``
    (``dense_x`` False): the same PCA on the CSR matrix, centred implicitly by scanpy /
    scikit-learn (no dense copy); with ``p.scale`` the HVG and genes-of-interest columns
    are made dense and scaled (scaling every gene would make all of ``X`` dense).
    """
    import scanpy as sc

    n_pcs = max(1, min(p.n_pcs, adata.n_obs - 1, adata.n_vars - 1))
    obs = pd.DataFrame(index=adata.obs_names)
    cols = None  # genes in the PCA: all
    if p.batch_key:
        cols = (adata.var["highly_variable"] | adata.var["gene_of_interest"]).to_numpy()
        emb = _combat_block(adata, cols, p.batch_key, src)
        n_pcs = max(1, min(n_pcs, int(cols.sum()) - 1))
    elif dense_x:
        emb = ad.AnnData(X=adata.X.copy(), obs=obs)
    elif not p.scale:
        emb = ad.AnnData(X=adata.X, obs=obs)  # sc.pp.pca leaves its input unchanged
    else:
        cols = (adata.var["highly_variable"] | adata.var["gene_of_interest"]).to_numpy()
        block = adata.X[:, cols].toarray()
        log.info(
            "%s: scale=true on sparse X: PCA of the %d HVG and genes of interest (%.2f GiB dense)",
            src,
            int(cols.sum()),
            block.nbytes / 2**30,
        )
        emb = ad.AnnData(X=block, obs=obs)
        n_pcs = max(1, min(n_pcs, int(cols.sum()) - 1))
    if p.scale:
        sc.pp.scale(emb, max_value=10)
    sc.pp.pca(emb, n_comps=n_pcs, random_state=p.seed)
    adata.obsm["X_pca"] = emb.obsm["X_pca"].astype(np.float32)
    # loadings and explained variance where scanpy keeps them (sc.pl.pca_variance_ratio,
    # sc.pl.pca_loadings work on expression.h5ad); emb has adata's genes in order
    pcs = np.asarray(emb.varm["PCs"], dtype=np.float32)
    if cols is not None:  # genes left out of the PCA load 0, as sc.pp.pca's mask_var
        full = np.zeros((adata.n_vars, pcs.shape[1]), np.float32)
        full[cols] = pcs
        pcs = full
    adata.varm["PCs"] = pcs
    adata.uns["pca"] = dict(emb.uns["pca"])


def _batch_labels(adata: ad.AnnData, key: str, src: str) -> np.ndarray:
    """(n,) str: each cell's batch from ``obs[key]`` (``expression.batch_key``), read as
    the VAE reads it (:func:`vae.inputs.schema.batch_text`: 7.0 and "7 " are batch "7").

    Raises
    ------
    ExpressionInputError
        A cell without a batch, or a batch of one cell (ComBat estimates a variance per
        batch; scanpy's per-batch HVG ranks genes within each), naming
        ``expression.batch_key`` and ``src``.
    """
    from vae.inputs.schema import batch_text

    # the VAE reads the same column through batch_text too (vae.data.batch_values): one
    # grouping of cells into batches for ComBat, the HVGs and the decoder's covariate
    values = batch_text(adata.obs[key].astype(object).to_numpy())
    known = np.array([v is not None for v in values], dtype=bool)
    if not known.all():
        first = str(adata.obs_names[~known][0])
        raise ExpressionInputError(
            f"obs[{key!r}] is empty for {int((~known).sum())} cells (first: {first!r}); "
            "give every cell its batch",
            field="expression.batch_key",
            source=src,
        )
    batches = values.astype(str)  # every value known here
    names, sizes = np.unique(batches, return_counts=True)
    if (sizes < 2).any():
        raise ExpressionInputError(
            f"obs[{key!r}]: batch {str(names[sizes < 2][0])!r} has one cell; ComBat needs two or "
            "more per batch (merge it into another or drop it)",
            field="expression.batch_key",
            source=src,
        )
    return batches


def _combat_block(adata: ad.AnnData, cols: np.ndarray, key: str, src: str) -> ad.AnnData:
    """The HVG and genes-of-interest columns of ``X`` (dense, float64), ComBat-corrected
    per batch of ``obs[key]`` (``sc.pp.combat``), for the PCA alone.

    Why: a run, patient or site shifts genes its own way, and a PCA of uncorrected values
    puts the batches apart, so the neighbour graph, the UMAP and the diffusion pseudotime
    that orders the cells follow the batch. ``X`` itself stays as measured (the VAE reads
    the batch through ``vae.batch_key`` instead). ComBat needs dense values: only these
    columns are made dense, as for ``scale`` on sparse ``X``. Records
    ``uns["batch_correction"]``.

    Raises
    ------
    ExpressionInputError
        See :func:`_batch_labels`.
    """
    import scanpy as sc

    batches = _batch_labels(adata, key, src)
    names, sizes = np.unique(batches, return_counts=True)
    x = adata.X[:, cols]
    block = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    emb = ad.AnnData(X=block, obs=pd.DataFrame({"batch": batches}, index=adata.obs_names))
    if len(names) > 1:
        # a gene constant within a batch has no variance there: scanpy's ComBat leaves it
        # NaN, which PCA cannot take; such genes keep their measured values
        before = emb.X.copy()
        sc.pp.combat(emb, key="batch")
        bad = ~np.isfinite(emb.X).all(0)
        if bad.any():
            emb.X[:, bad] = before[:, bad]
            log.warning(
                "%s: ComBat left %d of %d genes uncorrected (constant within a batch)",
                src,
                int(bad.sum()),
                bad.size,
            )
    log.info(
        "%s: PCA of %d HVG and genes of interest, ComBat-corrected over %d batches of obs[%r] (%s)",
        src,
        int(cols.sum()),
        len(names),
        key,
        ", ".join(f"{n} {c}" for n, c in zip(names, sizes)),
    )
    adata.uns["batch_correction"] = {
        "batch_key": str(key),
        "method": "combat",
        "used_for": "X_pca (neighbours, UMAP, diffusion pseudotime); X is uncorrected",
        "n_genes": int(cols.sum()),
        "batches": {str(n): int(c) for n, c in zip(names, sizes)},
    }
    return emb


# ----------------------------------------------------------------------------
# neighbours
# ----------------------------------------------------------------------------


def _neighbors(adata: ad.AnnData, p: PreprocessParams) -> None:
    """kNN graph on X_pca, built only when UMAP, DPT or clustering needs it.

    (The first call in a process JIT-compiles numba code: about 10 s.)
    """
    from vae.inputs.neighbors import knn_graph

    if "neighbors" not in adata.uns:
        # scanpy's own call stopped at >= 8192 cells (csr_array.getnnz): vae.inputs.neighbors
        knn_graph(adata, n_neighbors=p.n_neighbors, use_rep="X_pca", random_state=p.seed)


# ----------------------------------------------------------------------------
# labels and maturation
# ----------------------------------------------------------------------------


def label_strings(values) -> tuple[np.ndarray, int]:
    """Labels as text: missing values ``""`` (unlabelled), integral numbers without ``.0``.

    ``astype(str)`` would make NaN the class ``"nan"`` and the codes of a numeric column
    with gaps (read as float) ``"2.0"``.

    Returns
    -------
    (labels, n_missing)
        Object array of str, and how many values were missing (NaN / None).
    """
    out = np.empty(len(values), dtype=object)
    n_missing = 0
    for i, v in enumerate(np.asarray(values, dtype=object)):
        if pd.api.types.is_scalar(v) and pd.isna(v):  # NaN, None, pd.NA
            out[i] = ""
            n_missing += 1
        elif isinstance(v, float | np.floating) and float(v).is_integer():
            out[i] = str(int(v))
        else:
            out[i] = str(v)
    return out, n_missing


def label_like_columns(obs: pd.DataFrame, skip=()) -> list[tuple[str, int]]:
    """The obs columns that look like cell labels, with their number of distinct values.

    A column of text or categories (not numbers, not booleans) with
    :data:`LABEL_LIKE_VALUES` distinct non-missing values, some shared by several cells
    (a column of one value per cell names cells, not classes); ``skip``: columns that
    are something else (the batch column). In ``obs`` order.
    """
    lo, hi = LABEL_LIKE_VALUES
    out = []
    for c in obs.columns:
        col = obs[c]
        if str(c) in skip or pd.api.types.is_bool_dtype(col):
            continue
        v = col.dropna()
        if isinstance(col.dtype, pd.CategoricalDtype):
            n = int(v.nunique())
        elif pd.api.types.is_object_dtype(col) or pd.api.types.is_string_dtype(col):
            if v.map(lambda x: isinstance(x, bool | np.bool_)).all():
                continue  # an object column of flags
            n = int(v.astype(str).nunique())
        else:
            continue
        if lo <= n <= hi and n < len(v):
            out.append((str(c), n))
    return out


def _assign_label(adata: ad.AnnData, p: PreprocessParams, src: str) -> None:
    import scanpy as sc

    key, seed = p.label_key, p.seed

    if key is not None:
        if key not in adata.obs:
            raise ExpressionInputError(
                f"no obs column {key!r}; available: {list(adata.obs.columns)}",
                field="expression.label_key",
                source=src,
            )
    else:
        key = next((c for c in LABEL_CANDIDATES if c in adata.obs), None)
    if key is None:
        # read before Leiden adds its own column
        like = label_like_columns(adata.obs, skip={p.batch_key} if p.batch_key else ())
        _neighbors(adata, p)
        sc.tl.leiden(adata, random_state=seed, key_added="leiden", flavor="igraph", n_iterations=2)
        key = "leiden"
        adata.obs["label"] = "cluster_" + adata.obs["leiden"].astype(str)
        # a warning: labels are what stage=pair matches crops on and what evaluate scores,
        # and an annotation under another name (e.g. "annotation") was silently replaced
        n = int(adata.obs["leiden"].nunique())
        if like:
            shown = ", ".join(f"{c} ({k} values)" for c, k in like[:10])
            more = f", ... ({len(like)} in all)" if len(like) > 10 else ""
            log.warning(
                "%s: no label column (none of %s); labels are %d Leiden clusters "
                "(cluster_0, ...). obs columns that look like labels: %s%s. "
                "Set expression.label_key=%s (or another column) to use one",
                src or "expression input",
                ", ".join(LABEL_CANDIDATES),
                n,
                shown,
                more,
                like[0][0],
            )
        else:
            log.warning(
                "%s: no label column (none of %s, and no text or categorical obs column "
                "with %d..%d values); labels are %d Leiden clusters (cluster_0, ...). "
                "Set expression.label_key=COLUMN if a column holds the cell types",
                src or "expression input",
                ", ".join(LABEL_CANDIDATES),
                *LABEL_LIKE_VALUES,
                n,
            )
    else:
        labels, _ = label_strings(adata.obs[key])
        # NaN and "" alike: a cell whose label is empty text has none either
        n_missing = int(np.sum(labels == ""))
        if n_missing:
            log.warning(
                "%s: %d of %d cells have no label in obs column %r: they stay unlabelled "
                '(label "")',
                src,
                n_missing,
                adata.n_obs,
                key,
            )
        adata.obs["label"] = labels
    adata.uns["label_key"] = key


def _assign_maturation(adata: ad.AnnData, p: PreprocessParams, src: str) -> None:
    import scanpy as sc

    if p.maturation not in MATURATION_MODES:
        raise ExpressionInputError(
            f"unknown mode {p.maturation!r}; valid: {', '.join(MATURATION_MODES)}",
            field="expression.maturation",
            source=src,
        )
    found = next((c for c in MATURATION_CANDIDATES if c in adata.obs), None)
    adata.obs["maturation"] = np.float32(np.nan)
    source = "none"
    if p.maturation in ("auto", "column"):
        key = p.maturation_key
        if key is not None and key not in adata.obs:
            raise ExpressionInputError(
                f"no obs column {key!r}; available: {list(adata.obs.columns)}",
                field="expression.maturation_key",
                source=src,
            )
        key = key or found
        if key is not None:
            t = pd.to_numeric(adata.obs[key], errors="coerce").to_numpy(dtype=np.float64)
            ok = np.isfinite(t)
            lo, hi = (float(t[ok].min()), float(t[ok].max())) if ok.any() else (0.0, 1.0)
            if lo < 0 or hi > 1:
                # pairing bins maturation on [0, 1] (pair=by_maturation): a pseudotime of
                # 0-30 would fill the last bin only
                log.warning(
                    "%s: maturation column %r spans [%g, %g], not [0, 1]: rescaled min-max "
                    "to [0, 1]",
                    src,
                    key,
                    lo,
                    hi,
                )
                t = (t - lo) / (hi - lo) if hi > lo else np.where(ok, 0.0, np.nan)
            t[~ok] = np.nan
            adata.obs["maturation"] = t.astype(np.float32)
            source = f"column:{key}"
        elif p.maturation == "column":
            raise ExpressionInputError(
                f"no maturation column (tried {', '.join(MATURATION_CANDIDATES)})",
                field="expression.maturation_key",
                source=src,
            )
    if source == "none" and p.maturation in ("auto", "dpt"):
        if p.root_label is None:
            if p.maturation == "dpt":
                raise ExpressionInputError(
                    "maturation=dpt needs a root cell type",
                    field="expression.root_label",
                    source=src,
                )
            log.warning(
                "%s: no maturation column and no expression.root_label: maturation is NaN", src
            )
        else:
            labels = adata.obs["label"].astype(str)
            in_root = (labels.str.lower() == p.root_label.lower()).to_numpy()
            if not in_root.any():
                raise ExpressionInputError(
                    f"root label {p.root_label!r} not among labels {sorted(labels.unique())[:20]}",
                    field="expression.root_label",
                    source=src,
                )
            if adata.n_obs < MIN_CELLS_DPT:
                raise ExpressionInputError(
                    f"{adata.n_obs} cells: diffusion pseudotime needs at least "
                    f"{MIN_CELLS_DPT}; give a maturation column or set maturation=none",
                    field="expression.maturation",
                    source=src,
                )
            n_comps = max(2, min(15, adata.n_obs - 2))
            _neighbors(adata, p)
            sc.tl.diffmap(adata, n_comps=n_comps)
            dm = adata.obsm["X_diffmap"][:, 1:]
            # extremal root: the root-type cell farthest from the other cells' centroid
            centre = dm[~in_root].mean(0) if (~in_root).any() else dm.mean(0)
            d = np.linalg.norm(dm - centre, axis=1)
            d[~in_root] = -np.inf
            adata.uns["iroot"] = int(np.argmax(d))
            sc.tl.dpt(adata, n_dcs=n_comps)
            dpt = adata.obs["dpt_pseudotime"].to_numpy(dtype=float)
            dpt[~np.isfinite(dpt)] = np.nan
            adata.obs["maturation"] = dpt.astype(np.float32)
            source = f"dpt:root={p.root_label}"
    adata.uns["maturation_source"] = source
