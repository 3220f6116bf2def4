"""The detector shipped with the package: file, compact format, default of stage=segment."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from segmentation.model import build_maskrcnn, load_checkpoint
from segmentation.shipped import (
    MIN_PACKED_NUMEL,
    PACKED_FORMAT,
    SHIPPED_DETECTOR,
    pack_state,
    unpack_state,
    wants_scale_estimate,
)
from tests.helpers.run import ROOT, SHARED_DATA, needs_shared, run_pipeline, run_stage_in_process

SHARED = SHARED_DATA
BCCD = SHARED / "smears" / "bccd"


def test_shipped_file_is_small_and_runs():
    assert SHIPPED_DETECTOR.is_file()
    assert SHIPPED_DETECTOR.stat().st_size <= 25e6
    model, ck = load_checkpoint(SHIPPED_DETECTOR)
    assert ck["model_format"] == PACKED_FORMAT and ck["estimate_scale"] is True
    assert ck["input_scale"] is None and ck["cell_px"] > 0
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))])[0]
    assert set(out) >= {"boxes", "scores", "masks"}
    assert out["masks"].shape[-2:] == (96, 128)


def test_pyproject_ships_the_weights():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = cfg["tool"]["setuptools"]["package-data"]["segmentation"]
    pkg = ROOT / "segmentation"
    assert any(SHIPPED_DETECTOR in set(pkg.glob(g)) for g in globs)


def test_pack_round_trip_error_within_half_a_step(tmp_path):
    torch.manual_seed(0)
    args = {"arch": "resnet18_fpn", "min_size": 64, "max_size": 64, "fpn_channels": 32}
    model = build_maskrcnn(**args)
    state = model.state_dict()
    packed = pack_state(state)
    back = unpack_state(packed)
    assert set(back) == set(state)
    n_packed = 0
    for k, v in state.items():
        if isinstance(packed[k], dict):
            n_packed += 1
            assert packed[k]["q"].dtype == torch.int8
            step = packed[k]["scale"].view(-1, *[1] * (v.dim() - 1))
            assert ((back[k] - v).abs() <= step / 2 + 1e-7).all(), k
        else:  # small or integer tensors are kept exactly
            assert v.numel() < MIN_PACKED_NUMEL or v.dim() < 2 or not v.is_floating_point()
            assert torch.equal(back[k], v), k
    assert n_packed > 10
    # the packed file loads through load_checkpoint into the same network
    torch.save(
        {"model": packed, "model_format": PACKED_FORMAT, "model_args": args}, tmp_path / "p.pt"
    )
    again, _ = load_checkpoint(tmp_path / "p.pt")
    for k, v in again.state_dict().items():
        assert torch.equal(v, back[k])


def test_unknown_format_and_damaged_entries_are_named(tmp_path):
    from segmentation.io import UnsafeCheckpointError

    args = {"arch": "resnet18_fpn", "min_size": 64, "max_size": 64, "fpn_channels": 32}
    state = build_maskrcnn(**args).state_dict()
    packed = pack_state(state)
    torch.save({"model": packed, "model_format": "int4/9", "model_args": args}, tmp_path / "a.pt")
    with pytest.raises(UnsafeCheckpointError, match="int4/9"):
        load_checkpoint(tmp_path / "a.pt")
    k = next(k for k, v in packed.items() if isinstance(v, dict))
    packed[k] = {"q": packed[k]["q"], "scale": torch.ones(3)}
    torch.save(
        {"model": packed, "model_format": PACKED_FORMAT, "model_args": args}, tmp_path / "b.pt"
    )
    with pytest.raises(UnsafeCheckpointError, match="damaged weights"):
        load_checkpoint(tmp_path / "b.pt")


def test_scale_estimate_follows_the_detector_unless_set():
    assert wants_scale_estimate(None, {"estimate_scale": True})
    assert not wants_scale_estimate(None, {})
    assert not wants_scale_estimate(False, {"estimate_scale": True})
    assert wants_scale_estimate(True, {})


IMAGES = ["BloodImage_00003.jpg", "BloodImage_00004.jpg"]  # one white cell each (VOC)


def _voc_wbc_box(name: str) -> list[float]:
    import xml.etree.ElementTree as ET

    root = ET.parse(BCCD / "Annotations" / name.replace(".jpg", ".xml")).getroot()
    wbc = next(o for o in root.iter("object") if o.findtext("name") == "WBC")
    return [float(wbc.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]


def _iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


@needs_shared(BCCD, "BCCD smears")
def test_stage_segment_without_a_model_uses_the_shipped_detector(tmp_path):
    """A user's smears, no segment_train run, no model, no scale: each white cell comes out."""
    import anndata as ad

    smears = tmp_path / "smears"
    smears.mkdir()
    for name in IMAGES:
        shutil.copy(BCCD / "JPEGImages" / name, smears)
    r = run_pipeline(
        [
            "stage=segment",
            "experiment=shipped_test",
            f"paths.root={tmp_path / 'out'}",
            f"paths.inputs.smears={smears}",
            "hardware.torch_threads=1",
            "segmentation.crop_size=32",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "detector shipped with the package" in log
    # the magnification is measured, not the simulator's input_scale: the fields share
    # one size and folder (one microscope), so each is held near the median of all
    for name in IMAGES:
        assert re.search(rf"scale {name}: white ruler .* median of {len(IMAGES)} images", log)
    out = tmp_path / "out" / "shipped_test" / "segment"
    a = ad.read_h5ad(out / "cells.h5ad")
    assert sorted(a.obs["image"]) == IMAGES  # one kept cell per image
    for _, row in a.obs.iterrows():
        box = row[["x0", "y0", "x1", "y1"]].to_numpy(float)
        assert _iou(box, _voc_wbc_box(row["image"])) > 0.5
    manifest = json.loads((out / "manifest.json").read_text())
    assert str(SHIPPED_DETECTOR) in json.dumps(manifest)


def _segment_overrides(tmp_path: Path) -> list[str]:
    smears = tmp_path / "smears"
    smears.mkdir()
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(smears / "a.png")
    return [
        "experiment=shipped_bad",
        f"paths.root={tmp_path / 'out'}",
        f"paths.inputs.smears={smears}",
        "hardware.torch_threads=1",
    ]


def test_corrupt_shipped_detector_is_a_clear_error(tmp_path, monkeypatch):
    from pipeline.runner import StageError

    bad = tmp_path / "weights" / "wbc_detector.pt"
    bad.parent.mkdir()
    bad.write_bytes(SHIPPED_DETECTOR.read_bytes()[:1000])  # a truncated copy
    monkeypatch.setattr("segmentation.shipped.SHIPPED_DETECTOR", bad)
    with pytest.raises(StageError) as e:
        run_stage_in_process(_segment_overrides(tmp_path), "segment")
    msg = str(e.value)
    assert "the shipped detector" in msg and str(bad) in msg and "reinstall" in msg
    assert not (tmp_path / "out" / "shipped_bad" / "segment").exists()


def test_missing_shipped_detector_is_a_clear_error(tmp_path, monkeypatch):
    from pipeline.artifacts import StageInputError

    gone = tmp_path / "weights" / "wbc_detector.pt"
    monkeypatch.setattr("segmentation.shipped.SHIPPED_DETECTOR", gone)
    with pytest.raises(StageInputError) as e:
        run_stage_in_process(_segment_overrides(tmp_path), "segment")
    msg = str(e.value)
    assert "stage=segment_train" in msg and "paths.inputs.segmentation_model" in msg
    assert f"shipped detector {gone}" in msg and "missing" in msg


@needs_shared(BCCD, "BCCD smears")
def test_bf16_backbone_finds_the_same_cells_as_fp32():
    """segmentation.cpu_bf16: the backbone in bf16, the heads in fp32 -> the same white
    cells, boxes within a few px, scores within 0.05; off leaves the model as it was."""
    from segmentation.inference import BF16Backbone, MaskRCNNDetector, resize_image
    from segmentation.io import read_rgb

    img = resize_image(read_rgb(BCCD / "JPEGImages" / IMAGES[0]).image, 0.21)
    runs = {}
    for flag in (False, True):
        model, _ = load_checkpoint(SHIPPED_DETECTOR)
        det = MaskRCNNDetector(model, "cpu", cpu_bf16=flag)
        assert isinstance(det.model.backbone, BF16Backbone) is flag and det.cpu_bf16 is flag
        if flag:
            feats = det.model.backbone(
                torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            )
            assert all(v.dtype == torch.float32 for v in feats.values())
        d = det([img])[0]
        keep = d.scores >= 0.5
        runs[flag] = (d.boxes[keep], d.scores[keep])
    (b32, s32), (b16, s16) = runs[False], runs[True]
    assert len(b32) >= 1 and len(b16) == len(b32)
    order32, order16 = np.argsort(b32[:, 0]), np.argsort(b16[:, 0])
    assert np.abs(b32[order32] - b16[order16]).max() < 4.0
    assert np.abs(s32[order32] - s16[order16]).max() < 0.05
    assert _iou(b16[order16][0] / 0.21, _voc_wbc_box(IMAGES[0])) > 0.5
