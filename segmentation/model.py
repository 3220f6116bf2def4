"""Mask R-CNN builders (torchvision) and checkpoint I/O.

No weights are downloaded: ``pretrained_weights`` is a local file path (a
torchvision state dict or one of our checkpoints); without it the model
trains from scratch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.backbone_utils import (
    mobilenet_backbone,
    resnet_fpn_backbone,
)
from torchvision.ops import misc as misc_nn_ops

log = logging.getLogger(__name__)

ARCHS = ("resnet18_fpn", "mobilenet_v3_fpn", "resnet50_fpn_v2", "resnet50_fpn")
# class index 0 is background; 1 is the white blood cell
NUM_CLASSES = 2


def build_maskrcnn(
    arch: str = "resnet18_fpn",
    num_classes: int = NUM_CLASSES,
    min_size: int = 512,
    max_size: int = 512,
    pretrained_weights: str | None = None,
    trainable_backbone_layers: int = 5,
    **kwargs: Any,
) -> MaskRCNN:
    """Build a torchvision Mask R-CNN.

    Parameters
    ----------
    arch
        ``resnet18_fpn`` (CPU default), ``mobilenet_v3_fpn``, ``resnet50_fpn_v2``
        (GPU) or ``resnet50_fpn`` (torchvision's original recipe, for benchmarks).
    num_classes
        Including background.
    min_size, max_size
        Images are rescaled so the short side is ``min_size`` px (long side at
        most ``max_size``) before the network; pick them so cells keep enough px.
    pretrained_weights
        Local path to a state dict to load (strict=False, reported); never a URL.
    **kwargs
        Passed to :class:`torchvision.models.detection.MaskRCNN` (e.g.
        ``box_detections_per_img``, ``rpn_anchor_generator``).
    """
    if arch not in ARCHS:
        raise ValueError(f"segmentation.arch={arch!r}; valid: {', '.join(ARCHS)}")
    # from scratch: BatchNorm trains normally (FrozenBN would freeze random stats)
    norm = torch.nn.BatchNorm2d
    if arch == "resnet18_fpn":
        backbone = resnet_fpn_backbone(
            backbone_name="resnet18",
            weights=None,
            norm_layer=norm,
            trainable_layers=trainable_backbone_layers,
        )
        model = MaskRCNN(
            backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs
        )
    elif arch == "mobilenet_v3_fpn":
        backbone = mobilenet_backbone(
            backbone_name="mobilenet_v3_large",
            weights=None,
            fpn=True,
            norm_layer=norm,
            trainable_layers=min(trainable_backbone_layers, 6),
        )
        model = MaskRCNN(
            backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs
        )
    elif arch == "resnet50_fpn_v2":
        model = maskrcnn_resnet50_fpn_v2(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            min_size=min_size,
            max_size=max_size,
            trainable_backbone_layers=trainable_backbone_layers,
            **kwargs,
        )
    else:
        backbone = resnet_fpn_backbone(
            backbone_name="resnet50",
            weights=None,
            norm_layer=misc_nn_ops.FrozenBatchNorm2d,
            trainable_layers=trainable_backbone_layers,
        )
        model = MaskRCNN(
            backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs
        )
    if pretrained_weights:
        p = Path(pretrained_weights)
        if not p.is_file():
            raise FileNotFoundError(
                f"segmentation.pretrained_weights={pretrained_weights}: no such file"
            )
        state = torch.load(p, map_location="cpu", weights_only=False)
        state = state.get("model", state) if isinstance(state, dict) else state
        res = model.load_state_dict(state, strict=False)
        log.info(
            "loaded %s: %d missing, %d unexpected keys",
            p,
            len(res.missing_keys),
            len(res.unexpected_keys),
        )
    return model


def save_checkpoint(
    path: str | Path, model: torch.nn.Module, model_args: dict[str, Any], **extra: Any
) -> None:
    """Save weights plus the arguments that rebuild the model (and anything else)."""
    state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    torch.save({"model": state, "model_args": dict(model_args), **extra}, path)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[MaskRCNN, dict[str, Any]]:
    """Rebuild a model from :func:`save_checkpoint` output. Returns ``(model, checkpoint)``."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - report the file, whatever torch raised
        raise RuntimeError(f"{path}: not a readable checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise RuntimeError(
            f"{path}: not a segmentation checkpoint (needs keys 'model', 'model_args')"
        )
    args = dict(ckpt["model_args"])
    args.pop("pretrained_weights", None)
    model = build_maskrcnn(**args)
    model.load_state_dict(ckpt["model"])
    return model, ckpt
