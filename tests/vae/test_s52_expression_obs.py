"""read_expression keeps a user's obs as stored; a cell with no label is counted.

Audit s52: ``read_expression`` turned every NaN of an ``.h5ad``'s string columns into
``""`` (``blank_as_read``), so ``stage=expression`` never gave its "N of M cells have no
label" warning for NaN labels, and ``stage=embed`` rewrote the input's own columns.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd

from vae.inputs.expression import H5adRowBlocks, PreprocessParams, _assign_label, read_expression


def _h5ad(path, labels):
    n = len(labels)
    rng = np.random.default_rng(0)
    a = ad.AnnData(
        X=rng.poisson(2, (n, 5)).astype(np.float32),
        obs=pd.DataFrame({"celltype": pd.Categorical(labels)}, index=[f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(5)]),
    )
    a.write_h5ad(path)
    return path


def test_nan_in_an_h5ads_obs_stays_nan(tmp_path):
    p = _h5ad(tmp_path / "a.h5ad", ["B", None, "B", "T", None, "T"])
    a = read_expression(p, orientation="cells_by_genes")
    assert a.obs["celltype"].isna().tolist() == [False, True, False, False, True, False]
    blocks = H5adRowBlocks(p, orientation="cells_by_genes", rows=4)
    assert blocks.obs["celltype"].isna().sum() == 2


def test_cells_with_a_nan_or_empty_label_are_counted_and_warned_of(tmp_path, caplog):
    p = _h5ad(tmp_path / "a.h5ad", ["B", None, "B", "T", None, "", "T", "T"])
    a = read_expression(p, orientation="cells_by_genes")
    with caplog.at_level(logging.WARNING, logger="vae.inputs.expression"):
        _assign_label(a, PreprocessParams(label_key="celltype"), str(p))
    said = [r.getMessage() for r in caplog.records if "have no label" in r.getMessage()]
    assert len(said) == 1 and "3 of 8 cells" in said[0], said
    assert list(a.obs["label"]) == ["B", "", "B", "T", "", "", "T", "T"]


def test_genes_by_cells_keeps_the_cells_nan_as_stored(tmp_path):
    """With orientation=genes_by_cells the stored var is the cells: it was cleaned
    (NaN -> "") before the transpose, so a cell's NaN sample read back "" (review of
    a9ec74f); only the genes' table (stored obs) is read as the pipeline's own files."""
    rng = np.random.default_rng(0)
    a = ad.AnnData(
        X=rng.poisson(2, (5, 4)).astype(np.float32),
        obs=pd.DataFrame(
            {"gsym": pd.Categorical(["A", None, "B", "C", "D"])},
            index=[f"G{i}" for i in range(5)],
        ),
        var=pd.DataFrame(
            {"sample": pd.Categorical(["p1", None, "p2", "p2"])},
            index=[f"c{i}" for i in range(4)],
        ),
    )
    a.write_h5ad(tmp_path / "t.h5ad")
    r = read_expression(tmp_path / "t.h5ad", orientation="genes_by_cells")
    assert list(r.obs_names) == ["c0", "c1", "c2", "c3"]
    assert r.obs["sample"].isna().tolist() == [False, True, False, False]
    assert list(r.var["gsym"]) == ["A", "", "B", "C", "D"]  # the genes' table, as before
    c = read_expression(tmp_path / "t.h5ad", orientation="cells_by_genes")
    assert list(c.var["sample"]) == ["p1", "", "p2", "p2"]  # var is the genes here
    b = H5adRowBlocks(tmp_path / "t.h5ad", orientation="cells_by_genes", rows=2)
    assert list(b.var["sample"]) == ["p1", "", "p2", "p2"]
