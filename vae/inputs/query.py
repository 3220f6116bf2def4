"""Readers of new data for :mod:`vae.api`: crop folders and smear folders -> AnnData.

Both return an AnnData in the ``cells.h5ad`` layout (``obsm["crops"]`` (N, S, S, 3)
uint8, ``obsm["masks"]`` (N, S, S) bool, no genes) plus a list of reject rows
(``input``, ``item``, ``reason``) for what could not be read. A sub-folder of the
given folder is a sample: its name goes to ``obs["sample"]`` (images directly in
the folder get the folder's own name).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segmentation.io import (
    IMAGE_SUFFIXES,
    is_other_slide,
    recorded_name,
    slide_skip_message,
    undecodable_warning,
)
from segmentation.schema import SCALE_SPREAD

REJECT_COLUMNS = ["input", "item", "reason"]

log = logging.getLogger(__name__)


# obs column the folder readers name each image's sample in (its sub-folder)
FOLDER_SAMPLE = "sample"

# a crop of a crop folder (taken whole) is decoded at 1/k of its size where its long side
# stays >= this many times the side S it is resized to (segmentation.io.read_rgb's
# reduce_to): the bilinear resize to S then still averages >= 8 px of the reduced image
# per output px. A crop under 2 * 8 * S px (256 px for S = 16, 2048 for S = 128) is
# decoded whole, so its crop is as before to the bit; a 14000 px JPEG crop peaked at 2.5
# GB RSS decoded whole (docs/embed.md, "Huge crops")
REDUCED_READ_MARGIN = 8

# images between two progress lines of a folder read (a terminal also gets a bar): a
# 20k-crop folder read ~4 min without a line (docs/performance.md, "Embedding large inputs")
PROGRESS_EVERY = 1000


@dataclass(frozen=True)
class ModelCrops:
    """The crop side a study's model reads: a folder's crops resized to it as they are read.

    ``Study.prepare`` resizes crops of any other side to ``pair_size`` as ``stage=pair``
    does (:func:`vae.inputs.pairing.resize_crop`), then ``vae.data.from_anndata`` to
    ``size`` (area); calling this on each crop as it is read does the same, so the
    latents are identical, and a folder is held at the model's 64 px (16 KB a crop with
    its mask) instead of the detector's 128 px crops (64 KB): 20k crops peaked at
    3.85 GiB (docs/performance.md, "Embedding large inputs").

    Parameters
    ----------
    pair_size : ``Study.pair_crop_size``, px
    size : ``Study.crop_size`` (the model's), px
    background : ``pair.background_value`` of the study (0..255)
    """

    pair_size: int
    size: int
    background: int = 0

    def __call__(self, crops: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S, 3) uint8 crops, (N, S, S) bool masks -> the same at ``size``."""
        import torch

        from vae.data import _resize  # the area resize from_anndata applies: one owner
        from vae.inputs.pairing import resize_crop

        masks = np.asarray(masks).astype(bool)
        side = crops.shape[1]
        if side not in (self.pair_size, self.size):  # as Study.prepare (_images)
            out = [resize_crop(c, m, self.pair_size, self.background) for c, m in zip(crops, masks)]
            crops = np.stack([o[0] for o in out])
            masks = np.stack([o[1] for o in out])
        if crops.shape[1] != self.size:  # as vae.data.from_anndata(image_size=size)
            tc = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).contiguous()
            tm = torch.from_numpy(masks.astype(np.uint8)).unsqueeze(1).contiguous()
            tc, tm = _resize(tc, tm, self.size)
            crops = tc.permute(0, 2, 3, 1).numpy()
            masks = tm[:, 0].numpy().astype(bool)
        return crops, masks


# paired.h5ad image rows read to tell how a study's crops were made (whole_masks):
# this many, evenly spaced over the image rows. Single rows, not runs of consecutive
# ones: a paired table lists its crops source by source, and runs sampled sources in
# clusters (review: by_label_real's 351 whole bccd_cropped crops then 400 masked ones
# read 0.500 whole against 0.467 in truth, and the tie went to whole)
PAIRED_MASK_SAMPLE = 256


def whole_masks(masks: np.ndarray) -> np.ndarray:
    """(N,) bool: which of (N, S, S) masks mark the whole square as the cell, not a cut-out
    cell: every pixel, or a filled rectangle spanning the square's full width or height
    (``stage=pair``'s ``image_folder`` crop of a non-square file, the padding that made it
    square left out: :func:`vae.inputs.pairing.square_crop`). A cell's instance mask is
    neither (:func:`vae.inputs.pairing.square_crop` and
    :func:`segmentation.crops.extract_crop` leave a margin around it); an empty mask (a
    row without an image) is not whole."""
    m = np.asarray(masks).astype(bool)
    rows, cols = m.any(axis=2), m.any(axis=1)  # (N, S) each
    box = rows[:, :, None] & cols[:, None, :]  # each mask's bounding rectangle, filled
    filled = (m == box).all(axis=(1, 2))
    spans = rows.all(axis=1) | cols.all(axis=1)
    return filled & spans & rows.any(axis=1)


