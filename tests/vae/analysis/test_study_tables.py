"""The traverse's tables of the real crops: by-class medians, path correlations, findings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vae.analysis.palette import label_order
from vae.analysis.study import (
    _data_limits,
    _key_findings,
    _path_peak,
    _step_variation,
    blind_sources,
    crop_findings,
    morphology_by_class,
    path_position_correlations,
)


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


def _crops(n_per: int = 24, seed: int = 0) -> pd.DataFrame:
    """Held-out crops of three classes over two sources: the counter blind on source b,
    the path position following the class, within neutrophils lobes tied to nothing."""
    rng = np.random.default_rng(seed)
    lab = np.repeat(["lymphocyte", "Neutrophils", "eosinophil"], n_per).astype(object)
    lab[:3] = "(unlabelled)"
    src = np.tile(["a", "b"], len(lab) // 2)
    pos = np.select([lab == "lymphocyte", lab == "eosinophil"], [0.1, 0.3], 0.95)
    dens = np.where(src == "b", 0.0, rng.uniform(0, 1, len(lab)))
    return pd.DataFrame(
        {
            "label": lab,
            "image_source": src,
            "granule_density": dens,
            "lobes": rng.integers(1, 5, len(lab)).astype(float),
            "program:primary": rng.normal(5, 1, len(lab)),
            "gp_path_position": pos + rng.normal(0, 0.01, len(lab)),
        }
    )


def test_blind_sources_name_a_source_where_a_feature_reads_one_value():
    real = _crops()
    assert blind_sources(real, "granule_density") == [("b", 0.0, 1.0)]
    assert blind_sources(real, "lobes") == []
    few = real[real.image_source == "a"].head(5).assign(image_source="c", granule_density=0.0)
    assert blind_sources(pd.concat([real, few]), "granule_density") == [("b", 0.0, 1.0)]


def test_crop_findings_say_no_forming_stage_has_images_and_what_the_path_compares():
    """Review (2026-12-06): the real report led with a granule counter blind on two
    sources, correlated the model with itself, and never said that no crop is of a stage
    in which granules form, nor that the crops' path position is their class."""
    real = _crops()
    feats = ["granule_density", "lobes"]
    lines = crop_findings(
        real, ["lymphocyte", "Neutrophils", "eosinophil", "band", "(unlabelled)"], feats, "by_label"
    )
    assert len(lines) == 2
    assert lines[0].startswith(
        "No crop of this study is labelled promyelocyte, myelocyte or metamyelocyte (the "
        "immature granulocytes, in which the granules form): granule formation has no "
        "labelled image here"
    )
    assert (
        "median: lymphocyte 0.10 (n=21), eosinophil 0.30 (n=24), Neutrophils 0.95 (n=24)"
        in (lines[0])
    )
    assert "(unlabelled)" not in lines[0]
    assert lines[1].startswith(
        "Within the 24 held-out Neutrophils cells (the commonest class, each specimen once), "
        "the strongest of 2 ties of a measured image feature with a decoded program is"
    )
    assert "with the programs shuffled the strongest reaches" in lines[1]
    assert "no more than chance" in lines[1]  # random lobes vs a random program
    assert "images met profiles by label, never a cell its own profile" in lines[1]
    # crops of an immature stage (or PBC's "IG"): no such line; true pairs: no pairing note
    for staged in (["myelocyte", "Neutrophils"], ["IG", "SNE"]):
        (line,) = crop_findings(real, staged, feats, None)
        assert line.startswith("Within") and "never a cell" not in line
    # nothing labelled at all: nothing can be said of the labels
    assert all(not x.startswith("No crop") for x in crop_findings(real, ["(unlabelled)"], feats))


