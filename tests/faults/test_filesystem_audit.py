"""What a file-system audit found (2026-12-05): a read-only study, or a colleague's,
could not be read (its lock file was opened for writing; lock files were 0o644 whatever
the umask); paths with spaces, brackets or accents failed with Hydra's lexer message and
no word of quoting; ``~`` made a folder named ``~``; a full disk during
``overwrite=true`` hid the previous result and the path; a ``paths.root`` that cannot
be looked at (no permission, a name over 255 characters) gave a traceback; an
unreadable ``embed.study`` ended as a crash (exit 1)."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from pipeline import runner
from pipeline.__main__ import config_error_line, expand_home, run_folder_error_line
from pipeline.artifacts import Manifest
from pipeline.locks import stage_lock
from tests.faults.conftest import cfg_for, writes
from tests.helpers.run import run_pipeline

_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def _status(d: Path) -> str:
    return json.loads((d / "manifest.json").read_text())["status"]


def _read_only(monkeypatch, under: Path, err: int = errno.EROFS) -> list[str]:
    """Make every open for writing (or creating) below ``under`` fail with ``err``, as
    on a read-only mount or in a colleague's folder (root ignores chmod); returns the
    paths opened read-only there."""
    real = os.open
    read = []

    def fake(path, flags, *a, **k):
        if str(path).startswith(str(under)):
            if flags & _WRITE:
                raise OSError(err, os.strerror(err), str(path))
            read.append(str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake)
    return read


def _study(tmp_path: Path, toy) -> Path:
    """A colleague's experiment with a finished simulate (its smears an input)."""
    toy("simulate", writes("smears"))
    assert runner.main(cfg_for(tmp_path / "theirs", "simulate")) == 0
    return tmp_path / "theirs" / "t"


def _reads_smears(toy) -> None:
    runner.load_stages()

    def body(ctx):
        ctx.input("smears")
        writes("metrics")(ctx)

    toy("evaluate", body)
    runner.REGISTRY["evaluate"].needs = ["smears"]


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_input_of_a_read_only_study_is_read_locked_read_only(tmp_path, toy, monkeypatch, err):
    """Was ``OSError: [Errno 30] Read-only file system: '.../.locks/simulate.lock'``
    (PermissionError 13 in a colleague's folder), exit 1."""
    theirs = _study(tmp_path, toy)
    _reads_smears(toy)
    read = _read_only(monkeypatch, theirs, err)
    smears = theirs / "simulate" / "smears"
    cfg = cfg_for(tmp_path / "mine", "evaluate", f"paths.inputs.smears={smears}")
    assert runner.main(cfg) == 0
    assert str(theirs / ".locks" / "simulate.lock") in read  # the shared lock was taken
    assert _status(tmp_path / "mine" / "t" / "evaluate") == "complete"


def test_read_only_study_without_a_lock_file_is_read_with_a_warning(
    tmp_path, toy, monkeypatch, caplog
):
    theirs = _study(tmp_path, toy)
    (theirs / ".locks" / "simulate.lock").unlink()
    _reads_smears(toy)
    _read_only(monkeypatch, theirs)
    smears = theirs / "simulate" / "smears"
    cfg = cfg_for(tmp_path / "mine", "evaluate", f"paths.inputs.smears={smears}")
    with caplog.at_level(logging.WARNING):
        assert runner.main(cfg) == 0
    said = [r.getMessage() for r in caplog.records if "read without a lock" in r.getMessage()]
    assert len(said) == 1 and str(theirs) in said[0] and "Read-only file system" in said[0]


