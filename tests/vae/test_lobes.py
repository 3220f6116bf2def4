"""Lobe layer (``vae.lobe_head``): the count head learns from the lobe counter without
moving the latent, and drawn cells are cut into the count it gives, as the counter
reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.vae_toy import image_tensors
from vae.analysis.granules import count_lobes
from vae.data import raw_batch, to_batch
from vae.lobes import (
    LOBE_CLASSES,
    carve_lobes,
    fill_cuts,
    lobe_count,
    lobe_nll,
    lobe_targets,
    without_lobe_layer,
)
from vae.model import TwoBranchVAE, VAEArgs

S = 48


def _ring(s: int = S, r_in: float = 5.0, r_out: float = 11.0) -> torch.Tensor:
    """(1, 1, s, s) logits of a ring-shaped nucleus (a segmented nucleus whose lobes the
    decoder has blurred around the cell): +6 inside, -6 outside."""
    c = torch.arange(s, dtype=torch.float32) + 0.5 - s / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    r = torch.sqrt(xx**2 + yy**2)
    return torch.where((r > r_in) & (r < r_out), 6.0, -6.0).view(1, 1, s, s)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_a_ring_cut_into_k_lobes_is_read_as_k_lobes(k):
    carved, cut = carve_lobes(_ring(), torch.tensor([k]), sharpness=8.0)
    assert count_lobes((carved[0, 0] > 0).numpy()) == k
    if k == 1:  # one lobe: nothing cut
        assert torch.equal(carved, _ring()) and not cut.any()
    else:  # the logits fall exactly where the cut is
        assert torch.equal(carved < _ring(), cut.bool())


def test_cuts_stay_in_the_nucleus():
    """A cut separates lobes; it does not run on through the cytoplasm to the cell's
    edge (drawn there it was a pale line across the whole cell)."""
    from vae.lobes import NUCLEUS_MARGIN_PX

    ring = _ring()
    carved, cut = carve_lobes(ring, torch.tensor([3]), sharpness=8.0)
    assert count_lobes((carved[0, 0] > 0).numpy()) == 3
    c = torch.arange(S, dtype=torch.float32) + 0.5 - S / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    r = torch.sqrt(xx**2 + yy**2)
    on = cut[0, 0].bool()
    assert on.any()
    # ring: 5 < r < 11; every cut pixel within the margin of it, none near the cell edge
    assert float(r[on].max()) < 11 + NUCLEUS_MARGIN_PX + 1
    assert float(r[on].min()) > 5 - NUCLEUS_MARGIN_PX - 1
    assert not on[r > 14].any()


def test_two_blobs_are_cut_between_them_first():
    """The first cut goes where the mask holds least: a two-blob nucleus cut in two
    keeps both blobs whole."""
    c = torch.arange(S, dtype=torch.float32) + 0.5 - S / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    blobs = ((xx - 7) ** 2 + yy**2 < 25) | ((xx + 7) ** 2 + yy**2 < 25)
    logits = torch.where(blobs, 6.0, -6.0).view(1, 1, S, S)
    carved, _ = carve_lobes(logits, torch.tensor([2]), sharpness=8.0)
    kept = (carved[0, 0] > 0).sum() / (logits[0, 0] > 0).sum()
    assert float(kept) > 0.97
    assert count_lobes((carved[0, 0] > 0).numpy()) == 2


def test_cut_corners_are_rounded_next_to_the_cut_only():
    """round_px > 0: the corners a straight cut leaves in a disc nucleus are cut off too
    (the lobes end round, a notch between them), only next to the cut, by a disc sized
    to each lobe; the count and the rest of the outline stay."""
    from scipy import ndimage as ndi

    from vae.lobes import LOBE_ROUND_FRACTION

    disc = _ring(r_in=-1.0, r_out=12.0)  # a filled disc
    _, straight = carve_lobes(disc, torch.tensor([2]), sharpness=8.0, round_px=0)
    carved, rounded = carve_lobes(disc, torch.tensor([2]), sharpness=8.0, round_px=2)
    a, b = straight[0, 0].bool().numpy(), rounded[0, 0].bool().numpy()
    assert (b >= a).all()
    extra = b & ~a
    assert extra.sum() >= 4  # the corners at both ends of the cut
    nucleus = (disc[0, 0] > 0).numpy()
    # each half-disc's widest half-width sets its disc: ~6 px -> a 4 px disc, reaching 6 px
    w = ndi.distance_transform_edt(nucleus & ~a).max()
    r = max(2, round(LOBE_ROUND_FRACTION * w))
    assert 3 <= r <= 5
    assert ndi.distance_transform_edt(~a)[extra].max() <= r + 2 + 1e-6
    assert count_lobes((carved[0, 0] > 0).numpy()) == 2
    # the notch: the cut is wider where it leaves the disc than at the centre
    rim = nucleus & ~ndi.binary_erosion(nucleus, iterations=3)
    assert b[rim].sum() > a[rim].sum()
    # the outline far from the cut is the decoder's
    far = ndi.distance_transform_edt(~a) > r + 2
    assert (b[far] == a[far]).all()


def test_rounding_scales_with_the_lobe_and_never_loses_one():
    """A larger lobe gets a larger disc (the notch is wider on a larger nucleus), and
    the opening keeps each lobe's widest disc: a thin ring cut into five keeps five."""
    from scipy import ndimage as ndi

    def removed(r_out):
        disc = _ring(s=64, r_in=-1.0, r_out=r_out)
        _, straight = carve_lobes(disc, torch.tensor([2]), sharpness=8.0, round_px=0)
        _, rounded = carve_lobes(disc, torch.tensor([2]), sharpness=8.0)
        a, b = straight[0, 0].bool().numpy(), rounded[0, 0].bool().numpy()
        return ndi.distance_transform_edt(~a)[b & ~a].max()

    assert removed(24.0) > removed(10.0)
    thin = _ring(r_in=8.0, r_out=11.0)
    for k in (2, 3, 4, 5):
        carved, _ = carve_lobes(thin, torch.tensor([k]), sharpness=8.0)
        assert count_lobes((carved[0, 0] > 0).numpy()) == k


