"""Training loop of the two-branch β-VAE (typed arguments, no config objects).

Laid out as torchvision's detection reference is: :func:`train` is the one linear recipe
(rows and targets, optimizer and schedules, resume, the epoch loop with validation,
logging and checkpoints) over a per-epoch engine, :func:`train_one_epoch` (the batches:
loss, backward, clip, step).

``train(model, data, split, args, dist, out_dir)`` runs AdamW with a warm-up +
cosine learning rate, the KL schedule (β warm-up / capacity annealing),
gradient clipping, a non-finite-loss stop, early stopping on the validation
loss, and writes ``last.pt`` (every ``checkpoint_every_s`` and after the last epoch) and
``model.pt`` (best on val) with
everything needed to resume bit-exactly on CPU: optimizer, scheduler, epoch,
step, RNG states (torch, numpy, python, augmentation generator), early-stopping
state and the resolved config.

Distributed: pass the ``DistInfo`` of ``pipeline.hardware`` (``device``,
``rank``, ``world_size``, ``wrap``, ``autocast``, ``all_reduce_sum``); every
rank trains on its shard of each epoch, rank 0 writes files and TensorBoard.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmentation.progress import bar
from segmentation.provenance import code_record
from segmentation.runtime import (
    NonFiniteLossError,
    beyond_reference,
    restore_rank_rng,
    seed_everything,
)
from segmentation.runtime import rng_state as _rng_state
from vae.checkpoint import FORMAT_VERSION as CHECKPOINT_FORMAT
from vae.checkpoint import error_line, load_for_resume, resume_error, save_checkpoint
from vae.data import (
    Batch,
    PairedTensors,
    epoch_batches,
    eval_batches,
    iterate,
    raw_batch,
    to_batch,
)
from vae.flat import FlatParameters
from vae.losses import LossTerms, LossWeights, term_weights, terms_off
from vae.model import TwoBranchVAE
from vae.schedules import DEFAULT_BETA, KLSchedule, lr_lambda
from vae.tb import TBLogger

log = logging.getLogger(__name__)

# validation terms (names of vae.losses.LossTerms) that may select model.pt
MONITORS = ("total", "neg_elbo")


@dataclass
class TrainArgs:
    """Optimisation settings (see TrainerConfig / VAEConfig in pipeline/config_vae.py).

    The defaults are a short library run, not ``stage=train``'s: the pipeline's own
    (``trainer.max_epochs``, ``trainer.early_stopping_patience``, ...) are owned by
    ``pipeline/conf`` and reach this class through
    ``pipeline.train_args.build_train_args``.
    """

    max_epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    lr_warmup_epochs: float = 1.0
    grad_clip: float = 10.0
    early_stopping_patience: int = 10
    # the validation term that picks model.pt and counts the patience (one of MONITORS):
    # "total", the training objective with every weighted term; "neg_elbo", the fused
    # decode's reconstruction + KL at β=1 only, without the cross-modal and the auxiliary
    # heads' terms (label, alignment, maturation, views), whose validation values swing
    # from epoch to epoch on pairs that are not the same cell
    monitor: str = "total"
    max_minutes: float | None = None
    augment: bool = True
    stain_jitter: float = 0.0  # strength of the stain/colour jitter (vae.data.augment_stain)
    rotate: float = 0.0  # >0: any-angle rotation + zoom 1 ± rotate (vae.data.augment_rotate)
    # the view-contrast term's two views share each row's stain jitter (they differ in
    # pose only), so the term does not teach the code to ignore colour; False: drawn apart
    view_same_stain: bool = False
    # >0: validation, model.pt and the epoch figures use an exponential moving average of
    # the weights over about this many epochs (decay 1 - 1 / (ema_epochs x steps per
    # epoch)); training steps the raw weights. 0: off
    ema_epochs: float = 0.0
    seed: int = 0
    # KL schedule
    beta: float = DEFAULT_BETA
    kl_warmup_epochs: float = 5.0
    capacity_max: float = 0.0
    capacity_epochs: float = 20.0
    # loss
    weights: LossWeights = field(default_factory=LossWeights)
    image_likelihood: str = "gaussian"
    # data path
    num_workers: int = 0
    pin_memory: bool = False
    # TensorBoard
    log_every_steps: int = 10
    image_every_epochs: int = 1
    # epoch figures (reconstruction grid, expression figure; ~0.3 s of matplotlib even
    # without images, more than a small data set's epoch) are drawn while they take at
    # most this fraction of the run's time; the first and the last epoch's always.
    # None: every image_every_epochs
    figure_budget: float | None = 0.1
    n_images: int = 8
    # last.pt (and a pending model.pt) at most this often, s, and after the last epoch;
    # 0 = every epoch. An interrupted job loses at most this much training.
    checkpoint_every_s: float = 30.0
    # testing: return after this many epochs as if the job had been killed
    stop_after_epochs: int | None = None


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    best_epoch : epoch (1-based) of model.pt; best_val : its validation ``monitor`` term;
    epochs : epochs completed in total; steps : optimizer steps in total;
    stopped : ``max_epochs`` | ``early_stopping`` | ``time_limit`` | ``interrupted``;
    history : per-epoch dicts (train/val loss terms, β, C, lr, seconds);
    kl_per_dim : (d,) validation KL per latent dim at the last epoch.
    """

    best_epoch: int
    best_val: float
    epochs: int
    steps: int
    stopped: str
    history: list[dict[str, Any]]
    kl_per_dim: list[float]
    seconds: float


# the view-contrast term's second view rotates by any angle with a zoom of 1 ± this
# (vae.data.augment_rotate), at least: SimCLR's views must differ by more than flips
VIEW_ROTATE = 0.1

ACTIVE_UNIT_NATS = 0.01  # a latent dim is "active" when its mean KL exceeds this

# divergence stop: a step's loss (or an epoch's validation loss) above this many times
# the run's first-step loss, in magnitude, stops the run like a NaN. An audit ran
# trainer.lr=10 to "complete" with train losses 1e15-6e17 (normal runs: about -1900)
# and every check passing, since none was NaN. The first step's loss (data and initial
# weights only) is the reference; a normal demo run stays within a few times it.
DIVERGE_FACTOR = 1e3
# the reference's magnitude is taken as at least this (nats): a first loss near 0
# (image and expression NLLs of opposite sign) would make any loss look diverged
DIVERGE_FLOOR = 1e3
# the fused posterior's KL above this (nats per cell) is divergence whatever the total:
# during the β warm-up the KL is weighted little, and the lr=10 audit run reached
# KL 6e13 at epoch 1 (normal runs: tens to hundreds of nats)
DIVERGE_KL_NATS = 1e6


