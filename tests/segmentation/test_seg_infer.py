"""stage=segment: tiling + merge, crop filters, crops, image reading, the stage itself.

Detection is replaced by a fake detector that "finds" the connected
components of a known label image inside each tile, so every count is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from skimage.measure import label, regionprops

from segmentation.cells import ImageTruth, SegmentSettings, segment_image
from segmentation.crops import (
    FilterSettings,
    count_pieces,
    edge_weights,
    extract_crop,
    filter_detections,
)
from segmentation.inference import (
    Detections,
    detect_image,
    merge_tiles,
    paste_local_masks,
    tile_grid,
)
from segmentation.io import error_line, read_rgb
from tests.helpers.run import run_pipeline, run_stage_in_process
from tests.helpers.seg_synth import LIGHT_HEADS, untrained_checkpoint


def disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def visible_cells(lab: np.ndarray, score: float = 0.9) -> Detections:
    """What a perfect detector returns for one tile: each labelled cell, cut at the tile edge."""
    masks = [lab == r.label for r in regionprops(lab)]
    return Detections.from_masks(masks, [score] * len(masks))


class FakeDetector:
    """Detector callable over a known label image; tiles arrive in ``tile_grid`` order."""

    def __init__(self, labels: np.ndarray, tile: int, overlap: int):
        self.labels = labels
        self.grid = tile_grid(*labels.shape, tile, overlap)
        self.calls: list[int] = []

    def __call__(self, tiles: list[np.ndarray]) -> list[Detections]:
        done = sum(self.calls)
        self.calls.append(len(tiles))
        out = []
        for t, img in zip(self.grid[done : done + len(tiles)], tiles):
            assert img.shape[:2] == (t.y1 - t.y0, t.x1 - t.x0)
            out.append(visible_cells(self.labels[t.y0 : t.y1, t.x0 : t.x1]))
        return out


def run_fake(labels: np.ndarray, tile: int, overlap: int) -> tuple[Detections, list[Detections]]:
    """Per-tile fake detections and their merge."""
    h, w = labels.shape
    grid = tile_grid(h, w, tile, overlap)
    per_tile = [visible_cells(labels[t.y0 : t.y1, t.x0 : t.x1]) for t in grid]
    return merge_tiles(per_tile, grid, h, w), per_tile


# ----------------------------------------------------------------------------
# tiling and merging
# ----------------------------------------------------------------------------


def test_tile_grid_covers_image_with_overlap():
    tiles = tile_grid(300, 500, 128, 40)
    assert {(t.x1 - t.x0, t.y1 - t.y0) for t in tiles} == {(128, 128)}
    cover = np.zeros((300, 500), int)
    for t in tiles:
        cover[t.y0 : t.y1, t.x0 : t.x1] += 1
    assert cover.min() >= 1
    xs = sorted({t.x0 for t in tiles})
    assert xs[0] == 0 and xs[-1] == 500 - 128
    assert min(b - a for a, b in zip(xs, xs[1:])) <= 128 - 40  # overlap >= 40
    # an image smaller than a tile: one tile, the whole image, never past its edge
    (t,) = tile_grid(100, 90, 128, 40)
    assert (t.x0, t.y0, t.x1, t.y1) == (0, 0, 90, 100)
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(100, 100, 64, 64)


def test_cell_straddling_tile_border_found_once():
    h, w = 200, 300
    grid = tile_grid(h, w, 128, 48)
    x_border = grid[0].x1  # right edge of the first tile: cells there straddle it
    labels = np.zeros((h, w), np.int32)
    cells = {
        1: disc(h, w, 60, x_border, 15),  # straddles the first vertical tile border
        2: disc(h, w, grid[0].y1, 250, 14),  # straddles a horizontal border
        3: disc(h, w, 30, 30, 10),  # inside one tile
    }
    for k, m in cells.items():
        labels[m] = k
    merged, per_tile = run_fake(labels, 128, 48)
    naive = sum(len(d) for d in per_tile)
    assert naive > 3  # the same cells are seen (whole or cut) by several tiles
    assert len(merged) == 3
    # each cell exactly once (a cell found twice and another missed would also make 3)
    hit = sorted(
        k
        for i in range(len(merged))
        for k, m in cells.items()
        if np.array_equal(merged.full_mask(i, h, w), m)
    )
    assert hit == [1, 2, 3]
    assert not merged.cut.any()  # every cell was whole in some tile


def test_cell_wider_than_any_tile_is_joined_from_fragments():
    h, w = 200, 400
    labels = np.zeros((h, w), np.int32)
    labels[80:120, 100:260] = 1  # 160 px wide: no 128-px tile holds it whole
    labels[20:40, 20:40] = 2
    merged, _ = run_fake(labels, 128, 48)
    assert len(merged) == 2
    big = int(np.argmax(merged.areas()))
    assert np.array_equal(merged.full_mask(big, h, w), labels == 1)
    assert merged.cut[big] and not merged.cut[1 - big]


def test_detect_image_batches_tiles_and_merges():
    h, w = 256, 256
    labels = np.zeros((h, w), np.int32)
    grid = tile_grid(h, w, 128, 32)
    labels[disc(h, w, 128, grid[0].x1 - 5, 12)] = 1  # near the centre: seen by 4 tiles
    fake = FakeDetector(labels, 128, 32)
    res = detect_image(fake, np.zeros((h, w, 3), np.uint8), 128, 32, batch_size=4)
    assert res.n_tiles == 9 and fake.calls == [4, 4, 1]
    assert len(res.detections) == 1
    assert np.array_equal(res.detections.full_mask(0, h, w), labels == 1)


def test_paste_local_masks_matches_torchvision_paste():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 28, 28, generator=g)
    boxes = torch.tensor(
        [
            [10.3, 12.7, 60.2, 40.9],
            [0.0, 0.0, 20.0, 30.0],
            [90.5, 70.2, 127.9, 95.9],  # reaches the right edge
            [-5.0, 50.0, 15.0, 80.0],  # starts left of the image
            [30.0, 30.0, 31.0, 31.0],  # tiny
            [100.0, 80.0, 140.0, 120.0],  # partly outside
        ]
    )
    h, w = 96, 128
    ref = paste_masks_in_image(probs[:, None], boxes, (h, w))[:, 0] > 0.5
    masks, origins = paste_local_masks(probs, boxes, h, w, 0.5)
    det = Detections(boxes.numpy(), np.ones(6), masks, origins)
    for k in range(6):
        assert np.array_equal(det.full_mask(k, h, w), ref[k].numpy()), k


# ----------------------------------------------------------------------------
# filters and crops
# ----------------------------------------------------------------------------


def _filter_scene():
    h = w = 120
    masks, scores, names = [], [], []

    def add(m, s, n):
        masks.append(m)
        scores.append(s)
        names.append(n)

    add(disc(h, w, 30, 30, 10), 0.9, "good")
    add(disc(h, w, 30, 30, 7), 0.8, "duplicate")  # second, smaller detection of "good"
    add(disc(h, w, 30, 32, 10), 0.3, "low_score")  # overlaps "good" but must not flag it
    sq = np.zeros((h, w), bool)
    sq[60:63, 10:13] = True
    add(sq, 0.9, "too_small")
    add(disc(h, w, 60, 3, 8), 0.9, "at_border")
    add(disc(h, w, 95, 40, 10), 0.9, "overlap_a")
    add(disc(h, w, 95, 48, 10), 0.9, "overlap_b")
    two = disc(h, w, 30, 80, 6) | disc(h, w, 30, 100, 6)
    add(two, 0.9, "multi_piece")
    big = np.zeros((h, w), bool)
    big[60:100, 70:110] = True
    add(big, 0.9, "too_large")
    return Detections.from_masks(masks, scores), names, h, w


def test_edge_weights_geometry():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 40, 20], [0, 0, 97, 97]], float)
    w = edge_weights(boxes, 100, 100, margin=2, cap=10.0)
    assert w[0] == pytest.approx(100 * 100 / (86 * 86))
    assert w[1] == pytest.approx(100 * 100 / (56 * 76))
    assert w[2] == 10.0  # no room left to be kept whole: capped, not infinite
    assert edge_weights(boxes[:1], 100, 100, margin=0)[0] == pytest.approx(1e4 / 8100)


def test_edge_weight_is_the_inverse_share_of_positions_the_border_test_keeps():
    """The weight reads the same mask extent as the border test, pixel for pixel: a disc
    placed at every pixel of the image is kept at h * w / weight of the positions."""
    h, w = 24, 30
    for r in (3, 6):
        kept, ext = 0, None
        for cy in range(h):
            for cx in range(w):
                det = Detections.from_masks([disc(h, w, cy, cx, r)], np.array([0.9]))
                f = filter_detections(det, h, w, FilterSettings())
                if not f.flags["at_border"][0]:
                    kept, ext = kept + 1, f.extent[0]
        assert kept > 0
        assert edge_weights(ext[None], h, w, FilterSettings().border_margin)[0] == pytest.approx(
            h * w / kept
        )


def test_edge_weights_undo_the_size_bias_of_the_border_filter():
    """Cells placed at random: the border filter keeps fewer large cells; weighting the
    kept ones by edge_weights gives back each size's share of all cells."""
    rng = np.random.default_rng(0)
    H, W, m, n = 120, 160, 2, 40000
    big = rng.random(n) < 0.3
    side = np.where(big, 60.0, 20.0)
    cx, cy = rng.uniform(0, W, n), rng.uniform(0, H, n)
    boxes = np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], 1)
    kept = (boxes[:, 0] >= m) & (boxes[:, 1] >= m) & (boxes[:, 2] <= W - m) & (boxes[:, 3] <= H - m)
    raw = big[kept].mean()
    w = edge_weights(boxes[kept], H, W, margin=m)
    corrected = (w * big[kept]).sum() / w.sum()
    assert raw < 0.2  # the filter keeps 1 in 4 large cells, 2 in 3 small ones
    assert corrected == pytest.approx(big.mean(), abs=0.015)


