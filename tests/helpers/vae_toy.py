"""Tiny hand-built paired AnnData for the β-VAE tests (format of docs/artifacts.md, pair)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from tests.helpers.run import tiny_train

KINDS = ["myeloblast", "myelocyte", "lymphocyte"]

# stage=train settings of the toy study (tests.helpers.run.TINY_MODEL, one private dim)
TINY_TRAIN = tiny_train(1)


def make_paired(
    n: int = 24,
    size: int = 16,
    n_genes: int = 12,
    *,
    counts: bool = True,
    image_only: int = 0,
    expression_only: int = 0,
    seed: int = 0,
) -> ad.AnnData:
    """Paired rows (disk cells whose colour and genes depend on the kind), then
    ``image_only`` rows without expression and ``expression_only`` rows without image.
    """
    rng = np.random.default_rng(seed)
    total = n + image_only + expression_only
    kind = np.array([KINDS[i % len(KINDS)] for i in range(total)])
    code = np.array([KINDS.index(k) for k in kind])
    t = np.where(code < 2, rng.uniform(0, 1, total), np.nan)
    yy, xx = np.mgrid[:size, :size]
    crops = np.zeros((total, size, size, 3), np.uint8)
    masks = np.zeros((total, size, size), bool)
    colours = np.array([[200, 80, 160], [150, 120, 200], [90, 90, 220]])
    for i in range(total):
        r = size * (0.3 + 0.1 * code[i])
        m = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= r**2
        masks[i] = m
        crops[i][m] = np.clip(colours[code[i]] + rng.normal(0, 10, 3), 0, 255).astype(np.uint8)
        crops[i][~m] = 230  # background that must never matter
    rate = np.exp(
        rng.normal(1.0, 0.3, (1, n_genes)) + 1.5 * (code[:, None] == np.arange(n_genes) % 3)
    )
    lib = rng.integers(200, 400, total)
    mu = rate / rate.sum(1, keepdims=True) * lib[:, None]
    cnt = rng.poisson(mu).astype(np.float32)
    has_image = np.ones(total, bool)
    has_expr = np.ones(total, bool)
    has_image[n + image_only :] = False
    has_expr[n : n + image_only] = False
    crops[~has_image] = 0
    masks[~has_image] = False
    cnt[~has_expr] = 0
    libs = np.maximum(cnt.sum(1, keepdims=True), 1)
    x = np.log1p(cnt / libs * 1e4).astype(np.float32)
    x[~has_expr] = 0
    obs = pd.DataFrame(
        {
            "has_image": has_image,
            "has_expression": has_expr,
            "pair_mode": "same_cell",
            "label": kind,
            "kind": kind,
            "maturation": t,
            "t": t,
            "lineage": np.where(code < 2, "neutrophil", "lymphoid"),
        },
        index=[f"c{i:03d}" for i in range(total)],
    )
    var = pd.DataFrame(
        {"program": ["primary_granule" if g % 3 == 0 else "other" for g in range(n_genes)]},
        index=[f"G{g}" for g in range(n_genes)],
    )
    a = ad.AnnData(X=x, obs=obs, var=var)
    if counts:
        a.layers["counts"] = cnt
    a.uns["has_counts"] = counts
    a.obsm["crops"] = crops
    a.obsm["masks"] = masks
    return a


def tiny_model(n_genes: int = 12, fusion: str = "poe", n_private: int = 2, dropout: float = 0.0):
    """A seeded 16 px two-branch VAE with a 3-class head (0 genes: image branch only)."""
    import torch

    from vae.model import TwoBranchVAE, VAEArgs

    torch.manual_seed(0)
    args = VAEArgs(
        n_genes=n_genes,
        crop_size=16,
        n_shared=4,
        n_private=n_private,
        channels=[8, 16],
        hidden=[16],
        dropout=dropout,
        fusion=fusion,
        expression_likelihood="nb" if n_genes else "gaussian",
        n_classes=3,
    )
    return TwoBranchVAE(args)


def assert_same_loss_terms(a, b, tol: float = 1e-6) -> dict[str, float]:
    """Two ``LossTerms`` of one batch agree term by term (and per latent dim) to ``tol``.

    Returns the scalars of ``a``, for the caller's own checks.
    """
    import pytest
    import torch

    from vae.losses import LossTerms

    sa, sb = a.scalars(), b.scalars()
    assert set(sa) == set(LossTerms.names())
    for k in sa:
        assert sb[k] == pytest.approx(sa[k], rel=tol, abs=tol), k
    assert torch.allclose(a.kl_per_dim, b.kl_per_dim, atol=tol)
    return sa


def image_tensors(crops, masks, **kw):
    """``PairedTensors`` of image-only rows around ``crops`` (N, 3, S, S) uint8 and
    ``masks`` (N, 1, S, S): two dummy genes, one label; ``kw`` adds fields such as
    ``granules`` or ``nucleus`` (augmentation and precompute tests)."""
    import torch

    from vae.data import PairedTensors

    n = crops.shape[0]
    return PairedTensors(
        crops=crops,
        masks=masks,
        x=torch.zeros(n, 2),
        counts=None,
        library=torch.ones(n),
        has_image=torch.ones(n, dtype=torch.bool),
        has_expression=torch.zeros(n, dtype=torch.bool),
        labels=torch.zeros(n, dtype=torch.long),
        label_names=["a"],
        obs_names=[str(i) for i in range(n)],
        gene_names=["g0", "g1"],
        norm_total=1.0,
        **kw,
    )


def train_toy_study(tmp, *extra: str):
    """Train the tiny study the embed and old-study tests use: ``<tmp>/paired.h5ad``
    (48 cells, 6 image-only, 6 expression-only) and ``<tmp>/out/s/train``; ``extra``
    are more overrides. Returns ``tmp``. Modules that can share a training take a copy
    from the session fixture ``toy_study`` (tests/conftest.py) instead."""
    from pathlib import Path

    from tests.helpers.run import run_pipeline

    tmp = Path(tmp)
    make_paired(48, image_only=6, expression_only=6).write_h5ad(tmp / "paired.h5ad")
    p = run_pipeline(
        [
            "stage=train",
            f"paths.root={tmp / 'out'}",
            "experiment=s",
            f"paths.inputs.paired={tmp / 'paired.h5ad'}",
            *TINY_TRAIN,
            *extra,
        ]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp


def add_unmasked_twin(root):
    """Beside the ``toy_study`` fixture's study ``<root>/out/s`` (trained on crops masked
    to a disc), ``<root>/out/w``: the same study whose own ``pair/paired.h5ad`` holds its
    crops with all-True masks, as stage=pair writes the crops of an ``image_folder``, so
    ``Study.training_crops`` reads it as a study of unmasked squares (a crop folder is
    read whole, no detector). Returns ``root``."""
    import shutil
    from pathlib import Path

    root = Path(root)
    w = root / "out" / "w"
    shutil.copytree(root / "out" / "s", w)
    paired = ad.read_h5ad(root / "paired.h5ad")
    has = paired.obs["has_image"].to_numpy(bool)
    masks = np.zeros_like(paired.obsm["masks"])
    masks[has] = True
    paired.obsm["masks"] = masks
    (w / "pair").mkdir()
    paired.write_h5ad(w / "pair" / "paired.h5ad")
    return root