@dataclass(frozen=True)
class PairedMasks:
    """What a paired table's masks say of its crops (:func:`paired_masks`): ``n`` image
    rows read, ``whole`` of them whole squares (:func:`whole_masks`), of ``n_image``."""

    n: int
    whole: int
    n_image: int

    @property
    def share(self) -> float:
        return self.whole / self.n if self.n else float("nan")


def paired_masks(path: str | Path) -> PairedMasks | None:
    """How the crops of a paired table (``stage=pair``'s ``paired.h5ad``) were made, read
    from its masks: up to :data:`PAIRED_MASK_SAMPLE` image rows evenly spaced over the
    table (``obs["has_image"]``; a file without it: every row
    with a mask), nothing else of the file. The table does not record it otherwise:
    ``pair.crop_sources`` of kind ``image_folder`` give all-True masks (False only on a
    non-square file's padding), every other kind the cell's instance mask.

    Returns
    -------
    :class:`PairedMasks`, or None: no ``obsm["masks"]`` of (N, S, S), or no image row.

    Raises
    ------
    OSError
        The file cannot be read as HDF5.
    """
    import h5py

    with h5py.File(path, "r") as f:
        ds = f.get("obsm/masks")
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 3:
            return None
        n = int(ds.shape[0])
        has = f.get("obs/has_image")
        if isinstance(has, h5py.Dataset) and has.shape == (n,) and has.dtype.kind in "biu":
            rows = np.flatnonzero(np.asarray(has[:]).astype(bool))
        else:
            rows = np.arange(n)
        if not len(rows):
            return None
        # increasing and unique, as h5py reads a list of rows
        pick = rows[np.unique(np.linspace(0, len(rows) - 1, PAIRED_MASK_SAMPLE).astype(int))]
        m = np.asarray(ds[pick]).astype(bool)
    m = m[m.reshape(len(m), -1).any(axis=1)]  # rows without an image (no has_image column)
    if not len(m):
        return None
    return PairedMasks(len(m), int(whole_masks(m).sum()), len(rows))


def square_cells(cells, settings):
    """A smear image's cells (:class:`segmentation.cells.ImageCells`) with each kept cell
    cut anew as its square box, unmasked: for a study trained on unmasked square crops
    (``stage=pair``'s ``image_folder``: a file that is a cell's box, read whole).

    The square is the cell's box with ``settings.crop_margin`` of its side around it
    (:func:`segmentation.crops.extract_crop`'s framing), resized to fill
    ``settings.crop_size`` as a crop file is resized whatever its size (``fill``), with
    the neighbourhood kept (red cells, background: ``paint=False``) and an all-True mask.
    The table's ``crop_scale``, ``crop_x0``, ``crop_y0``, ``crop_side`` give the new
    squares; the detector's masks stay in ``cells.kept`` (area, ``cell_diameter``).
    """
    from segmentation.crops import extract_crops

    if cells.kept is None or not len(cells.kept):
        return cells
    s = settings
    c = extract_crops(
        cells.image,
        cells.kept,
        s.crop_size,
        s.background_value,
        s.crop_margin,
        paint=False,
        fill=True,
    )
    c.masks[:] = True
    table = cells.table.copy()
    keep = np.flatnonzero(table["kept"].to_numpy(bool))
    table.loc[table.index[keep], "crop_scale"] = c.scale
    for k, col in enumerate(("crop_x0", "crop_y0", "crop_side")):
        table.loc[table.index[keep], col] = c.windows[:, k]
    return replace(cells, crops=c, table=table)


