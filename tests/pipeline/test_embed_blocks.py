"""stage=embed of an ``.h5ad`` expression file a block of rows at a time.

Read whole, a 300k cells x 20k genes file took 7.55 GiB (docs/embed.md, "Large
expression files"); it is now read and embedded a block of rows at a time, with the
results of the whole file read in memory: checked here with blocks of 7 rows on the toy
study (60 cells: 9 blocks, the last one short), for each layout of the counts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline.runner import StageError
from tests.helpers.run import run_stage_in_process

ROWS = 7  # 60 cells: 8 blocks of 7 and one of 4


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_study) -> Path:
    """outputs root of a trained tiny study: <root>/s/train/{model.pt,latent.h5ad}
    (this module's copy)."""
    return toy_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def loaded(study: Path):
    from vae.api import Study

    return Study.load(study / "out" / "s")


def _query(study: Path, layout: str) -> ad.AnnData:
    """The toy study's expression rows (60 cells, its 12 genes + 30 others) as ``layout``."""
    paired = ad.read_h5ad(study / "paired.h5ad")
    rng = np.random.default_rng(1)
    n = paired.n_obs
    extra = rng.poisson(0.7, (n, 30)).astype(np.float32)
    counts = np.concatenate([np.asarray(paired.layers["counts"], np.float32), extra], 1)
    genes = [*paired.var_names, *[f"X{i}" for i in range(30)]]
    obs = pd.DataFrame(
        {"donor": pd.Categorical(np.where(np.arange(n) % 3, "d1", "d2"))},
        index=[f"cell{i:03d}" for i in range(n)],
    )
    lognorm = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    var = pd.DataFrame(index=genes)
    if layout == "counts_in_x":
        return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    if layout == "counts_layer":  # the pipeline's layout: log-normalised X, counts beside
        a = ad.AnnData(X=lognorm.astype(np.float32), obs=obs, var=var)
        a.layers["counts"] = sp.csr_matrix(counts)
        return a
    if layout == "counts_in_raw":  # scanpy's: a few genes log-normalised in X, all in .raw
        a = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
        a.raw = a
        keep = genes[::2]
        b = a[:, keep].copy()
        b.X = sp.csr_matrix(lognorm[:, ::2].astype(np.float32))
        return b
    if layout == "counts_layer=umi":  # expression.counts_layer names a layer
        a = ad.AnnData(X=lognorm.astype(np.float32), obs=obs, var=var)
        a.layers["umi"] = sp.csr_matrix(counts)
        return a
    if layout == "counts_layer=.raw":  # ... or .raw: each cell's library over all of .raw
        a = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
        a.raw = a
        b = a[:, genes[:20]].copy()
        b.X = lognorm[:, :20].astype(np.float32)  # dense X beside a sparse .raw
        return b
    if layout == "missing_genes":  # 3 of the model's 12 genes absent: imputed from the cell
        drop = [1, 5, 9]
        keep = [i for i in range(len(genes)) if i not in drop]
        return ad.AnnData(
            X=sp.csr_matrix(counts[:, keep]), obs=obs, var=pd.DataFrame(index=np.take(genes, keep))
        )
    if layout == "lognorm_first_block_empty":
        # the first block holds no stored value: alone it reads as counts (an empty
        # matrix is whole), the file is log-normalised
        x = lognorm.astype(np.float32)
        x[:ROWS] = 0
        return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)
    raise ValueError(layout)


def _same(mem: ad.AnnData, blk: ad.AnnData) -> None:
    """The same query: names, codes and scores (to float rounding), calls exactly."""
    assert list(blk.obs_names) == list(mem.obs_names)
    assert set(blk.obsm) == set(mem.obsm)
    for k in mem.obsm:
        a, b = np.asarray(mem.obsm[k]), np.asarray(blk.obsm[k])
        assert np.array_equal(np.isnan(a), np.isnan(b)), k
        assert np.allclose(a, b, atol=1e-5, equal_nan=True), k
    assert list(blk.obs.columns) == list(mem.obs.columns)
    for c in mem.obs.columns:
        x, y = mem.obs[c].to_numpy(), blk.obs[c].to_numpy()
        if x.dtype.kind == "f":
            assert np.allclose(x, y, atol=1e-5, equal_nan=True), c
        else:
            assert (x.astype(str) == y.astype(str)).all(), c


