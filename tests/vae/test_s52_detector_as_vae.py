"""A detector (segment_train) checkpoint given as the VAE model is named as one (audit
s52 S7: it said "VAEArgs.__init__() got an unexpected keyword argument 'arch'")."""

from __future__ import annotations

import pytest
import torch

from vae.checkpoint import CheckpointError, load_checkpoint


def test_a_detector_checkpoint_is_named_and_pointed_to_its_setting(tmp_path):
    p = tmp_path / "model.pt"
    args = {"arch": "resnet18_fpn", "num_classes": 2, "min_size": 512, "input_scale": 1.0}
    torch.save({"model": {}, "model_args": args, "format_version": 1}, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: not a usable vae checkpoint: a detector (segment_train)")
    assert "paths.inputs.segmentation_model" in msg and "arch" not in msg.split(": ", 1)[1][:20]


def test_a_detector_saved_without_arch_is_named_too(tmp_path):
    """A detector's model_args without "arch" (it loads as resnet18_fpn) is one too."""
    p = tmp_path / "model.pt"
    torch.save({"model": {}, "model_args": {"num_classes": 2}, "format_version": 1}, p)
    with pytest.raises(CheckpointError, match="a detector \\(segment_train\\) checkpoint"):
        load_checkpoint(p)


def test_study_load_of_a_detector_says_not_a_usable_vae_checkpoint_once(tmp_path):
    """Study.load wrapped the checkpoint's own 'not a usable vae checkpoint: ...' in a
    second one: 'PATH: not a usable vae checkpoint (not a usable vae checkpoint: a ...)'."""
    from vae.api import Study, StudyError

    train = tmp_path / "train"
    train.mkdir()
    p = train / "model.pt"
    torch.save({"model": {}, "model_args": {"num_classes": 2}, "format_version": 1}, p)
    (train / "latent.h5ad").write_bytes(b"")
    with pytest.raises(StudyError) as e:
        Study.load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: not a usable vae checkpoint") and "a detector" in msg
    assert msg.count("not a usable vae checkpoint") == 1, msg
    assert msg.count(str(p)) == 1, msg
