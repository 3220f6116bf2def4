"""Reproducibility audit (2026-12-05): what a rerun needs to reproduce an output, and
what tells two outputs apart, is recorded; nothing that does not change a result (the
output folder, wall-clock seconds, the file system's listing order) changes a file."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation import provenance
from segmentation.provenance import code_record
from tests.helpers.run import ROOT, compose_config, run_pipeline


@pytest.fixture
def fresh_record():
    provenance._record.cache_clear()
    yield
    provenance._record.cache_clear()


# ---------------------------------------------------------------------------
# 1. the top-level seed reaches stage=simulate
# ---------------------------------------------------------------------------


def test_simulator_seed_is_the_top_level_seed_unless_pinned():
    from pipeline.stages.simulate import simulator_params, simulator_seed

    # the one reader of the seed the data were drawn with (stage=evaluate's truth too)
    assert simulator_seed(compose_config(["stage=evaluate", "seed=5"])) == 5
    base = ["stage=simulate"]
    assert compose_config(base).data.simulator.seed is None  # null by default
    assert simulator_params(compose_config(base)).seed == 0  # the default data unchanged
    assert simulator_params(compose_config([*base, "seed=5"])).seed == 5
    pinned = compose_config([*base, "seed=5", "data.simulator.seed=3"])
    assert simulator_params(pinned).seed == 3


def test_simulate_manifest_records_the_seed_used_and_the_overrides(tmp_path):
    """seed=5 draws other data than seed 0, the manifest says 5 (and the command line)."""
    args = [
        "stage=simulate",
        f"paths.root={tmp_path}",
        "experiment=s",
        "seed=5",
        "data.simulator.n_images=2",
        "data.simulator.image_size=[192,192]",
        "data.simulator.wbc_per_image=[1,1]",
        "hardware.torch_threads=1",
    ]
    r = run_pipeline(args, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    d = tmp_path / "s" / "simulate"
    man = json.loads((d / "manifest.json").read_text())
    assert man["simulator_seed"] == 5
    assert man["overrides"] == args  # item 8: `python -m pipeline <overrides>` reruns it
    info = json.loads((d / "smears" / "annotations.json").read_text())["info"]
    assert info["simulator"]["seed"] == 5
    assert "(seed 5, the top-level seed)" in (d / "simulate.log").read_text()


# ---------------------------------------------------------------------------
# 2. docs: the thread count is not "float rounding" for every stage
# ---------------------------------------------------------------------------


def test_docs_give_per_stage_thread_count_effects():
    perf = (ROOT / "docs" / "performance.md").read_text()
    sec = perf.split("## Hardware settings that must not change results")[1].split("\n## ")[0]
    assert "One that does, at float rounding" not in sec
    assert "segment_train" in sec and "0.680" in sec and "3.1e-4" in sec
    assert "hardware.torch_threads=N" in sec
    readme = (ROOT / "README.md").read_text()
    assert "The thread count changes results at float rounding" not in readme


# ---------------------------------------------------------------------------
# 3./4. the code record: uncommitted changes and more libraries
# ---------------------------------------------------------------------------


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(cwd), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_record_identifies_uncommitted_changes(fresh_record, monkeypatch, tmp_path):
    repo = tmp_path.resolve()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    (repo / "notes.txt").write_text("n\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "c")
    monkeypatch.setattr(provenance, "SOURCE_ROOT", repo)
    clean = code_record()
    assert clean["git_dirty"] is False and clean["git_changed_py"] == []
    assert clean["git_diff_sha256"] == hashlib.sha256(b"").hexdigest()

    (repo / "a.py").write_text("x = 2\n")
    (repo / "new.py").write_text("y = 1\n")
    (repo / "notes.txt").write_text("m\n")  # tracked, changed, not .py: in the diff only
    provenance._record.cache_clear()
    one = code_record()
    diff = subprocess.run(
        ["git", "-C", str(repo), "diff", "HEAD", "--no-ext-diff", "--no-color"],
        capture_output=True,
        check=True,
    ).stdout
    assert one["git_dirty"] is True
    assert one["git_diff_sha256"] == hashlib.sha256(diff).hexdigest() != clean["git_diff_sha256"]
    assert one["git_changed_py"] == ["a.py", "new.py"]
    (repo / "a.py").write_text("x = 3\n")  # another edit of the same file: another hash
    provenance._record.cache_clear()
    assert code_record()["git_diff_sha256"] != one["git_diff_sha256"]

    # bounded: 60 stray files name the first 50 and the count of the rest
    (repo / "many").mkdir()
    for k in range(60):
        (repo / "many" / f"m{k:02d}.py").write_text("")
    provenance._record.cache_clear()
    names = code_record()["git_changed_py"]
    assert len(names) == provenance.MAX_CHANGED_FILES + 1 and names[-1] == "... 12 more"
    json.dumps(code_record())


def test_code_record_without_git_has_no_diff_and_no_error(fresh_record, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    rec = code_record()
    assert rec["git_revision"] is None
    assert "git_diff_sha256" not in rec and "git_changed_py" not in rec


def test_code_record_lists_the_libraries_that_change_results(fresh_record, monkeypatch):
    import importlib.metadata

    rec = code_record()["libraries"]
    for name in (
        "albumentations",
        "scikit-learn",
        "umap-learn",
        "leidenalg",
        "scipy",
        "scikit-image",
        "Pillow",
    ):
        assert name in rec
    assert rec["scipy"] == importlib.metadata.version("scipy")
    assert "opencv-python" in rec or "opencv-python-headless" in rec
    monkeypatch.setattr(provenance, "LIBRARIES", ("numpy", "no-such-distribution-xyz"))
    provenance._record.cache_clear()
    assert code_record()["libraries"]["no-such-distribution-xyz"] is None


# ---------------------------------------------------------------------------
# 5. fingerprints do not depend on the output folder
# ---------------------------------------------------------------------------


def test_config_hash_leaves_out_paths_root_only():
    from pipeline.artifacts import config_hash

    a = {"seed": 0, "paths": {"root": "/a", "inputs": {"paired": None}}}
    b = {"seed": 0, "paths": {"root": "/b", "inputs": {"paired": None}}}
    c = {"seed": 0, "paths": {"root": "/a", "inputs": {"paired": "/x.h5ad"}}}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)  # an input stays in it
    assert config_hash(a) != config_hash({**a, "seed": 1})
    assert a["paths"]["root"] == "/a"  # the caller's dict untouched


def test_checkpoint_source_is_relative_inside_the_experiment(tmp_path):
    from pipeline.stages.train import checkpoint_config, checkpoint_source

    exp = tmp_path / "out" / "demo"
    assert checkpoint_source(exp / "pair" / "paired.h5ad", exp) == "pair/paired.h5ad"
    outside = tmp_path / "elsewhere" / "paired.h5ad"
    assert checkpoint_source(outside, exp) == str(outside)
    cfg = {"paths": {"root": str(tmp_path), "shared_data": "d"}, "seed": 0}
    assert checkpoint_config(cfg) == {"paths": {"shared_data": "d"}, "seed": 0}


def test_study_finds_the_paired_data_of_relative_and_old_absolute_sources(tmp_path):
    from vae.api import _source_candidates

    exp = tmp_path / "demo"
    rel = "pair/paired.h5ad"
    # relative: to the experiment folder, else as given (before 2026-12-05 a relative
    # path was stored as given, relative to the run's working folder: review)
    assert _source_candidates(rel, exp / "train" / "model.pt") == [exp / rel, Path(rel)]
    assert _source_candidates(rel, exp / "train" / "v1" / "model.pt") == [exp / rel, Path(rel)]
    old = str(tmp_path / "old" / "pair" / "paired.h5ad")  # written before: absolute
    assert _source_candidates(old, exp / "train" / "model.pt") == [Path(old)]
    cwd_rel = "outputs/demo/pair/paired.h5ad"
    assert _source_candidates(cwd_rel, exp / "train" / "model.pt")[-1] == Path(cwd_rel)
    assert _source_candidates(rel, tmp_path / "loose" / "model.pt") == [Path(rel)]
    assert _source_candidates(None, exp / "train" / "model.pt") == []


def _tiny_train(out: Path, max_epochs: int, max_minutes: float | None):
    from pipeline.hardware import DistInfo
    from tests.helpers.vae_toy import make_paired, tiny_model
    from vae.data import from_anndata, stratified_split
    from vae.train import TrainArgs, train

    d = from_anndata(make_paired(24))
    split = stratified_split(d.labels.numpy(), 0.25, 0.0, 0)
    args = TrainArgs(
        max_epochs=max_epochs,
        max_minutes=max_minutes,
        batch_size=8,
        kl_warmup_epochs=0,
        image_every_epochs=0,
    )
    torch.manual_seed(0)
    out.mkdir(parents=True)
    cpu = DistInfo(0, 1, 0, torch.device("cpu"))
    return train(tiny_model(12), d, split, args, cpu, out, meta={"source": "pair/paired.h5ad"})


def test_two_identical_trainings_write_identical_model_files(tmp_path):
    """model.pt held each epoch's wall-clock seconds: two identical runs, two digests."""
    from vae.checkpoint import checkpoint_digest, load_checkpoint

    a = _tiny_train(tmp_path / "a", 1, None)
    b = _tiny_train(tmp_path / "b", 1, None)
    assert a.history[0]["val"] == b.history[0]["val"]
    assert checkpoint_digest(tmp_path / "a" / "model.pt") == checkpoint_digest(
        tmp_path / "b" / "model.pt"
    )
    assert "seconds" not in load_checkpoint(tmp_path / "a" / "model.pt")["history"][0]
    assert "seconds" in load_checkpoint(tmp_path / "a" / "last.pt")["history"][0]


