"""Figures stay readable for colour-blind readers and at their displayed size.

Colour-vision deficiencies are simulated as Machado, Oliveira & Fernandes (2009) at
severity 1 (linear sRGB); two classes count as apart when their CIEDE2000 difference
after the simulation is at least :data:`MIN_DE`, or when they are drawn with different
marker shapes.
"""

import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex, to_rgb

from tests.helpers.colour import VISIONS, delta_e
from vae.analysis import figures as F
from vae.analysis import palette as P
from vae.inputs.schema import MATURATION_ORDER

MIN_DE = 12.0  # CIEDE2000: well above "just noticeable" for small points
# the label sets of the demo chain and of the real chain (real_e2e)
DEMO_LABELS = [*MATURATION_ORDER, "lymphocyte", "monocyte", "eosinophil", "basophil", "unlabelled"]
REAL_LABELS = [
    "lymphocyte",
    "Monocytes",
    "eosinophil",
    "Basophils",
    "Neutrophils",
    "Erythrocyte",
    "GMP",
    "Megakaryocytes",
    "Multipotent progenitors",
    "",
]
# an audit's own spellings of the stages (stage_name): each takes its stage's ramp colour
AUDIT_LABELS = ["Promyelocytes", "Myelocytes", "band", "Neutrophils", "Lymphocytes", ""]


def _too_close(colours: dict, markers: dict) -> list:
    """Pairs of classes with the same marker whose colours are < MIN_DE apart under some
    vision."""
    bad = []
    for a, b in itertools.combinations(colours, 2):
        if markers[a] != markers[b]:
            continue
        for v in VISIONS:
            d = delta_e(colours[a], colours[b], v)
            if d < MIN_DE:
                bad.append((a, b, v, round(d, 1)))
    return bad


def _categorical(ax) -> dict:
    """legend label -> (facecolour hex, marker path vertices, edge width) of each class
    scatter of ``ax``."""
    out = {}
    for coll in ax.collections:
        lab = coll.get_label()
        if lab and not lab.startswith("_"):
            path = coll.get_paths()[0]
            out[lab] = (
                to_hex(coll.get_facecolor()[0]),
                np.round(path.vertices, 3).tobytes(),
                float(np.max(coll.get_linewidths())),
            )
    return out


@pytest.mark.parametrize(
    "labels", [DEMO_LABELS, REAL_LABELS, AUDIT_LABELS], ids=["demo", "real", "audit"]
)
def test_label_classes_stay_apart_under_colour_vision_deficiencies(labels):
    colours, markers = P.label_colours(labels), P.label_markers(labels)
    assert list(colours) == list(markers)  # one owner: same keys, same order
    assert _too_close(colours, markers) == []
    # the lineage ramp is drawn with one marker, so its colours alone must keep it apart
    ramp = {k: P.LINEAGE[k] for k in MATURATION_ORDER}
    assert _too_close(ramp, dict.fromkeys(ramp, "o")) == []


def test_scatter_draws_the_palette_styles_with_edges_and_readable_legend():
    rng = np.random.default_rng(0)
    labels = np.array(REAL_LABELS * 6 + DEMO_LABELS * 6)
    emb = rng.normal(size=(len(labels), 2))
    colours = P.label_colours(labels)
    fig = F.scatter(emb, labels, "label", colours=colours, axis_name="UMAP")
    drawn = _categorical(fig.axes[0])
    markers = P.label_markers(labels)
    assert len(drawn) == len(colours)
    shapes = {}
    for lab, (face, path, edge) in drawn.items():
        key = "" if lab == "(unlabelled)" else lab
        assert face == to_hex(colours[key])
        shapes.setdefault(markers[key], set()).add(path)
        if key not in ("", "unlabelled"):
            assert edge > 0  # a dark outline: the pale end of the ramp stays visible
    # one drawn shape per palette marker: the marker is what tells the classes apart
    assert all(len(s) == 1 for s in shapes.values())
    assert len({next(iter(s)) for s in shapes.values()}) == len(shapes)
    leg = fig.axes[0].get_legend()
    assert min(t.get_fontsize() for t in leg.get_texts()) >= 8
    # no unknown label is grey like "unlabelled"
    for c in P.EXTRA:
        assert delta_e(c, P.MISSING, "normal") >= MIN_DE
        r, g, b = to_rgb(c)
        assert max(r, g, b) - min(r, g, b) > 0.15, c  # a hue, not a grey


def test_split_and_modality_panels_use_a_safe_palette_and_markers():
    rng = np.random.default_rng(1)
    n = 60
    labels = np.array(DEMO_LABELS * 6)[:n]
    cols = {
        "label": labels,
        "split": np.array(["train", "val", "test"] * 20),
        "modality": np.array(["crop + profile", "crop only", "profile only"] * 20),
    }
    fig = F.scatter_panel(rng.normal(size=(n, 2)), cols, "t", colours=P.label_colours(labels))
    for ax in fig.axes[1:3]:
        drawn = _categorical(ax)
        assert len(drawn) == 3
        faces = [f for f, _, _ in drawn.values()]
        assert len({p for _, p, _ in drawn.values()}) == 3  # three marker shapes
        for a, b in itertools.combinations(faces, 2):
            for v in VISIONS:
                assert delta_e(a, b, v) >= MIN_DE, (a, b, v)
        assert min(t.get_fontsize() for t in ax.get_legend().get_texts()) >= 8


