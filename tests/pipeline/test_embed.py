"""stage=embed and vae.api.Study on a tiny study built once per module (2 epochs)."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import pipeline.stages.embed
from pipeline.runner import StageError
from tests.helpers.run import SHARED_DATA, needs_shared, run_pipeline, run_stage_in_process
from tests.helpers.seg_synth import LIGHT_HEADS
from tests.helpers.vae_toy import TINY_TRAIN

TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_study) -> Path:
    """outputs root of a trained tiny study: <root>/s/train/{model.pt,latent.h5ad}
    (this module's copy)."""
    return toy_study(tmp_path_factory.mktemp("study"))


def _args(study: Path, exp: str, *args: str) -> list[str]:
    return [
        f"paths.root={study / 'out'}",
        f"experiment={exp}",
        f"embed.study={study / 'out' / 's'}",
        "hardware.torch_threads=1",
        *args,
    ]


def _embed(study: Path, exp: str, *args: str) -> Path:
    """stage=embed in this process (fast); returns its folder."""
    return run_stage_in_process(_args(study, exp, *args), "embed")


def test_round_trip_reproduces_latent(study: Path):
    """Embedding the training data itself gives latent.h5ad back (to 1e-5)."""
    # a samples CSV names the sample of the first 30 cells; the others get the input's name
    ids = [f"c{i:03d}" for i in range(30)]
    pd.DataFrame({"cell_id": ids, "sample": "A"}).to_csv(study / "samples.csv", index=False)
    _embed(
        study,
        "rt",
        f"embed.h5ad={study / 'paired.h5ad'}",
        f"embed.samples_csv={study / 'samples.csv'}",
    )
    q = ad.read_h5ad(study / "out" / "rt" / "embed" / "query.h5ad")
    ref = ad.read_h5ad(study / "out" / "s" / "train" / "latent.h5ad")
    paired = ad.read_h5ad(study / "paired.h5ad")
    assert q.n_obs == ref.n_obs == paired.n_obs
    for k in ("X_vae", "X_vae_image", "X_vae_expression", "X_vae_full", "X_vae_private_image"):
        a, b = q.obsm[k], ref.obsm[k]
        assert np.array_equal(np.isnan(a), np.isnan(b)), k
        assert np.nanmax(np.abs(a - b)) < 1e-5, k
    # atypical-cell scores: the functions of stage=train against its training rows, so
    # every row that was not trained on gets latent.h5ad's scores back; a training row
    # too, except the kNN distance (train left the row's own entry out) and so the mean
    from vae.inputs.schema import ANOMALY_COLUMNS, ANOMALY_SCORE

    trained = ref.obs["split"].astype(str).to_numpy() == "train"
    assert 0 < trained.sum() < ref.n_obs
    for key, col in ANOMALY_COLUMNS.items():
        a, b = q.obs[col].to_numpy(float), ref.obs[col].to_numpy(float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), col
        rows = ~trained if key.endswith("latent") or col == ANOMALY_SCORE else slice(None)
        assert np.nanmax(np.abs(a[rows] - b[rows]) / (1 + np.abs(b[rows]))) < 1e-4, col
    assert np.isfinite(q.obs[ANOMALY_SCORE]).all()
    # the user's obs columns come back untouched, the study's readings beside them
    for c in paired.obs.columns:
        pd.testing.assert_series_equal(
            q.obs[c], paired.obs[c], check_categorical=False, check_index=False, check_names=False
        )
    assert (q.obs["vae_label"].astype(str) == paired.obs["label"].to_numpy()).mean() > 0.5
    assert q.obs["vae_label_confidence"].between(0, 1).all()
    # a position and a stage only for cells called one of the path's classes
    on_path = {"myeloblast", "myelocyte"}
    called = q.obs["vae_call"].astype(str).isin(on_path).to_numpy()
    assert q.obs["vae_maturation"][called].between(0, 1).all()
    assert q.obs["vae_maturation"][~called].isna().all()
    stage = q.obs["vae_stage"]
    assert set(stage[called].astype(str)) <= on_path and stage[~called].isna().all()
    d = study / "out" / "rt" / "embed"
    assert pd.read_csv(d / "rejects.csv").empty
    prof = pd.read_csv(d / "samples.csv").set_index("sample")
    assert prof["n_cells"].to_dict() == {"A": 30, "paired": q.n_obs - 30}
    assert (q.obs["vae_sample"].to_numpy()[:30] == "A").all()


def test_streamed_h5ad_embeds_by_blocks_with_the_in_memory_result(study: Path, monkeypatch):
    """Above hardware.stream_above_gib an h5ad is embedded a block of rows at a time."""
    import scipy.sparse as sp

    import pipeline.streaming

    a = ad.read_h5ad(study / "paired.h5ad")
    a.X = sp.csr_matrix(a.X)
    a.layers["counts"] = sp.csr_matrix(a.layers["counts"])
    a.write_h5ad(study / "query_sparse.h5ad")
    inp = f"embed.h5ad={study / 'query_sparse.h5ad'}"
    monkeypatch.setattr(pipeline.streaming, "EMBED_BLOCK_ROWS", 7)  # 60 rows: 9 blocks
    mem = ad.read_h5ad(_embed(study, "qm", inp) / "query.h5ad")
    st = ad.read_h5ad(_embed(study, "qs", inp, "hardware.stream_above_gib=0") / "query.h5ad")
    assert "crops" in mem.obsm and "crops" not in st.obsm  # left in the input file
    assert list(st.obs_names) == list(mem.obs_names)
    for k in mem.obsm:
        if k not in ("crops", "masks"):
            assert np.allclose(st.obsm[k], mem.obsm[k], atol=1e-5, equal_nan=True), k
    for c in mem.obs.columns:
        x, y = mem.obs[c].to_numpy(), st.obs[c].to_numpy()
        if x.dtype.kind == "f":
            # scores derived from the codes carry the codes' float32 rounding, which
            # differs with the block's rows (the CNN's kernels depend on the batch size);
            # anomaly_image_class_distance is a difference of two squared Mahalanobis
            # distances (vae.analysis.anomaly.class_distance), so
            # its rounding is absolute: 6.8e-5 apart near 0 (0.01431 vs 0.01425) in a
            # fresh environment (2026-12-05; torch 2.14.1, numpy 2.4.6)
            assert np.allclose(x, y, atol=1e-4, equal_nan=True), c
        else:
            assert (x.astype(str) == y.astype(str)).all(), c
    # the page's example crops are read from the input file: they said "No images among
    # the inputs" (or were black beside another input) when streamed (scale audit)
    imgs = [
        re.findall(
            r'<img src="([^"]+)"', (study / "out" / e / "embed" / "samples.html").read_text()
        )
        for e in ("qm", "qs")
    ]
    assert imgs[0] and imgs[1] == imgs[0]


def test_expression_alone_holds_no_crops(study: Path):
    """Zero crops held for every row of an expression input took 37 KB a cell (7 GiB
    for 200k cells, scale audit): it now holds none, with the same latent."""
    from vae.api import Study
    from vae.store import ZeroRows

    st = Study.load(study / "out" / "s")
    paired = ad.read_h5ad(study / "paired.h5ad")
    expr = paired[paired.obs["has_expression"].to_numpy(bool)].copy()
    with_crops = st.get_latent(expr, modality="expression")
    for k in ("crops", "masks"):
        del expr.obsm[k]
    del expr.obs["has_image"]
    data, _ = st.prepare(expr)
    assert isinstance(data.crops, ZeroRows) and isinstance(data.masks, ZeroRows)
    np.testing.assert_array_equal(st.get_latent(expr, modality="expression"), with_crops)


def _with_each_modality(obs) -> tuple[int, int]:
    """(cells with an image, cells with expression) of an embedded query's obs."""
    mod = obs["vae_modality"].astype(str)
    return int(mod.isin(["image", "both"]).sum()), int(mod.isin(["expression", "both"]).sum())


def _write_crops(folder: Path, paired: ad.AnnData, rows: dict[str, list[int]], size: int) -> None:
    for sample, idx in rows.items():
        (folder / sample).mkdir(parents=True)
        for i in idx:
            c = paired.obsm["crops"][i]
            Image.fromarray(c).resize((size, size), Image.BILINEAR).save(
                folder / sample / f"c{i}.png"
            )
    (folder / "pat1" / "broken.png").write_bytes(b"not a png")


def test_crops_and_expression_with_samples(study: Path):
    """Crop sub-folders are samples, 32 px crops fit a 16 px model, genes by name, rejects."""
    paired = ad.read_h5ad(study / "paired.h5ad")
    _write_crops(study / "crops", paired, {"pat1": [0, 1, 2, 3, 4], "pat2": [5, 6, 7]}, 32)
    # expression: genes reversed, 2 model genes dropped, one extra gene added
    e = paired[paired.obs["has_expression"].to_numpy()].copy()
    counts = e.layers["counts"][:, ::-1][:, 2:]
    genes = list(e.var_names[::-1][2:])
    x = ad.AnnData(
        X=np.c_[counts, np.ones(len(counts))].astype(np.float32),
        obs=pd.DataFrame({"sample": "pat3", "donor_note": "keep me"}, index=e.obs_names),
        var=pd.DataFrame(index=[*genes, "NOT_A_MODEL_GENE"]),
    )
    x.write_h5ad(study / "expr.h5ad")
    # toy crops, no detector: the whole image is the cell (the detector mode: below)
    crops = [f"embed.crops={study / 'crops'}", "embed.crop_masks=whole"]
    _embed(study, "ce", *crops, f"embed.expression={study / 'expr.h5ad'}")
    d = study / "out" / "ce" / "embed"
    q = ad.read_h5ad(d / "query.h5ad")
    assert q.n_obs == 8 + e.n_obs
    assert q.obsm["crops"].shape[1:] == (16, 16, 3)
    # expression rows read as zero crops and hidden masks, but were never written: their
    # HDF5 chunks are not allocated (they were padded in memory: 1.6 GB for 100k cells)
    expr_rows = (q.obs["vae_input"] == "expression").to_numpy()
    assert not q.obsm["crops"][expr_rows].any() and not q.obsm["masks"][expr_rows].any()
    assert q.obsm["crops"][~expr_rows].reshape(8, -1).any(axis=1).all()
    assert q.obsm["masks"].dtype == bool and q.obsm["masks"][~expr_rows].all()
    import h5py

    from segmentation.io import OBSM_CHUNK_ROWS

    with h5py.File(d / "query.h5ad", "r") as f:
        assert e.n_obs > 2 * OBSM_CHUNK_ROWS  # else every chunk holds a crop row anyway
        for key in ("crops", "masks"):
            assert f["obsm"][key].id.get_num_chunks() == 1, key  # rows 0-7: one chunk
    assert set(q.obs["vae_sample"]) == {"pat1", "pat2", "pat3"}
    assert (q.obs.loc[q.obs["vae_input"] == "expression", "donor_note"] == "keep me").all()
    # each input is scored on the modality it has: crops on the image scores only
    from vae.inputs.schema import ANOMALY_COLUMNS, ANOMALY_SCORE

    crops = (q.obs["vae_input"] == "crops").to_numpy()
    for key, col in ANOMALY_COLUMNS.items():
        v = q.obs[col].to_numpy(float)
        if key.startswith("image"):
            assert np.isfinite(v[crops]).all() and np.isnan(v[~crops]).all(), col
        elif key.startswith("expression"):
            assert np.isnan(v[crops]).all() and np.isfinite(v[~crops]).all(), col
    assert np.isfinite(q.obs[ANOMALY_SCORE]).all()
    rej = pd.read_csv(d / "rejects.csv")
    assert rej["item"].str.endswith("broken.png").sum() == 1
    # every row names its input as the setting (an image's row and a folder's alike)
    assert rej["input"].str.startswith("embed.").all(), rej["input"].tolist()
    import json

    summary = json.loads((d / "summary.json").read_text())
    # the cells as a whole against the study's held-out cells (Study.input_shift)
    shift = summary["shift_from_study"]
    assert shift["n"] == int(np.isfinite(q.obs[ANOMALY_SCORE]).sum())
    assert 0 <= shift["above"] <= shift["n"] and shift["expected"] == 0.25
    assert shift["share"] == pytest.approx(shift["above"] / shift["n"], abs=1e-4)
    assert 0 <= shift["p"] <= 1 and isinstance(shift["shifted"], bool)
    # the cut each image input's cells got is written beside the setting that chose it
    assert summary["crop_masks"] == {"setting": "whole", "crops": "whole"}
    genes = summary["genes"]
    rep = next(v for k, v in genes.items() if k.startswith("embed.expression"))
    assert sorted(rep["missing"]) == sorted(e.var_names[::-1][:2]) and rep["n_extra_ignored"] == 1
    # the imputed values of the two missing genes: expression rows only
    assert sorted(q.uns["imputed_genes"]) == sorted(rep["missing"])
    is_expr = (q.obs["vae_input"] == "expression").to_numpy()
    imp = q.obsm["X_vae_imputed"]
    assert np.isfinite(imp[is_expr]).all() and np.isnan(imp[~is_expr]).all()
    prof = pd.read_csv(d / "samples.csv").set_index("sample")
    assert prof.loc["pat2", "n_cells"] == 3
    # not_callable: per sample the classes the study cannot give cells seen as its
    # modality (Study.callable_labels) and none was called, their shares empty
    from vae.api import Study

    st = Study.load(study / "out" / "s")
    listed = prof["not_callable"].fillna("").str.split("; ")
    for s, mod in (("pat1", "image"), ("pat2", "image"), ("pat3", "expression")):
        want = {c for c in st.labels if c not in st.callable_labels(mod)}
        assert set(filter(None, listed[s])) == {c for c in want if prof.loc[s, f"n_{c}"] == 0}
        for c in filter(None, listed[s]):
            assert prof.loc[s, [f"frac_{c}", f"frac_{c}_ci_low"]].isna().all(), (s, c)
    html = (d / "samples.html").read_text()
    assert "<img" in html and "pat1" in html
    # the expression cells are the study's own (their ids are its profiles'): counted and
    # said beside the images' count, on the page too, with the genes imputed (an audit:
    # 399 of 400 of a study's own Paul15 cells reported 0, and the page said neither)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["cells_from_expression_the_study_trained_on"] == e.n_obs
    assert summary["cells_from_images_the_study_trained_on"] == 0
    assert f"{e.n_obs} of the {q.n_obs} cells have the cell ids of expression profiles" in html
    assert "2 of the model&#x27;s 12 genes are missing from this input and were imputed" in html


def test_bad_inputs_fail_clearly_and_write_nothing(study: Path, tmp_path: Path):
    paired = ad.read_h5ad(study / "paired.h5ad")
    few = ad.AnnData(
        X=paired.layers["counts"][:10, :3], var=pd.DataFrame(index=paired.var_names[:3])
    )
    few.write_h5ad(tmp_path / "few.h5ad")
    # the command line: exit 2, one message naming the field and the setting, no traceback
    p = run_pipeline(
        ["stage=embed", *_args(study, "bad", f"embed.expression={tmp_path / 'few.h5ad'}")]
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "var_names" in p.stderr and "embed.max_missing_genes" in p.stderr
    assert not (study / "out" / "bad" / "embed" / "query.h5ad").exists()
    none = ad.AnnData(X=np.ones((4, 2), np.float32), var=pd.DataFrame(index=["foo", "bar"]))
    none.write_h5ad(tmp_path / "none.h5ad")
    with pytest.raises(StageError, match="none of the model's 12 genes"):
        _embed(study, "bad2", f"embed.expression={tmp_path / 'none.h5ad'}")
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    with pytest.raises(StageError, match="broken.pt"):
        _embed(
            study,
            "bad3",
            f"embed.h5ad={study / 'paired.h5ad'}",
            "embed.study=null",
            f"paths.inputs.model={tmp_path / 'broken.pt'}",
            f"paths.inputs.latent={study / 'out/s/train/latent.h5ad'}",
        )
    assert not (study / "out" / "bad3" / "embed" / "query.h5ad").exists()
    # a model given beside embed.study would be ignored (the study's is used): refused
    with pytest.raises(StageError, match=r"paths.inputs.model=.*broken.pt and embed.study="):
        _embed(
            study,
            "bad3b",
            f"embed.h5ad={study / 'paired.h5ad'}",
            f"paths.inputs.model={tmp_path / 'broken.pt'}",
        )
    assert not (study / "out" / "bad3b").exists()
    with pytest.raises(StageError, match="at least one input"):
        _embed(study, "bad4")
    # a latent from another study (other latent width) is refused by name
    other = ad.read_h5ad(study / "out/s/train/latent.h5ad")
    other.obsm["X_vae"] = np.zeros((other.n_obs, 7), np.float32)
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(StageError, match="another study"):
        _embed(
            study,
            "bad5",
            f"embed.h5ad={study / 'paired.h5ad'}",
            "embed.study=null",
            f"paths.inputs.model={study / 'out/s/train/model.pt'}",
            f"paths.inputs.latent={tmp_path / 'other.h5ad'}",
        )


def test_expression_that_is_neither_counts_nor_lognorm_and_unmatched_samples_are_refused(
    study: Path, tmp_path: Path
):
    """Values that are not counts and cannot be log1p-normalised (negative: scaled;
    above log1p(1e6): CPM / TPM), duplicated cell ids, a sample column or samples CSV that
    names no cell: exit 2 naming the field, never a query of NaN codes or one pooled
    sample."""
    paired = ad.read_h5ad(study / "paired.h5ad")
    counts = np.asarray(paired.layers["counts"][:20], np.float32)
    var = pd.DataFrame(index=paired.var_names)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(20)])
    neg = np.log1p(counts)
    neg[0, 0] = -3.0
    cpm = counts / counts.sum(1, keepdims=True) * 1e6
    cases = {
        "neg": (ad.AnnData(X=neg, obs=obs, var=var), "negative values"),
        "cpm": (ad.AnnData(X=cpm, obs=obs, var=var), "neither integer counts nor log1p"),
        "dup": (
            ad.AnnData(X=counts, obs=pd.DataFrame(index=["c0"] * 20), var=var),
            "duplicated cell ids",
        ),
    }
    for name, (a, msg) in cases.items():
        a.write_h5ad(tmp_path / f"{name}.h5ad")
        with pytest.raises(StageError, match=msg):
            _embed(study, f"bad_{name}", f"embed.expression={tmp_path / f'{name}.h5ad'}")
        assert not (study / "out" / f"bad_{name}" / "embed" / "query.h5ad").exists()
    good = tmp_path / "good.h5ad"
    ad.AnnData(X=counts, obs=obs, var=var).write_h5ad(good)
    with pytest.raises(StageError, match="embed.knn_k=100000 is more than"):
        _embed(study, "bad_k", f"embed.expression={good}", "embed.knn_k=100000")
    with pytest.raises(StageError, match="embed.sample_key=patient.*no obs column"):
        _embed(study, "bad_key", f"embed.expression={good}", "embed.sample_key=patient")
    pd.DataFrame({"cell_id": ["x1", "x2"], "sample": ["p1", "p2"]}).to_csv(
        tmp_path / "s.csv", index=False
    )
    with pytest.raises(StageError, match="names none of the 20 cells"):
        _embed(
            study, "bad_csv", f"embed.expression={good}", f"embed.samples_csv={tmp_path / 's.csv'}"
        )
    assert not (study / "out" / "bad_csv" / "embed" / "query.h5ad").exists()
    # one cell given two samples is refused by name; a row repeated with one sample is not
    pd.DataFrame({"cell_id": ["c1", "c1", "c2"], "sample": ["p1", "p2", "p1"]}).to_csv(
        tmp_path / "dup.csv", index=False
    )
    with pytest.raises(StageError, match="cell_id 'c1' is given 2 samples \\(p1, p2\\)"):
        _embed(
            study,
            "dup_csv",
            f"embed.expression={good}",
            f"embed.samples_csv={tmp_path / 'dup.csv'}",
        )
    pd.DataFrame({"cell_id": ["c1", "c1", "c2"], "sample": ["p1", "p1", "p2"]}).to_csv(
        tmp_path / "rep.csv", index=False
    )
    q = ad.read_h5ad(
        _embed(
            study,
            "rep_csv",
            f"embed.expression={good}",
            f"embed.samples_csv={tmp_path / 'rep.csv'}",
        )
        / "query.h5ad"
    )
    assert q.obs.loc[["c1", "c2"], "vae_sample"].tolist() == ["p1", "p2"]
    # a repeat that differs in another column, and rows naming an image only
    pd.DataFrame(
        {
            "cell_id": ["c1", "c1", None],
            "image": [None, None, "x.png"],
            "sample": ["p1", "p1", "p3"],
            "note": ["a", "b", ""],
        }
    ).to_csv(tmp_path / "mixed.csv", index=False)
    q = ad.read_h5ad(
        _embed(
            study,
            "mixed_csv",
            f"embed.expression={good}",
            f"embed.samples_csv={tmp_path / 'mixed.csv'}",
        )
        / "query.h5ad"
    )
    assert q.obs.loc["c1", "vae_sample"] == "p1"


