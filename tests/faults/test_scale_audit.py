"""Scale defects of ``stage=embed`` found by the 2026-12 scale audit.

Each test pins a fix that changes how much memory or time a large input costs while
the results stay identical: the fixed code is checked against the formula or the
reading it replaced, on tiny inputs. The measured costs are in docs/performance.md,
"Embedding large inputs (2026-12-05)", never asserted here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

# --- crop folders: read at the model's side, premasked crops not measured ------------


def _disc_crop(side: int, r: int, seed: int, smear: bool) -> np.ndarray:
    """A cell disc; on background 0 (premasked) or on a noisy smear colour (detector)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    cell = (yy - side // 2) ** 2 + (xx - side // 2) ** 2 <= r * r
    img = np.zeros((side, side, 3), np.uint8)
    img[cell] = rng.integers(60, 220, (int(cell.sum()), 3))
    if smear:
        bg = np.clip(rng.normal((225, 190, 200), 8, img.shape), 0, 255).astype(np.uint8)
        img = np.where(cell[..., None], img, bg)
    return img


def _crop_folder(root: Path, n: int = 5, raw_at: tuple = (1, 3), side: int = 48) -> list[Path]:
    """``root/s/<i>_pre.png`` premasked crops and ``root/s/<i>_raw.png`` smear crops (at
    ``raw_at``: between the others, so a reordering shows); returns the raw ones."""
    (root / "s").mkdir(parents=True)
    raw = []
    for i in range(n):
        smear = i in raw_at
        p = root / "s" / f"{i}_{'raw' if smear else 'pre'}.png"
        Image.fromarray(_disc_crop(side, 14 + i, i, smear)).save(p)
        if smear:
            raw.append(p)
    return raw


def _fake_detector(monkeypatch, measured: list) -> None:
    """No detector: the centre cell of a crop is a disc mask over the whole crop cut at
    ``settings.crop_size``; ``pooled_estimates`` records the paths it is asked to measure."""
    import segmentation.autoscale
    import segmentation.inference
    import segmentation.model
    import segmentation.sources

    def centre_cell(det, image, name, settings, prefix, *rest):
        s = settings.crop_size
        rng = np.random.default_rng(len(name))
        crops = rng.integers(0, 255, (1, s, s, 3)).astype(np.uint8)
        yy, xx = np.mgrid[:s, :s]
        masks = ((yy - s // 2) ** 2 + (xx - s // 2) ** 2 <= (s // 3) ** 2)[None]
        table = pd.DataFrame({"cell_id": [f"{prefix}_d000"], "kept": [True], "area": [1]})
        cells = SimpleNamespace(table=table, crops=SimpleNamespace(images=crops, masks=masks))
        return SimpleNamespace(how="fake", scale=1.0, pos=0, cells=cells, reason="")

    def pooled_estimates(paths, cell_px, fallback, spread):
        measured.extend(Path(p) for p in paths)
        return {Path(p): SimpleNamespace(ok=True, own_scale=1.0, scale=1.0) for p in paths}

    monkeypatch.setattr(segmentation.sources, "centre_cell", centre_cell)
    monkeypatch.setattr(segmentation.autoscale, "pooled_estimates", pooled_estimates)
    monkeypatch.setattr(segmentation.model, "load_checkpoint", lambda *a, **k: (None, {}))
    monkeypatch.setattr(segmentation.inference, "MaskRCNNDetector", lambda *a, **k: None)


def _prepared(crops: np.ndarray, masks: np.ndarray, pair: int, size: int, bg: int):
    """What Study.prepare gives the model for crops read at their cut side: its
    ``_images`` resize, then ``from_anndata(image_size=size)``."""
    from vae.api import Study
    from vae.data import from_anndata

    a = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(crops))]))
    a.obsm["crops"], a.obsm["masks"] = crops, masks
    me = SimpleNamespace(
        pair_crop_size=pair, crop_size=size, config={"pair": {"background_value": bg}}
    )
    c, m, has = Study._images(me, a, "q")
    b = ad.AnnData(X=np.zeros((len(c), 0), np.float32), obs=a.obs.copy())
    b.obs["has_image"], b.obs["has_expression"] = has, False
    b.obsm["crops"], b.obsm["masks"] = c, m
    d = from_anndata(b, "q", image_size=size)
    return d.crops.permute(0, 2, 3, 1).numpy(), d.masks[:, 0].numpy().astype(bool)


