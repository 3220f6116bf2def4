"""Atypical-cell scores: kNN latent density, robust z, and an out-of-distribution row."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.hardware import DistInfo
from tests.helpers.vae_toy import make_paired
from vae.analysis import anomaly as A
from vae.inputs.schema import ANOMALY_COLUMNS, ANOMALY_SCORE


def test_knn_distance_leaves_a_rows_own_entry_out():
    ref = np.array([[0.0], [1.0], [3.0]])
    own = A.knn_distance(ref, ref, k=1, self_in_ref=np.ones(3, bool))
    assert np.allclose(own, [1.0, 1.0, 2.0])
    new = A.knn_distance(np.array([[10.0]]), ref, k=2)
    assert np.allclose(new, [(7.0 + 9.0) / 2])


def test_combined_score_is_highest_for_the_outlier_and_nan_safe():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = rng.normal(size=50)
    a[-1], b[-1] = 8.0, 6.0
    b[0] = np.nan  # a row without that modality still gets a score from the other
    df = A.combine({"a": a, "b": b}, reference={"a": a[:40], "b": b[:40]})
    assert df[ANOMALY_SCORE].idxmax() == 49
    assert np.isfinite(df[ANOMALY_SCORE]).all()
    assert A.roc_auc(df[ANOMALY_SCORE].to_numpy(), np.arange(50) == 49) == 1.0
    # a score without a reference scale is kept as a column but not combined
    only_a = A.combine({"a": a, "b": b}, reference={"a": a[:40]})
    assert np.allclose(only_a[ANOMALY_SCORE], A.robust_z(a, a[:40]))
    assert np.array_equal(only_a["b"].to_numpy(), b, equal_nan=True)


def _sq_maha(z, x):
    """Squared Mahalanobis distance of z's rows under a Ledoit-Wolf Gaussian of x (by hand)."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(x)
    d = z - x.mean(0)
    return np.einsum("nd,de,ne->n", d, lw.precision_, d)


def test_class_distance_is_relative_mahalanobis_to_the_nearest_class():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    # two classes along x (a continuum cut in two), unit spread
    a = rng.normal(size=(60, 2)) + [0.0, 0.0]
    b = rng.normal(size=(60, 2)) + [4.0, 0.0]
    ref = np.concatenate([a, b])
    lab = np.array(["a"] * 60 + ["b"] * 60)
    z = np.array([[0.0, 0.0], [4.0, 0.0], [-4.0, 0.0], [2.0, 0.0]])
    got = A.class_distance(z, ref, lab)
    # by hand: tied within-class covariance, minus the background Gaussian's distance
    resid = np.concatenate([a - a.mean(0), b - b.mean(0)])
    prec = LedoitWolf(assume_centered=True).fit(resid).precision_
    per_class = np.stack(
        [np.einsum("nd,de,ne->n", z - c.mean(0), prec, z - c.mean(0)) for c in (a, b)], 1
    )
    assert np.allclose(got, per_class.min(1) - _sq_maha(z, ref))
    # past the end of the continuum scores above both class centres and the gap between them
    assert got[2] > max(got[0], got[1], got[3])


def test_class_distance_without_two_classes_is_the_background_distance():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(40, 3))
    z = rng.normal(size=(5, 3)) * 3
    # unknown labels and a class of two rows define no Gaussian
    lab = np.array(["NA"] * 20 + ["nan"] * 18 + ["x", "x"])
    assert np.allclose(A.class_distance(z, ref, lab), _sq_maha(z, ref))
    lab2 = np.array(["a"] * 38 + ["x", "x"])
    assert np.allclose(A.class_distance(z, ref, lab2), _sq_maha(z, ref))


def test_modality_latent_takes_shared_and_own_private_block():
    z = np.arange(2 * 7, dtype=float).reshape(2, 7)  # n_shared 3, n_private 2
    assert np.array_equal(A.modality_latent(z, 3, 2, "image"), z[:, :5])
    assert np.array_equal(A.modality_latent(z, 3, 2, "expression"), z[:, [0, 1, 2, 5, 6]])
    assert np.array_equal(A.modality_latent(z[:, :3], 3, 0, "expression"), z[:, :3])


