"""Foundation: config composition, stage runner, run directory, atomic writes, DDP."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline import hardware, runner
from pipeline.artifacts import StageInputError, atomic_path, write_json
from tests.helpers.run import ROOT, compose_config, run_pipeline

ALL_STAGES = [*runner.ORDER, *runner.EXTRA_STAGES, "all"]


_compose = compose_config
_run = run_pipeline


# --- configuration -----------------------------------------------------------


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "pipeline" / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("name", ALL_STAGES)
def test_every_stage_config_composes(name):
    cfg = _compose([f"stage={name}"])
    assert cfg.stage.name == name
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize(
    "group",
    [
        "data",
        "segmentation",
        "expression",
        "pair",
        "vae",
        "trainer",
        "analysis",
        "hardware",
        "paths",
    ],
)
def test_every_group_option_composes(group):
    opts = _options(group)
    assert opts, f"pipeline/conf/{group} has no options"
    for opt in opts:
        cfg = _compose(["stage=simulate", f"{group}={opt}"])
        OmegaConf.to_container(cfg, resolve=True)


def test_stage_options_are_exactly_the_registered_stages():
    assert _options("stage") == sorted(ALL_STAGES)


def test_config_typo_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match="betta"):
        _compose(["stage=train", "vae.betta=4"])


def test_config_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match="beta"):
        _compose(["stage=train", "vae.beta=high"])


def test_cli_missing_stage_and_unknown_stage(tmp_path):
    r = _run([f"paths.root={tmp_path}"])
    assert r.returncode != 0
    assert "stage" in r.stderr
    r = _run(["stage=bogus", f"paths.root={tmp_path}"])
    assert r.returncode != 0
    for name in runner.ORDER:  # Hydra lists the valid options
        assert name in r.stderr


def test_cli_a_list_setting_indexed_by_a_name_is_one_error_line(tmp_path):
    """``vae.maturation_classes.foo=1``: OmegaConf's list update fails as a bare int()
    ValueError, which reached the user as a traceback (review); now one line naming the
    list and the two ways to set it, and nothing is written."""
    r = _run(["stage=train", "vae.maturation_classes.foo=1", f"paths.root={tmp_path / 'o'}"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "error: vae.maturation_classes.foo=1: vae.maturation_classes is a list; give the "
        "whole list (vae.maturation_classes=[a,b]) or an entry by its index "
        "(vae.maturation_classes.0=a), not by a name ('foo')"
    )
    assert not (tmp_path / "o").exists()


def test_cli_typo_fails_with_hydra_message(tmp_path):
    r = _run(["stage=simulate", "vae.betta=4", f"paths.root={tmp_path}"])
    assert r.returncode != 0
    assert "betta" in r.stderr
    # Hydra's own hint, "+vae.betta=4", would run with the default beta: refused too,
    # before anything is written
    r = _run(["stage=simulate", "+vae.betta=4", f"paths.root={tmp_path}"])
    assert r.returncode == 2 and "did you mean vae.beta?" in r.stderr
    assert "Traceback" not in r.stderr and not any(tmp_path.iterdir())
    # the same typo while asking for --help: one message, no traceback
    r = _run(["vae.betta=4", "--help"])
    assert r.returncode == 2 and "vae.betta" in r.stderr and "Traceback" not in r.stderr


def test_adding_to_a_free_mapping_is_allowed():
    from pipeline.config import unknown_addition

    assert unknown_addition(["+expression.programs.mine=[Mpo]", "+preset=demo"]) is None
    assert unknown_addition(["+pair.label_map.Blast=myeloblast"]) is None
    assert "paths.inputs.smears" in unknown_addition(["+paths.inputs.smear=DIR"])
    # an entry of a list of settings is checked against its schema too
    msg = unknown_addition(["+data.smear_sources.0.scal=0.3"])
    assert "did you mean data.smear_sources.0.scale" in msg
    assert unknown_addition(["+data.smear_sources.0.wbc_classes=[neutrophil]"]) is None
    # '++', a new top-level key and a key under a missing section were let through (and
    # nothing read them); a free mapping's new key, a config group and hydra.* still pass
    assert "did you mean pair.label_map" in unknown_addition(["++pair.labl_map=x"])
    assert "pair has no setting 'nonsense'" in unknown_addition(["+pair.nonsense.x=1"])
    assert "neither a setting nor a config group" in unknown_addition(["+nonsense=1"])
    assert "did you mean preset" in unknown_addition(["+prest=demo"])
    for ok in (
        "++pair.label_map.x=y",
        "+pair.label_map={a: b}",
        "+seed=1",
        "+hydra.job.chdir=false",
    ):
        assert unknown_addition([ok]) is None, ok


# --- run directory and runner -------------------------------------------------


def _cfg(tmp_path: Path, stage: str = "simulate", *extra: str):
    return _compose([f"stage={stage}", f"paths.root={tmp_path}", "experiment=t", *extra])


def test_missing_input_names_the_producing_stage(tmp_path):
    cfg = _cfg(tmp_path, "pair")
    with pytest.raises(StageInputError) as e:
        runner.resolve_input(cfg, "cells")
    msg = str(e.value)
    assert "stage=segment" in msg and "paths.inputs.cells" in msg


def test_explicit_input_must_exist(tmp_path):
    cfg = _cfg(tmp_path, "pair", f"paths.inputs.cells={tmp_path}/nope.h5ad")
    with pytest.raises(StageInputError, match="paths.inputs.cells"):
        runner.resolve_input(cfg, "cells")


def _writes(text: str):
    """A toy stage body that writes ``text`` as its evaluation artifact."""

    def body(ctx):
        with ctx.atomic("evaluation") as tmp:
            tmp.write_text(text)

    return body


def _fails(name: str, text: str, message: str):
    """A toy stage body that writes ``text`` to ``name`` in its folder, then fails."""

    def body(ctx):
        (ctx.dir / name).write_text(text)
        raise RuntimeError(message)

    return body


def _register_toy(monkeypatch, body):
    spec = runner.StageSpec(name="evaluate", fn=body, produces=["evaluation"])
    monkeypatch.setitem(runner.REGISTRY, "evaluate", spec)


def test_runner_writes_manifest_and_refuses_overwrite(tmp_path, monkeypatch):
    _register_toy(monkeypatch, _writes('{"ok": 1}'))
    cfg = _cfg(tmp_path, "evaluate")
    d = runner.run_stage(cfg, "evaluate")
    man = json.loads((d / "manifest.json").read_text())
    assert man["status"] == "complete"
    assert man["outputs"]["evaluation"]["bytes"] == len('{"ok": 1}')
    assert man["config"]["experiment"] == "t"
    assert (d / "evaluate.log").exists()
    # a second run refuses to replace the finished one
    with pytest.raises(runner.StageError, match="overwrite=true"):
        runner.run_stage(cfg, "evaluate")
    # the artifact resolves for a later stage
    assert runner.resolve_input(cfg, "evaluation") == d / "metrics.json"


def test_failed_overwrite_restores_previous_outputs(tmp_path, monkeypatch):
    def bad(ctx):
        raise RuntimeError("boom")

    _register_toy(monkeypatch, _writes("first"))
    cfg = _cfg(tmp_path, "evaluate")
    d = runner.run_stage(cfg, "evaluate")
    _register_toy(monkeypatch, bad)
    with pytest.raises(RuntimeError, match="boom"):
        runner.run_stage(_cfg(tmp_path, "evaluate", "overwrite=true"), "evaluate")
    assert (d / "metrics.json").read_text() == "first"
    assert json.loads((d / "manifest.json").read_text())["status"] == "complete"


def test_variant_runs_survive_the_plain_runs_overwrite(tmp_path, monkeypatch):
    """variant=NAME runs live inside the plain run's folder: never its result."""

    def bad(ctx):
        raise RuntimeError("boom")

    _register_toy(monkeypatch, _writes("v1"))
    v = runner.run_stage(_cfg(tmp_path, "evaluate", "variant=v1"), "evaluate")
    # a folder holding only variant runs holds no run of its own: no refusal
    _register_toy(monkeypatch, _writes("plain"))
    d = runner.run_stage(_cfg(tmp_path, "evaluate"), "evaluate")
    assert v.parent == d and (d / "metrics.json").read_text() == "plain"
    # a successful overwrite replaces the plain result and keeps the variant's
    _register_toy(monkeypatch, _writes("plain2"))
    runner.run_stage(_cfg(tmp_path, "evaluate", "overwrite=true"), "evaluate")
    assert (d / "metrics.json").read_text() == "plain2"
    assert (v / "metrics.json").read_text() == "v1"
    assert json.loads((v / "manifest.json").read_text())["status"] == "complete"
    # a failed overwrite puts the plain result back and the variant stays too
    _register_toy(monkeypatch, bad)
    with pytest.raises(RuntimeError, match="boom"):
        runner.run_stage(_cfg(tmp_path, "evaluate", "overwrite=true"), "evaluate")
    assert (d / "metrics.json").read_text() == "plain2"
    assert (v / "metrics.json").read_text() == "v1"
    failed = list(d.parent.glob("evaluate.failed-*"))
    assert len(failed) == 1 and not (failed[0] / "v1").exists()
    assert not list(d.parent.glob(".evaluate.old-*"))


