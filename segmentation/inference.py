"""Tiled Mask R-CNN inference over images of any size, in bounded memory.

An image is cut into square tiles that overlap (:func:`tile_grid`), tiles go
through the detector in batches, and the detections are mapped back to the
image frame and merged (:func:`merge_tiles`) so that a cell straddling a tile
border is reported once. Masks stay *local*: each detection keeps a boolean
array covering only its own box plus its top-left origin, never an
image-sized mask, so a 4000x3000 slide with hundreds of cells needs memory
for one batch of tiles plus the cells themselves.

A detector is any callable ``tiles -> list[Detections]`` (one per tile, tile
frame); :class:`MaskRCNNDetector` wraps a torchvision Mask R-CNN, and the
tests pass a fake one that returns known masks.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from segmentation.io import PROGRESS_MEGAPIXELS
from segmentation.schema import MASK_THRESHOLD

log = logging.getLogger(__name__)

# torchvision (~5 s to import: it loads torch._dynamo) is imported where a detector runs,
# so stages and settings errors that only need this module's helpers start without it

# ----------------------------------------------------------------------------
# containers
# ----------------------------------------------------------------------------


@dataclass
class Detections:
    """Instances in one frame (a tile or a whole image), masks stored locally.

    Attributes
    ----------
    boxes
        (N, 4) float32, ``x0, y0, x1, y1`` px (x1/y1 exclusive).
    scores
        (N,) float32 in [0, 1].
    masks
        N bool arrays; ``masks[k]`` has shape (h_k, w_k) and covers rows
        ``origins[k, 1] : origins[k, 1] + h_k`` and the matching columns.
    origins
        (N, 2) int64 ``(x, y)`` of each mask's top-left px in this frame.
    cut
        (N,) bool: the mask touches a tile edge that lies inside the image
        (the cell may continue in the next tile). Set by :func:`merge_tiles`.
    """

    boxes: np.ndarray
    scores: np.ndarray
    masks: list[np.ndarray]
    origins: np.ndarray
    cut: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __post_init__(self) -> None:
        n = len(self.masks)
        self.boxes = np.asarray(self.boxes, np.float32).reshape(n, 4)
        self.scores = np.asarray(self.scores, np.float32).reshape(n)
        self.origins = np.asarray(self.origins, np.int64).reshape(n, 2)
        if len(self.cut) != n:
            self.cut = np.zeros(n, bool)

    def __len__(self) -> int:
        return len(self.masks)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4)), np.zeros(0), [], np.zeros((0, 2)))

    @classmethod
    def from_masks(cls, masks: Sequence[np.ndarray], scores: Sequence[float]) -> Detections:
        """Build from full-frame (H, W) bool masks (tests and small images)."""
        boxes, locs, origins = [], [], []
        for m in masks:
            ys, xs = np.nonzero(m)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            boxes.append([x0, y0, x1, y1])
            locs.append(np.asarray(m[y0:y1, x0:x1], bool))
            origins.append([x0, y0])
        return cls(np.array(boxes), np.array(scores), locs, np.array(origins))

    def select(self, keep: np.ndarray | Sequence[int]) -> Detections:
        keep = np.asarray(keep, np.int64).reshape(-1)
        return Detections(
            self.boxes[keep],
            self.scores[keep],
            [self.masks[i] for i in keep],
            self.origins[keep],
            self.cut[keep],
        )

    def shifted(self, dx: int, dy: int) -> Detections:
        off = np.array([dx, dy, dx, dy], np.float32)
        return Detections(
            self.boxes + off,
            self.scores,
            self.masks,
            self.origins + np.array([dx, dy]),
            self.cut,
        )

    @staticmethod
    def concat(parts: Sequence[Detections]) -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Detections.empty()
        return Detections(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            [m for p in parts for m in p.masks],
            np.concatenate([p.origins for p in parts]),
            np.concatenate([p.cut for p in parts]),
        )

    def areas(self) -> np.ndarray:
        """(N,) int64 mask px."""
        return np.array([int(m.sum()) for m in self.masks], np.int64)

    def mask_boxes(self) -> np.ndarray:
        """(N, 4) int64 ``x0, y0, x1, y1`` of the mask arrays (not the tight mask)."""
        if not len(self):
            return np.zeros((0, 4), np.int64)
        hw = np.array([m.shape for m in self.masks], np.int64)  # (N, 2) = (h, w)
        return np.concatenate([self.origins, self.origins + hw[:, ::-1]], axis=1)

    def full_mask(self, k: int, height: int, width: int) -> np.ndarray:
        """(height, width) bool mask of detection ``k`` (for drawing and tests only)."""
        out = np.zeros((height, width), bool)
        x0, y0 = self.origins[k]
        m = self.masks[k]
        ys, xs = (
            slice(max(y0, 0), min(y0 + m.shape[0], height)),
            slice(max(x0, 0), min(x0 + m.shape[1], width)),
        )
        out[ys, xs] = m[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        return out


# ----------------------------------------------------------------------------
# mask geometry on local masks
# ----------------------------------------------------------------------------


def local_overlap(
    m1: np.ndarray, o1: Sequence[int], m2: np.ndarray, o2: Sequence[int]
) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """Overlap of two local masks: (intersection px, m1 and m2 cut to the shared rectangle)."""
    x0, y0 = max(o1[0], o2[0]), max(o1[1], o2[1])
    x1 = min(o1[0] + m1.shape[1], o2[0] + m2.shape[1])
    y1 = min(o1[1] + m1.shape[0], o2[1] + m2.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0, None, None
    a = m1[y0 - o1[1] : y1 - o1[1], x0 - o1[0] : x1 - o1[0]]
    b = m2[y0 - o2[1] : y1 - o2[1], x0 - o2[0] : x1 - o2[0]]
    return int(np.logical_and(a, b).sum()), a, b


def mask_iou_matrix(
    a_masks: Sequence[np.ndarray],
    a_origins: np.ndarray,
    b_masks: Sequence[np.ndarray],
    b_origins: np.ndarray,
) -> np.ndarray:
    """(Na, Nb) mask IoU between two sets of local masks (0 where boxes are disjoint)."""
    out = np.zeros((len(a_masks), len(b_masks)), np.float64)
    if not len(a_masks) or not len(b_masks):
        return out
    a_area = np.array([m.sum() for m in a_masks], np.float64)
    b_area = np.array([m.sum() for m in b_masks], np.float64)
    for i, (ma, oa) in enumerate(zip(a_masks, a_origins)):
        for j, (mb, ob) in enumerate(zip(b_masks, b_origins)):
            inter, _, _ = local_overlap(ma, oa, mb, ob)
            if inter:
                out[i, j] = inter / (a_area[i] + b_area[j] - inter)
    return out


# ----------------------------------------------------------------------------
# tiling and merging
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """A window ``[x0, x1) x [y0, y1)`` of the image (px)."""

    x0: int
    y0: int
    x1: int
    y1: int


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    # spread the tiles evenly: the last one ends exactly at the border
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_grid(height: int, width: int, tile_size: int, overlap: int) -> list[Tile]:
    """Overlapping square tiles covering an image; all tiles the same size.

    Tiles are ``tile_size`` px (or the image side, if smaller), evenly spaced
    so that neighbours overlap by at least ``overlap`` px and the last tile
    ends at the border (no thin edge tiles).

    Raises
    ------
    ValueError
        If ``overlap`` is not in ``[0, tile_size)``.
    """
    if tile_size <= 0 or not 0 <= overlap < tile_size:
        raise ValueError(f"tile_size={tile_size}, tile_overlap={overlap}: need 0 <= overlap < size")
    th, tw = min(tile_size, height), min(tile_size, width)
    return [
        Tile(x, y, x + tw, y + th)
        for y in _starts(height, tile_size, overlap)
        for x in _starts(width, tile_size, overlap)
    ]


def _cut_flags(det: Detections, tile: Tile, height: int, width: int, margin: int) -> np.ndarray:
    """(N,) bool: mask reaches a tile edge that is not an image border (tile frame)."""
    cut = np.zeros(len(det), bool)
    tw, th = tile.x1 - tile.x0, tile.y1 - tile.y0
    inner = (tile.x0 > 0, tile.y0 > 0, tile.x1 < width, tile.y1 < height)
    for k, (m, (ox, oy)) in enumerate(zip(det.masks, det.origins)):
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        mx0, my0, mx1, my1 = ox + xs.min(), oy + ys.min(), ox + xs.max() + 1, oy + ys.max() + 1
        cut[k] = (
            (inner[0] and mx0 <= margin)
            or (inner[1] and my0 <= margin)
            or (inner[2] and mx1 >= tw - margin)
            or (inner[3] and my1 >= th - margin)
        )
    return cut


def merge_tiles(
    per_tile: Sequence[Detections],
    tiles: Sequence[Tile],
    height: int,
    width: int,
    merge_iou: float = 0.5,
    containment: float = 0.7,
    edge_margin: int = 2,
) -> Detections:
    """Map tile detections to the image frame and keep each cell once.

    1. Detections whose mask reaches an inner tile edge are marked ``cut``:
       the cell may continue outside that tile.
    2. Global NMS (``torchvision.ops.nms``, box IoU > ``merge_iou``) where
       uncut detections outrank cut ones, then score: a cell seen whole in
       one tile and cut in another keeps the whole one.
    3. A cut detection lying mostly inside a kept one (intersection over its
       own mask area >= ``containment``) is a fragment of it and is dropped.
    4. Cut fragments left (a cell wider than the overlap is cut in every
       tile) are joined when their masks agree on the tiles' shared area.

    Parameters
    ----------
    per_tile
        Detections of each tile, in tile px.
    tiles
        The tiles (same order).
    height, width
        Image size, px.

    Returns
    -------
    Detections
        Image frame, sorted by descending score; ``cut`` is True only for a
        joined or lone fragment (a cell the tiling could not see whole).
    """
    shifted = []
    for det, t in zip(per_tile, tiles):
        d = det.shifted(t.x0, t.y0)
        d.cut = _cut_flags(det, t, height, width, edge_margin)
        shifted.append(d)
    tile_of = np.concatenate(
        [np.full(len(d), i) for i, d in enumerate(shifted)] or [np.zeros(0, int)]
    ).astype(int)
    det = Detections.concat(shifted)
    if not len(det):
        return det
    # 2. NMS with whole (uncut) detections ranked above fragments
    rank = torch.as_tensor(det.scores + (~det.cut) * 2.0, dtype=torch.float32)
    from torchvision.ops import nms

    keep = nms(torch.as_tensor(det.boxes), rank, merge_iou).numpy()
    det, tile_of = det.select(keep), tile_of[keep]
    # 3. fragments inside something better
    areas = det.areas()
    order = np.argsort(-(det.scores + (~det.cut) * 2.0), kind="stable")
    kept: list[int] = []
    for i in order:
        drop = False
        if det.cut[i] and areas[i] > 0:
            for j in kept:
                inter, _, _ = local_overlap(
                    det.masks[i], det.origins[i], det.masks[j], det.origins[j]
                )
                if inter / areas[i] >= containment:
                    drop = True
                    break
        if not drop:
            kept.append(i)
    det, tile_of = det.select(kept), tile_of[kept]
    # 4. join fragments of one cell from different tiles
    det = _join_fragments(det, tile_of, tiles)
    order = np.argsort(-det.scores, kind="stable")
    return det.select(order)


def _join_fragments(det: Detections, tile_of: np.ndarray, tiles: Sequence[Tile]) -> Detections:
    frag = [i for i in range(len(det)) if det.cut[i]]
    if len(frag) < 2:
        return det
    parent = {i: i for i in frag}

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a_i, i in enumerate(frag):
        for j in frag[a_i + 1 :]:
            if tile_of[i] == tile_of[j]:
                continue
            ti, tj = tiles[tile_of[i]], tiles[tile_of[j]]
            # compare the masks only where both tiles saw the image
            sx0, sy0 = max(ti.x0, tj.x0), max(ti.y0, tj.y0)
            sx1, sy1 = min(ti.x1, tj.x1), min(ti.y1, tj.y1)
            if sx1 <= sx0 or sy1 <= sy0:
                continue
            a = _window(det.masks[i], det.origins[i], sx0, sy0, sx1, sy1)
            b = _window(det.masks[j], det.origins[j], sx0, sy0, sx1, sy1)
            union = np.logical_or(a, b).sum()
            if union and np.logical_and(a, b).sum() / union >= 0.5:
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in frag:
        groups.setdefault(find(i), []).append(i)
    keep = [i for i in range(len(det)) if not det.cut[i]]
    out = [det.select(keep)]
    for members in groups.values():
        if len(members) == 1:
            out.append(det.select(members))
            continue
        mb = det.select(members).mask_boxes()
        x0, y0, x1, y1 = mb[:, 0].min(), mb[:, 1].min(), mb[:, 2].max(), mb[:, 3].max()
        m = np.zeros((y1 - y0, x1 - x0), bool)
        for k in members:
            ox, oy = det.origins[k]
            h, w = det.masks[k].shape
            m[oy - y0 : oy - y0 + h, ox - x0 : ox - x0 + w] |= det.masks[k]
        box = np.array(
            [det.boxes[members, 0].min(), det.boxes[members, 1].min()]
            + [det.boxes[members, 2].max(), det.boxes[members, 3].max()]
        )
        out.append(
            Detections(box[None], [det.scores[members].max()], [m], [[x0, y0]], np.array([True]))
        )
    return Detections.concat(out)


def _window(m: np.ndarray, o: Sequence[int], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """(y1-y0, x1-x0) bool: local mask ``m`` at origin ``o`` seen through a window."""
    out = np.zeros((y1 - y0, x1 - x0), bool)
    ax0, ay0 = max(x0, o[0]), max(y0, o[1])
    ax1, ay1 = min(x1, o[0] + m.shape[1]), min(y1, o[1] + m.shape[0])
    if ax1 > ax0 and ay1 > ay0:
        out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = m[
            ay0 - o[1] : ay1 - o[1], ax0 - o[0] : ax1 - o[0]
        ]
    return out


# ----------------------------------------------------------------------------
# the detector
# ----------------------------------------------------------------------------

Detector = Callable[[list[np.ndarray]], list[Detections]]


def paste_local_masks(
    probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float
) -> tuple[list[np.ndarray], np.ndarray]:
    """Mask R-CNN's (K, M, M) box-frame mask probabilities -> local bool masks.

    Same geometry as torchvision's ``paste_masks_in_image`` (1 px padding,
    bilinear), but each mask is pasted only into its own clipped box.

    Returns
    -------
    masks, origins
        K bool arrays and (K, 2) int64 ``(x, y)`` origins in the image frame.
    """
    if probs.shape[0] == 0:
        return [], np.zeros((0, 2), np.int64)
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    padded, scale = expand_masks(probs[:, None], padding=1)  # (K, 1, M+2, M+2)
    eboxes = expand_boxes(boxes, scale).to(torch.int64).tolist()
    masks, origins = [], []
    for p, (bx0, by0, bx1, by1) in zip(padded, eboxes):
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        m = F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        x0, y0 = max(bx0, 0), max(by0, 0)
        x1, y1 = min(bx0 + w, width), min(by0 + h, height)
        if x1 <= x0 or y1 <= y0:
            masks.append(np.zeros((1, 1), bool))
            origins.append((min(max(bx0, 0), width - 1), min(max(by0, 0), height - 1)))
            continue
        local = m[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] > threshold
        masks.append(local.cpu().numpy())
        origins.append((x0, y0))
    return masks, np.asarray(origins, np.int64).reshape(-1, 2)


class BF16Backbone(torch.nn.Module):
    """A detector's backbone (+ FPN) run under CPU bf16 autocast, features back in fp32.

    The convolutions of the backbone are ~70 % of a CPU detection pass and lose
    nothing measurable in bf16 on CPUs with native bf16 instructions; the RPN and the
    box/mask heads stay fp32 because box coordinates in bf16 (8 significant bits: a
    step of 2-4 px at 500 px) cost AP50 (BCCD test 0.969 -> 0.947 with everything in
    bf16, docs/performance.md "Whole slides").
    """

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.inner = backbone
        self.out_channels = backbone.out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = self.inner(x)
        return {k: v.float() for k, v in feats.items()}


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when this CPU executes bf16 natively (AVX512-BF16 or AMX); else bf16 is
    emulated and slower than fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16_backbone(model: torch.nn.Module) -> None:
    """Swap ``model.backbone`` for :class:`BF16Backbone` (in place; idempotent)."""
    if not isinstance(model.backbone, BF16Backbone):
        model.backbone = BF16Backbone(model.backbone)


def _no_resize(image: torch.Tensor, target: dict | None = None) -> tuple[torch.Tensor, dict | None]:
    return image, target


class MaskRCNNDetector:
    """Callable detector around a torchvision Mask R-CNN (eval mode, no resize).

    The network sees each tile at its own pixel size (the model's internal
    resize is set to scale 1), so cells keep the px size chosen by the
    caller's ``input_scale``. Masks are pasted locally (no full-tile masks).

    Parameters
    ----------
    model
        ``torchvision.models.detection.MaskRCNN``.
    device
        Where to run.
    score_floor
        Box-head score threshold: lower detections are discarded in the model.
    mask_threshold
        Probability that turns a mask pixel on.
    max_detections
        Per tile.
    rpn_post_nms_top_n
        Proposals per tile passed to the box head (torchvision: 1000).
    autocast
        Context manager factory (e.g. ``DistInfo.autocast``) or ``None``.
    channels_last
        Run the network on NHWC tensors; None: on a CPU (oneDNN's convolutions are
        ~20 % faster there, measured by ``scripts/bench_whole_slide.py``). Same
        detections up to float rounding.
    cpu_bf16
        On a CPU, run the backbone in bf16 (:class:`BF16Backbone`; ~1.7x faster
        detection where the CPU has bf16 units, same AP50 on BCCD test and TXL-PBC
        val). None: exactly where :func:`cpu_has_bf16`. Ignored on a GPU (there
        ``autocast`` owns the precision).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device | str = "cpu",
        score_floor: float = 0.05,
        mask_threshold: float = MASK_THRESHOLD,
        max_detections: int = 100,
        rpn_post_nms_top_n: int | None = None,
        autocast: Callable[[], object] | None = None,
        channels_last: bool | None = None,
        cpu_bf16: bool | None = None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if cpu_bf16 is None:
            cpu_bf16 = cpu_has_bf16()
        self.cpu_bf16 = bool(cpu_bf16) and self.device.type == "cpu"
        if self.cpu_bf16:
            use_bf16_backbone(self.model)
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        rh = self.model.roi_heads
        rh.score_thresh = float(score_floor)
        rh.detections_per_img = int(max_detections)
        if rpn_post_nms_top_n:
            rpn = self.model.rpn
            rpn._post_nms_top_n["testing"] = int(rpn_post_nms_top_n)
            rpn._pre_nms_top_n["testing"] = max(
                rpn._pre_nms_top_n["testing"] // 1, int(rpn_post_nms_top_n)
            )
        self.mask_threshold = float(mask_threshold)
        self.autocast = autocast
        # tiles go in at their own px size, whatever their size (the caller chose the
        # working scale): replace the transform's resize by the identity
        self.model.transform.resize = _no_resize

    @torch.inference_mode()
    def __call__(self, tiles: list[np.ndarray]) -> list[Detections]:
        """Detect in a batch of (h, w, 3) uint8 tiles (sizes may differ). Returns tile-frame Detections."""
        if not tiles:
            return []
        m = self.model
        # (h, w, 3) uint8 -> (3, h, w) float in [0, 1]
        batch = [
            torch.from_numpy(np.require(t, requirements=["C", "W"]))
            .to(self.device)
            .permute(2, 0, 1)
            .float()
            .div_(255.0)
            for t in tiles
        ]
        ctx = self.autocast() if self.autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            images, _ = m.transform(batch)
            x = images.tensors
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            features = m.backbone(x)
            proposals, _ = m.rpn(images, features)
            dets, _ = m.roi_heads(features, proposals, images.image_sizes)
        out = []
        for d, (ih, iw), t in zip(dets, images.image_sizes, tiles):
            h, w = t.shape[:2]
            boxes = d["boxes"].float()
            if (ih, iw) != (h, w):  # defensive: map back if the transform resized anyway
                boxes = boxes * torch.tensor([w / iw, h / ih, w / iw, h / ih], device=boxes.device)
            masks, origins = paste_local_masks(
                d["masks"][:, 0].float(), boxes, h, w, self.mask_threshold
            )
            out.append(
                Detections(boxes.cpu().numpy(), d["scores"].float().cpu().numpy(), masks, origins)
            )
        return out


