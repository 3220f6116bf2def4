"""stage=embed refuses a file given as a folder input before it loads anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.runner import StageError
from tests.helpers.run import run_stage_in_process


@pytest.mark.parametrize("kind", ["smears", "crops"])
def test_a_file_given_as_a_folder_input_is_refused_up_front(tmp_path: Path, kind: str):
    """embed.smears / embed.crops read folders: a file was refused only after the study
    and its detector had loaded, behind a warning about the detector's scale (audit s52)."""
    img = tmp_path / "cell.png"
    img.write_bytes(b"not read")
    out = tmp_path / "out"
    with pytest.raises(StageError, match=rf"embed.{kind}=.*cell.png: reads a folder .* a file"):
        run_stage_in_process(
            [f"paths.root={out}", "experiment=e", f"embed.study={tmp_path}", f"embed.{kind}={img}"],
            "embed",
        )
    assert not (out / "e" / "embed").exists()
