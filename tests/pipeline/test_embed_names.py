"""The row names of stage=embed's query.h5ad: the input's own, a paired table's as
latent.h5ad names them (the round trip joins by name), repeats across inputs made unique.

On the toy study (tests/helpers/vae_toy.py), laid out as the real chain's: paired.h5ad's
rows ``r000000``..., the cell ids in ``expression_ref`` / ``image_ref`` (one expression
cell on several rows, as ``by_label`` pairing draws them), latent.h5ad named by those ids.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tests.helpers.run import embed_on_toy_study


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_study) -> Path:
    """This module's copy of the toy study (<root>/out/s/train, <root>/paired.h5ad)."""
    return toy_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def real_layout(study: Path) -> tuple[Path, Path]:
    """(study folder, its paired.h5ad) in the real chain's layout (module docstring).

    Rows 3, 10 and 20 hold one expression cell (``c003``): latent.h5ad names them
    ``c003``, ``c003-1``, ``c003-2``; with blocks of 7 rows the repeats fall in later
    blocks than the first. Image-only rows are named by their crop (``smear_..._d000``).
    """
    from vae.scverse import ROW_KEY, cell_obs_names

    root = study / "real_layout"
    sd = root / "s"
    shutil.copytree(study / "out" / "s", sd)
    paired = ad.read_h5ad(study / "paired.h5ad")
    n = paired.n_obs
    has_img = paired.obs["has_image"].to_numpy(bool)
    has_expr = paired.obs["has_expression"].to_numpy(bool)
    ids = paired.obs_names.to_numpy().astype(object)
    ids[[10, 20]] = ids[3]
    assert has_expr[[3, 10, 20]].all()
    rows = [f"r{i:06d}" for i in range(n)]
    refs = pd.DataFrame(
        {
            "image_ref": np.where(has_img, [f"smear_{i:05d}_d000" for i in range(n)], ""),
            "expression_ref": np.where(has_expr, ids, ""),
        },
        index=rows,
    )
    lat = ad.read_h5ad(sd / "train" / "latent.h5ad")
    for c in refs:
        lat.obs[c] = refs[c].to_numpy()
    lat.obs[ROW_KEY] = rows
    lat.obs_names = cell_obs_names(refs)  # as stage=train names them
    lat.write_h5ad(sd / "train" / "latent.h5ad")
    for c in refs:
        paired.obs[c] = refs[c].to_numpy()
    paired.obs_names = rows
    paired.write_h5ad(root / "paired.h5ad")
    return sd, root / "paired.h5ad"


def _embed(study: Path, sd: Path, exp: str, *args: str) -> Path:
    return embed_on_toy_study(study, exp, f"embed.study={sd}", *args)


