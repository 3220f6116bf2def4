"""Which code made an output: the record stored in manifests and checkpoints.

The lowest layer of the project (no imports from ``pipeline``, ``segmentation`` or
``vae``), so both libraries and the pipeline can stamp what they write with it.
A study read months later, or by another version, then says which code made it:
the same old model gives other numbers under newer code, and without this record
nothing told the two apart.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["DISTRIBUTION", "code_label", "code_record", "newer_checkpoint_problem"]

# the installed distribution's name (pyproject.toml, [project] name)
DISTRIBUTION = "wbc-pipeline"

# libraries whose version changes results (numerics, file formats); read from the
# installed metadata, so none of them is imported here
# (distribution names, as pip knows them; one not installed is recorded as None)
LIBRARIES = (
    "torch",
    "torchvision",
    "numpy",
    "anndata",
    "scanpy",
    "albumentations",
    "scikit-learn",
    "umap-learn",
    "leidenalg",
    "scipy",
    "scikit-image",
    "Pillow",
    "opencv-python",
    "opencv-python-headless",
)

# at most this many changed/untracked .py file names in a record (a checkout with
# thousands of stray files must not bloat every manifest)
MAX_CHANGED_FILES = 50

# git answers in milliseconds; a hung network file system must not hold up a stage
GIT_TIMEOUT_S = 3.0

# the folder that holds the ``segmentation``, ``vae`` and ``pipeline`` packages
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_bytes(*args: str) -> bytes | None:
    """Raw stdout of ``git -C SOURCE_ROOT ARGS``, or None when git is missing, slow, or
    fails (not a checkout, a colleague's checkout git refuses, ...)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(SOURCE_ROOT), *args],
            capture_output=True,
            timeout=GIT_TIMEOUT_S,
            # read-only: `git status` must not take index.lock in a checkout another
            # process (an editor, a second run) is using
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git(*args: str) -> str | None:
    """:func:`_git_bytes` as stripped text."""
    out = _git_bytes(*args)
    return None if out is None else out.decode("utf-8", "replace").strip()


def _git_state() -> dict[str, Any]:
    """Revision, uncommitted changes and what they are, of the checkout the packages
    were imported from: ``git_revision``, ``git_dirty``, and where git answers,
    ``git_diff_sha256`` (sha256 of ``git diff HEAD``: tracked changes, so two runs of
    one revision with other edits differ here) and ``git_changed_py`` (the modified or
    untracked ``.py`` files, sorted, at most :data:`MAX_CHANGED_FILES`, then
    ``"... N more"``). Revision and dirty are None when they were not imported from
    a checkout; the other two are then absent."""
    none: dict[str, Any] = {"git_revision": None, "git_dirty": None}
    top = _git("rev-parse", "--show-toplevel")
    # an installed copy inside some other repository (a venv in a checkout) is not
    # that repository's code
    if top is None or Path(top).resolve() != SOURCE_ROOT:
        return none
    rev = _git("rev-parse", "HEAD")
    if rev is None:  # a checkout without commits
        return none
    status = _git("status", "--porcelain", "--untracked-files=no")
    out: dict[str, Any] = {
        "git_revision": rev,
        "git_dirty": None if status is None else bool(status),
    }
    diff = _git_bytes("diff", "HEAD", "--no-ext-diff", "--no-color")
    if diff is not None:
        out["git_diff_sha256"] = hashlib.sha256(diff).hexdigest()
    names = _git_bytes("status", "--porcelain", "-z", "--untracked-files=all", "--", "*.py")
    if names is not None:
        # -z entries: "XY path"; a rename adds its old path as the next entry
        entries = names.decode("utf-8", "replace").split("\0")
        changed, skip = [], False
        for e in entries:
            if skip:
                skip = False
                continue
            if len(e) > 3:
                changed.append(e[3:])
                skip = e[0] in "RC"
        changed = sorted(set(changed))
        extra = len(changed) - MAX_CHANGED_FILES
        out["git_changed_py"] = changed[:MAX_CHANGED_FILES] + (
            [f"... {extra} more"] if extra > 0 else []
        )
    return out


@functools.lru_cache(maxsize=1)
def _record() -> dict[str, Any]:
    return {
        "package": DISTRIBUTION,
        "version": _version(DISTRIBUTION) or "unknown",
        **_git_state(),
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


def code_record() -> dict[str, Any]:
    """Which code this process runs, as plain data (JSON- and ``weights_only``-safe).

    Computed once per process (git is asked once); each call returns a fresh copy, so
    a caller may extend it.

    Returns
    -------
    dict
        ``package`` (distribution name), ``version`` (installed version, or
        ``"unknown"``), ``git_revision`` (full hash of the checkout the packages were
        imported from; None for an installed copy or when git is unavailable),
        ``git_dirty`` (tracked files changed since that revision; None when unknown),
        where git answers ``git_diff_sha256`` (sha256 of ``git diff HEAD``) and
        ``git_changed_py`` (modified/untracked ``.py`` files, at most
        :data:`MAX_CHANGED_FILES`), ``python``, and ``libraries``: the installed version
        of each of :data:`LIBRARIES` (None where not installed).
    """
    return copy.deepcopy(_record())


def code_label(record: Any) -> str:
    """One-line name of a :func:`code_record`, e.g. ``0.2.0, git 1a2b3c4d5e6f
    (uncommitted changes)``; ``code not recorded`` for a missing or foreign record."""
    if not isinstance(record, dict):
        return "code not recorded"
    text = str(record.get("version", "unknown"))
    rev = record.get("git_revision")
    if rev:
        text += f", git {str(rev)[:12]}"
        if record.get("git_dirty"):
            text += " (uncommitted changes)"
    return text


def newer_checkpoint_problem(
    ckpt: dict[str, Any], own_format: int, unknown_args: list[str] | tuple[str, ...] = ()
) -> str | None:
    """Why a checkpoint needs a newer version of this package to be read; None if not.

    Parameters
    ----------
    ckpt
        The loaded checkpoint payload; ``format_version`` missing means format 0 (written
        before formats were numbered).
    own_format
        The format this code writes and reads for that kind of checkpoint.
    unknown_args
        ``model_args`` keys this code's architecture does not take (a newer version
        added them).

    Returns
    -------
    str or None
        The reason, to follow ``PATH: ``.
    """
    fmt = ckpt.get("format_version", 0)
    newer = isinstance(fmt, int) and fmt > own_format
    if not newer and not unknown_args:
        return None
    here = code_record()
    made = f"format {fmt}, {code_label(ckpt.get('code'))}; this is format {own_format}, "
    made += code_label(here)
    if newer:
        why = f"written by a newer version of {DISTRIBUTION} ({made})"
        if unknown_args:
            why += (
                f": its model_args hold {', '.join(unknown_args)}, which this version does not know"
            )
        return why + ". Upgrade the package to read it."
    # not a newer format: settings this code does not take, from a version that had them
    # for a while (e.g. align_pose, 2026-11-30) or a newer one that did not renumber
    return (
        f"its model_args hold {', '.join(unknown_args)}, which this version of "
        f"{DISTRIBUTION} does not take ({made}): it was written by another version, "
        f"older or newer; read it with that version, or train the study again"
    )
