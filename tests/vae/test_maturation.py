"""Maturation axis: an ordinal head that makes shared dim 0 order the maturation stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from pipeline.train_args import maturation_ranks
from tests.helpers.vae_toy import make_paired
from vae.data import from_anndata, raw_batch, to_batch
from vae.inputs.schema import MATURATION_ORDER
from vae.losses import LossWeights, vae_loss
from vae.model import MaturationHead, TwoBranchVAE, VAEArgs


def test_head_ranks_cut_points_and_likelihood():
    head = MaturationHead([2, -1, 0, 1])  # label code -> rank; code 1 is not a stage
    assert head.n_ranks == 3
    assert bool((head.cuts().diff() > 0).all())
    # unknown (-1), out-of-range and non-stage codes have no rank
    np.testing.assert_array_equal(
        head.rank_of(torch.tensor([0, 1, 2, 3, -1, 7])), [2, -1, 0, 1, -1, -1]
    )
    rank = torch.tensor([0, 1, 2, 0, 1, 2])
    ordered = torch.tensor([-3.0, 0.0, 3.0, -3.0, 0.0, 3.0])
    assert (
        head.nll(ordered, rank) < head.nll(-ordered, rank) < head.nll(ordered * 0 + 10, rank) + 1e3
    )
    # more separation along the axis: a smaller ordinal NLL (slope > 0 fixes the sign)
    assert head.nll(2 * ordered, rank) < head.nll(ordered, rank)
    two = MaturationHead([0, 1])  # two stages: one cut point
    assert (
        two.cuts().shape == (1,) and two.nll(torch.tensor([-5.0, 5.0]), torch.tensor([0, 1])) < 0.02
    )


@pytest.mark.parametrize("ranks", [[0, 0, -1], [0, 2, -1], [-1, -1, 0]])
def test_model_refuses_ranks_that_are_not_consecutive_stages(ranks):
    with pytest.raises(ValueError, match="maturation_ranks"):
        VAEArgs(n_genes=12, crop_size=16, n_shared=4, channels=[8, 16], maturation_ranks=ranks)


def test_pipeline_ranks_follow_the_configured_order_over_the_stages_present():
    order = ["myeloblast", "promyelocyte", "myelocyte", "band"]
    names = ["NA", "band", "lymphocyte", "myeloblast"]  # the data's sorted label names
    assert maturation_ranks(100.0, order, names) == [-1, 1, -1, 0]
    assert maturation_ranks(0.0, order, names) == []  # off: no head
    assert maturation_ranks(100.0, order, ["band", "lymphocyte"]) == []  # one stage: no axis


def test_training_the_head_puts_the_stage_order_on_dim_0_of_both_experts():
    torch.manual_seed(0)
    adata = make_paired(60, seed=1)
    d = from_anndata(adata)
    names = d.label_names  # sorted: lymphocyte, myeloblast, myelocyte
    ranks = maturation_ranks(1.0, ["myeloblast", "myelocyte"], names)
    m = TwoBranchVAE(
        VAEArgs(
            n_genes=12,
            crop_size=16,
            n_shared=4,
            channels=[8, 16],
            hidden=[16],
            dropout=0.0,
            maturation_ranks=ranks,
        )
    )
    b = to_batch(raw_batch(d, torch.arange(d.n)), torch.device("cpu"))
    w = LossWeights(maturation=100.0)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = m(b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library)
        terms = vae_loss(
            out, b.image, b.mask, b.x, b.counts, b.library, beta=1.0, weights=w, labels=b.labels
        )
        first = float(terms.maturation.detach()) if first is None else first
        opt.zero_grad()
        terms.total.backward()
        opt.step()
    assert float(terms.maturation.detach()) < 0.5 * first
    m.eval()
    with torch.no_grad():
        post = m.encode(b.image, b.x, b.has_image, b.has_expression, b.mask, b.log_library)
    rank = m.maturation.rank_of(b.labels).numpy()
    staged = rank >= 0
    for g in (post.image, post.expression):
        rho = spearmanr(g[0][staged, 0].numpy(), rank[staged])[0]
        assert rho > 0.8  # stage order on dim 0, increasing
    # without labels the term is 0 and the total unchanged
    out = m(b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library)
    none = vae_loss(out, b.image, b.mask, b.x, b.counts, b.library, beta=1.0, weights=w)
    assert float(none.maturation) == 0.0


def test_a_maturation_class_that_looks_like_a_typo_is_refused():
    """A stage missing from the labels is dropped (a preset on data lacking some stages),
    but a near-miss of a label is a typo that would silently train another axis."""
    from pipeline.runner import StageError

    names = ["GMP", "Multipotent progenitors", "Neutrophils"]
    with pytest.raises(StageError, match="did you mean 'Neutrophils'"):
        maturation_ranks(100.0, ["Multipotent progenitors", "GMP", "Neutrophls"], names)
    # a stage the data do not hold, unlike any label: dropped, the others ordered
    assert maturation_ranks(100.0, ["GMP", "Neutrophils", "Metamyelocyte"], names) == [0, -1, 1]
    # "Neutrophil" names the stage the label "Neutrophils" names: taken, not refused
    assert maturation_ranks(100.0, ["Multipotent progenitors", "GMP", "Neutrophil"], names) == [
        1,
        0,
        2,
    ]


# an audit's own spellings of the stages (and a non-lineage class), as the data's
# sorted label names (vae.data: "NA" for the unlabelled)
AUDIT = sorted(["Promyelocytes", "Myelocytes", "band", "Neutrophils", "Lymphocytes", "NA"])


def test_stage_names_take_the_labels_that_spell_the_same_stage(caplog):
    """vae.maturation_classes=[promyelocyte,...,segmented_neutrophil] on labels spelled
    Promyelocytes / Myelocytes / band / Neutrophils: each stage is its label (said at
    INFO), where an exact comparison refused "promyelocyte" as a typo of "Promyelocytes"."""
    import logging

    from pipeline.train_args import maturation_axis

    order = ["promyelocyte", "myelocyte", "band", "segmented_neutrophil"]
    with caplog.at_level(logging.INFO, logger="pipeline.train_args"):
        ranks = maturation_ranks(100.0, order, AUDIT)
    rank = dict(zip(AUDIT, ranks))
    assert rank == {
        "Lymphocytes": -1,
        "Myelocytes": 1,
        "NA": -1,
        "Neutrophils": 3,
        "Promyelocytes": 0,
        "band": 2,
    }
    assert "'promyelocyte' taken as the label 'Promyelocytes'" in caplog.text
    assert "'segmented_neutrophil' taken as the label 'Neutrophils'" in caplog.text
    # the default six stages order the same axis: the mature end is no longer dropped
    # (labels promyelocyte, myelocyte, band, Neutrophils: the axis ended at band)
    mixed = sorted(["promyelocyte", "myelocyte", "band", "Neutrophils", "NA"])
    assert maturation_axis(list(MATURATION_ORDER), mixed) == [
        "promyelocyte",
        "myelocyte",
        "band",
        "Neutrophils",
    ]
    assert maturation_axis(list(MATURATION_ORDER), AUDIT, say=False) == [
        "Promyelocytes",
        "Myelocytes",
        "band",
        "Neutrophils",
    ]
    # an exact label wins over another spelling of its stage
    both = sorted(["promyelocyte", "Promyelocytes", "band"])
    assert maturation_axis(["promyelocyte", "band"], both) == ["promyelocyte", "band"]


def test_a_stage_two_labels_name_is_refused_naming_both():
    from pipeline.runner import StageError
    from pipeline.train_args import maturation_axis

    names = sorted(["SNE", "Neutrophils", "band", "myelocyte"])
    with pytest.raises(
        StageError, match=r"2 labels name its stage \(segmented_neutrophil\): 'Neutrophils', 'SNE'"
    ):
        maturation_ranks(100.0, ["myelocyte", "band", "segmented_neutrophil"], names)
    # naming one of them settles it
    assert maturation_ranks(100.0, ["myelocyte", "band", "SNE"], names) == [-1, 2, 1, 0]
    # the default list was named by no one: crops' "neutrophil" beside Paul15's
    # "Neutrophils" leave that stage out with a warning (review: the default refused
    # ordinary real data)
    real = sorted(["neutrophil", "Neutrophils", "band", "myelocyte", "Monocytes"])
    assert maturation_axis(list(MATURATION_ORDER), real, say=False) == ["myelocyte", "band"]
    # a real typo still errors as before
    with pytest.raises(StageError, match="did you mean 'Promyelocytes'"):
        maturation_ranks(100.0, ["promyelocyt", "band"], AUDIT)
