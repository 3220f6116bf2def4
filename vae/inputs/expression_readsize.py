"""The least memory :func:`vae.inputs.expression.read_expression` takes to read a file
whole, found from its metadata without reading it (:func:`whole_read_size`,
:class:`ReadSize`): an ``.h5ad`` or 10x ``.h5``'s matrices as stored, a 10x matrix
folder's entries, a CSV / TSV table's rows x columns (counted, or estimated from its size
and first lines), so that ``stage=embed`` can refuse a read that would not fit."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vae.inputs.expression_blocks import _h5_shape
from vae.inputs.expression_read import _MTX, is_table


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