def test_lock_files_follow_the_umask(tmp_path):
    """Were 0o644 whatever the umask: a group-shared experiment failed for the second
    member of the group (PermissionError on the first one's lock file)."""
    old = os.umask(0o002)
    try:
        with stage_lock(tmp_path, "train", "", "t") as lock:
            mode = stat.S_IMODE(lock.path.stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o664


def test_a_lock_that_cannot_be_written_is_one_line(tmp_path, toy, monkeypatch, capsys):
    toy("simulate", writes("smears"))
    root = tmp_path / "out"
    (root / "t" / ".locks").mkdir(parents=True)
    _read_only(monkeypatch, root / "t" / ".locks", errno.EACCES)
    assert runner.main(cfg_for(root, "simulate")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"cannot write its lock file {root / 't' / '.locks' / 'simulate.lock'}" in err
    assert "Permission denied" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "value",
    [
        "/data/Patient 1 (Müller)/out",
        "/data/Müller",
        "/data/a=b",
        "/data/a#b",
        "/data/a[1]",
        "/data/a&b",
        "/data/{x}",
        "/data/a,b (c)",
    ],
)
def test_a_path_hydra_cannot_parse_says_how_to_quote_it(value):
    """Was Hydra's lexer message (``mismatched input ' ('``, ``LexerNoViableAltException``)
    and a link to Hydra 1.2's docs; only a comma hinted at quoting."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    with pytest.raises(OverrideParseException) as e:
        OverridesParser.create().parse_overrides([f"paths.root={value}"])
    line = config_error_line(e.value)
    assert "\n" not in line and "hydra.cc" not in line
    assert line.endswith(f"must be quoted: \"paths.root='{value}'\"")


def test_a_path_with_an_apostrophe_is_shown_in_double_quotes(tmp_path):
    p = run_pipeline(["stage=train", f"paths.root={tmp_path}/O'Brien", "experiment=x"])
    assert p.returncode == 2
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1
    assert err.endswith(f'must be quoted: "paths.root=\\"{tmp_path}/O\'Brien\\""')


def test_a_comma_in_a_path_says_how_to_quote_it():
    from hydra.errors import ConfigCompositionException

    e = ConfigCompositionException(
        "Ambiguous value for argument 'paths.root=/d/a,b'\n"
        "1. To use it as a list, use key=[value1,value2]\n"
        "2. To use it as string, quote the value: key=\\'value1,value2\\'\n"
        "3. To sweep over it, add --multirun to your command line"
    )
    line = config_error_line(e)
    assert "--multirun" in line and line.endswith("must be quoted: \"paths.root='/d/a,b'\"")


@pytest.mark.parametrize("override", ["trainer.exclude_labels=[a,b", "vae.beta=${oc.env:X"])
def test_a_list_or_interpolation_typo_is_not_told_to_quote(override):
    """Found on review: every parse error ended "must be quoted", and quoting a list
    typo (``[a,b``) makes it a string; the hint is for values that read as paths."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from pipeline.__main__ import needs_quotes

    with pytest.raises(OverrideParseException) as e:
        OverridesParser.create().parse_overrides([override])
    line = config_error_line(e.value)
    assert "must be quoted" not in line and "\n" not in line
    assert needs_quotes("paths.root=/data/Patient 1 (M\u00fcller)")
    assert not needs_quotes("paths.root=~/x,~/y") and not needs_quotes("a=[1,2")


def test_a_failing_interpolation_in_a_path_setting_is_one_line(tmp_path):
    """Found on review: expanding ``~`` resolved every path setting first, so an
    interpolation that fails escaped as a Hydra traceback."""
    p = run_pipeline(
        [
            "stage=expression",
            f"paths.root={tmp_path}",
            "experiment=x",
            "data.expression_file=${oc.env:NO_SUCH_VARIABLE_41}",
        ]
    )
    assert p.returncode in (1, 2) and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "NO_SUCH_VARIABLE_41" in p.stderr


def test_home_is_expanded_in_path_settings(tmp_path, toy, monkeypatch):
    """``paths.root='~/outs'`` made a folder named ``~`` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    toy("simulate", writes("smears"))
    assert runner.main(cfg_for("'~/outs'", "simulate")) == 0
    smears = tmp_path / "home" / "outs" / "t" / "simulate" / "smears"
    assert smears.read_text() == "smears"
    _reads_smears(toy)
    cfg = cfg_for(tmp_path / "b", "evaluate", "paths.inputs.smears='~/outs/t/simulate/smears'")
    assert runner.resolve_input(cfg, "smears") == smears
    assert runner.main(cfg) == 0
    assert not (tmp_path / "~").exists()
    # the command line: Hydra makes its .hydra folder under paths.root before the runner
    home = tmp_path / "home"
    assert expand_home(["paths.root='~/o'", "embed.study=~/s", "experiment=~x"]) == [
        f"paths.root='{home}/o'",
        f"embed.study='{home}/s'",
        "experiment=~x",  # not a path: refused as a name (pipeline/names.py)
    ]


def test_study_load_expands_home(tmp_path, monkeypatch):
    from vae.api import Study, StudyError

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StudyError) as e:
        Study.load("~/study")
    assert str(e.value).startswith(f"{tmp_path / 'home' / 'study'}: no such file or folder")


def test_study_load_names_an_unreadable_study(tmp_path, monkeypatch):
    from vae.api import Study, StudyError

    study = tmp_path / "study"
    (study / "train").mkdir(parents=True)
    _no_permission(monkeypatch, study / "train")
    with pytest.raises(StudyError, match="permission denied"):
        Study.load(study)


def _no_permission(monkeypatch, under: Path) -> None:
    """os.stat below ``under`` fails as in a folder this user may not enter."""
    real = os.stat

    def fake(path, *a, **k):
        if str(path).startswith(str(under)) and str(path) != str(under):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "stat", fake)


def test_disk_full_during_overwrite_puts_the_previous_result_back(
    tmp_path, toy, monkeypatch, capsys
):
    """The failed manifest could not be written either: its OSError replaced the
    stage's, the backup stayed hidden in ``.simulate.old-*`` and the console line
    named no path."""
    toy("simulate", writes("v1"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "simulate")) == 0

    def full(ctx):
        raise OSError(errno.ENOSPC, "No space left on device")

    toy("simulate", full)
    real_finish = Manifest.finish

    def finish(self, status="complete"):
        if status == "failed":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_finish(self, status)

    monkeypatch.setattr(Manifest, "finish", finish)
    capsys.readouterr()
    assert runner.main(cfg_for(root, "simulate", "overwrite=true")) == 1
    d = root / "t" / "simulate"
    assert (d / "smears").read_text() == "v1" and _status(d) == "complete"
    assert not list(d.parent.glob(".simulate.old-*"))
    assert len(list(d.parent.glob("simulate.failed-*"))) == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert "No space left on device" in line and str(d) in line


def test_a_run_folder_name_over_255_characters_is_one_line(tmp_path):
    """Was a 61-line traceback (Path.exists raises ENAMETOOLONG), exit 1."""
    root = tmp_path / ("a" * 300) / "out"
    p = run_pipeline(["stage=train", f"paths.root={root}", "experiment=x"])
    assert p.returncode == 2
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "File name too long" in err and "300 characters" in err


def test_a_run_folder_above_which_nothing_can_be_looked_at_is_one_line(tmp_path, monkeypatch):
    """Path.exists raised PermissionError inside the error handler (exit 1)."""
    locked = tmp_path / "locked"
    _no_permission(monkeypatch, locked)
    e = PermissionError(errno.EACCES, "Permission denied", str(locked / "o" / "x" / ".hydra"))
    line = run_folder_error_line(e)
    assert f"cannot create {locked / 'o' / 'x' / '.hydra'}: Permission denied" in line


def test_an_unreadable_study_is_a_user_error(tmp_path, monkeypatch, capsys):
    """Was ``stage=embed failed: PermissionError`` (exit 1, .hydra left behind)."""
    study = tmp_path / "locked" / "study"  # in a folder this user may not enter
    crops = tmp_path / "crops"
    crops.mkdir()
    _no_permission(monkeypatch, tmp_path / "locked")
    cfg = cfg_for(tmp_path / "out", "embed", f"embed.study={study}", f"embed.crops={crops}")
    assert runner.main(cfg) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{study} (embed.study={study}): Permission denied" in err


def test_an_h5ad_input_this_user_may_not_read_says_so(tmp_path, monkeypatch):
    """A colleague's paired.h5ad without read permission was "not a readable .h5ad file
    (truncated, or not HDF5)" (h5py says "unable to open file" for both)."""
    from pipeline import guards
    from pipeline.runner import StageError
    from tests.helpers.vae_toy import make_paired

    p = tmp_path / "paired.h5ad"
    make_paired(8).write_h5ad(p)
    guards.probe_inputs({"paired": p})  # readable: no error
    real = guards.os.access
    monkeypatch.setattr(
        guards.os, "access", lambda q, mode: False if Path(q) == p else real(q, mode)
    )
    with pytest.raises(StageError, match=r"permission denied .*paths\.inputs\.paired=PATH"):
        guards.probe_inputs({"paired": p})


def test_home_in_paths_root_from_an_interpolation_keeps_hydras_folder_there(tmp_path):
    """A ``~`` reaching paths.root other than typed on the command line (a preset, an
    interpolation: ``paths.root=${oc.env:ROOT}``) put Hydra's ``.hydra`` folder under
    ``<cwd>/~`` while the runner wrote the stages under the home folder."""
    import os

    from tests.helpers.run import ROOT

    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "ROOT_41": "~/outs"}
    p = run_pipeline(
        [
            "stage=simulate",
            "paths.root=${oc.env:ROOT_41}",
            "experiment=h",
            "data.simulator.n_images=2",
            "hardware.torch_threads=1",
        ],
        env=env,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert (home / "outs" / "h" / "simulate" / "manifest.json").is_file()
    assert (home / "outs" / "h" / ".hydra").is_dir()
    assert not (ROOT / "~").exists()  # the working directory (run_pipeline's cwd)
