"""Shared pieces of the fault tests: toy stages registered in place of real ones,
and a crafted checkpoint whose pickle would run a shell command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline import runner
from tests.helpers.run import compose_config


class _RunsCode:
    """Unpickling this calls ``os.system(cmd)``: what a hostile checkpoint does."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def write_hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A ``.pt`` with the keys a real checkpoint has, whose pickle writes ``marker``."""
    payload = {"model": _RunsCode(f"touch {marker}"), "model_args": {"arch": "resnet18_fpn"}}
    torch.save(payload, path)
    return path


def cfg_for(root: Path, stage: str = "evaluate", *overrides: str):
    """The composed config of ``stage`` with outputs under ``root``."""
    runner.load_stages()
    return compose_config(
        [
            f"stage={stage}",
            f"paths.root={root}",
            "experiment=t",
            "hardware.torch_threads=1",
            *overrides,
        ]
    )


def register_toy(monkeypatch, name: str, body) -> None:
    """Replace stage ``name`` by ``body`` (writes the stage's first artifact)."""
    runner.load_stages()  # import the real stages first, so none replaces the toy later
    produces = [a for a, (prod, _) in runner.ARTIFACTS.items() if prod == name][:1]
    spec = runner.StageSpec(name=name, fn=body, produces=produces)
    monkeypatch.setitem(runner.REGISTRY, name, spec)


def writes(text: str):
    """A toy stage body writing ``text`` into its first artifact."""

    def body(ctx):
        art = [a for a, (prod, _) in runner.ARTIFACTS.items() if prod == ctx.name][0]
        with ctx.atomic(art) as tmp:
            tmp.write_text(text)

    return body


@pytest.fixture
def toy(monkeypatch):
    """``toy(name, body)``: register a toy stage for this test."""
    return lambda name, body: register_toy(monkeypatch, name, body)
