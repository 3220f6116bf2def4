"""stage=expression: readers, validation, QC filters, gene programs, labels, the stage.

Hand-made matrices with exact expected outcomes. Most tests keep UMAP, DPT and
clustering off (the first kNN graph of a process JIT-compiles numba code, ~10 s).
"""

from __future__ import annotations

import gzip
import json
import logging
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from tests.helpers.run import (
    SHARED_DATA,
    compose_config,
    needs_shared,
    run_pipeline,
    run_stage_in_process,
)
from vae.inputs.expression import (
    MIN_CELLS_DPT,
    MIN_CELLS_PCA,
    MIN_CELLS_UMAP,
    ExpressionInputError,
    PreprocessParams,
    match_genes,
    plot_embedding,
    preprocess,
    read_expression,
    validate_matrix,
)

PAUL15 = SHARED_DATA / "expression" / "paul15_tradeseq_2660x240.h5ad"

GENES = ["MPO", "ELANE", "MT-CO1", "LTF", "G5", "G6", "G7", "G8"]


def _params(**kw) -> PreprocessParams:
    base = dict(
        programs={"primary": ["MPO", "ELANE"]},
        umap=False,
        maturation="none",
        n_pcs=2,
        score_ctrl_size=3,
        score_n_bins=3,
        n_top_genes=None,
    )
    base.update(kw)
    return PreprocessParams(**base)


def _toy() -> ad.AnnData:
    """8 cells x 8 genes of integer counts with known QC outcomes.

    c0: 2 detected genes (dropped by min_genes=3)
    c1: total 4 counts (dropped by min_counts=5)
    c2: 60 % counts in MT-CO1 (dropped by max_pct_mito=50)
    G8 is detected in one kept cell only (dropped by min_cells=2)
    """
    X = np.array(
        [
            [5, 5, 0, 0, 0, 0, 0, 0],  # c0: 2 genes
            [1, 1, 1, 1, 0, 0, 0, 0],  # c1: 4 counts
            [1, 1, 6, 1, 1, 0, 0, 0],  # c2: 6/10 mito
            [3, 2, 1, 2, 4, 1, 2, 0],
            [2, 0, 1, 3, 2, 4, 1, 0],
            [0, 4, 1, 1, 2, 3, 3, 7],  # the only cell with G8
            [6, 1, 0, 2, 1, 1, 1, 0],
            [1, 3, 2, 2, 3, 2, 2, 0],
        ],
        dtype=np.float32,
    )
    obs = pd.DataFrame(
        {"celltype": ["A", "A", "A", "A", "B", "B", "B", "B"]},
        index=[f"c{i}" for i in range(8)],
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=GENES))


# --- QC and counts -----------------------------------------------------------


def test_qc_filters_drop_exactly_the_expected_cells_and_genes():
    a = _toy()
    res = preprocess(a, _params(min_genes=3, min_counts=5, max_pct_mito=50.0, min_cells=2))
    out = res.adata
    assert list(out.obs_names) == ["c3", "c4", "c5", "c6", "c7"]
    assert list(out.var_names) == GENES[:7]
    assert (res.qc.dropped_min_genes, res.qc.dropped_min_counts, res.qc.dropped_mito) == (1, 1, 1)
    assert res.qc.dropped_genes_min_cells == 1 and res.qc.n_mito_genes == 1
    assert res.qc_frame["kept"].tolist() == [False, False, False, True, True, True, True, True]


def test_counts_layer_is_preserved_bit_for_bit_and_x_is_lognormalised():
    a = _toy()
    a.X = sp.csr_matrix(a.X)
    res = preprocess(a, _params(min_cells=2, target_sum=100.0))
    out = res.adata
    kept = a[out.obs_names, out.var_names].X.toarray()
    counts = out.layers["counts"]
    counts = counts.toarray() if sp.issparse(counts) else counts
    assert counts.dtype == np.float32
    assert np.array_equal(counts.view(np.uint32), kept.view(np.uint32))  # bit-for-bit
    expected = np.log1p(kept / kept.sum(1, keepdims=True) * 100.0)
    assert out.X.dtype == np.float32
    np.testing.assert_allclose(out.X, expected, rtol=1e-5)
    assert out.uns["has_counts"] is True


