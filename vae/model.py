"""Two-branch β-VAE: image CNN + expression MLP with a fused (shared) latent.

Inference, generative model and loss are kept apart (as scvi-tools' VAE module):

* :meth:`TwoBranchVAE.encode` -> :class:`Posteriors` (unimodal and fused Gaussians),
* :meth:`TwoBranchVAE.decode` -> :class:`Decoded` (image, mask and expression
  distributions' parameters),
* :mod:`vae.losses` turns a :class:`ForwardOutput` into named loss terms.

Latent layout, ``d = n_shared + 2 * n_private``::

    z = [ shared (n_shared) | image private (n_private) | expression private (n_private) ]

The shared block is the product (or mixture) of the experts present in each
row; each private block comes from its own modality only (prior N(0, I) when
that modality is absent). The image decoder reads ``[shared | image private]``,
the expression decoder ``[shared | expression private]``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vae.lobes import LobeHead, carve_lobes, fill_cuts, lobe_count, nucleus_holes

IMAGE_LIKELIHOODS = ("mse", "gaussian", "laplace")
EXPRESSION_LIKELIHOODS = ("nb", "zinb", "gaussian")
FUSIONS = ("poe", "moe")
EXPRESSION_NORMS = ("layer", "batch")
EXPRESSION_INPUTS = ("lognorm", "counts")
IMAGE_ARCHS = ("plain", "residual")
IMAGE_INPUTS = ("rgb", "stain")
IMAGE_ENCODERS = ("conv", "resnet18")
ENCODE_VIEWS = (1, 8)  # one view, or the 8 symmetries of the square
SIZE_FEATURES = 2  # the size input of the image expert: standardised log diameter, known flag

Gaussian = tuple[torch.Tensor, torch.Tensor]  # (mu, logvar), each (B, d)


@dataclass
class VAEArgs:
    """Architecture of :class:`TwoBranchVAE` (plain values, saved in checkpoints).

    Attributes
    ----------
    n_genes : int
        Number of genes G of the expression branch; 0 builds an image-only model
        (no expression encoder / decoder: ``pair=image_only``).
    crop_size : int
        Side S of the square crops, px; must be divisible by ``2 ** len(channels)``.
    n_shared, n_private : int
        Shared latent dims and private dims per modality.
    channels : list of int
        Conv widths of the image encoder, one stride-2 conv each (decoder mirrors).
    encoder_channels : list of int or None
        Widths of the conv image encoder when they differ from the decoder's
        (``None``: ``channels``); crops must be divisible by ``2 ** len`` of it too.
    hidden : list of int
        MLP widths of the expression encoder (decoder mirrors).
    expression_likelihood : str
        ``nb`` | ``zinb`` (counts) or ``gaussian`` (log-normalised values).
    image_likelihood : str
        ``mse`` | ``gaussian`` | ``laplace``; the latter two learn one scale.
    library_covariate : bool
        Give the expression encoder log library size as an extra input.
    predict_mask : bool
        Decode a mask channel besides RGB.
    fusion : str
        ``poe`` or ``moe``.
    norm_total : float
        Typical sum of ``expm1(X)`` per cell; turns NB proportions into
        log-normalised predictions.
    dropout : float
        Dropout in the expression MLPs.
    expression_input : str
        What the expression encoder reads: ``lognorm`` (X, log-normalised) or
        ``counts``: ``log1p`` of the counts, recovered from X and the library size
        (``expm1(X) * library / sum(expm1(X))``, exact when X is the log of counts
        scaled per cell), as scvi-tools' encoder reads them.
    expression_norm : str
        Normalisation of the expression MLPs' hidden layers: ``layer`` (LayerNorm, per
        cell) or ``batch`` (BatchNorm over the batch, as scvi-tools; statistics over
        every row the MLP sees, so meant for data where every row has a profile).
    image_arch : str
        ``plain``: one stride-2 conv per scale and transposed convs back (the
        first design; decodes blurred discs). ``residual``: a residual 3x3
        block after every scale in both directions, nearest upsampling + 3x3
        conv instead of transposed convs (no checkerboard), and a full-resolution
        3x3 head, so the decoder has capacity at the scales where nucleus
        outline and granules live (docs/vae.md, "Image branch").
    """

    n_genes: int
    crop_size: int
    n_shared: int = 16
    n_private: int = 0
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 64])
    # widths of the conv image encoder, one per /2; None: ``channels`` (the decoder's)
    encoder_channels: list[int] | None = None
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    expression_likelihood: str = "nb"
    image_likelihood: str = "gaussian"
    library_covariate: bool = True
    predict_mask: bool = True
    fusion: str = "poe"
    norm_total: float = 1e4
    dropout: float = 0.1
    # "layer" | "batch"; default "layer" so checkpoints saved before this field load
    # unchanged
    expression_norm: str = "layer"
    # "lognorm" | "counts"; default "lognorm" so older checkpoints load unchanged
    expression_input: str = "lognorm"
    # default "plain" so checkpoints saved before this field load unchanged
    image_arch: str = "plain"
    texture_noise: bool = False  # residual decoder: per-pixel noise before the last conv
    # granule layer: the decoder also predicts a granule-rate map and the granules'
    # colour; decoded images render granules from them (:func:`render_granules`)
    granule_head: bool = False
    # texture layer: the decoder also predicts, per pixel, how strong the stain's fine
    # grain is and its colour (granules, chromatin); decoded images draw that grain from
    # a fixed noise field (:func:`render_texture`). Default False so checkpoints saved
    # before this field load unchanged.
    texture_head: bool = False
    # texture layer in two bands: the grain's amplitude, colour and floor are decoded apart
    # for the detail finer and coarser than ``TEXTURE_COARSE_SIGMA`` (1 px grain vs blobs
    # 2-4 px across: eosinophil, basophil and primary granules, chromatin clumps), each
    # drawn from a field of its own size (:func:`render_texture`). Default False so
    # checkpoints saved before this field load unchanged (one band: one grain size)
    texture_coarse: bool = False
    # nucleus layer: the decoder also outputs nucleus-mask logits (trained as a
    # Bernoulli against the lobe counter's nucleus of the input) and a nucleus colour
    # layer; the image is the cytoplasm layer with the nucleus layer painted through
    # that mask (:func:`compose_nucleus`), sharpened when decoded cells are drawn
    nucleus_head: bool = False
    # label classifier on the shared latent (scANVI-style semi-supervision; 0: none)
    n_classes: int = 0
    # maturation axis: the rank of each label code along the maturation order (-1: not
    # a stage of it); an ordinal head (:class:`MaturationHead`) reads shared dim 0, so
    # that one axis orders the stages. Empty: no head (checkpoints before it load as such)
    maturation_ranks: list[int] = field(default_factory=list)
    # what the image encoder sees: "rgb", or "stain": haematoxylin / eosin / DAB
    # optical densities (Beer-Lambert; :func:`stain_density`). Default "rgb" so
    # checkpoints saved before this field load unchanged.
    image_input: str = "rgb"
    # views of each crop the image expert averages when a latent is reported
    # (``encode(views=...)``, :func:`dihedral_mean`): 1, or 8 = the symmetries of the
    # square. Saved with the model so a study's reference latent and every later query
    # are encoded alike; training always sees one (augmented) view. Default 1 so
    # checkpoints saved before this field load unchanged.
    encode_views: int = 1
    # image encoder: "conv" (:class:`ImageEncoder`, widths ``channels``) or "resnet18"
    # (:class:`vae.backbone.ResNetImageEncoder`, which can start from a local
    # pretrained trunk, e.g. the study's own detector). Default "conv" so checkpoints
    # saved before this field load unchanged.
    image_encoder: str = "conv"
    # lobe layer (:mod:`vae.lobes`, needs the nucleus layer): a head on the code gives
    # the nucleus's lobe count, and drawn cells cut the nucleus mask into that many
    # lobes. Default False so checkpoints saved before this field load unchanged.
    lobe_head: bool = False
    # the lobe counter's second cut rule for the head's targets (None: off; real smears'
    # pale touching lobes, :func:`vae.analysis.granules.cut_lobe_valleys`). Training
    # targets only: the architecture is the same either way.
    lobe_deep_valley: float | None = None
    # the cell's size: every crop is framed so that its cell fills it, so the size a
    # haematologist reads first (a lymphocyte is small, a monocyte large; granulocytes
    # shrink as they mature) is lost in the pixels. With ``size_head`` the image expert
    # also reads the cell's diameter on the detector's working frame (``obs
    # ['cell_diameter']``; log, standardised by ``size_log_mean`` / ``size_log_sd`` of the
    # training data, plus a known / unknown flag) and a head on the image part of the
    # code predicts it back (:class:`SizeHead`). Default False so checkpoints saved before
    # these fields load unchanged.
    size_head: bool = False
    size_log_mean: float = 0.0
    size_log_sd: float = 1.0
    # expression batches (scvi-tools' ``batch_key``): profiles measured in several runs,
    # patients or sites differ by run as well as by cell state. The expression decoder
    # reads the batch as a one-hot beside the code, so the code need not carry it; the
    # encoders never read it, so a new sample's cells are encoded without one (a batch
    # the study never saw included). ``batch_key`` names the obs column of the paired
    # table, ``batch_names`` its values in code order. Empty: no covariate (checkpoints
    # saved before these fields load as such).
    batch_key: str | None = None
    batch_names: list[str] = field(default_factory=list)
    # image sources (the microscope, stain and scanner of each crop: ``image_source``):
    # the image decoder reads the source as a one-hot beside the code, as the expression
    # decoder reads its batch, so the code need not carry each microscope's colour and
    # grain; the encoders never read it. A code without a crop (a profile, a path step)
    # is drawn in the average of the sources or in one the caller names. Empty: no
    # covariate (checkpoints saved before these fields load as such).
    image_batch_key: str | None = None
    image_batch_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.expression_likelihood not in EXPRESSION_LIKELIHOODS:
            raise ValueError(
                f"expression_likelihood={self.expression_likelihood!r}; "
                f"valid: {', '.join(EXPRESSION_LIKELIHOODS)}"
            )
        if self.image_likelihood not in IMAGE_LIKELIHOODS:
            raise ValueError(
                f"image_likelihood={self.image_likelihood!r}; valid: {', '.join(IMAGE_LIKELIHOODS)}"
            )
        if self.image_arch not in IMAGE_ARCHS:
            raise ValueError(f"image_arch={self.image_arch!r}; valid: {', '.join(IMAGE_ARCHS)}")
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"image_input={self.image_input!r}; valid: {', '.join(IMAGE_INPUTS)}")
        if self.image_encoder not in IMAGE_ENCODERS:
            raise ValueError(
                f"image_encoder={self.image_encoder!r}; valid: {', '.join(IMAGE_ENCODERS)}"
            )
        if self.image_encoder == "resnet18" and (self.crop_size % 32 or self.image_input != "rgb"):
            raise ValueError(
                f"image_encoder='resnet18' needs crop_size a multiple of 32 (got "
                f"{self.crop_size}) and image_input='rgb' (got {self.image_input!r})"
            )
        # the granule and texture layers read the residual decoder's full-resolution trunk
        for head, knob in (("granule_head", "granule_weight"), ("texture_head", "texture_weight")):
            if getattr(self, head) and self.image_arch != "residual":
                raise ValueError(
                    f"{head} needs image_arch='residual' (set vae.{knob}=0 for 'plain')"
                )
        if self.lobe_head and not self.nucleus_head:
            raise ValueError("lobe_head needs nucleus_head (the lobes cut the nucleus layer)")
        if self.size_head and self.image_encoder != "conv":
            raise ValueError(f"size_head needs image_encoder='conv' (got {self.image_encoder!r})")
        if not (self.size_log_sd > 0 and math.isfinite(self.size_log_mean)):
            raise ValueError(
                f"size_log_sd must be > 0 and size_log_mean finite; got "
                f"{self.size_log_sd}, {self.size_log_mean}"
            )
        if self.lobe_deep_valley is not None and not 0 < self.lobe_deep_valley <= 1:
            raise ValueError(f"lobe_deep_valley must be in (0, 1]; got {self.lobe_deep_valley}")
        if self.expression_input not in EXPRESSION_INPUTS:
            raise ValueError(
                f"expression_input={self.expression_input!r}; valid: {', '.join(EXPRESSION_INPUTS)}"
            )
        if self.expression_norm not in EXPRESSION_NORMS:
            raise ValueError(
                f"expression_norm={self.expression_norm!r}; valid: {', '.join(EXPRESSION_NORMS)}"
            )
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion={self.fusion!r}; valid: {', '.join(FUSIONS)}")
        if self.encode_views not in ENCODE_VIEWS:
            raise ValueError(
                f"encode_views={self.encode_views!r}; valid: {', '.join(map(str, ENCODE_VIEWS))}"
            )
        enc = self.encoder_channels
        if enc is not None and self.image_encoder != "conv":
            # the widths are the conv encoder's; silently ignoring them would mislead
            raise ValueError(
                f"encoder_channels={enc} is for image_encoder='conv' "
                f"(got image_encoder={self.image_encoder!r})"
            )
        # one stride-2 conv per width: the crop must halve that many times
        for name, widths in (("channels", self.channels), ("encoder_channels", enc)):
            if widths is None:
                continue
            down = 2 ** len(widths)
            if not widths or self.crop_size % down or self.crop_size < down:
                raise ValueError(
                    f"crop_size={self.crop_size} must be a positive multiple of "
                    f"2**len({name})={down} ({name}={widths})"
                )
        if self.maturation_ranks:
            ranked = {r for r in self.maturation_ranks if r >= 0}
            if len(ranked) < 2 or ranked != set(range(len(ranked))):
                raise ValueError(
                    f"maturation_ranks={self.maturation_ranks}: the ranks >= 0 must be "
                    "0, 1, ..., K-1 with K >= 2 (two or more stages)"
                )
        if self.batch_names:
            if not self.batch_key:
                raise ValueError("batch_names needs batch_key (the obs column they come from)")
            if len(set(self.batch_names)) != len(self.batch_names) or len(self.batch_names) < 2:
                raise ValueError(
                    f"batch_names must be two or more distinct names; got {self.batch_names}"
                )
            if self.n_genes == 0:
                raise ValueError("batch_names: a model without genes has no expression decoder")
        if self.image_batch_names:
            if not self.image_batch_key:
                raise ValueError(
                    "image_batch_names needs image_batch_key (the obs column they come from)"
                )
            names = self.image_batch_names
            if len(set(names)) != len(names) or len(names) < 2:
                raise ValueError(
                    f"image_batch_names must be two or more distinct names; got {names}"
                )
        if self.n_shared < 1 or self.n_private < 0 or self.n_genes < 0:
            raise ValueError(
                f"need n_shared >= 1, n_private >= 0, n_genes >= 0; got {self.n_shared}, "
                f"{self.n_private}, {self.n_genes}"
            )

    @property
    def n_latent(self) -> int:
        """Total latent size d."""
        return self.n_shared + 2 * self.n_private

    @property
    def has_counts(self) -> bool:
        return self.expression_likelihood in ("nb", "zinb")

    @property
    def n_batches(self) -> int:
        """Number of expression batches the decoder is conditioned on (0: none)."""
        return len(self.batch_names)

    @property
    def n_image_batches(self) -> int:
        """Number of image sources the image decoder is conditioned on (0: none)."""
        return len(self.image_batch_names)


@dataclass
class Posteriors:
    """Diagonal Gaussian posteriors, each ``(mu, logvar)`` of shape (B, d).

    ``image`` / ``expression`` are the unimodal experts (with the prior filled
    in for their missing private block) or ``None`` when not computed;
    ``joint`` fuses the modalities present in each row.
    """

    joint: Gaussian
    image: Gaussian | None
    expression: Gaussian | None
    has_image: torch.Tensor  # (B,) bool
    has_expression: torch.Tensor  # (B,) bool


@dataclass
class Decoded:
    """Decoder outputs for latent codes z (B, d).

    Attributes
    ----------
    image : (B, 3, S, S) float in [0, 1], or None
        Mean image (None when the image decoder was skipped: no image to score).
    mask : (B, 1, S, S) probability or None
    mask_logits : (B, 1, S, S) or None
    image_log_scale : () tensor
        Log of the learned pixel scale (σ or Laplace b); 0 for ``mse``.
    expression_log : (B, G) or None
        Predicted log1p-normalised expression; (B, 0) for a model without genes,
        None when the expression decoder was skipped (``use_expression=False``).
    expression_scale : (B, G) or None
        NB/ZINB proportions (rows sum to 1); multiply by library for the mean.
    expression_log_theta : (G,) or None
        NB inverse dispersion (log).
    expression_dropout_logits : (B, G) or None
        ZINB zero-inflation logits.
    expression_log_sd : (G,) or None
        Gaussian likelihood log standard deviation.
    granule_rate : (B, 1, S, S) or None
        Expected granule centres per 100 px^2 at each pixel (granule head only).
    granule_od : (B, 3, S, S) >= 0 or None
        Optical density (per RGB channel, -ln transmission) that a granule
        centred at each pixel adds to the cell under it (granule head only).
    image_mean : (B, 3, S, S) or None
        The mean image when ``image`` holds a rendering (sharp nucleus, granules:
        ``decode(..., render=True)``), else None.
    nucleus_logits : (B, 1, S, S) or None
        Logits of the nucleus mask (nucleus layer only).
    nucleus_colour, cytoplasm : (B, 3, S, S) in [0, 1] or None
        The two colour layers the mean image is composed of (nucleus layer only):
        ``image = cytoplasm + sigmoid(nucleus_logits) * (nucleus_colour - cytoplasm)``.
    texture_amp, texture_floor : (B, 1, S, S) > 0 or None
        Standard deviation (optical density) of the stain's fine detail along
        ``texture_dir`` and in every channel (texture layer only, :func:`vae.losses.texture_nll`).
    texture_dir : (B, 3, S, S) or None
        Unit colour direction (optical density per RGB channel) of that detail.
    texture_amp_coarse, texture_floor_coarse, texture_dir_coarse : or None
        Two-band texture layer only (``VAEArgs.texture_coarse``): the same three maps
        for the detail's coarse band (:func:`vae.losses.texture_bands`); ``texture_amp``,
        ``texture_floor`` and ``texture_dir`` are then the fine band's.
    lobe_logits : (B, LOBE_CLASSES) or None
        Logits of the nucleus lobe count 1..5 (lobe layer only, :mod:`vae.lobes`).
    size : (B,) or None
        The cell's log diameter, standardised as the model's input
        (:meth:`TwoBranchVAE.diameter_px` turns it into working-frame px; size head only).
    """

    image: torch.Tensor
    mask: torch.Tensor | None
    mask_logits: torch.Tensor | None
    image_log_scale: torch.Tensor
    expression_log: torch.Tensor | None
    expression_scale: torch.Tensor | None = None
    expression_log_theta: torch.Tensor | None = None
    expression_dropout_logits: torch.Tensor | None = None
    expression_log_sd: torch.Tensor | None = None
    granule_rate: torch.Tensor | None = None
    granule_od: torch.Tensor | None = None
    image_mean: torch.Tensor | None = None
    nucleus_logits: torch.Tensor | None = None
    nucleus_colour: torch.Tensor | None = None
    cytoplasm: torch.Tensor | None = None
    lobe_logits: torch.Tensor | None = None
    size: torch.Tensor | None = None
    texture_amp: torch.Tensor | None = None
    texture_floor: torch.Tensor | None = None
    texture_dir: torch.Tensor | None = None
    texture_amp_coarse: torch.Tensor | None = None
    texture_floor_coarse: torch.Tensor | None = None
    texture_dir_coarse: torch.Tensor | None = None


@dataclass
class ForwardOutput:
    """Everything the loss needs from one training forward pass.

    ``joint`` decodes z sampled from the fused posterior; on PoE,
    ``from_image`` / ``from_expression`` decode z sampled from the unimodal
    posteriors (used for unimodal + cross-modal terms on paired rows), with
    ``z_image_mu`` / ``z_expression_mu`` the shared means for alignment. On
    MoE, ``from_image`` / ``from_expression`` are the mixture components and
    ``joint`` is None. Trained without images (``forward(use_image=False)``),
    ``posteriors.image`` and ``from_image`` are None, every decoded ``image`` is
    None and, on PoE, ``from_expression`` is None (no paired row to score).
    Trained without expression (``forward(use_expression=False)``, or a model
    with 0 genes) it is the mirror image: ``posteriors.expression`` and
    ``from_expression`` are None, no decode holds an expression prediction and,
    on PoE, ``from_image`` is None.
    """

    posteriors: Posteriors
    joint: Decoded | None
    from_image: Decoded | None
    from_expression: Decoded | None
    classifier: nn.Module | None = None  # label head on shared means (n_classes > 0)
    maturation: MaturationHead | None = None  # ordinal head on shared dim 0


class MaturationHead(nn.Module):
    """Ordinal head that makes one latent coordinate the maturation axis.

    Cumulative-logit model with one slope: ``P(rank > k | z) = sigmoid(a * z - c_k)``
    for the ``K - 1`` ordered cut points ``c_0 < c_1 < ...`` (``a > 0``), scored as
    ``K - 1`` binary cross-entropies per row (the usual binary decomposition of an
    ordinal target). The isotropic prior makes every rotation of the latent equally
    likely, so tying the stage order to one axis costs the ELBO nothing: it picks the
    rotation in which a user can sweep one dimension from myeloblast to segmented
    neutrophil.

    Parameters
    ----------
    ranks : the rank of each label code (index = code), -1 where the label is not a
        stage; ranks >= 0 are 0 .. K-1.
    """

    def __init__(self, ranks: list[int]):
        super().__init__()
        k = max(ranks) + 1
        self.register_buffer("ranks", torch.tensor(list(ranks), dtype=torch.long))
        self.log_slope = nn.Parameter(torch.zeros(()))
        # cut points centred on 0, one prior sd apart to start
        self.first_cut = nn.Parameter(torch.tensor(-(k - 2) / 2.0))
        self.raw_gaps = nn.Parameter(torch.full((k - 2,), 0.5413))  # softplus -> 1.0

    @property
    def n_ranks(self) -> int:
        return int(self.raw_gaps.numel()) + 2

    def cuts(self) -> torch.Tensor:
        """(K-1,) increasing cut points."""
        gaps = F.softplus(self.raw_gaps)
        return torch.cat([self.first_cut[None], self.first_cut + torch.cumsum(gaps, 0)])

    def rank_of(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) rank of each label code; -1 for codes that are not stages or unknown."""
        ok = (labels >= 0) & (labels < self.ranks.numel())
        return torch.where(ok, self.ranks[labels.clamp(0, self.ranks.numel() - 1)], -1)

    def nll(self, axis: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        """Mean over rows of the summed binary cross-entropies, nats.

        axis : (B,) the latent coordinate (shared dim 0); rank : (B,) ranks >= 0.
        """
        logits = self.log_slope.exp() * axis[:, None] - self.cuts()[None]  # (B, K-1)
        above = (rank[:, None] > torch.arange(logits.shape[1], device=rank.device)).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, above, reduction="none").sum(1).mean()


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        # scvi-tools' settings: slow running statistics (momentum 0.01), eps 1e-3
        return nn.BatchNorm1d(width, eps=1e-3, momentum=0.01)
    return nn.LayerNorm(width)


