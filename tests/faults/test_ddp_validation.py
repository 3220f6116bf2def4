"""DDP validation counted the shards' padding (2026-12-05; 2 CPU processes, gloo).

The validation rows are split over the ranks as the training rows are: padded by
repeating the first rows so every rank runs the same number of forward passes. Those
repeats were summed into the validation loss, so with an odd number of validation rows a
2-process run scored the mean with one row twice (13 rows of a fixed model: total 1165.27
against 1185.24 in one process; the demo-sized toy run of docs/reliability.md: 1451.4
against 1497.1), and early stopping, model.pt, train_summary.json and TensorBoard used
that number. Each row now counts once (:func:`vae.data.eval_batches`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline import hardware
from pipeline.hardware import DistInfo
from tests.helpers.run import compose_config
from vae.data import epoch_batches, eval_batches


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_row_counts_once_over_the_ranks_in_the_padded_shards(world: int):
    for n in [0, 1, 2, 3, 5, 7, 13, 16, 17, 33]:
        for bs in [1, 2, 4, 16]:
            rows = np.arange(100, 100 + n)
            counted: list[int] = []
            n_batches = set()
            for rank in range(world):
                mine = eval_batches(rows, bs, rank=rank, world_size=world)
                # the same rows in the same batches as the padded training-style shards
                # (every rank the same number of forward passes: DDP needs that), where
                # those can pad (fewer rows than half the ranks: they leave ranks empty)
                same = epoch_batches(
                    rows, bs, shuffle=False, seed=0, epoch=0, rank=rank, world_size=world
                )
                if -(-n // world) * world - n <= n:
                    assert [b.tolist() for b, _ in mine] == [b.tolist() for b in same]
                n_batches.add(len(mine))
                for b, k in mine:
                    assert 0 <= k <= b.size
                    counted += b[:k].tolist()
            assert sorted(counted) == rows.tolist(), (n, bs, world)
            assert len(n_batches) <= 1, (n, bs, world)


def _deterministic() -> None:
    """z = the posterior mean, no decoder noise: one row's loss no longer depends on
    which process draws it, so one and two processes must agree."""
    import vae.model as vm

    vm.reparameterize = lambda g: g[0]
    vm.NoiseInjection.forward = lambda self, h: h


def _val_loss(dist: DistInfo, n_rows: int) -> dict[str, float]:
    from tests.helpers.vae_toy import make_paired, tiny_model
    from vae.data import from_anndata
    from vae.schedules import KLSchedule
    from vae.train import TrainArgs, evaluate_loss

    data = from_anndata(make_paired(13), image_size=16)
    model = tiny_model()  # seeded: the same weights in every process
    wrapped = dist.wrap(model) if dist.distributed else model
    rows = np.arange(n_rows)
    means, kl = evaluate_loss(
        wrapped, data, rows, TrainArgs(batch_size=16), dist, KLSchedule(beta=1.0), 4
    )
    return {**means, "kl_dims": kl.tolist()}


def _body(ctx) -> None:
    _deterministic()
    for n in ctx.sizes:
        out = _val_loss(ctx.dist, n)
        if ctx.dist.is_main:
            (Path(ctx.dir) / f"two_{n}.json").write_text(json.dumps(out))


def test_two_processes_score_validation_as_one_does(tmp_path: Path, monkeypatch, spawn_tmp):
    """13 rows (odd: rank 1's shard ends with a repeat of row 0) and 1 row (rank 1's
    whole shard is the repeat): the 2-rank loss terms are the 1-process ones."""
    import vae.model as vm

    monkeypatch.setattr(vm, "reparameterize", lambda g: g[0])
    monkeypatch.setattr(vm.NoiseInjection, "forward", lambda self, h: h)
    sizes = [13, 1]
    hw = compose_config(
        ["stage=train", "hardware.num_processes=2", "hardware.master_port=0"]
    ).hardware
    hardware.launch(_body, SimpleNamespace(dir=str(tmp_path), sizes=sizes, dist=None), hw)
    one_proc = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for n in sizes:
        one = _val_loss(one_proc, n)
        two = json.loads((tmp_path / f"two_{n}.json").read_text())
        assert np.allclose(two.pop("kl_dims"), one.pop("kl_dims"), rtol=1e-6, atol=1e-7)
        assert set(two) == set(one)
        for k, v in one.items():
            assert two[k] == pytest.approx(v, rel=1e-6, abs=1e-6), (n, k)
    # what the 2-rank run scored before: the mean with row 0 twice (1165.27 vs 1185.24)
    from tests.helpers.vae_toy import make_paired, tiny_model
    from vae.data import from_anndata
    from vae.schedules import KLSchedule
    from vae.train import TrainArgs, evaluate_loss

    data = from_anndata(make_paired(13), image_size=16)
    twice = evaluate_loss(
        tiny_model(),
        data,
        np.r_[np.arange(13), 0],
        TrainArgs(batch_size=16),
        one_proc,
        KLSchedule(beta=1.0),
        4,
    )[0]["total"]
    assert abs(twice - _val_loss(one_proc, 13)["total"]) > 10.0


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_training_shards_give_every_rank_batches_whatever_the_rows(world: int):
    """With fewer training rows than half the ranks, padding by the first rows could not
    fill the shards (1 row, 3 ranks: a rank without a batch, so DDP waited for it for
    good); each rank now gets as many batches as the others, and every row is used."""
    for n in [1, 2, 3, 5, 9]:
        for bs in [1, 2, 4]:
            rows = np.arange(n)
            shards = [
                epoch_batches(rows, bs, shuffle=True, seed=1, epoch=2, rank=r, world_size=world)
                for r in range(world)
            ]
            assert len({len(s) for s in shards}) == 1 and len(shards[0]) >= 1, (n, bs)
            used = {int(i) for s in shards for b in s for i in b}
            assert used == set(range(n)), (n, bs)
