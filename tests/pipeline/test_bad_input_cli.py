"""Bad input on the command line: one ``error:`` line, exit code 2, no traceback.

- a wrong-typed override, an unknown or missing ``stage=`` (Hydra printed several
  lines and "Set the environment variable HYDRA_FULL_ERROR=1", exit 1);
- a ``paths.root`` where no folder can be made (a traceback from Hydra's run folder);
- an ``.h5ad`` input that is a folder (a garbled IsADirectoryError once the stage
  folder existed);
- a torch file of the wrong kind as the segmentation model (refused only after the
  stage folder and its ``.segment_parts/`` existed).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers.run import run_pipeline


def _one_error(r) -> str:
    """The single ``error:`` line of a refused run (and no traceback anywhere)."""
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.mark.parametrize(
    "args,names",
    [
        (["stage=train", "vae.beta=abc"], ["vae.beta=abc", "Float"]),
        (["stage=train", "trainer.batch_size=1.5"], ["trainer.batch_size=1.5", "Integer"]),
        (["stage=train", "overwrite=maybe"], ["overwrite=maybe", "bool"]),
        (["stage=nope"], ["stage=nope", "Could not find", "segment_train", "traverse"]),
        ([], ["stage", "segment_train", "traverse"]),
        (["stage=simulate", "vae.betta=4"], ["vae.betta=4", "did you mean vae.beta?"]),
        (["stage=train", "vae.beta=[1,"], ["vae.beta=[1,", "no viable alternative"]),
    ],
)
def test_bad_override_is_one_line_and_exit_2(tmp_path, args, names):
    root = tmp_path / "out"
    r = run_pipeline([*args, f"paths.root={root}"], timeout=120)
    err = _one_error(r)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in names:
        assert n in err, err
    assert not root.exists()  # composed before any folder is made


# a new key of a free mapping (pair.label_map, expression.programs): Hydra's "To append to
# your config use +k=v" was rewritten as "no such setting", and the '+' form is the way
_PLUS = "(a mapping: a new key needs a leading '+'): add it with"


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            "pair.label_map={promyelocyte: Promyelocytes}",
            f"'promyelocyte' is not yet a key of pair.label_map {_PLUS} "
            "'+pair.label_map={promyelocyte: Promyelocytes}'",
        ),
        (
            "pair.label_map.promyelocyte=Promyelocytes",
            f"'promyelocyte' is not yet a key of pair.label_map {_PLUS} "
            "+pair.label_map.promyelocyte=Promyelocytes",
        ),
        (
            "expression.programs.mine=[MPO]",
            f"'mine' is not yet a key of expression.programs {_PLUS} '+expression.programs.mine=[MPO]'",
        ),
        (
            "pair.label_maturation.band=0.8",
            f"'band' is not yet a key of pair.label_maturation {_PLUS} +pair.label_maturation.band=0.8",
        ),
    ],
)
def test_a_new_key_of_a_mapping_says_to_add_it_with_a_plus(override, expected):
    from hydra.errors import ConfigCompositionException

    from pipeline.__main__ import config_error_line
    from tests.helpers.run import compose_config

    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["stage=pair", "pair=by_label", override])
    line = config_error_line(e.value)
    assert line == f"{override}: {expected}"
    assert "no such setting" not in line
    # what the line says to run composes, with the new key in the mapping
    mapping, key = re.match(r"'(\w+)' is not yet a key of ([\w.]+) ", expected).group(2, 1)
    cfg = compose_config(["stage=pair", "pair=by_label", f"+{override}"])
    assert key in OmegaConf.select(cfg, mapping)


def test_a_slip_of_a_key_the_mapping_holds_is_named_before_the_plus():
    """``expression.programs.primry=[A]``: the '+' form would add a program 'primry' and
    leave 'primary' at its default (review), so the key it holds comes first."""
    from hydra.errors import ConfigCompositionException

    from pipeline.__main__ import config_error_line
    from tests.helpers.run import compose_config

    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["stage=pair", "expression.programs.primry=[A]"])
    assert config_error_line(e.value) == (
        "expression.programs.primry=[A]: 'primry' is not a key of expression.programs; did "
        "you mean expression.programs.primary (a key it holds)? A new key needs a leading "
        "'+': '+expression.programs.primry=[A]'"
    )


@pytest.mark.parametrize(
    "override,near",
    [
        ("pair.labl_map=x", "; did you mean pair.label_map?"),
        ("vae.nonsense=1", ""),
        ("pair.nonsense.x=1", ""),
        ("pair.crop_sources.0.paht=x", "; did you mean pair.crop_sources.0.path?"),
        ("seeed=1", "; did you mean seed"),
    ],
)
def test_a_key_no_setting_has_is_still_no_such_setting(override, near):
    from hydra.errors import ConfigCompositionException

    from pipeline.__main__ import config_error_line
    from tests.helpers.run import compose_config

    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["stage=pair", "pair=by_label", override])
    line = config_error_line(e.value)
    assert line.startswith(f"{override}: no such setting{near}"), line
    assert "'+'" not in line


def test_new_mapping_key_and_optional_group_on_the_command_line(tmp_path):
    """The user's command: one line naming the '+' form, nothing made; a preset given
    without its '+' (an optional config group) likewise."""
    root = tmp_path / "out"
    r = run_pipeline(
        [
            "stage=pair",
            "pair=by_label",
            "pair.label_map={promyelocyte: Promyelocytes}",
            f"paths.root={root}",
        ],
        timeout=120,
    )
    assert _one_error(r) == (
        "error: pair.label_map={promyelocyte: Promyelocytes}: 'promyelocyte' is not yet a "
        f"key of pair.label_map {_PLUS} '+pair.label_map={{promyelocyte: Promyelocytes}}'"
    )
    r = run_pipeline(["stage=all", "preset=demo", f"paths.root={root}"], timeout=120)
    assert _one_error(r) == (
        "error: preset=demo: preset is not in the default config (an optional config "
        "group): add it with a leading '+': +preset=demo"
    )
    # an option the group does not have: named first, its '+' form would fail next
    r = run_pipeline(["stage=all", "preset=dmo", f"paths.root={root}"], timeout=120)
    assert _one_error(r) == (
        "error: preset=dmo: preset has no option 'dmo'; did you mean +preset=demo? "
        "(options: demo, real; an optional config group: add it with a leading '+')"
    )
    assert not root.exists()


def test_bad_override_with_help_is_one_line_too():
    r = run_pipeline(["vae.beta=abc", "--help"], timeout=120)
    assert "vae.beta=abc" in _one_error(r)


@pytest.mark.parametrize("kind", ["file", "proc"])
def test_paths_root_where_no_folder_can_be_made(tmp_path, kind):
    if kind == "file":
        root = tmp_path / "a_file"
        root.write_text("x")
    else:
        root = Path("/proc/nope")
    r = run_pipeline(["stage=simulate", f"paths.root={root}"], timeout=120)
    err = _one_error(r)
    assert f"paths.root={root}" in err
    if kind == "file":
        assert f"{root} is a file, not a folder" in err
    else:
        assert "No such file or directory" in err


def test_h5ad_input_that_is_a_folder_is_refused_before_any_folder(tmp_path):
    folder = tmp_path / "not_a_file"
    folder.mkdir()
    root = tmp_path / "out"
    r = run_pipeline(
        ["stage=train", f"paths.inputs.paired={folder}", f"paths.root={root}", "experiment=t"],
        timeout=120,
    )
    err = _one_error(r)
    assert "paths.inputs.paired" in err and str(folder) in err
    assert "is a directory, expected an .h5ad file" in err
    assert not (root / "t" / "train").exists()


def test_expression_raw_may_still_be_a_folder(tmp_path):
    import anndata as ad
    import numpy as np

    from pipeline.guards import probe_inputs
    from pipeline.runner import StageError

    mtx = tmp_path / "filtered_feature_bc_matrix"
    mtx.mkdir()
    # a 10x matrix folder: read by its stage, not refused here
    assert probe_inputs({"expression_raw": mtx}) is None
    # ... and the folder does not stop the check of a file input in the same call
    good = tmp_path / "paired.h5ad"
    ad.AnnData(np.zeros((3, 2), np.float32)).write_h5ad(good)
    assert probe_inputs({"expression_raw": mtx, "paired": good}) is None
    bad = tmp_path / "broken.h5ad"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(StageError, match=r"input 'paired' = .*broken\.h5ad: not a readable"):
        probe_inputs({"expression_raw": mtx, "paired": bad})
    # a folder named like an .h5ad file is still refused, even as expression_raw
    named = tmp_path / "raw.h5ad"
    named.mkdir()
    with pytest.raises(StageError, match="is a directory, expected an .h5ad file"):
        probe_inputs({"expression_raw": named})


def _vae_checkpoint(path: Path) -> Path:
    """What stage=train writes as model.pt: VAE weights and VAEArgs as model_args."""
    from dataclasses import asdict

    from vae.model import TwoBranchVAE, VAEArgs

    args = VAEArgs(n_genes=10, crop_size=32)
    torch.save({"model": TwoBranchVAE(args).state_dict(), "model_args": asdict(args)}, path)
    return path


def test_vae_model_as_segmentation_model_is_refused_before_any_folder(tmp_path):
    model = _vae_checkpoint(tmp_path / "model.pt")
    smears = tmp_path / "smears"
    smears.mkdir()
    root = tmp_path / "out"
    r = run_pipeline(
        [
            "stage=segment",
            f"paths.inputs.segmentation_model={model}",
            f"paths.inputs.smears={smears}",
            f"paths.root={root}",
            "experiment=t",
            "hardware.torch_threads=1",
        ],
        timeout=120,
    )
    err = _one_error(r)
    assert f"paths.inputs.segmentation_model)={model}" in err
    assert "not a segmentation model checkpoint" in err and "VAE" in err
    assert not (root / "t" / "segment").exists()
    assert not list(root.rglob(".segment_parts"))


def test_the_shipped_detector_passes_the_detector_check():
    from segmentation.io import load_torch_file
    from segmentation.model import detector_checkpoint_problem
    from segmentation.shipped import SHIPPED_DETECTOR

    assert detector_checkpoint_problem(load_torch_file(SHIPPED_DETECTOR, "cpu", "x")) is None


def test_log_level_warning_quiets_the_terminal_not_the_stage_log(tmp_path):
    """log_level=WARNING: no INFO line on the terminal, while <stage>.log keeps the
    run's INFO record (it was empty, and the terminal showed INFO regardless)."""
    r = run_pipeline(
        [
            "stage=simulate",
            "experiment=q",
            f"paths.root={tmp_path}",
            "data.simulator.n_images=2",
            "data.simulator.image_size=[160,176]",
            "data.simulator.wbc_diameter_px=40",
            "log_level=WARNING",
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[INFO]" not in r.stdout + r.stderr
    log = (tmp_path / "q" / "simulate" / "simulate.log").read_text()
    assert " INFO " in log and "simulating 2 images" in log
