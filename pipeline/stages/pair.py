"""``stage=pair``: crops x expression profiles -> ``paired.h5ad``.

The only place that maps ``cfg.pair`` onto :mod:`vae.inputs.pairing`. Output: see
``docs/artifacts.md`` (section *pair*) and ``docs/expression_pairing.md``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import spreadsheet_safe, write_json
from pipeline.runner import StageContext, StageError, resolve_data_path, stage
from segmentation.io import blank_as_read, write_h5ad
from vae.inputs.schema import HAS_COUNTS, HAS_EXPRESSION, HAS_IMAGE, NUCLEUS_SEGMENTATION

log = logging.getLogger(__name__)


def _pair_needs(cfg: DictConfig) -> list[str]:
    # pair.mode=image_only reads no expression table (0 genes: image branch only)
    needs = [] if cfg.pair.mode == "image_only" else ["expression"]
    for s in cfg.pair.crop_sources:
        if s.kind == "cells":
            needs.append("cells")
        elif s.kind == "coco" and not s.path:
            needs += ["smears", "annotations"]
    return list(dict.fromkeys(needs))


def load_crops(ctx: StageContext, rejects: list | None = None):
    """Read and concatenate every ``pair.crop_sources`` entry (or None if empty).

    ``rejects``: collects a row per unreadable crop image of a folder source, which is
    skipped (one bad file in a thousand does not stop the stage)."""
    from vae.inputs import pairing as pr

    cfg = ctx.cfg
    size, bg = cfg.pair.crop_size, cfg.pair.background_value
    sets = []
    for k, s in enumerate(cfg.pair.crop_sources):
        setting = f"pair.crop_sources[{k}]"
        if s.kind == "cells":
            cs = pr.read_cells_h5ad(
                ctx.input("cells"), size, bg, rejects=rejects, granules=cfg.pair.granule_centres
            )
            if s.max_per_class is not None:
                cs = _cap(cs, s.max_per_class)
        elif s.kind == "coco":
            if s.path:  # a folder of images holding annotations.json
                folder = Path(resolve_data_path(cfg, s.path, f"{setting}.path"))
                ann = folder / "annotations.json"
            else:  # the simulator's smears
                folder, ann = ctx.input("smears"), ctx.input("annotations")
            cs = pr.read_coco_crops(folder, ann, size, bg, s.max_per_class)
        elif s.kind in ("image_folder", "segmentation_wbc"):
            if not s.path:
                raise StageError(f"{setting}.path is required for kind={s.kind}")
            path = resolve_data_path(cfg, s.path, f"{setting}.path")
            if s.kind == "image_folder":
                cs = pr.read_image_folder(path, size, bg, s.max_per_class, rejects=rejects)
            else:
                cs = pr.read_segmentation_wbc(path, size, bg, s.max_per_class, rejects=rejects)
        else:
            raise StageError(
                f"{setting}.kind={s.kind!r}; valid: cells, coco, image_folder, segmentation_wbc"
            )
        log.info("pair: %d crops from %s (%s)", len(cs), s.kind, s.path or "cells.h5ad")
        sets.append(cs)
    return pr.CropSet.concat(sets) if sets else None


def _write_rejects(ctx: StageContext, rejects: list[dict]) -> None:
    with ctx.atomic("rejects.csv") as tmp:
        spreadsheet_safe(
            pd.DataFrame(rejects, columns=["image", "field", "action", "reason"])
        ).to_csv(tmp, index=False)


def _cap(cs, n: int):
    keep = cs.obs.groupby("label", sort=False).cumcount().to_numpy() < n
    return cs.take(keep)


CROP_KINDS = ("cells", "coco", "image_folder", "segmentation_wbc")


def _validate(cfg: DictConfig) -> None:
    """Crop source kinds and paths, before any folder is made."""
    from pipeline.train_args import crop_side_problem

    # stage=train would refuse these crops only after pairing had been paid for; with
    # vae.image_size the crops are resized when read, and stage=train checks that size
    why = crop_side_problem(cfg.pair.crop_size, cfg.vae.channels)
    if cfg.vae.image_size is None and why:
        raise StageError(f"pair.crop_size={cfg.pair.crop_size}: {why}")
    for k, s in enumerate(cfg.pair.crop_sources):
        setting = f"pair.crop_sources[{k}]"
        if s.kind not in CROP_KINDS:
            raise StageError(f"{setting}.kind={s.kind!r}; valid: {', '.join(CROP_KINDS)}")
        if s.kind in ("image_folder", "segmentation_wbc") and not s.path:
            raise StageError(f"{setting}.path is required for kind={s.kind}")
        if s.path:
            resolve_data_path(cfg, s.path, f"{setting}.path")
    if cfg.pair.mode == "image_only" and not len(cfg.pair.crop_sources):
        raise StageError(
            "pair.mode=image_only needs at least one pair.crop_sources entry (crops are "
            "all it pairs); for expression alone use pair=expression_only"
        )
    if cfg.pair.label_corrections:
        if not len(cfg.pair.crop_sources):
            raise StageError(
                "pair.label_corrections corrects crop labels, but pair.crop_sources is empty"
            )
        resolve_data_path(cfg, cfg.pair.label_corrections, "pair.label_corrections")
    if cfg.pair.within_label == "maturation" and cfg.pair.mode != "by_label":
        raise StageError(
            f"pair.within_label=maturation ranks crops and profiles within each label: "
            f"it needs pair.mode=by_label, not {cfg.pair.mode}"
        )
    if int(cfg.pair.min_class_size) < 1:
        raise StageError(f"pair.min_class_size={cfg.pair.min_class_size}: must be >= 1")


def drop_small_classes(crops, min_size: int):
    """Clear the label of classes with fewer than ``min_size`` crops.

    Their crops stay as unlabelled image-only rows (a class of one cannot be
    split into train / validation / test). Returns the crops and one reject row
    per affected crop (``image``, ``field``, ``action``, ``reason``).
    """
    lab = crops.obs["label"].astype(str)
    sizes = lab[lab != ""].value_counts()
    small = sizes[sizes < min_size]
    rejects = []
    for cls, n in small.items():
        for cid in lab.index[lab == cls]:
            rejects.append(
                {
                    "image": cid,
                    "field": "label",
                    "action": "label_cleared",
                    "reason": f"class {cls!r} has {n} crop(s) < pair.min_class_size="
                    f"{min_size}; kept as an unlabelled image-only row",
                }
            )
        log.warning("pair: class %r has only %d crop(s); its label is cleared", cls, n)
    if len(small):
        crops.obs.loc[lab.isin(small.index), "label"] = ""
    return crops, rejects


def _keep_present(label_map: dict, loaded: set[str], crops) -> dict:
    """``label_map`` without the classes the crops carried when read (``loaded``, lower
    case) but no crop carries any more (``pair.label_corrections``, ``pair.min_class_size``);
    a key that never named a crop class still fails in
    :func:`vae.inputs.pairing.resolve_label_map`."""
    gone = loaded - {str(c).lower() for c in crops.obs["label"]}
    for k in [k for k in label_map if k.lower() in gone]:
        log.warning("pair: no crop is labelled %r any more; label_map entry dropped", k)
    return {k: v for k, v in label_map.items() if k.lower() not in gone}


def _rank_agreement(paired) -> dict[str, float]:
    """Spearman of the crop's nucleus segmentation vs its profile's maturation, per label,
    over the paired rows (``pair.within_label=maturation``: the order the pairing set)."""
    from scipy.stats import spearmanr

    o = paired.obs
    both = o[HAS_IMAGE].to_numpy(bool) & o[HAS_EXPRESSION].to_numpy(bool)
    seg = o[NUCLEUS_SEGMENTATION].to_numpy(float)
    # the profile's own maturation (obs["maturation"] is the crop's where it has one)
    key = "expression_maturation" if "expression_maturation" in o else "maturation"
    mat = o[key].to_numpy(float)
    labels = o["label"].astype(str).to_numpy()
    out: dict[str, float] = {}
    ok = both & np.isfinite(seg) & np.isfinite(mat)
    for lab in sorted(set(labels[ok])):
        sel = ok & (labels == lab)
        if sel.sum() >= 3 and np.ptp(seg[sel]) > 0 and np.ptp(mat[sel]) > 0:
            out[lab] = round(float(spearmanr(seg[sel], mat[sel]).statistic), 3)
    log.info("pair: crop nucleus segmentation vs profile maturation (Spearman): %s", out)
    return out


@stage("pair", needs=_pair_needs, produces=["paired"], validate=_validate)
def run_pair(ctx: StageContext) -> None:
    import anndata as ad

    from vae.inputs import pairing as pr

    cfg = ctx.cfg
    p = cfg.pair
    if not 0 <= p.background_value <= 255:
        raise StageError(f"pair.background_value={p.background_value}: must be in 0..255")
    image_only = p.mode == "image_only"
    expr = None if image_only else blank_as_read(ad.read_h5ad(ctx.input("expression")))
    if expr is not None and "label" not in expr.obs:  # (make_pairs' own check names no file)
        cols = list(map(str, expr.obs.columns))
        shown = ", ".join(cols[:20]) + (f", ... ({len(cols)} in all)" if len(cols) > 20 else "")
        raise StageError(
            f"{ctx.input('expression')}: [obs['label']] no obs['label'] (columns: "
            f"{shown or 'none'}); stage=expression writes it (expression.label_key)"
        )
    rejects: list[dict] = []
    label_map = OmegaConf.to_container(p.label_map)
    corrected: dict | None = None
    try:
        crops = load_crops(ctx, rejects)
        loaded = set() if crops is None else {str(c).lower() for c in crops.obs["label"]}
        if crops is not None and p.label_corrections:
            path = resolve_data_path(cfg, p.label_corrections, "pair.label_corrections")
            key, table = pr.read_label_corrections(path)
            crops, rej, counts = pr.apply_label_corrections(crops, key, table, label_map, str(path))
            rejects += rej
            corrected = {"file": str(path), "key": key, **counts}
            log.info("pair: label corrections from %s (by %s): %s", path, key, counts)
        if crops is not None and p.mode == "by_label":
            crops, small = drop_small_classes(crops, int(p.min_class_size))
            rejects += small
        if crops is not None:
            label_map = _keep_present(label_map, loaded, crops)
        crop_order = None
        if p.within_label == "maturation" and crops is not None:
            from vae.lobes import nucleus_segmentation

            # the lobes counted as the study's lobe head counts them (vae.lobe_deep_valley)
            crop_order = nucleus_segmentation(crops.crops, crops.masks, cfg.vae.lobe_deep_valley)
            log.info(
                "pair: within_label=maturation: nucleus segmentation of %d crops "
                "(%d without a nucleus: drawn at random within their class)",
                len(crop_order),
                int((~np.isfinite(crop_order)).sum()),
            )
        res = pr.make_pairs(
            crops,
            expr,
            p.mode,
            label_map=label_map,
            draws_per_crop=p.draws_per_crop,
            n_bins=p.n_bins,
            label_maturation=OmegaConf.to_container(p.label_maturation),
            keep_unmatched_images=p.keep_unmatched_images,
            keep_unused_expression=p.keep_unused_expression,
            seed=cfg.seed if p.seed is None else p.seed,
            background=p.background_value,
            crop_size=p.crop_size,
            within_label=p.within_label,
            crop_order=crop_order,
        )
    except pr.PairingError as e:
        if rejects and ctx.is_main:  # the files skipped before the refusal: listed still
            _write_rejects(ctx, rejects)
            raise StageError(f"{e} ({len(rejects)} row(s) in {ctx.output('rejects.csv')})") from e
        raise StageError(str(e)) from e
    out = res.adata
    out.uns["pair"] = {
        "mode": p.mode,
        "seed": int(cfg.seed if p.seed is None else p.seed),
        "draws_per_crop": int(p.draws_per_crop),
        "n_bins": int(p.n_bins),
        "within_label": str(p.within_label),
        "crop_sources": json.dumps(OmegaConf.to_container(p.crop_sources)),
        "granule_centres": bool(p.granule_centres),
        "notes": json.dumps(res.notes),
    }
    if corrected is not None:
        out.uns["pair"]["label_corrections"] = json.dumps(corrected)
    for k in (
        ("programs", "label_key", "maturation_source", "data_notes", "batch_correction")
        if expr is not None
        else ()
    ):
        if k in expr.uns:
            out.uns[f"expression_{k}"] = expr.uns[k]
    hi, he = out.obs[HAS_IMAGE].to_numpy(), out.obs[HAS_EXPRESSION].to_numpy()
    counts = {
        "rows": int(out.n_obs),
        "image+expression": int((hi & he).sum()),
        "image_only": int((hi & ~he).sum()),
        "expression_only": int((~hi & he).sum()),
        "genes": int(out.n_vars),
        "crop_size": int(out.uns["crop_size"]),
        HAS_COUNTS: bool(out.uns[HAS_COUNTS]),
    }
    if corrected is not None:
        counts["label_corrections"] = corrected
    if crop_order is not None:
        counts["within_label"] = _rank_agreement(out)
    if res.shared_labels:  # several image classes mapped onto one expression label
        counts["label_map_shared"] = res.shared_labels
    log.info("pair (%s): %s", p.mode, counts)
    if (hi & he).sum() == 0 and p.mode not in ("unpaired", "image_only"):
        log.warning("pair.mode=%s produced no paired row; check labels / label_map", p.mode)
    if ctx.is_main:
        with ctx.atomic("pair_summary.csv") as tmp:
            # labels and file names come from the user's folders and CSVs: quoted as
            # text, so a spreadsheet runs no "=..." label as a formula
            spreadsheet_safe(res.summary).to_csv(tmp, index=False)
        write_json(ctx.output("pair_counts.json"), counts)
        _write_rejects(ctx, rejects)
        if hi.any():
            with ctx.atomic("crops.png") as tmp:
                pr.contact_sheet(out, tmp, seed=cfg.seed)
        with ctx.atomic("paired") as tmp:
            write_h5ad(out, tmp, compression="gzip")
