"""stage=train: the two-branch β-VAE on paired.h5ad.

Reads ``paired`` and writes into ``outputs/<experiment>/train[/<variant>]/``:
``model.pt`` (best on val), ``last.pt``, ``latent.h5ad``, ``split.csv``,
``train_summary.json`` and ``tb/`` (TensorBoard). ``resume=true`` continues
from ``last.pt`` with the saved split.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from pipeline.artifacts import in_experiment, spreadsheet_safe, write_json
from pipeline.runner import StageContext, StageError, interrupted, stage
from pipeline.streaming import load_streamed, streams
from pipeline.train_args import (
    build_model_args,
    build_train_args,
    classify_class_weights,
    crop_side_problem,
    resolve_align,
    unknown_label_code,
)
from segmentation.io import blank_as_read, error_line, write_h5ad

log = logging.getLogger(__name__)


def split_groups(obs, column: str | None, src) -> np.ndarray | None:
    """``obs[column]`` as split groups (a specimen's rows stay in one split), or None.

    The default column, ``specimen``, is written by ``stage=pair`` from the segment
    stage's sources; a table without it is split by row. Any other column named
    in ``trainer.split_by`` must exist.
    """
    if not column:
        return None
    if column not in obs:
        if column == "specimen":
            return None
        raise StageError(f"{src}: trainer.split_by={column!r} but obs has no such column")
    col = obs[column]
    # a missing value of any dtype ("" = a row of its own): a nullable string column's
    # pd.NA read as the text "<NA>" and put every specimen-less row into one group;
    # "nan" / "None" are the texts a missing value became in a table written as strings
    out = col.astype(str).replace({"nan": "", "None": "", "<NA>": ""}).to_numpy(dtype=object)
    out[col.isna().to_numpy()] = ""
    return out


def warn_empty_test(
    split: np.ndarray, groups: np.ndarray | None, test_fraction: float, split_by: str | None
) -> bool:
    """Warn when the split has no test rows although ``test_fraction`` > 0.

    An audit put all 554 rows of the demo in one specimen: the split came out
    554/0/0 and only "no validation rows" was said, so the run evaluated nothing.
    A label gets a val / test unit only when it has at least 3 units (groups, or rows
    when ungrouped), so few groups leave test empty.

    Parameters
    ----------
    split : (N,) ``train`` | ``val`` | ``test``
    groups : (N,) the ``trainer.split_by`` groups ("" = a row of its own), or None
    test_fraction : trainer.test_fraction
    split_by : trainer.split_by (for the message)

    Returns
    -------
    True when the warning was given.
    """
    if test_fraction <= 0 or (split == "test").any() or split.size == 0:
        return False
    if groups is None:
        where = f"{split.size} rows split by row"
    else:
        g = np.asarray(groups, dtype=object)
        n_units = len({x for x in g if x not in (None, "")}) + int(sum(x in (None, "") for x in g))
        where = f"{n_units} group(s) of trainer.split_by={split_by!r}"
    log.warning(
        "the test split is empty although trainer.test_fraction=%s: %s, and a label gets "
        "a val/test share only with >= 3 groups. Add specimens, or set "
        "trainer.split_by=null to split by row (cells of one specimen then sit in "
        "train and test)",
        test_fraction,
        where,
    )
    return True


def exclude_labels(split: np.ndarray, data, labels: list[str]) -> np.ndarray:
    """Move every row whose label is in ``labels`` to the test split (never trained on)."""
    if not labels:
        return split
    unknown = sorted(set(labels) - set(data.label_names))
    if unknown:
        raise StageError(
            f"trainer.exclude_labels: {unknown} not among the labels of the paired data "
            f"({', '.join(data.label_names)})"
        )
    codes = [data.label_names.index(lab) for lab in labels]
    out = split.copy()
    out[np.isin(data.labels.numpy(), codes)] = "test"
    log.info("trainer.exclude_labels=%s: %d rows moved to test", labels, int((out != split).sum()))
    return out


def use_batches(data, obs, key: str, source: str, uns=None) -> None:
    """Give ``data`` its expression batches from ``obs[key]`` (``vae.batch_key``; the
    column stage=pair renamed it to, per ``uns``); one batch only: a warning and no
    covariate (nothing to condition on)."""
    from vae.data import PairedDataError, assign_batches, batch_column, obs_renames

    renamed = obs_renames(uns)
    try:
        names = assign_batches(data, obs, key, source, renamed=renamed)
    except PairedDataError as e:
        raise StageError(str(e)) from e
    codes = data.batch.numpy()
    if len(names) < 2:
        log.warning(
            "vae.batch_key=%s: %s; no batch covariate",
            key,
            f"every profile is in batch {names[0]!r}" if names else "no row has a profile",
        )
        data.batch, data.batch_names = None, []
        return
    sizes = ", ".join(f"{n} {int((codes == i).sum())}" for i, n in enumerate(names))
    col = batch_column(key, renamed)
    where = "" if col == key else f", read from obs['{col}'] (stage=pair's name for it)"
    log.info("expression batches (vae.batch_key=%s%s), profiles each: %s", key, where, sizes)


def use_image_batches(data, obs, key: str, source: str) -> None:
    """Give ``data`` its crops' sources from ``obs[key]`` (``vae.image_batch_key``); one
    source only: a warning and no covariate (nothing to condition on)."""
    from vae.data import PairedDataError, assign_image_batches

    try:
        names = assign_image_batches(data, obs, key, source)
    except PairedDataError as e:
        raise StageError(str(e)) from e
    codes = data.image_batch.numpy()
    if len(names) < 2:
        log.warning(
            "vae.image_batch_key=%s: %s; no image source covariate",
            key,
            f"every crop is from {names[0]!r}" if names else "no row has a crop",
        )
        data.image_batch, data.image_batch_names = None, []
        return
    sizes = ", ".join(f"{n} {int((codes == i).sum())}" for i, n in enumerate(names))
    log.info("image sources (vae.image_batch_key=%s), crops each: %s", key, sizes)


def warn_uncorrected(uns, source: str) -> None:
    """A warning when stage=expression corrected batches (``expression.batch_key``, carried
    by stage=pair as ``uns['expression_batch_correction']``) but this run has no
    ``vae.batch_key``: run stage by stage, the setting is easily given to one stage only."""
    rec = uns.get("expression_batch_correction")
    key = rec.get("batch_key") if isinstance(rec, dict) else None
    if key:
        log.warning(
            "%s: stage=expression corrected batches by obs['%s'] (expression.batch_key), but "
            "vae.batch_key is null here: the VAE gets no batch covariate (pass "
            "expression.batch_key=%s or vae.batch_key=%s to this command too)",
            source,
            key,
            key,
            key,
        )


def _needs(cfg) -> list[str]:
    # vae.image_backbone_weights=detector: the study's detector must exist before train
    return ["paired", "segmentation_model"] if _backbone_is_detector(cfg) else ["paired"]


def _backbone_is_detector(cfg) -> bool:
    return str(cfg.vae.get("image_backbone_weights") or "") == "detector"


def _validate(cfg) -> None:
    from vae.model import IMAGE_ENCODERS

    if cfg.vae.image_encoder not in IMAGE_ENCODERS:
        raise StageError(
            f"vae.image_encoder={cfg.vae.image_encoder!r}; valid: {', '.join(IMAGE_ENCODERS)}"
        )
    weights = cfg.vae.get("image_backbone_weights")
    if weights and cfg.vae.image_encoder != "resnet18":
        raise StageError(
            f"vae.image_backbone_weights={weights} needs vae.image_encoder=resnet18 "
            f"(got {cfg.vae.image_encoder!r})"
        )
    if weights and not _backbone_is_detector(cfg) and not Path(str(weights)).is_file():
        raise StageError(f"vae.image_backbone_weights={weights}: no such file")
    if cfg.vae.texture_noise and cfg.vae.image_arch != "residual":
        # the noise enters the residual decoder's last conv; the plain decoder has none
        raise StageError(
            f"vae.texture_noise=true needs vae.image_arch=residual (got {cfg.vae.image_arch!r})"
        )
    if cfg.vae.get("texture_coarse") and not float(cfg.vae.texture_weight) > 0:
        # the two bands are the texture layer's; without it the switch would do nothing
        raise StageError(
            "vae.texture_coarse=true needs the texture layer it splits in two: "
            f"vae.texture_weight > 0 (got {cfg.vae.texture_weight})"
        )
    if cfg.trainer.get("split_from"):
        _split_source(cfg.trainer.split_from)
    # the crop side the image branch will see: vae.image_size, else the crops stage=pair
    # makes in this run (an explicit paired.h5ad is checked when it is read)
    setting, side = ("vae.image_size", cfg.vae.image_size)
    if side is None and not cfg.paths.inputs.get("paired"):
        setting, side = ("pair.crop_size", cfg.pair.crop_size)
    why = crop_side_problem(side, cfg.vae.channels) if side is not None else None
    if why:
        raise StageError(f"{setting}={side}: {why}")


def _split_source(setting: str) -> Path:
    """The latent.h5ad that ``trainer.split_from`` names (a train run folder or the file)."""
    p = Path(str(setting))
    p = p / "latent.h5ad" if p.is_dir() else p
    if not p.is_file():
        raise StageError(
            f"trainer.split_from={setting}: no latent.h5ad there (give a finished "
            "stage=train folder or its latent.h5ad)"
        )
    return p


def _reused_split(setting: str, obs, groups, fresh) -> np.ndarray:
    """``trainer.split_from``: each row's split in that run. A row it does not know
    joins its group's split where another row of the group is known (a specimen stays
    in one split); the rest get ``fresh(rows)`` (the usual seeded split among them)."""
    import anndata as ad

    from vae.data import PairedDataError, match_split

    path = _split_source(setting)
    try:
        ref_table = ad.read_h5ad(path, backed="r")
    except Exception as e:  # noqa: BLE001 - the user's file: OSError (not HDF5, truncated),
        # KeyError (HDF5 without AnnData's groups), anndata's IORegistryError (an encoding
        # it does not know)...: whichever, one line naming the setting and the file
        raise StageError(
            f"trainer.split_from={setting}: {path} is not a readable .h5ad file (truncated, "
            f"or not the latent.h5ad of a stage=train run): {error_line(e)}"
        ) from None
    try:
        ref = blank_as_read(ref_table.obs.copy())
    finally:
        ref_table.file.close()
    try:
        split = match_split(obs, ref, "paired table", str(path))
    except KeyError as e:
        raise StageError(f"trainer.split_from={setting}: {path} has no obs column {e}") from None
    except PairedDataError as e:
        raise StageError(f"trainer.split_from={setting}: {e}") from None
    unknown = np.flatnonzero(split == "")
    if unknown.size and groups is not None:
        known = {g: s for g, s in zip(groups, split) if g and s}
        for i in unknown:
            split[i] = known.get(groups[i], "")
    new = np.flatnonzero(split == "")
    if new.size:
        split[new] = fresh(new)
    log.info(
        "split: %d rows keep their split from %s, %d rows new to it (%d join their "
        "specimen's split, %d split among themselves)",
        split.size - unknown.size,
        path,
        unknown.size,
        unknown.size - new.size,
        new.size,
    )
    return split.astype(str)


def init_backbone(ctx: StageContext, model) -> None:
    """Load ``vae.image_backbone_weights`` into the resnet18 image encoder's trunk."""
    from vae.backbone import BackboneWeightsError, load_backbone

    weights = ctx.cfg.vae.get("image_backbone_weights")
    if not weights:
        return
    path = ctx.input("segmentation_model") if _backbone_is_detector(ctx.cfg) else Path(weights)
    try:
        n = load_backbone(model.image_encoder, path)
    except BackboneWeightsError as e:
        raise StageError(f"vae.image_backbone_weights: {e}") from e
    log.info("image encoder: resnet18 trunk from %s (%d tensors)", path, n)


