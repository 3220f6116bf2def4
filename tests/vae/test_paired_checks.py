"""Input checks of paired.h5ad as stage=train reads it (vae.data.from_anndata; audit B).

A few unusable profiles (NaN / inf in X or the counts, a negative count) are skipped and
reported, a table broken throughout refused; modality flags read strictly (the text
"False" and NaN were True); a table without rows refused by name; a table without
``obs['label']`` warned of.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from tests.helpers.vae_toy import make_paired
from vae.data import (
    BAD_PROFILES_MAX_SHARE,
    PairedDataError,
    from_anndata,
    parse_flag,
    stratified_split,
)


def _read(a, sparse: bool, **kw):
    """``from_anndata`` in memory, or as the streamed reader calls it (CSR, crops given)."""
    if not sparse:
        return from_anndata(a, "x.h5ad", **kw)
    a.X = sp.csr_matrix(a.X)
    a.layers["counts"] = sp.csr_matrix(a.layers["counts"])
    n, s = a.n_obs, a.obsm["crops"].shape[1]
    crops = torch.zeros(n, 3, s, s, dtype=torch.uint8)
    masks = torch.zeros(n, 1, s, s, dtype=torch.uint8)
    return from_anndata(a, "x.h5ad", crops=crops, masks=masks, sparse=True, **kw)


def _dense(t) -> np.ndarray:
    rows = torch.arange(t.shape[0])
    return t.index_select(0, rows).numpy()  # a tensor or SparseRows alike


# 1: a few bad profiles skipped, rows kept -------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_a_few_unusable_profiles_are_skipped_and_named(sparse, caplog):
    a = make_paired(40)
    a.layers["counts"][1, 2] = np.nan
    a.X[2, 0] = np.inf
    a.layers["counts"][3, 4] = -4
    x_before = np.asarray(a.X).copy()
    with caplog.at_level(logging.WARNING, logger="vae.data"):
        d = _read(a, sparse)
    bad = [1, 2, 3]
    assert d.n == 40 and d.obs_names == list(a.obs_names)  # rows stay: split / latent join
    he = d.has_expression.numpy()
    assert not he[bad].any() and he[[0, 4, 39]].all() and int(he.sum()) == 37
    assert d.has_image.numpy()[bad].all()  # the crop is kept
    x, c = _dense(d.x), _dense(d.counts)
    assert np.isfinite(x).all() and np.isfinite(c).all() and (c >= 0).all()
    assert not x[bad].any() and not c[bad].any()
    assert (d.library.numpy()[bad] == 1).all() and np.isfinite(d.norm_total)
    # the table read: its flags say the same (latent.h5ad copies this obs)
    assert not a.obs["has_expression"].to_numpy()[bad].any()
    assert a.obs["has_expression"].dtype == bool
    if not sparse:  # the AnnData's own values are not changed
        assert np.array_equal(np.asarray(a.X), x_before)
    msg = caplog.text
    assert "x.h5ad: 3 of 40 expression profiles skipped" in msg
    assert "'c001', 'c002', 'c003'" in msg
    assert "X holds non-finite values in 1" in msg
    assert "layers['counts'] holds non-finite values in 1" in msg
    assert "layers['counts'] holds negative values in 1" in msg


@pytest.mark.parametrize("sparse", [False, True])
def test_a_table_mostly_unusable_is_refused_naming_cells(sparse):
    a = make_paired(12)
    a.layers["counts"][:7, 0] = -1  # scaled values, not counts
    with pytest.raises(PairedDataError) as e:
        _read(a, sparse)
    msg = str(e.value)
    assert msg.startswith("x.h5ad: 7 of 12 expression profiles are unusable")
    assert "layers['counts'] holds negative values in 7" in msg
    assert "'c000', 'c001', 'c002', 'c003', 'c004', ..." in msg
    assert f"more than {BAD_PROFILES_MAX_SHARE:.0%}" in msg and "stage=pair" in msg


def test_bad_values_on_a_row_without_a_profile_are_zeroed_silently(caplog):
    a = make_paired(30, image_only=2)
    a.X[30, 0] = np.nan  # an image-only row: no profile to skip
    with caplog.at_level(logging.WARNING, logger="vae.data"):
        d = from_anndata(a, "x.h5ad")
    assert "skipped" not in caplog.text
    assert int(d.has_expression.sum()) == 30
    assert np.isfinite(d.x.numpy()).all() and not d.x.numpy()[30].any()


# 2: modality flags read strictly ---------------------------------------------------
@pytest.mark.parametrize(
    "values",
    [
        np.array([True, False, True]),
        np.array([1, 0, 1]),
        np.array([1.0, 0.0, 1.0]),
        np.array(["True", "False", "true"], dtype=object),
        np.array([" YES", "no", "1"], dtype=object),
        pd.Categorical(["TRUE", "0", "True"]),
        pd.array([True, False, True], dtype="boolean"),
    ],
)
def test_flags_read_as_true_and_false(values):
    assert parse_flag(values, "x.h5ad", "has_image").tolist() == [True, False, True]


@pytest.mark.parametrize(
    "values, shown",
    [
        (np.array(["True", np.nan, "False"], dtype=object), "row 'c1' = nan"),
        (np.array(["True", "False", "maybe"], dtype=object), "row 'c2' = 'maybe'"),
        (np.array([1, 2, 0]), "row 'c1' = 2"),
        (np.array([1.0, np.nan, 0.0]), "row 'c1' = nan"),
        (pd.array([True, None, False], dtype="boolean"), "row 'c1' = <NA>"),
    ],
)
def test_anything_else_in_a_flag_is_refused_naming_file_column_value(values, shown):
    with pytest.raises(PairedDataError) as e:
        parse_flag(values, "x.h5ad", "has_image", names=["c0", "c1", "c2"])
    msg = str(e.value)
    assert msg.startswith("x.h5ad: obs['has_image'] must be true or false")
    assert "1 of 3 rows" in msg and shown in msg


def test_flags_stored_as_text_are_not_all_true():
    """Audit: has_image written as "True"/"False" gave every row a crop (222 without)."""
    a = make_paired(10, expression_only=4)
    a.obs["has_image"] = a.obs["has_image"].astype(str)
    d = from_anndata(a, "x.h5ad")
    assert d.has_image.numpy().tolist() == [True] * 10 + [False] * 4
    assert a.obs["has_image"].dtype == bool  # latent.h5ad gets the flags as read
    a.obs["has_expression"] = np.where(np.arange(14) == 3, np.nan, 1.0)
    with pytest.raises(PairedDataError, match=r"obs\['has_expression'\].*row 'c003' = nan"):
        from_anndata(a, "x.h5ad")


def _as_text(obs: pd.DataFrame) -> pd.DataFrame:
    """``obs`` with its modality flags written as the text "True" / "False"."""
    out = obs.copy()
    for col in ("has_image", "has_expression"):
        out[col] = out[col].map({True: "True", False: "False"}).astype(object)
    return out


def test_text_flags_read_as_the_bool_flags_outside_from_anndata(tmp_path):
    """The flags read with ``astype(bool)`` beside from_anndata: "False" was True (a
    table of profiles alone built a crop store of blank crops; the auto settings saw
    crops on every row; a reused split gave crop-less rows their profile's crop split)."""
    from pipeline.guards import data_layout
    from vae.analysis.evaluate import seen_profiles
    from vae.analysis.study import trained_modalities
    from vae.data import match_split
    from vae.store import ZeroRows, paired_streamed

    a = make_paired(12, image_only=3, expression_only=5)
    text = _as_text(a.obs)
    assert (text["has_image"] == "False").sum() == 5  # what astype(bool) read as True
    # the auto settings' stand-in for the data (pipeline.guards)
    for read in (data_layout(a.obs, 12, True), data_layout(text, 12, True)):
        assert read.has_image.tolist() == a.obs["has_image"].tolist()
        assert read.has_expression.tolist() == a.obs["has_expression"].tolist()
    # a table of profiles alone, streamed (vae.store): no crop store of blank crops
    for kind, obs in (("bool", None), ("text", "text")):
        e = make_paired(0, expression_only=8)
        if obs == "text":
            e.obs = _as_text(e.obs)
        p = tmp_path / f"{kind}.h5ad"
        e.write_h5ad(p)
        st, _ = paired_streamed(p, tmp_path / f"{kind}.zarr")
        assert isinstance(st.crops, ZeroRows) and not (tmp_path / f"{kind}.zarr").exists()
        assert not st.has_image.any()
    # a split reused from another run (vae.data.match_split), both tables as text
    obs = a.obs.assign(
        image_ref=[f"crop{i}" for i in range(a.n_obs)],
        expression_ref=[f"prof{i}" for i in range(a.n_obs)],
    )
    ref = obs.assign(split=np.array(["train", "val", "test"])[np.arange(a.n_obs) % 3])
    ref["image_ref"] = ref["image_ref"].where(ref["has_image"], "crop0")  # no crop: any
    want = match_split(obs, ref)
    assert match_split(_as_text(obs), _as_text(ref)).tolist() == want.tolist()
    assert want.tolist() == ref["split"].tolist()
    # the run's latent table as evaluate reads it (vae.analysis)
    import anndata as ad

    seen = ref.copy()
    seen.loc[seen.index[13], "expression_ref"] = "prof0"  # a row without a profile
    lat_bool = ad.AnnData(obs=seen)
    lat_text = ad.AnnData(obs=_as_text(seen))
    img_only = ad.AnnData(obs=ref.assign(has_expression=False))
    assert trained_modalities(lat_text) == trained_modalities(lat_bool) == (True, True)
    assert trained_modalities(ad.AnnData(obs=_as_text(img_only.obs))) == (True, False)
    rows = np.arange(0, a.n_obs, 2)
    assert not seen["has_expression"].iloc[13]
    assert not seen_profiles(lat_text, rows).any() and not seen_profiles(lat_bool, rows).any()
    # and what is no flag is refused by name, not read as True
    bad = text.copy()
    bad.loc[bad.index[2], "has_image"] = "maybe"
    with pytest.raises(PairedDataError, match=r"obs\['has_image'\].*row 'c002' = 'maybe'"):
        match_split(bad.assign(image_ref="x", expression_ref="y"), ref, "paired.h5ad")


# 3: no rows ------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_a_table_without_rows_is_refused_by_name(sparse):
    a = make_paired(4)[:0].copy()
    with pytest.raises(PairedDataError, match=r"^x\.h5ad: has no rows"):
        _read(a, sparse)
    # the split itself of nothing: nothing (it raised an argmax error with groups)
    empty = np.array([], dtype=np.int64)
    assert stratified_split(empty, 0.1, 0.1, 0, groups=np.array([], dtype=object)).size == 0


# 4: no labels ----------------------------------------------------------------------
def test_a_paired_table_without_labels_is_warned_of(caplog):
    a = make_paired(6)
    del a.obs["label"]
    with caplog.at_level(logging.WARNING, logger="vae.data"):
        d = from_anndata(a, "x.h5ad")
    assert d.label_names == ["NA"]
    assert "x.h5ad: obs['label'] is missing" in caplog.text
    assert "expression.label_key" in caplog.text
    caplog.clear()
    a = make_paired(6)
    a.obs["label"] = np.nan
    with caplog.at_level(logging.WARNING, logger="vae.data"):
        from_anndata(a, "x.h5ad")
    assert "obs['label'] names no class" in caplog.text


def test_a_query_without_labels_is_not_warned_of(caplog):
    """A table not written by stage=pair (no pair_mode / uns['pair']: a query that
    vae.api.Study.prepare builds) has no labels to expect."""
    a = make_paired(6)
    del a.obs["label"], a.obs["pair_mode"]
    with caplog.at_level(logging.WARNING, logger="vae.data"):
        from_anndata(a, "query")
        assert "label" not in caplog.text
        from_anndata(a, "query", expect_labels=True)
        assert "obs['label'] is missing" in caplog.text
