"""Whole slides read and segmented window by window (segmentation/slides.py,
segmentation.io.SlideReader): every pixel in one window's core, regions equal to the
whole image, and each cell of a slide kept once, as when the slide is read whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segmentation.io import SlideReader, tiff_size
from segmentation.slides import slide_units, slide_windows, unit_groups
from tests.helpers.seg_synth import untrained_checkpoint
from tests.segmentation.test_seg_infer import _Blobs, _placed, _run_segment, disc


@pytest.mark.parametrize(
    "h, w, side, overlap",
    [(1000, 1500, 256, 64), (256, 300, 256, 96), (100, 90, 256, 32), (5000, 777, 1024, 511)],
)
def test_window_cores_tile_the_slide_once(h, w, side, overlap):
    wins = slide_windows(h, w, side, overlap)
    cover = np.zeros((h, w), np.int32)
    for k, v in enumerate(wins):
        assert (v.k, v.n) == (k, len(wins))
        assert 0 <= v.x0 < v.x1 <= w and 0 <= v.y0 < v.y1 <= h
        # all of one size, at most side, overlapping by at least overlap
        assert (v.x1 - v.x0, v.y1 - v.y0) == (wins[0].x1 - wins[0].x0, wins[0].y1 - wins[0].y0)
        assert v.x1 - v.x0 <= min(side, w) and v.y1 - v.y0 <= min(side, h)
        assert v.x0 <= v.cx0 < v.cx1 <= v.x1 and v.y0 <= v.cy0 < v.cy1 <= v.y1
        # a cell narrower than overlap / 2 whose centre is in the core is whole in the
        # window: the core keeps overlap / 2 (rounded down) from every inner edge
        for inner, gap in (
            (v.x0 > 0, v.cx0 - v.x0),
            (v.y0 > 0, v.cy0 - v.y0),
            (v.x1 < w, v.x1 - v.cx1),
            (v.y1 < h, v.y1 - v.cy1),
        ):
            if inner:
                assert gap >= overlap // 2
        cover[v.cy0 : v.cy1, v.cx0 : v.cx1] += 1
    assert (cover == 1).all()
    xs = sorted({(v.x0, v.x1) for v in wins})
    assert all(a[1] - b[0] >= overlap for a, b in zip(xs, xs[1:]))
    # the fewest windows: one fewer along x would not cover the slide
    n = len(xs)
    assert n == 1 or (n - 1) * side - (n - 2) * overlap < w


def test_bad_window_overlap_is_refused():
    with pytest.raises(ValueError, match="overlap 256 must be >= 0 and < the window side 256"):
        slide_windows(1000, 1000, 256, 256)


def _write(path: Path, a: np.ndarray, **kw) -> Path:
    import tifffile

    tifffile.imwrite(path, a, **kw)
    return path


@pytest.mark.parametrize(
    "kind", ["tiled_jpeg", "planar_strips", "grey", "rgba_tiled", "stack_of_pages", "pyramid"]
)
def test_slide_reader_regions_equal_the_image_read_whole(tmp_path, kind):
    import tifffile

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (700, 900, 3), dtype=np.uint8)
    p = tmp_path / "s.tif"
    if kind == "tiled_jpeg":
        _write(p, rgb, tile=(128, 128), compression="jpeg", photometric="rgb")
        whole = tifffile.imread(p)
    elif kind == "planar_strips":
        _write(p, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
        whole = rgb
    elif kind == "grey":
        _write(p, rgb[..., 0], tile=(64, 64))
        whole = np.repeat(rgb[..., :1], 3, axis=-1)
    elif kind == "rgba_tiled":
        rgba = np.concatenate([rgb, np.full((700, 900, 1), 255, np.uint8)], -1)
        _write(p, rgba, tile=(128, 128), photometric="rgb", extrasamples=["unassalpha"])
        whole = rgb
    elif kind == "pyramid":  # level 0 of a pyramid (SubIFDs), as scanners write it
        with tifffile.TiffWriter(p) as tw:
            tw.write(rgb, subifds=1, tile=(128, 128), photometric="rgb")
            tw.write(rgb[::2, ::2], subfiletype=1, tile=(128, 128), photometric="rgb")
        whole = rgb
    else:
        _write(p, np.stack([rgb, 255 - rgb]), photometric="rgb")
        whole = rgb
    assert tiff_size(p) == (700, 900)
    with SlideReader(p) as r:
        assert (r.height, r.width) == (700, 900)
        for x0, y0, x1, y1 in [(0, 0, 900, 700), (130, 260, 515, 699), (899, 0, 900, 10)]:
            rd = r.read(x0, y0, x1, y1)
            assert rd.ok, rd.reason
            assert rd.image.shape == (y1 - y0, x1 - x0, 3) and rd.image.dtype == np.uint8
            np.testing.assert_array_equal(rd.image, whole[y0:y1, x0:x1])
        if kind == "stack_of_pages":
            assert "first page of 2" in rd.converted


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_turned_slide_reads_upright_in_windows_as_whole(tmp_path, orientation):
    """A TIFF whose orientation tag says its pixels are stored turned (5-8: on its side)
    is read upright window by window, as read_rgb turns it read whole; before, windows
    read the stored frame: a slide on its side was planned, cut and segmented sideways,
    its boxes in another frame than a smaller copy of it read whole."""
    import tifffile

    from segmentation.io import read_rgb

    rng = np.random.default_rng(2)
    stored = rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)
    p = tmp_path / "turned.tif"
    tag = [(274, 3, 1, orientation, True)]
    tifffile.imwrite(p, stored, tile=(64, 64), bigtiff=True, extratags=tag)
    whole = read_rgb(p).image
    upright = (200, 300) if orientation >= 5 else (300, 200)
    assert whole.shape[:2] == upright and tiff_size(p) == upright
    with SlideReader(p) as r:
        assert (r.height, r.width) == upright
        h, w = upright
        for x0, y0, x1, y1 in [(0, 0, w, h), (10, 20, 110, 77), (w - 33, h - 41, w, h)]:
            rd = r.read(x0, y0, x1, y1)
            assert rd.ok, rd.reason
            np.testing.assert_array_equal(rd.image, whole[y0:y1, x0:x1])


def test_a_damaged_tile_rejects_its_region_only(tmp_path):
    """A slide whose last tiles are cut off: the regions over them say why; the others
    read; nothing raises."""
    rgb = np.random.default_rng(2).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    p = _write(tmp_path / "s.tif", rgb, tile=(256, 256), compression="zlib")
    data = p.read_bytes()
    import tifffile

    with tifffile.TiffFile(p) as tf:
        offsets = tf.pages[0].dataoffsets
    last = max(offsets)
    # the last tile's bytes replaced by garbage (the file keeps its length and header)
    p.write_bytes(data[:last] + b"\x00garbage" * 64 + data[last + 520 :])
    with SlideReader(p) as r:
        ok = r.read(0, 0, 256, 256)
        bad = r.read(256, 256, 512, 512)
    assert ok.ok
    np.testing.assert_array_equal(ok.image, rgb[:256, :256])
    assert not bad.ok and bad.reason.startswith("region x 256-512, y 256-512: ")


def test_units_expand_only_slides_and_windows_go_alone(tmp_path):
    small = _write(tmp_path / "a.tif", np.zeros((50, 60, 3), np.uint8))
    big = _write(tmp_path / "b.tif", np.zeros((300, 500, 3), np.uint8))
    png = tmp_path / "c.png"
    png.write_bytes(b"")  # not a TIFF: whole, whatever its size
    units = slide_units([(0, small), (1, big), (2, png)], 0.1, 256, 64)
    # 300 x 500 px in windows of at most 256 px overlapping by 64: 2 rows of 3
    assert [(i, w is None) for i, _, w in units] == [(0, True)] + [(1, False)] * 6 + [(2, True)]
    groups = list(unit_groups(units, 4))
    assert [len(g) for g in groups] == [1] * 8
    assert [len(g) for g in unit_groups([(i, small, None) for i in range(5)], 2)] == [2, 2, 1]


def _disc_slide(path: Path) -> tuple[Path, np.ndarray]:
    """A 720x1000 slide of 35 discs (r 12-15) on a grid with jitter: 7 near the windows'
    cuts of the test below, so the overlaps hold cells."""
    import tifffile

    h, w = 720, 1000
    rng = np.random.default_rng(3)
    img = np.full((h, w, 3), (230, 205, 205), np.uint8)
    centres = []
    for cy in range(60, h - 40, 130):
        for cx in range(60, w - 40, 140):
            y, x = cy + rng.integers(-20, 21), cx + rng.integers(-20, 21)
            img[disc(h, w, y, x, 12 + rng.integers(0, 4))] = (110, 60, 150)
            centres.append((x, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, img, tile=(128, 128), compression="zlib")
    return path, np.array(centres, float)


def _paired(a, b, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``cols`` of the rows of ``a`` and of the row of ``b`` nearest each (box centres),
    each row of ``b`` used once."""

    def centres(t):
        return np.c_[(t.x0 + t.x1) / 2, (t.y0 + t.y1) / 2]

    d = np.linalg.norm(centres(a)[:, None] - centres(b)[None], axis=-1)
    j = d.argmin(1)
    assert len(set(j)) == len(j) and d.min(1).max() < 3
    return a[cols].to_numpy(float), b[cols].to_numpy(float)[j]


