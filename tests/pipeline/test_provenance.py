"""Which code made an output: the code record of manifests and checkpoints, and a
checkpoint from a newer version refused as such (not as a corrupt file)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
from pathlib import Path

import pytest
import torch

from segmentation import provenance
from segmentation.io import DETECTOR_FORMAT_VERSION, load_torch_file
from segmentation.model import detector_newer_problem
from segmentation.provenance import code_record
from tests.helpers.run import ROOT, run_stage_in_process
from tests.helpers.vae_toy import make_paired
from vae.checkpoint import FORMAT_VERSION, CheckpointError, load_model, save_checkpoint

TINY = [
    "vae.channels=[8,16]",
    "vae.hidden=[16]",
    "vae.n_latent=4",
    "vae.n_private=0",
    "trainer.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.max_minutes=null",
    "trainer.projector_max_cells=0",
    # in this process: an automatic thread count would stay set for the tests after it
    "hardware.torch_threads=1",
]


def _head() -> str | None:
    p = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return p.stdout.strip() if p.returncode == 0 else None


@pytest.fixture
def fresh_record():
    """A code record computed again in the test (and again after it)."""
    provenance._record.cache_clear()
    yield
    provenance._record.cache_clear()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A one-epoch stage=train run in this process -> its stage folder."""
    tmp = tmp_path_factory.mktemp("prov")
    make_paired(24).write_h5ad(tmp / "paired.h5ad")
    return run_stage_in_process(
        [f"paths.root={tmp / 'out'}", f"paths.inputs.paired={tmp / 'paired.h5ad'}", *TINY],
        "train",
    )


def test_code_record_names_version_revision_and_libraries(fresh_record):
    rec = code_record()
    assert rec["package"] == "wbc-pipeline"
    assert rec["version"] == importlib.metadata.version("wbc-pipeline")
    head = _head()
    if head is not None:  # tests run from a git checkout of the project
        assert rec["git_revision"] == head and isinstance(rec["git_dirty"], bool)
    assert rec["python"].count(".") == 2
    assert rec["libraries"]["torch"] == importlib.metadata.version("torch")
    assert set(rec["libraries"]) == set(provenance.LIBRARIES)
    assert {"torch", "torchvision", "numpy", "anndata", "scanpy"} <= set(rec["libraries"])
    json.dumps(rec)  # plain data: JSON, and a weights_only checkpoint, take it
    # cached per process, and each caller gets its own copy
    rec["libraries"]["torch"] = "changed"
    assert code_record()["libraries"]["torch"] != "changed"


def test_code_record_without_a_checkout_or_git_says_none(fresh_record, monkeypatch, tmp_path):
    """An installed copy (not a checkout) or no git: no revision, never an error."""
    monkeypatch.setattr(provenance, "SOURCE_ROOT", tmp_path)
    rec = code_record()
    assert rec["git_revision"] is None and rec["git_dirty"] is None
    provenance._record.cache_clear()
    monkeypatch.setattr(provenance, "SOURCE_ROOT", ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    rec = code_record()
    assert rec["git_revision"] is None and rec["version"] != ""


def test_stage_manifest_records_the_code_and_the_threads_used(trained: Path):
    man = json.loads((trained / "manifest.json").read_text())
    assert man["status"] == "complete"
    assert man["code"]["package"] == "wbc-pipeline" and man["code"]["version"]
    if _head() is not None:
        assert man["code"]["git_revision"] == _head()
    # the manifest says the threads used next to the setting (null by default: chosen
    # by the machine's load, test_runner.py::test_threads_are_applied_and_logged_once)
    from tests.helpers.run import compose_config

    assert compose_config(["stage=train"]).hardware.torch_threads is None
    assert man["config"]["hardware"]["torch_threads"] == 1
    assert isinstance(man["torch_threads"], int) and man["torch_threads"] == 1


def test_vae_checkpoint_records_format_and_code(trained: Path):
    for name in ("model.pt", "last.pt"):
        ck = load_torch_file(trained / name)
        assert ck["format_version"] == FORMAT_VERSION == 1
        assert ck["code"]["version"] == code_record()["version"]
        assert ck["code"]["git_revision"] == code_record()["git_revision"]


def test_a_newer_format_is_refused_as_newer_not_as_corrupt(trained: Path, tmp_path: Path):
    ck = load_torch_file(trained / "model.pt")
    ck["format_version"] = FORMAT_VERSION + 1
    ck["code"] = dict(ck["code"], version="9.1.0", git_revision="f" * 40)
    save_checkpoint(tmp_path / "newer.pt", ck)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "newer.pt")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'newer.pt'}: written by a newer version of wbc-pipeline")
    assert f"format {FORMAT_VERSION + 1}, 9.1.0, git ffffffffffff" in msg
    assert f"this is format {FORMAT_VERSION}" in msg and "Upgrade the package" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("with_format", [True, False])
