"""Image branch of the β-VAE: residual architecture, spectral term, free bits, stain jitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vae.data import augment_stain
from vae.losses import (
    LossWeights,
    class_balance_weights,
    kl_normal,
    label_loss,
    spectral_l1,
    vae_loss,
)
from vae.model import TwoBranchVAE, VAEArgs
from vae.train import active_units


@pytest.mark.parametrize("size", [64, 128])
def test_residual_arch_shapes(size):
    torch.manual_seed(0)
    m = TwoBranchVAE(VAEArgs(n_genes=12, crop_size=size, image_arch="residual"))
    b = 3
    img, mask = torch.rand(b, 3, size, size), torch.ones(b, 1, size, size)
    x, has = torch.rand(b, 12), torch.ones(b, dtype=torch.bool)
    with torch.no_grad():
        out = m(img, mask, x, has, has)
    assert out.joint.image.shape == (b, 3, size, size)
    assert out.joint.mask_logits.shape == (b, 1, size, size)
    assert 0 <= float(out.joint.image.min()) and float(out.joint.image.max()) <= 1
    # the residual variant has more parameters than the plain one (capacity at coarse scales)
    plain = TwoBranchVAE(VAEArgs(n_genes=12, crop_size=size))
    assert sum(p.numel() for p in m.parameters()) > sum(p.numel() for p in plain.parameters())


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="image_arch"):
        VAEArgs(n_genes=5, crop_size=64, image_arch="unet")


def test_encoder_widths_apart_from_the_decoders():
    # vae.encoder_channels widens the image encoder alone; the decoder keeps `channels`
    a = VAEArgs(n_genes=6, crop_size=16, channels=[8, 8], encoder_channels=[16, 32])
    m = TwoBranchVAE(a)
    convs = [c for c in m.image_encoder.conv if isinstance(c, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs if c.stride == (2, 2)] == [16, 32]
    same = TwoBranchVAE(VAEArgs(n_genes=6, crop_size=16, channels=[8, 8]))
    dec = sum(p.numel() for p in m.image_decoder.parameters())
    assert dec == sum(p.numel() for p in same.image_decoder.parameters())
    g = torch.Generator().manual_seed(0)
    img, mask = torch.rand(2, 3, 16, 16, generator=g), torch.ones(2, 1, 16, 16)
    with torch.no_grad():
        mu, _ = m.image_encoder(img, mask)
    assert mu.shape == (2, a.n_shared + a.n_private)
    with pytest.raises(ValueError, match="encoder_channels"):
        VAEArgs(n_genes=6, crop_size=16, channels=[8, 8], encoder_channels=[8, 8, 8, 8, 8])
    with pytest.raises(ValueError, match="encoder_channels.*conv"):
        VAEArgs(n_genes=6, crop_size=32, encoder_channels=[8], image_encoder="resnet18")


def test_old_checkpoint_args_keep_plain_arch():
    # checkpoints written before image_arch existed have no such key, and their
    # state dicts name the plain layers: the plain layout must not move
    a = VAEArgs(**{"n_genes": 5, "crop_size": 64})
    assert a.image_arch == "plain" and not a.texture_noise
    keys = set(TwoBranchVAE(a).image_decoder.state_dict())
    assert keys == {
        "fc.weight",
        "fc.bias",
        *(f"deconv.{i}.{w}" for i in (0, 1, 3, 4, 6, 7, 9) for w in ("weight", "bias")),
    }
    assert isinstance(TwoBranchVAE(a).image_decoder.deconv[-1], torch.nn.ConvTranspose2d)


def test_texture_noise_makes_decoding_stochastic():
    a = VAEArgs(n_genes=5, crop_size=16, channels=[8, 8], image_arch="residual", texture_noise=True)
    m = TwoBranchVAE(a).eval()
    z = torch.zeros(2, a.n_latent)
    with torch.no_grad():
        assert not torch.equal(m.decode(z).image, m.decode(z).image)


def _dots(shift: int, n: int = 12, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    img = np.ones((3, size, size), np.float32) * 0.8
    for r, c in g.integers(4, size - 4, (n, 2)):
        img[:, r, (c + shift) % size] = 0.2
    return torch.from_numpy(img)[None]


def test_spectral_l1_ignores_where_granules_sit_but_not_how_many():
    mask = torch.ones(1, 1, 32, 32)
    a = _dots(0)
    moved = torch.roll(a, shifts=(5, 7), dims=(2, 3))  # same granules, other place
    smooth = torch.full_like(a, float(a.mean()))  # what a blurred decoder gives
    same = float(spectral_l1(a, moved, mask))
    blur = float(spectral_l1(a, smooth, mask))
    pixel_moved = float((a - moved).abs().mean())
    pixel_blur = float((a - smooth).abs().mean())
    # the pixel loss prefers the blurred disc; the spectrum prefers the moved granules
    assert pixel_blur < pixel_moved
    assert same < 0.2 * blur


@torch.no_grad()  # only values are checked
def _terms(free_bits: float, mu_value: float):
    torch.manual_seed(0)
    m = TwoBranchVAE(
        VAEArgs(n_genes=6, crop_size=16, channels=[8, 8], expression_likelihood="gaussian")
    )
    b = 4
    img, mask = torch.rand(b, 3, 16, 16), torch.ones(b, 1, 16, 16)
    x = torch.rand(b, 6)
    has = torch.ones(b, dtype=torch.bool)
    out = m(img, mask, x, has, has)
    mu, lv = out.posteriors.joint
    out.posteriors.joint = (torch.full_like(mu, mu_value), lv * 0)
    w = LossWeights(free_bits=free_bits)
    return vae_loss(out, img, mask, x, None, None, beta=1.0, weights=w, image_likelihood="mse")


def test_free_bits_floor_the_kl_objective():
    plain = _terms(0.0, 1e-3)
    floored = _terms(0.5, 1e-3)  # KL per dim 5e-7 nats
    d = plain.kl_per_dim.numel()
    # a near-zero KL costs the floor for every dim; the reported KL is unchanged
    assert float(floored.kl_objective) == pytest.approx(0.5 * d, rel=1e-4)
    assert float(floored.kl) == pytest.approx(float(plain.kl), rel=1e-6)
    big = _terms(0.5, 2.0)  # KL per dim 2 nats: above the floor, counted as is
    assert float(big.kl_objective) == pytest.approx(float(big.kl), rel=1e-5)


def test_active_units_counts_dims_over_threshold():
    assert active_units([0.0, 0.005, 0.02, 3.0]) == 2
    kl = kl_normal((torch.zeros(2, 3), torch.zeros(2, 3)))
    assert active_units(kl.mean(0).numpy()) == 0


def test_stain_jitter_is_seeded_bounded_and_off_at_zero():
    img = torch.rand(4, 3, 8, 8) * 0.8 + 0.1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = augment_stain(img, 0.2, g1), augment_stain(img, 0.2, g2)
    assert torch.equal(a, b)
    assert a.shape == img.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.allclose(a, img)
    # colours change per row, the picture does not: strong correlation with the input
    r = np.corrcoef(a[0].flatten().numpy(), img[0].flatten().numpy())[0, 1]
    assert r > 0.8
    assert torch.equal(augment_stain(img, 0.0, g1), img)


@pytest.mark.parametrize("fusion", ["poe", "moe"])
def test_cnn_and_image_terms_on_image_rows_only_give_the_same_loss(monkeypatch, fusion):
    """Modality-aware compute: the CNNs run, and the image terms (pixels, mask, SSIM,
    spectral, granule and nucleus layers) are scored, on the rows with a crop only:
    the same loss terms (1e-6) and gradients as running and scoring every row."""
    import vae.losses as vl
    import vae.model as vm
    from tests.helpers.vae_toy import assert_same_loss_terms

    torch.manual_seed(0)
    m = TwoBranchVAE(
        VAEArgs(
            n_genes=7,
            crop_size=16,
            channels=[8, 8],
            n_private=2,
            expression_likelihood="gaussian",
            fusion=fusion,
            image_arch="residual",
            granule_head=True,
            nucleus_head=True,
        )
    )
    b = 6
    img, mask = torch.rand(b, 3, 16, 16), (torch.rand(b, 1, 16, 16) > 0.3).float()
    x = torch.rand(b, 7)
    hi = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    he = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    img = img * hi.view(-1, 1, 1, 1)
    nuc = (torch.rand(b, 1, 16, 16) > 0.5).float() * mask * hi.view(-1, 1, 1, 1)
    gran = (torch.rand(b, 1, 16, 16) > 0.9).float() * mask * hi.view(-1, 1, 1, 1)
    w = LossWeights(
        ssim=0.5,
        spectral=2.0,
        align=1.0,
        align_mode="clip",
        granules=2.0,
        nucleus=1.0,
        nucleus_gap=3.0,
    )

    def run():
        m.zero_grad()
        torch.manual_seed(1)
        out = m(img, mask, x, hi, he)
        t = vae_loss(
            out,
            img,
            mask,
            x,
            None,
            None,
            beta=1.0,
            weights=w,
            n_shared=16,
            granules=gran,
            nucleus=nuc,
        )
        t.total.backward()
        return t, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    new, g_new = run()
    monkeypatch.setattr(vm, "_rows_only", lambda fn, rows, *t: fn(*t))
    monkeypatch.setattr(vl, "_row_picker", lambda rows: lambda t: t)
    old, g_old = run()
    s = assert_same_loss_terms(new, old)
    assert s["image"] != 0 and s["granules"] > 0 and s["nucleus"] > 0
    assert g_new.keys() == g_old.keys()
    for n in g_new:
        torch.testing.assert_close(g_new[n], g_old[n], rtol=1e-5, atol=1e-5, msg=n)


def test_batch_without_images_keeps_every_parameter_in_the_graph():
    torch.manual_seed(0)
    m = TwoBranchVAE(
        VAEArgs(n_genes=5, crop_size=16, channels=[8, 8], expression_likelihood="gaussian")
    )
    b = 3
    no = torch.zeros(b, dtype=torch.bool)
    out = m(torch.zeros(b, 3, 16, 16), torch.zeros(b, 1, 16, 16), torch.rand(b, 5), no, ~no)
    loss = vae_loss(
        out,
        torch.zeros(b, 3, 16, 16),
        torch.zeros(b, 1, 16, 16),
        torch.rand(b, 5),
        None,
        None,
        beta=1.0,
    )
    loss.total.backward()
    assert all(p.grad is not None for p in m.image_decoder.parameters())
    assert all(p.grad is not None for p in m.image_encoder.parameters())


def _head_toy(n_classes: int, b: int):
    """A seeded 16 px model with a label head, and b random crops / masks / profiles."""
    torch.manual_seed(0)
    m = TwoBranchVAE(
        VAEArgs(
            n_genes=5,
            crop_size=16,
            channels=[8, 8],
            expression_likelihood="gaussian",
            n_classes=n_classes,
        )
    )
    return m, torch.rand(b, 3, 16, 16), torch.ones(b, 1, 16, 16), torch.rand(b, 5)


@torch.no_grad()  # only values are checked
def test_unknown_label_is_not_a_class_for_alignment_or_the_head():
    """Rows labelled NA are neither aligned with each other nor scored by the label head."""
    b = 4
    m, img, mask, x = _head_toy(3, b)
    hi = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    he = ~hi
    na = torch.full((b,), 2)  # every row unknown (code 2 = NA)
    w = LossWeights(align=1.0, align_mode="class", classify=1.0, unknown_label=2)
    out = m(img, mask, x, hi, he)
    t = vae_loss(out, img, mask, x, None, None, beta=1.0, weights=w, labels=na)
    assert float(t.align) == 0.0 and float(t.classify) == 0.0
    known = torch.tensor([0, 1, 0, 1])
    t = vae_loss(out, img, mask, x, None, None, beta=1.0, weights=w, labels=known)
    assert float(t.align) > 0 and float(t.classify) > 0


def test_class_balance_weights_even_out_classes_and_keep_the_mean_row_at_one():
    labels = np.array([0] * 8 + [1] * 2 + [2] * 5 + [3] * 3)  # 3 = unknown
    rows = np.ones(len(labels), bool)
    rows[10:15] = False  # class 2 is not among this expert's rows
    off = class_balance_weights(labels, rows, 4, 0.0, unknown=3)
    assert off == (1.0, 1.0, 1.0, 1.0)
    full = class_balance_weights(labels, rows, 4, 1.0, unknown=3)
    # 8 vs 2 rows: each class's rows weigh the same in total, mean row weight 1
    assert full[0] * 8 == pytest.approx(full[1] * 2)
    assert (full[0] * 8 + full[1] * 2) / 10 == pytest.approx(1.0)
    assert full[2] == 1.0 and full[3] == 1.0  # absent / unknown: never 0 (no 0 / 0 batch)
    half = class_balance_weights(labels, rows, 4, 0.5, unknown=3)
    assert half[1] / half[0] == pytest.approx(2.0)  # sqrt(8 / 2)
    assert class_balance_weights(labels, np.zeros(len(labels), bool), 4, 1.0) == (1.0,) * 4


@torch.no_grad()  # only values are checked
def test_class_weights_move_the_label_head_term_toward_the_rare_class():
    """A rare class the head gets wrong costs more once classes are balanced."""
    b = 6
    m, img, mask, x = _head_toy(2, b)
    hi = torch.ones(b, dtype=torch.bool)
    labels = torch.tensor([0, 0, 0, 0, 0, 1])
    out = m(img, mask, x, hi, ~hi)
    out.classifier.weight.zero_()  # the head calls every row class 0
    out.classifier.bias.copy_(torch.tensor([3.0, -3.0]))

    def head_term(w: LossWeights) -> float:
        return float(
            vae_loss(out, img, mask, x, None, None, beta=1.0, labels=labels, weights=w).classify
        )

    cw = class_balance_weights(labels.numpy(), np.ones(b, bool), 2, 1.0)
    plain = head_term(LossWeights(classify=1.0))
    bal = head_term(LossWeights(classify=1.0, classify_class_weights=(cw, cw)))
    # plain: 5 easy rows + 1 wrong; balanced: the wrong row is half the term
    assert bal > 2 * plain


def test_generalised_cross_entropy_spares_rows_the_head_doubts():
    """GCE: q -> 0 is the cross-entropy, q = 1 the mean absolute error of p_y; per class
    weights give the weighted mean; a row with a wrong-looking label gets less gradient."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 4, generator=g)
    target = torch.randint(0, 4, (9,), generator=g)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    assert float(label_loss(logits, target)) == pytest.approx(
        float(F.cross_entropy(logits, target))
    )
    assert float(label_loss(logits, target, w, 1e-5)) == pytest.approx(
        float(F.cross_entropy(logits, target, weight=w)), rel=1e-3
    )
    p_y = F.softmax(logits, 1).gather(1, target[:, None])[:, 0]
    assert float(label_loss(logits, target, None, 1.0)) == pytest.approx(float((1 - p_y).mean()))
    # two rows: one the head agrees with (p_y ~ 0.95), one it finds implausible (p_y ~ 0.01)
    lg = torch.tensor([[3.0, 0.0, 0.0], [-2.5, 2.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])

    def grad_ratio(q: float) -> float:
        (gr,) = torch.autograd.grad(label_loss(lg, y, None, q), lg)
        return float(gr[1].norm() / gr[0].norm())

    assert grad_ratio(0.7) < 0.1 * grad_ratio(0.0)
    with pytest.raises(ValueError, match="classify_noise_q"):
        LossWeights(classify_noise_q=1.5)


def test_rotation_moves_image_mask_and_granule_centres_together():
    from vae.data import augment_rotate

    s = 32
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    # an off-centre disc: its centre of mass must turn about the crop centre
    disc = (((yy - 10) ** 2 + (xx - 16) ** 2) <= 36).float()
    img = disc.expand(16, 3, s, s).clone()
    mask = disc.expand(16, 1, s, s).clone().to(torch.uint8)
    pts = torch.zeros(16, 1, s, s)
    pts[:, 0, 10, 16] = 1.0  # one point at the disc centre
    g = torch.Generator().manual_seed(0)
    a_img, a_mask, a_pts = augment_rotate(img, mask, g, scale=0.1, points=pts)
    assert a_mask.dtype == torch.uint8 and set(a_mask.unique().tolist()) <= {0, 1}
    c = (s - 1) / 2
    radius, angle = [], []
    for i in range(16):
        m = a_mask[i, 0].float()
        cy, cx = (m * yy).sum() / m.sum(), (m * xx).sum() / m.sum()
        radius.append(float(((cy - c) ** 2 + (cx - c) ** 2).sqrt()))
        angle.append(round(float(torch.atan2(cy - c, cx - c)), 2))
        # the image's disc is where the mask is
        assert ((a_img[i, 0] > 0.5).float() - m).abs().mean() < 0.03
        # the point (when it survives nearest resampling) stays inside the disc
        assert (a_pts[i, 0] * (1 - m)).sum() == 0
    # 5.5 px from the centre before; a turn plus 10 % zoom keeps it near that radius
    assert all(4.0 < r < 7.0 for r in radius)
    # rotations differ between rows (any angle, not only the 8 dihedral poses)
    assert len(set(angle)) > 8
    assert a_pts.sum() >= 12  # most single-pixel centres survive resampling


def test_stain_density_is_rgb2hed_and_reaches_the_encoder():
    from skimage.color import rgb2hed

    from vae.model import StainDensity, TwoBranchVAE, VAEArgs

    rgb = np.random.default_rng(0).uniform(0.05, 0.95, size=(6, 5, 3))
    got = StainDensity()(torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None])
    want = rgb2hed(rgb) * 10.0
    assert np.allclose(got[0].permute(1, 2, 0).numpy(), want, atol=1e-5)
    args = dict(n_genes=5, crop_size=16, channels=[8, 8], image_arch="residual")
    torch.manual_seed(0)
    plain = TwoBranchVAE(VAEArgs(**args))
    torch.manual_seed(0)
    stain = TwoBranchVAE(VAEArgs(**args, image_input="stain"))
    img = torch.rand(3, 3, 16, 16)
    mask = torch.ones(3, 1, 16, 16)
    # same weights, different input representation -> different codes
    assert not torch.allclose(plain.image_encoder(img, mask)[0], stain.image_encoder(img, mask)[0])
    with pytest.raises(ValueError, match="image_input"):
        VAEArgs(**args, image_input="hsv")