def res_enabled(flag: str) -> bool:
    return flag not in ("tile_cut", "touching", "low_solidity", "area_outlier")


def test_morphology_filters_drop_cut_touching_and_doublets():
    """Cells a morphologist would reject: each flagged for its own reason, whole ones kept."""
    h, w = 160, 200
    masks, names = [], []
    for i, cx in enumerate((20, 60, 100)):  # three whole, separate cells
        masks.append(disc(h, w, 30, cx, 10))
        names.append(f"whole{i}")
    masks += [disc(h, w, 90, 20, 10), disc(h, w, 90, 41, 10)]  # 1 px gap: touching
    names += ["touch_a", "touch_b"]
    masks.append(disc(h, w, 90, 100, 11) | disc(h, w, 90, 120, 11))  # doublet kept as one
    names.append("doublet")
    masks.append(disc(h, w, 140, 180, 10))
    names.append("tile_piece")
    det = Detections.from_masks(masks, np.full(len(masks), 0.9))
    det.cut = np.array([n == "tile_piece" for n in names])
    res = filter_detections(det, h, w, FilterSettings(min_area=50, max_area_ratio=2.0))
    flagged = {f: sorted(names[k] for k in np.nonzero(v)[0]) for f, v in res.flags.items()}
    assert flagged["touching"] == ["touch_a", "touch_b"]
    assert flagged["low_solidity"] == ["doublet"]
    assert flagged["area_outlier"] == ["doublet"]  # ~2.2x the median cell
    assert flagged["tile_cut"] == ["tile_piece"]
    assert sorted(names[k] for k in np.nonzero(res.kept)[0]) == ["whole0", "whole1", "whole2"]
    assert res.solidity[names.index("whole0")] > 0.9 > res.solidity[names.index("doublet")]
    # a 3 px gap is not touching; each test switches off
    far = Detections.from_masks([disc(h, w, 90, 20, 10), disc(h, w, 90, 43, 10)], np.full(2, 0.9))
    assert not filter_detections(far, h, w, FilterSettings()).flags["touching"].any()
    off = FilterSettings(
        min_area=50, touch_px=None, min_solidity=None, max_area_ratio=None, drop_tile_cut=False
    )
    assert filter_detections(det, h, w, off).kept.all()
    # the area test needs min_cells_area_ratio cells in the image
    two = Detections.from_masks([masks[0], masks[5]], np.full(2, 0.9))
    lone = FilterSettings(max_area_ratio=2.0)
    assert not filter_detections(two, h, w, lone).flags["area_outlier"].any()


def test_filters_give_exact_counts():
    det, names, h, w = _filter_scene()
    s = FilterSettings(
        score_threshold=0.5,
        min_area=50,
        max_area=1000,
        drop_border=True,
        max_overlap_iou=0.2,
        drop_multi_piece=True,
        touch_px=None,  # the morphology filters: test_morphology_filters_* below
        min_solidity=None,
        max_area_ratio=None,
    )
    res = filter_detections(det, h, w, s)
    assert [names[k] for k in np.nonzero(res.kept)[0]] == ["good"]
    counts = {f: int(v.sum()) for f, v in res.flags.items() if res_enabled(f)}
    assert counts == {
        "low_score": 1,
        "too_small": 1,
        "too_large": 1,
        "at_border": 1,
        "duplicate": 1,
        "overlapping": 2,
        "multi_piece": 1,
    }
    for f, v in res.flags.items():
        if f != "overlapping" and res_enabled(f):
            assert names[int(np.nonzero(v)[0][0])] == f
    assert res.n_pieces[names.index("multi_piece")] == 2
    # each filter can be switched off
    loose = FilterSettings(
        score_threshold=0.5,
        min_area=50,
        max_area=None,
        drop_border=False,
        max_overlap_iou=None,
        drop_multi_piece=False,
        duplicate_containment=None,
    )
    loose.touch_px = loose.min_solidity = loose.max_area_ratio = None
    res2 = filter_detections(det, h, w, loose)
    kept = {names[k] for k in np.nonzero(res2.kept)[0]}
    assert kept == {
        "good",
        "duplicate",
        "at_border",
        "overlap_a",
        "overlap_b",
        "multi_piece",
        "too_large",
    }
    # without the duplicate test, "good" and its duplicate overlap: both dropped
    no_dup = FilterSettings(
        min_area=50,
        max_area=1000,
        duplicate_containment=None,
        touch_px=None,
        min_solidity=None,
        max_area_ratio=None,
    )
    res3 = filter_detections(det, h, w, no_dup)
    assert not res3.kept[names.index("good")] and res3.flags["overlapping"].sum() == 4


def test_count_pieces_ignores_specks():
    m = disc(40, 40, 20, 20, 8)
    m[0, 0] = True  # 1 px speck
    assert count_pieces(m, min_piece_area=1) == 2
    assert count_pieces(m, min_piece_area=10) == 1
    assert count_pieces(np.zeros((4, 4), bool)) == 0


@pytest.mark.parametrize("bg", [0, 7, 255])
def test_crop_background_and_centering(bg):
    rng = np.random.default_rng(0)
    h, w = 100, 120
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    m = disc(h, w, 50, 60, 12)
    det = Detections.from_masks([m], [0.9])
    crop, cmask, scale, center = extract_crop(
        image, det.masks[0], det.origins[0], 48, background_value=bg
    )
    assert crop.shape == (48, 48, 3) and cmask.shape == (48, 48) and scale == 1.0
    assert (crop[~cmask] == bg).all()
    assert cmask.sum() == m.sum()  # native resolution: mask copied exactly
    ys, xs = np.nonzero(cmask)
    assert abs(ys.mean() - 23.5) <= 1 and abs(xs.mean() - 23.5) <= 1
    # inside the mask, the crop holds the image pixels
    cy, cx = np.nonzero(m)
    oy, ox = int(center[1] - 24), int(center[0] - 24)
    assert np.array_equal(crop[cy - oy, cx - ox], image[cy, cx])


