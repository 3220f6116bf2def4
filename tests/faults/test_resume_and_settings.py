"""Issue 11.4, 11.6, 11.7: resume never demotes a complete stage and refuses changed
settings by name; numeric ranges; user errors are one line, not a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from pipeline import guards, runner
from pipeline.ranges import SettingRangeError, check_ranges
from tests.faults.conftest import cfg_for, writes
from tests.helpers.run import CONF, compose_config


def _status(d: Path) -> str:
    return json.loads((d / "manifest.json").read_text())["status"]


def _fail(ctx):
    (ctx.dir / "half.txt").write_text("half")
    raise RuntimeError("continuation crashed")


def test_resume_of_a_complete_stage_without_checkpoints_is_refused(tmp_path, toy, capsys):
    toy("expression", writes("done"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "expression")) == 0
    toy("expression", _fail)
    assert runner.main(cfg_for(root, "expression", "resume=true")) == 2
    assert "keeps no checkpoint to continue from" in capsys.readouterr().err
    assert _status(root / "t" / "expression") == "complete"


def test_failing_resume_of_a_complete_train_keeps_it_complete(tmp_path, toy):
    toy("train", writes("model-v1"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "train")) == 0
    d = root / "t" / "train"
    toy("train", _fail)
    assert runner.main(cfg_for(root, "train", "resume=true")) == 1
    assert _status(d) == "complete"
    assert (d / "model.pt").read_text() == "model-v1" and not (d / "half.txt").exists()
    failed = list(d.parent.glob("train.failed-*"))
    assert len(failed) == 1 and (failed[0] / "half.txt").exists()
    assert not list(d.parent.glob(".train.old-*"))


def test_resume_with_changed_loss_setting_is_refused_by_name(tmp_path, toy, capsys):
    toy("train", writes("m"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "train", "vae.beta=4")) == 0
    code = runner.main(cfg_for(root, "train", "vae.beta=8", "vae.n_latent=32", "resume=true"))
    err = capsys.readouterr().err
    assert code == 2
    assert "vae.beta: 4.0 -> 8.0" in err and "vae.n_latent: 16 -> 32" in err
    assert _status(root / "t" / "train") == "complete"
    # an epoch limit may change: that is what resume is for
    assert (
        runner.main(cfg_for(root, "train", "vae.beta=4", "trainer.max_epochs=99", "resume=true"))
        == 0
    )
    man = json.loads((root / "t" / "train" / "manifest.json").read_text())
    assert man["resume_hash"] == guards.settings_hash(man["config"], "train")
    # a held-out kind changes the split, which a resume keeps: refused by name
    code = runner.main(
        cfg_for(root, "train", "vae.beta=4", "trainer.exclude_labels=[eosinophil]", "resume=true")
    )
    assert code == 2
    assert "trainer.exclude_labels: [] -> ['eosinophil']" in capsys.readouterr().err


def test_resume_of_a_run_that_predates_a_setting(tmp_path, toy, capsys):
    """A run recorded before ``trainer.ema_epochs`` existed resumes when the setting
    has the value that does what the old code did (no average), and is refused by
    name, as unrecorded, with any other value or an unrecorded model setting."""
    toy("train", writes("m"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "train")) == 0
    path = root / "t" / "train" / "manifest.json"
    man = json.loads(path.read_text())
    del man["config"]["trainer"]["ema_epochs"], man["config"]["vae"]["beta"]
    path.write_text(json.dumps(man))
    code = runner.main(cfg_for(root, "train", "trainer.ema_epochs=5", "resume=true"))
    err = capsys.readouterr().err
    assert code == 2 and _status(root / "t" / "train") == "complete"
    assert "trainer.ema_epochs: not recorded (the run predates it) -> 5.0" in err
    # a model setting has no legacy value: refused even at its default
    assert "vae.beta: not recorded (the run predates it)" in err
    man["config"]["vae"]["beta"] = compose_config(["stage=train"]).vae.beta
    path.write_text(json.dumps(man))
    assert runner.main(cfg_for(root, "train", "trainer.max_epochs=3", "resume=true")) == 0
    assert guards.LEGACY_VALUES["trainer.ema_epochs"] == 0.0


def test_stage_all_resume_skips_the_complete_stages_it_starts_with(tmp_path, toy):
    for name in runner.ORDER:
        toy(name, writes(name))
    root = tmp_path / "out"
    for name in ("simulate", "segment_train"):
        assert runner.main(cfg_for(root, name)) == 0
    cfg = cfg_for(root, "all", "resume=true")
    assert guards.start_run(cfg, runner.stages_for(cfg)) == runner.ORDER[2:]


# --- ranges -------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,named",
    [
        ("vae.beta=-4", "vae.beta=-4.0 is out of range: must be >= 0"),
        ("vae.lobe_deep_valley=1.5", "vae.lobe_deep_valley=1.5 is out of range"),
        (
            "segmentation.aug_stain=1.5",
            "segmentation.aug_stain=1.5 is out of range: must be in [0,1]",
        ),
        ("trainer.batch_size=0", "trainer.batch_size=0 is out of range: must be >= 1"),
        ("embed.batch_size=0", "embed.batch_size=0 is out of range: must be >= 1"),
        ("embed.histogram_bins=0", "embed.histogram_bins=0 is out of range: must be >= 1"),
        ("embed.examples_per_call=-1", "embed.examples_per_call=-1 is out of range"),
        ("vae.channels=[16,0]", "vae.channels=[16, 0] is out of range"),
        ("segmentation.tile_overlap=2048", "segmentation.tile_overlap=2048 must be <"),
        (
            "trainer.val_fraction=0.9",
            "trainer.val_fraction=0.9 + trainer.test_fraction=0.15 must be < 1",
        ),
        ("expression.max_pct_mito=150", "expression.max_pct_mito=150.0 is out of range"),
        (
            "segmentation.scale_spread=0.8",
            "segmentation.scale_spread=0.8 is out of range: must be >= 1",
        ),
        ("vae.beta=inf", "vae.beta=inf is out of range"),
        # named options: refused at start, not by the stage that reads them
        ("vae.fusion=foo", "vae.fusion='foo' is not an option: valid: poe, moe"),
        ("pair.mode=nope", "pair.mode='nope' is not an option"),
        ("expression.orientation=rows", "expression.orientation='rows' is not an option"),
        ("vae.image_input=hed", "vae.image_input='hed' is not an option: valid: rgb, stain"),
        (
            "expression.hvg_flavor=foo",
            "expression.hvg_flavor='foo' is not an option: valid: seurat, cell_ranger, "
            "seurat_v3, seurat_v3_paper",
        ),
    ],
)
def test_out_of_range_settings_are_refused_by_name(override, named):
    with pytest.raises(SettingRangeError) as e:
        check_ranges(compose_config(["stage=train", override]))
    assert named in str(e.value)


def test_a_crop_size_the_image_branch_cannot_halve_is_refused_at_start():
    from pipeline.precheck import precheck
    from pipeline.runner import StageError

    cfg = compose_config(["stage=all", "+preset=demo", "pair.crop_size=40"])
    with pytest.raises(StageError, match=r"pair.crop_size=40: .*multiple of 16"):
        precheck(cfg, ["train"])
    cfg = compose_config(["stage=train", "vae.image_size=50"])
    with pytest.raises(StageError, match=r"vae.image_size=50"):
        precheck(cfg, ["train"])
    # stage=pair alone refuses the size too, naming its own setting
    cfg = compose_config(["stage=pair", "pair.crop_size=63"])
    with pytest.raises(StageError, match=r"pair.crop_size=63: .*multiple of 16 \(e.g. 64\)"):
        precheck(cfg, ["pair"])
    # crops resized when read (vae.image_size): stage=train checks that size, pair passes
    from pipeline.stages.pair import _validate as pair_validate

    pair_validate(compose_config(["stage=pair", "vae=large", "pair.crop_size=80"]))


def test_texture_noise_on_the_plain_decoder_is_refused_at_start():
    """vae.texture_noise feeds the residual decoder's last conv: with the plain decoder it
    did nothing, silently (the granule and texture layers already refused it)."""
    from pipeline.precheck import precheck
    from pipeline.runner import StageError

    cfg = compose_config(
        ["stage=train", "vae.texture_noise=true", "vae.image_arch=plain", "vae.granule_weight=0"]
    )
    with pytest.raises(StageError, match=r"vae.texture_noise=true needs vae.image_arch=residual"):
        precheck(cfg, ["train"])
    from pipeline.stages.train import _validate

    _validate(compose_config(["stage=train", "vae.texture_noise=true"]))  # residual: fine


def test_training_on_crops_of_a_size_the_image_branch_cannot_halve_names_the_file(tmp_path):
    """A paired.h5ad cut at 20 px (e.g. by an older pair run): stage=train names the file
    and the setting that made it, not the model's internal crop_size."""
    from pipeline.runner import StageError
    from pipeline.train_args import build_model_args
    from tests.helpers.vae_toy import make_paired
    from vae.data import load_paired

    make_paired(n=24, size=20, n_genes=6).write_h5ad(tmp_path / "p.h5ad")
    data = load_paired(tmp_path / "p.h5ad")
    cfg = compose_config(["stage=train", "vae.channels=[8,16,32]"])
    with pytest.raises(StageError, match=r"p.h5ad: crops of 20 px \(pair.crop_size.*multiple of 8"):
        build_model_args(cfg, data, str(tmp_path / "p.h5ad"))


