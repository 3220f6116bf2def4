"""report.html is self-contained and references every figure with its caption."""

import base64
import re

import numpy as np
import pandas as pd
import pytest

from vae.analysis import figures as F
from vae.analysis.report import FigureItem, Section, TableItem, write_report


def test_report_embeds_every_figure_and_table(tmp_path):
    paths = []
    for i in range(3):
        fig = F.heatmap(np.eye(2) * (i + 1) / 3, ["a", "b"], ["x", "y"], f"h{i}")
        paths.append(F.save(fig, tmp_path / f"fig_{i}.png"))
    img = F.strip_with_heatmap(
        np.zeros((4, 8, 8, 3)), np.ones((4, 2)), ["MPO", "LTF"], list("abcd"), "strip"
    )
    paths.append(F.save(img, tmp_path / "strip.png"))
    df = pd.DataFrame({"metric": ["knn", "ari"], "value": [0.91234, 0.5]})
    sections = [
        Section(
            "Metrics",
            text="first paragraph\n\nsecond <b>escaped</b>",
            tables=[TableItem("latent", df, caption="kNN and ARI")],
            figures=[FigureItem(paths[0], "caption zero"), FigureItem(paths[1], "caption one")],
        ),
        Section("More", figures=[FigureItem(p, f"cap {p.stem}") for p in paths[2:]]),
    ]
    out = write_report(tmp_path / "report.html", "Run X", sections, config={"vae": {"beta": 4}})
    text = out.read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(imgs) == len(paths)
    for p, b64 in zip(paths, imgs):
        assert base64.b64decode(b64) == p.read_bytes()  # embedded byte for byte
        assert f'data-file="{p.name}"' in text
    for cap in ["caption zero", "caption one", "cap fig_2", "cap strip"]:
        assert f"<figcaption>{cap}" in text
    assert "0.912" in text and "kNN and ARI" in text
    assert "&lt;b&gt;escaped" in text  # text is escaped, not injected
    assert '"beta": 4' in text
    assert 'src="http' not in text and 'href="http' not in text  # nothing external


def test_report_names_a_missing_figure(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        write_report(
            tmp_path / "r.html",
            "t",
            [Section("s", figures=[FigureItem(tmp_path / "nope.png", "c")])],
        )
    assert not (tmp_path / "r.html").exists()


def test_strip_with_two_image_rows_labels_each_row():
    a, b = np.zeros((3, 8, 8, 3)), np.ones((3, 8, 8, 3))
    fig = F.strip_with_heatmap(
        [a, b], np.ones((3, 2)), ["MPO", "LTF"], list("xyz"), "t", ["m", "p"]
    )
    # 2 image rows x 3 steps + the heatmap (+ its colour bar)
    axes = fig.get_axes()
    assert len(axes) == 2 * 3 + 2
    assert [ax.get_ylabel() for ax in axes[:6:3]] == ["m", "p"]
    assert axes[3].get_images()[0].get_array().max() == 1.0  # second row shows b
    with pytest.raises(ValueError, match="row labels"):
        F.strip_with_heatmap([a, b], None, [], list("xyz"), "t", ["only one"])
