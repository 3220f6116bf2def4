"""Self-contained HTML report: figures embedded as base64 PNG, tables inline.

A report is a list of :class:`Section`; each holds text, tables
(:class:`TableItem`) and figures (:class:`FigureItem`, each with a one-line
caption). :func:`write_report` reads every figure file and embeds it, so the
single ``report.html`` can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import html
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class FigureItem:
    path: Path  # PNG file to embed
    caption: str  # one line: what the figure shows


@dataclass
class TableItem:
    title: str
    frame: Any  # pandas.DataFrame
    caption: str = ""
    max_rows: int = 40
    # why a cell can be empty, shown under the table when one is ("n/a: <missing>");
    # columns empty in every row are left out, rows empty in every number column too
    missing: str = "not defined for this row"


def fmt_number(v: Any, digits: int = 3) -> str:
    """A number as a reader wants it: integers as integers, others to ``digits``
    significant digits without exponent between 1e-4 and 1e6; NaN/None -> "n/a".

    >>> fmt_number(0.02083205907050001), fmt_number(64.0), fmt_number(1234.567)
    ('0.0208', '64', '1235')
    """
    import math

    import numpy as np

    if v is None:
        return "n/a"
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, int | np.integer):
        return str(int(v))
    if not isinstance(v, float | np.floating):
        return str(v)
    v = float(v)
    if not math.isfinite(v):
        return "n/a" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v == 0:
        return "0"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if abs(v) < 10 ** (digits - 1):  # round first so 99.96 -> 100 (not "100.0")
        v = float(f"{v:.{digits - 1}e}")
    mag = math.floor(math.log10(abs(v)))
    if mag >= digits - 1 and abs(v) < 1e15:
        return str(int(round(v)))  # 1234.567 -> 1235: no spurious ".0", no exponent
    if mag < -4:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits - 1 - mag}f}"


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[TableItem] = field(default_factory=list)
    figures: list[FigureItem] = field(default_factory=list)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1150px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.tw{max-width:100%;overflow-x:auto;margin:.5em 0 1em}
table{border-collapse:collapse;font-size:.82em}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right;vertical-align:top}
th{background:#f3f3f3;max-width:9em}
td{white-space:nowrap} td.t{white-space:normal;text-align:left;max-width:30em}
th.t{text-align:left}
td:first-child,th:first-child{text-align:left}
figure{margin:1em 0;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#444;max-width:900px}
pre{background:#f7f7f7;padding:.6em;font-size:.78em;overflow-x:auto}
.caption{font-size:.85em;color:#555}
nav a{margin-right:1em}
tbody th{background:#fafafa;font-weight:normal;text-align:left;white-space:normal;max-width:30em}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
"""


def short_alt(caption: str, name: str, max_len: int = 90) -> str:
    """A figure's alt text: the first clause of its caption (to the first ":", ";", "("
    or sentence end; a caption of one sentence: to its first comma), at most ``max_len``
    characters cut at a word; the caption itself is the figcaption beside it, so a screen
    reader does not read it twice. A caption that cannot be shortened gives "figure
    <name>, described below".

    >>> short_alt("Held-out cells: masked input, joint reconstruction.", "recon.png")
    'Held-out cells'
    """
    import re

    head = re.split(r"[:;(]|\.\s|\.$", caption.strip(), maxsplit=1)[0].strip(" ,.")
    if len(head) > max_len:
        head = head[:max_len].rsplit(" ", 1)[0] + "\u2026"
    if head == caption.strip().rstrip(".") and ", " in head:  # one clause: its first part
        head = head.split(", ", 1)[0]
    if not head or head == caption.strip().rstrip("."):
        return f"figure {Path(name).stem.replace('_', ' ')}, described below"
    return head


def _img_tag(path: Path, caption: str) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"report: figure {path} does not exist")
    b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(short_alt(caption, path.name), quote=True)
    return (
        f'<figure data-file="{html.escape(path.name)}"><img alt="{alt}" '
        f'src="data:image/png;base64,{b64}"/><figcaption>{html.escape(caption)}'
        f" <small>({html.escape(path.name)})</small></figcaption></figure>"
    )


def _is_number_col(col) -> bool:
    return col.dtype.kind in "fiu"


