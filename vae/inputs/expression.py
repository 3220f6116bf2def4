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
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from segmentation.io import blank_as_read
from vae.inputs.schema import (  # noqa: F401 - the options, re-exported
    GRANULE_PROGRAMS,
    HAS_COUNTS,
    INPUT_FORMATS,
    MATURATION_MODES,
    ORIENTATIONS,
    VALUE_KINDS,
)

log = logging.getLogger(__name__)

BUILTIN_PBMC68K = "scanpy:pbmc68k_reduced"
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
# sc.pp.highly_variable_genes flavors; the seurat_v3 ones rank raw counts with
# scikit-misc's loess (module skmisc, an optional scanpy dependency)
HVG_FLAVORS = ("seurat", "cell_ranger", "seurat_v3", "seurat_v3_paper")
HVG_FLAVORS_ON_COUNTS = ("seurat_v3", "seurat_v3_paper")
# fewest cells each step runs on (measured with scanpy 1.11): PCA needs 2 (one
# component); UMAP's spectral start asks for 3 eigenvectors of the kNN graph, so 4;
# diffusion pseudotime needs diffmap with more than 2 components (n_cells - 2), so 5
MIN_CELLS_PCA = 2
MIN_CELLS_UMAP = 4
MIN_CELLS_DPT = 5
# a sparse input whose dense X (cells x genes x 4 bytes) would be larger stays sparse
# (CSR) through normalisation, HVG selection, scores, PCA and into expression.h5ad: 20k x
# 20k genes made dense took 6.5 GiB and a 1.9 GB file, 100k cells more than 17 GiB. Up to
# this size X is dense as it always was (e.g. 10k cells x 13k genes, Paul15 2660 x 240)
DENSE_X_MAX_BYTES = 512 * 2**20
# rows per block where a whole-matrix temporary (e.g. counts > 0) would copy every entry
ROW_BLOCK = 8192


class ExpressionInputError(ValueError):
    """Bad expression input or setting. ``field`` names the offending field.

    Parameters
    ----------
    message
        What is wrong and how to fix it.
    field
        Config key or data field at fault, e.g. ``"X"``, ``"var_names"``,
        ``"expression.label_key"``.
    source
        File (or data set name) the problem was found in.
    """

    def __init__(self, message: str, *, field: str, source: str = ""):
        self.field = field
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}[{field}] {message}")


# ----------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """Guess the reader from a file name (``auto`` input format)."""
    p = Path(path)
    name = p.name.lower()
    if str(path) == BUILTIN_PBMC68K:
        return "scanpy"
    if p.is_dir():
        return "10x_mtx"
    for suffix, fmt in (
        (".h5ad", "h5ad"),
        (".h5", "10x_h5"),
        (".loom", "loom"),
        (".csv", "csv"),
        (".csv.gz", "csv"),
        (".tsv", "tsv"),
        (".tsv.gz", "tsv"),
        (".txt", "tsv"),
        (".txt.gz", "tsv"),
    ):
        if name.endswith(suffix):
            return fmt
    raise ExpressionInputError(
        f"cannot tell the format of {p.name}; set expression.input_format to one of "
        f"{', '.join(INPUT_FORMATS[1:])}",
        field="expression.input_format",
        source=str(path),
    )


_BARCODE = re.compile(r"[ACGTN]{8,}(-\d+)?")


def table_separator(path: Path, default: str) -> str:
    """The column separator of a text table: the commonest of tab, comma and semicolon in
    its first line (spreadsheets export ``;`` where the decimal mark is a comma, and a
    tab-separated file is often named ``.csv``); ``default`` when none occurs."""
    try:
        with _text_open(path) as f:
            first = f.readline()
    except OSError:
        return default
    counts = {c: first.count(c) for c in ("\t", ",", ";")}
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        return default
    if best != default:
        log.info("%s: columns separated by %r (read from its first line)", path, best)
    return best


def _text_open(path: str | Path):
    """A text table opened for reading, gunzipped when its name ends ``.gz``."""
    import gzip

    # case-insensitive as detect_format and is_table: a "Q.CSV.GZ" opened as text gave
    # its compressed bytes as the header
    if str(path).lower().endswith(".gz"):
        return gzip.open(path, "rt", newline="", encoding="utf-8", errors="replace")
    return open(path, newline="", encoding="utf-8", errors="replace")


# a 10x matrix-market folder: <prefix>matrix.mtx[.gz], <prefix>features.tsv[.gz] (Cell
# Ranger v3+; v2: genes.tsv) and <prefix>barcodes.tsv[.gz]; GEO prefixes each file with
# its sample (GSM123_matrix.mtx.gz)
_MTX = re.compile(r"(?P<prefix>.*?)matrix\.mtx(\.gz)?")
TENX_FOLDERS = ("filtered_feature_bc_matrix", "raw_feature_bc_matrix")
TENX_FILES = "matrix.mtx[.gz], features.tsv[.gz] (v2: genes.tsv) and barcodes.tsv[.gz]"


