"""Readers that turn smear annotations into one internal COCO-style dataset.

Formats: COCO instances JSON (RLE or polygon segmentations; the simulator's
output and what CVAT / Label Studio export), Pascal VOC XML boxes
(``smears/bccd``, splits in ``ImageSets/Main``), YOLO txt boxes
(``smears/txl_pbc``, ``labels/classes.txt``) and per-image mask PNGs
(``cells/segmentation_wbc``: 0 background, 128 cytoplasm, 255 nucleus; the
whole cell is ``mask > 0``).

Every reader returns a :class:`SmearDataset`: a list of
:class:`ImageRecord` with :class:`Instance` objects whose ``bbox`` is
``(x0, y0, x1, y1)`` in source pixels (x1/y1 exclusive, as COCO ``x + w``)
and whose ``mask`` is a COCO RLE dict or ``None`` (box-only annotation).
Only white cells (``category == "wbc"``) are detection targets; red cells
and platelets are kept in the records for statistics.

:class:`DetectionDataset` turns records into torchvision detection
``(image, target)`` pairs, optionally rescaled so that white cells have a
fixed size in pixels, augmented, and with masks for box-only instances made
from pseudo-masks or marked "unknown" (mask loss ignored there).
"""

from __future__ import annotations

import csv
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segmentation.io import (  # noqa: F401 - encode_mask, load_rgb: used by callers
    ImageReadError,
    coco_rle,
    encode_mask,
    load_rgb,
    read_rgb,
)
from segmentation.magnification import whole_boxes

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# label value of a mask pixel whose truth is unknown (mask loss ignores it);
# survives nearest-neighbour resizing, > 1 so it never looks like a probability
MASK_UNKNOWN = 2

_ALIASES = {
    "wbc": "wbc",
    "white blood cell": "wbc",
    "white_blood_cell": "wbc",
    "leukocyte": "wbc",
    "leucocyte": "wbc",
    "rbc": "rbc",
    "red blood cell": "rbc",
    "red_blood_cell": "rbc",
    "erythrocyte": "rbc",
    "platelet": "platelet",
    "platelets": "platelet",
    "plt": "platelet",
}


def canonical_category(name: str) -> str:
    """Map a data set's class name to ``wbc`` / ``rbc`` / ``platelet`` (else lower-case name)."""
    key = str(name).strip().lower()
    return _ALIASES.get(key, key)


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file and field."""


# Skip.field of one annotation left out (the rest of its file and image are used), as
# against ``image`` / ``annotation`` (a whole image or annotation file left out)
ANNOTATION_FIELDS = ("bbox", "segmentation")


@dataclass
class Skip:
    """A file left out of a data set instead of stopping the run, and why.

    Attributes
    ----------
    path
        The image, or the annotation file that could not be used.
    reason
        Why (without the path).
    field
        ``image`` (the picture cannot be read or does not match its annotation) or
        ``annotation`` (the annotation file is malformed), or, for one annotation left
        out, the field at fault (:data:`ANNOTATION_FIELDS`).
    category
        The class of an annotation left out (as read, e.g. ``wbc`` or ``neutrophil``);
        empty for a file.
    """

    path: Path
    reason: str
    field: str = "image"
    category: str = ""


def record_skip(
    skipped: list[Skip], path: str | Path, reason: str, field: str = "image", note: str = ""
) -> None:
    """Log ``path`` as skipped (``reason``, plus ``note`` in the log only) and add its
    :class:`Skip` to ``skipped``: every reader and check that leaves a file out does so
    here, so the log line and the reject row always agree."""
    log.warning("skipped %s: %s%s", path, reason, note)
    skipped.append(Skip(Path(path), reason, field))


def _left_out(skipped: list[Skip] | None, path: Path, err: AnnotationError, field: str) -> None:
    """Record ``err`` for ``path`` in ``skipped``; with no list to record into, raise it
    (the readers' behaviour when called on their own: the first bad file stops them)."""
    if skipped is None:
        raise err
    reason = str(err)
    for prefix in (f"{path}: ", f"{path} "):  # the messages start with the path
        if reason.startswith(prefix):
            reason = reason[len(prefix) :]
            break
    record_skip(skipped, path, reason, field)


@dataclass
class Instance:
    """One annotated object.

    Attributes
    ----------
    bbox
        ``(x0, y0, x1, y1)`` in source pixels, float.
    category
        ``wbc``, ``rbc``, ``platelet`` or another lower-case name.
    mask
        COCO RLE (``{"size": [H, W], "counts": ...}``) of the whole cell, or
        ``None`` for a box-only annotation.
    extra
        Any further fields (simulator ground truth, class labels...).
    """

    bbox: tuple[float, float, float, float]
    category: str = "wbc"
    mask: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def decode_mask(self, height: int, width: int) -> np.ndarray | None:
        """(H, W) bool mask, or ``None`` when the instance has no mask."""
        if self.mask is None:
            return None
        m = mask_utils.decode(self.mask).astype(bool)
        if m.shape != (height, width):
            raise AnnotationError(
                f"mask of size {m.shape} does not match its image ({height}, {width})"
            )
        return m


@dataclass
class ImageRecord:
    """One image and its annotations.

    Attributes
    ----------
    path
        Image file.
    width, height
        Size in source pixels.
    split
        ``train``, ``val``, ``test`` or another name.
    source
        Short name of the data set it came from (e.g. ``bccd``).
    scale
        Resize factor applied when the image is loaded (cells to the reference
        size); boxes and masks are scaled with it.
    """

    path: Path
    width: int
    height: int
    split: str = "train"
    source: str = ""
    instances: list[Instance] = field(default_factory=list)
    scale: float = 1.0
    image_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wbcs(self) -> list[Instance]:
        return [a for a in self.instances if a.category == "wbc"]


@dataclass
class SmearDataset:
    """A list of :class:`ImageRecord` (the internal COCO-style dataset)."""

    images: list[ImageRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.images)

    def split(self, *names: str) -> SmearDataset:
        """Records whose split is one of ``names``."""
        return SmearDataset([r for r in self.images if r.split in names])

    def __add__(self, other: SmearDataset) -> SmearDataset:
        return SmearDataset(self.images + other.images)

    def renumber(self) -> SmearDataset:
        """Give every record a unique ``image_id`` 1..N (in place); returns self."""
        for i, r in enumerate(self.images, start=1):
            r.image_id = i
        return self

    def counts(self) -> dict[str, int]:
        c = {"images": len(self.images)}
        for r in self.images:
            for a in r.instances:
                c[a.category] = c.get(a.category, 0) + 1
            c["wbc_with_mask"] = c.get("wbc_with_mask", 0) + sum(a.mask is not None for a in r.wbcs)
        return c


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)`` (x1/y1 exclusive) of the True pixels, or None if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return None
    return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size  # (W, H)
    except Exception as e:  # noqa: BLE001 - name the file whatever PIL raised
        raise AnnotationError(f"{path}: not a readable image ({e})") from e


