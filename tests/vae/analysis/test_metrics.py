"""Metrics on hand-made latents with known answers."""

import numpy as np
import pytest

from vae.analysis import metrics as M


def _separated(n_per=20, d=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.eye(d)[:3] * 20.0
    z = np.concatenate([c + rng.normal(0, 0.1, (n_per, d)) for c in centers])
    y = np.repeat(["a", "b", "c"], n_per)
    return z, y


def test_knn_accuracy_perfectly_separated_is_one():
    z, y = _separated()
    assert M.knn_accuracy(z, y, k=5) == 1.0
    assert M.knn_accuracy(z[::2], y[::2], k=5, z_ref=z[1::2], labels_ref=y[1::2]) == 1.0


def test_knn_accuracy_swapped_reference_labels_is_zero():
    z, y = _separated()
    wrong = np.where(y == "a", "b", np.where(y == "b", "c", "a"))
    assert M.knn_accuracy(z, y, k=3, z_ref=z, labels_ref=wrong) == 0.0


def test_knn_vote_share_counts_the_neighbours_of_the_vote():
    # 1-D points: the 4 nearest reference cells of 0.0 are 0.1, -0.2, 0.3 (a) and 0.35 (b)
    z_ref = np.array([[0.1], [-0.2], [0.3], [0.35], [5.0], [6.0]])
    y_ref = np.array(["a", "a", "a", "b", "b", "b"])
    z = np.array([[0.0], [5.5]])
    call = M.knn_predict(z, np.array(["b", "b"]), 4, z_ref, y_ref)
    assert list(call) == ["a", "b"]
    share = M.knn_vote_share(z, np.array(["b", "b"]), call, 4, z_ref, y_ref)
    assert np.allclose(share, [0.75, 0.75])  # 5.5: 5.0, 6.0 (b), 0.35 (b), 0.3 (a)
    own = M.knn_vote_share(z, np.array(["b", "b"]), np.array(["b", "b"]), 4, z_ref, y_ref)
    assert np.allclose(own, [0.25, 0.75])
    # leave-one-out: a cell is never its own neighbour
    z2, y2 = _separated(n_per=5)
    loo = M.knn_vote_share(z2, y2, y2, 4)
    assert np.allclose(loo, 1.0)
    assert np.allclose(M.knn_vote_share(z2, y2, np.full(len(y2), "zz"), 4), 0.0)


def test_knn_call_voters_are_the_neighbours_carrying_the_call():
    z_ref = np.array([[0.1], [-0.2], [0.3], [0.35], [5.0], [6.0]])
    y_ref = np.array(["a", "a", "a", "b", "b", "b"])
    z = np.array([[0.0], [5.5]])
    calls = np.array(["a", "b"])
    v = M.knn_call_voters(z, np.array(["b", "b"]), calls, 4, z_ref, y_ref)
    assert list(v[0]) == [0, 1, 2]  # nearest first; 0.35 (b) does not vote "a"
    assert sorted(v[1]) == [3, 4, 5]
    # as many voters as the vote share says
    share = M.knn_vote_share(z, np.array(["b", "b"]), calls, 4, z_ref, y_ref)
    assert [len(x) for x in v] == list(share * 4)
    # leave-one-out: a cell never votes for itself
    z2, y2 = _separated(n_per=5)
    loo = M.knn_call_voters(z2, y2, y2, 4)
    assert all(i not in row and len(row) == 4 for i, row in enumerate(loo))
    assert all((y2[row] == y2[i]).all() for i, row in enumerate(loo))


def test_silhouette_and_leiden_on_separated_clusters():
    z, y = _separated()
    assert M.silhouette(z, y) > 0.95
    agree = M.leiden_agreement(z, y, n_neighbors=10, resolution=0.5)
    assert agree.ari == 1.0 and agree.nmi == pytest.approx(1.0)
    assert agree.n_clusters == 3


def test_retrieval_identity_is_perfect_and_shuffled_is_not():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(40, 5))
    r = M.retrieval(z, z + 1e-3)
    assert (r.recall_at_1, r.recall_at_5, r.recall_at_10, r.foscttm) == (1.0, 1.0, 1.0, 0.0)
    # reversed order: the true partner of row i is row 39 - i, never the nearest
    rs = M.retrieval(z, z[::-1].copy())
    assert rs.recall_at_1 <= 1 / 40
    assert rs.foscttm > 0.2


