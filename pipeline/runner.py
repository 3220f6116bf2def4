"""Stage registry, run directory and the runner behind ``python -m pipeline``.

The stages themselves live in ``pipeline/stages/<stage>.py``, one file per
``stage=NAME``; importing one registers it here.

A stage is a function ``fn(ctx: StageContext) -> None`` registered with
:func:`stage`. It reads its inputs through ``ctx.input(name)`` (resolved
before it starts, so a missing input fails at once and names the stage that
produces it) and writes its outputs with ``ctx.atomic(name)`` into its own
folder ``outputs/<experiment>/<stage>[/<variant>]/``.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import (
    Manifest,
    StageInputError,
    atomic_path,
    check_fresh,
    read_manifest,
    shipped_default,
)
from pipeline.names import BadNameError, check_run_name

log = logging.getLogger(__name__)

# Stage order of `stage=all`. `simulate` runs only with data=synthetic, and only when a
# later stage of the run reads its outputs (simulate_readers).
ORDER = [
    "simulate",
    "segment_train",
    "segment",
    "expression",
    "pair",
    "train",
    "evaluate",
    "traverse",
]

# stages that `stage=all` does not run: they read a finished study
EXTRA_STAGES = ["embed"]

# artifact name -> (producing stage, path inside that stage's folder)
ARTIFACTS: dict[str, tuple[str, str]] = {
    "smears": ("simulate", "smears"),
    "annotations": ("simulate", "smears/annotations.json"),
    "expression_raw": ("simulate", "expression_raw.h5ad"),
    "segmentation_model": ("segment_train", "model.pt"),
    "cells": ("segment", "cells.h5ad"),
    "crop_rejects": ("segment", "rejects.png"),
    "expression": ("expression", "expression.h5ad"),
    "paired": ("pair", "paired.h5ad"),
    "model": ("train", "model.pt"),
    "latent": ("train", "latent.h5ad"),
    "evaluation": ("evaluate", "metrics.json"),
    "report": ("traverse", "report.html"),
    "query": ("embed", "query.h5ad"),
}

# modules that register stages when imported: pipeline/stages/<stage>.py
STAGE_MODULES = [f"pipeline.stages.{name}" for name in [*ORDER, *EXTRA_STAGES]]


class StageError(RuntimeError):
    """A stage cannot run as configured (bad setting, existing outputs...)."""


Needs = list[str] | Callable[[DictConfig], list[str]]


@dataclass
class StageSpec:
    name: str
    fn: Callable[[StageContext], None]
    needs: Needs = field(default_factory=list)
    optional: Needs = field(default_factory=list)
    produces: list[str] = field(default_factory=list)
    distributed: bool = False  # run once per DDP rank through pipeline.hardware
    # checks the settings before any folder is created; raises StageError
    validate: Callable[[DictConfig], None] | None = None
    # folders the stage reads that are not artifacts of its experiment (stage=embed's
    # embed.study): {what: path}, read-locked for the whole stage as inputs are
    reads: Callable[[DictConfig], dict[str, Path]] | None = None

    def needs_for(self, cfg: DictConfig) -> list[str]:
        return list(self.needs(cfg) if callable(self.needs) else self.needs)

    def optional_for(self, cfg: DictConfig) -> list[str]:
        return list(self.optional(cfg) if callable(self.optional) else self.optional)


REGISTRY: dict[str, StageSpec] = {}
# each stage as its module registered it: what it reads (:func:`simulate_readers`) is a
# property of the pipeline's own stages, also while a test runs a stand-in in REGISTRY
DECLARED: dict[str, StageSpec] = {}


def stage(
    name: str,
    *,
    needs: Needs = (),
    optional: Needs = (),
    produces: list[str] = (),
    distributed: bool = False,
    validate: Callable[[DictConfig], None] | None = None,
    reads: Callable[[DictConfig], dict[str, Path]] | None = None,
) -> Callable[[Callable[[StageContext], None]], Callable[[StageContext], None]]:
    """Register ``fn`` as the implementation of stage ``name``."""
    if name not in ORDER + EXTRA_STAGES:
        raise ValueError(f"unknown stage {name!r}; valid: {', '.join(ORDER + EXTRA_STAGES)}")

    def deco(fn: Callable[[StageContext], None]) -> Callable[[StageContext], None]:
        REGISTRY[name] = DECLARED[name] = StageSpec(
            name=name,
            fn=fn,
            needs=needs if callable(needs) else list(needs),
            optional=optional if callable(optional) else list(optional),
            produces=list(produces),
            distributed=distributed,
            validate=validate,
            reads=reads,
        )
        return fn

    return deco


def load_stages() -> None:
    for mod in STAGE_MODULES:
        importlib.import_module(mod)


def setting_path(value: Any) -> Path:
    """The path a setting names, ``~`` expanded (``paths.root='~/outs'`` made a folder
    named ``~`` in the working directory); a relative one stays relative to it."""
    return Path(str(value)).expanduser()


# path settings whose ``~`` expand_user_paths expands: every stage reads them from the
# config, so expanding them once there covers each place that makes a Path of them
_PATH_SETTINGS = (
    "paths.root",
    "paths.shared_data",
    "data.expression_file",
    "expression.input_file",
    "segmentation.pretrained_weights",
    "pair.label_corrections",
    "embed.study",
    "embed.smears",
    "embed.crops",
    "embed.h5ad",
    "embed.expression",
    "embed.samples_csv",
    "embed.labelled_crops",
)


def path_settings(cfg: DictConfig) -> list[str]:
    """The dotted keys of ``cfg``'s settings that name a file or folder."""
    keys = list(_PATH_SETTINGS)
    inputs = OmegaConf.select(cfg, "paths.inputs", default=None)
    if inputs is not None:
        keys += [f"paths.inputs.{k}" for k in inputs]
    for group, fields in (
        ("data.smear_sources", ("path", "image_root")),
        ("pair.crop_sources", ("path",)),
    ):
        for k in range(len(OmegaConf.select(cfg, group, default=None) or [])):
            keys += [f"{group}.{k}.{f}" for f in fields]
    return keys


