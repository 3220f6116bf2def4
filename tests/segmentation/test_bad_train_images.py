"""stage=segment_train with a bad file among its smears: left out and reported, not fatal.

A truncated JPEG, a malformed VOC XML and an XML whose image is missing used to stop
training mid-epoch (``failed: AnnotationError``, exit 1). Now each is skipped with a
warning, listed in ``rejects.csv`` and counted in ``metrics.json``; only a set with no
trainable image left stops the stage, as a user error (exit 2, one line).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmentation.datasets import (
    AnnotationError,
    DetectionDataset,
    ImageRecord,
    Instance,
    Skip,
    SmearDataset,
    drop_unreadable,
    read_voc,
)
from tests.helpers.run import ROOT, run_pipeline

SIZE = 96

# a one-epoch, light-headed detector on a few 96 px smears (a few seconds on one core)
TINY = [
    "stage=segment_train",
    "data=bccd",
    "segmentation.epochs=1",
    "segmentation.anchor_sizes=[8,16,32,64,128]",
    "segmentation.rpn_pre_nms_top_n_train=100",
    "segmentation.rpn_post_nms_top_n_train=50",
    "segmentation.box_batch_size_per_image=32",
    "segmentation.warmup_iters=1",
    "segmentation.tb_images=0",
    "segmentation.fpn_channels=32",
    "segmentation.box_representation=64",
    "segmentation.mask_head_layers=1",
    "segmentation.pretrained_weights=null",
    "hardware.torch_threads=1",
    "experiment=t",
]

XML = """<annotation><filename>{name}</filename>
<size><width>{size}</width><height>{size}</height><depth>3</depth></size>
<object><name>WBC</name><truncated>0</truncated>
<bndbox><xmin>30</xmin><ymin>30</ymin><xmax>56</xmax><ymax>56</ymax></bndbox></object>
</annotation>"""


def _smear(path: Path) -> None:
    """A pink field with one violet 'white cell' at (43, 43)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    a = np.zeros((SIZE, SIZE, 3), np.uint8)
    a[:] = (235, 205, 210)
    a[(xx - 43) ** 2 + (yy - 43) ** 2 <= 12**2] = (120, 60, 160)
    Image.fromarray(a).save(path, quality=95)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # the header stays, the pixels are cut


