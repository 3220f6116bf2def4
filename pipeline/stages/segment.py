"""stage=segment: find, filter and crop every white cell of a folder of smears.

Reads the ``segmentation_model`` checkpoint and the ``smears`` folder (the
simulator's, or any folder via ``paths.inputs.smears=DIR``; COCO ground truth
from ``annotations.json`` there or ``paths.inputs.annotations``), and writes
``cells.h5ad``, ``detections.csv``, ``rejects.csv``, ``summary.json``,
``contact_sheet.png`` and ``overlays/`` (see docs/artifacts.md, "segment").

Images are sharded round robin over DDP ranks; rank 0 merges their part files in order.
"""

from __future__ import annotations

import functools
import logging
import pickle
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import spreadsheet_safe, write_json
from pipeline.runner import StageContext, StageError, stage
from segmentation.cells import (
    CocoTruth,
    ImageCells,
    SegmentSettings,
    contact_sheet,
    draw_overlay,
    load_coco_truth,
    reject_rows,
    reject_sheet,
    segment_images,
)
from segmentation.crops import FLAGS, FilterSettings
from segmentation.inference import MaskRCNNDetector
from segmentation.io import (
    IMAGE_SUFFIXES,
    SlideReader,
    error_line,
    list_images,
    read_rgb,
    recorded_name,
    skipped_slides,
    slide_skip_message,
    undecodable_warning,
    write_h5ad,
    write_label_image,
)
from segmentation.progress import bar
from segmentation.shipped import wants_scale_estimate, wants_scale_refinement
from segmentation.slides import (
    Window,
    is_slide,
    own_cells,
    slide_units,
    unit_groups,
    window_cells,
    window_file,
    window_prefix,
)
from segmentation.table import (
    cells_adata,
    merge_parts,
    run_summary,
)

log = logging.getLogger(__name__)

PARTS = ".segment_parts"


def settings_from_config(sc: Any) -> SegmentSettings:
    """``cfg.segmentation`` -> :class:`SegmentSettings` (validated)."""
    # >= 8 as pipeline/ranges.py refuses at start (embed's smallest crop)
    if not 8 <= int(sc.crop_size) <= 4096:
        raise StageError(f"segmentation.crop_size={sc.crop_size}: must be in [8, 4096]")
    if not 0 <= int(sc.background_value) <= 255:
        raise StageError(f"segmentation.background_value={sc.background_value}: must be 0..255")
    if float(sc.batch_megapixels) <= 0:
        raise StageError(f"segmentation.batch_megapixels={sc.batch_megapixels}: must be > 0")
    if float(sc.input_scale) <= 0:
        raise StageError(f"segmentation.input_scale={sc.input_scale}: must be > 0")
    if not 0 <= int(sc.tile_overlap) < int(sc.tile_size):
        raise StageError(
            f"segmentation.tile_overlap={sc.tile_overlap} must be >= 0 and < "
            f"segmentation.tile_size={sc.tile_size}"
        )
    if float(sc.slide_megapixels) <= 0:
        raise StageError(f"segmentation.slide_megapixels={sc.slide_megapixels}: must be > 0")
    if not 0 <= int(sc.slide_overlap) < int(sc.slide_window):
        raise StageError(
            f"segmentation.slide_overlap={sc.slide_overlap} must be >= 0 and < "
            f"segmentation.slide_window={sc.slide_window}"
        )
    return SegmentSettings(
        input_scale=float(sc.input_scale),
        slide_megapixels=float(sc.slide_megapixels),
        slide_window=int(sc.slide_window),
        slide_overlap=int(sc.slide_overlap),
        tile_size=int(sc.tile_size),
        tile_overlap=int(sc.tile_overlap),
        batch_size=int(sc.batch_size),
        batch_megapixels=float(sc.batch_megapixels),
        merge_iou=float(sc.merge_iou),
        merge_containment=float(sc.merge_containment),
        crop_size=int(sc.crop_size),
        crop_margin=float(sc.crop_margin),
        background_value=int(sc.background_value),
        trim_rim=float(sc.trim_rim),
        match_iou=float(sc.match_iou),
        filters=FilterSettings(
            score_threshold=float(sc.score_threshold),
            min_area=int(sc.min_area),
            max_area=None if sc.max_area is None else int(sc.max_area),
            drop_border=bool(sc.drop_border),
            border_margin=int(sc.border_margin),
            max_overlap_iou=None if sc.max_overlap_iou is None else float(sc.max_overlap_iou),
            duplicate_containment=None
            if sc.duplicate_containment is None
            else float(sc.duplicate_containment),
            drop_multi_piece=bool(sc.drop_multi_piece),
            min_piece_area=int(sc.min_piece_area),
            drop_tile_cut=bool(sc.drop_tile_cut),
            touch_px=None if sc.touch_px is None else int(sc.touch_px),
            min_solidity=None if sc.min_solidity is None else float(sc.min_solidity),
            max_area_ratio=None if sc.max_area_ratio is None else float(sc.max_area_ratio),
            min_cells_area_ratio=int(sc.min_cells_area_ratio),
        ),
    )