def _clip_box(b: Sequence[float], w: int, h: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in b)
    return max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)


def _valid(b: Sequence[float]) -> bool:
    return b[2] - b[0] >= 1 and b[3] - b[1] >= 1


def held_out(n: int, val_fraction: float, seed: int) -> set[int]:
    """Indices of the ``round(val_fraction * n)`` of ``n`` items held out as ``val``: the
    first of a permutation drawn with ``seed`` (the same for every reader: a COCO file
    without split fields, each folder of mask PNGs or GeoJSON files)."""
    order = np.random.default_rng(seed).permutation(n)
    return set(order[: int(round(val_fraction * n))].tolist())


def _few(names: Sequence[str], sep: str = ", ", k: int = 5) -> str:
    """The first ``k`` of ``names`` for a log line, then ``...`` when there are more."""
    return sep.join(names[:k]) + (" ..." if len(names) > k else "")


def _report_dropped(path: Path, dropped: list[str]) -> None:
    """One warning per annotation file for boxes left out (outside the image, or under
    1 px once clipped to it): silently, 15 boxes became 12."""
    if dropped:
        log.warning(
            "%s: %d box(es) outside the image or under 1 px after clipping, left out: %s",
            path,
            len(dropped),
            _few(dropped, "; "),
        )


# ----------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------


def _coco_segmentation(seg: Any, h: int, w: int, where: str) -> dict[str, Any] | None:
    if seg is None or (isinstance(seg, list) and len(seg) == 0):
        return None
    try:
        return coco_rle(seg, h, w)
    except Exception as e:  # noqa: BLE001
        raise AnnotationError(f"{where}: field 'segmentation' cannot be read ({e})") from e


def short_rings(seg: Any) -> list[int] | None:
    """Indices of the rings of a COCO polygon ``segmentation`` (a list of ``[x0, y0, x1,
    y1, ...]`` rings) of under 3 points (< 6 coordinates), or None when ``seg`` is not a
    list of rings of numbers (RLE, ``[[x, y], ...]`` point pairs, a flat list: left to
    :func:`coco_rle`, whose error names the field). pycocotools reads a 4-number ring as a box and fails with "Argument 'bb' has
    incorrect type", and a shorter one encloses no pixel; as detectron2 does, such rings
    are dropped and the others kept."""
    if not isinstance(seg, list) or not seg:
        return None
    for ring in seg:
        if not isinstance(ring, (list, tuple)):
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ring):
            return None
    return [j for j, ring in enumerate(seg) if len(ring) < 6]


def polygon_problem(seg: Any) -> str | None:
    """Why a COCO polygon ``segmentation`` has no outline left once its rings of under 3
    points are dropped (:func:`short_rings`), or None (also for RLE and anything
    :func:`coco_rle` judges, and when at least one ring of >= 3 points is left)."""
    short = short_rings(seg)
    if not short or len(short) < len(seg):
        return None
    if len(seg) > 1:
        return f"all {len(seg)} polygons have under 3 points (needs >= 3 x, y pairs)"
    n = len(seg[0])
    odd = f", {n} coordinates" if n % 2 else ""
    return f"polygon with {n // 2} point(s){odd} (needs >= 3 x, y pairs)"


# share of a mask's pixels that must lie in its annotation's box (1 px margin): a mask
# mostly elsewhere is a misplaced annotation (a polygon from another image, shifted
# coordinates), whose training target would teach the mask head a wrong cell
MASK_IN_BOX_MIN = 0.5


def mask_problem(rle: dict[str, Any], box: Sequence[float]) -> str | None:
    """Why the COCO RLE ``rle`` cannot be the mask of an object in ``box`` (x0, y0, x1, y1),
    or None: it is empty (a polygon outside the image, one of an odd number of
    coordinates), or under :data:`MASK_IN_BOX_MIN` of its pixels lie in the box.
    RLE operations only: the mask is never decoded."""
    r = {"size": list(rle["size"]), "counts": rle["counts"]}
    if isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode("ascii")
    area = float(mask_utils.area(r))
    if area <= 0:
        return "mask is empty (0 pixels inside the image)"
    h, w = (int(v) for v in r["size"])
    x0, y0 = max(0.0, np.floor(box[0]) - 1), max(0.0, np.floor(box[1]) - 1)
    x1, y1 = min(float(w), np.ceil(box[2]) + 1), min(float(h), np.ceil(box[3]) + 1)
    b = mask_utils.frPyObjects(np.array([[x0, y0, x1 - x0, y1 - y0]], np.float64), h, w)
    inside = float(mask_utils.area(mask_utils.merge([r, b[0]], intersect=True)))
    if inside < MASK_IN_BOX_MIN * area:
        mx, my, mw, mh = (float(v) for v in mask_utils.toBbox(r))
        return (
            f"mask lies outside its bbox ({inside:.0f} of its {area:.0f} pixels inside; "
            f"mask x {mx:g}-{mx + mw:g}, y {my:g}-{my + mh:g}; bbox x {box[0]:g}-{box[2]:g}, "
            f"y {box[1]:g}-{box[3]:g})"
        )
    return None


