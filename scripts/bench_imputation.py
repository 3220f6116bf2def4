"""Imputation (LATE protocol) and denoising benchmark of the expression branch (issue 15).

Runs with no arguments::

    .venv/bin/python scripts/bench_imputation.py

Paul15 (``../shared/data/expression/paul15_tradeseq_2660x240.h5ad``, raw UMI;
cells with >= 100 counts, genes seen in >= 3 cells, all genes kept) and the
simulator's counts (expression only, noise-free truth known) are each split
70/15/15 (stratified by cell type, seeded). In the test cells, 10 % of the
observed non-zero entries are hidden (seeded); cells with fewer than 10 non-zero
entries are skipped and counted. Every predictor sees the masked test cells and
is scored on the hidden entries (log-normalised values, target sum 1e4):

* the β-VAE's expression branch (expression-only rows), trained on the train
  split in this run: NB, NB with ``late_mask``, Gaussian on log values, and
  Gaussian with ``late_mask`` (LATE's own loss: error on non-zero entries only);
* gene mean (over the train cells), kNN smoothing over the expression PCA
  (15 train neighbours, 20 PCs), and scvi-tools: ``SCVI`` (NB, its defaults,
  trained on the same train cells) and ``get_normalized_expression`` of the same
  masked test cells, run by ``scripts/scvi_impute.py`` with the interpreter of
  ``--scvi-python`` (default: ``$SCVI_PYTHON``, else this one). When that Python
  cannot import scvi-tools the table says why and shows our rows only.

scvi-tools lives in its own environment here (the optional ``[bench]`` extra)::

    .venv/bin/python scripts/bench_imputation.py --scvi-python /path/to/bench-venv/bin/python

On the simulator it also scores denoising: per gene programme, the decoded
profile of the (unmasked) test cells vs the noise-free expression, against the
observed log counts' own correlation with it.

Prints a table, writes ``outputs/bench_imputation/imputation.json`` and the
LATE figure ``late_<data>.png``; the last line reads
``imputation pearson ours/gene-mean: X.XX/Y.YY`` (Paul15, best setting).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAUL15 = "expression/paul15_tradeseq_2660x240.h5ad"
TARGET_SUM = 1e4
SETTINGS = {  # name -> (likelihood, late_mask)
    "vae nb": ("nb", False),
    "vae nb + late_mask": ("nb", True),
    "vae gaussian": ("gaussian", False),
    "vae gaussian + late_mask": ("gaussian", True),
}


def paul15(shared: Path) -> tuple[np.ndarray, np.ndarray, list[str], None, None]:
    import anndata as ad

    a = ad.read_h5ad(shared / PAUL15)
    c = np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float32)
    keep = c.sum(1) >= 100
    genes = (c[keep] > 0).sum(0) >= 3
    labels = a.obs["celltype"].astype(str).to_numpy()[keep]
    return c[keep][:, genes], labels, list(a.var_names[genes]), None, None


def simulator(
    n: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Counts of n cells (70 % neutrophil lineage with t ~ U(0, 1)), their noise-free
    log-normalised expression and each gene's programme."""
    from pipeline.simulator import OTHER_KINDS, SimulatorParams, make_gene_panel, stage_of
    from pipeline.simulator.expression import mean_profile, simulate_counts

    p = SimulatorParams(seed=seed)
    panel = make_gene_panel(p.n_genes, seed)
    rng = np.random.default_rng(seed)
    lineage = rng.random(n) < 0.7
    ts = [float(rng.random()) if li else None for li in lineage]
    kinds = [stage_of(t) if t is not None else str(rng.choice(OTHER_KINDS)) for t in ts]
    counts = simulate_counts(
        panel, kinds, ts, rng, p.mean_library_size, p.library_size_sd, p.nb_dispersion, p.dropout
    ).astype(np.float32)
    truth = np.stack([np.log1p(mean_profile(panel, k, t) * TARGET_SUM) for k, t in zip(kinds, ts)])
    return (
        counts,
        np.array(kinds),
        list(map(str, panel.genes)),
        truth.astype(np.float32),
        np.array(panel.program),
    )


