"""stage=expression at single-cell scale: the kNN graph from 8192 cells on, sparse X.

- From :data:`vae.inputs.neighbors.EXACT_MAX_CELLS` cells, scanpy 1.11 builds the kNN
  graph with pynndescent and then calls ``getnnz`` on its ``csr_array`` (gone in scipy
  1.17): every kNN graph of 8192 cells or more stopped with an AttributeError.
- A large sparse input stays sparse (``PreprocessParams.dense_max_bytes``); lowered to 0
  here, the sparse path runs on small data and is compared with the dense one.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from vae.inputs.expression import PreprocessParams, preprocess
from vae.inputs.neighbors import EXACT_MAX_CELLS, knn_graph

N_LARGE = 9000  # just above scanpy's exact-kNN limit (8192)


def _blobs(n: int, d: int = 4, seed: int = 0) -> np.ndarray:
    """(n, d) float32: three well-separated Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centre = rng.integers(0, 3, n)[:, None] * 6.0
    return (centre + rng.normal(size=(n, d))).astype(np.float32)


def _counts(n: int, g: int, seed: int = 0, density: float = 0.3) -> ad.AnnData:
    """(n, g) sparse integer counts in two cell types with different gene profiles."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n)
    rate = rng.gamma(1.0, 2.0, (2, g))
    x = rng.poisson(rate[kind]) * (rng.random((n, g)) < density)
    x[:, :2] += 3 * kind[:, None]  # the program genes mark type 1
    genes = ["MPO", "ELANE"] + [f"G{i}" for i in range(g - 2)]
    obs = pd.DataFrame({"celltype": np.where(kind, "B", "A")}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(X=sp.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes))


def _params(**kw) -> PreprocessParams:
    base = dict(
        programs={"primary": ["MPO", "ELANE"]},
        umap=False,
        maturation="none",
        n_pcs=5,
        score_ctrl_size=10,
        score_n_bins=5,
        n_top_genes=40,
        label_key="celltype",
        min_counts=1,
    )
    base.update(kw)
    return PreprocessParams(**base)


def _dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.asarray(m)


# --- kNN graph ------------------------------------------------------------------


def test_knn_graph_above_8192_cells_is_built_and_clusters():
    """Before: sc.pp.neighbors raised AttributeError ('csr_array' ... 'getnnz') here."""
    import scanpy as sc

    assert N_LARGE >= EXACT_MAX_CELLS
    a = ad.AnnData(np.zeros((N_LARGE, 1), np.float32))
    a.obsm["X_lat"] = _blobs(N_LARGE)
    knn_graph(a, n_neighbors=15, use_rep="X_lat", random_state=0)
    d = a.obsp["distances"]
    assert d.shape == (N_LARGE, N_LARGE) and sp.issparse(d)
    assert d.getnnz(axis=1).min() >= 14  # every cell has its neighbours (self excluded)
    sc.tl.leiden(a, random_state=0, flavor="igraph", n_iterations=2, directed=False)
    assert a.obs["leiden"].nunique() >= 3


def test_knn_graph_below_the_limit_is_scanpys_exact_graph():
    import scanpy as sc

    z = _blobs(500)
    a, b = (ad.AnnData(np.zeros((500, 1), np.float32)) for _ in range(2))
    a.obsm["X_lat"] = b.obsm["X_lat"] = z
    knn_graph(a, n_neighbors=15, use_rep="X_lat", random_state=0)
    sc.pp.neighbors(b, n_neighbors=15, use_rep="X_lat", random_state=0)
    for key in ("distances", "connectivities"):
        assert (a.obsp[key] != b.obsp[key]).nnz == 0


def test_preprocess_and_leiden_agreement_at_9000_cells():
    """stage=expression's graph (Leiden labels: no label column) and the evaluation's
    Leiden agreement at 9000 cells; both stopped with the AttributeError before."""
    from vae.analysis.metrics import leiden_agreement

    adata = _counts(N_LARGE, 30, density=0.5)
    kinds = adata.obs.pop("celltype").to_numpy()
    out = preprocess(adata, _params(label_key=None, n_top_genes=None, n_pcs=4)).adata
    assert out.uns["label_key"] == "leiden"
    assert out.obs["label"].str.startswith("cluster_").all()
    n = out.n_obs  # cells without counts dropped (min_counts=1)
    assert n >= EXACT_MAX_CELLS and out.obsp["distances"].shape == (n, n)
    kinds = pd.Series(kinds, index=adata.obs_names)[out.obs_names].to_numpy()
    res = leiden_agreement(np.asarray(out.obsm["X_pca"]), kinds, seed=0)
    assert res.n_clusters >= 2 and len(res.clusters) == n


# --- sparse X ---------------------------------------------------------------------


@pytest.mark.parametrize("scale", [False, True])
def test_sparse_path_matches_the_dense_path(scale):
    a = _counts(400, 200)
    dense = preprocess(a, _params(scale=scale)).adata
    sparse = preprocess(a, _params(scale=scale, dense_max_bytes=0)).adata
    assert isinstance(dense.X, np.ndarray)
    assert sp.isspmatrix_csr(sparse.X) and sparse.X.dtype == np.float32
    assert list(sparse.obs_names) == list(dense.obs_names)
    assert list(sparse.var_names) == list(dense.var_names)
    np.testing.assert_allclose(sparse.X.toarray(), dense.X, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(_dense(sparse.layers["counts"]), _dense(dense.layers["counts"]))
    np.testing.assert_array_equal(sparse.var["highly_variable"], dense.var["highly_variable"])
    for col in ("means", "dispersions", "dispersions_norm"):  # the block-wise HVG: scanpy's
        assert sparse.var[col].dtype == dense.var[col].dtype, col
        np.testing.assert_allclose(sparse.var[col], dense.var[col], rtol=1e-5, equal_nan=True)
    assert sparse.uns["hvg"] == dense.uns["hvg"] == {"flavor": "seurat"}
    np.testing.assert_allclose(sparse.obs["score_primary"], dense.obs["score_primary"], atol=1e-5)
    if not scale:  # the same PCA of all genes: equal up to each component's sign
        ps, pd_ = np.asarray(sparse.obsm["X_pca"]), np.asarray(dense.obsm["X_pca"])
        sign = np.sign((ps * pd_).sum(0))
        np.testing.assert_allclose(ps * sign, pd_, atol=1e-3 * np.abs(pd_).max())
        np.testing.assert_allclose(
            sparse.uns["pca"]["variance_ratio"], dense.uns["pca"]["variance_ratio"], rtol=1e-4
        )
    else:  # scaled PCA of HVG + genes of interest only; the other genes load 0
        sel = (sparse.var["highly_variable"] | sparse.var["gene_of_interest"]).to_numpy()
        assert sparse.varm["PCs"].shape == (sparse.n_vars, 5)
        assert not sparse.varm["PCs"][~sel].any() and sparse.varm["PCs"][sel].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_seurat_hvg_by_row_blocks_is_scanpys(monkeypatch, dtype):
    """The block-wise seurat selection (no whole-matrix expm1 copy) flags the genes
    scanpy flags, with its means and dispersions, over blocks of 7 rows, unexpressed
    genes, a bin of one gene and more genes asked for than there are."""
    import scanpy as sc

    from vae.inputs import expression, expression_qc

    monkeypatch.setattr(expression_qc, "ROW_BLOCK", 7)  # where seurat_hvg_sparse reads it
    rng = np.random.default_rng(3)
    for n, g, top in [(60, 50, 10), (95, 120, 33), (40, 30, 200)]:
        m = sp.random(n, g, density=0.3, random_state=rng, format="csr", dtype=np.float64)
        m.data = np.log1p(rng.gamma(1.0, 2.0, m.nnz) * 10)
        d = m.toarray() * (np.arange(g) >= 2)  # genes 0, 1 unexpressed
        d[:, -1] = 8.0 + rng.uniform(0, 1, n)  # a lone high mean: a bin of one gene
        x = sp.csr_matrix(d, dtype=dtype)
        ref = ad.AnnData(X=x.copy())
        ref.uns["log1p"] = {"base": None}
        sc.pp.highly_variable_genes(ref, n_top_genes=top, flavor="seurat")
        got = expression.seurat_hvg_sparse(x, top)
        np.testing.assert_array_equal(got["highly_variable"], ref.var["highly_variable"])
        assert got["highly_variable"].sum() == min(top, g - 2)
        for col in ("means", "dispersions", "dispersions_norm"):
            np.testing.assert_allclose(got[col], ref.var[col], rtol=1e-6, equal_nan=True)


def _uncanonical(x: sp.csr_matrix) -> sp.csr_matrix:
    """The same matrix with every value >= 2 stored as two entries (floor(v/2), the rest)."""
    m = x.tocoo()
    big = m.data >= 2
    half = np.floor(m.data[big] / 2)
    data = np.concatenate([m.data - np.where(big, np.floor(m.data / 2), 0), half])
    rows = np.concatenate([m.row, m.row[big]])
    cols = np.concatenate([m.col, m.col[big]])
    order = np.argsort(rows, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=x.shape[0]))])
    out = sp.csr_matrix((data[order].astype(x.dtype), cols[order], indptr), shape=x.shape)
    assert out.nnz > x.nnz and not out.has_canonical_format
    return out


@pytest.mark.parametrize("dense_max_bytes", [0, None])
def test_a_csr_with_duplicate_entries_is_read_as_its_sums(dense_max_bytes):
    """A CSR that stores one count as two entries (another tool's file, not summed) is
    the same matrix: review found log1p applied per stored entry (log1p(a) + log1p(b))
    and the block-wise HVG sums differing from scanpy's by up to 8 in dispersion."""
    a = _counts(300, 120)
    kw = {} if dense_max_bytes is None else {"dense_max_bytes": dense_max_bytes}
    ref = preprocess(a, _params(**kw)).adata
    b = a.copy()
    b.X = _uncanonical(a.X)
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())
    got = preprocess(b, _params(**kw)).adata
    np.testing.assert_allclose(_dense(got.X), _dense(ref.X), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got.var["highly_variable"], ref.var["highly_variable"])
    np.testing.assert_array_equal(_dense(got.layers["counts"]), _dense(ref.layers["counts"]))