def test_dihedral_mean_code_is_pose_free_and_off_by_default():
    from tests.helpers.vae_toy import make_paired, tiny_model
    from vae.data import from_anndata
    from vae.infer import encode_dataset

    model = tiny_model().eval()
    data = from_anndata(make_paired(n=9), image_size=16)
    one = encode_dataset(model, data, views=1)
    eight = encode_dataset(model, data, views=8)
    assert model.args.encode_views == 1  # the default: the crop as given
    np.testing.assert_array_equal(encode_dataset(model, data).image, one.image)
    assert np.abs(eight.image - one.image).max() > 1e-4  # the averaging does something
    # rotating or mirroring every crop (and mask) leaves the averaged code unchanged,
    # the single-view code not
    turned = from_anndata(make_paired(n=9), image_size=16)
    turned.crops = torch.rot90(turned.crops, 1, (2, 3)).flip(3).contiguous()
    turned.masks = torch.rot90(turned.masks, 1, (2, 3)).flip(3).contiguous()
    np.testing.assert_allclose(encode_dataset(model, turned, views=8).image, eight.image, atol=1e-5)
    assert np.abs(encode_dataset(model, turned, views=1).image - one.image).max() > 1e-4
    # the fused code follows the averaged image expert; reconstructions decode the crop
    # as given whatever the views
    assert np.abs(eight.joint - one.joint).max() > 1e-4
    d1 = encode_dataset(model, data, views=1, decode=True).decoded
    d8 = encode_dataset(model, data, views=8, decode=True).decoded
    np.testing.assert_array_equal(d1.rec_image, d8.rec_image)


