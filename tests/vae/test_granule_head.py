"""Granule layer of the image decoder: rate-map target, loss, rendering, augmentation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers.vae_toy import image_tensors
from vae.data import granule_centres, raw_batch, to_batch
from vae.losses import LossWeights, granule_contrast, granule_error, vae_loss
from vae.model import TwoBranchVAE, VAEArgs, granule_field, render_granules


def _args(**kw) -> VAEArgs:
    base = dict(n_genes=6, crop_size=16, channels=[8, 8], image_arch="residual", granule_head=True)
    base.update(kw)
    return VAEArgs(**base)


def test_poisson_rate_loss_is_lowest_at_the_true_density():
    # centres at 5 per 100 px^2 on average: the NLL of a flat rate map is lowest near 5
    g = torch.Generator().manual_seed(0)
    cen = (torch.rand(1, 1, 200, 200, generator=g) < 0.05).float()

    def loss(rate: float) -> float:
        dec = SimpleNamespace(
            granule_rate=torch.full((1, 1, 200, 200), rate),
            granule_od=torch.zeros(1, 3, 200, 200),
        )
        img = torch.ones(1, 3, 200, 200)
        contrast = granule_contrast(img, torch.ones(1, 1, 200, 200))
        return float(granule_error(dec, cen, contrast)[0])

    assert loss(5.0) < loss(3.0) and loss(5.0) < loss(8.0)


def test_field_is_even_and_seeded():
    f = granule_field(32, 0)
    assert f.shape == (32, 32) and torch.equal(f, granule_field(32, 0))
    assert not torch.equal(f, granule_field(32, 1))
    # each 8x8 block keeps about 5 % of its pixels at threshold 0.05, with less
    # scatter than white noise (Poisson: variance = mean = 3.2)
    k = (f < 0.05).float().view(4, 8, 4, 8).sum((1, 3))
    assert abs(float(k.mean()) - 3.2) < 0.3 and float(k.var()) < 0.5 * 3.2
    big = granule_field(80, 0)  # tiled from 64 px fields
    assert big.shape == (80, 80) and abs(float((big < 0.1).float().mean()) - 0.1) < 0.02


def test_granule_loss_scores_the_head_and_only_when_on():
    torch.manual_seed(0)
    m = TwoBranchVAE(_args())
    b = 4
    img, mask = torch.rand(b, 3, 16, 16), torch.ones(b, 1, 16, 16)
    x, has = torch.rand(b, 6) * 3, torch.ones(b, dtype=torch.bool)
    cen = (torch.rand(b, 1, 16, 16) < 0.05).float()
    out = m(img, mask, x, has, has)
    assert out.joint.granule_rate.shape == (b, 1, 16, 16)
    assert out.joint.granule_od.shape == (b, 3, 16, 16)

    def loss(weight: float):
        w = LossWeights(granules=weight)
        return vae_loss(out, img, mask, x, x.round(), x.sum(1), beta=1.0, weights=w, granules=cen)

    on, off = loss(1.0), loss(0.0)
    assert float(on.granules.detach()) > 0 and float(off.granules) == 0.0
    assert float(on.total.detach()) > float(off.total.detach())
    on.total.backward()
    # the granule layer learns; it reads the code and the trunk without shaping them
    dec_ = m.image_decoder
    assert all(p.grad.abs().sum() > 0 for p in dec_.granule_mlp.parameters())
    assert dec_.granule_conv.weight.grad.abs().sum() > 0
    m.zero_grad()
    out = m(img, mask, x, has, has)  # a fresh graph
    only = vae_loss(
        out,
        img,
        mask,
        x,
        x.round(),
        x.sum(1),
        beta=0.0,
        granules=cen,
        weights=LossWeights(granules=1.0, image=0, mask=0, expression=0, cross=0),
    )
    only.granules.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.image_encoder.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in dec_.deconv.parameters())


def test_granule_stain_is_scored_against_the_rows_measured_stain_when_given():
    """pair.granule_centres: each row's granule stain comes measured where the centres
    were found (obsm['granule_od']), not from the model-size crop's contrast."""
    torch.manual_seed(0)
    m = TwoBranchVAE(_args())
    b = 3
    img, mask = torch.rand(b, 3, 16, 16), torch.ones(b, 1, 16, 16)
    x, has = torch.rand(b, 6) * 3, torch.ones(b, dtype=torch.bool)
    cen = torch.zeros(b, 1, 16, 16)
    cen[:, 0, 4, 4] = 2.0  # two granules on one pixel (counts, after the resize)
    out = m(img, mask, x, has, has)
    w = LossWeights(granules=1.0, image=0, mask=0, expression=0, cross=0)
    # stain error 0: the NLL alone (the loss term is the mean over the rows)
    nll = granule_error(out.joint, cen, out.joint.granule_od).mean().detach()

    def total(od):
        kw = dict(beta=0.0, weights=w, granules=cen, granule_od=od)
        return vae_loss(out, img, mask, x, x.round(), x.sum(1), **kw).granules.detach()

    decoded = out.joint.granule_od[:, :, 0, 0].detach()
    assert torch.allclose(total(decoded), nll, rtol=1e-5)
    # the error grows with the distance to the measured stain, per granule counted:
    # 2 granules x 3 channels x 0.5^2 a row
    far = total(decoded + 0.5)
    assert torch.allclose(far - nll, torch.tensor(2 * 3 * 0.25), rtol=1e-4)
    # a row without granules (NaN stain) adds nothing
    cen[0] = 0
    od = decoded.clone()
    od[0] = float("nan")
    nll0 = granule_error(out.joint, cen, out.joint.granule_od).mean().detach()
    assert torch.isfinite(total(od)) and torch.allclose(total(od), nll0, rtol=1e-5)


