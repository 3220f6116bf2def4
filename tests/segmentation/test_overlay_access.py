"""Overlays, contact sheets and reject sheets read under colour-vision deficiency.

An audit with a Machado-2009 simulator found: kept green / dropped red 1 px outlines
turned the same olive under deuteranopia and protanopia, the red outline vanished on
pink red cells, the score text was tiny, in the line colour with no backing (~1.4:1 on
pale background) and its drop reasons cut to nonsense ("duplic multi_low_so"); the
sheets' yellow labels and edges were ~1.5:1 on pale cells.
"""

import numpy as np
import pytest
from PIL import Image

from segmentation.cells import (
    DROPPED,
    HALO,
    KEPT,
    LABEL_BOX,
    LABEL_TEXT,
    SegmentSettings,
    _outlined,
    contact_sheet,
    draw_overlay,
    overlay_label,
    overlay_scale,
    segment_image,
)
from segmentation.crops import FilterSettings
from segmentation.inference import Detections
from tests.helpers.colour import contrast, delta_e

PALE = (230, 224, 232)  # smear background
PINK = (216, 168, 176)  # red cell
NUCLEUS = (60, 42, 128)  # dark purple


@pytest.mark.parametrize("kind", [None, "deutan", "protan", "tritan"])
def test_kept_and_dropped_colours_differ_under_every_deficiency(kind):
    """CIEDE2000 between kept and dropped >= 20 in normal and simulated CVD vision
    (green/red before: ~6 under deutan); and each line colour stands off its dark halo."""
    assert delta_e(KEPT, DROPPED, kind) >= 20
    for c in (KEPT, DROPPED):
        assert delta_e(c, HALO, kind) >= 30


def test_line_and_textcontrast():
    """Lines: the halo stands off pale background, the colour off dark nuclei; text
    >= 4.5:1 over its box (green text on pale background was ~1.4:1)."""
    for c in (KEPT, DROPPED):
        assert contrast(c, HALO) >= 4.5
        assert contrast(c, NUCLEUS) >= 2.5  # a bright line on a dark nucleus
    assert contrast(HALO, PALE) >= 10 and contrast(HALO, PINK) >= 7
    assert contrast(LABEL_TEXT, LABEL_BOX) >= 4.5


def test_drop_reasons_are_whole_words():
    assert overlay_label(True, 0.974, []) == "0.97 kept"
    text = overlay_label(False, 0.62, ["duplicate", "multi_piece"])
    assert text == "0.62 drop: duplicate, multi_piece"  # not "duplic multi_"
    assert overlay_label(False, 0.5, ["too_small", "at_border", "touching"]).endswith(
        "too_small, at_border +1"
    )


def test_line_width_and_text_grow_with_the_image():
    lw, halo, font = overlay_scale(480, 640)
    assert lw >= 2 and halo >= 1 and font >= 12
    big = overlay_scale(4096, 3000)
    assert big[0] > lw and big[2] > font


def _cells(h=200, w=320):
    """One kept disc, one dropped disc cut by the image edge, on a pale image."""
    yy, xx = np.mgrid[:h, :w]
    kept = (yy - 100) ** 2 + (xx - 160) ** 2 < 30**2
    cut = (yy - 100) ** 2 + (xx - 5) ** 2 < 25**2

    def detector(tiles):
        return [Detections.from_masks([kept, cut], [0.95, 0.9])]

    s = SegmentSettings(tile_size=512, tile_overlap=64, crop_size=48)
    s.filters = FilterSettings(min_area=50)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = PALE
    return segment_image(detector, img, "pale.png", s)


def test_overlay_draws_solid_kept_dashed_dropped_on_a_dark_halo_with_boxed_text():
    cells = _cells()
    assert cells.table.kept.tolist() == [True, False]
    a = np.asarray(draw_overlay(cells, 0.5))
    lines = np.asarray(draw_overlay(cells, 0.5, labels=False))
    kept = (lines == KEPT).all(-1)
    dropped = (lines == DROPPED).all(-1)
    halo = (lines == HALO).all(-1)
    assert kept.sum() > 100 and dropped.sum() > 30 and halo.sum() > kept.sum() / 2
    # 2 px lines: every kept outline row through the disc's middle is >= 2 px wide
    row = kept[100, 120:200]
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0])))[::2]
    assert runs.size and runs.min() >= 2
    # a dark halo next to the line: pale pixels never touch a kept pixel directly
    ys, xs = np.nonzero(kept)
    pale = (lines == PALE).all(-1)
    touch = sum(
        pale[np.clip(ys + dy, 0, 199), np.clip(xs + dx, 0, 319)].sum()
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))
    )
    assert touch == 0
    # dashed: the dropped disc's outline along the image's left part breaks into pieces
    from scipy import ndimage as ndi

    assert ndi.label(dropped[:, :35])[1] >= 3
    assert ndi.label(kept)[1] <= 2  # solid: outline (and box) in one or two pieces
    # the labels: white text on filled near-black boxes
    box = (a == LABEL_BOX).all(-1)
    white = (a == LABEL_TEXT).all(-1)
    assert box.sum() > 200 and white.sum() > 20
    assert not (lines == LABEL_TEXT).all(-1).any()  # the white is the text's


