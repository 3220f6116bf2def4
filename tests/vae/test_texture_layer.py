"""Texture layer of the image decoder: detail, likelihood, training isolation, rendering."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from vae.losses import (
    LossWeights,
    texture_detail,
    texture_nll,
    texture_region,
    vae_loss,
)
from vae.model import TwoBranchVAE, VAEArgs, render_texture, texture_field, texture_field_bands


def _args(**kw) -> VAEArgs:
    base = dict(n_genes=6, crop_size=16, channels=[8, 8], image_arch="residual", texture_head=True)
    base.update(kw)
    return VAEArgs(**base)


def _grainy(s: int, amp: float, colour=(0.3, 0.9, 0.3), seed: int = 0) -> torch.Tensor:
    """A pale even cell whose optical density carries grain of sd ``amp`` along ``colour``."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(1, 1, s, s, generator=g)
    c = F.normalize(torch.tensor(colour), dim=0).view(1, 3, 1, 1)
    od = 0.3 + amp * n * c
    return torch.exp(-od).clamp(0, 1)


def test_detail_is_zero_on_an_even_cell_and_ignores_the_background():
    s = 24
    mask = torch.zeros(1, 1, s, s)
    mask[..., 4:20, 4:20] = 1
    flat = torch.full((1, 3, s, s), 0.7) * mask  # black background
    d = texture_detail(flat, mask)
    assert float(d.abs().max()) < 1e-5
    reg = texture_region(mask)
    # the 2 px rim is not scored
    assert float(reg.sum()) == 12 * 12 and float(reg[..., 5, 10]) == 0


def test_detail_of_a_sharp_nucleus_is_zero_given_the_nucleus():
    s = 32
    mask = torch.ones(1, 1, s, s)
    nuc = torch.zeros(1, 1, s, s)
    nuc[..., 10:22, 10:22] = 1
    img = torch.where(nuc.bool(), 0.3, 0.85).expand(1, 3, s, s)  # two flat parts, a step
    assert float(texture_detail(img, mask).abs().max()) > 0.2  # the edge, read as detail
    assert float(texture_detail(img, mask, nuc).abs().max()) < 1e-5


def test_region_leaves_out_the_nucleus_outline():
    s = 24
    mask = torch.ones(1, 1, s, s)
    nuc = torch.zeros(1, 1, s, s)
    nuc[..., 8:16, 8:16] = 1
    reg = texture_region(mask, nuc)
    assert float(reg[0, 0, 7, 12]) == 0 and float(reg[0, 0, 8, 12]) == 0  # the outline
    assert float(reg[0, 0, 12, 12]) == 1 and float(reg[0, 0, 4, 12]) == 1  # inside / outside


def test_likelihood_is_lowest_at_the_true_grain_and_colour():
    s = 64
    colour = (0.3, 0.9, 0.3)
    img = _grainy(s, 0.1, colour)
    mask = torch.ones(1, 1, s, s)
    d, reg = texture_detail(img, mask), texture_region(mask)
    sd = float(d[:, :, 4:-4, 4:-4].pow(2).sum(1).mean().sqrt())  # the detail's own sd

    def nll(amp: float, col=colour) -> float:
        c = F.normalize(torch.tensor(col, dtype=torch.float32), dim=0).view(1, 3, 1, 1)
        dec = SimpleNamespace(
            texture_amp=torch.full((1, 1, s, s), amp),
            texture_floor=torch.full((1, 1, s, s), 0.005),
            texture_dir=c.expand(1, 3, s, s),
        )
        return float(texture_nll(dec, d, reg)[0])

    assert nll(sd) < nll(sd / 2) and nll(sd) < nll(sd * 2)
    assert nll(sd) < nll(sd, (0.9, 0.3, 0.3))  # the wrong colour costs


def test_texture_loss_trains_the_layer_and_leaves_the_latent_alone():
    torch.manual_seed(0)
    m = TwoBranchVAE(_args())
    b = 4
    img, mask = torch.rand(b, 3, 16, 16), torch.ones(b, 1, 16, 16)
    x, has = torch.rand(b, 6) * 3, torch.ones(b, dtype=torch.bool)
    out = m(img, mask, x, has, has)
    assert out.joint.texture_amp.shape == (b, 1, 16, 16)
    assert out.joint.texture_dir.shape == (b, 3, 16, 16)
    norms = out.joint.texture_dir.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    assert bool((out.joint.texture_dir >= 0).all())  # stain absorbs

    def loss(weight: float, **kw):
        w = LossWeights(texture=weight, **kw)
        return vae_loss(out, img, mask, x, x.round(), x.sum(1), beta=1.0, weights=w)

    on, off = loss(1.0), loss(0.0)
    assert float(off.texture) == 0.0 and float(on.texture.detach()) != 0.0
    assert torch.isfinite(on.total)
    only = loss(1.0, image=0, mask=0, expression=0, cross=0, granules=0, nucleus=0)
    only.texture.backward()
    dec_ = m.image_decoder
    assert all(p.grad.abs().sum() > 0 for p in dec_.texture_conv.parameters())
    assert all(p.grad.abs().sum() > 0 for p in dec_.texture_mlp.parameters())
    # it reads the code and the trunk detached: no gradient reaches them
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.image_encoder.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in dec_.deconv.parameters())


