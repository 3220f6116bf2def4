"""Simulator: determinism, masks vs boxes, kinds/lobes, morphology and expression along t,
and `python -m pipeline stage=simulate` end to end (including bad settings)."""

from __future__ import annotations

import importlib
import json
import math
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from pycocotools import mask as mask_utils
from scipy import ndimage
from scipy.stats import spearmanr

from pipeline.simulator import (
    KINDS,
    LINEAGE_KINDS,
    SimulatorParams,
    SimulatorSettingError,
    assign_splits,
    make_gene_panel,
    morphology,
    simulate_counts,
    simulate_image,
    stage_of,
    write_dataset,
)
from pipeline.simulator.cell import draw_cell, rgb_to_od
from pipeline.simulator.morphology import STAGE_EDGES, lobes_of
from segmentation.schema import TRUTH_FIELDS
from tests.helpers.run import compose_config, run_pipeline

# small images, small cells: fast but every structure still drawn
SMALL = {
    "n_images": 3,
    "image_size": (160, 176),
    "wbc_diameter_px": 40.0,
    "wbc_per_image": (3, 5),
    "n_genes": 150,
}


def small(**kw) -> SimulatorParams:
    return SimulatorParams(**{**SMALL, **kw})


@pytest.fixture(scope="module")
def moderate():
    """40 small images (~180 cells): every kind and lobe count appears."""
    p = small(n_images=40, wbc_per_image=(4, 5), touching_fraction=0.3)
    panel = make_gene_panel(p.n_genes, p.seed)
    return p, [simulate_image(p, panel, k, "train") for k in range(p.n_images)]


# ---------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------


def test_same_seed_same_images_and_counts():
    p = small()
    panel = make_gene_panel(p.n_genes, p.seed)
    a = simulate_image(p, panel, 1, "train")
    b = simulate_image(p, panel, 1, "train")
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.counts, b.counts)
    assert a.annotations == b.annotations
    c = simulate_image(small(seed=1), make_gene_panel(p.n_genes, 1), 1, "train")
    assert not np.array_equal(a.image, c.image)


def test_image_k_does_not_depend_on_n_images(tmp_path):
    paths = {}
    for n in (2, 3):
        d = tmp_path / f"n{n}"
        write_dataset(small(n_images=n), d / "smears", d / "e.h5ad", d / "t.csv")
        paths[n] = d
    for name in ("sim_0000.png", "sim_0001.png"):
        assert (paths[2] / "smears" / name).read_bytes() == (
            paths[3] / "smears" / name
        ).read_bytes()
    import anndata as ad

    e2, e3 = ad.read_h5ad(paths[2] / "e.h5ad"), ad.read_h5ad(paths[3] / "e.h5ad")
    assert np.array_equal(e2.X, e3[e2.obs_names].X)


def test_splits_follow_val_fraction():
    s = assign_splits(10, 0.2, seed=0)
    assert s.count("val") == 2 and s.count("train") == 8
    assert assign_splits(10, 0.2, seed=0) == s
    assert assign_splits(2, 0.2, seed=0).count("val") == 1  # at least one val image
    assert assign_splits(1, 0.2, seed=0) == ["train"]
    assert assign_splits(5, 0.0, seed=0) == ["train"] * 5


# ---------------------------------------------------------------------------
# ground truth: masks, boxes, kinds, lobes
# ---------------------------------------------------------------------------


def test_masks_consistent_with_boxes_and_areas(moderate):
    p, sims = moderate
    h, w = p.image_size
    n_trunc = 0
    for sim in sims:
        union = np.zeros((h, w), dtype=np.int32)
        for a in sim.annotations:
            rle = {
                "size": a["segmentation"]["size"],
                "counts": a["segmentation"]["counts"].encode(),
            }
            m = mask_utils.decode(rle).astype(bool)
            assert m.shape == (h, w)
            assert int(m.sum()) == a["area"] > 0
            assert [float(v) for v in mask_utils.toBbox(rle)] == a["bbox"]
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
            nrle = a["nucleus_segmentation"]
            nuc = mask_utils.decode({"size": nrle["size"], "counts": nrle["counts"].encode()})
            assert int(nuc.sum()) == a["nucleus_area"]
            assert not (nuc.astype(bool) & ~m).any()  # nucleus inside its cell
            union += m
            if a["truncated"]:
                n_trunc += 1
                border = m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()
                assert border
        assert union.max() <= 1  # instances never overlap (visible parts only)
    assert n_trunc > 0


