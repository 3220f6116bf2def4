"""Readers, augmentation, pseudo-masks and copy-paste of the segmentation data path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segmentation.copy_paste import CopyPaste
from segmentation.datasets import (
    MASK_UNKNOWN,
    AnnotationError,
    DetectionDataset,
    ImageRecord,
    Instance,
    SmearDataset,
    auto_scale,
    encode_mask,
    load_sample,
    mask_bbox,
    read_coco,
    read_mask_pngs,
    read_voc,
    read_yolo,
    to_coco,
    with_scale,
)
from segmentation.pseudomask import PseudoMasker, ellipse_in_box, pseudo_mask_in_box
from segmentation.transforms import AugmentOptions, boxes_match_masks, build_train_transform

VOC_XML = """<annotation><filename>a.jpg</filename>
<size><width>64</width><height>48</height><depth>3</depth></size>
<object><name>WBC</name><truncated>0</truncated>
<bndbox><xmin>10</xmin><ymin>5</ymin><xmax>30</xmax><ymax>25</ymax></bndbox></object>
<object><name>RBC</name><truncated>1</truncated>
<bndbox><xmin>40</xmin><ymin>30</ymin><xmax>70</xmax><ymax>48</ymax></bndbox></object>
</annotation>"""


def _img(path, w, h, color=(230, 200, 200)):
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = color
    Image.fromarray(a).save(path)


def test_read_voc_exact_boxes_and_split(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations" / "a.xml").write_text(VOC_XML)
    _img(root / "JPEGImages" / "a.jpg", 64, 48)
    (root / "ImageSets" / "Main" / "test.txt").write_text("a\n")
    ds = read_voc(root, splits=["test"], source="bccd")
    assert len(ds) == 1
    rec = ds.images[0]
    assert (rec.width, rec.height, rec.split, rec.source) == (64, 48, "test", "bccd")
    assert [a.category for a in rec.instances] == ["wbc", "rbc"]
    assert rec.instances[0].bbox == (10.0, 5.0, 30.0, 25.0)
    assert rec.instances[1].bbox == (40.0, 30.0, 64.0, 48.0)  # clipped to the image
    assert rec.instances[1].extra["truncated"] is True
    assert rec.wbcs[0].mask is None


def test_read_voc_missing_split_file_names_it(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    with pytest.raises(AnnotationError, match="val.txt"):
        read_voc(root, splits=["val"])


def _yolo_folder(tmp_path, classes: str, w: int, h: int):
    """A YOLO folder with one train image x.jpg (w x h); returns (root, its label file)."""
    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "classes.txt").write_text(classes)
    _img(root / "images" / "train" / "x.jpg", w, h)
    return root, root / "labels" / "train" / "x.txt"


def test_read_yolo_exact_boxes(tmp_path):
    root, lab = _yolo_folder(tmp_path, "WBC\nRBC\nPlatelet\n", 100, 50)
    lab.write_text("0 0.5 0.5 0.2 0.4\n2 0.1 0.1 0.1 0.2\n")
    ds = read_yolo(root, splits=["train"])
    rec = ds.images[0]
    assert [a.category for a in rec.instances] == ["wbc", "platelet"]
    np.testing.assert_allclose(rec.instances[0].bbox, (40.0, 15.0, 60.0, 35.0))
    np.testing.assert_allclose(rec.instances[1].bbox, (5.0, 0.0, 15.0, 10.0))


def test_read_yolo_bad_line_names_file_and_line(tmp_path):
    root, lab = _yolo_folder(tmp_path, "WBC\n", 10, 10)
    lab.write_text("0 0.5 0.5 0.2 0.4\n5 0.5 0.5 0.1 0.1\n")
    with pytest.raises(AnnotationError, match=r"x.txt: line 2"):
        read_yolo(root, splits=["train"])


def test_read_mask_png_whole_cell_is_mask_above_zero(tmp_path):
    d = tmp_path / "dataset1"
    d.mkdir()
    m = np.zeros((20, 30), np.uint8)
    m[4:14, 6:20] = 128  # cytoplasm
    m[7:10, 9:12] = 255  # nucleus
    Image.fromarray(m).save(d / "001.png")
    _img(d / "001.bmp", 30, 20)
    (tmp_path / "dataset1_labels.csv").write_text("image ID,class label\n1,3\n")
    ds = read_mask_pngs(tmp_path, val_fraction=0.0)
    rec = ds.images[0]
    inst = rec.instances[0]
    assert inst.bbox == (6.0, 4.0, 20.0, 14.0)
    np.testing.assert_array_equal(inst.decode_mask(20, 30), m > 0)
    assert inst.extra["label"] == "3"
    np.testing.assert_array_equal(mask_utils.decode(inst.extra["nucleus"]).astype(bool), m == 255)


def test_read_coco_rle_and_polygon(tmp_path):
    m = np.zeros((16, 16), bool)
    m[2:6, 3:9] = True
    data = {
        "images": [{"id": 7, "file_name": "a.png", "width": 16, "height": 16, "split": "val"}],
        "categories": [{"id": 1, "name": "wbc"}, {"id": 2, "name": "RBC"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 1,
                "bbox": [3, 2, 6, 4],
                "segmentation": encode_mask(m),
                "iscrowd": 0,
                "kind": "band",
                "t": 0.5,
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 1,
                "bbox": [10, 10, 4, 4],
                "segmentation": [[10, 10, 14, 10, 14, 14, 10, 14]],
                "iscrowd": 0,
            },
            {"id": 3, "image_id": 7, "category_id": 2, "bbox": [0, 0, 2, 2], "iscrowd": 0},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    _img(tmp_path / "a.png", 16, 16)
    ds = read_coco(tmp_path / "ann.json")
    rec = ds.images[0]
    assert rec.split == "val" and rec.image_id == 7
    assert [a.category for a in rec.instances] == ["wbc", "wbc", "rbc"]
    a0, a1 = rec.wbcs
    assert a0.bbox == (3.0, 2.0, 9.0, 6.0)
    np.testing.assert_array_equal(a0.decode_mask(16, 16), m)
    assert a0.extra == {"kind": "band", "t": 0.5}
    assert mask_bbox(a1.decode_mask(16, 16)) == (10.0, 10.0, 14.0, 14.0)
    assert rec.instances[2].mask is None


def test_read_coco_missing_field_names_file(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(AnnotationError, match="ann.json: missing top-level field 'annotations'"):
        read_coco(tmp_path / "ann.json")


def _masked_record(tmp_path, size=64):
    img = np.full((size, size, 3), 220, np.uint8)
    m1 = np.zeros((size, size), bool)
    m1[5:20, 8:30] = True
    m2 = np.zeros((size, size), bool)
    m2[35:60, 30:50] = True
    img[m1] = (120, 60, 160)
    img[m2] = (100, 50, 150)
    Image.fromarray(img).save(tmp_path / "s.png")
    rec = ImageRecord(
        path=tmp_path / "s.png",
        width=size,
        height=size,
        instances=[
            Instance(bbox=mask_bbox(m1), mask=encode_mask(m1)),
            Instance(bbox=mask_bbox(m2), mask=encode_mask(m2)),
            Instance(bbox=(40.0, 2.0, 60.0, 22.0)),  # box only
            Instance(bbox=(0.0, 40.0, 10.0, 50.0), category="rbc"),
        ],
    )
    return rec, m1, m2


def test_load_sample_modes_and_scale(tmp_path):
    rec, m1, _ = _masked_record(tmp_path)
    s = load_sample(rec, "ignore")
    assert s.boxes.shape == (3, 4) and s.masks.shape == (3, 64, 64)
    assert s.has_mask.tolist() == [True, True, False]
    assert (s.masks[2] == MASK_UNKNOWN).all()
    np.testing.assert_array_equal(s.masks[0], m1)
    sb = load_sample(rec, "box")
    assert sb.masks[2].sum() == 20 * 20 and sb.has_mask.all()
    rec.scale = 0.5
    sh = load_sample(rec, "ignore")
    assert sh.image.shape == (32, 32, 3) and sh.masks.shape == (3, 32, 32)
    np.testing.assert_allclose(sh.boxes[0], np.array(mask_bbox(m1)) * 0.5)


def test_augmentation_keeps_boxes_and_masks_aligned(tmp_path):
    rec, _, _ = _masked_record(tmp_path)
    s = load_sample(rec, "ignore")
    aug = build_train_transform(AugmentOptions(scale_range=(0.7, 1.4), crop_size=48))
    seen_rot = False
    for seed in range(25):
        out = aug(s, seed)
        assert out.masks.shape[1:] == out.image.shape[:2] == (48, 48)
        assert len(out.boxes) == len(out.masks) == len(out.has_mask)
        # box of every masked instance == bbox of its transformed mask, exactly
        assert boxes_match_masks(out.boxes, out.masks, out.has_mask)
        for b, m, h in zip(out.boxes, out.masks, out.has_mask):
            if h:
                assert set(np.unique(m)) <= {0, 1}
            else:
                assert (m == MASK_UNKNOWN).all() and b[2] > b[0] and b[3] > b[1]
        seen_rot |= out.image.shape == (48, 48, 3)
    # same seed -> same result (what makes resume exact)
    a, b = aug(s, 3), aug(s, 3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)


def test_border_crop_cuts_cells_and_keeps_their_cut_boxes():
    """aug_border_crop: the field shrinks without resizing, a cell at the new edge stays
    an instance with its cut box (== bbox of its cut mask), as annotators box cut cells."""
    from segmentation.datasets import Sample

    img = np.full((100, 100, 3), 200, np.uint8)
    m = np.zeros((2, 100, 100), np.uint8)
    m[0, 5:45, 5:45] = 1
    m[1, 55:95, 55:95] = 1
    s = Sample(
        image=img,
        boxes=np.array([[5, 5, 45, 45], [55, 55, 95, 95]], np.float32),
        masks=m,
        has_mask=np.array([True, True]),
    )
    opt = AugmentOptions(
        flips=False, rot90=False, scale_range=(1.0, 1.0), border_crop=0.3,
        color_jitter=0, stain_jitter=0, blur_p=0, noise_p=0,
    )  # fmt: skip
    aug = build_train_transform(opt)
    n_cropped = n_cut = 0
    for seed in range(40):
        out = aug(s, seed)
        h, w = out.image.shape[:2]
        assert 40 <= h <= 100 and 40 <= w <= 100  # at most 30 % from each side, no resize
        assert boxes_match_masks(out.boxes, out.masks, out.has_mask)
        n_cropped += (h, w) != (100, 100)
        # every kept box lies inside the new field; a cell cut by it has a smaller box
        assert (out.boxes[:, [0, 1]] >= 0).all() and (out.boxes[:, 2] <= w).all()
        assert (out.boxes[:, 3] <= h).all()
        sides = np.minimum(out.boxes[:, 2] - out.boxes[:, 0], out.boxes[:, 3] - out.boxes[:, 1])
        n_cut += int((sides < 40).sum())
    assert 10 <= n_cropped <= 30  # on about half of the images
    assert n_cut > 0  # cut cells are kept, not dropped
    # off by default: the field keeps its size (flips only, so the pipeline is not empty)
    opt0 = AugmentOptions(rot90=False, scale_range=(1.0, 1.0), color_jitter=0,
                          stain_jitter=0, blur_p=0, noise_p=0)  # fmt: skip
    assert build_train_transform(opt0)(s, 1).image.shape == (100, 100, 3)


def test_cut_cell_leaves_a_sliver_of_a_centred_cell_at_the_new_edge():
    """aug_cut_cell: on a field centred on one large cell (Raabin's), where border_crop
    seldom reaches the cell, the field is cut through the cell: what is left of it lies
    on the new edge, keeps its cut box (== bbox of its cut mask) and is 10-70 % of the
    whole cell's side; the field is not resized and keeps >= a quarter of each side."""
    from segmentation.datasets import Sample
    from segmentation.transforms import cut_through_cell

    img = np.full((200, 200, 3), 200, np.uint8)
    m = np.zeros((1, 200, 200), np.uint8)
    m[0, 50:150, 50:150] = 1
    s = Sample(
        image=img,
        boxes=np.array([[50, 50, 150, 150]], np.float32),
        masks=m,
        has_mask=np.array([True]),
    )
    opt = AugmentOptions(
        flips=False, rot90=False, scale_range=(1.0, 1.0), cut_cell=1.0,
        color_jitter=0, stain_jitter=0, blur_p=0, noise_p=0,
    )  # fmt: skip
    aug = build_train_transform(opt)
    kept = []
    for seed in range(30):
        out = aug(s, seed)
        h, w = out.image.shape[:2]
        assert (h == 200) != (w == 200)  # one side cut, the other whole
        assert min(h, w) >= 50  # CUT_MIN_FIELD of 200
        assert len(out.boxes) == 1 and boxes_match_masks(out.boxes, out.masks, out.has_mask)
        x0, y0, x1, y1 = out.boxes[0]
        on_edge = min(x0, y0) == 0 or x1 == w or y1 == h
        assert on_edge
        kept.append(min(x1 - x0, y1 - y0) / 100)
    assert 0.09 <= min(kept) and max(kept) <= 0.71 and max(kept) - min(kept) > 0.2
    # same seed, same cut (resume stays exact); probability 0 leaves the field whole
    np.testing.assert_array_equal(aug(s, 4).boxes, aug(s, 4).boxes)
    opt0 = AugmentOptions(flips=False, rot90=False, scale_range=(1.0, 1.0), color_jitter=0,
                          stain_jitter=0, blur_p=0, noise_p=0)  # fmt: skip
    assert build_train_transform(opt0)(s, 4).image.shape == (200, 200, 3)
    # a cell filling the field leaves no cut with a quarter of the field: unchanged
    big = Sample(image=img, boxes=np.array([[0, 0, 200, 200]], np.float32),
                 masks=np.ones((1, 200, 200), np.uint8), has_mask=np.array([True]))  # fmt: skip
    rng = np.random.default_rng(0)
    assert cut_through_cell(big, rng, keep=(0.1, 0.2)).image.shape == (200, 200, 3)
    # box-only neighbours beyond the cut are dropped, not left with an empty box
    two = Sample(
        image=img,
        boxes=np.array([[50, 50, 150, 150], [160, 10, 190, 40]], np.float32),
        masks=np.concatenate([m, np.full((1, 200, 200), MASK_UNKNOWN, np.uint8)]),
        has_mask=np.array([True, False]),
    )
    for seed in range(20):
        c = cut_through_cell(two, np.random.default_rng(seed))
        assert len(c.boxes) == len(c.masks) == len(c.has_mask) >= 1
        assert ((c.boxes[:, 2] - c.boxes[:, 0]) >= 1).all()
        assert c.masks.shape[1:] == c.image.shape[:2]


def test_flip_moves_box_exactly(tmp_path):
    rec, m1, _ = _masked_record(tmp_path)
    s = load_sample(rec, "ignore")
    import albumentations as A

    from segmentation.transforms import Augment

    flip = Augment(
        A.Compose(
            [A.HorizontalFlip(p=1.0)],
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["idx"], clip=True),
        )
    )
    out = flip(s, 0)
    np.testing.assert_array_equal(out.masks[0], m1[:, ::-1])
    np.testing.assert_allclose(out.boxes[0], (64 - 30, 5, 64 - 8, 20))
    np.testing.assert_allclose(out.boxes[2], (64 - 60, 2, 64 - 40, 22))  # box-only instance


