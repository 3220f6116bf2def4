"""A comma list without -m (a user audit): ``stage=train,evaluate`` was told to quote
its value, which then failed as "Could not find 'stage/train,evaluate'"; ``vae.beta=1,4``
likewise, which then failed a Float conversion. And ``-m stage=train,evaluate`` wrote
train into ``train/0/``, where evaluate did not look."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.run import FAST_ANALYSIS, TINY_MODEL, run_pipeline
from tests.helpers.vae_toy import make_paired

STAGES = (
    "error: stage=train,evaluate: one stage per run: stage=all runs the whole chain, or add "
    "-m to run the stages one after another (python -m pipeline -m stage=train,evaluate ...)"
)


@pytest.mark.parametrize(
    "arg, want",
    [
        ("stage=train,evaluate", STAGES),
        ("stage='train,evaluate'", STAGES),
        (
            "vae.beta=1,4",
            "error: vae.beta=1,4: several values in one run; to run one job per value, add -m "
            "(a sweep): python -m pipeline -m ... vae.beta=1,4",
        ),
        (
            "vae.channels=16,32",
            "error: vae.channels=16,32: a list setting; give its values in brackets: "
            "vae.channels=[16,32]",
        ),
        (
            "vae.beta='1,4'",
            "error: vae.beta='1,4': Value '1,4' of type 'str' could not be converted to Float; "
            "to run one job per value, add -m (a sweep) and leave out the quotes: python -m "
            "pipeline -m ... vae.beta=1,4",
        ),
    ],
)
def test_a_comma_list_without_m_says_one_run_each_or_add_m(tmp_path: Path, arg: str, want: str):
    args = [arg, f"paths.root={tmp_path}", "experiment=x"]
    if not arg.startswith("stage"):
        args.insert(0, "stage=train")
    p = run_pipeline(args)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [want]
    assert not list(tmp_path.iterdir())  # nothing made


def test_a_path_with_a_comma_is_still_told_to_quote():
    from hydra.errors import ConfigCompositionException

    from pipeline.__main__ import config_error_line

    e = ConfigCompositionException(
        "Ambiguous value for argument 'paths.root=/d/a,b'\n"
        "3. To sweep over it, add --multirun to your command line"
    )
    assert config_error_line(e).endswith("must be quoted: \"paths.root='/d/a,b'\"")


@pytest.mark.slow
def test_a_sweep_over_stages_alone_chains_them_in_one_folder(tmp_path: Path):
    make_paired(48, image_only=6, expression_only=6).write_h5ad(tmp_path / "paired.h5ad")
    p = run_pipeline(
        [
            "-m",
            "stage=train,evaluate",
            "experiment=s",
            f"paths.root={tmp_path / 'out'}",
            f"paths.inputs.paired={tmp_path / 'paired.h5ad'}",
            *TINY_MODEL,
            "vae.n_private=0",
            "trainer.max_epochs=1",
            *FAST_ANALYSIS,
        ]
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out" / "s"
    assert (out / "train" / "latent.h5ad").exists()  # not train/0/
    assert (out / "evaluate" / "metrics.json").exists()
