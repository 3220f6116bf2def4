"""Crop readers and the pairing of cell crops with expression profiles.

No public data set holds cells both imaged and sequenced, so a paired training
set is a modelling choice. :func:`make_pairs` builds it in one of four modes and
records, per row, which modalities are present and how the pair was made:

``same_cell``
    crop ``truth_cell_id`` == expression ``obs_names`` (the simulator's true pairs).
``by_label``
    each crop draws ``draws_per_crop`` profiles of its class through ``label_map``
    (image class -> expression label), fixed by ``seed``.
``by_maturation``
    crops and profiles binned on maturation in [0, 1] (``n_bins`` equal-width
    bins); each crop draws profiles from its own bin.
``unpaired``
    every crop and every profile is a single-modality row.
``image_only``
    every crop is an image-only row and no expression table is read: the
    table has 0 genes (training then runs the image branch alone).

Rows without a partner become single-modality rows (``keep_unmatched_images``,
``keep_unused_expression``). Library code: plain typed arguments only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from segmentation.io import (
    IMAGE_SUFFIXES,
    blank_as_read,
    decode_coco_mask,
    recorded_name,
    spreadsheet_unquote,
    undecodable_warning,
)
from vae.inputs.schema import (  # noqa: F401 - TRUTH_COLUMNS: columns copied into paired obs
    ANOMALY_COLUMNS,
    CELL_DIAMETER,
    GRANULE_CENTRES,
    GRANULE_OD,
    HAS_COUNTS,
    HAS_EXPRESSION,
    HAS_IMAGE,
    HAS_MASK,
    LABEL_ORIGINAL,
    NUCLEUS_SEGMENTATION,
    OBS_RENAMED,
    PAIR_MODES,
    TRUTH_COLUMNS,
    WITHIN_LABEL,
    cell_diameters,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = IMAGE_SUFFIXES  # the image types every folder reader lists
# smallest crop side read from a crop folder, px: what stage=segment's reader takes
# (segmentation.io.read_rgb min_side); a 4 px thumbnail holds no cell to learn from
MIN_CROP_SIDE = 8
# segmentation_WBC label CSVs: class codes of the data set's authors
SEGMENTATION_WBC_CLASSES = {
    1: "neutrophil",
    2: "lymphocyte",
    3: "monocyte",
    4: "eosinophil",
    5: "basophil",
}


class PairingError(ValueError):
    """Bad crop input or pairing setting. ``field`` names the offending field."""

    def __init__(self, message: str, *, field: str, source: str = ""):
        source = recorded_name(str(source))  # a path that is not UTF-8 would break the log line
        self.field = field
        self.source = source
        self.message = message  # without the source and field (a reject row has its own)
        where = f"{source}: " if source else ""
        super().__init__(f"{where}[{field}] {message}")


@dataclass
class CropSet:
    """Cell crops of one size.

    Attributes
    ----------
    crops
        (N, S, S, 3) uint8, background outside the mask set to the background value.
    masks
        (N, S, S) bool cell masks (all True when the source has no mask).
    obs
        N rows, index = unique image reference; columns ``label`` (str, may be
        ""), ``source``, ``has_mask`` and, when known, ``maturation``,
        ``truth_cell_id`` and the truth columns.
    granules
        (N, S, S) uint8 granule centres per pixel, or None: found on each crop at the
        resolution it was cut (:func:`granule_centres_at_source`, ``pair.granule_centres``).
    granule_od
        (N, 3) float32 each crop's mean granule optical density there (NaN: none), or
        None (with ``granules``).
    """

    crops: np.ndarray
    masks: np.ndarray
    obs: pd.DataFrame
    granules: np.ndarray | None = None
    granule_od: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.obs)
        if self.crops.shape[0] != n or self.masks.shape[0] != n:
            raise PairingError(
                f"{self.crops.shape[0]} crops, {self.masks.shape[0]} masks, {n} obs rows",
                field="crops",
            )
        if self.granules is not None and self.granules.shape != self.masks.shape:
            raise PairingError(
                f"granule centres {self.granules.shape} for masks {self.masks.shape}",
                field="granules",
            )
        if (self.granules is None) != (self.granule_od is None) or (
            self.granule_od is not None and self.granule_od.shape != (n, 3)
        ):
            raise PairingError(
                "granule centres and their stain (N, 3) come together, got "
                f"{None if self.granule_od is None else self.granule_od.shape}",
                field="granule_od",
            )
        if self.obs.index.duplicated().any():
            raise PairingError(
                f"duplicate crop ids {list(self.obs.index[self.obs.index.duplicated()][:5])}",
                field="obs_names",
            )

    def __len__(self) -> int:
        return len(self.obs)

    @staticmethod
    def concat(sets: list[CropSet]) -> CropSet:
        if not sets:
            raise PairingError("no crop source", field="pair.crop_sources")
        gran = od = None
        if any(s.granules is not None for s in sets):
            # a source without them (crop folders: no finer frame than the crop) gets its
            # centres found on the crop itself, as the trainer would
            found = [
                (s.granules, s.granule_od)
                if s.granules is not None
                else granule_centres_at_source(s.crops, s.masks)
                for s in sets
            ]
            gran = np.concatenate([g for g, _ in found])
            od = np.concatenate([o for _, o in found])
        return CropSet(
            crops=np.concatenate([s.crops for s in sets]),
            masks=np.concatenate([s.masks for s in sets]),
            obs=pd.concat([s.obs for s in sets]),
            granules=gran,
            granule_od=od,
        )

    def take(self, keep: np.ndarray) -> CropSet:
        """The rows ``keep`` (bool or int index) of every field."""
        return CropSet(
            crops=self.crops[keep],
            masks=self.masks[keep],
            obs=self.obs[keep] if np.asarray(keep).dtype == bool else self.obs.iloc[keep],
            granules=None if self.granules is None else self.granules[keep],
            granule_od=None if self.granule_od is None else self.granule_od[keep],
        )


def granule_centres_at_source(
    crops: np.ndarray,
    masks: np.ndarray,
    size: int | None = None,
    params=None,
    background: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Granule centres found on each crop at its own resolution, counted on a ``size`` grid,
    and the granules' mean optical density there.

    Why: the granule layer of the VAE learns the granules the analyses count
    (:func:`vae.analysis.granules.measure_cell`). ``stage=segment`` cuts a cell at the
    detector's working resolution in a 128 px crop and the pairing halves it to 64 px,
    where a granule of 1 px sd becomes half a pixel and touching granules merge: on the
    demo's crops the counter then reads the simulator's drawn granules at 0.87, against
    0.97 on the 128 px crop (docs/vae.md, "Granule targets at the crop's own
    resolution"). So the centres are found before the resize and carried over, and so
    is their stain: in the halved crop a myelocyte's granules are fainter than the
    counter's threshold and take the colour of the cytoplasm around them.

    Parameters
    ----------
    crops : (N, H, H, 3) uint8, background outside the mask
    masks : (N, H, H) bool
    size : int, optional
        Side of the grid the centres are counted on (the resized crop's); default H.
        A centre at (r, c) lands in pixel ``floor((r + 0.5) * size / H)``, the pixel
        of the resized crop that covers it (the whole crop resized, as
        :func:`read_cells_h5ad` does).
    params : vae.analysis.granules.GranuleParams, optional
    background : int, optional
        Set the pixels outside each mask to this first (on a copy of one crop at a
        time), as the trainer sees the crop: no smear around the cell. None: the crops
        are blanked already.

    Returns
    -------
    centres : (N, size, size) uint8
        Granule centres per pixel (0-255).
    od : (N, 3) float32
        Mean optical density (R, G, B) of each crop's granules above their surroundings
        at the centres (:func:`vae.losses.granule_contrast`, its neighbourhood scaled by
        ``H / size`` so it spans the same part of the cell as at model size); NaN
        where no granule was found.
    """
    import torch

    from vae.analysis.granules import measure_cell
    from vae.data import centres_on_grid
    from vae.losses import GRANULE_OD_SIGMA, granule_contrast

    n, h = crops.shape[0], crops.shape[1]
    size = h if size is None else int(size)
    out = np.zeros((n, size, size), dtype=np.uint8)
    od = np.full((n, 3), np.nan, dtype=np.float32)
    for i in range(n):
        m = np.asarray(masks[i], dtype=bool)
        if m.sum() < 16:  # as vae.data.crop_targets: no cell to search
            continue
        crop = crops[i]
        if background is not None:
            crop = crop.copy()
            crop[~m] = background
        blobs = measure_cell(crop, m, params, grain=False).blobs
        if not len(blobs):
            continue
        rc = np.clip(np.rint(blobs[:, :2]).astype(int), 0, h - 1)
        img = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]
        mt = torch.from_numpy(m)[None, None].float()
        c = granule_contrast(img.float().div(255.0), mt, GRANULE_OD_SIGMA * h / size)[0]
        od[i] = c.numpy()[:, rc[:, 0], rc[:, 1]].mean(1)
        out[i] = centres_on_grid(rc[:, 0], rc[:, 1], h, size)
    return out, od