@pytest.mark.parametrize(
    "layout",
    [
        "counts_in_x",
        "counts_layer",
        "counts_in_raw",
        "counts_layer=umi",
        "counts_layer=.raw",
        "missing_genes",
        "lognorm_first_block_empty",
    ],
)
def test_blocks_give_the_whole_files_result(study, loaded, tmp_path, layout, caplog):
    """``Study.embed`` of each block (``whole=`` the file) equals ``Study.embed`` of the
    file read whole, for each place the counts can be; the file's warnings once."""
    path = tmp_path / "q.h5ad"
    _query(study, layout).write_h5ad(path)
    layer = layout.split("=")[1] if "=" in layout else None
    mem = loaded.embed(loaded.read(path, "expression", counts_layer=layer), "q")
    blocks = loaded.read_blocks(path, counts_layer=layer, rows=ROWS)
    assert blocks is not None and blocks.n_obs == 60
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        parts = [loaded.embed(b, "q", whole=blocks) for b in blocks]
    assert [p.n_obs for p in parts][:2] == ([0, ROWS] if "empty" in layout else [ROWS, ROWS])
    blk = ad.concat([p for p in parts if p.n_obs], merge="first", uns_merge="first")
    _same(mem, blk)
    # the gene report (counts or lognorm, matched, missing) is the file's in every block
    assert {p.uns["genes"] for p in parts} == {mem.uns["genes"]}
    assert sum((p.uns["dropped"] for p in parts), []) == mem.uns["dropped"]
    if layout == "lognorm_first_block_empty":
        assert '"values": "lognorm"' in mem.uns["genes"]
        assert mem.uns["dropped"][:ROWS] == [f"cell{i:03d}" for i in range(ROWS)]
    if layout == "missing_genes":
        missing = [r for r in caplog.records if "genes missing" in r.getMessage()]
        assert len(missing) == 1  # said for the file, not for each of its 9 blocks


def test_stage_embeds_an_expression_file_by_blocks_with_the_in_memory_result(
    study, tmp_path, monkeypatch
):
    """stage=embed reads an .h5ad expression file a block of rows at a time: query.h5ad,
    summary.json and samples.csv as when the file is read whole (the reader before)."""
    import json

    import vae.inputs.expression_blocks
    from vae.api import Study

    path = tmp_path / "q.h5ad"
    _query(study, "counts_layer").write_h5ad(path)

    def run(exp: str) -> Path:
        return run_stage_in_process(
            [
                f"paths.root={study / 'out'}",
                f"experiment={exp}",
                f"embed.study={study / 'out' / 's'}",
                f"embed.expression={path}",
                "embed.sample_key=donor",
                "hardware.torch_threads=1",
            ],
            "embed",
        )

    monkeypatch.setattr(vae.inputs.expression_blocks, "EMBED_BLOCK_ROWS", ROWS)
    read = []
    real = Study.read_blocks
    monkeypatch.setattr(Study, "read_blocks", lambda *a, **k: read.append(1) or real(*a, **k))
    by_blocks = run("blocks")
    assert read == [1]
    monkeypatch.setattr(Study, "read_blocks", lambda *a, **k: None)  # read whole, as before
    whole = run("whole")
    _same(ad.read_h5ad(whole / "query.h5ad"), ad.read_h5ad(by_blocks / "query.h5ad"))
    sw, sb = (json.loads((d / "summary.json").read_text()) for d in (whole, by_blocks))
    for key in ("cells", "by_label", "by_call", "genes", "samples"):
        assert sb[key] == sw[key], key
    assert sb["cells"] == 60 and sb["samples"] == 2
    pd.testing.assert_frame_equal(
        pd.read_csv(whole / "samples.csv"), pd.read_csv(by_blocks / "samples.csv")
    )


