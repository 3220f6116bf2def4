"""Structured configuration (Hydra ConfigStore).

Every config group has a dataclass here, so a typo such as ``vae.betta=4`` or a
wrong type fails when Hydra composes the config, before any work starts. The
YAML files in ``pipeline/conf/`` only choose values; the schema lives here.

Only the ``pipeline`` package reads these objects. Library code in
``segmentation/`` and ``vae/`` takes plain typed arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING

from pipeline.config_embed import EmbedConfig
from pipeline.config_sources import SegmentSourceConfig
from pipeline.config_vae import TrainerConfig, VAEConfig
from pipeline.simulator.dataset import SimulatorParams
from segmentation.schema import (
    BORDER_MARGIN,
    MASK_THRESHOLD,
    MAX_AREA_RATIO,
    MIN_CELL_AREA,
    MIN_CELLS_AREA_RATIO,
    MIN_SOLIDITY,
    SCALE_SPREAD,
    SCORE_THRESHOLD,
    TOUCH_PX,
    TRIM_RIM,
)
from vae.analysis.settings import AnalysisSettings
from vae.inputs.schema import granule_programs


@dataclass
class StageConfig:
    """Which stage runs. ``stage=NAME`` picks ``pipeline/conf/stage/NAME.yaml``."""

    name: str = MISSING


@dataclass
class InputsConfig:
    """Explicit input paths. ``null`` means: take it from the run directory.

    Each key names an artifact; see ``pipeline.runner.ARTIFACTS`` for the
    stage that produces it inside ``outputs/<experiment>/``.
    """

    smears: str | None = None  # folder of smear images (+ annotations.json)
    annotations: str | None = None  # COCO instances JSON for `smears`
    expression_raw: str | None = None  # raw counts AnnData (simulator or user file)
    segmentation_model: str | None = None  # Mask R-CNN checkpoint
    cells: str | None = None  # cells.h5ad from stage=segment
    crop_rejects: str | None = None  # rejects.png of stage=segment (shown in the report)
    expression: str | None = None  # processed expression AnnData
    paired: str | None = None  # paired.h5ad from stage=pair
    model: str | None = None  # beta-VAE checkpoint
    latent: str | None = None  # latent.h5ad
    evaluation: str | None = None  # metrics.json of stage=evaluate (tables beside it)


@dataclass
class PathsConfig:
    root: str = "outputs"  # experiments live in <root>/<experiment>/
    # public data sets (see README); relative to the working directory, so an installed
    # copy run elsewhere takes $WBC_SHARED_DATA (packaging audit: +preset=real from
    # another folder found no data)
    shared_data: str = "${oc.env:WBC_SHARED_DATA,../shared/data}"
    inputs: InputsConfig = field(default_factory=InputsConfig)


@dataclass
class HardwareConfig:
    """Devices and process layout.

    ``kind``: ``cpu`` | ``gpu`` | ``multi_gpu``. ``devices`` lists CUDA
    ordinals; one process is started per listed device (DDP) unless the run
    was already launched by ``torchrun``. On CPU, ``num_processes > 1`` runs
    DDP with the gloo backend (used by the tests); ``devices`` must stay empty there.
    ``backend``: null (nccl on GPU, gloo on CPU), ``gloo``, ``nccl`` (CUDA only) or
    ``mpi`` (a PyTorch build with MPI). ``master_port``: 0 picks a free port.
    """

    kind: str = "cpu"
    devices: list[int] = field(default_factory=list)
    num_processes: int = 1
    precision: str = "fp32"  # fp32 | bf16 (autocast, GPU only)
    backend: str | None = None  # None -> nccl on GPU, gloo on CPU
    fallback_to_cpu: bool = False  # if a GPU is requested but none exists
    master_addr: str = "127.0.0.1"
    # 0: a free port picked by the pipeline's launcher for each run (two DDP runs on one
    # machine no longer collide); a fixed port only where another host must know it
    master_port: int = 0
    num_workers: int = 0  # DataLoader workers
    pin_memory: bool = False  # pinned host memory for the copy to the GPU; no-op on CPU
    # paired tables whose crops + dense expression would exceed this many GiB in memory
    # are streamed (stage=train, stage=embed): crops from a chunked store on disk, X and
    # counts kept sparse, one batch in memory at a time; 0: always; null: never
    stream_above_gib: float | None = 2.0
    # intra-op threads; None: picked from free cores and load, 1 per DDP process (logged)
    torch_threads: int | None = None


def _simulator_schema() -> type:
    """``data.simulator``: the fields and defaults of :class:`SimulatorParams` (their one
    owner, documented there), with tuples as lists (OmegaConf has no tuples); ``seed``
    is null by default = the top-level ``seed``, like ``expression.seed`` / ``pair.seed``."""
    types = {"int": int, "float": float, "str": str, "bool": bool}
    fields = []
    for f in dataclasses.fields(SimulatorParams):
        default = getattr(SimulatorParams(), f.name)
        if isinstance(default, tuple):
            fields.append((f.name, list[int], field(default_factory=lambda v=default: list(v))))
        elif isinstance(default, dict):
            fields.append(
                (f.name, dict[str, float], field(default_factory=lambda v=default: dict(v)))
            )
        elif f.name == "seed":  # null: the top-level seed (pipeline/stages/simulate.py)
            fields.append((f.name, int | None, None))
        else:
            fields.append((f.name, types[str(f.type)], default))
    cls = dataclasses.make_dataclass("SimulatorConfig", fields)
    cls.__module__ = __name__  # so the config pickles (DDP workers get it by spawn)
    return cls


SimulatorConfig = _simulator_schema()


@dataclass
class SmearSourceConfig:
    """One annotated smear set read by stage=segment_train (segmentation/datasets.py)."""

    format: str = MISSING  # coco | voc | yolo | mask_png | geojson (QuPath objects per image)
    # folder (voc/yolo/mask_png/geojson) or COCO JSON; relative -> paths.shared_data
    path: str = MISSING
    name: str = ""  # short name in logs and metrics (default: the folder name)
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    val_splits: list[str] = field(default_factory=lambda: ["val"])
    test_splits: list[str] = field(default_factory=list)  # evaluated once at the end
    # load-time resize (network px per source px); null = auto per image: the
    # median WBC box side becomes segmentation.cell_px (needs boxes: training/eval only)
    scale: float | None = None
    # mask_png, geojson: deterministic held-out share per folder; coco: the same, when no image of
    # the file has a `split` field (a CVAT / Label Studio export)
    val_fraction: float = 0.2
    # class names of the annotations that are white cells, beside the built-in aliases
    # (wbc, leukocyte ...): a lab's per-type classes, e.g. [neutrophil, lymphocyte]
    wbc_classes: list[str] = field(default_factory=list)
    image_root: str | None = None  # coco: folder of the images (default: the JSON's folder)
    repeat: int = 1  # times each training image is listed per epoch (oversampling)
    copy_paste_donor: bool = False  # its masked cells may be pasted onto other images
    # CSVs of reviewed boxes (image,x0,y0,x1,y1,category[,note]; scripts/eval_segmentation.py
    # --gt-review's format): each listed white-cell box takes its reviewed class (rbc,
    # platelet...) before training, so an annotation error is not learnt as a white cell;
    # a path as given, else under paths.shared_data
    box_review: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where images, crops and expression come from.

    ``name`` is ``synthetic`` for the simulator, else a real data set.
    """

    name: str = "synthetic"
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    # real smear sets for stage=segment_train (pipeline/conf/data/{bccd,txl_pbc,...}.yaml);
    # data=synthetic reads the simulator's smears instead
    smear_sources: list[SmearSourceConfig] = field(default_factory=list)
    # real images for stage=segment (pipeline/config_sources.py); [] -> `smears` input
    segment_sources: list[SegmentSourceConfig] = field(default_factory=list)
    expression_file: str | None = None


