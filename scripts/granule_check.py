"""How well vae/analysis/granules.py reads simulator truth off input (not decoded) crops.

Reads a paired.h5ad with simulator truth in ``obs`` (``kind``, ``lobes``, ``t``,
``truncated``), measures every crop (or a random subset) and prints one row per cell
kind and one for the neutrophil lineage: lobe-count accuracy, Spearman of the measured
lobes with the true lobes, Spearman of the measured granule density with the true
azurophilic density (``pipeline.simulator.morphology.azurophilic_density(t)``), mean
granule count. With ``--real DIR`` (``cells/segmentation_wbc``) it also measures the
real crops, cut and resized as ``stage=pair`` does, against the data set's own
nucleus masks: nucleus IoU, lobes and granules per class (a sanity check: real cells
have no lobe or granule truth). With ``--real-paired PAIRED`` (a real
``paired.h5ad``, e.g. the real chain's) it counts the lobes of every labelled crop and
prints, per label, the share read as 1, 2 and >= 3 lobes (segmented neutrophils should
mostly read >= 2, lymphocytes and monocytes 1). ``--valley-ratio none`` switches off the
cuts between touching lobes (:func:`vae.analysis.granules.cut_lobe_valleys`), the
counter before 2026-12-01. Writes the numbers as JSON.

    .venv/bin/python scripts/vae_targets.py build --n-images 120 --out outputs/exp/paired_sim.h5ad
    .venv/bin/python scripts/granule_check.py outputs/exp/paired_sim.h5ad --n 1000 \\
        --real ../shared/data/cells/segmentation_wbc --out outputs/exp/granule_check.json \
        --real-paired outputs/real_chain/pair/paired.h5ad [--valley-ratio none] \
        [--lobe-sheet docs/figures/real_lobe_counter.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REAL_CLASSES = {1: "neutrophil", 2: "lymphocyte", 3: "monocyte", 4: "eosinophil", 5: "basophil"}


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    from scipy import stats

    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return float("nan")
    return float(stats.spearmanr(x[ok], y[ok])[0])


def simulated(paired: Path, n: int, seed: int, params=None) -> dict:
    """Per-kind and neutrophil-lineage agreement of the counters with simulator truth."""
    import anndata as ad

    from pipeline.simulator.morphology import azurophilic_density, drawn_granule_density
    from vae.analysis import granules as G

    a = ad.read_h5ad(paired)
    for col in ("lobes", "t", "kind"):
        if col not in a.obs:
            sys.exit(f"{paired}: obs['{col}'] missing (not simulator data?)")
    rows = np.flatnonzero(a.obs["has_image"].to_numpy().astype(bool))
    rng = np.random.default_rng(seed)
    if rows.size > n:
        rows = np.sort(rng.choice(rows, n, replace=False))
    df = G.measure_batch(a.obsm["crops"][rows], a.obsm["masks"][rows].astype(bool), params)
    obs = a.obs.iloc[rows]
    kind = obs["kind"].astype(str).to_numpy()
    lobes = obs["lobes"].to_numpy(float)
    t = obs["t"].to_numpy(float)
    # stage=pair tables have no truncated column: every cell counts as whole there
    whole = ~np.asarray(obs["truncated"] if "truncated" in obs else np.zeros(len(obs)), bool)
    azu = np.array([azurophilic_density(x) if np.isfinite(x) else np.nan for x in t])
    ml, md = df["lobes"].to_numpy(float), df["granule_density"].to_numpy(float)
    mc = df["granule_count"].to_numpy(float)
    # the granules the simulator drew (data simulated before the column, 2026-12-04, lack it)
    drawn = (
        drawn_granule_density(obs["azurophilic_granules"], obs["diameter"])
        if {"azurophilic_granules", "diameter"} <= set(obs)
        else None
    )

    def row(sel: np.ndarray) -> dict:
        out = {
            "n": int(sel.sum()),
            "lobe_accuracy": float((ml[sel] == lobes[sel]).mean()),
            "lobes_spearman": _rho(ml[sel], lobes[sel]),
            "granule_density_vs_azurophilic_spearman": _rho(md[sel], azu[sel]),
            "granule_count_mean": float(mc[sel].mean()),
        }
        if drawn is not None:
            # a perfect counter's agreement (the ceiling), and the counter's with the drawn
            out["drawn_granules_vs_azurophilic_spearman"] = _rho(drawn[sel], azu[sel])
            out["granule_density_vs_drawn_spearman"] = _rho(md[sel], drawn[sel])
        return out

    neut = np.isfinite(t)
    res = {
        "n_cells": int(rows.size),
        "neutrophil_lineage": row(neut),
        "neutrophil_lineage_whole_cells": row(neut & whole),
    }
    for k in dict.fromkeys(kind):
        res[k] = row(kind == k)
    return res


def real(root: Path, crop_size: int, params=None) -> dict:
    """Counters on segmentation_wbc crops: nucleus IoU with its masks, lobes, granules."""
    import pandas as pd
    from PIL import Image

    from vae.analysis import granules as G
    from vae.inputs.pairing import square_crop

    out: dict = {}
    for ds in ("dataset1", "dataset2"):
        labels = root / f"{ds}_labels.csv"
        if not labels.exists():
            sys.exit(f"{labels}: not found (--real expects cells/segmentation_wbc)")
        lab = pd.read_csv(labels)
        rec = []
        for img_id, cls in lab.iloc[:, :2].itertuples(index=False):
            f = root / ds / f"{int(img_id):03d}.bmp"
            if not f.exists():
                continue
            img = np.asarray(Image.open(f).convert("RGB"))
            m = np.asarray(Image.open(f.with_suffix(".png")))
            m = m[..., 0] if m.ndim == 3 else m
            crop, cm = square_crop(img, m > 0, crop_size)
            nuc3 = np.repeat((m == 255).astype(np.uint8)[..., None] * 255, 3, axis=2)
            true_nuc = square_crop(nuc3, m > 0, crop_size)[0][..., 0] > 127
            me = G.measure_cell(crop, cm, params, grain=False)  # nucleus, lobes, count
            iou = (me.nucleus & true_nuc).sum() / max((me.nucleus | true_nuc).sum(), 1)
            rec.append(
                {
                    "class": REAL_CLASSES.get(int(cls), str(cls)),
                    "nucleus_iou": float(iou),
                    "lobes": me.features.lobes,
                    "lobes_on_true_nucleus": G.count_lobes(true_nuc),
                    "granule_count": me.features.granule_count,
                }
            )
        df = pd.DataFrame(rec)
        out[ds] = {
            "n": len(df),
            "nucleus_iou": float(df["nucleus_iou"].mean()),
            "per_class": df.groupby("class").mean(numeric_only=True).round(3).to_dict("index"),
        }
    return out


def real_paired(paired: Path, params=None) -> dict:
    """Share of labelled real crops read as 1, 2, >= 3 lobes, per label (no truth)."""
    import anndata as ad

    from vae.analysis import granules as G
    from vae.data import UNKNOWN_LABEL

    a = ad.read_h5ad(paired, backed="r")
    obs = a.obs
    if "image_label" not in obs:
        sys.exit(f"{paired}: obs['image_label'] missing (not a stage=pair output?)")
    label = obs["image_label"].astype(str).to_numpy()
    # unlabelled crops: an empty label (stage=pair), NaN, or the trainer's UNKNOWN_LABEL
    keep = obs["has_image"].to_numpy(bool) & ~np.isin(label, ["", "nan", UNKNOWN_LABEL])
    out: dict = {}
    for name in sorted(set(label[keep])):
        rows = np.flatnonzero(keep & (label == name))
        crops = np.asarray(a.obsm["crops"][rows])
        masks = np.asarray(a.obsm["masks"][rows]).astype(bool)
        n = np.array(
            [
                G.count_lobes(G.cell_nucleus(c, m, params))
                for c, m in zip(crops, masks.reshape(crops.shape[:3]))
            ]
        )
        out[name] = {
            "n": int(n.size),
            "one": float((n == 1).mean()),
            "two": float((n == 2).mean()),
            "three_or_more": float((n >= 3).mean()),
            "mean": float(n.mean()),
        }
    return out


def lobe_sheet(
    paired: Path,
    out: Path,
    label: str = "neutrophil",
    n: int = 16,
    seed: int = 0,
    deep_valley: float | None = None,
) -> None:
    """Contact sheet: ``n`` random labelled real crops, their lobes read by the
    outline-only counter (``valley_ratio=None``), by the package's counter and, with
    ``deep_valley``, by the counter with its second cut rule."""
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vae.analysis import granules as G

    a = ad.read_h5ad(paired, backed="r")
    lab = a.obs["image_label"].astype(str).to_numpy()
    src = a.obs["image_source"].astype(str).to_numpy() if "image_source" in a.obs else lab
    rows = np.flatnonzero(a.obs["has_image"].to_numpy(bool) & (lab == label))
    if rows.size == 0:
        sys.exit(f"{paired}: no crop labelled {label!r}")
    pick = np.sort(np.random.default_rng(seed).choice(rows, min(n, rows.size), replace=False))
    counters = (
        ("outline only", G.GranuleParams(valley_ratio=None)),
        ("+ valley cuts", G.GranuleParams()),
    )
    if deep_valley is not None:
        counters += (
            (f"+ 2nd rule {deep_valley:g}", G.GranuleParams(lobe_deep_valley_ratio=deep_valley)),
        )
    rows_n = 1 + len(counters)
    fig, ax = plt.subplots(
        rows_n, pick.size, figsize=(1.25 * pick.size, 1.47 * rows_n), squeeze=False
    )
    for k, i in enumerate(pick):
        img = np.asarray(a.obsm["crops"][i])
        cell = np.asarray(a.obsm["masks"][i]).astype(bool).reshape(img.shape[:2])
        ax[0, k].imshow(img)
        ax[0, k].set_title(src[i].replace("segmentation_wbc", "seg_wbc")[:12], fontsize=6)
        for r, (_, params) in enumerate(counters, 1):
            nuc = G.cell_nucleus(img, cell, params)
            ax[r, k].imshow(
                G.split_lobes(nuc), cmap="tab10", vmin=0, vmax=9, interpolation="nearest"
            )
            ax[r, k].set_title(str(G.count_lobes(nuc)), fontsize=7)
    for x in ax.flat:
        x.axis("off")
    for r, (name, _) in enumerate(counters, 1):
        ax[r, 0].text(
            -0.1,
            0.5,
            name,
            transform=ax[r, 0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=7,
        )
    fig.suptitle(f"{pick.size} random real {label} crops: lobes read by the counter", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("paired", type=Path)
    ap.add_argument("--n", type=int, default=1000, help="cells measured (random subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", type=Path, default=None, help="cells/segmentation_wbc folder")
    ap.add_argument("--crop-size", type=int, default=64, help="real crops are resized to this")
    ap.add_argument("--real-paired", type=Path, default=None, help="a real paired.h5ad")
    ap.add_argument("--lobe-sheet", type=Path, default=None, help="PNG: real neutrophils' lobes")
    ap.add_argument(
        "--valley-ratio",
        default=None,
        help="GranuleParams.valley_ratio (default: the package's); none: no cuts between "
        "touching lobes",
    )
    ap.add_argument(
        "--deep-valley",
        type=float,
        default=None,
        help="GranuleParams.lobe_deep_valley_ratio: the counter's second cut rule (default off)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from vae.analysis.granules import GranuleParams

    params = GranuleParams()
    if args.valley_ratio is not None:
        vr = None if args.valley_ratio.lower() == "none" else float(args.valley_ratio)
        params = GranuleParams(valley_ratio=vr)
    if args.deep_valley is not None:
        params = GranuleParams(
            valley_ratio=params.valley_ratio, lobe_deep_valley_ratio=args.deep_valley
        )

    import pandas as pd

    res = {"valley_ratio": params.valley_ratio, "deep_valley": params.lobe_deep_valley_ratio}
    res["simulated"] = simulated(args.paired, args.n, args.seed, params)
    sim = {k: v for k, v in res["simulated"].items() if isinstance(v, dict)}
    print(pd.DataFrame(sim).T.to_string(float_format=lambda v: f"{v:.3f}"))
    if args.real is not None:
        res["real"] = real(args.real, args.crop_size, params)
        for ds, r in res["real"].items():
            print(f"\n{ds}: {r['n']} crops, nucleus IoU {r['nucleus_iou']:.3f}")
            print(pd.DataFrame(r["per_class"]).T.to_string(float_format=lambda v: f"{v:.2f}"))
    if args.real_paired is not None:
        res["real_paired"] = real_paired(args.real_paired, params)
        print(f"\n{args.real_paired}: lobes per labelled crop (share)")
        print(pd.DataFrame(res["real_paired"]).T.to_string(float_format=lambda v: f"{v:.2f}"))
        if args.lobe_sheet is not None:
            lobe_sheet(
                args.real_paired, args.lobe_sheet, seed=args.seed, deep_valley=args.deep_valley
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
