"""Traversals and paths on hand-made latents, with a stand-in decoder."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from vae.analysis import traverse as T


@dataclass
class _Dec:
    image: torch.Tensor
    mask: torch.Tensor | None
    expression_log: torch.Tensor


class LinearStandIn(nn.Module):
    """Test double with the documented decode API: brightness and gene 0 rise with z[0].

    Gene 1 falls with z[0]; gene 2 rises with z[1]; gene 3 is constant.
    """

    def __init__(self, d=4, s=8):
        super().__init__()
        self.d, self.s = d, s

    def decode(self, z):
        b = z.shape[0]
        level = torch.sigmoid(z[:, :1])  # (B, 1)
        img = level[:, :, None, None].expand(b, 3, self.s, self.s).clone()
        mask = torch.ones(b, 1, self.s, self.s)
        expr = torch.stack(
            [
                torch.nn.functional.softplus(z[:, 0]),
                torch.nn.functional.softplus(-z[:, 0]),
                torch.nn.functional.softplus(z[:, 1]),
                torch.ones(b),
            ],
            1,
        )
        return _Dec(img, mask, expr)


def test_top_dims_by_kl():
    assert list(T.top_dims_by_kl([0.1, 3.0, 0.0, 1.5], 2)) == [1, 3]
    assert list(T.top_dims_by_kl([1.0, 2.0], 5)) == [1, 0]


def test_anchor_choices():
    z = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    lab = np.array(["a", "a", "b"])
    ids = np.array(["c0", "c1", "c2"])
    np.testing.assert_allclose(T.anchor_point(z, lab, ids, anchor_class="a"), [1.0, 0.0])
    np.testing.assert_allclose(T.anchor_point(z, lab, ids, anchor_cell="c2"), [10.0, 10.0])
    np.testing.assert_allclose(T.anchor_point(z), z.mean(0))
    with pytest.raises(ValueError, match="anchor_class='x'"):
        T.anchor_point(z, lab, ids, anchor_class="x")


def test_supported_range_keeps_the_stretch_among_the_crops():
    """Crops' codes fill dim 0 over [-1, 2] on a line (dim 1 = 0): a sweep of dim 0 from
    the anchor 0 stays supported from -1 to 2 (sd 1), not beyond, and the ranges passed
    to traverse_dims replace the +-span of those dims only."""
    ref = np.c_[np.linspace(-1, 2, 301), np.zeros(301)]
    lo, hi = T.supported_range(np.zeros(2), 0, np.ones(2), ref, span=3.0, n_grid=121)
    assert -1.1 <= lo <= -0.9 and 1.9 <= hi <= 2.1
    # dim 1 leaves the line at once: only a sliver around the anchor
    lo1, hi1 = T.supported_range(np.zeros(2), 1, np.ones(2), ref, span=3.0, n_grid=121)
    assert -0.2 < lo1 <= 0 <= hi1 < 0.2
    # an anchor off the data has no stretch at all
    assert T.supported_range(np.array([0.0, 5.0]), 0, np.ones(2), ref) is None
    model = LinearStandIn(d=2)
    trs = T.traverse_dims(
        model, np.zeros(2), [0, 1], np.ones(2), span=3, n_steps=5, ranges={0: (lo, hi)}
    )
    np.testing.assert_allclose(trs[0].offsets, np.linspace(lo, hi, 5))
    np.testing.assert_allclose(trs[1].offsets, np.linspace(-3, 3, 5))
    assert T.image_support(T.sweep_codes(np.zeros(2), 0, trs[0].values), ref).supported.all()


def test_dim_traversal_shapes_and_monotonic_decoding():
    model = LinearStandIn()
    tr = T.traverse_dims(model, np.zeros(4), [0, 2], sd=np.full(4, 2.0), span=3, n_steps=7)
    assert [t.dim for t in tr] == [0, 2]
    t0 = tr[0]
    assert t0.decoded.images.shape == (7, 8, 8, 3)
    assert t0.decoded.masks.shape == (7, 8, 8)
    assert t0.decoded.expression.shape == (7, 4)
    np.testing.assert_allclose(t0.values, np.linspace(-6, 6, 7))
    bright = t0.decoded.images.mean((1, 2, 3))
    assert np.all(np.diff(bright) > 0)  # the swept dim drives the image monotonically
    assert np.all(np.diff(t0.decoded.expression[:, 0]) > 0)
    assert np.all(np.diff(t0.decoded.expression[:, 1]) < 0)
    # sweeping an unused dim changes nothing
    assert np.ptp(tr[1].decoded.images) == 0


def test_class_centroids_maturation_order_and_explicit_order():
    z = np.array([[5.0, 0], [5.2, 0], [0.0, 0], [0.2, 0], [9.0, 0], [3.0, 3.0]])
    lab = np.array(["mid", "mid", "early", "early", "late", "lympho"])
    mat = np.array([0.5, 0.5, 0.1, 0.1, 0.9, np.nan])
    c = T.class_centroids(z, lab, mat)
    assert c.names == ["early", "mid", "late"]  # lympho has no maturation: left out
    np.testing.assert_allclose(c.points[:, 0], [0.1, 5.1, 9.0])
    c2 = T.class_centroids(z, lab, None, order=["late", "early", "absent"])
    assert c2.names == ["late", "early"]
    with pytest.raises(ValueError, match="at least 2 classes"):
        T.class_centroids(z, lab, None)
    # unlabelled rows are no class, even with a maturation: an all-unlabelled study read
    # "found ['']" (evaluate helper); among labelled ones they are left out of the order
    blank = np.array(["", "", "", "", "", ""])
    with pytest.raises(ValueError, match=r"found \[\] \(labels present: \[\]"):
        T.class_centroids(z, blank, mat)
    part = np.array(["mid", "mid", "nan", "", "late", "late"])
    assert T.class_centroids(z, part, np.r_[mat[:5], 0.9]).names == ["mid", "late"]


def test_straight_and_gp_paths_on_hand_made_latent():
    cents = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])  # a bend
    sp = T.straight_path(cents[0], cents[-1], 5)
    np.testing.assert_allclose(sp.points[:, 1], 0.0)
    np.testing.assert_allclose(sp.points[:, 0], np.linspace(0, 2, 5))
    gp = T.gp_path(cents, 21, noise=1e-6)
    assert gp.points.shape == (21, 2)
    np.testing.assert_allclose(gp.knots_s, [0.0, 0.5, 1.0])
    # the GP passes through the centroids (s = 0, 0.5, 1 are steps 0, 10, 20)
    np.testing.assert_allclose(gp.points[[0, 10, 20]], cents, atol=1e-2)
    # and bends: the middle lies off the straight line
    assert gp.points[10, 1] > 0.9


def test_project_onto_path():
    sp = T.straight_path(np.zeros(2), np.array([10.0, 0.0]), 11)
    pos = T.project_onto_path(np.array([[0.0, 5.0], [5.0, -1.0], [12.0, 0.0]]), sp, n_dense=101)
    np.testing.assert_allclose(pos, [0.0, 0.5, 1.0])


def test_rank_genes_fold_change_and_trend():
    model = LinearStandIn()
    path = T.straight_path(np.array([-3.0, 0, 0, 0]), np.array([3.0, 0, 0, 0]), 9)
    dec = T.decode(model, path.points)
    df = T.rank_genes(dec.expression, ["up", "down", "flat2", "const"], path.s, {"p": ["UP"]})
    top = df.set_index("gene")
    assert top.loc["up", "spearman"] == pytest.approx(1.0)
    assert top.loc["down", "spearman"] == pytest.approx(-1.0)
    assert top.loc["up", "log2fc"] > 0 > top.loc["down", "log2fc"]
    assert top.loc["const", "score"] == 0.0 and np.isnan(top.loc["const", "spearman"])
    assert top.loc["up", "program"] == "p"
    assert set(df["gene"][:2]) == {"up", "down"}


def test_program_scores_and_matching():
    x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    sc = T.program_scores(x, ["Mpo", "Elane", "Ltf"], {"primary": ["MPO", "ELANE"], "none": ["X"]})
    assert list(sc) == ["primary"]
    np.testing.assert_allclose(sc["primary"], [1.5, 0.0])
    assert T.match_genes(["a", "B"], ["b", "c", "A"]) == [1, 0]


def test_real_vae_module_decodes_through_the_traversal():
    import torch

    from vae import model as model_mod

    args = model_mod.VAEArgs(n_genes=5, crop_size=16, n_shared=3, channels=[4, 8], hidden=[8])
    model = model_mod.TwoBranchVAE(args).eval()
    tr = T.traverse_dims(model, np.zeros(3), [0], sd=np.full(3, 2.0), n_steps=5)
    assert tr[0].decoded.images.shape == (5, 16, 16, 3)
    assert tr[0].decoded.expression.shape == (5, 5)
    # the sweep moves dim 0 alone, in sd units, and each step is the model's drawn cell
    np.testing.assert_allclose(tr[0].values, 2.0 * tr[0].offsets)
    z = torch.tensor(T.sweep_codes(np.zeros(3), 0, tr[0].values), dtype=torch.float32)
    with torch.no_grad():
        want = model.decode(z, render=True).image.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(tr[0].decoded.images, np.clip(want, 0, 1), atol=1e-6)
    assert not np.allclose(tr[0].decoded.images[0], tr[0].decoded.images[-1])


def _trained_one_factor_vae(seed: int = 0, steps: int = 200):
    """A tiny TwoBranchVAE (1 latent dim) trained on cells whose brightness and two
    genes are driven by one factor t; returns the model, the codes and t."""
    from vae import model as model_mod
    from vae.losses import vae_loss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n, s = 64, 16
    t = np.sort(rng.uniform(0, 1, n))
    yy, xx = np.mgrid[:s, :s]
    mask = ((yy - s / 2 + 0.5) ** 2 + (xx - s / 2 + 0.5) ** 2 <= (0.4 * s) ** 2).astype(np.float32)
    img = (np.repeat((0.15 + 0.7 * t)[:, None, None, None], 3, 1) * mask).astype(np.float32)
    rate = np.c_[5 + 60 * t, 65 - 60 * t, np.full(n, 30.0)]  # gene 0 up, gene 1 down with t
    counts = rng.poisson(rate).astype(np.float32)
    lib = counts.sum(1)
    x = np.log1p(counts / lib[:, None] * 1e4).astype(np.float32)
    args = model_mod.VAEArgs(
        n_genes=3, crop_size=s, n_shared=1, channels=[8, 16], hidden=[16], dropout=0.0
    )
    model = model_mod.TwoBranchVAE(args)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    Im, Mk = torch.from_numpy(img), torch.from_numpy(mask).expand(n, 1, s, s).contiguous()
    X, C, L = torch.from_numpy(x), torch.from_numpy(counts), torch.from_numpy(lib)
    has = torch.ones(n, dtype=torch.bool)
    for _ in range(steps):
        out = model(Im, Mk, X, has, has, torch.log(L))
        loss = vae_loss(out, Im, Mk, X, C, L, beta=1.0)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        z = model.encode(Im, X, has, has, Mk, torch.log(L)).joint[0].numpy()
    return model, z, t, mask.astype(bool)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add overhead on a shared CPU
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("seed", [0])
def test_tiny_trained_model_decodes_monotonically_along_its_factor(seed, one_thread):
    model, z, t, mask = _trained_one_factor_vae(seed)
    rho = np.corrcoef(z[:, 0], t)[0, 1]
    assert abs(rho) > 0.9  # the single dim learned t
    tr = T.traverse_dims(model, z.mean(0), [0], sd=z.std(0), span=2.0, n_steps=7)[0]
    assert tr.decoded.images.shape == (7, 16, 16, 3)
    assert tr.decoded.expression.shape == (7, 3)
    bright = tr.decoded.images[:, mask].mean((1, 2)) * np.sign(rho)
    assert np.all(np.diff(bright) > 0)  # brighter as the code moves toward high t
    g0 = tr.decoded.expression[:, 0] * np.sign(rho)
    g1 = tr.decoded.expression[:, 1] * np.sign(rho)
    assert np.all(np.diff(g0) > 0) and np.all(np.diff(g1) < 0)
    # the path from the low-t to the high-t centroid decodes the same trend, and projected
    # codes order the cells by t
    lo, hi = z[t < 0.3].mean(0), z[t > 0.7].mean(0)
    path = T.straight_path(lo, hi, 6)
    dec = T.decode(model, path.points)
    assert np.all(np.diff(dec.images[:, mask].mean((1, 2))) > 0)
    rank = T.rank_genes(dec.expression, ["up", "down", "flat"], path.s)
    top = rank.set_index("gene")
    assert top.loc["up", "spearman"] == 1.0 and top.loc["down", "spearman"] == -1.0
    pos = T.project_onto_path(z, path)
    from scipy import stats

    assert stats.spearmanr(pos, t).statistic > 0.8


def test_draw_cells_keeps_the_decoded_cell_and_fills_the_rest():
    """Decoded cells are drawn through their decoded mask: RGB inside (p > 0.5), the
    background outside, whatever the decoder painted there (the greenish halo)."""
    rng = np.random.default_rng(0)
    img = rng.uniform(0.2, 0.9, (2, 6, 6, 3)).astype(np.float32)
    mask = np.zeros((2, 6, 6), np.float32)
    mask[:, 1:4, 2:5] = 0.9
    mask[1, 0, 0] = 0.4  # below the threshold: not the cell
    inside = mask > T.CELL_MASK_THRESHOLD
    out = T.draw_cells(img, mask)
    np.testing.assert_array_equal(out[inside], img[inside])
    assert (out[~inside] == 0).all()  # the fill of the masked input crops
    white = T.draw_cells(img, mask, background=1.0)
    assert (white[~inside] == 1).all() and (white[inside] == img[inside]).all()
    rgb = T.draw_cells(img, mask, background=(1.0, 0.5, 0.0))
    np.testing.assert_array_equal(rgb[~inside], np.tile([1.0, 0.5, 0.0], ((~inside).sum(), 1)))
    # no mask channel (predict_mask=False): the decoded square as it is, clipped to [0, 1]
    np.testing.assert_array_equal(T.draw_cells(img * 2, None), np.clip(img * 2, 0, 1))
    with pytest.raises(ValueError, match="masks"):
        T.draw_cells(img, mask[:, :5])
    dec = T.DecodedArrays(images=img, masks=mask, expression=np.zeros((2, 1)))
    np.testing.assert_array_equal(dec.cells(), out)


def test_posed_codes_add_the_nearest_cells_pose_to_each_step():
    # reference cells: pose-free codes on the x axis; their single-view codes add a
    # pose along y (cell i has pose i)
    reported = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0]])
    single = reported + np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
    points = np.array([[0.9, 0.0], [9.0, 0.0]])
    posed = T.posed_codes(points, reported, single, k=2)
    assert posed.codes.shape == (2, 2, 2)
    # step 0 is nearest cell 1 then 0 (or 2: 1.1 away vs 0.9): 1, 0; step 1: cells 3, 2
    np.testing.assert_array_equal(posed.nearest, [[1, 0], [3, 2]])
    np.testing.assert_allclose(posed.codes[0], [[0.9, 1.0], [0.9, 0.0]])
    np.testing.assert_allclose(posed.codes[1], [[9.0, 3.0], [9.0, 2.0]])
    # the step's own code is kept: only the pose offset is lent
    np.testing.assert_allclose(posed.codes[..., 0], [[0.9, 0.9], [9.0, 9.0]])
    # k larger than the reference: every cell once
    assert T.posed_codes(points, reported, single, k=10).codes.shape == (2, 4, 2)
    # single-view == reported (a model encoding one view): the steps unchanged
    same = T.posed_codes(points, reported, reported, k=3).codes
    np.testing.assert_allclose(same, np.repeat(points[:, None], 3, axis=1))
    with pytest.raises(ValueError, match="must be"):
        T.posed_codes(points, reported, single[:, :1], k=1)
    with pytest.raises(ValueError, match="k >= 1"):
        T.posed_codes(points, reported, single, k=0)


def test_path_on_scatter_runs_between_class_medians():
    """The study page draws the path between the classes' median scatter positions,
    linear in path position; a class absent from the scatter gives no line."""
    import numpy as np

    from vae.analysis.study_page import path_on_scatter

    emb = np.array([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 4.0], [50.0, 50.0]])
    labels = np.array(["a", "a", "b", "b", "c"])
    xy = path_on_scatter(np.array([0.0, 0.5, 1.0]), np.array([0.0, 1.0]), emb, labels, ["a", "b"])
    np.testing.assert_allclose(xy, [[0, 1], [5, 1.5], [10, 2]])
    # three knots: piecewise linear through the middle class
    xy3 = path_on_scatter(
        np.array([0.25, 0.5, 0.75]), np.array([0.0, 0.5, 1.0]), emb, labels, ["a", "b", "c"]
    )
    np.testing.assert_allclose(xy3, [[5, 1.5], [10, 2], [30, 26]])
    assert path_on_scatter(np.array([0.0]), np.array([0.0, 1.0]), emb, labels, ["a", "x"]) is None
    assert path_on_scatter(np.array([0.0]), np.array([0.0]), emb, labels, ["a", "b"]) is None


def test_path_caption_says_when_the_nearest_crops_change_source():
    """A path whose nearest crops run from one image source to another is partly a change
    of stain and microscope: the caption says where each source lies; one source: nothing."""
    import numpy as np

    from vae.analysis.study import _source_note

    s = np.linspace(0, 1, 5)
    note = _source_note(s, np.array(["txl", "txl", "bccd", "bccd", "bccd"]))
    assert "txl at 0.00-0.25; bccd at 0.50-1.00" in note and "not maturation" in note
    assert _source_note(s, np.array(["bccd"] * 5)) == ""


def test_a_sweep_that_runs_against_the_crops_says_so():
    """The caption names features whose sweep and across-crop correlations are both
    strong and of opposite sign, and nothing else."""
    import pandas as pd

    from vae.analysis.study import _sweep_vs_crops_note

    crops = pd.DataFrame(
        {
            "feature": ["program:primary", "lobes", "granule_count"],
            "z0": [0.87, -0.6, 0.9],
        }
    )
    row = {"dim": 0, "kl": 2.5, "program:primary": -0.98, "lobes": -0.7, "granule_count": 0.2}
    note = _sweep_vs_crops_note(row, crops, 0)
    assert "program:primary (-0.98 along the sweep, +0.87 across crops)" in note
    assert "lobes" not in note and "granule_count" not in note
    assert _sweep_vs_crops_note({"dim": 1, "lobes": -0.9}, crops, 1) == ""


def test_path_classes_say_which_rest_on_profiles_alone():
    import numpy as np
    import pandas as pd

    from vae.analysis.study import _class_makeup

    obs = pd.DataFrame({"has_image": [False, False, True, True, False]})
    labels = np.array(["GMP", "GMP", "Neu", "Neu", "Neu"])
    got = _class_makeup(["GMP", "Neu"], [2, 3], labels, obs)
    assert got == "GMP 2 (0 with a crop), Neu 3 (2 with a crop)"
    assert _class_makeup(["GMP"], [2], labels, obs.drop(columns="has_image")) == "GMP 2"


def test_path_classes_take_the_labels_that_spell_their_stage(caplog):
    """analysis.path_classes names stages; an audit's labels spell them their own way
    (Promyelocytes, Neutrophils): each is taken as its label (said at INFO), where the
    path used to end at band with only a warning."""
    import logging

    from vae.analysis.run import AnalysisError
    from vae.analysis.study import path_order
    from vae.inputs.schema import MATURATION_ORDER

    labels = np.array(["Promyelocytes", "Myelocytes", "band", "Neutrophils", "Lymphocytes", ""])
    with caplog.at_level(logging.INFO, logger="vae.analysis.study"):
        got = path_order(["promyelocyte", "myelocyte", "band", "segmented_neutrophil"], labels)
    assert got == ["Promyelocytes", "Myelocytes", "band", "Neutrophils"]
    assert "'segmented_neutrophil' taken as the label 'Neutrophils'" in caplog.text
    # the default: the six stages as the data spell them (absent ones left to the path)
    mixed = np.array(["promyelocyte", "myelocyte", "band", "Neutrophils"])
    assert path_order(list(MATURATION_ORDER), mixed)[-2:] == ["band", "Neutrophils"]
    # a stage two labels name: which one is meant cannot be told
    two = np.array(["SNE", "Neutrophils", "band"])
    with pytest.raises(AnalysisError, match="'Neutrophils', 'SNE'; name the one meant"):
        path_order(["band", "segmented_neutrophil"], two)
    # ... but in the default (named by no one) that stage is left out, with a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vae.analysis.study"):
        got = path_order(list(MATURATION_ORDER), two)
    assert got == [c for c in MATURATION_ORDER if c != "segmented_neutrophil"]
    assert "segmented_neutrophil left out: 2 labels name that stage" in caplog.text
    # a real typo is still refused before any work
    with pytest.raises(AnalysisError, match="did you mean 'Lymphocytes'"):
        path_order(["band", "Lymphocyte"], labels)
    assert path_order([], labels) is None  # ordered by mean maturation


def test_the_default_path_follows_the_models_maturation_axis(caplog):
    """A model trained with vae.maturation_classes=[GMP, Neutrophils] needs no list at
    traverse: analysis.path_classes at its default runs through the model's axis; a
    list the user gives is theirs."""
    import logging

    from vae.analysis.study import path_order
    from vae.inputs.schema import MATURATION_ORDER

    labels = np.array(["Multipotent progenitors", "GMP", "Neutrophils", "Monocytes"])
    axis = {"dim": 0, "classes": np.array(["GMP", "Neutrophils"], dtype=object)}
    with caplog.at_level(logging.INFO, logger="vae.analysis.study"):
        assert path_order(list(MATURATION_ORDER), labels, axis) == ["GMP", "Neutrophils"]
    assert "the model's maturation axis" in caplog.text
    given = ["Multipotent progenitors", "GMP", "Neutrophils"]
    assert path_order(given, labels, axis) == given
    # an axis of classes this latent does not label (another label_key): the default
    other = {"dim": 0, "classes": np.array(["a", "b"], dtype=object)}
    assert path_order(list(MATURATION_ORDER), labels, other)[-1] == "Neutrophils"


def test_a_hole_in_a_decoded_mask_is_drawn_as_cell():
    """A decoded mask that dips under the threshold inside the cell drew a black hole in
    the cell (the real chain's path figure); the cell is its outline, holes filled. A dip
    open to the outside (a notch) stays background."""
    img = np.full((1, 9, 9, 3), 0.6, np.float32)
    mask = np.zeros((1, 9, 9), np.float32)
    mask[0, 1:8, 1:8] = 0.9
    mask[0, 4, 4] = 0.2  # a hole
    mask[0, 1, 4] = 0.2  # a notch on the outline
    out = T.draw_cells(img, mask)
    assert (out[0, 4, 4] == 0.6).all()
    assert (out[0, 1, 4] == 0).all()
    cm = T.cell_masks(mask)
    assert cm.dtype == bool and cm[0, 4, 4] and not cm[0, 1, 4] and cm.sum() == 48
    assert T.cell_masks(mask[0]).shape == (9, 9)
    assert T.cell_masks(mask[:0]).shape == (0, 9, 9)