def test_pca_loadings_and_variance_stored_like_scanpy(tmp_path):
    out = preprocess(_toy(), _params(min_cells=2)).adata
    pcs, emb = out.varm["PCs"], out.obsm["X_pca"]
    assert pcs.shape == (out.n_vars, 2) == (out.n_vars, emb.shape[1])
    vr = out.uns["pca"]["variance_ratio"]
    assert len(vr) == 2 and vr[0] >= vr[1] > 0 and vr.sum() <= 1 + 1e-6
    # X_pca is X (centred) projected on the stored loadings
    x = np.asarray(out.X, dtype=np.float64)
    np.testing.assert_allclose((x - x.mean(0)) @ pcs, emb, rtol=1e-3, atol=1e-4)
    out.write_h5ad(tmp_path / "e.h5ad")  # h5ad-writable (uns["pca"]["params"] included)
    assert "PCs" in ad.read_h5ad(tmp_path / "e.h5ad").varm


def test_existing_counts_layer_is_used_and_kept():
    a = _toy()
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X)  # X something else: the counts layer is the source
    out = preprocess(a, _params()).adata
    np.testing.assert_array_equal(out.layers["counts"], _toy().X)


def test_non_integer_input_needs_values_lognorm_and_gets_no_fake_counts():
    a = _toy()
    a.X = np.log1p(a.X)
    with pytest.raises(ExpressionInputError) as e:
        preprocess(a.copy(), _params())
    assert e.value.field == "expression.values" and "values=lognorm" in str(e.value)
    out = preprocess(a, _params(values="lognorm")).adata
    assert out.uns["has_counts"] is False
    assert "counts" not in out.layers
    np.testing.assert_allclose(out.X, np.log1p(_toy().X))


def test_lognorm_on_integer_counts_warns_and_names_the_settings(caplog):
    with caplog.at_level(logging.WARNING):
        out = preprocess(_toy(), _params(values="lognorm"), source="toy.h5ad").adata
    assert out.uns["has_counts"] is False  # obeyed: a warning, not an error
    assert "toy.h5ad: expression.values=lognorm, but every value of X" in caplog.text
    assert "look like raw counts" in caplog.text and "expression.values=counts" in caplog.text
    caplog.clear()
    a = _toy()
    a.X = np.log1p(a.X)
    with caplog.at_level(logging.WARNING):
        preprocess(a, _params(values="lognorm"))
    assert "look like raw counts" not in caplog.text


