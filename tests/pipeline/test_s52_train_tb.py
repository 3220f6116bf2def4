"""stage=train and its TensorBoard (user audit s52): where the logs are, what the summary
says of the run."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import pytest

from tests.helpers.run import run_stage_in_process, tiny_train
from tests.helpers.vae_toy import make_paired

TINY = tiny_train(0, "vae.kl_warmup_epochs=1")  # two epochs, one thread


@pytest.fixture
def paired(tmp_path: Path) -> Path:
    make_paired(32).write_h5ad(tmp_path / "paired.h5ad")
    return tmp_path


def _run(tmp: Path, *args: str) -> Path:
    return run_stage_in_process(
        [f"paths.root={tmp / 'out'}", f"paths.inputs.paired={tmp / 'paired.h5ad'}", *TINY, *args],
        "train",
    )


def test_stage_train_says_how_to_open_its_tensorboard(paired: Path, caplog):
    """The command names the venv's tensorboard (the bare name is not on PATH unless the
    venv is activated) and the run's tb folder."""
    with caplog.at_level(logging.INFO):
        d = _run(paired, "experiment=t")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("TensorBoard: ")]
    assert len(lines) == 1, lines
    cmd = shlex.split(lines[0].removeprefix("TensorBoard: "))
    assert cmd == [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(d / "tb")]


@pytest.mark.skipif(not __import__("shutil").which("make"), reason="no make")
def test_make_tensorboard_honours_dir():
    """make tensorboard DIR=... opens that folder (DIR was ignored: the newest outputs/*/)."""
    import subprocess

    from tests.helpers.run import ROOT

    def cmd(*extra: str) -> str:
        # under `make test` this make is a sub-make: without --no-print-directory it ends
        # its output with "make[1]: Leaving directory ..." (seen in .ci/run)
        p = subprocess.run(
            ["make", "--no-print-directory", "-n", "tensorboard", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert p.returncode == 0, p.stderr
        return p.stdout.strip().splitlines()[-1]

    assert cmd("DIR=out/my run/train/tb").endswith("--logdir 'out/my run/train/tb'")
    assert "ls -td outputs/*/" in cmd()


def test_train_summary_names_the_settings_and_the_beta_free_neg_elbo(paired: Path):
    import json

    d = _run(paired, "experiment=s", "vae.beta=4")
    s = json.loads((d / "train_summary.json").read_text())
    assert s["settings"]["vae.beta"] == 4.0 and s["settings"]["vae.n_latent"] == 4
    assert s["settings"]["trainer.max_epochs"] == 2 and s["epochs"] == 2
    assert s["best_epoch"] >= 1
    assert isinstance(s["best_val_neg_elbo"], float) and s["best_val_neg_elbo"] > 0
    assert "best_val_elbo" not in s
    # the default monitor: best_val is the objective's value at the best epoch
    assert s["settings"]["trainer.monitor"] == "total" and s["best_val"] == s["best_val_total"]
    d = _run(paired, "experiment=m", "trainer.monitor=neg_elbo")
    s = json.loads((d / "train_summary.json").read_text())
    assert s["settings"]["trainer.monitor"] == "neg_elbo"
    assert s["best_val"] == s["best_val_neg_elbo"] != s["best_val_total"]
