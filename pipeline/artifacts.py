"""Atomic writes and stage manifests: the contract between stages.

Every stage writes its outputs under a temporary name and renames them into
place only when complete, so a crash never leaves a half-written artifact
behind. Each stage folder holds ``manifest.json`` that records what was read
and written (paths, sizes, modification times) and the hash of the resolved
config, so a later stage can refuse a missing, unfinished or stale input with
a message that says which stage to run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

# one atomic writer and one CSV quoting for every package (libraries cannot import
# pipeline: vae/analysis writes evaluate's CSVs)
from segmentation.io import (  # noqa: E402
    FORMULA_START,
    MANIFEST,
    atomic_path,
    spreadsheet_safe,
)
from segmentation.provenance import code_record  # noqa: E402

__all__ = ["FORMULA_START", "MANIFEST", "atomic_path", "spreadsheet_safe"]


class StageInputError(RuntimeError):
    """An input artifact is missing, unfinished or stale."""


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Size and modification time of a file, or of all files in a folder."""
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        mtime = max((f.stat().st_mtime for f in files), default=p.stat().st_mtime)
        return {"path": str(p), "kind": "dir", "files": len(files), "bytes": size, "mtime": mtime}
    st = p.stat()
    return {"path": str(p), "kind": "file", "bytes": st.st_size, "mtime": st.st_mtime}


