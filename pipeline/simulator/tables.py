"""The simulator's tables: one row per white cell (truth) and the raw expression AnnData."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.simulator.expression import (
    GenePanel,
)
from segmentation.schema import TRUTH_FIELDS

if TYPE_CHECKING:  # dataset.py imports this module
    from pipeline.simulator.dataset import SimulatorParams

TRUTH_COLUMNS = [
    "cell_id",
    "image",
    "image_id",
    "annotation_id",
    "split",
    "kind",
    "lineage",
    "t",
    "granule_density",
    "azurophilic_density",
    "azurophilic_granules",
    "specific_density",
    "eosinophilic_density",
    "lobes",
    "diameter",
    "truncated",
    "area",
    "nucleus_area",
    "bbox_x",
    "bbox_y",
    "bbox_w",
    "bbox_h",
]


def truth_table(
    images: Iterable[dict[str, Any]], annotations: list[dict[str, Any]]
) -> pd.DataFrame:
    """One row per white cell (columns :data:`TRUTH_COLUMNS`)."""
    by_id = {im["id"]: im for im in images}
    rows = []
    for a in annotations:
        im = by_id[a["image_id"]]
        x, y, w, h = a["bbox"]
        rows.append(
            {
                "cell_id": a["cell_id"],
                "image": im["file_name"],
                "image_id": a["image_id"],
                "annotation_id": a["id"],
                "split": im["split"],
                "kind": a["kind"],
                "lineage": a["lineage"],
                "t": np.nan if a["t"] is None else a["t"],
                "granule_density": a["granule_density"],
                "azurophilic_density": a["azurophilic_density"],
                # older simulate outputs lack the drawn count
                "azurophilic_granules": a.get("azurophilic_granules", np.nan),
                "specific_density": a["specific_density"],
                "eosinophilic_density": a["eosinophilic_density"],
                "lobes": a["lobes"],
                "diameter": a["diameter"],
                "truncated": a["truncated"],
                "area": a["area"],
                "nucleus_area": a["nucleus_area"],
                "bbox_x": x,
                "bbox_y": y,
                "bbox_w": w,
                "bbox_h": h,
            }
        )
    return pd.DataFrame(rows, columns=TRUTH_COLUMNS)


def expression_anndata(
    table: pd.DataFrame, counts: np.ndarray, panel: GenePanel, params: SimulatorParams
):
    """AnnData of raw counts: obs = ground truth (index ``cell_id``), var = genes."""
    import anndata as ad

    obs = table.set_index("cell_id")[
        [
            *TRUTH_FIELDS,
            "image",
            "split",
            "truncated",
            "azurophilic_density",
            "specific_density",
            "eosinophilic_density",
        ]
    ].copy()
    obs.index = obs.index.astype(str)
    obs.index.name = None
    obs["t"] = obs["t"].astype(np.float64)
    obs["truncated"] = obs["truncated"].astype(bool)
    var = pd.DataFrame(
        {"program": pd.Categorical(panel.program)}, index=[str(g) for g in panel.genes]
    )
    x = counts.astype(np.float32)
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.layers["counts"] = x.copy()
    adata.uns["programs"] = panel.programs()
    adata.uns["simulator"] = json.loads(json.dumps(asdict(params), default=list))
    return adata
