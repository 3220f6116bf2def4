"""Issue 11.1: a checkpoint never runs code; every route refuses a hostile pickle."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import runner
from segmentation.io import UnsafeCheckpointError, load_torch_file
from segmentation.runtime import rng_state
from tests.faults.conftest import cfg_for, write_hostile_checkpoint
from tests.helpers.run import ROOT


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    return write_hostile_checkpoint(tmp_path / "evil.pt", marker), marker


def test_plain_torch_load_would_run_the_code(hostile):
    """The crafted file is real: an unsafe load does write the marker."""
    path, marker = hostile
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_safe_loader_refuses_and_runs_nothing(hostile):
    path, marker = hostile
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load.*posix\.system"):
        load_torch_file(path)
    assert not marker.exists()


def test_library_routes_refuse(hostile):
    from segmentation.model import build_maskrcnn, load_checkpoint
    from vae.checkpoint import CheckpointError, load_model

    path, marker = hostile
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match="segmentation.pretrained_weights"):
        build_maskrcnn(pretrained_weights=str(path), fpn_channels=16, box_representation=16)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_own_checkpoints_still_load(tmp_path):
    """RNG state (numpy arrays, as older checkpoints stored it), tensors and plain data."""
    gen = torch.Generator().manual_seed(1)
    ck = {"rng": rng_state(gen), "x": np.float64(2.5), "hist": [{"a": 1.0}], "t": torch.ones(3)}
    torch.save(ck, tmp_path / "ok.pt")
    back = load_torch_file(tmp_path / "ok.pt")
    assert back["x"] == 2.5 and back["hist"] == [{"a": 1.0}]
    assert np.array_equal(back["rng"]["numpy"][1], ck["rng"]["numpy"][1])


def test_text_and_truncated_files_are_clear(tmp_path):
    (tmp_path / "notes.pt").write_text("not a model\n")
    with pytest.raises(UnsafeCheckpointError, match="not a torch checkpoint"):
        load_torch_file(tmp_path / "notes.pt")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsafeCheckpointError, match="not a torch checkpoint"):
        load_torch_file(tmp_path / "cut.pt")


def test_no_unsafe_torch_load_anywhere():
    """Every torch.load of the code goes through load_torch_file (weights_only=True)."""
    hits = []
    for py in [
        *ROOT.glob("pipeline/**/*.py"),
        *ROOT.glob("segmentation/**/*.py"),
        *ROOT.glob("vae/**/*.py"),
        *ROOT.glob("scripts/**/*.py"),
    ]:
        for i, line in enumerate(py.read_text().splitlines(), 1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                hits.append(f"{py.relative_to(ROOT)}:{i}: {line.strip()}")
            if "weights_only=False" in line:
                hits.append(f"{py.relative_to(ROOT)}:{i}: {line.strip()}")
    assert hits == []


@pytest.mark.parametrize(
    "stage,inputs",
    [
        ("segment", ["paths.inputs.segmentation_model={ck}", "paths.inputs.smears={tmp}"]),
        (
            "evaluate",
            [
                "paths.inputs.model={ck}",
                "paths.inputs.latent={tmp}/x.h5ad",
                "paths.inputs.paired={tmp}/x.h5ad",
            ],
        ),
    ],
)
def test_stage_routes_refuse_before_any_folder(tmp_path, hostile, capsys, stage, inputs):
    path, marker = hostile
    (tmp_path / "x.h5ad").write_text("unused")
    root = tmp_path / "out"
    cfg = cfg_for(root, stage, *[a.format(ck=path, tmp=tmp_path) for a in inputs])
    assert runner.main(cfg) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "Traceback" not in err
    assert not marker.exists()
    assert not (root / "t" / stage).exists()


def test_text_file_as_segmentation_model_is_one_message(tmp_path, capsys):
    model = tmp_path / "model.pt"
    model.write_text("this is a text file\n")
    root = tmp_path / "out"
    cfg = cfg_for(
        root,
        "segment",
        f"paths.inputs.segmentation_model={model}",
        f"paths.inputs.smears={tmp_path}",
    )
    assert runner.main(cfg) == 2
    err = capsys.readouterr().err
    assert "not a torch checkpoint" in err and "Traceback" not in err
    assert not (root / "t" / "segment").exists()
    assert not list(root.rglob(".segment_parts"))


def test_segment_train_resume_refuses_hostile_checkpoint(tmp_path, capsys):
    """The resume route: a hostile model.pt planted in an unfinished segment_train folder."""
    import json

    from tests.helpers.seg_synth import make_coco_smears

    smears = tmp_path / "smears"
    make_coco_smears(smears, n_images=2, size=64, cells=1, radius=8, val=1)
    root = tmp_path / "out"
    d = root / "t" / "segment_train"
    d.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    write_hostile_checkpoint(d / "model.pt", marker)
    (d / "manifest.json").write_text(json.dumps({"stage": "segment_train", "status": "failed"}))
    cfg = cfg_for(
        root,
        "segment_train",
        "resume=true",
        f"paths.inputs.smears={smears}",
        "segmentation.epochs=1",
    )
    assert runner.main(cfg) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "Traceback" not in err
    assert not marker.exists()
