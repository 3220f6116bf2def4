"""Issue 11.9: training length is an epoch count by default, and two CPU runs with the
same seed give identical latents."""

from __future__ import annotations

import anndata as ad
import numpy as np

from pipeline import runner
from tests.faults.conftest import cfg_for
from tests.helpers.run import compose_config
from tests.helpers.vae_toy import make_paired

TINY = [
    "vae.channels=[8,16]",
    "vae.hidden=[16]",
    "vae.n_latent=4",
    "vae.n_private=2",
    "vae.kl_warmup_epochs=1",
    "trainer.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.image_every_epochs=0",
    "trainer.projector_max_cells=0",
    "hardware.torch_threads=1",  # as cfg_for sets it: said here too, where the run is
]


def test_default_training_length_is_an_epoch_count():
    t = compose_config(["stage=train"]).trainer
    assert t.max_minutes is None and t.max_epochs > 0


def test_same_seed_gives_identical_latent_on_cpu(tmp_path):
    make_paired(24, image_only=4, expression_only=4).write_h5ad(tmp_path / "paired.h5ad")
    lat = []
    for exp in ("a", "b"):
        cfg = cfg_for(
            tmp_path / "out", "train", f"paths.inputs.paired={tmp_path / 'paired.h5ad'}", *TINY
        )
        cfg.experiment = exp
        assert runner.main(cfg) == 0
        lat.append(ad.read_h5ad(tmp_path / "out" / exp / "train" / "latent.h5ad"))
    a, b = lat
    assert set(a.obsm) == set(b.obsm) and "X_vae" in a.obsm
    for k in a.obsm:
        np.testing.assert_array_equal(a.obsm[k], b.obsm[k], err_msg=k)
    assert list(a.obs["split"]) == list(b.obs["split"])
    # a different seed does change them (the test would notice a constant output)
    cfg = cfg_for(
        tmp_path / "out",
        "train",
        f"paths.inputs.paired={tmp_path / 'paired.h5ad'}",
        *TINY,
        "seed=1",
    )
    cfg.experiment = "c"
    assert runner.main(cfg) == 0
    c = ad.read_h5ad(tmp_path / "out" / "c" / "train" / "latent.h5ad")
    assert not np.array_equal(a.obsm["X_vae"], c.obsm["X_vae"])
