"""One image -> its white cells: tiled detection, filters, crops, ground truth.

:func:`segment_image` is the per-image work of ``stage=segment``; the stage
only lists images, reads the config and writes the artifacts. Ground truth
comes from COCO instances (:func:`load_coco_truth`), e.g. the simulator's
``annotations.json`` with its extra per-cell fields.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from segmentation.crops import (
    FLAGS,
    REASONS,
    Crops,
    FilterResult,
    FilterSettings,
    background_od,
    edge_weights,
    extract_crops,
    filter_detections,
    label_image,
    match_truth,
    trim_rim,
)
from segmentation.inference import Detections, Detector, detect_images, resize_image
from segmentation.io import decode_coco_mask
from segmentation.schema import (  # TRUTH_FIELDS: from a matched COCO annotation
    CELL_DIAMETER,
    EDGE_WEIGHT,
    MIN_CELL_AREA,
    TRIM_RIM,
    TRUTH_FIELDS,
)


@dataclass
class ImageTruth:
    """Ground-truth instances of one image (source px, local masks)."""

    masks: list[np.ndarray]
    origins: np.ndarray  # (M, 2) int64 (x, y)
    records: list[dict[str, Any]]  # one annotation dict per mask (extra fields included)


@dataclass
class CocoTruth:
    """COCO instances indexed by file name."""

    images: dict[str, dict[str, Any]]  # file_name -> image record
    annotations: dict[int, list[dict[str, Any]]]  # image id -> white-cell annotations

    def for_image(self, file_name: str) -> ImageTruth | None:
        """Decode the instance masks of ``file_name`` (None if the image is not listed)."""
        rec = self.images.get(file_name)
        if rec is None:
            return None
        h, w = int(rec["height"]), int(rec["width"])
        masks, origins, records = [], [], []
        for ann in self.annotations.get(rec["id"], []):
            seg = ann.get("segmentation")
            if not seg:
                continue
            full = decode_coco_mask(seg, h, w)
            ys, xs = np.nonzero(full)
            if not len(ys):
                continue
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            masks.append(full[y0:y1, x0:x1].copy())
            origins.append((x0, y0))
            records.append(ann)
        return ImageTruth(masks, np.asarray(origins, np.int64).reshape(-1, 2), records)


def load_coco_truth(path: str | Path) -> CocoTruth:
    """Read a COCO instances JSON; keeps the ``wbc`` category (all, if none is named so).

    Raises
    ------
    ValueError
        Naming the file and the missing key when the JSON is not COCO instances.
    """
    path = Path(path)
    try:
        coco = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from e
    for key in ("images", "annotations"):
        if key not in coco:
            raise ValueError(f"{path}: COCO instances JSON needs a '{key}' list")
    cats = {c["id"]: str(c.get("name", "")).lower() for c in coco.get("categories", [])}
    wbc = {
        i for i, n in cats.items() if n in ("wbc", "white_cell", "white blood cell", "leukocyte")
    }
    images = {}
    for im in coco["images"]:
        for key in ("id", "file_name", "width", "height"):
            if key not in im:
                raise ValueError(f"{path}: image record {im} lacks '{key}'")
        images[Path(im["file_name"]).name] = im
    anns: dict[int, list[dict[str, Any]]] = {}
    for a in coco["annotations"]:
        if wbc and a.get("category_id") not in wbc:
            continue
        if a.get("iscrowd", 0):
            continue
        anns.setdefault(a["image_id"], []).append(a)
    return CocoTruth(images, anns)


@dataclass
class SegmentSettings:
    """Everything :func:`segment_image` needs besides the detector and the image."""

    input_scale: float = 1.0
    tile_size: int = 1024
    tile_overlap: int = 256
    batch_size: int = 4
    # a forward pass takes at most batch_size tiles and about this many tile pixels
    # (at least one tile): a whole slide's tiles stream through one at a time
    batch_megapixels: float | None = None
    merge_iou: float = 0.5
    merge_containment: float = 0.7
    crop_size: int = 128
    crop_margin: float = 0.1
    # True: a cell smaller than crop_size is enlarged to fill its crop as larger ones are
    # shrunk (single-cell crop folders of unknown zoom); False: small cells keep their px
    crop_fill: bool = False
    background_value: int = 0
    # peel background off each kept mask's edge, at most trim_rim working px deep
    # (trim_rim / input_scale source px): the detector's masks are a working px coarse,
    # which is several source px (crops.trim_rim); 0 = off
    trim_rim: float = TRIM_RIM
    match_iou: float = 0.5
    # source px for min_area / max_area (scaled to the working frame per image)
    filters: FilterSettings = field(default_factory=lambda: FilterSettings(min_area=MIN_CELL_AREA))
    reject_examples_per_image: int = 2  # crops of rejected cells kept for rejects.png
    # a TIFF over slide_megapixels is read and segmented in windows of slide_window source
    # px that overlap by slide_overlap (segmentation.slides: each cell once)
    slide_megapixels: float = 256.0
    slide_window: int = 8192
    slide_overlap: int = 512


@dataclass
class ImageCells:
    """Result for one image.

    Attributes
    ----------
    table
        One row per detection (kept or not): ids, bbox and area in source px,
        score, filter flags, ``kept``, truth columns when ``truth`` was given.
    crops
        Crops of the kept rows (same order as ``table[table.kept]``).
    detections
        All detections, working frame (source px * ``scale``).
    image
        The source image (H, W, 3) uint8; crops are cut from it.
    scale
        Working px per source px.
    n_truth
        Ground-truth cells in the image (None without truth).
    """

    table: pd.DataFrame
    crops: Crops
    detections: Detections
    image: np.ndarray
    scale: float = 1.0
    n_truth: int | None = None
    # a few rejected cells (score above threshold, not duplicates) for a visual check
    reject_crops: np.ndarray | None = None  # (R, S, S, 3) uint8, whole window (mask outlined)
    reject_ids: list[str] = field(default_factory=list)  # their cell_id
    # the kept cells' masks in source px (crops are cut from them): masks/<stem>.tif
    kept: Detections | None = None

    def label_image(self) -> np.ndarray:
        """(H, W) uint16 label image of the kept cells, source px: label = the row's
        ``mask_label`` (1, 2, ... in kept order), 0 elsewhere."""
        if self.kept is None:
            return np.zeros(self.image.shape[:2], np.uint16)
        return label_image(self.image.shape[:2], self.kept.masks, self.kept.origins)


def scale_local_masks(
    masks: Sequence[np.ndarray], origins: np.ndarray, scale: float, smooth: bool = False
) -> tuple[list[np.ndarray], np.ndarray]:
    """Resize local masks + origins by ``scale``; identity at 1.

    ``smooth``: bilinear on the 0/1 mask then >= 0.5 (smooth edges when
    enlarging), else nearest neighbour.
    """
    if scale == 1.0:
        return list(masks), np.asarray(origins)
    out, org = [], []
    for m, (x, y) in zip(masks, origins):
        h, w = max(1, round(m.shape[0] * scale)), max(1, round(m.shape[1] * scale))
        if smooth:
            r = Image.fromarray(m.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR)
            out.append(np.asarray(r) >= 0.5)
        else:
            r = Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
            out.append(np.asarray(r) > 127)
        org.append((round(x * scale), round(y * scale)))
    return out, np.asarray(org, np.int64).reshape(-1, 2)


def segment_image(
    detector: Detector,
    image: np.ndarray,
    name: str,
    settings: SegmentSettings,
    truth: ImageTruth | None = None,
    id_prefix: str | None = None,
) -> ImageCells:
    """Detect, filter and crop the white cells of one (H, W, 3) uint8 image.

    Parameters
    ----------
    detector
        Tile detector (:class:`segmentation.inference.MaskRCNNDetector` or a fake).
    name
        Image name written to the ``image`` column.
    truth
        Ground-truth instances (source px) to match, or None.
    id_prefix
        Prefix of detection ids (default: ``name`` without suffix).
    """
    return segment_images(detector, [image], [name], settings, [truth], [id_prefix])[0]


def segment_images(
    detector: Detector,
    images: Sequence[np.ndarray],
    names: Sequence[str],
    settings: SegmentSettings,
    truths: Sequence[ImageTruth | None] | None = None,
    id_prefixes: Sequence[str | None] | None = None,
) -> list[ImageCells]:
    """:func:`segment_image` for several images whose tiles share detector batches."""
    scale = float(settings.input_scale)
    works = [resize_image(im, scale) for im in images]
    s = settings
    dets = detect_images(
        detector,
        works,
        s.tile_size,
        s.tile_overlap,
        s.batch_size,
        s.merge_iou,
        s.merge_containment,
        batch_megapixels=s.batch_megapixels,
    )
    truths = list(truths) if truths is not None else [None] * len(images)
    id_prefixes = list(id_prefixes) if id_prefixes is not None else [None] * len(images)
    return [
        _finish_image(d.detections, im, wk.shape[:2], n, s, t, p)
        for d, im, wk, n, t, p in zip(dets, images, works, names, truths, id_prefixes)
    ]


def _finish_image(
    det: Detections,
    image: np.ndarray,
    work_hw: tuple[int, int],
    name: str,
    settings: SegmentSettings,
    truth: ImageTruth | None,
    id_prefix: str | None,
) -> ImageCells:
    """Filters, table, truth matching and crops of one image's merged detections."""
    s = settings
    scale = float(s.input_scale)
    h, w = work_hw
    # area thresholds are given in source px; the masks are in working px
    f = s.filters
    fw = replace(
        f,
        min_area=int(math.floor(f.min_area * scale * scale)),
        max_area=None if f.max_area is None else int(math.ceil(f.max_area * scale * scale)),
    )
    filt: FilterResult = filter_detections(det, h, w, fw)
    prefix = id_prefix or Path(name).stem
    ids = [f"{prefix}_d{k:03d}" for k in range(len(det))]
    table = pd.DataFrame(
        {
            "cell_id": ids,
            "image": name,
            "x0": det.boxes[:, 0] / scale,
            "y0": det.boxes[:, 1] / scale,
            "x1": det.boxes[:, 2] / scale,
            "y1": det.boxes[:, 3] / scale,
            "score": det.scores,
            "area": np.round(filt.area / (scale * scale)).astype(np.int64),
            # the cell's size on the detector's working frame (source px x input_scale,
            # where scales are set so white cells of every microscope look alike): the
            # crops fill their square whatever the cell's size, so this is the only
            # record of it (equivalent diameter, sqrt(4 area / pi))
            CELL_DIAMETER: np.sqrt(4.0 * filt.area.astype(np.float64) / np.pi),
            "n_pieces": filt.n_pieces,
            "max_overlap_iou": filt.max_overlap_iou,
            "tile_fragment": det.cut,
            "solidity": filt.solidity,
            "area_ratio": filt.area_ratio,
            **{k: filt.flags[k] for k in FLAGS},
            "kept": filt.kept,
            # how many cells like it a kept cell stands for once cells cut by the image
            # edge are dropped (large cells are dropped more often): samples' shares
            EDGE_WEIGHT: edge_weights(filt.extent, h, w, fw.border_margin)
            if fw.drop_border
            else np.ones(len(det)),
        }
    )
    n_truth = None
    if truth is not None:
        n_truth = len(truth.masks)
        tm, to = scale_local_masks(truth.masks, truth.origins, scale)
        match = match_truth(det, tm, to, s.match_iou, candidates=~filt.flags["low_score"])
        rec = [truth.records[i] if i >= 0 else {} for i in match.truth_index]
        table["truth_cell_id"] = [str(r.get("cell_id", r.get("id", ""))) if r else "" for r in rec]
        for key in TRUTH_FIELDS:
            vals = [r.get(key) for r in rec]
            if key in ("kind", "lineage"):
                table[key] = ["" if v is None else str(v) for v in vals]
            else:
                table[key] = np.array([np.nan if v is None else float(v) for v in vals])
        table["match_iou"] = match.iou
    keep = np.nonzero(filt.kept)[0]
    # crops come from the source image (full resolution), masks mapped back to it
    kd = det.select(keep)
    km, ko = scale_local_masks(kd.masks, kd.origins, 1.0 / scale, smooth=True)
    if s.trim_rim > 0 and len(km):
        bg = background_od(image)
        depth = math.ceil(s.trim_rim / scale)
        km = [trim_rim(image, m, o, bg, depth) for m, o in zip(km, ko)]
    src = Detections(kd.boxes / scale, kd.scores, km, ko)
    crops = extract_crops(
        image, src, s.crop_size, s.background_value, s.crop_margin, fill=s.crop_fill
    )
    table["crop_scale"] = np.nan
    table.loc[keep, "crop_scale"] = crops.scale  # crop px per source px
    # where each crop sits on the image (source px; a crop mask resized to crop_side and
    # placed at crop_x0, crop_y0 lies on the cell) and its label in masks/<stem>.tif:
    # without them a crop could not be put back on the smear exactly (a box centre and
    # crop_scale missed by 1-3 px for 40 % of cells)
    for k, col in enumerate(("crop_x0", "crop_y0", "crop_side")):
        table[col] = np.nan
        if len(keep):
            table.loc[keep, col] = crops.windows[:, k]
    table["mask_label"] = 0
    table.loc[keep, "mask_label"] = np.arange(1, len(keep) + 1)
    # rejected cells worth a look: confident, not a second detection of a kept one
    rej = np.nonzero(
        ~filt.kept & ~filt.flags["low_score"] & ~filt.flags["duplicate"] & (filt.area > 0)
    )[0][: max(0, s.reject_examples_per_image)]
    rej_crops = None
    if len(rej):
        rd = det.select(rej)
        rm, ro = scale_local_masks(rd.masks, rd.origins, 1.0 / scale, smooth=True)
        rc = extract_crops(
            image,
            Detections(rd.boxes / scale, rd.scores, rm, ro),
            s.crop_size,
            0,
            s.crop_margin,
            paint=False,
        )
        # the whole window with the mask outlined: what was cut away matters here
        rej_crops = _outlined(rc)
    return ImageCells(
        table, crops, det, image, scale, n_truth, rej_crops, [ids[k] for k in rej], src
    )


