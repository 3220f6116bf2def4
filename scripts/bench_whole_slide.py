"""Whole-slide speed and peak memory of stage=segment's inference path.

A synthetic smear of ``--width`` x ``--height`` px (default 6000 x 4000, 24 MP) is
tiled from simulator fields (``pipeline.simulator``, each field a fresh seed, so the
slide holds white cells everywhere) and written as one PNG. Each case then runs in
its own process, exactly as ``stage=segment`` treats an image: read the file
(``segmentation.io.read_rgb``), settings from the composed Hydra config
(``segmentation=small_cpu``, ``data=synthetic``: input scale 0.6), the detector of
``segment_train``'s architecture (untrained unless ``--checkpoint``: an untrained
network returns about the maximum number of detections per tile, so the mask heads
and the merge work as hard as they can), tiled detection, merge, filters and crops
(``segmentation.cells.segment_image``). Peak RSS is the child's ``ru_maxrss``
(model, slide and all); megapixels are source pixels.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_whole_slide.py \
        [--case name=override,override ...] [--checkpoint model.pt]

A case's overrides are Hydra overrides plus ``channels_last=false`` (the detector
on NCHW tensors, as before issue 12) and ``bf16=true`` (every op under bf16 autocast
on the CPU; ``segmentation.cpu_bf16`` puts the backbone alone in bf16, the default
where the CPU has bf16 units); e.g. the before/after of docs/performance.md::

    --case before=segmentation.batch_megapixels=1000,channels_last=false --case now=

Prints a table and writes JSON (``--out``). Target of issue 12: >= 1 megapixel/s
per core and peak RSS < 1.5 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024**3


def make_slide(path: Path, width: int, height: int, field: int, seed: int) -> dict:
    """Tile simulator fields of ``field`` px into a (height, width) smear; write a PNG."""
    from PIL import Image

    from pipeline.simulator.dataset import SimulatorParams, simulate_image
    from pipeline.simulator.expression import make_gene_panel

    params = SimulatorParams.from_mapping(
        {"n_images": 1, "image_size": [field, field], "seed": seed}
    )
    panel = make_gene_panel(params.n_genes, seed)
    slide = np.zeros((height, width, 3), np.uint8)
    n_cells, k = 0, 0
    for y in range(0, height, field):
        for x in range(0, width, field):
            sim = simulate_image(params, panel, k, "train")
            k += 1
            h, w = min(field, height - y), min(field, width - x)
            slide[y : y + h, x : x + w] = sim.image[:h, :w]
            n_cells += len(sim.annotations)
    Image.fromarray(slide).save(path, compress_level=1)
    return {"fields": k, "field_px": field, "white_cells_in_fields": n_cells}


def child(args: argparse.Namespace) -> int:
    """One case: segment the slide as stage=segment does; print one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from bench_segmentation import compose, load_or_build

    from pipeline.stages.segment import (
        detector_kwargs,
        resolve_input_scale,
        settings_from_config,
    )
    from segmentation.cells import segment_image
    from segmentation.inference import MaskRCNNDetector
    from segmentation.io import read_rgb

    overrides = [o for o in args.overrides.split(",") if o]
    # not a config setting: MaskRCNNDetector's memory layout, to time before/after
    nchw = "channels_last=false" in overrides
    # bf16 autocast on the CPU (pipeline.hardware applies bf16 on CUDA only): timed here
    # as an option, its effect on detection quality needs a trained checkpoint
    bf16 = "bf16=true" in overrides
    overrides = [o for o in overrides if o not in ("channels_last=false", "bf16=true")]
    if bf16:  # every op in bf16, the backbone's setting off (it would nest)
        overrides.append("segmentation.cpu_bf16=false")
    cfg = compose(["stage=segment", "segmentation=small_cpu", *overrides])
    sc = cfg.segmentation
    settings = settings_from_config(sc)
    model, ckpt = load_or_build(cfg, args.checkpoint)
    settings.input_scale, _ = resolve_input_scale(cfg, ckpt)
    det = MaskRCNNDetector(
        model,
        "cpu",
        **detector_kwargs(sc),
        channels_last=False if nchw else None,
        autocast=(lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else None,
    )
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    rd = read_rgb(Path(args.slide))
    cells = segment_image(det, rd.image, Path(args.slide).name, settings)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    h, w = rd.image.shape[:2]
    print(
        json.dumps(
            {
                "wall_s": round(wall, 2),
                "cpu_s": round(cpu, 2),
                "megapixels": round(h * w / 1e6, 2),
                "mp_per_s_per_core": round(h * w / 1e6 / wall / args.threads, 3),
                "mp_per_cpu_s": round(h * w / 1e6 / cpu, 3),
                "peak_rss_gib": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3
                ),
                "rss_before_slide_gib": round(rss0 / GIB, 3),
                "detections": int(len(cells.table)),
                "kept": int(cells.table.kept.sum()) if len(cells.table) else 0,
                "tile_size": settings.tile_size,
                "batch_size": settings.batch_size,
                "batch_megapixels": settings.batch_megapixels,
                "tile_overlap": settings.tile_overlap,
                "channels_last": det.channels_last,
                "bf16_autocast": bf16,
                "bf16_backbone": det.cpu_bf16,
                "input_scale": settings.input_scale,
            }
        )
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=6000)
    ap.add_argument("--height", type=int, default=4000)
    ap.add_argument("--field", type=int, default=1000, help="simulator field side, px")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument(
        "--case",
        action="append",
        default=[],
        help="name=comma-separated Hydra overrides; default: the config as it is",
    )
    ap.add_argument("--slide", default=None, help="reuse this slide PNG")
    ap.add_argument("--overrides", default="", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "outputs/bench/whole_slide.json"))
    args = ap.parse_args()
    if args.child:
        return child(args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    slide_info: dict = {}
    if args.slide:
        slide = Path(args.slide)
    else:
        slide = out.with_suffix(".slide.png")
        t = time.perf_counter()
        slide_info = make_slide(slide, args.width, args.height, args.field, args.seed)
        slide_info["seconds"] = round(time.perf_counter() - t, 1)
    cases = [c.split("=", 1) for c in args.case] or [["config", ""]]
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for name, ov in cases:
        cmd = [sys.executable, __file__, "--child", "--slide", str(slide)]
        cmd += ["--threads", str(args.threads), "--overrides", ov]
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        load0 = os.getloadavg()[0]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            return p.returncode
        row = {"case": name, "overrides": ov, **json.loads(p.stdout.strip().splitlines()[-1])}
        row["loadavg_1min_before"] = round(load0, 2)
        row["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
        rows.append(row)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "slide": {"path": str(slide), "width": args.width, "height": args.height, **slide_info},
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "model": args.checkpoint or "untrained (segmentation=small_cpu architecture)",
        "target": {"mp_per_s_per_core": 1.0, "peak_rss_gib": 1.5},
        "rows": rows,
    }
    print(f"\nwhole slide {args.width}x{args.height}, {args.threads} thread(s), {report['model']}")
    hdr = f"{'case':22s} {'wall s':>7s} {'CPU s':>7s} {'MP/s/core':>9s} {'MP/CPU-s':>8s} {'peak GiB':>8s} {'dets':>5s} {'load':>5s}"
    print(hdr)
    for r in rows:
        print(
            f"{r['case'][:22]:22s} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} {r['mp_per_s_per_core']:9.3f} "
            f"{r['mp_per_cpu_s']:8.3f} {r['peak_rss_gib']:8.3f} {r['detections']:5d} "
            f"{r['loadavg_1min_before']:5.2f}"
        )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
