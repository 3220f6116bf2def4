"""``stage=simulate``: synthetic smears + paired expression (see docs/simulator.md).

Reads ``data.simulator``; writes ``smears/`` (PNG + COCO ``annotations.json``),
``expression_raw.h5ad`` and ``cells_truth.csv`` into the stage folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import MANIFEST
from pipeline.runner import StageContext, StageError, stage
from pipeline.simulator import SimulatorParams, SimulatorSettingError, write_dataset

log = logging.getLogger(__name__)


def simulator_seed(cfg: DictConfig) -> int:
    """The seed stage=simulate draws with: ``data.simulator.seed``, or when it is null
    (the default) the top-level ``seed``. Every reader of the simulator's seed (e.g.
    stage=evaluate's noise-free truth) asks here."""
    seed = cfg.data.simulator.get("seed")
    return int(cfg.get("seed") or 0) if seed is None else int(seed)


def simulated_seed(run_dir: Path, cfg: DictConfig) -> int:
    """The seed the experiment's data were simulated with: its ``simulate/manifest.json``
    says (``simulator_seed``; a manifest from before 2026-12-05: its config's
    ``data.simulator.seed``, which then was always the seed used), else
    :func:`simulator_seed` of ``cfg``. A later stage run with another top-level ``seed``
    (a training seed) must not rebuild another seed's gene panel (review: stage=evaluate
    seed=S on data simulated at 0 built the seed-S panel, its profiles 0.74 alike)."""
    man = Path(run_dir) / "simulate" / MANIFEST
    try:
        data = json.loads(man.read_text())
    except (OSError, ValueError):
        return simulator_seed(cfg)
    if data.get("simulator_seed") is not None:
        return int(data["simulator_seed"])
    old = ((data.get("config") or {}).get("data") or {}).get("simulator") or {}
    return int(old["seed"]) if old.get("seed") is not None else simulator_seed(cfg)


def simulator_params(cfg: DictConfig) -> SimulatorParams:
    """Typed, validated simulator settings from ``cfg.data.simulator``; its ``seed``
    null (the default) takes the top-level ``seed``.

    Raises
    ------
    StageError
        Naming the bad setting, e.g. ``data.simulator.n_images=-1 must be >= 0``.
    """
    raw = OmegaConf.to_container(cfg.data.simulator, resolve=True)
    raw["seed"] = simulator_seed(cfg)  # null (the default): the top-level seed
    try:
        params = SimulatorParams.from_mapping(raw)
        params.validate()
    except SimulatorSettingError as e:
        raise StageError(f"data.simulator.{e}") from e
    return params


@stage("simulate", validate=simulator_params, produces=["smears", "expression_raw"])
def simulate(ctx: StageContext) -> None:
    from segmentation.progress import bar

    params = simulator_params(ctx.cfg)
    ctx.record["simulator_seed"] = params.seed  # the seed used (null in config: top-level)
    if not ctx.is_main:
        return
    log.info(
        "simulating %d images of %dx%d px (seed %d%s)",
        params.n_images,
        params.image_size[1],
        params.image_size[0],
        params.seed,
        "" if ctx.cfg.data.simulator.get("seed") is not None else ", the top-level seed",
    )
    with (
        ctx.atomic("smears") as smears,
        ctx.atomic("expression_raw") as expr,
        ctx.atomic("cells_truth.csv") as table,
    ):
        summary = write_dataset(
            params,
            smears,
            expr,
            table,
            progress=lambda it: bar(it, desc="simulate", unit="img"),
        )
    log.info(
        "wrote %d images, %d white cells x %d genes; kinds: %s",
        summary.n_images,
        summary.n_cells,
        summary.n_genes,
        summary.kind_counts,
    )
    if summary.n_unplaced:
        log.warning(
            "%d white cells found no free spot and were left out; lower "
            "data.simulator.wbc_per_image or raise data.simulator.image_size",
            summary.n_unplaced,
        )
