"""Image-branch check of a finished ``stage=train`` run: one table, one JSON (issue 9).

Reads ``model.pt`` (or another checkpoint of the run, ``--checkpoint last.pt``),
``split.csv`` and the ``paired.h5ad`` the run trained on, and measures on the test split
(rows never used for early stopping):

- kNN(15) class accuracy (``obs['label']``) of the image-only (shared + image-private
  dims, and shared dims only, as ``stage=evaluate`` reports it), expression-only and
  fused latents: fitted on the train+val rows, scored on the test rows (``joint``: every
  labelled test row, most of them expression-only on real data; ``joint_image_rows``:
  the test rows with a crop); with the majority-class rate of the labelled test image rows;
  ``_per_cell``: the same with each specimen counted once (``obs['specimen']``: a BCCD
  smear cell and the curated crop cut from it are one cell, two rows);
- active units: latent dims whose mean KL of the fused posterior exceeds 0.01 nats;
- masked SSIM of the fused reconstructions (decoded from the single-view posterior mean;
  the latents use the model's ``encode_views`` unless ``--views`` says otherwise);
- raw-pixel PCA baseline: kNN accuracy of the first ``n_latent`` PCs of the masked crops;
- morphology kept beyond the labels (``morphology_*``): a ridge from the image code, and
  from as many raw-pixel PCs, to each feature ``vae.analysis.granules`` measures on the
  input crop (lobes, nucleus fraction, granule density, cytoplasm hue, saturation, GLCM
  contrast), fitted on the train+val crops, Spearman on the test crops: all of them and
  (``_within``) those of the most common label;
- on real data with a pseudotime (``obs['maturation']``, stage=expression's): the fused
  latent of the test profiles of the maturation stages (the model's maturation classes,
  or ``--stages``) against it: best dim, the maturation axis (dim 0) and within each stage;
- with simulator truth in ``obs``: best single latent dim vs true t (|Spearman|),
  granule density measured by ``vae.analysis.granules`` on the reconstructions vs the
  true azurophilic density, decoded lobes vs true lobes (neutrophil lineage); the granule
  and nucleus layers' own outputs decoded, like the reconstructions, from each cell's
  single-view code (the crop as given);
- the drawings read back (``readback_*``): the share of the test rows with a crop, a
  profile and a label whose input crop, joint reconstruction and cell drawn from
  expression (as decoded, and in a training crop's pose) the model's own image encoder
  reads as that label (stage=evaluate's ``readback``, ``vae.analysis.readback``);
- with ``--traverse EXP/traverse``: the truth-recovery numbers ``stage=traverse`` wrote
  (``traverse_summary.json``: decoded granules / lobes vs truth, path position vs t) and
  the GP path's drawn steps read back by the image encoder, against the path's class
  order (``traverse_gp_drawn_read_order_spearman``);
- with ``--unseen PAIRED``: every neutrophil-lineage cell of another simulated paired table
  the run never saw (``unseen_*``: drawn lobes and granules vs truth, the lobe head's count,
  the input crops' own reading; ``scripts/lobes_check.py``). The demo's test split holds
  ~6 segmented neutrophils, too few to tell a model from a seed (docs/vae.md, "How many
  epochs the drawn lobes need"); ``outputs/sim1`` there is 224 such cells.

    .venv/bin/python scripts/image_branch_check.py outputs/demo/train \
        [--paired outputs/demo/pair/paired.h5ad] [--out outputs/demo/train/image_branch.json] \
        [--unseen outputs/sim1/pair/paired.h5ad]

The last line reads ``image-only kNN X.XX | joint kNN Y.YY | active units A/D | SSIM S.SS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:
    from vae.infer import Latents


def _knn_calls(
    z_fit: np.ndarray, y_fit: np.ndarray, z: np.ndarray, y: np.ndarray, k: int = 15
) -> tuple[np.ndarray, np.ndarray] | None:
    """kNN(k) calls of the test rows, voted by the train+val rows (NaN rows dropped):
    (the test rows with a finite code, their calls), or None when too few rows.

    The vote is ``stage=evaluate``'s (:func:`vae.analysis.metrics.knn_predict`); only
    the reference differs: evaluate's is the train split alone."""
    from vae.analysis.metrics import knn_predict

    a, b = np.isfinite(z_fit).all(1), np.isfinite(z).all(1)
    if a.sum() < 2 or b.sum() < 1:
        return None
    return b, knn_predict(z[b], y[b], k, z_fit[a], y_fit[a])


