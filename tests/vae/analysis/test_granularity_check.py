"""scripts/granularity_check.py: which feature ranks granular classes first, per source."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tests.helpers.run import load_script
from tests.vae.analysis.test_granules import _od_cell


def _table(n_per_class: int = 6) -> ad.AnnData:
    """Eosinophils with packed faint granules over the cytoplasm, smooth lymphocytes, two
    sources; each crop paired with two expression rows (the by-label pairing)."""
    rng = np.random.default_rng(0)
    crops, masks, labels, sources = [], [], [], []
    for src in ("a", "b"):
        for lab in ("eosinophil", "lymphocyte"):
            for _ in range(n_per_class):
                if lab == "eosinophil":
                    k = int(rng.integers(80, 140))
                    ang, rad = rng.uniform(0, 2 * np.pi, k), rng.uniform(15, 25, k)
                    dots = [(32 + r * np.sin(a), 32 + r * np.cos(a)) for a, r in zip(ang, rad)]
                else:
                    dots = []
                img, cell = _od_cell(dots)
                crops.append(np.rint(img * 255).astype(np.uint8))
                masks.append(cell)
                labels.append(lab)
                sources.append(src)
    n = len(crops)
    rep = np.repeat(np.arange(n), 2)
    obs = pd.DataFrame(
        {
            "has_image": True,
            "image_label": np.asarray(labels)[rep],
            "image_source": np.asarray(sources)[rep],
            "image_ref": [f"crop{i}" for i in rep],
        },
        index=[f"r{i}" for i in range(2 * n)],
    )
    a = ad.AnnData(np.zeros((2 * n, 1), np.float32), obs=obs)
    a.obsm["crops"] = np.stack(crops)[rep]
    a.obsm["masks"] = np.stack(masks)[rep]
    return a


def test_granular_classes_are_ranked_by_the_grain_per_source(tmp_path, capsys):
    mod = load_script("granularity_check")
    path = tmp_path / "t.h5ad"
    _table().write_h5ad(path)
    res = mod.main([str(path), "--granular", "eosinophil", "--out", str(tmp_path / "g.json")])
    assert res["n_crops"] == 24  # each crop once, not once per expression row
    assert set(res["sources"]) == {mod.POOLED, "a", "b"}
    for r in res["sources"].values():
        assert r["auc"]["cytoplasm_grain"] == 1.0  # packed granules read as grain
        assert (
            r["means"]["cytoplasm_grain"]["eosinophil"]
            > r["means"]["cytoplasm_grain"]["lymphocyte"]
        )
    assert res["sources"]["a"]["n"] == {"eosinophil": 6, "lymphocyte": 6}
    assert (
        json.loads((tmp_path / "g.json").read_text())["sources"]["b"]["auc"]
        == (res["sources"]["b"]["auc"])
    )
    out = capsys.readouterr().out
    assert any(
        line.startswith("a ") and line.rstrip().endswith("1.000") for line in out.splitlines()
    )


def test_a_table_without_the_class_column_is_one_clear_refusal(tmp_path):
    mod = load_script("granularity_check")
    path = tmp_path / "t.h5ad"
    _table(1).write_h5ad(path)
    with pytest.raises(SystemExit, match=r"obs\['celltype'\] is missing"):
        mod.main([str(path), "--label-key", "celltype"])
    with pytest.raises(SystemExit, match="no such file"):
        mod.main([str(tmp_path / "none.h5ad")])
    # one class only: no AUC (NaN), not a crash
    assert np.isnan(mod.auc(np.array([1.0, 2.0]), np.array([True, True]))[0])


def test_undefined_scores_are_left_out_not_ranked_as_smooth():
    mod = load_script("granularity_check")
    # a NaN (a cytoplasm too small to read) among the non-granular cells: counting it as
    # 0 would rank it below every granular cell and flatter the feature
    scores = np.array([np.nan, 0.5, 0.1, 0.6, 0.4])
    positive = np.array([False, False, False, True, True])
    a, left = mod.auc(scores, positive)
    assert left == 1 and a == pytest.approx(0.75)  # 3 of the 4 pairs ordered right
    # the NaN read as 0 instead (the first version): 5 of 6 pairs, a flattered score
    assert mod.auc(np.nan_to_num(scores), positive)[0] == pytest.approx(5 / 6)


def test_unknown_labels_unnamed_crops_and_channel_first_float_crops(tmp_path):
    mod = load_script("granularity_check")
    t = _table(2)
    n = t.n_obs
    lab = t.obs["image_label"].astype(str).to_numpy().copy()
    lab[:2] = "NA"  # the project's unknown label (vae.inputs.schema.UNKNOWN_LABEL)
    t.obs["image_label"] = lab
    ref = t.obs["image_ref"].astype(str).to_numpy().copy()
    ref[4:8] = ""  # crops without a name: each its own crop, not one
    t.obs["image_ref"] = ref
    t.obsm["crops"] = t.obsm["crops"].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    soft = t.obsm["masks"][:, None].astype(np.float32) * 0.9
    soft[:, :, :, :8] *= 0.5  # a left band of probability <= 0.5: not cell
    t.obsm["masks"] = soft
    crops, masks, labels, sources = mod.labelled_crops(t, "image_label", "image_source")
    # 16 crops, each on two rows: rows 0-1 unknown (crop 0 out), rows 4-7 unnamed (crops 2
    # and 3 counted on both their rows)
    assert len(crops) == n // 2 - 1 + 2
    assert "NA" not in set(labels)
    assert crops.shape[1:] == (64, 64, 3) and crops.dtype == np.uint8
    assert masks.dtype == bool and masks.any() and not masks[:, :, :8].any()
    t.obs = t.obs.drop(columns="image_source")
    assert set(mod.labelled_crops(t, "image_label", "image_source")[3]) == {mod.POOLED}
    # no source column: the pooled entry only, not the same numbers twice
    assert list(mod.check(t, ["eosinophil"], "image_label", "image_source")["sources"]) == [
        mod.POOLED
    ]