def test_contact_sheet_labels_are_black_under_each_crop():
    """Labels in black on the white sheet under the crop, never over the cell in
    yellow (255, 255, 0): ~1.1:1 on pale cytoplasm."""
    crops = np.zeros((4, 64, 64, 3), np.uint8)
    crops[:] = (235, 200, 210)  # pale pink
    sheet = np.asarray(contact_sheet(crops, ["band 0.98"] * 4, caption="kept cells"))
    assert not ((sheet == (255, 255, 0)).all(-1)).any()
    # every crop is pasted whole (no text over it) and text sits in the strip below
    assert (sheet == (235, 200, 210)).all(-1).sum() == 4 * 64 * 64
    dark = (sheet.max(-1) < 80).sum()
    assert dark > 50
    # measured on the sheet itself: under each pasted crop, the strip down to the next
    # crop (or the sheet's edge) holds the label; its darkest pixel (the text) against
    # the strip's commonest colour (its background) reads >= 4.5:1
    from scipy import ndimage as ndi

    pink, n = ndi.label((sheet == (235, 200, 210)).all(-1))
    assert n == 4
    boxes = ndi.find_objects(pink)
    tops = sorted({b[0].start for b in boxes})
    for rows, cols in boxes:
        below = [t for t in tops if t > rows.stop]
        strip = sheet[rows.stop : (below[0] if below else sheet.shape[0]), cols]
        px = strip.reshape(-1, 3)
        colours, counts = np.unique(px, axis=0, return_counts=True)
        background = tuple(int(v) for v in colours[counts.argmax()])
        lum = px.astype(float) @ [0.2126, 0.7152, 0.0722]
        darkest = tuple(int(v) for v in px[lum.argmin()])
        assert background == (255, 255, 255), background  # the white sheet, not the cell
        assert contrast(darkest, background) >= 4.5, (darkest, background)
        assert (strip.max(-1) < 80).sum() > 10  # text, not a stray dark pixel
    assert isinstance(contact_sheet(crops[:0]), Image.Image)


def test_reject_crops_have_a_two_px_yellow_edge_between_black_rings():
    m = np.zeros((32, 32), bool)
    m[8:24, 8:24] = True

    class C:
        images = np.full((1, 32, 32, 3), 230, np.uint8)
        masks = m[None]

    out = _outlined(C)[0]
    row = out[16]
    yellow = (row == (255, 230, 0)).all(-1)
    black = (row == HALO).all(-1)
    assert yellow[8:10].all() and yellow[22:24].all()  # 2 px
    assert black[7] and black[10] and black[21] and black[24]  # the rings
    assert contrast((255, 230, 0), HALO) >= 4.5


def test_a_slides_overlay_keeps_its_small_cells_visible():
    """A large image drawn at max_side px shows its cells a few px wide: the image-size
    rule gave 40 px labels and 4 px lines that covered every cell (a 400 MP slide at
    4096 px, whole-slide audit). Lines follow the drawn cell size; labels only where a
    cell is drawn at least OVERLAY_LABEL_MIN_CELL_PX wide."""
    from segmentation.cells import OVERLAY_LABEL_MIN_CELL_PX

    cells = _cells()  # cells 60 px across on a 320 px image
    big = draw_overlay(cells, 0.5, max_side=None)
    small = np.asarray(draw_overlay(cells, 0.5, max_side=80))  # the cell ~15 px wide
    assert 60 * 80 / 320 < OVERLAY_LABEL_MIN_CELL_PX
    lines_only = np.asarray(draw_overlay(cells, 0.5, max_side=80, labels=False))
    assert np.array_equal(small, lines_only)  # no label drawn
    # the lines: 1-2 px, not the image rule's; most of the cell's inside is not covered
    kept = (small == KEPT).all(-1)
    assert 0 < kept.sum() < 0.5 * np.pi * (7.5**2)
    assert big.size == (320, 200)
    labelled = np.asarray(big)
    assert not np.array_equal(
        labelled, np.asarray(draw_overlay(cells, 0.5, max_side=None, labels=False))
    )


def test_contact_sheet_labels_use_the_abbreviation_a_long_class_name_has():
    """The demo's sheet cut its most common class to "segmented_neutrop...": a name too long
    for its crop is the haematologists' abbreviation, spelled out in the caption."""
    import pandas as pd

    from pipeline.stages.segment import SHEET_LABEL_CHARS, sheet_labels

    kept = pd.DataFrame(
        {"kind": ["segmented_neutrophil", "metamyelocyte", None], "score": [0.9, 0.8, 0.7]}
    )
    labels, note = sheet_labels(kept)
    assert labels == ["SEG", "metamyelocyte", "0.70"]
    assert note == "SEG segmented neutrophil"
    assert all(len(x) <= SHEET_LABEL_CHARS for x in labels)
    assert sheet_labels(kept.drop(columns="kind")) == (["0.90", "0.80", "0.70"], "")
