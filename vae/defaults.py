"""Defaults that ``stage=embed``'s config and the Python API (:class:`vae.api.Study`) share.

One owner each: ``pipeline/config_embed.py`` (``EmbedConfig``), ``Study.load`` and the
samples page read them from here. Torch-free, so the config imports them while
composing without loading the model code.
"""

from __future__ import annotations

# Study.embed refuses an expression input lacking more than this fraction of the model's
# genes (its max_missing_genes; embed.max_missing_genes)
MAX_MISSING_GENES = 0.5
# missing genes: imputed from each cell's observed genes (model) or the reference mean
IMPUTE = "model"
IMPUTE_ITERATIONS = 5  # encode -> decode passes of impute=model
# a cell's call is "unclassified" below this label confidence (share of its k neighbours
# that agree) ...
MIN_CONFIDENCE = 0.5
# ... or above this quantile of the study's own held-out cells' anomaly scores (None: off)
ATYPICAL_QUANTILE: float | None = 0.99
