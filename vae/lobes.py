"""Lobe layer: how many lobes the decoded nucleus has, and drawing them.

A segmented neutrophil's 2-5 lobes lie at angles that differ from cell to cell. A
pixel (or nucleus-mask) likelihood averages those angles, so the decoder's nucleus is
a ring or two blobs whatever the cell's true count (measured: segmented neutrophils
with 3.6 lobes on average are drawn with 1.3-1.9, docs/vae.md, "Lobe layer"), much as
granules at random positions average into a tint. The count itself is a property of
the cell that the code does carry (it follows maturation). So, as the granule layer
does for granules, the decoder also says *how many* lobes (:class:`LobeHead`, a
categorical over 1..``LOBE_CLASSES`` read from the code, trained on the lobe counter's
count of each input crop's nucleus without shaping the latent: its input is detached),
and a drawn cell (``TwoBranchVAE.decode(render=True)``) cuts the nucleus layer's mask
into that many lobes (:func:`carve_lobes`) with cytoplasm in the cuts
(:func:`fill_cuts`). The loss never sees the drawing.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LOBE_CLASSES = 5  # counts 1..5; a count above 5 is scored as 5
LOBE_CUT_HALF_WIDTH = 1.0  # px: half the width of a cut between two drawn lobes
LOBE_ANGLE_BINS = 36  # angular profile of the nucleus, for where the first cut goes
NUCLEUS_MARGIN_PX = 2  # px: cuts reach this far beyond the nucleus mask (its soft edge), no further
# next to a cut, each lobe is opened with a disc of this fraction of the lobe's own
# inscribed radius (its widest half-width), at least ``LOBE_ROUND_PX``: a lobe cut from a
# decoded disc or ring ends round, with a notch between lobes that widens towards the
# nucleus's edge, instead of a pie slice with a 2 px slit beside it (drawn on real cells,
# the slit read as a white crack; docs/vae.md, "Lobe layer"). Below 1, the opening keeps
# every lobe's widest disc, so no lobe is lost to it.
LOBE_ROUND_FRACTION = 0.7
LOBE_ROUND_PX = 2  # px: the smallest rounding radius


class LobeHead(nn.Module):
    """Code -> logits of the nucleus lobe count (1..``LOBE_CLASSES``).

    Reads the image part of the code detached: it learns what the code already says
    about the lobes, and its loss sends no gradient into the latent (its gradient only
    enters the trainer's global gradient-norm clip, so other targets perturb a run as a
    different seed would: docs/vae.md, "Lobe targets on real crops").
    """

    def __init__(self, n_in: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, LOBE_CLASSES)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, n_in) -> (B, LOBE_CLASSES) logits; class k means k + 1 lobes."""
        return self.net(z.detach())


def lobe_targets(
    nucleus,
    has_image: torch.Tensor,
    block: int = 512,
    *,
    crops=None,
    masks=None,
    deep_valley_ratio: float | None = None,
) -> torch.Tensor:
    """The lobe counter's count of every crop's nucleus mask, (N,) int64; 0 = none.

    Parameters
    ----------
    nucleus : (N, 1, S, S) {0, 1} nucleus masks (:func:`vae.data.nucleus_masks`), a
        tensor or a row store read by blocks
    has_image : (N,) bool; rows without an image get 0 (not scored)
    crops, masks, deep_valley_ratio : with ``deep_valley_ratio`` set, the nuclei are
        segmented again from ``crops`` (N, 3, S, S) uint8 and ``masks`` (N, 1, S, S)
        with the counter's second cut rule on (``GranuleParams.lobe_deep_valley_ratio``:
        pale touching lobes of real smears), and ``nucleus`` is not read. Only the
        counts change: the nucleus layer keeps training on ``nucleus``.
    """
    from vae.analysis.granules import GranuleParams, count_lobes
    from vae.data import nucleus_masks

    if deep_valley_ratio is not None and (crops is None or masks is None):
        raise ValueError("lobe_targets: deep_valley_ratio needs the crops and their masks")
    params = GranuleParams(lobe_deep_valley_ratio=deep_valley_ratio)
    n = int(has_image.shape[0])
    out = np.zeros(n, dtype=np.int64)
    rows = np.flatnonzero(has_image.numpy())
    for i in range(0, rows.size, block):
        sel = torch.as_tensor(rows[i : i + block])
        # index_select: what a tensor and a row store on disk (vae.store) both read by
        if deep_valley_ratio is None:
            block_nuc = nucleus.index_select(0, sel)
        else:  # the nucleus layer's own segmentation, with the second rule on
            on = torch.ones(sel.numel(), dtype=torch.bool)
            block_nuc = nucleus_masks(
                crops.index_select(0, sel), masks.index_select(0, sel), on, params
            )
        nuc = np.asarray(block_nuc)[:, 0].astype(bool)
        out[sel.numpy()] = [count_lobes(m) for m in nuc]
    return torch.from_numpy(out)


