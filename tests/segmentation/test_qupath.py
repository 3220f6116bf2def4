"""Kept cells as QuPath GeoJSON objects (segmentation/qupath.py, ``qupath/`` of
stage=segment and stage=embed): each outline lies on its cell in the image's own pixels,
also on a slide read window by window, with its class, colour and numbers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk
from skimage.draw import polygon as fill_polygon

from segmentation.qupath import cell_features, cell_outline, write_image_files


def _filled(ring: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The source pixels whose centres (x + 0.5, y + 0.5) lie inside ``ring``."""
    rr, cc = fill_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape)
    out = np.zeros(shape, bool)
    out[rr, cc] = True
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("x0, y0, side", [(40.0, 30.0, 64.0), (-10.0, 50.0, 128.0)])
def test_the_outline_lies_on_the_cell_in_source_pixels(x0, y0, side):
    """A disc cut into a 64 px crop (at the crop's own zoom, also a crop padded past the
    image edge) traces back onto the disc in the source frame."""
    shape = (260, 260)
    cy, cx, r = y0 + side / 2, x0 + side / 2, side / 3
    truth = np.zeros(shape, bool)
    truth[disk((cy, cx), r, shape=shape)] = True
    s = 64
    k = side / s  # source px per crop px
    jj, ii = np.meshgrid(np.arange(s), np.arange(s))
    mask = (x0 + (jj + 0.5) * k - cx) ** 2 + (y0 + (ii + 0.5) * k - cy) ** 2 < r**2
    ring = cell_outline(mask, x0, y0, side)
    assert ring is not None and ring.shape[1] == 2 and (ring[0] == ring[-1]).all()
    assert _iou(_filled(ring, shape), truth) > 0.95
    assert len(ring) < 100  # simplified: not one vertex per boundary pixel


def test_no_outline_without_a_mask_or_a_place():
    m = np.zeros((32, 32), bool)
    assert cell_outline(m, 0, 0, 32) is None
    m[8:20, 8:20] = True
    assert cell_outline(m, np.nan, 0, 32) is None
    assert cell_outline(m, 0, 0, 32) is not None


