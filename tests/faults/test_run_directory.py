"""Issue 11.2, 11.3, 11.5: names that leave the run directory, the stage lock, and the
backup a killed ``overwrite=true`` run leaves behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline import runner
from pipeline.locks import stage_lock
from pipeline.names import BadNameError, check_argv, check_run_name
from tests.faults.conftest import cfg_for, writes
from tests.helpers.run import run_pipeline


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


@pytest.mark.parametrize(
    "value", ["../x", "../../tmp/x", "/abs/path", "a/../../b", ".", "a//b", ".hidden", "~/x", "x y"]
)
def test_bad_names_are_refused(value):
    with pytest.raises(BadNameError, match="not allowed"):
        check_run_name(value, "experiment")
    msg = check_argv([f"experiment={value}"])
    assert msg is not None and "experiment" in msg and "not allowed" in msg
    # a plain name on the same command line is not blamed; the bad one is found after it
    assert check_argv(["stage=train", "variant=ok", f"experiment={value}"]) == msg
    assert check_argv(["stage=train", "experiment=fine"]) is None


@pytest.mark.parametrize("value", ["demo", "study1/beta4", "vae.beta=4,trainer.lr=0.1", "0"])
def test_plain_names_pass(value):
    assert check_run_name(value, "variant") == value


def test_cli_escaping_experiment_writes_nothing(tmp_path):
    """Checked before Hydra starts: not even Hydra's .hydra folder appears."""
    root = tmp_path / "sandbox" / "out"
    root.mkdir(parents=True)
    before = _files(tmp_path)
    p = run_pipeline(["stage=evaluate", f"paths.root={root}", "experiment=../../escaped"])
    assert p.returncode == 2
    assert "experiment='../../escaped' is not allowed" in p.stderr
    assert "Traceback" not in p.stderr
    assert _files(tmp_path) == before


@pytest.mark.parametrize("key,value", [("experiment", "/abs/x"), ("variant", "../expression")])
def test_runner_refuses_names_from_any_source(tmp_path, toy, capsys, key, value):
    """A name set in a preset or in code (not on the command line) is refused too."""
    toy("expression", writes("expression"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "expression")) == 0
    sibling = (root / "t" / "expression" / "expression.h5ad").read_text()
    cfg = cfg_for(root, "evaluate", "overwrite=true")
    cfg[key] = value
    assert runner.main(cfg) == 2
    assert f"{key}='{value}' is not allowed" in capsys.readouterr().err
    assert (root / "t" / "expression" / "expression.h5ad").read_text() == sibling
    assert not (root / "t" / "evaluate").exists()


def test_second_run_of_a_running_stage_fails_fast(tmp_path, toy, capsys):
    """While stage=evaluate runs, a second run of it is refused with the holder's pid."""
    root = tmp_path / "out"
    seen = {}

    def body(ctx):
        seen["code"] = runner.main(cfg_for(root, "evaluate", "overwrite=true"))
        seen["err"] = capsys.readouterr().err
        writes("first")(ctx)

    toy("evaluate", body)
    assert runner.main(cfg_for(root, "evaluate")) == 0
    assert seen["code"] == 2
    assert f"stage=evaluate of experiment t is running (pid {os.getpid()})" in seen["err"]
    # the first run finished undisturbed
    d = root / "t" / "evaluate"
    assert (d / "metrics.json").read_text() == "first"
    assert json.loads((d / "manifest.json").read_text())["status"] == "complete"


def test_lock_held_by_another_process_is_refused(tmp_path, toy, capsys):
    import subprocess
    import sys

    root = tmp_path / "out"
    lock = stage_lock(root / "t", "evaluate", "", "t").path
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,os,sys,time;fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT);"
            "fcntl.flock(fd,fcntl.LOCK_EX);os.pwrite(fd,str(os.getpid()).encode(),0);"
            "print('locked',flush=True);time.sleep(60)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        toy("evaluate", writes("x"))
        assert runner.main(cfg_for(root, "evaluate")) == 2
        assert f"is running (pid {holder.pid})" in capsys.readouterr().err
        assert not (root / "t" / "evaluate").exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the lock with the process: the stage runs now
    assert runner.main(cfg_for(root, "evaluate")) == 0


def _kill_during_overwrite(root: Path) -> tuple[Path, Path]:
    """What a SIGKILL during ``overwrite=true`` leaves: the complete result moved to
    ``.evaluate.old-*`` and a half-written new folder (status: running)."""
    d = root / "t" / "evaluate"
    backup = d.with_name(".evaluate.old-abc123")
    d.rename(backup)
    d.mkdir()
    (d / "metrics.json").write_text("partial")
    (d / "manifest.json").write_text(json.dumps({"stage": "evaluate", "status": "running"}))
    return d, backup


def test_killed_overwrite_is_restored_by_the_next_run(tmp_path, toy, capsys):
    toy("evaluate", writes("good"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "evaluate")) == 0
    d, backup = _kill_during_overwrite(root)
    # the next plain run restores the complete result, then runs nothing, and says so
    assert runner.main(cfg_for(root, "evaluate")) == 2
    err = capsys.readouterr().err
    assert f"put the complete result back in {d} from .evaluate.old-abc123" in err
    assert "Nothing was run" in err and "evaluate.interrupted-" in err
    assert (d / "metrics.json").read_text() == "good"
    assert not backup.exists()
    kept = list(d.parent.glob("evaluate.interrupted-*"))
    assert len(kept) == 1 and (kept[0] / "metrics.json").read_text() == "partial"


