"""Nucleus layer of the image decoder: target, loss, composition, rendering, augmentation."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

import vae.model as vm
from tests.helpers.vae_toy import assert_same_loss_terms, image_tensors
from vae.data import crop_targets, nucleus_masks, raw_batch, to_batch
from vae.losses import LossWeights, image_nll, nucleus_bce, nucleus_gaps, vae_loss
from vae.model import (
    NUCLEUS_RENDER_SHARPNESS,
    TwoBranchVAE,
    VAEArgs,
    compose_nucleus,
)


def _model(nucleus_head: bool = True, **kw) -> TwoBranchVAE:
    torch.manual_seed(0)
    base = dict(
        n_genes=6,
        crop_size=16,
        channels=[8, 8],
        image_arch="residual",
        n_private=2,
        expression_likelihood="gaussian",
        nucleus_head=nucleus_head,
    )
    base.update(kw)
    return TwoBranchVAE(VAEArgs(**base))


def _batch(b: int = 5, s: int = 16):
    g = torch.Generator().manual_seed(3)
    img = torch.rand(b, 3, s, s, generator=g)
    mask = (torch.rand(b, 1, s, s, generator=g) > 0.2).float()
    nuc = (torch.rand(b, 1, s, s, generator=g) > 0.5).float() * mask
    x = torch.rand(b, 6, generator=g)
    hi = torch.tensor([1, 1, 1, 0, 1][:b], dtype=torch.bool)
    he = torch.tensor([1, 0, 1, 1, 1][:b], dtype=torch.bool)
    return img * mask * hi.view(-1, 1, 1, 1), mask, nuc, x, hi, he


@pytest.mark.parametrize("arch", ["residual", "plain"])
def test_shapes_and_the_composed_mean(arch):
    m = _model(image_arch=arch)
    # codes whose nucleus render fills no hole (a ring's hole takes the cytoplasm around
    # it): the sharp-mask formula below holds only without one; seed 0 draws one
    z = torch.randn(3, m.n_latent, generator=torch.Generator().manual_seed(1))
    d = m.decode(z)
    assert d.nucleus_logits.shape == (3, 1, 16, 16)
    assert d.nucleus_colour.shape == d.cytoplasm.shape == d.image.shape == (3, 3, 16, 16)
    # the mean image is the cytoplasm layer with the nucleus layer painted through the mask
    p = torch.sigmoid(d.nucleus_logits)
    assert torch.allclose(d.image, d.cytoplasm + p * (d.nucleus_colour - d.cytoplasm), atol=1e-6)
    r = m.decode(z, render=True)
    assert torch.equal(r.image_mean, d.image)
    sharp = torch.sigmoid(NUCLEUS_RENDER_SHARPNESS * d.nucleus_logits)
    assert torch.allclose(r.image, d.cytoplasm + sharp * (d.nucleus_colour - d.cytoplasm))
    # without the layer: no logits, and render draws nothing new
    plain = _model(nucleus_head=False, image_arch=arch).decode(z, render=True)
    assert plain.nucleus_logits is None and plain.image_mean is None


def test_nucleus_term_trains_the_mask_and_the_latent_the_image_term_does_not_move_the_mask():
    m = _model()
    img, mask, nuc, x, hi, he = _batch()
    out = m(img, mask, x, hi, he)
    out.joint.nucleus_logits.retain_grad()
    w = LossWeights(nucleus=1.0)
    t = vae_loss(out, img, mask, x, None, None, beta=1.0, weights=w, nucleus=nuc)
    assert float(t.nucleus.detach()) > 0
    # the image likelihood reaches the colour layers but not the mask (detached)
    nll = image_nll(img, out.joint.image, mask, out.joint.image_log_scale, "gaussian").sum()
    nll.backward(retain_graph=True)
    assert out.joint.nucleus_logits.grad is None or not out.joint.nucleus_logits.grad.any()
    m.zero_grad()
    t.nucleus.backward()
    g = out.joint.nucleus_logits.grad
    assert g is not None and g[hi].abs().sum() > 0
    # rows without an image and pixels outside the cell are not scored
    assert not g[~hi].any()
    assert not (g * (1 - mask)).any()
    # the layer shapes the code: its gradient reaches the image encoder
    assert m.image_encoder.mu.weight.grad.abs().sum() > 0


def test_bce_is_low_for_a_confident_right_mask():
    s = 8
    nuc = torch.zeros(1, 1, s, s)
    nuc[..., 2:5, 2:6] = 1
    mask = torch.ones(1, 1, s, s)

    def bce(logits):
        dec = type("D", (), {"nucleus_logits": logits})()
        return float(nucleus_bce(dec, nuc, mask)[0])

    right = (nuc * 2 - 1) * 6.0
    assert bce(right) < 0.2 < bce(torch.zeros_like(nuc)) < bce(-right)
    assert bce(torch.zeros_like(nuc)) == pytest.approx(s * s * np.log(2), rel=1e-5)


def test_gaps_are_the_pixels_between_lobes_only():
    s = 16
    two = torch.zeros(1, 1, s, s)
    two[..., 4:12, 2:6] = 1  # two lobes, 2 px apart
    two[..., 4:12, 8:12] = 1
    g = nucleus_gaps(two)
    expect = torch.zeros_like(two)
    expect[..., 4:12, 6:8] = 1
    assert torch.equal(g, expect)
    disc = torch.zeros(1, 1, s, s)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    disc[0, 0] = (((yy - 7.5) ** 2 + (xx - 7.5) ** 2) <= 25).float()
    assert float(nucleus_gaps(disc).sum()) <= 4  # a convex nucleus: (almost) nothing
    edge = torch.zeros(1, 1, s, s)
    edge[..., :, :3] = 1  # touching the crop's edge: the edge is not a gap
    assert float(nucleus_gaps(edge).sum()) == 0


def test_gap_weight_scales_the_gap_pixels_terms_only():
    img, mask, nuc, x, hi, he = _batch()
    m = _model()
    torch.manual_seed(1)
    out = m(img, mask, x, hi, he)
    gaps = nucleus_gaps(nuc)
    plain = nucleus_bce(out.joint, nuc, mask)
    w = nucleus_bce(out.joint, nuc, mask, 1.0 + 4.0 * gaps)
    # the extra is 4 x the BCE summed over the gap pixels inside the cell
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        out.joint.nucleus_logits, nuc, reduction="none"
    )
    extra = 4.0 * (bce * gaps * mask).sum(dim=(1, 2, 3))
    torch.testing.assert_close(w, plain + extra)
    kw = dict(beta=1.0, n_shared=16, nucleus=nuc)
    t0 = vae_loss(out, img, mask, x, None, None, weights=LossWeights(nucleus=1.0), **kw)
    t1 = vae_loss(
        out, img, mask, x, None, None, weights=LossWeights(nucleus=1.0, nucleus_gap=4.0), **kw
    )
    same = [float(getattr(t, k).detach()) for t in (t0, t1) for k in ("image", "kl")]
    assert same[:2] == same[2:]
    assert float(t1.nucleus.detach()) >= float(t0.nucleus.detach())


def test_input_compose_scores_the_colour_layers_through_the_input_nucleus():
    """vae.nucleus_input_compose: the image term is the likelihood of the colour layers
    composed through the input's nucleus mask (each layer scored on its own region);
    the nucleus, KL and expression terms are unchanged; off is the decoded composition."""
    img, mask, nuc, x, hi, he = _batch()
    m = _model()
    torch.manual_seed(1)
    out = m(img, mask, x, hi, he)
    kw = dict(beta=1.0, n_shared=16, nucleus=nuc)
    off = vae_loss(out, img, mask, x, None, None, weights=LossWeights(nucleus=1.0), **kw)
    on = vae_loss(
        out,
        img,
        mask,
        x,
        None,
        None,
        weights=LossWeights(nucleus=1.0, nucleus_input_compose=True),
        **kw,
    )
    for k in ("nucleus", "kl", "expression"):
        assert float(getattr(on, k).detach()) == float(getattr(off, k).detach()), k
    rows = hi.float()

    def image_term(dec, composed):
        nll = image_nll(img, composed, mask, dec.image_log_scale, "gaussian")
        return float((nll * rows).sum().detach() / img.shape[0])

    dec = out.joint
    forced = dec.cytoplasm + nuc * (dec.nucleus_colour - dec.cytoplasm)
    # the joint decode's share of the image term (the other decodes are scored alike)
    assert image_term(dec, forced) != pytest.approx(image_term(dec, dec.image))
    # the cytoplasm layer gets no gradient from the input's nucleus pixels, the nucleus
    # colour none from its cytoplasm, and the decoded mask none from the image term
    d = m.decode(out.posteriors.joint[0].detach().requires_grad_(False))
    cyto = d.cytoplasm.detach().requires_grad_(True)
    colour = d.nucleus_colour.detach().requires_grad_(True)
    composed = cyto + nuc * (colour - cyto)
    image_nll(img, composed, mask, torch.tensor(0.0), "gaussian").sum().backward()
    assert float((cyto.grad * nuc).abs().sum()) == 0.0
    assert float((colour.grad * (1 - nuc)).abs().sum()) == 0.0
    assert float(on.image.detach()) != float(off.image.detach())


def test_weight_zero_is_the_loss_without_the_layer():
    """vae.nucleus_weight=0 builds no layer: the same terms to 1e-6 with or without targets."""
    m = _model(nucleus_head=False)
    img, mask, nuc, x, hi, he = _batch()
    kw = dict(beta=1.0, weights=LossWeights(ssim=0.5, nucleus=0.0), n_shared=16)

    def terms(**extra):
        torch.manual_seed(1)
        out = m(img, mask, x, hi, he)
        return vae_loss(out, img, mask, x, None, None, **kw, **extra)

    a = assert_same_loss_terms(terms(), terms(nucleus=nuc))
    assert a["nucleus"] == 0.0
    # and the network is the one without the layer: RGB + cell mask out of the last conv
    assert m.image_decoder.deconv[-1].out_channels == 4
    assert set(m.state_dict()) == set(_model(nucleus_head=False).state_dict())
    # a model with the layer but the term weighted 0 adds exactly nothing to the total
    mh = _model()
    torch.manual_seed(1)
    out = mh(img, mask, x, hi, he)
    t0 = vae_loss(out, img, mask, x, None, None, **kw, nucleus=nuc)
    t1 = vae_loss(out, img, mask, x, None, None, **kw)
    assert float(t0.total.detach()) == float(t1.total.detach()) and float(t0.nucleus) == 0.0


def test_sharp_rendering_keeps_the_neck_the_mean_blurs():
    """Two lobes joined by a pinched neck: the drawn cell keeps them apart for the counter."""
    from scipy import ndimage as ndi

    from vae.analysis import granules as G

    s = 48
    yy, xx = np.mgrid[:s, :s]
    cell = (yy - 24) ** 2 + (xx - 24) ** 2 < 21**2
    lobes = ((yy - 24) ** 2 + (xx - 15) ** 2 < 7**2) | ((yy - 24) ** 2 + (xx - 33) ** 2 < 7**2)
    lobes |= (np.abs(yy - 24) <= 0) & (xx > 15) & (xx < 33)  # a 1 px filament
    # soft logits as a decoder under uncertainty gives them: a blurred signed distance
    sd = ndi.distance_transform_edt(~lobes) - ndi.distance_transform_edt(lobes)
    logits = torch.from_numpy(ndi.gaussian_filter(-sd / 2.0, 3.5)).float()[None, None]
    cyto = torch.tensor([0.85, 0.75, 0.85]).view(1, 3, 1, 1).expand(1, 3, s, s)
    nucl = torch.tensor([0.35, 0.2, 0.55]).view(1, 3, 1, 1).expand(1, 3, s, s)

    def count(sharpness: float) -> int:
        img = compose_nucleus(cyto, nucl, logits, sharpness)[0].permute(1, 2, 0).numpy()
        return G.measure_cell(img * cell[..., None], cell).features.lobes

    assert count(NUCLEUS_RENDER_SHARPNESS) == 2
    assert count(1.0) == 1  # the mean image (sharpness 1) joins them: what the layer fixes


_paired = image_tensors  # image-only rows (tests/helpers/vae_toy.py)


@pytest.mark.parametrize("rotate", [0.0, 0.1])
@pytest.mark.parametrize("with_granules", [False, True])
def test_augmentation_moves_the_nucleus_mask_with_the_crop(rotate, with_granules):
    n, s = 8, 16
    crops = torch.zeros(n, 3, s, s, dtype=torch.uint8)
    nuc = torch.zeros(n, 1, s, s, dtype=torch.uint8)
    gran = torch.zeros(n, 1, s, s, dtype=torch.uint8)
    for i in range(n):  # an off-centre bright L-shaped "nucleus" per crop
        r, c = 2 + i % 4, 3 + (2 * i) % 6
        crops[i, :, r : r + 5, c : c + 2] = 255
        crops[i, :, r + 3 : r + 5, c : c + 6] = 255
        nuc[i, 0] = crops[i, 0] > 0
        gran[i, 0, s - 2, 1 + i] = 1
    d = _paired(
        crops,
        torch.ones(n, 1, s, s, dtype=torch.uint8),
        nucleus=nuc,
        granules=gran if with_granules else None,
    )
    g = torch.Generator().manual_seed(1)
    b = to_batch(raw_batch(d, torch.arange(n)), torch.device("cpu"), True, g, rotate=rotate)
    bright = b.image[:, 0] > 0.5
    moved = b.nucleus[:, 0] > 0.5
    if rotate == 0:
        assert torch.equal(moved, bright)
        assert not torch.equal(moved, nuc[:, 0].bool())  # it did move
    else:  # bilinear crop vs nearest mask: the same shape up to its edge pixels
        inter = (moved & bright).sum(dim=(1, 2)).float()
        union = (moved | bright).sum(dim=(1, 2)).float()
        assert float((inter / union).min()) > 0.6
    if with_granules:  # the granule map is still the granule map, not the nucleus
        n_gran = b.granules.sum(dim=(1, 2, 3))
        if rotate == 0:
            assert torch.equal(n_gran, torch.ones(n))
        else:  # nearest resampling under a zoom may drop or double a point
            assert int(n_gran.max()) <= 2 and not (b.granules.bool() & b.nucleus.bool()).any()
    # the same generator draws: the crop moves exactly as it does without the nucleus mask
    g2 = torch.Generator().manual_seed(1)
    d2 = _paired(crops, d.masks, granules=d.granules)
    b2 = to_batch(raw_batch(d2, torch.arange(n)), torch.device("cpu"), True, g2, rotate=rotate)
    assert torch.equal(b2.image, b.image) and b2.nucleus is None


def test_precompute_on_a_simulated_cell_is_the_counters_nucleus():
    """nucleus_masks gives exactly the nucleus measure_cell counts lobes on."""
    from pipeline.simulator.morphology import lobes_of, stage_of
    from tests.vae.analysis.test_granules import _sim_crop
    from vae.analysis import granules as G

    crops, masks, truth = [], [], []
    for i, t in enumerate((0.05, 0.45, 0.8, 0.97)):
        c, m = _sim_crop(stage_of(t), t, 200 + i)
        crops.append(c)
        masks.append(m)
        truth.append(lobes_of(t))
    ct = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    mt = torch.from_numpy(np.stack(masks).astype(np.uint8))[:, None]
    has = torch.tensor([True, True, True, True])
    nuc = nucleus_masks(ct, mt, has)
    gran, nuc2 = crop_targets(ct, mt, has)
    assert nuc.dtype == torch.uint8 and nuc.shape == mt.shape
    assert torch.equal(nuc, nuc2)  # one pass with the granules gives the same masks
    for i in range(len(crops)):
        meas = G.measure_cell(crops[i], masks[i])
        assert np.array_equal(nuc[i, 0].numpy().astype(bool), meas.nucleus)
        assert G.count_lobes(nuc[i, 0].numpy().astype(bool)) == truth[i]
    assert nuc.sum() > 0 and not (nuc.bool() & ~mt.bool()).any()
    # rows without an image get an empty mask
    assert not nucleus_masks(ct, mt, torch.tensor([False, True, True, True]))[0].any()


def test_traverse_draws_the_sharp_nucleus():
    """Decoded cells of the analyses (traverse, study page) are the drawn ones."""
    from vae.analysis.traverse import decode

    m = _model(n_genes=6)
    z = torch.randn(4, m.n_latent, generator=torch.Generator().manual_seed(0))
    out = decode(m, z.numpy())
    with torch.no_grad():
        drawn = m.decode(z, render=True).image.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out.images, np.clip(drawn, 0, 1), atol=1e-6)


def test_a_hole_in_the_decoded_cell_mask_is_drawn_as_cytoplasm():
    """A cell mask that dips under 0.5 inside the cell (an extrapolated code) is drawn
    filled by every figure; the drawing gives the hole the cytoplasm's colour around it,
    not the decoder's background grey there."""
    m = _model()
    inner = m.image_decoder
    s = 16

    class Holed(torch.nn.Module):
        def forward(self, z):
            out = list(inner(z))
            b = z.shape[0]
            cell = torch.full((b, 1, s, s), -8.0)
            cell[..., 2:14, 2:14] = 8.0
            cell[..., 7:9, 7:9] = -8.0  # the hole
            cyto = torch.zeros(b, 3, s, s)
            cyto[:, 0], cyto[:, 2] = 0.9, 0.7  # pink cytoplasm...
            cyto[..., 7:9, 7:9] = 0.5  # ...grey where the mask dips
            out[1], out[6] = cell, cyto
            out[4] = torch.full((b, 1, s, s), -8.0)  # no nucleus
            return tuple(out)

    m.image_decoder = Holed()
    z = torch.zeros(2, m.n_latent)
    with torch.no_grad():
        got = m.decode(z, render=True)
    hole = got.image[:, :, 7:9, 7:9]
    assert torch.allclose(hole[:, 0], torch.tensor(0.9), atol=1e-4)
    assert torch.allclose(hole[:, 1], torch.tensor(0.0), atol=1e-4)
    assert torch.allclose(hole[:, 2], torch.tensor(0.7), atol=1e-4)
    # the decoded mask itself is what the decoder said (figures fill it when drawing)
    assert float(got.mask[0, 0, 7, 7]) < 0.5