def test_crop_findings_count_a_specimen_once_and_need_ten_values_a_pair():
    """Review: 46 of the real chain's 78 held-out neutrophils were BCCD cells entering
    twice (bccd and bccd_cropped), and a pair resting on 3 values printed rho +1.00."""
    real = _crops(n_per=48)
    neu = real.index[real.label == "Neutrophils"]
    real["specimen"] = [f"s{i}" for i in range(len(real))]
    real.loc[neu[24:], "specimen"] = [f"s{i}" for i in neu[:24]]  # each twice
    real["program:two"] = np.nan
    real.loc[neu[:3], "program:two"] = [1.0, 2.0, 3.0]
    real.loc[neu[:3], "lobes"] = [1.0, 2.0, 3.0]  # rho +1 on 3 values: not a tie
    (line,) = crop_findings(real, ["myelocyte"], ["lobes"])
    assert line.startswith("Within the 24 held-out Neutrophils cells")
    assert "the strongest of 1 ties" in line and "program:two" not in line
    real.loc[neu[24:], "specimen"] = ""  # an unknown specimen is never a twin
    (line,) = crop_findings(real, ["myelocyte"], ["lobes"])
    assert line.startswith("Within the 48 held-out Neutrophils cells")


def test_key_findings_put_the_crop_findings_first_and_name_blind_sources():
    df = pd.DataFrame(
        {
            "feature": ["granule_density", "program:primary"],
            "z0": [0.1, 0.8],
            "gp_path_position": [-0.2, 0.89],
        }
    )
    lines = _key_findings(
        {"real_feature_correlation": df},
        {},
        [],
        3,
        crop_lines=["First."],
        blind={"granule_density": [("bccd", 0.0, 1.0), ("bccd_cropped", 0.0, 0.95)]},
    )
    assert lines[0] == "First."
    dens = next(x for x in lines if "granule_density" in x)
    assert "it reads 0 on 100% of the bccd and 95% of the bccd_cropped crops" in dens
    prog = next(x for x in lines if "program:primary" in x)
    assert "both read from the model's code" in prog


def test_a_feature_that_rises_and_falls_along_the_path_is_said_to_peak():
    """Review: the demo quoted granule density vs path position as rho -0.07, a rank
    statistic for a feature that peaks at the promyelocyte (3.75 at 0.36, 0 at both ends)."""
    s = np.linspace(0, 1, 12)
    feats = pd.DataFrame(
        {"s": s, "granule_density": np.r_[0, 1, 2, 3, 3.75, 2, 1, 0.5, 0, 0, 0, 0], "lobes": s}
    )
    peak = _path_peak(feats, "granule_density", -0.07)
    assert peak.endswith(
        "peaks at position 0.36 (3.75 against 0 and 0 at the ends): a rank correlation "
        "reads no trend in a rise and fall"
    )
    # a real trend with a bump (review: the real chain's erythroid program, rho -0.79)
    assert "reads no trend" not in _path_peak(feats, "granule_density", -0.79)
    wobble = feats.assign(
        granule_density=np.r_[2.8, 2.9, 2.97, 2.7, 2.6, 2.5, 2.5].tolist() + [2.5] * 5
    )
    assert _path_peak(wobble, "granule_density", -0.79) == ""  # 0.32 of its range: a wobble
    tiny = feats.assign(granule_density=feats["granule_density"] + 1e-17)
    assert "against 0 and 0 at the ends" in _path_peak(tiny, "granule_density")
    assert _path_peak(feats, "lobes") == ""  # monotone: the rank correlation says it
    flat_end = feats.assign(
        granule_density=np.r_[0, 1, 2, 3, 3.75, 3.7, 3.7, 3.7, 3.7, 3.7, 3.7, 3.6]
    )
    assert _path_peak(flat_end, "granule_density") == ""  # barely above the end
    df = pd.DataFrame({"feature": ["granule_density"], "z0": [0.3], "gp_path_position": [-0.07]})
    lines = _key_findings({"real_feature_correlation": df, "path_features_gp": feats}, {}, [], 3)
    assert "rho -0.07; on the cells decoded along the GP path it peaks at position 0.36" in lines[0]


