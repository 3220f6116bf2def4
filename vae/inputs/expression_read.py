"""Reading expression files: the error every expression step raises
(:class:`ExpressionInputError`), the format told from a file's name (:func:`detect_format`,
:func:`is_table`), the CSV / TSV helpers (column separator, gzip-aware opening, values
parsed as float32), the 10x matrix-market folder reader (:func:`read_10x_folder`), which
axis of a table or an AnnData holds the genes (:func:`detect_orientation`) and Ensembl ids
replaced by gene symbols; :func:`vae.inputs.expression.read_expression` and the block
readers of :mod:`vae.inputs.expression_blocks` are built on them."""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vae.inputs.schema import GRANULE_PROGRAMS, INPUT_FORMATS

# the logger of vae.inputs.expression, where this code was moved from: log lines and
# their filters keep that name
log = logging.getLogger("vae.inputs.expression")


BUILTIN_PBMC68K = "scanpy:pbmc68k_reduced"


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


TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")


def is_table(path: str | Path) -> bool:
    """Whether ``path`` names a CSV / TSV expression table (:func:`detect_format`)."""
    return str(path).lower().endswith(TABLE_SUFFIXES)
