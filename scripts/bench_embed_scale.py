"""``stage=embed`` of a large expression file: wall time and peak RSS by cells.

Each case runs ``python -m pipeline stage=embed embed.study=STUDY
embed.expression=FILE hardware.torch_threads=1`` in its own child process; peak RSS
is the child's ``ru_maxrss`` from ``os.wait4`` (the resident set is also sampled every
0.5 s, and the child is killed above ``--max-gib`` so that a run that holds the whole
matrix cannot take the machine down: such a case reports ``killed``).

The study is a toy one trained here once (``stage=train`` of a synthetic paired table:
``--study-genes`` genes, 16 px crops, two epochs; ``--study`` reuses any finished
study instead). The inputs are synthetic sparse count ``.h5ad`` files (float32 CSR,
``--genes`` genes, ~``--nnz`` non-zero counts a cell of which a tenth in the study's
genes), written block by block with h5py (no whole matrix in this process either)
under ``--dir`` and reused when present.

``--format 10x_h5`` embeds the same counts as a Cell Ranger v3 ``.h5`` (written beside
the ``.h5ad``), ``--format csv`` as a dense CSV of cells x genes (integers; keep
``--genes`` small: every zero is written). ``--repo`` runs another checkout (e.g. a copy of the code before a change) with this
environment's Python, for a before/after table. Run with 1 thread::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_embed_scale.py \\
        --cells 100000 300000 --out /tmp/embedscale/bench.json

Prints a table and writes JSON (``--out``); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_expression_scale import watch  # noqa: E402 - the child's wall, RSS, kill rule

# stage=train of a tiny VAE in seconds (tests/helpers/run.py TINY_MODEL, one private dim)
TINY_TRAIN = [
    "vae.channels=[8,16]",
    "vae.hidden=[16]",
    "vae.n_latent=4",
    "vae.n_private=1",
    "trainer.batch_size=16",
    "trainer.max_minutes=null",
    "trainer.max_epochs=2",
    "hardware.torch_threads=1",
]
KINDS = ["myeloblast", "myelocyte", "lymphocyte"]


def gene_names(n_genes: int) -> list[str]:
    return [f"G{g:05d}" for g in range(n_genes)]


def study_gene_positions(n_genes: int, n_study: int) -> list[int]:
    """The study's genes spread over the file's (every k-th), not its first columns."""
    step = max(1, n_genes // n_study)
    return [i * step for i in range(n_study)]


def make_study(
    folder: Path, genes: list[str], repo: Path = ROOT, cells: int = 240, seed: int = 0
) -> Path:
    """Train a toy study on ``genes`` with the checkout ``repo``; returns ``<folder>/out/s``
    (the embed.study)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    study = folder / "out" / "s"
    if (study / "train" / "model.pt").is_file():
        return study
    rng = np.random.default_rng(seed)
    g, size = len(genes), 16
    code = np.arange(cells) % len(KINDS)
    yy, xx = np.mgrid[:size, :size]
    crops = np.full((cells, size, size, 3), 230, np.uint8)
    masks = np.zeros((cells, size, size), bool)
    colours = np.array([[200, 80, 160], [150, 120, 200], [90, 90, 220]])
    for i in range(cells):
        m = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size * (0.3 + 0.1 * code[i])) ** 2
        masks[i] = m
        crops[i][m] = np.clip(colours[code[i]] + rng.normal(0, 10, 3), 0, 255).astype(np.uint8)
    rate = np.exp(rng.normal(0, 1.0, (1, g)) + 1.5 * (code[:, None] == np.arange(g) % 3))
    lib = rng.integers(150, 300, cells)
    cnt = rng.poisson(rate / rate.sum(1, keepdims=True) * lib[:, None]).astype(np.float32)
    x = np.log1p(cnt / np.maximum(cnt.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    kind = np.array(KINDS)[code]
    t = np.where(code < 2, rng.uniform(0, 1, cells), np.nan)
    obs = pd.DataFrame(
        {
            "has_image": True,
            "has_expression": True,
            "pair_mode": "same_cell",
            "label": kind,
            "maturation": t,
            "t": t,
        },
        index=[f"c{i:04d}" for i in range(cells)],
    )
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))
    a.layers["counts"] = cnt
    a.uns["has_counts"] = True
    a.obsm["crops"], a.obsm["masks"] = crops, masks
    folder.mkdir(parents=True, exist_ok=True)
    a.write_h5ad(folder / "paired.h5ad")
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "stage=train",
        f"paths.root={folder / 'out'}",
        "experiment=s",
        f"paths.inputs.paired={folder / 'paired.h5ad'}",
        *TINY_TRAIN,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"training the toy study failed:\n{p.stderr[-3000:]}")
    return study


