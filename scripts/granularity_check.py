"""Which instrument reads granularity on real crops: the granule count, GLCM, the grain.

The granule counter (:func:`vae.analysis.granules.detect_granules`) was built and tuned on
the simulator, whose granules are sharp dots. On real smears a haematologist's granular
cells are the eosinophils and basophils (coarse granules visible at any magnification);
lymphocytes, monocytes and mature neutrophils (fine specific granules below a 64 px
crop's resolution) read as smooth. This check measures every labelled crop of a table
(:func:`vae.analysis.granules.measure_batch`, the features the traverse and the report
use) and scores, per image source, how well each feature ranks the granular classes above
the others: the area under the ROC curve (0.5: no signal; under 0.5: the wrong way).

    .venv/bin/python scripts/granularity_check.py outputs/real/pair/paired.h5ad \\
        [--granular eosinophil,basophil] [--out granularity.json]

The counter and the grain run with their default settings (``GranuleParams()``, tuned
on 64 px crops), not a study's ``analysis.granule_*`` overrides. Reads
``obsm['crops']`` / ``obsm['masks']`` of the rows with a crop (``obs['has_image']``
when present), the class from ``--label-key`` (default ``image_label``, the paired
table's), the source from ``--source-key`` (default ``image_source``); a crop paired with
several expression rows (``obs['image_ref']``) is measured once. Prints two tables (class
means per source; AUC per source) and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae.inputs.schema import known_labels  # noqa: E402

# the features compared: the count and density of the counter, GLCM contrast and the grain
# of the cytoplasm (vae.analysis.granules.FEATURES holds all of them)
COMPARED = ("granule_count", "granule_density", "glcm_contrast", "cytoplasm_grain")
POOLED = "(all sources)"  # the entry over every source together


def labelled_crops(adata, label_key: str, source_key: str):
    """(crops (n, S, S, 3) uint8, masks (n, S, S) bool, labels (n,), sources (n,)) of the
    labelled rows with a crop (unknown labels: ``vae.inputs.schema.UNKNOWN_LABELS``), each
    crop once."""
    obs = adata.obs
    if label_key not in obs:
        raise SystemExit(
            f"granularity_check: obs['{label_key}'] is missing (the class of each crop); "
            f"columns: {', '.join(map(str, obs.columns[:20]))}"
        )
    for key in ("crops", "masks"):
        if key not in adata.obsm:
            raise SystemExit(f"granularity_check: obsm['{key}'] is missing: no crops to measure")
    keep = np.ones(len(obs), dtype=bool)
    if "has_image" in obs:
        keep &= obs["has_image"].to_numpy(bool)
    labels = obs[label_key].astype(object).where(obs[label_key].notna(), "").astype(str)
    labels = labels.str.strip()
    keep &= known_labels(labels.to_numpy())
    rows = np.flatnonzero(keep)
    if "image_ref" in obs:  # one crop paired with several expression rows: measured once
        ref = obs["image_ref"].astype(object).iloc[rows]
        named = ref.notna().to_numpy() & (ref.astype(str).str.strip() != "").to_numpy()
        rows = rows[~(named & ref.astype(str).duplicated().to_numpy())]  # no name: its own crop
    crops = np.asarray(adata.obsm["crops"][rows])
    masks = np.asarray(adata.obsm["masks"][rows])
    if crops.ndim == 4 and crops.shape[1] == 3:  # (n, 3, S, S) -> (n, S, S, 3)
        crops = crops.transpose(0, 2, 3, 1)
    if masks.ndim == 4:
        masks = masks[:, 0] if masks.shape[1] == 1 else masks[..., 0]
    if masks.dtype != bool:  # soft masks: the cell where the probability passes 0.5
        masks = masks > 0.5
    if crops.dtype != np.uint8:
        crops = np.clip(np.rint(crops.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    sources = (
        obs[source_key].astype(str).to_numpy()[rows]
        if source_key in obs
        else np.full(rows.size, POOLED, dtype=object)  # one source: the pooled entry only
    )
    return crops, masks, labels.to_numpy()[rows], sources


def auc(scores: np.ndarray, positive: np.ndarray) -> tuple[float, int]:
    """(area under the ROC curve of ``scores`` for ``positive``, crops left out).

    A crop whose score is undefined (NaN: e.g. a cytoplasm under 10 px for the grain) is
    left out, not ranked as the smoothest (as the project's correlations drop NaN pairs);
    the AUC is NaN when one side is empty after that.
    """
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    ok = np.isfinite(scores)
    pos = positive[ok]
    if pos.all() or not pos.any():
        return float("nan"), int((~ok).sum())
    return float(roc_auc_score(pos, scores[ok])), int((~ok).sum())


def check(adata, granular: list[str], label_key: str, source_key: str) -> dict:
    """Class means, AUCs and crops left out per source, and over all sources (:data:`POOLED`)."""
    from vae.analysis import granules as G

    crops, masks, labels, sources = labelled_crops(adata, label_key, source_key)
    if not len(crops):
        raise SystemExit("granularity_check: no labelled crop in the table")
    feats = G.measure_batch(crops, masks)[list(COMPARED)]
    feats["label"], feats["source"] = labels, sources
    gran = {g.lower() for g in granular}
    out = {"granular": sorted(gran), "n_crops": int(len(feats)), "sources": {}}
    for src in [POOLED, *sorted(set(sources) - {POOLED})]:
        sub = feats if src == POOLED else feats[feats["source"] == src]
        pos = sub["label"].str.lower().isin(gran).to_numpy()
        scored = {f: auc(sub[f].to_numpy(float), pos) for f in COMPARED}
        out["sources"][src] = {
            "n": {k: int(v) for k, v in sub["label"].value_counts().sort_index().items()},
            # class means over the crops where the feature is defined
            "means": {
                f: {k: _num(v) for k, v in sub.groupby("label")[f].mean().items()} for f in COMPARED
            },
            "auc": {f: _num(a) for f, (a, _) in scored.items()},
            "undefined": {f: n for f, (_, n) in scored.items()},
        }
    return out


def _num(v) -> float | None:
    """A float for the JSON; None (null) where undefined."""
    v = float(v)
    return v if np.isfinite(v) else None


def print_tables(res: dict) -> None:
    print(
        f"{res['n_crops']} labelled crops; AUC of {' + '.join(res['granular'])} "
        "against the other classes (0.5: no signal)"
    )
    print(f"{'source':<20} {'n granular / other':>19} " + " ".join(f"{f:>16}" for f in COMPARED))
    for src, r in res["sources"].items():
        n_pos = sum(v for k, v in r["n"].items() if k.lower() in res["granular"])
        n_all = sum(r["n"].values())
        cells = " ".join(f"{_fmt(r['auc'][f]):>16}" for f in COMPARED)
        print(f"{src:<20} {f'{n_pos} / {n_all - n_pos}':>19} {cells}")
    left = {f: res["sources"][POOLED]["undefined"][f] for f in COMPARED}
    if any(left.values()):
        print(
            "crops left out where a feature is undefined: "
            + ", ".join(f"{f} {n}" for f, n in left.items() if n)
        )
    print("\nclass means per source")
    for src, r in res["sources"].items():
        if src == POOLED:
            continue
        for lab in r["n"]:
            vals = " ".join(f"{_fmt(r['means'][f].get(lab)):>16}" for f in COMPARED)
            print(f"{src:<20} {lab:<12} {r['n'][lab]:>6} {vals}")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", help="an h5ad with obsm crops / masks and a class column")
    ap.add_argument("--granular", default="eosinophil,basophil")
    ap.add_argument("--label-key", default="image_label")
    ap.add_argument("--source-key", default="image_source")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    a = ap.parse_args(argv)
    import anndata as ad

    path = Path(a.table)
    if not path.is_file():
        raise SystemExit(f"granularity_check: {path}: no such file")
    res = check(
        ad.read_h5ad(path), [g for g in a.granular.split(",") if g], a.label_key, a.source_key
    )
    res["table"] = str(path)
    print_tables(res)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, allow_nan=False) + "\n")
    return res


if __name__ == "__main__":
    main()