# ----------------------------------------------------------------------------
# crop geometry
# ----------------------------------------------------------------------------


def square_crop(
    image: np.ndarray, mask: np.ndarray, size: int, background: int = 0, margin: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Cut the mask's bounding square (plus ``margin``), resize, blank the background.

    Parameters
    ----------
    image
        (H, W, 3) uint8.
    mask
        (H, W) bool; all True keeps the whole image (no mask known).
    size
        Output side S, px.
    background
        Value given to every pixel outside the mask.

    Returns
    -------
    crop, mask
        (S, S, 3) uint8 and (S, S) bool.

    Notes
    -----
    The result is Pillow's bilinear resize of the square (padded with ``background``
    where it leaves the image, pixels outside the mask set to it first) and the
    nearest resize of its mask, computed without a square-sized copy: Pillow resizes
    rows first, then columns, each pass rounded to uint8, so the row pass runs on strips
    of rows of the square and the column pass on the (side, S) result, and the mask is
    sampled at the pixels Pillow's nearest resize picks. A 16000 x 12000 crop (no mask)
    needed about 7 GB more than the image itself this way (``np.nonzero`` of its
    all-True mask, the padded copies); now a few tens of MB (docs/reliability.md).
    """
    from PIL import Image

    h, w = mask.shape
    full = bool(mask.all())  # no mask known: the whole image
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if full or not len(rows):  # (an empty mask: the whole image's box, blanked)
        ymin, ymax, xmin, xmax = 0, h - 1, 0, w - 1
    else:
        ymin, ymax, xmin, xmax = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    if full:
        side = max(h, w)
    else:
        side = int(np.ceil(max(ymax - ymin + 1, xmax - xmin + 1) * (1 + margin)))
    # box centre in pixel-edge coordinates; the square [y0, y0 + side) is centred on it
    cy, cx = (ymin + ymax + 1) / 2, (xmin + xmax + 1) / 2
    y0, x0 = int(np.floor(cy - side / 2)), int(np.floor(cx - side / 2))
    # the square's part inside the image
    iy0, iy1, ix0, ix1 = max(y0, 0), min(y0 + side, h), max(x0, 0), min(x0 + side, w)
    # row pass: each row of the square -> S columns; a row wholly outside the image is
    # the resize of a background row
    dtype = image.dtype
    bg_row = np.asarray(
        Image.fromarray(np.full((1, side, 3), background, dtype)).resize((size, 1), Image.BILINEAR)
    )
    half = np.empty((side, size, 3), dtype)
    half[:] = bg_row
    step = max(1, (16 << 20) // (3 * side))  # strips of about 16 MB
    for r0 in range(iy0, iy1, step):
        r1 = min(r0 + step, iy1)
        strip = np.full((r1 - r0, side, 3), background, dtype)
        inside = strip[:, ix0 - x0 : ix1 - x0]
        inside[:] = image[r0:r1, ix0:ix1]
        if not full:  # no smear context bleeds into edge pixels on resize
            inside[~mask[r0:r1, ix0:ix1]] = background
        half[r0 - y0 : r1 - y0] = np.asarray(
            Image.fromarray(strip).resize((size, r1 - r0), Image.BILINEAR)
        )
    # column pass (the width is S already: Pillow resizes the columns only)
    img = np.array(Image.fromarray(half).resize((size, size), Image.BILINEAR))
    # the mask: Pillow's nearest resize of the square's mask picks these pixels (the
    # same on both axes: side -> S)
    pick = np.asarray(
        Image.fromarray(np.arange(side, dtype=np.int32)[None, :]).resize((size, 1), Image.NEAREST)
    )[0].astype(np.int64)
    sy, sx = y0 + pick, x0 + pick
    iny, inx = (sy >= 0) & (sy < h), (sx >= 0) & (sx < w)
    msk = np.zeros((size, size), bool)
    msk[np.ix_(iny, inx)] = mask[np.ix_(sy[iny], sx[inx])]
    img[~msk] = background
    return img.astype(np.uint8), msk


def resize_crop(
    crop: np.ndarray, mask: np.ndarray, size: int, background: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Resize a (H, W, 3) crop (bilinear) and its (H, W) mask (nearest) to (S, S)."""
    from PIL import Image

    img = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)).copy()
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST))
    m = m > 127
    img[~m] = background
    return img.astype(np.uint8), m


def _load_rgb(path: Path) -> np.ndarray:
    from segmentation.io import ImageReadError, load_rgb

    try:
        return load_rgb(path)
    except ImageReadError as e:
        raise PairingError(f"unreadable image ({e.reason})", field="image", source=str(path)) from e


# ----------------------------------------------------------------------------
# crop readers
# ----------------------------------------------------------------------------


def read_cells_h5ad(
    path: str | Path,
    size: int,
    background: int = 0,
    rejects: list | None = None,
    granules: bool = False,
) -> CropSet:
    """Crops of ``stage=segment`` (``cells.h5ad``), resized to ``size`` if needed.

    A cell whose mask is empty would train as an all-background crop: it is skipped
    (a reject row in ``rejects`` when given, else a warning); none left is an error.
    ``granules``: also find each cell's granule centres on the crop as cut, before the
    resize (:func:`granule_centres_at_source`; ``CropSet.granules``).
    """
    path = Path(path)
    a = blank_as_read(ad.read_h5ad(path))
    for key in ("crops", "masks"):
        if key not in a.obsm:
            raise PairingError(f"no obsm['{key}']", field=f"obsm['{key}']", source=str(path))
    crops = np.asarray(a.obsm["crops"])
    masks = np.asarray(a.obsm["masks"]).astype(bool)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise PairingError(
            f"expected (N, S, S, 3) uint8, got {crops.shape} {crops.dtype}",
            field="obsm['crops']",
            source=str(path),
        )
    if len(crops) == 0:
        raise PairingError(
            "holds no cells (stage=segment kept none: see its summary.json and rejects.csv; "
            "a detector trained for too few segmentation.epochs finds none)",
            field="obs",
            source=str(path),
        )
    empty = ~masks.reshape(len(masks), -1).any(axis=1)
    if empty.any():
        for cid in a.obs_names[empty].astype(str):
            _record_skip(rejects, Path(f"{path}[{cid}]"), "obsm['masks']", "empty mask (no cell)")
        if empty.all():
            raise PairingError(
                f"every one of its {len(masks)} masks is empty (no cell to crop)",
                field="obsm['masks']",
                source=str(path),
            )
        a, crops, masks = a[~empty], crops[~empty], masks[~empty]
    gran = gran_od = None
    if granules:  # on the crops as cut, each blanked around its cell as the trainer sees it
        gran, gran_od = granule_centres_at_source(crops, masks, size, background=background)
    if crops.shape[1] != size or crops.shape[2] != size:
        # keep the segment stage's framing: resize the whole crop, not the mask box
        resized = [resize_crop(c, m, size, background) for c, m in zip(crops, masks)]
        crops = np.stack([r[0] for r in resized])
        masks = np.stack([r[1] for r in resized])
    else:
        crops = crops.copy()
        crops[~masks] = background
    if gran is not None:
        off = int(gran[~masks].sum())
        if off:  # a centre the resized mask leaves out is not on the cell
            log.info("%s: %d granule centres fell outside the resized masks", path, off)
        gran[~masks] = 0
    obs = pd.DataFrame(index=a.obs_names.astype(str))
    src = a.obs
    obs["label"] = src["kind"].astype(str).to_numpy() if "kind" in src else ""
    if "label" in src:
        obs["label"] = src["label"].astype(str).to_numpy()
    obs["source"] = src["source"].astype(str).to_numpy() if "source" in src else "cells"
    if "specimen" in src:  # stage=segment on data.segment_sources: one id per specimen image
        obs["specimen"] = src["specimen"].astype(str).replace({"nan": ""}).to_numpy()
    obs[HAS_MASK] = True
    if "truth_cell_id" in src:
        obs["truth_cell_id"] = (
            src["truth_cell_id"].astype(str).replace({"nan": "", "None": ""}).to_numpy()
        )
    for c in TRUTH_COLUMNS:
        if c in src:
            obs[c] = src[c].to_numpy()
    if "t" in src:
        obs["maturation"] = pd.to_numeric(src["t"], errors="coerce").to_numpy(dtype=np.float32)
    diameter = cell_diameters(src)  # the cell's size, lost in the crop's framing (stage=segment)
    if diameter is not None:
        obs[CELL_DIAMETER] = diameter
    return CropSet(crops=crops, masks=masks, obs=obs, granules=gran, granule_od=gran_od)


