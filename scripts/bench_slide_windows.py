"""A whole slide through ``stage=segment``: read whole vs read window by window.

Each case runs ``python -m pipeline stage=segment`` in its own process on one TIFF slide
(the shipped detector unless ``--checkpoint``; magnification measured as the shipped
detector asks) and reports its wall time, peak RSS (``ru_maxrss`` of the child), the
cells kept, kept cells found twice (two kept cells whose box centres lie closer than
``--dup-px`` source px: a cell of a windows' overlap counted in both), and how many of
the first case's kept cells the other case also kept (box centres within ``--match-px``).

``--tile N`` first writes a slide N x N times the size of ``--slide`` (its pixels
repeated, as a tiled deflate BigTIFF written tile by tile, never whole in memory): a
slide over the 1000 MP that a slide read whole may have.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_slide_windows.py --slide S.tif \
        --case whole=segmentation.slide_megapixels=1000 --case windows= --out bench.json

Prints a table and writes JSON (``--out``). One thread per process
(``hardware.torch_threads=1``); the machine's load average is recorded at each case's
start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiled_copy(src: Path, dst: Path, n: int, tile: int = 400) -> tuple[int, int]:
    """``src`` (cut to whole ``tile`` px tiles) repeated n x n times as a tiled deflate
    BigTIFF, written tile by tile: a tile never crosses a seam, and the slide is never
    whole in memory."""
    import tifffile

    from segmentation.io import SlideReader

    with SlideReader(src) as r:
        h, w = r.height // tile * tile, r.width // tile * tile

        def tiles():
            for y in range(0, h * n, tile):
                for x in range(0, w * n, tile):
                    sy, sx = y % h, x % w
                    yield r.read(sx, sy, sx + tile, sy + tile).image

        tifffile.imwrite(
            dst,
            tiles(),
            shape=(h * n, w * n, 3),
            dtype=np.uint8,
            tile=(tile, tile),
            compression="zlib",
            photometric="rgb",
            bigtiff=True,
        )
    return h * n, w * n


def run_case(name: str, overrides: list[str], slide: Path, root: Path, extra: list[str]) -> dict:
    folder = root / f"slide_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / slide.name
    if not link.exists():
        link.symlink_to(slide.resolve())
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "stage=segment",
        f"experiment=bench_{name}",
        f"paths.root={root}",
        f"paths.inputs.smears={folder}",
        "hardware.torch_threads=1",
        "overwrite=true",  # a rerun replaces the case's earlier run
        *extra,
        *overrides,
    ]
    load0 = os.getloadavg()[0]
    log = root / f"bench_{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own peak, not a running max
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"case {name} failed (rc {p.returncode}): {log}")
    import pandas as pd

    out = root / f"bench_{name}" / "segment"
    det = pd.read_csv(out / "detections.csv")
    kept = det[det["kept"]]
    return {
        "case": name,
        "overrides": overrides,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 1024**2, 3),  # ru_maxrss: KiB on Linux
        "load_start": round(load0, 2),
        "load_end": round(os.getloadavg()[0], 2),
        "detections": int(len(det)),
        "kept": int(len(kept)),
        "centres": np.c_[(kept.x0 + kept.x1) / 2, (kept.y0 + kept.y1) / 2].tolist(),
    }


def near_pairs(c: np.ndarray, px: float) -> int:
    """Pairs of points closer than ``px`` (a k-d tree: no n x n matrix)."""
    from scipy.spatial import cKDTree

    return len(cKDTree(c).query_pairs(px)) if len(c) > 1 else 0


def matched(a: np.ndarray, b: np.ndarray, px: float) -> int:
    from scipy.spatial import cKDTree

    if not len(a) or not len(b):
        return 0
    d, _ = cKDTree(b).query(a)
    return int((d < px).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", required=True, type=Path)
    ap.add_argument("--tile", type=int, default=1, help="repeat the slide N x N times first")
    ap.add_argument("--case", action="append", default=[], help="name=override,override")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--root", type=Path, default=ROOT / "outputs" / "bench_slide_windows")
    ap.add_argument("--dup-px", type=float, default=8.0)
    ap.add_argument("--match-px", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    slide = args.slide
    if args.tile > 1:
        slide = args.root / f"{args.slide.stem}_x{args.tile}.tif"
        if not slide.exists():
            t0 = time.perf_counter()
            H, W = tiled_copy(args.slide, slide, args.tile)
            print(
                f"wrote {slide} ({W}x{H} px, {W * H / 1e6:.0f} MP) in {time.perf_counter() - t0:.0f} s"
            )
    extra = [f"paths.inputs.segmentation_model={args.checkpoint}"] if args.checkpoint else []
    cases = args.case or ["whole=segmentation.slide_megapixels=1000", "windows="]
    rows = []
    for spec in cases:
        name, _, ov = spec.partition("=")
        rows.append(run_case(name, [o for o in ov.split(",") if o], slide, args.root, extra))
    ref = np.asarray(rows[0]["centres"]).reshape(-1, 2)
    from segmentation.io import tiff_size

    h, w = tiff_size(slide) or (0, 0)
    print(f"slide {slide.name}: {w}x{h} px ({w * h / 1e6:.0f} MP)")
    print(
        f"{'case':<10} {'wall s':>8} {'peak GiB':>9} {'load':>11} {'kept':>6} {'twice':>6} {'as 1st':>7}"
    )
    for r in rows:
        c = np.asarray(r.pop("centres")).reshape(-1, 2)
        r["kept_twice"] = near_pairs(c, args.dup_px)
        r["kept_as_first_case"] = matched(ref, c, args.match_px)
        load = f"{r['load_start']:.1f}->{r['load_end']:.1f}"
        print(
            f"{r['case']:<10} {r['wall_s']:>8.1f} {r['peak_rss_gib']:>9.2f} {load:>11} "
            f"{r['kept']:>6} {r['kept_twice']:>6} {r['kept_as_first_case']:>7}"
        )
    result = {
        "slide": str(slide),
        "width": w,
        "height": h,
        "megapixels": w * h / 1e6,
        "cases": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
