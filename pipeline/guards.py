"""Checks the runner makes before a stage folder is touched.

- :func:`check_start`: ``experiment``/``variant`` names, numeric ranges and the
  requested hardware, once per run, before any folder exists.
- :func:`probe_inputs`: checkpoint inputs load with ``weights_only=True`` (and are
  refused otherwise) and ``.h5ad`` inputs open as HDF5, before the stage folder
  is prepared, so a wrong or truncated file is one message, not a traceback.
- :func:`check_resume`: ``resume=true`` continues only a run with the same
  settings that shape the model and the loss (named when they differ).
- :func:`start_run`, :func:`report_crash`, :func:`log_traceback`: what
  ``runner.main`` does first, and how an unexpected error becomes one line on the
  console with its traceback in ``<stage>.log``.

Guarantees and the faults tried: docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import StageInputError, describe, read_manifest, recorded_input_path
from pipeline.runner import StageError, run_dir, stage_dir

log = logging.getLogger(__name__)

# stages that write a checkpoint and continue from it with resume=true
RESUMABLE = {"train": "last.pt", "segment_train": "model.pt"}

# settings that must not change when a run is resumed: the model, the loss, the
# optimiser and the data split. What is allowed to change: epoch limits
# (max_epochs, stop_after_epochs, max_minutes), logging, hardware, paths.
RESUME_SETTINGS: dict[str, list[str]] = {
    "train": [
        "vae",
        "trainer.batch_size",
        "trainer.lr",
        "trainer.weight_decay",
        "trainer.lr_schedule",
        "trainer.lr_warmup_epochs",
        "trainer.grad_clip",
        "trainer.val_fraction",
        "trainer.test_fraction",
        "trainer.split_by",
        "trainer.split_from",
        # the held-out kinds move their rows to the test split: a resume keeps split.csv
        "trainer.exclude_labels",
        "trainer.augment",
        "trainer.stain_jitter",
        "trainer.rotate",
        "trainer.ema_epochs",
        "seed",
    ],
    "segment_train": [
        *(
            f"segmentation.{k}"
            for k in (
                "arch pretrained_weights trainable_backbone_layers min_size max_size "
                "anchor_sizes fpn_channels box_representation mask_head_layers "
                "rpn_pre_nms_top_n_train rpn_post_nms_top_n_train rpn_pre_nms_top_n_test "
                "rpn_batch_size_per_image box_batch_size_per_image cell_px mask_mode "
                "pseudo_method copy_paste copy_paste_max max_train_images aug_flips aug_rot90 "
                "aug_scale aug_crop aug_border_crop aug_cut_cell aug_color aug_stain aug_blur aug_noise epochs "
                "train_batch_size optimizer lr momentum weight_decay warmup_iters schedule "
                "grad_clip"
            ).split()
        ),
        "data.name",
        "data.smear_sources",
        "seed",
    ],
}

# a resume setting added after runs were started: the value that does what the code did
# before the setting existed (the commit that added it, and its date). A run whose
# recorded config lacks the key resumes when the new value is this one (the checkpoint was
# trained exactly so); any other value, or a missing key not listed here, is refused as a
# change, naming the override that restores this value.
LEGACY_VALUES: dict[str, Any] = {
    # 2026-11-29 (fd3f5a2): before them, the plain image arch, no spectral term, no free
    # bits, no stain jitter
    "vae.image_arch": "plain",
    "vae.texture_noise": False,  # 2026-11-29 (5192a37): no per-pixel noise
    "vae.spectral_weight": 0.0,
    "vae.free_bits": 0.0,
    "trainer.stain_jitter": 0.0,
    "vae.classify_weight": 0.0,  # 2026-11-29 (141e075): no label head
    "trainer.rotate": 0.0,  # 2026-11: before it, flips only
    "vae.granule_weight": 0.0,  # 2026-11-30 (ccd542e): no granule layer
    "trainer.split_by": None,  # 2026-11-30 (8da4b2e): split by row
    "trainer.exclude_labels": [],  # 2026-11-30 (4e34d74): every label trained on
    "vae.encode_views": 1,  # 2026-11-30 (afc372b): the crop encoded as given
    "vae.nucleus_weight": 0.0,  # 2026-11-30 (b05d910): no nucleus layer
    "vae.image_input": "rgb",  # 2026-11-30 (1d55406): the encoder read RGB
    "vae.image_encoder": "conv",  # 2026-11-30 (9f6e06e): the conv encoder
    "vae.image_backbone_weights": None,
    "vae.maturation_weight": 0.0,  # 2026-11-30 (ef45047): no maturation head
    "vae.expression_norm": "layer",  # 2026-11-30 (f34eb24): LayerNorm in the MLPs
    "vae.expression_input": "lognorm",  # 2026-11-30 (63bb48a): X, log-normalised
    "vae.nucleus_gap_weight": 0.0,  # 2026-11-30 (b60695e): every nucleus pixel alike
    "vae.nucleus_input_compose": False,  # 2026-11-30 (68c1d53): the decoded nucleus
    "vae.lobe_head": False,  # 2026-11-30 (b6b3fd0): no lobe head
    "vae.encoder_channels": None,  # 2026-12-01 (5ec7388): the decoder's widths
    "vae.view_contrast_weight": 0.0,  # 2026-12-01 (1b7fa2a): one view
    "trainer.ema_epochs": 0.0,  # 2026-12-02: before it, no weight average
    "vae.lobe_deep_valley": None,  # 2026-12-02: before it, the lobe head's counts used one rule
    "vae.size_weight": 0.0,  # 2026-12-02: before it, no size input or head
    "vae.classify_balance": 0.0,  # 2026-12-02: before it, every labelled row counted once
    "vae.classify_noise_q": 0.0,  # 2026-12-03: before it, the label head used cross-entropy
    "vae.view_same_stain": False,  # 2026-12-03: before it, each view drew its own stain jitter
    "vae.texture_weight": 0.0,  # 2026-12-03 (74dfe10): no texture layer
    "trainer.split_from": None,  # 2026-12-03 (70e29f4): the seeded split
    "vae.align_centroid_weight": 0.0,  # 2026-12-04 (4b452a7): no centroid term
    "vae.batch_key": None,  # 2026-12-05: no expression batch covariate
    "vae.cross_texture": True,  # 2026-12-07: the cross-modal image term scored the texture
    "vae.image_batch_key": None,  # 2026-12-07: no image source covariate
    "vae.texture_coarse": False,  # 2026-12-07: the texture layer drew one grain size
    "segmentation.aug_cut_cell": 0.0,  # 2026-12-07: no field cut through a cell
}

# settings added with a feature that read nothing while the feature is off: a run that
# predates them resumes with any value when the feature's switch has its legacy value
# (the maturation head's classes, the view-contrast temperature)
LEGACY_MOOT: dict[str, str] = {
    "vae.maturation_classes": "vae.maturation_weight",
    "vae.view_temperature": "vae.view_contrast_weight",
}


def data_layout(obs, n_genes: int, has_counts: bool, source: str = "paired table") -> Any:
    """What the auto settings of stage=train are resolved from (:func:`resolved_setting`):
    a stand-in for its ``PairedTensors`` built from a table's obs (``has_image``,
    ``has_expression``, read as :func:`vae.data.parse_flag` does: the text "False" is
    False), its gene count and whether it holds counts. ``source``: the table, named in
    the StageError a flag that is not true / false raises."""
    from types import SimpleNamespace

    from vae.data import PairedDataError, parse_flag
    from vae.inputs.schema import HAS_EXPRESSION, HAS_IMAGE

    n = len(obs)

    def flag(col: str) -> np.ndarray:
        if col not in obs:
            return np.zeros(n, bool)
        try:
            return parse_flag(obs[col], source, col, obs.index)
        except PairedDataError as e:
            raise StageError(str(e)) from None

    return SimpleNamespace(
        n=n,  # rows (PairedTensors.n): vae.expression_norm=auto depends on it
        n_genes=int(n_genes),
        has_image=flag(HAS_IMAGE),
        has_expression=flag(HAS_EXPRESSION),
        counts=True if has_counts else None,
        obs_columns=set(obs.columns),
        # the labels vae.maturation_classes is resolved on (None: no label column)
        label_names=_label_names(obs),
    )


def _label_names(obs) -> list[str] | None:
    """The distinct known labels of ``obs["label"]``, sorted; None without the column."""
    from vae.inputs.schema import known_labels

    if "label" not in obs:
        return None
    lab = obs["label"].astype(object).to_numpy()
    return sorted({str(x) for x in lab[known_labels(lab)]})


def _data_layout(inputs: dict) -> Any:
    """:func:`data_layout` of this run's paired input (no crop is read), or None."""
    p = inputs.get("paired")
    if p is None or not Path(p).is_file():
        return None
    try:
        import anndata as ad

        from segmentation.io import blank_as_read
        from vae.inputs.schema import HAS_COUNTS

        a = ad.read_h5ad(p, backed="r")
        try:
            blank_as_read(a)
            counts = "counts" in a.layers and bool(a.uns.get(HAS_COUNTS, True))
            return data_layout(a.obs, a.n_vars, counts, str(p))
        finally:
            a.file.close()
    except Exception:  # noqa: BLE001 - unreadable: the stage names the fault itself
        return None


