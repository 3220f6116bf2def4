"""β-VAE library: shapes, fusion, closed-form checks, masked loss, β, one-step, resume."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.hardware import DistInfo
from segmentation.io import load_torch_file
from tests.helpers.vae_toy import make_paired
from vae.checkpoint import CheckpointError
from vae.data import (
    augment_dihedral,
    epoch_batches,
    from_anndata,
    raw_batch,
    stratified_split,
    to_batch,
)
from vae.losses import (
    _nb_forward,
    _weighted_sum,
    digamma_positive,
    image_nll,
    kl_normal,
    nb_log_prob,
    vae_loss,
    zinb_log_prob,
)
from vae.model import TwoBranchVAE, VAEArgs, poe
from vae.schedules import KLSchedule
from vae.train import TrainArgs, train

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def small_args(**kw) -> VAEArgs:
    base = dict(n_genes=12, crop_size=16, n_shared=4, channels=[8, 16], hidden=[16], dropout=0.0)
    base.update(kw)
    return VAEArgs(**base)


def batch_of(adata, rows=None):
    d = from_anndata(adata)
    idx = torch.arange(d.n) if rows is None else torch.as_tensor(rows)
    return d, to_batch(raw_batch(d, idx), torch.device("cpu"))


@pytest.mark.parametrize("fusion", ["poe", "moe"])
@pytest.mark.parametrize("n_private", [0, 2])
def test_shapes_every_branch_and_missing_modalities(fusion, n_private):
    torch.manual_seed(0)
    m = TwoBranchVAE(small_args(fusion=fusion, n_private=n_private))
    _, b = batch_of(make_paired(6, image_only=3, expression_only=3))
    d = 4 + 2 * n_private
    post = m.encode(b.image, b.x, b.has_image, b.has_expression, b.mask, b.log_library)
    assert post.joint[0].shape == (12, d) and post.joint[1].shape == (12, d)
    assert post.image[0].shape == (12, d) and post.expression[0].shape == (12, d)
    dec = m.decode(post.joint[0])
    assert dec.image.shape == (12, 3, 16, 16) and dec.mask.shape == (12, 1, 16, 16)
    assert dec.expression_log.shape == (12, 12)
    assert float(dec.image.min().detach()) >= 0 and float(dec.image.max().detach()) <= 1
    # image-only / expression-only encoding at inference
    pi = m.encode(image=b.image[:6])
    pe = m.encode(expression=b.x[:6])
    assert pi.expression is None and pe.image is None
    assert pi.joint[0].shape == pe.joint[0].shape == (6, d)
    out = m(b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library)
    assert (out.joint is None) == (fusion == "moe")


def test_poe_with_prior_expert_closed_form():
    mu1, lv1 = torch.tensor([[1.0]]), torch.log(torch.tensor([[0.5]]))  # precision 2
    mu2, lv2 = torch.tensor([[-2.0]]), torch.log(torch.tensor([[0.25]]))  # precision 4
    both = torch.tensor([True])
    mu, lv = poe([(mu1, lv1), (mu2, lv2)], [both, both])
    # precision 1 (prior) + 2 + 4 = 7; mean (0*1 + 1*2 - 2*4) / 7
    assert torch.allclose(lv.exp(), torch.tensor([[1 / 7]]))
    assert torch.allclose(mu, torch.tensor([[-6 / 7]]))
    # a missing expert contributes nothing; no expert at all gives the prior
    mu, lv = poe([(mu1, lv1), (mu2, lv2)], [both, ~both])
    assert torch.allclose(mu, torch.tensor([[2 / 3]])) and torch.allclose(
        lv.exp(), torch.tensor([[1 / 3]])
    )
    mu, lv = poe([(mu1, lv1)], [~both])
    assert float(mu) == 0.0 and float(lv) == 0.0


def test_encode_joint_equals_unimodal_poe_on_single_modality_rows():
    torch.manual_seed(0)
    m = TwoBranchVAE(small_args()).eval()
    _, b = batch_of(make_paired(2, image_only=2, expression_only=2))
    post = m.encode(b.image, b.x, b.has_image, b.has_expression, b.mask, b.log_library)
    img_rows = torch.tensor([2, 3])
    mu_i, lv_i = post.image[0][img_rows], post.image[1][img_rows]
    prec = 1 + torch.exp(-lv_i)
    assert torch.allclose(post.joint[1][img_rows], -torch.log(prec), atol=1e-6)
    assert torch.allclose(post.joint[0][img_rows], mu_i * torch.exp(-lv_i) / prec, atol=1e-6)


def test_kl_closed_form_matches_torch_distributions():
    mu = torch.tensor([[0.3, -1.2, 2.0]])
    lv = torch.tensor([[0.1, -0.7, 1.3]])
    q = torch.distributions.Normal(mu, torch.exp(0.5 * lv))
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    assert torch.allclose(kl_normal((mu, lv)), torch.distributions.kl_divergence(q, p), atol=1e-6)
    assert float(kl_normal((torch.zeros(1, 2), torch.zeros(1, 2))).sum()) == 0.0


def test_nb_and_zinb_log_likelihood_closed_form():
    x = torch.tensor([[0.0, 1.0, 3.0, 10.0]])
    mu = torch.tensor([[0.5, 2.0, 3.0, 7.5]])
    theta = torch.tensor([2.0, 0.5, 5.0, 1.0])
    got = nb_log_prob(x, mu, theta.log())
    # torch's NegativeBinomial: total_count r = theta, success prob p = mu / (mu + theta)
    ref = torch.distributions.NegativeBinomial(total_count=theta, probs=mu / (mu + theta)).log_prob(
        x
    )
    assert torch.allclose(got, ref, atol=1e-5)
    # x = 0, mu = 1, theta = 1: P = (1 / 2)^1
    assert math.isclose(
        float(nb_log_prob(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1))),
        math.log(0.5),
        rel_tol=1e-6,
    )
    # ZINB with pi = 0.5 at x = 0: log(0.5 + 0.5 * 0.5)
    z = zinb_log_prob(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1), torch.zeros(1, 1))
    assert math.isclose(float(z), math.log(0.75), rel_tol=1e-6)


def test_weighted_sum_equals_the_written_out_sum_bit_for_bit():
    """vae_loss's sum leaves out parts that were not computed and unit weights; the
    value (and its gradient) is that of the full ``w1 * t1 + w2 * t2 + ...``."""
    g = torch.Generator().manual_seed(0)
    zero = torch.zeros(())
    ts = [torch.randn((), generator=g).requires_grad_() for _ in range(4)]
    for ws in ([1.0, 0.3, 1.0, 2.5], [0.0, 1.0, 7.0, 1.0]):
        for missing in ([], [1], [0, 3], [0, 1, 2, 3]):
            terms = [zero if i in missing else t for i, t in enumerate(ts)]
            ref = ws[0] * terms[0] + ws[1] * terms[1] + ws[2] * terms[2] + ws[3] * terms[3]
            got = _weighted_sum(zero, list(zip(ws, terms)))
            assert torch.equal(got, ref)
            if missing == [0, 1, 2, 3]:
                assert got is zero
            else:
                g_ref = torch.autograd.grad(ref, ts, allow_unused=True)
                g_got = torch.autograd.grad(got, ts, allow_unused=True)
                for a, b in zip(g_ref, g_got):
                    assert (a is None and b is None) or torch.equal(a, b)


def test_digamma_positive_matches_torch_digamma():
    y = torch.cat([torch.logspace(-3, 3, 500, dtype=torch.float64), torch.arange(1.0, 50.0)])
    ref = torch.digamma(y)
    got = digamma_positive(y.float()).double()
    assert ((got - ref).abs() / ref.abs().clamp_min(1.0)).max() < 1e-6


@pytest.mark.parametrize("theta_shape", [(7,), (5, 7)])
def test_nb_log_prob_hand_written_gradient_equals_autograd(theta_shape):
    """The NB likelihood's own backward: the same value as the expression autograd
    differentiates, gradients within float32 rounding, and exact in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(5, 7, generator=g) * 20)
    mu0 = torch.rand(5, 7, generator=g) * 10 + 0.01
    lt0 = torch.randn(*theta_shape, generator=g)
    w = torch.randn(5, 7, generator=g)
    grads = []
    for fn in (nb_log_prob, lambda a, m, lt: _nb_forward(a, m, lt.exp())[0]):
        mu, lt = mu0.clone().requires_grad_(), lt0.clone().requires_grad_()
        val = fn(x, mu, lt)
        (val * w).sum().backward()
        grads.append((val.detach(), mu.grad, lt.grad))
    (v1, gm1, gt1), (v2, gm2, gt2) = grads
    assert torch.equal(v1, v2)  # same ops, same values
    assert torch.allclose(gm1, gm2, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gt1, gt2, rtol=1e-5, atol=1e-5)
    md = mu0.double().requires_grad_()
    ld = lt0.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda m, lt: nb_log_prob(x.double(), m, lt), (md, ld))