def test_counts_in_raw_or_another_layer_are_named_when_x_is_lognormalised():
    a = _toy()
    a.raw = a.copy()  # integer counts in .raw, log values in X
    a.X = np.log1p(a.X)
    with pytest.raises(ExpressionInputError) as e:
        preprocess(a, _params())
    msg = str(e.value)
    assert e.value.field == "expression.values" and "values=lognorm" in msg
    assert "Raw integer counts were found in .raw.X" in msg
    assert "set expression.counts_layer=.raw" in msg
    # the hint works: with the counts taken from where they are, the input has counts
    out = preprocess(a, _params(counts_layer=".raw")).adata
    assert out.uns["has_counts"] is True
    np.testing.assert_array_equal(out.layers["counts"], _toy().X)
    # X subset to some genes (scanpy after a gene selection), every gene in .raw: X's
    # genes stay the features, each normalised by the cell's total over all of .raw, as
    # stage=embed normalises the same file (X's genes alone gave another library)
    rng = np.random.default_rng(0)
    c = rng.poisson(3.0, (30, 40)).astype(np.float32)
    genes = ["MPO", "ELANE"] + [f"G{k}" for k in range(38)]
    full = ad.AnnData(X=c.copy(), var=pd.DataFrame(index=genes))
    full.obs_names = [f"c{k}" for k in range(30)]
    sub = full[:, :20].copy()
    sub.raw = full.copy()
    sub.X = np.log1p(sub.X)
    out = preprocess(sub, _params(counts_layer=".raw", min_genes=0, min_counts=0)).adata
    keep = list(out.var_names)
    assert keep and set(keep) <= set(genes[:20])  # X's genes stay the features
    cols = [genes.index(g) for g in keep]
    rows = [full.obs_names.get_loc(o) for o in out.obs_names]
    want = np.log1p(c[rows][:, cols] / c[rows].sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(np.asarray(out.X), want, rtol=1e-5)
    b = _toy()
    b.layers["raw_counts"] = b.X.copy()
    b.X = np.log1p(b.X)
    with pytest.raises(
        ExpressionInputError, match=r"found in layers\['raw_counts'\].*counts_layer=raw_counts"
    ):
        preprocess(b, _params(values="counts"))
    out = preprocess(b, _params(counts_layer="raw_counts")).adata
    np.testing.assert_array_equal(out.layers["counts"], _toy().X)
    with pytest.raises(ExpressionInputError, match=r"no layer 'nope'; layers: \['raw_counts'\]"):
        preprocess(b, _params(counts_layer="nope"))
    c = _toy()
    c.X = np.log1p(c.X)  # no counts anywhere: no hint
    with pytest.raises(ExpressionInputError) as e:
        preprocess(c, _params())
    assert "found in" not in str(e.value)


def test_pbmc68k_reduced_has_no_counts():
    a = read_expression("scanpy:pbmc68k_reduced")
    assert a.shape == (700, 765)
    out = preprocess(
        a, _params(values="lognorm", programs={"mono": ["lyz", "S100A8"]}, label_key="bulk_labels")
    ).adata
    assert out.uns["has_counts"] is False and "counts" not in out.layers
    assert out.X.min() >= 0
    assert set(out.obs["label"]) >= {"CD34+", "CD14+ Monocyte"}
    assert list(out.uns["programs"]["mono"]) == ["LYZ", "S100A8"]


# --- genes of interest and programs ------------------------------------------


def test_case_insensitive_gene_matching():
    m = match_genes(["Mpo", "Elane", "Actb", "mt-Co1"], ["MPO", "ELANE", "AZU1", "MT-CO1"])
    assert m.matched == {"MPO": "Mpo", "ELANE": "Elane", "MT-CO1": "mt-Co1"}
    assert m.missing == ["AZU1"]
    # the exact spelling wins when two genes differ only by case
    assert match_genes(["mpo", "MPO"], ["MPO"]).matched == {"MPO": "MPO"}


def test_mouse_symbols_scored_and_missing_genes_reported():
    a = _toy()
    a.var_names = ["Mpo", "Elane", "mt-Co1", "Ltf", "G5", "G6", "G7", "G8"]
    res = preprocess(a, _params(programs={"primary": ["MPO", "ELANE", "AZU1"], "x": ["NOPE"]}))
    out = res.adata
    assert res.programs == {"primary": ["Mpo", "Elane"], "x": []}
    assert res.missing == {"primary": ["AZU1"], "x": ["NOPE"]}
    assert list(out.uns["missing_genes"]["primary"]) == ["AZU1"]
    assert "score_primary" in out.obs and "score_x" not in out.obs
    assert out.obs["score_primary"].dtype == np.float32
    assert out.var.loc[["Mpo", "Elane"], "gene_of_interest"].all()


def test_no_program_gene_at_all_is_an_error_or_a_warning(caplog):
    a = _toy()
    with pytest.raises(ExpressionInputError) as e:
        preprocess(a, _params(programs={"p": ["NOPE1", "NOPE2"]}))
    assert e.value.field == "expression.programs"
    with caplog.at_level(logging.WARNING):
        out = preprocess(a, _params(programs={"p": ["NOPE1"]}, require_program_match=False)).adata
    assert "none of the 1 program genes" in caplog.text
    assert not any(c.startswith("score_") for c in out.obs)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        res = preprocess(a, _params(genes_of_interest=["NOPE3"]))
    assert "no gene of expression.genes_of_interest (NOPE3)" in caplog.text
    assert res.missing["genes_of_interest"] == ["NOPE3"]


def test_duplicate_gene_names_are_made_unique_and_programs_match_the_first(caplog):
    a = _toy()
    a.var_names = ["MPO", "ELANE", "MT-CO1", "MPO", "G5", "ELANE", "ELANE", "G8"]
    with caplog.at_level(logging.WARNING):
        res = preprocess(a, _params(), source="features.tsv")
    out = res.adata
    assert list(out.var_names) == [
        *("MPO", "ELANE", "MT-CO1", "MPO-1", "G5", "ELANE-1", "ELANE-2", "G8")
    ]
    assert "features.tsv: 2 gene names occur more than once (3 extra columns)" in caplog.text
    assert "['MPO', 'ELANE']" in caplog.text
    assert res.programs["primary"] == ["MPO", "ELANE"]
    # the first occurrence is the column named MPO
    np.testing.assert_array_equal(out[:, "MPO"].layers["counts"].ravel(), _toy().X[:, 0])
    np.testing.assert_array_equal(out[:, "MPO-1"].layers["counts"].ravel(), _toy().X[:, 3])
    assert list(a.var_names).count("MPO") == 2  # the caller's object is not renamed


def test_hvg_flavor_is_checked_before_any_work(monkeypatch):
    with pytest.raises(ExpressionInputError) as e:
        preprocess(_toy(), _params(hvg_flavor="foo", n_top_genes=4))
    assert e.value.field == "expression.hvg_flavor"
    assert "valid: seurat, cell_ranger, seurat_v3, seurat_v3_paper" in str(e.value)
    monkeypatch.setitem(sys.modules, "skmisc", None)  # scikit-misc not installed
    with pytest.raises(ExpressionInputError) as e:
        preprocess(_toy(), _params(hvg_flavor="seurat_v3", n_top_genes=4))
    assert e.value.field == "expression.hvg_flavor" and "pip install scikit-misc" in str(e.value)
    # no HVG selection (n_top_genes=null): the flavor is never used, nothing to install
    assert preprocess(_toy(), _params(hvg_flavor="seurat_v3")).adata.n_obs == 8


def test_genes_of_interest_kept_when_not_highly_variable():
    rng = np.random.default_rng(0)
    X = rng.poisson(3.0, (40, 30)).astype(np.float32)
    X[:, 0] = 2  # constant: never highly variable
    X[:20, 1:6] *= 8  # strongly variable genes
    var = [f"G{i}" for i in range(30)]
    obs = pd.DataFrame({"kind": ["a", "b"] * 20}, index=[f"c{i}" for i in range(40)])
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=var))
    p = _params(programs={"p": ["g1", "g2"]}, genes_of_interest=["g0"], n_top_genes=5)
    p.subset_hvg = True
    out = preprocess(a, p).adata
    assert not out.var.loc["G0", "highly_variable"]
    assert "G0" in out.var_names and out.var.loc["G0", "gene_of_interest"]
    assert out.n_vars == int((out.var["highly_variable"] | out.var["gene_of_interest"]).sum())
    assert out.n_vars < 30