def _outlined(c: Crops) -> np.ndarray:
    """Crops with everything dimmed outside the mask and the mask edge drawn 2 px in
    yellow between two 1 px black rings (:data:`SHEET_EDGE`): the edge shows on the
    pale cytoplasm inside as on the dimmed window outside."""
    out = c.images.copy()
    for k in range(len(out)):
        m = c.masks[k].astype(bool)
        inner = m & ~_erode(m, 1)
        ring2 = _erode(m, 1) & ~_erode(m, 2)
        ring3 = _erode(m, 2) & ~_erode(m, 3)
        outer = find_boundaries(m, mode="outer") & ~m
        out[k][~m] = out[k][~m] // 3 + 40
        out[k][outer | ring3] = HALO
        out[k][inner | ring2] = SHEET_EDGE
    return out


def _erode(m: np.ndarray, n: int) -> np.ndarray:
    """``m`` eroded ``n`` times (cross element; outside the array counts as background)."""
    from scipy import ndimage as ndi

    return ndi.binary_erosion(m, iterations=n, border_value=0) if n > 0 else m


def reject_reason(row) -> str:
    """Comma-separated flags of a detection table row that kept it out."""
    return ",".join(f for f in FLAGS if bool(row.get(f, False)))


def reject_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    """rejects.csv rows for every confident detection that did not become a cell.

    Low-score detections are not cells and duplicates are second detections of a
    kept cell, so neither is listed; every other dropped detection is, with the
    names of the filters it failed (``reason``) and their meaning (``detail``).
    """
    out = []
    if not len(table):
        return out
    sel = ~table["kept"].astype(bool) & ~table["low_score"] & ~table["duplicate"]
    for _, r in table[sel].iterrows():
        why = reject_reason(r)
        out.append(
            {
                "image": r["image"],
                "action": "rejected_cell",
                "reason": why,
                "cell_id": r["cell_id"],
                "detail": "; ".join(REASONS[f] for f in why.split(",") if f in REASONS),
            }
        )
    return out