def test_nb_log_prob_with_precomputed_log_factorial_is_the_same():
    """The trainer's per-data-set lgamma(x + 1) gives the values and gradients the
    per-batch one does (NB and ZINB)."""
    g = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.rand(6, 9, generator=g) * 15)
    mu0 = torch.rand(6, 9, generator=g) * 8 + 0.01
    lt0 = torch.randn(9, generator=g)
    pi = torch.randn(6, 9, generator=g)
    lf = torch.lgamma(x + 1.0)
    for fn in (nb_log_prob, lambda *a: zinb_log_prob(*a[:3], pi, *a[3:])):
        out = []
        for extra in ((), (lf,)):
            mu, lt = mu0.clone().requires_grad_(), lt0.clone().requires_grad_()
            val = fn(x, mu, lt, *extra)
            val.sum().backward()
            out.append((val.detach(), mu.grad, lt.grad))
        for a, b in zip(*out):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["mse", "gaussian", "laplace"])
def test_masked_image_loss_ignores_background_exactly(kind):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 8, 8, generator=g)
    mean = torch.rand(2, 3, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    ls = torch.tensor(-1.0)
    base = image_nll(target, mean, mask, ls, kind)
    # change every background pixel of target and prediction arbitrarily
    t2, m2 = target.clone(), mean.clone()
    bg = (mask == 0).expand_as(target)
    t2[bg] = 1e6
    m2[bg] = -1e6
    assert torch.equal(image_nll(t2, m2, mask, ls, kind), base)
    # and the inside counts: a perfect prediction inside gives only the normaliser
    perfect = image_nll(target, target, mask, ls, kind)
    assert (perfect < base).all()
    if kind == "mse":
        assert torch.equal(perfect, torch.zeros(2))


def _loss_for(beta, capacity=0.0):
    torch.manual_seed(0)
    m = TwoBranchVAE(small_args())
    _, b = batch_of(make_paired(6))
    torch.manual_seed(1)
    with torch.no_grad():
        out = m(b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library)
    return vae_loss(out, b.image, b.mask, b.x, b.counts, b.library, beta=beta, capacity=capacity)


def test_beta_zero_drops_kl_and_beta_scales_it():
    l0, l4 = _loss_for(0.0), _loss_for(4.0)
    assert float(l0.kl) > 0 and float(l0.kl_objective) == 0.0
    assert torch.equal(l0.kl, l4.kl)
    others = l0.total
    expected = others + 4.0 * l4.kl + 4.0 * l4.kl_unimodal
    assert torch.allclose(l4.total, expected, rtol=1e-5)
    lc = _loss_for(4.0, capacity=100.0)
    assert torch.allclose(lc.kl_objective, 4.0 * (100.0 - l4.kl))


def test_schedules():
    s = KLSchedule(beta=4.0, warmup_steps=10, capacity_max=20.0, capacity_steps=5)
    assert s.beta_at(0) == 0.0 and s.beta_at(5) == 2.0 and s.beta_at(50) == 4.0
    assert s.capacity_at(0) == 0.0 and s.capacity_at(5) == 20.0
    assert not s.done_at(9) and s.done_at(10)
    assert KLSchedule(beta=2.0).beta_at(0) == 2.0


def test_one_step_changes_weights_of_both_branches():
    torch.manual_seed(0)
    m = TwoBranchVAE(small_args())
    _, b = batch_of(make_paired(8))
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    out = m(b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library)
    loss = vae_loss(out, b.image, b.mask, b.x, b.counts, b.library, beta=1.0)
    loss.total.backward()
    opt.step()
    after = m.state_dict()
    for prefix in ("image_encoder", "image_decoder", "expression_encoder", "expression_decoder"):
        changed = [
            k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])
        ]
        assert changed, f"no weight of {prefix} changed"