def test_large_cell_is_resized_and_border_cell_padded():
    h, w = 200, 200
    image = np.full((h, w, 3), 200, np.uint8)
    big = disc(h, w, 100, 100, 40)  # 81 px > crop 32 -> resized
    det = Detections.from_masks([big], [0.9])
    crop, cmask, scale, _ = extract_crop(image, det.masks[0], det.origins[0], 32, 5, margin=0.1)
    assert scale == pytest.approx(32 / np.ceil(81 * 1.2))
    assert (crop[~cmask] == 5).all() and (crop[cmask] == 200).all()
    side = np.ceil(81 * 1.2)  # window around the cell, resized to 32 px
    assert abs(cmask.mean() - big.sum() / side**2) < 0.02
    edge = disc(h, w, 100, 2, 10)  # cut by the image border: window padded
    det = Detections.from_masks([edge], [0.9])
    crop, cmask, scale, _ = extract_crop(image, det.masks[0], det.origins[0], 32, 5)
    assert scale == 1.0 and (crop[~cmask] == 5).all() and cmask.sum() == edge.sum()


def test_fill_enlarges_a_small_cell_to_the_framing_of_a_large_one():
    """fill=True (crop folders): a cell smaller than the crop fills it as a large one does."""
    h, w = 200, 200
    image = np.full((h, w, 3), 200, np.uint8)
    for r in (6, 40):  # 13 px and 81 px cells, crop 32
        m = disc(h, w, 100, 100, r)
        det = Detections.from_masks([m], [0.9])
        crop, cmask, scale, _ = extract_crop(
            image, det.masks[0], det.origins[0], 32, 5, margin=0.1, fill=True
        )
        side = np.ceil((2 * r + 1) * 1.2)
        assert scale == pytest.approx(32 / side)
        ys, xs = np.nonzero(cmask)  # the cell spans 1 / 1.2 of the crop, whatever its size
        assert abs((xs.max() - xs.min() + 1) - 32 / 1.2) <= 1.5
        assert (crop[~cmask] == 5).all() and (crop[cmask] == 200).all()
    small = disc(h, w, 100, 100, 6)  # without fill it keeps its source px
    det = Detections.from_masks([small], [0.9])
    crop, cmask, scale, _ = extract_crop(image, det.masks[0], det.origins[0], 32, 5)
    assert scale == 1.0 and cmask.sum() == small.sum()


def test_roi_scales_do_not_depend_on_the_first_image():
    """torchvision infers the RoI poolers' scales from the first batch and keeps them; a
    first image much smaller than its padded batch (43 px -> 64) used to fix the stride-4
    level at 1/2, and every later image gave dozens of spurious boxes. They are pinned at
    build time now, so a detector's answer does not depend on what it saw first."""
    from segmentation.inference import MaskRCNNDetector
    from segmentation.model import build_maskrcnn

    def fresh():
        torch.manual_seed(0)
        m = build_maskrcnn("resnet18_fpn", min_size=64, max_size=64, **LIGHT_HEADS)
        return MaskRCNNDetector(m.eval(), "cpu", score_floor=0.0, cpu_bf16=False)

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (43, 43, 3), dtype=np.uint8)
    cell = rng.integers(0, 256, (47, 47, 3), dtype=np.uint8)
    first = fresh()
    pools = (first.model.roi_heads.box_roi_pool, first.model.roi_heads.mask_roi_pool)
    assert all(p.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32] for p in pools)
    first([small])
    after = first([cell])[0]
    assert all(p.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32] for p in pools)
    alone = fresh()([cell])[0]
    assert len(after) == len(alone) > 0
    assert np.allclose(after.boxes, alone.boxes, atol=1e-3)
    assert np.allclose(after.scores, alone.scores, atol=1e-5)


def test_overlay_of_a_large_image_is_drawn_at_most_max_side_px():
    """The 196 MP slide's overlay was a 303 MB full-size PNG: a large image's overlay is
    drawn on a copy OVERLAY_MAX_SIDE px long, outlines and boxes where the cells are."""
    from segmentation.cells import KEPT, draw_overlay

    h, w = 100, 400
    labels = np.zeros((h, w), np.int32)
    labels[disc(h, w, 50, 300, 20)] = 1

    def detector(tiles):
        return [Detections.from_masks([labels == 1], [0.95])]

    settings = SegmentSettings(tile_size=512, tile_overlap=64, crop_size=48)
    settings.filters = FilterSettings(min_area=50)
    img = np.full((h, w, 3), 200, np.uint8)
    cells = segment_image(detector, img, "wide.png", settings)
    full = np.asarray(draw_overlay(cells, 0.5, max_side=None))
    small = np.asarray(draw_overlay(cells, 0.5, max_side=100, labels=False))
    assert full.shape == (100, 400, 3) and small.shape == (25, 100, 3)
    outline = (small == KEPT).all(axis=-1)  # the kept mask's outline (and box)
    ys, xs = np.nonzero(outline)
    assert ys.size and 68 <= xs.min() and xs.max() <= 81  # the cell, x 280-320 / 4
    assert 6 <= ys.min() and ys.max() <= 19  # y 30-70 / 4
    assert np.asarray(draw_overlay(cells, 0.5)).shape == full.shape  # 400 px: not scaled


def test_segment_image_copies_matched_truth():
    h, w = 160, 200
    labels = np.zeros((h, w), np.int32)
    labels[disc(h, w, 50, 50, 15)] = 1
    labels[disc(h, w, 100, 140, 18)] = 2
    truth_masks = [labels == 1, labels == 2, disc(h, w, 130, 40, 10)]  # third: missed
    t = Detections.from_masks(truth_masks, [1, 1, 1])
    records = [
        {"cell_id": f"sim_c{i}", "kind": k, "lineage": "neutrophil", "t": 0.1 * i, "lobes": i}
        for i, k in enumerate(["band", "myelocyte", "monocyte"])
    ]
    truth = ImageTruth(t.masks, t.origins, records)

    def detector(tiles):
        assert len(tiles) == 1 and tiles[0].shape == (h, w, 3)
        masks = [labels == r.label for r in regionprops(label(labels > 0))]
        return [Detections.from_masks(masks, [0.95, 0.8])]

    settings = SegmentSettings(tile_size=256, tile_overlap=64, crop_size=48, background_value=3)
    settings.filters = FilterSettings(min_area=50)
    cells = segment_image(detector, np.zeros((h, w, 3), np.uint8), "img.png", settings, truth)
    tab = cells.table
    assert cells.n_truth == 3 and len(tab) == 2 and tab.kept.all()
    assert sorted(tab.truth_cell_id) == ["sim_c0", "sim_c1"]
    assert (tab.match_iou == 1.0).all()
    row = tab[tab.truth_cell_id == "sim_c1"].iloc[0]
    assert row.kind == "myelocyte" and row.t == pytest.approx(0.1) and row.lobes == 1
    assert np.isnan(row.granule_density)  # absent field -> NaN
    assert cells.crops.images.shape == (2, 48, 48, 3)
    assert (cells.crops.images[~cells.crops.masks] == 3).all()


