"""Training-robustness faults found by the training audit (docs/reliability.md).

Each test trains (or loads) a tiny table from :mod:`tests.helpers.vae_toy` and fails
without its fix: NaN counts refused at load, a runaway finite loss stopped as
diverged (VAE and detector), an empty test split and degenerate inputs warned, one
training row with BatchNorm refused, a non-finite gradient norm skipped.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.hardware import DistInfo
from tests.helpers.vae_toy import make_paired
from vae.data import PairedDataError, from_anndata, stratified_split
from vae.model import TwoBranchVAE, VAEArgs
from vae.train import NonFiniteLossError, TrainArgs, train

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _model(**kw) -> TwoBranchVAE:
    torch.manual_seed(0)
    base = dict(n_genes=12, crop_size=16, n_shared=4, channels=[8, 16], hidden=[16], dropout=0.0)
    base.update(kw)
    return TwoBranchVAE(VAEArgs(**base))


def _args(**kw) -> TrainArgs:
    base = dict(max_epochs=2, batch_size=8, kl_warmup_epochs=1, image_every_epochs=0, seed=0)
    base.update(kw)
    return TrainArgs(**base)


# 1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_nan_counts_are_refused_at_load(sparse):
    """Refused when many profiles hold NaN (1 of 6 here: over BAD_PROFILES_MAX_SHARE);
    one in many is skipped instead (tests/vae/test_paired_checks.py)."""
    a = make_paired(6)
    a.layers["counts"][1, 2] = np.nan
    if not sparse:
        with pytest.raises(PairedDataError, match=r"layers\['counts'\] holds non-finite"):
            from_anndata(a, "x.h5ad")
        return
    a.layers["counts"] = sp.csr_matrix(a.layers["counts"])
    crops = torch.zeros(6, 3, 16, 16, dtype=torch.uint8)
    masks = torch.zeros(6, 1, 16, 16, dtype=torch.uint8)
    with pytest.raises(PairedDataError, match=r"layers\['counts'\] holds non-finite"):
        from_anndata(a, "x.h5ad", crops=crops, masks=masks, sparse=True)


# 2 -----------------------------------------------------------------------------------
def test_divergence_rule_limits():
    from vae.train import diverged

    assert diverged(5e3, 30.0, 8.9e3) is None  # a demo run's worst step (margin ~900x)
    assert "first-step loss" in diverged(1e10, 30.0, 8.9e3)
    assert "KL" in diverged(10.0, 6.7e7, 8.9e3)
    assert diverged(2e5, 1.0, 0.5) is None  # the floor: a reference near 0
    assert diverged(1e10, 1.0, None) is None  # no reference yet: only the KL rule


def test_runaway_finite_loss_stops_and_keeps_the_last_sane_model(tmp_path, monkeypatch):
    import vae.train as vt

    real = vt.forward_loss
    calls = {"n": 0}
    steps_per_epoch = 2  # 16 training rows, batch 8

    def runaway(*a, **kw):
        terms = real(*a, **kw)
        if torch.is_grad_enabled():  # training steps only
            calls["n"] += 1
            if calls["n"] > steps_per_epoch:  # epoch 2: finite but 1e7 x larger
                terms = dataclasses.replace(terms, total=terms.total * 1e7)
        return terms

    monkeypatch.setattr(vt, "forward_loss", runaway)
    d = from_anndata(make_paired(24))
    split = np.array(["train"] * 16 + ["val"] * 8)
    with pytest.raises(NonFiniteLossError, match=r"diverged loss at epoch 2.*trainer\.lr"):
        train(_model(), d, split, _args(checkpoint_every_s=0), CPU, tmp_path)
    ck = torch.load(tmp_path / "model.pt", weights_only=False)
    assert ck["best_epoch"] == 1  # the diverged epoch never became model.pt


# 3 -----------------------------------------------------------------------------------
class _Growing(torch.nn.Module):
    """A stand-in detector whose loss is 1 at the first iteration, then ``grow`` x."""

    def __init__(self, grow: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.grow, self.calls = grow, 0

    def forward(self, images, targets):
        self.calls += 1
        scale = 1.0 if self.calls == 1 else self.grow
        return {"loss_mask": self.w * scale, "loss_box_reg": self.w * 0.0}


@pytest.mark.parametrize("grow, diverges", [(2.0, False), (1e6, True)])
def test_detector_divergence_stops(grow, diverges):
    from segmentation.engine import train_one_epoch

    model = _Growing(grow)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = [([torch.zeros(3, 4, 4)], [{}]) for _ in range(3)]
    if diverges:
        with pytest.raises(NonFiniteLossError, match=r"diverged.*segmentation\.lr"):
            train_one_epoch(model, opt, loader, torch.device("cpu"), 0, progress=False)
        # a later epoch is held to the run's first loss, not its own first iteration
        model.calls = 1
        with pytest.raises(NonFiniteLossError, match="diverged"):
            train_one_epoch(
                model, opt, loader, torch.device("cpu"), 1, progress=False, reference=1.0
            )
    else:
        stats = train_one_epoch(model, opt, loader, torch.device("cpu"), 0, progress=False)
        assert stats.first_loss == 1.0


# 4 -----------------------------------------------------------------------------------
def test_empty_test_split_is_warned(caplog):
    from pipeline.stages.train import warn_empty_test

    labels = np.array([0, 1, 2] * 10)
    groups = np.array(["slide1"] * 30, dtype=object)  # every row in one specimen
    split = stratified_split(labels, 0.15, 0.15, 0, groups=groups)
    assert not (split == "test").any()
    with caplog.at_level(logging.WARNING):
        assert warn_empty_test(split, groups, 0.15, "specimen")
    assert "trainer.split_by='specimen'" in caplog.text and "1 group(s)" in caplog.text
    assert not warn_empty_test(stratified_split(labels, 0.15, 0.15, 0), None, 0.15, None)
    assert not warn_empty_test(split, groups, 0.0, "specimen")  # no test wanted


# 5 -----------------------------------------------------------------------------------
def test_degenerate_inputs_are_named():
    from vae.train import degenerate_inputs

    a = make_paired(12)
    assert degenerate_inputs(from_anndata(a), np.arange(12)) == []
    a.obsm["masks"][:] = False
    a.obsm["crops"][:] = 0
    a.X[:] = 0
    a.layers["counts"][:] = 0
    msgs = " | ".join(degenerate_inputs(from_anndata(a), np.arange(12)))
    assert "empty mask" in msgs and "blank" in msgs and "all zero" in msgs


def test_degenerate_inputs_warned_by_train(tmp_path, caplog):
    a = make_paired(12)
    a.obsm["masks"][:] = False
    with caplog.at_level(logging.WARNING, logger="vae.train"):
        train(_model(), from_anndata(a), np.array(["train"] * 12), _args(max_epochs=1), CPU,
              tmp_path)  # fmt: skip
    assert "empty mask" in caplog.text


# 6 -----------------------------------------------------------------------------------
def test_one_expression_row_gets_layer_norm_or_a_clear_refusal(tmp_path):
    from pipeline.train_args import expression_norm

    d = from_anndata(make_paired(0, expression_only=1))
    assert expression_norm("auto", d) == "layer"
    assert expression_norm("auto", from_anndata(make_paired(0, expression_only=12))) == "batch"
    m = _model(channels=[8, 16], expression_norm="batch")
    with pytest.raises(ValueError, match="vae.expression_norm=layer"):
        train(m, d, np.array(["train"]), _args(max_epochs=1), CPU, tmp_path)


# 7 -----------------------------------------------------------------------------------
def test_non_finite_gradient_norm_skips_the_step(tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def first_nan(*a, **kw):
        calls["n"] += 1
        norm = real(*a, **kw)
        return torch.full_like(norm, float("nan")) if calls["n"] == 1 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", first_nan)
    d = from_anndata(make_paired(16))
    res = train(_model(), d, np.array(["train"] * 16), _args(max_epochs=1), CPU, tmp_path)
    assert res.history[-1]["skipped_steps"] == 1
    assert res.steps == 2  # the schedule still counts the dropped batch


def test_a_detector_that_finds_no_cell_is_warned(caplog):
    """segmentation.lr=1000 ended "done" with val recall 0 and nothing said (audit)."""
    from segmentation.train import warn_if_blind

    with caplog.at_level(logging.WARNING):
        assert warn_if_blind("bccd", 0.0)
        assert not warn_if_blind("txl", 0.42)
    assert "val bccd: recall 0" in caplog.text and "txl" not in caplog.text


def test_a_noted_interrupt_stops_training_at_the_next_step(tmp_path, monkeypatch):
    """A Ctrl-C whose KeyboardInterrupt landed in a weakref callback ("Exception ignored
    in ... WeakKeyDictionary") was only printed: training ran to the end, exit 0. The
    caller's ``should_stop`` is asked before every batch, training and validation."""
    import vae.train as vt

    real = vt.forward_loss
    seen = {"train": 0, "val": 0}
    noted = {"ctrl_c": False}

    def step(*a, **kw):
        seen["train" if torch.is_grad_enabled() else "val"] += 1
        if seen["train"] == 2:  # during the second step: noted, nothing raised
            noted["ctrl_c"] = True
        return real(*a, **kw)

    monkeypatch.setattr(vt, "forward_loss", step)
    d = from_anndata(make_paired(24))
    split = np.array(["train"] * 16 + ["val"] * 8)  # 2 steps an epoch
    with pytest.raises(KeyboardInterrupt):
        train(
            _model(),
            d,
            split,
            _args(max_epochs=5),
            CPU,
            tmp_path,
            should_stop=lambda: noted["ctrl_c"],
        )
    assert seen == {"train": 2, "val": 0}  # the step under way ends, no other begins
    assert not (tmp_path / "model.pt").exists()
    # validation asks too, before each of its batches (200 rows: 2 batches of 128)
    from vae.schedules import KLSchedule

    big = from_anndata(make_paired(200))
    asked = []

    def after_one():
        asked.append(seen["val"])
        return seen["val"] >= 1

    seen["val"] = 0
    with pytest.raises(KeyboardInterrupt):
        vt.evaluate_loss(
            _model(), big, np.arange(200), _args(), CPU, KLSchedule(beta=1.0), 4, after_one
        )
    assert seen["val"] == 1 and asked == [0, 1]
