"""stage=embed of large expression inputs: the reference fitted once for every block, CSV /
TSV tables read a block of rows at a time, and the up-front memory check of the files
still read whole (a 10x matrix folder, a table of genes as rows).

On the toy study (60 query cells) with blocks of 7 rows (9 blocks, the last one short).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from pipeline.runner import StageError
from tests.helpers.run import embed_on_toy_study
from tests.pipeline.test_embed_blocks import ROWS, _query, _same


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_study) -> Path:
    """This module's copy of the toy study (<root>/out/s/train, <root>/paired.h5ad)."""
    return toy_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def loaded(study: Path):
    from vae.api import Study

    return Study.load(study / "out" / "s")


def _embed_stage(study: Path, exp: str, *extra: str) -> Path:
    return embed_on_toy_study(study, exp, *extra)


def test_the_reference_is_fitted_once_for_every_block(study, tmp_path, monkeypatch):
    """The label transfer's kNN, the atypical scores' neighbour index and Gaussians are
    fitted on the study's reference for the first block and reused by the other eight
    (each block fitted them again); the results are those of the file read whole."""
    from sklearn.covariance import LedoitWolf
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    from vae.api import Study

    fits: list[str] = []
    for cls in (KNeighborsClassifier, NearestNeighbors, LedoitWolf):
        real = cls.fit

        def counted(self, *a, _real=real, _name=cls.__name__, **k):
            fits.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(cls, "fit", counted)
    st = Study.load(study / "out" / "s")  # nothing fitted yet
    path = tmp_path / "q.h5ad"
    _query(study, "counts_in_x").write_h5ad(path)
    blocks = st.read_blocks(path, rows=ROWS)
    parts, after = [], []
    for b in blocks:
        parts.append(st.embed(b, "q", whole=blocks))
        after.append(len(fits))
    assert len(parts) == 9
    assert after[0] > 0 and after[-1] == after[0]  # nothing fitted after the first block
    assert fits.count("KNeighborsClassifier") == 1  # expression cells: one modality
    assert fits.count("NearestNeighbors") <= 2  # one index per modality of the reference
    mem = st.embed(st.read(path, "expression"), "q")
    assert fits.count("KNeighborsClassifier") == 1  # the whole file: still the same kNN
    _same(mem, ad.concat([p for p in parts if p.n_obs], merge="first", uns_merge="first"))


def test_a_label_transfer_fit_follows_k_and_a_new_reference(loaded):
    """The kept kNN is per k and per reference: another k, or a reference set after
    load, gives the labels a fresh fit gives."""
    z = np.asarray(loaded.reference.obsm["X_vae"][:10])
    a1, many = loaded.transfer_labels(z, k=1), loaded.transfer_labels(z, k=40)
    assert (a1["confidence"] == 1.0).all()  # k=1: the cell's own label
    assert (many["confidence"] < 1.0).all()  # 40 of the 48 cells: other classes vote too
    pd.testing.assert_frame_equal(loaded.transfer_labels(z, k=1), a1)
    ref = loaded.reference
    try:
        other = ref.copy()
        lab = other.obs[loaded.label_key].astype(str).to_numpy()
        other.obs[loaded.label_key] = np.roll(lab, 1)  # other labels, same codes
        loaded.reference = other
        rolled = loaded.transfer_labels(z, k=1)
        assert list(rolled["label"]) == list(np.roll(lab, 1)[:10])
    finally:
        loaded.reference = ref
    pd.testing.assert_frame_equal(loaded.transfer_labels(z, k=1), a1)