def test_out_of_distribution_row_scores_higher_after_training(tmp_path):
    from vae.data import from_anndata
    from vae.losses import LossWeights
    from vae.model import TwoBranchVAE, VAEArgs
    from vae.train import TrainArgs, train

    adata = make_paired(36, n_genes=12, seed=0)
    # the last row: an image unlike any cell (noise) and a profile on genes no kind uses
    rng = np.random.default_rng(1)
    adata.obsm["crops"][-1] = rng.integers(0, 255, adata.obsm["crops"][-1].shape, dtype=np.uint8)
    cnt = np.zeros(12, np.float32)
    cnt[[1, 4]] = 150.0
    adata.layers["counts"][-1] = cnt
    adata.X[-1] = np.log1p(cnt / cnt.sum() * 1e4)
    d = from_anndata(adata)
    split = np.array(["train"] * 30 + ["val"] * 3 + ["test"] * 3)
    torch.manual_seed(0)
    m = TwoBranchVAE(
        VAEArgs(n_genes=12, crop_size=16, n_shared=4, channels=[8, 16], hidden=[16], dropout=0.0)
    )
    args = TrainArgs(
        max_epochs=12,
        batch_size=16,
        augment=False,
        weights=LossWeights(),
        log_every_steps=10**6,
        image_every_epochs=10**6,
    )
    train(m, d, split, args, DistInfo(0, 1, 0, torch.device("cpu")), tmp_path)
    df = A.anomaly_scores(m, d, split == "train", k=5)
    assert set(ANOMALY_COLUMNS.values()) == set(df.columns)
    assert df[ANOMALY_SCORE].to_numpy().argmax() == d.n - 1
    for col in (
        ANOMALY_COLUMNS["image_reconstruction"],
        ANOMALY_COLUMNS["expression_reconstruction"],
    ):
        others = df[col].to_numpy()[:-1]
        assert df[col].iloc[-1] > np.percentile(others, 90)


def test_rescore_latent_reproduces_the_scores_of_the_training_rows_reference():
    """A latent.h5ad's own layout (obsm shared + private per expert, obs split, label and
    reconstruction columns) rescored gives what score_rows gives with the reference built
    by hand from the training rows, as stage=train builds it."""
    from types import SimpleNamespace

    import anndata as ad
    import pandas as pd

    from vae.scverse import latent_obsm

    rng = np.random.default_rng(3)
    n, ns, npv = 80, 3, 2
    full = {m: rng.normal(size=(n, ns + 2 * npv)) for m in ("joint", "image", "expression")}
    lat = SimpleNamespace(  # the fields of vae.infer.Latents that latent_obsm reads
        joint=full["joint"],
        image=full["image"],
        expression=full["expression"],
        joint_logvar=np.zeros((n, ns + 2 * npv)),
    )
    split = np.array(["train"] * 60 + ["val"] * 10 + ["test"] * 10)
    labels = np.array(["a", "b", "c", "d"] * 20)
    rec = {"image": rng.gamma(2.0, size=n), "expression": rng.gamma(3.0, size=n)}
    obs = pd.DataFrame({"split": split, "label": labels}, index=[f"c{i}" for i in range(n)])
    for m in A.MODALITIES:
        obs[ANOMALY_COLUMNS[f"{m}_reconstruction"]] = rec[m]
    latent = ad.AnnData(obs=obs, obsm=latent_obsm(lat, ns, npv))

    got = A.rescore_latent(latent, ns, npv, k=5)
    # by hand: each modality's latent is its expert's shared dims and its own private block
    z = {
        "image": full["image"][:, : ns + npv],
        "expression": np.concatenate(
            [full["expression"][:, :ns], full["expression"][:, ns + npv :]], 1
        ),
    }
    tr = split == "train"
    ref = A.Reference({m: v[tr] for m, v in z.items()}, labels[tr], {})
    raw = A.latent_scores(z, ref, 5, self_in_ref=tr)
    raw.update({f"{m}_reconstruction": rec[m] for m in A.MODALITIES})
    ref.raw = {key: v[tr] for key, v in raw.items()}
    want = A.score_rows(rec, z, ref, 5, self_in_ref=tr)
    assert list(got.columns) == list(want.columns)
    assert np.allclose(got.to_numpy(), want.to_numpy(), atol=1e-5)
    # the kNN scale of a training row leaves the row itself out
    assert np.allclose(
        got[ANOMALY_COLUMNS["image_latent"]].to_numpy()[tr],
        A.knn_distance(z["image"][tr], z["image"][tr], 5, self_in_ref=np.ones(60, bool)),
        atol=1e-5,
    )


def test_held_out_rows_with_a_training_profile_are_found():
    """Pairing by label reuses profiles: a test row whose profile is also a train/val
    row's is flagged (stage=evaluate leaves it out of the joint / expression scores);
    image-only rows, rows without a profile and profiles seen only in test are not."""
    import anndata as ad
    import pandas as pd

    from vae.analysis.evaluate import seen_profiles

    obs = pd.DataFrame(
        {
            "expression_ref": ["p1", "p2", "p1", "p3", "", "p2", "p4", "p4"],
            "has_expression": [True, True, True, True, False, True, True, True],
            "split": ["train", "val", "test", "test", "test", "test", "test", "test"],
        },
        index=[f"r{i}" for i in range(8)],
    )
    lat = ad.AnnData(obs=obs)
    rows = np.flatnonzero(obs["split"].to_numpy() == "test")
    got = seen_profiles(lat, rows)
    assert got.tolist() == [False, False, True, False, False, True, False, False]
    assert not seen_profiles(ad.AnnData(obs=obs[["split"]]), rows).any()  # no column
