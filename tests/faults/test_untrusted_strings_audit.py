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
    ``=HYPERLINK(...)`` (unreadable here, so it has no detections.csv row)."""
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


# names a user controls (files, class folders, labels, crop ids) that a spreadsheet would
# run: each must come out of every CSV below as text ("'" first) or as a plain number
HOSTILE = ["=cmd|' /C calc'!A0", "@SUM(1)", "+1", "-2+3"]


def _file_stem(name: str) -> str:
    # a file or folder name cannot hold "/"; the same text with "\" still starts "="
    return name.replace("/", "\\")


def _disc_image(path, h: int = 96, w: int = 128):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), (230, 205, 205), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= 14**2] = (110, 50, 150)
    Image.fromarray(img).save(path)


def _segment_folder(tmp_path, monkeypatch):
    """stage=segment on a smear folder whose images carry the hostile names."""
    import pipeline.stages.segment as seg
    from tests.helpers.seg_synth import untrained_checkpoint
    from tests.segmentation.test_seg_infer import _Blobs, _run_segment

    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: _Blobs())
    for h in HOSTILE:
        _disc_image(tmp_path / "smears" / f"{_file_stem(h)}.png")
    ckpt = untrained_checkpoint(tmp_path / "model.pt")
    out = _run_segment(tmp_path, ckpt, tmp_path / "smears", here=True)
    names = {f"{_file_stem(h)}.png" for h in HOSTILE}
    return {out / "detections.csv": {"image": names}}


def _segment_sources(tmp_path, monkeypatch):
    """stage=segment with data.segment_sources: hostile smear names and class folders."""
    import pipeline.stages.segment as seg
    from tests.helpers.run import run_stage_in_process
    from tests.helpers.seg_synth import untrained_checkpoint
    from tests.segmentation.test_seg_infer import _Blobs

    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: _Blobs())
    for h in HOSTILE:
        _disc_image(tmp_path / "smears" / f"{_file_stem(h)}.png")
        _disc_image(tmp_path / "crops" / _file_stem(h) / "c.png", 64, 64)
    ckpt = untrained_checkpoint(tmp_path / "model.pt", side=64)
    out = run_stage_in_process(
        [
            f"paths.root={tmp_path / 'out'}",
            "experiment=ss",
            f"paths.inputs.segmentation_model={ckpt}",
            "hardware.torch_threads=1",
            "segmentation.crop_size=32",
            "segmentation.min_area=100",
            "data.segment_sources=["
            f"{{name: s, kind: smears, path: '{tmp_path / 'smears'}', scale: 1.0}},"
            f"{{name: c, kind: crop_folder, path: '{tmp_path / 'crops'}', scale: 1.0}}]",
        ],
        "segment",
    )
    smears = {f"{_file_stem(h)}.png" for h in HOSTILE}
    crops = {f"{_file_stem(h)}/c.png" for h in HOSTILE}
    return {out / "detections.csv": {"image": smears | crops}}


def _pair(tmp_path, monkeypatch):
    """stage=pair (image_only) on cells labelled with the hostile names, and a reviewed
    label list naming crops that do not exist (each one a rejects.csv row)."""
    import anndata as ad

    from tests.helpers.run import run_stage_in_process

    n = len(HOSTILE)
    masks = np.zeros((n, 12, 12), bool)
    masks[:, 2:10, 2:10] = True
    a = ad.AnnData(obs=pd.DataFrame({"kind": HOSTILE}, index=[f"cell{i}" for i in range(n)]))
    a.obsm["crops"] = np.full((n, 12, 12, 3), 100, np.uint8)
    a.obsm["masks"] = masks
    a.uns["crop_size"] = 12
    a.write_h5ad(tmp_path / "cells.h5ad")
    fix = tmp_path / "fix.csv"
    pd.DataFrame({"image_ref": HOSTILE, "label": ""}).to_csv(fix, index=False)
    run_stage_in_process(
        [
            f"paths.root={tmp_path}",
            "experiment=p",
            f"paths.inputs.cells={tmp_path / 'cells.h5ad'}",
            "pair.mode=image_only",
            "pair.crop_size=16",
            f"pair.label_corrections={fix}",
        ],
        "pair",
    )
    d = tmp_path / "p" / "pair"
    return {
        d / "pair_summary.csv": {"label": {h.lower() for h in HOSTILE}},
        d / "rejects.csv": {"image": set(HOSTILE)},
    }


def _evaluate(tmp_path, monkeypatch):
    """vae.analysis.run.Outputs.csv, the one writer of every stage=evaluate (and
    stage=traverse) CSV, given a label_suspects-like table."""
    from vae.analysis.run import Outputs

    df = pd.DataFrame(
        {
            "image_ref": HOSTILE,
            "label": pd.Categorical(HOSTILE),
            "gene": HOSTILE,
            "n_misled": [-1, 2, 3, 4],
            "share": [-0.5, 0.1, 0.2, np.nan],
        }
    )
    path = Outputs(tmp_path).csv(df, "label_suspects")
    return {path: {c: set(HOSTILE) for c in ("image_ref", "label", "gene")}}


def _segment_train(tmp_path, monkeypatch):
    """stage=segment_train (test_bad_train_images' one-epoch detector) on VOC folders
    named with the hostile names, each with one truncated JPEG (a rejects.csv row). The
    folder name is the source's default name, and under a relative paths.shared_data
    the start of each image path."""
    from pipeline import runner
    from pipeline.config import SmearSourceConfig
    from tests.helpers.run import compose_config
    from tests.segmentation.test_bad_train_images import TINY, _truncate, make_voc

    monkeypatch.chdir(tmp_path)
    stems = [_file_stem(h) for h in HOSTILE]
    for s in stems:
        _truncate(make_voc(tmp_path / s, 2) / "JPEGImages" / "s1.jpg")
    cfg = compose_config([*TINY, f"paths.root={tmp_path / 'out'}", "paths.shared_data=."])
    # set here, not as an override: Hydra's grammar would need the names escaped
    cfg.data.smear_sources = [
        SmearSourceConfig(format="voc", path=s, val_splits=[], scale=1.0) for s in stems
    ]
    runner.load_stages()
    out = runner.run_stage(cfg, "segment_train")
    images = {f"{s}/JPEGImages/s1.jpg" for s in stems}
    return {out / "rejects.csv": {"source": set(stems), "image": images}}


@pytest.mark.parametrize(
    "writer", [_segment_folder, _segment_sources, _pair, _evaluate, _segment_train]
)
def test_newly_quoted_csvs_keep_hostile_names_inert(writer, tmp_path, monkeypatch):
    """detections.csv (both stage=segment paths), stage=pair's pair_summary.csv and
    rejects.csv, stage=evaluate's CSVs and stage=segment_train's rejects.csv wrote a
    file, folder, class or label named ``=cmd|' /C calc'!A0`` as is: a spreadsheet ran
    it. Now each text cell that starts a formula is written with a leading ``'`` (``+1``
    stays the number it reads as), the file still reads back with pandas and
    spreadsheet_unquote gives the name back."""
    from segmentation.io import FORMULA_START, spreadsheet_unquote

    def inert(v: str) -> bool:
        try:
            float(v)
            return True  # a number: nothing to run
        except ValueError:
            return not v.startswith(FORMULA_START)

    files = writer(tmp_path, monkeypatch)
    for path, columns in files.items():
        back = pd.read_csv(path, dtype=str, keep_default_na=False)
        text = back.to_numpy().ravel().tolist() + list(back.columns)
        assert all(inert(v) for v in text), path
        for col, names in columns.items():
            got = set(back[col])
            assert {"'=", "'@", "'-"} <= {v[:2] for v in got}, (path, col, got)
            # "+1" alone reads as a number and is kept; "+1.png" is text, quoted
            assert ("+1" in got) == ("+1" in names)
            restored = {spreadsheet_unquote(v) for v in got}
            if path.name == "pair_summary.csv":  # the folder readers lower-case classes
                restored = {v.lower() for v in restored}
            assert names <= restored, (path, col, restored)
    if writer is _evaluate:
        (path,) = files
        back = pd.read_csv(path)  # numbers are still numbers
        assert back["n_misled"].dtype.kind == "i" and back["share"].tolist()[0] == -0.5
        assert list(back.columns) == ["image_ref", "label", "gene", "n_misled", "share"]
        # a reviewed label_suspects.csv finds the crops by their own names (stage=pair)
        from vae.inputs.pairing import read_label_corrections

        _, tab = read_label_corrections(path)
        assert tab["image_ref"].tolist() == HOSTILE


def test_spreadsheet_quoting_is_reversible():
    """A name that already starts ``'=`` gets one more ``'``, so spreadsheet_unquote
    gives every name back as it was, and leaves unquoted text alone."""
    from segmentation.io import spreadsheet_safe, spreadsheet_unquote

    names = ["=x", "'=x", "''=x", "'x", "'", "-3", "'-3", "+1", "plain", "-ctrl", ""]
    out = spreadsheet_safe(pd.DataFrame({"n": names}))["n"].tolist()
    assert out == ["'=x", "''=x", "'''=x", "'x", "'", "-3", "'-3", "+1", "plain", "'-ctrl", ""]
    assert [spreadsheet_unquote(v) for v in out] == names


def test_report_tables_show_names_as_written_not_quoted(tmp_path):
    """The report rebuilds its tables from the quoted CSVs: a label ``=x`` showed as
    ``'=x`` in report.html (review); vae.analysis.run.read_table unquotes them."""
    from segmentation.io import spreadsheet_safe
    from vae.analysis.run import read_table

    df = pd.DataFrame({"label": ["=x", "@SUM(1)", "band"], "n": [-1, 2, 3]})
    spreadsheet_safe(df).to_csv(tmp_path / "t.csv", index=False)
    assert pd.read_csv(tmp_path / "t.csv")["label"].tolist()[0] == "'=x"
    back = read_table(tmp_path / "t.csv")
    assert back["label"].tolist() == ["=x", "@SUM(1)", "band"]
    assert back["n"].tolist() == [-1, 2, 3]
