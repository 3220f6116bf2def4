"""Typed arguments of ``stage=train`` built from the config (the config's one reader).

:func:`build_model_args` -> :class:`vae.model.VAEArgs` (architecture, saved in
checkpoints) and :func:`build_train_args` -> :class:`vae.train.TrainArgs` (loss weights,
schedule, augmentation). Benchmarks build the same arguments through these functions,
so a benchmark trains exactly what ``stage=train`` would.
"""

from __future__ import annotations

import logging

import numpy as np
from omegaconf import DictConfig

from pipeline.runner import StageError
from vae.inputs.schema import (
    HAS_EXPRESSION,
    HAS_IMAGE,
    MATURATION_ORDER,
    class_labels,
    say_class_labels,
)

log = logging.getLogger(__name__)


def expression_likelihood(cfg_value: str, has_counts: bool, source: str) -> str:
    """Resolve ``vae.expression_likelihood`` (``auto`` -> nb with counts, else gaussian)."""
    if cfg_value == "auto":
        return "nb" if has_counts else "gaussian"
    if cfg_value in ("nb", "zinb") and not has_counts:
        raise StageError(
            f"vae.expression_likelihood={cfg_value} needs raw counts, but {source} has no "
            f"layers['counts'] (uns['has_counts'] False). Use vae.expression_likelihood="
            f"gaussian or auto."
        )
    return cfg_value


def expression_alone(data) -> bool:
    """No row of ``data`` has an image and some have a profile (``pair=expression_only``).

    Rows with neither (a profile :func:`vae.data.from_anndata` skipped as unusable: NaN,
    a negative count) do not count: one such cell of an expression-only table flipped
    the auto settings of expression alone (norm, dropout, input) with only a warning
    that it was skipped (review)."""
    return data.n_genes > 0 and bool(data.has_expression.any()) and not bool(data.has_image.any())


DEFAULT_DROPOUT = 0.1  # the expression MLPs' dropout when data hold images too


def expression_dropout(cfg_value: float | None, data) -> float:
    """Resolve ``vae.dropout``: null (auto) -> 0 for expression alone (measured on
    Paul15, docs/performance.md), else ``DEFAULT_DROPOUT``."""
    if cfg_value is not None:
        return float(cfg_value)
    return 0.0 if expression_alone(data) else DEFAULT_DROPOUT


# ``vae.expression_norm=auto`` picks BatchNorm only with at least this many rows: with
# fewer the training split can hold one row, and BatchNorm then fails on its first
# step ("Expected more than 1 value per channel when training"; an audit with 1 row)
BATCHNORM_MIN_ROWS = 8


def expression_norm(cfg_value: str, data) -> str:
    """Resolve ``vae.expression_norm``: ``auto`` -> ``batch`` for expression alone
    (BatchNorm's statistics then see no empty row; measured on Paul15,
    docs/performance.md) with at least ``BATCHNORM_MIN_ROWS`` rows, else ``layer``."""
    if cfg_value != "auto":
        return cfg_value
    return "batch" if expression_alone(data) and data.n >= BATCHNORM_MIN_ROWS else "layer"


def expression_input(cfg_value: str, data) -> str:
    """Resolve ``vae.expression_input``: ``auto`` -> ``counts`` for expression alone with
    raw counts (measured on Paul15, docs/performance.md), else ``lognorm``."""
    if cfg_value != "auto":
        return cfg_value
    return "counts" if expression_alone(data) and data.counts is not None else "lognorm"


def crop_side_problem(side: int, channels) -> str | None:
    """Why the image branch built from ``channels`` (``vae.channels``) cannot take crops of
    ``side`` px, or None: it halves the crop once per entry, so the side must be a
    multiple of ``2 ** len(channels)``. stage=pair, stage=train's start check and the model
    build all ask here, each naming the setting or file the side came from."""
    k = 2 ** len(channels)
    if int(side) % k == 0:
        return None
    return (
        f"the image branch halves the crop {len(channels)} times (vae.channels), so it "
        f"needs a multiple of {k} (e.g. {max(k, round(int(side) / k) * k)})"
    )


