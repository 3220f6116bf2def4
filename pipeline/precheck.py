"""The check ``stage=all`` makes before its first stage starts (:func:`precheck`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import StageInputError, read_manifest
from pipeline.runner import (
    ARTIFACTS,
    REGISTRY,
    StageError,
    load_stages,
    resolve_input,
    stage_dir,
)


def precheck(
    cfg: DictConfig, names: list[str], plan: list[tuple[str, DictConfig]] | None = None
) -> list[tuple[str, Path]]:
    """Check every stage's settings and inputs before the first one starts.

    An input counts as available when an earlier stage of ``names`` produces it
    (unless ``paths.inputs.<name>`` points elsewhere). ``plan``: each stage's own
    config (:func:`pipeline.guards.stage_plan`; default ``cfg`` for all). Raises
    :class:`StageError` naming the stage and the missing input or bad setting; writes
    nothing.

    Returns
    -------
    list of (str, Path)
        The inputs read from outside the run (name, path): the runner holds their
        folders' shared locks for the whole run (pipeline/locks.py ``hold_for_run``).
    """
    from pipeline.guards import RESUMABLE
    from pipeline.stagedir import folder_status, rerun_without_asking

    load_stages()
    produced: set[str] = set()
    reads: list[tuple[str, Path]] = []
    own = dict(plan or [])
    top = cfg
    for name in names:
        cfg = own.get(name, top)
        spec = REGISTRY[name]
        try:
            if spec.validate is not None:
                spec.validate(cfg)
            for n in spec.needs_for(cfg):
                explicit = cfg.paths.inputs.get(n) if n in cfg.paths.inputs else None
                if n in produced and not explicit:
                    continue
                reads.append((n, resolve_input(cfg, n)))
            d = stage_dir(cfg, name)
            # the runner's rule (pipeline/stagedir.py): other variants' runs nested in
            # the folder are not its run, and a failed run of a stage without
            # checkpoints is moved aside, not refused
            status = folder_status(d)
            if (
                status is not None
                and not (cfg.overwrite or cfg.resume)
                and not rerun_without_asking(name, status, d)
            ):
                raise StageError(
                    f"{d} already holds a run of stage={name} (status: {status}); pass "
                    f"overwrite=true, resume=true or another experiment=NAME"
                )
            man = read_manifest(d) if d.exists() else None
            if cfg.resume and not cfg.overwrite and name not in RESUMABLE and man:
                if man.get("status") == "complete":
                    raise StageError(
                        f"{d} holds a complete run of stage={name}, which keeps no "
                        f"checkpoint to resume; pass overwrite=true"
                    )
        except (StageError, StageInputError) as e:
            raise StageError(
                f"stage={top.stage.name}: stage={name} cannot run: {e} "
                f"(checked before any stage started; nothing was run)"
            ) from e
        produced |= {a for a, (producer, _) in ARTIFACTS.items() if producer == name}
    return reads