def test_gaussian_expression_without_counts_and_late_mask():
    torch.manual_seed(0)
    a = make_paired(6, counts=False)
    d, b = batch_of(a)
    assert d.counts is None
    m = TwoBranchVAE(small_args(expression_likelihood="gaussian", library_covariate=False))
    out = m(b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library)
    full = vae_loss(out, b.image, b.mask, b.x, None, None, beta=1.0)
    from vae.losses import LossWeights

    assert torch.isfinite(full.total)
    x0 = b.x.clone()
    x0[:, :4] = 0.0  # dropouts
    late_w = LossWeights(late_mask=True)
    late = vae_loss(out, b.image, b.mask, x0, None, None, beta=1.0, weights=late_w)
    full0 = vae_loss(out, b.image, b.mask, x0, None, None, beta=1.0)
    assert late.expression.item() != full0.expression.item()
    # LATE scores observed non-zero entries only: all-zero profiles cost nothing
    none = vae_loss(
        out, b.image, b.mask, torch.zeros_like(x0), None, None, beta=1.0, weights=late_w
    )
    assert none.expression.item() == 0.0


def test_augmentation_keeps_image_and_mask_together():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(32, 3, 8, 8, generator=g)
    mask = (img[:, :1] > 0.5).float()
    a_img, a_mask = augment_dihedral(img, mask, g)
    assert torch.equal((a_img[:, :1] > 0.5).float(), a_mask)
    # a permutation of pixels: the multiset of values per row is kept
    assert torch.allclose(a_img.flatten(1).sort(1).values, img.flatten(1).sort(1).values)
    assert not torch.equal(a_img, img)