def test_features_carry_class_colour_and_numbers_as_strict_json(tmp_path):
    m = np.zeros((3, 16, 16), bool)
    m[:, 4:12, 4:12] = True
    m[2] = False  # no mask: counted, not written
    obs = pd.DataFrame(
        {
            "crop_x0": [0.0, 100.0, 5.0],
            "crop_y0": [0.0, 50.0, 5.0],
            "crop_side": [16.0, 32.0, 16.0],
            "vae_call": ["myelocyte", "", "band"],
            "score": [0.9, np.nan, 0.8],
            "vae_maturation": [0.4, 0.7, 0.1],
        },
        index=["a_d000", "a_d001", "b_d000"],
    )
    colours = {"myelocyte": "#782d4b"}
    feats, skipped = cell_features(obs, m, "vae_call", colours, ["score", "vae_maturation"])
    assert skipped == 1 and len(feats) == 2
    p0, p1 = feats[0]["properties"], feats[1]["properties"]
    assert p0["objectType"] == "detection" and p0["name"] == "a_d000"
    assert p0["classification"] == {"name": "myelocyte", "color": [120, 45, 75]}
    assert p0["measurements"] == {"score": 0.9, "vae_maturation": 0.4}
    assert "classification" not in p1  # a blank class: none, not ""
    assert p1["measurements"] == {"vae_maturation": 0.7}  # NaN left out
    xs = np.array(feats[1]["geometry"]["coordinates"][0])[:, 0]
    assert 100 + 8 <= xs.min() and xs.max() <= 100 + 24  # crop px 4..12 at 2 source px each
    n, skipped = write_image_files(
        tmp_path / "q", obs, m, ["p1/a", "p1/a", "p1/b"], "vae_call", colours, ["score"]
    )
    assert (n, skipped) == (1, 1)  # b's one cell has no outline: no file
    doc = json.loads((tmp_path / "q" / "p1" / "a.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    with pytest.raises(ValueError, match="3 cells but 2 masks"):
        cell_features(obs, m[:2])
    with pytest.raises(ValueError, match="crop_side"):
        cell_features(obs.drop(columns="crop_side"), m)


def test_segment_writes_each_images_outlines_on_its_cells(tmp_path, monkeypatch):
    """stage=segment on a slide read window by window: one qupath/<stem>.geojson whose
    outlines, in slide px, cover the cells of the slide read whole (its label TIFF)."""
    from skimage import io as skio

    import pipeline.stages.segment as seg
    from tests.helpers.seg_synth import untrained_checkpoint
    from tests.segmentation.test_seg_infer import _Blobs, _run_segment
    from tests.segmentation.test_slides import _disc_slide

    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: _Blobs())
    ckpt = untrained_checkpoint(tmp_path / "model.pt")
    slide, centres = _disc_slide(tmp_path / "smears" / "slide.tif")
    whole = _run_segment(
        tmp_path / "whole", ckpt, slide.parent, "segmentation.border_margin=2", here=True
    )
    win = _run_segment(
        tmp_path / "win",
        ckpt,
        slide.parent,
        "segmentation.border_margin=2",
        "segmentation.slide_megapixels=0.1",
        "segmentation.slide_window=300",
        "segmentation.slide_overlap=96",
        here=True,
    )
    labels = skio.imread(whole / "masks" / "slide.tif")
    doc = json.loads((win / "qupath" / "slide.geojson").read_text())
    assert [p.name for p in (win / "qupath").iterdir()] == ["slide.geojson"]
    assert len(doc["features"]) == len(centres)
    ious = []
    for f in doc["features"]:
        cell = _filled(np.array(f["geometry"]["coordinates"][0]), labels.shape)
        under = np.bincount(labels[cell]).argmax()  # the whole read's label it covers
        assert under > 0
        ious.append(_iou(cell, labels == under))
    assert min(ious) > 0.8 and np.median(ious) > 0.9, ious


def test_embed_names_each_images_file_by_its_sample():
    from pipeline.stages.embed import qupath_file_names

    obs = pd.DataFrame(
        {
            "vae_sample": ["p1", "p1", "p1", "p2", "a/b"],
            "image": ["x.png", "x.jpg", "y.tif", "x.png", "z.png"],
        }
    )
    assert qupath_file_names(obs) == ["p1/x_png", "p1/x_jpg", "p1/y", "p2/x", "a_b/z"]


def test_outlines_reviewed_in_qupath_train_the_detector(tmp_path, monkeypatch):
    """The way back: stage=segment's qupath/ files beside their smears are read as
    training data (data.smear_sources format geojson), each cell's mask the cell of the
    label TIFF (IoU > 0.9); load_sets holds a folder's val share out."""
    from PIL import Image
    from skimage import io as skio

    import pipeline.stages.segment as seg
    from pipeline.stages.segment_train import load_sets
    from segmentation.datasets import read_geojson
    from tests.helpers.run import compose_config
    from tests.helpers.seg_synth import untrained_checkpoint
    from tests.segmentation.test_seg_infer import _Blobs, _run_segment

    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: _Blobs())
    smears = tmp_path / "smears"
    smears.mkdir()
    for k in range(5):
        img = np.full((120, 160, 3), (230, 205, 205), np.uint8)
        for cy, cx in ((40, 40 + 10 * k), (80, 110)):
            img[disk((cy, cx), 14, shape=img.shape[:2])] = (110, 60, 150)
        Image.fromarray(img).save(smears / f"s{k}.png")
    ckpt = untrained_checkpoint(tmp_path / "model.pt")
    out = _run_segment(tmp_path, ckpt, smears, "segmentation.border_margin=2", here=True)
    review = tmp_path / "review"
    review.mkdir()
    for g in (out / "qupath").glob("*.geojson"):  # as a reviewer keeps them, by the images
        (review / g.name).write_bytes(g.read_bytes())
        (review / f"{g.stem}.png").write_bytes((smears / f"{g.stem}.png").read_bytes())
    ds = read_geojson(review, val_fraction=0.2)
    assert len(ds) == 5 and sum(r.split == "val" for r in ds) == 1
    for r in ds:
        labels = skio.imread(out / "masks" / f"{r.path.stem}.tif")
        assert len(r.instances) == 2 and {a.category for a in r.instances} == {"wbc"}
        for a in r.instances:
            m = a.decode_mask(r.height, r.width)
            assert _iou(m, labels == np.bincount(labels[m]).argmax()) > 0.9
    src = f"{{format: geojson, path: '{review}', name: reviewed, scale: 1.0}}"
    cfg = compose_config(
        ["stage=segment_train", "data=bccd", f"paths.root={tmp_path / 'o'}"]
        + [f"data.smear_sources=[{src}]"]
    )
    train, val, _, _ = load_sets(cfg, None)
    assert len(train) == 4 and len(val["reviewed"]) == 1


