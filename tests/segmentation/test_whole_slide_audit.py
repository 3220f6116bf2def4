"""Whole-slide images (the whole-slide audit): scanner TIFFs and their page order, slide
formats that are not TIFFs, codecs, the size limit's advice, memory of the resize, and
progress lines inside one large image. Small synthetic TIFFs only (tifffile)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from segmentation import io
from segmentation.io import list_images, read_rgb


def _slide(h: int = 120, w: int = 160) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _ventana_like(path, slide: np.ndarray) -> None:
    """Label first, thumbnail, then the slide (the Ventana BIF page order)."""
    with tifffile.TiffWriter(path) as t:
        t.write(np.full((40, 40, 3), 230, np.uint8), photometric="rgb", description="Label")
        t.write(slide[::2, ::2].copy(), photometric="rgb", description="Thumbnail")
        t.write(slide, tile=(32, 32), compression="zlib", photometric="rgb")


def test_too_large_advice_points_to_reading_window_by_window(tmp_path, monkeypatch):
    """A slide too large to read whole: a TIFF is read window by window unless
    slide_megapixels was raised above it (the advice says so); another format is to be
    saved as a tiled TIFF. The old advice (tile it yourself, de-duplicate the overlaps)
    left the double counts to the user."""
    tifffile.imwrite(tmp_path / "s.tif", _slide(), photometric="rgb")
    Image.fromarray(_slide()).save(tmp_path / "s.png")
    monkeypatch.setattr(io, "MAX_IMAGE_MEGAPIXELS", 0.001)
    r = read_rgb(tmp_path / "s.tif")
    assert not r.ok and r.reason.startswith("too large to read whole: 160x120 px"), r.reason
    assert "set segmentation.slide_megapixels below its size" in r.reason
    r = read_rgb(tmp_path / "s.png")
    assert not r.ok and "save it as a tiled TIFF, which is read window by window" in r.reason


def test_too_large_is_judged_on_the_slide_not_on_a_label_page(tmp_path, monkeypatch):
    _ventana_like(tmp_path / "v.tif", _slide())
    monkeypatch.setattr(io, "MAX_IMAGE_MEGAPIXELS", 0.01)  # 10000 px: the label fits
    r = read_rgb(tmp_path / "v.tif")
    assert not r.ok and "160x120 px" in r.reason


def test_label_first_tiff_reads_the_slide_and_says_which_series(tmp_path, caplog):
    """A Ventana-like TIFF was read as its 400x400 label (imageio's first page)."""
    slide = _slide()
    _ventana_like(tmp_path / "v.tif", slide)
    with caplog.at_level(logging.INFO, logger="segmentation.io"):
        r = read_rgb(tmp_path / "v.tif")
    assert r.ok and r.image.shape == (120, 160, 3)
    assert np.array_equal(r.image, slide)
    assert r.converted[0].startswith("tiff series 3 of 3 (160x120 px")
    assert "40x40" in r.converted[0] and "tiff series 3 of 3" in caplog.text


def test_pyramids_and_aperio_order_still_read_full_resolution(tmp_path):
    slide = _slide()
    half = np.ascontiguousarray(slide[::2, ::2])
    with tifffile.TiffWriter(tmp_path / "sub.tif") as t:  # levels in SubIFDs
        t.write(slide, tile=(32, 32), subifds=1, photometric="rgb")
        t.write(half, tile=(32, 32), subfiletype=1, photometric="rgb")
    with tifffile.TiffWriter(tmp_path / "aperio.tif") as t:  # slide, thumbnail, label
        t.write(slide, tile=(32, 32), photometric="rgb", description="Aperio Image Library")
        t.write(half, photometric="rgb")
        t.write(np.zeros((20, 20, 3), np.uint8), photometric="rgb", subfiletype=1)
    tifffile.imwrite(tmp_path / "o.ome.tif", slide, photometric="rgb", metadata={"axes": "YXS"})
    for name in ("sub.tif", "aperio.tif", "o.ome.tif"):
        r = read_rgb(tmp_path / name)
        assert r.ok and np.array_equal(r.image, slide), name
    assert read_rgb(tmp_path / "sub.tif").converted == []


def test_scanner_tiffs_are_read_and_other_slide_formats_are_named(tmp_path, caplog):
    """.svs/.ndpi/.scn/.bif are TIFFs (read); .mrxs/.czi/.vsi are not (named, with the
    export to do): both were dropped by the suffix check without a word. (A plain TIFF
    named .ndpi is not one: tifffile reads .ndpi with NDPI's 64-bit offsets.)"""
    from vae.inputs.query import _is_image

    slide = _slide()
    _ventana_like(tmp_path / "a.bif", slide)
    tifffile.imwrite(tmp_path / "b.svs", slide, photometric="rgb")
    tifffile.imwrite(tmp_path / "c.scn", slide, photometric="rgb")
    (tmp_path / "d.mrxs").write_bytes(b"[GENERAL]\n")
    (tmp_path / "e.czi").write_bytes(b"ZISRAWFILE")
    with caplog.at_level(logging.WARNING):
        found = list_images(tmp_path)
    assert [p.name for p in found] == ["a.bif", "b.svs", "c.scn"]
    assert "d.mrxs" in caplog.text and "e.czi" in caplog.text and "QuPath" in caplog.text
    for p in found:
        r = read_rgb(p)
        assert r.ok and np.array_equal(r.image, slide), p
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _is_image(tmp_path / "b.svs") and not _is_image(tmp_path / "d.mrxs")
    assert "d.mrxs" in caplog.text and "bfconvert" in caplog.text
    r = read_rgb(tmp_path / "e.czi")
    assert not r.ok and "not a TIFF" in r.reason and "QuPath" in r.reason


def test_no_images_error_names_the_slides_not_read(tmp_path):
    from pipeline.runner import StageError
    from tests.helpers.run import run_stage_in_process

    smears = tmp_path / "smears"
    smears.mkdir()
    (smears / "x.mrxs").write_bytes(b"[GENERAL]\n")
    (smears / "y.vsi").write_bytes(b"II*\x00")
    with pytest.raises(StageError) as e:
        run_stage_in_process(
            [f"paths.root={tmp_path / 'out'}", f"paths.inputs.smears={smears}"], "segment"
        )
    msg = str(e.value)
    assert "x.mrxs" in msg and "y.vsi" in msg and "export" in msg, msg


def test_unknown_tiff_compression_is_named_with_the_fix(tmp_path):
    """Aperio's JPEG 2000 tag (33003) said 'cannot identify image file'."""
    for code, name in ((33003, "Aperio JPEG 2000"), (65000, "unknown")):
        path = tmp_path / f"c{code}.tif"
        tifffile.imwrite(path, _slide(64, 64), tile=(32, 32), photometric="rgb")
        with tifffile.TiffFile(path, mode="r+b") as tf:
            tf.pages[0].tags["Compression"].overwrite(code)
        r = read_rgb(path)
        assert not r.ok and f"TIFF compression {code} ({name}" in r.reason, r.reason
        assert "export" in r.reason and ("imagecodecs" in r.reason or code == 65000)


def test_jpeg_tiff_is_read(tmp_path):
    """JPEG-compressed tiles (most scanners): decoded by imagecodecs (a dependency)."""
    import imagecodecs  # noqa: F401 - a hard dependency: missing is a failure, not a skip

    slide = np.full((64, 96, 3), (200, 120, 160), np.uint8)
    tifffile.imwrite(tmp_path / "j.tif", slide, tile=(32, 32), compression="jpeg")
    r = read_rgb(tmp_path / "j.tif")
    assert r.ok and np.abs(r.image.astype(int) - slide).max() <= 3


def _pillow_resize(a: np.ndarray, scale: float) -> np.ndarray:
    h, w = a.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR))


