"""``python -m pipeline stage=NAME [key=value ...]``: the Hydra entry point."""

from __future__ import annotations

import hashlib
import re
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline import help as pipeline_help
from pipeline.config import register_configs

register_configs()
pipeline_help.register()

# settings that never name a sweep job's folder (where, how and on what it runs)
_NOT_IN_VARIANT = (
    "stage",
    "experiment",
    "overwrite",
    "resume",
    "log_level",
    "variant",
    "paths",
    "hardware",
)


def _top_level_comma(value: str) -> bool:
    depth = 0
    for ch in value:
        depth += int(ch in "[{(") - int(ch in "]})")
        if ch == "," and depth == 0:
            return True
    return False


def sweep_variant(task_overrides: list[str], argv: list[str]) -> str:
    """Folder name of one ``-m`` sweep job: the swept settings with this job's values.

    ``argv`` tells which keys were swept (``vae.beta=1,4,16``, ``range(...)``,
    ``choice(...)``); ``task_overrides`` holds this job's value of each. Paths and
    hardware never count; long names are shortened with a hash.

    >>> sweep_variant(["stage=train", "vae.beta=4", "paths.root=/tmp/x"],
    ...               ["stage=train", "vae.beta=1,4", "paths.root=/tmp/x"])
    'vae.beta=4'
    """
    swept = set()
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        if _top_level_comma(value) or re.match(r"(range|choice|glob|interval)\(", value):
            swept.add(key.lstrip("+~"))
    pairs = []
    for o in task_overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key.split(".")[0] in _NOT_IN_VARIANT or (swept and key not in swept):
            continue
        pairs.append(f"{key}={value}")
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", ",".join(sorted(pairs)))
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def app(cfg: DictConfig) -> int:
    from pipeline import runner

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and not cfg.variant:
        # each job of a sweep (-m vae.beta=1,4,16) gets its own sub-folder
        cfg.variant = sweep_variant(list(hc.overrides.task), sys.argv[1:]) or str(hc.job.num)
    code = runner.main(cfg)
    if code and hc.mode != RunMode.MULTIRUN:
        sys.exit(code)
    if code:
        raise SystemExit(code)
    return code


HELP_FLAGS = ("--help", "-h", "--hydra-help")


def main() -> None:
    from pipeline.config import unknown_addition
    from pipeline.names import check_argv

    bad = check_argv(sys.argv[1:]) or unknown_addition(sys.argv[1:])
    if bad:  # before Hydra creates <paths.root>/<experiment>/.hydra
        print(f"error: {bad}", file=sys.stderr)
        sys.exit(2)
    # `stage` is mandatory for a run, but --help must work without it: Hydra composes the
    # config to print the help, so give it a stage (the help text does not depend on it)
    args = sys.argv[1:]
    if any(a in HELP_FLAGS for a in args) and not any(
        a.lstrip("+~").startswith("stage=") for a in args
    ):
        # next to the other overrides: argparse takes them as one block of positionals
        at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), None)
        sys.argv.insert(1 + (len(args) if at is None else at), "stage=all")
    if not any(a in HELP_FLAGS for a in args):
        app()
        return
    # Hydra reports a bad override of a run in one message, but its --help path lets the
    # exception through: say it the same way
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        app()
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