def test_counts_rows_independently():
    logits = _ring().repeat(3, 1, 1, 1)
    carved, _ = carve_lobes(logits, torch.tensor([1, 3, 4]), sharpness=8.0)
    got = [count_lobes((carved[i, 0] > 0).numpy()) for i in range(3)]
    assert got == [1, 3, 4]


def test_cuts_take_the_cytoplasm_colour_around_them_and_the_rest_of_the_layer_stays():
    cyto = torch.zeros(1, 3, S, S)
    cyto[:, 0] = 0.9  # pink far from the nucleus...
    nuc = torch.zeros(1, 1, S, S)
    nuc[..., 18:30, 18:30] = 1
    cyto[:, 2, 15:33, 15:33] = 0.8  # ...a violet halo the decoder painted around it
    cell = torch.zeros(1, 1, S, S)
    cell[..., 4:44, 4:44] = 1
    cut = torch.zeros(1, 1, S, S)
    cut[..., 18:30, 23:25] = 1  # a vertical cut through the nucleus
    out = fill_cuts(cyto, cut, nuc * (1 - cut), cell, radius=2)
    grown = torch.nn.functional.max_pool2d(cut, 3, 1, 1).bool()[0, 0]
    # the cut takes the pink cytoplasm around it (beyond twice the 2 px halo margin),
    # none of the halo (a halo colour in the cut would join the lobes again)
    # (deep inside a large nucleus a wider neighbourhood; the cell-wide mean, whose blue
    # is the 1 px of halo beyond the 2 px margin, 0.04, only where nothing is in reach)
    got = out[0][:, grown]
    assert torch.allclose(got[:2], torch.tensor([0.9, 0.0])[:, None].expand_as(got[:2]))
    assert float(got[2].max()) < 0.05 and float((got[2] == 0).float().mean()) > 0.5
    # sigma=0: the cell-wide mean of the cytoplasm beyond the 2 px margin (the drawing
    # before 2026-12-05)
    far = (cell.bool() & ~torch.nn.functional.max_pool2d(nuc * (1 - cut), 5, 1, 2).bool())[0, 0]
    colour = cyto[0][:, far].mean(1)
    flat = fill_cuts(cyto, cut, nuc * (1 - cut), cell, radius=2, sigma=0)
    assert torch.allclose(flat[0][:, grown], colour[:, None].expand(-1, int(grown.sum())))
    assert float(out[0, 2][grown].max()) < 0.1  # no halo in the cut
    assert torch.equal(out[0][:, ~grown], cyto[0][:, ~grown])  # the rest as decoded
    # no cut, or a nucleus that fills the cell: the layer unchanged
    assert torch.equal(fill_cuts(cyto, torch.zeros_like(cut), nuc, cell), cyto)
    assert torch.equal(fill_cuts(cyto, cut, torch.ones(1, 1, S, S), cell), cyto)


