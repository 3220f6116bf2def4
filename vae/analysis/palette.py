"""One colour and one marker per label, shared by every figure and by the study page.

The neutrophil lineage (:data:`vae.inputs.schema.MATURATION_ORDER`) gets a sequential
ramp from black (myeloblast) through purple, red and orange to pale yellow (segmented
neutrophil), so maturation reads left to right in every legend; each step differs from
the next by lightness as well as hue, so the ramp stays readable under deuteranopia,
protanopia and tritanopia (CIEDE2000 >= 17 between any two steps after a Machado 2009
simulation). The lineage is drawn as circles; the other white cells get their own
colour *and* marker shape, since colour alone cannot keep ten classes apart for every
reader; "unlabelled"-like labels are small light-grey dots. A label this module does
not know gets a colour from :data:`EXTRA` (Okabe-Ito / Paul Tol, no grey) and a marker
from :data:`EXTRA_MARKERS` by its rank in the sorted set of unknown labels, so callers
that draw several panels pass the *full* label set once (:func:`label_colours`,
:func:`label_markers`) and reuse the mappings, and a label keeps its style in every
panel even when a panel shows only some of the labels. Groupings that are not cell
labels (the data split, the modality of a row) use :func:`group_styles`; lines use
:func:`series_styles`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from vae.inputs.schema import MATURATION_ORDER, stage_name

# dark to light along maturation, inferno-like, tuned so that every two steps stay
# apart under the three colour-vision deficiencies (see the module docstring)
LINEAGE: dict[str, str] = dict(
    zip(
        MATURATION_ORDER,
        ("#000000", "#2d00a5", "#782d4b", "#c31e0f", "#e18700", "#e1e196"),
    )
)
# cold hues, away from the warm lineage ramp (Paul Tol vibrant/muted, Okabe-Ito sky)
OTHERS: dict[str, str] = {
    "lymphocyte": "#009988",  # teal
    "monocyte": "#56b4e9",  # sky blue
    "eosinophil": "#ee3377",  # magenta
    "basophil": "#aa4499",  # purple
    # real data names the mature cell so; known_colour reads it as a stage first
    # (stage_name: "neutrophil" is segmented_neutrophil), so this entry is that colour too
    "neutrophil": LINEAGE["segmented_neutrophil"],
}
MISSING = "#c8c8c8"  # unlabelled / unknown / empty
MISSING_NAMES = frozenset({"", "nan", "none", "unlabelled", "unlabeled", "unknown", "na"})
# for labels named nowhere above (real data ...), in sorted-label order; Okabe-Ito and
# Paul Tol colours picked in turn as far from the named ones as possible under each
# colour-vision deficiency; no grey (that is "unlabelled")
EXTRA = (
    "#e69f00",  # orange
    "#117733",  # green
    "#332288",  # indigo
    "#882255",  # wine
    "#0077bb",  # blue
    "#cc79a7",  # reddish purple
    "#cc3311",  # red
    "#f0e442",  # yellow
    "#999933",  # olive
    "#88ccee",  # cyan
)
# marker shapes: one shape for the lineage (told apart by its ramp), one per other white
# cell, and a cycle for the rest whose length (9) is prime to len(EXTRA) (10), so the
# first 90 unknown labels each get a distinct colour + marker pair
LINEAGE_MARKER = "o"
OTHER_MARKERS: dict[str, str] = {
    "lymphocyte": "s",
    "monocyte": "D",
    "eosinophil": "^",
    "basophil": "v",
    "neutrophil": LINEAGE_MARKER,
}
MISSING_MARKER = "."
EXTRA_MARKERS = ("P", "X", "p", "h", "<", ">", "*", "d", "H")
# a thin dark edge on every point: the pale end of the ramp (and yellow) stays visible
# on white
EDGE_COLOUR = "#222222"
EDGE_WIDTH = 0.3
# groupings that are not cell labels (split, modality): Okabe-Ito, apart for every reader
GROUP_COLOURS = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#56b4e9", "#cc79a7", "#000000")
GROUP_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
# lines (one series each): Okabe-Ito colours, with a line style and a marker per series
SERIES_COLOURS = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#000000")
SERIES_LINESTYLES = ("-", "--", ":", "-.")
SERIES_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h")


def normalise(label: object) -> str:
    """Label -> lookup key: lower case, spaces/dashes -> underscores, plural 's' kept;
    the brackets of a shown name ("(unlabelled)", :func:`display_label`) dropped."""
    k = str(label).strip().lower().replace(" ", "_").replace("-", "_")
    return k[1:-1] if k.startswith("(") and k.endswith(")") else k


def _stage(k: str) -> str | None:
    """The lineage stage a :func:`normalise`-d label names, in any spelling
    (:func:`vae.inputs.schema.stage_name`: "Promyelocytes", "PMY", "Segmented
    neutrophils", "Neutrophils"), or None.

    Paul15's "Neutrophils" (the real chain) are marrow neutrophil precursors, yet they
    keep the mature end's colour and circle: they had it before (as the "neutrophil" of
    :data:`OTHERS`), and the real chain's figures keep their colours; taking them as the
    stage only moves them in :func:`label_order` from after the other white cells to the
    lineage's mature end, beside the colour they are drawn in. Before, only an exact
    stage name was one: an audit's "Promyelocytes" got an extra colour 8.5 CIEDE2000
    from band's, and its "Neutrophils" came after its "Lymphocytes"."""
    return stage_name(k)


