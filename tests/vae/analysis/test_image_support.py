"""Image support of latent points (vae.analysis.traverse.image_support): which decoded
cells of a path are drawn where crops were seen, and the fading of the others."""

import numpy as np
import pytest

from vae.analysis.traverse import fade_unsupported, image_support, neighbour_labels


def _cloud(n=200, d=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def test_points_inside_the_cloud_are_supported_and_far_ones_not():
    ref = _cloud()
    pts = np.vstack([ref[:5] + 0.01, np.full((3, 4), 25.0)])
    sup = image_support(pts, ref, k=5, quantile=0.99)
    assert sup.supported.tolist() == [True] * 5 + [False] * 3
    assert sup.distance.shape == (8,)
    assert np.all(sup.distance[5:] > 20)


def test_threshold_is_the_quantile_of_the_rows_own_neighbour_distances():
    from sklearn.neighbors import NearestNeighbors

    ref = _cloud(100)
    own = NearestNeighbors(n_neighbors=4).fit(ref).kneighbors(ref)[0][:, 1:].mean(1)
    sup = image_support(ref[:2], ref, k=3, quantile=0.5)
    assert sup.threshold == pytest.approx(np.quantile(own, 0.5))
    # a point exactly at the threshold distance is supported; just past it is not
    line = np.arange(4.0)[:, None]  # each row's nearest other row is 1 away: threshold 1
    s = image_support(np.array([[4.0], [4.01]]), line, k=1, quantile=1.0)
    assert s.threshold == 1.0 and s.supported.tolist() == [True, False]


def test_more_coverage_with_a_higher_quantile():
    ref = _cloud(300, seed=1)
    pts = _cloud(50, seed=2) * 1.8  # partly outside the reference cloud
    n = [image_support(pts, ref, 5, q).supported.sum() for q in (0.5, 0.9, 1.0)]
    assert n[0] <= n[1] <= n[2]
    assert n[0] < n[2]


def test_no_reference_rows_means_no_support():
    sup = image_support(np.zeros((3, 2)), np.zeros((1, 2)))
    assert not sup.supported.any()
    assert np.isnan(sup.threshold)
    with pytest.raises(ValueError, match="quantile"):
        image_support(np.zeros((1, 2)), _cloud(10, 2), quantile=0.0)


def test_nan_reference_rows_are_left_out():
    ref = _cloud(50, 3)
    with_nan = np.vstack([ref, np.full((5, 3), np.nan)])
    a = image_support(ref[:4], ref)
    b = image_support(ref[:4], with_nan)
    np.testing.assert_allclose(a.distance, b.distance)


def test_fade_blends_only_unsupported_images_towards_white():
    imgs = np.zeros((3, 4, 4, 3))
    imgs[1] = 0.5
    out = fade_unsupported(imgs, np.array([True, False, False]), keep=0.25)
    np.testing.assert_array_equal(out[0], imgs[0])
    np.testing.assert_allclose(out[1], 0.25 * 0.5 + 0.75)
    np.testing.assert_allclose(out[2], 0.75)
    assert imgs[1].max() == 0.5  # the input is not changed


def test_nearest_to_mean_picks_a_candidate_cell_and_sweep_codes_move_one_dim():
    from vae.analysis.traverse import nearest_to_mean, sweep_codes

    z = np.array([[0.0, 0.0], [10.0, 0.0], [4.0, 1.0], [6.0, 3.0]])  # mean (5, 1)
    assert nearest_to_mean(z, np.arange(4)) == 2
    assert nearest_to_mean(z, np.array([0, 1, 3])) == 3  # only candidates count
    with pytest.raises(ValueError, match="no candidate"):
        nearest_to_mean(z, np.array([], int))
    s = sweep_codes(z[2], 1, np.array([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(s[:, 0], 4.0)
    np.testing.assert_array_equal(s[:, 1], [-1.0, 0.0, 2.0])


def test_neighbour_labels_name_the_crops_a_step_is_drawn_from():
    """Two labelled clusters and unlabelled crops: a point is named after the labelled
    crops around it, with their share; unlabelled crops never vote; a point between the
    clusters gets a split share; ties go to the nearer crop's label."""
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.1, size=(20, 2))
    b = rng.normal(0, 0.1, size=(20, 2)) + [5, 0]
    unl = rng.normal(0, 0.1, size=(30, 2)) + [5, 0]  # unlabelled crops on top of b
    ref = np.vstack([a, b, unl])
    lab = np.array(["eos"] * 20 + ["neut"] * 20 + [""] * 15 + ["nan"] * 15)
    got = neighbour_labels(np.array([[0, 0], [5, 0], [2.5, 0]]), ref, lab, k=40)
    assert got.label[:2].tolist() == ["eos", "neut"]
    assert got.share[:2].tolist() == [0.5, 0.5]  # 40 neighbours: 20 of one class + 20 of the other
    near = neighbour_labels(np.array([[0, 0], [5, 0]]), ref, lab, k=5)
    assert near.label.tolist() == ["eos", "neut"] and near.share.tolist() == [1.0, 1.0]
    # a tie (1 : 1) goes to the label of the nearest crop
    tie = neighbour_labels(
        np.array([[0.9, 0]]), np.array([[1.0, 0], [0, 0]]), np.array(["x", "y"]), 2
    )
    assert tie.label[0] == "x" and tie.share[0] == 0.5


def test_neighbour_labels_without_labelled_crops_are_empty():
    got = neighbour_labels(np.zeros((3, 2)), _cloud(10, 2), np.array([""] * 10))
    assert got.label.tolist() == ["", "", ""] and not got.share.any()
    with pytest.raises(ValueError, match="10 codes but 9 labels"):
        neighbour_labels(np.zeros((1, 2)), _cloud(10, 2), np.array(["a"] * 9))


def test_a_point_without_a_code_is_not_supported():
    """A NaN point (a cell lacking the modality) gets distance NaN, unsupported; the
    others as without it (no sklearn 'Input X contains NaN')."""
    ref = _cloud()
    pts = np.vstack([ref[:2], np.full((1, ref.shape[1]), np.nan)])
    sup = image_support(pts, ref)
    clean = image_support(ref[:2], ref)
    assert np.isnan(sup.distance[2]) and not sup.supported[2]
    assert np.array_equal(sup.distance[:2], clean.distance)
    assert np.array_equal(sup.supported[:2], clean.supported)
    assert image_support(pts[:0], ref).supported.shape == (0,)