def expand_user_paths(cfg: DictConfig) -> None:
    """Expand a leading ``~`` of the path settings in place (``paths.*``, ``embed.*``,
    the data files and ``paths.inputs.*``), so that every stage sees the home folder."""
    for key in path_settings(cfg):
        # an interpolation that fails is reported by the stage that reads it (one line),
        # not here as a traceback
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if isinstance(value, str) and value.startswith("~"):
            OmegaConf.update(cfg, key, str(setting_path(value)), force_add=False)


def resolve_data_path(cfg: DictConfig, p: str, setting: str) -> Path:
    """A path as given when it exists, else relative to ``paths.shared_data``."""
    path = setting_path(p)
    if path.exists():
        return path
    if not path.is_absolute():
        alt = setting_path(cfg.paths.shared_data) / path
        if alt.exists():
            return alt
    raise StageError(
        f"{setting}={p}: no such file or folder (also tried under "
        f"paths.shared_data={cfg.paths.shared_data})"
    )


# ----------------------------------------------------------------------------
# run directory
# ----------------------------------------------------------------------------


def run_dir(cfg: DictConfig) -> Path:
    """``<paths.root>/<experiment>``; a name that would leave ``paths.root`` is refused."""
    try:
        return setting_path(cfg.paths.root) / check_run_name(cfg.experiment, "experiment")
    except BadNameError as e:
        raise StageError(str(e)) from None


def stage_dir(cfg: DictConfig, name: str) -> Path:
    d = run_dir(cfg) / name
    try:
        variant = check_run_name(cfg.variant, "variant", allow_empty=True)
    except BadNameError as e:
        raise StageError(str(e)) from None
    return d / variant if variant else d


def resolve_input(cfg: DictConfig, name: str) -> Path:
    """Path of artifact ``name``: an explicit ``paths.inputs.<name>``, the run dir, or the
    file shipped with the package (``segmentation_model`` only: the real-data detector).

    Raises
    ------
    StageInputError
        If the artifact does not exist, its producing stage did not finish, or
        it changed since that stage recorded it. The message says which stage
        produces it and which setting overrides it.
    """
    explicit = cfg.paths.inputs.get(name) if name in cfg.paths.inputs else None
    if explicit:
        p = setting_path(explicit)
        if not p.exists():
            raise StageInputError(f"paths.inputs.{name}={explicit}: no such file or folder")
        return p
    producer, rel = ARTIFACTS[name]
    candidates = []
    if cfg.variant:
        candidates.append(run_dir(cfg) / producer / cfg.variant)
    candidates.append(run_dir(cfg) / producer)
    for d in candidates:
        p = d / rel
        if p.exists():
            man = read_manifest(d)
            if man is not None and man.get("status") != "complete":
                busy = _being_written(cfg, producer, d, name, p)
                if busy:
                    raise StageInputError(busy)
                raise StageInputError(unfinished_input(cfg, producer, d, p, man))
            if man is not None:
                check_fresh(p, man, name)
            shipped = _instead_of_simulated_detector(cfg, name, p, man)
            return p if shipped is None else shipped
    for d in candidates:  # moved aside by a running overwrite=true, or not made yet
        busy = _being_written(cfg, producer, d, name, d / rel)
        if busy:
            raise StageInputError(busy)
    shipped, broken = shipped_default(name)
    if shipped is not None:
        return shipped
    raise StageInputError(
        f"missing input '{name}': expected {candidates[-1] / rel}, which stage={producer} "
        f"writes. Run `python -m pipeline {rerun_args(cfg, producer)}` "
        f"first, or set paths.inputs.{name}=PATH.{broken}"
    )


def _instead_of_simulated_detector(
    cfg: DictConfig, name: str, p: Path, man: dict | None
) -> Path | None:
    """The shipped real-data detector where the experiment's ``segment_train/model.pt``
    (``p``) was trained on simulated smears (its manifest's ``data.name``) and this run
    segments the user's own images (``data.segment_sources`` under ``data=synthetic``):
    left by ``make demo`` in the default experiment, or by a run before stage=all left
    segment_train out for such images, it cut real crops with a detector that never saw
    one (review). Warned of, naming the file and how to use it anyway; else None."""
    # (a model given as paths.inputs.segmentation_model never reaches here: resolve_input
    # returns it first)
    if name != "segmentation_model" or not detector_given(cfg) or man is None:
        return None
    trained_on = (man.get("config") or {}).get("data", {}).get("name")
    if trained_on != "synthetic":
        return None
    shipped, _ = shipped_default(name)
    if shipped is None:
        return None
    log.warning(
        "segmentation_model: %s was trained on simulated smears (data=synthetic) and this "
        "run segments your own images (data.segment_sources): the real-data detector "
        "shipped with the package is used instead (%s); to use that model anyway, "
        "paths.inputs.segmentation_model=%s",
        p,
        shipped,
        p,
    )
    return shipped


