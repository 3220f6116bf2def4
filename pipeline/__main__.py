"""``python -m pipeline stage=NAME [key=value ...]``: the Hydra entry point."""

from __future__ import annotations

import re
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def app(cfg: DictConfig) -> int:
    from pipeline import stages

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and not cfg.variant:
        # each job of a sweep (-m vae.beta=1,4,16) gets its own sub-folder
        cfg.variant = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", hc.job.override_dirname) or str(hc.job.num)
    code = stages.main(cfg)
    if code and hc.mode != RunMode.MULTIRUN:
        sys.exit(code)
    if code:
        raise SystemExit(code)
    return code


def main() -> None:
    app()


if __name__ == "__main__":
    main()
