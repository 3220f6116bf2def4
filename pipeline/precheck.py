"""The check ``stage=all`` makes before its first stage starts (:func:`precheck`)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig

from pipeline.artifacts import StageInputError, read_manifest
from pipeline.runner import (
    ARTIFACTS,
    REGISTRY,
    StageError,
    load_stages,
    resolve_input,
    setting_path,
    stage_dir,
)


def precheck(
    cfg: DictConfig, names: list[str], plan: list[tuple[str, DictConfig]] | None = None
) -> list[tuple[str, Path]]:
    """Check every stage's settings and inputs before the first one starts.

    An input counts as available when an earlier stage of ``names`` produces it
    (unless ``paths.inputs.<name>`` points elsewhere). ``plan``: each stage's own
    config (:func:`pipeline.guards.stage_plan`; default ``cfg`` for all). Each stage's
    ``validate`` hook runs; the inputs read from outside the run are probed
    (:func:`pipeline.guards.probe_inputs`, headers only: a text file given as a
    checkpoint); the settings that name labels, columns or splits of data that exist
    before the run are checked against it (:func:`check_data`). Raises
    :class:`StageError` naming the stage and the missing input or bad setting; writes
    nothing.

    Returns
    -------
    list of (str, Path)
        The inputs read from outside the run (name, path): the runner holds their
        folders' shared locks for the whole run (pipeline/locks.py ``hold_for_run``).
    """
    from pipeline.guards import RESUMABLE, probe_inputs
    from pipeline.stagedir import folder_status, rerun_without_asking

    load_stages()
    produced: set[str] = set()
    written: list[Path] = []  # the folders of the stages before this one
    reads: list[tuple[str, Path]] = []
    own = dict(plan or [])
    top = cfg
    tables = _Tables()
    for name in names:
        cfg = own.get(name, top)
        spec = REGISTRY[name]
        try:
            if spec.validate is not None:
                spec.validate(cfg)
            mine: dict[str, Path] = {}
            for n in spec.needs_for(cfg):
                explicit = cfg.paths.inputs.get(n) if n in cfg.paths.inputs else None
                if n in produced and not explicit:
                    continue
                p = resolve_input(cfg, n)
                reads.append((n, p))
                if not _inside(p, written):  # a file an earlier stage makes again: not yet
                    mine[n] = p
            # a given checkpoint that is a text file, an .h5ad that is not HDF5: before the
            # stages ahead of it run, not when its stage starts (headers only: cheap)
            probe_inputs(mine, cheap=True)
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
            check_data(cfg, name, _Sources(cfg, produced, written), tables)
        except (StageError, StageInputError) as e:
            raise StageError(
                f"stage={top.stage.name}: stage={name} cannot run: {e} "
                f"(checked before any stage started; nothing was run)"
            ) from e
        produced |= {a for a, (producer, _) in ARTIFACTS.items() if producer == name}
        written.append(stage_dir(cfg, name))
    return reads


def _inside(p: Path, folders: list[Path]) -> bool:
    """Whether ``p`` lies in one of ``folders`` (a stage folder this run writes first)."""
    q = Path(p).absolute()
    return any(q == f.absolute() or f.absolute() in q.parents for f in folders)


class _Sources:
    """The inputs of one stage of the chain as they are before it starts: an artifact
    no earlier stage of the run makes again (or a ``paths.inputs`` file outside their
    folders) that exists now."""

    def __init__(self, cfg: DictConfig, produced: set[str], written: list[Path]):
        self.cfg, self.produced, self.written = cfg, set(produced), list(written)

    def remade(self, n: str) -> bool:
        """Whether an earlier stage of this run writes input ``n`` again."""
        explicit = self.cfg.paths.inputs.get(n) if n in self.cfg.paths.inputs else None
        if not explicit:
            return n in self.produced
        return _inside(setting_path(explicit), self.written)

    def get(self, n: str) -> Path | None:
        """Input ``n`` as it will be read, or None: made again first, or not there."""
        if self.remade(n):
            return None
        try:
            p = resolve_input(self.cfg, n)
        except (StageError, StageInputError):
            return None  # missing or unfinished: the stage (or the check above) says so
        return p if p.is_file() and p.suffix == ".h5ad" else None


class _Tables:
    """The obs columns (and ``uns["maturation_axis"]``) of .h5ad files, read once and
    column by column: no X, no crops, no other column."""

    def __init__(self) -> None:
        self._seen: dict[tuple[Path, tuple[str, ...]], Any] = {}

    def read(self, path: Path, want: tuple[str, ...]) -> Any:
        """``SimpleNamespace(columns, obs, n_obs, axis)``: every obs column's name, the
        ``want`` columns there are (as the stages read them: a missing string is ``""``),
        the row count and the maturation axis a train run recorded (None without one);
        None when the file cannot be read so (the stage reading it says why)."""
        key = (Path(path), tuple(want))
        if key not in self._seen:
            self._seen[key] = _read_obs(Path(path), want)
        return self._seen[key]


def _read_obs(path: Path, want: tuple[str, ...]) -> Any:
    try:
        import h5py
        import pandas as pd
        from anndata.io import read_elem

        from segmentation.io import blank_as_read

        with h5py.File(path, "r") as f:
            group = f["obs"]
            if not isinstance(group, h5py.Group):
                return None  # an old layout: left to the stage
            order = group.attrs.get("column-order", [])
            columns = [c.decode() if isinstance(c, bytes) else str(c) for c in order]
            n = len(group[group.attrs.get("_index", "_index")])
            obs = pd.DataFrame(
                {c: read_elem(group[c]) for c in want if c in columns},
                index=pd.RangeIndex(n),
            )
            uns = f.get("uns")
            axis = None
            if isinstance(uns, h5py.Group) and "maturation_axis" in uns:
                axis = read_elem(uns["maturation_axis"])
    except Exception:  # noqa: BLE001 - unreadable here: the stage names the fault itself
        return None
    return SimpleNamespace(columns=columns, obs=blank_as_read(obs), n_obs=n, axis=axis)


def check_data(cfg: DictConfig, name: str, sources: _Sources, tables: _Tables) -> None:
    """The settings of stage ``name`` that name labels, columns or splits of its data,
    checked against that data where it exists before the run and no earlier stage of
    the run writes it again (else nothing can be known yet: the stage checks them).

    - train: ``trainer.split_by`` is a column of paired.h5ad's obs (``specimen``, the
      default, may be absent: rows are split one by one); ``vae.maturation_classes``
      against its labels (:func:`pipeline.train_args.maturation_axis`: a near miss of a
      label is refused), where the maturation head is on.
    - evaluate, traverse: ``analysis.split`` has rows and ``analysis.label_key`` is a
      column of latent.h5ad (:func:`vae.analysis.run.split_rows`,
      :func:`~vae.analysis.run.labels_of`); traverse: ``analysis.path_classes`` against
      its labels (:func:`vae.analysis.study.path_order`), or against paired.h5ad's where
      stage=train makes latent.h5ad again from it (whose labels it copies).

    Raises
    ------
    StageError
        The message the stage itself would give, naming the setting and the file.
    """
    if name == "train":
        _check_paired_for_train(cfg, sources, tables)
    elif name in ("evaluate", "traverse"):
        _check_latent(cfg, name, sources, tables)


def _check_paired_for_train(cfg: DictConfig, sources: _Sources, tables: _Tables) -> None:
    from pipeline.guards import _label_names
    from pipeline.train_args import maturation_axis

    paired = sources.get("paired")
    table = tables.read(paired, ("label",)) if paired is not None else None
    if table is None:
        return
    column = cfg.trainer.get("split_by")
    if column and column != "specimen" and str(column) not in table.columns:
        shown = ", ".join(table.columns[:40]) + (", ..." if len(table.columns) > 40 else "")
        raise StageError(
            f"trainer.split_by={column!r}: {paired} has no such obs column (columns: "
            f"{shown}); name one, or trainer.split_by=null to split row by row"
        )
    if float(cfg.vae.get("maturation_weight") or 0) > 0:
        labels = _label_names(table.obs)
        if labels is not None:
            maturation_axis(list(cfg.vae.maturation_classes), labels, say=False)


def _check_latent(cfg: DictConfig, name: str, sources: _Sources, tables: _Tables) -> None:
    from vae.analysis.run import AnalysisError, labels_of, split_rows
    from vae.analysis.study import path_order
    from vae.inputs.schema import MATURATION_ORDER

    a = cfg.analysis
    key = str(a.label_key)
    classes = [str(c) for c in (a.path_classes or [])] if name == "traverse" else []
    latent = sources.get("latent")
    try:
        if latent is not None:
            table = tables.read(latent, (key, "split"))
            if table is None:
                return
            split_rows(table, str(a.split))
            labels = labels_of(table, key)
            if classes:
                _quiet(path_order, classes, labels, table.axis)
            return
        # latent.h5ad made again by stage=train of this run: its rows and labels are
        # paired.h5ad's (the axis it will record is not known: the default list, which
        # would follow it, is left to the stage)
        paired = sources.get("paired") if sources.remade("latent") else None
        if not classes or classes == list(MATURATION_ORDER) or paired is None:
            return
        table = tables.read(paired, (key,))
        if table is None or key not in table.columns:
            return
        _quiet(path_order, classes, labels_of(table, key), None)
    except AnalysisError as e:
        raise StageError(str(e)) from None


def _quiet(fn, *args) -> Any:
    """``fn(*args)`` without its INFO / WARNING lines: the stage says them when it runs."""
    logger = logging.getLogger("vae.analysis.study")
    was = logger.disabled
    logger.disabled = True
    try:
        return fn(*args)
    finally:
        logger.disabled = was
