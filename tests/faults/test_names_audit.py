"""What a file-system audit found (2026-12-05): file names that are not valid UTF-8
(Latin-1 bytes from a Windows share or an old zip) failed stage=segment and
stage=embed after all their work; a moved or copied experiment re-ran every stage on
``stage=all resume=true`` (or compared the copy with the original's files); a file
name in decomposed Unicode (macOS) matched no row of ``embed.samples_csv``; the
printed ``tensorboard --logdir`` command broke on a folder with a space."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import unicodedata
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import guards, runner
from tests.faults.conftest import cfg_for
from tests.faults.test_interrupted_runs import CHAIN, _chain
from tests.helpers.run import embed_on_toy_study, run_stage_in_process
from tests.helpers.seg_synth import untrained_checkpoint

LATIN1 = b"Patient_M\xfcller_1.png"  # "Müller" in Latin-1: not UTF-8
# its name as every table writes it (segmentation.io.recorded_name)
RECORDED = "Patient_M\\xfcller_1.png"

# an untrained detector's cells kept whatever their shape: the names reach every table
KEEP_ALL = [
    "segmentation.score_threshold=0.0",
    "segmentation.min_area=1",
    "segmentation.drop_border=false",
    "segmentation.max_overlap_iou=null",
    "segmentation.duplicate_containment=null",
    "segmentation.drop_multi_piece=false",
    "segmentation.drop_tile_cut=false",
    "segmentation.touch_px=null",
    "segmentation.min_solidity=null",
    "segmentation.max_area_ratio=null",
]


def _smear(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    img = np.full((96, 128, 3), (230, 200, 200), np.uint8)
    yy, xx = np.mgrid[0:96, 0:128]
    img[(yy - 45) ** 2 + (xx - 60) ** 2 <= 14**2] = (120, 60, 160)
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)


def _rename_bytes(path: Path, name: bytes) -> None:
    """Give ``path`` the raw file name ``name`` (bytes the file system keeps as they are)."""
    os.rename(os.fsencode(str(path)), os.path.join(os.fsencode(str(path.parent)), name))


# ----------------------------------------------------------------------------
# 1. file names that are not valid UTF-8
# ----------------------------------------------------------------------------


def test_recorded_name_is_one_rule_and_keeps_names_apart():
    from segmentation.io import recorded_name, undecodable_warning

    assert recorded_name("Müller.png") == "Müller.png"  # valid names unchanged
    odd = os.fsdecode(LATIN1)
    assert recorded_name(odd) == RECORDED
    assert recorded_name(odd).encode("utf-8")  # writable anywhere
    # two Latin-1 names stay two ids (errors="replace" made both "M\ufffd...")
    assert recorded_name(os.fsdecode(b"M\xe4.png")) != recorded_name(os.fsdecode(b"M\xfc.png"))
    assert undecodable_warning("a/ok.png") is None
    warn = undecodable_warning(f"a/{odd}")
    assert repr(odd)[1:-1] in warn and RECORDED in warn and warn.encode("ascii", "strict")


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("det") / "model.pt")


def test_segment_reads_a_latin1_named_smear_and_records_a_valid_name(
    tmp_path: Path, detector: Path, caplog
):
    """stage=segment failed after every detection (UnicodeEncodeError writing obs
    ``_index`` of cells.h5ad, the file not named); now the smear is segmented, its cells
    and rows carry the escaped name, and one warning names the file."""
    smears = tmp_path / "smears"
    smears.mkdir()
    _smear(smears / "a.png")
    _rename_bytes(smears / "a.png", LATIN1)
    _smear(smears / "ok.png", seed=1)
    # a grey one: read, and its "converted" row in rejects.csv names it
    Image.fromarray(np.full((96, 128), 200, np.uint8)).save(smears / "grey.png")
    _rename_bytes(smears / "grey.png", b"zz_\xe9cran.png")
    args = [
        "experiment=names",
        f"paths.root={tmp_path / 'out'}",
        f"paths.inputs.smears={smears}",
        f"paths.inputs.segmentation_model={detector}",
        "hardware.torch_threads=1",
        "segmentation.crop_size=32",
        "segmentation.tile_size=128",
        "segmentation.tile_overlap=32",
        *KEEP_ALL,
    ]
    with caplog.at_level(logging.WARNING):
        out = run_stage_in_process(args, "segment")
    cells = ad.read_h5ad(out / "cells.h5ad")
    assert RECORDED in set(cells.obs["image"]) and "ok.png" in set(cells.obs["image"])
    assert any(c.startswith("Patient_M\\xfcller_1_d") for c in cells.obs_names)
    det = pd.read_csv(out / "detections.csv")
    assert {RECORDED, "ok.png", "zz_\\xe9cran.png"} >= set(det["image"]) >= {RECORDED}
    rej = pd.read_csv(out / "rejects.csv")
    assert ("zz_\\xe9cran.png", "converted") in set(zip(rej["image"], rej["action"]))
    warned = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(warned) == 2 and repr(os.fsdecode(LATIN1))[1:-1] in warned[0]
    log_text = (out / "segment.log").read_text(encoding="utf-8")
    assert "Logging error" not in log_text and "not valid UTF-8" in log_text
    # the overlay file keeps the smear's own bytes (files on disk are the OS's names)
    assert b"Patient_M\xfcller_1.png" in os.listdir(os.fsencode(str(out / "overlays")))


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_study) -> Path:
    """A trained tiny study: <root>/out/s/train/{model.pt,latent.h5ad} (this module's copy)."""
    return toy_study(tmp_path_factory.mktemp("study"))


def _embed(study: Path, exp: str, *args: str) -> Path:
    return embed_on_toy_study(study, exp, *args)


def _crop(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = np.full((16, 16, 3), 200, np.uint8)
    img[4:12, 4:12] = rng.integers(60, 160, 3)
    Image.fromarray(img).save(path)


def test_embed_reads_latin1_named_smears_crops_and_sample_folders(
    study: Path, tmp_path: Path, detector: Path
):
    """stage=embed failed writing samples.html (vae/analysis/samples.py) on such a name;
    now every cell is embedded and query.h5ad, rejects.csv, samples.csv and samples.html
    carry the escaped names."""
    smears = tmp_path / "smears" / "pat"
    smears.mkdir(parents=True)
    _smear(smears / "a.png")
    _rename_bytes(smears / "a.png", LATIN1)
    crops = tmp_path / "crops" / "sample"
    crops.mkdir(parents=True)
    for i in range(2):
        _crop(crops / f"c{i}.png", i)
    _rename_bytes(crops / "c0.png", b"Z\xfcrich.png")
    _rename_bytes(crops, b"Gr\xfcn")  # a sample folder of Latin-1 bytes
    (tmp_path / "crops" / "ok").mkdir()
    _crop(tmp_path / "crops" / "ok" / "c.png", 3)
    (tmp_path / "crops" / "ok" / "bad.png").write_bytes(b"not a png")
    d = _embed(
        study,
        "latin1",
        f"embed.smears={tmp_path / 'smears'}",
        f"embed.crops={tmp_path / 'crops'}",
        "embed.crop_masks=whole",
        f"paths.inputs.segmentation_model={detector}",
        *KEEP_ALL,
    )
    q = ad.read_h5ad(d / "query.h5ad")
    names = set(q.obs_names)
    assert "Gr\\xfcn/Z\\xfcrich.png" in names and "Gr\\xfcn/c1.png" in names
    assert any(n.startswith("pat/Patient_M\\xfcller_1_d") for n in names)
    assert set(q.obs["vae_sample"]) == {"pat", "Gr\\xfcn", "ok"}
    prof = pd.read_csv(d / "samples.csv")
    assert "Gr\\xfcn" in set(prof["sample"])
    assert "Gr\\xfcn" in (d / "samples.html").read_text(encoding="utf-8")
    rej = pd.read_csv(d / "rejects.csv")
    assert rej["item"].str.endswith("bad.png").sum() == 1
    log_text = (d / "embed.log").read_text(encoding="utf-8")
    assert "Logging error" not in log_text
    assert repr(os.fsdecode(LATIN1))[1:-1] in log_text  # the warning names the file


# ----------------------------------------------------------------------------
# 3. decomposed (NFD) file names against an NFC samples CSV
# ----------------------------------------------------------------------------


def test_samples_csv_matches_decomposed_file_names(study: Path, tmp_path: Path):
    """``Müller_1.png`` written by macOS (NFD) and the CSV's ``Müller_1.png`` (NFC) look
    alike and compared unequal: "names none of the 3 cells embedded"."""

    def nfd(s: str) -> str:
        return unicodedata.normalize("NFD", s)

    folder = tmp_path / "crops" / "nfd"
    folder.mkdir(parents=True)
    for i, name in enumerate(["Müller_1.png", "Schröder_2.png", "other.png"]):
        _crop(folder / nfd(name), i)
    jur = tmp_path / "crops" / nfd("Jürgen")  # a sample folder in NFD
    jur.mkdir()
    _crop(jur / "j.png", 5)
    csv = tmp_path / "samples.csv"
    pd.DataFrame(
        {
            "image": ["Müller_1.png", None],
            "cell_id": [None, "nfd/Schröder_2.png"],
            "sample": ["Jürgen", "P2"],
        }
    ).to_csv(csv, index=False, encoding="utf-8")
    assert nfd("Müller_1.png") != "Müller_1.png"  # the two spellings differ
    d = _embed(
        study,
        "nfd",
        f"embed.crops={tmp_path / 'crops'}",
        "embed.crop_masks=whole",
        f"embed.samples_csv={csv}",
    )
    q = ad.read_h5ad(d / "query.h5ad")
    by_image = dict(
        zip(q.obs["image"].map(lambda s: unicodedata.normalize("NFC", s)), q.obs["vae_sample"])
    )
    assert by_image["Müller_1.png"] == "Jürgen"
    assert by_image["Schröder_2.png"] == "P2"
    assert by_image["other.png"] == "nfd"
    # the folder's "Jürgen" (NFD) and the CSV's (NFC) are one sample
    prof = pd.read_csv(d / "samples.csv").set_index("sample")
    assert prof.loc["Jürgen", "n_cells"] == 2 and len(prof) == 3


# ----------------------------------------------------------------------------
# 2. a moved or copied experiment
# ----------------------------------------------------------------------------


def _current(root: Path) -> list[str]:
    return guards.start_run(cfg_for(root, "all", "resume=true"), CHAIN)


def test_a_moved_experiment_resumes_with_nothing_to_run(tmp_path, monkeypatch, caplog):
    """After ``mv`` of the experiment folder resume=true warned ``smears (...): gone``
    and ran every stage again."""
    _chain(monkeypatch, {"simulate": "s", "evaluate": "m", "traverse": "r"})
    old, new = tmp_path / "old", tmp_path / "new place"
    assert runner.main(cfg_for(old, "all")) == 0
    man = json.loads((old / "t" / "evaluate" / "manifest.json").read_text())
    assert man["inputs"]["smears"]["in_experiment"] == "simulate/smears"
    shutil.move(str(old), str(new))
    with caplog.at_level(logging.INFO):
        assert _current(new) == []
    assert "gone" not in caplog.text and "nothing to resume" in caplog.text
    assert runner.main(cfg_for(new, "all", "resume=true")) == 0
    # evaluate was not run again: its manifest is the one the first run wrote
    assert json.loads((new / "t" / "evaluate" / "manifest.json").read_text()) == man


def test_a_copied_experiment_is_compared_with_its_own_files(tmp_path, monkeypatch):
    """After ``cp -r`` with the original still there, resume=true compared sizes with the
    original's files: a copy whose smears were re-made was taken as current."""
    _chain(monkeypatch, {"simulate": "s", "evaluate": "m", "traverse": "r"})
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    assert runner.main(cfg_for(orig, "all")) == 0
    shutil.copytree(orig, copy)
    assert _current(copy) == []
    (copy / "t" / "simulate" / "smears").write_text("re-made in the copy, longer")
    assert _current(copy) == ["evaluate", "traverse"]
    assert _current(orig) == []  # the original is untouched by the copy's change
    man = json.loads((copy / "t" / "evaluate" / "manifest.json").read_text())
    changed = guards.changed_inputs(man, copy / "t")
    assert changed and str(copy / "t" / "simulate" / "smears") in changed[0]


def test_old_manifests_with_absolute_paths_only_still_compare(tmp_path, monkeypatch):
    """A manifest written before inputs were recorded in the experiment: its absolute
    path is read as before, and one inside the experiment follows a move."""
    _chain(monkeypatch, {"simulate": "s", "evaluate": "m", "traverse": "r"})
    old, new = tmp_path / "old", tmp_path / "new"
    assert runner.main(cfg_for(old, "all")) == 0
    for st in ("evaluate", "traverse"):
        p = old / "t" / st / "manifest.json"
        man = json.loads(p.read_text())
        for rec in man["inputs"].values():
            rec.pop("in_experiment", None)
        p.write_text(json.dumps(man))
    assert _current(old) == []
    (old / "t" / "simulate" / "smears").write_text("changed size")
    assert _current(old) == ["evaluate", "traverse"]
    (old / "t" / "simulate" / "smears").write_text("s")
    shutil.move(str(old), str(new))
    assert _current(new) == []


def test_an_input_outside_the_experiment_stays_absolute(tmp_path):
    from pipeline.artifacts import Manifest

    outside = tmp_path / "data" / "paired.h5ad"
    outside.parent.mkdir()
    outside.write_text("x")
    inside = tmp_path / "out" / "t" / "pair" / "paired.h5ad"
    inside.parent.mkdir(parents=True)
    inside.write_text("y")
    conf = {"paths": {"root": str(tmp_path / "out")}, "experiment": "t"}
    m = Manifest(tmp_path / "out" / "t" / "train", "train", conf)
    m.add_input("a", outside)
    m.add_input("b", inside)
    assert "in_experiment" not in m.data["inputs"]["a"]
    assert m.data["inputs"]["a"]["path"] == str(outside)
    assert m.data["inputs"]["b"]["in_experiment"] == "pair/paired.h5ad"


# ----------------------------------------------------------------------------
# 4. the printed tensorboard command
# ----------------------------------------------------------------------------


def test_printed_tensorboard_command_survives_a_space(tmp_path):
    from pipeline.stages.traverse import next_steps

    run = tmp_path / "my runs" / "exp 1"
    text = next_steps(run / "traverse" / "report.html", run)
    cmd = text.splitlines()[-1]
    assert shlex.split(cmd) == ["tensorboard", "--logdir", str(run)]


def test_an_unreadable_latin1_named_file_is_a_reject_not_a_crash(tmp_path):
    """A corrupt file whose name is not UTF-8: Pillow fails, imageio tries OpenCV,
    which kills the process (SIGSEGV) instead of giving a reason. In a subprocess:
    the crash must not take pytest with it."""
    import subprocess
    import sys

    bad = os.path.join(os.fsencode(str(tmp_path)), b"b\xe4d.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    code = (
        "import os, sys; from segmentation.io import read_rgb; "
        "r = read_rgb(os.fsdecode(sys.argv[1].encode('utf-8', 'surrogateescape'))); "
        "print('ok' if not r.ok else 'read?')"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, os.fsdecode(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stderr[-500:])