def build_model_args(cfg: DictConfig, data, source: str):
    from vae.model import VAEArgs

    v = cfg.vae
    # the crops were cut by stage=pair at a size no image branch of these channels takes
    why = crop_side_problem(data.crop_size, v.channels) if data.crop_size else None
    if why:
        raise StageError(
            f"{source}: crops of {data.crop_size} px (pair.crop_size when it was paired): "
            f"{why}; pair again at such a size"
        )
    try:
        return VAEArgs(
            n_genes=data.n_genes,
            crop_size=data.crop_size,
            n_shared=int(v.n_latent),
            n_private=int(v.n_private),
            channels=list(v.channels),
            encoder_channels=None if v.encoder_channels is None else list(v.encoder_channels),
            hidden=list(v.hidden),
            # no gene (pair=image_only): no expression decoder, the setting is moot
            expression_likelihood=expression_likelihood(
                v.expression_likelihood if data.n_genes else "auto", data.counts is not None, source
            ),
            image_likelihood=v.image_likelihood,
            library_covariate=bool(v.library_covariate) and data.counts is not None,
            predict_mask=bool(v.predict_mask),
            fusion=v.fusion,
            norm_total=float(data.norm_total),
            dropout=expression_dropout(v.dropout, data),
            expression_norm=expression_norm(v.expression_norm, data),
            expression_input=expression_input(v.expression_input, data),
            image_arch=v.image_arch,
            texture_noise=bool(v.texture_noise),
            image_input=v.image_input,
            image_encoder=v.image_encoder,
            encode_views=int(v.encode_views),
            granule_head=float(v.granule_weight) > 0,
            texture_head=float(v.texture_weight) > 0,
            texture_coarse=bool(v.texture_coarse) and float(v.texture_weight) > 0,
            nucleus_head=float(v.nucleus_weight) > 0,
            lobe_head=bool(v.lobe_head) and float(v.nucleus_weight) > 0,
            lobe_deep_valley=None if v.lobe_deep_valley is None else float(v.lobe_deep_valley),
            n_classes=_n_classes(float(v.classify_weight), data.label_names),
            maturation_ranks=maturation_ranks(
                float(v.maturation_weight), list(v.maturation_classes), data.label_names
            ),
            **size_args(float(v.size_weight), data, source),
            # filled by stage=train's use_batches from vae.batch_key (two or more batches)
            batch_key=str(v.batch_key) if data.batch_names else None,
            batch_names=list(data.batch_names),
            # filled by stage=train's use_image_batches from vae.image_batch_key
            image_batch_key=str(v.image_batch_key) if data.image_batch_names else None,
            image_batch_names=list(data.image_batch_names),
        )
    except ValueError as e:
        raise StageError(f"vae config: {e}") from e


def resolve_align(value: str, obs) -> str:
    """``auto`` -> ``clip`` when every paired row is a same-cell pair, else ``class``."""
    if value != "auto":
        return value
    if "pair_mode" not in obs or HAS_IMAGE not in obs:
        return "class"
    both = obs[HAS_IMAGE].to_numpy().astype(bool) & obs[HAS_EXPRESSION].to_numpy().astype(bool)
    modes = set(obs["pair_mode"].astype(str).to_numpy()[both])
    return "clip" if modes and modes <= {"same_cell"} else "class"


def _image_weight(value: float | None, data, term: str) -> float:
    """``vae.image_weight`` / ``vae.mask_weight``; None -> per-value balance from ``data``."""
    if value is not None:
        return float(value)
    if data is None:
        raise StageError(f"vae.{term}_weight=null (auto) needs the paired data")
    from vae.losses import per_value_weight

    return per_value_weight(data, term)


def _n_classes(weight: float, label_names: list[str]) -> int:
    """Width of the label head: 0 (no head) when it is off or no row has a known label."""
    from vae.data import UNKNOWN_LABEL

    if weight <= 0 or not [n for n in label_names if n != UNKNOWN_LABEL]:
        return 0
    return len(label_names)


