"""Canonical pose of each crop (``vae.align_pose``): turned and mirrored copies of one
cell come out alike, the maps move with the pixels, and a model that aligns reads one
view."""

from __future__ import annotations

import math

import torch

from tests.helpers.vae_toy import image_tensors
from vae.data import align_pose, canonical_pose, raw_batch, to_batch
from vae.model import TwoBranchVAE, VAEArgs

S = 48


def _cell(angle_deg: float, mirror: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A round pale cell with a two-lobed dark nucleus (big lobe with a bump, small lobe)
    turned by ``angle_deg`` and optionally mirrored: (3, S, S) float, (1, S, S)."""
    c = torch.arange(S, dtype=torch.float32) + 0.5 - S / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    a = math.radians(angle_deg)
    x = xx * math.cos(a) + yy * math.sin(a)
    y = -xx * math.sin(a) + yy * math.cos(a)
    if mirror:
        y = -y
    mask = (xx**2 + yy**2 < (S * 0.4) ** 2).float()
    nuc = (
        ((x - 6) ** 2 + y**2 < 6**2)
        | ((x + 8) ** 2 + y**2 < 3.5**2)
        | ((x - 4) ** 2 + (y - 7) ** 2 < 2.5**2)  # a bump on one side: a skew across too
    )
    img = torch.full((3, S, S), 0.85)
    img[:, nuc] = 0.3
    return img * mask, mask[None]


def _batch(poses):
    imgs, masks = zip(*(_cell(a, m) for a, m in poses), strict=True)
    return torch.stack(imgs), torch.stack(masks)


def test_turned_and_mirrored_copies_of_a_cell_come_out_alike():
    poses = [(0, False), (37, False), (123, True), (250, False), (90, True)]
    img, mask = _batch(poses)
    out, m, _ = align_pose(img, mask)

    def dark(i: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # the nucleus, in the cell
        return (i[0] < 0.5) & (k[0] > 0)

    def iou(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a & b).sum() / (a | b).sum())

    ref_dark = dark(out[0], m[0])
    for i in range(1, len(poses)):
        assert iou(dark(out[i], m[i]), ref_dark) > 0.8, poses[i]
        # before alignment the copies disagree: the test is not trivially true
        assert iou(dark(img[i], mask[i]), dark(img[0], mask[0])) < 0.5, poses[i]
    # the nucleus's long axis lies on x: its extent along x exceeds that along y
    ys, xs = torch.nonzero(ref_dark, as_tuple=True)
    assert float(xs.float().std()) > 1.5 * float(ys.float().std())
    assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_rows_without_an_image_get_the_identity():
    img, mask = _batch([(30, False)])
    img = torch.cat([img, torch.zeros_like(img)])
    mask = torch.cat([mask, torch.zeros_like(mask)])
    theta = canonical_pose(img, mask)
    assert torch.allclose(theta[1], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    assert not torch.allclose(theta[0], theta[1])


def test_to_batch_scores_the_canonical_pose_and_encodes_the_crop_as_given():
    img, mask = _batch([(20, False), (200, True), (75, False)])
    crops = (img * 255).round().byte()
    masks = mask.byte()
    nuc = ((img[:, :1] < 0.5) & (mask > 0)).byte()
    d = image_tensors(crops, masks, nucleus=nuc)
    idx = torch.arange(3)
    cpu = torch.device("cpu")
    a = to_batch(raw_batch(d, idx), cpu, True, torch.Generator().manual_seed(1), align=True)
    b = to_batch(raw_batch(d, idx), cpu, True, torch.Generator().manual_seed(9), align=True)
    # the scored view has no random pose: two generators give the same target...
    assert torch.equal(a.image, b.image) and torch.equal(a.nucleus, b.nucleus)
    # ...while the encoder reads randomly flipped crops
    assert not torch.equal(a.encoder_image, b.encoder_image)
    dark = (a.image[:, 0] < 0.5) & (a.mask[:, 0] > 0)
    moved = a.nucleus[:, 0] > 0.5
    iou = (dark & moved).sum((1, 2)).float() / (dark | moved).sum((1, 2)).float()
    assert float(iou.min()) > 0.8  # the nucleus map turned with the pixels
    # the three poses of one cell are one target
    for i in (1, 2):
        same = (dark[i] & dark[0]).sum() / (dark[i] | dark[0]).sum()
        assert float(same) > 0.7
    # without augmentation the encoder reads the masked crop as given
    plain = to_batch(raw_batch(d, idx), cpu)
    ev = to_batch(raw_batch(d, idx), cpu, align=True)
    assert torch.equal(ev.encoder_image, plain.image) and torch.equal(ev.encoder_mask, plain.mask)
    assert plain.enc_image is None and torch.equal(plain.encoder_image, plain.image)
    assert not torch.equal(ev.image, plain.image)


def test_a_model_that_aligns_trains_on_the_canonical_target():
    """One step of the loss: the image terms score the aligned view (the decoder's
    output is compared with ``batch.image``), the encoder reads ``encoder_image``."""
    from vae.losses import LossWeights
    from vae.train import TrainArgs, forward_loss

    torch.manual_seed(0)
    img, mask = _batch([(20, False), (200, True)])
    img = torch.nn.functional.interpolate(img, size=16, mode="area")
    mask = (torch.nn.functional.interpolate(mask, size=16, mode="area") > 0.5).float()
    d = image_tensors((img * 255).round().byte(), mask.byte())
    model = TwoBranchVAE(
        VAEArgs(
            n_genes=2,
            crop_size=16,
            channels=[8, 8],
            expression_likelihood="gaussian",
            align_pose=True,
        )
    )
    batch = to_batch(raw_batch(d, torch.arange(2)), torch.device("cpu"), align=True)
    args = TrainArgs(weights=LossWeights())
    torch.manual_seed(1)
    terms = forward_loss(model, batch, beta=1.0, capacity=0.0, args=args, n_shared=16)
    # the same encoder input and posterior sample, scored against the crop as given
    other = to_batch(raw_batch(d, torch.arange(2)), torch.device("cpu"))
    assert torch.equal(other.encoder_image, batch.encoder_image)
    torch.manual_seed(1)
    t2 = forward_loss(model, other, beta=1.0, capacity=0.0, args=args, n_shared=16)
    assert torch.isfinite(terms.total)
    assert float(terms.kl.detach()) == float(t2.kl.detach())  # the same posterior...
    assert abs(float(terms.image.detach() - t2.image.detach())) > 1e-4  # ...scored on another view
