"""One colour per label in every figure; numbers rounded; tables without half-empty rows."""

import re

import numpy as np
import pandas as pd
from matplotlib.colors import to_hex

from vae.analysis import figures as F
from vae.analysis.palette import LINEAGE, MISSING, label_colours, label_order
from vae.analysis.report import Section, TableItem, fmt_number, write_report
from vae.inputs.schema import MATURATION_ORDER


def _colours_of(fig) -> list[dict[str, str]]:
    """label -> facecolour of every categorical scatter in each axes of ``fig``."""
    out = []
    for ax in fig.axes:
        d = {}
        for coll in ax.collections:
            lab = coll.get_label()
            if lab and not lab.startswith("_") and len(coll.get_facecolor()):
                d[lab] = to_hex(coll.get_facecolor()[0])
        if d:
            out.append(d)
    return out


def test_a_label_has_one_colour_in_every_panel():
    rng = np.random.default_rng(0)
    labels = np.array(
        ["band", "myeloblast", "lymphocyte", "Platelet-ish", "unlabelled", "monocyte"] * 10
    )
    emb = rng.normal(size=(len(labels), 2))
    colours = label_colours(labels)  # once, from all rows (as stage=evaluate does)
    # the image-only panel sees a subset: band and an unknown label, without myeloblast
    sub = np.isin(labels, ["band", "Platelet-ish", "monocyte"])
    fig_all = F.scatter_panel(emb, {"label": labels}, "all", colours=colours, axis_name="UMAP")
    fig_sub = F.scatter_panel(emb[sub], {"label": labels[sub]}, "sub", colours=colours)
    fig_default = F.scatter(emb[sub], labels[sub], "no mapping given")
    (a,), (b,), (c,) = _colours_of(fig_all), _colours_of(fig_sub), _colours_of(fig_default)
    for lab in b:
        assert a[lab] == b[lab] == colours[lab]
    # a known label keeps its colour even without a shared mapping
    assert c["band"] == a["band"] == LINEAGE["band"]
    ax = fig_all.axes[0]
    assert ax.get_xlabel() == "UMAP 1" and ax.get_ylabel() == "UMAP 2"


def test_palette_follows_maturation_and_greys_unlabelled():
    shuffled = list(reversed(MATURATION_ORDER)) + ["zeta", "unknown", "alpha", "eosinophil"]
    order = label_order(shuffled)
    assert order[: len(MATURATION_ORDER)] == list(MATURATION_ORDER)
    assert order[-1] == "unknown"
    pal = label_colours(shuffled)
    assert pal["unknown"] == MISSING
    assert len(set(pal.values())) == len(pal)  # distinct colours
    # real data spellings map to the same colours
    assert (
        label_colours(["LYMPHOCYTE"])["LYMPHOCYTE"] == label_colours(["lymphocytes"])["lymphocytes"]
    )
    # lineage colours get brighter along maturation (a ramp, not a random set)
    lum = [np.mean([int(LINEAGE[k][i : i + 2], 16) for i in (1, 3, 5)]) for k in MATURATION_ORDER]
    assert lum[-1] > lum[0]