def _scored(
    y: np.ndarray,
    calls: tuple[np.ndarray, np.ndarray] | None,
    specimens: np.ndarray | None = None,
    sources: np.ndarray | None = None,
) -> float:
    """Accuracy of :func:`_knn_calls`' calls; with ``specimens`` ((n,) ids of the test
    rows, and their image ``sources``) each cell counts once
    (:func:`vae.analysis.metrics.per_cell_weights`)."""
    from vae.analysis.metrics import per_cell_weights, weighted_accuracy

    if calls is None:
        return float("nan")
    b, pred = calls
    w = (
        per_cell_weights(specimens[b], None if sources is None else sources[b])
        if specimens is not None
        else np.ones(int(b.sum()))
    )
    return weighted_accuracy(y[b], pred, w)


def _knn(z_fit: np.ndarray, y_fit: np.ndarray, z: np.ndarray, y: np.ndarray, k: int = 15) -> float:
    """kNN(k) accuracy of the test rows (:func:`_knn_calls`, :func:`_scored`)."""
    return _scored(y, _knn_calls(z_fit, y_fit, z, y, k))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import stats

    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(stats.spearmanr(a[ok], b[ok])[0])


def _medians_by_kind(res: dict, prefix: str, kinds, inputs, drawn, ok: np.ndarray) -> None:
    """``res["<prefix>_<kind>_input_drawn"]`` = [median of ``inputs``, of ``drawn``] over
    the ``ok`` rows of each labelled kind with 3 or more of them; nothing without
    ``kinds``."""
    from vae.data import UNKNOWN_LABEL

    if kinds is None:
        return
    for k in sorted(set(kinds[ok]) - {"", "nan", UNKNOWN_LABEL}):
        sel = ok & (kinds == k)
        if sel.sum() >= 3:
            res[f"{prefix}_{k}_input_drawn"] = [
                round(float(np.median(inputs[sel])), 4),
                round(float(np.median(drawn[sel])), 4),
            ]