def test_inputs_whose_every_cell_is_dropped_fail_instead_of_an_empty_query(
    study: Path, tmp_path: Path
):
    """Profiles of zero counts only, or an expression file of 0 genes: exit 2 naming why
    (the dropped cells listed in rejects.csv), never a 'done' run with an empty query."""
    paired = ad.read_h5ad(study / "paired.h5ad")
    var = pd.DataFrame(index=paired.var_names)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(8)])
    ad.AnnData(X=np.zeros((8, paired.n_vars), np.float32), obs=obs, var=var).write_h5ad(
        tmp_path / "zeros.h5ad"
    )
    with pytest.raises(StageError, match="no cell in any input"):
        _embed(study, "all_zero", f"embed.expression={tmp_path / 'zeros.h5ad'}")
    d = study / "out" / "all_zero" / "embed"
    assert not (d / "query.h5ad").exists()
    rej = pd.read_csv(d / "rejects.csv")
    assert sorted(rej["item"]) == sorted(obs.index) and rej["reason"].str.contains("zero").all()
    ad.AnnData(X=np.zeros((8, 0), np.float32), obs=obs).write_h5ad(tmp_path / "nogenes.h5ad")
    with pytest.raises(StageError, match="var_names: no genes"):
        _embed(study, "no_genes", f"embed.expression={tmp_path / 'nogenes.h5ad'}")
    assert not (study / "out" / "no_genes" / "embed" / "query.h5ad").exists()


def test_unreadable_inputs_are_named_and_the_api_says_no_cells(study: Path, tmp_path: Path):
    from vae.api import Study, StudyError

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not an image")
    (bad / "b.jpg").write_bytes(b"\xff\xd8\xff")  # a truncated JPEG
    with pytest.raises(StageError, match=r"no cell in any input.*a\.png"):
        _embed(study, "allbad", f"embed.crops={bad}")
    rej = pd.read_csv(study / "out" / "allbad" / "embed" / "rejects.csv")
    assert {"a.png", "b.jpg"} <= {Path(str(i)).name for i in rej["item"]}
    st = Study.load(study / "out" / "s")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, bad):
        with pytest.raises(StudyError, match="no cells to embed"):
            st.get_latent(folder, kind="crops")
    # codes of a modality a cell lacks (NaN rows) get no label, not an sklearn error
    lab = st.transfer_labels(np.full((2, st.n_shared), np.nan))
    assert list(lab["label"]) == ["", ""] and lab["confidence"].isna().all()


def test_a_sweep_study_without_a_variant_names_its_variants(study: Path, tmp_path: Path):
    import shutil

    from vae.api import Study, StudyError

    root = tmp_path / "sweep"
    shutil.copytree(study / "out" / "s" / "train", root / "train" / "beta4")
    with pytest.raises(StudyError, match="variants beta4.*variant=NAME"):
        Study.load(root)
    assert Study.load(root, variant="beta4").n_shared > 0


def test_a_study_loaded_from_its_train_folder_keeps_its_detector(
    study: Path, tmp_path: Path, monkeypatch
):
    """Study.load(<experiment>/train) and Study.load(<experiment>/train/<variant>) use the
    experiment's segment_train detector, as Study.load(<experiment>) does (they used the
    shipped one, silently)."""
    import shutil

    from segmentation.shipped import SHIPPED_DETECTOR
    from vae.api import Study

    exp = tmp_path / "exp"
    shutil.copytree(study / "out" / "s" / "train", exp / "train")
    shutil.copytree(study / "out" / "s" / "train", exp / "train" / "v1")
    (exp / "segment_train").mkdir()
    own = exp / "segment_train" / "model.pt"
    shutil.copy(SHIPPED_DETECTOR, own)
    assert Path(Study.load(exp).segmentation_model) == own
    assert Path(Study.load(exp / "train").segmentation_model) == own
    assert Path(Study.load(exp / "train" / "v1").segmentation_model) == own
    monkeypatch.chdir(exp / "train")  # a relative "." names no folder by itself
    assert Path(Study.load(".").segmentation_model) == own


