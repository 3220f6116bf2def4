"""stage=embed of large expression inputs: the reference fitted once for every block.

On the toy study (60 query cells) with blocks of 7 rows (9 blocks, the last one short).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tests.helpers.run import run_stage_in_process
from tests.pipeline.test_embed_blocks import ROWS, _query, _same


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_study) -> Path:
    """This module's copy of the toy study (<root>/out/s/train, <root>/paired.h5ad)."""
    return toy_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def loaded(study: Path):
    from vae.api import Study

    return Study.load(study / "out" / "s")


def _embed_stage(study: Path, exp: str, *extra: str) -> Path:
    return run_stage_in_process(
        [
            f"paths.root={study / 'out'}",
            f"experiment={exp}",
            f"embed.study={study / 'out' / 's'}",
            "hardware.torch_threads=1",
            *extra,
        ],
        "embed",
    )


def test_the_reference_is_fitted_once_for_every_block(study, tmp_path, monkeypatch):
    """The label transfer's kNN, the atypical scores' neighbour index and Gaussians are
    fitted on the study's reference for the first block and reused by the other eight
    (each block fitted them again); the results are those of the file read whole."""
    from sklearn.covariance import LedoitWolf
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    from vae.api import Study

    fits: list[str] = []
    for cls in (KNeighborsClassifier, NearestNeighbors, LedoitWolf):
        real = cls.fit

        def counted(self, *a, _real=real, _name=cls.__name__, **k):
            fits.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(cls, "fit", counted)
    st = Study.load(study / "out" / "s")  # nothing fitted yet
    path = tmp_path / "q.h5ad"
    _query(study, "counts_in_x").write_h5ad(path)
    blocks = st.read_blocks(path, rows=ROWS)
    parts, after = [], []
    for b in blocks:
        parts.append(st.embed(b, "q", whole=blocks))
        after.append(len(fits))
    assert len(parts) == 9
    assert after[0] > 0 and after[-1] == after[0]  # nothing fitted after the first block
    assert fits.count("KNeighborsClassifier") == 1  # expression cells: one modality
    assert fits.count("NearestNeighbors") <= 2  # one index per modality of the reference
    mem = st.embed(st.read(path, "expression"), "q")
    assert fits.count("KNeighborsClassifier") == 1  # the whole file: still the same kNN
    _same(mem, ad.concat([p for p in parts if p.n_obs], merge="first", uns_merge="first"))


def test_a_label_transfer_fit_follows_k_and_a_new_reference(loaded):
    """The kept kNN is per k and per reference: another k, or a reference set after
    load, gives the labels a fresh fit gives."""
    z = np.asarray(loaded.reference.obsm["X_vae"][:10])
    a1, many = loaded.transfer_labels(z, k=1), loaded.transfer_labels(z, k=40)
    assert (a1["confidence"] == 1.0).all()  # k=1: the cell's own label
    assert (many["confidence"] < 1.0).all()  # 40 of the 48 cells: other classes vote too
    pd.testing.assert_frame_equal(loaded.transfer_labels(z, k=1), a1)
    ref = loaded.reference
    try:
        other = ref.copy()
        lab = other.obs[loaded.label_key].astype(str).to_numpy()
        other.obs[loaded.label_key] = np.roll(lab, 1)  # other labels, same codes
        loaded.reference = other
        rolled = loaded.transfer_labels(z, k=1)
        assert list(rolled["label"]) == list(np.roll(lab, 1)[:10])
    finally:
        loaded.reference = ref
    pd.testing.assert_frame_equal(loaded.transfer_labels(z, k=1), a1)
