"""Magnification from the image (segmentation/magnification.py) on drawn smears."""

from __future__ import annotations

import re

import numpy as np
import pytest

from segmentation import magnification
from segmentation.magnification import (
    WHITE_BOX_PER_DIAMETER,
    estimate_scale,
    red_cell_diameter,
    ruler_windows,
    white_cell_sizes,
)
from tests.helpers.seg_synth import LIGHT_HEADS


def _smear(
    diameter: float,
    size: int = 400,
    seed: int = 0,
    white: float | None = None,
    white_at: list[tuple[float, float]] | None = None,
) -> np.ndarray:
    """Pink background, red cells with a paler centre (some touching), white cells.

    ``white``: diameter of each white cell (lilac cytoplasm around a dark purple
    nucleus of 0.6x that diameter) drawn at ``white_at`` (default the centre);
    None draws the old uniform violet disk of 3.6 red radii.
    """
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.float32)
    img[:] = (235, 225, 215)
    yy, xx = np.mgrid[:size, :size]
    r = diameter / 2
    centres = []
    while len(centres) < 40:
        c = rng.uniform(r + 2, size - r - 2, 2)
        if all(np.hypot(*(c - d)) > 1.6 * r for d in centres):  # some cells touch
            centres.append(c)
    for cy, cx in centres:
        d = np.hypot(yy - cy, xx - cx)
        img[d <= r] = (200, 120, 130)
        img[d <= 0.35 * r] = (220, 170, 175)  # central pallor
    for wy, wx in white_at or [(size / 2, size / 2)]:
        d = np.hypot(yy - wy, xx - wx)
        if white is None:
            img[d <= 1.8 * r] = (120, 80, 170)  # a white cell
        else:
            img[d <= white / 2] = (185, 150, 205)  # cytoplasm
            img[d <= 0.3 * white] = (110, 50, 150)  # nucleus
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("diameter", [14.0, 24.0, 36.0])
def test_red_cell_diameter_recovers_drawn_size(diameter: float):
    d, n = red_cell_diameter(_smear(diameter))
    assert n >= 5
    assert d == pytest.approx(diameter, rel=0.1)


def test_red_ruler_follows_magnification_and_fails_on_blank():
    small = estimate_scale(_smear(16.0), cell_px=40.0, wbc_per_rbc=2.0, ruler="red")
    large = estimate_scale(_smear(32.0), cell_px=40.0, wbc_per_rbc=2.0, ruler="red")
    assert small.ok and large.ok and small.ruler == "red"
    assert small.scale == pytest.approx(40.0 / (2.0 * small.diameter_px))
    assert small.scale / large.scale == pytest.approx(2.0, rel=0.15)
    blank = estimate_scale(np.full((100, 100, 3), 230, np.uint8), 40.0, fallback=0.7)
    assert not blank.ok and blank.scale == 0.7 and np.isnan(blank.diameter_px)
    assert blank.ruler == "none"


@pytest.mark.parametrize("white", [40.0, 64.0, 90.0])
def test_white_cell_sizes_recover_the_whole_cell_not_the_nucleus(white: float):
    """The drawn white cell (cytoplasm included, touching red cells around it) is
    measured at its diameter, not at its nucleus's (0.6x)."""
    img = _smear(white / 2.2, size=500, white=white)
    sizes = white_cell_sizes(img)
    assert sizes.size == 1
    assert sizes[0] == pytest.approx(white, rel=0.12)


def test_a_whole_slide_is_measured_on_windows_like_one_field(monkeypatch):
    """A 2560x1920 scan of twelve fields: measured whole, its white cells read 96 px for
    60 on the 320 px copy (and the red-cell watershed held ~100 bytes per pixel: 22.8 GB
    at 196 MP); on field-sized windows covering it, it reads as one field does."""
    fields = [_smear(24.0, size=640, seed=k, white=60.0) for k in range(12)]
    slide = np.concatenate([np.concatenate(fields[r * 4 : r * 4 + 4], 1) for r in range(3)], 0)
    one = estimate_scale(fields[0], cell_px=40.0)
    wins = ruler_windows(slide)
    assert len(wins) == 5 * 3 and all(w.view.base is not None for w in wins)  # no copies
    assert all(w.view.shape[:2] == (768, 768) for w in wins)
    assert wins[0].inner == (False, False, True, True)  # its bottom and right edges inner
    assert wins[-1].view.shape[:2] == (768, 768)  # the last flush with the slide's corner
    big = estimate_scale(slide, cell_px=40.0)
    assert one.ok and big.ok and big.ruler == one.ruler == "white"
    assert big.white_px == pytest.approx(one.white_px, rel=0.1) and big.n_cells >= 12
    assert big.scale == pytest.approx(one.scale, rel=0.1)
    red = estimate_scale(slide, cell_px=40.0, ruler="red")
    assert red.diameter_px == pytest.approx(24.0, rel=0.1) and red.n_cells > 100
    # at most RULER_MAX_WINDOWS windows, spread over the grid
    monkeypatch.setattr(magnification, "RULER_MAX_WINDOWS", 5)
    assert len(ruler_windows(slide, max_windows=5)) == 5
    assert estimate_scale(slide, cell_px=40.0).ok