def _table_html(t: TableItem) -> str:
    """A table with rounded numbers inside a box that scrolls by itself (never the page).

    Columns empty in every row and rows empty in every number column are left out
    (and said so); a cell that is still empty reads "n/a", explained under the table.
    """
    import pandas as pd

    df = t.frame.copy()
    notes = []
    empty_cols = [c for c in df.columns if df[c].isna().all()]
    if empty_cols and len(df):
        df = df.drop(columns=empty_cols)
        notes.append(f"left out, empty in every row: {', '.join(map(str, empty_cols))}")
    num = [c for c in df.columns if _is_number_col(df[c])]
    id_num = [c for c in num if c in ("n", "dim") or str(c).startswith("n_")]
    val = [c for c in num if c not in id_num]
    if val and len(df):
        dead = df[val].isna().all(axis=1)
        if dead.any():
            first = df.columns[0]
            names = ", ".join(str(v) for v in df.loc[dead, first].head(5))
            notes.append(
                f"left out, no value: {names}"
                if first not in num
                else f"{int(dead.sum())} row(s) with no value left out"
            )
            df = df[~dead]
    more = ""
    if len(df) > t.max_rows:
        more = (
            f'<p class="caption">showing {t.max_rows} of {len(df)} rows; full table in the CSV</p>'
        )
        df = df.head(t.max_rows)
    has_na = bool(len(df)) and bool(df.isna().to_numpy().any())

    def head(c) -> str:  # long snake_case names may break after an underscore
        return html.escape(str(c)).replace("_", "_<wbr>")

    text_cols = [not _is_number_col(df[c]) for c in df.columns]
    # a first column of names (or of ids: n, dim) labels its row: a row header
    row_head = bool(len(df.columns)) and (text_cols[0] or df.columns[0] in id_num)
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for j, (v, is_text) in enumerate(zip(rec, text_cols)):
            txt = "n/a" if (v is None or (isinstance(v, float) and pd.isna(v))) else fmt_number(v)
            if j == 0 and row_head:
                cells.append(f'<th scope="row">{html.escape(txt)}</th>')
                continue
            cls = ' class="t"' if is_text else ""  # text wraps and is left-aligned
            cells.append(f"<td{cls}>{html.escape(txt)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    body = (
        '<div class="tw"><table>'
        # the title names the table for a screen reader; it is shown as the heading above
        + f'<caption class="sr">{html.escape(t.title)}</caption><thead><tr>'
        + "".join(
            ("<th scope='col' class='t'>" if t else "<th scope='col'>") + f"{head(c)}</th>"
            for c, t in zip(df.columns, text_cols)
        )
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )
    if has_na:
        notes.append(f"n/a: {t.missing}")
    cap = f'<p class="caption">{html.escape(t.caption)}</p>' if t.caption else ""
    note = f'<p class="caption">{html.escape("; ".join(notes))}.</p>' if notes else ""
    return f"<h3>{html.escape(t.title)}</h3>{cap}{body}{note}{more}"


def write_report(
    path: str | Path,
    title: str,
    sections: list[Section],
    config: dict | None = None,
    subtitle: str = "",
) -> Path:
    """Write a self-contained ``report.html`` (atomically).

    Parameters
    ----------
    path : output file.
    title : page heading.
    sections : report body, in order.
    config : resolved run configuration, shown as JSON at the end.
    subtitle : a line under the title (run folder, date ...).

    Returns
    -------
    The path written. Raises FileNotFoundError naming a missing figure.
    """
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<p class="caption">{html.escape(subtitle)}</p>')
    anchors = [f"s{i}" for i in range(len(sections))]
    nav = "".join(f'<a href="#{a}">{html.escape(s.title)}</a>' for a, s in zip(anchors, sections))
    if config is not None:
        nav += '<a href="#config">Config</a>'
    parts.append(f"<nav>{nav}</nav>")
    for a, s in zip(anchors, sections):
        parts.append(f'<h2 id="{a}">{html.escape(s.title)}</h2>')
        if s.text:
            for para in s.text.strip().split("\n\n"):
                parts.append(f"<p>{html.escape(para)}</p>")
        for t in s.tables:
            parts.append(_table_html(t))
        for f in s.figures:
            parts.append(_img_tag(f.path, f.caption))
    if config is not None:
        blob = json.dumps(config, indent=2, default=str)
        parts.append(
            '<h2 id="config">Config</h2><details><summary>resolved configuration of this '
            f"run</summary><pre>{html.escape(blob, quote=False)}</pre></details>"
        )
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:  # temporary name, then rename: never a half-written report
        tmp.write_text("\n".join(parts), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