def is_10x_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a 10x matrix (:func:`read_10x_folder`), or a
    Cell Ranger ``outs/`` folder (whose matrix sits in a sub-folder)."""
    p = Path(path)
    if not p.is_dir():
        return False
    names = [f.name for f in p.iterdir()]
    return any(_MTX.fullmatch(n) for n in names) or _cellranger_matrix(p) is not None


def _cellranger_matrix(folder: Path) -> Path | None:
    """The matrix a Cell Ranger run folder (``outs/`` or the folder above it) holds:
    ``filtered_feature_bc_matrix/`` (else ``raw_...``, else an ``.h5`` of them), or None."""
    for base in (folder, folder / "outs"):
        for name in TENX_FOLDERS:
            for cand in (base / name, base / f"{name}.h5"):
                if cand.exists():
                    return cand
    return None


def _tenx_file(folder: Path, prefix: str, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in (".gz", ""):
            f = folder / f"{prefix}{stem}.tsv{suffix}"
            if f.is_file():
                return f
    return None


def read_10x_folder(folder: str | Path) -> ad.AnnData:
    """A 10x matrix-market folder -> AnnData (cells x genes, gene symbols as ``var_names``
    as written: repeats are repaired later, as every input's are).

    Reads what ``scanpy.read_10x_mtx(var_names="gene_symbols", make_unique=False)``
    reads, and also an uncompressed v3 folder (``matrix.mtx``, ``features.tsv``) and
    files named with one common prefix (GEO: ``GSM123_matrix.mtx.gz``), which scanpy
    refuses. ``var["gene_ids"]`` holds the first column of the features; with a
    ``feature_types`` column only ``Gene Expression`` rows are kept (scanpy's gex_only).

    Raises
    ------
    ExpressionInputError
        No matrix, several, or a missing features / barcodes file; the message names
        the file names expected (and, for a Cell Ranger ``outs/`` folder, the sub-folder
        to give).
    """
    import scipy.io

    folder = Path(folder)
    src = str(folder)
    names = sorted(f.name for f in folder.iterdir())
    found = [m for m in (_MTX.fullmatch(n) for n in names) if m]
    if not found:
        where = _cellranger_matrix(folder)
        hint = (
            f"; this looks like a Cell Ranger output folder: give {where}"
            if where is not None
            else f" (found {names[:8]}{' ...' if len(names) > 8 else ''})"
        )
        raise ExpressionInputError(
            f"no 10x matrix in this folder: expected {TENX_FILES}, optionally all with one "
            f"prefix (GEO: GSM123_matrix.mtx.gz){hint}",
            field="expression.input_file",
            source=src,
        )
    if len(found) > 1:
        raise ExpressionInputError(
            f"{len(found)} matrices in one folder ({', '.join(m.group(0) for m in found)}): "
            "give a folder holding one sample's matrix, features and barcodes",
            field="expression.input_file",
            source=src,
        )
    prefix = found[0].group("prefix")
    features = _tenx_file(folder, prefix, ("features", "genes"))
    barcodes = _tenx_file(folder, prefix, ("barcodes",))
    for what, f in (
        ("features.tsv[.gz] (or genes.tsv)", features),
        ("barcodes.tsv[.gz]", barcodes),
    ):
        if f is None:
            raise ExpressionInputError(
                f"{found[0].group(0)} but no {prefix}{what}: a 10x folder holds {TENX_FILES}",
                field="expression.input_file",
                source=src,
            )
    m = scipy.io.mmread(str(folder / found[0].group(0)))
    x = sp.csr_matrix(m.T, dtype=np.float32)  # genes x cells on file; as scanpy reads it
    genes = pd.read_csv(features, header=None, sep="\t", dtype=str)
    bc = pd.read_csv(barcodes, header=None, sep="\t", dtype=str)
    if genes.shape[0] != x.shape[1] or bc.shape[0] != x.shape[0]:
        raise ExpressionInputError(
            f"matrix is {x.shape[1]} genes x {x.shape[0]} cells, but {features.name} lists "
            f"{genes.shape[0]} and {barcodes.name} {bc.shape[0]}",
            field="expression.input_file",
            source=src,
        )
    symbols = genes[1] if genes.shape[1] > 1 else genes[0]
    var = pd.DataFrame({"gene_ids": genes[0].to_numpy()}, index=pd.Index(symbols.to_numpy()))
    if genes.shape[1] > 2:
        var["feature_types"] = genes[2].to_numpy()
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=pd.Index(bc[0].to_numpy())), var=var)
    if "feature_types" in var:
        gex = (var["feature_types"] == "Gene Expression").to_numpy()
        if gex.any() and not gex.all():
            adata = adata[:, gex].copy()
    if prefix:
        log.info("%s: 10x files named with the prefix %r", src, prefix)
    return adata


def detect_orientation(
    rows: Iterable[str], columns: Iterable[str], known_genes: Iterable[str]
) -> tuple[str, str]:
    """Which axis of a CSV/TSV table holds the genes.

    Parameters
    ----------
    rows, columns
        Row (index) and column names of the table.
    known_genes
        Gene symbols expected in the data (the programs, genes of interest);
        matched case-insensitively.

    Returns
    -------
    (orientation, reason)
        ``cells_by_genes`` or ``genes_by_cells``, and why (for the log).

    Raises
    ------
    ExpressionInputError
        Neither the symbols nor cell-barcode-like names tell the axes apart.
    """
    rows, columns = [str(r) for r in rows], [str(c) for c in columns]
    known = {g.upper() for g in known_genes}
    rk = sum(r.upper() in known for r in rows)
    ck = sum(c.upper() in known for c in columns)
    counts = f"{rk} of {len(rows)} row names and {ck} of {len(columns)} column names"
    if rk != ck:
        orient = "genes_by_cells" if rk > ck else "cells_by_genes"
        return orient, f"{counts} are known gene symbols"
    rb = np.mean([bool(_BARCODE.fullmatch(r)) for r in rows]) if rows else 0.0
    cb = np.mean([bool(_BARCODE.fullmatch(c)) for c in columns]) if columns else 0.0
    if max(rb, cb) > 0.5 and rb != cb:
        orient = "cells_by_genes" if rb > cb else "genes_by_cells"
        return orient, f"{'row' if rb > cb else 'column'} names look like cell barcodes"
    raise ExpressionInputError(
        f"cannot tell whether rows or columns are genes ({counts} are known gene symbols, "
        f"and neither look like cell barcodes; table {len(rows)} x {len(columns)}). "
        f"Set expression.orientation=cells_by_genes or genes_by_cells",
        field="expression.orientation",
    )


def _read_table(path: Path, sep: str) -> pd.DataFrame:
    """A CSV/TSV table with its first column as the index, values read as float32.

    Read as float64 and then copied to float32, a table held 12 bytes a value at the
    peak (docs/performance.md, "Embedding large inputs"); the values are parsed as
    float32 directly (the same float32 numbers as the cast, tested on 17-digit
    values), the index column as pandas infers it. A table with a column that is not a number is read as
    before (float64, text kept), so its error names the columns as before.
    """
    with _text_open(path) as fh:
        n_cols = len(next(csv.reader(fh, delimiter=sep), []))
    try:
        return pd.read_csv(path, sep=sep, index_col=0, dtype=_table_dtypes(n_cols))
    except (ValueError, TypeError):  # text in a value column: the reading that names it
        return pd.read_csv(path, sep=sep, index_col=0)


def _table_dtypes(n_cols: int) -> dict:
    """``read_csv`` dtypes of a table of ``n_cols`` columns (row names first): the values
    float32, the row names as pandas infers them."""
    return {i: np.float32 for i in range(1, n_cols)}


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


# var columns that hold gene symbols in common AnnData exports (CELLxGENE: feature_name)
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "symbol")


def symbols_as_names(adata: ad.AnnData, src: str = "") -> None:
    """Gene symbols as ``var_names`` (in place) when the names are Ensembl ids and a symbol
    column exists (:data:`SYMBOL_COLUMNS`); the ids are kept in ``var["gene_ids"]``.

    Programs and genes of interest are symbols: with Ensembl ids as names none matched
    and the run stopped on ``expression.programs``.
    """
    names = adata.var_names.astype(str)
    if not len(names) or np.mean([n.upper().startswith("ENS") for n in names]) < 0.5:
        return
    col = next((c for c in SYMBOL_COLUMNS if c in adata.var), None)
    if col is None:
        return
    sym = adata.var[col].astype(str).to_numpy()
    ok = (sym != "") & (sym != "nan")
    adata.var["gene_ids"] = names.to_numpy()
    adata.var_names = np.where(ok, sym, names.to_numpy())
    log.info(
        "%s: var_names are Ensembl ids: gene symbols taken from var[%r] (%d of %d; the ids "
        "are in var['gene_ids'])",
        src,
        col,
        int(ok.sum()),
        len(names),
    )


def _orient_anndata(
    adata: ad.AnnData, orientation: str, known_genes: Iterable[str] | None, src: str
) -> ad.AnnData:
    """An AnnData read as given is cells x genes; ``genes_by_cells`` transposes it, and
    ``auto`` refuses one whose rows are plainly the genes (program symbols on the rows, none
    on the columns): it would run with the genes taken as cells."""
    if orientation == "genes_by_cells":
        log.info("%s: transposed (expression.orientation=genes_by_cells)", src)
        return adata.T.copy()
    if orientation == "cells_by_genes":
        return adata
    genes = known_genes
    if genes is None:
        genes = [g for gs in GRANULE_PROGRAMS.values() for g in gs]
    try:
        orient, why = detect_orientation(adata.obs_names, adata.var_names, genes)
    except ExpressionInputError:
        return adata  # no evidence either way: as AnnData stores it
    if orient == "genes_by_cells":
        raise ExpressionInputError(
            f"its rows (obs) look like genes and its columns (var) like cells ({why}); "
            "an AnnData is cells x genes: set expression.orientation=genes_by_cells to "
            "transpose it, or cells_by_genes to take it as it is",
            field="expression.orientation",
            source=src,
        )
    return adata


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
# preprocessing
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


def _neighbors(adata: ad.AnnData, p: PreprocessParams) -> None:
    """kNN graph on X_pca, built only when UMAP, DPT or clustering needs it.

    (The first call in a process JIT-compiles numba code: about 10 s.)
    """
    from vae.inputs.neighbors import knn_graph

    if "neighbors" not in adata.uns:
        # scanpy's own call stopped at >= 8192 cells (csr_array.getnnz): vae.inputs.neighbors
        knn_graph(adata, n_neighbors=p.n_neighbors, use_rep="X_pca", random_state=p.seed)


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


# ----------------------------------------------------------------------------
# stage=embed: an .h5ad read a block of rows at a time
# ----------------------------------------------------------------------------

# rows of an expression file read and embedded at a time by stage=embed: ~100 MB of CSR
# at 1.5k stored counts a cell, and the model's genes dense (8192 x 2000 x 8 B = 131 MB);
# a multiple of the encoder's batches (256) and the imputation's (512)
EMBED_BLOCK_ROWS = 8192
# stored values a whole-matrix test reads at a time (its temporaries: ~8 bytes a value)
STATS_VALUES = 1 << 22


@dataclass
class ValueStats:
    """What the whole-matrix tests of ``vae.api.Study`` read of one matrix's stored values
    (``.data`` of a sparse matrix, every value of a dense one), gathered a chunk at a time.

    A file embedded a block of rows at a time must take each decision (counts or
    log-normalised, which errors apply) as the whole file would: a block's own answer
    can differ from the file's (e.g. a block whose stored values happen to be whole).

    size : values seen; negative : values < 0; nonfinite : NaN or infinite values;
    top : their largest non-NaN value (NaN when there is none);
    whole : every value passes ``vae.study_prepare._is_counts`` (>= 0 and close to a whole
    number); exact : every value is finite, >= 0 and a whole number (this module's
    ``_is_counts``, before its dtype and size tests: :attr:`counts`); numeric : a numeric
    dtype.
    """

    size: int = 0
    negative: int = 0
    nonfinite: int = 0
    top: float = float("nan")
    whole: bool = True
    exact: bool = True
    numeric: bool = True

    def add(self, values) -> ValueStats:
        """Take in (k,) more stored values (any shape: flattened), in place; returns self."""
        from vae.study_prepare import _is_counts as close_to_counts

        v = np.asarray(values).reshape(-1)
        self.numeric &= bool(np.issubdtype(v.dtype, np.number))
        for s in range(0, v.size, STATS_VALUES):
            c = v[s : s + STATS_VALUES]
            self.size += int(c.size)
            self.negative += int((c < 0).sum())
            fin = np.isfinite(c) if np.issubdtype(c.dtype, np.number) else np.ones(c.size, bool)
            self.nonfinite += int((~fin).sum())
            real = c[~np.isnan(c)] if np.issubdtype(c.dtype, np.floating) else c
            if real.size:
                t = float(real.max())
                self.top = t if np.isnan(self.top) else max(self.top, t)
            self.whole = self.whole and close_to_counts(c)
            self.exact = self.exact and _is_counts(c)
        return self

    @property
    def counts(self) -> bool:
        """This module's :func:`_is_counts` of the whole matrix."""
        return self.numeric and self.size > 0 and self.exact


def stored_values(m, cols: np.ndarray | None = None) -> np.ndarray:
    """Stored values of ``m`` (or of ``m[:, cols]``, a column as often as ``cols`` names it)."""
    if cols is not None:
        m = m[:, np.asarray(cols, np.int64)]
    return _values(m)


class InMemoryFacts:
    """:class:`ValueStats` of an AnnData in memory: the whole input of ``Study.embed``.

    Keys: ``X``, ``.raw`` (``raw.X``) or a layer's name (``counts`` included).
    """

    def __init__(self, adata: ad.AnnData):
        self.adata = adata
        self._stats: dict = {}  # a matrix is scanned once however often a test asks

    def matrix(self, key: str):
        if key == "X":
            return self.adata.X
        if key == ".raw":
            return self.adata.raw.X
        return self.adata.layers[key]

    def stats(self, key: str, cols: np.ndarray | None = None) -> ValueStats:
        """The stats of matrix ``key`` (of its columns ``cols`` when given)."""
        memo = (key, None if cols is None else np.asarray(cols).tobytes())
        if memo not in self._stats:
            self._stats[memo] = ValueStats().add(stored_values(self.matrix(key), cols))
        return self._stats[memo]


def _matrix_kind(node) -> str | None:
    """``csr``, ``dense`` (a 2-D dataset) or None (a layout not read by rows: CSC...)."""
    import h5py

    if isinstance(node, h5py.Dataset):
        return "dense" if node.ndim == 2 else None
    enc = node.attrs.get("encoding-type", "")
    enc = enc.decode() if isinstance(enc, bytes) else str(enc)
    return "csr" if enc == "csr_matrix" else None


def row_blocks_unsupported(path: str | Path, orientation: str = "auto") -> str | None:
    """Why the ``.h5ad``, 10x ``.h5`` or CSV / TSV table at ``path`` cannot be embedded a
    block of rows at a time (:class:`H5adRowBlocks`, :class:`TenxH5RowBlocks`,
    :class:`CsvRowBlocks`), or None when it can.

    Read in memory instead (``read_expression``): other formats (a 10x matrix folder,
    ``.loom``), a file to be transposed (``genes_by_cells``; a table found to hold genes
    as rows by :class:`CsvRowBlocks`), a matrix that is not CSR or dense (CSC: its rows are not
    contiguous), images in ``obsm["crops"]`` (a paired table: ``embed.h5ad``), a
    Cell Ranger 2 ``.h5`` (one group per genome), obs / var in the layout of anndata
    before 0.7 (compound datasets).
    """
    import h5py

    p = Path(path)
    name = p.name.lower()
    if not p.is_file() or not name.endswith((".h5ad", ".h5", *TABLE_SUFFIXES)):
        return "not an .h5ad, 10x .h5 or CSV / TSV file"
    if orientation == "genes_by_cells":
        return "transposed on reading (expression.orientation=genes_by_cells)"
    if is_table(p):
        return None  # CsvRowBlocks says ReadWhole where its first pass finds otherwise
    try:
        with h5py.File(p, "r") as f:
            if name.endswith(".h5"):
                m = f.get("matrix")
                need = ("data", "indices", "indptr", "shape", "barcodes", "features")
                if m is None or not all(k in m for k in need):
                    return "a 10x .h5 without /matrix (Cell Ranger 2: read whole)"
                return None
            if "X" not in f or "obs" not in f or "var" not in f:
                return "no X, obs or var"
            for part in ("obs", "var"):
                # anndata < 0.7 wrote obs / var as compound datasets without an encoding:
                # anndata itself still reads them, the block reader's obs / var do not
                node = f[part]
                if isinstance(node, h5py.Dataset) or "encoding-type" not in node.attrs:
                    return f"{part} in an old anndata layout (no encoding-type)"
            nodes = {"X": f["X"], **{f"layers/{k}": v for k, v in f.get("layers", {}).items()}}
            if "raw" in f and "X" in f["raw"]:
                nodes["raw/X"] = f["raw/X"]
            for name, node in nodes.items():
                if _matrix_kind(node) is None:
                    return f"{name} is stored neither as CSR nor dense"
            if "obsm" in f and "crops" in f["obsm"]:
                return "it holds crops (obsm['crops'])"
    except Exception as e:  # noqa: BLE001 - read_expression then names the fault
        return f"unreadable by h5py ({type(e).__name__})"
    return None


class H5adRowBlocks:
    """An ``.h5ad`` expression file as AnnData blocks of rows, for ``stage=embed``.

    What :func:`read_expression` (and ``counts_from`` for ``counts_layer``) gives, a
    block of ``rows`` cells at a time: ``obs`` rows (every obs column), ``X``, every
    layer and ``.raw`` as CSR (or dense) rows over *all* genes, so a cell's library is
    summed over every gene as before; ``var`` after :func:`symbols_as_names`. Only
    ``obs`` and ``var`` are held whole. :meth:`stats` scans one matrix of the file a
    chunk at a time for the whole-file decisions (:class:`ValueStats`).

    Parameters
    ----------
    path : an ``.h5ad`` that :func:`row_blocks_unsupported` accepts
    orientation : ``auto`` or ``cells_by_genes`` (as :func:`read_expression`)
    known_genes : gene symbols for ``orientation="auto"``
    counts_layer : as ``counts_from``: a layer's name or ``".raw"``, copied to
        ``layers["counts"]`` in each block
    rows : rows a block (default :data:`EMBED_BLOCK_ROWS`)
    """

    def __init__(
        self,
        path: str | Path,
        *,
        orientation: str = "auto",
        known_genes: Iterable[str] | None = None,
        counts_layer: str | None = None,
        rows: int | None = None,
    ):
        if orientation not in ORIENTATIONS:
            raise ExpressionInputError(
                f"unknown orientation {orientation!r}; valid: {', '.join(ORIENTATIONS)}",
                field="expression.orientation",
            )
        self.path, src = Path(path), str(path)
        self.rows = int(rows or EMBED_BLOCK_ROWS)
        self.raw_var, self.layers = None, []
        try:
            meta = self._read_meta()
        except Exception as e:  # noqa: BLE001 - name the file in every reader failure
            raise ExpressionInputError(
                f"could not read as {self.FORMAT}: {type(e).__name__}: {e}",
                field="path",
                source=src,
            ) from e
        self.shape = meta.shape
        # the names and the checks read_expression applies to the whole file, once
        meta = _orient_anndata(meta, orientation, known_genes, src)
        if self.FORMAT == "h5ad":  # the genes' table, after orienting, as read_expression
            blank_as_read(meta.var)
        symbols_as_names(meta, src)
        self.obs, self.var = meta.obs, meta.var
        self.counts_layer = counts_layer or None
        if self.counts_layer == ".raw":
            if self.raw_var is None:
                raise ExpressionInputError(
                    "the file has no .raw", field="expression.counts_layer", source=src
                )
            # raw[:, var_names] of counts_from: raw's column of each of X's genes
            self.raw_cols = self.raw_var.index.get_indexer(self.var.index)
            if (self.raw_cols < 0).any():
                missing = list(self.var.index[self.raw_cols < 0][:5])
                raise ExpressionInputError(
                    f".raw lacks {int((self.raw_cols < 0).sum())} of X's genes (e.g. {missing})",
                    field="expression.counts_layer",
                    source=src,
                )
            log.info(
                "%s: counts from .raw (expression.counts_layer): X's %d genes, each cell "
                "normalised by its total over all %d genes of .raw",
                src,
                self.shape[1],
                len(self.raw_var),
            )
        elif self.counts_layer is not None:
            if self.counts_layer not in self.layers:
                raise ExpressionInputError(
                    f"no layer {self.counts_layer!r}; layers: {self.layers or 'none'}"
                    + ("; .raw" if self.raw_var is not None else ""),
                    field="expression.counts_layer",
                    source=src,
                )
            log.info("%s: counts from %s (expression.counts_layer)", src, self.counts_layer)
        self._stats: dict = {}
        self.plans: dict = {}  # vae.api.Study's reading plan of this file, by source

    FORMAT = "h5ad"

    def _read_meta(self) -> ad.AnnData:
        """The file's obs and var (no matrix) as :func:`read_expression` reads them; sets
        :attr:`raw_var` and :attr:`layers`."""
        import h5py
        from anndata.io import read_elem

        with h5py.File(self.path, "r") as f:
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
            self.raw_var = read_elem(f["raw/var"]) if "raw" in f else None
            self.layers = list(f["layers"].keys()) if "layers" in f else []
        # as stored: __init__ reads var (the genes) as read_expression does, once oriented
        return ad.AnnData(obs=obs, var=var)

    def _x_rows(self, f, s: int, e: int):
        """Rows ``s:e`` of ``X`` (all genes)."""
        return self._rows(f["X"], s, e)

    def _n_cols(self, node) -> int:
        return _h5_shape(node)[1]

    @property
    def n_obs(self) -> int:
        return self.shape[0]

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index

    def _node(self, f, key: str):
        if key == "X":
            return f["X"]
        if key == ".raw":
            return f["raw/X"]
        if key == "counts" and self.counts_layer is not None:
            return self._node(f, self.counts_layer)
        return f[f"layers/{key}"]

    @staticmethod
    def _rows(node, s: int, e: int):
        from anndata.io import sparse_dataset

        return node[s:e] if _matrix_kind(node) == "dense" else sparse_dataset(node)[s:e]

    def __iter__(self):
        """AnnData blocks of :attr:`rows` cells (one empty block for a file of no cell)."""
        import h5py

        n = self.n_obs
        with h5py.File(self.path, "r") as f:
            for s in range(0, max(n, 1), self.rows):
                e = min(n, s + self.rows)
                obs = self.obs.iloc[s:e]
                a = ad.AnnData(X=self._x_rows(f, s, e), obs=obs, var=self.var)
                for k in self.layers:
                    a.layers[k] = self._rows(f[f"layers/{k}"], s, e)
                if self.raw_var is not None:
                    a.raw = ad.AnnData(X=self._rows(f["raw/X"], s, e), obs=obs, var=self.raw_var)
                if self.counts_layer == ".raw":
                    # as counts_from: X's genes of .raw, the library over all its genes
                    a.layers["counts"] = a.raw.X[:, self.raw_cols].copy()
                    a.obs[RAW_LIBRARY] = np.asarray(a.raw.X.sum(1), np.float64).ravel()
                elif self.counts_layer is not None:
                    a.layers["counts"] = a.layers[self.counts_layer].copy()
                a.uns["source"] = str(self.path)
                yield a

    def stats(self, key: str, cols: np.ndarray | None = None) -> ValueStats:
        """:class:`ValueStats` of matrix ``key`` of the whole file (``X``, ``.raw``, a
        layer; ``counts`` is ``layers["counts"]`` as the blocks hold it), of its columns
        ``cols`` when given (a column as often as ``cols`` names it), read a chunk at a
        time."""
        import h5py

        if key == "counts" and self.counts_layer == ".raw":
            sel = self.raw_cols if cols is None else self.raw_cols[np.asarray(cols, np.int64)]
            return self.stats(".raw", sel)
        memo = (key, None if cols is None else np.asarray(cols).tobytes())
        if memo in self._stats:
            return self._stats[memo]
        out = ValueStats()
        with h5py.File(self.path, "r") as f:
            node = self._node(f, key)
            if _matrix_kind(node) == "dense":
                step = max(1, STATS_VALUES // max(1, node.shape[1]))
                for s in range(0, node.shape[0], step):
                    out.add(stored_values(node[s : s + step], cols))
            else:
                data = node["data"]
                many = None
                if cols is not None:  # how often each column is named
                    many = np.bincount(np.asarray(cols, np.int64), minlength=self._n_cols(node))
                if data.shape[0] == 0:
                    out.add(np.zeros(0, data.dtype))
                for s in range(0, data.shape[0], STATS_VALUES):
                    v = data[s : s + STATS_VALUES]
                    if many is not None:
                        v = np.repeat(v, many[node["indices"][s : s + STATS_VALUES]])
                    out.add(v)
        self._stats[memo] = out
        return out


class TenxH5RowBlocks(H5adRowBlocks):
    """A Cell Ranger (v3, ``/matrix``) 10x ``.h5`` as AnnData blocks of rows.

    What ``scanpy.read_10x_h5`` (its Gene Expression features; counts as float32 where
    stored as int32) then :func:`read_expression` give, a block of cells at a time: the
    file's CSC matrix of genes x cells is a CSR of cells x genes, read a slice of
    ``indptr`` at a time. No layer, no ``.raw``. Parameters as :class:`H5adRowBlocks`.
    """

    FORMAT = "10x_h5"

    def _read_meta(self) -> ad.AnnData:
        import h5py

        def collect(out: dict, group) -> None:  # scanpy's _collect_datasets, matrix aside
            for k, v in group.items():
                if isinstance(v, h5py.Dataset):
                    if k not in ("data", "indices", "indptr"):
                        out[k] = v[()]
                else:
                    collect(out, v)

        d: dict = {}
        with h5py.File(self.path, "r") as f:
            m = f["matrix"]
            collect(d, m)
            self.int32 = m["data"].dtype == np.dtype("int32")
            extra = [
                k
                for k, v in m["features"].items()
                if isinstance(v, h5py.Dataset)
                and k not in ("name", "feature_type", "id", "gene_id", "_all_tag_keys")
            ]
            kinds = {k: m["features"][k].dtype.kind for k in extra}
        n_cols, n_rows = (int(x) for x in d["shape"])  # transposed
        obs = {"obs_names": d["barcodes"].astype(str)}
        var = {"var_names": d["name"].astype(str)}
        if "gene_id" not in d:
            var["gene_ids"] = d["id"].astype(str)
        else:
            var.update(gene_ids=d["gene_id"].astype(str), probe_ids=d["id"].astype(str))
        var["feature_types"] = d["feature_type"].astype(str)
        if "filtered_barcodes" in d:
            obs["filtered_barcodes"] = d["filtered_barcodes"].astype(bool)
        var.update((k, d[k].astype(bool if kinds[k] == "b" else str)) for k in extra)
        self.n_features = n_cols
        # an empty matrix of the file's shape: the obs and var scanpy's AnnData builds
        empty = sp.csr_matrix((n_rows, n_cols), dtype=np.float32)
        meta = ad.AnnData(empty, obs=obs, var=var)
        keep = meta.var["feature_types"].to_numpy() == "Gene Expression"  # gex_only
        self.gex = None if keep.all() else np.flatnonzero(keep)
        meta = meta[:, keep].copy() if self.gex is not None else meta
        meta.X = None
        return meta

    def _x_rows(self, f, s: int, e: int):
        m = f["matrix"]
        ptr = m["indptr"][s : e + 1].astype(np.int64)
        a, b = int(ptr[0]), int(ptr[-1])
        data = m["data"][a:b]
        if self.int32:  # as scanpy: int32 counts read as float32
            data = data.astype(np.float32)
        x = sp.csr_matrix((data, m["indices"][a:b], ptr - a), shape=(e - s, self.n_features))
        return x if self.gex is None else x[:, self.gex]

    def _node(self, f, key: str):
        return f["matrix"]  # its only matrix (X); a layer or .raw key was refused

    def _n_cols(self, node) -> int:
        return self.n_features

    def stats(self, key: str, cols: np.ndarray | None = None) -> ValueStats:
        if self.gex is not None:  # the Gene Expression columns of the file's features
            cols = self.gex if cols is None else self.gex[np.asarray(cols, np.int64)]
        return super().stats(key, cols)


TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")
# values a block of a text table holds at most (float32: 128 MiB; pandas parses a block
# at ~13 bytes a value, scripts/bench_whole_read.py): a table of 20k genes is read 1536
# rows at a time, one of 2000 genes 8192 (EMBED_BLOCK_ROWS)
TABLE_BLOCK_VALUES = 1 << 25


def is_table(path: str | Path) -> bool:
    """Whether ``path`` names a CSV / TSV expression table (:func:`detect_format`)."""
    return str(path).lower().endswith(TABLE_SUFFIXES)


# why a file is read whole rather than a block of rows at a time (ReadWhole.reason):
# the advice of vae.api.Study.check_whole_read_fits differs for each
READ_WHOLE_REASONS = (
    "layout",  # not a block-readable format or layout (10x folder, CSC .h5ad, ...)
    "genes_as_rows",  # a table of genes as rows, found from its names or set so
    "text_value",  # a table value that is not a number
    "unparsed",  # a table row pandas cannot parse (too many fields, not UTF-8)
    "mixed_ids",  # a table's row names read as numbers in one block, text in another
    "no_rows",  # a table without a data row
    "counts_layer",  # expression.counts_layer asked of a table (it has no layer)
)


class ReadWhole(Exception):
    """A file a block reader cannot read by rows after all (read whole instead).

    Parameters
    ----------
    message : str
        Why, for the log (and the refusal of a whole read too large for the memory).
    reason : str
        One of :data:`READ_WHOLE_REASONS`.
    orientation : str
        The table's orientation where it was found (``cells_by_genes`` or
        ``genes_by_cells``), else ``auto``: a refusal counts the cells on that axis.
    """

    def __init__(self, message: str, *, reason: str = "layout", orientation: str = "auto"):
        super().__init__(message)
        self.reason, self.orientation = reason, orientation


def _table_stamp(path: Path) -> tuple[int, int]:
    """(size, modification time in ns) of a table: the same for the same file."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class CsvRowBlocks:
    """A CSV / TSV expression table (``.gz`` too) with cells as rows, as AnnData blocks
    of rows, for ``stage=embed``: what :func:`read_expression` reads of it (float32
    values, row names as pandas infers them, repeated gene names as written), a block
    at a time.

    The table is parsed twice, a block at a time (``pandas.read_csv(chunksize=...)``):
    once here for the row names and each column's :class:`ValueStats` (the whole-file
    decisions of ``vae.api.Study``), then once more as the blocks are embedded. Only
    the row names and those per-column figures are held whole.

    Parameters
    ----------
    path : a table (:func:`is_table`)
    orientation : ``auto`` (decided from the names as :func:`read_expression` does) or
        ``cells_by_genes``
    known_genes : gene symbols for ``orientation="auto"``
    rows : rows a block (default: :data:`EMBED_BLOCK_ROWS`, fewer for a wide table so
        that a block holds at most :data:`TABLE_BLOCK_VALUES` values, a multiple of 256)

    Raises
    ------
    ReadWhole
        The table is read whole instead (its ``reason``, :data:`READ_WHOLE_REASONS`):
        genes as rows, a value that is not a number or a row pandas cannot parse, no
        data row (:func:`read_expression` then says what is wrong, as before), row names
        typed otherwise in different blocks (numbers in one, text in another).
    ExpressionInputError
        The orientation cannot be told (as :func:`read_expression`); the file cannot be
        read at all (a ``.gz`` cut short or not gzipped; field ``path``). On iterating:
        the table changed since this first pass (field ``path``).
    """

    FORMAT = "csv"

    def __init__(
        self,
        path: str | Path,
        *,
        orientation: str = "auto",
        known_genes: Iterable[str] | None = None,
        rows: int | None = None,
    ):
        if orientation not in ("auto", "cells_by_genes"):
            raise ReadWhole(
                f"expression.orientation={orientation}",
                reason="genes_as_rows" if orientation == "genes_by_cells" else "layout",
                orientation=orientation,
            )
        self.path, src = Path(path), str(path)
        fmt = detect_format(self.path)
        if known_genes is None:
            known_genes = [g for gs in GRANULE_PROGRAMS.values() for g in gs]
        self.sep = table_separator(self.path, "," if fmt == "csv" else "\t")
        self.rows = int(rows or EMBED_BLOCK_ROWS)  # set from the header's width below
        names, columns, kinds, header = [], None, set(), []
        neg = nonfinite = whole = exact = top = None
        try:
            # the file as this first pass reads it: the blocks are read in a second pass,
            # and a table rewritten in between gave more rows (uncaught) or fewer (cells
            # dropped)
            self._stamp = _table_stamp(self.path)
            with _text_open(self.path) as fh:
                header = next(csv.reader(fh, delimiter=self.sep), [])
            n_genes = max(0, len(header) - 1)
            wide = max(256, TABLE_BLOCK_VALUES // max(1, n_genes) // 256 * 256)
            self.rows = int(rows or min(EMBED_BLOCK_ROWS, wide))
            self._dtypes = _table_dtypes(len(header))
            for df in self._chunks():
                if columns is None:
                    columns = df.columns
                    g = df.shape[1]
                    neg, nonfinite = np.zeros(g, np.int64), np.zeros(g, np.int64)
                    whole, exact = np.ones(g, bool), np.ones(g, bool)
                    top = np.full(g, np.nan)
                names.append(df.index.to_numpy())
                kinds.add(df.index.dtype)
                v = df.to_numpy(dtype=np.float32)
                # per column, so that any set of columns' ValueStats is known (a whole
                # matrix's tests are value by value: vae.study_prepare._is_counts, _is_counts)
                neg += (v < 0).sum(0)
                fin = np.isfinite(v)
                nonfinite += (~fin).sum(0)
                with np.errstate(invalid="ignore"):
                    top = np.fmax(top, np.fmax.reduce(v, axis=0, initial=np.nan))
                    r = np.round(v)
                    whole &= ((v >= 0) & np.isclose(v, r)).all(0)
                    exact &= (fin & (v >= 0) & (v == r)).all(0)
        except (OSError, EOFError, csv.Error) as e:
            # a damaged file (a .gz cut short: EOFError; plain text named .gz: BadGzipFile,
            # an OSError): read whole it fails the same way, so it is named here
            raise ExpressionInputError(
                f"could not read as {fmt}: {type(e).__name__}: {e}", field="path", source=src
            ) from e
        except (ValueError, TypeError) as e:  # read_expression names the fault, read whole
            seen = sum(len(n) for n in names)
            where = f"data rows {seen + 1}-{seen + self.rows}"
            if isinstance(e, pd.errors.ParserError | UnicodeDecodeError):
                why, reason = f"a row not parsed in {where}", "unparsed"
            else:
                why, reason = f"a value that is not a number in {where}", "text_value"
            # the axes as far as they are known (the header, the rows before the fault):
            # a refusal of the whole read counts the cells on the right axis
            found = self._orientation(
                names, pd.Index(header[1:]), orientation, known_genes, src, quiet=True
            )
            raise ReadWhole(
                f"{why} ({type(e).__name__}: {str(e).strip()})", reason=reason, orientation=found
            ) from None
        if columns is None or not names or sum(len(n) for n in names) == 0:
            raise ReadWhole("no data rows", reason="no_rows")
        index = pd.Index(np.concatenate(names)).astype(str)
        # pandas renames a repeated header ("Actb.1"): the names as written, as read_expression
        if len(header) - 1 == len(columns) and len(set(header[1:])) < len(header) - 1:
            columns = pd.Index(header[1:])
        orientation = self._orientation(names, columns, orientation, known_genes, src)
        if len(kinds) > 1:
            # the row names are typed as pandas infers them, a block at a time: ids read
            # as numbers in one block and as text in another would not be the whole
            # table's (001 is 1 where the whole column reads as numbers)
            raise ReadWhole(
                f"row names read as {sorted(map(str, kinds))} in different blocks",
                reason="mixed_ids",
                orientation=orientation,
            )
        self.obs = pd.DataFrame(index=index)
        self.var = pd.DataFrame(index=columns.astype(str))
        self._cols = {
            "negative": neg,
            "nonfinite": nonfinite,
            "top": top,
            "whole": whole,
            "exact": exact,
        }
        self.plans: dict = {}  # vae.api.Study's reading plan of this file, by source

    def _orientation(
        self, names: list, columns: pd.Index, orientation: str, genes, src: str, quiet=False
    ) -> str:
        """The table's orientation (``orientation`` unless ``auto``: told from the row
        names read and ``columns`` as :func:`read_expression` tells it). Genes as rows
        raise :class:`ReadWhole`; ``quiet``: an orientation not told is ``auto``, not an
        error, and nothing is raised or logged (a table read whole for another fault)."""
        if orientation != "auto":
            return orientation
        index = pd.Index(np.concatenate(names) if names else []).astype(str)
        try:
            found, why = detect_orientation(index, columns, genes)
        except ExpressionInputError as e:
            if quiet:
                return "auto"
            raise ExpressionInputError(
                str(e).split("] ", 1)[-1], field=e.field, source=src
            ) from None
        if quiet:
            return found
        if found == "genes_by_cells":
            raise ReadWhole(f"genes as rows ({why})", reason="genes_as_rows", orientation=found)
        log.info("%s: read as %s (expression.orientation=auto: %s)", src, found, why)
        return found

    def _chunks(self):
        return pd.read_csv(
            self.path, sep=self.sep, index_col=0, dtype=self._dtypes, chunksize=self.rows
        )

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index

    def _changed(self, what: str) -> ExpressionInputError:
        return ExpressionInputError(
            f"the table changed while it was read ({what}): run again once it is written",
            field="path",
            source=str(self.path),
        )

    def __iter__(self):
        """AnnData blocks of :attr:`rows` cells, X dense float32 as read whole.

        Raises
        ------
        ExpressionInputError
            The table is not the one the first pass read (its size or modification time
            differ, or it gives more or fewer rows, or it no longer parses): its cells
            would not be those the whole-table decisions were made on.
        """
        try:
            now = _table_stamp(self.path)
        except OSError as e:
            raise self._changed(f"{type(e).__name__}: {e}") from e
        if now != self._stamp:
            raise self._changed("its size or modification time differ from its first pass")
        s = 0
        try:
            chunks = iter(self._chunks())
        except (OSError, EOFError, ValueError, TypeError, csv.Error) as e:
            raise self._changed(f"{type(e).__name__}: {e}") from e
        while True:
            try:
                df = next(chunks, None)
            except (OSError, EOFError, ValueError, TypeError, csv.Error) as e:
                raise self._changed(f"{type(e).__name__}: {e}") from e
            if df is None:
                break
            e = s + len(df)
            if e > self.n_obs:
                raise self._changed(f"more than the {self.n_obs} rows of its first pass")
            a = ad.AnnData(X=df.to_numpy(dtype=np.float32), obs=self.obs.iloc[s:e], var=self.var)
            a.uns["source"] = str(self.path)
            s = e
            yield a
        if s != self.n_obs:  # rows cut off: their cells would be missing from the output
            raise self._changed(f"{s} rows where its first pass read {self.n_obs}")

    def stats(self, key: str, cols: np.ndarray | None = None) -> ValueStats:
        """:class:`ValueStats` of ``X`` (a table's only matrix; its values are all
        stored), of its columns ``cols`` when given (a column as often as named)."""
        if key != "X":
            raise KeyError(f"{self.path}: a table has no matrix {key!r}, only X")
        c = self._cols
        n_var = len(c["top"])
        many = (
            np.ones(n_var, np.int64)
            if cols is None
            else np.bincount(np.asarray(cols, np.int64), minlength=n_var)
        )
        on = many > 0
        out = ValueStats(
            size=int(self.n_obs * many.sum()),
            negative=int((c["negative"] * many).sum()),
            nonfinite=int((c["nonfinite"] * many).sum()),
            whole=bool(c["whole"][on].all()),
            exact=bool(c["exact"][on].all()),
        )
        if out.size:
            out.top = float(np.fmax.reduce(c["top"][on], initial=np.nan))
        return out


def _node_bytes(node) -> int:
    """Bytes an HDF5 matrix (a dataset, or a CSR/CSC group) takes in memory."""
    import h5py

    if isinstance(node, h5py.Dataset):
        return int(node.size) * node.dtype.itemsize
    return sum(int(node[k].size) * node[k].dtype.itemsize for k in ("data", "indices", "indptr"))


# the least memory a whole read takes, a value of a text table and an entry of a matrix
# market file, below what scripts/bench_whole_read.py measured (13.5 and 58.8: read_csv's
# columns, the frame and X; mmread's COO of int64 values and its CSR copy)
TABLE_BYTES_PER_VALUE = 12
MTX_BYTES_PER_ENTRY = 24
# bytes of a text table read after its first line (read in full) to estimate its rows
# (the rest is estimated from the size)
TABLE_SAMPLE_BYTES = 4 << 20


@dataclass(frozen=True)
class ReadSize:
    """The least memory :func:`read_expression` takes for a file, from its metadata.

    need : bytes; cells : cells it holds (a lower bound where the orientation is not
    known yet); what : how ``need`` was found, for a message (e.g. "its matrices as
    stored"); estimated : True where the shape is estimated (a table's rows from its
    size and first lines)."""

    need: int
    cells: int
    what: str
    estimated: bool = False


def whole_read_size(path: str | Path, orientation: str = "auto") -> ReadSize | None:
    """The least memory :func:`read_expression` takes for ``path`` read whole, from its
    metadata without reading it: an ``.h5ad`` or 10x ``.h5`` (its matrices as stored:
    ``X``, layers and ``.raw``; a 10x file's counts as float32 CSR), a 10x matrix folder
    (the entries its ``matrix.mtx`` header counts, :data:`MTX_BYTES_PER_ENTRY` each), a
    CSV / TSV table (rows x columns, :data:`TABLE_BYTES_PER_VALUE` each; rows estimated
    from its size and first lines: its first line in full and up to
    :data:`TABLE_SAMPLE_BYTES` after it, a ``.gz`` one's size from how those
    decompress). None for other formats or a file that
    cannot be read so (the reader then names the fault)."""
    import h5py

    p = Path(path)
    name = p.name.lower()
    try:
        if p.is_dir():
            return _mtx_read_size(p)
        if is_table(p):
            return _table_read_size(p, orientation)
        with h5py.File(p, "r") as f:
            if name.endswith(".h5ad"):
                nodes = [f["X"]] if "X" in f else []
                nodes += list(f["layers"].values()) if "layers" in f else []
                nodes += [f["raw/X"]] if "raw" in f and "X" in f["raw"] else []
                shape = _h5_shape(f["X"]) if "X" in f else (0, 0)
                stored = sum(_node_bytes(n) for n in nodes)
                return ReadSize(stored, int(shape[0]), "its matrices as stored")
            if name.endswith(".h5"):
                m = f["matrix"] if "matrix" in f else next(iter(f.values()))
                nnz, cells = int(m["data"].size), int(m["shape"][1])
                # float32 values, int32 indices
                return ReadSize(nnz * 8 + (cells + 1) * 8, cells, "its counts as stored")
    except Exception:  # noqa: BLE001 - read_expression names an unreadable file
        return None
    return None


def _mtx_read_size(folder: Path) -> ReadSize | None:
    """:func:`whole_read_size` of a 10x matrix folder: its one ``matrix.mtx[.gz]``'s
    header (``scipy.io.mminfo``: genes, cells, entries)."""
    import scipy.io

    found = [f for f in folder.iterdir() if _MTX.fullmatch(f.name)]
    if len(found) != 1:
        return None  # read_10x_folder says what is wrong
    genes, cells, entries = scipy.io.mminfo(str(found[0]))[:3]
    need = int(entries) * MTX_BYTES_PER_ENTRY + (int(cells) + 1) * 8
    return ReadSize(
        need,
        int(cells),
        f"{found[0].name}: {int(entries)} entries, {MTX_BYTES_PER_ENTRY} bytes each",
    )


def _table_sample(p: Path) -> tuple[bytes, bytes, int, bool]:
    """The first lines of a CSV / TSV table (``.gz`` too) for :func:`_table_read_size`.

    Returns
    -------
    (header, body, total, end)
        The first line in full, without its line end (the header of a table of genes as
        rows holds every cell id: 5 MB for 300k cells, longer than the sample; cut at
        the sample, it hid the table's width and size); up to :data:`TABLE_SAMPLE_BYTES`
        of the lines after it (the last one may be cut), ``\\r\\n`` and ``\\r`` line ends
        made ``\\n``; the file's size in bytes (a ``.gz`` one's decompressed size,
        estimated from how the bytes read decompress unless ``end``); whether the whole
        file was read.
    """
    import zlib

    line_end = re.compile(rb"[\r\n]")
    size = p.stat().st_size
    gz = p.name.lower().endswith(".gz")
    d = zlib.decompressobj(zlib.MAX_WBITS | 16) if gz else None
    out, used, end, first, searched = bytearray(), 0, False, None, 0
    with open(p, "rb") as f:
        while first is None or len(out) - first.end() < TABLE_SAMPLE_BYTES:
            piece = f.read(1 << 16)
            if not piece:
                end = True
                break
            used += len(piece)
            if d is None:
                out += piece
            else:
                out += d.decompress(piece)
                while d.eof and d.unused_data:  # a .gz of several members (cat a.gz b.gz)
                    rest, d = d.unused_data, zlib.decompressobj(zlib.MAX_WBITS | 16)
                    out += d.decompress(rest)
            if first is None:
                first = line_end.search(out, searched)
                searched = len(out)
    text = bytes(out)
    if first is None:  # one line and no line end: the whole file
        header, body = text, b""
    else:
        header, body = text[: first.start()], text[first.end() :]
        if first.group() == b"\r" and body[:1] == b"\n":
            body = body[1:]
    body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if end:
        total = len(text)
    elif d is None:
        total = size
    else:
        total = int(size * len(text) / max(used, 1))
    return header, body, total, end


def _table_read_size(p: Path, orientation: str) -> ReadSize | None:
    """:func:`whole_read_size` of a CSV / TSV table (``.gz`` too): its columns counted in
    its first line (read in full), its rows counted, or past the first
    :data:`TABLE_SAMPLE_BYTES` after that line estimated from the size and the mean
    length of the lines read."""
    header, body, total, end = _table_sample(p)
    if not header.strip():
        return None
    # the separator table_separator picks: the commonest of tab, comma, semicolon
    n_cols = max(header.count(c) for c in (b"\t", b",", b";")) + 1
    lines = body.split(b"\n")
    lines = lines if end else lines[:-1]  # the last line read may be cut
    lines = [x for x in lines if x.strip()]
    if end:
        rows = len(lines)
    else:
        # no whole line in the sample (rows longer than it): one as long as the header
        mean = np.mean([len(x) + 1 for x in lines]) if lines else len(header) + 1
        rows = int((total - len(header) - 1) / mean)
    genes = max(n_cols - 1, 0)
    cells = {"cells_by_genes": rows, "genes_by_cells": genes}.get(orientation, min(rows, genes))
    how = "counted" if end else "estimated from its size and first lines"
    return ReadSize(
        rows * genes * TABLE_BYTES_PER_VALUE,
        cells,
        f"{rows} rows x {genes} columns ({how}), {TABLE_BYTES_PER_VALUE} bytes a value",
        estimated=not end,
    )


def _h5_shape(node) -> tuple[int, int]:
    return tuple(int(x) for x in (node.shape if hasattr(node, "dtype") else node.attrs["shape"]))
