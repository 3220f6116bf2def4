"""What a downstream-interoperability audit found (2026-12-05): files the pipeline writes
read differently in scanpy and R than in the pipeline itself.

- ``""`` was a category meaning "missing" (``label``, ``specimen``, ``image_ref``,
  ``vae_stage``, ...): scanpy drew 1148 unlabelled cells of a real latent in palette
  colour #1f77b4 with a blank legend entry, ``isna()`` found none, R made it a factor
  level. Missing strings are written as NaN now; every reader of a pipeline file turns
  them back into ``""`` (``segmentation.io.blank_as_read``), so the code inside reads
  what it read before, and studies written with ``""`` still load.
- ``query.h5ad``'s ``vae_label`` / ``vae_call`` held only the classes called (colours
  differed between the study's UMAP and the query's) and ``samples.csv`` had no
  ``n_<class>`` column for a class never called.
- ``query.h5ad`` ``uns["study"]`` held paths only: a moved query could not be tied to
  its model (``model_digest`` now).
- docs/embed.md's recipe for one AnnData of study and query (tested here as written).
"""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from segmentation.io import blank_as_read, write_h5ad
from tests.helpers.run import run_stage_in_process


def _table() -> ad.AnnData:
    obs = pd.DataFrame(
        {
            "label": ["", "band", "band", "blast"],
            "specimen": ["", "", "s1", "s1"],
            "n": [1, 2, 3, 4],
        },
        index=[f"c{i}" for i in range(4)],
    )
    return ad.AnnData(X=np.zeros((4, 2), np.float32), obs=obs)


def test_missing_strings_are_written_as_nan_and_read_back_as_blank(tmp_path: Path):
    a = _table()
    p = tmp_path / "t.h5ad"
    write_h5ad(a, p)
    # the caller's table keeps its "" (the pipeline goes on using it after a write)
    assert list(a.obs["label"]) == ["", "band", "band", "blast"]
    raw = ad.read_h5ad(p)  # what scanpy / a user sees: NaN, no "" category
    for col in ("label", "specimen"):
        assert "" not in raw.obs[col].cat.categories, col
    assert raw.obs["label"].isna().tolist() == [True, False, False, False]
    assert raw.obs["specimen"].isna().sum() == 2
    # the pipeline's readers get "" back, "" sorting first as it did in old files
    back = blank_as_read(ad.read_h5ad(p, backed="r"))
    assert list(back.obs["label"]) == ["", "band", "band", "blast"]
    assert list(back.obs["label"].cat.categories) == ["", "band", "blast"]
    back.file.close()
    # a file written before (with a "" category) reads as it did
    old = _table()
    old.obs["label"] = pd.Categorical(old.obs["label"])
    old.write_h5ad(tmp_path / "old.h5ad")
    got = blank_as_read(ad.read_h5ad(tmp_path / "old.h5ad"))
    assert list(got.obs["label"]) == list(old.obs["label"])
    assert list(got.obs["label"].cat.categories) == ["", "band", "blast"]


def test_the_pipelines_readers_turn_nan_back_into_blank(tmp_path: Path):
    """cells.h5ad through stage=pair's reader: "" labels and specimens, not "nan" (what
    astype(str) makes of a NaN), so an unlabelled crop stays unlabelled."""
    from tests.helpers.vae_toy import make_paired
    from vae.inputs.pairing import read_cells_h5ad

    cells = make_paired(12)
    cells.obs["label"] = ["", "band", "blast"] * 4
    cells.obs["specimen"] = ["", "s1", "s1"] * 4
    p = tmp_path / "cells.h5ad"
    write_h5ad(cells, p)
    assert ad.read_h5ad(p).obs["label"].isna().sum() == 4
    got = read_cells_h5ad(p, 16)
    assert list(got.obs["label"].astype(str)) == ["", "band", "blast"] * 4


def test_only_the_pipelines_query_columns_are_written_as_nan():
    from pipeline.stages.embed import _query_obs_for_writing

    obs = pd.DataFrame(
        {
            "note": pd.Categorical(["", "x", "x"]),  # the user's: stays as given
            "vae_label": ["band", "band", ""],
            "vae_call": ["band", "unclassified", "unclassified"],
            "vae_stage": ["", "band", ""],
        },
        index=list("abc"),
    )
    q = ad.AnnData(obs=obs)
    _query_obs_for_writing(q, ["blast", "band", "seg"])
    assert list(q.obs["note"]) == ["", "x", "x"]
    # the study's classes in its order, whichever were called
    for col in ("vae_label", "vae_call"):  # alike: the two compare
        assert list(q.obs[col].cat.categories) == ["blast", "band", "seg", "unclassified"]
    assert q.obs["vae_label"].isna().tolist() == [False, False, True]
    assert q.obs["vae_stage"].isna().tolist() == [True, False, True]