@pytest.mark.parametrize("at", [(80.0, 80.0), (550.0, 550.0), (1020.0, 1020.0)])
def test_a_camera_frame_is_measured_whole_wherever_its_white_cell_lies(at):
    """Found on review: a 1100 px field was measured on one centred 768 px window, so a
    white cell near the edge was missed (the red ruler took over: scale 0.73 for 0.51) or
    measured cut. Frames up to 2048 px are measured whole, as before the windows."""
    img = _smear(24.0, size=1100, white=60.0, white_at=[at])
    assert len(ruler_windows(img)) == 1 and ruler_windows(img)[0].view is img
    est = estimate_scale(img, cell_px=40.0)
    assert est.ruler == "white" and est.n_cells == 1


def test_a_white_cell_on_a_window_edge_is_measured_whole_in_the_next_window():
    """Windows overlap by RULER_OVERLAP_PX; a cell cut by one window's inner edge is left
    out there and measured whole in its neighbour (it read 52.8 px for 60 when cut)."""
    from segmentation.magnification import _white_pooled

    img = _smear(24.0, size=2600, white=60.0, white_at=[(1300.0, 770.0)])
    wins = ruler_windows(img)
    sizes = _white_pooled(wins)
    # once, whole (the ruler reads this drawn cell at ~64-67 px; cut, it read 52.8)
    assert sizes.size == 1 and 58.0 < sizes[0] < 70.0, sizes


def test_white_cells_measured_at_full_resolution_size_and_each_one_counted():
    """Two white cells; the image is measured downscaled (> MEASURE_PX) but sizes
    come back in source px."""
    img = _smear(30.0, size=700, white=70.0, white_at=[(200, 200), (500, 480)])
    sizes = white_cell_sizes(img)
    assert sizes.size == 2
    assert np.allclose(sizes, 70.0, rtol=0.12)


def test_auto_ruler_uses_white_cells_then_red_cells():
    est = estimate_scale(_smear(20.0, size=500, white=50.0), cell_px=40.0)
    assert est.ok and est.ruler == "white" and est.n_cells == 1
    assert est.scale == pytest.approx(40.0 / (WHITE_BOX_PER_DIAMETER * est.white_px))
    # a field without white cells: the red cells are the ruler
    rng = np.random.default_rng(1)
    no_white = _smear(20.0, size=400)
    no_white[...] = np.where(
        (no_white[..., :1] < 140) & (no_white[..., 2:3] > 150),  # the violet disk -> plasma
        np.array([235, 225, 215], np.uint8),
        no_white,
    )
    no_white = np.clip(no_white + rng.normal(0, 1, no_white.shape), 0, 255).astype(np.uint8)
    red = estimate_scale(no_white, cell_px=40.0, wbc_per_rbc=2.0)
    assert red.ok and red.ruler == "red"
    assert red.diameter_px == pytest.approx(20.0, rel=0.1)
    with pytest.raises(ValueError, match="ruler"):
        estimate_scale(no_white, 40.0, ruler="blue")


def test_a_white_ruler_smaller_than_a_red_cell_gives_way_to_the_red_cells():
    """A basophil's granules read as small nuclei measured it 4x too small (TXL-PBC val):
    a white cell is never smaller than a red cell, so the red cells are the ruler then."""
    from segmentation.autoscale import ScaleChoice

    img = _smear(30.0, size=500, white=16.0)  # "white cell" half a red cell wide
    est = estimate_scale(img, cell_px=40.0)
    assert est.ok and est.ruler == "red" and est.white_px < est.diameter_px
    assert est.diameter_px == pytest.approx(30.0, rel=0.1)
    assert "smaller than a red cell" in ScaleChoice(est, None, est.scale).describe()
    # asked for the white ruler by name, it is used as measured
    assert estimate_scale(img, cell_px=40.0, ruler="white").ruler == "white"
    # a plausible white cell (larger than the red cells) keeps the white ruler
    assert estimate_scale(_smear(20.0, size=500, white=50.0), cell_px=40.0).ruler == "white"


def test_smear_folder_uses_the_estimate_per_image(tmp_path):
    """The embed reader measures each smear: the white-cell ruler's scale is the one
    recorded for the image, and twice the magnification gives half the scale."""
    import torch
    from PIL import Image

    from segmentation.model import build_maskrcnn, save_checkpoint
    from vae.inputs.query import segment_smear_folder

    torch.manual_seed(0)
    args = {"arch": "resnet18_fpn", "min_size": 128, "max_size": 128, **LIGHT_HEADS}
    save_checkpoint(tmp_path / "det.pt", build_maskrcnn(**args), args)
    (tmp_path / "smears").mkdir()
    # small fields (the detector's passes dominate the time): 160 px and 320 px at 2x
    Image.fromarray(_smear(12.0, size=160, white=30.0)).save(tmp_path / "smears" / "a.png")
    Image.fromarray(_smear(24.0, size=320, white=60.0)).save(tmp_path / "smears" / "b.png")
    fixed, _ = segment_smear_folder(tmp_path / "smears", tmp_path / "det.pt")
    assert set(fixed.uns["input_scales"].values()) == {1.0}  # the checkpoint's scale
    a, _ = segment_smear_folder(tmp_path / "smears", tmp_path / "det.pt", estimate_cell_px=40.0)
    sc = a.uns["input_scales"]
    assert set(sc) == {"smears/a", "smears/b"}
    sa, sb = sc["smears/a"], sc["smears/b"]
    assert sa == pytest.approx(40.0 / (WHITE_BOX_PER_DIAMETER * 30.0), rel=0.15)
    assert sa / sb == pytest.approx(2.0, rel=0.15)


