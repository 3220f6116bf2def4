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