def resolved_setting(key: str, value: Any, data: Any) -> Any:
    """The value a setting with an automatic choice (``null`` / ``auto``) takes on
    ``data`` (:func:`_data_layout`, or the run's ``PairedTensors``), as
    ``pipeline.train_args`` resolves it; other settings and ``data=None``: ``value``.

    A run recorded ``vae.dropout=0.1`` before the setting became ``null`` (auto, 0.1 where
    the data hold images): compared as set, an unchanged model read as a change.
    """
    if key == "data.smear_sources" and isinstance(value, list):
        # box_review (2026-12-07) empty reads no file: a run recorded before it existed
        # trained on the same labels
        value = [
            {k: v for k, v in s.items() if not (k == "box_review" and not v)}
            if isinstance(s, dict)
            else s
            for s in value
        ]
    if data is None:
        return value
    from pipeline import train_args as T

    if key == "vae.dropout":
        return T.expression_dropout(value, data)
    if key == "vae.expression_norm":
        return T.expression_norm(value, data)
    if key == "vae.expression_input":
        return T.expression_input(value, data)
    if key == "vae.maturation_classes" and getattr(data, "label_names", None) is not None:
        # the axis the classes order on these labels: the default six stages and
        # [promyelocyte,...] (or [Promyelocytes,...]) on labels Promyelocytes... are one
        # axis, not a change (a model trained so, traversed without repeating the list)
        try:
            return T.maturation_axis(list(value or []), data.label_names, say=False)
        except StageError:
            return value
    if key == "trainer.split_by" and value == "specimen":
        # the default column: a table without it is split by row (train.split_groups)
        cols = getattr(data, "obs_columns", None)
        return value if cols is None or value in cols else None
    return value


