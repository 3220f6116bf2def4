"""An exclusive lock per stage folder, held for the whole stage, and shared locks on
the stage folders it reads.

Two runs of the same stage of one experiment would otherwise interleave: with
``overwrite=true`` both move the old folder aside and the survivor mixes files of
both runs. The lock is ``fcntl.flock`` on ``<experiment>/.locks/<stage>[__<variant>].lock``;
the kernel drops it when the process ends, however it ends (a killed run never
leaves a stale lock). The file holds the exclusive holder's pid for the message.

A running stage also holds a *shared* lock on the folder of every input another stage
of an experiment wrote (:func:`producer_lock`): a stage cannot start to rewrite a
folder a running stage is reading, nor start to read one being rewritten. Without
it an audit's ``stage=simulate overwrite=true`` replaced the smears a running
``stage=segment`` was reading (76 of 120 images "unreadable", the run marked
complete), and a second ``stage=all`` of the same experiment rewrote the first one's
inputs under it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from pipeline.runner import StageError

log = logging.getLogger(__name__)

# why a lock file cannot be made or written: a read-only mount, no permission
_NO_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)


class StageBusyError(StageError):
    """Another process holds the lock of this stage folder."""


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
        self.path = Path(path)
        self.label = label
        self._fd: int | None = None

    def acquire(self) -> StageLock:
        """Take the lock exclusively (the stage writes its folder).

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
                # only a writer records its pid: if that run has ended, a reader holds it
                lambda pid: (
                    f"{self.label} is running (pid {pid}), or, if that process has ended, a "
                    f"running stage is reading its outputs; wait for it to finish, or use "
                    f"another experiment=NAME (lock: {self.path})"
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
        # the pid is written only while holding the lock, so a reader sees the holder's
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def acquire_shared(self, what: str) -> StageLock:
        """Take the lock shared (readers only exclude writers); ``what`` names the
        input in the message when the folder is being written now."""
        try:
            self._take(
                fcntl.LOCK_SH,
                lambda pid: (
                    f"{what} is being written: {self.label} is running (pid {pid}); "
                    f"wait for it to finish (lock: {self.path})"
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

    def _take(self, mode: int, message) -> int:
        """flock the file in ``mode`` without waiting; StageBusyError(message(pid))
        when another holder keeps it. Returns the held descriptor.

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
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StageBusyError(message(pid)) from None
        self._fd = fd
        return fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def held_elsewhere(self) -> bool:
        """True when another process holds the lock now (this one does not take it)."""
        if not self.path.exists():
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
