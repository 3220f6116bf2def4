"""stage=traverse's analysis: what the latent space says about granule formation.

Per-dimension sweeps of the top-k dims by KL, straight and GP paths from the
earliest to the latest maturation class, genes ranked along the path, granule
features measured on decoded and real crops, recovery of simulator truth, and
the self-contained ``report.html`` (see docs/analysis.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segmentation.progress import Steps
from vae.analysis.palette import abbreviation_note, display_label, label_order, short_label
from vae.analysis.run import (
    AnalysisError,
    Outputs,
    RunData,
    cell_codes,
    clean_json,
    crop_background,
    full_codes,
    heatmap_genes,
    image_reference_rows,
    labels_of,
    measure,
    obs_col,
    programs_of,
    read_table,
    split_rows,
    tb_scalars,
)
from vae.analysis.settings import AnalysisSettings
from vae.inputs.schema import (
    HAS_EXPRESSION,
    HAS_IMAGE,
    MATURATION_ORDER,
    NUCLEUS_SEGMENTATION,
    UNKNOWN_LABELS,
    known_labels,
)

log = logging.getLogger(__name__)

# figure titles of the two paths ("gp" alone reads as granulocyte precursor to a haematologist)
PATH_TITLES = {"straight": "straight path", "gp": "Gaussian-process path"}


def draw_code(rd: RunData, a: AnalysisSettings) -> int | None:
    """The image source every code without a crop is drawn in (``a.draw_source``,
    :func:`vae.analysis.traverse.source_code`); None: the average of the sources."""
    from vae.analysis import traverse as T

    try:
        return T.source_code(rd.model, a.draw_source)
    except ValueError as e:
        raise AnalysisError(str(e)) from e


def _flag(obs: pd.DataFrame, col: str) -> np.ndarray:
    """(N,) bool ``obs[col]`` of the run's latent table (``has_image`` /
    ``has_expression``), read as :func:`vae.data.parse_flag` reads it: ``astype(bool)``
    took the text "False" for True."""
    from vae.data import parse_flag

    return parse_flag(obs[col], "latent.h5ad", col, obs.index)


def _votes(share: float, k: int) -> str:
    """A neighbour vote as a count of ``k``: share 0.4 of 5 -> ``"2/5"``."""
    return f"{int(round(float(share) * k))}/{k}"


# one line per truth-recovery row, so rows that look contradictory read as intended
_TRUTH_MEANING = {
    "straight_path_position_vs_true_t_spearman": "cells ordered along the straight path as by true maturation",
    "gp_path_position_vs_true_t_spearman": "cells ordered along the GP path as by true maturation",
    "maturation_axis_vs_true_t_spearman": "cells ordered along the maturation axis (the latent dim the ordinal head orders the stages on) as by true maturation",
    "decoded_granule_density_vs_true_spearman": "granules counted on each cell decoded from its crop as given (single-view code) vs the total true density (azurophilic + fine specific granules)",
    "real_crop_granule_density_vs_true_spearman": "same count on the input crops themselves: how well the counter reads the cells (a decoder that draws granules sharper than the crops show them can score above it)",
    "decoded_granule_density_vs_true_azurophilic_spearman": "vs the large azurophilic granules only (the counter cannot resolve the fine specific ones, whose density rises while azurophilic falls: so this sign can differ from the total's)",
    "real_crop_granule_density_vs_true_azurophilic_spearman": "same on the real crops",
    "decoded_lobes_vs_true_spearman": "nuclear lobes counted on each cell decoded from its crop as given (single-view code) vs true lobes",
    "real_crop_lobes_vs_true_spearman": "same count on the real crops",
}

_CONSTANT = (
    "the feature is constant here (e.g. no granules found on any decoded image), "
    "so no correlation is defined"
)


def traverse_study(
    rd: RunData,
    a: AnalysisSettings,
    out_files: Outputs,
    report: Path,
    evaluation: Path | None,
    title: str,
    subtitle: str,
    resolved_config: dict,
    background: float = 0.0,
    azurophilic_density: Callable[[float], float] | None = None,
    seed: int = 0,
    crop_rejects: Path | None = None,
    evaluation_stale: str | None = None,
) -> dict[str, Any]:
    """Traversals, paths, granule features and truth recovery of ``rd``, then ``report``.

    Figures and CSVs go to ``out_files``; ``evaluation`` (stage=evaluate's
    ``metrics.json``, its tables beside it) adds the evaluation section, unless
    ``evaluation_stale`` says why its numbers are not of this model (then only that);
    ``azurophilic_density(t)`` is the simulator's truth of the large-granule
    density (None for real data); ``crop_rejects`` (stage=segment's ``rejects.png``,
    ``rejects.csv`` beside it) adds examples of the cells the crop filters dropped. Returns the summary for ``traverse_summary.json``.
    """
    from vae.analysis import figures as F
    from vae.analysis import granules as G
    from vae.analysis import metrics as M
    from vae.analysis import traverse as T
    from vae.analysis.report import FigureItem, Section, TableItem, fmt_number, write_report

    t0 = time.time()
    # the image source codes without a crop are drawn in (checked before any work)
    draw = draw_code(rd, a)
    lat = rd.latent
    genes = rd.gene_names
    programs = programs_of(a.programs, genes)
    gidx = heatmap_genes(programs, genes, rd.meta)
    gnames = [genes[i] for i in gidx]
    # program of each gene for the ranking table: the data's own (simulator) programs,
    # then the configured granule programs
    annot: dict[str, list[str]] = {}
    for g, p_ in rd.gene_program.items():
        annot.setdefault(p_, []).append(g)
    for p_, gl in programs.items():
        annot.setdefault(p_, []).extend(
            g for g in gl if g.upper() not in {x.upper() for x in rd.gene_program}
        )
    labels = labels_of(lat, a.label_key)
    # refused before any work: a typo or a stage two labels name
    path_classes = path_order(a.path_classes, labels, lat.uns.get("maturation_axis"))
    Z = full_codes(lat)  # (N, d)
    d = Z.shape[1]
    rows = split_rows(lat, a.split)
    params = G.GranuleParams(
        radius_px=a.granule_radius_px,
        threshold=a.granule_threshold,
        border_px=a.granule_border_px,
        nucleus_margin_px=a.granule_nucleus_margin_px,
        neck_ratio=a.lobe_neck_ratio,
        # lobes read with the cut rules the model's lobe head learned its counts by
        lobe_deep_valley_ratio=getattr(rd.model.args, "lobe_deep_valley", None),
    )
    bg = background
    tb = out_files.tb
    figs: dict[str, list] = {k: [] for k in ("dims", "path", "granules", "truth")}
    tables: dict[str, pd.DataFrame] = {}
    summary: dict[str, Any] = {"n_latent": d, "split": a.split}
    if T.image_sources(rd.model):  # what codes without a crop are drawn as
        summary["draw_source"] = a.draw_source or "average of the sources"
    steps = Steps("traverse", 5)  # one per section below (terminal only)
    # a decoder branch no training row ever reached decodes noise: leave its figures out
    img_ok, expr_ok = trained_modalities(lat)
    summary["modalities"] = [m for m, ok in (("image", img_ok), ("expression", expr_ok)) if ok]
    skipped = _skipped_sentence(img_ok, expr_ok)

    steps("traversals")
    # ---- per-dimension traversals
    kl = np.asarray(lat.uns.get("kl_per_dim", np.ones(d)), dtype=np.float64).ravel()
    if kl.size != d:  # KL of the shared block only: private dims come after it
        kl = np.r_[kl, np.zeros(d - kl.size)] if kl.size < d else kl[:d]
    dims = T.top_dims_by_kl(kl, a.top_k_dims)
    # a model trained with the maturation head (vae.maturation_weight) orders the stages
    # on one dim: it is swept first, whatever its KL
    mat_axis = lat.uns.get("maturation_axis")
    mat_dim = int(mat_axis["dim"]) if mat_axis is not None else None
    if mat_dim is not None and a.top_k_dims > 0:
        dims = np.r_[mat_dim, [x for x in dims if x != mat_dim]][: a.top_k_dims].astype(int)
    sd = Z.std(0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    # codes the image decoder was trained on: a decoded cell far from all of them is the
    # decoder's extrapolation (traverse.image_support), drawn faded in every figure
    img_ref = image_reference_rows(lat, _has_crop(rd)) if img_ok else np.zeros(0, int)
    z_img = Z[img_ref]
    lab_img = labels[img_ref]  # what each of those crops is ("" unlabelled)
    try:
        anchor = T.anchor_point(Z, labels, np.asarray(lat.obs_names), a.anchor_class, a.anchor_cell)
    except ValueError as e:
        raise AnalysisError(f"analysis.anchor_*: {e}") from e
    anchor_desc = (
        f"cell {a.anchor_cell}"
        if a.anchor_cell
        else f"mean of class {a.anchor_class}"
        if a.anchor_class
        else "mean of all cells"
    )
    if not (a.anchor_cell or a.anchor_class) and img_ref.size:
        # the mean of all cells lies between the classes, where no cell is (on the demo
        # farther from every crop's code than 99 % of them lie from their neighbours):
        # sweep around the training cell with a crop nearest to it instead
        i = T.nearest_to_mean(Z, img_ref)
        anchor = Z[i]
        anchor_desc = (
            f"cell {lat.obs_names[i]}, the training cell with a crop nearest the mean of all cells"
        )
    summary["anchor"] = anchor_desc
    # each dim swept over the stretch around the anchor that stays among the crops' codes
    # (analysis.sweep_in_support), at most +-span_sd: a sweep of the full span mostly
    # draws the decoder's extrapolation (5-6 of 9 steps on the demo)
    ranges: dict[int, tuple[float, float]] = {}
    if a.sweep_in_support and img_ok:
        for dim in dims:
            r = T.supported_range(
                anchor, int(dim), sd, z_img, a.span_sd, a.image_support_k, a.image_support_quantile
            )
            if r is not None and r[1] - r[0] > 0:
                ranges[int(dim)] = r
        summary["sweep_range_sd"] = {
            int(k): [round(v[0], 2), round(v[1], 2)] for k, v in ranges.items()
        }
    trs = T.traverse_dims(rd.model, anchor, dims, sd, a.span_sd, a.n_steps, rd.device, ranges, draw)
    dim_rows = []
    dim_items: dict[int, FigureItem] = {}  # each swept dim's figure (its caption grows below)

    def step_lab(tr) -> list[str]:
        return [f"{o:+.1f}sd" for o in tr.offsets]

    def swept(tr) -> str:
        lo, hi = tr.offsets[0], tr.offsets[-1]
        # said only where the support test shortened the sweep (on the real preset it
        # accepts the full span of every dim: docs/analysis.md, "Image support")
        cut = lo > -a.span_sd + 1e-6 or hi < a.span_sd - 1e-6
        inside = (
            " (the stretch that stays among the crops' codes)"
            if int(tr.dim) in ranges and cut
            else ""
        )
        return f"{lo:+.1f} to {hi:+.1f} sd{inside}"

    sweep_ok = {
        tr.dim: T.image_support(
            T.sweep_codes(anchor, tr.dim, tr.values),
            z_img,
            a.image_support_k,
            a.image_support_quantile,
        ).supported
        for tr in trs
    }
    if img_ok:
        summary["sweep_image_supported_steps"] = {
            int(dim): int(ok.sum()) for dim, ok in sweep_ok.items()
        }
    anchor_title = anchor_desc.split(",")[0]  # figure titles: the cell or the mean
    # which decoder reads each dim: shared (both), image-private, expression-private
    margs = getattr(rd.model, "args", None)
    n_sh, n_pr = int(getattr(margs, "n_shared", d) or d), int(getattr(margs, "n_private", 0) or 0)

    def dim_name(k: int) -> str:
        k = int(k)
        if n_pr and n_sh <= k < n_sh + n_pr:
            return f"z{k} (image only)"
        if n_pr and k >= n_sh + n_pr:
            return f"z{k} (expression only)"
        return f"z{k}"

    forced = mat_dim is not None and len(trs) > 0 and int(trs[0].dim) == mat_dim
    dims_title = (
        f"maturation axis z{mat_dim} and the top {len(trs) - 1} other dims by KL"
        if forced
        else f"top {len(trs)} latent dims by KL"
    )
    for tr in trs:
        ok = sweep_ok[tr.dim]
        fig = F.strip_with_heatmap(
            T.fade_unsupported(tr.decoded.cells(), ok) if img_ok else None,
            tr.decoded.expression[:, gidx] if expr_ok else None,
            gnames,
            _starred(step_lab(tr), ok, img_ok),
            f"{dim_name(tr.dim)} (KL {kl[tr.dim]:.2f} nats)"
            + (" = maturation axis" if tr.dim == mat_dim else "")
            + f", anchor: {anchor_title}",
        )
        p = out_files.figure(fig, f"traverse_dim{tr.dim:02d}", f"traverse/dim{tr.dim:02d}")
        shown = {
            (True, True): "decoded images (top) and granule-gene expression (heatmap)",
            (True, False): "decoded images",
            (False, True): "decoded granule-gene expression (heatmap)",
        }[(img_ok, expr_ok)]
        dim_items[int(tr.dim)] = FigureItem(
            p,
            (
                f"Latent dim z{tr.dim} swept {swept(tr)} around the {anchor_desc}: {shown}."
                + (
                    f" Faded, marked *: {int((~sweep_ok[tr.dim]).sum())} of {len(tr.offsets)} "
                    "steps lie beyond the training cells with a crop (image support, as "
                    "for the paths below): the decoder's extrapolation."
                    if img_ok and not sweep_ok[tr.dim].all()
                    else ""
                )
                + (
                    " This is the maturation axis: the ordinal head trained on it orders "
                    + " -> ".join(map(str, mat_axis["classes"]))
                    + " (vae.maturation_weight)"
                    + _axis_means(
                        Z[:, tr.dim],
                        lat.obs,
                        a.label_key,
                        mat_axis["classes"],
                        tr.dim,
                        float(anchor[tr.dim]),
                        float(sd[tr.dim]),
                    )
                    if tr.dim == mat_dim
                    else ""
                )
            ),
        )
        figs["dims"].append(dim_items[int(tr.dim)])
        prog = T.program_scores(tr.decoded.expression, genes, programs) if expr_ok else {}
        row = {"dim": tr.dim, "kl": kl[tr.dim]}
        if img_ok:
            feats = measure(tr.decoded.images, tr.decoded.masks, params, bg)
            for f in G.FEATURES:
                row[f] = M.correlation_matrix(tr.offsets, feats[f].to_numpy(float))[0, 0]
        for p_, v in prog.items():
            row[f"program:{p_}"] = M.correlation_matrix(tr.offsets, v)[0, 0]
        dim_rows.append(row)
    if trs and img_ok:
        fig = F.image_grid(
            [T.fade_unsupported(tr.decoded.cells(), sweep_ok[tr.dim]) for tr in trs],
            [dim_name(tr.dim) for tr in trs],
            [f"step {i + 1}" for i in range(a.n_steps)],
            f"{dims_title}, anchor: {anchor_title}",
            # each row its own offsets; the per-dim figures' mark, so a faded tile reads
            # as extrapolation, not a cell
            captions=[
                [
                    x + ("" if ok else " * beyond data")
                    for x, ok in zip(step_lab(tr), sweep_ok[tr.dim])
                ]
                for tr in trs
            ],
        )
        p = out_files.figure(fig, "traverse_grid", "traverse/grid")
        figs["dims"].insert(
            0,
            FigureItem(
                p,
                f"Summary: each row sweeps one of the {len(trs)} dims ({dims_title}; KL per dim of "
                "the training cells, latent.h5ad uns['kl_per_dim']; '(image only)' / '(expression "
                f"only)': a private dim that one decoder reads) around the {anchor_desc}, "
                + (
                    "over the stretch (at most "
                    f"+-{a.span_sd} sd, analysis.span_sd) where the code stays among the training "
                    "cells with a crop (analysis.sweep_in_support); the offset in sd is under each image"
                    if ranges
                    else f"over -{a.span_sd}..+{a.span_sd} sd (analysis.span_sd)"
                )
                + " (decoded images; faded and marked *: beyond the training cells with a crop, "
                "the decoder's extrapolation).",
            ),
        )
    cols = [c for c in (dim_rows[0] if dim_rows else {}) if c not in ("dim", "kl")]
    if trs and cols:
        tables["dim_feature_correlation"] = pd.DataFrame(dim_rows)
        fig = F.heatmap(
            tables["dim_feature_correlation"][cols].to_numpy(float),
            [f"z{r['dim']}" for r in dim_rows],
            cols,
            "Spearman: traversal offset vs feature of decoded cell",
        )
        p = out_files.figure(fig, "dim_feature_heatmap", "traverse/dim_feature_heatmap")
        figs["granules"].append(
            FigureItem(
                p,
                "Spearman correlation between each swept dim's offset and "
                + {
                    (True, True): "granule/nucleus features measured on the decoded images "
                    "and program scores of the decoded expression.",
                    (True, False): "granule/nucleus features measured on the decoded images.",
                    (False, True): "program scores of the decoded expression.",
                }[(img_ok, expr_ok)]
                + " Grey: the feature is the same at every step (n/a in the table). The "
                "decoder is deterministic, so any steady change, however small, reads +-1: "
                "how large it is shows in the dim's figure above.",
            )
        )

    steps("maturation path")
    # ---- path from the earliest to the latest class
    mat = obs_col(lat, a.maturation_key)
    order = path_classes
    have = {str(x) for x in labels}
    missing = [] if order is None else [c for c in order if c not in have]
    if missing:  # a class the data lack drops a step of the path: say which, and what is there
        from vae.inputs.schema import label_typos

        present = sorted(x for x in have if x)
        # near misses (>= 0.9) were refused at the start (path_order): these hints are the
        # looser ones, among the labels not on the path already
        hints = label_typos(missing, [x for x in present if x not in order], cutoff=0.5)
        # the default list names every stage of granulopoiesis, and data without one of
        # them is normal: only a list the user gave, or a near miss, is worth a warning
        if list(a.path_classes) == list(MATURATION_ORDER) and not hints:
            missing = []
    if missing:
        log.warning(
            "analysis.path_classes: %s not among the labels (%s); the path leaves %s out. "
            "Labels present: %s",
            ", ".join(missing),
            "; ".join(f"{c}: did you mean {h}?" for c, h in hints.items()) or "no close label",
            "it" if len(missing) == 1 else "them",
            ", ".join(present[:20]),
        )
        summary["path_classes_missing"] = missing
    if order is not None and sum(c in have for c in order) < 2:
        log.warning(
            "analysis.path_classes: fewer than 2 present in labels; ordering by %s",
            a.maturation_key,
        )
        order = None
    path_ok = True
    try:
        cents = T.class_centroids(Z, labels, mat.astype(float) if mat is not None else None, order)
    except ValueError as e:
        log.warning("no path traversal: %s", e)
        path_ok = False
    path_info: dict[str, Any] = {}
    path_decoded: dict[str, Any] = {}
    path_drawn: dict[str, np.ndarray] = {}  # each step in its nearest cell's pose (posed paths)
    path_support: dict[str, Any] = {}  # traverse.ImageSupport of each path's steps
    path_near: dict[str, Any] = {}  # traverse.NeighbourLabels of each path's steps
    # the split's cells with a crop; their single-view codes are encoded once, on first
    # use (the posed path steps and the per-cell truth decodes below both need them)
    image_rows = rows[rd.data.has_image.numpy()[rows]] if rd.data is not None else rows[:0]
    one_view: dict[str, np.ndarray] = {}

    def single_view_codes(sel: np.ndarray) -> np.ndarray:
        if not one_view:
            one_view["z"] = cell_codes(rd, image_rows, a.batch_size)
        return one_view["z"][np.searchsorted(image_rows, sel)]

    if path_ok:
        paths = {
            "straight": T.straight_path(cents.points[0], cents.points[-1], a.path_steps),
            "gp": T.gp_path(cents.points, a.path_steps, a.gp_length_scale, a.gp_noise, seed),
        }
        summary["path_classes"] = cents.names
        # a step is a pose-free mean code, decoded in an average pose (lobes merge into a
        # ring): draw and measure it also in the poses of the held-out cells nearest to it
        pose_ref = _pose_reference(rd, image_rows, a) if img_ok else None
        if pose_ref is not None:
            summary["path_pose_cells"] = int(min(a.path_pose_cells, len(pose_ref)))
        for kind, pth in paths.items():
            dec = T.decode(rd.model, pth.points, a.batch_size, rd.device, image_batch=draw)
            path_decoded[kind] = dec
            support = T.image_support(
                pth.points, z_img, a.image_support_k, a.image_support_quantile
            )
            path_support[kind] = support
            # which crops each step's picture is learned from (a class without crops,
            # e.g. real progenitors, is drawn as its nearest crops' class)
            near = T.neighbour_labels(pth.points, z_img, lab_img, a.image_support_k)
            path_near[kind] = near
            notes = (
                [
                    f"{short_label(x, 13) or '-'}\n{_votes(sh, a.image_support_k)}"
                    for x, sh in zip(near.label, near.share)
                ]
                if img_ok
                else None
            )
            abbrev = abbreviation_note(near.label, 13) if img_ok else ""
            # classes of the path that no training crop carries: their steps are drawn
            # from other classes' crops (real data: no imaged progenitor)
            no_crops = [c for c in cents.names if img_ok and not (lab_img == c).any()]
            posed = posed_dec = None
            if pose_ref is not None:
                posed = T.posed_codes(
                    pth.points, Z[pose_ref], single_view_codes(pose_ref), a.path_pose_cells
                )
                posed_dec = T.decode(
                    rd.model, posed.codes.reshape(-1, d), a.batch_size, rd.device, image_batch=draw
                )
            ok_img = support.supported
            drawn = dec.cells() if img_ok else None  # the top row, before fading
            cells = T.fade_unsupported(drawn, ok_img) if img_ok else None
            rows_img: Any = cells
            row_names = None
            if posed_dec is not None:
                k = posed.codes.shape[1]
                first = posed_dec.cells()[::k]  # each step in its nearest cell's pose
                path_drawn[kind] = first
                rows_img = [cells, T.fade_unsupported(first, ok_img)]
                row_names = ["mean pose", "nearest cell's pose"]
            # the real cells at each step: the crops whose codes lie nearest it, shown
            # under the drawn cells and measured like them (a decoder blurs what they show)
            crops_near = (
                _nearest_crops(rd, pth.points, Z, a.image_support_k, params) if img_ok else None
            )
            if crops_near is not None:
                rows_img = [*(rows_img if isinstance(rows_img, list) else [rows_img])]
                rows_img.append(crops_near.first)
                row_names = [*(row_names or ["decoded"]), "nearest real crop"]
                # under the crop row: the vote that the drawing follows, then the label of
                # the crop shown (often none: an unlabelled cell)
                own = [
                    str(x) if str(x) not in UNKNOWN_LABELS else "" for x in labels[crops_near.rows]
                ]
                # the vote as a count ("2/5"), not a share a reader takes for a probability
                notes = [
                    f"{short_label(x) or '-'} {_votes(sh, a.image_support_k)}"
                    f"\ncrop: {short_label(o) or 'unlabelled'}"
                    for x, sh, o in zip(near.label, near.share, own)
                ]
                abbrev = abbreviation_note([*near.label, *own])
            # a reader audit saw 24 near-identical drawings read as a maturation path: say
            # so when the drawn cells vary far less along it than the crops near its steps
            flat_note = ""
            if img_ok and crops_near is not None:
                v_drawn = _step_variation(drawn)
                v_crops = _step_variation(crops_near.first)
                if v_crops > 0 and v_drawn < FLAT_PATH_SHARE * v_crops:
                    flat_note = (
                        f" The drawn cells (top row) change little along this path: their "
                        f"pixels vary {v_drawn:.3f} across the steps against {v_crops:.3f} "
                        f"for the nearest real crops of the bottom row (mean per-pixel s.d., "
                        f"intensity 0-1): the decoder draws nearly one cell along it; the "
                        f"bottom row shows what the crops near each step look like."
                    )
            fig = F.strip_with_heatmap(
                rows_img,
                dec.expression[:, gidx] if expr_ok else None,
                gnames,
                _starred([f"{s:.2f}" for s in pth.s], ok_img, img_ok),
                f"{PATH_TITLES[kind]} {cents.names[0]} -> {cents.names[-1]}",
                row_labels=row_names,
                step_notes=notes,
                x_title=f"position along the path ({cents.names[0]} = 0, {cents.names[-1]} = 1)",
            )
            p = out_files.figure(fig, f"path_{kind}", f"traverse/path_{kind}")
            how = (
                "a straight line between the two end centroids"
                if kind == "straight"
                else "a Gaussian-process path through the class centroids "
                + " -> ".join(cents.names)
            )
            # only the programs with genes in the model: the heatmap has no others
            shown_programs = [k for k, gl in programs.items() if T.match_genes(genes, gl)]
            prog_names = (
                "genes of the programs " + ", ".join(shown_programs)
                if shown_programs
                else "marker genes"
            )
            what = {
                (
                    True,
                    True,
                ): f"Decoded cells and marker-gene expression ({prog_names})",
                (True, False): "Decoded cells",
                (
                    False,
                    True,
                ): f"Decoded marker-gene expression ({prog_names})",
            }[(img_ok, expr_ok)]
            posed_note = (
                " Top row: the step's code, drawn in the average pose of the symmetry-"
                "averaged latent; second row: the same code in the pose of the held-out "
                "cell nearest to it (nucleus shape and lobes need a pose; features below "
                f"are the median over the {posed.codes.shape[1]} nearest cells' poses)."
                if posed is not None
                else ""
            )
            drawn_note = (
                " Cells are drawn, not pixel means: the nucleus through its sharpened mask,"
                " cut into the lobe count the lobe layer reads from the code, and granules"
                " from the granule layer's rate map (docs/vae.md)."
                if img_ok and getattr(rd.model.args, "lobe_head", False)
                else ""
            )
            near_note = (
                f" Under each step: the commonest label among the "
                f"{a.image_support_k} labelled training crops nearest its code, and how "
                f"many of the {a.image_support_k} carry it; the drawn cell is learned from crops like these, so a class that "
                "has no crops is drawn as its neighbours' class"
                + (
                    "; then ('crop:') the label of the crop in the bottom row."
                    if crops_near is not None
                    else "."
                )
                + (f" ({abbrev}.)" if abbrev else "")
                if img_ok
                else ""
            )
            if no_crops:
                near_note += (
                    f" No training crop is labelled {', '.join(no_crops)}: the cells drawn "
                    "where the path runs through those classes are the decoder's "
                    "extrapolation from crops of other classes, not pictures of such cells, "
                    "and need not look like the crop in the bottom row (their place on the "
                    "path comes from their expression profiles alone)."
                )
            crops_note = (
                f" Bottom row: a different real cell at each step, the crop whose code lies "
                f"nearest the step among those no nearer step shows (any split; "
                f"path_features_{kind}.csv: nearest_crop_cell; nearest_crops_* = the median "
                f"feature of the {crops_near.k} nearest, measured as the drawn cells are)."
                if crops_near is not None
                else ""
            )
            near_source = None
            if crops_near is not None and "image_source" in lat.obs:
                near_source = lat.obs["image_source"].astype(str).to_numpy()[crops_near.rows]
                crops_note += _source_note(pth.s, near_source)
            n_out = int((~ok_img).sum())
            support_note = (
                f" Faded, position marked *: {n_out} of {len(ok_img)} steps lie farther from "
                "every training cell with a crop than "
                f"{100 * a.image_support_quantile:g} % of those cells lie from their own "
                f"{a.image_support_k} nearest neighbours: no crop was seen there, so the "
                "decoded cell is the image decoder's extrapolation, not a learned picture "
                "(this judges the image only; the decoded expression is not flagged)."
                if img_ok and n_out
                else ""
            )
            figs["path"].append(
                FigureItem(
                    p,
                    f"{what} along {how} (position 0..1).{flat_note}{posed_note}{drawn_note}"
                    f"{near_note}{crops_note}{support_note}",
                )
            )
            if expr_ok:
                rank = T.rank_genes(dec.expression, genes, pth.s, annot)
                out_files.csv(rank, f"gene_ranking_{kind}")
                tables[f"gene_ranking_{kind}"] = rank
            if posed_dec is not None:
                # features of a step: the median over its k poses (a lobe count needs a pose)
                k = posed.codes.shape[1]
                fk = measure(posed_dec.images, posed_dec.masks, params, bg)
                feats = fk.groupby(np.arange(len(fk)) // k).median().reset_index(drop=True)
            elif img_ok:
                feats = measure(dec.images, dec.masks, params, bg)
            else:
                feats = pd.DataFrame(index=range(len(pth.s)))
            feats.insert(0, "s", pth.s)
            if img_ok:
                feats.insert(1, "image_support_distance", support.distance)
                feats.insert(2, "image_supported", support.supported)
                feats.insert(3, "image_neighbour_label", near.label)
                feats.insert(4, "image_neighbour_share", near.share)
            if dec.diameter is not None:  # the size head's, px of the working frame
                feats["cell_diameter"] = dec.diameter
            if crops_near is not None:
                # which cell the bottom row shows, to look it up in latent.h5ad
                feats["nearest_crop_cell"] = np.asarray(lat.obs_names)[crops_near.rows]
                feats["nearest_crop_label"] = labels[crops_near.rows]
                if near_source is not None:
                    feats["nearest_crop_source"] = near_source
                for c in NEAREST_CROP_FEATURES:
                    feats[f"nearest_crops_{c}"] = crops_near.features[c].to_numpy(float)
            for p_, v in (
                T.program_scores(dec.expression, genes, programs) if expr_ok else {}
            ).items():
                feats[f"program:{p_}"] = v
            out_files.csv(feats, f"path_features_{kind}")
            tables[f"path_features_{kind}"] = feats
            # every numeric column but the position itself (labels, cell ids and the
            # boolean support flag are not features)
            corr = {
                c: M.correlation_matrix(pth.s, feats[c].to_numpy(float))[0, 0]
                for c in feats.select_dtypes("number").columns
                if c != "s"
            }
            path_info[kind] = {
                "classes_without_crops": no_crops,
                "position_vs_feature_spearman": corr,
                "image_supported_steps": int(support.supported.sum()) if img_ok else None,
                "image_support_threshold": support.threshold if img_ok else None,
                "image_neighbour_labels": [str(x) for x in near.label] if img_ok else None,
                "image_neighbour_shares": [round(float(x), 3) for x in near.share]
                if img_ok
                else None,
                "top_genes": rank["gene"].head(a.top_genes).tolist() if expr_ok else [],
            }
            if posed_dec is not None:
                # the drawn cell of each step, read back by the image encoder: which kind
                # of cell the drawing itself shows (image_neighbour_labels: the code's)
                path_info[kind].update(
                    _path_readback(rd, a, posed, posed_dec, pose_ref, labels, cents.names) or {}
                )
            # one panel per measure in its own units (decoded beside the nearest real
            # crops' median where both exist), so a 5 % change does not read as a rise
            progs = [k for k in feats if k.startswith("program:")]
            panels = [
                (ylabel, {name: feats[c].to_numpy(float) for c, name in lines if c in feats})
                for ylabel, lines in (
                    (
                        "granule density (per 100 px²)",
                        [("granule_density", "decoded")],
                    ),
                    (
                        "lobes",
                        [("lobes", "decoded"), ("nearest_crops_lobes", "nearest crops")],
                    ),
                    (
                        "nucleus share of the cell",
                        [
                            ("nucleus_fraction", "decoded"),
                            ("nearest_crops_nucleus_fraction", "nearest crops"),
                        ],
                    ),
                    ("cell diameter (px)", [("cell_diameter", "decoded")]),
                    (
                        "program score (mean log1p expression)",
                        [(k, k.removeprefix("program:")) for k in progs],
                    ),
                )
            ]
            if not any(lines for _, lines in panels):
                continue  # no image features and no program gene: no figure
            fig = F.panel_lines(
                pth.s,
                panels,
                "path position",
                f"features along the {kind} path",
                shade=None if not img_ok else ~np.asarray(support.supported, bool),
            )
            p = out_files.figure(fig, f"path_features_{kind}", f"traverse/path_features_{kind}")
            figs["path"].append(
                FigureItem(
                    p,
                    {
                        (True, True): "Granule density, lobes and nucleus share measured on "
                        "the decoded images, and decoded program scores",
                        (True, False): "Granule density, lobes and nucleus share measured on "
                        "the decoded images",
                        (False, True): "Decoded program scores",
                    }[(img_ok, expr_ok)]
                    + (
                        "; nearest_crops_*: the median of the real crops nearest each step "
                        "(measured on crops, not on decoded cells)"
                        if any(c.startswith("nearest_crops_") for c in feats)
                        else ""
                    )
                    + f", along the {kind} path (each in its own units)"
                    + (
                        f"; grey: the {int((~support.supported).sum())} steps decoded far "
                        "from every training crop (extrapolation, drawn faded in the path "
                        "figure)"
                        if img_ok and not support.supported.all()
                        else ""
                    )
                    + ".",
                )
            )
        summary["path"] = path_info

    steps("granule features")
    # ---- real crops: granule features vs latent dims
    real = None
    crop_lines: list[str] = []  # what the held-out crops can show (key findings)
    blind: dict[str, list] = {}  # measured feature -> sources where it reads one value
    if rd.data is not None:
        rng = np.random.default_rng(int(seed))
        cand = rows[rd.data.has_image.numpy()[rows]]
        if cand.size > a.max_cells_measured:
            cand = np.sort(rng.choice(cand, a.max_cells_measured, replace=False))
        if cand.size:
            crops = rd.data.crops[cand].permute(0, 2, 3, 1).numpy()
            masks = rd.data.masks[cand, 0].numpy().astype(bool)
            real = G.measure_batch(crops, masks, params)
            real.insert(0, "cell", np.asarray(lat.obs_names)[cand])
            # each crop's class and source beside its features (a reader of the CSV should
            # not have to join it back to latent.h5ad), and the class medians below
            real.insert(1, "label", [display_label(x) for x in labels[cand]])
            src = obs_col(lat, "image_source")
            if src is not None:
                src = np.asarray(src, dtype=object)[cand]
                real.insert(
                    2, "image_source", np.where(known_labels(src), src.astype(str), UNKNOWN_NAME)
                )
            spec = obs_col(lat, "specimen")
            if spec is not None:  # one cell entering through two sources: findings count it once
                spec = np.asarray(spec, dtype=object)[cand]
                real.insert(
                    real.columns.get_loc("label") + 1 + ("image_source" in real),
                    "specimen",
                    np.where(known_labels(spec), spec.astype(str), ""),
                )
            tables["real_morphology_by_class"] = morphology_by_class(real)
            zc = Z[cand]
            # granule program scores of the expression decoded from each cell's reported
            # code (the one correlated with the latent dims below; expression has no pose)
            if expr_ok:
                dec_c = T.decode(rd.model, zc, a.batch_size, rd.device)
                for p_, v in T.program_scores(dec_c.expression, genes, programs).items():
                    real[f"program:{p_}"] = v
            fcols = [f for f in G.FEATURES if f in real] + [
                c for c in real if c.startswith("program:")
            ]
            cm = M.correlation_matrix(real[fcols].to_numpy(float), zc)  # (F, d)
            corr_df = pd.DataFrame(cm, columns=[f"z{i}" for i in range(d)])
            corr_df.insert(0, "feature", fcols)
            if path_ok:
                pos = T.project_onto_path(zc, paths["gp"])
                real["gp_path_position"] = pos
                for col, v in path_position_correlations(real, fcols, pos).items():
                    corr_df[col] = v
            tables["real_feature_correlation"] = corr_df
            crop_lines = crop_findings(
                real,
                labels[rd.data.has_image.numpy()],
                CROP_FINDING_FEATURES,
                _paired_by(lat),
                seed=int(seed),
            )
            blind = {f: blind_sources(real, f) for f in ("granule_density", "cytoplasm_grain")}
            # a sweep is local (one anchor cell); say where it runs against the crops
            for row in dim_rows:
                item = dim_items.get(int(row["dim"]))
                if item is not None:
                    item.caption += _sweep_vs_crops_note(row, corr_df, int(row["dim"]))
            out_files.csv(real, "real_crop_features")
            # one row per latent dim (d + 1 rows, a dozen features across): the page is
            # taller than wide, and a row per feature made a strip too wide to read
            fig = F.heatmap(
                corr_df.drop(columns="feature").to_numpy(float).T,
                list(corr_df.columns[1:]),
                fcols,
                f"Spearman: features of {len(cand)} real {a.split} crops vs latent dims",
            )
            p = out_files.figure(fig, "real_feature_heatmap", "traverse/real_feature_heatmap")
            figs["granules"].append(
                FigureItem(
                    p,
                    f"Spearman correlation of granule/nucleus features measured on {len(cand)} real {a.split} crops, and of program scores of the expression decoded from their codes, with each latent dim and with their position on the GP path (last row, where two or more image sources hold 10 crops: the same within each source, pooled by crops, as sources differ in stain and sharpness more than classes do).",
                )
            )

    steps("truth recovery")
    # ---- simulator truth recovery
    truth: dict[str, Any] = {}
    truth_n: dict[str, int] = {}  # the cells each measure rests on (they differ)
    truth_notes: list[str] = []  # sentences for figures left out
    truth_caveats: dict[str, str] = {}  # truth key -> what the key finding must say with it
    t_true = obs_col(lat, "t")
    if path_ok and t_true is not None:
        t_true = t_true.astype(float)
        ok = rows[np.isfinite(t_true[rows])]
        if ok.size >= 3:
            for kind, pth in paths.items():
                pos = T.project_onto_path(Z[ok], pth)
                truth[f"{kind}_path_position_vs_true_t_spearman"] = M.correlation_matrix(
                    pos, t_true[ok]
                )[0, 0]
                truth_n[f"{kind}_path_position_vs_true_t_spearman"] = int(ok.size)
            if mat_dim is not None:
                truth["maturation_axis_vs_true_t_spearman"] = M.correlation_matrix(
                    Z[ok, mat_dim], t_true[ok]
                )[0, 0]
                truth_n["maturation_axis_vs_true_t_spearman"] = int(ok.size)
            pos = T.project_onto_path(Z[ok], paths["gp"])
            fig = F.truth_scatter(
                t_true[ok],
                pos,
                "true maturation t",
                "GP path position",
                f"rho={truth['gp_path_position_vs_true_t_spearman']:.2f}",
            )
            p = out_files.figure(fig, "truth_t_vs_path", "traverse/truth_t_vs_path")
            figs["truth"].append(
                FigureItem(
                    p,
                    f"Held-out neutrophil-lineage cells ({ok.size}): position of their code projected on the GP path vs the simulator's true maturation t.",
                )
            )
    dens = obs_col(lat, "granule_density")
    if dens is not None and rd.data is not None:
        dens = dens.astype(float)
        ok = rows[np.isfinite(dens[rows]) & rd.data.has_image.numpy()[rows]]
        if ok.size >= 3:
            # each cell decoded to be compared with its truth and its crop: from the
            # single-view code of its crop, not the pose-free reported latent Z (whose
            # decoded cell has an orientation-averaged nucleus: run.cell_codes)
            # ... in its crop's own image source (a model with vae.image_batch_key)
            src = None if rd.data.image_batch is None else rd.data.image_batch.numpy()[ok]
            dec = T.decode(
                rd.model, single_view_codes(ok), a.batch_size, rd.device, image_batch=src
            )
            fd = measure(dec.images, dec.masks, params, bg)
            truth["decoded_granule_density_vs_true_spearman"] = M.correlation_matrix(
                fd["granule_density"].to_numpy(float), dens[ok]
            )[0, 0]
            crops = rd.data.crops[ok].permute(0, 2, 3, 1).numpy()
            fr = G.measure_batch(crops, rd.data.masks[ok, 0].numpy().astype(bool), params)
            truth["real_crop_granule_density_vs_true_spearman"] = M.correlation_matrix(
                fr["granule_density"].to_numpy(float), dens[ok]
            )[0, 0]
            for nm in ("decoded", "real_crop"):
                truth_n[f"{nm}_granule_density_vs_true_spearman"] = int(ok.size)
            azu = _azurophilic_truth(lat, ok, azurophilic_density)
            if azu is not None:
                # the blob counter sees the large azurophilic granules; the fine specific
                # ones (part of the simulator's total density) are below 64 px resolution
                for nm, fx in (("decoded", fd), ("real_crop", fr)):
                    truth[f"{nm}_granule_density_vs_true_azurophilic_spearman"] = (
                        M.correlation_matrix(fx["granule_density"].to_numpy(float), azu)[0, 0]
                    )
                    truth_n[f"{nm}_granule_density_vs_true_azurophilic_spearman"] = int(
                        np.isfinite(azu).sum()
                    )
            lob = obs_col(lat, "lobes")
            if lob is not None:
                lob = lob.astype(float)[ok]
                truth["decoded_lobes_vs_true_spearman"] = M.correlation_matrix(
                    fd["lobes"].to_numpy(float), lob
                )[0, 0]
                truth["real_crop_lobes_vs_true_spearman"] = M.correlation_matrix(
                    fr["lobes"].to_numpy(float), lob
                )[0, 0]
                for nm in ("decoded", "real_crop"):
                    truth_n[f"{nm}_lobes_vs_true_spearman"] = int(np.isfinite(lob).sum())
            fdv = fd["granule_density"].to_numpy(float)
            # drawn against the granules the counter can see: the large azurophilic ones
            # (the total adds the fine specific granules, which rise while the azurophilic
            # fall, so its correlation is near 0 even when the decoder follows the truth)
            fin = np.isfinite(azu) if azu is not None else np.zeros(ok.size, bool)
            if fin.sum() >= 3:
                key, xs, ys = "decoded_granule_density_vs_true_azurophilic_spearman", azu, fdv
                xs, ys = xs[fin], ys[fin]
                xlab = "true azurophilic granule density (0-1, relative to its peak)"
                what = (
                    f"the simulator's true density of large azurophilic granules ({fin.sum()} "
                    f"neutrophil-lineage cells; the counter cannot resolve the fine specific "
                    f"granules, whose density rises while the azurophilic fall: vs the total "
                    f"density rho = {fmt_number(truth['decoded_granule_density_vs_true_spearman'])})"
                )
            else:
                key, xs, ys = "decoded_granule_density_vs_true_spearman", dens[ok], fdv
                xlab, what = "true granule density", "the simulator's true granule density"
            rho = truth[key]
            zeros = float(np.mean(ys == 0)) if ys.size else 0.0
            if np.isfinite(rho) and np.ptp(ys) > 0 and zeros >= 0.5:
                n0 = int(np.sum(ys == 0))
                truth_caveats[key] = (
                    f"no granule counted on {n0} of the {ys.size} decoded "
                    "cells: the rank rests on that many ties"
                )
                truth_notes.append(
                    f"The granule counter found no granule on {n0} of the "
                    f"{ys.size} decoded cells of the granule comparison: its Spearman "
                    f"({fmt_number(rho)}) rests on that many ties and says little."
                )
            if np.isfinite(rho) and np.ptp(ys) > 0:
                fig = F.truth_scatter(
                    xs, ys, xlab, "granules / 100 px^2 (decoded)", f"rho={rho:.2f}"
                )
                p = out_files.figure(
                    fig, "truth_granules_decoded", "traverse/truth_granules_decoded"
                )
                figs["truth"].append(
                    FigureItem(
                        p,
                        f"Granule density counted on held-out cells, each decoded from the single-view code of its crop, vs {what}.",
                    )
                )
            else:  # an all-equal scatter says nothing: say why instead of drawing it
                truth_notes.append(
                    f"No scatter of decoded granule density: the granule counter found "
                    f"{fmt_number(float(fdv[0]) if fdv.size else 0.0)} granules / 100 px^2 on "
                    f"every one of the {ok.size} decoded images (the decoder does not draw "
                    "granules it can resolve), so there is no correlation to show."
                )
            truth["n_cells"] = int(ok.size)
    if truth:
        summary["truth_recovery"] = truth
        tables["truth_recovery"] = pd.DataFrame(
            [
                {
                    "measure": k,
                    "value": v,
                    "n": truth_n.get(k),
                    "meaning": _TRUTH_MEANING.get(k, ""),
                }
                for k, v in truth.items()
                if k != "n_cells"
            ]
        )
        out_files.csv(tables["truth_recovery"], "truth_recovery")

    for name in ("dim_feature_correlation", "real_feature_correlation", "real_morphology_by_class"):
        if name in tables:
            out_files.csv(tables[name], name)
    summary["seconds"] = round(time.time() - t0, 2)
    if tb is not None:
        tb_scalars(tb, "traverse/truth", truth)

    # ---- what the data behind this study cannot show, said once on both pages
    limits = _data_limits(
        lat, path_info.get("gp", {}).get("classes_without_crops") or [], rd.data_notes
    )
    summary["data_limits"] = limits
    # ---- interactive page next to the report
    study_page = None
    if path_ok:
        study_page = _write_study_page(
            rd,
            a,
            report.with_name("study.html"),
            paths["gp"],
            path_decoded["gp"],
            path_drawn.get("gp"),
            path_support["gp"].supported if img_ok else None,
            path_near["gp"] if img_ok else None,
            cents.names,
            labels,
            Z,
            programs,
            gidx,
            title,
            subtitle,
            seed,
            limits,
        )
        summary["study_page"] = study_page.name

    steps("report")
    # ---- report
    key = _key_findings(
        tables,
        truth,
        cents.names if path_ok else [],
        a.top_genes,
        truth_caveats,
        crop_lines=crop_lines,
        blind=blind,
        n_crops=None if real is None else len(real),
    )
    summary["key_findings"] = key
    sections = [Section("What these data cannot show", text="\n\n".join(limits))] if limits else []
    sections += [Section("Key findings", text="\n\n".join(key))] if key else []
    sections += _eval_sections(evaluation, evaluation_stale, _paired_by(lat))
    text = f"Top {len(trs)} latent dimensions by KL swept around the {anchor_desc}. " + (
        "Features are measured with scikit-image on the decoded crops (vae/analysis/granules.py)."
        if img_ok
        else ""
    )
    if skipped:
        sections.insert(0, Section("Modalities", text=skipped))
    sections.append(Section("Per-dimension traversals", text=text, figures=figs["dims"]))
    if path_ok:
        ranks = []
        if expr_ok:
            ranks = [
                TableItem(
                    "Genes ranked along the GP path",
                    tables["gene_ranking_gp"].head(a.top_genes),
                    "start / end / range: log1p of the decoded mean expression (normalised "
                    "counts) at the path's first and last step, and its max - min along it; "
                    "log2fc: log2 of (end + 1) / (start + 1) on the normalised scale; "
                    "spearman: monotonic trend with path position; peak_s: the position "
                    "(0-1) where the gene is highest; score = |spearman| x |log2fc|. Full "
                    "table: gene_ranking_gp.csv",
                ),
                TableItem(
                    "Genes ranked along the straight path",
                    tables["gene_ranking_straight"].head(a.top_genes),
                    "Columns as above. Full table: gene_ranking_straight.csv",
                ),
            ]
        sections.append(
            Section(
                "Path from the earliest to the latest class",
                text=f"Classes in maturation order: {' -> '.join(cents.names)} "
                f"(rows per class, and how many have a crop: "
                f"{_class_makeup(cents.names, cents.counts, labels, lat.obs)})."
                + (
                    f" analysis.path_classes also named {', '.join(missing)}, which no cell "
                    f"is labelled: left out of the path (a typo?)."
                    if missing
                    else ""
                ),
                tables=ranks,
                figures=figs["path"],
            )
        )
    gt = []
    if "dim_feature_correlation" in tables:
        gt.append(
            TableItem(
                "Traversal offset vs decoded features (Spearman)",
                tables["dim_feature_correlation"],
                missing=_CONSTANT,
            )
        )
    if "real_feature_correlation" in tables:
        gt.append(
            TableItem(
                "Real crop features vs latent dims (Spearman)",
                tables["real_feature_correlation"],
                missing="the feature is constant here (e.g. no granules found on any crop), "
                "so no correlation is defined; in gp_path_position_within_source also where "
                "fewer than two image sources hold 10 crops with the feature",
            )
        )
    if "real_morphology_by_class" in tables:
        gt.append(
            TableItem(
                "What the instruments read on the real crops, by class (median)",
                tables["real_morphology_by_class"],
                "The same crops, their features' medians per class: a check of the "
                "instruments before reading the correlations above (segmented neutrophils "
                "should read more lobes than lymphocytes, eosinophils and basophils a "
                "grainier cytoplasm). Compare classes within one image source, where stains and "
                "sharpness agree (real_crop_features.csv has every crop with its source). "
                "Units: cytoplasm_hue in degrees on a circle cut open at yellow-green (90 to "
                "450: blue ~220, purple ~280, red 360, orange ~390); nucleus_fraction and "
                "saturation 0-1; cytoplasm_grain the stain's fine-detail RMS (optical "
                "density); granule_density granules per 100 px^2; cell_area px at the crop "
                "size.",
                missing="the feature is undefined on every crop of this class and source "
                "(e.g. a cytoplasm under 10 px for the grain)",
            )
        )
    sections.append(
        Section(
            "Granule formation in the latent space",
            text=(
                "Which latent directions carry granule formation: correlations of granule count/density, "
                "GLCM contrast, the cytoplasm's grain, cytoplasm hue, lobe count and nucleus share with "
                "each latent dim and with the path position. On real smears read the grain (and GLCM "
                "contrast) for granularity: the counter ranks eosinophils and basophils no higher "
                'than other cells there (docs/vae.md "Granularity on real crops"). The granule '
                "counter counts dark dots of granule size inside the cell: "
                "on 64 px crops of blood cells it reads granule-like texture (chromatin and stain "
                'grain count too, docs/vae.md "Measuring instruments"), and blood cells have '
                "finished forming their granules in the marrow."
            ),
            tables=gt,
            figures=figs["granules"],
        )
    )
    if truth:
        sections.append(
            Section(
                "Recovery of the simulator's ground truth",
                text="Spearman correlations on the held-out cells with known truth (n: the "
                "cells each rests on; the path and the maturation axis read every cell's "
                "code, the image measures only the cells with a crop)."
                + "".join(f" {x}" for x in truth_notes),
                tables=[
                    TableItem(
                        "Truth recovery (Spearman)",
                        tables["truth_recovery"],
                        missing=_CONSTANT,
                    )
                ],
                figures=figs["truth"],
            )
        )
    if crop_rejects is not None:
        sections.append(_rejects_section(crop_rejects))
    write_report(report, title, sections, resolved_config, subtitle=subtitle)
    steps.close()
    log.info(
        "traverse: %d dims, path %s, %.1fs; report %s",
        len(trs),
        "yes" if path_ok else "no",
        time.time() - t0,
        report,
    )
    return clean_json(summary)


def _paired_by(lat) -> str | None:
    """``by_label`` / ``by_maturation`` when some rows of latent.h5ad met their profile
    that way (``obs["pair_mode"]``; by label first), else None."""
    modes = set(lat.obs["pair_mode"].astype(str)) if "pair_mode" in lat.obs else set()
    return next((m for m in ("by_label", "by_maturation") if m in modes), None)


# the simulator's truth columns (stage=simulate writes them with every cell)
SIMULATOR_TRUTH = frozenset({"t", "kind", "azurophilic_density"})


def _data_limits(lat, classes_without_crops: list[str], notes: list[str] = ()) -> list[str]:
    """Sentences on what the study's data cannot show (empty for data without such gaps).

    ``lat`` : latent.h5ad (its ``pair_mode`` column says how images met expression);
    ``classes_without_crops`` : path classes no training crop carries; ``notes`` : the
    expression data set's own (``expression.notes``), appended as they are.
    """
    out = []
    if SIMULATOR_TRUTH <= set(lat.obs.columns):
        # a reader audit found nothing on the demo's page saying the data are simulated
        out.append(
            "These data are simulated (the built-in simulator, stage=simulate): its smears, "
            "profiles and the way granules, nucleus and gene programs change with "
            "maturation are the simulator's rules (docs/simulator.md), so this report "
            "checks that the model recovers them (truth recovery below), not biology."
        )
    by = _paired_by(lat)
    ranked = by == "by_label" and _ranked_within_label(lat.obs)
    if ranked:
        out.append(
            "Images and expression profiles were paired by label and, within each label, "
            "by rank (pair.within_label=maturation): crops ordered by how far their "
            "nucleus has segmented met the profiles at the same rank of pseudotime, not "
            "measured on the same cells. What ties a picture to a gene program here is "
            "the class and that assumed order: the morphology that changes along a path "
            "within a class is the order the pairing put in, which the model cannot "
            "confirm."
        )
    elif by:
        out.append(
            "Images and expression profiles were paired by "
            + ("label" if by == "by_label" else "maturation")
            + ", not measured on the same cells: a crop's expression side is a profile of "
            "its class, so what ties a picture to a gene program here is the class, not "
            "the cell."
        )
    if classes_without_crops:
        out.append(
            f"No crop in the training data is labelled {', '.join(classes_without_crops)}: "
            "where the maturation path runs through those classes, the drawn cells are the "
            "image decoder's extrapolation from the nearest crops of other classes (the "
            "labels under each step say which), not images of such cells. Positions between "
            "the path's classes are interpolations between their centroids, not observed "
            "intermediate stages."
        )
    twice = _specimens_in_two_sources(lat.obs)
    if twice:
        n, names = twice
        out.append(
            f"{n} specimens (source images) enter through more than one image source "
            f"({', '.join(names)}): the same physical cell is then a row of each, counted "
            "twice in the tables and figures of held-out cells (the specimen split keeps "
            "both copies on the same side of train / test); stage=evaluate's "
            "knn_accuracy_per_cell (latent_structure.csv) counts each such cell once."
        )
    out += [str(n) for n in notes]
    return out


def _ranked_within_label(obs: pd.DataFrame) -> bool:
    """Whether rows met their profile by rank within their label (``pair.within_label=
    maturation`` wrote each crop's ``nucleus_segmentation``)."""
    if NUCLEUS_SEGMENTATION not in obs or "pair_mode" not in obs:
        return False
    paired = obs["pair_mode"].astype(str).to_numpy() == "by_label"
    return bool(np.isfinite(obs[NUCLEUS_SEGMENTATION].to_numpy(float)[paired]).any())


def _specimens_in_two_sources(obs: pd.DataFrame) -> tuple[int, list[str]] | None:
    """(number of specimens with crops from >= 2 image sources, those sources), or None.

    A specimen is one source image (``obs['specimen']``); the real preset's BCCD smears
    and the curated ``bccd_cropped`` crops cut from them share specimens, so one cell
    enters twice."""
    if not {"specimen", "image_source", HAS_IMAGE} <= set(obs.columns):
        return None
    o = obs.loc[_flag(obs, HAS_IMAGE), ["specimen", "image_source"]].astype(str)
    o = o[(o.specimen != "") & (o.image_source != "")]
    per = o.groupby("specimen").image_source.nunique()
    shared = per.index[per > 1]
    if not len(shared):
        return None
    names = sorted(o.image_source[o.specimen.isin(shared)].unique())
    return int(len(shared)), names


def trained_modalities(lat) -> tuple[bool, bool]:
    """(image, expression): whether any row of the run's table holds that modality.

    Read from the latent table's ``has_image`` / ``has_expression`` columns (copied
    from ``paired.h5ad``); a table without them counts as having both.
    """
    out = []
    for col in (HAS_IMAGE, HAS_EXPRESSION):
        out.append(bool(_flag(lat.obs, col).any()) if col in lat.obs else True)
    return out[0], out[1]


def _skipped_sentence(img_ok: bool, expr_ok: bool) -> str:
    """The report's sentence on a modality the model was never trained on ("" for none)."""
    if not img_ok:
        return (
            "No row of the training table has an image (e.g. pair=expression_only), so the "
            "image decoder was never trained: decoded images and the granule features "
            "measured on them are left out of this report."
        )
    if not expr_ok:
        return (
            "No row of the training table has expression (e.g. pair=image_only), so the "
            "expression decoder was never trained: decoded expression, gene rankings and "
            "program scores are left out of this report."
        )
    return ""


def _key_findings(
    tables: dict,
    truth: dict,
    path_classes: list[str],
    top: int,
    caveats: dict[str, str] | None = None,
    crop_lines: Sequence[str] = (),
    blind: dict[str, list] | None = None,
    n_crops: int | None = None,
) -> list[str]:
    """One-line findings for the top of the report (from the tables just computed).

    ``crop_lines`` (:func:`crop_findings`) come first: what the crops can show bounds
    every line after them. ``blind``: measured feature -> :func:`blind_sources`, said
    beside that feature's line. ``n_crops``: the held-out crops the correlations rest on,
    said in each line."""
    from vae.analysis.report import fmt_number

    out = list(crop_lines)
    if "real_feature_correlation" in tables:
        df = tables["real_feature_correlation"].set_index("feature")
        zcols = [c for c in df.columns if c.startswith("z")]
        # the grain beside the count: on real smears the counter finds few or no granules
        # at 64 px and ranks eosinophils under lymphocytes, where the grain ranks them
        # first (docs/vae.md, "Granularity on real crops")
        measured = ["granule_density", "cytoplasm_grain"]
        for feat in [*measured, *[f for f in df.index if f.startswith("program:")]]:
            if feat not in df.index:
                continue
            r = df.loc[feat, zcols].astype(float)
            if not np.isfinite(r).any():
                continue
            best = r.abs().sort_values(ascending=False).index[:3]
            dims = ", ".join(f"{c} (rho {r[c]:+.2f})" for c in best)
            extra = ""
            if "gp_path_position" in df.columns and np.isfinite(df.loc[feat, "gp_path_position"]):
                extra = f"; with GP path position rho {df.loc[feat, 'gp_path_position']:+.2f}"
                w = df.loc[feat].get("gp_path_position_within_source", np.nan)
                if np.isfinite(w):
                    extra += f" (within image sources {w:+.2f})"
                if feat.startswith("program:"):
                    # both from the crop's code: the model agreeing with itself
                    extra += " (both read from the model's code: the model agreeing with itself)"
            peak = _path_peak(
                tables.get("path_features_gp"),
                feat,
                df.loc[feat, "gp_path_position"] if "gp_path_position" in df.columns else None,
            )
            if peak:
                extra += peak
            gone = (blind or {}).get(feat) or []
            if gone:
                by_value: dict[str, list[str]] = {}
                for src, v, share in gone:
                    by_value.setdefault(fmt_number(v), []).append(f"{share:.0%} of the {src}")
                extra += (
                    "; it reads "
                    + "; ".join(f"{v} on {' and '.join(w)} crops" for v, w in by_value.items())
                    + " (nothing measured there: those crops enter as one value)"
                )
            # a program score here is decoded from the crop's own code (most real crops
            # have no measured profile); the granule density is measured on the crop
            crops = "held-out crops" if n_crops is None else f"{n_crops} held-out crops"
            what = (
                f"{feat} decoded from the codes of {crops}"
                if feat.startswith("program:")
                else f"{feat} measured on {crops}"
            )
            out.append(f"Latent dims most correlated with {what}: {dims}{extra}.")
    if "gene_ranking_gp" in tables and path_classes:
        g = tables["gene_ranking_gp"]
        up = g[g["log2fc"] > 0].head(min(top, 8))["gene"].tolist()
        down = g[g["log2fc"] < 0].head(min(top, 8))["gene"].tolist()
        out.append(
            f"Along the GP path {path_classes[0]} -> {path_classes[-1]}, genes rising most "
            f"(fold change x monotonic trend): {', '.join(up) or 'none'}; falling: "
            f"{', '.join(down) or 'none'}."
        )
    # the total granule density mixes the fine specific granules, which the counter cannot
    # see: where the azurophilic truth exists, both are said, the total with why it is low
    # (a reader audit found the total left out: it read as a chosen number)
    total_why = {}
    for nm in ("decoded", "real_crop"):
        if f"{nm}_granule_density_vs_true_azurophilic_spearman" in truth:
            total_why[f"{nm}_granule_density_vs_true_spearman"] = (
                "the total adds the fine specific granules, which the counter cannot "
                "resolve and which rise as the azurophilic fall"
            )
    for k, v in truth.items():
        if k == "n_cells":
            continue
        if v is not None and np.isfinite(v):
            why = (caveats or {}).get(k) or total_why.get(k)
            out.append(
                f"Truth recovery: {k.replace('_', ' ')} = {v:.3f}" + (f" ({why})." if why else ".")
            )
        else:
            out.append(
                f"Truth recovery: {k.replace('_', ' ')} undefined (the measured feature is "
                f"constant, e.g. no granules detected on the decoded images)."
            )
    return out


# drawn cells that vary along a path less than this share of the nearest real crops'
# variation are said to change little (demo GP path 0.88, straight 0.75; the real chain
# of 2026-12-05 0.30 / 0.31)
FLAT_PATH_SHARE = 0.5


def _step_variation(images) -> float:
    """Mean over pixels of the s.d. across a strip's (n, S, S, 3) images, intensities in
    0..1 (:func:`vae.analysis.granules.to_float_rgb`: uint8 / 255, floats as they are)."""
    from vae.analysis.granules import to_float_rgb

    if len(images) < 2:
        return 0.0
    x = np.stack([to_float_rgb(im) for im in images])
    return float(x.std(axis=0).mean())


# a decoded feature whose path maximum exceeds both ends by this share of its range rises
# and falls along the path (demo: granule density 1.0, program:specific 0.94; a bump of
# the real chain's erythroid program, 0.32, is a fall with a wobble: review)
PEAK_SHARE = 0.5
# below this |Spearman| with the path position the peak sentence adds that the rank
# correlation reads no trend (a rise and fall); above, the trend is real and it does not
NO_TREND = 0.3


def _path_peak(feats: pd.DataFrame | None, feature: str, rho: float | None = None) -> str:
    """``"; ... it peaks at position s"`` when ``feature`` of the decoded path cells
    (``path_features_gp``: columns ``s`` and the feature) rises and falls (its maximum
    inside the path, above both ends by :data:`PEAK_SHARE` of its range), else ``""``;
    ``rho`` (the feature's Spearman with the path position) below :data:`NO_TREND` adds
    that a rank correlation reads no trend in it."""
    from vae.analysis.report import fmt_number

    if feats is None or feature not in feats or "s" not in feats or len(feats) < 3:
        return ""
    v = feats[feature].to_numpy(float)
    if not np.isfinite(v).all() or np.ptp(v) <= 0:
        return ""
    k = int(np.argmax(v))
    if k in (0, len(v) - 1) or v[k] - max(v[0], v[-1]) < PEAK_SHARE * np.ptp(v):
        return ""
    ends = np.where(np.abs(v[[0, -1]]) < 1e-9 * np.ptp(v), 0.0, v[[0, -1]])  # no 1e-16
    out = (
        f"; on the cells decoded along the GP path it peaks at position "
        f"{float(feats['s'].iloc[k]):.2f} ({fmt_number(v[k])} against {fmt_number(ends[0])} "
        f"and {fmt_number(ends[1])} at the ends)"
    )
    if rho is not None and np.isfinite(rho) and abs(rho) < NO_TREND:
        out += ": a rank correlation reads no trend in a rise and fall"
    return out


def _eval_sections(
    evaluation: Path | None, stale: str | None = None, paired_by: str | None = None
) -> list:
    """Report sections from stage=evaluate's outputs, when it ran (``stale``: why they are
    not of this model; the section says so instead of showing another model's numbers;
    ``paired_by``: ``by_label`` / ``by_maturation`` when images met profiles that way, so
    retrieval of "the cell's own profile" is at chance by construction)."""
    import json

    from vae.analysis.report import FigureItem, Section, TableItem, fmt_number

    if stale:
        return [
            Section(
                "Evaluation",
                text=f"Not shown: {stale}. Run stage=evaluate overwrite=true, then "
                "stage=traverse overwrite=true, to add this model's accuracy tables here.",
            )
        ]
    if evaluation is None:
        return [
            Section(
                "Evaluation",
                text="no finished stage=evaluate of this run was found when this report "
                "was written (not run, or its last run did not finish: traverse.log says "
                "which); run stage=evaluate, then stage=traverse again (overwrite=true), to "
                "add its accuracy tables and figures here.",
            )
        ]
    ev_dir = evaluation.parent
    metrics = json.loads(evaluation.read_text())
    tables, figs = [], []
    captions = {
        "latent_structure": "kNN accuracy and balanced accuracy (mean recall over classes; reference: the train rows with a known label), silhouette and Leiden ARI/NMI of each latent on the held-out rows whose label is known (n; n_unlabelled: rows with a code but no label, left out; n_profile_in_training: held-out rows left out of the joint and expression scores because their expression profile is also a training or validation row's, as pairing by label reuses profiles: the same code would be a free vote; n_cells and knn_accuracy_per_cell: each specimen counted once, where a cell enters through two image sources).",
        "label_transfer": "Class by class: recall, precision and the class each one is most often taken for (kNN on each latent).",
        "label_transfer_by_source": "The image code's kNN accuracy per image source (a source the code reads badly shows here).",
        "reconstruction": "Held-out reconstruction: masked image MSE/SSIM; expression per-gene r; cross-modal prediction.",
        "retrieval": "Finding each cell's own expression profile from its image latent (Recall@k, FOSCTTM: 0 perfect, 0.5 random).",
        "disentanglement": "Against simulator truth: MIG gap (mig_best_dim: the dim with the most mutual information with the factor) and DCI informativeness per factor, and the single dim whose values rank with the factor best (best_dim, best_dim_spearman): the two dims can differ, as a dim can share information with a factor without ranking it.",
    }
    if paired_by:
        what = "label" if paired_by == "by_label" else "maturation"
        captions["retrieval"] += (
            f" Here images and profiles were paired by {what}: a crop's profile is a random "
            f"one of its class, not its own, so these numbers are at chance by construction "
            "(Recall@k about k / n, FOSCTTM about 0.5) and say nothing about the model."
        )
    missing = {
        "latent_structure": "fewer than two labels among these rows, so no Leiden comparison",
        "label_transfer": "no cell of this class was predicted, or none was taken for another",
        "label_transfer_by_source": "not defined",
        "reconstruction": "this measure does not apply to this row's modality",
        "retrieval": "not defined for these rows",
        "disentanglement": "the factor is categorical (no Spearman) or has no informative dim",
    }
    for name, cap in captions.items():
        f = ev_dir / f"{name}.csv"
        if not f.exists():
            continue
        df = read_table(f)
        if name == "reconstruction":
            tables += _reconstruction_tables(df, cap)
            continue
        tables.append(TableItem(name.replace("_", " "), df, cap, missing=missing[name]))
    fcaps = {
        "umap_labels.png": "Embedding of the shared latent, coloured by label, split, maturation (obs[analysis.maturation_key]: the simulator's true t in the demo; on expression data without one, the profiles' diffusion pseudotime from the expression stage's root, which spans every branch and which a crop paired by label takes from its profile; grey where unknown) and modality (whether a row has a crop, a profile or both). One class drawn as two islands that differ in modality is the pairing's doing, not two populations (modality mixing in the text above).",
        "umap_programs.png": "Same embedding coloured by the observed score of each gene program (expression.programs: the granule programs and the maturation markers by default; a program with none of its genes in the data has no panel).",
        "umap_image.png": "Embedding of the image-only latent, coloured by label.",
        "umap_expression.png": "Embedding of the expression-only latent, coloured by label.",
        "reconstructions.png": "Held-out cells: masked input, joint reconstruction, and the image decoded from the row's expression profile alone (in a study paired by label, a profile of the crop's class, not of this cell; black: the crop has no profile). Drawn cells: the nucleus is cut into the lobe count the lobe layer reads, and the cuts are painted in the decoded cytoplasm's colour (on pale cells near-white lines through the nucleus: a drawing convention, not a crush artefact). In a study paired by label every profile of a class decodes to much the same cell, so the last column shows what the class's crops have in common, not this cell.",
        "label_transfer.png": "Confusion of the kNN label transfer on each latent (held-out rows with a known label): counts, coloured by the share of the true class.",
        "label_disagreements.png": "Held-out crops whose kNN call on the image code is not their label, by label -> call pair (label_disagreements.csv lists them all, with each crop's file): judge by eye whether the code or the label is wrong. Under each crop: the share of its neighbours voting the call / its label.",
        "label_suspects.png": "The labelled training crops that voted for those wrong calls, by their label, the most misleading first (label_suspects.csv lists them all, with each crop's file): one mislabelled crop can mislead many held-out cells, so re-check these labels first. Under each crop: the wrong calls it voted for / the share of its own neighbours carrying its label.",
    }
    panels = metrics.get("umap_labels_panels")
    if panels is not None and "maturation" not in panels:
        # stage=evaluate drew no maturation panel (maturation all missing): the caption
        # must not describe one
        fcaps["umap_labels.png"] = (
            f"Embedding of the shared latent, coloured by {', '.join(panels)} (modality: "
            "whether a row has a crop, a profile or both). No maturation panel: these data "
            "hold no maturation value (no simulator t, no pseudotime). One class drawn as "
            "two islands that differ in modality is the pairing's doing, not two "
            "populations (modality mixing in the text above)."
        )
    for fn, cap in fcaps.items():
        if (ev_dir / fn).exists():
            figs.append(FigureItem(ev_dir / fn, cap))
    dis = metrics.get("disentanglement", {})
    text = f"{metrics.get('n_rows')} rows of split '{metrics.get('split')}'."
    if dis:
        text += (
            f" MIG {fmt_number(dis.get('mig'))}, DCI disentanglement "
            f"{fmt_number(dis.get('dci_disentanglement'))}, completeness "
            f"{fmt_number(dis.get('dci_completeness'))} (DCI: 0 = no single latent dim per "
            "factor, 1 = one dim each; MIG: the gap in mutual information between a factor's "
            "best and second-best dim, 0 to 1)."
        )
    mix = metrics.get("modality_mixing")
    if mix:
        text += (
            f" Modality mixing: within a class, {fmt_number(mix['same_kind_share'])} of a "
            "cell's nearest cells of that class share its kind (crop or profile only) against "
            f"{fmt_number(mix['if_mixed'])} if the kind did not matter, a separation of "
            f"{fmt_number(mix.get('separation'))} (0: mixed, 1: one island per kind; "
            f"{mix['n_cells']} cells of {', '.join(mix['classes'])}). Near 1, the shared "
            "latent holds each class twice, once per kind, and a cell's neighbours of the "
            "other kind are the far ones."
        )
    bmix = metrics.get("batch_mixing") or {}
    for name in ("expression", "joint"):
        m = bmix.get(name)
        if m:
            text += (
                f" Batch mixing ({name} code, obs['{bmix.get('batch_key')}']): within a class, "
                f"{fmt_number(m['same_batch_share'])} of a cell's nearest cells of that class "
                f"come from its own batch against {fmt_number(m['if_mixed'])} if the batch did "
                f"not matter, a separation of {fmt_number(m.get('separation'))} (0: mixed, 1: "
                f"one island per batch; {m['n_cells']} cells, {m['n_batches']} batches)."
            )
    from vae.analysis.uses import report_section

    uses = report_section(ev_dir)  # imputation, denoising, atypical cells (issue 15)
    out = [Section("Evaluation (held-out cells)", text=text, tables=tables, figures=figs)]
    return out + ([uses] if uses is not None else [])


# how the real-crop tables name a crop's image source or class when none is known
# (vae.inputs.schema.known_labels says which are)
UNKNOWN_NAME = "(unknown)"


# the image features the crop findings read (not the areas, which measure the framing)
CROP_FINDING_FEATURES = (
    "granule_density",
    "cytoplasm_grain",
    "glcm_contrast",
    "lobes",
    "nucleus_fraction",
    "cytoplasm_hue",
    "cytoplasm_saturation",
)
# a source on whose crops a measured feature takes one value this often reads nothing
# there (the granule counter finds no granule on any BCCD crop at 64 px): said beside the
# feature's finding, which otherwise compares the sources it can see with those it cannot
BLIND_SHARE = 0.9
# crops of a source (or class) below which no share or within-class rank is read
MIN_GROUP_CROPS = 10
# shuffles of the programs within a class that give the chance level of the strongest
# image-feature vs program tie (the maximum over ~28 pairs: noise alone reaches |rho| 0.52
# at 20 cells, 0.26 at 78; review of the first, fixed 0.3 threshold)
TIE_PERMUTATIONS = 200
# the immature granulocytes (haematology's IG count, as stage=embed's samples.csv): the
# stages in which the granules form; IG_NAMES: labels that name them together (PBC's "IG")
IMMATURE_GRANULOCYTES = ("promyelocyte", "myelocyte", "metamyelocyte")
IG_NAMES = frozenset({"ig", "igs", "immature_granulocyte", "immature_granulocytes"})


def blind_sources(real: pd.DataFrame, feature: str) -> list[tuple[str, float, float]]:
    """The image sources where ``feature`` reads one value on >= :data:`BLIND_SHARE` of
    their crops (sources of >= :data:`MIN_GROUP_CROPS` crops with the value defined).

    Returns
    -------
    ``(source, that value, its share)`` per such source, in source order.
    """
    if "image_source" not in real or feature not in real:
        return []
    out = []
    for src, v in real.groupby("image_source", sort=True, observed=True)[feature]:
        v = v.to_numpy(float)
        v = v[np.isfinite(v)]
        if src == UNKNOWN_NAME or v.size < MIN_GROUP_CROPS:
            continue
        vals, counts = np.unique(v, return_counts=True)
        k = int(counts.argmax())
        if counts[k] / v.size >= BLIND_SHARE:
            out.append((str(src), float(vals[k]), float(counts[k] / v.size)))
    return out


def crop_findings(
    real: pd.DataFrame,
    image_labels: Sequence[object],
    measured: Sequence[str],
    paired_by: str | None = None,
    seed: int = 0,
) -> list[str]:
    """Findings on what the held-out crops can show, for the top of the report.

    Parameters
    ----------
    real : one row per held-out crop (``real_crop_features.csv``): ``label``, the
        ``measured`` feature columns, ``program:*`` columns, ``gp_path_position`` and
        ``specimen`` where they were computed
    image_labels : the labels of every crop of the study (training ones included)
    measured : the image features to read (:data:`vae.analysis.granules.FEATURES`)
    paired_by : ``by_label`` / ``by_maturation`` where images met profiles that way
        (no cell's image met its own profile: a tie within a class is then the model's)
    seed : of the permutations that give the chance level of the within-class tie

    Returns
    -------
    Up to two sentences: when some crops are labelled and none is an immature
    granulocyte (:data:`IMMATURE_GRANULOCYTES`), that granule formation has no labelled
    image, with the crops' path position per class (which then compares classes); and,
    within the commonest labelled class (each specimen once, >= 2 x
    :data:`MIN_GROUP_CROPS` cells), the strongest Spearman between an image feature and a
    decoded program over pairs with >= :data:`MIN_GROUP_CROPS` values, against the
    largest that shuffled programs reach (95th percentile of :data:`TIE_PERMUTATIONS`).
    """
    from vae.analysis.metrics import correlation_matrix
    from vae.analysis.palette import MISSING_NAMES, normalise
    from vae.inputs.schema import stage_name

    def names_a_class(values) -> np.ndarray:
        # known_labels, and not a missing name as the tables show it ("(unlabelled)")
        v = np.asarray(values, dtype=object)
        shown = np.array([normalise(x) not in MISSING_NAMES for x in v], bool)
        return known_labels(v) & shown if len(v) else np.zeros(0, bool)

    out = []
    lab = real["label"].astype(str) if "label" in real else pd.Series([], dtype=str)
    known = lab[names_a_class(lab)]
    all_named = list(np.asarray(image_labels, dtype=object)[names_a_class(image_labels)])
    immature = {
        v for v in all_named if stage_name(v) in IMMATURE_GRANULOCYTES or normalise(v) in IG_NAMES
    }
    if all_named and not immature:
        line = (
            "No crop of this study is labelled "
            + ", ".join(IMMATURE_GRANULOCYTES[:-1])
            + f" or {IMMATURE_GRANULOCYTES[-1]} (the immature granulocytes, in which the "
            "granules form): granule formation has no labelled image here, so these data "
            "cannot show it against the gene programs, and the image features below differ "
            "between classes and image sources rather than along maturation"
        )
        if "gp_path_position" in real and known.size:
            pos = real.loc[known.index, "gp_path_position"].astype(float)
            ok = np.isfinite(pos.to_numpy())
            med = pos[ok].groupby(known[ok]).agg(["median", "size"])
            med = med[med["size"] >= 3].sort_values("median")
            if len(med) >= 2:
                line += (
                    "; the held-out crops' GP path position follows their class (median: "
                    + ", ".join(
                        f"{c} {m:.2f} (n={int(k)})"
                        for c, (m, k) in med[["median", "size"]].iterrows()
                    )
                    + "), so a correlation with it compares these classes"
                )
        out.append(line + ".")
    progs = [c for c in real.columns if c.startswith("program:")]
    feats = [f for f in measured if f in real]
    if known.size and progs and feats:
        cls = str(known.value_counts().index[0])
        sub = real.loc[known.index[known == cls]]
        if "specimen" in sub:  # a cell that entered through two image sources: once
            spec = sub["specimen"].astype(str)
            sub = sub[~(spec.duplicated() & known_labels(spec.to_numpy(dtype=object)))]
        n = len(sub)
        if n >= 2 * MIN_GROUP_CROPS:
            x, y = sub[feats].to_numpy(float), sub[progs].to_numpy(float)
            cm = _enough(correlation_matrix(x, y), x, y)
            if np.isfinite(cm).any():
                i, j = np.unravel_index(np.nanargmax(np.abs(cm)), cm.shape)
                rho = float(cm[i, j])
                rng = np.random.default_rng(seed)
                null = [
                    np.nanmax(np.abs(_enough(correlation_matrix(x, y[rng.permutation(n)]), x, y)))
                    for _ in range(TIE_PERMUTATIONS)
                ]
                chance = float(np.nanquantile(null, 0.95))
                pairs = int(np.isfinite(cm).sum())
                line = (
                    f"Within the {n} held-out {cls} cells (the commonest class, each "
                    f"specimen once), the strongest of {pairs} ties of a measured image "
                    f"feature with a decoded program is {feats[i]} vs {progs[j]} (rho "
                    f"{rho:+.2f}; with the programs shuffled the strongest reaches "
                    f"{chance:.2f} in 95 % of {TIE_PERMUTATIONS} draws)"
                )
                if abs(rho) <= chance:
                    line += (
                        ": within a class the image and the gene programs move together "
                        "no more than chance; across classes they are tied through the label"
                    )
                if paired_by:
                    line += (
                        f"; images met profiles by {paired_by.removeprefix('by_')}, never "
                        "a cell its own profile, so a tie within a class is the model's "
                        "interpolation, not an observation"
                    )
                out.append(line + ".")
    return out


def _enough(cm: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``cm`` (p, q) with NaN where a pair rests on fewer than :data:`MIN_GROUP_CROPS`
    rows with both values."""
    n = np.isfinite(x).astype(int).T @ np.isfinite(y).astype(int)
    return np.where(n >= MIN_GROUP_CROPS, cm, np.nan)


def path_position_correlations(
    real: pd.DataFrame, features: list[str], position: np.ndarray
) -> dict[str, np.ndarray]:
    """Spearman of each measured feature with the crops' GP path position.

    Parameters
    ----------
    real : one row per crop, the ``features`` columns and optionally ``image_source``
    features : the columns to correlate
    position : (n,) each crop's position along the GP path (0..1)

    Returns
    -------
    ``{"gp_path_position": (F,)}`` and, where ``image_source`` is known,
    ``"gp_path_position_within_source"``: the same inside each source of >= 10 crops,
    pooled weighted by crops (:func:`vae.analysis.metrics.correlation_within_groups`);
    NaN for a feature that rests on fewer than two sources. Sources differ in stain and
    sharpness more than classes do (docs/vae.md "Granularity on real crops"), so the
    pooled value can follow the sources; the column is left out when no feature has it.
    """
    from vae.analysis import metrics as M

    x = real[features].to_numpy(float)
    out = {"gp_path_position": M.correlation_matrix(x, position)[:, 0]}
    if "image_source" in real:
        src = real["image_source"].to_numpy(dtype=object)
        src = np.where(src == UNKNOWN_NAME, None, src)  # no source: in no group
        within, _ = M.correlation_within_groups(x, position, src, min_rows=MIN_GROUP_CROPS)
        if np.isfinite(within).any():
            out["gp_path_position_within_source"] = within
    return out


# features of the by-class table of the real crops: what a haematologist checks first
CLASS_MORPHOLOGY = (
    "lobes",
    "nucleus_fraction",
    "cytoplasm_grain",
    "glcm_contrast",
    "granule_density",
    "cytoplasm_hue",
    "cell_area",
)


def morphology_by_class(real: pd.DataFrame) -> pd.DataFrame:
    """Median of each measured feature per class (and per image source, when known).

    Parameters
    ----------
    real : one row per measured crop: ``label``, optional ``image_source``, and the
        :data:`vae.analysis.granules.FEATURES` columns (``real_crop_features.csv``)

    Returns
    -------
    DataFrame with ``label``, [``image_source``], ``n`` and one column per feature of
    :data:`CLASS_MORPHOLOGY` present in ``real``; classes in palette order (maturation
    order first), the unlabelled last.
    """
    keys = ["label"] + (["image_source"] if "image_source" in real else [])
    feats = [f for f in CLASS_MORPHOLOGY if f in real]
    # a key read back from a CSV ("nan", "NA", "" -> NaN) is a group of its own, not dropped
    real = real.assign(**{k: real[k].astype(object).fillna(UNKNOWN_NAME).astype(str) for k in keys})
    g = real.groupby(keys, sort=False)
    out = g[feats].median()
    out.insert(0, "n", g.size())
    out = out.reset_index()
    order = {lab: i for i, lab in enumerate(label_order(out["label"]))}
    out["_o"] = out["label"].map(order)
    return (
        out.sort_values(["_o", *keys[1:]], kind="stable").drop(columns="_o").reset_index(drop=True)
    )


# features of the real crops nearest each path step, as path_features_*.csv columns (the
# grain since 2026-12-07: the real GP path's middle steps are drawn at twice the
# cytoplasm_grain of their nearest crops)
NEAREST_CROP_FEATURES = (
    "lobes",
    "nucleus_fraction",
    "granule_density",
    "cytoplasm_hue",
    "cytoplasm_grain",
)


@dataclass
class _NearestCrops:
    """The real crops nearest each path step: ``first`` (n, S, S, 3) float [0, 1], the
    masked crop shown at the step (its nearest crop not shown at a nearer step,
    :func:`vae.analysis.study_page.distinct_nearest`); ``rows`` (n,) that crop's row in
    the latent; ``features`` (n rows): the median of the ``k`` nearest crops' measured
    features (:func:`vae.analysis.granules.measure_batch`), repeats allowed."""

    first: np.ndarray
    rows: np.ndarray
    features: pd.DataFrame
    k: int


def _nearest_crops(
    rd: RunData, points: np.ndarray, Z: np.ndarray, k: int, params
) -> _NearestCrops | None:
    """The real crops whose codes (``Z``, the reported latent) lie nearest ``points``, or
    None without crops. Candidates are every cell with a crop, as on ``study.html``."""
    from vae.analysis import granules as G
    from vae.analysis.study_page import distinct_nearest, nearest_rows

    if rd.data is None:
        return None
    cand = np.flatnonzero(rd.data.has_image.numpy().astype(bool))
    near = nearest_rows(points, Z, cand, k)  # (n, k), nearest first
    if near.size == 0:
        return None
    kk = near.shape[1]
    flat = near.ravel()
    crops = rd.data.crops[flat].permute(0, 2, 3, 1).numpy()  # (n k, S, S, 3) uint8
    masks = rd.data.masks[flat, 0].numpy().astype(bool)
    feats = G.measure_batch(crops * masks[..., None], masks, params)
    med = feats.groupby(np.arange(len(feats)) // kk).median().reset_index(drop=True)
    # the strip shows a different cell at each step: the single nearest crop was the
    # same neutrophil for 9 of the real chain's 12 GP steps (2026-12-04)
    shown = distinct_nearest(points, Z, cand)
    sc = rd.data.crops[shown].permute(0, 2, 3, 1).numpy().astype(np.float64) / 255.0
    sm = rd.data.masks[shown, 0].numpy().astype(bool)
    return _NearestCrops(sc * sm[..., None], shown, med, kk)


def _path_readback(
    rd: RunData, a: AnalysisSettings, posed, posed_dec, pose_ref, labels, classes
) -> dict | None:
    """Each path step drawn in its nearest cell's pose, read back by the model's own image
    encoder (:func:`vae.analysis.readback.read_back`, voted by the labelled training
    crops' image codes, as evaluate's ``readback``): ``drawn_read_as`` (n_steps,) the
    label each drawing is read as, and ``drawn_read_order_spearman`` the Spearman of the
    step's position with the place of that label in the path's class order (``classes``;
    labels off the path left out; NaN when fewer than 3 steps or one label remain). None
    without image codes, decoded masks or labelled training crops."""
    from scipy.stats import spearmanr

    from vae.analysis.readback import drawing, read_back, training_voters

    lat = rd.latent
    if "X_vae_image" not in lat.obsm or posed_dec.masks is None:
        return None
    z_ref, labels_ref = training_voters(lat, _has_crop(rd), labels)
    if len(z_ref) == 0:
        return None
    k = posed.codes.shape[1]
    drawn = drawing(posed_dec.images[::k], posed_dec.masks[::k], crop_background(rd))
    # the nearest cell of each step carries what the encoder reads beside the crop (its
    # size, for a model with a size head); the drawing is the crop, no profile is read
    carriers = np.asarray(pose_ref)[posed.nearest[:, 0]]
    calls = read_back(
        rd.model,
        rd.data,
        carriers,
        {"path": drawn},
        z_ref,
        labels_ref,
        a.knn_k,
        rd.device,
        a.batch_size,
    )["path"]
    place = {str(c): i for i, c in enumerate(classes)}
    order = np.array([place.get(str(c), np.nan) for c in calls], dtype=float)
    ok = np.isfinite(order)
    rho = float("nan")
    if ok.sum() >= 3 and np.ptp(order[ok]) > 0:
        rho = round(float(spearmanr(np.flatnonzero(ok), order[ok]).correlation), 3)
    return {"drawn_read_as": [str(c) for c in calls], "drawn_read_order_spearman": rho}


def _pose_reference(rd: RunData, image_rows: np.ndarray, a: AnalysisSettings) -> np.ndarray | None:
    """Cells that lend their pose to path steps: ``image_rows``, the rows of the analysed
    split with a crop (their pose needs their single-view codes,
    :func:`vae.analysis.run.cell_codes`).

    None when posing is off (``path_pose_cells`` 0), there is no paired data or no crop,
    or the reported latent is already single-view (``encode_views`` 1: no pose was removed).
    """
    views = int(getattr(getattr(rd.model, "args", None), "encode_views", 1) or 1)
    if a.path_pose_cells <= 0 or rd.data is None or views == 1 or image_rows.size == 0:
        return None
    return image_rows


def _starred(labels: list[str], supported: np.ndarray, img_ok: bool) -> list[str]:
    """Step labels, with ``*`` on the steps outside the image support (none without images)."""
    return [x + ("" if ok or not img_ok else "*") for x, ok in zip(labels, supported)]


def _has_crop(rd: RunData) -> np.ndarray | None:
    """(N,) bool rows with a crop from the paired data (None without it)."""
    return rd.data.has_image.numpy().astype(bool) if rd.data is not None else None


def _source_note(s: np.ndarray, sources: np.ndarray) -> str:
    """Caption sentence when the crops nearest a path's steps come from more than one
    image source (s : (n,) positions; sources : (n,) the nearest crop's source): each
    source has its own stain and microscope, so what changes along the drawn cells is
    partly the source."""
    runs: list[tuple[str, float, float]] = []
    for x, src in zip(s, sources):
        if runs and runs[-1][0] == src:
            runs[-1] = (src, runs[-1][1], float(x))
        else:
            runs.append((str(src), float(x), float(x)))
    if len({r[0] for r in runs}) < 2:
        return ""
    where = "; ".join(
        f"{src} at {a:.2f}-{b:.2f}" if a != b else f"{src} at {a:.2f}" for src, a, b in runs
    )
    return (
        f" The crops nearest the steps come from more than one image source ({where}): "
        "each source has its own stain and microscope, so part of what changes along the "
        "drawn cells is the source, not maturation."
    )


def path_order(path_classes, labels: np.ndarray, maturation_axis=None) -> list[str] | None:
    """The classes the maturation path runs through, earliest first, as the data spell
    them; None (``analysis.path_classes=[]``): the classes ordered by mean maturation.

    ``path_classes`` at its default (the six neutrophil stages,
    :data:`~vae.inputs.schema.MATURATION_ORDER`) on a model trained with the maturation
    head is the model's own axis (``maturation_axis``: latent ``uns["maturation_axis"]``,
    the labels ``vae.maturation_classes`` ordered when it was trained), when at least two
    of its classes are labels here: the path then runs through the classes the swept
    axis orders, and a model trained with ``vae.maturation_classes=[GMP,Neutrophils]``
    needs no list repeated at traverse. Any other list (or the default without such an
    axis) is taken as the data spell it (:func:`vae.inputs.schema.class_labels`:
    "promyelocyte" is the label "Promyelocytes", "segmented_neutrophil" the label
    "Neutrophils", when exactly one label names that stage; said at INFO).

    Raises :class:`AnalysisError` before any work for a near miss of a label
    ("lymphocyt" for "lymphocyte": a typo, the path would silently lose that step, or
    fall back to ordering every class by pseudotime) and for a stage that two labels
    name in a list the user gave (in the default, that stage is left out with a
    warning). A class unlike every label stays, left to the path's own warning: a preset's
    classes on data without them.
    """
    from vae.inputs.schema import class_labels, say_class_labels

    if not path_classes:
        return None
    have = {str(x) for x in labels} - {""}
    if list(path_classes) == list(MATURATION_ORDER) and maturation_axis is not None:
        axis = [str(c) for c in np.asarray(maturation_axis.get("classes", []), dtype=object)]
        if sum(c in have for c in axis) >= 2:
            log.info(
                "analysis.path_classes: not set, so the path runs through the model's "
                "maturation axis (vae.maturation_classes as trained): %s",
                " -> ".join(axis),
            )
            return axis
    # the default (the six stages) was named by no one: a stage two labels spell is left
    # out with a warning, not refused
    given = [str(c) for c in path_classes] != list(MATURATION_ORDER)
    try:
        order, taken, ambiguous = class_labels(
            path_classes, sorted(have), "analysis.path_classes", given=given
        )
    except ValueError as e:
        raise AnalysisError(str(e)) from e
    say_class_labels(log, "analysis.path_classes", taken, ambiguous)
    return order


def _axis_means(
    z: np.ndarray, obs, label_key: str, classes, dim: int, anchor: float, sd: float
) -> str:
    """Caption tail for the maturation axis sweep: each ordered class's mean on the axis,
    in the sweep's own unit (sd of the dim from the anchor), so the two can be compared.

    The head orders the classes' codes along the dim; a sweep changes that dim alone
    around one cell, so what it decodes is the dim's effect with every other dim held,
    which need not follow the classes (z : (n,) the dim's values; anchor, sd : the
    sweep's centre and step unit on this dim)."""
    if label_key not in obs:
        return "."
    lab = obs[label_key].astype(str).to_numpy()
    unit = sd if sd > 0 else 1.0
    means = [
        f"{c} {(float(np.mean(z[lab == str(c)])) - anchor) / unit:+.1f}"
        for c in classes
        if (lab == str(c)).any()
    ]
    if not means:
        return "."
    return (
        f": each class's mean z{dim}, in sd from the anchor as the sweep's steps: "
        f"{', '.join(means)}. Where the sweep covers less than that span it stays where "
        "training crops lie; the path figures below run between the classes. The sweep "
        f"changes z{dim} alone around one cell, every other dim held, so what it decodes "
        "need not follow the classes."
    )


def _write_study_page(
    rd: RunData,
    a: AnalysisSettings,
    path: Path,
    gp,
    dec,
    drawn: np.ndarray | None,
    supported: np.ndarray | None,
    step_labels,
    classes: list[str],
    labels: np.ndarray,
    Z: np.ndarray,
    programs: dict[str, list[str]],
    gidx: list[int],
    title: str,
    subtitle: str,
    seed: int,
    notes: Sequence[str] = (),
) -> Path:
    """``study.html`` (:mod:`vae.analysis.study_page`) for the GP path ``gp`` decoded as ``dec``;
    ``drawn`` (n, S, S, 3): each step in its nearest cell's pose (None: ``dec.cells()``);
    ``supported`` (n,) bool: steps near codes of cells with a crop (the others faded);
    ``step_labels``: :class:`vae.analysis.traverse.NeighbourLabels` of the steps, or None;
    ``notes``: what the data cannot show, one paragraph each under the subtitle."""
    from vae.analysis import traverse as T
    from vae.analysis.palette import label_colours, label_markers
    from vae.analysis.run import embedding
    from vae.analysis.study_page import (
        StudyPageData,
        nearest_rows,
        path_on_scatter,
        sample_rows,
        write_study_page,
    )

    lat = rd.latent
    n = lat.n_obs
    has_crop = rd.data.has_image.numpy().astype(bool) if rd.data is not None else np.zeros(n, bool)
    # nearest cells of each path step among those with a crop (all cells without data)
    cand = np.flatnonzero(has_crop) if has_crop.any() else np.arange(n)
    near = nearest_rows(gp.points, Z, cand, a.page_nearest)
    keep = sample_rows(n, a.page_max_cells, seed, keep=np.unique(near))
    remap = {int(r): i for i, r in enumerate(keep)}
    if "X_umap" in lat.obsm and np.asarray(lat.obsm["X_umap"]).shape == (n, 2):
        emb, method = np.asarray(lat.obsm["X_umap"], float), "UMAP"
    else:
        emb, method = embedding(
            np.asarray(lat.obsm["X_vae"], dtype=np.float64), a.n_neighbors, a.umap, seed
        )
    prog = T.program_scores(dec.expression, rd.gene_names, programs)
    rows = [f"program: {p}" for p in prog] + [rd.gene_names[i] for i in gidx]
    values = (
        np.column_stack([*prog.values(), dec.expression[:, gidx]])
        if rows
        else np.zeros((len(gp.s), 0))
    )
    info = {}
    obs = lat.obs
    # a crop paired by label carries another cell's profile: its id is the profile's, and
    # its maturation (pseudotime) that profile's, not the crop's; say which is which
    by_label = (
        obs["pair_mode"].astype(str).to_numpy() == "by_label"
        if "pair_mode" in obs
        else np.zeros(n, bool)
    )
    if "image_ref" in obs and has_crop.any():
        ref = obs["image_ref"].astype(str).to_numpy()
        info["crop"] = np.where(has_crop & (ref != np.asarray(obs.index)), ref, None)[keep]
    for key in (a.maturation_key, "split", "kind", "t", "granule_density", "lobes"):
        if key in obs and key not in info and key != a.label_key:
            v = obs[key].to_numpy()
            if key == "t" and a.maturation_key in info and a.maturation_key in obs:
                m = obs[a.maturation_key].to_numpy()
                same = m.dtype.kind == "f" and v.dtype.kind == "f" and m.shape == v.shape
                if same and np.array_equal(m, v, equal_nan=True):
                    continue  # the simulator's maturation is t: shown once
            if key == a.maturation_key and by_label.any():
                v = v.astype(np.float64)
                info[key] = np.where(by_label, np.nan, v)[keep]
                info[f"{key} of the paired profile"] = np.where(by_label, v, np.nan)[keep]
            else:
                info[key] = v[keep]
    crops = None
    if rd.data is not None:
        crops = rd.data.crops[keep].permute(0, 2, 3, 1).numpy()
    cells_drawn = drawn if drawn is not None else dec.cells()
    data = StudyPageData(
        s=gp.s,
        decoded=(
            T.fade_unsupported(cells_drawn, supported) if supported is not None else cells_drawn
        ),
        rows=rows,
        values=values,
        nearest=np.vectorize(remap.get, otypes=[np.int64])(near) if near.size else near,
        path_xy=path_on_scatter(gp.s, gp.knots_s, emb, labels, classes),
        emb=emb[keep],
        labels=labels[keep],
        cell_ids=np.asarray(lat.obs_names)[keep],
        crops=crops,
        has_crop=has_crop[keep],
        colours=label_colours(labels),
        markers=label_markers(labels),
        axis_name=method,
        path_classes=list(classes),
        info=info,
        supported=supported,
        drawn_from=(
            [
                (
                    f"{x} ({sh:.0%} of the {a.image_support_k}"
                    + (f"; the others: {v.split(', ', 1)[1]})" if ", " in v else ")")
                )
                if x
                else ""
                for x, sh, v in zip(
                    step_labels.label,
                    step_labels.share,
                    step_labels.votes
                    if step_labels.votes is not None
                    else [""] * len(step_labels.label),
                )
            ]
            if step_labels is not None
            else None
        ),
        decoded_how=(
            ", in the pose of the held-out cell nearest to it (the latent is pose-free; "
            "a nucleus needs a pose to show its shape)"
            if drawn is not None
            else ""
        )
        + (
            "; faded where no training cell with a crop lies near that point (the image "
            "there is the decoder's extrapolation)"
            if supported is not None and not np.all(supported)
            else ""
        ),
    )
    return write_study_page(path, data, f"{title}: interactive path", subtitle, notes)


def _rejects_section(sheet: Path):
    """Examples of the detections stage=segment did not keep, and how many per reason."""
    from vae.analysis.report import FigureItem, Section, TableItem

    tables = []
    csv = sheet.with_name("rejects.csv")
    if csv.exists():
        rej = read_table(csv, keep_default_na=False)
        rej = rej[rej["action"] == "rejected_cell"] if "action" in rej else rej.iloc[:0]
        if len(rej):
            flags = rej["reason"].astype(str).str.split(",").explode()
            detail = {}
            for _, r in rej.iterrows():
                for f, d in zip(str(r["reason"]).split(","), str(r.get("detail", "")).split("; ")):
                    detail.setdefault(f, d)
            counts = flags.value_counts()
            tables.append(
                TableItem(
                    "Rejected cells by filter",
                    pd.DataFrame(
                        {
                            "filter": counts.index,
                            "cells": counts.to_numpy(),
                            "meaning": [detail.get(f, "") for f in counts.index],
                        }
                    ),
                    f"{len(rej)} confident detections were not kept (a cell can fail several "
                    "filters, so the rows add up to more); one row each in "
                    "segment/rejects.csv. segment/summary.json's filter_counts are larger: "
                    "they flag every detection listed, low-scoring ones and second "
                    "detections of a kept cell included.",
                )
            )
    return Section(
        "Rejected crops",
        text="Cells the segmentation found but did not crop: cut by the image or tile edge, "
        "touching a neighbour, or two cells kept as one (low solidity, area outlier). "
        "Thresholds: segmentation.border_margin, touch_px, min_solidity, max_area_ratio.",
        tables=tables,
        figures=[
            FigureItem(
                sheet,
                "Examples of rejected detections (mask outlined in yellow, the rest dimmed), "
                "each labelled with the first filter it failed (+: more than one).",
            )
        ],
    )


def _reconstruction_tables(df: pd.DataFrame, caption: str) -> list:
    """evaluate's reconstruction.csv as two tables, images and expression, so that no
    row carries the other modality's empty columns."""
    from vae.analysis.report import TableItem

    img_cols = [c for c in ("masked_mse", "masked_ssim") if c in df]
    out = []
    img = df[df[img_cols].notna().any(axis=1)] if img_cols else df.iloc[:0]
    if len(img):
        out.append(
            TableItem(
                "reconstruction: images",
                img[["what", "n", *img_cols]],
                caption + " Image rows: masked MSE (lower is better) and SSIM (1 = identical).",
            )
        )
    expr_cols = [c for c in df.columns if c not in ("what", "n", *img_cols)]
    ex = df[df[expr_cols].notna().any(axis=1)] if expr_cols else df.iloc[:0]
    if len(ex):
        out.append(
            TableItem(
                "reconstruction: expression",
                ex[["what", "n", *expr_cols]],
                "Mean per-gene correlation of predicted vs observed log expression "
                "(granule genes apart); the negative-binomial log-likelihood of the counts.",
                missing="the NB log-likelihood is computed for the joint reconstruction only "
                "(the image-only prediction has no count model)",
            )
        )
    return out


def _azurophilic_truth(
    lat, rows: np.ndarray, azurophilic_density: Callable[[float], float] | None
) -> np.ndarray | None:
    """Simulator truth of the large (azurophilic) granule density of ``rows``, from t.

    NaN outside the neutrophil lineage; None when the data are not simulated.
    """
    if azurophilic_density is None or "t" not in lat.obs or "kind" not in lat.obs:
        return None
    t = lat.obs["t"].to_numpy().astype(float)[rows]
    return np.array([azurophilic_density(x) if np.isfinite(x) else np.nan for x in t])


def _class_makeup(names, counts, labels: np.ndarray, obs: pd.DataFrame) -> str:
    """``GMP 216 (0 with a crop), Neutrophils 569 (556 with a crop)``: what each path class
    is made of, so a reader sees which end rests on profiles alone (a review asked)."""
    if HAS_IMAGE not in obs:
        return ", ".join(f"{c} {int(n)}" for c, n in zip(names, counts))
    hi = _flag(obs, HAS_IMAGE)
    lab = np.asarray(labels).astype(str)
    return ", ".join(
        f"{c} {int(n)} ({int((hi & (lab == str(c))).sum())} with a crop)"
        for c, n in zip(names, counts)
    )


def _sweep_vs_crops_note(row: dict, crops: pd.DataFrame, dim: int, strong: float = 0.5) -> str:
    """Caption tail for a dim's sweep: the features whose Spearman with the sweep's
    offset and with the dim across held-out crops (``crops``: real_feature_correlation,
    one row per feature, a column per dim) are both >= ``strong`` in size and of
    opposite sign ("" when none). A sweep moves one cell's code; across cells the dim
    can go with the feature the other way (a review read 'maturation axis' over a sweep
    whose primary program fell while it rose across the crops)."""
    col = f"z{dim}"
    if col not in crops:
        return ""
    across = dict(zip(crops["feature"], crops[col]))
    clash = []
    for f, r_sweep in row.items():
        r_crops = across.get(f)
        if f in ("dim", "kl") or r_crops is None:
            continue
        r_sweep, r_crops = float(r_sweep), float(r_crops)
        if (
            np.isfinite(r_sweep)
            and np.isfinite(r_crops)
            and min(abs(r_sweep), abs(r_crops)) >= strong
            and np.sign(r_sweep) != np.sign(r_crops)
        ):
            clash.append(f"{f} ({r_sweep:+.2f} along the sweep, {r_crops:+.2f} across crops)")
    if not clash:
        return ""
    return (
        f" Along this sweep and across the held-out crops z{dim} goes opposite ways with "
        + ", ".join(clash)
        + ": the sweep shows what the decoder does near the anchor cell, not what the dim "
        "means across cells (real_feature_correlation.csv)."
    )