def override(key: str, value: Any) -> str:
    """``key=value`` as typed on the command line (Hydra's grammar)."""

    def text(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list | tuple):
            return "[" + ",".join(text(x) for x in v) + "]"
        if isinstance(v, str) and (not v or any(c in v for c in " ,[]{}()=:'\"\\")):
            return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return str(v)

    return f"{key}={text(value)}"


# inputs that are checkpoints / AnnData files (probed before the stage starts)
CHECKPOINT_INPUTS = {"segmentation_model": "segmentation model", "model": "vae model"}
H5AD_INPUTS = {"cells", "expression", "paired", "latent", "expression_raw"}
# of those, the ones a folder can be: a 10x matrix folder (expression.input_format=10x_mtx)
FOLDER_INPUTS = {"expression_raw"}


def check_start(cfg: DictConfig) -> None:
    """Names, ranges, hardware and ``resume=true`` with ``overwrite=true`` (refused):
    everything checkable before any folder exists.

    Raises
    ------
    StageError
        Naming the setting and what is wrong with it.
    """
    from pipeline import hardware
    from pipeline.ranges import SettingRangeError, check_ranges

    stage_dir(cfg, "check")  # experiment / variant (pipeline/names.py)
    if cfg.resume and cfg.overwrite:
        # overwrite moved the run aside, then resume found no last.pt and trained from
        # scratch: the run the user asked to continue was dropped (an audit)
        name = cfg.stage.name
        where = (
            f"the runs in {run_dir(cfg)}" if name == "all" else f"the run in {stage_dir(cfg, name)}"
        )
        raise StageError(
            f"resume=true and overwrite=true contradict: resume=true continues {where}, "
            f"overwrite=true starts it over; give one"
        )
    try:
        check_ranges(cfg)
    except SettingRangeError as e:
        raise StageError(str(e)) from None
    try:
        hardware.plan(cfg.hardware)
    except hardware.HardwareError as e:
        raise StageError(str(e)) from None