def test_killed_overwrite_restore_keeps_variant_runs(tmp_path, monkeypatch):
    from pipeline.stagedir import recover_backups

    _register_toy(monkeypatch, _writes("v1"))
    v = runner.run_stage(_cfg(tmp_path, "evaluate", "variant=v1"), "evaluate")
    _register_toy(monkeypatch, _writes("plain"))
    d = runner.run_stage(_cfg(tmp_path, "evaluate"), "evaluate")
    # what a killed overwrite=true leaves: the backup beside, a half-made folder
    backup = d.with_name(".evaluate.old-abc123")
    d.rename(backup)
    d.mkdir()
    (backup / "v1").rename(v)
    (d / "partial.txt").write_text("x")
    recover_backups(d, "evaluate")
    assert (d / "metrics.json").read_text() == "plain"
    assert (v / "metrics.json").read_text() == "v1"
    kept = list(d.parent.glob("evaluate.interrupted-*"))
    assert len(kept) == 1 and (kept[0] / "partial.txt").exists() and not (kept[0] / "v1").exists()


def test_a_failed_run_is_kept_aside_and_run_again(tmp_path, monkeypatch):
    """A stage without checkpoints has nothing to continue: a failed run does not block."""
    _register_toy(monkeypatch, _fails("half.txt", "x", "boom"))
    cfg = _cfg(tmp_path, "evaluate")
    with pytest.raises(RuntimeError, match="boom"):
        runner.run_stage(cfg, "evaluate")
    _register_toy(monkeypatch, _writes("good"))
    d = runner.run_stage(cfg, "evaluate")  # no overwrite=true needed
    assert (d / "metrics.json").read_text() == "good" and not (d / "half.txt").exists()
    kept = list(d.parent.glob("evaluate.failed-*"))
    assert len(kept) == 1 and (kept[0] / "half.txt").exists()
    assert json.loads((kept[0] / "manifest.json").read_text())["status"] == "failed"
    # a complete run is still never replaced without overwrite=true
    with pytest.raises(runner.StageError, match="overwrite=true"):
        runner.run_stage(cfg, "evaluate")