@dataclass
class ImageDetections:
    """Detections of one whole image plus how they were obtained."""

    detections: Detections
    n_tiles: int
    scale: float  # working px per source px


# source pixels resized at a time by :func:`resize_image` (16 MP: a 48 MB strip)
RESIZE_STRIP_PX = 1 << 24


def resize_image(
    image: np.ndarray, scale: float, strip_px: int = RESIZE_STRIP_PX, resample: str = "bilinear"
) -> np.ndarray:
    """(H, W, 3) uint8 resized by ``scale`` (antialiased); unchanged when scale == 1.

    ``resample``: Pillow's filter by name, ``"bilinear"`` (what the detector reads) or
    ``"box"`` (the overlays' reduction).

    An image over ``strip_px`` pixels is resized in horizontal strips of about that many
    source pixels, each with the filter's reach of rows above and below (Pillow's box
    argument places the strip in the whole image's sampling grid), into one output
    array: Pillow copied the whole image into its own buffer (a 400 MP slide: 1.9 GB
    more, the stage's peak). The result is Pillow's whole-image resize, up to 1 grey
    level where a filter weight rounds the other way (tests/segmentation/
    test_whole_slide_audit.py).
    """
    if scale == 1.0:
        return image
    from PIL import Image

    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    flt = Image.Resampling[resample.upper()]
    if h * w <= strip_px:
        return np.asarray(Image.fromarray(image).resize(size, flt))
    t0 = time.perf_counter()
    ow, oh = size
    fy = h / oh  # source rows per output row, as Pillow samples them
    reach = max(1.0, fy) + 2.0  # bilinear support (1 px, widened when reducing) + rounding
    rows = max(1, int(strip_px / w / fy))  # output rows per strip
    out = np.empty((oh, ow, *image.shape[2:]), image.dtype)
    for o0 in range(0, oh, rows):
        o1 = min(oh, o0 + rows)
        s0 = max(0, math.floor(o0 * fy - reach))
        s1 = min(h, math.ceil(o1 * fy + reach))
        strip = Image.fromarray(np.ascontiguousarray(image[s0:s1]))
        box = (0.0, o0 * fy - s0, float(w), o1 * fy - s0)
        out[o0:o1] = np.asarray(strip.resize((ow, o1 - o0), flt, box=box))
    if h * w > PROGRESS_MEGAPIXELS * 1e6:
        log.info(
            "resized %dx%d -> %dx%d px (scale %.4g) in %.1f s",
            w,
            h,
            ow,
            oh,
            scale,
            time.perf_counter() - t0,
        )
    return out


