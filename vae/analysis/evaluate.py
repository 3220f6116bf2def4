"""stage=evaluate's analysis: reconstruction, cross-modal prediction, latent structure,
retrieval and disentanglement of a trained VAE on one split (see docs/analysis.md)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from segmentation.progress import Steps
from vae.analysis import traverse as T
from vae.analysis.palette import label_colours
from vae.analysis.run import (
    LATENTS,
    AnalysisError,
    Outputs,
    RunData,
    clean_json,
    crop_background,
    embedding,
    heatmap_genes,
    in_training_poses,
    labels_of,
    markdown_table,
    obs_col,
    observed_program_scores,
    pose_lenders,
    programs_of,
    split_rows,
    tb_scalars,
)
from vae.analysis.settings import AnalysisSettings
from vae.infer import encode_dataset
from vae.inputs.schema import known_labels

log = logging.getLogger(__name__)


def rows_per_label(
    labels: np.ndarray, candidates: np.ndarray, per_label: int, max_rows: int
) -> np.ndarray:
    """Up to ``per_label`` of ``candidates`` for each known label, then unlabelled ones.

    When the labels are too many for ``per_label`` each within ``max_rows``, one of each
    (every label shown, up to ``max_rows`` labels).

    Parameters
    ----------
    labels : (n,) str, the label of every row (``"nan"``, ``"None"`` or ``""``: unknown)
    candidates : (k,) int, the rows that may be shown, in the order to take them
    per_label, max_rows : int

    Returns
    -------
    (m,) int, m <= max_rows: the chosen rows grouped by label in display order
    (:func:`vae.analysis.palette.label_order`: maturation order first), the unlabelled
    rows last; the first candidates of each label, so the pick is stable.
    """
    from vae.analysis.palette import label_order

    cand = np.asarray(candidates, dtype=int)
    lab = np.asarray(labels).astype(str)[cand]
    known = known_labels(lab)
    kinds = label_order(set(lab[known]))
    if len(kinds) * per_label > max_rows:
        per_label = 1
    out: list[int] = []
    for k in kinds:
        out += list(cand[lab == k][:per_label])
    out += list(cand[~known][: max(0, max_rows - len(out))])
    return np.asarray(out[:max_rows], dtype=int)


def _image_row(what: str, decoded: np.ndarray, P, rows: np.ndarray) -> dict:
    """One reconstruction-table row: masked MSE / SSIM of ``decoded`` vs the input crops."""
    from vae.analysis import metrics as M

    args = (decoded[rows], P.image[rows], P.mask[rows])
    return {
        "what": what,
        "n": int(rows.sum()),
        "masked_mse": np.nanmean(M.masked_mse(*args)),
        "masked_ssim": np.nanmean(M.masked_ssim(*args)),
    }


def _expression_posed(
    rd: RunData, rows: np.ndarray, batch_size: int, lenders=None, codes: np.ndarray | None = None
):
    """The cells decoded from ``rows``' expression codes, each in the pose of the
    training crop nearest it (:func:`vae.analysis.run.in_training_poses`; ``lenders``:
    its :func:`vae.analysis.run.pose_lenders`, encoded there when None), as
    :class:`vae.analysis.traverse.DecodedArrays`; None when no pose can be lent.

    ``codes`` : (len(rows), d) the rows' expression codes when the caller has them
    (``encode_dataset(...).expression``); None: encoded here. Each cell is drawn in its
    crop's image source (a model with ``vae.image_batch_key``), as the pose-free drawing
    and the training's cross-modal term are."""
    if rows.size == 0:
        return None
    if codes is None:  # the expression code reads no crop: one view is enough
        codes = encode_dataset(rd.model, rd.data, rd.device, batch_size, rows=rows, views=1)
        codes = codes.expression
    posed = in_training_poses(rd, codes, batch_size, lenders)
    if posed is None:
        return None
    src = rd.data.image_batch
    src = None if src is None else src.numpy()[rows]
    return T.decode(rd.model, posed, batch_size, rd.device, image_batch=src)