def test_split_is_seeded_stratified_and_batches_cover_train():
    labels = np.repeat(np.arange(3), 20)
    s1 = stratified_split(labels, 0.2, 0.2, seed=3)
    assert np.array_equal(s1, stratified_split(labels, 0.2, 0.2, seed=3))
    assert not np.array_equal(s1, stratified_split(labels, 0.2, 0.2, seed=4))
    for lab in range(3):
        got = s1[labels == lab]
        assert (got == "test").sum() == 4 and (got == "val").sum() == 4
    idx = np.flatnonzero(s1 == "train")
    bs = epoch_batches(idx, 7, shuffle=True, seed=0, epoch=1)
    assert sorted(np.concatenate(bs).tolist()) == idx.tolist()
    r0 = epoch_batches(idx, 7, shuffle=True, seed=0, epoch=1, rank=0, world_size=2)
    r1 = epoch_batches(idx, 7, shuffle=True, seed=0, epoch=1, rank=1, world_size=2)
    assert len(r0) == len(r1)
    c0, c1 = np.concatenate(r0), np.concatenate(r1)
    assert set(c0.tolist()) | set(c1.tolist()) == set(idx.tolist())
    # two ranks share the rows, not copy them: disjoint halves (36 rows, no padding)
    assert not set(c0.tolist()) & set(c1.tolist())
    assert len(c0) == len(c1) == idx.size // 2


def test_bad_input_names_file_and_field():
    from vae.data import PairedDataError

    a = make_paired(4)
    del a.obsm["masks"]
    with pytest.raises(PairedDataError, match=r"x\.h5ad: obsm\['masks'\]"):
        from_anndata(a, "x.h5ad")
    with pytest.raises(ValueError, match="multiple of"):
        small_args(crop_size=18)


def test_non_finite_loss_stops_with_clear_message(tmp_path):
    from vae.train import NonFiniteLossError

    a = make_paired(12)
    d = from_anndata(a)
    d.x[0, 0] = float("nan")
    split = np.array(["train"] * 12)
    m = TwoBranchVAE(small_args())
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 1"):
        train(m, d, split, TrainArgs(max_epochs=1, batch_size=12), CPU, tmp_path)