# degenerate-input warning: at load, when more than this share of the training rows
# with an image has an empty mask or a constant (blank) crop, or of those with
# expression an all-zero profile. An audit trained all-empty masks and all-zero
# crops to the same losses without a word (the image terms have nothing to learn)
DEGENERATE_SHARE = 0.5
# rows read for that check (evenly spaced; crops on disk are read by rows)
DEGENERATE_SAMPLE = 1024


def degenerate_inputs(data: PairedTensors, rows: np.ndarray) -> list[str]:
    """What most of ``rows`` hold nothing of: a line per modality, for a warning.

    Parameters
    ----------
    data : PairedTensors (in memory or on disk: read through ``index_select``)
    rows : (K,) row indices (the training rows)

    Returns
    -------
    One message per degenerate input (empty masks, blank crops, zero profiles); [].
    """
    out = []

    def sample(flags) -> torch.Tensor:
        r = rows[np.asarray(flags)[rows]]
        if r.size > DEGENERATE_SAMPLE:
            r = r[np.linspace(0, r.size - 1, DEGENERATE_SAMPLE).astype(int)]
        return torch.as_tensor(r, dtype=torch.long)

    img = sample(data.has_image.numpy() if torch.is_tensor(data.has_image) else data.has_image)
    if img.numel():
        m = data.masks.index_select(0, img).reshape(img.numel(), -1)
        c = data.crops.index_select(0, img).reshape(img.numel(), -1)
        empty = float((m.amax(1) == 0).float().mean())
        blank = float((c.amax(1) == c.amin(1)).float().mean())
        if empty > DEGENERATE_SHARE:
            out.append(f"{empty:.0%} of the training crops have an empty mask")
        if blank > DEGENERATE_SHARE:
            out.append(f"{blank:.0%} of the training crops are blank (one value)")
    hx = data.has_expression
    ex = sample(hx.numpy() if torch.is_tensor(hx) else hx)
    if ex.numel() and data.n_genes:
        x = data.x.index_select(0, ex)
        zero = float((x.abs().sum(1) == 0).float().mean())
        if zero > DEGENERATE_SHARE:
            out.append(f"{zero:.0%} of the training profiles are all zero (library 0)")
    return out


def diverged(loss: float, kl: float, ref: float | None) -> str | None:
    """Why ``loss`` / ``kl`` count as diverged against the reference loss ``ref``.

    Parameters
    ----------
    loss : a step's (or an epoch's validation) total loss
    kl : its fused-posterior KL, nats per cell
    ref : the run's first-step loss; None: only the KL rule applies

    Returns
    -------
    A reason (for the error message), or None when neither rule holds.
    """
    if kl > DIVERGE_KL_NATS:
        return f"KL {kl:.3g} nats > {DIVERGE_KL_NATS:.0e}"
    if ref is not None:
        if beyond_reference(loss, ref, DIVERGE_FACTOR, DIVERGE_FLOOR):
            return f"|loss| {abs(loss):.3g} > {DIVERGE_FACTOR:.0e} x first-step loss {ref:.4g}"
    return None


def ema_decay(ema_epochs: float, steps_per_epoch: int) -> float:
    """Per-step decay of a moving average over about ``ema_epochs`` epochs (0: off)."""
    if ema_epochs <= 0:
        return 0.0
    return 1.0 - 1.0 / max(1.0, ema_epochs * steps_per_epoch)


@contextlib.contextmanager
def averaged_weights(model: torch.nn.Module, ema: torch.optim.swa_utils.AveragedModel | None):
    """Within the block ``model`` holds the moving average's weights (in place: views such
    as :class:`vae.flat.FlatParameters` stay valid); its own come back on exit, also after
    an error. ``ema`` None: nothing changes."""
    if ema is None:
        yield model
        return
    own = [t.detach().clone() for t in model.state_dict().values()]
    with torch.no_grad():
        for t, a in zip(model.state_dict().values(), ema.module.state_dict().values()):
            t.copy_(a)
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, o in zip(model.state_dict().values(), own):
                t.copy_(o)


def active_units(kl_per_dim, threshold: float = ACTIVE_UNIT_NATS) -> int:
    """Number of latent dims whose mean KL to the prior exceeds ``threshold`` nats.

    Parameters
    ----------
    kl_per_dim : (d,) array-like, nats per dim averaged over cells
    """
    return int((np.asarray(kl_per_dim, dtype=float) > threshold).sum())


