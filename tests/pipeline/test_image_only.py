"""pair=image_only -> train -> evaluate -> traverse on simulated smears (no expression file)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.runner import StageError
from tests.helpers.run import TINY_TRAIN, compose_config

# the simulator's own cells (COCO masks) as the crop source: no detector needed
SIM = [
    "data.simulator.n_images=8",
    "data.simulator.image_size=[384,384]",
    "pair.crop_sources=[{kind: coco}]",
    "pair.crop_size=32",
]


def test_image_only_chain_has_no_gene_and_no_expression_figures(tmp_path, run_in_process):
    common = [
        f"paths.root={tmp_path / 'out'}",
        "experiment=io",
        "pair=image_only",
        *SIM,
        *TINY_TRAIN,
    ]
    run_in_process(common, "simulate")
    run_in_process(common, "pair")
    run = tmp_path / "out" / "io"
    assert not (run / "expression").exists()  # nothing read or made from expression
    paired = ad.read_h5ad(run / "pair" / "paired.h5ad")
    assert paired.n_vars == 0 and paired.n_obs > 10
    assert paired.obs["has_image"].all() and not paired.obs["has_expression"].any()
    counts = json.loads((run / "pair" / "pair_counts.json").read_text())
    assert counts["genes"] == 0 and counts["image_only"] == paired.n_obs
    for name in ("train", "evaluate", "traverse"):
        run_in_process(common, name)
    ck = torch.load(run / "train" / "model.pt", weights_only=False)
    assert ck["model_args"]["n_genes"] == 0
    assert not [k for k in ck["model"] if k.startswith("expression_")]
    summary = json.loads((run / "train" / "train_summary.json").read_text())
    assert summary["epochs"] == 2 and np.isfinite(summary["best_val"])
    lat = ad.read_h5ad(run / "train" / "latent.h5ad")
    assert np.isfinite(lat.obsm["X_vae"]).all() and np.isnan(lat.obsm["X_vae_expression"]).all()
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert set(metrics["latent_structure"]) == {"joint", "image"}
    assert list(metrics["reconstruction"]) == ["image (joint)"]
    tr = run / "traverse"
    assert (tr / "traverse_grid.png").exists()  # decoded images stay
    assert not list(tr.glob("gene_ranking*.csv"))  # no gene to rank
    ts = json.loads((tr / "traverse_summary.json").read_text())
    assert ts["modalities"] == ["image"]
    assert all(not p["top_genes"] for p in ts["path"].values())
    assert "No row of the training table has expression" in (tr / "report.html").read_text()
    # a model without genes cannot place expression profiles: one message, no output
    expr = tmp_path / "expr.h5ad"
    ad.AnnData(X=np.ones((3, 2), np.float32), var=pd.DataFrame(index=["MPO", "ELANE"])).write_h5ad(
        expr
    )
    with pytest.raises(StageError, match="no gene .*pair=image_only"):
        run_in_process([*common, f"embed.expression={expr}"], "embed")


def test_image_only_misuse_is_one_clear_error(tmp_path, run_cli):
    p = run_cli(["stage=pair", "pair=image_only", "pair.crop_sources=[]", f"paths.root={tmp_path}"])
    assert p.returncode != 0 and "Traceback" not in p.stderr + p.stdout
    assert "pair.mode=image_only needs at least one pair.crop_sources entry" in p.stderr
    assert not (tmp_path / "default" / "pair").exists()


def test_stage_all_with_image_only_skips_the_expression_stage():
    from pipeline.runner import stages_for

    cfg = compose_config(["stage=all", "pair=image_only"])
    assert stages_for(cfg) == [
        "simulate",
        "segment_train",
        "segment",
        "pair",
        "train",
        "evaluate",
        "traverse",
    ]
    cfg = compose_config(["stage=all", "pair=image_only", "pair.crop_sources=[{kind: coco}]"])
    assert stages_for(cfg) == ["simulate", "pair", "train", "evaluate", "traverse"]
