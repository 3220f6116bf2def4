"""Labelled crops of the user's own microscope, for :class:`vae.api.Study` (the public class).

A study's label transfer reads a query cell against the study's own labelled cells. On
a microscope the study never saw those calls were near chance for every class but the
commonest (``scripts/unseen_source_check.py``; docs/vae.md, "A microscope the study
never saw"), while a few labelled crops *of that microscope* told its cells apart well:
the image code keeps the cell's morphology where the colours moved. So a user who sorts
some crops of the new microscope into one sub-folder per class
(:meth:`StudyLabelledMixin.fit_labelled_crops`) gets the image-only cells called from
those crops (a logistic regression on the image code,
:func:`vae.analysis.metrics.code_classifier`), and their atypical threshold set from
those crops' own scores, not from the study's held-out cells (which flagged 81 % of one
unseen microscope's cells atypical). Cells with a profile keep the study's reference.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vae.inputs.schema import ANOMALY_COLUMNS
from vae.study_common import StudyError, log

# below this many labelled crops in a class the calls were poor when measured (5 per
# class: right 0.52-0.65 of the time; 20 per class: 0.65-0.79; docs/embed.md): said so
FEW_LABELLED = 20


@dataclass
class LabelledCrops:
    """What :meth:`StudyLabelledMixin.fit_labelled_crops` fitted.

    Attributes
    ----------
    source : where the crops came from (a folder, or ``"AnnData"``)
    counts : class -> labelled crops used: the study's classes in its label order, then
        the classes it does not have (:attr:`new_classes`), sorted
    classifier : the fitted :func:`vae.analysis.metrics.code_classifier` (image codes)
    scores : (n,) ``anomaly_score`` of the labelled crops (the atypical threshold of
        image-only query cells is their :attr:`vae.api.Study.atypical_quantile`)
    cv_accuracy, cv_balanced_accuracy : stratified cross-validated accuracy of the
        classifier on the labelled crops (:func:`vae.analysis.metrics.code_classifier_cv`;
        NaN: a class with one crop)
    cv_confusion : true class -> {called class: crops} of those out-of-fold calls
        (empty where there are none)
    study_accuracy, study_balanced_accuracy : how the study's own labelled cells call the
        same crops (:meth:`vae.api.Study.transfer_labels` on their image codes): what the
        labelled crops are measured against (NaN: the study has no labelled crop)
    rejects : the folder's unreadable or uncut images (``input``, ``item``, ``reason``)
    path_check : path class -> ``{"crops", "median", "knot", "nearest"}``: where the
        labelled crops of each class of the study's maturation path lie on it (median
        position), against that class's own place (``knot``); ``nearest``: the path
        class whose place the median is nearest (another class: the positions of this
        microscope's cells are not to be read)
    new_classes : the classes none of the study's names (a maturation stage of the user's,
        e.g. ``Myelocyte``): called and counted like the study's, with no position on its
        maturation path
    """

    source: str
    counts: dict[str, int]
    classifier: Any
    scores: np.ndarray
    cv_accuracy: float
    cv_balanced_accuracy: float
    cv_confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    study_accuracy: float = float("nan")
    study_balanced_accuracy: float = float("nan")
    rejects: list[dict] = field(default_factory=list)
    new_classes: list[str] = field(default_factory=list)
    path_check: dict[str, dict] = field(default_factory=dict)

    def predict(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label (n,) str, confidence (n,) the classifier's probability of it) of image
        codes ``z`` (n, n_shared + n_private)."""
        if len(z) == 0:
            return np.array([], dtype=str), np.array([], dtype=np.float64)
        proba = self.classifier.predict_proba(np.asarray(z, np.float64))
        return self.classifier.classes_[proba.argmax(1)].astype(str), proba.max(1)

    def threshold(self, q: float | None) -> float:
        """The ``q`` quantile of the labelled crops' ``anomaly_score`` (NaN: ``q`` None
        or no finite score)."""
        ok = np.isfinite(self.scores)
        if q is None or not ok.any():
            return float("nan")
        return float(np.quantile(self.scores[ok], float(q)))

    def as_dict(self) -> dict:
        """JSON-ready summary (``stage=embed``'s ``summary.json``)."""

        def num(v: float) -> float | None:
            return round(float(v), 4) if np.isfinite(v) else None

        return {
            "source": self.source,
            "crops": int(sum(self.counts.values())),
            "by_class": dict(self.counts),
            "cv_accuracy": num(self.cv_accuracy),
            "cv_balanced_accuracy": num(self.cv_balanced_accuracy),
            "cv_confusion": self.cv_confusion,
            "study_reference_accuracy": num(self.study_accuracy),
            "study_reference_balanced_accuracy": num(self.study_balanced_accuracy),
            "new_classes": list(self.new_classes),
            "path_check": self.path_check,
            "rejects": len(self.rejects),
        }


