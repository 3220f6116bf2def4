"""Synthetic blood smears and paired single-cell expression with known ground truth.

A library package with typed arguments (no config access):

- :mod:`.morphology`: white-cell kinds, the neutrophil maturation axis t and
  the morphology of a cell as a function of (kind, t).
- :mod:`.render`: smear rendering (red cells, platelets, white cells, stain,
  illumination) in optical-density space.
- :mod:`.expression`: gene programs and negative-binomial counts.
- :mod:`.dataset`: one image + its cells' expression; COCO, truth table and
  AnnData writers.

``stage=simulate`` (pipeline/stage_simulate.py) drives it from the config.
"""

from pipeline.simulator.dataset import (
    SimulatedImage,
    SimulatorParams,
    SimulatorSettingError,
    WriteSummary,
    assign_splits,
    simulate_image,
    write_dataset,
)
from pipeline.simulator.expression import GenePanel, make_gene_panel, simulate_counts
from pipeline.simulator.morphology import KINDS, LINEAGE_KINDS, OTHER_KINDS, morphology, stage_of
from pipeline.simulator.render import SmearParams, render_smear

__all__ = [
    "KINDS",
    "LINEAGE_KINDS",
    "OTHER_KINDS",
    "GenePanel",
    "SimulatedImage",
    "SimulatorParams",
    "SimulatorSettingError",
    "SmearParams",
    "WriteSummary",
    "assign_splits",
    "make_gene_panel",
    "morphology",
    "render_smear",
    "simulate_counts",
    "simulate_image",
    "stage_of",
    "write_dataset",
]
