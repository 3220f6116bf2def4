"""``stage=pair`` and ``stage=train`` with many genes: wall time and peak RSS.

An expression-only study of ``--cells`` cells x ~``--genes`` genes (``subset_hvg``
false, the default, keeps every gene): each stage runs in its own child process

* ``python -m pipeline stage=pair pair=expression_only ...`` and
* ``python -m pipeline stage=train trainer.max_epochs=1 ...`` on its paired.h5ad,

with ``hardware.torch_threads=1``; peak RSS is the child's ``ru_maxrss`` from
``os.wait4``; the load average is recorded before and after each run.

Input: a synthetic sparse count table (float32 CSR, ~10 % non-zero): Paul15's 240
genes drawn from each cell type's mean profile, plus lognormal "extra" genes
(13 named ``mt-...``), ~4000 counts per cell, obs ``celltype``, ``donor``,
``sample``, ``user_score``, ``user_note``. From it this script writes
``expression.h5ad`` itself, as ``docs/artifacts.md`` (*expression*) lays it out
(log1p of counts normalised to 1e4 in ``X``, raw ``layers["counts"]``, ``obs["label"]``,
``obs["maturation"]`` NaN), so the run does not depend on ``stage=expression``:
``--layout dense`` (what stage=expression writes) or ``sparse`` (CSR), or both.

``--repo`` runs another checkout (e.g. ``git archive HEAD`` of the code before a
change) with this environment's Python, for a before/after table. Run::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_pair_scale.py \\
        --cells 20000 --genes 20000 --layout dense sparse --out /tmp/bench_pair.json

Prints a table and writes JSON (``--out``); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAUL15 = "expression/paul15_tradeseq_2660x240.h5ad"
TARGET_SUM = 1e4


def make_counts(path: Path, n_cells: int, n_genes: int, shared: Path, seed: int = 0) -> None:
    """Write the synthetic raw count table (``n_cells`` x ``n_genes``, CSR float32)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    ref = ad.read_h5ad(shared / PAUL15)
    x = ref.X.toarray() if sp.issparse(ref.X) else np.asarray(ref.X, dtype=np.float64)
    x = x / x.sum(1, keepdims=True)
    kinds = ref.obs["celltype"].astype(str).to_numpy()
    names, freq = np.unique(kinds, return_counts=True)
    profile = np.stack([x[kinds == k].mean(0) for k in names])  # (types, 240) proportions
    n_ref = profile.shape[1]
    n_extra = max(n_genes - n_ref, 0)
    extra = rng.lognormal(0.0, 2.0, n_extra)
    extra /= extra.sum()
    genes = [*map(str, ref.var_names), *(f"Gm{i:05d}" for i in range(n_extra))]
    for i in range(min(13, n_extra)):  # mitochondrial genes for the QC step
        genes[n_ref + i] = f"mt-Gene{i}"
    cell_type = rng.choice(len(names), n_cells, p=freq / freq.sum())
    library = rng.lognormal(np.log(4000), 0.5, n_cells)
    share_ref = 0.10  # of a cell's counts on the 240 Paul15 genes
    blocks = []
    for s in range(0, n_cells, 2000):  # a block of rows at a time: never all dense
        e = min(n_cells, s + 2000)
        rate_ref = profile[cell_type[s:e]] * share_ref * library[s:e, None]
        rate_extra = (1 - share_ref) * library[s:e, None] * extra[None, :]
        rate_extra *= rng.gamma(2.0, 0.5, size=rate_extra.shape)  # gamma-Poisson (NB)
        c = np.hstack([rng.poisson(rate_ref), rng.poisson(rate_extra)]).astype(np.float32)
        blocks.append(sp.csr_matrix(c))
    obs = pd.DataFrame(
        {
            "celltype": pd.Categorical(names[cell_type]),
            "donor": pd.Categorical(rng.choice(["D1", "D2", "D3", "D4"], n_cells)),
            "sample": pd.Categorical(rng.choice([f"S{i}" for i in range(8)], n_cells)),
            "user_score": rng.normal(size=n_cells).astype(np.float32),
            "user_note": [f"n{i % 7}" for i in range(n_cells)],
        },
        index=[f"CELL{i:07d}-1" for i in range(n_cells)],
    )
    m = sp.vstack(blocks, format="csr")
    ad.AnnData(X=m, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)