@stage(
    "train",
    needs=_needs,
    produces=["model", "latent"],
    distributed=True,
    validate=_validate,
)
def run_train(ctx: StageContext) -> None:
    import anndata as ad
    import torch

    from vae.analysis.anomaly import anomaly_scores
    from vae.data import PairedDataError, from_anndata, stratified_split
    from vae.infer import encode_dataset
    from vae.model import TwoBranchVAE
    from vae.tb import TBLogger, pick_granule_genes
    from vae.train import train

    cfg, dist = ctx.cfg, ctx.dist
    src = ctx.input("paired")
    t0 = time.time()
    try:
        if streams(cfg, src):
            data, adata = load_streamed(ctx, src)
        else:
            adata = blank_as_read(ad.read_h5ad(src))
            data = from_anndata(adata, str(src), cfg.vae.image_size)
    except PairedDataError as e:
        raise StageError(str(e)) from e
    if cfg.trainer.lr_schedule not in ("cosine", "constant"):
        raise StageError(
            f"trainer.lr_schedule={cfg.trainer.lr_schedule!r}; valid: cosine, constant"
        )
    if cfg.vae.get("batch_key"):
        use_batches(data, adata.obs, str(cfg.vae.batch_key), str(src), adata.uns)
    else:
        warn_uncorrected(adata.uns, str(src))
    if cfg.vae.get("image_batch_key"):
        use_image_batches(data, adata.obs, str(cfg.vae.image_batch_key), str(src))
    margs = build_model_args(cfg, data, str(src))
    align = resolve_align(cfg.vae.align, adata.obs)
    targs = build_train_args(cfg, align, unknown_label_code(data.label_names), data)
    log.info(
        "loss weights: image %.4g, mask %.4g (vae.image_weight=%s, vae.mask_weight=%s)",
        targs.weights.image,
        targs.weights.mask,
        cfg.vae.image_weight,
        cfg.vae.mask_weight,
    )
    log.info("alignment: %s (vae.align=%s) weight %s", align, cfg.vae.align, cfg.vae.align_weight)

    split_csv = ctx.output("split.csv")
    last = ctx.output("last.pt")
    resume = bool(cfg.resume) and last.exists()
    if cfg.resume and not last.exists():
        log.warning("resume=true but %s does not exist: starting from scratch", last)
    if resume and split_csv.exists():
        from vae.analysis.run import read_split

        saved = read_split(split_csv)  # the names as they were before quoting
        if list(saved.index) != data.obs_names:
            raise StageError(f"{split_csv}: rows differ from {src}; cannot resume")
        split = saved.to_numpy()
    else:
        groups = split_groups(adata.obs, cfg.trainer.split_by, src)

        def fresh(rows: np.ndarray) -> np.ndarray:
            return stratified_split(
                np.asarray(data.labels)[rows],
                float(cfg.trainer.val_fraction),
                float(cfg.trainer.test_fraction),
                int(cfg.seed),
                groups=None if groups is None else np.asarray(groups, dtype=object)[rows],
            )

        if cfg.trainer.get("split_from"):
            split = _reused_split(cfg.trainer.split_from, adata.obs, groups, fresh)
        else:
            split = fresh(np.arange(data.n))
        split = exclude_labels(split, data, list(cfg.trainer.exclude_labels))
        warn_empty_test(split, groups, float(cfg.trainer.test_fraction), cfg.trainer.split_by)
        if dist.is_main:
            with ctx.atomic("split.csv") as tmp:
                # the cell names come from the user's files: "=HYPERLINK(...)" quoted as
                # text (spreadsheet_safe quotes columns, not the index: "obs" is one)
                table = pd.DataFrame({"obs": data.obs_names, "split": split})
                spreadsheet_safe(table).to_csv(tmp, index=False)
    class_w = classify_class_weights(
        float(cfg.vae.classify_balance),
        targs.weights.classify,
        data,
        split == "train",
        targs.weights.unknown_label,
    )
    if class_w:
        targs = replace(targs, weights=replace(targs.weights, classify_class_weights=class_w))
    torch.manual_seed(int(cfg.seed))
    model = TwoBranchVAE(margs)
    if not resume:  # a resumed run continues from its own weights
        init_backbone(ctx, model)
    log.info(
        "paired: %d rows (%d image, %d expression, %d both), %d genes, crops %dpx; "
        "split train/val/test %d/%d/%d; %s likelihood; %d parameters",
        data.n,
        int(data.has_image.sum()),
        int(data.has_expression.sum()),
        int((data.has_image & data.has_expression).sum()),
        data.n_genes,
        data.crop_size,
        *(int((split == s).sum()) for s in ("train", "val", "test")),
        margs.expression_likelihood if margs.n_genes else "no expression",
        sum(p.numel() for p in model.parameters()),
    )
    granule = pick_granule_genes(data.gene_names, adata.var, max_genes=len(data.gene_names))
    meta = {
        "gene_names": data.gene_names,
        "label_names": data.label_names,
        "granule_genes": [data.gene_names[i] for i in granule],
        "norm_total": data.norm_total,
        "has_counts": data.counts is not None,
        "expression_likelihood": margs.expression_likelihood,
        "fusion": margs.fusion,
        # relative to the experiment folder when inside it (pair/paired.h5ad), so one
        # study trained in two folders writes one model.pt (model_digest); an outside
        # file keeps its absolute path. Readers: vae.api.Study (old absolute ones too)
        "source": checkpoint_source(src, ctx.run_dir),
    }
    tb = TBLogger(ctx.output("tb"), data.gene_names, granule[:12]) if dist.is_main else None
    if tb is not None:
        tb.dims_legend(int(model.args.n_shared), int(model.args.n_private))
        log.info("TensorBoard: %s", tensorboard_command(ctx.output("tb")))
    resolved = checkpoint_config(OmegaConf.to_container(cfg, resolve=True))
    try:
        result = train(
            model,
            data,
            split,
            targs,
            dist,
            ctx.dir,
            resume_from=last if resume else None,
            meta=meta,
            config=resolved,
            tb=tb,
            # a Ctrl-C whose KeyboardInterrupt a library swallowed (a weakref callback
            # only prints it) trained on to the end, exit 0: now the next step stops
            should_stop=interrupted,
        )
        if interrupted():  # noted during the last steps: no latents of a stopped run
            raise KeyboardInterrupt
        if not dist.is_main:
            return
        # latents of every row from the best checkpoint
        from vae.checkpoint import load_model

        best, _ = load_model(ctx.output("model"), dist.device)
        lat = encode_dataset(best, data, dist.device)
        anomaly = anomaly_scores(best, data, split == "train", dist.device, latents=lat)
        if tb is not None and cfg.trainer.projector_max_cells > 0:
            _projector(
                tb,
                lat.joint[:, : margs.n_shared],
                data,
                int(cfg.trainer.projector_max_cells),
                result.steps,
            )
    finally:
        if tb is not None:
            tb.close()
    _write_latent(ctx, adata, data, split, lat, margs, result, anomaly)
    write_json(
        ctx.output("train_summary.json"),
        {
            **{k: v for k, v in asdict(result).items() if k != "history"},
            "n_rows": data.n,
            "split_counts": {s: int((split == s).sum()) for s in ("train", "val", "test")},
            "model_args": asdict(margs),
            **run_settings(cfg, result),
            "wall_seconds": round(time.time() - t0, 2),
        },
    )
    log.info(
        "train: %d epochs (%s), best epoch %d val %s %.4g, %.1fs",
        result.epochs,
        result.stopped,
        result.best_epoch,
        cfg.trainer.monitor,
        result.best_val,
        result.seconds,
    )