@pytest.mark.parametrize("fusion", ["poe", "moe"])
def test_cross_texture_off_drops_only_the_grain_of_the_image_drawn_from_expression(fusion):
    """vae.cross_texture=false: the image decoded from the expression expert alone is not
    scored on the texture layer (a crop's grain level is its microscope's); every other
    term, the fused decode's texture included, is as before."""
    torch.manual_seed(0)
    m = TwoBranchVAE(_args(fusion=fusion))
    b = 4
    img, mask = torch.rand(b, 3, 16, 16), torch.ones(b, 1, 16, 16)
    x, has = torch.rand(b, 6) * 3, torch.ones(b, dtype=torch.bool)
    out = m(img, mask, x, has, has)

    def loss(cross_texture: bool):
        w = LossWeights(texture=1.0, cross=0.5, cross_texture=cross_texture)
        return vae_loss(out, img, mask, x, x.round(), x.sum(1), beta=1.0, weights=w)

    on, off = loss(True), loss(False)
    from_expr = texture_nll(out.from_expression, texture_detail(img, mask), texture_region(mask))
    assert float(from_expr.mean()) != 0.0
    if fusion == "poe":  # the cross-modal term (cross x its image terms) loses its grain
        assert torch.allclose(on.total - off.total, 0.5 * from_expr.mean(), atol=1e-4)
        assert torch.equal(on.texture, off.texture)  # the fused decode's term stays
    else:  # MoE: the expression component's share of each paired row's ELBO
        assert torch.allclose(on.texture - off.texture, 0.5 * from_expr.mean(), atol=1e-5)
        assert torch.allclose(on.total - off.total, 0.5 * from_expr.mean(), atol=1e-4)
    for k in ("image", "mask", "expression", "kl", "image_from_expression"):
        assert torch.equal(getattr(on, k), getattr(off, k)), k


