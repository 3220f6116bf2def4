"""Schema of ``data.segment_sources``: the real images ``stage=segment`` runs the detector on.

Kept out of :mod:`pipeline.config` (which holds every other group) only for
file length; ``pipeline.config.DataConfig`` uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

SEGMENT_SOURCE_KINDS = ("smears", "crop_folder")
LABEL_FORMATS = ("none", "bccd_kaggle")


@dataclass
class SegmentSourceConfig:
    """One folder of real images for ``stage=segment`` (see docs/segmentation_infer.md).

    ``kind=smears``: full-field smears; every kept WBC becomes a row (labelled from
    ``labels`` where it is unambiguous, else unlabelled). ``kind=crop_folder``: an
    ImageFolder of single-WBC crops (``path/<Class>/*.jpg``); the detection that
    covers the crop centre gives the cell mask, the folder name the label; a crop
    without one is listed in ``rejects.csv`` and left out.
    """

    name: str = MISSING  # short name: obs["source"], rejects.csv, summary.json
    kind: str = "smears"  # smears | crop_folder
    path: str = MISSING  # folder; relative -> paths.shared_data
    # network px per image px; scale_by_width (image width in px -> scale) wins when the
    # width is listed (TXL-PBC mixes four microscopes); null -> segmentation.input_scale
    scale: float | None = None
    scale_by_width: dict[str, float] = field(default_factory=dict)
    labels: str | None = None  # per-image class list (smears only); relative -> shared_data
    labels_format: str = "none"  # none | bccd_kaggle (",Image,Category" keyed by number)
    max_images: int | None = None  # first N images (crop_folder: per class); null = all
    # specimen of each cell (obs["specimen"]): "<specimen_group>:<first match of
    # specimen_pattern in the image's file name, else the file's stem>". stage=train
    # keeps a specimen's cells in one split (trainer.split_by), so two views of one
    # cell (BCCD smears and the bccd_cropped crops cut from them) never straddle it
    specimen_group: str | None = None  # null -> name
    specimen_pattern: str | None = None  # a Python regex, e.g. 'BloodImage_\d+'
