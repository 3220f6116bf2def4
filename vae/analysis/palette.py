"""One colour per label, shared by every figure and by the study page.

The neutrophil lineage (:data:`vae.inputs.schema.MATURATION_ORDER`) gets a sequential
ramp from dark purple (myeloblast) to yellow (segmented neutrophil), so maturation
reads left to right in every legend; the other white cells get fixed, clearly
different colours; "unlabelled"-like labels are light grey. A label this module does
not know gets a colour from :data:`EXTRA` by its rank in the sorted set of unknown
labels, so callers that colour several panels pass the *full* label set once
(:func:`label_colours`) and reuse the mapping, and a label keeps its colour in every
panel even when a panel shows only some of the labels.
"""

from __future__ import annotations

from collections.abc import Iterable

from vae.inputs.schema import MATURATION_ORDER

# sampled from matplotlib's "plasma" at 0.0, 0.2, ..., 0.9: ordered, colour-blind safe
LINEAGE: dict[str, str] = dict(
    zip(
        MATURATION_ORDER,
        ("#0d0887", "#5c01a6", "#9c179e", "#cc4778", "#ed7953", "#f0c82a"),
    )
)
OTHERS: dict[str, str] = {
    "lymphocyte": "#1b9e77",  # green
    "monocyte": "#377eb8",  # blue
    "eosinophil": "#a65628",  # brown
    "basophil": "#4d4d4d",  # dark grey
    "neutrophil": LINEAGE["segmented_neutrophil"],  # real data names the mature cell so
}
MISSING = "#c8c8c8"  # unlabelled / unknown / empty
MISSING_NAMES = frozenset({"", "nan", "none", "unlabelled", "unlabeled", "unknown", "na"})
# for labels named nowhere above (real data, splits ...), in sorted-label order
EXTRA = (
    "#e41a1c",
    "#4daf4a",
    "#ff7f00",
    "#66c2a5",
    "#8da0cb",
    "#e78ac3",
    "#a6d854",
    "#b3b3b3",
    "#1f78b4",
    "#b15928",
    "#6a3d9a",
    "#fb9a99",
)


def normalise(label: object) -> str:
    """Label -> lookup key: lower case, spaces/dashes -> underscores, plural 's' kept."""
    return str(label).strip().lower().replace(" ", "_").replace("-", "_")


def known_colour(label: object) -> str | None:
    """The fixed colour of a label this module names (None for any other label)."""
    k = normalise(label)
    if k in MISSING_NAMES:
        return MISSING
    if k in LINEAGE:
        return LINEAGE[k]
    if k in OTHERS:
        return OTHERS[k]
    if k.endswith("s") and k[:-1] in OTHERS:  # "lymphocytes", "monocytes"
        return OTHERS[k[:-1]]
    return None


def label_order(labels: Iterable[object]) -> list[str]:
    """Distinct labels in display order: maturation order, other white cells, the rest
    sorted, unlabelled last."""
    uniq = sorted({str(v) for v in labels})
    rank = {k: i for i, k in enumerate([*LINEAGE, *OTHERS])}

    def key(lab: str) -> tuple[int, int, str]:
        k = normalise(lab)
        if k in MISSING_NAMES:
            return (3, 0, lab)
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
    out: dict[str, str] = {}
    unknown = 0
    for lab in label_order(labels):
        c = known_colour(lab)
        if c is None:
            c = EXTRA[unknown % len(EXTRA)]
            unknown += 1
        out[lab] = c
    return out


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
