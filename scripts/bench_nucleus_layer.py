"""Training-step cost of the nucleus layer, side by side with the same model without it.

Two seeded copies of the default image branch (residual decoder, granule layer,
8 private dims, a label head; 240 genes, 64 px crops, batch 64, random paired
data with disk masks and disk nuclei) are trained step by step in turn, A B A B
..., so machine load falls on both alike; each step is forward, every loss term,
backward, clipping and AdamW. Prints the median step time of each and the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_nucleus_layer.py --threads 1 --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_vae import random_data  # noqa: E402
from vae.data import raw_batch, to_batch  # noqa: E402
from vae.losses import LossWeights, vae_loss  # noqa: E402
from vae.model import TwoBranchVAE, VAEArgs  # noqa: E402


def make(nucleus: bool, genes: int, size: int) -> tuple[TwoBranchVAE, LossWeights]:
    torch.manual_seed(0)
    args = VAEArgs(
        n_genes=genes,
        crop_size=size,
        n_shared=16,
        n_private=8,
        image_arch="residual",
        granule_head=True,
        nucleus_head=nucleus,
        n_classes=5,
        norm_total=1e4,
    )
    w = LossWeights(granules=10.0, classify=200.0, align=20.0, align_mode="clip")
    if nucleus:
        w.nucleus = 10.0
    return TwoBranchVAE(args), w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--genes", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/nucleus_layer.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = random_data(4 * a.batch_size, a.size, a.genes)
    s = a.size
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    disk = (((yy - s / 2) ** 2 + (xx - s / 2) ** 2) <= (s / 6) ** 2).byte()
    data.nucleus = (disk[None, None] * data.masks).contiguous()
    data.granules = (torch.rand(data.masks.shape) < 0.01).byte() * data.masks
    data.labels = torch.arange(data.n) % 5
    runs = {name: make(name == "nucleus", a.genes, s) for name in ("without", "nucleus")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, (m, _) in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for step in range(a.warmup + a.steps):
        idx = torch.as_tensor(rng.choice(data.n, a.batch_size, replace=False))
        for name, (model, w) in runs.items():
            b = to_batch(raw_batch(data, idx), torch.device("cpu"), True, gen)
            t0 = time.perf_counter()
            out = model(b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library)
            loss = vae_loss(
                out, b.image, b.mask, b.x, b.counts, b.library, beta=1.0, weights=w,
                n_shared=16, labels=b.labels, granules=b.granules, nucleus=b.nucleus,
            )  # fmt: skip
            opts[name].zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opts[name].step()
            if step >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) * 1000 for k, v in times.items()}
    ratio = med["nucleus"] / med["without"]
    for k, v in med.items():
        print(f"{k:>8s}: median step {v:7.1f} ms over {a.steps} steps")
    print(f"nucleus layer / without: {ratio:.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps({"step_ms": med, "ratio": ratio, "args": vars(a)}, indent=2, default=str) + "\n"
    )


if __name__ == "__main__":
    main()
