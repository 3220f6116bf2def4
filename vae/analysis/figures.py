"""Matplotlib figures of the evaluation and traversal study (Agg backend, no display).

Each function returns a ``matplotlib.figure.Figure``; :func:`save` writes it
as PNG and closes it. :func:`to_image` renders it to an (H, W, 3) uint8 array
for TensorBoard.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


@contextmanager
def plain_text() -> Iterator[None]:
    """Figures made inside show every name as written: matplotlib reads a class or
    sample name holding two ``$`` as TeX math (``mono$\\frac{$cyte`` made stage=evaluate
    fail with ParseSyntaxException; ``$x$`` was drawn as maths). Every stage runs in it
    (``pipeline.runner``, and each DDP rank); an API user's own plots keep matplotlib's
    default."""
    with matplotlib.rc_context({"text.parse_math": False}):
        yield


def to_image(fig) -> np.ndarray:
    """Render a figure to an (H, W, 3) uint8 array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG (atomically) and close it."""
    import os
    import uuid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:  # temporary name, then rename: never a half-written PNG
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


CAPTION_PT = 8  # text under images: >= 8 pt, wrapped to the image's width


# advance of a caption character, in em, taken wide: DejaVu Sans' lower case and digits
# run 0.55-0.65 em; at 0.55 (and still at 0.65) "lymphocyte 4/5" and "crop: unlabelled"
# overran their 1.1 in column into the next step's caption (the real chain's path_gp.png)
CAPTION_EM = 0.7


def _wrap(text: str, inches: float, pt: float = CAPTION_PT) -> str:
    """``text`` broken into lines that fit ``inches`` at ``pt`` (:data:`CAPTION_EM` a
    character), at spaces only."""
    import textwrap

    width = max(6, int(inches * 72 / (CAPTION_EM * pt)))
    return textwrap.fill(str(text), width=width, break_long_words=False)


def scatter(
    emb: np.ndarray,
    values: np.ndarray,
    title: str,
    categorical: bool | None = None,
    ax=None,
    colours: dict[str, str] | None = None,
    axis_name: str = "",
    markers: dict[str, str] | None = None,
):
    """2-D embedding coloured by a label (categorical) or a number (colour bar).

    Parameters
    ----------
    emb : (n, 2) embedding coordinates.
    values : (n,) label or number of each point.
    colours : label -> colour for a categorical colouring; default
        :func:`vae.analysis.palette.label_colours` of ``values``. Pass the mapping of
        the full label set when several panels show subsets, so a label keeps its
        colour everywhere. A column none of whose values is in the mapping (the split,
        the modality) is not a cell label: it gets
        :func:`vae.analysis.palette.group_styles`.
    axis_name : "UMAP" or "PCA": axes are labelled "<axis_name> 1" / "<axis_name> 2".
    markers : label -> marker, the companion of ``colours``; default
        :func:`vae.analysis.palette.label_markers` of the mapping's labels (the same
        rank of unknown labels as :func:`vae.analysis.palette.label_colours`).

    Each class has a colour *and* a marker shape, and every point a thin dark edge, so
    classes stay apart for colour-blind readers and pale colours stay visible.
    """
    from vae.analysis import palette as P

    values = np.asarray(values)
    if categorical is None:
        categorical = values.dtype.kind not in "fiu"
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(4.6, 3.8))
    else:
        fig = ax.figure
    if categorical:
        sv = values.astype(str)
        if colours is not None and not set(sv) & set(colours):
            # not the labels the mapping is for (split, modality): a small safe palette
            pal, mk = P.group_styles(sv)
            order = sorted(pal)
        else:
            pal = dict(colours) if colours is not None else P.label_colours(sv)
            mk = dict(markers) if markers is not None else P.label_markers(list(pal))
            missing = [c for c in set(sv) if c not in pal]
            if missing:  # a label outside the given mapping: style it, never fail a figure
                pal.update({k: v for k, v in P.label_colours(missing).items() if k not in pal})
            missing = [c for c in set(sv) if c not in mk]
            if missing:
                mk.update({k: v for k, v in P.label_markers(missing).items() if k not in mk})
            order = P.label_order(sv)
        for c in order:
            sel = sv == c
            # an empty label would drop the class from the legend: name it
            ax.scatter(
                emb[sel, 0], emb[sel, 1], label=P.display_label(c), **P.point_style(pal[c], mk[c])
            )
        # beside the axes: inside, a long label list covers the points (a whole class
        # on the real chain's UMAP)
        ax.legend(
            fontsize=8,
            markerscale=2,
            frameon=False,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
            handletextpad=0.3,
        )
    else:
        v = values.astype(float)
        ok = np.isfinite(v)
        ax.scatter(emb[~ok, 0], emb[~ok, 1], s=4, color="lightgrey")
        sc = ax.scatter(emb[ok, 0], emb[ok, 1], s=6, c=v[ok], cmap="viridis")
        cb = fig.colorbar(sc, ax=ax, shrink=0.8)
        cb.set_label(title, fontsize=8)
        cb.ax.tick_params(labelsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if axis_name:
        ax.set_xlabel(f"{axis_name} 1", fontsize=8)
        ax.set_ylabel(f"{axis_name} 2", fontsize=8)
    return fig


def scatter_panel(
    emb: np.ndarray,
    columns: dict[str, np.ndarray],
    suptitle: str,
    colours: dict[str, str] | None = None,
    axis_name: str = "",
):
    """Several colourings of one embedding side by side (``colours``, ``axis_name``: see
    :func:`scatter`; the label mapping applies to every categorical column)."""
    n = len(columns)
    ncol = min(n, 3)
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.7 * nrow), squeeze=False)
    for ax, (name, v) in zip(axes.flat, columns.items()):
        scatter(emb, v, name, ax=ax, colours=colours, axis_name=axis_name)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def strip_with_heatmap(
    images: np.ndarray | Sequence[np.ndarray] | None,
    expression: np.ndarray | None,
    gene_names: Sequence[str],
    step_labels: Sequence[str],
    title: str,
    row_labels: Sequence[str] | None = None,
    step_notes: Sequence[str] | None = None,
    x_title: str | None = None,
):
    """Rows of decoded images above a heatmap of genes (rows) x steps (columns).

    Parameters
    ----------
    images : (n, S, S, 3) float [0, 1], a list of such arrays (one image row each,
        e.g. a path step in its mean pose and in a real cell's pose), or None (a model
        trained without images: heatmap only).
    expression : (n, g) decoded log1p expression of the genes shown, or None.
    row_labels : one label per image row (shown left of the row), or None.
    step_notes : one short note per step, shown under the last image row (e.g. what
        the training crops nearest the step are), or None.
    x_title : the heatmap's x-axis title (what the steps are), or None.
    """
    n = len(step_labels)
    if step_notes is not None and len(step_notes) != n:
        raise ValueError(f"strip_with_heatmap: {len(step_notes)} notes for {n} steps")
    has_h = expression is not None and expression.shape[1] > 0
    rows = [] if images is None else ([images] if isinstance(images, np.ndarray) else list(images))
    has_i = bool(rows)
    if not (has_h or has_i):
        raise ValueError("strip_with_heatmap needs images or expression")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"strip_with_heatmap: {len(row_labels)} row labels for {len(rows)} rows")
    h_rows = max(1.0, 0.22 * len(gene_names)) if has_h else 0
    ratios = [1.2] * len(rows) + ([h_rows] if has_h else [])
    col_in = max(4, 1.1 * n) / n
    notes = [_wrap(t, col_in * 0.95) for t in step_notes] if step_notes is not None else None
    n_lines = max((t.count("\n") + 1 for t in notes), default=0) if notes else 0
    note_in = 0.16 * n_lines  # room under the last image row for the wrapped notes
    fig = plt.figure(figsize=(max(4, 1.1 * n), sum(ratios) + 0.6 + note_in))
    gs = fig.add_gridspec(
        len(ratios), n, height_ratios=ratios, hspace=0.2 + note_in / 1.2 if note_in else None
    )
    for r, imgs in enumerate(rows):
        for i in range(n):
            ax = fig.add_subplot(gs[r, i])
            ax.imshow(np.clip(imgs[i], 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(step_labels[i], fontsize=7)
            if i == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=7)
            if r == len(rows) - 1 and notes is not None:
                ax.set_xlabel(notes[i], fontsize=CAPTION_PT)
    if has_h:
        ax = fig.add_subplot(gs[len(ratios) - 1, :])
        im = ax.imshow(expression.T, aspect="auto", cmap="magma")
        ax.set_yticks(range(len(gene_names)))
        ax.set_yticklabels(gene_names, fontsize=7)
        ax.set_xticks(range(n))
        ax.set_xticklabels(step_labels, fontsize=7)
        if x_title:
            ax.set_xlabel(x_title, fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.9, label="log1p(decoded mean expr)")
    fig.suptitle(title, fontsize=9)
    return fig


def image_grid(
    rows: list[np.ndarray],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title,
    captions: Sequence[Sequence[str]] | None = None,
    row_labels_across: bool = False,
    cell_inches: float = 0.9,
):
    """Grid of images: one row per entry of ``rows`` ((n, S, S, 3) each); ``captions``
    (one list per row) writes a line under each image; ``row_labels_across`` writes the
    row labels horizontally left of the row (long labels) instead of up the first image;
    ``cell_inches`` is each image's size (inches). A row shorter than the longest leaves
    its last cells empty."""
    nr, nc = len(rows), max(len(r) for r in rows)
    left = 1.4 if row_labels_across else 0.0
    w = cell_inches
    caps = [[_wrap(c, w * 1.05) for c in row] for row in captions] if captions is not None else None
    n_lines = max((c.count("\n") + 1 for row in caps or [] for c in row if c), default=0)
    cap_in = 0.16 * n_lines  # room under each row for its wrapped captions
    fig, axes = plt.subplots(
        nr, nc, figsize=(w * nc + 0.8 + left, (w + cap_in) * nr + 0.6), squeeze=False
    )
    for r, imgs in enumerate(rows):
        for c in range(nc):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(np.clip(imgs[c], 0, 1))
                if caps is not None and c < len(caps[r]):
                    ax.set_xlabel(caps[r][c], fontsize=CAPTION_PT)
            elif c > 0:
                ax.axis("off")
            if c == 0 and row_labels_across:
                ax.set_ylabel(row_labels[r], fontsize=8, rotation=0, ha="right", va="center")
            elif c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
            if r == 0:
                ax.set_title(col_labels[c], fontsize=8)
    # title and column titles a fixed distance above the grid, whatever its height
    h = fig.get_figheight()
    fig.suptitle(title, fontsize=9, y=1 - 0.12 / h)
    fig.subplots_adjust(top=1 - 0.6 / h, hspace=(0.2 * w + cap_in) / w if cap_in else None)
    return fig


def _cell_text(ax, x: int, y: int, text: str, dark: bool) -> None:
    """A heatmap cell's number, white on a dark cell and black on a light one."""
    ax.text(x, y, text, ha="center", va="center", fontsize=6.5, color="white" if dark else "black")


def heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    vmin: float = -1.0,
    vmax: float = 1.0,
    cmap: str = "RdBu_r",
    annotate: bool = True,
    value_name: str | None = None,
):
    """Annotated heatmap (e.g. correlations in [-1, 1]); a NaN cell (not defined) is grey,
    so it does not read as the white of 0. ``value_name`` labels the colour bar; default
    "Spearman ρ" for a title naming Spearman, "correlation" for a -1..1 scale, else
    "value"."""
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(0.7 * len(col_labels) + 2.2, 0.32 * len(row_labels) + 1.4))
    cm = plt.get_cmap(cmap).with_extremes(bad="#bbbbbb")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cm, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=7)
    if annotate and m.size <= 600:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    # white on the dark ends of the colour map, black elsewhere
                    r, g, b, _ = cm(im.norm(m[i, j]))
                    _cell_text(
                        ax,
                        j,
                        i,
                        f"{m[i, j] + 0.0:.2f}".replace("-0.00", "0.00"),
                        0.299 * r + 0.587 * g + 0.114 * b < 0.5,
                    )
    if value_name is None:
        value_name = (
            "Spearman ρ"
            if "spearman" in title.lower()
            else "correlation"
            if (vmin, vmax) == (-1.0, 1.0)
            else "value"
        )
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label(value_name, fontsize=8)
    cb.ax.tick_params(labelsize=8)
    if annotate and np.isnan(m).any():
        ax.set_xlabel("grey: not defined (a constant feature or too few cells)", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def confusion_panels(panels: dict[str, tuple[Sequence[str], np.ndarray]], title: str):
    """Confusion matrices side by side, one panel per latent.

    Parameters
    ----------
    panels : name -> (classes, (C, C) int counts, row = true class, column = predicted)
    title : figure title

    Each cell shows its count; the colour is the share of the true class (row) that
    was predicted as the column's class, so a pale diagonal cell is a class the code
    does not separate whatever its size.
    """
    n = max(len(panels), 1)
    c_max = max((len(c) for c, _ in panels.values()), default=2)
    # compact cells and larger text: three panels side by side are shown at page width
    # (~60 % of a 0.45 in cell layout, where 7 pt labels read at ~5 px)
    side = 0.32 * c_max + 1.5
    # constrained layout: it places the shared colour bar, which tight_layout cannot
    fig, axes = plt.subplots(
        1, n, figsize=(side * n + 0.8, side + 0.4), squeeze=False, layout="constrained"
    )
    for ax, (name, (classes, conf)) in zip(axes[0], panels.items()):
        m = np.asarray(conf, dtype=float)
        share = m / np.maximum(m.sum(1, keepdims=True), 1)
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(classes)))
        ax.set_xticklabels([str(c)[:24] for c in classes], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)))
        ax.set_yticklabels([str(c)[:24] for c in classes], fontsize=8)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if m[i, j]:
                    _cell_text(ax, j, i, f"{int(m[i, j])}", share[i, j] > 0.6)
        right = np.trace(m) / max(m.sum(), 1)
        ax.set_title(f"{name} (accuracy {right:.2f}, n={int(m.sum())})", fontsize=9)
        ax.set_xlabel("predicted (kNN)", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    cb = fig.colorbar(im, ax=list(axes[0]), shrink=0.6) if panels else None
    if cb is not None:
        cb.set_label("share of the true class", fontsize=8)
        cb.ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def panel_lines(
    x: np.ndarray,
    panels: Sequence[tuple[str, dict[str, np.ndarray]]],
    xlabel: str,
    title: str,
    shade: np.ndarray | None = None,
):
    """Small multiples: one axis per measure, in its own units. ``panels``: (y-axis
    label with its unit, {line name: (len(x),) values}); lines that share a unit share a
    panel (a decoded measure beside the same measure on the nearest real crops). ``shade``
    (len(x),) bool greys the span around each marked x in every panel (e.g. path steps
    decoded by extrapolation). Why not one min-max scaled axis: a feature that moves by 5 %
    would rise as far as one that doubles."""
    from vae.analysis.palette import series_styles

    panels = [(lab, s) for lab, s in panels if s]
    n = max(len(panels), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.7 * rows), squeeze=False)
    xs = np.asarray(x, float)
    half = float(np.min(np.diff(np.sort(xs)))) / 2 if len(xs) > 1 else 0.0
    for ax, (ylabel, series) in zip(axes.flat, panels):
        if shade is not None and np.any(shade) and half > 0:
            for xi in xs[np.asarray(shade, bool)]:
                ax.axvspan(xi - half, xi + half, color="0.88", lw=0, zorder=0)
        for (name, y), style in zip(series.items(), series_styles(len(series))):
            ax.plot(xs, np.asarray(y, float), ms=4, lw=1.3, label=name, **style)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        # long handles: the dash pattern of each line shows in the legend; more than two
        # lines (the programs) cross the whole axis, so their legend goes under it
        below = len(series) > 2
        ax.legend(
            fontsize=8,
            frameon=False,
            handlelength=2.8,
            ncol=2 if below else 1,
            loc="upper center" if below else "best",
            bbox_to_anchor=(0.5, -0.28) if below else None,
        )
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def truth_scatter(x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, title: str):
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.scatter(x, y, s=6, alpha=0.7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