# ---------------------------------------------------------------------------
# 6. a run that finished max_epochs is not labelled time_limit
# ---------------------------------------------------------------------------


def test_a_run_that_finished_its_epochs_says_max_epochs(tmp_path):
    done = _tiny_train(tmp_path / "done", 1, 1e-9)  # the cap is also reached after epoch 1
    assert (done.epochs, done.stopped) == (1, "max_epochs")
    cut = _tiny_train(tmp_path / "cut", 3, 1e-9)  # the cap cut it after epoch 1 of 3
    assert (cut.epochs, cut.stopped) == (1, "time_limit")


# ---------------------------------------------------------------------------
# 7. several images sharing a stem: the first in name order, not in listing order
# ---------------------------------------------------------------------------


@pytest.fixture
def reversed_glob(monkeypatch):
    """A file system that lists in reverse name order."""
    real = Path.glob

    def glob(self, pattern, *a, **k):
        return iter(sorted(real(self, pattern, *a, **k), reverse=True))

    monkeypatch.setattr(Path, "glob", glob)


def _img(path: Path, w: int = 30, h: int = 20) -> None:
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(path)


def test_voc_image_found_by_stem_is_the_first_by_name(tmp_path, reversed_glob):
    from segmentation.datasets import read_voc

    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.tif</filename>"
        "<size><width>30</width><height>20</height></size>"
        "<object><name>WBC</name><bndbox><xmin>2</xmin><ymin>2</ymin>"
        "<xmax>10</xmax><ymax>10</ymax></bndbox></object></annotation>"
    )
    for ext in ("jpg", "png"):
        _img(root / "JPEGImages" / f"a.{ext}")
    ds = read_voc(root)
    assert Path(ds.images[0].path).name == "a.jpg"


