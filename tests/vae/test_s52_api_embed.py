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

from tests.helpers.run import compose_config


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
    # and the value the stage runs with: the yaml it composes, not only the dataclass
    assert compose_config(["stage=embed"]).embed.max_missing_genes == MAX_MISSING_GENES
    s = Study.load(study / "out" / "s")
    few = _counts(study, 6, 0.4)  # 60 % of the model's genes missing
    with pytest.raises(StudyError, match=r"more than max_missing_genes=0.5 of them are missing"):
        s.embed(few)
    assert s.embed(few, max_missing_genes=None).n_obs == 6  # asked for: imputed
    assert s.embed(few, max_missing_genes=0.7).n_obs == 6
    assert s.embed(_counts(study, 6, 0.6)).n_obs == 6  # 40 % missing: under the default
    with pytest.raises(StudyError, match=r"max_missing_genes=2: must be in \[0, 1\]"):
        s.embed(few, max_missing_genes=2)


def test_sample_profile_keeps_cells_with_no_sample_through_the_api(study, tmp_path, caplog):
    """Study.read keeps a user's NaN sample (a9ec74f): sample_profile grouped with pandas'
    dropna, so those cells vanished from the per-sample table without a word (16 cells
    read 13). A missing sample (NaN, "", blanks) is one named group, with a warning."""
    import logging

    from vae.analysis.samples import NO_SAMPLE, sample_profile, write_samples_html
    from vae.api import Study

    a = _counts(study, 16, 1.0)
    a.obs["sample"] = pd.Categorical([None] * 3 + ["pA"] * 5 + [""] * 2 + ["pB"] * 4 + [" "] * 2)
    a.write_h5ad(tmp_path / "q.h5ad")
    s = Study.load(study / "out" / "s")
    q = s.embed(s.read(tmp_path / "q.h5ad", kind="expression"))
    assert q.obs["sample"].isna().sum() == 3  # the input's column as given
    with caplog.at_level(logging.WARNING, logger="vae.analysis.samples"):
        prof = sample_profile(q.obs, callable_calls={"expression": s.labels})
    assert dict(zip(prof["sample"], prof["n_cells"])) == {NO_SAMPLE: 7, "pA": 5, "pB": 4}
    said = [r.getMessage() for r in caplog.records if "have no sample" in r.getMessage()]
    assert len(said) == 1 and "7 of 16 cells" in said[0] and repr(NO_SAMPLE) in said[0], said
    named = sample_profile(q.obs, no_sample="q")  # the input's name, as stage=embed names them
    assert dict(zip(named["sample"], named["n_cells"])) == {"q": 7, "pA": 5, "pB": 4}
    write_samples_html(tmp_path / "s.html", prof, q.obs, None, callable_calls={"expression": []})
    assert NO_SAMPLE in (tmp_path / "s.html").read_text()


def test_sample_profile_names_a_whole_number_sample_as_an_integer():
    """A numeric sample column with gaps reads 7.0: sample "7", as batch_text reads it."""
    from vae.analysis.samples import sample_profile

    obs = pd.DataFrame(
        {
            "sample": [7.0, 7.0, np.nan, 12.0],
            "vae_call": ["band"] * 4,
            "vae_maturation": [0.5] * 4,
        },
        index=[f"c{i}" for i in range(4)],
    )
    prof = sample_profile(obs)
    assert dict(zip(prof["sample"], prof["n_cells"])) == {"(no sample)": 1, "12": 1, "7": 2}
