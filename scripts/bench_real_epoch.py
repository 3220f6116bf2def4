"""Epoch time of ``stage=train +preset=real``, before vs now, side by side in one run.

``+preset=real`` trains on a table where most rows hold expression only (the real
chain: 3154 rows, 2403 expression-only, 245 image-only, 506 paired). This script
writes a synthetic ``paired.h5ad`` with that mix (64 px crops of a stained disc with
granule-like dots, 240 genes of Poisson counts, three labelled classes on the paired
rows as ``pair=real_chain`` gives; no real data needed), then runs
``python -m pipeline stage=train +preset=real`` on it twice, one process each:

* ``before``: the tree of ``--before`` (default 930b363, the commit before
  modality-aware compute), exported with ``git archive`` to a temporary folder and
  run with this venv;
* ``now``: this working tree.

Per-epoch wall seconds come from each run's ``last.pt`` history; the CPU seconds of
each whole stage (reading, training, latents, anomaly scores) from the child's
rusage. With one torch thread, CPU time is the number load disturbs least.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_real_epoch.py --epochs 2 \
        [--now same_model=OVERRIDES ...]

``--now name=overrides`` runs this tree with Hydra overrides; ``SAME_MODEL`` below
holds the overrides that give the model of the ``before`` commit's defaults, so that
the two runs time the same network (the defaults changed in between).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIX = {"expression_only": 2403, "image_only": 245, "paired": 506}
CLASSES = ["Neutrophils", "Monocytes", "Basophils"]
# the defaults of 930b363's VAE (the model changed since: residual decoder, granule
# and nucleus layers, private dims, beta 1, per-value image weight, label head, stain
# jitter)
SAME_MODEL = (
    "same_model=vae.image_arch=plain,vae.granule_weight=0,vae.nucleus_weight=0,"
    "vae.n_private=0,vae.beta=8.0,vae.image_weight=0.01,vae.mask_weight=0.01,"
    "vae.classify_weight=0,trainer.stain_jitter=0"
)


def synthetic_paired(path: Path, seed: int = 0, genes: int = 240, size: int = 64) -> dict:
    """A paired.h5ad with the real chain's modality mix (see the module docstring)."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    ne, ni, npair = MIX["expression_only"], MIX["image_only"], MIX["paired"]
    n = ne + ni + npair
    he = np.r_[np.ones(ne, bool), np.zeros(ni, bool), np.ones(npair, bool)]
    hi = np.r_[np.zeros(ne, bool), np.ones(ni, bool), np.ones(npair, bool)]
    code = rng.integers(0, len(CLASSES), n)
    label = np.array([CLASSES[c] for c in code], dtype=object)
    label[ne : ne + ni] = ""  # detected cells without a label
    yy, xx = np.mgrid[:size, :size]
    crops = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i in np.flatnonzero(hi):
        r = size * rng.uniform(0.3, 0.45)
        m = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= r * r
        img = np.full((size, size, 3), 225, np.float32)
        img[m] = [200 - 30 * code[i], 150, 210]
        dots = m & (rng.random((size, size)) < 0.02 * (1 + code[i]))
        img[dots] = [90, 40, 120]
        crops[i] = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        masks[i] = m
    rate = np.exp(rng.normal(0.5, 1.0, (len(CLASSES), genes)))
    counts = rng.poisson(rate[code] * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)
    counts[~he] = 0
    lib = np.maximum(counts.sum(1, keepdims=True), 1.0)
    x = np.log1p(counts / lib * 1e4).astype(np.float32)
    x[~he] = 0
    obs = pd.DataFrame(index=[f"r{k:06d}" for k in range(n)])
    obs["has_image"] = hi
    obs["has_expression"] = he
    obs["pair_mode"] = np.where(hi & he, "by_label", "unpaired")
    obs["label"] = label.astype(str)
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"G{g}" for g in range(genes)]))
    a.layers["counts"] = counts
    a.obsm["crops"] = crops
    a.obsm["masks"] = masks
    a.uns["has_counts"] = True
    a.uns["crop_size"] = size
    a.uns["background_value"] = 0
    a.write_h5ad(path)
    return {"rows": n, **MIX, "genes": genes, "crop_size": size}


def run_train(
    tree: Path, paired: Path, out: Path, epochs: int, threads: int, extra: list[str]
) -> dict:
    """``python -m pipeline stage=train +preset=real`` in ``tree``; epoch times and CPU."""
    sys.path.insert(0, str(ROOT))
    from segmentation.io import load_torch_file

    cmd = [
        str(ROOT / ".venv/bin/python"),
        "-m",
        "pipeline",
        "stage=train",
        "+preset=real",
        "experiment=bench_real_epoch",
        f"paths.root={out}",
        f"paths.inputs.paired={paired}",
        f"trainer.max_epochs={epochs}",
        "trainer.max_minutes=null",
        f"hardware.torch_threads={threads}",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"{tree}: stage=train failed:\n{p.stderr[-3000:]}")
    ck = load_torch_file(out / "bench_real_epoch" / "train" / "last.pt")
    hist = ck["history"]
    return {
        "stage_wall_s": round(wall, 2),
        "stage_cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 2),
        "epoch_wall_s": [h["seconds"] for h in hist],
        "val_total": [round(float(h["val"]["total"]), 3) for h in hist],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--before", default="930b363", help="commit before modality-aware compute")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--now",
        action="append",
        default=[],
        help="name=comma-separated overrides: a run of this tree (default: now= , the "
        "defaults); e.g. the model of --before's defaults: " + SAME_MODEL,
    )
    ap.add_argument("--out", default=str(ROOT / "outputs/bench/real_epoch.json"))
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paired = tmp / "paired.h5ad"
        table = synthetic_paired(paired)
        before = tmp / "before"
        before.mkdir()
        arch = subprocess.run(
            ["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=arch, check=True)
        runs = [("before", before, [])]
        for spec in args.now or ["now="]:
            name, ov = spec.split("=", 1)
            runs.append((name, ROOT, [o for o in ov.split(",") if o]))
        for name, tree, extra in runs:
            load0 = os.getloadavg()[0]
            rows[name] = run_train(
                tree, paired, tmp / f"out_{name}", args.epochs, args.threads, extra
            )
            rows[name]["overrides"] = extra
            rows[name]["loadavg_1min_before"] = round(load0, 2)
            print(name, json.dumps(rows[name]), flush=True)
    b, n = rows["before"], rows[runs[1][0]]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "before_commit": args.before,
        "table": table,
        "threads": args.threads,
        "rows": rows,
        "last_epoch_wall_ratio": round(b["epoch_wall_s"][-1] / n["epoch_wall_s"][-1], 2),
        "stage_cpu_ratio": round(b["stage_cpu_s"] / n["stage_cpu_s"], 2),
    }
    print(f"\n+preset=real training, synthetic table of the real mix, {args.threads} thread(s)")
    print(
        f"{'run':8s} {'epoch wall s':>24s} {'stage CPU s':>12s} {'stage wall s':>12s} {'load':>5s}"
    )
    for k, r in rows.items():
        ep = " / ".join(f"{s:.1f}" for s in r["epoch_wall_s"])
        print(
            f"{k:8s} {ep:>24s} {r['stage_cpu_s']:12.1f} {r['stage_wall_s']:12.1f} {r['loadavg_1min_before']:5.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    print(f"stage CPU ratio before/{runs[1][0]}: {report['stage_cpu_ratio']:.2f}")
    print(f"last epoch wall ratio before/{runs[1][0]}: {report['last_epoch_wall_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
