"""Data larger than memory: crops in a chunked store, expression as CSR (vae/store.py).

The streamed tensors must give the trainer the same batches (rows and values) as
the in-memory ones, and the same loss; a damaged store must be named.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.hardware import DistInfo
from tests.helpers.vae_toy import assert_same_loss_terms, make_paired, tiny_model
from vae.data import (
    PairedDataError,
    epoch_batches,
    from_anndata,
    iterate,
    stratified_split,
    to_batch,
)
from vae.losses import LossWeights, per_value_weight
from vae.store import (
    RowStore,
    SparseRows,
    StoreError,
    ZeroRows,
    paired_streamed,
    read_table,
)
from vae.train import TrainArgs, forward_loss, train

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _paired_file(tmp_path, sparse_x: bool = True, **kw):
    a = make_paired(30, image_only=6, expression_only=9, **kw)
    if sparse_x:  # as a large table would be written: CSR X and counts
        a.X = sp.csr_matrix(a.X)
        a.layers["counts"] = sp.csr_matrix(a.layers["counts"])
    p = tmp_path / "paired.h5ad"
    a.write_h5ad(p)
    return p, a


def _same_raw(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_batches_equal_in_memory_batches(tmp_path, workers):
    p, a = _paired_file(tmp_path)
    mem = from_anndata(a, str(p))
    st, _ = paired_streamed(p, tmp_path / "store.zarr", chunk_rows=4)
    assert isinstance(st.crops, RowStore) and isinstance(st.x, SparseRows)
    assert isinstance(st.counts, SparseRows)
    assert (st.n, st.n_genes, st.crop_size) == (mem.n, mem.n_genes, mem.crop_size)
    assert torch.equal(st.has_image, mem.has_image) and torch.equal(st.labels, mem.labels)
    assert torch.allclose(st.library, mem.library, rtol=1e-6)
    assert st.norm_total == pytest.approx(mem.norm_total, rel=1e-6)
    # a shuffled epoch: rows spread over chunks, in random order, one batch of 1 merged
    batches = epoch_batches(np.arange(mem.n), 7, shuffle=True, seed=3, epoch=1)
    got = list(iterate(st, batches, num_workers=workers))
    want = list(iterate(mem, batches))
    assert len(got) == len(want) == len(batches)
    for g, w, b in zip(got, want, batches):
        assert g["index"].tolist() == b.tolist()
        _same_raw(g, w)


def test_a_repeated_row_in_a_batch_is_read_twice(tmp_path):
    p, a = _paired_file(tmp_path)
    mem = from_anndata(a, str(p))
    st, _ = paired_streamed(p, tmp_path / "store.zarr", chunk_rows=4)
    idx = torch.tensor([5, 1, 5, 40, 0])  # DDP pads an epoch by repeating rows
    assert torch.equal(st.crops.index_select(0, idx), mem.crops.index_select(0, idx))
    assert torch.equal(st.x.index_select(0, idx), mem.x.index_select(0, idx))


def test_resized_store_holds_the_in_memory_resize(tmp_path):
    p, a = _paired_file(tmp_path)
    mem = from_anndata(a, str(p), image_size=8)
    st, _ = paired_streamed(p, tmp_path / "store.zarr", image_size=8)
    idx = torch.arange(mem.n)
    assert torch.equal(st.crops.index_select(0, idx), mem.crops)
    assert torch.equal(st.masks.index_select(0, idx), mem.masks)


def test_store_is_reused_and_rebuilt_when_the_table_changes(tmp_path):
    p, a = _paired_file(tmp_path)
    store = tmp_path / "store.zarr"
    paired_streamed(p, store)
    stamp = (store / "zarr.json").stat().st_mtime_ns
    paired_streamed(p, store)
    assert (store / "zarr.json").stat().st_mtime_ns == stamp  # reused
    a.obsm["crops"] = 255 - a.obsm["crops"]
    a.write_h5ad(p)
    st, _ = paired_streamed(p, store)
    assert torch.equal(st.crops[[0]], torch.from_numpy(a.obsm["crops"][:1]).permute(0, 3, 1, 2))


@pytest.mark.parametrize("fusion", ["poe", "moe"])
def test_sparse_expression_and_stored_crops_give_the_same_loss_as_dense(tmp_path, fusion):
    p, a = _paired_file(tmp_path)
    mem = from_anndata(a, str(p))
    st, _ = paired_streamed(p, tmp_path / "store.zarr", chunk_rows=4)
    idx = torch.as_tensor(np.random.default_rng(0).permutation(mem.n)[:20])
    model = tiny_model(12, fusion)
    model.train()
    args = TrainArgs(weights=LossWeights(classify=1.0, align=1.0, align_mode="class"))
    terms = []
    for d in (mem, st):
        from vae.data import raw_batch

        b = to_batch(raw_batch(d, idx), torch.device("cpu"))
        torch.manual_seed(7)  # the same reparameterisation draws
        terms.append(forward_loss(model, b, beta=0.7, capacity=0.0, args=args, n_shared=4))
    s = assert_same_loss_terms(*terms)
    assert s["expression"] > 0 and s["image"] != 0
    assert per_value_weight(st, "image") == pytest.approx(per_value_weight(mem, "image"), 1e-6)


def test_training_streamed_matches_in_memory(tmp_path):
    """Two epochs, granule head on: same history as the in-memory run."""
    p, a = _paired_file(tmp_path)
    mem = from_anndata(a, str(p))
    st, _ = paired_streamed(p, tmp_path / "store.zarr", chunk_rows=4)
    split = stratified_split(mem.labels.numpy(), 0.2, 0.1, seed=0)
    args = TrainArgs(
        max_epochs=2,
        batch_size=8,
        kl_warmup_epochs=0,
        checkpoint_every_s=0,
        weights=LossWeights(granules=1.0, nucleus=1.0),
    )
    hist = []
    for name, d in (("mem", mem), ("st", st)):
        from vae.model import TwoBranchVAE

        base = tiny_model(12)
        torch.manual_seed(0)
        model = TwoBranchVAE(
            type(base.args)(
                **{
                    **base.args.__dict__,
                    "granule_head": True,
                    "nucleus_head": True,
                    "image_arch": "residual",
                }
            )
        )
        out = tmp_path / name
        out.mkdir()
        hist.append(train(model, d, split, args, CPU, out).history)
    assert isinstance(st.granules, RowStore)
    assert torch.equal(st.granules.index_select(0, torch.arange(st.n)), mem.granules)
    # the nucleus masks of the nucleus layer are kept in the store the same way
    assert isinstance(st.nucleus, RowStore)
    assert torch.equal(st.nucleus.index_select(0, torch.arange(st.n)), mem.nucleus)
    # (the toy discs are one colour, so their nucleus masks are empty: the nucleus
    # segmentation itself is tested on simulated cells in test_nucleus_layer.py)
    for h_mem, h_st in zip(*hist):
        for k, v in h_mem["val"].items():
            assert h_st["val"][k] == pytest.approx(v, rel=1e-5, abs=1e-5), k


def test_expression_only_table_copies_no_crop(tmp_path):
    a = make_paired(0, expression_only=20)
    a.X = sp.csr_matrix(a.X)
    p = tmp_path / "paired.h5ad"
    a.write_h5ad(p)
    st, _ = paired_streamed(p, tmp_path / "store.zarr")
    assert isinstance(st.crops, ZeroRows) and not (tmp_path / "store.zarr").exists()
    mem = from_anndata(a)
    idx = torch.arange(20)
    assert torch.equal(st.x.index_select(0, idx), mem.x)
    assert torch.equal(st.crops.index_select(0, idx), mem.crops)


def test_read_table_keeps_dense_x_sparse_and_skips_obsm(tmp_path):
    p, a = _paired_file(tmp_path, sparse_x=False)
    t = read_table(p)
    assert sp.issparse(t.X) and sp.issparse(t.layers["counts"]) and len(t.obsm) == 0
    assert np.array_equal(t.X.toarray(), a.X)


def test_damaged_store_names_the_store(tmp_path):
    p, _ = _paired_file(tmp_path)
    store = tmp_path / "store.zarr"
    st, _ = paired_streamed(p, store, chunk_rows=4)
    chunk = store / "crops" / "c" / "0" / "0" / "0" / "0"  # rows 0-3
    assert chunk.is_file()
    chunk.write_bytes(b"not a chunk")  # truncated file
    with pytest.raises(StoreError, match=str(store)):
        RowStore(store, "crops").index_select(0, torch.arange(8))
    shutil.rmtree(store / "masks")  # a store missing an array
    with pytest.raises(PairedDataError, match="store.zarr.*masks"):
        RowStore(store, "masks")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(PairedDataError, match="empty.zarr"):
        RowStore(tmp_path / "empty.zarr", "crops")
    # raised mid-training, the runner reports it as a user error (message, exit 2)
    from pipeline.guards import USER_ERRORS

    assert issubclass(StoreError, USER_ERRORS)
