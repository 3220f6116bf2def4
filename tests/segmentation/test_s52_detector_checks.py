"""stage=segment with a detector that finds nothing (audit s52 M3, S8).

A checkpoint whose weights are all NaN loaded and gave 0 detections, 0 cells, exit 0
with no warning; a run that keeps no cell in any image said only "0 cells kept".
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.io import UnsafeCheckpointError
from segmentation.model import load_checkpoint
from tests.helpers.seg_synth import disk, untrained_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _spoiled(ckpt: Path, tmp_path: Path, how) -> Path:
    ck = torch.load(ckpt, weights_only=True)
    how(ck)
    out = tmp_path / "spoiled.pt"
    torch.save(ck, out)
    return out


def test_nonfinite_weights_are_refused_naming_the_file(ckpt, tmp_path):
    def nan_all(ck):
        for v in ck["model"].values():
            if v.is_floating_point():
                v.fill_(float("nan"))

    p = _spoiled(ckpt, tmp_path, nan_all)
    with pytest.raises(UnsafeCheckpointError, match=r"spoiled\.pt: \d+ of its \d+ weight tensors"):
        load_checkpoint(p)

    def one_inf(ck):
        k = next(k for k, v in ck["model"].items() if k.startswith("roi_heads."))
        ck["model"][k].view(-1)[0] = float("inf")

    with pytest.raises(UnsafeCheckpointError, match=r"1 of its .* NaN or infinite .*roi_heads\."):
        load_checkpoint(_spoiled(ckpt, tmp_path, one_inf))
    load_checkpoint(ckpt)  # a finite one loads


def test_nonfinite_weights_reads_float8():
    """torch.isfinite is not implemented for float8: an fp8 state dict raised a bare
    NotImplementedError (68894a5); its tensors are upcast for the check."""
    import torch

    from segmentation.model import nonfinite_weights

    ok = torch.tensor([0.5, -1.0, 2.0]).to(torch.float8_e4m3fn)
    bad = torch.tensor([0.5, float("nan")]).to(torch.float8_e4m3fn)
    assert nonfinite_weights({"a.weight": ok, "b.weight": bad}) == ["b.weight"]
    assert ok.dtype == torch.float8_e4m3fn  # the state is not changed


def test_a_run_that_keeps_no_cell_warns(ckpt, tmp_path, caplog):
    from tests.helpers.run import run_stage_in_process

    d = tmp_path / "smears"
    d.mkdir()
    for i in range(2):
        img = np.full((96, 128, 3), (230, 200, 200), np.uint8)
        img[disk(96, 128, 40 + 10 * i, 50, 14)] = (120, 60, 160)
        Image.fromarray(img).save(d / f"s{i}.png")
    with caplog.at_level(logging.WARNING):
        run_stage_in_process(
            [
                "experiment=t",
                f"paths.root={tmp_path / 'out'}",
                f"paths.inputs.smears={d}",
                f"paths.inputs.segmentation_model={ckpt}",
                "hardware.torch_threads=1",
                "segmentation.crop_size=32",
                "segmentation.tile_size=128",
                "segmentation.tile_overlap=32",
                "segmentation.score_threshold=0.0",
                "segmentation.min_area=100000",
            ],
            "segment",
        )
    msg = [r.getMessage() for r in caplog.records if "no cell kept" in r.getMessage()]
    assert len(msg) == 1 and msg[0].startswith("no cell kept in any of 2 images (dropped: ")
    assert "too_small" in msg[0]


def test_no_detection_at_all_names_what_to_check():
    from pipeline.stages.segment import no_cells_message

    counts = {"images_read": 3, "detections": 0, "kept": 0}
    counts.update({k: 0 for k in __import__("segmentation.crops").crops.FLAGS})
    m = no_cells_message(counts)
    assert m.startswith("no cell kept in any of 3 images (dropped: none;")
    assert "paths.inputs.segmentation_model" in m


def test_weights_that_do_not_fit_name_the_first_misfit(ckpt, tmp_path):
    """The message was cut at torch's header line: "its weights do not fit its
    model_args (Error(s) in loading state_dict for MaskRCNN:)"."""

    def wider(ck):
        ck["model_args"]["fpn_channels"] = 48

    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(_spoiled(ckpt, tmp_path, wider))
    msg = str(e.value)
    assert "spoiled.pt: its weights do not fit its model_args (size mismatch for " in msg
    assert "Error(s) in loading" not in msg

    def lost(ck):
        del ck["model"]["roi_heads.box_predictor.cls_score.weight"]

    with pytest.raises(UnsafeCheckpointError, match=r"Missing key\(s\) in state_dict: .*cls_score"):
        load_checkpoint(_spoiled(ckpt, tmp_path, lost))


def test_a_refused_detector_leaves_no_scratch_folder(ckpt, tmp_path):
    """The detector is loaded before stage=segment makes its .segment_parts scratch
    folder: a refused checkpoint left an empty one behind (audit s52 nit)."""
    from pipeline.stages.segment import PARTS
    from tests.helpers.run import run_stage_in_process

    def nan_all(ck):
        for v in ck["model"].values():
            if v.is_floating_point():
                v.fill_(float("nan"))

    d = tmp_path / "smears"
    d.mkdir()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(d / "s0.png")
    out = tmp_path / "out"
    with pytest.raises(Exception, match=r"NaN or infinite"):
        run_stage_in_process(
            [
                "experiment=t",
                f"paths.root={out}",
                f"paths.inputs.smears={d}",
                f"paths.inputs.segmentation_model={_spoiled(ckpt, tmp_path, nan_all)}",
                "hardware.torch_threads=1",
            ],
            "segment",
        )
    assert not list(out.rglob(PARTS))
