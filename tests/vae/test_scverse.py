"""Cell IDs as obs_names of latent.h5ad and X_vae written back into the user's AnnData."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from vae.scverse import add_latent, cell_obs_names


def test_cell_obs_names_prefer_expression_then_image_then_row_and_stay_unique():
    obs = pd.DataFrame(
        {
            "expression_ref": ["c1", "c1", "", "c2", "", "c1-1"],
            "image_ref": ["a", "b", "img7", "d", "", ""],
        },
        index=[f"r{i}" for i in range(6)],
    )
    names = list(cell_obs_names(obs))
    assert names == ["c1", "c1-2", "img7", "c2", "r4", "c1-1"]
    assert len(set(names)) == len(names)
    # no reference columns at all: the row IDs as they were
    assert list(cell_obs_names(pd.DataFrame(index=["r0", "r1"]))) == ["r0", "r1"]


def _latent():
    lat = ad.AnnData(
        obs=pd.DataFrame(
            {"expression_ref": ["c0", "c1", "c1", "", "c9"]},
            index=["c0", "c1", "c1-1", "img", "c9"],
        )
    )
    lat.obsm["X_vae"] = np.array([[0, 1], [2, 2], [4, 6], [9, 9], [7, 7]], np.float32)
    return lat


def test_add_latent_matches_by_cell_id_and_averages_repeated_cells(tmp_path):
    user = ad.AnnData(
        np.zeros((4, 3), np.float32), obs=pd.DataFrame(index=["c1", "cX", "c0", "c9"])
    )
    path = tmp_path / "latent.h5ad"
    _latent().write_h5ad(path)
    assert add_latent(user, path) == 3
    z = user.obsm["X_vae"]
    assert z.shape == (4, 2) and z.dtype == np.float32
    np.testing.assert_allclose(z[0], [3, 4])  # c1: mean of its two rows
    assert np.isnan(z[1]).all()  # cX: not in the latent table
    np.testing.assert_allclose(z[[2, 3]], [[0, 1], [7, 7]])


def test_add_latent_unknown_key_names_what_exists():
    user = ad.AnnData(np.zeros((1, 1), np.float32), obs=pd.DataFrame(index=["c0"]))
    with pytest.raises(KeyError, match="X_vae"):
        add_latent(user, _latent(), key="X_umap")