def tensors(counts: np.ndarray, labels: np.ndarray, genes: list[str]):
    """Expression-only PairedTensors (16 px empty crops: the image branch never runs)."""
    import anndata as ad

    from vae.analysis.imputation import lognorm
    from vae.data import from_anndata

    n = counts.shape[0]
    obs = pd.DataFrame(
        {"has_image": False, "has_expression": True, "label": labels},
        index=[f"c{i}" for i in range(n)],
    )
    a = ad.AnnData(X=lognorm(counts, TARGET_SUM), obs=obs, var=pd.DataFrame(index=genes))
    a.layers["counts"] = counts
    a.uns["has_counts"] = True
    a.obsm["crops"] = np.zeros((n, 16, 16, 3), np.uint8)
    a.obsm["masks"] = np.zeros((n, 16, 16), bool)
    return from_anndata(a, "bench")


def train_one(data, split, likelihood: str, late: bool, out: Path, args) -> tuple[object, dict]:
    import torch

    from pipeline.hardware import DistInfo
    from vae.checkpoint import load_model
    from vae.losses import LossWeights
    from vae.model import TwoBranchVAE, VAEArgs
    from vae.train import TrainArgs, train

    torch.manual_seed(args.seed)
    margs = VAEArgs(
        n_genes=data.n_genes,
        crop_size=data.crop_size,
        n_shared=16,
        n_private=0,
        channels=[8, 8],
        hidden=[128, 64],
        expression_likelihood=likelihood,
        library_covariate=likelihood != "gaussian",
        norm_total=float(data.norm_total),
        n_classes=0,
    )
    model = TwoBranchVAE(margs)
    targs = TrainArgs(
        max_epochs=args.epochs,
        batch_size=128,
        lr=2e-3,
        early_stopping_patience=15,
        max_minutes=args.minutes,
        augment=False,
        seed=args.seed,
        beta=1.0,
        kl_warmup_epochs=5.0,
        weights=LossWeights(classify=0.0, align_mode="none", late_mask=late),
        log_every_steps=10**9,
        image_every_epochs=10**9,
    )
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = train(model, data, split, targs, DistInfo(0, 1, 0, torch.device("cpu")), out)
    best, _ = load_model(out / "model.pt", "cpu")
    return best, {
        "epochs": res.epochs,
        "best_epoch": res.best_epoch,
        "seconds": round(time.time() - t0, 1),
    }


def bench(name: str, counts, labels, genes, truth, programs, args, out: Path) -> dict:
    from vae.analysis import figures as F
    from vae.analysis import imputation as I
    from vae.data import stratified_split

    data = tensors(counts, labels, genes)
    x = data.x.numpy()
    split = stratified_split(labels, 0.15, 0.15, args.seed)
    tr, te = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    h = I.hide_nonzero(counts[te], args.fraction, args.seed, args.min_nonzero)
    xm, cm = I.apply_hiding(x[te], counts[te], h)
    masked = I.masked_tensors(data, te, xm, cm)
    preds: dict[str, np.ndarray] = {
        "gene mean": I.gene_mean_imputation(x[tr], te.size),
        "kNN smoothing (PCA)": I.knn_imputation(xm, x[tr], seed=args.seed),
    }
    runs: dict[str, dict] = {}
    denoise: dict[str, pd.DataFrame] = {}
    for sname, (lik, late) in SETTINGS.items():
        model, info = train_one(data, split, lik, late, out / name / sname.replace(" ", "_"), args)
        preds[sname] = I.model_imputation(model, masked)
        runs[sname] = info
        print(
            f"  [{name}] {sname}: {info['epochs']} epochs (best {info['best_epoch']}), {info['seconds']} s"
        )
        if truth is not None:
            full = I.masked_tensors(data, te, x[te], counts[te])
            denoise[sname] = I.denoising_scores(
                I.model_imputation(model, full), x[te], truth[te], programs
            )
    sc, scvi_status = scvi_imputation(counts[tr], cm, args)
    print(f"  [{name}] scvi-tools: {scvi_status}")
    if sc is not None:
        preds["scvi-tools"] = sc
    rows = []
    for pname, p in preds.items():
        s = I.score_hidden(p, x[te], h, genes)
        row = {"predictor": pname, **s.summary()}
        if truth is not None:  # the hidden entries against the noise-free value
            row["pearson_vs_noise_free"] = I.score_hidden(p, truth[te], h, genes).pearson
        rows.append(row)
    table = pd.DataFrame(rows)
    show = {k: preds[k] for k in ("gene mean", "kNN smoothing (PCA)", best_of(table))}
    F.save(I.late_figure(show, x[te], h, seed=args.seed), out / f"late_{name}.png")
    res = {
        "n_cells": int(counts.shape[0]),
        "n_genes": int(counts.shape[1]),
        "n_test": int(te.size),
        "n_hidden": h.n_hidden,
        "n_skipped": h.n_skipped,
        "scvi_tools": scvi_status,
        "training": runs,
        "table": table.to_dict(orient="records"),
    }
    if denoise:
        res["denoising"] = {k: v.to_dict(orient="records") for k, v in denoise.items()}
    return res


