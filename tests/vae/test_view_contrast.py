"""View contrast (vae.view_contrast_weight): SimCLR's NT-Xent between two views of a crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.hardware import DistInfo
from tests.helpers.vae_toy import make_paired
from vae.data import from_anndata, raw_batch, stratified_split, to_batch
from vae.losses import LossWeights, vae_loss, view_contrast_loss
from vae.model import TwoBranchVAE, VAEArgs
from vae.train import TrainArgs, train

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _args() -> VAEArgs:
    return VAEArgs(n_genes=12, crop_size=16, n_shared=4, channels=[8, 16], hidden=[16], dropout=0.0)


def test_loss_rewards_views_that_find_each_other():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 6, generator=g)
    same = view_contrast_loss(a, a + 0.01 * torch.randn(8, 6, generator=g), 0.2)
    shuffled = view_contrast_loss(a, a[torch.randperm(8, generator=g)], 0.2)
    assert float(same) < 0.5 < float(shuffled)
    # codes that cannot be told apart: every other code is as likely as the partner
    flat = view_contrast_loss(torch.ones(5, 3), torch.ones(5, 3), 0.2)
    assert float(flat) == pytest.approx(math.log(9), abs=1e-5)
    # one row: nothing to tell apart
    assert float(view_contrast_loss(a[:1], a[:1], 0.2)) == 0.0
    # scale-free: cosine similarity
    assert float(view_contrast_loss(3 * a, a, 0.2)) == pytest.approx(
        float(view_contrast_loss(a, a, 0.2)), abs=1e-5
    )


def test_term_scores_image_rows_only_and_enters_the_total():
    torch.manual_seed(0)
    adata = make_paired(12, image_only=2, expression_only=3, seed=1)
    d = from_anndata(adata)
    b = to_batch(raw_batch(d, torch.arange(d.n)), torch.device("cpu"))
    m = TwoBranchVAE(_args())
    out = m(b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library)
    rows = b.has_image.bool().nonzero().flatten()
    codes = m.image_encoder(b.image[rows], b.mask[rows])[0]
    assert codes.shape == (rows.numel(), m.args.n_shared + m.args.n_private)
    kw = dict(beta=1.0, labels=b.labels)
    torch.manual_seed(1)
    off = vae_loss(out, b.image, b.mask, b.x, b.counts, b.library, **kw, view_codes=codes)
    w = LossWeights(view_contrast=10.0)
    torch.manual_seed(1)
    on = vae_loss(out, b.image, b.mask, b.x, b.counts, b.library, **kw, weights=w, view_codes=codes)
    assert float(off.view) == 0.0  # weight 0: not computed
    view = float(on.view.detach())
    assert view > 0
    assert float((on.total - off.total).detach()) == pytest.approx(10.0 * view, rel=1e-4)
    # the same codes in both views: each finds itself, but not with certainty
    assert view < math.log(2 * rows.numel() - 1)
    assert "view" in on.scalars()


@pytest.mark.parametrize("same_stain", [False, True])  # vae.view_same_stain: pose-only pairs
def test_training_with_two_views_lowers_the_term(tmp_path, same_stain):
    adata = make_paired(32, image_only=6, expression_only=4, seed=2)
    d = from_anndata(adata)
    split = stratified_split(d.labels.numpy(), 0.2, 0.0, 0)
    torch.manual_seed(0)
    m = TwoBranchVAE(_args())
    args = TrainArgs(
        max_epochs=6,
        batch_size=16,
        kl_warmup_epochs=1,
        image_every_epochs=0,
        seed=3,
        stain_jitter=0.2,
        view_same_stain=same_stain,
        weights=LossWeights(view_contrast=50.0),
    )
    r = train(m, d, split, args, CPU, tmp_path)
    view = [h["train"]["view"] for h in r.history]
    assert all(np.isfinite(view)) and view[0] > 0
    assert view[-1] < view[0]  # the encoder learns to recognise a crop in another pose
    # validation scores one view only: the term is 0 there
    assert r.history[-1]["val"]["view"] == 0.0


def test_views_with_one_stain_seed_share_their_colours_not_their_pose():
    """vae.view_same_stain: the second view replays the first view's stain draws."""
    adata = make_paired(24, image_only=4, expression_only=0, seed=5)
    # a dark mark off the centre, inside each disc cell: a flip now shows (the toy cells
    # are centred uniform discs, the same in every pose)
    adata.obsm["crops"][:, 7:9, 10:12, :] = 20
    raw = raw_batch(from_anndata(adata), torch.arange(12))
    g = torch.Generator().manual_seed(0)

    def view(stain_seed: int | None):
        sg = None if stain_seed is None else torch.Generator().manual_seed(stain_seed)
        b = to_batch(raw, torch.device("cpu"), True, g, stain_jitter=0.3, stain_generator=sg)
        m = b.mask.sum((2, 3)).clamp_min(1)
        return b.image.sum((2, 3)) / m, b.image  # (B, 3) mean colour inside the cell

    # flips only (a rotation's zoom moves the cell's rim and the image mean that the
    # contrast step uses): other poses, the same colour transform per row
    (a, ia), (b, ib), (c, _) = view(7), view(7), view(None)
    assert torch.allclose(a, b, atol=1e-5)
    # ... and not the same pose: the mark sits elsewhere in some rows
    assert not torch.allclose(ia, ib, atol=1e-3)
    # drawn apart: the colours differ by the jitter
    assert (a - c).abs().max() > 0.05