@dataclass
class SegmentationConfig:
    """Mask R-CNN model, its training and the crop extraction of stage=segment."""

    arch: str = "resnet18_fpn"  # resnet18_fpn | mobilenet_v3_fpn | resnet50_fpn_v2
    # local file only, no downloads; "shipped" = the package's real-smear detector
    pretrained_weights: str | None = None
    trainable_backbone_layers: int = 5
    # torchvision's own resize bounds: inactive here (the model is built at scale 1.0 and
    # the images are scaled by input_scale / the estimated magnification instead); kept
    # so that older runs' recorded settings still compose and resume
    min_size: int = 512
    max_size: int = 512
    # --- stage=segment_train: model shape (docs/segmentation_train.md) ---
    # anchor side per FPN level, px at network input (cells are ~cell_px there)
    anchor_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    fpn_channels: int = 128  # resnet18_fpn only: FPN width (torchvision 256)
    box_representation: int = 512  # resnet18_fpn only: box-head MLP width (torchvision 1024)
    mask_head_layers: int = 2  # resnet18_fpn only: mask-head convs (torchvision 4)
    rpn_pre_nms_top_n_train: int = 600  # torchvision: 2000; fewer = faster on CPU
    rpn_post_nms_top_n_train: int = 300  # torchvision: 2000
    # torchvision: 1000; stored in the model: stage=segment keeps the model's value (raised to
    # rpn_post_nms_top_n when lower), whatever this run says
    rpn_pre_nms_top_n_test: int = 300
    rpn_batch_size_per_image: int = 128  # anchors sampled per image for the RPN loss
    box_batch_size_per_image: int = 128  # RoIs sampled per image for the box/mask heads
    # --- stage=segment_train: data ---
    cell_px: float = 40.0  # WBC size at network input for sources with scale=null (auto)
    mask_mode: str = "pseudo"  # box-only WBCs: ignore (no mask loss) | pseudo | box
    pseudo_method: str = "ellipse"  # ellipse (inscribed in the box) | watershed (ellipse fallback)
    copy_paste: float = 0.5  # P(paste donor cells into a training image); needs a donor source
    copy_paste_max: int = 3  # cells pasted per image at most
    max_train_images: int | None = None  # first N training images (smoke runs)
    max_val_images: int | None = None  # first N validation images
    cache_images: bool = True  # keep loaded training images in memory
    # augmentation (segmentation/transforms.py), in the scaled frame
    aug_flips: bool = True  # horizontal + vertical flips
    aug_rot90: bool = True  # random multiples of 90 degrees
    aug_scale: list[float] = field(default_factory=lambda: [0.8, 1.25])  # random rescale
    aug_crop: int = 0  # random square crop side, px (0 = whole image)
    # up to this fraction cut from each side of half the images (cells cut by the edge)
    aug_border_crop: float = 0.0
    # probability that a field is cut through one of its cells (a sliver at the new edge)
    aug_cut_cell: float = 0.0
    aug_color: float = 0.2  # brightness/contrast/saturation jitter strength
    aug_stain: float = 0.2  # probability of an H&E-like stain perturbation
    aug_blur: float = 0.1  # probability of a Gaussian blur
    aug_noise: float = 0.1  # probability of Gaussian noise
    # optimisation
    epochs: int = 12
    stop_after_epochs: int | None = None  # end this run early (same schedule); resume=true goes on
    train_batch_size: int = 2  # images per step per process
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.02  # peak LR (after warm-up), per train_batch_size images
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    warmup_iters: int = 30
    schedule: str = "cosine"  # cosine | step | constant (per iteration, after warm-up)
    grad_clip: float = 10.0  # max gradient norm; 0 = off
    eval_every: int = 1  # epochs between validation runs (the last epoch always)
    tb_images: int = 4  # validation images with drawn predictions in TensorBoard
    log_every: int = 10  # iterations between DEBUG loss lines (log_level=DEBUG; bars show progress)
    # --- stage=segment: tiled inference (docs/segmentation_infer.md) ---
    input_scale: float = 0.6  # source image resized by this before tiling (cell px as trained)
    # sources with no scale, and embed's smears: measure each image's scale from its white (else
    # red) cells (segmentation/magnification.py); null: as the detector says (shipped: on)
    estimate_scale: bool | None = None
    # with estimate_scale: a pass at the estimate, then one at the scale making the detector's
    # confident white boxes cell_px (no ground truth). null: as the detector says (shipped: on)
    refine_scale: bool | None = None
    # with estimate_scale: each image's estimate is held within this factor of the median
    # estimate of the images of its folder and pixel size (one microscope); 1: the median
    # for all; null: each image on its own (docs/segmentation_infer.md)
    scale_spread: float | None = SCALE_SPREAD
    tile_size: int = 1024  # square tile side, px at input_scale; fed to the net unresized
    tile_overlap: int = 256  # px; keep above the largest cell diameter
    batch_size: int = 4  # tiles per forward pass
    batch_megapixels: float = 1.1  # and at most this many tile px per pass (peak memory)
    cpu_bf16: bool | None = None  # backbone in bf16 on a CPU; null: where the CPU has bf16 units
    detect_score_floor: float = 0.05  # detections below are not even listed
    mask_threshold: float = MASK_THRESHOLD  # mask probability -> binary mask
    max_detections_per_tile: int = 100
    rpn_post_nms_top_n: int = 300  # proposals per tile kept for the box head
    merge_iou: float = 0.5  # global NMS (box IoU) over detections of all tiles
    merge_containment: float = 0.7  # drop a tile-cut detection this much inside another
    max_images: int | None = None  # first N images only (smoke runs)
    split: str | None = None  # only COCO images of this split (train|val); None = all
    convert_images: bool = True  # grayscale/RGBA/16-bit -> RGB uint8 (else skip them)
    # a TIFF over this many megapixels (a whole slide) is read and segmented window by window
    # (memory follows the window), each cell counted once (docs/segmentation_infer.md)
    slide_megapixels: float = 256.0
    slide_window: int = 8192  # window side, source px
    slide_overlap: int = 512  # source px two windows share: at least 2 cell diameters
    # --- stage=segment: crops and filters (each flag is counted in uns["filter_counts"]) ---
    crop_size: int = 128  # output crop side S, px
    crop_margin: float = 0.1  # context around a large cell, fraction of its size, per side
    background_value: int = 0  # 0..255, every channel outside the cell mask
    # peel background off each crop's mask edge, at most this many working px deep (the
    # detector's masks are one working px coarse = several source px; docs/segmentation_infer.md
    # "Masks that end at the cell"); 0 = off
    trim_rim: float = TRIM_RIM
    score_threshold: float = SCORE_THRESHOLD  # keep score >= this
    min_area: int = MIN_CELL_AREA  # mask px (source frame); smaller are dropped
    max_area: int | None = None  # mask px; None = no upper limit
    drop_border: bool = True  # drop cells whose mask touches the image border
    border_margin: int = BORDER_MARGIN  # px from the border that counts as touching
    max_overlap_iou: float | None = 0.2  # drop cells with mask IoU above this with another
    # a lower-score detection lying this much (intersection / its area) inside a better one
    # is a duplicate of that cell: flagged, and not counted as an overlap; null = off
    duplicate_containment: float | None = 0.6
    drop_multi_piece: bool = True  # drop masks in several connected pieces
    min_piece_area: int = 10  # px; smaller specks are not counted as pieces
    # cells a morphologist would not accept (defaults owned by segmentation/schema.py)
    drop_tile_cut: bool = True  # drop a tile fragment left after merging the tiles
    touch_px: int | None = TOUCH_PX  # drop cells within this gap of another cell; null = off
    min_solidity: float | None = MIN_SOLIDITY  # drop masks less convex (doublets); null = off
    max_area_ratio: float | None = MAX_AREA_RATIO  # drop area > this x image median; null = off
    min_cells_area_ratio: int = MIN_CELLS_AREA_RATIO  # cells an image needs for that test
    n_reject_examples: int = 32  # rejected crops on rejects.png (shown in the report)
    match_iou: float = 0.5  # detection <-> ground-truth mask IoU for truth labels
    n_overlays: int = 8  # overlay PNGs written (first N images)
    contact_sheet_max: int = 64  # crops on the contact sheet


