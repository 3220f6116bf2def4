"""``stage=expression``: scanpy preprocessing of the expression matrix.

The only place that maps ``cfg.expression`` onto :mod:`vae.inputs.expression`.
Output: see ``docs/artifacts.md`` (section *expression*) and
``docs/expression_pairing.md``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from pipeline.runner import StageContext, StageError, resolve_data_path, stage
from segmentation.io import error_line, write_h5ad
from vae.inputs.schema import HAS_COUNTS

log = logging.getLogger(__name__)


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


def preprocess_params(cfg: DictConfig):
    from vae.inputs.expression import PreprocessParams

    e = cfg.expression
    return PreprocessParams(
        values=e["values"],  # e.values is the DictConfig method
        counts_layer=e.counts_layer,
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
        batch_key=e.batch_key,
    )


def _validate(cfg: DictConfig) -> None:
    """An expression input is configured and its file exists, and the optional code the
    settings need is installed (before any folder is made)."""
    from vae.inputs.expression import (
        BUILTIN_PBMC68K,
        HVG_FLAVORS_ON_COUNTS,
        ExpressionInputError,
        require_skmisc,
    )

    e = cfg.expression
    # the flavor's name is checked with the other options (pipeline.ranges); its optional
    # package here, not 20 s into preprocessing
    if e.n_top_genes is not None and e.hvg_flavor in HVG_FLAVORS_ON_COUNTS:
        try:
            require_skmisc(e.hvg_flavor, field="expression.hvg_flavor")
        except ExpressionInputError as err:
            raise StageError(str(err)) from None
    explicit = _explicit_expression_file(cfg)
    if not explicit and cfg.data.name != "synthetic" and not cfg.paths.inputs.get("expression_raw"):
        raise StageError(
            f"data={cfg.data.name} has no expression file: choose one with "
            "expression=paul15 | expression=pbmc68k, expression.input_file=PATH, "
            "data.expression_file=PATH or paths.inputs.expression_raw=PATH"
        )
    if explicit and explicit != BUILTIN_PBMC68K:
        setting = "expression.input_file" if cfg.expression.input_file else "data.expression_file"
        path = Path(resolve_data_path(cfg, explicit, setting))
        if path.suffix == ".h5ad" and path.is_file():
            keys = {"expression.label_key": e.label_key}
            if e.maturation in ("auto", "column"):  # dpt and none read no column
                keys["expression.maturation_key"] = e.maturation_key
            _check_h5ad_input(path, setting, keys)


def _check_h5ad_input(path: Path, setting: str, keys: dict[str, str | None]) -> None:
    """An .h5ad input opens and holds the obs columns asked for (``keys``: setting ->
    column, None = not set): a cheap look (obs only, backed) so that stage=all's precheck
    fails before the stages before this one run."""
    import anndata as ad

    try:
        a = ad.read_h5ad(path, backed="r")
    except Exception as e:  # noqa: BLE001 - any reader error: not a usable file
        raise StageError(f"{setting}={path}: not a readable .h5ad file ({error_line(e)})") from e
    try:
        for name, key in keys.items():
            if key and key not in a.obs:
                raise StageError(
                    f"{name}={key}: {path} has no obs column {key!r} "
                    f"(its columns: {', '.join(map(str, a.obs.columns[:12]))})"
                )
    finally:
        a.file.close()


@stage("expression", needs=_expression_needs, produces=["expression"], validate=_validate)
def run_expression(ctx: StageContext) -> None:
    from vae.inputs import expression as ex

    cfg = ctx.cfg
    explicit = _explicit_expression_file(cfg)
    _validate(cfg)
    if explicit == ex.BUILTIN_PBMC68K:
        src = explicit
    elif explicit:
        src = resolve_data_path(
            cfg,
            explicit,
            "expression.input_file" if cfg.expression.input_file else "data.expression_file",
        )
    else:
        src = ctx.input("expression_raw")
    try:
        known = [g for gs in cfg.expression.programs.values() for g in gs]
        adata = ex.read_expression(
            src,
            fmt=cfg.expression.input_format,
            orientation=cfg.expression.orientation,
            known_genes=[*known, *cfg.expression.genes_of_interest],
        )
        params = preprocess_params(cfg)
        # copy=False: the input is not needed afterwards, and a copy of a 100k-cell
        # matrix is 1.6 GB more at the peak
        res = ex.preprocess(adata, params, source=str(src), copy=False)
        del adata
    except ex.ExpressionInputError as e:
        raise StageError(str(e)) from e
    out = res.adata
    if cfg.expression.notes:
        out.uns["data_notes"] = np.array([str(n) for n in cfg.expression.notes], dtype=str)
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
        out.uns[HAS_COUNTS],
        out.uns["label_key"],
        out.uns["maturation_source"],
    )
    if ctx.is_main:
        with ctx.atomic("qc.json") as tmp:
            tmp.write_text(
                json.dumps(
                    {
                        "qc": out.uns["qc"],
                        HAS_COUNTS: bool(out.uns[HAS_COUNTS]),
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
            write_h5ad(out, tmp)