# ----------------------------------------------------------------------------
# pictures for quick visual checks
# ----------------------------------------------------------------------------


# overlays of larger images are drawn on a copy this many px on its longer side: the
# 196 MP slide of docs/performance.md gave a 303 MB full-size PNG that viewers (and
# Pillow's own guard) refuse; at 4096 px its white cells are still ~30 px across
OVERLAY_MAX_SIDE = 4096
# overlay labels only where cells are drawn at least this wide (px): below it a label
# covers its neighbours (a 400 MP slide at 4096 px: cells ~20 px); the lines stay, and
# detections.csv / cells.h5ad hold every score and filter
OVERLAY_LABEL_MIN_CELL_PX = 24
OVERLAY_MIN_FONT_PX = 10

# Colours of the quick-look pictures, told apart under every colour-vision deficiency
# (Okabe-Ito; CIEDE2000 >= 50 between KEPT and DROPPED under simulated deutan, protan
# and tritan vision, tests/segmentation/test_overlay_access.py) and by line style too
# (kept solid, dropped dashed), each line on a dark halo so it shows on pale background
# and on pink red cells alike.
KEPT = (86, 180, 233)  # sky blue #56B4E9
DROPPED = (213, 94, 0)  # vermilion #D55E00
HALO = (0, 0, 0)
LABEL_BOX = (20, 20, 20)  # text boxes: white text on near-black, ~18:1
LABEL_TEXT = (255, 255, 255)
SHEET_EDGE = (255, 230, 0)  # rejects.png mask edge, between black rings


