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
    assert set(res["sources"]) == {"all", "a", "b"}
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
    assert "cytoplasm_grain" in capsys.readouterr().out


def test_a_table_without_the_class_column_is_one_clear_refusal(tmp_path):
    mod = load_script("granularity_check")
    path = tmp_path / "t.h5ad"
    _table(1).write_h5ad(path)
    with pytest.raises(SystemExit, match=r"obs\['celltype'\] is missing"):
        mod.main([str(path), "--label-key", "celltype"])
    with pytest.raises(SystemExit, match="no such file"):
        mod.main([str(tmp_path / "none.h5ad")])
    # one class only: no AUC (NaN), not a crash; a NaN score counts as 0
    assert np.isnan(mod.auc(np.array([1.0, 2.0]), np.array([True, True])))
    assert mod.auc(np.array([np.nan, 2.0]), np.array([False, True])) == 1.0


def test_morphology_by_class_gives_medians_per_class_and_source_in_display_order():
    from vae.analysis.study import morphology_by_class

    real = pd.DataFrame(
        {
            "cell": [f"c{i}" for i in range(7)],
            "label": [
                "lymphocyte",
                "neutrophil",
                "neutrophil",
                "(unlabelled)",
                "myelocyte",
                "neutrophil",
                "lymphocyte",
            ],
            "image_source": ["a", "a", "a", "a", "a", "b", "b"],
            "lobes": [1, 3, 2, 1, 1, 4, 1],
            "cytoplasm_grain": [0.1, 0.2, 0.4, 0.3, 0.5, 0.6, 0.2],
        }
    )
    out = morphology_by_class(real)
    assert list(out.columns) == ["label", "image_source", "n", "lobes", "cytoplasm_grain"]
    # classes in the figures' order (vae.analysis.palette.label_order: the lineage in
    # maturation order, other white cells, unlabelled last), each class's sources together
    from vae.analysis.palette import label_order

    assert list(dict.fromkeys(out["label"])) == label_order(real["label"])
    assert out["label"].iloc[0] == "myelocyte" and out["label"].iloc[-1] == "(unlabelled)"
    assert list(out.loc[out["label"] == "neutrophil", "image_source"]) == ["a", "b"]
    neu_a = out[(out["label"] == "neutrophil") & (out["image_source"] == "a")].iloc[0]
    assert neu_a["n"] == 2 and neu_a["lobes"] == 2.5
    assert neu_a["cytoplasm_grain"] == pytest.approx(0.3)
    # without a source column: one row per class
    one = morphology_by_class(real.drop(columns="image_source"))
    assert list(one["label"]) == label_order(real["label"])
    assert one.set_index("label").loc["neutrophil", "n"] == 3
