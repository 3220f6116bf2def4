"""``stage=traverse``: latent traversals, maturation paths, granule features, ``report.html``.

Per-dimension sweeps of the top-k latent dims by KL, straight and GP paths
from the earliest to the latest maturation class, genes ranked along the
path, granule features measured (scikit-image) on decoded and real crops and
correlated with latent dims and path position, recovery of simulator truth,
and a self-contained ``report.html``.

The analysis itself is :func:`vae.analysis.study.traverse_study`; this file
maps the config onto it (see docs/analysis.md).
"""

from __future__ import annotations

import time

from omegaconf import OmegaConf

from pipeline.artifacts import write_json
from pipeline.runner import StageContext, StageError, stage
from pipeline.stages.evaluate import analysis_settings, load_run_data, tensorboard


@stage(
    "traverse",
    needs=["latent", "model"],
    optional=["paired", "evaluation", "crop_rejects"],
    produces=["report"],
)
def run_traverse(ctx: StageContext) -> None:
    from pipeline.simulator.morphology import azurophilic_density
    from vae.analysis.run import AnalysisError, Outputs
    from vae.analysis.study import traverse_study

    cfg = ctx.cfg
    settings = analysis_settings(ctx)
    rd = load_run_data(ctx)
    evaluation = ctx.input("evaluation") if ctx.has_input("evaluation") else None
    rejects = ctx.input("crop_rejects") if ctx.has_input("crop_rejects") else None
    tb = tensorboard(ctx)
    try:
        summary = traverse_study(
            rd,
            settings,
            Outputs(ctx.dir, tb),
            report=ctx.output("report"),
            evaluation=evaluation,
            crop_rejects=rejects,
            title=f"WBC beta-VAE study: {cfg.experiment}"
            + (f" / {cfg.variant}" if cfg.variant else ""),
            subtitle=f"run folder {ctx.run_dir}; model {ctx.input('model')} (epoch "
            f"{rd.meta.get('epoch')}); written {time.strftime('%Y-%m-%d %H:%M')}",
            resolved_config=OmegaConf.to_container(cfg, resolve=True),
            background=float(cfg.pair.background_value) / 255.0 if "pair" in cfg else 0.0,
            azurophilic_density=azurophilic_density,
            seed=int(cfg.seed),
        )
    except AnalysisError as e:
        raise StageError(str(e)) from e
    finally:
        tb.close()
    write_json(ctx.output("traverse_summary.json"), summary)
    print(f"report: {ctx.output('report')}\ntensorboard --logdir {ctx.run_dir}")
