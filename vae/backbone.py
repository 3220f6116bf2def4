"""A ResNet-18 image encoder that can start from local pretrained weights.

Why: on the real chain the VAE's own small conv encoder is capped by how much it
can learn from ~600 labelled crops (a *supervised* copy of it reaches kNN 0.83). A
ResNet-18 trunk initialised from the project's own smear-trained detector (the
``segment_train`` Mask R-CNN's ``backbone.body``) starts with filters that already
know stained cells, and learns more from the same crops (docs/vae.md, "A pretrained
image encoder"). Nothing is downloaded: weights come from a local file only.

* :class:`ResNetImageEncoder`: masked crop -> Gaussian, the same contract as
  :class:`vae.model.ImageEncoder`.
* :func:`backbone_state_dict`: the ResNet-18 trunk weights inside a checkpoint file
  (a ``segment_train`` model, or a plain torchvision ``resnet18`` state dict).
* :func:`load_backbone`: copy them into an encoder, with a clear error when the file
  holds no compatible trunk.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# ImageNet statistics: torchvision's detection transform normalises smear images with
# them, so a trunk taken from the detector expects inputs on this scale
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# key prefixes under which a ResNet-18 trunk sits in the files we accept
TRUNK_PREFIXES = ("backbone.body.", "body.", "module.", "")


class BackboneWeightsError(ValueError):
    """A backbone weights file that cannot initialise the encoder (names the file)."""


class ResNetImageEncoder(nn.Module):
    """Masked crop -> Gaussian over ``n_out`` dims through a ResNet-18 trunk.

    The crop is normalised with the ImageNet statistics (as the detector saw its
    smears) and multiplied by the cell mask, so background pixels enter as zeros, i.e.
    as the mean colour. The trunk's last feature map (512 x S/32 x S/32) is flattened
    into the mean and log-variance heads.

    Parameters
    ----------
    crop_size : int
        Side S of the square crops, px (a multiple of 32).
    n_out : int
        Latent dims of the expert (shared + private).
    """

    def __init__(self, crop_size: int, n_out: int):
        super().__init__()
        from torchvision.models import resnet18

        if crop_size % 32:
            raise ValueError(f"crop_size={crop_size}: the resnet18 encoder needs a multiple of 32")
        trunk = resnet18(weights=None)
        trunk.fc = nn.Identity()
        trunk.avgpool = nn.Identity()  # keep the S/32 grid: the decoder needs the layout
        self.trunk = trunk
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)
        flat = 512 * (crop_size // 32) ** 2
        self.mu = nn.Linear(flat, n_out)
        self.logvar = nn.Linear(flat, n_out)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` (B, 3, S, S) in [0, 1], ``mask`` (B, 1, S, S) -> (mu, logvar), (B, n_out)."""
        x = (image - self.mean) / self.std * mask
        h = self.trunk(x)  # (B, 512 * (S/32)^2): flattened by torchvision's forward
        return self.mu(h), self.logvar(h).clamp(-10.0, 8.0)


def backbone_state_dict(path: str | Path, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The ResNet-18 trunk weights stored in ``path``.

    Accepts a ``segment_train`` checkpoint (``{"model": ..., "model_args": ...}``, trunk
    under ``backbone.body.``; its ``arch`` must be ``resnet18_fpn``), the package's
    shipped detector (its int8 format, :mod:`segmentation.shipped`), a torchvision
    ``resnet18`` state dict (``fc.*`` ignored), or either wrapped as
    ``{"state_dict": ...}``. Loaded with ``weights_only`` (a file cannot run code).

    ``keys``: the trunk's parameter / buffer names when the caller already has a trunk
    (None: those of a torchvision ``resnet18`` without ``fc``).

    Returns
    -------
    dict
        Trunk parameter / buffer name (torchvision ``resnet18`` naming, no ``fc``) ->
        tensor.

    Raises
    ------
    BackboneWeightsError
        Missing or unreadable file, another architecture, or no trunk inside.
    """
    from segmentation.io import UnsafeCheckpointError, load_torch_file

    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: no such backbone weights file")
    try:
        obj = load_torch_file(path, "cpu", "backbone weights")
    except (UnsafeCheckpointError, OSError, RuntimeError) as e:
        raise BackboneWeightsError(f"{path}: cannot read backbone weights ({e})") from None
    if isinstance(obj, dict) and "model_args" in obj:
        arch = dict(obj["model_args"]).get("arch")
        if arch != "resnet18_fpn":
            raise BackboneWeightsError(
                f"{path}: detector model_args.arch={arch!r}; only a resnet18_fpn detector's "
                "trunk fits the resnet18 image encoder"
            )
    packed = isinstance(obj, dict) and obj.get("model_format") is not None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if packed:  # the detector shipped with the package: int8 per channel, dequantised
        from segmentation.shipped import unpack_state

        try:
            obj = unpack_state(obj)
        except ValueError as e:
            raise BackboneWeightsError(f"{path}: damaged packed weights ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneWeightsError(f"{path}: not a state dict of tensors")
    ref = keys if keys is not None else _trunk_keys()
    for prefix in TRUNK_PREFIXES:
        sd = {k[len(prefix) :]: v for k, v in obj.items() if k.startswith(prefix)}
        sd = {k: v for k, v in sd.items() if k in ref}
        if len(sd) == len(ref):
            return sd
    raise BackboneWeightsError(
        f"{path}: holds no complete resnet18 trunk (looked under the prefixes "
        f"{', '.join(repr(p) for p in TRUNK_PREFIXES)})"
    )


def _trunk_keys() -> set[str]:
    from torchvision.models import resnet18

    return {k for k in resnet18(weights=None).state_dict() if not k.startswith("fc.")}


def load_backbone(encoder: ResNetImageEncoder, path: str | Path) -> int:
    """Copy the trunk weights of ``path`` into ``encoder``; returns how many tensors.

    The mean / log-variance heads stay as initialised. Shapes are checked first, so a
    mismatching file changes nothing.
    """
    own = encoder.trunk.state_dict()
    sd = backbone_state_dict(path, set(own))
    bad = [k for k, v in sd.items() if own[k].shape != v.shape]
    if bad:
        raise BackboneWeightsError(
            f"{Path(path)}: {len(bad)} trunk tensors have other shapes than resnet18's "
            f"(first: {bad[0]} {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})"
        )
    encoder.trunk.load_state_dict(sd, strict=False)
    return len(sd)
