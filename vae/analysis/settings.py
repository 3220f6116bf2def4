"""Typed settings of the analyses; ``cfg.analysis`` is built from this dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from vae.inputs.schema import MATURATION_ORDER, granule_programs


@dataclass
class AnalysisSettings:
    """Settings of stage=evaluate and stage=traverse (see docs/analysis.md).

    The config schema uses this dataclass as ``cfg.analysis`` (``pipeline/config.py``),
    so every default has this one owner.
    """

    split: str = "test"  # rows of latent.h5ad evaluated (obs["split"]); "all" for every row
    label_key: str = "label"  # obs column with the cell class
    maturation_key: str = "maturation"  # obs column with maturation (simulator t / pseudotime)
    batch_size: int = 128  # encode/decode batch
    # latent structure
    knn_k: int = 15  # kNN vote (reference: the train split)
    # obs column naming where each row's image came from (stage=pair's image_source): the
    # image code's label transfer is also scored per source (absent column: skipped)
    source_key: str = "image_source"
    # obs column naming each profile's batch (run, patient, site): how well the batches
    # mix within a class is scored (metrics.batch_mixing; null: the model's vae.batch_key,
    # none without one). Set it on a model trained without the covariate to see whether
    # its latent sorts cells by batch (docs/vae.md, "Expression batches")
    batch_key: str | None = None
    # a model with image sources (vae.image_batch_key) draws every code without a crop
    # (path steps, dimension sweeps) as under this source's microscope; null: in the
    # average of the sources (docs/vae.md, "Image sources")
    draw_source: str | None = None
    n_neighbors: int = 15  # kNN graph for Leiden and UMAP
    leiden_resolution: float = 1.0
    umap: bool = True  # UMAP figures (off: PCA, faster)
    # disentanglement against simulator truth (obs columns; absent ones are skipped)
    factors: list[str] = field(
        default_factory=lambda: ["t", "granule_density", "lobes", "diameter", "kind"]
    )
    mig_bins: int = 20
    dci_trees: int = 50  # random-forest size of DCI
    # gene programs (matched case-insensitively to the model's genes); the pipeline passes
    # expression.programs (their one definition in the config; not an analysis.* setting)
    programs: dict[str, list[str]] = field(default_factory=granule_programs)
    # per-dimension traversals
    top_k_dims: int = 6  # dims with the largest KL that are swept
    span_sd: float = 3.0  # sweep anchor +- span_sd x sd of the latent means (at most)
    # each dim swept only over the stretch around the anchor whose codes stay among the
    # training crops' codes (image_support below): a one-dim move soon leaves them
    sweep_in_support: bool = True
    n_steps: int = 9  # images per sweep
    # anchor = mean of this class (None: the training cell with a crop nearest the mean)
    anchor_class: str | None = None
    anchor_cell: str | None = None  # anchor = this cell id (overrides anchor_class)
    # path from the earliest to the latest class
    path_classes: list[str] = field(
        default_factory=lambda: list(MATURATION_ORDER)
    )  # maturation order; classes missing from the data are skipped; [] -> sort by maturation
    path_steps: int = 12  # decoded points along each path
    # poses per path step: each step is also decoded in the poses of the held-out cells
    # nearest to it (traverse.posed_codes), its features the median over them; 0: off
    path_pose_cells: int = 8
    # a path step is decoded from data when its code lies within the spread of the training
    # rows with a crop (traverse.image_support): mean distance to its image_support_k nearest
    # such codes <= their own at image_support_quantile; others are drawn faded
    image_support_k: int = 5
    image_support_quantile: float = 0.99
    gp_length_scale: float = 0.3  # initial RBF length scale (path position units)
    gp_noise: float = 1e-3
    top_genes: int = 20  # genes listed in the report
    # granule quantification, vae/analysis/granules.py (pixels of the crop: tuned on 64 px crops)
    granule_radius_px: float = 2.0  # structures narrower than this disc read as granules
    granule_threshold: float = 0.25  # granule contrast, optical density above its surround
    granule_border_px: int = 2  # rim of the cell outline left out of the cytoplasm
    granule_nucleus_margin_px: int = 3  # margin around the nucleus left out
    lobe_neck_ratio: float = 0.3  # lobes: basins joined by a neck < this x their half-width
    max_cells_measured: int = 400  # real crops quantified (random subset of the split)
    # study.html, the interactive page next to report.html (vae/analysis/study_page.py)
    page_max_cells: int = 1500  # cells in its scatter (random subset; ~4 kB of PNG each)
    page_nearest: int = 6  # real crops shown for each path position