def test_retrieval_hand_computed_foscttm():
    # 1-D: queries 0, 1, 2; targets 0, 2, 1 -> row 1's partner (2) is farther than target 2 (1)
    q = np.array([[0.0], [1.0], [2.0]])
    t = np.array([[0.0], [2.0], [1.0]])
    r = M.retrieval(q, t)
    # query side: row0 0 closer, row1 |1-2|=1 vs |1-1|=0 -> 1 closer (target2), |1-0|=1 tie not closer
    # row2 |2-1|=1 vs target1 |2-2|=0 -> 1 closer; fractions 0, 1/2, 1/2
    assert r.recall_at_1 == pytest.approx(1 / 3)
    assert r.foscttm == pytest.approx(1 / 3)


def test_mig_axis_aligned_high_rotated_low():
    rng = np.random.default_rng(0)
    n = 3000
    f = rng.uniform(0, 1, (n, 2))
    aligned = np.c_[f, rng.normal(0, 1, (n, 2))]
    m_al = M.mig(aligned, {"a": f[:, 0], "b": f[:, 1]}, bins=20)
    th = np.pi / 4
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    rotated = np.c_[f @ rot.T, rng.normal(0, 1, (n, 2))]
    m_rot = M.mig(rotated, {"a": f[:, 0], "b": f[:, 1]}, bins=20)
    assert m_al.mig > 0.7
    assert m_rot.mig < 0.15
    assert m_al.best_dim == {"a": 0, "b": 1}


def test_dci_axis_aligned_beats_rotated_and_handles_categorical():
    rng = np.random.default_rng(0)
    n = 600
    f = rng.uniform(0, 1, (n, 2))
    kind = np.where(f[:, 0] > 0.5, "x", "y")
    aligned = np.c_[f, rng.normal(0, 1, (n, 1))]
    d_al = M.dci(aligned, {"a": f[:, 0], "b": f[:, 1]}, n_estimators=20)
    rot = np.c_[(f[:, 0] + f[:, 1]), (f[:, 0] - f[:, 1]), rng.normal(0, 1, n)]
    d_rot = M.dci(rot, {"a": f[:, 0], "b": f[:, 1]}, n_estimators=20)
    assert d_al.disentanglement > 0.8 and d_al.completeness > 0.7
    assert d_al.disentanglement > d_rot.disentanglement + 0.3
    assert d_al.informativeness["a"] > 0.9
    d_cat = M.dci(aligned, {"kind": kind}, n_estimators=10)
    assert d_cat.informativeness["kind"] > 0.95
    assert int(np.argmax(d_cat.importance[:, 0])) == 0


def test_best_dim_spearman_finds_the_monotone_dim_and_skips_nan():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 50)
    z = np.c_[rng.normal(size=50), -np.exp(3 * t), rng.normal(size=50)]
    t_nan = t.copy()
    t_nan[:5] = np.nan
    b = M.best_dim_spearman(z, t_nan)
    assert b.dim == 1 and b.spearman == pytest.approx(-1.0)


