"""resume=true with overwrite=true is refused before anything is moved (a user audit:
overwrite set the run aside, then resume found no last.pt and trained from scratch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import runner
from tests.helpers.run import compose_config


@pytest.mark.parametrize("stage", ["train", "all"])
def test_resume_and_overwrite_together_are_refused_before_any_folder_moves(
    tmp_path: Path, capsys, stage: str
):
    train = tmp_path / "out" / "e" / "train"
    train.mkdir(parents=True)
    (train / "manifest.json").write_text('{"status": "complete"}')
    (train / "last.pt").write_bytes(b"kept")
    cfg = compose_config(
        [
            f"stage={stage}",
            "experiment=e",
            f"paths.root={tmp_path / 'out'}",
            "resume=true",
            "overwrite=true",
        ]
    )
    assert runner.main(cfg) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    where = train if stage == "train" else tmp_path / "out" / "e"
    assert err == [
        f"error: resume=true and overwrite=true contradict: resume=true continues the "
        f"run{'s' if stage == 'all' else ''} in {where}, overwrite=true starts it over; give one"
    ]
    # nothing was moved aside
    assert sorted(p.name for p in train.parent.iterdir()) == ["train"]
    assert (train / "last.pt").read_bytes() == b"kept"
