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

import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline.artifacts import read_manifest, write_json
from pipeline.runner import StageContext, StageError, stage
from pipeline.stages.evaluate import (
    analysis_settings,
    load_run_data,
    tensorboard,
    validate_analysis,
)

log = logging.getLogger(__name__)

# sections of the settings that made the model: the report shows the train run's own
MODEL_SECTIONS = ("vae", "trainer", "pair", "expression")


def evaluation_of_other_model(evaluation: Path, model: Path) -> str | None:
    """Why ``evaluation`` (evaluate's ``metrics.json``) is not of ``model``, or None.

    ``stage=evaluate`` records the digest of the model it scored; a model trained again
    since (``resume=true``, ``overwrite=true``) has another. Files written before the
    digest was recorded are taken as they are.
    """
    from vae.checkpoint import checkpoint_digest

    try:
        want = json.loads(Path(evaluation).read_text()).get("model_digest")
    except (OSError, ValueError):
        return None  # the report's evaluation section names an unreadable file itself
    if want is None:
        return None
    got = checkpoint_digest(model)
    if str(want) == got:
        return None
    return (
        f"{evaluation} scores another model (digest {want}; {model} is now {got}: trained "
        f"again since stage=evaluate ran)"
    )


def training_note(model: Path, max_epochs: int | None = None) -> str:
    """ "; training stopped at its time limit after epoch 22 (of 80 asked): ..." when the
    train run beside ``model`` did not end by its own criteria ("" otherwise): every number
    of the report is of that model, and a user comparing with the README should know."""
    try:
        summ = json.loads((Path(model).parent / "train_summary.json").read_text())
    except (OSError, ValueError):
        return ""
    why = {
        "time_limit": "at its time limit (trainer.max_minutes)",
        "interrupted": "when it was interrupted",
    }.get(summ.get("stopped"))
    if why is None:
        return ""
    done = summ.get("epochs")
    if summ.get("stopped") == "time_limit" and max_epochs and done is not None:
        if int(done) >= int(max_epochs):  # a summary written before 2026-12-05 called a
            return ""  # run that finished its epochs and then met the cap "time_limit"
    of = f" of {max_epochs} asked" if max_epochs else ""
    return (
        f"; training stopped {why} after {summ.get('epochs')} epochs{of}: the numbers below "
        f"are of that unfinished model (resume=true continues it)"
    )


def model_settings(
    resolved: dict[str, Any], model: Path, data: Any = None
) -> tuple[dict[str, Any], list[str]]:
    """``resolved`` with the sections that made the model taken from its train run.

    A traverse run's own ``vae.beta`` (say) is not the model's when it was trained with an
    override this run did not repeat. Returns the settings to show and one line per
    setting that differs (``vae.beta: this run 1.0, the model 4.0``). ``data``: what the
    automatic settings resolve on (:func:`pipeline.guards.data_layout`): a model trained
    with ``vae.dropout=0.1`` and this run's ``null`` (auto: 0.1 where the data hold
    images) are the same, not a difference to warn of.
    """
    from pipeline.guards import resolved_setting

    trained = (read_manifest(model.parent) or {}).get("config") or {}
    shown, differ = dict(resolved), []
    for sec in MODEL_SECTIONS:
        if not isinstance(trained.get(sec), dict):
            continue
        mine = resolved.get(sec) or {}
        for k, v in trained[sec].items():
            key = f"{sec}.{k}"
            if k in mine and resolved_setting(key, mine[k], data) != resolved_setting(key, v, data):
                differ.append(f"{key}: this run {mine[k]!r}, the model {v!r}")
        shown[sec] = trained[sec]
    return shown, differ


def _layout(rd) -> Any:
    """The run's data as the automatic settings read it: the latent's rows (the paired
    rows the model was trained on) with their modality flags."""
    from pipeline.guards import data_layout

    has_counts = bool(rd.meta.get("has_counts", rd.data is not None and rd.data.counts is not None))
    return data_layout(rd.latent.obs, len(rd.gene_names), has_counts)