# ----------------------------------------------------------------------------
# detector-refined scale (refine_scale): synthetic detections
# ----------------------------------------------------------------------------


def _box(cx: float, cy: float, side: float) -> list[float]:
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


def test_detector_scale_measures_confident_uncut_boxes_only():
    from segmentation.magnification import detector_scale

    boxes = np.array(
        [
            _box(200, 200, 100),  # measured
            _box(400, 250, 110),  # measured
            _box(300, 380, 96),  # measured
            _box(250, 100, 300),  # low score: a doublet / junk, not measured
            [0.0, 150.0, 40.0, 250.0],  # cut by the left edge (x0 = 0)
            [450.0, 440.0, 600.0, 500.0],  # cut by the bottom edge (y1 = H)
        ]
    )
    scores = np.array([0.95, 0.9, 0.85, 0.5, 0.99, 0.99])
    s, n = detector_scale(boxes, scores, (500, 600), scale=0.4, cell_px=40.0, min_score=0.8)
    assert n == 3
    assert s == pytest.approx(40.0 / 100.0)  # the median side of the three measured boxes
    # the edge margin is in working px: 2 working px at scale 0.01 are 200 source px,
    # so every box is "at the edge"
    assert detector_scale(boxes, scores, (500, 600), 0.01, 40.0, 0.8)[1] == 0
    none = detector_scale(np.zeros((0, 4)), np.zeros(0), (500, 600), 0.4, 40.0)
    assert np.isnan(none[0]) and none[1] == 0


class _FakeDetection:
    """Finds cells of a fixed side in *source* px whatever the scale, and records the
    scales it ran at; the score can depend on the scale."""

    def __init__(self, side: float, score=lambda s: 0.95, edge_box: bool = True):
        self.side, self.score, self.edge_box, self.calls = side, score, edge_box, []

    def __call__(self, s: float):
        self.calls.append(s)
        boxes = [_box(150, 150, self.side), _box(400, 300, self.side * 1.05)]
        if self.edge_box:  # a big cell cut by the image edge: ignored
            boxes.append([0.0, 0.0, 3 * self.side, 40.0])
        sc = np.full(len(boxes), self.score(s))
        return f"pass at {s:.3f}", np.array(boxes), sc


def test_refine_scale_reruns_at_the_detectors_scale():
    from segmentation.magnification import RefineSettings, refine_scale

    det = _FakeDetection(side=80.0)
    truth = 40.0 / (80.0 * np.sqrt(1.05))  # median of the two sides 80 and 84
    result, r = refine_scale(det, 0.3, (600, 800), 40.0, RefineSettings(tolerance=0.1))
    assert r.s0 == 0.3 and r.n_boxes == 2
    assert r.s1 == pytest.approx(40.0 / 82.0)
    assert r.scale == pytest.approx(r.s1) and det.calls == [0.3, pytest.approx(r.s1)]
    assert result == f"pass at {r.s1:.3f}"  # the second pass's result is kept
    assert abs(r.s1 / truth - 1) < 0.02
    # within the tolerance: one pass, s0 kept, s1 still reported
    det = _FakeDetection(side=80.0)
    _, r = refine_scale(det, 0.47, (600, 800), 40.0, RefineSettings(tolerance=0.1))
    assert det.calls == [0.47] and r.scale == 0.47 and r.s1 == pytest.approx(40.0 / 82.0)
    # a third pass only when allowed and the second still disagrees (here it agrees)
    det = _FakeDetection(side=80.0)
    _, r = refine_scale(det, 0.2, (600, 800), 40.0, RefineSettings(max_passes=3))
    assert len(det.calls) == 2


def test_refine_scale_keeps_s0_without_confident_boxes_and_can_pick_by_score():
    from segmentation.magnification import RefineSettings, refine_scale

    # nothing confident (scores 0.5 < min_score): one pass, s0 kept
    det = _FakeDetection(side=80.0, score=lambda s: 0.5)
    result, r = refine_scale(det, 0.3, (600, 800), 40.0, RefineSettings(min_score=0.8))
    assert det.calls == [0.3] and r.scale == 0.3 and np.isnan(r.s1) and r.n_boxes == 0
    assert result == "pass at 0.300"
    # only the edge-cut box is there: not measured, s0 kept
    cut = _FakeDetection(side=80.0)
    cut_call = cut.__call__

    def only_cut(s):
        res, b, sc = cut_call(s)
        return res, b[2:], sc[2:]

    _, r = refine_scale(only_cut, 0.3, (600, 800), 40.0)
    assert r.scale == 0.3 and np.isnan(r.s1)
    # choose="score": the second pass scores lower, so the first is kept
    det = _FakeDetection(side=80.0, score=lambda s: 0.95 if s == 0.3 else 0.85)
    result, r = refine_scale(det, 0.3, (600, 800), 40.0, RefineSettings(choose="score"))
    assert len(det.calls) == 2 and r.scale == 0.3 and result == "pass at 0.300"
    assert r.confidence == [pytest.approx(0.95), pytest.approx(0.85)]
    with pytest.raises(ValueError, match="choose"):
        refine_scale(det, 0.3, (600, 800), 40.0, RefineSettings(choose="best"))


