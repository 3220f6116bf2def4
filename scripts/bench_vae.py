"""Training throughput of the β-VAE on this CPU: cells/s and the share of step time spent on data.

Random paired data (N cells, 240 genes, disk masks) in the in-memory layout of
``vae.data``; the model is the library's plain ``VAEArgs`` default (the first design's
plain image branch, no granule / nucleus / lobe heads, β 4; *not* the pipeline's
pipeline/conf/vae/default.yaml, whose heads make a step slower and so the data share smaller),
with ``--channels`` widths when given. For each crop size it times ``--steps``
training steps (after ``--warmup``) and splits each step into

* data: index the uint8 tensors, convert to float, flip/rot90 augmentation,
* compute: forward, all loss terms, backward, clipping, AdamW step.

    .venv/bin/python scripts/bench_vae.py --threads 1 --out outputs/bench/vae_bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae.data import PairedTensors, epoch_batches, iterate, to_batch  # noqa: E402
from vae.losses import LossWeights, vae_loss  # noqa: E402
from vae.model import TwoBranchVAE, VAEArgs  # noqa: E402


def random_data(n: int, size: int, n_genes: int, seed: int = 0) -> PairedTensors:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = size * (0.3 + 0.15 * torch.rand(n, generator=g))
    masks = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2)[None] <= (r**2)[:, None, None]).byte()
    crops = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    counts = torch.poisson(torch.full((n, n_genes), 3.0), generator=g)
    lib = counts.sum(1)
    x = torch.log1p(counts / lib[:, None] * 1e4)
    return PairedTensors(
        crops=crops * masks[:, None],
        masks=masks[:, None].contiguous(),
        x=x,
        counts=counts,
        library=lib,
        has_image=torch.ones(n, dtype=torch.bool),
        has_expression=torch.ones(n, dtype=torch.bool),
        labels=torch.zeros(n, dtype=torch.long),
        label_names=["a"],
        obs_names=[str(i) for i in range(n)],
        gene_names=[f"G{i}" for i in range(n_genes)],
        norm_total=1e4,
    )


def bench(size: int, args: argparse.Namespace) -> dict:
    data = random_data(args.cells, size, args.genes)
    channels = args.channels or [16, 32, 64, 64]
    margs = VAEArgs(
        n_genes=args.genes,
        crop_size=size,
        n_shared=16,
        channels=channels,
        hidden=[128, 64],
        norm_total=1e4,
    )
    torch.manual_seed(0)
    model = TwoBranchVAE(margs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    dev = torch.device("cpu")
    w = LossWeights()
    data_s, step_s, cells = 0.0, 0.0, 0
    done = 0
    epoch = 0
    while done < args.warmup + args.steps:
        batches = epoch_batches(
            np.arange(data.n), args.batch_size, shuffle=True, seed=0, epoch=epoch
        )
        epoch += 1
        t_data = time.perf_counter()
        for raw in iterate(data, batches):
            b = to_batch(raw, dev, augment=True, generator=gen)
            t1 = time.perf_counter()
            out = model(b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library)
            loss = vae_loss(out, b.image, b.mask, b.x, b.counts, b.library, beta=4.0, weights=w)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            t2 = time.perf_counter()
            if done >= args.warmup:
                data_s += t1 - t_data
                step_s += t2 - t_data
                cells += b.x.shape[0]
            done += 1
            t_data = time.perf_counter()
            if done >= args.warmup + args.steps:
                break
    return {
        "crop_size": size,
        "genes": args.genes,
        "batch_size": args.batch_size,
        "channels": channels,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "cells_per_s": cells / step_s,
        "step_ms": 1000 * step_s / args.steps,
        "data_ms": 1000 * data_s / args.steps,
        "data_share": data_s / step_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--genes", type=int, default=240)
    ap.add_argument("--cells", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--channels", type=int, nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/vae_bench.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [bench(s, a) for s in a.sizes]
    print(
        f"{'crop':>5s} {'genes':>5s} {'batch':>5s} {'cells/s':>8s} {'step ms':>8s} "
        f"{'data ms':>8s} {'data %':>7s}"
    )
    for r in rows:
        print(
            f"{r['crop_size']:5d} {r['genes']:5d} {r['batch_size']:5d} {r['cells_per_s']:8.1f} "
            f"{r['step_ms']:8.1f} {r['data_ms']:8.2f} {100 * r['data_share']:6.1f}%"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "threads": a.threads,
                    "torch": torch.__version__,
                },
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
