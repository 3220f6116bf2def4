"""segment_train with no validation image (audit s52 S3): metrics.json "val": {} and
no word; now a warning naming the setting that gives a val split."""

from __future__ import annotations

import logging

from tests.segmentation.test_s52_coco_masks import _coco


def _load(tmp_path, caplog, src_extra: str):
    from pipeline.stages.segment_train import load_sets
    from tests.helpers.run import compose_config

    p = _coco(tmp_path, {})
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