def make_expression(counts_path: Path, path: Path, layout: str) -> None:
    """``expression.h5ad`` (docs/artifacts.md, *expression*) from the raw table.

    ``layout``: ``dense`` X and counts (as stage=expression writes them) or ``sparse``.
    """
    import anndata as ad
    import scipy.sparse as sp

    a = ad.read_h5ad(counts_path)
    counts = sp.csr_matrix(a.X, dtype=np.float32)
    lib = np.asarray(counts.sum(1)).ravel()
    scale = sp.diags((TARGET_SUM / np.maximum(lib, 1)).astype(np.float32))
    x = scale @ counts
    x.data = np.log1p(x.data)
    x = x.astype(np.float32)
    obs = a.obs.copy()
    obs["label"] = obs["celltype"].astype(str)
    obs["maturation"] = np.full(a.n_obs, np.nan, np.float32)
    obs["total_counts"] = lib
    dense = layout == "dense"
    out = ad.AnnData(X=x.toarray() if dense else x, obs=obs, var=a.var.copy())
    out.layers["counts"] = counts.toarray() if dense else counts
    out.var["highly_variable"] = False
    out.var["gene_of_interest"] = False
    out.uns["has_counts"] = True
    out.uns["label_key"] = "celltype"
    out.uns["maturation_source"] = "none"
    out.write_h5ad(path)


def run_stage(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run ``cmd`` in ``cwd``; wall s, peak RSS GiB (``os.wait4``), exit code, load."""
    load0 = os.getloadavg()
    t0 = time.time()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t0
    text = log.read_text(errors="replace")
    epoch = re.findall(r"epoch \d+/\d+ .* ([0-9.]+)s\s*$", text, flags=re.M)
    return {
        "rc": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(ru.ru_maxrss / 2**20, 2),  # KiB on Linux
        "s_per_epoch": float(epoch[-1]) if epoch else None,
        "load_before": [round(v, 2) for v in load0],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "log": str(log),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=20000)
    ap.add_argument("--genes", type=int, default=20000)
    ap.add_argument("--layout", nargs="+", default=["dense"], choices=["dense", "sparse"])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_pair_scale"))
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout to run")
    ap.add_argument("--shared", type=Path, default=ROOT / "../shared/data")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default DIR/bench.json)")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    d = args.dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    counts = d / f"counts_{args.cells}x{args.genes}.h5ad"
    exprs = {lay: d / f"expression_{args.cells}x{args.genes}_{lay}.h5ad" for lay in args.layout}
    py = sys.executable
    if args.make_only:
        if not counts.exists():
            make_counts(counts, args.cells, args.genes, args.shared.resolve())
        for layout, expr in exprs.items():
            if not expr.exists():
                make_expression(counts, expr, layout)
        return
    if not all(p.exists() for p in (counts, *exprs.values())):
        # in a child: a stage's child forked from a parent that held the inputs would
        # start with the parent's resident set, and ru_maxrss would report it
        subprocess.run([py, __file__, *sys.argv[1:], "--make-only"], check=True)
    tag = args.repo.resolve().name
    rows = []
    for layout, expr in exprs.items():
        exp = f"{tag}_{layout}"
        common = [
            "expression=paul15",
            f"experiment={exp}",
            f"paths.root={d / 'runs'}",
            "hardware.torch_threads=1",
            "overwrite=true",
        ]
        pair = [py, "-m", "pipeline", "stage=pair", "pair=expression_only"]
        pair += [f"paths.inputs.expression={expr}", *common]
        r = run_stage(pair, args.repo, d / f"{exp}_pair.log")
        paired = d / "runs" / exp / "pair" / "paired.h5ad"
        r["paired_mib"] = round(paired.stat().st_size / 2**20, 1) if paired.exists() else None
        rows.append({"stage": "pair", "layout": layout, **r})
        if args.no_train or r["rc"] != 0:
            continue
        train = [py, "-m", "pipeline", "stage=train", "trainer.max_epochs=1"]
        train += [f"paths.inputs.paired={paired}", *common]
        rows.append(
            {
                "stage": "train",
                "layout": layout,
                **run_stage(train, args.repo, d / f"{exp}_train.log"),
            }
        )
    head = f"{'stage':6} {'layout':7} {'rc':>3} {'wall s':>7} {'peak GiB':>9} {'s/epoch':>8}  load"
    print(f"{args.cells} cells x {args.genes} genes, code {args.repo.resolve()}")
    print(head)
    for r in rows:
        ep = f"{r['s_per_epoch']:.1f}" if r["s_per_epoch"] is not None else "-"
        print(
            f"{r['stage']:6} {r['layout']:7} {r['rc']:>3} {r['wall_s']:>7.1f} "
            f"{r['peak_rss_gib']:>9.2f} {ep:>8}  {r['load_before'][0]:.2f}->{r['load_after'][0]:.2f}"
        )
    out = args.out or d / "bench.json"
    meta = {"cells": args.cells, "genes": args.genes, "repo": str(args.repo.resolve())}
    out.write_text(json.dumps({**meta, "nproc": os.cpu_count(), "runs": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
