"""stage=segment settings with no range check (audit s52 S1): min_solidity=2 and
max_area_ratio=-1 dropped every cell, touch_px=-1 and crop_size=4 ran; each is now
refused when the run starts, naming the setting and its range."""

from __future__ import annotations

import re

import pytest

from pipeline.ranges import SettingRangeError, check_ranges
from tests.helpers.run import compose_config


@pytest.mark.parametrize(
    ("setting", "must"),
    [
        ("segmentation.min_solidity=2", "must be in [0,1]"),
        ("segmentation.min_solidity=-0.1", "must be in [0,1]"),
        ("segmentation.touch_px=-1", "must be >= 0"),
        ("segmentation.max_area_ratio=-1", "must be > 0"),
        ("segmentation.max_area_ratio=0", "must be > 0"),
        ("segmentation.crop_size=4", "must be >= 8"),
    ],
)
def test_out_of_range_is_refused(setting, must):
    cfg = compose_config(["stage=segment", setting])
    key = setting.split("=")[0]
    with pytest.raises(SettingRangeError, match=rf"{key}=\S+ is out of range: {re.escape(must)}"):
        check_ranges(cfg)


@pytest.mark.parametrize(
    "setting",
    [
        "segmentation.min_solidity=null",
        "segmentation.touch_px=null",
        "segmentation.max_area_ratio=null",
        "segmentation.min_solidity=0.9",
        "segmentation.touch_px=0",
        "segmentation.crop_size=8",
    ],
)
def test_in_range_and_off_pass(setting):
    check_ranges(compose_config(["stage=segment", setting]))


def test_settings_from_config_agrees_on_crop_size():
    """settings_from_config (called without the start checks, e.g. by the API) let
    crop_size 1..7 through and said 'must be in [1, 4096]'; it now agrees with
    pipeline/ranges.py (>= 8)."""
    from pipeline.runner import StageError
    from pipeline.stages.segment import settings_from_config

    sc = compose_config(["stage=segment", "segmentation.crop_size=8"]).segmentation
    settings_from_config(sc)
    sc.crop_size = 4
    with pytest.raises(StageError, match=re.escape("crop_size=4: must be in [8, 4096]")):
        settings_from_config(sc)