def _page_images(d: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', (d / "samples.html").read_text())


def test_the_round_trip_is_named_as_latent_h5ad(study: Path, real_layout, monkeypatch):
    """Issue 10: the study's own paired.h5ad through stage=embed gives latent.h5ad back to
    1e-5, and now by name: query.h5ad was named r000000 ... where latent.h5ad names the
    rows by their cells, so nothing joined. Read whole and block by block (7 rows), the
    names are latent.h5ad's, repeats' suffixes included; the row id stays in obs['row']."""
    import pipeline.streaming
    from vae.scverse import ROW_KEY

    sd, paired_path = real_layout
    lat = ad.read_h5ad(sd / "train" / "latent.h5ad")
    assert {"c003", "c003-1", "c003-2"} <= set(lat.obs_names)
    # a samples CSV of the row ids (how the rows were named before) still names them
    pd.DataFrame({"cell_id": ["r000000", "r000001"], "sample": "A"}).to_csv(
        study / "rows.csv", index=False
    )
    inp = (f"embed.h5ad={paired_path}", f"embed.samples_csv={study / 'rows.csv'}")
    mem = _embed(study, sd, "names_mem", *inp)
    monkeypatch.setattr(pipeline.streaming, "EMBED_BLOCK_ROWS", 7)
    blocks = _embed(study, sd, "names_blocks", *inp, "hardware.stream_above_gib=0")
    for d in (mem, blocks):
        q = ad.read_h5ad(d / "query.h5ad")
        assert list(q.obs_names) == list(lat.obs_names), d
        assert list(q.obs[ROW_KEY]) == [f"r{i:06d}" for i in range(q.n_obs)]
        ref = lat[q.obs_names]  # joined by name
        for k in ("X_vae", "X_vae_image", "X_vae_expression", "X_vae_full"):
            a, b = q.obsm[k], ref.obsm[k]
            assert np.array_equal(np.isnan(a), np.isnan(b)), k
            assert np.nanmax(np.abs(a - b)) < 1e-5, k
        assert (
            list(q.obs["vae_sample"][:2]) == ["A", "A"] and (q.obs["vae_sample"][2:] != "A").all()
        )
    # the page's crops of a streamed input are read from the file by each row's own id
    assert _page_images(blocks) and _page_images(blocks) == _page_images(mem)


def test_study_embed_names_a_paired_table_and_keeps_other_names(real_layout):
    """Study.embed names a paired table's rows as latent.h5ad does (the rows of the whole
    table: a slice keeps each row's name, the repeat c003-1 too); an AnnData without
    image_ref / expression_ref (cells.h5ad, an expression file) keeps its obs_names, and
    no 'row' column is added."""
    from vae.api import Study

    sd, paired_path = real_layout
    st = Study.load(sd)
    lat = ad.read_h5ad(sd / "train" / "latent.h5ad")
    paired = ad.read_h5ad(paired_path)
    q = st.embed(paired, "own", warn_seen=False)
    assert list(q.obs_names) == list(lat.obs_names)
    assert list(q.obs["row"]) == list(paired.obs_names)
    # a user's table of named cells: its names, untouched
    own = paired[:12].copy()
    del own.obs["image_ref"], own.obs["expression_ref"]
    own.obs_names = [f"patient7_cell{i}" for i in range(own.n_obs)]
    q = st.embed(own, "cells", warn_seen=False)
    assert list(q.obs_names) == list(own.obs_names) and "row" not in q.obs
    # a table that already carries its row ids (latent.h5ad's obs, a query named once)
    named = paired[:12].copy()
    named.obs.insert(0, "row", named.obs_names.astype(str))
    named.obs_names = [f"n{i}" for i in range(named.n_obs)]
    assert list(st.embed(named, "named", warn_seen=False).obs_names) == list(named.obs_names)


def test_paired_row_names_rule():
    """expression_ref, else image_ref, else the row id; repeats -1, -2 never taking a
    name a row already has; None where the input's names stay."""
    from vae.inputs.query import paired_row_names

    obs = pd.DataFrame(
        {"expression_ref": ["c1", "c1", "", "c1-1", np.nan], "image_ref": ["a", "b", "i7", "", ""]},
        index=["r0", "r1", "r2", "r3", "r4"],
    )
    assert list(paired_row_names(obs)) == ["c1", "c1-2", "i7", "c1-1", "r4"]
    assert paired_row_names(obs[[]]) is None  # no refs: a cells.h5ad, expression file
    assert paired_row_names(obs.assign(row=obs.index)) is None  # named already
    same = pd.DataFrame({"expression_ref": ["x", "y"]}, index=["x", "y"])
    assert paired_row_names(same) is None


def test_names_repeated_across_inputs_stay_unique_and_are_said(caplog):
    """Two inputs with one cell id (two patients' barcodes): the query holds both rows,
    the later renamed as anndata does (never onto a name already there), with a warning
    naming the repeats; each row's input in vae_input."""
    from pipeline.stages.embed import _concat

    def part(names, kind):
        return ad.AnnData(
            obs=pd.DataFrame({"vae_input": kind}, index=names),
            obsm={"X_vae": np.zeros((len(names), 2), np.float32)},
        )

    parts = [part(["AAAC-1", "AAAG-1", "x"], "expression"), part(["AAAC-1", "x-1"], "h5ad")]
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.embed"):
        out = _concat(parts)
    assert out.obs_names.is_unique and out.n_obs == 5
    assert list(out.obs_names[:3]) == ["AAAC-1", "AAAG-1", "x"]
    assert out.obs_names[3] not in {"AAAC-1", "x-1"} and out.obs_names[4] == "x-1"
    assert list(out.obs["vae_input"]) == ["expression"] * 3 + ["h5ad"] * 2
    said = [r.getMessage() for r in caplog.records if "repeat" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 cell id(s)") and out.obs_names[3] in said[0]


def test_a_streamed_table_with_repeated_ids_is_refused_naming_them(tmp_path):
    """Two paired tables joined with ad.concat both hold r000000 ...: a streamed read
    looked rows up by name and crashed (pandas InvalidIndexError, review); it is refused
    as Study.embed refuses it, naming the file and the ids."""
    import warnings

    from pipeline.runner import StageError
    from pipeline.stages.embed import _h5ad_obs_names

    a = ad.AnnData(np.zeros((3, 2), np.float32))
    a.obs_names = ["r000000", "r000001", "r000000"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own "not unique" warning
        a.write_h5ad(tmp_path / "twice.h5ad")
    with pytest.raises(
        StageError, match=r"twice.h5ad: obs_names holds duplicated cell ids \['r000000'\]"
    ):
        _h5ad_obs_names(tmp_path / "twice.h5ad")