def test_the_unfiltered_matrix_is_released_after_the_gene_filter(monkeypatch):
    """copy=False: once the gene filter has copied the kept genes, the input's matrix is
    no longer held (a local name kept it to the end of preprocess: 1.6 GB more from QC
    to the file write at 100k cells x 20k genes)."""
    import gc
    import weakref

    from vae.inputs import expression

    a = _counts(300, 120)
    x = a.X.tolil()
    x[:, 7] = 0  # a gene in no cell: min_cells drops it, so the filter copies
    a.X = x.tocsr()
    ref = weakref.ref(a.X)
    alive = []
    real = expression.seurat_hvg_sparse

    def spy(m, *args, **kw):
        gc.collect()
        alive.append(ref() is not None)
        return real(m, *args, **kw)

    monkeypatch.setattr(expression, "seurat_hvg_sparse", spy)
    out = preprocess(a, _params(dense_max_bytes=0, min_cells=1), copy=False).adata
    assert out.n_vars == 119
    assert alive == [False]


def test_sparse_path_keeps_counts_bit_for_bit_and_the_input_unchanged(tmp_path):
    a = _counts(300, 120)
    a.X[:5] = 0  # five empty cells: dropped by min_counts=1
    a.X.eliminate_zeros()
    before = a.X.copy()
    res = preprocess(a, _params(min_cells=5, dense_max_bytes=0))
    out = res.adata
    assert res.qc.dropped_min_counts == 5 and out.n_obs == 295
    assert (a.X != before).nnz == 0 and a.n_obs == 300  # copy=True: the caller's stays
    kept = a[out.obs_names, out.var_names].X.toarray()
    counts = _dense(out.layers["counts"])
    assert np.array_equal(counts.view(np.uint32), kept.view(np.uint32))
    lib = kept.sum(1, keepdims=True)
    np.testing.assert_allclose(out.X.toarray(), np.log1p(kept / lib * 1e4), rtol=1e-5)
    n_cells = (a[:, :].X.toarray()[5:] > 0).sum(0)
    assert res.qc.dropped_genes_min_cells == int((n_cells < 5).sum())
    # written and read back sparse; the pairing reads it (CSR rows, same values)
    out.write_h5ad(tmp_path / "e.h5ad")
    back = ad.read_h5ad(tmp_path / "e.h5ad")
    assert sp.issparse(back.X)
    from vae.inputs.pairing import make_pairs

    pairs = make_pairs(None, back, "unpaired").adata
    rows = pairs.obs["expression_ref"].to_numpy()
    np.testing.assert_allclose(_dense(pairs.X), back[rows].X.toarray())