def test_a_slide_read_in_windows_keeps_each_cell_once(tmp_path, monkeypatch):
    """The same cells, each once, with the same boxes and edge weights as the slide
    read whole; unique ids; each crop put back on its window's label image."""
    import anndata as ad
    import pandas as pd
    from skimage import io as skio

    import pipeline.stages.segment as seg

    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: _Blobs())
    ckpt = untrained_checkpoint(tmp_path / "model.pt")
    slide, centres = _disc_slide(tmp_path / "smears" / "slide.tif")
    outs = {}
    for name, extra in {
        "whole": [],
        "windows": [
            "segmentation.slide_megapixels=0.1",
            "segmentation.slide_window=300",
            "segmentation.slide_overlap=96",
        ],
    }.items():
        root = tmp_path / name
        outs[name] = _run_segment(
            root, ckpt, slide.parent, "segmentation.border_margin=2", *extra, here=True
        )
    whole = pd.read_csv(outs["whole"] / "detections.csv")
    win = pd.read_csv(outs["windows"] / "detections.csv")
    assert "window_x0" not in whole and win["window_x0"].nunique() > 4  # several windows
    for t in (whole, win):
        assert t["kept"].all() and len(t) == len(centres)
        assert t["cell_id"].is_unique
    key = ["x0", "y0", "x1", "y1"]
    a, b = _paired(whole, win, key + ["area", "edge_weight"])
    # a window's working frame starts at a fraction of a working px (its origin x the
    # scale): the resampled cell's edge moves by up to one working px (1.7 source px)
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=2.0)
    np.testing.assert_allclose(a[:, 4], b[:, 4], rtol=0.08)  # ~160 working px each
    # edge weights of the slide, not of the window: equal up to the window's working frame
    # starting at a fraction of a working px
    np.testing.assert_allclose(a[:, 5], b[:, 5], rtol=5e-3)
    cells = ad.read_h5ad(outs["windows"] / "cells.h5ad")
    assert cells.n_obs == len(centres)
    summary = (outs["windows"] / "summary.json").read_text()
    assert '"images_read": 1' in summary
    shown = [p.name for p in (outs["windows"] / "overlays").iterdir()]
    assert len(shown) == 1 and shown[0].startswith("slide_x")  # one window per slide
    masks = outs["windows"] / "masks"
    for (wx, wy), g in cells.obs.groupby(["window_x0", "window_y0"], observed=True):
        lab = skio.imread(masks / f"slide_x{int(wx)}_y{int(wy)}.tif")
        assert sorted(set(np.unique(lab)) - {0}) == sorted(g["mask_label"].astype(int))
        for cid, r in g.iterrows():
            m = cells.obsm["masks"][cells.obs_names.get_loc(cid)]
            put = _placed(m, int(r.crop_x0 - wx), int(r.crop_y0 - wy), int(r.crop_side), lab.shape)
            mine = lab == r.mask_label
            assert (put & mine).sum() / (put | mine).sum() > 0.9, cid