def test_mask_png_image_sharing_a_stem_is_the_first_by_name(tmp_path, reversed_glob):
    from segmentation.datasets import read_mask_pngs

    d = tmp_path / "dataset1"
    d.mkdir()
    m = np.zeros((20, 30), np.uint8)
    m[4:14, 6:20] = 255
    Image.fromarray(m).save(d / "001.png")
    for ext in ("bmp", "jpg"):
        _img(d / f"001.{ext}")
    ds = read_mask_pngs(tmp_path, val_fraction=0.0)
    assert Path(ds.images[0].path).name == "001.bmp"


def test_evaluate_rebuilds_the_panel_of_the_seed_the_data_were_simulated_with(tmp_path):
    """stage=evaluate took the simulator's seed from its own config: `seed=S` (a
    training seed) on data simulated at seed 0 built the seed-S gene panel (review)."""
    import json

    from pipeline.stages.simulate import simulated_seed
    from tests.helpers.run import compose_config

    cfg = compose_config(["stage=evaluate", f"paths.root={tmp_path}", "experiment=x", "seed=3"])
    run = tmp_path / "x"
    assert simulated_seed(run, cfg) == 3  # no simulate run: the config's answer
    (run / "simulate").mkdir(parents=True)
    man = run / "simulate" / "manifest.json"
    man.write_text(json.dumps({"simulator_seed": 0, "config": {}}))
    assert simulated_seed(run, cfg) == 0
    # a manifest from before simulator_seed was recorded: its data.simulator.seed
    man.write_text(json.dumps({"config": {"data": {"simulator": {"seed": 7}}}}))
    assert simulated_seed(run, cfg) == 7
