"""stage=segment_train: train the Mask R-CNN white-cell segmenter.

Reads the simulator's smears (``data=synthetic``) or the real sets listed in
``data.smear_sources`` (``data=bccd|txl_pbc|segmentation_wbc|real``), trains
``segmentation.arch`` with warm-up + schedule, gradient clipping and a stop
on a non-finite loss, checkpoints every epoch to ``model.pt`` (``resume=true``
continues from it exactly), logs every loss term, the LR, validation metrics
and drawn predictions to ``tb/``, and writes ``metrics.json`` (pycocotools
box/mask AP, recall at ``segmentation.score_threshold``, mean mask IoU) per
validation / test source. Runs under DDP through ``ctx.dist``; only rank 0
writes. The training recipe is :func:`segmentation.train.fit`; this file maps
the config onto it. An unreadable image or a malformed annotation file is left
out with a warning and listed in ``rejects.csv`` (field ``image`` / ``annotation``,
counted in ``metrics.json`` as ``skipped_files``), and so is a single COCO annotation
whose box or mask is unusable while its image is kept (field ``bbox`` /
``segmentation``, counted as ``skipped_annotations``); only a set with no trainable
image, or no white-cell box, left stops the stage.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import pretrained_weights_path, spreadsheet_safe, write_json
from pipeline.runner import StageContext, StageError, resolve_data_path, stage

# rejects.csv of stage=segment_train (the files left out of training and why) has the
# columns of stage=segment's
from pipeline.segment_sources import REJECT_COLUMNS
from segmentation.datasets import (
    ANNOTATION_FIELDS,
    READERS,
    AnnotationError,
    DetectionDataset,
    Skip,
    SmearDataset,
    apply_box_review,
    drop_unreadable,
    read_box_review,
    read_coco,
    record_skip,
    with_scale,
)
from segmentation.runtime import seed_everything

log = logging.getLogger(__name__)


def _needs(cfg: DictConfig) -> list[str]:
    return ["smears"] if cfg.data.name == "synthetic" else []


def _resolve(cfg: DictConfig, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(cfg.paths.shared_data) / p


# images an annotation file names that are missing: up to this share of its images are
# skipped and reported (a file deleted from a large set); more mean a wrong folder
MISSING_IMAGES_SKIPPED = 0.05


def _white_cells_left_out(skips: list[Skip], classes: Any = ()) -> list[Skip]:
    """The annotations in ``skips`` left out whose class is a white cell (``wbc``, or one
    of the source's ``wbc_classes``, case-insensitive)."""
    want = {"wbc", *(str(c).strip().lower() for c in classes or ())}
    return [k for k in skips if k.field in ANNOTATION_FIELDS and k.category.lower() in want]


def _reject_rows(source: str, skips: list[Skip]) -> list[dict[str, str]]:
    return [
        {
            "source": source,
            "image": str(k.path),
            "field": k.field,
            "action": "skipped",
            "reason": k.reason,
        }
        for k in skips
    ]


def write_rejects(path: Path, rows: list[dict[str, str]]) -> None:
    """``rows`` as a CSV with :data:`REJECT_COLUMNS` (a header only when there are none).

    Quoted for spreadsheets as every other ``rejects.csv`` is
    (:func:`segmentation.io.spreadsheet_safe`): a smear folder named ``=HYPERLINK(...)``
    (the source's default name, and the start of each image path under a relative
    ``paths.shared_data``) opens as its name, not as a formula."""
    table = pd.DataFrame(rows, columns=REJECT_COLUMNS, dtype=object)
    # "\n": the csv module's "\r\n" made this the one CSV of the study with Windows line
    # ends (pandas' default is the OS's)
    spreadsheet_safe(table).to_csv(path, index=False, lineterminator="\n")


def load_sets(
    cfg: DictConfig, smears: Path | None, rejects: list[dict[str, str]] | None = None
) -> tuple[SmearDataset, dict[str, SmearDataset], dict[str, SmearDataset], list[int]]:
    """Training records and, per source name, validation and test records.

    Returns ``(train, val, test, donors)``; ``donors`` indexes training records
    whose masked cells may be copy-pasted.

    An image that cannot be read or does not match its annotation, and an annotation
    file that is malformed or names a missing image (VOC, YOLO, mask PNGs), is left
    out with a warning and added to ``rejects`` (rows of :data:`REJECT_COLUMNS`), so
    one bad file does not stop training mid-epoch. Images a COCO file names that are
    not there are left out the same way when they are at most
    :data:`MISSING_IMAGES_SKIPPED` of the file's images; more stop the run (most often a
    wrong ``image_root``).

    Raises
    ------
    StageError
        No training image is left, or none has a white-cell box.
    """
    sc = cfg.segmentation
    rejects = [] if rejects is None else rejects
    train, val, test = SmearDataset(), {}, {}
    donors: list[int] = []
    white_out: list[Skip] = []  # white-cell annotations left out (bad bbox / mask)
    if cfg.data.name == "synthetic":
        ann = cfg.paths.inputs.get("annotations") or (Path(smears) / "annotations.json")
        skips: list[Skip] = []
        ds = read_coco(ann, image_root=smears, source="synthetic", skipped=skips)
        ds = drop_unreadable(ds, skips)
        rejects += _reject_rows("synthetic", skips)
        white_out += _white_cells_left_out(skips)
        ds = with_scale(ds, float(sc.input_scale), sc.cell_px)
        sources = [("synthetic", ds, ["train"], ["val"], [], 1, False)]
    else:
        if not cfg.data.smear_sources:
            raise StageError(
                f"data={cfg.data.name} lists no smear_sources; use data=synthetic or a "
                f"config from pipeline/conf/data/ (bccd, txl_pbc, segmentation_wbc, real)"
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
            skips = []
            if src.format == "voc":
                ds = READERS["voc"](path, splits=splits, source=name, skipped=skips)
            elif src.format == "yolo":
                ds = READERS["yolo"](path, splits=splits, source=name, skipped=skips)
            elif src.format in ("mask_png", "geojson"):  # one held-out share per folder
                ds = READERS[src.format](
                    path, val_fraction=src.val_fraction, seed=cfg.seed, source=name, skipped=skips
                )
            else:
                root = _resolve(cfg, src.image_root) if src.get("image_root") else None
                ds = READERS["coco"](
                    path,
                    image_root=root,
                    source=name,
                    val_fraction=float(src.val_fraction) if src.val_splits else 0.0,
                    seed=int(cfg.seed),
                    skipped=skips,
                )
            gone = [r.path for r in ds if not Path(r.path).is_file()]
            if gone and len(gone) <= MISSING_IMAGES_SKIPPED * len(ds):
                # a few files gone from a large set: left out and reported, as an
                # unreadable one is; many gone is a wrong folder (refused below)
                for g in gone:
                    record_skip(skips, g, f"named by {path} but not there")
                missing = set(gone)
                ds = SmearDataset([r for r in ds if r.path not in missing])
                gone = []
            if gone:  # found before training, not when the first epoch reaches them
                raise StageError(
                    f"data.smear_sources[{i}]: {len(gone)} of {len(ds)} images named by "
                    f"{path} are not there, e.g. {gone[0]}"
                    + (
                        " (COCO file_name is read under data.smear_sources[N].image_root, "
                        "else the JSON's folder)"
                        if src.format == "coco"
                        else ""
                    )
                )
            # one unreadable image among many: left out now, not an error mid-epoch
            ds = drop_unreadable(ds, skips)
            rejects += _reject_rows(name, skips)
            white_out += _white_cells_left_out(skips, src.get("wbc_classes"))
            if src.get("wbc_classes"):
                ds = as_white_cells(ds, list(src.wbc_classes))
            for k, rv in enumerate(src.get("box_review") or []):
                setting = f"data.smear_sources[{i}].box_review[{k}]"
                f = resolve_data_path(cfg, rv, setting)
                try:
                    n = apply_box_review(ds, read_box_review(f))
                except (AnnotationError, FileNotFoundError) as e:
                    raise StageError(f"{setting}: {e}") from None
                log.info(
                    "source %s: %d white-cell box(es) take their reviewed class from %s "
                    "(%d entries; %d name images not in this source)",
                    name,
                    n["n_relabelled"],
                    f,
                    n["n_entries"],
                    n["n_other_images"],
                )
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
    files = [r for r in rejects if r["field"] not in ANNOTATION_FIELDS]
    if len(train) == 0 and files:
        first = files[0]
        # the skips need not be the cause (a train split named wrong leaves none too)
        raise StageError(
            f"no trainable image left: {len(files)} file(s) were skipped as unreadable or "
            f"malformed and no training image remains (first: {first['image']}: "
            f"{first['reason']}); fix or replace them, or, if they were not training "
            f"images, check data.smear_sources[*].train_splits"
        )
    if len(train) == 0:
        raise StageError("no training images: check data.smear_sources[*].train_splits")
    # a white-cell annotation left out (bad bbox / mask) may be why none is left; one of
    # another class is not, and the class names are then what to fix
    if white_out and not any(a.category == "wbc" for r in train for a in r.instances):
        first = white_out[0]
        raise StageError(
            f"no white-cell box left among the {len(train)} training images: "
            f"{len(white_out)} annotation(s) were left out (first: {first.path}: "
            f"{first.reason}); fix their bbox / segmentation fields"
        )
    if not any(a.category == "wbc" for r in train for a in r.instances):
        seen = {k: v for k, v in train.counts().items() if k not in ("images", "wbc_with_mask")}
        cells = [k for k in seen if k not in ("rbc", "platelet")]  # candidates
        n_ann = sum(r["field"] in ANNOTATION_FIELDS for r in rejects)
        also = f" ({n_ann} annotation(s) were also left out)" if n_ann else ""
        raise StageError(
            f"no white-cell box among the {len(train)} training images (classes found: "
            f"{', '.join(f'{k} {v}' for k, v in seen.items()) or 'none'}){also}: the detector "
            f"would learn to find nothing. Name the white-cell classes of your annotations "
            f"with data.smear_sources[N].wbc_classes="
            f"[{','.join(cells) if cells else 'neutrophil,lymphocyte'}], or call them wbc / "
            f"leukocyte in the file"
        )
    if not val:  # after the stops above: a run that cannot train needs no such warning
        log.warning("%s", _no_val_message(cfg))
    return train, val, test, donors


def _no_val_message(cfg: DictConfig) -> str:
    """The warning of a run with no validation image: what it loses, and the setting
    that would give it a val split."""
    if cfg.data.name == "synthetic":
        how = (
            "the simulator's annotations.json has no image of split 'val' (simulate more "
            "smears, or give a folder whose images include a val split)"
        )
    else:
        how = (
            "no data.smear_sources[N] has images in its val_splits: name the split that "
            "holds them (data.smear_sources[N].val_splits=[val]), or, for a COCO file "
            "without 'split' fields or a mask_png / geojson folder, hold a share out with "
            "data.smear_sources[N].val_fraction=0.2 (with val_splits non-empty)"
        )
    return (
        f"segment_train: no validation images: {how}. Without them metrics.json 'val' "
        f"stays empty: no box / mask AP or recall says whether model.pt finds cells"
    )


def as_white_cells(ds: SmearDataset, classes: list[str]) -> SmearDataset:
    """``ds`` with the instances of ``classes`` (case-insensitive) relabelled ``wbc``: a
    lab annotates cell types, the detector learns one white-cell class."""
    from dataclasses import replace

    want = {str(c).strip().lower() for c in classes}
    return SmearDataset(
        [
            replace(
                r,
                instances=[
                    replace(a, category="wbc") if a.category.lower() in want else a
                    for a in r.instances
                ],
            )
            for r in ds
        ]
    )


def scale_record(cfg: DictConfig) -> dict[str, Any]:
    """What the checkpoint says about the magnification its smears are to be read at.

    Simulated smears share one scale (``input_scale``). Real smears were brought to
    ``cell_px`` source by source (a fixed scale, or their boxes), so a new smear's
    magnification is unknown: ``estimate_scale`` makes stage=segment / embed measure
    it unless told otherwise (``segmentation.estimate_scale``, a data config's fixed
    scale); the detector's second pass stays off for such a model (``refine_scale``;
    docs/segmentation_infer.md, "Detector-refined scale").
    """
    sc = cfg.segmentation
    if cfg.data.name == "synthetic":
        return {"input_scale": float(sc.input_scale), "cell_px": float(sc.cell_px)}
    return {
        "input_scale": None,
        "cell_px": float(sc.cell_px),
        "estimate_scale": True,
        "refine_scale": False,
    }


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


# model_args that set weight shapes: a start trained with other values cannot load
_SHAPE_ARGS = ("arch", "num_classes", "fpn_channels", "box_representation", "mask_head_layers")


def _check_start_fits(cfg: DictConfig) -> None:
    """``segmentation.pretrained_weights`` loads safely (``weights_only``; a missing or
    foreign file is named) and, when one of our checkpoints, has this run's weight
    shapes: so ``stage=all`` stops before its first stage, not at this one."""
    sc = cfg.segmentation
    start = pretrained_weights_path(sc.pretrained_weights)
    if start is None:
        return
    from segmentation.io import UnsafeCheckpointError, load_torch_file

    try:
        ck = load_torch_file(start, "cpu", "segmentation.pretrained_weights")
    except UnsafeCheckpointError as e:
        raise StageError(str(e)) from None
    have = ck.get("model_args") if isinstance(ck, dict) else None
    if not isinstance(have, dict):
        return  # a plain state dict (e.g. torchvision's): checked as it loads
    from segmentation.model import detector_checkpoint_problem

    # a VAE's model.pt (model + model_args too) loaded 20 of 156 weights by chance of
    # names, with a warning, and trained from scratch (audit s52 S4)
    why = detector_checkpoint_problem(ck)
    if why is not None:
        raise StageError(
            f"segmentation.pretrained_weights={sc.pretrained_weights} ({start}): not a "
            f"segmentation model checkpoint: {why}; give a segment_train model.pt, or "
            f"train from scratch (segmentation.pretrained_weights=null)"
        )
    want = model_args_from(cfg)
    diff = [k for k in _SHAPE_ARGS if k in have and have[k] != want[k]]
    if diff:
        raise StageError(
            f"segmentation.pretrained_weights={sc.pretrained_weights} ({start}) was trained with "
            + ", ".join(f"{k}={have[k]}" for k in diff)
            + "; this run has "
            + ", ".join(f"segmentation.{k}={want[k]}" for k in diff)
            + ": set those to match, or train from scratch (segmentation.pretrained_weights=null)"
        )


def _validate(cfg: DictConfig) -> None:
    """Choices, the real smear folders and the starting weights (before any folder is made)."""
    sc = cfg.segmentation
    for k, valid in (
        ("mask_mode", ("ignore", "pseudo", "box")),
        ("optimizer", ("sgd", "adamw")),
        ("schedule", ("cosine", "step", "constant")),
    ):
        if sc[k] not in valid:
            raise StageError(f"segmentation.{k}={sc[k]!r}; valid: {', '.join(valid)}")
    if cfg.data.name != "synthetic":
        if not cfg.data.smear_sources:
            raise StageError(f"data={cfg.data.name} lists no smear_sources")
        for i, src in enumerate(cfg.data.smear_sources):
            if src.format not in READERS:
                raise StageError(
                    f"data.smear_sources[{i}].format={src.format!r}; valid: {', '.join(READERS)}"
                )
            if not _resolve(cfg, src.path).exists():
                raise StageError(
                    f"data.smear_sources[{i}].path={src.path} -> {_resolve(cfg, src.path)}: "
                    f"not found (set paths.shared_data=... or an absolute path)"
                )
    _check_start_fits(cfg)


@stage(
    "segment_train",
    needs=_needs,
    produces=["segmentation_model", "metrics.json"],
    distributed=True,
    validate=_validate,
)
def segment_train(ctx: StageContext) -> None:
    cfg, dist = ctx.cfg, ctx.dist
    # the recipe's imports (torchvision, albumentations: ~5 s) wait until the stage runs,
    # so every other stage and every settings error starts without them
    from pipeline.runner import interrupted
    from segmentation.pseudomask import PseudoMasker
    from segmentation.train import FitArgs, FitError, fit
    from segmentation.transforms import AugmentOptions, build_train_transform

    sc = cfg.segmentation
    t_start = time.time()
    seed = int(cfg.seed)
    seed_everything(seed + dist.rank)

    smears = ctx.input("smears") if cfg.data.name == "synthetic" else None
    rejects: list[dict[str, str]] = []
    train, val, test, donors = load_sets(cfg, smears, rejects)
    n_ann = sum(r["field"] in ANNOTATION_FIELDS for r in rejects)
    if len(rejects) > n_ann:
        log.warning(
            "segment_train: %d file(s) left out of training as unreadable or malformed; "
            "listed in %s",
            len(rejects) - n_ann,
            ctx.output("rejects.csv"),
        )
    if n_ann:
        log.warning(
            "segment_train: %d annotation(s) left out (box outside the image, mask empty "
            "or outside its box); listed in %s",
            n_ann,
            ctx.output("rejects.csv"),
        )
    if ctx.is_main:  # written now, so a run that fails later still says what was left out
        with ctx.atomic("rejects.csv") as tmp:
            write_rejects(tmp, rejects)
    pseudo = PseudoMasker(sc.pseudo_method)
    aug = build_train_transform(
        AugmentOptions(
            flips=sc.aug_flips,
            rot90=sc.aug_rot90,
            scale_range=(float(sc.aug_scale[0]), float(sc.aug_scale[1])),
            crop_size=int(sc.aug_crop),
            border_crop=float(sc.aug_border_crop),
            cut_cell=float(sc.aug_cut_cell),
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
        train.images,
        aug,
        sc.mask_mode,
        pseudo,
        seed=seed,
        cache=sc.cache_images,
        post=post,
        skip_unreadable=True,
    )
    args = FitArgs(
        epochs=int(sc.epochs),
        optimizer=sc.optimizer,
        lr=float(sc.lr),
        momentum=float(sc.momentum),
        weight_decay=float(sc.weight_decay),
        schedule=sc.schedule,
        warmup_iters=int(sc.warmup_iters),
        grad_clip=float(sc.grad_clip),
        batch_size=int(sc.train_batch_size),
        stop_after_epochs=sc.stop_after_epochs,
        eval_every=int(sc.eval_every),
        score_threshold=float(sc.score_threshold),
        tb_images=int(sc.tb_images),
        log_every=int(sc.log_every),
        num_workers=int(cfg.hardware.num_workers),
        pin_memory=bool(cfg.hardware.pin_memory),
        seed=seed,
        resume=bool(cfg.resume),
    )
    eval_sets = {n: DetectionDataset(v.images, None, sc.mask_mode, pseudo) for n, v in val.items()}
    test_sets = {n: DetectionDataset(v.images, None, sc.mask_mode, pseudo) for n, v in test.items()}
    try:
        final = fit(
            model_args_from(cfg),
            train_ds,
            eval_sets,
            test_sets,
            args,
            dist,
            checkpoint=ctx.output("segmentation_model"),
            tb_dir=ctx.dir / "tb",
            pretrained_weights=pretrained_weights_path(sc.pretrained_weights),
            checkpoint_extra={
                "config": OmegaConf.to_container(cfg, resolve=True),
                **scale_record(cfg),
            },
            should_stop=interrupted,  # a Ctrl-C a library swallowed stops at the next step
        )
    except FitError as e:
        raise StageError(str(e)) from e
    # images that failed only when training read them: each process read its own shard,
    # so every rank's are gathered (rank 1's never reached rejects.csv; DDP audit). A
    # collective: every rank calls it, rank 0 once its evaluation is done
    skipped = list(train_ds.skipped)
    if dist is not None and dist.distributed:
        seen: dict[str, object] = {}
        for part in dist.all_gather_object(skipped):
            for k in part:
                seen.setdefault(str(k.path), k)
        skipped = list(seen.values())
    if final is None:  # not rank 0
        return
    if skipped:
        source = {str(r.path): r.source for r in train.images}
        for k in skipped:
            rejects += _reject_rows(source.get(str(k.path), ""), [k])
        with ctx.atomic("rejects.csv") as tmp:
            write_rejects(tmp, rejects)
    # listed in rejects.csv: whole files, and single annotations left out
    final["skipped_files"] = sum(r["field"] not in ANNOTATION_FIELDS for r in rejects)
    final["skipped_annotations"] = sum(r["field"] in ANNOTATION_FIELDS for r in rejects)
    final["seconds"] = round(time.time() - t_start, 1)
    final["pseudo_masks"] = {"watershed": pseudo.stats.watershed, "ellipse": pseudo.stats.ellipse}
    write_json(ctx.output("metrics.json"), final)
