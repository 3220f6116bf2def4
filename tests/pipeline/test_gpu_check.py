"""scripts/gpu_check.sh: the no-GPU exit on a CPU machine, and its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_without_cuda_says_so_and_runs_nothing(tmp_path):
    # no CUDA device, also on a machine that has one (it was skipped there): the script
    # runs in a subprocess, out of reach of a monkeypatch of torch.cuda; its Python sees
    # no device with CUDA_VISIBLE_DEVICES empty
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2
    assert "no CUDA device" in p.stderr and "nothing was run" in p.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_report_collects_stage_seconds_and_metrics(tmp_path):
    run = tmp_path / "gpu_check"
    for stage, sub, metrics in [
        ("train", "", {"best_val": 1.5}),
        ("train", "ddp", {"best_val": 1.6}),
        ("evaluate", "", {"n_rows": 10}),
        ("pair", "", None),
    ]:
        d = run / stage / sub
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"status": "complete", "seconds": 3.0}))
        if metrics:
            name = {"train": "train_summary.json", "evaluate": "metrics.json"}[stage]
            (d / name).write_text(json.dumps(metrics))
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check_report.py"), str(run), "2", "40", "12"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    single = rep["single_device"]
    assert single["wall_s"] == 40 and set(single["stages"]) == {"train", "evaluate", "pair"}
    assert single["stages"]["train"]["metrics"] == {"best_val": 1.5}
    assert single["stages"]["pair"] == {"status": "complete", "seconds": 3.0}
    assert rep["ddp"]["processes"] == 2 and rep["ddp"]["wall_s"] == 12
    assert rep["ddp"]["stages"]["train"]["metrics"] == {"best_val": 1.6}