def run_settings(cfg, result) -> dict:
    """What train_summary.json says to compare runs by: the key settings, and the best
    epoch's validation loss with β (``best_val_total``: the objective, β · KL) and at
    β = 1 (``best_val_neg_elbo``, the ``val/neg_elbo`` term: weighted reconstruction +
    1 · KL, lower is better), on which runs of different ``vae.beta`` compare at equal
    term weights. (``best_val`` beside them is the term ``trainer.monitor`` selected on.)"""
    best = next((r for r in result.history if r.get("epoch") == result.best_epoch), None)
    val = best.get("val", {}) if best else {}
    return {
        "settings": {
            "vae.beta": float(cfg.vae.beta),
            "vae.n_latent": int(cfg.vae.n_latent),
            "vae.n_private": int(cfg.vae.n_private),
            "vae.kl_warmup_epochs": float(cfg.vae.kl_warmup_epochs),
            "vae.capacity_max": float(cfg.vae.capacity_max),
            "trainer.max_epochs": int(cfg.trainer.max_epochs),
            "trainer.lr": float(cfg.trainer.lr),
            "trainer.monitor": str(cfg.trainer.monitor),
        },
        "best_val_total": val.get("total"),
        "best_val_neg_elbo": val.get("neg_elbo"),
    }


def tensorboard_command(log_dir: str | Path) -> str:
    """The command that shows ``log_dir``: the ``tensorboard`` beside the running
    interpreter (the bare name is on PATH only with the venv activated), quoted."""
    exe = Path(sys.executable).parent / "tensorboard"
    return f"{shlex.quote(str(exe))} --logdir {shlex.quote(str(Path(log_dir).absolute()))}"