def test_targets_are_the_counters_counts():
    ring = (_ring()[0, 0] > 0).numpy()
    carved = (carve_lobes(_ring(), torch.tensor([3]), 8.0)[0][0, 0] > 0).numpy()
    nuc = torch.from_numpy(np.stack([ring, carved, carved])[:, None].astype(np.uint8))
    t = lobe_targets(nuc, torch.tensor([True, True, False]), block=2)
    assert t.tolist() == [count_lobes(ring), 3, 0]


def test_targets_with_the_second_rule_recount_from_the_crops():
    """``deep_valley_ratio`` segments the nuclei again from the crops with the counter's
    second cut rule (lobes touching through a wide bridge count as two); the nucleus
    masks given are then not read, rows without an image stay 0, and the rule without
    the crops is refused."""
    from tests.vae.analysis.test_granules import _touching_lobes
    from vae.data import nucleus_masks

    img, cell = _touching_lobes(valley=0.5, half_gap=6.0)
    crop = torch.from_numpy(np.round(img * 255).astype(np.uint8)).permute(2, 0, 1)
    crops = torch.stack([crop, crop, crop])
    masks = torch.from_numpy(np.stack([cell] * 3)[:, None].astype(np.uint8))
    has = torch.tensor([True, True, False])
    nuc = nucleus_masks(crops, masks, has)
    assert lobe_targets(nuc, has).tolist() == [1, 1, 0]
    deep = lobe_targets(None, has, block=2, crops=crops, masks=masks, deep_valley_ratio=0.3)
    assert deep.tolist() == [2, 2, 0]
    with pytest.raises(ValueError, match="needs the crops"):
        lobe_targets(nuc, has, deep_valley_ratio=0.3)


def test_nll_scores_known_counts_only_and_caps_at_the_last_class():
    logits = torch.zeros(3, LOBE_CLASSES)
    logits[1, LOBE_CLASSES - 1] = 5.0
    nll = lobe_nll(logits, torch.tensor([0, 7, 2]))
    assert float(nll[0]) == 0.0  # no target
    assert float(nll[1]) < 0.1  # 7 lobes scored as the top class
    assert float(nll[2]) == pytest.approx(np.log(LOBE_CLASSES), rel=1e-5)


def test_drawn_count_is_the_rounded_expectation():
    logits = torch.full((2, LOBE_CLASSES), -20.0)
    logits[0, 1] = logits[0, 3] = 0.0  # half 2 lobes, half 4: draw 3
    logits[1, 0] = 0.0
    assert lobe_count(logits).tolist() == [3, 1]


def _model(**kw) -> TwoBranchVAE:
    torch.manual_seed(0)
    base = dict(
        n_genes=2,
        crop_size=16,
        channels=[8, 8],
        image_arch="residual",
        n_private=2,
        expression_likelihood="gaussian",
        nucleus_head=True,
        lobe_head=True,
    )
    base.update(kw)
    return TwoBranchVAE(VAEArgs(**base))


