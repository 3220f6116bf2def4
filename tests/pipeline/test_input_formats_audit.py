"""How the pipeline reads a researcher's own files: the defects of the input-format audit.

Each test builds tiny files in ``tmp_path``; those that need a study use the tiny study of
``tests/pipeline/test_embed.py`` (trained once per module, 2 epochs).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from PIL import Image, ImageOps

from pipeline.runner import StageError
from tests.pipeline.test_embed import _embed, study  # noqa: F401 - the module's fixture


def _png(path: Path, side: int = 20, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(path)
    return path


def _fake_detector(monkeypatch, seen: list[str]) -> None:
    """segment_smear_folder without a detector: each image gives one kept cell whose id is
    the prefix the reader asked for (the ids are what is tested, not the detection)."""
    # imported first: autoscale binds segment_images at import, and an import made
    # while the fake is in place would keep the fake for every later test
    import segmentation.autoscale  # noqa: F401
    import segmentation.cells
    import segmentation.inference
    import segmentation.model

    def segment_images(det, images, names, settings, id_prefixes=None):
        prefix = id_prefixes[0]
        seen.append(prefix)
        s = settings.crop_size
        table = pd.DataFrame({"cell_id": [f"{prefix}_d000"], "image": [names[0]], "kept": [True]})
        crops = SimpleNamespace(images=np.zeros((1, s, s, 3), np.uint8), masks=np.ones((1, s, s)))
        return [SimpleNamespace(table=table, crops=crops)]

    monkeypatch.setattr(segmentation.cells, "segment_images", segment_images)
    monkeypatch.setattr(segmentation.model, "load_checkpoint", lambda *a, **k: (None, {}))
    monkeypatch.setattr(segmentation.inference, "MaskRCNNDetector", lambda *a, **k: None)


# --- 1. smear cell ids -------------------------------------------------------------


def test_smear_cell_ids_keep_the_slide_folder_and_the_extension_of_twins(tmp_path, monkeypatch):
    """pA/slide1/img.jpg and pA/slide2/img.jpg were both pA/img_d000 (refused as duplicated
    cell ids); cell.jpg beside cell.png too. A flat folder keeps its ids as before."""
    from vae.inputs.query import segment_smear_folder

    root = tmp_path / "smears"
    for rel in ("pA/slide1/img.jpg", "pA/slide2/img.jpg", "s/cell.jpg", "s/cell.png", "s/one.png"):
        _png(root / rel)
    _png(root / "top.png")
    seen: list[str] = []
    _fake_detector(monkeypatch, seen)
    a, rejects = segment_smear_folder(root, "unused.pt")
    assert rejects == []
    assert sorted(a.obs_names) == [
        "pA/slide1/img_d000",
        "pA/slide2/img_d000",
        "s/cell_jpg_d000",
        "s/cell_png_d000",
        "s/one_d000",  # the ordinary case: sample/stem, unchanged
        "smears/top_d000",
    ]
    assert a.obs_names.is_unique
    assert sorted(a.obs["sample"]) == ["pA", "pA", "s", "s", "s", "smears"]


# --- 2, 3, 6, 8d. expression read by a study ----------------------------------------


def _counts_frame(study_dir: Path) -> pd.DataFrame:
    paired = ad.read_h5ad(study_dir / "paired.h5ad")
    rows = paired.obs["has_expression"].to_numpy()
    c = np.asarray(paired.layers["counts"])[rows][:10].astype(np.int64)
    return pd.DataFrame(c, index=[f"cell{i}" for i in range(10)], columns=paired.var_names)


def _write_10x(folder: Path, df: pd.DataFrame, prefix: str = "", gz: bool = True) -> Path:
    folder.mkdir(parents=True)
    z = ".gz" if gz else ""
    op = gzip.open if gz else open
    with op(folder / f"{prefix}matrix.mtx{z}", "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(df.to_numpy().T), field="integer")
    feats = "".join(f"ENSG{i:05d}\t{g}\tGene Expression\n" for i, g in enumerate(df.columns))
    with op(folder / f"{prefix}features.tsv{z}", "wt") as f:
        f.write(feats)
    with op(folder / f"{prefix}barcodes.tsv{z}", "wt") as f:
        f.write("\n".join(df.index) + "\n")
    return folder


def test_repeated_gene_names_are_repaired_as_stage_expression_does(study, tmp_path, caplog):  # noqa: F811
    """A 10x folder repeating a model gene and a gene the model does not use was refused
    ("var_names holds duplicated genes"); now made unique with stage=expression's warning,
    a model gene takes its first occurrence, and the gene report names the repeats."""
    from vae.api import Study

    st = Study.load(study / "out" / "s")
    df = _counts_frame(study)
    g0 = df.columns[0]
    extra = df.iloc[:, :2].copy() * 3 + 1
    extra.columns = [g0, "Xtra"]
    df["Xtra"] = df.iloc[:, 1]
    dup = pd.concat([df, extra], axis=1)  # columns: genes, Xtra, then g0 and Xtra again
    _write_10x(tmp_path / "dup", dup)
    renamed = dup.copy()
    renamed.columns = [*df.columns, f"{g0}-1", "Xtra-1"]
    _write_10x(tmp_path / "ok", renamed)
    with caplog.at_level(logging.WARNING):
        data, rep = st.prepare(st.read(tmp_path / "dup", "expression"), "dup")
    assert "occur more than once" in caplog.text and "var_names_make_unique" in caplog.text
    assert rep.repeated == [g0, "Xtra"] and rep.as_dict()["repeated_genes"] == [g0, "Xtra"]
    assert rep.matched == rep.n_model and not rep.missing
    ref, _ = st.prepare(st.read(tmp_path / "ok", "expression"), "ok")
    np.testing.assert_array_equal(data.x.numpy(), ref.x.numpy())  # the first occurrence


def test_orientation_is_told_by_the_model_genes_and_the_setting_works(study, tmp_path):  # noqa: F811
    """A genes x cells table of the model's genes (no granule-program gene, no barcode)
    was refused with advice embed ignored; now the model's genes tell the axes, and
    expression.orientation reaches Study.read from stage=embed."""
    from vae.api import Study

    st = Study.load(study / "out" / "s")
    df = _counts_frame(study)
    df.T.to_csv(tmp_path / "genes_by_cells.csv")
    a = st.read(tmp_path / "genes_by_cells.csv", "expression")
    assert list(a.var_names) == st.gene_names and a.n_obs == 10
    # an AnnData stored genes x cells: refused naming the setting, which then works
    t = ad.AnnData(X=df.T.to_numpy(np.float32))
    t.obs_names, t.var_names = list(df.columns), list(df.index)
    t.write_h5ad(tmp_path / "transposed.h5ad")
    with pytest.raises(StageError, match=r"expression\.orientation=genes_by_cells"):
        _embed(study, "orient_auto", f"embed.expression={tmp_path / 'transposed.h5ad'}")
    d = _embed(
        study,
        "orient_set",
        f"embed.expression={tmp_path / 'transposed.h5ad'}",
        "expression.orientation=genes_by_cells",
    )
    assert ad.read_h5ad(d / "query.h5ad").n_obs == 10


def test_counts_in_raw_are_used_and_another_layer_is_named(study, tmp_path, caplog):  # noqa: F811
    """scanpy's usual file (log X, counts in .raw.X) embedded as log values with "no raw
    counts"; now .raw's counts are used. Counts in another layer: the warning names
    expression.counts_layer, and Study.read(counts_layer=) uses them."""
    from vae.api import Study

    st = Study.load(study / "out" / "s")
    df = _counts_frame(study)
    counts = ad.AnnData(X=df.to_numpy(np.float32))
    counts.obs_names, counts.var_names = list(df.index), list(df.columns)
    counts.write_h5ad(tmp_path / "counts.h5ad")
    logx = np.log1p(df.to_numpy() / df.to_numpy().sum(1, keepdims=True) * 1e4)
    scan = ad.AnnData(X=logx.astype(np.float32), obs=counts.obs.copy(), var=counts.var.copy())
    scan.raw = counts
    scan.write_h5ad(tmp_path / "raw.h5ad")
    layer = ad.AnnData(X=logx.astype(np.float32), obs=counts.obs.copy(), var=counts.var.copy())
    layer.layers["umi"] = counts.X.copy()
    layer.write_h5ad(tmp_path / "layer.h5ad")
    ref, rep0 = st.prepare(st.read(tmp_path / "counts.h5ad", "expression"), "counts")
    with caplog.at_level(logging.INFO):
        got, rep = st.prepare(st.read(tmp_path / "raw.h5ad", "expression"), "raw")
    assert rep.values == "counts" and "counts from .raw.X" in caplog.text
    np.testing.assert_allclose(got.x.numpy(), ref.x.numpy(), rtol=1e-5, atol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, rep = st.prepare(st.read(tmp_path / "layer.h5ad", "expression"), "layer")
    assert rep.values == "lognorm" and "expression.counts_layer=umi" in caplog.text
    _, rep = st.prepare(st.read(tmp_path / "layer.h5ad", "expression", counts_layer="umi"), "l")
    assert rep.values == "counts"


def test_max_missing_genes_counts_the_genes_read_from_raw(study, tmp_path):  # noqa: F811
    """A scanpy file with 3 of the model's 12 genes in X (log values) and every gene's
    counts in .raw is embedded from .raw: embed.max_missing_genes counted X's genes and
    refused it (9 of 12 missing); the same X without .raw is still refused."""
    df = _counts_frame(study)
    counts = ad.AnnData(X=df.to_numpy(np.float32))
    counts.obs_names, counts.var_names = list(df.index), list(df.columns)
    few = df.iloc[:, :3]
    logx = np.log1p(few.to_numpy() / df.to_numpy().sum(1, keepdims=True) * 1e4)
    scan = ad.AnnData(X=logx.astype(np.float32), obs=counts.obs.copy())
    scan.var_names = list(few.columns)
    plain = scan.copy()
    scan.raw = counts
    scan.write_h5ad(tmp_path / "hvg.h5ad")
    plain.write_h5ad(tmp_path / "plain.h5ad")
    d = _embed(study, "hvg_raw", f"embed.expression={tmp_path / 'hvg.h5ad'}")
    q = ad.read_h5ad(d / "query.h5ad")
    assert q.n_obs == 10
    rep = next(iter(json.loads((d / "summary.json").read_text())["genes"].values()))
    assert rep["missing"] == []  # every model gene read from .raw
    with pytest.raises(StageError, match=r"embed\.max_missing_genes"):
        _embed(study, "hvg_plain", f"embed.expression={tmp_path / 'plain.h5ad'}")
    # counts_layer=.raw keeps X's 3 genes, normalised by the same library (all of .raw)
    from vae.api import Study

    st = Study.load(study / "out" / "s")
    auto, _ = st.prepare(st.read(tmp_path / "hvg.h5ad", "expression"), "auto")
    given, _ = st.prepare(st.read(tmp_path / "hvg.h5ad", "expression", counts_layer=".raw"), "r")
    cols = [st.gene_names.index(g) for g in few.columns]
    np.testing.assert_allclose(given.x.numpy()[:, cols], auto.x.numpy()[:, cols], rtol=1e-5)


def test_study_read_auto_takes_a_10x_folder_as_expression(study, tmp_path):  # noqa: F811
    """Study.read(<10x folder>) with kind='auto' read it as crops: 0 cells, no reject."""
    from vae.api import Study

    st = Study.load(study / "out" / "s")
    _write_10x(tmp_path / "tenx", _counts_frame(study))
    a = st.read(tmp_path / "tenx")
    assert a.n_obs == 10 and list(a.var_names) == st.gene_names


# --- 8. expression files ------------------------------------------------------------


def test_expression_files_gzip_header_uncompressed_v3_geo_prefix_and_outs(tmp_path):
    """A gzipped CSV's repeated gene became pandas' "A.1" unreported; an uncompressed v3
    folder and GEO-prefixed files failed "Did not find matrix.mtx.gz"; an outs/ folder
    failed without naming what to give."""
    from vae.inputs.expression import ExpressionInputError, read_expression

    df = pd.DataFrame(
        np.arange(12).reshape(3, 4), index=["c1", "c2", "c3"], columns=["A", "B", "A", "Mpo"]
    )
    with gzip.open(tmp_path / "dup.csv.gz", "wt") as f:
        df.to_csv(f)
    assert list(read_expression(tmp_path / "dup.csv.gz").var_names) == ["A", "B", "A", "Mpo"]
    uniq = df.set_axis(["A", "B", "C", "Mpo"], axis=1)
    for name, prefix, gz in (("v3", "", False), ("geo", "GSM999_", True)):
        a = read_expression(_write_10x(tmp_path / name, uniq, prefix, gz))
        assert list(a.var_names) == ["A", "B", "C", "Mpo"]
        assert list(a.obs_names) == ["c1", "c2", "c3"]
        np.testing.assert_array_equal(a.X.toarray(), uniq.to_numpy())
    _write_10x(tmp_path / "run" / "outs" / "filtered_feature_bc_matrix", uniq)
    with pytest.raises(ExpressionInputError, match=r"outs/filtered_feature_bc_matrix"):
        read_expression(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpressionInputError, match=r"matrix\.mtx\[\.gz\], features\.tsv"):
        read_expression(tmp_path / "empty")


# --- 4, 7. image folders: links, hidden files, types --------------------------------


def test_linked_slide_folders_are_followed_once_and_hidden_files_skipped(tmp_path):
    """smears/patientZ/slide1 -> elsewhere was dropped silently (rglob does not follow
    links); a link back up must not loop; a hidden file at the top was read."""
    from vae.inputs.query import sample_images

    root = tmp_path / "smears"
    _png(tmp_path / "elsewhere" / "z.png")
    _png(root / "patientZ" / "own.png")
    os.symlink(tmp_path / "elsewhere", root / "patientZ" / "slide1")
    os.symlink(root / "patientZ", root / "patientZ" / "loop")  # a cycle
    _png(root / ".k_hidden.png")
    _png(root / "top.webp")
    got = [(s, p.relative_to(root).as_posix()) for s, p in sample_images(root)]
    assert got == [
        ("smears", "top.webp"),
        ("patientZ", "patientZ/own.png"),
        ("patientZ", "patientZ/slide1/z.png"),
    ]


def test_stage_segment_lists_no_hidden_file_and_reads_webp(tmp_path):
    from segmentation.io import list_images, read_rgb

    _png(tmp_path / ".k_hidden.png")
    _png(tmp_path / "a.png")
    Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(tmp_path / "b.webp")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.webp"]
    r = read_rgb(tmp_path / "b.webp")
    assert r.ok and r.image.shape == (12, 16, 3)


# --- 5. stage=pair's image folders --------------------------------------------------


def test_image_folder_skips_hidden_folders_and_rejects_tiny_crops(tmp_path):
    """.ipynb_checkpoints became a class; a 4x4 px crop was read as a cell."""
    from segmentation.sources import list_crop_folder
    from vae.inputs.pairing import read_image_folder

    root = tmp_path / "crops_cls"
    _png(root / "neutrophil" / "a.png")
    _png(root / "neutrophil" / "tiny.png", side=4)
    _png(root / "neutrophil" / "._a.png")
    _png(root / ".ipynb_checkpoints" / "a-checkpoint.png")
    rejects: list = []
    cs = read_image_folder(root, 16, rejects=rejects)
    assert list(cs.obs["label"]) == ["neutrophil"]
    assert len(rejects) == 1 and "tiny.png" in json.dumps(rejects) and "too small" in str(rejects)
    assert [(f.name, c) for f, c in list_crop_folder(root)] == [
        ("a.png", "neutrophil"),
        ("tiny.png", "neutrophil"),  # stage=segment's reader rejects it itself (8 px)
    ]


# --- 9. EXIF orientation ------------------------------------------------------------


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    """A JPEG with EXIF orientation 8 was read in its stored frame (a cell on its side)."""
    from segmentation.io import load_rgb, read_rgb

    rng = np.random.default_rng(0)
    a = np.kron(rng.integers(0, 255, (4, 6, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "o.jpg") as f:
        upright = np.asarray(ImageOps.exif_transpose(f).convert("RGB"))
    r = read_rgb(tmp_path / "o.jpg")
    assert r.image.shape == upright.shape and f"exif orientation {orientation}" in r.converted
    np.testing.assert_array_equal(r.image, upright)
    np.testing.assert_array_equal(load_rgb(tmp_path / "o.jpg"), upright)