def known_colour(label: object) -> str | None:
    """The fixed colour of a label this module names (None for any other label): a
    stage of the lineage in any spelling (:func:`_stage`) has the stage's ramp colour."""
    k = normalise(label)
    if k in MISSING_NAMES:
        return MISSING
    stage = _stage(k)
    if stage is not None:
        return LINEAGE[stage]
    if k in OTHERS:
        return OTHERS[k]
    if k.endswith("s") and k[:-1] in OTHERS:  # "lymphocytes", "monocytes"
        return OTHERS[k[:-1]]
    return None


def label_order(labels: Iterable[object]) -> list[str]:
    """Distinct labels in display order: maturation order (a stage in any spelling,
    :func:`_stage`), other white cells, the rest sorted, unlabelled last."""
    uniq = sorted({str(v) for v in labels})
    rank = {k: i for i, k in enumerate([*LINEAGE, *OTHERS])}

    def key(lab: str) -> tuple[int, int, str]:
        k = normalise(lab)
        if k in MISSING_NAMES:
            return (3, 0, lab)
        stage = _stage(k)
        if stage is not None:
            return (0, rank[stage], lab)
        if k in rank:
            return (0, rank[k], lab)
        if k.endswith("s") and k[:-1] in rank:
            return (0, rank[k[:-1]], lab)
        return (1, 0, lab)

    return sorted(uniq, key=key)


def label_colours(labels: Iterable[object]) -> dict[str, str]:
    """Label -> hex colour for every distinct label of ``labels`` (see module docstring).

    Parameters
    ----------
    labels : all labels that any panel will show (strings or anything ``str()`` maps).

    Returns
    -------
    dict from ``str(label)`` to ``"#rrggbb"``, in :func:`label_order`.
    """
    return _by_label(labels, known_colour, EXTRA)


def _by_label(
    labels: Iterable[object], known: Callable[[str], str | None], extra: Sequence[str]
) -> dict[str, str]:
    """Label -> ``known(label)``, or for a label it does not name the next of ``extra``
    by the label's rank among the unknown ones, over the labels in :func:`label_order`."""
    out: dict[str, str] = {}
    unknown = 0
    for lab in label_order(labels):
        v = known(lab)
        if v is None:
            v = extra[unknown % len(extra)]
            unknown += 1
        out[lab] = v
    return out


def known_marker(label: object) -> str | None:
    """The fixed marker of a label this module names (None for any other label)."""
    k = normalise(label)
    if k in MISSING_NAMES:
        return MISSING_MARKER
    if _stage(k) is not None:
        return LINEAGE_MARKER
    if k in OTHER_MARKERS:
        return OTHER_MARKERS[k]
    if k.endswith("s") and k[:-1] in OTHER_MARKERS:
        return OTHER_MARKERS[k[:-1]]
    return None