def test_fitted_layer_tells_grainy_cells_from_smooth_ones():
    # two kinds of cell, their codes apart; a few steps on the texture term alone must
    # decode a stronger grain for the grainy kind
    torch.manual_seed(0)
    m = TwoBranchVAE(_args(crop_size=32))
    s, b = 32, 8
    grainy = torch.cat([_grainy(s, 0.15, seed=i) for i in range(b // 2)])
    smooth = torch.cat([_grainy(s, 0.01, seed=i) for i in range(b // 2)])
    img, mask = torch.cat([grainy, smooth]), torch.ones(b, 1, s, s)
    amp = _fit_two_kinds(m, img, mask).texture_amp[:, 0, 8:-8, 8:-8].mean(dim=(1, 2))
    assert float(amp[: b // 2].min()) > 4 * float(amp[b // 2 :].max())


def _fit_two_kinds(m: TwoBranchVAE, img: torch.Tensor, mask: torch.Tensor, steps: int = 150):
    """Fit the texture layer alone (Adam, the texture term only) to two kinds of cell,
    the first half and the second half of ``img``, whose codes lie apart; the decoding
    of their codes after it."""
    b = img.shape[0]
    z = torch.zeros(b, m.n_latent)
    z[: b // 2, 0], z[b // 2 :, 0] = 2.0, -2.0
    d, reg = texture_detail(img, mask), texture_region(mask)
    dec_ = m.image_decoder
    params = [*dec_.texture_conv.parameters(), *dec_.texture_mlp.parameters()]
    opt = torch.optim.Adam(params, lr=0.03)
    for _ in range(steps):
        opt.zero_grad()
        texture_nll(m.decode(z), d, reg).mean().backward()
        opt.step()
    with torch.no_grad():
        return m.decode(z)


def test_field_is_seeded_unit_variance_fine_grained_and_dark_spotted():
    f = texture_field(64, 0)
    assert f.shape == (64, 64) and torch.equal(f, texture_field(64, 0))
    assert not torch.equal(f, texture_field(64, 1))
    assert abs(float(f.mean())) < 1e-4 and abs(float(f.std()) - 1.0) < 1e-3
    # grain, not a gradient: pixels 4 px apart are nearly uncorrelated
    a, b = f[:, :-4].flatten(), f[:, 4:].flatten()
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.2
    # granules: few dense spots on an even ground (skewed to the dense side)
    assert float(f.max()) > 2.5 * float(-f.min())


def test_render_draws_the_decoded_grain_inside_the_cell():
    s = 64
    img = torch.full((1, 3, s, s), 0.8)
    mask = torch.zeros(1, 1, s, s)
    mask[..., 8:56, 8:56] = 1
    c = F.normalize(torch.tensor([0.3, 0.9, 0.3]), dim=0).view(1, 3, 1, 1).expand(1, 3, s, s)

    def drawn(amp: float) -> torch.Tensor:
        return render_texture(img, torch.full((1, 1, s, s), amp), c, mask, seed=2)

    weak, strong = drawn(0.02), drawn(0.12)
    assert torch.equal(strong[..., :10, :], img[..., :10, :])  # background and rim untouched
    inner = (slice(None), slice(None), slice(12, 52), slice(12, 52))
    od = -torch.log(strong)
    # the drawn detail, measured as the loss measures it, has about the decoded sd
    d = texture_detail(strong, mask)[inner]
    along = (d * c[inner]).sum(1)
    assert float(along.std()) == pytest.approx(0.12, rel=0.3)
    # the grain's colour is the decoded one: green absorbs most
    dod = od[inner] - float(-np.log(0.8))
    assert float(dod[0, 1].abs().mean()) > 2 * float(dod[0, 0].abs().mean())
    assert float((-torch.log(weak)).std()) < float(od[inner].std())
    # the same field: the grain sits in the same place at both strengths
    a = (-torch.log(weak))[inner][0, 1].flatten()
    b = od[inner][0, 1].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.95


def test_decode_render_draws_texture_and_keeps_the_mean():
    # no decoded mask: the untrained mask would hide the cell
    m = TwoBranchVAE(_args(crop_size=32, predict_mask=False)).eval()
    z = torch.randn(3, m.n_latent, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = m.decode(z)
        shown = m.decode(z, render=True)
    assert torch.equal(shown.image_mean, plain.image)
    assert not torch.equal(shown.image, plain.image)


def test_texture_layer_needs_the_residual_decoder():
    with pytest.raises(ValueError, match="residual"):
        TwoBranchVAE(_args(image_arch="plain"))


def test_rows_a_decode_skipped_stay_finite():
    # _rows_only scatters zeros into the rows it did not decode; the caller weights them 0
    s = 16
    mask = torch.ones(2, 1, s, s)
    img = _grainy(s, 0.1).expand(2, -1, -1, -1)
    dec = SimpleNamespace(
        texture_amp=torch.zeros(2, 1, s, s),
        texture_floor=torch.zeros(2, 1, s, s),
        texture_dir=torch.zeros(2, 3, s, s),
        texture_amp_coarse=None,
    )
    out = texture_nll(dec, texture_detail(img, mask), texture_region(mask))
    assert torch.isfinite(out).all() and torch.isfinite(out * 0).all()


def test_the_layer_leaves_every_other_parameter_as_without_it():
    # same seed: the model with the layer starts exactly as the one without, bar the layer
    torch.manual_seed(3)
    plain = TwoBranchVAE(_args(texture_head=False)).state_dict()
    torch.manual_seed(3)
    with_layer = TwoBranchVAE(_args()).state_dict()
    extra = {k for k in with_layer if k not in plain}
    assert extra and all("texture" in k for k in extra)
    assert all(torch.equal(plain[k], with_layer[k]) for k in plain)


# -- two bands (VAEArgs.texture_coarse) ---------------------------------------------------


def _blobs(s: int, amp: float, sigma: float, seed: int = 0) -> torch.Tensor:
    """A pale cell whose optical density carries blobs ``sigma`` px wide, detail sd ~amp."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    n = ndi.gaussian_filter(rng.standard_normal((s, s)), sigma, mode="wrap")
    n = torch.from_numpy((n / n.std()).astype(np.float32))[None, None]
    c = F.normalize(torch.tensor([0.3, 0.9, 0.3]), dim=0).view(1, 3, 1, 1)
    return torch.exp(-(0.3 + amp * n * c)).clamp(0, 1)


def _band_sd(img: torch.Tensor, mask: torch.Tensor, inner) -> tuple[float, float]:
    from vae.losses import texture_bands

    fine, coarse = texture_bands(texture_detail(img, mask), mask)
    return float(fine[inner].pow(2).sum(1).mean().sqrt()), float(
        coarse[inner].pow(2).sum(1).mean().sqrt()
    )


def test_bands_split_the_detail_by_size():
    from vae.losses import texture_bands

    s = 48
    mask = torch.ones(1, 1, s, s)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    for img in (_blobs(s, 0.1, 0.5), _blobs(s, 0.1, 2.0)):
        d = texture_detail(img, mask)
        fine, coarse = texture_bands(d, mask)
        assert torch.allclose(fine + coarse, d, atol=1e-6)
    f1, c1 = _band_sd(_blobs(s, 0.1, 0.5), mask, inner)  # 1 px grain
    f2, c2 = _band_sd(_blobs(s, 0.1, 2.0), mask, inner)  # blobs 4-5 px across
    assert f1 > 2 * c1 and c2 > 1.5 * f2


def test_two_band_layer_adds_one_map_and_leaves_the_rest_as_one_band():
    torch.manual_seed(3)
    one = TwoBranchVAE(_args()).state_dict()
    torch.manual_seed(3)
    m = TwoBranchVAE(_args(texture_coarse=True))
    two = m.state_dict()
    assert set(one) == set(two)
    differ = {k for k in one if one[k].shape != two[k].shape}
    # the layer's two output layers have one more channel; nothing else changes
    assert differ and all("texture" in k for k in differ)
    assert all(torch.equal(one[k], two[k]) for k in one if "texture" not in k)
    dec = m.decode(torch.randn(2, m.n_latent))
    assert dec.texture_amp_coarse.shape == (2, 1, 16, 16) and bool(
        (dec.texture_amp_coarse > 0).all()
    )
    assert TwoBranchVAE(_args()).decode(torch.randn(2, m.n_latent)).texture_amp_coarse is None
    # switched on without the texture layer: nothing to split
    assert (
        TwoBranchVAE(_args(texture_head=False, texture_coarse=True))
        .decode(torch.randn(1, m.n_latent))
        .texture_amp_coarse
        is None
    )


def test_fitted_two_band_layer_tells_coarse_granules_from_fine_grain():
    # two kinds of cell with the same detail sd, one in 1 px grain, one in 4-5 px blobs:
    # a few steps on the texture term alone must decode the coarse band stronger for the
    # blobs and the fine band stronger for the grain
    torch.manual_seed(0)
    m = TwoBranchVAE(_args(crop_size=32, texture_coarse=True))
    s, b = 32, 8
    fine = torch.cat([_blobs(s, 0.1, 0.5, seed=i) for i in range(b // 2)])
    coarse = torch.cat([_blobs(s, 0.1, 2.0, seed=i) for i in range(b // 2)])
    out = _fit_two_kinds(m, torch.cat([fine, coarse]), torch.ones(b, 1, s, s))
    ratio = (out.texture_amp_coarse / out.texture_amp)[:, 0, 8:-8, 8:-8].mean(dim=(1, 2))
    assert float(ratio[b // 2 :].min()) > 3 * float(ratio[: b // 2].max())


@pytest.mark.parametrize(
    "fine_sd, coarse_sd", [(0.08, 0.03), (0.06, 0.06), (0.05, 0.07), (0.01, 0.08)]
)
def test_render_draws_each_band_at_its_decoded_sd(fine_sd, coarse_sd):
    s = 64
    img = torch.full((1, 3, s, s), 0.8)
    mask = torch.ones(1, 1, s, s)
    c = F.normalize(torch.tensor([0.3, 0.9, 0.3]), dim=0).view(1, 3, 1, 1).expand(1, 3, s, s)
    drawn = render_texture(
        img,
        torch.full((1, 1, s, s), fine_sd),
        c,
        mask,
        seed=2,
        amp_coarse=torch.full((1, 1, s, s), coarse_sd),
    )
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    f, k = _band_sd(drawn, mask, inner)
    assert k == pytest.approx(coarse_sd, rel=0.3)
    (_, _), (cf, cc) = texture_field_bands(s, 2)
    if fine_sd >= coarse_sd * cf / cc:
        assert f == pytest.approx(fine_sd, rel=0.3)
    else:  # finer than the coarse field's own fine band: drawn with the coarse field alone
        assert f == pytest.approx(coarse_sd * cf / cc, rel=0.3)


def test_two_band_rows_a_decode_skipped_stay_finite():
    s = 16
    mask = torch.ones(2, 1, s, s)
    img = _grainy(s, 0.1).expand(2, -1, -1, -1)
    zeros = torch.zeros(2, 1, s, s)
    dec = SimpleNamespace(
        texture_amp=zeros,
        texture_floor=zeros,
        texture_dir=torch.zeros(2, 3, s, s),
        texture_amp_coarse=zeros,
        texture_floor_coarse=zeros,
        texture_dir_coarse=torch.zeros(2, 3, s, s),
    )
    out = texture_nll(dec, texture_detail(img, mask), texture_region(mask))
    assert torch.isfinite(out).all() and torch.isfinite(out * 0).all()


def test_coarse_share_reads_blobs_high_and_grain_low():
    from vae.analysis.granules import grain_coarse_share

    s = 48
    yy, xx = np.mgrid[:s, :s]
    cell = (yy - s / 2) ** 2 + (xx - s / 2) ** 2 < (s / 2 - 2) ** 2
    imgs = [
        (b[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        for b in (_blobs(s, 0.1, 0.5), _blobs(s, 0.1, 2.0))
    ]
    share = grain_coarse_share(np.stack(imgs), np.stack([cell, cell]))
    assert 0 <= share[0] < 0.5 < share[1] <= 1
    assert np.isnan(grain_coarse_share(np.stack(imgs[:1]), np.zeros((1, s, s), bool))[0])


def test_train_with_two_bands_saves_them_and_evaluate_draws_them(tmp_path, run_in_process):
    from tests.helpers.run import TINY_TRAIN
    from tests.helpers.vae_toy import make_paired
    from vae.api import Study
    from vae.checkpoint import load_model

    make_paired(12, image_only=3, expression_only=4).write_h5ad(tmp_path / "paired.h5ad")
    common = [
        f"paths.root={tmp_path / 'out'}",
        f"paths.inputs.paired={tmp_path / 'paired.h5ad'}",
        "experiment=s",
        *TINY_TRAIN,
        "vae.texture_weight=1",
        "vae.texture_coarse=true",
    ]
    run_in_process(common, "train")
    run = tmp_path / "out" / "s"
    model, _ = load_model(run / "train" / "model.pt", "cpu")
    assert model.args.texture_head and model.args.texture_coarse
    run_in_process([*common, "analysis.split=all"], "evaluate")
    assert (run / "evaluate" / "reconstructions.png").is_file()
    study = Study.load(run)
    z = torch.from_numpy(np.asarray(study.reference.obsm["X_vae_full"][:3], np.float32))
    with torch.no_grad():
        dec = model.decode(z, render=True)
    assert dec.texture_amp_coarse is not None and torch.isfinite(dec.image).all()


def test_render_draws_each_band_in_its_own_colour():
    from vae.losses import texture_bands

    s = 64
    img = torch.full((1, 3, s, s), 0.8)
    mask = torch.ones(1, 1, s, s)

    def unit(rgb):
        return F.normalize(torch.tensor(rgb), dim=0).view(1, 3, 1, 1).expand(1, 3, s, s)

    fine_c, coarse_c = unit([0.2, 0.9, 0.3]), unit([0.9, 0.2, 0.3])  # violet grain, cyan blobs
    amp = torch.full((1, 1, s, s), 0.06)
    drawn = render_texture(img, amp, fine_c, mask, 2, amp_coarse=amp, direction_coarse=coarse_c)
    fine, coarse = texture_bands(texture_detail(drawn, mask), mask)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))

    def energy(band):  # share of each channel in a band's energy
        e = band[inner].pow(2).mean(dim=(0, 2, 3))
        return e / e.sum()

    # the coarse band is mostly the coarse colour's (red-absorbing), the fine mostly green
    assert float(energy(coarse)[0]) > 0.5 > float(energy(fine)[0])
    assert float(energy(fine)[1]) > float(energy(coarse)[1])


def test_coarse_grain_is_drawn_where_asked_and_one_fine_grain_elsewhere():
    s = 32
    img = torch.full((1, 3, s, s), 0.8)
    mask = torch.ones(1, 1, s, s)
    c = F.normalize(torch.tensor([0.3, 0.9, 0.3]), dim=0).view(1, 3, 1, 1).expand(1, 3, s, s)
    fine, coarse = torch.full((1, 1, s, s), 0.03), torch.full((1, 1, s, s), 0.04)
    where = torch.zeros(1, 1, s, s)
    where[..., :, : s // 2] = 1.0  # the left half is cytoplasm

    def draw(w):
        return render_texture(img, fine, c, mask, 1, coarse, c, w)

    both, left = draw(None), draw(where)
    one = render_texture(img, torch.full((1, 1, s, s), 0.05), c, mask, 1)  # sqrt(.03^2 + .04^2)
    assert torch.allclose(left[..., : s // 2], both[..., : s // 2])
    assert torch.allclose(left[..., s // 2 :], one[..., s // 2 :])
