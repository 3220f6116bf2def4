"""The wheel a user installs holds everything the code loads at run time: the Hydra
configs inside the package (an installed copy run from any folder finds them; before,
``conf/`` was installed as a top-level ``conf`` package of site-packages), the shipped
detector, the licence and the ``wbc-pipeline`` command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.helpers.run import ROOT


def test_the_wheel_holds_the_configs_the_detector_and_the_command(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("pipeline", "segmentation", "vae"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=skip)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("wbc_pipeline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline/conf").rglob("*.yaml")}
    assert len(configs) > 40 and configs <= names, sorted(configs - names)[:5]
    assert "pipeline/conf/__init__.py" in names
    assert not any(n.startswith("conf/") for n in names)  # no top-level `conf` package
    assert "segmentation/weights/wbc_detector.pt" in names
    for sub in ("pipeline/stages/embed.py", "pipeline/simulator/", "vae/analysis/", "vae/inputs/"):
        assert any(n.startswith(sub) for n in names), sub
    info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "wbc-pipeline = pipeline.__main__:main" in zipfile.ZipFile(wheel).read(info).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