def _mlp(sizes: list[int], dropout: float, norm: str = "layer") -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), _norm(norm, b), nn.SiLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _groups(c: int) -> int:
    # GroupNorm is per sample: rows without an image do not pollute statistics
    # and train/eval behave the same (unlike BatchNorm)
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


# residual blocks only up to this side (px): above it a 3x3 conv per scale, which on
# a CPU costs a fraction of a residual block at 32 or 64 px
RES_MAX_SIDE = 16


class ResBlock(nn.Module):
    """x + conv3x3(SiLU(GN(conv3x3(SiLU(GN(x)))))): keeps resolution and width."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(c), c),
            nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.GroupNorm(_groups(c), c),
            nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class NoiseInjection(nn.Module):
    """h + s_c * N(0, 1) per pixel, s_c learned per channel (StyleGAN-style).

    Granule positions are random: no code of a few dims can say where each one
    sits, so a deterministic decoder can only paint their average (a smooth
    tint). Per-pixel noise lets the layers after it place granule-like texture
    whose amount and size the latent controls; the spectral term rewards it.
    """

    def __init__(self, c: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1, c, 1, 1), 0.1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.scale * torch.randn_like(h)


# rgb2hed's optical-density range: OD is -log(rgb) / -log(1e-6), then scaled so a
# dense nucleus (haematoxylin OD ~0.1 in those units) reads about 1
_OD_FLOOR = 1e-6
_STAIN_GAIN = 10.0


class StainDensity(nn.Module):
    """RGB in [0, 1] -> haematoxylin / eosin / DAB optical densities, (B, 3, S, S).

    Colour deconvolution (Ruifrok & Johnston 2001, scikit-image's ``rgb2hed``
    matrix) in torch: ``OD = -log(rgb)`` is linear in the amount of each stain
    (Beer-Lambert), so the nucleus (haematoxylin) and eosinophil granules
    (eosin) become separate, additive channels instead of a product of
    colours. Values are clipped at 0 like ``rgb2hed`` and scaled by
    ``_STAIN_GAIN``.
    """

    def __init__(self) -> None:
        super().__init__()
        from skimage.color.colorconv import hed_from_rgb

        self.register_buffer(
            "hed_from_rgb", torch.as_tensor(hed_from_rgb, dtype=torch.float32), persistent=False
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        od = torch.log(image.clamp_min(_OD_FLOOR)) / float(np.log(_OD_FLOOR))
        m = self.hed_from_rgb.to(image.dtype)
        return torch.einsum("bchw,cd->bdhw", od, m).clamp_min(0) * _STAIN_GAIN


class ImageEncoder(nn.Module):
    """Masked crop -> Gaussian over ``n_out`` dims.

    Input is ``cat(image * mask, mask)``: (B, 4, S, S), so pixels outside the
    cell never reach the encoder and the cell outline is given explicitly.
    ``arch="residual"`` adds a residual block after each stride-2 conv.
    ``image_input="stain"`` gives the encoder the stain optical densities of
    :class:`StainDensity` instead of RGB (the decoder still draws RGB).
    """

    def __init__(
        self,
        crop_size: int,
        channels: list[int],
        n_out: int,
        arch: str = "plain",
        image_input: str = "rgb",
        n_extra: int = 0,
    ):
        super().__init__()
        self.stain = StainDensity() if image_input == "stain" else None
        self.n_extra = n_extra
        layers: list[nn.Module] = []
        c_in = 4
        for k, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.GroupNorm(_groups(c), c)]
            layers.append(nn.SiLU())
            if arch == "residual" and crop_size // 2 ** (k + 1) <= RES_MAX_SIDE:
                layers.append(ResBlock(c))
            c_in = c
        self.conv = nn.Sequential(*layers)
        side = crop_size // 2 ** len(channels)
        flat = channels[-1] * side * side + n_extra
        self.mu = nn.Linear(flat, n_out)
        self.logvar = nn.Linear(flat, n_out)

    def forward(
        self, image: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor | None = None
    ) -> Gaussian:
        """``extra``: (B, n_extra) per-cell scalars beside the pixels (the cell's size,
        :meth:`TwoBranchVAE.size_features`), joined to the conv features."""
        if self.stain is not None:
            image = self.stain(image)
        x = torch.cat([image * mask, mask], dim=1)  # (B, 4, S, S)
        h = self.conv(x).flatten(1)  # (B, C, s, s) -> (B, C*s*s)
        if self.n_extra:
            if extra is None or extra.shape != (h.shape[0], self.n_extra):
                got = None if extra is None else tuple(extra.shape)
                raise ValueError(
                    f"ImageEncoder needs extra ({h.shape[0]}, {self.n_extra}); got {got}"
                )
            h = torch.cat([h, extra.to(h.dtype)], 1)
        return self.mu(h), self.logvar(h).clamp(-10.0, 8.0)


class SizeHead(nn.Module):
    """Image part of the code -> the cell's standardised log diameter, (B,).

    Reads the code *not* detached: its error trains the encoder to keep the size in the
    latent, so traversals and the expression decode can say how large a cell is.
    """

    def __init__(self, n_in: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


class ImageDecoder(nn.Module):
    """z -> mean image (B, 3, S, S) in [0, 1] and mask logits (B, 1, S, S)."""

    def __init__(
        self,
        crop_size: int,
        channels: list[int],
        n_in: int,
        predict_mask: bool,
        arch: str = "plain",
        texture_noise: bool = False,
        granule_head: bool = False,
        nucleus_head: bool = False,
        texture_head: bool = False,
        texture_coarse: bool = False,
    ):
        super().__init__()
        self.side = crop_size // 2 ** len(channels)
        self.c0 = channels[-1]
        self.fc = nn.Linear(n_in, self.c0 * self.side * self.side)
        rev = list(reversed(channels))
        self.predict_mask = predict_mask
        self.granule_head = granule_head
        self.nucleus_head = nucleus_head
        self.texture_head = texture_head
        self.texture_coarse = texture_head and texture_coarse
        # output channels: RGB (the cytoplasm layer with a nucleus layer) [+ cell-mask
        # logit] [+ nucleus logit + nucleus RGB]; new channels go last, so a model
        # without the nucleus layer is the same network as before it existed
        n_out = 4 if predict_mask else 3
        if nucleus_head:
            n_out += NUCLEUS_CHANNELS
        layers: list[nn.Module] = []
        if arch == "plain" and (granule_head or texture_head):
            raise ValueError("granule_head and texture_head need image_arch='residual'")
        if arch == "plain":
            for a, b in zip(rev[:-1], rev[1:]):
                layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1)]
                layers += [nn.GroupNorm(_groups(b), b), nn.SiLU()]
            # last upsampling straight to the output channels
            layers.append(nn.ConvTranspose2d(rev[-1], n_out, 4, 2, 1))
        else:
            # upsample x2 + 3x3 conv per scale, a residual block at the coarse scales
            # (at 32-64 px a residual block costs more than the rest together)
            side = self.side
            for a, b in zip(rev[:-1], rev[1:]):
                side *= 2
                layers += [nn.Upsample(scale_factor=2, mode="nearest")]
                layers += [nn.Conv2d(a, b, 3, padding=1)]
                if side <= RES_MAX_SIDE:
                    layers.append(ResBlock(b))
                else:
                    layers += [nn.GroupNorm(_groups(b), b), nn.SiLU()]
            # last scale: upsample + two 3x3 convs at full resolution (a transposed
            # conv here paints a periodic checkerboard once the spectral term asks
            # for high frequencies); narrow because full resolution is the cost
            c_top = max(8, rev[-1] // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest")]
            layers += [nn.Conv2d(rev[-1], c_top, 3, padding=1)]
            if texture_noise:
                layers.append(NoiseInjection(c_top))
            layers += [nn.SiLU(), nn.Conv2d(c_top, n_out, 3, padding=1)]
            if granule_head:
                # the granule layer reads the code and the trunk's full-resolution
                # features without shaping them (inputs detached): measured, letting its
                # loss into the encoder cost 0.1 of joint kNN accuracy on the simulator.
                # How many granules and their stain: an MLP on the code (density peaks
                # mid-path, which a linear read-out of the trunk cannot follow); where:
                # a 3x3 conv on the trunk (spatial log-rate)
                self.granule_mlp = nn.Sequential(nn.Linear(n_in, 64), nn.SiLU(), nn.Linear(64, 4))
                self.granule_conv = nn.Conv2d(c_top, 1, 3, padding=1)
            if texture_head:
                # the texture layer, like the granule layer, reads the code and the
                # trunk detached (it describes the grain the mean image cannot hold; its
                # loss does not shape the latent): a per-cell offset from the code, and
                # a small conv on the full-resolution features for where (nucleus vs
                # cytoplasm, rim vs centre). Channels: log grain sd, log floor sd, colour.
                # Initialised on a fork of the random stream, so every other parameter of
                # the model starts as it would without the layer: a run with it and one
                # without, same seed, differ by the layer alone (a paired comparison).
                # Two bands: the same channels again for the coarse band (its grain has
                # a colour of its own: chromatin clumps and eosinophil granules are coarse,
                # compression noise fine)
                n_tex = TEXTURE_CHANNELS * (1 + int(self.texture_coarse))
                with torch.random.fork_rng(devices=[]):
                    self.texture_mlp = nn.Sequential(
                        nn.Linear(n_in, 32), nn.SiLU(), nn.Linear(32, n_tex)
                    )
                    self.texture_conv = nn.Sequential(
                        nn.Conv2d(c_top, 16, 3, padding=1),
                        nn.SiLU(),
                        nn.Conv2d(16, n_tex, 1),
                    )
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """(B, n_in) -> image (B, 3, S, S), mask logits (B, 1, S, S) or None, the
        granule rate (B, 1, S, S, per 100 px^2) and optical density (B, 3, S, S) or
        None, the nucleus logits (B, 1, S, S), nucleus colour and cytoplasm
        (B, 3, S, S) or None, and the texture amplitude, floor (B, 1, S, S),
        colour direction (B, 3, S, S), then the coarse band's three maps or None (the
        first three are then the fine band's)."""
        h = F.silu(self.fc(z)).view(-1, self.c0, self.side, self.side)  # (B, C*s*s) -> (B, C, s, s)
        top = self.deconv[:-1](h)  # features before the output layer
        out = self.deconv[-1](top)  # (B, 3 [+1 mask] [+4 nucleus], S, S)
        img = torch.sigmoid(out[:, :3])
        k = 4 if self.predict_mask else 3
        mask_logits = out[:, 3:4] if self.predict_mask else None
        nuc: tuple[torch.Tensor | None, ...] = (None, None, None)
        if self.nucleus_head:
            # the first three channels are then the cytoplasm layer
            logits = out[:, k : k + 1]
            colour = torch.sigmoid(out[:, k + 1 : k + NUCLEUS_CHANNELS])
            nuc = (logits, colour, img)
            img = compose_nucleus(img, colour, logits)
        tex: tuple[torch.Tensor | None, ...] = (None,) * 6
        if self.texture_head:
            t = self.texture_conv(top.detach()) + self.texture_mlp(z.detach())[:, :, None, None]
            tex = _texture_maps(t[:, :TEXTURE_CHANNELS])
            tex += _texture_maps(t[:, TEXTURE_CHANNELS:]) if self.texture_coarse else (None,) * 3
        if not self.granule_head:
            return img, mask_logits, None, None, *nuc, *tex
        g = self.granule_mlp(z.detach())  # (B, 4): log density offset, granule optical density
        where = self.granule_conv(top.detach())  # (B, 1, S, S) from full-resolution features
        log_rate = (g[:, :1, None, None] + where).clamp(-12.0, 6.0)
        rate = torch.exp(log_rate)  # (B, 1, S, S) centres per 100 px^2
        od = F.softplus(g[:, 1:4, None, None]).expand(-1, -1, *img.shape[-2:])
        return img, mask_logits, rate, od, *nuc, *tex