def test_embed_reads_a_slide_in_windows_with_each_cell_once(tmp_path, monkeypatch):
    """stage=embed's smear reader (vae.inputs.query.segment_smear_folder): a slide over
    slide_megapixels gives the cells of the slide read whole, once each, in slide px."""
    from dataclasses import replace

    import segmentation.inference
    import segmentation.model
    from segmentation.cells import SegmentSettings
    from segmentation.crops import FilterSettings
    from vae.inputs.query import segment_smear_folder

    monkeypatch.setattr(segmentation.model, "load_checkpoint", lambda *a, **k: (None, {}))
    monkeypatch.setattr(segmentation.inference, "MaskRCNNDetector", lambda *a, **k: _Blobs())
    _, centres = _disc_slide(tmp_path / "smears" / "p1" / "slide.tif")
    base = SegmentSettings(
        input_scale=0.6,
        tile_size=128,
        tile_overlap=32,
        crop_size=32,
        filters=FilterSettings(min_area=20, border_margin=2),
    )
    whole, r1 = segment_smear_folder(tmp_path / "smears", "unused.pt", settings=base)
    wins = replace(base, slide_megapixels=0.1, slide_window=300, slide_overlap=96)
    win, r2 = segment_smear_folder(tmp_path / "smears", "unused.pt", settings=wins)
    assert r1 == [] and r2 == []
    assert whole.n_obs == win.n_obs == len(centres)
    assert win.obs_names.is_unique and set(win.obs["sample"]) == {"p1"}
    a, b = _paired(whole.obs, win.obs, ["x0", "y0", "x1", "y1"])
    np.testing.assert_allclose(a, b, atol=2.0)


