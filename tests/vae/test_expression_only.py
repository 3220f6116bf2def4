"""A data set without image rows: the image branch is skipped, with the same loss values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.hardware import DistInfo
from tests.helpers.vae_toy import assert_same_loss_terms, make_paired, tiny_model
from vae.data import from_anndata, raw_batch, stratified_split, to_batch
from vae.losses import LossWeights, vae_loss
from vae.train import TrainArgs, forward_loss, train

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _expression_only(n: int = 24):
    a = make_paired(0, expression_only=n)
    return from_anndata(a)


@pytest.mark.parametrize("fusion", ["poe", "moe"])
@pytest.mark.parametrize("n_private", [0, 2])
def test_skipping_the_image_branch_gives_the_same_loss_terms(fusion, n_private):
    d = _expression_only()
    idx = torch.arange(d.n)
    full = to_batch(raw_batch(d, idx), torch.device("cpu"))
    lean = to_batch(raw_batch(d, idx, images=False), torch.device("cpu"))
    assert full.image is not None and lean.image is None and lean.mask is None
    model = tiny_model(12, fusion, n_private)
    model.train()
    args = TrainArgs(weights=LossWeights(classify=1.0, align=1.0, align_mode="class"))
    terms = []
    for b in (full, lean):
        torch.manual_seed(7)  # the same reparameterisation draws
        terms.append(forward_loss(model, b, beta=0.7, capacity=0.0, args=args, n_shared=4))
    a = assert_same_loss_terms(*terms)
    assert a["expression"] > 0 and a["kl"] > 0 and a["classify"] > 0
    # both paths give gradients to the expression branch alike
    grads = []
    for b_ in (full, lean):
        model.zero_grad()
        torch.manual_seed(7)
        forward_loss(model, b_, beta=0.7, capacity=0.0, args=args, n_shared=4).total.backward()
        grads.append(
            {
                n: p.grad.clone()
                for n, p in model.named_parameters()
                if n.startswith("expression_") and p.grad is not None
            }
        )
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_vae_loss_without_image_tensors_scores_no_image_term():
    d = _expression_only(8)
    lean = to_batch(raw_batch(d, torch.arange(d.n), images=False), torch.device("cpu"))
    model = tiny_model(12, "poe", 2)
    out = model(
        None, None, lean.x, lean.has_image, lean.has_expression, lean.log_library, use_image=False
    )
    assert out.posteriors.image is None and out.from_image is None and out.joint.image is None
    t = vae_loss(out, None, None, lean.x, lean.counts, lean.library, beta=1.0, n_shared=4)
    for k in ("image", "mask", "image_unimodal", "image_from_expression", "kl_unimodal"):
        assert float(getattr(t, k).detach()) == 0.0, k
    assert torch.isfinite(t.total) and float(t.expression.detach()) > 0


def test_train_on_expression_only_data_freezes_and_never_runs_the_image_branch(tmp_path):
    d = _expression_only(30)
    split = stratified_split(d.labels.numpy(), 0.2, 0.0, 0)
    model = tiny_model(12, "poe", 2, dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = {"encoder": 0, "decoder": 0}
    model.image_encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", 1))
    model.image_decoder.register_forward_hook(lambda *a: calls.__setitem__("decoder", 1))
    args = TrainArgs(max_epochs=3, batch_size=8, kl_warmup_epochs=1, image_every_epochs=0)
    res = train(model, d, split, args, CPU, tmp_path)
    assert res.epochs == 3 and np.isfinite(res.best_val)
    assert calls == {"encoder": 0, "decoder": 0}
    for n, p in model.named_parameters():
        if n.startswith(("image_",)):
            assert not p.requires_grad and torch.equal(p, before[n]), n
        elif n.startswith("expression_"):
            assert p.requires_grad
    assert any(
        not torch.equal(p, before[n])
        for n, p in model.named_parameters()
        if n.startswith("expression_encoder")
    )
    # the checkpoints hold the whole model (downstream stages decode images from it)
    ck = torch.load(tmp_path / "model.pt", weights_only=False)
    assert set(ck["model"]) == set(model.state_dict())
    assert (tmp_path / "last.pt").exists()


def test_encode_dataset_of_expression_only_rows_runs_no_cnn():
    from vae.infer import encode_dataset

    d = _expression_only(20)
    model = tiny_model(12, "poe", 2)
    ran = []
    model.image_encoder.register_forward_hook(lambda *a: ran.append("encoder"))
    model.image_decoder.register_forward_hook(lambda *a: ran.append("decoder"))
    lat = encode_dataset(model, d, batch_size=8)
    assert ran == []
    assert np.isnan(lat.image).all() and np.isnan(lat.expression_from_image).all()
    assert np.isfinite(lat.joint).all() and np.isfinite(lat.expression).all()
    # the same joint and expression latents as the path that carries the (empty) crops
    full = encode_dataset(model, d, batch_size=8, decode=True)  # carries the empty crops
    np.testing.assert_allclose(lat.joint, full.joint, atol=1e-6)
    np.testing.assert_allclose(lat.expression, full.expression, atol=1e-6)


@pytest.mark.parametrize(("budget", "epochs_drawn"), [(0.0, [1, 4]), (None, [1, 2, 3, 4])])
def test_epoch_figures_stay_within_their_time_budget(tmp_path, budget, epochs_drawn):
    """figure_budget=0: the first and the last epoch's figures only; None: every epoch.
    Each at the optimizer step that ended its epoch (3 steps an epoch here)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vae.tb import EXPRESSION_TAG, TBLogger

    d = _expression_only(30)
    split = stratified_split(d.labels.numpy(), 0.2, 0.0, 0)
    tb = TBLogger(tmp_path / "tb", d.gene_names, [0, 1])
    args = TrainArgs(max_epochs=4, batch_size=8, kl_warmup_epochs=1, figure_budget=budget)
    train(tiny_model(12, "poe", 2), d, split, args, CPU, tmp_path, tb=tb)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Images(EXPRESSION_TAG)] == [3 * e for e in epochs_drawn]
    assert [e.step for e in acc.Scalars("val/total")] == [3, 6, 9, 12]  # scalars every epoch
    assert [e.value for e in acc.Scalars("epoch")] == [1, 2, 3, 4]


