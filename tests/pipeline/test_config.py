"""Every YAML file under conf/ composes with the structured schema (pipeline/config.py)."""

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