def test_block_reading_keeps_the_clear_errors(study, loaded, tmp_path, monkeypatch):
    """A file without the study's genes, with too few of them, or with one cell id in two
    blocks: the errors of the whole-file reader, before any block is embedded."""
    import vae.inputs.expression_blocks

    monkeypatch.setattr(vae.inputs.expression_blocks, "EMBED_BLOCK_ROWS", ROWS)

    def embed(exp: str, path: Path):
        return run_stage_in_process(
            [
                f"paths.root={study / 'out'}",
                f"experiment={exp}",
                f"embed.study={study / 'out' / 's'}",
                f"embed.expression={path}",
                "hardware.torch_threads=1",
            ],
            "embed",
        )

    rng = np.random.default_rng(0)
    other = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(1.0, (20, 5)).astype(np.float32)),
        var=pd.DataFrame(index=["foo", "bar", "baz", "qux", "quux"]),
    )
    other.write_h5ad(tmp_path / "other.h5ad")
    assert loaded.read_blocks(tmp_path / "other.h5ad") is not None  # the block reader's error
    with pytest.raises(StageError, match=r"embed.expression=.*none of the model's 12 genes"):
        embed("nogenes", tmp_path / "other.h5ad")
    few = _query(study, "counts_in_x")[:, ["G0", "G1", "G2", "X0"]].copy()
    few.write_h5ad(tmp_path / "few.h5ad")
    with pytest.raises(StageError, match=r"match only 3 of the model's 12 genes"):
        embed("fewgenes", tmp_path / "few.h5ad")
    dup = _query(study, "counts_in_x")
    dup.obs_names = [*dup.obs_names[:-1], dup.obs_names[0]]  # first block and last
    dup.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.raises(StageError, match="duplicated cell ids"):
        embed("dupids", tmp_path / "dup.h5ad")
    for exp in ("nogenes", "fewgenes", "dupids"):
        assert not (study / "out" / exp / "embed" / "query.h5ad").exists()


def test_files_not_read_by_rows_are_read_whole(study, loaded, tmp_path):
    """A matrix stored by columns (CSC) and a file to transpose are read whole, as
    before (``Study.read_blocks`` says None); a CSV of cells as rows is read by blocks
    too (test_embed_large_inputs.py)."""
    a = _query(study, "counts_in_x")
    a.to_df().to_csv(tmp_path / "q.csv")
    assert loaded.read_blocks(tmp_path / "q.csv") is not None
    assert loaded.read_blocks(tmp_path / "q.csv", orientation="genes_by_cells") is None
    c = a.copy()
    c.X = sp.csc_matrix(c.X)
    c.write_h5ad(tmp_path / "csc.h5ad")
    assert loaded.read_blocks(tmp_path / "csc.h5ad") is None
    a.write_h5ad(tmp_path / "q.h5ad")
    assert loaded.read_blocks(tmp_path / "q.h5ad", orientation="genes_by_cells") is None
    assert loaded.read_blocks(tmp_path / "q.h5ad") is not None


def test_a_file_read_whole_that_cannot_fit_is_refused_with_what_to_do(study, tmp_path, monkeypatch):
    """A file read whole (here CSC, not readable by rows) larger than the memory
    available: a message naming the need and the fix, not an OOM kill."""
    import vae.study_read  # where Study.check_whole_read_fits reads the memory

    c = _query(study, "counts_in_x")
    c.X = sp.csc_matrix(c.X)
    c.write_h5ad(tmp_path / "csc.h5ad")
    monkeypatch.setattr(vae.study_read, "_available_memory", lambda: 10_000)  # 10 kB left
    with pytest.raises(StageError, match=r"csc.h5ad: read whole it takes at least .* CSR"):
        run_stage_in_process(
            [
                f"paths.root={study / 'out'}",
                "experiment=toolarge",
                f"embed.study={study / 'out' / 's'}",
                f"embed.expression={tmp_path / 'csc.h5ad'}",
                "hardware.torch_threads=1",
            ],
            "embed",
        )
    monkeypatch.setattr(vae.study_read, "_available_memory", lambda: 2**40)  # read as before
    from vae.api import Study

    q = Study.load(study / "out" / "s").read(tmp_path / "csc.h5ad", "expression")
    assert q.n_obs == 60


