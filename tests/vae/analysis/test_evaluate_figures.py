"""Which held-out crops stage=evaluate draws in ``reconstructions.png``."""

import numpy as np

from vae.analysis.evaluate import rows_per_label
from vae.inputs.schema import MATURATION_ORDER


def test_reconstructions_show_every_label_not_the_first_eight_crops():
    # eight neutrophils first, as a test split ordered by source gives them
    labels = np.array(["Neu"] * 8 + ["Eos", "Lym", "nan", "Eos", "Mono", "Neu", "", "Eos"])
    cand = np.arange(labels.size)
    got = rows_per_label(labels, cand, per_label=2, max_rows=12)
    assert list(labels[got]) == ["Eos", "Eos", "Lym", "Mono", "Neu", "Neu", "nan", ""]
    # the first crops of each label: the pick is stable across runs of the same split
    assert list(got[:2]) == [8, 11] and list(got[4:6]) == [0, 1]


def test_reconstruction_rows_follow_maturation_and_show_every_label():
    """The simulator's nine kinds: one crop of each, the lineage in maturation order."""
    others = ["monocyte", "lymphocyte", "eosinophil"]
    kinds = [*MATURATION_ORDER[::-1], *others]  # given latest first, others last
    labels = np.array(kinds * 3)
    got = rows_per_label(labels, np.arange(labels.size), per_label=2, max_rows=12)
    assert list(labels[got]) == [*MATURATION_ORDER, "lymphocyte", "monocyte", "eosinophil"]


def test_reconstruction_rows_respect_the_cap_and_the_candidates():
    labels = np.array([f"k{i % 10}" for i in range(40)])
    cand = np.arange(0, 40, 2)  # only even rows hold an image: five labels
    got = rows_per_label(labels, cand, per_label=2, max_rows=6)
    # two of each would need 10 rows: one of each of the five instead
    assert got.size == 5 and np.all(got % 2 == 0) and len(set(labels[got])) == 5
    got = rows_per_label(labels, cand, per_label=2, max_rows=3)
    assert got.size == 3
    assert rows_per_label(labels, np.array([], int), 2, 12).size == 0


def test_umap_maturation_panel_only_where_the_data_have_maturation():
    """A real or own-data study (no simulator t, no pseudotime) drew an all-grey
    maturation panel whose caption spoke of both: no panel now, and the figure says why.
    The demo's simulator t, or a pseudotime with gaps, keeps its panel."""
    import anndata as ad
    import pandas as pd

    from vae.analysis.evaluate import maturation_panel

    def latent(mat) -> ad.AnnData:
        obs = pd.DataFrame({"label": ["a", "b", "c"]}, index=["x", "y", "z"])
        if mat is not None:
            obs["maturation"] = mat
        return ad.AnnData(np.zeros((3, 2), np.float32), obs=obs)

    t, note = maturation_panel(latent([0.1, np.nan, 0.9]), "maturation")
    assert note == "" and np.allclose(t, [0.1, np.nan, 0.9], equal_nan=True)
    for mat, why in (([np.nan] * 3, "is empty"), (None, "is missing"), (["", "", ""], "is empty")):
        t, note = maturation_panel(latent(mat), "maturation")
        assert t is None
        assert note.startswith("no maturation panel: no maturation value in these data")
        assert f"(obs['maturation'] {why}: no simulator t, no pseudotime)" in note