def test_samples_have_a_column_for_every_study_label():
    from vae.analysis.samples import sample_profile

    obs = pd.DataFrame(
        {
            "vae_sample": ["A", "A", "B"],
            # a query.h5ad read back, edited: NaN where nothing was called (stage=embed
            # calls a cell it cannot call, one without a code included, unclassified)
            "vae_call": pd.Categorical(["band", np.nan, "band"]),
            "vae_maturation": [0.2, np.nan, 0.4],
        }
    )
    prof = sample_profile(obs, study_labels=["band", "blast", "", "nan"])
    for c in ("band", "blast", "unclassified"):
        assert f"n_{c}" in prof and f"frac_{c}" in prof, c
    # the NaN call is an unclassified cell, as embed counts a cell it cannot call (5910c10)
    assert list(prof["n_blast"]) == [0, 0] and list(prof["n_unclassified"]) == [1, 0]
    assert "n_" not in prof
    assert "n_nan" not in prof


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, toy_study) -> Path:
    """A toy study and an embed of 8 of its cells (one sample): <tmp>/out/q/embed."""
    study = toy_study(tmp_path_factory.mktemp("interop"))
    paired = ad.read_h5ad(study / "paired.h5ad")
    few = paired[paired.obs["has_image"].to_numpy().astype(bool)][:8].copy()
    few.obs["note"] = pd.Categorical([""] * 4 + ["x"] * 4)  # a user's column with ""
    few.write_h5ad(study / "few.h5ad")
    run_stage_in_process(
        [
            f"paths.root={study / 'out'}",
            "experiment=q",
            f"embed.study={study / 'out' / 's'}",
            f"embed.h5ad={study / 'few.h5ad'}",
            "hardware.torch_threads=1",
        ],
        "embed",
    )
    return study


def test_a_query_reads_like_its_study_in_scanpy(embedded: Path):
    from vae.api import Study

    study = Study.load(embedded / "out" / "s")
    q = ad.read_h5ad(embedded / "out" / "q" / "embed" / "query.h5ad")
    lat = ad.read_h5ad(embedded / "out" / "s" / "train" / "latent.h5ad")
    classes = study.labels
    for col in ("vae_label", "vae_call"):
        assert classes and list(q.obs[col].cat.categories) == [*classes, "unclassified"], col
    assert (q.obs["vae_call"] == q.obs["vae_label"]).any()  # they compare
    for col in ("vae_label", "vae_call", "vae_stage", "vae_modality", "vae_sample"):
        if isinstance(q.obs[col].dtype, pd.CategoricalDtype):
            assert "" not in q.obs[col].cat.categories, col
    for col in lat.obs.columns:
        if isinstance(lat.obs[col].dtype, pd.CategoricalDtype):
            assert "" not in lat.obs[col].cat.categories, col
    assert list(q.obs["note"]) == [""] * 4 + ["x"] * 4  # the user's column as given
    assert q.uns["study"]["model_digest"] == lat.uns["model_digest"]
    prof = pd.read_csv(embedded / "out" / "q" / "embed" / "samples.csv")
    for c in (*classes, "unclassified"):
        assert f"n_{c}" in prof, c


def test_the_docs_recipe_combines_study_and_query(embedded: Path):
    """docs/embed.md "Study and query in one AnnData", run as written."""
    text = (Path(__file__).parents[2] / "docs" / "embed.md").read_text()
    block = re.search(r"<!-- recipe: study\+query -->\s*```python\n(.*?)```", text, re.S)
    assert block, "docs/embed.md has no study+query recipe"
    code = block.group(1)
    code = code.replace("outputs/demo/train/latent.h5ad", str(embedded / "out/s/train/latent.h5ad"))
    code = code.replace("outputs/demo/embed/query.h5ad", str(embedded / "out/q/embed/query.h5ad"))
    ns: dict = {}
    exec(compile(code, "docs/embed.md", "exec"), ns)
    both = ns["both"]
    assert both.n_obs == ns["study"].n_obs + ns["query"].n_obs
    assert "X_vae" in both.obsm and "crops" not in both.obsm
    assert isinstance(both.obs["label"].dtype, pd.CategoricalDtype)
    assert set(both.obs["source"]) == {"study", "query"}
    assert "umap" in both.uns or "X_umap" in both.obsm
