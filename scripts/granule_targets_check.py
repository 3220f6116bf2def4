"""Where decoded granules are lost: the layer's count -> the centres drawn -> the counter.

Two measurements behind ``pair.granule_centres`` (docs/vae.md, "Granule targets at the
crop's own resolution"), on a simulator run (truth in ``obs``):

1. ``--cells CELLS``: the granule counter (:func:`vae.analysis.granules.measure_batch`) on
   each neutrophil-lineage cell's ``stage=segment`` crop as cut (``cells.h5ad``, 128 px)
   and on the same cell's paired crop (``paired.h5ad``, halved to 64 px), against the
   true azurophilic density and the granules the simulator drew, with the mean count
   per kind.
2. ``RUN`` (a ``stage=train`` folder): for the test split's lineage cells, Spearman with
   the truth of the granule layer's count (sum of its rate map), of the centres
   :func:`vae.model.render_granules` draws (rate over the even threshold field, inside
   the decoded mask), and of the counter on the drawn cells; one row per cell with t,
   the counts and the layer's granule stain.

    .venv/bin/python scripts/granule_targets_check.py outputs/demo/train \\
        --paired outputs/demo/pair/paired.h5ad --cells outputs/demo/segment/cells.h5ad \\
        [--out granule_targets.json]
    # real smears (no truth): granules the counter finds per class, as cut and halved
    .venv/bin/python scripts/granule_targets_check.py --real-cells outputs/real/segment/cells.h5ad

Prints tables; ``--out`` writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rho(x, y) -> float:
    from scipy import stats

    return float(stats.spearmanr(x, y)[0])


def _lineage(obs) -> np.ndarray:
    """(n,) bool: neutrophil-lineage rows with a crop and a true t."""
    return (
        obs["has_image"].to_numpy(bool)
        & obs["lineage"].astype(str).eq("neutrophil").to_numpy()
        & np.isfinite(obs["t"].to_numpy(float))
    )


def _truth(obs):
    """(true azurophilic density, drawn granule density) of ``obs``'s rows."""
    from pipeline.simulator.morphology import azurophilic_density, drawn_granule_density

    azu = np.array([azurophilic_density(v) for v in obs["t"].to_numpy(float)])
    drawn = drawn_granule_density(
        obs["azurophilic_granules"].to_numpy(float), obs["diameter"].to_numpy(float)
    )
    return azu, drawn


def source_vs_paired(paired, cells) -> dict:
    """The counter on the crops as cut vs on the paired (resized) crops, lineage rows."""
    import pandas as pd

    from vae.analysis import granules as G

    o = paired.obs
    rows = np.flatnonzero(_lineage(o))
    idx = cells.obs_names.get_indexer(o["image_ref"].astype(str).to_numpy()[rows])
    rows, idx = rows[idx >= 0], idx[idx >= 0]
    azu, drawn = _truth(o.iloc[rows])
    src_crops = np.asarray(cells.obsm["crops"])[idx].copy()
    src_masks = np.asarray(cells.obsm["masks"])[idx].astype(bool)
    src_crops[~src_masks] = 0  # as stage=pair cuts it
    # the ids of stage=segment name cells by detection order: another run's cells.h5ad
    # holds other cells under the same names, which would be compared silently; a cell's
    # crop resized as stage=pair does is its paired crop
    from vae.inputs.pairing import resize_crop

    pc = np.asarray(paired.obsm["crops"])[rows].astype(float)
    side = pc.shape[1]
    diff = [
        np.abs(resize_crop(c, m, side)[0].astype(float) - p).mean()
        for c, m, p in zip(src_crops, src_masks, pc)
    ]
    if float(np.median(diff)) > 2.0:
        raise SystemExit(
            f"--cells: its crops resized are not the paired crops (median |difference| "
            f"{np.median(diff):.1f} grey levels): give the cells.h5ad this paired.h5ad was made from"
        )
    out: dict = {"n": int(rows.size)}
    kinds = o["kind"].astype(str).to_numpy()[rows]
    counts = {}
    for name, crops, masks in (
        ("source", src_crops, src_masks),
        ("paired", np.asarray(paired.obsm["crops"])[rows], np.asarray(paired.obsm["masks"])[rows]),
    ):
        f = G.measure_batch(crops, masks.astype(bool), G.GranuleParams())
        d = f["granule_density"].to_numpy(float)
        out[name] = {
            "side_px": int(crops.shape[1]),
            "vs_true_azurophilic": _rho(d, azu),
            "vs_drawn": _rho(d, drawn),
        }
        counts[name] = f["granule_count"].to_numpy(float)
    table = (
        pd.DataFrame(
            {
                "source": counts["source"],
                "paired": counts["paired"],
                "drawn": o["azurophilic_granules"].to_numpy(float)[rows],
            }
        )
        .groupby(kinds)
        .mean()
    )
    out["mean_count_per_kind"] = table.round(2).to_dict(orient="index")
    return out