def config_hash(resolved: dict[str, Any]) -> str:
    """Short stable hash of a resolved config (dict), without ``paths.root``: where the
    outputs go changes no result, so one study run in two folders has one hash (the
    inputs, ``paths.inputs.*``, stay in it)."""
    paths = resolved.get("paths") if isinstance(resolved, dict) else None
    if isinstance(paths, dict) and "root" in paths:
        resolved = {**resolved, "paths": {k: v for k, v in paths.items() if k != "root"}}
    blob = json.dumps(resolved, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def command_overrides() -> list[str] | None:
    """The Hydra overrides this run was given on the command line (e.g.
    ``["stage=train", "experiment=demo", "vae.beta=4"]``), or None outside a Hydra run
    (a stage called from Python). ``python -m pipeline <overrides>`` reruns it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        return [str(o) for o in HydraConfig.get().overrides.task]
    except Exception:  # noqa: BLE001 - a record, never a reason to fail a stage
        return None


class Manifest:
    """Record of one stage run: inputs, outputs, config, status, timing, and the code
    and torch threads that ran it."""

    def __init__(self, stage_dir: Path, stage: str, resolved_config: dict[str, Any]):
        self.path = Path(stage_dir) / MANIFEST
        self.experiment = experiment_dir(resolved_config)
        self.data: dict[str, Any] = {
            "stage": stage,
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "finished": None,
            "config_hash": config_hash(resolved_config),
            "inputs": {},
            "outputs": {},
            "config": resolved_config,
            # the command line's overrides: `python -m pipeline <overrides>` reruns it
            # (docs/artifacts.md "Rerunning a stage from its manifest")
            "overrides": command_overrides(),
            # which code ran the stage (git asked once per process), so two results
            # that differ can be told apart by the code that made them
            "code": code_record(),
            # intra-op threads the stage ran with, set by the runner once its process
            # layout is decided (None until then, or when it failed before)
            "torch_threads": None,
        }

    def add_input(self, name: str, path: Path) -> None:
        """Record input ``name``: its :func:`describe` entry, and, for one inside this
        run's experiment folder, also its place there (``in_experiment``), so a moved or
        copied experiment compares its own files (:func:`recorded_input_path`)."""
        rec = describe(path)
        inside = in_experiment(path, self.experiment)
        if inside is not None:
            rec["in_experiment"] = inside
        self.data["inputs"][name] = rec

    def add_output(self, name: str, path: Path) -> None:
        self.data["outputs"][name] = describe(path)

    def save(self) -> None:
        write_json(self.path, self.data)

    def finish(self, status: str = "complete") -> None:
        self.data["status"] = status
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.save()


def experiment_dir(resolved: dict[str, Any] | None) -> Path | None:
    """``<paths.root>/<experiment>`` of a resolved config (a manifest's ``config``), or
    None where it does not say."""
    if not isinstance(resolved, dict):
        return None
    root = (resolved.get("paths") or {}).get("root")
    exp = resolved.get("experiment")
    if root in (None, "") or exp in (None, ""):
        return None
    return Path(str(root)) / str(exp)


def in_experiment(path: str | os.PathLike, experiment: str | os.PathLike | None) -> str | None:
    """``path`` relative to the ``experiment`` folder (POSIX, e.g. ``simulate/smears``),
    or None when it lies outside it (or ``experiment`` is None).

    Both are made absolute against the current folder (a relative ``paths.root`` is
    cwd-relative); links are not resolved, so an input given through a link to
    elsewhere stays outside.
    """
    if experiment is None:
        return None
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(experiment))
    except ValueError:  # Windows: another drive
        return None
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return None
    return Path(rel).as_posix()


def recorded_input_path(
    rec: dict[str, Any], man: dict[str, Any], experiment: str | os.PathLike | None = None
) -> Path:
    """Where an input recorded in manifest ``man`` is now.

    Parameters
    ----------
    rec : the input's entry of ``man["inputs"]``
    man : the manifest (its ``config`` says the experiment folder it was written in)
    experiment : the experiment folder the manifest is read in now (None: where it was
        written)

    Returns
    -------
    Path
        An input inside the experiment, in ``experiment`` (a moved or copied
        experiment reads its own files, not the original's); one outside, its recorded
        absolute path. A manifest written before ``in_experiment`` was recorded (path
        only) is placed by its own config's experiment folder.
    """
    path = Path(str(rec.get("path", "")))
    if experiment is None:
        return path
    rel = rec.get("in_experiment")
    if rel is None:  # an older manifest: inside the folder it was written in?
        rel = in_experiment(path, experiment_dir(man.get("config")))
    return Path(experiment) / rel if rel is not None else path


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    p = Path(stage_dir) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise StageInputError(f"{p}: manifest is not valid JSON ({e})") from e


def check_fresh(path: Path, manifest: dict[str, Any], name: str) -> None:
    """Refuse an artifact that changed after its producing stage recorded it."""
    rec = manifest.get("outputs", {}).get(name)
    if rec is None:
        return
    now = describe(path)
    if now["bytes"] != rec["bytes"]:
        raise StageInputError(
            f"{path} is stale: its size changed since stage '{manifest['stage']}' wrote it "
            f"({rec['bytes']} -> {now['bytes']} bytes). Re-run stage={manifest['stage']}."
        )


def shipped_default(name: str) -> tuple[Path | None, str]:
    """The package's own file for artifact ``name`` when no run produced it.

    Only ``segmentation_model`` has one: the shipped real-data detector
    (segmentation/shipped.py). Returns ``(path or None, message suffix)``; the
    suffix names a shipped file that should exist but does not.
    """
    if name != "segmentation_model":
        return None, ""
    from segmentation.shipped import SHIPPED_DETECTOR

    if SHIPPED_DETECTOR.is_file():
        logging.getLogger(__name__).info(
            # short: it is the first line of "your own smears" (how the scale is chosen
            # is the stage's own 'input_scale=' / 'magnification measured' line)
            "segmentation_model: no segment_train run, so the detector shipped with the "
            "package: %s (paths.inputs.segmentation_model=PATH or stage=segment_train "
            "replaces it)",
            SHIPPED_DETECTOR,
        )
        return SHIPPED_DETECTOR, ""
    return None, (
        f" The shipped detector {SHIPPED_DETECTOR}, used otherwise, is missing "
        f"(a broken install: reinstall the package)."
    )


# ``segmentation.pretrained_weights`` value that names the shipped detector, so a
# preset can start from it without a machine-specific path
SHIPPED_WEIGHTS = "shipped"


def pretrained_weights_path(value: str | None) -> Path | None:
    """File behind ``segmentation.pretrained_weights``: ``shipped`` -> the package's detector.

    Parameters
    ----------
    value
        The setting: ``None`` (train from scratch), ``"shipped"`` or a local path.
    """
    if not value:
        return None
    if str(value).strip().lower() == SHIPPED_WEIGHTS and not Path(value).exists():
        from segmentation.shipped import SHIPPED_DETECTOR

        return SHIPPED_DETECTOR
    return Path(value)
