"""What labelled crops of a new microscope buy ``stage=embed`` (``embed.labelled_crops``).

A user's route, end to end: the crops of a labelled source of the shared data are
sorted into folders as a user would (``WORK/labelled/<class>/`` with ``--shots`` crops
per class, the rest in ``WORK/query/``; links, nothing copied), the query folder is read
as ``embed.crops`` reads it (``Study.read``: cut by the study's detector where the study
was trained on masked crops) and embedded twice, once as the study labels it and once
with ``Study.fit_labelled_crops(WORK/labelled)``. Prints a table and writes JSON: label
accuracy and balanced accuracy against the source's own labels, the shares called and
atypical, the accuracy of the called cells, the fit's cross-validated accuracy.

Run it with a study that never saw the source (``scripts/unseen_source_check.py
hold-out``) to measure a new microscope::

    P=.venv/bin/python
    $P scripts/labelled_crops_check.py outputs/lso/train/no_segwbc --source segmentation_wbc \
        --work /tmp/lab_segwbc --shots 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # unseen_source_check

SEGWBC_CLASSES = {1: "neutrophil", 2: "lymphocyte", 3: "monocyte", 4: "eosinophil", 5: "basophil"}


def labelled_images(shared: Path, source: str) -> list[tuple[Path, str]]:
    """(image file, class) of every labelled crop of ``source`` in the shared data."""
    if source == "bccd_cropped":
        root = shared / "cells" / "bccd_cropped"
        return [
            (p, d.name.lower())
            for d in sorted(root.iterdir())
            if d.is_dir()
            for p in sorted(d.iterdir())
            if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        ]
    if source == "segmentation_wbc":
        root = shared / "cells" / "segmentation_wbc"
        out = []
        for ds in ("dataset1", "dataset2"):
            tab = pd.read_csv(root / f"{ds}_labels.csv")
            for i, c in zip(tab.iloc[:, 0], tab.iloc[:, 1]):
                out.append((root / ds / f"{int(i):03d}.bmp", SEGWBC_CLASSES[int(c)]))
        return out
    raise SystemExit(f"--source {source}: valid: bccd_cropped, segmentation_wbc")


def sort_folders(items: list[tuple[Path, str]], work: Path, shots: int, seed: int) -> pd.Series:
    """Link ``shots`` crops per class into ``work/labelled/<class>/`` and the others into
    ``work/query/<parent folder>/``; returns the query cells' classes by the cell id
    ``Study.read`` gives them (``<parent folder>/<file>``)."""
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work}: not empty")
    rng = np.random.default_rng(seed)
    classes = np.array([c for _, c in items])
    chosen = np.zeros(len(items), bool)
    for c in np.unique(classes):
        rows = np.flatnonzero(classes == c)
        chosen[rng.choice(rows, min(shots, rows.size), replace=False)] = True
    truth = {}
    for (path, c), lab in zip(items, chosen):
        if lab:
            dest = work / "labelled" / c / f"{path.parent.name}_{path.name}"
        else:
            dest = work / "query" / path.parent.name / path.name
            truth[f"{path.parent.name}/{path.name}"] = c
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path.resolve(), dest)
    return pd.Series(truth)


def calls(study, query, truth: pd.Series) -> dict:
    """``study.embed(query)``'s calls against ``truth`` (crop classes):
    :func:`unseen_source_check.call_scores` and the cells embedded."""
    from unseen_source_check import call_scores

    from vae.study_labelled import _class_key

    names = study._class_names()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = study.embed(query.copy(), warn_seen=False, warn_atypical=False)
    y = truth.reindex(r.obs_names).map(lambda c: names[_class_key(c)]).to_numpy(str)
    return {"cells": int(len(y)), **call_scores(r, y)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("study", type=Path, help="finished study (train run or experiment folder)")
    ap.add_argument("--source", required=True, help="bccd_cropped | segmentation_wbc")
    ap.add_argument("--work", type=Path, required=True, help="empty folder for the sorted links")
    ap.add_argument("--shots", type=int, default=20, help="labelled crops per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON (default: WORK/labelled_crops.json)"
    )
    args = ap.parse_args()
    from vae.api import Study

    truth = sort_folders(
        labelled_images(args.shared, args.source), args.work, args.shots, args.seed
    )
    study = Study.load(args.study)
    query = study.read(args.work / "query", "crops")
    res = {"study": str(args.study), "source": args.source, "shots": args.shots, "seed": args.seed}
    res["study_reference"] = calls(study, query, truth)
    fitted = study.fit_labelled_crops(args.work / "labelled")
    res["labelled_crops"] = {**calls(study, query, truth), "fit": fitted.as_dict()}
    print(
        f"{args.study} on {args.source}: {len(truth)} query crops, {args.shots} labelled per "
        f"class (seed {args.seed}); {len(truth) - res['study_reference']['cells']} not cut"
    )
    print("| calls from | accuracy | balanced | called | accuracy of the called | atypical |")
    print("|---|---|---|---|---|---|")
    for key, name in (
        ("study_reference", "the study's labelled cells"),
        ("labelled_crops", "the labelled crops"),
    ):
        r = res[key]
        print(
            f"| {name} | {r['accuracy']:.3f} | {r['balanced']:.3f} | {r['called']:.3f} "
            f"| {r['called_accuracy']:.3f} | {r['atypical']:.3f} |"
        )
    fit = fitted.as_dict()
    print(f"fit: {fit['by_class']}, cross-validated accuracy {fit['cv_accuracy']}")
    print(f"path_check: {fit['path_check']}")
    out = args.out or args.work / "labelled_crops.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