def test_a_slide_is_read_at_one_magnification(tmp_path):
    """The first window with cells measures the slide's scale; the others are read at it
    (one pass each, no measure); a window with nothing to measure leaves it open."""
    from dataclasses import replace
    from types import SimpleNamespace

    from segmentation.cells import SegmentSettings, segment_images
    from segmentation.crops import FilterSettings
    from segmentation.slides import window_cells

    img = np.full((200, 240, 3), (230, 205, 205), np.uint8)
    img[disc(200, 240, 100, 120, 14)] = (110, 60, 150)
    settings = SegmentSettings(
        input_scale=0.6, tile_size=128, tile_overlap=32, filters=FilterSettings(min_area=20)
    )
    calls = []

    def measure(ok=True, n=20):
        calls.append((ok, n))
        at = replace(settings, input_scale=0.7)
        cells = segment_images(_Blobs(), [img], ["s.tif"], at, None, ["a"])[0]
        return cells, SimpleNamespace(scale=0.7, estimate=SimpleNamespace(ok=ok, n_cells=n))

    empty, s0 = window_cells(_Blobs(), img, "s.tif", "z", settings, None, lambda: measure(False))
    assert s0 is None and (empty.table["input_scale"] == 0.7).all()
    # a ruler on 3 cells is this window's only (review: 0.198 vs 0.181 from 18 cells)
    few, s0 = window_cells(_Blobs(), img, "s.tif", "y", settings, s0, lambda: measure(True, 3))
    assert s0 is None
    first, s1 = window_cells(_Blobs(), img, "s.tif", "a", settings, s0, measure)
    later, s2 = window_cells(_Blobs(), img, "s.tif", "b", settings, s1, measure)
    assert calls == [(False, 20), (True, 3), (True, 20)] and s1 == s2 == 0.7
    assert later.scale == 0.7 and (later.table["input_scale"] == 0.7).all()
    assert later.table["cell_id"].str.startswith("b_").all() and len(later.table) == 1


