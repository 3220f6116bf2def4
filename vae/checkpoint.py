"""Save and load β-VAE checkpoints.

A checkpoint is a ``torch.save`` dict::

    model        state dict of TwoBranchVAE
    model_args   VAEArgs as a dict (rebuilds the architecture)
    meta         gene_names, label_names, crop_size, n_latent, n_shared, n_private,
                 norm_total, has_counts, ... (what downstream stages need)
    optimizer, scheduler, epoch (completed), step, rng, best_val, best_epoch,
    bad_epochs, history, train_args, config (resolved Hydra config)
    format_version  FORMAT_VERSION of the code that wrote it (absent: format 0)
    code         segmentation.provenance.code_record() of the code that wrote it

Use :func:`load_model` for inference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from segmentation.io import UnsafeCheckpointError, load_torch_file
from segmentation.provenance import newer_checkpoint_problem
from vae.model import TwoBranchVAE, VAEArgs

log = logging.getLogger(__name__)

# Layout of the payload above, written as ``format_version`` (checkpoints without it are
# format 0 and load as before). Bump it when a checkpoint written by this code can no
# longer be read correctly by older code (a key renamed or given another meaning, a new
# key older code must not ignore): older code then refuses it as "written by a newer
# version" instead of failing on it or misreading it. Adding a VAEArgs field needs no
# bump: load_model names model_args keys it does not know.
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary name, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def checkpoint_digest(path: str | os.PathLike) -> str:
    """A short fingerprint of a checkpoint file's bytes (sha256, 16 hex digits).

    ``stage=train`` stores the digest of ``model.pt`` in ``latent.h5ad``
    (``uns["model_digest"]``), so a study's model and its reference latent are known to
    belong together (:class:`vae.api.Study` refuses a pair that does not).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def check_model_digest(
    recorded: object, model_path: str | os.PathLike, latent_path: str | os.PathLike
) -> None:
    """Refuse a latent.h5ad written for another model than ``model_path``.

    ``recorded``: the latent's ``uns["model_digest"]`` (None for latents written before
    the digest: nothing to compare, no error). Raises :class:`CheckpointError` naming
    both files when the digests differ.
    """
    if recorded is None or not Path(model_path).is_file():
        return
    got = checkpoint_digest(model_path)
    if str(recorded) != got:
        raise CheckpointError(
            f"{latent_path}: uns['model_digest'] is {recorded}, but {model_path} has digest "
            f"{got}: the latent was written for another model (another study, or the model "
            f"was retrained since). Give the model and latent.h5ad of one stage=train run."
        )


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The payload of a VAE checkpoint (safely unpickled), checked to be one this code reads.

    Raises
    ------
    CheckpointError
        Missing, unreadable or unsafe file; not a VAE checkpoint; or written by a newer
        version (``format_version`` above :data:`FORMAT_VERSION`, or ``model_args`` keys
        this VAEArgs does not know): the message names the file, both versions and the
        keys.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        # weights_only: a shared model file must not be able to run code
        ck = load_torch_file(path, map_location, "vae checkpoint")
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path}: not a vae checkpoint (no dict inside)")
    for key in ("model", "model_args"):
        if key not in ck:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}' (not a vae checkpoint?)")
    args = ck["model_args"]
    if isinstance(args, dict) and "num_classes" in args and "n_genes" not in args:
        # the likely mix-up: a segment_train model.pt given as the study's (both model.pt);
        # it failed as "VAEArgs.__init__() got an unexpected keyword argument 'arch'"
        # (a detector saved without "arch" loads as resnet18_fpn: num_classes tells it)
        raise CheckpointError(
            f"{path}: not a usable vae checkpoint: a detector (segment_train) checkpoint: "
            "give it as paths.inputs.segmentation_model (Study.load(..., "
            "segmentation_model=)); the vae model is the study's train/model.pt"
        )
    _drop_removed_args(ck["model_args"], path)
    why = newer_checkpoint_problem(ck, FORMAT_VERSION, _unknown_args(ck["model_args"]))
    if why is not None:
        raise CheckpointError(f"{path}: {why}")
    return ck


# VAEArgs fields removed since, with the value under which they changed nothing: a
# study trained with that value builds the same network without the field, so it loads
# (vae.align_pose, 2026-11-30 fbf213f .. b6b3fd0: measured worse and reverted); any
# other value is named by load_checkpoint as another version's setting
REMOVED_ARGS: dict[str, Any] = {"align_pose": False}


def _drop_removed_args(model_args: Any, path: Path) -> None:
    """Drop (in place) the :data:`REMOVED_ARGS` fields that hold their no-effect value."""
    if not isinstance(model_args, dict):
        return
    for key, off in REMOVED_ARGS.items():
        if key in model_args and model_args[key] == off:
            del model_args[key]
            log.info("%s: model_args.%s=%r, a setting since removed, had no effect", path, key, off)