def _annotations_path(ctx: StageContext, smears: Path) -> Path | None:
    explicit = ctx.cfg.paths.inputs.get("annotations")
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise StageError(f"paths.inputs.annotations={explicit}: no such file")
        return p
    p = smears / "annotations.json"
    return p if p.is_file() else None


@functools.lru_cache(maxsize=64)
def _twin_stems(folder: str, mtime_ns: int) -> frozenset[str]:
    """Stems two or more images of ``folder`` share (``mtime_ns``: the folder's, so a
    folder changed since is listed again)."""
    stems = Counter(p.stem for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return frozenset(s for s, n in stems.items() if n > 1)


def output_stem(path: Path) -> str:
    """The stem of image ``path``'s own outputs (overlay, label TIFF, QuPath file):
    ``<stem>``, or ``<stem>_<ext>`` when another image of its folder has the same stem
    (``cell.jpg`` and ``cell.png``), cut to fit a file name (:func:`short_stem`).

    The folder is listed once, not once per image: a glob per image read the whole
    folder each time, 10 ms an image in a folder of 20k (206 s per pass, and the stage
    names each image three times)."""
    folder = path.parent
    try:
        mtime = folder.stat().st_mtime_ns
    except OSError:  # not listable: no twin known
        return short_stem(path.stem)
    twin = path.stem in _twin_stems(str(folder), mtime)
    return short_stem(f"{path.stem}_{path.suffix[1:].lower()}" if twin else path.stem)


def overlay_name(path: Path) -> str:
    """``overlays/`` file of image ``path``: ``<output_stem>.png``."""
    return f"{output_stem(path)}.png"


def cell_prefix(path: Path, win: Window | None) -> str | None:
    """Cell-id prefix of an image's cells: a window's ``<stem>_x<X>_y<Y>``; a twin's
    ``<stem>_<ext>`` (``cell.jpg`` beside ``cell.png``), as its overlay is named; else
    None (the stem). Twins' ids were one, renamed ``i00000_...`` in the table only after
    the rejected examples were taken under the old ids: the run stopped with a KeyError
    drawing rejects.png (review)."""
    if win is not None:
        return window_prefix(path, win)
    shown = output_stem(path)
    return recorded_name(shown) if shown != short_stem(path.stem) else None


# bytes of a file name on most file systems (ext4, APFS, NTFS: 255), less room for what
# follows the stem: a slide window's "_x123456_y123456" and the suffix
NAME_BYTES = 255
NAME_TAIL_BYTES = 32


def short_stem(stem: str) -> str:
    """``stem`` as an output file's stem that fits ``NAME_BYTES`` with room for a suffix:
    unchanged when short; else cut, with a hash of the whole name (``~1a2b3c4d``) that
    keeps two long names apart (a 250-character image name made the stage fail with
    "File name too long" writing its overlay)."""
    limit = NAME_BYTES - NAME_TAIL_BYTES
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) <= limit:
        return stem
    import hashlib

    tag = "~" + hashlib.sha1(raw).hexdigest()[:8]
    cut = raw[: limit - len(tag)].decode("utf-8", "ignore")  # no half character
    return cut + tag