class ExpressionEncoder(nn.Module):
    """Log-normalised expression (B, G) [+ log library (B, 1)] -> Gaussian.

    ``inputs="counts"``: the MLP reads ``log1p`` of the counts recovered from the
    log-normalised values and the library size (see ``VAEArgs.expression_input``).
    """

    def __init__(
        self,
        n_genes: int,
        hidden: list[int],
        n_out: int,
        library: bool,
        dropout: float,
        norm: str = "layer",
        inputs: str = "lognorm",
    ):
        super().__init__()
        self.library = library
        self.inputs = inputs
        self.net = _mlp([n_genes + int(library), *hidden], dropout, norm)
        self.mu = nn.Linear(hidden[-1], n_out)
        self.logvar = nn.Linear(hidden[-1], n_out)

    def forward(self, x: torch.Tensor, log_library: torch.Tensor | None) -> Gaussian:
        if log_library is None:  # unknown: library 1
            log_library = torch.zeros(x.shape[0], 1, device=x.device, dtype=x.dtype)
        log_library = log_library.view(-1, 1).to(x.dtype)
        if self.inputs == "counts":
            # X = log1p(c * s) with one scale s per cell: c = expm1(X) * L / sum(expm1(X))
            e = torch.expm1(x)
            scale = torch.exp(log_library) / e.sum(dim=1, keepdim=True).clamp_min(1e-12)
            x = torch.log1p(e * scale)  # a row without a profile stays 0
        if self.library:
            x = torch.cat([x, log_library], dim=1)
        h = self.net(x)
        return self.mu(h), self.logvar(h).clamp(-10.0, 8.0)


