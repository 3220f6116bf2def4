"""stage=evaluate and stage=traverse on a tiny trained run (in-process and as subprocesses)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers.run import FAST_ANALYSIS, compose_config, load_script, run_pipeline
from tests.helpers.vae_toy import make_paired

TINY_TRAIN = [
    "trainer.max_epochs=2",
    "trainer.batch_size=16",
    "trainer.projector_max_cells=0",
    "vae.channels=[8,16]",
    "vae.hidden=[16]",
    "vae.n_latent=4",
]


def _paired(path: Path) -> Path:
    make_paired(n=72, size=16, n_genes=12, image_only=4, expression_only=4).write_h5ad(path)
    return path


def _run_in_process(root: Path, paired: Path, stage: str, extra: list[str]) -> int:
    from pipeline import runner

    cfg = compose_config(
        [
            f"stage={stage}",
            f"paths.root={root}",
            "experiment=tiny",
            f"paths.inputs.paired={paired}",
            *extra,
        ]
    )
    return runner.main(cfg)


def _on_run(stage: str, root: Path, train: Path, *extra: str) -> int:
    """``stage`` on a finished ``stage=train`` folder's latent and model, in process."""
    from pipeline import runner

    cfg = compose_config(
        [
            f"stage={stage}",
            f"paths.root={root}",
            "experiment=x",
            f"paths.inputs.latent={train / 'latent.h5ad'}",
            f"paths.inputs.model={train / 'model.pt'}",
            *FAST_ANALYSIS,
            *extra,
        ]
    )
    return runner.main(cfg)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    paired = _paired(root / "paired.h5ad")
    assert _run_in_process(root, paired, "train", TINY_TRAIN) == 0
    return root, paired


