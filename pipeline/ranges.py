"""Valid ranges of the numeric settings, checked when a run starts (before any folder).

Hydra's structured config already refuses a wrong type (``vae.beta=abc``); this
table refuses a value of the right type outside its meaning (``vae.beta=-4``
trained with a negative KL weight). ``null`` is never checked here: the schema
says where it is allowed. A list or dict setting is checked element by element.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

# range syntax: ">=0", ">0", "[0,1]", "[0,1)", "(0,1]", "[1,65535]"
POS = ">0"
NONNEG = ">=0"
PROB = "[0,1]"
COUNT = ">=1"

RANGES: dict[str, str] = {
    "seed": NONNEG,
    # --- vae ---
    "vae.n_latent": COUNT,
    "vae.n_private": NONNEG,
    "vae.beta": NONNEG,
    "vae.image_size": COUNT,
    "vae.channels": COUNT,
    "vae.encoder_channels": COUNT,
    "vae.ssim_weight": NONNEG,
    "vae.spectral_weight": NONNEG,
    "vae.granule_weight": NONNEG,
    "vae.texture_weight": NONNEG,
    "vae.nucleus_weight": NONNEG,
    "vae.free_bits": NONNEG,
    "vae.classify_weight": NONNEG,
    "vae.classify_balance": PROB,
    "vae.classify_noise_q": PROB,
    "vae.maturation_weight": NONNEG,
    "vae.view_contrast_weight": NONNEG,
    "vae.size_weight": NONNEG,
    "vae.view_temperature": POS,
    "vae.nucleus_gap_weight": NONNEG,
    "vae.lobe_deep_valley": "(0,1]",
    "vae.hidden": COUNT,
    "vae.dropout": "[0,1)",
    "vae.image_weight": NONNEG,
    "vae.mask_weight": NONNEG,
    "vae.expression_weight": NONNEG,
    "vae.cross_weight": NONNEG,
    "vae.align_weight": NONNEG,
    "vae.align_temperature": POS,
    "vae.kl_warmup_epochs": NONNEG,
    "vae.capacity_max": NONNEG,
    "vae.capacity_epochs": POS,
    # --- trainer ---
    "trainer.max_epochs": COUNT,
    "trainer.stop_after_epochs": COUNT,
    "trainer.max_minutes": POS,
    "trainer.batch_size": COUNT,
    "trainer.lr": POS,
    "trainer.weight_decay": NONNEG,
    "trainer.lr_warmup_epochs": NONNEG,
    "trainer.grad_clip": NONNEG,
    "trainer.early_stopping_patience": NONNEG,
    "trainer.val_fraction": "[0,1)",
    "trainer.test_fraction": "[0,1)",
    "trainer.stain_jitter": NONNEG,
    "trainer.rotate": NONNEG,
    "trainer.ema_epochs": NONNEG,
    "trainer.log_every_steps": COUNT,
    "trainer.image_every_epochs": NONNEG,
    "trainer.figure_budget": PROB,
    "trainer.n_images": NONNEG,
    "trainer.projector_max_cells": NONNEG,
    # --- segmentation: model and training ---
    "segmentation.trainable_backbone_layers": "[0,5]",
    "segmentation.min_size": COUNT,
    "segmentation.max_size": COUNT,
    "segmentation.anchor_sizes": COUNT,
    "segmentation.fpn_channels": COUNT,
    "segmentation.box_representation": COUNT,
    "segmentation.mask_head_layers": COUNT,
    "segmentation.rpn_pre_nms_top_n_train": COUNT,
    "segmentation.rpn_post_nms_top_n_train": COUNT,
    "segmentation.rpn_pre_nms_top_n_test": COUNT,
    "segmentation.rpn_batch_size_per_image": COUNT,
    "segmentation.box_batch_size_per_image": COUNT,
    "segmentation.cell_px": POS,
    "segmentation.scale_spread": ">=1",
    "segmentation.copy_paste": PROB,
    "segmentation.copy_paste_max": NONNEG,
    "segmentation.max_train_images": COUNT,
    "segmentation.max_val_images": COUNT,
    "segmentation.aug_scale": POS,
    "segmentation.aug_crop": NONNEG,
    # fraction cut from each side: at most 0.4 so that a fifth of the field is always left
    "segmentation.aug_border_crop": "[0,0.4]",
    "segmentation.aug_cut_cell": PROB,
    "segmentation.aug_color": NONNEG,
    "segmentation.aug_stain": PROB,
    "segmentation.aug_blur": PROB,
    "segmentation.aug_noise": PROB,
    "segmentation.epochs": COUNT,
    "segmentation.stop_after_epochs": COUNT,
    "segmentation.train_batch_size": COUNT,
    "segmentation.lr": POS,
    "segmentation.momentum": "[0,1)",
    "segmentation.weight_decay": NONNEG,
    "segmentation.warmup_iters": NONNEG,
    "segmentation.grad_clip": NONNEG,
    "segmentation.eval_every": COUNT,
    "segmentation.tb_images": NONNEG,
    "segmentation.log_every": COUNT,
    # --- segmentation: inference and crops ---
    "segmentation.input_scale": POS,
    "segmentation.tile_size": COUNT,
    "segmentation.tile_overlap": NONNEG,
    "segmentation.batch_size": COUNT,
    "segmentation.detect_score_floor": PROB,
    "segmentation.mask_threshold": PROB,
    "segmentation.max_detections_per_tile": COUNT,
    "segmentation.rpn_post_nms_top_n": COUNT,
    "segmentation.merge_iou": PROB,
    "segmentation.merge_containment": PROB,
    "segmentation.max_images": COUNT,
    # embed refuses crops under 8 px (vae.api: "the model needs cells of >= 8 px"),
    # once segment, pair and train had run on them
    "segmentation.crop_size": ">=8",
    "segmentation.crop_margin": NONNEG,
    "segmentation.trim_rim": NONNEG,
    "segmentation.background_value": "[0,255]",
    "segmentation.score_threshold": PROB,
    "segmentation.min_area": NONNEG,
    "segmentation.min_solidity": PROB,  # area / convex hull area: 2 dropped every cell
    "segmentation.touch_px": NONNEG,
    "segmentation.max_area_ratio": POS,  # x the image's median area: -1 dropped every cell
    "segmentation.max_area": COUNT,
    "segmentation.border_margin": NONNEG,
    "segmentation.max_overlap_iou": PROB,
    "segmentation.duplicate_containment": PROB,
    "segmentation.min_piece_area": NONNEG,
    "segmentation.match_iou": PROB,
    "segmentation.n_overlays": NONNEG,
    "segmentation.contact_sheet_max": NONNEG,
    # --- expression ---
    "expression.min_genes": NONNEG,
    "expression.min_counts": NONNEG,
    "expression.max_pct_mito": "[0,100]",
    "expression.min_cells": NONNEG,
    "expression.target_sum": POS,
    "expression.n_top_genes": COUNT,
    "expression.score_ctrl_size": COUNT,
    "expression.score_n_bins": COUNT,
    "expression.n_pcs": COUNT,
    "expression.n_neighbors": ">=2",
    "expression.seed": NONNEG,
    # --- pair ---
    "pair.crop_size": COUNT,
    "pair.background_value": "[0,255]",
    "pair.draws_per_crop": COUNT,
    "pair.n_bins": COUNT,
    "pair.label_maturation": PROB,
    "pair.seed": NONNEG,
    "pair.min_class_size": COUNT,
    # --- embed ---
    "embed.batch_size": COUNT,
    "embed.examples_per_call": NONNEG,
    "embed.histogram_bins": COUNT,
    "embed.min_confidence": PROB,
    "embed.atypical_quantile": "(0,1]",
    # data.simulator.*: checked by its owner, SimulatorParams.validate (stage=simulate)
    # --- analysis ---
    "analysis.batch_size": COUNT,
    "analysis.knn_k": COUNT,
    "analysis.n_neighbors": ">=2",
    "analysis.leiden_resolution": POS,
    "analysis.mig_bins": ">=2",
    "analysis.dci_trees": COUNT,
    "analysis.top_k_dims": COUNT,
    "analysis.span_sd": POS,
    "analysis.n_steps": ">=2",
    "analysis.path_steps": ">=2",
    "analysis.path_pose_cells": NONNEG,
    "analysis.image_support_k": COUNT,
    "analysis.image_support_quantile": "(0,1]",
    "analysis.gp_length_scale": POS,
    "analysis.gp_noise": POS,
    "analysis.top_genes": COUNT,
    "analysis.granule_radius_px": POS,
    "analysis.granule_threshold": NONNEG,
    "analysis.granule_border_px": NONNEG,
    "analysis.granule_nucleus_margin_px": NONNEG,
    "analysis.lobe_neck_ratio": "(0,1)",
    "analysis.max_cells_measured": COUNT,
    # --- hardware ---
    "hardware.devices": NONNEG,
    "hardware.num_processes": COUNT,
    "hardware.master_port": "[0,65535]",
    "hardware.num_workers": NONNEG,
    "hardware.stream_above_gib": NONNEG,
    "hardware.torch_threads": COUNT,
}

# (a, relation, b): settings whose values must be ordered against each other
RELATIONS: list[tuple[str, str, str]] = [
    ("segmentation.min_size", "<=", "segmentation.max_size"),
    ("segmentation.tile_overlap", "<", "segmentation.tile_size"),
]


class SettingRangeError(ValueError):
    """A numeric setting is outside its valid range (or a named choice is not one)."""


def choices() -> dict[str, tuple[str, ...]]:
    """Settings that name one of a fixed set of options, and the options.

    The options come from the modules that own them (the same tuples their own checks
    use), so a typo (``vae.fusion=foo``) fails when the run starts, not when the stage
    that reads it has made its folder (``stage=all`` would first run every stage before).
    """
    from vae.inputs.expression import HVG_FLAVORS
    from vae.inputs.schema import (
        INPUT_FORMATS,
        MATURATION_MODES,
        ORIENTATIONS,
        PAIR_MODES,
        VALUE_KINDS,
        WITHIN_LABEL,
    )
    from vae.losses import ALIGNS
    from vae.model import (
        EXPRESSION_INPUTS,
        EXPRESSION_LIKELIHOODS,
        EXPRESSION_NORMS,
        FUSIONS,
        IMAGE_ARCHS,
        IMAGE_ENCODERS,
        IMAGE_INPUTS,
        IMAGE_LIKELIHOODS,
    )
    from vae.train import MONITORS

    return {
        "vae.fusion": FUSIONS,
        "vae.image_likelihood": IMAGE_LIKELIHOODS,
        "vae.expression_likelihood": ("auto", *EXPRESSION_LIKELIHOODS),
        "vae.image_arch": IMAGE_ARCHS,
        "vae.image_input": IMAGE_INPUTS,
        "vae.image_encoder": IMAGE_ENCODERS,
        "vae.expression_input": ("auto", *EXPRESSION_INPUTS),
        "vae.expression_norm": ("auto", *EXPRESSION_NORMS),
        "vae.align": ("auto", *ALIGNS),
        "pair.mode": PAIR_MODES,
        "pair.within_label": WITHIN_LABEL,
        "expression.input_format": INPUT_FORMATS,
        "expression.orientation": ORIENTATIONS,
        "expression.values": VALUE_KINDS,
        "expression.maturation": MATURATION_MODES,
        "expression.hvg_flavor": HVG_FLAVORS,
        "trainer.monitor": MONITORS,
    }


def in_range(x: float, spec: str) -> bool:
    """Whether number ``x`` satisfies range ``spec`` (see :data:`RANGES`)."""
    if isinstance(x, float) and not math.isfinite(x):  # nan, inf: no setting means them
        return False
    if spec.startswith(">="):
        return x >= float(spec[2:])
    if spec.startswith(">"):
        return x > float(spec[1:])
    lo, hi = (float(v) for v in spec[1:-1].split(","))
    ok_lo = x >= lo if spec[0] == "[" else x > lo
    ok_hi = x <= hi if spec[-1] == "]" else x < hi
    return ok_lo and ok_hi


def _describe(spec: str) -> str:
    if spec[0] in "[(":
        return f"in {spec}"
    op = ">=" if spec.startswith(">=") else ">"
    return f"{op} {spec[len(op) :]}"


def _values(v: Any) -> list[Any]:
    if isinstance(v, dict):
        return list(v.values())
    if isinstance(v, list | tuple):
        return list(v)
    return [v]


def check_ranges(cfg: DictConfig) -> None:
    """Raise :class:`SettingRangeError` naming the first setting outside its range.

    The message is ``<setting>=<value> is out of range: must be <range>``.
    """
    bad = []
    for key, spec in RANGES.items():
        v = OmegaConf.select(cfg, key, default=None)
        if v is None:
            continue
        v = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
        for x in _values(v):
            if isinstance(x, bool) or not isinstance(x, int | float):
                continue
            if not in_range(x, spec):
                bad.append(f"{key}={v} is out of range: must be {_describe(spec)}")
                break
    for key, valid in choices().items():
        v = OmegaConf.select(cfg, key, default=None)
        if v is not None and str(v) not in valid:
            bad.append(f"{key}={v!r} is not an option: valid: {', '.join(valid)}")
    for a, rel, b in RELATIONS:
        va, vb = OmegaConf.select(cfg, a, default=None), OmegaConf.select(cfg, b, default=None)
        if va is None or vb is None:
            continue
        if not (va <= vb if rel == "<=" else va < vb):
            bad.append(f"{a}={va} must be {rel} {b}={vb}")
    if cfg.get("trainer") is not None:
        vf, tf = cfg.trainer.val_fraction, cfg.trainer.test_fraction
        if vf + tf >= 1:
            bad.append(
                f"trainer.val_fraction={vf} + trainer.test_fraction={tf} must be < 1 "
                f"(no rows would be left for training)"
            )
    if bad:
        raise SettingRangeError("; ".join(bad))
