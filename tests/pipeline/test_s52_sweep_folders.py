"""-m sweeps: two jobs never write one folder (a user audit: a sweep that also varied
hardware.torch_threads overwrote its own results), a sweep over stages alone needs no
variant folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.run import run_pipeline
from tests.helpers.vae_toy import make_paired

TINY = [
    "vae.channels=[8,16]",
    "vae.hidden=[16]",
    "vae.n_latent=4",
    "vae.n_private=0",
    "vae.kl_warmup_epochs=1",
    "trainer.batch_size=16",
    "trainer.max_minutes=null",
    "trainer.max_epochs=1",
]


def test_a_swept_hardware_or_paths_key_names_the_folder():
    from pipeline.__main__ import sweep_variant

    argv = ["-m", "stage=train", "vae.beta=1,4", "hardware.torch_threads=1,2", "paths.root=/r"]
    names = {
        sweep_variant(
            ["stage=train", f"vae.beta={b}", f"hardware.torch_threads={t}", "paths.root=/r"], argv
        )
        for b in (1, 4)
        for t in (1, 2)
    }
    assert names == {
        "hardware.torch_threads=1,vae.beta=1",
        "hardware.torch_threads=2,vae.beta=1",
        "hardware.torch_threads=1,vae.beta=4",
        "hardware.torch_threads=2,vae.beta=4",
    }
    argv = ["-m", "stage=train", "paths.inputs.paired=a.h5ad,b.h5ad"]
    assert sweep_variant(["stage=train", "paths.inputs.paired=b.h5ad"], argv) == (
        "paths.inputs.paired=b.h5ad"
    )
    # unswept hardware / paths still never name it; a swept stage, experiment or root
    # gives the job its own folder: no variant (evaluate reads train's beta=4 folder)
    argv = ["-m", "stage=train,evaluate", "experiment=a,b", "vae.beta=1,4", "hardware.devices=[0]"]
    task = ["stage=evaluate", "experiment=b", "vae.beta=4", "hardware.devices=[0]"]
    assert sweep_variant(task, argv) == "vae.beta=4"
    assert sweep_variant(["stage=evaluate"], ["-m", "stage=train,evaluate"]) == ""


def test_the_sweep_checks_find_jobs_that_share_a_folder():
    from pipeline.__main__ import sweep_collision, sweep_jobs

    argv = ["-m", "stage=train", "vae.beta=1,4", "hardware.torch_threads=1,2"]
    assert len(sweep_jobs(argv)) == 4
    assert sweep_collision(argv) is None
    assert sweep_collision(["-m", "stage=train,evaluate", "vae.beta=1,4"]) is None
    said = sweep_collision(["-m", "stage=train", "vae.beta=1,1"])
    assert said is not None and "jobs #0 (stage=train vae.beta=1) and #1" in said
    assert "train/vae.beta=1" in said and "given twice" in said
    said = sweep_collision(["-m", "stage=train", "variant=x", "vae.beta=1,4"])
    assert said is not None and "variant= names one folder" in said
    said = sweep_collision(["-m", "stage=train", "+pair.label_map.x='a b','a#b'"])
    assert said is not None and "pair.label_map.x" in said


def test_a_sweep_whose_jobs_share_a_folder_is_refused_before_any_job(tmp_path: Path):
    p = run_pipeline(
        ["-m", "stage=train", f"paths.root={tmp_path / 'out'}", "experiment=e", "vae.beta=1,1"]
    )
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "would write the same folder" in err[0], p.stderr[-2000:]
    assert not (tmp_path / "out" / "e" / "train").exists()
    # Hydra's sweep folder of the refused sweep is removed again
    assert not list((tmp_path / "out").rglob("multirun.yaml"))


@pytest.mark.slow
def test_a_sweep_of_torch_threads_keeps_both_results(tmp_path: Path):
    make_paired(48, image_only=6, expression_only=6).write_h5ad(tmp_path / "paired.h5ad")
    p = run_pipeline(
        [
            "-m",
            "stage=train",
            "experiment=s",
            f"paths.root={tmp_path / 'out'}",
            f"paths.inputs.paired={tmp_path / 'paired.h5ad'}",
            *TINY,
            "hardware.torch_threads=1,2",
            "overwrite=true",
        ]
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = tmp_path / "out" / "s" / "train"
    subs = sorted(q.name for q in d.iterdir() if q.is_dir())
    assert subs == ["hardware.torch_threads=1", "hardware.torch_threads=2"], subs
    for s in subs:
        assert (d / s / "model.pt").exists()


def test_a_sweep_over_presets_with_one_variant_writes_one_folder_per_preset():
    """+preset=real,demo variant=x writes real/train/x and demo/train/x (each preset sets
    its experiment); the check read experiment from the command line only and refused it."""
    from pipeline.__main__ import sweep_collision

    assert sweep_collision(["-m", "stage=train", "+preset=real,demo", "variant=x"]) is None
    # an experiment given beside the presets names one folder for both: still refused
    said = sweep_collision(["-m", "stage=train", "+preset=real,demo", "variant=x", "experiment=e"])
    assert said is not None and "e/train/x" in said