# ----------------------------------------------------------------------------
# segment_estimated / stage=segment with segmentation.refine_scale
# ----------------------------------------------------------------------------


class _LilacDetector:
    """Every connected lilac region (blue > green + 40: a white cell's cytoplasm and
    nucleus; red cells and plasma are not) of a tile is one WBC (score 0.9); records the
    tile shapes it saw (the working image size tells the scale)."""

    def __init__(self):
        self.shapes = []

    def __call__(self, tiles):
        from scipy import ndimage

        from segmentation.inference import Detections

        out = []
        for t in tiles:
            self.shapes.append(t.shape[:2])
            f = t.astype(np.int32)
            lab, n = ndimage.label(f[..., 2] - f[..., 1] > 40)
            out.append(Detections.from_masks([lab == i for i in range(1, n + 1)], [0.9] * n))
        return out


def _wrong_ruler(monkeypatch, scale: float):
    """The image ruler returns ``scale`` (a ruler fooled by the image)."""
    import segmentation.autoscale as A
    from segmentation.magnification import ScaleEstimate

    est = ScaleEstimate(float("nan"), 1, scale, True, "white", 123.0)
    monkeypatch.setattr(A, "estimate_scale", lambda *a, **k: est)


def test_segment_estimated_refines_a_wrong_ruler(monkeypatch):
    """White cells 60 px wide; the ruler says 0.3 (cells at 18 px): the lilac detector's
    boxes give s1 = 40 / 60, the image is detected again there and those cells kept."""
    from segmentation.autoscale import segment_estimated
    from segmentation.cells import SegmentSettings
    from segmentation.magnification import RefineSettings

    _wrong_ruler(monkeypatch, 0.3)
    img = _smear(14.0, size=300, white=60.0, white_at=[(90, 90), (200, 190)])
    st = SegmentSettings(input_scale=1.0, crop_size=32)
    det = _LilacDetector()
    cells, choice = segment_estimated(det, img, "a.png", st, 40.0, refine=RefineSettings())
    assert choice.estimate.scale == 0.3
    assert choice.refinement.s1 == pytest.approx(40.0 / 60.0, rel=0.08)
    assert choice.scale == choice.refinement.s1 and cells.scale == choice.scale
    assert det.shapes == [(90, 90), (round(300 * choice.scale),) * 2]
    assert int(cells.table.kept.sum()) == 2
    s1 = choice.refinement.s1
    assert choice.describe().endswith(f"s0 0.3, detector s1 {s1:.4g} (2 boxes), used {s1:.4g}")
    # without refine: one pass at the ruler's scale
    det = _LilacDetector()
    cells, choice = segment_estimated(det, img, "a.png", st, 40.0, refine=None)
    assert det.shapes == [(90, 90)] and choice.scale == 0.3 and choice.refinement is None


def _checkpoint_and_smears(tmp_path, files: dict[str, str], **extra) -> None:
    """``tmp_path/det.pt``, an untrained detector that is only loaded (the tests replace
    its predictions), saved with ``extra``; one two-white-cell smear per ``folder: file``."""
    import torch
    from PIL import Image

    from segmentation.model import build_maskrcnn, save_checkpoint

    torch.manual_seed(0)
    args = {"arch": "resnet18_fpn", "min_size": 64, "max_size": 64, **LIGHT_HEADS}
    save_checkpoint(tmp_path / "det.pt", build_maskrcnn(**args), args, **extra)
    img = _smear(14.0, size=300, white=60.0, white_at=[(90, 90), (200, 190)])
    for folder, name in files.items():
        (tmp_path / folder).mkdir()
        Image.fromarray(img).save(tmp_path / folder / name)


def _lilac_segment_stage(monkeypatch) -> _LilacDetector:
    """stage=segment's detector replaced by a recording one, the ruler reading 0.3."""
    import pipeline.stages.segment as seg

    det = _LilacDetector()
    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: det)
    _wrong_ruler(monkeypatch, 0.3)
    return det


@pytest.mark.parametrize("refine", [True, False, None])
def test_segment_stage_uses_refine_scale_setting(tmp_path, monkeypatch, refine):
    """stage=segment with segmentation.estimate_scale=true: refine_scale=true runs the
    detector again at its own scale and logs s0, s1 and the scale used; false keeps s0;
    null (the default) refines for a detector saved with estimate_scale (as shipped)."""
    import anndata as ad

    from tests.helpers.run import run_stage_in_process

    extra = {"estimate_scale": True} if refine is None else {}
    _checkpoint_and_smears(tmp_path, {"smears": "a.png"}, **extra)
    det = _lilac_segment_stage(monkeypatch)
    out = run_stage_in_process(
        [
            f"paths.root={tmp_path / 'out'}",
            "experiment=rf",
            f"paths.inputs.segmentation_model={tmp_path / 'det.pt'}",
            f"paths.inputs.smears={tmp_path / 'smears'}",
            "hardware.torch_threads=1",
            "segmentation.crop_size=32",
            "segmentation.min_area=100",
            "segmentation.estimate_scale=true",
        ]
        + ([] if refine is None else [f"segmentation.refine_scale={str(refine).lower()}"]),
        "segment",
    )
    assert ad.read_h5ad(out / "cells.h5ad").n_obs == 2
    log = (out / "segment.log").read_text()
    if refine is not False:
        assert det.shapes[0] == (90, 90) and len(det.shapes) == 2
        assert det.shapes[1][0] == pytest.approx(300 * 40 / 60, rel=0.08)
        s1 = det.shapes[1][0] / 300
        m = re.search(
            r"scale a.png: white ruler 123.0 px \(1 cells\): s0 0.3, detector s1 (\S+) "
            r"\(2 boxes\), used (\S+)",
            log,
        )
        assert m and float(m[1]) == float(m[2]) == pytest.approx(s1, abs=0.005)
    else:
        assert det.shapes == [(90, 90)]
        assert "scale a.png: white ruler 123.0 px (1 cells): s0 0.3 used" in log


