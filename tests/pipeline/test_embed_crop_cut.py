"""New cells are cut as the study's training crops were (``crop_masks=auto``).

An audit built a study from its own crop folders (``pair.crop_sources`` of kind
``image_folder``: unmasked square crops), then embedded new crops and smears with the
default of the time, the detector's masks: 24 of 24 cells came out atypical
(``anomaly_score`` 26-60 against a threshold of 5.6), called unclassified, without a word
in the log. Read whole, the same crops scored -1.0..2.2. The study's training crops are
told from its paired data's masks (``Study.training_crops``) and the default follows
them; a cut given unlike them, and an input mostly atypical, are warned of.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from tests.helpers.run import run_stage_in_process
from tests.helpers.seg_synth import LIGHT_HEADS
from tests.helpers.vae_toy import add_unmasked_twin


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_study) -> Path:
    """The tiny study (trained on crops masked to a disc): <root>/out/s, and beside it
    <root>/out/w, the same study whose own pair/paired.h5ad holds the crops with
    all-True masks, as stage=pair writes crops of an image_folder."""
    return add_unmasked_twin(toy_study(tmp_path_factory.mktemp("cut")))


def _crops(folder: Path, n: int = 3) -> Path:
    """Crop files: a disc on a pale background (nothing a detector is asked for here)."""
    (folder / "p").mkdir(parents=True)
    yy, xx = np.mgrid[:32, :32]
    for i in range(n):
        img = np.full((32, 32, 3), (230, 200, 200), np.uint8)
        img[(yy - 16) ** 2 + (xx - 16) ** 2 <= 100 + 10 * i] = (150, 120, 200)
        Image.fromarray(img).save(folder / "p" / f"c{i}.png")
    return folder


def _smear_detector(tmp_path: Path, monkeypatch) -> Path:
    """A detector checkpoint whose network is replaced by one that finds every dark blob
    (tests.segmentation.test_seg_infer._Blobs), and a smear of two cells."""
    import segmentation.inference
    from segmentation.model import build_maskrcnn, save_checkpoint
    from tests.segmentation.test_seg_infer import _Blobs, disc

    monkeypatch.setattr(segmentation.inference, "MaskRCNNDetector", lambda *a, **k: _Blobs())
    args = {"arch": "resnet18_fpn", "min_size": 128, "max_size": 128, **LIGHT_HEADS}
    save_checkpoint(tmp_path / "det.pt", build_maskrcnn(**args), args)
    (tmp_path / "smears" / "s1").mkdir(parents=True)
    img = np.full((160, 200, 3), (230, 200, 200), np.uint8)
    for k in range(2):
        img[disc(160, 200, 50 + 60 * k, 70 + 60 * k, 14)] = (120, 60, 160)
    Image.fromarray(img).save(tmp_path / "smears" / "s1" / "field.png")
    return tmp_path / "det.pt"


def test_whole_masks_tell_a_square_read_whole_from_a_cut_out_cell():
    from vae.inputs.query import whole_masks

    m = np.zeros((4, 16, 16), bool)
    m[0] = True  # a square file read whole
    m[1, 3:13, :] = True  # a wide file read whole: padding above and below
    yy, xx = np.mgrid[:16, :16]
    m[2] = (yy - 8) ** 2 + (xx - 8) ** 2 <= 36  # a cell's instance mask
    # m[3]: no image
    assert whole_masks(m).tolist() == [True, True, False, False]
    box = np.zeros((1, 16, 16), bool)
    box[0, 2:14, 2:14] = True  # a rectangle not reaching the edges: a cut (square) cell
    assert not whole_masks(box)[0]


def test_the_crops_cut_is_read_from_rows_spread_over_every_source(tmp_path: Path):
    """A paired table lists its crops source by source: 351 whole crop-folder crops, then
    400 masked ones (by_label_real's layout). Runs of consecutive rows read them in
    clusters (0.500 whole, and the tie went to whole: review); single rows evenly spaced
    read about the true share (0.467), and the study is masked."""
    import h5py

    yy, xx = np.mgrid[:16, :16]
    cell = (yy - 8) ** 2 + (xx - 8) ** 2 <= 36
    masks = np.concatenate([np.ones((351, 16, 16), bool), np.repeat(cell[None], 400, 0)])
    masks = np.concatenate([masks, np.zeros((300, 16, 16), bool)])  # expression-only rows
    has = np.r_[np.ones(751, bool), np.zeros(300, bool)]
    path = tmp_path / "paired.h5ad"
    with h5py.File(path, "w") as f:
        f["obsm/masks"] = masks.astype(np.uint8)
        f["obs/has_image"] = has
    from vae.inputs.query import paired_masks

    got = paired_masks(path)
    assert (got.n, got.n_image) == (256, 751)
    assert abs(got.share - 351 / 751) < 0.01
    from vae.api import WHOLE_CROPS_SHARE

    assert not got.share > WHOLE_CROPS_SHARE  # masked: new cells cut by the detector


def test_the_study_says_how_its_crops_were_made(study: Path, tmp_path: Path):
    """From its paired data's masks; without them from its pair run's record; else not
    known (the detector, as before)."""
    from vae.api import Study

    masked = Study.load(study / "out" / "s").training_crops()
    assert (masked.kind, masked.crop_masks, masked.whole_share) == ("masked", "detector", 0.0)
    whole = Study.load(study / "out" / "w").training_crops()
    assert (whole.kind, whole.crop_masks, whole.whole_share) == ("whole", "whole", 1.0)
    assert "pair/paired.h5ad" in whole.evidence
    # an old study whose paired data are gone: the kinds of its pair.crop_sources
    st = Study.load(study / "out" / "s")
    gone = tmp_path / "pair" / "paired.h5ad"
    gone.parent.mkdir()
    st._paired_candidates = [gone]
    assert st.training_crops().kind is None  # no record either: not known
    assert st.crop_masks_for("crops") == "detector"
    for kinds, want in (
        (["image_folder"], "whole"),
        (["cells", "segmentation_wbc"], "masked"),
        (["image_folder", "cells"], None),
    ):
        sources = [{"kind": k, "path": None} for k in kinds]
        rec = {"stage": "pair", "config": {"pair": {"crop_sources": sources}}}
        (gone.parent / "manifest.json").write_text(json.dumps(rec))
        st._training_crops = None
        assert st.training_crops().kind == want, kinds


def test_crop_folders_follow_the_study(study: Path, tmp_path: Path, monkeypatch):
    """A study trained on unmasked squares reads a crop folder whole (no detector); a
    masked one sends it to the detector, as before."""
    import vae.inputs.query as Q
    from vae.api import Study

    folder = _crops(tmp_path / "crops")
    asked = []

    def detector(*a, **k):
        asked.append(a[0])
        return Q.read_crop_folder(a[0], 16)

    monkeypatch.setattr(Q, "segment_crop_folder", detector)
    a = Study.load(study / "out" / "w").read(folder, kind="crops")
    assert not asked and a.n_obs == 3
    assert a.obsm["masks"].all()  # the whole square, as its training crops
    assert (a.obsm["crops"][:, 0, 0] > 150).all()  # the background kept
    Study.load(study / "out" / "s").read(folder, kind="crops")
    assert asked == [folder]  # the masked study: the detector's masks


def test_smears_into_an_unmasked_study_are_cut_as_unmasked_squares(
    study: Path, tmp_path: Path, monkeypatch, caplog
):
    """Each smear cell as its square box with its surroundings and an all-True mask
    (a smear cannot be read whole); the detector's masks on request, with a warning."""
    from vae.api import Study

    det = _smear_detector(tmp_path, monkeypatch)
    st = Study.load(study / "out" / "w", segmentation_model=det)
    sq = st.read(tmp_path / "smears", kind="smears", estimate_scale=False)
    assert sq.n_obs == 2 and sq.obsm["masks"].all()
    corner = sq.obsm["crops"][:, 0, 0].astype(int)
    assert (np.abs(corner - (230, 200, 200)).max(axis=1) < 30).all()  # the smear around it
    # the square is the cell's box: the disc (29 px) fills it, as a crop file's cell does
    centre = sq.obsm["crops"][:, sq.obsm["crops"].shape[1] // 2].astype(int)
    assert (centre[:, 2:-2] < 200).mean() > 0.6
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        cut = st.read(tmp_path / "smears", kind="smears", crop_masks="detector")
    assert not cut.obsm["masks"].all() and (cut.obsm["crops"][:, 0, 0] == 0).all()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "crop_masks=detector reads smears" in m
        and "trained on unmasked square crops" in m
        and "most will be called unclassified (atypical)" in m
        for m in said
    ), said
    # the masked study: smears cut out by the detector's masks, as before, no warning
    caplog.clear()
    masked = Study.load(study / "out" / "s", segmentation_model=det)
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        m = masked.read(tmp_path / "smears", kind="smears", estimate_scale=False)
    assert not m.obsm["masks"].all() and (m.obsm["crops"][:, 0, 0] == 0).all()
    assert not [r for r in caplog.records if "crop_masks" in r.getMessage()]


def test_the_stage_warns_of_a_cut_unlike_the_study(study: Path, tmp_path: Path):
    """embed.crop_masks=whole on the masked study: a warning naming the setting and what
    follows; the default (auto) reads as the study and says so."""
    folder = _crops(tmp_path / "crops")
    base = [
        f"paths.root={study / 'out'}",
        f"embed.study={study / 'out' / 's'}",
        "hardware.torch_threads=1",
        f"embed.crops={folder}",
    ]
    d = run_stage_in_process([*base, "experiment=mm", "embed.crop_masks=whole"], "embed")
    log_text = (d / "embed.log").read_text()
    assert "WARNING" in log_text and "embed.crop_masks=whole reads crops" in log_text
    assert "cells will look unlike the study's training crops" in log_text
    q = ad.read_h5ad(d / "query.h5ad")
    assert q.obsm["masks"].all()  # as asked


def test_an_input_mostly_atypical_is_warned_of(study: Path, caplog):
    """More than half of an input's cells atypical: a warning with the share and the
    usual causes, once per input (the stage: with the input's totals, not per block)."""
    import pandas as pd

    from vae.api import ATYPICAL_MOSTLY, Study

    st = Study.load(study / "out" / "s")
    obs = pd.DataFrame({"vae_atypical": [True] * 6 + [False] * 4, "vae_modality": "image"})
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        assert st.warn_atypical(obs, "embed.crops=X") == pytest.approx(0.6)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "embed.crops=X: 6 of 10 cells (60 %) are atypical" in msg
    assert "crops masked to the cell" in msg  # what the study was trained on
    assert "stain or magnification" in msg and "never saw" in msg
    caplog.clear()
    half = obs.assign(vae_atypical=[True] * 5 + [False] * 5)
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        assert st.warn_atypical(half) == pytest.approx(ATYPICAL_MOSTLY)
    assert not caplog.records  # half is not most
    # Study.embed: a study whose threshold is its held-out cells' 1 % quantile finds most
    # of its own cells atypical
    paired = ad.read_h5ad(study / "paired.h5ad")
    st.atypical_quantile = 0.01
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        q = st.embed(paired, "own", warn_seen=False)
    assert q.obs["vae_atypical"].mean() > ATYPICAL_MOSTLY
    assert (
        sum("own: " in r.getMessage() and "are atypical" in r.getMessage() for r in caplog.records)
        == 1
    )


def test_the_stage_warns_once_per_input_of_most_cells_atypical(study: Path, monkeypatch):
    import pipeline.streaming

    monkeypatch.setattr(pipeline.streaming, "EMBED_BLOCK_ROWS", 7)  # 60 rows: 9 blocks
    d = run_stage_in_process(
        [
            f"paths.root={study / 'out'}",
            f"embed.study={study / 'out' / 's'}",
            "hardware.torch_threads=1",
            "experiment=aty",
            f"embed.h5ad={study / 'paired.h5ad'}",
            "embed.atypical_quantile=0.01",
            "hardware.stream_above_gib=0",
        ],
        "embed",
    )
    lines = [ln for ln in (d / "embed.log").read_text().splitlines() if "are atypical" in ln]
    assert len(lines) == 1 and "WARNING" in lines[0] and "of 60 cells" in lines[0], lines


def test_an_input_unlike_the_study_as_a_whole_is_warned_of(study: Path, caplog):
    """Few cells atypical but most above the study's held-out 75th percentile (a new
    microscope, measured: 94 % of unseen BCCD crops, 0.3 % atypical): a warning with the
    share and the binomial p; a quarter above, or a handful of cells, is not warned of."""
    import pandas as pd

    from vae.analysis import anomaly as A
    from vae.api import Study
    from vae.study_atypical import SHIFT_QUANTILE

    st = Study.load(study / "out" / "s")
    thr = A.held_out_thresholds(st._scored_reference(), st._anomaly_reference(), SHIFT_QUANTILE)
    cut = thr["image"]
    assert np.isfinite(cut)

    def obs(n_above: int, n_below: int) -> pd.DataFrame:
        score = [cut + 0.5] * n_above + [cut - 0.5] * n_below
        return pd.DataFrame(
            {"anomaly_score": score, "vae_modality": "image", "vae_atypical": False}
        )

    shifted = obs(30, 10)
    got = st.input_shift(shifted)
    assert (got["n"], got["above"], got["expected"]) == (40, 30, pytest.approx(0.25))
    assert got["share"] == pytest.approx(0.75) and got["p"] < 1e-3 and got["shifted"]
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        assert st.warn_atypical(shifted, "embed.crops=X") == 0.0
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "embed.crops=X: 30 of 40 cells (75 %) score above the 75th percentile" in msg
    assert "another microscope" in msg
    for quiet in (obs(10, 30), obs(3, 0)):  # a quarter above; three cells (p = 0.016)
        caplog.clear()
        assert not st.input_shift(quiet)["shifted"]
        with caplog.at_level(logging.WARNING, logger="vae.api"):
            st.warn_atypical(quiet)
        assert not caplog.records
    # no scores: nothing to say
    assert st.input_shift(pd.DataFrame({"vae_modality": ["image"]})) is None