def _image_list(ctx: StageContext, smears: Path, truth: CocoTruth | None) -> list[Path]:
    sc = ctx.cfg.segmentation
    images = list_images(smears)
    nested = sorted(
        recorded_name(d.name)  # logged: a name that is not UTF-8 would break the log line
        for d in smears.iterdir()
        if d.is_dir() and not d.name.startswith(".") and any(list_images(d))
    )
    if nested:
        # stage=segment reads one folder; stage=embed reads sub-folders as samples
        log.warning(
            "%s: images in sub-folders are not read (%s%s); give each folder as "
            "paths.inputs.smears, or use stage=embed, which reads sub-folders as samples",
            smears,
            ", ".join(nested[:5]),
            f" and {len(nested) - 5} more" if len(nested) > 5 else "",
        )
    if sc.split is not None:
        if truth is None:
            raise StageError(
                f"segmentation.split={sc.split} needs COCO annotations with an image 'split' "
                f"field; none found for {smears}"
            )
        images = [p for p in images if truth.images.get(p.name, {}).get("split") == sc.split]
    if sc.max_images is not None:
        images = images[: int(sc.max_images)]
    return images


def configured_scale(cfg: Any) -> float | None:
    """The fixed scale of a real data config with a single smear source (``data=bccd``:
    the scale its images were trained at), else None."""
    sources = list(cfg.data.smear_sources or [])
    if cfg.data.name != "synthetic" and len(sources) == 1 and sources[0].get("scale") is not None:
        return float(sources[0]["scale"])
    return None


def resolve_input_scale(cfg: Any, ckpt: dict[str, Any]) -> tuple[float, str]:
    """Working scale (network px per source px) and where it came from.

    A real data config with a single smear source of fixed scale (``data=bccd``)
    gives the scale its images were trained at; otherwise
    ``segmentation.input_scale`` is used (the simulator's training scale; set it
    to match other images' magnification). Where each image's scale is measured
    (:func:`smear_estimate_px`) this is only the fallback for an image with no cell
    to measure.
    """
    fixed = configured_scale(cfg)
    if fixed is not None:
        return fixed, f"data.smear_sources[0].scale ({cfg.data.name})"
    if cfg.data.name != "synthetic" and not wants_scale_estimate(
        cfg.segmentation.estimate_scale, ckpt
    ):
        log.warning(
            "data=%s has no single fixed smear scale; using segmentation.input_scale=%s "
            "(network px per image px): set it so white cells are ~segmentation.cell_px px",
            cfg.data.name,
            cfg.segmentation.input_scale,
        )
    trained = ckpt.get("input_scale")
    if trained is not None and abs(float(trained) - float(cfg.segmentation.input_scale)) > 1e-6:
        log.warning(
            "segmentation.input_scale=%s differs from the scale the checkpoint was trained "
            "at (%s); cells will not have their trained size",
            cfg.segmentation.input_scale,
            trained,
        )
    return float(cfg.segmentation.input_scale), "segmentation.input_scale"


def smear_estimate_px(cfg: Any, ckpt: dict[str, Any]) -> float | None:
    """White-cell size each smear's scale is measured at, or None (a fixed scale).

    ``segmentation.estimate_scale`` true / false decides; null follows the checkpoint
    (:func:`segmentation.shipped.wants_scale_estimate`: the shipped detector and a
    ``segment_train`` model of real smears ask for it), except that a data config's
    fixed scale (:func:`configured_scale`) is a known magnification and wins.
    """
    from pipeline.segment_sources import estimate_px

    if cfg.segmentation.estimate_scale is None and configured_scale(cfg) is not None:
        return None
    return estimate_px(cfg, ckpt)


def detector_kwargs(sc: Any) -> dict[str, Any]:
    """``cfg.segmentation`` -> the :class:`MaskRCNNDetector` settings (one owner)."""
    return {  # cpu_bf16 null: MaskRCNNDetector asks the CPU
        "score_floor": float(sc.detect_score_floor),
        "mask_threshold": float(sc.mask_threshold),
        "max_detections": int(sc.max_detections_per_tile),
        "rpn_post_nms_top_n": int(sc.rpn_post_nms_top_n),
        "cpu_bf16": sc.cpu_bf16,
    }


def refine_settings(sc: Any, ckpt: dict[str, Any]):
    """``segmentation.refine_scale`` (null: as ``ckpt`` says) -> the thresholds (None: off)."""
    from segmentation.magnification import RefineSettings

    return RefineSettings() if wants_scale_refinement(sc.refine_scale, ckpt) else None


def make_detector(ctx: StageContext, model: torch.nn.Module) -> MaskRCNNDetector:
    """The tile detector of ``cfg.segmentation`` on this rank's device."""
    kw = detector_kwargs(ctx.cfg.segmentation)  # ctx.dist.autocast: bf16 on a GPU
    return MaskRCNNDetector(model, ctx.dist.device, autocast=ctx.dist.autocast, **kw)