def unfinished_input(cfg: DictConfig, producer: str, d: Path, p: Path, man: dict) -> str:
    """The message for input ``p`` found in stage folder ``d`` whose run did not finish
    (manifest ``man``), with the re-run that keeps what can be kept.

    A killed ``overwrite=true`` or ``resume=true`` run left the complete result it was
    replacing or continuing as a backup ``.<stage>.old-*``: "re-run with overwrite=true"
    would have replaced it (an audit), while a plain run of the stage puts it back.
    """
    from pipeline.guards import RESUMABLE
    from pipeline.stagedir import complete_backup, run_kind

    status = man.get("status")
    again = f"python -m pipeline {rerun_args(cfg, producer)}"
    head = f"{p} comes from an unfinished run of stage={producer} (status: {status})"
    backup = complete_backup(d)
    resumable = producer in RESUMABLE and (d / RESUMABLE[producer]).exists()
    if backup is not None:
        kind = run_kind(d) or "overwrite=true or resume=true"
        cont = (
            f"`{again} resume=true` finishes the interrupted run instead (the complete "
            f"result is kept until it succeeds)"
            if resumable
            else f"`{again} overwrite=true` runs it again (the complete result is kept until "
            f"it succeeds)"
        )
        return (
            f"{head}: an interrupted {kind} run, and the complete result it started from is "
            f"kept in {backup}. Run `{again}` to put that result back (it restores the "
            f"result and stops there, running nothing), or {cont}."
        )
    if resumable:
        return (
            f"{head}. Run `{again} resume=true` to finish it from its {RESUMABLE[producer]}, "
            f"or `{again} overwrite=true` to start it over."
        )
    return f"{head}. Re-run `{again} overwrite=true`."


# command-line overrides that are not a choice of configs: the rerun advice sets its own
RUN_KEYS = frozenset({"stage", "experiment", "variant", "overwrite", "resume"})


def rerun_args(
    cfg: DictConfig, stage_name: str, overrides: list[str] | None = None, settings: bool = False
) -> str:
    """``stage=... experiment=...`` plus the run's own presets and config-group choices
    (``+preset=real``, ``data=real_small``: a docs audit followed the advice without
    ``+preset=real`` and would have trained the simulator's defaults), ``paths.root`` and
    ``variant`` when they are not the defaults: the suggested command writes where this
    run reads (the terminal audit: with paths.root=/data/runs the advice wrote into
    ./outputs). ``overrides``: the command line's (default: this Hydra run's).
    ``settings``: its dotted settings too (``vae.beta=4``), shell-quoted where needed:
    the advice to run *this* command again (after a Ctrl-C, "overwrite=true starts the
    new run over" named a command without the run's vae.beta=4: review)."""
    import shlex

    from pipeline.artifacts import command_overrides
    from pipeline.config import PathsConfig

    args = [f"stage={stage_name}", f"experiment={cfg.experiment}"]
    for o in (command_overrides() or []) if overrides is None else overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" in o and "." not in key and key not in RUN_KEYS:
            args.append(o)  # a group choice (or a preset) shapes what the stage runs
        elif settings and "=" in o and "." in key and not key.startswith(("paths.root", "hydra.")):
            args.append(shlex.quote(o))
    root = cfg.paths.get("root")
    if root is not None and str(root) != PathsConfig.root:
        args.append(hydra_word("paths.root", root))
    if cfg.get("variant"):
        args.append(hydra_word("variant", cfg.variant))
    return " ".join(args)


def hydra_word(key: str, value: object) -> str:
    """``key=value`` as one shell word that Hydra reads back as the string ``value``.

    A sweep job's variant (``vae.beta=4``, ``hardware.torch_threads=2,vae.beta=4``) and a
    root with spaces were written bare, and Hydra refused the advised command
    (``mismatched input '='``): such values are quoted for Hydra inside the shell's
    quotes (README "Paths with spaces, brackets or accents").

    >>> print(hydra_word("variant", "vae.beta=4"))
    "variant='vae.beta=4'"
    >>> print(hydra_word("paths.root", "/data/runs"))
    paths.root=/data/runs
    """
    import shlex

    v = str(value)
    if re.fullmatch(r"~?[\w@%+:./-]+", v):
        return f"{key}={v}"
    if "'" in v:  # Hydra's double quotes, the shell's single ones
        return shlex.quote(f'{key}="{v}"')
    inner = f"{key}='{v}'"
    return shlex.quote(inner) if re.search(r'["$`\\!]', inner) else f'"{inner}"'


def _being_written(cfg: DictConfig, producer: str, d: Path, name: str, p: Path) -> str:
    """The message for input ``name`` (``p`` in stage folder ``d``) when another process
    writes that folder now, else ''.

    An input missing or unfinished because its stage runs now (``overwrite=true`` moves
    the folder aside; ``resume=true`` marks it running) was reported as "missing input
    ... Run stage=train first" or "Re-run ... overwrite=true": advice that starts a
    second writer (found by a concurrency audit).
    """
    from pipeline.locks import describe, stage_lock

    top = run_dir(cfg) / producer
    variant = "/".join(d.relative_to(top).parts) if d != top else ""
    lock = stage_lock(run_dir(cfg), producer, variant, cfg.experiment)
    holder = lock.writer_elsewhere()
    if holder is None:
        return ""
    return (
        f"input '{name}' ({p}) is not ready: {lock.label} is running now "
        f"({describe(holder)}); wait for it to finish, or set paths.inputs.{name}=PATH"
    )


@dataclass
class StageContext:
    """What a stage function gets: config, its folder, inputs and the devices."""

    cfg: DictConfig
    name: str
    dir: Path
    inputs: dict[str, Path]
    dist: Any = None  # pipeline.hardware.DistInfo, set by the runner
    # what the stage states in its manifest.json beside the config (e.g. stage=simulate's
    # ``simulator_seed``: the seed it used when data.simulator.seed is null)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def run_dir(self) -> Path:
        return run_dir(self.cfg)

    def input(self, name: str) -> Path:
        if name not in self.inputs:
            self.inputs[name] = resolve_input(self.cfg, name)
        return self.inputs[name]

    def has_input(self, name: str) -> bool:
        """Whether optional input ``name`` can be read. One that exists but cannot be
        used (its stage did not finish, or it changed since) is said in the log: it
        was taken for "not run" without a word (an audit's killed evaluate)."""
        try:
            self.input(name)
        except StageInputError as e:
            if not str(e).startswith("missing input"):
                log.warning("optional input '%s' is not used: %s", name, e)
            return False
        return True

    def output(self, name: str) -> Path:
        """Final path of an artifact this stage produces (or any file name)."""
        if name in ARTIFACTS and ARTIFACTS[name][0] == self.name:
            return self.dir / ARTIFACTS[name][1]
        return self.dir / name

    @contextmanager
    def atomic(self, name: str) -> Iterator[Path]:
        """Temporary path for output ``name``, renamed into place on success."""
        with atomic_path(self.output(name)) as tmp:
            yield tmp


