"""What an interrupt / re-run audit found (2026-12-05): stage=all resume=true after an
interrupted overwrite, continuing an interrupted overwrite, stages reading folders that
are being rewritten, the dead attempt of a stage without checkpoints."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from pipeline import guards, runner
from pipeline.locks import StageBusyError, producer_lock, stage_lock
from tests.faults.conftest import cfg_for, writes

CHAIN = ["simulate", "evaluate", "traverse"]  # smears -> metrics.json -> report.html
NEEDS = {"simulate": [], "evaluate": ["smears"], "traverse": ["evaluation"]}


def _status(d: Path) -> str:
    return json.loads((d / "manifest.json").read_text())["status"]


def _chain(monkeypatch, text: dict[str, str], seen: dict | None = None) -> None:
    """Toy stages of CHAIN: each writes its first artifact (``text[name]``) and, when
    ``seen`` is given, records what it read of its input."""
    runner.load_stages()

    def body_for(name):
        def body(ctx):
            if seen is not None and NEEDS[name]:
                seen[name] = ctx.input(NEEDS[name][0]).read_text()
            art = [a for a, (prod, _) in runner.ARTIFACTS.items() if prod == name][0]
            with ctx.atomic(art) as tmp:
                tmp.write_text(text[name])

        return body

    for name in CHAIN:
        produces = [a for a, (prod, _) in runner.ARTIFACTS.items() if prod == name][:1]
        spec = runner.StageSpec(name=name, fn=body_for(name), needs=NEEDS[name], produces=produces)
        monkeypatch.setitem(runner.REGISTRY, name, spec)
    real = runner.stages_for
    monkeypatch.setattr(
        runner, "stages_for", lambda cfg: list(CHAIN) if cfg.stage.name == "all" else real(cfg)
    )


def test_stage_all_resume_reruns_the_stages_whose_inputs_changed(tmp_path, monkeypatch):
    """An interrupted ``stage=all overwrite=true`` re-made simulate's smears and stopped:
    resume=true called the old later stages complete ("nothing to resume")."""
    seen: dict[str, str] = {}
    _chain(monkeypatch, {"simulate": "smears v1", "evaluate": "m", "traverse": "r"}, seen)
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "all")) == 0
    # the interrupted overwrite: simulate re-made (another size), nothing after it
    _chain(monkeypatch, {"simulate": "smears v2, longer", "evaluate": "m", "traverse": "r"}, seen)
    assert runner.main(cfg_for(root, "simulate", "overwrite=true")) == 0
    cfg = cfg_for(root, "all", "resume=true")
    names = guards.start_run(cfg, CHAIN)
    assert names == ["evaluate", "traverse"]
    plan = guards.stage_plan(cfg, names)
    assert [(c.overwrite, c.resume) for _, c in plan] == [(True, False), (True, False)]
    assert runner.main(cfg) == 0  # was refused: traverse "holds a complete run"
    assert seen["evaluate"] == "smears v2, longer"
    man = json.loads((root / "t" / "evaluate" / "manifest.json").read_text())
    assert not guards.changed_inputs(man)
    # everything current now: nothing to run
    assert guards.start_run(cfg_for(root, "all", "resume=true"), CHAIN) == []


def test_stage_all_resume_continues_the_first_unfinished_stage(tmp_path, monkeypatch):
    _chain(monkeypatch, {"simulate": "s", "evaluate": "m", "traverse": "r"})
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "all")) == 0
    man_path = root / "t" / "evaluate" / "manifest.json"
    man = json.loads(man_path.read_text())
    man["status"] = "running"  # killed
    man_path.write_text(json.dumps(man))
    cfg = cfg_for(root, "all", "resume=true")
    names = guards.start_run(cfg, CHAIN)
    plan = guards.stage_plan(cfg, names)
    assert [n for n, _ in plan] == ["evaluate", "traverse"]
    assert plan[0][1] is cfg and plan[1][1].overwrite


def _kill_an_overwrite(d: Path, attempt: str) -> Path:
    """What SIGKILL leaves of ``train overwrite=true``: the complete result as a backup,
    the attempt (status running, its last.pt) in the folder."""
    backup = d.with_name(f".{d.name}.old-{uuid.uuid4().hex[:6]}")
    d.rename(backup)
    d.mkdir()
    man = json.loads((backup / "manifest.json").read_text())
    man["status"] = "running"
    (d / "manifest.json").write_text(json.dumps(man))
    (d / "last.pt").write_text(attempt)
    return backup


def test_resume_continues_an_interrupted_overwrite_not_the_old_result(tmp_path, toy):
    """resume=true after a killed ``overwrite=true`` put the old complete result back
    and continued (or refused) that, not the attempt the user interrupted."""
    root = tmp_path / "out"
    d = root / "t" / "train"

    def first(ctx):
        (ctx.dir / "last.pt").write_text("old run")
        (ctx.dir / "model.pt").write_text("old model")

    toy("train", first)
    assert runner.main(cfg_for(root, "train")) == 0
    backup = _kill_an_overwrite(d, "attempt at epoch 11")
    read = {}

    def cont(ctx):
        read["last"] = (ctx.dir / "last.pt").read_text()
        (ctx.dir / "model.pt").write_text("continued model")

    toy("train", cont)
    assert runner.main(cfg_for(root, "train", "resume=true")) == 0
    assert read["last"] == "attempt at epoch 11"
    assert _status(d) == "complete" and (d / "model.pt").read_text() == "continued model"
    assert not backup.exists()  # the continuation succeeded: the old result goes
    # the same, failing: the old complete result comes back
    backup = _kill_an_overwrite(d, "attempt 2")

    def crash(ctx):
        raise RuntimeError("continuation crashed")

    toy("train", crash)
    assert runner.main(cfg_for(root, "train", "resume=true")) == 1
    assert _status(d) == "complete" and (d / "model.pt").read_text() == "continued model"
    assert not backup.exists() and len(list(d.parent.glob("train.failed-*"))) == 1


def test_resume_of_a_killed_stage_without_checkpoints_starts_in_a_clean_folder(
    tmp_path, toy, capsys
):
    root = tmp_path / "out"
    d = root / "t" / "expression"

    def killed(ctx):
        (ctx.dir / ".expression.tmp-d4abbc5a").write_text("half-written")
        raise KeyboardInterrupt

    toy("expression", killed)
    assert runner.main(cfg_for(root, "expression")) == 130
    man = json.loads((d / "manifest.json").read_text())
    man["status"] = "running"  # as SIGKILL leaves it (Ctrl-C marks it failed)
    (d / "manifest.json").write_text(json.dumps(man))

    toy("expression", writes("ok"))
    assert runner.main(cfg_for(root, "expression", "resume=true")) == 0
    assert not list(d.glob(".*.tmp-*"))  # the dead attempt's temporary files are gone
    kept = list(d.parent.glob("expression.interrupted-*"))
    assert len(kept) == 1 and (kept[0] / ".expression.tmp-d4abbc5a").exists()
    # what preparing the folder said is in the stage's log too (it was console only)
    assert "keeps no checkpoint" in (d / "expression.log").read_text()


def test_a_folder_being_read_is_not_rewritten_and_one_being_written_is_not_read(
    tmp_path, monkeypatch, capsys
):
    _chain(monkeypatch, {"simulate": "s", "evaluate": "m", "traverse": "r"})
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "all")) == 0
    run = root / "t"
    smears = run / "simulate" / "smears"
    lock = producer_lock(smears)
    assert lock is not None and lock.path == stage_lock(run, "simulate", "", "t").path
    # a running stage=segment (here: this test) reads the smears
    reader = producer_lock(smears).acquire_shared("input 'smears'")
    try:
        assert runner.main(cfg_for(root, "simulate", "overwrite=true")) == 2
        assert "a running stage is reading its outputs" in capsys.readouterr().err
        assert _status(run / "simulate") == "complete"
    finally:
        reader.release()
    # a running stage=simulate (this test) rewrites them: evaluate refuses to read
    writer = stage_lock(run, "simulate", "", "t").acquire()
    try:
        assert runner.main(cfg_for(root, "evaluate", "overwrite=true")) == 2
        err = capsys.readouterr().err
        assert "input 'smears'" in err and "is being written" in err
    finally:
        writer.release()
    assert runner.main(cfg_for(root, "evaluate", "overwrite=true")) == 0
    with pytest.raises(StageBusyError):  # two readers share; a writer is refused
        a = producer_lock(smears).acquire_shared("x")
        b = producer_lock(smears).acquire_shared("y")
        try:
            stage_lock(run, "simulate", "", "t").acquire()
        finally:
            a.release()
            b.release()


def test_an_unfinished_optional_input_is_said_not_taken_for_not_run(tmp_path, monkeypatch, caplog):
    """traverse read a killed evaluate's metrics as "evaluate had not run", silently."""
    import logging

    _chain(monkeypatch, {"simulate": "s", "evaluate": "m", "traverse": "r"})
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "all")) == 0
    man_path = root / "t" / "evaluate" / "manifest.json"
    man = json.loads(man_path.read_text())
    man["status"] = "running"
    man_path.write_text(json.dumps(man))
    ctx = runner.StageContext(
        cfg=cfg_for(root, "traverse"), name="traverse", dir=tmp_path, inputs={}
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not ctx.has_input("evaluation")
        assert not ctx.has_input("cells")  # missing: nothing to say
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "optional input 'evaluation' is not used" in said[0]
    assert "unfinished run of stage=evaluate" in said[0]


def test_resume_after_a_killed_overwrite_of_a_stage_without_checkpoints(tmp_path, monkeypatch):
    """A review: the old result was put back and then refused as "complete, no
    checkpoint"; and stage=all resume=true refused when only its last stage was stale."""
    _chain(monkeypatch, {"simulate": "s", "evaluate": "m", "traverse": "r"})
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "all")) == 0
    backup = _kill_an_overwrite(root / "t" / "evaluate", "half")
    assert runner.main(cfg_for(root, "all", "resume=true")) == 0
    assert _status(root / "t" / "evaluate") == "complete" and not backup.exists()
    assert len(list((root / "t").glob("evaluate.interrupted-*"))) == 1
    # only the last stage stale
    _chain(monkeypatch, {"simulate": "s", "evaluate": "metrics, longer", "traverse": "r"})
    assert runner.main(cfg_for(root, "evaluate", "overwrite=true")) == 0
    cfg = cfg_for(root, "all", "resume=true")
    assert guards.start_run(cfg, CHAIN) == ["traverse"]
    assert runner.main(cfg) == 0
    man = json.loads((root / "t" / "traverse" / "manifest.json").read_text())
    assert not guards.changed_inputs(man)


