"""The resnet18 image encoder and its local pretrained trunk (vae/backbone.py, stage=train)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from segmentation.model import build_maskrcnn, save_checkpoint
from tests.helpers.run import run_stage_in_process
from tests.helpers.vae_toy import make_paired
from vae.backbone import BackboneWeightsError, ResNetImageEncoder, load_backbone
from vae.model import TwoBranchVAE, VAEArgs


def _trunk_equal(enc: ResNetImageEncoder, sd: dict[str, torch.Tensor]) -> bool:
    own = enc.trunk.state_dict()
    return all(torch.equal(own[k], v) for k, v in sd.items() if not k.startswith("fc."))


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A segment_train-style checkpoint of a (random) resnet18_fpn Mask R-CNN."""
    torch.manual_seed(3)
    model_args = {"arch": "resnet18_fpn", "fpn_channels": 32, "box_representation": 64}
    model = build_maskrcnn(**model_args)
    path = tmp_path_factory.mktemp("det") / "model.pt"
    save_checkpoint(path, model, model_args, epoch=1)
    body = model.backbone.body.state_dict()
    return path, body


def test_encoder_gives_one_gaussian_per_crop_and_ignores_background():
    enc = ResNetImageEncoder(64, 10).eval()
    g = torch.Generator().manual_seed(0)
    img, mask = torch.rand(3, 3, 64, 64, generator=g), torch.zeros(3, 1, 64, 64)
    mask[:, :, 16:48, 16:48] = 1
    mu, logvar = enc(img, mask)
    assert mu.shape == logvar.shape == (3, 10)
    other = img.clone()
    other[:, :, :8] = torch.rand(3, 3, 8, 64, generator=g)  # background only
    assert torch.allclose(enc(other, mask)[0], mu)


def test_trunk_loads_from_a_detector_checkpoint(detector_file):
    path, body = detector_file
    enc = ResNetImageEncoder(32, 6)
    assert not _trunk_equal(enc, body)
    assert load_backbone(enc, path) == len(body)
    assert _trunk_equal(enc, body)


def test_trunk_loads_from_the_shipped_detector():
    from segmentation.model import load_checkpoint
    from segmentation.shipped import shipped_detector

    det, _ = load_checkpoint(shipped_detector())
    enc = ResNetImageEncoder(32, 6)
    load_backbone(enc, shipped_detector())
    assert _trunk_equal(enc, det.backbone.body.state_dict())


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module"])
def test_trunk_loads_from_a_torchvision_state_dict(tmp_path, wrap):
    torch.manual_seed(5)
    sd = resnet18(weights=None).state_dict()  # with fc.*: ignored
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd},
        "module": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    torch.save(obj, tmp_path / "r18.pth")
    enc = ResNetImageEncoder(32, 6)
    load_backbone(enc, tmp_path / "r18.pth")
    assert _trunk_equal(enc, sd)


def test_bad_weight_files_are_refused_and_change_nothing(tmp_path):
    enc = ResNetImageEncoder(32, 6)
    before = {k: v.clone() for k, v in enc.trunk.state_dict().items()}
    with pytest.raises(BackboneWeightsError, match="no such backbone weights file"):
        load_backbone(enc, tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(BackboneWeightsError, match="junk.pt: cannot read"):
        load_backbone(enc, tmp_path / "junk.pt")
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "partial.pt")
    with pytest.raises(BackboneWeightsError, match="no complete resnet18 trunk"):
        load_backbone(enc, tmp_path / "partial.pt")
    torch.save({"model": {}, "model_args": {"arch": "resnet50_fpn"}}, tmp_path / "r50.pt")
    with pytest.raises(BackboneWeightsError, match="arch='resnet50_fpn'"):
        load_backbone(enc, tmp_path / "r50.pt")
    wide = {
        k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if v.dim() else v for k, v in before.items()
    }
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(BackboneWeightsError, match="other shapes"):
        load_backbone(enc, tmp_path / "wide.pt")
    assert all(torch.equal(enc.trunk.state_dict()[k], v) for k, v in before.items())