def test_any_spelling_of_a_stage_has_its_ramp_colour_and_place():
    """stage_name spellings (an audit's "Promyelocytes", "Neutrophils"; "PMY", "Segmented
    neutrophils") are the stage: its colour, the lineage's circle and its place in the
    maturation order, not an extra colour 8.5 CIEDE2000 from band's, nor "Neutrophils"
    after "Lymphocytes"."""
    from vae.analysis.palette import LINEAGE_MARKER, known_colour, label_markers

    audit = ["Lymphocytes", "Neutrophils", "band", "Myelocytes", "Promyelocytes"]
    pal, markers = label_colours(audit), label_markers(audit)
    assert pal["Promyelocytes"] == LINEAGE["promyelocyte"] == known_colour("promyelocyte")
    assert pal["Myelocytes"] == LINEAGE["myelocyte"]
    assert pal["Neutrophils"] == LINEAGE["segmented_neutrophil"]
    assert {markers[k] for k in ("Promyelocytes", "Myelocytes", "band", "Neutrophils")} == {
        LINEAGE_MARKER
    }
    assert label_order(audit) == [
        "Promyelocytes",
        "Myelocytes",
        "band",
        "Neutrophils",
        "Lymphocytes",
    ]
    for spelling, stage in [
        ("PMY", "promyelocyte"),
        ("Segmented neutrophils", "segmented_neutrophil"),
        ("Metamyelocytes", "metamyelocyte"),
        ("neutrophil", "segmented_neutrophil"),
    ]:
        assert known_colour(spelling) == LINEAGE[stage]
    # the canonical names keep their colours; the real chain's (Paul15) labels keep theirs,
    # "Neutrophils" now first, at the lineage's mature end
    real = ["lymphocyte", "Monocytes", "eosinophil", "Basophils", "Neutrophils", "GMP", ""]
    pal = label_colours(real)
    assert pal["Neutrophils"] == "#e1e196" and pal["Monocytes"] == "#56b4e9"
    assert pal["GMP"] == "#e69f00"  # the first colour for a label named nowhere
    assert label_order(real)[:2] == ["Neutrophils", "lymphocyte"]


def test_numbers_are_rounded_to_three_significant_digits():
    cases = {
        0.02083205907050001: "0.0208",
        64.0: "64",
        7: "7",
        np.int64(12): "12",
        1234.567: "1235",
        0.5: "0.500",
        -0.123456: "-0.123",
        99.96: "100",
        0.99996: "1.00",
        float("nan"): "n/a",
        None: "n/a",
        "text": "text",
    }
    for v, want in cases.items():
        assert fmt_number(v) == want, (v, fmt_number(v), want)


def test_tables_drop_empty_columns_and_explain_missing_cells(tmp_path):
    df = pd.DataFrame(
        {
            "what": ["joint", "image", "nothing"],
            "n": [64.0, 10, 3],
            "pearson": [0.812345, 0.4, np.nan],
            "nb_loglik": [-1.23456, np.nan, np.nan],
            "all_empty": [np.nan, np.nan, np.nan],
        }
    )
    out = write_report(
        tmp_path / "r.html",
        "t",
        [Section("s", tables=[TableItem("rec", df, missing="no count model for this row")])],
    )
    html = out.read_text()
    table = html[html.index("<table>") : html.index("</table>")]
    assert "all_empty" not in table  # empty in every row: left out, and said so
    assert "left out, empty in every row: all_empty" in html
    assert "nothing" not in table and "left out, no value: nothing" in html
    # body cells, each row's name a row header (<th scope="row">)
    cells = re.findall(r'<(?:td|th scope="row")[^>]*>([^<]*)</t[dh]>', table)
    assert cells == ["joint", "64", "0.812", "-1.23", "image", "10", "0.400", "n/a"]
    assert "n/a: no count model for this row" in html
    assert 'class="tw"' in html  # the table scrolls inside its box, not the page


def test_short_labels_stay_readable_under_narrow_figure_columns():
    """Names that do not fit are abbreviated as haematologists do, or kept to whole
    words, never cut mid-word ("promyelocyt" in the path figure before)."""
    from vae.analysis.palette import abbreviation_note, short_label

    assert short_label("myelocyte") == "myelocyte"  # fits: unchanged
    assert short_label("promyelocyte") == "PMY"
    assert short_label("segmented_neutrophil") == "SEG"
    assert short_label("Metamyelocytes") == "MMY"
    assert short_label("Multipotent progenitors") == "Multipotent"
    assert short_label("Erythroblastic") == "Erythrobla."
    assert short_label("") == ""
    note = abbreviation_note(["promyelocyte", "band", "segmented_neutrophil", "promyelocyte"])
    assert note == "PMY promyelocyte, SEG segmented neutrophil"
    assert abbreviation_note(["band", "myelocyte"]) == ""
