"""What an audit of untrusted strings (2026-12-05) found: sample folder names, obs values,
file and class names reach study.html, TensorBoard's text tab and the CSVs a lab opens
in a spreadsheet. A class named ``</script><!--<script>`` left study.html blank (the
inline JSON swallowed the page's script); a class named ``<img src=...>`` was an image
fetching that address in TensorBoard's evaluate tables; a sample folder named
``=HYPERLINK(...)`` was a formula in samples.csv. report.html and samples.html escaped
every such string already (checked on a real embed and traverse run)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from vae.analysis import palette as P
from vae.analysis.study_page import StudyPageData, script_json, write_study_page

EVIL = [
    "<img src=x onerror=alert(1)>",
    "</script><!--<script>\"'&\u2028",
    "GMP",
]


def _page(tmp_path) -> str:
    rng = np.random.default_rng(0)
    labels = np.array(EVIL * 4)
    d = StudyPageData(
        s=np.linspace(0, 1, 3),
        decoded=rng.random((3, 8, 8, 3)),
        rows=["program: primary", "<b>Mpo</b>"],
        values=rng.random((3, 2)),
        nearest=np.tile(np.arange(2), (3, 1)),
        emb=rng.normal(size=(12, 2)),
        labels=labels,
        cell_ids=np.array([f"c{i}</script>" for i in range(12)]),
        crops=rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8),
        has_crop=np.ones(12, bool),
        colours=P.label_colours(labels),
        markers=P.label_markers(labels),
        path_classes=["GMP", EVIL[1]],
    )
    return write_study_page(tmp_path / "study.html", d, "t", "sub").read_text()


def test_study_page_json_cannot_end_or_swallow_its_script_element(tmp_path):
    text = _page(tmp_path)
    block = re.search(r'<script type="application/json" id="study-data">(.*?)</script>', text, re.S)
    payload = block.group(1)
    # no "<", ">" or "&" inside the data block: neither "</script>" nor "<!--<script>"
    # (whose state made the page's own </script> not close it: a blank page in Chromium)
    assert not set("<>&\u2028\u2029") & set(payload)
    assert "\\u003c/script\\u003e\\u003c!--\\u003cscript\\u003e" in payload
    # exactly the page's two script elements; the data read back as written
    assert text.count("<script") == 2 and text.count("</script>") == 2
    data = json.loads(payload)
    assert {c["label"] for c in data["cells"]} == set(EVIL)
    assert data["cells"][0]["id"] == "c0</script>"
    assert "<b>Mpo</b>" in data["rows"]
    # the classes named in the page's text are HTML-escaped
    assert "&lt;/script&gt;&lt;!--&lt;script&gt;&quot;&#x27;&amp;" in text
    assert json.loads(script_json({"k": "a<b>&c\u2029"})) == {"k": "a<b>&c\u2029"}


def test_tensorboard_tables_show_names_as_written():
    from tensorboard.plugin_util import markdown_to_safe_html

    from vae.analysis.run import markdown_table

    names = ["<img src=http://x.example/p.png>", "[click](http://x.example)", "a|b", "seg_n *x*"]
    md = markdown_table(pd.DataFrame({"label": names, "n": [1.0, 2.0, 3.0, 4.0]}), "t")
    assert md.splitlines()[2:] == [
        "| &lt;img src=http://x.example/p.png&gt; | 1 |",
        "| \\[click\\](http://x.example) | 2 |",
        "| a\\|b | 3 |",
        "| seg\\_n \\*x\\* | 4 |",
    ]
    shown = markdown_to_safe_html(md)  # what the text tab renders
    assert "<img" not in shown and "<a" not in shown and "<em" not in shown
    cells = re.findall(r"<td>(.*?)</td>", shown)[::2]
    assert cells == [
        "&lt;img src=http://x.example/p.png&gt;",
        "[click](http://x.example)",
        "a|b",
        "seg_n *x*",
    ]


def test_embed_csvs_keep_formulas_as_text_and_numbers_as_numbers(tmp_path):
    from pipeline.artifacts import spreadsheet_safe

    df = pd.DataFrame(
        {
            "sample": ["=HYPERLINK(1)", "+EDTA", "-3", "@SUM(A1)", "-ctrl", "\tx", "P1", "-1e-3"],
            "call": pd.Categorical(["=1+2", "band", "-2", "b", "b", "b", "b", "b"]),
            "n": [-1, 2, 3, 4, 5, 6, 7, 8],
            "frac": [-0.5, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, np.nan],
        }
    )
    out = spreadsheet_safe(df)
    assert out["sample"].tolist() == [
        "'=HYPERLINK(1)",
        "'+EDTA",
        "-3",
        "'@SUM(A1)",
        "'-ctrl",
        "'\tx",
        "P1",
        "-1e-3",
    ]
    assert out["call"].tolist()[:3] == ["'=1+2", "band", "-2"]
    assert df["sample"][0] == "=HYPERLINK(1)"  # the caller's frame is not changed
    out.to_csv(tmp_path / "s.csv", index=False)
    back = pd.read_csv(tmp_path / "s.csv")
    assert back["n"].tolist()[0] == -1 and back["frac"].tolist()[0] == -0.5
    assert back["n"].dtype.kind == "i" and back["frac"].dtype.kind == "f"
    # no text cell of the file starts a formula
    assert not any(v.startswith(("=", "+", "@")) for v in back["sample"].astype(str))


def test_stage_figures_draw_a_name_with_dollars_as_written(tmp_path):
    """A class named ``mono$\\frac{$cyte`` made stage=evaluate fail (matplotlib read it as
    TeX math); every stage now runs with math text off (figures.plain_text, in the runner
    and in each DDP rank),
    and an API user's own figures keep matplotlib's default."""
    import matplotlib
    import numpy as np

    from vae.analysis import figures

    name = "mono$\\frac{$cyte"
    panels = {"test": ([name, "lymph"], np.array([[3, 1], [0, 4]]))}
    with figures.plain_text():
        fig = figures.confusion_panels(panels, "confusion")
        figures.save(fig, tmp_path / "c.png")
        assert matplotlib.rcParams["text.parse_math"] is False
    assert (tmp_path / "c.png").stat().st_size > 0
    assert matplotlib.rcParams["text.parse_math"] is True  # outside a stage: unchanged
    fig = figures.confusion_panels(panels, "confusion")
    try:
        with pytest.raises(ValueError):  # what a stage did before: the name is TeX
            fig.canvas.draw()
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_segment_rejects_csv_keeps_a_formula_name_as_text(tmp_path, monkeypatch):
    """stage=segment's rejects.csv (read by people, like embed's) quotes an image named
    ``=HYPERLINK(...)``; detections.csv, the machine table beside cells.h5ad, keeps names
    as the files have them."""
    import pipeline.stages.segment as seg
    from tests.helpers.seg_synth import untrained_checkpoint
    from tests.segmentation.test_seg_infer import _Blobs, _run_segment, _smear_folder

    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: _Blobs())
    smears = _smear_folder(tmp_path / "smears")
    (smears / "=HYPERLINK(1).png").write_bytes(b"not a png")
    ckpt = untrained_checkpoint(tmp_path / "model.pt")
    out = _run_segment(tmp_path, ckpt, smears, here=True)
    rej = pd.read_csv(out / "rejects.csv")
    assert "'=HYPERLINK(1).png" in set(rej["image"])
    assert not rej["image"].astype(str).str.startswith(("=", "+", "@")).any()
    det = pd.read_csv(out / "detections.csv")
    assert set(det["image"]) <= {"sim_0000.png", "sim_0001.png", "zz_gray.png"}