def test_backup_is_reported_by_a_run_of_another_stage(tmp_path, toy, caplog):
    toy("evaluate", writes("good"))
    toy("traverse", writes("report"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "evaluate")) == 0
    _, backup = _kill_during_overwrite(root)
    with caplog.at_level("WARNING"):
        assert runner.main(cfg_for(root, "traverse")) == 0
    assert str(backup) in caplog.text


def test_interrupted_first_run_says_so(tmp_path, toy, capsys):
    """status=running with nobody holding the lock: the message says it was interrupted."""
    toy("evaluate", writes("x"))
    d = tmp_path / "out" / "t" / "evaluate"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"stage": "evaluate", "status": "running"}))
    assert runner.main(cfg_for(tmp_path / "out", "evaluate")) == 2
    assert "interrupted: no process holds its lock" in capsys.readouterr().err


def test_backup_of_a_running_overwrite_is_not_reported(tmp_path, toy, caplog):
    """While an overwrite=true run holds the lock, its backup is not a leftover."""
    toy("evaluate", writes("good"))
    toy("traverse", writes("report"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "evaluate")) == 0
    _, backup = _kill_during_overwrite(root)
    with stage_lock(root / "t", "evaluate", "", "t"), caplog.at_level("WARNING"):
        assert runner.main(cfg_for(root, "traverse")) == 0
    assert str(backup) not in caplog.text


def test_settings_error_leaves_no_hydra_folder(tmp_path):
    """A mistyped setting stops the run before any stage: Hydra's run folder (and an
    experiment folder holding nothing else) is removed; a sibling experiment is not."""
    root = tmp_path / "out"
    (root / "kept" / "expression").mkdir(parents=True)
    p = run_pipeline(["stage=train", f"paths.root={root}", "experiment=typo", "vae.beta=-3"])
    assert p.returncode == 2
    assert "vae.beta=-3.0 is out of range" in p.stderr
    assert "Traceback" not in p.stderr
    assert sorted(x.name for x in root.iterdir()) == ["kept"]
    # an experiment that holds a stage keeps it; only the new .hydra run folder goes
    p = run_pipeline(["stage=train", f"paths.root={root}", "experiment=kept", "vae.beta=-3"])
    assert p.returncode == 2
    assert sorted(x.name for x in (root / "kept").iterdir()) == ["expression"]


@pytest.mark.parametrize(
    "args",
    [
        ["stage=train", "vae.fusion=bogus"],
        ["stage=train"],  # its input (stage=pair's paired.h5ad) is missing
        ["stage=expression", "expression.input_file=/no/such/x.csv"],
        ["-m", "stage=train", "vae.beta=-1,-2"],  # a sweep whose first job is refused
    ],
)
def test_refused_run_leaves_no_paths_root(tmp_path, args):
    """Was: the refused run removed Hydra's run folder but left the paths.root (and the
    folders above it) that Hydra had made for it, empty."""
    root = tmp_path / "new" / "out"
    p = run_pipeline([*args, f"paths.root={root}"])
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ")
    assert sorted(tmp_path.iterdir()) == []


def test_refused_run_keeps_the_folders_it_found(tmp_path):
    """Only what the refused run made goes: an empty paths.root, experiment or .hydra
    folder that was there before stays."""
    root = tmp_path / "out"
    (root / "e" / ".hydra").mkdir(parents=True)
    (root / "empty").mkdir()
    before = _files(tmp_path)
    for exp in ("e", "empty", "fresh"):
        p = run_pipeline(["stage=train", f"paths.root={root}", f"experiment={exp}", "vae.beta=-3"])
        assert p.returncode == 2 and "vae.beta=-3.0 is out of range" in p.stderr
        assert _files(tmp_path) == before


def test_hydra_run_dir_never_leaves_paths_root():
    """A bad name that reaches Hydra (not from argv) puts .hydra/ under paths.root."""
    from omegaconf import OmegaConf

    from tests.helpers.run import CONF

    run_dir = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))["hydra"]["run"]["dir"]
    # paths.root with its ~ expanded (the home resolver changes nothing else)
    assert run_dir.startswith("${home:${paths.root}}/${run_name:${experiment}}/")
    from pipeline.config import _home_resolver, _run_name_resolver

    assert _home_resolver("/data/out") == "/data/out" and _home_resolver("rel/o") == "rel/o"

    assert _run_name_resolver("../../x") == "_rejected_name"
    assert _run_name_resolver("/abs") == "_rejected_name"
    assert _run_name_resolver("study/b4") == "study/b4"


def test_backup_of_a_failed_run_is_not_called_complete(tmp_path, toy, caplog):
    """A failed attempt moved aside by an overwrite=true run that was then killed after
    finishing: the warning gives its status and says the current result stays."""
    toy("evaluate", writes("good"))
    toy("traverse", writes("report"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "evaluate")) == 0
    d = root / "t" / "evaluate"
    backup = d.with_name(".evaluate.old-def456")
    backup.mkdir()
    (backup / "manifest.json").write_text(json.dumps({"stage": "evaluate", "status": "failed"}))
    with caplog.at_level("WARNING"):
        assert runner.main(cfg_for(root, "traverse")) == 0
    line = next(r.getMessage() for r in caplog.records if str(backup) in r.getMessage())
    assert "status: failed" in line and "status: complete" in line
    assert "restores it" not in line
    assert (d / "metrics.json").read_text() == "good" and backup.exists()