def test_geojson_annotations_classes_holes_and_bad_files(tmp_path, caplog):
    """Classes become categories (aliases: 'Leukocyte' -> wbc), a hole is left out of
    its mask, points and lines are counted and left out, a broken file is a Skip naming
    the file and field, a .geojson without its image is said."""
    from PIL import Image

    from segmentation.datasets import AnnotationError, Skip, read_geojson

    Image.new("RGB", (60, 50), (230, 200, 200)).save(tmp_path / "a.jpg")
    Image.new("RGB", (60, 50), (230, 200, 200)).save(tmp_path / "b.jpg")
    Image.new("RGB", (60, 50), (230, 200, 200)).save(tmp_path / "c [1].jpg")  # glob chars
    Image.new("RGB", (60, 50), (230, 200, 200)).save(tmp_path / "a.v2.jpg")  # not a's
    square3d = [[x, y, 7.0] for x, y in [[5, 5], [25, 5], [25, 25], [5, 25], [5, 5]]]
    doc3d = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square3d]}}
    (tmp_path / "c [1].geojson").write_text(json.dumps(doc3d))  # one Feature, x y z
    square = [[10, 10], [40, 10], [40, 40], [10, 40], [10, 10]]
    hole = [[20, 20], [30, 20], [30, 30], [20, 30], [20, 20]]
    feats = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square, hole]},
         "properties": {"classification": {"name": "Leukocyte"}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon",
         "coordinates": [[[[45, 5], [55, 5], [55, 15], [45, 15], [45, 5]]]]},
         "properties": {"classification": {"name": "Myelocyte"}, "name": "c2"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}},
    ]  # fmt: skip
    (tmp_path / "a.geojson").write_text(json.dumps(feats))  # a bare list (older QuPath)
    (tmp_path / "b.geojson").write_text('{"type": "FeatureCollection", "features": [')
    (tmp_path / "orphan.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    skipped: list[Skip] = []
    with caplog.at_level("WARNING"):
        ds = read_geojson(tmp_path, val_fraction=0.0, skipped=skipped)
    rec, rec3d = sorted(ds.images, key=lambda r: r.path.name)
    assert rec.path.name == "a.jpg" and rec3d.path.name == "c [1].jpg"
    (square,) = rec3d.instances
    assert square.bbox == (5.0, 5.0, 25.0, 25.0) and square.decode_mask(50, 60).sum() == 400
    cell, myelo = rec.instances
    assert cell.category == "wbc" and cell.extra["label"] == "Leukocyte"
    m = cell.decode_mask(50, 60)
    assert m[15, 15] and not m[25, 25] and m.sum() == 30 * 30 - 10 * 10
    assert cell.bbox == (10.0, 10.0, 40.0, 40.0)
    assert myelo.category == "myelocyte" and myelo.extra["name"] == "c2"
    assert "feature 2 (Point)" in caplog.text and "orphan.geojson" in caplog.text
    assert [(s.path.name, s.field) for s in skipped] == [("b.geojson", "annotation")]
    assert "not readable GeoJSON" in skipped[0].reason
    with pytest.raises(AnnotationError, match="no .geojson files"):
        read_geojson(tmp_path / "empty_folder")


def test_twin_images_with_rejected_cells_have_their_own_ids_and_files(tmp_path, monkeypatch):
    """cell.png beside cell.jpg, each with a cell the filters drop: the run stopped with a
    KeyError drawing rejects.png (the twins' ids were one); now ids, label TIFFs and
    QuPath files are <stem>_<ext>, and the geojson reader finds each one's image."""
    import anndata as ad
    from PIL import Image

    import pipeline.stages.segment as seg
    from segmentation.datasets import read_geojson
    from tests.helpers.seg_synth import untrained_checkpoint
    from tests.segmentation.test_seg_infer import _Blobs, _run_segment

    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: _Blobs())
    smears = tmp_path / "smears"
    smears.mkdir()
    for ext, cx in (("png", 60), ("jpg", 90)):
        img = np.full((120, 160, 3), (230, 205, 205), np.uint8)
        img[disk((60, cx), 14, shape=img.shape[:2])] = (110, 60, 150)
        img[disk((3, 3), 8, shape=img.shape[:2])] = (110, 60, 150)  # cut by the edge: dropped
        Image.fromarray(img).save(smears / f"cell.{ext}", quality=95)
    ckpt = untrained_checkpoint(tmp_path / "model.pt")
    out = _run_segment(tmp_path, ckpt, smears, "segmentation.border_margin=2", here=True)
    a = ad.read_h5ad(out / "cells.h5ad")
    assert {n.rsplit("_d", 1)[0] for n in a.obs_names} == {"cell_jpg", "cell_png"}
    names = sorted(p.name for p in (out / "qupath").iterdir())
    assert names == ["cell_jpg.geojson", "cell_png.geojson"]
    assert (out / "rejects.png").is_file()
    for g in (out / "qupath").iterdir():  # reviewed beside the images, as named
        (smears / g.name).write_bytes(g.read_bytes())
    ds = read_geojson(smears, val_fraction=0.0)
    assert sorted(r.path.name for r in ds) == ["cell.jpg", "cell.png"]
