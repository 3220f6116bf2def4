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
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection import roi_heads as _roi_heads
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    mobilenet_backbone,
    resnet_fpn_backbone,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import misc as misc_nn_ops

log = logging.getLogger(__name__)

ARCHS = ("resnet18_fpn", "mobilenet_v3_fpn", "resnet50_fpn_v2", "resnet50_fpn")
# class index 0 is background; 1 is the white blood cell
NUM_CLASSES = 2
# gt mask pixels above 1 mean "unknown" (box-only annotation): no mask loss there
# (segmentation.datasets.MASK_UNKNOWN == 2)
_UNKNOWN_ABOVE = 1.0


def _maskrcnn_loss_with_unknown(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs):
    """torchvision's ``maskrcnn_loss``, except target px > 1 (unknown) carry no loss.

    With only 0/1 masks this equals the original (mean BCE over all RoI px).
    Installed into ``torchvision.models.detection.roi_heads`` on import, which
    is how ``RoIHeads.forward`` finds it, so "mask loss only where masks exist"
    needs no fork of RoIHeads.
    """
    size = mask_logits.shape[-1]
    labels = torch.cat([lab[idx] for lab, idx in zip(gt_labels, mask_matched_idxs)], dim=0)
    targets = [
        _roi_heads.project_masks_on_boxes(m, p, i, size)
        for m, p, i in zip(gt_masks, proposals, mask_matched_idxs)
    ]
    targets = torch.cat(targets, dim=0)
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    known = (targets <= _UNKNOWN_ABOVE).to(logits.dtype)
    if known.sum() == 0:
        return mask_logits.sum() * 0
    loss = F.binary_cross_entropy_with_logits(
        logits, targets.clamp(max=1.0), weight=known, reduction="sum"
    )
    return loss / known.sum()


_roi_heads.maskrcnn_loss = _maskrcnn_loss_with_unknown


class ScaleTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform that rescales every image by one fixed factor.

    torchvision rescales each image to a fixed short side (``min_size``), so
    cell size in network px depends on the image size. Here the factor is
    constant (``input_scale`` = network px per image px), so a cell is the
    same size in a 120 px crop, a 640 px field and a tile of a 4000 px slide.
    Outputs are mapped back to the input image frame as usual.
    """

    def __init__(self, input_scale: float, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.input_scale = float(input_scale)

    def resize(self, image, target=None):  # noqa: ANN001 - torchvision signature
        h, w = image.shape[-2:]
        if self.input_scale == 1.0:
            return image, target
        nh, nw = max(1, round(h * self.input_scale)), max(1, round(w * self.input_scale))
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        target["boxes"] = resize_boxes(target["boxes"], (h, w), (nh, nw))
        if "masks" in target:
            m = target["masks"]
            target["masks"] = (
                F.interpolate(m[:, None].float(), size=(nh, nw), mode="nearest")[:, 0].byte()
                if m.numel()
                else m.new_zeros((0, nh, nw))
            )
        return image, target


def _resnet18_fpn(out_channels: int, trainable_layers: int, norm: type) -> BackboneWithFPN:
    """ResNet-18 + FPN (4 levels + max-pool level) with a chosen FPN width."""
    from torchvision.models import resnet18
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    body = resnet18(weights=None, norm_layer=norm)
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers={trainable_layers}; valid: 0..5")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, p in body.named_parameters():
        if all(not name.startswith(t) for t in train):
            p.requires_grad_(False)
    return BackboneWithFPN(
        body,
        {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        [64, 128, 256, 512],
        out_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def build_maskrcnn(
    arch: str = "resnet18_fpn",
    num_classes: int = NUM_CLASSES,
    min_size: int = 512,
    max_size: int = 512,
    pretrained_weights: str | None = None,
    trainable_backbone_layers: int = 5,
    input_scale: float | None = None,
    anchor_sizes: list[int] | tuple[int, ...] | None = None,
    fpn_channels: int = 256,
    box_representation: int = 1024,
    mask_head_layers: int = 4,
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
    input_scale
        If set, every image is rescaled by this constant factor (network px per
        image px, see :class:`ScaleTransform`) instead of to ``min_size``.
    anchor_sizes
        One anchor size (px, in network input) per FPN level, e.g.
        ``[16, 32, 64, 128, 256]`` for cells of ~32-64 px; default torchvision's.
    fpn_channels, box_representation, mask_head_layers
        ``resnet18_fpn`` only: FPN width, box-head MLP width and number of
        mask-head convolutions (torchvision: 256, 1024, 4). Smaller = faster
        on CPU; the box-head MLP and mask head dominate the backward pass.
    **kwargs
        Passed to :class:`torchvision.models.detection.MaskRCNN` (e.g.
        ``box_detections_per_img``, ``rpn_anchor_generator``).
    """
    if arch not in ARCHS:
        raise ValueError(f"segmentation.arch={arch!r}; valid: {', '.join(ARCHS)}")
    if anchor_sizes is not None:
        sizes = [int(a) for a in anchor_sizes]
        if arch == "mobilenet_v3_fpn":  # 3 feature maps, every size on each
            per_level = (tuple(sizes),) * 3
            ratios = ((0.5, 1.0, 2.0),) * 3
        else:
            per_level = tuple((a,) for a in sizes)
            ratios = ((0.5, 1.0, 2.0),) * len(sizes)
        kwargs["rpn_anchor_generator"] = AnchorGenerator(per_level, ratios)
    # from scratch: BatchNorm trains normally (FrozenBN would freeze random stats)
    norm = torch.nn.BatchNorm2d
    if arch == "resnet18_fpn":
        backbone = _resnet18_fpn(fpn_channels, trainable_backbone_layers, norm)
        c = backbone.out_channels
        model = MaskRCNN(
            backbone,
            num_classes=None,
            min_size=min_size,
            max_size=max_size,
            box_head=TwoMLPHead(c * 7 * 7, box_representation),
            box_predictor=FastRCNNPredictor(box_representation, num_classes),
            mask_head=MaskRCNNHeads(c, [c] * int(mask_head_layers), 1),
            mask_predictor=MaskRCNNPredictor(c, c, num_classes),
            **kwargs,
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
        # the v2 builder makes its own anchor generator; ours (same anchors per
        # location, so the RPN head fits) replaces it afterwards
        anchors = kwargs.pop("rpn_anchor_generator", None)
        # torchvision freezes backbone layers only when it loads its own weights (never
        # here): every layer trains, whatever is asked; say so once instead of its warning
        if trainable_backbone_layers < 5:
            log.warning(
                "segmentation.trainable_backbone_layers=%d has no effect on resnet50_fpn_v2 "
                "(no torchvision weights): all backbone layers train",
                trainable_backbone_layers,
            )
        model = maskrcnn_resnet50_fpn_v2(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            min_size=min_size,
            max_size=max_size,
            trainable_backbone_layers=None,
            **kwargs,
        )
        if anchors is not None:
            model.rpn.anchor_generator = anchors
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
    pin_roi_scales(model)
    if input_scale is not None:
        t = model.transform
        model.transform = ScaleTransform(
            input_scale, t.min_size, t.max_size, t.image_mean, t.image_std
        )
    if pretrained_weights:
        from segmentation.io import load_torch_file

        p = Path(pretrained_weights)
        if not p.is_file():
            raise FileNotFoundError(
                f"segmentation.pretrained_weights={pretrained_weights}: no such file"
            )
        # weights_only: a shared weights file must not be able to run code
        ckpt = load_torch_file(p, "cpu", "segmentation.pretrained_weights")
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
        if isinstance(ckpt, dict) and ckpt.get("model_format") is not None:
            # the shipped detector's compact int8 file (segmentation.shipped)
            state = _unpacked(ckpt["model_format"], state, p)
        try:
            res = model.load_state_dict(state, strict=False)
        except RuntimeError as e:
            # e.g. the shipped detector's 128-channel FPN under another fpn_channels;
            # torch's message: a header line, then one line per mismatched weight
            raise ValueError(
                f"segmentation.pretrained_weights={pretrained_weights}: its weights do not "
                f"fit this model ({state_dict_error(e)}; for the shipped detector keep "
                f"the default segmentation settings: arch, fpn_channels, box_representation, "
                f"mask_head_layers)"
            ) from None
        if isinstance(state, dict) and not set(model.state_dict()) & set(state):
            # not one name in common: nothing is loaded, a run from scratch (missing_keys
            # leaves out some of the frozen layers' entries: 136 of 156 here)
            raise ValueError(
                f"segmentation.pretrained_weights={pretrained_weights}: none of the model's "
                f"{len(model.state_dict())} weights is in the file (its "
                f"{len(res.unexpected_keys)} entries are named e.g. "
                f"{', '.join(res.unexpected_keys[:2]) or 'nothing'}): not a Mask R-CNN's "
                f"weights; give a segment_train model.pt, or null to train from scratch"
            )
        log.info(
            "loaded %s: %d missing, %d unexpected keys",
            p,
            len(res.missing_keys),
            len(res.unexpected_keys),
        )
        if len(res.missing_keys) > len(model.state_dict()) // 2:
            # names that do not match load nothing: most likely another arch's file
            log.warning(
                "segmentation.pretrained_weights=%s: %d of the model's %d weights are not in "
                "the file, so most of the model starts from scratch (another arch?)",
                pretrained_weights,
                len(res.missing_keys),
                len(model.state_dict()),
            )
    return model


def pin_roi_scales(model: MaskRCNN, size: int = 256) -> None:
    """Fix the RoI poolers' feature-map scales once, from a canonical input (in place).

    torchvision's ``MultiScaleRoIAlign`` infers each level's scale from the first
    batch it pools and keeps it: feature size over the largest *unpadded* image
    size, rounded to a power of two. A first image much smaller than its padded
    batch (a 43 px single-cell crop padded to 64: 16 / 43 rounds to 1/2, not 1/4)
    fixes a wrong scale for the life of the model, and every later image pools its
    boxes from the wrong place (dozens of spurious detections). The scales depend
    on the backbone's strides only, so they are set here from a ``size`` px input.
    """
    from torchvision.ops.poolers import MultiScaleRoIAlign, _setup_scales

    pools = [getattr(model.roi_heads, k, None) for k in ("box_roi_pool", "mask_roi_pool")]
    pools = [p for p in pools if isinstance(p, MultiScaleRoIAlign)]
    if not pools:
        return
    bb = model.backbone
    was_training = bb.training
    bb.eval()  # no BatchNorm statistics from the dummy input
    try:
        dev = next(bb.parameters()).device
        with torch.no_grad():
            feats = bb(torch.zeros(1, 3, size, size, device=dev))
    finally:
        bb.train(was_training)
    for pool in pools:
        x = [v for k, v in feats.items() if k in pool.featmap_names]
        pool.scales, pool.map_levels = _setup_scales(
            x, [(size, size)], pool.canonical_scale, pool.canonical_level
        )


def save_checkpoint(
    path: str | Path, model: torch.nn.Module, model_args: dict[str, Any], **extra: Any
) -> None:
    """Save weights plus the arguments that rebuild the model (and anything else)."""
    state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    torch.save({"model": state, "model_args": dict(model_args), **extra}, path)


def _unpacked(fmt: Any, state: Any, path: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict of a compact checkpoint (``model_format``, :mod:`segmentation.shipped`).

    Raises
    ------
    segmentation.io.UnsafeCheckpointError
        Unknown format or damaged weights, naming ``path``.
    """
    from segmentation.io import UnsafeCheckpointError
    from segmentation.shipped import PACKED_FORMAT, unpack_state

    if fmt != PACKED_FORMAT:
        raise UnsafeCheckpointError(
            f"{path}: weight format {fmt!r} is not known to this version (knows {PACKED_FORMAT!r})"
        )
    try:
        return unpack_state(state)
    except ValueError as e:
        raise UnsafeCheckpointError(f"{path}: damaged weights ({e})") from None


def _detector_arg_names() -> set[str]:
    """Names :func:`build_maskrcnn` takes, its own and those it passes to torchvision."""
    import inspect

    from torchvision.models.detection import FasterRCNN

    names: set[str] = set()
    for fn in (build_maskrcnn, MaskRCNN.__init__, FasterRCNN.__init__):
        for p in inspect.signature(fn).parameters.values():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self":
                names.add(p.name)
    return names


def detector_newer_problem(ckpt: Any) -> str | None:
    """Why a detector checkpoint needs a newer version of this package; None if not.

    Parameters
    ----------
    ckpt
        What :func:`segmentation.io.load_torch_file` returned for a detector.

    Returns
    -------
    str or None
        The reason (format above :data:`segmentation.io.DETECTOR_FORMAT_VERSION`, or
        ``model_args`` keys this code's builder does not take, named), to follow
        ``PATH: ``.
    """
    from segmentation.io import DETECTOR_FORMAT_VERSION
    from segmentation.provenance import newer_checkpoint_problem

    if not isinstance(ckpt, dict):
        return None
    args = ckpt.get("model_args")
    # only a detector's own keys count as "newer": a VAE's model.pt given as the
    # detector is another mix-up, said by detector_checkpoint_problem
    unknown = (
        sorted(str(k) for k in args if k not in _detector_arg_names())
        if isinstance(args, dict) and "arch" in args and "n_genes" not in args
        else []
    )
    return newer_checkpoint_problem(ckpt, DETECTOR_FORMAT_VERSION, unknown)


def detector_checkpoint_problem(ckpt: Any) -> str | None:
    """Why a loaded checkpoint is not a detector of this pipeline; None when it is one.

    Cheap (no model is built): stage=segment and embed call it before their folder is
    made, so another kind of torch file (a VAE's ``model.pt``, which has ``model`` and
    ``model_args`` too) is refused by name, not when its weights fail to fit.

    Parameters
    ----------
    ckpt
        What :func:`segmentation.io.load_torch_file` returned.

    Returns
    -------
    str or None
        The reason, to follow ``PATH: not a segmentation model checkpoint``.
    """
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        return "it needs the keys 'model' and 'model_args'"
    args = ckpt["model_args"]
    if not isinstance(args, dict):
        return f"its 'model_args' is a {type(args).__name__}, not a mapping"
    unknown = sorted(str(k) for k in args if k not in _detector_arg_names())
    if unknown:
        # a VAE checkpoint (stage=train) is the likely mix-up: both sit in a model.pt
        kind = " (a VAE model: it is read through paths.inputs.model)" if "n_genes" in args else ""
        more = " ..." if len(unknown) > 6 else ""
        return f"its model_args hold {', '.join(unknown[:6])}{more}, which no detector takes{kind}"
    arch = args.get("arch", "resnet18_fpn")
    if arch not in ARCHS:
        return f"its model_args name arch={arch!r}; detectors: {', '.join(ARCHS)}"
    state = ckpt["model"]
    if ckpt.get("model_format") is None and not (
        isinstance(state, dict) and any(str(k).startswith("roi_heads.") for k in state)
    ):
        return "its weights are not a Mask R-CNN's (no 'roi_heads.' entries)"
    return None


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[MaskRCNN, dict[str, Any]]:
    """Rebuild a model from :func:`save_checkpoint` output. Returns ``(model, checkpoint)``.

    Also reads the compact int8 format of the shipped detector
    (``model_format``, :mod:`segmentation.shipped`), dequantised to fp32.
    """
    from segmentation.io import UnsafeCheckpointError, load_torch_file

    path = Path(path)
    ckpt = load_torch_file(path, map_location, "segmentation model")
    # a newer version's detector is not "not a detector" (its new model_args keys)
    newer = detector_newer_problem(ckpt)
    if newer is not None:
        raise UnsafeCheckpointError(f"{path}: {newer}")
    why = detector_checkpoint_problem(ckpt)
    if why is not None:
        raise UnsafeCheckpointError(f"{path}: not a segmentation model checkpoint: {why}")
    args = dict(ckpt["model_args"])
    args.pop("pretrained_weights", None)
    model = build_maskrcnn(**args)
    state = ckpt["model"]
    fmt = ckpt.get("model_format")
    if fmt is not None:
        state = _unpacked(fmt, state, path)
    bad = nonfinite_weights(state)
    if bad:
        n = sum(torch.is_tensor(v) and v.is_floating_point() for v in state.values())
        raise UnsafeCheckpointError(
            f"{path}: {len(bad)} of its {n} weight tensors hold NaN or infinite values "
            f"(e.g. {', '.join(bad[:3])}): a diverged or damaged training run, which "
            f"detects nothing; retrain, or use an earlier checkpoint"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UnsafeCheckpointError(
            f"{path}: its weights do not fit its model_args ({state_dict_error(e)})"
        ) from None
    return model, ckpt


def state_dict_error(e: BaseException, limit: int = 300) -> str:
    """The informative line of torch's ``load_state_dict`` error: its first line is only
    "Error(s) in loading state_dict for MaskRCNN:", the second names the first weight
    that does not fit (``size mismatch for ...`` / ``Missing key(s) ...``)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    line = lines[1] if len(lines) > 1 else lines[0] if lines else "shape mismatch"
    return line[:limit] + (" ..." if len(line) > limit else "")


def nonfinite_weights(state: Any) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an infinity
    (a diverged run's weights load and detect nothing, with no error). 1-byte floats
    (float8) are upcast first: ``torch.isfinite`` is not implemented for them."""
    if not isinstance(state, dict):
        return []

    def finite(v: torch.Tensor) -> bool:
        if v.element_size() == 1:
            v = v.float()
        return bool(torch.isfinite(v).all())

    return [
        str(k)
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point() and not finite(v)
    ]