def test_the_head_trains_without_moving_the_latent():
    from vae.losses import LossWeights, vae_loss

    model = _model()
    g = torch.Generator().manual_seed(1)
    crops = (torch.rand(4, 3, 16, 16, generator=g) * 255).byte()
    masks = torch.ones(4, 1, 16, 16, dtype=torch.uint8)
    nuc = (torch.rand(4, 1, 16, 16, generator=g) > 0.5).byte()
    d = image_tensors(crops, masks, nucleus=nuc, lobes=torch.tensor([1, 2, 3, 0]))
    b = to_batch(raw_batch(d, torch.arange(4)), torch.device("cpu"))
    assert b.lobes.tolist() == [1, 2, 3, 0]
    out = model(b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library)
    w = LossWeights(image=0.0, mask=0.0, granules=0.0, nucleus=1.0)
    kw = dict(beta=0.0, weights=w, nucleus=b.nucleus)
    t = vae_loss(out, b.image, b.mask, b.x, None, b.library, **kw, lobes=b.lobes)
    with_lobes = float(t.nucleus.detach())
    t0 = vae_loss(out, b.image, b.mask, b.x, None, b.library, **kw)
    assert with_lobes > float(t0.nucleus.detach())  # the count is scored in the term
    model.zero_grad()
    (t.nucleus - t0.nucleus).backward()  # the lobe cross-entropy alone
    head = [p.grad for p in model.lobe_head.parameters()]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in head)
    others = [
        p.grad
        for n, p in model.named_parameters()
        if not n.startswith("lobe_head") and p.grad is not None
    ]
    assert all(float(gr.abs().sum()) == 0.0 for gr in others)


def test_render_draws_the_heads_count_and_the_plain_decode_is_unchanged():
    model = _model(crop_size=32, channels=[8, 8]).eval()
    z = torch.randn(2, model.n_latent, generator=torch.Generator().manual_seed(0))
    last = model.lobe_head.net[-1]

    def say(k: int) -> None:  # the head gives k lobes for every code
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(-20.0)
            last.bias[k - 1] = 0.0

    with torch.no_grad():
        plain = model.decode(z)
        say(1)
        one = model.decode(z, render=True)
        say(3)
        three = model.decode(z, render=True)
    assert plain.lobe_logits is not None and plain.lobe_logits.shape == (2, LOBE_CLASSES)
    # the layer's own mask is never cut: only the drawing is
    assert torch.equal(plain.nucleus_logits, three.nucleus_logits)
    assert not torch.allclose(three.image, one.image)
    assert torch.equal(lobe_count(three.lobe_logits), torch.tensor([3, 3]))


def test_without_lobe_layer_draws_the_uncut_nucleus_and_puts_the_head_back():
    model = _model(crop_size=32, channels=[8, 8]).eval()
    z = torch.randn(2, model.n_latent, generator=torch.Generator().manual_seed(0))
    head = model.lobe_head
    with torch.no_grad():
        last = head.net[-1]
        last.weight.zero_()
        last.bias.fill_(-20.0)
        last.bias[2] = 0.0  # 3 lobes for every code
        cut = model.decode(z, render=True)
        with without_lobe_layer(model):
            plain = model.decode(z, render=True)
        assert model.lobe_head is head
        with pytest.raises(RuntimeError), without_lobe_layer(model):
            raise RuntimeError("inside")
        assert model.lobe_head is head
    assert plain.lobe_logits is None
    assert not torch.allclose(plain.image, cut.image)


def test_lobe_head_needs_the_nucleus_layer():
    with pytest.raises(ValueError, match="lobe_head needs nucleus_head"):
        _model(nucleus_head=False)


