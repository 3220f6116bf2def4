"""Where a paired table lives while a stage reads it: memory, or disk and CSR.

One owner of the switch: ``hardware.stream_above_gib`` (pipeline/config.py).
Below it a table is read whole, as it always was (same tensors, same losses);
above it the crops are copied once into a chunked store in the stage folder
(``crops.zarr``) and read a batch at a time, and X / counts stay sparse
(vae/store.py, docs/performance.md).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline.runner import StageContext

log = logging.getLogger(__name__)


def streams(cfg: DictConfig, src) -> bool:
    """Whether ``src`` is streamed: its in-memory size over ``hardware.stream_above_gib``."""
    from vae.store import dense_bytes

    limit = cfg.hardware.stream_above_gib
    if limit is None:
        return False
    try:
        size = dense_bytes(src, cfg.vae.image_size)
    except Exception:  # noqa: BLE001 - unreadable: the in-memory reader names the fault
        return False
    if size <= float(limit) * 2**30:
        return False
    log.info(
        "%s: %.2f GiB in memory > hardware.stream_above_gib=%s: crops streamed from disk, "
        "expression kept sparse",
        src,
        size / 2**30,
        limit,
    )
    return True


def load_streamed(ctx: StageContext, src):
    """Crops from ``<stage dir>/crops.zarr`` (written by rank 0 once), X and counts as CSR."""
    from vae.store import paired_streamed

    store, size, dist = ctx.dir / "crops.zarr", ctx.cfg.vae.image_size, ctx.dist
    if dist.is_main:
        out = paired_streamed(src, store, size)
    dist.barrier()
    if not dist.is_main:
        out = paired_streamed(src, store, size)
    return out


EMBED_BLOCK_ROWS = 8192  # rows of a streamed stage=embed input embedded at a time


def h5ad_blocks(path, rows: int | None = None):
    """An h5ad input a block of rows at a time (stage=embed above the stream limit).

    Each block is an AnnData with the block's obs, X and layers (read once as CSR,
    vae.store.read_table) and its rows of ``obsm['crops']`` / ``obsm['masks']``
    (read from the file per block), so the whole table of crops never sits in
    memory.
    """
    import h5py

    from vae.store import read_table

    table = read_table(path)
    step = rows or EMBED_BLOCK_ROWS
    with h5py.File(path, "r") as f:
        arrays = {k: f[f"obsm/{k}"] for k in ("crops", "masks") if f"obsm/{k}" in f}
        for s in range(0, table.n_obs, step):
            block = table[s : s + step].copy()
            for k, arr in arrays.items():
                block.obsm[k] = arr[s : s + step]
            block.uns["rejects"] = []
            yield block
