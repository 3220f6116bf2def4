"""An exclusive lock per stage folder, held for the whole stage.

Two runs of the same stage of one experiment would otherwise interleave: with
``overwrite=true`` both move the old folder aside and the survivor mixes files of
both runs. The lock is ``fcntl.flock`` on ``<experiment>/.locks/<stage>[__<variant>].lock``;
the kernel drops it when the process ends, however it ends (a killed run never
leaves a stale lock). The file holds the holder's pid for the message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pipeline.runner import StageError


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StageBusyError(
                f"{self.label} is running (pid {pid}); wait for it to finish, or use "
                f"another experiment=NAME (lock: {self.path})"
            ) from None
        # the pid is written only while holding the lock, so a reader sees the holder's
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def held_elsewhere(self) -> bool:
        """True when another process holds the lock now (this one does not take it)."""
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
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