def size_args(weight: float, data, source: str) -> dict:
    """``vae.size_weight`` -> the model's size fields: off ({}) at 0, else the size head
    and the standardisation of log diameter over the rows whose size is known."""
    if weight <= 0:
        return {}
    from vae.inputs.schema import CELL_DIAMETER

    d = None if data.diameter is None else data.diameter.numpy()
    d = np.array([]) if d is None else d[np.isfinite(d)]
    if d.size < 2:
        raise StageError(
            f"vae.size_weight={weight:g} needs the cells' sizes: {source} has "
            f"{'no' if data.diameter is None else 'too few'} obs['{CELL_DIAMETER}'] values "
            "(crops cut by stage=segment carry them; set vae.size_weight=0 otherwise)"
        )
    logd = np.log(d.astype(np.float64))
    return {
        "size_head": True,
        "size_log_mean": float(logd.mean()),
        "size_log_sd": float(max(logd.std(), 1e-3)),
    }


def maturation_axis(order: list[str], label_names: list[str], say: bool = True) -> list[str]:
    """The labels ``vae.maturation_classes`` (``order``) orders, earliest first: the
    stages among ``label_names``; [] (no axis) when fewer than two are.

    A class is taken as the data spell it (:func:`vae.inputs.schema.class_labels`):
    "promyelocyte" is the label "Promyelocytes", "segmented_neutrophil" the label
    "Neutrophils", when exactly one label names that stage (said at INFO); two such labels
    are an error naming both where the user gave the list, and leave the stage out with
    a warning where it is the default (the six stages). A stage absent from the labels is dropped (a preset's stages
    on data that lacks some), but one that looks like a typo of a label ("Neutrophls" for
    "Neutrophils") is an error: dropping it would silently train another axis, or none.
    ``say=False``: no log line (the comparison of two settings,
    :func:`pipeline.guards.resolved_setting`)."""
    # the default list (the six stages) was named by no one: a stage two labels spell is
    # left out with a warning, not refused
    given = [str(c) for c in order] != list(MATURATION_ORDER)
    try:
        named, taken, ambiguous = class_labels(
            order, label_names, "vae.maturation_classes", given=given
        )
    except ValueError as e:
        raise StageError(str(e)) from e
    if say:
        say_class_labels(log, "vae.maturation_classes", taken, ambiguous)
    labels = set(label_names)
    present = [c for c in named if c in labels]
    if len(present) < 2:
        if say:
            log.warning(
                "vae.maturation_classes: %d of %s among the labels, so no maturation head "
                "(labels: %s)",
                len(present),
                list(order),
                ", ".join(sorted(labels)[:20]),
            )
        return []
    if say and len(present) < len(named):
        log.info(
            "vae.maturation_classes: %s not among the labels; the axis orders %s",
            [c for c in named if c not in labels],
            present,
        )
    return present


def maturation_ranks(weight: float, order: list[str], label_names: list[str]) -> list[int]:
    """Rank of each label code along ``order`` (-1: not a stage), ranks renumbered over
    the stages present (:func:`maturation_axis`); [] (no head) when off or fewer than two
    stages are labels."""
    if weight <= 0:
        return []
    present = maturation_axis(order, label_names)
    return [present.index(n) if n in present else -1 for n in label_names] if present else []


def unknown_label_code(label_names: list[str]) -> int:
    """Code of the "not known" label in ``label_names`` (-1 when every row is labelled)."""
    from vae.data import UNKNOWN_LABEL

    return label_names.index(UNKNOWN_LABEL) if UNKNOWN_LABEL in label_names else -1


