"""Issue 11.8: a transposed table or non-integer "counts" are never silently accepted."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from vae.inputs.expression import ExpressionInputError, detect_orientation, read_expression
from vae.inputs.schema import GRANULE_PROGRAMS

PROGRAM_GENES = list(dict.fromkeys(g for gs in GRANULE_PROGRAMS.values() for g in gs))


def _genes_by_cells(n_genes: int = 240, n_cells: int = 31) -> pd.DataFrame:
    """The failing case of the issue: 240 genes (the program genes among noise genes) as rows."""
    rng = np.random.default_rng(0)
    genes = (PROGRAM_GENES + [f"noise{i}" for i in range(n_genes)])[:n_genes]
    cells = [f"cell{i}" for i in range(n_cells)]
    return pd.DataFrame(rng.poisson(2, (n_genes, n_cells)), index=genes, columns=cells)


def test_genes_by_cells_csv_is_detected_and_logged(tmp_path, caplog):
    df = _genes_by_cells()
    df.to_csv(tmp_path / "g.csv")
    with caplog.at_level(logging.INFO):
        a = read_expression(tmp_path / "g.csv")
    assert a.shape == (31, 240)
    assert list(a.var_names[:3]) == list(df.index[:3])
    n_known = sum(g in PROGRAM_GENES for g in df.index)
    assert n_known == len(PROGRAM_GENES) > 0
    assert "read as genes_by_cells" in caplog.text
    assert f"{n_known} of 240 row names and 0 of 31 column names" in caplog.text
    df.T.to_csv(tmp_path / "c.csv")
    assert read_expression(tmp_path / "c.csv").shape == (31, 240)


def test_barcodes_decide_when_no_symbol_matches():
    rows = ["AAACCTGAGAAACCAT-1", "AAACCTGAGAAACCGC-1", "AAACCTGCACGGTAGA-1"]
    assert detect_orientation(rows, ["g1", "g2"], PROGRAM_GENES)[0] == "cells_by_genes"
    assert detect_orientation(["g1", "g2"], rows, PROGRAM_GENES)[0] == "genes_by_cells"


def test_undecidable_orientation_asks_for_the_setting(tmp_path):
    pd.DataFrame(np.ones((4, 3)), index=list("abcd"), columns=list("xyz")).to_csv(
        tmp_path / "u.csv"
    )
    with pytest.raises(ExpressionInputError) as e:
        read_expression(tmp_path / "u.csv")
    assert e.value.field == "expression.orientation" and "u.csv" in str(e.value)
    # an explicit setting is obeyed
    assert read_expression(tmp_path / "u.csv", orientation="genes_by_cells").shape == (3, 4)


def test_non_integer_counts_need_an_explicit_setting(tmp_path):
    from vae.inputs.expression import validate_matrix

    a = read_expression_from(_genes_by_cells().T.astype(float) + 0.5, tmp_path)
    with pytest.raises(ExpressionInputError) as e:
        validate_matrix(a, values="auto")
    assert e.value.field == "expression.values" and "values=lognorm" in str(e.value)
    assert validate_matrix(a, values="lognorm") is False


def read_expression_from(df: pd.DataFrame, tmp_path):
    df.to_csv(tmp_path / "m.csv")
    return read_expression(tmp_path / "m.csv", orientation="cells_by_genes")
