"""``pair.within_label=maturation``: crops of a class meet profiles of the same rank.

Crops ranked by how far their nucleus has segmented (vae.lobes.nucleus_segmentation) draw
the profiles at their own quantile of expression maturation; the default draws at random.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from tests.helpers.run import run_stage_in_process
from vae.inputs.pairing import CropSet, PairingError, make_pairs, rank_matched_pools
from vae.inputs.schema import NUCLEUS_SEGMENTATION
from vae.lobes import nucleus_segmentation

S = 64
_YY, _XX = np.mgrid[:S, :S]


def _cell(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A drawn white cell (S, S, 3) uint8 and its mask: pink cytoplasm, a purple nucleus
    that is round, band-shaped (a C) or in three lobes."""
    img = np.zeros((S, S, 3), np.uint8)
    mask = (_YY - 32) ** 2 + (_XX - 32) ** 2 < 28**2
    img[mask] = (225, 190, 210)
    r = np.sqrt((_YY - 32) ** 2 + (_XX - 32) ** 2)
    if kind == "round":
        nuc = r < 15
    elif kind == "band":
        nuc = (r > 11) & (r < 19) & (_XX < 40)
    else:
        nuc = np.zeros((S, S), bool)
        for cy, cx in ((20, 26), (34, 44), (44, 24)):
            nuc |= (_YY - cy) ** 2 + (_XX - cx) ** 2 < 7**2
    img[nuc] = (110, 50, 150)
    return img, mask


def test_nucleus_segmentation_orders_round_band_and_lobed_nuclei():
    cells = [_cell(k) for k in ("round", "band", "lobed")]
    crops = np.stack([c for c, _ in cells])
    masks = np.stack([m for _, m in cells])
    blank = np.zeros((1, S, S, 3), np.uint8)  # no nucleus to find: NaN, not a score
    score = nucleus_segmentation(
        np.concatenate([crops, blank]), np.concatenate([masks, np.ones((1, S, S), bool)])
    )
    round_, band, lobed, none = score
    assert 1.0 <= round_ < 1.1  # one lobe, convex
    assert 1.2 < band < 2.0  # one lobe, bent: its hull holds cytoplasm
    assert 3.0 <= lobed < 4.0  # three lobes
    assert np.isnan(none)
    # the second cut rule of the real preset leaves these well-separated nuclei alone
    assert np.allclose(nucleus_segmentation(crops, masks, 0.3), score[:3])


def test_rank_matched_pools_pair_quantiles_and_skip_unknown_order():
    order = np.array([3.0, 1.0, np.nan, 2.0])  # crops 1 < 3 < 0; crop 2 unknown
    pmat = np.array([0.9, 0.1, np.nan, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])
    pool = np.arange(pmat.size)
    got = rank_matched_pools(np.arange(4), order, pool, pmat, window=0.1)
    assert set(got) == {0, 1, 3}  # the crop without an order draws at random
    means = {i: float(np.mean(pmat[got[i]])) for i in got}
    assert means[1] < means[3] < means[0]
    assert not any(np.isnan(pmat[v]).any() for v in got.values())  # unknown profiles left out
    # 10 known profiles, quantile window 0.1: each crop draws among the ~2 nearest ranks
    assert all(1 <= len(v) <= 3 for v in got.values())
    # a window narrower than one rank step still gives the nearest profile
    narrow = rank_matched_pools(np.arange(4), order, pool, pmat, window=0.0)
    assert all(len(v) == 1 for v in narrow.values())
    assert pmat[narrow[1]][0] < pmat[narrow[3]][0] < pmat[narrow[0]][0]
    assert rank_matched_pools(np.array([2]), order, pool, pmat) == {}


def _toy(n_crops: int = 60, n_prof: int = 90, seed: int = 0):
    """Neutrophil crops with a known order, Neutrophils profiles with a maturation."""
    rng = np.random.default_rng(seed)
    crops = np.zeros((n_crops, 8, 8, 3), np.uint8)
    crops[:, 2:6, 2:6] = 100
    masks = np.zeros((n_crops, 8, 8), bool)
    masks[:, 2:6, 2:6] = True
    obs = pd.DataFrame(
        {"label": ["neutrophil"] * (n_crops - 2) + ["monocyte"] * 2, "source": "toy"},
        index=[f"c{i}" for i in range(n_crops)],
    )
    expr = ad.AnnData(
        X=rng.random((n_prof, 3)).astype(np.float32),
        obs=pd.DataFrame(
            {
                "label": ["Neutrophils"] * (n_prof - 3) + ["Monocytes"] * 3,
                "maturation": rng.random(n_prof).astype(np.float32),
            },
            index=[f"e{i}" for i in range(n_prof)],
        ),
        var=pd.DataFrame(index=["A", "B", "C"]),
    )
    order = rng.random(n_crops) * 4 + 1
    order[5] = np.nan  # a crop where no nucleus was found
    return CropSet(crops=crops, masks=masks, obs=obs), expr, order


def _agreement(res) -> float:
    o = res.adata.obs
    ok = o.has_image & o.has_expression & np.isfinite(o[NUCLEUS_SEGMENTATION])
    ok &= o.label == "Neutrophils"
    return float(spearmanr(o[NUCLEUS_SEGMENTATION][ok], o["expression_maturation"][ok]).statistic)


