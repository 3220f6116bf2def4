"""Every YAML file under pipeline/conf/ composes with the structured schema (pipeline/config.py)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.helpers.run import CONF, compose_config

# group -> how a file of it is chosen on the command line
_OPTIONAL = {"preset"}  # not in the defaults list: added with +group=name
CONFIG_FILES = sorted(
    (p.parent.name, p.stem) for p in CONF.glob("*/*.yaml") if p.parent.name != "hydra"
)


def test_every_group_is_listed():
    groups = {g for g, _ in CONFIG_FILES}
    assert {"stage", "data", "segmentation", "vae", "analysis", "pair"} <= groups


@pytest.mark.parametrize(("group", "name"), CONFIG_FILES, ids=[f"{g}/{n}" for g, n in CONFIG_FILES])
def test_config_file_composes(group, name):
    choice = f"+{group}={name}" if group in _OPTIONAL else f"{group}={name}"
    overrides = [choice] if group == "stage" else ["stage=all", choice]
    cfg = compose_config(overrides)
    # every interpolation resolves and every value fits its schema type
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    if group == "stage":
        assert cfg.stage.name == name


def test_every_stage_input_can_be_given_by_path():
    """paths.inputs has a setting for every artifact a stage reads (needed or optional):
    `paths.inputs.evaluation=` was refused by Hydra and `+paths.inputs.evaluation=` by
    the typo check, so traverse could not be pointed at another evaluate run."""
    import dataclasses

    from pipeline.config import InputsConfig
    from pipeline.runner import REGISTRY, load_stages

    load_stages()
    cfg = compose_config(["stage=all"])
    read = set()
    for spec in REGISTRY.values():
        read |= set(spec.needs_for(cfg)) | set(spec.optional_for(cfg))
    assert read <= {f.name for f in dataclasses.fields(InputsConfig)}


def test_library_cuts_cells_as_the_config_does():
    """vae.api.Study.read without settings (the library's SegmentSettings) and stage=embed
    (cfg.segmentation) cut the same cells: a review found the rim trim (1 vs 0 working
    px) and min_area (200 vs 0) differing, so the API and the stage disagreed on a smear."""
    import dataclasses

    from pipeline.config import SegmentationConfig
    from pipeline.stages.segment import settings_from_config
    from segmentation.cells import SegmentSettings

    cfg = settings_from_config(OmegaConf.structured(SegmentationConfig))
    lib = SegmentSettings()
    assert dataclasses.asdict(cfg.filters) == dataclasses.asdict(lib.filters)
    for f in ("trim_rim", "crop_size", "crop_margin", "background_value", "merge_iou"):
        assert getattr(cfg, f) == getattr(lib, f), f


def test_shared_data_follows_the_environment(monkeypatch, tmp_path):
    """paths.shared_data: $WBC_SHARED_DATA where set (an installed copy run from another
    folder), else ../shared/data; an override still wins."""
    monkeypatch.delenv("WBC_SHARED_DATA", raising=False)
    assert compose_config(["stage=simulate"]).paths.shared_data == "../shared/data"
    monkeypatch.setenv("WBC_SHARED_DATA", str(tmp_path))
    assert compose_config(["stage=simulate"]).paths.shared_data == str(tmp_path)
    cfg = compose_config(["stage=simulate", "paths.shared_data=/elsewhere"])
    assert cfg.paths.shared_data == "/elsewhere"