def _font(size: int):
    """Pillow's built-in scalable font at ``size`` px (its bitmap font without FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(6, int(size)))
    except (TypeError, OSError, ImportError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def overlay_scale(h: int, w: int) -> tuple[int, int, int]:
    """(line width, halo width, font px) of an overlay ``h`` x ``w`` px: 2 / 1 / 13 on a
    640 px field, growing with the image so a 4096 px slide copy still reads when a viewer
    fits it to the screen."""
    side = max(h, w)
    lw = max(2, round(side / 1000))
    return lw, max(1, lw // 2), int(np.clip(round(side / 48), 13, 40))


def _polyline_dashes(pts: np.ndarray, on: float, off: float) -> list[np.ndarray]:
    """Pieces of the polyline ``pts`` (k, 2) drawn as a dash pattern ``on`` / ``off`` px."""
    if len(pts) < 2:
        return [pts]
    seg = np.diff(pts, axis=0)
    d = np.r_[0.0, np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))]
    period, out, t = on + off, [], 0.0
    while t < d[-1]:
        t1 = min(t + on, d[-1])
        inside = (d > t) & (d < t1)
        a = np.array([np.interp(t, d, pts[:, 0]), np.interp(t, d, pts[:, 1])])
        b = np.array([np.interp(t1, d, pts[:, 0]), np.interp(t1, d, pts[:, 1])])
        out.append(np.vstack([a, pts[inside], b]))
        t += period
    return out


def _draw_lines(draw, lines, lw: int, dashed: bool) -> None:
    """Polylines (each (k, 2) x, y) ``lw`` px wide into the mask ``draw`` draws on;
    ``dashed``: dashes 3 ``lw`` + 2 long, gaps 2 ``lw`` + 2."""
    pieces = []
    for pts in lines:
        pieces += _polyline_dashes(pts, 3.0 * lw + 2, 2.0 * lw + 2) if dashed else [pts]
    for p in pieces:
        if len(p) >= 2:
            draw.line([tuple(map(float, q)) for q in p], fill=255, width=lw, joint="curve")


def _box_lines(x0: float, y0: float, x1: float, y1: float) -> list[np.ndarray]:
    return [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], float)]


def _mask_lines(m: np.ndarray, origin) -> list[np.ndarray]:
    """Outline(s) of the mask ``m`` as (k, 2) x, y polylines in image px."""
    from skimage.measure import find_contours

    lines = []
    for c in find_contours(np.pad(m, 1).astype(np.float32), 0.5):
        lines.append(np.column_stack([c[:, 1] - 1 + origin[0], c[:, 0] - 1 + origin[1]]))
    return lines


def overlay_label(kept: bool, score: float, flags: Sequence[str]) -> str:
    """The text of one detection on an overlay: "0.97 kept" or "0.62 drop: duplicate,
    multi_piece" (flag names whole; past two, "+N")."""
    if kept:
        return f"{score:.2f} kept"
    why = list(flags)
    more = f" +{len(why) - 2}" if len(why) > 2 else ""
    return f"{score:.2f} drop: {', '.join(why[:2]) or 'filtered'}{more}"