def test_granule_layer_needs_the_residual_decoder():
    import pytest

    with pytest.raises(ValueError, match="residual"):
        TwoBranchVAE(_args(image_arch="plain"))


def test_render_adds_granules_in_place_as_the_rate_rises():
    s = 32
    img = torch.full((1, 3, s, s), 0.9)
    colour = torch.full((1, 3, s, s), 2.0)  # optical density a granule adds
    lo = render_granules(img, torch.full((1, 1, s, s), 2.0), colour, seed=3)
    hi = render_granules(img, torch.full((1, 1, s, s), 8.0), colour, seed=3)
    none = render_granules(img, torch.zeros(1, 1, s, s), colour, seed=3)
    assert torch.equal(none, img)
    dark_lo, dark_hi = lo[0, 0] < 0.5, hi[0, 0] < 0.5
    assert 0 < int(dark_lo.sum()) < int(dark_hi.sum())
    # the same noise field: every granule of the lower rate is still there
    assert bool((dark_hi | ~dark_lo).all())
    # expected centres = rate/100 per px: 8/100 * 1024 px ~ 82 centres (dots overlap)
    assert torch.equal(hi, render_granules(img, torch.full((1, 1, s, s), 8.0), colour, seed=3))


def test_render_keeps_granules_inside_the_mask():
    s = 16
    img, colour = torch.ones(1, 3, s, s), torch.full((1, 3, s, s), 2.0)
    mask = torch.zeros(1, 1, s, s)
    out = render_granules(img, torch.full((1, 1, s, s), 50.0), colour, mask, seed=0)
    assert torch.equal(out, img)
    # half the square in the mask: centres there only (a dot reaches 2 px beyond its
    # centre, so the pixels farther than that from the mask are untouched)
    mask[..., :8] = 1
    out = render_granules(img, torch.full((1, 1, s, s), 50.0), colour, mask, seed=0)
    assert torch.equal(out[..., 10:], img[..., 10:])
    assert (out[..., :8] < img[..., :8]).any()


