"""segmentation.pretrained_weights that is not a detector (audit s52 S4): a VAE's
model.pt loaded 20 of 156 weights by name, warned "136 of 156 weights are not in the
file" and trained from scratch. It is now refused before the run's folder is made; a
plain state dict with no name in common is refused as it loads."""

from __future__ import annotations

import pytest
import torch


def _cfg(tmp_path, weights):
    from tests.helpers.run import compose_config

    return compose_config(
        [
            "stage=segment_train",
            "data=synthetic",
            f"paths.root={tmp_path}",
            f"segmentation.pretrained_weights={weights}",
        ]
    )


def test_a_vae_checkpoint_is_refused_before_the_run(tmp_path):
    from pipeline.runner import StageError
    from pipeline.stages.segment_train import _check_start_fits

    p = tmp_path / "vae.pt"
    torch.save({"model": {"enc.0.weight": torch.zeros(2, 2)}, "model_args": {"n_genes": 10}}, p)
    with pytest.raises(
        StageError, match=r"vae\.pt\): not a segmentation model checkpoint: .*n_genes"
    ):
        _check_start_fits(_cfg(tmp_path, p))


def test_a_state_dict_with_no_name_in_common_is_refused(tmp_path):
    from segmentation.model import build_maskrcnn

    args = {"arch": "resnet18_fpn", "fpn_channels": 32, "box_representation": 64}
    p = tmp_path / "other.pt"
    torch.save({"encoder.conv.weight": torch.zeros(3, 3)}, p)
    with pytest.raises(ValueError, match=r"none of the model's \d+ weights is in the file"):
        build_maskrcnn(**args, mask_head_layers=1, pretrained_weights=str(p))