def make_voc(root: Path, n: int) -> Path:
    """``n`` good VOC smears s0..s{n-1} (no ImageSets: every one is ``train``)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for k in range(n):
        _smear(root / "JPEGImages" / f"s{k}.jpg")
        (root / "Annotations" / f"s{k}.xml").write_text(XML.format(name=f"s{k}.jpg", size=SIZE))
    return root


def _source(root: Path) -> str:
    return (
        f"data.smear_sources=[{{format: voc, path: '{root}', name: v, train_splits: [train], "
        f"val_splits: [], test_splits: [], scale: 1.0}}]"
    )


def _spoil(voc: Path) -> dict[str, str]:
    """A truncated JPEG, a malformed XML and an XML whose image is gone: file -> field."""
    _truncate(voc / "JPEGImages" / "s1.jpg")
    (voc / "Annotations" / "s2.xml").write_text("<annotation><filename>s2.jpg<")
    (voc / "JPEGImages" / "s3.jpg").unlink()
    return {
        str(voc / "JPEGImages" / "s1.jpg"): "image",
        str(voc / "Annotations" / "s2.xml"): "annotation",
        str(voc / "Annotations" / "s3.xml"): "annotation",
    }


def test_bad_files_are_skipped_and_listed_and_training_goes_on(tmp_path):
    voc = make_voc(tmp_path / "voc", 5)
    bad = _spoil(voc)
    root = tmp_path / "out"
    r = run_pipeline([*TINY, _source(voc), f"paths.root={root}"], cwd=ROOT, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    for f in bad:  # a warning naming each file
        assert f"skipped {f}" in out
    d = root / "t" / "segment_train"
    with (d / "rejects.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["image"]: r["field"] for r in rows} == bad
    assert all(r["action"] == "skipped" and r["source"] == "v" for r in rows)
    assert "truncated" in next(r["reason"] for r in rows if r["image"].endswith("s1.jpg"))
    m = json.loads((d / "metrics.json").read_text())
    assert m["skipped_files"] == 3 and m["train_images"] == 2
    assert json.loads((d / "manifest.json").read_text())["status"] == "complete"


def test_no_trainable_image_left_is_one_user_error(tmp_path):
    voc = make_voc(tmp_path / "voc", 2)
    _truncate(voc / "JPEGImages" / "s0.jpg")
    (voc / "Annotations" / "s1.xml").write_text("not xml")
    root = tmp_path / "out"
    r = run_pipeline([*TINY, _source(voc), f"paths.root={root}"], cwd=ROOT, timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert len(errors) == 1 and "no trainable image left" in errors[0]
    assert "s1.xml" in errors[0]  # the first file left out, and why


def test_readers_skip_into_a_list_or_raise_without_one(tmp_path):
    voc = make_voc(tmp_path / "voc", 4)
    _spoil(voc)
    skipped: list[Skip] = []
    ds = read_voc(voc, skipped=skipped)
    assert [r.path.name for r in ds] == ["s0.jpg", "s1.jpg"]  # s1 is read by the image check
    assert {(k.path.name, k.field) for k in skipped} == {
        ("s2.xml", "annotation"),
        ("s3.xml", "annotation"),
    }
    assert any("not found" in k.reason for k in skipped)
    with pytest.raises(AnnotationError, match="s2.xml: not a readable VOC XML"):
        read_voc(voc)  # called on its own: the first bad file stops it, as before
    kept = drop_unreadable(ds, skipped)
    assert [r.path.name for r in kept] == ["s0.jpg"]
    assert skipped[-1].path.name == "s1.jpg" and "truncated" in skipped[-1].reason


def test_image_check_finds_a_size_that_differs_from_the_annotation(tmp_path):
    _smear(tmp_path / "a.jpg")
    rec = ImageRecord(tmp_path / "a.jpg", SIZE + 4, SIZE, instances=[Instance((1, 1, 9, 9))])
    skipped: list[Skip] = []
    assert len(drop_unreadable(SmearDataset([rec]), skipped)) == 0
    assert f"image is {SIZE}x{SIZE} but its annotation says {SIZE + 4}x{SIZE}" in skipped[0].reason


def test_dataset_replaces_an_image_that_fails_to_load_and_records_it(tmp_path):
    for k in range(3):
        _smear(tmp_path / f"{k}.jpg")
    _truncate(tmp_path / "1.jpg")  # not checked beforehand: found when loaded
    recs = [
        ImageRecord(
            tmp_path / f"{k}.jpg",
            SIZE,
            SIZE,
            image_id=k + 1,
            instances=[Instance((30, 30, 56, 56))],
        )
        for k in range(3)
    ]
    ds = DetectionDataset(recs, skip_unreadable=True)
    img, target = ds[1]
    assert int(target["image_id"]) == 3 and img.shape == (3, SIZE, SIZE)
    assert [k.path.name for k in ds.skipped] == ["1.jpg"]
    with pytest.raises(AnnotationError, match="1.jpg"):  # off: the error stops the run
        DetectionDataset(recs)[1]
    for k in (0, 2):
        _truncate(tmp_path / f"{k}.jpg")
    with pytest.raises(AnnotationError, match="no trainable image left"):
        DetectionDataset(recs, skip_unreadable=True)[0]


def test_a_bad_annotation_is_a_user_error_not_a_crash():
    from pipeline.guards import USER_ERRORS
    from segmentation.io import ImageReadError

    assert issubclass(AnnotationError, USER_ERRORS)
    assert issubclass(ImageReadError, USER_ERRORS)


def test_a_few_images_missing_from_a_coco_file_are_skipped_many_refused(tmp_path):
    """A COCO file naming 40 images, 2 of them deleted (5 %): left out with a reject row
    each and training data built from the other 38; 3 of 40 gone (a wrong folder, more
    likely): the run stops naming the count and an example."""
    from pipeline.runner import StageError
    from pipeline.stages.segment_train import MISSING_IMAGES_SKIPPED, load_sets
    from tests.helpers.run import compose_config

    n = 40
    for i in range(n):
        Image.new("RGB", (40, 30), (230, 200, 200)).save(tmp_path / f"{i}.png")
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in range(n)],
        "categories": [{"id": 1, "name": "wbc"}],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 1, "bbox": [5, 5, 12, 12]} for i in range(n)
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    src = f"{{format: coco, path: '{tmp_path / 'ann.json'}', name: lab, scale: 1.0}}"
    cfg = compose_config(
        [
            "stage=segment_train",
            "data=bccd",
            f"paths.root={tmp_path / 'out'}",
            f"data.smear_sources=[{src}]",
        ]
    )
    assert int(MISSING_IMAGES_SKIPPED * n) == 2
    (tmp_path / "3.png").unlink()
    (tmp_path / "7.png").unlink()
    rejects: list = []
    train, val, _, _ = load_sets(cfg, None, rejects)
    kept = {Path(r.path).name for r in train} | {Path(r.path).name for v in val.values() for r in v}
    assert len(kept) == n - 2 and not kept & {"3.png", "7.png"}
    assert sorted(Path(r["image"]).name for r in rejects) == ["3.png", "7.png"]
    assert all("not there" in r["reason"] and r["source"] == "lab" for r in rejects)
    (tmp_path / "11.png").unlink()
    with pytest.raises(StageError, match=r"3 of 40 images named by .*ann.json are not there"):
        load_sets(cfg, None, [])
