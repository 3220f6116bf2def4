"""README figure: a simulated smear next to a real BCCD smear, same scale.

    python scripts/figure_sim_vs_real.py [--real ../shared/data/smears/bccd/JPEGImages/BloodImage_00001.jpg]
                                         [--out docs/figures/sim_vs_real.png] [--seed 0] [--index 0] [--kind segmented_neutrophil]

The simulated image uses the default simulator settings (512 x 512 px,
mature neutrophil 60 px). The simulated panel is the part of the
simulated field (around a white cell of --kind) that the real 640 x 480 photo
would cover at the simulator's scale (red cells 34 px here, ~90 px in BCCD),
so both panels show cells at the same size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.simulator import SimulatorParams, make_gene_panel, simulate_image
from pipeline.simulator.render import RBC_DIAMETER_FACTOR

REPO = Path(__file__).resolve().parents[1]
# BCCD (640x480) red cells are ~90 px across; the simulator's 0.56 * 60 = 34 px
BCCD_RBC_PX = 90.0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--real",
        default=str(REPO / "../shared/data/smears/bccd/JPEGImages/BloodImage_00001.jpg"),
        help="a real smear photo (BCCD JPEG)",
    )
    ap.add_argument("--out", default=str(REPO / "docs/figures/sim_vs_real.png"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index", type=int, default=0, help="first simulated image index to try")
    ap.add_argument("--kind", default="segmented_neutrophil", help="white-cell kind to centre on")
    ap.add_argument("--panel", type=int, default=400, help="panel width in the figure, px")
    args = ap.parse_args()

    p = SimulatorParams(seed=args.seed)
    panel = make_gene_panel(p.n_genes, p.seed)
    # first image from --index on with an uncut white cell of --kind
    for index in range(args.index, args.index + 100):
        sim = simulate_image(p, panel, index, "train")
        hits = [a for a in sim.annotations if a["kind"] == args.kind and not a["truncated"]]
        if hits:
            break
    else:
        raise SystemExit(f"no {args.kind} in 100 images from index {args.index}")
    sim_img = Image.fromarray(sim.image)

    real = Image.open(args.real).convert("RGB")
    # same cell scale: crop the simulated field that the real photo covers at the
    # simulator's scale, around the first white cell, then show both at one size
    f = RBC_DIAMETER_FACTOR * p.wbc_diameter_px / BCCD_RBC_PX
    cw, ch = (
        min(round(real.width * f), p.image_size[1]),
        min(round(real.height * f), p.image_size[0]),
    )
    x, y, w, h = hits[0]["bbox"]
    cx = int(np.clip(x + w / 2 - cw / 2, 0, p.image_size[1] - cw))
    cy = int(np.clip(y + h / 2 - ch / 2, 0, p.image_size[0] - ch))
    sim_crop = sim_img.crop((cx, cy, cx + cw, cy + ch))
    size = (args.panel, round(args.panel * real.height / real.width))
    panels = [sim_crop.resize(size, Image.LANCZOS), real.resize(size, Image.LANCZOS)]
    pad, top = 8, 22
    fig = Image.new("RGB", (2 * size[0] + 3 * pad, size[1] + top + pad), "white")
    draw = ImageDraw.Draw(fig)
    for i, (panel, title) in enumerate(
        zip(
            panels,
            [
                f"simulated (seed {args.seed}, image {index}, {args.kind})",
                f"real: BCCD {Path(args.real).name}",
            ],
        )
    ):
        x = pad + i * (size[0] + pad)
        fig.paste(panel, (x, top))
        draw.text((x, 5), title, fill="black")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a 256-colour palette keeps the PNG small (the pixel noise defeats compression)
    fig.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