def test_input_scale_reports_source_pixels():
    h, w = 200, 200
    m = disc(h, w, 100, 100, 20)
    seen = []

    def detector(tiles):
        seen.append(tiles[0].shape)
        th, tw = tiles[0].shape[:2]
        return [Detections.from_masks([disc(th, tw, th / 2, tw / 2, 10)], [0.9])]

    s = SegmentSettings(input_scale=0.5, tile_size=512, tile_overlap=64, crop_size=64)
    s.filters = FilterSettings(min_area=1000)  # source px: the cell has ~1250
    cells = segment_image(detector, np.zeros((h, w, 3), np.uint8), "a.png", s)
    assert seen == [(100, 100, 3)]
    row = cells.table.iloc[0]
    assert row.kept and abs(row.area - m.sum()) / m.sum() < 0.1
    assert row.x0 == pytest.approx(80, abs=2) and row.x1 == pytest.approx(121, abs=2)
    # the crop is cut from the source image at full resolution
    assert row.crop_scale == 1.0
    # the cell's size on the working frame (radius 20 source px at scale 0.5: ~20 px across)
    assert row.cell_diameter == pytest.approx(20.0, rel=0.1)
    assert abs(int(cells.crops.masks[0].sum()) - m.sum()) / m.sum() < 0.1


# ----------------------------------------------------------------------------
# image reading
# ----------------------------------------------------------------------------


def _bad_images(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    p = {}
    p["rgb"] = d / "rgb.png"
    Image.fromarray(rgb).save(p["rgb"])
    p["corrupt"] = d / "corrupt.png"
    p["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    p["empty"] = d / "empty.jpg"
    p["empty"].write_bytes(b"")
    p["gray"] = d / "gray.png"
    Image.fromarray(rgb[..., 0]).save(p["gray"])
    p["rgba"] = d / "rgba.png"
    alpha = np.full((40, 50, 1), 255, np.uint8)
    alpha[:10] = 0
    Image.fromarray(np.concatenate([rgb, alpha], -1)).save(p["rgba"])
    p["gray16"] = d / "gray16.png"
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(p["gray16"])
    p["tiny"] = d / "tiny.png"
    Image.fromarray(rgb[:3, :3]).save(p["tiny"])
    return p


def test_read_rgb_converts_or_rejects_with_reasons(tmp_path):
    p = _bad_images(tmp_path)
    r = read_rgb(p["rgb"])
    assert r.ok and r.converted == [] and r.image.shape == (40, 50, 3)
    rgb = r.image
    for name in ("corrupt", "empty"):
        r = read_rgb(p[name])
        assert not r.ok and r.reason.startswith("unreadable"), (name, r.reason)
    r = read_rgb(tmp_path / "missing.png")
    assert not r.ok and r.reason.startswith("unreadable")
    r = read_rgb(p["gray"])
    assert r.converted == ["grayscale->rgb"] and np.array_equal(r.image[..., 2], rgb[..., 0])
    r = read_rgb(p["rgba"], background=255)
    assert r.converted == ["rgba->rgb"]
    assert (r.image[:10] == 255).all() and np.array_equal(r.image[10:], rgb[10:])
    r = read_rgb(p["gray16"])
    assert set(r.converted) == {"grayscale->rgb", "16bit->8bit"}
    assert r.image.dtype == np.uint8 and np.array_equal(r.image[..., 0], rgb[..., 1])
    r = read_rgb(p["tiny"])
    assert not r.ok and r.reason.startswith("too small")
    for name in ("gray", "rgba", "gray16"):
        r = read_rgb(p[name], convert=False)
        assert not r.ok and "convert_images=false" in r.reason, name


def test_read_rgb_cmyk_jpeg_is_converted_not_taken_as_rgba(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal([200, 120, 180], 20, (40, 50, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    r = read_rgb(tmp_path / "c.jpg")
    assert r.ok and r.converted == ["cmyk->rgb"] and r.image.shape == (40, 50, 3)
    # the colours survive (JPEG loss only), where reading C, M, Y as R, G, B did not
    assert np.abs(r.image.astype(int).mean((0, 1)) - rgb.mean((0, 1))).max() < 8


def test_read_rgb_reads_past_pillows_bomb_guard_and_names_its_own_size_limit(tmp_path, monkeypatch):
    """A whole-slide scan over Pillow's 179 MP "decompression bomb" guard was rejected as
    "unreadable"; the size limit is now the project's own, read from the header and named."""
    from PIL import Image

    from segmentation import io

    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(tmp_path / "slide.png")
    assert Image.MAX_IMAGE_PIXELS is None  # lifted on import, for every reader
    monkeypatch.setattr(io, "MAX_IMAGE_MEGAPIXELS", 0.001)  # 1000 px
    r = read_rgb(tmp_path / "slide.png")
    assert not r.ok and r.reason.startswith("too large to read whole: 40x30 px"), r.reason
    assert "tiled TIFF, which is read window by window" in r.reason


def test_read_rgb_16bit_rgb_tiff(tmp_path):
    a = (np.arange(20 * 30 * 3).reshape(20, 30, 3) * 30).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a)
    r = read_rgb(tmp_path / "a.tif")
    assert r.ok and r.converted == ["16bit->8bit"]
    assert np.array_equal(r.image, np.round(a / 65535 * 255).astype(np.uint8))


def test_read_rgb_planar_and_multi_page_tiffs(tmp_path):
    """Channels stored as planes, and a stack of pages: read (the first page, said so),
    not refused as an 'unsupported array shape' (image_problem passed them, so training
    would have stopped at them mid-epoch)."""
    from segmentation.datasets import ImageRecord, image_problem

    rgb = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(
        tmp_path / "planar.tif", rgb.transpose(2, 0, 1), planarconfig="separate", photometric="rgb"
    )
    tifffile.imwrite(tmp_path / "pages.tif", np.stack([rgb, 255 - rgb]), photometric="rgb")
    r = read_rgb(tmp_path / "planar.tif")
    assert r.ok and r.converted == [] and np.array_equal(r.image, rgb)
    r = read_rgb(tmp_path / "pages.tif")
    assert r.ok and r.converted == ["first page of 2"] and np.array_equal(r.image, rgb)
    for name in ("planar.tif", "pages.tif"):
        rec = ImageRecord(path=tmp_path / name, width=50, height=40)
        assert image_problem(rec) is None
    # 16-bit planes: their pixels, converted and said so (Pillow read them as wrong
    # 8-bit pixels without a word); with convert_images=false refused as 16-bit
    wide = rgb.astype(np.uint16) * 257
    tifffile.imwrite(
        tmp_path / "p16.tif", wide.transpose(2, 0, 1), planarconfig="separate", photometric="rgb"
    )
    tifffile.imwrite(tmp_path / "pages16.tif", np.stack([wide, wide]), photometric="rgb")
    r = read_rgb(tmp_path / "p16.tif")
    assert r.ok and r.converted == ["16bit->8bit"] and np.array_equal(r.image, rgb)
    r = read_rgb(tmp_path / "pages16.tif")
    assert r.ok and r.converted == ["first page of 2", "16bit->8bit"]
    assert np.array_equal(r.image, rgb)
    assert not read_rgb(tmp_path / "p16.tif", convert=False).ok
    # a stack of grey pages: the first page, as grey
    grey = np.stack([rgb[..., 0], rgb[..., 1], rgb[..., 2]])
    tifffile.imwrite(tmp_path / "grey.tif", grey, photometric="minisblack")
    r = read_rgb(tmp_path / "grey.tif")
    assert r.ok and r.converted == ["first page of 3", "grayscale->rgb"]
    assert np.array_equal(r.image[..., 1], rgb[..., 0])


# ----------------------------------------------------------------------------
# the stage, end to end (untrained checkpoint: plumbing, not accuracy)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained_ckpt(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _smear_folder(d: Path) -> Path:
    """Two small RGB smears with COCO truth, plus a corrupt and a grayscale file."""
    from pycocotools import mask as mask_utils

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "wbc"}]}
    for i in range(2):
        h, w = 96, 128
        img = np.full((h, w, 3), (230, 200, 200), np.uint8)
        m = disc(h, w, 40 + 10 * i, 60, 14)
        img[m] = (120, 60, 160)
        img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"sim_{i:04d}.png")
        coco["images"].append(
            {"id": i, "file_name": f"sim_{i:04d}.png", "width": w, "height": h, "split": "val"}
        )
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        coco["annotations"].append(
            {
                "id": i,
                "image_id": i,
                "category_id": 1,
                "bbox": [46, 26 + 10 * i, 29, 29],
                "area": int(m.sum()),
                "segmentation": rle,
                "iscrowd": 0,
                "cell_id": f"sim{i:04d}_c00",
                "kind": "band",
                "lineage": "neutrophil",
                "t": 0.5,
                "granule_density": 0.3,
                "lobes": 1,
                "diameter": 29.0,
            }
        )
    (d / "annotations.json").write_text(json.dumps(coco))
    (d / "zz_corrupt.png").write_bytes(b"not a png")
    Image.fromarray(np.full((96, 128), 200, np.uint8)).save(d / "zz_gray.png")
    return d


