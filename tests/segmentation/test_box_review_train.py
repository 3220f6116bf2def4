"""data.smear_sources[*].box_review: reviewed boxes take their class before training.

TXL-PBC holds red cells and platelets annotated as white cells (five of 305 val boxes,
fourteen of 1055 train boxes; docs/reviews/). A source's review files relabel them as
the data are read, so the detector does not learn them as white cells; a review that
does not match the annotations is one clear error naming the setting.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

S = 96


def _coco(tmp_path: Path) -> Path:
    """4 images of 96 px, one 24 px white cell each at (30 + 6k, 40)."""
    images, anns = [], []
    for k in range(4):
        cx, cy = 30 + 6 * k, 40
        Image.new("RGB", (S, S), (230, 200, 200)).save(tmp_path / f"s{k}.png")
        images.append({"id": k + 1, "file_name": f"s{k}.png", "width": S, "height": S})
        anns.append(
            {
                "id": k + 1,
                "image_id": k + 1,
                "category_id": 1,
                "bbox": [cx - 12, cy - 12, 24, 24],
                "iscrowd": 0,
                "segmentation": [[cx - 12, cy, cx, cy - 12, cx + 12, cy, cx, cy + 12]],
            }
        )
    p = tmp_path / "ann.json"
    cats = [{"id": 1, "name": "wbc"}]
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return p


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

    ann = _coco(tmp_path)
    review = tmp_path / "review.csv"
    review.write_text(
        "image,x0,y0,x1,y1,category,note\n"
        "s1.png,24,28,48,52,rbc,a red cell\n"
        "elsewhere.png,1,1,9,9,rbc,\n"
    )
    with caplog.at_level("INFO"):
        train, _, _, _ = load_sets(_cfg(tmp_path, ann, [review]), None, [])
    assert len(train) == 4
    wbcs = {Path(r.path).name: len(r.wbcs) for r in train}
    assert wbcs == {"s0.png": 1, "s1.png": 0, "s2.png": 1, "s3.png": 1}
    s1 = next(r for r in train if Path(r.path).name == "s1.png")
    assert [a.category for a in s1.instances] == ["rbc"]
    assert "1 white-cell box(es) take their reviewed class" in caplog.text
    assert "1 name images not in this source" in caplog.text
    # no review: the annotations as published
    train0, _, _, _ = load_sets(_cfg(tmp_path, ann, []), None, [])
    assert sum(len(r.wbcs) for r in train0) == 4


def test_a_review_that_does_not_match_is_one_clear_error(tmp_path):
    from pipeline.runner import StageError
    from pipeline.stages.segment_train import load_sets

    ann = _coco(tmp_path)
    stale = tmp_path / "stale.csv"
    stale.write_text("image,x0,y0,x1,y1,category\ns1.png,60,60,90,90,rbc\n")
    with pytest.raises(StageError, match=r"box_review\[0\]: review line 2: s1\.png has no white"):
        load_sets(_cfg(tmp_path, ann, [stale]), None, [])
    with pytest.raises(StageError, match=r"box_review\[0\]=.*absent\.csv: no such file"):
        load_sets(_cfg(tmp_path, ann, [tmp_path / "absent.csv"]), None, [])
    bad = tmp_path / "bad.csv"
    bad.write_text("image,x0,y0,x1,y1\ns1.png,24,28,48,52\n")
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