def _accuracies(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of calls ``pred`` against labels ``y``."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    with warnings.catch_warnings():  # a call of a class y lacks: counted as wrong
        warnings.simplefilter("ignore", UserWarning)
        return float(accuracy_score(y, pred)), float(balanced_accuracy_score(y, pred))


def _cross_validated(z: np.ndarray, y: np.ndarray) -> tuple[float, float, dict]:
    """(accuracy, balanced accuracy, confusion {true: {called: n}}) of the out-of-fold
    calls of :func:`vae.analysis.metrics.code_classifier_cv` (NaN, NaN, {}: none)."""
    from vae.analysis.metrics import code_classifier_cv

    pred = code_classifier_cv(z, y)
    if pred is None:
        return float("nan"), float("nan"), {}
    confusion: dict[str, dict[str, int]] = {}
    for t, p in zip(y, pred):
        confusion.setdefault(str(t), {}).setdefault(str(p), 0)
        confusion[str(t)][str(p)] += 1
    return (*_accuracies(y, pred), confusion)


def _most_confused(confusion: dict, counts: dict) -> str:
    """``"; most confused: A called B (n of m)"`` for the largest off-diagonal share of
    ``confusion``, "" where every out-of-fold call was right (or there were none)."""
    worst = max(
        (
            (n / counts[t], t, p, n)
            for t, row in confusion.items()
            for p, n in row.items()
            if p != t
        ),
        default=None,
    )
    if worst is None:
        return ""
    _, t, p, n = worst
    return f"; most confused: {t} called {p} ({n} of {counts[t]})"


def _class_key(name: str) -> str:
    """A class name as matched: case, surrounding blanks and a plural ``s`` ignored
    (``Neutrophil/`` names the study's ``Neutrophils``)."""
    key = str(name).strip().casefold()
    return key[:-1] if len(key) > 3 and key.endswith("s") else key


class StudyLabelledMixin:
    """The user's labelled crops of :class:`vae.api.Study`.

    Relies on these of :class:`vae.api.Study`: ``labels``, ``config``, ``n_shared``, ``meta``,
    ``read``, ``prepare``, ``encode``, ``anomaly_scores``, ``atypical_off`` and
    ``_labelled`` (None until :meth:`fit_labelled_crops`).
    """

    @property
    def labelled_crops(self) -> LabelledCrops | None:
        """The fitted labelled crops (:meth:`fit_labelled_crops`), or None: the study's
        own reference labels every cell. Set to None to go back to that."""
        return self._labelled

    @labelled_crops.setter
    def labelled_crops(self, value: LabelledCrops | None) -> None:
        if value is not None and not isinstance(value, LabelledCrops):
            raise StudyError(
                "labelled_crops: set it with fit_labelled_crops(folder), or to None "
                f"(got {type(value).__name__})"
            )
        self._labelled = value

    def _class_names(self) -> dict[str, str]:
        """:func:`_class_key` -> the study's label, for its labels and the crop classes
        its ``pair.label_map`` maps to them (``neutrophil`` -> ``Neutrophils``)."""
        names = {_class_key(c): c for c in self.labels}
        label_map = (self.config.get("pair") or {}).get("label_map") or {}
        for k, v in label_map.items():
            if str(v) in self.labels:
                names.setdefault(_class_key(str(k)), str(v))
        return names

    def _labelled_names(self, given: np.ndarray, source: str) -> tuple[dict[str, str], list[str]]:
        """(:func:`_class_key` -> class, the classes none of the study's names) for the
        class names ``given``: a study class by its name or ``pair.label_map``; any other
        name is a new class, spelt as first given, said in the log (with the study class
        it looks like, where one does: a misspelt sub-folder)."""
        import difflib

        names = self._class_names()
        new_classes: list[str] = []
        for g in dict.fromkeys(given):
            key = _class_key(g)
            if key not in names:
                names[key] = g
                new_classes.append(g)
        if new_classes:
            log.info(
                "%s: class(es) %s are not the study's (%s): called and counted as given, "
                "with no position on the study's maturation path",
                source,
                ", ".join(new_classes),
                ", ".join(self.labels),
            )
        study_keys = {_class_key(c): c for c in self.labels}
        for c in new_classes:
            like = difflib.get_close_matches(_class_key(c), list(study_keys), n=1, cutoff=0.8)
            if like:
                log.warning(
                    "%s: the new class %r looks like the study's %r: if it is that class, "
                    "name its sub-folder so",
                    source,
                    c,
                    study_keys[like[0]],
                )
        return names, sorted(new_classes)

    def fit_labelled_crops(
        self, data, label_key: str = "sample", crop_masks: str | None = "auto", **read_kwargs
    ) -> LabelledCrops:
        """Call image-only cells from labelled crops of their own microscope.

        Parameters
        ----------
        data : str, Path or AnnData
            A folder with one sub-folder of crops per class, read as a query crop
            folder is (:meth:`read`, ``kind="crops"``), or an AnnData with crops whose
            ``obs[label_key]`` names each crop's class. A name of one of the study's
            classes (:attr:`labels`, or a crop class its ``pair.label_map`` maps to
            one; case and a plural ``s`` ignored: ``Neutrophil/`` is the real chain's
            ``Neutrophils``) is that class; any other name is a class of its own
            (:attr:`LabelledCrops.new_classes`, e.g. maturation stages the study has no
            crop of: ``Myelocyte/``, ``Band/``; stage names count in ``samples.csv``'s
            immature-granulocyte fraction and left-shift index).
        label_key : str, default ``"sample"``
            The obs column of the class (a folder's sub-folder names are in ``sample``).
        crop_masks, read_kwargs : how a folder's crops are cut (:meth:`read`).

        Returns
        -------
        LabelledCrops
            Also kept as :attr:`labelled_crops`: from now on :meth:`embed` calls each
            image-only cell (``vae_modality == "image"``) with a logistic regression
            fitted on these crops' image codes (``vae_label_confidence``: its
            probability), and flags it atypical above the
            :attr:`atypical_quantile` of these crops' own ``anomaly_score``.

        Raises
        ------
        StudyError
            No readable crop, fewer than two classes, or images directly in the folder
            (no class).
        """
        import anndata as ad

        from vae.analysis.anomaly import modality_latent
        from vae.analysis.metrics import code_classifier

        if isinstance(data, (str, Path)):
            folder = Path(data)
            if not folder.is_dir():
                raise StudyError(
                    f"{folder}: no such folder (labelled crops: one sub-folder of crops per class)"
                )
            adata = self.read(folder, "crops", crop_masks=crop_masks, **read_kwargs)
            source = str(folder)
            direct = (
                adata.obs[label_key].astype(str) == folder.name if label_key in adata.obs else None
            )
            if direct is not None and direct.any():
                raise StudyError(
                    f"{folder}: {int(direct.sum())} image(s) directly in the folder have no "
                    "class: put each class's crops in a sub-folder named after it (the "
                    f"study's classes: {', '.join(self.labels)})"
                )
        elif isinstance(data, ad.AnnData):
            adata, source = data, "AnnData"
        else:
            raise TypeError(
                "fit_labelled_crops takes a folder (one sub-folder per class) or an AnnData "
                f"with crops (got {type(data).__name__})"
            )
        rejects = list(adata.uns.get("rejects", []))
        if label_key not in adata.obs:
            raise StudyError(f"{source}: obs[{label_key!r}] (each crop's class) is missing")
        given = adata.obs[label_key].astype(str).str.strip().to_numpy()
        names, new_classes = self._labelled_names(given, source)
        if adata.n_obs == 0:
            if not rejects:  # nothing found to read (an empty folder, a dangling link)
                raise StudyError(f"{source}: no image file in the folder or its sub-folders")
            shown = "; ".join(f"{r.get('item')}: {r.get('reason')}" for r in rejects[:3])
            raise StudyError(f"{source}: no readable crop ({len(rejects)} skipped: {shown})")
        q = adata.copy()
        q.obs = pd.DataFrame(index=q.obs_names)  # the crops only: no profile, no user column
        prepared, _ = self.prepare(q, source)
        has = prepared.has_image.numpy()
        if not has.all():  # a crop the model cannot read (prepare says why)
            log.warning(
                "%s: %d of %d crops unusable, left out", source, int((~has).sum()), len(has)
            )
        lat = self.encode(prepared)
        # the image code Study.embed reads an image-only cell by: shared + image-private dims
        z = np.asarray(
            modality_latent(lat.image, self.n_shared, int(self.meta["n_private"]), "image"),
            np.float64,
        )
        scores = self.anomaly_scores(prepared, lat)[ANOMALY_COLUMNS["combined"]].to_numpy(
            np.float64
        )
        y = np.array([names[_class_key(g)] for g in given])
        keep = has & np.isfinite(z).all(1)
        z, y, scores = z[keep], y[keep], scores[keep]
        classes, counts = np.unique(y, return_counts=True)
        if classes.size < 2:
            raise StudyError(
                f"{source}: labelled crops of {classes.size} class(es) "
                f"({', '.join(classes)}); at least two are needed to tell cells apart"
            )
        by_class = dict(zip(classes.tolist(), counts.tolist()))
        few = {c: n for c, n in by_class.items() if n < FEW_LABELLED}
        if few:
            log.warning(
                "%s: few labelled crops in %s: below %d per class the calls were poor when "
                "measured (docs/embed.md, 'Labelled crops of your own microscope')",
                source,
                ", ".join(f"{c} ({n})" for c, n in few.items()),
                FEW_LABELLED,
            )
        acc, bal, confusion = _cross_validated(z, y)
        own, own_bal = self._study_calls_of(z, y)
        path_check = self._path_check(lat.joint[keep], y, source)
        self._labelled = LabelledCrops(
            source=source,
            counts={c: by_class[c] for c in [*self.labels, *new_classes] if c in by_class},
            classifier=code_classifier(z, y),
            scores=scores,
            cv_accuracy=acc,
            cv_balanced_accuracy=bal,
            cv_confusion=confusion,
            study_accuracy=own,
            study_balanced_accuracy=own_bal,
            rejects=rejects,
            new_classes=[c for c in new_classes if c in by_class],
            path_check=path_check,
        )
        log.info(
            "%s: %d labelled crops (%s); cross-validated accuracy %.2f (balanced %.2f)%s; "
            "the study's own labelled cells call them %.2f (balanced %.2f): image-only "
            "cells are called from the labelled crops",
            source,
            int(counts.sum()),
            ", ".join(f"{c} {n}" for c, n in self._labelled.counts.items()),
            acc,
            bal,
            _most_confused(confusion, by_class),
            own,
            own_bal,
        )
        if own_bal >= bal:  # NaN on either side: nothing to say
            log.warning(
                "%s: the study's own labelled cells call these crops at least as well "
                "(accuracy %.2f, balanced %.2f) as the crops call each other when cross-"
                "validated (%.2f, balanced %.2f): this looks like a microscope the study "
                "has seen, whose cells its own labels call about as well, so the labelled "
                "crops add little; the calls follow them as asked (without them: "
                "embed.labelled_crops=null, Study.labelled_crops = None)",
                source,
                own,
                own_bal,
                acc,
                bal,
            )
        return self._labelled

    def _path_check(self, z_full: np.ndarray, y: np.ndarray, source: str) -> dict:
        """Where the labelled crops of each class of the study's maturation path lie on
        it (:attr:`LabelledCrops.path_check`; {} without a path), warned of where a
        class's median lies nearest another class's place: calls come from the crops,
        but a position is still the code's projection onto a path of other microscopes'
        cells (20 labelled segmentation_wbc neutrophils through a study that never saw
        that microscope: median 0.00, the GMP end; through one that did: 0.74)."""
        try:
            cents, path = self.maturation_path()
            pos = self.maturation_position(z_full, y)["position"].to_numpy()
        except StudyError:
            return {}
        names = list(cents.names)
        knots = np.asarray(path.knots_s, np.float64)
        out = {}
        for c in names:
            p = pos[(y == c) & np.isfinite(pos)]
            if p.size < 3:  # too few to say where a class lies
                continue
            med = float(np.median(p))
            k = names.index(c)
            near = names[int(np.abs(knots - med).argmin())]
            out[c] = {
                "crops": int(p.size),
                "median": round(med, 4),
                "knot": round(float(knots[k]), 4),
                "nearest": near,
            }
            if near != c:
                log.warning(
                    "%s: the labelled %s crops lie at a median position %.2f on the study's "
                    "maturation path, nearest %s (%.2f), not their own place (%.2f): the "
                    "calls follow the labelled crops, but this microscope's positions "
                    "(vae_maturation, vae_stage, samples.csv's histogram) are not to be read",
                    source,
                    c,
                    med,
                    near,
                    float(knots[names.index(near)]),
                    float(knots[k]),
                )
        return out

    def _study_calls_of(self, z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(accuracy, balanced accuracy) of the study's own kNN label transfer on image
        codes ``z`` (n, n_shared + n_private) of crops labelled ``y``; NaN, NaN where the
        study has no labelled crop to read them against."""
        try:
            pred = self.transfer_labels(z, modality="image")["label"].to_numpy(str)
        except StudyError:
            return float("nan"), float("nan")
        return _accuracies(y, pred)