def test_every_kind_and_lobe_count_appears(moderate):
    _, sims = moderate
    anns = [a for s in sims for a in s.annotations]
    assert {a["kind"] for a in anns} == set(KINDS)
    assert {a["lobes"] for a in anns} == {1, 2, 3, 4, 5}
    ids = [a["cell_id"] for a in anns]
    assert len(set(ids)) == len(ids)
    for a in anns:
        if a["lineage"] == "neutrophil":
            assert 0 <= a["t"] <= 1 and stage_of(a["t"]) == a["kind"]
        else:
            assert a["t"] is None and a["lineage"] == a["kind"]


def test_some_white_cells_touch(moderate):
    _, sims = moderate
    touching = 0
    for sim in sims:
        masks = [
            mask_utils.decode({**a["segmentation"], "counts": a["segmentation"]["counts"].encode()})
            for a in sim.annotations
        ]
        for i in range(len(masks)):
            grown = ndimage.binary_dilation(masks[i], iterations=2)
            touching += sum(bool((grown & masks[j]).any()) for j in range(i + 1, len(masks)))
    assert touching > 0


@pytest.mark.parametrize("t", [0.05, 0.3, 0.6, 0.75, 0.84, 0.88, 0.93, 0.97, 0.999])
def test_nucleus_lobes_are_separate_components(t):
    m = morphology(stage_of(t), t, 60.0)
    for seed in range(3):
        patch = draw_cell(m, m.diameter, np.random.default_rng(seed))
        _, n = ndimage.label(patch.nucleus, structure=np.ones((3, 3)))
        assert n == m.lobes == lobes_of(t)


def test_lobe_count_bins():
    assert lobes_of(0.0) == lobes_of(0.83) == 1
    assert [lobes_of(t) for t in (0.84, 0.87, 0.9, 0.94, 0.97, 0.999, 1.0)] == [2, 2, 3, 3, 4, 5, 5]
    # a normal (Arneth-like) count over the segmented stage: 3 lobes commonest, 5 rare
    ts = np.linspace(STAGE_EDGES[-2], 1.0, 6001)
    share = {k: np.mean([lobes_of(t) == k for t in ts]) for k in (2, 3, 4, 5)}
    assert share[3] > share[2] > share[4] > share[5] and share[5] < 0.05
    assert [stage_of(float(e) + 1e-9) for e in STAGE_EDGES[:-1]] == list(LINEAGE_KINDS)
    assert stage_of(1.0) == "segmented_neutrophil"


# ---------------------------------------------------------------------------
# morphology along t (what the VAE must recover from pixels)
# ---------------------------------------------------------------------------


def test_morphology_moves_monotonically_with_t():
    ts = np.linspace(0.01, 0.99, 25)
    ms = [morphology(stage_of(t), t, 60.0) for t in ts]
    # the promyelocyte is the largest cell of the series; from it on the cell shrinks
    dia = np.array([m.diameter for m in ms])
    assert stage_of(ts[int(np.argmax(dia))]) == "promyelocyte"
    after = ts >= ts[int(np.argmax(dia))]
    assert all(np.diff(dia[after]) < 0)
    blasts = [m.diameter for m in ms if m.kind == "myeloblast"]
    assert max(blasts) < max(dia) and min(blasts) > dia[-1]
    assert all(np.diff([m.nucleus_fraction for m in ms]) < 0)  # nucleus shrinks
    assert all(np.diff([rgb_to_od(m.nucleus_rgb).sum() for m in ms]) > 0)  # chromatin darkens
    red_blue = [m.cytoplasm_rgb[0] / m.cytoplasm_rgb[2] for m in ms]
    assert all(np.diff(red_blue) >= 0) and red_blue[-1] > red_blue[0]  # blue -> pink
    az = [m.azurophilic for m in ms]
    assert stage_of(ts[int(np.argmax(az))]) == "promyelocyte"
    # myeloblasts nearly agranular: a type II blast's few granules at most
    assert max(m.azurophilic for m in ms if m.kind == "myeloblast") < 0.1 * max(az)
    assert all(np.diff([m.specific for m in ms]) > 0)
    assert ms[0].specific < 0.01 and ms[-1].specific > 0.99
    assert max(m.specific for m in ms if m.kind == "myeloblast") < 0.01


