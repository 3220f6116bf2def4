"""Held-out crops and the cells two or more trained runs draw for them, one row per run.

Each run's fused posterior mean of each crop is decoded and drawn as every figure draws
decoded cells (``vae.infer.encode_dataset(decode=True)``: sharp nucleus, granules, grain
where the model has those layers). Crops are the test split of the first run, the same
number per label (then unlabelled crops), so a reader compares the runs on one cell at a
time. Also prints, per run, the stain grain (:func:`vae.analysis.granules.stain_grain`)
of the drawn cells vs the inputs on the shown crops.

Example (the texture layer's figure in docs/vae.md)::

    PYTHONPATH=. python scripts/figure_drawn_cells.py \\
        outputs/real_chain/train/ctl_s0 outputs/real_chain/train/tex_s0 \\
        --paired outputs/real_chain/pair/paired.h5ad --names "no texture layer" "texture layer" \\
        --out docs/figures/real_texture_layer.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _pick(labels: np.ndarray, per_label: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    known = [k for k in sorted(set(labels)) if k not in ("", "nan", "None")]
    for k in [*known, "nan"]:
        idx = np.flatnonzero(labels == k)
        if idx.size:
            out += list(rng.choice(idx, min(per_label, idx.size), replace=False))
    return np.asarray(out, dtype=int)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="train run folders (model.pt, split.csv)")
    ap.add_argument("--paired", type=Path, required=True)
    ap.add_argument("--names", nargs="+", help="row titles, one per run (default: folder names)")
    ap.add_argument("--per-label", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vae.analysis.granules import stain_grain
    from vae.checkpoint import load_model
    from vae.data import from_anndata
    from vae.infer import encode_dataset

    names = args.names or [r.name for r in args.runs]
    if len(names) != len(args.runs):
        raise SystemExit("--names: one per run")
    adata = ad.read_h5ad(args.paired)
    from vae.analysis.run import read_split

    split = read_split(args.runs[0] / "split.csv").reindex(adata.obs_names)
    has_i = adata.obs["has_image"].to_numpy(bool)
    test = np.flatnonzero((split.to_numpy().astype(str) == "test") & has_i)
    labels = adata.obs["image_label"].astype(str).to_numpy()[test]
    rows = test[_pick(labels, args.per_label, args.seed)]
    drawn, inputs, masks = [], None, None
    for run in args.runs:
        model, _ = load_model(run / "model.pt")
        data = from_anndata(adata, image_size=model.args.crop_size)
        dec = encode_dataset(model, data, rows=rows, decode=True).decoded
        inputs, masks = dec.image, dec.mask
        drawn.append(np.clip(dec.rec_image * dec.mask[..., None], 0, 1))
    g_in = stain_grain(np.rint(inputs * 255).astype(np.uint8), masks)
    print(f"{'run':<28} cytoplasm grain drawn/input (median)  nucleus")
    for name, d in zip(names, drawn):
        g = stain_grain(d, masks)
        r = [np.nanmedian(g[:, j] / np.maximum(g_in[:, j], 1e-6)) for j in (0, 1)]
        print(f"{name:<28} {r[0]:.2f}                                  {r[1]:.2f}")
    n = rows.size
    fig, ax = plt.subplots(1 + len(drawn), n, figsize=(1.2 * n, 1.3 * (1 + len(drawn))))
    ax = np.atleast_2d(ax)
    for k in range(n):
        ax[0, k].imshow(inputs[k])
        ax[0, k].set_title(str(adata.obs["image_label"].iloc[rows[k]])[:10], fontsize=6)
        for j, d in enumerate(drawn):
            ax[1 + j, k].imshow(d[k])
        for a in ax[:, k]:
            a.set_xticks([])
            a.set_yticks([])
    for j, title in enumerate(["input", *names]):
        ax[j, 0].set_ylabel(title, fontsize=6)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
