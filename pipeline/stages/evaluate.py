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


def simulator_truth(ctx: StageContext, rd):
    """Noise-free log-normalised expression (N, G) of every row when the rows are the
    simulator's (``data=synthetic``, obs ``kind``/``t``, genes of its panel), else None."""
    import numpy as np

    from pipeline.simulator import make_gene_panel
    from pipeline.simulator.expression import mean_profile

    sim = ctx.cfg.data.get("simulator")
    obs = rd.latent.obs
    if ctx.cfg.data.name != "synthetic" or sim is None or rd.data is None:
        return None
    if "kind" not in obs or "t" not in obs:
        return None
    from pipeline.stages.simulate import simulated_seed

    panel = make_gene_panel(int(sim.n_genes), simulated_seed(ctx.run_dir, ctx.cfg))
    pos = {str(g): j for j, g in enumerate(panel.genes)}
    cols = [pos.get(g) for g in rd.gene_names]
    if any(c is None for c in cols):
        return None  # not the simulator panel of this config's seed
    out = np.zeros((len(obs), len(cols)), np.float32)
    target = float(np.median(np.expm1(rd.data.x.numpy()).sum(1)))  # the data's normalised total
    for i, (kind, t) in enumerate(zip(obs["kind"].astype(str), obs["t"].astype(float))):
        try:
            share = mean_profile(panel, kind, None if np.isnan(t) else t)[cols]
        except ValueError:  # a kind the simulator does not make: not its cells
            return None
        out[i] = np.log1p(share / share.sum() * target)
    return out


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
        metrics = evaluate(
            rd,
            settings,
            Outputs(ctx.dir, tb),
            seed=int(ctx.cfg.seed),
            noise_free=simulator_truth(ctx, rd),
        )
    except AnalysisError as e:
        raise StageError(str(e)) from e
    finally:
        if tb is not None:
            tb.close()
    from vae.checkpoint import checkpoint_digest

    # which model these numbers are of: stage=traverse leaves them out of its report
    # when model.pt has been trained again since (pipeline/stages/traverse.py)
    metrics["model_digest"] = checkpoint_digest(ctx.input("model"))
    write_json(ctx.output("evaluation"), metrics)
    # train's latent.h5ad + obsm["X_umap"] (the embedding of umap_labels.png): the file to
    # open in scanpy (sc.pl.umap works as is); train's own copy stays as recorded
    with ctx.atomic("latent.h5ad") as tmp:
        write_h5ad(rd.latent, tmp)