# ----------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------


# what stage=simulate writes: the artifacts a later stage may read
SIMULATED = [a for a, (producer, _) in ARTIFACTS.items() if producer == "simulate"]


def simulate_readers(cfg: DictConfig, names: list[str]) -> dict[str, list[str]]:
    """The stages of ``names`` that read stage=simulate's outputs under ``cfg``, each with
    the artifacts it reads from there (``{"segment_train": ["smears"]}``).

    From each stage's declared inputs (``needs`` and ``optional`` of its registration,
    which follow the settings: ``expression.input_file`` leaves stage=expression no
    ``expression_raw``, a ``pair.crop_sources`` folder no smears); an artifact given as
    ``paths.inputs.<name>`` is read from there, not from the simulator's folder.
    """
    if any(n not in DECLARED for n in names):
        load_stages()
    readers: dict[str, list[str]] = {}
    for name in names:
        if name == "simulate":
            continue
        spec = DECLARED[name]
        wanted = [*spec.needs_for(cfg), *spec.optional_for(cfg)]
        own = [
            a
            for a in SIMULATED
            if a in wanted and not (a in cfg.paths.inputs and cfg.paths.inputs.get(a))
        ]
        if own:
            readers[name] = own
    return readers


def simulate_note(cfg: DictConfig, chain: list[str], names: list[str]) -> str | None:
    """Why a ``stage=all`` with ``data=synthetic`` (the default) runs stage=simulate or
    leaves it out (``chain``: :func:`stages_for`; ``names``: the stages that run)."""
    if cfg.stage.name != "all" or cfg.data.name != "synthetic":
        return None
    if "simulate" not in chain:
        return (
            f"stage={cfg.stage.name}: simulate left out: no stage of this run reads the "
            f"simulated smears or expression (its inputs are the run's own: "
            f"expression.input_file, pair.crop_sources, paths.inputs.*)"
        )
    if "simulate" not in names:
        return None
    readers = simulate_readers(cfg, chain)
    used = ", ".join(f"{s} ({', '.join(a)})" for s, a in readers.items())
    return (
        f"stage={cfg.stage.name}: simulate runs (data=synthetic): read by {used}; give these "
        f"stages inputs of your own (expression.input_file, pair.crop_sources folders, "
        f"paths.inputs.*) and it is left out"
    )


def detector_given(cfg: DictConfig) -> str | None:
    """Why ``stage=all`` trains no detector though stage=segment runs, else None: a model
    given (``paths.inputs.segmentation_model``), or the user's own real images
    (``data.segment_sources``) with ``data=synthetic``, whose ``segment_train`` would
    train on simulated smears; stage=segment then uses the given model or the real-data
    detector shipped with the package (pipeline.artifacts)."""
    if cfg.paths.inputs.get("segmentation_model"):
        return "paths.inputs.segmentation_model is given"
    if cfg.data.name == "synthetic" and cfg.data.segment_sources:
        return (
            "data.segment_sources lists real images and data=synthetic would train the "
            "detector on simulated smears: stage=segment uses the real-data detector shipped "
            "with the package"
        )
    return None


def stages_for(cfg: DictConfig) -> list[str]:
    """The stages ``cfg`` runs: ``stage=all``'s those of :data:`ORDER` that its settings
    use (no detector without a ``cells`` crop source, none trained where one is given or
    the images are the user's own (:func:`detector_given`), no ``expression`` for
    ``pair.mode=image_only``, no ``simulate`` unless ``data=synthetic`` and a stage of the
    run reads its outputs), else the one stage named."""
    name = cfg.stage.name
    if name == "all":
        seq = list(ORDER)
        if cfg.data.name != "synthetic":
            seq.remove("simulate")
        if not any(s.kind == "cells" for s in cfg.pair.crop_sources):
            # no crop source reads cells.h5ad (e.g. pair=expression_only): no detector
            seq.remove("segment_train")
            seq.remove("segment")
        elif detector_given(cfg):
            seq.remove("segment_train")
        if cfg.pair.mode == "image_only":  # pair=image_only reads no expression table
            seq.remove("expression")
        if "simulate" in seq and not simulate_readers(cfg, seq):
            # data=synthetic is the default, but the user's own inputs (an expression file,
            # crop folders, paths.inputs.*) leave nothing of the simulator's to read
            seq.remove("simulate")
        return seq
    if name not in ORDER + EXTRA_STAGES:
        valid = ", ".join([*ORDER, *EXTRA_STAGES, "all"])
        raise StageError(f"unknown stage {name!r}; valid stages: {valid}")
    return [name]


