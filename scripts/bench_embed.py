"""``stage=embed`` on new smears: throughput and peak RSS (issue 10's benchmark).

Runs with no arguments once a finished study exists (default: ``outputs/demo``,
the README's demo run: its ``segment_train`` detector and ``train`` model)::

    .venv/bin/python scripts/bench_embed.py [--study outputs/demo] [--n 100]

1. ``stage=simulate`` writes ``--n`` new smears (``--size`` px square, seed 7: not
   the study's smears) into a temporary folder;
2. ``stage=embed embed.study=STUDY embed.smears=.../smears`` runs in a child
   process, as a user would: detector -> crops -> latent, labels, maturation,
   samples page.

Real images instead of simulated ones: ``--smears DIR`` (a folder of smear images)
or ``--crops DIR`` (a folder of single-cell crops, ``embed.crops``), the first
``--n`` files of it (sorted) copied into the temporary folder; a study without a
``segment_train`` detector uses the one shipped with the package, and
``--variant V`` picks ``train/V`` of the study::

    .venv/bin/python scripts/bench_embed.py --study outputs/real_chain --variant view_s1 \
        --smears ../shared/data/smears/txl_pbc/images/val --out outputs/bench_embed/txl_val.json

Wall time of the embed process, smears/s and cells/s, and its peak resident
memory (``ru_maxrss`` of the child, so the simulator is not counted) are printed
and written to ``--out`` (JSON). One torch thread (``hardware.torch_threads=1``);
record the machine load (``/proc/loadavg``) printed with it.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(args: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(wall s, peak RSS GiB of that child alone) of ``python -m pipeline ARGS``.

    The child's output goes to ``log`` (a pipe could fill up while we wait);
    ``os.wait4`` gives the child's own rusage (RUSAGE_CHILDREN would take the
    maximum over every child so far).
    """
    t0 = time.time()
    with open(log, "w") as fh:
        p = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, stdout=fh, stderr=fh
        )
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pipeline {' '.join(args)} failed:\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss * 1024 / 2**30  # ru_maxrss is KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--study", type=Path, default=ROOT / "outputs" / "demo")
    ap.add_argument("--n", type=int, default=100, help="new smears")
    ap.add_argument("--size", type=int, default=256, help="smear side, px")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_embed" / "embed.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--variant", default="", help="train/<variant> of the study")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--smears", type=Path, help="real smear images instead of simulated")
    src.add_argument("--crops", type=Path, help="a folder of single-cell crops (embed.crops)")
    a = ap.parse_args(argv)
    study = a.study.resolve()
    train = study / "train" / a.variant if a.variant else study / "train"
    need = [train / "model.pt", train / "latent.h5ad"]
    if a.smears is None and a.crops is None:  # simulated smears: the study's own detector
        need.append(study / "segment_train" / "model.pt")
    for f in need:
        if not f.exists():
            raise SystemExit(f"{f}: missing (run the study first, e.g. the README demo)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    common = [f"paths.root={tmp}", "hardware.torch_threads=1"]
    sim_wall = 0.0
    given = a.smears or a.crops
    if given is not None:
        import shutil

        from segmentation.io import IMAGE_SUFFIXES

        files = sorted(f for f in given.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[: a.n]
        if not files:
            raise SystemExit(f"{given}: no images")
        inputs = tmp / "inputs"
        inputs.mkdir()
        for f in files:
            shutil.copy(f, inputs / f.name)
        n, kind = len(files), ("crops" if a.crops else "smears")
    else:
        sim_wall, _ = run(
            [
                "stage=simulate",
                "experiment=new",
                f"data.simulator.n_images={a.n}",
                f"data.simulator.image_size=[{a.size},{a.size}]",
                "data.simulator.seed=7",
                *common,
            ],
            env,
            tmp / "simulate.log",
        )
        inputs, n, kind = tmp / "new" / "simulate" / "smears", a.n, "smears"
    embed_args = [
        "stage=embed",
        "experiment=embed_bench",
        f"embed.study={study}",
        f"embed.{kind}={inputs}",
        *([f"variant={a.variant}"] if a.variant else []),
        *common,
    ]
    wall, rss = run(embed_args, env, tmp / "embed.log")
    out_dir = next((tmp / "embed_bench").rglob("summary.json")).parent
    summary = json.loads((out_dir / "summary.json").read_text())
    q = out_dir / "query.h5ad"
    import anndata as ad

    cells = int(ad.read_h5ad(q, backed="r").n_obs)
    res = {
        "study": str(study),
        "variant": a.variant,
        "input": str(given) if given is not None else "simulated",
        "kind": kind,
        "smears": n,
        "smear_px": a.size if given is None else None,
        "cells_embedded": cells,
        "embed_wall_s": round(wall, 1),
        "smears_per_s": round(n / wall, 2),
        "cells_per_s": round(cells / wall, 2),
        "peak_rss_gib": round(rss, 3),
        "simulate_wall_s": round(sim_wall, 1),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "torch_threads": 1,
        "summary": summary,
    }
    print(json.dumps({k: v for k, v in res.items() if k != "summary"}, indent=2))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    if not a.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