@pytest.mark.parametrize("shape", [(480, 640), (1501, 2003)])
@pytest.mark.parametrize("scale", [0.2812, 0.6, 0.5, 1.7])
def test_resize_in_strips_matches_a_whole_image_resize(shape, scale, monkeypatch):
    """Strips give Pillow's whole-image result up to 1 grey level, without Pillow ever
    holding the whole image (it copied a 400 MP slide: 1.9 GB more)."""
    from segmentation import inference

    a = np.asarray(Image.fromarray(_slide(64, 64)).resize(shape[::-1], Image.Resampling.BICUBIC))
    want = _pillow_resize(a, scale)
    seen = []
    real = Image.fromarray
    monkeypatch.setattr(Image, "fromarray", lambda x, *k: seen.append(x.shape) or real(x, *k))
    got = inference.resize_image(a, scale, strip_px=shape[1] * 50)
    assert got.shape == want.shape and got.dtype == np.uint8
    d = np.abs(got.astype(int) - want)
    assert d.max() <= 1
    assert max(s[0] for s in seen) < shape[0] // 2  # strips only
    if scale < 1:
        assert (d > 0).mean() < 0.05


@pytest.mark.parametrize("scale", [0.1234, 0.5])
def test_overlay_reduction_of_a_large_image_is_in_strips(scale, monkeypatch):
    """draw_overlay reduces a slide with a box filter: through Image.fromarray of the
    whole image, 1.15 GB of a 400 MP slide's stage peak; now in strips, the same
    pixels up to 1 grey level."""
    from segmentation import inference

    a = np.asarray(Image.fromarray(_slide(64, 64)).resize((1999, 1501), Image.Resampling.BICUBIC))
    size = (round(1999 * scale), round(1501 * scale))
    want = np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BOX))
    seen = []
    real = Image.fromarray
    monkeypatch.setattr(Image, "fromarray", lambda x, *k: seen.append(x.shape) or real(x, *k))
    got = inference.resize_image(a, scale, strip_px=1999 * 50, resample="box")
    assert got.shape == want.shape
    # up to 1 grey level, but for rows where the box filter's hard edge falls on a source
    # row boundary and float rounding takes that row in or out (scale 0.5: 2 rows of
    # 750, up to 7 levels): a picture to look at, not one the detector reads
    d = np.abs(got.astype(int) - want).max(axis=(1, 2))
    assert (d > 1).sum() <= 2 and d.max() <= 8
    assert max(s[0] for s in seen) < 1501 // 2  # strips only


