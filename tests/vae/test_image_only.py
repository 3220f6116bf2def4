"""Images alone: a model without genes, and the expression branch skipped with the same loss."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from pipeline.hardware import DistInfo
from tests.helpers.vae_toy import assert_same_loss_terms, make_paired, tiny_model
from vae.data import from_anndata, raw_batch, stratified_split, to_batch
from vae.losses import LossWeights, per_value_weight, vae_loss
from vae.model import VAEArgs
from vae.train import TrainArgs, forward_loss, train

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
EXPRESSION_TERMS = ("expression", "expression_unimodal", "expression_from_image")


def _image_only(n: int = 24, genes: bool = True):
    """Image-only rows; ``genes=False``: the 0-gene table pair=image_only writes."""
    a = make_paired(0, image_only=n)
    if not genes:
        a = ad.AnnData(obs=a.obs, obsm=dict(a.obsm), uns={"has_counts": False})
    return from_anndata(a)


def test_a_model_without_genes_has_no_expression_branch():
    m = tiny_model(0)
    assert m.expression_encoder is None and m.expression_decoder is None
    assert not [n for n in m.state_dict() if n.startswith("expression_")]
    d = _image_only(6, genes=False)
    assert d.n_genes == 0 and d.x.shape == (6, 0)
    b = to_batch(raw_batch(d, torch.arange(d.n)), torch.device("cpu"))
    post = m.encode(b.image, b.x, b.has_image, b.has_expression, b.mask, b.log_library)
    assert post.expression is None and post.image is not None
    dec = m.decode(post.joint[0])
    assert dec.image.shape == (6, 3, 16, 16) and dec.expression_log.shape == (6, 0)
    # nothing to balance the image term against: it keeps its own scale
    assert per_value_weight(d) == 1.0 and per_value_weight(d, "mask") == 1.0
    with pytest.raises(ValueError, match="n_genes >= 0"):
        VAEArgs(n_genes=-1, crop_size=16, channels=[8, 16])


@pytest.mark.parametrize("fusion", ["poe", "moe"])
def test_a_model_without_genes_scores_no_expression_term(fusion):
    d = _image_only(8, genes=False)
    b = to_batch(raw_batch(d, torch.arange(d.n)), torch.device("cpu"))
    m = tiny_model(0, fusion)
    m.train()
    t = forward_loss(m, b, beta=1.0, capacity=0.0, args=TrainArgs(), n_shared=4)
    v = t.scalars()
    for k in (*EXPRESSION_TERMS, "image_unimodal", "image_from_expression", "align"):
        assert v[k] == 0.0, k
    assert np.isfinite(v["total"]) and v["image"] != 0.0 and v["kl"] > 0
    t.total.backward()
    assert all(p.grad is not None for p in m.image_encoder.parameters())


@pytest.mark.parametrize("fusion", ["poe", "moe"])
@pytest.mark.parametrize("n_private", [0, 2])
def test_skipping_the_expression_branch_gives_the_same_loss_terms(fusion, n_private):
    # a table with genes but no row holding a profile: use_expression=False is the
    # trainer's choice there, and must not change any loss value
    d = _image_only()
    b = to_batch(raw_batch(d, torch.arange(d.n)), torch.device("cpu"))
    model = tiny_model(d.n_genes, fusion, n_private)
    model.train()
    args = TrainArgs(weights=LossWeights(classify=1.0, align=1.0, align_mode="class"))
    terms = []
    for use in (True, False):
        torch.manual_seed(7)  # the same reparameterisation draws
        terms.append(
            forward_loss(
                model, b, beta=0.7, capacity=0.0, args=args, n_shared=4, use_expression=use
            )
        )
    a = assert_same_loss_terms(*terms)
    assert a["image"] != 0 and a["kl"] > 0 and a["classify"] > 0


def test_vae_loss_of_a_skipped_expression_decoder_is_zero_there():
    d = _image_only(8)
    b = to_batch(raw_batch(d, torch.arange(d.n)), torch.device("cpu"))
    m = tiny_model(d.n_genes)
    out = m(
        b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library, use_expression=False
    )
    assert out.posteriors.expression is None and out.from_expression is None
    assert out.from_image is None and out.joint.expression_log is None
    t = vae_loss(out, b.image, b.mask, b.x, b.counts, b.library, beta=1.0, n_shared=4)
    for k in (*EXPRESSION_TERMS, "kl_unimodal"):
        assert float(getattr(t, k).detach()) == 0.0, k
    with pytest.raises(ValueError, match="image or the expression"):
        m(None, None, b.x, b.has_image, b.has_expression, use_image=False, use_expression=False)


def test_train_without_genes_trains_the_image_branch_only(tmp_path):
    from vae.checkpoint import load_model
    from vae.infer import encode_dataset, reconstruction_nll

    d = _image_only(30, genes=False)
    split = stratified_split(d.labels.numpy(), 0.2, 0.0, 0)
    model = tiny_model(0, dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainArgs(max_epochs=3, batch_size=8, kl_warmup_epochs=1, image_every_epochs=0)
    res = train(model, d, split, args, CPU, tmp_path)
    assert res.epochs == 3 and np.isfinite(res.best_val)
    assert all(h["train"]["expression"] == 0.0 for h in res.history)
    assert any(
        not torch.equal(p, before[n])
        for n, p in model.named_parameters()
        if n.startswith("image_encoder")
    )
    best, _ = load_model(tmp_path / "model.pt")
    assert best.args.n_genes == 0 and best.expression_decoder is None
    lat = encode_dataset(best, d, batch_size=8)
    assert np.isfinite(lat.joint).all() and np.isfinite(lat.image).all()
    assert np.isnan(lat.expression).all() and lat.expression_from_image.shape == (30, 0)
    full = encode_dataset(best, d, batch_size=8, decode=True)
    assert full.decoded.rec_expression.shape == (30, 0)
    rec = reconstruction_nll(best, d, batch_size=8)
    assert np.isfinite(rec.image).all() and np.isnan(rec.expression).all()