@dataclass
class _Slide:
    """One slide read window by window in this process: a slide never spans ranks
    (images are sharded whole) and its windows come one after another."""

    reader: SlideReader | None  # None: the file could not be opened (said once)
    counted: bool = False  # counted as one image read, at its first window read
    kept: int = 0  # cells kept over its windows (none at the end: one no_cells row)
    seen: list = field(default_factory=list)  # its windows' kept boxes (own_cells)
    scale: float | None = None  # its one magnification, once a window measured it
    noted: bool = False  # its conversions are in the rejects
    overlay: bool = False  # its overlay is drawn

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def _run_shard(
    ctx: StageContext,
    items: list[tuple[int, Path]],
    settings: SegmentSettings,
    truth: CocoTruth | None,
    overlay_dir: Path,
    model: torch.nn.Module,
    ckpt: dict[str, Any],
    overlay_below: int | None = None,
    desc: str = "segment",
    estimate_px: float | None = None,
    pooled: dict[Path, Any] | None = None,
    mask_dir: Path | None = None,
) -> dict[str, Any]:
    sc = ctx.cfg.segmentation
    detector = make_detector(ctx, model)
    overlay_below = int(sc.n_overlays) if overlay_below is None else overlay_below
    tables, crops, masks, rejects = [], [], [], []
    rej_crops, rej_ids = [], []  # examples of rejected cells for rejects.png
    n_truth, n_images, seconds = 0, 0, 0.0
    slides: dict[Path, _Slide] = {}  # the slides read window by window so far
    current: _Slide | None = None  # the one whose windows are being read (reader open)
    # images are read batch_size at a time so that the tiles of small images share
    # detector batches (a large slide spreads over several batches by itself); a whole
    # slide (segmentation.slide_megapixels) is read and segmented window by window
    units = slide_units(
        items, settings.slide_megapixels, settings.slide_window, settings.slide_overlap
    )
    pbar = bar(desc=desc, total=len(units), unit="img", enabled=ctx.is_main)
    for chunk in unit_groups(units, max(1, settings.batch_size)):
        good = []  # (index, path, image, truth, window)
        for index, path, win in chunk:
            # the name every row records (cells.h5ad, detections.csv, rejects.csv): valid
            # UTF-8 even where the file's own name is not; the file is read by its own
            name = recorded_name(path.name)
            first = win is None or win.k == 0
            odd = undecodable_warning(path) if first else ""
            if odd:  # each rank warns of its own images: once per file
                log.warning("%s", odd)
            if win is None:
                rd = read_rgb(path, convert=bool(sc.convert_images))
            else:
                if path not in slides:  # its first window: the reader of the last slide closes
                    if current is not None:
                        current.close()
                    try:
                        current = slides[path] = _Slide(SlideReader(path))
                    except Exception as e:  # noqa: BLE001 - a damaged file: this slide only
                        why = f"unreadable slide: {error_line(e, 160)}"
                        log.warning("skipping %s: %s", name, why)
                        rejects.append({"image": name, "action": "skipped", "reason": why})
                        current = slides[path] = _Slide(None)
                        continue
                    reader = current.reader
                    note = reader.storage_note(settings.slide_window)
                    if note:
                        log.warning("%s", note)
                    log.info(
                        "%s: %dx%d px, read and segmented in %d windows of %dx%d px",
                        name,
                        reader.width,
                        reader.height,
                        win.n,
                        win.x1 - win.x0,  # fitted to the slide: at most slide_window
                        win.y1 - win.y0,
                    )
                reader = slides[path].reader
                if reader is None:  # the slide could not be opened (said once)
                    continue
                rd = reader.read(win.x0, win.y0, win.x1, win.y1, bool(sc.convert_images))
            if not rd.ok:
                why = rd.reason if win is None else f"window {win.name}: {rd.reason}"
                log.warning("skipping %s: %s", name, why)
                rejects.append({"image": name, "action": "skipped", "reason": why})
                continue
            if rd.converted and (win is None or not slides[path].noted):
                if win is not None:  # a slide's conversions: once, its first window read
                    slides[path].noted = True
                rejects.append(
                    {"image": name, "action": "converted", "reason": ",".join(rd.converted)}
                )
            # ground truth is matched on whole images only (its masks are in image px)
            it = truth.for_image(path.name) if truth is not None and win is None else None
            good.append((index, path, rd.image, it, win))
        pbar.update(len(chunk) - len(good))  # unreadable ones
        if not good:
            continue
        t0 = time.perf_counter()
        if estimate_px is None:
            results: list[ImageCells] = segment_images(
                detector,
                [im for _, _, im, _, _ in good],
                [recorded_name(p.name) for _, p, _, _, _ in good],
                settings,
                truths=[it for _, _, _, it, _ in good],
                id_prefixes=[cell_prefix(p, w) for _, p, _, _, w in good],
            )
        else:  # magnification per image from its white (else red) cells (segmentation.estimate_scale)
            results = []
            for _, p, im, it, w in good:
                if w is None:
                    cells = _estimated(
                        detector,
                        im,
                        p,
                        settings,
                        it,
                        sc,
                        ckpt,
                        (pooled or {}).get(p),
                        cell_prefix(p, None),
                    )[0]
                else:  # one magnification per slide, from its first window with cells

                    def measure(im=im, p=p, w=w):
                        return _estimated(
                            detector, im, p, settings, None, sc, ckpt, None, window_prefix(p, w)
                        )

                    cells, slides[p].scale = window_cells(
                        detector,
                        im,
                        recorded_name(p.name),
                        window_prefix(p, w),
                        settings,
                        slides[p].scale,
                        measure,
                    )
                results.append(cells)
        seconds += time.perf_counter() - t0
        pbar.update(len(good))
        for (index, path, _, it, win), cells in zip(good, results):
            shown = overlay_name(path)  # the masks/ TIFF is named as the overlay
            st = slides.get(path) if win is not None else None
            if st is not None:
                if index < overlay_below and not st.overlay and cells.table["kept"].any():
                    # a slide's overlay: its first window that holds a cell (each window's
                    # cost 3-5 s, a third of the window's time on the 400 MP slide)
                    st.overlay = True
                    ov = draw_overlay(cells, min(float(sc.score_threshold), 0.99))
                    ov.save(overlay_dir / window_file(shown, win, ".png"))
                h, w = st.reader.height, st.reader.width
                cells = own_cells(cells, win, h, w, settings.filters.border_margin, st.seen)
            if st is None or not st.counted:  # a slide counts once, as an image
                n_images += 1
                if st is not None:
                    st.counted = True
            if it is not None:
                n_truth += cells.n_truth or 0
            tab = cells.table
            tab.insert(1, "image_index", index)
            if "input_scale" not in tab:  # working px per source px this image was read at
                tab.insert(3, "input_scale", float(settings.input_scale))
            tables.append(tab)
            crops.append(cells.crops.images)
            masks.append(cells.crops.masks)
            rejects += reject_rows(tab)
            if cells.reject_crops is not None and len(rej_ids) < int(sc.n_reject_examples):
                rej_crops.append(cells.reject_crops)
                rej_ids += cells.reject_ids
            if st is not None:  # a slide's windows: one no_cells row per slide, at the end
                st.kept += int(tab["kept"].sum())
                if len(cells.crops.images) and mask_dir is not None:
                    tif = window_file(shown, win, ".tif")
                    write_label_image(mask_dir / tif, cells.label_image())
                continue
            if not len(tab):
                rejects.append(
                    {
                        "image": recorded_name(path.name),
                        "action": "no_cells",
                        "reason": "no detections",
                    }
                )
            elif not tab.kept.any():
                rejects.append(
                    {
                        "image": recorded_name(path.name),
                        "action": "no_cells",
                        "reason": "no detection passed filters",
                    }
                )
            if index < overlay_below:
                ov = draw_overlay(cells, min(float(sc.score_threshold), 0.99))
                ov.save(overlay_dir / shown)
            if mask_dir is not None:  # every image read, also those with no cell
                tif = Path(shown).with_suffix(".tif").name
                write_label_image(mask_dir / tif, cells.label_image())
    pbar.close()
    if current is not None:
        current.close()
    for path, st in slides.items():
        if st.counted and not st.kept:
            rejects.append(
                {
                    "image": recorded_name(path.name),
                    "action": "no_cells",
                    "reason": "no detection passed filters in any window of the slide",
                }
            )
    s = int(sc.crop_size)
    return {
        "tables": tables,
        "crops": np.concatenate(crops) if crops else np.zeros((0, s, s, 3), np.uint8),
        "masks": np.concatenate(masks) if masks else np.zeros((0, s, s), bool),
        "rejects": rejects,
        "reject_crops": np.concatenate(rej_crops)
        if rej_crops
        else np.zeros((0, s, s, 3), np.uint8),
        "reject_ids": rej_ids,
        "n_truth": n_truth,
        "n_images": n_images,
        "seconds": seconds,
        "model_args": dict(ckpt.get("model_args", {})),
    }