def test_detection_dataset_target_format(tmp_path):
    rec, _, _ = _masked_record(tmp_path)
    rec.image_id = 5
    img, t = DetectionDataset([rec])[0]
    assert img.shape == (3, 64, 64) and float(img.max()) <= 1.0
    assert t["boxes"].shape == (3, 4) and t["labels"].tolist() == [1, 1, 1]
    assert t["masks"].shape == (3, 64, 64) and int(t["image_id"]) == 5


def test_to_coco_scaled_frame(tmp_path):
    rec, m1, _ = _masked_record(tmp_path)
    ds = with_scale(SmearDataset([rec]), 0.5, 40).renumber()
    coco = to_coco(ds)
    assert coco["images"][0]["width"] == 32
    assert len(coco["annotations"]) == 3  # WBCs only
    np.testing.assert_allclose(coco["annotations"][0]["bbox"], np.array([8, 5, 22, 15]) * 0.5)


def test_pseudo_mask_finds_round_cell_in_box():
    h = w = 80
    yy, xx = np.mgrid[0:h, 0:w]
    cell = (xx - 40) ** 2 + (yy - 38) ** 2 <= 20**2
    nucleus = (xx - 42) ** 2 + (yy - 36) ** 2 <= 9**2
    img = np.full((h, w, 3), (235, 210, 215), np.uint8)
    img[cell] = (190, 160, 210)
    img[nucleus] = (80, 30, 120)
    box = np.array(mask_bbox(cell))
    m, how = pseudo_mask_in_box(img, box)
    iou = (m & cell).sum() / (m | cell).sum()
    assert how == "watershed" and iou > 0.9
    e, how_e = pseudo_mask_in_box(img, box, method="ellipse")
    assert how_e == "ellipse" and (e == ellipse_in_box((h, w), box)).all()
    pm = PseudoMasker()
    out = pm(img, box[None])
    assert out.shape == (1, h, w) and pm.stats.watershed == 1