def read_coco(
    json_path: str | Path,
    image_root: str | Path | None = None,
    source: str = "coco",
    default_split: str = "train",
    val_fraction: float = 0.0,
    seed: int = 0,
    skipped: list[Skip] | None = None,
) -> SmearDataset:
    """Read a COCO instances JSON.

    Parameters
    ----------
    json_path
        The JSON file.
    image_root
        Folder holding ``file_name`` of each image; default: the JSON's folder.
    default_split
        Split of images without a ``split`` field.
    val_fraction, seed
        When no image has a ``split`` field (COCO has none; exports from annotation
        tools do not add one), this deterministic share of the images (by ``seed``) is
        split ``val``, the rest ``default_split``; 0: none.
    skipped
        Annotations left out are added here (one :class:`Skip` each, its ``path`` the
        image, its ``field`` the one at fault (:data:`ANNOTATION_FIELDS`: ``bbox`` or
        ``segmentation``), the reason naming the JSON and
        ``annotations[k]``): a box outside the image or under 1 px once clipped, a mask
        that is empty or lies outside its box (:func:`mask_problem`). Either way each
        file's left-out annotations get one warning.

    Notes
    -----
    Categories are mapped with :func:`canonical_category`; extra annotation
    fields (e.g. the simulator's ``cell_id``, ``kind``, ``t``) land in
    ``Instance.extra``.
    """
    json_path = Path(json_path)
    root = Path(image_root) if image_root else json_path.parent
    try:
        data = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{json_path}: not a readable JSON file ({e})") from e
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise AnnotationError(f"{json_path}: missing top-level field '{key}'")
    cats = {}
    for j, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise AnnotationError(f"{json_path}: categories[{j}] needs the fields 'id' and 'name'")
        cats[c["id"]] = canonical_category(c["name"])
    records: dict[int, ImageRecord] = {}
    for j, im in enumerate(data["images"]):
        try:
            rec = ImageRecord(
                path=root / im["file_name"],
                width=int(im["width"]),
                height=int(im["height"]),
                split=str(im.get("split", default_split)),
                source=source,
                image_id=int(im["id"]),
            )
        except KeyError as e:
            raise AnnotationError(f"{json_path}: images[{j}] lacks field {e}") from e
        except (TypeError, ValueError) as e:
            raise AnnotationError(f"{json_path}: images[{j}]: id, width, height: {e}") from e
        if rec.image_id in records:
            raise AnnotationError(f"{json_path}: images[{j}]: id {rec.image_id} is used twice")
        records[rec.image_id] = rec
    if val_fraction > 0 and not any("split" in im for im in data["images"]):
        ids = list(records)
        held = {ids[k] for k in held_out(len(records), val_fraction, seed)}
        for k in held:
            records[k].split = "val"
        log.info(
            "%s: no image has a 'split' field: %d of %d held out as val (val_fraction=%g)",
            json_path,
            len(held),
            len(records),
            val_fraction,
        )
    std = {"id", "image_id", "category_id", "bbox", "area", "segmentation", "iscrowd"}
    dropped = []
    bad_masks: list[str] = []
    thinned: list[str] = []
    crowd = 0

    def left_out(rec: ImageRecord, what: str, fld: str, category: str) -> None:
        if skipped is not None:
            skipped.append(Skip(rec.path, f"{json_path}: {what}", fld, category))

    for i, a in enumerate(data["annotations"]):
        where = f"{json_path}: annotations[{i}]"
        for key in ("image_id", "category_id", "bbox"):
            if key not in a:
                raise AnnotationError(f"{where}: missing field '{key}'")
        try:
            rec = records[int(a["image_id"])]
        except (KeyError, TypeError, ValueError):
            raise AnnotationError(
                f"{where}: image_id {a['image_id']!r} is not the id of any image"
            ) from None
        if a["category_id"] not in cats:
            raise AnnotationError(
                f"{where}: category_id {a['category_id']!r} is not the id of any category "
                f"(ids: {sorted(cats, key=str)})"
            )
        cat = cats[a["category_id"]]
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
        except (TypeError, ValueError):
            raise AnnotationError(
                f"{where}: bbox {a['bbox']!r} is not [x, y, width, height]"
            ) from None
        if not all(np.isfinite((x, y, w, h))):
            raise AnnotationError(f"{where}: bbox {a['bbox']!r} holds a non-finite number")
        if a.get("iscrowd", 0):
            # a crowd region (COCO iscrowd=1) has no one cell to learn: not trained on,
            # as torchvision's and detectron2's recipes; said once per file below
            crowd += 1
            continue
        seg = a.get("segmentation")
        why = polygon_problem(seg)
        if why is not None:
            bad_masks.append(f"annotations[{i}]: {why}")
            left_out(rec, bad_masks[-1], "segmentation", cat)
            continue
        short = short_rings(seg) or []
        if short:
            seg = [ring for j, ring in enumerate(seg) if j not in short]
        rle = _coco_segmentation(seg, rec.height, rec.width, where)
        box = _clip_box((x, y, x + w, y + h), rec.width, rec.height)
        if not _valid(box):
            dropped.append(f"annotations[{i}] bbox {a['bbox']}")
            left_out(
                rec, f"{dropped[-1]}: outside the image or under 1 px after clipping", "bbox", cat
            )
            continue
        why = mask_problem(rle, box) if rle is not None else None
        if why is not None:
            bad_masks.append(f"annotations[{i}]: {why}")
            left_out(rec, bad_masks[-1], "segmentation", cat)
            continue
        if short:
            thinned.append(f"annotations[{i}] ({len(short)} of {len(short) + len(seg)})")
        extra = {k: v for k, v in a.items() if k not in std}
        rec.instances.append(Instance(bbox=box, category=cat, mask=rle, extra=extra))
    _report_dropped(json_path, dropped)
    if crowd:
        log.info(
            "%s: %d crowd annotation(s) (iscrowd=1) not trained on: a crowd region "
            "outlines no single cell",
            json_path,
            crowd,
        )
    if thinned:
        log.warning(
            "%s: %d annotation(s) with polygon rings of under 3 points, those rings "
            "dropped and the rest of each mask kept: %s",
            json_path,
            len(thinned),
            _few(thinned, "; "),
        )
    if bad_masks:
        log.warning(
            "%s: %d annotation(s) left out, their mask unusable: %s",
            json_path,
            len(bad_masks),
            _few(bad_masks, "; "),
        )
    return SmearDataset(list(records.values()))


def read_voc(
    root: str | Path,
    splits: Sequence[str] = ("train", "val", "test"),
    source: str = "voc",
    skipped: list[Skip] | None = None,
) -> SmearDataset:
    """Read a Pascal VOC folder (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``).

    Images listed in ``ImageSets/Main/<split>.txt`` get that split; with no
    ImageSets every XML is read as ``train``. VOC pixel coordinates are
    1-based inclusive; they are kept as ``(xmin, ymin, xmax, ymax)`` like
    torchvision's VOC loaders (the 1 px shift is below annotation noise).

    Parameters
    ----------
    skipped
        When given, an XML that cannot be used (malformed, its image missing, a bad
        box) is left out and recorded here as a :class:`Skip`; else it raises
        :class:`AnnotationError`. A missing ``Annotations/`` folder or split file
        always raises.
    """
    root = Path(root)
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise AnnotationError(f"{root}: no Annotations/ folder (Pascal VOC layout expected)")
    sets = root / "ImageSets" / "Main"
    ids: list[tuple[str, str]] = []
    if sets.is_dir():
        for s in splits:
            f = sets / f"{s}.txt"
            if not f.exists():
                raise AnnotationError(f"{f}: split file missing (splits={list(splits)})")
            ids += [(line.split()[0], s) for line in f.read_text().split("\n") if line.strip()]
    else:
        ids = [(p.stem, "train") for p in sorted(ann_dir.glob("*.xml"))]
    out = []
    for stem, split in ids:
        xml = ann_dir / f"{stem}.xml"
        try:
            out.append(_read_voc_xml(root, xml, stem, split, source))
        except AnnotationError as e:
            _left_out(skipped, xml, e, "annotation")
    return SmearDataset(out)


