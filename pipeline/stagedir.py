"""Preparing a stage folder: the rules for existing results, resume and backups.

Called by the runner while it holds the stage's lock (pipeline/locks.py):

- a finished folder is never silently replaced: ``overwrite=true`` moves it to
  ``.<stage>.old-<id>`` (restored if the new run fails, deleted when it succeeds);
- a *failed* run of a stage that keeps no checkpoint is moved aside to
  ``<stage>.failed-<time>`` and the stage runs afresh (nothing to continue, no result
  to protect); a failed ``train`` / ``segment_train`` run waits for ``resume=true``
  or ``overwrite=true``;
- ``resume=true`` continues an unfinished run in place; on a *complete* run of a
  stage that has checkpoints it continues from a copy kept as the backup, so a
  failing continuation never demotes the complete result; a stage without
  checkpoints has nothing to resume;
- a backup left by a killed ``overwrite=true`` run is restored (or reported)
  before anything else happens.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import MANIFEST, read_manifest
from pipeline.guards import RESUMABLE, check_resume
from pipeline.runner import StageError, stage_dir

log = logging.getLogger(__name__)


def check_writable(d: Path, setting: str) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{uuid.uuid4().hex[:6]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise StageError(f"{setting}={d} is not writable: {e.strerror or e}") from e


def _status(d: Path) -> str:
    try:
        man = read_manifest(d)
    except Exception:  # noqa: BLE001 - an unreadable manifest is an unfinished run
        return "unreadable manifest"
    return man.get("status", "unknown") if man else "unknown (no manifest)"


def variant_runs(d: Path) -> list[Path]:
    """Runs of other variants nested in stage folder ``d`` (``d/<variant>[/<sub>]``).

    ``outputs/<experiment>/<stage>/`` holds the run without a variant *and* the folders
    of ``variant=NAME`` runs; those are separate runs, never part of the first one's
    result. A child folder is one when it (or a folder in it) has a manifest: a stage
    writes its manifest at its folder's top only.
    """
    if not d.is_dir():
        return []
    out = []
    for c in sorted(d.iterdir()):
        if not c.is_dir() or c.name.startswith("."):
            continue
        if (c / MANIFEST).exists() or any(
            (g / MANIFEST).exists() for g in c.iterdir() if g.is_dir()
        ):
            out.append(c)
    return out


def own_entries(d: Path) -> list[Path]:
    """What folder ``d`` holds of its own run: everything but :func:`variant_runs`."""
    if not d.is_dir():
        return []
    subs = set(variant_runs(d))
    return [c for c in d.iterdir() if c not in subs]


def aside_name(d: Path, tag: str) -> Path:
    """A free name ``<name>.<tag>-<time>[-k]`` beside ``d`` for an attempt kept aside."""
    base = f"{d.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, k = d.with_name(base), 1
    while out.exists():
        k += 1
        out = d.with_name(f"{base}-{k}")
    return out


def move_variant_runs(src: Path, dst: Path) -> None:
    """Move the variant runs nested in ``src`` into ``dst`` (same names)."""
    for c in variant_runs(src):
        c.rename(dst / c.name)


def folder_status(d: Path) -> str | None:
    """The run status of folder ``d``; None when it holds nothing of its own run."""
    return _status(d) if own_entries(d) else None


def backups_of(d: Path) -> list[Path]:
    """Backups ``.<name>.old-*`` of folder ``d``, newest first."""
    if not d.parent.is_dir():
        return []
    olds = [p for p in d.parent.glob(f".{d.name}.old-*") if p.is_dir()]
    return sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True)


def run_kind(d: Path) -> str:
    """How the run in folder ``d`` was started, as its manifest recorded it:
    ``"overwrite=true"``, ``"resume=true"``, or ``""`` (neither, or not known)."""
    try:
        man = read_manifest(d)
    except Exception:  # noqa: BLE001 - an unreadable manifest says nothing of it
        return ""
    config = (man or {}).get("config")
    if not isinstance(config, dict):
        return ""
    if config.get("overwrite"):
        return "overwrite=true"
    return "resume=true" if config.get("resume") else ""


def complete_backup(d: Path) -> Path | None:
    """The newest complete backup ``.<name>.old-*`` of folder ``d``, or None."""
    return next((o for o in backups_of(d) if _status(o) == "complete"), None)


def recover_backups(d: Path, stage: str) -> tuple[Path, Path | None, str] | None:
    """Restore the backup a killed ``overwrite=true`` (or resume) run left next to ``d``.

    Call only while holding the stage's lock. If ``d`` holds no complete run, the
    newest complete backup is moved back to ``d`` (the interrupted attempt is kept
    as ``<name>.interrupted-<time>``); other backups are reported, never deleted.
    Returns (the backup put back, where the attempt was kept or None, how the killed
    run was started: :func:`run_kind`), or None when nothing was put back.
    """
    olds = backups_of(d)
    if not olds:
        return None
    here = folder_status(d)
    restored = None
    if here != "complete":
        good = next((o for o in olds if _status(o) == "complete"), None)
        if good is not None:
            kind, kept = "", None
            if d.exists():
                kind = run_kind(d)
                move_variant_runs(d, good)  # other variants' runs stay where they are
                if any(d.iterdir()):
                    kept = aside_name(d, "interrupted")
                    d.rename(kept)
                    log.warning(
                        "stage=%s: the interrupted attempt in %s is kept in %s", stage, d, kept
                    )
                else:
                    d.rmdir()
            good.rename(d)
            log.warning(
                "stage=%s: restored the previous complete result from %s (left by an "
                "interrupted %s run)",
                stage,
                good,
                kind or "overwrite=true or resume=true",
            )
            olds.remove(good)
            restored = (good, kept, kind)
    for o in olds:
        log.warning(
            "stage=%s: %s holds an earlier result (status: %s) left by an interrupted run; "
            "%s holds the current one. Delete the old folder when it is not needed.",
            stage,
            o,
            _status(o),
            d,
        )
    return restored


def prepare_stage_dir(cfg: DictConfig, name: str, inputs: dict) -> tuple[Path, Path | None]:
    """Create the stage folder; refuse to replace a finished one silently.

    Returns the folder and, with ``overwrite=true`` (or ``resume=true`` on a
    complete run), the backup of the previous result: deleted once the new run
    succeeds, restored if it fails.
    """
    d = stage_dir(cfg, name)
    backup = _attempt_to_continue(cfg, name, d)
    restored = recover_backups(d, name) if backup is None else None
    if own_entries(d):
        status = _status(d)
        if cfg.overwrite:
            backup = _set_aside(cfg, name, d, d.with_name(f".{d.name}.old-{uuid.uuid4().hex[:6]}"))
        elif cfg.resume and backup is not None and name in RESUMABLE:
            check_resume(cfg, name, read_manifest(d), inputs)
            log.warning(
                "resume=true: stage=%s continues the attempt an interrupted %s run left in "
                "%s (status: %s) from its %s; the complete result it started from stays in "
                "%s until this run succeeds",
                name,
                run_kind(d) or "overwrite=true",
                d,
                status,
                RESUMABLE[name],
                backup,
            )
        elif cfg.resume:
            if name not in RESUMABLE:
                if status == "complete":
                    raise StageError(
                        f"resume=true: stage={name} in {d} is complete, and this stage "
                        f"keeps no checkpoint to continue from. Pass overwrite=true to run "
                        f"it again, or choose another experiment=NAME."
                    )
                # nothing of it can be continued: set aside (its log says how far it
                # got), so the new run starts in a clean folder, not among the dead
                # attempt's half-written temporary files
                kept = _set_aside(cfg, name, d, aside_name(d, "interrupted"))
                log.warning(
                    "resume=true: stage=%s keeps no checkpoint; the unfinished run in %s "
                    "(status: %s) is run again from the start (the attempt is kept in %s)",
                    name,
                    d,
                    status,
                    kept,
                )
            else:
                check_resume(cfg, name, read_manifest(d), inputs)
                if status == "complete":
                    # continue from a copy: if the continuation fails, the complete
                    # result comes back untouched
                    backup = d.with_name(f".{d.name}.old-{uuid.uuid4().hex[:6]}")
                    subs = {c.name for c in variant_runs(d)}
                    shutil.copytree(
                        d,
                        backup,
                        symlinks=True,
                        ignore=lambda at, names: [n for n in names if Path(at) == d and n in subs],
                    )
                    log.info(
                        "resume=true: stage=%s in %s is complete; continuing it from %s "
                        "(the complete result is kept in %s until this run succeeds)",
                        name,
                        d,
                        RESUMABLE[name],
                        backup,
                    )
        elif rerun_without_asking(name, status, d):
            # keep the attempt (its log says why it failed) and start afresh
            failed = _set_aside(cfg, name, d, aside_name(d, "failed"))
            log.warning("stage=%s: the failed earlier attempt in %s is kept in %s", name, d, failed)
        elif restored is not None and status == "complete":
            # a plain re-run after a killed overwrite / resume: putting the result back
            # was all it did (the advice after the kill says so); not an unexplained refusal
            good, kept, kind = restored
            attempt = f"; that run's attempt is kept in {kept}" if kept is not None else ""
            more = " or resume=true to continue it," if name in RESUMABLE else ""
            raise StageError(
                f"stage={name}: put the complete result back in {d} from {good.name}, left by "
                f"an interrupted {kind or 'overwrite=true or resume=true'} run{attempt}. "
                f"Nothing was run: the stages that read it can run now; pass overwrite=true "
                f"to run stage={name} again,{more} or choose another experiment=NAME."
            )
        else:
            if status == "running":
                status = "running when it was interrupted: no process holds its lock now"
            resume = "resume=true to continue it, " if name in RESUMABLE else ""
            raise StageError(
                f"{d} already holds a run of stage={name} (status: {status}). "
                f"Refusing to overwrite it: pass overwrite=true to replace it, "
                f"{resume}or choose another experiment=NAME."
            )
    d.mkdir(parents=True, exist_ok=True)
    return d, backup


def _attempt_to_continue(cfg: DictConfig, name: str, d: Path) -> Path | None:
    """With ``resume=true``, the complete backup to keep aside while the interrupted
    attempt in ``d`` is continued (or, for a stage without checkpoints, set aside and
    run again), or None.

    A killed ``overwrite=true`` run leaves its attempt in ``d`` (status running or
    failed) and the previous complete result as a backup beside it. Without
    ``resume=true`` the backup is put back (:func:`recover_backups`); with it, a stage
    that continues from a checkpoint continues the attempt when it wrote one: putting
    the old result back would continue the old model (or refuse a setting the attempt
    changed), not the run the user interrupted. The backup keeps its place as the
    result restored if this run fails, deleted once it succeeds.
    """
    if not cfg.resume or cfg.overwrite or folder_status(d) not in ("running", "failed"):
        return None
    if name in RESUMABLE and not (d / RESUMABLE[name]).exists():
        return None  # nothing to continue: the old result comes back (recover_backups)
    # a stage without checkpoints runs again (the attempt set aside), the backup kept
    return next((o for o in backups_of(d) if _status(o) == "complete"), None)


def rerun_without_asking(name: str, status: str | None, folder: Path | None = None) -> bool:
    """Whether a folder holding a run of ``status`` is set aside and run again without
    ``overwrite=true``: a failed run is no result, and a stage without checkpoints, or one
    that failed before writing its first (``folder`` lacks it), could not continue it (the
    runner and ``stage=all``'s precheck follow this one rule)."""
    if status != "failed":
        return False
    if name not in RESUMABLE:
        return True
    return folder is not None and not (Path(folder) / RESUMABLE[name]).exists()


def _set_aside(cfg: DictConfig, name: str, d: Path, to: Path) -> Path:
    """Move stage folder ``d``'s own run to ``to`` and leave ``d`` holding only the
    variant runs nested in it; refused while one of those runs. Returns ``to``."""
    from pipeline.locks import stage_lock
    from pipeline.runner import run_dir

    for c in variant_runs(d):
        variant = f"{cfg.variant}/{c.name}" if cfg.variant else c.name
        if stage_lock(run_dir(cfg), name, variant, cfg.experiment).held_elsewhere():
            raise StageError(
                f"{d} cannot be moved aside: {c} is a run of stage={name} variant={variant} "
                f"that is running now, or that a running stage is reading (its folder lies "
                f"inside {d} and would move with it); wait for it to finish."
            )
    d.rename(to)
    d.mkdir()
    move_variant_runs(to, d)  # variant=NAME runs are not this run's result
    return to


def restore_backup(d: Path, backup: Path) -> Path:
    """Put the previous result ``backup`` back in ``d`` after a failed run.

    The failed attempt is kept as ``<name>.failed-<time>`` (returned); the variant runs
    nested in ``d`` stay in ``d``.
    """
    move_variant_runs(d, backup)
    failed = aside_name(d, "failed")
    d.rename(failed)
    backup.rename(d)
    return failed


def report_backups(run_dir: Path) -> None:
    """Warn about every backup ``.<stage>.old-*`` under ``run_dir`` (two levels deep)."""
    from pipeline.locks import stage_lock

    if not run_dir.is_dir():
        return
    for pattern in (".*.old-*", "*/.*.old-*"):
        for p in sorted(run_dir.glob(pattern)):
            name = p.name[1:].rsplit(".old-", 1)[0]
            stage, variant = (name, "") if p.parent == run_dir else (p.parent.name, name)
            if stage_lock(run_dir, stage, variant, run_dir.name).held_elsewhere():
                continue  # a running overwrite=true owns it
            if not p.is_dir():
                continue
            current = p.with_name(name)
            here, was = folder_status(current), _status(p)
            if was == "complete" and here != "complete":  # what recover_backups restores
                kind = run_kind(current) or "overwrite=true or resume=true"
                ck = RESUMABLE.get(stage)
                if ck is None or (current / ck).exists():
                    # _attempt_to_continue: resume=true goes on with the attempt instead
                    goes = (
                        f"continue the interrupted attempt in {current} from its {ck}"
                        if ck
                        else "run the stage again"
                    )
                    nxt = (
                        f"a run of that stage without resume=true puts it back; resume=true "
                        f"would {goes}, keeping this backup until it succeeds"
                    )
                else:
                    nxt = "the next run of that stage puts it back"
                log.warning(
                    "%s: backup of a complete result left by an interrupted %s run (its "
                    "attempt, status %s, is in %s); %s",
                    p,
                    kind,
                    here or "empty",
                    current,
                    nxt,
                )
            else:
                # what recover_backups does with it: nothing to restore, so say what it is
                log.warning(
                    "%s: an earlier result (status: %s) left by an interrupted run; %s holds "
                    "the current one (status: %s). Delete the old folder when it is not needed.",
                    p,
                    was,
                    current,
                    here or "empty",
                )


def add_log_file(path: Path, level: str) -> logging.Handler:
    """Append the stage's log to ``path`` (root logger) and show ``level`` on the terminal.

    The file is the run's record: it keeps INFO and above whatever ``level`` (DEBUG
    too with ``log_level=DEBUG``); ``level`` sets what the terminal's handlers (those
    writing to stdout / stderr) show, so ``log_level=WARNING`` quiets the terminal only.
    """
    import sys

    want = logging.getLevelName(str(level).upper())
    file_level = min(logging.INFO, want) if isinstance(want, int) else logging.INFO
    h = logging.FileHandler(path, mode="a", encoding="utf-8", errors="backslashreplace")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    h.setLevel(file_level)
    root = logging.getLogger()
    root.addHandler(h)
    if root.level > file_level:
        root.setLevel(file_level)
    if isinstance(want, int):
        for other in root.handlers:
            stream = getattr(other, "stream", None)
            if other is not h and stream in (
                sys.stdout,
                sys.stderr,
                sys.__stdout__,
                sys.__stderr__,
            ):
                other.setLevel(want)
    return h
