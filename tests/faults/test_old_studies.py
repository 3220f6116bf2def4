"""What an old-studies audit found (2026-12-05): studies written by older versions of the
code (a ``latent.h5ad`` of 2026-11-21 without the atypical-cell scores, segment and train
runs recorded before settings that exist now) were read by the current code without a
word of what it could not do like them.

- Atypical-cell flagging was silently off for a study whose ``latent.h5ad`` predates the
  anomaly columns: 0 of 559 cells atypical while samples.html described the 99 % rule.
  The study now computes its reference's scores from the paired data it was trained on
  (checked to be that data); where it cannot, a warning, samples.html and summary.json
  say "atypical flagging off: <why>".
- Embedding smears with an old study compared only ``segmentation.trim_rim`` with the
  study's own segment run: filters it never applied kept 15 cells where its run kept 18.
  Every setting that changes which cells are kept or how they are cut is compared now,
  with the overrides that cut them alike.
- ``resume=true`` on an old training run could never succeed: settings added since were
  refused even at the values that reproduce the old run, and ``vae.dropout`` 0.1 against
  the new ``null`` (auto, 0.1 here) was a change. Each added setting now has the value
  that reproduces the old behaviour, auto settings compare by their resolved value, and
  the refusal names the overrides to pass.

The "old" artefacts are a fresh toy study's, edited as the old code wrote them (columns
and config keys dropped, old values set).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from tests.helpers.run import compose_config, run_pipeline, run_stage_in_process
from tests.helpers.vae_toy import TINY_TRAIN, train_toy_study

# the toy study is trained as a run of 2026-11-30 was: without the heads added since
OLD_HEADS = ["vae.lobe_head=false", "vae.maturation_weight=0"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """<tmp>/paired.h5ad and a trained toy study in <tmp>/out/s."""
    return train_toy_study(tmp_path_factory.mktemp("old_studies"), *OLD_HEADS)


def _old_copy(study: Path, name: str) -> Path:
    """A copy of the study whose latent.h5ad has no anomaly column (written before
    2026-11-30)."""
    from vae.inputs.schema import ANOMALY_COLUMNS

    dst = study / "out" / name
    shutil.copytree(study / "out" / "s", dst)
    lp = dst / "train" / "latent.h5ad"
    lat = ad.read_h5ad(lp)
    lat.obs = lat.obs.drop(columns=[c for c in ANOMALY_COLUMNS.values() if c in lat.obs])
    lat.write_h5ad(lp)
    return dst


def _embed(study: Path, exp: str, old: Path) -> Path:
    return run_stage_in_process(
        [
            f"paths.root={study / 'out'}",
            f"experiment={exp}",
            f"embed.study={old}",
            f"embed.h5ad={study / 'paired.h5ad'}",
            "hardware.torch_threads=1",
        ],
        "embed",
    )


def test_an_old_latent_gets_its_held_out_scores_from_its_paired_data(study: Path):
    """The old latent's thresholds and calls are those of the same study with the
    columns: the scores are what stage=train writes, recomputed from the training data."""
    from vae.api import Study

    new = Study.load(study / "out" / "s")
    old = Study.load(_old_copy(study, "old_scored"))
    assert old.atypical_off is None
    t_new, t_old = new.atypical_thresholds(), old.atypical_thresholds()
    assert all(np.isfinite(list(t_old.values())))
    for k in t_new:
        assert t_old[k] == pytest.approx(t_new[k], rel=1e-4, abs=1e-4)
    paired = ad.read_h5ad(study / "paired.h5ad")
    q_new, q_old = new.embed(paired.copy()), old.embed(paired.copy())
    assert np.allclose(
        q_old.obs["anomaly_score"].to_numpy(float),
        q_new.obs["anomaly_score"].to_numpy(float),
        atol=1e-4,
    )
    assert (q_old.obs["vae_atypical"] == q_new.obs["vae_atypical"]).all()
    d = _embed(study, "e_scored", study / "out" / "old_scored")
    unc = json.loads((d / "summary.json").read_text())["unclassified"]
    assert unc["atypical_flagging"] == "on"
    assert all(v is not None for v in unc["atypical_thresholds"].values())


def test_an_old_latent_that_cannot_be_scored_says_flagging_is_off(study: Path, monkeypatch, caplog):
    """Where the scores cannot be had (here: the paired data over the in-memory limit),
    the log, samples.html and summary.json say that no cell can be flagged atypical,
    instead of the 99 % sentence and a silent 0."""
    import vae.api

    old = _old_copy(study, "old_off")
    monkeypatch.setattr(vae.api, "RESCORE_MAX_GIB", 0.0)
    with caplog.at_level(logging.WARNING):
        d = _embed(study, "e_off", old)
    warned = [r.getMessage() for r in caplog.records if "atypical flagging off" in r.getMessage()]
    assert len(warned) == 1
    assert str(old / "train" / "latent.h5ad") in warned[0]
    assert "stage=train overwrite=true" in warned[0]
    unc = json.loads((d / "summary.json").read_text())["unclassified"]
    assert unc["atypical_flagging"].startswith("off: the study's latent")
    assert "predates the atypical-cell scores" in unc["atypical_flagging"]
    assert unc["atypical"] == 0
    page = (d / "samples.html").read_text()
    assert "Atypical flagging off" in page
    assert "less like the study's cells than" not in page


def _segment_manifest(root: Path, seg: dict, data: dict | None = None) -> SimpleNamespace:
    """A study folder whose stage=segment recorded ``seg`` (and ``data``); the Study's
    fields read."""
    (root / "segment").mkdir(parents=True)
    (root / "train").mkdir()
    man = {"stage": "segment", "config": {"segmentation": seg, "data": data or {}}, "inputs": {}}
    (root / "segment" / "manifest.json").write_text(json.dumps(man))
    return SimpleNamespace(model_path=root / "train" / "model.pt", segmentation_model=None)


def test_smears_cut_unlike_an_old_studys_segment_run_are_named_with_the_overrides(
    tmp_path: Path, caplog
):
    """Every cut setting is compared with the study's segment run: a changed value and a
    filter the old run did not have are each named, with the override that cuts alike;
    with those overrides nothing is said."""
    from pipeline.stages.embed import _warn_cut_unlike_study

    cfg = compose_config(["stage=embed", "experiment=x", "embed.h5ad=x.h5ad"])
    seg = OmegaConf.to_container(cfg.segmentation, resolve=True)
    # an old study: no rim trim nor the 2026-11-30 filters, a border margin of 1
    for k in ("trim_rim", "drop_tile_cut", "touch_px", "min_solidity", "max_area_ratio"):
        seg.pop(k)
    seg.pop("min_cells_area_ratio")
    seg["border_margin"] = 1
    study = _segment_manifest(tmp_path / "old", seg)
    with caplog.at_level(logging.WARNING):
        _warn_cut_unlike_study(cfg, study)
    msgs = [r.getMessage() for r in caplog.records if "segmented unlike" in r.getMessage()]
    assert len(msgs) == 1
    msg = msgs[0]
    assert f"border_margin: study 1, this run {cfg.segmentation.border_margin}" in msg
    for k in ("trim_rim", "drop_tile_cut", "touch_px", "min_solidity", "max_area_ratio"):
        assert f"{k}: not in the study (predates it" in msg
    assert "min_cells_area_ratio" not in msg  # read only with max_area_ratio: said there
    fixes = msg.split("To cut them alike, add ")[1].split()
    assert fixes == [
        "segmentation.trim_rim=0.0",
        "segmentation.border_margin=1",
        "segmentation.drop_tile_cut=false",
        "segmentation.touch_px=null",
        "segmentation.min_solidity=null",
        "segmentation.max_area_ratio=null",
    ]
    caplog.clear()
    alike = compose_config(["stage=embed", "experiment=x", "embed.h5ad=x.h5ad", *fixes])
    with caplog.at_level(logging.WARNING):
        _warn_cut_unlike_study(alike, study)
    assert not [r for r in caplog.records if "segmented unlike" in r.getMessage()]
    # a setting the old run lacks and no value is known for is named without one
    seg2 = OmegaConf.to_container(alike.segmentation, resolve=True)
    seg2.pop("mask_threshold")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _warn_cut_unlike_study(alike, _segment_manifest(tmp_path / "old2", seg2))
    (msg,) = [r.getMessage() for r in caplog.records if "segmented unlike" in r.getMessage()]
    assert "mask_threshold: not in the study (predates it): this run" in msg


def test_a_study_that_read_its_smears_at_fixed_source_scales_is_compared_with_those(
    tmp_path: Path, caplog
):
    """A +preset=real study read its smears through data.segment_sources at fixed scales
    per microscope, not at segmentation.input_scale: an audit's embed at the estimated
    scale was not warned, and one at a study source's own scale was told to add
    segmentation.input_scale=0.6 segmentation.estimate_scale=true (the nominal config, the
    reverse of how the study cut its cells). Now the source scales are the reference."""
    from pipeline.stages.embed import _warn_cut_unlike_study

    base = ["stage=embed", "experiment=x", "embed.h5ad=x.h5ad"]
    cfg = compose_config(base)  # the embed default: the scale measured per image
    seg = OmegaConf.to_container(cfg.segmentation, resolve=True)
    seg["estimate_scale"], seg["input_scale"] = True, 0.6
    data = {
        "segment_sources": [
            {"name": "bccd", "kind": "smears", "scale": 0.21, "scale_by_width": {}},
            {"name": "txl", "kind": "smears", "scale": 0.2, "scale_by_width": {"575": 0.15}},
            {"name": "crops", "kind": "crop_folder", "scale": None},
        ]
    }
    study = _segment_manifest(tmp_path / "real", seg, data)

    def said(c) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _warn_cut_unlike_study(c, study)
        return [r.getMessage() for r in caplog.records if "segmented unlike" in r.getMessage()]

    (msg,) = said(compose_config([*base, "segmentation.estimate_scale=true"]))
    assert "fixed scales per source (bccd 0.21; txl 0.2 (by image width 575 px: 0.15))" in msg
    assert "this run measures each image's" in msg
    assert "segmentation.estimate_scale=false segmentation.input_scale=<the scale" in msg
    assert "input_scale=0.6" not in msg
    # at one of the study's own scales nothing is said; at another scale it is
    fixed = [*base, "segmentation.estimate_scale=false"]
    assert said(compose_config([*fixed, "segmentation.input_scale=0.15"])) == []
    assert said(compose_config([*fixed, "segmentation.input_scale=0.21"])) == []
    (msg,) = said(compose_config([*fixed, "segmentation.input_scale=0.5"]))
    assert "input_scale: the study read its smears at fixed scales per source" in msg
    assert "this run 0.5" in msg
    # a source measured per image: the segmentation.* settings are the reference again;
    # also with scale_by_width alone, which fixes only the widths it lists (review)
    data["segment_sources"][1]["scale"] = None
    study = _segment_manifest(tmp_path / "by_width", seg, data)
    (msg,) = said(compose_config([*fixed, "segmentation.input_scale=0.15"]))
    assert "estimate_scale: study True, this run False" in msg
    assert "fixed scales per source" not in msg
    data["segment_sources"][1]["scale"] = 0.2
    data["segment_sources"][0]["scale"] = None
    study = _segment_manifest(tmp_path / "mixed", seg, data)
    (msg,) = said(compose_config([*fixed, "segmentation.input_scale=0.15"]))
    assert "estimate_scale: study True, this run False" in msg


def test_an_old_training_run_resumes_with_the_overrides_its_refusal_names(study: Path):
    """A run recorded before settings that exist now (their keys dropped from its
    manifest) and with vae.dropout=0.1 (now null: auto, 0.1 with images): refused
    naming exactly the overrides for the heads it did not have, resumed with them."""
    shutil.copytree(study / "out" / "s", study / "out" / "r")
    mp = study / "out" / "r" / "train" / "manifest.json"
    man = json.loads(mp.read_text())
    vae = man["config"]["vae"]
    for k in (
        "lobe_head",
        "maturation_weight",
        "maturation_classes",
        "texture_weight",
        "align_centroid_weight",
        "image_encoder",
        "view_contrast_weight",
        "view_temperature",
        "expression_norm",
        "expression_input",
    ):
        vae.pop(k)
    vae["dropout"] = 0.1
    man["config"]["trainer"].pop("split_by")
    mp.write_text(json.dumps(man))
    args = [
        "stage=train",
        f"paths.root={study / 'out'}",
        "experiment=r",
        f"paths.inputs.paired={study / 'paired.h5ad'}",
        "resume=true",
        *TINY_TRAIN,
        "trainer.max_epochs=3",
    ]
    p = run_pipeline(args)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()[-1]
    assert "To continue it, pass vae.lobe_head=false vae.maturation_weight=0.0;" in err
    for quiet in ("dropout", "texture_weight", "expression_norm", "split_by", "image_encoder"):
        assert quiet not in err  # at the old behaviour already, or resolved alike
    p = run_pipeline([*args, "vae.lobe_head=false", "vae.maturation_weight=0.0"])
    assert p.returncode == 0, p.stderr[-3000:]
    log = (study / "out" / "r" / "train" / "train.log").read_text()
    assert "resumed from" in log


def test_auto_settings_compare_by_their_resolved_value():
    """vae.dropout null is 0.1 with images and 0 for expression alone: traverse names a
    model's 0.1 only where this run's null would not give it."""
    from pipeline.guards import data_layout, resolved_setting

    paired = data_layout(
        pd.DataFrame({"has_image": [True, False], "has_expression": [True, True]}), 5, True
    )
    alone = data_layout(
        pd.DataFrame({"has_image": [False, False], "has_expression": [True, True]}), 5, True
    )
    assert resolved_setting("vae.dropout", None, paired) == 0.1
    assert resolved_setting("vae.dropout", None, alone) == 0.0
    assert resolved_setting("vae.expression_norm", "auto", paired) == "layer"
    assert resolved_setting("vae.expression_input", "auto", alone) == "counts"
    assert resolved_setting("trainer.split_by", "specimen", paired) is None  # no such column
    assert resolved_setting("vae.dropout", None, None) is None  # nothing to resolve on


def test_data_layout_closes_the_paired_file_when_reading_it_fails(tmp_path: Path, monkeypatch):
    """_data_layout (the resume check's view of paired.h5ad) gives None on a file it cannot
    read and closes it: the handle was left open when blank_as_read raised."""
    from pipeline.guards import _data_layout
    from tests.helpers.h5ad_handles import opens_and_fails

    p = tmp_path / "paired.h5ad"
    ad.AnnData(obs=pd.DataFrame({"has_image": [True]}, index=["a"])).write_h5ad(p)
    opened = opens_and_fails(monkeypatch, "segmentation.io.blank_as_read")
    assert _data_layout({"paired": p}) is None
    assert len(opened) == 1 and not opened[0].file.is_open


def test_traverse_does_not_warn_of_maturation_classes_that_order_the_same_axis(tmp_path: Path):
    """A model trained with vae.maturation_classes=[promyelocyte,...] on labels spelled
    Promyelocytes...: a traverse run that does not repeat the list (its default, the six
    stages) orders the same axis on these labels, so it is no difference to warn of; a
    list that orders another axis still is."""
    from pipeline.guards import data_layout
    from pipeline.stages.traverse import model_settings

    (tmp_path / "train").mkdir()
    trained = ["promyelocyte", "myelocyte", "band", "segmented_neutrophil"]
    man = {"stage": "train", "config": {"vae": {"maturation_classes": trained}}}
    (tmp_path / "train" / "manifest.json").write_text(json.dumps(man))
    six = ["myeloblast", "promyelocyte", "myelocyte", "metamyelocyte", "band"]
    mine = {"vae": {"maturation_classes": [*six, "segmented_neutrophil"]}}
    labels = ["Promyelocytes", "Myelocytes", "band", "Neutrophils", "Lymphocytes", None]
    obs = pd.DataFrame({"has_image": [True] * 6, "has_expression": [True] * 6, "label": labels})
    model = tmp_path / "train" / "model.pt"
    assert model_settings(mine, model, data_layout(obs, 5, True))[1] == []
    # without the labels (an old latent): compared as written
    assert model_settings(mine, model, data_layout(obs.drop(columns="label"), 5, True))[1]
    # another axis: named
    _, differ = model_settings(
        {"vae": {"maturation_classes": ["band", "segmented_neutrophil"]}},
        model,
        data_layout(obs, 5, True),
    )
    assert [d.split(":")[0] for d in differ] == ["vae.maturation_classes"]


def test_traverse_does_not_warn_of_an_auto_dropout_that_resolves_alike(tmp_path: Path):
    from pipeline.guards import data_layout
    from pipeline.stages.traverse import model_settings

    (tmp_path / "train").mkdir()
    man = {"stage": "train", "config": {"vae": {"dropout": 0.1, "beta": 4.0}}}
    (tmp_path / "train" / "manifest.json").write_text(json.dumps(man))
    mine = {"vae": {"dropout": None, "beta": 1.0}}
    obs = pd.DataFrame({"has_image": [True, True], "has_expression": [True, False]})
    _, differ = model_settings(mine, tmp_path / "train" / "model.pt", data_layout(obs, 5, True))
    assert differ == ["vae.beta: this run 1.0, the model 4.0"]
    alone = pd.DataFrame({"has_image": [False, False], "has_expression": [True, True]})
    _, differ = model_settings(mine, tmp_path / "train" / "model.pt", data_layout(alone, 5, True))
    assert "vae.dropout: this run None, the model 0.1" in differ