def batch_onehot(codes: torch.Tensor | None, n_batches: int, n_rows: int, like: torch.Tensor):
    """One-hot of batch codes, (B, K); a row of ``1 / K`` where unknown.

    The expression decoder's batches (``VAEArgs.batch_names``) and the image decoder's
    sources (``VAEArgs.image_batch_names``) are both coded so.

    Parameters
    ----------
    codes : (B,) int64 or None
        Batch (or source) code of each row, ``-1`` (or None for every row): unknown, e.g.
        a decoded traversal step, or a query cell from a batch the study never saw.
    n_batches : int
        K, the number of batches (sources) the decoder knows.
    n_rows : int
        B, used when ``codes`` is None.
    like : torch.Tensor
        Gives device and dtype.

    Returns
    -------
    torch.Tensor (B, K)
        An unknown row gets the average of the batches: the decoder's input at the
        mean of its one-hots, so what it draws is no particular batch's.
    """
    if codes is None:
        return torch.full(
            (n_rows, n_batches), 1.0 / n_batches, device=like.device, dtype=like.dtype
        )
    codes = codes.to(like.device).long().view(-1)
    known = (codes >= 0) & (codes < n_batches)
    out = F.one_hot(codes.clamp(0, n_batches - 1), n_batches).to(like.dtype)
    return torch.where(known.view(-1, 1), out, torch.full_like(out, 1.0 / n_batches))