def _train_args(**kw):
    base = dict(max_epochs=4, batch_size=8, kl_warmup_epochs=1, image_every_epochs=0, seed=5)
    base.update(kw)
    return TrainArgs(**base)


def _toy_run_data():
    """A small paired table with image-only and expression-only rows, and its split."""
    d = from_anndata(make_paired(24, image_only=4, expression_only=4))
    return d, stratified_split(d.labels.numpy(), 0.2, 0.0, 0)


def _fresh_model():
    """The same small model every call (dropout on, so the RNG state matters)."""
    torch.manual_seed(0)
    return TwoBranchVAE(small_args(dropout=0.1))


def test_resume_after_interruption_is_bit_exact(tmp_path):
    d, split = _toy_run_data()

    straight = _fresh_model()
    r_full = train(straight, d, split, _train_args(), CPU, tmp_path / "full")
    part = _fresh_model()
    r_part = train(part, d, split, _train_args(stop_after_epochs=2), CPU, tmp_path / "resumed")
    assert r_part.stopped == "interrupted" and r_part.epochs == 2
    ck = load_torch_file(tmp_path / "resumed" / "last.pt")
    assert ck["epoch"] == 2 and ck["step"] == r_part.steps > 0
    torch.manual_seed(123)  # a different RNG state must not matter: it is restored
    resumed = _fresh_model()
    r_res = train(
        resumed,
        d,
        split,
        _train_args(),
        CPU,
        tmp_path / "resumed",
        resume_from=tmp_path / "resumed" / "last.pt",
    )
    assert r_res.epochs == 4 and r_res.steps == r_full.steps
    assert [h["step"] for h in r_res.history] == [h["step"] for h in r_full.history]
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_resume_with_more_epochs_keeps_the_learning_rate_schedule(tmp_path):
    """A resume that raises max_epochs rebuilt the cosine over the new length: the rate
    jumped back up (x12 in an audit). The run keeps its schedule; past it, the final rate."""
    d, split = _toy_run_data()
    part = _fresh_model()
    train(part, d, split, _train_args(stop_after_epochs=2), CPU, tmp_path / "r")
    ck = load_torch_file(tmp_path / "r" / "last.pt")
    assert ck["schedule_total_steps"] == ck["step"] * 2  # 4 epochs planned, 2 run
    before = ck["history"][-1]["lr"]
    r = train(
        _fresh_model(),
        d,
        split,
        _train_args(max_epochs=6),
        CPU,
        tmp_path / "r",
        resume_from=tmp_path / "r" / "last.pt",
    )
    lrs = [h["lr"] for h in r.history]
    assert r.epochs == 6 and all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:])), lrs
    assert lrs[2] <= before
    base = _train_args().lr
    assert lrs[-1] == pytest.approx(0.05 * base) and lrs[-2] == pytest.approx(0.05 * base)


def test_class_alignment_prefers_matching_classes_and_is_not_met_by_collapse():
    from vae.losses import class_align

    labels = torch.tensor([0, 1, 0, 1])
    img = torch.tensor([True, True, False, False])
    expr = ~img
    e = torch.eye(2)
    aligned = torch.stack([e[0], e[1], e[0], e[1]])
    swapped = torch.stack([e[0], e[1], e[1], e[0]])
    collapsed = torch.ones(4, 2)
    good = class_align(aligned, aligned, labels, img, expr, 0.1)
    bad = class_align(swapped, swapped, labels, img, expr, 0.1)
    flat = class_align(collapsed, collapsed, labels, img, expr, 0.1)
    assert float(good) < float(flat) < float(bad)
    assert math.isclose(float(flat), math.log(2), rel_tol=1e-6)