def probe_inputs(inputs: dict[str, Path], cheap: bool = False) -> None:
    """Open every checkpoint and AnnData input once; a bad file is a StageError.

    Checkpoints are loaded with ``weights_only=True`` (no code from the file
    runs); a segmentation model must also name a detector architecture in its
    ``model_args``. An AnnData input that is a folder is refused (only
    ``expression_raw`` may be one: a 10x matrix folder).
    ``segmentation.pretrained_weights`` is opened by segment_train's own
    settings check, which also compares its weight shapes with the run's.

    ``cheap``: a checkpoint's tensors are memory-mapped, not read (its zip index and
    pickled structure are: the same keys, ``model_args`` and detector checks), for
    ``stage=all``'s precheck (pipeline/precheck.py), which probes every input of the
    chain before the first stage; each stage still probes its own inputs in full.
    """
    from segmentation.io import UnsafeCheckpointError, load_torch_file
    from segmentation.shipped import is_shipped

    checks = [(n, p) for n, p in inputs.items() if n in CHECKPOINT_INPUTS]
    for n, p in checks:
        setting = f"input '{n}' (paths.inputs.{n})"
        if n == "segmentation_model" and is_shipped(p):
            setting = (
                "the shipped detector (used as no segment_train run or "
                "paths.inputs.segmentation_model is given; reinstall the package if it is damaged)"
            )
        try:
            with _mapped_loads(cheap):
                ck = load_torch_file(p, "cpu", setting)
        except UnsafeCheckpointError as e:
            if not cheap:
                raise StageError(str(e)) from None
            try:  # a file is never refused for the mapping alone: a full load decides
                ck = load_torch_file(p, "cpu", setting)
            except UnsafeCheckpointError as full:
                raise StageError(str(full)) from None
        if not (isinstance(ck, dict) and "model" in ck and "model_args" in ck):
            raise StageError(
                f"{setting}={p}: not a {CHECKPOINT_INPUTS[n]} checkpoint of this pipeline "
                f"(it needs the keys 'model' and 'model_args')"
            )
        if n == "segmentation_model":
            # a VAE's model.pt has both keys too: found here, not once the stage's
            # folder exists and the weights fail to fit (the stage imports this anyway)
            from segmentation.model import detector_checkpoint_problem, detector_newer_problem

            newer = detector_newer_problem(ck)
            if newer is not None:  # not "not a detector": a newer version's one
                raise StageError(f"{setting}={p}: {newer}")
            why = detector_checkpoint_problem(ck)
            if why is not None:
                raise StageError(
                    f"{setting}={p}: not a {CHECKPOINT_INPUTS[n]} checkpoint of this "
                    f"pipeline: {why}"
                )
        del ck
    for n, p in inputs.items():
        if n not in H5AD_INPUTS:
            continue
        if p.is_dir() and (n not in FOLDER_INPUTS or p.suffix == ".h5ad"):
            # h5py and anndata report a folder as a garbled IsADirectoryError, and only
            # once the stage folder exists
            raise StageError(
                f"input '{n}' (paths.inputs.{n})={p}: is a directory, expected an .h5ad file"
            )
        if p.is_file() and p.suffix == ".h5ad":
            _probe_h5ad(n, p)


