"""Training and evaluation loops for Mask R-CNN (torchvision reference style).

``train_one_epoch(model, optimizer, loader, device, epoch, ...)`` runs one
pass with a per-iteration LR schedule, gradient clipping and a hard stop on a
non-finite loss; ``evaluate(model, dataset, device, ...)`` runs pycocotools
box and mask AP plus recall at the crop score threshold and the mean mask IoU
of matched cells.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segmentation.datasets import DetectionDataset, encode_mask, to_coco
from segmentation.magnification import whole_boxes
from segmentation.progress import bar
from segmentation.runtime import NonFiniteLossError, beyond_reference
from segmentation.schema import SCORE_THRESHOLD

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    """Mean loss terms of one epoch (``loss`` is their sum), last LR, iterations, seconds;
    ``first_loss``: the epoch's first iteration's loss (the run's divergence reference)."""

    epoch: int
    losses: dict[str, float]
    loss: float
    lr: float
    iterations: int
    seconds: float
    first_loss: float = math.nan


# divergence stop: an iteration's loss above this many times the run's first loss stops
# the run like a NaN. An audit ran segmentation.lr=1000 to "done": losses 1e19-1e24,
# val AP 0 and a model.pt with weights of 1.7e8, since no loss was NaN. Normal runs
# start near 16 (demo) and fall.
DIVERGE_FACTOR = 1e3
# the reference loss's magnitude is taken as at least this: Mask R-CNN's summed terms
# near 0 would make any loss look diverged
DIVERGE_FLOOR = 1.0


def warmup_schedule(
    total_iters: int,
    warmup_iters: int,
    kind: str = "cosine",
    warmup_factor: float = 0.001,
    milestones: Iterable[float] = (0.7, 0.9),
    gamma: float = 0.1,
    final_factor: float = 0.01,
) -> Callable[[int], float]:
    """LR multiplier per iteration: linear warm-up, then ``cosine``, ``step`` or ``constant``.

    ``milestones`` are fractions of ``total_iters`` (``step``); ``final_factor``
    is the floor of the cosine.
    """
    if kind not in ("cosine", "step", "constant"):
        raise ValueError(f"schedule={kind!r}; valid: cosine, step, constant")
    total = max(1, int(total_iters))
    warm = max(0, min(int(warmup_iters), total - 1))
    steps = [int(m * total) for m in milestones]

    def f(it: int) -> float:
        if it < warm:
            a = it / max(1, warm)
            return warmup_factor * (1 - a) + a
        if kind == "constant":
            return 1.0
        if kind == "step":
            return gamma ** sum(it >= s for s in steps)
        p = min(1.0, (it - warm) / max(1, total - warm))
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    device: torch.device,
    epoch: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = 10.0,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    on_iteration: Callable[[int, dict[str, float], float], None] | None = None,
    log_every: int = 10,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    n_epochs: int | None = None,
    progress: bool = True,
    reference: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EpochStats:
    """One training pass.

    Parameters
    ----------
    model
        torchvision Mask R-CNN (possibly DDP-wrapped) in any mode; set to train.
    loader
        Yields ``(images, targets)`` lists (see :func:`segmentation.datasets.collate`).
    scheduler
        Stepped every iteration (warm-up + schedule are per iteration).
    grad_clip
        Max global gradient norm; ``None`` or 0 = off.
    autocast
        Factory of an autocast context (e.g. ``DistInfo.autocast``).
    on_iteration
        ``fn(iteration_in_epoch, loss_terms, lr)`` after every step (TensorBoard).
    reduce
        Averages a tensor over DDP ranks (for the logged means); identity if None.
    log_every
        Iterations between DEBUG log lines of the loss terms (0: none).
    n_epochs
        Total epochs of the run, for the progress bar's ``epoch k/N``.
    progress
        Show a progress bar (rate, ETA, loss) on a terminal (rank 0 only);
        see :mod:`segmentation.progress`.
    reference
        The run's first loss (divergence reference; ``EpochStats.first_loss`` of its
        first epoch); None: this epoch's first iteration's.
    should_stop
        Checked before every iteration; true raises KeyboardInterrupt (a Ctrl-C the
        caller noted, whose own KeyboardInterrupt a library's callback may have
        swallowed: the loop then ran to the end).

    Raises
    ------
    NonFiniteLossError
        As soon as the total loss is NaN or inf, or above ``DIVERGE_FACTOR`` times the
        reference in magnitude (weights are not updated).
    """
    model.train()
    sums: dict[str, float] = {}
    n = 0
    first = math.nan
    t0 = time.time()
    lr = optimizer.param_groups[0]["lr"]
    of = f"/{n_epochs}" if n_epochs else ""
    pbar = bar(loader, desc=f"epoch {epoch + 1}{of}", unit="it", enabled=progress)
    for it, (images, targets) in enumerate(pbar):
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt("stopped: an interrupt (Ctrl-C) was noted")
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [
            {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
            for t in targets
        ]
        ctx = autocast() if autocast else contextlib.nullcontext()
        with ctx:
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        terms = {k: float(v.detach()) for k, v in loss_dict.items()}
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite training loss at epoch {epoch}, iteration {it} "
                f"(lr={lr:.3g}): {terms}. Lower segmentation.lr, raise "
                f"segmentation.warmup_iters or keep segmentation.grad_clip on."
            )
        if it == 0:
            first = value
            reference = value if reference is None or not math.isfinite(reference) else reference
        if beyond_reference(value, reference, DIVERGE_FACTOR, DIVERGE_FLOOR):
            raise NonFiniteLossError(
                f"diverged training loss at epoch {epoch}, iteration {it} (lr={lr:.3g}): "
                f"{value:.3g} > {DIVERGE_FACTOR:.0e} x the first loss {reference:.4g} "
                f"({terms}). Lower segmentation.lr, raise segmentation.warmup_iters or "
                f"keep segmentation.grad_clip on."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        if on_iteration is not None:
            on_iteration(it, terms, lr)
        pbar.set_postfix_str(f"loss {sum(terms.values()):.3f}", refresh=False)
        if log_every and it % log_every == 0:
            log.debug(
                "epoch %d%s it %d/%d loss %.3f (%s) lr %.2e",
                epoch + 1,
                of,
                it,
                len(loader),
                sum(terms.values()),
                ", ".join(
                    f"{k[5:] if k.startswith('loss_') else k} {v:.3f}" for k, v in terms.items()
                ),
                lr,
            )
    pbar.close()
    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys] + [float(n)], dtype=torch.float64)
    if reduce is not None:
        vec = reduce(vec)
    total_n = max(1.0, float(vec[-1]))
    means = {k: float(vec[i]) / total_n for i, k in enumerate(keys)}
    return EpochStats(
        epoch=epoch,
        losses=means,
        loss=sum(means.values()),
        lr=lr,
        iterations=n,
        seconds=time.time() - t0,
        first_loss=first if n else math.nan,
    )