def test_class_centroid_gap_sees_a_shift_the_class_infonce_does_not():
    """Each class's image cloud shifted and scaled away from its expression cloud: the
    cosine InfoNCE barely changes (the directions still match) while the centroid gap
    is the per-dim squared shift; classes on one side only are not scored."""
    from vae.losses import class_align, class_centroid_gap

    labels = torch.tensor([0, 1, 0, 1, 2])
    img = torch.tensor([True, True, False, False, True])
    expr = torch.tensor([False, False, True, True, False])
    e = torch.eye(2)
    same = torch.stack([e[0], e[1], e[0], e[1], e[0]])
    far = same.clone()
    far[img] = far[img] * 3.0  # the image experts' means further out on the same rays
    assert float(class_centroid_gap(same, same, labels, img, expr)) == 0.0
    gap = float(class_centroid_gap(far, same, labels, img, expr))
    assert math.isclose(gap, (2.0**2 + 0.0) / 2, rel_tol=1e-6)  # 2 units on one dim of two
    assert math.isclose(
        float(class_align(far, same, labels, img, expr, 0.1)),
        float(class_align(same, same, labels, img, expr, 0.1)),
        rel_tol=1e-6,
    )
    none = torch.tensor([False] * 5)
    assert float(class_centroid_gap(far, same, labels, img, none)) == 0.0


def test_split_keeps_a_specimen_in_one_split():
    from segmentation.table import specimen_ids

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    # two views of each specimen image (a smear cell and the crop cut from it)
    smear = [f"BloodImage_{i // 2:05d}.jpg" for i in range(150)]
    crops = [f"Neutrophil/BloodImage_{i // 2:05d}_1.jpg" for i in range(150)]
    groups = np.array(
        specimen_ids(smear, "bccd", r"BloodImage_\d+")
        + specimen_ids(crops, "bccd", r"BloodImage_\d+"),
        dtype=object,
    )
    assert groups[0] == "bccd:BloodImage_00000" == groups[150]
    split = stratified_split(labels, 0.15, 0.15, seed=0, groups=groups)
    per_group = pd.Series(split).groupby(groups).nunique()
    assert per_group.max() == 1  # no specimen straddles two splits
    assert 0.1 < (split == "test").mean() < 0.2  # about test_fraction of the specimens
    # empty groups are single rows: same split as without groups
    none = np.array([""] * 300, dtype=object)
    assert np.array_equal(
        stratified_split(labels, 0.15, 0.15, 0, groups=none),
        stratified_split(labels, 0.15, 0.15, 0),
    )
    # no pattern match -> the file's stem
    assert specimen_ids(["dir/cell_7.png"], "txl", r"BloodImage_\d+") == ["txl:cell_7"]


@pytest.mark.parametrize("missing", [None, "", float("nan"), np.nan, pd.NA, pd.NaT])
def test_split_rows_without_a_group_are_each_their_own(missing):
    """A missing group (None, "", NaN, pd.NA: how a table read with pandas leaves an empty
    cell) is no group: each such row is its own unit, not one shared group "nan"."""
    labels = np.random.default_rng(1).integers(0, 3, 300)
    groups = np.array([missing] * 300, dtype=object)
    assert np.array_equal(
        stratified_split(labels, 0.15, 0.15, 0, groups=groups),
        stratified_split(labels, 0.15, 0.15, 0),
    )
    # mixed with real groups: the real ones still keep their rows together
    groups[:100] = [f"s{i // 4}" for i in range(100)]
    split = stratified_split(labels, 0.15, 0.15, 0, groups=groups)
    assert pd.Series(split[:100]).groupby(groups[:100]).nunique().max() == 1
    assert len(set(split[100:])) == 3  # the group-less rows spread over all three splits


def test_train_split_by_names_a_missing_column():
    from pipeline.runner import StageError
    from pipeline.stages.train import split_groups

    obs = pd.DataFrame({"specimen": ["a", "a", ""], "x": [1, 2, 3]})
    assert split_groups(obs, "specimen", "p.h5ad").tolist() == ["a", "a", ""]
    assert split_groups(obs.drop(columns="specimen"), "specimen", "p.h5ad") is None
    assert split_groups(obs, None, "p.h5ad") is None
    with pytest.raises(StageError, match="trainer.split_by='patient'"):
        split_groups(obs, "patient", "p.h5ad")
    # a missing value of any dtype is a row of its own, never one group named "<NA>"
    for col in (
        pd.array(["a", pd.NA, None], dtype="string"),
        pd.Categorical(["a", None, None]),
        ["a", np.nan, None],
    ):
        got = split_groups(pd.DataFrame({"specimen": col}), "specimen", "p.h5ad")
        assert got.tolist() == ["a", "", ""], col


