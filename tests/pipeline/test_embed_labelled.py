"""Labelled crops of the user's own microscope (``Study.fit_labelled_crops``,
``embed.labelled_crops``).

On a microscope a study never saw, its label calls were right about half the time, while
20 labelled crops per class of that microscope, read by a logistic regression on the
image code, were right 0.65-0.79 of the time (docs/embed.md, "Labelled crops of your own
microscope"). The user sorts some crops into one sub-folder per class; image-only cells
are then called from them.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.helpers.run import run_stage_in_process
from tests.helpers.vae_toy import add_unmasked_twin

# the toy study's kinds (tests.helpers.vae_toy): colour and disc radius per kind
COLOUR = {"myeloblast": (200, 80, 160), "lymphocyte": (90, 90, 220)}
RADIUS = {"myeloblast": 0.3, "lymphocyte": 0.5}


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_study) -> Path:
    """The tiny study as trained on unmasked squares (a crop folder is read whole, no
    detector): <root>/out/w."""
    return add_unmasked_twin(toy_study(tmp_path_factory.mktemp("labelled")))


def _cells(folder: Path, kind: str, n: int, seed: int) -> None:
    """``n`` 16 px crops of the toy study's ``kind``: its colour on its disc, grey around."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:16, :16]
    disc = (yy - 8) ** 2 + (xx - 8) ** 2 <= (16 * RADIUS[kind]) ** 2
    for i in range(n):
        img = np.full((16, 16, 3), 230, np.uint8)
        img[disc] = np.clip(np.array(COLOUR[kind]) + rng.normal(0, 10, 3), 0, 255)
        Image.fromarray(img).save(folder / f"{kind}_{i}.png")


def _labelled(root: Path, names: dict[str, str], n: int = 6) -> Path:
    """A labelled folder: sub-folder ``names[kind]`` holds ``n`` crops of ``kind``."""
    for k, (kind, sub) in enumerate(names.items()):
        _cells(root / sub, kind, n, seed=10 + k)
    return root


def test_image_only_cells_follow_the_users_labelled_crops(study: Path, tmp_path: Path, caplog):
    """Labels swapped on purpose (the lymphocyte-like crops in ``Myeloblasts/``): the
    calls follow the user's crops, not the study's reference; sub-folder names match the
    study's classes ignoring case and a plural s; the atypical threshold of image-only
    cells becomes the labelled crops' own; setting ``labelled_crops`` to None restores
    the study's calls."""
    from vae.api import Study

    st = Study.load(study / "out" / "w")
    query = tmp_path / "query"
    _cells(query / "p", "myeloblast", 4, seed=1)
    _cells(query / "p", "lymphocyte", 4, seed=2)
    q = st.read(query, "crops")
    before = st.embed(q.copy(), warn_seen=False)
    truth = np.array([n.split("/")[-1].split("_")[0] for n in before.obs_names])
    own = before.obs["vae_label"].astype(str).to_numpy()
    # crops unlike its training crops (whole squares, another grey): the study's own
    # reference calls them no better than chance and flags them atypical
    assert before.obs["vae_atypical"].all()
    swapped = _labelled(tmp_path / "lab", {"lymphocyte": "Myeloblasts", "myeloblast": "LYMPHOCYTE"})
    with caplog.at_level(logging.INFO, logger="vae.api"):
        fitted = st.fit_labelled_crops(swapped)
    assert fitted is st.labelled_crops
    assert fitted.counts == {"myeloblast": 6, "lymphocyte": 6}  # the study's names and order
    assert fitted.cv_accuracy == pytest.approx(1.0)
    assert fitted.cv_confusion == {"myeloblast": {"myeloblast": 6}, "lymphocyte": {"lymphocyte": 6}}
    assert fitted.as_dict()["by_class"] == {"myeloblast": 6, "lymphocyte": 6}
    assert any("12 labelled crops" in r.getMessage() for r in caplog.records)
    # fewer than FEW_LABELLED per class: said
    assert any("few labelled crops" in r.getMessage() for r in caplog.records)
    after = st.embed(q.copy(), warn_seen=False)
    swap = {"myeloblast": "lymphocyte", "lymphocyte": "myeloblast"}
    called = after.obs["vae_label"].astype(str).to_numpy()
    assert (called == np.array([swap[t] for t in truth])).all()
    conf = after.obs["vae_label_confidence"].to_numpy()
    assert ((conf > 0.5) & (conf <= 1)).all()
    # atypical against the labelled crops of this microscope, not the study's held-out cells
    assert not after.obs["vae_atypical"].any()
    assert (after.obs["vae_call"].astype(str) == called).all()
    assert set(st.callable_labels("image")) == {"myeloblast", "lymphocyte"}  # no myelocyte
    thr = st.atypical_thresholds()
    assert thr["image"] == pytest.approx(np.quantile(fitted.scores, st.atypical_quantile))
    st.labelled_crops = None
    assert (st.embed(q.copy(), warn_seen=False).obs["vae_label"].astype(str) == own).all()
    with pytest.raises(Exception, match="fit_labelled_crops"):
        st.labelled_crops = "folder"