def _figure(path: Path, inputs, rows: np.ndarray, dec: np.ndarray, obs, n: int = 12) -> None:
    """Masked input (top) and fused reconstruction (bottom) of ``n`` test cells, by class/t.

    ``inputs`` : (n_rows, S, S, 3) the masked crops as the model sees them, in [0, 1]

    ``dec`` : (n_rows, S, S, 3) the reconstructions drawn as every figure draws decoded
    cells (``Decoded.rec_cells``: through the decoded mask)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.arange(rows.size)
    if "t" in obs and np.isfinite(obs["t"].to_numpy(float)).any():
        order = np.argsort(obs["t"].to_numpy(float))
    elif "label" in obs:
        order = np.argsort(obs["label"].astype(str).to_numpy(), kind="stable")
    pick = order[np.linspace(0, order.size - 1, min(n, order.size)).astype(int)]
    fig, ax = plt.subplots(2, pick.size, figsize=(1.3 * pick.size, 3.0), squeeze=False)
    for k, i in enumerate(pick):
        ax[0, k].imshow(inputs[i])
        ax[1, k].imshow(np.clip(dec[i], 0, 1))
        lab = str(obs["label"].iloc[i]) if "label" in obs else ""
        ax[0, k].set_title(lab[:10], fontsize=6)
        for a in ax[:, k]:
            a.axis("off")
    ax[0, 0].text(-0.1, 0.5, "input", transform=ax[0, 0].transAxes, rotation=90, ha="right")
    ax[1, 0].text(-0.1, 0.5, "decoded", transform=ax[1, 0].transAxes, rotation=90, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pseudotime_check(
    res: dict, z: np.ndarray, obs, labels: np.ndarray, stages: list[str], axis: bool
) -> None:
    """Real data: the latent against ``obs['maturation']`` (stage=expression's pseudotime
    of each profile) on the test rows with a profile whose label is one of ``stages``:
    best single dim |Spearman| and, with the ordinal head (``axis``), its dim 0 (signed:
    the head orders dim 0 by stage), overall and within each stage. The head is trained
    on stage ranks only, so the within-stage order is a check it was not fitted to."""
    t = obs["maturation"].to_numpy(float)
    sel = np.isin(labels, stages) & np.isfinite(t)
    res["pseudotime_rows"] = int(sel.sum())
    if sel.sum() < 3:
        return
    rho = [abs(_spearman(z[sel, j], t[sel])) for j in range(z.shape[1])]
    res["best_dim_vs_pseudotime_spearman"] = float(np.nanmax(rho))
    if axis:
        res["maturation_axis_vs_pseudotime_spearman"] = _spearman(z[sel, 0], t[sel])
    for st in stages:
        w = sel & (labels == st)
        if w.sum() >= 3:
            key = "maturation_axis" if axis else "best_dim"
            j = 0 if axis else int(np.nanargmax(rho))
            res[f"{key}_vs_pseudotime_within_{st.replace(' ', '_')}"] = _spearman(z[w, j], t[w])


# features of vae.analysis.granules.CellFeatures that vary within a cell type (nucleus
# shape, granularity, cytoplasm colour and texture); cell_area is left out: every crop
# is cut around its cell, so it measures the framing, not the cell
MORPHOLOGY_FEATURES = (
    "lobes",
    "nucleus_fraction",
    "granule_density",
    "cytoplasm_hue",
    "cytoplasm_saturation",
    "glcm_contrast",
)


def _morphology(res: dict, data, z: np.ndarray, fit: np.ndarray, test: np.ndarray, y, pix) -> None:
    """Does the image code keep the measured morphology of held-out crops, beyond labels?

    Ridge from the image code (and, as the baseline, from as many raw-pixel PCs) to each
    feature the instruments measure on the input crop, fitted on the train+val crops
    (labelled or not) and scored by Spearman on the test crops: over all test crops and
    within their most common label (what a strong label head could have erased). Adds
    ``morphology_{image,pixel_pca}[_within]_<feature>`` and their ``_mean``.
    """
    from sklearn.decomposition import PCA

    from vae.analysis import granules as G
    from vae.analysis.metrics import feature_prediction
    from vae.data import UNKNOWN_LABEL

    if fit.size <= z.shape[1] or test.size < 10:  # too few crops for a ridge / a score
        return
    rows = np.concatenate([fit, test])
    crops = data.crops[rows].permute(0, 2, 3, 1).numpy()  # (n, S, S, 3) uint8
    masks = data.masks[rows, 0].numpy().astype(bool)
    feats = G.measure_batch(crops * masks[..., None], masks)[list(MORPHOLOGY_FEATURES)]
    f = feats.to_numpy(float)
    f_fit, f_test = f[: fit.size], f[fit.size :]
    pca = PCA(z.shape[1], random_state=0)
    codes = {
        "image": (z[fit], z[test]),
        "pixel_pca": (pca.fit_transform(pix(fit)), pca.transform(pix(test))),
    }
    yt = y[test]
    known = yt[yt != UNKNOWN_LABEL]
    within = None
    if known.size:
        vals, cnt = np.unique(known, return_counts=True)
        if cnt.max() >= 10:  # feature_prediction's floor of held-out rows
            within = str(vals[cnt.argmax()])
            res["morphology_within_label"] = within
    for name, (zf, zt) in codes.items():
        subsets = [("", np.ones(test.size, bool))]
        if within is not None:
            subsets.append(("_within", yt == within))
        for tag, sel in subsets:
            rho = feature_prediction(zf, f_fit, zt[sel], f_test[sel])
            for feat, r in zip(MORPHOLOGY_FEATURES, rho):
                res[f"morphology_{name}{tag}_{feat}"] = float(r)
            res[f"morphology_{name}{tag}_mean"] = float(np.nanmean(rho))


def check(
    run: Path,
    paired: Path | None,
    traverse: Path | None,
    views: int | None = None,
    stages: list[str] | None = None,
    lobe_deep_valley: str = "model",
    unseen: Path | None = None,
    checkpoint: str = "model.pt",
) -> dict:
    import anndata as ad
    import pandas as pd
    import torch

    from vae.analysis import granules as G
    from vae.checkpoint import load_model
    from vae.data import UNKNOWN_LABEL, from_anndata
    from vae.infer import encode_dataset
    from vae.losses import kl_normal, masked_ssim
    from vae.train import active_units

    if checkpoint != "model.pt" and (unseen is not None or traverse is not None):
        # both read what model.pt gave (lobes_check loads it; stage=traverse ran on it)
        raise SystemExit(
            "--unseen and --traverse read the run's model.pt: leave --checkpoint out with them"
        )
    model, meta = load_model(run / checkpoint)
    manifest = (
        json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else {}
    )
    if paired is None:
        src = manifest.get("inputs", {}).get("paired", {})
        paired = Path(src.get("path", "")) if isinstance(src, dict) else Path(str(src))
    adata = ad.read_h5ad(paired)
    from vae.analysis.run import read_split

    split = read_split(run / "split.csv").reindex(adata.obs_names)
    data = from_anndata(adata, image_size=model.args.crop_size)
    sp = split.to_numpy().astype(str)
    test = np.flatnonzero(sp == "test")
    fit = np.flatnonzero(sp != "test")
    views = int(getattr(model.args, "encode_views", 1)) if views is None else views
    lat_all = encode_dataset(model, data, views=views)
    obs = adata.obs.iloc[test]
    has_i_all = data.has_image.numpy().astype(bool)
    has_e_all = data.has_expression.numpy().astype(bool)
    has_i, has_e = has_i_all[test], has_e_all[test]

    res: dict = {
        "run": str(run),
        "checkpoint": checkpoint,
        "epoch": meta.get("epoch"),  # of the checkpoint measured (None: not recorded)
        "paired": str(paired),
        "n_test": int(test.size),
        "encode_views": views,
    }
    # label codes as the trainer sees them (vae.data normalises unknown labels)
    y_all = np.asarray(data.label_names)[data.labels.numpy()]
    lab_all = y_all != UNKNOWN_LABEL
    if lab_all.any():
        y, lab = y_all[test], lab_all[test]
        yf, labf = y_all[fit], lab_all[fit]
        vals, cnt = np.unique(y[lab & has_i], return_counts=True)
        res["n_test_image_labelled"] = int(cnt.sum())
        res["majority_image_rows"] = float(cnt.max() / cnt.sum()) if cnt.size else float("nan")
        ns = model.args.n_shared
        # as stage=evaluate: a test row whose expression profile is also a train/val
        # row's (pairing by label reuses profiles) is left out where expression is read
        from vae.analysis.evaluate import seen_profiles

        fresh = ~seen_profiles(adata, test)[test]
        res["n_test_profile_in_training"] = int((~fresh).sum())
        spec = (
            adata.obs["specimen"].astype(object).to_numpy()[test]
            if "specimen" in adata.obs
            else None
        )
        srcs = (
            adata.obs["image_source"].astype(object).to_numpy()[test]
            if "image_source" in adata.obs
            else None
        )
        if spec is not None:
            from vae.analysis.metrics import per_cell_weights

            sel = lab & has_i
            res["n_test_image_labelled_cells"] = round(
                float(per_cell_weights(spec[sel], None if srcs is None else srcs[sel]).sum()), 1
            )
        for name, zz, hf, ht in (
            ("image", lat_all.image, has_i_all[fit], has_i),
            ("image_shared", lat_all.image[:, :ns], has_i_all[fit], has_i),
            ("expression", lat_all.expression, has_e_all[fit], has_e & fresh),
            ("joint", lat_all.joint, np.ones(fit.size, bool), fresh),
            # the fused code of the cells that have a crop (image + expression where paired)
            ("joint_image_rows", lat_all.joint, np.ones(fit.size, bool), has_i & fresh),
        ):
            calls = _knn_calls(zz[fit][labf & hf], yf[labf & hf], zz[test][lab & ht], y[lab & ht])
            res[f"knn_{name}"] = _scored(y[lab & ht], calls)
            if calls is not None:
                # the sampling error of ~150 test crops: an exact binomial 95 % interval
                # (crops taken as independent; a BCCD cell present twice, as a smear
                # detection and a curated crop, makes the true interval a little wider)
                from vae.analysis.samples import proportion_ci

                b, pred = calls
                n_ok = int((y[lab & ht][b] == pred).sum())
                res[f"knn_{name}_n"] = int(b.sum())
                res[f"knn_{name}_ci95"] = [round(v, 4) for v in proportion_ci(n_ok, int(b.sum()))]
            if spec is not None:
                # one cell through two image sources (a BCCD smear cell and its curated
                # crop) counted once, not once per copy: the same calls, weighted
                res[f"knn_{name}_per_cell"] = _scored(
                    y[lab & ht],
                    calls,
                    specimens=spec[lab & ht],
                    sources=None if srcs is None else srcs[lab & ht],
                )
        from sklearn.decomposition import PCA

        def pix(rows: np.ndarray) -> np.ndarray:
            c = data.crops[rows].float().div(255) * data.masks[rows].float()
            return c.flatten(1).numpy()

        rf, rt = fit[labf & has_i_all[fit]], test[lab & has_i]
        if rf.size > model.n_latent and rt.size:
            pca = PCA(model.n_latent, random_state=0).fit(pix(rf))
            res["knn_pixel_pca"] = _knn(
                pca.transform(pix(rf)), y_all[rf], pca.transform(pix(rt)), y_all[rt]
            )
        _morphology(res, data, lat_all.image, fit[has_i_all[fit]], test[has_i], y_all, pix)
        if data.diameter is not None:
            # the test crops whose size the table knows (stage=segment's) and the others
            known = np.isfinite(data.diameter.numpy())[test]
            zi = lat_all.image
            for tag, sel in (("size_known", known), ("size_unknown", ~known)):
                t_rows = lab & has_i & sel
                res[f"n_test_image_labelled_{tag}"] = int(t_rows.sum())
                res[f"knn_image_{tag}"] = (
                    _knn(
                        zi[fit][labf & has_i_all[fit]],
                        yf[labf & has_i_all[fit]],
                        zi[test][t_rows],
                        y[t_rows],
                    )
                    if t_rows.any()
                    else float("nan")
                )
    if data.diameter is not None and getattr(model.args, "size_head", False):
        # the size head on the image code of each test crop vs the crop's own size
        dia = data.diameter.numpy()
        rows = test[has_i & np.isfinite(dia[test])]
        with torch.no_grad():
            dec = model.decode(torch.from_numpy(lat_all.image[rows]).float(), use_expression=False)
            got = model.diameter_px(dec.size).numpy()
        res["decoded_size_vs_input_spearman"] = _spearman(got, dia[rows])
        res["decoded_size_rows"] = int(rows.size)

    joint = torch.from_numpy(lat_all.joint[test])
    kl_dim = kl_normal((joint, torch.from_numpy(lat_all.joint_logvar[test]))).mean(0).numpy()
    res["kl_per_dim"] = [round(float(v), 4) for v in kl_dim]
    res["active_units"] = active_units(kl_dim)
    res["n_latent"] = int(model.n_latent)

    # reconstructions from the fused posterior mean, test rows with an image
    rows = test[has_i]
    if rows.size:
        dec = encode_dataset(model, data, rows=rows, decode=True).decoded
        dec_imgs = dec.rec_image * dec.mask[..., None]  # the cell only, (n, S, S, 3)

        def chw(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).float().permute(0, 3, 1, 2)

        m = torch.from_numpy(dec.mask).float()[:, None]
        res["ssim_joint"] = float(masked_ssim(chw(dec.image), chw(dec_imgs), m).mean())
        fig = run / f"image_branch_recon{_suffix(checkpoint)}.png"
        _figure(fig, dec.image, rows, dec.rec_cells(), obs[has_i])
        # lobes drawn vs lobes of the input crop, both read by the lobe counter: needs no
        # truth, so it scores real crops too (with a lobe layer, also without it: the
        # head reads the code detached, so that is the same model's paired baseline)
        # the counter's second cut rule as the lobe head was trained with (vae.lobe_deep_valley)
        # unless told otherwise, so input and drawn lobes are read as the head learned them
        deep = (
            getattr(model.args, "lobe_deep_valley", None)
            if lobe_deep_valley == "model"
            else None
            if lobe_deep_valley == "none"
            else float(lobe_deep_valley)
        )
        res["lobe_deep_valley"] = deep
        params = G.GranuleParams(lobe_deep_valley_ratio=deep)
        # the masked input crops as the model saw them, uint8 as the instruments read them
        inputs_u8 = np.rint(dec.image * 255).astype(np.uint8)
        meas_in = G.measure_batch(inputs_u8, dec.mask, params)
        meas_out = G.measure_batch(dec_imgs, dec.mask, params)
        inp_lobes = meas_in["lobes"].to_numpy(float)
        drawn_lobes = meas_out["lobes"].to_numpy(float)
        res["drawn_lobes_vs_input_lobes_spearman"] = _spearman(drawn_lobes, inp_lobes)
        # the drawn cytoplasm's colour vs the input's, cell by cell (eosinophil orange,
        # basophil violet...): hue is circular, so it is read as its offset from the
        # inputs' circular mean, which no cell here crosses (pink-violet stains)
        for col in ("cytoplasm_hue", "cytoplasm_saturation"):
            a, b = meas_in[col].to_numpy(float), meas_out[col].to_numpy(float)
            if col == "cytoplasm_hue":
                ok = np.isfinite(a)
                ref = np.degrees(np.angle(np.exp(1j * np.radians(a[ok])).mean())) if ok.any() else 0
                a, b = ((x - ref + 180) % 360 - 180 for x in (a, b))
            ok = np.isfinite(a) & np.isfinite(b)
            res[f"drawn_{col}_vs_input_spearman"] = _spearman(b[ok], a[ok])
        # how granular the drawn cell looks vs its input: the stain's fine detail on the
        # cytoplasm and the nucleus (what the texture layer learns; a smooth drawing ~0)
        g_in = G.stain_grain(inputs_u8, dec.mask, params)
        g_out = G.stain_grain(dec_imgs, dec.mask, params)
        kinds_g = obs["image_label"].astype(str).to_numpy()[has_i] if "image_label" in obs else None
        for j, part in enumerate(("cytoplasm", "nucleus")):
            ok = np.isfinite(g_in[:, j]) & np.isfinite(g_out[:, j])
            res[f"drawn_grain_vs_input_{part}_spearman"] = _spearman(g_out[ok, j], g_in[ok, j])
            res[f"drawn_grain_over_input_{part}_median"] = G.grain_ratio(g_out[:, j], g_in[:, j])
            _medians_by_kind(res, f"grain_{part}", kinds_g, g_in[:, j], g_out[:, j], ok)
        # and how coarse: the share of the cytoplasm's detail in 2-4 px blobs (the grain
        # of a two-band texture layer follows the crop's; one band draws 1 px grain)
        c_in = G.grain_coarse_share(inputs_u8, dec.mask, params)
        c_out = G.grain_coarse_share(dec_imgs, dec.mask, params)
        ok = np.isfinite(c_in) & np.isfinite(c_out)
        res["drawn_grain_coarse_share_vs_input_spearman"] = _spearman(c_out[ok], c_in[ok])
        res["grain_coarse_share_input_drawn_median"] = [
            round(float(np.median(c_in[ok])), 4) if ok.any() else float("nan"),
            round(float(np.median(c_out[ok])), 4) if ok.any() else float("nan"),
        ]
        _medians_by_kind(res, "grain_coarse_share", kinds_g, c_in, c_out, ok)
        res["input_multilobed_share"] = float((inp_lobes >= 2).mean())
        if getattr(model, "lobe_head", None) is not None:
            from vae.lobes import without_lobe_layer

            with without_lobe_layer(model):
                d0 = encode_dataset(model, data, rows=rows, decode=True).decoded
            plain = G.measure_batch(d0.rec_image * d0.mask[..., None], d0.mask, params)
            res["drawn_lobes_vs_input_lobes_without_lobe_layer_spearman"] = _spearman(
                plain["lobes"].to_numpy(float), inp_lobes
            )
        # a cell decoded to be compared with its own crop or truth comes from the
        # single-view code of that crop, as the reconstructions above: the reported
        # latent (``views``, default 8) is pose-free and decodes an average-pose cell
        z_cells = encode_dataset(model, data, rows=rows, views=1).joint
        # SSIM of the mean image (what the pixel likelihood fits) beside the drawn cell's
        # above: grain and granules drawn at random positions lower the drawn cell's SSIM
        with torch.no_grad():
            dm = model.decode(torch.from_numpy(z_cells.astype(np.float32)), use_expression=False)
        res["ssim_joint_mean_image"] = float(
            masked_ssim(chw(dec.image), dm.image.float() * m, m).mean()
        )
        if getattr(model, "lobe_head", None) is not None and "image_label" in obs:
            # what the lobe head draws per labelled kind: its expected count (the drawing
            # rounds it, vae.lobes.lobe_count) and the share drawn with >= 2 lobes
            from vae.lobes import expected_lobes, lobe_count

            lg = dm.lobe_logits  # the same codes' decode as the mean image's above
            expect = expected_lobes(lg).numpy()
            drawn = lobe_count(lg).numpy()  # the count the drawing cuts
            kinds = obs["image_label"].astype(str).to_numpy()[has_i]
            for k in sorted(set(kinds) - {"", "nan", UNKNOWN_LABEL}):
                sel = kinds == k
                if sel.sum() >= 3:
                    res[f"lobe_head_expected_{k}"] = float(expect[sel].mean())
                    res[f"lobe_head_multilobed_share_{k}"] = float((drawn[sel] >= 2).mean())
    else:
        res["ssim_joint"] = float("nan")

    # real data: the maturation axis (or the best dim) against the profiles' pseudotime
    ranks = list(getattr(model.args, "maturation_ranks", []) or [])
    own = [n for _, n in sorted((r, n) for r, n in zip(ranks, data.label_names) if r >= 0)]
    if "t" not in obs and "maturation" in obs and (stages or own):
        _pseudotime_check(
            res,
            lat_all.joint[test][has_e],
            obs[has_e],
            y_all[test][has_e],
            list(stages or own),
            axis=bool(own) and not stages,
        )

    o = obs[has_i]
    if "t" in o and rows.size:
        t = o["t"].to_numpy(float)
        z = lat_all.joint[rows]
        rho = [abs(_spearman(z[:, j], t)) for j in range(z.shape[1])]
        res["best_dim_vs_t_spearman"] = float(np.nanmax(rho)) if rho else float("nan")

        def imgs_in(sel: np.ndarray) -> np.ndarray:
            """The masked input crops of the test image rows ``sel`` as the model sees them,
            (n, S, S, 3) uint8."""
            return inputs_u8[sel]

        neut = (
            np.isfinite(t)
            & o.get("lineage", pd.Series("", index=o.index)).astype(str).eq("neutrophil").to_numpy()
        )
        if neut.sum() >= 3:
            from pipeline.simulator.morphology import azurophilic_density

            imgs = dec_imgs[neut]
            masks = dec.mask[neut]
            fd = G.measure_batch(imgs, masks, G.GranuleParams())
            azu = np.array([azurophilic_density(v) for v in t[neut]])
            # the granules the simulator actually drew (a Poisson draw around the true
            # density): the ceiling any image measure can reach against the truth
            drawn = _drawn_granule_density(o[neut])
            res["decoded_granules_vs_true_azurophilic_spearman"] = _spearman(
                fd["granule_density"].to_numpy(float), azu
            )
            if getattr(model.args, "granule_head", False):
                # the count the granule layer decodes (sum of its rate map), before drawing
                with torch.no_grad():
                    zc = torch.from_numpy(z_cells[neut].astype(np.float32))
                    g = model.decode(zc).granule_rate
                layer_count = g.sum(dim=(1, 2, 3)).numpy() / 100.0
                res["granule_layer_count_vs_true_azurophilic_spearman"] = _spearman(
                    layer_count, azu
                )
                if drawn is not None:
                    res["granule_layer_count_vs_drawn_spearman"] = _spearman(layer_count, drawn)
            if "lobes" in o:
                res["decoded_lobes_vs_true_spearman"] = _spearman(
                    fd["lobes"].to_numpy(float), o["lobes"].to_numpy(float)[neut]
                )
            if getattr(model.args, "nucleus_head", False):
                # the nucleus layer's own mask (logit > 0) before drawing: lobes counted on
                # it, and its overlap with the counter's nucleus of the input crop
                with torch.no_grad():
                    zc = torch.from_numpy(z_cells[neut].astype(np.float32))
                    lg = model.decode(zc).nucleus_logits
                layer = (lg[:, 0] > 0).numpy() & masks
                inp = [G.cell_nucleus(c, mk) for c, mk in zip(imgs_in(neut), masks)]
                inter = [float((a & b).sum()) for a, b in zip(layer, inp)]
                union = [float((a | b).sum()) for a, b in zip(layer, inp)]
                res["nucleus_layer_iou_vs_input_nucleus"] = float(
                    np.mean([i / u for i, u in zip(inter, union) if u > 0])
                )
                if "lobes" in o:
                    res["nucleus_layer_lobes_vs_true_spearman"] = _spearman(
                        np.array([G.count_lobes(a) for a in layer], float),
                        o["lobes"].to_numpy(float)[neut],
                    )
            fr = G.measure_batch(imgs_in(neut), masks, G.GranuleParams())
            res["input_granules_vs_true_azurophilic_spearman"] = _spearman(
                fr["granule_density"].to_numpy(float), azu
            )
            if drawn is not None:
                # the ceiling, and the decoder's fidelity to the cell it was given
                res["drawn_granules_vs_true_azurophilic_spearman"] = _spearman(drawn, azu)
                res["input_granules_vs_drawn_spearman"] = _spearman(
                    fr["granule_density"].to_numpy(float), drawn
                )
                res["decoded_granules_vs_drawn_spearman"] = _spearman(
                    fd["granule_density"].to_numpy(float), drawn
                )
    summary = traverse / "traverse_summary.json" if traverse is not None else None
    if summary is not None and summary.exists():
        told = json.loads(summary.read_text())
        truth = told.get("truth_recovery") or {}
        for k, v in truth.items():
            if isinstance(v, (int, float)):
                res[f"traverse_{k}"] = float(v)
        # the GP path's drawn steps read back by the image encoder: in the path's order?
        rho = ((told.get("path") or {}).get("gp") or {}).get("drawn_read_order_spearman")
        if rho is not None:
            res["traverse_gp_drawn_read_order_spearman"] = float(rho)
    # the drawings read back by the model's own image encoder: the numbers of evaluate's
    # metrics.json readback (the same function; the train split votes)
    # the codes stage=train would write for this checkpoint (its own views) vote there
    own_views = views == int(getattr(model.args, "encode_views", 1))
    res.update(_readback(run, paired, checkpoint, lat_all if own_views else None))
    if unseen is not None:
        res.update(_unseen(run, Path(unseen)))
    return res


def _suffix(checkpoint: str) -> str:
    """What the files written for a checkpoint other than model.pt carry in their names
    (``_last`` for last.pt), so its numbers never overwrite model.pt's."""
    return "" if checkpoint == "model.pt" else "_" + Path(checkpoint).stem


