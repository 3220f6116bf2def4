"""Fixtures every test package shares: the composed config and the pipeline runner.

The implementations live in :mod:`tests.helpers.run` so that helper modules can
import them too; tests take them as fixtures or import them directly.
"""

from __future__ import annotations

import pytest

from tests.helpers.run import CONF, ROOT, compose_config, run_pipeline, run_stage_in_process


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
