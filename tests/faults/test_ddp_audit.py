"""What a DDP audit found (2026-12-05; 2 CPU processes, gloo): a resumed multi-process
run restored rank 0's random streams on every rank. The hang of ranks whose batches
lack a head's rows and the resume of a 2-process run are tested end to end in
tests/pipeline/test_vae_stage.py (2 processes)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from segmentation.runtime import restore_rank_rng, rng_state, set_rng_state


@pytest.fixture(autouse=True)
def _global_rng_restored():
    """The tests seed and restore the global torch / numpy / python streams (what a
    checkpoint saves): put them back as they were, for the tests that run after."""
    saved = rng_state()
    yield
    set_rng_state(saved)


def _state(seed: int) -> dict:
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the global state rng_state saves
    random.seed(seed)
    return rng_state(torch.Generator().manual_seed(seed))


def test_each_rank_restores_its_own_random_streams():
    ranks = [_state(10), _state(11)]
    ck = {"rng": ranks[0], "rng_ranks": ranks}
    gen = torch.Generator()
    assert restore_rank_rng(ck, 1, 2, gen) == ""
    assert torch.equal(torch.get_rng_state(), ranks[1]["torch"])
    assert torch.equal(gen.get_state(), ranks[1]["augment"])
    assert restore_rank_rng(ck, 0, 2, gen) == ""
    assert torch.equal(torch.get_rng_state(), ranks[0]["torch"])


def test_another_number_of_processes_continues_rank_zeros_streams_and_says_so():
    ranks = [_state(10), _state(11)]
    ck = {"rng": ranks[0], "rng_ranks": ranks}
    warn = restore_rank_rng(ck, 0, 1)  # a 2-process run resumed by one process
    assert "1 process(es) a run written by 2" in warn
    assert torch.equal(torch.get_rng_state(), ranks[0]["torch"])
    one = {"rng": _state(3)}  # a 1-process checkpoint (no rng_ranks)
    assert restore_rank_rng(one, 0, 1) == ""
    assert "written by 1" in restore_rank_rng(one, 1, 2)


def test_all_gather_object_on_one_process_is_the_object():
    from pipeline.hardware import DistInfo

    d = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert d.all_gather_object({"a": 1}) == [{"a": 1}]


def test_a_workers_error_is_reported_by_its_own_line_and_other_ranks_say_theirs(
    tmp_path, capsys, monkeypatch
):
    """A 2-process run's error arrives as the spawner's exception holding the worker's
    traceback; the console line showed its last line, e.g. DDP's advice "In addition,
    you can set the environment variable TORCH_DISTRIBUTED_DEBUG ...", not the error.
    Under torchrun every rank printed the same line unmarked."""
    from pipeline import guards
    from tests.helpers.run import compose_config

    cfg = compose_config(["stage=train", f"paths.root={tmp_path}", "experiment=x"])
    worker = (
        "\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call "
        'last):\n  File "x.py", line 1, in f\nRuntimeError: Expected to have finished '
        "reduction in the prior iteration before starting a new one.\nIn addition, you can "
        "set the environment variable TORCH_DISTRIBUTED_DEBUG to either INFO or DETAIL"
    )

    class ProcessRaisedException(Exception):
        pass

    monkeypatch.delenv("RANK", raising=False)
    guards.report_crash(cfg, "train", ProcessRaisedException(worker))
    err = capsys.readouterr().err
    assert "failed: RuntimeError: Expected to have finished reduction" in err
    assert "TORCH_DISTRIBUTED_DEBUG" not in err and "[rank" not in err
    monkeypatch.setenv("RANK", "1")
    guards.report_crash(cfg, "train", ValueError("boom"))
    assert "error: [rank 1] stage=train failed: ValueError: boom" in capsys.readouterr().err