def test_decode_render_keeps_the_mean():
    m = TwoBranchVAE(_args()).eval()
    z = torch.randn(3, m.n_latent, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = m.decode(z)
        shown = m.decode(z, render=True)
    assert plain.image_mean is None and torch.equal(shown.image_mean, plain.image)
    assert shown.image.shape == plain.image.shape


def test_contrast_is_the_stain_above_the_neighbourhood():
    img = torch.full((1, 3, 20, 20), 0.8)
    img[0, :, 10, 10] = 0.2  # one dark granule on pale cytoplasm
    mask = torch.ones(1, 1, 20, 20)
    c = granule_contrast(img, mask)
    assert float(c[0, 0, 10, 10]) > 1.0  # ln(0.8 / 0.2) = 1.39 minus a little blur
    assert float(c[0, 0, 2, 2]) == 0.0
    # the black background outside a mask is not stain
    mask[..., :, :5] = 0
    img = img * mask
    assert float(granule_contrast(img, mask)[0, 0, 10, 6]) < 0.05


def test_centres_move_with_the_pixels_under_augmentation():
    n, s = 8, 16
    crops = torch.zeros(n, 3, s, s, dtype=torch.uint8)
    gran = torch.zeros(n, 1, s, s, dtype=torch.uint8)
    for i in range(n):  # one bright pixel per crop, marked as its granule centre
        r, c = (3 + i) % s, (5 + 2 * i) % s
        crops[i, :, r, c] = 255
        gran[i, 0, r, c] = 1
    d = image_tensors(crops, torch.ones(n, 1, s, s, dtype=torch.uint8), granules=gran)
    g = torch.Generator().manual_seed(1)
    b = to_batch(raw_batch(d, torch.arange(n)), torch.device("cpu"), True, g)
    assert torch.equal(b.granules[:, 0] > 0.5, b.image[:, 0] > 0.5)
    # the augmentation moved some crops (else the test would prove nothing), each still
    # with its one centre
    assert not torch.equal(b.image[:, 0] > 0.5, crops[:, 0] > 127)
    assert torch.equal(b.granules.sum((1, 2, 3)), torch.ones(n))


def test_centres_found_on_a_speckled_cell():
    s = 48
    yy, xx = np.mgrid[:s, :s]
    cell = (yy - 24) ** 2 + (xx - 24) ** 2 < 20**2
    nuc = (yy - 24) ** 2 + (xx - 24) ** 2 < 7**2
    img = np.full((s, s, 3), 255, np.uint8)
    img[cell] = (235, 200, 220)
    img[nuc] = (90, 40, 140)
    rng = np.random.default_rng(0)
    pts = []
    while len(pts) < 10:
        r, c = rng.integers(8, 40, 2)
        dist = np.hypot(r - 24, c - 24)
        if 11 < dist < 16 and all(np.hypot(r - a, c - b) > 4 for a, b in pts):
            pts.append((r, c))
            img[r - 1 : r + 1, c - 1 : c + 1] = (95, 25, 105)  # the simulator's azurophilic
    crops = torch.from_numpy(img).permute(2, 0, 1)[None]
    masks = torch.from_numpy(cell.astype(np.uint8))[None, None]
    cen = granule_centres(crops, masks, torch.ones(1, dtype=torch.bool))
    assert cen.shape == (1, 1, s, s)
    assert 6 <= int(cen.sum()) <= 14
    assert int(cen[0, 0][nuc].sum()) == 0  # the even nucleus has none


def test_the_counter_reads_a_drawn_granule_at_the_decoded_density(monkeypatch):
    """render_granules is calibrated to vae.analysis.granules: a dot of od reads od."""
    from skimage.filters import gaussian

    import vae.model as vm
    from vae.analysis import granules as G

    s = 32
    img = torch.full((1, 3, s, s), 0.8)
    rate = torch.zeros(1, 1, s, s)
    rate[0, 0, 16, 16] = 100.0  # a centre wherever the threshold field is below 1: here
    od = torch.tensor([0.0, 0.3, 0.0]).view(1, 3, 1, 1).expand(1, 3, s, s)
    out = render_granules(img, rate, od)[0].permute(1, 2, 0).numpy().astype(np.float64)
    cell = np.ones((s, s), bool)
    resp = gaussian(G.granule_contrast(out, cell, None, 2.0), 0.7)
    assert resp[16, 16] == pytest.approx(0.3, rel=0.02)
    # above the counter's 0.25 threshold, so it is found; an uncalibrated dot was not
    assert G.measure_cell(out, cell).features.granule_count == 1
    monkeypatch.setattr(vm, "granule_dot_gain", lambda: 1.0)  # the dot before calibration
    faint = render_granules(img, rate, od)[0].permute(1, 2, 0).numpy().astype(np.float64)
    assert G.measure_cell(faint, cell).features.granule_count == 0
