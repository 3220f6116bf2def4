"""Does the image code carry to a microscope the study never saw? (issue 9)

Issue 9's held-out re-check encodes externally labelled crops of a source that is not in
the shared data and asks whether the image latent beats PCA of the raw pixels on cell type
(and maturation order). A test split of the sources a model trained on cannot answer that:
its stain, scanner and magnification were all seen in training. This benchmark leaves
one source out of training entirely and scores the model on it, in two steps:

1. ``hold-out``: a copy of a paired table without the crops of ``--source`` (every row of
   that source loses its image: a row that also holds a profile stays as an
   expression-only row, so the expression side trains on the same profiles; an image-only
   row is dropped). Train on it with ``stage=train ... paths.inputs.paired=OUT``.
2. ``score``: encode the held-out source's labelled crops (``obs['image_label']``) with
   the model's image encoder (the pose-free code of ``stage=embed``) and compare them with
   as many principal components of their masked pixels:

   - ``loo1nn_*``: leave-one-out 1-nearest-neighbour class accuracy *within* the held-out
     crops (the measure issue 9 quotes: 0.24 for the first design vs 0.36 for pixels);
   - ``loo_knn_*``: the same with the k nearest neighbours voting;
   - ``transfer_knn_*``: kNN(k) fitted on the labelled crops the model trained on (other
     sources), scored on the held-out crops: what a label transfer to new slides gives
     (the pixel PCA is fitted on the training crops too);
   - ``fewshot{5,20}_{knn,lr}_*``: kNN, or the logistic regression of
     ``Study.fit_labelled_crops`` (``lr``), fitted on 5 or 20 labelled crops per class of
     the held-out source itself (20 random draws), scored on its other crops: what
     labelling a few cells of a new microscope buys;
   - ``embed_labelled20_*``: ``stage=embed`` given 20 of them per class as
     ``embed.labelled_crops`` (``Study.fit_labelled_crops``, 5 draws), on the others;
   - what ``stage=embed`` tells a user of these crops (``embed_*``: the label accuracy,
     the atypical and unclassified shares, the accuracy of the called cells, and the
     input-level test ``Study.input_shift``);
   - each with its balanced accuracy (``_balanced``; the mean recall over classes) and
     the share of the most common class (``majority``);
   - ``morph_*``: how well each feature ``vae.analysis.granules`` measures on the crop
     (lobes, nucleus share, granule density, cytoplasm hue, saturation, GLCM contrast) is
     predicted from the code vs from as many pixel PCs (ridge, 5-fold cross-validated
     Spearman within the held-out crops; ``_within``: the most common class only, where
     the label says nothing): the shared data have no maturation labels, and lobes and
     nucleus share are what changes from myelocyte to segmented neutrophil.

   ``image`` = every dim of the image expert's mean (shared + image-private),
   ``image_shared`` = the shared dims only (the space of ``obsm['X_vae']``).

Commands (docs/vae.md, "A microscope the study never saw")::

    P=.venv/bin/python
    $P scripts/unseen_source_check.py hold-out outputs/real61/pair/paired.h5ad \
        --source segmentation_wbc --out outputs/lso/paired_no_segwbc.h5ad
    $P -m pipeline stage=train +preset=real experiment=lso variant=no_segwbc \
        paths.inputs.paired=$PWD/outputs/lso/paired_no_segwbc.h5ad hardware.torch_threads=1 \
        trainer.max_minutes=null
    $P scripts/unseen_source_check.py score outputs/lso/train/no_segwbc \
        --paired outputs/real61/pair/paired.h5ad --source segmentation_wbc
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # image_branch_check, imported too


# labelled cells per class of the new microscope in the few-shot reference
FEW_SHOT = (5, 20)


def _held_rows(obs, sources: list[str]) -> np.ndarray:
    """Bool (n,): rows whose crop comes from one of ``sources``."""
    if "image_source" not in obs:
        raise SystemExit("the paired table has no obs['image_source'] (stage=pair writes it)")
    src = obs["image_source"].astype(object).to_numpy()
    known = set(src[obs["has_image"].to_numpy(bool)].tolist())
    missing = [s for s in sources if s not in known]
    if missing:
        raise SystemExit(
            f"--source {', '.join(missing)}: not an image_source of the table "
            f"(it has {', '.join(sorted(map(str, known)))})"
        )
    return np.isin(src, sources) & obs["has_image"].to_numpy(bool)


def hold_out(paired: Path, sources: list[str], out: Path) -> dict:
    """Write ``paired`` without the crops of ``sources`` to ``out``; return the counts."""
    import anndata as ad

    adata = ad.read_h5ad(paired)
    held = _held_rows(adata.obs, sources)
    has_e = adata.obs["has_expression"].to_numpy(bool)
    keep = ~held | has_e
    adata = adata[keep].copy()
    gone = held[keep]  # rows that keep their profile and lose their crop
    obs = adata.obs
    obs.loc[gone, "has_image"] = False
    for col in ("image_label", "image_ref", "image_source", "specimen"):
        if col in obs:
            obs[col] = obs[col].astype(object)
            obs.loc[gone, col] = np.nan
    # the expression-only row's label is its profile's (by-label pairs: the same name)
    if "expression_label" in obs:
        obs["label"] = obs["label"].astype(object)
        obs.loc[gone, "label"] = obs.loc[gone, "expression_label"]
    for key in adata.obsm:  # crops, masks and the granule targets stage=pair found on them
        if key in ("crops", "masks") or key.startswith("granule_"):
            adata.obsm[key][gone] = 0
    adata.uns["held_out_image_sources"] = list(sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    adata.write_h5ad(tmp)
    tmp.replace(out)
    counts = {
        "held_out_sources": sources,
        "rows_dropped": int((~keep).sum()),
        "rows_now_expression_only": int(gone.sum()),
        "rows_written": int(adata.n_obs),
        "out": str(out),
    }
    print(json.dumps(counts, indent=1))
    return counts


def _encode(model, adata):
    """(image code (n, d) over the model's ``encode_views``, masked pixels (n, 3*S*S)
    in [0, 1], the model's input tensors) of the rows of ``adata`` (all with a crop), at
    the model's crop size."""
    from vae.data import from_anndata
    from vae.infer import encode_dataset

    data = from_anndata(adata, image_size=model.args.crop_size, expect_labels=False)
    lat = encode_dataset(model, data, views=int(getattr(model.args, "encode_views", 1)))
    pix = (data.crops.float().div(255) * data.masks.float()).flatten(1).numpy()
    return lat.image, pix, data


def _labelled_crops(adata, rows: np.ndarray):
    """The rows of ``adata`` (bool mask ``rows``) with a crop and an image label."""
    obs = adata.obs
    lab = obs["image_label"].astype(object)
    ok = rows & obs["has_image"].to_numpy(bool) & lab.notna().to_numpy()
    sub = adata[ok].copy()
    sub.obs["has_expression"] = False  # the image code only: no profile is read
    return sub, lab.to_numpy()[ok].astype(str)


def _accuracy(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(accuracy, balanced accuracy: the mean recall over the classes of ``y``)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    with warnings.catch_warnings():  # a call of a class y lacks: counted as wrong, said
        warnings.simplefilter("ignore", UserWarning)
        return float(accuracy_score(y, pred)), float(balanced_accuracy_score(y, pred))


def _shot_draws(y: np.ndarray, shots: int, draws: int, seed: int = 0) -> list[np.ndarray]:
    """``draws`` random (n,) bool masks of ``shots`` rows per class of ``y`` (every row of
    a class with no more), each leaving some row out; the same for every caller."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        ref = np.zeros(y.size, bool)
        for c in np.unique(y):
            rows = np.flatnonzero(y == c)
            ref[rng.choice(rows, min(shots, rows.size), replace=False)] = True
        if not ref.all():
            out.append(ref)
    return out


def _few_shot(
    z: np.ndarray, y: np.ndarray, shots: int, k: int, how: str = "knn", draws: int = 20
) -> tuple[float, float]:
    """Mean (accuracy, balanced accuracy) over ``draws`` random draws of ``shots`` crops
    per class as the reference, scored on the other crops: ``how`` = ``knn`` (a kNN(``k``)
    vote) or ``lr`` (:func:`vae.analysis.metrics.code_classifier`, what
    ``Study.fit_labelled_crops`` fits)."""
    from vae.analysis.metrics import code_classifier, knn_predict

    out = []
    for ref in _shot_draws(y, shots, draws):
        if how == "knn":
            pred = knn_predict(z[~ref], y[~ref], k, z[ref], y[ref])
        else:
            pred = code_classifier(z[ref], y[ref]).predict(z[~ref])
        out.append(_accuracy(y[~ref], pred))
    if not out:
        return float("nan"), float("nan")
    acc, bal = np.mean(out, 0)
    return float(acc), float(bal)


def _morph_cv(code: np.ndarray, feats: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """(q,) mean over ``folds`` folds of the ridge Spearman of each feature from ``code``
    (:func:`vae.analysis.metrics.feature_prediction`); NaN where no fold scores."""
    from sklearn.model_selection import KFold

    from vae.analysis.metrics import feature_prediction

    rho = []
    for fit, test in KFold(folds, shuffle=True, random_state=seed).split(code):
        rho.append(feature_prediction(code[fit], feats[fit], code[test], feats[test]))
    rho = np.asarray(rho)
    with warnings.catch_warnings():  # a feature no fold scores: NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(rho, 0)


def score(
    run: Path,
    paired: Path,
    sources: list[str],
    k: int = 15,
    ref_pattern: str | None = None,
    stain_match: bool = False,
) -> dict:
    """Score ``run`` on the labelled crops of ``sources`` in ``paired`` (module doc); with
    ``ref_pattern``, only those whose ``obs['image_ref']`` matches that regular expression
    (one of a source's data sets, e.g. ``dataset2`` of segmentation_wbc); with
    ``stain_match``, the held-out crops' cell pixels first moved, as one group, to the
    CIELAB mean and sd of the training crops (:func:`vae.stain.match_stain`)."""
    import anndata as ad
    from image_branch_check import MORPHOLOGY_FEATURES  # the features it scores on test crops
    from sklearn.decomposition import PCA

    from vae.analysis import granules as G
    from vae.analysis.metrics import knn_predict
    from vae.analysis.samples import proportion_ci
    from vae.checkpoint import load_model

    model, _ = load_model(run / "model.pt")
    manifest = json.loads((run / "manifest.json").read_text())
    src = manifest.get("inputs", {}).get("paired", {})
    trained_on = Path(src.get("path", "")) if isinstance(src, dict) else Path(str(src))
    ref_table = ad.read_h5ad(trained_on)
    if "image_source" in ref_table.obs:
        seen = set(ref_table.obs["image_source"].dropna().astype(str))
        overlap = sorted(seen & set(sources))
        if overlap:
            print(f"warning: {run} trained on crops of {', '.join(overlap)}: not unseen")
    table = ad.read_h5ad(paired)
    rows = _held_rows(table.obs, sources)
    if ref_pattern is not None:
        refs = table.obs["image_ref"].astype(str).str.contains(ref_pattern, regex=True)
        rows &= refs.to_numpy(bool)
        if not rows.any():
            raise SystemExit(f"--ref-pattern {ref_pattern!r}: no crop of the source matches")
    held, y = _labelled_crops(table, rows)
    ref, y_ref = _labelled_crops(ref_table, np.ones(ref_table.n_obs, bool))
    if stain_match:
        from vae.stain import lab_stats, match_stain

        target = lab_stats(ref.obsm["crops"], ref.obsm["masks"])
        held.obsm["crops"] = match_stain(held.obsm["crops"], held.obsm["masks"], *target)
    z, pix, data = _encode(model, held)
    z_ref, pix_ref, _ = _encode(model, ref)
    d, ns = int(model.n_latent), int(model.args.n_shared)
    # as many pixel PCs as the image code has dims (fewer only when there are fewer crops)
    n_img = min(z.shape[1], y.size - 1, y_ref.size - 1)
    vals, cnt = np.unique(y, return_counts=True)
    res: dict = {
        "run": str(run),
        "paired": str(paired),
        "trained_on": str(trained_on),
        "held_out_sources": sources,
        "ref_pattern": ref_pattern,
        "stain_match": stain_match,
        "n_held_out_crops": int(y.size),
        "classes": {str(v): int(c) for v, c in zip(vals, cnt)},
        "majority": float(cnt.max() / cnt.sum()),
        "n_reference_crops": int(y_ref.size),
        "n_pcs": n_img,
        "k": k,
    }
    within = PCA(n_img, random_state=0).fit_transform(pix)  # unsupervised, on the crops
    pca_ref = PCA(n_img, random_state=0).fit(pix_ref)
    codes = {"image": z, "image_shared": z[:, :ns], "pixel_pca": within}
    for name, zz in codes.items():
        for tag, kk in (("loo1nn", 1), ("loo_knn", k)):
            pred = knn_predict(zz, y, kk)  # leave-one-out within the held-out crops
            acc, bal = _accuracy(y, pred)
            res[f"{tag}_{name}"], res[f"{tag}_{name}_balanced"] = acc, bal
            res[f"{tag}_{name}_ci95"] = [
                round(v, 4) for v in proportion_ci(int((pred == y).sum()), y.size)
            ]
    transfer = {
        "image": (z, z_ref),
        "image_shared": (z[:, :ns], z_ref[:, :ns]),
        "pixel_pca": (pca_ref.transform(pix), pca_ref.transform(pix_ref)),
    }
    for name, (zz, zr) in transfer.items():
        pred = knn_predict(zz, y, k, zr, y_ref)
        acc, bal = _accuracy(y, pred)
        res[f"transfer_knn_{name}"], res[f"transfer_knn_{name}_balanced"] = acc, bal
    # a few labelled cells of the new microscope as the only reference: what labelling
    # FEW_SHOT cells per class of it buys (the cells of a class with no more than that
    # many crops are all reference and none is scored)
    for shots in FEW_SHOT:
        for name, zz in (("image", z), ("pixel_pca", within)):
            for how in ("knn", "lr"):
                key = f"fewshot{shots}_{how}_{name}"
                res[key], res[f"{key}_balanced"] = _few_shot(zz, y, shots, min(k, shots), how)
    # morphology: what the instruments measure on each held-out crop (masked, as encoded)
    masks = data.masks[:, 0].numpy().astype(bool)
    crops = data.crops.permute(0, 2, 3, 1).numpy() * masks[..., None]
    feats = G.measure_batch(crops, masks)[list(MORPHOLOGY_FEATURES)].to_numpy(float)
    big = str(vals[cnt.argmax()])
    for name, zz in (("image", z), ("pixel_pca", within)):
        for tag, sel in (("", np.ones(y.size, bool)), ("_within", y == big)):
            if sel.sum() < 25:  # five folds of at least five crops
                rho = np.full(len(MORPHOLOGY_FEATURES), np.nan)
            else:
                rho = _morph_cv(zz[sel], feats[sel])
            for feat, r in zip(MORPHOLOGY_FEATURES, rho):
                res[f"morph_{name}{tag}_{feat}"] = float(r)
            res[f"morph_{name}{tag}_mean"] = (
                float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")
            )
    res["morph_within_label"] = big
    res["n_latent"] = d
    res.update(_study_calls(run, held))
    res.update(_labelled_calls(run, held))
    return res


def call_scores(embedded, truth: np.ndarray) -> dict:
    """How an embedded query's calls (:meth:`vae.api.Study.embed`) read against ``truth``
    (the study's class names, one per row): ``accuracy`` and ``balanced`` (of
    ``vae_label``), ``called`` (share not ``unclassified``), ``called_accuracy`` (NaN:
    none called) and ``atypical`` (share of ``vae_atypical``)."""
    obs = embedded.obs
    lab = obs["vae_label"].astype(str).to_numpy()
    called = obs["vae_call"].astype(str).to_numpy() != "unclassified"
    right = lab == np.asarray(truth).astype(str)
    acc, bal = _accuracy(np.asarray(truth).astype(str), lab)
    return {
        "accuracy": acc,
        "balanced": bal,
        "called": float(called.mean()),
        "called_accuracy": float(right[called].mean()) if called.any() else float("nan"),
        "atypical": float(obs["vae_atypical"].to_numpy(bool).mean()),
    }


def _query(held):
    """``held`` with only the obs columns the scores read (the embed's own are added)."""
    keep = [c for c in ("has_image", "has_expression", "image_ref", "label") if c in held.obs]
    q = held.copy()
    q.obs = q.obs[keep]
    return q


def _study_calls(run: Path, held) -> dict:
    """What ``stage=embed`` tells a user of these crops (:meth:`vae.api.Study.embed`):
    the label transfer's accuracy against ``obs['label']`` (the study's label names),
    the shares of atypical and unclassified cells, and the accuracy of the called ones."""
    from vae.api import Study

    study = Study.load(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "most cells atypical": counted below instead
        r = study.embed(_query(held), warn_seen=False, warn_atypical=False)
    got = call_scores(r, r.obs["label"].astype(str).to_numpy())
    shift = study.input_shift(r) or {}
    return {
        # the input as a whole against the study's held-out cells (Study.input_shift)
        "embed_shift_share": shift.get("share", float("nan")),
        "embed_shifted": shift.get("shifted"),
        "embed_label_accuracy": got["accuracy"],
        "embed_atypical": got["atypical"],
        "embed_unclassified": 1.0 - got["called"],
        "embed_called_accuracy": got["called_accuracy"],
        "embed_confidence_median": float(np.median(r.obs["vae_label_confidence"])),
    }


def _labelled_calls(run: Path, held, shots: int = 20, draws: int = 5) -> dict:
    """``stage=embed`` with ``embed.labelled_crops``: ``shots`` labelled crops per class of
    the held-out source (:meth:`vae.api.Study.fit_labelled_crops`; ``draws`` draws, as
    :func:`_shot_draws` makes them), its other crops embedded; the means over the draws of
    the label accuracy (and balanced), the shares called and atypical, the accuracy of
    the called, and the fit's own cross-validated accuracy (``embed_labelled{shots}_*``)."""
    from vae.api import Study

    study = Study.load(run)
    q = _query(held)
    y = q.obs["label"].astype(str).to_numpy()
    rows = []
    for ref in _shot_draws(y, shots, draws):
        study.fit_labelled_crops(q[ref].copy(), label_key="label")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = study.embed(q[~ref].copy(), warn_seen=False, warn_atypical=False)
        got = call_scores(r, r.obs["label"].astype(str).to_numpy())
        rows.append({**got, "cv_accuracy": study.labelled_crops.cv_accuracy})
    study.labelled_crops = None
    means = pd.DataFrame(rows).mean() if rows else {}
    names = ("accuracy", "balanced", "called", "called_accuracy", "atypical", "cv_accuracy")
    return {f"embed_labelled{shots}_{n}": float(means.get(n, np.nan)) for n in names}


def _table(res: dict) -> str:
    rows = [
        ("leave-one-out 1-NN", "loo1nn"),
        (f"leave-one-out kNN({res['k']})", "loo_knn"),
        (f"transfer kNN({res['k']}) from the training sources", "transfer_knn"),
        *(
            (f"{n} labelled crops per class of this source, {how}", f"fewshot{n}_{how}")
            for n in FEW_SHOT
            for how in ("knn", "lr")
        ),
    ]
    out = [
        f"{res['run']}: {res['n_held_out_crops']} crops of {', '.join(res['held_out_sources'])}"
        + (f" matching {res['ref_pattern']!r}" if res.get("ref_pattern") else "")
        + f" (majority {res['majority']:.3f}; {res['n_reference_crops']} labelled training crops)",
        "| measure | image code | shared dims | raw-pixel PCA |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        cells = []
        for name in ("image", "image_shared", "pixel_pca"):
            a, b = res.get(f"{key}_{name}"), res.get(f"{key}_{name}_balanced")
            cells.append("-" if a is None else f"{a:.3f} (bal. {b:.3f})")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append(
        f"| `stage=embed`: label accuracy; atypical / unclassified share; accuracy of the "
        f"called | {res['embed_label_accuracy']:.3f}; {res['embed_atypical']:.3f} / "
        f"{res['embed_unclassified']:.3f}; {res['embed_called_accuracy']:.3f} | | |"
    )
    out.append(
        "| `stage=embed` with 20 labelled crops per class (`embed.labelled_crops`): label "
        "accuracy (bal.); called share, accuracy of the called; atypical; the fit's CV "
        f"accuracy | {res['embed_labelled20_accuracy']:.3f} "
        f"({res['embed_labelled20_balanced']:.3f}); {res['embed_labelled20_called']:.3f}, "
        f"{res['embed_labelled20_called_accuracy']:.3f}; {res['embed_labelled20_atypical']:.3f}; "
        f"{res['embed_labelled20_cv_accuracy']:.3f} | | |"
    )
    out.append(
        f"| `stage=embed`: share above the study's held-out 75th percentile (a quarter "
        f"expected) | {res['embed_shift_share']:.3f} (warned: {res['embed_shifted']}) | | |"
    )
    for tag, label in (("", "all crops"), ("_within", res["morph_within_label"] + "s")):
        a, b = res[f"morph_image{tag}_mean"], res[f"morph_pixel_pca{tag}_mean"]
        out.append(f"| morphology ridge, 5-fold Spearman, {label} | {a:.3f} | | {b:.3f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold-out", help="write the training table without a source's crops")
    h.add_argument("paired", type=Path)
    h.add_argument("--source", action="append", required=True, help="image_source (repeat)")
    h.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("score", help="score a run on a source it never saw")
    s.add_argument("run", type=Path, help="finished stage=train folder")
    s.add_argument("--paired", type=Path, required=True, help="a table with the source's crops")
    s.add_argument("--source", action="append", required=True, help="image_source (repeat)")
    s.add_argument("--k", type=int, default=15)
    s.add_argument("--ref-pattern", default=None, help="only crops whose image_ref matches")
    s.add_argument(
        "--stain-match",
        action="store_true",
        help="move the crops' colours to the training crops' (CIELAB mean / sd) first",
    )
    s.add_argument("--out", type=Path, default=None, help="JSON (default: RUN/unseen_source.json)")
    args = ap.parse_args()
    if args.cmd == "hold-out":
        hold_out(args.paired, args.source, args.out)
        return
    res = score(args.run, args.paired, args.source, args.k, args.ref_pattern, args.stain_match)
    out = args.out or args.run / "unseen_source.json"
    out.write_text(json.dumps(res, indent=1))
    print(_table(res))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