def test_feature_prediction_reads_features_the_code_holds_and_not_others():
    rng = np.random.default_rng(1)
    n = 300
    shape, colour = rng.normal(size=n), rng.normal(size=n)
    # the code holds `shape` (scaled, mixed into two dims) and noise; not `colour`
    z = np.c_[100 * shape + rng.normal(size=n), shape - rng.normal(size=n), rng.normal(size=(n, 3))]
    feats = np.c_[shape, colour]
    feats[:7, 0] = np.nan  # unmeasured cells are skipped, not fatal
    fit, test = slice(0, 200), slice(200, None)
    rho = M.feature_prediction(z[fit], feats[fit], z[test], feats[test])
    assert rho.shape == (2,)
    assert rho[0] > 0.95
    assert abs(rho[1]) < 0.25
    # a constant feature, or too few measured cells, has no score
    flat = M.feature_prediction(z[fit], np.ones(200), z[test], np.ones(100))
    assert np.isnan(flat).all()
    sparse = feats[test].copy()
    sparse[5:, 0] = np.nan  # 5 measured held-out cells < min_rows
    assert np.isnan(M.feature_prediction(z[fit], feats[fit], z[test], sparse)[0])
    with pytest.raises(ValueError, match="do not match"):
        M.feature_prediction(z[fit], feats[fit], z[test, :2], feats[test])


def test_masked_mse_ignores_background_exactly():
    target = np.zeros((2, 4, 4, 3))
    pred = np.zeros((2, 4, 4, 3))
    mask = np.zeros((2, 4, 4), bool)
    mask[:, 1:3, 1:3] = True
    pred[:, 0, 0] = 1.0  # error outside the mask only
    pred[1, 1, 1] = 0.5  # one masked pixel off by 0.5 in all channels
    mse = M.masked_mse(pred, target, mask)
    assert mse[0] == 0.0
    assert mse[1] == pytest.approx(0.25 / 4)
    # channel-first layout gives the same answer
    mse_cf = M.masked_mse(np.moveaxis(pred, -1, 1), np.moveaxis(target, -1, 1), mask)
    np.testing.assert_allclose(mse, mse_cf)


def test_masked_ssim_identity_is_one():
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(2, 16, 16, 3))
    mask = np.ones((2, 16, 16), bool)
    np.testing.assert_allclose(M.masked_ssim(img, img, mask), 1.0)
    assert (M.masked_ssim(img, 1 - img, mask) < 0.5).all()


def test_per_gene_correlation_exact():
    x = np.arange(10.0)
    obs = np.c_[x, x, x**2, np.ones(10)]
    pred = np.c_[2 * x + 1, -x, x, np.arange(10.0)]
    c = M.per_gene_correlation(pred, obs)
    np.testing.assert_allclose(c.pearson[:2], [1.0, -1.0])
    assert c.spearman[2] == pytest.approx(1.0)
    assert np.isnan(c.pearson[3])


def test_nb_log_likelihood_matches_scipy():
    from scipy import stats

    counts = np.array([[0.0, 3.0, 10.0]])
    mu = np.array([[1.0, 2.5, 8.0]])
    theta = np.array([2.0, 5.0, 0.5])
    p = theta / (theta + mu)
    expected = stats.nbinom.logpmf(counts, theta, p).sum(1)
    np.testing.assert_allclose(M.nb_log_likelihood(counts, mu, theta), expected)
    with pytest.raises(ValueError, match="mu and theta"):
        M.nb_log_likelihood(counts, -mu, theta)


def test_correlation_matrix_shape_and_values():
    x = np.c_[np.arange(10.0), -np.arange(10.0)]
    y = np.arange(10.0) ** 3
    c = M.correlation_matrix(x, y)
    assert c.shape == (2, 1)
    np.testing.assert_allclose(c[:, 0], [1.0, -1.0])


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="z: contains NaN"):
        M.knn_accuracy(np.array([[np.nan, 0.0], [1.0, 1.0]]), ["a", "b"])
    with pytest.raises(ValueError, match="labels: has 1 rows"):
        M.silhouette(np.zeros((3, 2)), ["a"])


