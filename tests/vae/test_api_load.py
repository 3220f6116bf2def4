"""vae.api.Study.load on a tiny study: which stage=traverse record it takes its analysis
settings from."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_study) -> Path:
    """The experiment folder of a trained tiny study (``train/{model.pt,latent.h5ad}``)."""
    return toy_study(tmp_path_factory.mktemp("study")) / "out" / "s"


def _traverse_record(exp: Path, text: str, variant: str = "") -> Path:
    d = exp / "traverse" / variant if variant else exp / "traverse"
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(text)
    return d / "manifest.json"


def _record(status: str, label_key: str = "traverse_key") -> str:
    return json.dumps(
        {"stage": "traverse", "status": status, "config": {"analysis": {"label_key": label_key}}}
    )


def test_a_complete_traverse_run_gives_the_analysis_settings(study: Path, tmp_path, caplog):
    import shutil

    from vae.api import Study

    exp = tmp_path / "exp"
    shutil.copytree(study / "train", exp / "train")
    own = Study.load(exp).label_key  # no traverse run: the checkpoint's settings
    assert own != "traverse_key"
    _traverse_record(exp, _record("complete"))
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        assert Study.load(exp).label_key == "traverse_key"
    assert not [r for r in caplog.records if "traverse" in r.getMessage()]
    # a record without its settings ("config": null): the checkpoint's, no error
    _traverse_record(exp, json.dumps({"stage": "traverse", "status": "complete", "config": None}))
    assert Study.load(exp).label_key == own


@pytest.mark.parametrize(
    "text, said",
    [
        ("{not json", "cannot be read"),
        ("", "cannot be read"),
        (_record("failed"), "not complete \\(status 'failed'\\)"),
        (_record("running"), "not complete \\(status 'running'\\)"),
        (
            json.dumps({"stage": "traverse", "config": {"analysis": {"label_key": "x"}}}),
            "not complete",
        ),
        ("[1, 2]", "not a run's record"),
        (
            json.dumps({"stage": "traverse", "status": "complete", "config": {"analysis": 3}}),
            "not a mapping",
        ),
    ],
)
def test_a_corrupt_or_unfinished_traverse_record_is_named_and_not_used(
    study: Path, tmp_path, caplog, text: str, said: str
):
    """A traverse run that failed, is still running or left a broken manifest.json: the
    checkpoint's settings, and a warning naming the file (a bare JSONDecodeError or
    AttributeError before; a failed run's settings used silently)."""
    import re
    import shutil

    from vae.api import Study

    exp = tmp_path / "exp"
    shutil.copytree(study / "train", exp / "train")
    own = Study.load(exp).label_key
    man = _traverse_record(exp, text)
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        got = Study.load(exp)
    assert got.label_key == own
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith(str(man)) and re.search(said, m) for m in msgs), msgs


def test_a_variants_own_traverse_record_decides(study: Path, tmp_path, caplog):
    """With a variant, its own traverse/<variant> record is read first; an unfinished one
    is not replaced by the main run's."""
    import shutil

    from vae.api import Study

    exp = tmp_path / "exp"
    shutil.copytree(study / "train", exp / "train" / "v1")
    _traverse_record(exp, _record("complete", "main_key"))
    assert Study.load(exp, variant="v1").label_key == "main_key"  # none of its own
    _traverse_record(exp, _record("complete", "v1_key"), "v1")
    assert Study.load(exp, variant="v1").label_key == "v1_key"
    man = _traverse_record(exp, _record("failed", "v1_key"), "v1")
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        got = Study.load(exp, variant="v1")
    assert got.label_key not in ("v1_key", "main_key")
    assert any(str(man) in r.getMessage() for r in caplog.records)


def test_a_file_that_is_not_a_model_is_named_as_such(tmp_path: Path):
    """Study.load(<a .h5ad>) said "<its folder>/latent.h5ad: no such file" (audit s52)."""
    from vae.api import Study, StudyError

    f = tmp_path / "expression.h5ad"
    f.write_bytes(b"")
    with pytest.raises(StudyError, match=r"expression\.h5ad\): a file that is not a model"):
        Study.load(f)


def test_a_model_file_of_another_suffix_still_loads(study: Path, tmp_path: Path):
    """A torch checkpoint named other than .pt (model.pth) loaded before 07211b8, which
    refused every file not ending in .pt; only a file that is no torch archive is."""
    import shutil

    from vae.api import Study

    train = tmp_path / "train"
    shutil.copytree(study / "train", train)
    (train / "model.pt").rename(train / "model.pth")
    got = Study.load(train / "model.pth")
    assert got.model_path == train / "model.pth"


def test_decode_in_a_training_cells_pose(study: Path, tmp_path: Path):
    """Study.decode(pose="training"): each code plus the pose (single-view minus reported
    code) of the training crop nearest it; a training crop's own reported code takes its
    own single-view code. Without the paired data, a clear StudyError."""
    import numpy as np

    from vae.analysis.run import image_reference_rows
    from vae.api import Study, StudyError
    from vae.data import load_paired
    from vae.infer import encode_dataset

    st = Study.load(study)
    assert st.model.args.encode_views == 8
    ref = st.reference
    data = load_paired(study.parent.parent / "paired.h5ad", image_size=st.crop_size)
    lenders = image_reference_rows(ref, data.has_image.numpy().astype(bool))[:4]
    one = encode_dataset(st.model, data, rows=lenders, views=1).joint
    z = np.asarray(ref.obsm["X_vae_full"], np.float64)[lenders]
    np.testing.assert_allclose(st.training_poses(z), one, atol=1e-5)
    got = st.decode(z, pose="training").images
    np.testing.assert_allclose(got, st.decode(st.training_poses(z)).images, atol=1e-6)
    assert np.abs(got - st.decode(z).images).max() > 1e-3  # the pose moved the drawing
    with pytest.raises(StudyError, match="pose='sideways'"):
        st.decode(z, pose="sideways")
    with pytest.raises(StudyError, match="finite"):
        st.training_poses(np.full_like(z, np.nan))
    gone = Study.load(study)
    gone._paired_candidates = [tmp_path / "gone.h5ad"]
    with pytest.raises(StudyError, match="is gone.*pose='as_given'"):
        gone.decode(z, pose="training")