def test_a_latent_of_another_model_is_refused(study: Path, tmp_path: Path):
    """Same layout, other model: stage=train's digest (or, before it, the labels) tells."""
    from vae.api import Study, StudyError
    from vae.checkpoint import checkpoint_digest

    train = study / "out/s/train"
    ref = ad.read_h5ad(train / "latent.h5ad")
    assert ref.uns["model_digest"] == checkpoint_digest(train / "model.pt")
    Study.load(model=train / "model.pt", latent=train / "latent.h5ad")  # its own: fine
    other = tmp_path / "other.pt"
    ck = torch.load(train / "model.pt", weights_only=False)
    ck["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ck["model"].items()}
    torch.save(ck, other)
    with pytest.raises(StudyError, match="model_digest.*another model"):
        Study.load(model=other, latent=train / "latent.h5ad")
    # a latent written before the digest: its labels must be the model's classes
    del ref.uns["model_digest"]
    ref.obs["label"] = "myelocyte_of_another_study"
    ref.write_h5ad(tmp_path / "old.h5ad")
    with pytest.raises(StudyError, match="another study"):
        Study.load(model=train / "model.pt", latent=tmp_path / "old.h5ad")


def test_api_genes_by_name_path_and_decode(study: Path):
    from vae.api import Study, StudyError

    st = Study.load(study / "out" / "s")
    paired = ad.read_h5ad(study / "paired.h5ad")
    e = paired[paired.obs["has_expression"].to_numpy()].copy()
    del e.obsm["crops"], e.obsm["masks"]
    z = st.get_latent(e, modality="expression")
    assert np.abs(st.get_latent(e[:, ::-1].copy(), modality="expression") - z).max() < 1e-5
    raw = ad.AnnData(X=e.layers["counts"], var=e.var)  # raw counts normalised like training
    assert np.abs(st.get_latent(raw, modality="expression") - z).max() < 1e-4
    import scipy.sparse as sp

    sparse = ad.AnnData(X=sp.csr_matrix(e.layers["counts"]), var=e.var)
    assert np.abs(st.get_latent(sparse, modality="expression") - z).max() < 1e-4
    # counts in X and in layers['counts'] (the simulator's expression_raw.h5ad layout): X is
    # normalised like the training data, not read as if it were log1p values already
    both = ad.AnnData(X=e.layers["counts"].copy(), var=e.var)
    both.layers["counts"] = e.layers["counts"].copy()
    assert np.abs(st.get_latent(both, modality="expression") - z).max() < 1e-4
    # a counts layer of non-integer values (normalised under the counts' name) is refused
    frac = ad.AnnData(X=e.X.copy(), var=e.var)
    frac.layers["counts"] = np.asarray(e.layers["counts"], np.float32) + 0.5
    with pytest.raises(StudyError, match=r"layers\['counts'\] holds non-integer values"):
        st.get_latent(frac, modality="expression")
    # raw counts in the layer beside a scaled X (scanpy's usual layout): the counts are used
    scaled = ad.AnnData(X=(e.X - e.X.mean(0)) / (e.X.std(0) + 1e-6), var=e.var)
    scaled.layers["counts"] = e.layers["counts"].copy()
    assert np.abs(st.get_latent(scaled, modality="expression") - z).max() < 1e-4
    # the path: each class centroid projects onto its own knot and is called that class
    cents, path = st.maturation_path()
    mp = st.maturation_position(cents.points)
    assert list(mp["stage"]) == cents.names
    # given the cells' calls, a cell called a class off the path has no position, no stage
    off = ["not_on_path"] + list(cents.names[1:])
    mp_l = st.maturation_position(cents.points, off)
    assert mp_l["stage"].iloc[0] == "" and list(mp_l["stage"].iloc[1:]) == cents.names[1:]
    assert np.isnan(mp_l["position"].iloc[0])
    assert np.array_equal(mp_l["position"].to_numpy()[1:], mp["position"].to_numpy()[1:])
    with pytest.raises(StudyError, match="labels must be"):
        st.maturation_position(cents.points, off[:1])
    assert np.abs(mp["position"].to_numpy() - path.knots_s).max() <= 1 / 199 + 1e-9
    lab = st.transfer_labels(st.reference.obsm["X_vae"][:5], k=1)
    assert (lab["confidence"] == 1).all()
    dec = st.decode(st.reference.obsm["X_vae_full"][:3])
    assert dec.images.shape == (3, 16, 16, 3) and dec.expression.shape == (3, 12)
    # image support: the training crops' own codes are inside (at the 0.99 quantile),
    # a code far from all of them is not
    ref = st.reference
    train_crop = (ref.obs["split"].astype(str) == "train").to_numpy() & ref.obs[
        "has_image"
    ].to_numpy().astype(bool)
    zf = np.asarray(ref.obsm["X_vae_full"], float)
    sup = st.image_support(np.vstack([zf[train_crop], zf[:1] + 100.0]))
    assert sup.supported[:-1].mean() >= 0.95 and not sup.supported[-1]
    with pytest.raises(StudyError, match="image_support: z_full"):
        st.image_support(zf[:, :2])
    with pytest.raises(StudyError, match="obsm\\['crops'\\]"):
        bad = ad.AnnData(obs=pd.DataFrame(index=["a"]))
        bad.obsm["crops"] = np.zeros((1, 16, 12, 3), np.uint8)
        st.get_latent(bad)


def test_api_audit_nan_codes_settings_and_calls(study: Path, caplog):
    """What an API audit found (2026-12-05): NaN codes, settings changed after load, k,
    call order, an empty decode, the model file as the study, NaN counts."""
    import logging

    from vae.analysis.samples import sample_profile
    from vae.api import Study, StudyError

    st = Study.load(study / "out" / "s")
    zf = np.asarray(st.reference.obsm["X_vae_full"], float)
    nan = np.vstack([zf[:1], np.full((1, zf.shape[1]), np.nan)])
    # a NaN code (no such modality) has no position and no stage, was 0.0 / the first class
    mp = st.maturation_position(nan)
    assert np.isfinite(mp["position"].iloc[0]) and np.isnan(mp["position"].iloc[1])
    assert mp["stage"].iloc[1] == "" and mp["stage"].iloc[0] != ""
    sup = st.image_support(nan)  # was sklearn's "Input X contains NaN"
    assert np.isnan(sup.distance[1]) and not sup.supported[1]
    with pytest.raises(StudyError, match="hold NaN"):  # was NaN images, drawn black
        st.decode(nan)
    empty = st.decode(zf[:0])  # was numpy's "need at least one array to concatenate"
    assert empty.images.shape == (0, 16, 16, 3) and empty.expression.shape == (0, 12)
    raw = st.decode(zf[:2], render=False)
    assert raw.images.shape == (2, 16, 16, 3)
    # settings set after load are checked (were accepted and ignored)
    with pytest.raises(StudyError, match="impute='knn'"):
        st.impute = "knn"
    with pytest.raises(StudyError, match="impute_iterations=0"):
        st.impute_iterations = 0
    st.impute, st.impute_iterations = "mean", 2
    assert (st.impute, st.impute_iterations) == ("mean", 2)
    # k: 0 is refused (was 15), more than the labelled cells is said
    with pytest.raises(StudyError, match="k=0"):
        st.transfer_labels(st.reference.obsm["X_vae"][:2], k=0)
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        st.transfer_labels(st.reference.obsm["X_vae"][:2], k=100000)
    assert "k=100000 but the reference has" in caplog.text
    # the path follows analysis settings changed after a first call (was cached)
    cents, _ = st.maturation_path()
    first = st.maturation_position(zf[:5])
    st.analysis["path_classes"] = list(reversed(cents.names))
    assert st.maturation_path()[0].names == list(reversed(cents.names))
    again = st.maturation_position(zf[:5])
    assert np.allclose(again["position"], 1 - first["position"], atol=0.05)
    # another spelling of each stage is the data's label, as stage=traverse takes it
    # (vae.analysis.study.path_order): the embed path is the report's path
    from vae.inputs.schema import stage_name

    staged = [n for n in cents.names if stage_name(n) == n]
    assert len(staged) >= 2, cents.names
    st.analysis["path_classes"] = [n.capitalize() + "s" for n in staged]
    assert st.maturation_path()[0].names == staged
    # a rebuild that fails is not replaced by the path built before (review)
    st.analysis["label_key"] = "nonexistent"
    for _ in range(2):
        with pytest.raises(StudyError, match="nonexistent"):
            st.maturation_path()
    del st.analysis["label_key"]
    assert st.image_support(zf[:0]).supported.shape == (0,)
    st.impute_iterations = "3"  # whole numbers as the pipeline's config may give them
    assert st.impute_iterations == 3
    assert len(st.transfer_labels(st.reference.obsm["X_vae"][:2], k=3.0)) == 2
    # a path that is not there is named as given (was ".../model.pt/train/model.pt")
    for gone in (study / "nowhere" / "model.pt", study / "nowhere"):
        with pytest.raises(StudyError, match=rf"^{re.escape(str(gone))}: no such file or folder"):
            Study.load(gone)
    # the model file itself as the study (was ".../model.pt/train/model.pt: no such file")
    by_file = Study.load(study / "out" / "s" / "train" / "model.pt")
    assert by_file.model_path == st.model_path
    with pytest.raises(StudyError, match="variant"):
        Study.load(study / "out" / "s" / "train" / "model.pt", variant="v1")
    # NaN among counts: said as such (was "neither integer counts nor log1p values")
    paired = ad.read_h5ad(study / "paired.h5ad")
    e = paired[paired.obs["has_expression"].to_numpy()].copy()
    x = np.asarray(e.layers["counts"], np.float64)
    x[0, 0] = np.nan
    with pytest.raises(StudyError, match="X holds 1 NaN or infinite values"):
        st.get_latent(ad.AnnData(X=x, var=e.var), modality="expression")
    # the per-sample profile reads Study.read's "sample" column (was KeyError 'vae_sample')
    obs = pd.DataFrame(
        {"sample": ["a", "a", "b"], "vae_label": ["x", "y", "x"], "vae_maturation": [0.1, 0.5, 0.9]}
    )
    assert list(sample_profile(obs)["sample"]) == ["a", "b"]
    # a query.h5ad read back holds NaN where no class was called: an unclassified cell,
    # never an "n_" / "frac_" column of its own that another query lacks (review)
    calls = obs.assign(vae_call=["x", None, "x"])
    got = sample_profile(calls, study_labels=["x", "y"]).set_index("sample")
    clean = sample_profile(
        calls.assign(vae_call=["x", "unclassified", "x"]), study_labels=["x", "y"]
    )
    assert list(got.columns) == list(clean.set_index("sample").columns)
    assert "n_" not in got and got.loc["a", "n_unclassified"] == 1
    # without a call column, a cell with no label counts in n_cells only
    unl = sample_profile(obs.assign(vae_label=["x", None, "x"]), study_labels=["x", "y"])
    assert "n_" not in unl and list(unl["n_cells"]) == [2, 1] and list(unl["n_x"]) == [1, 1]


def test_each_cell_is_labelled_from_reference_cells_with_its_modalities(study: Path):
    """An image-only cell takes its label from reference cells with a crop (image codes),
    never from a class that only expression profiles carry; both-modality cells read
    the fused code as before."""
    from vae.analysis.anomaly import latent_modalities
    from vae.api import Study, StudyError

    st = Study.load(study / "out" / "s")
    ref = st.reference
    img = ref.obs["has_image"].to_numpy().astype(bool)
    expr_only = ref.obs["has_expression"].to_numpy().astype(bool) & ~img
    assert img.any() and expr_only.any()
    lab = ref.obs[st.label_key].astype(str).to_numpy().copy()
    lab[expr_only] = "profile_only"  # a class no crop of the study has
    ref.obs[st.label_key] = lab
    npv = int(st.meta["n_private"])
    codes = latent_modalities(ref, st.n_shared, npv)
    # every reference cell read by its image code, k = all crops: never profile_only
    every = st.transfer_labels(codes["image"][img], k=int(img.sum()), modality="image")
    assert "profile_only" not in set(every["label"])
    # k=1 on the reference's own crops gives their own labels back
    own = st.transfer_labels(codes["image"][img], k=1, modality="image")
    assert (own["label"].to_numpy() == lab[img]).all()
    # the fused reading does carry it (the profiles' own codes, k=1)
    joint = st.transfer_labels(ref.obsm["X_vae"][expr_only], k=1)
    assert (joint["label"] == "profile_only").all()
    # Study.embed: image-only rows go the image way
    paired = ad.read_h5ad(study / "paired.h5ad")
    q = paired[paired.obs["has_image"].to_numpy()].copy()
    q.X = np.zeros_like(q.X)
    q.layers["counts"] = np.zeros_like(q.layers["counts"])
    q.obs["has_expression"] = False
    out = st.embed(q)
    assert (out.obs["vae_modality"] == "image").all()
    assert "profile_only" not in set(out.obs["vae_label"])
    # what the page marks "not callable from images" (no crop of the class)
    assert "profile_only" not in st.callable_labels("image")
    assert "profile_only" in st.callable_labels("both") == st.callable_labels("joint")
    assert "profile_only" in st.callable_labels("expression")
    with pytest.raises(StudyError, match="modality='pixels'"):
        st.transfer_labels(codes["image"][:2], modality="pixels")
    with pytest.raises(StudyError, match="must be"):
        st.transfer_labels(codes["image"][:2, :1], modality="image")
    # an expert's shared dims alone (get_latent(..., modality="image")) read the same dims
    shared = st.transfer_labels(codes["image"][img, : st.n_shared], k=1, modality="image")
    assert (shared["label"].to_numpy() == lab[img]).mean() > 0.9


def test_doubtful_and_atypical_cells_are_left_unclassified(study: Path, tmp_path: Path):
    """vae_call: the label, or unclassified for a cell whose neighbours disagree or that
    scores above the study's own held-out cells on its modalities (an audit's doublet was
    called a promyelocyte with confidence 1.0 and counted as an IG); the profile counts
    the calls, unclassified included."""
    from vae.analysis.anomaly import held_out_thresholds, reference_from_latent
    from vae.analysis.samples import sample_profile, write_samples_html
    from vae.api import UNCLASSIFIED, Study, StudyError

    st = Study.load(study / "out" / "s")
    paired = ad.read_h5ad(study / "paired.h5ad")
    q = st.embed(paired.copy())
    thr = st.atypical_thresholds()
    assert set(thr) == {"image", "expression", "both"} and all(np.isfinite(list(thr.values())))
    assert len(set(thr.values())) == 3  # each modality set its own (one for all: a review)
    # the threshold is the held-out rows' own quantile: at q = 1 none of them is above it
    ref = st.reference
    held = ref.obs["split"].astype(str).to_numpy() != "train"
    both = held & ref.obs["has_image"].to_numpy(bool) & ref.obs["has_expression"].to_numpy(bool)
    top = held_out_thresholds(
        ref, reference_from_latent(ref, st.n_shared, int(st.meta["n_private"])), 1.0
    )["both"]
    assert top == pytest.approx(np.nanmax(ref.obs["anomaly_score"].to_numpy(float)[both]))
    conf = q.obs["vae_label_confidence"].to_numpy(float)
    atyp = q.obs["vae_atypical"].to_numpy(bool)
    expect = np.where(atyp | (conf < 0.5), UNCLASSIFIED, q.obs["vae_label"].astype(str))
    assert (q.obs["vae_call"].to_numpy() == expect).all()
    limit = q.obs["vae_modality"].map(thr).to_numpy(float)
    assert (atyp == (q.obs["anomaly_score"].to_numpy(float) > limit)).all()
    # a strict study leaves more cells out; switched off, none is atypical
    st.atypical_quantile = 0.05
    strict = st.embed(paired.copy())
    assert strict.obs["vae_atypical"].sum() > atyp.sum()
    st.atypical_quantile, st.min_confidence = None, 0.0
    loose = st.embed(paired.copy())
    assert not loose.obs["vae_atypical"].any()
    assert (loose.obs["vae_call"] == loose.obs["vae_label"]).all()
    for bad in ("atypical_quantile", "min_confidence"):
        with pytest.raises(StudyError, match=bad):
            setattr(st, bad, 1.5)
    # the profile counts the calls: an unclassified cell is in n_cells and in no call
    strict.obs["vae_sample"] = "p"
    prof = sample_profile(strict.obs).set_index("sample")
    n_unc = int((strict.obs["vae_call"] == UNCLASSIFIED).sum())
    assert prof.loc["p", "n_unclassified"] == n_unc > 0
    calls = [c for c in prof.columns if c.startswith("n_") and f"frac_{c[2:]}" in prof]
    assert prof.loc["p", calls].sum() == prof.loc["p", "n_cells"]
    page = tmp_path / "samples.html"
    write_samples_html(page, prof.reset_index(), strict.obs, strict.obsm["crops"])
    text = page.read_text()
    heads = re.findall(r"<h3>([^(<]+) \(", text)
    assert heads[-1] == UNCLASSIFIED  # examples in maturation order, unclassified last
    diff = text.split("<h2>Differential count</h2>")[1].split("</table>")[0]
    assert re.findall(r"<tr><th>([^<]+)</th>", diff)[-1] == UNCLASSIFIED


def test_cells_not_on_the_path_get_no_position_and_no_stage(study: Path):
    """One rule, samples.csv's n_on_path: a cell is placed on the maturation path only when
    its vae_call is one of the path's classes. An unclassified cell whose label is a path
    class got a stage (an audit's platelet-sized object on the real chain: GMP) and a
    position, as did a lymphocyte (0.0 in QuPath: the most immature end)."""
    from vae.analysis.samples import on_maturation_path, sample_profile
    from vae.api import UNCLASSIFIED, Study

    st = Study.load(study / "out" / "s")
    st.atypical_quantile = 0.05  # many cells left unclassified
    q = st.embed(ad.read_h5ad(study / "paired.h5ad"))
    names = list(st.maturation_path()[0].names)
    call = q.obs["vae_call"].astype(str).to_numpy()
    label = q.obs["vae_label"].astype(str).to_numpy()
    on = np.isin(call, names)
    unc_on_label = (call == UNCLASSIFIED) & np.isin(label, names)
    assert unc_on_label.any() and on.any() and (~on & (call != UNCLASSIFIED)).any()
    pos = q.obs["vae_maturation"].to_numpy(float)
    stage = q.obs["vae_stage"].astype(str).to_numpy()
    assert np.isfinite(pos[on]).all() and np.isnan(pos[~on]).all()
    assert set(stage[on]) <= set(names) and (stage[~on] == "").all()
    # the API given the calls says the same; the rule is the profile's
    mp = st.maturation_position(q.obsm["X_vae_full"], q.obs["vae_call"])
    assert np.array_equal(np.isnan(mp["position"].to_numpy()), ~on)
    assert (mp["stage"].to_numpy() == stage).all()
    assert np.array_equal(on_maturation_path(q.obs["vae_call"], names), on)
    q.obs["vae_sample"] = "p"
    prof = sample_profile(q.obs, path_classes=names).set_index("sample")
    assert prof.loc["p", "n_on_path"] == on.sum() == np.isfinite(pos).sum()
    # NaN or "" is no call
    assert not on_maturation_path(pd.Series([np.nan, "", names[0]]), names)[:2].any()


def test_classes_an_image_only_sample_cannot_be_called_are_not_shown_as_zero(tmp_path):
    """The real chain's image-only samples listed Erythrocyte, GMP, ... (classes no crop
    of the study has) as "0.0 (0.0-30.8)": a counting interval of a class their cells can
    never receive. Marked "not callable from images" now (left out where no sample can
    be called it); samples.csv keeps its columns, names the classes in not_callable and
    leaves their shares and intervals empty (its 0 % read as a measured absence too)."""
    from vae.analysis.samples import (
        proportion_ci,
        sample_profile,
        uncallable_calls,
        write_samples_html,
    )

    obs = pd.DataFrame(
        {
            "vae_sample": ["img"] * 3 + ["mix"] * 3,
            "vae_modality": ["image"] * 4 + ["expression"] * 2,
            "vae_call": ["a", "b", "a", "a", "c", "b"],
            "vae_label": ["a", "b", "a", "a", "c", "b"],
            "vae_label_confidence": 1.0,
            "vae_maturation": 0.5,
        },
        index=[f"x{i}" for i in range(6)],
    )
    callable_calls = {"image": ["a", "b"], "expression": ["a", "b", "c"]}
    prof = sample_profile(obs, study_labels=["a", "b", "c"])
    assert {"n_c", "frac_c", "frac_c_ci_low", "frac_c_ci_high"} <= set(prof.columns)
    marks = uncallable_calls(prof, obs, callable_calls)
    assert marks == {"img": ({"c"}, "images")}
    assert list(prof["not_callable"]) == ["", ""]  # not told the modalities' classes
    # samples.csv's rule is the page's: told them, the image-only sample's c is empty
    honest = sample_profile(obs, study_labels=["a", "b", "c"], callable_calls=callable_calls)
    h = honest.set_index("sample")
    assert list(honest.columns) == list(prof.columns)  # the same columns, marked or not
    assert h["not_callable"].to_dict() == {"img": "c", "mix": ""}
    for col in ("frac_c", "frac_c_ci_low", "frac_c_ci_high"):
        assert np.isnan(h.loc["img", col]), col
    assert h.loc["img", "n_c"] == 0  # no cell was called it: a true count
    # the callable classes and the other sample are as before, to the value
    assert h.loc["img", "frac_a"] == pytest.approx(2 / 3)
    assert (h.loc["img", "frac_a_ci_low"], h.loc["img", "frac_a_ci_high"]) == proportion_ci(2, 3)
    assert h.loc["mix", "frac_c"] == pytest.approx(1 / 3)
    assert (h.loc["mix", "frac_c_ci_low"], h.loc["mix", "frac_c_ci_high"]) == proportion_ci(1, 3)
    p = prof.set_index("sample")
    same = h.drop(columns=["frac_c", "frac_c_ci_low", "frac_c_ci_high", "not_callable"])
    pd.testing.assert_frame_equal(
        same, p.drop(columns=["frac_c", "frac_c_ci_low", "frac_c_ci_high", "not_callable"])
    )
    # the page reads n_c, which the profile keeps: the same marks from either profile
    assert uncallable_calls(honest, obs, callable_calls) == marks
    # as a CSV: the share and its interval empty, the class named
    csv = tmp_path / "samples.csv"
    honest.to_csv(csv, index=False)
    back = pd.read_csv(csv, keep_default_na=False).set_index("sample")
    assert back.loc["img", ["frac_c", "frac_c_ci_low", "frac_c_ci_high"]].tolist() == ["", "", ""]
    assert back.loc["img", "not_callable"] == "c" and back.loc["mix", "not_callable"] == ""

    def differential(prof, obs) -> str:
        page = tmp_path / "samples.html"
        write_samples_html(page, prof, obs, None, callable_calls=callable_calls)
        return page.read_text().split("<h2>Differential count</h2>")[1].split("<h2>")[0]

    diff = differential(prof, obs)
    assert differential(honest, obs) == diff  # the NaN shares are never shown
    row_c = re.search(r"<tr><th>c</th>(.*?)</tr>", diff).group(1)
    assert "not callable from images" in row_c and "0.0 <small>" not in row_c.split("</td>")[0]
    assert "33.3" in row_c  # the mixed sample's 1 in 3 is a count
    # one sample, image only: the row is left out, the note names the class
    one = obs[obs["vae_sample"] == "img"]
    diff = differential(sample_profile(one, study_labels=["a", "b", "c"]), one)
    assert "<tr><th>c</th>" not in diff and "Left out for every sample: c." in diff
    # many samples (a row each): the cell says so
    many = pd.concat([obs.assign(vae_sample=obs["vae_sample"] + str(k)) for k in range(4)])
    many.index = [f"y{i}" for i in range(len(many))]
    diff = differential(sample_profile(many, study_labels=["a", "b", "c"]), many)
    assert diff.count("not callable from images") == 4
    # the note's example is the modality's: an expression-only sample lacks no crop
    expr = obs.assign(vae_modality="expression")
    page = tmp_path / "expr.html"
    write_samples_html(
        page, prof, expr, None, callable_calls={"expression": ["a", "b"], "image": ["a"]}
    )
    note = page.read_text().split("<p>Not callable:")[1].split("</p>")[0]
    assert "expression only: no expression profile of the class" in note and "crop" not in note
    write_samples_html(page, prof, obs, None, callable_calls=callable_calls)
    assert "images only: no crop of the class" in page.read_text()
    # without the modalities' classes nothing is marked (as before)
    page = tmp_path / "plain.html"
    write_samples_html(page, prof, obs, None)
    assert "not callable" not in page.read_text()


def test_a_ratio_a_sample_cannot_be_called_from_its_modalities_is_nan():
    """The study-level rule (a ratio is NaN when the study's labels name none of its
    stages) per sample: promyelocytes and myelocytes labelled on expression cells only,
    an image-only sample's IG fraction was 0 with an interval, a measured normal count of
    cells its calls could never hold. NaN now, with its interval and edge-corrected
    share; the ratios it can count are as before."""
    from vae.analysis.samples import proportion_ci, sample_profile

    labels = [
        "myeloblast",
        "promyelocyte",
        "myelocyte",
        "band",
        "segmented_neutrophil",
        "lymphocyte",
    ]
    image = ["myeloblast", "band", "segmented_neutrophil", "lymphocyte"]
    obs = pd.DataFrame(
        {
            "vae_sample": ["img"] * 4 + ["called"] * 2 + ["expr"] * 4,
            "vae_modality": ["image"] * 6 + ["expression"] * 4,
            "vae_call": [
                *("band", "segmented_neutrophil", "segmented_neutrophil", "lymphocyte"),
                # an image-only cell called a myelocyte anyway: that class is measured
                *("myelocyte", "segmented_neutrophil"),
                *("promyelocyte", "segmented_neutrophil", "band", "lymphocyte"),
            ],
            "vae_maturation": 0.5,
            "edge_weight": 1.0,
        }
    )
    calls = {"image": image, "expression": labels}
    prof = sample_profile(obs, study_labels=labels, callable_calls=calls).set_index("sample")
    before = sample_profile(obs, study_labels=labels).set_index("sample")
    assert prof["not_callable"].to_dict() == {
        "called": "promyelocyte",
        "expr": "",
        "img": "myelocyte; promyelocyte",
    }
    for col in ("ig_fraction", "ig_fraction_ci_low", "ig_fraction_ci_high"):
        assert np.isnan(prof.loc["img", col]), col
    assert np.isnan(prof.loc["img", "ig_fraction_edge_corrected"])
    assert np.isnan(prof.loc["img", "frac_promyelocyte_edge_corrected"])
    assert before.loc["img", "ig_fraction"] == 0.0  # what it read before
    # the ratios the image-only sample can count: 0 blasts in 4 with its interval, I:T
    # from its band (1 of 3 neutrophils)
    assert prof.loc["img", "blast_fraction"] == 0.0
    blast_ci = (prof.loc["img", "blast_fraction_ci_low"], prof.loc["img", "blast_fraction_ci_high"])
    assert blast_ci == proportion_ci(0, 4)
    assert prof.loc["img", "left_shift_index"] == pytest.approx(1 / 3)
    # a class called anyway is counted, and so is the ratio it belongs to
    assert prof.loc["called", "ig_fraction"] == pytest.approx(0.5)
    assert prof.loc["called", "frac_myelocyte"] == pytest.approx(0.5)
    # the expression sample, which can be called every class: unchanged to the value
    pd.testing.assert_series_equal(prof.loc["expr"], before.loc["expr"])
    assert prof.loc["expr", "ig_fraction"] == pytest.approx(0.25)
    # no immature neutrophil stage callable from images: the I:T ratio is NaN too
    calls["image"] = ["myeloblast", "segmented_neutrophil", "lymphocyte"]
    img = obs[obs["vae_sample"] == "img"].assign(vae_call="segmented_neutrophil")
    prof = sample_profile(img, study_labels=labels, callable_calls=calls).set_index("sample")
    assert prof.loc["img", "not_callable"] == "band; myelocyte; promyelocyte"
    for col in ("left_shift_index", "left_shift_index_ci_low", "left_shift_index_ci_high"):
        assert np.isnan(prof.loc["img", col]), col
    assert prof.loc["img", "blast_fraction"] == 0.0
    # without the study's labels the ratios stay taken as callable (as the study-level
    # rule); the shares are still marked
    prof = sample_profile(img, callable_calls=calls).set_index("sample")
    assert prof.loc["img", "left_shift_index"] == 0.0


def test_a_mostly_unclassified_sample_is_flagged_not_read_as_a_measured_count(tmp_path):
    """A sample of 20 unclassified cells (masked vs unmasked crops: most atypical) read
    "ig_fraction 0.000 (0.0-16.8 %)", an empty not_callable and nothing else: a normal
    measured count. With no classified cell its shares and ratios are NaN now (0 of 0
    classified cells is no measured 0); half or more unclassified is mostly_unclassified
    in samples.csv, and the page names the sample in a box above its tables, with the
    usual cause."""
    from vae.analysis.samples import (
        FLAGGED_SAMPLES_SHOWN,
        proportion_ci,
        sample_profile,
        write_samples_html,
    )

    labels = ["myeloblast", "promyelocyte", "myelocyte", "band", "segmented_neutrophil"]
    labels += ["lymphocyte"]
    ok_calls = ["band", "segmented_neutrophil", "lymphocyte", "myelocyte", "myeloblast"] * 2
    obs = pd.DataFrame(
        {
            "vae_sample": ["all"] * 20 + ["most"] * 20 + ["ok"] * 10,
            "vae_modality": "image",
            "vae_label": ["band"] * 40 + ok_calls,
            "vae_call": ["unclassified"] * 38 + ["band", "lymphocyte"] + ok_calls,
            # 19 + 17 atypical, the rest of the unclassified doubtful
            "vae_atypical": [True] * 19 + [False] + [True] * 17 + [False] * 13,
            "vae_label_confidence": 0.9,
            "vae_maturation": 0.5,
            "edge_weight": 1.0,
        },
        index=[f"c{i}" for i in range(50)],
    )
    calls = {"image": labels}
    prof = sample_profile(obs, study_labels=labels, callable_calls=calls).set_index("sample")
    assert prof["n_classified"].to_dict() == {"all": 0, "most": 2, "ok": 10}
    assert prof["mostly_unclassified"].to_dict() == {"all": True, "most": True, "ok": False}
    assert prof.loc["all", "frac_unclassified"] == 1.0  # measured: 20 of 20
    assert prof.loc["most", "frac_unclassified"] == pytest.approx(0.9)
    # no classified cell: every ratio and every class's share NaN, intervals too
    for name in ("blast_fraction", "ig_fraction", "left_shift_index"):
        for part in ("", "_ci_low", "_ci_high", "_edge_corrected"):
            assert np.isnan(prof.loc["all", f"{name}{part}"]), name + part
    for c in labels:
        assert prof.loc["all", f"n_{c}"] == 0  # a true count of calls
        for part in ("", "_ci_low", "_ci_high", "_edge_corrected"):
            assert np.isnan(prof.loc["all", f"frac_{c}{part}"]), c + part
    assert prof.loc["all", "not_callable"] == ""  # callable classes, none called
    # two called cells among 20: still a count (the flag says what it is worth)
    assert prof.loc["most", "ig_fraction"] == 0.0
    ci = (prof.loc["most", "ig_fraction_ci_low"], prof.loc["most", "ig_fraction_ci_high"])
    assert ci == proportion_ci(0, 20)
    assert prof.loc["most", "frac_band"] == pytest.approx(0.05)
    # the other sample is as it was
    assert prof.loc["ok", "ig_fraction"] == pytest.approx(0.2)
    # samples.csv: the flag and the count machine-readable, the shares empty
    csv = tmp_path / "samples.csv"
    prof.reset_index().to_csv(csv, index=False)
    back = pd.read_csv(csv).set_index("sample")
    assert back["mostly_unclassified"].tolist() == [True, True, False]
    assert back["n_classified"].tolist() == [0, 2, 10]
    assert back.loc["all", ["ig_fraction", "frac_band"]].isna().all()

    def page(o: pd.DataFrame, **kw) -> str:
        p = tmp_path / "samples.html"
        pr = sample_profile(o, study_labels=labels, callable_calls=calls)
        write_samples_html(p, pr, o, None, callable_calls=calls, **kw)
        return p.read_text()

    text = page(obs)
    box = text.split("<section aria-labelledby='mostly-unclassified'")[1].split("</section>")[0]
    # the first thing under the title, above the definitions and the tables
    assert text.index("mostly-unclassified") < text.index("Definitions")
    assert text.index("</section>") < text.index("<h2>Samples</h2>")
    assert "2 samples mostly unclassified: their shares say little" in box
    assert (
        "<b>all</b>: 20 of 20 cells unclassified (100 %: 19 atypical, 1 doubtful); "
        "no cell was called a class, so its shares and ratios are empty (NaN), not 0 %"
    ) in box
    assert "<b>most</b>: 18 of 20 cells unclassified (90 %: 17 atypical, 1 doubtful)" in box
    assert "its shares count the 2 called cells among all 20" in box
    assert "<b>ok</b>" not in box
    # the usual cause, most cells being atypical: inputs unlike the training crops
    assert "Most of these cells are atypical" in box
    for words in ("embed.crop_masks=whole", "another stain", "magnification"):
        assert words in box, words
    assert "samples.csv: mostly_unclassified" in box
    # the table marks the rows; the ratios of the all-unclassified sample are NaN
    table = text.split("<h2>Samples</h2>")[1].split("</table>")[0]
    row = re.search(r"<tr[^>]*><td>all<br>(.*?)</tr>", table).group(1)
    assert "mostly unclassified" in row and "20 <b>(100 %)</b>" in row
    assert row.count("<td>NaN</td>") >= 3 and "0.000" not in row
    assert "<tr><td>ok</td>" in table  # unmarked
    # the differential: no 0 % with a counting interval for a sample of no called cell
    diff = text.split("<h2>Differential count</h2>")[1].split("</table>")[0]
    band = re.search(r"<tr><th>band</th>(.*?)</tr>", diff).group(1)
    assert band.startswith("<td>0</td><td colspan='2'><small>no cell classified</small>")
    assert "5.0 <small>(0.1-24.9)</small>" in band  # most's 1 band in 20
    # most of the unclassified doubtful: the cause says so (inputs still named)
    doubt = page(obs.assign(vae_atypical=False))
    assert "Most of these cells are doubtful: fewer than 50 %" in doubt
    assert "embed.crop_masks=whole" in doubt
    # no sample flagged: no box
    assert "<section aria-labelledby='mostly-unclassified'" not in page(obs[obs.vae_sample == "ok"])
    # many flagged samples: the first named, the rest counted; the rows layout says it
    n = FLAGGED_SAMPLES_SHOWN + 3
    many = pd.concat(
        [obs[obs.vae_sample == "all"].assign(vae_sample=f"p{k:02d}") for k in range(n)]
    )
    many.index = [f"m{i}" for i in range(len(many))]
    text = page(many)
    assert f"{n} samples mostly unclassified" in text and "and 3 more (samples.csv" in text
    assert "0 <small>(no cell classified)</small>" in text


def test_differential_count_of_many_samples_has_a_row_per_sample(tmp_path):
    """301 samples as columns made the differential ~25,000 px wide, the call names out
    of view (scale audit); above DIFFERENTIAL_SAMPLE_COLUMNS each sample is a row."""
    from vae.analysis.samples import (
        DIFFERENTIAL_SAMPLE_COLUMNS,
        sample_profile,
        write_samples_html,
    )

    def differential(n_samples: int) -> str:
        obs = pd.DataFrame(
            {
                "vae_sample": [f"patient {k}" for k in range(n_samples) for _ in range(3)],
                "vae_label": ["band", "myelocyte", "lymphocyte"] * n_samples,
                "vae_maturation": [0.7, 0.3, np.nan] * n_samples,
            }
        )
        page = tmp_path / f"s{n_samples}.html"
        write_samples_html(page, sample_profile(obs, bins=4), obs, None)
        return page.read_text().split("<h2>Differential count</h2>")[1].split("</table>")[0]

    few = differential(DIFFERENTIAL_SAMPLE_COLUMNS)
    assert re.findall(r"<tr><th>([^<]+)</th>", few)[-3:] == ["myelocyte", "band", "lymphocyte"]
    many = differential(DIFFERENTIAL_SAMPLE_COLUMNS + 1)
    rows = re.findall(r"<tr><th style='[^']*'>([^<]+)</th><td>(\d+)</td>", many)
    assert [r[0] for r in rows] == [f"patient {k}" for k in range(DIFFERENTIAL_SAMPLE_COLUMNS + 1)]
    assert all(r[1] == "3" for r in rows)  # cells per sample
    # the share with its counting interval (1 of 3 cells: 0.8-90.6 %)
    assert "<td>1 (33.3 % <small>(0.8-90.6)</small>)</td>" in many and "position:sticky" in many


def test_sample_profile_definitions():
    from vae.analysis.samples import sample_profile

    lab = [
        "myeloblast",
        "promyelocyte",
        "myelocyte",
        "metamyelocyte",
        "band",
        "segmented_neutrophil",
        "segmented_neutrophil",
        "lymphocyte",
    ]
    obs = pd.DataFrame(
        {
            "vae_sample": ["a"] * 8 + ["b"],
            "vae_label": [*lab, "lymphocyte"],
            "vae_maturation": [0.05, 0.15, 0.35, 0.55, 0.75, 0.95, 0.95, 0.5, 0.5],
        }
    )
    prof = sample_profile(obs, bins=10).set_index("sample")
    assert prof.loc["a", "ig_fraction"] == pytest.approx(3 / 8)
    # the I:T ratio: (PMY + MY + MMY + band) / (those + segmented); the blast is in neither
    assert prof.loc["a", "left_shift_index"] == pytest.approx(4 / 6)
    assert prof.loc["a", "it_denominator"] == 6 and prof.loc["a", "n_neutrophil_lineage"] == 7
    assert prof.loc["a", "blast_fraction"] == pytest.approx(1 / 8)
    assert np.isnan(prof.loc["b", "left_shift_index"])  # no neutrophil
    assert prof.loc["b", "blast_fraction"] == 0.0
    # stage names read loosely: another spelling of the same calls gives the same ratios
    spelt = ["MB", "PMY", "Myelocytes", "Metamyelocytes", "Band", "Segmented neutrophil"]
    spelt += ["neutrophil", "lymphocyte"]
    alias = sample_profile(obs.assign(vae_label=[*spelt, "lymphocyte"]), bins=10)
    alias = alias.set_index("sample")
    for col in ("blast_fraction", "ig_fraction", "left_shift_index"):
        assert alias.loc["a", col] == pytest.approx(prof.loc["a", col]), col
    assert prof.loc["a", "hist_09"] == pytest.approx(2 / 8)
    assert prof.loc["a", "n_segmented_neutrophil"] == 2 and prof.loc["b", "n_cells"] == 1
    # with the path's classes, the lymphocytes are left out of the position's histogram
    path = ["myeloblast", "promyelocyte", "myelocyte", "metamyelocyte", "band"]
    path += ["segmented_neutrophil"]
    on = sample_profile(obs, bins=10, path_classes=path).set_index("sample")
    assert on.loc["a", "n_on_path"] == 7 and on.loc["b", "n_on_path"] == 0
    assert on.loc["a", "hist_09"] == pytest.approx(2 / 7)
    assert on.loc["a", "hist_05"] == pytest.approx(1 / 7)  # the metamyelocyte, not the lymphocyte
    assert on.loc["a", "maturation_median"] == pytest.approx(0.55)
    assert np.isnan(on.loc["b", "maturation_median"])
    # a study that cannot call an IG (labelled by kind) reads NaN, not a normal 0
    kinds = ["Neutrophils", "lymphocyte", "Monocytes"]
    obs_k = obs.assign(vae_label=["Neutrophils"] * 8 + ["lymphocyte"])
    by_kind = sample_profile(obs_k, bins=10, study_labels=kinds).set_index("sample")
    for col in ("ig_fraction", "left_shift_index", "blast_fraction"):
        assert by_kind[col].isna().all(), col  # "Neutrophils" names no immature stage
    assert sample_profile(obs, bins=10, study_labels=path).set_index("sample").loc[
        "a", "ig_fraction"
    ] == pytest.approx(3 / 8)
    # no edge weights (crop folders, expression): no edge-corrected columns
    assert not [c for c in prof.columns if c.endswith("_edge_corrected")]


def test_every_share_of_a_sample_profile_has_its_counting_interval(tmp_path):
    """A share of few cells is uncertain (1 blast in 20 cells: 0.1-24.9 %), which a
    haematologist reads from Rümke's table; samples.csv gave the share alone. Each share
    now has its exact binomial interval, in the CSV and on the page."""
    from scipy import stats

    from vae.analysis.samples import proportion_ci, sample_profile, write_samples_html

    lab = ["myeloblast"] * 1 + ["promyelocyte"] * 2 + ["band"] * 3 + ["segmented_neutrophil"] * 14
    obs = pd.DataFrame(
        {
            "vae_sample": ["a"] * 20 + ["b"] * 100,
            "vae_label": lab + ["myeloblast"] * 5 + ["lymphocyte"] * 95,
            "vae_maturation": 0.5,
            "vae_label_confidence": 0.9,
        }
    )
    prof = sample_profile(obs, bins=4).set_index("sample")
    for sample, col, k, n in [
        ("a", "blast_fraction", 1, 20),
        ("a", "ig_fraction", 2, 20),
        ("a", "left_shift_index", 5, 19),  # (PMY + band) of the 19 neutrophils
        ("b", "blast_fraction", 5, 100),
        ("b", "frac_lymphocyte", 95, 100),
        ("a", "frac_lymphocyte", 0, 20),
    ]:
        want = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        got = prof.loc[sample, [f"{col}_ci_low", f"{col}_ci_high"]].to_numpy(float)
        np.testing.assert_allclose(got, [want.low, want.high], atol=1e-9, err_msg=col)
        assert got[0] <= prof.loc[sample, col] <= got[1]
    # Rümke's table: 5 of 100 -> 2-11 %
    assert [round(100 * v) for v in proportion_ci(5, 100)] == [2, 11]
    assert np.isnan(prof.loc["b", "left_shift_index_ci_low"])  # no neutrophil: NaN as the share
    page = tmp_path / "s.html"
    write_samples_html(page, prof.reset_index(), obs, None, 2, title="t", seed=0)
    text = page.read_text()
    assert "0.050 <small>(0.001-0.249)</small>" in text  # a's blast fraction
    assert "5.0 <small>(1.6-11.3)</small>" in text  # b's myeloblasts in the differential


def test_sample_profile_edge_corrected_shares(tmp_path):
    """A large cell kept only half as often as a small one counts twice: the corrected
    shares are the weighted ones, the raw counts stay as they were."""
    from vae.analysis.samples import sample_profile

    obs = pd.DataFrame(
        {
            "vae_sample": ["a"] * 4,
            "vae_label": ["promyelocyte", "segmented_neutrophil", "segmented_neutrophil", "x"],
            "vae_maturation": [0.2, 0.9, 0.9, np.nan],
            # the lymphocyte-like "x" came from a crop folder: no weight, counts 1
            "edge_weight": [3.0, 1.5, 1.5, np.nan],
        }
    )
    prof = sample_profile(obs, bins=10).set_index("sample")
    # the three smear cells' weights rescaled to a mean of 1 (3/2, 3/4, 3/4): they share
    # 3/4 of the sample as counted, redistributed by size; the crop cell keeps its 1/4
    assert prof.loc["a", "frac_promyelocyte"] == pytest.approx(1 / 4)
    assert prof.loc["a", "frac_promyelocyte_edge_corrected"] == pytest.approx(1.5 / 4)
    assert prof.loc["a", "frac_x_edge_corrected"] == pytest.approx(1 / 4)
    assert prof.loc["a", "ig_fraction_edge_corrected"] == pytest.approx(1.5 / 4)
    assert prof.loc["a", "left_shift_index"] == pytest.approx(1 / 3)
    assert prof.loc["a", "left_shift_index_edge_corrected"] == pytest.approx(1.5 / 3)
    fr = [c for c in prof.columns if c.startswith("frac_") and c.endswith("_edge_corrected")]
    assert prof.loc["a", fr].sum() == pytest.approx(1.0)
    # the page's differential: a row per call in maturation order, n / % / edge-corrected %
    from vae.analysis.samples import write_samples_html

    page = tmp_path / "samples.html"
    write_samples_html(page, prof.reset_index(), obs, None)
    text = page.read_text()
    diff = text.split("<h2>Differential count</h2>")[1].split("</table>")[0]
    rows = re.findall(r"<tr><th>([^<]+)</th>((?:<td>.*?</td>)+)</tr>", diff)
    assert [r[0] for r in rows] == ["promyelocyte", "segmented_neutrophil", "x"]
    # n, % with its counting interval (1 of 4: 0.6-80.6 %), edge-corrected %
    assert re.findall(r"<td>(.*?)</td>", rows[0][1]) == [
        "1",
        "25.0 <small>(0.6-80.6)</small>",
        "37.5",
    ]
    assert "<td>nan</td>" not in text  # NaN spelled as the definitions spell it


def test_smears_go_through_segment_and_empty_ones_are_rejects(study: Path, tmp_path: Path):
    """Smear sub-folders run through the segment code; images without cells are rejects."""
    import torch

    from segmentation.model import build_maskrcnn, save_checkpoint

    torch.manual_seed(0)
    args = {"arch": "resnet18_fpn", "min_size": 128, "max_size": 128, **LIGHT_HEADS}
    save_checkpoint(tmp_path / "det.pt", build_maskrcnn(**args), args)
    for sample in ("s1", "s2"):
        (tmp_path / "smears" / sample).mkdir(parents=True)
        img = np.full((96, 128, 3), (230, 200, 200), np.uint8)
        Image.fromarray(img).save(tmp_path / "smears" / sample / f"{sample}.png")
    (tmp_path / "smears" / "s2" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    paired = ad.read_h5ad(study / "paired.h5ad")
    _write_crops(tmp_path / "crops", paired, {"pat1": [0, 1]}, 16)
    # score_threshold=1: the (untrained) detector keeps nothing, so both smears are skipped
    d = _embed(
        study,
        "sm",
        f"embed.smears={tmp_path / 'smears'}",
        f"embed.crops={tmp_path / 'crops'}",
        "embed.crop_masks=whole",
        f"paths.inputs.segmentation_model={tmp_path / 'det.pt'}",
        "segmentation.score_threshold=1.0",
    )
    rej = pd.read_csv(d / "rejects.csv")
    items = set(rej["item"].map(lambda s: Path(s).name))
    assert {"s1.png", "s2.png", "bad.jpg", "broken.png"} <= items
    assert ad.read_h5ad(d / "query.h5ad").n_obs == 2


def test_the_log_and_manifest_name_the_study_detector_actually_used(
    study: Path, tmp_path: Path, caplog
):
    """embed.study with its own segment_train model: the log names that detector (not the
    shipped one), warns that a simulator-trained detector is used on smears, and the
    manifest records the study's model, latent and detector. Expression only: no
    detector at all."""
    import json
    import shutil

    from segmentation.model import build_maskrcnn, save_checkpoint
    from segmentation.shipped import SHIPPED_DETECTOR

    sd = study / "out" / "sd"
    if not sd.exists():
        shutil.copytree(study / "out" / "s" / "train", sd / "train")
        torch.manual_seed(0)
        args = {"arch": "resnet18_fpn", "min_size": 128, "max_size": 128, **LIGHT_HEADS}
        (sd / "segment_train").mkdir()
        save_checkpoint(sd / "segment_train" / "model.pt", build_maskrcnn(**args), args)
        man = {
            "stage": "segment_train",
            "status": "complete",
            "config": {"data": {"name": "synthetic"}},
        }
        (sd / "segment_train" / "manifest.json").write_text(json.dumps(man))
    (tmp_path / "smears").mkdir()
    img = np.full((96, 128, 3), (230, 200, 200), np.uint8)
    Image.fromarray(img).save(tmp_path / "smears" / "a.png")
    Image.fromarray(img).save(tmp_path / "smears" / "b.png")
    paired = ad.read_h5ad(study / "paired.h5ad")
    paired.write_h5ad(tmp_path / "expr.h5ad")
    det = sd / "segment_train" / "model.pt"
    with caplog.at_level("INFO"), pytest.raises(StageError, match="no cell in any input"):
        run_stage_in_process(
            [
                f"paths.root={tmp_path / 'out'}",
                "experiment=det",
                f"embed.study={sd}",
                f"embed.smears={tmp_path / 'smears'}",
                "segmentation.score_threshold=1.0",  # the untrained detector keeps nothing
                "hardware.torch_threads=1",
            ],
            "embed",
        )
    assert f"detector: {det} (the study's segment_train model)" in caplog.text
    assert "trained on simulated smears only" in caplog.text
    assert str(SHIPPED_DETECTOR) in caplog.text  # the warning's advice
    assert "no segment_train run, so the detector shipped" not in caplog.text
    inputs = json.loads((tmp_path / "out" / "det" / "embed" / "manifest.json").read_text())[
        "inputs"
    ]
    assert Path(inputs["segmentation_model"]["path"]) == det
    assert Path(inputs["model"]["path"]) == sd / "train" / "model.pt"
    caplog.clear()
    with caplog.at_level("INFO"):
        d = run_stage_in_process(
            [
                f"paths.root={tmp_path / 'out'}",
                "experiment=expr",
                f"embed.study={sd}",
                f"embed.expression={tmp_path / 'expr.h5ad'}",
                "hardware.torch_threads=1",
            ],
            "embed",
        )
    inputs = json.loads((d / "manifest.json").read_text())["inputs"]
    assert set(inputs) == {"model", "latent"}
    assert "detector" not in caplog.text


def test_missing_genes_are_imputed_from_the_cell(study: Path, tmp_path: Path):
    """impute=model: each cell's own reconstruction (not one constant), written out;
    impute=mean: the reference mean for every cell; both report which was used."""
    import json

    import torch

    from vae.api import Study, StudyError

    st = Study.load(study / "out" / "s")
    paired = ad.read_h5ad(study / "paired.h5ad")
    e = paired[paired.obs["has_expression"].to_numpy()].copy()
    hidden = list(e.var_names[[1, 4, 7]])
    keep = [g for g in e.var_names if g not in hidden]
    raw = ad.AnnData(X=e[:, keep].layers["counts"].copy(), var=pd.DataFrame(index=keep))
    st.impute, st.impute_iterations = "mean", 1
    mean_out = st.embed(raw)
    assert mean_out.uns["imputed_genes"] == hidden
    assert json.loads(mean_out.uns["genes"])["impute"] == "mean"
    fill_mean = mean_out.obsm["X_vae_imputed"]
    assert np.ptp(fill_mean, axis=0).max() < 1e-6  # one value per gene for every cell
    mean_log, _ = st.reference_expression()
    idx = [st.gene_names.index(g) for g in hidden]
    assert np.allclose(fill_mean[0], mean_log[idx], atol=1e-5)

    # one pass = the model's reconstruction of the mean-filled, library-corrected cell
    st.impute = "model"
    one = st.embed(raw)
    assert json.loads(one.uns["genes"])["impute"] == "model"
    fill = one.obsm["X_vae_imputed"]
    assert fill.shape == (e.n_obs, 3) and np.isfinite(fill).all()
    assert np.ptp(fill, axis=0).min() > 1e-4  # differs between cells
    st.impute = "mean"
    prep, _ = st.prepare(raw)
    with torch.inference_mode():
        lib = prep.counts.sum(1).clamp_min(1.0)
        post = st.model.encode(None, prep.x, log_library=torch.log(lib))
        dec = st.model.decode(post.expression[0], use_image=False)
    sc = dec.expression_scale.numpy()
    sc = sc / sc.sum(1, keepdims=True)
    obs = np.array([g not in hidden for g in st.gene_names])
    c = raw.X.sum(1, keepdims=True) / sc[:, obs].sum(1, keepdims=True) * sc[:, ~obs]
    expect = np.log1p(c / (raw.X.sum(1, keepdims=True) + c.sum(1, keepdims=True)) * 1e4)
    assert np.allclose(fill, expect, atol=1e-4)
    # the counts of the hidden genes join the library: observed values go down, never up
    st.impute = "model"
    prep_model, _ = st.prepare(raw)
    assert (prep_model.x[:, obs] <= prep.x[:, obs] + 1e-6).all()
    assert (prep_model.x[:, obs] < prep.x[:, obs] - 1e-3).any()
    # iterating moves toward a fixed point: later passes change the fill less
    fills = []
    for it in (2, 3, 4):
        st.impute_iterations = it
        fills.append(st.embed(raw).obsm["X_vae_imputed"])
    assert np.abs(fills[2] - fills[1]).max() <= np.abs(fills[1] - fills[0]).max() + 1e-6
    # nothing missing: nothing imputed, same latent whatever the method
    full = ad.AnnData(X=e.layers["counts"].copy(), var=e.var)
    a, b = st.embed(full), Study.load(study / "out" / "s", impute="mean").embed(full)
    assert "X_vae_imputed" not in a.obsm and np.allclose(a.obsm["X_vae"], b.obsm["X_vae"])
    with pytest.raises(StudyError, match="impute='median'"):
        Study.load(study / "out" / "s", impute="median")
    # the stage: the setting is checked before anything runs, and reaches the API
    raw.write_h5ad(tmp_path / "part.h5ad")
    with pytest.raises(StageError, match="embed.impute=median"):
        _embed(study, "imp0", f"embed.expression={tmp_path / 'part.h5ad'}", "embed.impute=median")
    out = _embed(study, "imp1", f"embed.expression={tmp_path / 'part.h5ad'}", "embed.impute=mean")
    q = ad.read_h5ad(out / "query.h5ad")
    assert np.allclose(q.obsm["X_vae_imputed"], fill_mean, atol=1e-6)


BCCD = SHARED_DATA / "smears" / "bccd"


@needs_shared(BCCD, "BCCD smears")
def test_study_without_a_detector_segments_smears_with_the_shipped_one(study: Path, tmp_path):
    """No segment_train/model.pt in the study: smears go through the shipped detector,
    each image's magnification measured (not the simulator's input_scale)."""
    import shutil

    from segmentation.shipped import SHIPPED_DETECTOR
    from vae.api import Study

    s = Study.load(study / "out" / "s")
    assert s.segmentation_model == SHIPPED_DETECTOR
    (tmp_path / "smears").mkdir()
    for name in ("BloodImage_00003.jpg", "BloodImage_00004.jpg"):  # one WBC each
        shutil.copy(BCCD / "JPEGImages" / name, tmp_path / "smears")
    a = s.read(tmp_path / "smears", kind="smears")
    assert sorted(a.obs["image"]) == ["BloodImage_00003.jpg", "BloodImage_00004.jpg"]
    # BCCD was trained at 0.21 network px per image px; the estimates land near it
    scales = np.array(list(a.uns["input_scales"].values()))
    assert len(scales) == 2 and np.all(np.abs(scales / 0.21 - 1) < 0.15)


CROPS = BCCD.parent.parent / "cells" / "bccd_cropped"


def test_premasked_cell_reads_a_crop_cut_out_on_the_background_only():
    from vae.inputs.query import premasked_cell

    h = w = 64
    yy, xx = np.mgrid[:h, :w]

    def disc(cy, cx, r):
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    img = np.zeros((h, w, 3), np.uint8)
    cell = disc(32, 30, 20)
    img[cell] = (180, 120, 200)
    img[disc(32, 30, 6)] = (3, 2, 4)  # a dark nucleus inside: a hole, filled
    img[2, 2] = (6, 6, 6)  # JPEG-like noise on the background
    m = premasked_cell(img)
    assert m is not None and np.array_equal(m, cell)
    assert premasked_cell(img, background=255) is None  # another background
    smear = img.copy()
    smear[:, 0] = (220, 200, 210)  # a crop of a smear: its border is not background
    assert premasked_cell(smear) is None
    speck = np.zeros((h, w, 3), np.uint8)
    speck[30:33, 30:33] = 200  # a speck, not a cell
    assert premasked_cell(speck) is None


def test_a_premasked_crop_keeps_its_framing():
    """An exported crop (a small simulated cell at source px in a 128 px crop) is only
    resized to the crop side, not enlarged to fill it: enlarged, the demo study called 57
    of 60 of its own exported cells promyelocytes (found by an API audit)."""
    from vae.inputs.query import frame_premasked

    yy, xx = np.mgrid[:128, :96]  # non-square: centred on a square of background
    cell = (yy - 64) ** 2 + (xx - 48) ** 2 <= 20**2
    img = np.zeros((128, 96, 3), np.uint8)
    img[cell] = (180, 120, 200)
    c, m, scale = frame_premasked(img, cell, 64)
    assert c.shape == (64, 64, 3) and m.shape == (64, 64) and scale == 0.5
    # the cell covers the same share of the (squared) frame as before: 20 px radius in 128
    assert abs(m.mean() - cell.sum() / 128**2) < 0.01
    assert m[32, 32] and not m[32, 5] and (c[~m] == 0).all()
    from scipy import ndimage as ndi

    inner = ndi.binary_erosion(m, iterations=2)
    assert np.abs(c[inner].astype(int) - (180, 120, 200)).max() <= 1


@needs_shared(CROPS, "bccd_cropped")
def test_crop_folder_cells_get_the_detectors_mask(study: Path, tmp_path):
    """embed.crops (default crop_masks=detector): each crop's centre cell with its
    instance mask, as stage=segment masks a crop folder; a crop without one is a reject
    row, never the whole square; crop_masks=whole keeps the whole image."""
    import shutil

    from vae.api import Study, StudyError

    names = ["Neutrophil/BloodImage_00006_1.jpg", "Eosinophil/BloodImage_00041_1.jpg"]
    for n in names:
        (tmp_path / "crops" / "pat").mkdir(parents=True, exist_ok=True)
        shutil.copy(CROPS / n, tmp_path / "crops" / "pat" / Path(n).name)
    blank = np.full((200, 200, 3), (235, 225, 225), np.uint8)  # no cell at all
    Image.fromarray(blank).save(tmp_path / "crops" / "pat" / "blank.png")
    s = Study.load(study / "out" / "s")
    a = s.read(tmp_path / "crops", kind="crops")
    assert list(a.obs_names) == ["pat/BloodImage_00006_1.jpg", "pat/BloodImage_00041_1.jpg"]
    assert (a.obs["sample"] == "pat").all()
    m = a.obsm["masks"]
    frac = m.mean(axis=(1, 2))
    # a cell with its mask: the centre and most of the crop (cells fill their crops), not
    # the square, and the background outside it is the background value
    assert np.all((frac > 0.3) & (frac < 0.9)), frac
    c = m.shape[1] // 2
    assert m[:, c, c].all()
    # crops are read at the model's side (area-resized beside a nearest-resized mask, as
    # prepare() resizes them): outside the mask only the 1 px rim the resize blends
    from scipy.ndimage import binary_dilation

    rim = np.stack([binary_dilation(k, structure=np.ones((3, 3), bool)) for k in m])
    assert (a.obsm["crops"][~rim] == 0).all()
    rej = a.uns["rejects"]
    assert [Path(r["item"]).name for r in rej] == ["blank.png"]
    assert rej[0]["reason"].startswith("no mask")
    assert (a.obs["mask_source"] == "detector").all()
    w = s.read(tmp_path / "crops", kind="crops", crop_masks="whole")
    assert w.n_obs == 3 and w.obsm["masks"].all()
    # a crop already cut out on the background (exported from cells.h5ad) keeps its mask
    (tmp_path / "cut").mkdir()
    Image.fromarray(a.obsm["crops"][0]).save(tmp_path / "cut" / "exported.png")
    cut = s.read(tmp_path / "cut", kind="crops")
    assert list(cut.obs["mask_source"]) == ["premasked"] and not cut.uns["rejects"]
    # (within the resize's 1 px rim, which a 16 px crop makes 7 % of its area)
    assert abs(cut.obsm["masks"][0].mean() - a.obsm["masks"][0].mean()) < 0.1
    with pytest.raises(StudyError, match="crop_masks='box'"):
        s.read(tmp_path / "crops", kind="crops", crop_masks="box")
    # the stage: the same rows, and a bad setting is refused before anything is written
    d = _embed(study, "cm", f"embed.crops={tmp_path / 'crops'}")
    q = ad.read_h5ad(d / "query.h5ad")
    assert list(q.obs_names) == list(a.obs_names)
    assert "blank.png" in pd.read_csv(d / "rejects.csv")["item"].iloc[0]
    with pytest.raises(StageError, match="embed.crop_masks=box"):
        _embed(study, "cm2", f"embed.crops={tmp_path / 'crops'}", "embed.crop_masks=box")
    assert not (study / "out" / "cm2" / "embed").exists()
    # a folder mixing a cut-out crop with crops the detector reads: the stage wrote
    # nothing ("Can't implicitly convert non-string objects to strings": the premasked
    # row's detector flags were NaN beside True/False; scale audit)
    shutil.copy(tmp_path / "cut" / "exported.png", tmp_path / "crops" / "pat" / "exported.png")
    d = _embed(study, "mix", f"embed.crops={tmp_path / 'crops'}")
    q = ad.read_h5ad(d / "query.h5ad")
    assert sorted(q.obs["mask_source"]) == ["detector", "detector", "premasked"]
    assert q.obs["low_score"].dtype == bool and not q.obs["low_score"].any()


@needs_shared(CROPS, "bccd_cropped")
def test_a_crop_whose_ruler_fails_is_read_again_at_its_folders_median_scale(tmp_path):
    """BloodImage_00079_1: its own scale estimate reads a lobe as a cell (~1.3 instead of
    ~0.25), so the detector sees the cell 5x too large and cuts it into pieces, none
    over the centre; a second pass at the folder's median estimate finds it whole."""
    import shutil

    from segmentation.magnification import estimate_scale
    from segmentation.shipped import shipped_detector
    from vae.inputs.query import segment_crop_folder

    names = ["BloodImage_00006_1.jpg", "BloodImage_00007_1.jpg", "BloodImage_00079_1.jpg"]
    (tmp_path / "n").mkdir()
    for n in names:
        shutil.copy(CROPS / "Neutrophil" / n, tmp_path / "n" / n)
    img = np.asarray(Image.open(tmp_path / "n" / names[2]).convert("RGB"))
    assert estimate_scale(img, 40.0, fallback=0.21).scale > 0.8  # the ruler fails
    a, rej = segment_crop_folder(tmp_path, shipped_detector())
    assert rej == [] and a.n_obs == 3
    scales = a.uns["input_scales"]
    assert 0.15 < scales[f"n/{Path(names[2]).stem}"] < 0.4  # read at the folder's median
    assert a.obsm["masks"][2].mean() > 0.3  # the whole cell, not a lobe


def test_nested_sample_folders_keep_their_patients_and_a_file_is_named(tmp_path, study: Path):
    """patientB/slide1/*.png is sample patientB (was dropped silently); two slides' files
    of one name stay two cells; a file given as a folder is a StudyError naming it."""
    from vae.api import Study, StudyError
    from vae.inputs.query import sample_images

    root = tmp_path / "crops"
    for rel in ("patientA/a.png", "patientB/slide1/x.png", "patientB/slide2/x.png", "top.png"):
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(f)
    (root / "patientB" / ".hidden").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "patientB" / ".hidden" / "h.png")
    got = [(s, p.relative_to(root).as_posix()) for s, p in sample_images(root)]
    assert got == [
        ("crops", "top.png"),
        ("patientA", "patientA/a.png"),
        ("patientB", "patientB/slide1/x.png"),
        ("patientB", "patientB/slide2/x.png"),
    ]
    st = Study.load(study / "out" / "s")
    a = st.read(root, kind="crops", crop_masks="whole")
    assert sorted(a.obs_names) == [
        "crops/top.png",
        "patientA/a.png",
        "patientB/slide1/x.png",
        "patientB/slide2/x.png",
    ]
    assert sorted(a.obs["sample"]) == ["crops", "patientA", "patientB", "patientB"]
    with pytest.raises(StudyError, match=r"a.png: kind='smears' reads a folder"):
        st.read(root / "patientA" / "a.png", kind="smears")


def test_images_the_study_trained_on_are_recognised_by_file_name(study: Path):
    """A query image whose stem the reference's image_ref holds (detection suffix and
    folders dropped) is flagged: embed warns that such cells are not new patients."""
    from vae.api import Study

    st = Study.load(study / "out" / "s")
    ref = st.reference
    ref.obs["image_ref"] = ""
    ref.obs.iloc[0, ref.obs.columns.get_loc("image_ref")] = "smear_0001_d002"
    ref.obs.iloc[1, ref.obs.columns.get_loc("image_ref")] = "cells/Basophil/Blood_42_1.jpg"
    ref.obs.iloc[2, ref.obs.columns.get_loc("image_ref")] = "set/001"
    got = st.seen_images(["smear_0001.jpg", "Blood_42_1.png", "001.png", "other_9.jpg"])
    assert got.tolist() == [True, True, False, False]  # "001": too short to trust


def test_study_embed_counts_and_warns_of_cells_the_study_holds(study: Path, caplog):
    """Expression cells by id as images by file name: an audit embedded 400 of a study's
    own Paul15 cells (399 ids in its latent.h5ad) and was told nothing; Study.embed warned
    of neither, the stage of images only."""
    import logging

    from vae.api import Study

    st = Study.load(study / "out" / "s")
    ref = st.reference
    has_expr = ref.obs["has_expression"].to_numpy(bool)
    ids = list(ref.obs_names[has_expr][:2])
    # a latent without expression_ref (the toy's): the ids of its rows with expression
    no_expr = ref.obs_names[~has_expr][0]
    assert st.seen_expression([*ids, "new_cell", no_expr]).tolist() == [1, 1, 0, 0]
    paired = ad.read_h5ad(study / "paired.h5ad")
    q = paired[:12].copy()
    q.obs["image"] = "smear_0001.jpg"
    ref.obs["image_ref"] = ""
    ref.obs.iloc[0, ref.obs.columns.get_loc("image_ref")] = "smear_0001_d002"
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        out = st.embed(q, "mine")
    n_img, n_expr = _with_each_modality(out.obs)
    assert n_img and n_expr
    assert out.uns["seen_by_study"] == {"images": n_img, "expression": n_expr}
    said = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith(f"mine: {n_img} of the {out.n_obs}") and "image files" in m for m in said
    )
    assert any(f"{n_expr} of the {out.n_obs}" in m and "cell ids of expression" in m for m in said)
    # expression_ref names the profiles where the latent has it (a 10x barcode, not the row)
    ref.obs["expression_ref"] = ""
    ref.obs.iloc[np.flatnonzero(has_expr)[0], ref.obs.columns.get_loc("expression_ref")] = "AC-1"
    assert st.seen_expression(["AC-1", ids[0]]).tolist() == [True, False]


