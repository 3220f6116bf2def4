"""Held-out-kind detection with the atypical-cell scores (issue 15).

Builds a simulator data set with true same-cell pairs (``scripts/vae_targets.py
build``: true masks, 64 px crops), trains the default β-VAE through
``stage=train`` with ``trainer.exclude_labels=[KIND]`` (every cell of that kind
goes to the test split, none is trained on), and scores how well each anomaly
score of ``latent.h5ad`` finds the held-out kind among the other test cells
(ROC AUC)::

    .venv/bin/python scripts/bench_anomaly.py                  # myeloblast held out
    .venv/bin/python scripts/bench_anomaly.py --kinds myeloblast eosinophil --seeds 2 3 --epochs 20

Each seed builds its own data set and trains its own models for exactly
``--epochs`` epochs (no wall-time cap unless ``--minutes``: a capped run's result
depends on machine load), one torch thread. Prints a table (the mean over seeds,
the epochs each run trained, the load average at its start and end) and writes
``outputs/bench_anomaly/anomaly_<kinds>_seeds_<seeds>.json`` after every run.
``--rescore`` trains nothing: it recomputes the scores of the finished runs with
the current code (:func:`vae.analysis.anomaly.rescore_latent`), e.g. after a change
of the score (``scripts/anomaly_variants.py`` compares variants).

``--latent`` scores a finished run instead (one trained with
``trainer.exclude_labels``): the AUC of each score for the rows labelled with
any of ``--kinds`` among the test rows, over all of them and over the rows with
an image (e.g. real eosinophil and basophil crops when the model saw neither)::

    .venv/bin/python scripts/bench_anomaly.py --latent outputs/anom_real/train/latent.h5ad \
        --kinds eosinophil Basophils
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--kinds", nargs="+", default=["myeloblast"], help="kinds held out (one run each)"
    )
    ap.add_argument("--n-images", type=int, default=100)
    ap.add_argument(
        "--epochs", type=int, default=20, help="epochs per training (trainer.max_epochs)"
    )
    ap.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="optional training wall cap per run (off by default: results then depend on load)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_anomaly")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="one data set and training per seed"
    )
    ap.add_argument(
        "--latent", type=Path, default=None, help="score this latent.h5ad, train nothing"
    )
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="train nothing: recompute the scores of the finished runs with the current code",
    )
    args = ap.parse_args()
    if args.latent is not None:
        score_run(args.latent, args.kinds)
        return

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    results = {}
    args.out.mkdir(parents=True, exist_ok=True)
    # the kinds are in the name: two benchmarks of the same seeds must not overwrite each other
    tag = "_".join(args.kinds) + "_seeds_" + "_".join(str(s) for s in args.seeds)
    json_out = args.out / f"anomaly_{tag}{'_rescored' if args.rescore else ''}.json"
    # kinds outer: with several kinds, the first kind's seeds finish first
    for kind in args.kinds:
        for seed in args.seeds:
            if args.rescore:
                results[f"{kind} seed {seed}"] = rescore(kind, seed, args)
            else:
                results[f"{kind} seed {seed}"] = train_and_score(kind, seed, args, env)
            out = {
                "n_images": args.n_images,
                "max_epochs": args.epochs,
                "max_minutes": args.minutes,
                "rescored": args.rescore,
                "results": results,
                "seconds": round(time.time() - t0, 1),
                "load_average": os.getloadavg(),
            }
            # after every run: an interrupted benchmark keeps what finished
            json_out.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print_table(results, args.kinds, args.seeds)
    print(f"wrote {json_out} ({out['seconds']} s, load {os.getloadavg()})")


def print_table(results: dict, kinds: list[str], seeds: list[int]) -> None:
    """AUC per score and run, the mean over seeds, epochs and load of each run."""
    table = pd.DataFrame({k: v["auc"] for k, v in results.items()})
    if len(seeds) > 1:
        for kind in kinds:
            table[f"{kind} mean"] = table[[f"{kind} seed {s}" for s in seeds]].mean(1)
    shown = table.astype(object)
    pad = [""] * (table.shape[1] - len(results))
    shown.loc["n held out / n test"] = [
        f"{v['n_held_out']}/{v['n_test']}" for v in results.values()
    ] + pad
    shown.loc["epochs trained"] = [v["epochs"] for v in results.values()] + pad
    shown.loc["load average (1 min) start/end"] = [
        f"{v['load_average_start']:.1f}/{v['load_average_end']:.1f}"
        if v.get("load_average_start") is not None
        else ""
        for v in results.values()
    ] + pad
    print("\nROC AUC of each score for the held-out kind among the test cells:")
    print(shown.to_string(float_format=lambda v: f"{v:.3f}"))


def train_and_score(kind: str, seed: int, args, env) -> dict:
    """Build (once per seed) the simulated pairs, train without ``kind``, score the test cells."""
    py = sys.executable
    paired = args.out / f"paired_{args.n_images}_seed{seed}.h5ad"
    if not paired.exists():
        build = [py, str(ROOT / "scripts" / "vae_targets.py"), "build"]
        build += ["--n-images", str(args.n_images), "--seed", str(seed), "--out", str(paired)]
        subprocess.run(build, check=True, env=env, cwd=ROOT)
    variant = f"without_{kind}_seed{seed}"
    cmd = [
        py,
        "-m",
        "pipeline",
        "stage=train",
        f"experiment={args.out.name}",
        f"paths.root={args.out.parent}",
        f"variant={variant}",
        f"paths.inputs.paired={paired}",
        f"trainer.exclude_labels=[{kind}]",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.max_minutes={'null' if args.minutes is None else args.minutes}",
        "trainer.projector_max_cells=0",
        "hardware.torch_threads=1",
        f"seed={seed}",
        "overwrite=true",
    ]
    t1, load0 = time.time(), os.getloadavg()[0]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    load1 = os.getloadavg()[0]
    run = args.out / "train" / variant
    res = auc_of_run(run, kind, read_obs(run))
    res.update(
        train_seconds=round(time.time() - t1, 1), load_average_start=load0, load_average_end=load1
    )
    return res


def read_obs(run: Path) -> pd.DataFrame:
    import anndata as ad

    return ad.read_h5ad(run / "latent.h5ad", backed="r").obs


def rescore(kind: str, seed: int, args) -> dict:
    """The AUCs of a finished run, its scores recomputed with the current code."""
    import anndata as ad

    from vae.analysis.anomaly import rescore_latent

    run = args.out / "train" / f"without_{kind}_seed{seed}"
    summ = json.loads((run / "train_summary.json").read_text())
    lat = ad.read_h5ad(run / "latent.h5ad")
    ma = summ["model_args"]
    frame = rescore_latent(lat, int(ma["n_shared"]), int(ma["n_private"]))
    obs = lat.obs.copy()
    for col in frame.columns:
        obs[col] = frame[col].to_numpy()
    return auc_of_run(run, kind, obs)


def auc_of_run(run: Path, kind: str, obs: pd.DataFrame) -> dict:
    """ROC AUC of each score column of ``obs`` for ``kind`` among the test rows."""
    from vae.analysis.anomaly import roc_auc
    from vae.inputs.schema import ANOMALY_COLUMNS

    test = obs["split"].astype(str).to_numpy() == "test"
    pos = obs["label"].astype(str).to_numpy() == kind
    assert not (pos & ~test).any(), "a held-out cell was trained on"
    summ = json.loads((run / "train_summary.json").read_text())
    return {
        "auc": {
            name: roc_auc(obs[col].to_numpy(dtype=float)[test], pos[test])
            for name, col in ANOMALY_COLUMNS.items()
        },
        "n_cells": int(obs.shape[0]),
        "n_test": int(test.sum()),
        "n_held_out": int(pos.sum()),
        "epochs": summ.get("epochs"),
        "stopped": summ.get("stopped"),
        "best_epoch": summ.get("best_epoch"),
        "median_score_held_out": float(np.nanmedian(obs["anomaly_score"][pos])),
        "median_score_other_test": float(np.nanmedian(obs["anomaly_score"][test & ~pos])),
    }


def score_run(latent: Path, kinds: list[str]) -> None:
    """AUC of each score of ``latent`` for the ``kinds`` among its test rows."""
    import anndata as ad

    from vae.analysis.anomaly import roc_auc
    from vae.inputs.schema import ANOMALY_COLUMNS

    obs = ad.read_h5ad(latent, backed="r").obs
    test = obs["split"].astype(str).to_numpy() == "test"
    pos = obs["label"].astype(str).isin(kinds).to_numpy()
    img = obs["has_image"].to_numpy(bool)
    rows = {}
    for subset, sel in (("test rows", test), ("test rows with an image", test & img)):
        rows[f"{subset} ({int((sel & pos).sum())} of {int(sel.sum())} held out)"] = {
            name: roc_auc(obs[col].to_numpy(dtype=float)[sel], pos[sel])
            for name, col in ANOMALY_COLUMNS.items()
        }
    table = pd.DataFrame(rows)
    print(f"ROC AUC for {kinds} among the test rows of {latent}:")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    by = obs[test].groupby(obs["label"].astype(str)[test])["anomaly_score"].median()
    print("median combined score per label (test rows):")
    print(by.sort_values(ascending=False).to_string(float_format=lambda v: f"{v:.2f}"))
    out = latent.parent / "anomaly_heldout.json"
    out.write_text(
        json.dumps(
            {"kinds": kinds, "auc": rows, "median_by_label": by.to_dict()}, indent=2, default=float
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
