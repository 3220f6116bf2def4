"""stage=segment_train: train the Mask R-CNN white-cell segmenter.

Reads the simulator's smears (``data=synthetic``) or the real sets listed in
``data.smear_sources`` (``data=bccd|txl_pbc|segmentation_wbc|real``), trains
``segmentation.arch`` with warm-up + schedule, gradient clipping and a stop
on a non-finite loss, checkpoints every epoch to ``model.pt`` (``resume=true``
continues from it exactly), logs every loss term, the LR, validation metrics
and drawn predictions to ``tb/``, and writes ``metrics.json`` (pycocotools
box/mask AP, recall at ``segmentation.score_threshold``, mean mask IoU) per
validation / test source. Runs under DDP through ``ctx.dist``; only rank 0
writes.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import write_json
from pipeline.stages import StageContext, StageError, stage
from segmentation.datasets import (
    READERS,
    DetectionDataset,
    SmearDataset,
    collate,
    read_coco,
    with_scale,
)
from segmentation.engine import (
    EvalResult,
    draw_predictions,
    evaluate,
    predict,
    train_one_epoch,
    warmup_schedule,
)
from segmentation.model import build_maskrcnn, save_checkpoint
from segmentation.pseudomask import PseudoMasker
from segmentation.transforms import AugmentOptions, build_train_transform

log = logging.getLogger(__name__)


def _needs(cfg: DictConfig) -> list[str]:
    return ["smears"] if cfg.data.name == "synthetic" else []


def _resolve(cfg: DictConfig, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(cfg.paths.shared_data) / p


def load_sets(
    cfg: DictConfig, smears: Path | None
) -> tuple[SmearDataset, dict[str, SmearDataset], dict[str, SmearDataset], list[int]]:
    """Training records and, per source name, validation and test records.

    Returns ``(train, val, test, donors)``; ``donors`` indexes training records
    whose masked cells may be copy-pasted.
    """
    sc = cfg.segmentation
    train, val, test = SmearDataset(), {}, {}
    donors: list[int] = []
    if cfg.data.name == "synthetic":
        ann = cfg.paths.inputs.get("annotations") or (Path(smears) / "annotations.json")
        ds = read_coco(ann, image_root=smears, source="synthetic")
        ds = with_scale(ds, float(sc.input_scale), sc.cell_px)
        sources = [("synthetic", ds, ["train"], ["val"], [], 1, False)]
    else:
        if not cfg.data.smear_sources:
            raise StageError(
                f"data={cfg.data.name} lists no smear_sources; use data=synthetic or a "
                f"config from conf/data/ (bccd, txl_pbc, segmentation_wbc, real)"
            )
        sources = []
        for i, src in enumerate(cfg.data.smear_sources):
            if src.format not in READERS:
                raise StageError(
                    f"data.smear_sources[{i}].format={src.format!r}; valid: {', '.join(READERS)}"
                )
            path = _resolve(cfg, src.path)
            if not path.exists():
                raise StageError(
                    f"data.smear_sources[{i}].path={src.path} -> {path}: not found "
                    f"(set paths.shared_data=... or an absolute path)"
                )
            name = src.name or path.name
            splits = [*src.train_splits, *src.val_splits, *src.test_splits]
            if src.format == "voc":
                ds = READERS["voc"](path, splits=splits, source=name)
            elif src.format == "yolo":
                ds = READERS["yolo"](path, splits=splits, source=name)
            elif src.format == "mask_png":
                ds = READERS["mask_png"](
                    path, val_fraction=src.val_fraction, seed=cfg.seed, source=name
                )
            else:
                ds = READERS["coco"](path, source=name)
            ds = with_scale(ds, src.scale, sc.cell_px)
            sources.append(
                (
                    name,
                    ds,
                    list(src.train_splits),
                    list(src.val_splits),
                    list(src.test_splits),
                    int(src.repeat),
                    bool(src.copy_paste_donor),
                )
            )
    for name, ds, tr, va, te, repeat, donor in sources:
        t = ds.split(*tr)
        if sc.max_train_images:
            t = SmearDataset(t.images[: sc.max_train_images])
        start = len(train)
        train = train + SmearDataset(t.images * max(1, repeat))
        if donor:
            donors += list(range(start, start + len(t)))
        if va:
            v = ds.split(*va)
            if sc.max_val_images:
                v = SmearDataset(v.images[: sc.max_val_images])
            if len(v):
                val[name] = v.renumber()
        if te:
            tst = ds.split(*te)
            if len(tst):
                test[name] = tst.renumber()
        log.info(
            "source %s: %d train, %d val, %d test images; %s",
            name,
            len(t),
            len(val.get(name, [])),
            len(test.get(name, [])),
            ds.counts(),
        )
    train.renumber()
    if len(train) == 0:
        raise StageError("no training images: check data.smear_sources[*].train_splits")
    return train, val, test, donors


def model_args_from(cfg: DictConfig) -> dict[str, Any]:
    sc = cfg.segmentation
    return {
        "arch": sc.arch,
        "num_classes": 2,
        "min_size": int(sc.min_size),
        "max_size": int(sc.max_size),
        "trainable_backbone_layers": int(sc.trainable_backbone_layers),
        # the data pipeline scales images; the network takes them as they come
        "input_scale": 1.0,
        "anchor_sizes": [int(a) for a in sc.anchor_sizes],
        "fpn_channels": int(sc.fpn_channels),
        "box_representation": int(sc.box_representation),
        "mask_head_layers": int(sc.mask_head_layers),
        "rpn_pre_nms_top_n_train": int(sc.rpn_pre_nms_top_n_train),
        "rpn_post_nms_top_n_train": int(sc.rpn_post_nms_top_n_train),
        "rpn_pre_nms_top_n_test": int(sc.rpn_pre_nms_top_n_test),
        "rpn_post_nms_top_n_test": int(sc.rpn_post_nms_top_n),
        "rpn_batch_size_per_image": int(sc.rpn_batch_size_per_image),
        "box_batch_size_per_image": int(sc.box_batch_size_per_image),
        "box_detections_per_img": int(sc.max_detections_per_tile),
    }


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - libraries may use it
        "python": random.getstate(),
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])  # noqa: NPY002
    random.setstate(s["python"])


def _summary(r: EvalResult) -> dict[str, Any]:
    keys = ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75")
    out = {k: getattr(r, k) for k in keys}
    out.update(recall=r.recall, precision=r.precision, mean_mask_iou=r.mean_mask_iou)
    return out


@stage(
    "segment_train",
    needs=_needs,
    produces=["segmentation_model", "metrics.json"],
    distributed=True,
)
def segment_train(ctx: StageContext) -> None:
    cfg, dist = ctx.cfg, ctx.dist
    sc = cfg.segmentation
    t_start = time.time()
    for k, valid in (
        ("mask_mode", ("ignore", "pseudo", "box")),
        ("optimizer", ("sgd", "adamw")),
        ("schedule", ("cosine", "step", "constant")),
    ):
        if sc[k] not in valid:
            raise StageError(f"segmentation.{k}={sc[k]!r}; valid: {', '.join(valid)}")
    seed = int(cfg.seed)
    torch.manual_seed(seed + dist.rank)
    np.random.seed(seed + dist.rank)  # noqa: NPY002
    random.seed(seed + dist.rank)

    smears = ctx.input("smears") if cfg.data.name == "synthetic" else None
    train, val, test, donors = load_sets(cfg, smears)
    pseudo = PseudoMasker(sc.pseudo_method)
    aug = build_train_transform(
        AugmentOptions(
            flips=sc.aug_flips,
            rot90=sc.aug_rot90,
            scale_range=(float(sc.aug_scale[0]), float(sc.aug_scale[1])),
            crop_size=int(sc.aug_crop),
            color_jitter=float(sc.aug_color),
            stain_jitter=float(sc.aug_stain),
            blur_p=float(sc.aug_blur),
            noise_p=float(sc.aug_noise),
        )
    )
    post = None
    if sc.copy_paste > 0 and not donors:
        log.info("copy-paste off: no data.smear_sources[*] has copy_paste_donor=true")
    if sc.copy_paste > 0 and donors:
        from segmentation.copy_paste import CopyPaste

        post = CopyPaste(
            [train.images[i] for i in donors], p=float(sc.copy_paste), max_cells=sc.copy_paste_max
        )
    train_ds = DetectionDataset(
        train.images, aug, sc.mask_mode, pseudo, seed=seed, cache=sc.cache_images, post=post
    )
    sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed
    )
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=int(sc.train_batch_size),
        sampler=sampler,
        collate_fn=collate,
        num_workers=int(cfg.hardware.num_workers),
        pin_memory=bool(cfg.hardware.pin_memory),
    )
    eval_sets = {n: DetectionDataset(v.images, None, sc.mask_mode, pseudo) for n, v in val.items()}

    margs = model_args_from(cfg)
    model = build_maskrcnn(**margs, pretrained_weights=sc.pretrained_weights)
    model = dist.wrap(model)
    core = model.module if hasattr(model, "module") else model
    params = [p for p in model.parameters() if p.requires_grad]
    if sc.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=sc.lr, momentum=sc.momentum, weight_decay=sc.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=sc.lr, weight_decay=sc.weight_decay)
    total = int(sc.epochs) * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_schedule(total, int(sc.warmup_iters), sc.schedule)
    )

    ckpt_path = ctx.output("segmentation_model")
    start_epoch, history = 0, []
    if cfg.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dist.device, weights_only=False)
        if "optimizer" not in ck:
            raise StageError(f"{ckpt_path}: no optimizer state; cannot resume (overwrite=true)")
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        start_epoch = int(ck["epoch"]) + 1
        history = list(ck.get("history", []))
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)

    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(ctx.dir / "tb"))
    log.info(
        "segment_train: %d training images (%d iterations/epoch, %d epochs), val sources %s, "
        "device %s x%d",
        len(train_ds),
        len(loader),
        sc.epochs,
        list(val),
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
            writer.add_scalar("train/lr", lr, step)

        return f

    last: dict[str, EvalResult] = {}
    end_epoch = int(sc.epochs)
    if sc.stop_after_epochs:
        end_epoch = min(end_epoch, int(sc.stop_after_epochs))
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
            grad_clip=float(sc.grad_clip) or None,
            autocast=dist.autocast,
            on_iteration=on_iter(epoch),
            log_every=int(sc.log_every),
            reduce=dist.all_reduce_mean if dist.distributed else None,
        )
        entry: dict[str, Any] = {"epoch": epoch, "train": asdict(stats)}
        if dist.is_main:
            for k, v in stats.losses.items():
                writer.add_scalar(f"epoch/{k}", v, epoch)
            writer.add_scalar("epoch/loss", stats.loss, epoch)
            writer.add_scalar("epoch/seconds", stats.seconds, epoch)
            is_last = epoch == end_epoch - 1
            if eval_sets and (is_last or (epoch + 1) % max(1, int(sc.eval_every)) == 0):
                entry["val"] = {}
                for name, ds in eval_sets.items():
                    preds = predict(core, ds, dist.device, 2, dist.autocast)
                    r = evaluate(core, ds, dist.device, sc.score_threshold, predictions=preds)
                    last[name] = r
                    entry["val"][name] = _summary(r)
                    for k, v in _summary(r).items():
                        if v is not None:
                            writer.add_scalar(f"val/{name}/{k}", v, epoch)
                    for i in range(min(int(sc.tb_images), len(ds))):
                        img = draw_predictions(ds[i][0], preds[i], sc.score_threshold)
                        writer.add_image(f"val_pred/{name}/{i}", img, epoch)
                log.info(
                    "epoch %d: loss %.3f (%.0f s); val %s",
                    epoch,
                    stats.loss,
                    stats.seconds,
                    {
                        n: {k: round(v, 3) for k, v in s.items() if v is not None}
                        for n, s in entry.get("val", {}).items()
                    },
                )
            history.append(entry)
            with ctx.atomic("segmentation_model") as tmp:
                save_checkpoint(
                    tmp,
                    model,
                    margs,
                    optimizer=opt.state_dict(),
                    scheduler=sched.state_dict(),
                    epoch=epoch,
                    rng=_rng_state(),
                    history=history,
                    config=OmegaConf.to_container(cfg, resolve=True),
                    input_scale=float(sc.input_scale) if cfg.data.name == "synthetic" else None,
                    cell_px=float(sc.cell_px),
                )
            writer.flush()
        dist.barrier()

    if not dist.is_main:
        return
    final: dict[str, Any] = {"val": {}, "test": {}}
    for name, ds in eval_sets.items():
        if name not in last:  # e.g. resumed after the last epoch
            last[name] = evaluate(core, ds, dist.device, sc.score_threshold)
        final["val"][name] = last[name].as_dict()
    for name, v in test.items():
        ds = DetectionDataset(v.images, None, sc.mask_mode, pseudo)
        r = evaluate(core, ds, dist.device, sc.score_threshold)
        final["test"][name] = r.as_dict()
        for k, val_ in _summary(r).items():
            if val_ is not None:
                writer.add_scalar(f"test/{name}/{k}", val_, int(sc.epochs))
        log.info("test %s: %s", name, {k: v for k, v in _summary(r).items() if v is not None})
    final.update(
        epochs=int(sc.epochs),
        epochs_done=(history[-1]["epoch"] + 1) if history else 0,
        train_images=len(train_ds),
        seconds=round(time.time() - t_start, 1),
        pseudo_masks={"watershed": pseudo.stats.watershed, "ellipse": pseudo.stats.ellipse},
        history=history,
        score_threshold=float(sc.score_threshold),
    )
    write_json(ctx.output("metrics.json"), final)
    writer.close()