def _readback(
    run: Path, paired: Path, checkpoint: str = "model.pt", latents: Latents | None = None
) -> dict:
    """``readback_*``: stage=evaluate's ``readback`` (:func:`vae.analysis.evaluate.readback_summary`)
    on the test split, at the default analysis settings; {} without a split or such rows.
    Another ``checkpoint`` than model.pt: its own codes vote (latent.h5ad re-encoded with
    it, as stage=train writes it for model.pt; ``latents``, :func:`encode_dataset`'s of
    every row at the model's ``encode_views``, when the caller has them)."""
    import dataclasses

    from vae.analysis.evaluate import readback_summary
    from vae.analysis.run import labels_of, load_run, split_rows
    from vae.analysis.settings import AnalysisSettings
    from vae.checkpoint import load_model
    from vae.infer import encode_dataset
    from vae.inputs.schema import known_labels
    from vae.scverse import latent_obsm

    rd = load_run(run / "latent.h5ad", run / "model.pt", paired)
    if checkpoint != "model.pt":
        model, meta = load_model(run / checkpoint, rd.device)
        lat = rd.latent.copy()
        if latents is None:
            latents = encode_dataset(model, rd.data, rd.device)
        obsm = latent_obsm(latents, model.args.n_shared, model.args.n_private)
        for k, v in obsm.items():
            lat.obsm[k] = v
        rd = dataclasses.replace(rd, latent=lat, model=model, meta=meta)
    lat = rd.latent
    if "split" not in lat.obs:
        return {}
    a = AnalysisSettings()
    labels = labels_of(lat, a.label_key)
    rows = split_rows(lat, "test")
    train = np.flatnonzero(lat.obs["split"].astype(str).to_numpy() == "train")
    dec = encode_dataset(rd.model, rd.data, rd.device, a.batch_size, rows=rows, decode=True)
    rb = readback_summary(rd, a, dec.decoded, labels, known_labels(labels), train)
    return {} if rb is None else {f"readback_{k}": v for k, v in rb.items()}