def test_nucleus_holes_are_what_a_ring_encloses():
    """A ring's hole is cytoplasm to draw (a traversal's ring nucleus drew a white dot
    there); a C-shaped nucleus encloses nothing; outside the cell nothing is a hole."""
    from vae.lobes import nucleus_holes

    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    r = torch.sqrt((yy - 24.0) ** 2 + (xx - 24.0) ** 2)
    ring = ((r >= 6) & (r <= 11)).float()[None, None]
    cell = (r <= 18).float()[None, None]
    h = nucleus_holes(ring, cell)
    assert torch.equal(h[0, 0].bool(), (r < 6))
    c_shape = ring.clone()
    c_shape[..., 22:27, 30:40] = 0  # a gap: the inside reaches the outside
    assert nucleus_holes(c_shape, cell).sum() == 0
    assert nucleus_holes(ring, torch.zeros_like(cell)).sum() == 0
    assert nucleus_holes(ring[:0], cell[:0]).shape == (0, 1, S, S)
    # filled with the cytoplasm outside the ring, not with the hole's own (untrained)
    # colour, which lies beyond the margin too (review: a 12 px hole stayed white)
    cyto = torch.zeros(1, 3, S, S)
    cyto[:, 0], cyto[:, 1], cyto[:, 2] = 0.9, 0.5, 0.6
    cyto[..., r < 6] = 1.0
    out = fill_cuts(cyto, h, ring, cell)
    pink = torch.tensor([0.9, 0.5, 0.6])[:, None]
    assert torch.allclose(out[0][:, (r < 6)], pink.expand(-1, int((r < 6).sum())), atol=1e-4)
    grown = torch.nn.functional.max_pool2d(h, 3, 1, 1).bool().expand(1, 3, S, S)
    assert torch.equal(out[~grown], cyto[~grown])  # the rest as decoded


def test_a_cut_deep_in_a_large_nucleus_takes_the_nearest_cytoplasm_not_the_rim():
    """Beyond the 3 px neighbourhood, the 9 px one: the cell-wide mean takes in a pale rim
    (the real GP path's GMP end drew a pale line), the wider neighbourhood does not."""
    cyto = torch.zeros(1, 3, S, S)
    cyto[:, 0] = 0.8  # cytoplasm
    cell = torch.zeros(1, 1, S, S)
    cell[..., 2:46, 2:46] = 1
    cyto[:, 2] = 0.0
    rim = cell.clone()
    rim[..., 5:43, 5:43] = 0
    cyto[:, 2][rim[:, 0].bool()] = 1.0  # a pale (blue-white) rim 3 px wide
    nuc = torch.zeros(1, 1, S, S)
    nuc[..., 16:32, 16:32] = 1  # a 16 px nucleus; the rim lies 11+ px beyond it
    cut = torch.zeros(1, 1, S, S)
    cut[..., 23:25, 23:25] = 1  # at its centre: 8+ px from any cytoplasm
    out = fill_cuts(cyto, cut, nuc * (1 - cut), cell)
    grown = torch.nn.functional.max_pool2d(cut, 3, 1, 1).bool()[0, 0]
    flat = fill_cuts(cyto, cut, nuc * (1 - cut), cell, sigma=0)
    assert float(flat[0, 2][grown].mean()) > 0.2  # the cell-wide mean: the rim's blue in it
    assert float(out[0, 2][grown].max()) < 0.5 * float(flat[0, 2][grown].mean())


def test_cell_holes_are_the_ones_the_figures_fill():
    """The drawing fills the holes of a decoded cell mask by the rule the figures use
    (vae.analysis.traverse.cell_masks: edge-adjacent steps), so a hole whose only way out
    is a diagonal gap is drawn as cytoplasm, not in the decoder's background colour."""
    from vae.analysis.traverse import cell_masks
    from vae.lobes import nucleus_holes

    m = np.zeros((12, 12), np.float32)
    m[2:10, 2:10] = 1
    m[5, 5] = 0  # a one-pixel hole...
    m[4, 4] = m[3, 3] = m[2, 2] = 0  # ...open to the outside by a diagonal only
    t = torch.from_numpy(m)[None, None]
    holes = nucleus_holes(t, diagonal_gaps=False)[0, 0].bool().numpy()
    assert np.array_equal(cell_masks(m), (m > 0.5) | holes)
    assert holes[5, 5] and not nucleus_holes(t)[0, 0, 5, 5]  # the nucleus rule: open
    rng = np.random.default_rng(0)
    for _ in range(50):
        r = (rng.random((16, 16)) > 0.35).astype(np.float32)
        h = nucleus_holes(torch.from_numpy(r)[None, None], diagonal_gaps=False)[0, 0].numpy()
        assert np.array_equal(cell_masks(r), (r > 0.5) | (h > 0))
