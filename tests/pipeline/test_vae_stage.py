"""stage=train end to end in a subprocess: outputs, TensorBoard tags, resume, sweep."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from segmentation.io import blank_as_read, load_torch_file
from tests.helpers.run import ROOT, run_pipeline, run_stage_in_process
from tests.helpers.vae_toy import make_paired

TINY = [
    "vae.channels=[8,16]",
    "vae.hidden=[16]",
    "vae.n_latent=4",
    "vae.n_private=0",
    "vae.kl_warmup_epochs=1",
    "trainer.batch_size=16",
    "trainer.max_minutes=null",
    "trainer.log_every_steps=1",
    "hardware.torch_threads=1",
]


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]
    args = tuple(a for a in args if not a.startswith("-"))
    p = run_pipeline(
        [
            *flags,
            "stage=train",
            f"paths.root={tmp / 'out'}",
            f"paths.inputs.paired={tmp / 'paired.h5ad'}",
            *TINY,
            *args,
        ]
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _run_here(tmp: Path, *args: str) -> Path:
    """stage=train in this process (no interpreter start-up: the CLI path is the test
    above), -> the stage folder."""
    return run_stage_in_process(
        [f"paths.root={tmp / 'out'}", f"paths.inputs.paired={tmp / 'paired.h5ad'}", *TINY, *args],
        "train",
    )


@pytest.fixture
def paired(tmp_path: Path) -> Path:
    make_paired(48, image_only=6, expression_only=6).write_h5ad(tmp_path / "paired.h5ad")
    return tmp_path


def test_stage_train_writes_model_latent_and_tensorboard(paired: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vae.checkpoint import load_model

    _run(paired, "experiment=t", "trainer.max_epochs=3", "trainer.figure_budget=null")
    d = paired / "out" / "t" / "train"
    for f in ("model.pt", "last.pt", "latent.h5ad", "split.csv", "train_summary.json"):
        assert (d / f).exists(), f
    lat = ad.read_h5ad(d / "latent.h5ad")
    assert lat.obsm["X_vae"].shape == (60, 4) and np.isfinite(lat.obsm["X_vae"]).all()
    assert set(lat.obs["split"]) == {"train", "val", "test"}
    # image latent is NaN exactly where there is no image
    no_img = ~lat.obs["has_image"].to_numpy()
    assert np.isnan(lat.obsm["X_vae_image"][no_img]).all()
    assert np.isfinite(lat.obsm["X_vae_image"][~no_img]).all()
    assert lat.uns["kl_per_dim"].shape == (4,)
    model, meta = load_model(d / "model.pt")
    assert meta["n_latent"] == 4 and meta["gene_names"][0] == "G0" and meta["crop_size"] == 16
    dec = model.decode(torch.zeros(2, 4))
    assert dec.image.shape == (2, 3, 16, 16) and dec.expression_log.shape == (2, 12)
    acc = EventAccumulator(str(d / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "reconstruction/val" in tags["images"]
    assert "expression/granule_genes" in tags["images"]
    assert len(acc.Images("reconstruction/val")) == 3  # one per epoch
    for t in (
        "train/total",
        "train/kl",
        "train/expression_from_image",
        "schedule/beta",
        "schedule/lr",
        "val/image",
        "kl_dim/00",
    ):
        assert t in tags["scalars"], t
    assert any(t.startswith("latent/mu_") for t in tags["histograms"])
    assert (d / "tb" / "projector_config.pbtxt").exists()


def test_stage_train_resume_continues_from_saved_step(paired: Path):
    d = _run_here(paired, "experiment=r", "trainer.max_epochs=2")
    ck = load_torch_file(d / "last.pt")
    step2 = ck["step"]
    assert ck["epoch"] == 2 and step2 > 0
    split_before = (d / "split.csv").read_text()
    assert _run_here(paired, "experiment=r", "trainer.max_epochs=3", "resume=true") == d
    assert "resumed from" in (d / "train.log").read_text()
    ck = load_torch_file(d / "last.pt")
    assert ck["epoch"] == 3 and ck["step"] == step2 + step2 // 2
    assert [h["epoch"] for h in ck["history"]] == [1, 2, 3]
    assert (d / "split.csv").read_text() == split_before


def test_stage_train_with_the_cells_sizes(paired: Path):
    from pipeline.runner import StageError
    from vae.checkpoint import load_model
    from vae.inputs.schema import CELL_DIAMETER

    # crops not cut by stage=segment carry no size: a clear error, nothing written
    with pytest.raises(StageError) as err:
        _run_here(paired, "experiment=nosize", "vae.size_weight=100")
    assert f"obs['{CELL_DIAMETER}']" in str(err.value) and "vae.size_weight" in str(err.value)
    assert not (paired / "out" / "nosize" / "train" / "model.pt").exists()
    a = ad.read_h5ad(paired / "paired.h5ad")
    rng = np.random.default_rng(0)
    d = rng.uniform(25, 50, a.n_obs).astype(np.float32)
    d[~a.obs["has_image"].to_numpy()] = np.nan
    a.obs[CELL_DIAMETER] = d
    a.write_h5ad(paired / "paired.h5ad")
    out = _run_here(paired, "experiment=size", "trainer.max_epochs=2", "vae.size_weight=100")
    model, _ = load_model(out / "model.pt")
    logd = np.log(d[np.isfinite(d)])
    assert model.args.size_head
    assert model.args.size_log_mean == pytest.approx(logd.mean(), rel=1e-5)
    assert model.args.size_log_sd == pytest.approx(logd.std(), rel=1e-5)
    # the size term is trained and logged (0 would mean no size reached the loss)
    last = load_torch_file(out / "last.pt")["history"][-1]
    assert np.isfinite(last["train"]["size"]) and last["train"]["size"] > 0


def test_stage_train_balances_the_label_head_from_the_train_split(paired: Path):
    """Also: vae.classify_noise_q and vae.align_centroid_weight reach the loss weights of
    the checkpoint, and the centroid term is logged."""
    from vae.losses import class_balance_weights

    out = _run_here(
        paired,
        "experiment=bal",
        "trainer.max_epochs=1",
        "vae.classify_balance=1.0",
        "vae.classify_noise_q=0.7",
        "vae.align_centroid_weight=5",
    )
    ck = load_torch_file(out / "last.pt")
    weights = ck["train_args"]["weights"]
    assert weights["classify_noise_q"] == pytest.approx(0.7)  # the head's loss: GCE
    assert weights["align_centroid"] == pytest.approx(5.0)
    assert np.isfinite(ck["history"][-1]["train"]["align_centroid"])
    w = weights["classify_class_weights"]
    a = ad.read_h5ad(paired / "paired.h5ad")
    split = np.loadtxt(out / "split.csv", dtype=str, delimiter=",", skiprows=1)[:, 1]
    names = sorted(set(a.obs["label"]))  # the label codes: sorted names
    codes = np.array([names.index(x) for x in a.obs["label"]])
    train = split == "train"
    for e, col in enumerate(("has_image", "has_expression")):
        want = class_balance_weights(codes, train & a.obs[col].to_numpy(), len(names), 1.0)
        assert w[e] == pytest.approx(want)
    log = (out / "train.log").read_text()
    assert "label head class weights, image expert (vae.classify_balance=1)" in log


@pytest.mark.slow
def test_multirun_beta_sweep_puts_each_job_in_a_variant_folder(paired: Path):
    import os

    # the tiny settings as config groups (vae=tiny trainer=tiny), not overrides
    conf = paired / "conf"
    for group, lines in {"vae": TINY[:5], "trainer": TINY[5:8] + ["max_epochs: 1"]}.items():
        (conf / group).mkdir(parents=True)
        body = ["# typed by base_config (pipeline/config.py)"] + [
            ln.split(".", 1)[1].replace("=", ": ") if "=" in ln else ln for ln in lines
        ]
        (conf / group / "tiny.yaml").write_text("\n".join(body) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = run_pipeline(
        [
            "-m",
            f"--config-dir={conf}",
            "stage=train",
            "experiment=s",
            "paths.root=out",
            "paths.inputs.paired=paired.h5ad",
            "vae=tiny",
            "trainer=tiny",
            "vae.beta=1,4",
        ],
        cwd=paired,
        env=env,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = paired / "out" / "s" / "train"
    subs = sorted(p.name for p in d.iterdir() if p.is_dir())
    # named after the swept setting alone, as the README says (train/vae.beta=1/)
    assert subs == ["vae.beta=1", "vae.beta=4"], subs
    betas = []
    for s in subs:
        summary = json.loads((d / s / "train_summary.json").read_text())
        assert summary["epochs"] == 1
        ck = load_torch_file(d / s / "model.pt")
        betas.append(ck["train_args"]["beta"])
    assert betas == [1.0, 4.0]


@pytest.mark.slow
def test_stage_train_ddp_two_cpu_processes(paired: Path):
    """2-rank gloo DDP: both ranks train on their shards, rank 0 writes the outputs."""
    _run(
        paired,
        "experiment=ddp",
        "trainer.max_epochs=2",
        "hardware.num_processes=2",
        "hardware.master_port=0",
    )
    d = paired / "out" / "ddp" / "train"
    ck = load_torch_file(d / "last.pt")
    import math

    import pandas as pd

    n_train = int((pd.read_csv(d / "split.csv", index_col=0)["split"] == "train").sum())
    per_rank = math.ceil(n_train / 2)  # each rank sees half of every epoch
    assert ck["epoch"] == 2 and ck["step"] == 2 * math.ceil(per_rank / 16)
    assert ad.read_h5ad(d / "latent.h5ad").obsm["X_vae"].shape == (60, 4)


def test_ddp_ranks_whose_batches_lack_a_heads_rows_do_not_hang_and_resume_exactly(
    tmp_path: Path, spawn_tmp: Path
):
    """2-rank gloo DDP with batches of 2 rows, a third of them lymphocytes: a rank whose
    batch held no row on the maturation path gave the maturation head no gradient, the
    ranks' all-reduces stopped matching and the run hung for good (DDP audit: epoch 4 of
    the demo data, 3-row last batches). Every parameter is now in every rank's graph.
    And a run stopped after epoch 1 and resumed ends with the weights of an uninterrupted
    one: each rank restores its own random streams (every rank restored rank 0's: the
    weights ended 3.3e-3 apart)."""
    make_paired(36, seed=3).write_h5ad(tmp_path / "paired.h5ad")

    def ddp(name: str, *extra: str) -> Path:
        """stage=train on 2 spawned ranks, launched from this process (no interpreter
        start-up per run, as test_runner.py::test_ddp_two_cpu_processes_gloo does); a hang
        is a failure: the ranks are killed after 240 s, and the launch then fails."""
        import multiprocessing
        import threading

        hung = threading.Event()

        def kill_ranks():
            hung.set()
            for child in multiprocessing.active_children():
                child.kill()

        watchdog = threading.Timer(240, kill_ranks)
        watchdog.start()
        try:
            return run_stage_in_process(
                [
                    f"paths.root={tmp_path / 'out'}",
                    f"paths.inputs.paired={tmp_path / 'paired.h5ad'}",
                    *TINY,
                    f"experiment={name}",
                    "trainer.batch_size=2",
                    "trainer.max_epochs=2",
                    "trainer.projector_max_cells=0",
                    "hardware.num_processes=2",
                    "hardware.master_port=0",
                    *extra,
                ],
                "train",
            )
        except Exception:
            if hung.is_set():
                pytest.fail("2-rank training hung (no finish in 240 s)")
            raise
        finally:
            watchdog.cancel()

    whole = ddp("whole")
    assert json.loads((whole / "train_summary.json").read_text())["epochs"] == 2
    # the case this test is about happens in epoch 1: at some step one rank's batch holds
    # lymphocytes only (no row on the maturation path) while the other rank's does not
    import pandas as pd

    from vae.data import epoch_batches

    split = pd.read_csv(whole / "split.csv", index_col=0)["split"]
    labels = ad.read_h5ad(tmp_path / "paired.h5ad").obs["label"].reindex(split.index)
    off_path = (labels.astype(str) == "lymphocyte").to_numpy()
    train_idx = np.flatnonzero(split.to_numpy() == "train")
    seed = json.loads((whole / "manifest.json").read_text())["config"]["seed"]
    ranks = [
        epoch_batches(train_idx, 2, shuffle=True, seed=seed, epoch=0, rank=r, world_size=2)
        for r in range(2)
    ]
    lacking = [[off_path[np.asarray(b)].all() for b in batches] for batches in ranks]
    assert any(x != y for x, y in zip(*lacking)), lacking
    assert ddp("cut", "trainer.stop_after_epochs=1") == tmp_path / "out" / "cut" / "train"
    cut = ddp("cut", "resume=true")
    a, b = load_torch_file(whole / "last.pt"), load_torch_file(cut / "last.pt")
    assert b["epoch"] == 2 and len(b["rng_ranks"]) == 2
    # each rank goes on with its own random streams: at the end both ranks' states are
    # those of the uninterrupted run (every rank restored rank 0's: rank 1's differed)
    for r in range(2):
        for key in ("torch", "augment"):
            assert torch.equal(a["rng_ranks"][r][key], b["rng_ranks"][r][key]), (r, key)
    # the epoch after the resume: the uninterrupted run's loss to float rounding (one
    # process resumes bit for bit; two differ by ~1e-8 relative in that epoch, which
    # Adam then grows: weights 1.5e-3 apart after two epochs, 4.2e-3 before the fix)
    ta, tb = a["history"][1]["train"]["total"], b["history"][1]["train"]["total"]
    assert abs(ta - tb) <= 1e-6 * abs(ta), (ta, tb)


def test_stage_train_reuses_another_runs_split(paired: Path):
    """trainer.split_from: a rebuilt paired table (rows reordered, labels changed, a new
    crop) keeps each crop's and profile's split from the earlier run."""
    from pipeline.runner import StageError

    a = ad.read_h5ad(paired / "paired.h5ad")
    # what stage=pair writes: each row's crop and profile ids ("" where none)
    a.obs["image_ref"] = np.where(a.obs["has_image"], [f"crop{i}" for i in range(a.n_obs)], "")
    a.obs["expression_ref"] = np.where(
        a.obs["has_expression"], [f"cell{i}" for i in range(a.n_obs)], ""
    )
    a.write_h5ad(paired / "paired.h5ad")
    first = _run_here(paired, "experiment=a", "trainer.max_epochs=1")
    b = a[np.random.default_rng(0).permutation(a.n_obs)].copy()
    b.obs_names = [f"x{i}" for i in range(b.n_obs)]  # rows renamed, as a new pairing does
    b.obs["label"] = b.obs["label"].astype(str).to_numpy()[::-1]  # other labels
    b.obs["specimen"] = ""
    img_rows = b.obs_names[b.obs["has_image"].to_numpy(bool)]
    b.obs.loc[img_rows[1], "specimen"] = "slide7"
    extra = b[img_rows[:2]].copy()
    extra.obs_names = ["new", "new_of_slide7"]
    extra.obs["image_ref"] = ["a_new_crop", "a_crop_of_slide7"]
    b = ad.concat([b, extra], merge="same", uns_merge="same")
    (paired / "b").mkdir()
    b.write_h5ad(paired / "b" / "paired.h5ad")
    out = _run_here(
        paired / "b",
        "experiment=b",
        "trainer.max_epochs=1",
        "seed=5",
        f"trainer.split_from={first}",
    )
    # no crop / profile id: "" as the pipeline reads it (NaN on disk)
    old = blank_as_read(ad.read_h5ad(first / "latent.h5ad")).obs
    new = blank_as_read(ad.read_h5ad(out / "latent.h5ad")).obs
    img = new["has_image"].to_numpy(bool) & ~new["image_ref"].str.startswith("a_").to_numpy()
    oi = old["has_image"].to_numpy(bool)
    by_crop = dict(zip(old["image_ref"][oi], old["split"][oi].astype(str)))
    by_prof = dict(zip(old["expression_ref"][~oi], old["split"][~oi].astype(str)))
    assert [by_crop[c] for c in new["image_ref"][img]] == list(new["split"][img].astype(str))
    prof = ~new["has_image"].to_numpy(bool)
    assert [by_prof[e] for e in new["expression_ref"][prof]] == list(new["split"][prof].astype(str))
    assert new.loc[new["image_ref"] == "a_new_crop", "split"].iloc[0] in {"train", "val", "test"}
    # a new crop of a known specimen joins that specimen's split
    split_of = dict(zip(new["image_ref"], new["split"].astype(str)))
    slide7 = b.obs.loc[img_rows[1], "image_ref"]
    assert split_of["a_crop_of_slide7"] == split_of[slide7]
    log = (out / "train.log").read_text()
    assert "60 rows keep their split from" in log and "2 rows new to it" in log
    with pytest.raises(StageError, match=r"trainer.split_from=.*no latent.h5ad"):
        _run_here(paired / "b", "experiment=c", f"trainer.split_from={paired / 'nowhere'}")


def test_split_from_a_file_that_is_not_h5ad_is_one_clear_error(paired: Path):
    """trainer.split_from naming a file that is not an .h5ad (a text file, a truncated
    latent.h5ad) is one error line naming the setting and the file, not h5py's traceback."""
    bad = paired / "latent.h5ad"
    bad.write_text("not an h5ad\n")
    p = run_pipeline(
        [
            "stage=train",
            f"paths.root={paired / 'out'}",
            f"paths.inputs.paired={paired / 'paired.h5ad'}",
            *TINY,
            "experiment=s",
            "trainer.max_epochs=1",
            f"trainer.split_from={bad}",
        ]
    )
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"trainer.split_from={bad}" in errors[0] and "not a readable .h5ad" in errors[0]
    # a truncated file, an HDF5 file that is not AnnData: the same error (in this process)
    import h5py

    from pipeline.runner import StageError
    from pipeline.stages.train import _reused_split

    whole = (paired / "paired.h5ad").read_bytes()
    (paired / "cut.h5ad").write_bytes(whole[: len(whole) // 2])
    with h5py.File(paired / "plain.h5", "w") as f:
        f["x"] = np.ones(3)
    obs = ad.read_h5ad(paired / "paired.h5ad").obs
    for f in ("cut.h5ad", "plain.h5"):
        with pytest.raises(StageError, match=r"trainer.split_from=.*not a readable \.h5ad"):
            _reused_split(str(paired / f), obs, None, None)


def test_split_from_closes_its_file_when_reading_it_fails(paired: Path, monkeypatch):
    """The latent.h5ad that trainer.split_from names is closed even when reading its obs
    fails (the handle was left open then)."""
    import pipeline.stages.train as T
    from tests.helpers.h5ad_handles import opens_and_fails

    obs = ad.read_h5ad(paired / "paired.h5ad").obs
    opened = opens_and_fails(monkeypatch, "pipeline.stages.train.blank_as_read")
    with pytest.raises(RuntimeError, match="boom"):
        T._reused_split(str(paired / "paired.h5ad"), obs, None, None)
    assert len(opened) == 1 and not opened[0].file.is_open


def test_split_csv_quotes_cell_names_that_start_a_formula(paired: Path):
    """split.csv names each cell (the names come from the user's files) and was written
    as is: a cell named ``=HYPERLINK(...)`` ran as a formula in a spreadsheet. Now a name
    that starts one is written with a leading ``'`` (``+1`` stays the number it reads as),
    and resume=true still matches the rows by their names."""
    import pandas as pd

    from segmentation.io import spreadsheet_unquote
    from vae.analysis.run import read_split

    a = ad.read_h5ad(paired / "paired.h5ad")
    hostile = ['=HYPERLINK("http://x","y")', "@cmd", "-ctrl", "+1", "'=x"]
    names = list(a.obs_names)
    names[: len(hostile)] = hostile
    a.obs_names = names
    a.write_h5ad(paired / "paired.h5ad")
    d = _run_here(paired, "experiment=q", "trainer.max_epochs=1")
    back = pd.read_csv(d / "split.csv", dtype=str, keep_default_na=False)
    assert list(back.columns) == ["obs", "split"]
    written = back["obs"].tolist()[: len(hostile)]
    assert written == ["'" + hostile[0], "'@cmd", "'-ctrl", "+1", "''=x"]
    assert [spreadsheet_unquote(v) for v in back["obs"]] == names
    # the one reader (stages, scripts) gives the names back, "+1" and "'=x" included
    assert read_split(d / "split.csv").index.tolist() == names
    split_before = (d / "split.csv").read_text()
    assert _run_here(paired, "experiment=q", "trainer.max_epochs=2", "resume=true") == d
    assert "resumed from" in (d / "train.log").read_text()
    assert (d / "split.csv").read_text() == split_before