def test_segment_sources_refine_null_scale_sources_only(tmp_path, monkeypatch):
    """data.segment_sources: a source with scale null is measured and refined per image;
    one with a fixed scale keeps it (no estimate, no second pass)."""
    import anndata as ad

    from tests.helpers.run import run_stage_in_process

    _checkpoint_and_smears(tmp_path, {"free": "free.png", "fixed": "fixed.png"})
    det = _lilac_segment_stage(monkeypatch)
    out = run_stage_in_process(
        [
            f"paths.root={tmp_path / 'out'}",
            "experiment=rs",
            f"paths.inputs.segmentation_model={tmp_path / 'det.pt'}",
            "hardware.torch_threads=1",
            "segmentation.crop_size=32",
            "segmentation.min_area=100",
            "segmentation.estimate_scale=true",
            "segmentation.refine_scale=true",
            "data.segment_sources=["
            f"{{name: free, kind: smears, path: '{tmp_path / 'free'}'}},"
            f"{{name: fixed, kind: smears, path: '{tmp_path / 'fixed'}', scale: 0.5}}]",
        ],
        "segment",
    )
    obs = ad.read_h5ad(out / "cells.h5ad").obs
    assert sorted(obs.source) == ["fixed", "fixed", "free", "free"]
    # free: the ruler's 0.3, then the detector's ~40/60; fixed: 0.5 only
    assert det.shapes[0] == (90, 90)
    assert det.shapes[1][0] == pytest.approx(300 * 40 / 60, rel=0.08)
    assert det.shapes[2:] == [(150, 150)]


def test_smear_folder_records_the_refined_scale(tmp_path, monkeypatch):
    """The embed reader (stage=embed, Study.read) with ``refine``: the scale recorded for
    the image is the detector's, not the (wrong) ruler's."""
    import segmentation.inference as inf
    from segmentation.magnification import RefineSettings
    from vae.inputs.query import segment_smear_folder

    _checkpoint_and_smears(tmp_path, {"smears": "a.png"})
    monkeypatch.setattr(inf, "MaskRCNNDetector", lambda *a, **k: _LilacDetector())
    _wrong_ruler(monkeypatch, 0.3)
    folder, ckpt = tmp_path / "smears", tmp_path / "det.pt"
    a, _ = segment_smear_folder(folder, ckpt, estimate_cell_px=40.0, refine=RefineSettings())
    assert a.uns["input_scales"]["smears/a"] == pytest.approx(40.0 / 60.0, rel=0.08)
    assert a.n_obs == 2
    a, _ = segment_smear_folder(folder, ckpt, estimate_cell_px=40.0)
    assert a.uns["input_scales"]["smears/a"] == 0.3


def test_estimated_scale_ignores_ground_truth():
    """The per-image scale (ruler + detector refinement) is measured from the image and
    the detections only: ground truth given with the image (here, wrongly sized on
    purpose) changes neither s0, s1 nor the scale used; only the match columns differ."""
    from segmentation.autoscale import segment_estimated
    from segmentation.cells import ImageTruth, SegmentSettings
    from segmentation.magnification import RefineSettings

    img = _smear(14.0, size=300, white=60.0, white_at=[(90, 90), (200, 190)])
    st = SegmentSettings(input_scale=1.0, crop_size=32)
    tiny = np.ones((10, 10), bool)  # a 10 px "cell": an oracle would scale up 4x
    truth = ImageTruth([tiny], np.array([[5, 5]], np.int64), [{"category_id": 1}])
    runs = []
    for t in (None, truth):
        det = _LilacDetector()
        _, choice = segment_estimated(det, img, "a.png", st, 40.0, t, refine=RefineSettings())
        runs.append((choice.estimate.scale, choice.refinement.s1, choice.scale, det.shapes))
    assert runs[0] == runs[1]
    assert runs[0][2] == pytest.approx(40.0 / 60.0, rel=0.1)  # the drawn 60 px cells


def test_refinement_follows_the_detector_unless_set():
    """segmentation.refine_scale null: on for a detector saved with estimate_scale (the
    shipped one), off for a segment_train model; true / false always win."""
    from segmentation.shipped import wants_scale_refinement

    assert wants_scale_refinement(None, {"estimate_scale": True})
    assert not wants_scale_refinement(None, {})
    assert not wants_scale_refinement(None, {"estimate_scale": True, "refine_scale": False})
    assert not wants_scale_refinement(False, {"estimate_scale": True})
    assert wants_scale_refinement(True, {})