def test_rendered_cells_encode_t():
    """Measured from pixels: nucleus darker and, from the promyelocyte on, cell smaller
    for larger t."""
    ts = np.linspace(0.02, 0.98, 15)
    nuc_od, area = [], []
    for i, t in enumerate(ts):
        m = morphology(stage_of(t), t, 60.0)
        patch = draw_cell(m, m.diameter, np.random.default_rng(i))
        nuc_od.append(float(np.median(patch.od[patch.nucleus].sum(axis=1))))
        area.append(int(patch.mask.sum()))
    # azurophilic granules over the nucleus darken promyelocytes: not strictly monotone
    assert spearmanr(ts, nuc_od).statistic > 0.85
    area = np.array(area)
    late = ts >= 0.25
    assert spearmanr(ts[late], area[late]).statistic < -0.95
    assert area[ts < 1 / 6].max() < area[(ts > 1 / 6) & (ts < 2 / 6)].max()


def test_drawn_azurophilic_granules_follow_the_density():
    """The drawn count is a Poisson draw of mean 0.05 x density x cell area: its mean over
    promyelocytes matches that within 4 standard errors, no granule on a mature cell,
    and the dark dots it counts are on the image (a cell drawn without them is lighter)."""
    counts, expect = [], []
    for i in range(40):
        t = 0.2 + 0.1 * (i % 5) / 5  # promyelocytes around the density's peak
        m = morphology(stage_of(t), t, 60.0)
        patch = draw_cell(m, m.diameter, np.random.default_rng(i))
        counts.append(patch.azurophilic_granules)
        expect.append(m.azurophilic * 0.05 * patch.mask.sum())
    counts, expect = np.array(counts), np.array(expect)
    assert counts.dtype.kind == "i" and counts.min() > 0
    se = np.sqrt(expect.sum())  # Poisson: variance = mean
    assert abs(counts.sum() - expect.sum()) < 4 * se
    seg = morphology("segmented_neutrophil", 0.95, 60.0)
    assert seg.azurophilic < 1e-6
    assert draw_cell(seg, seg.diameter, np.random.default_rng(0)).azurophilic_granules == 0
    m = morphology("promyelocyte", 0.25, 60.0)
    with_g = draw_cell(m, m.diameter, np.random.default_rng(3))
    without = draw_cell(replace(m, azurophilic=0.0), m.diameter, np.random.default_rng(3))
    assert with_g.azurophilic_granules > 10 and without.azurophilic_granules == 0
    assert with_g.od[with_g.mask].sum() > without.od[without.mask].sum()


def test_bad_morphology_arguments():
    with pytest.raises(ValueError, match="is a myeloblast"):
        morphology("band", 0.05, 60.0)
    with pytest.raises(ValueError, match="unknown kind"):
        morphology("basophil", None, 60.0)
    with pytest.raises(ValueError, match="needs a maturation"):
        morphology("band", None, 60.0)


# ---------------------------------------------------------------------------
# expression along t
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lineage_counts():
    rng = np.random.default_rng(0)
    ts = np.sort(rng.uniform(0, 1, 600))
    panel = make_gene_panel(240, 0)
    counts = simulate_counts(panel, [stage_of(t) for t in ts], list(ts), np.random.default_rng(1))
    norm = counts / counts.sum(axis=1, keepdims=True) * 1e4
    return ts, panel, np.log1p(norm)


def _gene(panel, lognorm, name):
    return lognorm[:, list(panel.genes).index(name)]


def test_expression_programs_move_with_t(lineage_counts):
    ts, panel, x = lineage_counts
    stages = np.array([stage_of(t) for t in ts])

    def peak_stage(g):
        means = [_gene(panel, x, g)[stages == s].mean() for s in LINEAGE_KINDS]
        return int(np.argmax(means))

    # primary granules peak at the promyelocyte, specific later, tertiary later still
    for g in ("MPO", "ELANE", "AZU1", "PRTN3", "CTSG"):
        assert LINEAGE_KINDS[peak_stage(g)] == "promyelocyte", g
    for g in ("LTF", "CAMP", "LCN2", "CEACAM8"):
        assert LINEAGE_KINDS[peak_stage(g)] in ("myelocyte", "metamyelocyte"), g
    assert LINEAGE_KINDS[peak_stage("MMP9")] in ("metamyelocyte", "band")
    assert peak_stage("MPO") < peak_stage("LTF") < peak_stage("FCGR3B")
    assert LINEAGE_KINDS[peak_stage("FCGR3B")] == "segmented_neutrophil"
    assert spearmanr(ts, _gene(panel, x, "FCGR3B")).statistic > 0.5
    assert spearmanr(ts, _gene(panel, x, "CXCR2")).statistic > 0.5
    assert LINEAGE_KINDS[peak_stage("CD34")] == "myeloblast"
    assert LINEAGE_KINDS[peak_stage("MKI67")] in ("myeloblast", "promyelocyte", "myelocyte")