def test_reconstructions_keep_their_decoded_masks_and_draw_through_them():
    """encode_dataset(decode=True) keeps the decoded cell masks of the joint and the
    expression-only decodes, and draws both through them (vae.analysis.traverse.draw_cells)."""
    from tests.helpers.vae_toy import make_paired, tiny_model
    from vae.analysis.traverse import CELL_MASK_THRESHOLD, cell_masks
    from vae.data import from_anndata
    from vae.infer import encode_dataset

    model = tiny_model().eval()
    data = from_anndata(make_paired(n=9), image_size=16)
    dec = encode_dataset(model, data, decode=True).decoded
    with torch.no_grad():
        post = model.encode(
            data.crops.float() / 255 * data.masks.float(),
            data.x,
            mask=data.masks.float(),
            log_library=torch.log(data.library.clamp_min(1.0)),
        )
        want = model.decode(post.joint[0]).mask[:, 0].numpy()
        want_e = model.decode(post.expression[0]).mask[:, 0].numpy()
    np.testing.assert_allclose(dec.rec_mask, want, atol=1e-5)
    np.testing.assert_allclose(dec.image_from_expr_mask, want_e, atol=1e-5)
    for cells, img, m in (
        (dec.rec_cells(), dec.rec_image, dec.rec_mask),
        (dec.image_from_expr_cells(), dec.image_from_expr, dec.image_from_expr_mask),
    ):
        inside = cell_masks(m)  # over the threshold, holes filled
        assert inside.any() and (~inside).any() and (m[inside] > CELL_MASK_THRESHOLD).any()
        np.testing.assert_array_equal(cells[inside], img[inside])
        assert (cells[~inside] == 0).all() and (img[~inside] > 0).any()


