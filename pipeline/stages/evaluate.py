"""``stage=evaluate``: held-out metrics of the trained VAE (``analysis.split``).

Reconstruction (masked image MSE/SSIM, per-gene r, NB log-likelihood),
cross-modal prediction, latent structure (kNN accuracy, silhouette, Leiden
ARI/NMI), retrieval of paired partners (Recall@k, FOSCTTM) and
disentanglement against simulator truth (MIG, DCI, best-dim Spearman);
``metrics.json``, one CSV per table, UMAP figures, TensorBoard, and
``latent.h5ad``: train's latent table with the UMAP in ``obsm["X_umap"]``.

The analysis itself is :func:`vae.analysis.evaluate.evaluate`; this file maps
the config onto it (see docs/analysis.md).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from pipeline.artifacts import write_json
from pipeline.runner import StageContext, StageError, stage
from segmentation.io import write_h5ad


def analysis_settings(ctx: StageContext):
    """``cfg.analysis`` as the library's typed settings, with the gene programs of
    ``expression.programs`` (their one definition, also used by stage=expression)."""
    from vae.analysis.settings import AnalysisSettings

    return AnalysisSettings(
        **OmegaConf.to_container(ctx.cfg.analysis, resolve=True),
        programs=OmegaConf.to_container(ctx.cfg.expression.programs, resolve=True),
    )


def load_run_data(ctx: StageContext):
    """The run's latent table, model and (optional) paired data, checked to fit together."""
    from vae.analysis.run import AnalysisError, load_run

    paired = ctx.input("paired") if ctx.has_input("paired") else None
    device = ctx.dist.device if ctx.dist is not None else "cpu"
    try:
        return load_run(ctx.input("latent"), ctx.input("model"), paired, device)
    except AnalysisError as e:
        raise StageError(str(e)) from e


def tensorboard(ctx: StageContext):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(ctx.output("tb")))


@stage(
    "evaluate",
    needs=["latent", "model"],
    optional=["paired"],
    produces=["evaluation", "latent.h5ad"],
)
def run_evaluate(ctx: StageContext) -> None:
    from vae.analysis.evaluate import evaluate
    from vae.analysis.run import AnalysisError, Outputs

    settings = analysis_settings(ctx)
    rd = load_run_data(ctx)
    tb = tensorboard(ctx) if ctx.is_main else None
    try:
        metrics = evaluate(rd, settings, Outputs(ctx.dir, tb), seed=int(ctx.cfg.seed))
    except AnalysisError as e:
        raise StageError(str(e)) from e
    finally:
        if tb is not None:
            tb.close()
    write_json(ctx.output("evaluation"), metrics)
    # train's latent.h5ad + obsm["X_umap"] (the embedding of umap_labels.png): the file to
    # open in scanpy (sc.pl.umap works as is); train's own copy stays as recorded
    with ctx.atomic("latent.h5ad") as tmp:
        write_h5ad(rd.latent, tmp)
