"""stage=train: the two-branch β-VAE on paired.h5ad.

Reads ``paired`` and writes into ``outputs/<experiment>/train[/<variant>]/``:
``model.pt`` (best on val), ``last.pt``, ``latent.h5ad``, ``split.csv``,
``train_summary.json`` and ``tb/`` (TensorBoard). ``resume=true`` continues
from ``last.pt`` with the saved split.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import write_json
from pipeline.runner import StageContext, StageError, stage
from pipeline.streaming import load_streamed, streams
from segmentation.io import write_h5ad
from vae.inputs.schema import HAS_EXPRESSION, HAS_IMAGE

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


def build_model_args(cfg: DictConfig, data, source: str):
    from vae.model import VAEArgs

    v = cfg.vae
    try:
        return VAEArgs(
            n_genes=data.n_genes,
            crop_size=data.crop_size,
            n_shared=int(v.n_latent),
            n_private=int(v.n_private),
            channels=list(v.channels),
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
            dropout=float(v.dropout),
            image_arch=v.image_arch,
            texture_noise=bool(v.texture_noise),
            image_input=v.image_input,
            encode_views=int(v.encode_views),
            granule_head=float(v.granule_weight) > 0,
            nucleus_head=float(v.nucleus_weight) > 0,
            n_classes=_n_classes(float(v.classify_weight), data.label_names),
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


def unknown_label_code(label_names: list[str]) -> int:
    """Code of the "not known" label in ``label_names`` (-1 when every row is labelled)."""
    from vae.data import UNKNOWN_LABEL

    return label_names.index(UNKNOWN_LABEL) if UNKNOWN_LABEL in label_names else -1


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
    return obs[column].astype(str).replace({"nan": "", "None": ""}).to_numpy(dtype=object)


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
            nucleus=float(v.nucleus_weight),
            free_bits=float(v.free_bits),
            classify=float(v.classify_weight),
            unknown_label=int(unknown_label),
            expression=v.expression_weight,
            cross=v.cross_weight,
            align=v.align_weight,
            align_mode=align or v.align,
            temperature=v.align_temperature,
            late_mask=bool(v.late_mask),
        )
    except ValueError as e:
        raise StageError(f"vae config: {e}") from e
    return TrainArgs(
        max_epochs=int(t.max_epochs),
        batch_size=int(t.batch_size),
        lr=float(t.lr),
        weight_decay=float(t.weight_decay),
        lr_schedule=t.lr_schedule,
        lr_warmup_epochs=float(t.lr_warmup_epochs),
        grad_clip=float(t.grad_clip),
        early_stopping_patience=int(t.early_stopping_patience),
        max_minutes=t.max_minutes,
        augment=bool(t.augment),
        stain_jitter=float(t.stain_jitter),
        rotate=float(t.rotate),
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
        n_images=int(t.n_images),
    )


@stage("train", needs=["paired"], produces=["model", "latent"], distributed=True)
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
            adata = ad.read_h5ad(src)
            data = from_anndata(adata, str(src), cfg.vae.image_size)
    except PairedDataError as e:
        raise StageError(str(e)) from e
    if cfg.trainer.lr_schedule not in ("cosine", "constant"):
        raise StageError(
            f"trainer.lr_schedule={cfg.trainer.lr_schedule!r}; valid: cosine, constant"
        )
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
        saved = pd.read_csv(split_csv, index_col=0)
        if list(saved.index.astype(str)) != data.obs_names:
            raise StageError(f"{split_csv}: rows differ from {src}; cannot resume")
        split = saved["split"].to_numpy().astype(str)
    else:
        split = stratified_split(
            np.asarray(data.labels),
            float(cfg.trainer.val_fraction),
            float(cfg.trainer.test_fraction),
            int(cfg.seed),
            groups=split_groups(adata.obs, cfg.trainer.split_by, src),
        )
        split = exclude_labels(split, data, list(cfg.trainer.exclude_labels))
        if dist.is_main:
            with ctx.atomic("split.csv") as tmp:
                pd.DataFrame({"split": split}, index=pd.Index(data.obs_names, name="obs")).to_csv(
                    tmp
                )
    torch.manual_seed(int(cfg.seed))
    model = TwoBranchVAE(margs)
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
        "source": str(src),
    }
    tb = TBLogger(ctx.output("tb"), data.gene_names, granule[:12]) if dist.is_main else None
    resolved = OmegaConf.to_container(cfg, resolve=True)
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
        )
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
            "wall_seconds": round(time.time() - t0, 2),
        },
    )
    log.info(
        "train: %d epochs (%s), best epoch %d val %.4g, %.1fs",
        result.epochs,
        result.stopped,
        result.best_epoch,
        result.best_val,
        result.seconds,
    )


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
    with ctx.atomic("latent") as tmp:
        write_h5ad(out, tmp)


__all__ = ["run_train", "build_model_args", "build_train_args"]
