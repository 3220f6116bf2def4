"""TensorBoard of a training run (user audit s52): what a short run writes, and where."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.hardware import DistInfo
from tests.helpers.vae_toy import make_paired, tiny_model
from vae.data import from_anndata, stratified_split
from vae.train import TrainArgs, train

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _train(tmp_path, *, epochs=2, resume=False, log_dir=None, **kw):
    from vae.tb import TBLogger

    d = from_anndata(make_paired(16))
    split = stratified_split(d.labels.numpy(), 0.25, 0.0, 0)
    log_dir = log_dir or tmp_path / "tb"
    tb = TBLogger(log_dir, d.gene_names, [0, 1])
    # 12 training rows, batches of 6: 2 optimizer steps per epoch (< log_every_steps)
    kw = {"max_epochs": epochs, "batch_size": 6, "kl_warmup_epochs": 1, "figure_budget": 0.0, **kw}
    args = TrainArgs(**kw)
    res = train(
        tiny_model(12, "poe", 1),
        d,
        split,
        args,
        CPU,
        tmp_path,
        tb=tb,
        resume_from=tmp_path / "last.pt" if resume else None,
    )
    tb.close()
    return res, _scalars(log_dir)


def test_schedule_scalars_reach_tensorboard_once_per_epoch_on_a_short_run(tmp_path):
    """2 steps per epoch, log_every_steps=10: β, C and the LR are still written, once an
    epoch (were written only every 10 steps: a short run had none)."""
    res, sc = _train(tmp_path, log_every_steps=10)
    assert res.steps == 4
    for tag in ("schedule/beta", "schedule/capacity", "schedule/lr"):
        assert tag in sc, tag
        assert [s for s, _ in sc[tag]] == [2, 4], (tag, sc[tag])
    # β warms up over the first epoch (kl_warmup_epochs=1): below 1 after step 1
    assert np.isclose(sc["schedule/beta"][-1][1], 1.0)
    # written once where the step logging already did (log_every_steps=2): no duplicates
    _, sc = _train(tmp_path / "b", log_every_steps=2)
    assert [s for s, _ in sc["schedule/beta"]] == [2, 4]


def test_every_tag_is_on_the_optimizer_step_axis_with_epoch_as_a_scalar(tmp_path):
    """val/*, epoch_train/*, kl_dim/* and the figures at the global step that ended their
    epoch (were at the epoch number: two x-axes both named "step")."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vae.tb import RECON_TAG

    res, sc = _train(tmp_path, log_every_steps=1, figure_budget=None)
    assert sc["epoch"] == [(2, 1.0), (4, 2.0)]
    for tag in ("val/total", "epoch_train/total", "kl_dim/00", "val/active_units"):
        assert [s for s, _ in sc[tag]] == [2, 4], (tag, sc[tag])
    assert [s for s, _ in sc["train/total"]] == [1, 2, 3, 4]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Images(RECON_TAG)] == [2, 4]
    assert [e.step for e in acc.Histograms("latent/mu_00")] == [2, 4]


def test_a_resumed_run_leaves_no_step_with_two_values(tmp_path):
    """Resuming from a last.pt older than what was logged (a killed job: last.pt at most
    every 30 s) purges the later steps of the earlier event files (purge_step)."""
    import shutil

    _train(tmp_path, epochs=2)
    shutil.copy(tmp_path / "last.pt", tmp_path / "kept.pt")
    _train(tmp_path, epochs=3, resume=True)  # logs epoch 3 (step 6)
    shutil.copy(tmp_path / "kept.pt", tmp_path / "last.pt")  # back to epoch 2
    _, sc = _train(tmp_path, epochs=3, resume=True)  # epoch 3 again
    for tag in ("val/total", "epoch", "schedule/beta", "epoch_train/total"):
        steps = [s for s, _ in sc[tag]]
        assert steps == [2, 4, 6], (tag, steps)
    assert [v for _, v in sc["epoch"]] == [1.0, 2.0, 3.0]


def _terms(fusion: str, beta: float = 0.7):
    from vae.data import raw_batch, to_batch
    from vae.train import forward_loss

    d = from_anndata(make_paired(12, image_only=2, expression_only=2))
    b = to_batch(raw_batch(d, torch.arange(d.n)), torch.device("cpu"))
    model = tiny_model(12, fusion, 1).train()
    torch.manual_seed(7)
    return forward_loss(model, b, beta=beta, capacity=0.0, args=TrainArgs(), n_shared=4)


def test_kl_of_each_expert_is_a_named_term_outside_the_total():
    """kl_image and kl_expression (one modality's expert collapsing was invisible in their
    sum kl_unimodal); PoE: the parts of kl_unimodal, MoE: the parts of kl."""
    poe = _terms("poe")
    s = poe.scalars()
    assert s["kl_image"] > 0 and s["kl_expression"] > 0
    assert np.isclose(s["kl_image"] + s["kl_expression"], s["kl_unimodal"], rtol=1e-5)
    moe = _terms("moe").scalars()
    assert moe["kl_image"] > 0 and moe["kl_expression"] > 0
    assert np.isclose(moe["kl_image"] + moe["kl_expression"], moe["kl"], rtol=1e-5)


def test_kl_of_each_expert_reaches_tensorboard(tmp_path):
    _, sc = _train(tmp_path, log_every_steps=1)
    for tag in ("train/kl_image", "train/kl_expression", "val/kl_image", "val/kl_expression"):
        assert tag in sc, tag


def _texts(log_dir) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {
        t.removesuffix("/text_summary"): [
            e.tensor_proto.string_val[0].decode() for e in acc.Tensors(t)
        ]
        for t in acc.Tags()["tensors"]
        if t.endswith("/text_summary")
    }


def test_terms_of_weight_zero_are_not_logged_and_the_weights_are_in_a_legend(tmp_path):
    """ssim, spectral, texture, view, size, align_centroid ... at weight 0 were flat zeros
    under train/, val/ and epoch_train/; the logged terms are unweighted while total is
    weighted, so a text card says each term's weight."""
    from vae.losses import LossWeights

    w = LossWeights(classify=200.0, align=20.0, align_mode="class")
    _, sc = _train(tmp_path, log_every_steps=1, weights=w)
    for off in ("ssim", "spectral", "texture", "view", "size", "align_centroid", "granules"):
        for prefix in ("train", "val", "epoch_train"):
            assert f"{prefix}/{off}" not in sc, (prefix, off)
    for on in ("total", "image", "expression", "kl", "classify", "align", "kl_unimodal"):
        for prefix in ("train", "val", "epoch_train"):
            assert f"{prefix}/{on}" in sc, (prefix, on)
    (legend,) = _texts(tmp_path / "tb")["loss/weights"]
    assert "| `classify` | 200 |" in legend and "| `align` | 20 |" in legend
    assert "| `expression_from_image` | 1 × 1 (cross × expression) |" in legend
    assert "Not logged (weight 0, always 0):" in legend and "align_centroid" in legend
    assert "`ssim`" not in legend
    assert "| `neg_elbo` | none: reported only (β=1 objective" in legend
    # a Markdown table: no "|" inside a cell (|KL − C| split the kl_objective row)
    rows = [ln for ln in legend.splitlines() if ln.startswith("| `")]
    assert rows and all(ln.count("|") == 3 for ln in rows), rows


def test_neg_elbo_is_free_of_beta_and_reaches_tensorboard(tmp_path):
    """val/total holds β·KL, so runs of β=4 and β=1 did not compare; neg_elbo is the fused
    reconstruction + 1·KL: the same for any β on the same draws."""
    for fusion in ("poe", "moe"):
        one, four = _terms(fusion, beta=1.0).scalars(), _terms(fusion, beta=4.0).scalars()
        assert one["total"] != four["total"]
        assert np.isclose(one["neg_elbo"], four["neg_elbo"], rtol=1e-6)
        assert np.isclose(
            one["neg_elbo"], one["image"] + one["mask"] + one["expression"] + one["kl"]
        )
    _, sc = _train(tmp_path, log_every_steps=1)
    assert [s for s, _ in sc["val/neg_elbo"]] == [2, 4]
    assert "val/elbo" not in sc and "train/elbo" not in sc


def test_kl_schedule_warning_names_its_settings_and_beta_zero_says_autoencoder(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="vae.train"):
        _train(tmp_path / "a", kl_warmup_epochs=5, beta=1.0)
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("vae.kl_warmup_epochs=5" in m and "trainer.max_epochs=2" in m for m in warn), warn
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vae.train"):
        _train(tmp_path / "b", kl_warmup_epochs=5, beta=0.0)
    msgs = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert not [m for lv, m in msgs if lv == logging.WARNING and "KL schedule" in m], msgs
    assert any("vae.beta=0 trains a plain autoencoder" in m for _, m in msgs), msgs


def test_kl_schedule_warning_names_max_minutes_when_the_time_cap_stopped_the_run(tmp_path, caplog):
    """A run cut short by trainer.max_minutes was told to raise trainer.max_epochs."""
    import logging

    with caplog.at_level(logging.INFO, logger="vae.train"):
        res, _ = _train(tmp_path, epochs=3, kl_warmup_epochs=5, beta=1.0, max_minutes=1e-9)
    assert res.stopped == "time_limit" and res.epochs == 1
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    (m,) = [m for m in warn if "KL schedule" in m]
    assert "(trainer.max_minutes=1e-09)" in m and "raise trainer.max_minutes" in m, m
    assert "trainer.max_epochs" not in m, m


def test_weights_legend_says_which_kl_the_experts_kls_are_part_of():
    """kl_image / kl_expression are parts of kl_unimodal with PoE but of kl with MoE (the
    legend said kl_unimodal for both)."""
    from vae.losses import LossWeights, term_weights

    poe, moe = term_weights(LossWeights()), term_weights(LossWeights(), moe=True)
    for t in ("kl_image", "kl_expression"):
        assert poe[t] == "none: part of kl_unimodal" and moe[t] == "none: part of kl", t
