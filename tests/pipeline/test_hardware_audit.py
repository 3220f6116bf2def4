"""The hardware audit's findings: pinned memory on CPU, devices on hardware=cpu, the
spawned ranks' logging, the rendezvous port, rejects in image order, DataLoader
workers and the seed, and the smaller messages (backend, fallback, multi_gpu, crashes).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import guards, hardware
from tests.helpers.run import compose_config, run_stage_in_process
from tests.helpers.vae_toy import TINY_TRAIN, make_paired


def _hw(*overrides: str):
    return compose_config(["stage=train", *overrides]).hardware


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    getattr(hardware, "_SAID", set()).clear()


# --- 1: hardware.pin_memory on CPU ---------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_pin_memory_on_cpu_is_not_used(workers, caplog, monkeypatch):
    """``Tensor.pin_memory()`` needs the NVIDIA driver: on a CPU run the batches are
    not pinned (said once in the log), whatever the number of workers."""
    from vae import data as vd

    monkeypatch.setattr(vd, "_PIN_NOTED", False, raising=False)
    mem = vd.from_anndata(make_paired(12), "toy")
    batches = vd.epoch_batches(np.arange(mem.n), 4, shuffle=True, seed=1, epoch=0)
    with caplog.at_level(logging.INFO, logger="vae.data"):
        got = list(vd.iterate(mem, batches, workers, True, device=torch.device("cpu")))
        list(vd.iterate(mem, batches, workers, True))  # device detected: CUDA unused here
    want = list(vd.iterate(mem, batches))
    assert len(got) == len(want) == len(batches)
    for g, w in zip(got, want):
        assert all(torch.equal(g[k], w[k]) and not g[k].is_pinned() for k in w)
    assert caplog.text.count("hardware.pin_memory=true: not used") == 1
    # the decision itself: only a CUDA device pins
    assert vd._pin_for(True, "cuda:0") and not vd._pin_for(False, "cuda:0")
    assert not vd._pin_for(True, "cpu")


# --- 2: hardware.devices with hardware.kind=cpu ----------------------------------------


@pytest.mark.parametrize("devices", ["[0,1]", "[0]"])
def test_devices_on_cpu_kind_are_refused(devices):
    hw = _hw(f"hardware.devices={devices}")
    with pytest.raises(hardware.HardwareError) as e:
        hardware.plan(hw)
    msg = str(e.value)
    assert "hardware.devices=" in msg and "hardware.kind=cpu" in msg
    assert "hardware=gpu" in msg and "hardware=multi_gpu" in msg
    # the default config (pipeline/conf/hardware/cpu.yaml: devices []) still plans
    assert list(_hw().devices) == []
    assert hardware.plan(_hw()) == ("cpu", [], 1)


# --- 3: logging of spawned ranks -----------------------------------------------------


def _log_body(ctx):
    """Runs in each spawned rank: an INFO and a WARNING line, and a warnings.warn."""
    import warnings

    lg = logging.getLogger("pipeline.stages.fake")
    lg.info("info from rank %d", ctx.dist.rank)
    lg.warning("warning from rank %d", ctx.dist.rank)
    warnings.warn(f"py warning from rank {ctx.dist.rank}", UserWarning, stacklevel=1)


def test_spawned_ranks_log_like_the_parent(tmp_path, capfd, spawn_tmp):
    from pipeline.stagedir import add_log_file

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("[CONSOLE][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(console)
    handler = add_log_file(tmp_path / "segment.log", "INFO")
    try:
        hw = _hw("hardware.num_processes=2")
        hardware.launch(_log_body, SimpleNamespace(dir=tmp_path, dist=None), hw)
    finally:
        for h in (console, handler):
            root.removeHandler(h)
            h.close()
    text = (tmp_path / "segment.log").read_text()
    # rank 0 as the parent logs (format and level); rank 1 its warnings, with its rank
    assert "INFO pipeline.stages.fake: info from rank 0" in text
    assert "WARNING pipeline.stages.fake: warning from rank 0" in text
    assert "WARNING pipeline.stages.fake: [rank 1] warning from rank 1" in text
    assert "info from rank 1" not in text
    # warnings.warn: through logging (py.warnings), as the parent's are shown
    assert "WARNING py.warnings: [rank 1] " in text and "py warning from rank 1" in text
    assert "py warning from rank 0" in text
    err = capfd.readouterr().err
    assert "[CONSOLE][pipeline.stages.fake][WARNING] - [rank 1] warning from rank 1" in err
    assert "[CONSOLE][pipeline.stages.fake][INFO] - info from rank 0" in err


# --- 4: the rendezvous port ----------------------------------------------------------


def test_master_port_defaults_to_a_free_port():
    assert _hw().master_port == 0


@pytest.fixture
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


def test_a_taken_master_port_names_the_setting(tmp_path, busy_port, spawn_tmp):
    hw = _hw("hardware.num_processes=2", f"hardware.master_port={busy_port}")
    with pytest.raises(hardware.HardwareError, match=f"hardware.master_port={busy_port}"):
        hardware.launch(_log_body, SimpleNamespace(dir=tmp_path, dist=None), hw)
    assert hardware.HardwareError in guards.USER_ERRORS  # error: line, exit 2


def test_a_port_taken_at_the_rendezvous_names_the_setting(monkeypatch, busy_port):
    """The port can be taken between the launcher's check and rank 0's bind."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(busy_port))
    hw = _hw("hardware.num_processes=2", f"hardware.master_port={busy_port}")
    with pytest.raises(hardware.HardwareError, match=f"hardware.master_port={busy_port}"):
        hardware.init_process(0, 2, hw)
    assert not torch.distributed.is_initialized()
    # a rank's HardwareError reaches the launcher as text: it becomes one again
    err = RuntimeError(
        "\n\n-- Process 0 terminated with the following error:\nTraceback ...\n"
        "pipeline.hardware.HardwareError: hardware.master_port=1: taken\n"
    )
    assert str(hardware._child_error(err)) == "hardware.master_port=1: taken"
    assert hardware._child_error(RuntimeError("boom")) is None