def test_the_counts_check_reads_by_chunks_with_the_whole_arrays_answer(monkeypatch):
    """np.allclose over a whole matrix took +0.64 GiB for 43 M values (scale audit)."""
    import vae.study_prepare as prepare  # the module _is_counts reads the constant from

    monkeypatch.setattr(prepare, "COUNT_CHECK_VALUES", 7)
    m = np.arange(60, dtype=np.float32).reshape(6, 10)
    assert prepare._is_counts(m) and prepare._is_counts(np.zeros((0, 3)))
    for bad in (0.5, -1.0):
        m2 = m.copy()
        m2[-1, -1] = bad  # in the last chunk
        assert not prepare._is_counts(m2)


def test_a_second_embed_beside_the_first_with_a_variant_of_its_own(study: Path):
    """docs/embed.md's variant=NAME for a second embed was read as the study's train
    variant: ``<study>/train/p1/model.pt: no such file`` (concurrency audit)."""
    inp = f"embed.h5ad={study / 'paired.h5ad'}"
    d = _embed(study, "two", inp, "variant=p1")
    assert d == study / "out" / "two" / "embed" / "p1" and (d / "query.h5ad").is_file()


def test_a_detector_retrained_after_load_is_not_used_silently(study: Path, tmp_path):
    """A notebook's Study read new smears through a detector retrained meanwhile (22
    cells where it read 19) beside its old model (concurrency audit)."""
    import os

    from vae.api import Study, StudyError

    det = tmp_path / "model.pt"
    det.write_bytes(b"a detector")
    st = Study.load(study / "out" / "s", segmentation_model=det)
    smears = tmp_path / "smears"
    smears.mkdir()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(smears / "a.png")
    det.write_bytes(b"another detector")
    os.utime(det, ns=(1, 1))
    with pytest.raises(StudyError, match="changed since this study was loaded"):
        st.read(smears, "smears")
    det.unlink()
    with pytest.raises(StudyError, match="is gone"):
        st.read(smears, "smears")