@pytest.mark.parametrize("name", ["q.csv", "q.tsv.gz", "lognorm.csv", "missing.csv"])
def test_a_table_is_read_by_blocks_with_the_whole_files_result(
    study, loaded, tmp_path, name, caplog
):
    """A CSV / TSV (gzipped too) of cells as rows: blocks of rows give what the table read
    whole gives (codes to 1e-5, calls, gene report), counts or log-normalised values and
    missing genes decided for the whole table, cell ids as the whole table reads them."""
    from vae.inputs.expression import CsvRowBlocks

    layout = {"lognorm.csv": "counts_layer", "missing.csv": "missing_genes"}.get(
        name, "counts_in_x"
    )
    a = _query(study, layout)
    df = a.to_df()
    df.index = [f"{i:03d}" for i in range(a.n_obs)]  # ids pandas reads as numbers: 0, 1
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            df.to_csv(f, sep="\t")
    else:
        df.to_csv(path)
    whole = loaded.read(path, "expression")
    assert list(whole.obs_names[:2]) == ["0", "1"]  # as before: every block reads numbers
    blocks = loaded.read_blocks(path, rows=ROWS)
    assert isinstance(blocks, CsvRowBlocks) and blocks.n_obs == 60
    mem = loaded.embed(whole, "q")
    parts = [loaded.embed(b, "q", whole=blocks) for b in blocks]
    assert len(parts) == 9 and sum(p.n_obs for p in parts) == mem.n_obs
    _same(mem, ad.concat([p for p in parts if p.n_obs], merge="first", uns_merge="first"))
    assert sum((p.uns["dropped"] for p in parts), []) == mem.uns["dropped"]
    assert {p.uns["genes"] for p in parts} == {mem.uns["genes"]}
    want = "lognorm" if layout == "counts_layer" else "counts"
    assert json.loads(mem.uns["genes"])["values"] == want


def test_stage_embeds_a_csv_by_blocks_with_the_in_memory_result(study, tmp_path, monkeypatch):
    """stage=embed reads a CSV a block of rows at a time: query.h5ad, summary.json and
    samples.csv as when it is read whole (the reader before)."""
    import vae.inputs.expression_blocks
    from vae.api import Study

    path = tmp_path / "q.csv"
    _query(study, "counts_in_x").to_df().to_csv(path)
    monkeypatch.setattr(vae.inputs.expression_blocks, "EMBED_BLOCK_ROWS", ROWS)
    blocks = _embed_stage(study, "csvblocks", f"embed.expression={path}")
    monkeypatch.setattr(Study, "read_blocks", lambda *a, **k: None)  # read whole, as before
    whole = _embed_stage(study, "csvwhole", f"embed.expression={path}")
    _same(ad.read_h5ad(whole / "query.h5ad"), ad.read_h5ad(blocks / "query.h5ad"))
    sw, sb = (json.loads((d / "summary.json").read_text()) for d in (whole, blocks))
    for key in ("cells", "by_label", "by_call", "genes", "samples"):
        assert sb[key] == sw[key], key
    pd.testing.assert_frame_equal(
        pd.read_csv(whole / "samples.csv"), pd.read_csv(blocks / "samples.csv")
    )


def test_tables_not_read_by_rows_are_read_whole(study, loaded, tmp_path):
    """Genes as rows (found from the names, or said), a text column, a header only, a
    counts layer asked of a table, ids read as numbers in one block and as text in
    another: read whole, which reads or refuses them as before."""
    a = _query(study, "counts_in_x")
    a.to_df().T.to_csv(tmp_path / "genes.csv")
    assert loaded.read_blocks(tmp_path / "genes.csv") is None
    assert loaded.read(tmp_path / "genes.csv", "expression").n_obs == 60
    a.to_df().to_csv(tmp_path / "q.csv")
    assert loaded.read_blocks(tmp_path / "q.csv", orientation="genes_by_cells") is None
    assert loaded.read_blocks(tmp_path / "q.csv", counts_layer="umi") is None
    text = a.to_df()
    text["G3"] = "x"
    text.to_csv(tmp_path / "text.csv")
    assert loaded.read_blocks(tmp_path / "text.csv") is None
    a.to_df().iloc[:0].to_csv(tmp_path / "empty.csv")
    assert loaded.read_blocks(tmp_path / "empty.csv") is None
    mixed = a.to_df()
    mixed.index = [*[str(i) for i in range(ROWS)], *[f"c{i}" for i in range(ROWS, 60)]]
    mixed.to_csv(tmp_path / "mixed.csv")  # ids: numbers in the first block, text after
    assert loaded.read_blocks(tmp_path / "mixed.csv", rows=ROWS) is None
    assert loaded.read_blocks(tmp_path / "mixed.csv", rows=60) is not None  # one block