# --- 5: rejects in the images' order -------------------------------------------------


def _fake_parts(world: int, n_images: int = 6, per_image: int = 3):
    """Parts of a segment run sharded round robin over ``world`` ranks (each keeps
    examples until it has 4), and the merged detection table."""
    from segmentation.crops import FLAGS
    from segmentation.table import empty_table

    rows = []
    for i in range(n_images):
        for c in range(per_image):
            r = {f: False for f in FLAGS}
            r.update(cell_id=f"im{i}_c{c}", image=f"im{i}.png", image_index=i, kept=False)
            r["too_small" if c % 2 else "on_border"] = True
            rows.append(r)
    table = pd.DataFrame(rows, columns=list(empty_table(False).columns)).fillna(0)
    parts = []
    for rank in range(world):
        rejects, ids, crops = [], [], []
        for i in range(rank, n_images, world):
            if i == 1:  # an unreadable image: no table rows, known by name only
                rejects.append({"image": "im1.png", "action": "skipped", "reason": "unreadable"})
                continue
            mine = table[table.image_index == i]
            rejects += [
                {"image": r.image, "action": "rejected_cell", "cell_id": r.cell_id}
                for r in mine.itertuples()
            ]
            if len(ids) < 4:
                ids += list(mine.cell_id)
                crops += [np.full((8, 8, 3), 10 * i + k, np.uint8) for k in range(len(mine))]
        parts.append(
            {
                "n_images": 0,
                "seconds": 1.0,
                "model_args": {},
                "rejects": rejects,
                "reject_ids": ids,
                "reject_crops": np.stack(crops) if crops else np.zeros((0, 8, 8, 3), np.uint8),
            }
        )
    return parts, table[table.image_index != 1].reset_index(drop=True)


def test_rejects_and_sheet_do_not_depend_on_the_ranks():
    from segmentation.cells import reject_sheet
    from segmentation.table import run_summary

    def rejects(parts, table):
        return run_summary(parts, table, table, 6, None, None)[0]

    one, t1 = _fake_parts(1)
    want = rejects(one, t1)
    assert list(want.image[:4]) == ["im0.png"] * 3 + ["im1.png"]
    sheet1 = np.asarray(reject_sheet(one, t1, 4))
    for world in (2, 3):
        parts, table = _fake_parts(world)
        assert rejects(parts, table).equals(want)
        assert np.array_equal(np.asarray(reject_sheet(parts, table, 4)), sheet1)


@pytest.fixture(scope="module")
def untrained_ckpt(tmp_path_factory) -> Path:
    from tests.helpers.seg_synth import untrained_checkpoint

    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.mark.slow
def test_segment_two_ranks_rejects_match_one(tmp_path, untrained_ckpt):
    """rejects.csv and rejects.png of a 2-process gloo run equal the 1-process run's
    (tests/segmentation/test_seg_infer.py compares the detections and cells)."""
    from tests.segmentation.test_seg_infer import _run_segment, _smear_folder

    smears = _smear_folder(tmp_path / "smears")
    common = ["segmentation.score_threshold=0.0", "segmentation.batch_size=2"]
    one = _run_segment(tmp_path / "a", untrained_ckpt, smears, *common)
    two = _run_segment(tmp_path / "b", untrained_ckpt, smears, *common, "hardware.num_processes=2")
    r1, r2 = pd.read_csv(one / "rejects.csv"), pd.read_csv(two / "rejects.csv")
    assert len(r1) and r1.equals(r2)
    from PIL import Image

    assert np.array_equal(
        np.asarray(Image.open(one / "rejects.png")), np.asarray(Image.open(two / "rejects.png"))
    )
    log = (two / "segment.log").read_text()  # the ranks' lines reach the stage's log
    assert "rank 0: " in log and "segment: " in log