@dataclass
class ExpressionConfig:
    """scanpy preprocessing of stage=expression (see docs/expression_pairing.md).

    Input precedence: ``paths.inputs.expression_raw`` > ``input_file`` >
    ``data.expression_file`` > the simulator's ``expression_raw.h5ad``.
    """

    # file to read instead of data.expression_file; relative paths are tried from the
    # working dir, then from paths.shared_data; "scanpy:pbmc68k_reduced" = scanpy's copy
    input_file: str | None = None
    input_format: str = "auto"  # auto | h5ad | 10x_h5 | 10x_mtx | csv | tsv | loom
    # CSV/TSV only: auto (gene-symbol overlap of rows vs columns, logged) | cells_by_genes |
    # genes_by_cells
    orientation: str = "auto"
    # what X holds: auto | counts | lognorm (auto: integers -> counts, else an error)
    values: str = "auto"
    # .h5ad whose X is log-normalised: the layer holding its raw counts (".raw" for
    # adata.raw.X), used as layers["counts"] (NB likelihood, QC on counts); null: none
    counts_layer: str | None = None
    # QC filters (0 / null = off); cells first, then genes
    min_genes: int = 0  # min detected genes per cell
    min_counts: int = 1  # min total counts per cell
    max_pct_mito: float | None = None  # max % counts in mitochondrial genes
    mito_prefix: str = "MT-"  # case-insensitive symbol prefix of mitochondrial genes
    min_cells: int = 0  # min cells expressing a gene
    target_sum: float = 1e4  # normalize_total target per cell
    n_top_genes: int | None = 2000  # highly variable genes (null: flag all genes)
    # seurat | cell_ranger (log data) | seurat_v3 | seurat_v3_paper (counts; need scikit-misc)
    hvg_flavor: str = "seurat"
    subset_hvg: bool = False  # keep only HVGs + genes of interest in the output
    genes_of_interest: list[str] = field(default_factory=list)  # kept even if not HVG
    programs: dict[str, list[str]] = field(default_factory=granule_programs)
    require_program_match: bool = True  # error if no program gene matches at all
    score_ctrl_size: int = 50  # sc.tl.score_genes control genes per program
    score_n_bins: int = 25
    label_key: str | None = None  # obs column for labels (null: first known column)
    maturation: str = "auto"  # auto (column, else dpt) | column | dpt | none
    maturation_key: str | None = None  # obs column (null: t / pseudotime / dpt_pseudotime)
    root_label: str | None = None  # label whose extremal cell roots diffusion pseudotime
    scale: bool = False  # scale genes before PCA only (X stays log-normalised)
    # obs column naming each cell's batch (sequencing run, patient, site): HVGs are chosen
    # within batches and the PCA (neighbours, UMAP, diffusion pseudotime) reads the HVGs
    # ComBat-corrected per batch; X stays as measured. vae.batch_key follows it
    # (docs/expression_pairing.md, "Batches"). null: one batch
    batch_key: str | None = None
    n_pcs: int = 30
    n_neighbors: int = 15
    umap: bool = True  # UMAP for the report figure
    plots: bool = True  # qc.png and umap.png
    seed: int | None = None  # null: top-level seed
    # what this data set cannot tell (its origin, what its labels are): carried through
    # pair into the traverse report's "What these data cannot show"
    notes: list[str] = field(default_factory=list)


