"""``python -m pipeline --help`` and the choices Hydra lists (subprocess, as a user runs it)."""

from __future__ import annotations

import re

import pytest

from pipeline import runner
from pipeline.help import STAGES
from tests.helpers.run import run_pipeline


def test_help_without_stage_lists_stages_presets_and_knobs():
    r = run_pipeline(["--help"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "You must specify" not in out + r.stderr and "powered by Hydra" not in out
    # every stage in run order, numbered, with what it reads and writes
    pos = [out.index(f"{k}. {name} ") for k, name in enumerate(runner.ORDER, 1)]
    assert pos == sorted(pos)
    extra = len(runner.EXTRA_STAGES)  # listed after the stage=all order
    assert out.count("reads:") == len(runner.ORDER) + extra == out.count("writes:")
    assert "embed/query.h5ad" in out
    assert "+preset=demo" in out and "+preset=real" in out
    assert "vae.beta=" in out and "hardware.torch_threads=null" in out
    # Hydra's group listing (filled in for $APP_CONFIG_GROUPS) is there, without schema names
    assert "stage: all, embed, evaluate" in out
    assert "base_" not in out
    assert len(out.splitlines()) < 100  # a page, not the 300-line config


@pytest.mark.parametrize(
    "args",
    [["stage=train", "vae.beta=8", "-h"], ["vae.beta=8", "--help"], ["--help", "vae.beta=8"]],
)
def test_help_shows_current_values_of_overrides(args):
    r = run_pipeline(args, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    # the settings table shows the override (the Examples block prints "vae.beta=8" anyway)
    assert re.search(r"^ +vae\.beta=8\.0 +KL weight", r.stdout, re.M), r.stdout[-3000:]
    assert not re.search(r"^ +vae\.beta=(?!8\.0)", r.stdout, re.M)


def test_every_stage_is_described():
    assert list(STAGES) == runner.ORDER


def test_schema_name_as_stage_is_a_clear_error(tmp_path):
    r = run_pipeline(["stage=base_stage", f"paths.root={tmp_path}"], timeout=120)
    assert r.returncode != 0
    assert "Could not find 'stage/base_stage'" in r.stderr
    assert "Traceback" not in r.stderr
    listed = r.stderr.split("Available options in 'stage':", 1)[1].split("Config search path")[0]
    assert sorted(listed.split()) == sorted([*runner.ORDER, *runner.EXTRA_STAGES, "all"])
