"""The cell's size (vae.size_weight): read beside the crop, decoded by a head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.hardware import DistInfo
from tests.helpers.vae_toy import make_paired
from vae.data import from_anndata, raw_batch, stratified_split, to_batch
from vae.inputs.schema import CELL_DIAMETER
from vae.losses import LossWeights, vae_loss
from vae.model import TwoBranchVAE, VAEArgs
from vae.train import TrainArgs, train

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _args(**kw) -> VAEArgs:
    base = dict(n_genes=12, crop_size=16, n_shared=4, channels=[8, 16], hidden=[16], dropout=0.0)
    return VAEArgs(**{**base, **kw})


def _sized(n=24, image_only=4, expression_only=3, seed=0, unknown=(1,)):
    """Toy paired rows whose cells have a diameter (30-50 px) unrelated to the crop."""
    adata = make_paired(n, image_only=image_only, expression_only=expression_only, seed=seed)
    rng = np.random.default_rng(seed)
    d = np.exp(rng.uniform(np.log(30), np.log(50), adata.n_obs)).astype(np.float32)
    d[~adata.obs["has_image"].to_numpy()] = np.nan
    d[list(unknown)] = np.nan  # a crop whose source does not say
    adata.obs[CELL_DIAMETER] = d
    return adata, d


def test_data_reads_the_diameter_where_known():
    adata, d = _sized()
    data = from_anndata(adata)
    got = data.diameter.numpy()
    assert np.array_equal(np.isfinite(got), np.isfinite(d))
    assert np.allclose(got[np.isfinite(d)], d[np.isfinite(d)])
    b = to_batch(raw_batch(data, torch.arange(5)), torch.device("cpu"))
    assert b.diameter.shape == (5,)
    # a table without the column (crops not cut by stage=segment): no sizes at all
    del adata.obs[CELL_DIAMETER]
    assert from_anndata(adata).diameter is None


def test_size_features_standardise_and_flag_unknown_sizes():
    m = TwoBranchVAE(_args(size_head=True, size_log_mean=float(np.log(40)), size_log_sd=0.5))
    d = torch.tensor([40.0, 40.0 * np.e**0.5, float("nan"), 0.0])
    f = m.size_features(d, 4, "cpu")
    assert torch.allclose(f[:2], torch.tensor([[0.0, 1.0], [1.0, 1.0]]), atol=1e-5)
    assert torch.equal(f[2:], torch.zeros(2, 2))  # NaN and 0 px: unknown
    t = m.size_target(d, 4, "cpu")
    assert torch.allclose(m.diameter_px(t[:2]), d[:2])
    assert torch.isnan(t[2:]).all()
    assert torch.isnan(m.size_target(None, 3, "cpu")).all()


def test_the_image_expert_reads_the_size_in_every_view():
    adata, _ = _sized()
    b = to_batch(raw_batch(from_anndata(adata), torch.arange(6)), torch.device("cpu"))
    torch.manual_seed(0)
    m = TwoBranchVAE(_args(size_head=True)).eval()
    small, large = torch.full((6,), 20.0), torch.full((6,), 60.0)
    for views in (1, 8):
        a = m.encode(
            b.image, b.x, b.has_image, b.has_expression, b.mask, views=views, diameter=small
        ).image[0]
        c = m.encode(
            b.image, b.x, b.has_image, b.has_expression, b.mask, views=views, diameter=large
        ).image[0]
        assert not torch.allclose(a, c)
    # the same pixels and no size: what an unknown size reads
    none = m.encode(b.image, b.x, b.has_image, b.has_expression, b.mask).image[0]
    nan = m.encode(
        b.image, b.x, b.has_image, b.has_expression, b.mask, diameter=torch.full((6,), float("nan"))
    ).image[0]
    assert torch.allclose(none, nan)
    # a model without the head ignores any size given
    plain = TwoBranchVAE(_args()).eval()
    p1 = plain.encode(b.image, b.x, b.has_image, b.has_expression, b.mask, diameter=small)
    p2 = plain.encode(b.image, b.x, b.has_image, b.has_expression, b.mask, diameter=large)
    assert torch.equal(p1.image[0], p2.image[0])
    assert plain.decode(p1.joint[0]).size is None
    assert m.decode(none).size.shape == (6,)


def test_size_term_scores_known_sizes_only_and_enters_the_total():
    adata, d = _sized()
    data = from_anndata(adata)
    b = to_batch(raw_batch(data, torch.arange(data.n)), torch.device("cpu"))
    torch.manual_seed(0)
    m = TwoBranchVAE(_args(size_head=True, size_log_mean=3.6, size_log_sd=0.2))
    out = m(b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library, diameter=b.diameter)
    target = m.size_target(b.diameter, data.n, "cpu")
    kw = dict(beta=1.0, labels=b.labels)
    off = vae_loss(out, b.image, b.mask, b.x, b.counts, b.library, **kw, size_target=target)
    on = vae_loss(
        out,
        b.image,
        b.mask,
        b.x,
        b.counts,
        b.library,
        **kw,
        size_target=target,
        weights=LossWeights(size=7.0),
    )
    assert float(off.size) == 0.0  # weight 0: not computed
    # the fused decode's squared error / 2 over the rows with a crop and a known size
    known = torch.isfinite(target) & b.has_image
    err = 0.5 * (out.joint.size - target)[known].pow(2).sum() / data.n
    assert float(on.size.detach()) == pytest.approx(float(err.detach()), rel=1e-4)
    assert float(on.size.detach()) > 0
    # the cross-modal decodes add theirs (paired rows) to the total, as the image terms
    assert float((on.total - off.total).detach()) >= 7.0 * float(on.size.detach()) - 1e-3
    assert "size" in on.scalars()


def test_training_learns_the_size_and_keeps_it_in_the_image_code(tmp_path):
    adata, d = _sized(48, image_only=8, expression_only=4, seed=3, unknown=(2, 5))
    data = from_anndata(adata)
    split = stratified_split(data.labels.numpy(), 0.2, 0.0, 0)
    logd = np.log(d[np.isfinite(d)])
    torch.manual_seed(0)
    m = TwoBranchVAE(
        _args(size_head=True, size_log_mean=float(logd.mean()), size_log_sd=float(logd.std()))
    )
    args = TrainArgs(
        max_epochs=25,
        batch_size=8,
        kl_warmup_epochs=1,
        image_every_epochs=0,
        seed=3,
        lr=1e-2,
        # the pixels weigh little here: the toy's 36 steps under the global
        # gradient clip are for the size, not for drawing discs
        weights=LossWeights(image=0.01, mask=0.01, size=100.0),
    )
    r = train(m, data, split, args, CPU, tmp_path)
    size = [h["train"]["size"] for h in r.history]
    assert all(np.isfinite(size)) and size[-1] < 0.5 * size[0]
    # the image code alone says how large each cell is (the crops do not)
    m.eval()
    b = to_batch(raw_batch(data, torch.arange(data.n)), torch.device("cpu"))
    with torch.no_grad():
        post = m.encode(b.image, b.x, b.has_image, b.has_expression, b.mask, diameter=b.diameter)
        got = m.diameter_px(m.decode(post.image[0]).size).numpy()
    ok = np.isfinite(d)
    assert np.corrcoef(np.log(got[ok]), np.log(d[ok]))[0, 1] > 0.8
