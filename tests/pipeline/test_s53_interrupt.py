"""A Ctrl-C while Hydra composes the config that another error replaced (CI, once in
four runs: the KeyboardInterrupt landed inside OmegaConf's flag_override, whose exit
raised AttributeError instead) is still the one interrupt line and exit 130."""

from __future__ import annotations

import signal

import pytest


@pytest.fixture(autouse=True)
def _keep_sigint():
    """_run_app installs the runner's SIGINT handler: put the test process's back."""
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("error", [AttributeError, ValueError, OSError, RuntimeError])
def test_a_noted_ctrl_c_that_became_another_error_is_the_interrupt(monkeypatch, capsys, error):
    import pipeline.__main__ as entry
    from pipeline import runner

    def app():
        monkeypatch.setattr(runner, "_INTERRUPTED", True)  # as runner.interrupt notes it
        raise error("'NoneType' object has no attribute '_invalidate_flags_cache'")

    monkeypatch.setattr(entry, "app", app)
    monkeypatch.setattr(entry, "_TASK_STARTED", False)
    with pytest.raises(SystemExit) as e:
        entry._run_app()
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == f"error: {entry.INTERRUPTED}"


def test_the_same_error_without_a_ctrl_c_is_not_called_an_interrupt(monkeypatch):
    import pipeline.__main__ as entry
    from pipeline import runner

    def app():
        raise AttributeError("a bug")

    monkeypatch.setattr(entry, "app", app)
    monkeypatch.setattr(entry, "_TASK_STARTED", False)
    monkeypatch.setattr(runner, "_INTERRUPTED", False)
    with pytest.raises(AttributeError, match="a bug"):
        entry._run_app()