def test_embed_study_is_read_locked_for_the_whole_stage(study: Path):
    """embed.study took no lock: a study retrained meanwhile gave a query of the old
    model whose manifest named the new one (concurrency audit). While the study's train
    folder is being written, embed is refused at once; while embed reads it, the study's
    train is (its lock is held shared)."""
    from pipeline.locks import stage_lock

    inp = f"embed.h5ad={study / 'paired.h5ad'}"
    with stage_lock(study / "out" / "s", "train", "", "s"):
        with pytest.raises(StageError, match="embed.study's train run .* is being written"):
            _embed(study, "locked", inp)
    assert not (study / "out" / "locked" / "embed").exists()
    # a train folder moved aside by the run rewriting it is still found by its lock
    from pipeline.locks import producer_lock

    (study / "out" / "moved" / ".locks").mkdir(parents=True, exist_ok=True)
    gone = producer_lock(study / "out" / "moved" / "train")
    want = stage_lock(study / "out" / "moved", "train", "", "moved")
    assert gone is not None and gone.path == want.path
    seen = {}

    def during(ctx, real=pipeline.stages.embed.load_study):
        lock = stage_lock(study / "out" / "s", "train", "", "s")
        seen["held"] = lock.held_elsewhere()
        return real(ctx)

    import unittest.mock

    with unittest.mock.patch.object(pipeline.stages.embed, "load_study", during):
        _embed(study, "reading", inp)
    assert seen["held"]