def test_a_call_named_neutrophils_keeps_its_count():
    import pandas as pd

    from vae.analysis.samples import sample_profile

    obs = pd.DataFrame(
        {
            "vae_sample": "a",
            "vae_call": ["band", "band", "neutrophils", "neutrophils", "neutrophils", "x"],
            "vae_maturation": 0.5,
        }
    )
    prof = sample_profile(obs).set_index("sample")
    assert prof.loc["a", "n_neutrophils"] == 3 and prof.loc["a", "it_denominator"] == 5
    assert prof.loc["a", "left_shift_index"] == pytest.approx(2 / 5)


def test_variant_folders_have_their_own_locks(tmp_path, monkeypatch, capsys):
    """A variant run (``variant=v1``) writes ``<stage>/v1``: its readers and writers lock
    that folder, not the stage's default one, so two variants run side by side while a
    rewrite of one variant is refused while a stage reads it."""
    _chain(monkeypatch, {"simulate": "s", "evaluate": "m", "traverse": "r"})
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "simulate")) == 0
    assert runner.main(cfg_for(root, "simulate", "variant=v1")) == 0
    run = root / "t"
    base = producer_lock(run / "simulate" / "smears")
    v1 = producer_lock(run / "simulate" / "v1" / "smears")
    assert base.path == stage_lock(run, "simulate", "", "t").path
    assert v1.path == stage_lock(run, "simulate", "v1", "t").path != base.path
    writer = stage_lock(run, "simulate", "v1", "t").acquire()
    try:
        # evaluate variant=v1 reads simulate/v1 (being rewritten): refused, naming it
        assert runner.main(cfg_for(root, "evaluate", "variant=v1")) == 2
        err = capsys.readouterr().err
        assert "input 'smears'" in err and "is being written" in err
        # the default variant's evaluate reads simulate/smears: not held, it runs
        assert runner.main(cfg_for(root, "evaluate")) == 0
    finally:
        writer.release()
    reader = v1.acquire_shared("input 'smears'")
    try:  # a reader of v1 blocks a rewrite of v1, and one of the default folder, which
        # holds simulate/v1 and would move it aside under the reader
        assert runner.main(cfg_for(root, "simulate", "variant=v1", "overwrite=true")) == 2
        assert "a running stage is reading its outputs" in capsys.readouterr().err
        assert runner.main(cfg_for(root, "simulate", "overwrite=true")) == 2
        assert "that a running stage is reading" in capsys.readouterr().err
        assert (run / "simulate" / "v1" / "smears").read_text() == "s"
    finally:
        reader.release()
    assert runner.main(cfg_for(root, "simulate", "overwrite=true")) == 0
    assert (run / "simulate" / "v1" / "smears").read_text() == "s"  # kept in place
    assert runner.main(cfg_for(root, "evaluate", "variant=v1")) == 0
    assert (run / "evaluate" / "v1" / "manifest.json").is_file()


