"""Crop-folder mode (audit s52 S2): images at the folder's top level, in folders below
a class folder, and empty class folders were passed over without a word (4 crops of 6
files). One warning per folder now counts them, with examples."""

from __future__ import annotations

import logging

from PIL import Image

from segmentation.sources import list_crop_folder


def test_unread_images_and_empty_classes_are_warned_once(tmp_path, caplog):
    root = tmp_path / "crops"
    for rel in ["Neutrophil/a.jpg", "Neutrophil/b.jpg", "root_file.jpg", "Nested/sub/c.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(root / rel)
    (root / "EmptyClass").mkdir()
    seen: set[str] = set()
    with caplog.at_level(logging.WARNING):
        got = list_crop_folder(root, seen=seen)
        list_crop_folder(root, 1, seen=seen)  # a run that lists a folder twice: one warning
    assert [(f.name, c) for f, c in got] == [("a.jpg", "neutrophil"), ("b.jpg", "neutrophil")]
    msg = [r.getMessage() for r in caplog.records if "not read as crops" in r.getMessage()]
    assert len(msg) == 1
    assert "1 image(s) at its top level, in no class folder (root_file.jpg)" in msg[0]
    assert "1 image(s) in folders below a class folder (Nested/sub/c.jpg)" in msg[0]
    assert "2 class folder(s) with no image (EmptyClass, Nested)" in msg[0]


def test_a_clean_folder_gives_no_warning(tmp_path, caplog):
    (tmp_path / "Lympho").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "Lympho" / "x.png")
    with caplog.at_level(logging.WARNING):
        assert len(list_crop_folder(tmp_path)) == 1
    assert "not read as crops" not in caplog.text


def test_a_second_run_in_the_same_process_warns_again(tmp_path, caplog):
    """A module-global set of folders reported (3f45e07) kept a second run in the same
    process (a notebook, the API) from warning; the record is now per call / per run."""
    root = tmp_path / "crops"
    for rel in ["Neutrophil/a.jpg", "root_file.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(root / rel)
    with caplog.at_level(logging.WARNING):
        list_crop_folder(root, seen=set())  # run 1
        list_crop_folder(root, seen=set())  # run 2
        list_crop_folder(root)  # a call with no record of its own
    msg = [r.getMessage() for r in caplog.records if "not read as crops" in r.getMessage()]
    assert len(msg) == 3