def test_copy_paste_adds_masked_cells_without_overlap(tmp_path):
    rec, _, _ = _masked_record(tmp_path)
    donor_dir = tmp_path / "d"
    donor_dir.mkdir()
    dm = np.zeros((20, 20), bool)
    dm[4:16, 5:15] = True
    dimg = np.zeros((20, 20, 3), np.uint8)
    dimg[dm] = (10, 200, 10)
    Image.fromarray(dimg).save(donor_dir / "c.png")
    donor = ImageRecord(
        path=donor_dir / "c.png",
        width=20,
        height=20,
        instances=[Instance(bbox=mask_bbox(dm), mask=encode_mask(dm))],
    )
    s = load_sample(rec, "ignore")
    cp = CopyPaste([donor], p=1.0, max_cells=3)
    out = cp(s, 1)
    n_new = len(out.boxes) - len(s.boxes)
    assert n_new >= 1
    assert boxes_match_masks(out.boxes, out.masks, out.has_mask)
    for m in out.masks[len(s.boxes) :]:
        assert m.sum() == dm.sum()
        assert (out.image[m == 1] == (10, 200, 10)).all()
    new = out.boxes[len(s.boxes) :]
    for b in new:
        for o in out.boxes:
            if o is b:
                continue
            overlap = min(b[2], o[2]) > max(b[0], o[0]) and min(b[3], o[3]) > max(b[1], o[1])
            assert not overlap or np.array_equal(o, b)