def _as_cut(crops: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crops kept at the side they were cut at (no :class:`ModelCrops`)."""
    return crops, np.asarray(masks).astype(bool)


class _CropRows:
    """Crops and masks of a folder read, written into one array pair as they come.

    A list of per-image arrays joined by ``np.concatenate`` held every crop twice at
    the end (20k crops: 3.85 GiB peak). The arrays grow and are trimmed in place
    (``ndarray.resize``: a realloc, no second copy where the allocator can extend or
    shrink the block); no view of them is handed out before :meth:`arrays`. A crop
    folder writes each image's row at the image's own slot (:meth:`put`: the crops the
    detector reads come after the others) and :meth:`arrays` closes the gaps in place.
    """

    def __init__(self, side: int, capacity: int = 0):
        self.crops = np.zeros((capacity, side, side, 3), np.uint8)
        self.masks = np.zeros((capacity, side, side), bool)
        self.n = 0  # rows written
        self.slots: list[int] = []  # slots of put() rows

    def add(self, crops: np.ndarray, masks: np.ndarray) -> None:
        """Rows after the last one (smears: any number of cells an image)."""
        k = len(crops)
        if self.n + k > len(self.crops):
            cap = max(2 * len(self.crops), self.n + k, 64)
            self.crops.resize((cap, *self.crops.shape[1:]), refcheck=False)
            self.masks.resize((cap, *self.masks.shape[1:]), refcheck=False)
        self.crops[self.n : self.n + k] = crops
        self.masks[self.n : self.n + k] = masks
        self.n += k

    def put(self, slot: int, crops: np.ndarray, masks: np.ndarray) -> None:
        """One row at ``slot`` (< capacity): the row of image ``slot`` of a crop folder."""
        self.crops[slot], self.masks[slot] = crops[0], masks[0]
        self.slots.append(slot)
        self.n += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows written, in slot order, (n, S, S, 3) uint8 and (n, S, S) bool."""
        for j, slot in enumerate(sorted(self.slots)):  # j <= slot: nothing unread is overwritten
            if j != slot:
                self.crops[j], self.masks[j] = self.crops[slot], self.masks[slot]
        self.crops.resize((self.n, *self.crops.shape[1:]), refcheck=False)
        self.masks.resize((self.n, *self.masks.shape[1:]), refcheck=False)
        return self.crops, self.masks


class _Progress:
    """Progress of a folder read: a bar on a terminal (:func:`segmentation.progress.bar`)
    and a log line every ``PROGRESS_EVERY`` images (logs and pipes get no bar)."""

    def __init__(self, folder: str, total: int):
        from segmentation.progress import bar

        self.folder, self.total, self.i = folder, total, 0
        self.bar = bar(desc="read images", total=total, unit="img")
        self.t0 = time.perf_counter()

    def step(self, cells: int) -> None:
        """Call before each image; ``cells``: rows kept so far."""
        if self.i:
            self.bar.update(1)
            if self.i % PROGRESS_EVERY == 0:
                self._line(cells)
        self.i += 1

    def done(self, cells: int) -> None:
        if self.i:
            self.bar.update(1)
        self.bar.close()
        if self.total >= PROGRESS_EVERY:
            self._line(cells)

    def _line(self, cells: int) -> None:
        log.info(
            "%s: %d of %d images read, %d cells (%.0f s)",
            self.folder,
            self.i,
            self.total,
            cells,
            time.perf_counter() - self.t0,
        )


def sample_images(
    folder: str | Path, slide_megapixels: float | None = None
) -> list[tuple[str, Path]]:
    """(sample, image path) for images in ``folder`` and below it.

    Images directly inside ``folder`` belong to the sample named after the
    folder; each sub-folder is one sample named after the sub-folder, with the
    images at any depth below it (``patientB/slide1/*.jpg`` is sample
    ``patientB``: a per-patient, per-slide layout keeps its patients). Hidden
    files and folders (names starting with ``.``) are skipped at every depth.
    Folders given as symbolic links are followed (a slide folder linked from
    elsewhere is read), each real folder once (a link back up is not a loop).

    ``slide_megapixels``: a whole slide (a TIFF over this size, read window by window:
    :func:`segmentation.slides.is_slide`) directly inside ``folder`` is a sample of its
    own, named by its stem: a slide is a whole smear, as a sub-folder of fields is, and
    a folder of one slide per patient pooled every patient into one sample. None: no
    file is a slide (crop folders).
    """
    from segmentation.slides import is_slide  # (cells and the detector: not at import)

    folder = Path(folder)
    if folder.is_file():
        raise NotADirectoryError(f"{folder}: a file; give the folder that holds the images")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    out = []
    for p in sorted(folder.iterdir()):
        if not _is_image(p):
            continue
        own = slide_megapixels is not None and is_slide(p, slide_megapixels)
        if own:
            log.info("%s: a whole slide, sample %r of its own", p.name, recorded_name(p.stem))
        out.append((p.stem if own else folder.name, p))
    subs = sorted(d for d in folder.iterdir() if d.is_dir() and not _hidden(d))
    seen = {os.path.realpath(folder)}
    for sub in subs:
        out += [(sub.name, p) for p in _images_below(sub, seen)]
    return out


def _hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _images_below(top: Path, seen: set[str]) -> list[Path]:
    """Image files at any depth below ``top``, sorted by path; hidden names skipped.

    ``Path.rglob`` does not follow a linked folder (Python 3.11), which dropped a
    linked slide folder without a word; ``os.walk(followlinks=True)`` does, and
    ``seen`` (real paths already walked) keeps a link to a parent from looping and a
    folder linked twice from being read twice.
    """
    real = os.path.realpath(top)
    if real in seen:
        log.warning("%s: skipped, a link to a folder already read (%s)", top, real)
        return []
    seen.add(real)
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            r = os.path.realpath(os.path.join(dirpath, d))
            if r in seen:
                log.warning(
                    "%s: skipped, a link to a folder already read (%s)", Path(dirpath) / d, r
                )
                continue
            seen.add(r)
            keep.append(d)
        dirnames[:] = keep
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(p for p in found if _is_image(p))


# obs columns of a paired table (stage=pair's paired.h5ad) naming each row's crop and profile
PAIRED_REFS = ("image_ref", "expression_ref")


def paired_row_names(obs: pd.DataFrame) -> pd.Index | None:
    """The names ``latent.h5ad`` gives the rows of a paired table, for a query that is one.

    ``stage=pair`` names the rows of ``paired.h5ad`` ``r000000``, ...; ``latent.h5ad``
    names them by the cells' own ids (:func:`vae.scverse.cell_obs_names`:
    ``expression_ref``, else ``image_ref``, repeats made unique ``-1``, ``-2``...) and
    keeps the row id in ``obs["row"]``. A query of such a table (the round trip: the
    study's own ``paired.h5ad`` through ``stage=embed``) is named the same way, so
    ``query.h5ad`` joins ``latent.h5ad`` by ``obs_names``; it was named ``r000000`` ...
    and joined nothing. Computed over the whole table: a repeat's suffix depends on
    the rows before it.

    Returns
    -------
    (n,) the rows' names, or None where the input's own ``obs_names`` stay: not a paired
    table (no ``image_ref`` / ``expression_ref``: ``cells.h5ad``, expression files,
    folders), one that already has ``obs["row"]`` (``latent.h5ad``, a query named so
    before), or one whose names are those already.
    """
    from vae.scverse import ROW_KEY, cell_obs_names

    if ROW_KEY in obs or not any(c in obs for c in PAIRED_REFS):
        return None
    names = cell_obs_names(obs)
    return None if names.equals(obs.index.astype(str)) else names


def name_paired_rows(obs: pd.DataFrame, names) -> None:
    """``obs`` (rows of a paired table) named ``names`` in place, each row's own name
    kept in ``obs["row"]`` first, as ``latent.h5ad`` keeps it (:func:`paired_row_names`)."""
    from vae.scverse import ROW_KEY

    obs.insert(0, ROW_KEY, obs.index.astype(str))
    obs.index = pd.Index(np.asarray(names, dtype=str), dtype=object)


def image_id(folder: Path, sample: str, p: Path) -> str:
    """A crop's cell id: ``sample/name``, with the sub-folders below the sample's
    (``patientB/slide1/x.jpg``) so two slides' files of one name stay apart; a name that
    is not valid UTF-8 as :func:`segmentation.io.recorded_name` writes it."""
    base = folder / sample if (folder / sample).is_dir() and folder / sample != folder else None
    rel = p.relative_to(base).as_posix() if base is not None and base in p.parents else p.name
    return recorded_name(f"{sample}/{rel}")


def _note_undecodable(p: Path) -> None:
    """Warn (once per read) of an image whose name, or a folder name below the input,
    is not valid UTF-8: it is read, and recorded as
    :func:`segmentation.io.recorded_name` writes it."""
    odd = undecodable_warning(p)
    if odd:
        log.warning("%s", odd)


def cell_prefix(folder: Path, sample: str, p: Path, twins: set[tuple[Path, str]]) -> str:
    """Cell id prefix of a smear image's detections (``<prefix>_d000``, ...).

    :func:`image_id` without the extension: ``sample/stem`` for an image of the sample's
    own folder, with the sub-folders below it (``patientA/slide1/img``) so two slides'
    files of one name keep apart; an image whose folder holds another image of the same
    stem (``cell.jpg`` and ``cell.png``, as in ``(p.parent, p.stem)`` of ``twins``) adds
    its extension (``sample/cell_jpg``), as stage=segment names its overlays.
    """
    cid = image_id(folder, sample, p)
    suffix = recorded_name(p.suffix)  # the id's own spelling of it
    stem = cid[: len(cid) - len(suffix)] if suffix else cid
    return f"{stem}_{p.suffix[1:].lower()}" if (p.parent, p.stem) in twins else stem


def stem_twins(paths) -> set[tuple[Path, str]]:
    """``(folder, stem)`` shared by more than one of ``paths`` (``cell.jpg``, ``cell.png``)."""
    seen: dict[tuple[Path, str], int] = {}
    for p in paths:
        seen[(p.parent, p.stem)] = seen.get((p.parent, p.stem), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _is_image(p: Path) -> bool:
    """An image file the readers take (scanner TIFFs such as .svs/.ndpi included); a
    whole-slide file of another format is named in the log with the way to read it,
    never dropped without a word."""
    if is_other_slide(p) and p.is_file():
        log.warning("%s: %s", p.parent, slide_skip_message([p]))
        return False
    return p.is_file() and not _hidden(p) and p.suffix.lower() in IMAGE_SUFFIXES


def read_crop_folder(
    folder: str | Path, size: int, background: int = 0, model_crops: ModelCrops | None = None
):
    """Single-cell crop images, each taken whole as the cell -> ``(AnnData, rejects)``.

    Each image is squared (padding marked outside the mask), resized to
    ``size`` px with the pairing's :func:`vae.inputs.pairing.square_crop`, as
    ``stage=pair`` does for crop folders; the mask covers the whole image. An image
    16x ``size`` or more is decoded reduced (:data:`REDUCED_READ_MARGIN`): a huge crop
    costs a few MB, not gigabytes; smaller ones are read as before, to the bit.

    Parameters
    ----------
    folder : images, or sub-folders of images (one per sample)
    size : crop side S of the output, px
    background : value of padding pixels (0..255)
    model_crops : each crop then resized to the study model's side as it is read
        (:class:`ModelCrops`: the same latents, held at the model's side)
    """
    import anndata as ad

    from segmentation.io import read_rgb
    from vae.inputs.pairing import square_crop

    folder = Path(folder)
    rows, rejects = [], []
    images = sample_images(folder)
    out = _CropRows(model_crops.size if model_crops is not None else size, len(images))
    keep = model_crops if model_crops is not None else _as_cut
    progress = _Progress(str(folder), len(images))
    for sample, p in images:
        progress.step(out.n)
        _note_undecodable(p)
        # decoded reduced where far larger than the crop it becomes (REDUCED_READ_MARGIN)
        rd = read_rgb(p, reduce_to=REDUCED_READ_MARGIN * size)
        if not rd.ok:
            rejects.append({"input": str(folder), "item": recorded_name(p), "reason": rd.reason})
            continue
        # the whole image is the cell: an all-True mask as a view of one value (a full-size
        # array of True took 196 MB for a 14000 px crop); square_crop reads it the same
        whole = np.broadcast_to(True, rd.image.shape[:2])
        c, m = square_crop(rd.image, whole, size, background)
        out.add(*keep(c[None], m[None]))
        rows.append(
            {
                "cell_id": image_id(folder, sample, p),
                "image": recorded_name(p.name),
                "sample": recorded_name(sample),
            }
        )
    obs = pd.DataFrame(rows, columns=["cell_id", "image", "sample"]).set_index("cell_id")
    obs.index.name = None
    progress.done(out.n)
    a = ad.AnnData(obs=obs)
    a.obsm["crops"], a.obsm["masks"] = out.arrays()
    return a, rejects


def segment_smear_folder(
    folder: str | Path,
    model_path: str | Path,
    settings: Any = None,
    device: str = "cpu",
    detector_kwargs: dict | None = None,
    estimate_cell_px: float | None = None,
    refine: Any = None,
    estimate_scale: bool | None = None,
    scale_spread: float | None = SCALE_SPREAD,
    centre_cell: bool = False,
    model_crops: ModelCrops | None = None,
    unmasked: bool = False,
):
    """Detect and crop the white cells of every smear image -> ``(AnnData, rejects)``.

    The same code as ``stage=segment`` (:func:`segmentation.cells.segment_images`
    with the tiled :class:`~segmentation.inference.MaskRCNNDetector`).

    Parameters
    ----------
    folder : smear images, or sub-folders of them (one per sample)
    model_path : ``segment_train/model.pt``
    settings : :class:`segmentation.cells.SegmentSettings`; None -> defaults
        with the scale the detector was trained at (checkpoint ``input_scale``)
    device : torch device
    detector_kwargs : extra arguments of ``MaskRCNNDetector``
    estimate_cell_px : when given, each image's scale is measured from the image
        (:func:`segmentation.magnification.estimate_scale`: its white cells, else its
        red cells; white cells to this many px) instead of ``settings.input_scale``; the scales used are in
        ``uns["input_scales"]`` (image -> scale)
    refine : when the scale is estimated: a
        :class:`segmentation.magnification.RefineSettings` makes the detector's own
        confident white boxes refine each estimate
        (:func:`segmentation.autoscale.segment_estimated`); False: the estimate is
        used; None (default): refined with the default thresholds when the detector
        asks for it (the shipped one: :func:`segmentation.shipped.wants_scale_refinement`)
    estimate_scale : when ``estimate_cell_px`` is None: True estimates at the
        checkpoint's ``cell_px``; None (default) does so for a detector saved with
        ``estimate_scale`` (the shipped one: :func:`segmentation.shipped.wants_scale_estimate`)
    scale_spread : when the scale is estimated: each image's estimate is held within
        this factor of the median estimate of the images of its (sub-)folder and
        pixel size (:func:`segmentation.autoscale.pooled_estimates`); None: each
        image on its own
    centre_cell : the images are single-cell crops (:func:`segment_crop_folder`):
        filters relaxed for a crop (:func:`segmentation.sources.crop_folder_filters`),
        one row per image, the kept detection that covers the image centre
        (:func:`segmentation.sources.pick_centre_cell`), indexed ``sample/file name``
        as :func:`read_crop_folder` does; where the crop's own scale gives none, one
        more pass at the median estimate of its folder (crops of every size; when
        the scale is estimated and ``scale_spread`` is set), and an image without one
        then is a reject row. A crop
        already cut out on the background value
        (:func:`premasked_cell`) keeps its own mask;
        ``obs["mask_source"]`` says which (``detector`` / ``premasked``); only the
        crops the detector reads are measured and pooled for their scale (a crop cut
        out keeps its framing: measuring it cost a quarter of a 20k-crop read and
        warned of mixed magnifications that no crop used)
    model_crops : crops and masks resized to the study model's side as each image is
        read (:class:`ModelCrops`; the same latents, a quarter of the memory at 128 ->
        64 px); None: ``settings.crop_size``
    unmasked : smears only (not ``centre_cell``): each kept cell cut as its square box
        with its neighbourhood and an all-True mask (:func:`square_cells`), for a study
        trained on unmasked square crops; False: cut out with its instance mask, the
        background painted ``settings.background_value`` (as ``stage=segment`` cuts)
    """
    import anndata as ad

    from segmentation.autoscale import folder_medians, pooled_estimates, segment_estimated
    from segmentation.cells import SegmentSettings, segment_images
    from segmentation.inference import MaskRCNNDetector
    from segmentation.io import SlideReader, error_line, read_rgb
    from segmentation.magnification import RefineSettings
    from segmentation.model import load_checkpoint
    from segmentation.shipped import wants_scale_estimate, wants_scale_refinement
    from segmentation.slides import is_slide, own_cells, slide_windows, window_cells
    from segmentation.sources import centre_cell as centre_cell_of
    from segmentation.sources import crop_folder_filters
    from segmentation.table import obs_frame

    model, ckpt = load_checkpoint(model_path, map_location=device)
    if estimate_cell_px is None and wants_scale_estimate(estimate_scale, ckpt):
        estimate_cell_px = float(ckpt.get("cell_px") or 40.0)
    if refine is None and wants_scale_refinement(None, ckpt):
        refine = RefineSettings()
    refine = refine or None  # False: the estimate alone
    if settings is None:
        settings = SegmentSettings(input_scale=float(ckpt.get("input_scale") or 1.0))
    if centre_cell:  # a crop's cell fills its crop, whatever the zoom it was cut at
        settings = replace(settings, filters=crop_folder_filters(settings.filters), crop_fill=True)
    det = MaskRCNNDetector(model, device, **(detector_kwargs or {}))
    folder = Path(folder)
    # (image index, ...): a crop folder's detector crops are read after its other crops,
    # and every row goes back to its image's place
    frames: list[tuple[int, pd.DataFrame]] = []
    rejects: list[tuple[int, dict]] = []
    scales: dict[str, float] = {}
    # a whole slide of the folder itself: a sample of its own (not in a crop folder)
    images = sample_images(folder, None if centre_cell else settings.slide_megapixels)
    bg = settings.background_value
    pool = estimate_cell_px is not None and scale_spread is not None
    fallback = float(settings.input_scale)
    pooled: dict = {}
    folder_scale: dict = {}
    # read window by window, each header read once (a crop folder holds no slide)
    slides = (
        set() if centre_cell else {p for _, p in images if is_slide(p, settings.slide_megapixels)}
    )
    if pool and not centre_cell:  # (a whole slide is measured window by window, as read)
        whole = [p for _, p in images if p not in slides]
        pooled = pooled_estimates(whole, estimate_cell_px, fallback, float(scale_spread))
    twins = stem_twins(p for _, p in images)
    side = model_crops.size if model_crops is not None else settings.crop_size
    # a crop folder gives at most one row per image: rows written in place, no second copy
    rows = _CropRows(side, len(images) if centre_cell else 0)
    keep = model_crops if model_crops is not None else _as_cut

    def cut_out(i: int, sample: str, p: Path, image: np.ndarray, name: str) -> bool:
        """A crop already cut out: its own mask and its own framing (True), else False."""
        pre = premasked_cell(image, bg)
        if pre is None:
            return False
        c, m, cs = frame_premasked(image, pre, settings.crop_size, bg)
        row = {
            "cell_id": [image_id(folder, sample, p)],
            "image": [name],
            "area": [int(pre.sum())],
            "crop_scale": [cs],
            "mask_source": ["premasked"],
            "kept": [True],
            "sample": [recorded_name(sample)],
        }
        frames.append((i, pd.DataFrame(row)))
        rows.put(i, *keep(c[None], m[None]))
        return True

    def detect(i: int, sample: str, p: Path, image: np.ndarray, name: str, item: str) -> None:
        """The detector's cells of one image (a crop: the one at its centre)."""
        # with the sub-folders and, for cell.jpg beside cell.png, the extension: ids of
        # two slides' img.jpg (or of the two twins) were one, refused as duplicated ids
        prefix = cell_prefix(folder, sample, p, twins)
        if centre_cell:
            cc = centre_cell_of(
                det,
                image,
                name,
                settings,
                prefix,
                estimate_cell_px,
                refine,
                pooled.get(p),
                folder_scale.get(p.parent),
            )
            log.info("scale %s: %s", name, cc.how)
            scales[prefix] = cc.scale
            if cc.pos is None:
                reason = f"no mask: {cc.reason}"
                rejects.append((i, {"input": str(folder), "item": item, "reason": reason}))
                return
            cells, pos = cc.cells, cc.pos
            kept = cells.table[cells.table["kept"]].iloc[[pos]].copy()
            kept["cell_id"] = image_id(folder, sample, p)
            kept["image"] = name
            kept["mask_source"] = "detector"
            rows.put(i, *keep(cells.crops.images[pos : pos + 1], cells.crops.masks[pos : pos + 1]))
        else:
            cells = smear_cells(image, name, prefix, pooled.get(p))
            if unmasked:
                cells = square_cells(cells, settings)
            kept = cells.table[cells.table["kept"]].copy()
            if not len(kept):
                reason = "no cells kept"
                rejects.append((i, {"input": str(folder), "item": item, "reason": reason}))
                return
            rows.add(*keep(cells.crops.images, cells.crops.masks))
        kept["sample"] = recorded_name(sample)
        frames.append((i, kept))

    def smear_cells(image: np.ndarray, name: str, prefix: str, estimate: Any = None):
        """One smear image's cells at its scale (noted in scales)."""
        if estimate_cell_px is None:
            scales[prefix] = float(settings.input_scale)
            return segment_images(det, [image], [name], settings, id_prefixes=[prefix])[0]
        return measured(image, name, prefix, estimate)[0]

    def measured(image: np.ndarray, name: str, prefix: str, estimate: Any = None):
        """(cells, ScaleChoice) at the scale measured on the image (noted in scales)."""
        cells, choice = segment_estimated(
            det, image, name, settings, estimate_cell_px, None, prefix, refine, estimate=estimate
        )
        log.info("scale %s: %s", prefix, choice.describe())
        scales[prefix] = choice.scale
        return cells, choice

    def detect_slide(i: int, sample: str, p: Path, name: str, item: str) -> None:
        """A whole slide's cells, window by window (segmentation.slides: each cell once;
        one magnification per slide, measured on its first window with cells;
        ``uns["input_scales"]`` per window)."""
        prefix = cell_prefix(folder, sample, p, twins)
        try:
            reader = SlideReader(p)
        except Exception as e:  # noqa: BLE001 - a damaged file: this slide only
            reason = f"unreadable slide: {error_line(e, 160)}"
            rejects.append((i, {"input": str(folder), "item": item, "reason": reason}))
            return
        n_kept = 0
        held = None  # the slide's scale, once a window measured it
        seen: list = []  # kept boxes of the windows read so far (each cell once)
        with reader:
            h, w = reader.height, reader.width
            note = reader.storage_note(settings.slide_window)
            if note:
                log.warning("%s", note)
            wins = slide_windows(h, w, settings.slide_window, settings.slide_overlap)
            side = f"{wins[0].x1 - wins[0].x0}x{wins[0].y1 - wins[0].y0}"
            log.info("%s: %dx%d px, read in %d windows of %s px", item, w, h, len(wins), side)
            for win in wins:
                rd = reader.read(win.x0, win.y0, win.x1, win.y1)
                if not rd.ok:
                    reason = f"window {win.name}: {rd.reason}"
                    rejects.append((i, {"input": str(folder), "item": item, "reason": reason}))
                    continue
                wp = f"{prefix}_{win.name}"
                if estimate_cell_px is None:
                    cells = smear_cells(rd.image, name, wp)
                else:
                    cells, held = window_cells(
                        det,
                        rd.image,
                        name,
                        wp,
                        settings,
                        held,
                        lambda im=rd.image, wp=wp: measured(im, name, wp),
                    )
                    scales[wp] = float(cells.scale)
                    cells.table.drop(columns="input_scale", inplace=True)  # uns["input_scales"]
                if unmasked:  # (window px: own_cells moves the squares onto the slide)
                    cells = square_cells(cells, settings)
                cells = own_cells(cells, win, h, w, settings.filters.border_margin, seen)
                kept = cells.table[cells.table["kept"]].copy()
                if len(kept):
                    rows.add(*keep(cells.crops.images, cells.crops.masks))
                    kept["sample"] = recorded_name(sample)
                    frames.append((i, kept))
                    n_kept += len(kept)
        if not n_kept:
            reason = "no cells kept in any window of the slide"
            rejects.append((i, {"input": str(folder), "item": item, "reason": reason}))

    later = []  # crops the detector reads once their folder's magnification is measured
    progress = _Progress(str(folder), len(images))
    for i, (sample, p) in enumerate(images):
        progress.step(rows.n)
        # every string of this image in obs, uns and rejects: valid UTF-8 (recorded_name)
        _note_undecodable(p)
        name, item = recorded_name(p.name), recorded_name(p)
        if p in slides:
            detect_slide(i, sample, p, name, item)
            continue
        rd = read_rgb(p)
        if not rd.ok:
            rejects.append((i, {"input": str(folder), "item": item, "reason": rd.reason}))
            continue
        if centre_cell and cut_out(i, sample, p, rd.image, name):
            continue
        if centre_cell and pool:  # measured with the others of its folder first
            later.append((i, sample, p))
            continue
        detect(i, sample, p, rd.image, name, item)
    progress.done(rows.n)
    if later:
        # only the crops the detector reads are measured and pooled: a crop already cut
        # out uses no scale (measuring every crop cost 79 s of a 313 s 20k-crop read and
        # warned of mixed magnifications from crops that used none); read once more
        # (not held: a folder's images would fill the memory)
        log.info("%s: measuring the magnification of %d crops", folder, len(later))
        pooled = pooled_estimates(
            [p for _, _, p in later], estimate_cell_px, fallback, float(scale_spread)
        )
        # the median estimate of each folder, whatever the crops' sizes, for a second try
        # where the crop's own scale gives no cell at the centre (the ruler can read a
        # lobe as a cell, and a cell seen 4x too large comes apart into pieces)
        folder_scale = folder_medians(pooled)
        progress = _Progress(f"{folder} (detector)", len(later))
        for i, sample, p in later:
            progress.step(rows.n)
            name, item = recorded_name(p.name), recorded_name(p)
            rd = read_rgb(p)
            if not rd.ok:  # read a moment ago: changed since
                rejects.append((i, {"input": str(folder), "item": item, "reason": rd.reason}))
                continue
            detect(i, sample, p, rd.image, name, item)
        progress.done(rows.n)
    frames.sort(key=lambda f: f[0])
    rejects = [r for _, r in sorted(rejects, key=lambda r: r[0])]
    if frames:
        obs = obs_frame(_filled(pd.concat([f for _, f in frames], ignore_index=True)))
    else:
        obs = pd.DataFrame(index=pd.Index([], dtype=str), columns=["image", "sample"])
    a = ad.AnnData(obs=obs)
    a.obsm["crops"], a.obsm["masks"] = rows.arrays()
    a.uns["input_scales"] = scales
    return a, rejects


def _filled(table: pd.DataFrame) -> pd.DataFrame:
    """Columns only some rows have, filled so the table can be written: premasked crops
    have no detector flags (``low_score``, ``too_small``...) and the detector's rows no
    ``mask_source`` text; concatenated, those columns held True/False beside NaN, which
    h5py refused ("Can't implicitly convert non-string objects to strings") when a folder
    mixed both kinds (scale audit). Flags of a row without them: False; text: ""."""
    for col in table.columns:
        if table[col].dtype != object or not table[col].isna().any():
            continue
        known = table[col].dropna()
        if known.map(lambda v: isinstance(v, bool | np.bool_)).all():
            table[col] = table[col].astype("boolean").fillna(False).astype(bool)
        elif known.map(lambda v: isinstance(v, str)).all():
            table[col] = table[col].fillna("")
    return table


def premasked_cell(
    image: np.ndarray, background: int = 0, tol: int = 10, min_fraction: float = 0.05
) -> np.ndarray | None:
    """The cell of a crop that was already cut out on a uniform background, else None.

    A crop whose whole one-pixel border lies within ``tol`` of ``background`` in every
    channel was masked before (e.g. crops exported from ``cells.h5ad``): the detector,
    trained on smears, often finds nothing on such a square, and its cell is already
    marked. Its mask is then read as the analyses read masked crops
    (:func:`vae.analysis.granules.mask_from_background`: pixels farther than ``tol``
    from the background, opened, the largest part, holes filled).

    Parameters
    ----------
    image : (H, W, 3) uint8 RGB
    background : the background value (0..255) of every channel
    tol : grey levels a pixel may differ from ``background`` and still be background
        (JPEG noise)
    min_fraction : the cell must cover at least this share of the image

    Returns
    -------
    (H, W) bool cell mask, or None (not a masked crop: the detector reads it).
    """
    from vae.analysis.granules import mask_from_background

    diff = np.abs(np.asarray(image, np.int16) - int(background)).max(axis=-1)
    border = np.concatenate([diff[0], diff[-1], diff[:, 0], diff[:, -1]])
    if border.max() > tol:
        return None
    cell = mask_from_background(image, background / 255.0, tol=tol / 255.0)
    return cell if cell.mean() >= min_fraction else None


def frame_premasked(
    image: np.ndarray, cell: np.ndarray, crop_size: int, background: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """A crop already cut out (:func:`premasked_cell`), framed as it was cut.

    Such a crop is most often an export of a study's own crops (``cells.h5ad``,
    ``paired.h5ad``), whose framing is the study's: on a smear a cell smaller than the
    crop keeps its source px (its size is part of what the latent reads). Enlarging it
    to fill the crop, as a crop read by the detector is, made the demo study call 57
    of 60 exported cells promyelocytes (its largest cells). The whole image is
    centred on a square of the background value and resized to ``crop_size`` as
    ``stage=pair`` resizes crops (:func:`vae.inputs.pairing.resize_crop`), nothing else.

    Parameters
    ----------
    image : (H, W, 3) uint8
    cell : (H, W) bool, the crop's cell
    crop_size : output side S, px
    background : value of every channel outside the cell

    Returns
    -------
    crop (S, S, 3) uint8, mask (S, S) bool, scale (crop px per image px)
    """
    from vae.inputs.pairing import resize_crop

    h, w = cell.shape
    side = max(h, w)
    y0, x0 = (side - h) // 2, (side - w) // 2
    img = np.full((side, side, 3), background, np.uint8)
    img[y0 : y0 + h, x0 : x0 + w] = image[..., :3]
    m = np.zeros((side, side), bool)
    m[y0 : y0 + h, x0 : x0 + w] = cell
    img[~m] = background
    if side != crop_size:  # as stage=pair resizes a crop (the same rim blending)
        img, m = resize_crop(img, m, crop_size, background)
    return img, m, float(crop_size / side)


def segment_crop_folder(folder: str | Path, model_path: str | Path, **kwargs):
    """Masks for single-cell crops from the detector -> ``(AnnData, rejects)``.

    What ``stage=segment`` does for a ``crop_folder`` source, for new crops: the
    detector runs on each crop image (its magnification estimated as for smears
    when the detector asks for it), and the kept detection that covers the image
    centre becomes the cell, with its instance mask, cut and resized like every
    other cell (``settings.crop_size``). A model trained on masked crops must not
    see the background and the neighbouring cells of the whole image. A crop
    where no detection covers the centre is a reject row (``no mask: ...``), never
    scored as the whole square.

    Parameters
    ----------
    folder : crop images, or sub-folders of them (one per sample)
    model_path : detector checkpoint (``segment_train/model.pt`` or the shipped one)
    **kwargs : the settings of :func:`segment_smear_folder`
    """
    return segment_smear_folder(folder, model_path, centre_cell=True, **kwargs)
