"""What autoencoders for genomics are used for, scored inside ``stage=evaluate``.

Imputation (LATE's protocol, :mod:`vae.analysis.imputation`) on the evaluated rows,
denoising against noise-free truth when the caller has it (simulator), and the
atypical-cell scores ``stage=train`` wrote into ``latent.h5ad`` (top cells with
their crops). :func:`report_section` turns the files written here into one
self-contained report section (``stage=traverse`` adds it to ``report.html``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vae.analysis import imputation as I
from vae.analysis.run import read_table
from vae.inputs.schema import ANOMALY_SCORE

log = logging.getLogger(__name__)

IMPUTATION_CSV = "imputation"
DENOISING_CSV = "denoising"
ANOMALY_CSV = "anomaly_top"
ANOMALY_BY_LABEL_CSV = "anomaly_by_label"
LATE_PNG = "imputation_late"
ANOMALY_PNG = "anomaly_top"


def imputation_and_denoising(
    rd,
    rows: np.ndarray,
    ref: np.ndarray | None,
    out_files,
    seed: int,
    noise_free: np.ndarray | None = None,
    fraction: float = I.DEFAULT_FRACTION,
    min_nonzero: int = I.DEFAULT_MIN_NONZERO,
) -> dict[str, Any]:
    """LATE imputation scores of ``rows`` (model vs gene mean vs kNN smoothing), and
    denoising per gene programme when ``noise_free`` (N, G) log-normalised truth is given.

    Rows without expression are left out; the reference (gene mean, kNN) is ``ref``
    (the train rows) with expression, else the evaluated rows themselves *masked*
    (so no baseline sees a hidden value).
    """
    d = rd.data
    he = d.has_expression.numpy()
    rows = np.asarray(rows)[he[rows]]
    ref = None if ref is None else np.asarray(ref)[he[ref]]
    if rows.size < 3 or (ref is not None and ref.size < 3):
        return {}
    x = d.x.numpy()
    values = d.counts.numpy() if d.counts is not None else x
    h = I.hide_nonzero(values[rows], fraction, seed, min_nonzero)
    if h.n_hidden == 0:
        return {"n_skipped": h.n_skipped, "n_hidden": 0}
    xm, cm = I.apply_hiding(x[rows], None if d.counts is None else values[rows], h)
    masked = I.masked_tensors(d, rows, xm, cm)
    x_ref = xm if ref is None else x[ref]
    preds = {
        "model": I.model_imputation(rd.model, masked, rd.device),
        "gene mean": I.gene_mean_imputation(x_ref, rows.size),
        "kNN smoothing (PCA)": I.knn_imputation(xm, x_ref, seed=seed),
    }
    table = []
    for name, p in preds.items():
        s = I.score_hidden(p, x[rows], h, rd.gene_names)
        table.append({"predictor": name, **s.summary()})
    df = pd.DataFrame(table)
    out_files.csv(df, IMPUTATION_CSV)
    out_files.figure(I.late_figure(preds, x[rows], h, seed=seed), LATE_PNG, "evaluate/imputation")
    out: dict[str, Any] = {
        "fraction": fraction,
        "n_hidden": h.n_hidden,
        "n_skipped": h.n_skipped,
        "scores": {r["predictor"]: {k: v for k, v in r.items() if k != "predictor"} for r in table},
    }
    if noise_free is not None:
        full = I.masked_tensors(d, rows, x[rows], None if d.counts is None else values[rows])
        dec = I.model_imputation(rd.model, full, rd.device)
        prog = [rd.gene_program.get(g, "other") for g in rd.gene_names]
        dn = I.denoising_scores(dec, x[rows], noise_free[rows], prog)
        out_files.csv(dn, DENOISING_CSV)
        out["denoising"] = {
            r["program"]: {k: v for k, v in r.items() if k != "program"}
            for r in dn.to_dict("records")
        }
    return out


def anomaly_summary(
    lat, decoded, labels: np.ndarray, rows: np.ndarray, out_files, n_top: int = 8
) -> dict[str, Any]:
    """Top atypical cells of ``rows`` (their crops when they have one) and the score per label.

    ``decoded`` is ``encode_dataset(..., rows=rows, decode=True).decoded`` (or None).
    """
    if ANOMALY_SCORE not in lat.obs:
        return {}
    s = lat.obs[ANOMALY_SCORE].to_numpy(dtype=np.float64)[rows]
    ok = np.isfinite(s)
    if not ok.any():
        return {}
    order = np.argsort(-np.where(ok, s, -np.inf))[: min(n_top, int(ok.sum()))]
    names = np.asarray(lat.obs_names)[rows]
    from vae.analysis.palette import display_label

    # one name for a row without a label, in the CSVs and the figure
    lab = np.array([display_label(x) for x in labels[rows]], dtype=object)
    cols = {"cell": names[order], "label": lab[order]}
    if decoded is not None:
        cols["has_crop"] = np.asarray(decoded.has_image, bool)[order]
    top = pd.DataFrame({**cols, ANOMALY_SCORE: s[order]})
    out_files.csv(top, ANOMALY_CSV)
    by = (
        pd.DataFrame({"label": lab[ok], "score": s[ok]})
        .groupby("label")["score"]
        .agg(["count", "median", "mean"])
        .reset_index()
        .sort_values("median", ascending=False)
    )
    out_files.csv(by, ANOMALY_BY_LABEL_CSV)
    if decoded is not None:
        from vae.analysis.anomaly import top_cells_figure

        with_img = [
            i for i in np.argsort(-np.where(ok, s, -np.inf)) if ok[i] and decoded.has_image[i]
        ][:n_top]
        if with_img:
            fig = top_cells_figure(
                decoded.image[with_img],
                [f"{lab[i]}\n{s[i]:.1f}" for i in with_img],
                "most atypical held-out cells with a crop (combined anomaly score; "
                "anomaly_top.csv lists the top cells overall, expression-only ones too)",
            )
            out_files.figure(fig, ANOMALY_PNG, "evaluate/anomaly_top")
    return {
        "n_scored": int(ok.sum()),
        "top": top.to_dict("records"),
        "median_by_label": dict(zip(by["label"], by["median"])),
    }


def report_section(ev_dir: Path):
    """One report section from the files :func:`imputation_and_denoising` and
    :func:`anomaly_summary` wrote into ``ev_dir`` (None when neither ran)."""
    from vae.analysis.report import FigureItem, Section, TableItem

    tables, figs = [], []
    caps = {
        IMPUTATION_CSV: "Imputation, LATE protocol: 10 % of the observed non-zero entries of each "
        "held-out cell hidden (seeded), scored on log-normalised values; cells with too few "
        "non-zero entries skipped (n_skipped).",
        DENOISING_CSV: "Denoising: per-gene Pearson r with the simulator's noise-free expression, "
        "decoded vs the observed counts, per gene programme.",
        # "The <rows of the table> most atypical...": the count is the table's own
        ANOMALY_CSV: "most atypical held-out cells overall, whatever their label or "
        "modality (has_crop: False for an "
        "expression-only row, whose score is on its profile): combined anomaly score (robust "
        "z of reconstruction cost, latent kNN distance and class distance per modality vs "
        "the training cells).",
        ANOMALY_BY_LABEL_CSV: "Anomaly score per label on the held-out split.",
    }
    for name, cap in caps.items():
        f = Path(ev_dir) / f"{name}.csv"
        if f.exists():
            df = read_table(f)
            if name == ANOMALY_CSV:
                cap = f"The {len(df)} {cap}"
            tables.append(TableItem(name.replace("_", " "), df, cap))
    fcaps = {
        LATE_PNG: "Predicted vs true log values: observed entries grey, hidden (imputed) entries red.",
        ANOMALY_PNG: "Crops of the most atypical held-out cells that have a crop, with label "
        "and score (the table above also ranks expression-only rows, which have no crop to show). "
        "Atypical to the model: a stain, scale or mask it rarely saw (a jagged or cut mask, a "
        "cell filling its tile) ranks as high as unusual morphology; look before reading "
        "atypia into it.",
    }
    for name, cap in fcaps.items():
        f = Path(ev_dir) / f"{name}.png"
        if f.exists():
            figs.append(FigureItem(f, cap))
    if not tables and not figs:
        return None
    return Section("Imputation, denoising and atypical cells", tables=tables, figures=figs)
