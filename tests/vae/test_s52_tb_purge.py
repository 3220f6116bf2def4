"""A first resume purges the later steps in TensorBoard's Python reader too (a review of
the one-axis change: the reader behind ``--load_fast=false`` reads a run's first START
event as its beginning and purged nothing)."""

from __future__ import annotations

import shutil

from tests.vae.test_s52_tb import _train


def test_a_first_resume_purges_in_the_plugin_reader(tmp_path):
    from tensorboard.backend.event_processing.plugin_event_accumulator import (
        EventAccumulator,
    )

    # a last.pt of epoch 2 of the same 3-epoch schedule, from a twin run
    _train(tmp_path / "twin", epochs=3, stop_after_epochs=2)
    _train(tmp_path, epochs=3)  # fresh: logs epochs 1-3 (steps 2, 4, 6), no START
    shutil.copy(tmp_path / "twin" / "last.pt", tmp_path / "last.pt")
    _train(tmp_path, epochs=3, resume=True)  # the one resume: epoch 3 again
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Tensors("val/total")]
    assert steps == [2, 4, 6], steps
