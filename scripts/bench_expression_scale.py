"""``stage=expression`` at single-cell scale: wall time, peak RSS and file size.

Each case runs ``python -m pipeline stage=expression expression=paul15
expression.input_file=FILE expression.n_top_genes=2000`` in its own child process;
peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (the resident set is also
sampled every 0.5 s, and the child is killed above ``--max-gib`` so that a run that
densifies everything cannot take the machine down: such a case reports ``killed``).

Inputs are synthetic sparse count matrices (float32 CSR, ~10 % non-zero): Paul15's 240
genes with each cell type's mean profile, plus lognormal "extra" genes up to ``--genes``
(13 named ``mt-...``), Poisson / gamma-Poisson counts, ~4000 counts per cell. They are
written once under ``--dir`` and reused (``--data`` reuses existing ones).

``--set`` adds overrides (the audit's runs had ``expression.umap=false
expression.maturation=none``: with the kNN graph, scanpy stopped at 8192 cells).
``--repo`` runs another checkout (e.g. a copy of the code before a change) with this
environment's Python, for a before/after table. Run with 1 thread::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_expression_scale.py \\
        --cells 20000 100000 --out /tmp/bench_expression.json

Prints a table and writes JSON (``--out``); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAUL15 = "expression/paul15_tradeseq_2660x240.h5ad"


def make_input(path: Path, n_cells: int, n_genes: int, shared: Path, seed: int = 0) -> None:
    """Write a synthetic sparse count ``.h5ad`` (n_cells, n_genes) at ``path``."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    p15 = ad.read_h5ad(shared / PAUL15)
    x = p15.X.toarray() if sp.issparse(p15.X) else np.asarray(p15.X)
    x = x / x.sum(1, keepdims=True)
    types = p15.obs["celltype"].astype(str).to_numpy()
    utypes = np.unique(types)
    prof = np.stack([x[types == t].mean(0) for t in utypes])  # (T, 240)
    n_extra = n_genes - prof.shape[1]
    extra = rng.lognormal(0, 2.0, n_extra)
    extra /= extra.sum()
    genes = list(p15.var_names) + [f"Gm{i:05d}" for i in range(n_extra)]
    for i in range(13):  # mitochondrial genes, for the QC filters
        genes[prof.shape[1] + i] = f"mt-Gene{i}"
    freq = pd.Series(types).value_counts(normalize=True).reindex(utypes).to_numpy()
    cell_t = rng.choice(len(utypes), n_cells, p=freq)
    lib = rng.lognormal(np.log(4000), 0.5, n_cells)
    blocks = []
    for s in range(0, n_cells, 4000):
        e = min(n_cells, s + 4000)
        r240 = prof[cell_t[s:e]] * 0.10 * lib[s:e, None]
        rx = 0.90 * lib[s:e, None] * extra[None, :]
        rx = rx * rng.gamma(2.0, 0.5, size=rx.shape).astype(np.float32)
        c = np.concatenate([rng.poisson(r240), rng.poisson(rx)], 1).astype(np.float32)
        blocks.append(sp.csr_matrix(c))
    m = sp.vstack(blocks, format="csr").astype(np.float32)
    obs = pd.DataFrame(
        {"celltype": pd.Categorical(utypes[cell_t])},
        index=[f"CELL{i:07d}-1" for i in range(n_cells)],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.h5ad")
    ad.AnnData(X=m, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(tmp)
    tmp.replace(path)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def watch(
    cmd: list[str], cwd: Path, log: Path, max_gib: float, timeout: float
) -> tuple[int, str, float, int]:
    """Run ``cmd`` in ``cwd`` (one OpenMP thread, output to ``log``), killed past
    ``max_gib`` of RSS or ``timeout`` s. Returns ``(exit code, why killed or "", wall s,
    peak RSS bytes)``; the peak is the larger of the child's ``ru_maxrss`` and the RSS
    sampled every 0.5 s (also the benchmarks' of stage=embed, bench_embed_scale.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    with open(log, "w") as out:
        p = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    killed, sampled = "", 0
    while True:
        # os.wait4, not Popen.poll: it reaps the child with its resource usage
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        sampled = max(sampled, _rss(p.pid))
        if not killed and sampled > max_gib * 2**30:
            killed = f"killed: RSS > {max_gib} GiB"
            os.killpg(p.pid, signal.SIGKILL)
        elif not killed and time.monotonic() - t0 > timeout:
            killed = f"killed: over {timeout:.0f} s"
            os.killpg(p.pid, signal.SIGKILL)
        time.sleep(0.5)
    wall = time.monotonic() - t0
    return os.waitstatus_to_exitcode(status), killed, wall, max(ru.ru_maxrss * 1024, sampled)


def run_case(
    repo: Path, input_file: Path, root: Path, max_gib: float, timeout: float, extra: list[str]
) -> dict:
    """One ``stage=expression`` in a child process; wall, peak RSS, output size."""
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "stage=expression",
        "expression=paul15",
        f"expression.input_file={input_file}",
        "expression.n_top_genes=2000",
        f"paths.root={root}",
        "experiment=bench",
        "overwrite=true",
        "hardware.torch_threads=1",
        *extra,
    ]
    log = root / "bench.log"
    root.mkdir(parents=True, exist_ok=True)
    rc, killed, wall, peak = watch(cmd, repo, log, max_gib, timeout)
    h5 = root / "bench" / "expression" / "expression.h5ad"
    return {
        "input": str(input_file),
        "repo": str(repo),
        "rc": rc,
        "killed": killed,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak / 2**30, 2),
        "output_mb": round(h5.stat().st_size / 1e6, 1) if h5.is_file() and not killed else None,
        "overrides": extra,
        "log": str(log),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--genes", type=int, default=20000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_expression_scale"))
    ap.add_argument("--data", type=Path, nargs="*", help="existing inputs (else generated)")
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout to run")
    ap.add_argument("--tag", default="", help="label of this checkout in the table")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--max-gib", type=float, default=16.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="extra overrides, e.g. expression.umap=false expression.maturation=none",
    )
    args = ap.parse_args()

    inputs = list(args.data or [])
    if not inputs:
        for n in args.cells:
            path = args.dir / "data" / f"s{n // 1000}k_{args.genes // 1000}kg.h5ad"
            if not path.is_file():
                print(f"writing {path} ...", flush=True)
                make_input(path, n, args.genes, args.shared)
            inputs.append(path)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    rows = []
    for path in inputs:
        root = args.dir / "runs" / (args.tag or "run") / path.stem
        r = run_case(
            args.repo.resolve(), path.resolve(), root, args.max_gib, args.timeout, args.set
        )
        r["tag"] = args.tag
        with open("/proc/loadavg") as f:
            r["load_after"] = " ".join(f.read().split()[:3])
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\nload before: {load}; cores: {os.cpu_count()}")
    print(f"{'tag':8} {'input':22} {'rc':>3} {'wall s':>7} {'peak GiB':>9} {'h5ad MB':>8}  note")
    for r in rows:
        print(
            f"{r['tag']:8} {Path(r['input']).name:22} {r['rc']:>3} {r['wall_s']:>7} "
            f"{r['peak_rss_gib']:>9} {r['output_mb'] if r['output_mb'] is not None else '-':>8}"
            f"  {r['killed']}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"load_before": load, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
