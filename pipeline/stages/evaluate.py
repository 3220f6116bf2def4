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

import logging
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.artifacts import write_json
from pipeline.runner import StageContext, StageError, stage
from segmentation.io import write_h5ad

log = logging.getLogger(__name__)


def analysis_settings(ctx: StageContext):
    """``cfg.analysis`` as the library's typed settings, with the gene programs of
    ``expression.programs`` (their one definition, also used by stage=expression)."""
    from vae.analysis.settings import AnalysisSettings

    return AnalysisSettings(
        **OmegaConf.to_container(ctx.cfg.analysis, resolve=True),
        programs=OmegaConf.to_container(ctx.cfg.expression.programs, resolve=True),
    )


def load_run_data(ctx: StageContext):
    """The run's latent table, model and (optional) paired data, checked to fit together:
    rows and genes (:func:`vae.analysis.run.load_run`), and the paired data against the
    one stage=train recorded in the model's manifest (:func:`check_trained_input`)."""
    from vae.analysis.run import AnalysisError, load_run

    paired = ctx.input("paired") if ctx.has_input("paired") else None
    model = Path(ctx.input("model"))
    device = ctx.dist.device if ctx.dist is not None else "cpu"
    trained = trained_input(ctx, model) if paired is not None else None
    advice = retrain_advice(ctx, Path(paired), model, *trained) if trained is not None else None
    try:
        rd = load_run(ctx.input("latent"), model, paired, device, advice=advice)
    except AnalysisError as e:
        raise StageError(str(e)) from e
    if trained is not None:
        check_trained_input(Path(paired), model, *trained, advice=advice)
    return rd


def trained_input(ctx: StageContext, model: Path) -> tuple[Path, int] | None:
    """The paired data stage=train trained ``model`` on, as its manifest.json (beside
    model.pt) recorded it: where that input is now (:func:`recorded_input_path`: inside
    this experiment, here, so a moved experiment reads its own) and its size then. None
    where no train manifest beside the model says."""
    from pipeline.artifacts import in_experiment, read_manifest, recorded_input_path

    man = read_manifest(model.parent)
    rec = ((man or {}).get("inputs") or {}).get("paired")
    if not man or man.get("stage") != "train" or not isinstance(rec, dict):
        return None
    if not isinstance(rec.get("bytes"), int):
        return None
    here = ctx.run_dir if in_experiment(model, ctx.run_dir) is not None else None
    return recorded_input_path(rec, man, here), int(rec["bytes"])


def _is_size(path: Path, size: int) -> bool:
    """Whether ``path`` exists with ``size`` bytes (:func:`pipeline.artifacts.describe`)."""
    from pipeline.artifacts import describe

    return path.exists() and describe(path)["bytes"] == size


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def retrain_advice(ctx: StageContext, paired: Path, model: Path, used: Path, size: int) -> str:
    """What to do when ``paired`` is not the data ``model`` learned (``used``, ``size``
    bytes when stage=train read it): train again on it (the command, for this
    experiment's own model), or pass the file train used while it is still that file."""
    from pipeline.artifacts import describe
    from pipeline.runner import rerun_args, stage_dir
    from vae.analysis.run import RETRAIN

    if _is_size(used, size) and not _same_file(paired, used):
        return f"{RETRAIN} (paths.inputs.paired={used})"
    if model.parent == stage_dir(ctx.cfg, "train"):
        given = ctx.cfg.paths.inputs.get("paired")
        args = rerun_args(ctx.cfg, "train") + (f" paths.inputs.paired={given}" if given else "")
        again = f"`python -m pipeline {args} overwrite=true`"
    else:
        again = "stage=train"
    if _same_file(paired, used):
        why = f"train read it at {size} bytes, it is {describe(used)['bytes']} now"
    elif used.exists():
        why = f"the file train used, {used}, is {describe(used)['bytes']} bytes now, not {size}"
    else:
        why = f"the file train used, {used}, is gone"
    return f"re-run {again} on this paired.h5ad ({why})"


def check_trained_input(paired: Path, model: Path, used: Path, size: int, advice: str) -> None:
    """Refuse paired data other than the file stage=train trained ``model`` on.

    Compared by size, as the resume guard and ``resume=true``'s plan compare a stage's
    inputs (:func:`pipeline.guards.changed_inputs`): a copy of the file (same size) is
    that file. Another file of another size is other data, and the scores of a model on
    data it did not learn are wrong numbers: refused, with ``advice``
    (:func:`retrain_advice`). The file train read, of another size now (``stage=pair`` run
    again), has the model's genes and rows (:func:`vae.analysis.run.load_run` checked):
    the same pairing written again, or another draw; warned of, with ``advice``.

    Raises
    ------
    StageError
        Naming the paired file, the model and both sizes.
    """
    from pipeline.artifacts import describe

    if _is_size(paired, size):
        return
    now = describe(paired)["bytes"]
    wrong = "the model's scores on data it was not trained on would be wrong numbers"
    if _same_file(paired, used):
        # the file train read, written again (stage=pair re-run) with the same genes, rows
        # and cells (load_run checked those): the same pairing rewritten (a new metadata
        # key changed the size by 448 bytes, crops and genes identical) or another draw
        # of profiles; the size cannot tell which, and retraining costs hours, so said
        # loudly, not refused
        log.warning(
            "%s changed since stage=train trained %s on it (stage=pair run again?); its "
            "genes and rows are the model's, but if the pairing changed (other settings, "
            "another draw of profiles), %s: %s, or restore the paired.h5ad train used",
            paired,
            model,
            wrong,
            advice,
        )
        return
    raise StageError(
        f"{paired} ({now} bytes) is not the paired.h5ad stage=train trained {model} on "
        f"({used}, {size} bytes); {wrong}: {advice}"
    )


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


# analysis.* counts ranges.py leaves out (the study page's): the range each must be in
PAGE_COUNTS = ("analysis.page_max_cells", "analysis.page_nearest")


def validate_analysis(cfg) -> None:
    """The analysis settings stage=evaluate and stage=traverse read that the config alone
    can refuse (``stage=all`` checks them before its first stage, pipeline/precheck.py):
    ``analysis.split`` one of the splits stage=train writes or ``all`` (a typo was only
    refused once evaluate had loaded the run), and the study page's counts >= 0. The
    other numbers are in pipeline/ranges.py, checked when any run starts; the split's
    rows and the labels are checked against latent.h5ad where it exists (the precheck),
    else by the stage."""
    from pipeline.ranges import in_range
    from vae.data import SPLITS

    valid = (*SPLITS, "all")
    split = cfg.analysis.split
    if str(split) not in valid:
        raise StageError(
            f"analysis.split={split!r} is not an option: valid: {', '.join(valid)} "
            f"(the rows of latent.h5ad measured)"
        )
    for key in PAGE_COUNTS:
        v = OmegaConf.select(cfg, key, default=None)
        if v is not None and not in_range(v, ">=0"):
            raise StageError(f"{key}={v} is out of range: must be >= 0")


def tensorboard(ctx: StageContext):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(ctx.output("tb")))


@stage(
    "evaluate",
    needs=["latent", "model"],
    optional=["paired"],
    produces=["evaluation", "latent.h5ad"],
    validate=validate_analysis,
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