def make_input(
    path: Path, n_cells: int, n_genes: int, nnz: int, study_cols: list[int], seed: int = 0
) -> None:
    """Write a synthetic sparse count ``.h5ad`` (n_cells, n_genes) at ``path``.

    ~``nnz`` stored counts a cell (1 + Poisson(0.5)), a tenth of them in ``study_cols``;
    written a block of rows at a time straight into the CSR arrays.
    """
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    study = np.asarray(study_cols, np.int64)
    other = np.setdiff1d(np.arange(n_genes), study)
    k_s = min(len(study), max(1, nnz // 10))
    k_o = min(len(other), nnz - k_s)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(np.where(np.arange(n_cells) % 2, "b1", "b2"))},
        index=[f"CELL{i:07d}-1" for i in range(n_cells)],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.h5ad")
    ad.AnnData(obs=obs, var=pd.DataFrame(index=gene_names(n_genes))).write_h5ad(tmp)
    with h5py.File(tmp, "a") as f:
        if "X" in f:
            del f["X"]
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = (n_cells, n_genes)
        data = g.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(1 << 20,))
        idx = g.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(1 << 20,))
        ptr = [np.zeros(1, np.int64)]
        done = 0
        for s in range(0, n_cells, 4096):
            b = min(n_cells, s + 4096) - s
            cols = np.concatenate(
                [
                    study[rng.integers(0, len(study), (b, k_s))],
                    other[rng.integers(0, len(other), (b, k_o))],
                ],
                1,
            )
            cols.sort(1)
            keep = np.ones(cols.shape, bool)
            keep[:, 1:] = cols[:, 1:] != cols[:, :-1]  # a column drawn twice is stored once
            c = cols[keep].astype(np.int32)
            v = (1 + rng.poisson(0.5, c.size)).astype(np.float32)
            data.resize((done + c.size,))
            idx.resize((done + c.size,))
            data[done:], idx[done:] = v, c
            done += c.size
            ptr.append(ptr[-1][-1] + np.cumsum(keep.sum(1)))
        g.create_dataset("indptr", data=np.concatenate(ptr))
    tmp.replace(path)


def to_10x_h5(h5ad: Path, path: Path) -> None:
    """The CSR counts of ``h5ad`` as a Cell Ranger v3 ``.h5`` (its CSC of genes x cells
    holds the same three arrays), copied by h5py without loading them."""
    import h5py
    import numpy as np
    import pandas as pd
    from anndata.io import read_elem

    tmp = path.with_suffix(".tmp.h5")
    with h5py.File(h5ad, "r") as src, h5py.File(tmp, "w") as dst:
        n_cells, n_genes = (int(x) for x in src["X"].attrs["shape"])
        g = dst.create_group("matrix")
        for k in ("data", "indices", "indptr"):
            src.copy(src[f"X/{k}"], g, k)
        g["shape"] = np.array([n_genes, n_cells], np.int32)
        g["barcodes"] = np.array(read_elem(src["obs"]).index, dtype="S")
        genes = pd.Index(read_elem(src["var"]).index)
        ft = g.create_group("features")
        ft["name"] = np.array(genes, dtype="S")
        ft["id"] = np.array([f"ENSG{i:08d}" for i in range(n_genes)], dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * n_genes, dtype="S")
        ft["genome"] = np.array(["GRCh38"] * n_genes, dtype="S")
    tmp.replace(path)


