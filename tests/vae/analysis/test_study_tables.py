"""The traverse's tables of the real crops: by-class medians, path correlations, findings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vae.analysis.palette import label_order
from vae.analysis.study import _key_findings, morphology_by_class, path_position_correlations


def _real() -> pd.DataFrame:
    return pd.DataFrame(
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


def test_morphology_by_class_gives_medians_per_class_and_source_in_display_order():
    real = _real()
    out = morphology_by_class(real)
    assert list(out.columns) == ["label", "image_source", "n", "lobes", "cytoplasm_grain"]
    # classes in the figures' order (the lineage in maturation order, other white cells,
    # unlabelled last), each class's sources together
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


def test_morphology_by_class_keeps_rows_whose_keys_read_back_as_missing(tmp_path):
    # real_crop_features.csv read back: pandas turns "nan" / "NA" / "" into NaN; those
    # rows are a group of their own, not dropped (n sums to the crops)
    real = _real()
    real.loc[[1, 5], "image_source"] = ""
    real.loc[3, "label"] = "NA"
    real.to_csv(tmp_path / "r.csv", index=False)
    back = pd.read_csv(tmp_path / "r.csv")
    assert back["image_source"].isna().sum() == 2 and back["label"].isna().sum() == 1
    out = morphology_by_class(back)
    assert out["n"].sum() == len(real)
    assert out["label"].iloc[-1] == "(unknown)"  # an unknown class, after the known ones
    assert "(unknown)" in set(out["image_source"])
    # a category column orders as its values, not its category codes
    cat = real.assign(label=pd.Categorical(real["label"], categories=sorted(set(real["label"]))))
    assert list(morphology_by_class(cat)["label"]) == list(morphology_by_class(real)["label"])


def test_bracketed_missing_names_sort_last():
    assert label_order(["(unknown)", "(unlabelled)", "zz", "neutrophil"])[-2:] == [
        "(unknown)",
        "(unlabelled)",
    ]


def _path_crops(sources) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    n = len(sources)
    pos = rng.uniform(0, 1, n)
    offset = np.array([{"a": 0.0, "b": 3.0}.get(s, 0.0) for s in sources])
    real = pd.DataFrame(
        {
            "image_source": sources,
            "cytoplasm_grain": -pos + offset + rng.normal(0, 0.05, n),
            "lobes": np.ones(n),
        }
    )
    return real, pos


def test_path_correlations_within_sources_only_where_two_sources_hold_ten_crops():
    real, pos = _path_crops(["a"] * 30 + ["b"] * 12)
    out = path_position_correlations(real, ["cytoplasm_grain", "lobes"], pos)
    assert set(out) == {"gp_path_position", "gp_path_position_within_source"}
    assert out["gp_path_position_within_source"][0] < -0.9
    assert np.isnan(out["gp_path_position_within_source"][1])  # constant
    assert np.isnan(out["gp_path_position"][1])
    # one source with 10 crops (b has 9): no within-source column at all
    real1, pos1 = _path_crops(["a"] * 30 + ["b"] * 9)
    assert set(path_position_correlations(real1, ["cytoplasm_grain"], pos1)) == {"gp_path_position"}
    # crops of no known source ("(unknown)" in real_crop_features.csv) are in no source:
    # 12 of them beside a's 30 do not make a second source
    real_u, pos_u = _path_crops(["a"] * 30 + ["(unknown)"] * 12)
    assert set(path_position_correlations(real_u, ["cytoplasm_grain"], pos_u)) == {
        "gp_path_position"
    }
    # no source column: the pooled correlation only
    assert set(path_position_correlations(real.drop(columns="image_source"), ["lobes"], pos)) == {
        "gp_path_position"
    }


def test_key_findings_say_the_within_source_correlation_with_the_path():
    df = pd.DataFrame(
        {
            "feature": ["granule_density", "cytoplasm_grain"],
            "z0": [0.1, -0.5],
            "z1": [0.2, 0.4],
            "gp_path_position": [-0.2, -0.55],
            "gp_path_position_within_source": [np.nan, -0.40],
        }
    )
    lines = _key_findings({"real_feature_correlation": df}, {}, [], 3)
    grain = next(x for x in lines if "cytoplasm_grain" in x)
    assert "with GP path position rho -0.55 (within image sources -0.40)" in grain
    dens = next(x for x in lines if "granule_density" in x)
    assert "rho -0.20." in dens and "within" not in dens