def test_seurat_v3_without_scikit_misc_fails_before_any_folder(tmp_path, monkeypatch, capsys):
    """The real stage's start check: scanpy would only fail after QC and normalisation."""
    monkeypatch.setitem(sys.modules, "skmisc", None)  # scikit-misc not installed
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "expression", "expression.hvg_flavor=seurat_v3")) == 2
    err = capsys.readouterr().err
    assert "[expression.hvg_flavor] hvg_flavor=seurat_v3 needs the optional package" in err
    assert "pip install scikit-misc" in err and "Traceback" not in err
    assert not (root / "t").exists()
    # without HVG selection the flavor is never used: nothing to refuse
    cfg = cfg_for(
        root, "expression", "expression.hvg_flavor=seurat_v3", "expression.n_top_genes=null"
    )
    from pipeline.precheck import precheck

    precheck(cfg, ["simulate", "expression"])


def test_negative_beta_fails_before_any_folder(tmp_path, toy, capsys):
    toy("train", writes("m"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "train", "vae.beta=-4")) == 2
    assert "vae.beta=-4.0 is out of range" in capsys.readouterr().err
    assert not (root / "t").exists()


def test_every_shipped_config_is_in_range():
    """Presets composed; every group option merged onto the default (composing each
    one through Hydra costs about a second)."""
    from omegaconf import OmegaConf

    for ov in (["+preset=demo"], ["+preset=real"]):
        check_ranges(compose_config(["stage=all", *ov]))
    base = compose_config(["stage=all"])
    check_ranges(base)
    for group in (
        "analysis",
        "data",
        "expression",
        "hardware",
        "pair",
        "segmentation",
        "trainer",
        "vae",
    ):
        for f in (CONF / group).glob("*.yaml"):
            values = OmegaConf.load(f)
            values.pop("defaults", None)
            cfg = base.copy()
            OmegaConf.set_struct(cfg, False)
            OmegaConf.update(cfg, group, values, merge=True)
            check_ranges(cfg)


