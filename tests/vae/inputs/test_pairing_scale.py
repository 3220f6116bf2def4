"""stage=pair / stage=train with many genes: no dense all-rows x all-genes copies.

Audit (20k cells x 19,899 genes, pair=expression_only): pairing densified X and
counts three times each (9.7 GiB peak) and encode_dataset kept a 1.6 GB all-NaN
``expression_from_image`` for data without a single image. Also: paired.h5ad
dropped the expression table's own obs columns (donor, sample, ...).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from segmentation.io import blank_as_read, write_h5ad
from tests.helpers.vae_toy import make_paired, tiny_model
from vae.data import from_anndata
from vae.infer import encode_dataset
from vae.inputs import pairing
from vae.inputs.pairing import CropSet, expression_rows, make_pairs

torch.set_num_threads(1)
S = 8


def _expr(n: int = 40, g: int = 30, sparse: bool = True) -> ad.AnnData:
    """``n`` profiles, ``g`` genes (~80 % zeros), counts, user obs columns of every kind."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.3, (n, g)).astype(np.float32)
    x = np.log1p(counts)
    obs = pd.DataFrame(
        {
            "label": np.where(np.arange(n) % 2, "Neutrophils", "Monocytes"),
            "maturation": np.linspace(0, 1, n).astype(np.float32),
            "donor": pd.Categorical(rng.choice(["D1", "D2"], n)),
            "sample": pd.Categorical(rng.choice([3, 7], n)),  # numeric categories
            "user_score": rng.normal(size=n).astype(np.float32),
            "user_note": [f"n{i % 3}" for i in range(n)],
            "n_umi": rng.integers(0, 100, n).astype(np.int32),
            "flag": np.arange(n) % 3 == 0,
            "specimen": "user-specimen",  # a pipeline column name: prefixed
            "split": "theirs",  # a name latent.h5ad writes: prefixed
            "score_primary": np.arange(n, dtype=np.float32),
        },
        index=[f"c{i}" for i in range(n)],
    )
    mat = sp.csr_matrix if sparse else np.asarray
    a = ad.AnnData(X=mat(x), obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(g)]))
    a.layers["counts"] = mat(counts)
    a.uns["has_counts"] = True
    return a