def test_the_study_folders_embed_locks_are_those_study_load_reads(tmp_path: Path):
    """One owner of a study's file layout (vae.api.study_files): embed's read-locks
    repeated Study.load's resolution, and a study given by its train folder locked no
    detector though Study.load read the one beside train/."""
    from omegaconf import OmegaConf

    from pipeline.stages.embed import _study_reads
    from vae.api import StudyError, study_files

    exp = tmp_path / "exp"
    for d in ("train", "train/wide", "segment_train"):
        (exp / d).mkdir(parents=True)
    for d in ("train", "train/wide", "segment_train"):
        (exp / d / "model.pt").write_bytes(b"")

    def cfg(study, variant=""):
        return OmegaConf.create(
            {"embed": {"study": str(study)}, "variant": variant, "paths": {"inputs": {}}}
        )

    cases = {  # given -> (train run, experiment folder, variant read)
        str(exp): (exp / "train", exp, ""),
        str(exp / "train"): (exp / "train", exp, ""),
        str(exp / "train" / "wide"): (exp / "train" / "wide", exp, "wide"),
        str(exp / "train" / "model.pt"): (exp / "train", exp, ""),
    }
    for given, (train, root, variant) in cases.items():
        f = study_files(given)
        assert (f.train, f.root, f.variant, f.model) == (train, root, variant, train / "model.pt")
        reads = _study_reads(cfg(given))
        assert reads == {
            "embed.study's train run": train,
            "embed.study's detector": exp / "segment_train",
        }, given
    # variant= names the study's sweep run only when it has one (else this embed's folder)
    assert _study_reads(cfg(exp, "wide"))["embed.study's train run"] == exp / "train" / "wide"
    assert _study_reads(cfg(exp, "mine"))["embed.study's train run"] == exp / "train"
    with pytest.raises(StudyError, match="variant"):
        study_files(exp / "train" / "model.pt", variant="wide")
    assert _study_reads(cfg(exp / "train" / "model.pt", "wide")) == {
        "embed.study's train run": exp / "train",  # no train/wide beside the model file
        "embed.study's detector": exp / "segment_train",
    }