def pooled_scales(
    cfg: Any, paths: list[Path], estimate_px: float | None, fallback: float
) -> dict[Path, Any] | None:
    """Per-image scale estimates held near their microscope's median
    (``segmentation.scale_spread``), or None when the scale is not estimated or each image
    is measured on its own (null spread)."""
    spread = cfg.segmentation.scale_spread
    if estimate_px is None or spread is None or not paths:
        return None
    from segmentation.autoscale import pooled_estimates

    return pooled_estimates(paths, estimate_px, fallback, float(spread))


def _estimated(
    detector, image, path, settings, truth, sc, ckpt, pooled=None, id_prefix=None
) -> tuple[ImageCells, Any]:
    from segmentation.autoscale import segment_estimated

    r, px = refine_settings(sc, ckpt), sc.cell_px
    name = recorded_name(path.name)  # the image's name in its rows (valid UTF-8)
    cells, choice = segment_estimated(
        detector, image, name, settings, px, truth, id_prefix, r, estimate=pooled
    )
    log.info("scale %s: %s", id_prefix or name, choice.describe())
    cells.table.insert(2, "input_scale", float(choice.scale))
    return cells, choice


def _segment_needs(cfg: Any) -> list[str]:
    if cfg.data.segment_sources:
        return ["segmentation_model"]  # real images listed in the config
    return ["segmentation_model", "smears"]


