"""Rows of a data set that outgrows memory: crops on disk, expression as CSR.

:class:`vae.data.PairedTensors` holds every crop in one uint8 tensor and the
expression densely; at 100k crops of 128 px that is ~4.9 GB of crops, and at
200k cells x 2000 genes 1.6 GB per dense matrix. The two classes here stand in
for those tensors wherever rows are read by index (``index_select(0, idx)``,
``shape``), so :func:`vae.data.raw_batch`, the trainer and
:func:`vae.infer.encode_dataset` work on them unchanged:

- :class:`RowStore`: an (N, C, S, S) uint8 zarr array chunked by blocks of
  ``chunk_rows`` rows (uncompressed); a batch reads the chunks that hold its
  rows (the rows sorted and deduplicated, then put back in the batch's order).
- :class:`SparseRows`: an (N, G) CSR matrix; only a batch is made dense.

:func:`build_crop_store` converts ``obsm['crops']`` / ``obsm['masks']`` of an
h5ad into such a store a block of rows at a time (never the whole array in
memory); :func:`paired_streamed` reads a ``paired.h5ad`` into a
:class:`~vae.data.PairedTensors` whose crops, masks and expression stay there.

Random rows cost one chunk read each (``chunk_rows`` rows read per row used);
8 rows per chunk keeps that at ~50 ms per 64-row batch of 128 px crops
(measured, page cache warm), far below one training step of the CNN.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from segmentation.io import blank_as_read
from vae.data import PairedDataError, PairedTensors, check_crop_arrays, parse_flag
from vae.inputs.schema import GRANULE_CENTRES, HAS_IMAGE

log = logging.getLogger(__name__)

CHUNK_ROWS = 8  # rows per chunk file: the read unit of a random batch
FORMAT = "vae-crop-store/1"


class StoreError(PairedDataError):
    """A crop store is missing, incomplete or damaged (the message names it).

    Raised while reading batches too, so the pipeline's runner reports it as a user
    error (one message, exit 2) whenever it happens.
    """


class RowStore:
    """(N, C, S, S) uint8 rows of a zarr array, read by index.

    Parameters
    ----------
    path : folder of the zarr group
    name : array in the group (``crops``, ``masks``, ``granules``, ``nucleus``)
    """

    def __init__(self, path: str | Path, name: str):
        import zarr

        self.path, self.name = Path(path), name
        try:
            group = zarr.open_group(str(self.path), mode="r")
            arr = group[name]
        except Exception as e:  # noqa: BLE001 - zarr raises many kinds; one message
            raise StoreError(
                f"{self.path}: cannot open array {name!r} of the crop store ({e}); "
                f"delete the folder to have it rebuilt"
            ) from e
        if arr.ndim != 4 or arr.dtype != np.uint8 or arr.shape[2] != arr.shape[3]:
            raise StoreError(
                f"{self.path}/{name}: must be (N, C, S, S) uint8; got {arr.shape} {arr.dtype}"
            )
        self._arr = arr
        self.shape = torch.Size(arr.shape)
        self.dtype = torch.uint8

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return int(self.shape[0])

    def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (B,) as a (B, C, S, S) uint8 tensor, in the order given.

        Raises
        ------
        PairedDataError
            Naming the store when a chunk is missing or unreadable.
        """
        if dim != 0:
            raise ValueError("RowStore reads rows only (dim=0)")
        rows = np.asarray(idx, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return torch.zeros((0, *self.shape[1:]), dtype=torch.uint8)
        # zarr reads each chunk once for a sorted, unique selection
        uniq, inverse = np.unique(rows, return_inverse=True)
        try:
            vals = self._arr.oindex[uniq]
        except Exception as e:  # noqa: BLE001
            raise StoreError(
                f"{self.path}/{self.name}: cannot read rows {uniq[:3].tolist()}... ({e}); "
                f"the store is damaged: delete it to have it rebuilt"
            ) from e
        if vals.shape[0] != uniq.size:
            raise StoreError(f"{self.path}/{self.name}: short read ({vals.shape})")
        return torch.from_numpy(np.ascontiguousarray(vals[inverse]))

    def __getitem__(self, idx) -> torch.Tensor:
        """Rows by int, slice, int array or bool mask (reads them all: keep it small)."""
        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        if isinstance(idx, int | np.integer):
            return self.index_select(0, torch.tensor([int(idx)]))[0]
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return self.index_select(0, torch.as_tensor(idx))

    def sum(self) -> torch.Tensor:
        """Sum of every value (int64), read by blocks."""
        return sum((b.sum(dtype=torch.int64) for _, b in self.blocks()), torch.tensor(0))

    def blocks(self, rows: int | None = None) -> Iterable[tuple[int, torch.Tensor]]:
        """``(start, (b, C, S, S) uint8)`` over all rows, ``rows`` at a time."""
        step = rows or max(self._arr.chunks[0], 1024)
        for s in range(0, len(self), step):
            yield s, torch.from_numpy(np.asarray(self._arr[s : s + step]))


class SparseRows:
    """(N, G) float32 CSR matrix read by rows; a batch is made dense, nothing else.

    Parameters
    ----------
    m : scipy.sparse matrix (converted to float32 CSR)
    """

    def __init__(self, m):
        import scipy.sparse as sp

        self.m = sp.csr_matrix(m, dtype=np.float32)
        self.m.sort_indices()
        self.shape = torch.Size(self.m.shape)
        self.dtype = torch.float32

    def __len__(self) -> int:
        return int(self.shape[0])

    def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (B,) as a dense (B, G) float32 tensor (the same values as dense)."""
        if dim != 0:
            raise ValueError("SparseRows reads rows only (dim=0)")
        rows = np.asarray(idx, dtype=np.int64).reshape(-1)
        return torch.from_numpy(self.m[rows].toarray())

    def row_sums(self) -> np.ndarray:
        """(N,) float32 sum of each row."""
        return np.asarray(self.m.sum(1), dtype=np.float32).ravel()


class ZeroRows:
    """(N, C, S, S) uint8 zeros that take no memory: the crops of a table without images.

    The trainer never reads crops when no row has an image; this stands in for
    them (the size still sets the model's image branch).
    """

    def __init__(self, n: int, channels: int, size: int):
        self.shape = torch.Size((n, channels, size, size))
        self.dtype = torch.uint8
        self.path = None

    def __len__(self) -> int:
        return int(self.shape[0])

    def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros((len(idx), *self.shape[1:]), dtype=torch.uint8)

    def __getitem__(self, idx) -> torch.Tensor:
        rows = np.arange(len(self))[idx.numpy() if isinstance(idx, torch.Tensor) else idx]
        return self.index_select(0, np.atleast_1d(rows))

    def blocks(self, rows: int | None = None) -> Iterable[tuple[int, torch.Tensor]]:
        step = rows or 1024
        for s in range(0, len(self), step):
            yield s, self.index_select(0, np.arange(s, min(s + step, len(self))))


def is_streamed(t) -> bool:
    """True when ``t`` is read by rows on demand (:class:`RowStore`, :class:`ZeroRows`,
    :class:`SparseRows`), not an in-memory tensor."""
    return isinstance(t, RowStore | ZeroRows | SparseRows)


# ------------------------------------------------------------------ writing
def _chunk_rows(n: int, chunk_rows: int) -> int:
    return max(1, min(chunk_rows, n or 1))


def write_crop_store(
    path: str | Path,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    n: int,
    size: int,
    chunk_rows: int = CHUNK_ROWS,
    source: dict | None = None,
) -> Path:
    """Write crops and masks, a block of rows at a time, into a new crop store.

    Written into ``<path>.partial`` and renamed when complete, so a killed run
    never leaves a store that looks whole.

    Parameters
    ----------
    path : folder of the store (replaced if present)
    blocks : iterable of (crops (b, 3, S, S) uint8, masks (b, 1, S, S) uint8 {0, 1}),
        in row order, ``n`` rows in all
    n : number of rows; size : S, px
    chunk_rows : rows per chunk (the read unit of a random batch)
    source : identity of the file the store was made from (kept in its attributes)

    Returns
    -------
    the store's path
    """
    import zarr

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    g = zarr.open_group(str(tmp), mode="w")
    c = _chunk_rows(n, chunk_rows)
    arrs = {
        name: g.create_array(
            name,
            shape=(n, ch, size, size),
            chunks=(c, ch, size, size),
            dtype="uint8",
            compressors=None,
            fill_value=0,
        )
        for name, ch in (("crops", 3), ("masks", 1))
    }
    at = 0
    for crops, masks in blocks:
        b = crops.shape[0]
        if crops.shape[1:] != (3, size, size) or masks.shape[1:] != (1, size, size):
            raise ValueError(f"block of shape {crops.shape} / {masks.shape}; store is S={size}")
        arrs["crops"][at : at + b] = crops
        arrs["masks"][at : at + b] = masks
        at += b
    if at != n:
        raise ValueError(f"{at} rows written, {n} announced")
    g.attrs.update({"format": FORMAT, "n": n, "crop_size": size, "source": source})
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _source_id(h5ad: Path, image_size: int | None) -> dict:
    st = h5ad.stat()
    return {
        "file": str(h5ad.resolve()),
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "image_size": image_size,
    }


def store_is_current(path: str | Path, n: int, source: dict | None = None) -> bool:
    """True when ``path`` is a complete store of ``n`` rows (made from ``source`` if given)."""
    import zarr

    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # noqa: BLE001 - absent or unreadable: not current
        return False
    if attrs.get("format") != FORMAT or attrs.get("n") != n:
        return False
    return source is None or attrs.get("source") == source


def build_crop_store(
    h5ad: str | Path,
    path: str | Path,
    image_size: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
    block_rows: int = 4096,
) -> Path:
    """Copy ``obsm['crops']`` (N, S, S, 3) and ``obsm['masks']`` of ``h5ad`` into a store.

    Reused when the store already holds this file's crops (same size, mtime and
    ``image_size``); rebuilt otherwise. Crops are resized as
    :func:`vae.data.from_anndata` resizes them (area for crops, nearest for
    masks), so streamed and in-memory tensors hold the same values.

    Raises
    ------
    PairedDataError
        Naming ``h5ad`` when its crops or masks are missing or malformed.
    """
    import h5py

    from vae.data import _resize

    h5ad, path = Path(h5ad), Path(path)
    src = _source_id(h5ad, image_size)
    try:
        f = h5py.File(h5ad, "r")
    except OSError as e:
        raise PairedDataError(f"{h5ad}: cannot read ({e})") from e
    with f:
        for key in ("crops", "masks"):
            if f"obsm/{key}" not in f:
                raise PairedDataError(f"{h5ad}: obsm['{key}'] is missing")
        crops, masks = f["obsm/crops"], f["obsm/masks"]
        check_crop_arrays(crops.shape, crops.dtype, masks.shape, h5ad)
        n, s = int(crops.shape[0]), int(crops.shape[1])
        if store_is_current(path, n, src):
            log.info("crop store %s is current (%d rows)", path, n)
            return path
        size = image_size or s

        def blocks():
            for i in range(0, n, block_rows):
                c = torch.from_numpy(np.ascontiguousarray(crops[i : i + block_rows]))
                c = c.permute(0, 3, 1, 2).contiguous()
                m = torch.from_numpy(masks[i : i + block_rows].astype(np.uint8)).unsqueeze(1)
                if size != s:
                    c, m = _resize(c, m, size)
                yield c.numpy(), m.contiguous().numpy()

        log.info(
            "writing crop store %s (%d rows, %d px, %d rows per chunk)", path, n, size, chunk_rows
        )
        return write_crop_store(path, blocks(), n, size, chunk_rows, src)


def crop_target_store(
    crops: RowStore,
    masks: RowStore,
    has_image: torch.Tensor,
    granules: bool = True,
    nucleus: bool = True,
    params=None,
) -> tuple[RowStore | None, RowStore | None]:
    """Granule centres and nucleus masks of every stored crop (:func:`vae.data.crop_targets`),
    kept in the store.

    Computed a block of rows at a time and written as the store's ``granules`` /
    ``nucleus`` arrays; an array already complete is reused.

    Returns
    -------
    (granules, nucleus): RowStore each, or None for the one not asked for
    """
    import zarr

    from vae.data import crop_targets

    g = zarr.open_group(str(crops.path), mode="r+")
    want = {"granules": granules, "nucleus": nucleus}
    todo = [k for k, w in want.items() if w and not (k in g and g.attrs.get(f"{k}_complete"))]
    if todo:
        n, _, s, _ = crops.shape
        c = _chunk_rows(n, crops._arr.chunks[0])
        arrs = {
            k: g.create_array(
                k,
                shape=(n, 1, s, s),
                chunks=(c, 1, s, s),
                dtype="uint8",
                compressors=None,
                fill_value=0,
                overwrite=True,
            )
            for k in todo
        }
        for start, block in crops.blocks():
            stop = start + block.shape[0]
            m = masks.index_select(0, torch.arange(start, stop))
            gran, nuc = crop_targets(
                block, m, has_image[start:stop], "granules" in todo, "nucleus" in todo, params
            )
            for k, v in (("granules", gran), ("nucleus", nuc)):
                if k in arrs:
                    arrs[k][start:stop] = v.numpy()
        for k in todo:
            g.attrs[f"{k}_complete"] = True
    return tuple(RowStore(crops.path, k) if w else None for k, w in want.items())


def mask_pixels_mean(masks: RowStore, has_image: torch.Tensor) -> float:
    """Mean number of mask pixels over the rows with an image (float64, by blocks)."""
    tot, cnt = 0.0, 0
    has = has_image.numpy().astype(bool)
    for start, block in masks.blocks():
        sel = has[start : start + block.shape[0]]
        tot += float(block[torch.from_numpy(sel)].double().sum())
        cnt += int(sel.sum())
    return tot / max(cnt, 1)


# ------------------------------------------------------------------ reading
def read_table(h5ad: str | Path):
    """``h5ad`` as an AnnData with obs, var, uns, X and layers, but no obsm.

    X and layers stay sparse when stored sparse and are read as CSR a block of
    rows at a time when stored dense, so a table of 200k x 2000 never exists
    densely in memory.
    """
    import anndata as ad
    import h5py
    import scipy.sparse as sp
    from anndata.io import read_elem

    h5ad = Path(h5ad)
    if not h5ad.exists():
        raise PairedDataError(f"{h5ad}: no such file")

    def csr(node) -> sp.csr_matrix | None:
        if isinstance(node, h5py.Dataset):
            if node.ndim != 2:
                raise PairedDataError(f"{h5ad}: {node.name} must be 2-D; got {node.shape}")
            parts = [
                sp.csr_matrix(np.asarray(node[i : i + 8192], dtype=np.float32))
                for i in range(0, node.shape[0], 8192)
            ]
            return sp.vstack(parts, format="csr") if parts else sp.csr_matrix(node.shape)
        return sp.csr_matrix(read_elem(node), dtype=np.float32)

    try:
        with h5py.File(h5ad, "r") as f:
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
            uns = read_elem(f["uns"]) if "uns" in f else {}
            x = csr(f["X"]) if "X" in f else None
            layers = {k: csr(f["layers"][k]) for k in f.get("layers", {})}
    except PairedDataError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py / anndata raise many kinds
        raise PairedDataError(f"{h5ad}: cannot read ({type(e).__name__}: {e})") from e
    a = ad.AnnData(X=x, obs=obs, var=var, uns=uns, layers=layers or None)
    return a


def paired_streamed(
    h5ad: str | Path,
    store: str | Path,
    image_size: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
    build: bool = True,
) -> tuple[PairedTensors, object]:
    """``paired.h5ad`` as :class:`PairedTensors` whose rows stay on disk / sparse.

    Crops and masks are read from the crop store at ``store`` (built from
    ``h5ad``'s obsm when missing or stale and ``build``; a table without
    ``obsm['crops']`` uses the store as it is, e.g. one written by
    :func:`write_crop_store`); X and counts are kept as CSR.

    Returns
    -------
    (data, adata): adata is the table without obsm (obs, var, uns for the caller)

    Raises
    ------
    PairedDataError
        Naming the file or store at fault.
    """
    import h5py

    from vae.data import from_anndata

    h5ad, store = Path(h5ad), Path(store)
    # paired.h5ad's missing strings read as "" (the query blocks of h5ad_blocks stay as given)
    adata = blank_as_read(read_table(h5ad))
    with h5py.File(h5ad, "r") as f:
        has_obsm_crops = "obsm/crops" in f
        stored_size = int(f["obsm/crops"].shape[1]) if has_obsm_crops else None
        if f"obsm/{GRANULE_CENTRES}" in f:
            # not carried into the store (yet): the trainer finds them on the stored crops
            log.warning(
                "%s: obsm['granule_centres'] (pair.granule_centres) is not used when training "
                "streams the crops; the granule targets are found on the crops at model size",
                h5ad,
            )
    # read strictly: astype(bool) took a column of the text "False" for crops on every row
    no_image = (
        HAS_IMAGE in adata.obs
        and not parse_flag(adata.obs[HAS_IMAGE], str(h5ad), HAS_IMAGE, adata.obs_names).any()
    )
    if no_image:  # expression only: no crop is ever read, none is copied
        size = image_size or stored_size
        if size is None:
            raise PairedDataError(f"{h5ad}: no obsm['crops'] to take the crop size from")
        crops, masks = ZeroRows(adata.n_obs, 3, size), ZeroRows(adata.n_obs, 1, size)
        return from_anndata(adata, str(h5ad), None, crops=crops, masks=masks, sparse=True), adata
    if has_obsm_crops and build:
        build_crop_store(h5ad, store, image_size, chunk_rows)
    elif not store_is_current(store, adata.n_obs):
        raise StoreError(
            f"{store}: no complete crop store of {adata.n_obs} rows"
            + ("" if has_obsm_crops else f" (and {h5ad} holds no obsm['crops'] to build it)")
        )
    crops, masks = RowStore(store, "crops"), RowStore(store, "masks")
    if image_size is not None and crops.shape[-1] != image_size:
        raise StoreError(
            f"{store}: crops are {crops.shape[-1]} px, {image_size} px asked for; "
            f"delete the store to have it rebuilt"
        )
    data = from_anndata(adata, str(h5ad), None, crops=crops, masks=masks, sparse=True)
    return data, adata


def dense_bytes(h5ad: str | Path, image_size: int | None = None) -> int:
    """Bytes :func:`vae.data.from_anndata` would hold in memory for ``h5ad`` (from shapes only).

    Crops and masks as uint8, X (and counts) as dense float32, granule centres of
    ``pair.granule_centres`` as uint8.
    """
    import h5py

    with h5py.File(h5ad, "r") as f:
        total = 0
        n = 0
        if "obsm/crops" in f:
            n, s = f["obsm/crops"].shape[:2]
            s = image_size or s
            total += n * s * s * 4  # 3 crop channels + 1 mask
            if f"obsm/{GRANULE_CENTRES}" in f:
                total += n * s * s + n * 3 * 4  # a count per pixel; the stain (N, 3)
        if "X" in f:
            node = f["X"]
            shape = node.shape if hasattr(node, "shape") else tuple(node.attrs["shape"])
            total += int(np.prod(shape)) * 4 * (2 if "layers/counts" in f else 1)
    return int(total)
