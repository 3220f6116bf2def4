"""The cell table and ``cells.h5ad`` of stage=segment, from the per-rank parts.

Each rank of the segment stage returns a *part* (per image: a detection table
and the kept crops / masks); :func:`merge_parts` puts them back in image order,
:func:`truth_summary` scores them against ground truth and :func:`cells_adata`
builds the artifact (keys: docs/artifacts.md, section *segment*).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from segmentation.cells import SegmentSettings
from segmentation.crops import FLAGS
from segmentation.schema import (
    CELL_DIAMETER,
    EDGE_WEIGHT,
    TRUTH_NUMERIC_FIELDS,
    TRUTH_TEXT_FIELDS,
)


def merge_parts(
    parts: list[dict[str, Any]], crop_size: int, with_truth: bool
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    """``(table, kept, crops, masks)`` of all parts, images in their listed order."""
    s = crop_size
    # each part's tables and crops are in its own image order; put images back in order
    rows, crop_list, mask_list = [], [], []
    for p in parts:
        start = 0
        for tab in p["tables"]:
            k = int(tab.kept.sum())
            rows.append(tab)
            crop_list.append(p["crops"][start : start + k])
            mask_list.append(p["masks"][start : start + k])
            start += k
    order = np.argsort(
        [int(t.image_index.iloc[0]) if len(t) else 10**9 for t in rows], kind="stable"
    )
    tabs = [rows[i] for i in order if len(rows[i])]
    table = pd.concat(tabs, ignore_index=True) if tabs else empty_table(with_truth)
    crops = [crop_list[i] for i in order]
    masks = [mask_list[i] for i in order]
    crops = np.concatenate(crops) if crops else np.zeros((0, s, s, 3), np.uint8)
    masks = np.concatenate(masks) if masks else np.zeros((0, s, s), bool)
    if table.cell_id.duplicated().any():  # same stem, different suffix (a.png, a.jpg)
        table["cell_id"] = [f"i{i:05d}_{c}" for i, c in zip(table.image_index, table.cell_id)]
    kept = table[table.kept].copy()
    assert len(kept) == len(crops), (len(kept), len(crops))
    return table, kept, crops, masks


def run_summary(
    parts: list[dict[str, Any]],
    table: pd.DataFrame,
    kept: pd.DataFrame,
    n_listed: int,
    smears: Any,
    ann: Any,
) -> tuple[pd.DataFrame, dict[str, int], dict[str, Any]]:
    """Rejects table, filter counts and ``summary.json`` body of one segment run.

    ``parts``: the per-rank results (``rejects``, ``n_images``, ``seconds``,
    ``n_truth``, ``model_args``); ``table``/``kept``: all detections and the
    kept cells (:func:`merge_parts`); ``n_listed``: images listed; ``smears`` /
    ``ann``: the input folder and annotations path (None without truth).
    """
    rejects = pd.DataFrame(
        ordered_rejects(parts, table),
        columns=["image", "action", "reason", "cell_id", "detail"],
    )
    counts = {"images": n_listed, "images_read": int(sum(p["n_images"] for p in parts))}
    counts["detections"] = len(table)
    for f in FLAGS:
        counts[f] = int(table[f].sum()) if len(table) else 0
    counts["kept"] = len(kept)
    summary: dict[str, Any] = {
        "filter_counts": counts,
        "seconds_inference": round(sum(p["seconds"] for p in parts), 3),
        "images_per_second": round(
            counts["images_read"] / max(1e-9, max(p["seconds"] for p in parts)), 4
        ),
        "smears": str(smears),
        "annotations": str(ann) if ann else None,
        "model_args": parts[0]["model_args"],
    }
    if ann is not None and "truth_cell_id" in table:
        summary["truth"] = truth_summary(table, kept, int(sum(p["n_truth"] for p in parts)))
    return rejects, counts, summary


def image_order(parts: list[dict[str, Any]], table: pd.DataFrame) -> dict[str, tuple[int, str]]:
    """Sort key per image name: its place in the run's image list.

    The detection ``table`` gives the index of every image with a detection; an image
    without one (unreadable, or nothing found) sorts by name among them, which is the
    listing's own order (``list_images`` sorts a folder by name).
    """
    known: dict[str, int] = {}
    if len(table) and "image_index" in table:
        known = dict(zip(table["image"].astype(str), table["image_index"].astype(int)))
    names = {str(r["image"]) for p in parts for r in p["rejects"]} | set(known)
    # the names in listing order; an unknown one goes before the next known index
    out: dict[str, tuple[int, str]] = {}
    nxt = None
    for name in sorted(names, reverse=True):
        if name in known:
            nxt = known[name]
        out[name] = (known.get(name, nxt if nxt is not None else 10**9), name)
    return out


def ordered_rejects(parts: list[dict[str, Any]], table: pd.DataFrame) -> list[dict[str, Any]]:
    """The parts' ``rejects`` rows in the images' global order.

    Each rank lists its own images' rows; concatenated rank by rank they came out
    grouped by rank, so ``rejects.csv`` changed with ``hardware.num_processes``. Sorted
    by image (stable: an image's rows keep their order), every layout gives the rows of
    a one-process run.
    """
    order = image_order(parts, table)
    rows = [r for p in parts for r in p["rejects"]]
    return sorted(rows, key=lambda r: order[str(r["image"])])


def truth_summary(table: pd.DataFrame, kept: pd.DataFrame, n_truth: int) -> dict[str, Any]:
    """Recall / precision at the score threshold and match quality of the kept cells."""
    scored = table[~table.low_score]
    matched = int((scored.truth_cell_id != "").sum())
    return {
        "n_truth": n_truth,
        "n_scored_detections": len(scored),
        "matched": matched,
        "recall_at_score_threshold": matched / n_truth if n_truth else None,
        "precision_at_score_threshold": matched / len(scored) if len(scored) else None,
        "kept_with_truth": int((kept.truth_cell_id != "").sum()),
        "mean_match_iou_kept": float(kept.match_iou[kept.truth_cell_id != ""].mean())
        if (kept.truth_cell_id != "").any()
        else None,
    }


def cells_adata(
    kept: pd.DataFrame,
    crops: np.ndarray,
    masks: np.ndarray,
    settings: SegmentSettings,
    counts: dict[str, int],
    source: str,
):
    """The ``cells.h5ad`` AnnData: one row per kept cell, crops and masks in obsm."""
    import anndata as ad

    return ad.AnnData(
        obs=obs_frame(kept),
        obsm={"crops": crops, "masks": masks},
        uns={
            "crop_size": settings.crop_size,
            "background_value": settings.background_value,
            "input_scale": settings.input_scale,
            "filter_counts": counts,
            "filters": {
                k: ("none" if v is None else v) for k, v in settings.filters.__dict__.items()
            },
            "source": source,
        },
    )


def specimen_ids(images, group: str, pattern: str | None = None) -> list[str]:
    """``"<group>:<id>"`` per image name: the first match of ``pattern``, else the stem.

    Cells with the same id come from the same specimen image (for instance a
    smear and a crop cut from it), so a split by specimen keeps them together.

    Parameters
    ----------
    images : iterable of str
        Image file names or relative paths (``"Neutrophil/BloodImage_00008_1.jpg"``).
    group : str
        Prefix shared by the sources that image the same specimens.
    pattern : str, optional
        Python regex; rows where it does not match fall back to the stem.
    """
    import re
    from pathlib import PurePath

    rx = re.compile(pattern) if pattern else None
    out = []
    for name in images:
        name = str(name)
        m = rx.search(name) if rx else None
        out.append(f"{group}:{m.group(0) if m else PurePath(name).stem}")
    return out


def obs_frame(table: pd.DataFrame) -> pd.DataFrame:
    obs = table.drop(columns=["kept"]).set_index("cell_id")
    obs.index = obs.index.astype(str)
    obs.index.name = None
    for col in ("image", "kind", "lineage", "truth_cell_id"):
        if col in obs:
            obs[col] = obs[col].astype(str)
    return obs


def empty_table(with_truth: bool) -> pd.DataFrame:
    cols: dict[str, Any] = {
        "cell_id": pd.Series([], dtype=str),
        "image_index": pd.Series([], dtype=np.int64),
        "image": pd.Series([], dtype=str),
    }
    for c in ("x0", "y0", "x1", "y1", "score"):
        cols[c] = pd.Series([], dtype=np.float32)
    cols["area"] = pd.Series([], dtype=np.int64)
    cols[CELL_DIAMETER] = pd.Series([], dtype=np.float64)
    cols["n_pieces"] = pd.Series([], dtype=np.int64)
    cols["max_overlap_iou"] = pd.Series([], dtype=np.float64)
    cols["tile_fragment"] = pd.Series([], dtype=bool)
    for f in FLAGS:
        cols[f] = pd.Series([], dtype=bool)
    cols["kept"] = pd.Series([], dtype=bool)
    cols[EDGE_WEIGHT] = pd.Series([], dtype=np.float64)
    if with_truth:
        cols["truth_cell_id"] = pd.Series([], dtype=str)
        for c in TRUTH_TEXT_FIELDS:
            cols[c] = pd.Series([], dtype=str)
        for c in (*TRUTH_NUMERIC_FIELDS, "match_iou"):
            cols[c] = pd.Series([], dtype=np.float64)
    cols["crop_scale"] = pd.Series([], dtype=np.float64)
    for c in ("crop_x0", "crop_y0", "crop_side"):
        cols[c] = pd.Series([], dtype=np.float64)
    cols["mask_label"] = pd.Series([], dtype=np.int64)
    return pd.DataFrame(cols)