def test_expression_norm_and_dropout_auto_for_expression_alone_only():
    from pipeline.train_args import DEFAULT_DROPOUT, expression_dropout, expression_norm

    alone = _expression_only()
    mixed = from_anndata(make_paired(12, image_only=2, expression_only=4))
    assert expression_norm("auto", alone) == "batch"
    assert expression_norm("auto", mixed) == "layer"  # rows without a profile / with images
    assert expression_norm("layer", alone) == "layer" and expression_norm("batch", mixed) == "batch"
    assert expression_dropout(None, alone) == 0.0
    assert expression_dropout(None, mixed) == DEFAULT_DROPOUT == 0.1
    assert expression_dropout(0.2, alone) == 0.2 and expression_dropout(0.0, mixed) == 0.0
    # a profile skipped as unusable leaves its row with neither modality: still expression
    # alone (one bad cell flipped norm, dropout and input: review)
    skipped = _expression_only()
    skipped.has_expression[0] = False
    assert expression_norm("auto", skipped) == "batch" and expression_dropout(None, skipped) == 0.0


def test_batch_norm_expression_model_trains_saves_and_reloads(tmp_path):
    """expression_norm='batch': BatchNorm in both expression MLPs, its running statistics
    learned in training and saved with the model (eval mode uses them)."""
    from dataclasses import replace

    from vae.checkpoint import load_model
    from vae.model import TwoBranchVAE

    d = _expression_only(30)
    split = stratified_split(d.labels.numpy(), 0.2, 0.0, 0)
    torch.manual_seed(0)
    model = TwoBranchVAE(replace(tiny_model(12, "poe", 2).args, expression_norm="batch"))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 2 and not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    args = TrainArgs(max_epochs=2, batch_size=8, kl_warmup_epochs=0, image_every_epochs=0)
    res = train(model, d, split, args, CPU, tmp_path)
    assert np.isfinite(res.best_val)
    assert all(int(m.num_batches_tracked) == res.steps for m in norms)
    assert not torch.equal(norms[0].running_mean, torch.zeros_like(norms[0].running_mean))
    loaded, _ = load_model(tmp_path / "last.pt")
    assert loaded.args.expression_norm == "batch"
    model.eval()
    x, lib = d.x[:5], torch.log(d.library[:5])
    with torch.no_grad():
        a = model.encode(expression=x, log_library=lib).joint[0]
        b = loaded.encode(expression=x, log_library=lib).joint[0]
    assert torch.equal(a, b)