def test_smear_cells_go_to_qupath_with_their_calls(study: Path, tmp_path: Path, monkeypatch):
    """qupath/<sample>/<image>.geojson: each smear cell's outline on its image with the
    call, its colour and the maturation position; crops (no slide) get no file."""
    import json

    import segmentation.inference
    from segmentation.model import build_maskrcnn, save_checkpoint
    from tests.segmentation.test_seg_infer import _Blobs, disc

    monkeypatch.setattr(segmentation.inference, "MaskRCNNDetector", lambda *a, **k: _Blobs())
    args = {"arch": "resnet18_fpn", "min_size": 128, "max_size": 128, **LIGHT_HEADS}
    save_checkpoint(tmp_path / "det.pt", build_maskrcnn(**args), args)
    for sample, n in (("s1", 1), ("s2", 2)):
        (tmp_path / "smears" / sample).mkdir(parents=True)
        img = np.full((160, 200, 3), (230, 200, 200), np.uint8)
        for k in range(n):
            img[disc(160, 200, 50 + 60 * k, 70 + 60 * k, 14)] = (120, 60, 160)
        Image.fromarray(img).save(tmp_path / "smears" / sample / "field.png")
    paired = ad.read_h5ad(study / "paired.h5ad")
    # crops already cut out on the background: read with their own masks under the
    # default (embed.crop_masks=auto: the study's masked cut), which also cuts the smear
    # cells out with their masks (embed.crop_masks=whole would cut them as squares)
    cut = paired[:2].copy()
    cut.obsm["crops"][~cut.obsm["masks"].astype(bool)] = 0
    _write_crops(tmp_path / "crops", cut, {"pat1": [0, 1]}, 16)
    d = _embed(
        study,
        "qp",
        f"embed.smears={tmp_path / 'smears'}",
        f"embed.crops={tmp_path / 'crops'}",
        f"paths.inputs.segmentation_model={tmp_path / 'det.pt'}",
        "segmentation.estimate_scale=false",
        "segmentation.input_scale=1.0",
        "segmentation.border_margin=2",
    )
    q = ad.read_h5ad(d / "query.h5ad")
    smear = q.obs[q.obs["vae_input"] == "smears"]
    assert len(smear) == 3
    files = sorted(p.relative_to(d / "qupath").as_posix() for p in (d / "qupath").rglob("*"))
    assert files == ["s1", "s1/field.geojson", "s2", "s2/field.geojson"]
    feats = json.loads((d / "qupath" / "s2" / "field.geojson").read_text())["features"]
    assert len(feats) == 2
    for f in feats:
        row = smear.loc[f["properties"]["name"]]
        assert f["properties"]["classification"]["name"] == str(row["vae_call"])
        assert len(f["properties"]["classification"]["color"]) == 3
        # a cell not on the path has no position: no measurement (was its projection)
        got = f["properties"].get("measurements", {}).get("vae_maturation", np.nan)
        assert got == pytest.approx(float(row["vae_maturation"]), nan_ok=True)
        ring = np.array(f["geometry"]["coordinates"][0])
        # on its disc, in image px (the 16 px model mask of a 128 px crop: 8 px a pixel;
        # torch's nearest resize had moved it 3.5 px right and down: 5 px off)
        cx, cy = ring[:, 0].mean(), ring[:, 1].mean()
        assert min(np.hypot(cx - (70 + 60 * k), cy - (50 + 60 * k)) for k in range(2)) < 3


