"""Granule targets found on a crop at the resolution it was cut (``pair.granule_centres``).

A cell is drawn at 128 px with granules 1 px sd apart enough to count, then halved to
64 px as stage=pair does: the centres found before the resize are all carried to the
64 px grid, where the counter on the halved crop finds fewer (touching ones merge).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from tests.vae.analysis.test_granules import OD_GRAN, OD_NUC, OD_PINK
from vae.analysis import granules as G
from vae.data import from_anndata
from vae.inputs.pairing import CropSet, granule_centres_at_source, make_pairs, read_cells_h5ad
from vae.inputs.schema import GRANULE_CENTRES


def _granular_cell(n_ring: int, size: int = 128, seed: int = 0):
    """A 128 px cell (r=56): pink cytoplasm, pale nucleus (r=20), ``n_ring`` granules
    (sd 1 px) on each of two rings 5 px apart in the cytoplasm: RGB uint8, mask."""
    yy, xx = np.mgrid[:size, :size].astype(float)
    c = size / 2
    cell = np.hypot(yy - c, xx - c) < 56
    nuc = np.hypot(yy - c, xx - c) < 20
    od = np.where(nuc[..., None], OD_NUC, OD_PINK) * cell[..., None]
    phase = np.random.default_rng(seed).uniform(0, 1)
    for radius in (34.0, 42.0):
        for k in range(n_ring):
            a = phase + 2 * np.pi * k / n_ring
            r, q = c + radius * np.sin(a), c + radius * np.cos(a)
            od = od + np.exp(-((yy - r) ** 2 + (xx - q) ** 2) / 2.0)[..., None] * OD_GRAN
    return np.clip(np.rint(255 * np.exp(-od)), 0, 255).astype(np.uint8), cell


def _cells_h5ad(path, counts=(6, 14, 24)):
    made = [_granular_cell(n, seed=i) for i, n in enumerate(counts)]
    a = ad.AnnData(
        obs=pd.DataFrame(
            {"kind": "promyelocyte", "truth_cell_id": ["", "", ""]},
            index=[f"cell{i}" for i in range(len(counts))],
        )
    )
    a.obsm["crops"] = np.stack([m[0] for m in made])
    a.obsm["masks"] = np.stack([m[1] for m in made])
    a.write_h5ad(path)
    return made


def test_centres_found_at_source_resolution_land_on_the_resized_grid():
    img, cell = _granular_cell(14)
    found = G.measure_cell(img, cell).blobs
    assert len(found) == 28  # the counter reads every granule of the 128 px cell
    grid, od = granule_centres_at_source(img[None], cell[None], 64)
    assert grid.shape == (1, 64, 64) and grid.dtype == np.uint8
    assert int(grid.sum()) == 28  # none lost, touching ones on one pixel add up
    r, c = np.rint(found[0, :2]).astype(int)
    assert grid[0, int((r + 0.5) / 2), int((c + 0.5) / 2)] >= 1  # the pixel covering it
    # at its own size the grid holds the counter's centres as they are
    same, od_same = granule_centres_at_source(img[None], cell[None])
    assert same.shape == (1, 128, 128) and int(same.sum()) == 28
    # the granules' stain above the cytoplasm, measured where they are sharp: the
    # granule's own colour (absorbs green most), as strong as on a crop of their size
    assert od.shape == (1, 3) and od[0, 1] > od[0, 0] and od[0, 1] > od[0, 2]
    assert od[0, 1] > 0.5 * OD_GRAN[1]
    np.testing.assert_allclose(od, od_same, rtol=0.2)  # the neighbourhood scales with H
    # halved first, the counter finds none of them, and where they are the crop's
    # contrast (what the trainer scored the granule stain against) is under half as strong
    from vae.inputs.pairing import resize_crop
    from vae.losses import granule_contrast

    small, sm = resize_crop(img, cell, 64)
    _, od_small = granule_centres_at_source(small[None], sm[None])
    assert np.isnan(od_small).all()
    c = granule_contrast(
        torch.from_numpy(small).permute(2, 0, 1)[None].float() / 255,
        torch.from_numpy(sm)[None, None].float(),
    )[0].numpy()
    at = np.nonzero(grid[0])
    assert c[1][at].mean() < 0.5 * od[0, 1]


def test_read_cells_h5ad_counts_granules_before_halving_the_crop(tmp_path):
    _cells_h5ad(tmp_path / "cells.h5ad")
    plain = read_cells_h5ad(tmp_path / "cells.h5ad", 64)
    assert plain.granules is None  # off by default
    cs = read_cells_h5ad(tmp_path / "cells.h5ad", 64, granules=True)
    assert cs.granules.shape == (3, 64, 64)
    per_cell = cs.granules.reshape(3, -1).sum(1)
    assert per_cell.tolist() == [12, 28, 48]
    assert not cs.granules[~cs.masks].any()  # only on the cell
    assert cs.granule_od.shape == (3, 3) and np.isfinite(cs.granule_od).all()
    # the counter on the halved crops misses granules that merge at half size
    halved = [G.measure_cell(c, m).features.granule_count for c, m in zip(cs.crops, cs.masks)]
    assert halved[2] < per_cell[2]
    # a capped / relabelled set keeps its rows' centres
    sub = cs.take(np.array([False, True, True]))
    assert sub.granules.reshape(2, -1).sum(1).tolist() == [28, 48]


def test_pairing_writes_the_centres_and_the_vae_reads_them(tmp_path):
    _cells_h5ad(tmp_path / "cells.h5ad")
    cs = read_cells_h5ad(tmp_path / "cells.h5ad", 64, granules=True)
    e = ad.AnnData(
        np.ones((2, 3), np.float32),
        obs=pd.DataFrame({"label": ["a", "b"]}, index=["e0", "e1"]),
        var=pd.DataFrame(index=["g0", "g1", "g2"]),
    )
    a = make_pairs(cs, e, "unpaired").adata
    g = np.asarray(a.obsm[GRANULE_CENTRES])
    img = a.obs["has_image"].to_numpy(bool)
    assert g.shape == (a.n_obs, 64, 64) and not g[~img].any()
    assert sorted(g[img].reshape(img.sum(), -1).sum(1).tolist()) == [12, 28, 48]
    d = from_anndata(a, "paired.h5ad")
    assert d.granules.shape == (a.n_obs, 1, 64, 64) and d.granules.dtype == torch.uint8
    assert int(d.granules.sum()) == 88
    # a model of another crop size gets every centre on its grid
    d32 = from_anndata(a, "paired.h5ad", image_size=32)
    assert d32.granules.shape == (a.n_obs, 1, 32, 32) and int(d32.granules.sum()) == 88
    # the stain of each crop's granules travels with its rows (NaN: no image)
    od = np.asarray(a.obsm["granule_od"])
    assert od.shape == (a.n_obs, 3) and np.isnan(od[~img]).all() and np.isfinite(od[img]).all()
    np.testing.assert_array_equal(d.granule_od.numpy(), od)


def test_a_source_without_centres_gets_them_from_its_crop_when_mixed(tmp_path):
    _cells_h5ad(tmp_path / "cells.h5ad")
    cs = read_cells_h5ad(tmp_path / "cells.h5ad", 64, granules=True)
    img, cell = _granular_cell(6, size=64)  # a crop-folder crop: only its own size
    other = CropSet(
        crops=img[None], masks=cell[None], obs=pd.DataFrame({"label": ["x"]}, index=["f0"])
    )
    both = CropSet.concat([cs, other])
    assert both.granules.shape == (4, 64, 64) and both.granule_od.shape == (4, 3)
    assert int(both.granules[3].sum()) == len(G.measure_cell(img, cell).blobs)
    np.testing.assert_array_equal(both.granule_od[:3], cs.granule_od)


def test_malformed_centres_name_the_field():
    from vae.data import PairedDataError, _granule_counts

    with pytest.raises(PairedDataError, match="granule_centres"):
        _granule_counts(np.zeros((2, 4, 5), np.uint8), 4, "p.h5ad")


def test_pair_stage_writes_granule_centres_when_asked(tmp_path):
    from tests.helpers.run import run_stage_in_process
    from tests.vae.inputs.test_pairing import _expr

    _cells_h5ad(tmp_path / "cells.h5ad")
    _expr().write_h5ad(tmp_path / "expression.h5ad")
    base = [
        f"paths.root={tmp_path}",
        f"paths.inputs.cells={tmp_path / 'cells.h5ad'}",
        f"paths.inputs.expression={tmp_path / 'expression.h5ad'}",
        "pair.mode=unpaired",
    ]
    run_stage_in_process([*base, "experiment=off"], "pair")
    run_stage_in_process([*base, "experiment=on", "pair.granule_centres=true"], "pair")
    off = ad.read_h5ad(tmp_path / "off" / "pair" / "paired.h5ad")
    on = ad.read_h5ad(tmp_path / "on" / "pair" / "paired.h5ad")
    assert GRANULE_CENTRES not in off.obsm
    assert int(np.asarray(on.obsm[GRANULE_CENTRES]).sum()) == 88
    np.testing.assert_array_equal(on.obsm["crops"], off.obsm["crops"])  # crops unchanged


def test_centres_without_their_stain_are_refused_naming_the_field():
    from vae.inputs.pairing import PairingError

    img, cell = _granular_cell(6, size=64)
    obs = pd.DataFrame({"label": ["x"]}, index=["f0"])
    with pytest.raises(PairingError) as e:
        CropSet(crops=img[None], masks=cell[None], obs=obs, granules=cell[None].astype(np.uint8))
    assert e.value.field == "granule_od"


def test_training_uses_the_tables_targets_and_leaves_the_stain_under_stain_jitter(tmp_path, caplog):
    import logging

    from tests.helpers.run import TINY_TRAIN, run_stage_in_process
    from tests.vae.inputs.test_pairing import _expr

    _cells_h5ad(tmp_path / "cells.h5ad")
    _expr().write_h5ad(tmp_path / "expression.h5ad")
    common = [f"paths.root={tmp_path}", "experiment=g", *TINY_TRAIN]
    run_stage_in_process(
        [
            *common,
            f"paths.inputs.cells={tmp_path / 'cells.h5ad'}",
            f"paths.inputs.expression={tmp_path / 'expression.h5ad'}",
            "pair.mode=unpaired",
            "pair.granule_centres=true",
        ],
        "pair",
    )
    paired = ad.read_h5ad(tmp_path / "g" / "pair" / "paired.h5ad")
    assert paired.uns["pair"]["granule_centres"]
    with caplog.at_level(logging.INFO):
        run_stage_in_process([*common, "variant=plain"], "train")
    said = [r.getMessage() for r in caplog.records]
    assert "granule centres of the paired table: 88" in said
    assert not any("obsm['granule_od']" in m for m in said)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_stage_in_process([*common, "variant=jitter", "trainer.stain_jitter=0.2"], "train")
    warned = [r for r in caplog.records if "obsm['granule_od']" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


def test_the_memory_estimate_counts_the_centres(tmp_path):
    """hardware.stream_above_gib decides on vae.store.dense_bytes: the table's centres
    (a byte a pixel) and stain are held in memory with the crops."""
    from vae.store import dense_bytes

    _cells_h5ad(tmp_path / "cells.h5ad")
    e = ad.AnnData(
        np.ones((2, 3), np.float32),
        obs=pd.DataFrame({"label": ["a", "b"]}, index=["e0", "e1"]),
        var=pd.DataFrame(index=["g0", "g1", "g2"]),
    )
    with_c = make_pairs(read_cells_h5ad(tmp_path / "cells.h5ad", 64, granules=True), e, "unpaired")
    plain = make_pairs(read_cells_h5ad(tmp_path / "cells.h5ad", 64), e, "unpaired")
    with_c.adata.write_h5ad(tmp_path / "with.h5ad")
    plain.adata.write_h5ad(tmp_path / "plain.h5ad")
    n = with_c.adata.n_obs
    extra = dense_bytes(tmp_path / "with.h5ad") - dense_bytes(tmp_path / "plain.h5ad")
    assert extra == n * 64 * 64 + n * 3 * 4
    assert dense_bytes(tmp_path / "with.h5ad", 32) - dense_bytes(tmp_path / "plain.h5ad", 32) == (
        n * 32 * 32 + n * 3 * 4
    )