def _unseen(run: Path, paired: Path) -> dict:
    """``scripts/lobes_check.py``'s numbers on every neutrophil-lineage cell of ``paired``
    (a simulated table the run never saw), as ``unseen_*`` keys; a missing table or one
    without simulator truth ends the script with one line (``lobes_check.check``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lobes_check", Path(__file__).with_name("lobes_check.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.check(run, paired)
    out = {"unseen_paired": str(paired)}
    out.update({f"unseen_{k}": v for k, v in r.items() if k not in ("run", "paired")})
    return out


def _drawn_granule_density(obs) -> np.ndarray | None:
    """Drawn azurophilic granules per 100 px^2 of each row's cell (simulator truth), (n,);
    None where the run's data predate the drawn count or a row lacks it.

    ``obs`` (pandas.DataFrame) with ``azurophilic_granules`` and ``diameter``.
    """
    from pipeline.simulator.morphology import drawn_granule_density

    if "azurophilic_granules" not in obs or "diameter" not in obs:
        return None
    n = obs["azurophilic_granules"].to_numpy(float)
    d = obs["diameter"].to_numpy(float)
    if n.size == 0 or not (np.isfinite(n).all() and np.isfinite(d).all() and (d > 0).all()):
        return None
    return drawn_granule_density(n, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", type=Path, help="finished stage=train folder")
    ap.add_argument("--paired", type=Path, default=None, help="default: the run's manifest input")
    ap.add_argument("--traverse", type=Path, default=None, help="stage=traverse folder")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON (default RUN/image_branch.json; RUN/image_branch_last.json for "
        "--checkpoint last.pt)",
    )
    ap.add_argument(
        "--unseen",
        type=Path,
        default=None,
        help="another simulated paired.h5ad the run never saw: drawn lobes / granules vs truth "
        "on all its neutrophil-lineage cells (unseen_*)",
    )
    ap.add_argument(
        "--views",
        type=int,
        choices=(1, 8),
        default=None,
        help="views the image expert averages (default: the model's encode_views)",
    )
    ap.add_argument(
        "--stages",
        nargs="+",
        default=None,
        help="real data: labels whose profiles' pseudotime (obs['maturation']) the best "
        "latent dim is scored against (default: the model's maturation classes, dim 0)",
    )
    ap.add_argument(
        "--lobe-deep-valley",
        default="model",
        help="the lobe counter's second cut rule for the drawn-vs-input lobes: 'model' (the "
        "rule the lobe head trained with, vae.lobe_deep_valley), 'none', or a ratio",
    )
    ap.add_argument(
        "--checkpoint",
        default="model.pt",
        help="which checkpoint of the run to measure: model.pt (the selected epoch), "
        "last.pt (the last saved one; with trainer.ema_epochs > 0 its raw weights, not the "
        "average) or model_raw.pt (trainer.ema_epochs' raw best)",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    res = check(
        args.run,
        args.paired,
        args.traverse,
        args.views,
        args.stages,
        args.lobe_deep_valley,
        args.unseen,
        args.checkpoint,
    )
    out = args.out or args.run / f"image_branch{_suffix(args.checkpoint)}.json"
    out.write_text(json.dumps(res, indent=2, default=float))
    width = max(len(k) for k in res)
    for k, v in res.items():
        if k == "kl_per_dim":
            continue
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(
        f"image-only kNN {res.get('knn_image', float('nan')):.2f}"
        + (
            f" ({res['knn_image_per_cell']:.2f} each cell once)"
            if "knn_image_per_cell" in res
            else ""
        )
        + (
            " (95 % CI {:.2f}-{:.2f} over {} test crops)".format(
                *res["knn_image_ci95"], res["knn_image_n"]
            )
            if "knn_image_ci95" in res
            else ""
        )
        + f" | joint kNN "
        f"{res.get('knn_joint', float('nan')):.2f} | active units {res['active_units']}/"
        f"{res['n_latent']} | SSIM {res['ssim_joint']:.2f}"
    )


if __name__ == "__main__":
    main()