def decoded_chain(run: Path, paired) -> dict:
    """Layer count, drawn centres and the counter's reading on the test lineage cells."""
    import pandas as pd
    import torch

    from vae.analysis import granules as G
    from vae.checkpoint import load_model
    from vae.data import from_anndata
    from vae.infer import encode_dataset
    from vae.model import granule_field

    model, _ = load_model(run / "model.pt")
    if not getattr(model.args, "granule_head", False):
        raise SystemExit(f"{run}/model.pt has no granule layer")
    from vae.analysis.run import read_split

    split = read_split(run / "split.csv").reindex(paired.obs_names)
    o = paired.obs
    rows = np.flatnonzero(_lineage(o) & (split.astype(str).to_numpy() == "test"))
    data = from_anndata(paired, image_size=model.args.crop_size)
    dec = encode_dataset(model, data, rows=rows, decode=True).decoded
    z = encode_dataset(model, data, rows=rows, views=1).joint
    with torch.no_grad():
        d = model.decode(torch.from_numpy(z.astype(np.float32)))
    rate = d.granule_rate  # (n, 1, S, S) per 100 px^2
    s = rate.shape[-1]
    inside = torch.from_numpy(dec.mask.astype(np.float32))[:, None] > 0.5
    # render_granules' rule with the seed decode(render=True) uses (0)
    centres = ((granule_field(s, 0).view(1, 1, s, s) < rate / 100) & inside).sum((1, 2, 3))
    f = G.measure_batch(dec.rec_image * dec.mask[..., None], dec.mask, G.GranuleParams())
    azu, drawn = _truth(o.iloc[rows])
    steps = {
        "layer_count": (rate * inside).sum((1, 2, 3)).numpy() / 100.0,
        "drawn_centres": centres.numpy().astype(float),
        "counter_on_decoded": f["granule_density"].to_numpy(float),
    }
    out = {
        "n": int(rows.size),
        **{
            k: {"vs_true_azurophilic": _rho(v, azu), "vs_drawn": _rho(v, drawn)}
            for k, v in steps.items()
        },
        "counter_vs_drawn_centres": _rho(
            f["granule_count"].to_numpy(float), steps["drawn_centres"]
        ),
    }
    od = d.granule_od[:, :, 0, 0].numpy()
    cells = pd.DataFrame(
        {
            "kind": o["kind"].astype(str).to_numpy()[rows],
            "t": o["t"].to_numpy(float)[rows],
            "true_azurophilic": azu,
            "layer_count": steps["layer_count"],
            "drawn_centres": steps["drawn_centres"],
            "counted": f["granule_count"].to_numpy(float),
            "od_r": od[:, 0],
            "od_g": od[:, 1],
            "od_b": od[:, 2],
        }
    ).sort_values("t")
    out["cells"] = cells.round(3).to_dict(orient="records")
    return out