def test_mig_and_dci_leave_out_unknown_factor_rows():
    rng = np.random.default_rng(0)
    n = 800
    t = rng.uniform(0, 1, n)
    z = np.c_[t, rng.normal(size=n)]
    t_part = t.copy()
    t_part[: n // 4] = np.nan  # e.g. lymphocytes have no maturation t
    kind = np.where(np.arange(n) < n // 4, "lympho", np.where(t > 0.5, "late", "early"))
    m = M.mig(z, {"t": t_part, "kind": kind})
    assert m.best_dim["t"] == 0 and m.per_factor["t"] > 0.5
    d = M.dci(z, {"t": t_part}, n_estimators=10)
    assert d.informativeness["t"] > 0.9
    assert list(M.known_rows(np.array(["a", "nan", None], dtype=object))) == [True, False, False]


def test_label_transfer_counts_per_class():
    from vae.analysis.metrics import label_transfer

    true = np.array(["a", "a", "a", "b", "b", "c"])
    pred = np.array(["a", "a", "b", "b", "a", "b"])
    lt = label_transfer(true, pred)
    assert lt.classes == ["a", "b", "c"]
    np.testing.assert_array_equal(lt.confusion, [[2, 1, 0], [1, 1, 0], [0, 1, 0]])
    np.testing.assert_allclose(lt.recall, [2 / 3, 1 / 2, 0.0])
    np.testing.assert_allclose(lt.precision[:2], [2 / 3, 1 / 3])
    assert np.isnan(lt.precision[2])  # "c" is never predicted
    assert lt.accuracy == pytest.approx(3 / 6)
    assert lt.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_knn_predict_matches_accuracy():
    from vae.analysis.metrics import knn_accuracy, knn_predict

    rng = np.random.default_rng(0)
    z_ref = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(3, 0.1, (20, 2))])
    y_ref = np.array(["x"] * 20 + ["y"] * 20)
    z = np.array([[0.0, 0.0], [3.0, 3.0], [2.9, 3.1]])
    y = np.array(["x", "y", "x"])
    pred = knn_predict(z, y, 5, z_ref, y_ref)
    np.testing.assert_array_equal(pred, ["x", "y", "y"])
    assert knn_accuracy(z, y, 5, z_ref, y_ref) == pytest.approx(2 / 3)


def test_known_labels_one_rule():
    from vae.inputs.schema import known_labels

    got = known_labels(np.array(["a", "", "nan", "None", "NA", None, np.nan, "b"], dtype=object))
    np.testing.assert_array_equal(got, [True, False, False, False, False, False, False, True])


def test_modality_mixing_tells_islands_by_kind_from_a_mixed_class():
    """Crop and profile-only cells of a class in two islands: each cell's class
    neighbours are all of its kind (share 1 against ~0.5 if mixed); drawn from one cloud:
    near the expectation. Classes with too few of one kind are not scored."""
    from vae.analysis.metrics import modality_mixing

    rng = np.random.default_rng(0)
    n = 40
    img = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    labels = np.array(["neu"] * (2 * n))
    apart = np.r_[rng.normal(0, 0.1, (n, 2)), rng.normal(5, 0.1, (n, 2))]
    r = modality_mixing(apart, img, labels, k=10)
    assert r["same_kind_share"] == 1.0 and r["classes"] == ["neu"] and r["n_cells"] == 2 * n
    assert r["if_mixed"] == pytest.approx((n - 1) / (2 * n - 1))
    assert r["separation"] == 1.0
    mixed = rng.normal(0, 1, (2 * n, 2))
    m = modality_mixing(mixed, img, labels, k=10)
    assert abs(m["same_kind_share"] - m["if_mixed"]) < 0.15 and abs(m["separation"]) < 0.3
    # a second class with 3 crops only: left out; no class with both kinds: None
    lab2 = np.r_[labels, ["eos"] * 8]
    img2 = np.r_[img, [True] * 3 + [False] * 5]
    z2 = np.r_[apart, rng.normal(9, 0.1, (8, 2))]
    assert modality_mixing(z2, img2, lab2, k=10)["classes"] == ["neu"]
    assert modality_mixing(apart, np.ones(2 * n, bool), labels) is None