def label_markers(labels: Iterable[object]) -> dict[str, str]:
    """Label -> matplotlib marker for every distinct label of ``labels``: the companion
    of :func:`label_colours` (same keys, same order, same rank of unknown labels), so
    ``(label_colours(x)[k], label_markers(x)[k])`` is the style of label ``k``."""
    return _by_label(labels, known_marker, EXTRA_MARKERS)


def group_styles(values: Iterable[object]) -> tuple[dict[str, str], dict[str, str]]:
    """(colours, markers) for the distinct values of a grouping that is not a cell label
    (split, modality), in sorted order: Okabe-Ito blue, orange, bluish green ... and a
    distinct marker each."""
    uniq = sorted({str(v) for v in values})
    colours = {v: GROUP_COLOURS[i % len(GROUP_COLOURS)] for i, v in enumerate(uniq)}
    markers = {v: GROUP_MARKERS[i % len(GROUP_MARKERS)] for i, v in enumerate(uniq)}
    return colours, markers


def point_style(colour: str, marker: str, size: float = 10.0) -> dict:
    """Matplotlib ``scatter`` keywords of one class: its colour and marker, a thin dark
    edge, and an unlabelled class (:data:`MISSING_MARKER`) smaller and without edge, so
    it stays in the background."""
    if marker == MISSING_MARKER:
        return {"s": size * 1.5, "color": colour, "marker": MISSING_MARKER, "linewidths": 0}
    return {
        "s": size,
        "color": colour,
        "marker": marker,
        "edgecolors": EDGE_COLOUR,
        "linewidths": EDGE_WIDTH,
    }


def series_styles(n: int) -> list[dict[str, str]]:
    """Matplotlib ``plot`` keywords (color, linestyle, marker) for ``n`` lines: no two of
    the first 252 share all three, and neighbours differ in all three."""
    return [
        {
            "color": SERIES_COLOURS[i % len(SERIES_COLOURS)],
            "linestyle": SERIES_LINESTYLES[i % len(SERIES_LINESTYLES)],
            "marker": SERIES_MARKERS[i % len(SERIES_MARKERS)],
        }
        for i in range(n)
    ]


# the abbreviations haematologists use for the granulocyte precursors, for labels under
# figure columns too narrow for the name ("promyelocyt" was cut mid-word)
ABBREVIATIONS: dict[str, str] = {
    "myeloblast": "MB",
    "promyelocyte": "PMY",
    "myelocyte": "MY",
    "metamyelocyte": "MMY",
    "segmented_neutrophil": "SEG",
}


def display_label(label: object) -> str:
    """``label`` as figures and tables show it: a row without a label
    (:data:`vae.inputs.schema.UNKNOWN_LABELS`) reads "(unlabelled)", not an empty name
    that a legend would drop."""
    from vae.inputs.schema import UNKNOWN_LABELS

    return "(unlabelled)" if str(label) in UNKNOWN_LABELS else str(label)


def short_label(label: object, width: int = 11) -> str:
    """``label`` in at most ``width`` characters, readable: as it is when it fits, else
    its abbreviation (:data:`ABBREVIATIONS`), else its leading whole words, else cut
    with a full stop ("Multipotent progenitors" -> "Multipotent")."""
    text = str(label).strip()
    if len(text) <= width:
        return text
    k = normalise(text)
    if k in ABBREVIATIONS:
        return ABBREVIATIONS[k]
    if k.endswith("s") and k[:-1] in ABBREVIATIONS:
        return ABBREVIATIONS[k[:-1]]
    words = text.replace("_", " ").split()
    kept = ""
    for w in words:
        nxt = f"{kept} {w}".strip()
        if len(nxt) > width:
            break
        kept = nxt
    return kept or text[: width - 1] + "."


def abbreviation_note(labels: Iterable[object], width: int = 11) -> str:
    """ "PMY promyelocyte, SEG segmented neutrophil" for the labels :func:`short_label`
    abbreviates ("" when none is)."""
    seen = {}
    for lab in labels:
        short = short_label(lab, width)
        if short != str(lab).strip() and short in ABBREVIATIONS.values():
            seen[short] = str(lab).strip().replace("_", " ")
    return ", ".join(f"{k} {v}" for k, v in seen.items())