def _trained(ctx):
    """A toy stage=train: the earlier complete run (its last.pt, model and latent)."""
    for f, text in (("last.pt", "earlier run"), ("model.pt", "m"), ("latent.h5ad", "l")):
        (ctx.dir / f).write_text(text)


def _ctrl_c_after_a_checkpoint(ctx):
    (ctx.dir / "last.pt").write_text("attempt")
    raise KeyboardInterrupt


def _reads_last(read: dict):
    def body(ctx):
        read["last"] = (ctx.dir / "last.pt").read_text()
        (ctx.dir / "model.pt").write_text("continued")

    return body


def _ctrl_c_after_a_complete_run(root, toy, capsys, flag: str):
    """A complete toy train run, then a Ctrl-C of ``flag`` (overwrite=true / resume=true)
    after its first last.pt: exit 130, the earlier run back and complete. Returns the
    stage folder, the attempt's train.failed-* folder and the one-line stderr."""
    d = root / "t" / "train"
    toy("train", _trained)
    assert runner.main(cfg_for(root, "train")) == 0
    capsys.readouterr()
    toy("train", _ctrl_c_after_a_checkpoint)
    assert runner.main(cfg_for(root, "train", flag)) == 130
    err = capsys.readouterr().err
    (failed,) = d.parent.glob("train.failed-*")
    assert (d / "last.pt").read_text() == "earlier run" and _status(d) == "complete"
    return d, failed, err