def test_copy_false_consumes_the_input():
    a = _counts(200, 60)
    a.X[:3] = 0  # three empty cells, dropped: the kept cells are a copy
    a.X.eliminate_zeros()
    out = preprocess(a, _params(dense_max_bytes=0), copy=False).adata
    assert out.n_obs == 197 and "counts" in out.layers
    # the input's matrices are given up (stage=expression: not held twice)
    assert a.X is None and not a.layers


def test_an_old_anndata_layout_is_read_whole_not_in_blocks(tmp_path):
    """anndata < 0.7 wrote obs / var as compound datasets: anndata reads them, the embed
    block reader did not ("Cannot convert ... to obs DataFrame"; review), so such a file
    is read whole."""
    import h5py

    from vae.inputs.expression import row_blocks_unsupported

    path = tmp_path / "legacy.h5ad"
    rec = np.dtype([("index", "S8")])
    with h5py.File(path, "w") as f:
        f["X"] = np.ones((3, 2), np.float32)
        f["obs"] = np.array([(b"c0",), (b"c1",), (b"c2",)], dtype=rec)
        f["var"] = np.array([(b"g0",), (b"g1",)], dtype=rec)
    assert row_blocks_unsupported(path) == "obs in an old anndata layout (no encoding-type)"
    modern = tmp_path / "modern.h5ad"
    ad.AnnData(np.ones((3, 2), np.float32)).write_h5ad(modern)
    assert row_blocks_unsupported(modern) is None