def _record_skip(rejects: list | None, path: Path, field: str, reason: str) -> None:
    """Log a skipped file and, when the caller collects them, add its reject row (the
    path as every table writes it: :func:`segmentation.io.recorded_name`)."""
    shown, reason = recorded_name(path), recorded_name(str(reason))
    log.warning("%s: %s; skipped", shown, reason)
    if rejects is not None:
        rejects.append({"image": shown, "field": field, "action": "skipped", "reason": reason})


def _skip(rejects: list | None, path: Path, field: str, err: PairingError | str) -> None:
    """An unusable file: a reject row when the caller collects them, else the error."""
    if rejects is None:
        raise (
            err
            if isinstance(err, PairingError)
            else PairingError(err, field=field, source=str(path))
        )
    _record_skip(rejects, path, field, err.message if isinstance(err, PairingError) else err)


def read_image_folder(
    root: str | Path,
    size: int,
    background: int = 0,
    max_per_class: int | None = None,
    rejects: list | None = None,
) -> CropSet:
    """ImageFolder of labelled crops (``root/<Class>/*.jpg``); class names lower-cased.

    These crops have no cell mask: ``masks`` are True over the whole image (False
    only on the padding that makes a non-square image square) and
    ``obs[HAS_MASK]`` is False. ``rejects``: a list to collect one row per unreadable
    image or one smaller than :data:`MIN_CROP_SIDE` px, which is then skipped (None:
    such an image is an error). Hidden folders and files (names starting with ``.``,
    e.g. Jupyter's ``.ipynb_checkpoints``) are neither classes nor crops.
    """
    root = Path(root)
    if not root.is_dir():
        raise PairingError("no such folder", field="path", source=str(root))
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise PairingError(
            "no class sub-folders (ImageFolder layout)", field="path", source=str(root)
        )
    crops, masks, rows = [], [], []
    listed = 0
    for d in classes:
        files = sorted(
            f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS and not f.name.startswith(".")
        )
        if max_per_class is not None:
            files = files[:max_per_class]
        listed += len(files)
        for f in files:
            try:
                img = _load_rgb(f)
            except PairingError as e:
                _skip(rejects, f, "image", e)
                continue
            if min(img.shape[:2]) < MIN_CROP_SIDE:
                why = (
                    f"too small: {img.shape[1]}x{img.shape[0]} px (a crop needs >= "
                    f"{MIN_CROP_SIDE} px a side, as stage=segment reads images)"
                )
                _skip(rejects, f, "image", why)
                continue
            # no mask: all True, as a view (no image-sized array)
            c, m = square_crop(img, np.broadcast_to(True, img.shape[:2]), size, background)
            crops.append(c)
            masks.append(m)
            # ids, labels and source as every table writes them (stage=segment's rule:
            # a name that is not UTF-8 has its bytes escaped; the h5ad writer takes no
            # surrogate); the file is read from its own path
            cid = recorded_name(f"{root.name}/{d.name}/{f.name}")
            if cid != f"{root.name}/{d.name}/{f.name}":
                log.warning("%s", undecodable_warning(f))
            rows.append({"id": cid, "label": recorded_name(d.name).lower()})
    if not rows and listed:  # every one skipped: not "no images"
        raise PairingError(
            f"none of its {listed} image file(s) could be used: each was skipped as "
            "unreadable or too small (each a warning and a reject row)",
            field="image",
            source=str(root),
        )
    if not rows:
        raise PairingError("no images found", field="path", source=str(root))
    obs = pd.DataFrame(rows).set_index("id")
    obs.index.name = None
    obs["source"] = recorded_name(root.name)
    obs[HAS_MASK] = False
    return CropSet(crops=np.stack(crops), masks=np.stack(masks), obs=obs)


def read_segmentation_wbc(
    root: str | Path,
    size: int,
    background: int = 0,
    max_per_class: int | None = None,
    subsets: tuple[str, ...] = ("dataset1", "dataset2"),
    rejects: list | None = None,
) -> CropSet:
    """segmentation_WBC: ``<subset>/NNN.bmp`` + ``NNN.png`` mask, ``<subset>_labels.csv``.

    Mask coding 0 background, 128 cytoplasm, 255 nucleus; cell = mask > 0.
    Labels CSV: first column image id (int), second the class code 1-5
    (:data:`SEGMENTATION_WBC_CLASSES`). ``rejects``: a list to collect one row per
    label row whose image or mask is missing or unreadable, or whose mask is not the
    image's size, which is then skipped (None: a missing pair is logged and skipped, an
    unreadable or mis-sized one is an error). An empty mask (no cell) is always skipped
    (a reject row, else a warning), as in :func:`read_cells_h5ad`.
    """
    root = Path(root)
    crops, masks, rows = [], [], []
    per_class: dict[str, int] = {}  # max_per_class counts over all subsets
    tried = 0  # label rows looked for
    for sub in subsets:
        csv = root / f"{sub}_labels.csv"
        if not csv.exists():
            raise PairingError("label CSV missing", field="path", source=str(csv))
        try:
            lab = pd.read_csv(csv)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            # a damaged file (Latin-1 bytes, 0 bytes, a ragged line): named, not pandas' error
            raise PairingError(
                f"not a readable label CSV ({type(e).__name__}: {str(e).strip()})",
                field="path",
                source=str(csv),
            ) from None
        if lab.shape[1] < 2:
            raise PairingError(
                "expected columns: image id, class", field="columns", source=str(csv)
            )
        id_col, class_col = str(lab.columns[0]), str(lab.columns[1])
        seen: dict[int, int] = {}
        for row, (img_id, code) in enumerate(zip(lab.iloc[:, 0], lab.iloc[:, 1]), start=2):
            # row: the file's line (line 1 is the header)
            try:
                code_i, id_i = int(code), int(img_id)
            except (TypeError, ValueError):
                raise PairingError(
                    f"line {row}: {id_col!r} / {class_col!r} must be integers, got "
                    f"{img_id!r} / {code!r}",
                    field=class_col,
                    source=str(csv),
                ) from None
            if code_i not in SEGMENTATION_WBC_CLASSES:
                raise PairingError(
                    f"line {row}: {class_col!r} {code} of image {img_id} not in 1-5",
                    field=class_col,
                    source=str(csv),
                )
            if id_i in seen:
                raise PairingError(
                    f"line {row}: image {img_id} is listed again (first on line {seen[id_i]})",
                    field=id_col,
                    source=str(csv),
                )
            seen[id_i] = row
            label = SEGMENTATION_WBC_CLASSES[code_i]
            if max_per_class is not None and per_class.get(label, 0) >= max_per_class:
                continue
            tried += 1
            stem = f"{id_i:03d}"
            img_path = root / sub / f"{stem}.bmp"
            mask_path = root / sub / f"{stem}.png"
            if not img_path.exists() or not mask_path.exists():
                gone = img_path if not img_path.exists() else mask_path
                field = "image" if gone == img_path else "mask"
                _record_skip(rejects, gone, field, f"no such file (id {img_id} of {csv.name})")
                continue
            try:
                img = _load_rgb(img_path)
            except PairingError as e:
                _skip(rejects, img_path, "image", e)
                continue
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(mask_path) as im:
                    m = np.asarray(im.convert("L")) > 0
            except (OSError, UnidentifiedImageError) as e:
                _skip(rejects, mask_path, "mask", f"unreadable mask ({e})")
                continue
            if m.shape != img.shape[:2]:  # one bad pair in many: skipped, as an unreadable one
                why = f"mask {m.shape[1]}x{m.shape[0]} px vs image {img.shape[1]}x{img.shape[0]} px"
                _skip(rejects, mask_path, "mask", why)
                continue
            if not m.any():  # would train as an all-background crop (as read_cells_h5ad)
                _record_skip(rejects, mask_path, "mask", "empty mask (no cell)")
                continue
            c, mm = square_crop(img, m, size, background)
            crops.append(c)
            masks.append(mm)
            per_class[label] = per_class.get(label, 0) + 1
            rows.append({"id": f"segmentation_wbc/{sub}/{stem}", "label": label})
    if not rows and tried:  # every one skipped: not "no images" (as read_image_folder)
        raise PairingError(
            f"none of its {tried} labelled image(s) could be used: each was skipped (a "
            "missing or unreadable image or mask, a mask of another size, an empty mask; "
            "each a warning and a reject row)",
            field="image",
            source=str(root),
        )
    if not rows:
        raise PairingError("no images found", field="path", source=str(root))
    obs = pd.DataFrame(rows).set_index("id")
    obs.index.name = None
    obs["source"] = "segmentation_wbc"
    obs[HAS_MASK] = True
    return CropSet(crops=np.stack(crops), masks=np.stack(masks), obs=obs)