def checkpoint_source(src: str | Path, experiment: str | Path) -> str:
    """``meta["source"]`` of model.pt: ``src`` relative to the ``experiment`` folder
    (POSIX, e.g. ``pair/paired.h5ad``) when inside it, else its absolute path."""
    rel = in_experiment(src, experiment)
    return rel if rel is not None else str(Path(src).absolute())


def checkpoint_config(resolved: dict) -> dict:
    """The resolved config model.pt stores: without ``paths.root`` (where outputs went
    changes no weight, and kept the digests of two identical runs apart); the run's
    manifest.json keeps the whole config."""
    paths = resolved.get("paths")
    if isinstance(paths, dict) and "root" in paths:
        resolved = {**resolved, "paths": {k: v for k, v in paths.items() if k != "root"}}
    return resolved


def _projector(tb, latent: np.ndarray, data, max_cells: int, step: int) -> None:
    import torch
    from torch.nn import functional as F

    rows = np.flatnonzero(data.has_image.numpy())[:max_cells]
    if rows.size == 0:
        return
    idx = torch.as_tensor(rows)
    crops = data.crops.index_select(0, idx).float() / 255.0
    thumbs = F.interpolate(crops, size=(32, 32), mode="area")
    labels = [data.label_names[int(c)] for c in data.labels[idx]]
    tb.projector(latent[rows], labels, thumbs, step)


