"""Time the simulator per image: rendering alone, and the full per-image work
of stage=simulate (render + COCO RLE + expression + PNG write).

    python scripts/bench_simulator.py [--n 12] [--size 512] [--out outputs/bench_simulator.json]

Prints a table (median and mean seconds per image) and writes it as JSON.
Timings depend on machine load; the number in docs/simulator.md says which
command produced it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.simulator import SimulatorParams, make_gene_panel, render_smear, simulate_image


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=12, help="images to time")
    ap.add_argument("--size", type=int, default=512, help="image side, px")
    ap.add_argument("--out", default="outputs/bench_simulator.json")
    args = ap.parse_args()

    p = SimulatorParams(n_images=args.n, image_size=(args.size, args.size))
    panel = make_gene_panel(p.n_genes, p.seed)
    sp = p.smear_params()
    render_smear(sp, np.random.default_rng([p.seed, 10_000]))  # warm-up (imports, caches)
    rows = {"render": [], "render+coco+expression+png": []}
    n_cells = 0
    for k in range(args.n):
        t0 = time.perf_counter()
        render_smear(sp, np.random.default_rng([p.seed, k]))
        rows["render"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sim = simulate_image(p, panel, k, "train")
        Image.fromarray(sim.image).save(io.BytesIO(), format="png", compress_level=1)
        rows["render+coco+expression+png"].append(time.perf_counter() - t0)
        n_cells += len(sim.annotations)
    result = {
        "image_size": [args.size, args.size],
        "n_images": args.n,
        "white_cells_per_image": n_cells / max(args.n, 1),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "seconds_per_image": {
            k: {"median": statistics.median(v), "mean": statistics.fmean(v), "max": max(v)}
            for k, v in rows.items()
        },
    }
    print(
        f"{args.n} images of {args.size}x{args.size} px, {result['white_cells_per_image']:.1f} WBC/image, load {result['load_avg_1min']:.1f}"
    )
    print(f"{'step':32s} {'median s':>9s} {'mean s':>9s} {'max s':>9s}")
    for k, v in result["seconds_per_image"].items():
        print(f"{k:32s} {v['median']:9.3f} {v['mean']:9.3f} {v['max']:9.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
