"""hardware=gpu hardware.fallback_to_cpu=true on a machine without CUDA (a user audit):
manifest.json recorded kind gpu, devices [0], precision bf16, num_workers 4 and nothing
said the run used the CPU; torch warned of 4 DataLoader workers on 2 cores."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from pipeline import hardware, runner
from tests.helpers.run import compose_config


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    hardware.forget_warnings()
    yield
    hardware.forget_warnings()


def test_the_manifest_records_the_cpu_a_fallen_back_run_used(
    tmp_path: Path, monkeypatch, no_cuda, caplog
):
    monkeypatch.setattr(hardware, "_cpus", lambda: 2, raising=False)
    seen = {}

    def body(ctx):
        seen["workers"] = int(ctx.cfg.hardware.num_workers)
        with ctx.atomic("evaluation") as tmp:
            tmp.write_text("{}")

    spec = runner.StageSpec(name="evaluate", fn=body, produces=["evaluation"])
    monkeypatch.setitem(runner.REGISTRY, "evaluate", spec)
    cfg = compose_config(
        [
            "stage=evaluate",
            f"paths.root={tmp_path}",
            "experiment=t",
            "hardware=gpu",
            "hardware.fallback_to_cpu=true",
            "hardware.torch_threads=1",
        ]
    )
    assert cfg.hardware.num_workers == 4 and cfg.hardware.precision == "bf16"
    with caplog.at_level(logging.WARNING):
        d = runner.run_stage(cfg, "evaluate")
    man = json.loads((d / "manifest.json").read_text())
    assert man["hardware_used"] == {
        "device": "cpu",
        "devices": [],
        "processes": 1,
        "precision": "fp32",
        "num_workers": 2,
        "fallback_to_cpu": True,
    }
    assert seen["workers"] == 2  # the stage ran with the lowered value
    said = "hardware.num_workers=4 lowered to 2, the CPUs this process may use"
    assert said in caplog.text
    assert said in (d / "evaluate.log").read_text()


def test_a_cpu_run_records_what_it_asked_for(tmp_path: Path, monkeypatch, no_cuda):
    monkeypatch.setattr(hardware, "_cpus", lambda: 1, raising=False)
    spec = runner.StageSpec(
        name="evaluate",
        fn=lambda ctx: ctx.output("evaluation").write_text("{}"),
        produces=["evaluation"],
    )
    monkeypatch.setitem(runner.REGISTRY, "evaluate", spec)
    cfg = compose_config(
        ["stage=evaluate", f"paths.root={tmp_path}", "experiment=t", "hardware.num_workers=3"]
    )
    d = runner.run_stage(cfg, "evaluate")
    used = json.loads((d / "manifest.json").read_text())["hardware_used"]
    # not a fallback: the user's own CPU setting is left as given
    assert used == {
        "device": "cpu",
        "devices": [],
        "processes": 1,
        "precision": "fp32",
        "num_workers": 3,
    }
