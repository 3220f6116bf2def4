"""A crop folder's images read for stage=embed (``crop_masks=whole``): names from the file
paths, and huge crops decoded reduced (``segmentation.io.read_rgb(reduce_to=)``) instead of
whole, the crops of normal-sized images unchanged to the bit."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmentation.io import read_rgb
from vae.inputs.pairing import square_crop
from vae.inputs.query import REDUCED_READ_MARGIN, ModelCrops, read_crop_folder


def _cell(h: int, w: int, grey: bool = False) -> Image.Image:
    """A stained-cell-like picture: a disc with a darker nucleus on a pale gradient."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (225, 205, 215)
    img += (yy / h * 20)[..., None]
    r = min(h, w)
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.35 * r) ** 2
    nucleus = (yy - h / 2) ** 2 + (xx - w / 2 - 0.08 * r) ** 2 <= (0.18 * r) ** 2
    img[disc] = (190, 140, 200)
    img[nucleus] = (110, 60, 150)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return im.convert("L") if grey else im


def _whole_read(p: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The crop as read before reduce_to: decoded whole, an all-True mask, square_crop."""
    image = read_rgb(p).image
    return square_crop(image, np.ones(image.shape[:2], bool), size, 0)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_normal_sized_crop_is_read_as_before_to_the_bit(tmp_path, suffix):
    """Under 2 x REDUCED_READ_MARGIN x the side the reduced decode never runs: the same
    image, and read_crop_folder's crop and mask equal to the whole decode's."""
    size = 64
    (tmp_path / "crops" / "pat").mkdir(parents=True)
    p = tmp_path / "crops" / "pat" / f"cell{suffix}"
    side = 2 * REDUCED_READ_MARGIN * size - 1  # the largest image still read whole
    _cell(side, side - 40).save(p)
    rd = read_rgb(p, reduce_to=REDUCED_READ_MARGIN * size)
    assert np.array_equal(rd.image, read_rgb(p).image)
    assert not any(c.startswith("decoded reduced") for c in rd.converted)
    a, rej = read_crop_folder(tmp_path / "crops", size)
    want_c, want_m = _whole_read(p, size)
    assert not rej and np.array_equal(a.obsm["crops"][0], want_c)
    assert np.array_equal(a.obsm["masks"][0], want_m)


@pytest.mark.parametrize(
    ("suffix", "grey", "shape"),
    [(".jpg", False, (2600, 2100)), (".png", False, (2100, 2600)), (".jpg", True, (2400, 2400))],
)
def test_a_huge_crop_read_reduced_is_the_whole_decode_resized(tmp_path, suffix, grey, shape):
    """A crop of 16x the side or more is decoded at 1/k, its long side kept >= 8x the side
    (a JPEG by its own DCT scaling): the crop it becomes is the whole decode's, resized,
    within a few grey levels; its mask (the whole image) exactly."""
    size = 128
    (tmp_path / "crops" / "pat").mkdir(parents=True)
    p = tmp_path / "crops" / "pat" / f"big{suffix}"
    _cell(*shape, grey=grey).save(p)
    rd = read_rgb(p, reduce_to=REDUCED_READ_MARGIN * size)
    note = [c for c in rd.converted if c.startswith("decoded reduced")]
    assert note and max(rd.image.shape[:2]) >= REDUCED_READ_MARGIN * size
    assert max(rd.image.shape[:2]) < max(shape) // 2 + 1
    assert rd.image.shape[2] == 3 and rd.image.dtype == np.uint8
    # the aspect is kept (to a reduced pixel)
    assert abs(rd.image.shape[0] / rd.image.shape[1] - shape[0] / shape[1]) < 0.01
    a, _ = read_crop_folder(tmp_path / "crops", size)
    want_c, want_m = _whole_read(p, size)
    diff = np.abs(a.obsm["crops"][0].astype(int) - want_c.astype(int))
    assert np.array_equal(a.obsm["masks"][0], want_m)
    assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_a_reduced_read_keeps_the_exif_orientation(tmp_path):
    """A phone JPEG stored on its side (EXIF orientation 6) is upright, reduced or not."""
    im = _cell(2000, 3000)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "side.jpg"
    im.save(p, exif=exif)
    whole = read_rgb(p).image
    red = read_rgb(p, reduce_to=1000).image
    assert whole.shape[:2] == (3000, 2000) and red.shape[0] > red.shape[1]
    small = np.asarray(Image.fromarray(whole).resize(red.shape[1::-1], Image.BOX))
    assert np.abs(small.astype(int) - red.astype(int)).mean() < 2


def test_other_images_are_decoded_whole_as_before(tmp_path):
    """RGBA (composited on the background at full size), 16-bit and TIFF images keep the
    whole decode: the same array with reduce_to as without it."""
    rgba = np.dstack([np.asarray(_cell(1200, 1200)), np.full((1200, 1200), 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    _cell(1200, 1200).save(tmp_path / "t.tif")
    deep = np.asarray(_cell(1200, 1200, grey=True)).astype(np.uint16) * 257
    Image.fromarray(deep).save(tmp_path / "d.png")
    for name in ("a.png", "t.tif", "d.png"):
        rd = read_rgb(tmp_path / name, reduce_to=100)
        assert np.array_equal(rd.image, read_rgb(tmp_path / name).image), name
        assert not any(c.startswith("decoded reduced") for c in rd.converted), name


def test_a_huge_jpeg_crop_costs_no_full_size_array(tmp_path):
    """A 4000 x 4000 JPEG crop for a 32 px model: 48 MB decoded whole (plus a 16 MB
    all-True mask); read into the crop folder's rows now, the arrays allocated peak under
    4 MB (the JPEG decoded at 1/8, the whole image's mask a view of one value); 93 MB
    before."""
    (tmp_path / "crops" / "pat").mkdir(parents=True)
    _cell(4000, 4000).save(tmp_path / "crops" / "pat" / "huge.jpg", quality=90)
    (tmp_path / "warm" / "pat").mkdir(parents=True)
    _cell(40, 40).save(tmp_path / "warm" / "pat" / "small.jpg")
    # the modules the reader imports when first called (torch, ...) are not counted
    read_crop_folder(tmp_path / "warm", 32, model_crops=ModelCrops(32, 16))
    tracemalloc.start()
    try:
        a, rej = read_crop_folder(tmp_path / "crops", 32, model_crops=ModelCrops(32, 16))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not rej and a.obsm["crops"].shape == (1, 16, 16, 3)
    assert peak < 4 << 20, peak


def test_crop_ids_are_their_paths_below_the_folder(tmp_path):
    """A crop's cell id (query.h5ad's obs_names) is its path below the folder: the sample
    sub-folder, the folders under it and the file name, so two slides' x.png stay apart."""
    for rel in ("pA/slide1/x.png", "pA/slide2/x.png", "pB/x.png", "loose.png"):
        (tmp_path / "crops" / rel).parent.mkdir(parents=True, exist_ok=True)
        _cell(40, 40).save(tmp_path / "crops" / rel)
    a, _ = read_crop_folder(tmp_path / "crops", 32)
    assert sorted(a.obs_names) == [
        "crops/loose.png",
        "pA/slide1/x.png",
        "pA/slide2/x.png",
        "pB/x.png",
    ]
    assert a.obs_names.is_unique


def test_a_thin_strip_is_not_reduced_below_the_usable_side(tmp_path):
    """An 1100 x 12 px file: reduced by 2 its short side was 6 px and it was rejected as
    "too small: 550x6 px", a size the file does not have (review); the whole decode
    accepts it, and the reduced read now does too, with the same pixels."""
    p = tmp_path / "strip.png"
    Image.fromarray(np.full((12, 1100, 3), 120, np.uint8)).save(p)
    whole, reduced = read_rgb(p), read_rgb(p, reduce_to=512)
    assert whole.ok and reduced.ok, reduced.reason
    np.testing.assert_array_equal(reduced.image, whole.image)