def _validate(cfg: Any) -> None:
    settings_from_config(cfg.segmentation)
    if cfg.data.segment_sources:
        from pipeline.segment_sources import validate_sources

        validate_sources(cfg)


# characters of a contact-sheet label under a crop: a longer class name is written as the
# haematologists' abbreviation ("segmented_neutrophil" was cut to "segmented_neutrop...")
SHEET_LABEL_CHARS = 16


def sheet_labels(kept: Any) -> tuple[list[str] | None, str]:
    """Labels under the kept cells' crops and the caption's key to the abbreviations used
    ("" when none). ``kept``: their rows of the detections table. A label is the
    simulated kind, else the detection score; a kind longer than
    :data:`SHEET_LABEL_CHARS` is its abbreviation (SEG)."""
    from vae.analysis.palette import abbreviation_note, short_label

    if not len(kept):
        return None, ""
    if "kind" not in kept:
        return [f"{v:.2f}" for v in kept["score"]], ""
    kinds = [str(k) if isinstance(k, str) else "" for k in kept["kind"]]
    labels = [
        short_label(k, SHEET_LABEL_CHARS) if k else f"{sc_:.2f}"
        for k, sc_ in zip(kinds, kept["score"])
    ]
    return labels, abbreviation_note([k for k in kinds if k], SHEET_LABEL_CHARS)