@dataclass
class EvalResult:
    """Detection and mask quality of the white-cell class on one image set.

    AP values are pycocotools (IoU 0.50:0.95, 0.50, 0.75; -1 = undefined).
    ``recall`` is the fraction of ground-truth cells matched (box IoU >= 0.5)
    by a detection with score >= ``score_threshold``; ``precision`` the
    fraction of those detections that match a cell. ``mean_mask_iou``: mean
    over ground-truth cells that have a real mask of the best mask IoU with a
    detection above the threshold (0 when missed); ``None`` when no cell has one.
    Cells ignored as cut by the image edge (``ignore_edge_px``) and the detections
    lying on them count in none of these. AP is -1 when no ground-truth cell
    counts and 0 when there are cells but no detection. Mask AP is ``None`` when
    the ground truth has no real masks (box-only data).
    """

    n_images: int
    n_gt: int
    n_det: int
    score_threshold: float
    box_ap: float
    box_ap50: float
    box_ap75: float
    mask_ap: float | None
    mask_ap50: float | None
    mask_ap75: float | None
    recall: float | None
    precision: float | None
    mean_mask_iou: float | None
    n_gt_with_mask: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    dataset: DetectionDataset,
    device: torch.device,
    batch_size: int = 2,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    progress: str | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run ``model`` over every item of ``dataset`` (no augmentation) in order.

    ``progress``: description of a progress bar (terminal only); ``None``: no bar.

    Returns per image ``boxes`` (K, 4), ``scores`` (K,), ``masks`` (K, H, W) bool
    (probability > 0.5), in the dataset's loaded frame.
    """
    model.eval()
    out = []
    pbar = bar(desc=progress or "", total=len(dataset), unit="img", enabled=progress is not None)
    for start in range(0, len(dataset), batch_size):
        idx = range(start, min(len(dataset), start + batch_size))
        images = [dataset[i][0].to(device) for i in idx]
        ctx = autocast() if autocast else contextlib.nullcontext()
        with ctx:
            preds = model(images)
        for p in preds:
            out.append(
                {
                    "boxes": p["boxes"].float().cpu().numpy(),
                    "scores": p["scores"].float().cpu().numpy(),
                    "masks": (p["masks"][:, 0] > 0.5).cpu().numpy(),
                }
            )
        pbar.update(len(idx))
    pbar.close()
    return out


def box_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) xyxy -> (N, M) intersection areas."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    return np.clip(rb - lt, 0, None).prod(-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) xyxy -> (N, M) IoU."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    inter = box_intersection(a, b)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None] - inter + 1e-9)


def _coco_stats(gt: COCO, dets: list[dict[str, Any]], iou_type: str) -> tuple[float, float, float]:
    """pycocotools AP, AP50, AP75: -1 (undefined) when no ground truth counts (none, or
    every box an ignore region), as pycocotools itself says; 0 when there is ground truth
    but no detection (every cell missed; ``loadRes`` cannot take an empty list)."""
    if not any(not a.get("iscrowd", 0) for a in gt.dataset["annotations"]):
        return -1.0, -1.0, -1.0
    if not dets:
        return 0.0, 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iou_type)
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1]), float(ev.stats[2])


def evaluate(
    model: torch.nn.Module,
    dataset: DetectionDataset,
    device: torch.device,
    score_threshold: float = SCORE_THRESHOLD,
    batch_size: int = 2,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    predictions: list[dict[str, np.ndarray]] | None = None,
    ignore_edge_px: float | None = None,
) -> EvalResult:
    """pycocotools box/mask AP, recall/precision at ``score_threshold`` and mean mask IoU.

    ``dataset`` must serve un-augmented images; the ground truth comes from
    its records (white cells only, in the loaded/scaled frame).
    ``ignore_edge_px``: ground-truth boxes within this many (loaded-frame) pixels of the
    image edge, i.e. cells cut by it, are *ignore* regions (COCO ``iscrowd``): neither
    missed when not found nor a false positive's excuse elsewhere; a detection lying
    mostly (>= half its area) inside one is not counted either way. None: every box counts.
    """
    t0 = time.time()
    from segmentation.datasets import SmearDataset

    recs = dataset.records
    preds = predictions or predict(model, dataset, device, batch_size, autocast)
    gt_dict = to_coco(SmearDataset(list(recs)), masks="real")
    all_masked = all(a.mask is not None for r in recs for a in r.wbcs)
    notes = []
    if ignore_edge_px is not None:
        n_cut = mark_edge_cut(gt_dict, ignore_edge_px)
        notes.append(f"{n_cut} ground-truth boxes within {ignore_edge_px:g} px of the edge ignored")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
    box_dets, mask_dets = [], []
    n_gt = n_hit = n_det_thr = n_det_ok = 0
    ious: list[float] = []
    for rec, p in zip(recs, preds):
        for b, s, m in zip(p["boxes"], p["scores"], p["masks"]):
            x0, y0, x1, y1 = (float(v) for v in b)
            box_dets.append(
                {
                    "image_id": rec.image_id,
                    "category_id": 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(s),
                }
            )
            if all_masked:
                mask_dets.append(
                    {
                        "image_id": rec.image_id,
                        "category_id": 1,
                        "segmentation": encode_mask(m),
                        "score": float(s),
                    }
                )
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[rec.image_id]))
        gboxes = _ann_xyxy([a for a in anns if not a.get("iscrowd", 0)])
        cut = _ann_xyxy([a for a in anns if a.get("iscrowd", 0)])
        keep = p["scores"] >= score_threshold
        dboxes, dmasks = p["boxes"][keep], p["masks"][keep]
        iou = box_iou(gboxes, dboxes)
        if len(cut) and len(dboxes):  # a detection of an ignored (cut) cell counts neither way
            hit = iou.max(axis=0) >= 0.5 if iou.size else np.zeros(len(dboxes), bool)
            counted = hit | (_inside_fraction(dboxes, cut) < 0.5)
            dboxes, dmasks = dboxes[counted], dmasks[counted]
            iou = box_iou(gboxes, dboxes)
        n_gt += len(gboxes)
        n_det_thr += len(dboxes)
        if iou.size:
            n_hit += int((iou.max(axis=1) >= 0.5).sum())
            n_det_ok += int((iou.max(axis=0) >= 0.5).sum())
        # the cells recall counts (an ignored cut cell is left out) that have a real mask;
        # anns[i] is rec.wbcs[i] (to_coco keeps their order)
        masked = [
            i
            for i, a in enumerate(rec.wbcs)
            if a.mask is not None and not anns[i].get("iscrowd", 0)
        ]
        if masked:
            for i in masked:
                g = mask_utils.decode(anns[i]["segmentation"]).astype(bool)
                best = 0.0
                for dm in dmasks:
                    inter = np.logical_and(g, dm).sum()
                    if inter:
                        best = max(best, inter / np.logical_or(g, dm).sum())
                ious.append(best)
    box = _coco_stats(gt, box_dets, "bbox")
    if all_masked:
        mask = _coco_stats(gt, mask_dets, "segm")
    else:
        mask = (None, None, None)
        notes.append("mask AP not computed: some ground-truth cells have boxes only")
    return EvalResult(
        n_images=len(recs),
        n_gt=n_gt,
        n_det=n_det_thr,
        score_threshold=float(score_threshold),
        box_ap=box[0],
        box_ap50=box[1],
        box_ap75=box[2],
        mask_ap=mask[0],
        mask_ap50=mask[1],
        mask_ap75=mask[2],
        recall=n_hit / n_gt if n_gt else None,
        precision=n_det_ok / n_det_thr if n_det_thr else None,
        mean_mask_iou=float(np.mean(ious)) if ious else None,
        n_gt_with_mask=len(ious),
        seconds=time.time() - t0,
        notes=notes,
    )


def _ann_xyxy(anns: list[dict]) -> np.ndarray:
    """(n, 4) xyxy boxes of COCO annotations (``bbox`` is x, y, w, h)."""
    return np.array(
        [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns
        ]
    ).reshape(-1, 4)


def mark_edge_cut(coco: dict, edge_px: float) -> int:
    """Mark ground-truth boxes within ``edge_px`` of their image's edge as COCO ignore
    regions (``iscrowd = 1``), in place; returns how many were marked."""
    size = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    n = 0
    for a in coco["annotations"]:
        w, h = size[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        if not whole_boxes(np.array([x, y, x + bw, y + bh]), w, h, edge_px)[0]:
            a["iscrowd"] = 1
            n += 1
    return n


def _inside_fraction(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """(n,) largest share of each box's area that lies inside one of ``regions`` (xyxy)."""
    if len(boxes) == 0 or len(regions) == 0:
        return np.zeros(len(boxes))
    area = np.clip((boxes[:, 2:] - boxes[:, :2]).prod(-1), 1e-9, None)
    return box_intersection(boxes, regions).max(axis=1) / area


def draw_predictions(
    image: torch.Tensor, pred: dict[str, np.ndarray], score_threshold: float = SCORE_THRESHOLD
) -> torch.Tensor:
    """(3, H, W) uint8 image with predicted masks (filled) and boxes (with scores) drawn."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    img = (image.clamp(0, 1) * 255).to(torch.uint8).cpu()
    keep = pred["scores"] >= score_threshold
    if keep.any():
        masks = torch.from_numpy(pred["masks"][keep])
        img = draw_segmentation_masks(img, masks, alpha=0.4, colors="cyan")
        boxes = torch.from_numpy(pred["boxes"][keep])
        labels = [f"{s:.2f}" for s in pred["scores"][keep]]
        img = draw_bounding_boxes(img, boxes, labels=labels, colors="yellow", width=2)
    return img
