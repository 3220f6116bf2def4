"""How often ``stage=embed`` leaves a study's own unseen crops unclassified, and what
that buys: the test-split crops of a finished study (never trained on) embedded as new
image-only cells, their transferred label scored against the crop's label over all
cells, over the cells called (``vae_call`` != unclassified) and over the unclassified.

Usage::

    python scripts/embed_calls_check.py outputs/real_e2e [--variant V] [--out calls.json]

Prints a table and writes JSON (``--out``; default ``<study>/embed_calls_check.json``).
The atypical threshold is read from the study's own held-out rows, test rows included,
so the atypical share here is near ``1 - embed.atypical_quantile`` by construction; the
low-confidence share and the accuracies are the measurements.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np

from vae.api import UNCLASSIFIED, Study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", help="outputs/<experiment> of a finished train run")
    ap.add_argument("--variant", default="")
    ap.add_argument("--paired", default=None, help="its paired.h5ad (default: <study>/pair)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    st = Study.load(a.study, variant=a.variant)
    paired = Path(a.paired or Path(a.study) / "pair" / "paired.h5ad")
    p = ad.read_h5ad(paired)
    ref = st.reference.obs
    test = (ref["split"].astype(str) == "test").to_numpy() & ref["has_image"].to_numpy(bool)
    q = p[ref.loc[test, "row"].astype(str).to_numpy()].copy()
    q.obs["has_expression"] = False  # a new crop: its image only
    o = st.embed(q, "test crops").obs
    lab = q.obs.loc[o.index, "label"].astype(str)
    known = lab.isin(sorted(set(o["vae_label"]))).to_numpy()
    called = (o["vae_call"] != UNCLASSIFIED).to_numpy()
    right = (o["vae_label"].astype(str) == lab).to_numpy()

    def acc(m: np.ndarray) -> float | None:
        return round(float(right[m].mean()), 3) if m.any() else None

    res = {
        "study": str(a.study),
        "test_crops": int(o.shape[0]),
        "atypical": int(o["vae_atypical"].sum()),
        "low_confidence": int((o["vae_label_confidence"] < st.min_confidence).sum()),
        "unclassified": int((~called).sum()),
        "labelled": int(known.sum()),
        "labelled_unclassified": int((known & ~called).sum()),
        "accuracy_all": acc(known),
        "accuracy_called": acc(known & called),
        "accuracy_unclassified": acc(known & ~called),
        "thresholds": st.atypical_thresholds(),
    }
    for k, v in res.items():
        print(f"{k:24s} {v}")
    out = Path(a.out) if a.out else Path(a.study) / "embed_calls_check.json"
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
