"""Lobes drawn by a trained model on many simulated cells it never saw (issue 9).

The demo's own test split holds ~6 segmented neutrophils, too few to tell two
trainings apart (``scripts/image_branch_check.py`` reports it there). This script
encodes every cell of another simulated paired table (e.g. one that
``scripts/bench_anomaly.py`` built with another seed; none of its cells was trained
on), decodes each from its single-view code as the reconstructions are, and counts
nucleus lobes (``vae.analysis.granules``) on the drawn cell and on the nucleus layer's
own mask, against the simulator's true lobe count, over the neutrophil lineage; with a
lobe layer (``vae.lobe_head``) also the head's own count and the same model's cells
drawn without it (the head reads the code detached, so that is the paired baseline).
Granule density counted on the same drawn cells (and on the input crops) is scored
against the simulator's azurophilic density at each cell's ``t``, as
``image_branch_check.py`` scores the test split. The same lobes, granules and masked
SSIM are read on the cells drawn from each profile alone (``from_expression_*``), as
decoded and in the pose of the run's nearest training crop (evaluate's
``reconstructions.png``)::

    .venv/bin/python scripts/lobes_check.py RUN [RUN ...] --paired outputs/bench_anomaly/paired_100_seed2.h5ad

Prints one row per run (Spearman of drawn / layer / input-crop lobes vs truth, the
mean drawn lobes of segmented neutrophils, and the share of them drawn with >= 3
lobes) and writes ``lobes_check.json`` into each run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _figure(path: Path, obs, inputs, without, with_layer, n_without, n_with) -> None:
    """Input crops, cells drawn without and with the lobe layer: 6 cells of the
    lineage before the segmented stage (evenly in t) and 6 segmented neutrophils
    (evenly in true lobe count); titles: true lobes, counted without -> with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = obs["t"].to_numpy(float)
    lobes = obs["lobes"].to_numpy(float)
    seg = obs["kind"].astype(str).to_numpy() == "segmented_neutrophil"
    pick = []
    for sel, key in ((~seg, t), (seg, lobes)):
        idx = np.flatnonzero(sel)
        idx = idx[np.argsort(key[idx], kind="stable")]
        pick += list(idx[np.linspace(0, idx.size - 1, min(6, idx.size)).astype(int)])
    fig, ax = plt.subplots(3, len(pick), figsize=(1.25 * len(pick), 4.2), squeeze=False)
    for k, i in enumerate(pick):
        for r, im in enumerate((inputs[i], without[i], with_layer[i])):
            ax[r, k].imshow(np.clip(im, 0, 1))
            ax[r, k].axis("off")
        kind = str(obs["kind"].iloc[i]).replace("_neutrophil", "").replace("segmented", "seg.")
        ax[0, k].set_title(f"{kind[:12]}\ntrue {lobes[i]:.0f}", fontsize=6)
        ax[1, k].set_title(f"{n_without[i]:.0f}", fontsize=6)
        ax[2, k].set_title(f"{n_with[i]:.0f}", fontsize=6)
    for r, name in enumerate(("input", "without", "lobe layer")):
        ax[r, 0].text(
            -0.1, 0.5, name, transform=ax[r, 0].transAxes, rotation=90, ha="right", fontsize=7
        )
    fig.suptitle("unseen simulated cells: lobes counted on each drawn cell", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _own_paired(run: Path) -> Path | None:
    """The paired table ``run`` trained on: ``pair/paired.h5ad`` of its experiment, else
    the path its ``manifest.json`` records (where it still exists), else None."""
    beside = run.parent / "pair" / "paired.h5ad"
    if beside.is_file():
        return beside
    try:
        rec = json.loads((run / "manifest.json").read_text())["inputs"]["paired"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(rec) if Path(rec).is_file() else None


def _from_expression(run: Path, model, data, rows: np.ndarray, true, azu, rho, labels) -> dict:
    """Lobes and granules of the cells drawn from each profile alone (no crop), scored
    as the drawn reconstructions are: decoded as the expression expert's code is (a
    nucleus averaged over orientations) and in the pose of the run's training crop
    nearest each code (``vae.analysis.run.in_training_poses``, evaluate's
    ``reconstructions.png``); each drawn through its decoded mask. The poses come from
    the run's own paired table (:func:`_own_paired`); without it, only the pose-free
    rows."""
    from vae.analysis import granules as G
    from vae.analysis import metrics as M
    from vae.analysis.run import in_training_poses, load_run
    from vae.analysis.traverse import cell_masks, decode
    from vae.infer import encode_dataset

    he = data.has_expression.numpy().astype(bool)[rows]
    if he.sum() < 3:
        return {}
    e = encode_dataset(model, data, rows=rows[he]).expression
    r = rows[he]
    # the masked input crops in [0, 1], as evaluate's reconstruction table reads them
    crops = (data.crops[r] * data.masks[r]).permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
    crop_masks = data.masks[r][:, 0].numpy().astype(bool)

    def scored(name: str, codes: np.ndarray) -> dict:
        dec = decode(model, codes, 256, "cpu")
        masks = cell_masks(dec.masks)
        m = G.measure_batch(dec.cells(), masks, G.GranuleParams())
        # masked SSIM vs the input crop, as evaluate's "expression -> image" row scores
        ssim = float(np.nanmean(M.masked_ssim(np.clip(dec.images, 0, 1), crops, crop_masks)))
        return {
            f"from_expression_{name}_ssim": round(ssim, 3),
            f"from_expression_{name}_lobes_vs_true_spearman": rho(
                m["lobes"].to_numpy(float), true[he]
            ),
            f"from_expression_{name}_granules_vs_true_azurophilic_spearman": rho(
                m["granule_density"].to_numpy(float), azu[he]
            ),
        }

    out = scored("mean_pose", e)
    own = _own_paired(run)
    if own is not None:
        rd = load_run(run / "latent.h5ad", run / "model.pt", own)
        posed = in_training_poses(rd, e, 256)
        if posed is not None:
            out.update(scored("training_pose", posed))
        codes = {"mean_pose": e} | ({"training_pose": posed} if posed is not None else {})
        out.update(_read_back(rd, data, rows[he], labels[he], codes))
    return out


def _read_back(rd, data, rows, labels, codes: dict) -> dict:
    """``from_expression_*_readback`` (and ``input_readback``): the share of the cells whose
    drawing the run's own image encoder reads as their label, voted by the run's labelled
    training crops (``vae.analysis.readback``, evaluate's ``readback``); {} without them."""
    from vae.analysis.readback import drawing, read_back, training_voters
    from vae.analysis.run import crop_background
    from vae.analysis.traverse import decode
    from vae.inputs.schema import known_labels

    lab = rd.latent.obs["label"].astype(str).to_numpy() if "label" in rd.latent.obs else None
    if lab is None or "X_vae_image" not in rd.latent.obsm:
        return {}
    z_ref, labels_ref = training_voters(rd.latent, rd.data.has_image.numpy().astype(bool), lab)
    ok = known_labels(labels)
    if len(z_ref) == 0 or ok.sum() < 3:
        return {}
    bg = crop_background(rd)
    r = rows[ok]
    # the crops as stored (their background painted as the pair stage painted it)
    crops = (data.crops[r].float() / 255).permute(0, 2, 3, 1).numpy()
    drawings = {"input": (crops, data.masks[r][:, 0].numpy().astype(bool))}
    for name, z in codes.items():
        dec = decode(rd.model, z[ok], 256, "cpu")
        drawings[f"from_expression_{name}"] = drawing(dec.images, dec.masks, bg)
    calls = read_back(rd.model, data, r, drawings, z_ref, labels_ref, 15)
    return {f"{k}_readback": round(float(np.mean(v == labels[ok])), 3) for k, v in calls.items()}


def check(run: Path, paired: Path, figure: Path | None = None) -> dict:
    import anndata as ad
    import torch
    from scipy.stats import spearmanr

    from vae.analysis import granules as G
    from vae.checkpoint import load_model
    from vae.data import from_anndata
    from vae.infer import encode_dataset

    if not Path(paired).is_file():
        raise SystemExit(f"{paired}: no such file")
    a = ad.read_h5ad(paired)
    missing = [c for c in ("lineage", "lobes", "t", "kind") if c not in a.obs]
    if missing:
        raise SystemExit(
            f"{paired}: obs lacks {missing}; it must be a simulated paired table "
            "(stage=pair on simulator cells)"
        )
    model, _ = load_model(run / "model.pt")
    data = from_anndata(a, image_size=model.args.crop_size)
    o = a.obs
    neut = (
        data.has_image.numpy().astype(bool)
        & o["lineage"].astype(str).eq("neutrophil").to_numpy()
        & np.isfinite(o["lobes"].to_numpy(float))
    )
    rows = np.flatnonzero(neut)
    dec = encode_dataset(model, data, rows=rows, decode=True).decoded
    masks = dec.mask
    drawn = G.measure_batch(dec.rec_image * masks[..., None], masks, G.GranuleParams())
    z = encode_dataset(model, data, rows=rows, views=1).joint
    with torch.no_grad():
        out = model.decode(torch.from_numpy(z.astype(np.float32)))
    lg = out.nucleus_logits
    layer = np.array([G.count_lobes(m) for m in (lg[:, 0] > 0).numpy() & masks])
    head = None
    if out.lobe_logits is not None:
        # the lobe layer's own count, and the same model drawn without it (the head
        # reads the code detached: same latent, so this is the paired comparison)
        from vae.lobes import lobe_count, without_lobe_layer

        head = lobe_count(out.lobe_logits).numpy().astype(float)
        with without_lobe_layer(model):
            d0 = encode_dataset(model, data, rows=rows, decode=True).decoded
        plain = G.measure_batch(d0.rec_image * masks[..., None], masks, G.GranuleParams())
    crops = (data.crops[rows] * data.masks[rows]).permute(0, 2, 3, 1).numpy()
    inp = G.measure_batch(crops, data.masks[rows][:, 0].numpy().astype(bool), G.GranuleParams())
    true = o["lobes"].to_numpy(float)[rows]
    seg = o["kind"].astype(str).to_numpy()[rows] == "segmented_neutrophil"
    d = drawn["lobes"].to_numpy(float)

    def rho(x, ref=true) -> float:
        # undefined (NaN, said as such) where either side is constant: a tiny test set
        # whose cells all draw one lobe, without scipy's ConstantInputWarning
        x, ref = np.asarray(x, float), np.asarray(ref, float)
        if np.ptp(x) == 0 or np.ptp(ref) == 0:
            return float("nan")
        return round(float(spearmanr(x, ref).correlation), 3)

    # granules: the measure of image_branch_check.py (granule density counted on the
    # drawn cell vs the simulator's azurophilic density at the cell's t), on these cells
    from pipeline.simulator.morphology import azurophilic_density

    t = o["t"].to_numpy(float)[rows]
    azu = np.array([azurophilic_density(v) for v in t])

    labels = o["label"].astype(str).to_numpy()[rows] if "label" in o else np.full(rows.size, "")
    extra = {**_from_expression(run, model, data, rows, true, azu, rho, labels)}
    if head is not None and figure is not None:
        _figure(
            figure,
            o.iloc[rows],
            dec.image,
            d0.rec_image * masks[..., None],
            dec.rec_image * masks[..., None],
            plain["lobes"].to_numpy(float),
            d,
        )
    if head is not None:
        extra |= {
            "head_lobes_vs_true_spearman": rho(head),
            "drawn_without_lobe_layer_spearman": rho(plain["lobes"].to_numpy(float)),
            "segmented_mean_head_lobes": round(float(head[seg].mean()), 2),
        }
    return {
        "run": str(run),
        "paired": str(paired),
        "n_cells": int(rows.size),
        "n_segmented": int(seg.sum()),
        "drawn_lobes_vs_true_spearman": rho(d),
        "layer_lobes_vs_true_spearman": rho(layer),
        "input_lobes_vs_true_spearman": rho(inp["lobes"].to_numpy(float)),
        "segmented_mean_true_lobes": round(float(true[seg].mean()), 2),
        "segmented_mean_drawn_lobes": round(float(d[seg].mean()), 2),
        "segmented_drawn_3plus_share": round(float((d[seg] >= 3).mean()), 3),
        "segmented_layer_mean_lobes": round(float(layer[seg].mean()), 2),
        "drawn_granules_vs_true_azurophilic_spearman": rho(
            drawn["granule_density"].to_numpy(float), azu
        ),
        "input_granules_vs_true_azurophilic_spearman": rho(
            inp["granule_density"].to_numpy(float), azu
        ),
        **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--paired", type=Path, required=True)
    ap.add_argument(
        "--figure",
        type=Path,
        help="PNG of input / drawn without / drawn with the lobe layer (first run, lobe layer only)",
    )
    args = ap.parse_args()
    keys = None
    for run in args.runs:
        r = check(run, args.paired, args.figure if run == args.runs[0] else None)
        (run / "lobes_check.json").write_text(json.dumps(r, indent=2))
        shown = {k: v for k, v in r.items() if k not in ("run", "paired")}
        if keys is None:
            keys = list(shown)
            print(f"{'run':<28} " + " ".join(f"{k[:22]:>22}" for k in keys))
        print(f"{run.name:<28} " + " ".join(f"{str(v):>22}" for v in shown.values()), flush=True)


if __name__ == "__main__":
    main()