def nucleus_segmentation(
    crops: np.ndarray,
    masks: np.ndarray,
    deep_valley_ratio: float | None = None,
    block: int = 512,
) -> np.ndarray:
    """How far each crop's nucleus has segmented: lobes + (1 - solidity), (N,) float64.

    The image side's maturation order within a granulocyte class: a round myelocyte
    nucleus scores ~1 (one lobe, solidity ~0.9-1), a kidney or band nucleus 1.1-1.4
    (one lobe, bent: its convex hull holds cytoplasm), a segmented neutrophil 2-5 and
    more (the lobe counter's count, :func:`vae.analysis.granules.count_lobes`, on the
    nucleus of :func:`vae.data.nucleus_masks`). The solidity term only breaks ties within
    a count. ``stage=pair``'s ``pair.within_label=maturation`` ranks crops by it.

    Parameters
    ----------
    crops : (N, S, S, 3) uint8 RGB crops (background outside the cell)
    masks : (N, S, S) bool cell masks
    deep_valley_ratio : the counter's second cut rule for pale touching lobes
        (``GranuleParams.lobe_deep_valley_ratio``; the study's ``vae.lobe_deep_valley``)
    block : crops segmented at a time (bounds memory on large crop sets)

    Returns
    -------
    (N,) float64; NaN where no nucleus was found
    """
    from skimage.morphology import convex_hull_image

    from vae.analysis.granules import GranuleParams, count_lobes
    from vae.data import nucleus_masks

    params = GranuleParams(lobe_deep_valley_ratio=deep_valley_ratio)
    n = len(crops)
    out = np.full(n, np.nan)
    for i in range(0, n, block):
        c = torch.from_numpy(np.ascontiguousarray(crops[i : i + block])).permute(0, 3, 1, 2)
        m = torch.from_numpy(np.asarray(masks[i : i + block], dtype=bool))[:, None]
        on = torch.ones(len(c), dtype=torch.bool)
        nuc = nucleus_masks(c, m, on, params).numpy()[:, 0].astype(bool)
        for j, nm in enumerate(nuc):
            if nm.sum() < 4:  # no nucleus found (a pale or empty crop)
                continue
            solidity = nm.sum() / max(int(convex_hull_image(nm).sum()), 1)
            out[i + j] = count_lobes(nm) + (1.0 - min(solidity, 1.0))
    return out