def scvi_imputation(counts_ref, counts_query, args) -> tuple[np.ndarray | None, str]:
    """scvi-tools' imputation of the masked query cells, run by ``--scvi-python``.

    Returns (prediction (n, G) log1p-normalised or None, a status sentence: what ran,
    or why nothing did).
    """
    py = args.scvi_python
    try:
        probe = subprocess.run(
            [py, "-c", "import scvi; print(scvi.__version__)"], capture_output=True, text=True
        )
    except OSError as e:  # no such interpreter
        return None, f"not run: cannot start {py} ({e}); see --scvi-python"
    if probe.returncode != 0:
        err = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"not run: {py} cannot import scvi-tools ({err}); see --scvi-python"
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(
            src,
            counts_ref=counts_ref,
            counts_query=counts_query,
            target_sum=TARGET_SUM,
            seed=args.seed,
            max_epochs=args.scvi_epochs,
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(
            [py, str(ROOT / "scripts" / "scvi_impute.py"), str(src), str(dst)],
            capture_output=True,
            text=True,
            env=env,
        )
        if run.returncode != 0:
            err = (run.stderr.strip().splitlines() or ["no output"])[-1]
            return None, f"failed: {err}"
        z = np.load(dst)
        pred, epochs, version = z["prediction"], int(z["epochs"]), str(z["version"])
    return pred, f"ran (scvi-tools {version}, {epochs} epochs, {time.time() - t0:.0f} s)"


def best_of(table: pd.DataFrame) -> str:
    ours = table[table["predictor"].str.startswith("vae")]
    return str(ours.sort_values("pearson", ascending=False)["predictor"].iloc[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_imputation")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="optional wall cap per model (off by default: a capped result depends on load)",
    )
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--min-nonzero", type=int, default=10)
    ap.add_argument("--sim-cells", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-simulator", action="store_true")
    ap.add_argument(
        "--scvi-python",
        default=os.environ.get("SCVI_PYTHON") or sys.executable,
        help="Python that imports scvi-tools (default: $SCVI_PYTHON, else this one)",
    )
    ap.add_argument(
        "--scvi-epochs", type=int, default=0, help="SCVI max_epochs (0: scvi-tools' default)"
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    if not (args.shared / PAUL15).exists():
        raise SystemExit(
            f"{args.shared / PAUL15} not found (set --shared to the shared data folder)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = {"paul15": bench("paul15", *paul15(args.shared), args, args.out)}
    if not args.skip_simulator:
        results["simulator"] = bench(
            "simulator", *simulator(args.sim_cells, args.seed), args, args.out
        )
    results["seconds"] = round(time.time() - t0, 1)
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("shared", "out")}
    results["load_average"] = os.getloadavg()
    (args.out / "imputation.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    cols = ["predictor", "pearson", "spearman", "median_abs_error", "gene_pearson"]
    for name, r in results.items():
        if not isinstance(r, dict) or "table" not in r:
            continue
        t = pd.DataFrame(r["table"])
        extra = ["pearson_vs_noise_free"] if "pearson_vs_noise_free" in t else []
        print(
            f"\n{name}: {r['n_test']} test cells, {r['n_hidden']} hidden entries, "
            f"{r['n_skipped']} cells skipped (< {args.min_nonzero} non-zero); scvi-tools {r['scvi_tools']}"
        )
        print(t[cols + extra].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        for sname, rows in r.get("denoising", {}).items():
            print(f"\n{name} denoising ({sname}): per-gene Pearson with the noise-free expression")
            print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nwrote {args.out / 'imputation.json'} ({results['seconds']} s)")
    t = pd.DataFrame(results["paul15"]["table"]).set_index("predictor")
    best = best_of(t.reset_index())
    if "scvi-tools" in t.index:
        print(
            f"imputation pearson ours/scvi-tools: {t.loc[best, 'pearson']:.2f}/"
            f"{t.loc['scvi-tools', 'pearson']:.2f}"
        )
    else:
        print(f"imputation pearson ours/scvi-tools: scvi-tools {results['paul15']['scvi_tools']}")
    print(
        f"imputation pearson ours/gene-mean: {t.loc[best, 'pearson']:.2f}/{t.loc['gene mean', 'pearson']:.2f}"
    )


if __name__ == "__main__":
    main()
