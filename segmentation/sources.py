"""Real image sources of stage=segment: per-image class lists and the crop-folder mask mode.

Two helpers the stage needs beyond tiled inference on smears:

* labels of detected cells where the data set has them: BCCD's per-image class
  list (``cells/bccd_cropped/kaggle_labels.csv``, columns ``,Image,Category``,
  image number ``N`` -> ``BloodImage_%05d.jpg``) read by
  :func:`read_bccd_labels` and turned into a cell label by :func:`label_for_image`;
* masks for folders of single-cell crops that have none (ImageFolder layout):
  :func:`list_crop_folder` lists them and :func:`pick_centre_cell` keeps, of the
  detector's kept cells of one crop, the one that covers the crop centre.

Every problem is a reject row ``{"image", "field", "action", "reason"}`` for
``rejects.csv``, never an exception, except a label file that cannot be read at
all or lists an image twice (:class:`LabelFileError`, naming file and field). Library code: typed
arguments only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from segmentation.cells import ImageCells
from segmentation.crops import FilterSettings
from segmentation.io import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

BCCD_IMAGE = "BloodImage_{:05d}.jpg"


class LabelFileError(ValueError):
    """A label file that cannot be used at all; the message names file and field."""


def read_bccd_labels(
    csv_path: str | Path, available: set[str]
) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """BCCD's per-image class list -> ``{image file name: [class, ...]}`` plus reject rows.

    Parameters
    ----------
    csv_path
        ``kaggle_labels.csv``: columns ``Image`` (image number N of
        ``BloodImage_%05d.jpg``) and ``Category`` (one class, or several
        comma-separated classes for an image with several white cells; empty =
        not labelled).
    available
        File names of the images that exist; a label naming any other image is
        a reject row (``field=Image``, ``action=label_without_image``).

    Returns
    -------
    labels, rejects
        Lower-cased class names per image (``[]`` for an empty category), and
        one reject row per unusable line.

    Raises
    ------
    LabelFileError
        The file cannot be read, lacks a column, or lists an image number on two
        lines (with the same class or not: which line is right is unknown, and
        segmentation_wbc's and ``pair.label_corrections``' readers refuse a repeat too).
    """
    csv_path = Path(csv_path)
    try:
        tab = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:  # 0 bytes or blank lines only: no header
        raise LabelFileError(
            f"{csv_path}: empty label file (no header; expected ',Image,Category')"
        ) from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise LabelFileError(f"{csv_path}: unreadable label file ({e})") from e
    for col in ("Image", "Category"):
        if col not in tab.columns:
            raise LabelFileError(
                f"{csv_path}: no column '{col}' (columns: {list(tab.columns)}); "
                "expected ',Image,Category'"
            )
    labels: dict[str, list[str]] = {}
    rejects: list[dict[str, str]] = []
    first: dict[str, tuple[int, str]] = {}  # image -> (line, category) where first listed
    for line, (num, cat) in enumerate(zip(tab["Image"], tab["Category"]), start=2):
        try:
            name = BCCD_IMAGE.format(int(str(num).strip()))
        except ValueError:
            rejects.append(
                {
                    "image": csv_path.name,
                    "field": "Image",
                    "action": "bad_label_row",
                    "reason": f"line {line}: Image={num!r} is not an image number",
                }
            )
            continue
        if name in first:  # which line is right is unknown: refused, as the other label readers
            at, was = first[name]
            raise LabelFileError(
                f"{csv_path}: column 'Image', line {line}: image {str(num).strip()} ({name}, "
                f"{cat or 'no class'!r}) is listed again (first on line {at}, "
                f"{was or 'no class'!r}); keep one line per image"
            )
        first[name] = (line, cat)
        if name not in available:
            rejects.append(
                {
                    "image": name,
                    "field": "Image",
                    "action": "label_without_image",
                    "reason": f"{csv_path.name} line {line} labels {name} "
                    f"({cat or 'no class'}), which is not in the smear folder",
                }
            )
            continue
        labels[name] = [c.strip().lower() for c in str(cat).split(",") if c.strip()]
    return labels, rejects


def label_for_image(n_cells: int, classes: list[str] | None) -> tuple[str, str]:
    """Label of the detected cells of one smear, and why.

    A label is given only when it cannot go to the wrong cell: the class list
    names a single class (possibly repeated) and exactly as many cells as the
    list has entries were detected. ``("", status)`` otherwise.

    Parameters
    ----------
    n_cells
        Kept (filtered) detections in the image.
    classes
        Its class list (:func:`read_bccd_labels`), ``None`` when the image is
        not in the label file (or the source has none).

    Returns
    -------
    label, status
        ``status`` is ``labelled``, ``unlabelled`` (no list for this source or
        image), ``no_class`` (empty category), ``mixed_classes`` (several
        classes: which cell is which is unknown) or ``count_mismatch``.
    """
    if classes is None:
        return "", "unlabelled"
    if not classes:
        return "", "no_class"
    if len(set(classes)) > 1:
        return "", "mixed_classes"
    if n_cells != len(classes):
        return "", "count_mismatch"
    return classes[0], "labelled"


def list_crop_folder(
    root: str | Path, max_per_class: int | None = None, seen: set[str] | None = None
) -> list[tuple[Path, str]]:
    """``(file, class)`` of an ImageFolder (``root/<Class>/*.jpg``), class lower-cased;
    hidden folders and files (names starting with ``.``) are skipped.

    What the layout does not read (images at the top level or below a class folder,
    class folders with no image) is warned once per call, or, given ``seen`` (the
    folders already reported, kept by a caller that lists a folder more than once in
    one run), once per folder in ``seen``; ``root`` is added to it. Nothing is kept
    between calls otherwise, so a second run in the same process warns again.

    Raises
    ------
    FileNotFoundError
        ``root`` is not a folder or has no class sub-folder with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    out = []
    # hidden names (Jupyter's .ipynb_checkpoints, macOS ._x.jpg) are no class and no crop
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            f
            for f in d.iterdir()
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        )
        out += [(f, d.name.lower()) for f in files[:max_per_class]]
    if not out:
        raise FileNotFoundError(f"{root}: no class sub-folder with images (ImageFolder layout)")
    if seen is None or str(root) not in seen:
        _report_unread(root)
    if seen is not None:
        seen.add(str(root))
    return out


def _is_image(f: Path) -> bool:
    return f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")


def _report_unread(root: Path) -> None:
    """One warning per folder for what the ImageFolder layout does not read: images at
    the top level (no class), images in folders below a class folder, and class folders
    with no image (audit s52 S2: 4 crops were counted of 6 files, without a word)."""
    top = sorted(f.name for f in root.iterdir() if _is_image(f))
    nested: list[str] = []
    empty: list[str] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            nested += [str(f.relative_to(root)) for f in sorted(sub.rglob("*")) if _is_image(f)]
        if not any(_is_image(f) for f in d.iterdir()):
            empty.append(d.name)
    parts = []
    if top:
        parts.append(f"{len(top)} image(s) at its top level, in no class folder ({_few(top)})")
    if nested:
        parts.append(f"{len(nested)} image(s) in folders below a class folder ({_few(nested)})")
    if empty:
        parts.append(f"{len(empty)} class folder(s) with no image ({_few(empty)})")
    if parts:
        log.warning(
            "%s: not read as crops (one folder per class, images directly in it): %s",
            root,
            "; ".join(parts),
        )


def _few(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (" ..." if len(names) > k else "")


def crop_folder_filters(filters: FilterSettings) -> FilterSettings:
    """The filters of a smear, relaxed for a single-cell crop.

    A crop holds one cell, often touching the crop's border, next to cut
    neighbours: neither the border nor those neighbours may reject it (the crop's
    cell is the one wanted; :func:`pick_centre_cell` then keeps it).
    """
    return replace(filters, drop_border=False, max_overlap_iou=None, touch_px=None)


def pick_centre_cell(cells: ImageCells) -> tuple[int | None, str]:
    """The kept detection of a single-cell crop that covers the crop centre.

    Parameters
    ----------
    cells
        :func:`segmentation.cells.segment_image` result of one crop.

    Returns
    -------
    index, reason
        Position in ``cells.crops`` (and in ``cells.table[cells.table.kept]``)
        of the highest-scoring kept detection whose mask holds the centre pixel,
        or ``None`` and why no mask could be found.
    """
    table, det = cells.table, cells.detections
    if not len(table):
        return None, "no detection"
    kept = np.nonzero(table["kept"].to_numpy())[0]
    if not len(kept):
        return None, f"no detection passed the filters (best score {table.score.max():.2f})"
    h, w = cells.image.shape[:2]
    cx, cy = int(w * cells.scale / 2), int(h * cells.scale / 2)  # working frame
    best, best_score = None, -1.0
    for pos, k in enumerate(kept):
        m, (ox, oy) = det.masks[k], det.origins[k]
        y, x = cy - int(oy), cx - int(ox)
        if 0 <= y < m.shape[0] and 0 <= x < m.shape[1] and m[y, x]:
            if float(det.scores[k]) > best_score:
                best, best_score = pos, float(det.scores[k])
    if best is None:
        return None, f"none of the {len(kept)} kept detections covers the crop centre"
    return best, ""


@dataclass
class CentreCell:
    """:func:`centre_cell` of one crop: the pass kept and the centre cell found in it."""

    cells: ImageCells  # the segment pass the cell comes from
    pos: int | None  # its position among the kept detections; None: none found
    reason: str  # why none was found ("" when found)
    scale: float  # the working scale of that pass
    how: str  # how the scale was chosen (logged)


def centre_cell(
    detector,
    image: np.ndarray,
    name: str,
    settings,
    id_prefix: str,
    cell_px: float | None = None,
    refine=None,
    estimate=None,
    retry_scale: float | None = None,
) -> CentreCell:
    """The white cell at the centre of a single-cell crop, as ``stage=segment`` and
    ``stage=embed`` read crop folders.

    The crop is segmented at ``settings.input_scale``, or, with ``cell_px``, at the
    scale measured from the crop itself (:func:`segmentation.autoscale.segment_estimated`
    with ``refine`` and ``estimate``); :func:`pick_centre_cell` picks the cell. Where
    none covers the centre and ``retry_scale`` (e.g. the median estimate of the crop's
    folder: the ruler can read a lobe as a cell, and a cell seen 4x too large comes
    apart) differs from the scale used by more than 10 %, one more pass runs there.

    Parameters
    ----------
    detector : a :class:`segmentation.inference.MaskRCNNDetector`
    image : (H, W, 3) uint8 RGB crop
    name, id_prefix : the crop's name and cell id prefix in the tables
    settings : :class:`segmentation.cells.SegmentSettings` (filters for a crop, e.g.
        :func:`crop_folder_filters`, and the framing already set)
    """
    from segmentation.autoscale import segment_estimated
    from segmentation.cells import segment_images

    if cell_px is not None:
        cells, choice = segment_estimated(
            detector, image, name, settings, cell_px, None, id_prefix, refine, estimate=estimate
        )
        scale, how = float(choice.scale), choice.describe()
    else:
        scale, how = float(settings.input_scale), "the given scale"
        cells = segment_images(detector, [image], [name], settings, id_prefixes=[id_prefix])[0]
    pos, reason = pick_centre_cell(cells)
    if pos is None and retry_scale is not None and abs(retry_scale / scale - 1) > 0.1:
        again = replace(settings, input_scale=float(retry_scale))
        second = segment_images(detector, [image], [name], again, id_prefixes=[id_prefix])[0]
        pos2, _ = pick_centre_cell(second)
        if pos2 is not None:
            how = (
                f"no cell at the centre at {scale:.3g}, found at the folder's median "
                f"{retry_scale:.3g}"
            )
            return CentreCell(second, pos2, "", float(retry_scale), how)
    return CentreCell(cells, pos, reason, scale, how)