def readback_summary(
    rd: RunData, a, P, labels, known, ref, lenders=None, codes: np.ndarray | None = None
) -> dict | None:
    """``metrics.json`` ``readback``: the share of held-out rows with a crop, a profile and
    a known label whose drawings the image encoder reads as that label
    (:mod:`vae.analysis.readback`): the input crops themselves, the joint reconstruction,
    the cell drawn from expression as decoded (``from_expression_pose_free``) and in a
    training crop's pose (``from_expression``, as ``reconstructions.png`` draws it).

    Parameters
    ----------
    rd : RunData
        With its paired data.
    a : AnalysisSettings
        ``knn_k`` (the vote) and ``batch_size``.
    P : vae.infer.Decoded
        The evaluated rows decoded (``encode_dataset(..., decode=True).decoded``).
    labels, known : (N,) str, (N,) bool
        Every latent row's label and whether it is known.
    ref : (m,) int or None
        The training rows, whose labelled crops vote.
    lenders : tuple, optional
        :func:`vae.analysis.run.pose_lenders` of ``rd`` when the caller has them (the
        training crops' codes are then not encoded again); None: encoded here.

    Returns
    -------
    dict or None
        ``n``, the four shares and each drawing's ``grain_over_input_<drawing>``
        (:func:`_grain_over_input`); None without a training split, decoded masks, image
        codes or 3 such rows.
    """
    from vae.analysis.readback import drawing, read_back, training_voters

    lat = rd.latent
    if ref is None or P.rec_mask is None or "X_vae_image" not in lat.obsm:
        return None
    sel = np.flatnonzero(P.has_image & P.has_expression & known[P.rows])
    z_ref, labels_ref = training_voters(lat, rd.data.has_image.numpy().astype(bool), labels)
    if sel.size < 3 or len(z_ref) == 0:
        return None
    bg = crop_background(rd)
    drawings = {
        "input": (P.image[sel], P.mask[sel]),
        "joint": drawing(P.rec_image[sel], P.rec_mask[sel], bg),
        "from_expression_pose_free": drawing(
            P.image_from_expr[sel], P.image_from_expr_mask[sel], bg
        ),
    }
    posed = _expression_posed(
        rd, P.rows[sel], a.batch_size, lenders, None if codes is None else codes[sel]
    )
    if posed is not None:
        drawings["from_expression"] = drawing(posed.images, posed.masks, bg)
    calls = read_back(
        rd.model,
        rd.data,
        P.rows[sel],
        drawings,
        z_ref,
        labels_ref,
        a.knn_k,
        rd.device,
        a.batch_size,
    )
    truth = labels[P.rows[sel]]
    out = {"n": int(sel.size), **{k: float(np.mean(v == truth)) for k, v in calls.items()}}
    return {**out, **_grain_over_input(drawings)}