def test_precheck_follows_the_runners_rule_for_existing_folders(tmp_path):
    """stage=all's up-front check: other variants' runs and a failed run do not block."""
    from pipeline.precheck import precheck

    cfg = _cfg(tmp_path, "all")
    d = tmp_path / "t" / "simulate"
    (d / "v1").mkdir(parents=True)
    write_json(d / "v1" / "manifest.json", {"stage": "simulate", "status": "complete"})
    precheck(cfg, ["simulate"])  # only a variant's run: nothing of its own
    write_json(d / "manifest.json", {"stage": "simulate", "status": "failed"})
    precheck(cfg, ["simulate"])  # a failed run is moved aside when the stage runs
    write_json(d / "manifest.json", {"stage": "simulate", "status": "complete"})
    with pytest.raises(runner.StageError, match="status: complete"):
        precheck(cfg, ["simulate"])


def test_a_stage_that_failed_before_its_first_checkpoint_runs_again():
    """segment_train that stopped on a user error before writing model.pt has nothing to
    resume: it is run afresh, as a stage without checkpoints is (it was refused, and
    resume=true then refused the corrected setting)."""
    from pipeline.stagedir import rerun_without_asking

    assert rerun_without_asking("evaluate", "failed")
    assert not rerun_without_asking("evaluate", "complete")
    assert not rerun_without_asking("segment_train", "failed")  # folder unknown: ask


