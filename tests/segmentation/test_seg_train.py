"""Mask R-CNN training: loss masking, one step, schedule, evaluation, stage=segment_train."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segmentation.datasets import MASK_UNKNOWN, DetectionDataset, collate, read_coco
from segmentation.engine import NonFiniteLossError, evaluate, train_one_epoch, warmup_schedule
from segmentation.io import load_torch_file
from segmentation.model import _maskrcnn_loss_with_unknown, build_maskrcnn, load_checkpoint
from tests.helpers.run import ROOT as REPO
from tests.helpers.run import SHARED_DATA, needs_shared, run_pipeline
from tests.helpers.seg_synth import make_coco_smears

SMALL = {
    "fpn_channels": 128,
    "box_representation": 512,
    "mask_head_layers": 2,
    "arch": "resnet18_fpn",
    "input_scale": 1.0,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 20,
    "box_batch_size_per_image": 32,
    "rpn_batch_size_per_image": 32,
}


def test_mask_loss_ignores_unknown_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 4)
    props = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]])]
    known = torch.zeros(1, 8, 8, dtype=torch.uint8)
    known[0, :4] = 1
    unknown = torch.full((1, 8, 8), MASK_UNKNOWN, dtype=torch.uint8)
    labels = [torch.tensor([1, 1])]
    # both RoIs on the known mask: equals plain BCE over all px
    gt = [torch.cat([known, unknown])]
    both_known = _maskrcnn_loss_with_unknown(logits, props, gt, labels, [torch.tensor([0, 0])])
    from torchvision.models.detection import roi_heads

    target = roi_heads.project_masks_on_boxes(gt[0], props[0], torch.tensor([0, 0]), 4)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1], target)
    assert torch.allclose(both_known, ref)
    # second RoI on the unknown mask: only the first RoI counts
    mixed = _maskrcnn_loss_with_unknown(logits, props, gt, labels, [torch.tensor([0, 1])])
    ref1 = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, 1], target[0])
    assert torch.allclose(mixed, ref1)
    none = _maskrcnn_loss_with_unknown(logits, props, gt, labels, [torch.tensor([1, 1])])
    assert float(none) == 0.0


def test_warmup_schedule_shapes():
    f = warmup_schedule(100, 10, "cosine", warmup_factor=0.0, final_factor=0.0)
    assert f(0) == 0.0 and f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.0)
    assert f(5) == pytest.approx(0.5)
    g = warmup_schedule(100, 0, "step", milestones=(0.5,), gamma=0.1)
    assert g(49) == 1.0 and g(50) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="valid"):
        warmup_schedule(10, 1, "linear")


def _tiny(tmp_path, n=3):
    ann = make_coco_smears(tmp_path / "smears", n_images=n, size=96, cells=2, radius=10, val=1)
    return read_coco(ann).renumber()


def test_a_noted_interrupt_stops_the_detector_epoch_before_a_step(tmp_path):
    """A Ctrl-C a library's callback swallowed let segment_train run to its end; the
    caller's noted interrupt (should_stop) now stops the epoch before the next step, with
    the weights untouched."""
    ds = _tiny(tmp_path)
    loader = torch.utils.data.DataLoader(
        DetectionDataset(ds.images[:2]), batch_size=2, collate_fn=collate
    )
    model = build_maskrcnn(**SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(KeyboardInterrupt, match="interrupt"):
        train_one_epoch(
            model, opt, loader, torch.device("cpu"), 0, log_every=0, should_stop=lambda: True
        )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_one_training_step_changes_weights(tmp_path):
    torch.manual_seed(0)
    ds = _tiny(tmp_path)
    loader = torch.utils.data.DataLoader(
        DetectionDataset(ds.images[:2]), batch_size=2, collate_fn=collate
    )
    model = build_maskrcnn(**SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    stats = train_one_epoch(model, opt, loader, torch.device("cpu"), 0, log_every=0)
    assert stats.iterations == 1
    assert set(stats.losses) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    assert all(np.isfinite(v) for v in stats.losses.values()) and stats.losses["loss_mask"] > 0
    after = model.state_dict()
    changed = [
        k
        for k in before
        if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])
    ]
    assert any(k.startswith("roi_heads.mask_head") for k in changed)
    assert any(k.startswith("backbone.body") for k in changed)
    assert any(k.startswith("rpn.") for k in changed)


def test_non_finite_loss_stops_with_message(tmp_path):
    ds = _tiny(tmp_path)
    loader = torch.utils.data.DataLoader(
        DetectionDataset(ds.images[:1]), batch_size=1, collate_fn=collate
    )
    model = build_maskrcnn(**SMALL)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.fill_(float("nan"))
    before = model.rpn.head.conv[0][0].weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(NonFiniteLossError, match="epoch 3, iteration 0"):
        train_one_epoch(model, opt, loader, torch.device("cpu"), 3, log_every=0)
    assert torch.equal(before, model.rpn.head.conv[0][0].weight)  # no update happened


def test_evaluate_perfect_and_empty_predictions(tmp_path):
    ds = _tiny(tmp_path)
    dset = DetectionDataset(ds.images)
    perfect = []
    for i in range(len(dset)):
        _, t = dset[i]
        n = len(t["boxes"])
        perfect.append(
            {
                "boxes": t["boxes"].numpy(),
                "scores": np.full(n, 0.9, np.float32),
                "masks": t["masks"].numpy().astype(bool),
            }
        )
    r = evaluate(None, dset, torch.device("cpu"), 0.5, predictions=perfect)
    assert r.n_gt == 2 * len(dset) and r.recall == 1.0 and r.precision == 1.0
    assert r.box_ap50 == pytest.approx(1.0) and r.mask_ap == pytest.approx(1.0)
    assert r.mean_mask_iou == pytest.approx(1.0)
    low = [dict(p, scores=np.full(len(p["scores"]), 0.1, np.float32)) for p in perfect]
    r2 = evaluate(None, dset, torch.device("cpu"), 0.5, predictions=low)
    assert r2.recall == 0.0 and r2.precision is None and r2.box_ap50 == pytest.approx(1.0)


def _run(args, cwd):
    return run_pipeline(args, cwd=cwd, timeout=600)


TINY_TRAIN = [
    "stage=segment_train",
    "segmentation.epochs=1",
    "segmentation.input_scale=1.0",
    "segmentation.anchor_sizes=[8,16,32,64,128]",
    "segmentation.rpn_pre_nms_top_n_train=100",
    "segmentation.rpn_post_nms_top_n_train=50",
    "segmentation.box_batch_size_per_image=32",
    "segmentation.warmup_iters=1",
    "segmentation.tb_images=1",
    "hardware.torch_threads=1",
]


def test_stage_segment_train_writes_model_and_metrics(tmp_path):
    smears = tmp_path / "smears"
    make_coco_smears(smears, n_images=3, size=96, cells=2, radius=10, val=1)
    root = tmp_path / "out"
    p = _run(
        [*TINY_TRAIN, f"paths.root={root}", "experiment=t", f"paths.inputs.smears={smears}"], REPO
    )
    assert p.returncode == 0, p.stderr[-3000:]
    d = root / "t" / "segment_train"
    m = json.loads((d / "metrics.json").read_text())
    v = m["val"]["synthetic"]
    assert v["n_images"] == 1 and v["n_gt"] == 2
    assert {"box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75", "recall"} <= set(
        v
    )
    model, ck = load_checkpoint(d / "model.pt")
    assert ck["epoch"] == 0 and "optimizer" in ck and "rng" in ck
    assert ck["model_args"]["anchor_sizes"] == [8, 16, 32, 64, 128]
    assert any(f.name.startswith("events") for f in (d / "tb").iterdir())
    man = json.loads((d / "manifest.json").read_text())
    assert man["status"] == "complete"


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    smears = tmp_path / "smears"
    make_coco_smears(smears, n_images=3, size=96, cells=2, radius=10, val=1)
    root = tmp_path / "out"
    common = [
        *TINY_TRAIN[1:],
        f"paths.root={root}",
        f"paths.inputs.smears={smears}",
        "stage=segment_train",
        "segmentation.epochs=2",
        "segmentation.eval_every=5",
    ]
    common = [a for a in common if a != "segmentation.epochs=1"]
    p = _run([*common, "experiment=full"], REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    # interrupted run: 1 epoch of the same 2-epoch schedule, then resume
    p = _run([*common, "experiment=part", "segmentation.stop_after_epochs=1"], REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _run([*common, "experiment=part", "resume=true"], REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_torch_file(root / "full" / "segment_train" / "model.pt")["model"]
    b = load_torch_file(root / "part" / "segment_train" / "model.pt")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    # the resumed run's training time counts the epoch before the resume too
    m = json.loads((root / "part" / "segment_train" / "metrics.json").read_text())
    assert len(m["history"]) == 2
    assert m["train_seconds_all_epochs"] == round(
        sum(h["train"]["seconds"] for h in m["history"]), 1
    )


@pytest.mark.slow
def test_stage_segment_train_ddp_two_cpu_processes(tmp_path):
    smears = tmp_path / "smears"
    make_coco_smears(smears, n_images=5, size=96, cells=2, radius=10, val=1)
    root = tmp_path / "out"
    p = _run(
        [
            *TINY_TRAIN,
            f"paths.root={root}",
            "experiment=d",
            f"paths.inputs.smears={smears}",
            "hardware.num_processes=2",
            "hardware.master_port=0",
        ],
        REPO,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    d = root / "d" / "segment_train"
    m = json.loads((d / "metrics.json").read_text())
    # 4 training images over 2 ranks, batch 2: one iteration per rank
    assert m["history"][0]["train"]["iterations"] == 1
    assert m["val"]["synthetic"]["n_gt"] == 2
    load_checkpoint(d / "model.pt")


@pytest.mark.parametrize("arch", ["resnet18_fpn", "mobilenet_v3_fpn", "resnet50_fpn_v2"])
def test_every_arch_builds_with_custom_anchors_and_round_trips(arch, tmp_path):
    from segmentation.model import save_checkpoint

    args = {**SMALL, "arch": arch, "anchor_sizes": [16, 32, 64, 128, 256]}
    model = build_maskrcnn(**args)
    model.train()
    t = {
        "boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]),
        "labels": torch.tensor([1]),
        "masks": torch.ones(1, 64, 64, dtype=torch.uint8),
    }
    losses = model([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))], [t])
    assert all(torch.isfinite(v) for v in losses.values())
    save_checkpoint(tmp_path / "m.pt", model, args)
    again, ck = load_checkpoint(tmp_path / "m.pt")
    assert ck["model_args"]["arch"] == arch
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_cells_cut_by_the_image_edge_can_be_ignored():
    """ignore_edge_px: a ground-truth box at the image edge (a cut cell) is an ignore
    region: not a miss when not found; a detection on it is not a false positive."""
    from pathlib import Path

    from segmentation.datasets import ImageRecord, Instance, SmearDataset, to_coco
    from segmentation.engine import mark_edge_cut

    whole, cut = (30.0, 30.0, 60.0, 60.0), (0.0, 40.0, 12.0, 70.0)
    rec = ImageRecord(Path("x.png"), 100, 100, instances=[Instance(whole), Instance(cut)])
    dset = DetectionDataset(SmearDataset([rec]).renumber().images)
    coco = to_coco(SmearDataset([rec]).renumber(), masks="none")
    assert mark_edge_cut(coco, 2.0) == 1 and [a["iscrowd"] for a in coco["annotations"]] == [0, 1]

    def pred(*boxes, score=0.9):
        b = np.array(boxes, np.float32).reshape(-1, 4)
        return [
            {
                "boxes": b,
                "scores": np.full(len(b), score, np.float32),
                "masks": np.zeros((len(b), 1, 1), bool),
            }
        ]

    only_whole = pred(whole)
    r = evaluate(None, dset, torch.device("cpu"), 0.5, predictions=only_whole)
    assert r.recall == 0.5 and r.box_ap50 < 0.6  # the cut cell counts as missed
    r = evaluate(None, dset, torch.device("cpu"), 0.5, predictions=only_whole, ignore_edge_px=2)
    assert r.n_gt == 1 and r.recall == 1.0 and r.box_ap50 == pytest.approx(1.0)
    assert "1 ground-truth boxes within 2 px of the edge ignored" in r.notes
    # a detection of the cut cell is neither a hit nor a false positive
    both = pred(whole, (0.0, 42.0, 11.0, 69.0))
    r = evaluate(None, dset, torch.device("cpu"), 0.5, predictions=both, ignore_edge_px=2)
    assert r.n_det == 1 and r.precision == 1.0 and r.box_ap50 == pytest.approx(1.0)
    # a false positive elsewhere still counts
    fp = pred(whole, (70.0, 70.0, 90.0, 90.0))
    r = evaluate(None, dset, torch.device("cpu"), 0.5, predictions=fp, ignore_edge_px=2)
    assert r.precision == 0.5


def test_segment_train_can_start_from_the_shipped_detector(tmp_path):
    """segmentation.pretrained_weights=shipped: the compact int8 file is unpacked and every
    weight loads, so training starts from it (the demo fine-tunes it on simulated smears);
    a model shape it does not fit is a clear error, not a traceback."""
    from pipeline.artifacts import pretrained_weights_path
    from segmentation.shipped import SHIPPED_DETECTOR

    assert pretrained_weights_path("shipped") == SHIPPED_DETECTOR
    assert pretrained_weights_path("Shipped") == SHIPPED_DETECTOR  # the case a user types
    assert pretrained_weights_path(None) is None
    assert pretrained_weights_path("/x/y.pt") == __import__("pathlib").Path("/x/y.pt")
    smears = tmp_path / "smears"
    make_coco_smears(smears, n_images=3, size=96, cells=2, radius=10, val=1)
    common = [*TINY_TRAIN, f"paths.root={tmp_path / 'out'}", f"paths.inputs.smears={smears}"]
    common.append("segmentation.pretrained_weights=shipped")
    p = _run([*common, "experiment=ft", "segmentation.lr=0.001"], REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"loaded {SHIPPED_DETECTOR}: 0 missing, 0 unexpected keys" in p.stdout + p.stderr
    shipped, _ = load_checkpoint(SHIPPED_DETECTOR)
    tuned, _ = load_checkpoint(tmp_path / "out" / "ft" / "segment_train" / "model.pt")
    fresh = build_maskrcnn(**SMALL)
    key = "backbone.body.layer2.0.conv1.weight"  # a conv deep in the backbone
    w_ship, w_tuned = shipped.state_dict()[key], tuned.state_dict()[key]
    assert (w_tuned - w_ship).norm() < 0.1 * (fresh.state_dict()[key] - w_ship).norm()

    # a start of other weight shapes: stopped before stage=all's first stage runs
    p = _run([*common, "stage=all", "experiment=bad", "segmentation.fpn_channels=64"], REPO)
    assert p.returncode != 0
    assert "segmentation.pretrained_weights=shipped" in p.stderr
    assert "was trained with fpn_channels=128" in p.stderr
    assert "segmentation.fpn_channels=64" in p.stderr and "nothing was run" in p.stderr
    assert "Traceback" not in p.stderr
    assert not list((tmp_path / "out" / "bad").glob("*/manifest.json"))  # no stage ran
    assert not (tmp_path / "out" / "bad" / "simulate").exists()
    # the library says the same when asked directly
    with pytest.raises(ValueError, match="do not fit this model .*size mismatch"):
        build_maskrcnn(**{**SMALL, "fpn_channels": 64}, pretrained_weights=str(SHIPPED_DETECTOR))


def test_a_start_whose_names_do_not_match_is_warned_about(tmp_path, caplog):
    """A file of another model loads nothing under strict=False: refused (audit s52 S4;
    was a warning, and a run from scratch); one that fits only in part: say so."""
    import logging

    path = tmp_path / "other.pt"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError, match="none of the model's .* weights is in the file"):
        build_maskrcnn(**SMALL, pretrained_weights=str(path))
    part = {k: v for k, v in build_maskrcnn(**SMALL).state_dict().items() if "layer1" in k}
    torch.save({"model": part}, path)
    with caplog.at_level(logging.WARNING, logger="segmentation.model"):
        build_maskrcnn(**SMALL, pretrained_weights=str(path))
    assert "are not in the file, so most of the model starts from scratch" in caplog.text


@pytest.mark.parametrize(
    "preset",
    ["demo", pytest.param("real", marks=needs_shared(SHARED_DATA, "the real preset's sources"))],
)
def test_the_presets_start_from_a_detector_that_fits_them(compose, preset):
    """+preset=demo and +preset=real fine-tune the shipped detector: the settings check
    passes on it (loads the file, compares weight shapes), and fails once a shape
    setting differs."""
    from pipeline.runner import StageError
    from pipeline.stages.segment_train import _validate

    cfg = compose([f"+preset={preset}", "stage=segment_train"])
    assert cfg.segmentation.pretrained_weights == "shipped"
    _validate(cfg)
    bad = compose(
        [f"+preset={preset}", "stage=segment_train", "segmentation.box_representation=256"]
    )
    with pytest.raises(StageError, match="box_representation=512; this run has"):
        _validate(bad)


def test_training_on_cell_type_classes_needs_wbc_classes(tmp_path):
    """A lab's COCO file names cell types: without data.smear_sources[N].wbc_classes the
    run stops naming the classes it found (it trained a detector of nothing, rc 0);
    with them those classes are the white cells."""
    from PIL import Image

    from pipeline.runner import StageError
    from pipeline.stages.segment_train import load_sets
    from tests.helpers.run import compose_config

    for i in range(4):
        Image.new("RGB", (40, 30), (230, 200, 200)).save(tmp_path / f"{i}.png")
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in range(4)],
        "categories": [{"id": 1, "name": "Neutrophil"}, {"id": 2, "name": "lymphocyte"}],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [5, 5, 12, 12]}
            for i in range(4)
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    src = f"{{format: coco, path: '{tmp_path / 'ann.json'}', name: lab, scale: 1.0"
    base = ["stage=segment_train", "data=bccd", f"paths.root={tmp_path / 'out'}"]
    cfg = compose_config([*base, f"data.smear_sources=[{src}}}]"])
    with pytest.raises(
        StageError,
        match=r"no white-cell box among the 3 training images.*neutrophil 1, lymphocyte 2.*"
        r"wbc_classes=\[neutrophil,lymphocyte\]",
    ):
        load_sets(cfg, None)
    cfg = compose_config(
        [*base, f"data.smear_sources=[{src}, wbc_classes: [neutrophil, LYMPHOCYTE]}}]"]
    )
    train, val, _, _ = load_sets(cfg, None)
    (tmp_path / "3.png").unlink()  # an image the file names is missing: found at start
    with pytest.raises(StageError, match=r"1 of 4 images named by .*ann.json are not there"):
        load_sets(cfg, None)
    # no 'split' field in the file: val_fraction (0.2) of the 4 images held out
    assert len(train) == 3 and len(val["lab"]) == 1
    assert {a.category for r in train for a in r.instances} == {"wbc"}


def _masked_record(boxes, size=100):
    """One ``size`` x ``size`` image whose white cells fill their boxes (real masks)."""
    from pathlib import Path

    from segmentation.datasets import ImageRecord, Instance, SmearDataset, encode_mask

    inst = []
    for x0, y0, x1, y1 in boxes:
        m = np.zeros((size, size), bool)
        m[int(y0) : int(y1), int(x0) : int(x1)] = True
        inst.append(Instance((x0, y0, x1, y1), mask=encode_mask(m)))
    rec = ImageRecord(Path("x.png"), size, size, instances=inst)
    return DetectionDataset(SmearDataset([rec]).renumber().images)


def _preds(boxes, size=100, score=0.9):
    b = np.array(boxes, np.float32).reshape(-1, 4)
    masks = np.zeros((len(b), size, size), bool)
    for k, (x0, y0, x1, y1) in enumerate(b.astype(int)):
        masks[k, y0:y1, x0:x1] = True
    return [{"boxes": b, "scores": np.full(len(b), score, np.float32), "masks": masks}]


def test_mask_iou_skips_ignored_edge_cells_and_ap_is_undefined_without_ground_truth():
    """A cell cut by the edge and ignored (ignore_edge_px) is left out of mean_mask_iou as
    it is of recall; with no ground truth left, AP is -1 (undefined), not 0."""
    corner = (0.0, 0.0, 20.0, 20.0)
    dset = _masked_record([corner])
    cpu = torch.device("cpu")
    r = evaluate(None, dset, cpu, 0.5, predictions=_preds([]), ignore_edge_px=5)
    assert r.n_gt == 0 and r.recall is None
    assert r.mean_mask_iou is None and r.n_gt_with_mask == 0
    assert (r.box_ap, r.box_ap50, r.box_ap75) == (-1.0, -1.0, -1.0)
    assert (r.mask_ap, r.mask_ap50, r.mask_ap75) == (-1.0, -1.0, -1.0)
    # the same cell counted (no ignore_edge_px) and missed: a real 0
    r = evaluate(None, dset, cpu, 0.5, predictions=_preds([]))
    assert r.n_gt == 1 and r.recall == 0.0 and r.mean_mask_iou == 0.0
    assert (r.box_ap, r.mask_ap) == (0.0, 0.0)


def test_mask_iou_uses_the_detections_left_after_ignored_ones():
    """A detection lying on an ignored (cut) cell counts for no cell's mask IoU either:
    the mask IoU is scored against the same detections as recall and precision."""
    whole, cut = (30.0, 30.0, 60.0, 60.0), (0.0, 30.0, 36.0, 60.0)
    dset = _masked_record([whole, cut])
    # a detection of the cut cell, which also overlaps the whole cell (box IoU < 0.5)
    r = evaluate(None, dset, torch.device("cpu"), 0.5, predictions=_preds([cut]), ignore_edge_px=2)
    assert r.n_gt == 1 and r.n_det == 0 and r.recall == 0.0
    assert r.n_gt_with_mask == 1 and r.mean_mask_iou == 0.0


def test_metrics_text_says_undefined_for_an_ap_with_nothing_to_score():
    """pycocotools' AP of -1 (no ground-truth cell scored) is not printed as a score."""
    from segmentation.train import metrics_text

    s = {"box_ap": -1.0, "mask_ap": None, "recall": 0.5}
    assert metrics_text(s) == "box AP undefined, recall 0.500"
    assert metrics_text({"box_ap": 0.25}) == "box AP 0.250"