def _crops(n: int = 6) -> CropSet:
    crops = np.zeros((n, S, S, 3), np.uint8)
    masks = np.zeros((n, S, S), bool)
    crops[:, 2:6, 2:6] = 50
    masks[:, 2:6, 2:6] = True
    obs = pd.DataFrame(
        {"label": ["neutrophil", "monocyte"] * (n // 2), "source": "toy"},
        index=[f"img{i}" for i in range(n)],
    )
    return CropSet(crops=crops, masks=masks, obs=obs)


def _dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def test_expression_rows_same_values_sparse_dense_and_blocked(monkeypatch):
    a = _expr()
    ei = np.array([3, -1, 0, 3, 39, -1, 7])
    want = np.zeros((len(ei), a.n_vars), np.float32)
    want[ei >= 0] = a.X.toarray()[ei[ei >= 0]]
    from_sparse = expression_rows(a.X, ei)
    assert sp.isspmatrix_csr(from_sparse) and from_sparse.dtype == np.float32
    np.testing.assert_array_equal(from_sparse.toarray(), want)
    small = expression_rows(a.X.toarray(), ei)  # dense and small: dense, as before
    assert isinstance(small, np.ndarray) and small.dtype == np.float32
    np.testing.assert_array_equal(small, want)
    # dense and large: CSR built a few rows at a time
    monkeypatch.setattr(pairing, "DENSE_MAX_VALUES", 10)
    monkeypatch.setattr(pairing, "_BLOCK_VALUES", 2 * a.n_vars)
    big = expression_rows(a.X.toarray(), ei)
    assert sp.isspmatrix_csr(big)
    np.testing.assert_array_equal(big.toarray(), want)
    none = expression_rows(a.X, np.full(4, -1))
    assert none.shape == (4, a.n_vars) and none.nnz == 0


@pytest.mark.parametrize("mode", ["by_label", "unpaired"])
def test_sparse_input_pairs_to_sparse_with_the_dense_inputs_values(mode):
    crops = _crops()
    lm = {"neutrophil": "Neutrophils", "monocyte": "Monocytes"}
    kw = dict(label_map=lm, draws_per_crop=2, seed=3)
    sparse = make_pairs(crops, _expr(sparse=True), mode, **kw).adata
    dense = make_pairs(crops, _expr(sparse=False), mode, **kw).adata
    assert sp.issparse(sparse.X) and sp.issparse(sparse.layers["counts"])
    assert isinstance(dense.X, np.ndarray)  # small dense input: dense table, as before
    np.testing.assert_array_equal(_dense(sparse.X), dense.X)
    np.testing.assert_array_equal(_dense(sparse.layers["counts"]), dense.layers["counts"])
    pd.testing.assert_frame_equal(sparse.obs, dense.obs)
    # every reader of paired.h5ad: the training tensors are the same
    t_s, t_d = from_anndata(sparse), from_anndata(dense)
    assert torch.equal(t_s.x, t_d.x) and torch.equal(t_s.counts, t_d.counts)
    assert torch.equal(t_s.library, t_d.library)


def test_expression_obs_columns_carried_with_their_dtypes(tmp_path):
    e = _expr()
    res = make_pairs(_crops(), e, "by_label", label_map={"neutrophil": "Neutrophils"})
    obs = res.adata.obs
    he = obs["has_expression"].to_numpy(bool)
    assert (~he).any() and he.any()  # image-only rows (monocyte crops) and profile rows
    pos = e.obs_names.get_indexer(obs["expression_ref"].where(he, e.obs_names[0]))
    for col in ("donor", "user_score", "user_note", "n_umi", "flag"):
        assert col in obs
    # clashes with the pipeline's own / latent.h5ad's names take the prefix
    assert obs["specimen"].eq("").all()  # the crops' specimen, not the user's
    assert (obs["expression_specimen"][he] == "user-specimen").all()
    assert (obs["expression_split"][he] == "theirs").all() and "split" not in obs
    np.testing.assert_array_equal(
        obs["expression_maturation"][he].to_numpy(), e.obs["maturation"].to_numpy()[pos[he]]
    )
    # already carried in the pipeline's own form: not repeated
    assert "expression_label" in obs and "expression_score_primary" not in obs
    # dtypes kept; rows without a profile "" / NaN / <NA>
    assert isinstance(obs["donor"].dtype, pd.CategoricalDtype)
    assert list(obs["donor"][~he].unique()) == [""]
    assert (obs["donor"][he].to_numpy() == e.obs["donor"].to_numpy()[pos[he]]).all()
    assert isinstance(obs["sample"].dtype, pd.CategoricalDtype)
    assert obs["sample"][~he].isna().all()
    assert obs["user_score"].dtype == np.float32 and obs["user_score"][~he].isna().all()
    np.testing.assert_array_equal(
        obs["user_score"][he].to_numpy(), e.obs["user_score"].to_numpy()[pos[he]]
    )
    assert (obs["user_note"][~he] == "").all()
    assert str(obs["n_umi"].dtype) == "Int32" and obs["n_umi"][~he].isna().all()
    assert str(obs["flag"].dtype) == "boolean" and obs["flag"][~he].isna().all()
    # every row with a profile: the plain dtype
    only = make_pairs(None, e, "unpaired").adata.obs
    assert only["n_umi"].dtype == np.int32 and only["flag"].dtype == bool
    # written and read back as the pipeline does
    write_h5ad(res.adata, tmp_path / "paired.h5ad", compression="gzip")
    back = blank_as_read(ad.read_h5ad(tmp_path / "paired.h5ad"))
    assert list(back.obs["donor"][~he].unique()) == [""]
    assert back.obs["n_umi"][~he].isna().all() and back.obs["user_score"][~he].isna().all()
    assert sp.issparse(back.X)
    np.testing.assert_array_equal(back.X.toarray(), res.adata.X.toarray())


def test_expression_from_image_takes_no_memory_without_image_rows():
    d = from_anndata(make_paired(0, expression_only=20))
    lat = encode_dataset(tiny_model(12), d, batch_size=8)
    x = lat.expression_from_image
    assert x.shape == (20, 12) and np.isnan(x).all()
    assert x.strides == (0, 0)  # a view of one NaN, not an (N, G) array
    assert np.isnan(x[np.array([1, 5])]).all()  # row selections as the targets take them


def test_expression_from_image_unchanged_with_mixed_rows():
    d = from_anndata(make_paired(10, image_only=4, expression_only=6))
    model = tiny_model(12)
    lat = encode_dataset(model, d, batch_size=7)
    hi = d.has_image.numpy()
    x = lat.expression_from_image
    assert x.shape == (20, 12) and x.flags.writeable
    assert np.isnan(x[~hi]).all() and np.isfinite(x[hi]).all()
    # the same values as decoding each image mean on its own
    dec = encode_dataset(model, d, batch_size=7, decode=True).decoded
    np.testing.assert_allclose(x[hi], dec.expr_from_image[hi], atol=1e-5)
    # a subset of rows without images: no array either
    sub = encode_dataset(model, d, rows=np.flatnonzero(~hi), batch_size=7)
    assert sub.expression_from_image.strides == (0, 0)