def _read_voc_xml(root: Path, xml: Path, stem: str, split: str, source: str) -> ImageRecord:
    """One VOC annotation file as a record; :class:`AnnotationError` names what is wrong."""
    try:
        tree = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as e:
        raise AnnotationError(f"{xml}: not a readable VOC XML ({e})") from e
    fname = tree.findtext("filename") or f"{stem}.jpg"
    img = root / "JPEGImages" / fname
    if not img.exists():
        # sorted: glob order is the file system's, so another machine took another file
        alt = sorted((root / "JPEGImages").glob(f"{stem}.*"))
        if not alt:
            raise AnnotationError(f"{xml}: image {img} not found")
        img = alt[0]
    size = tree.find("size")
    if size is not None and size.findtext("width"):
        try:
            w, h = int(float(size.findtext("width"))), int(float(size.findtext("height")))
        except (TypeError, ValueError) as e:
            raise AnnotationError(f"{xml}: 'size' is not a width and height ({e})") from e
    else:
        w, h = _image_size(img)
    rec = ImageRecord(path=img, width=w, height=h, split=split, source=source)
    for j, obj in enumerate(tree.findall("object")):
        bb = obj.find("bndbox")
        try:
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError) as e:
            raise AnnotationError(f"{xml}: object[{j}] has a bad 'bndbox' ({e})") from e
        box = _clip_box(box, w, h)
        if not _valid(box):
            continue
        extra = {"truncated": obj.findtext("truncated") == "1"}
        rec.instances.append(
            Instance(bbox=box, category=canonical_category(obj.findtext("name")), extra=extra)
        )
    return rec


def read_yolo(
    root: str | Path,
    splits: Sequence[str] = ("train", "val"),
    source: str = "yolo",
    classes_file: str | Path | None = None,
    skipped: list[Skip] | None = None,
) -> SmearDataset:
    """Read a YOLO folder: ``images/<split>/*``, ``labels/<split>/<stem>.txt``.

    Each label line is ``cls cx cy w h`` normalised to [0, 1]; class names come
    from ``labels/classes.txt`` (or ``classes_file``), one per line. An image
    without a label file has no objects.

    Parameters
    ----------
    skipped
        When given, an image that cannot be opened or whose label file has a bad line
        is left out and recorded here as a :class:`Skip`; else it raises
        :class:`AnnotationError`.
    """
    root = Path(root)
    dropped: list[str] = []
    cf = Path(classes_file) if classes_file else root / "labels" / "classes.txt"
    if not cf.exists():
        raise AnnotationError(f"{cf}: classes file missing (one class name per line)")
    names = [canonical_category(n) for n in cf.read_text().split("\n") if n.strip()]
    out = []
    for split in splits:
        img_dir = root / "images" / split
        if not img_dir.is_dir():
            raise AnnotationError(f"{img_dir}: split folder missing (splits={list(splits)})")
        for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS):
            lab = root / "labels" / split / f"{img.stem}.txt"
            try:
                out.append(_read_yolo_image(img, lab, split, source, names, dropped))
            except AnnotationError as e:
                bad_label = str(e).startswith(str(lab))
                _left_out(
                    skipped, lab if bad_label else img, e, "annotation" if bad_label else "image"
                )
    _report_dropped(root / "labels", dropped)
    return SmearDataset(out)


def _read_yolo_image(
    img: Path, lab: Path, split: str, source: str, names: list[str], dropped: list[str]
) -> ImageRecord:
    """One YOLO image and its label file as a record (boxes left out go to ``dropped``)."""
    w, h = _image_size(img)
    rec = ImageRecord(path=img, width=w, height=h, split=split, source=source)
    if lab.exists():
        for k, line in enumerate(lab.read_text().split("\n")):
            if not line.strip():
                continue
            parts = line.split()
            where = f"{lab}: line {k + 1} {line.strip()!r}"
            try:
                c = int(parts[0])
                vals = [float(v) for v in parts[1:]]
                if c < 0:
                    raise IndexError(f"class {c} < 0")
                name = names[c]
                if len(vals) < 4:
                    raise ValueError("fewer than 4 coordinates")
            except (ValueError, IndexError) as e:
                raise AnnotationError(
                    f"{where} is not 'cls cx cy w h' with 0 <= cls < {len(names)} ({e})"
                ) from e
            if not np.isfinite(vals).all():
                raise AnnotationError(f"{where}: a coordinate is not a number")
            if max(vals) > 1.5 or min(vals) < -0.5:
                raise AnnotationError(
                    f"{where}: YOLO coordinates are fractions of the image size "
                    f"(0-1); these look like pixels"
                )
            if len(vals) == 4:
                cx, cy, bw, bh = vals
                b = (
                    (cx - bw / 2) * w,
                    (cy - bh / 2) * h,
                    (cx + bw / 2) * w,
                    (cy + bh / 2) * h,
                )
            elif len(vals) % 2 == 0 and len(vals) >= 6:
                # YOLO-seg: a polygon x1 y1 x2 y2 ...; its box (the outline is
                # not used as a mask here)
                xs, ys = np.asarray(vals[0::2]) * w, np.asarray(vals[1::2]) * h
                b = (xs.min(), ys.min(), xs.max(), ys.max())
            else:
                raise AnnotationError(
                    f"{where}: {len(vals)} coordinates; expected 4 (a box) or an even "
                    f"number >= 6 (a YOLO-seg polygon)"
                )
            box = _clip_box(b, w, h)
            if _valid(box):
                rec.instances.append(Instance(bbox=box, category=name))
            else:
                dropped.append(f"{lab.name} line {k + 1}")
    return rec


