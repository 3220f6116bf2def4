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