@pytest.mark.parametrize(
    ("side", "pair", "size"), [(128, 64, 64), (128, 96, 64), (96, 96, 64), (64, 64, 64)]
)
def test_model_crops_give_the_crops_prepare_gives(side, pair, size):
    """Resized as each crop is read (ModelCrops), a crop is bit for bit what Study.prepare
    made of the crop at the detector's 128 px: the same latents from a quarter of the
    memory (20k crops peaked at 3.85 GiB)."""
    from vae.inputs.query import ModelCrops

    rng = np.random.default_rng(side + pair)
    crops = rng.integers(0, 256, (5, side, side, 3)).astype(np.uint8)
    masks = rng.random((5, side, side)) < 0.7
    want_c, want_m = _prepared(crops, masks, pair, size, 7)
    got = [ModelCrops(pair, size, 7)(c[None], m[None]) for c, m in zip(crops, masks)]
    assert np.array_equal(np.concatenate([g[0] for g in got]), want_c)
    assert np.array_equal(np.concatenate([g[1] for g in got]), want_m)
    # and prepare leaves crops read at the model's side as they are
    again_c, again_m = _prepared(want_c, want_m, pair, size, 7)
    assert np.array_equal(again_c, want_c) and np.array_equal(again_m, want_m)


def test_a_crop_folder_is_held_at_the_model_side(tmp_path, monkeypatch):
    """segment_crop_folder(model_crops=...) holds 64 px crops equal to ModelCrops of the
    128 px crops it held before, premasked and detector crops alike, in the same order."""
    from segmentation.cells import SegmentSettings
    from vae.inputs.query import ModelCrops, segment_crop_folder

    _crop_folder(tmp_path / "crops")
    _fake_detector(monkeypatch, [])
    settings = SegmentSettings(crop_size=128)
    cut, _ = segment_crop_folder(tmp_path / "crops", "unused.pt", settings=settings)
    mc = ModelCrops(64, 64, 0)
    held, _ = segment_crop_folder(
        tmp_path / "crops", "unused.pt", settings=settings, model_crops=mc
    )
    assert cut.obsm["crops"].shape == (5, 128, 128, 3)
    assert held.obsm["crops"].shape == (5, 64, 64, 3)
    assert list(held.obs_names) == list(cut.obs_names)
    assert list(held.obs["mask_source"]) == ["premasked", "detector"] * 2 + ["premasked"]
    want_c, want_m = mc(cut.obsm["crops"], cut.obsm["masks"])
    assert np.array_equal(held.obsm["crops"], want_c)
    assert np.array_equal(held.obsm["masks"], want_m)


def test_whole_crops_are_held_at_the_model_side(tmp_path):
    """read_crop_folder (crop_masks=whole) with model_crops: ModelCrops of what it read."""
    from vae.inputs.query import ModelCrops, read_crop_folder

    _crop_folder(tmp_path / "crops")
    cut, _ = read_crop_folder(tmp_path / "crops", 96)
    held, _ = read_crop_folder(tmp_path / "crops", 96, model_crops=ModelCrops(96, 64))
    want_c, want_m = ModelCrops(96, 64)(cut.obsm["crops"], cut.obsm["masks"])
    assert np.array_equal(held.obsm["crops"], want_c)
    assert np.array_equal(held.obsm["masks"], want_m)