def run_stage(cfg: DictConfig, name: str) -> Path:
    """Run one stage: check inputs, prepare its folder, call it, write the manifest."""
    from pipeline import guards, hardware
    from pipeline.locks import held_for_run, producer_lock, stage_lock
    from pipeline.stagedir import check_writable

    if name not in REGISTRY:
        load_stages()
    spec = REGISTRY[name]
    # check settings and resolve inputs first: fail before touching any folder
    guards.check_start(cfg)
    if spec.validate is not None:
        spec.validate(cfg)
    if hardware.launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        # torchrun started this rank: rank 0 owns folders, manifests and the
        # single-process stages; this rank joins the distributed ones only, and
        # resolves inputs after the rendezvous, once rank 0 has written them
        if not spec.distributed:
            return stage_dir(cfg, name)
        ctx = StageContext(cfg=cfg, name=name, dir=stage_dir(cfg, name), inputs={})
        hardware.launch(spec.fn, ctx, cfg.hardware)
        return ctx.dir
    inputs = {n: resolve_input(cfg, n) for n in spec.needs_for(cfg)}
    for n in spec.optional_for(cfg):
        try:
            inputs[n] = resolve_input(cfg, n)
        except StageInputError:
            pass
    guards.probe_inputs(inputs)
    # one run per stage folder at a time, from the existence check to the manifest;
    # the folders it reads are not rewritten meanwhile (shared locks, pipeline/locks.py)
    check_writable(setting_path(cfg.paths.root), "paths.root")
    own = stage_lock(run_dir(cfg), name, cfg.variant, cfg.experiment)
    with ExitStack() as held:
        seen = {own.path}
        # (how the message names it, path): the inputs, then the stage's other reads
        reads = [(f"input '{k}' ({v})", v) for k, v in inputs.items()]
        reads += [(f"{w} ({v})", v) for w, v in (spec.reads(cfg) if spec.reads else {}).items()]
        for n, p in reads:
            lock = producer_lock(p)
            # a folder this run locked up front (stage=all: main) is not locked twice
            if lock is not None and lock.path not in seen and not held_for_run(lock.path):
                seen.add(lock.path)
                held.callback(lock.acquire_shared(n, own.label).release)
        if not held_for_run(own.path):
            held.enter_context(own)
        return _run_locked(cfg, name, spec, inputs)


# stage folders this process has started to write (see _drop_hydra_dir)
_FOLDERS_STARTED = 0
# a Ctrl-C seen by the pipeline's SIGINT handler (:func:`interrupt`), kept even when the
# KeyboardInterrupt it raised was swallowed: it can land inside a library's import that
# catches everything (torch's, numba's), and the run then went on to a stage's own error
_INTERRUPTED = False


def interrupt(signum, frame) -> None:
    """SIGINT handler of ``python -m pipeline`` once Hydra runs (``pipeline.__main__``):
    notes the Ctrl-C, then raises KeyboardInterrupt as Python's default handler does."""
    global _INTERRUPTED
    _INTERRUPTED = True
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a Ctrl-C was noted (:func:`interrupt`), also one whose KeyboardInterrupt a
    library swallowed: the stages pass it to the long library loops (``should_stop`` of
    :func:`vae.train.train`), which then stop at their next step."""
    return _INTERRUPTED


def _check_interrupt() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C was seen but its KeyboardInterrupt swallowed."""
    if _INTERRUPTED:
        raise KeyboardInterrupt


def _run_locked(cfg: DictConfig, name: str, spec: StageSpec, inputs: dict[str, Path]) -> Path:
    from pipeline import hardware
    from pipeline.guards import log_traceback, settings_hash
    from pipeline.stagedir import add_log_file, folder_status, prepare_stage_dir, restore_backup

    global _FOLDERS_STARTED, _LAST_FAILED
    _FOLDERS_STARTED += 1
    # what preparing the folder says (a backup restored, an attempt set aside) belongs
    # in the stage's log too, which can only be opened once the folder is ready
    early = _Records()
    logging.getLogger().addHandler(early)
    try:
        d, backup = prepare_stage_dir(cfg, name, inputs)
    finally:
        logging.getLogger().removeHandler(early)
    # the run this one continues in place (resume=true), before its manifest is rewritten
    before = folder_status(d)
    handler: logging.Handler | None = None
    manifest: Manifest | None = None
    ctx: StageContext | None = None
    t0 = time.time()
    # from here on the previous result (``backup``) is hidden: whatever fails, even
    # opening the log or writing the first manifest on a full disk, must put it back
    try:
        handler = add_log_file(d / f"{name}.log", cfg.log_level)
        for rec in early.records:
            if rec.levelno >= handler.level:
                handler.handle(rec)
        for text in hardware.warnings_said():  # e.g. the CPU fallback, said once per process
            if logging.WARNING >= handler.level and not any(
                r.getMessage() == text for r in early.records
            ):
                handler.handle(
                    logging.LogRecord(hardware.log.name, logging.WARNING, "", 0, text, None, None)
                )
        # a GPU run fallen back to the CPU: no more DataLoader workers than CPUs (said)
        hardware.fit_fallback(cfg.hardware)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        manifest = Manifest(d, name, resolved)
        manifest.data["resume_hash"] = settings_hash(resolved, name)
        # the device, precision and workers in effect (the config says what was asked)
        manifest.data["hardware_used"] = hardware.used(cfg.hardware)
        for n, p in inputs.items():
            manifest.add_input(n, p)
        manifest.save()
        ctx = StageContext(cfg=cfg, name=name, dir=d, inputs=dict(inputs))
        log.info("stage=%s -> %s", name, d)
        from vae.analysis.figures import plain_text

        with plain_text():  # names with '$' drawn as written (each DDP rank: hardware)
            if spec.distributed:
                hardware.launch(spec.fn, ctx, cfg.hardware)
            else:
                ctx.dist = hardware.single_process(cfg.hardware)
                spec.fn(ctx)
        manifest.data["torch_threads"] = _threads_used(cfg, ctx)
        manifest.data.update(ctx.record)
        _record_inputs(manifest, ctx)
        for n in spec.produces:
            p = ctx.output(n)
            if not p.exists():
                raise StageError(f"stage={name} finished without writing '{n}' ({p})")
            manifest.add_output(n, p)
        manifest.data["seconds"] = round(time.time() - t0, 2)
        manifest.finish("complete")
    except BaseException as exc:
        if handler is not None:
            log_traceback(handler, name)  # to <stage>.log only; the console gets one line
        if manifest is not None and ctx is not None and ctx.dist is not None:
            manifest.data["torch_threads"] = _threads_used(cfg, ctx)
        _fail(manifest, ctx, name, exc)
        _LAST_FAILED = _Failed(
            name, cfg, d, before, backup, folder_status(backup) if backup is not None else None
        )
        if backup is not None:
            try:
                failed = restore_backup(d, backup)
            except OSError as e:
                log.error(
                    "stage=%s failed, and its previous result could not be put back (%s): "
                    "it is in %s; move it to %s by hand",
                    name,
                    e,
                    backup,
                    d,
                )
            else:
                _LAST_FAILED.attempt = failed
                log.error(
                    "stage=%s failed; previous outputs restored, this attempt kept in %s",
                    name,
                    failed,
                )
                moved = _moved_paths(str(exc), d, failed)
                if type(exc) is StageError and moved != str(exc):
                    # a file the stage named in its folder (e.g. the rejects gathered before a
                    # refusal) now lies in the failed attempt's: the folder it names holds
                    # the previous result again
                    raise StageError(moved) from exc
        raise
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    log.info("stage=%s done in %.1f s", name, time.time() - t0)
    return d