def detect_images(
    detector: Detector,
    images: Sequence[np.ndarray],
    tile_size: int = 1024,
    overlap: int = 256,
    batch_size: int = 4,
    merge_iou: float = 0.5,
    containment: float = 0.7,
    batch_megapixels: float | None = None,
) -> list[ImageDetections]:
    """Tiled detection on several (H, W, 3) uint8 images (already at working scale).

    The tiles of all images go through the detector ``batch_size`` at a time, and
    with ``batch_megapixels`` at most that many tile pixels per pass (at least one
    tile): small images share a forward pass, a large slide's tiles stream through
    in passes whose activations stay small (peak memory follows the pass, not the
    slide). Only each tile's detections are kept; each image's tiles are then
    merged on their own.

    Returns
    -------
    list[ImageDetections]
        One per image, detections in that image's frame, each cell once.
    """
    jobs = []  # (image index, tile)
    grids = []
    for i, im in enumerate(images):
        g = tile_grid(im.shape[0], im.shape[1], tile_size, overlap)
        grids.append(g)
        jobs.extend((i, t) for t in g)
    # a large image (over PROGRESS_MEGAPIXELS at working scale) logs its tiles at about
    # every 10 %: a slide's detection takes minutes, and the log was silent through them
    big = {
        i: (len(g), max(1, math.ceil(len(g) / 10)))
        for i, (im, g) in enumerate(zip(images, grids))
        if im.shape[0] * im.shape[1] > PROGRESS_MEGAPIXELS * 1e6
    }
    done = dict.fromkeys(big, 0)
    t0 = time.perf_counter()
    results: list[Detections] = []
    for chunk in _passes(jobs, max(1, batch_size), batch_megapixels):
        crops = [np.ascontiguousarray(images[i][t.y0 : t.y1, t.x0 : t.x1]) for i, t in chunk]
        out = detector(crops)
        if len(out) != len(crops):
            raise RuntimeError(f"detector returned {len(out)} results for {len(crops)} tiles")
        results.extend(out)
        for i, _ in chunk:
            if i not in big:
                continue
            done[i] += 1
            n, every = big[i]
            if done[i] % every == 0 or done[i] == n:
                h, w = images[i].shape[:2]
                log.info(
                    "detect: image %d (%dx%d px): tile %d of %d (%.0f s)",
                    i + 1,
                    w,
                    h,
                    done[i],
                    n,
                    time.perf_counter() - t0,
                )
    merged, pos = [], 0
    for im, g in zip(images, grids):
        per_tile = results[pos : pos + len(g)]
        pos += len(g)
        det = merge_tiles(
            per_tile, g, im.shape[0], im.shape[1], merge_iou=merge_iou, containment=containment
        )
        merged.append(ImageDetections(det, len(g), 1.0))
    return merged


def _passes(jobs: list, batch_size: int, megapixels: float | None) -> list[list]:
    """Consecutive groups of (image index, tile): <= batch_size tiles, <= megapixels
    tile px (a tile larger than the budget goes alone)."""
    budget = math.inf if megapixels is None else float(megapixels) * 1e6
    out: list[list] = []
    cur: list = []
    px = 0
    for job in jobs:
        t = job[1]
        n = (t.x1 - t.x0) * (t.y1 - t.y0)
        if cur and (len(cur) >= batch_size or px + n > budget):
            out.append(cur)
            cur, px = [], 0
        cur.append(job)
        px += n
    if cur:
        out.append(cur)
    return out


def detect_image(
    detector: Detector,
    image: np.ndarray,
    tile_size: int = 1024,
    overlap: int = 256,
    batch_size: int = 4,
    merge_iou: float = 0.5,
    containment: float = 0.7,
) -> ImageDetections:
    """Tiled detection on one (H, W, 3) uint8 image: :func:`detect_images` of one."""
    return detect_images(detector, [image], tile_size, overlap, batch_size, merge_iou, containment)[
        0
    ]