@dataclass
class CropSourceConfig:
    """One source of cell crops for stage=pair."""

    kind: str = "cells"  # cells (stage=segment) | image_folder | segmentation_wbc | coco
    path: str | None = None  # null for cells; relative -> paths.shared_data
    max_per_class: int | None = None  # cap per class (first N in sorted order)


@dataclass
class PairConfig:
    """How crops are matched to expression profiles (stage=pair)."""

    mode: str = "same_cell"  # same_cell | by_label | by_maturation | unpaired | image_only
    # where crops come from; several sources are concatenated
    crop_sources: list[CropSourceConfig] = field(default_factory=lambda: [CropSourceConfig()])
    crop_size: int = 64  # crops resized to (S, S)
    background_value: int = 0  # pixel value outside the cell mask (0..255)
    # find each stage=segment cell's granule centres on its crop as cut, before the resize
    # to crop_size (obsm["granule_centres"]: the VAE granule layer's targets); granules
    # blur and merge in a halved crop (docs/vae.md, "Granule targets at the crop's own
    # resolution"); other crop sources: their centres are found on the resized crop
    granule_centres: bool = False
    # image class -> expression label (by_label); {} = identity on shared labels;
    # image classes are lower-cased by the folder readers
    label_map: dict[str, str] = field(default_factory=dict)
    draws_per_crop: int = 1  # by_label/by_maturation: rows (profile draws) per crop
    # by_label: which profile of its class a crop draws. random | maturation: crops ranked
    # by how far their nucleus has segmented (lobes + 1 - solidity) draw the profiles at
    # the same rank of obs['maturation'] (an assumption of the pairing, not an
    # observation: docs/expression_pairing.md, "Within a class")
    within_label: str = "random"
    keep_unmatched_images: bool = True  # crops without a partner -> image-only rows
    keep_unused_expression: bool = True  # profiles never drawn -> expression-only rows
    n_bins: int = 5  # by_maturation: equal-width bins of maturation in [0, 1]
    # by_maturation: maturation of crops known only by class (e.g. {band: 0.8})
    label_maturation: dict[str, float] = field(default_factory=dict)
    seed: int | None = None  # null: top-level seed
    min_class_size: int = 1  # by_label: smaller classes -> unlabelled (rejects.csv); 1 = off
    # a reviewed label list (CSV: image_ref or specimen, label; e.g. evaluate's
    # label_suspects.csv with its label column edited): replaces the crops' labels
    # before pairing; null = the sources' labels
    label_corrections: str | None = None