class ExpressionDecoder(nn.Module):
    """z [+ batch one-hot] -> parameters of NB / ZINB over counts, or Gaussian over
    log-normalised X."""

    def __init__(
        self,
        n_genes: int,
        hidden: list[int],
        n_in: int,
        likelihood: str,
        norm_total: float,
        dropout: float,
        norm: str = "layer",
        n_batches: int = 0,
    ):
        super().__init__()
        self.likelihood = likelihood
        self.n_batches = n_batches
        # the batch enters the first layer only (scvi-tools injects it into every layer);
        # a per-gene, per-batch offset on the output as well mixed the batches no better
        # on two synthetic effects (docs/vae.md, "Expression batches")
        self.net = _mlp([n_in + n_batches, *reversed(hidden)], dropout, norm)
        self.out = nn.Linear(hidden[0], n_genes)
        self.register_buffer("log_norm_total", torch.tensor(math.log(norm_total)))
        if likelihood in ("nb", "zinb"):
            self.log_theta = nn.Parameter(torch.full((n_genes,), math.log(5.0)))
        if likelihood == "zinb":
            self.dropout_head = nn.Linear(hidden[0], n_genes)
        if likelihood == "gaussian":
            self.log_sd = nn.Parameter(torch.full((n_genes,), math.log(0.5)))

    def forward(
        self, z: torch.Tensor, batch: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        if self.n_batches:
            z = torch.cat([z, batch_onehot(batch, self.n_batches, z.shape[0], z)], dim=1)
        h = self.net(z)
        raw = self.out(h)  # (B, G)
        if self.likelihood == "gaussian":
            return {"expression_log": raw, "expression_log_sd": self.log_sd}
        scale = torch.softmax(raw, dim=-1)  # proportions, rows sum to 1
        # log1p(proportion * typical total) = log-normalised prediction
        pred = torch.log1p(scale * self.log_norm_total.exp())
        return {
            "expression_log": pred,
            "expression_scale": scale,
            "expression_log_theta": self.log_theta,
            "expression_dropout_logits": (
                self.dropout_head(h) if self.likelihood == "zinb" else None
            ),
        }


def poe(experts: list[Gaussian], present: list[torch.Tensor]) -> Gaussian:
    """Product of Gaussian experts with the N(0, I) prior expert.

    Parameters
    ----------
    experts : list of (mu, logvar), each (B, d)
    present : list of (B,) bool
        Whether expert k is observed in each row; absent experts contribute
        nothing, so a row with no modality gets the prior.

    Returns
    -------
    (mu, logvar) of the product, each (B, d).
    """
    mu0 = torch.zeros_like(experts[0][0])
    precision = torch.ones_like(mu0)  # prior expert: precision 1, mean 0
    weighted = mu0
    for (mu, logvar), m in zip(experts, present):
        p = torch.exp(-logvar) * m.view(-1, 1).to(mu.dtype)
        precision = precision + p
        weighted = weighted + mu * p
    return weighted / precision, -torch.log(precision)


def moe_mean(experts: list[Gaussian], present: list[torch.Tensor]) -> Gaussian:
    """Moment-matched Gaussian of the uniform mixture of the present experts.

    Rows with no modality get the prior. Used to report ``joint`` under MoE;
    training samples each component (see :class:`ForwardOutput`).
    """
    mu0 = torch.zeros_like(experts[0][0])
    w_sum = torch.zeros_like(mu0[:, :1])
    m1 = mu0.clone()
    m2 = mu0.clone()
    for (mu, logvar), m in zip(experts, present):
        w = m.view(-1, 1).to(mu.dtype)
        w_sum = w_sum + w
        m1 = m1 + w * mu
        m2 = m2 + w * (logvar.exp() + mu**2)
    none = w_sum == 0
    w_sum = w_sum.clamp_min(1.0)
    m1 = m1 / w_sum
    var = (m2 / w_sum - m1**2).clamp_min(1e-6)
    var = torch.where(none, torch.ones_like(var), var)
    return m1, var.log()


def reparameterize(g: Gaussian) -> torch.Tensor:
    mu, logvar = g
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


class TwoBranchVAE(nn.Module):
    """Image + expression β-VAE with a fused latent (see module docstring).

    Parameters
    ----------
    args : VAEArgs
        Architecture; stored as ``self.args`` and in checkpoints.
    """

    def __init__(self, args: VAEArgs):
        super().__init__()
        self.args = args
        a = args
        ns, npv = a.n_shared, a.n_private
        if a.image_encoder == "resnet18":
            from vae.backbone import ResNetImageEncoder

            self.image_encoder: nn.Module = ResNetImageEncoder(a.crop_size, ns + npv)
        else:
            self.image_encoder = ImageEncoder(
                a.crop_size,
                a.encoder_channels or a.channels,
                ns + npv,
                a.image_arch,
                a.image_input,
                n_extra=SIZE_FEATURES if a.size_head else 0,
            )
        self.image_decoder = ImageDecoder(
            a.crop_size,
            a.channels,
            ns + npv + a.n_image_batches,  # the code [+ the image source's one-hot]
            a.predict_mask,
            a.image_arch,
            a.texture_noise,
            a.granule_head,
            a.nucleus_head,
            a.texture_head,
            a.texture_coarse,
        )
        # 0 genes (pair=image_only): no expression branch at all, so no parameter
        # of it is trained, saved or synchronised
        self.expression_encoder = (
            ExpressionEncoder(
                a.n_genes,
                a.hidden,
                ns + npv,
                a.library_covariate,
                a.dropout,
                a.expression_norm,
                a.expression_input,
            )
            if a.n_genes > 0
            else None
        )
        self.expression_decoder = (
            ExpressionDecoder(
                a.n_genes,
                a.hidden,
                ns + npv,
                a.expression_likelihood,
                a.norm_total,
                a.dropout,
                a.expression_norm,
                a.n_batches,
            )
            if a.n_genes > 0
            else None
        )
        # linear head on the shared means: rows with a known label teach both
        # encoders what separates the classes (vae.losses: classify term)
        self.classifier = nn.Linear(ns, a.n_classes) if a.n_classes > 0 else None
        self.maturation = MaturationHead(a.maturation_ranks) if a.maturation_ranks else None
        self.lobe_head = LobeHead(ns + npv) if a.lobe_head else None
        self.size_head = SizeHead(ns + npv) if a.size_head else None
        # one learned pixel scale (σ-VAE style); fixed at 1 for plain MSE
        self.image_log_scale = nn.Parameter(
            torch.tensor(-2.0), requires_grad=a.image_likelihood != "mse"
        )

    # ------------------------------------------------------------------ layout
    @property
    def n_latent(self) -> int:
        return self.args.n_latent

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ns = self.args.n_shared
        return t[:, :ns], t[:, ns:]

    def _full(self, shared: Gaussian, private: Gaussian | None, modality: str) -> Gaussian:
        """Place shared + one modality's private block into the full layout (B, d).

        The other modality's private block gets the prior N(0, 1).
        """
        npv = self.args.n_private
        if npv == 0:
            return shared
        mu_s, lv_s = shared
        zeros = torch.zeros(mu_s.shape[0], npv, device=mu_s.device, dtype=mu_s.dtype)
        mu_p, lv_p = private if private is not None else (zeros, zeros)
        if modality == "image":
            return torch.cat([mu_s, mu_p, zeros], 1), torch.cat([lv_s, lv_p, zeros], 1)
        return torch.cat([mu_s, zeros, mu_p], 1), torch.cat([lv_s, zeros, lv_p], 1)

    def image_part(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, n_shared + n_private): what the image decoder reads."""
        a = self.args
        return z[:, : a.n_shared + a.n_private]

    def expression_part(self, z: torch.Tensor) -> torch.Tensor:
        a = self.args
        if a.n_private == 0:
            return z
        return torch.cat([z[:, : a.n_shared], z[:, a.n_shared + a.n_private :]], 1)

    # -------------------------------------------------------------------- loss
    def loss(
        self,
        out: ForwardOutput,
        batch,
        *,
        beta: float,
        capacity: float = 0.0,
        weights=None,
        image_likelihood: str | None = None,
        n_shared: int | None = None,
        view_codes: torch.Tensor | None = None,
    ):
        """All loss terms of one batch, named (:class:`vae.losses.LossTerms`).

        The loss lives with the module, as scvi-tools' ``LossOutput`` does: the trainer
        passes the KL weight and capacity of the step and the term weights, the batch
        (:class:`vae.data.Batch`) gives every target, and the model what it knows of
        itself (its shared dims, its size standardisation).

        Parameters
        ----------
        out : this model's ``forward`` on ``batch``
        batch : vae.data.Batch
        beta, capacity : KL weight and Burgess capacity (nats) of the step
        weights : vae.losses.LossWeights (None: the defaults)
        image_likelihood : ``mse`` | ``gaussian`` | ``laplace`` (:func:`vae.losses.image_nll`;
            None: the model's own, ``args.image_likelihood``)
        n_shared : shared dims used for alignment (None: the model's ``n_shared``)
        view_codes : (N, n_shared + n_private) image means of a second view of the N
            rows with an image (the view-contrast term), or None

        Returns
        -------
        vae.losses.LossTerms; ``.total`` is the scalar to minimise
        """
        from vae.losses import LossWeights, vae_loss  # losses imports this module

        w = weights if weights is not None else LossWeights()
        size_target = None
        if w.size > 0 and batch.image is not None:
            size_target = self.size_target(batch.diameter, batch.x.shape[0], batch.x.device)
        return vae_loss(
            out,
            batch.image,
            batch.mask,
            batch.x,
            batch.counts,
            batch.library,
            beta=beta,
            capacity=capacity,
            weights=w,
            image_likelihood=image_likelihood or self.args.image_likelihood,
            n_shared=self.args.n_shared if n_shared is None else n_shared,
            labels=batch.labels,
            granules=batch.granules,
            granule_od=batch.granule_od,
            nucleus=batch.nucleus,
            log_factorial=batch.log_factorial,
            lobes=batch.lobes,
            view_codes=view_codes,
            size_target=size_target,
        )

    # -------------------------------------------------------------------- size
    def size_target(self, diameter: torch.Tensor | None, b: int, device) -> torch.Tensor:
        """(B,) standardised log diameter, NaN where unknown (``diameter`` None: all).

        ``diameter``: (B,) px on the detector's working frame, NaN / <= 0 unknown.
        """
        if diameter is None:
            return torch.full((b,), float("nan"), device=device)
        d = diameter.to(device=device, dtype=torch.float32)
        ok = torch.isfinite(d) & (d > 0)
        z = (torch.log(d.clamp_min(1e-6)) - self.args.size_log_mean) / self.args.size_log_sd
        return torch.where(ok, z, torch.full_like(z, float("nan")))

    def size_features(self, diameter: torch.Tensor | None, b: int, device) -> torch.Tensor:
        """(B, 2) what the image expert reads of the size: [standardised log diameter,
        1] where known, [0, 0] where not (the code then says what the pixels say)."""
        z = self.size_target(diameter, b, device)
        known = torch.isfinite(z)
        return torch.stack([torch.where(known, z, torch.zeros_like(z)), known.float()], 1)

    def diameter_px(self, size: torch.Tensor) -> torch.Tensor:
        """Decoded size (:attr:`Decoded.size`) -> diameter, px of the working frame."""
        return torch.exp(self.args.size_log_mean + self.args.size_log_sd * size)

    def image_means(
        self, image: torch.Tensor, mask: torch.Tensor, diameter: torch.Tensor | None = None
    ) -> Gaussian:
        """The image expert of every row (one view), (B, n_shared + n_private) each."""
        return self.image_encoder(*self._image_inputs(image, mask, diameter))

    def _image_inputs(
        self, image: torch.Tensor, mask: torch.Tensor, diameter: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """What the image expert reads: the crop, its mask and, for a model with a size
        head, the size features (rows and views carry them alike)."""
        tensors = [image, mask.to(image.dtype)]
        if self.size_head is not None:
            feats = self.size_features(diameter, image.shape[0], image.device)
            tensors.append(feats.to(image.dtype))
        return tensors

    # --------------------------------------------------------------- inference
    def encode(
        self,
        image: torch.Tensor | None = None,
        expression: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        has_expression: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        log_library: torch.Tensor | None = None,
        views: int = 1,
        diameter: torch.Tensor | None = None,
    ) -> Posteriors:
        """Posteriors of the modalities given, fused over those present per row.

        Parameters
        ----------
        image : (B, 3, S, S) float in [0, 1], or None
        expression : (B, G) log-normalised, or None
        has_image, has_expression : (B,) bool, optional
            Which rows hold each modality; default: all rows when the tensor
            is given, none otherwise.
        mask : (B, 1, S, S) or (B, S, S), optional
            Cell mask; default: the whole crop (all ones).
        log_library : (B,) or (B, 1), optional
            log(total counts) covariate; default 0 (unknown).
        views : int
            1: the image expert of the crop as given (training). 8: its mean over
            the 8 symmetries of the square (:func:`dihedral_mean`), a pose-free
            code for reported latents (``args.encode_views``).
        diameter : (B,) float, optional
            The cells' diameters on the detector's working frame, px (NaN: unknown);
            read by a model with a size head only. Default: unknown.

        Returns
        -------
        Posteriors
            ``joint``: PoE (or MoE moment match) of the present experts and
            the prior; unimodal posteriors in the full latent layout.
        """
        if self.expression_encoder is None:
            expression = None  # a model without genes: (B, 0) carries nothing
        if image is None and expression is None:
            raise ValueError("encode needs image and/or expression")
        ref = image if image is not None else expression
        b, dev = ref.shape[0], ref.device
        no = torch.zeros(b, dtype=torch.bool, device=dev)
        if has_image is None:
            has_image = ~no if image is not None else no
        if has_expression is None:
            has_expression = ~no if expression is not None else no
        if image is None:
            has_image = no
        if expression is None:
            has_expression = no
        has_image, has_expression = has_image.to(dev).bool(), has_expression.to(dev).bool()

        post_img = post_expr = None
        experts, present = [], []
        if image is not None:
            if mask is None:
                mask = torch.ones_like(image[:, :1])
            elif mask.dim() == 3:
                mask = mask.unsqueeze(1)  # (B, S, S) -> (B, 1, S, S)
            # the CNN runs on the rows that hold an image only; the others get
            # N(0, 1) placeholders that no loss term and no fusion reads
            if views not in ENCODE_VIEWS:
                raise ValueError(f"views={views}; valid: {ENCODE_VIEWS}")
            tensors = self._image_inputs(image, mask, diameter)
            enc = self.image_encoder
            if views != 1:
                enc = functools.partial(dihedral_mean, enc)
            mu, lv = _rows_only(enc, has_image, *tensors)
            sh = (mu[:, : self.args.n_shared], lv[:, : self.args.n_shared])
            pv = (mu[:, self.args.n_shared :], lv[:, self.args.n_shared :])
            post_img = self._full(sh, pv, "image")
            experts.append(sh)
            present.append(has_image)
        if expression is not None:
            mu, lv = self.expression_encoder(expression, log_library)
            sh = (mu[:, : self.args.n_shared], lv[:, : self.args.n_shared])
            pv = (mu[:, self.args.n_shared :], lv[:, self.args.n_shared :])
            post_expr = self._full(sh, pv, "expression")
            experts.append(sh)
            present.append(has_expression)

        fuse = poe if self.args.fusion == "poe" else moe_mean
        shared = fuse(experts, present)
        joint = shared
        npv = self.args.n_private
        if npv:
            zeros = torch.zeros(b, npv, device=dev, dtype=shared[0].dtype)

            def private(post: Gaussian | None, sl: slice, m: torch.Tensor) -> Gaussian:
                if post is None:
                    return zeros, zeros
                keep = m.view(-1, 1)
                return (
                    torch.where(keep, post[0][:, sl], zeros),
                    torch.where(keep, post[1][:, sl], zeros),
                )

            ns = self.args.n_shared
            pi = private(post_img, slice(ns, ns + npv), has_image)
            pe = private(post_expr, slice(ns + npv, ns + 2 * npv), has_expression)
            joint = (
                torch.cat([shared[0], pi[0], pe[0]], 1),
                torch.cat([shared[1], pi[1], pe[1]], 1),
            )
        return Posteriors(joint, post_img, post_expr, has_image, has_expression)

    # -------------------------------------------------------------- generative
    def decode(
        self,
        z: torch.Tensor,
        image_rows: torch.Tensor | None = None,
        render: bool = False,
        seed: int = 0,
        use_image: bool = True,
        use_expression: bool = True,
        batch: torch.Tensor | None = None,
        image_batch: torch.Tensor | None = None,
    ) -> Decoded:
        """Decode latent codes.

        Parameters
        ----------
        z : (B, d)
        image_rows : (B,) bool, optional
            Rows whose image is needed; the image decoder runs on these only and
            the other rows get zeros (training: rows without an image score
            nothing). Default: all rows.
        render : bool
            Draw the decoded cell as a user sees it: with a nucleus layer the
            nucleus is painted through its sharpened mask (:func:`compose_nucleus`,
            crisp outline and necks), with a granule head granules are drawn from
            the decoded rate map (:func:`render_granules`, seeded by ``seed``);
            ``image_mean`` keeps the mean. For figures and measurements of decoded
            cells; the loss always sees the mean.
        use_image : bool
            False skips the image decoder (``image``, ``mask`` None).
        use_expression : bool
            False skips the expression decoder (``expression_log`` None). A model
            without genes always returns an empty (B, 0) ``expression_log``.
        batch : (B,) int64, optional
            Expression batch code of each row (``args.batch_names``; -1 unknown) for a
            model with a batch covariate; default (None): every row the average of the
            batches. Ignored by a model without one.
        image_batch : (B,) int64, optional
            Image source code of each row (``args.image_batch_names``; -1 unknown) for
            a model with an image source covariate; default (None): every row drawn in
            the average of the sources. Ignored by a model without one.

        Returns
        -------
        Decoded
            ``image`` (B, 3, S, S) in [0, 1], ``mask`` (B, 1, S, S) probability
            or None, ``expression_log`` (B, G) log1p-normalised prediction and
            the likelihood parameters.
        """
        zi = self.image_part(z)
        lobes_in = zi  # the lobe and size heads read the code alone: a cell's, not a source's
        k = self.args.n_image_batches
        if k and use_image:
            zi = torch.cat([zi, batch_onehot(image_batch, k, zi.shape[0], zi)], dim=1)
        rate = od = nuc_logits = nuc_colour = cyto = None
        tex: tuple[torch.Tensor | None, ...] = (None,) * 6
        if not use_image:
            img = mask_logits = None
        elif image_rows is None:
            img, mask_logits, rate, od, nuc_logits, nuc_colour, cyto, *tex = self.image_decoder(zi)
        else:
            img, mask_logits, rate, od, nuc_logits, nuc_colour, cyto, *tex = _rows_only(
                self.image_decoder, image_rows, zi
            )
        mask = torch.sigmoid(mask_logits) if mask_logits is not None else None
        lobes = self.lobe_head(lobes_in) if self.lobe_head is not None and use_image else None
        size = self.size_head(lobes_in) if self.size_head is not None and use_image else None
        mean = None
        if render and (rate is not None or nuc_logits is not None or tex[0] is not None):
            mean = img
            cell, cell_holes = mask, None
            if mask is not None:
                # a cell mask that dips under 0.5 inside the cell (an extrapolated code:
                # the real chain's GMP end) is drawn filled by every figure
                # (vae.analysis.traverse.cell_masks), in the decoder's background grey:
                # the hole is drawn as cell, its colour the cytoplasm's around it, with
                # grain and granules (nucleus_holes: the pixels a mask encloses, by
                # cell_masks' rule, so the holes drawn are those the figures fill)
                cell_holes = nucleus_holes(mask, diagonal_gaps=False)
                cell = torch.maximum(mask, cell_holes)
            # what is drawn (Decoded keeps the decoder's own maps)
            amp, direction, drawn_rate = tex[0], tex[2], rate
            coarse, coarse_dir = tex[3], tex[5]
            if nuc_logits is not None:
                sharp, drawn = NUCLEUS_RENDER_SHARPNESS, nuc_logits
                # what shows through the nucleus: the cytoplasm layer there was never a
                # target (nucleus pixels in the inputs), so a ring's hole and the lobe
                # cuts take the cytoplasm colour around them (a ring drew a white dot)
                holes = nucleus_holes(torch.sigmoid(sharp * nuc_logits), cell)
                if lobes is not None:  # the nucleus cut into the count the head gives
                    drawn, cut = carve_lobes(nuc_logits, lobe_count(lobes), sharp)
                    holes = torch.maximum(holes, cut)
                if cell_holes is not None:
                    holes = torch.maximum(holes, cell_holes)
                # ... and the cytoplasm's grain and granules: where the nucleus was, the
                # layers decode the chromatin's (at the real chain's GMP end 1.65x the
                # grain amplitude, 2.3x the granule rate of the cytoplasm beside the cuts:
                # docs/vae.md), which drew cuts and holes as pale speckled cracks; filled
                # by the same rule, in one pass
                layers = [cyto] + ([amp, direction] if amp is not None else [])
                layers += [coarse, coarse_dir] if coarse is not None else []
                layers += [rate] if rate is not None else []
                filled = fill_cuts(torch.cat(layers, 1), holes, torch.sigmoid(sharp * drawn), cell)
                under = filled[:, :3]
                if amp is not None:
                    amp = filled[:, 3:4]
                    direction = F.normalize(filled[:, 4:7], dim=1, eps=1e-6)
                if coarse is not None:
                    coarse = filled[:, 7:8]
                    coarse_dir = F.normalize(filled[:, 8:11], dim=1, eps=1e-6)
                if rate is not None:
                    drawn_rate = filled[:, -1:]
                img = compose_nucleus(under, nuc_colour, drawn, sharp)
                # coarse grain in the cytoplasm only: drawn blobs at random places in a
                # nucleus read as lobes and valleys the cell does not have (real chain,
                # one model: drawn vs input lobes 0.649 with them there, 0.767 without;
                # SSIM 0.597 / 0.621: docs/vae.md, "Grain in two bands"); the nucleus
                # keeps one fine grain of both bands' strength
                coarse_where = 1.0 - torch.sigmoid(sharp * drawn)
            else:
                coarse_where = None
            if amp is not None:
                img = render_texture(
                    img, amp, direction, cell, seed, coarse, coarse_dir, coarse_where
                )
            if drawn_rate is not None:
                img = render_granules(img, drawn_rate, od, cell, seed)
        if self.expression_decoder is None:
            expr = {"expression_log": z.new_zeros(z.shape[0], 0)}
        elif not use_expression:
            expr = {"expression_log": None}
        else:
            expr = self.expression_decoder(self.expression_part(z), batch)
        return Decoded(
            image=img,
            mask=mask,
            mask_logits=mask_logits,
            image_log_scale=self.image_log_scale.clamp(-4.6, 2.0),
            granule_rate=rate,
            granule_od=od,
            image_mean=mean,
            nucleus_logits=nuc_logits,
            nucleus_colour=nuc_colour,
            cytoplasm=cyto,
            lobe_logits=lobes,
            size=size,
            texture_amp=tex[0],
            texture_floor=tex[1],
            texture_dir=tex[2],
            texture_amp_coarse=tex[3],
            texture_floor_coarse=tex[4],
            texture_dir_coarse=tex[5],
            **expr,
        )

    # ---------------------------------------------------------------- training
    def forward(
        self,
        image: torch.Tensor | None,
        mask: torch.Tensor | None,
        expression: torch.Tensor,
        has_image: torch.Tensor,
        has_expression: torch.Tensor,
        log_library: torch.Tensor | None = None,
        use_image: bool = True,
        use_expression: bool = True,
        diameter: torch.Tensor | None = None,
        batch: torch.Tensor | None = None,
        image_batch: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """Encode, sample and decode everything the training loss needs.

        The CNNs run only on the rows that need them: the image encoder on rows
        with an image, the fused and image-only decodes' images on rows with an
        image, the expression-only decode's image on paired rows (the only rows
        a cross-modal image term scores). A batch without any image still calls
        them on an empty sub-batch, so every parameter is in the graph (DDP
        needs no ``find_unused_parameters``).

        ``use_image=False`` (the trainer's choice when no row of the whole data set
        has an image, its image parameters frozen) skips the image branch
        entirely: the same loss values, none of the CNN work. ``use_expression=False``
        (no row has expression, or a model with 0 genes) skips the expression branch
        the same way.

        Parameters
        ----------
        image : (B, 3, S, S) float in [0, 1] (zeros where absent)
        mask : (B, 1, S, S) float {0, 1}
        expression : (B, G) log-normalised (zeros where absent)
        has_image, has_expression : (B,) bool
        log_library : (B,) optional
        diameter : (B,) optional, the cells' diameters (see :meth:`encode`)
        batch : (B,) int64 optional, expression batch codes (see :meth:`decode`)
        image_batch : (B,) int64 optional, image source codes (see :meth:`decode`)
        """
        if self.expression_encoder is None:
            use_expression = False
        if not use_expression and not use_image:
            raise ValueError("forward needs the image or the expression branch")
        if not use_expression:
            post = self.encode(image, None, has_image, None, mask, None, diameter=diameter)
            poe = self.args.fusion == "poe"
            z = reparameterize(post.joint if poe else post.image)
            dec = self.decode(z, post.has_image, use_expression=False, image_batch=image_batch)
            # PoE: the fused decode only (no paired row for the unimodal / cross-modal
            # terms); MoE: the image component (the first draw of the full path too)
            return ForwardOutput(
                post,
                dec if poe else None,
                None if poe else dec,
                None,
                self.classifier,
                self.maturation,
            )
        if not use_image:
            post = self.encode(None, expression, None, has_expression, None, log_library)
            poe = self.args.fusion == "poe"
            if not poe:  # the draw the image component would take: same stream after it
                torch.randn_like(post.joint[0])
            z = reparameterize(post.joint if poe else post.expression)
            dec = self.decode(z, use_image=False, batch=batch)
            # PoE: the fused decode is all there is (no paired row for the unimodal /
            # cross-modal terms); MoE: the expression component
            return ForwardOutput(
                post,
                dec if poe else None,
                None,
                None if poe else dec,
                self.classifier,
                self.maturation,
            )
        post = self.encode(
            image, expression, has_image, has_expression, mask, log_library, diameter=diameter
        )
        hi, paired = post.has_image, post.has_image & post.has_expression
        ib = image_batch
        if self.args.fusion == "poe":
            joint = self.decode(reparameterize(post.joint), hi, batch=batch, image_batch=ib)
        else:
            joint = None
        from_img = self.decode(reparameterize(post.image), hi, batch=batch, image_batch=ib)
        # the image drawn from a profile is scored against its row's crop: that crop's source
        from_expr = self.decode(
            reparameterize(post.expression), paired, batch=batch, image_batch=ib
        )
        return ForwardOutput(post, joint, from_img, from_expr, self.classifier, self.maturation)


NUCLEUS_CHANNELS = 4  # nucleus layer: one mask logit + RGB
# drawn cells: the nucleus mask is sigmoid(this x logit), an edge about 1 px wide, so
# the outline and the necks between lobes are as crisp as the input's
NUCLEUS_RENDER_SHARPNESS = 8.0


def compose_nucleus(
    cytoplasm: torch.Tensor,
    nucleus: torch.Tensor,
    logits: torch.Tensor,
    sharpness: float = 1.0,
) -> torch.Tensor:
    """Paint the nucleus layer over the cytoplasm layer through the nucleus mask.

    ``cytoplasm + m * (nucleus - cytoplasm)`` with ``m = sigmoid(sharpness * logits)``.
    In training (``sharpness`` 1) ``m`` is the Bernoulli probability the nucleus
    term scores, taken as a constant here (detached): the image likelihood fits the
    two colour layers, and only the nucleus term (a cross-entropy, which keeps a
    confident, sharp outline) moves the mask; a pixel likelihood on the mask would
    blur it towards the average of the shapes the code cannot tell apart, as it
    blurs a one-layer decoder's nucleus. Drawn cells use a sharp ``m``
    (``NUCLEUS_RENDER_SHARPNESS``), so the outline and the necks between lobes
    are crisp where the mask crosses 0.5.

    Parameters
    ----------
    cytoplasm, nucleus : (B, 3, S, S) colour layers in [0, 1]
    logits : (B, 1, S, S) nucleus-mask logits
    sharpness : gain on the logits (1: the trained probability)

    Returns
    -------
    (B, 3, S, S) image in [0, 1]
    """
    m = torch.sigmoid(sharpness * logits.detach())
    return cytoplasm + m * (nucleus - cytoplasm)


TEXTURE_CHANNELS = 5  # texture layer: log grain sd, log floor sd, grain colour (3)


def _texture_maps(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The texture layer's raw channels of one band (B, TEXTURE_CHANNELS, S, S) -> grain
    sd, floor sd (B, 1, S, S), optical density, and unit colour direction (B, 3, S, S)."""
    amp = torch.exp(t[:, :1].clamp(-7.0, 1.0))  # sd of the grain, optical density
    floor = torch.exp(t[:, 1:2].clamp(-7.0, 1.0))
    # stain absorbs: the grain's colour has no negative optical density (a free sign drew
    # light, colour-fringed dots on 40 % of real cells' pixels)
    return amp, floor, F.normalize(F.softplus(t[:, 2:5]), dim=1, eps=1e-6)


TEXTURE_GRAIN_SIGMA = 0.8  # px: the drawn grain's blobs (a granule at 64 px is 1-3 px)


@functools.lru_cache(maxsize=8)
def texture_field(side: int, seed: int = 0) -> torch.Tensor:
    """Fixed grain the texture layer draws from, (side, side), mean 0, variance 1.

    Seeded white noise blurred to grain size (``TEXTURE_GRAIN_SIGMA``), minus its local
    mean at the scale the loss measures detail (:func:`vae.losses.texture_detail`); then
    its positive part, re-centred and scaled to unit variance: dense spots on an even,
    slightly lighter ground, as granules sit on cytoplasm (the symmetric noise drew as many
    light spots as dark ones, which read as a colour-fringed mottle, not as granules:
    docs/vae.md, "Texture layer"). One field per seed serves every code, so along a
    latent path the grain strengthens and fades in place.
    """
    from scipy import ndimage as ndi

    from vae.losses import TEXTURE_SIGMA

    rng = np.random.default_rng(int(seed) + 7919)
    n = ndi.gaussian_filter(rng.standard_normal((side, side)), TEXTURE_GRAIN_SIGMA, mode="wrap")
    n = np.maximum(n - ndi.gaussian_filter(n, TEXTURE_SIGMA, mode="wrap"), 0.0)
    n = (n - n.mean()) / n.std()
    return torch.from_numpy(n.astype(np.float32))


def render_texture(
    image: torch.Tensor,
    amp: torch.Tensor,
    direction: torch.Tensor,
    mask: torch.Tensor | None = None,
    seed: int = 0,
    amp_coarse: torch.Tensor | None = None,
    direction_coarse: torch.Tensor | None = None,
    coarse_where: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw the stain's grain on decoded images.

    The optical density gains ``amp * direction * n`` (``n`` the grain of
    :func:`texture_field`), so the drawn detail has the standard deviation and colour
    the texture layer decoded, as its loss measures it on the input; Beer-Lambert:
    ``image * exp(-added OD)``. The layer's isotropic floor (sensor and compression
    noise of the inputs) is scored but not drawn. With ``mask``, only inside the cell
    minus its outer rim (where the loss scores).

    With ``amp_coarse`` and ``direction_coarse`` (two-band layer) ``amp`` and
    ``amp_coarse`` are the standard deviations of the fine and the coarse band of the
    detail (:func:`vae.losses.texture_bands`); the optical density then gains
    ``alpha n direction + gamma n_c direction_coarse``, the fine field and a coarse one
    (:func:`texture_field_coarse`) in each band's colour, whose weights solve, pixel by
    pixel, for the two bands' decoded standard deviations as the same band split
    measures them on the two fields (:func:`texture_field_bands`): a cell decoded with
    coarse granules is drawn with blobs of their size and colour. ``coarse_where``
    (B, 1, S, S) in [0, 1] limits that to where it is 1 (decode: the cytoplasm, outside
    the drawn nucleus); elsewhere both bands' strength is drawn as one fine grain in the
    fine band's colour, as a one-band layer draws it.

    Parameters
    ----------
    image : (B, 3, S, S) in [0, 1]
    amp : (B, 1, S, S) > 0
    direction : (B, 3, S, S) unit vectors
    mask : (B, 1, S, S) cell probability, optional
    seed : int
    amp_coarse : (B, 1, S, S) > 0, optional
    direction_coarse : (B, 3, S, S) unit vectors, optional (default ``direction``)
    coarse_where : (B, 1, S, S) in [0, 1], optional (default: everywhere)

    Returns
    -------
    (B, 3, S, S) in [0, 1]
    """
    from vae.losses import texture_region

    s = image.shape[-1]
    n = texture_field(s, int(seed)).to(image.device, image.dtype)
    if amp_coarse is None:
        od = amp * direction * n  # as before two bands existed, to the bit
    else:
        n_c = texture_field_coarse(s, int(seed)).to(image.device, image.dtype)
        (ff, fc), (cf, cc) = texture_field_bands(s, int(seed))
        # alpha^2 ff^2 + gamma^2 cf^2 = amp^2 and alpha^2 fc^2 + gamma^2 cc^2 = coarse^2;
        # a band the other field's share already exceeds gets no field of its own
        det = ff**2 * cc**2 - cf**2 * fc**2
        a2, c2 = amp.pow(2), amp_coarse.pow(2)
        alpha2 = ((a2 * cc**2 - c2 * cf**2) / det).clamp_min(0.0)
        gamma2 = ((c2 * ff**2 - a2 * fc**2) / det).clamp_min(0.0)
        alpha2 = torch.where(gamma2 > 0, alpha2, a2 / ff**2)
        gamma2 = torch.where(alpha2 > 0, gamma2, c2 / cc**2)
        coarse_dir = direction if direction_coarse is None else direction_coarse
        od = alpha2.sqrt() * n * direction + gamma2.sqrt() * n_c * coarse_dir
        if coarse_where is not None:
            one = (a2 + c2).sqrt() * n * direction
            od = coarse_where * od + (1.0 - coarse_where) * one
    if mask is not None:
        od = od * texture_region((mask > 0.5).to(image.dtype))
    return (image * torch.exp(-od)).clamp(0.0, 1.0)


TEXTURE_COARSE_GRAIN_SIGMA = 2.0  # px: the coarse field's blobs (granules 2-4 px across)


@functools.lru_cache(maxsize=8)
def texture_field_coarse(side: int, seed: int = 0) -> torch.Tensor:
    """Coarse grain of the two-band texture layer, (side, side), mean 0, variance 1.

    White noise blurred to ``TEXTURE_COARSE_GRAIN_SIGMA``, minus its local mean at twice
    that: dense spots 2-4 px across on an even ground. Rectified by a softplus, not by
    the fine field's positive part: a hard kink puts fine detail on every blob's edge,
    and the coarse field's fine band is the least fine grain a coarse-grained cell can
    be drawn with (fine over coarse band 0.55 vs 0.67 with the kink, at 64 px). Its own
    stream, independent of the fine field.
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(int(seed) + 7920)
    sig = TEXTURE_COARSE_GRAIN_SIGMA
    n = ndi.gaussian_filter(rng.standard_normal((side, side)), sig, mode="wrap")
    n = n - ndi.gaussian_filter(n, 2 * sig, mode="wrap")
    n = np.logaddexp(0.0, 2.0 * n / n.std()) / 2.0  # softplus at a temperature of 0.5 sd
    n = (n - n.mean()) / n.std()
    return torch.from_numpy(n.astype(np.float32))


@functools.lru_cache(maxsize=8)
def texture_field_bands(side: int, seed: int = 0) -> tuple[tuple[float, float], ...]:
    """Standard deviation of the fine and coarse band of each drawn field's detail.

    ``((fine field: fine band, coarse band), (coarse field: fine band, coarse band))``,
    each field drawn as a faint grain (0.05 optical density, where ``exp`` is linear)
    over a whole square and measured by the loss's own operators
    (:func:`vae.losses.texture_detail`, :func:`vae.losses.texture_bands`), per unit of
    the field's weight: what :func:`render_texture` solves the two weights with.
    """
    from vae.losses import texture_bands, texture_detail

    ones = torch.ones(1, 1, side, side)
    out = []
    for n in (texture_field(side, seed), texture_field_coarse(side, seed)):
        img = torch.exp(-0.05 * n)[None, None].expand(1, 3, side, side)
        fine, coarse = texture_bands(texture_detail(img, ones), ones)
        # per channel: the three channels carry the same field
        out.append(tuple(float(b[:, :1].pow(2).mean().sqrt()) / 0.05 for b in (fine, coarse)))
    return tuple(out)


GRANULE_DOT_SIGMA = 0.8  # px: a rendered granule is a Gaussian dot of this width
GRANULE_FIELD_TILE = 64  # px: larger fields are tiles of this size


@functools.lru_cache(maxsize=1)
def granule_dot_gain() -> float:
    """Peak optical density of a drawn dot per unit of the decoded granule density.

    A drawn dot is narrower than the granules of the input crops, and the granule
    counter of the analyses (:mod:`vae.analysis.granules`: white top-hat, then a
    Gaussian matched to an input granule, then a contrast threshold) reads a dot of
    peak ``od`` at about half of ``od``: decoded cells whose granules the layer
    decoded at the input's density and contrast read as cells with few or none
    (measured: docs/vae.md, "Nucleus layer"). The dot is scaled so that the
    counter reads one drawn granule at the density the layer decoded. A constant of
    the dot and of the counter's settings (computed with the counter's own
    functions on one dot), not fitted to any data.
    """
    from skimage.filters import gaussian

    from vae.analysis.granules import GranuleParams, granule_contrast

    p = GranuleParams()
    s, c, r = 33, 16, 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    k1 = np.exp(-(x**2) / (2 * GRANULE_DOT_SIGMA**2))
    dot = np.zeros((s, s))
    dot[c - r : c + r + 1, c - r : c + r + 1] = k1[:, None] * k1[None, :]
    od = 0.1  # a faint dot, where optical density is linear in it
    img = 0.8 * np.exp(-od * dot)[..., None] * np.array([1.0, 1.0, 1.0])
    img[..., 0] = 0.8  # the granule channel is green minus the red the nucleus holds
    resp = granule_contrast(img, np.ones((s, s), bool), None, p.radius_px)
    if p.smooth_sigma > 0:
        resp = gaussian(resp, p.smooth_sigma)
    return float(od / resp[c, c])


@functools.lru_cache(maxsize=8)
def granule_field(side: int, seed: int = 0) -> torch.Tensor:
    """Even ("blue-noise") threshold field of shape (side, side), values in (0, 1).

    Pixels are ranked by greedy farthest-point sampling with a seeded random
    preference (each next pixel is the one farthest from all earlier ones,
    distances scaled by 1 + 0.5 u), and a pixel's value is its rank / side^2.
    Thresholding at p keeps about p x area pixels of any region, spread
    evenly: a white-noise field would give Poisson scatter (an expected 5
    granules would read as anything from 1 to 10) and clumps that a blob
    detector merges.
    """
    if side > GRANULE_FIELD_TILE:
        # farthest-point ranking is O(side^4): tile seeded 64 px fields instead
        n = -(-side // GRANULE_FIELD_TILE)
        rows = [
            torch.cat(
                [granule_field(GRANULE_FIELD_TILE, seed * 1009 + i * n + j + 1) for j in range(n)],
                1,
            )
            for i in range(n)
        ]
        return torch.cat(rows, 0)[:side, :side].contiguous()
    rng = np.random.default_rng(int(seed))
    yy, xx = np.mgrid[:side, :side]
    pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)  # (N, 2)
    pref = 1.0 + 0.5 * rng.random(len(pts))
    rank = np.empty(len(pts), dtype=np.int64)
    d2 = np.full(len(pts), np.inf)
    j = int(rng.integers(len(pts)))
    for r in range(len(pts)):
        rank[j] = r
        d2 = np.minimum(d2, ((pts - pts[j]) ** 2).sum(1))
        d2[j] = -1.0
        j = int(np.argmax(d2 * pref))
    return torch.from_numpy(((rank + 0.5) / len(pts)).reshape(side, side).astype(np.float32))


def render_granules(
    image: torch.Tensor,
    rate: torch.Tensor,
    od: torch.Tensor,
    mask: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Draw granules on decoded mean images.

    A pixel holds a granule centre where the even threshold field of
    :func:`granule_field` (one field per ``seed``, shared by every row) is
    below ``rate / 100``: a region holds about as many granules as the decoded
    rate (per 100 px^2) says, spread evenly, and along a latent path granules
    appear and disappear in place as the rate changes. Each centre is a
    Gaussian dot (``GRANULE_DOT_SIGMA``, peak :func:`granule_dot_gain`, so a drawn
    granule has the contrast the layer decoded, as the loss measures it) whose stain adds to the
    cell's (Beer-Lambert: optical densities add), so a granule keeps its
    contrast on a pale or a dark decoded cytoplasm.

    Parameters
    ----------
    image : (B, 3, S, S) mean image in [0, 1]
    rate : (B, 1, S, S) granule centres per 100 px^2
    od : (B, 3, S, S) optical density a granule adds at its centre (>= 0)
    mask : (B, 1, S, S) cell probability, optional: centres only where > 0.5
    seed : int

    Returns
    -------
    (B, 3, S, S) image in [0, 1] with granules
    """
    s = image.shape[-1]
    u = granule_field(s, int(seed)).to(image.device, image.dtype).view(1, 1, s, s)
    centres = (u < rate / 100.0).to(image.dtype)
    if mask is not None:
        centres = centres * (mask > 0.5).to(image.dtype)
    r = 2
    x = torch.arange(-r, r + 1, device=image.device, dtype=image.dtype)
    k1 = torch.exp(-(x**2) / (2 * GRANULE_DOT_SIGMA**2))  # separable, peak 1
    dots = F.conv2d(centres, k1.view(1, 1, 1, -1), padding=(0, r))
    dots = F.conv2d(dots, k1.view(1, 1, -1, 1), padding=(r, 0)).clamp(0.0, 1.0)
    return image * torch.exp(-dots * od * granule_dot_gain())


def dihedral_mean(
    encoder: nn.Module, image: torch.Tensor, mask: torch.Tensor, *extra: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's Gaussian averaged over the 8 symmetries of the square.

    A white cell has no preferred orientation on a smear, so its code should not
    have one either: the mean over rotations by 0/90/180/270 degrees and their
    mirror images removes the pose the encoder reads from one view (measured on
    the real chain: image-only kNN 0.81 -> 0.84, docs/vae.md).

    Parameters
    ----------
    encoder : callable (image, mask, *extra) -> (mu, logvar), each (B, d)
    image : (B, C, S, S)
    mask : (B, 1, S, S)
    extra : per-row inputs that have no pose (e.g. (B, 2) size features), passed as given

    Returns
    -------
    mu, logvar : (B, d)
        Mean of the 8 means and of the 8 log-variances.
    """
    mus, lvs = [], []
    for k in range(4):
        x, m = torch.rot90(image, k, (2, 3)), torch.rot90(mask, k, (2, 3))
        for flip in (False, True):
            mu, lv = encoder(x.flip(3), m.flip(3), *extra) if flip else encoder(x, m, *extra)
            mus.append(mu)
            lvs.append(lv)
    return torch.stack(mus).mean(0), torch.stack(lvs).mean(0)


def _rows_only(fn, rows: torch.Tensor, *tensors: torch.Tensor):
    """Apply ``fn`` to the ``rows`` (bool (B,)) of each tensor, scatter into zeros.

    ``fn`` returns a tuple of tensors (or None entries) with batch first; rows
    not selected come back as zeros. With every row selected, ``fn`` sees the
    whole batch unchanged (no copy). With none, ``fn`` still runs on the empty
    sub-batch (its parameters stay in the autograd graph: DDP) and the zeros are
    returned without a copy.
    """
    b = tensors[0].shape[0]
    if bool(rows.all()):
        return fn(*tensors)
    idx = rows.nonzero().flatten()
    outs = fn(*(t.index_select(0, idx) for t in tensors))

    def scatter(o: torch.Tensor | None) -> torch.Tensor | None:
        if o is None:
            return None
        full = o.new_zeros((b, *o.shape[1:]))
        # in place: the out-of-place index_copy copied each full-batch zero tensor once
        # more, 45% of a decode of 256 rows without an image (real study, 1 thread);
        # reconstruction_nll of 30k expression-only cells 4.0-5.2 s -> 1.8-2.0 s
        # (docs/performance.md, "Embedding large inputs"); the autograd graph is the
        # same (IndexCopyBackward into ``o``)
        return full.index_copy_(0, idx, o)

    return tuple(scatter(o) for o in outs)


def args_to_dict(args: VAEArgs) -> dict:
    return asdict(args)