@pytest.mark.parametrize("shift", [(-3, 3), (3, -3)], ids=["both_own_it", "neither_owns_it"])
def test_a_cell_whose_box_moves_between_windows_is_kept_once(shift):
    """A cell on the cut between two windows, found in each with its box a few px apart
    (another context, another working-px grid): its box centre fell on both sides of the
    cut (kept twice: a real 1024/256 run, 17 vs 16 cells) or on neither (lost: 1000/512,
    15 vs 16). Each window's rows go through own_cells in turn with the slide's kept boxes."""
    from segmentation.cells import SegmentSettings, segment_images
    from segmentation.crops import FilterSettings
    from segmentation.slides import own_cells

    h, w = 200, 400
    wins = slide_windows(h, w, 256, 96)
    assert len(wins) == 2
    cut = wins[0].cx1
    img = np.full((h, w, 3), (230, 205, 205), np.uint8)
    img[disc(h, w, 100, cut, 14)] = (110, 60, 150)
    settings = SegmentSettings(
        input_scale=1.0, tile_size=128, tile_overlap=32, filters=FilterSettings(min_area=20)
    )
    kept = []
    seen: list = []
    for win, dx in zip(wins, shift):
        part = np.ascontiguousarray(img[win.y0 : win.y1, win.x0 : win.x1])
        cells = segment_images(_Blobs(), [part], ["s.tif"], settings, None, [win.name])[0]
        assert cells.table["kept"].sum() == 1  # whole in both windows
        for c in ("x0", "x1"):  # the box this window's detector gave
            cells.table[c] += dx
        mine = own_cells(cells, win, h, w, 2.0, seen)
        kept.append(int(mine.table["kept"].sum()))
        assert len(mine.crops.images) == kept[-1]
    assert sum(kept) == 1, kept
    # without the slide's kept boxes the core alone decides: the count the bug gave
    alone = []
    for win, dx in zip(wins, shift):
        part = np.ascontiguousarray(img[win.y0 : win.y1, win.x0 : win.x1])
        cells = segment_images(_Blobs(), [part], ["s.tif"], settings, None, [win.name])[0]
        for c in ("x0", "x1"):
            cells.table[c] += dx
        alone.append(int(own_cells(cells, win, h, w, 2.0).table["kept"].sum()))
    assert sum(alone) == (2 if shift[0] < 0 else 0)


def test_a_16_bit_slide_has_one_grey_scale_over_its_windows(tmp_path):
    """12-bit data in 16-bit samples: read_rgb scales an image by its own maximum, so
    window by window one raw value became another grey level in each window (review:
    128 read whole, 255 in a window); now the slide's one range (4095) for all."""
    raw = np.zeros((256, 512, 3), np.uint16)
    raw[:, :256] = 1000  # a dim left half read first: its maximum is not the slide's
    raw[:, 256:] = np.array([1000, 3000, 4000], np.uint16)
    p = _write(tmp_path / "s.tif", raw, tile=(128, 128), photometric="rgb")
    with SlideReader(p) as r:
        left, right = r.read(0, 0, 256, 256), r.read(256, 0, 512, 256)
    assert left.image[0, 0, 0] == right.image[0, 0, 0] == round(1000 / 4095 * 255)
    assert right.image[0, 0, 2] == round(4000 / 4095 * 255)
    assert "16bit->8bit" in left.converted


def test_a_slide_in_one_strip_is_named_as_slow_to_read(tmp_path):
    """A slide stored as one strip is decoded whole for every window (review: a 243 MB
    file); the reader says so with the fix, and a tiled one says nothing."""
    rgb = np.zeros((600, 800, 3), np.uint8)
    strip = _write(tmp_path / "strip.tif", rgb, rowsperstrip=600, photometric="rgb")
    tiled = _write(tmp_path / "tiled.tif", rgb, tile=(128, 128), photometric="rgb")
    with SlideReader(strip) as r:
        note = r.storage_note(100)
    assert "stored in pieces of 0.5 MP (strips, not tiles)" in note and "--tile" in note
    with SlideReader(tiled) as r:
        assert r.storage_note(100) == ""


def test_a_slide_in_the_smear_folder_itself_is_a_sample_of_its_own(tmp_path, monkeypatch):
    """A folder of one slide per patient pooled every patient into the folder's one
    sample; a slide directly in it is now its own sample (its stem), as a sub-folder of
    fields is; a field beside it stays the folder's, and a sub-folder's slide its folder's."""
    from PIL import Image

    from vae.inputs.query import sample_images

    root = tmp_path / "smears"
    _disc_slide(root / "patient7.tif")
    _disc_slide(root / "p1" / "deep.tif")
    Image.fromarray(np.full((64, 64, 3), 220, np.uint8)).save(root / "field.png")
    got = {p.name: s for s, p in sample_images(root, 0.1)}
    assert got == {"patient7.tif": "patient7", "field.png": "smears", "deep.tif": "p1"}
    assert {p.name: s for s, p in sample_images(root)}["patient7.tif"] == "smears"  # crops