def test_within_label_maturation_pairs_crops_and_profiles_by_rank():
    crops, expr, order = _toy()
    lm = {"neutrophil": "Neutrophils", "monocyte": "Monocytes"}
    ranked = make_pairs(
        crops, expr, "by_label", label_map=lm, within_label="maturation", crop_order=order, seed=1
    )
    assert _agreement(ranked) > 0.9
    o = ranked.adata.obs
    # every crop keeps a partner of its own class, the unordered one too
    img = o[o.has_image]
    assert img.has_expression.all() and len(img) == len(crops.obs)
    assert (img.image_label.replace(lm) == img.expression_label).all()
    row5 = o[o.image_ref == "c5"].iloc[0]
    assert row5.has_expression and np.isnan(row5[NUCLEUS_SEGMENTATION])
    assert any("within_label: maturation (59 crops ranked)" in n for n in ranked.notes)
    # the default: the same crops draw at random, no order between the two sides
    plain = make_pairs(crops, expr, "by_label", label_map=lm, seed=1)
    assert NUCLEUS_SEGMENTATION not in plain.adata.obs
    o2 = plain.adata.obs.assign(**{NUCLEUS_SEGMENTATION: np.nan})
    o2.loc[o2.has_image, NUCLEUS_SEGMENTATION] = order[
        [crops.obs.index.get_loc(r) for r in o2.image_ref[o2.has_image]]
    ]
    ok = o2.has_image & o2.has_expression & np.isfinite(o2[NUCLEUS_SEGMENTATION])
    rho = spearmanr(o2[NUCLEUS_SEGMENTATION][ok], o2["expression_maturation"][ok]).statistic
    assert abs(rho) < 0.4
    # fixed by the seed
    again = make_pairs(
        crops, expr, "by_label", label_map=lm, within_label="maturation", crop_order=order, seed=1
    )
    assert (again.adata.obs.expression_ref == ranked.adata.obs.expression_ref).all()


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"mode": "by_label", "within_label": "pseudotime"}, "unknown 'pseudotime'"),
        ({"mode": "by_maturation", "within_label": "maturation"}, "needs mode by_label"),
        ({"mode": "by_label", "within_label": "maturation", "crop_order": None}, "crop_order"),
    ],
)
def test_within_label_bad_settings_name_the_field(kwargs, text):
    crops, expr, order = _toy()
    kw = {"crop_order": order, **kwargs}
    mode = kw.pop("mode")
    with pytest.raises(PairingError) as e:
        make_pairs(crops, expr, mode, label_maturation={"neutrophil": 0.9}, **kw)
    assert e.value.field == "pair.within_label" and text in str(e.value)


def test_within_label_needs_the_profiles_maturation():
    crops, expr, order = _toy()
    del expr.obs["maturation"]
    with pytest.raises(PairingError) as e:
        make_pairs(crops, expr, "by_label", within_label="maturation", crop_order=order)
    assert e.value.field == "obs['maturation']"


def test_pair_stage_within_label_maturation_writes_the_order_and_its_agreement(tmp_path):
    root = tmp_path / "crops" / "Neutrophil"
    root.mkdir(parents=True)
    kinds = ["round", "band", "lobed"] * 4
    for i, k in enumerate(kinds):
        img, mask = _cell(k)
        img[~mask] = (245, 235, 240)  # an unmasked crop: the pale smear around the cell
        Image.fromarray(img).save(root / f"{i:02d}_{k}.png")
    n = 30
    expr = ad.AnnData(
        X=np.ones((n, 2), np.float32),
        obs=pd.DataFrame(
            {"label": "Neutrophils", "maturation": np.linspace(0, 1, n, dtype=np.float32)},
            index=[f"e{i}" for i in range(n)],
        ),
        var=pd.DataFrame(index=["A", "B"]),
    )
    expr.write_h5ad(tmp_path / "expression.h5ad")
    run_stage_in_process(
        [
            f"paths.root={tmp_path}",
            "experiment=w",
            f"paths.inputs.expression={tmp_path / 'expression.h5ad'}",
            f"pair.crop_sources=[{{kind: image_folder, path: '{tmp_path / 'crops'}'}}]",
            "pair.mode=by_label",
            "+pair.label_map={neutrophil: Neutrophils}",
            "pair.within_label=maturation",
        ],
        "pair",
    )
    d = tmp_path / "w" / "pair"
    counts = json.loads((d / "pair_counts.json").read_text())
    assert counts["within_label"]["Neutrophils"] > 0.8
    a = ad.read_h5ad(d / "paired.h5ad")
    assert a.uns["pair"]["within_label"] == "maturation"
    img = a.obs[a.obs.has_image]
    kind = img.image_ref.str.extract(r"_(round|band|lobed)")[0].to_numpy()
    mat = img.expression_maturation.to_numpy()
    # round nuclei meet the earliest profiles, three lobes the latest
    assert mat[kind == "round"].max() < mat[kind == "band"].min()
    assert mat[kind == "band"].max() < mat[kind == "lobed"].min()


def test_pair_stage_refuses_within_label_maturation_outside_by_label(tmp_path):
    from pipeline.runner import StageError

    with pytest.raises(StageError) as e:
        run_stage_in_process(
            [f"paths.root={tmp_path}", "experiment=w", "pair.within_label=maturation"], "pair"
        )
    assert "needs pair.mode=by_label, not same_cell" in str(e.value)
    assert not (tmp_path / "w").exists()  # refused before any folder is made