def test_only_the_crops_the_detector_reads_are_measured(tmp_path, monkeypatch):
    """The magnification pre-pass measured every crop (79 s of a 313 s 20k-crop read) and
    warned of mixed magnifications from crops already cut out, which never use a scale."""
    from vae.inputs.query import segment_crop_folder

    raw = _crop_folder(tmp_path / "crops")
    (tmp_path / "crops" / "s" / "2_pre.png").write_bytes(b"not an image")  # a reject row
    measured: list = []
    _fake_detector(monkeypatch, measured)
    a, rej = segment_crop_folder(tmp_path / "crops", "unused.pt", estimate_cell_px=40.0)
    assert sorted(measured) == sorted(raw)
    # the detector's crops, read after the others, are back in their images' places
    b, rej_b = segment_crop_folder(tmp_path / "crops", "unused.pt", estimate_cell_px=None)
    assert (
        list(a.obs_names)
        == list(b.obs_names)
        == ["s/0_pre.png", "s/1_raw.png", "s/3_raw.png", "s/4_pre.png"]
    )
    assert list(a.obs["mask_source"]) == ["premasked", "detector", "detector", "premasked"]
    assert np.array_equal(a.obsm["crops"], b.obsm["crops"])
    assert np.array_equal(a.obsm["masks"], b.obsm["masks"])
    assert (
        [r["item"] for r in rej]
        == [r["item"] for r in rej_b]
        == [str(tmp_path / "crops/s/2_pre.png")]
    )
    measured.clear()
    _crop_folder(tmp_path / "premasked", raw_at=())
    segment_crop_folder(tmp_path / "premasked", "unused.pt", estimate_cell_px=40.0)
    assert measured == []  # none to measure: not called at all


def test_a_long_folder_read_logs_its_progress(tmp_path, monkeypatch, caplog):
    """A 20k-crop read ran ~4 min without a line: one every PROGRESS_EVERY images."""
    import vae.inputs.query as Q

    _crop_folder(tmp_path / "crops")
    _fake_detector(monkeypatch, [])
    monkeypatch.setattr(Q, "PROGRESS_EVERY", 2)
    with caplog.at_level(logging.INFO, logger="vae.inputs.query"):
        Q.segment_crop_folder(tmp_path / "crops", "unused.pt")
    lines = [r.getMessage() for r in caplog.records if "images read" in r.getMessage()]
    assert [ln.split(": ")[-1].split(",")[0] for ln in lines] == [
        "2 of 5 images read",
        "4 of 5 images read",
        "5 of 5 images read",
    ]


# --- model: a batch without images ----------------------------------------------------


def _rows_only_before(fn, rows, *tensors):
    """``vae.model._rows_only`` as it was (out-of-place scatter): the reference."""
    b = tensors[0].shape[0]
    if bool(rows.all()):
        return fn(*tensors)
    idx = rows.nonzero().flatten()
    outs = fn(*(t.index_select(0, idx) for t in tensors))
    return tuple(
        None if o is None else o.new_zeros((b, *o.shape[1:])).index_copy(0, idx, o) for o in outs
    )


