"""paired.h5ad -> tensors, a seeded stratified split, and fast batches.

The data path is built to keep up with the model on a CPU: all crops stay in
one uint8 tensor (N, 3, S, S) and masks in one (N, 1, S, S) uint8 tensor; a
batch is an index_select, converted to float and augmented (random flips and
rot90, the same for crop and mask) as a whole batch on the training device.
``num_workers > 0`` prefetches index batches in worker processes through a
DataLoader (useful on GPU hosts; on a 2-core CPU 0 is fastest).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from vae.inputs.schema import (
    GRANULE_CENTRES,
    GRANULE_OD,
    HAS_COUNTS,
    HAS_EXPRESSION,
    HAS_IMAGE,
    UNKNOWN_LABEL,
    batch_text,
    cell_diameters,
    known_labels,
)

SPLITS = ("train", "val", "test")


class PairedDataError(ValueError):
    """paired.h5ad lacks a field or holds one of the wrong shape/type."""


@dataclass
class PairedTensors:
    """All training examples in memory.

    Attributes
    ----------
    crops : (N, 3, S, S) uint8
    masks : (N, 1, S, S) uint8 in {0, 1}
    x : (N, G) float32 log-normalised expression (zeros where absent)
    counts : (N, G) float32 raw counts, or None when the data have none
    library : (N,) float32 total counts (1 where absent / unknown)
    has_image, has_expression : (N,) bool
    labels : (N,) int64 codes into ``label_names`` (``"NA"`` when unknown)
    label_names : list of str
    obs_names, gene_names : list of str
    norm_total : float
        Median of ``expm1(x).sum(1)`` over rows with expression (typical
        normalised total, used to turn NB proportions into log-normalised values).
    granules : (N, 1, S, S) uint8 or None
        Granule centres of each crop, a count per pixel: read from the table's
        ``obsm['granule_centres']`` (``stage=pair`` found them on the crop at the
        resolution it was cut, ``pair.granule_centres``), else found on the crop at
        model size (:func:`granule_centres`, {0, 1}) by the trainer when the model
        has a granule head.
    nucleus : (N, 1, S, S) uint8 in {0, 1} or None
        Nucleus mask of each crop (:func:`nucleus_masks`, the lobe counter's
        nucleus); filled by the trainer when the model has a nucleus layer.
    lobes : (N,) int64 or None
        The lobe counter's count of each crop's nucleus (0: none;
        :func:`vae.lobes.lobe_targets`); filled by the trainer for a lobe layer.
    log_factorial : (N, G) float32 or None
        ``lgamma(counts + 1)``, the NB likelihood's constant (it needs no gradient
        and never changes): filled by the trainer for in-memory counts, so a step
        gathers it instead of computing it (``None``: computed per batch).
    diameter : (N,) float32 or None
        The cell's equivalent diameter on the detector's working frame, px
        (``obs['cell_diameter']`` of ``stage=segment`` crops; NaN where unknown:
        no crop, or a source that does not say); None when the table has no such
        column. The crops' framing hides it (every cell fills its crop).
    batch : (N,) int64 or None
        Expression batch code of each row into ``batch_names`` (-1: unknown, or a row
        without a profile); filled by :func:`assign_batches` for a model with a batch
        covariate (``VAEArgs.batch_key``), None otherwise.
    batch_names : list of str
        The batches' names in code order (empty without ``batch``).
    image_batch : (N,) int64 or None
        Image source code of each row into ``image_batch_names`` (-1: unknown, or a
        row without a crop); filled by :func:`assign_image_batches` for a model with an
        image source covariate (``VAEArgs.image_batch_key``), None otherwise.
    image_batch_names : list of str
        The image sources' names in code order (empty without ``image_batch``).
    granule_od : (N, 3) float32 or None
        Each crop's granule optical density (R, G, B; NaN: no granule found) measured
        where ``granules`` were found (``obsm['granule_od']`` of ``stage=pair`` with
        ``pair.granule_centres``); None: the granule stain is scored against the
        model-size crop's contrast.

    For data larger than memory, ``crops``, ``masks``, ``granules`` and ``nucleus``
    may be :class:`vae.store.RowStore` (chunked on disk) and ``x``, ``counts``
    :class:`vae.store.SparseRows` (CSR): anything read through
    ``index_select(0, rows)`` (:func:`raw_batch`) works on them unchanged.
    """

    crops: torch.Tensor  # or vae.store.RowStore / ZeroRows (read by rows)
    masks: torch.Tensor
    x: torch.Tensor  # or vae.store.SparseRows (CSR, dense per batch)
    counts: torch.Tensor | None
    library: torch.Tensor
    has_image: torch.Tensor
    has_expression: torch.Tensor
    labels: torch.Tensor
    label_names: list[str]
    obs_names: list[str]
    gene_names: list[str]
    norm_total: float
    granules: torch.Tensor | None = None
    nucleus: torch.Tensor | None = None
    log_factorial: torch.Tensor | None = None
    lobes: torch.Tensor | None = None
    diameter: torch.Tensor | None = None
    batch: torch.Tensor | None = None
    batch_names: list[str] = field(default_factory=list)
    granule_od: torch.Tensor | None = None
    image_batch: torch.Tensor | None = None
    image_batch_names: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def crop_size(self) -> int:
        return int(self.crops.shape[-1])

    @property
    def n_genes(self) -> int:
        return int(self.x.shape[1])


@dataclass
class Batch:
    """One batch on the training device (floats ready for the model).

    image (B, 3, S, S) in [0, 1]; mask (B, 1, S, S) {0, 1} (both None when the
    batch was made without images: no row of the data set has one); x (B, G);
    counts (B, G) or None; library (B,); log_library (B,); has_image,
    has_expression (B,) bool; labels (B,) int64; index (B,) int64 rows;
    granules (B, 1, S, S) float granule centres (a count per pixel), or None;
    granule_od (B, 3) float the crops' granule optical density, or None; nucleus
    (B, 1, S, S) float {0, 1} nucleus mask, or None; log_factorial (B, G)
    ``lgamma(counts + 1)`` when the data set holds it (``PairedTensors.log_factorial``);
    lobes (B,) int64 the input nuclei's lobe counts (0: none), or None;
    diameter (B,) float32 the cells' diameters (NaN: unknown), or None;
    batch (B,) int64 expression batch codes (-1: unknown), or None;
    image_batch (B,) int64 image source codes (-1: unknown), or None.
    """

    image: torch.Tensor | None
    mask: torch.Tensor | None
    x: torch.Tensor
    counts: torch.Tensor | None
    library: torch.Tensor
    log_library: torch.Tensor
    has_image: torch.Tensor
    has_expression: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    granules: torch.Tensor | None = None
    nucleus: torch.Tensor | None = None
    log_factorial: torch.Tensor | None = None
    lobes: torch.Tensor | None = None
    diameter: torch.Tensor | None = None
    batch: torch.Tensor | None = None
    granule_od: torch.Tensor | None = None
    image_batch: torch.Tensor | None = None


def _dense(m) -> np.ndarray:
    return np.asarray(m.toarray() if hasattr(m, "toarray") else m)


def check_crop_arrays(crops_shape, crops_dtype, masks_shape, source, n: int | None = None) -> None:
    """``obsm['crops']`` must be (N, S, S, 3) uint8 and ``obsm['masks']`` (N, S, S); with
    ``n``, N must equal it. One clear error naming ``source`` and the field otherwise
    (the in-memory reader and the crop store's builder share it)."""
    if (
        len(crops_shape) != 4
        or (n is not None and crops_shape[0] != n)
        or crops_shape[3] != 3
        or crops_shape[1] != crops_shape[2]
    ):
        raise PairedDataError(f"{source}: obsm['crops'] must be (N, S, S, 3); got {crops_shape}")
    if crops_dtype != np.uint8:
        raise PairedDataError(f"{source}: obsm['crops'] must be uint8; got {crops_dtype}")
    if tuple(masks_shape) != tuple(crops_shape[:3]):
        raise PairedDataError(
            f"{source}: obsm['masks'] must be (N, S, S) = {crops_shape[:3]}; got {masks_shape}"
        )


def _tensors(
    adata, crops, masks, x, counts, library, has_image, has_expr, names, codes, norm_total
) -> PairedTensors:
    """The :class:`PairedTensors` of a table, in memory or streamed (crops/x as given)."""
    return PairedTensors(
        crops=crops,
        masks=masks,
        x=x,
        counts=counts,
        library=torch.from_numpy(library),
        has_image=torch.from_numpy(has_image),
        has_expression=torch.from_numpy(has_expr),
        labels=torch.from_numpy(codes.astype(np.int64)),
        label_names=[str(s) for s in names],
        obs_names=[str(s) for s in adata.obs_names],
        gene_names=[str(s) for s in adata.var_names],
        norm_total=norm_total,
        diameter=_diameters(adata.obs, has_image),
    )


def _diameters(obs: pd.DataFrame, has_image: np.ndarray) -> torch.Tensor | None:
    """(N,) float32 ``obs['cell_diameter']`` (NaN where unknown or without a crop), or
    None when the table has no such column or no finite positive value."""
    d = cell_diameters(obs)
    if d is None:
        return None
    d = np.where(has_image, d, np.nan).astype(np.float32)
    return torch.from_numpy(d) if np.isfinite(d).any() else None


# spellings of a modality flag (obs['has_image'] / obs['has_expression']) read as text,
# case and surrounding blanks aside; anything else is refused (astype(bool) read "False"
# and NaN as True: 222 rows without a crop trained as if they had one)
FLAG_TRUE = ("true", "1", "yes")
FLAG_FALSE = ("false", "0", "no")
# rows named in a message about bad rows (the first ones, in table order)
SHOW_ROWS = 5
# the share of the rows with a profile whose expression may be unusable (NaN / inf in X
# or layers['counts'], a negative count) and skipped; more refuses the table: a few
# broken cells are skipped and reported, a table broken throughout is not trained on
BAD_PROFILES_MAX_SHARE = 0.1


def _flag_value(v) -> bool | None:
    """One modality flag value as a bool, None when it is not one (:data:`FLAG_TRUE`)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer, float, np.floating)):
        return bool(v) if v in (0, 1) else None  # NaN is neither
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, str):
        t = v.strip().lower()
        return True if t in FLAG_TRUE else False if t in FLAG_FALSE else None
    return None


def parse_flag(values, source: str, col: str, names=None) -> np.ndarray:
    """(N,) bool of a modality flag column, read strictly.

    A bool column as it is; numbers 0 / 1; text true/false, 1/0, yes/no (any case).
    Anything else (NaN, None, other text or numbers) is an error: ``astype(bool)`` took
    the text "False" and NaN for True.

    Parameters
    ----------
    values : array-like (N,)
        The column (``obs[col]``).
    source, col : str
        File and column named in the error.
    names : array-like (N,), optional
        Row names, to name the first bad row.

    Raises
    ------
    PairedDataError
        Naming ``source``, ``obs[col]``, how many rows hold no flag and the first one.
    """
    s = pd.Series(values)
    if pd.api.types.is_bool_dtype(s.dtype) and not s.isna().any():
        return s.to_numpy(dtype=bool)
    codes, uniques = pd.factorize(s.astype(object), use_na_sentinel=True)
    lut = [_flag_value(u) for u in uniques]
    read = np.array([False if v is None else v for v in lut], dtype=bool)
    ok_u = np.array([v is not None for v in lut], dtype=bool)
    ok = (codes >= 0) & ok_u[np.maximum(codes, 0)] if len(lut) else codes >= 0
    if ok.all():
        return read[codes] if len(lut) else np.zeros(len(s), bool)
    first = int(np.flatnonzero(~ok)[0])
    bad = s.iloc[first]
    bad = bad.item() if isinstance(bad, np.generic) else bad  # 2, not np.int64(2)
    row = f"row {str(np.asarray(names)[first])!r}" if names is not None else f"row {first}"
    raise PairedDataError(
        f"{source}: obs['{col}'] must be true or false on every row; {int((~ok).sum())} of "
        f"{len(s)} rows hold something else (first: {row} = {bad!r}). Write it as "
        "booleans (True/False, 1/0, or the text true/false/yes/no), as stage=pair does"
    )


def _modality_flags(adata, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(N,) bool ``obs['has_image']`` and ``obs['has_expression']`` (:func:`parse_flag`);
    a clear error when missing or not read as true/false."""
    for col in (HAS_IMAGE, HAS_EXPRESSION):
        if col not in adata.obs:
            raise PairedDataError(f"{source}: obs['{col}'] is missing")
    names = adata.obs_names
    return (
        parse_flag(adata.obs[HAS_IMAGE], source, HAS_IMAGE, names),
        parse_flag(adata.obs[HAS_EXPRESSION], source, HAS_EXPRESSION, names),
    )


def _shown(names, rows: np.ndarray) -> str:
    """The first :data:`SHOW_ROWS` names of ``rows`` (bool mask), quoted, for a message."""
    picked = [str(v) for v in np.asarray(names, dtype=object)[rows][:SHOW_ROWS]]
    more = ", ..." if int(rows.sum()) > SHOW_ROWS else ""
    return ", ".join(repr(v) for v in picked) + more


def _skip_bad_profiles(
    bad: dict[str, np.ndarray], has_expr: np.ndarray, has_image: np.ndarray, names, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose expression holds unusable values: skipped, or the table refused.

    Parameters
    ----------
    bad : {what is wrong: (N,) bool rows}
        e.g. ``{"X holds non-finite values": rows}``.
    has_expr, has_image : (N,) bool
    names : (N,) row names (cell ids)
    source : str

    Returns
    -------
    zero : (N,) bool
        Rows whose X / counts are to be zeroed (every bad row, with a profile or not).
    has_expr : (N,) bool
        ``has_expr`` without the skipped profiles: those rows keep their crop and train
        as rows without a profile.

    Raises
    ------
    PairedDataError
        More than :data:`BAD_PROFILES_MAX_SHARE` of the profiles are bad: naming
        ``source``, the fields, the count and the first cells.
    """
    zero = np.zeros(has_expr.shape[0], bool)
    for rows in bad.values():
        zero |= rows
    skipped = zero & has_expr
    k, total = int(skipped.sum()), int(has_expr.sum())
    if not zero.any():
        return zero, has_expr
    what = "; ".join(
        f"{field} in {int((rows & has_expr).sum())}" for field, rows in bad.items() if rows.any()
    )
    if k > BAD_PROFILES_MAX_SHARE * total:
        raise PairedDataError(
            f"{source}: {k} of {total} expression profiles are unusable ({what}; first: "
            f"{_shown(names, skipped)}): more than {BAD_PROFILES_MAX_SHARE:.0%}, so the table "
            "is refused rather than trained on what is left. X must hold finite "
            "log-normalised values and layers['counts'] raw counts (>= 0): check the "
            "expression file, then re-run stage=expression and stage=pair"
        )
    if k:
        bare = int((skipped & ~has_image).sum())
        logging.getLogger(__name__).warning(
            "%s: %d of %d expression profiles skipped, their values unusable (%s); first: "
            "%s. Those rows are kept without a profile (has_expression False)%s",
            source,
            k,
            total,
            what,
            _shown(names, skipped),
            f"; {bare} of them have no crop either and carry no data" if bare else "",
        )
    return zero, has_expr & ~zero


def _check_rows(adata, source: str) -> None:
    """A table without a row: one clear error (it failed deep in the split before)."""
    if adata.n_obs == 0:
        raise PairedDataError(
            f"{source}: has no rows (no cell to train on or embed); re-run stage=pair and "
            "see its rejects.csv for what it left out"
        )


def _write_flags(adata, has_image: np.ndarray, has_expr: np.ndarray) -> None:
    """Put the flags as read back in ``adata.obs`` (bool; skipped profiles False) where they
    differ, so a table written from this obs (stage=train's latent.h5ad) and every reader
    of it agree with the tensors."""
    for col, flags in ((HAS_IMAGE, has_image), (HAS_EXPRESSION, has_expr)):
        cur = adata.obs[col]
        if cur.dtype != bool or not np.array_equal(cur.to_numpy(), flags):
            adata.obs[col] = flags


def _warn_unlabelled(adata, source: str, expect: bool | None) -> None:
    """A WARNING when a table to train on has no usable ``obs['label']``.

    ``expect`` None: a table stage=pair wrote (``obs['pair_mode']`` or ``uns['pair']``)
    is expected to hold labels; a query (:meth:`vae.api.Study.prepare`) is not."""
    if expect is None:
        expect = "pair_mode" in adata.obs or "pair" in adata.uns
    if not expect or adata.n_obs == 0:
        return
    if "label" not in adata.obs:
        logging.getLogger(__name__).warning(
            "%s: obs['label'] is missing, so every row is unlabelled: nothing learns from "
            "classes (classifier, class alignment, maturation head). stage=pair writes it "
            "from the expression file's labels (expression.label_key) or the crop folders",
            source,
        )
    elif not known_labels(adata.obs["label"].astype(object).to_numpy()).any():
        logging.getLogger(__name__).warning(
            "%s: obs['label'] names no class on any row (all empty / NA), so every row is "
            "unlabelled",
            source,
        )


def from_anndata(
    adata,
    source: str = "paired.h5ad",
    image_size: int | None = None,
    *,
    crops=None,
    masks=None,
    sparse: bool = False,
    expect_labels: bool | None = None,
) -> PairedTensors:
    """Convert a paired AnnData (see docs/artifacts.md, ``pair``) to tensors.

    A row whose expression holds unusable values (NaN / inf in X or
    ``layers['counts']``, a negative count) loses its profile: its X and counts are
    zeroed and it becomes a row without one (``has_expression`` False, its crop kept;
    rows stay where they are, so split.csv and latent.h5ad keep the table's rows), with a
    WARNING naming how many and the first cell ids; more than
    :data:`BAD_PROFILES_MAX_SHARE` of the profiles is refused. ``obs['has_image']`` /
    ``obs['has_expression']`` of ``adata`` are set to the flags as read (bool, skipped
    profiles False) where they differ, so tables written from this obs agree.

    Parameters
    ----------
    adata : anndata.AnnData
    source : str
        Name used in error messages.
    image_size : int, optional
        Resize crops (area) and masks (area >= 0.5: on their crops) to this side, px.
    crops, masks : vae.store.RowStore, optional
        Crops (N, 3, S, S) and masks (N, 1, S, S) kept on disk (data larger than
        memory); ``obsm`` is then not read and ``image_size`` must be None (the
        store is written at the size wanted).
    sparse : bool
        Keep X and counts as CSR (:class:`vae.store.SparseRows`), made dense one
        batch at a time; same values.
    expect_labels : bool, optional
        Warn when ``obs['label']`` is missing or names no class (training unlabelled).
        None: for a table stage=pair wrote (``obs['pair_mode']`` / ``uns['pair']``),
        not for a query.

    Raises
    ------
    PairedDataError
        Naming ``source`` and the missing or malformed field: no row at all, a flag
        that is not true/false, too many unusable profiles.
    """
    n, g = adata.shape
    _check_rows(adata, source)
    if crops is not None:
        return _from_parts(adata, source, crops, masks, sparse, expect_labels)
    for key in ("crops", "masks"):
        if key not in adata.obsm:
            raise PairedDataError(f"{source}: obsm['{key}'] is missing")
    crops = np.asarray(adata.obsm["crops"])
    masks = np.asarray(adata.obsm["masks"])
    check_crop_arrays(crops.shape, crops.dtype, masks.shape, source, n)
    has_image, has_expr = _modality_flags(adata, source)
    # an AnnData without X (0 genes, e.g. written by hand for images alone) has none to read
    x = (_dense(adata.X) if adata.X is not None else np.zeros((n, g))).astype(np.float32)
    has_counts = "counts" in adata.layers and bool(adata.uns.get(HAS_COUNTS, True))
    counts = _dense(adata.layers["counts"]).astype(np.float32) if has_counts else None
    # NaN passed the "< 0" test (audit: a NaN training row stopped at epoch 1 with
    # "Lower trainer.lr"; NaN only in test rows finished silently); one bad cell of 555
    # then refused the whole table (audit): now its profile is skipped
    zero, has_expr = _skip_bad_profiles(
        _bad_rows(x, counts), has_expr, has_image, adata.obs_names, source
    )
    if zero.any():  # astype made copies: adata keeps its values
        x[zero] = 0
        if counts is not None:
            counts[zero] = 0
    _write_flags(adata, has_image, has_expr)
    _warn_unlabelled(adata, source, expect_labels)
    if counts is not None:
        library = counts.sum(1)
    else:
        library = np.expm1(x).sum(1)
    library = np.where(has_expr & (library > 0), library, 1.0).astype(np.float32)
    norm = np.expm1(x[has_expr]).sum(1) if has_expr.any() else np.array([1e4])
    norm_total = float(np.median(norm)) if norm.size and np.median(norm) > 0 else 1e4

    names, codes = _label_codes(adata.obs, n)

    t_crops = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).contiguous()
    t_masks = torch.from_numpy(masks.astype(np.uint8)).unsqueeze(1).contiguous()
    if image_size is not None and image_size != t_crops.shape[-1]:
        t_crops, t_masks = _resize(t_crops, t_masks, image_size)
    x_t = torch.from_numpy(x)
    c_t = torch.from_numpy(counts) if counts is not None else None
    out = _tensors(
        adata, t_crops, t_masks, x_t, c_t, library, has_image, has_expr, names, codes, norm_total
    )
    if GRANULE_CENTRES in adata.obsm:
        out.granules = _granule_counts(
            np.asarray(adata.obsm[GRANULE_CENTRES]), t_crops.shape[-1], source
        )
        if GRANULE_OD in adata.obsm:
            od = np.asarray(adata.obsm[GRANULE_OD], dtype=np.float32)
            if od.shape != (n, 3):
                raise PairedDataError(
                    f"{source}: obsm['{GRANULE_OD}'] should be (N, 3), got {od.shape}"
                )
            out.granule_od = torch.from_numpy(np.ascontiguousarray(od))
    return out


def _granule_counts(centres: np.ndarray, size: int, source: str) -> torch.Tensor:
    """``obsm['granule_centres']`` (N, S, S) counts -> (N, 1, size, size) uint8 counts.

    ``stage=pair`` finds granules on the crop at the resolution it was cut
    (``pair.granule_centres``), where they are resolved; a model of another crop size
    gets each centre moved to the pixel it falls in (counts add)."""
    if centres.ndim != 3 or centres.shape[1] != centres.shape[2]:
        raise PairedDataError(
            f"{source}: obsm['{GRANULE_CENTRES}'] should be (N, S, S) counts, got {centres.shape}"
        )
    s = centres.shape[-1]
    if s == size:
        return torch.from_numpy(np.ascontiguousarray(centres, dtype=np.uint8)).unsqueeze(1)
    out = np.zeros((centres.shape[0], size, size), dtype=np.uint8)
    for k in range(centres.shape[0]):  # a row at a time: no N x S x S int64
        r, c = np.nonzero(centres[k])
        out[k] = centres_on_grid(r, c, s, size, centres[k, r, c])
    return torch.from_numpy(out).unsqueeze(1)


def centres_on_grid(
    rows: np.ndarray, cols: np.ndarray, side: int, size: int, counts: np.ndarray | None = None
) -> np.ndarray:
    """Points of a ``side`` px crop counted on the ``size`` px grid of the resized crop.

    A point at (r, c) lands in pixel ``floor((r + 0.5) * size / side)``, the pixel of
    the whole crop resized that covers it; points on one pixel add (``counts`` each,
    default 1), capped at 255.

    Parameters
    ----------
    rows, cols : (k,) int pixel coordinates in the ``side`` px crop
    side, size : the crop's side and the grid's, px
    counts : (k,) int, optional

    Returns
    -------
    (size, size) uint8
    """
    f = size / side
    grid = np.zeros((size, size), dtype=np.int64)
    at = (
        np.minimum((np.asarray(rows) + 0.5) * f, size - 1).astype(int),
        np.minimum((np.asarray(cols) + 0.5) * f, size - 1).astype(int),
    )
    np.add.at(grid, at, 1 if counts is None else np.asarray(counts, dtype=np.int64))
    return np.minimum(grid, 255).astype(np.uint8)


def obs_renames(uns) -> dict[str, str]:
    """``{expression obs column: its name in the paired table}`` that ``stage=pair``
    recorded (``uns[OBS_RENAMED]``, JSON); {} for a table without the record."""
    import json

    from vae.inputs.schema import OBS_RENAMED

    raw = uns.get(OBS_RENAMED) if uns is not None else None
    try:
        out = json.loads(str(raw)) if raw is not None else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in out.items()} if isinstance(out, dict) else {}


def batch_column(key: str, renamed: dict[str, str] | None = None) -> str:
    """The column of a paired (or latent) table holding the expression file's column
    ``key``: ``stage=pair`` carries an expression column whose name the table already uses
    (``specimen``, ``maturation``, ``split``...) under another name, which it records
    (:func:`obs_renames`); ``vae.batch_key=specimen`` means the expression file's
    ``specimen``. Without a record (a query file, an older table): ``key`` itself."""
    return (renamed or {}).get(key, key)


def batch_values(
    obs: pd.DataFrame, key: str, source: str, renamed: dict[str, str] | None = None
) -> np.ndarray:
    """(N,) object: each row's expression batch from ``obs[key]`` (the column
    :func:`batch_column` names) as text, None where unknown (NaN / None / "" / "nan", as
    for labels; :func:`vae.inputs.schema.batch_text`, the reading ``stage=expression``
    shares). Whole-number floats are written as integers and text is stripped, so a
    patient id 7 read back as 7.0 (a column with gaps) or "7 " is still batch "7".

    Raises
    ------
    PairedDataError
        When ``obs`` has no column ``key``, naming ``source`` and the columns it has.
    """
    col = batch_column(key, renamed)
    if col not in obs:
        cols = ", ".join(map(str, obs.columns)) or "none"
        raise PairedDataError(
            f"{source}: obs['{col}'] (vae.batch_key={key}) is missing; its columns: {cols}"
        )
    return batch_text(obs[col].astype(object).to_numpy())


def assign_batches(
    data: PairedTensors,
    obs: pd.DataFrame,
    key: str,
    source: str,
    names: list[str] | None = None,
    renamed: dict[str, str] | None = None,
) -> list[str]:
    """Fill ``data.batch`` / ``data.batch_names`` from ``obs[key]``.

    Parameters
    ----------
    data : PairedTensors
        The table's tensors (rows in ``obs`` order); changed in place.
    obs : pandas.DataFrame
        The paired table's obs.
    key : str
        The batch column (``vae.batch_key``).
    source : str
        File name for messages.
    names : list of str, optional
        The batches a trained model knows (``VAEArgs.batch_names``): rows of any other
        batch get -1 (unknown: decoded as the average batch). None: the sorted batches
        of the rows with a profile (training).
    renamed : dict, optional
        ``stage=pair``'s record of renamed expression columns (:func:`obs_renames`).

    Returns
    -------
    list of str
        The batch names in code order (``data.batch_names``).

    Raises
    ------
    PairedDataError
        The column is missing, or (training) a row with a profile has no batch.
    """
    values = batch_values(obs, key, source, renamed)
    has_expr = data.has_expression.cpu().numpy().astype(bool)
    where = f"{source}: obs['{batch_column(key, renamed)}'] (vae.batch_key={key})"
    codes, names = _row_codes(values, has_expr, names, data.obs_names, where, "profile", "batch")
    data.batch = torch.from_numpy(codes)
    data.batch_names = names
    return data.batch_names


def _row_codes(
    values: np.ndarray,
    present: np.ndarray,
    names: list[str] | None,
    obs_names,
    where: str,
    row_kind: str,
    value_kind: str,
) -> tuple[np.ndarray, list[str]]:
    """Each row's code into ``names`` (-1: absent modality, no value or a value not in
    ``names``) and the names; ``names`` None (training): the sorted values of the
    ``present`` rows, every one of which must have a value (else a PairedDataError that
    starts with ``where`` and names the first such row)."""
    if names is None:
        missing = present & np.array([v is None for v in values], dtype=bool)
        if missing.any():
            first = str(np.asarray(obs_names, dtype=object)[missing][0])
            raise PairedDataError(
                f"{where} is empty for {int(missing.sum())} rows with a {row_kind} (first: "
                f"{first!r}); give every {row_kind} its {value_kind}"
            )
        names = sorted({str(v) for v in values[present]})
    lookup = {n: i for i, n in enumerate(names)}
    codes = np.array(
        [lookup.get(v, -1) if (p and v is not None) else -1 for v, p in zip(values, present)],
        dtype=np.int64,
    )
    return codes, list(names)


def assign_image_batches(
    data: PairedTensors,
    obs: pd.DataFrame,
    key: str,
    source: str,
    names: list[str] | None = None,
) -> list[str]:
    """Fill ``data.image_batch`` / ``data.image_batch_names`` from ``obs[key]``.

    The image counterpart of :func:`assign_batches`: each crop's source (microscope,
    stain, scanner; ``image_source`` of ``stage=pair``), read the same way (text,
    whole-number floats as integers, blanks unknown).

    Parameters
    ----------
    data : PairedTensors
        The table's tensors (rows in ``obs`` order); changed in place.
    obs : pandas.DataFrame
        The paired table's obs.
    key : str
        The source column (``vae.image_batch_key``).
    source : str
        File name for messages.
    names : list of str, optional
        The sources a trained model knows (``VAEArgs.image_batch_names``): crops of any
        other source get -1 (drawn in the average of the sources). None: the sorted
        sources of the rows with a crop (training).

    Returns
    -------
    list of str
        The source names in code order (``data.image_batch_names``).

    Raises
    ------
    PairedDataError
        The column is missing, or (training) a row with a crop has no source.
    """
    if key not in obs:
        cols = ", ".join(map(str, obs.columns)) or "none"
        raise PairedDataError(
            f"{source}: obs['{key}'] (vae.image_batch_key={key}) is missing; its columns: {cols}"
        )
    values = batch_text(obs[key].astype(object).to_numpy())
    has_img = data.has_image.cpu().numpy().astype(bool)
    where = f"{source}: obs['{key}'] (vae.image_batch_key={key})"
    codes, names = _row_codes(values, has_img, names, data.obs_names, where, "crop", "source")
    data.image_batch = torch.from_numpy(codes)
    data.image_batch_names = names
    return data.image_batch_names


def _label_codes(obs: pd.DataFrame, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted label names and each row's code; NaN / None / "" / "nan" -> ``"NA"``."""
    if "label" in obs:
        lab = obs["label"].astype(object).to_numpy()
        lab = np.where(known_labels(lab), lab.astype(str), UNKNOWN_LABEL)
    else:
        lab = np.full(n, UNKNOWN_LABEL)
    return np.unique(lab, return_inverse=True)


def _bad_rows(x, counts) -> dict[str, np.ndarray]:
    """``{what is wrong: (N,) bool rows}`` of X and counts (dense or CSR; empty: none)."""
    n = x.shape[0]

    def rows(m, bad_values) -> np.ndarray:
        if not hasattr(m, "indptr"):  # dense: (N, G) bool
            return bad_values.any(1)
        out = np.zeros(n, bool)  # CSR: the row of each stored value
        out[np.repeat(np.arange(n), np.diff(m.indptr))[bad_values]] = True
        return out

    def values(m) -> np.ndarray:
        return m.data if hasattr(m, "indptr") else m

    out = {}
    fin = np.isfinite(values(x))
    if not fin.all():
        out["X holds non-finite values"] = rows(x, ~fin)
    if counts is not None:
        fin = np.isfinite(values(counts))
        if not fin.all():
            out["layers['counts'] holds non-finite values"] = rows(counts, ~fin)
        neg = values(counts) < 0  # NaN is not < 0: counted above
        if neg.any():
            out["layers['counts'] holds negative values"] = rows(counts, neg)
    return out


def _from_parts(
    adata, source: str, crops, masks, sparse: bool, expect_labels: bool | None = None
) -> PairedTensors:
    """:func:`from_anndata` with crops and masks given (on disk), X / counts as CSR.

    The same checks and derived fields as the in-memory path, computed on the
    sparse matrices (row sums of CSR: equal to the dense sums up to float32
    rounding order).
    """
    import scipy.sparse as sp

    from vae.store import SparseRows

    n, g = adata.shape
    if crops.shape[0] != n or masks.shape[0] != n or masks.shape[2:] != crops.shape[2:]:
        raise PairedDataError(
            f"{source}: {crops.shape[0]} stored crops / {masks.shape[0]} masks for {n} rows"
        )
    has_image, has_expr = _modality_flags(adata, source)

    def csr(m) -> sp.csr_matrix:
        return sp.csr_matrix(m if m is not None else (n, g), dtype=np.float32)

    x = csr(adata.X)
    has_counts = "counts" in adata.layers and bool(adata.uns.get(HAS_COUNTS, True))
    counts = csr(adata.layers["counts"]) if has_counts else None
    zero, has_expr = _skip_bad_profiles(
        _bad_rows(x, counts), has_expr, has_image, adata.obs_names, source
    )
    if zero.any():  # csr_matrix may share adata's arrays: zeroed on copies
        x, counts = _zero_rows(x, zero), _zero_rows(counts, zero)
    _write_flags(adata, has_image, has_expr)
    _warn_unlabelled(adata, source, expect_labels)
    # expm1(0) = 0: the same pattern; the structure is shared, only the values copied
    ex = sp.csr_matrix((np.expm1(x.data), x.indices, x.indptr), shape=x.shape)
    ex_sums = np.asarray(ex.sum(1), np.float32).ravel()
    del ex
    library = np.asarray(counts.sum(1), np.float32).ravel() if counts is not None else ex_sums
    library = np.where(has_expr & (library > 0), library, 1.0).astype(np.float32)
    norm = ex_sums[has_expr] if has_expr.any() else np.array([1e4])
    norm_total = float(np.median(norm)) if norm.size and np.median(norm) > 0 else 1e4
    names, codes = _label_codes(adata.obs, n)
    if not sparse:
        xs, cs = torch.from_numpy(x.toarray()), None
        if counts is not None:
            cs = torch.from_numpy(counts.toarray())
    else:
        xs, cs = SparseRows(x), SparseRows(counts) if counts is not None else None
    return _tensors(
        adata, crops, masks, xs, cs, library, has_image, has_expr, names, codes, norm_total
    )


def _zero_rows(m, rows: np.ndarray):
    """A copy of CSR ``m`` (or None) without values on ``rows`` (bool)."""
    if m is None:
        return None
    m = m.copy()
    m.data[np.repeat(rows, np.diff(m.indptr))] = 0
    m.eliminate_zeros()
    return m


def _resize(crops: torch.Tensor, masks: torch.Tensor, size: int, chunk: int = 512):
    """(N, 3, S, S) uint8 crops and (N, 1, S, S) masks at ``size`` (area average).

    A mask pixel is the cell where at least half its area is: the mask stays on the
    resized crop. Torch's ``nearest`` sampled each output pixel's top-left source pixel,
    which moved a downsized mask (1 - 1/f) / 2 px right and down of its crop (0.44 px at
    8x; a cell's outline put back on its smear from a 16 px mask missed by 3.5 source px)."""
    out_c, out_m = [], []
    for i in range(0, crops.shape[0], chunk):
        c = crops[i : i + chunk].float()
        out_c.append(F.interpolate(c, size=(size, size), mode="area").round().clamp(0, 255).byte())
        m = masks[i : i + chunk].float()
        out_m.append((F.interpolate(m, size=(size, size), mode="area") >= 0.5).byte())
    return torch.cat(out_c), torch.cat(out_m)


def load_paired(path: str | Path, image_size: int | None = None) -> PairedTensors:
    """Read ``paired.h5ad`` into :class:`PairedTensors` (see :func:`from_anndata`)."""
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise PairedDataError(f"{path}: no such file")
    from segmentation.io import blank_as_read

    return from_anndata(blank_as_read(ad.read_h5ad(path)), str(path), image_size)


def _no_group(g: object) -> bool:
    """Whether a group value is missing: None, ``""``, NaN, ``pd.NA`` or ``NaT``."""
    if g is None or (isinstance(g, str) and g == ""):
        return True
    return bool(pd.api.types.is_scalar(g) and pd.isna(g))


def stratified_split(
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Seeded train/val/test assignment, stratified by label, optionally by group.

    Within each label, units are shuffled by ``seed`` and the first
    ``round(n * test_fraction)`` go to test, the next ``round(n * val_fraction)``
    to val (each at least 1 when the label has >= 3 units and the fraction is > 0).
    A unit is a row, or with ``groups`` every row of one group (a specimen: all of
    its rows land in one split, labelled by the group's most common label), so two
    views of the same cell never sit on both sides of a test. Rows whose group is
    empty (``""``, None, NaN, ``pd.NA``: an empty cell read by pandas) are their own
    group; with only such rows the result is the same as without ``groups``.

    Parameters
    ----------
    labels : (N,) label codes
    val_fraction, test_fraction : float, shares of the units
    seed : int
    groups : (N,) str, optional

    Returns
    -------
    (N,) array of ``"train"`` | ``"val"`` | ``"test"``.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: need both >= 0, sum < 1"
        )
    labels = np.asarray(labels)
    n = labels.shape[0]
    if n == 0:  # no unit to place (the crosstab of groups had no row to argmax)
        return np.array([], dtype=str)
    if groups is None:
        unit = np.arange(n)
    else:
        keys = [f"r:{i}" if _no_group(g) else f"g:{g}" for i, g in enumerate(groups)]
        # units numbered in order of first appearance: singletons keep the row order
        unit = pd.factorize(pd.Index(keys))[0]
    n_units = int(unit.max()) + 1 if n else 0
    if groups is None:
        unit_label = labels
    else:  # the most common label of each group (ties: the smallest)
        counts = pd.crosstab(unit, labels)
        unit_label = counts.columns.to_numpy()[counts.to_numpy().argmax(axis=1)]
    out_unit = np.full(n_units, "train", dtype=object)
    rng = np.random.default_rng(seed)
    for lab in sorted(set(unit_label.tolist()), key=str):
        idx = np.flatnonzero(unit_label == lab)
        idx = idx[rng.permutation(idx.size)]
        n_test = round(idx.size * test_fraction)
        n_val = round(idx.size * val_fraction)
        if idx.size >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        out_unit[idx[:n_test]] = "test"
        out_unit[idx[n_test : n_test + n_val]] = "val"
    return out_unit[unit].astype(str)


def match_split(
    obs: pd.DataFrame,
    ref: pd.DataFrame,
    source: str = "paired table",
    ref_source: str = "latent.h5ad",
) -> np.ndarray:
    """Each row's split in another run over the same crops and profiles.

    A row with a crop takes the split of that crop in ``ref`` (``image_ref``); a row
    without one takes the split of its profile (``expression_ref``, the first ``ref``
    row that holds it). So a paired table rebuilt with other labels or other draws
    keeps its test cells.

    Parameters
    ----------
    obs : (N rows) obs of the paired table: ``has_image``, ``image_ref``, ``expression_ref``.
    ref : obs of the other run's ``latent.h5ad``: the same columns and ``split``.
    source, ref_source : the two files, named in an error.

    Returns
    -------
    (N,) object array of ``"train"`` | ``"val"`` | ``"test"``, ``""`` where ``ref`` knows
    neither the crop nor the profile.

    Raises
    ------
    KeyError
        A column is missing.
    PairedDataError
        A ``has_image`` that is not true / false (:func:`parse_flag`: the text "False"
        read as True).
    """
    rs = ref["split"].astype(str).to_numpy()
    r_img = parse_flag(ref[HAS_IMAGE], ref_source, HAS_IMAGE, ref.index)
    by_crop = dict(zip(ref["image_ref"].astype(str).to_numpy()[r_img], rs[r_img]))
    by_profile: dict[str, str] = {}
    for e, s in zip(ref["expression_ref"].astype(str).to_numpy(), rs):
        if e and e not in by_profile:
            by_profile[e] = s
    has = parse_flag(obs[HAS_IMAGE], source, HAS_IMAGE, obs.index)
    crop = obs["image_ref"].astype(str).to_numpy()
    prof = obs["expression_ref"].astype(str).to_numpy()
    return np.array(
        [by_crop.get(c, "") if h else by_profile.get(e, "") for h, c, e in zip(has, crop, prof)],
        dtype=object,
    )


class _Rows(torch.utils.data.Dataset):
    """Dataset whose items are whole batches (index arrays) of raw tensors."""

    def __init__(self, data: PairedTensors, images: bool = True):
        self.d = data
        self.images = images

    def __len__(self) -> int:
        return self.d.n

    def __getitem__(self, idx) -> dict[str, torch.Tensor]:
        return raw_batch(self.d, torch.as_tensor(idx, dtype=torch.long), self.images)


def raw_batch(d: PairedTensors, idx: torch.Tensor, images: bool = True) -> dict[str, torch.Tensor]:
    """Index rows ``idx`` out of the in-memory tensors (still uint8 images).

    ``images=False`` leaves crops and masks out (a data set without image rows).
    """
    out = {
        "x": d.x.index_select(0, idx),
        "library": d.library.index_select(0, idx),
        "has_image": d.has_image.index_select(0, idx),
        "has_expression": d.has_expression.index_select(0, idx),
        "labels": d.labels.index_select(0, idx),
        "index": idx,
    }
    if images:
        out["crops"] = d.crops.index_select(0, idx)
        out["masks"] = d.masks.index_select(0, idx)
        if d.granules is not None:  # the crops' granule centres, read with them
            out["granules"] = d.granules.index_select(0, idx)
        if d.granule_od is not None:  # and their stain where they were found
            out["granule_od"] = d.granule_od.index_select(0, idx)
        if d.nucleus is not None:  # the crops' nucleus masks, read with them
            out["nucleus"] = d.nucleus.index_select(0, idx)
        if d.lobes is not None:  # and their lobe counts
            out["lobes"] = d.lobes.index_select(0, idx)
        if d.diameter is not None:  # and the cells' sizes, which the crops' framing hides
            out["diameter"] = d.diameter.index_select(0, idx)
    if d.batch is not None:  # the profiles' batches, for the expression decoder
        out["batch"] = d.batch.index_select(0, idx)
    if d.image_batch is not None:  # the crops' sources, for the image decoder
        out["image_batch"] = d.image_batch.index_select(0, idx)
    if d.counts is not None:
        out["counts"] = d.counts.index_select(0, idx)
    if d.log_factorial is not None:
        out["log_factorial"] = d.log_factorial.index_select(0, idx)
    return out


def crop_targets(
    crops: torch.Tensor,
    masks: torch.Tensor,
    has_image: torch.Tensor,
    granules: bool = True,
    nucleus: bool = True,
    params=None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Granule centres and nucleus masks of every crop, as the analyses measure them.

    One pass of :mod:`vae.analysis.granules` per crop (the nucleus is segmented
    once and serves both): the granule centres are the blobs of ``measure_cell``
    (peaks of the nucleus-cancelling top-hat over the whole cell, nucleus included,
    the cell rim excluded) and the nucleus mask is ``cell_nucleus``, the mask the
    lobe counter splits. The decoder's granule and nucleus layers thus learn what
    ``stage=traverse`` and ``scripts/image_branch_check.py`` measure on decoded cells.

    Parameters
    ----------
    crops : (N, 3, S, S) uint8
    masks : (N, 1, S, S) uint8 {0, 1}
    has_image : (N,) bool; rows without an image (or a cell under 16 px) get empty maps
    granules, nucleus : which of the two to compute
    params : vae.analysis.granules.GranuleParams, optional

    Returns
    -------
    granule centres (N, 1, S, S) uint8 with 1 at each centre, or None;
    nucleus masks (N, 1, S, S) uint8 {0, 1}, or None
    """
    from vae.analysis.granules import cell_nucleus, measure_cell

    n, _, s, _ = crops.shape
    gran = np.zeros((n, 1, s, s), dtype=np.uint8) if granules else None
    nuc = np.zeros((n, 1, s, s), dtype=np.uint8) if nucleus else None
    for i in np.flatnonzero(has_image.numpy()):
        m = masks[i, 0].numpy().astype(bool)
        if m.sum() < 16:
            continue
        img = crops[i].permute(1, 2, 0).numpy()
        if gran is None:  # the nucleus alone: no granule search
            nuc[i, 0] = cell_nucleus(img, m, params)
            continue
        meas = measure_cell(img, m, params, grain=False)  # blobs and nucleus only
        if nuc is not None:
            nuc[i, 0] = meas.nucleus
        if len(meas.blobs):
            rc = np.clip(np.rint(meas.blobs[:, :2]).astype(int), 0, s - 1)
            gran[i, 0, rc[:, 0], rc[:, 1]] = 1
    as_t = lambda a: torch.from_numpy(a) if a is not None else None  # noqa: E731
    return as_t(gran), as_t(nuc)


def granule_centres(
    crops: torch.Tensor, masks: torch.Tensor, has_image: torch.Tensor, params=None
) -> torch.Tensor:
    """Granule centres of every crop (N, 1, S, S) uint8, as the analyses count them.

    See :func:`crop_targets` (same arguments).
    """
    return crop_targets(crops, masks, has_image, True, False, params)[0]


def nucleus_masks(
    crops: torch.Tensor, masks: torch.Tensor, has_image: torch.Tensor, params=None
) -> torch.Tensor:
    """Nucleus mask of every crop (N, 1, S, S) uint8 {0, 1}: the lobe counter's nucleus.

    See :func:`crop_targets` (same arguments).
    """
    return crop_targets(crops, masks, has_image, False, True, params)[1]


def augment_dihedral(
    img: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random element of the dihedral group (flips, rot90) per row, same for image and mask.

    Three independent coin flips per row (horizontal flip, vertical flip,
    transpose) reach all 8 symmetries of the square.

    Parameters
    ----------
    img : (B, C, S, S); mask : (B, 1, S, S)
    generator : torch.Generator on the CPU (seeded by the trainer)
    """
    b = img.shape[0]
    coins = torch.rand(b, 3, generator=generator).to(img.device) < 0.5  # (B, 3)
    both = torch.cat([img, mask.to(img.dtype)], dim=1)  # (B, C+1, S, S)
    sel = coins[:, 0].view(-1, 1, 1, 1)
    both = torch.where(sel, both.flip(-1), both)
    sel = coins[:, 1].view(-1, 1, 1, 1)
    both = torch.where(sel, both.flip(-2), both)
    sel = coins[:, 2].view(-1, 1, 1, 1)
    both = torch.where(sel, both.transpose(-1, -2), both)
    return both[:, :-1], both[:, -1:].to(mask.dtype)


def augment_rotate(
    img: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    scale: float = 0.1,
    points: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random rotation by any angle and a small zoom per row, about the crop centre.

    A cell on a smear has no orientation, and the dihedral group alone leaves
    the encoder free to learn the eight 90-degree poses as different cells;
    a continuous rotation plus a zoom of ``U(1 - scale, 1 + scale)`` (the
    spread of magnification left after the crop stage's rescaling) makes the
    image latent spend itself on what differs between cells, not on pose.

    Parameters
    ----------
    img : (B, C, S, S) float, bilinear resampling, zeros outside the crop
    mask : (B, 1, S, S) {0, 1}, resampled nearest (stays binary)
    generator : CPU generator (seeded by the trainer)
    scale : zoom half-range, 0 = rotation only
    points : (B, K, S, S) maps (granule centres, a count per pixel; nucleus mask),
        resampled nearest, so each centre moves with its pixels and keeps its count
        and a mask stays binary (a zoom in duplicates a centre now and then, a zoom
        out drops one)

    Returns
    -------
    img, mask, points (None when not given), same shapes and dtypes.
    """
    import torch.nn.functional as F

    b = img.shape[0]
    ang = (torch.rand(b, generator=generator) * 2 * torch.pi).to(img.device, img.dtype)
    zoom = (1 + scale * (torch.rand(b, generator=generator) * 2 - 1)).to(img.device, img.dtype)
    c, s = torch.cos(ang) / zoom, torch.sin(ang) / zoom  # output -> input sampling
    zero = torch.zeros_like(c)
    theta = torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1)], 1)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)  # (B, S, S, 2)
    out = F.grid_sample(img, grid, mode="bilinear", align_corners=False)
    m = F.grid_sample(mask.to(img.dtype), grid, mode="nearest", align_corners=False)
    pts = None
    if points is not None:
        pts = F.grid_sample(points.to(img.dtype), grid, mode="nearest", align_corners=False)
        pts = pts.to(points.dtype)
    return out, m.to(mask.dtype), pts


def augment_stain(img: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random stain and colour variation per row: HED jitter, brightness, contrast, saturation.

    HED jitter (Tellez et al. 2018): optical density ``-log(rgb)`` is projected on
    the haematoxylin / eosin / DAB stain vectors of scikit-image's ``rgb2hed``,
    each stain is scaled by ``U(1 - s, 1 + s)`` and shifted by ``U(-s, s) * 0.05``,
    then projected back. This is the variation between smears, stains and
    microscopes, which the latent should not spend itself on. Rows of zeros (no
    image) stay zero once the caller multiplies by the mask.

    Parameters
    ----------
    img : (B, 3, S, S) float in [0, 1]
    strength : s, 0 switches it off; 0.1-0.3 are sensible
    generator : CPU generator (seeded by the trainer)
    """
    if strength <= 0:
        return img
    from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

    b = img.shape[0]
    dev, dt = img.device, img.dtype

    def u(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * 2 - 1).to(dev, dt)  # U(-1, 1)

    to_hed = torch.as_tensor(hed_from_rgb, dtype=dt, device=dev)  # (3, 3)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=dt, device=dev)
    od = -torch.log(img.clamp_min(1e-6))  # (B, 3, S, S)
    hed = torch.einsum("bchw,cd->bdhw", od, to_hed)
    scale = 1 + strength * u(b, 3, 1, 1)
    shift = 0.05 * strength * u(b, 3, 1, 1)
    od = torch.einsum("bdhw,dc->bchw", hed * scale + shift, to_rgb).clamp_min(0)
    out = torch.exp(-od)
    grey = out.mean(dim=1, keepdim=True)
    out = grey + (out - grey) * (1 + strength * u(b, 1, 1, 1))  # saturation
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = mean + (out - mean) * (1 + 0.5 * strength * u(b, 1, 1, 1))  # contrast
    out = out + 0.1 * strength * u(b, 1, 1, 1)  # brightness
    return out.clamp(0, 1)


def to_batch(
    raw: dict[str, torch.Tensor],
    device: torch.device,
    augment: bool = False,
    generator: torch.Generator | None = None,
    non_blocking: bool = False,
    stain_jitter: float = 0.0,
    rotate: float = 0.0,
    stain_generator: torch.Generator | None = None,
) -> Batch:
    """Move a raw batch to ``device``, convert crops to float, optionally augment.

    ``augment`` applies the dihedral flips; ``rotate`` > 0 adds a rotation by
    any angle with a zoom of ``1 ± rotate`` (:func:`augment_rotate`); when
    ``stain_jitter`` > 0, the stain/colour jitter of :func:`augment_stain` with
    that strength, drawn from ``stain_generator`` when given (two calls whose stain
    generators are seeded alike give each row the same colours), else from
    ``generator``. A raw batch
    without crops (``raw_batch(images=False)``) gives ``image`` and ``mask`` None.
    """

    def mv(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=non_blocking)

    img = mask = gran = nuc = None
    if "crops" in raw:
        img = mv(raw["crops"]).float().div_(255.0)
        mask = mv(raw["masks"]).float()
        gran = mv(raw["granules"]).float() if "granules" in raw else None
        nuc = mv(raw["nucleus"]).float() if "nucleus" in raw else None
        if augment:
            if generator is None:
                raise ValueError("augment=True needs a generator")
            # granule centres and the nucleus mask move with the pixels: one stack, so
            # every map takes the same flips, rotation and zoom as the crop
            maps = [m for m in (gran, nuc) if m is not None]
            both, mask = augment_dihedral(torch.cat([img, *maps], 1), mask, generator)
            img, maps = both[:, :3], both[:, 3:]
            if rotate > 0:
                img, mask, rot = augment_rotate(
                    img, mask, generator, rotate, maps if maps.shape[1] else None
                )
                maps = rot if rot is not None else maps
            k = 0
            if gran is not None:
                gran, k = maps[:, :1], 1
            if nuc is not None:
                nuc = maps[:, k : k + 1]
            img = augment_stain(img, stain_jitter, stain_generator or generator)
        img = img * mask  # background excluded before it reaches anything
        if nuc is not None:
            nuc = nuc * mask  # the nucleus lies inside the cell
    lib = mv(raw["library"])
    return Batch(
        image=img,
        mask=mask,
        x=mv(raw["x"]),
        counts=mv(raw["counts"]) if "counts" in raw else None,
        log_factorial=mv(raw["log_factorial"]) if "log_factorial" in raw else None,
        library=lib,
        log_library=torch.log(lib.clamp_min(1.0)),
        has_image=mv(raw["has_image"]),
        has_expression=mv(raw["has_expression"]),
        labels=mv(raw["labels"]),
        index=raw["index"],
        granules=gran,
        nucleus=nuc,
        lobes=mv(raw["lobes"]) if "lobes" in raw else None,
        diameter=mv(raw["diameter"]) if "diameter" in raw else None,
        batch=mv(raw["batch"]) if "batch" in raw else None,
        granule_od=mv(raw["granule_od"]) if "granule_od" in raw else None,
        image_batch=mv(raw["image_batch"]) if "image_batch" in raw else None,
    )


def epoch_batches(
    indices: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """This rank's batches of one epoch: seeded permutation, then round-robin shards.

    With ``world_size > 1`` the permutation is padded (repeating rows) so each
    rank gets the same number of batches (DDP needs equal step counts).
    """
    idx = np.asarray(indices)
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        idx = idx[rng.permutation(idx.size)]
    if world_size > 1:
        per = math.ceil(idx.size / world_size)
        if idx.size and per * world_size > idx.size:
            # rows repeated cyclically: idx[:k] could not fill the shards with fewer rows
            # than half the ranks (1 row, 3 ranks: one rank got no batch and DDP waited
            # for it for good); the same padding as before wherever it could
            idx = np.resize(idx, per * world_size)
        idx = idx[rank::world_size]
    out = [idx[i : i + batch_size] for i in range(0, idx.size, batch_size)]
    if drop_last and len(out) > 1 and out[-1].size < batch_size:
        out = out[:-1]
    # a batch of one row breaks nothing here, but gives a useless InfoNCE; merge it
    if len(out) > 1 and out[-1].size == 1:
        out[-2] = np.concatenate([out[-2], out[-1]])
        out = out[:-1]
    return out


def eval_batches(
    indices: np.ndarray,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> list[tuple[np.ndarray, int]]:
    """This rank's evaluation batches, each as ``(rows, counted)``: only the first
    ``counted`` rows of ``rows`` count, so over all ranks every row of ``indices``
    counts exactly once.

    The shards are :func:`epoch_batches`' (unshuffled): padded by repeating rows so every
    rank runs the same number of forward passes (a DDP forward may be a collective). The
    repeats sit at the end of a rank's shard, so they are the tail of its last batch; a
    rank whose whole shard is repeats (fewer rows than ranks) gets one batch with
    ``counted`` 0, to run and weigh zero. Counting the repeats made a 2-process
    validation loss the mean with some rows twice (docs/reliability.md).
    """
    idx = np.asarray(indices)
    if idx.size == 0:
        return []
    # positions into idx, padded to a multiple of world_size: those >= idx.size repeat
    # the first rows, as epoch_batches pads
    pos = np.arange(math.ceil(idx.size / world_size) * world_size)
    out = epoch_batches(
        pos, batch_size, shuffle=False, seed=0, epoch=0, rank=rank, world_size=world_size
    )
    return [(idx[b % idx.size], int((b < idx.size).sum())) for b in out]


# whether the "pin_memory on CPU" note was logged (once per process, not per epoch)
_PIN_NOTED = False


def _pin_for(pin_memory: bool, device: torch.device | str | None) -> bool:
    """Whether to pin batches: only for a CUDA run.

    Pinned (page-locked) memory speeds the copy to a GPU and is no use on the CPU,
    where ``Tensor.pin_memory()`` needs the NVIDIA driver and fails without one.
    ``device`` None: the run is on CUDA when this process has put work on a GPU
    (``torch.cuda.is_initialized``: the model is moved there before the first batch).
    """
    global _PIN_NOTED
    if not pin_memory:
        return False
    if device is not None:
        cuda = torch.device(device).type == "cuda"
    else:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if not cuda and not _PIN_NOTED:
        _PIN_NOTED = True
        logging.getLogger(__name__).info(
            "hardware.pin_memory=true: not used, this run is on the CPU (pinned memory "
            "only speeds copies to a GPU)"
        )
    return cuda


def iterate(
    data: PairedTensors,
    batches: list[np.ndarray],
    num_workers: int = 0,
    pin_memory: bool = False,
    images: bool = True,
    *,
    device: torch.device | str | None = None,
    seed: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield raw batches in order, prefetched by workers when ``num_workers > 0``.

    ``images=False``: without crops and masks (see :func:`raw_batch`).

    Parameters
    ----------
    pin_memory
        ``hardware.pin_memory``: pin the batches, on a CUDA run only
        (:func:`_pin_for`; ``device`` is the run's device, None: detected).
    seed
        Seeds the DataLoader's own generator (None: ``torch.initial_seed()``, the
        run's seed once ``seed_everything`` ran). Without one, starting the loader's
        iterator draws its workers' base seed from the global torch RNG, which shifted
        every later random draw (dropout, the reparameterisation noise): training with
        ``hardware.num_workers > 0`` gave other results than with 0 for the same seed.
        The batches hold no randomness of their own (the rows and their order come
        from ``batches``), so the workers need no ``worker_init_fn``.
    """
    pin = _pin_for(pin_memory, device)
    if num_workers <= 0:
        for b in batches:
            r = raw_batch(data, torch.as_tensor(b, dtype=torch.long), images)
            if pin:
                r = {k: v.pin_memory() for k, v in r.items()}
            yield r
        return
    gen = torch.Generator()
    gen.manual_seed(torch.initial_seed() if seed is None else int(seed))
    loader = torch.utils.data.DataLoader(
        _Rows(data, images),
        batch_size=None,
        sampler=[b.tolist() for b in batches],
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=False,
        generator=gen,
    )
    yield from loader