def test_oracle_scale_leaves_out_boxes_cut_by_the_edge(tmp_path):
    """A sliver of a cell cut by the image edge does not measure the cell size: the
    oracle scale comes from the whole cells (every box only when all are cut)."""
    whole = Instance(bbox=(40.0, 40.0, 80.0, 80.0))  # 40 px cell inside the field
    sliver = Instance(bbox=(0.0, 10.0, 10.0, 30.0))  # cut by the left edge
    rec = ImageRecord(path=tmp_path / "a.png", width=200, height=100, instances=[whole, sliver])
    assert auto_scale(rec, 40.0) == pytest.approx(1.0)
    # the every-box oracle (edge_px=None) takes the median of both: 40 / mean(40, 14.1)
    assert auto_scale(rec, 40.0, edge_px=None) == pytest.approx(40 / ((40 + np.sqrt(200)) / 2))
    cut_only = ImageRecord(path=tmp_path / "b.png", width=200, height=100, instances=[sliver])
    assert auto_scale(cut_only, 40.0) == pytest.approx(40 / np.sqrt(200))
    assert auto_scale(ImageRecord(path=tmp_path / "c.png", width=9, height=9), 40.0) == 1.0


def _coco(tmp_path, annotations, images=None, categories=None):
    data = {
        "images": images
        or [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in range(5)],
        "categories": categories or [{"id": 1, "name": "neutrophil"}],
        "annotations": annotations,
    }
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    return p