@pytest.mark.parametrize("pick", ["none", "some", "all"])
def test_rows_only_gives_the_same_values_and_gradients(pick):
    """The in-place scatter of _rows_only (a full copy less per output; a decode of a
    batch without images ran 3x faster) returns the same tensors and gradients, and a
    batch without any row keeps the sub-batch's parameters in the graph (DDP)."""
    import torch

    from vae.model import _rows_only

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    fn = lambda x: (conv(x), None, conv(x).mean((2, 3)))  # noqa: E731
    x = torch.rand(6, 3, 8, 8)
    rows = {"none": torch.zeros(6, dtype=torch.bool), "all": torch.ones(6, dtype=torch.bool)}
    rows["some"] = torch.tensor([True, False, True, False, False, True])
    got, want = _rows_only(fn, rows[pick], x), _rows_only_before(fn, rows[pick], x)
    assert got[1] is None and want[1] is None
    for g, w in zip(got[::2], want[::2]):
        assert g.shape == w.shape and torch.equal(g, w)
    grads = []
    for out in (got, want):
        conv.zero_grad()
        (out[0].sum() + out[2].sum()).backward()
        assert conv.weight.grad is not None  # in the graph, even with no row
        grads.append(conv.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
    with torch.inference_mode():
        got = _rows_only(fn, rows[pick], x)
        want = _rows_only_before(fn, rows[pick], x)
    assert all(torch.equal(g, w) for g, w in zip(got[::2], want[::2]))


# --- analyses: row blocks ----------------------------------------------------------------


def test_project_onto_path_in_row_blocks_is_the_whole_formula(monkeypatch):
    """project_onto_path in row blocks (the (n, 200) float64 distances were 320 MB at
    200k cells) gives the positions of the formula on every row at once."""
    from scipy.spatial.distance import cdist

    import vae.analysis.traverse as T

    rng = np.random.default_rng(0)
    pts = np.cumsum(rng.normal(size=(6, 5)), 0)
    path = SimpleNamespace(s=np.linspace(0, 1, 6), points=pts)
    z = rng.normal(size=(1003, 5)) * 3
    sd = np.linspace(0, 1, 200)
    dense = np.stack([np.interp(sd, path.s, pts[:, j]) for j in range(5)], 1)
    want = sd[np.argmin(cdist(z, dense), axis=1)]
    monkeypatch.setattr(T, "PATH_ROWS", 100)  # ten full blocks and a part
    got = T.project_onto_path(z, path)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert T.project_onto_path(z[:0], path).shape == (0,)


def test_mahalanobis_in_row_blocks_is_the_whole_formula():
    """_sq_mahalanobis in row blocks (the (n, classes, d) float64 differences grew with
    the query) gives the values of the formula on every row at once."""
    from vae.analysis.anomaly import _sq_mahalanobis

    rng = np.random.default_rng(1)
    z, centres = rng.normal(size=(1003, 7)), rng.normal(size=(4, 7))
    a = rng.normal(size=(7, 7))
    precision = a @ a.T + np.eye(7)
    d = z[:, None, :] - centres[None]
    want = np.einsum("ncd,de,nce->nc", d, precision, d)
    got = _sq_mahalanobis(z, centres, precision, block=100)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert _sq_mahalanobis(z[:0], centres, precision).shape == (0, 4)


# --- expression tables: read as float32 -------------------------------------------------


def _old_read_table(path, sep):
    """How a CSV/TSV table was read before (float64, then cast): the reference."""
    return pd.read_csv(path, sep=sep, index_col=0)


@pytest.mark.parametrize(
    ("name", "transpose"), [("x.csv", False), ("x.tsv", False), ("x.csv.gz", True)]
)
def test_a_table_read_as_float32_is_the_table_read_before(tmp_path, monkeypatch, name, transpose):
    """CSV/TSV values parsed as float32 (not float64 and then copied: 12 bytes a value at
    the peak) give the AnnData of before: the values, the index as pandas infers it
    ("01" stays what it was), repeated gene names, either orientation."""
    import vae.inputs.expression as E

    rng = np.random.default_rng(0)
    genes = ["Mpo", "Elane", "Ltf", "Camp", "Mpo"]  # a repeat, kept as written
    cells = ["01", "2", "c3"] + [f"cell{i}" for i in range(37)]
    v = rng.lognormal(0, 3, (40, 5))
    v[::7, 2] = np.round(v[::7, 2])
    df = pd.DataFrame(v, index=cells, columns=genes)
    sep = "\t" if ".tsv" in name else ","
    (df.T if transpose else df).to_csv(tmp_path / name, sep=sep, float_format="%.17g")
    known = ["Mpo", "Elane", "Ltf", "Camp"]
    raw = E._read_table(tmp_path / name, sep)
    assert set(raw.dtypes) == {np.dtype(np.float32)}
    got = E.read_expression(tmp_path / name, known_genes=known)
    monkeypatch.setattr(E, "_read_table", _old_read_table)
    want = E.read_expression(tmp_path / name, known_genes=known)
    assert np.array_equal(got.X, want.X) and got.X.dtype == want.X.dtype
    assert list(got.obs_names) == list(want.obs_names)
    assert list(got.var_names) == list(want.var_names) == genes


def test_a_table_with_text_values_fails_as_before(tmp_path, monkeypatch):
    """A column of text falls back to the reading of before: the same error."""
    import vae.inputs.expression as E

    (tmp_path / "x.csv").write_text(",Mpo,Elane,note\nc1,1,2,a\nc2,3,4,b\n")
    with pytest.raises(E.ExpressionInputError) as got:
        E.read_expression(tmp_path / "x.csv", orientation="cells_by_genes")
    monkeypatch.setattr(E, "_read_table", _old_read_table)
    with pytest.raises(E.ExpressionInputError) as want:
        E.read_expression(tmp_path / "x.csv", orientation="cells_by_genes")
    assert str(got.value) == str(want.value) and "non-numeric columns ['note']" in str(got.value)