def test_averaged_weights_reach_model_pt_and_leave_training_alone(tmp_path):
    """trainer.ema_epochs: validation and model.pt read a moving average of the weights;
    the optimizer's own weights follow the same path as without it, and a resume restores
    the average with them."""
    from vae.train import ema_decay

    assert ema_decay(0, 10) == 0.0 and ema_decay(2, 10) == pytest.approx(0.95)
    d, split = _toy_run_data()

    plain, avg = _fresh_model(), _fresh_model()
    r_plain = train(plain, d, split, _train_args(), CPU, tmp_path / "plain")
    r_avg = train(avg, d, split, _train_args(ema_epochs=2), CPU, tmp_path / "avg")
    # the raw weights trained exactly as without the average
    for k, v in plain.state_dict().items():
        assert torch.equal(v, avg.state_dict()[k]), k
    assert [h["train"]["total"] for h in r_plain.history] == [
        h["train"]["total"] for h in r_avg.history
    ]
    # the raw weights' best epoch is kept as model_raw.pt: the run without the average
    raw = load_torch_file(tmp_path / "avg" / "model_raw.pt")
    ref = load_torch_file(tmp_path / "plain" / "model.pt")
    assert raw["best_epoch"] == ref["best_epoch"] and raw["best_val"] == ref["best_val"]
    for k, v in ref["model"].items():
        assert torch.equal(v, raw["model"][k]), k
    assert [h["val_raw"] for h in r_avg.history] == [h["val"]["total"] for h in r_plain.history]
    # validation scored other (averaged) weights, and model.pt holds them
    assert r_plain.history[-1]["val"]["total"] != r_avg.history[-1]["val"]["total"]
    best = load_torch_file(tmp_path / "avg" / "model.pt")["model"]
    last = load_torch_file(tmp_path / "avg" / "last.pt")
    assert "ema" in last
    differs = [
        k for k, v in best.items() if v.is_floating_point() and not torch.equal(v, raw["model"][k])
    ]
    assert differs
    # on this toy the average's best is the last epoch: model.pt is then the average itself
    assert load_torch_file(tmp_path / "avg" / "model.pt")["best_epoch"] == r_avg.epochs == 4
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k != "n_averaged"}
    for k, v in best.items():
        assert torch.equal(v, averaged[k]), k
    # resume: the average comes back with the weights, bit for bit
    part = _fresh_model()
    train(part, d, split, _train_args(ema_epochs=2, stop_after_epochs=2), CPU, tmp_path / "res")
    resumed = _fresh_model()
    r_res = train(
        resumed,
        d,
        split,
        _train_args(ema_epochs=2),
        CPU,
        tmp_path / "res",
        resume_from=tmp_path / "res" / "last.pt",
    )
    assert [h["val"]["total"] for h in r_res.history] == [h["val"]["total"] for h in r_avg.history]
    ema_res = load_torch_file(tmp_path / "res" / "last.pt")["ema"]
    for k, v in last["ema"].items():
        assert torch.equal(v, ema_res[k]), k
    # a checkpoint trained with the average cannot resume without it, nor the reverse
    with pytest.raises(CheckpointError, match="trained with trainer.ema_epochs"):
        train(
            _fresh_model(),
            d,
            split,
            _train_args(),
            CPU,
            tmp_path / "res",
            resume_from=tmp_path / "res" / "last.pt",
        )
    with pytest.raises(CheckpointError, match="trained without trainer.ema_epochs"):
        train(
            _fresh_model(),
            d,
            split,
            _train_args(ema_epochs=2),
            CPU,
            tmp_path / "plain",
            resume_from=tmp_path / "plain" / "last.pt",
        )


