"""Check ``experiment`` and ``variant`` before any folder is made from them.

Both become folder names under ``paths.root``; a value such as ``../x`` or
``/abs/path`` would write outside the run directory, and ``variant=../expression``
with ``overwrite=true`` would replace a sibling stage. Only one or more plain path
components are accepted.
"""

from __future__ import annotations

import re

# letters, digits and the characters sweep folder names use (vae.beta=4,trainer.lr=0.1)
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,=+@%:-]*")


class BadNameError(ValueError):
    """``experiment`` or ``variant`` is not a plain relative path."""


def check_run_name(value: str, setting: str, *, allow_empty: bool = False) -> str:
    """Return ``value`` if it is one or more plain path components, else raise.

    Parameters
    ----------
    value
        The setting's value, e.g. ``"demo"`` or ``"study/beta4"``.
    setting
        Its name in messages (``experiment`` or ``variant``).
    allow_empty
        ``variant=""`` means "no sub-folder".

    Raises
    ------
    BadNameError
        Absolute, ``..`` or ``.`` components, empty components, a leading dot
        (hidden names are the runner's own: locks, backups) or other characters.
    """
    value = "" if value is None else str(value)
    if value == "" and allow_empty:
        return value
    why = None
    if value == "":
        why = "it is empty"
    elif value.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:", value):
        why = "it is an absolute path"
    else:
        for part in value.split("/"):
            if part in ("", ".", ".."):
                why = (
                    f"it has a {part or 'empty'!r} path component"
                    if part
                    else ("it has an empty path component (// or a trailing /)")
                )
                break
            if not _COMPONENT.fullmatch(part):
                why = (
                    f"component {part!r} must start with a letter, digit or _ and use only "
                    f"letters, digits and _ . , = + @ % : -"
                )
                break
    if why:
        raise BadNameError(
            f"{setting}={value!r} is not allowed: {why}. It names a folder inside "
            f"paths.root; use one or more plain names such as {setting}=study1 or "
            f"{setting}=study1/beta4 (to write elsewhere, set paths.root=DIR)."
        )
    return value


def check_argv(argv: list[str]) -> str | None:
    """The message for a bad ``experiment=`` / ``variant=`` on the command line, else None.

    Checked before Hydra starts, so nothing (not even Hydra's own ``.hydra`` folder)
    is created for a bad name.
    """
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in ("experiment", "variant"):
            continue
        multirun = "-m" in argv or "--multirun" in argv
        values = value.split(",") if multirun else [value]
        for v in values:
            try:
                check_run_name(v.strip("'\""), key, allow_empty=key == "variant")
            except BadNameError as e:
                return str(e)
    return None
