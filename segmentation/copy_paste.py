"""Copy-paste augmentation: masked white cells pasted onto other smears.

Donor cells come from images with real masks (e.g. ``cells/segmentation_wbc``
single-cell crops, already scaled to the training cell size). Pasting them
onto full-field smears that only have boxes gives full fields with some real
masks, so the mask head sees real boundaries on real backgrounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segmentation.datasets import ImageRecord, Sample, load_sample, mask_bbox


class CopyPaste:
    """``fn(sample, seed) -> sample`` that pastes up to ``max_cells`` donor cells.

    Parameters
    ----------
    donors
        Records whose white cells have real masks (others are ignored).
    p
        Probability that an image receives pasted cells.
    max_cells
        At most this many cells per image (at least one when it fires).
    tries
        Random placements tried per cell; a cell is pasted only where its box
        does not overlap any existing or pasted cell.
    """

    def __init__(
        self, donors: Sequence[ImageRecord], p: float = 0.5, max_cells: int = 3, tries: int = 10
    ):
        self.donors = list(donors)
        self.p = float(p)
        self.max_cells = int(max_cells)
        self.tries = int(tries)
        self._cells: list[tuple[np.ndarray, np.ndarray]] | None = None

    def cells(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(patch (h, w, 3) uint8, mask (h, w) bool) of every donor cell (loaded once)."""
        if self._cells is None:
            out = []
            for rec in self.donors:
                s = load_sample(rec, "ignore")
                for m, has in zip(s.masks, s.has_mask):
                    if not has:
                        continue
                    bb = mask_bbox(m == 1)
                    if bb is None:
                        continue
                    x0, y0, x1, y1 = (int(v) for v in bb)
                    out.append((s.image[y0:y1, x0:x1].copy(), (m[y0:y1, x0:x1] == 1).copy()))
            self._cells = out
        return self._cells

    def __call__(self, s: Sample, seed: int) -> Sample:
        rng = np.random.default_rng(seed + 7919)
        cells = self.cells()
        if not cells or rng.random() >= self.p:
            return s
        img = s.image.copy()
        h, w = img.shape[:2]
        boxes = [tuple(b) for b in s.boxes]
        masks = [m.copy() for m in s.masks]
        has = list(s.has_mask)
        for _ in range(int(rng.integers(1, self.max_cells + 1))):
            patch, pm = cells[int(rng.integers(len(cells)))]
            if rng.random() < 0.5:
                patch, pm = patch[:, ::-1], pm[:, ::-1]
            ph, pw = pm.shape
            if ph >= h or pw >= w:
                continue
            for _t in range(self.tries):
                x, y = int(rng.integers(0, w - pw)), int(rng.integers(0, h - ph))
                nb = (x, y, x + pw, y + ph)
                if all(
                    nb[2] <= b[0] or b[2] <= nb[0] or nb[3] <= b[1] or b[3] <= nb[1] for b in boxes
                ):
                    break
            else:
                continue
            region = img[y : y + ph, x : x + pw]
            region[pm] = patch[pm]
            full = np.zeros((h, w), np.uint8)
            full[y : y + ph, x : x + pw] = pm
            bb = mask_bbox(full == 1)
            if bb is None:
                continue
            boxes.append(bb)
            masks.append(full)
            has.append(True)
        return Sample(
            image=img,
            boxes=np.array(boxes, np.float32).reshape(-1, 4),
            masks=np.stack(masks) if masks else np.zeros((0, h, w), np.uint8),
            has_mask=np.array(has, bool),
        )