def test_truth_recovery_keeps_the_total_granule_density_with_why_it_is_low():
    truth = {
        "decoded_granule_density_vs_true_spearman": -0.44,
        "decoded_granule_density_vs_true_azurophilic_spearman": 0.90,
    }
    lines = _key_findings({}, truth, [], 3)
    total = next(x for x in lines if "vs true spearman" in x)
    assert "= -0.440 (the total adds the fine specific granules" in total
    assert any("azurophilic spearman = 0.900" in x for x in lines)


def test_step_variation_reads_uint8_and_float_strips_alike():
    """The path caption compares how much the drawn cells and the nearest crops vary
    across the steps (drawn as uint8 or 0..1 floats)."""
    flat = np.full((12, 8, 8, 3), 0.5)
    assert _step_variation(flat) == 0.0
    ramp = np.linspace(0, 1, 12)[:, None, None, None] * np.ones((12, 8, 8, 3))
    as_u8 = (ramp * 255).round().astype(np.uint8)
    assert _step_variation(ramp) == pytest.approx(ramp[:, 0, 0, 0].std())
    assert _step_variation(as_u8) == pytest.approx(_step_variation(ramp), abs=1e-3)
    assert _step_variation(ramp[:1]) == 0.0


def test_the_data_limits_say_when_the_data_are_simulated():
    """A reader audit found nothing on the demo's report saying its data are simulated."""
    from types import SimpleNamespace

    sim = pd.DataFrame({"t": [0.1], "kind": ["band"], "azurophilic_density": [0.2]})
    (line,) = _data_limits(SimpleNamespace(obs=sim), [])
    assert line.startswith("These data are simulated (the built-in simulator")
    assert _data_limits(SimpleNamespace(obs=sim.drop(columns="azurophilic_density")), []) == []


def test_the_data_limits_say_when_pairs_were_ranked_within_their_label():
    """pair.within_label=maturation puts an order into the pairs: the report says it is
    the pairing's assumption, not the plain by-label sentence."""
    from types import SimpleNamespace

    obs = pd.DataFrame(
        {
            "pair_mode": ["by_label", "by_label", "unpaired"],
            "nucleus_segmentation": [1.2, 3.1, np.nan],
        }
    )
    (line,) = _data_limits(SimpleNamespace(obs=obs), [])
    assert "within each label, by rank (pair.within_label=maturation)" in line
    assert "the order the pairing put in" in line
    plain = obs.assign(nucleus_segmentation=np.nan)
    (line,) = _data_limits(SimpleNamespace(obs=plain), [])
    assert line.startswith("Images and expression profiles were paired by label, not measured")
    (line,) = _data_limits(SimpleNamespace(obs=obs.drop(columns="nucleus_segmentation")), [])
    assert "by rank" not in line


def test_umap_caption_follows_the_panels_evaluate_drew(tmp_path):
    """Without maturation values stage=evaluate draws no maturation panel
    (``umap_labels_panels``); the report's caption then says so instead of describing the
    simulator's t or a pseudotime panel that is not there. With the panel (the demo), the
    caption is the full one."""
    import json

    from vae.analysis.study import _eval_sections

    ev = tmp_path / "metrics.json"
    (tmp_path / "umap_labels.png").write_bytes(b"")

    def caption(panels):
        ev.write_text(json.dumps({"n_rows": 3, "split": "test", "umap_labels_panels": panels}))
        figs = [f for s in _eval_sections(ev) for f in s.figures]
        return next(f.caption for f in figs if f.path.name == "umap_labels.png")

    without = caption(["label", "split", "modality"])
    assert "coloured by label, split, modality" in without
    assert "No maturation panel: these data hold no maturation value" in without
    assert "simulator's true t" not in without
    assert "simulator's true t in the demo" in caption(["label", "split", "maturation", "modality"])
