"""An exclusive lock per stage folder, held for the whole stage, and shared locks on
the stage folders it reads.

Two runs of the same stage of one experiment would otherwise interleave: with
``overwrite=true`` both move the old folder aside and the survivor mixes files of
both runs. The lock is ``fcntl.flock`` on ``<experiment>/.locks/<stage>[__<variant>].lock``;
the kernel drops it when the process ends, however it ends (a killed run never
leaves a stale lock).

A running stage also holds a *shared* lock on the folder of every input another stage
of an experiment wrote (:func:`producer_lock`): a stage cannot start to rewrite a
folder a running stage is reading, nor start to read one being rewritten. Without
it an audit's ``stage=simulate overwrite=true`` replaced the smears a running
``stage=segment`` was reading (76 of 120 images "unreadable", the run marked
complete), and a second ``stage=all`` of the same experiment rewrote the first one's
inputs under it.

Every holder, reader or writer, leaves a record beside the lock
(``.locks/<stage>[__<variant>].holders/<host>-<pid>-<id>.json``: host, pid, what it
runs, since when, whether it reads or writes the folder), removed on release; a refusal
names the live holders only. The lock file itself held the writer's pid alone, never
cleared: a concurrency audit's refusal named a process that had ended (its last
writer, while a reader held the lock), no host, and in a copied study a pid of another
session. A holder that cannot write its record (a read-only or colleague's study) reads
without one: nothing of this user's can rewrite such a folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

from pipeline.runner import StageError

log = logging.getLogger(__name__)

# why a lock file cannot be made or written: a read-only mount, no permission
_NO_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)

HOST = socket.gethostname()

# locks this process holds for a whole multi-stage run (:func:`hold_for_run`): its
# stages take no second lock on those folders, since two descriptors of one process
# exclude each other under flock (stage=all would refuse itself)
_RUN_HELD: dict[Path, StageLock] = {}


class StageBusyError(StageError):
    """Another process holds the lock of this stage folder."""


def _alive(host: str, pid: int) -> bool:
    """Whether process ``pid`` runs; one on another host cannot be told: taken as alive."""
    if host != HOST:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def describe(holder: dict) -> str:
    """``pid N on host H, since T`` of a holder record (a fallback one has no time)."""
    if holder.get("pid") is None:
        return "a process that left no record"
    where = f"pid {holder['pid']} on host {holder['host']}"
    if holder.get("host") != HOST:
        where += " (another host: not checked)"
    return where + (f", since {holder['since']}" if holder.get("since") else "")


class StageLock:
    """``with StageLock(path, label):`` -- fail at once if another process holds it.

    Parameters
    ----------
    path
        The lock file (created if missing; never deleted: deleting a lock file
        another process is about to open would let two runs in).
    label
        How the stage is named in the message, e.g. ``"stage=train of experiment demo"``.
    """

    def __init__(self, path: Path, label: str):
        # one spelling of each lock file: stage=all records the locks it holds by path
        # and looks its inputs up through producer_lock (resolved); a relative or
        # symlinked paths.root (the default "outputs") made the two differ, and the run
        # refused its own input at stage 2 (review of the concurrency fixes)
        self.path = Path(path).absolute().resolve()
        self.label = label
        self._fd: int | None = None
        self._record: Path | None = None
        self._exclusive = False

    @property
    def holders_dir(self) -> Path:
        """The folder of the holders' records (``<stage>.holders`` beside ``<stage>.lock``)."""
        return self.path.with_suffix(".holders")

    def acquire(self, by: str = "") -> StageLock:
        """Take the lock exclusively (the stage writes its folder); ``by`` names the
        run in the holder's record when it is not this stage alone (``stage=all``).

        Raises
        ------
        StageBusyError
            Another process holds it.
        StageError
            The lock file cannot be made or opened for writing (a read-only folder,
            or a lock file of a colleague's run that the group may not write).
        """
        try:
            fd = self._take(
                fcntl.LOCK_EX,
                lambda: (
                    f"{self._who()}; wait for it to finish, or use another "
                    f"experiment=NAME (lock: {self.path})"
                ),
            )
        except OSError as e:
            if e.errno not in _NO_WRITE:
                raise
            raise StageError(
                f"{self.label}: cannot write its lock file {self.path} "
                f"({e.strerror or e}); the experiment folder must be writable by "
                f"whoever runs its stages (a group-shared one: chmod -R g+w it), or "
                f"use another paths.root / experiment=NAME"
            ) from None
        # sole holder: every record left is of a process that ended without releasing
        # (killed); the pid in the lock file is for holders that write no record (an
        # older version of the pipeline reads it), cleared on release
        self._clear_stale(everyone=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {HOST}\n".encode(), 0)
        self._exclusive = True
        self._write_record("writes", by or self.label)
        return self

    def acquire_shared(self, what: str, by: str = "") -> StageLock:
        """Take the lock shared (readers only exclude writers); ``what`` names the
        input in the message when the folder is being written now, ``by`` the reading
        run in this holder's record (``stage=X of experiment Y``)."""
        try:
            self._take(
                fcntl.LOCK_SH,
                lambda: (
                    f"{what} is being written: {self._who()}; wait for it to finish "
                    f"(lock: {self.path})"
                ),
            )
        except OSError as e:
            if e.errno not in _NO_WRITE:
                raise
            # no lock file and none can be made: a study on a read-only mount, or a
            # colleague's that this user cannot write, is read without one (no run of
            # this user can rewrite it meanwhile)
            log.warning(
                "%s is read without a lock: %s cannot be made (%s) in the read-only folder %s",
                what,
                self.path,
                e.strerror or e,
                self.path.parent.parent,
            )
            return self
        self._clear_stale(everyone=False)
        self._write_record("reads", by or "a run")
        return self

    def _take(self, mode: int, message) -> int:
        """flock the file in ``mode`` without waiting; StageBusyError(message()) when
        another holder keeps it. Returns the held descriptor.

        A shared lock is taken on a read-only descriptor when the file exists (flock
        needs no write access): a colleague's lock file, or one on a read-only
        mount, can be read-locked by anyone who can read it. A new file is made
        ``0o666`` less the umask, so a group-shared experiment stays usable by
        the group (it was ``0o644`` whatever the umask).
        """
        fd = None
        if mode == fcntl.LOCK_SH:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                pass
        if fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StageBusyError(message()) from None
        self._fd = fd
        return fd

    # -- holder records ---------------------------------------------------------

    def _write_record(self, mode: str, by: str) -> None:
        """Leave this holder's record; best effort (a folder this user may not write
        holds none: the lock works without it, only the message names less)."""
        rec = {
            "host": HOST,
            "pid": os.getpid(),
            "mode": mode,
            "by": by,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        path = self.holders_dir / f"{HOST}-{os.getpid()}-{uuid.uuid4().hex[:6]}.json"
        try:
            self.holders_dir.mkdir(exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec))
            tmp.rename(path)  # a reader never sees half a record
        except OSError as e:
            if e.errno not in _NO_WRITE:
                raise
            return
        self._record = path

    def _records(self) -> list[tuple[Path, dict]]:
        out = []
        try:
            files = sorted(self.holders_dir.glob("*.json"))
        except OSError:
            return out
        for f in files:
            try:
                rec = json.loads(f.read_text())
                int(rec["pid"]), str(rec["host"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # removed meanwhile, or not a record
            out.append((f, rec))
        return out

    def _clear_stale(self, everyone: bool) -> None:
        """Remove the records of holders that have ended (``everyone``: all others,
        since this process holds the lock exclusively); best effort."""
        for f, rec in self._records():
            if everyone or not _alive(rec["host"], int(rec["pid"])):
                try:
                    f.unlink()
                except OSError:
                    pass

    def holders(self) -> list[dict]:
        """The live holders' records (``host``, ``pid``, ``mode``: reads/writes, ``by``,
        ``since``); when none is found, the pid the lock file holds if that process
        runs (a holder of a version that wrote no record)."""
        live = [rec for _, rec in self._records() if _alive(rec["host"], int(rec["pid"]))]
        if live:
            return live
        try:
            words = self.path.read_text(errors="replace").split()
        except OSError:
            words = []
        if words and words[0].isdigit():
            host = words[1] if len(words) > 1 else HOST
            if _alive(host, int(words[0])):
                return [{"host": host, "pid": int(words[0]), "mode": "writes", "by": self.label}]
        return []

    def _who(self) -> str:
        """Who holds the lock: the writer, or the runs reading the folder."""
        found = self.holders()
        writers = [h for h in found if h.get("mode") == "writes"]
        readers = [h for h in found if h.get("mode") != "writes"]
        if writers:
            w = writers[0]
            # "is running (pid N)" first: scripts and tests match it
            who = f"{self.label} is running (pid {w['pid']}) on host {w['host']}"
            who += f", since {w['since']}" if w.get("since") else ""
            who += ", writing its folder"
            if w.get("by") and w["by"] != self.label:  # held up front by stage=all
                who += f" as part of {w['by']}"
        elif readers:
            who = f"{self.label} cannot be written now: a running stage is reading its outputs: "
            who += "; ".join(f"{h.get('by') or 'a run'} ({describe(h)})" for h in readers)
        else:
            who = (
                f"{self.label} is in use by another process that left no record (a run of "
                f"an older version, or one that could not write {self.holders_dir})"
            )
        return who

    def writer_elsewhere(self) -> dict | None:
        """The record of the process writing this folder now, else None (free, or only
        read). Takes no lock that outlives the call."""
        if self.path in _RUN_HELD or not self.path.exists():
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            writers = [h for h in self.holders() if h.get("mode") == "writes"]
            return writers[0] if writers else {"host": HOST, "pid": None, "by": self.label}
        except OSError:
            return None
        finally:
            os.close(fd)  # closing drops a lock taken just now
        return None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            rec, self._record = self._record, None
            if rec is not None:
                try:
                    rec.unlink()
                except OSError:
                    pass
            if self._exclusive:
                self._exclusive = False
                try:
                    os.ftruncate(fd, 0)  # the pid of a run that had ended misled the message
                except OSError:
                    pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def held_elsewhere(self) -> bool:
        """True when another process holds the lock now (this one does not take it)."""
        if self.path in _RUN_HELD or not self.path.exists():
            return False
        # read-write where allowed (NFS emulates flock with byte-range locks, and an
        # exclusive one needs a descriptor open for writing), else read-only: a
        # colleague's lock file may not be writable by this user
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            if e.errno not in _NO_WRITE:
                raise
            fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # cannot be told (EBADF on such a file system): taken as held
            return True
        finally:
            os.close(fd)  # closing drops a lock taken just now
        return False

    def __enter__(self) -> StageLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def held_for_run(path: Path) -> bool:
    """Whether this process holds lock ``path`` for its whole run (:func:`hold_for_run`)."""
    return Path(path).absolute().resolve() in _RUN_HELD


@contextmanager
def hold_for_run(
    writes: list[StageLock], reads: list[tuple[StageLock, str]], by: str, context: str
) -> Iterator[None]:
    """Hold the locks of every folder a multi-stage run writes (exclusive) and reads
    from outside it (shared) until the block ends, or refuse before any is kept.

    ``stage=all overwrite=true`` took each stage's lock only when it reached it: an
    audit's run rewrote simulate, segment_train, segment and expression, then met
    a running ``stage=train`` at pair and stopped, the experiment left mixed.

    Raises
    ------
    StageBusyError
        One or more folders are in use; the message names every holder, prefixed by
        ``context``.
    """
    busy: list[str] = []
    mine = {lock.path for lock in writes}
    # (lock, how it is taken): a folder the run writes is not also read-locked
    takes = [(lock, partial(lock.acquire, by)) for lock in writes]
    takes += [
        (lock, partial(lock.acquire_shared, what, by))
        for lock, what in reads
        if lock.path not in mine
    ]
    with ExitStack() as stack:
        for lock, take in takes:
            if lock.path in _RUN_HELD:
                continue
            try:
                stack.callback(take().release)
            except StageBusyError as e:
                busy.append(str(e))
                continue
            _RUN_HELD[lock.path] = lock
            stack.callback(_RUN_HELD.pop, lock.path, None)
        if busy:
            raise StageBusyError(f"{context}: " + " | ".join(busy))
        yield


def stage_lock(run_dir: Path, stage: str, variant: str, experiment: str) -> StageLock:
    """The lock of one stage folder (``variant`` may be empty)."""
    key = stage + (f"__{variant.replace('/', '__')}" if variant else "")
    label = f"stage={stage}" + (f" variant={variant}" if variant else "")
    return StageLock(
        Path(run_dir) / ".locks" / f"{key}.lock", f"{label} of experiment {experiment}"
    )


def producer_lock(path: Path) -> StageLock | None:
    """The lock of the stage folder that wrote ``path``, or None (a file of no stage).

    The folder is the nearest one above ``path`` (or ``path`` itself) that holds a
    ``manifest.json`` naming its stage; the experiment is the folder above that stage's
    folder, and must hold the ``.locks`` folder runs make. Works for another
    experiment's files too (``paths.inputs.*``); ``stage=embed``'s study and data
    folders (``embed.*``) are not stage inputs and are not locked.
    """
    from pipeline.artifacts import MANIFEST, read_manifest

    p = Path(path).resolve()
    if not p.exists():
        # in a stage folder that is not there now (moved aside by a run rewriting it, or
        # never made): its lock by the folder's name, where its experiment has locks, so
        # a reader is told of the writer instead of the folder missing
        from pipeline.runner import EXTRA_STAGES, ORDER

        for top in [p, *p.parents]:
            if top.exists():
                break  # an existing folder above: its manifest says whose it is
            if top.name in ORDER + EXTRA_STAGES and (top.parent / ".locks").is_dir():
                return stage_lock(top.parent, top.name, "", top.parent.name)
    for d in [p, *p.parents]:
        if not (d / MANIFEST).is_file():
            continue
        stage = str((read_manifest(d) or {}).get("stage") or "")
        top = next((a for a in [d, *d.parents] if a.name == stage), None)
        if not stage or top is None or not (top.parent / ".locks").is_dir():
            return None
        variant = "/".join(d.relative_to(top).parts)
        return stage_lock(top.parent, stage, variant, top.parent.name)
    return None