# --- labels and maturation ---------------------------------------------------


def test_label_and_maturation_columns_from_data():
    a = _toy()
    a.obs["kind"] = ["myeloblast"] * 4 + ["band"] * 4
    a.obs["t"] = np.linspace(0, 1, 8)
    out = preprocess(a, _params(maturation="auto")).adata
    assert list(out.obs["label"]) == list(a.obs["kind"])  # kind before celltype
    np.testing.assert_allclose(out.obs["maturation"], np.linspace(0, 1, 8), rtol=1e-6)
    assert out.uns["maturation_source"] == "column:t"
    out = preprocess(a, _params(label_key="celltype")).adata
    assert list(out.obs["label"]) == list(a.obs["celltype"])


def test_missing_labels_are_unlabelled_and_integral_codes_have_no_decimal(caplog):
    a = _toy()
    a.obs["celltype"] = np.array(["A", None, "A", np.nan, "B", "B", "B", "B"], dtype=object)
    a.obs["cluster"] = [2.0, 4.0, np.nan, 2.0, 4.0, 2.5, 4.0, 2.0]  # codes with a gap
    with caplog.at_level(logging.WARNING):
        out = preprocess(a, _params(label_key="celltype"), source="toy.h5ad").adata
    assert list(out.obs["label"]) == ["A", "", "A", "", "B", "B", "B", "B"]
    assert "toy.h5ad: 2 of 8 cells have no label in obs column 'celltype'" in caplog.text
    out = preprocess(a, _params(label_key="cluster")).adata
    assert list(out.obs["label"]) == ["2", "4", "", "2", "4", "2.5", "4", "2"]


def test_a_column_named_label_is_the_label_column():
    a = _toy()
    a.obs["label"] = ["x", "y"] * 4  # before celltype and every other known name
    out = preprocess(a, _params()).adata
    assert list(out.obs["label"]) == ["x", "y"] * 4 and out.uns["label_key"] == "label"