def _analysis_schema() -> type:
    """``analysis``: the fields and defaults of :class:`AnalysisSettings` (their one owner,
    vae/analysis/settings.py) except ``programs``: gene programs have one definition,
    ``expression.programs``, which evaluate/traverse receive (pipeline/stages/evaluate.py)."""
    fields = [
        (f.name, f.type, field(default=f.default, default_factory=f.default_factory))
        if f.default is dataclasses.MISSING
        else (f.name, f.type, f.default)
        for f in dataclasses.fields(AnalysisSettings)
        if f.name != "programs"
    ]
    cls = dataclasses.make_dataclass("AnalysisConfig", fields)
    cls.__module__ = __name__  # so the config pickles (DDP workers get it by spawn)
    return cls


AnalysisConfig = _analysis_schema()


@dataclass
class Config:
    stage: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    expression: ExpressionConfig = field(default_factory=ExpressionConfig)
    pair: PairConfig = field(default_factory=PairConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    experiment: str = "demo"
    # sub-folder inside each stage folder; set automatically for -m sweeps
    variant: str = ""
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    log_level: str = "INFO"


def _run_name_resolver(value: Any, setting: str = "experiment") -> str:
    """``${run_name:${experiment}}`` in ``hydra.run.dir``: Hydra creates that folder
    before the runner starts, so a name that would leave ``paths.root`` is replaced
    by ``_rejected_name`` here (raising would make Hydra print a traceback); the
    runner then refuses the name with a message (pipeline/names.py)."""
    from pipeline.names import BadNameError, check_run_name

    try:
        return check_run_name(value, setting, allow_empty=setting == "variant")
    except BadNameError:
        return "_rejected_name"


def _schema_stop(root, parts: list[str]) -> tuple[str, int, Any] | None:
    """Where the settings schema ``root`` stops the dotted key ``parts``: ``("list", i,
    node)`` where part ``i`` names an entry of a list by something other than an index,
    ``("missing", i, node)`` where a section of settings (a dataclass) has no part ``i``;
    None where the key reaches a setting, a value, a free mapping or a free list. An entry
    of a list of settings (``data.smear_sources.0``) is walked by its schema. The one walk
    of :func:`unknown_addition` and :func:`list_index_slip`."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    node = root
    for i, part in enumerate(parts):
        if isinstance(node, ListConfig):
            if not part.isdigit():
                return ("list", i, node)
            kind = node._metadata.element_type
            node = OmegaConf.structured(kind) if dataclasses.is_dataclass(kind) else None
            continue
        if not isinstance(node, DictConfig):
            return None  # a value, or a free list: not ours to check
        if part in node:
            node = node[part]
            continue
        if dataclasses.is_dataclass(OmegaConf.get_type(node)):
            return ("missing", i, node)
        return None  # a free mapping: a new key is what '+' is for
    return None


def is_list_setting(key: str) -> bool:
    """Whether the dotted ``key`` names a list setting (``vae.channels``), whose several
    values are given in brackets, not swept."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    node = OmegaConf.structured(Config)
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    return isinstance(node, ListConfig)


def unknown_addition(argv: list[str]) -> str | None:
    """The message for a ``+key=value`` / ``++key=value`` that adds a key no setting has,
    else None.

    Hydra refuses ``vae.betta=4`` and suggests ``+vae.betta=4``, which it then accepts
    and nothing reads: a typo would run silently with the default. Adding to a settings
    section (a dataclass of this module) is refused at any depth (``+pair.nonsense.x=1``:
    ``pair`` has no ``nonsense``), and so is a top-level key that is neither a setting
    nor a config group (``+nonsense=1``). Adding to a free mapping
    (``+expression.programs.NAME=[...]``, ``+pair.label_map.X=Y``), a config group
    (``+preset=NAME``) and Hydra's own ``hydra.*`` stay.
    """
    import difflib
    from pathlib import Path

    from omegaconf import OmegaConf

    groups = sorted(p.name for p in (Path(__file__).parent / "conf").iterdir() if p.is_dir())
    root = None
    for arg in argv:
        if not arg.startswith("+") or "=" not in arg:
            continue
        key = arg.lstrip("+").split("=", 1)[0]
        if key == "hydra" or key.startswith("hydra."):
            continue  # Hydra's own settings
        if root is None:
            root = OmegaConf.structured(Config)
        parts = key.split(".")
        if len(parts) == 1:
            if key in groups or key in root:
                continue  # +preset=NAME: a config group; +seed=1: a setting Hydra has
            near = difflib.get_close_matches(key, [*groups, *(str(k) for k in root)], n=3)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            return (
                f"{arg}: {key!r} is neither a setting nor a config group; {hint}('+' adds a "
                f"key that no stage reads; config groups: {', '.join(groups)})"
            )
        stop = _schema_stop(root, parts)
        if stop is not None and stop[0] == "missing":
            _, i, node = stop
            section, part = ".".join(parts[:i]), parts[i]
            near = difflib.get_close_matches(part, [str(k) for k in node], n=3)
            hint = f"did you mean {', '.join(f'{section}.{k}' for k in near)}? " if near else ""
            return (
                f"{arg}: {section} has no setting {part!r}; {hint}('+' adds a key "
                f"that no stage reads; the settings are in pipeline/config*.py)"
            )
    return None


def list_index_slip(argv: list[str]) -> str | None:
    """The message for an override that indexes a list setting by a name
    (``vae.maturation_classes.foo=1``: OmegaConf's update fails on it as a bare int()
    ValueError), else None.

    >>> list_index_slip(["vae.maturation_classes.foo=1"]).split(";")[0]
    'vae.maturation_classes.foo=1: vae.maturation_classes is a list'
    >>> list_index_slip(["vae.maturation_classes.0=band", "vae.beta=4"]) is None
    True
    """
    from omegaconf import OmegaConf

    root = OmegaConf.structured(Config)
    for arg in argv:
        key, sep, _ = arg.lstrip("+~").partition("=")
        if not sep or key.startswith("hydra."):
            continue
        parts = key.split(".")
        stop = _schema_stop(root, parts)
        if stop is not None and stop[0] == "list":
            name, part = ".".join(parts[: stop[1]]), parts[stop[1]]
            return (
                f"{arg}: {name} is a list; give the whole list ({name}=[a,b]) or "
                f"an entry by its index ({name}.0=a), not by a name ({part!r})"
            )
    return None


def _home_resolver(value: Any) -> str:
    """``${home:${paths.root}}`` in ``hydra.run.dir``: a leading ``~`` expanded, as the
    runner expands the path settings; a ``~`` reaching ``paths.root`` other than on the
    command line (a preset, an interpolation) put Hydra's folder under ``<cwd>/~``."""
    from pathlib import Path

    return str(Path(str(value)).expanduser())


# the folders of Hydra's run folder's path (itself and those above it, absolute) that did
# not exist when this process's run started: what Hydra is about to make. A run refused
# before any stage removes these again, if empty, and nothing else (runner._drop_hydra_dir):
# a refused command left an empty paths.root behind. None until Hydra starts a run.
_ABSENT_AT_START: tuple[str, ...] | None = None


def absent_at_start() -> tuple[str, ...] | None:
    """The folders Hydra's run folder needed that did not exist before this run (the
    deepest first); None when no Hydra run recorded them (the Python API, a test)."""
    return _ABSENT_AT_START


def _record_absent(folder: Any) -> None:
    import os

    global _ABSENT_AT_START
    absent: list[str] = []
    path = os.path.abspath(str(folder))
    while not os.path.lexists(path):
        absent.append(path)
        up = os.path.dirname(path)
        if up == path:
            break
        path = up
    _ABSENT_AT_START = tuple(absent)


class RunFolderRecord(Callback):
    """Hydra callback (``hydra.callbacks`` in pipeline/conf/config.yaml): before Hydra
    makes its run folder, note which of its folders do not exist yet."""

    def _note(self, config: Any, key: str) -> None:
        from omegaconf import OmegaConf

        global _ABSENT_AT_START
        _ABSENT_AT_START = None  # never an earlier run's list (a second run in a process)
        try:
            folder = OmegaConf.select(config, key)
        except Exception:  # noqa: BLE001 - Hydra reports a bad run folder itself, next
            return
        if folder is not None:
            _record_absent(folder)

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._note(config, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._note(config, "hydra.sweep.dir")


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent).

    Only the top-level ``base_config`` is stored: it is first in ``pipeline/conf/config.yaml``'s
    defaults, so every group file merged after it is checked against :class:`Config`
    (a typo or wrong type fails at compose). No per-group schema entries are stored,
    so none shows up among a group's choices (``stage=``, ``vae=`` ...).
    """
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", _run_name_resolver)
    if not OmegaConf.has_resolver("home"):
        OmegaConf.register_new_resolver("home", _home_resolver)
    ConfigStore.instance().store(name="base_config", node=Config)