@dataclass
class _Failed:
    """What the last stage that failed in this process left (the interrupt message)."""

    stage: str
    cfg: DictConfig
    dir: Path
    before: str | None  # status of the run it continued in place (resume=true), or None
    backup: Path | None  # the previous result set aside
    earlier: str | None  # its status (overwrite=true sets aside a failed run too)
    attempt: Path | None = None  # where the attempt went once the backup was put back


_LAST_FAILED: _Failed | None = None


# the epoch a resumable stage's checkpoint records, and what adds to it to give the
# epochs done: vae.train saves the count done, segmentation.train the 0-based index
_CHECKPOINT_EPOCH_DONE = {"train": 0, "segment_train": 1}


def checkpoint_said(d: Path, name: str) -> str:
    """``last.pt (saved after epoch 20)``: stage ``name``'s resume checkpoint in ``d`` and
    the epochs it holds, read from its ``epoch`` field without reading its tensors
    (mapped, not loaded: a big model costs no more than a small one); the file name
    alone where that cannot be read."""
    from pipeline.guards import RESUMABLE

    ck = RESUMABLE[name]
    try:
        import torch

        from segmentation.io import _numpy_safe_globals

        # the numpy RNG state both checkpoints carry needs the loaders' allow-list (without
        # it every real checkpoint was refused and the epoch never said)
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            data = torch.load(d / ck, map_location="cpu", weights_only=True, mmap=True)
        done = int(data["epoch"]) + _CHECKPOINT_EPOCH_DONE.get(name, 0)
    except Exception:  # noqa: BLE001 - advice after a Ctrl-C: never a new error
        return ck
    return f"{ck} (saved after epoch {done})"


def interrupt_advice(f: _Failed) -> str | None:
    """What a Ctrl-C during stage ``f.stage`` left, and the re-runs that do what they
    say; None when the previous result could not be put back (that error was logged).

    After ``overwrite=true`` the earlier complete result is put back and the attempt moved
    to ``<stage>.failed-*``: "resume=true" then continues the *earlier* run, never the
    interrupted attempt (the advice said resume=true as if it did: an audit).
    """
    from pipeline.guards import RESUMABLE

    name, d = f.stage, f.dir
    ck = RESUMABLE.get(name)
    # "keeps its last.pt" did not say how far it got (the log had reached epoch 25, the
    # file held 20: an audit): the epoch it holds, where it can be read
    said = checkpoint_said(d, name) if ck else None
    again = f"python -m pipeline {rerun_args(f.cfg, name, settings=True)}"
    head = f"interrupted during stage={name}"
    if f.attempt is not None:  # a previous complete result was put back
        if f.cfg.resume and not f.cfg.overwrite and f.before == "complete":
            # resumed a complete run from a copy: the copy is what came back
            return (
                f"{head} (resume=true): the complete run in {d} is back as it was before this "
                f"resume; what this attempt added is kept in {f.attempt} and is not "
                f"continued. `{again} resume=true` continues the complete run again from its "
                f"{said}; `{again} overwrite=true` starts it over. Delete {f.attempt} when it "
                f"is not needed."
            )
        flag = "overwrite=true" if f.cfg.overwrite else "resume=true"
        earlier = "complete result" if f.earlier == "complete" else f"run (status: {f.earlier})"
        text = (
            f"{head}: the earlier {earlier} is back in {d}, unchanged; the attempt of this "
            f"{flag} run is kept in {f.attempt} (marked failed)."
        )
        if ck and (d / ck).exists():
            text += (
                f" `{again} resume=true` would continue that earlier run from its {said}, not "
                f"the interrupted attempt; `{again} overwrite=true` starts the new run over "
                f"from the beginning."
            )
        else:
            text += f" `{again} overwrite=true` runs it again from the beginning."
        return text + f" Delete {f.attempt} when it is not needed."
    if f.backup is not None:
        return None  # the previous result could not be put back: logged with where it is
    if ck and (d / ck).exists():
        return (
            f"{head}: {d} is marked failed and keeps its {said}: `{again} resume=true` "
            f"continues it from there; `{again} overwrite=true` starts it over."
        )
    if ck:
        return (
            f"{head}: {d} is marked failed before it wrote its first {ck}: `{again}` runs "
            f"it again from the start."
        )
    return f"{head}: {d} is marked failed: `{again}` runs it again (the attempt is set aside)."


