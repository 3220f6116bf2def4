"""``stage=expression`` (scanpy preprocessing) and ``stage=pair`` (crops x profiles).

The only place that maps ``cfg.expression`` / ``cfg.pair`` onto the library
calls of :mod:`vae.expression` and :mod:`vae.pairing`. Outputs: see
``docs/artifacts.md`` (sections *expression* and *pair*) and
``docs/expression_pairing.md``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import write_json
from pipeline.stages import StageContext, StageError, stage

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# expression
# ----------------------------------------------------------------------------


def _explicit_expression_file(cfg: DictConfig) -> str | None:
    """The configured expression file, or None to use the simulator's artifact."""
    if cfg.paths.inputs.get("expression_raw"):
        return None  # ctx.input("expression_raw") resolves it
    return cfg.expression.input_file or cfg.data.get("expression_file")


def _expression_needs(cfg: DictConfig) -> list[str]:
    if _explicit_expression_file(cfg):
        return []
    if cfg.data.name != "synthetic" and not cfg.paths.inputs.get("expression_raw"):
        return []  # run_expression explains what to set
    return ["expression_raw"]


def resolve_data_path(cfg: DictConfig, p: str, setting: str) -> Path | str:
    """A path as given when it exists, else relative to ``paths.shared_data``."""
    from vae.expression import BUILTIN_PBMC68K

    if p == BUILTIN_PBMC68K:
        return p
    path = Path(p)
    if path.exists():
        return path
    if not path.is_absolute():
        alt = Path(cfg.paths.shared_data) / path
        if alt.exists():
            return alt
    raise StageError(
        f"{setting}={p}: no such file or folder (also tried under "
        f"paths.shared_data={cfg.paths.shared_data})"
    )


def preprocess_params(cfg: DictConfig):
    from vae.expression import PreprocessParams

    e = cfg.expression
    return PreprocessParams(
        values=e["values"],  # e.values is the DictConfig method
        min_genes=e.min_genes,
        min_counts=e.min_counts,
        max_pct_mito=e.max_pct_mito,
        mito_prefix=e.mito_prefix,
        min_cells=e.min_cells,
        target_sum=e.target_sum,
        n_top_genes=e.n_top_genes,
        hvg_flavor=e.hvg_flavor,
        subset_hvg=e.subset_hvg,
        genes_of_interest=list(e.genes_of_interest),
        programs={k: list(v) for k, v in e.programs.items()},
        require_program_match=e.require_program_match,
        score_ctrl_size=e.score_ctrl_size,
        score_n_bins=e.score_n_bins,
        label_key=e.label_key,
        maturation=e.maturation,
        maturation_key=e.maturation_key,
        root_label=e.root_label,
        scale=e.scale,
        n_pcs=e.n_pcs,
        n_neighbors=e.n_neighbors,
        umap=e.umap,
        seed=cfg.seed if e.seed is None else e.seed,
    )


@stage("expression", needs=_expression_needs, produces=["expression"])
def run_expression(ctx: StageContext) -> None:
    from vae import expression as ex

    cfg = ctx.cfg
    explicit = _explicit_expression_file(cfg)
    if not explicit and cfg.data.name != "synthetic" and not cfg.paths.inputs.get("expression_raw"):
        raise StageError(
            f"data={cfg.data.name} has no expression file: choose one with "
            "expression=paul15 | expression=pbmc68k, expression.input_file=PATH, "
            "data.expression_file=PATH or paths.inputs.expression_raw=PATH"
        )
    if explicit:
        src = resolve_data_path(
            cfg,
            explicit,
            "expression.input_file" if cfg.expression.input_file else "data.expression_file",
        )
    else:
        src = ctx.input("expression_raw")
    try:
        adata = ex.read_expression(
            src, fmt=cfg.expression.input_format, orientation=cfg.expression.orientation
        )
        params = preprocess_params(cfg)
        res = ex.preprocess(adata, params, source=str(src))
    except ex.ExpressionInputError as e:
        raise StageError(str(e)) from e
    out = res.adata
    ex.sanitize_for_h5ad(out)
    log.info(
        "expression: %d -> %d cells, %d -> %d genes (%d HVG, %d of interest), counts=%s, "
        "labels from %s, maturation from %s",
        res.qc.n_cells_in,
        res.qc.n_cells_out,
        res.qc.n_genes_in,
        out.n_vars,
        int(out.var["highly_variable"].sum()),
        int(out.var["gene_of_interest"].sum()),
        out.uns["has_counts"],
        out.uns["label_key"],
        out.uns["maturation_source"],
    )
    if ctx.is_main:
        with ctx.atomic("qc.json") as tmp:
            tmp.write_text(
                json.dumps(
                    {
                        "qc": out.uns["qc"],
                        "has_counts": bool(out.uns["has_counts"]),
                        "programs": res.programs,
                        "missing_genes": res.missing,
                        "label_key": out.uns["label_key"],
                        "maturation_source": out.uns["maturation_source"],
                        "labels": out.obs["label"].value_counts().to_dict(),
                    },
                    indent=2,
                )
                + "\n"
            )
        if cfg.expression.plots:
            with ctx.atomic("qc.png") as tmp:
                ex.plot_qc(res.qc_frame, params, tmp)
            with ctx.atomic("umap.png") as tmp:
                ex.plot_embedding(out, tmp)
        # the artifact last: its presence means the stage finished
        with ctx.atomic("expression") as tmp:
            out.write_h5ad(tmp)