def to_csv(h5ad: Path, path: Path, rows: int = 4096) -> None:
    """The CSR counts of ``h5ad`` as a dense CSV of cells x genes (a header of the genes,
    the cell ids first), written a block of rows at a time."""
    import h5py
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import read_elem

    tmp = path.with_suffix(".tmp.csv")
    with h5py.File(h5ad, "r") as src:
        obs = pd.Index(read_elem(src["obs"]).index)
        genes = pd.Index(read_elem(src["var"]).index)
        x = src["X"]
        ptr = x["indptr"][:]
        with open(tmp, "w") as f:
            for s in range(0, len(obs), rows):
                e = min(len(obs), s + rows)
                a, b = int(ptr[s]), int(ptr[e])
                m = sp.csr_matrix(
                    (x["data"][a:b], x["indices"][a:b], ptr[s : e + 1] - a),
                    shape=(e - s, len(genes)),
                )
                df = pd.DataFrame(m.toarray().astype(np.int32), index=obs[s:e], columns=genes)
                df.to_csv(f, header=s == 0)
    tmp.replace(path)


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_case(
    repo: Path, study: Path, input_file: Path, root: Path, max_gib: float, timeout: float
) -> dict:
    """One ``stage=embed`` in a child process; wall, peak RSS, cells embedded."""
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "stage=embed",
        f"embed.study={study}",
        f"embed.expression={input_file}",
        f"paths.root={root}",
        "experiment=bench",
        "overwrite=true",
        "hardware.torch_threads=1",
    ]
    log = root / "bench.log"
    root.mkdir(parents=True, exist_ok=True)
    load = _load()
    rc, killed, wall, peak = watch(cmd, repo, log, max_gib, timeout)
    summary = root / "bench" / "embed" / "summary.json"
    cells = json.loads(summary.read_text())["cells"] if summary.is_file() and not killed else None
    last = ""
    if rc:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        last = lines[-1][:200] if lines else ""
    return {
        "input": str(input_file),
        "repo": str(repo),
        "rc": rc,
        "killed": killed,
        "error": last,
        "cells_embedded": cells,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak / 2**20),
        "load_before": load,
        "load_after": _load(),
        "log": str(log),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--genes", type=int, default=20000)
    ap.add_argument("--nnz", type=int, default=1500, help="stored counts a cell (about)")
    ap.add_argument("--study-genes", type=int, default=500)
    ap.add_argument(
        "--format",
        choices=["h5ad", "10x_h5", "csv"],
        default="h5ad",
        help="file embedded (10x_h5: the .h5ad's counts copied into a Cell Ranger v3 .h5; "
        "csv: written as a dense CSV of cells x genes)",
    )
    ap.add_argument("--study", type=Path, default=None, help="a finished study (else a toy one)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/embedscale"))
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout to run")
    ap.add_argument("--tag", default="", help="label of this checkout in the table")
    ap.add_argument("--max-gib", type=float, default=12.0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    names = gene_names(args.genes)
    cols = study_gene_positions(args.genes, args.study_genes)
    if args.study is None:
        print("training the toy study ...", flush=True)
        study = make_study(
            args.dir / f"study_{args.study_genes}g", [names[c] for c in cols], args.repo.resolve()
        )
    else:
        study = args.study
    inputs = []
    for n in args.cells:
        path = args.dir / "data" / f"expr_{n // 1000}k_{args.genes // 1000}kg_{args.nnz}nnz.h5ad"
        if not path.is_file():
            print(f"writing {path} ...", flush=True)
            make_input(path, n, args.genes, args.nnz, cols)
        convert = {"10x_h5": (".h5", to_10x_h5), "csv": (".csv", to_csv)}.get(args.format)
        if convert is not None:  # the same cells written in the format asked for
            suffix, write = convert
            other = path.with_suffix(suffix)
            if not other.is_file():
                print(f"writing {other} ...", flush=True)
                write(path, other)
            path = other
        inputs.append((n, path))
    rows = []
    for n, path in inputs:
        root = args.dir / "runs" / (args.tag or "run") / path.name.replace(".", "_")
        r = run_case(
            args.repo.resolve(), study.resolve(), path.resolve(), root, args.max_gib, args.timeout
        )
        r.update(
            tag=args.tag, cells=n, genes=args.genes, file_gib=round(path.stat().st_size / 2**30, 2)
        )
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\ncores: {os.cpu_count()}; study: {study}")
    head = f"{'tag':8} {'cells':>8} {'genes':>6} {'file GiB':>8} {'rc':>3} {'seconds':>8}"
    print(f"{head} {'peak RSS MiB':>12}  load before -> after  note")
    for r in rows:
        print(
            f"{r['tag']:8} {r['cells']:>8} {r['genes']:>6} {r['file_gib']:>8} {r['rc']:>3} "
            f"{r['wall_s']:>8} {r['peak_rss_mib']:>12}  {r['load_before']} -> {r['load_after']}"
            f"  {r['killed'] or r['error']}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"study": str(study), "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