def _snapshot(obj: Any) -> Any:
    """Copy of a checkpoint payload that training cannot change: tensors cloned,
    dicts and lists rebuilt, everything else shared (``copy.deepcopy`` is ~20x slower
    on a state dict: it pickles every tensor)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _unwrap(m: torch.nn.Module) -> TwoBranchVAE:
    return m.module if hasattr(m, "module") else m


def forward_loss(
    model: torch.nn.Module,
    batch: Batch,
    *,
    beta: float,
    capacity: float,
    args: TrainArgs,
    n_shared: int,
    autocast=None,
    use_expression: bool = True,
    view: Batch | None = None,
) -> LossTerms:
    """One forward pass and all loss terms (loss in fp32 even under autocast).

    A batch made without images (``batch.image`` None) skips the image branch;
    ``use_expression=False`` (no row of the data set has expression) skips the
    expression branch. ``view``: the same rows augmented once more (the view-contrast
    term, ``args.weights.view_contrast`` > 0): its crops go through the image encoder only.
    """
    view_codes = None
    if view is not None and view.image is not None and batch.image is not None:
        rows = batch.has_image.bool().nonzero().flatten()
        with autocast() if autocast is not None else contextlib.nullcontext():
            dia = view.diameter[rows] if view.diameter is not None else None
            view_codes = _unwrap(model).image_means(view.image[rows], view.mask[rows], dia)[0]

    with autocast() if autocast is not None else contextlib.nullcontext():
        out = model(
            batch.image,
            batch.mask,
            batch.x,
            batch.has_image,
            batch.has_expression,
            batch.log_library,
            use_image=batch.image is not None,
            use_expression=use_expression,
            diameter=batch.diameter,
            batch=batch.batch,
            image_batch=batch.image_batch,
        )
    return _unwrap(model).loss(
        out,
        batch,
        beta=beta,
        capacity=capacity,
        weights=args.weights,
        image_likelihood=args.image_likelihood,
        n_shared=n_shared,
        view_codes=view_codes,
    )


def _freeze_missing_branches(core: TwoBranchVAE, data: PairedTensors) -> tuple[bool, bool]:
    """Freeze the branch no row of ``data`` feeds; returns ``(use_image, use_expression)``."""
    # no row of the data set has an image (e.g. pair=expression_only): the image
    # branch would only ever see empty sub-batches; freeze it (out of the optimizer
    # and of DDP's gradient sync) and build batches without crops, so no step runs
    # a convolution, an augmentation or an image term (same loss values)
    use_image = bool(data.has_image.any())
    if not use_image:
        for part in (core.image_encoder, core.image_decoder):
            part.requires_grad_(False)
        core.image_log_scale.requires_grad_(False)
        log.info("no row has an image: image branch frozen and skipped")
    # the mirror case (pair=image_only: 0 genes, no expression branch built; or a
    # table whose rows hold no profile): the expression branch never runs
    use_expression = bool(data.has_expression.any()) and core.expression_encoder is not None
    if not use_expression:
        for part in (core.expression_encoder, core.expression_decoder):
            if part is not None:
                part.requires_grad_(False)
        log.info("no row has expression: expression branch frozen and skipped")
    return use_image, use_expression


def _prepare_targets(
    core: TwoBranchVAE,
    data: PairedTensors,
    args: TrainArgs,
    use_image: bool,
    use_expression: bool,
) -> None:
    """Compute, once, the per-crop targets the decoder's layers train on (kept on ``data``).

    Granule centres and nucleus masks (what the analyses measure on the input crops),
    lobe counts, and ``lgamma(counts + 1)`` of the NB likelihood; the table's granule
    stain is dropped when the crops are stain-jittered (it would not follow the colour).
    """
    if data.granule_od is not None and args.stain_jitter > 0:
        # the table's granule stain was measured on the crop as cut; jittered crops change
        # colour every step and it would not follow: score against the jittered crop's own
        # contrast (the centres still come from the table)
        log.warning(
            "trainer.stain_jitter=%s: the paired table's granule stain (obsm['granule_od']) "
            "is not used; the granule stain is scored against each jittered crop",
            args.stain_jitter,
        )
        data.granule_od = None
    # the decoder's granule / nucleus layers learn what the analyses measure on the
    # input crops: computed once per crop (one pass serves both), kept with the data
    need_g = getattr(core.args, "granule_head", False) and data.granules is None
    need_n = getattr(core.args, "nucleus_head", False) and data.nucleus is None
    if use_image and (need_g or need_n):
        from vae.data import crop_targets

        t_g = time.time()
        if isinstance(data.crops, torch.Tensor):
            gran, nuc = crop_targets(data.crops, data.masks, data.has_image, need_g, need_n)
        else:  # crops on disk: computed by blocks, kept next to them in the store
            from vae.store import crop_target_store

            gran, nuc = crop_target_store(data.crops, data.masks, data.has_image, need_g, need_n)
        data.granules = gran if need_g else data.granules
        data.nucleus = nuc if need_n else data.nucleus
        in_memory = isinstance(data.crops, torch.Tensor)  # a store is not summed here
        parts = []
        if need_g and in_memory:
            parts.append(f"{int(gran.sum())} granule centres")
        if need_n and in_memory:
            parts.append(
                f"nucleus {float(nuc.sum()) / max(float(data.masks.sum()), 1):.1%} of cell area"
            )
        log.info(
            "crop targets of %d crops: %s (%.1f s)",
            int(data.has_image.sum()),
            "; ".join(parts) or "computed",
            time.time() - t_g,
        )
    if (
        use_image
        and getattr(core.args, "granule_head", False)
        and isinstance(data.granules, torch.Tensor)
        and not need_g
    ):
        # stage=pair found them on each crop as cut (pair.granule_centres), before the resize
        log.info("granule centres of the paired table: %d", int(data.granules.sum()))
    if use_image and getattr(core.args, "lobe_head", False) and data.lobes is None:
        from vae.lobes import lobe_targets

        t_l = time.time()
        data.lobes = lobe_targets(
            data.nucleus,
            data.has_image,
            crops=data.crops,
            masks=data.masks,
            deep_valley_ratio=getattr(core.args, "lobe_deep_valley", None),
        )
        log.info(
            "lobe counts of %d nuclei: mean %.2f (%.1f s)",
            int((data.lobes > 0).sum()),
            float(data.lobes[data.lobes > 0].float().mean()) if (data.lobes > 0).any() else 0.0,
            time.time() - t_l,
        )
    # lgamma(counts + 1) is the costliest op of an NB step after the digamma of the
    # gradient, and a constant of the data: once here, gathered per batch after that
    if (
        use_expression
        and core.args.has_counts
        and data.log_factorial is None
        and isinstance(data.counts, torch.Tensor)
    ):
        data.log_factorial = torch.lgamma(data.counts + 1.0)


@dataclass
class Optimization:
    """What steps the weights (:func:`build_optimization`); a resume may rebuild ``sched``."""

    trainable: list[torch.nn.Parameter]
    flat: FlatParameters | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    kl_sched: KLSchedule
    ema: torch.optim.swa_utils.AveragedModel | None
    steps_per_epoch: int
    total_steps: int  # the length of the learning-rate schedule (a resume keeps its own)


@dataclass
class Progress:
    """Counters the training steps advance (kept in last.pt, restored on resume)."""

    step: int = 0
    loss_ref: float | None = None  # the run's first-step loss (divergence reference)
    skipped: int = 0  # optimizer steps skipped for a non-finite gradient norm, in total
    schedule_logged: int = -1  # the step whose schedule/* TensorBoard last got


@dataclass
class EpochStats:
    """What :func:`train_one_epoch` measured: mean loss terms per row, seconds, β / C."""

    train_means: dict[str, float]
    train_seconds: float  # the training steps, without validation
    data_seconds: float  # of which reading and augmenting batches
    beta: float  # β and C of the epoch's last step
    capacity: float


def train_one_epoch(
    wrapped: torch.nn.Module,
    core: TwoBranchVAE,
    data: PairedTensors,
    train_idx: np.ndarray,
    epoch: int,
    args: TrainArgs,
    dist: Any,
    optim: Optimization,
    prog: Progress,
    gen: torch.Generator,
    *,
    use_image: bool,
    use_expression: bool,
    n_shared: int,
    same_stain: bool,
    tb: TBLogger | None,
    shown: Callable[[dict[str, float]], dict[str, float]],
    should_stop: Callable[[], bool] | None,
) -> EpochStats:
    """One pass over this rank's shard of the training rows (``epoch`` 0-based).

    Per batch: augment, :func:`forward_loss`, backward, clip, the non-finite and
    divergence stops, optimizer / scheduler / weight-average step; ``prog`` advances.
    ``tb`` (rank 0 only) gets the step scalars every ``args.log_every_steps``.

    Raises
    ------
    NonFiniteLossError
        On a NaN/inf or diverged loss, before the step.
    KeyboardInterrupt
        When ``should_stop()`` says so, before the next batch.
    """
    t_ep = time.time()
    device = dist.device
    is_main = dist.rank == 0
    wrapped.train()
    beta = optim.kl_sched.beta_at(prog.step)
    cap = optim.kl_sched.capacity_at(prog.step)
    batches = epoch_batches(
        train_idx,
        args.batch_size,
        shuffle=True,
        seed=args.seed,
        epoch=epoch,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    sums: torch.Tensor | None = None  # (T,) on the device: no host sync per step
    n_rows = 0
    data_s = 0.0
    t_data = time.time()
    for raw in bar(
        iterate(
            data,
            batches,
            args.num_workers,
            args.pin_memory,
            use_image,
            device=device,
            seed=args.seed,
        ),
        desc=f"epoch {epoch + 1}/{args.max_epochs}",
        total=len(batches),
        unit="batch",
        enabled=is_main,
    ):
        stop_if(should_stop)
        stain_seed = int(torch.randint(2**62, (1,), generator=gen)) if same_stain else None
        batch = to_batch(
            raw,
            device,
            args.augment,
            gen,
            non_blocking=args.pin_memory,
            stain_jitter=args.stain_jitter,
            rotate=args.rotate,
            stain_generator=_seeded(stain_seed),
        )
        view = None
        if args.weights.view_contrast > 0 and use_image:
            # the second view: the same crops augmented again, plus a small rotation
            # and zoom, so that the pair differs by more than the flips
            view = to_batch(
                raw,
                device,
                True,
                gen,
                non_blocking=args.pin_memory,
                stain_jitter=args.stain_jitter,
                rotate=max(args.rotate, VIEW_ROTATE),
                stain_generator=_seeded(stain_seed),  # the first view's colours again
            )
        data_s += time.time() - t_data
        beta = optim.kl_sched.beta_at(prog.step)
        cap = optim.kl_sched.capacity_at(prog.step)
        terms = forward_loss(
            wrapped,
            batch,
            beta=beta,
            capacity=cap,
            args=args,
            n_shared=n_shared,
            autocast=dist.autocast,
            use_expression=use_expression,
            view=view,
        )
        if optim.flat is not None:
            optim.flat.zero_grad()
        else:
            optim.opt.zero_grad(set_to_none=True)
        loss = terms.total
        if dist.world_size > 1:
            # every parameter in every rank's graph: a head whose rows one rank's
            # batch lacked (a last batch of 3 rows without a maturation label) gave
            # no gradient there, the ranks' all-reduces stopped matching and the run
            # hung for good (DDP audit); 0 * p leaves every gradient as it was
            loss = loss + 0.0 * torch.stack([p.sum() for p in optim.trainable]).sum()
        loss.backward()
        if args.grad_clip <= 0:
            gnorm = torch.zeros((), device=terms.total.device)
        elif optim.flat is not None:
            gnorm = optim.flat.clip_(args.grad_clip)
        else:
            gnorm = torch.nn.utils.clip_grad_norm_(optim.trainable, args.grad_clip, foreach=True)
        # loss, KL and gradient norm in one host sync (as many as the NaN check alone
        # took); nothing has been stepped yet, so a stop here keeps the weights
        tot, kl_now, gn = (
            torch.stack([t.detach().float().reshape(()) for t in (terms.total, terms.kl, gnorm)])
            .cpu()
            .tolist()
        )
        if not math.isfinite(tot):
            bad = {k: v for k, v in terms.scalars().items() if not math.isfinite(v)}
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch + 1}, step {prog.step}: non-finite terms "
                f"{bad} (beta={beta:.3g}, lr={optim.sched.get_last_lr()[0]:.3g}). Lower "
                f"trainer.lr, keep trainer.grad_clip > 0, or check the input "
                f"(X must be log-normalised, counts non-negative)."
            )
        if prog.loss_ref is None:
            prog.loss_ref = tot
        why = diverged(tot, kl_now, prog.loss_ref)
        if why is not None:
            raise NonFiniteLossError(
                f"diverged loss at epoch {epoch + 1}, step {prog.step}: {why} (beta={beta:.3g}, "
                f"lr={optim.sched.get_last_lr()[0]:.3g}). Lower trainer.lr, keep "
                f"trainer.grad_clip > 0, or check the input (X must be log-normalised)."
            )
        if math.isfinite(gn):
            optim.opt.step()
        else:
            # a finite loss can still give an inf/NaN gradient (an overflow in the
            # backward pass); clipping scales by NaN, so a step would write NaN
            # into every weight: the batch is dropped instead, and counted
            prog.skipped += 1
            log.warning(
                "epoch %d, step %d: gradient norm %s; optimizer step skipped (%d so far)",
                epoch + 1,
                prog.step,
                gn,
                prog.skipped,
            )
        with warnings.catch_warnings():
            # a skipped first step: torch's "scheduler before optimizer" notice is moot
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            optim.sched.step()
        if optim.ema is not None:
            optim.ema.update_parameters(core)
        prog.step += 1
        bsz = int(batch.x.shape[0])
        n_rows += bsz
        vec = terms.vector().double() * bsz
        sums = vec if sums is None else sums + vec
        if tb is not None and is_main and prog.step % max(1, args.log_every_steps) == 0:
            tb.scalars("train", shown(terms.scalars()), prog.step)
            tb.scalars("schedule", _schedule_now(optim.sched, beta, cap), prog.step)
            tb.writer.add_scalar("train/grad_norm", float(gnorm), prog.step)
            prog.schedule_logged = prog.step
        t_data = time.time()
    loop_s = time.time() - t_ep  # the training steps, without validation
    train_means = (
        dict(zip(LossTerms.names(), (sums / max(n_rows, 1)).tolist())) if sums is not None else {}
    )
    return EpochStats(train_means, loop_s, data_s, beta, cap)


def _schedule_now(sched: torch.optim.lr_scheduler.LRScheduler, beta: float, cap: float) -> dict:
    """β and C of the step just taken, the learning rate of the next one."""
    return {"beta": beta, "capacity": cap, "lr": sched.get_last_lr()[0]}


def build_optimization(
    core: TwoBranchVAE,
    args: TrainArgs,
    train_idx: np.ndarray,
    dist: Any,
    use_image: bool,
    use_expression: bool,
) -> Optimization:
    """AdamW over the trainable weights, the learning-rate and KL schedules, the average."""
    # a list, once: clip_grad_norm_ re-walking the module tree each step costs ~1 ms
    trainable = [p for p in core.parameters() if p.requires_grad]
    # expression only, one process: every trainable tensor takes part in every step,
    # so they can share one buffer (one fused update, one norm; vae/flat.py)
    flat = (
        FlatParameters(trainable)
        if not use_image and use_expression and dist.world_size == 1
        else None
    )
    opt = torch.optim.AdamW(
        [flat.flat] if flat is not None else trainable,
        lr=args.lr,
        weight_decay=args.weight_decay,
        # one fused kernel per tensor: the CPU default loops in Python with a host sync
        # (.item()) per tensor and step
        fused=True,
    )
    steps_per_epoch = len(
        epoch_batches(
            train_idx,
            args.batch_size,
            shuffle=False,
            seed=0,
            epoch=0,
            rank=dist.rank,
            world_size=dist.world_size,
        )
    )
    total_steps = steps_per_epoch * args.max_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lr_lambda(round(args.lr_warmup_epochs * steps_per_epoch), total_steps, args.lr_schedule),
    )
    kl_sched = KLSchedule(
        beta=args.beta,
        warmup_steps=round(args.kl_warmup_epochs * steps_per_epoch),
        capacity_max=args.capacity_max,
        capacity_steps=round(args.capacity_epochs * steps_per_epoch),
    )
    # moving average of the weights (args.ema_epochs): what validation, model.pt and the
    # figures read; the optimizer steps the raw weights
    decay = ema_decay(args.ema_epochs, steps_per_epoch)
    ema = (
        torch.optim.swa_utils.AveragedModel(
            core, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True
        )
        if decay > 0
        else None
    )
    return Optimization(trainable, flat, opt, sched, kl_sched, ema, steps_per_epoch, total_steps)


def _report_epoch(
    rec: dict[str, Any],
    ep: EpochStats,
    last_kl: np.ndarray,
    improved: bool,
    figures_within_budget: bool,
    args: TrainArgs,
    tb: TBLogger | None,
    prog: Progress,
    optim: Optimization,
    shown: Callable[[dict[str, float]], dict[str, float]],
    core: TwoBranchVAE,
    fig_batch: Batch,
) -> float:
    """The epoch's log line and TensorBoard scalars / figures (rank 0); ``rec`` is its
    history entry, ``last_kl`` (d,) the validation KL per dim. Returns the seconds spent
    drawing figures (``args.figure_budget``)."""
    epoch, train_means, val_means = rec["epoch"], rec["train"], rec["val"]
    raw_val = rec.get("val_raw")
    # "*" marks an epoch that improved the monitored term: named unless it is the "val" shown
    picked = "" if args.monitor == "total" else f" {args.monitor} {val_means[args.monitor]:.4g}"
    log.info(
        "epoch %d/%d step %d: train %.4g val %.4g (img %.4g expr %.4g kl %.3g "
        "x-expr %.4g) active %d/%d beta %.3g %.1fs%s%s",
        epoch,
        args.max_epochs,
        prog.step,
        train_means.get("total", math.nan),
        val_means["total"],
        val_means["image"],
        val_means["expression"],
        val_means["kl"],
        val_means["expression_from_image"],
        rec["active_units"],
        len(last_kl),
        rec["beta"],
        rec["seconds"],
        picked,
        " *" if improved else "",
    )
    if raw_val is not None:
        log.info("epoch %d: raw weights val %s %.4g", epoch, args.monitor, raw_val)
    if tb is None:
        return 0.0
    if prog.schedule_logged != prog.step:
        # once an epoch at least: a run of fewer than trainer.log_every_steps
        # steps per epoch showed no β, C or learning rate at all (audit)
        tb.scalars("schedule", _schedule_now(optim.sched, ep.beta, ep.capacity), prog.step)
        prog.schedule_logged = prog.step
    # every tag on one axis, the optimizer step: the epoch's values at the
    # step that ended it (they were at the epoch number, and β / LR could not
    # be lined up with the val curves); "epoch" maps the one to the other
    tb.writer.add_scalar("epoch", epoch, prog.step)
    tb.scalars("epoch_train", shown(train_means), prog.step)
    tb.scalars("val", shown(val_means), prog.step)
    tb.kl_per_dim(last_kl, prog.step)
    tb.scalars("val", {"active_units": rec["active_units"]}, prog.step)
    if raw_val is not None:  # the raw weights beside the average's
        tb.scalars("val_raw", {args.monitor: raw_val}, prog.step)  # the term that selects
    due = args.image_every_epochs > 0 and (
        epoch % args.image_every_epochs == 0 or epoch == args.max_epochs
    )
    fig_s = 0.0
    if due and figures_within_budget:
        t_fig = time.time()
        with averaged_weights(core, optim.ema):
            tb.epoch_figures(core, fig_batch, prog.step)
        fig_s = time.time() - t_fig
    tb.flush()
    return fig_s


def stop_if(should_stop: Callable[[], bool] | None) -> None:
    """Raise KeyboardInterrupt when ``should_stop()`` is true (a Ctrl-C the caller
    noted): the long loops stop at their next step, even where the KeyboardInterrupt
    itself was swallowed (it can land in a weakref callback, which only prints it)."""
    if should_stop is not None and should_stop():
        raise KeyboardInterrupt("stopped: an interrupt (Ctrl-C) was noted")


def _seeded(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed``; None for None (draw from the trainer's)."""
    return None if seed is None else torch.Generator().manual_seed(seed)