def _text_box(draw, xy, text: str, font, limits) -> None:
    """``text`` in white on a filled near-black box, its top left at ``xy``, moved inside
    ``limits`` (w, h) where it would stick out."""
    x0, t, r, b = draw.textbbox((0, 0), text, font=font)
    pad = max(2, (b - t) // 5)
    bw, bh = r - x0 + 2 * pad, b - t + 2 * pad
    x = float(np.clip(xy[0], 0, max(0, limits[0] - bw)))
    y = float(np.clip(xy[1], 0, max(0, limits[1] - bh)))
    draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=LABEL_BOX)
    draw.text((x + pad - x0, y + pad - t), text, fill=LABEL_TEXT, font=font)


def draw_overlay(
    cells: ImageCells,
    min_score: float,
    max_side: int | None = OVERLAY_MAX_SIDE,
    labels: bool = True,
) -> Image.Image:
    """Source image with mask outlines and boxes (score >= ``min_score``): kept cells
    solid sky blue, dropped ones dashed vermilion, every line on a dark halo; over each
    box a white-on-black label, "0.97 kept" or "0.62 drop: <filters>". Line width and
    text grow with the image (:func:`overlay_scale`). An image longer than ``max_side``
    px is drawn on a copy scaled to that side (None: full size); ``labels=False``: the
    lines only."""
    h0, w0 = cells.image.shape[:2]
    f = 1.0 if max_side is None else min(1.0, float(max_side) / max(h0, w0))
    if f < 1.0:
        # in strips (resize_image): Image.fromarray of a whole 400 MP slide copied it,
        # 1.15 GB of the stage's peak (whole-slide audit)
        img = resize_image(cells.image, f, resample="box")
        if img is cells.image or not img.flags.writeable:  # drawn on in place below
            img = img.copy()
    else:
        img = cells.image.copy()
    det, table = cells.detections, cells.table
    h, w = img.shape[:2]
    lw, halo, size = overlay_scale(h, w)
    shown = [k for k in range(len(det)) if det.scores[k] >= min_score]
    # a slide drawn at 4096 px shows its cells ~20 px wide: 40 px labels and 4 px lines
    # (the image-size rule) covered them all; lines and text follow the cells' drawn size
    if shown:
        b = det.boxes[shown] * f / cells.scale
        cell_px = float(np.median(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])))
        lw = min(lw, max(1, round(cell_px / 12)))
        halo = min(halo, max(1, lw // 2))
        size = min(size, max(OVERLAY_MIN_FONT_PX, round(cell_px / 2)))
        labels = labels and cell_px >= OVERLAY_LABEL_MIN_CELL_PX
    font = _font(size)
    masks, origins = scale_local_masks(
        [det.masks[k] for k in shown], det.origins[shown], f / cells.scale
    )
    # each class's lines into its own mask, then painted: halo (the lines grown by
    # ``halo`` px, so no line pixel touches the image), dropped, kept on top
    layers = {True: Image.new("L", (w, h), 0), False: Image.new("L", (w, h), 0)}
    pens = {k: ImageDraw.Draw(v) for k, v in layers.items()}
    order = sorted(range(len(shown)), key=lambda i: bool(table.kept.iloc[shown[i]]))
    for i in order:
        k, m, o = shown[i], masks[i], origins[i]
        kept = bool(table.kept.iloc[k])
        x0, y0, x1, y1 = (det.boxes[k] * f / cells.scale).tolist()
        box = _box_lines(x0, y0, max(x0, x1 - 1), max(y0, y1 - 1))
        _draw_lines(pens[kept], box, max(1, lw // 2), dashed=not kept)
        if m.any():
            _draw_lines(pens[kept], _mask_lines(m, o), lw, dashed=not kept)
    on = {k: np.asarray(v) > 0 for k, v in layers.items()}
    if on[True].any() or on[False].any():
        from scipy import ndimage as ndi

        grown = ndi.binary_dilation(on[True] | on[False], np.ones((3, 3), bool), halo)
        img[grown] = HALO
        img[on[False]] = DROPPED
        img[on[True]] = KEPT
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    for i in order if labels else ():
        k = shown[i]
        kept = bool(table.kept.iloc[k])
        x0, y0 = (det.boxes[k][:2] * f / cells.scale).tolist()
        flags = [fl for fl in FLAGS if bool(table[fl].iloc[k])]
        text = overlay_label(kept, float(det.scores[k]), flags)
        _, t, _, b = draw.textbbox((0, 0), text, font=font)
        above = y0 - (b - t) - 2 * max(2, (b - t) // 5)  # over the box where it fits
        _text_box(draw, (x0, above if above >= 0 else y0), text, font, (w, h))
    return pil


def contact_sheet(
    crops: np.ndarray,
    labels: Sequence[str] | None = None,
    max_n: int = 64,
    pad: int = 2,
    caption: str | None = None,
) -> Image.Image:
    """Grid of up to ``max_n`` crops (evenly sampled), optional text label under each
    (black on the white sheet); ``caption``: one line above the grid saying what the
    labels are."""
    n = len(crops)
    s = crops.shape[1] if n else 32
    idx = np.linspace(0, n - 1, min(n, max_n)).round().astype(int) if n else np.zeros(0, int)
    cols = max(1, math.ceil(math.sqrt(len(idx))))
    rows = max(1, math.ceil(len(idx) / cols))
    font = _font(int(np.clip(s // 10, 10, 16)))
    cap_font = _font(int(np.clip(s // 9, 12, 18)))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = draw.textbbox((0, 0), "Ag", font=font)[3] + 3  # px of one label line
    strip = line if labels is not None else 0
    top = draw.textbbox((0, 0), "Ag", font=cap_font)[3] + 6 if caption else 0
    sheet = Image.new(
        "RGB",
        (cols * (s + pad) + pad, rows * (s + strip + pad) + pad + top),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(sheet)
    if caption:
        draw.text((pad + 2, 3), caption, fill=(0, 0, 0), font=cap_font)
    for i, k in enumerate(idx):
        x, y = pad + (i % cols) * (s + pad), top + pad + (i // cols) * (s + strip + pad)
        sheet.paste(Image.fromarray(crops[k]), (x, y))
        if labels is not None:
            text = _fit(draw, str(labels[k]), font, s - 2)
            draw.text((x + 1, y + s + 1), text, fill=(0, 0, 0), font=font)
    if not n:
        draw.text((4, 4 + top), "no cells", fill=(0, 0, 0), font=cap_font)
    return sheet


def _fit(draw, text: str, font, width: int) -> str:
    """``text``, cut at the end with "..." where it is wider than ``width`` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "\u2026", font=font) > width:
        text = text[:-1]
    return text + "\u2026"


def reject_sheet(parts: Sequence[dict[str, Any]], table: pd.DataFrame, n_max: int) -> Image.Image:
    """Contact sheet of up to ``n_max`` rejected cells, each labelled with its first failed
    filter ("+" when it failed more); ``parts`` hold ``reject_crops`` and ``reject_ids``
    (see ``ImageCells``), ``table`` the detection table with their rows.

    The cells come in the images' order (``table.image_index``), whatever part (DDP
    rank) found them: each rank keeps the examples of its first images, so taking the
    parts one after the other showed rank 0's cells only and the sheet changed with
    ``hardware.num_processes``. Merged and ordered, the first ``n_max`` are those of a
    one-process run (each rank keeps every example among the first ``n_max`` overall).
    """
    pairs = []  # (cell_id, crop) in each part's own order
    for p in parts:
        ids, crops_p = list(p["reject_ids"]), p["reject_crops"]
        pairs += list(zip(ids, crops_p[: len(ids)]))
    where: dict[str, int] = {}
    if len(table) and "image_index" in table:
        where = dict(zip(table["cell_id"].astype(str), table["image_index"].astype(int)))
    # stable: a cell unknown to the table keeps its place after the known ones
    pairs = sorted(pairs, key=lambda ic: where.get(str(ic[0]), 10**9))[:n_max]
    ids = [i for i, _ in pairs]
    crops = np.stack([c for _, c in pairs]) if pairs else np.zeros((0, 32, 32, 3), np.uint8)
    labels = None
    if ids:
        why = table.set_index("cell_id")
        rs = [reject_reason(why.loc[i]).split(",") for i in ids]
        labels = [r[0] + ("+" if len(r) > 1 else "") for r in rs]
    return contact_sheet(crops, labels, max(1, n_max))