def test_ctrl_c_of_an_overwrite_says_resume_continues_the_earlier_run(tmp_path, toy, capsys):
    """Ctrl-C of ``stage=train overwrite=true`` put the earlier run back and moved the
    attempt (its own last.pt) to train.failed-*, then advised resume=true, which
    continues the earlier run, never the interrupted attempt (an audit)."""
    root = tmp_path / "out"
    d, failed, err = _ctrl_c_after_a_complete_run(root, toy, capsys, "overwrite=true")
    assert (failed / "last.pt").read_text() == "attempt"
    assert err.count("\n") == 1 and "interrupted during stage=train: " in err
    assert f"the earlier complete result is back in {d}, unchanged" in err
    assert f"the attempt of this overwrite=true run is kept in {failed}" in err
    assert "resume=true` would continue that earlier run from its last.pt, not the " in err
    assert "overwrite=true` starts the new run over from the beginning" in err
    # which is what happens: resume=true continues the earlier run
    read: dict = {}
    toy("train", _reads_last(read))
    assert runner.main(cfg_for(root, "train", "resume=true")) == 0
    assert read["last"] == "earlier run"


def test_ctrl_c_of_a_resume_says_the_complete_run_is_back(tmp_path, toy, capsys):
    d, failed, err = _ctrl_c_after_a_complete_run(tmp_path / "out", toy, capsys, "resume=true")
    assert f"(resume=true): the complete run in {d} is back as it was before this resume" in err
    assert f"what this attempt added is kept in {failed} and is not continued" in err
    assert "resume=true` continues the complete run again from its last.pt" in err


@pytest.mark.parametrize("checkpoint", [True, False])
def test_ctrl_c_of_a_first_run_says_how_to_go_on(tmp_path, toy, capsys, checkpoint):
    """No earlier result: the folder is marked failed; resume=true continues it when it
    wrote its last.pt, a plain re-run starts afresh when it did not."""
    root = tmp_path / "out"
    d = root / "t" / "train"

    def body(ctx):
        if checkpoint:
            (ctx.dir / "last.pt").write_text("attempt")
        raise KeyboardInterrupt

    toy("train", body)
    assert runner.main(cfg_for(root, "train")) == 130
    err = capsys.readouterr().err
    assert _status(d) == "failed"
    read: dict = {}
    toy("train", _reads_last(read) if checkpoint else _trained)
    if checkpoint:
        assert f"{d} is marked failed and keeps its last.pt: `python -m pipeline " in err
        assert "resume=true` continues it from there" in err
        assert runner.main(cfg_for(root, "train", "resume=true")) == 0
        assert read["last"] == "attempt"
    else:
        assert f"{d} is marked failed before it wrote its first last.pt" in err
        assert "` runs it again from the start" in err and "resume=true" not in err
        assert runner.main(cfg_for(root, "train")) == 0
    assert _status(d) == "complete"