@stage(
    "segment",
    needs=_segment_needs,
    produces=["cells"],
    distributed=True,
    validate=_validate,
)
def segment(ctx: StageContext) -> None:
    """Tiled Mask R-CNN inference -> filtered, background-free crops in cells.h5ad."""
    sc = ctx.cfg.segmentation
    settings = settings_from_config(sc)
    if ctx.cfg.data.segment_sources:
        from pipeline.segment_sources import segment_sources

        segment_sources(ctx, settings)
        return
    smears = ctx.input("smears")
    if smears.is_file():
        raise StageError(f"smears input {smears} is a file; give the folder of images")
    ann = _annotations_path(ctx, smears)
    try:
        truth = load_coco_truth(ann) if ann is not None else None
    except ValueError as e:  # the optional ground truth beside the images: a user's file
        raise StageError(
            f"{e}. It is read as the images' ground truth (COCO instances JSON); fix it, "
            f"or move it out of the folder"
        ) from e
    images = _image_list(ctx, smears, truth)
    if not images:
        kinds = ", ".join(f"*{x}" for x in sorted(IMAGE_SUFFIXES))
        slides = skipped_slides(smears)  # named, with the way to read them
        also = f"; {slide_skip_message(slides)}" if slides else ""
        raise StageError(f"no images ({kinds}) found in {smears} (sub-folders are not read){also}")
    # the detector before the scratch folder: a refused checkpoint leaves none behind
    from segmentation.model import load_checkpoint

    model, ckpt = load_checkpoint(ctx.input("segmentation_model"), map_location=ctx.dist.device)
    parts = ctx.dir / PARTS
    if ctx.is_main:
        shutil.rmtree(parts, ignore_errors=True)
        (parts / "overlays").mkdir(parents=True)
        (parts / "masks").mkdir(parents=True)
    ctx.dist.barrier()
    torch.manual_seed(int(ctx.cfg.seed))
    mine = ctx.dist.shard(list(enumerate(images)))
    # "rank 0: 5 of 5 images" in a one-process run was noise (terminal audit)
    who = f"rank {ctx.dist.rank}: {len(mine)} of " if ctx.dist.distributed else ""
    log.info("%s%d images from %s (truth: %s)", who, len(images), smears, ann or "none")
    settings.input_scale, scale_from = resolve_input_scale(ctx.cfg, ckpt)
    est = smear_estimate_px(ctx.cfg, ckpt)
    if ctx.is_main and est is None:
        log.info("input_scale=%.4g from %s", settings.input_scale, scale_from)
    elif ctx.is_main:  # the configured scale is only the fallback of an image with no cell
        log.info(
            "magnification measured per image (segmentation.estimate_scale; an image where "
            "nothing is measured takes its folder's median, else input_scale=%.4g)",
            settings.input_scale,
        )
    # every rank measures all images (the same medians, so the same scales on every rank)
    # (a whole slide's windows are measured one by one as they are read, never the slide)
    whole = [p for p in images if not is_slide(p, settings.slide_megapixels)]
    pooled = pooled_scales(ctx.cfg, whole, est, settings.input_scale)
    part = _run_shard(
        ctx,
        mine,
        settings,
        truth,
        parts / "overlays",
        model,
        ckpt,
        estimate_px=est,
        pooled=pooled,
        mask_dir=parts / "masks",
    )
    if ctx.dist.distributed:
        # through files, not dist.gather_object: a rank's part holds its crops and masks
        # (100s of MB for a slide folder), which NCCL would stage through GPU memory and
        # gather_object pickles into one tensor per rank in memory at once
        with open(parts / f"rank{ctx.dist.rank}.pkl", "wb") as f:
            pickle.dump(part, f)
        ctx.dist.barrier()
        if not ctx.is_main:
            return
        all_parts = []
        for r in range(ctx.dist.world_size):
            with open(parts / f"rank{r}.pkl", "rb") as f:
                all_parts.append(pickle.load(f))
    else:
        all_parts = [part]
    # each image's objects for QuPath, named as its overlay and label TIFF
    names = [output_stem(p) for p in images]
    _write_outputs(ctx, all_parts, settings, smears, ann, len(images), est is not None, names)
    shutil.rmtree(parts, ignore_errors=True)


# the numbers each cell carries into QuPath's measurement table (cells.h5ad's columns)
QUPATH_MEASUREMENTS = ("score", "area", "cell_diameter", "edge_weight", "input_scale")


def write_qupath(
    ctx: StageContext,
    obs: Any,
    masks: np.ndarray,
    file_names: list[str],
    classification: str | None = None,
    measurements: tuple[str, ...] = QUPATH_MEASUREMENTS,
    classes: list[str] | None = None,
) -> str:
    """``qupath/<image>.geojson``: each cell's outline and numbers on its image
    (segmentation.qupath), for review in QuPath; no cell, no file. ``classification``:
    the column named as each cell's class, coloured as in the study's figures
    (``classes``: every class, so each keeps its colour; default: those present).
    Returns the line the stage logs."""
    from segmentation.qupath import write_image_files

    colours = None
    if classification is not None and classification in obs:
        from vae.analysis.palette import label_colours

        colours = label_colours(classes or obs[classification].astype(str))
    with ctx.atomic("qupath") as tmp:
        tmp.mkdir()
        n, skipped = write_image_files(
            tmp,
            obs,
            masks,
            file_names,
            classification=classification,
            colours=colours,
            measurements=measurements,
        )
    without = f" ({skipped} cells without an outline left out)" if skipped else ""
    files = "file" if n == 1 else "files"
    return f"qupath/: {n} GeoJSON {files} of cell outlines, one per image{without}"