def test_smear_folder_refines_by_default_for_a_detector_saved_with_estimate_scale(
    tmp_path, monkeypatch
):
    """The embed reader with no scale arguments and a checkpoint that asks for the
    estimate (as the shipped one does): measured, then refined by the detector's boxes;
    ``refine=False`` keeps the ruler's scale."""
    import segmentation.inference as inf
    from vae.inputs.query import segment_smear_folder

    _checkpoint_and_smears(tmp_path, {"smears": "a.png"}, estimate_scale=True, cell_px=40.0)
    ckpt = tmp_path / "det.pt"
    monkeypatch.setattr(inf, "MaskRCNNDetector", lambda *a, **k: _LilacDetector())
    _wrong_ruler(monkeypatch, 0.3)
    a, _ = segment_smear_folder(tmp_path / "smears", ckpt)
    assert a.uns["input_scales"]["smears/a"] == pytest.approx(40.0 / 60.0, rel=0.08)
    a, _ = segment_smear_folder(tmp_path / "smears", ckpt, refine=False)
    assert a.uns["input_scales"]["smears/a"] == 0.3


def test_refine_probe_keeps_a_pass_only_when_clearly_more_confident():
    """probe=(0.8, 1.25): two more passes around the kept scale; one replaces it only
    when its top-k mean score beats it by more than probe_margin; ``measured`` stays
    the scale before the probe (the image's magnification)."""
    from segmentation.magnification import RefineSettings, refine_scale

    s_cell = 40.0 / 82.0  # the fake cells' own scale: s1 of every pass
    # most confident a little below the cells' scale (0.8x): 0.99 there, 0.9 elsewhere
    det = _FakeDetection(80.0, score=lambda s: 0.99 if abs(s / s_cell - 0.8) < 1e-6 else 0.9)
    st = RefineSettings(probe=(0.8, 1.25), probe_margin=0.05)
    result, r = refine_scale(det, 0.3, (600, 800), 40.0, st)
    assert det.calls == [0.3, pytest.approx(s_cell), pytest.approx(0.8 * s_cell),
                         pytest.approx(1.25 * s_cell)]  # fmt: skip
    assert r.measured == pytest.approx(s_cell) and r.scale == pytest.approx(0.8 * s_cell)
    assert result == f"pass at {0.8 * s_cell:.3f}"
    # the same gain under the margin: the measured pass is kept
    det = _FakeDetection(80.0, score=lambda s: 0.93 if abs(s / s_cell - 0.8) < 1e-6 else 0.9)
    _, r = refine_scale(det, 0.3, (600, 800), 40.0, st)
    assert len(det.calls) == 4 and r.scale == r.measured == pytest.approx(s_cell)
    # no probe: as before, and measured == scale
    det = _FakeDetection(80.0)
    _, r = refine_scale(det, 0.3, (600, 800), 40.0, RefineSettings())
    assert len(det.calls) == 2 and r.measured == r.scale
    with pytest.raises(ValueError, match="probe"):
        refine_scale(det, 0.3, (600, 800), 40.0, RefineSettings(probe=(0.8, 0.0)))


# ----------------------------------------------------------------------------
# one magnification per microscope (segmentation.scale_spread)
# ----------------------------------------------------------------------------


def _est(s, ok=True, ruler="white", white=50.0):
    from segmentation.magnification import ScaleEstimate

    return ScaleEstimate(float("nan"), 2, s, ok, ruler if ok else "none", white)


def test_pool_scales_takes_the_median_of_the_measured_images():
    from segmentation.magnification import pool_scales

    p = pool_scales([_est(0.2), _est(0.3, white=40.0), _est(0.9, ok=False), _est(0.25)])
    assert p.ruler == "pooled" and p.ok
    assert p.scale == pytest.approx(0.25)  # the failed image's fallback is not counted
    assert p.n_images == 3 and p.n_cells == 6 and p.white_px == pytest.approx(50.0)
    assert np.isnan(p.diameter_px)  # no image had the red ruler
    assert pool_scales([_est(0.7, ok=False)]) is None and pool_scales([]) is None


def test_hold_to_pool_keeps_an_estimate_near_the_median_and_holds_one_far_off():
    from segmentation.magnification import hold_to_pool, pool_scales

    pooled = pool_scales([_est(0.2), _est(0.4), _est(0.3)])  # median 0.3
    near = hold_to_pool(_est(0.33), pooled, 1.25)
    assert near.scale == 0.33 and near.ruler == "white"  # within 1.25x: its own
    assert near.own_scale == 0.33 and near.group_scale == 0.3 and near.n_images == 3
    high = hold_to_pool(_est(0.6), pooled, 1.25)
    assert high.scale == pytest.approx(0.375) and high.own_scale == 0.6
    assert hold_to_pool(_est(0.1), pooled, 1.25).scale == pytest.approx(0.24)
    assert hold_to_pool(_est(0.33), pooled, 1.0).scale == pytest.approx(0.3)  # the median
    blank = hold_to_pool(_est(0.9, ok=False), pooled, 1.25)  # measured nothing
    assert blank.ok and blank.scale == pytest.approx(0.3) and blank.ruler == "pooled"
    # white cells mismeasured (smaller than a red cell), red cells read: the median
    from segmentation.magnification import ScaleEstimate

    odd = ScaleEstimate(70.0, 12, 0.33, True, "red", white_px=30.0)
    assert odd.white_implausible and not _est(0.33).white_implausible
    held = hold_to_pool(odd, pooled, 1.25)
    assert held.scale == pytest.approx(0.3) and held.own_scale == 0.33 and held.ruler == "red"
    with pytest.raises(ValueError, match="spread"):
        hold_to_pool(_est(0.3), pooled, 0.8)