def test_model_args_check_the_resnet18_encoder():
    with pytest.raises(ValueError, match="multiple of 32"):
        VAEArgs(n_genes=4, crop_size=48, channels=[8, 16], image_encoder="resnet18")
    with pytest.raises(ValueError, match="image_input='rgb'"):
        VAEArgs(n_genes=4, crop_size=32, image_encoder="resnet18", image_input="stain")
    with pytest.raises(ValueError, match="image_encoder='vit'"):
        VAEArgs(n_genes=4, crop_size=32, image_encoder="vit")
    # checkpoints saved before the field existed build the conv encoder
    assert VAEArgs(n_genes=4, crop_size=32).image_encoder == "conv"


def test_dihedral_mean_code_stays_pose_free_with_resnet18():
    torch.manual_seed(0)
    model = TwoBranchVAE(
        VAEArgs(n_genes=0, crop_size=32, channels=[8, 16], image_encoder="resnet18", encode_views=8)
    ).eval()
    img, mask = torch.rand(2, 3, 32, 32), torch.ones(2, 1, 32, 32)
    has = torch.ones(2, dtype=torch.bool)
    a = model.encode(img, None, has, ~has, mask, views=8).image[0]
    b = model.encode(img.flip(-1).rot90(1, (-2, -1)), None, has, ~has, mask, views=8).image[0]
    assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------- stage=train
TINY = [
    "vae.channels=[8,16]",
    "vae.hidden=[16]",
    "vae.n_latent=4",
    "vae.n_private=0",
    "vae.image_encoder=resnet18",
    "trainer.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.max_minutes=null",
    "trainer.projector_max_cells=0",
    "hardware.torch_threads=1",
]


def test_stage_train_starts_the_encoder_from_the_studys_detector(tmp_path, detector_file):

    from pipeline.runner import StageError

    det, body = detector_file
    make_paired(24, size=32).write_h5ad(tmp_path / "paired.h5ad")
    # in this process: the CLI's error path is tests/pipeline's; interpreter start-ups
    # were most of this test's time
    common = [f"paths.root={tmp_path / 'out'}", f"paths.inputs.paired={tmp_path / 'paired.h5ad'}"]
    d = run_stage_in_process(
        [
            *common,
            *TINY,
            "experiment=det",
            "trainer.lr=1e-12",  # the trunk stays what was loaded
            "vae.image_backbone_weights=detector",
            f"paths.inputs.segmentation_model={det}",
        ],
        "train",
    )
    assert "resnet18 trunk from" in (d / "train.log").read_text()
    ck = torch.load(d / "model.pt", weights_only=False)
    assert ck["model_args"]["image_encoder"] == "resnet18"
    pre = "image_encoder.trunk."
    trunk = {k[len(pre) :]: v for k, v in ck["model"].items() if k.startswith(pre)}
    # weights equal (BatchNorm running statistics move even at lr 0)
    assert all(
        torch.allclose(trunk[k], v, atol=1e-6)
        for k, v in body.items()
        if not k.endswith(("_mean", "_var", "_tracked"))
    )

    # misuse: one clear message each, nothing written
    for extra, message in [
        (
            ["vae.image_encoder=conv", f"vae.image_backbone_weights={det}"],
            "needs vae.image_encoder=resnet18",
        ),
        ([f"vae.image_backbone_weights={tmp_path / 'nope.pt'}"], "nope.pt: no such file"),
        (
            ["vae.image_encoder=vit"],
            "vae.image_encoder='vit' is not an option: valid: conv, resnet18",
        ),
    ]:
        with pytest.raises(StageError) as err:
            run_stage_in_process([*common, *TINY, "experiment=bad", *extra], "train")
        assert message in str(err.value), err.value
        assert not (tmp_path / "out" / "bad" / "train" / "model.pt").exists()