def train(
    model: TwoBranchVAE,
    data: PairedTensors,
    split: np.ndarray,
    args: TrainArgs,
    dist: Any,
    out_dir: str | Path,
    *,
    resume_from: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    tb: TBLogger | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``model`` on the ``train`` rows of ``data``, early-stop on ``val``.

    Parameters
    ----------
    model : TwoBranchVAE (unwrapped; moved/wrapped here through ``dist.wrap``)
    data : PairedTensors
    split : (N,) array of ``train`` | ``val`` | ``test``; test rows are never read
    args : TrainArgs
    dist : pipeline.hardware.DistInfo (device, rank, world_size, wrap, autocast, ...)
    out_dir : where ``last.pt`` and ``model.pt`` go (rank 0 only)
    resume_from : a ``last.pt`` to continue from (same args and split)
    meta, config : stored in the checkpoints
    tb : TensorBoard logger (rank 0) or None
    should_stop : asked before every training and validation batch; True raises
        KeyboardInterrupt there (the pipeline passes whether a Ctrl-C was noted: one
        whose KeyboardInterrupt a library swallowed trained on to the end, exit 0)

    Returns
    -------
    TrainResult

    Raises
    ------
    NonFiniteLossError
        On a NaN/inf loss, naming epoch, step and the terms; also on a diverged finite
        loss (:func:`diverged`), before the diverged weights are kept as model.pt.
    KeyboardInterrupt
        When ``should_stop()`` says so, before the next batch (no checkpoint written).
    """
    t_start = time.time()
    out_dir = Path(out_dir)
    device = dist.device
    is_main = dist.rank == 0
    train_idx = np.flatnonzero(split == "train")
    val_idx = np.flatnonzero(split == "val")
    if train_idx.size == 0:
        raise ValueError("no training rows in the split")
    if args.monitor not in MONITORS:
        raise ValueError(f"monitor={args.monitor!r}; valid: {', '.join(MONITORS)}")
    if train_idx.size < 2 and getattr(model.args, "expression_norm", "") == "batch":
        # BatchNorm cannot train on a batch of one row (a raw torch ValueError otherwise)
        raise ValueError(
            "one training row: vae.expression_norm=batch needs at least 2; set "
            "vae.expression_norm=layer or add rows"
        )
    if val_idx.size == 0:
        log.warning("no validation rows: early stopping and model.pt selection use train loss")
    for msg in degenerate_inputs(data, train_idx):
        log.warning("%s: the model has little to learn there; check the input", msg)

    seed_everything(args.seed + dist.rank)
    gen = torch.Generator().manual_seed(args.seed * 7919 + dist.rank)

    core = model
    use_image, use_expression = _freeze_missing_branches(core, data)
    if device.type == "cpu":
        # NHWC weights: oneDNN's channels-last kernels run the image branch's many small
        # convolutions faster on a CPU (an epoch 20 % shorter in `make demo`, 13 % with
        # the real preset; the same losses to four digits over 5 demo epochs, float
        # rounding apart after that); not measured on a GPU, so the layout stays there
        # (docs/vae.md, "Speed (this CPU)")
        core.to(memory_format=torch.channels_last)
    wrapped = dist.wrap(core)
    n_shared = core.args.n_shared
    _prepare_targets(core, data, args, use_image, use_expression)
    optim = build_optimization(core, args, train_idx, dist, use_image, use_expression)

    if is_main and args.beta == 0:
        log.info(
            "vae.beta=0 trains a plain autoencoder: the KL to the prior costs nothing (kl "
            "is still logged), the code is not drawn towards N(0, I), and decodes of prior "
            "samples or traversals in prior units mean little"
        )

    epoch = 0
    prog = Progress()  # step, divergence reference, skipped steps
    best_val, best_epoch, bad_epochs = math.inf, 0, 0
    best_raw_val, best_raw_epoch = math.inf, 0  # the raw weights' own best (ema only)
    history: list[dict[str, Any]] = []
    rank_rngs = None  # every rank's RNG state at the last epoch end (several processes)
    if resume_from is not None:
        # the weights first: another study's last.pt (or one of other model settings)
        # is refused as one line naming the file, why and what to do, not torch's error
        ck = load_for_resume(resume_from, core, meta)
        kept = int(ck.get("schedule_total_steps", optim.total_steps))
        if kept != optim.total_steps:
            # a resume may raise trainer.max_epochs to train on, but a cosine rebuilt over
            # the new length would jump back up (x12 in an audit): the run keeps the
            # schedule it was trained under, and the extra steps run at its final rate
            log.info(
                "resume: the learning-rate schedule keeps its original %d steps (now %d "
                "with trainer.max_epochs=%d): steps past it run at its final rate",
                kept,
                optim.total_steps,
                args.max_epochs,
            )
            optim.total_steps = kept
            optim.sched = torch.optim.lr_scheduler.LambdaLR(
                optim.opt,
                lr_lambda(
                    round(args.lr_warmup_epochs * optim.steps_per_epoch),
                    optim.total_steps,
                    args.lr_schedule,
                ),
            )
        elif "schedule_total_steps" not in ck and args.lr_schedule != "constant":
            log.warning(
                "resume: %s predates the recorded schedule length: the cosine is rebuilt "
                "over trainer.max_epochs=%d (a changed max_epochs moves the learning rate)",
                resume_from,
                args.max_epochs,
            )
        try:
            optim.opt.load_state_dict(
                optim.flat.flat_state(ck["optimizer"])
                if optim.flat is not None
                else ck["optimizer"]
            )
            optim.sched.load_state_dict(ck["scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise resume_error(
                resume_from,
                f"its optimizer state does not fit this run's optimizer (the trainer "
                f"settings differ from the run that wrote it: {error_line(e, 200)})",
            ) from None
        if (optim.ema is not None) != ("ema" in ck):
            # the average is part of the run's state: dropping or adding it half-way
            # would give a model.pt that neither setting describes
            was = "with" if "ema" in ck else "without"
            now = "is off" if optim.ema is None else f"is {args.ema_epochs:g}"
            raise resume_error(
                resume_from,
                f"it was trained {was} trainer.ema_epochs (a moving average of the "
                f"weights), which {now} in this run: resume with the settings it was "
                f"trained with",
            )
        if optim.ema is not None:
            optim.ema.load_state_dict(ck["ema"])
        was_monitor = (ck.get("train_args") or {}).get("monitor", "total")
        if was_monitor != args.monitor:
            # the kept best value is of the other term: comparing the two would pick
            # model.pt by neither
            raise resume_error(
                resume_from,
                f"it selected model.pt on trainer.monitor={was_monitor}, this run on "
                f"{args.monitor}: resume with trainer.monitor={was_monitor}",
            )
        epoch, prog.step = int(ck["epoch"]), int(ck["step"])
        best_val = float(ck.get("best_val", math.inf))
        best_epoch = int(ck.get("best_epoch", 0))
        bad_epochs = int(ck.get("bad_epochs", 0))
        best_raw_val = float(ck.get("best_raw_val", math.inf))
        best_raw_epoch = int(ck.get("best_raw_epoch", 0))
        history = list(ck.get("history", []))
        prog.loss_ref = ck.get("loss_ref")
        if prog.loss_ref is None and history:  # last.pt written before the reference was kept
            prog.loss_ref = history[0]["train"].get("total")
        prog.skipped = int(ck.get("skipped_steps", 0))
        warn = restore_rank_rng(ck, dist.rank, dist.world_size, gen)
        if warn and is_main:
            log.warning("%s: %s", resume_from, warn)
        log.info("resumed from %s at epoch %d, step %d", resume_from, epoch, prog.step)
        if tb is not None and is_main:  # what the earlier run logged after `step` goes
            tb.resume_at(prog.step)
        if epoch >= args.max_epochs and is_main:
            # not an error: the run is as far as asked (a resume with a lower max_epochs,
            # or of a run that already ran them all); said, as 0 epochs would look odd
            log.warning(
                "resume: %s already trained %d epochs >= trainer.max_epochs=%d: nothing to "
                "train; the run ends with the weights it has (raise trainer.max_epochs to "
                "train on)",
                resume_from,
                epoch,
                args.max_epochs,
            )

    # fixed validation batch for the figures (first rows of val, else train)
    fig_rows = (val_idx if val_idx.size else train_idx)[: args.n_images]
    fig_batch = to_batch(
        raw_batch(data, torch.as_tensor(fig_rows, dtype=torch.long), use_image), device
    )

    def payload(kind: str) -> dict[str, Any]:
        # only last.pt resumes: the best model (model.pt) carries no optimizer state
        # (2/3 of its size; copying it at every improvement cost ~2 % of a small run)
        resume = (
            {
                "optimizer": (  # always the per-tensor layout
                    optim.flat.per_tensor_state(optim.opt.state_dict())
                    if optim.flat is not None
                    else optim.opt.state_dict()
                ),
                "scheduler": optim.sched.state_dict(),
                "schedule_total_steps": optim.total_steps,  # the length a resume keeps
                **({"ema": optim.ema.state_dict()} if optim.ema is not None else {}),
            }
            if kind == "last"
            else {}
        )
        return {
            "format_version": CHECKPOINT_FORMAT,
            "code": code_record(),  # which code trained it (cached: git is asked once)
            "model": core.state_dict(),
            "model_args": asdict(core.args),
            **resume,
            "epoch": epoch,
            "step": prog.step,
            "rng": _rng_state(gen),
            # every rank's own streams (several processes), each restored by its rank
            **({"rng_ranks": rank_rngs} if kind == "last" and rank_rngs is not None else {}),
            "best_val": best_val,
            "best_epoch": best_epoch,
            "bad_epochs": bad_epochs,
            **(
                {"best_raw_val": best_raw_val, "best_raw_epoch": best_raw_epoch}
                if optim.ema is not None
                else {}
            ),
            # model.pt / model_raw.pt: without the wall-clock seconds, so two identical
            # runs write identical files (one model_digest); last.pt keeps them
            "history": history if kind == "last" else _untimed(history),
            "loss_ref": prog.loss_ref,
            "skipped_steps": prog.skipped,
            "train_args": asdict(args),
            "config": config,
            "meta": dict(
                meta or {},
                n_latent=core.args.n_latent,
                n_shared=n_shared,
                n_private=core.args.n_private,
                crop_size=core.args.crop_size,
                checkpoint=kind,
            ),
        }

    stopped = "max_epochs"
    last_kl = np.zeros(core.args.n_latent)
    # outer bar: epochs with ETA (terminal only, rank 0); the inner one: this epoch's batches
    limit = f" (cap {args.max_minutes:g} min)" if args.max_minutes is not None else ""
    ebar = bar(
        desc=f"train{limit}",
        total=args.max_epochs,
        initial=epoch,
        unit="epoch",
        enabled=is_main,
        leave=True,
    )
    best_ck: dict[str, Any] | None = None  # best epoch's checkpoint not yet on disk
    best_raw_ck: dict[str, Any] | None = None  # same, raw weights (with the average only)
    fig_s = 0.0  # seconds spent drawing epoch figures (args.figure_budget)
    t_saved = time.time()
    # vae.view_same_stain: the two views of a step replay one stain seed (pose-only pairs)
    same_stain = (
        args.view_same_stain
        and args.weights.view_contrast > 0
        and args.stain_jitter > 0
        and use_image
    )

    # terms of weight 0 are exact zeros: not logged (flat zero cards under every prefix)
    off = terms_off(args.weights)

    def shown(values: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in values.items() if k not in off}

    if tb is not None and is_main and resume_from is None:  # once per run, at step 0
        moe = core.args.fusion == "moe"
        tb.weights_legend(term_weights(args.weights, moe=moe), off, moe=moe)

    while epoch < args.max_epochs:
        t_ep = time.time()
        ep = train_one_epoch(
            wrapped,
            core,
            data,
            train_idx,
            epoch,
            args,
            dist,
            optim,
            prog,
            gen,
            use_image=use_image,
            use_expression=use_expression,
            n_shared=n_shared,
            same_stain=same_stain,
            tb=tb if is_main else None,
            shown=shown,
            should_stop=should_stop,
        )
        epoch += 1
        train_means = ep.train_means

        # validation at the final β / C so epochs stay comparable during warm-up
        val_rows = val_idx if val_idx.size else train_idx
        eligible = optim.kl_sched.done_at(prog.step)
        raw_val = None
        if optim.ema is not None:
            # the raw weights too, so every run with the average holds its own control
            # (model_raw.pt = the best raw epoch). They are scored first, with the RNG
            # state a run without the average scores them with (the loss samples z), and
            # the average's pass below puts the state back: the training steps, the raw
            # scores and model_raw.pt are those of the same run without the average
            raw_val = evaluate_loss(
                wrapped, data, val_rows, args, dist, optim.kl_sched, n_shared, should_stop
            )[0][args.monitor]
            if is_main and eligible and raw_val < best_raw_val:
                best_raw_val, best_raw_epoch = raw_val, epoch
                best_raw_ck = _snapshot(payload("best"))
                best_raw_ck.update(best_val=raw_val, best_epoch=epoch)
                best_raw_ck["meta"]["checkpoint"] = "best_raw"
        devs = [device] if device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devs)
            if optim.ema is not None
            else contextlib.nullcontext()
        ):
            with averaged_weights(core, optim.ema):
                val_means, last_kl = evaluate_loss(
                    wrapped, data, val_rows, args, dist, optim.kl_sched, n_shared, should_stop
                )
        monitor = val_means[args.monitor]
        # the divergence rule reads the objective itself (its reference is a training loss)
        why = diverged(val_means["total"], val_means.get("kl", 0.0), prog.loss_ref)
        if why is not None:  # raised before this epoch's weights can become model.pt
            raise NonFiniteLossError(
                f"diverged validation loss at epoch {epoch}: {why} "
                f"(lr={optim.sched.get_last_lr()[0]:.3g}). Lower trainer.lr, keep "
                f"trainer.grad_clip > 0, or check the input (X must be log-normalised)."
            )
        improved = eligible and monitor < best_val
        if improved:
            best_val, best_epoch, bad_epochs = monitor, epoch, 0
        elif eligible:
            bad_epochs += 1
        rec = {
            "epoch": epoch,
            "step": prog.step,
            "beta": optim.kl_sched.beta_at(prog.step),
            "capacity": optim.kl_sched.capacity_at(prog.step),
            "lr": optim.sched.get_last_lr()[0],
            "seconds": round(time.time() - t_ep, 3),
            "data_seconds": round(ep.data_seconds, 3),
            "train_seconds": round(ep.train_seconds, 3),
            "train": train_means,
            "val": val_means,
            "active_units": active_units(last_kl),
            "skipped_steps": prog.skipped,
            **({"val_raw": raw_val} if raw_val is not None else {}),
        }
        history.append(rec)
        ebar.update(1)
        ebar.set_postfix_str(f"val {monitor:.4g}", refresh=False)
        if is_main:
            within = (
                args.figure_budget is None
                or epoch in (1, args.max_epochs)
                or fig_s <= args.figure_budget * (time.time() - t_start)
            )
            fig_s += _report_epoch(
                rec, ep, last_kl, improved, within, args, tb, prog, optim, shown, core, fig_batch
            )
            if improved:  # kept in memory, written with the next last.pt
                with averaged_weights(core, optim.ema):
                    best_ck = _snapshot(payload("best"))
        stop = None
        if args.early_stopping_patience > 0 and bad_epochs >= args.early_stopping_patience:
            stop = "early_stopping"
        else:
            over = args.max_minutes is not None and (time.time() - t_start) / 60 > args.max_minutes
            if args.max_minutes is not None and dist.world_size > 1:
                # every rank must stop after the same epoch, or DDP hangs
                flag = torch.tensor([float(over)], device=device)
                over = float(dist.all_reduce_sum(flag)[0]) > 0
            if over and epoch < args.max_epochs:  # the cap cut the run short
                stop = "time_limit"
                log.info("trainer.max_minutes=%s reached after epoch %d", args.max_minutes, epoch)
            elif epoch >= args.max_epochs:  # ran every epoch: "max_epochs", even if the
                pass  # cap was also reached after the last one (was labelled time_limit)
            elif args.stop_after_epochs is not None and epoch >= args.stop_after_epochs:
                stop = "interrupted"
        # checkpoints at most every checkpoint_every_s and after the last epoch: a
        # short epoch would otherwise spend more time in torch.save than in training
        final = stop is not None or epoch >= args.max_epochs
        if dist.world_size > 1:  # a collective: every rank, every epoch, before the save
            rank_rngs = dist.all_gather_object(_rng_state(gen))
        if is_main and (final or time.time() - t_saved >= args.checkpoint_every_s):
            if best_ck is not None:
                save_checkpoint(out_dir / "model.pt", best_ck)
                best_ck = None
            if best_raw_ck is not None:
                save_checkpoint(out_dir / "model_raw.pt", best_raw_ck)
                best_raw_ck = None
            save_checkpoint(out_dir / "last.pt", payload("last"))
            t_saved = time.time()
        if stop is not None:
            stopped = stop
            break
    ebar.close()
    dist.barrier()
    if is_main and stopped != "interrupted" and best_epoch == 0:
        # the KL schedule never finished: keep the last weights as "best"
        if args.beta > 0:  # β = 0: no KL to warm up, the fallback needs no warning
            cap = f", vae.capacity_epochs={args.capacity_epochs:g}" if args.capacity_max > 0 else ""
            if stopped == "time_limit":  # cut short by the time cap, not the epoch count
                cut = f"trainer.max_minutes={args.max_minutes:g}"
                fix = "raise trainer.max_minutes"
            else:
                cut, fix = f"trainer.max_epochs={args.max_epochs}", "raise trainer.max_epochs"
            log.warning(
                "the KL schedule (vae.kl_warmup_epochs=%g%s) did not finish within the %d "
                "epochs run (%s): no epoch could be selected, model.pt = the last epoch; "
                "%s or shorten vae.kl_warmup_epochs",
                args.kl_warmup_epochs,
                cap,
                epoch,
                cut,
                fix,
            )
        best_epoch, best_val = epoch, history[-1]["val"][args.monitor] if history else math.nan
        with averaged_weights(core, optim.ema):
            save_checkpoint(out_dir / "model.pt", payload("best"))
        if optim.ema is not None:
            save_checkpoint(out_dir / "model_raw.pt", payload("best"))
    return TrainResult(
        best_epoch=best_epoch,
        best_val=float(best_val),
        epochs=epoch,
        steps=prog.step,
        stopped=stopped,
        history=history,
        kl_per_dim=[float(v) for v in last_kl],
        seconds=round(time.time() - t_start, 2),
    )


# per-epoch wall-clock entries of the history (vary run to run on one machine)
TIMING_KEYS = ("seconds", "data_seconds", "train_seconds")


def _untimed(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``history`` without :data:`TIMING_KEYS` (what model.pt stores)."""
    return [{k: v for k, v in rec.items() if k not in TIMING_KEYS} for rec in history]


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    data: PairedTensors,
    rows: np.ndarray,
    args: TrainArgs,
    dist: Any,
    kl_sched: KLSchedule,
    n_shared: int,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Mean loss terms over ``rows`` (sharded over ranks) at the final β and C.

    Returns the term means and the per-dim KL (d,) of the fused posterior.
    ``should_stop`` as in :func:`train` (asked before every batch).

    Raises
    ------
    ValueError
        ``rows`` is empty: no loss to score (:func:`train` validates on the training
        rows when there are no validation rows). ``rows`` is the same on every rank, so
        every rank raises, before the all-reduce.
    """
    if len(rows) == 0:
        raise ValueError("no rows to evaluate: evaluate_loss needs at least one row")
    was = model.training
    model.eval()
    # rows without a crop cost little memory: large batches save the per-batch
    # overhead (no in-batch term without images, so the means are unchanged)
    has_images = bool(data.has_image.any())
    # each row counts once over the ranks: the shards' padding repeats are cut off the
    # batches they end, and a rank with nothing but a repeat runs it at weight 0 (every
    # rank runs the same number of forward passes and joins the all-reduce below)
    shards = eval_batches(
        rows,
        max(args.batch_size, 128 if has_images else 2048),
        rank=dist.rank,
        world_size=dist.world_size,
    )
    batches = [b[:k] if k else b for b, k in shards]
    counts = [k > 0 for _, k in shards]
    sums: torch.Tensor | None = None
    keys: list[str] = []
    kl_sum = None
    n = 0
    for raw, counted in zip(iterate(data, batches, images=has_images), counts, strict=True):
        stop_if(should_stop)
        batch = to_batch(raw, dist.device)
        terms = forward_loss(
            model,
            batch,
            beta=kl_sched.beta,
            capacity=kl_sched.capacity_max,
            args=args,
            n_shared=n_shared,
            autocast=dist.autocast,
            use_expression=bool(data.has_expression.any()),
        )
        keys = LossTerms.names()
        bsz = batch.x.shape[0] if counted else 0
        vec, kl_dims = terms.vector().double().cpu(), terms.kl_per_dim.double().cpu()
        if not counted:  # zeros, not 0 x the terms: a non-finite repeat adds nothing
            vec, kl_dims = torch.zeros_like(vec), torch.zeros_like(kl_dims)
        v = torch.cat([vec * bsz, torch.tensor([bsz], dtype=torch.float64)])
        sums = v if sums is None else sums + v
        k = kl_dims * bsz
        kl_sum = k if kl_sum is None else kl_sum + k
        n += bsz
    if was:
        model.train()
    assert sums is not None and kl_sum is not None  # rows is not empty: every rank ran a batch
    both = torch.cat([sums, kl_sum]).to(dist.device)
    dist.all_reduce_sum(both)
    both = both.cpu()
    cnt = float(both[len(keys)])
    means = {k: float(both[i]) / cnt for i, k in enumerate(keys)}
    kl = (both[len(keys) + 1 :] / cnt).numpy()
    return means, kl
