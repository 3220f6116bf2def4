"""vae.analysis.run: what load_run compares between a model and its paired data, and
how a missing label reads."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from vae.analysis.run import gene_difference, labels_of


def _latent(labels) -> ad.AnnData:
    a = ad.AnnData(np.zeros((len(labels), 1), np.float32))
    a.obs["label"] = pd.Series(labels, index=a.obs_names, dtype=object)
    return a


def test_missing_labels_read_as_unknown_never_as_a_class_nan():
    """All-NaN labels read through astype(str) were the class "nan" (traverse: "did
    you mean nan?"); every missing spelling is "" (vae.inputs.schema.known_labels)."""
    lat = _latent([np.nan, None, "", "nan", "NA", "band", "myelocyte"])
    assert list(labels_of(lat, "label")) == ["", "", "", "", "", "band", "myelocyte"]
    nan_cat = _latent([np.nan] * 3)
    nan_cat.obs["label"] = nan_cat.obs["label"].astype("category")
    assert list(labels_of(nan_cat, "label")) == ["", "", ""]
    floats = _latent([1.0, np.nan])  # a numeric class column: its values as text
    floats.obs["label"] = floats.obs["label"].astype(float)
    assert list(labels_of(floats, "label")) == ["1.0", ""]


def test_gene_difference_says_order_and_set_changes():
    genes = [f"G{i}" for i in range(8)]
    assert gene_difference(genes, list(genes)) == ""
    assert gene_difference([], genes) == ""  # the model does not say: nothing to compare
    rev = gene_difference(genes, genes[::-1])
    assert "the same 8 genes in another order (8 of them at another column" in rev
    assert "each gene's values would be read as another gene's" in rev
    swap = gene_difference(genes, [genes[1], genes[0], *genes[2:]])
    assert "(2 of them at another column: G0, G1)" in swap
    fewer = gene_difference(genes, genes[:5])
    assert fewer.startswith("5 genes against the model's 8: 3 of the model's 8 are missing")
    assert "(G5, G6, G7)" in fewer
    other = gene_difference(genes, [*genes[:7], "NEW"])
    assert "1 of the model's 8 are missing (G7)" in other
    assert "1 of its 8 are new to the model (NEW)" in other


@pytest.mark.parametrize(
    "text",
    [
        '{"inputs": {}}',
        "{not json",
        None,
        '{"inputs": {"paired": {"in_experiment": "x"}}}',
        '{"inputs": {"paired": null}}',
        '{"inputs": {"paired": "p.h5ad"}}',
    ],
)
def test_targets_of_a_run_without_a_readable_manifest_name_the_file(tmp_path, text):
    """scripts/vae_targets.py eval on a run folder whose manifest.json is missing, corrupt
    or names no paired input: one error naming the file and --paired (was a bare
    KeyError / JSONDecodeError / FileNotFoundError)."""
    from vae.analysis.targets import RunManifestError, targets_for_run

    if text is not None:
        (tmp_path / "manifest.json").write_text(text)
    msg = r"manifest\.json: cannot read the paired input.*--paired"
    with pytest.raises(RunManifestError, match=msg):
        targets_for_run(tmp_path)