def test_pooled_estimates_hold_each_image_near_its_folder_and_size(tmp_path):
    """Three 300 px fields of one folder (white cells 24 / 30 / 40 px): each estimate is
    held within the spread of their median; a 400 px field and a sub-folder's field are
    alone in their group and keep their own estimate; an unreadable file is left out."""
    from PIL import Image

    from segmentation.autoscale import pooled_estimates

    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    whites = {"f1.png": 24.0, "f2.png": 30.0, "f3.png": 40.0}
    for name, w in whites.items():
        Image.fromarray(_smear(w / 2.2, size=300, white=w)).save(a / name)
    Image.fromarray(_smear(20.0, size=400, white=44.0)).save(a / "big.png")
    Image.fromarray(_smear(12.0, size=300, white=26.0)).save(a / "sub" / "s.png")
    (a / "broken.png").write_bytes(b"not an image")
    paths = [*(a / n for n in whites), a / "big.png", a / "sub" / "s.png", a / "broken.png"]
    own = {p: estimate_scale(np.asarray(Image.open(p).convert("RGB")), 40.0) for p in paths[:5]}
    trio = [own[a / n].scale for n in whites]
    med = float(np.median(trio))
    for spread in (1.25, 1.0):
        got = pooled_estimates(paths, 40.0, fallback=1.0, spread=spread)
        assert set(got) == set(paths[:5])  # the broken file is absent
        for n, s in zip(whites, trio):
            e = got[a / n]
            assert e.scale == pytest.approx(np.clip(s, med / spread, med * spread))
            assert e.group_scale == pytest.approx(med) and e.n_images == 3
            assert e.own_scale == pytest.approx(s)
        for p in paths[3:5]:  # alone in their group: their own estimate, untouched
            assert got[p].scale == pytest.approx(own[p].scale)
            assert np.isnan(got[p].group_scale)
    # the drawn cells differ by more than 1.25x, so the spread holds the two ends
    assert max(trio) / min(trio) > 1.25**2


def test_smear_folder_holds_a_samples_scales_near_their_median(tmp_path, monkeypatch):
    """The embed reader: two same-size fields of one sample whose white cells differ 2x;
    by default each estimate is held within 1.25x of their median (so they differ by
    1.25^2), scale_spread=1 gives both the median, None each its own."""
    from PIL import Image

    import segmentation.inference as inf
    from vae.inputs.query import segment_smear_folder

    _checkpoint_and_smears(tmp_path, {"smears": "a.png"})  # 60 px white cells
    Image.fromarray(_smear(14.0, size=300, white=30.0)).save(tmp_path / "smears" / "b.png")
    monkeypatch.setattr(inf, "MaskRCNNDetector", lambda *a, **k: _LilacDetector())
    folder, ckpt = tmp_path / "smears", tmp_path / "det.pt"

    def scales(**kw):
        a, _ = segment_smear_folder(folder, ckpt, estimate_cell_px=40.0, refine=False, **kw)
        return a.uns["input_scales"]["smears/a"], a.uns["input_scales"]["smears/b"]

    sa, sb = scales(scale_spread=None)
    assert sb / sa == pytest.approx(2.0, rel=0.15)
    med = (sa + sb) / 2
    ha, hb = scales()
    assert ha == pytest.approx(med / 1.25) and hb == pytest.approx(med * 1.25)
    assert scales(scale_spread=1.0) == (pytest.approx(med), pytest.approx(med))


@pytest.mark.parametrize("spread", ["1.25", "null"])
def test_segment_stage_holds_the_scale_near_its_microscopes_median(tmp_path, monkeypatch, spread):
    """stage=segment, segmentation.estimate_scale=true: two fields of one size whose white
    cells differ 2x run at scales 1.25^2 apart around their median, and the log says so;
    segmentation.scale_spread=null runs each at its own estimate."""
    from PIL import Image

    import pipeline.stages.segment as seg
    from tests.helpers.run import run_stage_in_process

    _checkpoint_and_smears(tmp_path, {"smears": "a.png"})
    Image.fromarray(_smear(14.0, size=300, white=30.0)).save(tmp_path / "smears" / "b.png")
    det = _LilacDetector()
    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: det)
    out = run_stage_in_process(
        [
            f"paths.root={tmp_path / 'out'}",
            "experiment=pool",
            f"paths.inputs.segmentation_model={tmp_path / 'det.pt'}",
            f"paths.inputs.smears={tmp_path / 'smears'}",
            "hardware.torch_threads=1",
            "segmentation.crop_size=32",
            "segmentation.min_area=50",
            "segmentation.estimate_scale=true",
            "segmentation.refine_scale=false",
            f"segmentation.scale_spread={spread}",
        ],
        "segment",
    )
    ratio = det.shapes[1][0] / det.shapes[0][0]
    log = (out / "segment.log").read_text()
    if spread == "null":
        assert ratio == pytest.approx(2.0, rel=0.15)
        assert "median of" not in log
    else:
        assert ratio == pytest.approx(1.25**2, rel=0.02)
        assert re.search(r"scale a.png: white ruler .*median of 2 images .*own \S+ held", log)


