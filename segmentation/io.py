"""All file I/O of the libraries: the one image reader, the one COCO mask codec, atomic writes.

Every package reads images through :func:`read_rgb` (never raises, for
inference over folders in the wild) or :func:`load_rgb` (raises
:class:`ImageReadError`, for training data), and COCO ``segmentation`` fields
through :func:`coco_rle` / :func:`decode_coco_mask` (polygons, compressed and
uncompressed RLE); masks are written with :func:`encode_mask`.

Robust image reading for inference: any file in, RGB uint8 out, or a reason why not.

A smear folder in the wild holds surprises: truncated JPEGs, grayscale scans,
RGBA screenshots, 16-bit microscope PNG/TIFF. :func:`read_rgb` never raises on
such a file; it returns an :class:`ImageRead` whose ``image`` is ``None`` (and
``reason`` says why) or an RGB uint8 array (with ``converted`` naming every
conversion made), so the caller can list it in a rejects table and go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def recorded_name(name: str | os.PathLike) -> str:
    r"""A file name (or path) as every table, h5ad, HTML page and CSV records it.

    A name that is not valid UTF-8 (Latin-1 bytes from a Windows share or an old zip:
    ``b"M\xfcller.png"``) reaches Python with surrogates (``"M\udcfcller.png"``), which
    the OS takes back but no UTF-8 writer does: ``cells.h5ad`` failed after every
    image was segmented. The one rule: the name's bytes, each byte that is not UTF-8
    written as the four characters ``\xNN`` (``M\xfcller.png``). Distinct names stay
    distinct (``errors="replace"`` would make ``\xfc`` and ``\xe4`` both U+FFFD), and
    a valid name is returned unchanged. Files on disk keep their own bytes.

    Parameters
    ----------
    name : str or path-like
        A file name or path as ``os.listdir`` / ``Path.iterdir`` gave it.

    Returns
    -------
    str
        ``name`` when it encodes as UTF-8, else its escaped form.
    """
    name = os.fspath(name)
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        raw = os.fsencode(name)  # the bytes the file system holds
    except UnicodeEncodeError:  # a lone surrogate not from a byte (made in Python)
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def undecodable_warning(path: str | os.PathLike) -> str | None:
    """The warning for a file whose path :func:`recorded_name` has to escape, else None.

    Names the file by ``repr`` (printable in any log, which a surrogate is not: a log
    line holding one fails to be written) and says how the tables write it instead.
    """
    path = os.fspath(path)
    shown = recorded_name(path)
    if shown == path:
        return None
    return (
        f"{path!r}: not valid UTF-8 (a name in another system's encoding); the file is "
        f"read, and tables write its path as {shown}"
    )


# every stage folder's record of what it read and wrote (pipeline/artifacts.py writes
# it); here, not in pipeline/, because the libraries read finished runs' records too
MANIFEST = "manifest.json"

# whole-slide scanner files that are TIFFs inside (Aperio .svs, Hamamatsu .ndpi, Leica .scn,
# Ventana .bif): read as TIFFs, the full-resolution level of the largest series
# (:func:`_tiff_layout`); they were skipped without a word by the suffix check
TIFF_SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif")
TIFF_SUFFIXES = (".tif", ".tiff", *TIFF_SLIDE_SUFFIXES)
# the image types every reader lists (case-insensitive); WebP (browser and phone exports)
# is decoded by Pillow like the others, and was skipped without a word when not listed
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", *TIFF_SLIDE_SUFFIXES)
# whole-slide formats that are not TIFFs (3DHistech .mrxs, Zeiss .czi, Olympus .vsi, Philips
# .isyntax, Hamamatsu .vms/.vmu): not read, but named in the log and in a "no images" error
# with the way to read them (:data:`SLIDE_EXPORT`), never skipped silently
OTHER_SLIDE_SUFFIXES = (".mrxs", ".czi", ".vsi", ".isyntax", ".vms", ".vmu")
SLIDE_EXPORT = (
    "export each slide to a TIFF and give the folder of TIFFs: QuPath (File > Export images > "
    "OME-TIFF), Bio-Formats (bfconvert SLIDE slide.ome.tif), or OpenSlide's formats (.mrxs) "
    "with vips (vips tiffsave SLIDE slide.tif --tile --pyramid --bigtiff --compression deflate)"
)
# images over this size (megapixels) log each step of their reading and detection at INFO
# (a 400 MP slide otherwise left the log silent for minutes)
PROGRESS_MEGAPIXELS = 20.0

# The largest image read whole, in megapixels (1000 MP: a 3 GB RGB array). Pillow's own
# guard (it refuses over 179 MP as a "decompression bomb", a web-service concern) made a
# whole-slide smear scan "unreadable"; it is lifted for the user's own files, and this
# size, read from the file's header before decoding, is the limit instead, named as such.
MAX_IMAGE_MEGAPIXELS = 1000
Image.MAX_IMAGE_PIXELS = None  # for every reader in the process (all import this module)


def error_line(e: BaseException, limit: int = 200) -> str:
    """First line of an exception's message, at most ``limit`` characters; its type
    name when it has no message (a reader's error inside a one-line user message)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


@dataclass
class ImageRead:
    """Result of :func:`read_rgb`.

    Attributes
    ----------
    path
        The file read.
    image
        (H, W, 3) uint8 RGB, or ``None`` when the file was rejected.
    converted
        Conversions applied, e.g. ``["grayscale->rgb", "16bit->8bit"]``.
    reason
        Why the file was rejected (``image is None``), else ``""``.
    """

    path: Path
    image: np.ndarray | None
    converted: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.image is not None


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` (sorted by name); hidden files (names
    starting with ``.``: editor and OS leftovers such as ``._x.jpg``) are skipped, as
    every other folder reader skips them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of images")
    slides = skipped_slides(folder)
    if slides:  # named, never dropped without a word
        log.warning("%s: %s", folder, slide_skip_message(slides))
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def is_other_slide(p: Path) -> bool:
    """A whole-slide file of a format that is not a TIFF (:data:`OTHER_SLIDE_SUFFIXES`)."""
    return p.suffix.lower() in OTHER_SLIDE_SUFFIXES and not p.name.startswith(".")


def skipped_slides(folder: str | Path) -> list[Path]:
    """Whole-slide files directly inside ``folder`` that are not read (not TIFFs), sorted."""
    return sorted(p for p in Path(folder).iterdir() if is_other_slide(p))


def slide_skip_message(slides: list[Path], limit: int = 8) -> str:
    """One line naming the whole-slide files not read, and how to read them."""
    names = ", ".join(p.name for p in slides[:limit])
    more = f" and {len(slides) - limit} more" if len(slides) > limit else ""
    return (
        f"{len(slides)} whole-slide file(s) not read ({names}{more}): the format is not a "
        f"TIFF; {SLIDE_EXPORT}"
    )


def _to_uint8(a: np.ndarray, converted: list[str], top: float | None = None) -> np.ndarray:
    """Rescale any integer/float array to uint8 (16-bit: divide by 257; float: [0, 1]).

    ``top``: the 16-bit value that becomes 255, fixed by the caller (a slide's one range
    over all its windows, :class:`SlideReader`); None: from the array itself."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        converted.append("bool->8bit")
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        wide = a.dtype in (np.uint16, np.int32, np.int16)
        if wide and (top is not None or int(a.max(initial=0)) > 255):
            converted.append("16bit->8bit")
            # full-range 16-bit: 65535 -> 255; keep the relative stain intensities
            if top is None:
                top = 65535.0 if info.max >= 65535 and int(a.max()) > 4095 else float(a.max())
            return np.clip(a.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        converted.append(f"{a.dtype}->8bit")
        return np.clip(a, 0, 255).astype(np.uint8)
    converted.append("float->8bit")
    a = np.nan_to_num(a.astype(np.float64))
    if a.max(initial=0.0) > 1.0:
        a = a / 255.0
    return np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _page_count(path: Path) -> int:
    """Pages (frames) of an image file by its header; 1 when Pillow cannot tell."""
    try:
        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1) or 1)
    except Exception:  # noqa: BLE001 - unknown: a single image
        return 1


# EXIF orientation (tag 274) -> the array operation that shows the image upright, as
# PIL.ImageOps.exif_transpose does (its FLIP/ROTATE/TRANSPOSE methods, done on the array
# so a 16-bit image keeps its depth)
EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: np.swapaxes(a, 0, 1),  # transposed
    6: lambda a: np.rot90(a, -1),  # stored rotated 90 counter-clockwise
    7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),  # transversed
    8: lambda a: np.rot90(a, 1),  # stored rotated 90 clockwise
}


def _stored_region(
    o: int, height: int, width: int, x0: int, y0: int, x1: int, y1: int
) -> tuple[int, int, int, int]:
    """The stored pixels (x0, y0, x1, y1) that orientation ``o`` (:data:`_UPRIGHT`) turns
    into the upright region ``[y0, y1) x [x0, x1)`` of an image stored ``height`` x
    ``width`` px: the stored region, turned the same way, is that upright region."""
    h, w = height, width
    return {
        2: (w - x1, y0, w - x0, y1),
        3: (w - x1, h - y1, w - x0, h - y0),
        4: (x0, h - y1, x1, h - y0),
        5: (y0, x0, y1, x1),
        6: (y0, h - x1, y1, h - x0),
        7: (w - y1, h - x1, w - y0, h - x0),
        8: (w - y1, x0, w - y0, x1),
    }.get(o, (x0, y0, x1, y1))


def _exif_upright(
    path: Path, a: np.ndarray, converted: list[str], orientation: int | None = None
) -> np.ndarray:
    """``a`` turned as the file's EXIF orientation says (a phone or camera JPEG stores
    its pixels in the sensor's frame and the turn in a tag: read without it, a cell is
    seen on its side); unchanged without the tag, or when it cannot be read.
    ``orientation``: the tag as already read (a TIFF's, from the series read:
    :class:`TiffLayout`), so a slide read whole and window by window turn alike."""
    o = orientation
    if o is None:
        try:
            with Image.open(path) as im:
                o = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
        except Exception:  # noqa: BLE001 - no readable tag: as stored
            return a
    turn = _UPRIGHT.get(o)
    if turn is None or a.ndim < 2:
        return a
    converted.append(f"exif orientation {o}")
    return np.ascontiguousarray(turn(a))


@dataclass
class TiffLayout:
    """Which part of a TIFF is the image: level 0 (full resolution) of series ``index``,
    the series with the most pixels (a slide scanner's file also holds a label, a macro
    photo and a thumbnail, in any order: Ventana writes the 400x400 label first)."""

    index: int
    n_series: int
    width: int  # upright, as the image is read (``orientation`` applied)
    height: int
    levels: int
    compression: int
    others: list[str]  # the other series, "WxH" each
    orientation: int = 1  # its level 0's TIFF orientation tag (274; 1: as stored)

    def note(self) -> str:
        """The ``converted`` note of a file with several series: which one was read."""
        lv = f", level 0 of {self.levels}" if self.levels > 1 else ""
        return (
            f"tiff series {self.index + 1} of {self.n_series} ({self.width}x{self.height} px"
            f"{lv}; the largest; not read: {', '.join(self.others)})"
        )


def _tiff_layout(path: Path) -> TiffLayout | None:
    """The series of a TIFF read as the image (:class:`TiffLayout`), or None when the file
    is not a TIFF tifffile can parse (the decoders then judge it)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            sizes = []
            for s in tf.series:
                lv = s.levels[0]
                ax, shp = lv.axes, lv.shape
                h = int(shp[ax.index("Y")]) if "Y" in ax else 0
                w = int(shp[ax.index("X")]) if "X" in ax else 0
                tag = lv.keyframe.tags.get(EXIF_ORIENTATION)
                o = int(tag.value) if tag is not None else 1
                if o in (5, 6, 7, 8):  # stored on its side: upright, width and height swap
                    w, h = h, w
                sizes.append((w, h, len(s.levels), int(lv.keyframe.compression), o))
    except Exception:  # noqa: BLE001 - not a TIFF, or a broken one
        return None
    if not sizes:
        return None
    k = max(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], -i))
    w, h, levels, comp, o = sizes[k]
    others = [f"{a}x{b}" for i, (a, b, *_) in enumerate(sizes) if i != k]
    return TiffLayout(k, len(sizes), w, h, levels, comp, others, o if o in _UPRIGHT else 1)


def tiff_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) px of the image a TIFF is read as (level 0 of its largest series,
    :func:`_tiff_layout`), from its header; None for a file that is not a TIFF."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    layout = _tiff_layout(path)
    return None if layout is None else (layout.height, layout.width)


def _too_large(
    path: Path, limit_mp: float = MAX_IMAGE_MEGAPIXELS, layout: TiffLayout | None = None
) -> str:
    """Why ``path`` is not read whole (its header's size is over ``limit_mp``
    megapixels), or "" (also when the header cannot be read: the decoders judge it).
    A TIFF's size is that of the series read (``layout``), not of its first page."""
    if layout is not None:
        w, h = layout.width, layout.height
    else:
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 - not Pillow's format, or broken: _decode says
            return ""
    if w * h <= limit_mp * 1e6:
        return ""
    if layout is not None:  # read window by window unless slide_megapixels was raised
        fix = "set segmentation.slide_megapixels below its size to read it window by window"
    else:
        fix = (
            "save it as a tiled TIFF, which is read window by window, each cell once (vips "
            "tiffsave SLIDE slide.tif --tile --bigtiff --compression deflate)"
        )
    return (
        f"too large to read whole: {w}x{h} px ({w * h / 1e6:.0f} MP > {limit_mp:.0f} MP); "
        f"{fix} (docs/segmentation_infer.md, 'Whole slides')"
    )


# TIFF compressions a reader may lack a codec for (imagecodecs decodes them all)
_TIFF_CODECS = {
    5: "LZW",
    6: "old-style JPEG",
    7: "JPEG",
    33003: "Aperio JPEG 2000 (YCbCr)",
    33004: "Aperio JPEG 2000",
    33005: "Aperio JPEG 2000 (RGB)",
    34712: "JPEG 2000",
    34887: "LERC",
    34925: "LZMA",
    34933: "PNG",
    34934: "JPEG XR",
    50000: "Zstandard",
    50001: "WebP",
    50002: "JPEG XL",
}


def _tiff_codec_reason(path: Path, layout: TiffLayout | None, error: str) -> str:
    """A TIFF's "unreadable" reason naming its compression and the fix, or "" when the
    compression is one every reader decodes (none, deflate, PackBits)."""
    if layout is None or layout.compression in (1, 8, 32773, 32946):
        return ""
    import importlib.util

    code = layout.compression
    name = _TIFF_CODECS.get(code, "unknown to tifffile")
    if code not in _TIFF_CODECS:
        fix = "no reader here has its codec:"
    elif importlib.util.find_spec("imagecodecs") is None:
        fix = "install imagecodecs (pip install imagecodecs), which decodes it, or"
    else:
        fix = "imagecodecs is installed but could not decode it (a damaged file?):"
    return (
        f"unreadable: TIFF compression {code} ({name}) not decoded ({error}); {fix} export "
        f"the image as an uncompressed or deflate TIFF (QuPath, bfconvert, vips tiffsave)"
    )


def _read_tiff(path: Path, layout: TiffLayout, converted: list[str]) -> np.ndarray:
    """Level 0 of the TIFF series ``layout`` names, as (H, W[, C]); a stack's first page
    (noted), channels stored as planes interleaved."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        s = tf.series[layout.index].levels[0]
        ax = s.axes
        cmyk = s.keyframe.photometric == tifffile.PHOTOMETRIC.SEPARATED
        a = s.asarray()
    if layout.n_series > 1:
        converted.append(layout.note())
        log.info("%s: %s", path.name, layout.note())
    return _channels_last(a, ax, cmyk, converted)


def _channels_last(a: np.ndarray, ax: str, cmyk: bool, converted: list[str]) -> np.ndarray:
    """A TIFF series' array with tifffile's axes ``ax`` as (H, W[, C]): channels last, a
    stack's first page (noted), CMYK ink converted to RGB (noted)."""
    # channels stored as planes: tifffile calls them S (samples, "SYX": a planar RGB
    # file, which was read as its red plane in grey) or C; they go last
    for name in ("S", "C"):
        if not ax.endswith(name) and name in ax and a.shape[ax.index(name)] in (3, 4):
            a = np.moveaxis(a, ax.index(name), -1)
            ax = ax.replace(name, "") + "S"
            break
    while a.ndim > (3 if ax.endswith("S") else 2):
        converted.append(f"first page of {a.shape[0]}")
        a, ax = a[0], ax[1:]
    if cmyk and a.ndim == 3 and a.shape[-1] == 4 and a.dtype == np.uint8:
        # ink, not RGBA: Pillow converts it as it does a CMYK file it reads itself
        converted.append("cmyk->rgb")
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a), mode="CMYK").convert("RGB"))
    return np.ascontiguousarray(a)


class SlideReader:
    """Regions of a TIFF read one at a time, never the whole image: a whole slide.

    tifffile's zarr view of level 0 of the largest series (:func:`_tiff_layout`) decodes
    only the tiles or strips a region touches, so memory follows the region, not the
    slide (a scanner's slide of several gigapixels was refused as too large to read
    whole). Each region gets :func:`read_rgb`'s conversions.

    Examples
    --------
    >>> with SlideReader("slide.svs") as r:            # doctest: +SKIP
    ...     rd = r.read(0, 0, 4096, 4096)              # x0, y0, x1, y1 in slide px
    ...     rd.image.shape
    (4096, 4096, 3)
    """

    def __init__(self, path: str | Path, layout: TiffLayout | None = None):
        import tifffile
        import zarr

        self.path = Path(path)
        self.layout = layout if layout is not None else _tiff_layout(self.path)
        if self.layout is None:
            raise ImageReadError(self.path, "not a TIFF tifffile can read region by region")
        self._tf = tifffile.TiffFile(self.path)
        self._store = None
        self._top: float | None = None  # a 16-bit slide's range (_to_8bit)
        try:
            lv = self._tf.series[self.layout.index].levels[0]
            self.axes: str = lv.axes
            self._cmyk = lv.keyframe.photometric == tifffile.PHOTOMETRIC.SEPARATED
            # the series' own level 0 (a pyramid's levels[0].aszarr() is a group of all)
            self._store = self._tf.series[self.layout.index].aszarr(level=0)
            self._z = zarr.open(self._store, mode="r")
        except Exception:
            self.close()
            raise

    def storage_note(self, window: int) -> str:
        """A warning when the slide is stored in pieces far larger than a ``window`` px
        square (one strip for the whole image: review, a 243 MB file decoded whole for
        each window), else "": each window then decodes those pieces whole."""
        ax = self.axes
        chunk = self._z.chunks
        px = int(chunk[ax.index("Y")]) * int(chunk[ax.index("X")])
        if px <= 4 * window * window:
            return ""
        return (
            f"{self.path.name} is stored in pieces of {px / 1e6:.1f} MP (strips, not tiles): "
            f"each {window} px window decodes them whole, so memory and time follow the "
            f"pieces; save it tiled (vips tiffsave SLIDE slide.tif --tile --bigtiff "
            f"--compression deflate)"
        )

    @property
    def height(self) -> int:
        return self.layout.height

    @property
    def width(self) -> int:
        return self.layout.width

    def read(
        self, x0: int, y0: int, x1: int, y1: int, convert: bool = True, background: int = 255
    ) -> ImageRead:
        """Slide px ``[y0, y1) x [x0, x1)`` as (y1 - y0, x1 - x0, 3) uint8 RGB, or the
        reason it cannot be read (a damaged tile: this region only, never a raise).
        Slide px are upright, as :func:`read_rgb` turns the whole image (the TIFF's
        orientation tag): the stored region is read and turned."""
        converted: list[str] = []
        index: list[Any] = []
        kept = ""
        o = self.layout.orientation
        ax = self.axes
        sx0, sy0, sx1, sy1 = _stored_region(
            o, int(self._z.shape[ax.index("Y")]), int(self._z.shape[ax.index("X")]),
            x0, y0, x1, y1,
        )  # fmt: skip
        for k, name in enumerate(ax):
            n = int(self._z.shape[k])
            if name in "YX":
                index.append(slice(sy0, sy1) if name == "Y" else slice(sx0, sx1))
            elif name == "S" or (name == "C" and n in (2, 3, 4)):
                index.append(slice(None))
            else:  # a stack's other pages (Z, T, ...) are not read: its first, noted
                index.append(0)
                if n > 1:
                    converted.append(f"first page of {n}")
                continue
            kept += name
        if self.layout.n_series > 1:  # which series is the slide, as read_rgb notes it
            converted.append(self.layout.note())
        try:
            a = np.asarray(self._z[tuple(index)])
        except Exception as e:  # noqa: BLE001 - a damaged tile or a codec: this region
            where = f"region x {x0}-{x1}, y {y0}-{y1}"
            why = _tiff_codec_reason(self.path, self.layout, error_line(e, 120))
            return ImageRead(
                self.path, None, [], f"{where}: {why or 'unreadable: ' + error_line(e, 160)}"
            )
        a = _channels_last(a, kept, self._cmyk, converted)
        if o in _UPRIGHT:
            a = np.ascontiguousarray(_UPRIGHT[o](a))
            converted.append(f"exif orientation {o}")
        if a.dtype in (np.uint16, np.int16, np.int32) and convert:
            a = self._to_8bit(a, converted)
        return _as_rgb(self.path, a, converted, convert, 1, background)

    def _to_8bit(self, a: np.ndarray, converted: list[str]) -> np.ndarray:
        """A 16-bit region as 8-bit on the slide's one range: ``_to_uint8`` scales an
        image by its own maximum when it is 12-bit (<= 4095), which window by window gave
        one slide other grey levels in each window (review: 128 read whole, 255 in a
        window). The range is set once, from the slide's smallest pyramid level when
        there is one, else from the first region read: 65535, or 4095 for 12-bit data."""
        if self._top is None:
            sample = a
            if self.layout.levels > 1:
                with contextlib.suppress(Exception):  # a damaged level: the region then
                    lv = self._tf.series[self.layout.index].levels[-1]
                    sample = lv.asarray()
            self._top = 65535.0 if int(np.max(sample, initial=0)) > 4095 else 4095.0
        return _to_uint8(a, converted, self._top)

    def close(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
        self._tf.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(path: Path, converted: list[str], layout: TiffLayout | None = None) -> np.ndarray:
    """Decode with imageio (keeps 16-bit RGB), falling back to Pillow.

    Four channels are RGBA except in a CMYK file (print-ready JPEG / TIFF exports):
    Pillow converts those to RGB, noted in ``converted``. A TIFF of several series (a
    scanner's slide with its label, macro and thumbnail) or a scanner's own suffix is read
    by tifffile, the largest series (``layout``): imageio read the first page, which in a
    Ventana file is the label.
    """
    if layout is not None and (layout.n_series > 1 or path.suffix.lower() in TIFF_SLIDE_SUFFIXES):
        return _read_tiff(path, layout, converted)
    try:
        import imageio.v3 as iio

        try:
            str(path).encode("utf-8")
            src: Any = path
        except UnicodeEncodeError:
            # a name of non-UTF-8 bytes (Latin-1 from a Windows share): imageio's OpenCV
            # plugin crashed the process (segfault) on such a path; it gets the bytes
            src = path.read_bytes()
        a = np.asarray(iio.imread(src, extension=path.suffix.lower() or None))
    except Exception:  # noqa: BLE001 - try the other decoder before giving up
        a = None
    if a is not None and a.ndim == 4:  # a stack of pages (pages, H, W, C): the first
        converted.append(f"first page of {a.shape[0]}")
        a = a[0]
    elif a is not None and a.ndim == 3 and a.shape[-1] > 4:
        # not (H, W, C): a stack of grey pages (pages, H, W) or channels stored as planes
        # (C, H, W); the file's page count tells which. Read here, not by Pillow, which
        # returns a 16-bit planar RGB file as wrong 8-bit pixels without a word
        pages = _page_count(path)
        if pages > 1 and pages == a.shape[0]:
            converted.append(f"first page of {pages}")
            a = a[0]
        elif a.shape[0] in (3, 4):
            a = np.ascontiguousarray(np.moveaxis(a, 0, -1))
    if a is not None and not (a.ndim == 3 and a.shape[-1] == 4 and a.dtype == np.uint8):
        return a
    # Pillow: the fallback, and the judge of what four 8-bit channels mean
    with Image.open(path) as im:
        pages = int(getattr(im, "n_frames", 1) or 1)
        said = any(c.startswith("first page") for c in converted)
        if pages > 1 and not said:  # a stack: the first page is the image, said so
            converted.append(f"first page of {pages}")
        if im.mode == "CMYK":
            converted.append("cmyk->rgb")
            return np.asarray(im.convert("RGB"))
        if a is not None:  # RGBA, as imageio read it
            return a
        im.load()
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        return np.asarray(im)


# modes :func:`_decode_reduced` reads reduced (8-bit colour and grey); any other (16-bit,
# RGBA, palette, CMYK...) is decoded whole, with :func:`_decode`'s and :func:`_as_rgb`'s rules
_REDUCED_MODES = ("RGB", "L")


def _decode_reduced(
    path: Path, converted: list[str], reduce_to: int, min_side: int = 8
) -> np.ndarray | None:
    """The image decoded at 1/k of its size (k >= 2, its long side kept >= ``reduce_to``
    and its short side >= ``min_side``: a thin strip the whole decode accepts is never
    made too small to use), or None where it is not (too small to gain, a TIFF, a stack, another mode, a file
    Pillow cannot read: the whole decode then reads it, or rejects it, as before).

    A JPEG is decoded reduced by its own decoder (``Image.draft``: DCT scaling by 1/2, 1/4
    or 1/8, never a full-size array), then, as any other format, box-reduced
    (``Image.reduce``) by what is left of k. A 14000 x 14000 px JPEG crop held 2.5 GB
    decoded whole for a 128 px crop; reduced, a few MB (docs/embed.md, "Huge crops").
    """
    if path.suffix.lower() in TIFF_SUFFIXES:  # series, levels, planes: _decode's rules
        return None
    try:
        with Image.open(path) as im:
            w, h = im.size
            k = min(max(w, h) // reduce_to, min(w, h) // max(int(min_side), 1))
            if k < 2 or im.mode not in _REDUCED_MODES or int(getattr(im, "n_frames", 1) or 1) > 1:
                return None
            if im.format == "JPEG":  # scaled while decoded: at least (w // k, h // k)
                im.draft(im.mode, (w // k, h // k))
            f = min(max(im.size) // reduce_to, min(im.size) // max(int(min_side), 1))
            out = im.reduce(f) if f >= 2 else im
            a = np.asarray(out)
    except Exception:  # noqa: BLE001 - a damaged file: the whole decode judges it, as before
        return None
    converted.append(f"decoded reduced {w}x{h} -> {a.shape[1]}x{a.shape[0]}")
    return a


def read_rgb(
    path: str | Path,
    convert: bool = True,
    min_side: int = 8,
    background: int = 255,
    reduce_to: int | None = None,
) -> ImageRead:
    """Read any image as (H, W, 3) uint8 RGB, or say why it cannot be used.

    Parameters
    ----------
    path
        Image file.
    convert
        Convert grayscale, RGBA/LA, 16-bit and float images to RGB uint8. With
        ``False`` such images are rejected instead (reason names the format).
    min_side
        Images smaller than this (px) in either dimension are rejected.
    background
        Grey level an alpha channel is composited onto (255: white slide).
    reduce_to
        The long side (px) the caller needs at least, for a reader that shrinks the
        image anyway (a crop folder's crops, resized to the model's side): an 8-bit RGB
        or grey image that is not a TIFF and whose long side is 2x this or more is
        decoded reduced by an integer factor, its long side kept >= ``reduce_to``
        (:func:`_decode_reduced`; noted in ``converted``). None (default): full
        resolution, as smears and the detector need.

    Returns
    -------
    ImageRead
        Never raises for a bad file; a missing file is also a reject.
    """
    path = Path(path)
    converted: list[str] = []
    if is_other_slide(path):
        return ImageRead(path, None, [], f"a whole-slide format that is not a TIFF; {SLIDE_EXPORT}")
    layout = _tiff_layout(path) if path.suffix.lower() in TIFF_SUFFIXES else None
    big = _too_large(path, MAX_IMAGE_MEGAPIXELS, layout)
    if big:
        return ImageRead(path, None, [], big)
    t0 = time.perf_counter()
    try:
        a = _decode_reduced(path, converted, reduce_to, min_side) if reduce_to else None
        if a is None:
            a = _decode(path, converted, layout)
    except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable"
        why = _tiff_codec_reason(path, layout, error_line(e, 120))
        return ImageRead(path, None, [], why or f"unreadable: {error_line(e, 160)}")
    if a.ndim >= 2 and a.shape[0] * a.shape[1] > PROGRESS_MEGAPIXELS * 1e6:  # said
        log.info(
            "read %s: %dx%d px (%.0f MP) in %.1f s",
            path.name,
            a.shape[1],
            a.shape[0],
            a.shape[0] * a.shape[1] / 1e6,
            time.perf_counter() - t0,
        )
    a = _exif_upright(path, a, converted, None if layout is None else layout.orientation)
    return _as_rgb(path, a, converted, convert, min_side, background)


def _as_rgb(
    path: Path,
    a: np.ndarray,
    converted: list[str],
    convert: bool = True,
    min_side: int = 8,
    background: int = 255,
) -> ImageRead:
    """A decoded (H, W[, C]) array as RGB uint8 (:func:`read_rgb`'s conversions, each
    named in ``converted``), or the reason it cannot be used."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        if not convert:
            return ImageRead(path, None, [], f"grayscale image ({a.dtype}); convert_images=false")
        converted.append("grayscale->rgb")
        a = np.stack([a, a, a], axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (2, 3, 4):
        return ImageRead(path, None, [], f"unsupported array shape {tuple(a.shape)}")
    if a.shape[-1] == 2:  # gray + alpha
        a = np.concatenate([a[..., :1]] * 3 + [a[..., 1:]], axis=-1)
        converted.append("grayscale->rgb")
    if a.dtype != np.uint8 and not convert:
        return ImageRead(path, None, [], f"{a.dtype} image; convert_images=false")
    if a.shape[-1] == 4:
        if not convert:
            return ImageRead(path, None, [], "RGBA image; convert_images=false")
        alpha = _to_uint8(a[..., 3], []).astype(np.float32)[..., None] / 255.0
        rgb = _to_uint8(a[..., :3], converted).astype(np.float32)
        a = (rgb * alpha + background * (1.0 - alpha) + 0.5).astype(np.uint8)
        converted.append("rgba->rgb")
    else:
        a = _to_uint8(a, converted)
    if min(a.shape[:2]) < min_side:
        return ImageRead(path, None, converted, f"too small: {a.shape[1]}x{a.shape[0]} px")
    return ImageRead(path, np.ascontiguousarray(a), converted, "")


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")


def final_name(path: str | os.PathLike) -> Path:
    """The file an :func:`atomic_path` temporary becomes (``path`` itself when it is not
    one): what a message names, since the temporary is gone when the user looks."""
    path = Path(path)
    m = re.fullmatch(r"\.(.+)\.tmp-[0-9a-f]{8}", path.name)
    return path.with_name(m.group(1)) if m else path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it into place on success.

    Works for files and folders. If the body raises, the temporary is removed
    and ``final`` (if it existed) is left untouched.

    Examples
    --------
    >>> with atomic_path("out/cells.h5ad") as tmp:  # doctest: +SKIP
    ...     adata.write_h5ad(tmp)
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic write of {final}: nothing was written to {tmp}")
        if final.is_dir() and not final.is_symlink():
            old = _tmp_name(final)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


# what Excel / LibreOffice read as the start of a formula in a CSV cell (OWASP, "CSV
# injection"); a tab or carriage return first is one too
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _needs_quote(v: str) -> bool:
    # a formula start that is not a number; or text that already reads as quoted
    # ("'=x"), so that quoting stays reversible (spreadsheet_unquote gives "'=x" back)
    if v.startswith("'"):
        return _needs_quote(v[1:])
    if not v.startswith(FORMULA_START):
        return False
    try:
        float(v)
        return False
    except ValueError:
        return True


def spreadsheet_safe(df):
    """A copy of the DataFrame ``df`` to write as a CSV a lab opens in a spreadsheet: a
    text cell starting with ``= + - @`` (tab, CR) that is not a number gets a leading
    ``'``, so a sample folder named ``=HYPERLINK(...)`` or ``+EDTA`` is shown as written
    instead of run as a formula (or shown as ``#NAME?``). Number columns, and text that
    reads as a number (``-3``), are kept. :func:`spreadsheet_unquote` reverses it (a
    name that itself starts ``'=`` gets one more ``'``, so nothing is lost)."""

    def safe(v):
        return "'" + v if isinstance(v, str) and _needs_quote(v) else v

    out = df.copy()
    for c in out.columns:
        if out[c].dtype.kind not in "biufcmM":  # text, object or category columns
            out[c] = out[c].astype(object).map(safe)
    return out


def spreadsheet_unquote(v):
    """A cell of a :func:`spreadsheet_safe` CSV as it was before quoting (anything else
    as given): what a reader that matches names (a reviewed ``label_suspects.csv``)
    applies, so a crop named ``=x.png`` is still found."""
    if isinstance(v, str) and v.startswith("'") and _needs_quote(v[1:]):
        return v[1:]
    return v


class ImageReadError(ValueError):
    """An image file cannot be read; the message names the file and the reason
    (``reason`` alone, for a row that names the file itself)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: not a readable image ({reason})")


def load_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of any image (grey/RGBA/16-bit converted as :func:`read_rgb` does).

    Raises
    ------
    ImageReadError
        When :func:`read_rgb` rejects the file.
    """
    r = read_rgb(path, convert=True, min_side=1)
    if r.image is None:
        raise ImageReadError(path, r.reason)
    return r.image


def write_label_image(path: str | os.PathLike, labels: np.ndarray) -> None:
    """A label image as a zlib-compressed TIFF (ImageJ / Fiji, napari, QuPath and
    scikit-image read it as one plane of cell labels: 0 background, k >= 1 a cell)."""
    import tifffile

    tifffile.imwrite(path, labels, compression="zlib")


# ----------------------------------------------------------------------------
# COCO masks
# ----------------------------------------------------------------------------


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a (H, W) bool mask, with ``counts`` as ``str`` (JSON-safe)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_rle(seg: Any, h: int, w: int) -> dict[str, Any] | None:
    """A COCO ``segmentation`` field (polygons, uncompressed or compressed RLE) as compressed
    RLE with ``str`` counts; None when empty.

    Raises ``TypeError``/``ValueError`` on anything else.
    """
    from pycocotools import mask as mask_utils

    if seg is None or (isinstance(seg, list) and len(seg) == 0):
        return None
    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed
        rle = mask_utils.frPyObjects(seg, h, w)
    elif isinstance(seg, dict) and "counts" in seg:
        rle = {"size": list(seg["size"]), "counts": seg["counts"]}
    else:
        raise TypeError(f"unsupported type {type(seg).__name__}")
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def decode_coco_mask(seg: Any, h: int, w: int) -> np.ndarray:
    """(h, w) bool mask of a COCO ``segmentation`` field (all False when empty)."""
    from pycocotools import mask as mask_utils

    rle = coco_rle(seg, h, w)
    if rle is None:
        return np.zeros((h, w), bool)
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(
        bool
    )


class UnsafeCheckpointError(ValueError):
    """A checkpoint file is unreadable, or holds objects other than tensors and plain data.

    Checkpoints are unpickled with ``torch.load(weights_only=True)``: a file that
    names any other Python object (a pickle that would run code) is refused,
    never executed. The message names the file and what was refused.
    """


def _numpy_safe_globals() -> list[Any]:
    """The numpy constructors that older checkpoints used for RNG state and scalars.

    They build arrays and scalars from raw bytes only (the same list torch's own
    error message suggests); nothing else is allowed.
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: list[Any] = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    for name in ("UInt32DType", "Int64DType", "Float64DType", "Float32DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            allowed.append(getattr(np.dtypes, name))
    return allowed


# Layout of a detector checkpoint (segmentation.model.save_checkpoint: model, model_args,
# optimizer, scheduler, epoch, rng, history, config, input scale...), written as
# ``format_version`` by segment_train (checkpoints without it are format 0). Bump it when
# a detector written by this code can no longer be read correctly by older code (a key
# renamed or given another meaning, a new key older code must not ignore), so that older
# code refuses it as "written by a newer version" (segmentation.provenance) instead of
# misreading it.
DETECTOR_FORMAT_VERSION = 1


def load_torch_file(path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint"):
    """Load a ``torch.save`` file safely (``weights_only=True``).

    Parameters
    ----------
    path
        The ``.pt`` file.
    map_location
        Passed to :func:`torch.load`.
    what
        How the file is named in messages (e.g. ``"paths.inputs.model"``).

    Returns
    -------
    The unpickled object: tensors, dicts, lists, tuples, str, numbers, None.

    Raises
    ------
    UnsafeCheckpointError
        The file is missing, not a torch file, truncated, or holds anything but
        tensors and plain data (no code from the file ever runs).
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UnsafeCheckpointError(f"{what}={path}: no such file")
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(
            f"{what}={path}: not a torch checkpoint (not a zip archive as torch.save "
            f"writes: another kind of file, or a truncated copy)"
        )
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long and suggests the unsafe mode: keep only the cause
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        hits = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
        cause = (hits or lines[-1:] or [type(e).__name__])[0]
        raise UnsafeCheckpointError(
            f"{what}={path}: refused to load: it holds objects other than tensors and "
            f"plain data ({cause}). Only checkpoints written by this pipeline are accepted; "
            f"a pickled object could run code."
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise UnsafeCheckpointError(
            f"{what}={path}: not a readable torch checkpoint ({type(e).__name__}: {error_line(e)})"
        ) from None


def categorical_strings(adata: Any) -> list[str]:
    """Turn repeated-string ``obs``/``var`` columns into categoricals, in place.

    The same rule as anndata's own conversion at write time (string columns
    with fewer categories than rows; categories sorted), done beforehand so
    anndata does not print "... storing 'kind' as categorical" once per column.

    Returns
    -------
    list of str
        The converted column names.

    >>> import anndata as ad, pandas as pd
    >>> a = ad.AnnData(obs=pd.DataFrame({"kind": ["band", "band", "blast"]}, index=list("xyz")))
    >>> categorical_strings(a), list(a.obs["kind"].cat.categories)
    (['kind'], ['band', 'blast'])
    """
    import pandas as pd
    from pandas.api.types import infer_dtype

    done = []
    for df in (adata.obs, adata.var):
        for key in df.columns:
            if infer_dtype(df[key]) != "string":
                continue
            c = pd.Categorical(df[key])
            if len(c.categories) < len(c):
                df[key] = c.reorder_categories(sorted(c.categories))
                done.append(key)
    return done


def _string_categorical(col: Any) -> bool:
    """Whether ``col`` is a categorical of strings (not of numbers or booleans)."""
    import pandas as pd
    from pandas.api.types import infer_dtype

    return isinstance(col.dtype, pd.CategoricalDtype) and infer_dtype(col.cat.categories) in (
        "string",
        "empty",
    )


def blank_as_missing(df: Any, columns: Any = None) -> Any:
    """A copy of ``df`` whose categorical string columns hold NaN where they held ``""``.

    What a written ``.h5ad`` holds for "no value": scanpy greys NaN as NA and
    ``isna()`` finds it, whereas a ``""`` category is drawn in a palette colour with a
    blank legend entry and is a factor level ``""`` in R. :func:`blank_as_read` turns
    them back at read time, so code that compares with ``""`` reads the same values.

    Parameters
    ----------
    df : pandas.DataFrame
        An ``obs`` or ``var``; not changed.
    columns : iterable of str, optional
        Only these columns (the pipeline's own, where ``df`` also holds a user's);
        None: every categorical string column. Object columns of strings among them
        become categoricals first.

    Returns
    -------
    pandas.DataFrame

    >>> import pandas as pd
    >>> df = pd.DataFrame({"label": pd.Categorical(["", "band", "band"])})
    >>> blank_as_missing(df)["label"].isna().tolist(), df["label"].isna().tolist()
    ([True, False, False], [False, False, False])
    """
    import pandas as pd
    from pandas.api.types import infer_dtype

    out = df.copy()
    names = list(out.columns) if columns is None else [c for c in columns if c in out]
    for key in names:
        col = out[key]
        if columns is not None and infer_dtype(col) == "string":
            col = pd.Series(pd.Categorical(col), index=out.index)
            col = col.cat.reorder_categories(sorted(col.cat.categories))
        if _string_categorical(col) and "" in col.cat.categories:
            # set_categories keeps their order (remove_categories sorts them)
            out[key] = col.cat.set_categories([c for c in col.cat.categories if c != ""])
        elif col is not out[key]:
            out[key] = col
    return out


def blank_as_read(adata: Any) -> Any:
    """Turn NaN back into ``""`` in the categorical string columns of ``obs``/``var``,
    in place: every reader of an ``.h5ad`` the pipeline wrote calls this.

    :func:`write_h5ad` writes a missing string as NaN (:func:`blank_as_missing`); the
    pipeline's code reads "no value" as ``""`` (``== ""``, ``astype(str)``, which would
    make NaN the string ``"nan"``). Files written before NaN (with a ``""`` category)
    are unchanged by it. ``""`` sorts first among the categories, as it did in them.

    Parameters
    ----------
    adata : AnnData (in memory or backed) or pandas.DataFrame

    Returns
    -------
    The same ``adata``.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"label": pd.Categorical([None, "band", "band"])})
    >>> blank_as_read(df)["label"].tolist(), list(df["label"].cat.categories)
    (['', 'band', 'band'], ['', 'band'])
    """
    import pandas as pd

    frames = [adata] if isinstance(adata, pd.DataFrame) else [adata.obs, adata.var]
    for df in frames:
        for key in df.columns:
            col = df[key]
            if not _string_categorical(col) or not col.isna().any():
                continue
            if "" not in col.cat.categories:
                col = col.cat.add_categories([""])
            col = col.fillna("")
            df[key] = col.cat.reorder_categories(sorted(col.cat.categories))
    return adata


# What an .h5ad write needs beyond its arrays (groups, attributes, uns, the obs/var
# index strings' overhead), and the share of each array's bytes compressed to estimate a
# gzip write's ratio (zlib level 4 = h5py's gzip default, on up to 4 MiB of rows per array)
H5AD_OVERHEAD_BYTES = 1 << 20
H5AD_SAMPLE_BYTES = 4 << 20


def array_bytes(a: Any, compression: str | None) -> float:
    """Bytes ``a`` (dense or scipy sparse) takes in an .h5ad, estimated (see
    :func:`h5ad_bytes`)."""
    import zlib

    from scipy import sparse

    parts = [a.data, a.indices, a.indptr] if sparse.issparse(a) else [np.asarray(a)]
    total = 0.0
    for part in parts:
        n = float(part.nbytes)
        if compression and n > 0 and part.dtype != object and part.ndim >= 1:
            # rows spread over the whole array: its first rows may be one source's
            # (a real chain's first 341 crops compress to 0.47, all of them to 0.23)
            rows = max(1, H5AD_SAMPLE_BYTES * len(part) // max(1, part.nbytes))
            pick = np.unique(np.linspace(0, len(part) - 1, min(rows, len(part))).astype(int))
            raw = np.ascontiguousarray(part[pick]).tobytes()
            n *= len(zlib.compress(raw, 4)) / max(1, len(raw))
        total += n
    return total


def h5ad_bytes(adata: Any, compression: str | None = None) -> float:
    """Bytes an ``.h5ad`` of ``adata`` will take on disk, estimated (within ~10 %).

    Parameters
    ----------
    adata
        An AnnData in memory (a backed one reads its arrays).
    compression
        ``"gzip"`` / ``"lzf"``: each array's size is scaled by its zlib ratio on a
        sample of 4 MiB of rows spread over it; ``None``: raw bytes.

    Returns
    -------
    float
        Bytes: X, layers, obsm, varm, obsp, varp and ``.raw``'s X, plus obs/var
        (pandas' deep memory use) and a fixed 1 MiB for structure and ``uns``.
    """
    arrays = [adata.X] if adata.X is not None else []
    for group in ("layers", "obsm", "varm", "obsp", "varp"):
        arrays += [v for v in getattr(adata, group).values() if hasattr(v, "shape")]
    if adata.raw is not None:
        arrays.append(adata.raw.X)
    total = float(H5AD_OVERHEAD_BYTES)
    for a in arrays:
        with contextlib.suppress(Exception):  # an exotic type (dask, awkward): not counted
            total += array_bytes(a, compression)
    for df in (adata.obs, adata.var):
        total += float(df.memory_usage(deep=True).sum())
    return total


def free_space_problem(path: str | os.PathLike, need_bytes: float) -> str:
    """Why ``need_bytes`` will not fit beside ``path`` (the disk or quota its folder is
    on), or "" (also when the free space cannot be read)."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return ""
    if free >= need_bytes:
        return ""
    return (
        f"not enough free disk space to write it: about {need_bytes / 2**20:,.0f} MiB "
        f"needed, {free / 2**20:,.0f} MiB free on that disk; free space there, or point "
        f"paths.root at a larger disk"
    )


def check_h5ad_fits(
    adata: Any,
    path: str | os.PathLike,
    compression: str | None = None,
    extra_bytes: float = 0.0,
) -> None:
    """Raise before writing when an ``.h5ad`` of ``adata`` (plus ``extra_bytes``, e.g.
    arrays :func:`add_obsm_rows` adds after the write) will not fit beside ``path``.

    Raises
    ------
    OSError
        ``errno.ENOSPC`` naming ``path`` (the final name of an :func:`atomic_path`
        temporary) when :func:`h5ad_bytes` is more than the free space: h5py crashed the
        process (segmentation fault) on a disk that filled during a compressed write.
    """
    import errno

    problem = free_space_problem(path, h5ad_bytes(adata, compression) + extra_bytes)
    if problem:
        raise OSError(errno.ENOSPC, problem, str(final_name(path)))


# Rows per HDF5 chunk of an obsm array added by add_obsm_rows: rows no block fills are
# chunks never written (zeros on reading, no disk space); 16 crops of 64 px are 196 KB,
# within h5py's advice of chunks under 1 MiB
OBSM_CHUNK_ROWS = 16


def add_obsm_rows(
    path: str | os.PathLike,
    key: str,
    n_rows: int,
    blocks: list[tuple[int, Any]],
    compression: str | None = "gzip",
) -> None:
    """Add ``obsm[key]`` to a written ``.h5ad``, filled block by block.

    An array of mostly zero rows (the crops of a query whose expression-only rows have
    none) is never held whole: 100k expression cells beside 1000 crops held 1.6 GB of
    zeros in memory to write them.

    Parameters
    ----------
    path
        An ``.h5ad`` without ``obsm[key]`` (e.g. the temporary of :func:`atomic_path`).
    key
        The ``obsm`` name.
    n_rows
        Rows of the file (its ``n_obs``).
    blocks
        ``(first_row, array)`` pairs, arrays of shape (k, ...) sharing trailing shape and
        dtype; rows no block covers read back as zeros (unwritten chunks take no space).
        At least one block.
    compression
        As in ``AnnData.write_h5ad``.
    """
    import h5py

    first = np.asarray(blocks[0][1])
    shape = (int(n_rows), *first.shape[1:])
    chunks = (max(1, min(OBSM_CHUNK_ROWS, int(n_rows))), *first.shape[1:])
    with h5py.File(path, "a") as f:
        group = f.require_group("obsm")
        ds = group.create_dataset(
            key, shape=shape, dtype=first.dtype, chunks=chunks, compression=compression
        )
        # what anndata's own writer sets on a dense array, so read_h5ad reads it
        ds.attrs["encoding-type"] = "array"
        ds.attrs["encoding-version"] = "0.2.0"
        for start, a in blocks:
            a = np.asarray(a)
            if a.shape[1:] != shape[1:] or a.dtype != first.dtype:
                raise ValueError(
                    f"obsm[{key!r}]: a block of shape {a.shape} {a.dtype} beside "
                    f"{first.shape} {first.dtype}"
                )
            ds[start : start + len(a)] = a


def write_h5ad(adata: Any, path: str | os.PathLike, **kw: Any) -> None:
    """``adata.write_h5ad(path, **kw)`` after :func:`categorical_strings` (no conversion
    noise) and :func:`check_h5ad_fits`; a ``""`` in a categorical string column is
    written as NaN (:func:`blank_as_missing`; readers call :func:`blank_as_read`)."""
    categorical_strings(adata)
    check_h5ad_fits(adata, path, kw.get("compression"))
    obs, var = adata.obs, adata.var
    # swapped in for the write only: callers go on using adata, whose "" they compare with
    adata.obs, adata.var = blank_as_missing(obs), blank_as_missing(var)
    try:
        adata.write_h5ad(path, **kw)
    finally:
        adata.obs, adata.var = obs, var