def _run_segment(tmp_path: Path, ckpt: Path, smears: Path, *extra: str, here: bool = False):
    """stage=segment by the CLI, or ``here``: in this process (no interpreter start-up)."""
    cmd = [
        "stage=segment",
        "experiment=seginf_test",
        f"paths.root={tmp_path / 'out'}",
        f"paths.inputs.smears={smears}",
        f"paths.inputs.segmentation_model={ckpt}",
        "hardware.torch_threads=1",
        "segmentation.crop_size=32",
        "segmentation.tile_size=128",
        "segmentation.tile_overlap=32",
        "segmentation.min_area=20",
        *extra,
    ]
    if here:
        return run_stage_in_process(cmd[1:], "segment")
    r = run_pipeline(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / "out" / "seginf_test" / "segment"


def _check_outputs(out: Path, crop: int = 32):
    import anndata as ad
    import pandas as pd

    a = ad.read_h5ad(out / "cells.h5ad")
    n = a.n_obs
    assert a.obsm["crops"].shape == (n, crop, crop, 3) and a.obsm["crops"].dtype == np.uint8
    assert a.obsm["masks"].shape == (n, crop, crop) and a.obsm["masks"].dtype == bool
    assert a.uns["crop_size"] == crop
    bg = int(a.uns["background_value"])
    assert (a.obsm["crops"][~a.obsm["masks"]] == bg).all()
    det = pd.read_csv(out / "detections.csv")
    assert int(det.kept.sum()) == n == a.uns["filter_counts"]["kept"]
    assert a.uns["filter_counts"]["detections"] == len(det)
    rej = pd.read_csv(out / "rejects.csv")
    reasons = dict(zip(rej.image + ":" + rej.action, rej.reason))
    assert reasons["zz_corrupt.png:skipped"].startswith("unreadable")
    assert reasons["zz_gray.png:converted"] == "grayscale->rgb"
    # one row per confident detection not kept, naming the flags it failed
    from segmentation.crops import FLAGS

    cells = rej[rej.action == "rejected_cell"].set_index("cell_id")
    dropped = det[~det.kept & ~det.low_score & ~det.duplicate].set_index("cell_id")
    assert sorted(cells.index) == sorted(dropped.index)
    for cid, r in dropped.iterrows():
        assert cells.loc[cid, "reason"] == ",".join(f for f in FLAGS if r[f])
    assert (out / "contact_sheet.png").is_file() and (out / "rejects.png").is_file()
    assert sorted(p.name for p in (out / "overlays").iterdir())[:2] == [
        "sim_0000.png",
        "sim_0001.png",
    ]
    assert not (out / ".segment_parts").exists()
    _check_masks_put_back(out, a)
    # the run's scale, beside the network's own (model_args.input_scale, always 1)
    summary = json.loads((out / "summary.json").read_text())
    scale = summary["input_scale"]
    assert scale == a.uns["input_scale"] or str(scale).startswith("per image")
    return a, det


def _placed(crop_mask: np.ndarray, x0: int, y0: int, side: int, hw) -> np.ndarray:
    """A crop mask put back on its image: resized to ``side``, top-left at (x0, y0)."""
    from PIL import Image

    big = Image.fromarray(crop_mask.astype(np.float32)).resize(
        (side, side), Image.Resampling.BILINEAR
    )
    out = np.zeros(hw, bool)
    ys, xs = np.nonzero(np.asarray(big) >= 0.5)
    ys, xs = ys + y0, xs + x0
    ok = (ys >= 0) & (xs >= 0) & (ys < hw[0]) & (xs < hw[1])
    out[ys[ok], xs[ok]] = True
    return out


def _check_masks_put_back(out: Path, a) -> None:
    """masks/<stem>.tif: one label image per image read (ImageJ / napari read it), label
    = obs mask_label; each crop mask put back at its window lies on its label."""
    from skimage import io as skio

    tifs = sorted(p.name for p in (out / "masks").iterdir())
    assert tifs == ["sim_0000.tif", "sim_0001.tif", "zz_gray.tif"]  # the corrupt one: none
    for image, g in a.obs.groupby("image", observed=True):
        lab = skio.imread(out / "masks" / (Path(image).stem + ".tif"))
        assert lab.dtype == np.uint16 and lab.ndim == 2
        assert sorted(set(np.unique(lab)) - {0}) == sorted(g.mask_label)
        for cid, r in g.iterrows():
            m = a.obsm["masks"][a.obs_names.get_loc(cid)]
            put = _placed(m, int(r.crop_x0), int(r.crop_y0), int(r.crop_side), lab.shape)
            mine = lab == r.mask_label
            assert (put & mine).sum() / (put | mine).sum() > 0.9, cid


def test_crop_windows_put_every_crop_back_on_its_cell():
    """crop_x0 / crop_y0 / crop_side (Crops.windows): a box centre and crop_scale missed
    the cell by 1-3 px for 40 % of the real chain's cells."""
    from segmentation.crops import extract_crops, label_image

    h, w = 160, 200
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    cells = [disc(h, w, 40, 50, 6), disc(h, w, 100, 120, 29.5), disc(h, w, 150, 3, 9)]
    det = Detections.from_masks(cells, [0.9] * 3)
    lab = label_image((h, w), det.masks, det.origins)
    assert lab.dtype == np.uint16 and sorted(np.unique(lab)) == [0, 1, 2, 3]
    for fill in (False, True):
        c = extract_crops(image, det, 32, 0, 0.1, fill=fill)
        for k, (x0, y0, side) in enumerate(c.windows):
            put = _placed(c.masks[k], x0, y0, side, (h, w))
            iou = (put & cells[k]).sum() / (put | cells[k]).sum()
            assert iou > (0.999 if side == 32 else 0.85), (fill, k, iou)
            win = image[max(y0, 0) : y0 + side, max(x0, 0) : x0 + side]
            if side == 32 and x0 >= 0 and y0 >= 0:  # unresized: the crop is the window
                assert np.array_equal(c.images[k][c.masks[k]], win[c.masks[k]])


def test_label_image_keeps_the_first_cell_where_two_overlap_and_clips_at_the_edge():
    from segmentation.crops import label_image

    m = np.ones((4, 4), bool)
    lab = label_image((6, 6), [m, m], np.array([[0, 0], [2, 2]]))
    assert lab[3, 3] == 1 and lab[5, 5] == 2 and lab[0, 5] == 0
    lab = label_image((6, 6), [m], np.array([[-2, 4]]))  # partly outside the image
    assert lab.sum() == 4 and lab[4:, :2].all()


def test_overlay_names_of_images_that_share_a_stem(tmp_path):
    from pipeline.stages.segment import overlay_name

    for name in ("cell.jpg", "cell.PNG", "other.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.png").write_bytes(b"x")
    assert overlay_name(tmp_path / "cell.jpg") == "cell_jpg.png"
    assert overlay_name(tmp_path / "cell.PNG") == "cell_png.png"
    assert overlay_name(tmp_path / "other.png") == "other.png"
    assert overlay_name(tmp_path / "notes.png") == "notes.png"  # a .txt is no image
    (tmp_path / "other.v2.png").write_bytes(b"x")  # another stem, not a twin of other.png
    assert overlay_name(tmp_path / "other.png") == "other.png"
    # the folder is listed once per change: a twin added later is seen
    import os

    (tmp_path / "other.jpg").write_bytes(b"x")
    st = (tmp_path).stat()
    os.utime(tmp_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse clocks
    assert overlay_name(tmp_path / "other.png") == "other_png.png"


def test_stage_segment_subprocess_untrained(tmp_path, untrained_ckpt):
    smears = _smear_folder(tmp_path / "smears")
    # score 0: the untrained net's detections pass, so the crop path runs end to end
    out = _run_segment(tmp_path, untrained_ckpt, smears, "segmentation.score_threshold=0.0")
    a, det = _check_outputs(out)
    assert len(det) > 0 and {"truth_cell_id", "kind", "match_iou"} <= set(det.columns)
    assert {"image", "x0", "y0", "x1", "y1", "score", "area", "at_border"} <= set(a.obs.columns)
    # each kept cell carries its edge weight (>= 1, capped at 10), every detection too
    ew = a.obs["edge_weight"].to_numpy(float)
    assert np.isfinite(ew).all() and (ew >= 1).all() and (ew <= 10).all()
    assert np.isfinite(det["edge_weight"].to_numpy(float)).all()
    # each cell says the scale its image was read at (here the one configured scale)
    assert np.allclose(a.obs["input_scale"], float(a.uns["input_scale"]))
    assert np.allclose(det["input_scale"], float(a.uns["input_scale"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["truth"]["n_truth"] == 2
    assert summary["filter_counts"]["images_read"] == 3  # corrupt one skipped


def test_stage_segment_broken_truth_file_is_a_user_error(tmp_path, untrained_ckpt):
    from pipeline.runner import StageError

    smears = _smear_folder(tmp_path / "smears")
    (smears / "annotations.json").write_text("{not json")
    with pytest.raises(StageError, match="annotations.json: not readable JSON.*move it out"):
        _run_segment(tmp_path, untrained_ckpt, smears, here=True)


def test_stage_segment_zero_cells_is_valid(tmp_path, untrained_ckpt):
    smears = _smear_folder(tmp_path / "smears")
    # 1.0: the top of the valid range [0, 1]; an untrained model scores far below it
    out = _run_segment(
        tmp_path, untrained_ckpt, smears, "segmentation.score_threshold=1.0", here=True
    )
    a, det = _check_outputs(out)
    assert a.n_obs == 0 and a.uns["filter_counts"]["low_score"] == len(det)
    import pandas as pd

    rej = pd.read_csv(out / "rejects.csv")
    assert set(rej[rej.action == "no_cells"].image) == {
        "sim_0000.png",
        "sim_0001.png",
        "zz_gray.png",
    }


@pytest.mark.slow
def test_stage_segment_two_ranks_matches_one(tmp_path, untrained_ckpt):
    import pandas as pd

    smears = _smear_folder(tmp_path / "smears")
    one = _run_segment(tmp_path / "a", untrained_ckpt, smears, "segmentation.score_threshold=0.0")
    two = _run_segment(
        tmp_path / "b",
        untrained_ckpt,
        smears,
        "segmentation.score_threshold=0.0",
        "hardware.num_processes=2",
        "hardware.master_port=0",
    )
    d1, d2 = pd.read_csv(one / "detections.csv"), pd.read_csv(two / "detections.csv")
    assert list(d1.cell_id) == list(d2.cell_id)
    np.testing.assert_allclose(d1.score, d2.score, rtol=1e-4)
    a1, _ = _check_outputs(one)
    a2, _ = _check_outputs(two)
    assert np.array_equal(a1.obsm["masks"], a2.obsm["masks"])


@pytest.mark.slow
def test_segment_train_then_segment_subprocess(tmp_path):
    """The issue's chain: stage=segment_train then stage=segment on the same smears."""
    from tests.helpers.seg_synth import make_coco_smears

    smears = tmp_path / "smears"
    make_coco_smears(smears, n_images=3, size=96, cells=2, radius=10, val=1)
    common = [
        "experiment=chain",
        f"paths.root={tmp_path / 'out'}",
        f"paths.inputs.smears={smears}",
        "hardware.torch_threads=1",
        "segmentation.input_scale=1.0",
    ]
    train = [
        "stage=segment_train",
        "segmentation.epochs=1",
        "segmentation.anchor_sizes=[8,16,32,64,128]",
        "segmentation.rpn_pre_nms_top_n_train=100",
        "segmentation.rpn_post_nms_top_n_train=50",
        "segmentation.box_batch_size_per_image=32",
        "segmentation.rpn_batch_size_per_image=32",
        "segmentation.warmup_iters=1",
        "segmentation.tb_images=1",
    ]
    r = run_pipeline([*common, *train], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seg = ["stage=segment", "segmentation.crop_size=32", "segmentation.score_threshold=0.0"]
    r = run_pipeline([*common, *seg], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import anndata as ad

    out = tmp_path / "out" / "chain" / "segment"
    a = ad.read_h5ad(out / "cells.h5ad")
    assert a.obsm["crops"].shape == (a.n_obs, 32, 32, 3)
    assert a.obsm["masks"].shape == (a.n_obs, 32, 32)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["truth"]["n_truth"] == 6 and summary["filter_counts"]["images_read"] == 3


def test_image_list_split_and_max_images(tmp_path):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from pipeline.runner import StageError
    from pipeline.stages.segment import _image_list
    from segmentation.cells import load_coco_truth

    smears = _smear_folder(tmp_path / "smears")
    coco = json.loads((smears / "annotations.json").read_text())
    coco["images"][0]["split"] = "train"
    (smears / "annotations.json").write_text(json.dumps(coco))
    truth = load_coco_truth(smears / "annotations.json")

    def names(split, max_images, t=truth):
        cfg = OmegaConf.create({"segmentation": {"split": split, "max_images": max_images}})
        return [p.name for p in _image_list(SimpleNamespace(cfg=cfg), smears, t)]

    assert names(None, None) == ["sim_0000.png", "sim_0001.png", "zz_corrupt.png", "zz_gray.png"]
    assert names("val", None) == ["sim_0001.png"]
    assert names(None, 1) == ["sim_0000.png"]
    with pytest.raises(StageError, match="split"):
        names("val", None, None)


def test_maskrcnn_detector_mixed_tile_sizes_no_resize():
    from segmentation.inference import MaskRCNNDetector
    from segmentation.model import build_maskrcnn

    torch.manual_seed(0)
    model = build_maskrcnn("resnet18_fpn", min_size=512, max_size=512)  # would upscale
    det = MaskRCNNDetector(model, "cpu", score_floor=0.0, max_detections=5)
    seen = []
    model.backbone.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(64, 96, 3), (80, 48, 3)]]
    out = det(tiles)
    assert seen == [(2, 3, 96, 96)]  # padded batch of the unresized tiles (size_divisible 32)
    for d, t in zip(out, tiles):
        h, w = t.shape[:2]
        assert len(d) <= 5
        for m, (x, y) in zip(d.masks, d.origins):
            assert 0 <= x and 0 <= y and x + m.shape[1] <= w and y + m.shape[0] <= h


def test_detect_images_shares_batches_and_matches_one_by_one():
    from segmentation.inference import detect_images

    calls = []

    def bright_cells(tiles):
        """Content-based fake: every bright blob of channel 0 is a cell."""
        calls.append([t.shape[:2] for t in tiles])
        return [visible_cells(label(t[..., 0] > 128)) for t in tiles]

    def img(h, w, centres):
        a = np.zeros((h, w, 3), np.uint8)
        for cy, cx in centres:
            a[disc(h, w, cy, cx, 9)] = 255
        return a

    images = [img(60, 80, [(30, 40)]), img(200, 260, [(100, 128), (40, 40)]), img(50, 50, [])]
    together = detect_images(bright_cells, images, 128, 40, batch_size=4)
    n_tiles = [r.n_tiles for r in together]
    assert n_tiles == [1, 6, 1] and [len(c) for c in calls] == [4, 4]  # 8 tiles, 2 passes
    assert {(60, 80), (128, 128), (50, 50)} == {s for c in calls for s in c}
    for im, res in zip(images, together):
        alone = detect_image(bright_cells, im, 128, 40, batch_size=1)
        assert len(res.detections) == len(alone.detections)
        for k in range(len(alone.detections)):
            h, w = im.shape[:2]
            assert np.array_equal(
                res.detections.full_mask(k, h, w), alone.detections.full_mask(k, h, w)
            )
    assert [len(r.detections) for r in together] == [1, 2, 0]
    # a pixel budget per pass: the 128 px tiles (16384 px) go two at a time, the small
    # images' tiles share a pass while they fit; the detections do not change
    calls.clear()
    streamed = detect_images(bright_cells, images, 128, 40, batch_size=4, batch_megapixels=0.033)
    assert [len(c) for c in calls] == [2, 2, 2, 2]
    assert all(sum(h * w for h, w in c) <= 33000 for c in calls)
    for a_, b_ in zip(together, streamed):
        assert np.array_equal(a_.detections.boxes, b_.detections.boxes)
    calls.clear()
    detect_images(bright_cells, images[1:2], 128, 40, batch_size=4, batch_megapixels=0.001)
    assert [len(c) for c in calls] == [1] * 6  # a tile above the budget still goes, alone


def test_error_line_is_one_line_and_never_fails():
    """A reader's error goes into a one-line user message: its first line, cut to the
    limit, or its type where it has no text (an empty message crashed the old slicing)."""
    assert error_line(ValueError("bad header\nTraceback detail")) == "bad header"
    assert error_line(RuntimeError("x" * 500), limit=10) == "x" * 10
    assert error_line(RuntimeError()) == "RuntimeError"
    assert error_line(OSError("  \n")) == "OSError"


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_trim_rim_peels_background_not_cell():
    """A mask 3 px too large around a cell on a pale smear is peeled back to the cell;
    a pale cytoplasm ring (as dense as half-way to the cell) stays; a cell as pale as
    the background keeps its mask (max_loss); the mask never grows."""
    from segmentation.crops import background_od, trim_rim

    h = w = 80
    img = np.full((h, w, 3), 235, np.uint8)  # glass / plasma
    cell = _disc(h, w, 40, 40, 18)
    img[cell] = (150, 110, 170)  # cytoplasm
    img[_disc(h, w, 40, 40, 10)] = (70, 40, 120)  # nucleus
    too_big = _disc(h, w, 40, 40, 21)
    bg = background_od(img)
    assert abs(bg - 3 * np.log(255 / 235)) < 1e-3
    ys, xs = np.nonzero(too_big)
    o = (xs.min(), ys.min())
    local = too_big[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    out = trim_rim(img, local, o, bg, max_px=4)
    full = np.zeros((h, w), bool)
    full[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = out
    assert (full & ~too_big).sum() == 0  # never grows
    assert (full ^ cell).sum() <= 0.02 * cell.sum()  # back to the cell
    # off, or a mask already at the cell: unchanged
    assert np.array_equal(trim_rim(img, local, o, bg, max_px=0), local)
    cl = cell[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert np.array_equal(trim_rim(img, cl, o, bg, max_px=4), cl)
    # a cell as pale as the glass: peeling would take most of it, so it keeps its mask
    pale = np.full((h, w, 3), 235, np.uint8)
    pale[_disc(h, w, 40, 40, 6)] = (90, 60, 140)
    assert np.array_equal(trim_rim(pale, local, o, background_od(pale), max_px=4), local)


def test_stage_segment_with_no_readable_image_fails_naming_the_folder(tmp_path, untrained_ckpt):
    """Every image unreadable: an error naming the folder, the reasons in rejects.csv, no
    empty cells.h5ad to fail later at stage=pair."""
    import pandas as pd

    from pipeline.runner import StageError

    d = tmp_path / "allbad"
    d.mkdir()
    (d / "a.png").write_bytes(b"not a png")
    (d / "b.jpg").write_text("nor a jpeg")
    with pytest.raises(StageError, match=r"none of its 2 images could be read"):
        _run_segment(tmp_path, untrained_ckpt, d, here=True)
    out = tmp_path / "out" / "seginf_test" / "segment"
    assert not (out / "cells.h5ad").exists()
    rej = pd.read_csv(out / "rejects.csv")
    assert set(rej.image) == {"a.png", "b.jpg"}


def test_whole_cell_check_scores_a_nucleus_box_as_partial():
    """scripts/whole_cell_check.py: a kept box over the cell's nucleus half overlaps its
    cell (IoU 0.5 hit, not 0.75) and counts as partial; a whole box does not; a kept box on
    no cell lowers precision; a missed cell lowers recall."""
    from tests.helpers.run import load_script

    mod = load_script("whole_cell_check")
    truth = np.array([[0, 0, 100, 100], [200, 200, 300, 300]], float)
    nucleus = np.array([[10, 10, 80, 80]], float)  # 49 % of the first cell's box
    r = mod.score_image(nucleus, truth)
    assert r["hit50"] == [False, False] and r["cover"] == [pytest.approx(0.49)]
    whole = np.array([[2, 0, 100, 98], [200, 200, 300, 300], [400, 400, 450, 450]], float)
    w = mod.score_image(whole, truth)
    assert w["hit50"] == [True, True] and w["hit75"] == [True, True]
    s = mod.summary([r, w], seconds=2.0)
    assert s["recall50"] == 0.5 and s["truth_cells"] == 4 and s["kept_cells"] == 4
    assert s["partial"] == pytest.approx(1 / 3)  # 3 truth cells overlapped, 1 cut down
    assert s["precision50"] == 0.5  # the nucleus box and the empty-field box miss
    assert s["s_per_image"] == 1.0


class _Blobs:
    """Every dark connected region of a tile is one white cell (score 0.9): a detector
    that finds the test smears' cells, where the untrained network may keep none."""

    def __call__(self, tiles):
        from scipy import ndimage

        out = []
        for t in tiles:
            lab, n = ndimage.label(t.mean(axis=2) < 150)
            out.append(Detections.from_masks([lab == i for i in range(1, n + 1)], [0.9] * n))
        return out


def test_the_docs_mask_recipe_runs(tmp_path, untrained_ckpt, monkeypatch):
    """docs/segmentation_infer.md "The masks in other tools", run as written on a
    stage=segment output whose cells were found: each crop put back lies on its label."""
    import re

    import anndata as ad

    import pipeline.stages.segment as seg

    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: _Blobs())
    smears = _smear_folder(tmp_path / "smears")
    out = _run_segment(tmp_path, untrained_ckpt, smears, here=True)
    a = ad.read_h5ad(out / "cells.h5ad")
    assert a.n_obs == 2  # one disc per smear
    _check_masks_put_back(out, a)
    text = (Path(__file__).parents[2] / "docs" / "segmentation_infer.md").read_text()
    block = re.search(r"<!-- recipe: masks -->\s*```python\n(.*?)```", text, re.S)
    assert block, "docs/segmentation_infer.md has no masks recipe"
    code = block.group(1).replace("outputs/demo/segment", str(out))
    ns: dict = {}
    exec(compile(code, "docs/segmentation_infer.md", "exec"), ns)
    cell, placed = ns["cell"], ns["placed"]
    assert cell.any() and (cell & placed).sum() / (cell | placed).sum() > 0.9


def test_long_image_names_get_output_names_that_fit(tmp_path, untrained_ckpt, monkeypatch):
    """Two 250-character images of one stem (.png and .tif): the overlay name was 258
    bytes and the stage failed with "File name too long"; now each output name is cut
    with a hash of the whole name, and the two stay apart."""
    import pipeline.stages.segment as seg

    monkeypatch.setattr(seg, "make_detector", lambda ctx, model: _Blobs())
    smears = tmp_path / "smears"
    smears.mkdir()
    img = np.full((96, 128, 3), (230, 200, 200), np.uint8)
    img[disc(96, 128, 48, 60, 14)] = (120, 60, 160)
    stem = "x" * 250
    Image.fromarray(img).save(smears / f"{stem}.png")
    Image.fromarray(img).save(smears / f"{stem}.tif")
    out = _run_segment(tmp_path, untrained_ckpt, smears, here=True)
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert len(overlays) == 2 and len(set(overlays)) == 2 and len(masks) == 2
    for name in overlays + masks:
        assert len(name.encode()) <= 255 and name.startswith("x" * 200) and "~" in name
    assert seg.short_stem("cell") == "cell"


def test_eval_segmentation_score_floor_sets_what_the_detector_keeps(tmp_path, untrained_ckpt):
    """scripts/eval_segmentation.py --score-floor: the ROI heads' floor is the one given
    and is written out; an untrained detector's boxes all score low, so a floor of 0.99
    keeps none of them and a floor of 0 keeps some (the checkpoint's own floor, 0.05, is
    what runs without the option)."""
    from tests.helpers.run import load_script
    from tests.helpers.seg_synth import make_coco_smears

    ann = make_coco_smears(tmp_path / "smears", n_images=2, val=2)
    mod = load_script("eval_segmentation")
    base = [str(untrained_ckpt), "--format", "coco", "--path", str(ann), "--split", "val"]
    base += ["--scale", "1", "--threshold", "0"]  # n_det: every box the detector kept
    kept = {}
    for floor in (None, 0.0, 0.99):
        out = tmp_path / f"floor_{floor}.json"
        extra = [] if floor is None else ["--score-floor", str(floor)]
        mod.main([*base, *extra, "--out", str(out)])
        r = json.loads(out.read_text())
        assert r["score_floor"] == pytest.approx(0.05 if floor is None else floor)
        kept[floor] = r["n_det"]
    assert kept[0.99] == 0 < kept[0.0]


def test_eval_segmentation_gt_review_relabels_listed_boxes(tmp_path, untrained_ckpt):
    """scripts/eval_segmentation.py --gt-review: a white-cell box the review calls a red
    cell leaves the WBC ground truth (n_gt one lower) and the JSON says how many entries
    matched; an entry naming an image of another split is counted, not an error."""
    from segmentation.datasets import READERS
    from tests.helpers.run import load_script
    from tests.helpers.seg_synth import make_coco_smears

    ann = make_coco_smears(tmp_path / "smears", n_images=2, val=2)
    rec = next(r for r in READERS["coco"](ann).split("val") if r.wbcs)
    b = rec.wbcs[0].bbox
    review = tmp_path / "review.csv"
    review.write_text(
        "image,x0,y0,x1,y1,category,note\n"
        f"{Path(rec.path).name},{b[0] + 0.5},{b[1]},{b[2]},{b[3]},rbc,no nucleus\n"
        "not_in_this_split.png,1,1,20,20,rbc,\n"
    )
    mod = load_script("eval_segmentation")
    base = [str(untrained_ckpt), "--format", "coco", "--path", str(ann), "--split", "val"]
    base += ["--scale", "1"]
    mod.main([*base, "--out", str(tmp_path / "plain.json")])
    mod.main([*base, "--gt-review", str(review), "--out", str(tmp_path / "rev.json")])
    plain = json.loads((tmp_path / "plain.json").read_text())
    rev = json.loads((tmp_path / "rev.json").read_text())
    assert rev["n_gt"] == plain["n_gt"] - 1
    assert rev["gt_review"] == {
        "file": str(review),
        "n_entries": 2,
        "n_relabelled": 1,
        "n_other_images": 1,
    }
    assert "gt_review" not in plain
    # the estimated-scale path builds its own extras: the review is still recorded
    mod.main([*base[:-2], "--scale", "estimate", "--gt-review", str(review), "--out",
              str(tmp_path / "est.json")])  # fmt: skip
    est = json.loads((tmp_path / "est.json").read_text())
    assert est["gt_review"]["n_relabelled"] == 1 and est["n_gt"] == rev["n_gt"]


def test_box_review_bad_input_names_file_line_and_field(tmp_path):
    """A review with a missing column, a box that is not a number, an empty box, or a box
    that matches no white cell of its image: AnnotationError naming file/line/field."""
    from segmentation.datasets import (
        AnnotationError,
        ImageRecord,
        Instance,
        SmearDataset,
        apply_box_review,
        read_box_review,
    )

    def review(text: str) -> Path:
        p = tmp_path / "r.csv"
        p.write_text(text)
        return p

    head = "image,x0,y0,x1,y1,category\n"
    with pytest.raises(AnnotationError, match=r"r\.csv: missing column\(s\) \['category'\]"):
        read_box_review(review("image,x0,y0,x1,y1\na.png,0,0,1,1\n"))
    with pytest.raises(AnnotationError, match=r"r\.csv:2: x0/y0/x1/y1 must be numbers"):
        read_box_review(review(head + "a.png,zero,0,1,1,rbc\n"))
    with pytest.raises(AnnotationError, match=r"r\.csv:3: empty box"):
        read_box_review(review(head + "a.png,0,0,5,5,rbc\na.png,5,5,5,9,rbc\n"))
    with pytest.raises(FileNotFoundError, match="box review file not found"):
        read_box_review(tmp_path / "absent.csv")
    ds = SmearDataset(
        [ImageRecord(Path("x/a.png"), 50, 50, "val", instances=[Instance((10, 10, 30, 30))])]
    )
    with pytest.raises(AnnotationError, match=r"review line 2: a\.png has no white-cell box"):
        apply_box_review(ds, read_box_review(review(head + "a.png,0,0,9,9,rbc\n")))
    # a match relabels in place and keeps the reviewer's note
    n = apply_box_review(ds, read_box_review(review(head + "a.png,10,10,30,31,rbc\n")))
    assert n["n_relabelled"] == 1 and ds.images[0].instances[0].category == "rbc"
    assert ds.images[0].wbcs == []


def test_box_review_sheet_draws_every_box_and_the_review(tmp_path):
    """scripts/box_review_sheet.py: --all numbers every white-cell box of the split (its
    index names image and box), --review draws the reviewed boxes of this split only; a
    review none of whose images is in the split is one clear error."""
    from PIL import Image

    from segmentation.datasets import READERS
    from tests.helpers.run import load_script
    from tests.helpers.seg_synth import make_coco_smears

    ann = make_coco_smears(tmp_path / "smears", n_images=2, val=2)
    ds = READERS["coco"](ann).split("val")
    n = sum(len(r.wbcs) for r in ds)
    mod = load_script("box_review_sheet")
    base = ["--format", "coco", "--path", str(ann), "--split", "val"]
    mod.main([*base, "--all", "--out", str(tmp_path / "all.png")])
    index = json.loads((tmp_path / "all_index.json").read_text())
    assert len(index) == n > 0 and Image.open(tmp_path / "all.png").size == (1180, 1040)
    rec = next(r for r in ds if r.wbcs)
    b = rec.wbcs[0].bbox
    review = tmp_path / "review.csv"
    review.write_text(
        f"image,x0,y0,x1,y1,category\n{Path(rec.path).name},{b[0]},{b[1]},{b[2]},{b[3]},rbc\n"
    )
    mod.main([*base, "--review", str(review), "--out", str(tmp_path / "rev.png")])
    assert Image.open(tmp_path / "rev.png").size == (280, 280)  # one field, 280 px side
    review.write_text("image,x0,y0,x1,y1,category\nelsewhere.png,1,1,9,9,rbc\n")
    with pytest.raises(FileNotFoundError, match="no image of the review is in this split"):
        mod.main([*base, "--review", str(review), "--out", str(tmp_path / "none.png")])