def _unknown_args(model_args: Any) -> list[str]:
    """Keys of a VAE's ``model_args`` that this code's VAEArgs does not take.

    Only for a VAE's model_args (every field without a default is there, as
    ``asdict`` writes them): another program's file, a detector's, is not "newer", and
    load_model says it does not build this package's VAE.
    """
    if not isinstance(model_args, dict):
        return []
    fields = dataclasses.fields(VAEArgs)
    required = {
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    if not required <= set(model_args):
        return []
    known = {f.name for f in fields}
    return sorted(str(k) for k in model_args if k not in known)


def error_line(e: BaseException, limit: int = 400) -> str:
    """``e`` as one line of at most ``limit`` characters.

    torch's state-dict error puts the missing / unexpected keys and the size mismatches
    after a header line ("Error(s) in loading state_dict for TwoBranchVAE:"): they are
    kept, joined by "; ".
    """
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    first = "; ".join(lines) if lines else type(e).__name__
    return first[:limit] + "..." if len(first) > limit else first


# what a resume tells the user to do when last.pt cannot be continued (stage=train)
RESUME_FIX = (
    "Pass overwrite=true instead of resume=true to train afresh (a complete result stays "
    "in place until the new run succeeds), or put back the last.pt this study's run wrote"
)

# where the model_args a resume compares come from, for the user (the rest: vae.<name>)
_ARG_SOURCE = {
    "n_genes": "the paired data's genes",
    "crop_size": "the paired crops' side, px",
    "n_classes": "the label head: the data's labels, vae.classify_weight",
    "maturation_ranks": "vae.maturation_weight / vae.maturation_classes",
    "norm_total": "the paired data",
    "batch_names": "vae.batch_key",
    "image_batch_names": "vae.image_batch_key",
    "texture_coarse": "vae.texture_coarse",
    "size_log_mean": "the cells' sizes",
    "size_log_sd": "the cells' sizes",
}


def resume_error(path: str | os.PathLike, why: str) -> CheckpointError:
    """The one-line error for a ``last.pt`` that a resume cannot continue: names the
    file, says ``why`` and what to do (:data:`RESUME_FIX`)."""
    return CheckpointError(f"{path}: resume=true cannot continue from it: {why}. {RESUME_FIX}.")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def model_args_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``name: saved value in the checkpoint -> value now`` for every VAEArgs field both
    hold with different values (a field the checkpoint predates is not compared)."""
    out = []
    for k in now:
        if k not in saved or saved[k] == now[k]:
            continue
        a, b = saved[k], now[k]
        if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-6):
            continue
        where = f" ({_ARG_SOURCE[k]})" if k in _ARG_SOURCE else ""
        out.append(f"{k}{where}: {_short(a)} in the checkpoint, {_short(b)} now")
    return out


def _names_difference(what: str, saved: Any, now: Any) -> str | None:
    """Where list ``saved`` (the checkpoint's meta) and ``now`` first differ, or None."""
    if saved is None or now is None:
        return None
    saved, now = [str(x) for x in saved], [str(x) for x in now]
    if saved == now:
        return None
    if len(saved) != len(now):
        return f"{what}: {len(saved)} in the checkpoint, {len(now)} now"
    i = next(k for k, (a, b) in enumerate(zip(saved, now)) if a != b)
    return f"{what}: #{i} is {saved[i]!r} in the checkpoint, {now[i]!r} now"


def load_for_resume(
    path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The payload of ``last.pt`` (``path``) with its weights loaded into ``model``.

    Raises
    ------
    CheckpointError
        One line naming the file, saying why it cannot be continued and what to do: not
        a VAE checkpoint, a best-model checkpoint (model.pt: no optimizer state), or
        one written for another model (another study's last.pt, or the settings that
        shape the model differ: the differing ``model_args`` fields are named, and the
        genes / labels of ``meta`` when they differ from the checkpoint's).
    """
    ck = load_checkpoint(path)
    if "optimizer" not in ck:
        raise resume_error(
            path,
            "it is a best-model checkpoint (a model.pt: no optimizer state), not the "
            "last.pt a training run writes every epoch",
        )
    saved_meta = ck.get("meta") or {}
    diffs = model_args_differences(ck["model_args"], dataclasses.asdict(model.args))
    for what in ("gene_names", "label_names"):
        d = _names_difference(what, saved_meta.get(what), (meta or {}).get(what))
        if d is not None:
            diffs.append(d)
    try:
        model.load_state_dict(ck["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        detail = "; ".join(diffs) if diffs else f"its weights do not fit: {error_line(e)}"
        raise resume_error(
            path,
            f"it was written for another model than this run builds (another study's "
            f"last.pt, or settings that shape the model differ): {detail}",
        ) from None
    names = [d for d in diffs if d.startswith(("gene_names", "label_names"))]
    if names:
        raise resume_error(
            path,
            f"it was trained on other data than this run's (another study's last.pt): "
            f"{'; '.join(names)}",
        )
    if diffs:
        log.warning(
            "resume: %s was written with other model_args than this run builds (the "
            "weights fit; continuing): %s",
            path,
            "; ".join(diffs),
        )
    return ck


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[TwoBranchVAE, dict[str, Any]]:
    """Rebuild the model from a checkpoint, in eval mode.

    Parameters
    ----------
    path : model.pt or last.pt written by ``stage=train``
    device : where to put the model

    Returns
    -------
    (model, meta)
        ``meta`` holds ``gene_names``, ``label_names``, ``crop_size``,
        ``n_latent`` (total d), ``n_shared``, ``n_private``, ``norm_total``,
        ``has_counts``, ``expression_likelihood``, ``epoch``, ``step``.
    """
    ck = load_checkpoint(path)
    try:
        model = TwoBranchVAE(VAEArgs(**ck["model_args"]))
        model.load_state_dict(ck["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        # a detector's file, or another program's, can carry the same two keys
        raise CheckpointError(
            f"{path}: not a usable vae checkpoint (its model_args / weights do not build "
            f"this package's VAE: {error_line(e)})"
        ) from None
    model.to(device).eval()
    meta = dict(ck.get("meta", {}))
    meta.setdefault("n_latent", model.args.n_latent)
    meta.setdefault("n_shared", model.args.n_shared)
    meta.setdefault("n_private", model.args.n_private)
    meta.setdefault("crop_size", model.args.crop_size)
    meta["epoch"] = ck.get("epoch")
    meta["step"] = ck.get("step")
    return model, meta
