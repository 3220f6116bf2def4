"""Compose the Hydra config and run ``python -m pipeline``: one place for every test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "pipeline" / "conf"

# the real data next to the checkout (not in git): tests that read it skip without it,
# except where WBC_REQUIRE_SHARED=1 (.ci/run sets it): there its absence is a failure
# as paths.shared_data resolves it: $WBC_SHARED_DATA, else ../shared/data
SHARED_DATA = Path(os.environ.get("WBC_SHARED_DATA") or ROOT.parent / "shared" / "data")
REQUIRE_SHARED = "WBC_REQUIRE_SHARED"


def needs_shared(path: Path | str, what: str):
    """Mark a test that reads ``path`` (under ``../shared/data``); the check runs at the
    test's setup (tests/conftest.py): see :func:`require_shared`."""
    return pytest.mark.shared_data(Path(path), what)


def require_shared(path: Path | str, what: str) -> None:
    """Skip (saying what is missing) when ``path`` is absent; fail instead when the
    environment sets ``WBC_REQUIRE_SHARED=1``, so that CI cannot pass by skipping."""
    if Path(path).exists():
        return
    why = f"needs ../shared/data ({what}): {path} is absent"
    if os.environ.get(REQUIRE_SHARED, "") not in ("", "0"):
        pytest.fail(f"{why}, and {REQUIRE_SHARED}=1 requires it", pytrace=False)
    pytest.skip(why)


# evaluate / traverse in seconds on a tiny run (the tests check behaviour, not quality)
FAST_ANALYSIS = [
    "analysis.umap=false",
    "analysis.dci_trees=5",
    "analysis.top_k_dims=2",
    "analysis.n_steps=5",
    "analysis.path_steps=6",
    "analysis.path_classes=[myeloblast,myelocyte]",
]

# stage=train of a tiny VAE that trains in seconds (two epochs, one torch thread): the
# one definition; each user adds its n_private (tiny_train)
TINY_MODEL = [
    "vae.channels=[8,16]",
    "vae.hidden=[16]",
    "vae.n_latent=4",
    "trainer.batch_size=16",
    "trainer.max_minutes=null",
    "trainer.max_epochs=2",
    "hardware.torch_threads=1",
]


def tiny_train(n_private: int, *more: str) -> list[str]:
    """:data:`TINY_MODEL` with ``vae.n_private=n_private`` and ``more`` overrides."""
    return [*TINY_MODEL, f"vae.n_private={n_private}", *more]


# a two-epoch VAE run of a few seconds through the stages (train -> evaluate -> traverse):
# test_image_only / test_expression_only / test_streaming. Private dims on both branches
# (2), no projector, fast analysis. The trained toy study of tests.helpers.vae_toy
# (test_embed, test_old_studies, test_names_audit, test_hardware_audit) keeps its
# n_private=1 (vae_toy.TINY_TRAIN): nothing needs the two to differ, but its values
# (latents, scores) are what those tests were written against
TINY_TRAIN = tiny_train(2, "trainer.projector_max_cells=0", *FAST_ANALYSIS)


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


def embed_on_toy_study(study: Path, exp: str, *overrides: str) -> Path:
    """``stage=embed`` of the ``toy_study`` fixture's study (``<study>/out/s``) in this
    process, one thread, as experiment ``exp``; returns the stage's folder."""
    return run_stage_in_process(
        [
            f"paths.root={study / 'out'}",
            f"experiment={exp}",
            f"embed.study={study / 'out' / 's'}",
            "hardware.torch_threads=1",
            *overrides,
        ],
        "embed",
    )


def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
