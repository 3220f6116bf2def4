"""Expression files read a block of rows at a time by ``stage=embed``
(``vae.api.Study``): the whole-matrix value statistics its decisions are taken on
(:class:`ValueStats`, :class:`InMemoryFacts`), which files can be read so
(:func:`row_blocks_unsupported`), the ``.h5ad`` and 10x ``.h5`` block readers
(:class:`H5adRowBlocks`, :class:`TenxH5RowBlocks`) and the CSV / TSV one
(:class:`CsvRowBlocks`), which raises :class:`ReadWhole` where a table must be read
whole after all."""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from segmentation.io import blank_as_read
from vae.inputs.expression_qc import RAW_LIBRARY, _is_counts, _values
from vae.inputs.expression_read import (
    TABLE_SUFFIXES,
    ExpressionInputError,
    _orient_anndata,
    _table_dtypes,
    _text_open,
    detect_format,
    detect_orientation,
    is_table,
    symbols_as_names,
    table_separator,
)
from vae.inputs.schema import GRANULE_PROGRAMS, ORIENTATIONS

# the logger of vae.inputs.expression, where this code was moved from: log lines and
# their filters keep that name
log = logging.getLogger("vae.inputs.expression")


# ----------------------------------------------------------------------------
# whole-matrix statistics
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
    number); exact : every value is finite, >= 0 and a whole number
    (``vae.inputs.expression_qc._is_counts``, before its dtype and size tests:
    :attr:`counts`); numeric : a numeric
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


# ----------------------------------------------------------------------------
# HDF5 files (.h5ad, 10x .h5) by blocks of rows
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# CSV / TSV tables by blocks of rows
# ----------------------------------------------------------------------------


# values a block of a text table holds at most (float32: 128 MiB; pandas parses a block
# at ~13 bytes a value, scripts/bench_whole_read.py): a table of 20k genes is read 1536
# rows at a time, one of 2000 genes 8192 (EMBED_BLOCK_ROWS)
TABLE_BLOCK_VALUES = 1 << 25


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


def _h5_shape(node) -> tuple[int, int]:
    return tuple(int(x) for x in (node.shape if hasattr(node, "dtype") else node.attrs["shape"]))