def test_read_coco_names_the_bad_field(tmp_path, caplog):
    """A lab's own COCO export: each malformed field is named (was a bare ValueError /
    KeyError naming neither file nor field); boxes left out are reported."""
    ok = {"id": 1, "image_id": 0, "category_id": 1, "bbox": [5, 5, 10, 10]}
    cases = [
        ({**ok, "bbox": [1, 2, 3]}, r"annotations\[0\]: bbox \[1, 2, 3\] is not \[x, y, width"),
        ({**ok, "bbox": None}, r"bbox None is not"),
        ({**ok, "image_id": 99}, r"image_id 99 is not the id of any image"),
        ({**ok, "category_id": 9}, r"category_id 9 is not the id of any category"),
        ({k: v for k, v in ok.items() if k != "bbox"}, r"missing field 'bbox'"),
    ]
    for ann, pattern in cases:
        with pytest.raises(AnnotationError, match=pattern):
            read_coco(_coco(tmp_path, [ann]))
    with pytest.raises(AnnotationError, match=r"categories\[0\] needs the fields"):
        read_coco(_coco(tmp_path, [ok], categories=[{"id": 1}]))
    twice = [{"id": 0, "file_name": "a.png", "width": 9, "height": 9}] * 2
    with pytest.raises(AnnotationError, match=r"images\[1\]: id 0 is used twice"):
        read_coco(_coco(tmp_path, [ok], images=twice))
    outside = {**ok, "id": 2, "bbox": [100, 100, 5, 5]}
    with caplog.at_level("WARNING"):
        ds = read_coco(_coco(tmp_path, [ok, outside]))
    assert sum(len(r.instances) for r in ds) == 1
    assert "1 box(es) outside the image" in caplog.text and "annotations[1]" in caplog.text


