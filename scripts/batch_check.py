"""Expression batches: does ``vae.batch_key`` take a batch effect out of the latent?

Paul15 (``expression/paul15_tradeseq_2660x240.h5ad``, one MARS-seq data set with no
batch column) is split into two "batches", A and B, with different make-up (an
erythroid progenitor goes to B with probability ``--eryth-share``, any other cell with
``--share``), and B gets a synthetic batch effect on its raw counts: every gene's
expected count times a factor ``exp(N(0, --effect-sd))`` (one draw per gene, as a
change of chemistry or protocol shifts genes differently) and the cell's depth times
``--depth``, then Poisson-resampled. The same split without the effect is the
reference ("clean"): what mixing and label transfer look like when the batches differ
only in make-up.

Three arms, each through the pipeline as a user runs it (``stage=expression
expression=paul15 expression.input_file=...``, ``stage=pair pair=expression_only``,
``stage=train``, ``stage=evaluate analysis.batch_key=batch``), ``hardware.torch_threads=1``:

* ``clean``: no batch effect, no covariate;
* ``effect``: batch effect, no covariate (the latent may sort cells by batch);
* ``effect+batch_key``: batch effect, ``expression.batch_key=batch`` on every stage
  (HVGs per batch and a ComBat-corrected PCA in ``stage=expression``; ``vae.batch_key``
  follows it: the expression decoder reads the batch).

For ``stage=expression`` it also reports, per data set, the diffusion pseudotime's
agreement with the clean data set's (cell by cell, Spearman) and the batch separation of
the PCA the pseudotime and UMAP are built on.

Reported per arm and seed, on the test split, for the expression and the joint code:
label kNN accuracy (``latent_structure``: reference the training split, both batches),
label transfer across batches (each test cell of B labelled by its 15 nearest training
cells of A: a new patient read against a reference one), and the batch separation of
:func:`vae.analysis.metrics.batch_mixing` (within each class, the share of a cell's
nearest cells of its own batch against the share if the batch did not matter; 0: mixed,
1: every neighbour from one's own batch). Run::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/batch_check.py --seeds 0 1 2 \\
        --work /tmp/batch_check --out /tmp/batch_check.json

``--reuse`` keeps the data sets and finished runs in ``--work`` and only scores them.
Prints a table (mean ± sample sd over the seeds) and writes JSON (``--out``); asserts
nothing. About 1 minute per arm
and seed on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAUL15 = "expression/paul15_tradeseq_2660x240.h5ad"
ARMS = ("clean", "effect", "effect+batch_key")
# the data set (stage=expression + pair) each arm trains on, and that stage's settings
DATA = {"clean": "clean", "effect": "effect", "effect+batch_key": "effect_batch_key"}


def make_inputs(shared: Path, work: Path, args) -> dict[str, Path]:
    """Write ``clean.h5ad`` and ``effect.h5ad`` (raw counts, obs ``batch``) into ``work``."""
    import anndata as ad
    import scipy.sparse as sp

    ref = ad.read_h5ad(shared / PAUL15)
    rng = np.random.default_rng(args.data_seed)
    x = ref.X.toarray() if sp.issparse(ref.X) else np.asarray(ref.X, dtype=np.float64)
    kinds = ref.obs["celltype"].astype(str).to_numpy()
    p_b = np.where(kinds == "Erythrocyte", args.eryth_share, args.share)
    batch = np.where(rng.random(len(kinds)) < p_b, "B", "A")
    factor = np.exp(rng.normal(0.0, args.effect_sd, x.shape[1]))
    out = {}
    for name in ("clean", "effect"):
        y = x.copy()
        if name == "effect":
            b = batch == "B"
            y[b] = rng.poisson(x[b] * factor * args.depth)
        obs = ref.obs.copy()
        obs["batch"] = batch
        a = ad.AnnData(sp.csr_matrix(y.astype(np.float32)), obs=obs, var=ref.var.copy())
        out[name] = work / f"{name}.h5ad"
        a.write_h5ad(out[name])
    return out


def cross_batch_knn(run_dir: Path, k: int = 15) -> dict[str, float]:
    """Label transfer across batches: each held-out (test) cell of batch B labelled by its
    ``k`` nearest training cells of batch A, per code (a new patient's cells read against
    a reference patient's)."""
    import anndata as ad

    from vae.analysis.metrics import knn_predict

    lat = ad.read_h5ad(run_dir / "train" / "latent.h5ad")
    split = lat.obs["split"].astype(str).to_numpy()
    batch = lat.obs["batch"].astype(str).to_numpy()
    labels = lat.obs["label"].astype(str).to_numpy()
    ref, query = (split == "train") & (batch == "A"), (split == "test") & (batch == "B")
    out = {}
    for name, key in (("expression", "X_vae_expression"), ("joint", "X_vae")):
        z = np.asarray(lat.obsm[key], np.float64)
        pred = knn_predict(z[query], labels[query], k, z[ref], labels[ref])
        out[name] = float(np.mean(pred == labels[query]))
    return out


BATCH_KEY = {"clean": [], "effect": [], "effect_batch_key": ["expression.batch_key=batch"]}


def expression_scores(root: Path) -> dict[str, dict[str, float]]:
    """stage=expression of each data set: its diffusion pseudotime (``obs["maturation"]``)
    against the clean data set's, cell by cell (Spearman), and the batch separation of its
    PCA (:func:`batch_mixing` by label), which the neighbours, UMAP and pseudotime read."""
    import anndata as ad
    from scipy.stats import spearmanr

    from vae.analysis.metrics import batch_mixing

    def read(name: str):
        return ad.read_h5ad(root / name / "expression" / "expression.h5ad")

    ref = read("clean").obs["maturation"]
    out = {}
    for name in DATA.values():
        a = read(name)
        cells = ref.index.intersection(a.obs_names)
        mix = batch_mixing(
            a.obsm["X_pca"], a.obs["batch"].to_numpy(), a.obs["label"].astype(str).to_numpy()
        )
        out[name] = {
            "maturation_vs_clean_spearman": float(
                spearmanr(a.obs.loc[cells, "maturation"], ref.loc[cells]).correlation
            ),
            "pca_separation": mix["separation"],
        }
    return out


def separations(run_dir: Path, k: int = 15) -> dict[str, float]:
    """:func:`batch_mixing` separation of the test split's expression and joint codes, as
    stage=evaluate scores it, computed here from ``latent.h5ad`` so that ``--reuse``
    rescores finished runs with the current metric (their metrics.json keeps the one of
    the day they ran)."""
    import anndata as ad

    from vae.analysis.metrics import batch_mixing

    lat = ad.read_h5ad(run_dir / "train" / "latent.h5ad")
    test = lat.obs["split"].astype(str).to_numpy() == "test"
    out = {}
    for name, key in (("expression", "X_vae_expression"), ("joint", "X_vae")):
        z = np.asarray(lat.obsm[key], np.float64)
        rows = test & np.isfinite(z).all(1)
        m = batch_mixing(
            z[rows], lat.obs["batch"].to_numpy()[rows], lat.obs["label"].to_numpy()[rows], k=k
        )
        out[name] = m["separation"] if m else float("nan")
    return out


def figure(root: Path, seed: int, path: Path) -> None:
    """Side by side, the cell-type and batch panels of ``umap_labels.png`` of the ``effect``
    and ``effect+batch_key`` runs of ``seed`` (cut from the evaluate figure: its layout
    puts the label panel top left and the batch panel in the middle of the bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    runs = [
        ("batch effect, no covariate", f"effect_s{seed}"),
        ("batch effect, expression.batch_key=batch", f"effect_batch_key_s{seed}"),
    ]
    fig, axs = plt.subplots(2, 2, figsize=(11, 8.2))
    for r, (title, exp) in enumerate(runs):
        im = Image.open(root / exp / "evaluate" / "umap_labels.png")
        w, h = im.size
        label = im.crop((0, int(0.05 * h), int(0.37 * w), int(0.515 * h)))
        batch = im.crop((int(0.37 * w), int(0.53 * h), int(0.67 * w), h))
        for c, part in enumerate((label, batch)):
            axs[r, c].imshow(part)
            axs[r, c].axis("off")
        axs[r, 0].set_title(f"{title}: cell type", fontsize=10, loc="left")
        axs[r, 1].set_title("the same cells by batch", fontsize=10, loc="left")
    fig.suptitle(
        "Paul15 with a synthetic batch effect on batch B: PCA of the shared latent "
        f"(seed {seed}, all cells)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")


def pipeline(stage: str, root: Path, exp: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        f"stage={stage}",
        f"paths.root={root}",
        f"experiment={exp}",
        "hardware.torch_threads=1",
        *extra,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("/tmp/batch_check"))
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--effect-sd", type=float, default=0.7, help="sd of log gene factors")
    ap.add_argument("--depth", type=float, default=0.6, help="batch B's depth factor")
    ap.add_argument("--share", type=float, default=0.45, help="share of cells in batch B")
    ap.add_argument("--eryth-share", type=float, default=0.2, help="... of erythroid cells")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument(
        "--batch-arm",
        nargs="*",
        default=[],
        help="extra overrides of the batch_key arm's training (e.g. vae.beta=2)",
    )
    ap.add_argument(
        "--figure", type=Path, default=None, help="PNG of the first seed's two batch arms"
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep the data sets and the runs already in --work (rescore only)",
    )
    args = ap.parse_args()

    work = args.work
    root = work / "out"
    if args.reuse and all((root / n / "pair" / "paired.h5ad").exists() for n in DATA.values()):
        inputs = {}  # the data sets of the last run (same settings: the caller's word)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        inputs = make_inputs(args.shared, work, args)
        inputs["effect_batch_key"] = inputs["effect"]
    for name, path in inputs.items():  # expression and pairing once per data set
        run(
            pipeline(
                "expression",
                root,
                name,
                "expression=paul15",
                f"expression.input_file={path}",
                "expression.umap=false",
                "expression.plots=false",
                *BATCH_KEY[name],
            ),
            work / f"{name}_expression.log",
        )
        run(pipeline("pair", root, name, "pair=expression_only"), work / f"{name}_pair.log")
    expression = expression_scores(root)
    for name, row in expression.items():
        print(json.dumps({"data": name, **row}), flush=True)

    rows = []
    for arm in ARMS:
        data = DATA[arm]
        extra = BATCH_KEY[data]  # vae.batch_key follows expression.batch_key
        if extra:
            extra = [*extra, *args.batch_arm]
        for seed in args.seeds:
            exp = f"{arm.replace('+', '_')}_s{seed}"
            t0 = time.time()
            if not (args.reuse and (root / exp / "evaluate" / "metrics.json").exists()):
                shutil.rmtree(root / exp, ignore_errors=True)
                shutil.copytree(root / data, root / exp)
                train = pipeline("train", root, exp, f"seed={seed}", *extra)
                run(train, work / f"{exp}_train.log")
                evaluate = pipeline(
                    "evaluate", root, exp, "analysis.batch_key=batch", "analysis.umap=false"
                )
                run(evaluate, work / f"{exp}_evaluate.log")
            m = json.loads((root / exp / "evaluate" / "metrics.json").read_text())
            row = {"arm": arm, "seed": seed, "seconds": round(time.time() - t0, 1)}
            cross = cross_batch_knn(root / exp)
            mixing = separations(root / exp)
            for latent in ("expression", "joint"):
                row[f"cross_batch_knn_{latent}"] = cross[latent]
                ls = m["latent_structure"].get(latent, {})
                row[f"knn_{latent}"] = ls.get("knn_accuracy")
                row[f"separation_{latent}"] = mixing[latent]
            rows.append(row)
            print(json.dumps(row), flush=True)

    cols = [
        "knn_expression",
        "knn_joint",
        "cross_batch_knn_expression",
        "cross_batch_knn_joint",
        "separation_expression",
        "separation_joint",
    ]
    print(f"\n{'arm':<18} " + " ".join(f"{c:>22}" for c in cols))
    summary = {}
    for arm in ARMS:
        sel = [r for r in rows if r["arm"] == arm]
        stats = {
            c: (
                float(np.mean([r[c] for r in sel])),
                float(np.std([r[c] for r in sel], ddof=1)) if len(sel) > 1 else float("nan"),
            )
            for c in cols
        }
        summary[arm] = {c: {"mean": m, "sd": s} for c, (m, s) in stats.items()}
        print(f"{arm:<18} " + " ".join(f"{m:>14.3f} ± {s:<5.3f}" for m, s in stats.values()))
    print(f"\n{'stage=expression of':<18} {'maturation vs clean':>22} {'PCA separation':>22}")
    for name, row in expression.items():
        print(
            f"{name:<18} {row['maturation_vs_clean_spearman']:>22.3f} {row['pca_separation']:>22.3f}"
        )
    if args.figure:
        figure(root, args.seeds[0], args.figure)
        print(f"wrote {args.figure}")
    load = os.getloadavg()
    print(
        f"\nseeds {args.seeds}; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "settings": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    },
                    "runs": rows,
                    "expression_stage": expression,
                    "summary": summary,
                    "load_average": load,
                },
                indent=1,
            )
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
