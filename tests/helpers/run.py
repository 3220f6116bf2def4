"""Compose the Hydra config and run ``python -m pipeline``: one place for every test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "pipeline" / "conf"

# evaluate / traverse in seconds on a tiny run (the tests check behaviour, not quality)
FAST_ANALYSIS = [
    "analysis.umap=false",
    "analysis.dci_trees=5",
    "analysis.top_k_dims=2",
    "analysis.n_steps=5",
    "analysis.path_steps=6",
    "analysis.path_classes=[myeloblast,myelocyte]",
]

# a two-epoch VAE run of a few seconds through the stages (train -> evaluate -> traverse)
TINY_TRAIN = [
    "trainer.max_epochs=2",
    "trainer.batch_size=16",
    "trainer.max_minutes=null",
    "trainer.projector_max_cells=0",
    "vae.channels=[8,16]",
    "vae.hidden=[16]",
    "vae.n_latent=4",
    "vae.n_private=2",
    "hardware.torch_threads=1",
    *FAST_ANALYSIS,
]


def compose_config(overrides: list[str], config_dir: Path | str = CONF):
    """The config ``python -m pipeline`` would build from ``overrides``."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def run_pipeline(
    args: list[str], cwd: Path | str = ROOT, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m pipeline *args`` in a subprocess (output captured as text)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def run_stage_in_process(overrides: list[str], name: str) -> Path:
    """Compose ``stage=name`` + ``overrides`` and run that stage in this process."""
    from pipeline import runner

    runner.load_stages()
    return runner.run_stage(compose_config([f"stage={name}", *overrides]), name)
