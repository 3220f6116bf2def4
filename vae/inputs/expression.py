"""Single-cell expression: readers, validation and scanpy preprocessing.

Library code: plain typed arguments, no config objects (``pipeline.stage_expression``
maps the config onto :class:`PreprocessParams`).

Outputs follow ``docs/artifacts.md`` (section *expression*): ``X`` is
``log1p(normalize_total(counts, target_sum))`` as float32, the untouched raw
counts of the kept cells/genes sit in ``layers["counts"]`` when the input had
counts (``uns["has_counts"]``), labels in ``obs["label"]``, maturation in
``obs["maturation"]``, program scores in ``obs["score_<program>"]``.

Inputs without counts (``scanpy.datasets.pbmc68k_reduced()``: its ``.raw`` is
log-normalised) are kept as they are: no counts are invented, ``has_counts`` is
False and the VAE must use a Gaussian likelihood on ``X``.

The stage's own steps are here (:func:`read_expression`, :func:`preprocess`, the
figures, :func:`sanitize_for_h5ad`); the code they are built on sits in sibling modules,
whose public names (and the private ones other code and tests use) are re-exported from
this one: :mod:`vae.inputs.expression_read` (format detection and the readers of each
format), :mod:`vae.inputs.expression_qc` (validation, gene matching, settings, QC and
HVG), :mod:`vae.inputs.expression_embedding` (PCA and ComBat, neighbours, labels and
maturation), :mod:`vae.inputs.expression_blocks` (``stage=embed``'s block readers) and
:mod:`vae.inputs.expression_readsize` (the memory a whole read takes).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from segmentation.io import blank_as_read
from vae.inputs.expression_blocks import (  # noqa: F401 - re-exported
    EMBED_BLOCK_ROWS,
    READ_WHOLE_REASONS,
    STATS_VALUES,
    TABLE_BLOCK_VALUES,
    CsvRowBlocks,
    H5adRowBlocks,
    InMemoryFacts,
    ReadWhole,
    TenxH5RowBlocks,
    ValueStats,
    _table_stamp,
    row_blocks_unsupported,
    stored_values,
)
from vae.inputs.expression_embedding import (  # noqa: F401 - re-exported
    LABEL_CANDIDATES,
    LABEL_LIKE_VALUES,
    MATURATION_CANDIDATES,
    MIN_CELLS_DPT,
    MIN_CELLS_PCA,
    MIN_CELLS_UMAP,
    _assign_label,
    _assign_maturation,
    _batch_labels,
    _neighbors,
    _pca,
    label_like_columns,
    label_strings,
)
from vae.inputs.expression_qc import (  # noqa: F401 - re-exported
    DENSE_X_MAX_BYTES,
    HVG_FLAVORS,
    HVG_FLAVORS_ON_COUNTS,
    RAW_LIBRARY,
    ROW_BLOCK,
    GeneMatch,
    PreprocessParams,
    PreprocessResult,
    QCReport,
    _cells_per_gene,
    _check_settings,
    _qc_metrics,
    _release,
    counts_elsewhere,
    counts_from,
    make_gene_names_unique,
    match_genes,
    require_skmisc,
    seurat_hvg_sparse,
    validate_matrix,
)
from vae.inputs.expression_read import (  # noqa: F401 - re-exported
    BUILTIN_PBMC68K,
    SYMBOL_COLUMNS,
    TABLE_SUFFIXES,
    TENX_FILES,
    TENX_FOLDERS,
    ExpressionInputError,
    _orient_anndata,
    _read_table,
    _text_open,
    detect_format,
    detect_orientation,
    is_10x_folder,
    is_table,
    read_10x_folder,
    symbols_as_names,
    table_separator,
)
from vae.inputs.expression_readsize import (  # noqa: F401 - re-exported
    MTX_BYTES_PER_ENTRY,
    TABLE_BYTES_PER_VALUE,
    TABLE_SAMPLE_BYTES,
    ReadSize,
    whole_read_size,
)
from vae.inputs.schema import (  # noqa: F401 - the options, re-exported
    GRANULE_PROGRAMS,
    HAS_COUNTS,
    INPUT_FORMATS,
    MATURATION_MODES,
    ORIENTATIONS,
    VALUE_KINDS,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------


def read_expression(
    path: str | Path,
    *,
    fmt: str = "auto",
    orientation: str = "auto",
    known_genes: Iterable[str] | None = None,
) -> ad.AnnData:
    """Read an expression matrix into AnnData (cells x genes).

    Parameters
    ----------
    path
        ``.h5ad``; 10x ``.h5`` or matrix-market folder (``matrix.mtx[.gz]``,
        ``features.tsv[.gz]`` or ``genes.tsv``, ``barcodes.tsv[.gz]``, optionally with
        one prefix such as GEO's ``GSM123_``: :func:`read_10x_folder`); ``.csv``/``.tsv``
        (``.gz`` too) with a header row and an index column; ``.loom``; or
        ``"scanpy:pbmc68k_reduced"``. Repeated gene names are kept as written (also in a
        gzipped table) for :func:`make_gene_names_unique` to repair with a warning.
    fmt
        One of :data:`INPUT_FORMATS`.
    orientation
        ``cells_by_genes`` (rows are cells), ``genes_by_cells`` (transposed on reading),
        or ``auto``: for CSV/TSV decided by :func:`detect_orientation` and logged; an
        AnnData-like file is taken as cells x genes, and refused when its rows are plainly
        genes (program symbols on the rows only).
    known_genes
        Symbols for ``auto`` (default: the granule programs).

    Returns
    -------
    AnnData
        ``uns["source"]`` holds the path; for ``pbmc68k_reduced`` ``X`` is its
        log-normalised ``.raw`` (700 x 765) and ``uns["input_values"]="lognorm"``.
    """
    import scanpy as sc

    if fmt not in INPUT_FORMATS and fmt != "scanpy":
        raise ExpressionInputError(
            f"unknown format {fmt!r}; valid: {', '.join(INPUT_FORMATS)}",
            field="expression.input_format",
        )
    if orientation not in ORIENTATIONS:
        raise ExpressionInputError(
            f"unknown orientation {orientation!r}; valid: {', '.join(ORIENTATIONS)}",
            field="expression.orientation",
        )
    src = str(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "scanpy":
        if src != BUILTIN_PBMC68K:
            raise ExpressionInputError(
                f"only {BUILTIN_PBMC68K} is built in", field="expression.input_file"
            )
        full = sc.datasets.pbmc68k_reduced()
        # .raw holds log-normalised values of 765 genes; .X is scaled (negative values)
        adata = ad.AnnData(
            X=full.raw.X.copy(), obs=full.obs.copy(), var=pd.DataFrame(index=full.raw.var_names)
        )
        adata.uns["input_values"] = "lognorm"
        adata.uns["source"] = src
        return adata
    p = Path(path)
    if not p.exists():
        raise ExpressionInputError("no such file or folder", field="path", source=src)
    try:
        if fmt == "h5ad":
            # obs as stored: a user's NaN stays NaN (query.h5ad keeps the input's own
            # columns as given; a NaN label is counted as missing); var (the genes, once
            # oriented below) as the pipeline reads its own files (a NaN symbol "")
            adata = ad.read_h5ad(p)
        elif fmt == "10x_h5":
            adata = sc.read_10x_h5(p)
        elif fmt == "10x_mtx":
            adata = read_10x_folder(p)
        elif fmt == "loom":
            try:
                import loompy  # noqa: F401
            except ImportError as e:
                raise ExpressionInputError(
                    "reading .loom needs the optional package loompy (pip install loompy), "
                    "or convert the file to .h5ad",
                    field="expression.input_format",
                    source=src,
                ) from e
            adata = ad.read_loom(p, sparse=True)
        else:
            sep = table_separator(p, "," if fmt == "csv" else "\t")
            df = _read_table(p, sep)
            if df.shape[0] == 0:
                # a header with no row: pandas types its columns as text, which would be
                # reported as non-numeric; the real problem is that there is no data
                raise ExpressionInputError("no data rows (a header only)", field="rows", source=src)
            # pandas renames a repeated header ("Actb", "Actb.1"), which would hide the
            # repeat from every check after this reader: keep the names as written
            # (gzip-aware: plain open() read no header of a .csv.gz, so its repeats were
            # left as pandas' "Actb.1" and never reported)
            with _text_open(p) as fh:
                header = next(csv.reader(fh, delimiter=sep), [])[1:]
            if len(header) == df.shape[1] and len(set(header)) < len(header):
                df.columns = pd.Index(header)
            if orientation == "auto":
                genes = known_genes
                if genes is None:
                    genes = [g for gs in GRANULE_PROGRAMS.values() for g in gs]
                try:
                    orientation, why = detect_orientation(df.index, df.columns, genes)
                except ExpressionInputError as e:
                    raise ExpressionInputError(
                        str(e).split("] ", 1)[-1], field=e.field, source=src
                    ) from None
                log.info("%s: read as %s (expression.orientation=auto: %s)", src, orientation, why)
            if orientation == "genes_by_cells":
                df = df.T
            non_numeric = [
                c for c, t in zip(df.columns, df.dtypes) if not pd.api.types.is_numeric_dtype(t)
            ]
            if non_numeric:
                raise ExpressionInputError(
                    f"non-numeric columns {non_numeric[:5]} (is expression.orientation right?)",
                    field="X",
                    source=src,
                )
            adata = ad.AnnData(
                X=df.to_numpy(dtype=np.float32),
                obs=pd.DataFrame(index=df.index.astype(str)),
                var=pd.DataFrame(index=df.columns.astype(str)),
            )
    except ExpressionInputError:
        raise
    except Exception as e:  # noqa: BLE001 - name the file in every reader failure
        raise ExpressionInputError(
            f"could not read as {fmt}: {type(e).__name__}: {e}", field="path", source=src
        ) from e
    if fmt not in ("csv", "tsv"):
        adata = _orient_anndata(adata, orientation, known_genes, src)
        if fmt == "h5ad":
            # the genes' table only: with genes_by_cells the stored var is the cells (obs
            # now), kept as stored (a NaN sample was made "" before the transpose)
            blank_as_read(adata.var)
        symbols_as_names(adata, src)
    adata.uns["source"] = src
    return adata


# ----------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------


def preprocess(
    adata: ad.AnnData, params: PreprocessParams, *, source: str = "", copy: bool = True
) -> PreprocessResult:
    """QC-filter, normalise, log1p, flag HVGs, score programs, label and order cells.

    Steps, in order (each off when its threshold is 0/None):

    1. repeated gene symbols made unique (:func:`make_gene_names_unique`, a warning);
       validate (:func:`validate_matrix`);
    2. cell filters on the raw counts: ``min_genes``, ``min_counts``, ``max_pct_mito``
       (only when some gene starts with ``mito_prefix``); then gene filter ``min_cells``;
    3. ``layers["counts"]`` = kept counts, unchanged (same dtype and values);
    4. ``X`` = ``log1p(normalize_total(counts, target_sum))`` float32 (or the input's
       log-normalised values when there are no counts);
    5. highly variable genes (``n_top_genes``; genes of interest and program genes
       are flagged ``gene_of_interest`` and kept when ``subset_hvg``);
    6. program scores with ``sc.tl.score_genes`` into ``obs["score_<program>"]``;
    7. PCA (on scaled values if ``scale``; with ``batch_key`` on the HVG and genes of
       interest, ComBat-corrected per batch: :func:`_pca`), neighbours, optional UMAP
       (skipped with a warning below :data:`MIN_CELLS_UMAP` cells);
    8. ``obs["label"]`` (missing values -> ``""``, unlabelled) and ``obs["maturation"]``
       (column, min-max rescaled to [0, 1] when outside it, or diffusion pseudotime).

    ``X`` is dense unless the input is sparse and its dense form (n_cells x n_genes x 4
    bytes) would exceed ``params.dense_max_bytes``: then it stays CSR (same values) from
    the counts to the output, and PCA runs on it without densifying (implicit centring,
    the same components); with ``scale`` only the HVG and genes-of-interest columns are
    made dense and scaled for the PCA (``varm["PCs"]`` is 0 for the other genes).

    Parameters
    ----------
    adata
        Cells x genes input (see :func:`validate_matrix`).
    params
        Settings.
    source
        Named in messages (default ``uns["source"]``).
    copy
        False: ``adata`` is consumed (changed in place, its matrices dropped once a subset
        is copied), so a large input is not held twice; ``stage=expression`` passes False.

    Raises
    ------
    ExpressionInputError
        Bad input (see :func:`validate_matrix`), nothing left after filtering
        (``field`` names the filter), no program gene matched when
        ``require_program_match``, unknown ``label_key``/``maturation_key``/``root_label``
        or ``hvg_flavor`` (or a seurat_v3 flavor without scikit-misc), fewer cells than
        PCA (:data:`MIN_CELLS_PCA`) or diffusion pseudotime (:data:`MIN_CELLS_DPT`) need.
    """
    import scanpy as sc

    p = params
    src = source or str(adata.uns.get("source", ""))
    _check_settings(adata, p, src)
    if copy:
        adata = adata.copy()  # one copy: the caller's object stays as given
    if p.counts_layer:
        adata = counts_from(adata, p.counts_layer, src)
    make_gene_names_unique(adata, src)
    has_counts = validate_matrix(adata, values=p.values, source=src)
    if sp.issparse(adata.X):
        adata.X = adata.X.tocsr()
        # one stored value per cell and gene: log1p, the HVG sums and the QC counts all
        # work on stored values, so a value stored as two parts (a CSR another tool wrote
        # without summing its duplicates) became log1p(a) + log1p(b) (review, 2026-12-06)
        adata.X.sum_duplicates()
    if has_counts:
        if "counts" not in adata.layers:
            # the same matrix, not a copy: X is replaced by the normalised values below and
            # nothing changes either in place
            adata.layers["counts"] = adata.X
        # X is computed from the counts after QC; dropped now, a subset copies one matrix
        adata.X = None
    base = adata.layers["counts"] if has_counts else adata.X
    if sp.issparse(base) and base.format == "csr":
        base.sum_duplicates()  # a counts layer given beside X too (see above)
    # dense X (and PCA input) as always, unless a sparse input would be too large dense
    dense_x = not sp.issparse(base) or adata.n_obs * adata.n_vars * 4 <= p.dense_max_bytes
    if not dense_x:
        log.info(
            "%s: %d x %d sparse (%.1f %% non-zero): X stays sparse (CSR); dense it would be "
            "%.1f GiB",
            src,
            adata.n_obs,
            adata.n_vars,
            100.0 * base.nnz / max(1, adata.n_obs * adata.n_vars),
            adata.n_obs * adata.n_vars * 4 / 2**30,
        )

    # -- QC -----------------------------------------------------------------
    qc_df, mito = _qc_metrics(base, adata.var_names, p.mito_prefix)
    qc_df.index = adata.obs_names
    qc = QCReport(n_cells_in=adata.n_obs, n_genes_in=adata.n_vars, n_mito_genes=int(mito.sum()))
    keep = np.ones(adata.n_obs, bool)
    if p.min_genes > 0:
        drop = keep & (qc_df["n_genes"].to_numpy() < p.min_genes)
        qc.dropped_min_genes = int(drop.sum())
        keep &= ~drop
    if p.min_counts > 0:
        drop = keep & (qc_df["total_counts"].to_numpy() < p.min_counts)
        qc.dropped_min_counts = int(drop.sum())
        keep &= ~drop
    if p.max_pct_mito is not None:
        if mito.any():
            drop = keep & (qc_df["pct_mito"].to_numpy() > p.max_pct_mito)
            qc.dropped_mito = int(drop.sum())
            keep &= ~drop
        else:
            log.warning(
                "%s: no gene starts with %r (expression.mito_prefix); "
                "expression.max_pct_mito not applied",
                src,
                p.mito_prefix,
            )
    qc_df["kept"] = keep
    if not keep.any():
        raise ExpressionInputError(
            f"no cell left after QC (min_genes={p.min_genes}: -{qc.dropped_min_genes}, "
            f"min_counts={p.min_counts}: -{qc.dropped_min_counts}, max_pct_mito="
            f"{p.max_pct_mito}: -{qc.dropped_mito} of {qc.n_cells_in}); loosen the filters",
            field="expression.min_genes/min_counts/max_pct_mito",
            source=src,
        )
    if keep.sum() < MIN_CELLS_PCA:
        raise ExpressionInputError(
            f"{int(keep.sum())} cells left after QC (of {qc.n_cells_in} in the input); PCA "
            f"and every step after it need at least {MIN_CELLS_PCA} cells",
            field="X" if qc.n_cells_in < MIN_CELLS_PCA else "expression.min_genes/min_counts",
            source=src,
        )
    if not keep.all():  # no copy when every cell stays
        sub = adata[keep].copy()
        _release(adata)  # our copy, or the consumed input (copy=False)
        adata = sub
    base = adata.layers["counts"] if has_counts else adata.X
    if p.min_cells > 0:
        n_cells = _cells_per_gene(base)
        gkeep = n_cells >= p.min_cells
        qc.dropped_genes_min_cells = int((~gkeep).sum())
        if not gkeep.any():
            raise ExpressionInputError(
                f"no gene left after min_cells={p.min_cells} (of {adata.n_vars})",
                field="expression.min_cells",
                source=src,
            )
        if not gkeep.all():
            sub = adata[:, gkeep].copy()
            _release(adata)
            adata = sub
    # the unfiltered matrix: held by this name it outlived the gene filter's copy to the
    # end of the function (100k cells x 20k genes: 1.6 GB more at every later step)
    del base
    qc.n_cells_out, qc.n_genes_out = adata.n_obs, adata.n_vars
    if has_counts:
        totals = np.asarray(adata.layers["counts"].sum(1)).ravel()
        if (totals == 0).any():
            raise ExpressionInputError(
                f"{int((totals == 0).sum())} cells have zero counts after filtering; "
                "set expression.min_counts >= 1",
                field="expression.min_counts",
                source=src,
            )
    for col in ("total_counts", "n_genes", "pct_mito"):
        adata.obs[col] = qc_df.loc[adata.obs_names, col].to_numpy()

    # -- normalise ----------------------------------------------------------
    if has_counts and RAW_LIBRARY in adata.obs:
        # counts_layer=.raw: each cell by its total over every gene of .raw (its library)
        x = adata.layers["counts"]
        lib = adata.obs[RAW_LIBRARY].to_numpy(np.float64)[:, None]
        if dense_x:
            x = x.toarray() if sp.issparse(x) else np.asarray(x)
            adata.X = np.log1p(x / lib * p.target_sum).astype(np.float32)
        else:  # the same operations on the stored values (log1p(0) = 0)
            x = sp.csr_matrix(x, dtype=np.float64, copy=True)
            x.data = x.data / np.repeat(lib[:, 0], np.diff(x.indptr)) * p.target_sum
            np.log1p(x.data, out=x.data)
            adata.X = x.astype(np.float32)
    elif has_counts:
        x = adata.layers["counts"].astype(np.float32)  # a copy: counts stay as given
        tmp = ad.AnnData(X=x)
        sc.pp.normalize_total(tmp, target_sum=p.target_sum)
        sc.pp.log1p(tmp)
        adata.X = tmp.X
        del tmp, x
    else:
        adata.X = adata.X.astype(np.float32)
    if dense_x:
        adata.X = (adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)).astype(
            np.float32
        )
    else:
        adata.X = sp.csr_matrix(adata.X, dtype=np.float32, copy=False)
    adata.uns["log1p"] = {"base": None}

    # -- genes of interest and programs ------------------------------------
    missing: dict[str, list[str]] = {}
    programs: dict[str, list[str]] = {}
    for name, genes in p.programs.items():
        m = match_genes(adata.var_names, list(genes))
        programs[name] = m.genes
        if m.missing:
            missing[name] = m.missing
    goi = match_genes(adata.var_names, list(p.genes_of_interest))
    if goi.missing:
        missing["genes_of_interest"] = goi.missing
    if missing:
        # one line for every list (it was one per program, each repeating the file path:
        # four lines for Paul15, whose config expects them); stage=expression records
        # them as missing_genes in qc.json and uns
        lists = []
        for name, genes in missing.items():
            key = "genes_of_interest" if name == "genes_of_interest" else f"programs.{name}"
            lists.append(f"expression.{key} {len(genes)} ({', '.join(genes)})")
        log.warning("%s: genes not found (missing_genes): %s", src, "; ".join(lists))
    n_matched = sum(len(g) for g in programs.values())
    if p.programs and n_matched == 0:
        msg = (
            f"none of the {sum(len(g) for g in p.programs.values())} program genes "
            f"({', '.join(p.programs)}) is in the data ({adata.n_vars} genes, e.g. "
            f"{list(adata.var_names[:5])}); no program score can be computed"
        )
        if p.require_program_match:
            raise ExpressionInputError(
                msg + "; set programs for this data set or require_program_match=false",
                field="expression.programs",
                source=src,
            )
        log.warning("%s: %s", src, msg)
    if p.genes_of_interest and not goi.genes:
        log.warning(
            "%s: no gene of expression.genes_of_interest (%s) is in the data",
            src,
            ", ".join(p.genes_of_interest),
        )
    interest = set(goi.genes) | {g for gs in programs.values() for g in gs}
    adata.var["gene_of_interest"] = adata.var_names.isin(sorted(interest))

    # -- highly variable genes ---------------------------------------------
    if p.n_top_genes is None or p.n_top_genes >= adata.n_vars:
        adata.var["highly_variable"] = True
    else:
        on_counts = p.hvg_flavor in HVG_FLAVORS_ON_COUNTS
        kw = {"layer": "counts"} if on_counts else {}
        if on_counts and not has_counts:
            raise ExpressionInputError(
                f"hvg_flavor={p.hvg_flavor} needs counts; this input has none",
                field="expression.hvg_flavor",
                source=src,
            )
        tmp = None
        if p.batch_key:  # genes variable within batches, not genes that differ between them
            # scanpy's per-batch HVG needs a categorical column (an integer patient id
            # failed with "Can only use .cat accessor"): a temporary one, dropped after
            tmp = "_hvg_batch"
            while tmp in adata.obs:  # never a user's column
                tmp = f"_{tmp}"
            adata.obs[tmp] = pd.Categorical(_batch_labels(adata, p.batch_key, src))
            kw["batch_key"] = tmp
        try:
            if p.hvg_flavor == "seurat" and tmp is None and sp.issparse(adata.X):
                # scanpy would copy the whole CSR twice (expm1): the same selection by
                # row blocks (100k x 20k genes: peak 8.45 -> see docs/performance.md)
                hvg = seurat_hvg_sparse(adata.X, p.n_top_genes)
                adata.uns["hvg"] = {"flavor": "seurat"}
                for col in hvg.columns:
                    adata.var[col] = hvg[col].to_numpy()
            else:
                sc.pp.highly_variable_genes(
                    adata, n_top_genes=p.n_top_genes, flavor=p.hvg_flavor, **kw
                )
        finally:
            if tmp is not None:
                adata.obs.drop(columns=tmp, inplace=True)
    adata.var["highly_variable"] = adata.var["highly_variable"].astype(bool)

    # -- program scores (on all genes, before any HVG subsetting) ------------
    for name, genes in programs.items():
        col = f"score_{name}"
        if not genes:
            continue
        sc.tl.score_genes(
            adata,
            genes,
            ctrl_size=min(p.score_ctrl_size, max(1, adata.n_vars - len(genes))),
            n_bins=p.score_n_bins,
            score_name=col,
            random_state=p.seed,
            use_raw=False,
        )
        adata.obs[col] = adata.obs[col].astype(np.float32)
    if p.subset_hvg:
        adata = adata[:, adata.var["highly_variable"] | adata.var["gene_of_interest"]].copy()

    # -- embedding ----------------------------------------------------------
    _pca(adata, p, dense_x, src)
    if p.umap and adata.n_obs < MIN_CELLS_UMAP:
        log.warning(
            "%s: %d cells: UMAP needs at least %d; skipped (umap.png shows the PCA)",
            src,
            adata.n_obs,
            MIN_CELLS_UMAP,
        )
    elif p.umap:
        _neighbors(adata, p)
        sc.tl.umap(adata, random_state=p.seed)

    # -- labels and maturation ---------------------------------------------
    _assign_label(adata, p, src)
    _assign_maturation(adata, p, src)

    adata.uns[HAS_COUNTS] = bool(has_counts)
    adata.uns["programs"] = {k: np.array(v, dtype=str) for k, v in programs.items()}
    adata.uns["missing_genes"] = {k: np.array(v, dtype=str) for k, v in missing.items()}
    adata.uns["qc"] = {k: int(v) for k, v in vars(qc).items()}
    adata.uns["source"] = src
    if not has_counts:
        adata.layers.pop("counts", None)
    return PreprocessResult(adata=adata, qc=qc, programs=programs, missing=missing, qc_frame=qc_df)


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------


def plot_qc(qc_frame: pd.DataFrame, params: PreprocessParams, path: str | Path) -> None:
    """Histograms of total counts, detected genes and % mito with thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    specs = (
        ("total_counts", params.min_counts or None, "min_counts"),
        ("n_genes", params.min_genes or None, "min_genes"),
        ("pct_mito", params.max_pct_mito, "max_pct_mito"),
    )
    kept = qc_frame["kept"].to_numpy()
    for ax, (col, thr, name) in zip(axes, specs):
        v = qc_frame[col].to_numpy(dtype=float)
        bins = np.histogram_bin_edges(v, bins=40)
        ax.hist(v[kept], bins=bins, color="tab:blue", label=f"kept ({kept.sum()})")
        if (~kept).any():
            ax.hist(
                v[~kept], bins=bins, color="tab:red", alpha=0.7, label=f"dropped ({(~kept).sum()})"
            )
        if thr is not None:
            ax.axvline(thr, color="k", ls="--", lw=1, label=f"{name}={thr}")
        if col == "pct_mito" and not np.any(v > 0):
            ax.set_title(f"no counts in genes starting with {params.mito_prefix!r}", fontsize=8)
        unit = {
            "total_counts": "total_counts (counts per cell)",
            "n_genes": "n_genes (genes with a count)",
            "pct_mito": f"pct_mito (% of counts in {params.mito_prefix}* genes)",
        }
        ax.set_xlabel(unit[col])
        ax.set_ylabel("cells")
        ax.legend(fontsize=7)
    fig.suptitle("expression QC (before filtering)")
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def plot_embedding(adata: ad.AnnData, path: str | Path, *, max_panels: int = 8) -> None:
    """UMAP (or first two PCs) coloured by label, maturation and program scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    basis = "X_umap" if "X_umap" in adata.obsm else "X_pca"
    xy = np.asarray(adata.obsm[basis])[:, :2]
    if xy.shape[1] < 2:  # one principal component (2 cells or 2 genes): a line
        xy = np.column_stack([xy, np.zeros(len(xy))])
    cols = ["label", "maturation"] + [c for c in adata.obs.columns if c.startswith("score_")]
    cols = cols[:max_panels]
    n = len(cols)
    ncol = min(4, n)
    nrow = int(np.ceil(n / ncol))
    # constrained layout: it makes room for the label legend beside its panel, where
    # tight_layout squeezed every panel of that column
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(4 * ncol + 1.5, 3.6 * nrow), squeeze=False, layout="constrained"
    )
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axis = "UMAP" if basis == "X_umap" else "PC"
    for ax, col in zip(axes.ravel(), cols):
        if col == "label":
            from vae.analysis.palette import label_colours, label_markers, point_style

            # the colours, markers and order every later figure uses (maturation first)
            lab = adata.obs[col].astype(str).to_numpy()
            markers = label_markers(lab)
            for c, colour in label_colours(lab).items():
                sel = lab == c
                ax.scatter(
                    *xy[sel].T,
                    label=f"{c or 'unlabelled'} ({sel.sum()})",
                    **point_style(colour, markers[c], size=8),
                )
            # beside the axes: inside, a long legend covers the cells it names
            ax.legend(fontsize=8, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1))
        else:
            v = adata.obs[col].to_numpy(dtype=float)
            ok = np.isfinite(v)
            ax.scatter(*xy[~ok].T, s=3, color="lightgrey")
            if ok.any():
                sca = ax.scatter(*xy[ok].T, s=4, c=v[ok], cmap="viridis")
                cb = fig.colorbar(sca, ax=ax, shrink=0.8)
                # say what the colour is: a program score or the maturation
                name = f"{col[6:]} program score" if col.startswith("score_") else col
                cb.set_label(name, fontsize=8)
                cb.ax.tick_params(labelsize=8)
            else:  # an empty 0-1 colour bar would suggest values
                ax.text(0.5, 0.5, "no values", ha="center", transform=ax.transAxes, fontsize=8)
        ax.set_title(col, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{axis} 1", fontsize=8)
        ax.set_ylabel(f"{axis} 2", fontsize=8)
    fig.suptitle(f"{basis[2:].upper()} of {adata.n_obs} cells")
    # 110 dpi as the other figures: 8 pt legend text is 12 px
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def sanitize_for_h5ad(adata: ad.AnnData) -> None:
    """Make obs/var object columns writable (mixed types -> str), in place."""
    for df in (adata.obs, adata.var):
        for c in df.columns:
            if df[c].dtype == object:
                df[c] = df[c].astype(str)
