"""Progress bars for the long loops (segment_train, segment, train, evaluate).

One policy for every library loop: a ``tqdm`` bar with rate and ETA on stderr
when stderr is a terminal, nothing when it is not (CI, files, pipes), so logs
stay clean there; the per-epoch one-line summaries go through ``logging`` and
show in both cases. ``WBC_PROGRESS=1`` forces bars, ``WBC_PROGRESS=0`` hides them.
Only rank 0 of a DDP run should pass ``enabled=True``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def bars_on() -> bool:
    """Whether bars are shown: ``WBC_PROGRESS`` when set, else stderr is a terminal."""
    env = os.environ.get("WBC_PROGRESS", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(
    iterable: Iterable | None = None,
    desc: str = "",
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    leave: bool = False,
    **kw: Any,
) -> tqdm:
    """A ``tqdm`` bar (rate, ETA) that is silent unless :func:`bars_on` and ``enabled``.

    Parameters
    ----------
    iterable
        Wrapped like ``tqdm(iterable)``; ``None`` for a manual bar (``.update(n)``).
    desc, total, unit
        As in ``tqdm``.
    enabled
        ``False`` on DDP ranks other than 0.
    leave
        Keep the finished bar on screen (outer bars); inner bars disappear.

    >>> b = bar(range(3), enabled=False)
    >>> sum(b), b.disable
    (3, True)
    """
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=leave,
        disable=not (enabled and bars_on()),
        dynamic_ncols=True,
        **kw,
    )


class Steps:
    """A bar over the named sections of a long function (``evaluate``, ``traverse``).

    ``steps("name")`` marks the previous section done and shows ``name``;
    ``close()`` marks the last one done.

    >>> st = Steps("evaluate", 2, enabled=False)
    >>> st("latent structure"); st("UMAP"); st.close(); st.done
    2
    """

    def __init__(self, desc: str, total: int, enabled: bool = True):
        self.bar = bar(desc=desc, total=total, unit="step", enabled=enabled)
        self._open = False
        self.done = 0  # sections finished (a disabled tqdm does not count)

    def __call__(self, name: str) -> None:
        if self._open:
            self.bar.update(1)
            self.done += 1
        self._open = True
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        if self._open:
            self.bar.update(1)
            self.done += 1
            self._open = False
        self.bar.close()


def redirect_logging():
    """Context in which console log lines print above the bars instead of through them.

    ``tqdm.contrib.logging.logging_redirect_tqdm`` when bars are on, else a no-op.
    """
    import contextlib

    if not bars_on():
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()