def _moved_paths(message: str, folder: Path, moved_to: Path) -> str:
    """``message`` with every path inside ``folder`` pointed into ``moved_to``."""
    return message.replace(f"{folder}{os.sep}", f"{moved_to}{os.sep}")


class _Records(logging.Handler):
    """Keeps the records it is given (replayed into a log file opened later)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _fail(
    manifest: Manifest | None, ctx: StageContext | None, name: str, exc: BaseException
) -> None:
    """Mark the manifest failed after ``exc``, if one was written; a manifest that cannot
    be written (the disk that stopped the stage is full) is logged, not raised: it hid
    the stage's own error and stopped the previous result from being put back."""
    if manifest is None:
        return
    try:
        if ctx is not None:
            _record_inputs(manifest, ctx)
        manifest.finish("failed")
    except OSError as e:
        log.error(
            "stage=%s: its manifest %s could not be marked failed (%s) after: %s",
            name,
            manifest.path,
            e,
            exc,
        )


def _threads_used(cfg: DictConfig, ctx: StageContext) -> int | None:
    """Intra-op torch threads the stage ran with (the manifest's ``torch_threads``).

    ``hardware.torch_threads`` is often null (decided from the free cores), so the
    config alone does not say it.
    """
    import torch

    from pipeline import hardware

    if ctx.dist is not None:  # this process ran it (one process, or a torchrun rank)
        return torch.get_num_threads()
    # spawned DDP ranks: they decide by the same rule, which under DDP reads only the
    # setting (hardware.pick_threads)
    try:
        world = hardware.plan(cfg.hardware)[2]
    except Exception:  # noqa: BLE001 - a record, never a reason to fail the stage
        return None
    return hardware.pick_threads(cfg.hardware.torch_threads or None, world)[0]


def _record_inputs(manifest: Manifest, ctx: StageContext) -> None:
    """Add to the manifest the inputs the stage resolved or named while it ran."""
    for n, p in ctx.inputs.items():
        if n not in manifest.data["inputs"] and Path(p).exists():
            manifest.add_input(n, Path(p))


def _log_off_console(msg: str) -> None:
    """An ERROR record for the log files (and any other handler), not the console: the
    user reads the one ``error:`` line printed beside it (it was shown twice)."""
    rec = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (msg,), None)
    consoles = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    for h in logging.getLogger().handlers:
        console = (
            not isinstance(h, logging.FileHandler) and id(getattr(h, "stream", None)) in consoles
        )
        if not console and rec.levelno >= h.level:
            h.handle(rec)


def _drop_hydra_dir(cfg: DictConfig) -> None:
    """Remove the folder Hydra made for this run when a user error stopped it before
    any stage folder was touched: a mistyped setting should leave no
    ``<experiment>/.hydra/<stage>-<time>`` behind, nor the folders above it that this
    run made (``.hydra``, the experiment, ``paths.root`` itself) once they hold nothing.
    A folder that existed before the run is kept, empty or not. Once a stage has
    started, its log there is kept."""
    if _FOLDERS_STARTED:
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not started by Hydra (a test calling main directly)
        return
    root = setting_path(cfg.paths.root).resolve()
    if out.name == ".hydra" or ".hydra" not in out.parts or root not in out.resolve().parents:
        return
    # only a folder named after this process (pipeline/conf/config.yaml: ``-<pid>``): named to
    # the second, a refused run removed the folder of a run started in the same second
    tag = f"-{os.getpid()}"
    below = out.parts[out.parts.index(".hydra") + 1 :]
    if not any(part.endswith(tag) for part in below):
        return
    root_log = logging.getLogger()
    for h in list(root_log.handlers):  # Hydra's job log file lives in that folder
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == out:
            root_log.removeHandler(h)
            h.close()
    shutil.rmtree(out, ignore_errors=True)
    from pipeline.config import absent_at_start

    made = absent_at_start()
    if made is not None:
        # the folders above it that Hydra made for this run (RunFolderRecord noted them
        # before), deepest first, while empty: .hydra, the experiment, paths.root and up
        for parent in Path(os.path.abspath(out)).parents:
            if str(parent) not in made:
                break
            try:
                if parent.name.endswith(tag) and os.listdir(parent) == ["multirun.yaml"]:
                    # a sweep's folder (-m) whose first job was refused: it stops the sweep
                    (parent / "multirun.yaml").unlink()
                parent.rmdir()
            except OSError:
                break
        return
    for parent in out.resolve().parents:  # .hydra, then the experiment folder, if empty
        if parent == root or root not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:
            break


def _os_error_line(cfg: DictConfig, e: OSError) -> str:
    """``e`` as ``<path> (<setting>=<value>): <reason>``: the setting named where the path
    is, or lies inside, the value of one."""
    where = str(e.filename) if e.filename else ""
    reason = e.strerror or str(e)
    if not where:
        return reason
    setting = ""
    for key in path_settings(cfg):
        value = OmegaConf.select(cfg, key, default=None)
        if not isinstance(value, str) or not value:
            continue
        given = setting_path(value).absolute()
        at = Path(where).absolute()
        if at == given or given in at.parents:
            setting = f" ({key}={value})"
            break
    return f"{where}{setting}: {reason}"


def _with_path(cfg: DictConfig, name: str, e: Exception) -> Exception:
    """A full disk (or quota) error that names no file, named after the stage folder
    it was writing in: the console line said "[Errno 28] No space left on
    device" and no more."""
    if not isinstance(e, OSError) or e.filename or e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return e
    try:
        where = stage_dir(cfg, name)
    except StageError:
        return e
    # OSError(errno, ...) is the subclass of that errno, as the original was
    named = OSError(e.errno, f"{e.strerror or e} (writing in the stage folder)", str(where))
    named.__traceback__ = e.__traceback__
    return named


