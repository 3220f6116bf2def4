"""Modality-aware compute, side by side in one run: CNNs on every row vs on the rows that need them.

Random paired data with the modality mix of ``+preset=real`` by default (76 % of rows
expression-only, 8 % image-only, 16 % paired), 64 px crops, 240 genes, the default
VAE architecture (residual image branch, 8 private dims). Times ``--steps`` training
steps (forward, loss, backward, AdamW) of each mode, alternating the modes so machine
load hits both alike, and prints a table; writes JSON.

    .venv/bin/python scripts/bench_modality_compute.py --threads 1 --out outputs/bench/modality.json

Last line: ``step time ratio all-rows/rows-needed: X.XX``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vae.model as vm  # noqa: E402
from vae.losses import LossWeights, vae_loss  # noqa: E402
from vae.model import TwoBranchVAE, VAEArgs  # noqa: E402


def _batch(b: int, size: int, genes: int, p_expr_only: float, p_img_only: float, g):
    u = torch.rand(b, generator=g)
    he = u >= p_img_only  # image-only rows first
    hi = (u < p_img_only) | (u >= p_img_only + p_expr_only)
    img = torch.rand(b, 3, size, size, generator=g) * hi.view(-1, 1, 1, 1)
    mask = torch.ones(b, 1, size, size) * hi.view(-1, 1, 1, 1)
    x = torch.rand(b, genes, generator=g) * he.view(-1, 1)
    counts = torch.poisson(torch.full((b, genes), 3.0)) * he.view(-1, 1)
    return img, mask, x, counts, counts.sum(1).clamp_min(1.0), hi, he


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--genes", type=int, default=240)
    ap.add_argument("--expr-only", type=float, default=2403 / 3154)
    ap.add_argument("--image-only", type=float, default=245 / 3154)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = TwoBranchVAE(
        VAEArgs(n_genes=a.genes, crop_size=a.size, n_private=8, image_arch="residual")
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [
        _batch(a.batch, a.size, a.genes, a.expr_only, a.image_only, g) for _ in range(a.steps)
    ]
    rows_only = vm._rows_only

    def all_rows(fn, rows, *t):
        return fn(*t)

    modes = {"all rows (before)": all_rows, "rows needed (now)": rows_only}
    times: dict[str, list[float]] = {k: [] for k in modes}
    w = LossWeights()
    for i, bt in enumerate([batches[0]] + batches):  # first batch: warm-up, not timed
        for name, fn in modes.items():
            vm._rows_only = fn
            img, mask, x, counts, lib, hi, he = bt
            t0 = time.perf_counter()
            out = model(img, mask, x, hi, he, torch.log(lib))
            loss = vae_loss(out, img, mask, x, counts, lib, beta=1.0, weights=w).total
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    vm._rows_only = rows_only
    res = {
        "threads": a.threads,
        "batch": a.batch,
        "size": a.size,
        "steps": a.steps,
        "expression_only_share": a.expr_only,
        "image_only_share": a.image_only,
        "load_average_1min": os.getloadavg()[0],
        "mean_step_s": {k: sum(v) / len(v) for k, v in times.items()},
    }
    ratio = res["mean_step_s"]["all rows (before)"] / res["mean_step_s"]["rows needed (now)"]
    res["ratio"] = ratio
    print(f"{'mode':<20} {'mean step (s)':>14}")
    for k, v in res["mean_step_s"].items():
        print(f"{k:<20} {v:>14.3f}")
    print(f"load average (1 min) during the run: {res['load_average_1min']:.2f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))
    print(f"step time ratio all-rows/rows-needed: {ratio:.2f}")


if __name__ == "__main__":
    main()