def lobe_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of the lobe count (B,), nats; 0 where the target is 0."""
    scored = targets > 0
    cls = (targets.clamp(1, LOBE_CLASSES) - 1).long()
    ce = F.cross_entropy(logits.float(), cls, reduction="none")
    return torch.where(scored, ce, torch.zeros_like(ce))


def expected_lobes(logits: torch.Tensor) -> torch.Tensor:
    """(B, LOBE_CLASSES) logits -> (B,) float32 expected lobe count under the head."""
    k = torch.arange(1, LOBE_CLASSES + 1, dtype=torch.float32, device=logits.device)
    return torch.softmax(logits.float(), dim=1) @ k


def lobe_count(logits: torch.Tensor) -> torch.Tensor:
    """(B, LOBE_CLASSES) logits -> (B,) int64 count to draw: the expected count, rounded.

    The expectation rather than the most probable class: most training nuclei have one
    lobe, so a cell the head splits between 2 and 4 lobes is drawn with 3, not 1.
    """
    return expected_lobes(logits).round().long()


@contextlib.contextmanager
def without_lobe_layer(model):
    """Within the block ``model`` draws its cells without the lobe layer.

    The head reads the code detached, so the same model with its head switched off is
    the paired baseline of what the layer changes in drawn cells (the measurement
    scripts' "without" columns). The head is put back on exit, also after an error.
    """
    head, model.lobe_head = model.lobe_head, None
    try:
        yield model
    finally:
        model.lobe_head = head


def carve_lobes(
    logits: torch.Tensor,
    count: torch.Tensor,
    sharpness: float = 1.0,
    half_width: float = LOBE_CUT_HALF_WIDTH,
    round_px: int | None = None,
    round_fraction: float = LOBE_ROUND_FRACTION,
) -> torch.Tensor:
    """Cut each nucleus mask into ``count`` lobes by radial cuts from its centre.

    The cuts are ``count`` half-lines from the nucleus's centroid, evenly spaced in
    angle, the first through the angle where the mask holds least (where the decoder
    already put a gap, so a two-blob nucleus cut in two is cut between its blobs). A
    count of 1 leaves the row unchanged.

    Parameters
    ----------
    logits : (B, 1, S, S) nucleus-mask logits
    count : (B,) int lobes to draw
    sharpness : gain on the logits that the drawing uses (for the centroid weights)
    half_width : px, half the width of each cut
    round_px : px, the smallest rounding radius (0: straight cuts only; None:
        ``LOBE_ROUND_PX``). Each lobe (a connected piece of the nucleus between the cuts)
        is opened with a disc of radius ``max(round_px, round(round_fraction * w))``, ``w``
        its widest half-width (at most ``ceil(w) - 1``: the disc fits in the lobe);
        what the opening removes within ``radius + 2`` px of a cut is cut too: the
        corners each straight cut leaves are rounded off, the decoded outline elsewhere
        stays
    round_fraction : the rounding radius as a fraction of each lobe's widest half-width

    Returns
    -------
    logits : (B, 1, S, S), lowered by 30 inside the cuts
    cut : (B, 1, S, S) {0, 1}, the cut pixels: on the half-lines and within
        ``NUCLEUS_MARGIN_PX`` of the nucleus mask (sigmoid(sharpness * logits) > 0.5)
    """
    b, _, s, _ = logits.shape
    dt = logits.dtype
    p = torch.sigmoid(sharpness * logits.detach())[:, 0]  # (B, S, S)
    c = torch.arange(s, dtype=dt, device=logits.device) + 0.5
    ys, xs = c.view(1, -1, 1), c.view(1, 1, -1)
    tot = p.sum((1, 2)).clamp_min(1e-6)
    cx = ((p * xs).sum((1, 2)) / tot).view(-1, 1, 1)
    cy = ((p * ys).sum((1, 2)) / tot).view(-1, 1, 1)
    dx, dy = xs - cx, ys - cy
    r = torch.sqrt(dx**2 + dy**2)
    phi = torch.atan2(dy, dx)  # (B, S, S)
    # angular mass profile, lightly smoothed around the circle; first cut at its minimum
    bins = ((phi + math.pi) / (2 * math.pi) * LOBE_ANGLE_BINS).long().clamp(0, LOBE_ANGLE_BINS - 1)
    prof = torch.zeros(b, LOBE_ANGLE_BINS, dtype=dt, device=logits.device)
    prof.scatter_add_(1, bins.flatten(1), p.flatten(1))
    prof = (prof + prof.roll(1, 1) + prof.roll(-1, 1)) / 3
    phi0 = (prof.argmin(1).to(dt) + 0.5) / LOBE_ANGLE_BINS * 2 * math.pi - math.pi  # (B,)
    k = count.to(logits.device).clamp_min(1)
    cut = torch.zeros_like(p)
    for j in range(int(k.max())):
        ang = phi0 + 2 * math.pi * j / k.to(dt)  # (B,)
        rel = phi - ang.view(-1, 1, 1)
        # distance to the half-line from the centroid at angle ang: perpendicular in
        # front of the centroid, the distance to the centroid behind it
        dist = torch.where(torch.cos(rel) > 0, (r * torch.sin(rel)).abs(), r)
        on = (dist < half_width) & (j < k).view(-1, 1, 1) & (k > 1).view(-1, 1, 1)
        cut = torch.maximum(cut, on.to(dt))
    # only the nucleus is cut: a cut running on through the cytoplasm would be drawn
    # there as a pale line across the cell (the cytoplasm is not part of the lobes)
    inside = F.max_pool2d(
        (p > 0.5).to(dt)[:, None], 2 * NUCLEUS_MARGIN_PX + 1, 1, NUCLEUS_MARGIN_PX
    )
    cut = cut[:, None] * inside
    round_px = LOBE_ROUND_PX if round_px is None else int(round_px)
    if round_px > 0 and bool(cut.any()):
        nuc = (p > 0.5).to(dt)[:, None] * (1 - cut)
        cut = torch.maximum(cut, _round_lobes(nuc, cut, round_px, round_fraction))
    return logits - 30.0 * cut, cut


def _round_lobes(
    nucleus: torch.Tensor, cut: torch.Tensor, min_px: int, fraction: float
) -> torch.Tensor:
    """Pixels of each lobe that an opening sized to the lobe removes next to a cut.

    ``nucleus``, ``cut``: (B, 1, S, S) {0, 1}, the nucleus less its cuts and the cuts.
    A lobe is a connected piece of ``nucleus`` (4-connected, as the cut leaves it). Its
    disc radius is ``max(min_px, round(fraction * w))``, ``w`` the piece's widest
    half-width (distance transform), but at most ``ceil(w) - 1`` (at least 1), so the
    disc fits in the piece and no lobe is lost; only what the opening removes within
    ``radius + 2`` px of the row's cut counts. Per row in scipy, each piece in a window
    around it.
    Returns (B, 1, S, S) {0, 1}.
    """
    from scipy import ndimage as ndi

    nuc = nucleus[:, 0].detach().cpu().numpy() > 0.5
    cuts = cut[:, 0].detach().cpu().numpy() > 0.5
    s = nuc.shape[-1]
    out = np.zeros_like(nuc)
    for i in np.flatnonzero(cuts.reshape(len(cuts), -1).any(1)):
        lab, n = ndi.label(nuc[i])
        # outside the square counts as nucleus: a lobe touching the
        # edge is not rounded off there
        dt = ndi.distance_transform_edt(np.pad(nuc[i], 1, constant_values=True))[1:-1, 1:-1]
        to_cut = ndi.distance_transform_edt(~cuts[i])
        widths = ndi.maximum(dt, lab, range(1, n + 1))
        # never wider than the lobe: a thin arc of a ring keeps its ends
        radii = [
            min(max(int(min_px), int(round(fraction * float(w)))), max(1, math.ceil(w) - 1))
            for w in widths
        ]
        # each piece opened in a window around it, 2 r + 1 px wider than its box (all the
        # opening reads), cut from the square padded as outside = nucleus
        pad = 2 * max(radii, default=1) + 1
        lab_p = np.pad(lab, pad, constant_values=-1)
        for j, box in enumerate(ndi.find_objects(lab), start=1):
            if box is None:
                continue
            r = radii[j - 1]
            m = 2 * r + 1
            win = tuple(slice(b.start + pad - m, b.stop + pad + m) for b in box)
            sub = lab_p[win]
            piece = sub == j
            opened = ndi.binary_opening(piece | (sub == -1), _disc(r)) & piece
            if not opened.any():  # a piece the disc cannot hold is left whole
                continue
            y0, x0 = box[0].start - m, box[1].start - m
            ys = slice(max(y0, 0), min(box[0].stop + m, s))
            xs = slice(max(x0, 0), min(box[1].stop + m, s))
            inner = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
            out[i][ys, xs] |= (piece & ~opened)[inner] & (to_cut[ys, xs] <= r + 2)
    return torch.from_numpy(out[:, None]).to(nucleus.device, nucleus.dtype)


def _disc(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) bool disc of ``radius`` px."""
    c = np.arange(-radius, radius + 1)
    return (c[:, None] ** 2 + c[None, :] ** 2) <= radius * radius + 0.5


FILL_SIGMA_PX = 3.0  # px: the cut takes the cytoplasm colour around it, Gaussian-weighted


def fill_cuts(
    cytoplasm: torch.Tensor,
    cut: torch.Tensor,
    nucleus_prob: torch.Tensor,
    cell_prob: torch.Tensor | None = None,
    radius: int = 2,
    sigma: float = FILL_SIGMA_PX,
) -> torch.Tensor:
    """The cytoplasm layer with the cuts (and 1 px around them) in the cytoplasm's colour there.

    Where the nucleus mask is uncertain, the cytoplasm layer learns a blurred nucleus
    colour (its pixels are scored as nucleus in some crops): drawn in a cut between two
    lobes, that halo would join them again. A cut pixel takes the mean of the layer over
    the cell pixels more than ``2 radius`` px from the nucleus (and not to be filled),
    weighted by a Gaussian of ``sigma`` px around it (a normalised convolution: the
    cytoplasm just beyond the halo where the cut meets it); where none lies within ~3
    sigma (deep in a large nucleus, a wide ring's hole), a Gaussian of ``3 sigma``; the
    mean over the cell beyond ``radius`` px where none lies within ~9 sigma either. The
    cell-wide mean alone (before 2026-12-05) drew cuts on real cells as pale grey cracks:
    real cytoplasm is pinker beside the nucleus than at the cell's rim. The rest of the
    layer is drawn as it is (its shading is part of the reconstruction).

    Parameters
    ----------
    cytoplasm : (B, C, S, S) colour layer (C = 3), or it and more layers drawn as the
        cytoplasm is, stacked on channels (the texture's grain, the granule rate): every
        channel filled by the same rule
    cut : (B, 1, S, S) {0, 1} the pixels to fill: the cuts (:func:`carve_lobes`) and the
        holes of a ring-shaped nucleus (:func:`nucleus_holes`)
    nucleus_prob : (B, 1, S, S) the drawn nucleus mask, in [0, 1]
    cell_prob : (B, 1, S, S) the decoded cell mask, in [0, 1], or None (the whole
        square is cell): the cytoplasm colour is taken inside the cell only
    radius : px around the nucleus left out of the colour (its halo)
    sigma : px, width of the neighbourhood the colour is taken from; 0: the cell-wide mean

    Returns
    -------
    (B, C, S, S); a row without cuts, or whose nucleus fills the cell, is unchanged.
    """
    rows = cut.flatten(1).amax(1) > 0
    if not bool(rows.any()):  # nothing to fill (most cells: one lobe, no ring)
        return cytoplasm
    if not bool(rows.all()):  # the blurs below only on the rows with something to fill
        out = cytoplasm.clone()
        sub = None if cell_prob is None else cell_prob[rows]
        out[rows] = fill_cuts(cytoplasm[rows], cut[rows], nucleus_prob[rows], sub, radius, sigma)
        return out
    nuc = (nucleus_prob > 0.5).to(cytoplasm.dtype)
    near = F.max_pool2d(nuc, 2 * radius + 1, stride=1, padding=radius)
    grown = F.max_pool2d(cut.to(cytoplasm.dtype), 3, stride=1, padding=1)
    # the pixels to fill are never a source of their colour (a ring's hole lies beyond
    # the margin too, and its untrained colour would fill itself)
    far = (1 - near) * (1 - grown)
    if cell_prob is not None:
        far = far * (cell_prob > 0.5).to(cytoplasm.dtype)
    n_far = far.sum((2, 3), keepdim=True)
    colour = (cytoplasm * far).sum((2, 3), keepdim=True) / n_far.clamp_min(1)
    if sigma > 0:
        # the local colour skips twice the halo: a halo colour in the cut joins the lobes
        # again under the granule counter's smoothing
        r2 = 2 * radius
        beyond = 1 - F.max_pool2d(nuc, 2 * r2 + 1, 1, r2)
        beyond = beyond * (far > 0).to(cytoplasm.dtype)
        # deep inside a large nucleus nothing lies within reach of sigma: a wider
        # neighbourhood there (the cell-wide mean takes in the pale rim)
        for sd in (3 * sigma, sigma):
            num, den = _gaussian_blur(cytoplasm * beyond, sd), _gaussian_blur(beyond, sd)
            colour = torch.where(den > 1e-3, num / den.clamp_min(1e-6), colour)
    grown = grown * (n_far > 0)
    return cytoplasm * (1 - grown) + colour * grown


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, S, S) blurred by a separable Gaussian of ``sigma`` px (zero outside)."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)