def test_read_coco_without_split_fields_holds_out_val(tmp_path):
    """An export without per-image splits: val_fraction of the images become val (the
    run had no validation at all before)."""
    p = _coco(tmp_path, [])
    assert {r.split for r in read_coco(p)} == {"train"}
    ds = read_coco(p, val_fraction=0.4, seed=0)
    assert sorted(r.split for r in ds) == ["train"] * 3 + ["val"] * 2
    assert [r.split for r in read_coco(p, val_fraction=0.4, seed=0)] == [r.split for r in ds]


def test_read_yolo_refuses_pixels_nan_and_negative_classes_and_reads_polygons(tmp_path):
    root, lab = _yolo_folder(tmp_path, "WBC\nPlatelet\n", 100, 50)
    for line, pattern in [
        ("0 50 25 20 20", "look like pixels"),
        ("0 nan 0.5 0.1 0.1", "not a number"),
        ("-1 0.5 0.5 0.1 0.1", "0 <= cls < 2"),
        ("0 0.1 0.1 0.2 0.2 0.3", "expected 4"),
    ]:
        lab.write_text(line + "\n")
        with pytest.raises(AnnotationError, match=pattern):
            read_yolo(root, splits=["train"])
    lab.write_text("0 0.1 0.2 0.5 0.2 0.3 0.8\n")  # YOLO-seg polygon: its box
    (inst,) = read_yolo(root, splits=["train"]).images[0].instances
    np.testing.assert_allclose(inst.bbox, (10.0, 10.0, 50.0, 40.0))


def test_per_image_scale_of_an_image_without_white_cells_is_its_folders_median(tmp_path):
    recs = [
        ImageRecord(path=tmp_path / f"{i}.png", width=200, height=200, instances=[Instance(b)])
        for i, b in enumerate([(10, 10, 90, 90), (10, 10, 110, 110), (10, 10, 130, 130)])
    ]
    recs.append(ImageRecord(path=tmp_path / "empty.png", width=200, height=200))
    ds = with_scale(SmearDataset(recs), None, 40.0)
    assert [round(r.scale, 3) for r in ds] == [0.5, 0.4, round(40 / 120, 3), 0.4]


def test_read_mask_png_names_png_images_and_empty_masks(tmp_path, caplog):
    """PNG images beside PNG masks cannot pair (both are <stem>.png): said so, not 'no
    training images' later; an all-zero mask's image is left out with a warning."""
    d = tmp_path / "a"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "001.png")
    with pytest.raises(AnnotationError, match="cannot be PNGs"):
        read_mask_pngs(tmp_path)
    _img(d / "001.bmp", 8, 8)
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:5] = 255
    _img(d / "002.bmp", 8, 8)
    Image.fromarray(m).save(d / "002.png")
    with caplog.at_level("WARNING"):
        ds = read_mask_pngs(tmp_path, val_fraction=0.0)
    assert [r.path.name for r in ds] == ["002.bmp"]
    assert "1 mask(s) without any cell pixel" in caplog.text and "001.png" in caplog.text


def test_coco_rle_reads_every_segmentation_form_alike():
    """segmentation.io.coco_rle / decode_coco_mask: polygons, uncompressed RLE (CVAT's
    iscrowd export) and compressed RLE (str or bytes counts) give one mask; anything
    else is a TypeError naming its type."""
    from pycocotools import mask as mask_utils

    from segmentation.io import coco_rle, decode_coco_mask

    h, w = 12, 10
    m = np.zeros((h, w), bool)
    m[2:7, 3:9] = True
    col = m.ravel(order="F")  # COCO counts run down the columns
    runs, cur, n = [], False, 0
    for v in col:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    uncompressed = {"size": [h, w], "counts": runs}
    compressed = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    polygon = [[3.0, 2.0, 9.0, 2.0, 9.0, 7.0, 3.0, 7.0]]
    for seg in (uncompressed, compressed, {**compressed, "counts": compressed["counts"].decode()}):
        rle = coco_rle(seg, h, w)
        assert isinstance(rle["counts"], str) and rle["size"] == [h, w]
        np.testing.assert_array_equal(decode_coco_mask(seg, h, w), m)
    poly = decode_coco_mask(polygon, h, w)
    assert (poly & m).sum() / (poly | m).sum() > 0.6  # pycocotools rasterises the edges
    assert coco_rle([], h, w) is None and not decode_coco_mask(None, h, w).any()
    with pytest.raises(TypeError, match="unsupported type str"):
        coco_rle("RLE", h, w)