# --- user errors: one line, no traceback, before any folder ----------------------


def test_gpu_without_cuda_fails_before_the_stage_folder(tmp_path, toy, capsys, monkeypatch):
    # no CUDA device, also on a machine that has one (this process only: in process)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    toy("evaluate", writes("x"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "evaluate", "hardware=gpu")) == 2
    assert "usable CUDA device" in capsys.readouterr().err
    assert not (root / "t" / "evaluate").exists()
    # so the retry with the fallback is not refused as "already holds a run"
    assert (
        runner.main(cfg_for(root, "evaluate", "hardware=gpu", "hardware.fallback_to_cpu=true")) == 0
    )
    # the fallback was said by the start checks, before the stage's log was open: the
    # stage's log says it too, once
    text = (root / "t" / "evaluate" / "evaluate.log").read_text()
    assert text.count("falling back to CPU") == 1


def test_truncated_paired_h5ad_is_one_message(tmp_path, capsys):
    from tests.helpers.vae_toy import make_paired

    make_paired(12).write_h5ad(tmp_path / "full.h5ad")
    data = (tmp_path / "full.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 2])
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "train", f"paths.inputs.paired={tmp_path / 'cut.h5ad'}")) == 2
    err = capsys.readouterr().err
    assert "not a readable .h5ad file" in err and "cut.h5ad" in err and "Traceback" not in err
    assert not (root / "t" / "train").exists()