def test_a_hole_in_the_nucleus_is_drawn_with_the_cytoplasms_grain_and_granules():
    """Where the drawing shows cytoplasm through the nucleus (a ring's hole, a lobe cut),
    the grain amplitude, its colour and the granule rate drawn there are the cytoplasm's
    around it, not the chromatin's the layers decode at those pixels (which drew the cuts
    as pale speckled cracks); the Decoded maps stay the decoder's own."""
    m = _model(texture_head=True, granule_head=True)
    inner = m.image_decoder
    s = 16

    class Ring(torch.nn.Module):
        def forward(self, z):
            img, _, rate, od, _, colour, cyto, amp, floor, direction, *coarse = inner(z)
            b = z.shape[0]
            cell = torch.full((b, 1, s, s), 8.0)
            nuc = torch.full((b, 1, s, s), -8.0)
            nuc[..., 4:12, 4:12] = 8.0
            nuc[..., 7:9, 7:9] = -8.0  # the ring's hole
            cyto = torch.zeros(b, 3, s, s)
            cyto[:, 0], cyto[:, 2] = 0.9, 0.7
            inside = torch.zeros(b, 1, s, s, dtype=torch.bool)
            inside[..., 4:12, 4:12] = True  # the nucleus's square, its hole included
            amp = torch.where(inside, 0.4, 0.1).expand(b, 1, s, s).contiguous()
            direction = torch.zeros(b, 3, s, s)
            direction[:, 2] = torch.where(inside[:, 0], 1.0, 0.0)  # chromatin: blue
            direction[:, 0] = torch.where(inside[:, 0], 0.0, 1.0)  # cytoplasm: red
            rate = torch.where(inside, 2.0, 0.5).expand(b, 1, s, s).contiguous()
            return img, cell, rate, od, nuc, colour, cyto, amp, floor, direction, *coarse

    m.image_decoder = Ring()
    z = torch.zeros(1, m.n_latent)
    seen = {}
    real_texture, real_granules = vm.render_texture, vm.render_granules

    def texture(img, amp, direction, *a, **k):
        seen["amp"], seen["dir"] = amp, direction
        return real_texture(img, amp, direction, *a, **k)

    def granules(img, rate, *a, **k):
        seen["rate"] = rate
        return real_granules(img, rate, *a, **k)

    with (
        mock.patch.object(vm, "render_texture", texture),
        mock.patch.object(vm, "render_granules", granules),
        torch.no_grad(),
    ):
        got = m.decode(z, render=True)
    hole = (slice(None), slice(None), slice(7, 9), slice(7, 9))
    assert torch.allclose(seen["amp"][hole], torch.tensor(0.1), atol=1e-4)
    assert torch.allclose(seen["rate"][hole], torch.tensor(0.5), atol=1e-4)
    assert torch.allclose(seen["dir"][:, 0][hole[2:]], torch.tensor(1.0), atol=1e-4)
    # on the nucleus itself the chromatin's stays
    assert torch.allclose(seen["amp"][..., 4, 4], torch.tensor(0.4))
    assert torch.allclose(seen["rate"][..., 4, 4], torch.tensor(2.0))
    # what decode returns is the decoder's own maps
    assert torch.allclose(got.texture_amp[hole], torch.tensor(0.4))
    assert torch.allclose(got.granule_rate[hole], torch.tensor(2.0))