def nucleus_holes(
    nucleus_prob: torch.Tensor,
    cell_prob: torch.Tensor | None = None,
    diagonal_gaps: bool = True,
) -> torch.Tensor:
    """Pixels the drawn nucleus encloses: (B, 1, S, S) {0, 1}.

    A ring-shaped nucleus (a band, or the pose-averaged nucleus of a traversal) holds
    cytoplasm in its hole: the pixels not reached from the crop's border without crossing
    the nucleus (mask > 0.5; 8-connected steps, so a diagonal gap lets the outside in;
    ``scipy.ndimage.binary_fill_holes`` per row, ~0.1 ms a 64 px crop) and inside the cell
    (``cell_prob`` > 0.5, when given). ``diagonal_gaps=False``: edge-adjacent steps only
    (scipy's default), the rule by which :func:`vae.analysis.traverse.cell_masks` fills a
    decoded cell mask, for the holes of that mask.
    """
    from scipy import ndimage as ndi

    nuc = (nucleus_prob > 0.5)[:, 0].detach().cpu().numpy()
    steps = np.ones((3, 3), bool) if diagonal_gaps else None
    holes = np.zeros_like(nuc)
    for i, m in enumerate(nuc):
        holes[i] = ndi.binary_fill_holes(m, structure=steps) & ~m
    out = torch.from_numpy(holes[:, None]).to(nucleus_prob.device, nucleus_prob.dtype)
    if cell_prob is not None:
        out = out * (cell_prob > 0.5).to(out.dtype)
    return out