def test_unexpected_error_is_one_line_and_the_traceback_is_in_the_log(tmp_path, toy, capsys):
    def body(ctx):
        raise ZeroDivisionError("bad luck")

    toy("evaluate", body)
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "evaluate")) == 1
    err = capsys.readouterr().err
    assert "stage=evaluate failed: ZeroDivisionError: bad luck" in err
    assert "Traceback" not in err
    log = (root / "t" / "evaluate" / "evaluate.log").read_text()
    assert "Traceback" in log and "ZeroDivisionError" in log
    # log_level=DEBUG: the traceback is raised to the console
    with pytest.raises(ZeroDivisionError):
        runner.main(cfg_for(root, "evaluate", "log_level=DEBUG", "overwrite=true"))


def test_stage_all_says_its_stages_and_folder_first(tmp_path, toy, caplog):
    """A chain opened with `stage 1/8: simulate` (terminal audit): no list of what runs,
    nor where it goes; now one line before the first stage."""
    import logging

    for name in runner.ORDER:
        toy(name, writes(name))
    root = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="pipeline.runner"):
        assert runner.main(cfg_for(root, "all")) == 0
    first = [r.getMessage() for r in caplog.records if r.name == "pipeline.runner"][0]
    assert (
        first
        == f"stage=all: {len(runner.ORDER)} stages ({', '.join(runner.ORDER)}) -> {root / 't'}"
    )
    said = [r.getMessage() for r in caplog.records if r.name == "pipeline.runner"]
    assert said[1].startswith("stage=all: simulate runs (data=synthetic): read by segment_train")


def test_stage_all_without_a_reader_of_the_simulation_leaves_simulate_out(tmp_path, toy, caplog):
    """With the user's own expression file and crop folder, stage=all ran simulate first
    (data=synthetic is the default) and nothing read what it wrote."""
    import logging

    for name in runner.ORDER:
        toy(name, writes(name))
    root = tmp_path / "out"
    own = (
        "expression.input_file=mine.h5ad",
        "pair=by_label",
        f"pair.crop_sources=[{{kind: image_folder, path: {tmp_path}}}]",
        "+pair.label_map={promyelocyte: Promyelocytes}",
    )
    with caplog.at_level(logging.INFO, logger="pipeline.runner"):
        assert runner.main(cfg_for(root, "all", *own)) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "pipeline.runner"]
    assert said[0] == (
        f"stage=all: 5 stages (expression, pair, train, evaluate, traverse) -> {root / 't'}"
    )
    assert said[1].startswith("stage=all: simulate left out: no stage of this run reads")
    assert not (root / "t" / "simulate").exists()
