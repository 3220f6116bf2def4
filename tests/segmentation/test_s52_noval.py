"""segment_train with no validation image (audit s52 S3): metrics.json "val": {} and
no word; now a warning naming the setting that gives a val split."""

from __future__ import annotations

import logging

from tests.segmentation.test_s52_coco_masks import _coco


def _load(tmp_path, caplog, src_extra: str, category: str = "wbc"):
    import json

    from pipeline.stages.segment_train import load_sets
    from tests.helpers.run import compose_config

    p = _coco(tmp_path, {})
    d = json.loads(p.read_text())
    d["categories"] = [{"id": 1, "name": category}]
    p.write_text(json.dumps(d))
    src = f"{{format: coco, path: '{p}', name: lab, scale: 1.0{src_extra}}}"
    cfg = compose_config(
        [
            "stage=segment_train",
            "data=bccd",
            f"paths.root={tmp_path}",
            f"data.smear_sources=[{src}]",
        ]
    )
    with caplog.at_level(logging.WARNING):
        return load_sets(cfg, None, [])


def test_no_val_images_is_warned_naming_the_setting(tmp_path, caplog):
    _, val, _, _ = _load(tmp_path, caplog, ", val_splits: []")
    assert val == {}
    msg = [r.getMessage() for r in caplog.records if "no validation images" in r.getMessage()]
    assert len(msg) == 1
    assert "data.smear_sources[N].val_splits" in msg[0]
    assert "data.smear_sources[N].val_fraction" in msg[0]
    assert "metrics.json 'val' stays empty" in msg[0]


def test_a_val_split_gives_no_warning(tmp_path, caplog):
    _, val, _, _ = _load(tmp_path, caplog, ", val_fraction: 0.34")  # no split fields
    assert len(val["lab"]) == 2
    assert "no validation images" not in caplog.text


def test_a_run_that_stops_gives_no_no_val_warning(tmp_path, caplog):
    """The warning came before the no-white-cell stop (e967552): a run that cannot train
    warned first of the metrics it would not have. Now it is logged after the stops."""
    import pytest

    from pipeline.runner import StageError

    with pytest.raises(StageError, match="no white-cell box"):
        _load(tmp_path, caplog, ", val_splits: []", category="neutrophil")  # not white
    assert "no validation images" not in caplog.text
