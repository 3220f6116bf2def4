"""stage=pair: crop readers, the four pairing modes, label maps, the stage.

A tiny crop set (5 crops) and profile set (6 profiles) built by hand; every
mode is checked for exact row counts and modality flags.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.helpers.run import SHARED_DATA, needs_shared, run_pipeline, run_stage_in_process
from vae.inputs.pairing import (
    CropSet,
    PairingError,
    apply_label_corrections,
    make_pairs,
    one_vocabulary,
    read_cells_h5ad,
    read_coco_crops,
    read_image_folder,
    read_label_corrections,
    read_segmentation_wbc,
    resolve_label_map,
    square_crop,
)
from vae.inputs.schema import CELL_DIAMETER, LABEL_ORIGINAL

SHARED = SHARED_DATA
S = 8


def _crops() -> CropSet:
    """5 crops: 2 neutrophil (t 0.1, 0.9), 1 monocyte, 1 eosinophil, 1 band (t 0.5)."""
    n = 5
    crops = np.full((n, S, S, 3), 0, np.uint8)
    masks = np.zeros((n, S, S), bool)
    for i in range(n):
        crops[i, 2:6, 2:6] = 10 * (i + 1)
        masks[i, 2:6, 2:6] = True
    obs = pd.DataFrame(
        {
            "label": ["neutrophil", "neutrophil", "monocyte", "eosinophil", "band"],
            "source": "toy",
            "truth_cell_id": ["e0", "e1", "e4", "", "zz"],
            "maturation": [0.1, 0.9, np.nan, np.nan, 0.5],
            "kind": [
                "segmented_neutrophil",
                "segmented_neutrophil",
                "monocyte",
                "eosinophil",
                "band",
            ],
        },
        index=[f"img{i}" for i in range(n)],
    )
    return CropSet(crops=crops, masks=masks, obs=obs)


def _expr() -> ad.AnnData:
    """6 profiles: 3 Neutrophils (mat 0.05, 0.15, 0.95), 2 Monocytes, 1 GMP (mat 0.55)."""
    X = np.arange(6 * 4, dtype=np.float32).reshape(6, 4) / 10
    counts = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    obs = pd.DataFrame(
        {
            "label": ["Neutrophils", "Neutrophils", "Neutrophils", "GMP", "Monocytes", "Monocytes"],
            "maturation": np.array([0.05, 0.15, 0.95, 0.55, np.nan, 0.3], np.float32),
            "kind": ["n", "n", "n", "g", "m", "m"],
        },
        index=[f"e{i}" for i in range(6)],
    )
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["MPO", "ELANE", "LYZ", "ACTB"]))
    a.layers["counts"] = counts
    a.uns["has_counts"] = True
    a.obs["score_primary"] = np.arange(6, dtype=np.float32)
    return a


def _flags(res) -> tuple[int, int, int]:
    hi = res.adata.obs["has_image"].to_numpy(bool)
    he = res.adata.obs["has_expression"].to_numpy(bool)
    return int((hi & he).sum()), int((hi & ~he).sum()), int((~hi & he).sum())


def _check_consistent(res, crops: CropSet, expr: ad.AnnData) -> None:
    """Rows carry exactly their crop / profile; zeros where a modality is absent."""
    a = res.adata
    pos_c = {c: i for i, c in enumerate(crops.obs.index)}
    pos_e = {c: i for i, c in enumerate(expr.obs_names)}
    for k in range(a.n_obs):
        o = a.obs.iloc[k]
        if o["has_image"]:
            i = pos_c[o["image_ref"]]
            assert np.array_equal(a.obsm["crops"][k], crops.crops[i])
            assert np.array_equal(a.obsm["masks"][k], crops.masks[i])
        else:
            assert o["image_ref"] == "" and not a.obsm["crops"][k].any()
            assert not a.obsm["masks"][k].any()
        if o["has_expression"]:
            j = pos_e[o["expression_ref"]]
            assert np.array_equal(a.X[k], expr.X[j])
            assert np.array_equal(a.layers["counts"][k], expr.layers["counts"][j])
            assert o["score_primary"] == expr.obs["score_primary"].iloc[j]
        else:
            assert o["expression_ref"] == "" and not a.X[k].any()
            assert np.isnan(o["score_primary"])
        both = o["has_image"] and o["has_expression"]
        assert (o["pair_mode"] == "unpaired") == (not both)
    assert a.obsm["crops"].dtype == np.uint8 and a.obsm["masks"].dtype == bool
    assert a.X.dtype == np.float32
    s = res.summary
    assert int(s["n"].sum()) == a.n_obs


# --- modes -----------------------------------------------------------------------


def test_same_cell():
    c, e = _crops(), _expr()
    res = make_pairs(c, e, "same_cell")
    # img0-e0, img1-e1, img2-e4 paired; img3 (no truth), img4 (zz) image-only;
    # e2, e3, e5 expression-only
    assert _flags(res) == (3, 2, 3)
    obs = res.adata.obs
    paired = obs[obs.has_image & obs.has_expression]
    assert dict(zip(paired.image_ref, paired.expression_ref)) == {
        "img0": "e0",
        "img1": "e1",
        "img2": "e4",
    }
    assert set(paired.pair_mode) == {"same_cell"}
    _check_consistent(res, c, e)
    # truth columns: the crop's, and the profile's on expression-only rows
    eo = obs[~obs.has_image]
    assert list(eo["kind"]) == ["n", "g", "m"]
    assert list(obs[obs.has_image]["kind"])[:2] == ["segmented_neutrophil"] * 2
    # maturation: the crop's, else the profile's
    np.testing.assert_allclose(
        obs["maturation"].to_numpy(dtype=float),
        [0.1, 0.9, np.nan, np.nan, 0.5, 0.95, 0.55, 0.3],
        equal_nan=True,
    )
    # dropping unmatched sides
    res2 = make_pairs(c, e, "same_cell", keep_unmatched_images=False, keep_unused_expression=False)
    assert _flags(res2) == (3, 0, 0)


def test_same_cell_needs_truth_ids():
    c = _crops()
    c.obs = c.obs.drop(columns="truth_cell_id")
    with pytest.raises(PairingError) as e:
        make_pairs(c, _expr(), "same_cell")
    assert e.value.field == "pair.mode"


def test_by_label_with_label_map_is_fixed_by_seed():
    c, e = _crops(), _expr()
    lm = {"neutrophil": "Neutrophils", "Monocyte": "monocytes"}  # case-insensitive
    res = make_pairs(c, e, "by_label", label_map=lm, seed=3)
    # neutrophil x2 and monocyte paired; eosinophil, band image-only;
    # profiles never drawn are expression-only (6 - drawn)
    obs = res.adata.obs
    paired = obs[obs.has_image & obs.has_expression]
    assert list(paired.image_ref) == ["img0", "img1", "img2"]
    assert set(paired.expression_ref[:2]) <= {"e0", "e1", "e2"}
    assert paired.expression_ref.iloc[2] in {"e4", "e5"}
    n_drawn = paired.expression_ref.nunique()
    assert _flags(res) == (3, 2, 6 - n_drawn)
    # one vocabulary: mapped image classes carry the expression label
    assert list(paired.label) == ["Neutrophils", "Neutrophils", "Monocytes"]
    assert list(paired.image_label) == ["neutrophil", "neutrophil", "monocyte"]
    _check_consistent(res, c, e)
    same = make_pairs(c, e, "by_label", label_map=lm, seed=3).adata.obs
    assert list(same.expression_ref) == list(obs.expression_ref)
    draws = [
        tuple(make_pairs(c, e, "by_label", label_map=lm, seed=s).adata.obs.expression_ref[:3])
        for s in range(8)
    ]
    assert len(set(draws)) > 1  # the seed matters


def test_by_label_draws_per_crop_and_identity_map():
    c, e = _crops(), _expr()
    e.obs["label"] = ["neutrophil", "neutrophil", "neutrophil", "GMP", "monocyte", "monocyte"]
    res = make_pairs(c, e, "by_label", draws_per_crop=2, seed=0)  # {} = identity
    obs = res.adata.obs
    paired = obs[obs.has_image & obs.has_expression]
    assert len(paired) == 6  # 3 crops x 2 draws
    assert list(paired.draw) == [0, 1, 0, 1, 0, 1]
    for ref, grp in paired.groupby("image_ref"):
        assert grp.expression_ref.nunique() == 2, ref  # without replacement within a crop
    # monocyte has 2 profiles, both drawn; neutrophil draws 2 of 3 twice
    assert set(obs[~obs.has_image].expression_ref) <= {"e0", "e1", "e2", "e3"}
    assert "e3" in set(obs[~obs.has_image].expression_ref)


def test_by_label_union_of_expression_labels():
    c, e = _crops(), _expr()
    lm = {"monocyte": "Monocytes|gmp"}
    res = make_pairs(c, e, "by_label", label_map=lm, draws_per_crop=3, seed=0)
    obs = res.adata.obs
    paired = obs[obs.has_image & obs.has_expression]
    assert list(paired.image_ref) == ["img2"] * 3
    assert set(paired.expression_ref) <= {"e3", "e4", "e5"} and paired.expression_ref.nunique() == 3
    assert set(paired.label) == {"monocyte"}  # a union keeps the image label
    with pytest.raises(PairingError) as err:
        make_pairs(c, e, "by_label", label_map={"monocyte": "Monocytes|nope"})
    assert "'nope'" in str(err.value)


def test_image_classes_mapped_onto_one_label_keep_their_names_and_are_named(caplog):
    """Audit: band and segmented neutrophils both mapped onto Neutrophils were all
    labelled Neutrophils, and the band class was gone with no word said."""
    c, e = _crops(), _expr()
    lm = {"band": "Neutrophils", "neutrophil": "Neutrophils", "monocyte": "Monocytes"}
    with caplog.at_level(logging.WARNING):
        res = make_pairs(c, e, "by_label", label_map=lm, seed=0)
    obs = res.adata.obs
    img = obs[obs.has_image]
    # each class keeps its name (as a "|" union does); the 1:1 class takes the target
    assert list(img.label) == ["neutrophil", "neutrophil", "Monocytes", "eosinophil", "band"]
    assert list(img.image_label) == ["neutrophil", "neutrophil", "monocyte", "eosinophil", "band"]
    # ... and still draws the profiles of the label it maps onto
    b = img[img.image_label == "band"]
    assert bool(b.has_expression.iloc[0]) and b.expression_label.iloc[0] == "Neutrophils"
    assert set(img[img.image_label == "neutrophil"].expression_label) == {"Neutrophils"}
    assert res.shared_labels == {"Neutrophils": {"band": 1, "neutrophil": 2}}
    text = (
        "pair.label_map: image classes band (1 crops), neutrophil (2 crops) all map onto the "
        "expression label 'Neutrophils'; each keeps its own class as obs['label']"
    )
    assert text in caplog.text and "pair.label_corrections" in caplog.text
    assert any(text in n for n in res.notes)
    s = res.summary
    assert set(s[s.modalities == "image+expression"].label) == {"band", "neutrophil", "Monocytes"}
    # the same study written with a union keeps the image classes as well
    union = {"band": "Neutrophils|Neutrophils", "neutrophil": "Neutrophils|Neutrophils"}
    u = make_pairs(c, e, "by_label", label_map=union, seed=0).adata.obs
    assert list(u.label[u.has_image]) == [
        "neutrophil",
        "neutrophil",
        "monocyte",
        "eosinophil",
        "band",
    ]


def test_one_vocabulary_merges_only_spellings_of_one_class():
    # {} = identity: two spellings of one class both meet "Neutrophils" and take it
    relabel, shared = one_vocabulary(
        {"Neutrophils": "Neutrophils", "neutrophils": "Neutrophils"},
        ["Neutrophils", "neutrophils", "neutrophils"],
    )
    assert relabel == {"Neutrophils": "Neutrophils", "neutrophils": "Neutrophils"}
    assert shared == {}
    # a class mapped onto the name another (unmapped) crop class already has
    relabel, shared = one_vocabulary({"band": "Neutrophils"}, ["band", "Neutrophils", ""])
    assert relabel == {} and shared == {"Neutrophils": {"Neutrophils": 1, "band": 1}}
    # a union beside a single target: nothing merges, the single class takes its label
    relabel, shared = one_vocabulary(
        {"band": "Neutrophils", "lymphocyte": "Neutrophils|GMP"}, ["band", "lymphocyte"]
    )
    assert relabel == {"band": "Neutrophils"} and shared == {}


@pytest.mark.parametrize("preset", ["by_label_real", "real_chain", "by_label_pbmc"])
def test_presets_pair_as_before(preset, caplog):
    """The shipped maps send one image class to each label: every mapped crop takes its
    target (a union keeps its class), the draws are those of before, and no warning."""
    from omegaconf import OmegaConf

    from tests.helpers.run import compose_config

    cfg = compose_config(["stage=pair", f"pair={preset}"])
    lm = OmegaConf.to_container(cfg.pair.label_map)
    targets = sorted({t for v in lm.values() for t in v.split("|")})
    classes = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
    n = 3 * len(classes)
    c = CropSet(
        crops=np.zeros((n, S, S, 3), np.uint8),
        masks=np.ones((n, S, S), bool),
        obs=pd.DataFrame(
            {"label": classes * 3, "source": "toy"}, index=[f"img{i}" for i in range(n)]
        ),
    )
    labs = [*targets, *targets, "GMP"]
    e = ad.AnnData(
        X=np.ones((len(labs), 2), np.float32),
        obs=pd.DataFrame({"label": labs}, index=[f"e{i}" for i in range(len(labs))]),
    )
    with caplog.at_level(logging.WARNING):
        res = make_pairs(c, e, "by_label", label_map=lm, seed=0)
    assert res.shared_labels == {} and "all map onto" not in caplog.text
    obs = res.adata.obs
    img = obs[obs.has_image]
    # the rule of before: a class with one target takes it; unions and unmapped keep theirs
    single = {k: v for k, v in lm.items() if "|" not in v}
    assert list(img.label) == [single.get(x, x) for x in img.image_label]
    assert set(img[img.has_expression].image_label) == set(lm)
    # the draws depend on the seed and the map only
    same = make_pairs(c, e, "by_label", label_map=lm, seed=0).adata.obs
    assert list(same.expression_ref) == list(obs.expression_ref)


def test_label_map_naming_a_missing_class_is_an_error():
    c, e = _crops(), _expr()
    with pytest.raises(PairingError) as err:
        make_pairs(c, e, "by_label", label_map={"neutrophil": "Neutrophil"})
    assert err.value.field == "pair.label_map" and "'Neutrophil'" in str(err.value)
    assert "Neutrophils" in str(err.value)  # lists the valid labels
    with pytest.raises(PairingError) as err:
        make_pairs(c, e, "by_label", label_map={"basophil": "GMP"})
    assert err.value.field == "pair.label_map" and "basophil" in str(err.value)
    assert resolve_label_map({"x": "y"}, ["a"], ["b"], strict=False) == {}


def test_by_maturation_bins():
    c, e = _crops(), _expr()
    res = make_pairs(c, e, "by_maturation", n_bins=2, label_maturation={"monocyte": 0.2}, seed=0)
    obs = res.adata.obs
    paired = obs[obs.has_image & obs.has_expression]
    # bins [0, .5) and [.5, 1]: img0 (0.1), img2 (0.2 from label) -> {e0, e1, e5};
    # img1 (0.9), img4 (0.5) -> {e2, e3}; img3 has no maturation -> image-only
    assert list(paired.image_ref) == ["img0", "img1", "img2", "img4"]
    lo, hi = {"e0", "e1", "e5"}, {"e2", "e3"}
    refs = dict(zip(paired.image_ref, paired.expression_ref))
    assert refs["img0"] in lo and refs["img2"] in lo
    assert refs["img1"] in hi and refs["img4"] in hi
    assert _flags(res) == (4, 1, 6 - len(set(refs.values())))
    _check_consistent(res, c, e)
    with pytest.raises(PairingError, match=r"\[pair\.n_bins\] must be >= 1"):
        make_pairs(c, e, "by_maturation", n_bins=0)


def test_unpaired_and_expression_only():
    c, e = _crops(), _expr()
    res = make_pairs(c, e, "unpaired")
    assert _flags(res) == (0, 5, 6)
    assert set(res.adata.obs.pair_mode) == {"unpaired"}
    _check_consistent(res, c, e)
    summ = res.summary.set_index(["label", "modalities"])["n"]
    assert summ[("neutrophil", "image")] == 2 and summ[("Neutrophils", "expression")] == 3
    res = make_pairs(None, e, "unpaired", crop_size=S)
    assert _flags(res) == (0, 0, 6) and res.adata.obsm["crops"].shape == (6, S, S, 3)
    with pytest.raises(PairingError) as err:
        make_pairs(c, e, "nearest")
    assert err.value.field == "pair.mode" and "by_label" in str(err.value)


def test_image_only_reads_no_expression_and_has_no_gene():
    c = _crops()
    res = make_pairs(c, None, "image_only")
    a = res.adata
    assert _flags(res) == (0, 5, 0) and a.n_vars == 0 and a.X.shape == (5, 0)
    assert a.uns["has_counts"] is False and "counts" not in a.layers
    assert list(a.obs["label"]) == list(c.obs["label"])
    assert list(a.obs["image_ref"]) == list(c.obs.index)
    assert (a.obs["expression_ref"] == "").all() and set(a.obs.pair_mode) == {"unpaired"}
    assert np.array_equal(a.obsm["crops"], c.crops) and np.array_equal(a.obsm["masks"], c.masks)
    np.testing.assert_allclose(a.obs["maturation"], c.obs["maturation"])
    for bad in [(c, _expr(), "image_only"), (None, None, "image_only"), (c, None, "by_label")]:
        with pytest.raises(PairingError) as err:
            make_pairs(*bad)
        assert err.value.field == "pair.mode"


def test_no_counts_gives_no_counts_layer():
    e = _expr()
    del e.layers["counts"]
    e.uns["has_counts"] = False
    res = make_pairs(_crops(), e, "same_cell")
    assert "counts" not in res.adata.layers and res.adata.uns["has_counts"] is False


# --- crop readers ----------------------------------------------------------------


def test_square_crop_background_and_mask():
    img = np.full((20, 30, 3), 200, np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:20] = True
    img[mask] = 50
    c, m = square_crop(img, mask, 16, background=7, margin=0.0)
    assert c.shape == (16, 16, 3) and m.shape == (16, 16) and m.all()  # box = mask
    c, m = square_crop(img, mask, 16, background=7, margin=1.0)
    assert m.sum() < 16 * 16 and (c[~m] == 7).all() and m[8, 8]
    assert (c[5:11, 5:11] == 50).all()  # interior exact; edge pixels blend with 7
    assert (c[m] <= 50).all()


def _square_crop_padded(image, mask, size, background=0, margin=0.1):
    """square_crop as it was: the padded square made whole, then resized (the reference)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        ys, xs = np.array([0, h - 1]), np.array([0, w - 1])
    side = int(np.ceil(max(np.ptp(ys) + 1, np.ptp(xs) + 1) * (1 + margin)))
    side = max(h, w) if mask.all() else side
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    y0, x0 = int(np.floor(cy - side / 2)), int(np.floor(cx - side / 2))
    pad = max(0, -y0, -x0, y0 + side - h, x0 + side - w)
    image = image.copy()
    image[~mask] = background
    img = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=background)
    msk = np.pad(mask, pad, constant_values=False)
    img = img[y0 + pad : y0 + side + pad, x0 + pad : x0 + side + pad]
    msk = msk[y0 + pad : y0 + side + pad, x0 + pad : x0 + side + pad]
    img = np.array(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    msk = np.asarray(
        Image.fromarray(msk.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    )
    msk = msk > 127
    img[~msk] = background
    return img, msk


def test_square_crop_is_the_padded_resize_without_image_sized_copies():
    # a 16000 x 12000 crop made stage=pair peak at 8 GB: np.nonzero of its all-True mask
    # and padded copies; the strip-wise resize gives the same bytes
    import tracemalloc

    rng = np.random.default_rng(0)
    for t in range(300):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = [np.ones((h, w), bool), rng.random((h, w)) < 0.4, np.zeros((h, w), bool)][t % 3]
        size, bg = int(rng.choice([8, 16, 64, 100])), int(rng.choice([0, 7, 255]))
        margin = float(rng.choice([0.0, 0.1, 1.0]))
        c, m = square_crop(img, mask, size, bg, margin)
        rc, rm = _square_crop_padded(img, mask, size, bg, margin)
        assert np.array_equal(c, rc) and np.array_equal(m, rm), (h, w, t % 3, size, bg, margin)
    img = rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8)  # 18 MB, several strips
    whole = np.broadcast_to(True, img.shape[:2])
    tracemalloc.start()
    c, m = square_crop(img, whole, 64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1.5 * img.nbytes  # was 9 x (nonzero's two int64 arrays, padded copies)
    assert np.array_equal(c, _square_crop_padded(img, np.ones(img.shape[:2], bool), 64)[0])


def test_image_folder_reader(tmp_path):
    root = tmp_path / "crops"
    for cls, n in (("Neutrophil", 3), ("Monocyte", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((30, 20, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    (root / "Monocyte" / "notes.txt").write_text("not an image")
    cs = read_image_folder(root, 12, background=0)
    # 30 x 20 images padded to 30 x 30: mask = the image, not the padding
    assert cs.crops.shape == (4, 12, 12, 3)
    assert cs.masks[:, :, 3:9].all() and not cs.masks[:, :, :2].any()
    assert list(cs.obs.label) == ["monocyte", "neutrophil", "neutrophil", "neutrophil"]
    assert not cs.obs.has_mask.any()
    assert len(read_image_folder(root, 12, max_per_class=2)) == 3
    with pytest.raises(PairingError, match=r"nope: \[path\] no such folder"):
        read_image_folder(tmp_path / "nope", 12)
    # one unreadable image: skipped and listed when the caller collects rejects
    (root / "Monocyte" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rejects: list = []
    cs = read_image_folder(root, 12, rejects=rejects)
    assert len(cs) == 4 and len(rejects) == 1
    assert rejects[0]["image"].endswith("broken.jpg") and rejects[0]["action"] == "skipped"
    with pytest.raises(PairingError, match="unreadable"):
        read_image_folder(root, 12)  # not collecting: an error, as before


def test_image_folder_names_not_utf8_are_escaped_as_stage_segment_writes_them(tmp_path):
    # a Latin-1 name (b"caf\xe9.png") reaches Python with a surrogate, which the h5ad
    # writer refused after every crop was read: ids, labels and reject rows are escaped
    # as segmentation.io.recorded_name writes them
    import os

    root = tmp_path / "crops"
    cls = root / os.fsdecode(b"Caf\xe9s")
    cls.mkdir(parents=True)
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(cls / os.fsdecode(b"caf\xe9.png"))
    (cls / os.fsdecode(b"b\xe4d.jpg")).write_bytes(b"not an image")
    rejects: list = []
    cs = read_image_folder(root, 12, rejects=rejects)
    assert list(cs.obs.index) == ["crops/Caf\\xe9s/caf\\xe9.png"]
    assert list(cs.obs.label) == ["caf\\xe9s"]
    assert [Path(r["image"]).name for r in rejects] == ["b\\xe4d.jpg"]
    out = make_pairs(cs, None, "image_only").adata
    out.write_h5ad(tmp_path / "p.h5ad")  # no UnicodeEncodeError
    assert ad.read_h5ad(tmp_path / "p.h5ad").obs.image_ref.tolist() == list(cs.obs.index)


def test_segmentation_wbc_reader(tmp_path):
    root = tmp_path / "seg"
    (root / "dataset1").mkdir(parents=True)
    for i in (1, 2, 3):
        img = np.full((40, 40, 3), 220, np.uint8)
        m = np.zeros((40, 40), np.uint8)
        m[10:30, 10:30] = 128
        m[15:25, 15:25] = 255
        img[m > 0] = 90
        Image.fromarray(img).save(root / "dataset1" / f"{i:03d}.bmp")
        Image.fromarray(m).save(root / "dataset1" / f"{i:03d}.png")
    (root / "dataset1_labels.csv").write_text("image ID,class label\n1,2\n2,1\n3,1\n")
    cs = read_segmentation_wbc(root, 16, background=5, subsets=("dataset1",))
    assert list(cs.obs.label) == ["lymphocyte", "neutrophil", "neutrophil"]
    assert list(cs.obs.index) == [f"segmentation_wbc/dataset1/{i:03d}" for i in (1, 2, 3)]
    assert cs.obs.has_mask.all() and cs.crops.shape == (3, 16, 16, 3)
    assert (cs.crops[~cs.masks] == 5).all() and cs.masks[:, 8, 8].all() and not cs.masks.all()
    # an unreadable image and a missing mask: skipped, each a reject row
    (root / "dataset1" / "002.bmp").write_text("junk")
    (root / "dataset1" / "003.png").unlink()
    rejects: list = []
    cs = read_segmentation_wbc(root, 16, subsets=("dataset1",), rejects=rejects)
    assert list(cs.obs.index) == ["segmentation_wbc/dataset1/001"]
    assert sorted(Path(r["image"]).name for r in rejects) == ["002.bmp", "003.png"]
    assert {r["field"] for r in rejects} == {"image", "mask"}
    (root / "dataset1_labels.csv").write_text("image ID,class label\n1,9\n")
    with pytest.raises(PairingError) as e:
        read_segmentation_wbc(root, 16, subsets=("dataset1",))
    assert e.value.field == "class label" and "line 2" in str(e.value)
    # an id listed twice: the line of each, not a duplicate-index error later
    (root / "dataset1_labels.csv").write_text("image ID,class label\n1,2\n1,1\n")
    with pytest.raises(PairingError, match="line 3: image 1 is listed again .first on line 2"):
        read_segmentation_wbc(root, 16, subsets=("dataset1",))


def _segmentation_wbc(root: Path, ids=(1, 2, 3), shape=(40, 40)) -> None:
    (root / "dataset1").mkdir(parents=True, exist_ok=True)
    for i in ids:
        img = np.full((*shape, 3), 220, np.uint8)
        m = np.zeros(shape, np.uint8)
        m[10:30, 10:30] = 128
        img[m > 0] = 90
        Image.fromarray(img).save(root / "dataset1" / f"{i:03d}.bmp")
        Image.fromarray(m).save(root / "dataset1" / f"{i:03d}.png")
    lines = "".join(f"{i},1\n" for i in ids)
    (root / "dataset1_labels.csv").write_text("image ID,class label\n" + lines)


def test_segmentation_wbc_damaged_label_csv_names_the_file(tmp_path):
    # was pandas' UnicodeDecodeError / EmptyDataError / ParserError, exit 1, no file named
    root = tmp_path / "seg"
    _segmentation_wbc(root)
    csv = root / "dataset1_labels.csv"
    for data in (b"image ID,class label\n1,1\n2,1 caf\xe9\n", b"", b"a,b\n1,1\n2,1,3,4\n"):
        csv.write_bytes(data)
        with pytest.raises(PairingError, match="not a readable label CSV") as e:
            read_segmentation_wbc(root, 16, subsets=("dataset1",), rejects=[])
        assert e.value.source == str(csv) and e.value.field == "path"


def test_segmentation_wbc_mis_sized_or_empty_mask_is_a_reject_not_fatal(tmp_path):
    # a mask of another size stopped the whole stage (exit 2) though unreadable ones
    # were skipped; an all-zero mask was paired as an all-black crop without a word
    root = tmp_path / "seg"
    _segmentation_wbc(root, ids=(1, 2, 3))
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(root / "dataset1" / "002.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "dataset1" / "003.png")
    rejects: list = []
    cs = read_segmentation_wbc(root, 16, subsets=("dataset1",), rejects=rejects)
    assert list(cs.obs.index) == ["segmentation_wbc/dataset1/001"]
    assert [(Path(r["image"]).name, r["field"], r["action"]) for r in rejects] == [
        ("002.png", "mask", "skipped"),
        ("003.png", "mask", "skipped"),
    ]
    assert "30x40 px vs image 40x40 px" in rejects[0]["reason"]
    assert rejects[1]["reason"] == "empty mask (no cell)"
    with pytest.raises(PairingError, match=r"002.png: \[mask\] mask 30x40"):
        read_segmentation_wbc(root, 16, subsets=("dataset1",))  # not collecting: an error
    # every mask empty: said so, not "no images found" (review of the reject rows above)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "dataset1" / "001.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "dataset1" / "002.png")
    rejects = []
    with pytest.raises(PairingError, match=r"\[image\] none of its 3 labelled image\(s\)"):
        read_segmentation_wbc(root, 16, subsets=("dataset1",), rejects=rejects)
    assert len(rejects) == 3


def _cells_h5ad(path: Path, size: int = 12) -> None:
    n = 3
    crops = np.full((n, size, size, 3), 100, np.uint8)
    masks = np.zeros((n, size, size), bool)
    masks[:, 2:10, 2:10] = True
    obs = pd.DataFrame(
        {
            "image": "sim_0000.png",
            "truth_cell_id": ["e0", "", "e3"],
            "kind": ["myeloblast", "band", "lymphocyte"],
            "t": [0.0, 0.8, np.nan],
            "lineage": ["neutrophil", "neutrophil", "lymphocyte"],
        },
        index=["cell0", "cell1", "cell2"],
    )
    a = ad.AnnData(obs=obs)
    a.obsm["crops"] = crops
    a.obsm["masks"] = masks
    a.uns["crop_size"] = size
    a.write_h5ad(path)


def test_cells_h5ad_reader_resizes_and_blanks_background(tmp_path):
    _cells_h5ad(tmp_path / "cells.h5ad")
    cs = read_cells_h5ad(tmp_path / "cells.h5ad", 24, background=3)
    assert cs.crops.shape == (3, 24, 24, 3) and cs.masks.shape == (3, 24, 24)
    assert cs.masks.sum() == 3 * 16 * 16  # nearest-neighbour doubling of an 8x8 box
    assert (cs.crops[~cs.masks] == 3).all() and (cs.crops[cs.masks] == 100).all()
    assert list(cs.obs.label) == ["myeloblast", "band", "lymphocyte"]
    np.testing.assert_allclose(cs.obs.maturation, [0.0, 0.8, np.nan])


def test_cell_diameter_goes_from_cells_h5ad_into_the_paired_rows(tmp_path):
    _cells_h5ad(tmp_path / "cells.h5ad")
    a = ad.read_h5ad(tmp_path / "cells.h5ad")
    a.obs[CELL_DIAMETER] = [30.0, 41.5, np.nan]
    a.write_h5ad(tmp_path / "sized.h5ad")
    cs = read_cells_h5ad(tmp_path / "sized.h5ad", 24)
    np.testing.assert_allclose(cs.obs[CELL_DIAMETER], [30.0, 41.5, np.nan])
    e = _expr()
    res = make_pairs(cs, e, "unpaired")
    obs = res.adata.obs
    img = obs.has_image.to_numpy()
    by_ref = dict(zip(obs.image_ref[img], obs[CELL_DIAMETER][img]))
    assert by_ref["cell0"] == 30.0 and by_ref["cell1"] == 41.5 and np.isnan(by_ref["cell2"])
    assert obs[CELL_DIAMETER][~img].isna().all()  # a profile has no size
    # crops read without stage=segment (no such column): every size is unknown
    assert make_pairs(_crops(), e, "same_cell").adata.obs[CELL_DIAMETER].isna().all()


def test_cells_h5ad_without_cells_is_a_clear_error(tmp_path):
    _cells_h5ad(tmp_path / "cells.h5ad")
    a = ad.read_h5ad(tmp_path / "cells.h5ad")[:0].copy()  # stage=segment kept no cell
    a.write_h5ad(tmp_path / "empty.h5ad")
    with pytest.raises(PairingError, match=r"holds no cells .*segmentation.epochs"):
        read_cells_h5ad(tmp_path / "empty.h5ad", 24)


def test_cells_with_an_empty_mask_are_skipped_as_rejects_not_trained_as_black(tmp_path):
    """A cell whose mask is empty would pair as an all-background crop: it is left out
    with a reject row naming the cell and the field; all empty is an error."""
    _cells_h5ad(tmp_path / "cells.h5ad")
    a = ad.read_h5ad(tmp_path / "cells.h5ad")
    masks = np.asarray(a.obsm["masks"]).copy()
    masks[1] = False
    a.obsm["masks"] = masks
    a.write_h5ad(tmp_path / "hole.h5ad")
    rejects: list = []
    cs = read_cells_h5ad(tmp_path / "hole.h5ad", 24, rejects=rejects)
    assert list(cs.obs.index) == ["cell0", "cell2"]
    assert cs.masks.reshape(2, -1).any(axis=1).all()
    assert [(r["field"], r["reason"]) for r in rejects] == [
        ("obsm['masks']", "empty mask (no cell)")
    ]
    assert rejects[0]["image"].endswith("hole.h5ad[cell1]")
    a.obsm["masks"] = np.zeros_like(masks)
    a.write_h5ad(tmp_path / "none.h5ad")
    with pytest.raises(PairingError, match=r"every one of its 3 masks is empty"):
        read_cells_h5ad(tmp_path / "none.h5ad", 24, rejects=[])


# --- the stage -------------------------------------------------------------------


_run = run_pipeline


def _run_in_process(overrides: list[str], name: str = "pair") -> None:
    run_stage_in_process(overrides, name)


def test_pair_stage_same_cell_on_cells_h5ad(tmp_path):
    _cells_h5ad(tmp_path / "cells.h5ad")
    e = _expr()
    e.write_h5ad(tmp_path / "expression.h5ad")
    _run_in_process(
        [
            f"paths.root={tmp_path}",
            "experiment=p",
            f"paths.inputs.cells={tmp_path / 'cells.h5ad'}",
            f"paths.inputs.expression={tmp_path / 'expression.h5ad'}",
            "pair.crop_size=16",
        ]
    )
    d = tmp_path / "p" / "pair"
    a = ad.read_h5ad(d / "paired.h5ad")
    counts = json.loads((d / "pair_counts.json").read_text())
    # cell0-e0, cell2-e3 paired; cell1 image-only; e1, e2, e4, e5 expression-only
    assert counts == {
        "rows": 7,
        "image+expression": 2,
        "image_only": 1,
        "expression_only": 4,
        "genes": 4,
        "crop_size": 16,
        "has_counts": True,
    }
    assert a.obsm["crops"].shape == (7, 16, 16, 3) and a.obsm["masks"].shape == (7, 16, 16)
    assert list(a.obs.columns[:3]) == ["has_image", "has_expression", "pair_mode"]
    assert a.obs.has_image.dtype == bool and "counts" in a.layers
    summary = pd.read_csv(d / "pair_summary.csv")
    assert int(summary.n.sum()) == 7 and set(summary.columns) == {"label", "modalities", "n"}
    assert (d / "crops.png").exists()


def _pair_args(tmp_path: Path, experiment: str, mode: str, crops: Path) -> list[str]:
    """stage=pair overrides: the test's expression.h5ad and one image_folder of crops."""
    return [
        f"paths.root={tmp_path}",
        f"experiment={experiment}",
        f"paths.inputs.expression={tmp_path / 'expression.h5ad'}",
        f"pair.crop_sources=[{{kind: image_folder, path: '{crops}'}}]",
        f"pair.mode={mode}",
    ]


def test_pair_stage_bad_label_map_writes_nothing(tmp_path):
    root = tmp_path / "crops"
    (root / "Neutrophil").mkdir(parents=True)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "Neutrophil" / "a.png")
    _expr().write_h5ad(tmp_path / "expression.h5ad")
    from pipeline.runner import StageError

    with pytest.raises(StageError) as e:
        _run_in_process(
            [
                *_pair_args(tmp_path, "bad", "by_label", root),
                "+pair.label_map={neutrophil: Neutrophilz}",
            ]
        )
    assert "[pair.label_map]" in str(e.value) and "Neutrophilz" in str(e.value)
    d = tmp_path / "bad" / "pair"
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "pair.log"]


def test_pair_stage_with_every_crop_rejected_says_so_and_lists_them(tmp_path):
    # was "[path] no images found" though 2 files were read and rejected, no rejects.csv
    root = tmp_path / "crops"
    (root / "X").mkdir(parents=True)
    (root / "X" / "text.jpg").write_text("not an image")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / "X" / "tiny.png")
    _expr().write_h5ad(tmp_path / "expression.h5ad")
    from pipeline.runner import StageError

    with pytest.raises(StageError) as e:
        _run_in_process(_pair_args(tmp_path, "bad", "unpaired", root))
    d = tmp_path / "bad" / "pair"
    assert "[image] none of its 2 image file(s) could be used" in str(e.value)
    assert f"2 row(s) in {d / 'rejects.csv'}" in str(e.value)
    rej = pd.read_csv(d / "rejects.csv")
    assert sorted(Path(p).name for p in rej["image"]) == ["text.jpg", "tiny.png"]
    assert not (d / "paired.h5ad").exists()
    # overwrite=true on a complete run: the previous result is put back, so the error
    # names the rejects.csv of the failed attempt's folder, not the one it restored
    # (review: it named pair/rejects.csv, which held the previous run's rows again)
    good = tmp_path / "good"
    (good / "X").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 60 * i, np.uint8)).save(good / "X" / f"c{i}.png")
    _run_in_process(_pair_args(tmp_path, "ow", "unpaired", good))
    d = tmp_path / "ow" / "pair"
    before = (d / "rejects.csv").read_bytes()
    with pytest.raises(StageError) as e:
        _run_in_process([*_pair_args(tmp_path, "ow", "unpaired", root), "overwrite=true"])
    (failed,) = d.parent.glob("pair.failed-*")
    assert f"2 row(s) in {failed / 'rejects.csv'}" in str(e.value)
    assert str(d / "rejects.csv") not in str(e.value)
    assert len(pd.read_csv(failed / "rejects.csv")) == 2
    assert (d / "rejects.csv").read_bytes() == before and (d / "paired.h5ad").is_file()


def test_pair_stage_names_an_expression_file_without_labels(tmp_path):
    e = _expr()
    del e.obs["label"]
    for i in range(25):  # a long column list is cut, and says so (review)
        e.obs[f"qc{i:02d}"] = 0
    e.write_h5ad(tmp_path / "expression.h5ad")
    from pipeline.runner import StageError

    with pytest.raises(StageError) as err:
        _run_in_process(
            [
                f"paths.root={tmp_path}",
                "experiment=nolab",
                f"paths.inputs.expression={tmp_path / 'expression.h5ad'}",
                "pair.crop_sources=[]",
                "pair.mode=unpaired",
            ]
        )
    assert str(err.value).startswith(f"{tmp_path / 'expression.h5ad'}: [obs['label']] no obs")
    assert f", ... ({len(e.obs.columns)} in all)); stage=expression writes it" in str(err.value)


def test_pair_stage_names_image_classes_sharing_one_label(tmp_path, caplog):
    """The auditor's study: band and segmented_neutrophil both onto Neutrophils."""
    root = tmp_path / "crops"
    for cls, k in (("band", 2), ("segmented_neutrophil", 3), ("monocyte", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(k):
            img = np.full((12, 12, 3), 40 * (i + 1), np.uint8)
            Image.fromarray(img).save(root / cls / f"{cls}{i}.png")
    _expr().write_h5ad(tmp_path / "expression.h5ad")
    with caplog.at_level(logging.WARNING):
        _run_in_process(
            [
                *_pair_args(tmp_path, "merge", "by_label", root),
                "pair.crop_size=16",
                "+pair.label_map={band: Neutrophils, segmented_neutrophil: Neutrophils, "
                "monocyte: Monocytes}",
            ]
        )
    d = tmp_path / "merge" / "pair"
    assert (
        "image classes band (2 crops), segmented_neutrophil (3 crops) all map onto the "
        "expression label 'Neutrophils'" in caplog.text
    )
    counts = json.loads((d / "pair_counts.json").read_text())
    assert counts["label_map_shared"] == {"Neutrophils": {"band": 2, "segmented_neutrophil": 3}}
    summary = pd.read_csv(d / "pair_summary.csv")
    both = summary[summary.modalities == "image+expression"].set_index("label").n.to_dict()
    assert both == {"band": 2, "segmented_neutrophil": 3, "Monocytes": 1}
    a = ad.read_h5ad(d / "paired.h5ad")
    assert "all map onto" in " ".join(json.loads(a.uns["pair"]["notes"]))


@needs_shared(SHARED / "cells/bccd_cropped", "bccd_cropped")
def test_real_crops_by_label_against_paul15_labels(tmp_path):
    """The real-data config: bccd_cropped + segmentation_wbc x Paul15-style labels."""
    e = _expr()
    e.obs["label"] = ["Neutrophils", "Neutrophils", "Monocytes", "Basophils", "GMP", "GMP"]
    e.uns["data_notes"] = np.array(["mouse bone marrow", "no late genes"])
    e.write_h5ad(tmp_path / "expression.h5ad")
    r = _run(
        [
            "stage=pair",
            "pair=by_label_real",
            f"paths.root={tmp_path}",
            "experiment=real",
            f"paths.inputs.expression={tmp_path / 'expression.h5ad'}",
            "pair.crop_sources.0.max_per_class=2",
            "pair.crop_sources.1.max_per_class=2",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a = ad.read_h5ad(tmp_path / "real" / "pair" / "paired.h5ad")
    obs = a.obs
    img = obs[obs.has_image]
    # 5 bccd classes x 2 + 5 segmentation_wbc classes x 2 (cap per class per source)
    assert img.image_label.astype(str).value_counts().to_dict() == {
        "basophil": 4,
        "eosinophil": 4,
        "lymphocyte": 4,
        "monocyte": 4,
        "neutrophil": 4,
    }
    paired = obs[obs.has_image & obs.has_expression]
    assert set(paired.image_label) == {"neutrophil", "monocyte", "basophil"}
    assert len(paired) == 12
    assert set(obs[obs.has_image & ~obs.has_expression].image_label) == {"eosinophil", "lymphocyte"}
    assert set(obs[~obs.has_image].expression_label) <= {"GMP", "Neutrophils"}
    assert a.obsm["crops"].shape[1:] == (64, 64, 3)
    # the expression data's caveats go on to the reports (expression.notes)
    assert list(a.uns["expression_data_notes"]) == ["mouse bone marrow", "no late genes"]
    seg = obs.image_source == "segmentation_wbc"
    assert (a.obsm["crops"][seg.to_numpy()][~a.obsm["masks"][seg.to_numpy()]] == 0).all()


def test_coco_crops_reader(tmp_path):
    from pycocotools import mask as mask_utils

    img = np.full((40, 60, 3), 230, np.uint8)
    m1 = np.zeros((40, 60), np.uint8)
    m1[5:15, 5:15] = 1
    m2 = np.zeros((40, 60), np.uint8)
    m2[20:38, 30:50] = 1
    img[m1 > 0] = 60
    img[m2 > 0] = 90
    Image.fromarray(img).save(tmp_path / "a.png")

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m))
        return {"size": r["size"], "counts": r["counts"].decode()}

    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 60, "height": 40}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "segmentation": rle(m1),
                "cell_id": "s_c0",
                "kind": "band",
                "t": 0.7,
                "lobes": 1,
                "truncated": False,
            },
            {
                "id": 2,
                "image_id": 1,
                "segmentation": rle(m2),
                "cell_id": "s_c1",
                "kind": "lymphocyte",
                "t": None,
                "lobes": 1,
                "truncated": False,
            },
            {
                "id": 3,
                "image_id": 1,
                "segmentation": rle(m2),
                "cell_id": "s_c2",
                "kind": "band",
                "truncated": True,
            },
        ],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    cs = read_coco_crops(tmp_path, tmp_path / "annotations.json", 16, background=1)
    assert list(cs.obs.index) == ["s_c0", "s_c1"]  # truncated cell skipped
    assert list(cs.obs.truth_cell_id) == ["s_c0", "s_c1"]
    assert list(cs.obs.label) == ["band", "lymphocyte"]
    np.testing.assert_allclose(cs.obs.maturation, [0.7, np.nan])
    assert (cs.crops[0][4:12, 4:12] == 60).all() and (cs.crops[~cs.masks] == 1).all()
    assert (cs.crops[1][5:11, 5:11] == 90).all()


def test_pair_stage_on_simulator_output(tmp_path):
    """simulate -> expression in-process, then stage=pair (ground-truth crops) as a subprocess."""
    common = [f"paths.root={tmp_path}", "experiment=sim"]
    _run_in_process([*common, "data.simulator.n_images=3"], "simulate")
    _run_in_process([*common, "expression.umap=false", "expression.plots=false"], "expression")
    r = _run(["stage=pair", "pair=sim_truth", *common, "pair.crop_size=32"])
    assert r.returncode == 0, r.stderr[-3000:]
    truth = pd.read_csv(tmp_path / "sim" / "simulate" / "cells_truth.csv")
    a = ad.read_h5ad(tmp_path / "sim" / "pair" / "paired.h5ad")
    obs = a.obs
    both = (obs.has_image & obs.has_expression).to_numpy()
    n_whole = int((~truth["truncated"].astype(bool)).sum())
    assert a.n_obs == len(truth) and int(both.sum()) == n_whole
    assert (obs.image_ref[both] == obs.expression_ref[both]).all()  # the same cell
    assert set(obs.pair_mode[both]) == {"same_cell"}
    assert a.obsm["crops"].shape == (len(truth), 32, 32, 3)
    t = truth.set_index("cell_id").loc[obs.expression_ref.astype(str), "t"].to_numpy(float)
    np.testing.assert_allclose(obs.maturation.to_numpy(float), t, rtol=1e-5, equal_nan=True)
    kinds = truth.set_index("cell_id").loc[obs.expression_ref.astype(str), "kind"]
    assert list(obs.label.astype(str)) == list(kinds)


def _corrections(path: Path, text: str) -> tuple[str, pd.DataFrame]:
    path.write_text(text)
    return read_label_corrections(path)


def test_label_corrections_relabel_unlabel_confirm_and_skip(tmp_path):
    c = _crops()
    lm = {"neutrophil": "Neutrophils", "Monocyte": "monocytes"}
    key, tab = _corrections(
        tmp_path / "fix.csv",
        # extra columns (e.g. label_suspects.csv's) are ignored; a target spelling works
        "cell,image_ref,label,n_misled\n"
        "a,img0,,3\n"  # no class: an unlabelled image-only row
        "b,img1,Monocytes,2\n"  # spelled as the label_map target of monocyte
        "c,img2,MONOCYTE,1\n"  # the same class, any case: confirmed
        "d,gone,eosinophil,1\n",  # no such crop: skipped, reported
    )
    assert key == "image_ref" and len(tab) == 4
    fixed, rejects, counts = apply_label_corrections(c, key, tab, lm, "fix.csv")
    assert list(fixed.obs["label"]) == ["", "monocyte", "monocyte", "eosinophil", "band"]
    assert list(fixed.obs[LABEL_ORIGINAL]) == list(c.obs["label"])
    assert list(c.obs["label"])[:2] == ["neutrophil", "neutrophil"]  # the input is not changed
    assert counts == dict(
        lines=4, crops_relabelled=1, crops_unlabelled=1, crops_confirmed=1, not_found=1
    )
    assert [r["image"] for r in rejects] == ["gone"]
    assert rejects[0]["action"] == "correction_skipped" and "line 5" in rejects[0]["reason"]
    # the pairs follow the corrected labels; the paired table keeps the label before
    # (no neutrophil is left: stage=pair drops such label_map entries, as here)
    obs = make_pairs(fixed, _expr(), "by_label", label_map={"Monocyte": "monocytes"}).adata.obs
    img = obs[obs.has_image].set_index("image_ref")
    assert img.loc["img1", "label"] == "Monocytes" and img.loc["img1", "image_label"] == "monocyte"
    assert img.loc["img1", LABEL_ORIGINAL] == "neutrophil"
    assert img.loc["img0", "label"] == "" and not img.loc["img0", "has_expression"]
    assert set(obs.loc[~obs.has_image, LABEL_ORIGINAL]) <= {""}


def test_label_corrections_by_specimen_and_bad_tables(tmp_path):
    c = _crops()
    c.obs["specimen"] = ["s1", "s1", "s2", "", ""]
    key, tab = _corrections(tmp_path / "s.csv", "specimen,label\ns1,eosinophil\n")
    fixed, rejects, counts = apply_label_corrections(c, key, tab)
    assert list(fixed.obs["label"])[:3] == ["eosinophil", "eosinophil", "monocyte"]
    assert counts["crops_relabelled"] == 2 and not rejects
    bad = {
        "label,x\n,1\n": r"\[columns\].*image_ref",
        "image_ref,specimen,label\na,b,c\n": r"\[columns\]",
        "image_ref,lab\na,b\n": r"\[label\]",
        "image_ref,label\nimg0,band\n ,band\n": r"\[image_ref\] line 3: empty",
        "image_ref,label\nimg0,band\nimg1,band\nimg0,monocyte\n": r"img0.*lines \[2, 4\]",
        "": r"not a readable CSV",
    }
    for i, (text, msg) in enumerate(bad.items()):
        with pytest.raises(PairingError, match=msg) as e:
            _corrections(tmp_path / f"b{i}.csv", text)
        assert f"b{i}.csv" in str(e.value)  # the message names the file
    with pytest.raises(PairingError, match=r"file not found"):
        read_label_corrections(tmp_path / "none.csv")
    # a folder given for the file: was IsADirectoryError, exit 1
    with pytest.raises(PairingError, match=r"\[pair.label_corrections\] a folder, not a CSV"):
        read_label_corrections(tmp_path)
    key, tab = _corrections(tmp_path / "u.csv", "image_ref,label\nimg0,promyelocyte\n")
    with pytest.raises(PairingError, match=r"\[label\] line 2: label 'promyelocyte'.*'band'"):
        apply_label_corrections(c, key, tab, source=str(tmp_path / "u.csv"))
    # a target several classes map onto names no one class: the crop class is asked for
    key, tab = _corrections(tmp_path / "t.csv", "image_ref,label\nimg0,Neutrophils\n")
    lm = {"band": "Neutrophils", "neutrophil": "Neutrophils"}
    with pytest.raises(
        PairingError,
        match=r"line 2: label 'Neutrophils' is the pair.label_map "
        r"target of several crop classes \['band', 'neutrophil'\]",
    ):
        apply_label_corrections(c, key, tab, lm, source=str(tmp_path / "t.csv"))
    key, tab = _corrections(tmp_path / "m.csv", "image_ref,label\nimg4,neutrophil\n")
    fixed, _, _ = apply_label_corrections(c, key, tab, lm)  # band merged on purpose
    assert list(fixed.obs["label"]) == ["neutrophil"] * 2 + ["monocyte", "eosinophil", "neutrophil"]