def _write_mtx(folder: Path, a: ad.AnnData) -> None:
    """``a``'s counts as a 10x matrix folder (genes x cells matrix.mtx.gz, features, barcodes)."""
    folder.mkdir(parents=True)
    scipy.io.mmwrite(folder / "matrix.mtx", sp.coo_matrix(sp.csr_matrix(a.X).T), field="integer")
    with open(folder / "matrix.mtx", "rb") as f, gzip.open(folder / "matrix.mtx.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    (folder / "matrix.mtx").unlink()
    pd.DataFrame({0: [f"E{i}" for i in range(a.n_vars)], 1: list(a.var_names)}).to_csv(
        folder / "features.tsv", sep="\t", header=False, index=False
    )
    pd.DataFrame({0: list(a.obs_names)}).to_csv(
        folder / "barcodes.tsv", sep="\t", header=False, index=False
    )


def test_whole_read_sizes_of_tables_and_matrix_folders(study, tmp_path, monkeypatch):
    """The least memory of a whole read: a matrix folder from its header's entries, a
    table counted when small, else estimated from its size and first lines (here within
    10 % of its 60 rows; gzipped too)."""
    import vae.inputs.expression as E
    from vae.inputs import expression_readsize

    a = _query(study, "counts_in_x")  # 60 cells x 42 genes
    _write_mtx(tmp_path / "mtx", a)
    size = E.whole_read_size(tmp_path / "mtx")
    nnz = int(sp.csr_matrix(a.X).nnz)
    assert size.cells == 60 and size.need == nnz * E.MTX_BYTES_PER_ENTRY + 61 * 8
    a.to_df().to_csv(tmp_path / "q.csv")
    with open(tmp_path / "q.csv", "rb") as f, gzip.open(tmp_path / "q.csv.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    exact = E.whole_read_size(tmp_path / "q.csv", "cells_by_genes")
    assert exact.cells == 60 and not exact.estimated
    assert exact.need == 60 * 42 * E.TABLE_BYTES_PER_VALUE
    assert E.whole_read_size(tmp_path / "q.csv").cells == 42  # auto: the lesser axis
    assert E.whole_read_size(tmp_path / "q.csv", "genes_by_cells").cells == 42
    monkeypatch.setattr(expression_readsize, "TABLE_SAMPLE_BYTES", 2000)  # a few lines: estimated
    for name in ("q.csv", "q.csv.gz"):
        est = E.whole_read_size(tmp_path / name, "cells_by_genes")
        assert est.estimated and 54 <= est.cells <= 66, (name, est)


def test_a_file_read_whole_too_large_is_refused_before_any_input_is_embedded(
    study, tmp_path, monkeypatch
):
    """A 10x matrix folder or a table of genes as rows too large for the memory: the
    stage stops before any input (here the study's paired table) is embedded, naming the
    file, the sizes and what to give instead; nothing of the run is written."""
    import vae.study_read  # where Study.check_whole_read_fits reads the memory
    from vae.api import Study

    a = _query(study, "counts_in_x")
    _write_mtx(tmp_path / "mtx", a)
    a.to_df().T.to_csv(tmp_path / "genes.csv")
    embedded = []
    real = Study.embed
    monkeypatch.setattr(Study, "embed", lambda *x, **k: embedded.append(1) or real(*x, **k))
    monkeypatch.setattr(vae.study_read, "_available_memory", lambda: 10_000)  # 10 kB left
    h5ad = f"embed.h5ad={study / 'paired.h5ad'}"
    with pytest.raises(StageError) as e:
        _embed_stage(study, "bigmtx", h5ad, f"embed.expression={tmp_path / 'mtx'}")
    msg = str(e.value)
    assert msg.startswith(f"embed.expression={tmp_path / 'mtx'}: read whole it takes at least")
    assert (
        "matrix.mtx.gz" in msg and "read_10x_mtx" in msg and "filtered_feature_bc_matrix.h5" in msg
    )
    with pytest.raises(StageError, match=r"genes.csv: read whole .* write it with cells as rows"):
        _embed_stage(study, "bigcsv", h5ad, f"embed.expression={tmp_path / 'genes.csv'}")
    assert embedded == []
    for exp in ("bigmtx", "bigcsv"):
        assert not (study / "out" / exp / "embed" / "query.h5ad").exists()
    # a table of cells as rows is read by blocks: not refused, whatever its size
    a.to_df().to_csv(tmp_path / "cells.csv")
    run = _embed_stage(study, "smallmem", f"embed.expression={tmp_path / 'cells.csv'}")
    assert json.loads((run / "summary.json").read_text())["cells"] == 60


def test_a_tables_value_tests_are_those_of_the_table_read_whole(tmp_path):
    """``CsvRowBlocks.stats`` (per column, from blocks of 3 rows) equals the whole matrix's
    :class:`ValueStats` for any columns, a column named twice included: negative, NaN,
    infinite, non-integer and near-integer values, a column of NaN only; repeated gene
    names kept as written."""
    from dataclasses import asdict

    from vae.inputs.expression import CsvRowBlocks, InMemoryFacts, read_expression

    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, (10, 6)).astype(np.float32)
    x[1, 0], x[4, 1], x[7, 2], x[2, 3] = -1.0, np.nan, np.inf, 2.5
    x[5, 4] = 3.0000001  # close to a whole number, not one
    x[:, 5] = np.nan
    names = ["A", "B", "C", "D", "E", "A"]  # a repeated gene name
    pd.DataFrame(x, index=[f"c{i}" for i in range(10)], columns=names).to_csv(tmp_path / "t.csv")
    whole = read_expression(tmp_path / "t.csv", orientation="cells_by_genes")
    blocks = CsvRowBlocks(tmp_path / "t.csv", orientation="cells_by_genes", rows=3)
    assert list(blocks.var.index) == list(whole.var_names) == names
    facts = InMemoryFacts(whole)
    for cols in (None, [0], [1], [2], [3], [4], [5], [0, 3, 3], [4, 5], [1, 2, 4]):
        c = None if cols is None else np.array(cols)
        want, got = asdict(facts.stats("X", c)), asdict(blocks.stats("X", c))
        assert want.keys() == got.keys()
        for k in want:
            assert want[k] == got[k] or (want[k] != want[k] and got[k] != got[k]), (cols, k)


def test_a_damaged_gz_table_is_refused_naming_the_file(study, loaded, tmp_path):
    """A ``.gz`` table cut short, or plain text named ``.csv.gz``: the block reader names
    the file and the fault (``[path] could not read as csv``), from the Python API and
    from stage=embed (a stage error, not a crash out of the reader)."""
    text = _query(study, "counts_in_x").to_df().to_csv().encode()
    packed = gzip.compress(text)
    (tmp_path / "cut.csv.gz").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "plain.csv.gz").write_bytes(text)
    from vae.api import StudyError

    for name, fault in (("cut.csv.gz", "EOFError"), ("plain.csv.gz", "BadGzipFile")):
        with pytest.raises(StudyError) as e:
            loaded.read_blocks(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: [path] could not read as csv: {fault}")
    with pytest.raises(StageError) as e:
        _embed_stage(study, "cutgz", f"embed.expression={tmp_path / 'cut.csv.gz'}")
    want = f"embed.expression={tmp_path / 'cut.csv.gz'}: [path] could not read as csv: EOFError"
    assert str(e.value).startswith(want)


def test_a_table_read_whole_for_a_text_value_says_which(study, loaded, tmp_path):
    """The reason a table is read whole is the real one: the value pandas could not
    read as a number and the rows it is in (it said 'a value that is not a number' for
    any fault), and the orientation the header gave."""
    from vae.inputs.expression import CsvRowBlocks, ReadWhole

    df = _query(study, "counts_in_x").to_df().astype(object)
    df.iloc[45, 3] = "n/a x"
    df.to_csv(tmp_path / "text.csv")
    with pytest.raises(ReadWhole) as e:
        CsvRowBlocks(tmp_path / "text.csv", known_genes=loaded.gene_names, rows=ROWS)
    assert e.value.reason == "text_value" and e.value.orientation == "cells_by_genes"
    assert "'n/a x'" in str(e.value) and "data rows 43-49" in str(e.value)


def test_a_table_changed_between_its_two_passes_is_refused(study, tmp_path, monkeypatch):
    """A table rewritten between the first pass (names, value tests) and the blocks:
    rows added or removed are refused naming the file, from the stage too (rows added
    raised out of it uncaught; rows removed wrote fewer cells); rows counted as well
    where the size and time stay the same."""
    import vae.inputs.expression as E

    df = _query(study, "counts_in_x").to_df()
    real = E.CsvRowBlocks.__init__
    for what, rows in (
        ("grow", pd.concat([df, df.iloc[:1].rename(index=lambda i: "new")])),
        ("shrink", df.iloc[:50]),
    ):
        path = tmp_path / f"{what}.csv"
        df.to_csv(path)

        def rewrite(self, *a, _rows=rows, _path=path, **k):
            real(self, *a, **k)
            _rows.to_csv(_path)  # after the first pass, before the blocks

        monkeypatch.setattr(E.CsvRowBlocks, "__init__", rewrite)
        with pytest.raises(StageError) as e:
            _embed_stage(study, f"changed_{what}", f"embed.expression={path}")
        assert str(e.value).startswith(
            f"embed.expression={path}: [path] the table changed while it was read"
        )
        assert not (study / "out" / f"changed_{what}" / "embed" / "query.h5ad").exists()
    monkeypatch.setattr(E.CsvRowBlocks, "__init__", real)
    for rows, want in (
        (df.iloc[:50], "50 rows where its first pass read 60"),
        (pd.concat([df, df.iloc[:1]]), "more than the 60 rows"),
    ):
        path = tmp_path / "same_stamp.csv"
        df.to_csv(path)
        blocks = E.CsvRowBlocks(path, orientation="cells_by_genes", rows=ROWS)
        rows.to_csv(path)
        blocks._stamp = E._table_stamp(path)  # as if size and time had not changed
        with pytest.raises(E.ExpressionInputError, match=want):
            list(blocks)


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r", "gz"])
def test_a_header_longer_than_the_sample_is_read_whole(tmp_path, monkeypatch, ending):
    """A table of genes as rows whose header (every cell id) is longer than the sample:
    its columns are counted in the whole first line and its rows estimated from the
    lines after it (cut at the sample, the header gave 0.21 of the size), with any line
    end; a ``.gz`` one's too."""
    import vae.inputs.expression as E
    from vae.inputs import expression_readsize

    rng = np.random.default_rng(0)
    cells = [f"AAACCTGAGAAACC{i:04d}-1" for i in range(400)]  # a header of ~8.8 kB
    df = pd.DataFrame(
        rng.integers(0, 10, (80, 400)), index=[f"G{i}" for i in range(80)], columns=cells
    )
    text = df.to_csv(lineterminator="\n" if ending == "gz" else ending)
    path = tmp_path / ("g.csv.gz" if ending == "gz" else "g.csv")
    if ending == "gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_bytes(text.encode())
    exact = E.whole_read_size(path, "genes_by_cells")
    assert not exact.estimated and exact.cells == 400
    assert exact.need == 80 * 400 * E.TABLE_BYTES_PER_VALUE
    monkeypatch.setattr(expression_readsize, "TABLE_SAMPLE_BYTES", 2000)  # a quarter of the header
    est = E.whole_read_size(path, "genes_by_cells")
    assert est.estimated and est.cells == 400 and "x 400 columns" in est.what
    assert 0.8 <= est.need / exact.need <= 1.25, est


def test_a_table_read_whole_for_another_reason_is_refused_with_its_own_advice(
    study, loaded, tmp_path, monkeypatch
):
    """A table of cells as rows read whole because its ids read as numbers in one
    block and text in another, or because of a text value, and too large for the
    memory: the refusal says that reason and what to do about it, and counts its cells
    on the axis found (60 rows, not the lesser axis: 42 genes); from Study.read of a
    table never given to read_blocks, it points to Study.read_blocks."""
    import vae.inputs.expression_blocks
    import vae.study_read  # where Study.check_whole_read_fits reads the memory
    from vae.api import Study, StudyError

    a = _query(study, "counts_in_x")
    mixed = a.to_df()
    mixed.index = [*[str(i) for i in range(ROWS)], *[f"c{i}" for i in range(ROWS, 60)]]
    mixed.to_csv(tmp_path / "mixed.csv")
    text = a.to_df().astype(object)
    text.iloc[45, 3] = "x"
    text.to_csv(tmp_path / "text.csv")
    a.to_df().to_csv(tmp_path / "cells.csv")
    monkeypatch.setattr(vae.inputs.expression_blocks, "EMBED_BLOCK_ROWS", ROWS)
    monkeypatch.setattr(vae.study_read, "_available_memory", lambda: 10_000)  # 10 kB left
    with pytest.raises(StageError) as e:
        _embed_stage(study, "bigmixed", f"embed.expression={tmp_path / 'mixed.csv'}")
    msg = str(e.value)
    assert "(60 cells;" in msg and "make every id text (e.g. prefix 'c'" in msg
    assert "genes as rows" not in msg and "write it with cells as rows" not in msg
    st = Study.load(study / "out" / "s")
    assert st.read_blocks(tmp_path / "text.csv") is None
    with pytest.raises(StudyError) as e:
        st.check_whole_read_fits(tmp_path / "text.csv")
    msg = str(e.value)
    assert "(60 cells;" in msg and "could not convert string to float: 'x'" in msg
    assert "write it with cells as rows" not in msg
    with pytest.raises(StudyError) as e:  # never given to read_blocks: it reads by rows
        st.read(tmp_path / "cells.csv", "expression")
    assert "Study.read_blocks" in str(e.value) and "genes as rows" not in str(e.value)


def test_setting_the_reference_drops_what_was_fitted_on_the_one_before(study, loaded):
    """Every cache fitted on the reference (label kNN, anomaly neighbours and
    Gaussians, thresholds, reference expression, maturation path) is dropped when
    the reference is set; a reference changed in place keeps them until assigned again."""
    from vae.api import Study

    st = Study.load(study / "out" / "s")
    z = np.asarray(st.reference.obsm["X_vae"][:10])
    before = st.transfer_labels(z, k=1)
    st.atypical_thresholds()
    st.reference_expression()
    names = ("_anomaly_ref", "_scored_ref", "_atypical_thr", "_ref_expr")
    assert all(getattr(st, n) is not None for n in names) and st._label_knn
    lab = st.reference.obs[st.label_key].astype(str).to_numpy()
    st.reference.obs[st.label_key] = np.roll(lab, 1)  # in place: still the old fits
    pd.testing.assert_frame_equal(st.transfer_labels(z, k=1), before)
    st.reference = st.reference.copy()
    assert all(getattr(st, n) is None for n in names)
    assert not st._label_knn and not st._label_ref and st._path is None
    assert list(st.transfer_labels(z, k=1)["label"]) == list(np.roll(lab, 1)[:10])


def test_a_gz_table_named_in_capitals_is_read_as_gzip(study, tmp_path):
    """``Q.CSV.GZ``: its header is read gunzipped (the reader opened it as text: a
    header of compressed bytes, so its values were not read as float32)."""
    from vae.inputs.expression import CsvRowBlocks, _text_open

    df = _query(study, "counts_in_x").to_df()
    with gzip.open(tmp_path / "Q.CSV.GZ", "wt") as f:
        df.to_csv(f)
    with _text_open(tmp_path / "Q.CSV.GZ") as f:
        assert f.readline().rstrip("\r\n").split(",")[1:] == list(df.columns)
    blocks = CsvRowBlocks(tmp_path / "Q.CSV.GZ", orientation="cells_by_genes", rows=ROWS)
    assert len(blocks._dtypes) == df.shape[1]
    assert next(iter(blocks)).X.dtype == np.float32
