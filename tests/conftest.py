"""Fixtures every test package shares: the composed config and the pipeline runner.

The implementations live in :mod:`tests.helpers.run` so that helper modules can
import them too; tests take them as fixtures or import them directly.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers.run import (
    CONF,
    ROOT,
    compose_config,
    require_shared,
    run_pipeline,
    run_stage_in_process,
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "shared_data(path, what): reads ../shared/data; skipped where absent, a failure "
        "with WBC_REQUIRE_SHARED=1 (tests.helpers.run.needs_shared)",
    )


def pytest_runtest_setup(item):
    for mark in item.iter_markers("shared_data"):
        require_shared(*mark.args)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every test in one torch thread (tiny models: more threads only add overhead on a
    shared CPU), restored at the end; a stage run in process may still set its own
    (hardware.torch_threads). Here once, not as an import side effect of test modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compose():
    """``compose(overrides)`` -> the DictConfig ``python -m pipeline`` would build."""
    return compose_config


@pytest.fixture
def run_cli():
    """``run_cli(args, cwd=ROOT, timeout=300)`` -> CompletedProcess of ``python -m pipeline``."""
    return run_pipeline


@pytest.fixture
def run_in_process():
    """``run_in_process(overrides, name)``: run one stage in this process."""
    return run_stage_in_process


@pytest.fixture
def repo_root():
    return ROOT


@pytest.fixture
def conf_dir():
    return CONF


@pytest.fixture
def spawn_tmp(tmp_path_factory, monkeypatch):
    """A folder of pytest's temporary tree for what spawned DDP ranks leave behind.

    ``torch.multiprocessing.spawn`` gives each rank a ``pytorch-errorfile-*.pickle`` in
    ``tempfile.gettempdir()`` that a failing rank writes and nobody deletes; torchrun's
    error handler writes ``TORCHELASTIC_ERROR_FILE``. Both go here, not to /tmp. A
    separate folder (not ``tmp_path``): tests list their ``tmp_path``'s files.
    """
    d = tmp_path_factory.mktemp("spawn")
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(d / "torchelastic_error.json"))
    return d


@pytest.fixture(scope="session")
def toy_study(tmp_path_factory):
    """``toy_study(dest, *extra)`` -> ``dest``: a copy of the tiny study of
    :func:`tests.helpers.vae_toy.train_toy_study` (``paired.h5ad`` and ``out/s/train``).

    Each distinct ``extra`` is trained once per session, into a folder of its own that no
    test is given; each caller gets its own copy, so a module that writes into its study
    (embeds beside it, copies of its train folder, a user's h5ad) changes no other
    module's. The copy's manifests and checkpoint name the session folder (paths.root,
    paths.inputs.paired) as a moved study's do; that folder stays as trained.
    """
    from tests.helpers.vae_toy import train_toy_study  # anndata: only where it is used

    trained: dict[tuple[str, ...], Path] = {}

    def copy(dest, *extra: str) -> Path:
        key = tuple(extra)
        if key not in trained:
            trained[key] = train_toy_study(tmp_path_factory.mktemp("toy_study"), *extra)
        dest = Path(dest)
        shutil.copytree(trained[key], dest, symlinks=True, dirs_exist_ok=True)
        return dest

    return copy