def test_unfinished_producer_is_refused(tmp_path, monkeypatch):
    _register_toy(monkeypatch, _fails("metrics.json", "partial", "crash"))
    cfg = _cfg(tmp_path, "evaluate")
    # the body's own error ("crash"), not a StageError (a RuntimeError too) of the runner
    with pytest.raises(RuntimeError, match="^crash$") as e:
        runner.run_stage(cfg, "evaluate")
    assert type(e.value) is RuntimeError
    with pytest.raises(StageInputError, match="unfinished"):
        runner.resolve_input(cfg, "evaluation")


def test_stale_input_is_refused(tmp_path, monkeypatch):
    _register_toy(monkeypatch, _writes("12345"))
    cfg = _cfg(tmp_path, "evaluate")
    d = runner.run_stage(cfg, "evaluate")
    (d / "metrics.json").write_text("123")
    with pytest.raises(StageInputError, match="stale"):
        runner.resolve_input(cfg, "evaluation")


def test_unwritable_root_is_a_clear_error(tmp_path, monkeypatch):
    _register_toy(monkeypatch, lambda ctx: None)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = _cfg(blocker / "sub", "evaluate")
    with pytest.raises(runner.StageError, match="paths.root"):
        runner.run_stage(cfg, "evaluate")


def test_unknown_stage_name_lists_valid_ones(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.stage.name = "nope"
    with pytest.raises(runner.StageError) as e:
        runner.stages_for(cfg)
    assert all(n in str(e.value) for n in runner.ORDER)


def test_all_runs_every_stage_in_order(tmp_path):
    cfg = _cfg(tmp_path, "all")
    assert runner.stages_for(cfg) == runner.ORDER
    cfg.data.name = "bccd"
    assert runner.stages_for(cfg) == runner.ORDER[1:]


def test_all_trains_no_detector_for_the_users_own_images_or_a_given_model(tmp_path):
    """The masked route of the README's "Your own data": crop folders through
    data.segment_sources with data=synthetic (the default) made stage=all simulate smears,
    train segment_train on them and cut the user's crops with that detector (docs
    helper); now segment uses the shipped real-data detector and nothing is simulated. A
    given model is never retrained; the real preset still trains its own."""
    own = [
        f"data.segment_sources=[{{name: mine, kind: crop_folder, path: {tmp_path}}}]",
        "expression.input_file=mine.h5ad",
        "pair=by_label",
    ]
    cfg = _cfg(tmp_path, "all", *own)
    assert runner.stages_for(cfg) == [
        "segment",
        "expression",
        "pair",
        "train",
        "evaluate",
        "traverse",
    ]
    assert "shipped with the package" in runner.detector_given(cfg)
    cfg = _cfg(tmp_path, "all", f"paths.inputs.segmentation_model={tmp_path / 'm.pt'}")
    assert runner.stages_for(cfg) == [n for n in runner.ORDER if n != "segment_train"]
    assert runner.detector_given(cfg) == "paths.inputs.segmentation_model is given"
    cfg = _cfg(tmp_path, "all", "+preset=real")
    assert runner.stages_for(cfg)[:2] == ["segment_train", "segment"]
    assert runner.detector_given(cfg) is None


def test_own_images_are_not_cut_by_a_detector_trained_on_simulated_smears(tmp_path, monkeypatch):
    """An experiment that holds segment_train/model.pt trained on simulated smears (make
    demo's, or a run before stage=all left segment_train out): segmenting the user's own
    images took it (review); now the shipped real-data detector, with a warning naming
    the file; a model given, or a detector trained on real data, is used as before."""
    from pipeline.artifacts import shipped_default

    d = tmp_path / "t" / "segment_train"
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(b"x")
    trained = {"status": "complete", "config": {"data": {"name": "synthetic"}}}
    monkeypatch.setattr(runner, "read_manifest", lambda _d: trained)
    monkeypatch.setattr(runner, "check_fresh", lambda *a: None)
    own = f"data.segment_sources=[{{name: mine, kind: crop_folder, path: {tmp_path}}}]"
    shipped = shipped_default("segmentation_model")[0]
    assert runner.resolve_input(_cfg(tmp_path, "segment", own), "segmentation_model") == shipped
    assert runner.resolve_input(_cfg(tmp_path, "segment"), "segmentation_model") == d / "model.pt"
    trained["config"]["data"]["name"] = "real_small"
    assert (
        runner.resolve_input(_cfg(tmp_path, "segment", own), "segmentation_model") == d / "model.pt"
    )


def test_all_leaves_simulate_out_when_no_stage_reads_it(tmp_path):
    """data=synthetic is the default: with the user's own expression file and crop
    folders, stage=all simulated smears and profiles nobody read (6 stages)."""
    own = [
        "expression.input_file=mine.h5ad",
        "pair=by_label",
        f"pair.crop_sources=[{{kind: image_folder, path: {tmp_path}}}]",
        "+pair.label_map={promyelocyte: Promyelocytes}",
    ]
    cfg = _cfg(tmp_path, "all", *own)
    chain = runner.stages_for(cfg)
    assert chain == ["expression", "pair", "train", "evaluate", "traverse"]
    assert runner.simulate_readers(cfg, [*chain, "simulate"]) == {}
    assert runner.simulate_note(cfg, chain, chain).startswith(
        "stage=all: simulate left out: no stage of this run reads the simulated"
    )
    # expression only, from a file: the same (paths.inputs.expression_raw too)
    for given in ("data.expression_file=mine.h5ad", "paths.inputs.expression_raw=mine.h5ad"):
        cfg = _cfg(tmp_path, "all", "pair=expression_only", given)
        assert runner.stages_for(cfg) == ["expression", "pair", "train", "evaluate", "traverse"]
    # one input of its own, the other still the simulator's: simulate runs, and says why
    cfg = _cfg(tmp_path, "all", "expression.input_file=mine.h5ad")
    chain = runner.stages_for(cfg)
    assert chain == runner.ORDER
    assert runner.simulate_note(cfg, chain, chain) == (
        "stage=all: simulate runs (data=synthetic): read by segment_train (smears), "
        "segment (smears); give these stages inputs of your own (expression.input_file, "
        "pair.crop_sources folders, paths.inputs.*) and it is left out"
    )
    for kept in (
        ["pair=expression_only"],  # the simulated profiles
        ["pair=image_only", "pair.crop_sources=[{kind: coco}]"],  # its smears' cells
        ["expression.input_file=mine.h5ad", "pair.crop_sources=[{kind: coco}]"],
    ):
        assert "simulate" in runner.stages_for(_cfg(tmp_path, "all", *kept)), kept
    # the default and the demo read the simulated data
    for preset in ([], ["+preset=demo"]):
        cfg = _cfg(tmp_path, "all", *preset)
        assert runner.stages_for(cfg) == runner.ORDER
        assert set(runner.simulate_readers(cfg, runner.ORDER)) == {
            "segment_train",
            "segment",
            "expression",
        }
    # not data=synthetic: nothing to say
    cfg = _cfg(tmp_path, "all", "+preset=real")
    assert runner.simulate_note(cfg, runner.stages_for(cfg), runner.stages_for(cfg)) is None


# --- atomic writes -------------------------------------------------------------


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    f = tmp_path / "a.json"
    write_json(f, {"v": 1})
    with pytest.raises(ValueError):
        with atomic_path(f) as tmp:
            tmp.write_text("half")
            raise ValueError("interrupted")
    assert json.loads(f.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_path_replaces_folders(tmp_path):
    d = tmp_path / "smears"
    d.mkdir()
    (d / "old.png").write_text("o")
    with atomic_path(d) as tmp:
        tmp.mkdir()
        (tmp / "new.png").write_text("n")
    assert [p.name for p in d.iterdir()] == ["new.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smears"]


# --- hardware / DDP ----------------------------------------------------------------


def test_gpu_request_without_gpu_is_clear(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hw = _compose(["stage=train", "hardware=gpu"]).hardware
    with pytest.raises(hardware.HardwareError, match="hardware.fallback_to_cpu"):
        hardware.plan(hw)
    hw.fallback_to_cpu = True
    assert hardware.plan(hw) == ("cpu", [], 1)


def test_bad_hardware_settings_name_the_field():
    hw = _compose(["stage=train"]).hardware
    hw.precision = "fp8"
    with pytest.raises(hardware.HardwareError, match="hardware.precision"):
        hardware.plan(hw)


def _ddp_body(ctx):
    """Runs in each spawned rank: all-reduce, then a rank-0-only write."""
    d = ctx.dist
    t = torch.tensor([float(d.rank + 1)])
    d.all_reduce_sum(t)
    model = d.wrap(torch.nn.Linear(2, 1))
    loss = model(torch.ones(4, 2) * (d.rank + 1)).sum()
    loss.backward()  # DDP averages gradients over ranks
    grad = model.module.weight.grad.clone()
    (ctx.dir / f"seen_rank{d.rank}.json").write_text(
        json.dumps({"sum": t.item(), "world": d.world_size, "grad": grad.tolist()})
    )
    if d.is_main:
        (ctx.dir / "artifact.txt").write_text("rank0")
    d.barrier()


def _abort_late_on_rank1(ctx):
    """Rank 1 aborts (SIGABRT) half a second after its work: as gloo's teardown does."""
    import threading
    import time

    if ctx.dist.rank == 1:
        threading.Thread(target=lambda: (time.sleep(0.5), os.abort())).start()


def _abort_now_on_rank1(ctx):
    if ctx.dist.rank == 1:
        os.abort()


def test_an_abort_after_every_rank_finished_is_not_a_failure(tmp_path, caplog, spawn_tmp):
    """gloo's destroy_process_group aborts a rank now and then after the work is done
    (seen in CI: "terminate called without an active exception"); that is logged, not a
    failed stage. An abort during the work still fails."""
    hw = _compose(["stage=train", "hardware.num_processes=2", "hardware.master_port=0"]).hardware
    hardware.launch(_abort_late_on_rank1, SimpleNamespace(dir=tmp_path, dist=None), hw)
    assert "aborted while closing the process group" in caplog.text
    with pytest.raises(Exception, match="SIGABRT"):
        hardware.launch(_abort_now_on_rank1, SimpleNamespace(dir=tmp_path, dist=None), hw)


def test_ddp_two_cpu_processes_gloo(tmp_path, spawn_tmp):
    hw = _compose(["stage=train", "hardware.num_processes=2", "hardware.master_port=0"]).hardware
    ctx = SimpleNamespace(dir=tmp_path, dist=None)
    hardware.launch(_ddp_body, ctx, hw)
    seen = [json.loads((tmp_path / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["sum"] for s in seen] == [3.0, 3.0]  # 1 + 2 on both ranks
    assert [s["world"] for s in seen] == [2, 2]
    # gradient of sum(W x) over 4 rows of value r+1 is 4(r+1); DDP averages: 4*1.5 = 6
    assert seen[0]["grad"] == seen[1]["grad"] == [[6.0, 6.0]]
    assert (tmp_path / "artifact.txt").read_text() == "rank0"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "artifact.txt",
        "seen_rank0.json",
        "seen_rank1.json",
    ]


def test_real_preset_composes():
    cfg = _compose(["stage=all", "+preset=real"])
    assert (cfg.data.name, cfg.pair.mode, cfg.experiment) == ("real_small", "by_label", "real")
    assert "simulate" not in runner.stages_for(cfg)
    OmegaConf.to_container(cfg, resolve=True)


def test_sweep_variant_names_only_the_swept_settings():
    from pipeline.__main__ import sweep_variant

    task = [
        "stage=train",
        "vae.beta=4",
        "vae.n_latent=8",
        "paths.root=/tmp/very/long",
        "hardware.devices=[0]",
    ]
    argv = ["-m", "stage=train", "vae.beta=1,4,16", "vae.n_latent=8", "paths.root=/tmp/very/long"]
    assert sweep_variant(task, argv) == "vae.beta=4"
    # a list value is not a sweep; without any sweep every setting but paths/hardware names it
    assert (
        sweep_variant(["vae.channels=[8,16]", "seed=1"], ["vae.channels=[8,16]"])
        == "seed=1,vae.channels=_8,16_"
    )
    long = [f"vae.k{i}=v{i}" for i in range(40)]
    name = sweep_variant(long, [])
    assert len(name) == 109 and name.startswith("vae.k0=v0")


def test_demo_preset_composes():
    cfg = _compose(["stage=all", "+preset=demo"])
    assert cfg.data.name == "synthetic" and cfg.data.simulator.n_images == 120
    assert runner.stages_for(cfg) == runner.ORDER


# --- torch threads ------------------------------------------------------------


def test_threads_follow_free_cores_setting_and_ddp():
    assert hardware.pick_threads(None, cores=2, load=0.1, env={})[0] == 2
    # the busy-core estimate never exceeds the 1-min load average
    import os

    assert 0 <= hardware._busy_cores() <= os.getloadavg()[0] + 1e-9
    assert hardware.pick_threads(None, cores=2, load=1.2, env={})[0] == 1
    assert hardware.pick_threads(None, cores=16, load=5.0, env={})[0] == 11
    assert hardware.pick_threads(None, cores=2, load=9.0, env={})[0] == 1  # never 0
    assert hardware.pick_threads(3, cores=2, load=9.0, env={}) == (3, "hardware.torch_threads")
    assert hardware.pick_threads(None, world_size=4, cores=16, load=0.0, env={})[0] == 1
    assert hardware.pick_threads(None, cores=16, load=0.0, env={"OMP_NUM_THREADS": "2"})[0] == 2


def test_threads_are_applied_and_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "_THREADS", {})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "_busy_cores", lambda: 50.0)
    before = torch.get_num_threads()
    hw = SimpleNamespace(torch_threads=None)
    try:
        with caplog.at_level("INFO", logger="pipeline.hardware"):
            assert hardware.set_threads(hw) == 1 and torch.get_num_threads() == 1
            hardware.set_threads(hw)
        lines = [r.message for r in caplog.records if "torch threads" in r.message]
        assert len(lines) == 1 and "load 50.00" in lines[0]
    finally:
        torch.set_num_threads(before)


def test_failed_resumable_stage_without_checkpoint_is_rerun(tmp_path):
    from pipeline.stagedir import rerun_without_asking

    d = tmp_path / "segment_train"
    d.mkdir()
    assert rerun_without_asking("segment_train", "failed", d)  # no model.pt yet
    (d / "model.pt").write_bytes(b"x")
    assert not rerun_without_asking("segment_train", "failed", d)  # resume=true can go on


def test_missing_input_advice_writes_where_the_run_reads(tmp_path):
    """The advice for a missing input names the run's own paths.root and variant: with
    paths.root=DIR it said `stage=pair experiment=e3`, which writes into ./outputs."""
    cfg = compose_config(["stage=train", "experiment=e3", f"paths.root={tmp_path}", "variant=b8"])
    with pytest.raises(StageInputError) as e:
        runner.resolve_input(cfg, "paired")
    assert f"`python -m pipeline stage=pair experiment=e3 paths.root={tmp_path} variant=b8`" in str(
        e.value
    )
    plain = compose_config(["stage=train", "experiment=e3"])
    assert runner.rerun_args(plain, "pair") == "stage=pair experiment=e3"
    # the run's presets and config-group choices go with it (docs audit: the advice for a
    # +preset=real run left the preset out, so it would have trained the demo's settings)
    given = ["stage=evaluate", "+preset=real", "experiment=e3", "data=real_small"]
    given += ["vae.beta=4", "overwrite=true", "variant=x", "hardware.torch_threads=1"]
    assert runner.rerun_args(plain, "train", given) == (
        "stage=train experiment=e3 +preset=real data=real_small"
    )


def test_the_interrupt_advice_repeats_the_commands_own_settings():
    """After a Ctrl-C, "`... overwrite=true` starts the new run over" named a command
    without the run's dotted settings: run as written, it trained with the default beta
    (review). The advice's command keeps them (shell-quoted), never overwrite / resume."""
    cfg = compose_config(["stage=train", "experiment=x", "+preset=demo", "vae.beta=4"])
    given = [
        "stage=train",
        "experiment=x",
        "+preset=demo",
        "vae.beta=4",
        "overwrite=true",
        "pair.crop_sources=[{kind: image_folder, path: a b}]",
    ]
    assert runner.rerun_args(cfg, "train", given, settings=True) == (
        "stage=train experiment=x +preset=demo vae.beta=4 "
        "'pair.crop_sources=[{kind: image_folder, path: a b}]'"
    )
    assert runner.rerun_args(cfg, "train", given) == "stage=train experiment=x +preset=demo"


def test_the_advice_quotes_a_sweep_variant_and_a_root_with_spaces(tmp_path):
    """A sweep job's variant (vae.beta=4) and a root with spaces were written bare, and
    Hydra refused every command advised from such a run (mismatched input '='): quoted
    for Hydra inside the shell's quotes, the command parses back to the same values."""
    import shlex

    root = tmp_path / "Patient 1 (M)"
    cfg = compose_config(
        [
            "stage=train",
            "experiment=e",
            f"paths.root='{root}'",
            "variant='hardware.torch_threads=2,vae.beta=4'",
        ]
    )
    said = runner.rerun_args(cfg, "evaluate")
    again = compose_config(shlex.split(said))
    assert again.variant == "hardware.torch_threads=2,vae.beta=4"
    assert again.paths.root == str(root) and again.stage.name == "evaluate"