def read_coco_crops(
    images_dir: str | Path,
    annotations: str | Path,
    size: int,
    background: int = 0,
    max_per_class: int | None = None,
    skip_truncated: bool = True,
) -> CropSet:
    """Ground-truth crops of a COCO instances file with masks (e.g. the simulator's).

    Each annotation with a ``segmentation`` becomes one crop (mask bounding square
    plus 10 % margin). The annotation's ``cell_id`` (or ``ann<id>``) is both the
    crop id and ``truth_cell_id``; ``kind`` is the label; the truth columns and
    ``t`` (as ``maturation``) are copied when present. ``skip_truncated`` drops
    cells cut by the image border (``truncated`` true).
    """
    import json

    images_dir, annotations = Path(images_dir), Path(annotations)
    try:
        coco = json.loads(annotations.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PairingError(
            f"unreadable COCO file: {e}", field="path", source=str(annotations)
        ) from e
    for key in ("images", "annotations"):
        if key not in coco:
            raise PairingError(f"no '{key}' list", field=key, source=str(annotations))
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        if a.get("segmentation") and not (skip_truncated and a.get("truncated")):
            by_image.setdefault(a["image_id"], []).append(a)
    crops, masks, rows = [], [], []
    per_class: dict[str, int] = {}
    for im in sorted(coco["images"], key=lambda d: d["id"]):
        anns = by_image.get(im["id"], [])
        if not anns:
            continue
        path = images_dir / im["file_name"]
        img = _load_rgb(path)
        h, w = img.shape[:2]
        for a in anns:
            label = str(a.get("kind", a.get("category_id", "")))
            if max_per_class is not None and per_class.get(label, 0) >= max_per_class:
                continue
            m = decode_coco_mask(a["segmentation"], h, w)
            if not m.any():
                continue
            c, mm = square_crop(img, m, size, background)
            crops.append(c)
            masks.append(mm)
            per_class[label] = per_class.get(label, 0) + 1
            cid = str(a.get("cell_id", f"ann{a['id']}"))
            row = {"id": cid, "label": label, "truth_cell_id": cid, "image": im["file_name"]}
            row.update({k: a[k] for k in TRUTH_COLUMNS if k in a})
            if a.get("t") is not None:
                row["maturation"] = float(a["t"])
            rows.append(row)
    if not rows:
        raise PairingError(
            "no annotation with a mask", field="annotations", source=str(annotations)
        )
    obs = pd.DataFrame(rows).set_index("id")
    obs.index.name = None
    if "maturation" in obs:
        obs["maturation"] = pd.to_numeric(obs["maturation"], errors="coerce")
    if "t" in obs:
        obs["t"] = pd.to_numeric(obs["t"], errors="coerce")
    obs["source"] = "coco"
    obs[HAS_MASK] = True
    return CropSet(crops=np.stack(crops), masks=np.stack(masks), obs=obs)


# ----------------------------------------------------------------------------
# pairing
# ----------------------------------------------------------------------------


# key columns of a label-corrections table: one crop (its id, as ``image_ref`` in
# paired.h5ad, latent.h5ad and evaluate's label_suspects.csv) or every crop of one
# specimen image (``specimen``: a BCCD smear cell and the curated crop cut from it)
CORRECTION_KEYS = ("image_ref", "specimen")


def read_label_corrections(path: str | Path) -> tuple[str, pd.DataFrame]:
    """Read a reviewed label list: a key column and ``label``.

    Parameters
    ----------
    path : CSV with a header. Exactly one key column, ``image_ref`` or ``specimen``
        (see ``CORRECTION_KEYS``), and ``label``: the corrected class, spelled as a
        crop class or as its ``pair.label_map`` target; empty: the crop keeps no
        class (an unlabelled image-only row). Other columns are ignored, so
        evaluate's ``label_suspects.csv`` with an edited ``label`` column works.

    Returns
    -------
    (key, table): the key column's name and a two-column frame (key, label) of
    stripped strings, one row per line of the file.

    Raises
    ------
    PairingError
        Unreadable file, missing or ambiguous columns, an empty key, or a key
        listed twice (the message names the file, the line and the column).
    """
    src = str(path)
    field = "pair.label_corrections"
    try:
        tab = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise PairingError("file not found", field=field, source=src) from None
    except IsADirectoryError:
        raise PairingError("a folder, not a CSV file", field=field, source=src) from None
    except OSError as e:  # permission denied, an I/O error
        raise PairingError(f"unreadable ({e.strerror or e})", field=field, source=src) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PairingError(f"not a readable CSV ({e})", field=field, source=src) from None
    if "label" not in tab.columns:
        raise PairingError(
            f"no 'label' column (the corrected class; empty: no class); columns: "
            f"{list(tab.columns)}",
            field="label",
            source=src,
        )
    keys = [k for k in CORRECTION_KEYS if k in tab.columns]
    if len(keys) != 1:
        raise PairingError(
            "needs exactly one key column: image_ref (one crop) or specimen (every crop "
            f"of one specimen image); columns: {list(tab.columns)}",
            field="columns",
            source=src,
        )
    key = keys[0]
    # label_suspects.csv writes a crop named "=x.png" as "'=x.png" (spreadsheet_safe): the
    # key is matched as the crop is named
    tab = pd.DataFrame({c: tab[c].str.strip().map(spreadsheet_unquote) for c in (key, "label")})
    empty = np.flatnonzero(tab[key].to_numpy() == "")
    if empty.size:
        raise PairingError(f"line {empty[0] + 2}: empty {key}", field=key, source=src)
    dup = tab[key].duplicated(keep=False).to_numpy()
    if dup.any():
        v = tab[key].iloc[int(np.flatnonzero(dup)[0])]
        lines = [int(j) + 2 for j in np.flatnonzero(tab[key].to_numpy() == v)]
        raise PairingError(f"{key} {v!r} is listed on lines {lines}", field=key, source=src)
    return key, tab


def apply_label_corrections(
    crops: CropSet,
    key: str,
    table: pd.DataFrame,
    label_map: dict[str, str] | None = None,
    source: str = "",
) -> tuple[CropSet, list[dict], dict[str, int]]:
    """Set the crops' labels from a reviewed list (:func:`read_label_corrections`).

    A researcher who has looked at evaluate's ``label_suspects`` / ``label_disagreements``
    writes the labels she trusts; they replace the source's labels before pairing, so
    the pairs, the split and the label head all follow them.

    Parameters
    ----------
    crops : the crops, ``obs['label']`` as read from their sources.
    key, table : as returned by :func:`read_label_corrections`.
    label_map : ``pair.label_map`` (crop class -> expression label): a corrected label
        may be spelled as its target (e.g. ``Neutrophils`` for ``neutrophil``).
    source : the file, for messages.

    Returns
    -------
    crops : a copy, ``obs['label']`` corrected, ``obs[LABEL_ORIGINAL]`` the label before.
    rejects : one row (``image``, ``field``, ``action``, ``reason``) per key that matches
        no crop; those lines are skipped.
    counts : ``lines``, ``crops_relabelled`` (another class), ``crops_unlabelled``
        (class removed), ``crops_confirmed`` (same class), ``not_found`` (lines).

    Raises
    ------
    PairingError
        ``field='label'`` when a corrected label is neither a crop class nor a
        ``label_map`` target (the message names the line and the valid labels).
    """
    lab = crops.obs["label"].astype(str).to_numpy()
    classes = sorted({c for c in lab if c})
    single = {}  # crop class (as the crops spell it) -> its one label_map target
    for k, v in (label_map or {}).items():
        ck = _ci_lookup(classes, k)
        if ck is not None and LABEL_UNION not in str(v):
            single[ck] = str(v)
    targets = sorted(set(single.values()))
    new = lab.astype(object).copy()
    ids = (
        crops.obs.index.astype(str).to_numpy()
        if key == "image_ref"
        else crops.obs.get("specimen", pd.Series("", index=crops.obs.index))
        .fillna("")
        .astype(str)
        .to_numpy()
    )
    rejects: list[dict] = []
    counts = dict(
        lines=len(table), crops_relabelled=0, crops_unlabelled=0, crops_confirmed=0, not_found=0
    )
    for j, (k, want) in enumerate(zip(table[key], table["label"])):
        line = j + 2
        if want == "":
            cls = ""
        else:
            cls = _ci_lookup(classes, want)
            if cls is None:
                t = _ci_lookup(targets, want)
                back = [c for c, v in single.items() if v == t] if t is not None else []
                cls = back[0] if len(back) == 1 else None
                if len(back) > 1:  # several classes share the target: which one is meant
                    raise PairingError(
                        f"line {line}: label {want!r} is the pair.label_map target of "
                        f"several crop classes {sorted(back)}; name one of them",
                        field="label",
                        source=source,
                    )
            if cls is None:
                raise PairingError(
                    f"line {line}: label {want!r} is neither a crop class {classes} nor a "
                    f"pair.label_map target {targets} (empty: no class)",
                    field="label",
                    source=source,
                )
        hit = np.flatnonzero(ids == k)
        if not hit.size:
            counts["not_found"] += 1
            rejects.append(
                {
                    "image": k,
                    "field": "pair.label_corrections",
                    "action": "correction_skipped",
                    "reason": f"{source} line {line}: {key} {k!r} is not among the crops",
                }
            )
            continue
        for i in hit:
            which = (
                "crops_confirmed"
                if lab[i] == cls
                else ("crops_unlabelled" if cls == "" else "crops_relabelled")
            )
            counts[which] += 1
            new[i] = cls
    obs = crops.obs.copy()
    obs[LABEL_ORIGINAL] = lab
    obs["label"] = new.astype(str)
    return (
        CropSet(
            crops=crops.crops,
            masks=crops.masks,
            obs=obs,
            granules=crops.granules,
            granule_od=crops.granule_od,
        ),
        rejects,
        counts,
    )


@dataclass
class PairResult:
    """Output of :func:`make_pairs`.

    Attributes
    ----------
    adata
        ``paired.h5ad`` content (``docs/artifacts.md``, section *pair*).
    summary
        Rows per ``label`` x ``modalities`` (``image+expression``, ``image``,
        ``expression``) with column ``n``.
    notes
        What the pairing decided, in words (``uns["pair"]["notes"]`` of the stage).
    shared_labels
        ``by_label``: expression label -> {image class: number of crops} for each label
        that several image classes map onto (:func:`one_vocabulary`); empty otherwise.
    """

    adata: ad.AnnData
    summary: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    # by_label: expression label -> {image class: crops} for the labels that several
    # image classes map onto (each class then keeps its name; see one_vocabulary)
    shared_labels: dict[str, dict[str, int]] = field(default_factory=dict)


def _ci_lookup(names, wanted: str) -> str | None:
    low = {str(n).lower(): str(n) for n in names}
    return low.get(str(wanted).lower())


LABEL_UNION = "|"  # "A|B" in a label_map value: draw from the profiles of A and B


def resolve_label_map(
    label_map: dict[str, str], image_labels, expression_labels, *, strict: bool = True
) -> dict[str, str]:
    """Image label -> expression label(s), both spelled as in the data.

    Matching is case-insensitive. A value may name several expression labels
    joined by ``|`` (e.g. ``lymphocyte: "CD8+ Cytotoxic T|CD19+ B"``): the crop
    then draws from their union. An empty map pairs the labels both sides share.

    Raises
    ------
    PairingError
        ``field="pair.label_map"`` when a key is not an image class or a value
        not an expression label (``strict``); the message lists valid classes.
    """
    img = sorted({str(x) for x in image_labels if str(x)})
    expr = sorted({str(x) for x in expression_labels if str(x)})
    if not label_map:
        out = {}
        for c in img:
            e = _ci_lookup(expr, c)
            if e is not None:
                out[c] = e
        return out
    out = {}
    for k, v in label_map.items():
        ki = _ci_lookup(img, k)
        parts = [x.strip() for x in str(v).split(LABEL_UNION)]
        found = [_ci_lookup(expr, x) for x in parts]
        bad = [x for x, f in zip(parts, found) if f is None]
        if ki is None or bad:
            what = (
                f"image class {k!r} is not among the crops' classes {img}"
                if ki is None
                else f"expression label {bad[0]!r} is not among {expr}"
            )
            if strict:
                raise PairingError(what, field="pair.label_map")
            log.warning("pair.label_map: %s; entry ignored", what)
            continue
        out[ki] = LABEL_UNION.join(found)
    return out


def one_vocabulary(
    label_map: dict[str, str], image_labels
) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Which image classes take their expression label as ``obs["label"]``.

    With ``by_label`` a crop whose class maps onto one expression label is labelled
    with it (``neutrophil`` crops become ``Neutrophils``), so crops and profiles share
    one vocabulary. That would merge classes when several image classes (other than
    spellings of one class in different case) end up with the same label, e.g.
    ``band`` and ``segmented_neutrophil`` both mapped onto ``Neutrophils``: the band
    class would vanish from training, evaluation and the traverse path. Those classes
    keep their own names instead, as a crop mapped onto a ``|`` union of labels does;
    they still draw their profiles from the label they map onto.

    Parameters
    ----------
    label_map
        Resolved map (:func:`resolve_label_map`): image class -> expression label(s).
    image_labels
        Every crop's class (``""``: unlabelled).

    Returns
    -------
    relabel
        Image class -> the label its crops take (classes not in it keep their name).
    shared
        Expression label -> {image class: number of crops}, for each label several
        image classes map onto (empty when none does).
    """
    one = {k: v for k, v in label_map.items() if LABEL_UNION not in v}  # unions keep theirs
    sizes = pd.Series(np.asarray(image_labels, dtype=str)).value_counts()
    groups: dict[str, list[str]] = {}  # label a class would end with -> the classes
    for c in sizes.index:
        if c:
            groups.setdefault(one.get(c, c), []).append(c)
    shared = {
        lab: {c: int(sizes[c]) for c in sorted(cs)}
        for lab, cs in sorted(groups.items())
        if len({c.lower() for c in cs}) > 1 and any(c in one for c in cs)
    }
    return {k: v for k, v in one.items() if v not in shared}, shared


def shared_label_message(label: str, classes: dict[str, int]) -> str:
    """One line on the image classes that share the expression label ``label``."""
    listed = ", ".join(f"{c} ({n} crops)" for c, n in classes.items())
    return (
        f"pair.label_map: image classes {listed} all map onto the expression label "
        f"{label!r}; each keeps its own class as obs['label'] (as with a '|' union), so "
        f"they stay apart in training, evaluation and analysis.path_classes, and all draw "
        f"{label!r} profiles. To merge them into one class, relabel their crops before "
        f"pairing (pair.label_corrections, or one folder / class name at the source)"
    )


# a dense expression input is paired into a dense table up to this many values (rows x
# genes, float32: 128 MiB); past it the table is CSR built a block of rows at a time, so
# pairing never holds another all-rows x all-genes dense copy (audit: 20k cells x 19,899
# genes peaked at 9.7 GiB from three dense copies of X and three of counts)
DENSE_MAX_VALUES = 1 << 25
# values per block when a large dense input is turned into CSR rows
_BLOCK_VALUES = 1 << 24


def expression_rows(
    m: np.ndarray | sp.spmatrix | sp.sparray, ei: np.ndarray
) -> np.ndarray | sp.csr_matrix:
    """The paired table's expression rows: row ``k`` is input row ``ei[k]``, zeros where ``ei[k] < 0``.

    Parameters
    ----------
    m
        (n_profiles, G) expression matrix (``X`` or a layer), dense or sparse.
    ei
        (n,) int input row of each output row; -1: the output row has no profile.

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_matrix
        (n, G) float32. CSR when ``m`` is sparse, or dense with more than
        :data:`DENSE_MAX_VALUES` output values; else dense (the values are the same
        either way, and every reader of ``paired.h5ad`` takes both).
    """
    ei = np.asarray(ei, dtype=np.int64)
    n, g = len(ei), int(m.shape[1])
    has = ei >= 0
    src = ei[has]
    if sp.issparse(m):
        # CSR row selection copies only the chosen rows' non-zeros
        sub = sp.csr_matrix(m, dtype=np.float32)[src]
        return _spread_rows(sub, has, g)
    m = np.asarray(m)
    if n * g <= DENSE_MAX_VALUES:
        out = np.zeros((n, g), np.float32)
        out[has] = m[src]
        return out
    step = max(1, _BLOCK_VALUES // max(g, 1))
    blocks = [
        sp.csr_matrix(np.asarray(m[src[s : s + step]], dtype=np.float32))
        for s in range(0, len(src), step)
    ]
    sub = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, g), dtype=np.float32)
    return _spread_rows(sub, has, g)


def _spread_rows(sub: sp.csr_matrix, has: np.ndarray, g: int) -> sp.csr_matrix:
    """(len(has), G) CSR: the rows of ``sub`` in order at ``has``, empty rows elsewhere.

    Only ``indptr`` is rebuilt; ``data`` and ``indices`` are shared with ``sub``.
    """
    per_row = np.zeros(len(has), np.int64)
    per_row[has] = np.diff(sub.indptr)
    indptr = np.concatenate([[0], np.cumsum(per_row)])
    return sp.csr_matrix((sub.data, sub.indices, indptr), shape=(len(has), g))


def make_pairs(
    crops: CropSet | None,
    expression: ad.AnnData | None,
    mode: str,
    *,
    label_map: dict[str, str] | None = None,
    draws_per_crop: int = 1,
    n_bins: int = 5,
    label_maturation: dict[str, float] | None = None,
    keep_unmatched_images: bool = True,
    keep_unused_expression: bool = True,
    seed: int = 0,
    background: int = 0,
    crop_size: int = 64,
    within_label: str = "random",
    crop_order: np.ndarray | None = None,
) -> PairResult:
    """Build the paired training table.

    Parameters
    ----------
    crops
        Crop set (S from its arrays), or None for an expression-only table.
    expression
        Processed expression AnnData: ``X`` log-normalised, ``obs["label"]``,
        ``obs["maturation"]``, optional ``layers["counts"]``; None (and only
        None) for ``image_only``.
    mode
        One of :data:`PAIR_MODES`.
    label_map
        ``by_label``: image class -> expression label (see :func:`resolve_label_map`).
        A crop's ``obs["label"]`` becomes its class's one expression label, except
        where several image classes map onto the same label: they keep their own
        names, with a warning (:func:`one_vocabulary`), as ``|`` unions do.
    draws_per_crop
        ``by_label``/``by_maturation``: profiles drawn per crop (with replacement
        across crops, without within a crop when the class has enough profiles);
        each draw is its own row sharing ``image_ref`` (``obs["draw"]``).
    n_bins
        ``by_maturation``: equal-width bins on [0, 1].
    label_maturation
        ``by_maturation``: maturation of crops known only by label.
    seed
        Fixes every draw.
    background
        Recorded in ``uns["background_value"]``.
    crop_size
        S of the all-zero crop arrays when ``crops`` is None.
    within_label
        ``by_label``: which profile of its class a crop draws. ``random`` (default):
        any. ``maturation``: the crops of a class ranked by ``crop_order`` draw the
        profiles at their own rank of ``obs["maturation"]`` (within
        ``RANK_WINDOW`` of the same quantile): the least segmented nucleus meets the
        earliest profile (:func:`rank_matched_pools`). An assumption the pairing
        makes, not an observation: see docs/expression_pairing.md, "Within a class".
    crop_order
        (N crops,) float, ``within_label=maturation``: each crop's image maturation
        (:func:`vae.lobes.nucleus_segmentation`); NaN: unknown (drawn at random).

    Returns
    -------
    PairResult
    """
    if mode not in PAIR_MODES:
        raise PairingError(
            f"unknown mode {mode!r}; valid: {', '.join(PAIR_MODES)}", field="pair.mode"
        )
    if draws_per_crop < 1:
        raise PairingError("must be >= 1", field="pair.draws_per_crop")
    if n_bins < 1:
        raise PairingError("must be >= 1", field="pair.n_bins")
    if within_label not in WITHIN_LABEL:
        raise PairingError(
            f"unknown {within_label!r}; valid: {', '.join(WITHIN_LABEL)}",
            field="pair.within_label",
        )
    ranked = within_label == "maturation"
    if ranked and mode != "by_label":
        raise PairingError(
            f"within_label=maturation ranks the crops within each label: it needs "
            f"mode by_label, not {mode}",
            field="pair.within_label",
        )
    if ranked and crops is not None and (crop_order is None or len(crop_order) != len(crops)):
        raise PairingError(
            "within_label=maturation needs one image maturation per crop (crop_order)",
            field="pair.within_label",
        )
    if mode == "image_only":
        if expression is not None:
            raise PairingError("image_only reads no expression table; got one", field="pair.mode")
        if crops is None or len(crops) == 0:
            raise PairingError(
                "image_only needs crops: no pair.crop_sources entry gave any", field="pair.mode"
            )
        expression = _no_expression()
    elif expression is None:
        raise PairingError(
            f"mode {mode} needs an expression table (only image_only works without one)",
            field="pair.mode",
        )
    if "label" not in expression.obs:
        raise PairingError("expression has no obs['label']", field="obs['label']")
    rng = np.random.default_rng(seed)
    n_img = 0 if crops is None else len(crops)
    img_labels = (
        np.array([], dtype=str) if crops is None else crops.obs["label"].astype(str).to_numpy()
    )
    expr_labels = expression.obs["label"].astype(str).to_numpy()
    pairs: list[tuple[int, int, int]] = []  # (crop index or -1, profile index or -1, draw)
    lm: dict[str, str] = {}
    relabel: dict[str, str] = {}  # by_label: image class -> the label its crops take
    shared: dict[str, dict[str, int]] = {}
    notes: list[str] = []

    if mode == "same_cell":
        if crops is not None and n_img and "truth_cell_id" not in crops.obs:
            raise PairingError(
                "same_cell needs crops with obs['truth_cell_id'] (cells.h5ad of a "
                "simulated run); use by_label or by_maturation for real data",
                field="pair.mode",
            )
        pos = {c: i for i, c in enumerate(expression.obs_names.astype(str))}
        for i in range(n_img):
            j = pos.get(str(crops.obs["truth_cell_id"].iloc[i]), -1)
            pairs.append((i, j, 0))
    elif mode == "by_label":
        lm = resolve_label_map(label_map or {}, img_labels, expr_labels)
        notes.append(f"label_map: {lm}")
        relabel, shared = one_vocabulary(lm, img_labels)
        for target, classes in shared.items():
            msg = shared_label_message(target, classes)
            log.warning("%s", msg)
            notes.append(msg)
        pools = {
            v: np.flatnonzero(np.isin(expr_labels, v.split(LABEL_UNION))) for v in set(lm.values())
        }
        per_crop: dict[int, np.ndarray] = {}
        if ranked and n_img:
            if "maturation" not in expression.obs:
                raise PairingError(
                    "within_label=maturation needs obs['maturation'] of the profiles "
                    "(stage=expression: a pseudotime column or expression.root_label)",
                    field="obs['maturation']",
                )
            e_mat = expression.obs["maturation"].to_numpy(dtype=float)
            order = np.asarray(crop_order, dtype=float)
            targets = np.array([lm.get(lab, "") for lab in img_labels], dtype=object)
            for v, pool in pools.items():
                per_crop.update(
                    rank_matched_pools(np.flatnonzero(targets == v), order, pool, e_mat)
                )
            notes.append(f"within_label: maturation ({len(per_crop)} crops ranked)")
            crops = replace(crops, obs=crops.obs.assign(**{NUCLEUS_SEGMENTATION: order}))
        for i in range(n_img):
            pool = per_crop.get(i)
            if pool is None:
                pool = pools.get(lm.get(img_labels[i], None), np.array([], int))
            pairs.extend(_draw(i, pool, draws_per_crop, rng))
    elif mode == "by_maturation":
        edges = np.linspace(0.0, 1.0, n_bins + 1)

        def binned(v: np.ndarray) -> np.ndarray:
            b = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, n_bins - 1)
            return np.where(np.isfinite(v), b, -1)

        if "maturation" not in expression.obs:
            raise PairingError("expression has no obs['maturation']", field="obs['maturation']")
        e_mat = expression.obs["maturation"].to_numpy(dtype=float)
        c_mat = np.full(n_img, np.nan)
        if crops is not None and "maturation" in crops.obs:
            c_mat = crops.obs["maturation"].to_numpy(dtype=float).copy()
        lmat = {str(k).lower(): float(v) for k, v in (label_maturation or {}).items()}
        for i in range(n_img):
            if not np.isfinite(c_mat[i]) and img_labels[i].lower() in lmat:
                c_mat[i] = lmat[img_labels[i].lower()]
        if n_img and not np.isfinite(c_mat).any():
            raise PairingError(
                "no crop has a maturation (obs 't'/'maturation' or pair.label_maturation)",
                field="pair.label_maturation",
            )
        if not np.isfinite(e_mat).any():
            raise PairingError(
                "no expression profile has a maturation; set expression.root_label "
                "(diffusion pseudotime) or a maturation column",
                field="obs['maturation']",
            )
        eb, cb = binned(e_mat), binned(c_mat)
        pools = {b: np.flatnonzero(eb == b) for b in range(n_bins)}
        for i in range(n_img):
            pool = pools.get(int(cb[i]), np.array([], int)) if cb[i] >= 0 else np.array([], int)
            pairs.extend(_draw(i, pool, draws_per_crop, rng))
    else:  # unpaired, image_only
        pairs.extend((i, -1, 0) for i in range(n_img))

    if not keep_unmatched_images:
        pairs = [p for p in pairs if p[1] >= 0]
    used = {p[1] for p in pairs if p[1] >= 0}
    if mode == "unpaired" or keep_unused_expression:
        pairs.extend((-1, j, 0) for j in range(expression.n_obs) if j not in used)

    adata = _assemble(crops, expression, pairs, mode, background, relabel, crop_size)
    summary = summarize(adata)
    adata.uns["pair_summary"] = summary
    return PairResult(adata=adata, summary=summary, notes=notes, shared_labels=shared)


RANK_WINDOW = 0.1  # within_label=maturation: a crop draws from profiles within this quantile


def rank_matched_pools(
    crop_rows: np.ndarray,
    crop_order: np.ndarray,
    pool: np.ndarray,
    profile_maturation: np.ndarray,
    window: float = RANK_WINDOW,
) -> dict[int, np.ndarray]:
    """The profiles each crop of one class may draw when crops and profiles are rank-matched.

    Quantile matching, as trajectory alignment pairs two orderings of one process: a
    crop at quantile q of its class's image maturation draws among the class's profiles
    whose expression maturation lies within ``window`` of the same quantile q (at least
    one profile: the nearest rank). Crops or profiles whose order is unknown (NaN) are
    left out of the ranking (those crops draw at random from the whole class).

    Parameters
    ----------
    crop_rows : (n,) int, the crops of the class (indices into ``crop_order``)
    crop_order : (N crops,) float image maturation (:func:`vae.lobes.nucleus_segmentation`)
    pool : (m,) int, the class's profiles (indices into ``profile_maturation``)
    profile_maturation : (N profiles,) float, ``obs["maturation"]``
    window : half-width of the quantile window, in [0, 0.5]

    Returns
    -------
    {crop index: (k,) int profile indices}; crops without a finite order are absent
    """
    crop_rows = np.asarray(crop_rows, dtype=int)
    ok_c = crop_rows[np.isfinite(crop_order[crop_rows])]
    ok_p = pool[np.isfinite(profile_maturation[pool])]
    if ok_c.size == 0 or ok_p.size == 0:
        return {}
    from scipy.stats import rankdata

    q_crop = (rankdata(crop_order[ok_c]) - 0.5) / ok_c.size  # ties share their mean rank
    by_mat = ok_p[np.argsort(profile_maturation[ok_p], kind="stable")]
    q_prof = (np.arange(by_mat.size) + 0.5) / by_mat.size
    out = {}
    for i, q in zip(ok_c, q_crop):
        near = by_mat[np.abs(q_prof - q) <= window]
        out[int(i)] = near if near.size else by_mat[[int(np.argmin(np.abs(q_prof - q)))]]
    return out


def _no_expression() -> ad.AnnData:
    """0 profiles x 0 genes: what an image-only table is paired with."""
    return ad.AnnData(
        X=np.zeros((0, 0), np.float32),
        obs=pd.DataFrame({"label": []}, index=pd.Index([], dtype=str), dtype=str),
        var=pd.DataFrame(index=pd.Index([], dtype=str)),
    )


def _draw(i: int, pool: np.ndarray, k: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    if len(pool) == 0:
        return [(i, -1, 0)]
    pick = rng.choice(pool, size=k, replace=len(pool) < k)
    return [(i, int(j), d) for d, j in enumerate(pick)]


def _assemble(
    crops: CropSet | None,
    expression: ad.AnnData,
    pairs: list[tuple[int, int, int]],
    mode: str,
    background: int,
    relabel: dict[str, str] | None = None,
    crop_size: int = 64,
) -> ad.AnnData:
    """The paired table; ``relabel``: image class -> the ``obs["label"]`` its crops take
    (:func:`one_vocabulary`; other crops keep their class)."""
    n = len(pairs)
    ci = np.array([p[0] for p in pairs], dtype=int)
    ei = np.array([p[1] for p in pairs], dtype=int)
    has_img, has_expr = ci >= 0, ei >= 0
    # sparse where the input is (or is large): no dense all-rows x all-genes copy
    X = expression_rows(expression.X, ei)
    layers = {}
    has_counts = bool(expression.uns.get(HAS_COUNTS, "counts" in expression.layers))
    if has_counts and "counts" in expression.layers:
        layers["counts"] = expression_rows(expression.layers["counts"], ei)
    s = crops.crops.shape[1] if crops is not None else crop_size
    crop_arr = np.zeros((n, s, s, 3), np.uint8)
    mask_arr = np.zeros((n, s, s), bool)
    gran_arr = od_arr = None
    if crops is not None:
        crop_arr[has_img] = crops.crops[ci[has_img]]
        mask_arr[has_img] = crops.masks[ci[has_img]]
        if crops.granules is not None:
            gran_arr = np.zeros((n, s, s), np.uint8)
            gran_arr[has_img] = crops.granules[ci[has_img]]
            od_arr = np.full((n, 3), np.nan, np.float32)
            od_arr[has_img] = crops.granule_od[ci[has_img]]

    cobs = crops.obs if crops is not None else pd.DataFrame(columns=["label", "source"])
    eobs = expression.obs
    # "" stands in for a profile when there is none at all (image_only: 0 profiles)
    e_names = expression.obs_names.astype(str).to_numpy() if len(eobs) else np.array([""])
    obs = pd.DataFrame(index=[f"r{k:06d}" for k in range(n)])
    obs[HAS_IMAGE] = has_img
    obs[HAS_EXPRESSION] = has_expr
    obs["pair_mode"] = np.where(has_img & has_expr, mode, "unpaired")
    obs["image_ref"] = np.where(
        has_img, cobs.index.astype(str).to_numpy()[np.maximum(ci, 0)] if len(cobs) else "", ""
    )
    obs["expression_ref"] = np.where(has_expr, e_names[np.maximum(ei, 0)], "")
    obs["draw"] = np.array([p[2] for p in pairs], dtype=np.int16)
    c_lab = cobs["label"].astype(str).to_numpy() if len(cobs) else np.array([""])
    e_lab = eobs["label"].astype(str).to_numpy() if len(eobs) else np.array([""])
    obs["image_label"] = np.where(has_img, c_lab[np.maximum(ci, 0)], "")
    obs["expression_label"] = np.where(has_expr, e_lab[np.maximum(ei, 0)], "")
    img_as = obs["image_label"].to_numpy(dtype=object)
    if relabel:  # one vocabulary: mapped image classes take the expression label
        img_as = np.array([relabel.get(v, v) for v in img_as], dtype=object)
    obs["label"] = np.where(has_img, img_as, obs["expression_label"])
    obs["image_source"] = np.where(
        has_img, cobs["source"].astype(str).to_numpy()[np.maximum(ci, 0)] if len(cobs) else "", ""
    )
    # the specimen image a crop comes from (stage=train keeps a specimen in one split);
    # crops of sources that do not say are their own specimen
    spec = (
        cobs["specimen"].fillna("").astype(str).to_numpy()
        if "specimen" in cobs
        else np.full(max(len(cobs), 1), "", dtype=object)
    )
    obs["specimen"] = np.where(has_img, spec[np.maximum(ci, 0)] if len(cobs) else "", "")
    if LABEL_ORIGINAL in cobs:  # the label before pair.label_corrections
        orig = cobs[LABEL_ORIGINAL].astype(str).to_numpy()
        obs[LABEL_ORIGINAL] = np.where(has_img, orig[np.maximum(ci, 0)] if len(cobs) else "", "")
    # maturation: the crop's when known, else the profile's
    c_mat = (
        cobs["maturation"].to_numpy(dtype=float)
        if "maturation" in cobs
        else np.full(max(len(cobs), 1), np.nan)
    )
    e_mat = (
        eobs["maturation"].to_numpy(dtype=float)
        if "maturation" in eobs
        else np.full(len(eobs), np.nan)
    )
    mat = np.full(n, np.nan)
    mat[has_img] = c_mat[ci[has_img]]
    fill = ~np.isfinite(mat) & has_expr
    mat[fill] = e_mat[ei[fill]]
    obs["maturation"] = mat.astype(np.float32)
    # the crop's cell diameter on the detector's working frame (NaN: no crop, or a
    # source that does not say, e.g. crops read without stage=segment)
    diam = np.full(n, np.nan, np.float32)
    if CELL_DIAMETER in cobs:
        diam[has_img] = cobs[CELL_DIAMETER].to_numpy(dtype=np.float32)[ci[has_img]]
    obs[CELL_DIAMETER] = diam
    if NUCLEUS_SEGMENTATION in cobs:  # the image order of pair.within_label=maturation
        seg = np.full(n, np.nan, np.float32)
        seg[has_img] = cobs[NUCLEUS_SEGMENTATION].to_numpy(dtype=np.float32)[ci[has_img]]
        obs[NUCLEUS_SEGMENTATION] = seg
    # program scores of the row's profile (NaN without expression)
    for col in [c for c in eobs.columns if str(c).startswith("score_")]:
        v = np.full(n, np.nan, np.float32)
        v[has_expr] = eobs[col].to_numpy(dtype=np.float32)[ei[has_expr]]
        obs[col] = v
    # truth columns describe the row's cell: the crop's; the profile's when the row
    # has no crop or both sides are the same cell (same_cell)
    for col in TRUTH_COLUMNS:
        in_c, in_e = col in cobs, col in eobs
        if not (in_c or in_e):
            continue
        vals = pd.Series([None] * n, dtype=object)
        if in_c:
            cv = cobs[col].to_numpy(dtype=object)
            vals[has_img] = cv[ci[has_img]]
        if in_e:
            ev = eobs[col].to_numpy(dtype=object)
            sel = has_expr & (~has_img | (mode == "same_cell")) & vals.isna().to_numpy()
            vals[sel] = ev[ei[sel]]
        obs[col] = _typed(vals)
    for c in (
        "pair_mode",
        "image_ref",
        "expression_ref",
        "image_label",
        "expression_label",
        "label",
        "image_source",
        "specimen",
    ):
        obs[c] = obs[c].astype(str)
    renamed = _carry_expression_obs(obs, eobs, ei)
    var = pd.DataFrame(index=expression.var_names.astype(str))
    for c in ("highly_variable", "gene_of_interest"):
        if c in expression.var:
            var[c] = expression.var[c].to_numpy(dtype=bool)
    out = ad.AnnData(X=X, obs=obs, var=var, layers=layers)
    out.obsm["crops"] = crop_arr
    out.obsm["masks"] = mask_arr
    if gran_arr is not None:
        out.obsm[GRANULE_CENTRES] = gran_arr
        out.obsm[GRANULE_OD] = od_arr
    out.uns[HAS_COUNTS] = has_counts
    out.uns["crop_size"] = int(s)
    out.uns["background_value"] = int(background)
    # which expression columns took another name here (vae.data.batch_column reads it); JSON:
    # a column name may hold "/", which an h5ad mapping's keys cannot
    out.uns[OBS_RENAMED] = json.dumps(renamed)
    return out


# expression obs columns the paired obs already holds in its own form: label
# (expression_label), program scores and truth columns (same names)
_CARRIED_ELSEWHERE = ("label",)
# names downstream stages add to a copy of paired obs (latent.h5ad: stage=train); a user
# column of one of these names would be overwritten there, so it is prefixed too
_RESERVED_DOWNSTREAM = ("split", "row", *ANOMALY_COLUMNS.values())


def _carry_expression_obs(obs: pd.DataFrame, eobs: pd.DataFrame, ei: np.ndarray) -> dict[str, str]:
    """Add the expression input's own obs columns (donor, sample, QC, ...) to ``obs``, in place.

    Returns ``{input name: name in obs}`` of the columns that took another name.

    Parameters
    ----------
    obs
        (n, ...) the paired obs built so far (the pipeline's own columns).
    eobs
        (n_profiles, ...) the expression table's obs.
    ei
        (n,) int profile row of each paired row; -1: no profile.

    Notes
    -----
    Columns already carried in the pipeline's form (``label`` as ``expression_label``,
    ``score_*``, the truth columns) are skipped. A name the paired obs (or latent.h5ad)
    uses itself gets the prefix ``expression_`` (again, until unique), e.g. the profile's
    ``maturation`` becomes ``expression_maturation``. Dtypes are kept: rows without a
    profile are NaN (float, numeric categories), ``""`` (strings, string categories), or
    ``<NA>`` (int and bool become pandas' nullable Int / boolean only when such rows exist).
    """
    skip = {*_CARRIED_ELSEWHERE, *TRUTH_COLUMNS}
    taken = {*map(str, obs.columns), *_RESERVED_DOWNSTREAM}
    renamed: dict[str, str] = {}
    for col in eobs.columns:
        name = str(col)
        if name in skip or name.startswith("score_"):
            continue
        out = name
        while out in taken:
            out = f"expression_{out}"
        taken.add(out)
        obs[out] = _take_rows(eobs[col], ei)
        if out != name:
            renamed[name] = out
    return renamed


def _take_rows(col: pd.Series, ei: np.ndarray):
    """``col``'s values at rows ``ei`` (-1: missing, see :func:`_carry_expression_obs`).

    Returns an (n,) array of ``col``'s dtype (int / bool: nullable when a row is missing).
    """
    has = ei >= 0
    at = np.maximum(ei, 0)
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = col.cat.categories
        codes = col.cat.codes.to_numpy()[at]
        # string categories: "" as in paired obs (blank_as_read's reading of a NaN)
        if not has.all() and pd.api.types.is_string_dtype(cats):
            if "" not in cats:
                cats = cats.append(pd.Index([""]))
            codes = np.where(has, codes, cats.get_loc(""))
        else:
            codes = np.where(has, codes, -1)  # -1: NaN
        return pd.Categorical.from_codes(codes, categories=cats, ordered=col.cat.ordered)
    if isinstance(col.dtype, np.dtype):
        v = col.to_numpy()[at]
        if has.all():
            return v
        kind = col.dtype.kind
        if kind == "f":
            v[~has] = np.nan
            return v
        if kind in "iu":
            return pd.arrays.IntegerArray(v, ~has)
        if kind == "b":
            return pd.arrays.BooleanArray(v, ~has)
        if kind in "OUS":
            v = v.astype(object)
            v[~has] = ""
            return v
    # pandas extension dtypes (nullable Int / boolean / string, datetimes): their own NA
    taken = col.array.take(np.where(has, ei, -1), allow_fill=True)
    if isinstance(col.dtype, pd.StringDtype):
        taken[~has] = ""
    return taken


def _typed(vals: pd.Series) -> np.ndarray:
    """Object column -> float when numeric (None -> NaN), else str (None -> "")."""
    num = pd.to_numeric(vals, errors="coerce")
    if num.notna().sum() == vals.notna().sum():
        if (vals.map(lambda v: isinstance(v, bool | np.bool_))).any():
            return vals.fillna(False).astype(bool).to_numpy()
        return num.to_numpy(dtype=np.float32)
    return vals.fillna("").astype(str).to_numpy()


def summarize(adata: ad.AnnData) -> pd.DataFrame:
    """Rows per label and modality combination (``image+expression``, ``image``, ``expression``)."""
    hi = adata.obs[HAS_IMAGE].to_numpy(bool)
    he = adata.obs[HAS_EXPRESSION].to_numpy(bool)
    combo = np.where(hi & he, "image+expression", np.where(hi, "image", "expression"))
    labels = adata.obs["label"].astype(str).replace({"": "(none)"}).to_numpy()
    df = pd.DataFrame({"label": labels, "modalities": combo})
    out = df.groupby(["label", "modalities"]).size().rename("n").reset_index()
    return out.sort_values(["label", "modalities"]).reset_index(drop=True)


def contact_sheet(adata: ad.AnnData, path: str | Path, per_label: int = 8, seed: int = 0) -> None:
    """PNG grid: up to ``per_label`` crops of each image label, one row per label (named
    on its left with its count, in maturation order), mask outline in yellow."""
    from PIL import Image, ImageDraw

    from vae.analysis.palette import label_order

    hi = adata.obs[HAS_IMAGE].to_numpy(bool)
    if not hi.any():
        return
    labels = adata.obs["image_label"].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    classes = label_order(labels[hi])
    s = adata.obsm["crops"].shape[1]
    margin = 130  # px of row names: about 20 characters of PIL's default font
    sheet = np.full((len(classes) * s, margin + per_label * s, 3), 255, np.uint8)
    names = []
    for r, c in enumerate(classes):
        idx = np.flatnonzero(hi & (labels == c))
        names.append(f"{c or '(unlabelled)'}"[:20] + f"\n{len(idx)} crops")
        idx = rng.choice(idx, size=min(per_label, len(idx)), replace=False)
        for k, i in enumerate(sorted(idx)):
            tile = adata.obsm["crops"][i].copy()
            m = adata.obsm["masks"][i]
            edge = m & ~(
                np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
            )
            tile[edge] = (255, 220, 0)
            sheet[r * s : (r + 1) * s, margin + k * s : margin + (k + 1) * s] = tile
    img = Image.fromarray(sheet)
    draw = ImageDraw.Draw(img)
    for r, name in enumerate(names):
        draw.multiline_text((4, r * s + max(2, s // 2 - 12)), name, fill=(0, 0, 0))
    img.save(path, format="PNG")
    # DEBUG: the sheet names each row on its left already; at INFO this line repeated
    # them on the terminal of every pair run (terminal audit, docs/reliability.md)
    log.debug(
        "contact sheet rows (top to bottom): %s",
        ", ".join(c or "(unlabelled)" for c in classes),
    )
