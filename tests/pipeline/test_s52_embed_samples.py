"""stage=embed's samples: cells without one are said, never put in a sample named "".

Audit s52 (bad input of stage=embed): an ``obs['sample']`` NaN became a sample ``""`` in
``samples.csv`` with no warning and the input's own column was rewritten NaN -> ``""``;
a samples CSV naming 30 of 40 cells put the other 10 in the file's sample at INFO only;
rows of the CSV that named no cell went unsaid; a CSV whose sample column is empty was
said to name none of the cells.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from pipeline.runner import StageError
from tests.helpers.run import embed_on_toy_study as _embed


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_study) -> Path:
    return toy_study(tmp_path_factory.mktemp("study"))


def _counts(study: Path, n: int, sample=None) -> ad.AnnData:
    paired = ad.read_h5ad(study / "paired.h5ad")
    has = np.asarray(paired.layers["counts"].sum(1)).ravel() > 0
    counts = np.asarray(paired.layers["counts"][np.flatnonzero(has)[:n]], np.float32)
    obs = pd.DataFrame(index=[f"q{i:03d}" for i in range(n)])
    if sample is not None:
        obs["sample"] = pd.Categorical(sample)
    return ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=paired.var_names))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_cell_without_a_sample_gets_the_inputs_name_and_a_warning(study, tmp_path, caplog):
    sample = [None] * 3 + ["pA"] * 5 + [""] * 2 + ["pB"] * 6
    a = _counts(study, 16, sample)
    a.write_h5ad(tmp_path / "nans.h5ad")
    with caplog.at_level(logging.WARNING):
        out = _embed(study, "nans", f"embed.expression={tmp_path / 'nans.h5ad'}")
    prof = pd.read_csv(out / "samples.csv", keep_default_na=False)
    assert "" not in set(prof["sample"])
    assert dict(zip(prof["sample"], prof["n_cells"])) == {"nans": 5, "pA": 5, "pB": 6}
    said = [w for w in _warnings(caplog) if "have no sample" in w]
    assert len(said) == 1, _warnings(caplog)
    assert "5 cell(s)" in said[0] and "q000, q001, q002" in said[0]
    assert "'nans'" in said[0] and "obs['sample']" in said[0]


def test_cells_a_samples_csv_leaves_out_and_rows_naming_no_cell_are_said(study, tmp_path, caplog):
    _counts(study, 12).write_h5ad(tmp_path / "plain.h5ad")
    rows = [("pA", f"q{i:03d}") for i in range(8)] + [("pB", "nothere1"), ("pB", "nothere2")]
    pd.DataFrame(rows, columns=["sample", "cell_id"]).to_csv(tmp_path / "s.csv", index=False)
    with caplog.at_level(logging.WARNING):
        out = _embed(
            study,
            "misscsv",
            f"embed.expression={tmp_path / 'plain.h5ad'}",
            f"embed.samples_csv={tmp_path / 's.csv'}",
        )
    prof = pd.read_csv(out / "samples.csv")
    assert dict(zip(prof["sample"], prof["n_cells"])) == {"pA": 8, "plain": 4}
    w = _warnings(caplog)
    left = [m for m in w if "have no sample" in m]
    assert len(left) == 1 and "4 cell(s)" in left[0] and "q008, q009, q010" in left[0], w
    assert "'plain'" in left[0] and "not named by embed.samples_csv" in left[0]
    unmatched = [m for m in w if "name no embedded cell" in m]
    assert len(unmatched) == 1 and "2 of its 10 rows" in unmatched[0], w
    assert "nothere1, nothere2" in unmatched[0]


def test_the_inputs_own_sample_column_stays_as_given_in_the_query(study, tmp_path):
    """NaN in the input's ``sample`` column stays NaN in ``query.h5ad`` (was ``""``: the
    expression reader turned the user's NaN into ``""``); ``vae_sample`` is the stage's."""
    a = _counts(study, 10, [None] * 4 + ["pA"] * 6)
    a.write_h5ad(tmp_path / "nans.h5ad")
    out = _embed(study, "asgiven", f"embed.expression={tmp_path / 'nans.h5ad'}")
    q = ad.read_h5ad(out / "query.h5ad")
    assert q.obs["sample"].isna().tolist() == [True] * 4 + [False] * 6
    assert list(q.obs["vae_sample"].astype(str)) == ["nans"] * 4 + ["pA"] * 6


def test_a_samples_csv_without_samples_is_refused_as_such(study, tmp_path, caplog):
    """Its sample column empty in every row: said (was "names none of the 40 cells",
    which it names all of); some rows empty: warned of and skipped; no row: refused."""
    _counts(study, 6).write_h5ad(tmp_path / "plain.h5ad")
    expr = f"embed.expression={tmp_path / 'plain.h5ad'}"
    ids = [f"q{i:03d}" for i in range(6)]
    pd.DataFrame({"sample": [""] * 6, "cell_id": ids}).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(StageError, match="'sample' column is empty in all 6 rows"):
        _embed(study, "emptys", expr, f"embed.samples_csv={tmp_path / 'e.csv'}")
    assert not (study / "out" / "emptys").exists()
    (tmp_path / "h.csv").write_text("sample,cell_id\n")
    with pytest.raises(StageError, match="no rows under its header"):
        _embed(study, "headonly", expr, f"embed.samples_csv={tmp_path / 'h.csv'}")
    half = pd.DataFrame({"sample": ["pA"] * 4 + ["", ""], "cell_id": ids})
    half.to_csv(tmp_path / "half.csv", index=False)
    with caplog.at_level(logging.WARNING):
        out = _embed(study, "halfs", expr, f"embed.samples_csv={tmp_path / 'half.csv'}")
    said = [r.getMessage() for r in caplog.records if "empty 'sample'" in r.getMessage()]
    assert len(said) == 1 and "2 of its 6 rows" in said[0] and "q004, q005" in said[0]
    prof = pd.read_csv(out / "samples.csv")
    assert dict(zip(prof["sample"], prof["n_cells"])) == {"pA": 4, "plain": 2}


def test_rows_naming_no_cell_are_counted_among_all_the_csvs_rows(study, tmp_path, caplog):
    """ "N of its M rows name no embedded cell": M is every row of the CSV; the rows with an
    empty sample, skipped before, were left out of M (1 of its 4 rows for a CSV of 6)."""
    _counts(study, 6).write_h5ad(tmp_path / "plain.h5ad")
    ids = ["q000", "q001", "q002", "nothere", "q004", "q005"]
    pd.DataFrame({"sample": ["pA"] * 3 + ["pB", "", ""], "cell_id": ids}).to_csv(
        tmp_path / "s.csv", index=False
    )
    with caplog.at_level(logging.WARNING):
        _embed(
            study,
            "rowsall",
            f"embed.expression={tmp_path / 'plain.h5ad'}",
            f"embed.samples_csv={tmp_path / 's.csv'}",
        )
    w = _warnings(caplog)
    unmatched = [m for m in w if "name no embedded cell" in m]
    assert (
        len(unmatched) == 1 and "1 of its 6 rows" in unmatched[0] and "nothere" in unmatched[0]
    ), w
    assert any("2 of its 6 rows have an empty 'sample'" in m for m in w), w


def test_a_whole_number_sample_is_named_alike_with_or_without_a_gap(tmp_path):
    """A patient id column with a missing value is read as float (7.0): stage=embed named
    the patient '7.0' there and '7' in a column without gaps, while sample_profile (and
    so Study.embed's tables) names it '7' (vae.analysis.samples.sample_names)."""
    from omegaconf import OmegaConf

    from pipeline.stages.embed import _samples

    cfg = OmegaConf.create({"embed": {"sample_key": "sample", "samples_csv": None}})
    path = tmp_path / "q.h5ad"
    gap = ad.AnnData(obs=pd.DataFrame({"sample": [7.0, np.nan, 8.0]}, index=list("abc")))
    full = ad.AnnData(obs=pd.DataFrame({"sample": [7, 8, 8]}, index=list("abc")))
    got, _, fallback, _ = _samples(gap, "h5ad", path, cfg, None, "embed.h5ad")
    assert list(got) == ["7", "q.h5ad", "8"] and list(fallback) == [False, True, False]
    assert list(_samples(full, "h5ad", path, cfg, None, "embed.h5ad")[0]) == ["7", "8", "8"]