# ----------------------------------------------------------------------------
# pair
# ----------------------------------------------------------------------------


def _pair_needs(cfg: DictConfig) -> list[str]:
    needs = ["expression"]
    for s in cfg.pair.crop_sources:
        if s.kind == "cells":
            needs.append("cells")
        elif s.kind == "coco" and not s.path:
            needs += ["smears", "annotations"]
    return list(dict.fromkeys(needs))


def load_crops(ctx: StageContext):
    """Read and concatenate every ``pair.crop_sources`` entry (or None if empty)."""
    from vae import pairing as pr

    cfg = ctx.cfg
    size, bg = cfg.pair.crop_size, cfg.pair.background_value
    sets = []
    for k, s in enumerate(cfg.pair.crop_sources):
        setting = f"pair.crop_sources[{k}]"
        if s.kind == "cells":
            cs = pr.read_cells_h5ad(ctx.input("cells"), size, bg)
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
                cs = pr.read_image_folder(path, size, bg, s.max_per_class)
            else:
                cs = pr.read_segmentation_wbc(path, size, bg, s.max_per_class)
        else:
            raise StageError(
                f"{setting}.kind={s.kind!r}; valid: cells, coco, image_folder, segmentation_wbc"
            )
        log.info("pair: %d crops from %s (%s)", len(cs), s.kind, s.path or "cells.h5ad")
        sets.append(cs)
    return pr.CropSet.concat(sets) if sets else None


def _cap(cs, n: int):
    from vae.pairing import CropSet

    keep = cs.obs.groupby("label", sort=False).cumcount().to_numpy() < n
    return CropSet(crops=cs.crops[keep], masks=cs.masks[keep], obs=cs.obs[keep])


@stage("pair", needs=_pair_needs, produces=["paired"])
def run_pair(ctx: StageContext) -> None:
    import anndata as ad

    from vae import pairing as pr

    cfg = ctx.cfg
    p = cfg.pair
    if not 0 <= p.background_value <= 255:
        raise StageError(f"pair.background_value={p.background_value}: must be in 0..255")
    expr = ad.read_h5ad(ctx.input("expression"))
    try:
        crops = load_crops(ctx)
        res = pr.make_pairs(
            crops,
            expr,
            p.mode,
            label_map=OmegaConf.to_container(p.label_map),
            draws_per_crop=p.draws_per_crop,
            n_bins=p.n_bins,
            label_maturation=OmegaConf.to_container(p.label_maturation),
            keep_unmatched_images=p.keep_unmatched_images,
            keep_unused_expression=p.keep_unused_expression,
            seed=cfg.seed if p.seed is None else p.seed,
            background=p.background_value,
            crop_size=p.crop_size,
        )
    except pr.PairingError as e:
        raise StageError(str(e)) from e
    out = res.adata
    out.uns["pair"] = {
        "mode": p.mode,
        "seed": int(cfg.seed if p.seed is None else p.seed),
        "draws_per_crop": int(p.draws_per_crop),
        "n_bins": int(p.n_bins),
        "crop_sources": json.dumps(OmegaConf.to_container(p.crop_sources)),
        "notes": json.dumps(res.notes),
    }
    for k in ("programs", "label_key", "maturation_source"):
        if k in expr.uns:
            out.uns[f"expression_{k}"] = expr.uns[k]
    hi, he = out.obs["has_image"].to_numpy(), out.obs["has_expression"].to_numpy()
    counts = {
        "rows": int(out.n_obs),
        "image+expression": int((hi & he).sum()),
        "image_only": int((hi & ~he).sum()),
        "expression_only": int((~hi & he).sum()),
        "genes": int(out.n_vars),
        "crop_size": int(out.uns["crop_size"]),
        "has_counts": bool(out.uns["has_counts"]),
    }
    log.info("pair (%s): %s", p.mode, counts)
    if (hi & he).sum() == 0 and p.mode != "unpaired":
        log.warning("pair.mode=%s produced no paired row; check labels / label_map", p.mode)
    if ctx.is_main:
        with ctx.atomic("pair_summary.csv") as tmp:
            res.summary.to_csv(tmp, index=False)
        write_json(ctx.output("pair_counts.json"), counts)
        if hi.any():
            with ctx.atomic("crops.png") as tmp:
                pr.contact_sheet(out, tmp, seed=cfg.seed)
        with ctx.atomic("paired") as tmp:
            out.write_h5ad(tmp, compression="gzip")