def test_other_kinds_express_their_markers():
    panel = make_gene_panel(240, 0)
    kinds = ["lymphocyte", "monocyte", "eosinophil", "segmented_neutrophil"] * 50
    ts = [0.95 if k == "segmented_neutrophil" else None for k in kinds]
    c = simulate_counts(panel, kinds, ts, np.random.default_rng(2))
    x = np.log1p(c / c.sum(axis=1, keepdims=True) * 1e4)
    kinds = np.array(kinds)
    for marker, kind in (
        ("CD3E", "lymphocyte"),
        ("CD14", "monocyte"),
        ("CLC", "eosinophil"),
        ("FCGR3B", "segmented_neutrophil"),
    ):
        col = x[:, list(panel.genes).index(marker)]
        own = col[kinds == kind].mean()
        assert all(own > col[kinds == k].mean() + 1.0 for k in set(kinds) - {kind}), marker


def test_counts_are_nb_like_with_dropout_and_library_variation():
    panel = make_gene_panel(200, 0)
    kinds = ["band"] * 300
    c = simulate_counts(panel, kinds, [0.7] * 300, np.random.default_rng(3), dropout=0.2)
    assert c.dtype.kind == "i" and c.min() >= 0
    lib = c.sum(axis=1)
    assert lib.std() / lib.mean() > 0.2  # library sizes vary
    g = list(panel.genes).index("ACTB")
    assert (c[:, g] == 0).mean() > 0.1  # dropout zeros even a high gene
    nz = c[:, g][c[:, g] > 0] / lib[c[:, g] > 0]
    assert nz.std() > 0
    assert len(panel.genes) == 200 and len(set(panel.genes)) == 200


def test_gene_panel_names_and_programs():
    panel = make_gene_panel(240, 0)
    progs = panel.programs()
    assert {"MPO", "ELANE", "AZU1", "PRTN3", "CTSG"} <= set(progs["primary_granule"])
    assert {"LTF", "CAMP", "LCN2", "CEACAM8"} <= set(progs["specific_granule"])
    assert {"CXCR2", "FCGR3B"} <= set(progs["mature"])
    assert "MMP9" in progs["tertiary_granule"]
    assert all(g == g.upper() for g in panel.genes)
    with pytest.raises(ValueError, match="n_genes=50 must be >="):
        make_gene_panel(50, 0)


# ---------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"n_images": -1}, "n_images=-1 must be >= 0"),
        ({"image_size": [100, 100]}, "image_size=[100, 100] is too small"),
        ({"wbc_per_image": [5, 2]}, "wbc_per_image=[5, 2] must be"),
        ({"kind_weights": {"basophil": 1.0}}, "kind_weights="),
        ({"kind_weights": {"lymphocyte": 0.0}}, "positive sum"),
        ({"rbc_density": 1.5}, "rbc_density=1.5 must be in [0, 1]"),
        ({"n_genes": 20}, "n_genes=20 must be >= "),
        ({"dropout": 1.0}, "dropout=1.0 must be in [0, 1)"),
        ({"val_fraction": -0.1}, "val_fraction=-0.1"),
        ({"image_size": [256]}, "image_size=[256] must be a list of two integers"),
    ],
)
def test_bad_settings_name_the_setting(override, message):
    from pipeline.runner import StageError
    from pipeline.stages.simulate import simulator_params

    cfg = OmegaConf.create({"data": {"simulator": {**SMALL, **override}}})
    with pytest.raises(StageError) as e:
        simulator_params(cfg)
    assert str(e.value).startswith("data.simulator.")
    assert message in str(e.value)
    with pytest.raises(SimulatorSettingError, match=re.escape(message)):
        SimulatorParams.from_mapping({**SMALL, **override}).validate()


# ---------------------------------------------------------------------------
# python -m pipeline stage=simulate
# ---------------------------------------------------------------------------

ARGS = [
    "data.simulator.n_images=3",
    "data.simulator.image_size=[160,176]",
    "data.simulator.wbc_diameter_px=40",
    "data.simulator.n_genes=150",
]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_pipeline(["stage=simulate", f"paths.root={tmp_path}", *args], timeout=120)


