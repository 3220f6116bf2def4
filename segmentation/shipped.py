"""The white-cell detector shipped with the package, and its compact weight format.

``segmentation/weights/wbc_detector.pt`` is a Mask R-CNN trained on real smears
(BCCD + TXL-PBC + segmentation_wbc; docs/segmentation_train.md, "Shipped
detector"). ``stage=segment``, ``stage=embed`` and :class:`vae.api.Study` use it
when no ``segment_train`` run and no ``paths.inputs.segmentation_model`` is given.

Package data must stay small (<= 25 MB), so the file stores every large
weight tensor as int8 with one fp32 scale per output channel (symmetric,
``w ~= q * scale``); the rest (biases, BatchNorm statistics) stays fp32.
:func:`segmentation.model.load_checkpoint` dequantises it to fp32 on load, so
the model runs exactly like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SHIPPED_DETECTOR = Path(__file__).parent / "weights" / "wbc_detector.pt"
# value of the checkpoint key ``model_format`` for the compact state dict
PACKED_FORMAT = "int8-per-channel/1"
# tensors smaller than this stay fp32 (biases, BN statistics: a few kB in all)
MIN_PACKED_NUMEL = 4096


def shipped_detector() -> Path:
    """Path of the shipped detector file.

    Raises
    ------
    segmentation.io.UnsafeCheckpointError
        The file is missing (a broken install): says how to give a detector instead.
    """
    from segmentation.io import UnsafeCheckpointError

    if not SHIPPED_DETECTOR.is_file():
        raise UnsafeCheckpointError(
            f"the shipped detector {SHIPPED_DETECTOR} is missing (a broken install: "
            f"reinstall the package); or train one with stage=segment_train, or give "
            f"paths.inputs.segmentation_model=PATH"
        )
    return SHIPPED_DETECTOR


def is_shipped(path: str | Path | None) -> bool:
    """True when ``path`` is the shipped detector file."""
    if path is None:
        return False
    try:
        return Path(path).resolve() == SHIPPED_DETECTOR.resolve()
    except OSError:
        return False


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """fp32 state dict -> compact one: int8 per output channel for large float tensors.

    Parameters
    ----------
    state
        ``model.state_dict()``; tensors of any shape.

    Returns
    -------
    dict
        Same keys. A float tensor with ``numel >= MIN_PACKED_NUMEL`` and at least
        two dimensions (conv ``(out, in, kh, kw)``, linear ``(out, in)``) becomes
        ``{"q": int8 tensor of its shape, "scale": fp32 (out,)}`` with
        ``scale = max|w[o]| / 127``; anything else is kept as it is (floats as fp32).
    """
    out: dict[str, Any] = {}
    for k, t in state.items():
        if t.is_floating_point() and t.dim() >= 2 and t.numel() >= MIN_PACKED_NUMEL:
            w = t.detach().float()
            amax = w.abs().flatten(1).amax(dim=1).clamp_min(1e-12)
            scale = amax / 127.0
            q = torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).clamp(-127, 127)
            out[k] = {"q": q.to(torch.int8).contiguous(), "scale": scale.contiguous()}
        elif t.is_floating_point():
            out[k] = t.detach().float().clone()
        else:
            out[k] = t.detach().clone()
    return out


def unpack_state(packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state`: every packed tensor dequantised to fp32.

    Raises
    ------
    ValueError
        An entry is neither a tensor nor a ``{"q", "scale"}`` pair of matching shape.
    """
    state: dict[str, torch.Tensor] = {}
    for k, v in packed.items():
        if isinstance(v, torch.Tensor):
            state[k] = v
            continue
        if not (isinstance(v, dict) and isinstance(v.get("q"), torch.Tensor)):
            raise ValueError(f"packed weight {k!r}: expected a tensor or {{'q', 'scale'}}")
        q, scale = v["q"], v.get("scale")
        if not isinstance(scale, torch.Tensor) or scale.shape != (q.shape[0],):
            raise ValueError(f"packed weight {k!r}: scale does not match its {tuple(q.shape)}")
        state[k] = q.float() * scale.float().view(-1, *[1] * (q.dim() - 1))
    return state


def wants_scale_estimate(setting: bool | None, ckpt: dict[str, Any]) -> bool:
    """Whether smears are scaled by measuring each image (segmentation.magnification).

    Parameters
    ----------
    setting
        ``segmentation.estimate_scale``: true / false force it; None (default)
        follows the checkpoint: true for a detector saved with ``estimate_scale``
        (the shipped one, trained on sources of many magnifications), else false.
    ckpt
        The loaded checkpoint dict.
    """
    if setting is not None:
        return bool(setting)
    return bool(ckpt.get("estimate_scale", False))


def wants_scale_refinement(setting: bool | None, ckpt: dict[str, Any]) -> bool:
    """Whether an estimated scale is refined by the detector's own white boxes
    (:func:`segmentation.magnification.refine_scale`).

    Parameters
    ----------
    setting
        ``segmentation.refine_scale``: true / false force it; None (default) follows
        the checkpoint like :func:`wants_scale_estimate`: on for a detector saved with
        ``estimate_scale`` (the shipped one, trained on TXL-PBC at its ground-truth
        scale, so its boxes measure the cell size: docs/segmentation_infer.md,
        "Detector-refined scale"), off for a ``segment_train`` model.
    ckpt
        The loaded checkpoint dict.
    """
    if setting is not None:
        return bool(setting)
    return bool(ckpt.get("refine_scale", ckpt.get("estimate_scale", False)))