def test_counts_input_recovers_log1p_counts_from_log_normalised_values():
    """expression_input='counts': the MLP reads log1p(counts), whatever per-cell scale
    (normalisation target, genes outside the table) X was made with."""
    from vae.model import ExpressionEncoder

    g = torch.Generator().manual_seed(0)
    counts = torch.poisson(torch.rand(6, 9, generator=g) * 8)
    counts[0] = 0  # a row without a profile
    lib = counts.sum(1)
    scale = torch.rand(6, 1, generator=g) * 1e3 + 1.0
    x = torch.log1p(counts * scale)
    enc = ExpressionEncoder(9, [5], 2, True, 0.0, inputs="counts")
    seen = []
    enc.net[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    enc(x, torch.log(lib.clamp_min(1.0)))
    assert torch.allclose(seen[0][:, :9], torch.log1p(counts), atol=1e-5)
    assert torch.equal(seen[0][0], torch.zeros(10))
    assert torch.allclose(seen[0][:, 9], torch.log(lib.clamp_min(1.0)))


def test_expression_input_auto_reads_counts_for_expression_alone_with_counts_only():
    from pipeline.train_args import expression_input

    alone = _expression_only()
    assert alone.counts is not None
    assert expression_input("auto", alone) == "counts"
    mixed = from_anndata(make_paired(12, image_only=2, expression_only=4))
    assert expression_input("auto", mixed) == "lognorm"
    alone.counts = None  # Gaussian likelihood on X: no counts to read
    assert expression_input("auto", alone) == "lognorm"
    assert expression_input("lognorm", _expression_only()) == "lognorm"


def test_training_fills_log_factorial_and_a_batch_with_it_scores_the_same(tmp_path):
    """train() stores lgamma(counts + 1) once for in-memory counts; a batch carrying
    it scores exactly the loss terms of one that computes it."""
    d = _expression_only()
    assert d.log_factorial is None
    split = stratified_split(d.labels.numpy(), 0.2, 0.0, 0)
    model = tiny_model(12, "poe", 0)
    train(model, d, split, TrainArgs(max_epochs=1, batch_size=8), CPU, tmp_path)
    assert torch.equal(d.log_factorial, torch.lgamma(d.counts + 1.0))
    idx = torch.arange(d.n)
    raw = raw_batch(d, idx, images=False)
    with_lf = to_batch(raw, torch.device("cpu"))
    raw.pop("log_factorial")
    without = to_batch(raw, torch.device("cpu"))
    assert with_lf.log_factorial is not None and without.log_factorial is None
    model.eval()
    terms = []
    for b in (with_lf, without):
        torch.manual_seed(7)  # the same reparameterisation draws
        with torch.no_grad():
            terms.append(
                forward_loss(model, b, beta=1.0, capacity=0.0, args=TrainArgs(), n_shared=4)
            )
    a = assert_same_loss_terms(*terms)
    assert a["expression"] > 0
