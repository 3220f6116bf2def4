"""``stage=all``'s precheck refuses the settings of its late stages before the first one
starts (audit: a typo in ``analysis.path_classes`` waited out evaluate, ``trainer.split_by``
a pair run, a text file given as ``paths.inputs.model`` simulate and segment_train).

The stages are stand-ins (their bodies record that they ran and write their artifacts)
with the real stages' inputs and ``validate`` hooks, so the refusal under test is the
precheck's, and "nothing ran" is a fact: no stand-in called, no stage folder made.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import guards, runner
from pipeline.runner import StageError
from tests.helpers.run import compose_config

KINDS = ["myeloblast", "myelocyte", "lymphocyte"]


def _paired(path: Path) -> None:
    import anndata as ad

    from segmentation.io import write_h5ad

    n = 12
    obs = pd.DataFrame(
        {
            "has_image": np.ones(n, bool),
            "has_expression": np.ones(n, bool),
            "label": [KINDS[i % 3] for i in range(n)],
            "lineage": ["neutrophil" if i % 3 < 2 else "lymphoid" for i in range(n)],
        },
        index=[f"c{i}" for i in range(n)],
    )
    write_h5ad(ad.AnnData(X=np.zeros((n, 2), np.float32), obs=obs), path)


def _latent(paired: Path, path: Path) -> None:
    import anndata as ad

    from segmentation.io import write_h5ad

    obs = ad.read_h5ad(paired).obs.copy()
    # no 'val' rows: analysis.split=val measures nothing
    obs["split"] = pd.Categorical(["train", "test"] * (len(obs) // 2))
    out = ad.AnnData(obs=obs)
    out.uns["maturation_axis"] = {"dim": 0, "classes": ["myeloblast", "myelocyte"]}
    write_h5ad(out, path)


def _made(name: str) -> list[str]:
    """What a stand-in of stage ``name`` writes: its first artifact (a text file, as
    tests/faults' stand-ins write), and train's two."""
    made = [a for a, (p, _) in runner.ARTIFACTS.items() if p == name]
    return made if name == "train" else made[:1]


def _body(ran: list[str]):
    """A stage stand-in: records its name, writes what its spec says it produces."""

    def body(ctx):
        ran.append(ctx.name)
        for art in runner.REGISTRY[ctx.name].produces:
            with ctx.atomic(art) as tmp:
                if art == "paired":
                    _paired(tmp)
                elif art == "latent":
                    _latent(ctx.input("paired"), tmp)
                elif art == "model":
                    torch.save({"model": {}, "model_args": {}}, tmp)
                else:
                    Path(tmp).write_text(art)

    return body


@pytest.fixture
def stages(monkeypatch):
    """``stages(real)`` -> the list the stand-ins append to: every stage of the chain a
    stand-in, those named in ``real`` with their real inputs and settings checks."""
    runner.load_stages()
    ran: list[str] = []

    def use(*real: str) -> list[str]:
        for name in runner.ORDER:
            body = _body(ran)
            spec = (
                dataclasses.replace(runner.DECLARED[name], fn=body)
                if name in real
                else runner.StageSpec(name=name, fn=body, produces=_made(name))
            )
            monkeypatch.setitem(runner.REGISTRY, name, spec)
        return ran

    return use


def _cfg(root: Path, *overrides: str):
    return compose_config(
        [
            "stage=all",
            f"paths.root={root}",
            "experiment=t",
            "hardware.torch_threads=1",
            "analysis.path_classes=[myeloblast,myelocyte]",
            "vae.maturation_classes=[myeloblast,myelocyte]",
            *overrides,
        ]
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A study every stage of whose chain is complete (stand-ins), made once."""
    mp = pytest.MonkeyPatch()
    try:
        runner.load_stages()
        ran: list[str] = []
        for name in runner.ORDER:
            spec = runner.StageSpec(name, _body(ran), produces=_made(name))
            mp.setitem(runner.REGISTRY, name, spec)
        root = tmp_path_factory.mktemp("finished") / "out"
        assert runner.main(_cfg(root)) == 0
        assert ran == runner.stages_for(_cfg(root))
    finally:
        mp.undo()
    return root


def _study(finished: Path, tmp_path: Path, *gone: str) -> Path:
    """A copy of the finished study without the folders of stages ``gone``."""
    root = tmp_path / "out"
    shutil.copytree(finished, root)
    for name in gone:
        shutil.rmtree(root / "t" / name)
    return root


def _refused(capsys, cfg, ran: list[str], stage: str, *said: str) -> str:
    assert runner.main(cfg) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1, err
    assert f"stage={stage} cannot run" in line[0] and "nothing was run" in line[0], err
    for s in said:
        assert s in line[0], err
    assert ran == [], f"stages ran before the refusal: {ran}"
    return line[0]


def _plan(cfg):
    names = guards.start_run(cfg, runner.stages_for(cfg))
    return names, guards.stage_plan(cfg, names)


def test_path_class_typo_refused_before_evaluate_runs(finished, tmp_path, stages, capsys):
    ran = stages("evaluate", "traverse")
    root = _study(finished, tmp_path, "evaluate", "traverse")
    cfg = _cfg(root, "resume=true", "analysis.path_classes=[myeloblst,myelocyte]")
    said = "analysis.path_classes: 'myeloblst' is not a label; did you mean 'myeloblast'?"
    _refused(capsys, cfg, ran, "traverse", said)
    assert not (root / "t" / "evaluate").exists()
    # the labels as spelled: the chain runs
    assert runner.main(_cfg(root, "resume=true")) == 0
    assert ran == ["evaluate", "traverse"]


def test_path_class_typo_read_from_paired_when_train_runs_again(finished, tmp_path, stages, capsys):
    """latent.h5ad is made again by the run's train: its labels are paired.h5ad's."""
    ran = stages("train", "evaluate", "traverse")
    root = _study(finished, tmp_path, "train", "evaluate", "traverse")
    cfg = _cfg(root, "resume=true", "analysis.path_classes=[myeloblast,myelocyt]")
    _refused(capsys, cfg, ran, "traverse", "did you mean 'myelocyte'?")
    assert not (root / "t" / "train").exists()
    from pipeline.precheck import precheck

    cfg = _cfg(root, "resume=true")  # the labels as spelled
    precheck(cfg, *_plan(cfg))
    # paired.h5ad made again too (this run's pair): its labels are not known yet
    shutil.rmtree(root / "t" / "pair")
    cfg = _cfg(root, "resume=true", "analysis.path_classes=[myeloblast,myelocyt]")
    precheck(cfg, *_plan(cfg))


def test_split_by_column_missing_from_paired_refused_before_train(
    finished, tmp_path, stages, capsys
):
    ran = stages("train", "evaluate", "traverse")
    root = _study(finished, tmp_path, "train", "evaluate", "traverse")
    err = _refused(
        capsys, _cfg(root, "resume=true", "trainer.split_by=nope"), ran, "train", "paired.h5ad"
    )
    assert "trainer.split_by='nope'" in err and "no such obs column" in err and "lineage" in err
    assert not (root / "t" / "train").exists()
    from pipeline.precheck import precheck

    cfg = _cfg(root, "resume=true", "trainer.split_by=lineage")  # a column: fine
    precheck(cfg, *_plan(cfg))
    # the default column may be absent (rows are split one by one)
    cfg = _cfg(root, "resume=true")
    precheck(cfg, *_plan(cfg))
    # paired.h5ad made again by this run's pair: its columns are not known yet
    shutil.rmtree(root / "t" / "pair")
    cfg = _cfg(root, "resume=true", "trainer.split_by=nope")
    names, plan = _plan(cfg)
    assert names[0] == "pair"
    precheck(cfg, names, plan)


def test_maturation_class_typo_refused_before_train(finished, tmp_path, stages, capsys):
    ran = stages("train", "evaluate", "traverse")
    root = _study(finished, tmp_path, "train", "evaluate", "traverse")
    cfg = _cfg(root, "resume=true", "vae.maturation_classes=[myeloblast,myelocyt]")
    _refused(capsys, cfg, ran, "train", "vae.maturation_classes: 'myelocyt' is not a label")
    from pipeline.precheck import precheck

    # the head off: the classes are read by nothing
    cfg = _cfg(
        root,
        "resume=true",
        "vae.maturation_classes=[myeloblast,myelocyt]",
        "vae.maturation_weight=0",
    )
    precheck(cfg, *_plan(cfg))


@pytest.mark.parametrize(
    "override,stage,said",
    [
        ("analysis.split=foo", "evaluate", "analysis.split='foo' is not an option: valid: train"),
        ("analysis.page_nearest=-1", "evaluate", "analysis.page_nearest=-1 is out of range"),
        ("analysis.path_classes=[band]", "traverse", "a path runs through two or more classes"),
        ("analysis.path_classes=[band,band]", "traverse", "two or more classes"),
    ],
)
def test_analysis_settings_refused_before_the_first_stage(
    tmp_path, stages, capsys, override, stage, said
):
    """Checked from the config alone: refused before simulate, in an empty study."""
    ran = stages("evaluate", "traverse")
    root = tmp_path / "out"
    _refused(capsys, _cfg(root, override), ran, stage, said)
    assert not (root / "t").exists() or not any((root / "t").iterdir())


def test_analysis_split_without_rows_refused_before_evaluate(finished, tmp_path, stages, capsys):
    ran = stages("evaluate", "traverse")
    root = _study(finished, tmp_path, "evaluate", "traverse")
    cfg = _cfg(root, "resume=true", "analysis.split=val")
    _refused(capsys, cfg, ran, "evaluate", "analysis.split='val': no rows of latent.h5ad")
    cfg = _cfg(root, "resume=true", "analysis.label_key=cell_type")
    _refused(capsys, cfg, ran, "evaluate", "obs['cell_type'] is missing (analysis.label_key)")


def test_stage_traverse_alone_refuses_a_one_class_path_before_its_folder(tmp_path, stages, capsys):
    ran = stages("traverse")
    root = tmp_path / "out"
    cfg = compose_config(
        ["stage=traverse", f"paths.root={root}", "experiment=t", "analysis.path_classes=[band]"]
    )
    assert runner.main(cfg) == 2
    assert "two or more classes" in capsys.readouterr().err
    assert ran == [] and not (root / "t" / "traverse").exists()


@pytest.mark.parametrize(
    "setting,stage", [("model", "evaluate"), ("segmentation_model", "segment")]
)
def test_a_given_checkpoint_that_is_not_one_is_refused_before_simulate(
    tmp_path, stages, capsys, setting, stage
):
    ran = stages("segment", "evaluate", "traverse")
    fake = tmp_path / "bad" / "fake_model.pt"
    fake.parent.mkdir()
    fake.write_text("not a model\n")
    root = tmp_path / "out"
    cfg = _cfg(root, "overwrite=true", f"paths.inputs.{setting}={fake}")
    _refused(capsys, cfg, ran, stage, f"paths.inputs.{setting})={fake}", "not a torch checkpoint")
    assert not (root / "t").exists() or not any((root / "t").iterdir())


def test_a_given_checkpoint_is_probed_without_reading_its_tensors(tmp_path, stages):
    from pipeline.precheck import precheck

    stages("evaluate", "traverse")
    good = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.zeros(4)}, "model_args": {}}, good)
    cfg = _cfg(tmp_path / "out", "overwrite=true", f"paths.inputs.model={good}")
    precheck(cfg, *_plan(cfg))
    # a checkpoint without the keys: the same message with or without the mapping
    other = tmp_path / "other.pt"
    torch.save({"state": {}}, other)
    said = []
    for cheap in (True, False):
        with pytest.raises(StageError) as e:
            guards.probe_inputs({"model": other}, cheap=cheap)
        said.append(str(e.value))
    assert said[0] == said[1] and "needs the keys 'model' and 'model_args'" in said[0]


def test_an_explicit_input_an_earlier_stage_writes_again_is_not_probed(tmp_path, stages):
    """paths.inputs.model inside train's folder, which this run's train writes first."""
    from pipeline.precheck import precheck

    stages("evaluate", "traverse")
    root = tmp_path / "out"
    inside = root / "t" / "train" / "model.pt"
    inside.parent.mkdir(parents=True)
    inside.write_text("an interrupted write\n")
    cfg = _cfg(root, "overwrite=true", f"paths.inputs.model={inside}")
    precheck(cfg, *_plan(cfg))
