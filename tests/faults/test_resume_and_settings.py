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


def test_two_texture_bands_without_the_texture_layer_are_refused_at_start():
    """vae.texture_coarse splits the texture layer's grain in two: with the layer off
    (vae.texture_weight=0, the default) it would do nothing, silently."""
    from pipeline.precheck import precheck
    from pipeline.runner import StageError
    from pipeline.stages.train import _validate

    cfg = compose_config(["stage=train", "vae.texture_coarse=true"])
    with pytest.raises(StageError, match=r"vae.texture_coarse=true needs .*vae.texture_weight > 0"):
        precheck(cfg, ["train"])
    _validate(compose_config(["stage=train", "vae.texture_coarse=true", "vae.texture_weight=1"]))


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


def _toy_last(tmp_path: Path):
    """A last.pt of a tiny run after one epoch, with what resuming it needs."""
    from tests.vae.test_vae import CPU, _fresh_model, _toy_run_data, _train_args
    from vae.train import train

    d, split = _toy_run_data()
    meta = {"gene_names": list(d.gene_names), "label_names": list(d.label_names)}
    out = tmp_path / "run"
    train(_fresh_model(), d, split, _train_args(stop_after_epochs=1), CPU, out, meta=meta)
    return out / "last.pt", d, split, meta


def _resume(last: Path, d, split, meta, **train_kw):
    from tests.vae.test_vae import CPU, _fresh_model, _train_args
    from vae.train import train

    return train(
        _fresh_model(),
        d,
        split,
        _train_args(**train_kw),
        CPU,
        last.parent,
        resume_from=last,
        meta=meta,
    )


def _foreign(last: Path, to: Path, **model_kw) -> Path:
    """``last`` with the weights and model_args of a model built with ``model_kw``: the
    last.pt of another study (other genes, crops, labels)."""
    from dataclasses import asdict

    from segmentation.io import load_torch_file
    from tests.vae.test_vae import small_args
    from vae.model import TwoBranchVAE

    ck = load_torch_file(last)
    other = TwoBranchVAE(small_args(dropout=0.1, **model_kw))
    torch.save({**ck, "model": other.state_dict(), "model_args": asdict(other.args)}, to)
    return to


@pytest.mark.parametrize(
    "model_kw, named",
    [
        (
            {"n_genes": 10, "crop_size": 32},
            ["n_genes (the paired data's genes): 10 in the checkpoint, 12 now", "crop_size"],
        ),
        ({"n_classes": 3}, ["n_classes (the label head", "3 in the checkpoint, 0 now"]),
    ],
)
def test_resume_from_another_studys_last_pt_names_the_file_and_why(tmp_path, model_kw, named):
    """A last.pt of 200 genes / 32 px crops (or one with a label head) copied into
    train/: resume=true failed with torch's "size mismatch for expression_decoder.out.bias"
    / "Missing key(s) in state_dict", naming no file (an audit)."""
    from vae.checkpoint import CheckpointError

    last, d, split, meta = _toy_last(tmp_path)
    bad = _foreign(last, tmp_path / "run" / "other.pt", **model_kw)
    with pytest.raises(CheckpointError) as e:
        _resume(bad, d, split, meta)
    said = str(e.value)
    assert said.startswith(f"{bad}: resume=true cannot continue from it: it was written for ")
    assert "another study's last.pt, or settings that shape the model differ" in said
    for text in named:
        assert text in said
    assert "Pass overwrite=true instead of resume=true to train afresh" in said
    assert "\n" not in said and "size mismatch" not in said and "Missing key" not in said


def test_resume_from_a_model_pt_or_other_genes_is_one_user_error(tmp_path):
    from segmentation.io import load_torch_file
    from vae.checkpoint import CheckpointError

    last, d, split, meta = _toy_last(tmp_path)
    best = last.with_name("model.pt")
    with pytest.raises(CheckpointError) as e:  # was "failed: ValueError"
        _resume(best, d, split, meta)
    assert str(e.value).startswith(f"{best}: resume=true cannot continue from it: it is a ")
    assert "best-model checkpoint" in str(e.value) and "overwrite=true" in str(e.value)
    # same shapes, other genes: another study's run, not continued silently
    renamed = dict(meta, gene_names=[*meta["gene_names"][:-1], "OTHER"])
    with pytest.raises(CheckpointError, match="trained on other data than this run's") as e:
        _resume(last, d, split, renamed)
    assert f"#11 is {meta['gene_names'][-1]!r} in the checkpoint, 'OTHER' now" in str(e.value)
    # its own last.pt still resumes
    assert _resume(last, d, split, meta).epochs == 4
    assert load_torch_file(last)["epoch"] == 4


def test_resume_past_max_epochs_says_there_is_nothing_to_train(tmp_path, caplog):
    import logging

    last, d, split, meta = _toy_last(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vae.train"):
        r = _resume(last, d, split, meta, max_epochs=1)
    assert r.epochs == 1
    said = [x.getMessage() for x in caplog.records]
    assert (
        f"resume: {last} already trained 1 epochs >= trainer.max_epochs=1: nothing to "
        "train" in " ".join(said)
    )


def test_a_refused_resume_through_the_pipeline_is_exit_2_and_keeps_the_result(
    tmp_path, toy, capsys
):
    """The stage's CheckpointError is a user error: one line, exit 2, the complete
    result back as it was."""
    from vae.checkpoint import resume_error

    def refused(ctx):
        raise resume_error(ctx.dir / "last.pt", "it was written for another model")

    toy("train", writes("model-v1"))
    root = tmp_path / "out"
    assert runner.main(cfg_for(root, "train")) == 0
    d = root / "t" / "train"
    toy("train", refused)
    capsys.readouterr()
    assert runner.main(cfg_for(root, "train", "resume=true")) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {d / 'last.pt'}: resume=true cannot continue from it: it was written for "
        f"another model. Pass overwrite=true instead of resume=true to train afresh (a "
        f"complete result stays in place until the new run succeeds), or put back the "
        f"last.pt this study's run wrote.\n"
    )
    assert _status(d) == "complete" and (d / "model.pt").read_text() == "model-v1"
