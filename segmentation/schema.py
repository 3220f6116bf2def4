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
TRUTH_NUMERIC_FIELDS = ("t", "granule_density", "lobes", "diameter")
TRUTH_FIELDS = TRUTH_TEXT_FIELDS + TRUTH_NUMERIC_FIELDS

SCORE_THRESHOLD = 0.5  # keep detections with score >= this
MASK_THRESHOLD = 0.5  # mask probability -> binary mask
