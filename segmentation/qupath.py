"""Kept cells as GeoJSON objects QuPath opens on the smear or slide they came from.

A pathologist reviews a detector's cells on the image, not in a table: each kept cell's
outline (its instance mask, traced from the crop mask and put back where the crop was
cut: ``crop_x0``, ``crop_y0``, ``crop_side`` of ``cells.h5ad``) becomes one GeoJSON
``Feature`` in the image's own pixels (level 0 of a slide), with the cell id as its name,
a class (``classification``) and numbers (``measurements``) as QuPath reads them
(QuPath >= 0.3: *File > Import objects from file*, or drag the file onto the open image;
``objectType: detection``). The same files open in any GeoJSON reader (shapely,
geopandas, napari's shapes layer after flipping x/y).

Coordinates are pixel edges, as the boxes ``x0 .. y1`` are (QuPath's frame: pixel
(0, 0) covers [0, 1) x [0, 1)); the outline follows the mask at the crop's resolution
(``crop_side / S`` source px per crop px: 1-3 px on a 64 px crop of a 100-200 px cell).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# where each crop lies on its image (segmentation.cells: source px)
GEOMETRY = ("crop_x0", "crop_y0", "crop_side")


def cell_outline(
    mask: np.ndarray, crop_x0: float, crop_y0: float, crop_side: float, tolerance: float = 0.5
) -> np.ndarray | None:
    """The outline of a crop's cell, in the pixels of the image the crop was cut from.

    Parameters
    ----------
    mask : (S, S) bool, the cell's crop mask (``obsm["masks"]`` row).
    crop_x0, crop_y0 : float, source px of the crop square's top-left corner (may be
        negative: a crop padded past the image edge).
    crop_side : float, source px the crop square spans.
    tolerance : float, crop px a vertex may be dropped within
        (``skimage.measure.approximate_polygon``): a 64 px cell has ~60 vertices.

    Returns
    -------
    (K, 2) float array of (x, y) source px, a closed ring (first == last, K >= 4), or
    None when the mask is empty or the geometry unknown (NaN). A mask of several pieces
    gives the outline of its largest.
    """
    from skimage import measure

    m = np.asarray(mask, bool)
    if not m.any() or not all(math.isfinite(float(v)) for v in (crop_x0, crop_y0, crop_side)):
        return None
    s = m.shape[0]
    # padded so a cell touching the crop's edge still gives a closed contour
    contours = measure.find_contours(np.pad(m, 1).astype(np.float32), 0.5)
    if not contours:
        return None
    ring = max(contours, key=len) - 1.0  # (row, col) of pixel centres, crop px
    ring = measure.approximate_polygon(ring, tolerance)
    if len(ring) < 4:
        return None
    k = float(crop_side) / s  # source px per crop px
    # crop pixel j covers source [crop_x0 + j k, crop_x0 + (j + 1) k): its centre is
    # crop_x0 + (j + 0.5) k, in the pixel-edge frame of x0 .. x1
    x = float(crop_x0) + (ring[:, 1] + 0.5) * k
    y = float(crop_y0) + (ring[:, 0] + 0.5) * k
    out = np.stack([x, y], axis=1)
    out[-1] = out[0]
    return out


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _rgb(hex_colour: str) -> list[int]:
    h = hex_colour.lstrip("#")
    return [int(h[i : i + 2], 16) for i in (0, 2, 4)]


def cell_features(
    obs: pd.DataFrame,
    masks: np.ndarray,
    classification: str | None = None,
    colours: dict[str, str] | None = None,
    measurements: Sequence[str] = (),
    decimals: int = 2,
) -> tuple[list[dict[str, Any]], int]:
    """GeoJSON features of cells, one per row of ``obs`` with an outline.

    Parameters
    ----------
    obs : one row per cell, indexed by cell id, with :data:`GEOMETRY` (source px).
    masks : (N, S, S) bool, row i the crop mask of ``obs.iloc[i]``.
    classification : column of ``obs`` named as each cell's QuPath class; a blank or
        missing value gives a cell with no class.
    colours : class -> ``"#rrggbb"`` (``vae.analysis.palette.label_colours``), so a
        class has the colour it has in the study's figures; a class without one gets
        QuPath's own.
    measurements : numeric columns of ``obs`` listed under the cell's measurements
        (NaN ones left out: JSON has no NaN).
    decimals : rounding of coordinates, source px.

    Returns
    -------
    (features, n_without_outline): the rows with no mask or no geometry are counted,
    not written.
    """
    if len(obs) != len(masks):
        raise ValueError(f"{len(obs)} cells but {len(masks)} masks")
    missing = [c for c in GEOMETRY if c not in obs]
    if missing:
        raise ValueError(f"obs has no {', '.join(missing)}: where each crop lies is unknown")
    colours = colours or {}
    feats: list[dict[str, Any]] = []
    skipped = 0
    geo = obs[list(GEOMETRY)].to_numpy(np.float64)
    for i, cell_id in enumerate(obs.index):
        ring = cell_outline(masks[i], *geo[i])
        if ring is None:
            skipped += 1
            continue
        props: dict[str, Any] = {"objectType": "detection", "name": str(cell_id)}
        if classification is not None and classification in obs:
            v = obs[classification].iloc[i]
            name = "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
            if name:
                props["classification"] = {"name": name}
                if name in colours:
                    props["classification"]["color"] = _rgb(colours[name])
        nums = {}
        for col in measurements:
            if col in obs:
                f = _number(obs[col].iloc[i])
                if f is not None:
                    nums[col] = f
        if nums:
            props["measurements"] = nums
        coords = np.round(ring, decimals).tolist()
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [coords]},
                "properties": props,
            }
        )
    return feats, skipped


def write_feature_collection(path: str | os.PathLike, features: list[dict[str, Any]]) -> None:
    """``features`` as one GeoJSON ``FeatureCollection`` file (UTF-8, strict JSON)."""
    doc = {"type": "FeatureCollection", "features": features}
    Path(path).write_text(json.dumps(doc, allow_nan=False, ensure_ascii=False), "utf-8")


def write_image_files(
    folder: str | os.PathLike,
    obs: pd.DataFrame,
    masks: np.ndarray,
    file_of: Sequence[str],
    classification: str | None = None,
    colours: dict[str, str] | None = None,
    measurements: Sequence[str] = (),
) -> tuple[int, int]:
    """One ``<name>.geojson`` per image under ``folder``, its cells' features.

    Parameters
    ----------
    folder : created if missing.
    obs, masks, classification, colours, measurements : as :func:`cell_features`.
    file_of : for each row, the file name (without ``.geojson``; may hold ``/`` for a
        sub-folder) of its image's objects: name it as the image, so the file is
        imported into the image it describes.

    Returns
    -------
    (files written, cells without an outline).
    """
    folder = Path(folder)
    names = np.asarray(list(file_of), dtype=object)
    if len(names) != len(obs):
        raise ValueError(f"{len(obs)} cells but {len(names)} file names")
    n_files = n_skipped = 0
    # each image's rows in one pass (a comparison of every row per image was n x images)
    for name, rows in pd.Series(names).groupby(names, sort=False).indices.items():
        feats, skipped = cell_features(
            obs.iloc[rows], masks[rows], classification, colours, measurements
        )
        n_skipped += skipped
        if not feats:
            continue
        out = folder / f"{name}.geojson"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_feature_collection(out, feats)
        n_files += 1
    return n_files, n_skipped