def per_label(cells, side: int = 64) -> dict:
    """Mean granules the counter finds per labelled cell of a ``cells.h5ad`` (real data:
    no truth) on the crop as cut and halved to ``side`` px as ``stage=pair`` does."""
    import pandas as pd

    from vae.analysis import granules as G
    from vae.inputs.pairing import resize_crop
    from vae.inputs.schema import known_labels

    lab = cells.obs["label"].astype(object).to_numpy() if "label" in cells.obs else None
    if lab is None or not known_labels(lab).any():
        raise SystemExit("--real-cells: no labelled cell (obs['label'])")
    keep = known_labels(lab)
    crops = np.asarray(cells.obsm["crops"])[keep].copy()
    masks = np.asarray(cells.obsm["masks"])[keep].astype(bool)
    crops[~masks] = 0
    src = G.measure_batch(crops, masks, G.GranuleParams())
    small = [resize_crop(c, m, side) for c, m in zip(crops, masks)]
    half = G.measure_batch(
        np.stack([c for c, _ in small]), np.stack([m for _, m in small]), G.GranuleParams()
    )
    t = pd.DataFrame(
        {
            "cells": 1,
            f"as_cut_{crops.shape[1]}px": src["granule_count"].to_numpy(float),
            f"halved_{side}px": half["granule_count"].to_numpy(float),
            "cell_area_px": src["cell_area"].to_numpy(float),
        }
    ).groupby(lab[keep].astype(str))
    out = t.mean().round(2)
    out["cells"] = t.size()
    return out.to_dict(orient="index")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", type=Path, nargs="?", help="stage=train folder (model.pt, split.csv)")
    ap.add_argument("--paired", type=Path, help="the run's paired.h5ad (simulator truth)")
    ap.add_argument(
        "--real-cells",
        type=Path,
        help="a labelled cells.h5ad without truth (real smears): granules per class, as cut and halved",
    )
    ap.add_argument("--cells", type=Path, help="stage=segment's cells.h5ad (the crops as cut)")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON")
    a = ap.parse_args()
    import anndata as ad
    import pandas as pd

    res: dict = {}
    if a.real_cells is not None:
        res["real_cells"] = r = per_label(ad.read_h5ad(a.real_cells))
        print(f"granules the counter finds per labelled cell of {a.real_cells} (mean):")
        print(pd.DataFrame(r).T.to_string())
    if a.paired is None:
        if a.run is not None or a.cells is not None:
            raise SystemExit("RUN and --cells need --paired")
        if a.out is not None:
            a.out.write_text(json.dumps(res, indent=2))
        return
    paired = ad.read_h5ad(a.paired)
    for col in ("t", "lineage", "kind", "azurophilic_granules", "diameter"):
        if col not in paired.obs:
            raise SystemExit(f"{a.paired}: obs['{col}'] is missing (a simulator run is needed)")
    res["paired"] = str(a.paired)
    if a.cells is not None:
        res["counter_on_crops"] = r = source_vs_paired(paired, ad.read_h5ad(a.cells))
        print(f"counter on {r['n']} lineage crops (Spearman):")
        for k in ("source", "paired"):
            v = r[k]
            print(
                f"  {k:7s} {v['side_px']:4d} px  vs true {v['vs_true_azurophilic']:.3f}  vs drawn {v['vs_drawn']:.3f}"
            )
        print(pd.DataFrame(r["mean_count_per_kind"]).T.to_string())
    if a.run is not None:
        res["decoded"] = r = decoded_chain(a.run, paired)
        print(f"test lineage cells of {a.run}: {r['n']} (Spearman)")
        for k in ("layer_count", "drawn_centres", "counter_on_decoded"):
            print(
                f"  {k:20s} vs true {r[k]['vs_true_azurophilic']:.3f}  vs drawn {r[k]['vs_drawn']:.3f}"
            )
        print(f"  counter vs drawn centres {r['counter_vs_drawn_centres']:.3f}")
        print(pd.DataFrame(r["cells"]).to_string(index=False))
    if a.out is not None:
        a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
