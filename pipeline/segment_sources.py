"""``stage=segment`` on the real images listed in ``data.segment_sources``.

Used by :mod:`pipeline.stages.segment` when that list is not empty (``+preset=real``).
Each ``kind=smears`` source is segmented like the simulator's smears (tiled
inference, filters, masked crops); its kept cells take a label from the
source's class list where that is unambiguous
(:func:`segmentation.sources.label_for_image`), else enter unlabelled. Each
``kind=crop_folder`` source (ImageFolder of single-cell crops without masks) is
run crop by crop; the kept detection covering the crop centre gives the mask
(:func:`segmentation.sources.pick_centre_cell`), the folder the label, and the
cell fills its crop whatever the zoom the crop was cut at (``crop_fill``, as
``stage=embed`` reads crop folders); a crop without one is a ``rejects.csv`` row.
All cells go into one ``cells.h5ad`` (``obs``: ``source``, ``label``,
``label_status``, ``mode``).

Runs on rank 0 only (other DDP ranks return at once).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.artifacts import spreadsheet_safe, write_json
from pipeline.config_sources import LABEL_FORMATS, SEGMENT_SOURCE_KINDS
from pipeline.runner import StageContext, StageError, resolve_data_path
from segmentation.cells import SegmentSettings, contact_sheet, reject_sheet
from segmentation.crops import FLAGS
from segmentation.io import list_images, read_rgb, recorded_name, write_h5ad
from segmentation.progress import bar
from segmentation.shipped import wants_scale_refinement
from segmentation.sources import (
    LabelFileError,
    crop_folder_filters,
    label_for_image,
    list_crop_folder,
    read_bccd_labels,
)
from segmentation.table import (
    cells_adata,
    empty_table,
    merge_parts,
    specimen_ids,
)

log = logging.getLogger(__name__)

# cell_id / detail: filled for a rejected smear cell (segmentation.cells.reject_rows), as
# in a folder run's rejects.csv; they were dropped here, so the real chain's rejected cells
# could not be joined to detections.csv
REJECT_COLUMNS = ["source", "image", "field", "action", "reason", "cell_id", "detail"]


def validate_sources(cfg: Any) -> None:
    """Check every ``data.segment_sources`` entry before any work (raises StageError)."""
    names = set()
    for k, src in enumerate(cfg.data.segment_sources):
        at = f"data.segment_sources[{k}]"
        if src.kind not in SEGMENT_SOURCE_KINDS:
            raise StageError(f"{at}.kind={src.kind!r}; valid: {', '.join(SEGMENT_SOURCE_KINDS)}")
        if src.labels_format not in LABEL_FORMATS:
            raise StageError(
                f"{at}.labels_format={src.labels_format!r}; valid: {', '.join(LABEL_FORMATS)}"
            )
        if src.name in names:
            raise StageError(f"{at}.name={src.name!r} is used twice")
        names.add(src.name)
        folder = resolve_data_path(cfg, src.path, f"{at}.path")
        if not folder.is_dir():
            raise StageError(f"{at}.path={src.path}: not a folder")
        if src.kind == "crop_folder":  # its layout, checked before any source is read
            try:
                # quiet: the listing that reads the crops warns of files it leaves out
                list_crop_folder(folder, 1, seen={str(folder)})
            except FileNotFoundError as e:
                raise StageError(f"{at}.path={src.path}: {e}") from e
        if src.labels:
            if src.kind != "smears" or src.labels_format == "none":
                raise StageError(
                    f"{at}.labels is for kind=smears with labels_format=bccd_kaggle "
                    f"(got kind={src.kind}, labels_format={src.labels_format})"
                )
            _check_labels(src, folder, resolve_data_path(cfg, src.labels, f"{at}.labels"), at)
        if src.specimen_pattern:
            import re

            try:
                re.compile(src.specimen_pattern)
            except re.error as e:
                raise StageError(
                    f"{at}.specimen_pattern={src.specimen_pattern!r}: not a regex ({e})"
                ) from e
        for key, v in [("scale", src.scale), *src.scale_by_width.items()]:
            if v is not None and float(v) <= 0:
                raise StageError(f"{at}.scale{'' if key == 'scale' else '_by_width.' + key}={v}")


def _check_labels(src: Any, folder: Path, path: Path, at: str) -> None:
    """The label file parses and names at least one image of the folder: read when the
    run starts (a small CSV), so that ``stage=all`` fails before ``segment_train``."""
    images = {p.name for p in list_images(folder)}
    try:
        labels, rejects = read_bccd_labels(path, images)
    except LabelFileError as e:
        raise StageError(f"{at}.labels: {e}") from e
    if images and not labels and rejects:
        raise StageError(
            f"{at}.labels={src.labels}: none of its {len(rejects)} line(s) names an image of "
            f"{at}.path={src.path} (first: {rejects[0]['reason']}); is it the label file of "
            f"another folder?"
        )


def _fixed_scale(src: Any, path: Path) -> float | None:
    """The source's scale, else its width's (``scale_by_width``); None: neither is set."""
    if src.scale_by_width:
        try:
            with Image.open(path) as im:
                width = im.size[0]
        except Exception:  # noqa: BLE001 - read_rgb rejects it later, with the reason
            return None if src.scale is None else float(src.scale)
        if str(width) in src.scale_by_width:
            return float(src.scale_by_width[str(width)])
    return None if src.scale is None else float(src.scale)


def _scale(
    src: Any, default: float, path: Path, estimate_px: float | None = None, pooled=None
) -> float:
    """Scale of one image: the source's, its width's, the estimate (``estimate_px``; the
    ``pooled`` one of its folder and size when given), the default."""
    fixed = _fixed_scale(src, path)
    if fixed is not None:
        return fixed
    if estimate_px is None:
        return default
    return estimated_scale(path, estimate_px, default, pooled)


def estimated_scale(path: Path, cell_px: float, fallback: float, estimate=None) -> float:
    """Scale measured from the image's white cells, else red cells (logged; ``fallback`` when
    neither is found). ``estimate``: already measured (e.g. held near its folder's median by
    :func:`segmentation.autoscale.pooled_estimates`), so the image is not read again."""
    from segmentation.io import read_rgb
    from segmentation.magnification import estimate_scale

    est = estimate
    if est is None:
        rd = read_rgb(path)
        if not rd.ok:
            return fallback  # rejected later, with the reason
        est = estimate_scale(rd.image, cell_px, fallback=fallback)
    if est.ok:
        size = est.white_px if est.ruler == "white" else est.diameter_px
        log.info(
            "scale estimate %s: %s-cell diameter %.1f px (%d cells) -> scale %.3g",
            path.name,
            est.ruler,
            size,
            est.n_cells,
            est.scale,
        )
        return round(est.scale, 2)  # images of one magnification share detector batches
    log.warning("scale estimate %s: no white or red cell measured; scale %.3g", path.name, fallback)
    return fallback


def estimate_px(cfg: Any, ckpt: dict[str, Any]) -> float | None:
    """White-cell size to measure each image's scale at, or None when it is not measured
    (``segmentation.estimate_scale``; null: as the checkpoint asks)."""
    from segmentation.shipped import wants_scale_estimate

    sc = cfg.segmentation
    return float(sc.cell_px) if wants_scale_estimate(sc.estimate_scale, ckpt) else None


def _smears(ctx, src, folder, model, ckpt, settings, offset, overlays, mask_dir):
    from pipeline.stages.segment import _run_shard, pooled_scales

    sc = ctx.cfg.segmentation
    images = listed = list_images(folder)
    labels, rejects = None, []
    if src.labels:
        path = resolve_data_path(ctx.cfg, src.labels, f"{src.name}.labels")
        try:
            labels, rejects = read_bccd_labels(path, {p.name for p in images})
        except LabelFileError as e:
            raise StageError(f"data.segment_sources ({src.name}).labels: {e}") from e
    cap = src.max_images if src.max_images is not None else sc.max_images
    images = images[: None if cap is None else int(cap)]
    by_scale: dict[float, list[tuple[int, Path]]] = {}
    refined = []  # measured and refined per image by the detector (segmentation.refine_scale)
    est_px = estimate_px(ctx.cfg, ckpt)
    refine = wants_scale_refinement(sc.refine_scale, ckpt)
    fixed = {p: _fixed_scale(src, p) for p in images}  # None: scale not given, estimated
    free = [p for p in images if fixed[p] is None]
    pooled = pooled_scales(ctx.cfg, free, est_px, settings.input_scale) or {}
    for i, p in enumerate(images):
        if est_px is not None and refine and fixed[p] is None:
            refined.append((offset + i, p))
            continue
        sc_i = _scale(src, settings.input_scale, p, est_px, pooled.get(p))
        by_scale.setdefault(sc_i, []).append((offset + i, p))
    parts = []
    if refined:
        log.info("segment: %s, %d images at their estimated, refined scale", src.name, len(refined))
        over = offset + int(sc.n_overlays)
        parts.append(
            _run_shard(
                ctx,
                refined,
                settings,
                None,
                overlays,
                model,
                ckpt,
                over,
                src.name,
                est_px,
                pooled,
                mask_dir=mask_dir,
            )
        )
    for scale, items in sorted(by_scale.items()):
        log.info("segment: %s, %d images at scale %.3g", src.name, len(items), scale)
        s = replace(settings, input_scale=scale)
        over = offset + int(sc.n_overlays)
        part = _run_shard(
            ctx, items, s, None, overlays, model, ckpt, over, src.name, mask_dir=mask_dir
        )
        parts.append(part)
    for p in parts:
        rejects += [{"field": "image", **r} for r in p["rejects"]]
    # the folder's listing goes back too: the caller names each image's QuPath file from
    # it instead of listing the folder again (a second slide warning, a second pass)
    return parts, labels, rejects, len(images), listed


def _crop_folder(ctx, src, folder, model, ckpt, settings, offset):
    from pipeline.stages.segment import make_detector, pooled_scales, refine_settings
    from segmentation.autoscale import folder_medians
    from segmentation.sources import centre_cell

    sc = ctx.cfg.segmentation
    detector = make_detector(ctx, model)
    cap = src.max_images if src.max_images is not None else sc.max_images
    files = list_crop_folder(folder, cap)
    f = crop_folder_filters(settings.filters)
    # a crop without a fixed scale is measured as stage=embed measures crops: its own
    # estimate held near its folder's, and one more pass at the folder's median where the
    # crop's own scale finds no cell at the centre
    fixed = {p: _fixed_scale(src, p) for p, _ in files}  # None: scale not given, estimated
    free = [p for p, _ in files if fixed[p] is None]
    est_px = estimate_px(ctx.cfg, ckpt) if free else None
    refine = refine_settings(sc, ckpt) if est_px is not None else None
    pooled = pooled_scales(ctx.cfg, free, est_px, float(settings.input_scale)) or {}
    medians = folder_medians(pooled)
    if est_px is not None:
        log.info("segment: %s, %d crops at their estimated scale", src.name, len(free))
    tables, crops, masks, rejects = [], [], [], []
    measured_scales: list[float] = []
    group = max(1, settings.batch_size)
    for g in bar(range(0, len(files), group), desc=src.name, unit="batch", enabled=ctx.is_main):
        good = []
        for i, (path, cls) in enumerate(files[g : g + group], start=offset + g):
            # the name every table records (non-UTF-8 bytes escaped, as stage=segment's
            # smears): the crop is read from the file's own path
            rel = recorded_name(f"{path.parent.name}/{path.name}")
            rd = read_rgb(path, convert=bool(sc.convert_images))
            if not rd.ok:
                rejects.append(
                    {"image": rel, "field": "image", "action": "skipped", "reason": rd.reason}
                )
                continue
            good.append((i, path, rel, cls, rd.image))
        for i, path, rel, cls, img in good:  # scales may differ: one call per crop
            given = fixed[path]
            s = replace(
                settings,
                input_scale=float(settings.input_scale if given is None else given),
                filters=f,
                crop_fill=True,
            )
            measured = est_px is not None and given is None
            cc = centre_cell(
                detector,
                img,
                rel,
                s,
                f"{src.name}/{rel}",
                est_px if measured else None,
                refine if measured else None,
                pooled.get(path) if measured else None,
                medians.get(path.parent) if measured else None,
            )
            if measured:
                # DEBUG: one line per crop flooded the terminal (thousands under
                # +preset=real; terminal audit, docs/reliability.md); the summary below
                # says it once, each crop's scale is in cells.h5ad (obs input_scale)
                log.debug("scale %s: %s", rel, cc.how)
                measured_scales.append(float(cc.scale))
            if cc.pos is None:
                rejects.append(
                    {"image": rel, "field": "mask", "action": "no_mask", "reason": cc.reason}
                )
                continue
            cells, pos = cc.cells, cc.pos
            row = cells.table[cells.table.kept].iloc[[pos]].copy()
            row.insert(1, "image_index", i)
            row["cell_id"] = f"{src.name}/{rel}"
            row["label"], row["label_status"] = cls, "labelled"
            row["input_scale"] = cc.scale  # the working scale the cell was found at
            tables.append(row)
            crops.append(cells.crops.images[pos])
            masks.append(cells.crops.masks[pos])
    if measured_scales:
        log.info(
            "segment: %s, scale measured on %d crops: median %.3g (%.3g-%.3g); each crop's in "
            "cells.h5ad obs input_scale (log_level=DEBUG logs how each was chosen)",
            src.name,
            len(measured_scales),
            float(np.median(measured_scales)),
            min(measured_scales),
            max(measured_scales),
        )
    return tables, crops, masks, rejects, len(files)


def segment_sources(ctx: StageContext, settings: SegmentSettings) -> None:
    """Run the detector on every ``data.segment_sources`` entry; write the segment outputs."""
    from pipeline.stages.segment import output_stem
    from segmentation.model import load_checkpoint

    if not ctx.is_main:
        return
    cfg, sc = ctx.cfg, ctx.cfg.segmentation
    settings.input_scale = float(sc.input_scale)
    model, ckpt = load_checkpoint(ctx.input("segmentation_model"), map_location=ctx.dist.device)
    overlays, mask_root = ctx.dir / ".overlays", ctx.dir / ".masks"
    for d in (overlays, mask_root):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    kept_frames, crop_arrays, mask_arrays, tables, rejects = [], [], [], [], []
    # the smear sources' detector parts and tables: their rejected cells for rejects.png
    reject_parts: list[dict] = []
    reject_tables: list[pd.DataFrame] = []
    per_source: dict[str, dict[str, Any]] = {}
    qupath_names: dict[tuple[str, str], str] = {}  # (source, image) -> qupath/ file
    offset = 0
    started = time.perf_counter()
    for k, src in enumerate(cfg.data.segment_sources):
        folder = resolve_data_path(cfg, src.path, f"data.segment_sources[{k}].path")
        if src.kind == "smears":
            # one folder per source: two sources may hold images of the same name
            (mask_root / src.name).mkdir()
            parts, labels, rej, n, listed = _smears(
                ctx, src, folder, model, ckpt, settings, offset, overlays, mask_root / src.name
            )
            table, kept, crops, masks = merge_parts(parts, settings.crop_size, False)
            # each image's QuPath objects beside its label TIFF: <source>/<overlay stem>
            for p in listed:
                qupath_names[(src.name, recorded_name(p.name))] = f"{src.name}/{output_stem(p)}"
            reject_parts += parts
            reject_tables.append(table)
            n_per_image = kept.groupby("image").size().to_dict()
            status = {
                im: label_for_image(nk, None if labels is None else labels.get(im))
                for im, nk in n_per_image.items()
            }
            kept["label"] = [status[im][0] for im in kept.image]
            kept["label_status"] = [status[im][1] for im in kept.image]
            n_read = int(sum(p["n_images"] for p in parts))
            if n and not n_read:
                raise StageError(
                    f"data.segment_sources[{k}] ({src.name}): none of the {n} images in "
                    f"{folder} could be read"
                )
            counts = {
                "images": n,
                "images_read": n_read,
                "detections": len(table),
                "kept": len(kept),
                **{
                    f"cells_{s}": int((kept.label_status == s).sum())
                    for s in sorted(set(kept.label_status))
                },
            }
        else:
            tabs, crops, masks, rej, n = _crop_folder(
                ctx, src, folder, model, ckpt, settings, offset
            )
            kept = pd.concat(tabs, ignore_index=True) if tabs else pd.DataFrame()
            table = kept
            s = settings.crop_size
            crops = np.stack(crops) if crops else np.zeros((0, s, s, 3), np.uint8)
            masks = np.stack(masks) if masks else np.zeros((0, s, s), bool)
            counts = {
                "crops": n,
                "masked": len(kept),
                "no_mask": sum(r["action"] == "no_mask" for r in rej),
            }
        if len(kept):
            kept["source"], kept["mode"] = src.name, src.kind
            kept["specimen"] = specimen_ids(
                kept.image, src.specimen_group or src.name, src.specimen_pattern
            )
            kept_frames.append(kept)
            if table is not kept:  # smears: every detection, with the kept cells' labels
                cols = ["cell_id", "label", "label_status", "specimen"]
                table = table.merge(kept[cols], on="cell_id", how="left")
                table[cols[1:]] = table[cols[1:]].fillna("")
            tables.append(table.assign(source=src.name, mode=src.kind))
        crop_arrays.append(crops)
        mask_arrays.append(masks)
        rejects += [{"source": src.name, **r} for r in rej]
        counts["rejects"] = len(rej)
        per_source[src.name] = counts
        log.info("segment: %s (%s): %s", src.name, src.kind, counts)
        offset += n
    seconds = time.perf_counter() - started
    _write(
        ctx,
        settings,
        kept_frames=kept_frames,
        crop_arrays=crop_arrays,
        mask_arrays=mask_arrays,
        tables=tables,
        rejects=rejects,
        per_source=per_source,
        seconds=seconds,
        qupath_names=qupath_names,
    )
    with ctx.atomic("rejects.png") as tmp:  # a few rejected smear cells, each with why
        table = pd.concat(reject_tables, ignore_index=True) if reject_tables else empty_table(False)
        reject_sheet(reject_parts, table, int(ctx.cfg.segmentation.n_reject_examples)).save(
            tmp, format="PNG"
        )
    for d in (overlays, mask_root):
        shutil.rmtree(d, ignore_errors=True)


def _write(
    ctx,
    settings,
    *,  # keywords only: seven lists and dicts in a row, a swap would pass unnoticed
    kept_frames,
    crop_arrays,
    mask_arrays,
    tables,
    rejects,
    per_source,
    seconds,
    qupath_names=None,
):
    sc = ctx.cfg.segmentation
    if kept_frames:
        kept = pd.concat(kept_frames, ignore_index=True)
    else:  # a valid, empty cells.h5ad; rejects.csv says why
        log.warning("segment: no cell kept in any of data.segment_sources; see rejects.csv")
        kept = empty_table(False).assign(label="", label_status="", source="", mode="", specimen="")
        tables = [kept]
    kept["kept"] = True
    crops, masks = np.concatenate(crop_arrays), np.concatenate(mask_arrays)
    for col in ("label", "label_status", "source", "mode", "specimen"):
        kept[col] = kept[col].fillna("").astype(str)
    totals = {
        "cells": len(kept),
        "labelled": int((kept.label != "").sum()),
        "unlabelled": int((kept.label == "").sum()),
        "rejects": len(rejects),
    }
    counts = {**totals, "per_source": per_source}
    # what each filter dropped over all sources, as stage=segment counts it for a folder
    det = pd.concat(tables, ignore_index=True)
    # as a folder run counts them (docs/artifacts.md): the smear sources' images; the
    # crop folders' crops are counted per source (per_source: crops, masked, no_mask)
    images = sum(v.get("images", 0) for v in per_source.values())
    images_read = sum(v.get("images_read", 0) for v in per_source.values())
    crops_seen = sum(v.get("crops", 0) for v in per_source.values())
    filters = {"images": images, "images_read": images_read, "detections": len(det)}
    for f in FLAGS:
        if f in det:
            filters[f] = int(det[f].astype("boolean").fillna(False).sum())
    filters["kept"] = len(kept)
    adata = cells_adata(kept, crops, masks, settings, filters, "data.segment_sources")
    # each source has its own scale (set, or estimated per image): uns said the default
    # (0.6) that no image of the real chain was read at
    adata.uns["input_scale"] = "per image: obs['input_scale']"
    adata.uns["per_source"] = {k: {a: int(b) for a, b in v.items()} for k, v in per_source.items()}
    with ctx.atomic("cells") as tmp:
        write_h5ad(adata, tmp)
    with ctx.atomic("detections.csv") as tmp:
        spreadsheet_safe(pd.concat(tables, ignore_index=True)).to_csv(tmp, index=False)
    with ctx.atomic("rejects.csv") as tmp:
        spreadsheet_safe(pd.DataFrame(rejects, columns=REJECT_COLUMNS)).to_csv(tmp, index=False)
    labels = [f"{lab or '?'} {sc_:.2f}" for lab, sc_ in zip(kept.label, kept.score.astype(float))]
    with ctx.atomic("contact_sheet.png") as tmp:
        contact_sheet(
            crops,
            labels,
            int(sc.contact_sheet_max),
            caption="kept cells: label from the source's label list (? = none) and detection score",
        ).save(tmp, format="PNG")
    with ctx.atomic("overlays") as tmp:
        shutil.copytree(ctx.dir / ".overlays", tmp)
    with ctx.atomic("masks") as tmp:
        shutil.copytree(ctx.dir / ".masks", tmp)
    if qupath_names is not None:  # the smear sources' cells (a crop folder has no slide)
        from pipeline.stages.segment import write_qupath

        on_smears = (adata.obs["mode"] == "smears").to_numpy()
        sub = adata[on_smears]
        names = [qupath_names[(s_, im)] for s_, im in zip(sub.obs["source"], sub.obs["image"])]
        log.info("%s", write_qupath(ctx, sub.obs, sub.obsm["masks"], names, classification="label"))
    write_json(
        ctx.output("summary.json"),
        {
            "counts": counts,
            "filter_counts": filters,
            # the two count different things: say which (a report review took them for
            # the same base)
            "about": {
                "counts.rejects": "rows of rejects.csv: rejected detections, images with no "
                "kept cell and label rows without an image (its action column says which)",
                "filter_counts": "every detection the detector returned, low-score ones "
                "included; one detection can carry several flags",
            },
            "device": str(ctx.dist.device),
            # detector time over every source (reading, inference, cropping); the rate
            # counts every image it ran on: smears read and crops of crop folders
            "seconds_inference": round(seconds, 2),
            "images_per_second": round((images_read + crops_seen) / max(seconds, 1e-9), 3),
        },
    )
    log.info("segment: %s", counts)
