"""Schema of ``cfg.embed``: apply a finished study to new data (``stage=embed``, docs/embed.md)."""

from __future__ import annotations

from dataclasses import dataclass

from vae import defaults


@dataclass
class EmbedConfig:
    """New inputs and how they are read against the study. Any subset of the four inputs."""

    # the finished study: outputs/<experiment> of its train (and segment_train) run;
    # null -> this experiment (or paths.inputs.model / paths.inputs.latent)
    study: str | None = None
    smears: str | None = None  # folder of smear images (sub-folders = samples), run through segment
    crops: str | None = None  # folder of single-cell crops (sub-folders = samples)
    # crops and smears: how each cell is cut for the model. auto = as the study's training
    # crops were (vae.api.Study.training_crops: whole for a study trained on unmasked
    # squares, pair.crop_sources of kind image_folder; else detector); detector = the
    # study's detector cuts each cell out with its mask (a crop folder: the crop's centre
    # cell, as stage=segment masks one; none found -> rejects.csv); whole = unmasked: a
    # crop image whole, a smear's cell as its square box. A cut unlike the study's
    # training crops is warned of (most cells then come out atypical)
    crop_masks: str = "auto"
    h5ad: str | None = None  # cells.h5ad of stage=segment, paired.h5ad, or any AnnData with crops
    expression: str | None = None  # expression file (h5ad, 10x, CSV/TSV): genes matched by name
    sample_key: str = "sample"  # obs column of h5ad/expression inputs naming the sample
    samples_csv: str | None = None  # CSV: (cell_id | image) -> sample, for inputs without one
    # folder of this microscope's crops sorted by class (one sub-folder per class, named
    # after the study's classes): image-only cells are called from them (a logistic
    # regression on the image code) instead of from the study's own labelled cells, which
    # were right about half the time on a microscope the study never saw
    # (vae.api.Study.fit_labelled_crops; docs/embed.md, "Labelled crops of your own microscope")
    labelled_crops: str | None = None
    knn_k: int | None = None  # label-transfer neighbours; null -> the study's analysis.knn_k
    # refuse an expression input missing more than this fraction of the model's genes
    max_missing_genes: float = defaults.MAX_MISSING_GENES
    # missing genes: model = imputed from each cell's observed genes (iterated
    # encode -> decode, impute_iterations passes); mean = the reference mean
    impute: str = defaults.IMPUTE
    impute_iterations: int = defaults.IMPUTE_ITERATIONS
    # vae_call "unclassified" (counted in no call of samples.csv): a cell whose label
    # confidence (share of the k neighbours that agree) is below min_confidence, or whose
    # anomaly_score is above this quantile of the study's own held-out cells' (null: off)
    min_confidence: float = defaults.MIN_CONFIDENCE
    atypical_quantile: float | None = defaults.ATYPICAL_QUANTILE
    batch_size: int = 256  # encoding batch
    examples_per_call: int = 8  # example crops per transferred label in samples.html
    histogram_bins: int = 10  # maturation-position histogram per sample (samples.csv)
