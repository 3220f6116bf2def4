"""study.html, report.html and samples.html for readers with a screen reader, a
keyboard, a touch screen, JavaScript off or a colour-vision deficiency.

An audit found: study.html's current-position ring red #d00, gone on the green GMP
cluster under simulated deuteranopia, and the caption calling it "the red circle"; a
blank page without JavaScript; cell details on mouseenter only; no lang, no aria on the
SVGs or the position line; every crop's alt "crop". report.html: no lang, row names in
<td>, alt a copy of the figcaption. samples.html: example crops with a title but no alt.
"""

import re

import numpy as np
import pandas as pd
import pytest

from tests.helpers.colour import contrast
from vae.analysis import palette as P
from vae.analysis.report import FigureItem, Section, TableItem, short_alt, write_report
from vae.analysis.study_page import StudyPageData, write_study_page


def _study(tmp_path, n=4, m=12):
    rng = np.random.default_rng(0)
    labels = np.array(["GMP", "Neutrophils", ""] * (m // 3))
    d = StudyPageData(
        s=np.linspace(0, 1, n),
        decoded=rng.random((n, 8, 8, 3)),
        rows=["program: primary", "Mpo"],
        values=rng.random((n, 2)),
        nearest=np.tile(np.arange(2), (n, 1)),
        emb=rng.normal(size=(m, 2)),
        labels=labels,
        cell_ids=np.array([f"c{i}" for i in range(m)]),
        crops=rng.integers(0, 255, (m, 8, 8, 3), dtype=np.uint8),
        has_crop=np.ones(m, bool),
        colours=P.label_colours(labels),
        markers=P.label_markers(labels),
        path_classes=["GMP", "Neutrophils"],
    )
    return write_study_page(tmp_path / "study.html", d, "t", "sub").read_text()


def test_study_page_has_lang_noscript_aria_and_no_red_circle(tmp_path):
    text = _study(tmp_path)
    assert '<html lang="en">' in text
    nos = re.search(r"<noscript>(.*?)</noscript>", text, re.S)
    assert nos and 'href="report.html"' in nos.group(1)
    assert "red circle" not in text and "#d00" not in text
    assert re.search(r'id="where"[^>]*aria-live="polite"', text)
    for svg in ("heat", "scatter"):
        tag = re.search(rf'<svg id="{svg}"[^>]*>', text).group(0)
        assert "aria-label=" in tag and "role=" in tag
    # every <img> in the markup and in the script's templates has a meaningful alt
    assert 'alt="crop"' not in text
    for tag in re.findall(r"<img\b[^>]*>", text):
        assert re.search(r'alt="[^"]+', tag), tag
    assert "'crop of ' + cellName(c)" in text  # "<label> cell <id>"
    # cells reachable without a mouse: focusable, with focus / click / key handlers
    assert "tabindex: 0" in text
    for ev in ("'focus'", "'click'", "'keydown'", "'mouseenter'"):
        assert f"addEventListener({ev}" in text
    assert "el('title'" in text  # a tooltip naming label and id on every point


@pytest.mark.parametrize("kind", [None, "deutan", "protan", "tritan"])
def test_position_ring_stands_off_every_label_colour(tmp_path, kind):
    """The ring is black on a white halo: against every label colour of the palette
    one of the two has contrast >= 3:1 (a red ring on GMP green under deuteranopia: ~1:1)."""
    text = _study(tmp_path)
    ring = re.search(r"el\('circle', \{id: 'here', [^}]*\}", text).group(0)
    halo = re.search(r"el\('circle', \{id: 'here-halo', [^}]*\}", text).group(0)
    assert "stroke: '#000'" in ring and "stroke: '#fff'" in halo
    colours = [*P.LINEAGE.values(), *P.OTHERS.values(), P.MISSING]
    for c in colours:
        assert max(contrast(c, "#000000", kind), contrast(c, "#ffffff", kind)) >= 3, c


def test_report_has_lang_row_headers_captions_and_short_alt(tmp_path):
    from PIL import Image

    png = tmp_path / "umap_labels.png"
    Image.new("RGB", (4, 4)).save(png)
    cap = "Embedding of the shared latent, coloured by label: every cell (a long story)."
    df = pd.DataFrame({"latent": ["joint", "image"], "knn": [0.9, 0.8]})
    out = write_report(
        tmp_path / "report.html",
        "R",
        [Section("S", tables=[TableItem("metrics", df)], figures=[FigureItem(png, cap)])],
    )
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html><html lang='en'>")
    assert '<th scope="row">joint</th>' in text and '<th scope="row">image</th>' in text
    assert '<caption class="sr">metrics</caption>' in text
    alt = re.search(r'<img alt="([^"]*)"', text).group(1)
    assert alt == "Embedding of the shared latent, coloured by label"
    assert alt != cap and len(alt) < len(cap)
    assert short_alt("x", "a_b.png") == "figure a b, described below"


def test_samples_page_crops_have_alt_and_the_page_a_lang(tmp_path):
    from vae.analysis.samples import sample_profile, write_samples_html

    n = 6
    obs = pd.DataFrame(
        {
            "vae_sample": ["a"] * n,
            "vae_label": ["myelocyte", "band"] * 3,
            "vae_call": ["myelocyte", "band", "myelocyte", "band", "unclassified", "band"],
            "vae_label_confidence": np.linspace(0.4, 1.0, n),
            "vae_modality": ["image"] * n,
            "vae_maturation": np.linspace(0, 1, n),
        },
        index=[f"q{i}" for i in range(n)],
    )
    crops = np.zeros((n, 8, 8, 3), np.uint8)
    page = tmp_path / "samples.html"
    write_samples_html(page, sample_profile(obs), obs, crops)
    text = page.read_text()
    assert "<html lang='en'>" in text
    imgs = re.findall(r"<img\b[^>]*>", text)
    assert len(imgs) == n
    for tag in imgs:
        alt = re.search(r'alt="([^"]+)"', tag).group(1)
        assert re.match(r"(myelocyte|band), confidence \d\.\d\d", alt), alt
    assert any("called unclassified" in t for t in imgs)
    # the histograms say what they show in words
    svgs = re.findall(r"<svg\b[^>]*>", text)
    assert svgs and all('role="img"' in s and "aria-label=" in s for s in svgs)


def test_study_page_draws_each_label_with_its_palette_marker(tmp_path):
    """The study page drew every class as a circle told apart by colour alone, while the
    report's figures give each class a marker too (accessibility audit)."""
    import json

    text = _study(tmp_path)
    data = json.loads(
        re.search(
            r'<script type="application/json" id="study-data">(.*?)</script>', text, re.S
        ).group(1)
    )
    labels = ["GMP", "Neutrophils", ""]
    assert data["markers"] == P.label_markers(labels)
    assert len(set(data["markers"].values())) == 3  # three labels, three shapes
    for m in ("'s'", "'D'", "'^'", "'P'", "'X'"):  # every marker the palette uses has a shape
        assert f"case {m}" in text