def test_per_cell_weights_count_each_specimen_once():
    import pandas as pd

    spec = np.array(["a", "a", "", None, "b", "a", np.nan], dtype=object)
    w = M.per_cell_weights(spec)
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1, 1, 1, 1 / 3, 1])
    assert w.sum() == pytest.approx(5)  # a, b and three rows of their own
    # every spelling of a missing id is a row of its own, never one pooled specimen
    miss = np.array([pd.NA, pd.NA, np.float32("nan"), "nan", "None", None], dtype=object)
    np.testing.assert_allclose(M.per_cell_weights(miss), np.ones(6))


def test_per_cell_weights_keep_the_cells_of_one_photo_apart():
    """Two cells on one smear photo plus the curated crop of one of them: two cells, not
    one (rows of one source are different cells; a second source repeats them)."""
    spec = np.array(["p1", "p1", "p1", "p2", "p2"], dtype=object)
    src = np.array(["smear", "smear", "crop", "smear", "crop"], dtype=object)
    w = M.per_cell_weights(spec, src)
    np.testing.assert_allclose(w, [2 / 3, 2 / 3, 2 / 3, 1 / 2, 1 / 2])
    assert w.sum() == pytest.approx(3)


def test_weighted_accuracy_counts_a_duplicated_cell_once():
    # one cell scored three times (all wrong) and two cells once (right): per row 2/5,
    # per cell 2/3
    true = np.array(["x", "x", "x", "y", "z"])
    pred = np.array(["y", "y", "y", "y", "z"])
    spec = np.array(["s1", "s1", "s1", "s2", ""], dtype=object)
    assert M.weighted_accuracy(true, pred, np.ones(5)) == pytest.approx(0.4)
    assert M.weighted_accuracy(true, pred, M.per_cell_weights(spec)) == pytest.approx(2 / 3)
    assert np.isnan(M.weighted_accuracy(true, pred, np.zeros(5)))
    with pytest.raises(ValueError, match="weights"):
        M.weighted_accuracy(true, pred, np.ones(4))


@pytest.mark.parametrize("rows_per_block", [1, 7, None])
def test_retrieval_in_blocks_equals_the_whole_distance_matrix(monkeypatch, rows_per_block):
    """retrieval holds a block of query rows at a time (50k pairs took 20 GB as one
    matrix): recall and FOSCTTM, ties included, equal those of the whole matrix."""
    from scipy.spatial.distance import cdist

    import vae.analysis.metrics as m

    rng = np.random.default_rng(0)
    n = 57
    q = rng.normal(size=(n, 4))
    t = q + rng.normal(scale=0.7, size=(n, 4))
    q[:6], t[:6] = np.round(q[:6]), np.round(t[:6])  # equal distances: ties
    d = cdist(q, t)
    true = np.diag(d)
    rank = (d < true[:, None]).sum(1)
    closer_t = (d < true[None, :]).sum(0) / (n - 1)
    want = (
        np.mean(rank < 1),
        np.mean(rank < 5),
        np.mean(rank < 10),
        (np.mean(rank / (n - 1)) + closer_t.mean()) / 2,
    )
    if rows_per_block is not None:
        monkeypatch.setattr(m, "RETRIEVAL_BLOCK_VALUES", rows_per_block * n)
    r = m.retrieval(q, t)
    assert (r.recall_at_1, r.recall_at_5, r.recall_at_10) == want[:3]
    assert r.foscttm == pytest.approx(want[3], abs=1e-15) and r.n == n


def test_modality_mixing_leaves_out_a_class_of_k_plus_one_cells_or_fewer():
    """Each cell's k neighbours would be its whole class: the share is the expected one
    whatever the layout, so two islands 100 apart read as mixed; such a class is named,
    not scored (the review of batch_mixing, which modality_mixing now shares)."""
    from vae.analysis.metrics import modality_mixing

    z = np.r_[np.zeros((6, 2)), np.full((6, 2), 100.0)]
    img = np.r_[np.ones(6, bool), np.zeros(6, bool)]
    assert modality_mixing(z, img, np.full(12, "neu"), k=15) is None
    r = modality_mixing(z, img, np.full(12, "neu"), k=5)
    assert r["separation"] == 1.0 and r["classes_too_small"] == []


