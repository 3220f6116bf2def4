"""Peak memory of an expression file read whole, per value: what the up-front memory
check of ``stage=embed`` assumes (``vae.inputs.expression.TABLE_BYTES_PER_VALUE`` for a
CSV / TSV table, ``MTX_BYTES_PER_ENTRY`` for a 10x matrix folder).

Each file is read by ``vae.inputs.expression.read_expression`` in its own child process;
the peak is the child's ``VmHWM`` after ``/proc/self/clear_refs`` reset it at the start
of the read (so the imports do not count), minus the RSS then. The inputs are synthetic
counts (Poisson), written under ``--dir`` and reused when present. Linux only.

Run with 1 thread::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_whole_read.py --out /tmp/wholeread.json

Prints a table and writes JSON (``--out``); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys
from vae.inputs.expression import read_expression

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
a = read_expression(sys.argv[1], orientation="cells_by_genes")
print(json.dumps({"shape": list(a.shape), "peak_over_start": status("VmHWM:") - before}))
"""


def make_table(path: Path, cells: int, genes: int, rate: float) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    x = rng.poisson(rate, (cells, genes)).astype(np.int32)
    cols = [f"G{j:05d}" for j in range(genes)]
    pd.DataFrame(x, index=[f"c{i}" for i in range(cells)], columns=cols).to_csv(path)


def make_mtx(folder: Path, cells: int, genes: int, density: float) -> None:
    import numpy as np
    import pandas as pd
    import scipy.io
    import scipy.sparse as sp

    folder.mkdir(parents=True, exist_ok=True)
    m = sp.random(genes, cells, density=density, format="coo", random_state=0)
    m.data = np.ceil(m.data * 5)
    scipy.io.mmwrite(folder / "matrix.mtx", m, field="integer")
    feats = {0: [f"E{j}" for j in range(genes)], 1: [f"G{j:05d}" for j in range(genes)]}
    pd.DataFrame(feats).to_csv(folder / "features.tsv", sep="\t", header=False, index=False)
    pd.DataFrame({0: [f"c{i}" for i in range(cells)]}).to_csv(
        folder / "barcodes.tsv", sep="\t", header=False, index=False
    )


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wholeread"))
    ap.add_argument("--table", type=int, nargs=2, default=[20000, 2000], help="cells genes")
    ap.add_argument("--mtx", type=int, nargs=2, default=[100000, 2000], help="cells genes")
    ap.add_argument("--density", type=float, default=0.03, help="of the matrix folder")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import scipy.io

    args.dir.mkdir(parents=True, exist_ok=True)
    table = args.dir / f"table_{args.table[0]}x{args.table[1]}.csv"
    if not table.is_file():
        make_table(table, *args.table, rate=0.15)
    mtx = args.dir / f"mtx_{args.mtx[0]}x{args.mtx[1]}_{args.density}"
    if not (mtx / "matrix.mtx").is_file():
        make_mtx(mtx, *args.mtx, density=args.density)
    rows = []
    for kind, path in (("table", table), ("10x_mtx", mtx)):
        load = _load()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env
        )
        if p.returncode:
            raise SystemExit(p.stderr[-2000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        cells, genes = r["shape"]
        if kind == "table":
            units, what = cells * genes, "values"
        else:
            units, what = int(scipy.io.mminfo(str(path / "matrix.mtx"))[2]), "entries"
        rows.append(
            {
                "kind": kind,
                "file": str(path),
                "cells": cells,
                "genes": genes,
                "units": units,
                "unit": what,
                "peak_mib": round(r["peak_over_start"] / 2**20),
                "bytes_per_unit": round(r["peak_over_start"] / units, 1),
                "load_before": load,
                "load_after": _load(),
            }
        )
    print(f"{'kind':8} {'cells':>7} {'genes':>6} {'values/entries':>14} {'peak MiB':>9}", end="")
    print(f" {'bytes each':>10}  load before -> after")
    for r in rows:
        print(
            f"{r['kind']:8} {r['cells']:>7} {r['genes']:>6} {r['units']:>14} {r['peak_mib']:>9}"
            f" {r['bytes_per_unit']:>10}  {r['load_before']} -> {r['load_after']}"
        )
    if args.out:
        args.out.write_text(json.dumps({"runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
