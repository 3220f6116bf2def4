"""Schema of the ``vae`` and ``trainer`` groups (``stage=train``).

Kept out of :mod:`pipeline.config` (which holds every other group) for file
length; ``pipeline.config.Config`` uses both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vae.inputs.schema import MATURATION_ORDER
from vae.schedules import DEFAULT_BETA


@dataclass
class VAEConfig:
    """Two-branch beta-VAE architecture and loss weights (see docs/vae.md)."""

    n_latent: int = 16  # shared latent dimensions (fused over modalities)
    # private dims per modality: what one modality shows and the other cannot predict
    # (granule texture, nucleus pose) goes there instead of into the shared block
    n_private: int = 8
    beta: float = DEFAULT_BETA  # weight of KL to the prior (final value after warm-up)
    # image branch; crops are resized to image_size when it differs (None: as stored)
    image_size: int | None = None
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 64])  # one conv per /2
    # widths of the conv image encoder when they differ from the decoder's (null: channels)
    encoder_channels: list[int] | None = None
    image_arch: str = "residual"  # residual | plain (the first design: blurred discs)
    texture_noise: bool = False  # residual decoder: learned per-pixel noise (granule texture)
    # what the image encoder sees: rgb | stain (haematoxylin/eosin optical densities,
    # colour deconvolution; docs/vae.md, "Image branch")
    image_input: str = "rgb"
    # conv (the widths in `channels`) | resnet18: a ResNet-18 trunk (crops a multiple of
    # 32 px, rgb input) that can start from image_backbone_weights
    image_encoder: str = "conv"
    # local weights for the resnet18 encoder's trunk (never downloaded): a file path (a
    # segment_train model.pt, or a torchvision resnet18 state dict), or "detector": the
    # study's own detector (paths.inputs.segmentation_model, segment_train's, or shipped).
    # Real chain, 60 epochs: image kNN 0.865 / 0.808 (seeds 0 / 1) vs conv 0.838 / 0.815,
    # 2-3x the time: not the default (docs/vae.md, "A pretrained image encoder"); null:
    # random init
    image_backbone_weights: str | None = None
    # the image expert of a reported latent (latent.h5ad, evaluate, embed) is the mean
    # over the crop's 8 symmetries (rotations x mirror): a cell on a smear has no
    # orientation. 1: the crop as given. Training always sees one augmented view;
    # reconstructions decode the single view (docs/vae.md, "Pose-free codes")
    encode_views: int = 8
    image_likelihood: str = "gaussian"  # mse | gaussian | laplace (learned scalar scale)
    predict_mask: bool = True  # decoder also predicts the cell mask (BCE)
    ssim_weight: float = 0.0  # optional (1 - SSIM) term inside the mask
    spectral_weight: float = 0.0  # masked log-amplitude spectrum L1 (granule texture)
    # granule layer (> 0 builds it; residual decoder only): how many granules, where and
    # how dark, learned from the granules found on the input crops without shaping the
    # latent; decoded cells are drawn with granules from it. Measured on the simulator:
    # decoded granule density vs true azurophilic density 0.72 at its introduction (none
    # without it), same kNN/SSIM as without; 0.738 in `make demo` on the corrected
    # simulator of 2026-12-04 (docs/vae.md, "Granule layer"); 0: off
    granule_weight: float = 10.0
    # texture layer (> 0 builds it; residual decoder only): per pixel, how strong the
    # stain's fine grain is (granules, chromatin) and its colour, learned as a Gaussian
    # likelihood of the input's detail finer than 1.5 px without shaping the latent;
    # decoded cells are drawn with that grain (docs/vae.md, "Texture layer"); 0: off
    texture_weight: float = 0.0
    # the texture layer in two bands (with texture_weight > 0): the grain finer and
    # coarser than 1 px (vae.losses.TEXTURE_COARSE_SIGMA) gets an amplitude, colour and
    # floor each, and decoded cells are drawn with 2-4 px blobs in the cytoplasm where the
    # cell's detail is coarse (granules, blotches) instead of one grain size; false: one
    # band (docs/vae.md, "Grain in two bands")
    texture_coarse: bool = False
    # the image drawn from the expression expert alone (the cross-modal term) is scored
    # on the texture layer too; false: not there (a crop's grain level is its
    # microscope's, which a profile cannot know: docs/vae.md, "Grain of cells drawn from
    # expression")
    cross_texture: bool = True
    # nucleus layer (> 0 builds it): nucleus-mask logits scored by a Bernoulli likelihood
    # against the lobe counter's nucleus of each input crop; the decoded image paints a
    # nucleus colour layer through that mask over the cytoplasm, drawn sharp in decoded
    # cells. Measured on the simulator (60 epochs): lobes on decoded cells vs truth 0.73
    # (0.50 without), same kNN; weight 10: 0.76 but kNN -0.1 to -0.2 (docs/vae.md,
    # "Nucleus layer"); 0: off
    nucleus_weight: float = 1.0
    # the nucleus term's pixels in the gaps between lobes (what a closing of the input's
    # nucleus fills: vae.losses.nucleus_gaps) count 1 + this; 0: all pixels alike
    nucleus_gap_weight: float = 0.0
    # the image likelihood composes the colour layers through the input's nucleus mask
    # (p(x | z, nucleus) p(nucleus | z)) instead of the decoded one: the cytoplasm layer no
    # longer paints a blurred nucleus around the decoded one. Demo settings, 5 seeds, 624
    # unseen cells: drawn lobes vs truth 0.71 vs 0.55 (better on 4 of 5 seeds) but image
    # kNN 0.80 vs 0.84 (lower on 4 of 5): an option until that cost is understood
    # (docs/vae.md, "Colour layers given the input's nucleus")
    nucleus_input_compose: bool = False
    # lobe layer (needs the nucleus layer): a head on the code (detached: the latent is
    # the same) gives the nucleus's lobe count, trained on the lobe counter's count of
    # each input crop; drawn cells cut the nucleus mask into that many lobes. Demo
    # settings, 5 seeds, 623 unseen cells: drawn lobes vs truth 0.85 vs 0.51 without
    # (docs/vae.md, "Lobe layer"); false: off
    lobe_head: bool = True
    # the lobe head's targets: the counter's second cut rule (a valley this deep, as a
    # share of the stain's depth, where the outline narrows to 0.9 x the half-width)
    # also cuts touching lobes. null: off (simulated bands would split); +preset=real:
    # 0.3 (pale BCCD nuclei; docs/vae.md, "Lobe targets on real crops")
    lobe_deep_valley: float | None = None
    free_bits: float = 0.0  # nats per latent dim that cost no KL (keeps dims active)
    # label cross-entropy on each expert's shared mean, rows with a known obs['label']
    # (scANVI-style semi-supervision; 0: off, and no classifier head is built)
    classify_weight: float = 200.0
    # class balance of that cross-entropy, per expert: each class weighs
    # (its training rows' share)^-classify_balance, from the train split's labelled rows
    # with a crop (image expert) or a profile (expression expert). 0: every row counts
    # once (the majority class dominates); 0.5: inverse square root; 1: every class
    # counts as much as any other (docs/vae.md, "Class balance of the label head")
    classify_balance: float = 0.0
    # noise-robust label head: generalised cross-entropy (1 - p_y^q) / q instead of the
    # cross-entropy (0: off); a crop whose label the head finds implausible (BCCD labels
    # images, not cells) pulls the code less (docs/vae.md, "Labels the head may doubt")
    classify_noise_q: float = 0.0
    # the view-contrast term's two views share each crop's stain jitter and differ in
    # pose only, so the term teaches pose, not colour, invariance (eosinophil granules
    # are a colour); false: each view draws its own jitter (docs/vae.md, "Two views")
    view_same_stain: bool = False
    # maturation axis: an ordinal head on shared dim 0 orders the rows labelled with a
    # stage of maturation_classes (0: off; no head is built, nor when fewer than two of
    # the stages are labels of the data). Costs no ELBO (a rotation of the latent)
    maturation_weight: float = 100.0
    maturation_classes: list[str] = field(default_factory=lambda: list(MATURATION_ORDER))
    # two views of each crop (SimCLR's NT-Xent between the image encoder's means of the
    # training view and a second augmented one, rows with an image; unlabelled crops
    # count as much as labelled ones); 0: off, no second view is made
    view_contrast_weight: float = 0.0
    view_temperature: float = 0.2
    # the cell's size (obs['cell_diameter'] of stage=segment's crops, which fill their
    # square whatever the cell's size): the image expert reads it beside the pixels and a
    # head on the image code predicts it back, with this weight (nats per squared
    # standardised log diameter / 2). 0: off, no size input or head (docs/vae.md)
    size_weight: float = 0.0
    # expression branch
    hidden: list[int] = field(default_factory=lambda: [128, 64])  # MLP widths
    expression_likelihood: str = "auto"  # auto | nb | zinb | gaussian (auto: nb if counts)
    library_covariate: bool = True  # feed log library size to the expression encoder
    # obs column naming each profile's batch (sequencing run, patient, site): the
    # expression decoder reads it as a one-hot, so the latent need not carry the batch
    # (scvi-tools' batch_key; the encoders never read it, so query cells of any batch
    # embed). Default: expression.batch_key; null: no covariate (docs/vae.md,
    # "Expression batches")
    batch_key: str | None = "${expression.batch_key}"
    # obs column naming each crop's source (microscope, stain, scanner; stage=pair's
    # image_source): the image decoder reads it as a one-hot, so the code need not carry
    # each microscope's colour and grain; the encoders never read it, and a code without
    # a crop is drawn in the average of the sources. null: no covariate (docs/vae.md,
    # "Image sources")
    image_batch_key: str | None = None
    late_mask: bool = False  # score observed non-zero entries only (LATE)
    # MLP dropout; null (auto): 0 for expression alone (every row a profile, no image:
    # better held-out likelihood on 5 of 5 Paul15 seeds, a cheaper step;
    # docs/performance.md), else 0.1
    dropout: float | None = None
    # hidden-layer normalisation of the expression MLPs: layer | batch | auto (batch
    # when every row has a profile and none an image, else layer; docs/vae.md)
    expression_norm: str = "auto"
    # what the expression encoder reads: lognorm (X) | counts (log1p of the counts) |
    # auto (counts when every row has a profile with counts and none an image)
    expression_input: str = "auto"
    # fusion of the unimodal posteriors
    fusion: str = "poe"  # poe (product of experts with the prior) | moe (mixture)
    # loss weights: 1 is the ELBO's own weight (image NLL summed over the scored
    # pixels). null (auto) scales each image term by n_genes / (values it scores per
    # row); measured: auto decoded blobs on real crops and faint cells on the
    # simulator, 1 + the label head decoded nuclei on both (docs/vae.md, "Image branch")
    image_weight: float | None = 1.0
    mask_weight: float | None = 1.0
    expression_weight: float = 1.0
    cross_weight: float = 1.0  # unimodal/cross-modal reconstruction on paired rows
    # auto: clip when every paired row is a same_cell pair, else class | none | clip | class
    align: str = "auto"  # clip: InfoNCE on paired rows; class: class-level InfoNCE (directions)
    align_weight: float = 20.0
    align_temperature: float = 0.1
    # squared distance per dim between each class's image- and expression-expert means
    # (labelled rows; the class InfoNCE above compares directions only); 0: off
    # (docs/vae.md, "Class centroids of the two experts")
    align_centroid_weight: float = 0.0
    # KL schedule (owned by the trainer)
    kl_warmup_epochs: float = 5.0  # linear beta warm-up from 0 (0: none)
    capacity_max: float = 0.0  # Burgess capacity C in nats (0: off)
    capacity_epochs: float = 20.0  # epochs for C to rise from 0 to capacity_max


@dataclass
class TrainerConfig:
    """Optimisation of the beta-VAE (stage=train)."""

    max_epochs: int = 60
    max_minutes: float | None = None  # stop (as a finished run) after this wall time
    # end this run after N epochs on the schedule of max_epochs (as an interruption);
    # resume=true goes on from last.pt, as segmentation.stop_after_epochs does
    stop_after_epochs: int | None = None
    batch_size: int = 64  # rows per step per process (2 processes: 2x rows per step)
    lr: float = 1e-3
    weight_decay: float = 1e-4  # AdamW
    lr_schedule: str = "cosine"  # cosine | constant (both after lr_warmup_epochs)
    lr_warmup_epochs: float = 1.0
    grad_clip: float = 10.0  # max grad norm (0: off)
    early_stopping_patience: int = 15  # epochs without val improvement (0: off)
    # the validation term that picks model.pt and counts the patience: total (the
    # objective) | neg_elbo (the fused decode's reconstruction + KL at β = 1, without the
    # cross-modal, label, alignment, maturation and view terms; docs/vae.md, "Which epoch
    # becomes model.pt")
    monitor: str = "total"
    val_fraction: float = 0.15  # split stratified by obs["label"], seeded by `seed`
    test_fraction: float = 0.15  # never used for early stopping or tuning
    # obs column whose rows stay in one split (null: split by row); stage=pair writes
    # "specimen" (the image a crop comes from) for the real chain's sources
    split_by: str | None = "specimen"
    # labels (obs["label"]) kept out of training: their rows all go to the test split
    # (held-out-kind anomaly detection, scripts/bench_anomaly.py)
    exclude_labels: list[str] = field(default_factory=list)
    # a finished train run (its folder or latent.h5ad) whose split to reuse: each crop
    # keeps its split there (matched by image_ref), each row without a crop its
    # profile's (expression_ref); a row it does not know joins its specimen's split, or
    # is split as usual among the other new rows. For comparing settings on the same
    # test cells when the paired table changes (e.g. pair.label_corrections).
    # null: the seeded stratified split
    split_from: str | None = None
    augment: bool = True  # random flips / rot90 of crops and masks, per batch
    stain_jitter: float = 0.0  # HED stain + colour jitter strength when augment (0: off)
    # any-angle rotation + zoom 1 ± rotate when augment (0: dihedral flips only);
    # a cell has no orientation (docs/vae.md, "Image branch")
    rotate: float = 0.0
    # >0: validation, model.pt and the epoch figures use a moving average of the weights
    # over about this many epochs (docs/vae.md, "Averaged weights"); 0: off
    ema_epochs: float = 0.0
    log_every_steps: int = 10  # TensorBoard scalars
    image_every_epochs: int = 1  # reconstruction grid + expression figure
    # ...drawn while they take at most this fraction of the run's time (first and last
    # epoch always; ~0.3 s each, more than a small expression-only epoch); null: no cap
    figure_budget: float | None = 0.1
    n_images: int = 8  # rows of the reconstruction grid
    projector_max_cells: int = 1000  # embedding projector at the end (0: off)
