"""scripts/unseen_source_check.py: a source left out of training, then scored on its crops."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from tests.helpers.run import TINY_TRAIN, load_script, run_stage_in_process
from tests.helpers.vae_toy import make_paired


def _table(path):
    """The toy paired table with two image sources, a crop label per crop and a profile
    label per profile (stage=pair's columns)."""
    a = make_paired(n=72, size=16, n_genes=12, image_only=12, expression_only=4)
    has_i = a.obs["has_image"].to_numpy(bool)
    src = np.where(np.arange(a.n_obs) % 2 == 0, "a", "b").astype(object)
    src[~has_i] = np.nan
    a.obs["image_source"] = src
    has_e = a.obs["has_expression"].to_numpy(bool)
    label = a.obs["label"].astype(str).to_numpy(object)
    ref = np.array([f"crop{i}" for i in range(a.n_obs)], object)
    for col, values, present in (
        ("image_label", label, has_i),
        ("expression_label", label, has_e),
        ("image_ref", ref, has_i),
    ):
        a.obs[col] = np.where(present, values, None)
    a.write_h5ad(path)
    return a


def mod_features():
    return load_script("image_branch_check").MORPHOLOGY_FEATURES


def test_hold_out_then_score_a_source_the_model_never_saw(tmp_path, capsys, monkeypatch):
    mod = load_script("unseen_source_check")
    full = _table(tmp_path / "paired.h5ad")
    out = tmp_path / "lso" / "no_b.h5ad"
    counts = mod.hold_out(tmp_path / "paired.h5ad", ["b"], out)
    held = ad.read_h5ad(out)
    b = (full.obs["image_source"] == "b").to_numpy()
    b_paired = b & full.obs["has_expression"].to_numpy(bool)
    # a crop of b with a profile stays as that profile's expression-only row; an image-only
    # crop of b is dropped; nothing of b's crops is left to train on
    assert counts["rows_now_expression_only"] == int(b_paired.sum()) > 0
    assert counts["rows_dropped"] == int((b & ~b_paired).sum()) > 0
    assert held.n_obs == full.n_obs - counts["rows_dropped"]
    assert not (held.obs["image_source"] == "b").any()
    gone = held.obs_names.isin(full.obs_names[b_paired])
    assert not held.obs["has_image"].to_numpy(bool)[gone].any()
    assert held.obs["has_expression"].to_numpy(bool)[gone].all()
    assert not held.obsm["crops"][gone].any() and not held.obsm["masks"][gone].any()
    np.testing.assert_array_equal(held[gone].X, full[full.obs_names[b_paired]].X)
    assert held.uns["held_out_image_sources"] == ["b"]
    assert not list(out.parent.glob("*.part"))  # written whole, then renamed
    with pytest.raises(SystemExit, match="not an image_source"):
        mod.hold_out(tmp_path / "paired.h5ad", ["c"], tmp_path / "x.h5ad")

    run = run_stage_in_process(
        [
            f"paths.root={tmp_path}",
            "experiment=lso",
            f"paths.inputs.paired={out}",
            *TINY_TRAIN,
        ],
        "train",
    )
    res = mod.score(run, tmp_path / "paired.h5ad", ["b"])
    n_b = int((b & full.obs["has_image"].to_numpy(bool)).sum())
    assert res["n_held_out_crops"] == n_b and sum(res["classes"].values()) == n_b
    assert res["n_reference_crops"] == int(
        (held.obs["has_image"] & held.obs["image_label"].notna()).sum()
    )
    for key in ("loo1nn", "loo_knn", "transfer_knn"):
        for name in ("image", "image_shared", "pixel_pca"):
            assert 0 <= res[f"{key}_{name}"] <= 1 and 0 <= res[f"{key}_{name}_balanced"] <= 1
    # a few labelled crops per class of the source itself as the reference; with as many
    # shots as a class has crops, nothing is left to score
    for name in ("image", "pixel_pca"):
        assert 0 <= res[f"fewshot5_knn_{name}"] <= 1
        assert 0 <= res[f"fewshot5_knn_{name}_balanced"] <= 1
    few = mod._few_shot(np.zeros((6, 2)), np.array(list("aabbcc")), shots=2, k=1)
    assert np.isnan(few).all()
    assert mod._few_shot(np.eye(6)[[0, 0, 0, 1, 1, 1]], np.array(list("aaabbb")), 2, 1) == (
        1.0,
        1.0,
    )
    # the pixel baseline is leave-one-out 1-NN on as many PCs of the masked crops
    from sklearn.decomposition import PCA
    from sklearn.model_selection import LeaveOneOut, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rows = b & full.obs["has_image"].to_numpy(bool)
    pix = (full.obsm["crops"][rows] / 255.0 * full.obsm["masks"][rows][..., None]).transpose(
        0, 3, 1, 2
    )
    pcs = PCA(res["n_pcs"], random_state=0).fit_transform(pix.reshape(rows.sum(), -1))
    y = full.obs["image_label"].to_numpy()[rows].astype(str)
    want = cross_val_score(KNeighborsClassifier(1), pcs, y, cv=LeaveOneOut()).mean()
    assert res["loo1nn_pixel_pca"] == pytest.approx(want)
    # morphology: one cross-validated Spearman per measured feature, code and pixels alike
    for name in ("image", "pixel_pca"):
        rho = [res[f"morph_{name}_{f}"] for f in mod_features()]
        assert all(np.isnan(r) or -1 <= r <= 1 for r in rho), rho
    assert res["morph_within_label"] == max(res["classes"], key=res["classes"].get)
    print(mod._table(res))
    assert "raw-pixel PCA" in capsys.readouterr().out
    # what stage=embed tells a user of those crops: shares and accuracies
    for key in ("embed_label_accuracy", "embed_atypical", "embed_unclassified"):
        assert 0 <= res[key] <= 1, key
    assert np.isnan(res["embed_called_accuracy"]) or 0 <= res["embed_called_accuracy"] <= 1
    assert 0 <= res["embed_shift_share"] <= 1 and isinstance(res["embed_shifted"], bool)
    # colours matched first: the held-out crops, as one group, to the training crops'
    # CIELAB statistics
    import vae.stain

    seen, original = {}, vae.stain.match_stain

    def spy(crops, masks, mean, sd, groups=None):
        seen.update(n=len(crops), mean=mean, sd=sd, groups=groups)
        return original(crops, masks, mean, sd, groups)

    monkeypatch.setattr(vae.stain, "match_stain", spy)
    matched = mod.score(run, tmp_path / "paired.h5ad", ["b"], stain_match=True)
    assert matched["stain_match"] and matched["n_held_out_crops"] == n_b == seen["n"]
    ref = held.obs["has_image"].to_numpy(bool) & held.obs["image_label"].notna().to_numpy()
    want_mean, want_sd = vae.stain.lab_stats(held.obsm["crops"][ref], held.obsm["masks"][ref])
    np.testing.assert_allclose(seen["mean"], want_mean)
    np.testing.assert_allclose(seen["sd"], want_sd)
    assert seen["groups"] is None
    assert 0 <= matched["loo1nn_image"] <= 1
    # one data set of the source: the crops whose image_ref matches
    part = mod.score(run, tmp_path / "paired.h5ad", ["b"], ref_pattern=r"crop\d*[13]$")
    ends = full.obs["image_ref"].astype(str).str.contains(r"crop\d*[13]$").to_numpy()
    assert part["n_held_out_crops"] == int((rows & ends).sum()) < n_b
    with pytest.raises(SystemExit, match="no crop of the source matches"):
        mod.score(run, tmp_path / "paired.h5ad", ["b"], ref_pattern="nothing")
    # a run that did see the source is scored, with a warning that it is not unseen
    mod.score(run, out, ["a"])
    assert "not unseen" in capsys.readouterr().out