def test_labelled_folders_that_cannot_be_used_are_refused(study: Path, tmp_path: Path):
    """One class, images directly in the folder, no readable crop, no folder: a
    StudyError naming the folder."""
    from vae.api import Study, StudyError

    st = Study.load(study / "out" / "w")
    one = _labelled(tmp_path / "b", {"myeloblast": "myeloblast"})
    with pytest.raises(StudyError, match="1 class.*at least two"):
        st.fit_labelled_crops(one)
    loose = tmp_path / "c"
    _cells(loose, "myeloblast", 3, seed=0)
    _labelled(loose, {"lymphocyte": "lymphocyte"})
    with pytest.raises(StudyError, match="directly in the folder have no class"):
        st.fit_labelled_crops(loose)
    broken = tmp_path / "d" / "myeloblast"
    broken.mkdir(parents=True)
    (broken / "x.png").write_bytes(b"not an image")
    with pytest.raises(StudyError, match="no readable crop"):
        st.fit_labelled_crops(tmp_path / "d")
    (tmp_path / "e" / "myeloblast").mkdir(parents=True)
    with pytest.raises(StudyError, match="no image file in the folder or its sub-folders"):
        st.fit_labelled_crops(tmp_path / "e")
    with pytest.raises(StudyError, match="no such folder"):
        st.fit_labelled_crops(tmp_path / "nowhere")
    assert st.labelled_crops is None  # nothing fitted by a refused folder


def test_the_stage_calls_from_labelled_crops_and_says_so(study: Path, tmp_path: Path):
    """embed.labelled_crops: summary.json says what the image-only cells were called
    from; a broken image among the labelled crops is a reject row; a folder that is not
    there is refused before anything runs."""
    query = tmp_path / "query"
    _cells(query / "p", "myeloblast", 3, seed=1)
    lab = _labelled(tmp_path / "lab", {"myeloblast": "Myeloblast", "lymphocyte": "Lymphocytes"})
    (lab / "Myeloblast" / "broken.png").write_bytes(b"not an image")
    base = [
        f"paths.root={study / 'out'}",
        f"embed.study={study / 'out' / 'w'}",
        "hardware.torch_threads=1",
        f"embed.crops={query}",
    ]
    d = run_stage_in_process([*base, "experiment=lab", f"embed.labelled_crops={lab}"], "embed")
    summary = json.loads((d / "summary.json").read_text())
    got = summary["labelled_crops"]
    assert got["source"] == str(lab) and got["crops"] == 12 and got["rejects"] == 1
    assert got["by_class"] == {"myeloblast": 6, "lymphocyte": 6}
    rejects = (d / "rejects.csv").read_text()
    assert "broken.png" in rejects and "embed.labelled_crops=" in rejects
    q = ad.read_h5ad(d / "query.h5ad")
    assert (q.obs["vae_label"].astype(str) == "myeloblast").all()
    page = (d / "samples.html").read_text()
    assert "Cells with an image only are called from 12 labelled crops" in page
    page = html.unescape(page)
    assert "below 0.5 or it is less like the study's cells than 99 % of the labelled crops" in page
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["inputs"]["labelled_crops"]["kind"] == "dir"
    d0 = run_stage_in_process([*base, "experiment=nolab"], "embed")
    assert json.loads((d0 / "summary.json").read_text())["labelled_crops"] is None
    from pipeline.runner import StageError

    with pytest.raises(StageError, match="embed.labelled_crops=.*no such file or folder"):
        run_stage_in_process(
            [*base, "experiment=gone", f"embed.labelled_crops={tmp_path / 'gone'}"], "embed"
        )
    # a folder the fit refuses: the stage's one error names the setting, nothing written
    one = _labelled(tmp_path / "one", {"myeloblast": "Myeloblast"})
    with pytest.raises(StageError, match=r"embed.labelled_crops=.*1 class.*at least two"):
        run_stage_in_process([*base, "experiment=one", f"embed.labelled_crops={one}"], "embed")
    assert not (study / "out" / "one" / "embed" / "query.h5ad").exists()


def test_the_log_names_the_classes_the_labelled_crops_confuse_most():
    from vae.study_labelled import _most_confused

    confusion = {"a": {"a": 8, "b": 2}, "b": {"b": 5, "a": 5}, "c": {"c": 3}}
    counts = {"a": 10, "b": 10, "c": 3}
    assert _most_confused(confusion, counts) == "; most confused: b called a (5 of 10)"
    assert _most_confused({"a": {"a": 4}}, {"a": 4}) == ""
    assert _most_confused({}, {}) == ""