def _grain_over_input(drawings: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """``grain_over_input_<drawing>``: the median over the rows of each drawing's cytoplasm
    grain over its input crop's (:func:`vae.analysis.granules.stain_grain`, root-mean-square
    fine detail of the stain); 1: drawn as granular as the crop, 2: twice as grainy. Rows
    where either has no cytoplasm to read are left out; NaN under 3 rows
    (:func:`vae.analysis.granules.grain_ratio`)."""
    from vae.analysis import granules as G

    cells, masks = drawings["input"]
    g_in = G.stain_grain(cells, masks)[:, 0]
    out = {}
    for name, (img, m) in drawings.items():
        if name == "input":
            continue
        out[f"grain_over_input_{name}"] = G.grain_ratio(G.stain_grain(img, m)[:, 0], g_in)
    return out


def _gene_row(what: str, n: int, gc, gidx: list[int]) -> dict:
    """One reconstruction-table row from per-gene correlations (granule genes apart)."""
    row = {"what": what, "n": n, "gene_pearson": gc.mean_pearson, "gene_spearman": gc.mean_spearman}
    if gidx:
        row["granule_gene_pearson"] = float(np.nanmean(gc.pearson[gidx]))
    return row


# how many (label -> call) pairs, and crops of each, the disagreement figure shows
DISAGREEMENT_PAIRS = 6
DISAGREEMENT_CROPS = 10
# obs columns copied into label_disagreements.csv where the latent table has them,
# so a reader can find each crop's file (the analysis settings add the source key)
DISAGREEMENT_OBS = ("image_ref", "specimen")


def batch_key_column(a, rd) -> tuple[str, str] | None:
    """``(key, column)`` batch mixing is scored by: ``analysis.batch_key`` as given (a
    column of latent.h5ad), else the model's ``vae.batch_key`` in the column stage=pair
    put it (:func:`vae.data.batch_column`); None without either."""
    from vae.data import batch_column

    if a.batch_key:
        return str(a.batch_key), str(a.batch_key)
    key = getattr(rd.model.args, "batch_key", None)
    if not key:
        return None
    return str(key), batch_column(str(key), getattr(rd, "obs_renamed", None))


def _batch_mixing(lat, a, rd, rows: np.ndarray, labels: np.ndarray) -> dict | None:
    """:func:`metrics.batch_mixing` of the expression and joint codes of the evaluated
    rows, by ``analysis.batch_key`` (else the model's ``vae.batch_key``); None without
    a batch column, or with no class holding two batches."""
    from vae.analysis import metrics as M

    kc = batch_key_column(a, rd)
    if kc is None:
        return None
    key, col = kc
    batches = obs_col(lat, col)
    if batches is None:
        log.warning("batch mixing not scored: latent.h5ad has no obs[%r] (analysis.batch_key)", col)
        return None
    out: dict = {"batch_key": key, "column": col}
    small: set[str] = set()
    for name in ("expression", "joint"):
        if LATENTS[name] not in lat.obsm:
            continue
        z = np.asarray(lat.obsm[LATENTS[name]], dtype=np.float64)
        sel = rows[np.isfinite(z[rows]).all(1)]
        m = M.batch_mixing(z[sel], batches[sel], labels[sel], k=a.knn_k)
        if m is not None:
            out[name] = m
            small |= set(m["classes_too_small"])
    if small:
        log.info(
            "batch mixing: classes of %d cells or fewer left out (every neighbour would be "
            "of the class): %s",
            a.knn_k + 1,
            ", ".join(sorted(small)),
        )
    if len(out) == 2:
        log.info("batch mixing not scored: no class of > %d cells holds two batches", a.knn_k + 1)
        return None
    return out


def _disagreements(lat, a: AnalysisSettings, z, labels, pred, rows, vote_ref) -> pd.DataFrame:
    """The scored rows whose kNN call on the image code is not their label.

    One row each, the surest calls first: ``vote_share`` (the call's share of the k
    neighbours) and ``label_share`` (the label's share; 0: no neighbour carries the
    label, the first place to look for a wrong label) and where the crop came from.
    """
    from vae.analysis import metrics as M

    share = M.knn_vote_share(z, labels, pred, a.knn_k, *vote_ref)
    own = M.knn_vote_share(z, labels, labels, a.knn_k, *vote_ref)
    wrong = np.flatnonzero(pred != labels)
    df = pd.DataFrame(
        {
            "latent_row": rows[wrong],
            "cell": np.asarray(lat.obs_names)[rows[wrong]],
            "label": labels[wrong],
            "image_call": pred[wrong],
            "vote_share": share[wrong],
            "label_share": own[wrong],
        }
    )
    for col in (a.source_key, *DISAGREEMENT_OBS):
        if col in lat.obs:
            df[col] = lat.obs[col].astype(str).to_numpy()[rows[wrong]]
    return df.sort_values(
        ["vote_share", "cell"], ascending=[False, True], kind="stable"
    ).reset_index(drop=True)


def _label_suspects(
    lat, a: AnalysisSettings, z, labels, disagree: pd.DataFrame, ref_rows: np.ndarray, loo: bool
) -> pd.DataFrame:
    """The labelled reference rows that voted for the wrong calls of ``disagree``.

    One row per reference row that is among the k neighbours of at least one wrong
    call and carries that call as its label: ``n_misled`` such calls, and
    ``own_label_share``, the share of its own k nearest reference rows (itself left
    out) that carry its label; many misled calls and a low share: check that label
    first. Most-misleading first. ``latent_row`` indexes ``lat``; ``ref_rows``
    (sorted) are the rows the votes came from, the scored rows themselves when
    ``loo`` (leave-one-out, no train split).
    """
    from vae.analysis import metrics as M

    cols = ["latent_row", "cell", "label", "n_misled", "own_label_share"]
    zr, yr = z[ref_rows], labels[ref_rows]
    if disagree.empty or ref_rows.size < 2:
        return pd.DataFrame(columns=cols)
    wrong, call = disagree["latent_row"].to_numpy(), disagree["image_call"].to_numpy()
    if loo:  # the scored rows voted for each other, each leaving itself out
        pos = np.searchsorted(ref_rows, wrong)
        calls = yr.astype(object)
        calls[pos] = call
        voters_all = M.knn_call_voters(zr, yr, calls.astype(str), a.knn_k)
        voters = [voters_all[i] for i in pos]
    else:
        voters = M.knn_call_voters(z[wrong], labels[wrong], call, a.knn_k, zr, yr)
    n_misled = np.bincount(np.concatenate(voters), minlength=ref_rows.size)
    hit = np.flatnonzero(n_misled)
    own = M.knn_vote_share(zr, yr, yr, a.knn_k)[hit]  # leave-one-out in the reference
    lr = ref_rows[hit]
    df = pd.DataFrame(
        {
            "latent_row": lr,
            "cell": np.asarray(lat.obs_names)[lr],
            "label": labels[lr],
            "n_misled": n_misled[hit],
            "own_label_share": own,
        }
    )
    for col in (a.source_key, *DISAGREEMENT_OBS):
        if col in lat.obs:
            df[col] = lat.obs[col].astype(str).to_numpy()[lr]
    return df.sort_values(
        ["n_misled", "own_label_share", "cell"], ascending=[False, True, True], kind="stable"
    ).reset_index(drop=True)


def _suspect_figure(suspects: pd.DataFrame, data, k: int):
    """Masked crops of the reference rows that misled the most wrong calls, one row
    per label they carry, the most misleading first; None when no crop is at hand."""
    import torch

    from vae.data import raw_batch, to_batch

    has = data.has_image.numpy().astype(bool)
    sel = suspects[has[suspects["latent_row"].to_numpy()]]
    order = sel.groupby("label", sort=False)["n_misled"].sum().sort_values(ascending=False)
    rows, names, captions = [], [], []
    for lab in order.index[:DISAGREEMENT_PAIRS]:
        top = sel[sel["label"] == lab].head(DISAGREEMENT_CROPS)
        idx = torch.as_tensor(top["latent_row"].to_numpy(), dtype=torch.long)
        b = to_batch(raw_batch(data, idx), torch.device("cpu"))  # masked, in [0, 1]
        rows.append(b.image.permute(0, 2, 3, 1).numpy())
        names.append(f"labelled\n{lab} ({len(sel[sel['label'] == lab])})")
        captions.append([f"{n} / {o:.2f}" for n, o in zip(top["n_misled"], top["own_label_share"])])
    return _crop_rows(
        rows,
        names,
        captions,
        f"labelled reference crops that voted for wrong kNN({k}) calls on the image code\n"
        "row: their label (count); under each crop: wrong calls it voted for / share of "
        "its own neighbours carrying its label",
    )


def _crop_rows(rows: list, names: list[str], captions: list[list[str]], title: str):
    """One figure row of captioned crops per name (rows of unequal length); None if empty."""
    from vae.analysis import figures as F

    if not rows:
        return None
    return F.image_grid(
        rows,
        names,
        [""] * max(len(r) for r in rows),
        title,
        captions=captions,
        row_labels_across=True,
    )


def _disagreement_figure(disagree: pd.DataFrame, P, k: int, split: str):
    """Masked input crops of the disagreements, one row per (label -> call) pair, the
    commonest pairs first, each row's surest calls first; None when no crop is at hand."""
    pos = {int(r): i for i, r in enumerate(P.rows)}
    pairs = disagree.groupby(["label", "image_call"], sort=False).size()
    pairs = pairs.sort_values(ascending=False, kind="stable").head(DISAGREEMENT_PAIRS)
    rows, names, captions = [], [], []
    for (lab, call), n in pairs.items():
        sel = disagree[(disagree["label"] == lab) & (disagree["image_call"] == call)]
        sel = sel[sel["latent_row"].isin(pos)].head(DISAGREEMENT_CROPS)
        if sel.empty:
            continue
        rows.append(np.stack([P.image[pos[int(r)]] for r in sel["latent_row"]]))
        names.append(f"{lab}\n-> {call} ({n})")
        captions.append(
            [f"{s:.2f} / {o:.2f}" for s, o in zip(sel["vote_share"], sel["label_share"])]
        )
    return _crop_rows(
        rows,
        names,
        captions,
        f"{split} crops whose image-code kNN({k}) call is not their label\n"
        "row: label -> call (count); under each crop: share of the neighbours voting "
        "the call / the label",
    )


def maturation_panel(lat, key: str) -> tuple[np.ndarray | None, str]:
    """The maturation colouring of ``umap_labels.png``: obs[``key``]
    (``analysis.maturation_key``: the simulator's true t in the demo, else the expression
    stage's pseudotime) as floats and ""; or None and the figure's words (two lines) for
    why it has no maturation panel: the column is missing or holds no value. A real or
    own-data study without simulator t or pseudotime drew an all-grey panel, and the
    report's caption spoke of both. Text that is no number counts as missing."""
    mat = obs_col(lat, key)
    if mat is not None:
        mat = pd.to_numeric(pd.Series(np.asarray(mat, dtype=object)), errors="coerce")
        mat = mat.to_numpy(dtype=np.float64)
        if np.isfinite(mat).any():
            return mat, ""
    return None, (
        "no maturation panel: no maturation value in these data\n"
        f"(obs[{key!r}] {'is empty' if mat is not None else 'is missing'}: "
        "no simulator t, no pseudotime)"
    )


def seen_profiles(lat, rows: np.ndarray) -> np.ndarray:
    """(N,) bool: rows of ``rows`` whose expression profile (``obs["expression_ref"]``)
    is also the profile of a row outside ``rows`` (train / val), as pairing by label
    does when a class has fewer profiles than crops. All False without the column."""
    out = np.zeros(lat.n_obs, bool)
    if "expression_ref" not in lat.obs or "has_expression" not in lat.obs:
        return out
    ref = lat.obs["expression_ref"].astype(str).to_numpy()
    from vae.data import parse_flag  # the text "False" is False (astype(bool): True)

    flag = parse_flag(lat.obs["has_expression"], "latent.h5ad", "has_expression", lat.obs_names)
    has = flag & ~np.isin(ref, ["", "nan", "None"])
    inside = np.zeros(lat.n_obs, bool)
    inside[rows] = True
    elsewhere = set(ref[has & ~inside])
    out[rows] = has[rows] & np.isin(ref[rows], list(elsewhere))
    return out


def evaluate(
    rd: RunData,
    a: AnalysisSettings,
    out_files: Outputs,
    seed: int = 0,
    noise_free: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every evaluation table of ``rd`` on split ``a.split``: CSVs and figures into
    ``out_files``, the summary (strict-JSON-clean) returned for ``metrics.json``.

    ``noise_free`` : (N, G) noise-free log-normalised expression of every row
    (simulator truth), adds the denoising table.

    The 2-D embedding of ``X_vae`` over all rows (the one of ``umap_labels.png``) is
    added to ``rd.latent.obsm`` as ``X_umap`` (``analysis.umap=true``) or ``X_vae_pca``."""
    from vae.analysis import figures as F
    from vae.analysis import metrics as M
    from vae.analysis import uses

    t0 = time.time()
    lat = rd.latent
    rows = split_rows(lat, a.split)
    ref = (
        np.flatnonzero(lat.obs["split"].astype(str).to_numpy() == "train")
        if "split" in lat.obs
        else rows
    )
    if a.split == "all" or ref.size == 0:
        ref = None
    labels = labels_of(lat, a.label_key)
    n_known = int(np.sum(known_labels(labels)))
    if n_known and a.knn_k > n_known:
        # more neighbours than labelled cells: every call would be the commonest label
        raise AnalysisError(
            f"analysis.knn_k={a.knn_k} is more than the {n_known} cells with a label"
        )
    programs = programs_of(a.programs, rd.gene_names)
    gidx = heatmap_genes(programs, rd.gene_names, rd.meta)
    out: dict[str, Any] = {
        "split": a.split,
        "n_rows": int(rows.size),
        "n_reference_rows": int(ref.size) if ref is not None else 0,
    }
    tables: dict[str, pd.DataFrame] = {}
    tb = out_files.tb
    steps = Steps("evaluate", 6)  # one per section below (terminal only)

    steps("latent structure")
    # ---- latent structure: scored on the rows whose class is known (unlabelled rows,
    # e.g. the real chain's image-only detections, would otherwise vote as a class)
    known = known_labels(labels)
    struct, per_class, by_source, confusions = [], [], [], {}
    disagree: pd.DataFrame | None = None
    suspects: pd.DataFrame | None = None
    sources = obs_col(lat, a.source_key)
    # one cell can enter through two image sources (a BCCD smear cell and the curated
    # crop cut from it share obs["specimen"]): the per-cell accuracy counts it once
    specimens = obs_col(lat, "specimen")
    # pairing by label reuses a profile for several crops: a held-out row whose profile
    # also sits in a training row has that row's expression code, a free vote. Such rows
    # are left out of the scores of the latents that read expression (joint, expression)
    seen = seen_profiles(lat, rows) if ref is not None else np.zeros(lat.n_obs, bool)
    for name, key in LATENTS.items():
        if key not in lat.obsm:
            continue
        z = np.asarray(lat.obsm[key], dtype=np.float64)
        coded = rows[np.isfinite(z[rows]).all(1)]
        ok = coded[known[coded]]
        n_seen = 0
        if name != "image":
            n_seen = int(seen[ok].sum())
            ok = ok[~seen[ok]]
        if ok.size < 3:
            continue
        row = {
            "latent": name,
            "n": int(ok.size),
            "n_unlabelled": int(coded.size - ok.size - n_seen),
            "n_profile_in_training": n_seen,
        }
        if ref is None:  # leave-one-out among the evaluated rows
            vote_ref: tuple = (None, None)
            rok = ok  # the rows the votes come from
            pred = M.knn_predict(z[ok], labels[ok], a.knn_k)
        else:
            rok = ref[np.isfinite(z[ref]).all(1) & known[ref]]
            vote_ref = (z[rok], labels[rok])
            pred = M.knn_predict(z[ok], labels[ok], a.knn_k, *vote_ref) if rok.size else None
        if pred is None:
            row.update(knn_accuracy=np.nan, knn_balanced_accuracy=np.nan)
        else:
            lt = M.label_transfer(labels[ok], pred)
            row.update(knn_accuracy=lt.accuracy, knn_balanced_accuracy=lt.balanced_accuracy)
            if specimens is not None and ref is not None:
                # (leave-one-out would let a cell's copy vote for it: no per-cell score)
                w = M.per_cell_weights(specimens[ok], None if sources is None else sources[ok])
                row.update(
                    n_cells=round(float(w.sum()), 1),
                    knn_accuracy_per_cell=M.weighted_accuracy(labels[ok], pred, w),
                )
            confusions[name] = (lt.classes, lt.confusion)
            for i, c in enumerate(lt.classes):
                if not lt.support[i]:
                    continue
                off = lt.confusion[i].copy()
                off[i] = 0
                per_class.append(
                    {
                        "latent": name,
                        "label": c,
                        "n": int(lt.support[i]),
                        "recall": lt.recall[i],
                        "precision": lt.precision[i],
                        "most_often_taken_for": lt.classes[int(off.argmax())] if off.any() else "",
                        "n_taken_for_it": int(off.max()),
                    }
                )
            if name == "image":
                disagree = _disagreements(lat, a, z[ok], labels[ok], pred, ok, vote_ref)
                tables["label_disagreements"] = disagree.drop(columns="latent_row")
                out["label_disagreements"] = {
                    "latent": name,
                    "n": int(len(disagree)),
                    "n_scored": int(ok.size),
                    "n_no_neighbour_shares_label": int((disagree["label_share"] == 0).sum()),
                }
                suspects = _label_suspects(lat, a, z, labels, disagree, rok, ref is None)
                tables["label_suspects"] = suspects.drop(columns="latent_row")
                out["label_suspects"] = {
                    "latent": name,
                    "n": int(len(suspects)),
                    "n_reference": int(rok.size),
                    "n_misled_most": int(suspects["n_misled"].max()) if len(suspects) else 0,
                }
            if name == "image" and sources is not None:
                src_obj = np.asarray(sources, dtype=object)[ok]
                src = src_obj.astype(str)
                # a missing source reads like a missing label (the schema's one list)
                for v in sorted(set(src[known_labels(src_obj)])):
                    sel = src == v
                    by_source.append(
                        {
                            "latent": name,
                            a.source_key: v,
                            "n": int(sel.sum()),
                            "knn_accuracy": float(np.mean(pred[sel] == labels[ok][sel])),
                        }
                    )
        row["silhouette"] = M.silhouette(z[ok], labels[ok])
        if len(set(labels[ok])) >= 2:
            agree = M.leiden_agreement(z[ok], labels[ok], a.n_neighbors, a.leiden_resolution, seed)
            row.update(leiden_ari=agree.ari, leiden_nmi=agree.nmi, leiden_clusters=agree.n_clusters)
        struct.append(row)
    if struct:
        tables["latent_structure"] = pd.DataFrame(struct)
        out["latent_structure"] = {
            r["latent"]: {k: v for k, v in r.items() if k != "latent"} for r in struct
        }
    mixing = _batch_mixing(lat, a, rd, rows, labels)
    if mixing is not None:
        out["batch_mixing"] = mixing
        tables["batch_mixing"] = pd.DataFrame(
            [
                {
                    "latent": k,
                    **{c: v for c, v in m.items() if c not in ("classes", "classes_too_small")},
                }
                for k, m in mixing.items()
                if isinstance(m, dict)
            ]
        )
    if per_class:
        tables["label_transfer"] = pd.DataFrame(per_class)
    if len(by_source) >= 2:
        tables["label_transfer_by_source"] = pd.DataFrame(by_source)
        out["label_transfer_by_source"] = {
            r[a.source_key]: {"n": r["n"], "knn_accuracy": r["knn_accuracy"]} for r in by_source
        }
    from vae.analysis.palette import label_order

    for name, (classes, conf) in list(confusions.items()):
        # rows and columns in maturation order, as every other figure lists the classes
        order = [list(classes).index(c) for c in label_order(classes)]
        classes = [classes[i] for i in order]
        conf = np.asarray(conf)[np.ix_(order, order)]
        confusions[name] = (classes, conf)
        cm = pd.DataFrame(conf, index=pd.Index(classes, name="true"), columns=classes)
        tables[f"confusion_{name}"] = cm.reset_index()
    if confusions:
        fig = F.confusion_panels(
            confusions,
            f"kNN({a.knn_k}) label transfer on the {a.split} rows with a known label "
            "(reference: train rows); colour: share of the true class",
        )
        out_files.figure(fig, "label_transfer", "evaluate/label_transfer")

    # ---- active units: dims whose mean KL to the prior (fused posterior) > 0.01 nats
    if "X_vae_full" in lat.obsm and "X_vae_logvar" in lat.obsm and rows.size:
        import torch

        from vae.losses import kl_normal
        from vae.train import ACTIVE_UNIT_NATS, active_units

        mu = torch.from_numpy(np.asarray(lat.obsm["X_vae_full"], dtype=np.float64)[rows])
        lv = torch.from_numpy(np.asarray(lat.obsm["X_vae_logvar"], dtype=np.float64)[rows])
        kl_dim = kl_normal((mu, lv)).mean(0).numpy()
        out["active_units"] = {
            "n_active": active_units(kl_dim),
            "n_latent": int(kl_dim.size),
            "threshold_nats": ACTIVE_UNIT_NATS,
            "kl_per_dim": [float(v) for v in kl_dim],
        }

    steps("retrieval")
    # ---- matching of paired rows (image-only vs expression-only latents)
    if "X_vae_image" in lat.obsm and "X_vae_expression" in lat.obsm:
        zi = np.asarray(lat.obsm["X_vae_image"], dtype=np.float64)
        ze = np.asarray(lat.obsm["X_vae_expression"], dtype=np.float64)
        both = rows[np.isfinite(zi[rows]).all(1) & np.isfinite(ze[rows]).all(1)]
        if both.size >= 2:
            r = M.retrieval(zi[both], ze[both])
            out["retrieval"] = M.to_dict(r)
            tables["retrieval"] = pd.DataFrame([{"query": "image -> expression", **M.to_dict(r)}])

    steps("disentanglement")
    # ---- disentanglement against known factors (simulator truth)
    z = np.asarray(lat.obsm["X_vae"], dtype=np.float64)[rows]
    factors = {f: obs_col(lat, f)[rows] for f in a.factors if f in lat.obs}
    factors = {f: v for f, v in factors.items() if M.known_rows(v).sum() >= 4}
    if factors:
        mg = M.mig(z, factors, a.mig_bins)
        dc = M.dci(z, factors, n_estimators=a.dci_trees, seed=seed)
        drows = []
        for f, v in factors.items():
            bd = (
                M.best_dim_spearman(z, v.astype(float))
                if np.asarray(v).dtype.kind in "fiub"
                else None
            )
            drows.append(
                {
                    "factor": f,
                    "n_known": int(M.known_rows(v).sum()),
                    "mig_gap": mg.per_factor.get(f, np.nan),
                    # None (an empty cell, "n/a" in the report): no such dim, not dim -1
                    "mig_best_dim": mg.best_dim.get(f),
                    "dci_informativeness": dc.informativeness.get(f, np.nan),
                    "best_dim_spearman": bd.spearman if bd else np.nan,
                    "best_dim": bd.dim if bd else None,
                }
            )
        tables["disentanglement"] = pd.DataFrame(drows).astype(
            {"mig_best_dim": "Int64", "best_dim": "Int64"}
        )
        out["disentanglement"] = {
            "mig": mg.mig,
            "dci_disentanglement": dc.disentanglement,
            "dci_completeness": dc.completeness,
            "per_factor": {
                r["factor"]: {k: v for k, v in r.items() if k != "factor"} for r in drows
            },
        }
        imp = pd.DataFrame(dc.importance, columns=dc.factors)
        imp.insert(0, "dim", np.arange(len(imp)))
        tables["dci_importance"] = imp

    steps("reconstruction")
    # ---- reconstruction and cross-modal prediction (needs the paired data)
    P = None
    if rd.data is not None:
        enc = encode_dataset(rd.model, rd.data, rd.device, a.batch_size, rows=rows, decode=True)
        # the expression codes of the figure's and the readback's cells drawn from
        # expression, (len(rows), d): encoded once, here
        P, expr_codes = enc.decoded, enc.expression
        rec, gene_rows = [], []
        hi, he = P.has_image, P.has_expression
        if hi.any():
            rec.append(_image_row("image (joint)", P.rec_image, P, hi))
        if he.sum() >= 3:
            gc = M.per_gene_correlation(P.rec_expression[he], P.x[he])
            row = _gene_row("expression (joint)", int(he.sum()), gc, gidx)
            if P.nb_mu is not None and P.counts is not None:
                ll = M.nb_log_likelihood(P.counts[he], np.maximum(P.nb_mu[he], 1e-8), P.nb_theta)
                row["nb_loglik_per_cell"] = float(ll.mean())
                row["nb_loglik_per_count"] = float(ll.sum() / max(P.counts[he].sum(), 1))
            rec.append(row)
            gene_rows.append(("joint", gc))
        both = hi & he
        if both.sum() >= 3:
            gi = M.per_gene_correlation(P.expr_from_image[both], P.x[both])
            row = _gene_row("image -> expression", int(both.sum()), gi, gidx)
            rec.append(row)
            gene_rows.append(("image_to_expression", gi))
            rec.append(_image_row("expression -> image", P.image_from_expr, P, both))
        if rec:
            tables["reconstruction"] = pd.DataFrame(rec)
            out["reconstruction"] = {
                r["what"]: {k: v for k, v in r.items() if k != "what"} for r in rec
            }
        if gene_rows:
            g = pd.DataFrame({"gene": rd.gene_names})
            g["granule_gene"] = np.isin(np.arange(len(rd.gene_names)), gidx)
            for nm, gc in gene_rows:
                g[f"{nm}_pearson"] = gc.pearson
                g[f"{nm}_spearman"] = gc.spearman
            tables["per_gene"] = g
        # reconstruction figure: input | joint | from expression, two crops of each label
        # (a reader compares the kinds of cell, not eight neutrophils); decoded cells
        # drawn through their decoded mask, as the masked inputs are drawn, large
        # enough that the drawn grain and granules show
        # the training crops' codes that lend poses to the cells drawn from expression
        # (the figure's and the readback's), encoded once
        lenders = (
            pose_lenders(lat, rd.data, rd.model, rd.device, a.batch_size) if he.any() else None
        )
        show = rows_per_label(labels[P.rows], np.flatnonzero(hi), per_label=2, max_rows=12)
        if show.size:
            rec_cells, expr_cells = P.rec_cells(), P.image_from_expr_cells()
            # from expression: drawn in the pose of the nearest training crop (a nucleus
            # averaged over orientations reads as a ring); the table's "expression ->
            # image" row scores the pose-free decode above
            with_expr = show[he[show]]
            posed = _expression_posed(
                rd, P.rows[with_expr], a.batch_size, lenders, expr_codes[with_expr]
            )
            if posed is not None:
                expr_cells = expr_cells.copy()
                expr_cells[with_expr] = posed.cells()
            # a crop without a profile has nothing to decode from expression: left
            # black and said so, not the decode of an empty expression posterior
            fig = F.image_grid(
                [
                    np.stack(
                        [
                            P.image[i],
                            rec_cells[i],
                            expr_cells[i] if he[i] else np.zeros_like(expr_cells[i]),
                        ]
                    )
                    for i in show
                ],
                [labels[P.rows[i]] if known[P.rows[i]] else "(unlabelled)" for i in show],
                [
                    "input (masked)",
                    "joint recon",
                    "from expression" + ("\n(a training cell's pose)" if posed is not None else ""),
                ],
                "held-out reconstructions",
                captions=[["", "", "" if he[i] else "no expression profile"] for i in show],
                cell_inches=1.5,
            )
            out_files.figure(fig, "reconstructions", "evaluate/reconstructions")
        # ---- the drawings read back by the image encoder: of their row's class?
        rb = readback_summary(rd, a, P, labels, known, ref, lenders, expr_codes)
        if rb is not None:
            out["readback"] = rb
        if disagree is not None and len(disagree):
            fig = _disagreement_figure(disagree, P, a.knn_k, a.split)
            if fig is not None:
                out_files.figure(fig, "label_disagreements", "evaluate/label_disagreements")
        if suspects is not None and len(suspects):
            fig = _suspect_figure(suspects, rd.data, a.knn_k)
            if fig is not None:
                out_files.figure(fig, "label_suspects", "evaluate/label_suspects")

    # ---- what expression autoencoders are used for: imputation, denoising, atypical cells
    if rd.data is not None:
        used = uses.imputation_and_denoising(rd, rows, ref, out_files, seed, noise_free)
        if "denoising" in used:
            out["denoising"] = used.pop("denoising")
        if used:
            out["imputation"] = used
    an = uses.anomaly_summary(lat, P, labels, rows, out_files)
    if an:
        out["anomaly"] = an

    steps("UMAPs")
    # ---- UMAPs of all rows (the embedding needs more cells than the test split)
    z_all = np.asarray(lat.obsm["X_vae"], dtype=np.float64)
    emb, method = embedding(
        z=z_all,
        n_neighbors=a.n_neighbors,
        use_umap=a.umap,
        seed=seed,
    )
    # kept on the latent table the way scanpy keeps its own (the stage writes it out)
    lat.obsm["X_umap" if method == "UMAP" else "X_vae_pca"] = emb.astype(np.float32)
    cols: dict[str, np.ndarray] = {"label": labels}
    if "split" in lat.obs:
        cols["split"] = lat.obs["split"].astype(str).to_numpy()
    mat, no_mat = maturation_panel(lat, a.maturation_key)
    if mat is not None:
        cols["maturation"] = mat
    if rd.data is not None and len(rd.data.has_image) == lat.n_obs:
        # which rows have a crop: a class split into islands by kind shows here
        hi = rd.data.has_image.numpy().astype(bool)
        he = rd.data.has_expression.numpy().astype(bool)
        cols["modality"] = np.where(
            hi & he, "crop + profile", np.where(hi, "crop only", "profile only")
        )
        mix = M.modality_mixing(z_all, hi, labels, k=a.knn_k)
        if mix is not None:
            out["modality_mixing"] = mix
    kc = batch_key_column(a, rd)
    if kc is not None and obs_col(lat, kc[1]) is not None:  # a class split by batch shows
        cols["batch"] = lat.obs[kc[1]].astype(str).to_numpy()
    # one label -> colour mapping of all rows for every panel (a subset keeps its colours)
    colours = label_colours(labels)
    fig = F.scatter_panel(
        emb,
        cols,
        # a study without maturation values says so on the figure, not an all-grey panel
        f"{method} of the shared latent (all {lat.n_obs} rows)" + (f"\n{no_mat}" if no_mat else ""),
        colours=colours,
        axis_name=method,
    )
    out_files.figure(fig, "umap_labels", "evaluate/umap_labels")
    # which colourings the figure has, in its order (the report's caption can say
    # "maturation" only where there is that panel)
    out["umap_labels_panels"] = list(cols)
    scores = observed_program_scores(lat, rd.data, rd.gene_names, programs)
    if scores:
        fig = F.scatter_panel(
            emb,
            scores,
            f"{method} coloured by gene program scores (observed)",
            axis_name=method,
        )
        out_files.figure(fig, "umap_programs", "evaluate/umap_programs")
    for name, key in LATENTS.items():
        if name == "joint" or key not in lat.obsm:
            continue
        zz = np.asarray(lat.obsm[key], dtype=np.float64)
        ok = np.isfinite(zz).all(1)
        if ok.sum() >= 5:
            e2, m2 = embedding(zz[ok], a.n_neighbors, a.umap, seed)
            fig = F.scatter_panel(
                e2,
                {"label": labels[ok]},
                f"{m2} of the {name}-only latent",
                colours=colours,
                axis_name=m2,
            )
            out_files.figure(fig, f"umap_{name}", f"evaluate/umap_{name}")

    steps("write")
    # ---- write
    for name, df in tables.items():
        out_files.csv(df, name)
    out["tables"] = sorted(f"{n}.csv" for n in tables)
    steps.close()
    out["seconds"] = round(time.time() - t0, 2)
    if tb is not None:
        for sect, vals in out.items():
            if isinstance(vals, dict):
                tb_scalars(tb, f"evaluate/{sect}", vals)
        # every table written, the imputation / denoising / anomaly ones too
        for name, df in out_files.tables.items():
            tb.add_text(f"evaluate/{name}", markdown_table(df, name), 0)
        tb.close()
    log.info("%s", summary_line(out, rows.size, a.split))
    return clean_json(out)


def summary_line(out: dict, n_rows: int, split: str) -> str:
    """The stage's last log line: the headline numbers of ``metrics.json``, not its file names.

    The terminal audit (docs/reliability.md) found the old line listed the twelve CSV
    names and no number, so a researcher had to open ``metrics.json`` to see how the run
    went. Absent sections (no labels, no pairs) are left out.
    """
    parts = [f"evaluate: {n_rows} {split} rows"]
    ls = out.get("latent_structure") or {}
    acc = [
        f"{name} {ls[name]['knn_accuracy']:.3f}"
        for name in ("joint", "image", "expression")
        if isinstance(ls.get(name), dict) and ls[name].get("knn_accuracy") is not None
    ]
    if acc:
        parts.append("kNN label accuracy " + ", ".join(acc))
    r = out.get("retrieval") or {}
    if r.get("recall_at_10") is not None:
        parts.append(f"image->expression recall@10 {r['recall_at_10']:.3f} (n {r.get('n', '?')})")
    rb = out.get("readback") or {}
    if rb.get("n"):
        read = [
            f"{name} {rb[key]:.2f}"
            for name, key in (
                ("crops", "input"),
                ("joint", "joint"),
                ("from expression", "from_expression"),
            )
            if rb.get(key) is not None
        ]
        parts.append(f"drawings read as their label: {', '.join(read)} (n {rb['n']})")
        grain = [
            f"{name} {rb[key]:.2f}"
            for name, key in (
                ("joint", "grain_over_input_joint"),
                ("from expression", "grain_over_input_from_expression"),
            )
            if rb.get(key) is not None and np.isfinite(rb[key])
        ]
        if grain:
            parts.append(f"drawn cytoplasm grain over the crops': {', '.join(grain)}")
    au = out.get("active_units") or {}
    if au.get("n_latent"):
        parts.append(f"active dims {au['n_active']}/{au['n_latent']}")
    n_tables = len(out.get("tables", []))
    parts.append(f"metrics.json + {n_tables} tables, {out.get('seconds', 0):.1f}s")
    return "; ".join(parts)