def _write_outputs(
    ctx: StageContext,
    parts: list[dict[str, Any]],
    settings: SegmentSettings,
    smears: Path,
    ann: Path | None,
    n_listed: int,
    estimated: bool = False,
    file_names: list[str] | None = None,
) -> None:
    sc = ctx.cfg.segmentation
    table, kept, crops, masks = merge_parts(parts, settings.crop_size, ann is not None)
    rejects, counts, summary = run_summary(parts, table, kept, n_listed, smears, ann)
    if n_listed and not counts["images_read"]:
        # no image could be read: an empty cells.h5ad would only fail later, at stage=pair
        with ctx.atomic("rejects.csv") as tmp:  # why, kept with the failed run
            spreadsheet_safe(rejects).to_csv(tmp, index=False)
        raise StageError(
            f"{smears}: none of its {n_listed} images could be read (each one's reason: "
            "this run's rejects.csv)"
        )
    summary.update(world_size=ctx.dist.world_size, device=str(ctx.dist.device))
    # the scale this run used (model_args.input_scale is the network's own, always 1.0)
    summary["input_scale"] = (
        "per image: detections.csv input_scale" if estimated else settings.input_scale
    )
    adata = cells_adata(kept, crops, masks, settings, counts, str(smears))
    if estimated:  # no one scale: each cell's image's is obs["input_scale"]
        adata.uns["input_scale"] = "per image: obs['input_scale']"
    with ctx.atomic("cells") as tmp:
        write_h5ad(adata, tmp)
    # both opened in spreadsheets: an image named "=HYPERLINK(...).png" is quoted as text
    with ctx.atomic("detections.csv") as tmp:
        spreadsheet_safe(table).to_csv(tmp, index=False)
    with ctx.atomic("rejects.csv") as tmp:
        spreadsheet_safe(rejects).to_csv(tmp, index=False)
    labels, note = sheet_labels(kept)
    with ctx.atomic("contact_sheet.png") as tmp:
        what = "simulated kind (else the detection score)" if "kind" in kept else "detection score"
        what += f"; {note}" if note else ""
        contact_sheet(crops, labels, int(sc.contact_sheet_max), caption=f"kept cells: {what}").save(
            tmp, format="PNG"
        )
    with ctx.atomic("rejects.png") as tmp:  # a few rejected cells, each with why
        reject_sheet(parts, table, int(sc.n_reject_examples)).save(tmp, format="PNG")
    with ctx.atomic("overlays") as tmp:
        shutil.copytree(ctx.dir / PARTS / "overlays", tmp)
    with ctx.atomic("masks") as tmp:
        shutil.copytree(ctx.dir / PARTS / "masks", tmp)
    if file_names is not None:
        names = [file_names[int(i)] for i in adata.obs["image_index"]]
        log.info("%s", write_qupath(ctx, adata.obs, adata.obsm["masks"], names))
    write_json(ctx.output("summary.json"), summary)
    log.info(
        "segment: %d images, %d detections, %d cells kept; dropped: %s",
        counts["images_read"],
        counts["detections"],
        counts["kept"],
        # the filters that dropped any, not a dict of 11 mostly zeros (terminal audit)
        ", ".join(f"{k} {counts[k]}" for k in FLAGS if counts[k]) or "none",
    )
    if counts["images_read"] and not counts["kept"]:
        # an empty cells.h5ad ends the chain at stage=pair with no word on why
        log.warning("%s", no_cells_message(counts))


def no_cells_message(counts: dict[str, int]) -> str:
    """The warning of a run that kept no cell in any image: the filters that dropped
    the detections, or, with none detected, what to check."""
    n = counts["images_read"]
    if not counts["detections"]:
        return (
            f"no cell kept in any of {n} images (dropped: none; the detector found "
            f"nothing: check the detector (paths.inputs.segmentation_model), "
            f"segmentation.input_scale and segmentation.score_threshold)"
        )
    why = ", ".join(f"{k} {counts[k]}" for k in FLAGS if counts[k]) or "none"
    return (
        f"no cell kept in any of {n} images (dropped: {why}; of {counts['detections']} "
        f"detections): the segmentation.* filter settings named by the counts may be too "
        f"strict for these smears"
    )