def classify_class_weights(
    balance: float, classify: float, data, train_rows: np.ndarray, unknown_label: int
) -> tuple[tuple[float, ...], ...]:
    """``vae.classify_balance`` -> the label head's class weights per expert (image,
    expression), from the training rows' labels, each logged for the classes that have
    train rows; () when off (every row counts once)."""
    from vae.losses import class_balance_weights

    if balance <= 0 or classify <= 0:
        return ()
    labels = np.asarray(data.labels)
    k = len(data.label_names)
    out = []
    for name, has in (("image", data.has_image), ("expression", data.has_expression)):
        rows = train_rows & np.asarray(has)
        wts = class_balance_weights(labels, rows, k, balance, unknown_label)
        seen = sorted(set(labels[rows].tolist()) - {unknown_label})
        log.info(
            "label head class weights, %s expert (vae.classify_balance=%g): %s",
            name,
            balance,
            ", ".join(f"{data.label_names[c]} {wts[c]:.2f}" for c in seen),
        )
        out.append(wts)
    return tuple(out)


def build_train_args(cfg: DictConfig, align: str | None = None, unknown_label: int = -1, data=None):
    from vae.losses import LossWeights
    from vae.train import TrainArgs

    v, t, hw = cfg.vae, cfg.trainer, cfg.hardware
    try:
        weights = LossWeights(
            image=_image_weight(v.image_weight, data, "image"),
            mask=_image_weight(v.mask_weight, data, "mask") if v.predict_mask else 0.0,
            ssim=v.ssim_weight,
            spectral=v.spectral_weight,
            granules=float(v.granule_weight),
            texture=float(v.texture_weight),
            cross_texture=bool(v.cross_texture),
            nucleus=float(v.nucleus_weight),
            nucleus_gap=float(v.nucleus_gap_weight),
            nucleus_input_compose=bool(v.nucleus_input_compose),
            free_bits=float(v.free_bits),
            classify=float(v.classify_weight),
            classify_noise_q=float(v.classify_noise_q),
            maturation=float(v.maturation_weight),
            view_contrast=float(v.view_contrast_weight),
            size=float(v.size_weight),
            view_temperature=float(v.view_temperature),
            unknown_label=int(unknown_label),
            expression=v.expression_weight,
            cross=v.cross_weight,
            align=v.align_weight,
            align_centroid=float(v.align_centroid_weight),
            align_mode=align or v.align,
            temperature=v.align_temperature,
            late_mask=bool(v.late_mask),
        )
    except ValueError as e:
        raise StageError(f"vae config: {e}") from e
    return TrainArgs(
        max_epochs=int(t.max_epochs),
        stop_after_epochs=None if t.stop_after_epochs is None else int(t.stop_after_epochs),
        batch_size=int(t.batch_size),
        lr=float(t.lr),
        weight_decay=float(t.weight_decay),
        lr_schedule=t.lr_schedule,
        lr_warmup_epochs=float(t.lr_warmup_epochs),
        grad_clip=float(t.grad_clip),
        early_stopping_patience=int(t.early_stopping_patience),
        monitor=str(t.monitor),
        max_minutes=t.max_minutes,
        augment=bool(t.augment),
        stain_jitter=float(t.stain_jitter),
        view_same_stain=bool(v.view_same_stain),
        rotate=float(t.rotate),
        ema_epochs=float(t.ema_epochs),
        seed=int(cfg.seed),
        beta=float(v.beta),
        kl_warmup_epochs=float(v.kl_warmup_epochs),
        capacity_max=float(v.capacity_max),
        capacity_epochs=float(v.capacity_epochs),
        weights=weights,
        image_likelihood=v.image_likelihood,
        num_workers=int(hw.num_workers),
        pin_memory=bool(hw.pin_memory),
        log_every_steps=int(t.log_every_steps),
        image_every_epochs=int(t.image_every_epochs),
        figure_budget=None if t.figure_budget is None else float(t.figure_budget),
        n_images=int(t.n_images),
    )


__all__ = [
    "build_model_args",
    "build_train_args",
    "classify_class_weights",
    "expression_alone",
    "expression_dropout",
    "expression_input",
    "expression_likelihood",
    "expression_norm",
    "maturation_axis",
    "maturation_ranks",
    "resolve_align",
    "unknown_label_code",
]