def _real_layout(study: Path, dest: Path) -> tuple[Path, ad.AnnData]:
    """A copy of the study and its paired.h5ad laid out as the real chain's: the
    latent's rows carry ``image_ref`` (a crop, ``<smear>_d000``) and ``expression_ref``
    (the cell id), and paired.h5ad's rows are ``r000000``... with the same two columns
    (no ``image`` column, the cell id not the row name)."""
    import shutil

    sd = dest / "s"
    shutil.copytree(study / "out" / "s", sd)
    lat = ad.read_h5ad(sd / "train" / "latent.h5ad")
    ids = lat.obs_names.to_numpy()
    lat.obs["image_ref"] = pd.Series(
        [f"smear_{i:05d}_d000" for i in range(lat.n_obs)], index=lat.obs_names
    ).where(lat.obs["has_image"].astype(bool))
    lat.obs["expression_ref"] = pd.Series(ids, index=lat.obs_names).where(
        lat.obs["has_expression"].astype(bool)
    )
    lat.obs_names = [f"W{i}" for i in range(lat.n_obs)]  # neither the row nor the id
    lat.write_h5ad(sd / "train" / "latent.h5ad")
    paired = ad.read_h5ad(study / "paired.h5ad")
    paired.obs["image_ref"] = lat.obs["image_ref"].to_numpy()
    paired.obs["expression_ref"] = lat.obs["expression_ref"].to_numpy()
    paired.obs_names = [f"r{i:06d}" for i in range(paired.n_obs)]
    return sd, paired


def test_a_paired_query_is_matched_by_its_image_ref_and_expression_ref(
    study: Path, tmp_path, caplog
):
    """The study's own paired.h5ad (a documented embed.h5ad input) was counted 0 / 0:
    its rows are r000000..., the cell id is in obs['expression_ref'] and the crop in
    obs['image_ref'] (no 'image' column). Review: Study.embed(paired[:300]) of real_e2e
    gave {'images': 0, 'expression': 0}, while 151 of its ids are the study's."""
    import logging

    from vae.api import Study

    sd, paired = _real_layout(study, tmp_path)
    st = Study.load(sd)
    q = paired[:20].copy()
    with caplog.at_level(logging.WARNING, logger="vae.api"):
        out = st.embed(q, "own")
    n_img, n_expr = _with_each_modality(out.obs)
    assert n_img and n_expr and n_img + n_expr > out.n_obs  # some of each kind only too
    assert out.uns["seen_by_study"] == {"images": n_img, "expression": n_expr}
    said = [
        r.getMessage() for r in caplog.records if "the study's reference holds" in r.getMessage()
    ]
    assert len(said) == 2
    assert said[0].startswith(f"own: {n_img} of the {out.n_obs}") and "smear_" in said[0]
    assert said[1].startswith(f"own: {n_expr} of the {out.n_obs}") and "e.g. c0" in said[1]
    # the rule reads each row: one without the columns' value falls back to image / obs_names
    obs = pd.DataFrame(
        {
            "vae_modality": ["both", "both", "expression"],
            "image_ref": [np.nan, "smear_00001_d000", np.nan],
            "image": ["smear_00000.png", "new_00000.png", "x"],
            "expression_ref": [np.nan, "nobody", np.nan],
        },
        index=[str(paired.obs["expression_ref"].iloc[0]), "r1", "fresh"],
    )
    seen = st.seen_cells(obs)
    assert seen["images"].tolist() == [True, True, False]
    assert seen["expression"].tolist() == [True, False, False]
    # an image_ref the reference holds as it is counts, however short its stem (400
    # segmentation_wbc crops of real_e2e, ".../dataset1/001", were not)
    st.reference.obs["image_ref"] = st.reference.obs["image_ref"].astype(object)
    st.reference.obs.iloc[0, st.reference.obs.columns.get_loc("image_ref")] = "wbc/d1/001"
    short = pd.DataFrame(
        {"vae_modality": "image", "image_ref": ["wbc/d1/001", "other/001"]}, index=["a", "b"]
    )
    assert st.seen_cells(short)["images"].tolist() == [True, False]


def test_a_streamed_input_warns_once_of_the_cells_the_study_holds(
    study: Path, tmp_path, monkeypatch, caplog
):
    """Read block by block (hardware.stream_above_gib), an input logged one "N of the
    8192 embedded cells ..." warning per block (132/8192, 133/8192, 133/3616 for 20,000
    cells of the real chain) where summary.json had the total: one line per input now,
    with its totals; the study's paired.h5ad in the real chain's layout is counted."""
    import json

    import pipeline.streaming

    monkeypatch.setattr(pipeline.streaming, "EMBED_BLOCK_ROWS", 7)  # 60 rows: 9 blocks
    sd, paired = _real_layout(study, tmp_path)
    paired.write_h5ad(tmp_path / "paired_r.h5ad")
    with caplog.at_level("WARNING"):
        d = run_stage_in_process(
            [
                f"paths.root={tmp_path / 'out'}",
                "experiment=own",
                f"embed.study={sd}",
                f"embed.h5ad={tmp_path / 'paired_r.h5ad'}",
                "hardware.stream_above_gib=0",
                "hardware.torch_threads=1",
            ],
            "embed",
        )
    q = ad.read_h5ad(d / "query.h5ad", backed="r")
    n_img, n_expr = _with_each_modality(q.obs)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["cells_from_images_the_study_trained_on"] == n_img
    assert summary["cells_from_expression_the_study_trained_on"] == n_expr
    said = [
        r.getMessage() for r in caplog.records if "the study's reference holds" in r.getMessage()
    ]
    setting = f"embed.h5ad={tmp_path / 'paired_r.h5ad'}"
    assert len(said) == 2, said  # one line per kind, not one per block
    assert said[0].startswith(f"{setting}: {n_img} of the 60 embedded cells come from image")
    assert said[1].startswith(f"{setting}: {n_expr} of the 60 embedded cells have the cell ids")
    html = (d / "samples.html").read_text()
    assert f"{n_expr} of the 60 cells have the cell ids of expression profiles" in html
    assert "the model has seen" not in html and "the study&#x27;s reference holds" in html