def test_large_image_logs_progress_of_read_resize_and_tiles(tmp_path, monkeypatch, caplog):
    from segmentation import inference

    monkeypatch.setattr(io, "PROGRESS_MEGAPIXELS", 0.01)
    monkeypatch.setattr(inference, "PROGRESS_MEGAPIXELS", 0.01)
    tifffile.imwrite(tmp_path / "s.tif", _slide(300, 400), photometric="rgb")
    calls = []

    def detector(tiles):
        calls.append(len(tiles))
        return [inference.Detections.empty() for _ in tiles]

    with caplog.at_level(logging.INFO):
        im = read_rgb(tmp_path / "s.tif").image
        im = inference.resize_image(im, 0.5, strip_px=400 * 40)
        inference.detect_images(detector, [im], tile_size=64, overlap=16, batch_size=2)
    text = caplog.text
    assert "read s.tif: 400x300 px" in text and "resized 400x300 -> 200x150" in text
    lines = [m for m in caplog.messages if "tile " in m and " of " in m]
    n = sum(calls)
    assert lines and f"tile {n} of {n} " in lines[-1], lines
    assert 5 <= len(lines) <= 12  # about every 10 %


def test_shipped_detector_line_is_short_and_claims_no_scale(caplog):
    """It said 'magnification measured per image' also with estimate_scale=false; then a
    400-character line opened every "your own smears" run (terminal audit). It names the
    file and how to replace it; the stage's own line says how the scale is chosen."""
    from pipeline.artifacts import shipped_default

    with caplog.at_level(logging.INFO, logger="pipeline.artifacts"):
        path, _ = shipped_default("segmentation_model")
    # the shipped weights are in git (segmentation/weights): missing is a broken install
    assert path is not None and path.is_file(), "no shipped detector in this checkout"
    line = caplog.records[-1].getMessage()
    assert str(path) in line and "paths.inputs.segmentation_model=PATH" in line
    assert "magnification" not in line and len(line) < 180 + len(str(path))  # was 400


def test_planar_and_cmyk_tiffs_of_several_series_keep_their_colours(tmp_path):
    """tifffile names planes of samples S ("SYX"): a planar RGB TIFF with a thumbnail was
    read as its red plane in grey, and a CMYK one named .svs as RGBA (review)."""
    import tifffile

    from segmentation.io import read_rgb

    rgb = _slide(64, 48)
    planar = tmp_path / "planar_thumb.tif"
    with tifffile.TiffWriter(planar) as tw:
        tw.write(np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
        tw.write(rgb[::4, ::4], photometric="rgb")
    r = read_rgb(planar)
    assert r.image is not None and np.array_equal(r.image, rgb), r.converted
    assert "grayscale->rgb" not in r.converted and r.converted[0].startswith("tiff series 1 of 2")
    cmyk = tmp_path / "ink.svs"
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "ink.tif")
    (tmp_path / "ink.tif").rename(cmyk)
    r = read_rgb(cmyk)
    want = np.asarray(Image.open(cmyk).convert("RGB"))
    assert r.image is not None and np.array_equal(r.image, want) and "cmyk->rgb" in r.converted
