"""What a user sees in the terminal (terminal audit, docs/reliability.md).

A run's terminal was read as a new user reads it (the demo chain, stage=segment on five
BCCD smears, stage=embed / evaluate / traverse on a finished study, stage=expression on
Paul15, a few user errors). These tests pin the fixes: one line where the same sentence
was repeated per item, headline numbers where only file names were logged, and lines a
researcher cannot act on kept at DEBUG. Each runs in well under a second or two: the
functions that log are called directly, with fakes where a detector would run.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image


def _warnings(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name and r.levelno >= 30]


def test_embed_groups_skipped_files_by_reason(caplog):
    """Smears where the detector keeps nothing: one line with the count and a few names,
    not one line per smear (the audit's five BCCD smears gave three identical lines); a
    reason of its own (an unreadable file) keeps the file's own line."""
    from pipeline.stages.embed import log_read_rejects

    rejects = [{"item": f"/d/s{i}.jpg", "reason": "no cells kept"} for i in range(7)]
    rejects.append({"item": "/d/bad.jpg", "reason": "not an image (truncated)"})
    with caplog.at_level(logging.INFO):
        log_read_rejects("embed.smears=/d", rejects)
    lines = _warnings(caplog, "pipeline.stages.embed")
    assert lines == [
        "embed.smears=/d: 7 files skipped: no cells kept (s0.jpg, s1.jpg, s2.jpg, ...; "
        "each in rejects.csv)",
        "embed.smears=/d: skipped /d/bad.jpg: not an image (truncated)",
    ]


def test_embed_caps_the_reasons_it_logs(caplog, monkeypatch):
    """Many distinct reasons (each file its own error): at most MAX_LOGGED_REJECTS lines,
    then one line counting the files not named."""
    import pipeline.stages.embed as embed

    monkeypatch.setattr(embed, "MAX_LOGGED_REJECTS", 2)
    rejects = [{"item": f"/d/f{i}.png", "reason": f"error {i}"} for i in range(5)]
    with caplog.at_level(logging.INFO):
        embed.log_read_rejects("embed.crops=/d", rejects)
    lines = _warnings(caplog, "pipeline.stages.embed")
    assert len(lines) == 3 and lines[-1] == "embed.crops=/d: 3 more skipped (rejects.csv)"


def test_evaluate_ends_with_its_headline_numbers():
    """The last evaluate line carries the kNN accuracies, retrieval and active dims, not
    the list of twelve CSV names."""
    from vae.analysis.evaluate import summary_line

    out = {
        "latent_structure": {
            "joint": {"knn_accuracy": 0.8536},
            "image": {"knn_accuracy": 0.8704},
            "expression": {"knn_accuracy": 0.8171},
        },
        "retrieval": {"recall_at_10": 0.9259, "n": 54},
        "active_units": {"n_active": 30, "n_latent": 32},
        "tables": [f"t{i}.csv" for i in range(12)],
        "seconds": 29.04,
    }
    line = summary_line(out, 82, "test")
    assert line == (
        "evaluate: 82 test rows; kNN label accuracy joint 0.854, image 0.870, expression "
        "0.817; image->expression recall@10 0.926 (n 54); active dims 30/32; "
        "metrics.json + 12 tables, 29.0s"
    )
    assert ".csv" not in line
    # no labels, no pairs: only what was measured
    assert summary_line({"tables": [], "seconds": 1.0}, 5, "all") == (
        "evaluate: 5 all rows; metrics.json + 0 tables, 1.0s"
    )


def test_missing_program_genes_are_one_warning(caplog):
    """Genes of several programs missing (Paul15 misses four lists): one WARNING line, not
    one per program each repeating the file path."""
    from vae.inputs.expression import PreprocessParams, preprocess

    rng = np.random.default_rng(0)
    genes = ["MPO", "ELANE", "G3", "G4", "G5", "G6"]
    a = ad.AnnData(
        X=rng.poisson(3, (12, len(genes))).astype(np.float32) + 1,
        obs=pd.DataFrame(index=[f"c{i}" for i in range(12)]),
        var=pd.DataFrame(index=genes),
    )
    params = PreprocessParams(
        programs={"primary": ["MPO", "AZU1"], "specific": ["ELANE", "LTF", "CAMP"]},
        genes_of_interest=["MPO", "NOPE"],
        umap=False,
        maturation="none",
        n_pcs=2,
        score_ctrl_size=2,
        score_n_bins=2,
        n_top_genes=None,
    )
    with caplog.at_level(logging.INFO):
        res = preprocess(a, params, source="toy.h5ad")
    assert res.missing == {
        "primary": ["AZU1"],
        "specific": ["LTF", "CAMP"],
        "genes_of_interest": ["NOPE"],
    }
    lines = [m for m in _warnings(caplog, "vae.inputs.expression") if "not found" in m]
    assert lines == [
        "toy.h5ad: genes not found (missing_genes): expression.programs.primary 1 (AZU1); "
        "expression.programs.specific 2 (LTF, CAMP); expression.genes_of_interest 1 (NOPE)"
    ]


def test_contact_sheet_rows_are_debug_only(tmp_path, caplog):
    """The sheet names its rows itself; the row list is DEBUG, not an INFO line of every
    pair run."""
    from vae.inputs.pairing import contact_sheet

    n, s = 4, 16
    a = ad.AnnData(
        X=np.zeros((n, 1), np.float32),
        obs=pd.DataFrame(
            {"has_image": [True] * n, "image_label": ["band", "band", "monocyte", ""]},
            index=[f"c{i}" for i in range(n)],
        ),
    )
    a.obsm["crops"] = np.full((n, s, s, 3), 180, np.uint8)
    m = np.zeros((n, s, s), bool)
    m[:, 4:12, 4:12] = True
    a.obsm["masks"] = m
    with caplog.at_level(logging.DEBUG, logger="vae.inputs.pairing"):
        contact_sheet(a, tmp_path / "crops.png")
    assert (tmp_path / "crops.png").is_file()
    rows = [r for r in caplog.records if "contact sheet rows" in r.getMessage()]
    assert len(rows) == 1 and rows[0].levelno == logging.DEBUG


def test_a_crop_folder_logs_its_measured_scales_once(tmp_path, monkeypatch, caplog):
    """data.segment_sources crop folders measured per crop: one INFO summary (count,
    median, range), the per-crop lines at DEBUG (thousands under +preset=real)."""
    import pipeline.segment_sources as ss
    import pipeline.stages.segment as seg
    import segmentation.sources as sources
    from segmentation.cells import SegmentSettings

    for cls in ("band", "monocyte"):
        (tmp_path / "crops" / cls).mkdir(parents=True)
        for k in range(3):
            img = np.full((24, 24, 3), 200, np.uint8)
            Image.fromarray(img).save(tmp_path / "crops" / cls / f"{k}.png")
    scales = iter([0.2, 0.3, 0.4, 0.25, 0.35, 0.3])

    def fake_centre_cell(*args, **kwargs):
        return sources.CentreCell(
            cells=None, pos=None, reason="no cell", scale=next(scales), how="white ruler"
        )

    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: None)
    monkeypatch.setattr(seg, "pooled_scales", lambda *a, **k: {})
    monkeypatch.setattr(seg, "refine_settings", lambda *a, **k: None)
    monkeypatch.setattr(ss, "estimate_px", lambda cfg, ckpt: 40.0)
    monkeypatch.setattr(sources, "centre_cell", fake_centre_cell)
    sc = SimpleNamespace(max_images=None, convert_images=False)
    ctx = SimpleNamespace(cfg=SimpleNamespace(segmentation=sc), is_main=False)
    src = SimpleNamespace(name="pbc", max_images=None, scale=None, scale_by_width=None)
    with caplog.at_level(logging.DEBUG, logger="pipeline.segment_sources"):
        *_, n = ss._crop_folder(ctx, src, tmp_path / "crops", None, {}, SegmentSettings(), 0)
    assert n == 6
    recs = [r for r in caplog.records if r.name == "pipeline.segment_sources"]
    per_crop = [r for r in recs if r.getMessage().startswith("scale ")]
    assert len(per_crop) == 6 and all(r.levelno == logging.DEBUG for r in per_crop)
    info = [
        r.getMessage() for r in recs if r.levelno == logging.INFO and "measured" in r.getMessage()
    ]
    assert info == [
        "segment: pbc, scale measured on 6 crops: median 0.3 (0.2-0.4); each crop's in "
        "cells.h5ad obs input_scale (log_level=DEBUG logs how each was chosen)"
    ]


def test_help_says_where_outputs_go():
    """--help lists paths.root with its current value beside experiment."""
    from tests.helpers.run import run_pipeline

    r = run_pipeline(["--help", "paths.root=/tmp/elsewhere"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "experiment=demo                           run folder: <paths.root>/<experiment>/"
        in r.stdout
    )
    assert "paths.root=/tmp/elsewhere" in r.stdout and "where run folders go" in r.stdout