def test_a_folder_mixing_magnifications_is_reported(tmp_path, caplog):
    """Eight fields of one size at two magnifications (white cells 30 vs 66 px): the
    quartiles of their estimates lie ~2x apart and the log says the folder may mix
    magnifications; eight fields of one magnification say nothing."""
    import logging

    from PIL import Image

    from segmentation.autoscale import pooled_estimates

    for name, whites in (("mixed", [30.0] * 4 + [66.0] * 4), ("one", [30.0, 32.0] * 4)):
        (tmp_path / name).mkdir()
        for i, w in enumerate(whites):
            img = _smear(w / 2.2, size=300, white=w, seed=i)
            Image.fromarray(img).save(tmp_path / name / f"f{i}.png")
    with caplog.at_level(logging.WARNING, logger="segmentation.autoscale"):
        pooled_estimates(sorted((tmp_path / "one").glob("*.png")), 40.0, 1.0)
        assert "mix" not in caplog.text
        pooled_estimates(sorted((tmp_path / "mixed").glob("*.png")), 40.0, 1.0)
    assert "may mix magnifications" in caplog.text and "scale_spread=null" in caplog.text


def test_cell_sizes_never_echo_a_ruler_made_of_the_white_cells():
    """A scale set from the image's own white cells makes them all ~cell_px: the
    diameter is then read at the microscope's median scale, or is unknown."""
    from types import SimpleNamespace

    import pandas as pd

    from segmentation.autoscale import _size_by_ruler
    from segmentation.magnification import ScaleEstimate
    from segmentation.schema import CELL_DIAMETER

    def cells() -> SimpleNamespace:  # diameters measured at the scale used (0.5)
        return SimpleNamespace(table=pd.DataFrame({CELL_DIAMETER: [40.0, 30.0]}))

    white = ScaleEstimate(float("nan"), 2, 0.5, True, "white", 80.0)
    c = cells()
    _size_by_ruler(c, white, 0.5, own_ruler=False)
    assert c.table[CELL_DIAMETER].isna().all()  # one image, its own white cells: unknown
    held = ScaleEstimate(float("nan"), 2, 0.5, True, "white", 80.0, 9, 0.4, 0.6)
    c = cells()
    _size_by_ruler(c, held, 0.5, own_ruler=False)  # at the microscope's median, 0.4
    np.testing.assert_allclose(c.table[CELL_DIAMETER], [32.0, 24.0])
    red = ScaleEstimate(7.0, 30, 0.5, True, "red")
    c = cells()
    _size_by_ruler(c, red, 0.5, own_ruler=True)  # the red cells are a ruler of their own
    np.testing.assert_allclose(c.table[CELL_DIAMETER], [40.0, 30.0])


def test_a_detector_trained_on_real_smears_measures_new_smears(tmp_path, monkeypatch, compose):
    """A segment_train model of real smears is saved asking for the estimate (its smears
    were brought to cell_px source by source), so stage=segment on a folder of new smears
    measures each image (here the ruler's 0.3: 300 px -> 90 px) instead of running at the
    simulator's 0.6; a data config's fixed scale (data=bccd: 0.21) is a known
    magnification and wins; the simulator's model keeps its one scale."""
    from pipeline.stages.segment_train import scale_record
    from tests.helpers.run import run_stage_in_process

    real = scale_record(compose(["stage=segment_train", "data=bccd"]))
    assert real["estimate_scale"] is True and real["refine_scale"] is False
    assert real["input_scale"] is None
    sim = scale_record(compose(["stage=segment_train"]))
    assert sim["input_scale"] == 0.6 and "estimate_scale" not in sim
    _checkpoint_and_smears(tmp_path, {"smears": "a.png"}, **real)
    common = [
        f"paths.root={tmp_path / 'out'}",
        f"paths.inputs.segmentation_model={tmp_path / 'det.pt'}",
        f"paths.inputs.smears={tmp_path / 'smears'}",
        "hardware.torch_threads=1",
        "segmentation.crop_size=32",
        "segmentation.min_area=100",
    ]
    det = _lilac_segment_stage(monkeypatch)
    out = run_stage_in_process([*common, "experiment=m"], "segment")
    assert det.shapes == [(90, 90)]  # measured, one pass (refine off for this model)
    assert "magnification measured per image" in (out / "segment.log").read_text()
    det = _lilac_segment_stage(monkeypatch)
    run_stage_in_process([*common, "experiment=f", "data=bccd"], "segment")
    assert det.shapes == [(63, 63)]  # data=bccd's 0.21
    det = _lilac_segment_stage(monkeypatch)
    run_stage_in_process([*common, "experiment=o", "segmentation.estimate_scale=false"], "segment")
    assert det.shapes == [(180, 180)]  # told not to: segmentation.input_scale 0.6