def _interrupted_early(cfg: DictConfig, name: str) -> int:
    """Ctrl-C before any stage folder was touched: one line, Hydra's run folder
    removed, exit code 130."""
    msg = f"interrupted before stage={name} started: nothing was written"
    _log_off_console(msg)
    print(f"error: {msg}", file=sys.stderr)
    _drop_hydra_dir(cfg)
    return 130


def main(cfg: DictConfig) -> int:
    """Entry point after Hydra composed ``cfg``. Returns a process exit code."""
    global _LAST_FAILED
    _LAST_FAILED = None
    name = cfg.stage.name
    started = _FOLDERS_STARTED
    try:
        # the first seconds (torch, the stage modules): a Ctrl-C while they were
        # imported printed a 29-frame KeyboardInterrupt traceback
        from pipeline import guards, hardware
        from pipeline.locks import hold_for_run, producer_lock, stage_lock
        from pipeline.stagedir import check_writable

        load_stages()
        _check_interrupt()
    except KeyboardInterrupt:
        return _interrupted_early(cfg, name)
    hardware.forget_warnings()  # a run's stage logs replay its own warnings only
    # anndata logs "storing 'x' as categorical" at INFO for every string column written
    logging.getLogger("anndata").setLevel(logging.WARNING)
    expand_user_paths(cfg)
    try:
        chain = stages_for(cfg)
        names = guards.start_run(cfg, chain)
        plan = guards.stage_plan(cfg, names)
        with ExitStack() as run_locks:
            if len(names) > 1 and os.environ.get("RANK", "0") in ("", "0"):
                from pipeline.precheck import precheck

                # rank 0 of torchrun or a plain run
                reads = precheck(cfg, names, plan)
                # every folder the chain writes, and reads from outside it, before the
                # first stage: it met a running stage halfway and left the study mixed
                stage_cfgs = dict(plan)
                writes = [
                    stage_lock(run_dir(c), s, c.variant, c.experiment)
                    for s, c in ((s, stage_cfgs.get(s, cfg)) for s in names)
                ]
                by = f"stage={cfg.stage.name} of experiment {cfg.experiment}"
                found = [(producer_lock(p), f"input '{n}' ({p})") for n, p in reads]
                shared = [(lk, what) for lk, what in found if lk is not None]
                check_writable(setting_path(cfg.paths.root), "paths.root")
                run_locks.enter_context(
                    hold_for_run(
                        writes,
                        shared,
                        by,
                        f"stage={cfg.stage.name}: cannot start (checked before any stage "
                        f"started; nothing was run)",
                    )
                )
            from segmentation.progress import redirect_logging

            with redirect_logging():  # log lines above the progress bars, not through them
                if len(names) > 1:  # the chain and where it goes, before its first stage
                    log.info(
                        "stage=%s: %d stages (%s) -> %s",
                        cfg.stage.name,
                        len(names),
                        ", ".join(names),
                        run_dir(cfg),
                    )
                    note = simulate_note(cfg, chain, names)
                    if note:
                        log.info(note)
                    why = detector_given(cfg) if cfg.stage.name == "all" else None
                    if why and "segment" in names:
                        log.info("stage=all: segment_train left out: %s", why)
                for k, (name, stage_cfg) in enumerate(plan, 1):
                    _check_interrupt()  # one swallowed by a library: no next stage
                    if len(names) > 1:
                        log.info("stage %d/%d: %s", k, len(names), name)
                    run_stage(stage_cfg, name)
    except guards.USER_ERRORS as e:
        if _INTERRUPTED and _FOLDERS_STARTED == started:
            # a Ctrl-C a library swallowed while the run checked its inputs: the user
            # asked to stop, so that is what the run says
            return _interrupted_early(cfg, name)
        _log_off_console(f"{e}")
        print(f"error: {e}", file=sys.stderr)
        _drop_hydra_dir(cfg)
        return 2
    except KeyboardInterrupt:
        if _FOLDERS_STARTED == started:
            return _interrupted_early(cfg, name)
        # the stage's folder is already marked failed and any previous result put
        # back (_run_locked); the user pressed Ctrl-C, so no traceback
        failed = _LAST_FAILED
        msg = interrupt_advice(failed) if failed is not None else None
        if msg is None:
            msg = (
                f"interrupted during stage={name}: a stage folder it had started is marked "
                f"failed and a previous complete result, if any, was put back. Re-run with "
                f"overwrite=true, or resume=true for the stages that continue from a "
                f"checkpoint ({', '.join(sorted(guards.RESUMABLE))}; from scratch if none was "
                f"written yet)."
            )
        elif cfg.stage.name == "all":
            msg += f" The stages after stage={failed.stage} did not run."
        _log_off_console(msg)
        print(f"error: {msg}", file=sys.stderr)
        return 130
    except Exception as e:
        if str(cfg.log_level).upper() == "DEBUG":
            raise
        if isinstance(e, PermissionError) and _FOLDERS_STARTED == started:
            # an input or study this user may not read, found before any stage folder
            # was made: the command names it (exit 2), nothing ran, nothing is left behind
            msg = f"stage={name}: {_os_error_line(cfg, e)}"
            _log_off_console(msg)
            print(f"error: {msg}", file=sys.stderr)
            _drop_hydra_dir(cfg)
            return 2
        return guards.report_crash(cfg, name, _with_path(cfg, name, e))
    # one stage: its own folder (a variant run sits below the stage folder)
    out = stage_dir(cfg, names[0]) if len(names) == 1 else run_dir(cfg)
    if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun rank 0 writes, and says so
        print(f"done: stage={cfg.stage.name} -> {out}")
    return 0