def test_correlation_within_groups_takes_the_group_offsets_out():
    from vae.analysis.metrics import correlation_matrix, correlation_within_groups

    rng = np.random.default_rng(0)
    # two sources: inside each, x falls as y rises; source b sits higher on both, so the
    # pooled rank correlation is positive and says the opposite of every source
    y = np.concatenate([rng.uniform(0, 1, 40), rng.uniform(2, 3, 20)])
    x = -y + np.concatenate([np.zeros(40), np.full(20, 5.0)]) + rng.normal(0, 0.05, 60)
    groups = np.array(["a"] * 40 + ["b"] * 20, dtype=object)
    assert correlation_matrix(x, y)[0, 0] > 0.3
    r, used = correlation_within_groups(np.column_stack([x, np.full(60, 1.0)]), y, groups)
    assert list(used) == [2, 0] and r[0] < -0.95
    assert np.isnan(r[1])  # a constant feature has no correlation in any group
    # one group left with enough rows: not a comparison within groups (NaN)
    r1, used1 = correlation_within_groups(x, y, groups, min_rows=30)
    assert list(used1) == [1] and np.isnan(r1[0])
    # weights count the rows where the value is defined: group b's 20 rows hold 12 NaN,
    # so it falls under min_rows=10 for that column and only a counts (and then NaN)
    xn = x.copy()
    xn[40:52] = np.nan
    rn, usedn = correlation_within_groups(xn, y, groups)
    assert list(usedn) == [1] and np.isnan(rn[0])
    # rows of no known group are left out, not a group of their own
    g3 = groups.copy()
    g3[:5], g3[5:10], g3[10:15] = None, np.nan, ""
    g3 = np.concatenate([g3, np.array(["c"] * 9, dtype=object)])
    x3, y3 = np.concatenate([x, np.arange(9.0)]), np.concatenate([y, np.arange(9.0)])
    r3, used3 = correlation_within_groups(x3, y3, g3)
    assert list(used3) == [2]  # a and b; c has 9 rows; None / NaN / "" are no group
    w_a = correlation_matrix(x[15:40], y[15:40])[0, 0]
    w_b = correlation_matrix(x[40:], y[40:])[0, 0]
    assert r3[0] == pytest.approx((25 * w_a + 20 * w_b) / 45)
    with pytest.raises(ValueError, match="groups"):
        correlation_within_groups(x, y, groups[:10])


def test_code_classifier_reads_labels_from_a_few_codes_and_cross_validates():
    """Two classes apart along one dim of 8 (scale differs per dim: standardised first):
    fitted probabilities favour the right class, the cross-validated accuracy is near 1;
    labels shuffled, it falls to chance; one class or a class of one cell: refused / NaN."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, (40, 8)) * np.array([1, 100, 1, 1, 1, 1, 1, 1])
    y = np.array(["a", "b"] * 20)
    z[y == "b", 0] += 4
    clf = M.code_classifier(z, y)
    assert list(clf.classes_) == ["a", "b"]
    proba = clf.predict_proba(np.array([[4.0] + [0.0] * 7, [0.0] * 8]))
    assert proba[0, 1] > 0.8 and proba[1, 0] > 0.8
    pred = M.code_classifier_cv(z, y)
    assert pred.shape == (40,) and (pred == y).mean() > 0.9
    shuffled = rng.permutation(y)
    assert (M.code_classifier_cv(z, shuffled) == shuffled).mean() < 0.75
    with pytest.raises(ValueError, match="at least two classes"):
        M.code_classifier(z, np.array(["a"] * 40))
    assert M.code_classifier_cv(z[:21], y[:20].tolist() + ["c"]) is None  # one "c"
