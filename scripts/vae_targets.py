"""β-VAE targets on simulator data with true pairs (issue 5).

Two sub-commands:

``build``: a paired.h5ad straight from the simulator's ground truth (true
masks, true same-cell pairs; no Mask R-CNN), in the format of docs/artifacts.md::

    .venv/bin/python scripts/vae_targets.py build --n-images 300 --out outputs/vae_truth/paired.h5ad

``eval``: the targets of a finished ``stage=train`` run, written as JSON::

    .venv/bin/python scripts/vae_targets.py eval --run outputs/vae_truth/train \
        --out outputs/vae_truth/train/targets.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(n_images: int, crop_size: int, seed: int, out: Path, target_sum: float = 1e4) -> None:
    import anndata as ad
    from pycocotools import mask as mask_utils

    from pipeline.simulator import SimulatorParams, make_gene_panel, simulate_image
    from vae.inputs.pairing import square_crop

    params = SimulatorParams(n_images=n_images, seed=seed)
    panel = make_gene_panel(params.n_genes, seed)
    crops, masks, counts, rows = [], [], [], []
    t0 = time.time()
    for k in range(n_images):
        sim = simulate_image(params, panel, k, "train")
        for j, a in enumerate(sim.annotations):
            rle = dict(a["segmentation"])
            rle["counts"] = rle["counts"].encode("ascii")
            m = mask_utils.decode(rle).astype(bool)
            c, cm = square_crop(sim.image, m, crop_size, background=0)
            crops.append(c)
            masks.append(cm)
            counts.append(sim.counts[j])
            rows.append(
                {
                    "cell_id": a["cell_id"],
                    "kind": a["kind"],
                    "lineage": a["lineage"],
                    "t": np.nan if a["t"] is None else float(a["t"]),
                    "granule_density": float(a["granule_density"]),
                    "azurophilic_granules": int(a["azurophilic_granules"]),
                    "lobes": int(a["lobes"]),
                    "diameter": float(a["diameter"]),
                    "truncated": bool(a.get("truncated", False)),
                }
            )
        if (k + 1) % 50 == 0:
            print(f"  {k + 1}/{n_images} images, {len(rows)} cells, {time.time() - t0:.0f}s")
    obs = pd.DataFrame(rows).set_index("cell_id")
    obs.index.name = None
    cnt = np.asarray(counts, dtype=np.float32)
    lib = np.maximum(cnt.sum(1, keepdims=True), 1.0)
    x = np.log1p(cnt / lib * target_sum).astype(np.float32)
    obs["has_image"] = True
    obs["has_expression"] = True
    obs["pair_mode"] = "same_cell"
    obs["image_ref"] = obs.index
    obs["expression_ref"] = obs.index
    obs["label"] = obs["kind"]
    obs["maturation"] = obs["t"]
    var = pd.DataFrame(
        {"program": pd.Categorical(panel.program)}, index=list(map(str, panel.genes))
    )
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.layers["counts"] = cnt
    adata.uns["has_counts"] = True
    adata.obsm["crops"] = np.stack(crops).astype(np.uint8)
    adata.obsm["masks"] = np.stack(masks).astype(bool)
    adata.uns["pair_summary"] = {"source": "simulator truth (scripts/vae_targets.py build)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    print(f"wrote {out}: {adata.n_obs} cells x {adata.n_vars} genes, crops {crop_size}px")


def noise_free(run: Path, paired: Path | None, seed: int, target_sum: float = 1e4) -> np.ndarray:
    """log1p(normalised expected expression) of each row from its true kind and t."""
    import anndata as ad

    from pipeline.simulator import make_gene_panel
    from pipeline.simulator.expression import mean_profile

    if paired is None:
        from vae.analysis.targets import paired_of_run

        paired = paired_of_run(run)
    a = ad.read_h5ad(paired, backed="r")
    panel = make_gene_panel(a.n_vars, seed)
    if list(map(str, panel.genes)) != list(a.var_names):
        raise SystemExit(f"{paired}: genes differ from the simulator panel of seed {seed}")
    out = np.zeros(a.shape, np.float32)
    for i, (kind, t) in enumerate(zip(a.obs["kind"].astype(str), a.obs["t"].astype(float))):
        out[i] = np.log1p(mean_profile(panel, kind, None if np.isnan(t) else t) * target_sum)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="paired.h5ad from simulator truth")
    b.add_argument("--n-images", type=int, default=300)
    b.add_argument("--crop-size", type=int, default=64)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("eval", help="targets of a train run")
    e.add_argument("--run", type=Path, required=True, help="the train stage folder")
    e.add_argument("--paired", type=Path, default=None, help="default: from manifest.json")
    e.add_argument("--out", type=Path, default=None, help="default: RUN/targets.json")
    e.add_argument(
        "--simulator-seed",
        type=int,
        default=None,
        help="also compare with the simulator's noise-free expression (gene panel of this seed)",
    )
    a = ap.parse_args()
    if a.cmd == "build":
        build(a.n_images, a.crop_size, a.seed, a.out)
        return
    import torch

    torch.set_num_threads(1)
    from vae.analysis.targets import RunManifestError, targets_for_run

    try:
        expected = None
        if a.simulator_seed is not None:
            expected = noise_free(a.run, a.paired, a.simulator_seed)
        rep = targets_for_run(a.run, a.paired, expected)
    except RunManifestError as e:  # a run folder without a readable manifest: one line
        raise SystemExit(f"error: {e}") from None
    out = a.out or a.run / "targets.json"
    out.write_text(json.dumps(rep.to_dict(), indent=2, default=float) + "\n")
    print(f"{'target':48s} {'value':>8s} {'goal':>6s}  pass")
    for k, v in rep.values.items():
        print(f"{k:48s} {v:8.3f} {rep.targets[k]:6.2f}  {rep.passed[k]}")
    for k in (
        "t_best_dim_image_only_abs_spearman",
        "knn15_kind_accuracy_expression",
        "all_genes_from_image_mean_pearson",
        "granule_from_image_vs_noise_free_mean_pearson",
        "truth_ceiling_granule_pearson",
        "n_test",
    ):
        if k in rep.details:
            print(f"  {k}: {rep.details[k]}")
    for k, v in rep.details.items():
        if k.startswith("score_"):
            print(f"  {k}: {v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
