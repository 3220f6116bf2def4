"""What :class:`vae.api.Study` and the mixins it is built of share: the error they raise
(:class:`StudyError`), the logger they write to and the small readers more than one of
them uses.

:class:`vae.api.Study` is the public class, and ``vae.api`` re-exports
:class:`StudyError`; this module exists so that :mod:`vae.api` and the mixin modules
(:mod:`vae.study_read`, :mod:`vae.study_prepare`, :mod:`vae.study_seen`,
:mod:`vae.study_atypical`) import these without importing each other.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

# every part of Study logs as the public module it is used through (stage logs name it)
log = logging.getLogger("vae.api")

# why a study's paired data cannot be read, when it names none
NO_PAIRED = "no paired.h5ad it was trained on is known (meta 'source')"


class StudyError(ValueError):
    """The study or a query input does not fit; the message names the file and field."""


def _flag(obs: pd.DataFrame, col: str, source: str) -> np.ndarray:
    """(N,) bool ``obs[col]`` (``has_image`` / ``has_expression``) read strictly
    (:func:`vae.data.parse_flag`: ``astype(bool)`` read the text "False" as True);
    a value that is no flag raises StudyError naming ``source`` and the row."""
    from vae.data import PairedDataError, parse_flag

    try:
        return parse_flag(obs[col], source, col, obs.index)
    except PairedDataError as e:
        raise StudyError(str(e)) from None


def _file_stamp(path) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file, None when there is none (or no path)."""
    try:
        st = Path(path).stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_size, st.st_mtime_ns)
