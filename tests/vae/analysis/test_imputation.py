"""Imputation (LATE protocol) and denoising scores: seeded masking, skipped cells, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vae.analysis import imputation as I


def counts_matrix(n=40, g=30, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.poisson(rng.gamma(2.0, 2.0, (n, g))).astype(np.float32)
    c[:3] = 0
    c[:3, :4] = 5  # three cells with only 4 non-zero entries: skipped
    return c


def test_hiding_is_seeded_hides_only_nonzero_and_counts_skipped_cells():
    c = counts_matrix()
    a = I.hide_nonzero(c, 0.1, seed=7, min_nonzero=10)
    b = I.hide_nonzero(c, 0.1, seed=7, min_nonzero=10)
    other = I.hide_nonzero(c, 0.1, seed=8, min_nonzero=10)
    assert np.array_equal(a.hidden, b.hidden)
    assert not np.array_equal(a.hidden, other.hidden)
    assert (c[a.hidden] > 0).all()  # only observed non-zero entries are hidden
    assert a.n_skipped == 3 and a.skipped[:3].all() and not a.hidden[:3].any()
    nnz = (c[3:] > 0).sum(1)
    assert np.array_equal(a.hidden[3:].sum(1), np.maximum(1, np.round(0.1 * nnz)).astype(int))
    xm, cm = I.apply_hiding(I.lognorm(c), c, a)
    assert (cm[a.hidden] == 0).all() and (xm[a.hidden] == 0).all()
    assert np.array_equal(cm[~a.hidden], c[~a.hidden])
    with pytest.raises(ValueError, match=r"fraction=1\.5: must be in \(0, 1\)"):
        I.hide_nonzero(c, 1.5)


def test_scores_on_a_known_answer():
    c = counts_matrix()
    h = I.hide_nonzero(c, 0.2, seed=0, min_nonzero=10)
    truth = I.lognorm(c)
    perfect = I.score_hidden(truth, truth, h)
    assert perfect.pearson == pytest.approx(1.0) and perfect.spearman == pytest.approx(1.0)
    assert perfect.median_abs_error == 0.0
    assert perfect.n_entries == h.n_hidden and perfect.n_skipped == 3
    assert perfect.n_cells == c.shape[0] - 3
    # an affine map keeps r = 1 and shifts every hidden entry by a known error
    shifted = I.score_hidden(2 * truth + 1, truth, h)
    assert shifted.pearson == pytest.approx(1.0)
    assert shifted.median_abs_error == pytest.approx(float(np.median(truth[h.hidden] + 1)))
    # per gene: entry counts add up; a gene with too few hidden entries is NaN
    pg = shifted.per_gene
    assert pg["n"].sum() == h.n_hidden
    assert pg.loc[pg["n"] < I.MIN_ENTRIES_PER_GENE, "pearson"].isna().all()
    rng = np.random.default_rng(1)
    noise = I.score_hidden(rng.normal(size=truth.shape), truth, h)
    assert abs(noise.pearson) < 0.2


def test_knn_smoothing_beats_gene_mean_on_clustered_cells():
    rng = np.random.default_rng(0)
    centres = rng.gamma(2.0, 3.0, (3, 40))
    lab = np.repeat(np.arange(3), 60)
    c = rng.poisson(centres[lab] * rng.uniform(0.8, 1.2, (lab.size, 1))).astype(np.float32)
    x = I.lognorm(c)
    ref, q = np.arange(0, 180, 2), np.arange(1, 180, 2)
    h = I.hide_nonzero(c[q], 0.1, seed=0)
    xm, _ = I.apply_hiding(x[q], c[q], h)
    mean = I.score_hidden(I.gene_mean_imputation(x[ref], q.size), x[q], h)
    knn = I.score_hidden(I.knn_imputation(xm, x[ref], k=10), x[q], h)
    assert knn.pearson > mean.pearson + 0.1


def test_denoising_scores_per_program():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(50, 6))
    observed = truth + rng.normal(scale=1.0, size=truth.shape)
    df = I.denoising_scores(
        truth + 0.01 * rng.normal(size=truth.shape), observed, truth, ["a"] * 3 + ["b"] * 3
    )
    assert list(df["program"]) == ["a", "b", "all"]
    assert (df["decoded_pearson"] > 0.99).all() and (df["gain"] > 0.1).all()
    assert df.set_index("program").loc["all", "n_genes"] == 6


def test_model_imputation_goes_through_encode_dataset():
    from tests.helpers.vae_toy import make_paired
    from vae.data import from_anndata
    from vae.model import TwoBranchVAE, VAEArgs

    d = from_anndata(make_paired(12, n_genes=12))
    torch.manual_seed(0)
    m = TwoBranchVAE(VAEArgs(n_genes=12, crop_size=16, n_shared=4, channels=[8, 16], hidden=[16]))
    c = d.counts.numpy()
    rows = np.arange(6)
    h = I.hide_nonzero(c[rows], 0.2, seed=0, min_nonzero=3)
    xm, cm = I.apply_hiding(d.x.numpy()[rows], c[rows], h)
    masked = I.masked_tensors(d, rows, xm, cm)
    assert masked.n == 6 and not masked.has_image.any()
    assert torch.allclose(masked.library, torch.from_numpy(cm.sum(1)))
    p = I.model_imputation(m, masked)
    assert p.shape == (6, 12) and np.isfinite(p).all()
    # the model's decoding of the masked cells, not the masked input handed back
    from vae.infer import encode_dataset

    want = encode_dataset(m, masked, decode=True).decoded.rec_expression
    np.testing.assert_allclose(p, want, atol=1e-6)
    assert h.hidden.any() and not np.allclose(p[h.hidden], xm[h.hidden])
    fig = I.late_figure({"model": p}, d.x.numpy()[rows], h)
    assert len(fig.axes) == 1


def _bench_imputation():
    """scripts/bench_imputation.py as a module (it is a script, not a package)."""
    from tests.helpers.run import load_script

    return load_script("bench_imputation")


def _scvi_args(python: str, epochs: int = 2):
    from types import SimpleNamespace

    return SimpleNamespace(scvi_python=python, scvi_epochs=epochs, seed=0)


def test_bench_says_why_scvi_did_not_run(tmp_path):
    """An interpreter without scvi-tools: no prediction, a reason naming that interpreter."""
    import sys

    bench = _bench_imputation()
    fake = tmp_path / "python-without-scvi"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S -c 'import scvi_tools_absent' \"$@\"\n")
    fake.chmod(0o755)
    counts = np.ones((6, 4), np.float32)
    pred, status = bench.scvi_imputation(counts, counts, _scvi_args(str(fake)))
    assert pred is None
    assert status.startswith("not run") and str(fake) in status and "scvi" in status
    missing = str(tmp_path / "no-such-python")
    pred, status = bench.scvi_imputation(counts, counts, _scvi_args(missing))
    assert pred is None and status.startswith("not run") and missing in status


@pytest.mark.slow
def test_bench_runs_scvi_in_another_interpreter():
    """SCVI_PYTHON (a Python with scvi-tools, e.g. the [bench] environment) imputes the query."""
    import os

    py = os.environ.get("SCVI_PYTHON")
    if not py:
        pytest.skip("set SCVI_PYTHON to a Python that imports scvi-tools")
    bench = _bench_imputation()
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(80, 12)).astype(np.float32)
    pred, status = bench.scvi_imputation(counts[:60], counts[60:], _scvi_args(py))
    assert status.startswith("ran"), status
    assert pred.shape == (20, 12) and np.isfinite(pred).all() and (pred >= 0).all()
