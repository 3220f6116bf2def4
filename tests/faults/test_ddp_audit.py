"""What a DDP audit found (2026-12-05; 2 CPU processes, gloo): a resumed multi-process
run restored rank 0's random streams on every rank. The hang of ranks whose batches
lack a head's rows and the resume of a 2-process run are tested end to end in
tests/pipeline/test_vae_stage.py (2 processes)."""

from __future__ import annotations

import random

import numpy as np
import torch

from segmentation.runtime import restore_rank_rng, rng_state


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
