"""The real chain (+preset=real): stage=all precheck, segment on real-image sources
(smears with a BCCD class list, crop-folder mask mode), pair of detected cells.

A fake detector (dark blobs -> instances) stands in for the Mask R-CNN so the
results are exact; the checkpoint is a tiny untrained one (only loaded).
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from segmentation.cells import SegmentSettings, segment_image
from segmentation.crops import FilterSettings
from segmentation.inference import Detections
from segmentation.io import blank_as_read
from segmentation.sources import (
    LabelFileError,
    label_for_image,
    pick_centre_cell,
    read_bccd_labels,
)
from tests.helpers.run import SHARED_DATA, compose_config, needs_shared, run_stage_in_process
from tests.helpers.seg_synth import untrained_checkpoint

SHARED = SHARED_DATA

BG, CELL = (235, 215, 215), (110, 50, 150)


class BlobDetector:
    """Every connected dark region of a tile is one WBC (score 0.9)."""

    def __call__(self, tiles: list[np.ndarray]) -> list[Detections]:
        from scipy import ndimage

        out = []
        for t in tiles:
            lab, n = ndimage.label(t.mean(axis=2) < 150)
            out.append(Detections.from_masks([lab == i for i in range(1, n + 1)], [0.9] * n))
        return out


def _image(h: int, w: int, centres: list[tuple[int, int]], r: int = 14) -> np.ndarray:
    img = np.full((h, w, 3), BG, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = CELL
    return img


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", side=64)


def _data(root: Path) -> Path:
    """BCCD-like smears + class list, a TXL-like smear, an ImageFolder of crops."""
    _save(root / "bccd/BloodImage_00000.jpg", _image(100, 140, [(50, 70)]))
    _save(root / "bccd/BloodImage_00001.jpg", _image(100, 140, [(30, 40), (60, 100)]))
    (root / "labels.csv").write_text(
        ',Image,Category\n,0,NEUTROPHIL\n,1,"NEUTROPHIL, EOSINOPHIL"\n,7,MONOCYTE\n'
    )
    _save(root / "txl/a.jpg", _image(100, 100, [(50, 50)]))
    _save(root / "crops/Neutrophil/c1.png", _image(64, 64, [(32, 32)]))
    _save(root / "crops/Neutrophil/c2_blank.png", _image(64, 64, []))
    _save(root / "crops/Eosinophil/e1_offcentre.png", _image(64, 64, [(12, 12)], r=9))
    (root / "crops/Eosinophil/e2_corrupt.png").write_bytes(b"not an image")
    return root


def _sources(root: Path) -> str:
    return (
        "data.segment_sources=["
        f"{{name: bccd, kind: smears, path: '{root / 'bccd'}', scale: 1.0, "
        f"labels: '{root / 'labels.csv'}', labels_format: bccd_kaggle}},"
        f"{{name: txl, kind: smears, path: '{root / 'txl'}', scale: 1.0}},"
        f"{{name: cropped, kind: crop_folder, path: '{root / 'crops'}', scale: 1.0}}]"
    )


def _segment_overrides(tmp_path: Path, ckpt: Path, root: Path) -> list[str]:
    return [
        f"paths.root={tmp_path / 'out'}",
        "experiment=rc",
        f"paths.inputs.segmentation_model={ckpt}",
        "hardware.torch_threads=1",
        "segmentation.crop_size=32",
        "segmentation.tile_size=256",
        "segmentation.tile_overlap=64",
        "segmentation.min_area=100",
        _sources(root),
    ]


# ----------------------------------------------------------------------------
# library: labels and the centre cell
# ----------------------------------------------------------------------------


def test_bccd_labels_missing_image_is_a_reject(tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text(
        ',Image,Category\n,0,NEUTROPHIL\n,3,"EOSINOPHIL,EOSINOPHIL"\n,9,BASOPHIL\n,x,A\n'
    )
    labels, rej = read_bccd_labels(csv, {"BloodImage_00000.jpg", "BloodImage_00003.jpg"})
    assert labels == {
        "BloodImage_00000.jpg": ["neutrophil"],
        "BloodImage_00003.jpg": ["eosinophil", "eosinophil"],
    }
    by = {r["action"]: r for r in rej}
    assert by["label_without_image"]["image"] == "BloodImage_00009.jpg"
    assert by["label_without_image"]["field"] == "Image"
    assert "not in the smear folder" in by["label_without_image"]["reason"]
    assert by["bad_label_row"]["field"] == "Image"
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(LabelFileError, match="Category"):
        read_bccd_labels(tmp_path / "bad.csv", set())
    # an image listed twice, conflicting or not (the last line won silently): refused
    # naming both lines, as segmentation_wbc's and pair.label_corrections' readers do
    for i, second in enumerate(("EOSINOPHIL", "NEUTROPHIL")):
        (tmp_path / f"dup{i}.csv").write_text(f",Image,Category\n,0,NEUTROPHIL\n,00,{second}\n")
        with pytest.raises(LabelFileError, match=f"dup{i}.csv: column 'Image', line 3: ") as e:
            read_bccd_labels(tmp_path / f"dup{i}.csv", {"BloodImage_00000.jpg"})
        assert "listed again (first on line 2, 'NEUTROPHIL')" in str(e.value)
    # an empty file: was pandas' EmptyDataError out of stage=segment and stage=all
    for i, text in enumerate(("", "\n\n")):
        (tmp_path / f"empty{i}.csv").write_text(text)
        with pytest.raises(LabelFileError, match=f"empty{i}.csv: empty label file"):
            read_bccd_labels(tmp_path / f"empty{i}.csv", set())


def test_label_for_image_rules():
    assert label_for_image(1, ["neutrophil"]) == ("neutrophil", "labelled")
    assert label_for_image(2, ["eosinophil", "eosinophil"]) == ("eosinophil", "labelled")
    assert label_for_image(2, ["neutrophil"]) == ("", "count_mismatch")
    assert label_for_image(2, ["neutrophil", "eosinophil"]) == ("", "mixed_classes")
    assert label_for_image(1, []) == ("", "no_class")
    assert label_for_image(1, None) == ("", "unlabelled")


def test_pick_centre_cell():
    s = SegmentSettings(
        tile_size=128,
        tile_overlap=32,
        crop_size=32,
        filters=FilterSettings(min_area=50, drop_border=False, max_overlap_iou=None),
    )
    det = BlobDetector()
    # the centre cell wins over a brighter-scored neighbour cut by the border
    cells = segment_image(det, _image(64, 64, [(32, 32), (4, 60)], r=10), "a.png", s)
    pos, why = pick_centre_cell(cells)
    assert pos is not None and why == ""
    m = cells.crops.masks[pos]
    assert m[16, 16] and (cells.crops.images[pos][~m] == 0).all()
    pos, why = pick_centre_cell(segment_image(det, _image(64, 64, [(10, 10)], r=8), "b.png", s))
    assert pos is None and "centre" in why
    pos, why = pick_centre_cell(segment_image(det, _image(64, 64, []), "c.png", s))
    assert pos is None and why == "no detection"


# ----------------------------------------------------------------------------
# stage=all precheck
# ----------------------------------------------------------------------------


@needs_shared(SHARED / "smears" / "bccd", "BCCD: data=bccd's segment_train source is checked first")
def test_stage_all_precheck_fails_before_anything_runs(tmp_path, capsys):
    from pipeline import runner

    # data=bccd: no simulate in the run, and segment (no segment_sources) needs smears
    cfg = compose_config(["stage=all", "data=bccd", f"paths.root={tmp_path}", "experiment=pc"])
    assert runner.main(cfg) == 2
    err = capsys.readouterr().err
    assert "stage=segment cannot run" in err and "missing input 'smears'" in err
    assert not (tmp_path / "pc").exists() or not any(
        p.name in runner.ORDER for p in (tmp_path / "pc").iterdir()
    )


@needs_shared(SHARED / "expression", "Paul15: expression=paul15")
def test_precheck_counts_earlier_outputs_and_names_bad_source(tmp_path, tiny_ckpt):
    from pipeline.precheck import precheck
    from pipeline.runner import StageError

    root = _data(tmp_path / "data")
    base = [*_segment_overrides(tmp_path, tiny_ckpt, root), "stage=all", "pair=real_chain"]
    base.append("expression=paul15")
    cfg = compose_config([*base, f"paths.shared_data={tmp_path / 'data'}"])
    ok = compose_config([*base, "pair.crop_sources=[{kind: cells}]"])
    # cells (segment) and expression come from earlier stages of the run: fine
    precheck(ok, ["segment", "expression", "pair"])
    # pair=real_chain reads cells/segmentation_wbc under shared_data: not there
    with pytest.raises(StageError, match=r"stage=pair cannot run.*pair.crop_sources\[1\].path"):
        precheck(cfg, ["segment", "pair"])
    bad = compose_config([*base, "data.segment_sources.2.path=/nonexistent/crops"])
    with pytest.raises(StageError, match=r"stage=segment cannot run.*segment_sources\[2\].path"):
        precheck(bad, ["segment", "pair"])
    # a crop folder without class sub-folders: named before any source is read
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(b"x")
    bad = compose_config([*base, f"data.segment_sources.2.path={flat}"])
    with pytest.raises(StageError, match=r"segment_sources\[2\].path.*no class sub-folder"):
        precheck(bad, ["segment", "pair"])
    # a BCCD class list without its columns, or one of another folder: named at start
    (tmp_path / "nocols.csv").write_text("a,b\n1,2\n")
    bad = compose_config([*base, f"data.segment_sources.0.labels={tmp_path / 'nocols.csv'}"])
    with pytest.raises(StageError, match=r"segment_sources\[0\].labels.*no column 'Image'"):
        precheck(bad, ["segment", "pair"])
    (tmp_path / "other.csv").write_text(",Image,Category\n,40,NEUTROPHIL\n,41,MONOCYTE\n")
    bad = compose_config([*base, f"data.segment_sources.0.labels={tmp_path / 'other.csv'}"])
    with pytest.raises(StageError, match=r"none of its 2 line\(s\) names an image"):
        precheck(bad, ["segment", "pair"])
    assert not (tmp_path / "out").exists()


def test_precheck_real_preset_without_shared_data(tmp_path):
    """+preset=real with a wrong paths.shared_data fails at segment_train, before it trains."""
    from pipeline import runner

    cfg = compose_config(
        [
            "stage=all",
            "+preset=real",
            f"paths.root={tmp_path}",
            f"paths.shared_data={tmp_path / 'nowhere'}",
        ]
    )
    with pytest.raises(
        runner.StageError, match=r"stage=segment_train cannot run.*smear_sources\[0\]"
    ):
        from pipeline.precheck import precheck

        precheck(cfg, runner.stages_for(cfg))


@needs_shared(SHARED, "the real preset's data")
def test_precheck_real_preset_missing_expression_file(tmp_path):
    from pipeline import runner

    # earlier stages are fine; the missing expression file is named at stage=expression
    cfg = compose_config(
        [
            "stage=all",
            "+preset=real",
            f"paths.root={tmp_path}",
            "expression.input_file=/nonexistent/paul15.h5ad",
        ]
    )
    with pytest.raises(runner.StageError, match=r"stage=expression cannot run.*input_file"):
        from pipeline.precheck import precheck

        precheck(cfg, runner.stages_for(cfg))


# ----------------------------------------------------------------------------
# stage=segment on sources, then pair
# ----------------------------------------------------------------------------


@pytest.fixture
def fake_detector(monkeypatch):
    import pipeline.stages.segment as seg

    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: BlobDetector())


def test_segment_sources_labels_masks_and_rejects(tmp_path, tiny_ckpt, fake_detector):
    root = _data(tmp_path / "data")
    out = run_stage_in_process(_segment_overrides(tmp_path, tiny_ckpt, root), "segment")
    a = ad.read_h5ad(out / "cells.h5ad")
    obs = a.obs
    assert list(obs.source) == ["bccd", "bccd", "bccd", "txl", "cropped"]
    # no label: NaN on disk (scanpy's NA), "" as the pipeline reads it
    assert obs.label.isna().tolist() == [False, True, True, True, False]
    obs = blank_as_read(a).obs
    assert list(obs.label) == ["neutrophil", "", "", "", "neutrophil"]
    assert list(obs.label_status) == ["labelled", *["mixed_classes"] * 2, "unlabelled"] + [
        "labelled"
    ]
    assert obs.index[-1] == "cropped/Neutrophil/c1.png"
    # no specimen settings: "<source>:<image stem>", one id per smear image
    assert obs.specimen.iloc[0].startswith("bccd:BloodImage_")
    assert obs.specimen.iloc[-1] == "cropped:c1"
    crops, masks = a.obsm["crops"], a.obsm["masks"]
    assert masks.any(axis=(1, 2)).all() and not masks.all(axis=(1, 2)).any()
    assert (crops[~masks] == 0).all()  # background never scored
    rej = pd.read_csv(out / "rejects.csv").fillna("")
    got = {(r.source, r.image, r.field, r.action) for r in rej.itertuples()}
    assert got == {
        ("bccd", "BloodImage_00007.jpg", "Image", "label_without_image"),
        ("cropped", "Neutrophil/c2_blank.png", "mask", "no_mask"),
        ("cropped", "Eosinophil/e1_offcentre.png", "mask", "no_mask"),
        ("cropped", "Eosinophil/e2_corrupt.png", "image", "skipped"),
    }
    filters = json.loads((out / "summary.json").read_text())["filter_counts"]
    assert filters["kept"] == 5 and {"low_score", "at_border", "touching"} <= set(filters)
    assert filters["detections"] == len(pd.read_csv(out / "detections.csv"))
    summary = json.loads((out / "summary.json").read_text())["counts"]
    assert summary["cells"] == 5 and summary["labelled"] == 2 and summary["rejects"] == 4
    assert summary["per_source"]["cropped"] == {"crops": 4, "masked": 1, "no_mask": 2, "rejects": 3}
    assert (out / "contact_sheet.png").is_file() and (out / "overlays").is_dir()
    assert (out / "rejects.png").is_file()  # as stage=segment writes for a folder of smears
    # a rejected smear cell's id and the flags in words, as for a folder of smears (the
    # two columns were dropped here: the real chain's 329 rejected cells had no cell_id)
    assert {"cell_id", "detail"} <= set(rej.columns)
    # label images of the smear sources' images, one folder per source; crop folders none
    from skimage import io as skio

    assert sorted(p.name for p in (out / "masks").iterdir()) == ["bccd", "txl"]
    for src, g in obs[obs["mode"] == "smears"].groupby("source", observed=True):
        for image, cells in g.groupby("image", observed=True):
            lab = skio.imread(out / "masks" / src / (Path(image).stem + ".tif"))
            assert sorted(set(np.unique(lab)) - {0}) == sorted(cells.mask_label)
    # the sources' scales differ: cells.h5ad says so instead of the default 0.6
    assert a.uns["input_scale"] == "per image: obs['input_scale']"
    full = json.loads((out / "summary.json").read_text())
    assert full["filter_counts"]["images"] >= full["filter_counts"]["images_read"] > 0
    assert full["seconds_inference"] > 0 and full["images_per_second"] > 0
    # every detection row of a smear carries what its kept cell got in cells.h5ad
    det = pd.read_csv(out / "detections.csv").fillna("")
    smear_kept = det[(det.source == "bccd") & det.kept.astype(bool)].set_index("cell_id")
    in_h5ad = obs[obs.source == "bccd"]
    assert list(smear_kept.loc[in_h5ad.index, "label_status"]) == list(in_h5ad.label_status)
    assert set(det[det.source == "bccd"]["mode"]) == {"smears"}

    # pair: labelled detected cells paired by label, the rest image-only
    from tests.vae.inputs.test_pairing import _expr

    _expr().write_h5ad(tmp_path / "expression.h5ad")
    common = [
        f"paths.root={tmp_path / 'out'}",
        "experiment=rc",
        "pair.mode=by_label",
        "pair.min_class_size=2",
        f"paths.inputs.expression={tmp_path / 'expression.h5ad'}",
        "pair.crop_sources=[{kind: cells}]",
        "pair.crop_size=16",
        "+pair.label_map={neutrophil: Neutrophils}",
    ]
    d = run_stage_in_process(common, "pair")
    # as the pipeline reads it: a missing string (NaN on disk) is ""
    p = blank_as_read(ad.read_h5ad(d / "paired.h5ad"))
    img = p.obs[p.obs.has_image.astype(bool)]
    both = img[img.has_expression.astype(bool)]
    assert len(img) == 5 and len(both) == 2
    # each crop row carries its specimen (train keeps a specimen in one split)
    assert set(img.specimen) == set(obs.specimen) and set(p.obs.specimen[~p.obs.has_image]) <= {""}
    assert set(img[~img.has_expression.astype(bool)].label) == {""}
    assert pd.read_csv(d / "rejects.csv").empty


def _four_cells(tmp_path: Path):
    """expression.h5ad (the pairing tests' six profiles) and a cells.h5ad of four 16 px
    crops c0-c3: neutrophil, neutrophil, monocyte, unlabelled."""
    from tests.vae.inputs.test_pairing import _expr

    _expr().write_h5ad(tmp_path / "expression.h5ad")
    n, s = 4, 16
    masks = np.zeros((n, s, s), bool)
    masks[:, 4:12, 4:12] = True
    crops = np.repeat(np.where(masks[..., None], 120, 0), 3, axis=-1).astype(np.uint8)
    obs = pd.DataFrame(
        {"label": ["neutrophil", "neutrophil", "monocyte", ""], "source": "det"},
        index=[f"c{i}" for i in range(n)],
    )
    ad.AnnData(obs=obs, obsm={"crops": crops, "masks": masks}).write_h5ad(tmp_path / "cells.h5ad")
    return obs, crops


def test_segment_sources_lists_each_smear_folder_once(
    tmp_path, tiny_ckpt, fake_detector, monkeypatch
):
    """A smear source's folder was listed twice per run (for its images, then again for
    their QuPath file names), warning twice about any slide it skips; now once. _write's
    outputs are keyword-only, so two of its seven tables cannot be swapped unnoticed."""
    import inspect
    from collections import Counter

    import pipeline.segment_sources as ss
    import pipeline.stages.segment as seg
    from segmentation.io import list_images

    root = tmp_path / "data"
    _save(root / "txl/a.jpg", _image(100, 100, [(50, 50)]))
    _save(root / "txl/b.jpg", _image(100, 100, [(40, 40)]))
    listed: Counter = Counter()

    def counting(folder):
        listed[Path(folder)] += 1
        return list_images(folder)

    monkeypatch.setattr(ss, "list_images", counting)
    monkeypatch.setattr(seg, "list_images", counting)
    overrides = _segment_overrides(tmp_path, tiny_ckpt, root)
    overrides[-1] = f"data.segment_sources=[{{name: txl, kind: smears, path: '{root / 'txl'}'}}]"
    out = run_stage_in_process(overrides, "segment")
    assert listed == {root / "txl": 1}
    assert sorted(p.name for p in (out / "qupath" / "txl").iterdir()) == [
        "a.geojson",
        "b.geojson",
    ]
    params = list(inspect.signature(ss._write).parameters.values())
    assert [p.name for p in params[:2]] == ["ctx", "settings"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])


def test_pair_class_of_one_and_bad_cells_file(tmp_path):
    from pipeline.runner import StageError

    obs, crops = _four_cells(tmp_path)
    common = [
        f"paths.root={tmp_path / 'out'}",
        "pair.mode=by_label",
        "pair.min_class_size=2",
        f"paths.inputs.expression={tmp_path / 'expression.h5ad'}",
        f"paths.inputs.cells={tmp_path / 'cells.h5ad'}",
        "pair.crop_sources=[{kind: cells}]",
        "pair.crop_size=16",
        "+pair.label_map={neutrophil: Neutrophils, monocyte: Monocytes}",
    ]
    d = run_stage_in_process([*common, "experiment=ok"], "pair")
    rej = pd.read_csv(d / "rejects.csv")
    assert list(rej.image) == ["c2"] and list(rej.field) == ["label"]
    assert "monocyte" in rej.reason[0] and "min_class_size" in rej.reason[0]
    p = ad.read_h5ad(d / "paired.h5ad")
    assert p.obs.loc[p.obs.has_image.astype(bool), "label"].tolist().count("monocyte") == 0

    # a cells.h5ad without masks: a clear error naming file and field, nothing half-written
    ad.AnnData(obs=obs, obsm={"crops": crops}).write_h5ad(tmp_path / "bad.h5ad")
    bad = [*common, "experiment=bad", f"paths.inputs.cells={tmp_path / 'bad.h5ad'}"]
    with pytest.raises(StageError, match=r"bad.h5ad.*obsm\['masks'\]"):
        run_stage_in_process(bad, "pair")
    d = tmp_path / "out" / "bad" / "pair"
    assert not list(d.glob("paired*")) and not list(d.glob(".*paired*"))


def test_segment_crop_folder_nothing_segmentable(tmp_path, tiny_ckpt, fake_detector):
    """A crop folder whose images cannot be segmented: every crop a reject row, no crash."""
    root = tmp_path / "data"
    for k in range(3):
        _save(root / f"crops/Basophil/b{k}.png", _image(64, 64, []))
    overrides = _segment_overrides(tmp_path, tiny_ckpt, root)
    overrides[-1] = (
        f"data.segment_sources=[{{name: c, kind: crop_folder, path: '{root / 'crops'}'}}]"
    )
    out = run_stage_in_process(overrides, "segment")
    assert ad.read_h5ad(out / "cells.h5ad").n_obs == 0
    rej = pd.read_csv(out / "rejects.csv")
    assert len(rej) == 3 and set(rej.field) == {"mask"} and set(rej.reason) == {"no detection"}
    assert list(rej.image) == [f"Basophil/b{k}.png" for k in range(3)]
    # segmentation.max_images caps a crop folder too (per class), as it caps smear folders
    out = run_stage_in_process(
        [*overrides, "segmentation.max_images=2", "experiment=capped"], "segment"
    )
    assert list(pd.read_csv(out / "rejects.csv").image) == ["Basophil/b0.png", "Basophil/b1.png"]


def test_pair_label_corrections(tmp_path):
    """A reviewed label list replaces the crops' labels before pairing; unknown crops are
    reported in rejects.csv, a label that is no class stops the stage before writing."""
    from pipeline.runner import StageError
    from vae.inputs.schema import LABEL_ORIGINAL

    obs, _ = _four_cells(tmp_path)
    fix = tmp_path / "fix.csv"
    fix.write_text("image_ref,label\nc0,Monocytes\nc3,neutrophil\nzz,monocyte\n")
    common = [
        f"paths.root={tmp_path / 'out'}",
        "pair.mode=by_label",
        f"paths.inputs.expression={tmp_path / 'expression.h5ad'}",
        f"paths.inputs.cells={tmp_path / 'cells.h5ad'}",
        "pair.crop_sources=[{kind: cells}]",
        "pair.crop_size=16",
        "+pair.label_map={neutrophil: Neutrophils, monocyte: Monocytes}",
        f"pair.label_corrections={fix}",
    ]
    d = run_stage_in_process([*common, "experiment=ok"], "pair")
    p = blank_as_read(ad.read_h5ad(d / "paired.h5ad"))  # no label: "" as the pipeline reads
    img = p.obs[p.obs.has_image.astype(bool)].set_index("image_ref")
    assert img["label"].to_dict() == {
        "c0": "Monocytes",
        "c1": "Neutrophils",
        "c2": "Monocytes",
        "c3": "Neutrophils",
    }
    assert img[LABEL_ORIGINAL].to_dict() == dict(zip(obs.index, obs["label"]))
    assert img.has_expression.astype(bool).all()  # c3 now has a class, so a partner
    counts = json.loads((d / "pair_counts.json").read_text())["label_corrections"]
    assert counts["crops_relabelled"] == 2 and counts["not_found"] == 1
    assert counts["file"] == str(fix) and counts["key"] == "image_ref"
    assert "label_corrections" in p.uns["pair"]
    rej = pd.read_csv(d / "rejects.csv")
    assert list(rej.image) == ["zz"] and list(rej.action) == ["correction_skipped"]

    # a label that is no class: named with file and line, nothing half-written
    fix.write_text("image_ref,label\nc0,promyelocyte\n")
    with pytest.raises(StageError, match=r"fix.csv.*\[label\] line 2: label 'promyelocyte'"):
        run_stage_in_process([*common, "experiment=bad"], "pair")
    assert not list((tmp_path / "out" / "bad" / "pair").glob("*paired*"))
    # a missing file is refused before the stage starts
    with pytest.raises(StageError, match=r"pair.label_corrections=.*none.csv"):
        run_stage_in_process(
            [*common, "experiment=none", f"pair.label_corrections={tmp_path / 'none.csv'}"], "pair"
        )


SHARED_CROPS = SHARED_DATA / "cells" / "bccd_cropped"


@needs_shared(SHARED_CROPS, "bccd_cropped")
def test_segment_crop_folder_without_a_scale_is_measured(tmp_path):
    """A crop_folder source with no scale is measured crop by crop, as stage=embed reads
    crop folders (it ran at segmentation.input_scale before, config audit 2026-12-05),
    with the shipped detector."""
    import shutil

    names = ["Neutrophil/BloodImage_00006_1.jpg", "Eosinophil/BloodImage_00041_1.jpg"]
    for n in names:
        (tmp_path / "crops" / Path(n).parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED_CROPS / n, tmp_path / "crops" / n)
    out = run_stage_in_process(
        [
            f"paths.root={tmp_path / 'out'}",
            "experiment=measured",
            "hardware.torch_threads=1",
            f"data.segment_sources=[{{name: c, kind: crop_folder, path: '{tmp_path / 'crops'}'}}]",
        ],
        "segment",
    )
    cells = ad.read_h5ad(out / "cells.h5ad")
    assert cells.n_obs == 2, pd.read_csv(out / "rejects.csv")
    # measured (0.29 and 0.23 on 2026-12-05: a crop shows few red cells to measure by),
    # not segmentation.input_scale (0.6, the simulator's)
    scales = cells.obs["input_scale"].to_numpy(float)
    assert np.all((scales > 0.21 / 1.5) & (scales < 0.21 * 1.5)), scales
