"""stage=train on a table streamed from disk (hardware.stream_above_gib) = the in-memory run."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import scipy.sparse as sp

from tests.helpers.run import TINY_TRAIN
from tests.helpers.vae_toy import make_paired


def test_streamed_train_stage_gives_the_in_memory_result(tmp_path, run_in_process):
    a = make_paired(30, image_only=6, expression_only=9)
    a.X = sp.csr_matrix(a.X)
    a.layers["counts"] = sp.csr_matrix(a.layers["counts"])
    paired = tmp_path / "paired.h5ad"
    a.write_h5ad(paired)
    common = [
        f"paths.root={tmp_path / 'out'}",
        f"paths.inputs.paired={paired}",
        *TINY_TRAIN,
        "trainer.projector_max_cells=8",  # reads crops by rows too
    ]
    run_in_process([*common, "experiment=mem"], "train")
    run_in_process([*common, "experiment=st", "hardware.stream_above_gib=0"], "train")
    mem, st = (tmp_path / "out" / e / "train" for e in ("mem", "st"))
    assert not (mem / "crops.zarr").exists() and (st / "crops.zarr" / "zarr.json").exists()
    s_mem, s_st = (json.loads((d / "train_summary.json").read_text()) for d in (mem, st))
    assert s_st["epochs"] == s_mem["epochs"] == 2
    assert np.isclose(s_st["best_val"], s_mem["best_val"], rtol=1e-5)
    l_mem, l_st = (ad.read_h5ad(d / "latent.h5ad") for d in (mem, st))
    assert list(l_mem.obs_names) == list(l_st.obs_names)
    for k in l_mem.obsm:
        assert np.allclose(l_mem.obsm[k], l_st.obsm[k], rtol=1e-4, atol=1e-5, equal_nan=True), k