def _background(rd, cfg) -> float:
    """Pixel value (0-1) outside the decoded cells' masks: the paired data's own (stage=pair
    records it), else this run's ``pair.background_value``."""
    if rd.background_value is not None:
        return float(rd.background_value) / 255.0
    return float(cfg.pair.background_value) / 255.0 if "pair" in cfg else 0.0


def next_steps(report: Path, run_dir: Path) -> str:
    """What stage=traverse prints at the end: the report, and the TensorBoard command.

    The folder is shell-quoted: the command is copied into a shell, and a run folder
    with a space (``paths.root="my runs"``) split into two arguments.
    """
    return f"report: {report}\ntensorboard --logdir {shlex.quote(str(run_dir))}"


def validate_traverse(cfg) -> None:
    """:func:`validate_analysis`, and ``analysis.path_classes`` as a path can be drawn
    through: no blank name, and two or more classes or none (``[]``: the cells ordered by
    ``analysis.maturation_key``); one class drew no path, only a warning after the model
    was loaded. Whether the classes are labels of the data: pipeline/precheck.py where
    the labels exist before the run, else :func:`vae.analysis.study.path_order`."""
    validate_analysis(cfg)
    classes = list(cfg.analysis.path_classes or [])
    blank = [c for c in classes if not str(c).strip()]
    if blank:
        raise StageError(
            f"analysis.path_classes={[str(c) for c in classes]}: a blank class name; give "
            f"the labels the path runs through, earliest first"
        )
    if len({str(c) for c in classes}) == 1:
        raise StageError(
            f"analysis.path_classes={[str(c) for c in classes]}: a path runs through two "
            f"or more classes, earliest first (e.g. [myeloblast,segmented_neutrophil]); "
            f"[] orders the cells by analysis.maturation_key instead"
        )


@stage(
    "traverse",
    needs=["latent", "model"],
    optional=["paired", "evaluation", "crop_rejects"],
    produces=["report"],
    validate=validate_traverse,
)
def run_traverse(ctx: StageContext) -> None:
    from pipeline.simulator.morphology import azurophilic_density
    from vae.analysis.run import AnalysisError, Outputs
    from vae.analysis.study import traverse_study

    cfg = ctx.cfg
    settings = analysis_settings(ctx)
    rd = load_run_data(ctx)
    evaluation = ctx.input("evaluation") if ctx.has_input("evaluation") else None
    stale = evaluation_of_other_model(evaluation, ctx.input("model")) if evaluation else None
    if stale:
        log.warning(
            "%s: its tables are left out of the report; run stage=evaluate overwrite=true, "
            "then stage=traverse again",
            stale,
        )
    resolved, differ = model_settings(
        OmegaConf.to_container(cfg, resolve=True), Path(ctx.input("model")), _layout(rd)
    )
    if differ:
        log.warning(
            "the model was trained with other settings than this run's; the report shows "
            "the model's: %s",
            "; ".join(differ[:8]),
        )
    rejects = ctx.input("crop_rejects") if ctx.has_input("crop_rejects") else None
    trained_epochs = ((resolved.get("trainer") or {}).get("max_epochs")) or None
    note = training_note(Path(ctx.input("model")), trained_epochs)
    tb = tensorboard(ctx)
    try:
        summary = traverse_study(
            rd,
            settings,
            Outputs(ctx.dir, tb),
            report=ctx.output("report"),
            evaluation=evaluation,
            evaluation_stale=stale,
            crop_rejects=rejects,
            title=f"WBC beta-VAE study: {cfg.experiment}"
            + (f" / {cfg.variant}" if cfg.variant else ""),
            subtitle=f"run folder {ctx.run_dir}; model {ctx.input('model')} (epoch "
            f"{rd.meta.get('epoch')}){note}; written {time.strftime('%Y-%m-%d %H:%M')}",
            resolved_config=resolved,
            background=_background(rd, cfg),
            azurophilic_density=azurophilic_density,
            seed=int(cfg.seed),
        )
    except AnalysisError as e:
        raise StageError(str(e)) from e
    finally:
        tb.close()
    write_json(ctx.output("traverse_summary.json"), summary)
    print(next_steps(ctx.output("report"), ctx.run_dir))