def read_mask_pngs(
    root: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    source: str = "mask_png",
    foreground_min: int = 1,
    skipped: list[Skip] | None = None,
) -> SmearDataset:
    """Read single-cell images with per-image mask PNGs (``<stem>.<ext>`` + ``<stem>.png``).

    Searches ``root`` and its sub-folders. The whole-cell mask is
    ``mask >= foreground_min`` (0 background, 128 cytoplasm, 255 nucleus); its
    largest connected piece is the instance (its box is the box of that piece).
    A ``<folder>_labels.csv`` next to a folder (``image ID,class label``) adds
    ``extra["label"]``. A deterministic ``val_fraction`` of the images per
    folder gets split ``val``, the rest ``train``.

    Parameters
    ----------
    skipped
        When given, a pair whose mask or image cannot be read, or whose sizes differ,
        is left out and recorded here as a :class:`Skip`; else it raises
        :class:`AnnotationError`.
    """
    from skimage.measure import label as cc_label

    root = Path(root)
    folders = sorted({p.parent for p in root.rglob("*.png")})
    if not folders:
        raise AnnotationError(f"{root}: no mask PNGs found")
    out, empty, n_pairs = [], [], 0
    for folder in folders:
        labels: dict[int, str] = {}
        lab_csv = folder.parent / f"{folder.name}_labels.csv"
        if lab_csv.exists():
            with lab_csv.open() as f:
                for row in csv.reader(f):
                    if row and row[0].strip().isdigit():
                        labels[int(row[0])] = row[1].strip()
        pairs = []
        for m in sorted(folder.glob("*.png")):
            imgs = sorted(  # glob order is the file system's: the first in name order
                p
                for p in folder.glob(f"{m.stem}.*")
                if p.suffix.lower() in IMAGE_EXTS and p.suffix.lower() != ".png"
            )
            if imgs:
                pairs.append((imgs[0], m))
        n_pairs += len(pairs)
        val_idx = held_out(len(pairs), val_fraction, seed)
        for i, (img, mpath) in enumerate(pairs):
            try:
                m, w, h = _read_mask_pair(img, mpath)
            except AnnotationError as e:
                bad_mask = str(e).startswith(str(mpath))
                _left_out(
                    skipped, mpath if bad_mask else img, e, "annotation" if bad_mask else "image"
                )
                continue
            fg = m >= foreground_min
            cc = cc_label(fg, connectivity=1)
            if cc.max() == 0:
                empty.append(mpath.name)
                continue
            sizes = np.bincount(cc.ravel())
            sizes[0] = 0
            fg = cc == int(sizes.argmax())
            box = mask_bbox(fg)
            extra: dict[str, Any] = {}
            if m.max() == 255:
                extra["nucleus"] = encode_mask(m >= 192)
            if img.stem.isdigit() and int(img.stem) in labels:
                extra["label"] = labels[int(img.stem)]
            rec = ImageRecord(
                path=img,
                width=w,
                height=h,
                split="val" if i in val_idx else "train",
                source=source,
                instances=[Instance(bbox=box, category="wbc", mask=encode_mask(fg), extra=extra)],
            )
            out.append(rec)
    if not n_pairs:  # PNGs but no image beside any: the images are PNGs themselves
        raise AnnotationError(
            f"{root}: PNGs found but no image with a mask beside it (<stem>.jpg / .bmp / "
            f".tif next to <stem>.png): the images of this format cannot be PNGs, since "
            f"<stem>.png is the mask"
        )
    if empty:
        log.warning(
            "%s: %d mask(s) without any cell pixel (>= %d), their images left out: %s",
            root,
            len(empty),
            foreground_min,
            _few(empty, ", "),
        )
    return SmearDataset(out)


def _read_mask_pair(img: Path, mpath: Path) -> tuple[np.ndarray, int, int]:
    """The (H, W) mask of ``mpath`` and the size of ``img``; they must match."""
    try:
        m = np.asarray(Image.open(mpath))
    except Exception as e:  # noqa: BLE001
        raise AnnotationError(f"{mpath}: not a readable mask PNG ({e})") from e
    if m.ndim == 3:
        m = m[..., 0]
    w, h = _image_size(img)
    if m.shape != (h, w):
        raise AnnotationError(f"{mpath}: mask size {m.shape} != image size {(h, w)}")
    return m, w, h


def read_geojson(
    root: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    source: str = "geojson",
    skipped: list[Skip] | None = None,
) -> SmearDataset:
    """Read images with QuPath / GeoJSON objects beside them (``<stem>.<ext>`` +
    ``<stem>.geojson``), e.g. cells drawn or corrected in QuPath and exported per image
    (File > Export objects as GeoJSON), or a ``qupath/`` folder of ``stage=segment``
    reviewed there.

    Searches ``root`` and its sub-folders. Each ``Polygon`` / ``MultiPolygon`` feature
    is one instance: its mask is the pixels whose centres it encloses, less its holes
    (coordinates are pixel edges of the image, as QuPath writes them); its category is
    ``properties.classification.name`` (``canonical_category``; ``wbc`` without a class),
    kept in ``extra["label"]``. Points, lines and features without a geometry are left
    out and counted. A deterministic ``val_fraction`` of the images per folder gets
    split ``val``, the rest ``train``; an image without a ``.geojson`` is not read (it has
    no annotation, not "no cell").

    Parameters
    ----------
    skipped
        When given, an image or a ``.geojson`` that cannot be read is left out and
        recorded here as a :class:`Skip`; else it raises :class:`AnnotationError`.
    """
    root = Path(root)
    files = sorted(root.rglob("*.geojson"))
    if not files:
        raise AnnotationError(f"{root}: no .geojson files (one per image, <stem>.geojson)")
    by_folder: dict[Path, list[tuple[Path, Path]]] = {}
    no_image = []
    for g in files:
        img = _geojson_image(g)
        if img is not None:
            by_folder.setdefault(g.parent, []).append((img, g))
        else:
            no_image.append(g.name)
    if no_image and not by_folder:
        raise AnnotationError(
            f"{root}: {len(no_image)} .geojson file(s) but no image beside any "
            f"(<stem>.jpg / .png / .tif next to <stem>.geojson), e.g. {no_image[0]}"
        )
    if no_image:
        log.warning(
            "%s: %d .geojson file(s) without an image of the same stem beside them, not read: %s",
            root,
            len(no_image),
            _few(no_image, ", "),
        )
    out: list[ImageRecord] = []
    dropped: list[str] = []
    for _folder, pairs in sorted(by_folder.items()):
        val_idx = held_out(len(pairs), val_fraction, seed)
        for i, (img, g) in enumerate(pairs):
            try:
                w, h = _image_size(img)
                instances = _geojson_instances(g, w, h, dropped)
            except AnnotationError as e:
                bad = str(e).startswith(str(g))
                _left_out(skipped, g if bad else img, e, "annotation" if bad else "image")
                continue
            split = "val" if i in val_idx else "train"
            out.append(ImageRecord(img, w, h, split, source, instances))
    if dropped:
        log.warning(
            "%s: %d object(s) left out (not a polygon, or under one pixel): %s",
            root,
            len(dropped),
            _few(dropped, "; "),
        )
    return SmearDataset(out)