def _write_latent(ctx: StageContext, adata, data, split, lat, margs, result, anomaly) -> None:
    import anndata as ad

    from vae.checkpoint import checkpoint_digest
    from vae.scverse import ROW_KEY, cell_obs_names, latent_obsm

    ns = margs.n_shared
    obs = adata.obs.copy()
    obs["split"] = pd.Categorical(split, categories=["train", "val", "test"])
    for col in anomaly.columns:  # names owned by vae.inputs.schema.ANOMALY_COLUMNS
        obs[col] = anomaly[col].to_numpy(dtype=np.float32)
    # rows named by the cells' own IDs (vae/scverse.py); paired.h5ad's row ID kept for joins
    obs.insert(0, ROW_KEY, obs.index.astype(str))
    obs.index = cell_obs_names(obs)
    obs.index.name = None
    out = ad.AnnData(obs=obs, obsm=latent_obsm(lat, ns, margs.n_private))
    out.uns["kl_per_dim"] = np.asarray(result.kl_per_dim, dtype=np.float32)
    out.uns["latent_layout"] = {"n_shared": ns, "n_private": margs.n_private}
    out.uns["best_epoch"] = int(result.best_epoch)
    # which model.pt these latents come from: stage=embed / vae.api.Study check it
    out.uns["model_digest"] = checkpoint_digest(ctx.output("model"))
    if margs.maturation_ranks:  # the ordinal head's axis: shared dim 0, stages in rank order
        ranked = sorted((r, n) for r, n in zip(margs.maturation_ranks, data.label_names) if r >= 0)
        out.uns["maturation_axis"] = {"dim": 0, "classes": [n for _, n in ranked]}
    with ctx.atomic("latent") as tmp:
        write_h5ad(out, tmp)


__all__ = ["run_train", "build_model_args", "build_train_args"]
