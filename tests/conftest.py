"""Fixtures every test package shares: the composed config and the pipeline runner.

The implementations live in :mod:`tests.helpers.run` so that helper modules can
import them too; tests take them as fixtures or import them directly.
"""

from __future__ import annotations

import tempfile

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
