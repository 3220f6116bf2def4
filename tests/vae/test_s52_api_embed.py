"""Study.embed as strict as stage=embed (audit s52 S6): a path, None or an array is a
TypeError that says to read it first (was AttributeError: 'str' object has no attribute
'obs'); an input lacking more than max_missing_genes of the model's genes is refused, as
the stage refuses it (embed.max_missing_genes), where it was embedded with a log line."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_study) -> Path:
    return toy_study(tmp_path_factory.mktemp("study"))


def _counts(root: Path, n: int, keep: float) -> ad.AnnData:
    paired = ad.read_h5ad(root / "paired.h5ad")
    has = np.asarray(paired.layers["counts"].sum(1)).ravel() > 0
    rows = np.flatnonzero(has)[:n]
    cols = np.arange(int(round(keep * paired.n_vars)))
    counts = np.asarray(paired.layers["counts"][rows][:, cols], np.float32)
    return ad.AnnData(
        X=counts,
        obs=pd.DataFrame(index=[f"q{i}" for i in range(n)]),
        var=pd.DataFrame(index=paired.var_names[cols]),
    )


def test_embed_takes_an_anndata_and_says_how_to_read_one(study):
    from vae.api import Study

    s = Study.load(study / "out" / "s")
    for bad, name in [
        (str(study / "paired.h5ad"), "str"),
        (None, "NoneType"),
        (np.zeros((2, 3)), "ndarray"),
    ]:
        with pytest.raises(
            TypeError,
            match=rf"Study.embed takes an AnnData \(got {name}\); read .*study.read\(path\)",
        ):
            s.embed(bad)


def test_embed_refuses_an_input_missing_most_genes_as_the_stage_does(study):
    from pipeline.config_embed import EmbedConfig
    from vae.api import MAX_MISSING_GENES, Study, StudyError

    assert EmbedConfig.max_missing_genes == MAX_MISSING_GENES  # one default for both
    s = Study.load(study / "out" / "s")
    few = _counts(study, 6, 0.4)  # 60 % of the model's genes missing
    with pytest.raises(StudyError, match=r"more than max_missing_genes=0.5 of them are missing"):
        s.embed(few)
    assert s.embed(few, max_missing_genes=None).n_obs == 6  # asked for: imputed
    assert s.embed(few, max_missing_genes=0.7).n_obs == 6
    assert s.embed(_counts(study, 6, 0.6)).n_obs == 6  # 40 % missing: under the default
    with pytest.raises(StudyError, match=r"max_missing_genes=2: must be in \[0, 1\]"):
        s.embed(few, max_missing_genes=2)