def test_stage_simulate_writes_valid_artifacts(tmp_path):
    import anndata as ad
    import pandas as pd
    from pycocotools.coco import COCO

    r = _run(tmp_path, "experiment=sim", *ARGS)
    assert r.returncode == 0, r.stderr
    d = tmp_path / "sim" / "simulate"
    coco = COCO(str(d / "smears" / "annotations.json"))
    assert len(coco.getImgIds()) == 3
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "wbc", "supercategory": "cell"}]
    for img in coco.loadImgs(coco.getImgIds()):
        assert (d / "smears" / img["file_name"]).exists()
        assert (img["height"], img["width"]) == (160, 176)
        assert img["split"] in ("train", "val")
    assert {im["split"] for im in coco.dataset["images"]} == {"train", "val"}
    anns = coco.dataset["annotations"]
    assert len(anns) > 0
    m = coco.annToMask(anns[0])
    assert int(m.sum()) == anns[0]["area"]
    adata = ad.read_h5ad(d / "expression_raw.h5ad")
    assert set(adata.obs_names) == {a["cell_id"] for a in anns}
    assert adata.shape[1] == 150
    assert np.array_equal(adata.X, adata.layers["counts"])
    assert np.array_equal(adata.X, np.round(adata.X)) and adata.X.dtype == np.float32
    assert {*TRUTH_FIELDS, "image", "split"} <= set(adata.obs)
    # the drawn granule count travels with each cell: annotation, expression obs, table
    drawn = {a["cell_id"]: a["azurophilic_granules"] for a in anns}
    assert all(isinstance(v, int) and v >= 0 for v in drawn.values())
    assert adata.obs["azurophilic_granules"].to_dict() == drawn
    assert "program" in adata.var
    table = pd.read_csv(d / "cells_truth.csv")
    assert list(table["cell_id"]) == [a["cell_id"] for a in anns]
    assert list(table["azurophilic_granules"]) == list(drawn.values())
    man = json.loads((d / "manifest.json").read_text())
    assert man["status"] == "complete"
    assert set(man["outputs"]) == {"smears", "expression_raw"}
    # no temporaries left behind
    assert not [p for p in d.rglob("*") if ".tmp-" in p.name]


def test_stage_simulate_bad_setting_writes_nothing(tmp_path):
    r = _run(tmp_path, "experiment=bad", *ARGS, "data.simulator.n_images=-1")
    assert r.returncode != 0
    assert "data.simulator.n_images=-1 must be >= 0" in r.stderr
    exp = tmp_path / "bad"
    # no stage folder, no outputs, not even Hydra's log folder (runner._drop_hydra_dir)
    assert not exp.exists()


def test_runner_rejects_too_small_images_before_creating_folders(tmp_path):
    from pipeline import runner

    root = tmp_path / "runs"
    cfg = compose_config(
        ["stage=simulate", f"paths.root={root}", "data.simulator.image_size=[64,64]"]
    )
    importlib.import_module("pipeline.stages.simulate")  # registers stage=simulate
    with pytest.raises(
        runner.StageError, match=r"data\.simulator\.image_size=\[64, 64\] is too small"
    ):
        runner.run_stage(cfg, "simulate")
    assert not root.exists()


def test_empty_run_is_valid(tmp_path):
    s = write_dataset(
        small(n_images=0), tmp_path / "smears", tmp_path / "e.h5ad", tmp_path / "t.csv"
    )
    assert (s.n_images, s.n_cells) == (0, 0)
    coco = json.loads((tmp_path / "smears" / "annotations.json").read_text())
    assert coco["images"] == [] and coco["annotations"] == []
    assert math.isfinite(s.n_genes)


def test_crowded_images_report_unplaced_cells():
    p = small(n_images=1, wbc_per_image=(30, 30), image_size=(160, 160))
    sim = simulate_image(p, make_gene_panel(p.n_genes, p.seed), 0, "train")
    assert sim.n_unplaced > 0
    assert len(sim.annotations) + sim.n_unplaced == 30
    assert sim.counts.shape[0] == len(sim.annotations)


def test_config_schema_and_library_defaults_agree():
    from pipeline.config import SimulatorConfig

    raw = OmegaConf.to_container(OmegaConf.structured(SimulatorConfig))
    # seed: null in the config = the top-level seed (default 0), the library's default
    assert raw["seed"] is None
    assert SimulatorParams.from_mapping({**raw, "seed": 0}) == SimulatorParams()
    with pytest.raises(SimulatorSettingError, match="is not a simulator setting"):
        SimulatorParams.from_mapping({**raw, "n_imagez": 3})