def _check_outputs(run: Path) -> None:
    ev = run / "evaluate"
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_rows"] > 0
    for key in ("latent_structure", "reconstruction", "retrieval", "disentanglement"):
        assert key in metrics, key
    rb = metrics["readback"]  # drawings read back by the image encoder (vae.analysis.readback)
    assert rb["n"] >= 3
    drawn = ("joint", "from_expression_pose_free", "from_expression")
    assert set(rb) == {"n", "input", *drawn, *(f"grain_over_input_{k}" for k in drawn)}
    assert all(0 <= rb[k] <= 1 for k in ("input", *drawn))
    # the drawn cytoplasm's grain over the crop's: a positive ratio
    # (JSON null: NaN, no cytoplasm to read on the tiny crops)
    assert all(rb[k] is None or rb[k] > 0 for k in rb if k.startswith("grain_over_input_"))
    au = metrics["active_units"]
    assert 0 <= au["n_active"] <= au["n_latent"] == len(au["kl_per_dim"])
    assert au["n_active"] == sum(v > au["threshold_nats"] for v in au["kl_per_dim"])
    ls = pd.read_csv(ev / "latent_structure.csv")
    assert set(ls["latent"]) == {"joint", "image", "expression"}
    assert ls["knn_accuracy"].between(0, 1).all()
    rec = pd.read_csv(ev / "reconstruction.csv")
    assert {"image (joint)", "image -> expression", "expression -> image"} <= set(rec["what"])
    for t in metrics["tables"]:
        assert (ev / t).exists()
    assert (ev / "umap_labels.png").exists()
    # the simulator's t colours its own panel (a study without one has none)
    assert metrics["umap_labels_panels"] == ["label", "split", "maturation", "modality"]
    from vae.analysis.palette import label_order

    conf = pd.read_csv(ev / "confusion_joint.csv")  # classes in maturation order
    assert list(conf["true"]) == label_order(conf["true"]) == list(conf.columns[1:])
    assert list((ev / "tb").glob("events.out.tfevents.*"))
    # issue 15: imputation (LATE protocol) and atypical-cell scores
    imp = pd.read_csv(ev / "imputation.csv")
    assert list(imp["predictor"]) == ["model", "gene mean", "kNN smoothing (PCA)"]
    assert (imp["n_entries"] > 0).all() and imp["pearson"].between(-1, 1).all()
    assert metrics["imputation"]["n_hidden"] == imp["n_entries"].iloc[0]
    assert metrics["anomaly"]["n_scored"] == metrics["n_rows"]

    tr = run / "traverse"
    assert len(list(tr.glob("traverse_dim*.png"))) == 2  # top_k_dims
    rank = pd.read_csv(tr / "gene_ranking_gp.csv")
    assert len(rank) == 12 and {"gene", "log2fc", "spearman", "score"} <= set(rank.columns)
    assert (rank["score"].diff().dropna() <= 0).all()  # sorted
    path = pd.read_csv(tr / "path_features_gp.csv")
    assert len(path) == 6 and "granule_density" in path and "cytoplasm_grain" in path
    # the report's findings read the grain beside the count (real smears: docs/vae.md)
    findings = json.loads((tr / "traverse_summary.json").read_text())["key_findings"]
    # each measured crop with its class, and the class medians the report shows
    crops = pd.read_csv(tr / "real_crop_features.csv")
    # ... on how many crops: a reader asked for the n behind each finding
    assert any(
        f"with cytoplasm_grain measured on {len(crops)} held-out crops" in f for f in findings
    )
    assert list(crops.columns[:2]) == ["cell", "label"] and crops["label"].notna().all()
    by_class = pd.read_csv(tr / "real_morphology_by_class.csv")
    assert by_class["n"].sum() == len(crops)
    assert set(by_class["label"]) == set(crops["label"])
    keys = ["label"] + (["image_source"] if "image_source" in crops else [])
    lobes = crops.groupby(keys)["lobes"].median()
    assert np.allclose(by_class.set_index(keys).loc[lobes.index, "lobes"], lobes)
    truth = pd.read_csv(tr / "truth_recovery.csv")
    assert "gp_path_position_vs_true_t_spearman" in set(truth["measure"])
    # every measure says how many cells it rests on (the path reads every code, the
    # image measures only the cells with a crop)
    assert truth["n"].notna().all() and (truth["n"] >= 3).all()
    # the report embeds every figure of both stages
    html = (tr / "report.html").read_text()
    embedded = set(re.findall(r'data-file="([^"]+)"', html))
    pngs = {p.name for p in tr.glob("*.png")} | {p.name for p in ev.glob("*.png")}
    assert pngs and pngs == embedded
    assert html.count("<figcaption>") == len(embedded)
    assert "data:image/png;base64," in html and "Config" in html
    assert "What the instruments read on the real crops, by class" in html
    assert "Imputation, denoising and atypical cells" in html
    # the interactive page next to the report: one file, its data inline
    page = (tr / "study.html").read_text()
    payload = json.loads(
        re.search(r'id="study-data">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</")
    )
    assert len(payload["decoded"]) == len(payload["s"]) == 6  # path_steps
    assert len(payload["cells"]) == 80 and all(len(n) == 6 for n in payload["nearest"])
    assert payload["colours"]["myeloblast"] != payload["colours"]["myelocyte"]


def test_evaluate_and_traverse_in_process(tiny_run):
    root, paired = tiny_run
    # overwrite=true: the module's run may already hold these stages (a rerun, or another
    # test run first); this test is then independent of test order
    again = [*FAST_ANALYSIS, "overwrite=true"]
    assert _run_in_process(root, paired, "evaluate", again) == 0
    assert _run_in_process(root, paired, "traverse", again) == 0
    _check_outputs(root / "tiny")
    man = json.loads((root / "tiny" / "traverse" / "manifest.json").read_text())
    assert man["status"] == "complete" and "evaluation" in man["inputs"]


def test_evaluate_refuses_more_neighbours_than_labelled_cells(tiny_run, tmp_path, caplog):
    """analysis.knn_k above the labelled cells would call every cell the commonest
    label: refused by name, not scored."""
    root, paired = tiny_run
    run = root / "tiny" / "train"
    assert _on_run("evaluate", tmp_path, run, "analysis.knn_k=100000") == 2
    assert "analysis.knn_k=100000 is more than the" in caplog.text


def test_umap_has_no_all_grey_maturation_panel_for_data_without_maturation(
    tiny_run, tmp_path, monkeypatch
):
    """A real or own-data study has no simulator t and no pseudotime: its umap_labels.png
    drew an all-grey maturation panel. Dropped now, the figure's title says why, and
    metrics.json lists the panels drawn."""
    import shutil

    import anndata as ad

    from vae.analysis import figures

    titles = []
    draw = figures.scatter_panel

    def spy(emb, columns, suptitle, *args, **kwargs):
        titles.append((list(columns), suptitle))
        return draw(emb, columns, suptitle, *args, **kwargs)

    monkeypatch.setattr(figures, "scatter_panel", spy)
    root, _ = tiny_run
    train = root / "tiny" / "train"
    lat = ad.read_h5ad(train / "latent.h5ad")
    assert np.isfinite(lat.obs["maturation"].to_numpy(float)).any()  # the demo's t
    lat.obs["maturation"] = np.nan
    own = tmp_path / "own"
    own.mkdir()
    lat.write_h5ad(own / "latent.h5ad")
    shutil.copy(train / "model.pt", own / "model.pt")  # the latent's own model
    assert _on_run("evaluate", tmp_path / "run", own) == 0
    metrics = json.loads((tmp_path / "run" / "x" / "evaluate" / "metrics.json").read_text())
    assert metrics["umap_labels_panels"][:2] == ["label", "split"]
    assert "maturation" not in metrics["umap_labels_panels"]
    cols, title = next((c, t) for c, t in titles if "of the shared latent" in t)
    assert "maturation" not in cols
    assert "no maturation panel: no maturation value in these data" in title
    assert "(obs['maturation'] is empty: no simulator t, no pseudotime)" in title


def test_latent_holds_anomaly_scores_and_exclude_labels_moves_rows_to_test(tiny_run):
    import anndata as ad
    import numpy as np

    from pipeline.runner import StageError
    from pipeline.stages.train import exclude_labels
    from vae.data import load_paired
    from vae.inputs.schema import ANOMALY_COLUMNS, ANOMALY_SCORE

    root, paired = tiny_run
    lat = ad.read_h5ad(root / "tiny" / "train" / "latent.h5ad")
    for col in ANOMALY_COLUMNS.values():
        assert col in lat.obs, col
    assert np.isfinite(lat.obs[ANOMALY_SCORE]).all()
    img_only = ~lat.obs["has_expression"].to_numpy(bool)
    assert lat.obs.loc[img_only, ANOMALY_COLUMNS["expression_latent"]].isna().all()
    d = load_paired(paired)
    split = np.array(["train"] * d.n, dtype=object).astype(str)
    out = exclude_labels(split, d, ["lymphocyte"])
    lymph = np.asarray(d.label_names)[d.labels.numpy()] == "lymphocyte"
    assert (out[lymph] == "test").all() and (out[~lymph] == "train").all()
    with pytest.raises(StageError, match="exclude_labels"):
        exclude_labels(split, d, ["basophil"])


def test_traverse_without_paired_data_still_reports(tiny_run, tmp_path):
    root, _ = tiny_run
    # no paired input: latent + model only -> traversals and paths, no real-crop table
    from pipeline import runner

    cfg = compose_config(
        [
            "stage=traverse",
            f"paths.root={tmp_path}",
            "experiment=x",
            f"paths.inputs.latent={root / 'tiny' / 'train' / 'latent.h5ad'}",
            f"paths.inputs.model={root / 'tiny' / 'train' / 'model.pt'}",
            *FAST_ANALYSIS,
        ]
    )
    assert runner.main(cfg) == 0
    out = tmp_path / "x" / "traverse"
    assert (out / "report.html").exists() and (out / "gene_ranking_gp.csv").exists()
    assert not (out / "real_crop_features.csv").exists()
    assert (
        "no finished stage=evaluate of this run was found when this report was written"
        in (out / "report.html").read_text()
    )


def _record_decodes(monkeypatch):
    """Make ``vae.analysis.traverse.decode`` record (codes, output) of every call; returns
    the record and the real decode."""
    from vae.analysis import traverse as T

    calls = []
    real_decode = T.decode

    def recording_decode(model, z, *args, **kw):  # the real decode, its codes recorded
        out = real_decode(model, z, *args, **kw)
        calls.append((np.asarray(z, np.float64).copy(), out))
        return out

    monkeypatch.setattr(T, "decode", recording_decode)
    return calls, real_decode


def test_traverse_decodes_cells_from_their_crop_and_paths_from_the_reported_latent(
    tiny_run, tmp_path, monkeypatch
):
    """The per-cell decodes compared with truth come from each crop's single-view code
    (encode(views=1)); path centroids use the reported, pose-free latent."""
    from vae.analysis import traverse as T
    from vae.analysis.run import Outputs, full_codes, load_run, split_rows
    from vae.analysis.settings import AnalysisSettings
    from vae.analysis.study import traverse_study
    from vae.infer import encode_dataset

    root, paired = tiny_run
    run = root / "tiny" / "train"
    rd = load_run(run / "latent.h5ad", run / "model.pt", paired)
    assert rd.model.args.encode_views == 8  # the trained default: a pose-free latent
    lat = rd.latent
    # simulator-like truth, so the truth recovery decodes the held-out cells with an image
    has_img = rd.data.has_image.numpy()
    t = lat.obs["t"].to_numpy(float)
    lat.obs["granule_density"] = np.where(has_img & np.isfinite(t), 1 - t, np.nan)
    lat.obs["lobes"] = np.where(np.isfinite(t), 1 + np.round(3 * t), np.nan)
    calls, real_decode = _record_decodes(monkeypatch)
    a = AnalysisSettings(
        umap=False, top_k_dims=2, n_steps=5, path_steps=6, path_classes=["myeloblast", "myelocyte"]
    )
    summary = traverse_study(rd, a, Outputs(tmp_path), tmp_path / "report.html", None, "t", "s", {})
    rows = split_rows(lat, "test")
    ok = rows[np.isfinite(lat.obs["granule_density"].to_numpy(float)[rows])]
    assert summary["truth_recovery"]["n_cells"] == ok.size >= 3
    z1 = encode_dataset(rd.model, rd.data, rows=ok, views=1).joint
    z_reported = full_codes(lat)[ok]
    assert np.abs(z1 - z_reported).max() > 1e-3  # the two codes differ
    cell_calls = [c for c in calls if c[0].shape == z1.shape and np.allclose(c[0], z1, atol=1e-5)]
    assert len(cell_calls) == 1
    assert not any(c[0].shape == z1.shape and np.allclose(c[0], z_reported) for c in calls)
    np.testing.assert_allclose(cell_calls[0][1].images, real_decode(rd.model, z1).images, atol=1e-6)
    # the GP path runs through the class centroids of the reported latent
    labels = lat.obs["label"].astype(str).to_numpy()
    cents = T.class_centroids(full_codes(lat), labels, order=a.path_classes)
    gp = T.gp_path(cents.points, a.path_steps, a.gp_length_scale, a.gp_noise, 0)
    assert any(c[0].shape == gp.points.shape and np.allclose(c[0], gp.points) for c in calls)


def test_cells_drawn_from_expression_take_a_training_cells_pose(tiny_run):
    """evaluate's "from expression" column: each row's expression-only code plus the pose
    (single-view minus reported code) of the training crop nearest it, never a held-out
    crop; a single-view model lends no pose."""
    import dataclasses

    from vae.analysis import traverse as T
    from vae.analysis.run import (
        AnalysisError,
        full_codes,
        in_training_poses,
        load_run,
        split_rows,
    )
    from vae.infer import encode_dataset

    root, paired = tiny_run
    run = root / "tiny" / "train"
    rd = load_run(run / "latent.h5ad", run / "model.pt", paired)
    test = split_rows(rd.latent, "test")
    rows = test[rd.data.has_expression.numpy()[test] & rd.data.has_image.numpy()[test]][:6]
    assert rows.size >= 3
    e = encode_dataset(rd.model, rd.data, rows=rows).expression
    got = in_training_poses(rd, e, 4)
    split = rd.latent.obs["split"].astype(str).to_numpy()
    lenders = np.flatnonzero((split == "train") & rd.data.has_image.numpy())
    one = encode_dataset(rd.model, rd.data, rows=lenders, views=1).joint
    posed = T.posed_codes(e, full_codes(rd.latent)[lenders], one, 1)
    np.testing.assert_allclose(got, posed.codes[:, 0], atol=1e-5)
    assert np.abs(got - e).max() > 1e-3  # a pose was added
    assert not np.isin(lenders[posed.nearest[:, 0]], rows).any()
    # a training cell's own reported code takes its own pose: its single-view code
    Z = full_codes(rd.latent)
    np.testing.assert_allclose(in_training_poses(rd, Z[lenders[:3]], 4), one[:3], atol=1e-5)
    with pytest.raises(AnalysisError, match="not finite"):
        in_training_poses(rd, np.full_like(e, np.nan), 4)
    # a latent table without its full codes (shared dims only) lends none
    full = rd.latent.obsm.pop("X_vae_full")
    assert in_training_poses(rd, e, 4) is None
    rd.latent.obsm["X_vae_full"] = full
    # a model whose reported latent is single-view has no pose to lend
    rd.model.args = dataclasses.replace(rd.model.args, encode_views=1)
    assert in_training_poses(rd, e, 4) is None


def test_grain_over_input_reads_how_much_grainier_a_drawing_is_than_its_crop():
    """evaluate's readback ``grain_over_input_<drawing>``: the median over rows of the drawn
    cytoplasm's stain grain over the crop's; 1 for the crop itself, > 1 drawn grainier."""
    from vae.analysis.evaluate import _grain_over_input

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    cell, nucleus = r < 26, r < 10

    def cells(amp: float, n: int = 4) -> np.ndarray:
        out = np.zeros((n, 64, 64, 3))
        for i in range(n):
            od = np.where(nucleus, 1.2, 0.3)[..., None] * np.array([0.6, 0.9, 0.4])
            od = od + amp * rng.standard_normal((64, 64, 1)) * np.array([0.5, 0.8, 0.3])
            out[i] = np.exp(-od.clip(0)) * cell[..., None]
        return out

    masks = np.repeat(cell[None], 4, 0)
    crops = cells(0.03)
    got = _grain_over_input(
        {"input": (crops, masks), "same": (crops, masks), "grainy": (cells(0.09), masks)}
    )
    assert set(got) == {"grain_over_input_same", "grain_over_input_grainy"}
    assert got["grain_over_input_same"] == pytest.approx(1.0)
    assert 2.0 < got["grain_over_input_grainy"] < 4.0  # three times the grain
    # under 3 rows with a cytoplasm to read on both: NaN, not a number from one cell
    few = _grain_over_input({"input": (crops[:2], masks[:2]), "same": (crops[:2], masks[:2])})
    assert np.isnan(few["grain_over_input_same"])


def test_read_back_of_the_input_crops_is_the_image_kNN_of_their_codes(tiny_run):
    """vae.analysis.readback: a row's own crop, read back, gets the label the kNN of the
    training crops' image codes gives its stored image code (the crop encoded as the
    reported latent encodes it); any drawing is read likewise, one label per row."""
    from vae.analysis import metrics as M
    from vae.analysis.readback import read_back
    from vae.analysis.run import load_run, split_rows

    root, paired = tiny_run
    run = root / "tiny" / "train"
    rd = load_run(run / "latent.h5ad", run / "model.pt", paired)
    lat = rd.latent
    labels = lat.obs["label"].astype(str).to_numpy()
    hi = rd.data.has_image.numpy().astype(bool)
    rows = split_rows(lat, "test")
    rows = rows[hi[rows]]
    split = lat.obs["split"].astype(str).to_numpy()
    voters = np.flatnonzero((split == "train") & hi)
    zi = np.asarray(lat.obsm["X_vae_image"], np.float64)
    crops = (rd.data.crops[rows].float() / 255).permute(0, 2, 3, 1).numpy()
    masks = rd.data.masks[rows][:, 0].numpy().astype(bool)
    flipped = crops[:, ::-1].copy(), masks[:, ::-1].copy()  # a symmetry: the same pose-free code
    got = read_back(
        rd.model,
        rd.data,
        rows,
        {"input": (crops, masks), "flipped": flipped},
        zi[voters],
        labels[voters],
        3,
        batch_size=4,
    )
    want = M.knn_predict(zi[rows], labels[rows], 3, zi[voters], labels[voters])
    assert list(got["input"]) == list(want)
    assert list(got["flipped"]) == list(want)
    with pytest.raises(ValueError, match="drawings"):
        read_back(
            rd.model, rd.data, rows, {"x": (crops[:1], masks[:1])}, zi[voters], labels[voters], 3
        )


def test_path_steps_are_drawn_and_measured_in_the_poses_of_their_nearest_cells(
    tiny_run, tmp_path, monkeypatch
):
    """A path step (pose-free code) is decoded again with the pose offsets (single-view
    minus reported code) of the held-out cells nearest to it; the path features are the
    median over those poses; 0 poses turns it off."""
    from vae.analysis import traverse as T
    from vae.analysis.run import Outputs, full_codes, load_run, measure, split_rows
    from vae.analysis.settings import AnalysisSettings
    from vae.analysis.study import traverse_study
    from vae.infer import encode_dataset

    root, paired = tiny_run
    run = root / "tiny" / "train"
    rd = load_run(run / "latent.h5ad", run / "model.pt", paired)
    calls, real_decode = _record_decodes(monkeypatch)
    kw = dict(
        umap=False, top_k_dims=1, n_steps=3, path_steps=5, path_classes=["myeloblast", "myelocyte"]
    )
    a = AnalysisSettings(path_pose_cells=3, **kw)
    summary = traverse_study(rd, a, Outputs(tmp_path), tmp_path / "report.html", None, "t", "s", {})
    assert summary["path_pose_cells"] == 3
    Z = full_codes(rd.latent)
    rows = split_rows(rd.latent, "test")
    ref = rows[rd.data.has_image.numpy()[rows]]
    labels = rd.latent.obs["label"].astype(str).to_numpy()
    gp = T.gp_path(T.class_centroids(Z, labels, order=a.path_classes).points, 5, 0.3, 1e-3, 0)
    one = encode_dataset(rd.model, rd.data, rows=ref, views=1).joint
    want = T.posed_codes(gp.points, Z[ref], one, 3).codes.reshape(-1, Z.shape[1])
    hit = [c for c in calls if c[0].shape == want.shape and np.allclose(c[0], want, atol=1e-4)]
    assert len(hit) == 1
    feats = measure(hit[0][1].images, hit[0][1].masks, _params(a), 0.0)
    med = feats.groupby(np.arange(len(feats)) // 3).median()
    got = pd.read_csv(tmp_path / "path_features_gp.csv")
    np.testing.assert_allclose(got["nucleus_fraction"], med["nucleus_fraction"], atol=1e-6)
    # each step's drawing in its nearest cell's pose, read back by the image encoder
    from vae.analysis.readback import read_back
    from vae.analysis.run import image_reference_rows
    from vae.inputs.schema import known_labels

    posed = T.posed_codes(gp.points, Z[ref], one, 3)
    dec = hit[0][1]
    voters = image_reference_rows(rd.latent, rd.data.has_image.numpy().astype(bool))
    voters = voters[known_labels(labels[voters])]
    zi = np.asarray(rd.latent.obsm["X_vae_image"], np.float64)
    drawn = (T.draw_cells(dec.images[::3], dec.masks[::3]), T.cell_masks(dec.masks[::3]))
    read = read_back(
        rd.model,
        rd.data,
        ref[posed.nearest[:, 0]],
        {"p": drawn},
        zi[voters],
        labels[voters],
        a.knn_k,
    )["p"]
    gp_info = summary["path"]["gp"]
    assert gp_info["drawn_read_as"] == list(read) and len(read) == 5
    place = {"myeloblast": 0, "myelocyte": 1}
    order = np.array([place.get(x, np.nan) for x in read])
    rho = gp_info["drawn_read_order_spearman"]
    if np.isfinite(order).sum() >= 3 and np.nanmax(order) > np.nanmin(order):
        assert -1 <= rho <= 1
    else:
        assert rho is None or np.isnan(rho)
    # off: no posed decode, features of the step codes themselves
    calls.clear()
    off = traverse_study(
        rd,
        AnalysisSettings(path_pose_cells=0, **kw),
        Outputs(tmp_path / "off"),
        tmp_path / "off.html",
        None,
        "t",
        "s",
        {},
    )
    assert "path_pose_cells" not in off
    assert not any(c[0].shape == want.shape for c in calls)


def test_path_steps_without_crops_nearby_are_faded_and_flagged(tiny_run, tmp_path):
    """A path class that has no crop (expression only, like progenitors on real data):
    its end of the path lies away from every training code with a crop, so those steps
    are flagged in path_features, counted in the summary, and the caption says why."""
    from vae.analysis import traverse as T
    from vae.analysis.run import Outputs, full_codes, load_run
    from vae.analysis.settings import AnalysisSettings
    from vae.analysis.study import traverse_study
    from vae.inputs.schema import HAS_IMAGE

    root, paired = tiny_run
    run = root / "tiny" / "train"
    rd = load_run(run / "latent.h5ad", run / "model.pt", paired)
    labels = rd.latent.obs["label"].astype(str).to_numpy()
    rd.latent.obs[HAS_IMAGE] = labels != "myeloblast"  # myeloblasts: expression only
    rd.data_notes = ["NOTE: these profiles are mouse bone marrow."]  # expression.notes
    kw = dict(umap=False, top_k_dims=1, n_steps=3, path_steps=5, path_pose_cells=0)
    a = AnalysisSettings(path_classes=["myeloblast", "myelocyte"], image_support_quantile=0.5, **kw)
    summary = traverse_study(rd, a, Outputs(tmp_path), tmp_path / "report.html", None, "t", "s", {})
    feats = pd.read_csv(tmp_path / "path_features_gp.csv")
    # the library function on the same codes decides the flags
    Z = full_codes(rd.latent)
    train = rd.latent.obs["split"].astype(str).to_numpy() == "train"
    gp = T.gp_path(T.class_centroids(Z, labels, order=a.path_classes).points, 5, 0.3, 1e-3, 0)
    want = T.image_support(gp.points, Z[train & (labels != "myeloblast")], 5, 0.5)
    np.testing.assert_allclose(feats["image_support_distance"], want.distance, rtol=1e-6)
    assert feats["image_supported"].tolist() == want.supported.tolist()
    # farther from the crops at the myeloblast end than at the myelocyte end
    assert feats["image_support_distance"].iloc[0] > feats["image_support_distance"].iloc[-1]
    n_ok = int(want.supported.sum())
    assert summary["path"]["gp"]["image_supported_steps"] == n_ok
    # what the drawn steps are learned from: the myeloblast end has no crop of its own,
    # so it is named after its nearest crops (never "myeloblast"), and so is every step
    near = T.neighbour_labels(
        gp.points, Z[ref_rows := train & (labels != "myeloblast")], labels[ref_rows], 5
    )
    assert feats["image_neighbour_label"].tolist() == near.label.tolist()
    np.testing.assert_allclose(feats["image_neighbour_share"], near.share)
    assert "myeloblast" not in set(feats["image_neighbour_label"])
    assert summary["path"]["gp"]["image_neighbour_labels"] == near.label.tolist()
    # the sweeps start at the training cell with a crop nearest the mean of all codes
    ref = np.flatnonzero(train & (labels != "myeloblast"))
    cell = rd.latent.obs_names[T.nearest_to_mean(Z, ref)]
    assert summary["anchor"].startswith(f"cell {cell}, the training cell with a crop")
    ((dim, n_sweep_ok),) = summary["sweep_image_supported_steps"].items()  # top_k_dims=1
    sd = np.where(Z.std(0) > 1e-6, Z.std(0), 1.0)
    anchor = Z[T.nearest_to_mean(Z, ref)]
    # swept over the stretch that stays among the crops' codes (sweep_in_support): every
    # step supported; the whole +-span_sd without it, as the library decides
    lo, hi = T.supported_range(anchor, int(dim), sd, Z[ref], 3.0, 5, 0.5)
    assert summary["sweep_range_sd"][int(dim)] == [round(lo, 2), round(hi, 2)]
    assert n_sweep_ok == 3
    off = AnalysisSettings(
        path_classes=a.path_classes, image_support_quantile=0.5, sweep_in_support=False, **kw
    )
    summary = traverse_study(
        rd, off, Outputs(tmp_path / "off"), tmp_path / "off.html", None, "t", "s", {}
    )
    assert "sweep_range_sd" not in summary
    codes = T.sweep_codes(anchor, int(dim), anchor[int(dim)] + np.linspace(-3, 3, 3) * sd[int(dim)])
    assert (
        summary["sweep_image_supported_steps"][dim]
        == T.image_support(codes, Z[ref], 5, 0.5).supported.sum()
    )
    html = (tmp_path / "report.html").read_text()
    assert (f"{5 - n_ok} of 5 steps lie farther" in html) == (n_ok < 5)
    assert "the commonest label among the 5 labelled training crops nearest its code" in html
    # the class without crops is named, on the path and at the top of the report
    assert summary["path"]["gp"]["classes_without_crops"] == ["myeloblast"]
    assert "What these data cannot show" in html
    assert "NOTE: these profiles are mouse bone marrow." in html
    assert "No crop in the training data is labelled myeloblast" in html
    assert "myeloblast" in summary["data_limits"][-2]  # the data's own notes come last
    assert summary["data_limits"][-1] == "NOTE: these profiles are mouse bone marrow."
    page = (tmp_path / "study.html").read_text()
    payload = json.loads(
        re.search(r'id="study-data">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</")
    )
    assert payload["supported"] == want.supported.tolist()
    # the page's step line names the crops each step is drawn from
    assert [x.split(" (")[0] for x in payload["drawn_from"]] == near.label.tolist()
    last = payload["drawn_from"][-1]
    assert last.startswith(f"{near.label[-1]} ({near.share[-1]:.0%} of the 5")
    # every vote is shown: the other labels among the 5 with their counts
    assert (near.share[-1] == 1.0) == ("the others" not in last)
    assert near.votes[-1].startswith(f"{near.label[-1]} {round(near.share[-1] * 5)}")
    # the real cells shown at each step have crops, but the path on the scatter starts
    # among the myeloblasts (expression only here) and ends among the myelocytes
    cells = payload["cells"]
    assert all("crop" in cells[j] for r in payload["nearest"] for j in r)
    xy = np.array([[c["x"], c["y"]] for c in cells])
    lab = np.array([c["label"] for c in cells])
    path = np.asarray(payload["path_xy"])
    assert path.shape == (5, 2)
    for end, mine, other in ((0, "myeloblast", "myelocyte"), (-1, "myelocyte", "myeloblast")):
        d = np.linalg.norm(xy - path[end], axis=1)
        assert np.median(d[lab == mine]) < np.median(d[lab == other])


def test_path_steps_show_and_measure_the_real_crops_nearest_them(tiny_run, tmp_path):
    """Under the drawn cells, each path step shows a different real crop, the nearest to
    it that no nearer step shows; path_features has the median features of the 5 nearest
    crops (measured as the instruments measure any crop), their trend along the path is in
    the summary, and the caption says what the row is."""
    from vae.analysis import granules as G
    from vae.analysis import traverse as T
    from vae.analysis.run import Outputs, full_codes, load_run
    from vae.analysis.settings import AnalysisSettings
    from vae.analysis.study import NEAREST_CROP_FEATURES, traverse_study
    from vae.analysis.study_page import nearest_rows

    root, paired = tiny_run
    run = root / "tiny" / "train"
    rd = load_run(run / "latent.h5ad", run / "model.pt", paired)
    kw = dict(umap=False, top_k_dims=1, n_steps=3, path_steps=5, path_pose_cells=0)
    a = AnalysisSettings(path_classes=["myeloblast", "myelocyte"], **kw)
    summary = traverse_study(rd, a, Outputs(tmp_path), tmp_path / "report.html", None, "t", "s", {})
    feats = pd.read_csv(tmp_path / "path_features_gp.csv")
    Z = full_codes(rd.latent)
    labels = rd.latent.obs["label"].astype(str).to_numpy()
    gp = T.gp_path(T.class_centroids(Z, labels, order=a.path_classes).points, 5, 0.3, 1e-3, 0)
    cand = np.flatnonzero(rd.data.has_image.numpy())
    near = nearest_rows(gp.points, Z, cand, 5)
    assert near.shape == (5, 5)
    crops = rd.data.crops[near.ravel()].permute(0, 2, 3, 1).numpy()
    masks = rd.data.masks[near.ravel(), 0].numpy().astype(bool)
    f = G.measure_batch(crops * masks[..., None], masks, _params(a))
    med = f.groupby(np.arange(len(f)) // 5).median()
    for c in NEAREST_CROP_FEATURES:
        np.testing.assert_allclose(feats[f"nearest_crops_{c}"], med[c], atol=1e-9, err_msg=c)
    trend = summary["path"]["gp"]["position_vs_feature_spearman"]
    assert {f"nearest_crops_{c}" for c in NEAREST_CROP_FEATURES} <= set(trend)
    # the bottom row's cell of each step, named so it can be looked up: five different
    # cells; recomputed here by brute force over every assignment of distinct crops to
    # steps, the greedy rule (closest pair first) picks the one taking the closest pair
    # first at every choice
    shown = feats["nearest_crop_cell"].tolist()
    assert len(set(shown)) == 5
    names = np.asarray(rd.latent.obs_names)
    row = {n: i for i, n in enumerate(names)}
    d = np.linalg.norm(Z[cand][None, :, :] - gp.points[:, None, :], axis=2)  # (5, c)
    want, free, left = {}, set(range(len(cand))), set(range(5))
    while left:
        i, j = min(((i, j) for i in left for j in free), key=lambda ij: d[ij])
        want[i] = cand[j]
        left.discard(i)
        free.discard(j)
    assert [row[n] for n in shown] == [want[i] for i in range(5)]
    assert shown[int(np.argmin(d.min(axis=1)))] == names[near[int(np.argmin(d.min(axis=1))), 0]]
    assert feats["nearest_crop_label"].tolist() == labels[[row[n] for n in shown]].tolist()
    # the myeloblast end's crops are myeloblasts' neighbours, the other end myelocytes'
    first = labels[near[0, 0]], labels[near[-1, 0]]
    assert first == ("myeloblast", "myelocyte"), first
    html = (tmp_path / "report.html").read_text()
    assert "Bottom row: a different real cell at each step" in html


def test_maturation_axis_is_recorded_swept_first_and_scored_against_truth(tmp_path):
    """vae.maturation_weight > 0 (the default): stage=train names the axis in latent.h5ad, stage=traverse
    sweeps it first and scores it against the simulator's t."""
    import anndata as ad

    paired = _paired(tmp_path / "paired.h5ad")
    extra = [*TINY_TRAIN, "vae.maturation_weight=100", "vae.n_latent=6"]
    assert _run_in_process(tmp_path, paired, "train", extra) == 0
    lat = ad.read_h5ad(tmp_path / "tiny" / "train" / "latent.h5ad")
    axis = lat.uns["maturation_axis"]
    assert int(axis["dim"]) == 0 and list(axis["classes"]) == ["myeloblast", "myelocyte"]
    assert (
        _run_in_process(tmp_path, paired, "traverse", [*FAST_ANALYSIS, "analysis.top_k_dims=2"])
        == 0
    )
    tr = tmp_path / "tiny" / "traverse"
    assert (tr / "traverse_dim00.png").exists()
    summary = json.loads((tr / "traverse_summary.json").read_text())
    # dim 0 of the held-out lineage cells' reported codes against their true t
    from scipy.stats import spearmanr

    t = lat.obs["t"].to_numpy(float)
    held = (lat.obs["split"].astype(str) == "test").to_numpy() & np.isfinite(t)
    want = spearmanr(np.asarray(lat.obsm["X_vae"])[held, 0], t[held])[0]
    got = summary["truth_recovery"]["maturation_axis_vs_true_t_spearman"]
    assert got == pytest.approx(want)
    html = (tr / "report.html").read_text()
    assert "This is the maturation axis" in html
    # the caption gives each ordered class's mean on the axis in the sweep's unit (sd from
    # the anchor), in the order the latent holds them
    import re

    z0 = np.asarray(lat.obsm["X_vae_full"])[:, 0]
    lab = lat.obs["label"].astype(str).to_numpy()
    m = re.search(
        r"in sd from the anchor as the sweep.{1,6}s steps: myeloblast ([+-][0-9]+[.][0-9]), "
        r"myelocyte ([+-][0-9]+[.][0-9])",
        html,
    )
    assert m, "the axis caption lists the classes' means"
    raw = z0[lab == "myelocyte"].mean() - z0[lab == "myeloblast"].mean()
    assert np.sign(float(m[2]) - float(m[1])) == np.sign(round(raw, 1)) or abs(raw) < 0.05
    # off: no axis in the latent table
    off = tmp_path / "off"
    assert _run_in_process(off, paired, "train", [*TINY_TRAIN, "vae.maturation_weight=0"]) == 0
    assert "maturation_axis" not in ad.read_h5ad(off / "tiny" / "train" / "latent.h5ad").uns


def _params(a):
    from vae.analysis import granules as G

    return G.GranuleParams(
        radius_px=a.granule_radius_px,
        threshold=a.granule_threshold,
        border_px=a.granule_border_px,
        nucleus_margin_px=a.granule_nucleus_margin_px,
        neck_ratio=a.lobe_neck_ratio,
    )


def test_bad_anchor_fails_with_the_setting_name(tiny_run, tmp_path, caplog):
    root, _ = tiny_run
    train = root / "tiny" / "train"
    assert _on_run("traverse", tmp_path, train, "analysis.anchor_class=nope") == 2
    assert "anchor_class='nope' not among labels" in caplog.text


def test_analysis_refuses_a_model_that_is_not_the_latents(tiny_run, tmp_path, caplog):
    """A detector's checkpoint given as the VAE, or a latent.h5ad written for another
    model (its recorded digest differs): exit 2 naming the file, no stage output."""
    import anndata as ad

    from segmentation.shipped import SHIPPED_DETECTOR

    root, _ = tiny_run
    train = root / "tiny" / "train"
    for stage, product in (("evaluate", "metrics.json"), ("traverse", "report.html")):
        caplog.clear()
        cfg_model = f"paths.inputs.model={SHIPPED_DETECTOR}"
        assert _on_run(stage, tmp_path / f"det_{stage}", train, cfg_model) == 2
        assert f"{SHIPPED_DETECTOR}: not a usable vae checkpoint" in caplog.text
        assert not (tmp_path / f"det_{stage}" / "x" / stage / product).exists()
    lat = ad.read_h5ad(train / "latent.h5ad")
    assert len(lat.uns["model_digest"]) == 16
    lat.uns["model_digest"] = "0" * 16  # as if written for another model
    other = tmp_path / "other"
    other.mkdir()
    lat.write_h5ad(other / "latent.h5ad")
    caplog.clear()
    from pipeline import runner

    cfg = compose_config(
        [
            "stage=evaluate",
            f"paths.root={tmp_path / 'mix'}",
            "experiment=x",
            f"paths.inputs.latent={other / 'latent.h5ad'}",
            f"paths.inputs.model={train / 'model.pt'}",
            *FAST_ANALYSIS,
        ]
    )
    assert runner.main(cfg) == 2
    assert "the latent was written for another model" in caplog.text
    assert not (tmp_path / "mix" / "x" / "evaluate" / "metrics.json").exists()


def test_report_leaves_out_another_models_evaluation_and_shows_the_models_settings(
    tiny_run, tmp_path, caplog
):
    """A model trained again after stage=evaluate: the report does not show the old
    numbers as this model's; settings a traverse run did not repeat (vae.beta) are shown
    as the model was trained; a path class that no cell carries is named, not dropped."""
    import shutil

    from pipeline import runner

    root, _ = tiny_run
    run = root / "tiny"
    # its own evaluation of the shared model, written under tmp_path: the module's run
    # folder is left alone, so this test and test_evaluate_and_traverse_in_process pass
    # in either order
    assert _on_run("evaluate", tmp_path / "own", run / "train") == 0
    ev = tmp_path / "evaluate"
    shutil.copytree(tmp_path / "own" / "x" / "evaluate", ev)
    metrics = json.loads((ev / "metrics.json").read_text())
    assert len(metrics["model_digest"]) == 16  # evaluate records the model it scored
    metrics["model_digest"] = "0" * 16  # as if model.pt had been trained again since
    (ev / "metrics.json").write_text(json.dumps(metrics))
    cfg = compose_config(
        [
            "stage=traverse",
            f"paths.root={tmp_path}",
            "experiment=x",
            f"paths.inputs.latent={run / 'train' / 'latent.h5ad'}",
            f"paths.inputs.model={run / 'train' / 'model.pt'}",
            f"paths.inputs.evaluation={ev / 'metrics.json'}",
            "vae.beta=7.5",  # not the model's
            *FAST_ANALYSIS,
            "analysis.path_classes=[myeloblast,myelocyte,erythroblast]",
        ]
    )
    assert runner.main(cfg) == 0
    html = (tmp_path / "x" / "traverse" / "report.html").read_text()
    assert "Not shown:" in html and "scores another model" in html
    assert "kNN accuracy and balanced accuracy" not in html  # none of the old tables
    trained = json.loads((run / "train" / "manifest.json").read_text())["config"]["vae"]["beta"]
    assert f'"beta": {json.dumps(trained)}' in html and '"beta": 7.5' not in html
    assert "vae.beta: this run 7.5" in caplog.text
    assert "erythroblast," in html and "left out of the path" in html
    # a near miss of a label is a typo: refused before any work, naming the label
    typo = "analysis.path_classes=[myeloblast,myelocyte,lymphocyt]"
    assert _on_run("traverse", tmp_path / "typo", run / "train", typo) == 2
    assert "'lymphocyt' is not a label; did you mean 'lymphocyte'?" in caplog.text


def _sub(root: Path, paired: Path, stage: str, extra: list[str]) -> subprocess.CompletedProcess:
    return run_pipeline(
        [
            f"stage={stage}",
            f"paths.root={root}",
            "experiment=sub",
            f"paths.inputs.paired={paired}",
            *extra,
        ],
        timeout=600,
    )


@pytest.mark.slow
def test_train_evaluate_traverse_as_subprocesses(tmp_path):
    paired = _paired(tmp_path / "paired.h5ad")
    for stage, extra in [
        ("train", TINY_TRAIN),
        ("evaluate", FAST_ANALYSIS),
        ("traverse", FAST_ANALYSIS),
    ]:
        r = _sub(tmp_path, paired, stage, extra)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "report: " in r.stdout and "tensorboard --logdir" in r.stdout
    _check_outputs(tmp_path / "sub")


def test_evaluate_missing_inputs_names_the_stage(tmp_path):
    r = run_pipeline(["stage=evaluate", f"paths.root={tmp_path}", "experiment=e"])
    assert r.returncode != 0
    assert "stage=train" in r.stderr


def _image_knn(run: Path, checkpoint: str, paired: Path) -> tuple[float, np.ndarray]:
    """The image-only kNN(15) accuracy of a run's checkpoint, written out: the test crops'
    image codes voted by the train + val crops with a label; and the run's split, (N,)."""
    import anndata as ad

    from vae.analysis.metrics import knn_accuracy
    from vae.checkpoint import load_model
    from vae.data import UNKNOWN_LABEL, from_anndata
    from vae.infer import encode_dataset

    model, _ = load_model(run / checkpoint)
    a = ad.read_h5ad(paired)
    d = from_anndata(a, image_size=model.args.crop_size)
    sp = pd.read_csv(run / "split.csv", index_col=0)["split"].reindex(a.obs_names)
    sp = sp.to_numpy().astype(str)
    z = encode_dataset(model, d, views=int(model.args.encode_views)).image
    y = np.asarray(d.label_names)[d.labels.numpy()]
    ok = d.has_image.numpy().astype(bool) & (y != UNKNOWN_LABEL)
    fit, test = ok & (sp != "test"), ok & (sp == "test")
    return knn_accuracy(z[test], y[test], 15, z[fit], y[fit]), sp


def test_image_branch_check_script_on_a_finished_run(tiny_run):
    """scripts/image_branch_check.py: the table's numbers exist, are in range, files written."""
    root, paired = tiny_run
    mod = load_script("image_branch_check")
    run = root / "tiny" / "train"
    res = mod.check(run, paired, root / "tiny" / "traverse")
    assert res["n_test"] > 0 and 0 <= res["active_units"] <= res["n_latent"]
    for k in ("knn_image", "knn_expression", "knn_joint", "knn_pixel_pca"):
        assert 0 <= res[k] <= 1, k
    # the image score is the kNN(15) of the test crops' image codes, voted by the
    # train + val crops with a label
    from vae.infer import encode_dataset

    want_knn, sp = _image_knn(run, "model.pt", paired)
    assert res["knn_image"] == pytest.approx(want_knn)
    # its sampling error: the exact binomial 95 % interval of that many test crops
    from vae.analysis.samples import proportion_ci

    n = res["knn_image_n"]
    assert 0 < n <= res["n_test"]
    lo, hi = res["knn_image_ci95"]
    assert (lo, hi) == pytest.approx(proportion_ci(round(res["knn_image"] * n), n), abs=1e-4)
    assert lo <= res["knn_image"] <= hi
    assert -1 <= res["ssim_joint"] <= 1 and -1 <= res["ssim_joint_mean_image"] <= 1
    # how granular the drawn cells are vs their inputs, on both parts of the cell
    for part in ("cytoplasm", "nucleus"):
        rho = res[f"drawn_grain_vs_input_{part}_spearman"]
        assert np.isnan(rho) or -1 <= rho <= 1
        ratio = res[f"drawn_grain_over_input_{part}_median"]
        assert np.isnan(ratio) or ratio >= 0
    # morphology kept by the code vs raw-pixel PCs: one score per measured feature
    for name in ("image", "pixel_pca"):
        rho = [res[f"morphology_{name}_{f}"] for f in mod.MORPHOLOGY_FEATURES]
        assert all(np.isnan(r) or -1 <= r <= 1 for r in rho), rho
        assert np.isfinite(res[f"morphology_{name}_mean"])
    assert (run / "image_branch_recon.png").stat().st_size > 0
    # the drawings read back: evaluate's readback on the test split, from the same function
    from vae.analysis.evaluate import readback_summary
    from vae.analysis.run import labels_of, load_run, split_rows
    from vae.analysis.settings import AnalysisSettings
    from vae.inputs.schema import known_labels

    rd = load_run(run / "latent.h5ad", run / "model.pt", paired)
    lab = labels_of(rd.latent, "label")
    dec = encode_dataset(rd.model, rd.data, rows=split_rows(rd.latent, "test"), decode=True)
    train = np.flatnonzero(sp == "train")
    want = readback_summary(rd, AnalysisSettings(), dec.decoded, lab, known_labels(lab), train)
    assert want is not None
    got = {k: v for k, v in res.items() if k.startswith("readback_")}
    assert set(got) == {f"readback_{k}" for k in want}
    # the same numbers (a grain ratio is NaN where the tiny crops hold no cytoplasm to read)
    np.testing.assert_array_equal(
        [got[f"readback_{k}"] for k in want], [float(v) for v in want.values()]
    )
    # the traverse's GP path drawings read back, as traverse_summary.json holds it
    summary = root / "tiny" / "traverse" / "traverse_summary.json"
    if summary.exists():
        told = json.loads(summary.read_text())["path"]["gp"].get("drawn_read_order_spearman")
        assert res.get("traverse_gp_drawn_read_order_spearman") == (
            None if told is None else float(told)
        )


def test_image_branch_check_measures_another_checkpoint_of_the_run(tiny_run, tmp_path):
    """--checkpoint: every number of another checkpoint file, its readback voted by its own
    codes; model.pt's bytes under another name give model.pt's numbers to the digit (the
    re-encoded latent is the one stage=train wrote), and last.pt is measured as itself."""
    import shutil

    root, paired = tiny_run
    mod = load_script("image_branch_check")
    run = tmp_path / "train"
    shutil.copytree(root / "tiny" / "train", run)
    shutil.copy(run / "model.pt", run / "copy.pt")
    ref = mod.check(run, paired, None)
    same = mod.check(run, paired, None, checkpoint="copy.pt")
    assert (ref["checkpoint"], same["checkpoint"]) == ("model.pt", "copy.pt")
    assert [k for k in ref if k != "checkpoint"] == [k for k in same if k != "checkpoint"]
    for k, v in ref.items():
        if k != "checkpoint" and isinstance(v, float):
            assert v == same[k] or (v != v and same[k] != same[k]), k
    assert any(k.startswith("readback_") for k in same)
    # last.pt: its own epoch and codes
    from vae.checkpoint import load_model

    last = mod.check(run, paired, None, checkpoint="last.pt")
    assert last["epoch"] == load_model(run / "last.pt")[1]["epoch"] >= ref["epoch"]
    assert last["knn_image"] == pytest.approx(_image_knn(run, "last.pt", paired)[0])
    # its figure beside model.pt's, never over it
    assert (run / "image_branch_recon_last.png").stat().st_size > 0
    assert (run / "image_branch_recon.png").stat().st_mtime < (
        run / "image_branch_recon_last.png"
    ).stat().st_mtime
    for kw in ({"unseen": paired}, {"traverse": root / "tiny" / "traverse"}):
        with pytest.raises(SystemExit, match="--unseen and --traverse read the run's model.pt"):
            mod.check(
                run, paired, kw.get("traverse"), unseen=kw.get("unseen"), checkpoint="last.pt"
            )


def test_reviewed_labels_check_scores_runs_on_the_same_crops(tiny_run, tmp_path):
    """scripts/reviewed_labels_check.py: reviewed crops leave the 'unreviewed' set only;
    the votes come from the run's own train labels, the score from --paired's labels."""
    import anndata as ad

    root, paired = tiny_run
    mod = load_script("reviewed_labels_check")
    run = root / "tiny" / "train"
    lat = ad.read_h5ad(run / "latent.h5ad")
    test = lat.obs[(lat.obs["split"] == "test") & lat.obs["has_image"].astype(bool)]
    named = test.index.astype(str).to_numpy()[:3]  # cell ids
    csv = tmp_path / "reviewed.csv"
    pd.DataFrame({"image_ref": named, "label": ""}).to_csv(csv, index=False)
    res = mod.compare([run], paired, csv)[str(run)]
    assert res["all"]["n"] == int(test["label"].notna().sum()) > 3
    assert res["unreviewed"]["n"] == res["all"]["n"] - 3
    for part in res.values():
        assert 0 <= part["knn_accuracy"] <= 1 and 0 <= part["knn_balanced_accuracy"] <= 1
    # scored against --paired's labels: with every labelled test crop renamed there to a
    # class no training crop has, no vote can be right (the run's own labels would score
    # as before)
    assert res["all"]["knn_accuracy"] > 0
    a = ad.read_h5ad(paired)
    ids = test["row"].astype(str) if "row" in test else test.index.astype(str)
    ids = ids[test["label"].notna().to_numpy()]
    a.obs["label"] = a.obs["label"].astype(str)
    a.obs.loc[ids, "label"] = "zzz"
    renamed = tmp_path / "renamed.h5ad"
    a.write_h5ad(renamed)
    again = mod.compare([run], renamed, csv)[str(run)]
    assert again["all"]["n"] == res["all"]["n"] and again["all"]["knn_accuracy"] == 0.0


def test_image_branch_check_scores_unseen_simulated_cells(tiny_run, tmp_path):
    """--unseen: lobes_check.py's numbers on another table's lineage cells, as unseen_* keys;
    a table without simulator truth is refused naming the missing columns."""
    import anndata as ad

    root, paired = tiny_run
    run = root / "tiny" / "train"
    mod = load_script("image_branch_check")
    a = ad.read_h5ad(paired)
    rng = np.random.default_rng(0)
    a.obs["lineage"] = np.where(np.arange(a.n_obs) % 3 == 0, "monocyte", "neutrophil")
    a.obs["t"] = rng.uniform(0, 1, a.n_obs)
    a.obs["lobes"] = np.where(a.obs["t"] > 0.8, 3.0, 1.0)
    a.obs["kind"] = np.where(a.obs["t"] > 0.8, "segmented_neutrophil", "myelocyte")
    a.write_h5ad(tmp_path / "unseen.h5ad")
    res = mod.check(run, paired, None, unseen=tmp_path / "unseen.h5ad")
    want = load_script("lobes_check").check(run, tmp_path / "unseen.h5ad")
    lineage = a.obs["has_image"].to_numpy(bool) & (a.obs["lineage"] == "neutrophil").to_numpy()
    assert res["unseen_n_cells"] == want["n_cells"] == int(lineage.sum()) > 0
    for k, v in want.items():
        if k not in ("run", "paired"):
            assert res[f"unseen_{k}"] == v or (v != v and res[f"unseen_{k}"] != res[f"unseen_{k}"])
    assert "knn_image" in res  # the test split's numbers are still there
    # cells drawn from expression alone: as decoded and in a training crop's pose (the
    # run's own paired table, found through its manifest)
    for pose in ("mean_pose", "training_pose"):
        assert {f"from_expression_{pose}_{k}" for k in ("ssim", "lobes_vs_true_spearman")} <= set(
            want
        )
    del a.obs["lobes"]
    a.write_h5ad(tmp_path / "no_truth.h5ad")
    with pytest.raises(SystemExit, match="lobes"):
        mod.check(run, paired, None, unseen=tmp_path / "no_truth.h5ad")
    with pytest.raises(SystemExit, match="no such file"):
        mod.check(run, paired, None, unseen=tmp_path / "missing.h5ad")


def test_image_branch_check_scores_the_maturation_axis_against_pseudotime():
    """Real data: dim 0 against obs['maturation'] over the stages' profiles, overall and
    within each stage; without the head, the best dim."""
    import pandas as pd

    mod = load_script("image_branch_check")
    rng = np.random.default_rng(0)
    stages = ["MPP", "GMP", "Neu"]
    labels = np.repeat(stages + ["Mono"], 10)
    t = np.r_[
        rng.uniform(0, 0.2, 10),
        rng.uniform(0.2, 0.4, 10),
        rng.uniform(0.4, 1, 10),
        rng.uniform(0, 1, 10),
    ]
    z = rng.normal(size=(40, 3))
    z[:, 2] = t  # the best dim, in order within each stage too
    z[:, 0] = -t  # dim 0 runs against the pseudotime
    z[30:, :] = rng.normal(size=(10, 3))  # Mono rows: not a stage, not scored
    obs = pd.DataFrame({"maturation": t})
    res: dict = {}
    mod._pseudotime_check(res, z, obs, labels, stages, axis=True)
    assert res["pseudotime_rows"] == 30
    assert res["best_dim_vs_pseudotime_spearman"] == pytest.approx(1.0)
    assert res["maturation_axis_vs_pseudotime_spearman"] == pytest.approx(-1.0)
    assert res["maturation_axis_vs_pseudotime_within_GMP"] == pytest.approx(-1.0)
    res = {}
    mod._pseudotime_check(res, z, obs, labels, stages, axis=False)
    assert "maturation_axis_vs_pseudotime_spearman" not in res
    assert abs(res["best_dim_vs_pseudotime_within_Neu"]) == pytest.approx(1.0)


def test_study_page_works_in_a_real_browser(tiny_run, tmp_path, tmp_path_factory):
    """study.html in headless Chromium: loads without console errors; the slider changes the
    decoded image, the gene column and the nearest crops; hovering a cell shows its crop."""
    from tests.helpers.browser import headless_chromium, require_browser, severe_logs

    require_browser()  # skips, saying why, before any work
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    root, paired = tiny_run
    assert (
        _run_in_process(
            tmp_path,
            paired,
            "traverse",
            [
                *FAST_ANALYSIS,
                "experiment=page",
                f"paths.inputs.latent={root / 'tiny' / 'train' / 'latent.h5ad'}",
                f"paths.inputs.model={root / 'tiny' / 'train' / 'model.pt'}",
            ],
        )
        == 0
    )
    page = tmp_path / "page" / "traverse" / "study.html"
    text = page.read_text()
    # self-contained: no external script, style, image or font
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    assert "<script src" not in text and "@import" not in text
    # the browser's profile and scratch files in pytest's temporary tree (a short path:
    # Chromium's socket path must fit 107 bytes), not /tmp/org.chromium.Chromium.*
    with headless_chromium(tmp_path_factory.mktemp("chromium")) as d:
        d.get(page.as_uri())
        assert d.find_element("tag name", "body").get_attribute("data-ready") == "1"
        assert severe_logs(d) == []

        def state():
            img = d.find_element("id", "decoded").get_attribute("src")
            col = [
                tr.get_attribute("data-value")
                for tr in d.find_elements("css selector", "#genecol tr")
            ]
            near = [i.get_attribute("src") for i in d.find_elements("css selector", "#nearest img")]
            return img, col, near, d.find_element("id", "colbox").get_attribute("x")

        img0, col0, near0, x0 = state()
        assert img0.startswith("data:image/png;base64,") and col0 and near0
        slider = d.find_element("id", "pos")
        n_steps = int(slider.get_attribute("max")) + 1
        assert n_steps == 6  # FAST_ANALYSIS path_steps
        for _ in range(n_steps):  # to the far end of the path
            slider.send_keys(Keys.ARROW_RIGHT)
        img1, col1, near1, x1 = state()
        assert slider.get_attribute("value") == str(n_steps - 1)
        assert img1 != img0  # another decoded cell
        assert col1 != col0 and len(col1) == len(col0)  # another heatmap column
        assert x1 != x0  # the outlined column moved
        assert near1 != near0  # other nearest crops (myeloblast end vs myelocyte end)
        dots = d.find_elements("css selector", "#scatter [data-i]")
        assert len(dots) == 80  # every cell of the tiny run
        # each label drawn with its palette marker, as in the report's figures (circles
        # for the neutrophil lineage, a square for lymphocytes ...): not by colour alone
        shapes = {e.tag_name for e in dots}
        assert len(shapes) > 1 and shapes <= {"circle", "rect", "polygon"}, shapes
        legend = d.find_elements("css selector", "#legend svg > *")
        assert {e.tag_name for e in legend} == shapes | {"circle"}
        ActionChains(d).move_to_element(dots[0]).perform()
        hover = d.find_element("id", "hover")
        assert hover.get_attribute("data-cell")
        assert hover.find_elements("tag name", "img") or "no image" in hover.text
        assert severe_logs(d) == []
        d.save_screenshot(str(tmp_path / "study.png"))
    assert (tmp_path / "study.png").stat().st_size > 10_000


def test_latent_rows_are_cell_ids_and_evaluate_stores_its_umap(tmp_path):
    """latent.h5ad: cell IDs as obs_names (unique), paired row IDs in obs["row"]; evaluate
    reads it back against paired.h5ad and writes its UMAP into its copy; X_vae goes back
    into the user's AnnData by cell ID."""
    import anndata as ad

    from vae.inputs.schema import HAS_EXPRESSION, HAS_IMAGE
    from vae.scverse import add_latent

    p = make_paired(n=72, size=16, n_genes=12, image_only=4, expression_only=4)
    he, hi = p.obs[HAS_EXPRESSION].to_numpy(bool), p.obs[HAS_IMAGE].to_numpy(bool)
    cells = np.array([f"cell{i}" for i in range(p.n_obs)], dtype=object)
    cells[1] = cells[0]  # one profile drawn for two crops
    p.obs["expression_ref"] = np.where(he, cells, "")
    p.obs["image_ref"] = np.where(hi, [f"crop{i}" for i in range(p.n_obs)], "")
    p.obs_names = [f"r{i:06d}" for i in range(p.n_obs)]
    paired = tmp_path / "paired.h5ad"
    p.write_h5ad(paired)
    assert _run_in_process(tmp_path, paired, "train", TINY_TRAIN) == 0
    lat = ad.read_h5ad(tmp_path / "tiny" / "train" / "latent.h5ad")
    assert list(lat.obs["row"]) == list(p.obs_names)
    assert lat.obs_names.is_unique
    want = np.where(he, cells, p.obs["image_ref"].to_numpy())
    want[1] = f"{cells[0]}-1"
    assert list(lat.obs_names) == list(want)

    extra = [x for x in FAST_ANALYSIS if x != "analysis.umap=false"] + ["analysis.umap=true"]
    assert _run_in_process(tmp_path, paired, "evaluate", extra) == 0
    ev = ad.read_h5ad(tmp_path / "tiny" / "evaluate" / "latent.h5ad")
    assert list(ev.obs_names) == list(lat.obs_names)
    assert ev.obsm["X_umap"].shape == (p.n_obs, 2) and np.isfinite(ev.obsm["X_umap"]).all()
    np.testing.assert_array_equal(ev.obsm["X_vae"], lat.obsm["X_vae"])

    # the user's own expression AnnData, keyed by cell ID, gets X_vae
    ids = sorted(set(cells[he]))
    user = ad.AnnData(np.zeros((len(ids), 1), np.float32), obs=pd.DataFrame(index=ids))
    assert add_latent(user, ev) == len(ids)
    row = int(np.flatnonzero(lat.obs["expression_ref"].to_numpy() == cells[5])[0])
    np.testing.assert_allclose(user.obsm["X_vae"][ids.index(cells[5])], lat.obsm["X_vae"][row])
    assert add_latent(user, ev, key="X_umap") == len(ids)


def test_gene_programs_have_one_definition():
    from types import SimpleNamespace

    from hydra.errors import ConfigCompositionException

    from pipeline.stages.evaluate import analysis_settings

    cfg = compose_config(["stage=evaluate", "expression=paul15"])
    programs = analysis_settings(SimpleNamespace(cfg=cfg)).programs
    assert programs == dict(cfg.expression.programs) and "monocyte" in programs
    with pytest.raises(ConfigCompositionException, match="programs"):
        compose_config(["stage=evaluate", "analysis.programs={x: [MPO]}"])


def test_evaluate_scores_labelled_rows_only(tmp_path):
    """Unlabelled image-only rows (the real chain's detections without a class) are left
    out of the label metrics, never a class of their own (counted in n_unlabelled)."""
    a = make_paired(n=60, size=16, n_genes=12, image_only=24, expression_only=4)
    unl = np.zeros(a.n_obs, bool)
    unl[60:80] = True  # 20 of the 24 image-only rows carry no label
    label = a.obs["label"].astype(str).to_numpy().copy()
    label[unl] = ""
    # a few crops carry another class's label: the disagreement list must find them
    names = sorted(set(label[~unl]))
    flip = np.flatnonzero(a.obs["has_image"].to_numpy(bool) & ~unl)[::6]
    label[flip] = [names[(names.index(v) + 1) % len(names)] for v in label[flip]]
    a.obs["label"] = label
    # two image sources and some crops of no known source (left out of the per-source table)
    source = np.where(np.arange(a.n_obs) % 2 == 0, "smear_a", "smear_b").astype(object)
    source[np.arange(a.n_obs) % 5 == 0] = ""
    source[~a.obs["has_image"].to_numpy(bool)] = ""
    a.obs["image_source"] = source
    # consecutive image rows in pairs share a specimen (one cell through two sources);
    # the rest are their own specimen ("")
    specimen = np.full(a.n_obs, "", dtype=object)
    img_rows = np.flatnonzero(a.obs["has_image"].to_numpy(bool))
    for j, r in enumerate(img_rows[:40]):
        specimen[r] = f"spec{j // 2}"
    a.obs["specimen"] = specimen
    paired = tmp_path / "paired.h5ad"
    a.write_h5ad(paired)
    extra = ["trainer.test_fraction=0.4"]
    assert _run_in_process(tmp_path, paired, "train", TINY_TRAIN + extra) == 0
    assert _run_in_process(tmp_path, paired, "evaluate", FAST_ANALYSIS + extra) == 0
    split = pd.read_csv(tmp_path / "tiny" / "train" / "split.csv", index_col=0)["split"]
    test = (split.reindex(a.obs_names) == "test").to_numpy()
    has_img = a.obs["has_image"].to_numpy(bool)
    assert (test & unl).sum() > 0  # the case this test is about
    ev = tmp_path / "tiny" / "evaluate"
    ls = pd.read_csv(ev / "latent_structure.csv").set_index("latent")
    assert ls.loc["image", "n"] == (test & has_img & ~unl).sum()
    assert ls.loc["image", "n_unlabelled"] == (test & has_img & unl).sum()
    assert ls.loc["expression", "n_unlabelled"] == 0
    # each specimen counted once: n_cells and the weighted accuracy, recomputed here
    import anndata as ad

    from vae.analysis.metrics import knn_predict

    lat = ad.read_h5ad(tmp_path / "tiny" / "train" / "latent.h5ad")
    z = np.asarray(lat.obsm["X_vae_image"], np.float64)
    scored = np.flatnonzero(test & has_img & ~unl)
    ref = np.flatnonzero((split.reindex(a.obs_names) == "train").to_numpy() & has_img & ~unl)
    pred = knn_predict(z[scored], label[scored], 15, z[ref], label[ref])
    spec, src = specimen[scored], source[scored].astype(str)
    hit = pred == label[scored]
    # a specimen holds as many cells as its largest source has rows; its rows share them
    weight = np.ones(scored.size)
    for s in set(spec) - {""}:
        rows = spec == s
        cells = max((rows & (src == v)).sum() for v in set(src[rows]))
        weight[rows] = cells / rows.sum()
    assert weight.sum() < scored.size  # some cell is scored twice
    assert ls.loc["image", "n_cells"] == pytest.approx(weight.sum(), abs=0.05)
    assert ls.loc["image", "knn_accuracy_per_cell"] == pytest.approx(
        (weight * hit).sum() / weight.sum()
    )
    classes = set(label[~unl])
    lt = pd.read_csv(ev / "label_transfer.csv", keep_default_na=False)
    assert set(lt["label"]) <= classes
    cm = pd.read_csv(ev / "confusion_image.csv", keep_default_na=False)
    assert set(cm["true"]) <= classes and set(cm.columns[1:]) <= classes
    by_src = pd.read_csv(ev / "label_transfer_by_source.csv", keep_default_na=False)
    assert list(by_src["image_source"]) == ["smear_a", "smear_b"]
    scored = test & has_img & ~unl
    for _, r in by_src.iterrows():
        assert r["n"] == (scored & (source == r["image_source"])).sum()
    # every scored crop whose call is not its label is listed once (the confusion's
    # off-diagonal), surest call first, with its source, and drawn when there are any
    dis = pd.read_csv(ev / "label_disagreements.csv", keep_default_na=False)
    m = cm.set_index("true")
    off = sum(int(m.loc[t, c]) for t in m.index for c in m.columns if t != c)
    assert len(dis) == off and off > 0
    assert (dis["label"] != dis["image_call"]).all()
    assert dis["cell"].is_unique and set(dis["cell"]) <= set(a.obs_names[scored])
    assert list(dis["vote_share"]) == sorted(dis["vote_share"], reverse=True)
    assert ((dis["vote_share"] > 0) & (dis["vote_share"] >= dis["label_share"])).all()
    src_of = dict(zip(a.obs_names, source))
    assert [src_of[r] for r in dis["cell"]] == list(dis["image_source"])
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["label_disagreements"]["n"] == off
    assert metrics["label_disagreements"]["n_scored"] == scored.sum()
    assert (ev / "label_disagreements.png").exists() == (off > 0)
    # the labelled train crops that cast those wrong votes: each carries a wrong call
    # as its label, and together they cast every vote the wrong calls won with
    sus = pd.read_csv(ev / "label_suspects.csv", keep_default_na=False)
    train = (split.reindex(a.obs_names) == "train").to_numpy()
    n_ref = (train & has_img & ~unl).sum()
    assert sus["cell"].is_unique and set(sus["cell"]) <= set(a.obs_names[train & has_img & ~unl])
    assert set(sus["label"]) <= set(dis["image_call"])
    k = min(15, n_ref)  # analysis.knn_k, clipped to the reference
    assert sus["n_misled"].sum() == round((dis["vote_share"] * k).sum())
    assert (sus["n_misled"] >= 1).all() and sus["own_label_share"].between(0, 1).all()
    assert list(sus["n_misled"]) == sorted(sus["n_misled"], reverse=True)
    assert metrics["label_suspects"]["n"] == len(sus)
    assert metrics["label_suspects"]["n_reference"] == n_ref
    assert (ev / "label_suspects.png").exists()


def test_report_says_when_training_stopped_at_its_time_limit(tmp_path):
    """A time cap (the demo's 6-minute safety cap on a busy machine, its 2-minute cap
    before 2026-12-06) leaves a model of fewer epochs: the report's header says so (a
    user compares its numbers with the README's)."""
    from pipeline.stages.traverse import training_note

    model = tmp_path / "model.pt"
    assert training_note(model, 80) == ""  # no summary: nothing to say
    summ = tmp_path / "train_summary.json"
    summ.write_text(json.dumps({"epochs": 22, "stopped": "time_limit"}))
    note = training_note(model, 80)
    assert "time limit" in note and "22 epochs of 80 asked" in note
    summ.write_text(json.dumps({"epochs": 80, "stopped": "max_epochs"}))
    assert training_note(model, 80) == ""
    # a summary from before 2026-12-05: every epoch run, then the cap met, said time_limit
    summ.write_text(json.dumps({"epochs": 80, "stopped": "time_limit"}))
    assert training_note(model, 80) == ""


def test_traverse_measures_on_the_paired_datas_background_not_this_runs(tiny_run, tmp_path):
    """The decoded cells are measured against the background the crops were made with
    (paired uns, which stage=pair records), whatever this run's pair.background_value."""
    import anndata as ad
    from omegaconf import OmegaConf

    from pipeline.stages.traverse import _background
    from vae.analysis.run import load_run

    root, paired = tiny_run
    run = root / "tiny" / "train"
    a = ad.read_h5ad(paired)
    a.uns["background_value"] = 51
    a.write_h5ad(tmp_path / "p.h5ad")
    cfg = OmegaConf.create({"pair": {"background_value": 0}})
    rd = load_run(run / "latent.h5ad", run / "model.pt", tmp_path / "p.h5ad")
    assert rd.background_value == 51 and _background(rd, cfg) == 51 / 255.0
    del a.uns["background_value"]  # older paired data: this run's setting
    a.write_h5ad(tmp_path / "p.h5ad")
    rd = load_run(run / "latent.h5ad", run / "model.pt", tmp_path / "p.h5ad")
    assert rd.background_value is None and _background(rd, cfg) == 0.0


def _paired_like(paired: Path, out: Path, edit) -> Path:
    """A copy of ``paired`` changed by ``edit(AnnData) -> AnnData``, written to ``out``."""
    import anndata as ad

    edit(ad.read_h5ad(paired)).write_h5ad(out)
    return out


def test_analysis_refuses_paired_data_with_other_genes_than_the_model(tiny_run, tmp_path, caplog):
    """A paired.h5ad with the model's genes in another order (audit: exit 0, per-gene r
    against the wrong genes) or fewer of them (audit: torch's "mat1 and mat2 shapes cannot
    be multiplied", no file named): exit 2 naming both files, how many genes differ and
    the fix, before any output."""
    root, paired = tiny_run
    train = root / "tiny" / "train"
    model = train / "model.pt"
    rev = _paired_like(paired, tmp_path / "rev.h5ad", lambda a: a[:, ::-1].copy())
    few = _paired_like(paired, tmp_path / "few.h5ad", lambda a: a[:, :9].copy())
    fix = (
        "re-run stage=train on this paired.h5ad, or pass the paired.h5ad train used "
        f"(paths.inputs.paired={paired})"
    )
    for stage, product in (("evaluate", "metrics.json"), ("traverse", "report.html")):
        caplog.clear()
        assert _on_run(stage, tmp_path / f"rev_{stage}", train, f"paths.inputs.paired={rev}") == 2
        assert (
            f"{rev} does not hold the genes {model} was trained on: the same 12 genes in "
            "another order (12 of them at another column" in caplog.text
        )
        assert fix in caplog.text
        assert not (tmp_path / f"rev_{stage}" / "x" / stage / product).exists()
    caplog.clear()
    assert _on_run("evaluate", tmp_path / "few", train, f"paths.inputs.paired={few}") == 2
    assert (
        f"{few} does not hold the genes {model} was trained on: 9 genes against the model's "
        "12: 3 of the model's 12 are missing" in caplog.text
    )
    assert fix in caplog.text and "mat1 and mat2" not in caplog.text


def test_analysis_refuses_a_paired_file_other_than_the_one_train_read(tiny_run, tmp_path, caplog):
    """Same genes and rows, another file (its size differs from the one the train run's
    manifest recorded): exit 2 naming both files and sizes; the same file changed since
    (stage=pair run again) names the command that trains on it. A byte copy of the file
    train read is that file: accepted."""
    import shutil

    from pipeline import runner
    from pipeline.artifacts import describe

    root, paired = tiny_run
    train = root / "tiny" / "train"
    size = describe(paired)["bytes"]

    def tagged(a):
        a.uns["note"] = "written again"
        return a

    other = _paired_like(paired, tmp_path / "other.h5ad", tagged)
    now = describe(other)["bytes"]
    assert now != size
    assert _on_run("evaluate", tmp_path / "o", train, f"paths.inputs.paired={other}") == 2
    assert (
        f"{other} ({now} bytes) is not the paired.h5ad stage=train trained {train / 'model.pt'} "
        f"on ({paired}, {size} bytes); the model's scores on data it was not trained on would "
        "be wrong numbers: re-run stage=train on this paired.h5ad, or pass the paired.h5ad "
        f"train used (paths.inputs.paired={paired})" in caplog.text
    )
    assert not (tmp_path / "o" / "x" / "evaluate" / "metrics.json").exists()

    # the experiment's own paired file, re-made after training
    exp = tmp_path / "own" / "tiny"
    shutil.copytree(train, exp / "train")
    mine = shutil.copy(paired, tmp_path / "own" / "p.h5ad")
    man = json.loads((exp / "train" / "manifest.json").read_text())
    man["inputs"]["paired"]["path"] = str(mine)
    (exp / "train" / "manifest.json").write_text(json.dumps(man))
    _paired_like(mine, tmp_path / "own" / "p.h5ad", tagged)
    caplog.clear()
    args = [f"paths.root={tmp_path / 'own'}", "experiment=tiny", f"paths.inputs.paired={mine}"]
    # its genes and rows are the model's: warned of (a re-run of stage=pair rewrites it
    # with a new metadata key, data identical), not refused
    assert runner.main(compose_config(["stage=evaluate", *args, *FAST_ANALYSIS])) == 0
    assert (
        f"{mine} changed since stage=train trained {exp / 'train' / 'model.pt'} on it "
        "(stage=pair run again?); its genes and rows are the model's" in caplog.text
    )
    assert (
        f"re-run `python -m pipeline stage=train experiment=tiny paths.root={tmp_path / 'own'} "
        f"paths.inputs.paired={mine} overwrite=true` on this paired.h5ad (train read it at "
        f"{size} bytes, it is {now} now), or restore the paired.h5ad train used" in caplog.text
    )

    # a byte copy elsewhere: the data train read
    caplog.clear()
    copy = shutil.copy(paired, tmp_path / "copy.h5ad")
    assert _on_run("evaluate", tmp_path / "c", train, f"paths.inputs.paired={copy}") == 0
    assert "not the paired.h5ad" not in caplog.text and "changed since" not in caplog.text
    assert (tmp_path / "c" / "x" / "evaluate" / "metrics.json").exists()


def test_crops_of_another_size_than_the_models_are_warned_of(tiny_run, tmp_path, caplog):
    """Crops of 32 px to a model trained on 16 px (pair.crop_size changed; audit:
    silently resized): a WARNING naming both sizes; the model's own size: none."""
    import logging

    from vae.analysis.run import load_run

    root, paired = tiny_run
    run = root / "tiny" / "train"

    def doubled(a):
        for k in ("crops", "masks"):
            a.obsm[k] = np.repeat(np.repeat(a.obsm[k], 2, axis=1), 2, axis=2)
        return a

    big = _paired_like(paired, tmp_path / "big.h5ad", doubled)
    with caplog.at_level(logging.WARNING, logger="vae.analysis.run"):
        rd = load_run(run / "latent.h5ad", run / "model.pt", paired)
        assert "holds crops of" not in caplog.text
        rd = load_run(run / "latent.h5ad", run / "model.pt", big)
    assert rd.data.crops.shape[-1] == 16
    assert (
        f"{big} holds crops of 32 px, {run / 'model.pt'} was trained on 16 px crops" in caplog.text
    )


def test_a_paired_file_of_other_genes_is_one_error_line(tiny_run, tmp_path):
    """The refusal reaches the terminal as one `error:` line, not a traceback."""
    root, paired = tiny_run
    train = root / "tiny" / "train"
    rev = _paired_like(paired, tmp_path / "rev.h5ad", lambda a: a[:, ::-1].copy())
    r = run_pipeline(
        [
            "stage=evaluate",
            f"paths.root={tmp_path}",
            "experiment=x",
            f"paths.inputs.latent={train / 'latent.h5ad'}",
            f"paths.inputs.model={train / 'model.pt'}",
            f"paths.inputs.paired={rev}",
            "hardware.torch_threads=1",
            *FAST_ANALYSIS,
        ]
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert f"{rev} does not hold the genes {train / 'model.pt'} was trained on" in errors[0]


def test_lobe_cut_check_script_on_a_finished_run(tiny_run, tmp_path, monkeypatch, capsys):
    """scripts/lobe_cut_check.py: the drawn cells of one label, the colour of their lobe
    cuts beside the cytoplasm's and the drawn detail, in a table and a JSON; a label no
    crop has is refused by name."""
    import anndata as ad

    root, _ = tiny_run
    run = root / "tiny" / "train"
    mod = load_script("lobe_cut_check")
    lat = ad.read_h5ad(run / "latent.h5ad")
    crops = (lat.obs["label"].astype(str) == "myeloblast").to_numpy() & lat.obs[
        "has_image"
    ].to_numpy(bool)
    out = tmp_path / "cuts.json"
    argv = ["lobe_cut_check.py", str(run), "--label", "myeloblast", "--n", "5", "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    mod.main()
    res = json.loads(out.read_text())
    assert res["label"] == "myeloblast" and res["n_drawn"] == min(5, int(crops.sum())) > 0
    assert 0 <= res["n_with_cuts"] <= res["n_drawn"]
    for k in ("rgb_cut", "rgb_beside", "rgb_cytoplasm"):  # mean RGB, 0 where no such pixel
        assert len(res[k]) == 3 and all(0 <= v <= 1 for v in res[k]), k
    # what two drawings with other grain / granule seeds differ by: >= 0
    assert res["drawn_detail_cut"] >= 0 and res["drawn_detail_beside"] >= 0
    assert "n_drawn" in capsys.readouterr().out  # the table
    monkeypatch.setattr("sys.argv", [*argv[:3], "no-such-label"])
    with pytest.raises(SystemExit, match="no crop labelled 'no-such-label'"):
        mod.main()