def test_lines_differ_by_style_not_only_by_hue():
    x = np.linspace(0, 1, 12)
    series = {f"feature {i}": np.sin(x * (i + 1)) for i in range(9)}
    fig = F.panel_lines(x, [("score", series)], "path position", "features")
    lines = [ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
    assert len(lines) == 9
    # every line has its own line style + marker pair, so no two rely on colour alone
    assert len({(ln.get_linestyle(), ln.get_marker()) for ln in lines}) == 9
    for a, b in itertools.combinations(lines, 2):
        same_style = a.get_linestyle() == b.get_linestyle() and a.get_marker() == b.get_marker()
        assert not same_style
    assert min(t.get_fontsize() for t in fig.axes[0].get_legend().get_texts()) >= 8


def test_path_features_keep_each_measure_in_its_units():
    """One panel per measure with its own axis: a 37.2 -> 38.9 px diameter is drawn on a
    px axis (not stretched over 0..1 beside a program that doubles), empty panels are
    dropped and the shaded steps are grey in every panel."""
    x = np.linspace(0, 1, 5)
    diam = np.array([37.2, 37.6, 38.0, 38.5, 38.9])
    fig = F.panel_lines(
        x,
        [
            ("cell diameter (px)", {"decoded": diam}),
            ("lobes", {}),
            ("program score", {"a": np.array([1.0, 2, 3, 4, 5]), "b": np.ones(5)}),
        ],
        "path position",
        "features",
        shade=np.array([True, False, False, False, False]),
    )
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in shown] == ["cell diameter (px)", "program score"]
    np.testing.assert_allclose(shown[0].get_lines()[0].get_ydata(), diam)
    lo, hi = shown[0].get_ylim()
    assert lo > 30 and hi < 45  # its own units, not 0..1
    assert [ln.get_label() for ln in shown[1].get_lines()] == ["a", "b"]
    assert all(len(ax.patches) == 1 for ax in shown)  # the one shaded step


def test_colour_bars_are_labelled_and_captions_readable():
    fig = F.heatmap(np.eye(3) * 0.5, list("abc"), list("xyz"), "Spearman: offset vs feature")
    assert fig.axes[-1].get_ylabel() == "Spearman ρ"
    fig = F.heatmap(np.eye(2), ["a", "b"], ["x", "y"], "h")
    assert fig.axes[-1].get_ylabel() == "correlation"
    imgs = [np.zeros((3, 8, 8, 3))] * 2
    caps = [["-3.0 sd * beyond data", "+0.0 sd", "no expression profile"]] * 2
    fig = F.image_grid(imgs, ["z0", "z1"], ["1", "2", "3"], "grid", captions=caps)
    texts = [ax.xaxis.label for ax in fig.axes if ax.get_xlabel()]
    assert texts and min(t.get_fontsize() for t in texts) >= 8
    fig = F.strip_with_heatmap(
        [np.zeros((3, 8, 8, 3))], None, [], ["a", "b", "c"], "t", step_notes=["x y", "z", "w"]
    )
    assert min(ax.xaxis.label.get_fontsize() for ax in fig.axes if ax.get_xlabel()) >= 8


def test_expression_embedding_is_readable(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from vae.inputs.expression import plot_embedding

    rng = np.random.default_rng(2)
    n = 40
    obs = pd.DataFrame(
        {
            "label": np.array(REAL_LABELS * 4)[:n],
            "maturation": rng.random(n),
            "score_primary": rng.normal(size=n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(np.zeros((n, 2), np.float32), obs=obs)
    adata.obsm["X_umap"] = rng.normal(size=(n, 2))
    seen = []
    save = Figure.savefig

    def keep(self, *args, **kw):
        seen.append((self, kw.get("dpi")))
        return save(self, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    plot_embedding(adata, tmp_path / "umap.png")
    ((fig, dpi),) = seen
    axes = [ax for ax in fig.axes if ax.get_title()]
    label_ax = next(ax for ax in axes if ax.get_title() == "label")
    leg = label_ax.get_legend()
    # >= 8 pt, at a dpi where that is >= 12 px
    assert min(t.get_fontsize() for t in leg.get_texts()) * dpi / 72 >= 12
    drawn = _categorical(label_ax)
    assert len({p for _, p, _ in drawn.values()}) >= 7  # marker shapes, not colour only
    for ax in axes:
        assert ax.get_xlabel() == "UMAP 1" and ax.get_ylabel() == "UMAP 2"
    bars = [ax.get_ylabel() for ax in fig.axes if ax not in axes]
    assert "primary program score" in bars and "maturation" in bars
