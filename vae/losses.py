"""Named loss terms of the two-branch β-VAE.

:func:`vae_loss` returns a :class:`LossTerms` dataclass; every term is a
per-row average over the batch (rows lacking a modality contribute 0 to its
terms), so the total is a per-cell negative ELBO plus the extra terms.

β and the capacity C are arguments: the trainer owns their schedule
(:mod:`vae.schedules`); the module keeps no step counter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch.nn import functional as F

from vae.lobes import lobe_nll
from vae.model import Decoded, ForwardOutput, Gaussian, Posteriors

ALIGNS = ("none", "clip", "class")


@dataclass
class LossWeights:
    """Weights of the loss terms (plain values, from ``vae.*`` in the config).

    The defaults here are the plain two-branch β-VAE (every extra layer and the alignment
    off), not what ``stage=train`` uses: the pipeline's defaults are owned by
    ``pipeline/conf`` (``VAEConfig``) and reach this class through
    ``pipeline.train_args.build_train_args``; a Python caller who wants the pipeline's
    model builds its weights from a config there, not from ``LossWeights()``.
    """

    image: float = 1.0
    mask: float = 1.0
    ssim: float = 0.0
    expression: float = 1.0
    cross: float = 1.0  # unimodal + cross-modal reconstructions on paired rows
    align: float = 0.0
    align_mode: str = "none"  # none | clip | class
    temperature: float = 0.1
    # squared distance per dim between each class's image-expert and expression-expert
    # mean in the batch (shared dims; labelled rows, classes in both): the class InfoNCE
    # compares directions only, and left the two experts' clouds of one class far apart
    # in the latent (docs/analysis.md, "modality_mixing"); 0: off
    align_centroid: float = 0.0
    late_mask: bool = False  # expression: score observed non-zero entries only
    # masked log-amplitude spectrum L1 (phase-free: rewards granule texture of the
    # right density and size wherever the granules sit; a pixel likelihood blurs it)
    spectral: float = 0.0
    # free bits: nats per latent dim below which the KL costs nothing (batch mean);
    # keeps dims active so the latent is not spent on one modality only
    free_bits: float = 0.0
    # cross-entropy of the label classifier on each expert's shared mean (rows with
    # a known label only); needs a model built with n_classes > 0
    classify: float = 0.0
    unknown_label: int = -1  # label code that means "not known" (never scored)
    # per-class weights of that cross-entropy, one tuple per expert (image, expression),
    # indexed by label code (:func:`class_balance_weights`); (): every row counts once
    classify_class_weights: tuple[tuple[float, ...], ...] = ()
    # noise-robust label loss: generalised cross-entropy (1 - p_y^q) / q (Zhang & Sabuncu
    # 2018), whose gradient is the cross-entropy's times p_y^q, so a row the head finds
    # implausible under its label (a mislabelled crop) pulls the code less; 0: cross-entropy
    classify_noise_q: float = 0.0
    # granule head: Poisson point-process NLL of the granule centres found on the
    # input under the decoded rate map, plus the granules' optical density there;
    # needs a model built with granule_head and centres in the batch
    granules: float = 0.0
    # texture layer: Gaussian NLL of the input's fine stain detail under the decoded
    # texture maps (:func:`texture_nll`); needs a model built with texture_head
    texture: float = 0.0
    # the cross-modal image term (the image drawn from the expression expert alone) scores
    # the texture layer too; False: not there. A crop's grain level is its microscope's
    # (compression, sensor, stain: median cytoplasm detail 0.05 on BCCD crops, 0.09 on
    # segmentation_wbc's), which a profile cannot know, so the likelihood's best grain for
    # a profile is the root-mean-square over the sources of its paired crops, drawn
    # stronger than the typical cell (docs/vae.md, "Grain of cells drawn from expression")
    cross_texture: bool = True
    # nucleus layer: Bernoulli NLL (BCE) of the decoded nucleus mask against the
    # input's nucleus (the lobe counter's), summed over the cell's pixels; needs a
    # model built with nucleus_head and nucleus masks in the batch
    nucleus: float = 0.0
    # extra weight of the nucleus term on the gaps between lobes (:func:`nucleus_gaps`):
    # those pixels count 1 + nucleus_gap; 0: every pixel counts once
    nucleus_gap: float = 0.0
    # the colour layers' image likelihood composes them through the *input's* nucleus
    # mask (the nucleus term then owns the decoded mask alone): the cytoplasm layer is
    # scored on the input's cytoplasm only and cannot paint a blurred nucleus where the
    # decoded mask misses one; False: through the decoded mask (detached), as drawn
    nucleus_input_compose: bool = False
    # maturation axis: ordinal NLL of the stage rank from shared dim 0 of each expert's
    # mean (rows whose label is a stage); needs a model built with maturation_ranks
    maturation: float = 0.0
    # two views of each crop: NT-Xent (SimCLR) between the image encoder's means of the
    # training view and a second, independently augmented view (rows with an image);
    # the trainer makes the second view only when this is > 0
    view_contrast: float = 0.0
    view_temperature: float = 0.2
    # the cell's size: squared error / 2 of the size head's standardised log diameter
    # against the input cell's (rows whose size is known), per decode as the image terms;
    # needs a model built with size_head
    size: float = 0.0

    def __post_init__(self) -> None:
        if self.align_mode not in ALIGNS:
            raise ValueError(f"align={self.align_mode!r}; valid: {', '.join(ALIGNS)}")
        if not 0.0 <= self.classify_noise_q <= 1.0:
            raise ValueError(f"classify_noise_q must be in [0, 1]; got {self.classify_noise_q}")


@dataclass
class LossTerms:
    """Loss terms of one batch (scalars), already weighted into ``total``.

    Attributes
    ----------
    total : objective that is minimised
    image : masked image NLL from the fused posterior
    mask : mask BCE (0 when the decoder predicts no mask)
    ssim : 1 - SSIM inside the mask (0 when its weight is 0)
    spectral : L1 between masked log-amplitude spectra (0 when its weight is 0)
    granules : granule point-process NLL + granule optical-density error (0 when off)
    texture : Gaussian NLL of the input's fine stain detail, nats per scored pixel (0 when off)
    nucleus : BCE of the decoded nucleus mask inside the cell (0 when off)
    classify : label cross-entropy of the image and expression experts' shared means
        (rows with a known label; 0 when off)
    maturation : ordinal NLL of the maturation stage from shared dim 0 of the two
        experts' means (rows labelled with a stage; 0 when off), nats per row
    view : NT-Xent between the image encoder's means of two augmented views of each
        crop (0 when off or without a second view)
    size : squared error / 2 of the decoded standardised log diameter of the cell, from
        the fused posterior (rows with a known size; 0 when off)
    expression : expression NLL from the fused posterior
    kl : KL(q(z|x) || N(0, I)) of the fused posterior, nats per cell
    kl_objective : β · |KL - C| (capacity) or β · KL, as added to ``total``
    image_unimodal, expression_unimodal : self-reconstruction from the
        unimodal posteriors on paired rows
    image_from_expression, expression_from_image : cross-modal reconstruction
        on paired rows
    kl_unimodal : KL of the unimodal posteriors on paired rows
    kl_image, kl_expression : each expert's own KL, nats per cell, reported only (not
        added to ``total`` again): with PoE the two parts of ``kl_unimodal`` (paired rows),
        with MoE each expert's part of ``kl``. One modality's expert collapsing (its KL
        going to 0) shows here and nowhere else
    align : alignment loss (0 when off): InfoNCE on paired rows (clip) or
        class-level InfoNCE (class)
    align_centroid : per-dim squared distance between the experts' class means
        (:func:`class_centroid_gap`; 0 when off)
    kl_per_dim : (d,) KL of the fused posterior per latent dim (not in total)
    neg_elbo : the β=1 objective, reported only (lower is better): the fused decode's
        weighted reconstruction terms (as weighted in ``total``; no ssim / spectral)
        + 1 · ``kl`` of the fused posterior (no free bits / capacity). Compares runs of
        different ``vae.beta`` / capacity at equal term weights (``total`` holds β · KL);
        a true negative ELBO only with unit likelihood weights (not with
        ``vae.image_weight=null`` per-value balance, the nucleus term's lobe-head
        cross-entropy, the granule squared error, or MoE's average of the experts)
    """

    total: torch.Tensor
    image: torch.Tensor
    mask: torch.Tensor
    ssim: torch.Tensor
    spectral: torch.Tensor
    granules: torch.Tensor
    nucleus: torch.Tensor
    classify: torch.Tensor
    expression: torch.Tensor
    kl: torch.Tensor
    kl_objective: torch.Tensor
    image_unimodal: torch.Tensor
    expression_unimodal: torch.Tensor
    image_from_expression: torch.Tensor
    expression_from_image: torch.Tensor
    kl_unimodal: torch.Tensor
    kl_image: torch.Tensor
    kl_expression: torch.Tensor
    align: torch.Tensor
    align_centroid: torch.Tensor
    kl_per_dim: torch.Tensor
    maturation: torch.Tensor
    view: torch.Tensor
    size: torch.Tensor
    texture: torch.Tensor
    neg_elbo: torch.Tensor

    def scalars(self) -> dict[str, float]:
        """Every scalar term as a Python float (for logging)."""
        return dict(zip(self.names(), self.vector().tolist()))

    @classmethod
    def names(cls) -> list[str]:
        """Names of the scalar terms, in the order of :meth:`vector`."""
        return [f.name for f in fields(cls) if f.name != "kl_per_dim"]

    def vector(self) -> torch.Tensor:
        """Every scalar term, detached, in one (T,) tensor on the loss's device.

        The trainer sums these per epoch without a host sync per step.
        """
        return torch.stack([getattr(self, n).detach().float() for n in self.names()])


# --------------------------------------------------------------------------- pieces


def kl_normal(g: Gaussian) -> torch.Tensor:
    """Closed-form KL(N(mu, exp(logvar)) || N(0, 1)) per dimension, (B, d)."""
    mu, logvar = g
    return 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar)


def digamma_positive(y: torch.Tensor) -> torch.Tensor:
    """ψ(y) for y > 0, elementwise, within ~1e-6 relative of ``torch.digamma``.

    ``ψ(y) = ψ(y + 6) - Σ_{k<6} 1 / (y + k)`` and the asymptotic series of ψ at
    ``y + 6 >= 6`` (truncation error < 3e-9). About 2.5x faster than
    ``torch.digamma`` on a CPU, whose loop is not vectorised; the NB likelihood's
    gradient (:func:`nb_log_prob`) is the one place it is used.

    Parameters
    ----------
    y : tensor, every value > 0
    """
    s = torch.reciprocal(y)
    for k in range(1, 6):
        s = s + torch.reciprocal(y + float(k))
    z = y + 6.0
    w = torch.reciprocal(z)
    w2 = w * w
    return torch.log(z) - 0.5 * w - w2 * (1.0 / 12 - w2 * (1.0 / 120 - w2 * (1.0 / 252))) - s


_NB_EPS = 1e-8


def _nb_forward(x, mu, theta, log_factorial=None):
    """The NB log-likelihood's value and the intermediates its gradient reuses.

    ``log_factorial``: ``lgamma(x + 1)`` when the caller has it (a constant of the
    data: computed once per data set instead of once per step).
    """
    eps = _NB_EPS
    theta_mu = theta + mu + eps
    log_theta_mu = torch.log(theta_mu)
    x_theta = x + theta
    lp = (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x_theta)
        - torch.lgamma(theta)
        - (torch.lgamma(x + 1.0) if log_factorial is None else log_factorial)
    )
    return lp, theta_mu, log_theta_mu, x_theta


class _NBLogProb(torch.autograd.Function):
    """:func:`nb_log_prob` with a hand-written backward (same forward ops and values).

    Autograd's backward of the expression above is ~30 elementwise (B, G) ops, the
    reductions of every broadcast use of θ and ``torch.digamma`` (the slowest op of
    an expression step); this one is ~20 with :func:`digamma_positive`::

        ∂/∂μ = x / (μ + ε) - (θ + x) / (θ + μ + ε)
        ∂/∂θ = ψ(x + θ) - ψ(θ) + log(θ + ε) + θ / (θ + ε)
               - log(θ + μ + ε) - (θ + x) / (θ + μ + ε)
    """

    @staticmethod
    def forward(ctx, x, mu, theta, log_factorial):
        lp, theta_mu, log_theta_mu, x_theta = _nb_forward(x, mu, theta, log_factorial)
        ctx.save_for_backward(x, mu, theta, theta_mu, log_theta_mu, x_theta)
        return lp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, mu, theta, theta_mu, log_theta_mu, x_theta = ctx.saved_tensors
        xr = x_theta / theta_mu  # (θ + x) / (θ + μ + ε)
        g_mu = None
        if ctx.needs_input_grad[1]:
            g_mu = (g * (x / (mu + _NB_EPS) - xr)).sum_to_size(mu.shape)
        g_theta = None
        if ctx.needs_input_grad[2]:
            per = g * (digamma_positive(x_theta) - log_theta_mu - xr)
            own = torch.log(theta + _NB_EPS) + theta / (theta + _NB_EPS) - torch.digamma(theta)
            g_theta = per.sum_to_size(theta.shape) + g.sum_to_size(theta.shape) * own
        return None, g_mu, g_theta, None


def nb_log_prob(
    x: torch.Tensor,
    mu: torch.Tensor,
    log_theta: torch.Tensor,
    log_factorial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative binomial log-likelihood (mean/inverse-dispersion form), elementwise.

    Parameters
    ----------
    x : (B, G) counts
    mu : (B, G) mean, > 0
    log_theta : (G,) or (B, G) log inverse dispersion
    log_factorial : (B, G) ``lgamma(x + 1)``, optional (computed here when None)

    Returns
    -------
    (B, G) log P(x | mu, theta).
    """
    # terms of theta alone are computed on (G,) and broadcast (same values, B x
    # fewer lgamma / log calls: lgamma is the costliest op of an expression step)
    theta = log_theta.exp()
    if x.requires_grad or not torch.is_grad_enabled():
        return _nb_forward(x, mu, theta, log_factorial)[0]  # no gradient, or one w.r.t. x
    return _NBLogProb.apply(x, mu, theta, log_factorial)


def zinb_log_prob(
    x: torch.Tensor,
    mu: torch.Tensor,
    log_theta: torch.Tensor,
    pi_logits: torch.Tensor,
    log_factorial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero-inflated NB log-likelihood, elementwise (B, G); ``pi`` = sigmoid(logits)."""
    nb = nb_log_prob(x, mu, log_theta, log_factorial)
    theta = log_theta.exp().expand_as(mu)
    nb_zero = theta * (torch.log(theta + 1e-8) - torch.log(theta + mu + 1e-8))
    log_pi = F.logsigmoid(pi_logits)
    log_not_pi = F.logsigmoid(-pi_logits)
    zero = torch.logaddexp(log_pi, log_not_pi + nb_zero)
    return torch.where(x < 0.5, zero, log_not_pi + nb)


def image_nll(
    target: torch.Tensor, mean: torch.Tensor, mask: torch.Tensor, log_scale: torch.Tensor, kind: str
) -> torch.Tensor:
    """Image negative log-likelihood summed over the pixels inside the mask.

    Parameters
    ----------
    target, mean : (B, 3, S, S) in [0, 1]
    mask : (B, 1, S, S) in {0, 1}; pixels where it is 0 contribute exactly 0
    log_scale : () log σ (gaussian) or log b (laplace); ignored for ``mse``
    kind : ``mse`` | ``gaussian`` | ``laplace``

    Returns
    -------
    (B,) nats (``mse``: half the sum of squared errors).
    """
    diff = (target - mean) * mask  # background is multiplied out before any op
    n = mask.sum(dim=(1, 2, 3)) * target.shape[1]  # scored values per row
    if kind == "mse":
        return 0.5 * diff.pow(2).sum(dim=(1, 2, 3))
    if kind == "gaussian":
        per = 0.5 * diff.pow(2).sum(dim=(1, 2, 3)) * torch.exp(-2 * log_scale)
        return per + n * (log_scale + 0.5 * math.log(2 * math.pi))
    if kind == "laplace":
        per = diff.abs().sum(dim=(1, 2, 3)) * torch.exp(-log_scale)
        return per + n * (log_scale + math.log(2.0))
    raise ValueError(f"image likelihood {kind!r}; valid: mse, gaussian, laplace")


def masked_ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, win: int = 7) -> torch.Tensor:
    """Mean SSIM inside the mask per row (B,), box window of ``win`` px.

    Both images are multiplied by the mask first, so the background does not
    enter the local statistics of pixels far from the outline.
    """
    a, b = a * mask, b * mask
    pad = win // 2
    c1, c2 = 0.01**2, 0.03**2

    def avg(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, win, stride=1, padding=pad, count_include_pad=False)

    mu_a, mu_b = avg(a), avg(b)
    va = avg(a * a) - mu_a**2
    vb = avg(b * b) - mu_b**2
    cov = avg(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    s = s.mean(dim=1, keepdim=True) * mask
    return s.sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1.0)


def per_value_weight(data, term: str = "image") -> float:
    """Weight that puts one row's image term on the scale of its expression term.

    The image NLL sums over every scored value (3 channels x the pixels inside
    the mask), the expression NLL over G genes; left as is, a 64 px crop casts
    ~50x the votes of its expression profile and the latent is spent on pixels
    (or, with a hand-set small weight and a large β, on nothing). Scaling each
    image term by ``G / (values it scores)`` gives both modalities the same
    number of votes per cell, whatever the crop size or mask area.

    Parameters
    ----------
    data : PairedTensors (``masks`` (N, 1, S, S), ``has_image`` (N,), ``n_genes``)
    term : ``image`` (3 x mask pixels per image row) or ``mask`` (S x S per row)

    Returns
    -------
    float, the weight (1.0 when there are no image rows or no genes)
    """
    has = data.has_image.bool()
    if not bool(has.any()) or data.n_genes == 0:
        return 1.0  # nothing to balance against (no image, or no gene: pair=image_only)
    if term == "mask":
        n_values = float(data.masks.shape[-1] * data.masks.shape[-2])
    elif isinstance(data.masks, torch.Tensor):
        n_values = 3.0 * float(data.masks[has].float().sum(dim=(1, 2, 3)).mean())
    else:  # masks on disk (vae.store.RowStore): read by blocks
        from vae.store import mask_pixels_mean

        n_values = 3.0 * mask_pixels_mean(data.masks, has)
    return float(data.n_genes) / max(n_values, 1.0)


def spectral_l1(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 distance of masked log-amplitude spectra per row (B,).

    ``log1p(|FFT2(x * mask)|)`` per channel: the amplitude spectrum says how much
    structure there is at each scale and orientation, not where, so decoded
    granules of the right size and density score well even though their exact
    positions (unpredictable from a low-dimensional latent) differ.

    Parameters
    ----------
    a, b : (B, 3, S, S) in [0, 1]
    mask : (B, 1, S, S) in {0, 1}
    """
    fa = torch.fft.rfft2((a * mask).float(), norm="ortho").abs()
    fb = torch.fft.rfft2((b * mask).float(), norm="ortho").abs()
    return (torch.log1p(fa) - torch.log1p(fb)).abs().mean(dim=(1, 2, 3))


GRANULE_OD_SIGMA = 2.0  # px: local background a granule's optical density is taken against


def masked_blur(t: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian average of ``t`` over the cell's pixels only (normalised convolution).

    t : (B, C, S, S); mask : (B, 1, S, S) in {0, 1} -> (B, C, S, S). Background pixels
    (outside ``mask``) do not count, so the black around a cell is not averaged in.
    """
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, device=t.device, dtype=t.dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))

    def blur(u: torch.Tensor) -> torch.Tensor:
        n = u.shape[1]
        u = F.conv2d(u, k.view(1, 1, 1, -1).expand(n, 1, 1, -1), padding=(0, r), groups=n)
        return F.conv2d(u, k.view(1, 1, -1, 1).expand(n, 1, -1, 1), padding=(r, 0), groups=n)

    return blur(t * mask) / blur(mask).clamp_min(1e-6).expand(-1, t.shape[1], -1, -1)


def granule_contrast(
    image: torch.Tensor, mask: torch.Tensor, sigma: float = GRANULE_OD_SIGMA
) -> torch.Tensor:
    """Optical density of each pixel above its masked neighbourhood (B, 3, S, S).

    ``OD = -ln(I)``; the neighbourhood is a Gaussian (``sigma`` px, default
    ``GRANULE_OD_SIGMA`` at model size) average over cell pixels only (normalised
    convolution), so the black background outside the mask does not count as stain.
    """
    od = -torch.log(image.clamp_min(1.0 / 255.0))
    return (od * mask - masked_blur(od, mask, sigma)).clamp_min(0.0) * mask


# texture layer: the detail is what the optical density holds finer than a Gaussian of
# this width (px at 64 px crops: a granule is 1-3 px, a lobe 8-15 px)
TEXTURE_SIGMA = 1.5
TEXTURE_RIM_PX = 2  # the cell's outermost rim is not scored (the outline, not texture)
# px: the two-band texture layer splits the detail here: its Gaussian average at this
# width is the coarse band (blobs 2-4 px across: coarse granules, chromatin clumps, the
# stain's blotches), the rest the fine band (1 px grain, compression noise)
TEXTURE_COARSE_SIGMA = 1.0


def texture_detail(
    image: torch.Tensor, mask: torch.Tensor, nucleus: torch.Tensor | None = None
) -> torch.Tensor:
    """Fine detail of the stain, (B, 3, S, S): optical density minus its local mean.

    ``OD - masked_blur(OD, TEXTURE_SIGMA)`` inside the cell, 0 outside: granules,
    chromatin clumps and stain grain, signed; what a pixel likelihood of the mean
    image averages away because its positions are random. Given the nucleus
    (B, 1, S, S) in {0, 1}, the local mean of a nucleus pixel is taken over the nucleus
    and that of a cytoplasm pixel over the cytoplasm, so the nucleus outline (an edge
    the mean image draws) does not leak into the detail on either side.
    """
    od = -torch.log(image.clamp_min(1.0 / 255.0)) * mask
    if nucleus is None:
        return (od - masked_blur(od, mask, TEXTURE_SIGMA)) * mask
    nuc = nucleus * mask
    cyto = mask - nuc
    local = masked_blur(od, nuc, TEXTURE_SIGMA) * nuc + masked_blur(od, cyto, TEXTURE_SIGMA) * cyto
    return (od - local) * mask


def erode_square(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion by a ``2 radius + 1`` square as a max-pool, (B, 1, S, S).

    Outside the crop counts as background, so a shape touching the edge is eroded
    from there too.
    """
    k = 2 * radius + 1
    return -F.max_pool2d(-F.pad(mask, (radius,) * 4, value=0.0), k, stride=1)


def texture_region(mask: torch.Tensor, nucleus: torch.Tensor | None = None) -> torch.Tensor:
    """Pixels whose detail is texture, (B, 1, S, S) in {0, 1}.

    The cell minus its outer rim (``TEXTURE_RIM_PX``) and, given the input's nucleus,
    minus the 1 px on either side of the nucleus outline: an outline is an edge the
    decoded mean draws, not texture.
    """
    inner = erode_square(mask, TEXTURE_RIM_PX)
    if nucleus is None:
        return inner
    grown = F.max_pool2d(nucleus, 3, stride=1, padding=1)
    shrunk = -F.max_pool2d(-nucleus, 3, stride=1, padding=1)
    return inner * (1.0 - (grown - shrunk).clamp(0, 1))


def texture_bands(detail: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The detail split into a fine and a coarse band, each (B, 3, S, S).

    Coarse: the detail's Gaussian average (``TEXTURE_COARSE_SIGMA``) over ``region``
    (B, 1, S, S) only; fine: the rest. Granules 2-4 px across (eosinophil and basophil
    granules, a promyelocyte's primary granules) and chromatin clumps keep most of their
    detail in the coarse band, 1 px grain and compression noise in the fine one.
    """
    coarse = masked_blur(detail, region, TEXTURE_COARSE_SIGMA) * region
    return detail - coarse, coarse


def _grain_nll(r: torch.Tensor, a2: torch.Tensor, d2: torch.Tensor, direction: torch.Tensor):
    """Per-pixel NLL (B, 1, S, S) of detail ``r`` under covariance ``a2 c c^T + d2 I``."""
    proj = (r * direction).sum(1, keepdim=True)
    quad = (r.pow(2).sum(1, keepdim=True) - a2 / (a2 + d2) * proj.pow(2)) / d2
    logdet = 2.0 * torch.log(d2) + torch.log(a2 + d2)
    return 0.5 * (quad + logdet + 3.0 * math.log(2 * math.pi))


def texture_nll(
    dec: Decoded,
    detail: torch.Tensor,
    region: torch.Tensor,
    bands: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-row texture-layer loss (B,): Gaussian NLL of the detail, nats per pixel.

    At each pixel the detail ``r`` (3 optical densities) is scored as zero-mean
    Gaussian with covariance ``a^2 c c^T + d^2 I``: grain of amplitude ``a`` along one
    colour ``c`` (a granule or a chromatin clump absorbs some colours more than
    others) plus a small isotropic part ``d``; ``a``, ``c``, ``d`` are the decoded
    texture maps. Averaged over ``region`` (:func:`texture_region`), so the term is a
    few nats per row whatever the cell's size.

    A two-band layer (``dec.texture_amp_coarse`` set) scores the fine and the coarse
    band (``bands``, :func:`texture_bands` of ``detail``; computed here when not given)
    each so, the fine band under ``texture_amp`` / ``_floor`` / ``_dir`` and the coarse
    band under ``texture_amp_coarse`` / ``_floor_coarse`` / ``_dir_coarse`` (a coarse
    grain has a colour of its own: chromatin clumps, eosinophil granules). The sum of the
    two NLLs: the bands' pixels are not independent, which weighs the coarse band more
    than its share of the information; the layer reads the code detached, so only its
    own fit sees that.
    """
    a2 = dec.texture_amp.pow(2)  # (B, 1, S, S)
    # rows a decode skipped hold zeros (weighted 0 by the caller): keep them finite; the
    # layer's own floor is >= exp(-7), so the clamp never moves a decoded value
    d2 = dec.texture_floor.pow(2).clamp_min(1e-8)
    coarse_amp = getattr(dec, "texture_amp_coarse", None)  # any object with the maps
    if coarse_amp is None:
        nll = _grain_nll(detail, a2, d2, dec.texture_dir)
    else:
        fine, coarse = texture_bands(detail, region) if bands is None else bands
        d2c = dec.texture_floor_coarse.pow(2).clamp_min(1e-8)
        nll = _grain_nll(fine, a2, d2, dec.texture_dir) + _grain_nll(
            coarse, coarse_amp.pow(2), d2c, dec.texture_dir_coarse
        )
    n = region.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return (nll * region).sum(dim=(1, 2, 3)) / n


def granule_error(dec: Decoded, centres: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Per-row granule-head loss (B,): point-process NLL (nats) + stain error.

    The input's granule centres are a point pattern; the decoded rate map is
    the intensity of an inhomogeneous Poisson process (``rate / 100`` centres
    per pixel), scored by its negative log-likelihood
    ``sum(lambda) - sum(c log lambda)``: the total says how many granules, the
    map where (granule positions are random, so the decoder can only predict
    their density). The granule's optical density is scored at the observed
    centres against ``contrast``, the input's :func:`granule_contrast`.
    """
    lam = (dec.granule_rate / 100.0).clamp_min(1e-6)
    nll = (lam - centres * torch.log(lam)).sum(dim=(1, 2, 3))
    od_err = (centres * (dec.granule_od - contrast).pow(2)).sum(dim=(1, 2, 3))
    return nll + od_err


NUCLEUS_GAP_RADIUS = 2  # px: gaps up to ~2 x this wide between lobes are emphasised


def nucleus_gaps(nucleus: torch.Tensor, radius: int = NUCLEUS_GAP_RADIUS) -> torch.Tensor:
    """Background pixels a morphological closing of the nucleus would fill, (B, 1, S, S).

    The gaps between the lobes of a segmented nucleus and the notch of a band: the
    few pixels that tell a lobed nucleus from a ring or a C. A closing (dilation then
    erosion by a ``2 radius + 1`` square, as max-pools) fills them; the closing minus
    the nucleus marks them (cf. the border weights of U-Net, Ronneberger et al. 2015,
    which make touching objects separate).

    nucleus : (B, 1, S, S) {0, 1} -> (B, 1, S, S) {0, 1}
    """
    dilated = F.max_pool2d(nucleus, 2 * radius + 1, stride=1, padding=radius)
    # outside the crop is background, so the erosion does not keep the edge
    closed = erode_square(dilated, radius)
    return (closed - nucleus).clamp_min(0)


def nucleus_bce(
    dec: Decoded,
    nucleus: torch.Tensor,
    mask: torch.Tensor,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row nucleus-layer loss (B,): Bernoulli NLL of the nucleus mask, nats.

    Binary cross-entropy of ``dec.nucleus_logits`` against the input's nucleus
    mask, summed over the pixels inside the cell ``mask`` (outside the cell there
    is no nucleus to draw and the decoded cell is cut by its own mask).

    Parameters
    ----------
    dec : Decoded with ``nucleus_logits`` (B, 1, S, S)
    nucleus : (B, 1, S, S) {0, 1} nucleus mask of the input
    mask : (B, 1, S, S) {0, 1} cell mask
    pixel_weight : (B, 1, S, S) weight of each pixel's term (None: 1), e.g.
        ``1 + w * nucleus_gaps(nucleus)``
    """
    bce = F.binary_cross_entropy_with_logits(dec.nucleus_logits, nucleus, reduction="none")
    if pixel_weight is not None:
        bce = bce * pixel_weight
    return (bce * mask).sum(dim=(1, 2, 3))


def expression_nll(
    dec: Decoded,
    x_log: torch.Tensor,
    counts: torch.Tensor | None,
    library: torch.Tensor | None,
    late_mask: bool,
    log_factorial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expression negative log-likelihood summed over genes, (B,).

    NB / ZINB over ``counts`` with mean ``library * scale``, or Gaussian over
    the log-normalised ``x_log`` when the decoder is Gaussian. With
    ``late_mask``, only observed non-zero entries are scored (LATE).
    """
    if dec.expression_log_sd is not None:
        sd_log = dec.expression_log_sd
        lp = (
            -0.5 * ((x_log - dec.expression_log) / sd_log.exp()) ** 2
            - sd_log
            - 0.5 * math.log(2 * math.pi)
        )
        observed = x_log
    else:
        if counts is None or library is None:
            raise ValueError("NB/ZINB expression likelihood needs counts and library sizes")
        mu = dec.expression_scale * library.view(-1, 1)
        if dec.expression_dropout_logits is not None:
            lp = zinb_log_prob(
                counts, mu, dec.expression_log_theta, dec.expression_dropout_logits, log_factorial
            )
        else:
            lp = nb_log_prob(counts, mu, dec.expression_log_theta, log_factorial)
        observed = counts
    if late_mask:
        lp = lp * (observed > 0).to(lp.dtype)
    return -lp.sum(dim=1)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric CLIP-style InfoNCE between matched rows of a and b, (N, d) -> ()."""
    a = F.normalize(a, dim=1)
    b = F.normalize(b, dim=1)
    logits = a @ b.t() / temperature  # (N, N), matches on the diagonal
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def label_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    noise_q: float = 0.0,
) -> torch.Tensor:
    """Label loss of the classifier head: cross-entropy or generalised cross-entropy.

    Parameters
    ----------
    logits : (N, C)
    target : (N,) int64 class codes
    weight : (C,) per-class weights, or None; the result is the weighted mean over rows
        (divided by the summed weights of the rows' classes, as ``F.cross_entropy``)
    noise_q : 0: cross-entropy; in (0, 1]: generalised cross-entropy ``(1 - p_y^q) / q``
        (q -> 0 is cross-entropy, q = 1 the mean absolute error of the probabilities),
        robust to wrong labels: its gradient is the cross-entropy's times ``p_y^q``

    Returns
    -------
    () mean loss per row (nats for the cross-entropy; in [0, 1 / q] for GCE)
    """
    if noise_q <= 0:
        return F.cross_entropy(logits, target, weight=weight)
    log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
    per_row = (1.0 - torch.exp(noise_q * log_p)) / noise_q
    if weight is None:
        return per_row.mean()
    w = weight[target]
    return (per_row * w).sum() / w.sum().clamp_min(1e-12)


def class_align(
    a: torch.Tensor,
    b: torch.Tensor,
    labels: torch.Tensor,
    mask_a: torch.Tensor,
    mask_b: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Class-level (supervised) InfoNCE between image means ``a`` and expression means ``b``.

    For ``by_label`` pairs, where rows are not the same cell but classes are
    shared: every image row's positives are the expression rows of its label
    (and vice versa). Contrastive, so it cannot be met by collapsing the
    latent (unlike a centroid distance). Rows whose label is absent from the
    other modality in the batch are left out. Returns () (0 without positives).
    """
    ia = mask_a.nonzero().flatten()
    ib = mask_b.nonzero().flatten()
    if ia.numel() == 0 or ib.numel() == 0:
        return a.new_zeros(())
    za = F.normalize(a[ia], dim=1)
    zb = F.normalize(b[ib], dim=1)
    la, lb = labels[ia], labels[ib]
    pos = (la.view(-1, 1) == lb.view(1, -1)).to(za.dtype)  # (Na, Nb)
    logits = za @ zb.t() / temperature

    def side(lg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        keep = p.sum(1) > 0
        if not keep.any():
            return lg.new_zeros(())
        logp = lg - torch.logsumexp(lg, dim=1, keepdim=True)
        per = -(logp * p).sum(1) / p.sum(1).clamp_min(1.0)
        return per[keep].mean()

    return 0.5 * (side(logits, pos) + side(logits.t(), pos.t()))


def class_centroid_gap(
    a: torch.Tensor,
    b: torch.Tensor,
    labels: torch.Tensor,
    mask_a: torch.Tensor,
    mask_b: torch.Tensor,
) -> torch.Tensor:
    """Mean over the classes present on both sides of the squared Euclidean distance,
    per dim, between the class's mean of ``a`` (rows ``mask_a``) and of ``b``.

    a, b : (B, d) the image and expression experts' means; labels : (B,) codes.
    Returns () (0 when no class has rows on both sides).
    """
    la, lb = labels[mask_a], labels[mask_b]
    if la.numel() == 0 or lb.numel() == 0:
        return a.new_zeros(())
    ra, rb = a[mask_a], b[mask_b]
    gaps = []
    for c in torch.unique(la):
        if not (lb == c).any():
            continue
        ma = ra[la == c].mean(0)
        mb = rb[lb == c].mean(0)
        gaps.append(((ma - mb) ** 2).mean())
    return torch.stack(gaps).mean() if gaps else a.new_zeros(())


# ----------------------------------------------------------------------- the loss


def class_balance_weights(
    labels: np.ndarray, rows: np.ndarray, n_classes: int, power: float, unknown: int = -1
) -> tuple[float, ...]:
    """Per-class weights of the label head's cross-entropy for one expert.

    Class ``c`` weighs ``(share_c)^-power``, ``share_c`` being its fraction of the
    labelled ``rows``; the weights are rescaled so that the rows' mean weight is 1
    (the term keeps its scale). Classes absent from ``rows`` weigh 1 (a validation
    batch may hold only such rows; a weight of 0 would make its mean 0 / 0).

    Parameters
    ----------
    labels : (N,) int label codes
    rows : (N,) bool, the rows this expert scores (e.g. train split & has an image)
    n_classes : number of label codes
    power : 0 (every row counts once) to 1 (every class counts as much as any other)
    unknown : the code of "not known" (never scored)

    Returns
    -------
    tuple of n_classes floats
    """
    labels = np.asarray(labels)
    keep = np.asarray(rows, bool) & (labels != unknown) & (labels >= 0)
    n = np.bincount(labels[keep], minlength=n_classes).astype(np.float64)[:n_classes]
    if n.sum() == 0:
        return tuple([1.0] * n_classes)
    share = n / n.sum()
    wt = np.ones(n_classes)
    wt[n > 0] = share[n > 0] ** -float(power)
    wt[n > 0] /= (wt[n > 0] * share[n > 0]).sum()  # mean weight over the rows = 1
    return tuple(float(x) for x in wt)


def _weighted_sum(zero: torch.Tensor, terms) -> torch.Tensor:
    """``Σ w · t`` over ``(w, t)`` pairs, left to right, with the same value as the
    written-out sum: a term that is ``zero`` itself (a part that was not computed) is
    left out (adding an exact 0 changes nothing) and ``w == 1`` multiplies nothing.
    An expression-only step otherwise spends ~60 scalar ops on image terms that are 0.
    ``zero`` when every term is left out."""
    out = None
    for wt, t in terms:
        if t is zero:
            continue
        v = t if wt == 1.0 else wt * t
        out = v if out is None else out + v
    return zero if out is None else out


def _row_picker(rows: torch.Tensor | None):
    """``t -> t[rows]`` for batch-first tensors (None passes through); the identity
    when ``rows`` (bool (B,)) is None, selects every row (no copy then) or none (the
    terms are then computed, weighted 0, so every parameter stays in the graph, as
    DDP needs)."""
    if rows is None or bool(rows.all()) or not bool(rows.any()):
        return lambda t: t
    idx = rows.nonzero().flatten()
    return lambda t: None if t is None else t.index_select(0, idx)


def view_contrast_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR; Chen et al. 2020) between two views' codes of the same rows.

    Each row's code in one view must pick out its code in the other view among all
    ``2N - 1`` other codes of the two views (cosine similarity / ``temperature``).

    Parameters
    ----------
    a, b : (N, d) codes of the same N items under two augmentations
    temperature : softmax temperature (> 0)

    Returns
    -------
    scalar tensor, nats per code (0 when N < 2: nothing to tell apart)
    """
    n = a.shape[0]
    if n < 2:
        return a.new_zeros(())
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


# terms that count only when their own weight is > 0 (a layer, head or extra term
# switched on): with weight 0 they are exact zeros, not logged to TensorBoard
_SWITCHED = {
    "mask": "mask",
    "ssim": "ssim",
    "spectral": "spectral",
    "granules": "granules",
    "nucleus": "nucleus",
    "size": "size",
    "texture": "texture",
    "align": "align",
    "align_centroid": "align_centroid",
    "classify": "classify",
    "maturation": "maturation",
    "view": "view_contrast",
}


def term_weights(w: LossWeights, moe: bool = False) -> dict[str, str]:
    """How each logged term of :class:`LossTerms` enters ``total`` (PoE fusion; ``moe``:
    the experts' KLs are parts of ``kl``): the weight as text (``"0"``: off), by term
    name. The logged terms are unweighted."""
    kl_parts = "kl" if moe else "kl_unimodal"
    g = f"{w.cross:g}"
    out = {
        "image": f"{w.image:g}",
        "expression": f"{w.expression:g}",
        "kl": "β, via kl_objective (schedule/beta)",
        "kl_objective": "1 (β·KL, or β·abs(KL − C) with capacity)",
        "image_unimodal": f"{g} × {w.image:g} (cross × image)",
        "image_from_expression": f"{g} × {w.image:g} (cross × image)",
        "expression_unimodal": f"{g} × {w.expression:g} (cross × expression)",
        "expression_from_image": f"{g} × {w.expression:g} (cross × expression)",
        "kl_unimodal": f"β × {g} (β × cross)",
        "kl_image": f"none: part of {kl_parts}",
        "kl_expression": f"none: part of {kl_parts}",
        "neg_elbo": "none: reported only (β=1 objective: reconstruction + 1·kl; lower is better)",
    }
    for term, attr in _SWITCHED.items():
        out[term] = f"{float(getattr(w, attr)):g}"
    if w.align_mode == "none":
        out["align"] = "0"
    return out


def terms_off(w: LossWeights) -> set[str]:
    """Terms whose weight is 0 (always exact zeros: not worth a TensorBoard card)."""
    return {t for t, v in term_weights(w).items() if t in _SWITCHED and v == "0"}


def vae_loss(
    out: ForwardOutput,
    image: torch.Tensor,
    mask: torch.Tensor,
    x_log: torch.Tensor,
    counts: torch.Tensor | None,
    library: torch.Tensor | None,
    *,
    beta: float,
    capacity: float = 0.0,
    weights: LossWeights | None = None,
    image_likelihood: str = "gaussian",
    n_shared: int | None = None,
    labels: torch.Tensor | None = None,
    granules: torch.Tensor | None = None,
    nucleus: torch.Tensor | None = None,
    log_factorial: torch.Tensor | None = None,
    lobes: torch.Tensor | None = None,
    view_codes: torch.Tensor | None = None,
    size_target: torch.Tensor | None = None,
    granule_od: torch.Tensor | None = None,
) -> LossTerms:
    """All loss terms of one batch.

    Parameters
    ----------
    out : ForwardOutput from ``TwoBranchVAE.forward``
    image : (B, 3, S, S) float in [0, 1], or None when no row has an image
        (``out`` then decodes no image: every image term is 0)
    mask : (B, 1, S, S) float {0, 1}: image terms score these pixels only (or None)
    x_log : (B, G) log-normalised expression
    counts : (B, G) raw counts or None (Gaussian decoder)
    library : (B,) total counts or None
    beta : float
        KL weight (0 drops the KL term from ``total``).
    capacity : float
        Burgess capacity C, nats: the KL term becomes β·|KL − C|; 0 is plain β·KL.
    weights : LossWeights
    image_likelihood : str
    n_shared : int, optional
        Shared dims used for alignment (default: all).
    labels : (B,) int, optional
        Class codes for ``class`` alignment.
    granules : (B, 1, S, S) float, optional
        Granule centres of the input crops, a count per pixel (scored when
        ``weights.granules`` > 0 and the model has a granule head).
    granule_od : (B, 3) float, optional
        Each row's granule optical density as measured where the centres were found
        (``stage=pair`` at the crop's own resolution: ``obsm['granule_od']``); the
        granule stain is scored against it instead of the model-size crop's
        contrast, in which a granule blurred by the resize is fainter and takes
        the colour around it.
    nucleus : (B, 1, S, S) float {0, 1}, optional
        Nucleus masks of the input crops (scored when ``weights.nucleus`` > 0 and
        the model has a nucleus layer).
    log_factorial : (B, G) float, optional
        ``lgamma(counts + 1)``, the NB likelihood's constant, when the data hold it
        (computed per batch otherwise; same value).
    lobes : (B,) int, optional
        The lobe counter's count of each input crop's nucleus (0: none); with a lobe
        layer its cross-entropy is part of the nucleus term (:func:`vae.lobes.lobe_nll`).
    view_codes : (N, n_shared + n_private), optional
        The image encoder's means of a second augmented view of the N rows with an image
        (in row order); with ``weights.view_contrast`` > 0 they and the batch's own
        image codes are scored by :func:`view_contrast_loss`.
    size_target : (B,) float, optional
        Each input cell's standardised log diameter, NaN where unknown
        (:meth:`vae.model.TwoBranchVAE.size_target`); scored against the size head's
        output when ``weights.size`` > 0.

    Returns
    -------
    LossTerms
    """
    w = weights or LossWeights()
    post: Posteriors = out.posteriors
    ref = image if image is not None else x_log
    hi = post.has_image.to(ref.dtype)
    he = post.has_expression.to(ref.dtype)
    paired = hi * he
    b = ref.shape[0]
    zero = ref.new_zeros(())

    # a decode or posterior that was skipped (None) is one whose rows are all
    # weighted 0 here: its terms are exactly 0, as they would be computed

    # image terms are scored on the rows with a crop only: every image term's row
    # weight is 0 elsewhere (has_image, or paired rows), and on the real chain's mix
    # three rows in four hold expression only (same sums, a quarter of the work)
    pick = _row_picker(post.has_image if image is not None else None)
    image, mask, granules, nucleus = pick(image), pick(mask), pick(granules), pick(nucleus)
    lobes = pick(lobes)
    score_size = w.size > 0 and size_target is not None and image is not None
    size_target = pick(size_target) if score_size else None
    size_known = torch.isfinite(size_target) if score_size else None
    # the input's stain contrast, once per batch: every decode below is scored against it
    contrast = (
        granule_contrast(image, mask)
        if w.granules > 0 and granules is not None and image is not None
        else None
    )
    if contrast is not None and granule_od is not None:
        od_rows = pick(granule_od)
        contrast = torch.nan_to_num(od_rows, nan=0.0)[:, :, None, None].to(contrast.dtype)

    score_nucleus = w.nucleus > 0 and nucleus is not None and image is not None
    # the input's fine detail and where it is texture, once per batch
    if w.texture > 0 and image is not None:
        detail = texture_detail(image, mask, nucleus)
        region = texture_region(mask, nucleus)
    else:
        detail = region = None
    # a two-band layer's bands of the detail: once per batch, at its first decode
    bands: tuple[torch.Tensor, torch.Tensor] | None = None
    # gaps between lobes weigh more (once per batch: every decode is scored against it)
    nucleus_weight_map = (
        1.0 + w.nucleus_gap * nucleus_gaps(nucleus) if score_nucleus and w.nucleus_gap > 0 else None
    )

    def img_terms(
        dec: Decoded | None, rows: torch.Tensor, texture: bool = True
    ) -> tuple[torch.Tensor, ...]:
        # texture False: the texture term is 0, not computed (the image drawn from a
        # profile with LossWeights.cross_texture off)
        if dec is None or dec.image is None:
            return zero, zero, zero, zero, zero, zero, zero, zero
        rows = pick(rows)
        dec = replace(
            dec,
            image=pick(dec.image),
            mask_logits=pick(dec.mask_logits),
            granule_rate=pick(dec.granule_rate),
            granule_od=pick(dec.granule_od),
            nucleus_logits=pick(dec.nucleus_logits),
            lobe_logits=pick(dec.lobe_logits),
            size=pick(dec.size),
            texture_amp=pick(dec.texture_amp),
            texture_floor=pick(dec.texture_floor),
            texture_dir=pick(dec.texture_dir),
            texture_amp_coarse=pick(dec.texture_amp_coarse),
            texture_floor_coarse=pick(dec.texture_floor_coarse),
            texture_dir_coarse=pick(dec.texture_dir_coarse),
        )
        if w.nucleus_input_compose and score_nucleus and dec.cytoplasm is not None:
            # p(x, n | z) = p(n | z) p(x | z, n): the colours given the observed nucleus
            # (the two layers are picked here only: no other term reads them)
            cyto = pick(dec.cytoplasm)
            dec = replace(dec, image=cyto + nucleus * (pick(dec.nucleus_colour) - cyto))
        nll = (
            image_nll(image, dec.image, mask, dec.image_log_scale, image_likelihood) * rows
        ).sum()
        if dec.mask_logits is not None and w.mask > 0:
            bce = F.binary_cross_entropy_with_logits(dec.mask_logits, mask, reduction="none")
            m = (bce.sum(dim=(1, 2, 3)) * rows).sum()
        else:
            m = zero
        if w.ssim > 0:
            s = ((1.0 - masked_ssim(image, dec.image, mask)) * rows).sum()
        else:
            s = zero
        if w.spectral > 0:
            f = (spectral_l1(image, dec.image, mask) * rows).sum()
        else:
            f = zero
        if contrast is not None and dec.granule_rate is not None:
            g = (granule_error(dec, granules, contrast) * rows).sum()
        else:
            g = zero
        if score_nucleus and dec.nucleus_logits is not None:
            nu = (nucleus_bce(dec, nucleus, mask, nucleus_weight_map) * rows).sum()
            if lobes is not None and dec.lobe_logits is not None:
                # the lobe layer's count (its head reads the code detached: this trains it
                # alone); a few nats per row against the mask's hundreds of pixels
                nu = nu + (lobe_nll(dec.lobe_logits, lobes) * rows).sum()
        else:
            nu = zero
        if score_size and dec.size is not None:
            err = torch.where(size_known, dec.size - size_target, torch.zeros_like(dec.size))
            sz = (0.5 * err.pow(2) * rows).sum()
        else:
            sz = zero
        if texture and detail is not None and dec.texture_amp is not None:
            nonlocal bands
            if bands is None and dec.texture_amp_coarse is not None:
                bands = texture_bands(detail, region)
            tx = (texture_nll(dec, detail, region, bands) * rows).sum()
        else:
            tx = zero
        return nll / b, m / b, s / b, f / b, g / b, nu / b, sz / b, tx / b

    def expr_term(dec: Decoded | None, rows: torch.Tensor) -> torch.Tensor:
        # skipped decoder (None) or a model without genes (B, 0): nothing to score
        if dec is None or dec.expression_log is None or dec.expression_log.shape[-1] == 0:
            return zero
        nll = expression_nll(dec, x_log, counts, library, w.late_mask, log_factorial)
        return (nll * rows).sum() / b

    def weighted_img(t: tuple[torch.Tensor, ...]) -> torch.Tensor:
        weights = (w.image, w.mask, w.ssim, w.spectral, w.granules, w.nucleus, w.size, w.texture)
        return _weighted_sum(zero, zip(weights, t))

    def kl_of(g: Gaussian | None, rows: torch.Tensor) -> torch.Tensor:
        if g is None:
            return zero
        return (kl_normal(g).sum(dim=1) * rows).sum() / b

    if out.joint is not None:  # PoE: ELBO of the fused posterior on every row
        i_nll, i_mask, i_ssim, i_spec, i_gran, i_nuc, i_size, i_tex = img_terms(out.joint, hi)
        e_nll = expr_term(out.joint, he)
        kl_dims = kl_normal(post.joint)
        kl = kl_dims.sum(dim=1).mean()
        # unimodal ELBOs on paired rows (MVAE-style subsampling): each expert
        # alone reconstructs both modalities -> cross-modal prediction works
        ui = img_terms(out.from_image, paired)
        ue = expr_term(out.from_expression, paired)
        ci = img_terms(out.from_expression, paired, w.cross_texture)
        ce = expr_term(out.from_image, paired)
        kl_img, kl_expr = kl_of(post.image, paired), kl_of(post.expression, paired)
        kl_uni = _weighted_sum(zero, [(1.0, kl_img), (1.0, kl_expr)])
        cross = [(1.0, weighted_img(ui)), (w.expression, ue), (1.0, weighted_img(ci))]
        extra = _weighted_sum(zero, [(w.cross, _weighted_sum(zero, [*cross, (w.expression, ce)]))])
    else:  # MoE: average of the present components' ELBOs
        n_present = (hi + he).clamp_min(1.0)
        wi, we = hi / n_present, he / n_present
        ii = img_terms(out.from_image, wi)
        ie = img_terms(out.from_expression, wi * he, w.cross_texture)
        i_nll = ii[0] + ie[0]
        i_mask = ii[1] + ie[1]
        i_ssim = ii[2] + ie[2]
        i_spec = ii[3] + ie[3]
        i_gran = ii[4] + ie[4]
        i_nuc = ii[5] + ie[5]
        i_size = ii[6] + ie[6]
        i_tex = ii[7] + ie[7]
        e_nll = expr_term(out.from_expression, we) + expr_term(out.from_image, he * wi)
        kl_dims = sum(
            kl_normal(g) * wg.view(-1, 1)
            for g, wg in ((post.image, wi), (post.expression, we))
            if g is not None
        )
        kl = kl_dims.sum(dim=1).mean()
        # each expert's part of that KL (reported only: kl is their sum)
        kl_img, kl_expr = kl_of(post.image, wi), kl_of(post.expression, we)
        ui = ci = (zero,) * 8
        ue = ce = zero
        # cross-modal terms are part of the MoE ELBO above; report them alone too
        with torch.no_grad():
            ci = img_terms(out.from_expression, paired, w.cross_texture)
            ce = expr_term(out.from_image, paired)
        kl_uni = zero
        extra = zero

    if w.free_bits > 0:
        # Kingma et al. 2016: a dim whose batch-mean KL is under the floor costs
        # the floor, so the optimiser gains nothing by closing it down
        kl_fb = kl_dims.mean(dim=0).clamp_min(w.free_bits).sum()
    else:
        kl_fb = kl
    kl_obj = beta * (kl_fb - capacity).abs() if capacity > 0 else beta * kl_fb
    if beta == 0:
        kl_obj = zero

    # shared dims used for alignment and the label head; an unknown label is not a class
    ns = n_shared or post.joint[0].shape[1]
    known = labels != w.unknown_label if labels is not None else None

    align = zero
    align_centroid = zero
    both = post.image is not None and post.expression is not None
    if both:  # the two experts' shared means, which both alignment terms compare
        mi, me = post.image[0][:, :ns], post.expression[0][:, :ns]
    if both and w.align_centroid > 0 and known is not None:
        align_centroid = class_centroid_gap(
            mi, me, labels, post.has_image & known, post.has_expression & known
        )
    if both and w.align > 0 and w.align_mode != "none":
        if w.align_mode == "clip":
            keep = (paired > 0).nonzero().flatten()
            if keep.numel() > 1:
                align = info_nce(mi[keep], me[keep], w.temperature)
        elif known is not None:
            align = class_align(
                mi, me, labels, post.has_image & known, post.has_expression & known, w.temperature
            )

    classify = zero
    head = out.classifier
    if w.classify > 0 and head is not None and known is not None:
        parts = []
        experts = ((post.image, post.has_image), (post.expression, post.has_expression))
        for e, (g, has) in enumerate(experts):
            if g is None:
                continue
            keep = (known & has).nonzero().flatten()
            if keep.numel():
                logits = head(g[0][keep, :ns])
                cw = w.classify_class_weights
                # with class weights: the batch's weighted mean (torch divides by the
                # summed weights of the rows' classes), so the term's scale stays ~1 row
                cw = logits.new_tensor(cw[e]) if cw else None
                parts.append(label_loss(logits, labels[keep], cw, w.classify_noise_q))
        if parts:
            classify = torch.stack(parts).mean()

    maturation = zero
    mhead = out.maturation
    if w.maturation > 0 and mhead is not None and labels is not None:
        rank = mhead.rank_of(labels)
        parts = []
        for g, has in ((post.image, post.has_image), (post.expression, post.has_expression)):
            if g is None:
                continue
            keep = (has & (rank >= 0)).nonzero().flatten()
            if keep.numel():
                parts.append(mhead.nll(g[0][keep, 0], rank[keep]))
        if parts:
            maturation = torch.stack(parts).mean()

    view = zero
    if w.view_contrast > 0 and view_codes is not None and post.image is not None:
        rows = post.has_image.nonzero().flatten()
        # the image encoder's mean is the first n_shared + n_private dims of its expert
        a = post.image[0][rows, : view_codes.shape[1]]
        view = view_contrast_loss(a.float(), view_codes.float(), w.view_temperature)

    total = _weighted_sum(
        zero,
        [
            (w.image, i_nll),
            (w.mask, i_mask),
            (w.ssim, i_ssim),
            (w.spectral, i_spec),
            (w.granules, i_gran),
            (w.nucleus, i_nuc),
            (w.size, i_size),
            (w.texture, i_tex),
            (w.expression, e_nll),
            (1.0, kl_obj),
            (1.0, extra),
            (beta * w.cross, kl_uni),
            (w.align, align),
            (w.align_centroid, align_centroid),
            (w.classify, classify),
            (w.maturation, maturation),
            (w.view_contrast, view),
        ],
    )
    return LossTerms(
        total=total,
        image=i_nll,
        mask=i_mask,
        ssim=i_ssim,
        spectral=i_spec,
        granules=i_gran,
        nucleus=i_nuc,
        classify=classify,
        expression=e_nll,
        kl=kl,
        kl_objective=kl_obj,
        image_unimodal=ui[0],
        expression_unimodal=ue,
        image_from_expression=ci[0],
        expression_from_image=ce,
        kl_unimodal=kl_uni,
        kl_image=kl_img,
        kl_expression=kl_expr,
        align=align,
        align_centroid=align_centroid,
        kl_per_dim=kl_dims.mean(dim=0).detach(),
        maturation=maturation,
        view=view,
        size=i_size,
        texture=i_tex,
        neg_elbo=_weighted_sum(
            zero,
            [
                (1.0, weighted_img((i_nll, i_mask, zero, zero, i_gran, i_nuc, i_size, i_tex))),
                (w.expression, e_nll),
                (1.0, kl),
            ],
        ),
    )