@contextmanager
def _mapped_loads(on: bool) -> Iterator[None]:
    """While ``on``: ``torch.load`` maps the tensors' bytes instead of reading them
    (torch's ``serialization.config.load.mmap``; without it, a full load)."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch < 2.5
        on = False
    if not on:
        yield
        return
    was = config.load.mmap
    config.load.mmap = True
    try:
        yield
    finally:
        config.load.mmap = was


def _probe_h5ad(n: str, p: Path) -> None:
    import h5py

    from segmentation.io import error_line

    if not os.access(p, os.R_OK):  # h5py says "unable to open file" for both
        raise StageError(
            f"input '{n}' = {p}: permission denied (this user may not read it); ask its "
            f"owner to make it readable (chmod g+r), or set paths.inputs.{n}=PATH"
        )
    try:
        with h5py.File(p, "r") as f:
            keys = set(f.keys())
    except OSError as e:
        raise StageError(
            f"input '{n}' = {p}: not a readable .h5ad file (truncated, or not HDF5): "
            f"{error_line(e)}. Re-run the stage that writes it, or set "
            f"paths.inputs.{n}=PATH."
        ) from None
    if "obs" not in keys:
        raise StageError(f"input '{n}' = {p}: an HDF5 file but not AnnData (no 'obs' group)")


_ABSENT = object()


def _select(resolved: dict[str, Any], key: str, absent: Any = None) -> Any:
    """The value at dotted ``key``, or ``absent`` where the config has no such key."""
    node: Any = resolved
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return absent
        node = node[part]
    return node


def _recorded(resolved: dict[str, Any], key: str) -> bool:
    return _select(resolved, key, _ABSENT) is not _ABSENT


def _flat(key: str, v: Any) -> dict[str, Any]:
    if isinstance(v, dict):
        out: dict[str, Any] = {}
        for k, sub in v.items():
            out.update(_flat(f"{key}.{k}", sub))
        return out
    return {key: v}


def resume_settings(resolved: dict[str, Any], name: str) -> dict[str, Any]:
    """The settings of stage ``name`` that a resumed run must share, flattened."""
    out: dict[str, Any] = {}
    for key in RESUME_SETTINGS.get(name, []):
        out.update(_flat(key, _select(resolved, key)))
    return out


def settings_hash(resolved: dict[str, Any], name: str) -> str:
    """Hash of :func:`resume_settings` (recorded in the manifest as ``resume_hash``)."""
    blob = json.dumps(resume_settings(resolved, name), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_resume(cfg: DictConfig, name: str, man: dict[str, Any] | None, inputs: dict) -> None:
    """Refuse ``resume=true`` when a setting that shapes the model or loss changed.

    Parameters
    ----------
    man
        The manifest of the run being resumed (its resolved ``config``).
    inputs
        This run's inputs; one whose size differs from the recorded one is refused.

    Raises
    ------
    StageError
        Listing every changed setting as ``key: old -> new``.
    """
    if name not in RESUMABLE or man is None or "config" not in man:
        return
    now = OmegaConf.to_container(cfg, resolve=True)
    old_s, new_s = resume_settings(man["config"], name), resume_settings(now, name)
    data = _data_layout(inputs) if name == "train" else None
    changed, fixes = [], []
    unfixed = 0  # changes no override given here undoes
    for k in sorted(set(old_s) | set(new_s)):
        old_v = resolved_setting(k, old_s.get(k), data)
        new_v = resolved_setting(k, new_s.get(k), data)
        if old_v == new_v:
            continue
        if not _recorded(man["config"], k):
            # the run was started by a version without this setting
            if k in LEGACY_MOOT:
                switch = LEGACY_MOOT[k]
                if resolved_setting(switch, new_s.get(switch), data) == LEGACY_VALUES[switch]:
                    continue  # its feature is off, as it was: the value reads nothing
                changed.append(f"{k}: not recorded (the run predates it) -> {new_s.get(k)!r}")
                continue  # restoring the switch (listed) restores it
            if k in LEGACY_VALUES:
                if new_v == LEGACY_VALUES[k]:
                    continue
                changed.append(f"{k}: not recorded (the run predates it) -> {new_s.get(k)!r}")
                fixes.append(override(k, LEGACY_VALUES[k]))
            else:
                changed.append(
                    f"{k}: not recorded (the run predates it) -> {new_s.get(k)!r} (no value "
                    f"is known to reproduce the run)"
                )
                unfixed += 1
        elif not _recorded(now, k):
            changed.append(f"{k}: {old_s.get(k)!r} -> (no longer a setting)")
            unfixed += 1
        else:
            changed.append(f"{k}: {old_s.get(k)!r} -> {new_s.get(k)!r}")
            fixes.append(override(k, old_s.get(k)))
    for n, p in inputs.items():
        rec = man.get("inputs", {}).get(n)
        if rec is not None and Path(p).exists() and describe(p)["bytes"] != rec["bytes"]:
            changed.append(
                f"input '{n}' ({p}) changed size: {rec['bytes']} -> {describe(p)['bytes']} bytes"
            )
            unfixed += 1
    if changed:
        how = (
            f" To continue it, pass {' '.join(fixes)}"
            + (" (and restore the rest above)" if unfixed else "")
            + "; or pass overwrite=true to start again."
            if fixes
            else " Restore them, or pass overwrite=true to start again."
        )
        raise StageError(
            f"resume=true: stage={name} cannot continue the run in {stage_dir(cfg, name)}: "
            f"settings that shape the model, the loss or the data changed since it started: "
            + "; ".join(changed)
            + "."
            + how
        )


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.hardware import HardwareError  # a hardware.* setting (a taken port...)
    from segmentation.datasets import AnnotationError  # a user's annotation file or image
    from segmentation.io import ImageReadError, UnsafeCheckpointError
    from vae.checkpoint import CheckpointError
    from vae.store import StoreError  # a damaged crop store, also while training

    return (
        StageError,
        StageInputError,
        HardwareError,
        UnsafeCheckpointError,
        CheckpointError,
        StoreError,
        AnnotationError,
        ImageReadError,
    )


USER_ERRORS = _user_errors()


# when this process's run started (start_run): crash_log names no log older than it
_RUN_STARTED = 0.0


def start_run(cfg: DictConfig, names: list[str]) -> list[str]:
    """Checks made once before the first stage: returns the stages to run.

    Settings (:func:`check_start`) first; then a warning for every backup an
    interrupted run left in the experiment. With ``resume=true``, ``stage=all``
    skips the complete stages it starts with whose inputs are still those they were
    made from (it continues where it stopped); the first stage that is unfinished, or
    whose inputs changed since (an interrupted ``overwrite=true`` run re-made them),
    and every stage after it run (:func:`stage_plan`).
    """
    global _RUN_STARTED
    _RUN_STARTED = time.time()
    check_start(cfg)
    from pipeline.stagedir import report_backups

    report_backups(run_dir(cfg))
    if not (cfg.resume and not cfg.overwrite and len(names) > 1):
        return names
    head = 0
    while head < len(names):
        d = stage_dir(cfg, names[head])
        man = read_manifest(d)
        if not man or man.get("status") != "complete":
            break
        changed = changed_inputs(man, run_dir(cfg))  # this folder's files, moved or copied
        if changed:
            log.warning(
                "resume=true: stage=%s in %s is complete but was made from inputs that "
                "changed since (%s): it and every later stage run again",
                names[head],
                d,
                "; ".join(changed),
            )
            break
        log.info("resume=true: stage=%s is complete; skipped", names[head])
        head += 1
    if head == len(names):
        log.info("resume=true: every stage is complete; nothing to resume")
    return names[head:]


def changed_inputs(man: dict[str, Any], experiment: Path | None = None) -> list[str]:
    """The recorded inputs of a stage's manifest that are gone or changed size since
    (``name (path): old -> new bytes``); sizes only, as :func:`check_fresh` compares:
    a copied experiment keeps its sizes but not its times.

    Parameters
    ----------
    man : the stage's manifest
    experiment : the experiment folder it is read in (``run_dir(cfg)``). An input inside
        the experiment is looked for there, not where the manifest was written: a
        moved experiment found its inputs "gone", a copy compared the original's files
        (:func:`pipeline.artifacts.recorded_input_path`). None: the recorded paths.
    """
    out = []
    for n, rec in (man.get("inputs") or {}).items():
        p = recorded_input_path(rec, man, experiment)
        if not p.exists():
            out.append(f"{n} ({p}): gone")
        elif describe(p)["bytes"] != rec.get("bytes"):
            out.append(f"{n} ({p}): {rec.get('bytes')} -> {describe(p)['bytes']} bytes")
    return out


def stage_plan(cfg: DictConfig, names: list[str]) -> list[tuple[str, DictConfig]]:
    """Each stage of a run with the config it runs under.

    Only ``stage=all resume=true`` changes anything: the first stage it runs
    (:func:`start_run` skipped the current ones) is resumed when it is unfinished and
    run again when it is complete (its inputs changed), and every later stage runs
    again (``overwrite=true``, the old result kept until the new one succeeds): its
    inputs are being re-made, so what it holds is not a result to continue.
    """
    # stage=all, not the length of the list: start_run may have left one stage of it
    if not (cfg.resume and not cfg.overwrite and cfg.stage.name == "all"):
        return [(n, cfg) for n in names]
    again = cfg.copy()
    again.overwrite, again.resume = True, False
    plan = []
    for k, n in enumerate(names):
        man = read_manifest(stage_dir(cfg, n)) if k == 0 else None
        first_resumes = k == 0 and not (man and man.get("status") == "complete")
        plan.append((n, cfg if first_resumes else again))
    return plan


def crash_log(cfg: DictConfig, name: str) -> Path | None:
    """The ``<stage>.log`` holding the traceback of the run that just failed.

    Usually ``<stage folder>/<stage>.log``. After ``overwrite=true`` (or ``resume=true``
    on a complete run) the failed attempt was moved to ``<folder>.failed-<time>`` and
    the previous result put back, whose own log tells nothing of this failure: the log
    written last of the folder and its failed attempts is this run's.
    """
    try:
        d = stage_dir(cfg, name)
    except StageError:
        return None
    logs = [d / f"{name}.log"]
    if d.parent.is_dir():
        logs += [f / f"{name}.log" for f in d.parent.glob(f"{d.name}.failed-*") if f.is_dir()]
    found = []
    for p in logs:
        try:
            found.append((p.stat().st_mtime, p))
        except OSError:
            continue  # no log there (a folder set aside before its first line)
    # a log not written since this run started is an earlier run's (a crash before this
    # run wrote a line, e.g. a colleague's finished folder): no traceback of this one
    found = [(t, p) for t, p in found if t >= _RUN_STARTED - 1.0]
    return max(found)[1] if found else None


def report_crash(cfg: DictConfig, name: str, e: BaseException) -> int:
    """One line on the console for an unexpected error (exit code 1).

    The traceback is in ``<stage>.log`` (written by the runner; :func:`crash_log` finds
    it, also in a failed attempt's folder); ``log_level=DEBUG`` prints it on the
    console instead.
    """
    text = str(e).strip().splitlines()
    # a DDP worker's error arrives with the worker's traceback inside the message: its
    # own "SomeError: what" line says what went wrong, not the message's last line (a
    # DDP reducer error ended on advice about TORCH_DISTRIBUTED_DEBUG)
    kind, last = type(e).__name__, text[-1] if text else ""
    for line in reversed(text):
        m = _RAISED_LINE.match(line.strip())
        if m and m.group(1).rsplit(".", 1)[-1] != kind:
            kind, last = m.group(1).rsplit(".", 1)[-1], m.group(2)
            break
    where = crash_log(cfg, name)
    hint = "log_level=DEBUG prints the traceback"
    if where is not None:
        hint = f"traceback in {where}; {hint} here"
    # under torchrun every rank reports: the others say which they are
    rank = os.environ.get("RANK", "0")
    who = f"[rank {rank}] " if rank not in ("", "0") else ""
    msg = f"{who}stage={name} failed: {kind}: {last} ({hint})"
    log.error("%s", msg)
    print(f"error: {msg}", file=sys.stderr)
    return 1


# "package.module.SomeError: what went wrong", the last line of a traceback
_RAISED_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.+)$")


def log_traceback(handler: logging.Handler, name: str) -> None:
    """Write the exception being handled, with its traceback, to ``handler`` only."""
    handler.handle(
        log.makeRecord(
            log.name, logging.ERROR, __file__, 0, "stage=%s failed", (name,), sys.exc_info()
        )
    )
