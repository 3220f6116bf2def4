"""COCO annotations whose mask cannot be a training target (audit s52 M1, S5).

A polygon of an odd number of coordinates or outside the image decoded to an empty
mask, and a polygon far from its box was kept: segment_train trained on them with no
warning. A polygon of 2 points stopped the run with pycocotools' internal message
and refused the whole file. Each is now one annotation left out with a warning naming
the file and ``annotations[k]``, listed in ``rejects.csv`` (field ``segmentation``).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from segmentation.datasets import Skip, read_coco

S = 96


def _coco(tmp_path: Path, segs: dict[int, object]) -> Path:
    """6 images, one 24 px white cell each at (30 + 6k, 40); annotation k's
    segmentation replaced by ``segs[k]``."""
    images, anns = [], []
    for k in range(6):
        cx, cy = 30 + 6 * k, 40
        Image.new("RGB", (S, S), (230, 200, 200)).save(tmp_path / f"s{k}.png")
        images.append({"id": k + 1, "file_name": f"s{k}.png", "width": S, "height": S})
        poly = [cx - 12, cy, cx, cy - 12, cx + 12, cy, cx, cy + 12]
        anns.append(
            {
                "id": k + 1,
                "image_id": k + 1,
                "category_id": 1,
                "bbox": [cx - 12, cy - 12, 24, 24],
                "iscrowd": 0,
                "segmentation": segs.get(k, [poly]),
            }
        )
    p = tmp_path / "annotations.json"
    cats = [{"id": 1, "name": "wbc"}]
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return p


def _kept(ds) -> int:
    return sum(len(r.instances) for r in ds)


def test_empty_and_misplaced_masks_are_left_out_and_listed(tmp_path, caplog):
    p = _coco(
        tmp_path,
        {
            0: [[10, 10, 20, 20, 30]],  # odd number of coordinates: 0 pixels
            1: [[500, 500, 524, 500, 524, 524]],  # outside the image (its box is inside)
            2: [[70, 70, 90, 70, 90, 90, 70, 90]],  # far from its box (24-48, 28-52)
        },
    )
    skipped: list[Skip] = []
    with caplog.at_level("WARNING"):
        ds = read_coco(p, skipped=skipped)
    assert _kept(ds) == 3
    assert "annotations.json: 3 annotation(s) left out" in caplog.text
    # an odd number of coordinates: 2 points (S5's message, was "mask is empty")
    assert "annotations[0]: polygon with 2 point(s), 5 coordinates" in caplog.text
    assert "annotations[1]: mask is empty" in caplog.text
    assert "annotations[2]: mask lies outside its bbox" in caplog.text
    assert [k.field for k in skipped] == ["segmentation"] * 3
    assert [k.path.name for k in skipped] == ["s0.png", "s1.png", "s2.png"]
    assert all(str(p) in k.reason for k in skipped)
    # without a list to record into, the reader still leaves them out (and warns)
    assert _kept(read_coco(p)) == 3


def test_a_mask_slightly_beyond_its_box_is_kept(tmp_path):
    """A box drawn a little tighter than the polygon is an ordinary annotation."""
    p = _coco(tmp_path, {0: [[16, 40, 30, 26, 44, 40, 30, 54]]})  # box 18-42 x 28-52
    assert _kept(read_coco(p, skipped=[])) == 6


def test_stage_rejects_list_the_left_out_annotations(tmp_path):
    from pipeline.stages.segment_train import load_sets
    from tests.helpers.run import compose_config

    p = _coco(tmp_path, {0: [[10, 10, 20, 20, 30]], 3: [[70, 70, 90, 70, 90, 90, 70, 90]]})
    src = f"{{format: coco, path: '{p}', name: lab, scale: 1.0, val_splits: []}}"
    cfg = compose_config(
        [
            "stage=segment_train",
            "data=bccd",
            f"paths.root={tmp_path / 'out'}",
            f"data.smear_sources=[{src}]",
        ]
    )
    rejects: list = []
    train, _, _, _ = load_sets(cfg, None, rejects)
    assert len(train) == 6 and _kept(train) == 4
    assert [(Path(r["image"]).name, r["field"], r["source"]) for r in rejects] == [
        ("s0.png", "segmentation", "lab"),
        ("s3.png", "segmentation", "lab"),
    ]
    assert "annotations[0]: polygon with 2 point(s)" in rejects[0]["reason"]
    assert "annotations[3]: mask lies outside its bbox" in rejects[1]["reason"]


def test_every_annotation_left_out_says_so(tmp_path):
    """All masks misplaced: the stop names the annotations left out (was: 'no
    white-cell box ... (classes found: none)', which sent one to the class names)."""
    import pytest

    from pipeline.runner import StageError
    from pipeline.stages.segment_train import load_sets
    from tests.helpers.run import compose_config

    far = [[70, 70, 90, 70, 90, 90, 70, 90]]
    p = _coco(tmp_path, {k: far for k in range(6)})
    src = f"{{format: coco, path: '{p}', name: lab, scale: 1.0, val_splits: []}}"
    cfg = compose_config(
        [
            "stage=segment_train",
            "data=bccd",
            f"paths.root={tmp_path}",
            f"data.smear_sources=[{src}]",
        ]
    )
    with pytest.raises(StageError, match=r"6 annotation\(s\) were left out .*outside its bbox"):
        load_sets(cfg, None, [])


def test_a_polygon_of_under_3_points_is_one_annotation_left_out(tmp_path, caplog):
    """[[x, y, x + 5, y + 5]] (2 points) stopped the reader with pycocotools' "Argument
    'bb' has incorrect type" and refused the whole file; now that annotation is left
    out, saying why, and the others are read."""
    p = _coco(tmp_path, {1: [[18, 28, 23, 33]], 4: [[1, 2]], 5: [[50, 30, 70, 30, 60, 50], [1, 1]]})
    skipped: list[Skip] = []
    with caplog.at_level("WARNING"):
        ds = read_coco(p, skipped=skipped)
    assert _kept(ds) == 4
    assert "annotations[1]: polygon with 2 point(s) (needs >= 3 x, y pairs)" in caplog.text
    assert "annotations[4]: polygon with 1 point(s)" in caplog.text
    # annotations[5]'s short second ring is dropped, its first ring kept (as detectron2)
    assert "rings dropped and the rest of each mask kept: annotations[5] (1 of 2)" in caplog.text
    assert [(k.path.name, k.field) for k in skipped] == [
        ("s1.png", "segmentation"),
        ("s4.png", "segmentation"),
    ]
    assert "cannot be read" not in caplog.text


def test_a_short_extra_ring_is_dropped_and_the_mask_kept(tmp_path, caplog):
    """A multi-polygon annotation with one ring of under 3 points was left out whole
    (d0abb8d); pycocotools failed only when the first ring was short, and a later short
    ring loaded with the right mask. Now, as detectron2, the short rings are dropped
    (first or later), one warning per file counts them, and only an annotation with no
    ring left is skipped."""
    sq = [24, 28, 48, 28, 48, 52, 24, 52]  # annotation 0's box: 24-48, 28-52
    p = _coco(
        tmp_path,
        {
            0: [sq, [60, 60, 61, 61]],
            1: [sq, [60, 60]],
            2: [[60, 60, 61, 61], sq],
            3: [[60, 60, 61, 61], [1, 1]],
        },
    )
    # annotations 1-3 sit 6, 12, 18 px right of the square: shift it to each box
    data = json.loads(p.read_text())
    for k in (1, 2):
        for ring in data["annotations"][k]["segmentation"]:
            if len(ring) >= 6:
                ring[0::2] = [x + 6 * k for x in ring[0::2]]
    p.write_text(json.dumps(data))
    skipped: list[Skip] = []
    with caplog.at_level("WARNING"):
        ds = read_coco(p, skipped=skipped)
    recs = {r.path.name: r for r in ds}
    for k in (0, 1, 2):
        (inst,) = recs[f"s{k}.png"].instances
        assert int(inst.decode_mask(S, S).sum()) == 576
    assert recs["s3.png"].instances == []
    assert "3 annotation(s) with polygon rings of under 3 points" in caplog.text
    assert "annotations[0] (1 of 2); annotations[1] (1 of 2); annotations[2] (1 of 2)" in (
        caplog.text
    )
    assert str(p) in caplog.text
    assert "annotations[3]: all 2 polygons have under 3 points" in caplog.text
    assert [(k.path.name, k.field) for k in skipped] == [("s3.png", "segmentation")]


def test_point_pair_rings_are_not_judged_as_short_polygons(tmp_path):
    """``[[x, y], ...]`` point pairs (LabelMe style) were read as a ring of 3 or 4 items,
    said to be "polygon with 1 point(s), 3 coordinates" and skipped; the reader's own
    error naming the field is raised again, as before d0abb8d."""
    import pytest

    from segmentation.datasets import AnnotationError

    for pairs in (
        [[[24, 28], [48, 28], [48, 52]]],
        [[[24, 28], [48, 28], [48, 52], [24, 52]]],
    ):
        p = _coco(tmp_path, {0: pairs})
        with pytest.raises(AnnotationError, match=r"annotations\[0\]: field 'segmentation'"):
            read_coco(p, skipped=[])


def _load_sets_error(tmp_path, p: Path, extra: str = "") -> str:
    import pytest

    from pipeline.runner import StageError
    from pipeline.stages.segment_train import load_sets
    from tests.helpers.run import compose_config

    src = f"{{format: coco, path: '{p}', name: lab, scale: 1.0, val_splits: []{extra}}}"
    cfg = compose_config(
        [
            "stage=segment_train",
            "data=bccd",
            f"paths.root={tmp_path / 'out'}",
            f"data.smear_sources=[{src}]",
        ]
    )
    with pytest.raises(StageError) as e:
        load_sets(cfg, None, [])
    return str(e.value)


def _rename_category(p: Path, name: str) -> None:
    d = json.loads(p.read_text())
    d["categories"] = [{"id": 1, "name": name}]
    p.write_text(json.dumps(d))


def test_a_bad_annotation_of_another_class_keeps_the_class_advice(tmp_path):
    """Classes named neutrophil (no wbc_classes) and one annotation with an empty mask:
    the stop said to fix the bbox / segmentation fields (33dea8e), though the class
    names are what is wrong; it lists the classes found again, and counts the
    annotation left out."""
    p = _coco(tmp_path, {0: [[500, 500, 524, 500, 524, 524]]})
    _rename_category(p, "neutrophil")
    msg = _load_sets_error(tmp_path, p)
    assert "classes found: neutrophil 5) (1 annotation(s) were also left out)" in msg
    assert "wbc_classes=[neutrophil]" in msg
    assert "fix their bbox" not in msg


def test_white_cell_annotations_left_out_of_a_wbc_class_say_so(tmp_path):
    """Every annotation of a class named white by wbc_classes left out (mask far from
    its box): the stop names the annotations left out, not the classes."""
    far = [[70, 70, 90, 70, 90, 90, 70, 90]]
    p = _coco(tmp_path, {k: far for k in range(6)})
    _rename_category(p, "Neutrophil")
    msg = _load_sets_error(tmp_path, p, ", wbc_classes: [neutrophil]")
    assert "6 annotation(s) were left out" in msg and "fix their bbox" in msg
    assert "classes found" not in msg


def test_crowd_annotations_are_said_not_trained_on(tmp_path, caplog):
    """iscrowd=1 regions were left out of training without a word; one line per file
    now counts them (they are not rejects: COCO marks them as no single object)."""
    import logging

    p = _coco(tmp_path, {})
    data = json.loads(p.read_text())
    for a in data["annotations"][:2]:
        a["iscrowd"] = 1
    p.write_text(json.dumps(data))
    skipped: list[Skip] = []
    with caplog.at_level(logging.INFO, logger="segmentation.datasets"):
        ds = read_coco(p, skipped=skipped)
    assert _kept(ds) == 4 and skipped == []
    said = [r.getMessage() for r in caplog.records if "crowd" in r.getMessage()]
    assert len(said) == 1 and "2 crowd annotation(s) (iscrowd=1) not trained on" in said[0]
