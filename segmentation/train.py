"""Training recipe of the Mask R-CNN (typed arguments, no config objects).

``fit(model_args, train_ds, eval_sets, test_sets, args, dist, checkpoint, tb_dir)``
is one linear recipe over the per-epoch engine (:mod:`segmentation.engine`),
like torchvision's ``references/detection/train.py``: loader, model, optimizer
and warm-up schedule, resume, the epoch loop (gradient clipping, non-finite
loss stop, validation every ``eval_every`` epochs, drawn predictions), a
checkpoint after every epoch that resumes exactly, and the final validation /
test metrics. ``pipeline/stages/segment_train.py`` maps the config onto it,
as ``pipeline/stages/train.py`` does for :func:`vae.train.train`.

Distributed: pass the ``DistInfo`` of ``pipeline.hardware`` (``device``,
``rank``, ``world_size``, ``wrap``, ``autocast``, ``barrier``,
``all_reduce_mean``); rank 0 writes the checkpoint and TensorBoard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from segmentation.datasets import DetectionDataset, collate
from segmentation.engine import (
    EvalResult,
    draw_predictions,
    evaluate,
    predict,
    train_one_epoch,
    warmup_schedule,
)
from segmentation.io import DETECTOR_FORMAT_VERSION, atomic_path, load_torch_file
from segmentation.model import build_maskrcnn, save_checkpoint
from segmentation.progress import bar
from segmentation.provenance import code_record
from segmentation.runtime import restore_rank_rng, rng_state

log = logging.getLogger(__name__)


class FitError(ValueError):
    """The run cannot start as asked (e.g. resume from a checkpoint without optimizer state)."""


@dataclass
class FitArgs:
    """Optimisation settings; no defaults here: ``SegmentationConfig`` (pipeline/config.py) owns them."""

    epochs: int
    optimizer: str  # sgd | adamw
    lr: float
    momentum: float
    weight_decay: float
    schedule: str  # cosine | step | constant
    warmup_iters: int
    grad_clip: float  # 0: off
    batch_size: int
    stop_after_epochs: int | None  # stop early (the schedule still spans ``epochs``)
    eval_every: int
    score_threshold: float
    tb_images: int
    log_every: int
    num_workers: int
    pin_memory: bool
    seed: int
    resume: bool


def summary(r: EvalResult) -> dict[str, Any]:
    """The headline numbers of an evaluation (COCO AP, recall, precision, mask IoU)."""
    keys = ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75")
    out = {k: getattr(r, k) for k in keys}
    out.update(recall=r.recall, precision=r.precision, mean_mask_iou=r.mean_mask_iou)
    return out


# the summary keys that are pycocotools APs (-1 = undefined)
AP_KEYS = ("_ap", "_ap50", "_ap75")


def tb_scalars(s: dict[str, Any]) -> dict[str, float]:
    """The numbers of a :func:`summary` TensorBoard plots: None (no masks to score) and an
    AP of -1 (pycocotools' "no ground-truth cell scored") are left out, not drawn as a
    dip below 0.

    >>> tb_scalars({"box_ap": -1.0, "mask_ap": None, "recall": 0.5})
    {'recall': 0.5}
    """
    return {k: v for k, v in s.items() if v is not None and not (k.endswith(AP_KEYS) and v < 0)}


def epoch_line(epoch: int, n_epochs: int, stats: Any, val: dict[str, dict[str, Any]]) -> str:
    """One log line per epoch: ``epoch k/N: loss L (terms) T s; val SRC box AP .. mask AP ..``.

    ``epoch`` is 0-based (as in the checkpoint); ``val`` maps source -> :func:`summary`.

    >>> from types import SimpleNamespace as S
    >>> epoch_line(2, 16, S(loss=1.23456, losses={"loss_mask": 0.5}, seconds=14.6),
    ...            {"sim": {"box_ap": 0.51234, "mask_ap": None, "recall": 0.9}})
    'epoch 3/16: loss 1.235 (mask 0.500), 15 s; val sim: box AP 0.512, recall 0.900'
    """
    terms = ", ".join(
        f"{k[5:] if k.startswith('loss_') else k} {v:.3f}" for k, v in sorted(stats.losses.items())
    )
    line = f"epoch {epoch + 1}/{n_epochs}: loss {stats.loss:.3f} ({terms}), {stats.seconds:.0f} s"
    for src, s in val.items():
        line += f"; val {src}: {metrics_text(s)}"
    return line


def metrics_text(s: dict[str, Any]) -> str:
    """``box AP 0.512, mask AP 0.430, recall 0.900`` from a :func:`summary` (None: left out;
    an AP of -1, pycocotools' "no ground-truth cell to score", reads ``undefined``)."""
    names = {"box_ap": "box AP", "mask_ap": "mask AP", "recall": "recall"}
    return ", ".join(
        f"{nm} undefined" if k.endswith(AP_KEYS) and s[k] < 0 else f"{nm} {s[k]:.3f}"
        for k, nm in names.items()
        if s.get(k) is not None
    )


def warn_if_blind(name: str, recall: float) -> bool:
    """Warn when validation set ``name`` ends with recall 0; returns whether it did.

    An audit's runaway run (``segmentation.lr=1000``) finished "done" with recall 0 and
    nothing said: a detector that finds no annotated cell is no result.
    """
    if recall != 0:
        return False
    log.warning(
        "val %s: recall 0 at the last evaluation: the detector finds no annotated cell "
        "(too few epochs, segmentation.lr too high, or a diverged run); check the loss "
        "curve before using model.pt",
        name,
    )
    return True


def fit(
    model_args: dict[str, Any],
    train_ds: DetectionDataset,
    eval_sets: dict[str, DetectionDataset],
    test_sets: dict[str, DetectionDataset],
    args: FitArgs,
    dist: Any,
    checkpoint: Path,
    tb_dir: Path,
    pretrained_weights: str | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any] | None:
    """Train, checkpoint every epoch to ``checkpoint``, evaluate; rank 0 returns the metrics.

    ``checkpoint_extra`` is stored in every checkpoint (config, input scale...).
    ``should_stop``: checked before every training iteration (a Ctrl-C the caller
    noted; :func:`segmentation.engine.train_one_epoch`).
    Returns ``None`` on the other ranks.

    Raises
    ------
    segmentation.runtime.NonFiniteLossError
        The loss became NaN/inf.
    FitError
        ``args.resume`` with a checkpoint that cannot be resumed, or
        ``pretrained_weights`` missing or not fitting the model.
    """
    t_start = time.time()
    sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=args.seed
    )
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=int(args.batch_size),
        sampler=sampler,
        collate_fn=collate,
        num_workers=int(args.num_workers),
        pin_memory=bool(args.pin_memory),
    )
    try:
        model = build_maskrcnn(**model_args, pretrained_weights=pretrained_weights)
    except (FileNotFoundError, ValueError) as e:  # a starting point that does not fit
        raise FitError(str(e)) from None
    model = dist.wrap(model)
    core = model.module if hasattr(model, "module") else model
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    total = int(args.epochs) * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_schedule(total, int(args.warmup_iters), args.schedule)
    )

    start_epoch, history = 0, []
    if args.resume and checkpoint.exists():
        ck = load_torch_file(checkpoint, dist.device, "segment_train checkpoint")
        if "optimizer" not in ck:
            raise FitError(f"{checkpoint}: no optimizer state; cannot resume (overwrite=true)")
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        warn = restore_rank_rng(ck, dist.rank, dist.world_size)
        if warn and dist.is_main:
            log.warning("%s: %s", checkpoint, warn)
        start_epoch = int(ck["epoch"]) + 1
        history = list(ck.get("history", []))
        log.info("resumed from %s at epoch %d", checkpoint, start_epoch)

    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tb_dir))
    log.info(
        "segment_train: %d training images (%d iterations/epoch, %d epochs), val sources %s, "
        "device %s x%d",
        len(train_ds),
        len(loader),
        args.epochs,
        list(eval_sets),
        dist.device,
        dist.world_size,
    )

    def on_iter(epoch: int):
        def f(it: int, terms: dict[str, float], lr: float) -> None:
            if writer is None:
                return
            step = epoch * len(loader) + it
            for k, v in terms.items():
                writer.add_scalar(f"train/{k}", v, step)
            writer.add_scalar("train/loss", sum(terms.values()), step)
            writer.add_scalar("schedule/lr", lr, step)

        return f

    last: dict[str, EvalResult] = {}
    end_epoch = int(args.epochs)
    if args.stop_after_epochs:
        end_epoch = min(end_epoch, int(args.stop_after_epochs))
    # outer bar over the epochs (overall ETA); train_one_epoch draws the inner one
    ebar = bar(
        desc="segment_train",
        total=end_epoch,
        initial=start_epoch,
        unit="epoch",
        enabled=dist.is_main,
        leave=True,
    )
    # the divergence reference: the run's first loss (kept in the history for a resume)
    loss_ref = None
    if history:
        h0 = history[0].get("train", {})
        loss_ref = h0.get("first_loss", h0.get("loss"))
    for epoch in range(start_epoch, end_epoch):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        stats = train_one_epoch(
            model,
            opt,
            loader,
            dist.device,
            epoch,
            scheduler=sched,
            grad_clip=float(args.grad_clip) or None,
            autocast=dist.autocast,
            on_iteration=on_iter(epoch),
            log_every=int(args.log_every),
            reduce=dist.all_reduce_mean if dist.distributed else None,
            n_epochs=int(args.epochs),
            progress=dist.is_main,
            reference=loss_ref,
            should_stop=should_stop,
        )
        if loss_ref is None:
            loss_ref = stats.first_loss
        entry: dict[str, Any] = {"epoch": epoch, "train": asdict(stats)}
        # every rank's own random streams, each restored by its rank on a resume (a
        # collective: every rank, every epoch)
        rank_rngs = dist.all_gather_object(rng_state()) if dist.distributed else None
        if dist.is_main:
            for k, v in stats.losses.items():
                writer.add_scalar(f"epoch/{k}", v, epoch)
            writer.add_scalar("epoch/loss", stats.loss, epoch)
            writer.add_scalar("epoch/seconds", stats.seconds, epoch)
            is_last = epoch == end_epoch - 1
            if eval_sets and (is_last or (epoch + 1) % max(1, int(args.eval_every)) == 0):
                entry["val"] = {}
                for name, ds in eval_sets.items():
                    preds = predict(core, ds, dist.device, 2, dist.autocast, f"val {name}")
                    r = evaluate(core, ds, dist.device, args.score_threshold, predictions=preds)
                    last[name] = r
                    entry["val"][name] = summary(r)
                    for k, v in tb_scalars(summary(r)).items():
                        writer.add_scalar(f"val/{name}/{k}", v, epoch)
                    for i in range(min(int(args.tb_images), len(ds))):
                        img = draw_predictions(ds[i][0], preds[i], args.score_threshold)
                        writer.add_image(f"val_pred/{name}/{i}", img, epoch)
            log.info("%s", epoch_line(epoch, int(args.epochs), stats, entry.get("val", {})))
            history.append(entry)
            with atomic_path(checkpoint) as tmp:
                save_checkpoint(
                    tmp,
                    model,
                    model_args,
                    optimizer=opt.state_dict(),
                    scheduler=sched.state_dict(),
                    epoch=epoch,
                    rng=rng_state(),
                    **({"rng_ranks": rank_rngs} if rank_rngs is not None else {}),
                    history=history,
                    **(checkpoint_extra or {}),
                    format_version=DETECTOR_FORMAT_VERSION,
                    code=code_record(),  # which code trained it (cached: git is asked once)
                )
            writer.flush()
        ebar.update(1)
        dist.barrier()
    ebar.close()

    if not dist.is_main:
        return None
    final: dict[str, Any] = {"val": {}, "test": {}}
    for name, ds in eval_sets.items():
        if name not in last:  # e.g. resumed after the last epoch
            last[name] = evaluate(core, ds, dist.device, args.score_threshold)
        final["val"][name] = last[name].as_dict()
        warn_if_blind(name, last[name].recall)
    for name, ds in test_sets.items():
        r = evaluate(core, ds, dist.device, args.score_threshold)
        final["test"][name] = r.as_dict()
        for k, val_ in tb_scalars(summary(r)).items():
            writer.add_scalar(f"test/{name}/{k}", val_, int(args.epochs))
        log.info("test %s: %s", name, metrics_text(summary(r)))
    final.update(
        epochs=int(args.epochs),
        epochs_done=(history[-1]["epoch"] + 1) if history else 0,
        train_images=len(train_ds),
        seconds=round(time.time() - t_start, 1),  # this process (a resume: its part only)
        # every epoch's training time, across resumes (history keeps the earlier ones)
        train_seconds_all_epochs=round(
            sum(float(h.get("train", {}).get("seconds", 0.0)) for h in history), 1
        ),
        history=history,
        score_threshold=float(args.score_threshold),
    )
    writer.close()
    return final