def test_monitor_names_the_term_that_selects_model_pt(tmp_path, monkeypatch, caplog):
    """trainer.monitor: model.pt is the epoch with the lowest validation value of the named
    term, the patience counts on it, and a resume under the other term is refused (the
    kept best value is of the other term)."""
    import vae.train as vt

    real = vt.evaluate_loss
    # per epoch: the objective bottoms out at epoch 2, the β=1 terms keep falling
    script = {"total": [9.0, 1.0, 4.0, 3.0], "neg_elbo": [9.0, 8.0, 7.0, 6.0]}
    calls = {"n": 0}

    def scripted(*a, **kw):
        means, kl = real(*a, **kw)
        e = calls["n"] % 4
        calls["n"] += 1
        return {**means, "total": script["total"][e], "neg_elbo": script["neg_elbo"][e]}, kl

    monkeypatch.setattr(vt, "evaluate_loss", scripted)
    d, split = _toy_run_data()
    on_total = train(_fresh_model(), d, split, _train_args(), CPU, tmp_path / "total")
    calls["n"] = 0
    caplog.clear()  # the run above logged its own "epoch 4/4" line (when propagated)
    with caplog.at_level("INFO", logger="vae.train"):
        on_elbo = train(
            _fresh_model(), d, split, _train_args(monitor="neg_elbo"), CPU, tmp_path / "elbo"
        )
    # the epoch line names the term its "*" is about
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 4/4")]
    assert len(lines) == 1 and lines[0].endswith("neg_elbo 6 *")
    assert (on_total.best_epoch, on_total.best_val) == (2, 1.0)
    assert (on_elbo.best_epoch, on_elbo.best_val) == (4, 6.0)
    ck = load_torch_file(tmp_path / "elbo" / "model.pt")
    assert (ck["best_epoch"], ck["best_val"], ck["train_args"]["monitor"]) == (4, 6.0, "neg_elbo")
    # the same training steps either way: only the choice of epoch differs
    assert [h["train"]["total"] for h in on_total.history] == [
        h["train"]["total"] for h in on_elbo.history
    ]
    # patience 1 stops the objective's run after epoch 3; the falling term runs on
    calls["n"] = 0
    short = train(
        _fresh_model(), d, split, _train_args(early_stopping_patience=1), CPU, tmp_path / "p1"
    )
    assert (short.stopped, short.epochs) == ("early_stopping", 3)
    calls["n"] = 0
    long = train(
        _fresh_model(),
        d,
        split,
        _train_args(early_stopping_patience=1, monitor="neg_elbo"),
        CPU,
        tmp_path / "p1e",
    )
    assert (long.stopped, long.epochs) == ("max_epochs", 4)
    # a resume that changes the term is refused, naming both
    calls["n"] = 0
    res, last = tmp_path / "res", tmp_path / "res" / "last.pt"
    train(_fresh_model(), d, split, _train_args(stop_after_epochs=2), CPU, res)

    def resume(**kw):
        return train(_fresh_model(), d, split, _train_args(**kw), CPU, res, resume_from=last)

    with pytest.raises(
        CheckpointError,
        match="trainer.monitor=total, this run on neg_elbo: resume with trainer.monitor=total",
    ):
        resume(monitor="neg_elbo")
    # a last.pt written before the setting: it selected on the objective
    ck = load_torch_file(last)
    del ck["train_args"]["monitor"]
    torch.save(ck, last)
    with pytest.raises(CheckpointError, match="trainer.monitor=total, this run on neg_elbo"):
        resume(monitor="neg_elbo")
    calls["n"] = 2
    resumed = resume()
    assert (resumed.best_epoch, resumed.epochs) == (2, 4)
    with pytest.raises(ValueError, match="monitor='elbo'; valid: total, neg_elbo"):
        train(_fresh_model(), d, split, _train_args(monitor="elbo"), CPU, tmp_path / "bad")


def test_evaluate_loss_with_no_rows_is_a_clear_error():
    """No rows to score: a ValueError saying so, not {"total": nan} (the caller reads every
    term, and under DDP that rank would skip the all-reduce the others wait in)."""
    from tests.helpers.vae_toy import tiny_model
    from vae.train import evaluate_loss

    data = from_anndata(make_paired(13), image_size=16)
    model = tiny_model()
    model.train()
    with pytest.raises(ValueError, match="no rows to evaluate"):
        evaluate_loss(
            model, data, np.array([], dtype=np.int64), TrainArgs(), CPU, KLSchedule(beta=1.0), 4
        )
    assert model.training  # left as it was
