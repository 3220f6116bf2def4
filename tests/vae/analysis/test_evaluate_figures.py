"""Which held-out crops stage=evaluate draws in ``reconstructions.png``."""

import numpy as np

from vae.analysis.evaluate import rows_per_label


def test_reconstructions_show_every_label_not_the_first_eight_crops():
    # eight neutrophils first, as a test split ordered by source gives them
    labels = np.array(["Neu"] * 8 + ["Eos", "Lym", "nan", "Eos", "Mono", "Neu", "", "Eos"])
    cand = np.arange(labels.size)
    got = rows_per_label(labels, cand, per_label=2, max_rows=12)
    assert list(labels[got]) == ["Eos", "Eos", "Lym", "Mono", "Neu", "Neu", "nan", ""]
    # the first crops of each label: the pick is stable across runs of the same split
    assert list(got[:2]) == [8, 11] and list(got[4:6]) == [0, 1]


def test_reconstruction_rows_respect_the_cap_and_the_candidates():
    labels = np.array([f"k{i % 10}" for i in range(40)])
    cand = np.arange(0, 40, 2)  # only even rows hold an image
    got = rows_per_label(labels, cand, per_label=2, max_rows=6)
    assert got.size == 6 and np.all(got % 2 == 0)
    assert len(set(labels[got])) == 3  # two of each of the first three labels
    assert rows_per_label(labels, np.array([], int), 2, 12).size == 0