def test_an_unknown_label_column_is_named_with_the_setting_that_picks_it(caplog):
    """Audit: a label column named "annotation" became Leiden clusters with an INFO line."""
    a = _toy()
    a.obs = a.obs.rename(columns={"celltype": "annotation"})
    a.obs["donor"] = pd.Categorical(["d1", "d2"] * 4)
    a.obs["barcode"] = [f"AAC{i}" for i in range(8)]  # one value per cell: not a class
    a.obs["n_reads"] = np.arange(8)  # a number: not a class
    a.obs["doublet"] = [False, True] * 4
    with caplog.at_level(logging.WARNING):
        out = preprocess(a, _params(n_neighbors=3), source="study.h5ad").adata
    assert out.uns["label_key"] == "leiden" and out.obs["label"].str.startswith("cluster_").all()
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    line = next(m for m in warn if "Leiden clusters" in m)
    assert line.startswith("study.h5ad: no label column (none of label, kind, celltype")
    assert "obs columns that look like labels: annotation (2 values), donor (2 values)." in line
    assert "Set expression.label_key=annotation" in line
    assert "barcode" not in line and "n_reads" not in line and "doublet" not in line
    # with the setting, the column is the labels and nothing is said
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = preprocess(a, _params(label_key="annotation"), source="study.h5ad").adata
    assert list(out.obs["label"]) == ["A"] * 4 + ["B"] * 4 and "Leiden" not in caplog.text
    # a known column is taken as before, with no warning
    a.obs["cell_type"] = a.obs["annotation"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = preprocess(a, _params(), source="study.h5ad").adata
    assert out.uns["label_key"] == "cell_type" and "Leiden" not in caplog.text
    # nothing that looks like labels: the warning says so and names the setting
    b = _toy()
    del b.obs["celltype"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        preprocess(b, _params(n_neighbors=3), source="bare.h5ad")
    assert "bare.h5ad: no label column" in caplog.text
    assert "no text or categorical obs column with 2..100 values" in caplog.text
    assert "expression.label_key=COLUMN" in caplog.text


def test_maturation_column_outside_0_1_is_rescaled(caplog):
    a = _toy()
    a.obs["pseudotime"] = [0.0, 30.0, np.nan, 15.0, 7.5, 3.0, 30.0, 6.0]
    with caplog.at_level(logging.WARNING):
        out = preprocess(a, _params(maturation="auto")).adata
    np.testing.assert_allclose(
        out.obs["maturation"], [0, 1, np.nan, 0.5, 0.25, 0.1, 1, 0.2], rtol=1e-6
    )
    assert "maturation column 'pseudotime' spans [0, 30], not [0, 1]: rescaled" in caplog.text
    a.obs["pseudotime"] = np.linspace(0, 1, 8)  # already in [0, 1]: untouched, no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = preprocess(a, _params(maturation="auto")).adata
    np.testing.assert_allclose(out.obs["maturation"], np.linspace(0, 1, 8), rtol=1e-6)
    assert "rescaled" not in caplog.text


def test_tiny_inputs_skip_umap_or_fail_naming_the_minimum(caplog, tmp_path):
    a = _toy()[3:6].copy()  # 3 cells: PCA yes, UMAP no
    assert MIN_CELLS_PCA <= a.n_obs < MIN_CELLS_UMAP
    with caplog.at_level(logging.WARNING):
        out = preprocess(a, _params(umap=True)).adata
    assert "3 cells: UMAP needs at least 4; skipped" in caplog.text
    assert "X_umap" not in out.obsm and out.obsm["X_pca"].shape == (3, 2)
    plot_embedding(out, tmp_path / "umap.png")  # falls back to the PCA
    with pytest.raises(ExpressionInputError) as e:
        preprocess(_toy()[3:4].copy(), _params())
    assert "1 cells left after QC (of 1 in the input)" in str(e.value)
    assert "at least 2 cells" in str(e.value) and e.value.field == "X"
    two = preprocess(_toy()[3:5].copy(), _params()).adata  # one component: a line
    plot_embedding(two, tmp_path / "two.png")
    few = _toy()[3 : 3 + MIN_CELLS_DPT - 1].copy()
    with pytest.raises(ExpressionInputError) as e:
        preprocess(few, _params(label_key="celltype", maturation="dpt", root_label="A"))
    assert e.value.field == "expression.maturation"
    assert f"4 cells: diffusion pseudotime needs at least {MIN_CELLS_DPT}" in str(e.value)


def test_unknown_label_key_and_root_label_are_errors():
    with pytest.raises(ExpressionInputError) as e:
        preprocess(_toy(), _params(label_key="nope"))
    assert e.value.field == "expression.label_key"
    # found before preprocessing, listing the input's own columns
    with pytest.raises(ExpressionInputError) as e:
        preprocess(_toy(), _params(maturation="auto", maturation_key="ptime"))
    assert e.value.field == "expression.maturation_key"
    assert "available: ['celltype']" in str(e.value)
    with pytest.raises(ExpressionInputError) as e:
        preprocess(_toy(), _params(label_key="celltype", maturation="dpt", root_label="Z"))
    assert e.value.field == "expression.root_label"
    with pytest.raises(ExpressionInputError) as e:
        preprocess(_toy(), _params(maturation="dpt"))
    assert e.value.field == "expression.root_label"


# --- bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, field, text",
    [
        (lambda a: a.X.__setitem__((3, 1), np.nan), "X", "NaN/inf"),
        (lambda a: a.X.__setitem__((3, 1), np.inf), "X", "NaN/inf"),
        (lambda a: a.X.__setitem__((3, 1), -1.0), "X", "negative"),
        (lambda a: a.X.__setitem__((3, 1), 0.5), "X", "non-integer"),
        (
            lambda a: setattr(a, "obs_names", ["c0"] * 2 + [f"c{i}" for i in range(2, 8)]),
            "obs_names",
            "duplicate cell",
        ),
    ],
)
def test_bad_input_raises_naming_the_field(mutate, field, text):
    a = _toy()
    mutate(a)
    with pytest.raises(ExpressionInputError) as e:
        preprocess(a, _params(values="counts"), source="toy.h5ad")
    assert e.value.field == field
    assert text in str(e.value) and "toy.h5ad" in str(e.value)


def test_empty_after_filtering_and_empty_input():
    with pytest.raises(ExpressionInputError) as e:
        preprocess(_toy(), _params(min_genes=100))
    assert "no cell left" in str(e.value) and "min_genes" in e.value.field
    with pytest.raises(ExpressionInputError) as e:
        preprocess(_toy(), _params(min_cells=100))
    assert e.value.field == "expression.min_cells"
    with pytest.raises(ExpressionInputError) as e:
        validate_matrix(ad.AnnData(np.zeros((0, 3), np.float32)))
    assert e.value.field == "X"


# --- readers -----------------------------------------------------------------


def test_csv_tsv_orientation_and_10x_mtx(tmp_path):
    a = _toy()
    df = pd.DataFrame(a.X, index=a.obs_names, columns=a.var_names)
    df.to_csv(tmp_path / "cells.csv")
    df.T.to_csv(tmp_path / "genes.tsv", sep="\t")
    r1 = read_expression(tmp_path / "cells.csv")
    r2 = read_expression(tmp_path / "genes.tsv", orientation="genes_by_cells")
    for r in (r1, r2):
        assert list(r.obs_names) == list(a.obs_names) and list(r.var_names) == GENES
        np.testing.assert_array_equal(r.X, a.X)
    with pytest.raises(ExpressionInputError) as e:
        read_expression(tmp_path / "cells.csv", orientation="sideways")
    assert e.value.field == "expression.orientation"
    # a header and no cell: said as such, not as text columns
    df.iloc[:0].to_csv(tmp_path / "header_only.csv")
    with pytest.raises(ExpressionInputError, match="no data rows") as e:
        read_expression(tmp_path / "header_only.csv")
    assert e.value.field == "rows" and "header_only.csv" in str(e.value)
    # a spreadsheet's ";" export, and a tab-separated file named .csv: read the same
    df.to_csv(tmp_path / "semicolon.csv", sep=";")
    df.to_csv(tmp_path / "tabs.csv", sep="\t")
    for name in ("semicolon.csv", "tabs.csv"):
        r = read_expression(tmp_path / name)
        assert list(r.var_names) == GENES and list(r.obs_names) == list(a.obs_names), name
        np.testing.assert_array_equal(r.X, a.X)
    # a repeated gene header stays repeated (pandas would rename it "G2.1"), so the
    # checks after the reader see it: stage=expression and stage=embed make it unique
    # with a warning (a model gene takes its first occurrence)
    dup = df.rename(columns={GENES[1]: GENES[0]})
    dup.to_csv(tmp_path / "dup.csv")
    assert list(read_expression(tmp_path / "dup.csv").var_names)[:2] == [GENES[0], GENES[0]]
    # 10x v3 matrix-market folder: genes x cells matrix + features + barcodes
    d = tmp_path / "mtx"
    d.mkdir()
    with gzip.open(d / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(a.X.T.astype(np.int64)))
    feats = "".join(f"ENSG{i}\t{g}\tGene Expression\n" for i, g in enumerate(GENES))
    (d / "features.tsv.gz").write_bytes(gzip.compress(feats.encode()))
    (d / "barcodes.tsv.gz").write_bytes(gzip.compress("\n".join(a.obs_names).encode() + b"\n"))
    r3 = read_expression(d)
    assert list(r3.var_names) == GENES and list(r3.obs_names) == list(a.obs_names)
    np.testing.assert_array_equal(r3.X.toarray(), a.X)
    with pytest.raises(ExpressionInputError) as e:
        read_expression(tmp_path / "missing.h5ad")
    assert e.value.field == "path"


# --- the stage as a subprocess ----------------------------------------------------


_run = run_pipeline
_compose = compose_config
_run_in_process = run_stage_in_process


def test_precheck_opens_an_h5ad_input_and_finds_its_label_column(tmp_path):
    """stage=all fails at the start, not after the stages before expression ran."""
    from pipeline.precheck import precheck
    from pipeline.runner import StageError

    _toy().write_h5ad(tmp_path / "ok.h5ad")
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    base = [f"paths.root={tmp_path / 'out'}", "experiment=x", "data=real", "stage=all"]
    ok = _compose([*base, f"expression.input_file={tmp_path / 'ok.h5ad'}"])
    precheck(ok, ["expression"])
    bad = _compose([*base, f"expression.input_file={tmp_path / 'bad.h5ad'}"])
    with pytest.raises(StageError, match="bad.h5ad: not a readable .h5ad file"):
        precheck(bad, ["expression"])
    key = _compose(
        [*base, f"expression.input_file={tmp_path / 'ok.h5ad'}", "expression.label_key=nope"]
    )
    with pytest.raises(StageError, match="expression.label_key=nope.*no obs column 'nope'"):
        precheck(key, ["expression"])
    mk = _compose(
        [*base, f"expression.input_file={tmp_path / 'ok.h5ad'}", "expression.maturation_key=pt"]
    )
    with pytest.raises(
        StageError,
        match=r"expression.maturation_key=pt: .*no obs column 'pt' \(its columns: celltype\)",
    ):
        precheck(mk, ["expression"])
    # maturation=dpt reads no column: the key is not looked for
    precheck(
        _compose(
            [
                *base,
                "expression=paul15",
                f"expression.input_file={tmp_path / 'ok.h5ad'}",
                "expression.maturation_key=pt",
            ]
        ),
        ["expression"],
    )
    assert not (tmp_path / "out").exists()


def test_stage_on_simulator_output(tmp_path):
    common = [f"paths.root={tmp_path}", "experiment=sim"]
    _run_in_process([*common, "data.simulator.n_images=3"], "simulate")  # fast, in-process
    r = _run(["stage=expression", *common, "expression.umap=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path / "sim" / "expression"
    raw = ad.read_h5ad(tmp_path / "sim" / "simulate" / "expression_raw.h5ad")
    out = ad.read_h5ad(d / "expression.h5ad")
    assert out.n_obs == raw.n_obs and out.uns["has_counts"]
    np.testing.assert_array_equal(
        np.asarray(
            out.layers["counts"].todense()
            if sp.issparse(out.layers["counts"])
            else out.layers["counts"]
        ),
        np.asarray(raw[out.obs_names, out.var_names].layers["counts"]),
    )
    assert list(out.obs["label"]) == list(raw.obs.loc[out.obs_names, "kind"].astype(str))
    t = raw.obs.loc[out.obs_names, "t"].to_numpy(dtype=float)
    np.testing.assert_allclose(out.obs["maturation"].to_numpy(dtype=float), t, equal_nan=True)
    assert list(out.uns["programs"]["primary"]) == ["MPO", "ELANE", "AZU1", "PRTN3", "CTSG"]
    assert (d / "qc.png").stat().st_size > 0 and (d / "umap.png").stat().st_size > 0
    man = json.loads((d / "manifest.json").read_text())
    assert man["status"] == "complete" and "expression_raw" in man["inputs"]


def test_stage_bad_input_writes_nothing(tmp_path):
    a = _toy()
    a.X[3, 1] = np.nan
    bad = tmp_path / "bad.h5ad"
    a.write_h5ad(bad)
    from pipeline.runner import StageError

    with pytest.raises(StageError) as e:
        _run_in_process(
            [f"paths.root={tmp_path}", "experiment=bad", f"paths.inputs.expression_raw={bad}"],
            "expression",
        )
    msg = str(e.value)
    assert "[X]" in msg and "NaN/inf" in msg and "bad.h5ad" in msg
    d = tmp_path / "bad" / "expression"
    assert sorted(p.name for p in d.iterdir()) == ["expression.log", "manifest.json"]
    assert json.loads((d / "manifest.json").read_text())["status"] == "failed"


@needs_shared(PAUL15, "Paul15")
def test_paul15_in_process():
    a = read_expression(PAUL15)
    res = preprocess(
        a,
        _params(
            values="counts",
            min_counts=100,
            min_genes=10,
            min_cells=3,
            n_top_genes=120,
            label_key="celltype",
            programs={"primary": ["MPO", "ELANE", "AZU1", "PRTN3", "CTSG"]},
            score_ctrl_size=50,
            score_n_bins=25,
        ),
    )
    out = res.adata
    assert out.shape == (2653, 240) and res.qc.dropped_min_counts == 7
    assert res.programs["primary"] == ["Mpo", "Elane", "Prtn3", "Ctsg"]
    assert int(out.var["highly_variable"].sum()) == 120
    score = out.obs.groupby("label", observed=True)["score_primary"].mean()
    # primary granule genes: high in GMP-derived myeloid cells, low in erythroid cells
    assert score["Neutrophils"] > score["GMP"] > score["Erythrocyte"]


@pytest.mark.slow
@needs_shared(PAUL15, "Paul15")
def test_stage_on_paul15(tmp_path):
    r = _run(
        [
            "stage=expression",
            "expression=paul15",
            f"paths.root={tmp_path}",
            "experiment=paul",
            "expression.umap=false",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path / "paul" / "expression"
    out = ad.read_h5ad(d / "expression.h5ad")
    qc = json.loads((d / "qc.json").read_text())
    assert qc["qc"]["n_cells_in"] == 2660 and qc["qc"]["dropped_min_counts"] == 7
    assert out.shape == (2653, 240)
    assert qc["programs"]["primary"] == ["Mpo", "Elane", "Prtn3", "Ctsg"]
    assert qc["missing_genes"]["primary"] == ["AZU1"]
    assert int(out.var["highly_variable"].sum()) == 120
    med = out.obs.groupby("label", observed=True)["maturation"].median()
    # diffusion pseudotime from the MPP root: progenitors earliest
    assert med["Multipotent progenitors"] < med["GMP"] < med["Neutrophils"]
    assert med["Multipotent progenitors"] == med.min()
    # the data set's own caveats (pipeline/conf/expression/paul15.yaml notes) travel with it, and
    # what they say about the labels holds on this file: "Multipotent progenitors" carry
    # erythroid genes, "Neutrophils" the azurophil-granule ones
    notes = list(out.uns["data_notes"])
    assert len(notes) == 3 and "cluster 7" in notes[0] and "MEP" in notes[0]
    assert "progenitor" in notes[2]  # every label a marrow progenitor cluster
    x = pd.DataFrame(out.X.toarray() if sp.issparse(out.X) else out.X, columns=out.var_names)
    mean = x.groupby(out.obs["label"].astype(str).to_numpy()).mean()
    assert mean.loc["Multipotent progenitors", "Car1"] > 2 * mean.loc["GMP", "Car1"]
    assert mean.loc["Neutrophils", "Elane"] > 3 * mean.loc["GMP", "Elane"]
    # ... and that the monocyte program's Ly6c2 / Cst3 are not monocyte-specific here
    assert "Ly6c2" in notes[1]
    for g in ("Ly6c2", "Cst3"):
        assert mean.loc["Neutrophils", g] > 0.85 * mean.loc["Monocytes", g]


def test_10x_h5_reader(tmp_path):
    import h5py

    a = _toy()
    m = sp.csc_matrix(a.X.T.astype(np.int32))  # 10x stores genes x cells, CSC by cell
    with h5py.File(tmp_path / "f.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape, np.int32)
        g["barcodes"] = np.array(list(a.obs_names), dtype="S")
        ft = g.create_group("features")
        ft["id"] = np.array([f"ENSG{i}" for i in range(8)], dtype="S")
        ft["name"] = np.array(GENES, dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * 8, dtype="S")
        ft["genome"] = np.array(["GRCh38"] * 8, dtype="S")
    r = read_expression(tmp_path / "f.h5")
    assert list(r.var_names) == GENES and list(r.obs_names) == list(a.obs_names)
    np.testing.assert_array_equal(r.X.toarray(), a.X)


def test_an_anndata_with_genes_as_rows_is_refused_or_transposed_on_request(tmp_path):
    """A transposed .h5ad ran with its genes taken as cells (expression.orientation was
    for tables only): auto refuses it, genes_by_cells transposes it."""
    rng = np.random.default_rng(0)
    genes = ["MPO", "ELANE", "LTF", "CAMP", "FCGR3B", "G6", "G7", "G8"]
    cells = [f"cell{i}" for i in range(12)]
    x = rng.poisson(3, (len(genes), len(cells))).astype(np.float32)  # genes x cells
    p = tmp_path / "t.h5ad"
    ad.AnnData(X=x, obs=pd.DataFrame(index=genes), var=pd.DataFrame(index=cells)).write_h5ad(p)
    with pytest.raises(ExpressionInputError, match="rows \\(obs\\) look like genes"):
        read_expression(p)
    a = read_expression(p, orientation="genes_by_cells")
    assert list(a.obs_names) == cells and list(a.var_names) == genes
    assert read_expression(p, orientation="cells_by_genes").shape == (len(genes), len(cells))


def test_ensembl_ids_with_a_symbol_column_are_read_as_symbols(tmp_path):
    """A CELLxGENE-style .h5ad names genes by Ensembl id and keeps the symbols in a var
    column: the symbols become the names, so the granule programs match."""
    genes = ["MPO", "ELANE", "LTF", "CAMP"]
    ids = [f"ENSG0000000000{i}" for i in range(len(genes))]
    x = np.random.default_rng(0).poisson(2, (6, len(genes))).astype(np.float32)
    p = tmp_path / "e.h5ad"
    ad.AnnData(
        X=x,
        obs=pd.DataFrame(index=[f"c{i}" for i in range(6)]),
        var=pd.DataFrame({"feature_name": genes}, index=ids),
    ).write_h5ad(p)
    a = read_expression(p)
    assert list(a.var_names) == genes and list(a.var["gene_ids"]) == ids
    q = tmp_path / "plain.h5ad"  # symbols already: untouched
    ad.AnnData(X=x, var=pd.DataFrame({"feature_name": ids}, index=genes)).write_h5ad(q)
    assert list(read_expression(q).var_names) == genes
