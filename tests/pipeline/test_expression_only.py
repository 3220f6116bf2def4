"""pair=expression_only -> train -> evaluate -> traverse on a tiny expression table."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np

from tests.helpers.run import TINY_TRAIN, compose_config
from tests.helpers.vae_toy import make_paired


def _expression_h5ad(path: Path) -> Path:
    """An expression.h5ad as stage=expression writes it (X log-normalised, counts, label)."""
    a = make_paired(0, expression_only=60)
    out = ad.AnnData(X=a.X, obs=a.obs[["label", "maturation", "t", "kind"]].copy(), var=a.var)
    out.layers["counts"] = a.layers["counts"]
    out.uns["has_counts"] = True
    out.write_h5ad(path)
    return path


def test_expression_only_chain_has_no_image_rows_and_no_image_figures(tmp_path, run_in_process):
    expr = _expression_h5ad(tmp_path / "expression.h5ad")
    common = [f"paths.root={tmp_path / 'out'}", "experiment=eo", *TINY_TRAIN]
    run_in_process(["pair=expression_only", f"paths.inputs.expression={expr}", *common], "pair")
    run = tmp_path / "out" / "eo"
    paired = ad.read_h5ad(run / "pair" / "paired.h5ad")
    assert paired.n_obs == 60 and not paired.obs["has_image"].any()
    assert paired.obs["has_expression"].all()
    assert not (run / "pair" / "crops.png").exists()  # nothing to show
    for name in ("train", "evaluate", "traverse"):
        run_in_process(common, name)
    summary = json.loads((run / "train" / "train_summary.json").read_text())
    assert summary["epochs"] == 2 and np.isfinite(summary["best_val"])
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert set(metrics["latent_structure"]) == {"joint", "expression"}
    assert list(metrics["reconstruction"]) == ["expression (joint)"]
    tr = run / "traverse"
    assert not (tr / "traverse_grid.png").exists()  # decoded images are left out
    assert len(list(tr.glob("traverse_dim*.png"))) == 2  # expression heatmaps only
    assert (tr / "gene_ranking_gp.csv").exists()
    feats = (tr / "path_features_gp.csv").read_text().splitlines()[0].split(",")
    assert feats[0] == "s" and "granule_density" not in feats  # no decoded-image feature
    html = (tr / "report.html").read_text()
    assert "No row of the training table has an image" in html
    ts = json.loads((tr / "traverse_summary.json").read_text())
    assert ts["modalities"] == ["expression"]


def test_stage_all_without_a_cells_crop_source_skips_the_detector():
    from pipeline.runner import stages_for

    cfg = compose_config(["stage=all", "pair=expression_only", "data=real"])
    assert stages_for(cfg) == ["expression", "pair", "train", "evaluate", "traverse"]
    cfg = compose_config(["stage=all"])
    assert "segment" in stages_for(cfg) and "segment_train" in stages_for(cfg)
