"""The Ctrl-C advice names the epoch the kept checkpoint holds (a user audit: "keeps its
last.pt" while the log had reached epoch 25 and last.pt held 20)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import runner
from tests.faults.conftest import cfg_for, register_toy


@pytest.mark.parametrize("stage, saved, said", [("train", 20, 20), ("segment_train", 19, 20)])
def test_ctrl_c_says_the_epoch_the_checkpoint_holds(
    tmp_path: Path, monkeypatch, capsys, stage: str, saved: int, said: int
):
    ck = "last.pt" if stage == "train" else "model.pt"
    root = tmp_path / "out"

    def body(ctx):
        # vae.train saves the epochs done, segmentation.train the 0-based epoch index
        # with the RNG state both real checkpoints carry (numpy's needs the loaders'
        # allow-list: without it every real checkpoint was named without its epoch)
        from segmentation.runtime import rng_state

        torch.save(
            {"epoch": saved, "model": {"w": torch.zeros(4)}, "rng": rng_state()}, ctx.dir / ck
        )
        raise KeyboardInterrupt

    register_toy(monkeypatch, stage, body)
    assert runner.main(cfg_for(root, stage)) == 130
    err = capsys.readouterr().err
    d = root / "t" / stage
    assert f"{d} is marked failed and keeps its {ck} (saved after epoch {said}): `" in err


def test_an_unreadable_checkpoint_is_named_without_an_epoch(tmp_path: Path):
    (tmp_path / "last.pt").write_text("not a checkpoint")
    assert runner.checkpoint_said(tmp_path, "train") == "last.pt"
    torch.save({"model": {}}, tmp_path / "last.pt")  # no epoch field
    assert runner.checkpoint_said(tmp_path, "train") == "last.pt"
