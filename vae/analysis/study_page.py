"""``study.html``: one self-contained interactive page to walk the maturation path.

A slider moves along the Gaussian-process path of ``stage=traverse``; at each
position the page shows the decoded cell, the column of the gene-program heatmap
at that position (and where it sits in the whole heatmap) and the real crops whose
codes lie nearest to that point of the path. A latent scatter (the UMAP/PCA of
the shared latent) shows every cell in the label colours of the report
(:mod:`vae.analysis.palette`); hovering, clicking or focusing (Tab) a point shows that
cell's crop and labels, and the nearest cells of the current path position are ringed;
the path is drawn between the median positions of its classes (:func:`path_on_scatter`),
its current position a black ring on a white halo (seen on every label colour, under
every colour-vision deficiency). Without JavaScript the page says so and points to
``report.html``.

Everything is inline: data as JSON in the page, images as base64 PNG, plain
JavaScript and SVG; no server, no network, no library.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def png_data_uri(image: np.ndarray, upscale: int = 1) -> str:
    """(S, S, 3) float in [0, 1] or uint8 -> ``data:image/png;base64,...``.

    ``upscale`` enlarges by an integer factor (nearest) so small crops stay crisp.
    """
    from PIL import Image

    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    im = Image.fromarray(a)
    if upscale > 1:
        im = im.resize((a.shape[1] * upscale, a.shape[0] * upscale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class StudyPageData:
    """What the page shows; every array is row-aligned as documented.

    Attributes
    ----------
    s : (n,) path position in [0, 1] of each step.
    decoded : (n, S, S, 3) decoded cell at each step, float [0, 1].
    decoded_how : how those cells were drawn (a clause shown in the page's caption).
    rows : (g,) heatmap row names (programs first, then genes).
    values : (n, g) decoded value of each row at each step (log1p expression / score).
    nearest : (n, k) indices into the cell arrays of the k cells nearest to each step.
    emb : (m, 2) scatter coordinates of the cells.
    labels : (m,) label of each cell.
    cell_ids : (m,) id of each cell.
    crops : (m, S, S, 3) uint8 crop of each cell, or None; ``has_crop`` (m,) says
        which rows have one (expression-only cells have none).
    info : column name -> (m,) extra per-cell values shown on hover.
    colours : label -> "#rrggbb" (the report's palette).
    markers : label -> matplotlib marker of the report's palette
        (:func:`vae.analysis.palette.label_markers`), drawn as the same SVG shape; None:
        circles. Colour alone cannot tell 9-11 classes apart for every reader.
    axis_name : "UMAP" or "PCA".
    path_classes : the classes the path runs through, earliest first.
    supported : (n,) bool, steps whose decoded cell lies near codes of training cells
        with a crop (:func:`vae.analysis.traverse.image_support`), or None (not judged).
    drawn_from : (n,) what the training crops nearest each step are, e.g.
        "Neutrophils (80% of the 5)" (:func:`vae.analysis.traverse.neighbour_labels`),
        or None.
    path_xy : (n, 2) where each step is drawn on the scatter (:func:`path_on_scatter`),
        or None: at the mean position of its ``nearest`` cells.
    """

    s: np.ndarray
    decoded: np.ndarray
    rows: list[str]
    values: np.ndarray
    nearest: np.ndarray
    emb: np.ndarray
    labels: np.ndarray
    cell_ids: np.ndarray
    crops: np.ndarray | None
    has_crop: np.ndarray
    colours: dict[str, str]
    axis_name: str = "UMAP"
    path_classes: list[str] = field(default_factory=list)
    info: dict[str, np.ndarray] = field(default_factory=dict)
    # how ``decoded`` was drawn, said after "the cell decoded at that point" (e.g. posed)
    decoded_how: str = ""
    supported: np.ndarray | None = None
    drawn_from: list[str] | None = None
    path_xy: np.ndarray | None = None
    markers: dict[str, str] | None = None


def nearest_rows(points: np.ndarray, codes: np.ndarray, candidates: np.ndarray, k: int):
    """(n, k) indices (into ``codes``) of the ``k`` candidates nearest to each point.

    Parameters
    ----------
    points : (n, d) path points.
    codes : (m, d) cell codes.
    candidates : (c,) row indices allowed (e.g. cells with a crop).
    """
    from scipy.spatial.distance import cdist

    cand = np.asarray(candidates, dtype=np.int64)
    if cand.size == 0:
        return np.zeros((len(points), 0), np.int64)
    d = cdist(np.asarray(points, float), np.asarray(codes, float)[cand])
    k = min(k, cand.size)
    return cand[np.argsort(d, axis=1, kind="stable")[:, :k]]


def distinct_nearest(points: np.ndarray, codes: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(n,) one candidate row per point, none shown twice, nearest first.

    The (point, candidate) pairs are taken in order of distance; a point gets the
    nearest candidate that no nearer pair took. A strip of path steps then shows as
    many real cells as steps (the single nearest crop is often the same cell for half
    the path). Each point only needs its ``n`` nearest candidates: at most ``n - 1``
    are taken by the others. Fewer candidates than points: each point's nearest,
    repeats allowed.

    Parameters
    ----------
    points : (n, d) path points.
    codes : (m, d) cell codes.
    candidates : (c,) row indices allowed (e.g. cells with a crop), c >= 1.
    """
    from scipy.spatial.distance import cdist

    cand = np.asarray(candidates, dtype=np.int64)
    d = cdist(np.asarray(points, float), np.asarray(codes, float)[cand])
    n = len(d)
    if cand.size < n:
        return cand[d.argmin(axis=1)]
    top = np.argsort(d, axis=1, kind="stable")[:, :n]
    order = sorted((d[i, j], i, int(j)) for i in range(n) for j in top[i])
    out = np.full(n, -1, np.int64)
    used: set[int] = set()
    for _, i, j in order:
        if out[i] < 0 and j not in used:
            out[i] = j
            used.add(j)
    return cand[out]


def path_on_scatter(
    s: np.ndarray,
    knots_s: np.ndarray,
    emb: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
) -> np.ndarray | None:
    """(n, 2) scatter positions of the path steps: between the median positions of the
    classes the path runs through, linear in path position.

    The path runs through the class centroids in latent space, but a 2-D embedding has no
    place for a point between cells, and the cells nearest a step are a poor stand-in: in
    many dimensions a class whose codes spread widely (crops: stain, pose) has its mean
    far from every one of its cells, so a compact class nearby (expression profiles) holds
    the step's nearest cells, and the crops nearest a step through a class without crops
    lie in another class. So the path is drawn as the line through the classes' medians.

    Parameters
    ----------
    s : (n,) path position of each step in [0, 1].
    knots_s : (K,) path position of each class centroid (earliest class first).
    emb : (m, 2) scatter coordinates of the cells.
    labels : (m,) label of each cell.
    classes : (K,) the classes of the knots, in path order.

    Returns
    -------
    (n, 2) float, or None when a class has no cell on the scatter or the knots do not
    match the classes.
    """
    knots = np.asarray(knots_s, dtype=np.float64)
    lab = np.asarray(labels).astype(str)
    if len(knots) != len(classes) or len(knots) < 2:
        return None
    med = []
    for c in classes:
        sel = lab == str(c)
        if not sel.any():
            return None
        med.append(np.median(np.asarray(emb, dtype=np.float64)[sel], axis=0))
    med = np.stack(med)
    s = np.asarray(s, dtype=np.float64)
    return np.column_stack([np.interp(s, knots, med[:, j]) for j in range(2)])


def _json_value(v):
    if v is None:
        return None
    if isinstance(v, float | np.floating):
        return round(float(v), 4) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return str(v)


def page_payload(d: StudyPageData, upscale: int = 2) -> dict:
    """The JSON the page's script reads (images already as data URIs)."""
    n, m = len(d.s), len(d.labels)
    if d.decoded.shape[0] != n or d.values.shape != (n, len(d.rows)) or len(d.nearest) != n:
        raise ValueError(
            f"study page: {n} path steps but decoded {d.decoded.shape}, values "
            f"{d.values.shape} for {len(d.rows)} rows, nearest {np.shape(d.nearest)}"
        )
    if d.path_xy is not None and np.shape(d.path_xy) != (n, 2):
        raise ValueError(f"study page: {n} path steps but path_xy {np.shape(d.path_xy)}")
    if d.emb.shape != (m, 2) or len(d.cell_ids) != m or len(d.has_crop) != m:
        raise ValueError(f"study page: emb {d.emb.shape}, ids, has_crop must have {m} rows")
    vals = np.asarray(d.values, float)
    lo, hi = np.nanmin(vals, 0), np.nanmax(vals, 0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    cells = []
    for i in range(m):
        c = {
            "x": round(float(d.emb[i, 0]), 4),
            "y": round(float(d.emb[i, 1]), 4),
            "label": str(d.labels[i]),
            "id": str(d.cell_ids[i]),
            "info": {k: _json_value(v[i]) for k, v in d.info.items()},
        }
        if d.crops is not None and bool(d.has_crop[i]):
            c["crop"] = png_data_uri(d.crops[i], upscale)
        cells.append(c)
    return {
        "s": [round(float(x), 4) for x in d.s],
        "decoded": [png_data_uri(im, upscale) for im in d.decoded],
        "rows": list(d.rows),
        "values": [[_json_value(v) for v in r] for r in vals],
        "scaled": [[round(float(v), 4) for v in r] for r in (vals - lo) / span],
        "nearest": [[int(j) for j in r] for r in np.asarray(d.nearest)],
        "path_xy": (
            None
            if d.path_xy is None
            else [[round(float(v), 4) for v in p] for p in np.asarray(d.path_xy)]
        ),
        "cells": cells,
        "colours": dict(d.colours),
        "markers": dict(d.markers or {}),
        "axis": d.axis_name,
        "path_classes": list(d.path_classes),
        "supported": (
            [True] * n if d.supported is None else [bool(x) for x in np.asarray(d.supported)]
        ),
        "drawn_from": [""] * n if d.drawn_from is None else [str(x) for x in d.drawn_from],
    }


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1em auto;max-width:1300px;
color:#222;padding:0 1em}
h1{font-size:1.4em;margin:.2em 0} .cap{font-size:.85em;color:#555}
.row{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-start}
.panel{border:1px solid #ddd;border-radius:4px;padding:.6em;background:#fff}
#pos{width:100%} #decoded{width:192px;height:192px;image-rendering:pixelated;border:1px solid #eee}
#nearest img,#hover img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #eee}
#nearest figure{display:inline-block;margin:2px;text-align:center;font-size:.7em}
#genecol td{padding:1px 6px;font-size:.8em} #genecol td.v{text-align:right;font-family:monospace}
.bar{display:inline-block;height:9px;background:#7a5195}
#scatter [data-i]{stroke:none} #scatter .crop{stroke:#444;stroke-width:.7}
#scatter .near{stroke:#000;stroke-width:2}
#scatter [data-i]:focus{outline:none;stroke:#000;stroke-width:2.5}
#scatter [data-i]:focus-visible{stroke:#000;stroke-width:3}
.nojs{border:2px solid #000;padding:.6em;background:#fff8d0}
#hover{min-height:120px;font-size:.8em;width:220px} #legend{max-width:560px}
#legend span{margin-right:.8em;font-size:.8em;white-space:nowrap;display:inline-block}
"""

_JS = r"""
(function(){
const D = JSON.parse(document.getElementById('study-data').textContent);
const NS = 'http://www.w3.org/2000/svg';
const $ = (id) => document.getElementById(id);
function el(tag, attrs){ const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]); return e; }
// colour ramp for the heatmap (dark -> bright), t in [0, 1]
const RAMP = [[13,8,135],[126,3,168],[204,71,120],[248,149,64],[240,249,33]];
function ramp(t){ if (t === null || isNaN(t)) return '#ddd';
  t = Math.max(0, Math.min(1, t)) * (RAMP.length - 1); const i = Math.min(Math.floor(t), RAMP.length - 2);
  const f = t - i, a = RAMP[i], b = RAMP[i + 1];
  return 'rgb(' + a.map((v, j) => Math.round(v + f * (b[j] - v))).join(',') + ')'; }
function esc(t){ return String(t).replace(/[&<>"]/g, ch => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[ch])); }
function cellName(c){ return (c.label || 'unlabelled') + ' cell ' + c.id; }
function fmt(v){ if (v === null || v === undefined) return 'n/a';
  if (typeof v !== 'number') return String(v); if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3); }

// ---- heatmap (rows x steps) with the current column outlined
const n = D.s.length, g = D.rows.length, cw = 14, ch = 14, lw = 150;
const heat = $('heat'); heat.setAttribute('width', lw + n * cw + 4); heat.setAttribute('height', g * ch + 18);
heat.setAttribute('role', 'img');
heat.setAttribute('aria-label', 'heatmap of ' + g + ' decoded values (rows) at ' + n +
  ' path positions (columns), each row scaled 0 to 1; the outlined column is the current position; ' +
  'the table above lists its values');
D.rows.forEach((r, i) => { const t = el('text', {x: lw - 4, y: i * ch + 11, 'text-anchor': 'end', 'font-size': 10});
  t.textContent = r; heat.appendChild(t);
  for (let j = 0; j < n; j++) heat.appendChild(el('rect', {x: lw + j * cw, y: i * ch, width: cw, height: ch,
    fill: ramp(D.scaled[j][i])})); });
const colbox = el('rect', {id: 'colbox', x: lw, y: 0, width: cw, height: g * ch, fill: 'none', stroke: '#000', 'stroke-width': 2});
heat.appendChild(colbox);
const sl = el('text', {x: lw, y: g * ch + 14, 'font-size': 10}); sl.textContent = 'path position 0 \u2192 1';
heat.appendChild(sl);

// ---- scatter
const W = 560, H = 460, P = 30, sc = $('scatter');
sc.setAttribute('viewBox', '0 0 ' + W + ' ' + H); sc.setAttribute('width', W); sc.setAttribute('height', H);
sc.setAttribute('role', 'group');
sc.setAttribute('aria-label', D.axis + ' of the shared latent: ' + D.cells.length +
  ' cells coloured by label; Tab to a cell or click it for its crop and labels');
const xs = D.cells.map(c => c.x), ys = D.cells.map(c => c.y);
const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
const X = (x) => P + (x - x0) / ((x1 - x0) || 1) * (W - 2 * P);
const Y = (y) => H - P - (y - y0) / ((y1 - y0) || 1) * (H - 2 * P);
const ax = el('text', {x: W / 2, y: H - 6, 'text-anchor': 'middle', 'font-size': 11}); ax.textContent = D.axis + ' 1'; sc.appendChild(ax);
const ay = el('text', {x: 12, y: H / 2, 'font-size': 11, transform: 'rotate(-90 12 ' + H / 2 + ')', 'text-anchor': 'middle'});
ay.textContent = D.axis + ' 2'; sc.appendChild(ay);
// a label's marker of the report's palette (matplotlib's name) as an SVG shape at (x, y)
function ring(n, x, y, r, turn, inner){ const p = [];
  for (let k = 0; k < n * (inner ? 2 : 1); k++) { const a = turn + Math.PI * k / (inner ? n : n / 2);
    const q = inner && k % 2 ? r * inner : r;
    p.push((x + q * Math.sin(a)).toFixed(1) + ',' + (y - q * Math.cos(a)).toFixed(1)); }
  return el('polygon', {points: p.join(' ')}); }
function cross(x, y, r, turn){ const w = r * 0.38, c = Math.cos(turn), s = Math.sin(turn);
  const q = [[-w,-r],[w,-r],[w,-w],[r,-w],[r,w],[w,w],[w,r],[-w,r],[-w,w],[-r,w],[-r,-w],[-w,-w]];
  return el('polygon', {points: q.map(([a, b]) => (x + a * c - b * s).toFixed(1) + ',' + (y + a * s + b * c).toFixed(1)).join(' ')}); }
function mark(m, x, y, r){
  switch (m) {
    case 's': return el('rect', {x: x - 0.85 * r, y: y - 0.85 * r, width: 1.7 * r, height: 1.7 * r});
    case 'D': case 'd': return ring(4, x, y, 1.2 * r, 0);
    case '^': return ring(3, x, y, 1.25 * r, 0);
    case 'v': return ring(3, x, y, 1.25 * r, Math.PI);
    case '<': return ring(3, x, y, 1.25 * r, -Math.PI / 2);
    case '>': return ring(3, x, y, 1.25 * r, Math.PI / 2);
    case 'p': return ring(5, x, y, 1.1 * r, 0);
    case 'h': case 'H': return ring(6, x, y, 1.1 * r, m === 'H' ? Math.PI / 6 : 0);
    case '*': return ring(5, x, y, 1.4 * r, 0, 0.45);
    case 'P': return cross(x, y, 1.15 * r, 0);
    case 'X': return cross(x, y, 1.15 * r, Math.PI / 4);
    case '.': return el('circle', {cx: x, cy: y, r: 0.6 * r});
    default: return el('circle', {cx: x, cy: y, r: r});
  } }
const dots = D.cells.map((c, i) => { const d = mark(D.markers[c.label], X(c.x), Y(c.y), 3.2);
  for (const [k, v] of Object.entries({fill: D.colours[c.label] || '#888', 'data-i': i, tabindex: 0,
    role: 'button', 'aria-label': cellName(c)})) d.setAttribute(k, v);
  if (c.crop) d.classList.add('crop');
  const t = el('title', {}); t.textContent = cellName(c); d.appendChild(t);
  sc.appendChild(d); return d; });
// the path: between the medians of the classes it runs through (path_on_scatter), else
// through the mean position of each step's nearest cells
const pathXY = D.path_xy ? D.path_xy.map(p => [X(p[0]), Y(p[1])])
  : D.nearest.map(nb => nb.length ? [nb.reduce((a, j) => a + X(D.cells[j].x), 0) / nb.length,
  nb.reduce((a, j) => a + Y(D.cells[j].y), 0) / nb.length] : null).filter(p => p);
if (pathXY.length > 1) sc.appendChild(el('polyline', {points: pathXY.map(p => p.join(',')).join(' '),
  fill: 'none', stroke: '#000', 'stroke-width': 1.5, 'stroke-dasharray': '4 3'}));
// the current position: a black ring on a white halo, seen on every label colour
const halo = el('circle', {id: 'here-halo', r: 7, fill: 'none', stroke: '#fff', 'stroke-width': 6,
  'pointer-events': 'none'}); sc.appendChild(halo);
const here = el('circle', {id: 'here', r: 7, fill: 'none', stroke: '#000', 'stroke-width': 2.5,
  'pointer-events': 'none'}); sc.appendChild(here);
function showCell(i){ const c = D.cells[i]; const h = $('hover');
  let s = (c.crop ? '<img alt="' + esc('crop of ' + cellName(c)) + '" src="' + c.crop + '"/>' : '<p>(no image: expression-only cell)</p>') +
    '<div><b>' + esc(c.label || '(no label)') + '</b><br/>' + esc(c.id);
  for (const k in c.info) if (c.info[k] !== null) s += '<br/>' + esc(k) + ': ' + esc(fmt(c.info[k]));
  h.innerHTML = s + '</div>'; h.setAttribute('data-cell', c.id); }
dots.forEach((d, i) => { d.addEventListener('mouseenter', () => showCell(i));
  d.addEventListener('focus', () => showCell(i)); d.addEventListener('click', () => showCell(i));
  d.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); showCell(i); } }); });
const legend = $('legend');
Object.keys(D.colours).forEach(k => { const s = document.createElement('span');
  const sw = el('svg', {width: 12, height: 12, 'aria-hidden': 'true'}), m = mark(D.markers[k], 6, 6, 4.4);
  m.setAttribute('fill', D.colours[k]); m.setAttribute('stroke', '#222'); m.setAttribute('stroke-width', 0.5);
  sw.appendChild(m); s.appendChild(sw); s.appendChild(document.createTextNode(' ' + (k || '(no label)')));
  legend.appendChild(s); });
if (D.cells.some(c => c.crop)) { const s = document.createElement('span');
  s.innerHTML = '<svg width="10" height="10" aria-hidden="true"><circle cx="5" cy="5" r="4" fill="#fff" stroke="#444"/></svg> outlined: has a crop';
  legend.appendChild(s); }

// ---- the slider
function update(j){
  j = Number(j); $('decoded').src = D.decoded[j];
  $('decoded').alt = 'cell decoded at path position ' + D.s[j].toFixed(2);
  $('where').textContent = 'position ' + D.s[j].toFixed(2) + ' (step ' + (j + 1) + ' of ' + n + ')'
    + (D.supported[j] ? '' : ': no training cell with a crop lies near this point; the decoded cell is the decoder\u2019s extrapolation')
    + (D.drawn_from[j] ? (D.supported[j] ? '; drawn from labelled training crops like: '
        : '; the nearest labelled training crops, all far from it: ') + D.drawn_from[j] : '');
  colbox.setAttribute('x', lw + j * cw);
  const tb = $('genecol'); tb.innerHTML = '';
  D.rows.forEach((r, i) => { const tr = document.createElement('tr'); const v = D.values[j][i];
    tr.setAttribute('data-value', v === null ? '' : v);
    tr.innerHTML = '<td>' + esc(r) + '</td><td class="v">' + fmt(v) + '</td><td><span class="bar" style="width:' +
      Math.round(80 * D.scaled[j][i]) + 'px;background:' + ramp(D.scaled[j][i]) + '"></span></td>';
    tb.appendChild(tr); });
  const nb = $('nearest'); nb.innerHTML = '';
  dots.forEach(d => d.classList.remove('near'));
  D.nearest[j].forEach(k => { const c = D.cells[k]; dots[k].classList.add('near');
    sc.insertBefore(dots[k], halo);  // ringed cells on top of the others, under the marker
    const f = document.createElement('figure');
    f.innerHTML = (c.crop ? '<img alt="' + esc('crop of ' + cellName(c)) + '" src="' + c.crop + '"/>' : '') + '<figcaption>' + (c.label ? esc(c.label) : '(unlabelled)') + '</figcaption>';
    nb.appendChild(f); });
  if (pathXY[j]) { for (const r of [halo, here]) { r.setAttribute('cx', pathXY[j][0]); r.setAttribute('cy', pathXY[j][1]); } }
}
const pos = $('pos'); pos.max = n - 1; pos.value = 0;
pos.addEventListener('input', () => update(pos.value));
update(0);
document.body.setAttribute('data-ready', '1');
})();
"""


def write_study_page(
    path: str | Path,
    data: StudyPageData,
    title: str,
    subtitle: str = "",
    notes: Sequence[str] = (),
) -> Path:
    """Write the self-contained ``study.html`` (atomically).

    Parameters
    ----------
    path : output file (next to ``report.html``).
    data : what the page shows.
    title, subtitle : heading and a line under it.
    notes : paragraphs under the subtitle (what the data cannot show).

    Returns
    -------
    The path written.
    """
    from segmentation.io import atomic_path

    payload = script_json(page_payload(data))
    classes = " \u2192 ".join(data.path_classes) if data.path_classes else "the path"
    body = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<link rel="icon" href="data:,"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><h1>{html.escape(title)}</h1><p class="cap">{html.escape(subtitle)}</p>
<noscript><p class="nojs">This page draws everything with JavaScript, which is off in
this browser: switch it on to walk the path, or open <a href="report.html">report.html</a>
next to this file, which has the same figures as static images.</p></noscript>
{"".join(f'<p class="cap">{html.escape(str(n))}</p>' for n in notes)}
<p class="cap">Drag the slider along the Gaussian-process path through the class centroids
({html.escape(classes)}). The panels below show, for that point: the cell decoded at that point
of the latent space{html.escape(data.decoded_how)}; the decoded gene-program and granule-gene values
there (the outlined column of the heatmap); the real cells whose codes lie nearest to that point
(the panels wrap to the window's width). Hover over, click or tap a point of the scatter (or
reach it with the Tab key) to see that cell's crop and labels; the ringed points are those real
cells. The dashed line is a schematic of the path, drawn between the median positions of its
classes (the path runs in the latent space, where a 2-D map has no place for points between
cells), and the black ring with a white edge the current position on it.</p>
<div class="panel"><input type="range" id="pos" min="0" step="1" aria-label="path position"/>
<div id="where" class="cap" aria-live="polite"></div></div>
<div class="row">
<div class="panel"><div class="cap">decoded cell</div><img id="decoded" alt="decoded cell"/></div>
<div class="panel"><div class="cap">decoded values at this position: log1p of the decoded mean<br>expression (a gene seen in few cells reads higher than the mean<br>of its log values); bar: where the value lies in its own row's<br>range along the path, not its level</div>
<table><tbody id="genecol"></tbody></table></div>
<div class="panel"><div class="cap">nearest real cells</div><div id="nearest"></div></div>
</div>
<div class="row">
<div class="panel"><div class="cap">heatmap along the path (each row scaled 0..1)</div>
<svg id="heat" xmlns="http://www.w3.org/2000/svg" role="img"
aria-label="heatmap of the decoded values along the path"></svg></div>
</div>
<div class="row">
<div class="panel"><div class="cap">{html.escape(data.axis_name)} of the shared latent
({len(data.labels)} cells)</div><svg id="scatter" xmlns="http://www.w3.org/2000/svg" role="group"
aria-label="{html.escape(data.axis_name)} of the shared latent, coloured by label"></svg>
<div id="legend"></div></div>
<div class="panel" id="hover" aria-live="polite"><span class="cap">hover over, click or Tab to
a cell</span></div>
</div>
<script type="application/json" id="study-data">{payload}</script>
<script>{_JS}</script></body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(body, encoding="utf-8")
    return path


def script_json(obj) -> str:
    """``obj`` as JSON to put inside a ``<script>`` element: ``<``, ``>`` and ``&`` as
    ``\\u003c`` ... (JSON.parse reads them back), so no string of the data (a class,
    sample or file name) can end the element (``</script>``) or switch the parser into
    the state ``<!--<script>`` starts, where the page's own ``</script>`` no longer
    closes it and the page drew nothing; U+2028 / U+2029 as escapes too."""
    text = json.dumps(obj, separators=(",", ":"))
    for ch in "<>&\u2028\u2029":
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text


def sample_rows(n: int, max_n: int, seed: int, keep: Sequence[int] = ()) -> np.ndarray:
    """Sorted row indices: all ``n`` rows, or ``max_n`` random ones plus ``keep``."""
    if n <= max_n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    pick = rng.choice(n, max_n, replace=False)
    return np.unique(np.r_[pick, np.asarray(keep, np.int64)])
