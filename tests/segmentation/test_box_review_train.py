"""data.smear_sources[*].box_review: reviewed boxes take their class before training.

TXL-PBC holds red cells and platelets annotated as white cells (five of 305 val boxes,
fourteen of 1055 train boxes; docs/reviews/). A source's review files relabel them as
the data are read, so the detector does not learn them as white cells; a review that
does not match the annotations is one clear error naming the setting.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _smears(tmp_path: Path) -> tuple[Path, list]:
    """4 hand-made COCO smears (2 cells each, all train) and their records."""
    from segmentation.datasets import READERS
    from tests.helpers.seg_synth import make_coco_smears

    ann = make_coco_smears(tmp_path / "smears", n_images=4, size=96, cells=2, radius=10, val=0)
    return ann, list(READERS["coco"](ann))


def _cfg(tmp_path: Path, ann: Path, reviews: list[Path]):
    from tests.helpers.run import compose_config

    rv = ", ".join(f"'{r}'" for r in reviews)
    src = f"{{format: coco, path: '{ann}', name: lab, scale: 1.0, val_splits: [], box_review: [{rv}]}}"
    return compose_config(
        [
            "stage=segment_train",
            "data=bccd",
            f"paths.root={tmp_path / 'out'}",
            f"data.smear_sources=[{src}]",
        ]
    )


def test_reviewed_boxes_leave_the_white_cells_before_training(tmp_path, caplog):
    from pipeline.stages.segment_train import load_sets

    ann, recs = _smears(tmp_path)
    target = recs[1]
    name, b = Path(target.path).name, target.wbcs[0].bbox
    review = tmp_path / "review.csv"
    review.write_text(
        "image,x0,y0,x1,y1,category,note\n"
        f"{name},{b[0]},{b[1]},{b[2]},{b[3]},rbc,a red cell\n"
        "elsewhere.png,1,1,9,9,rbc,\n"
    )
    with caplog.at_level("INFO"):
        train, _, _, _ = load_sets(_cfg(tmp_path, ann, [review]), None, [])
    want = {Path(r.path).name: len(r.wbcs) - (Path(r.path).name == name) for r in recs}
    assert {Path(r.path).name: len(r.wbcs) for r in train} == want
    got = next(r for r in train if Path(r.path).name == name)
    assert sorted(a.category for a in got.instances) == ["rbc", "wbc"]
    assert "1 white-cell box(es) take their reviewed class" in caplog.text
    assert "1 name images not in this source" in caplog.text
    # no review: the annotations as published
    train0, _, _, _ = load_sets(_cfg(tmp_path, ann, []), None, [])
    assert sum(len(r.wbcs) for r in train0) == sum(len(r.wbcs) for r in recs)


def test_a_review_that_does_not_match_is_one_clear_error(tmp_path):
    from pipeline.runner import StageError
    from pipeline.stages.segment_train import load_sets

    ann, recs = _smears(tmp_path)
    name = Path(recs[1].path).name
    stale = tmp_path / "stale.csv"
    stale.write_text(f"image,x0,y0,x1,y1,category\n{name},0,0,3,3,rbc\n")
    with pytest.raises(StageError, match=rf"box_review\[0\]: review line 2: {name} has no white"):
        load_sets(_cfg(tmp_path, ann, [stale]), None, [])
    with pytest.raises(StageError, match=r"box_review\[0\]=.*absent\.csv: no such file"):
        load_sets(_cfg(tmp_path, ann, [tmp_path / "absent.csv"]), None, [])
    bad = tmp_path / "bad.csv"
    bad.write_text(f"image,x0,y0,x1,y1\n{name},24,28,48,52\n")
    with pytest.raises(StageError, match=r"missing column\(s\) \['category'\]"):
        load_sets(_cfg(tmp_path, ann, [bad]), None, [])


def test_an_empty_review_list_resumes_a_run_recorded_before_it():
    """A segment_train run recorded before box_review existed has no such key in its
    sources; an empty list reads no file, so a resume compares them as equal."""
    from pipeline.guards import resolved_setting

    old = [{"format": "voc", "path": "smears/bccd", "scale": 0.21}]
    new = [{"format": "voc", "path": "smears/bccd", "scale": 0.21, "box_review": []}]
    assert resolved_setting("data.smear_sources", new, None) == old
    kept = [{**new[0], "box_review": ["r.csv"]}]
    assert resolved_setting("data.smear_sources", kept, None) == kept