def _write_10x_h5(path: Path, a: ad.AnnData) -> None:
    """``a``'s counts as a Cell Ranger v3 ``.h5`` (int32, genes x cells CSC), with two
    antibody features that the reader leaves out (scanpy's ``gex_only``)."""
    import h5py

    x = sp.csr_matrix(a.X)
    ab = sp.csr_matrix(np.arange(2 * a.n_obs, dtype=np.float32).reshape(a.n_obs, 2) % 5)
    m = sp.hstack([x[:, :5], ab, x[:, 5:]], format="csr")  # antibodies among the genes
    names = [*a.var_names[:5], "CD3_TotalSeqB", "CD19_TotalSeqB", *a.var_names[5:]]
    kinds = ["Gene Expression"] * 5 + ["Antibody Capture"] * 2
    kinds += ["Gene Expression"] * (len(names) - 7)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(a.obs_names, dtype="S")
        g["data"] = m.data.astype(np.int32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array([m.shape[1], m.shape[0]], np.int32)
        ft = g.create_group("features")
        ft["name"] = np.array(names, dtype="S")
        ft["id"] = np.array([f"ENSG{i:05d}" for i in range(len(names))], dtype="S")
        ft["feature_type"] = np.array(kinds, dtype="S")
        ft["genome"] = np.array(["GRCh38"] * len(names), dtype="S")


def test_a_10x_h5_is_read_by_blocks_with_the_whole_files_result(study, loaded, tmp_path):
    """A Cell Ranger v3 .h5 (int32 counts, antibody features beside the genes): blocks of
    rows give ``scanpy.read_10x_h5``'s reading (Gene Expression features, float32)."""
    import scanpy as sc

    path = tmp_path / "filtered_feature_bc_matrix.h5"
    _write_10x_h5(path, _query(study, "counts_in_x"))
    whole = loaded.read(path, "expression")
    assert whole.n_vars == 42 and "CD3_TotalSeqB" not in whole.var_names
    blocks = loaded.read_blocks(path, rows=ROWS)
    assert blocks is not None and blocks.n_obs == 60
    first = next(iter(blocks))
    ref = sc.read_10x_h5(path)[:ROWS].copy()
    assert first.X.dtype == ref.X.dtype == np.float32
    assert (first.X != ref.X).nnz == 0 and list(first.var_names) == list(ref.var_names)
    pd.testing.assert_frame_equal(first.var, ref.var)
    mem = loaded.embed(whole, "q")
    blk = ad.concat([loaded.embed(b, "q", whole=blocks) for b in blocks], merge="first")
    _same(mem, blk)


def test_an_expression_file_read_by_blocks_warns_once_with_its_totals(
    study, tmp_path, monkeypatch, caplog
):
    """An .h5ad over EMBED_BLOCK_ROWS cells is embedded a block at a time: the warning of
    the cells the study holds gave the first block's count (132 of 8192 for 398 of the
    real chain's 20,000, summary.json's total); one line with the file's totals now."""
    import json

    import vae.inputs.expression_blocks

    a = _query(study, "counts_layer")
    a.obs_names = ad.read_h5ad(study / "paired.h5ad").obs_names  # the study's own ids
    a.obs_names = [*a.obs_names[:40], *[f"new{i}" for i in range(20)]]  # 20 new ones
    path = tmp_path / "q.h5ad"
    a.write_h5ad(path)
    monkeypatch.setattr(vae.inputs.expression_blocks, "EMBED_BLOCK_ROWS", ROWS)
    with caplog.at_level(logging.WARNING):
        d = run_stage_in_process(
            [
                f"paths.root={study / 'out'}",
                "experiment=seenblocks",
                f"embed.study={study / 'out' / 's'}",
                f"embed.expression={path}",
                "hardware.torch_threads=1",
            ],
            "embed",
        )
    summary = json.loads((d / "summary.json").read_text())
    n, seen = summary["cells"], summary["cells_from_expression_the_study_trained_on"]
    assert 0 < seen <= 40 < n
    said = [r.getMessage() for r in caplog.records if "cell ids of expression" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"embed.expression={path}: {seen} of the {n} ")