def test_unknown_model_args_are_named_not_called_corrupt(trained, tmp_path, with_format):
    """A VAEArgs field this code lacks (the Nov-30 code reading a Dec-4 study's
    encoder_channels; or align_pose, which existed for a while on 2026-11-30): named,
    and called newer only when the format number says so (found on review: an old
    study's align_pose was called "written by a newer version")."""
    ck = load_torch_file(trained / "model.pt")
    ck["model_args"]["future_head"] = True
    ck["model_args"]["a_wider_head"] = 3
    if not with_format:
        del ck["format_version"], ck["code"]
    save_checkpoint(tmp_path / "extra.pt", ck)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "extra.pt")
    msg = str(e.value)
    assert "model_args hold a_wider_head, future_head, which this version of" in msg
    assert "written by another version, older or newer" in msg and "newer version" not in msg
    if not with_format:
        assert "(format 0, code not recorded; this is format 1" in msg
    ck["format_version"] = FORMAT_VERSION + 1  # a newer format: newer, and the keys named
    save_checkpoint(tmp_path / "extra2.pt", ck)
    with pytest.raises(CheckpointError, match="written by a newer version") as e:
        load_model(tmp_path / "extra2.pt")
    assert "model_args hold a_wider_head, future_head, which this version does not know" in (
        str(e.value)
    )


def test_a_removed_setting_at_its_no_effect_value_loads(trained: Path, tmp_path: Path):
    """A study of 2026-11-30 trained while vae.align_pose existed (off) builds the same
    network: it loads; align_pose=True is named as another version's setting."""
    ck = load_torch_file(trained / "model.pt")
    del ck["format_version"], ck["code"]
    ck["model_args"]["align_pose"] = False
    save_checkpoint(tmp_path / "pose_off.pt", ck)
    model, _ = load_model(tmp_path / "pose_off.pt")
    ref, _ = load_model(trained / "model.pt")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    ck["model_args"]["align_pose"] = True
    save_checkpoint(tmp_path / "pose_on.pt", ck)
    with pytest.raises(CheckpointError, match="model_args hold align_pose"):
        load_model(tmp_path / "pose_on.pt")


def test_an_old_checkpoint_without_format_loads_as_before(trained: Path, tmp_path: Path):
    ck = load_torch_file(trained / "model.pt")
    del ck["format_version"], ck["code"]
    save_checkpoint(tmp_path / "old.pt", ck)
    old, meta_old = load_model(tmp_path / "old.pt")
    new, meta_new = load_model(trained / "model.pt")
    assert meta_old == meta_new
    for k, v in new.state_dict().items():
        assert torch.equal(v, old.state_dict()[k]), k


def test_a_detector_given_as_the_vae_is_still_not_a_vae(tmp_path: Path):
    """Unknown model_args of another kind of checkpoint are not 'a newer version'."""
    from segmentation.shipped import SHIPPED_DETECTOR

    with pytest.raises(CheckpointError, match="not a usable vae checkpoint"):
        load_model(SHIPPED_DETECTOR)


def test_detector_newer_format_or_args_are_named(trained: Path):
    from segmentation.shipped import SHIPPED_DETECTOR

    ck = load_torch_file(SHIPPED_DETECTOR)
    assert detector_newer_problem(ck) is None  # format 0: reads as before
    ck["format_version"] = DETECTOR_FORMAT_VERSION + 1
    why = detector_newer_problem(ck)
    assert why.startswith("written by a newer version of wbc-pipeline (format 2, code not")
    ck["format_version"] = DETECTOR_FORMAT_VERSION
    ck["model_args"] = dict(ck["model_args"], future_neck=1)
    assert "model_args hold future_neck" in detector_newer_problem(ck)
    assert "another version, older or newer" in detector_newer_problem(ck)
    # a VAE's model.pt given as the detector is another mix-up, said elsewhere
    assert detector_newer_problem(load_torch_file(trained / "model.pt")) is None


def test_detector_checkpoint_records_format_and_code(tmp_path: Path):
    """segment_train's model.pt: format_version and code; the manifest: the set threads."""
    from segmentation.model import load_checkpoint
    from tests.helpers.seg_synth import make_coco_smears
    from tests.segmentation.test_seg_train import TINY_TRAIN

    make_coco_smears(tmp_path / "smears", n_images=3, size=96, cells=2, radius=10, val=1)
    d = run_stage_in_process(
        [
            *TINY_TRAIN[1:],
            f"paths.root={tmp_path / 'out'}",
            f"paths.inputs.smears={tmp_path / 'smears'}",
        ],
        "segment_train",
    )
    _, ck = load_checkpoint(d / "model.pt")  # still a detector this code reads
    assert ck["format_version"] == DETECTOR_FORMAT_VERSION == 1
    assert ck["code"]["git_revision"] == code_record()["git_revision"]
    man = json.loads((d / "manifest.json").read_text())
    assert man["torch_threads"] == 1 and man["code"]["version"] == code_record()["version"]