# --- 6: DataLoader workers do not change training ------------------------------------


TINY = [
    *TINY_TRAIN,
    "trainer.max_epochs=1",
    "trainer.figure_budget=0",
    "trainer.projector_max_cells=0",
]


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("paired") / "paired.h5ad"
    make_paired(48, image_only=6, expression_only=6).write_h5ad(p)
    return p


def _train(root: Path, paired: Path, *extra: str) -> dict:
    d = run_stage_in_process(
        [f"paths.root={root}", "experiment=w", f"paths.inputs.paired={paired}", *TINY, *extra],
        "train",
    )
    return json.loads((d / "train_summary.json").read_text())


def test_num_workers_do_not_change_training(tmp_path, paired):
    """Same seed, same batches: 0 and 2 DataLoader workers give the same val loss
    (the loader drew its workers' seed from the global RNG). pin_memory=true on this
    CPU run is skipped, not a crash."""
    a = _train(tmp_path / "w0", paired, "hardware.num_workers=0", "hardware.pin_memory=true")
    b = _train(tmp_path / "w2", paired, "hardware.num_workers=2")
    assert a["epochs"] == b["epochs"] == 1
    assert a["best_val"] == pytest.approx(b["best_val"], rel=1e-6, abs=1e-9)


# --- 7: the crash message after overwrite=true points at the failed attempt ------------


def test_crash_message_names_the_failed_attempts_log(tmp_path, capsys, monkeypatch):
    cfg = compose_config(["stage=train", f"paths.root={tmp_path}", "experiment=x"])
    d = tmp_path / "x" / "train"
    d.mkdir(parents=True)
    (d / "train.log").write_text("the previous, complete run\n")
    old = time.time() - 3600
    os.utime(d / "train.log", (old, old))
    failed = tmp_path / "x" / "train.failed-20260101-000000"
    failed.mkdir()
    (failed / "train.log").write_text("Traceback ...\n")
    assert guards.report_crash(cfg, "train", ValueError("boom")) == 1
    assert f"traceback in {failed / 'train.log'}" in capsys.readouterr().err
    # without a backup the failing run's own folder holds it (an older failed one aside)
    os.utime(failed / "train.log", (old - 10, old - 10))
    (d / "train.log").write_text("this run\n")
    guards.report_crash(cfg, "train", ValueError("boom"))
    assert f"traceback in {d / 'train.log'}" in capsys.readouterr().err
    # a crash before this run wrote a line: no earlier run's log is named (the file-system
    # audit: a colleague's finished log was pointed to as holding the traceback)
    monkeypatch.setattr(guards, "_RUN_STARTED", time.time() + 3600)
    guards.report_crash(cfg, "train", ValueError("boom"))
    err = capsys.readouterr().err
    assert "traceback in" not in err and "log_level=DEBUG prints the traceback" in err


# --- 8-10: backend, fallback warning, multi_gpu message -------------------------------


def test_backend_is_checked_before_spawning(no_cuda):
    with pytest.raises(hardware.HardwareError, match="hardware.backend=nccl needs CUDA"):
        hardware.plan(_hw("hardware.backend=nccl", "hardware.num_processes=2"))
    with pytest.raises(hardware.HardwareError, match="hardware.backend='tcp'; valid"):
        hardware.plan(_hw("hardware.backend=tcp"))
    if not torch.distributed.is_mpi_available():
        with pytest.raises(hardware.HardwareError, match="hardware.backend='mpi'"):
            hardware.plan(_hw("hardware.backend=mpi"))
    # the fallback to CPU makes nccl wrong too
    hw = _hw("hardware=gpu", "hardware.fallback_to_cpu=true", "hardware.backend=nccl")
    with pytest.raises(hardware.HardwareError, match="hardware.backend=nccl"):
        hardware.plan(hw)
    assert hardware.plan(_hw("hardware.backend=gloo", "hardware.num_processes=2"))[2] == 2


def test_fallback_warning_is_logged_once(no_cuda, caplog):
    hw = _hw("hardware=gpu", "hardware.fallback_to_cpu=true")
    with caplog.at_level(logging.WARNING, logger="pipeline.hardware"):
        for _ in range(4):  # start checks, the stage, single_process...
            assert hardware.plan(hw) == ("cpu", [], 1)
    assert caplog.text.count("falling back to CPU") == 1


def test_multi_gpu_error_says_what_was_asked(no_cuda):
    with pytest.raises(hardware.HardwareError) as e:
        hardware.plan(_hw("hardware=multi_gpu"))
    assert "GPU(s) []" not in str(e.value)
    assert "every visible GPU" in str(e.value) and "0 usable CUDA device" in str(e.value)