def _geojson_image(g: Path) -> Path | None:
    """The image ``<stem>.geojson`` describes: ``<stem>.<ext>`` beside it (the first by
    name), or for ``<stem>_<ext>.geojson`` (stage=segment's name for one of two images
    sharing a stem) ``<stem>.<ext>``; None when there is none."""
    from glob import escape

    imgs = sorted(
        p
        for p in g.parent.glob(f"{escape(g.stem)}.*")
        if p.stem == g.stem and p.suffix.lower() in IMAGE_EXTS
    )
    if imgs:
        return imgs[0]
    base, _, ext = g.stem.rpartition("_")
    if base and f".{ext.lower()}" in IMAGE_EXTS:
        twins = [p for p in g.parent.glob(f"{escape(base)}.*") if p.suffix[1:].lower() == ext]
        return twins[0] if len(twins) == 1 else None
    return None


def _geojson_instances(path: Path, w: int, h: int, dropped: list[str]) -> list[Instance]:
    """The polygons of one GeoJSON file as instances of a ``w`` x ``h`` image."""
    from skimage.draw import polygon as fill

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: not readable GeoJSON ({e})") from e
    # QuPath writes a FeatureCollection, or (older exports) a bare list of features
    feats = doc.get("features") if isinstance(doc, dict) else doc
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        feats = [doc]
    if not isinstance(feats, list):
        raise AnnotationError(
            f"{path}: field 'features': expected a FeatureCollection or a list of features"
        )
    out = []
    for k, f in enumerate(feats):
        geom = f.get("geometry") if isinstance(f, dict) else None
        kind = geom.get("type") if isinstance(geom, dict) else None
        if kind not in ("Polygon", "MultiPolygon"):
            dropped.append(f"{path.name} feature {k} ({kind or 'no geometry'})")
            continue
        polys = geom.get("coordinates") or []
        polys = [polys] if kind == "Polygon" else polys
        mask = np.zeros((h, w), bool)
        try:
            for rings in polys:
                for j, ring in enumerate(rings):
                    # [x, y] or [x, y, z] positions (GeoJSON allows an altitude)
                    xy = np.asarray(ring, dtype=np.float64)[:, :2]
                    if not np.isfinite(xy).all():
                        raise ValueError("a coordinate is not a number")
                    rr, cc = fill(xy[:, 1] - 0.5, xy[:, 0] - 0.5, (h, w))
                    mask[rr, cc] = j == 0  # the first ring is the outline, the rest holes
        except (TypeError, ValueError, IndexError) as e:
            raise AnnotationError(
                f"{path}: feature {k}, field 'geometry.coordinates': not [[x, y], ...] rings ({e})"
            ) from e
        box = mask_bbox(mask)
        if box is None:
            dropped.append(f"{path.name} feature {k} (under one pixel, or outside the image)")
            continue
        props = f.get("properties") if isinstance(f.get("properties"), dict) else {}
        cls = props.get("classification")
        name = cls.get("name") if isinstance(cls, dict) else cls
        extra = {"label": str(name)} if name else {}
        if props.get("name"):
            extra["name"] = str(props["name"])
        category = canonical_category(name) if name else "wbc"
        out.append(Instance(bbox=box, category=category, mask=encode_mask(mask), extra=extra))
    return out


# the columns of a box review (read_box_review): the file name of the image, the box in
# its source px, and what the reviewer says the box holds
BOX_REVIEW_COLUMNS = ("image", "x0", "y0", "x1", "y1", "category")


@dataclass
class BoxReview:
    """One reviewed ground-truth box: ``image`` (file name), ``bbox`` (x0, y0, x1, y1)
    in source px, the reviewed ``category`` (``rbc``, ``platelet``...), ``note``, and
    ``row`` (its line in the CSV, for messages)."""

    image: str
    bbox: tuple[float, float, float, float]
    category: str
    note: str = ""
    row: int = 0


