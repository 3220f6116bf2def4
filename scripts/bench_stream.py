"""Training on data that outgrows memory: one epoch, peak RSS and cells/s (issue 12, item 5).

Two cases, each trained in its own child process (peak RSS = the child's
``ru_maxrss`` from ``os.wait4``), through the same loader as ``stage=train``
above ``hardware.stream_above_gib`` (:func:`vae.store.paired_streamed`) and
the pipeline's model and trainer settings (``pipeline/conf/`` composed with Hydra):

- ``expression``: simulated expression-only cells (negative-binomial counts of
  ``--genes`` genes, 5 cell types, ~17 % non-zero), written once as a sparse
  ``expression.h5ad`` (X log-normalised, ``layers['counts']``); X and counts stay
  CSR in the child, one batch is made dense at a time.
- ``crops``: synthetic image-only rows (``--crops`` crops of ``--size`` px, each
  one of 512 discs with a darker nucleus, colour and texture noise, drawn at
  random; content for a throughput / memory benchmark, not for a model) written once into a chunked
  crop store (:func:`vae.store.write_crop_store`) next to an obs-only
  ``crops.h5ad``; batches are read from the store. The granule head and the
  nucleus layer are switched off (``vae.granule_weight=0 vae.nucleus_weight=0``):
  their targets would be computed once per crop before the first step (a
  preprocessing pass, not streaming).

``--max-steps N`` trains the crops case on a random subset of ``N x batch``
rows (spread over the whole store) and extrapolates the epoch from its cells/s;
the report says so. Data are kept under ``--dir`` and reused; ``--clean``
deletes them at the end. Run with 1 thread under ``nice``::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/bench_stream.py --max-steps 200

Prints a table and writes JSON (``--out``); asserts no time.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30
KINDS = ["t0", "t1", "t2", "t3", "t4"]


# ------------------------------------------------------------------ data
def make_expression(path: Path, n: int, g: int, seed: int, block: int = 10_000) -> dict:
    """Sparse NB counts (n, g) of 5 types, written as an expression-only paired.h5ad."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.5, g)
    base /= base.sum()
    prog = np.ones((len(KINDS), g))
    for k in range(len(KINDS)):  # each type raises its own 5 % of the genes 4x
        prog[k, rng.choice(g, g // 20, replace=False)] = 4.0
    theta = 2.0
    kinds = rng.integers(0, len(KINDS), n)
    xs, cs = [], []
    for s in range(0, n, block):
        k = kinds[s : s + block]
        lib = rng.lognormal(np.log(600), 0.4, k.size)[:, None]
        p = base * prog[k]
        mu = p / p.sum(1, keepdims=True) * lib
        c = rng.poisson(rng.standard_gamma(theta, mu.shape) * mu / theta).astype(np.float32)
        tot = np.maximum(c.sum(1, keepdims=True), 1)
        cs.append(sp.csr_matrix(c))
        xs.append(sp.csr_matrix(np.log1p(c / tot * 1e4).astype(np.float32)))
    obs = pd.DataFrame(
        {
            "has_image": False,
            "has_expression": True,
            "label": np.asarray(KINDS)[kinds],
        },
        index=[f"c{i:07d}" for i in range(n)],
    )
    a = ad.AnnData(X=sp.vstack(xs, format="csr"), obs=obs)
    a.var_names = [f"G{i:05d}" for i in range(g)]
    a.layers["counts"] = sp.vstack(cs, format="csr")
    a.uns["has_counts"] = True
    tmp = path.with_suffix(".partial.h5ad")
    a.write_h5ad(tmp)
    os.replace(tmp, path)
    return {"nnz": int(a.X.nnz), "density": round(a.X.nnz / (n * g), 4)}


def _templates(size: int, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    crops = np.zeros((k, 3, size, size), np.uint8)
    masks = np.zeros((k, 1, size, size), np.uint8)
    for i in range(k):
        c = size / 2 + rng.normal(0, size * 0.04, 2)
        r = size * rng.uniform(0.25, 0.4)
        d2 = (yy - c[0]) ** 2 + (xx - c[1]) ** 2
        m = d2 <= r**2
        nuc = d2 <= (r * rng.uniform(0.4, 0.7)) ** 2
        col = rng.uniform(120, 220, 3)
        img = np.where(m, 1.0, 0.0)[None] * col[:, None, None]
        img = img * np.where(nuc, 0.55, 1.0)[None] + rng.normal(0, 12, (3, size, size)) * m
        crops[i] = np.clip(img, 0, 255).astype(np.uint8)
        masks[i, 0] = m
    return crops, masks


def make_crops(h5ad: Path, store: Path, n: int, size: int, seed: int) -> dict:
    """Synthetic crops into a crop store + an obs-only table (image-only rows)."""
    import anndata as ad
    import pandas as pd

    from vae.store import write_crop_store

    rng = np.random.default_rng(seed)
    # 512 distinct cells drawn in a random order: the writing costs a copy per row, not a
    # synthesis (the content does not matter to throughput or memory)
    tc, tm = _templates(size, 512, rng)
    kinds = rng.integers(0, len(KINDS), n)

    def blocks(b: int = 1024):
        for s in range(0, n, b):
            t = rng.integers(0, len(tc), min(b, n - s))
            yield tc[t], tm[t]

    src = {"synthetic": {"n": n, "size": size, "seed": seed}}
    write_crop_store(store, blocks(), n, size, source=src)
    obs = pd.DataFrame(
        {"has_image": True, "has_expression": False, "label": np.asarray(KINDS)[kinds]},
        index=[f"i{i:07d}" for i in range(n)],
    )
    ad.AnnData(obs=obs).write_h5ad(h5ad)
    return {"store_bytes": sum(f.stat().st_size for f in store.rglob("*") if f.is_file())}


# ------------------------------------------------------------------ child
def child(args) -> int:
    import torch
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs
    from pipeline.hardware import DistInfo
    from pipeline.train_args import build_model_args, build_train_args, unknown_label_code
    from vae.model import TwoBranchVAE
    from vae.store import paired_streamed
    from vae.train import train

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data, _ = paired_streamed(args.h5ad, args.store, args.image_size, build=False)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_now()
    register_configs()
    over = [
        "stage=train",
        "trainer.max_epochs=1",
        f"trainer.batch_size={args.batch_size}",
        "trainer.max_minutes=null",
        f"hardware.num_workers={args.workers}",
        "vae.granule_weight=0",
        "vae.nucleus_weight=0",
        "trainer.augment=true",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "pipeline" / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=over)
    margs = build_model_args(cfg, data, str(args.h5ad))
    targs = build_train_args(cfg, "class", unknown_label_code(data.label_names), data)
    targs.checkpoint_every_s = 1e9  # one checkpoint, after the epoch
    rng = np.random.default_rng(0)
    n = data.n
    perm = rng.permutation(n)
    n_val = args.val_rows
    n_train = n - n_val if args.max_steps <= 0 else min(n - n_val, args.max_steps * args.batch_size)
    split = np.full(n, "test", dtype=object)
    split[perm[:n_val]] = "val"
    split[perm[n_val : n_val + n_train]] = "train"
    split = split.astype(str)
    torch.manual_seed(0)
    model = TwoBranchVAE(margs)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    out_dir = Path(args.store).parent / f"run_{args.case}"
    out_dir.mkdir(exist_ok=True)
    c0 = time.process_time()
    res = train(model, data, split, targs, dist, out_dir)
    cpu = time.process_time() - c0
    h = res.history[-1]
    shutil.rmtree(out_dir, ignore_errors=True)
    print(
        json.dumps(
            {
                "rows": n,
                "train_rows": int(n_train),
                "val_rows": int(n_val),
                "steps": res.steps,
                "load_s": round(load_s, 2),
                "epoch_s": h["seconds"],
                "train_s": h["train_seconds"],
                "data_s": h["data_seconds"],
                "train_cpu_s": round(cpu, 2),
                "cells_per_s": round(n_train / h["train_seconds"], 1),
                "val_loss": h["val"]["total"],
                "rss_after_load_gib": round(rss_loaded / GIB, 3),
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        )
    )
    return 0


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(case: str, h5ad: Path, store: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--h5ad", str(h5ad), "--store", str(store)]
    cmd += ["--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    cmd += ["--workers", str(args.workers), "--val-rows", str(args.val_rows)]
    cmd += ["--max-steps", str(args.max_steps if case == "crops" else 0)]
    cmd += ["--image-size", str(args.size if case == "crops" else 64)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=ROOT)
    out = p.stdout.read().decode()
    _, status, ru = os.wait4(p.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc:
        raise SystemExit(f"{case}: child failed (exit {rc})")
    row = json.loads(out.strip().splitlines()[-1])
    row.update(
        case=case,
        wall_s=round(time.perf_counter() - t, 1),
        peak_rss_gib=round(ru.ru_maxrss * 1024 / GIB, 3),
        loadavg_before=round(load0, 2),
        loadavg_after=round(os.getloadavg()[0], 2),
    )
    # a subset's epoch: its training steps scaled to every non-validation row, plus its
    # validation pass as measured
    full = row["train_s"] * (row["rows"] - row["val_rows"]) / row["train_rows"]
    row["epoch_s_full"] = round(full + row["epoch_s"] - row["train_s"], 1)
    row["extrapolated"] = row["train_rows"] < row["rows"] - row["val_rows"]
    return row


def chunk_layouts(n: int = 8192, size: int = 128, batches: int = 10, seed: int = 0) -> None:
    """Mean read time of a random sorted 64-row batch for several zarr chunk layouts."""
    import tempfile

    import zarr

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, (1024, 3, size, size), dtype=np.uint8)
    layouts = [("c1", 1, None), ("c8", 8, None), ("c32", 32, None)]
    layouts += [("shard1024/1", 1, 1024), ("shard1024/8", 8, 1024)]
    with tempfile.TemporaryDirectory(dir=ROOT / "outputs") as d:
        for name, chunks, shards in layouts:
            g = zarr.open_group(f"{d}/{name.replace('/', '_')}.zarr", mode="w")
            a = g.create_array(
                "crops",
                shape=(n, 3, size, size),
                chunks=(chunks, 3, size, size),
                shards=None if shards is None else (shards, 3, size, size),
                dtype="uint8",
                compressors=None,
            )
            t = time.time()
            for i in range(0, n, 1024):
                a[i : i + 1024] = data
            w = time.time() - t
            ro = zarr.open_group(f"{d}/{name.replace('/', '_')}.zarr", mode="r")["crops"]
            t = time.time()
            for _ in range(batches):
                ro.oindex[np.sort(rng.choice(n, 64, replace=False))]
            r = (time.time() - t) / batches
            print(f"{name:12s} write {w:6.2f} s   read 64 random rows {r * 1000:6.1f} ms")


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cells", type=int, default=200_000, help="expression-only cells")
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--crops", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=128, help="crop side, px")
    ap.add_argument("--batch-size", type=int, default=64, help="trainer.batch_size (default 64)")
    ap.add_argument("--workers", type=int, default=0, help="hardware.num_workers (prefetch)")
    ap.add_argument("--max-steps", type=int, default=0, help="crops: train N steps, extrapolate")
    ap.add_argument("--val-rows", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["expression", "crops"], default=None)
    ap.add_argument("--dir", default=str(ROOT / "outputs/bench_stream"), help="data (reused)")
    ap.add_argument("--clean", action="store_true", help="delete the data at the end")
    ap.add_argument("--out", default=None, help="JSON (default <dir>/bench_stream.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--h5ad", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--image-size", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--chunk-layouts", action="store_true", help="time random batch reads per chunk layout"
    )
    args = ap.parse_args(argv)
    if args.chunk_layouts:
        chunk_layouts()
        return 0
    if args.child:
        args.case = args.child
        return child(args)

    from vae.store import store_is_current

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    rows, made = [], {}
    if args.only in (None, "expression"):
        h5 = d / f"expression_{args.cells}x{args.genes}_s{args.seed}.h5ad"
        if not h5.exists():
            t = time.perf_counter()
            made["expression"] = make_expression(h5, args.cells, args.genes, args.seed)
            made["expression"]["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(run_child("expression", h5, d / "none.zarr", args))
        rows[-1]["data"] = f"{args.cells} x {args.genes} sparse NB counts"
    if args.only in (None, "crops"):
        h5 = d / f"crops_{args.crops}x{args.size}_s{args.seed}.h5ad"
        store = d / f"crops_{args.crops}x{args.size}_s{args.seed}.zarr"
        if not (h5.exists() and store_is_current(store, args.crops)):
            t = time.perf_counter()
            made["crops"] = make_crops(h5, store, args.crops, args.size, args.seed)
            made["crops"]["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(run_child("crops", h5, store, args))
        rows[-1]["data"] = f"{args.crops} synthetic crops of {args.size} px"
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "cpu_count": os.cpu_count(),
        "target": {"peak_rss_gib_below": 4.0},
        "data_written": made,
        "rows": rows,
    }
    print(
        f"\none epoch, streamed; {args.threads} thread(s), batch {args.batch_size}, workers {args.workers}"
    )
    print(
        f"{'case':11s} {'rows':>7s} {'trained':>7s} {'epoch s':>8s} {'full epoch s':>12s} "
        f"{'cells/s':>8s} {'data s':>7s} {'peak RSS GiB':>12s} {'load':>5s}"
    )
    for r in rows:
        full = f"{r['epoch_s_full']:.0f}" + (" (extr.)" if r["extrapolated"] else "")
        print(
            f"{r['case']:11s} {r['rows']:7d} {r['train_rows']:7d} {r['epoch_s']:8.1f} {full:>12s} "
            f"{r['cells_per_s']:8.1f} {r['data_s']:7.1f} {r['peak_rss_gib']:12.3f} "
            f"{r['loadavg_before']:5.2f}"
        )
    out = Path(args.out) if args.out else d / "bench_stream.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if args.clean:
        for p in d.glob("*"):
            if p != out:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        print(f"deleted the data under {d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