def _kill_a_resume(d: Path) -> Path:
    """What SIGKILL leaves of ``train resume=true`` on a complete run: the complete
    result copied to a backup, the folder continued in place (status running, the
    resume recorded in its manifest, last.pt advanced)."""
    import shutil

    backup = d.with_name(f".{d.name}.old-{uuid.uuid4().hex[:6]}")
    shutil.copytree(d, backup)
    man = json.loads((d / "manifest.json").read_text())
    man["status"] = "running"
    man["config"]["resume"] = True
    (d / "manifest.json").write_text(json.dumps(man))
    (d / "last.pt").write_text("advanced")
    return backup


def test_after_a_killed_resume_the_advice_keeps_the_complete_result(tmp_path, toy, caplog, capsys):
    """A killed resume: stage=evaluate advised `stage=train overwrite=true`, which would
    replace the complete result kept in .train.old-*, and the backup warning called the
    killed run an overwrite=true one. A plain run of the stage puts the result back."""
    import logging

    root = tmp_path / "out"
    d = root / "t" / "train"
    toy("train", _trained)
    assert runner.main(cfg_for(root, "train")) == 0
    backup = _kill_a_resume(d)
    with pytest.raises(runner.StageInputError) as e:
        runner.resolve_input(cfg_for(root, "evaluate"), "latent")
    said = str(e.value)
    assert "latent.h5ad comes from an unfinished run of stage=train (status: running)" in said
    assert f"resume=true run, and the complete result it started from is kept in {backup}" in said
    assert "paths.root=" in said and "to put that result back" in said
    assert "resume=true` finishes the interrupted run instead" in said
    assert "overwrite=true" not in said
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        guards.start_run(cfg_for(root, "evaluate"), ["evaluate"])
    (line,) = [r.getMessage() for r in caplog.records if str(backup) in r.getMessage()]
    assert "left by an interrupted resume=true run" in line and "overwrite=true" not in line
    assert "a run of that stage without resume=true puts it back" in line
    # the plain run it advises: the result back, nothing run, and it says so
    capsys.readouterr()
    assert runner.main(cfg_for(root, "train")) == 2
    err = capsys.readouterr().err
    assert f"put the complete result back in {d} from {backup.name}" in err
    assert "left by an interrupted resume=true run" in err and "Nothing was run" in err
    assert _status(d) == "complete" and (d / "last.pt").read_text() == "earlier run"
    (kept,) = d.parent.glob("train.interrupted-*")
    assert (kept / "last.pt").read_text() == "advanced"
    assert runner.resolve_input(cfg_for(root, "evaluate"), "latent") == d / "latent.h5ad"


def test_a_ctrl_c_a_library_swallowed_stops_stage_train_at_the_next_step(
    tmp_path, monkeypatch, capsys
):
    """The KeyboardInterrupt of a Ctrl-C landed in a weakref callback ("Exception ignored
    in ... WeakKeyDictionary"): the handler noted it, nothing raised it, and stage=train
    ran to the end with exit 0. Now the next training step stops: exit 130, the advice
    line, the folder marked failed."""
    import vae.train as vt
    from tests.helpers.vae_toy import TINY_TRAIN, make_paired

    make_paired(24).write_h5ad(tmp_path / "paired.h5ad")
    real = vt.forward_loss
    steps = {"n": 0}

    def step(*a, **kw):
        if torch.is_grad_enabled():
            steps["n"] += 1
            if steps["n"] == 1:  # the handler ran, its KeyboardInterrupt swallowed
                monkeypatch.setattr(runner, "_INTERRUPTED", True)
        return real(*a, **kw)

    monkeypatch.setattr(vt, "forward_loss", step)
    root = tmp_path / "out"
    cfg = cfg_for(
        root,
        "train",
        f"paths.inputs.paired={tmp_path / 'paired.h5ad'}",
        *TINY_TRAIN,
        "trainer.max_epochs=20",
        "trainer.batch_size=4",
    )
    assert runner.main(cfg) == 130
    assert steps["n"] == 1  # the step under way ended, no other began
    d = root / "t" / "train"
    assert _status(d) == "failed" and not (d / "model.pt").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted during stage=train: " in err