def test_crops_the_study_calls_well_itself_are_warned_of(study: Path, caplog):
    """The study's own training crops as "labelled crops" (a microscope it has seen): its
    own labels call them at least as well as they call each other, so the log says the
    labelled crops are not needed; the numbers are in the summary."""
    from vae.api import Study

    st = Study.load(study / "out" / "s")  # the masked study, on the crops it trained on
    paired = ad.read_h5ad(study / "paired.h5ad")
    own = paired[paired.obs["has_image"].to_numpy(bool)].copy()
    own.obs = own.obs[["label"]]
    with caplog.at_level(logging.INFO, logger="vae.api"):
        fitted = st.fit_labelled_crops(own, label_key="label")
    got = fitted.as_dict()
    assert got["study_reference_balanced_accuracy"] >= got["cv_balanced_accuracy"]
    assert any("call these crops at least as well" in r.getMessage() for r in caplog.records)


def test_classes_the_study_lacks_are_called_and_counted(study: Path, tmp_path: Path, caplog):
    """Maturation stages the study has no crop of (``Band/``, ``Segmented neutrophils/``):
    called as given, counted in samples.csv, where the left-shift index they name becomes
    measurable; no position on the study's path; a name close to a study class is said."""
    query = tmp_path / "query"
    _cells(query / "p", "myeloblast", 3, seed=1)
    _cells(query / "p", "lymphocyte", 3, seed=2)
    lab = _labelled(tmp_path / "lab", {"myeloblast": "Band", "lymphocyte": "Segmented neutrophils"})
    d = run_stage_in_process(
        [
            f"paths.root={study / 'out'}",
            f"embed.study={study / 'out' / 'w'}",
            "hardware.torch_threads=1",
            f"embed.crops={query}",
            "experiment=stages",
            f"embed.labelled_crops={lab}",
            # the toy's few crops lie far outside its training crops: the labelled crops'
            # 0.99 quantile is about their largest score, which these cells' scores cross
            "embed.atypical_quantile=null",
        ],
        "embed",
    )
    got = json.loads((d / "summary.json").read_text())["labelled_crops"]
    assert got["new_classes"] == ["Band", "Segmented neutrophils"]
    q = ad.read_h5ad(d / "query.h5ad")
    kinds = np.array([n.split("/")[-1].split("_")[0] for n in q.obs_names])
    calls = q.obs["vae_call"].astype(str).to_numpy()
    assert (calls[kinds == "myeloblast"] == "Band").all()
    assert (calls[kinds == "lymphocyte"] == "Segmented neutrophils").all()
    assert q.obs["vae_maturation"].isna().all()  # not the study's path classes
    assert "Band" in q.obs["vae_call"].cat.categories
    prof = pd.read_csv(d / "samples.csv")
    assert prof["left_shift_index"].iloc[0] == pytest.approx(0.5)  # 3 band of 6 neutrophils
    from vae.api import Study

    st = Study.load(study / "out" / "w")
    near = _labelled(tmp_path / "near", {"myeloblast": "Myeloblasts", "lymphocyte": "lymphocite"})
    with caplog.at_level(logging.INFO, logger="vae.api"):
        st.fit_labelled_crops(near)
    assert st.labelled_crops.new_classes == ["lymphocite"]
    assert any(
        "'lymphocite' looks like the study's 'lymphocyte'" in r.getMessage() for r in caplog.records
    )


def test_labelled_crops_far_from_their_place_on_the_path_are_warned_of(study: Path, caplog):
    """The study's own crops of its path classes (myeloblast -> myelocyte) labelled
    right lie nearest their own places on the path; labelled the other way round, each
    class lies nearest the other's place: warned, as segmentation_wbc's neutrophils were
    through a study that never saw that microscope (median 0.00, the GMP end)."""
    from vae.api import Study

    st = Study.load(study / "out" / "s")
    paired = ad.read_h5ad(study / "paired.h5ad")
    own = paired[paired.obs["has_image"].to_numpy(bool)].copy()
    own.obs = own.obs[["label"]]
    right = st.fit_labelled_crops(own, label_key="label").path_check
    assert {c: v["nearest"] for c, v in right.items()} == {
        "myeloblast": "myeloblast",
        "myelocyte": "myelocyte",
    }
    swap = {"myeloblast": "myelocyte", "myelocyte": "myeloblast", "lymphocyte": "lymphocyte"}
    own.obs["label"] = own.obs["label"].astype(str).map(swap)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        wrong = st.fit_labelled_crops(own, label_key="label").path_check
    assert wrong["myeloblast"]["nearest"] == "myelocyte"
    assert any(
        "labelled myeloblast crops lie at a median position" in r.getMessage()
        for r in caplog.records
    )
    assert "path_check" in st.labelled_crops.as_dict()
    from pipeline.stages.embed import _page_notes

    notes = " ".join(_page_notes(st, ["myeloblast", "myelocyte"]))
    assert "labelled myeloblast crops lie nearest myelocyte on the path" in notes
    assert "not to be read" in notes