def read_box_review(path: str | Path) -> list[BoxReview]:
    """Read a CSV of reviewed ground-truth boxes (docs/reviews/txl_pbc_val_wbc_boxes.csv).

    Columns :data:`BOX_REVIEW_COLUMNS` plus an optional ``note``; one row per box whose
    annotated class the reviewer corrects. Raises :class:`AnnotationError` naming the
    file, the line and the field on a missing column, a box that is not a number or
    is empty, or an empty category.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: box review file not found")
    out = []
    with path.open(newline="") as f:
        rd = csv.DictReader(f)
        missing = [c for c in BOX_REVIEW_COLUMNS if c not in (rd.fieldnames or [])]
        if missing:
            raise AnnotationError(
                f"{path}: missing column(s) {missing} (need {BOX_REVIEW_COLUMNS})"
            )
        for line, r in enumerate(rd, start=2):
            try:
                b = tuple(float(r[k]) for k in ("x0", "y0", "x1", "y1"))
            except (TypeError, ValueError):
                raise AnnotationError(f"{path}:{line}: x0/y0/x1/y1 must be numbers") from None
            if not (b[2] > b[0] and b[3] > b[1]):
                raise AnnotationError(f"{path}:{line}: empty box {b}")
            cat = (r["category"] or "").strip().lower()
            if not cat or not (r["image"] or "").strip():
                raise AnnotationError(f"{path}:{line}: image and category must not be empty")
            out.append(BoxReview(r["image"].strip(), b, cat, (r.get("note") or "").strip(), line))
    return out


def apply_box_review(
    ds: SmearDataset, review: Sequence[BoxReview], min_iou: float = 0.9
) -> dict[str, int]:
    """Give reviewed white-cell boxes of ``ds`` their reviewed category, in place.

    Each review entry is matched to the ``wbc`` instance of the image of that file name
    whose box overlaps it best (IoU >= ``min_iou``). Entries whose image is not in
    ``ds`` (another split) are counted, not errors; an entry whose image is there but
    has no such box raises :class:`AnnotationError` (the review does not describe these
    annotations).

    Returns
    -------
    dict
        ``{"n_entries", "n_relabelled", "n_other_images"}``.
    """
    from segmentation.engine import box_iou  # engine imports this module

    by_name: dict[str, list[ImageRecord]] = {}
    for rec in ds:
        by_name.setdefault(Path(rec.path).name, []).append(rec)
    n_rel = n_other = 0
    for e in review:
        recs = by_name.get(e.image)
        if not recs:
            n_other += 1
            continue
        wbcs = [a for rec in recs for a in rec.wbcs]
        iou = box_iou(
            np.asarray([e.bbox], float), np.asarray([a.bbox for a in wbcs], float).reshape(-1, 4)
        )[0]
        best_iou = float(iou.max()) if iou.size else 0.0
        if best_iou < min_iou:
            raise AnnotationError(
                f"review line {e.row}: {e.image} has no white-cell box at {e.bbox} "
                f"(best IoU {best_iou:.2f} < {min_iou}): the review does not match these "
                "annotations"
            )
        best = wbcs[int(iou.argmax())]
        best.category = e.category
        best.extra["reviewed"] = e.note or "reviewed"
        n_rel += 1
    return {"n_entries": len(review), "n_relabelled": n_rel, "n_other_images": n_other}


READERS = {
    "coco": read_coco,
    "voc": read_voc,
    "yolo": read_yolo,
    "mask_png": read_mask_pngs,
    "geojson": read_geojson,
}


# source px: a ground-truth box this close to the image edge is cut by it (its side is the
# visible part, not the cell's size); the detector's own ruler drops such boxes too
# (segmentation.magnification.REFINE_EDGE_PX)
CUT_EDGE_PX = 2.0


def auto_scale(rec: ImageRecord, cell_px: float, edge_px: float | None = CUT_EDGE_PX) -> float:
    """Scale that makes the median white-cell box side ``cell_px`` (the oracle scale).

    Parameters
    ----------
    rec : the image's record; its white-cell boxes are in source px
    cell_px : wanted white-cell box side in working px
    edge_px : boxes within this many source px of the image edge are cut by it and not
        measured, unless every box is; ``None`` measures every box (the oracle of the
        evaluations before 2026-12-04, which a cell cut to a sliver pulled down)

    Returns
    -------
    float : working px per source px; 1.0 for an image without white cells
    """
    boxes = [a.bbox for a in rec.wbcs]
    if not boxes:
        return 1.0
    b = np.asarray(boxes, float).reshape(-1, 4)
    side = np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    if edge_px is not None:
        whole = whole_boxes(b, rec.width, rec.height, edge_px)
        if whole.any():
            side = side[whole]
    return float(cell_px / np.median(side))


def to_coco(
    dataset: SmearDataset, masks: str = "real", categories: Sequence[str] = ("wbc",)
) -> dict[str, Any]:
    """COCO instances dict of the white cells, in the *loaded* (scaled) frame.

    Parameters
    ----------
    masks
        ``real``: segmentation from the instance masks (instances without one
        get their box as a polygon); ``none``: no segmentation field.
    """
    images, anns = [], []
    for rec in dataset.images:
        s = rec.scale
        h, w = scaled_size(rec)
        images.append({"id": rec.image_id, "file_name": str(rec.path), "width": w, "height": h})
        for a in rec.instances:
            if a.category not in categories:
                continue
            x0, y0, x1, y1 = (v * s for v in a.bbox)
            ann = {
                "id": len(anns) + 1,
                "image_id": rec.image_id,
                "category_id": 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
            }
            if masks == "real":
                if a.mask is not None:
                    m = resize_mask(a.decode_mask(rec.height, rec.width), (h, w))
                    ann["segmentation"] = encode_mask(m)
                    ann["area"] = float(m.sum())
                else:
                    ann["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            anns.append(ann)
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "wbc"}]}


# ----------------------------------------------------------------------------
# torch dataset
# ----------------------------------------------------------------------------


def scaled_size(rec: ImageRecord) -> tuple[int, int]:
    """(H, W) of the record after its load-time ``scale``."""
    if rec.scale == 1.0:
        return rec.height, rec.width
    return max(1, round(rec.height * rec.scale)), max(1, round(rec.width * rec.scale))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) mask to ``size`` = (H', W')."""
    if mask.shape == tuple(size):
        return mask
    im = Image.fromarray(mask.astype(np.uint8))
    return np.asarray(im.resize((size[1], size[0]), Image.NEAREST)).astype(mask.dtype)


@dataclass
class Sample:
    """One loaded record in the loaded (scaled) frame, before augmentation.

    ``image`` (H, W, 3) uint8; ``boxes`` (N, 4) float32 xyxy; ``masks`` (N, H, W)
    uint8 with 1 = cell, 0 = not, :data:`MASK_UNKNOWN` = unknown (box-only
    instance in ``ignore`` mode); ``has_mask`` (N,) bool.
    """

    image: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray


def load_sample(
    rec: ImageRecord,
    mask_mode: str = "ignore",
    pseudo: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> Sample:
    """Load a record's image and white-cell targets, scaled by ``rec.scale``.

    Parameters
    ----------
    mask_mode
        For white cells without a mask: ``ignore`` (mask filled with
        :data:`MASK_UNKNOWN`, no mask loss), ``pseudo`` (``pseudo(image, boxes)``
        -> (N, H, W) bool, e.g. :func:`segmentation.pseudomask.pseudo_masks`),
        or ``box`` (the filled box).
    """
    if mask_mode not in ("ignore", "pseudo", "box"):
        raise ValueError(f"mask_mode={mask_mode!r}; valid: ignore, pseudo, box")
    try:
        img = load_rgb(rec.path)
    except ImageReadError as e:
        raise AnnotationError(str(e)) from e
    if img.shape[:2] != (rec.height, rec.width):
        raise AnnotationError(
            f"{rec.path}: image is {img.shape[1]}x{img.shape[0]} but its annotation says "
            f"{rec.width}x{rec.height}"
        )
    wbcs = rec.wbcs
    h, w = rec.height, rec.width
    boxes = np.array([a.bbox for a in wbcs], dtype=np.float32).reshape(-1, 4)
    masks = np.zeros((len(wbcs), h, w), dtype=np.uint8)
    has = np.zeros(len(wbcs), dtype=bool)
    missing = []
    for i, a in enumerate(wbcs):
        m = a.decode_mask(h, w)
        if m is not None:
            masks[i] = m
            has[i] = True
        else:
            missing.append(i)
    if missing:
        if mask_mode == "ignore":
            masks[missing] = MASK_UNKNOWN
        elif mask_mode == "box":
            for i in missing:
                x0, y0, x1, y1 = (int(round(v)) for v in boxes[i])
                masks[i, y0:y1, x0:x1] = 1
            has[missing] = True
        else:
            if pseudo is None:
                raise ValueError("mask_mode='pseudo' needs a pseudo-mask function")
            masks[missing] = pseudo(img, boxes[missing]).astype(np.uint8)
            has[missing] = True
    if rec.scale != 1.0:
        sh, sw = scaled_size(rec)
        img = np.asarray(Image.fromarray(img).resize((sw, sh), Image.BILINEAR))
        masks = (
            np.stack([resize_mask(m, (sh, sw)) for m in masks])
            if len(masks)
            else np.zeros((0, sh, sw), np.uint8)
        )
        boxes = boxes * np.float32(rec.scale)
    return Sample(img, boxes, masks, has)


def image_problem(rec: ImageRecord) -> str | None:
    """Why ``rec``'s image cannot be trained on, or None: a cheap look before training.

    A JPEG is decoded at 1/8 scale (Pillow's ``draft``: ~0.3 ms for a 640x480 smear
    against ~3 ms in full, so ~0.5 s for 1500 images), which still reads every byte,
    so a truncated file is found. A file Pillow cannot open goes to the training
    reader (:func:`segmentation.io.read_rgb`, which also reads e.g. 16-bit TIFFs)
    before it is refused. The image must have its annotation's size, and so must the
    white cells' masks (what :func:`load_sample` would stop at mid-epoch).
    """
    try:
        with Image.open(rec.path) as im:
            w, h = im.size
            if im.format == "JPEG":
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
    except Exception:  # noqa: BLE001 - the training reader has the last word
        rd = read_rgb(rec.path, convert=True, min_side=1)
        if not rd.ok:
            return f"not a readable image ({rd.reason})"
        h, w = rd.image.shape[:2]
    if (w, h) != (rec.width, rec.height):
        return f"image is {w}x{h} but its annotation says {rec.width}x{rec.height}"
    for j, a in enumerate(rec.wbcs):
        size = a.mask.get("size") if isinstance(a.mask, dict) else None
        if a.mask is not None and (size is None or [int(v) for v in size] != [h, w]):
            return f"white cell {j}: mask size {size} does not match the image ({h}, {w})"
    return None


def drop_unreadable(ds: SmearDataset, skipped: list[Skip]) -> SmearDataset:
    """``ds`` without the records whose image fails :func:`image_problem`.

    Each one left out is logged as a warning and recorded in ``skipped``: one bad file
    among a thousand is reported, not the end of a training run an epoch in.
    """
    keep = []
    for r in ds:
        why = image_problem(r)
        if why is None:
            keep.append(r)
        else:
            record_skip(skipped, r.path, why)
    return SmearDataset(keep)


class DetectionDataset(torch.utils.data.Dataset):
    """torchvision detection pairs from :class:`ImageRecord` objects.

    ``dataset[i]`` is ``(image, target)``: image (3, H, W) float in [0, 1];
    target ``boxes`` (N, 4) float xyxy, ``labels`` (N,) int64 (1 = WBC),
    ``masks`` (N, H, W) uint8 (see :class:`Sample`), ``image_id`` int.

    Parameters
    ----------
    records
        Images to serve.
    transform
        ``fn(sample, rng_seed) -> Sample`` (see :mod:`segmentation.transforms`)
        or None.
    mask_mode, pseudo
        See :func:`load_sample`.
    seed
        Base seed of the augmentation; sample ``i`` of epoch ``e`` uses a seed
        derived from (seed, e, i), so runs and resumed runs are reproducible.
    cache
        Keep loaded samples in memory (small sets only).
    skip_unreadable
        An image that fails to load (:class:`AnnotationError`) is logged, recorded in
        ``skipped`` and replaced by the next loadable one, so training goes on; off, the
        error stops the run. Meant for training sets that :func:`drop_unreadable` has
        already checked: this catches what that cheap look misses. With DataLoader
        workers the record stays in the worker (the warning reaches the log).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable[[Sample, int], Sample] | None = None,
        mask_mode: str = "ignore",
        pseudo: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        seed: int = 0,
        cache: bool = False,
        post: Callable[[Sample, int], Sample] | None = None,
        skip_unreadable: bool = False,
    ):
        self.records = list(records)
        self.skip_unreadable = skip_unreadable
        self.skipped: list[Skip] = []
        self._bad: set[int] = set()
        self.transform = transform
        self.mask_mode = mask_mode
        self.pseudo = pseudo
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self.post = post
        self._cache: dict[int, Sample] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, i: int) -> Sample:
        if self.cache and i in self._cache:
            return self._cache[i]
        s = load_sample(self.records[i], self.mask_mode, self.pseudo)
        if self.cache:
            self._cache[i] = s
        return s

    def _loadable(self, i: int) -> tuple[int, Sample]:
        """Sample ``i``, or with ``skip_unreadable`` the first loadable one after it."""
        if not self.skip_unreadable:
            return i, self.sample(i)
        n = len(self.records)
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            try:
                return j, self.sample(j)
            except AnnotationError as e:
                path = self.records[j].path
                self._bad.add(j)
                record_skip(
                    self.skipped,
                    path,
                    str(e).removeprefix(f"{path}: "),
                    note=" (another training image is used in its place)",
                )
        raise AnnotationError(
            f"no trainable image left: all {n} training images failed to load (first: "
            f"{self.skipped[0].path}: {self.skipped[0].reason})"
            if self.skipped
            else "no trainable image left: the training set is empty"
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        j, s = self._loadable(i)
        item_seed = int((self.seed * 1_000_003 + self.epoch * 10_007 + i) % (2**31))
        if self.post is not None:
            s = self.post(s, item_seed)
        if self.transform is not None:
            s = self.transform(s, item_seed)
        return to_tensors(s, self.records[j].image_id)


def to_tensors(s: Sample, image_id: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    img = torch.from_numpy(np.array(s.image, copy=True)).permute(2, 0, 1).float() / 255.0
    n = len(s.boxes)
    target = {
        "boxes": torch.from_numpy(np.asarray(s.boxes, np.float32).reshape(n, 4)),
        "labels": torch.ones(n, dtype=torch.int64),
        "masks": torch.from_numpy(np.ascontiguousarray(s.masks)),
        "image_id": torch.tensor(image_id),
    }
    return img, target


def collate(batch: list) -> tuple[list, list]:
    return tuple(zip(*batch))  # type: ignore[return-value]


def with_scale(ds: SmearDataset, scale: float | None, cell_px: float) -> SmearDataset:
    """Copy of ``ds`` whose records carry load-time ``scale``.

    ``None``: per image from its white-cell boxes (:func:`auto_scale`); an image without
    any takes the median scale of those with some (one folder, one microscope), not 1.0
    (a 5x magnified field of red cells in the training set).
    """
    if scale is not None:
        return SmearDataset([replace(r, scale=float(scale)) for r in ds])
    recs = list(ds)
    auto = [auto_scale(r, cell_px) if r.wbcs else None for r in recs]
    known = [s for s in auto if s is not None]
    fill = float(np.median(known)) if known else 1.0
    return SmearDataset([replace(r, scale=fill if s is None else s) for r, s in zip(recs, auto)])
