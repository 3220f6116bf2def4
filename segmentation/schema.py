"""Keys and shared defaults of the segmentation artifacts; everything else imports them.

``cells.h5ad`` (stage=segment) and the simulator's COCO annotations carry the
ground-truth fields :data:`TRUTH_FIELDS` of each white cell; the pairing copies
them into ``paired.h5ad`` (:mod:`vae.inputs.schema`). The detection thresholds
are the defaults of every function that filters detections or binarises masks
(the config may override them).
"""

from __future__ import annotations

# ground truth of a simulated (or annotated) white cell, in annotation / obs columns
TRUTH_TEXT_FIELDS = ("kind", "lineage")
TRUTH_NUMERIC_FIELDS = ("t", "granule_density", "azurophilic_granules", "lobes", "diameter")
TRUTH_FIELDS = TRUTH_TEXT_FIELDS + TRUTH_NUMERIC_FIELDS
# cells.h5ad / paired.h5ad obs: the cell's equivalent diameter on the detector's working
# frame (source px x input_scale), measured from its mask; NaN where unknown
CELL_DIAMETER = "cell_diameter"
# cells.h5ad obs: the cell's edge-correction weight (segmentation.crops.edge_weights): how
# many cells like it one kept cell stands for once cells cut by the image edge are dropped;
# 1 where no edge filter ran (crop folders); capped at EDGE_WEIGHT_MAX
EDGE_WEIGHT = "edge_weight"
EDGE_WEIGHT_MAX = 10.0

SCORE_THRESHOLD = 0.5  # keep detections with score >= this
MASK_THRESHOLD = 0.5  # mask probability -> binary mask

# which detections a morphologist would accept as one whole cell (defaults of
# segmentation.crops.FilterSettings and of cfg.segmentation; measured on the simulator:
# docs/segmentation_infer.md, "Cut and touching cells")
BORDER_MARGIN = 2  # px: a mask this close to the image edge is cut by it
TOUCH_PX = 2  # px: a mask this close to another cell's mask touches it (cut by a neighbour)
MIN_SOLIDITY = 0.90  # area / convex-hull area; two cells kept as one have a waist
# area over the median of the image's cells; a doublet is ~2x one cell, but single
# early cells are ~2.5-3x lymphocytes (simulator medians: myeloblasts 6678 vs 2614 px
# before 2026-12-04; promyelocytes 6522 vs 2020 px since the promyelocyte is the
# largest), so a lower ratio would drop big early cells: this is a safety net,
# touching/solidity do the work
MAX_AREA_RATIO = 2.6
MIN_CELLS_AREA_RATIO = 3  # the area test needs at least this many cells in the image

# an image's estimated scale is held within this factor of the median estimate of the
# images of its microscope (segmentation.magnification.hold_to_pool; chosen a priori,
# checked on TXL-PBC train/4, BCCD test and val: docs/segmentation_infer.md)
SCALE_SPREAD = 1.25
# stage=segment's crop defaults, owned here so that the library (SegmentSettings, what
# vae.api.Study.read uses when given no settings) and the config (cfg.segmentation) cut
# the same cells: background peeled off each mask's edge, working px (docs/
# segmentation_infer.md, "Masks that end at the cell"), and the smallest mask kept, px of
# the source image
TRIM_RIM = 1.0
MIN_CELL_AREA = 200
# the quartiles of one microscope's per-image estimates lie 1.14-1.38x apart (TXL-PBC's four
# microscopes, BCCD test); its four mixed in one group: 1.77x. Above this ratio (and with
# at least 8 images measured) a group is reported as possibly mixing magnifications.
MIXED_QUARTILE_RATIO = 1.6