def test_encode_views_is_checked_and_saved():
    with pytest.raises(ValueError, match="encode_views"):
        VAEArgs(n_genes=4, crop_size=16, channels=[8, 16], encode_views=4)
    from tests.helpers.vae_toy import tiny_model

    model = tiny_model()
    with pytest.raises(ValueError, match="views"):
        model.encode(torch.zeros(2, 3, 16, 16), views=3)


def test_tensorboard_grid_draws_decoded_cells_through_their_decoded_mask(tmp_path):
    """The reconstruction grid's decoded rows are draw_cells of the decodes (the decoded
    mask, 0 outside), not the decoder's raw square nor the input's mask."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers.vae_toy import make_paired, tiny_model
    from vae.analysis.traverse import draw_cells
    from vae.data import from_anndata, raw_batch, to_batch
    from vae.tb import RECON_TAG, TBLogger

    model = tiny_model().eval()
    data = from_anndata(make_paired(n=6), image_size=16)
    batch = to_batch(raw_batch(data, torch.arange(4)), torch.device("cpu"))
    tb = TBLogger(tmp_path, data.gene_names, [0])
    tb.dims_legend(16, 8)
    tb.epoch_figures(model, batch, 0)
    tb.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    grid = np.asarray(Image.open(io.BytesIO(acc.Images(RECON_TAG)[0].encoded_image_string)))
    with torch.no_grad():
        post = model.encode(
            batch.image,
            batch.x,
            batch.has_image,
            batch.has_expression,
            batch.mask,
            batch.log_library,
        )
        joint = model.decode(post.joint[0], render=True)
    img = joint.image.permute(0, 2, 3, 1).numpy()
    mask = joint.mask[:, 0].numpy()
    want = draw_cells(img, mask)
    got = np.stack([grid[20:36, 2 + 18 * c : 18 + 18 * c, :3] for c in range(4)]) / 255.0
    np.testing.assert_allclose(got, want, atol=1.5 / 255)
    outside = mask <= 0.5
    assert outside.any() and (img[outside] > 0.05).any()  # the raw square has colour there
    # the grid's rows are named once in the text tab (the image card has no titles)
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    legend = acc.Tensors(f"{RECON_TAG}/rows/text_summary")
    assert len(legend) == 1
    text = legend[0].tensor_proto.string_val[0].decode()
    assert text.startswith("Rows, top to bottom: input (masked crop) | fused reconstruction")
    dims = acc.Tensors("latent/dims/text_summary")[0].tensor_proto.string_val[0].decode()
    assert dims == (
        "kl_dim/NN and latent/mu_NN: dims 00-15 shared (fused), 16-23 private to the "
        "image, 24-31 private to the expression."
    )


def test_markdown_table_for_the_text_tab():
    """Evaluate's tables in TensorBoard: a pipe table (no optional tabulate needed), rows
    capped with a note naming the CSV."""
    import pandas as pd

    from vae.analysis.run import markdown_table

    df = pd.DataFrame({"latent": ["joint", "a|b"], "knn accuracy": [0.83456789, np.nan]})
    md = markdown_table(df, "latent_structure")
    assert md.splitlines()[:4] == [
        "| latent | knn accuracy |",
        "|---|---|",
        "| joint | 0.8346 |",
        "| a\\|b |  |",
    ]
    from vae.analysis.run import tb_names

    # metric names as tag parts: no spaces, brackets or arrows (TB audit), never two
    # metrics in one tag (review)
    got = tb_names(["image (joint)", "image -> expression", "γδ T cells", "(unlabelled)"])
    assert list(got.values()) == ["image_joint", "image_to_expression", "γδ_T_cells", "unlabelled"]
    got = tb_names(["Neutrophil (band)", "Neutrophil band", "(x)", "x"])
    assert list(got.values()) == ["Neutrophil_band", "Neutrophil_band_2", "x", "x_2"]
    long = markdown_table(pd.DataFrame({"x": range(60)}), "per_gene", max_rows=50)
    assert long.count("\n| ") == 50 and long.endswith("50 of 60 rows; all in per_gene.csv")


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_a_downsized_mask_stays_on_its_crop(factor):
    """vae.data._resize (vae.image_size below the stored crops, stage=embed's model size):
    the mask's centre stays where the area-resized crop puts the cell; torch's nearest
    had moved it (1 - 1/f) / 2 px right and down (factor 8: 3.5 source px)."""
    import torch

    from vae.data import _resize

    s = 128
    shifts = []
    for a in range(20, 60):
        m = torch.zeros(1, 1, s, s, dtype=torch.uint8)
        m[..., a : a + 37, :] = 1
        crop = (m.repeat(1, 3, 1, 1) * 200).byte()
        c, r = _resize(crop, m, s // factor)
        rows = r[0, 0].float().sum(1)
        centre = ((rows * torch.arange(s // factor)).sum() / rows.sum() + 0.5) * factor
        shifts.append(float(centre) - (a + 18.5))
        grey = c[0, 0].float().mean(1)  # the crop's own cell, drawn where the mask is
        assert ((grey >= 100) == (rows > 0)).all()
    assert abs(np.mean(shifts)) < 0.1 and max(map(abs, shifts)) <= factor / 2


def test_tensorboard_from_expression_row_takes_the_pose_of_another_cell_of_the_batch():
    """The grid's cross-modal row: each expression code plus the pose (single-view minus
    8-view fused code) of the batch's cell with a crop nearest it, never its own; a model
    whose codes keep their pose (encode_views 1) draws the codes as they are."""
    import dataclasses

    from tests.helpers.vae_toy import make_paired, tiny_model
    from vae.data import from_anndata, raw_batch, to_batch
    from vae.infer import encode_batch
    from vae.tb import lend_batch_poses

    model = tiny_model().eval()
    model.args = dataclasses.replace(model.args, encode_views=8)
    data = from_anndata(make_paired(n=8), image_size=16)
    batch = to_batch(raw_batch(data, torch.arange(6)), torch.device("cpu"))
    batch.has_image[1] = False  # a row without a crop lends nothing
    with torch.no_grad():
        post = encode_batch(model, batch)
        got = lend_batch_poses(model, batch, post)
        rep = encode_batch(model, batch, views=8).joint[0]
    ze, pose = post.expression[0], post.joint[0] - rep
    assert float(pose.abs().max()) > 1e-4
    for i in range(6):
        d = torch.cdist(ze[i : i + 1], rep)[0]
        d[i], d[1] = float("inf"), float("inf")
        j = int(d.argmin())
        assert j not in (i, 1)
        torch.testing.assert_close(got[i], ze[i] + pose[j])
    model.args = dataclasses.replace(model.args, encode_views=1)
    with torch.no_grad():
        torch.testing.assert_close(lend_batch_poses(model, batch, post), ze)
