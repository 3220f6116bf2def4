"""Progress: bars with ETA on a terminal, none in CI logs, one line per epoch in both."""

from __future__ import annotations

import os
import re

import pytest

from segmentation.progress import Steps, bar, bars_on
from tests.helpers.run import run_pipeline
from tests.helpers.vae_toy import make_paired

TINY = [
    "vae.channels=[8,16]",
    "vae.hidden=[16]",
    "vae.n_latent=4",
    "trainer.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.max_minutes=null",
    "trainer.projector_max_cells=0",
    "hardware.torch_threads=1",
]
# tqdm's line of the inner (batches) bar: "epoch 2/2:  33%|###| 1/3 [00:01<00:02, ...]"
BAR = re.compile(r"epoch 2/2: +\d+%\|.*\| \d+/\d+ \[\d\d:\d\d<")


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    make_paired(n=48, size=16, n_genes=8).write_h5ad(d / "paired.h5ad")
    return d


def _train(d, env_progress: str | None, exp: str):
    env = {k: v for k, v in os.environ.items() if k != "WBC_PROGRESS"}
    env["OMP_NUM_THREADS"] = "1"
    if env_progress is not None:
        env["WBC_PROGRESS"] = env_progress
    r = run_pipeline(
        [
            "stage=train",
            f"paths.root={d / 'out'}",
            f"experiment={exp}",
            f"paths.inputs.paired={d / 'paired.h5ad'}",
            *TINY,
        ],
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def test_no_bars_when_not_a_terminal_but_one_line_per_epoch(paired):
    out = _train(paired, None, "quiet")  # captured output: not a TTY, as in CI
    assert not BAR.search(out) and "%|" not in out
    for k in (1, 2):
        assert len(re.findall(rf"epoch {k}/2 step \d+: train ", out)) == 1
    assert "torch threads: 1 (hardware.torch_threads)" in out


def test_bars_with_rate_and_eta_when_asked(paired):
    out = _train(paired, "1", "bars")
    assert BAR.search(out), out[-2000:]
    assert re.search(r"train: 100%\|.*\| 2/2 \[\d\d:\d\d<00:00", out)  # epochs, with ETA
    assert len(re.findall(r"epoch 2/2 step \d+: train ", out)) == 1  # still logged once


def test_bar_policy(monkeypatch):
    monkeypatch.setenv("WBC_PROGRESS", "0")
    assert not bars_on() and bar(range(2)).disable
    monkeypatch.setenv("WBC_PROGRESS", "1")
    assert bars_on() and not bar(range(2)).disable and bar(range(2), enabled=False).disable
    st = Steps("x", 3, enabled=False)
    for name in ("a", "b", "c"):
        st(name)
    st.close()
    assert st.done == 3
