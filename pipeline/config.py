"""Structured configuration (Hydra ConfigStore).

Every config group has a dataclass here, so a typo such as ``vae.betta=4`` or a
wrong type fails when Hydra composes the config, before any work starts. The
YAML files in ``conf/`` only choose values; the schema lives here.

Only the ``pipeline`` package reads these objects. Library code in
``segmentation/`` and ``vae/`` takes plain typed arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class StageConfig:
    """Which stage runs. ``stage=NAME`` picks ``conf/stage/NAME.yaml``."""

    name: str = MISSING


@dataclass
class InputsConfig:
    """Explicit input paths. ``null`` means: take it from the run directory.

    Each key names an artifact; see ``pipeline.stages.ARTIFACTS`` for the
    stage that produces it inside ``outputs/<experiment>/``.
    """

    smears: str | None = None  # folder of smear images (+ annotations.json)
    annotations: str | None = None  # COCO instances JSON for `smears`
    expression_raw: str | None = None  # raw counts AnnData (simulator or user file)
    segmentation_model: str | None = None  # Mask R-CNN checkpoint
    cells: str | None = None  # cells.h5ad from stage=segment
    expression: str | None = None  # processed expression AnnData
    paired: str | None = None  # paired.h5ad from stage=pair
    model: str | None = None  # beta-VAE checkpoint
    latent: str | None = None  # latent.h5ad


@dataclass
class PathsConfig:
    root: str = "outputs"  # experiments live in <root>/<experiment>/
    shared_data: str = "../shared/data"  # public data sets (see README)
    inputs: InputsConfig = field(default_factory=InputsConfig)


@dataclass
class HardwareConfig:
    """Devices and process layout.

    ``kind``: ``cpu`` | ``gpu`` | ``multi_gpu``. ``devices`` lists CUDA
    ordinals; one process is started per listed device (DDP) unless the run
    was already launched by ``torchrun``. On CPU, ``num_processes > 1`` runs
    DDP with the gloo backend (used by the tests).
    """

    kind: str = "cpu"
    devices: list[int] = field(default_factory=list)
    num_processes: int = 1
    precision: str = "fp32"  # fp32 | bf16 (autocast, GPU only)
    backend: str | None = None  # None -> nccl on GPU, gloo on CPU
    fallback_to_cpu: bool = False  # if a GPU is requested but none exists
    master_addr: str = "127.0.0.1"
    master_port: int = 29531
    num_workers: int = 0  # DataLoader workers
    pin_memory: bool = False
    torch_threads: int | None = None  # None -> torch default


@dataclass
class SimulatorConfig:
    """Synthetic smears and paired expression with known ground truth."""

    n_images: int = 24
    image_size: list[int] = field(default_factory=lambda: [512, 512])  # (H, W) px
    wbc_per_image: list[int] = field(default_factory=lambda: [3, 6])  # inclusive range
    rbc_density: float = 0.55  # fraction of the field covered by red cells
    platelets_per_image: list[int] = field(default_factory=lambda: [2, 8])
    wbc_diameter_px: float = 60.0  # diameter of a mature neutrophil, px
    kind_weights: dict[str, float] = field(
        default_factory=lambda: {
            "neutrophil_lineage": 0.7,
            "lymphocyte": 0.1,
            "monocyte": 0.1,
            "eosinophil": 0.1,
        }
    )
    touching_fraction: float = 0.15  # share of WBCs placed touching another
    n_genes: int = 240
    mean_library_size: float = 2000.0
    nb_dispersion: float = 5.0  # NB inverse dispersion (larger = less noise)
    dropout: float = 0.1  # extra zero-inflation probability
    val_fraction: float = 0.2
    seed: int = 0


@dataclass
class DataConfig:
    """Where images, crops and expression come from.

    ``name`` is ``synthetic`` for the simulator, else a real data set.
    """

    name: str = "synthetic"
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    # real data (resolved relative to paths.shared_data when not absolute)
    smear_sources: list[dict[str, Any]] = field(default_factory=list)
    crop_sources: list[dict[str, Any]] = field(default_factory=list)
    expression_file: str | None = None


@dataclass
class SegmentationConfig:
    """Mask R-CNN model, its training and the crop extraction of stage=segment."""

    arch: str = "resnet18_fpn"  # resnet18_fpn | mobilenet_v3_fpn | resnet50_fpn_v2
    pretrained_weights: str | None = None  # local file only; no downloads
    trainable_backbone_layers: int = 5
    min_size: int = 512
    max_size: int = 512
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExpressionConfig:
    """scanpy preprocessing of stage=expression."""

    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PairConfig:
    """How crops are matched to expression profiles (stage=pair)."""

    mode: str = "same_cell"  # same_cell | by_label | by_maturation | unpaired
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class VAEConfig:
    """Two-branch beta-VAE architecture and loss weights."""

    n_latent: int = 16
    beta: float = 4.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    """Optimisation of the beta-VAE (stage=train)."""

    max_epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnalysisConfig:
    """stage=evaluate and stage=traverse."""

    extra: dict[str, Any] = field(default_factory=dict)


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
    experiment: str = "demo"
    # sub-folder inside each stage folder; set automatically for -m sweeps
    variant: str = ""
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    log_level: str = "INFO"


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    groups = {
        "stage": StageConfig,
        "data": DataConfig,
        "segmentation": SegmentationConfig,
        "expression": ExpressionConfig,
        "pair": PairConfig,
        "vae": VAEConfig,
        "trainer": TrainerConfig,
        "analysis": AnalysisConfig,
        "hardware": HardwareConfig,
        "paths": PathsConfig,
    }
    for group, node in groups.items():
        cs.store(group=group, name=f"base_{group}", node=node)
