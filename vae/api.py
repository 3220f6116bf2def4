"""Apply a finished study to new cells, in the style of scvi-tools.

A *study* is the run folder of ``stage=train`` (``model.pt`` and the reference
``latent.h5ad``), optionally with ``segment_train/model.pt`` for raw smears.
:class:`Study` puts new crops, smears and/or expression profiles into the
study's latent space and reads them against the reference: label transfer by
kNN, position along the maturation path, decoding. ``stage=embed``
(``pipeline/stages/embed.py``) is a thin wrapper around :meth:`Study.embed`.

Examples
--------
>>> from vae.api import Study
>>> study = Study.load("outputs/demo")                          # doctest: +SKIP
>>> z = study.get_latent("new_crops/", kind="crops")            # (n, n_shared)
>>> q = study.embed(study.read("new_cells.h5ad"))               # AnnData, all results
>>> q.obs[["vae_label", "vae_label_confidence", "vae_call", "vae_maturation", "vae_stage"]]
>>> calls = study.transfer_labels(q.obsm["X_vae_image"], modality="image")  # crops
>>> pos = study.maturation_position(q.obsm["X_vae_full"], q.obs["vae_call"])  # NaN / "" off the path
>>> dec = study.decode(q.obsm["X_vae_full"][:4])                # images, expression

How inputs are matched to the model (docs/embed.md):

* genes by name (exact, then case-insensitive); extra genes are ignored, order
  is irrelevant. A model gene the input lacks is *missing*, never a measured
  zero. With ``impute="model"`` (the default) it is imputed from the cell's own
  observed genes: start from the reference mean, then ``impute_iterations``
  times encode the cell (expression only) and replace the missing genes by the
  model's decoded prediction for that cell (for counts models an expected count:
  decoded proportion times the library the observed genes imply), so the
  missing genes end up consistent with what the cell shows.
  ``impute="mean"`` keeps the first step only: the reference's mean
  log-expression (decoded from the reference latent), and for counts models
  the reference proportion times the cell's library. :meth:`Study.embed` writes
  the imputed values to ``obsm["X_vae_imputed"]`` (columns:
  ``uns["imputed_genes"]``);
* raw counts are normalised like the training data (``log1p(normalize_total(
  counts, expression.target_sum))`` over all genes of the input); log-normalised
  values (an ``X`` beside ``layers["counts"]``, or non-integer ``X``) are used as given;
* crops of another size are resized like ``stage=pair`` then ``stage=train`` do.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segmentation.io import MANIFEST, blank_as_read
from vae.defaults import (
    ATYPICAL_QUANTILE,
    IMPUTE,
    IMPUTE_ITERATIONS,
    MAX_MISSING_GENES,
    MIN_CONFIDENCE,
)
from vae.inputs.schema import (
    ANOMALY_COLUMNS,
    HAS_EXPRESSION,
    HAS_IMAGE,
    known_labels,
)
from vae.scverse import latent_obsm

# the parts of Study (mixins) and the names they define, read from here as before
from vae.study_atypical import ATYPICAL_MOSTLY as ATYPICAL_MOSTLY
from vae.study_atypical import StudyAtypicalMixin
from vae.study_common import NO_PAIRED as NO_PAIRED
from vae.study_common import StudyError as StudyError
from vae.study_common import _file_stamp, _flag, log
from vae.study_labelled import LabelledCrops as LabelledCrops
from vae.study_labelled import StudyLabelledMixin
from vae.study_prepare import COUNT_CHECK_VALUES as COUNT_CHECK_VALUES
from vae.study_prepare import LOGNORM_MAX as LOGNORM_MAX
from vae.study_prepare import GeneReport as GeneReport
from vae.study_prepare import StudyPrepareMixin
from vae.study_prepare import _is_counts as _is_counts
from vae.study_read import CROP_MASKS as CROP_MASKS
from vae.study_read import WHOLE_CROPS_SHARE as WHOLE_CROPS_SHARE
from vae.study_read import StudyReadMixin
from vae.study_read import TrainingCrops as TrainingCrops
from vae.study_seen import StudySeenMixin

# label transfer: which reference cells and codes a query is read against
LABEL_MODALITIES = ("joint", "image", "expression")
IMPUTE_METHODS = ("model", "mean")  # missing genes: cell-wise model imputation | reference mean
# columns this module adds to obs (a user's column of the same name is refused)
OBS_COLUMNS = (
    "vae_modality",
    "vae_label",
    "vae_label_confidence",
    "vae_maturation",
    "vae_stage",
    *ANOMALY_COLUMNS.values(),
    "vae_atypical",
    "vae_call",
)
# Study.decode: codes drawn as they are, or each in the pose of the nearest training crop
POSES = ("as_given", "training")
UNCLASSIFIED = "unclassified"  # vae_call of a doubtful or atypical cell
# a study's paired data is read into memory (Study._read_paired: a latent.h5ad older than
# its anomaly columns is scored from it, training poses are encoded from it) up to this
# size; a larger one leaves atypical flagging off and decode(pose="training") refused
RESCORE_MAX_GIB = 8.0


def _number_in(v, lo: float = -np.inf, hi: float = np.inf) -> float | None:
    """``v`` as a finite float when it is a number in [lo, hi] (not a bool), else None."""
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and lo <= f <= hi else None


def _whole_number(v) -> bool:
    """A whole number (5, 5.0, "5"), not a bool."""
    f = _number_in(v)
    return f is not None and f.is_integer()


@dataclass(frozen=True)
class StudyFiles:
    """Where a finished study's files are (:func:`study_files`); nothing is checked to
    exist. ``root``: the experiment folder (``segment_train/``, ``traverse/``, ``pair/``
    beside ``train/``), None when only ``model``/``latent`` were given; ``train``: the
    train run's folder; ``variant``: the sweep run read ("" the main one)."""

    root: Path | None
    train: Path | None
    model: Path
    latent: Path
    variant: str = ""


def study_files(
    run_dir: str | Path | None = None,
    *,
    variant: str = "",
    model: str | Path | None = None,
    latent: str | Path | None = None,
) -> StudyFiles:
    """The files :meth:`Study.load` reads, from what it was given.

    ``run_dir`` may be the experiment folder, its ``train[/<variant>]`` folder or the
    ``model.pt`` itself; the one owner of this resolution (``stage=embed`` read-locks the
    same folders it names).

    Raises
    ------
    StudyError
        ``variant`` with a model file, or neither ``run_dir`` nor ``model`` + ``latent``.
    """
    # absolute: a relative "." or ".." has no name to recognise a train folder by
    root = Path(run_dir).expanduser().absolute() if run_dir is not None else None
    train = None
    given_file = root is not None and root.is_file()
    if given_file and root.suffix != ".pt" and not zipfile.is_zipfile(root):
        # an audit gave a .h5ad and was told "<its folder>/latent.h5ad: no such file"; a
        # checkpoint of another name (model.pth) is a torch zip archive and loads
        raise StudyError(
            f"Study.load({run_dir}): a file that is not a model (.pt); give the study folder "
            "(outputs/<experiment>), its train folder, or the train run's model.pt"
        )
    if given_file:  # the model file itself: its folder is the train folder
        if variant:
            raise StudyError(
                f"Study.load({run_dir}, variant={variant!r}): give the study folder with "
                "variant=, or the variant's model.pt alone"
            )
        model, root = model or root, root.parent
    if root is not None:
        train = root if (root / "model.pt").exists() or given_file else root / "train"
        if variant:
            train = train / variant
        if train == root:
            # given the train[/<variant>] folder: the study's detector and traverse
            # settings live beside train/, in the experiment folder
            if root.name == "train":
                root = root.parent
            elif root.parent.name == "train":
                root, variant = root.parent.parent, variant or root.name
    mp = Path(model).expanduser() if model else (train / "model.pt" if train else None)
    lp = Path(latent).expanduser() if latent else (train / "latent.h5ad" if train else None)
    if mp is None or lp is None:
        raise StudyError("Study.load: give run_dir, or both model= and latent=")
    return StudyFiles(root, train, mp, lp, variant)


def _source_candidates(src: Any, model_path: Path) -> list[Path]:
    """Where the paired.h5ad of checkpoint ``meta["source"]`` may be: an absolute path
    (checkpoints written before it was made relative) as it is; one relative to the
    experiment folder (``pair/paired.h5ad``) under the folder that holds the model's
    ``train[/<variant>]`` folder; and, relative, also as it is (checkpoints before
    2026-12-05 stored the path as given, relative to the working folder of the run,
    e.g. ``outputs/demo/pair/paired.h5ad``: review)."""
    if not src:
        return []
    p = Path(str(src))
    if p.is_absolute():
        return [p]
    out = []
    model_path = Path(model_path).absolute()
    for up in (model_path.parent, model_path.parent.parent):
        if up.name == "train":
            out.append(up.parent / p)
            break
    return [*out, p]


def _traverse_analysis(root: Path | None, variant: str, default: Any) -> Any:
    """The ``analysis`` settings :meth:`Study.load` reads the study with: those of the
    study's finished ``stage=traverse`` run, else ``default`` (the checkpoint's).

    The first ``manifest.json`` found, of ``<root>/traverse/<variant>`` then
    ``<root>/traverse`` (as :func:`pipeline.runner.resolve_input` looks for a stage's
    output), decides. One that cannot be read, is no record of a run, or whose
    ``status`` is not ``complete`` (``running``: being written now; ``failed``) is not
    used: a warning names it and ``default`` is returned (the traverse run is optional;
    its settings are not used unless it finished).
    """
    if root is None:
        return default
    tdirs = [root / "traverse" / variant, root / "traverse"] if variant else [root / "traverse"]
    for tdir in tdirs:
        man = tdir / MANIFEST
        try:
            if not man.is_file():
                continue
            rec = json.loads(man.read_text())
        except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
            log.warning(
                "%s: cannot be read (%s); the study's analysis settings are its "
                "checkpoint's, not this traverse run's",
                man,
                e,
            )
            return default
        if not isinstance(rec, dict):
            log.warning(
                "%s: holds %s, not a run's record; the study's analysis settings are its "
                "checkpoint's",
                man,
                type(rec).__name__,
            )
            return default
        if rec.get("status") != "complete":
            log.warning(
                "%s: the traverse run is not complete (status %r); the study's analysis "
                "settings are its checkpoint's, not this run's (%s)",
                man,
                rec.get("status"),
                "wait for it to finish"
                if rec.get("status") == "running"
                else "rerun stage=traverse",
            )
            return default
        config = rec.get("config")
        analysis = config.get("analysis") if isinstance(config, dict) else None
        if analysis is None:  # no settings recorded (config or analysis null or absent)
            return default
        if not isinstance(analysis, dict):
            log.warning(
                "%s: config.analysis is %s, not a mapping; the study's analysis settings "
                "are its checkpoint's",
                man,
                type(analysis).__name__,
            )
            return default
        return analysis
    return default


class Study(
    StudyReadMixin, StudyPrepareMixin, StudySeenMixin, StudyAtypicalMixin, StudyLabelledMixin
):
    """A trained study: model, reference latent and (optionally) the detector.

    Build it with :meth:`load`. Attributes: ``model`` (eval mode), ``meta``
    (checkpoint meta: ``gene_names``, ``crop_size`` ...), ``reference`` (the
    AnnData of ``latent.h5ad``), ``config`` (the resolved config the model was
    trained with), ``segmentation_model`` (path or None), ``device``.

    This class holds loading, the settings, encoding, label transfer, the maturation
    path, decoding and :meth:`embed`; the rest comes from mixins, one concern each:
    reading inputs (:class:`vae.study_read.StudyReadMixin`), preparing them for the
    model (:class:`vae.study_prepare.StudyPrepareMixin`), cells the study has seen
    (:class:`vae.study_seen.StudySeenMixin`), atypical cells
    (:class:`vae.study_atypical.StudyAtypicalMixin`) and the user's labelled crops of
    a new microscope (:class:`vae.study_labelled.StudyLabelledMixin`).
    """

    def __init__(
        self,
        model,
        meta: dict,
        reference,
        config: dict,
        *,
        model_path: Path,
        latent_path: Path,
        segmentation_model: Path | None = None,
        analysis: dict | None = None,
        device: str = "cpu",
        impute: str = IMPUTE,
        impute_iterations: int = IMPUTE_ITERATIONS,
        min_confidence: float = MIN_CONFIDENCE,
        atypical_quantile: float | None = ATYPICAL_QUANTILE,
    ):
        self.model, self.meta, self.config = model, meta, config
        self._labelled: LabelledCrops | None = None  # fit_labelled_crops: image-only calls
        self.reference = reference  # the property: sets the caches fitted on it (empty)
        self.model_path, self.latent_path = Path(model_path), Path(latent_path)
        self.segmentation_model = segmentation_model
        # the detector is loaded when images are first read: its file as it was now, so a
        # detector retrained meanwhile is not used silently beside this model (a notebook's
        # Study read 22 cells where it read 19, through the new detector; concurrency audit)
        self._detector_stamp = _file_stamp(segmentation_model)
        self.analysis = dict(analysis or config.get("analysis") or {})
        self.device = device
        # how missing genes are filled (module docstring); settable after load, checked
        self.impute, self.impute_iterations = impute, impute_iterations
        # which cells embed's vae_call leaves unclassified (settable after load, checked)
        self.min_confidence, self.atypical_quantile = min_confidence, atypical_quantile
        self._said: set = set()  # notes logged once per study (_note)
        self._training_crops: TrainingCrops | None = None  # training_crops(), read once
        self._crop_masks_said: set = set()  # (kind, crop_masks) told of (crop_masks_for)
        # why read_blocks read a file whole, by path (check_whole_read_fits words its
        # refusal by it)
        self._read_whole: dict = {}
        # where the paired.h5ad the study was trained on may be (load() adds the study's
        # own pair/paired.h5ad): a latent that predates the anomaly scores is scored from it
        self._paired_candidates: list[Path] = _source_candidates(
            meta.get("source"), self.model_path
        )
        if "X_vae" not in reference.obsm:
            raise StudyError(f"{latent_path}: obsm['X_vae'] is missing (not a latent.h5ad?)")
        ns = int(meta["n_shared"])
        if reference.obsm["X_vae"].shape[1] != ns:
            raise StudyError(
                f"{latent_path}: obsm['X_vae'] has {reference.obsm['X_vae'].shape[1]} dims but "
                f"{model_path} has n_shared={ns}: the latent comes from another study"
            )
        self._check_same_study()

    @property
    def reference(self):
        """The reference latent (AnnData of ``latent.h5ad``) query cells are labelled and
        scored against. Setting it drops everything fitted on the one before (label
        transfer kNN, atypical-score neighbours, Gaussians and thresholds, reference
        expression, maturation path). Those are kept while it stays the same object:
        after changing it in place, assign it again
        (``st.reference = st.reference.copy()``) to fit them anew. :attr:`labelled_crops`
        is kept: their atypical scores were read against the reference before, so fit
        them again (:meth:`fit_labelled_crops`) after setting a new one."""
        return self._reference

    @reference.setter
    def reference(self, value) -> None:
        self._reference = value
        # fitted once on the reference and read by every block of a large query
        # (stage=embed fitted them again per 8192-cell block); each built when first used
        self._path = None  # maturation_path: (centroids, path), and the settings' key
        self._path_key = None
        self._ref_expr = None  # reference_expression
        self._anomaly_ref = None  # _anomaly_reference: kNN index and class Gaussians
        self._scored_ref = None  # the reference with its anomaly columns (_scored_reference)
        self._atypical_why: str | None = None
        self._atypical_thr = None  # atypical_thresholds
        # the label transfer's reference side and fitted kNN (_label_reference,
        # transfer_labels), by label key, modality, code width and k
        self._label_ref: dict = {}
        self._label_knn: dict = {}
        self._pose_lenders = None  # training_poses: the training crops' two codes, once

    @property
    def impute(self) -> str:
        """How genes a query lacks are filled: ``model`` or ``mean`` (module docstring)."""
        return self._impute_method

    @impute.setter
    def impute(self, value: str) -> None:
        if value not in IMPUTE_METHODS:
            raise StudyError(f"impute={value!r}; valid: {', '.join(IMPUTE_METHODS)}")
        self._impute_method = value

    @property
    def impute_iterations(self) -> int:
        """Rounds of ``impute="model"`` (>= 1)."""
        return self._impute_rounds

    @impute_iterations.setter
    def impute_iterations(self, value: int) -> None:
        if not _whole_number(value) or int(float(value)) < 1:
            raise StudyError(f"impute_iterations={value!r}: must be an integer >= 1")
        self._impute_rounds = int(float(value))

    @property
    def min_confidence(self) -> float:
        """Label confidence (share of the k neighbours that agree) below which
        :meth:`embed`'s ``vae_call`` is ``unclassified``; 0 keeps every call."""
        return self._min_confidence

    @min_confidence.setter
    def min_confidence(self, value: float) -> None:
        v = _number_in(value, 0.0, 1.0)
        if v is None:
            raise StudyError(f"min_confidence={value!r}: must be a number in [0, 1]")
        self._min_confidence = v

    @property
    def atypical_quantile(self) -> float | None:
        """Quantile of the study's own held-out cells' ``anomaly_score`` above which a
        query cell is atypical (``vae_atypical``, ``vae_call`` unclassified); None: no
        cell is (:func:`vae.analysis.anomaly.held_out_thresholds`)."""
        return self._atypical_q

    @atypical_quantile.setter
    def atypical_quantile(self, value: float | None) -> None:
        if value is not None:
            v = _number_in(value, 0.0, 1.0)
            if v is None or v == 0.0:
                raise StudyError(f"atypical_quantile={value!r}: must be in (0, 1] or None")
            value = v
        self._atypical_q = value
        self._atypical_thr = None

    def _read_paired(self):
        """Each candidate ``paired.h5ad`` the study was trained on (its own
        ``pair/paired.h5ad``, else the one its checkpoint names), read in turn: yields
        ``(path, data, "")`` for one that holds the reference's rows
        (:class:`vae.data.PairedTensors` at the model's crop size), ``(path, None, why
        not)`` for one that is gone, unreadable, larger than :data:`RESCORE_MAX_GIB` in
        memory or of other rows."""
        from vae.data import PairedDataError, load_paired
        from vae.scverse import ROW_KEY
        from vae.store import dense_bytes

        ref = self.reference
        rows = [str(s) for s in (ref.obs[ROW_KEY] if ROW_KEY in ref.obs else ref.obs_names)]
        for p in self._paired_candidates:
            if not p.is_file():
                yield p, None, f"its paired data {p} is gone"
                continue
            try:
                gib = dense_bytes(p, self.crop_size) / 2**30
                if gib > RESCORE_MAX_GIB:
                    yield (
                        p,
                        None,
                        f"its paired data {p} needs {gib:.1f} GiB in memory (more than "
                        f"{RESCORE_MAX_GIB:g} GiB) to be read here",
                    )
                    continue
                data = load_paired(p, image_size=self.crop_size)
            except (OSError, PairedDataError, KeyError, ValueError) as e:
                yield p, None, f"its paired data {p} is unreadable ({e})"
                continue
            if list(data.obs_names) != rows:
                yield p, None, f"{p} holds other rows than the latent ({data.n} vs {ref.n_obs})"
                continue
            yield p, data, ""

    def _check_same_study(self) -> None:
        """Refuse a reference latent written for another model.

        ``stage=train`` records the digest of its ``model.pt`` in ``latent.h5ad``
        (``uns["model_digest"]``); latents written before that are checked by their
        labels, which must all be classes the model was trained with.
        """
        from vae.checkpoint import CheckpointError, check_model_digest

        ref, mp, lp = self.reference, self.model_path, self.latent_path
        want = ref.uns.get("model_digest")
        if want is not None and mp.is_file():
            try:
                check_model_digest(want, mp, lp)
            except CheckpointError as e:
                raise StudyError(str(e)) from None
            return
        known = self.meta.get("label_names")
        key = self.label_key
        if not known or key not in ref.obs:
            return
        lab = ref.obs[key].astype(str).to_numpy()
        foreign = sorted({str(x) for x in lab[known_labels(lab)]} - {str(k) for k in known})
        if foreign:
            raise StudyError(
                f"{lp}: obs[{key!r}] holds labels {', '.join(map(repr, foreign[:5]))} that "
                f"{mp} was not trained with (its labels: {', '.join(map(str, known))}): the "
                f"latent comes from another study"
            )

    # ------------------------------------------------------------------ load
    @classmethod
    def load(
        cls,
        run_dir: str | Path | None = None,
        *,
        variant: str = "",
        model: str | Path | None = None,
        latent: str | Path | None = None,
        segmentation_model: str | Path | None = None,
        device: str = "cpu",
        impute: str = IMPUTE,
        impute_iterations: int = IMPUTE_ITERATIONS,
        min_confidence: float = MIN_CONFIDENCE,
        atypical_quantile: float | None = ATYPICAL_QUANTILE,
    ) -> Study:
        """Load a finished study.

        Parameters
        ----------
        run_dir : ``outputs/<experiment>`` (or its ``train[/<variant>]`` folder)
        variant : sweep sub-folder of ``train/``
        model, latent : explicit ``model.pt`` / ``latent.h5ad`` (override ``run_dir``)
        segmentation_model : detector for smear folders; default
            ``<run_dir>/segment_train/model.pt`` when it exists, else the detector
            shipped with the package (:mod:`segmentation.shipped`)
        device : torch device for the model
        impute, impute_iterations : how genes a query lacks are filled (module
            docstring): ``model`` (each cell's own reconstruction, iterated) or ``mean``
        min_confidence, atypical_quantile : which cells :meth:`embed` leaves
            ``unclassified`` in ``vae_call`` (the properties of the same names)

        The ``analysis`` settings (label key, maturation path, kNN) are those of the
        study's ``stage=traverse`` run where it completed, else the checkpoint's; a
        traverse record that cannot be read or did not complete is warned of and not
        used.

        Raises
        ------
        StudyError
            A missing or unreadable file (named), or a latent of another study.
        """
        import anndata as ad

        from vae.checkpoint import CheckpointError, load_checkpoint
        from vae.model import TwoBranchVAE, VAEArgs

        # a study that is not this user's may be unreadable to them: say which path, not
        # a PermissionError traceback from deep in the search for its files
        try:
            if run_dir is not None and not model and not Path(run_dir).expanduser().exists():
                # the path given, not the train/model.pt it would hold (an audit:
                # "/x/nowhere/model.pt/train/model.pt: no such file")
                raise StudyError(
                    f"{Path(run_dir).expanduser()}: no such file or folder (Study.load: the "
                    "study's folder, outputs/<experiment>, or its train/model.pt)"
                )
            files = study_files(run_dir, variant=variant, model=model, latent=latent)
            root, train, variant = files.root, files.train, files.variant
            mp, lp = files.model, files.latent
            if not model and not mp.exists() and train is not None and train.is_dir():
                runs = sorted(str(m.parent.relative_to(train)) for m in train.glob("*/model.pt"))
                if runs:  # a sweep: the runs are train/<variant>/
                    shown = ", ".join(runs[:12]) + (
                        f" and {len(runs) - 12} more" if len(runs) > 12 else ""
                    )
                    raise StudyError(
                        f"{mp}: no such file; {train} holds the runs of variants {shown}: choose "
                        f"one (Study.load(..., variant=NAME); on the command line variant=NAME)"
                    )
            for what, p in (("model", mp), ("latent", lp)):
                if not p.exists():
                    raise StudyError(
                        f"{p}: no such file (the study's {what}; run stage=train first)"
                    )
        except PermissionError as e:
            raise StudyError(
                f"{e.filename or run_dir}: permission denied (reading the study "
                f"{run_dir if run_dir is not None else model}); ask its owner for read access"
            ) from None
        try:
            ck = load_checkpoint(mp)
            net = TwoBranchVAE(VAEArgs(**ck["model_args"]))
            net.load_state_dict(ck["model"])
        except (CheckpointError, TypeError, RuntimeError) as e:
            why = str(e).removeprefix(f"{mp}: ")  # the file named once
            if why.startswith("not a usable vae checkpoint"):  # said once (a detector's)
                raise StudyError(f"{mp}: {why}") from e
            raise StudyError(f"{mp}: not a usable vae checkpoint ({why})") from e
        net.to(device).eval()
        meta = dict(ck.get("meta", {}))
        for k in ("n_latent", "n_shared", "n_private", "crop_size", "n_genes"):
            meta.setdefault(k, getattr(net.args, k))
        meta.setdefault("gene_names", [f"gene{i}" for i in range(net.args.n_genes)])
        try:
            ref = blank_as_read(ad.read_h5ad(lp))
        except Exception as e:  # noqa: BLE001 - name the broken file
            raise StudyError(f"{lp}: cannot read latent ({e})") from e
        seg = Path(segmentation_model).expanduser() if segmentation_model else None
        if seg is None and root is not None and (root / "segment_train" / "model.pt").exists():
            seg = root / "segment_train" / "model.pt"
        if seg is None:
            from segmentation.shipped import SHIPPED_DETECTOR

            seg = SHIPPED_DETECTOR if SHIPPED_DETECTOR.is_file() else None
        config = dict(ck.get("config") or {})
        # the path of stage=traverse: its analysis settings when it ran (and finished)
        analysis = _traverse_analysis(root, variant, config.get("analysis"))
        study = cls(
            net,
            meta,
            ref,
            config,
            model_path=mp,
            latent_path=lp,
            segmentation_model=seg,
            analysis=analysis,
            device=device,
            impute=impute,
            impute_iterations=impute_iterations,
            min_confidence=min_confidence,
            atypical_quantile=atypical_quantile,
        )
        if root is not None:  # a copied or moved study: its own paired data first
            own = root / "pair" / "paired.h5ad"
            if own not in study._paired_candidates:
                study._paired_candidates.insert(0, own)
        return study

    # ------------------------------------------------------------ properties
    @property
    def gene_names(self) -> list[str]:
        return [str(g) for g in self.meta["gene_names"]]

    @property
    def crop_size(self) -> int:
        """Crop side the model reads, px."""
        return int(self.model.args.crop_size)

    @property
    def pair_crop_size(self) -> int:
        """Crop side of the training crops before ``vae.image_size`` resized them, px."""
        return int((self.config.get("pair") or {}).get("crop_size") or self.crop_size)

    @property
    def n_shared(self) -> int:
        return int(self.meta["n_shared"])

    def _setting(self, key: str):
        """``analysis[key]`` of the study, or where it holds none (a study saved before
        the setting existed, one built by hand) the default of
        :class:`vae.analysis.settings.AnalysisSettings`, the one owner of each default."""
        value = self.analysis.get(key)
        if value is None:
            from vae.analysis.settings import AnalysisSettings

            value = getattr(AnalysisSettings(), key)
        return value

    @property
    def label_key(self) -> str:
        return str(self._setting("label_key"))

    @property
    def labels(self) -> list[str]:
        """Every class the study can call: the reference's labels (``label_key``) other
        than missing / unknown ones, in the order of its categories (sorted where the
        column is not categorical). The categories of a query's ``vae_label`` and
        ``vae_call``, so a label has one colour in the study's plots and the query's."""
        if self.label_key not in self.reference.obs:
            return []
        col = self.reference.obs[self.label_key]
        names = col.cat.categories if hasattr(col, "cat") else sorted(set(col.astype(str)))
        names = np.asarray([str(c) for c in names], dtype=object)
        return [str(c) for c in names[known_labels(names)]]

    # ------------------------------------------------------------- encoding
    def encode(self, data, batch_size: int = 256):
        """:class:`vae.infer.Latents` of prepared tensors (see :meth:`prepare`).

        Parameters
        ----------
        data : vae.data.PairedTensors
            The model's input tensors, ``self.prepare(adata)[0]``.
        batch_size : int, default 256
            Rows per forward pass (memory, not results).

        Returns
        -------
        vae.infer.Latents
            float32 numpy arrays (computed on :attr:`device`), one row per row of
            ``data``: the posterior means ``joint``, ``image``, ``expression`` and the
            joint log-variance ``joint_logvar``, each (n, n_latent) with n_latent =
            n_shared + 2 * n_private (shared block first, then the image's and the
            expression's private blocks); ``image`` / ``expression`` NaN on rows
            without that modality. ``expression_from_image`` (n, G): log1p-normalised expression
            decoded from the image mean, NaN on rows without an image. The image mean
            is the average over ``model.args.encode_views`` symmetries of the crop.
        """
        from vae.infer import encode_dataset

        return encode_dataset(self.model, data, self.device, batch_size)

    def get_latent(self, data, kind: str = "auto", modality: str = "joint") -> np.ndarray:
        """(n, n_shared) latent means of the query's cells.

        Parameters
        ----------
        data : AnnData, ``.h5ad`` / expression file, or a folder (see :meth:`read`).
            A folder gives one row per cell found, in :meth:`read`'s order: for crops,
            the images where the detector found a centre cell (the others are
            ``uns["rejects"]`` of ``read``); to keep the names, ``read`` first and
            pass the AnnData
        kind : how to read a path (:meth:`read`)
        modality : ``joint`` (every modality a row has), ``image`` or
            ``expression`` (that modality only; NaN rows where it is absent),
            ``full`` (all d dims of the joint mean, private blocks included)

        Returns
        -------
        numpy.ndarray
            float32 posterior means, one row per cell (n): (n, n_shared) for ``joint``,
            ``image`` and ``expression`` (the shared block, the space of the
            reference's ``obsm["X_vae"]``); (n, n_latent) for ``full``, n_latent =
            n_shared + 2 * n_private (shared, image-private, expression-private; as
            ``obsm["X_vae_full"]``). ``image`` / ``expression``: rows NaN where the cell
            lacks that modality.

        Raises
        ------
        StudyError
            ``modality`` not one of the four, or an input that does not fit (named).
        """
        adata = self._as_adata(data, kind)
        prepared, _ = self.prepare(adata, str(data) if isinstance(data, str | Path) else "query")
        lat = self.encode(prepared)
        ns = self.n_shared
        table = {
            "joint": lat.joint[:, :ns],
            "image": lat.image[:, :ns],
            "expression": lat.expression[:, :ns],
            "full": lat.joint,
        }
        if modality not in table:
            raise StudyError(f"modality={modality!r}; valid: {', '.join(table)}")
        return table[modality]

    # ------------------------------------------------------- label transfer
    def transfer_labels(
        self, z: np.ndarray, k: int | None = None, modality: str = "joint"
    ) -> pd.DataFrame:
        """kNN label transfer from the reference latent.

        Parameters
        ----------
        z : query codes: (n, n_shared) fused means (``obsm["X_vae"]``) for
            ``modality="joint"``; for ``image`` / ``expression`` the codes of that
            expert, (n, n_shared + n_private) (:func:`vae.analysis.anomaly.latent_modalities`
            of the query) or its shared dims only, (n, n_shared)
            (``get_latent(..., modality=...)``, ``obsm["X_vae_image"]``), read
            against the same dims of the reference
        k : neighbours (default ``analysis.knn_k`` of the study, 15)
        modality : which reference cells and codes ``z`` is read against.
            ``joint``: ``X_vae`` of every labelled reference cell. ``image``: the
            image code (``X_vae_image`` + ``X_vae_private_image``) of the labelled
            reference cells that have a crop: a cell seen only as an image takes
            its label from cells whose image was seen, not from expression
            profiles that share its latent neighbourhood (in a study paired by
            label, e.g. the real chain, those carry classes no crop has, such as
            megakaryocytes). ``expression``: likewise with the expression code.

        Returns
        -------
        DataFrame with ``label`` (majority of the k nearest such reference cells,
        Euclidean) and ``confidence`` (fraction of those k that carry it, in [0, 1]);
        a row of ``z`` with a NaN (no such modality) gets ``""`` and NaN.
        """
        if modality not in LABEL_MODALITIES:
            raise StudyError(f"modality={modality!r}; valid: {', '.join(LABEL_MODALITIES)}")
        codes, lab, known = self._label_reference(modality)
        z = np.asarray(z, np.float64)
        widths = sorted({codes.shape[1], self.n_shared})
        if z.ndim != 2 or z.shape[1] not in widths:
            raise StudyError(
                f"transfer_labels: z must be (n, {' or '.join(map(str, widths))}) for "
                f"modality={modality!r}; got {z.shape}"
            )
        if k is not None and (not _whole_number(k) or int(float(k)) < 1):
            raise StudyError(f"transfer_labels: k={k!r}; must be an integer >= 1")
        k = int(float(k)) if k is not None else int(self._setting("knn_k"))
        # fitted once per study, modality, width and k: stage=embed labels a large file
        # a block of 8192 cells at a time, and each block fitted it on the same rows again
        key = (self.label_key, modality, z.shape[1], k)
        clf = self._label_knn.get(key)
        if clf is None:
            from sklearn.neighbors import KNeighborsClassifier

            if k > int(known.sum()):
                log.warning(
                    "transfer_labels: k=%d but the reference has %d labelled cells%s: k=%d",
                    k,
                    int(known.sum()),
                    "" if modality == "joint" else f" with a {modality} code",
                    int(known.sum()),
                )
            kk = min(k, int(known.sum()))
            # an expert's shared dims: the reference's too
            clf = KNeighborsClassifier(n_neighbors=kk).fit(codes[known, : z.shape[1]], lab[known])
            self._label_knn[key] = clf
        if len(z) == 0:
            return pd.DataFrame({"label": pd.Series([], dtype=str), "confidence": []})
        # a row without this modality (NaN code, e.g. X_vae_expression of an image-only
        # cell) gets no label: "" and confidence NaN
        ok = np.isfinite(z).all(1)
        label = np.full(len(z), "", dtype=object)
        conf = np.full(len(z), np.nan)
        if ok.any():
            proba = clf.predict_proba(z[ok])
            label[ok] = clf.classes_[proba.argmax(1)]
            conf[ok] = proba.max(1)
        return pd.DataFrame({"label": label.astype(str), "confidence": conf})

    @property
    def call_labels(self) -> list[str]:
        """Every class :meth:`embed` can call: :attr:`labels`, then the classes of
        :attr:`labelled_crops` the study does not have (``vae_label`` / ``vae_call``
        categories, ``samples.csv`` columns)."""
        new = self._labelled.new_classes if self._labelled is not None else []
        return [*self.labels, *new]

    def callable_labels(self, modality: str = "joint") -> list[str]:
        """The classes :meth:`transfer_labels` can give a cell read by ``modality``
        (``joint`` / ``image`` / ``expression``; ``both``, a ``vae_modality``, is read as
        ``joint``): the labels of the reference cells that vote for it, in the order of
        :attr:`labels`. In a study paired by label (the real chain) an image-only cell is
        never called a class no crop has (Erythrocyte, GMP, ...).

        Parameters
        ----------
        modality : str, default ``"joint"``
            ``"joint"``, ``"image"``, ``"expression"`` (:data:`LABEL_MODALITIES`) or
            ``"both"`` (read as ``"joint"``).

        Returns
        -------
        list of str
            The callable class names, a subset of :attr:`labels` in its order.

        Raises
        ------
        StudyError
            ``modality`` not one of those.
        """
        m = "joint" if modality == "both" else modality
        if m not in LABEL_MODALITIES:
            raise StudyError(f"modality={modality!r}; valid: {', '.join(LABEL_MODALITIES)}, both")
        if m == "image" and self._labelled is not None:  # fit_labelled_crops' classes
            return [c for c in self.call_labels if c in self._labelled.counts]
        _, lab, known = self._label_reference(m)
        have = set(lab[known].tolist())
        return [c for c in self.labels if c in have]

    def _label_reference(self, modality: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(codes, labels, known)`` of the reference for :meth:`transfer_labels`: (m, w)
        codes of ``modality``, (m,) labels and the (m,) bool rows that vote (a known
        label, a finite code, and for an expert that modality). Kept per label key and
        modality until :attr:`reference` is set again."""
        from vae.analysis.anomaly import latent_modalities

        key = (self.label_key, modality)
        if key in self._label_ref:
            return self._label_ref[key]
        ref = self.reference
        if self.label_key not in ref.obs:
            raise StudyError(
                f"{self.latent_path}: obs[{self.label_key!r}] is missing (analysis.label_key)"
            )
        lab = ref.obs[self.label_key].astype(str).to_numpy()
        known = known_labels(lab)
        if modality == "joint":
            codes = np.asarray(ref.obsm["X_vae"], np.float64)
        else:
            npv = int(self.meta["n_private"])
            codes = latent_modalities(ref, self.n_shared, npv)[modality]
            flag = HAS_IMAGE if modality == "image" else HAS_EXPRESSION
            if flag in ref.obs:
                known &= _flag(ref.obs, flag, str(self.latent_path))
        known &= np.isfinite(codes).all(1)
        if not known.any():
            raise StudyError(
                f"{self.latent_path}: no reference cell has a known label"
                + ("" if modality == "joint" else f" and a {modality} code")
            )
        self._label_ref[key] = (codes, lab, known)
        return self._label_ref[key]

    # ------------------------------------------------------ maturation path
    def maturation_path(self):
        """The study's GP maturation path, as ``stage=traverse`` builds it.

        Class centroids of the reference ``X_vae_full`` in ``analysis.path_classes``
        order (or by mean ``analysis.maturation_key``), a Gaussian-process
        path through them (:func:`vae.analysis.traverse.gp_path`, same length
        scale, noise, steps and seed). Returns ``(Centroids, LatentPath)``.
        """
        from vae.analysis import traverse as T

        a = self.analysis
        # the settings the path is built from: changing one (e.g. analysis["path_classes"]
        # after a first call) builds it again
        key = repr(
            [
                self.label_key,
                a.get("maturation_key"),
                a.get("path_classes"),
                a.get("path_steps"),
                a.get("gp_length_scale"),
                a.get("gp_noise"),
                self.config.get("seed"),
            ]
        )
        if self._path is None or self._path_key != key:
            ref = self.reference
            if self.label_key not in ref.obs:
                raise StudyError(f"{self.latent_path}: obs[{self.label_key!r}] is missing")
            z = np.asarray(ref.obsm.get("X_vae_full", ref.obsm["X_vae"]), np.float64)
            labels = ref.obs[self.label_key].astype(str).to_numpy()
            mkey = str(self._setting("maturation_key"))
            mat = ref.obs[mkey].to_numpy().astype(float) if mkey in ref.obs else None
            # the classes as stage=traverse takes them (vae.analysis.study.path_order):
            # the model's maturation axis at the default, another spelling of a stage
            # resolved to the data's label ("promyelocyte" -> "Promyelocytes"), so the
            # query's positions run along the path the study's report drew
            from vae.analysis.run import AnalysisError
            from vae.analysis.study import path_order

            try:
                order = path_order(
                    list(a.get("path_classes") or []), labels, ref.uns.get("maturation_axis")
                )
            except AnalysisError as e:
                raise StudyError(f"{self.latent_path}: {e}") from e
            if order is not None and sum(c in set(labels) for c in order) < 2:
                order = None
            try:
                cents = T.class_centroids(z, labels, mat, order)
            except ValueError as e:
                raise StudyError(f"{self.latent_path}: no maturation path: {e}") from e
            path = T.gp_path(
                cents.points,
                int(self._setting("path_steps")),
                float(self._setting("gp_length_scale")),
                float(self._setting("gp_noise")),
                int(self.config.get("seed", 0)),
            )
            self._path, self._path_key = (cents, path), key  # only a path that was built
        return self._path

    def maturation_position(self, z_full: np.ndarray, labels=None) -> pd.DataFrame:
        """Position of each code along the maturation path and the stage it falls in.

        Every code has a projection onto the path, a lymphocyte's too; it would read as
        a position and its nearest knot would name a false stage. Give the cells' calls
        (``labels``: ``obs["vae_call"]``) and a cell not on the path (not called one of
        its classes: a lymphocyte, an ``unclassified`` cell;
        :func:`vae.analysis.samples.on_maturation_path`, the rule of ``samples.csv``'s
        ``n_on_path``) gets no position (NaN) and no stage (``""``), as :meth:`embed`
        does.

        Parameters
        ----------
        z_full : (n, d) full latent means (``obsm["X_vae_full"]``)
        labels : (n,) the cells' calls, or None (every code placed and staged)

        Returns
        -------
        DataFrame with ``position`` in [0, 1] (nearest point of the GP path,
        :func:`vae.analysis.traverse.project_onto_path`; 0 = first path class; NaN
        for a cell not on the path) and ``stage``: the path class whose centroid
        position is nearest ("" for a cell not on the path).
        """
        from vae.analysis import traverse as T
        from vae.analysis.samples import on_maturation_path

        cents, path = self.maturation_path()
        z = np.asarray(z_full, np.float64)
        if z.ndim != 2 or z.shape[1] != path.points.shape[1]:
            raise StudyError(
                f"maturation_position: z_full must be (n, {path.points.shape[1]}); got {z.shape}"
            )
        if len(z) == 0:
            return pd.DataFrame({"position": [], "stage": pd.Series([], dtype=str)})
        ok = np.isfinite(z).all(1)  # a row without a code (NaN) gets no position, no stage
        pos = np.full(len(z), np.nan)
        stage = np.full(len(z), "", dtype=object)
        if ok.any():
            pos[ok] = T.project_onto_path(z[ok], path)
            knot = np.abs(pos[ok, None] - path.knots_s[None]).argmin(1)
            stage[ok] = np.asarray(cents.names, dtype=object)[knot]
        if labels is not None:
            labels = np.asarray(labels, dtype=object)
            if labels.shape != (len(z),):
                raise StudyError(
                    f"maturation_position: labels must be ({len(z)},); got {labels.shape}"
                )
            on = on_maturation_path(labels, cents.names)
            pos[~on] = np.nan
            stage = np.where(on, stage, "")
        return pd.DataFrame({"position": pos, "stage": stage.astype(str)})

    # ---------------------------------------------------------------- decode
    def decode(
        self,
        z: np.ndarray,
        batch_size: int = 256,
        render: bool = True,
        pose: str = "as_given",
        source: str | None = None,
    ):
        """Decode full latent codes (n, d): images, masks and log-expression.

        ``render`` (default True): a model with a granule, texture or nucleus layer draws
        the cells as every figure does (granules, grain, a sharp nucleus cut into its
        lobes; :meth:`vae.model.TwoBranchVAE.decode`); False: the decoder's mean image.

        ``pose``: ``"as_given"`` (default) decodes the codes as they are; ``"training"``
        first gives each code the pose of the study's training crop nearest it
        (:meth:`training_poses`): the reported codes (``X_vae_full``) and expression
        codes are pose-free and draw a nucleus averaged over orientations (a band or a
        segmented neutrophil as a ring), drawn so in a real cell's orientation, as
        ``stage=traverse`` draws its path steps.

        ``source``: a study trained with image sources (``vae.image_batch_key``) draws the
        cells as under this source's microscope (one of :attr:`image_sources`); None
        (default): in the average of the sources. A study without sources refuses a name.

        Returns :class:`vae.analysis.traverse.DecodedArrays` (``images``
        (n, S, S, 3) in [0, 1], ``masks``, ``expression`` (n, G) log1p-normalised
        in the order of :attr:`gene_names`; ``diameter`` (n,) px of the detector's
        working frame for a model trained with ``vae.size_weight``, else None);
        ``.cells()`` draws the decoded cells through their decoded masks, as every
        figure does.
        """
        from vae.analysis.traverse import decode, source_code

        z = np.asarray(z, np.float32)
        d = int(self.meta["n_latent"])
        if z.ndim != 2 or z.shape[1] != d:
            raise StudyError(f"decode: z must be (n, {d}) full codes; got {z.shape}")
        bad = np.flatnonzero(~np.isfinite(z).all(1))
        if bad.size:  # NaN in, NaN images out, which .cells() would draw black
            raise StudyError(
                f"decode: {bad.size} of {len(z)} codes hold NaN or inf (rows "
                f"{', '.join(map(str, bad[:5]))}{' ...' if bad.size > 5 else ''}): e.g. a "
                f"cell without that modality; select the rows with a code first"
            )
        if pose not in POSES:
            raise StudyError(f"decode: pose={pose!r}; valid: {', '.join(POSES)}")
        try:
            code = source_code(self.model, source, "source")
        except ValueError as e:
            raise StudyError(f"decode: {e}") from e
        if pose == "training":
            z = self.training_poses(z, batch_size).astype(np.float32)
        return decode(self.model, z, batch_size, self.device, render=render, image_batch=code)

    @property
    def image_sources(self) -> list[str]:
        """The image sources the study's decoder knows (``vae.image_batch_key``), in code
        order; [] for a study trained without them."""
        from vae.analysis.traverse import image_sources

        return image_sources(self.model)

    def training_poses(self, z: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Full codes, each given the pose of the study's training crop nearest it.

        A cell's *pose* is the part of its code from the crop as given that the reported
        code (the image expert over the crop's 8 symmetries, ``vae.encode_views``) leaves
        out: ``single_view - reported``. Each code gets the pose of the training crop whose
        reported code lies nearest it (Euclidean), so a pose-free code (a path step, a
        class centroid, an expression-only code) is drawn in an orientation a real cell of
        its kind takes (:func:`vae.analysis.traverse.posed_codes`, as ``stage=traverse``
        and evaluate's "from expression" column). The training crops' single-view codes
        are encoded once per study from the paired data it was trained on.

        Parameters
        ----------
        z : (n, d) float
            Full codes (``X_vae_full`` layout), finite.
        batch_size : int, default 256
            Crops per forward pass when the training crops are first encoded.

        Returns
        -------
        numpy.ndarray
            (n, d) float64; ``z`` unchanged for a study whose codes keep their pose
            (``encode_views`` 1).

        Raises
        ------
        StudyError
            ``z`` is not (n, d) finite codes; or the paired data the study was trained on
            cannot be read (gone, other rows than the reference), or it has no training crop.
        """
        from vae.analysis.traverse import posed_codes

        d = int(self.meta["n_latent"])
        z = np.asarray(z, np.float64)
        if z.ndim != 2 or z.shape[1] != d or not np.isfinite(z).all():
            raise StudyError(
                f"training_poses: z must be (n, {d}) finite full codes; got {z.shape}"
                + ("" if z.ndim != 2 or np.isfinite(z).all() else " holding NaN or inf")
            )
        if int(getattr(self.model.args, "encode_views", 1) or 1) == 1:
            return z
        if self._pose_lenders is None:
            self._pose_lenders = self._training_pose_codes(batch_size)
        reported, single = self._pose_lenders
        return posed_codes(z, reported, single, k=1).codes[:, 0]

    def _training_pose_codes(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(reported, single-view) codes of the reference's training crops, (m, d) each,
        the single-view ones encoded from the study's paired data."""
        from vae.analysis.run import pose_lenders

        ref = self.reference
        if "X_vae_full" not in ref.obsm:
            raise StudyError(f"{self.latent_path}: no full codes (obsm['X_vae_full']) to pose by")
        why = NO_PAIRED
        for p, data, why_not in self._read_paired():
            if data is None:
                why = why_not
                continue
            lenders = pose_lenders(ref, data, self.model, self.device, batch_size)
            if lenders is None:
                raise StudyError(f"{p}: no training row with a crop to lend a pose")
            return lenders
        raise StudyError(
            f"training poses need the crops the study was trained on, but {why}; decode "
            f"with pose='as_given'"
        )

    def image_support(self, z_full: np.ndarray):
        """Whether cells decoded from ``z_full`` (n, d) are drawn where crops were seen.

        The test ``stage=traverse`` applies to its paths and sweeps
        (:func:`vae.analysis.traverse.image_support`, the study's
        ``analysis.image_support_k`` / ``image_support_quantile``, else their defaults):
        a code whose mean distance to its nearest training codes *with a crop* exceeds
        what those codes have to their own neighbours is decoded by extrapolation
        (e.g. an expression-only progenitor on a study whose crops are all mature cells).

        Returns
        -------
        :class:`vae.analysis.traverse.ImageSupport` (``distance``, ``threshold``,
        ``supported`` (n,) bool).
        """
        from vae.analysis.run import full_codes, image_reference_rows
        from vae.analysis.traverse import image_support

        z = np.asarray(z_full, np.float64)
        ref = self.reference
        d = int(self.meta["n_latent"])
        if z.ndim != 2 or z.shape[1] != d:
            raise StudyError(f"image_support: z_full must be (n, {d}) full codes; got {z.shape}")
        zr = full_codes(ref)
        if zr.shape[1] != d:
            raise StudyError(f"{self.latent_path}: obsm['X_vae_full'] is missing")
        return image_support(  # a row without a code (NaN): not supported, distance NaN
            z,
            zr[image_reference_rows(ref)],
            int(self._setting("image_support_k")),
            float(self._setting("image_support_quantile")),
        )

    # ----------------------------------------------------------------- embed
    def embed(
        self,
        adata,
        source: str = "query",
        batch_size: int = 256,
        whole=None,
        warn_seen=True,
        warn_atypical=True,
        max_missing_genes: float | None = MAX_MISSING_GENES,
    ):
        """Everything at once: a copy of ``adata``'s obs with the study's readings.

        ``adata``: an AnnData (:meth:`read` reads a file or folder into one; a path,
        None or an array is refused with a :class:`TypeError` saying so).

        ``max_missing_genes``: refuse (:class:`StudyError`) an input with genes that
        lacks more than this fraction of the model's genes, as ``stage=embed``
        (``embed.max_missing_genes``, default :data:`MAX_MISSING_GENES`) does; its cells'
        codes would lean on imputed values. None or 1: embed it anyway (imputed, with a
        warning).

        ``whole``: ``adata`` is a block of rows of this file
        (:class:`vae.inputs.expression.H5adRowBlocks`, :meth:`read_blocks`): what is
        decided over the whole input (counts or log-normalised values, which matrix
        holds the counts, its errors and warnings, unique cell ids) is decided on the
        whole file, once, so the blocks' results, stacked, are the whole file's. Every
        other reading is of the cell alone.

        ``warn_seen``: warn of the cells the study's reference already holds
        (:meth:`warn_seen`; with ``whole``, once for the file, at its first block that
        has any, with that block's count); False: only count them in
        ``uns["seen_by_study"]``, for a caller that warns once with an input's totals
        (``stage=embed``, whose blocks are one input).

        ``warn_atypical``: warn where most cells come out atypical (:meth:`warn_atypical`;
        with ``whole``, of each block); False: the caller warns of the whole input.

        Returns
        -------
        AnnData with the input's obs columns untouched plus ``vae_modality``
        (image / expression / both), ``vae_label`` + ``vae_label_confidence``
        (:meth:`transfer_labels`: a cell with both modalities on the fused code,
        an image-only cell on its image code against the reference cells with a
        crop, an expression-only one likewise), ``vae_maturation`` + ``vae_stage``
        (:meth:`maturation_position` of ``vae_call``; NaN / "" when the study has no
        path, and for a cell not called one of the path's classes), the
        atypical-cell scores of :meth:`anomaly_scores` (``anomaly_*``),
        ``vae_atypical`` (``anomaly_score`` above :meth:`atypical_thresholds` for the
        modalities the cell has) and ``vae_call`` (``vae_label``, or ``unclassified``
        for an atypical cell or one whose label confidence is below
        :attr:`min_confidence`: what a differential count should count); ``obsm``: ``X_vae``, ``X_vae_image``, ``X_vae_expression``,
        ``X_vae_full``, ``X_vae_logvar`` (+ private blocks), ``crops``/``masks``
        at the model's size when there are images; ``uns["genes"]``: the
        :class:`GeneReport`; ``uns["seen_by_study"]``: ``{"images": n, "expression":
        n}``, the cells the study's reference already holds (:meth:`seen_cells`, by
        image file name and cell id; a warning says so). Rows with neither modality are
        dropped (listed in ``uns["dropped"]``). Rows keep the input's ``obs_names``,
        except a paired table's (``image_ref`` / ``expression_ref`` columns: the study's
        own ``paired.h5ad``), named as ``latent.h5ad`` names them, their own row id in
        ``obs["row"]`` (:func:`vae.inputs.query.paired_row_names`), so the round trip
        joins ``latent.h5ad`` by ``obs_names``.
        """
        import anndata as ad

        from vae.inputs.query import name_paired_rows

        if not isinstance(adata, ad.AnnData):
            # a path gave "AttributeError: 'str' object has no attribute 'obs'"
            raise TypeError(
                f"Study.embed takes an AnnData (got {type(adata).__name__}); read a file "
                "or folder with study.read(path) (an expression file a block at a time: "
                "study.read_blocks(path))"
            )
        if max_missing_genes is not None and not 0 <= float(max_missing_genes) <= 1:
            raise StudyError(f"max_missing_genes={max_missing_genes}: must be in [0, 1]")
        clash = [c for c in OBS_COLUMNS if c in adata.obs]
        if clash:
            raise StudyError(f"{source}: obs already has column(s) {clash}; rename them")
        ids = adata.obs_names if whole is None else whole.obs_names
        if whole is None or ("ids", source) not in whole.plans:
            dup = ids.duplicated()
            if dup.any():  # results are keyed by cell id: two cells of one id cannot be told apart
                raise StudyError(
                    f"{source}: obs_names holds duplicated cell ids "
                    f"{list(dict.fromkeys(ids[dup].astype(str)))[:5]}"
                )
            if whole is not None:  # checked once for the file, not once a block
                whole.plans["ids", source] = True
        if max_missing_genes is not None:
            missing = self.missing_genes(adata, whole)
            n = len(self.gene_names)
            if missing is not None and len(missing) > float(max_missing_genes) * n:
                raise StudyError(
                    f"{source}: var_names match only {n - len(missing)} of the model's {n} "
                    f"genes (missing e.g. {missing[:5]}); more than max_missing_genes="
                    f"{max_missing_genes} of them are missing (max_missing_genes=None "
                    "embeds it anyway, imputing them)"
                )
        data, report = self.prepare(adata, source, whole)
        hi, he = data.has_image.numpy(), data.has_expression.numpy()
        keep = hi | he
        dropped = [str(s) for s in adata.obs_names[~keep]]
        if dropped:  # listed in uns["dropped"]; said here, or 41 of 60 cells go unnoticed
            log.warning(
                "%s: %d of %d cells dropped: neither a usable crop nor a profile with "
                "counts in the model's genes (e.g. %s); listed in uns['dropped']",
                source,
                len(dropped),
                adata.n_obs,
                ", ".join(dropped[:3]),
            )
        lat = self.encode(data, batch_size)
        bad = ~np.isfinite(lat.joint).all(1)
        if bad.any():  # never written as a result: a NaN code has no label and no position
            raise StudyError(
                f"{source}: {int(bad.sum())} cells encode to non-finite codes (e.g. "
                f"{list(adata.obs_names[bad][:3])}): their values are out of the range the "
                "model was trained on"
            )
        ns, npv = self.n_shared, int(self.meta["n_private"])
        obs = adata.obs.copy()
        names = _paired_names(adata, source, whole)
        if names is not None:  # a paired table: its rows named as latent.h5ad names them
            name_paired_rows(obs, names)
        obs["vae_modality"] = np.where(hi & he, "both", np.where(hi, "image", "expression"))
        out = ad.AnnData(obs=obs, obsm=latent_obsm(lat, ns, npv))
        if hi.any():
            out.obsm["crops"] = data.crops.permute(0, 2, 3, 1).numpy()
            out.obsm["masks"] = data.masks[:, 0].numpy().astype(bool)
        for col, v in self.anomaly_scores(data, lat).items():
            out.obs[col] = v.to_numpy(dtype=np.float32)  # float32 as in latent.h5ad
        out = out[keep].copy()
        # each cell is read against reference cells with the modalities it has
        from vae.analysis.anomaly import latent_modalities

        codes = latent_modalities(out, ns, npv)
        label = np.full(out.n_obs, "", dtype=object)
        conf = np.full(out.n_obs, np.nan)
        mod = out.obs["vae_modality"].to_numpy()
        for m, lm in (("both", "joint"), ("image", "image"), ("expression", "expression")):
            rows = np.flatnonzero(mod == m)
            if not rows.size:
                continue
            if m == "image" and self._labelled is not None:
                # the user's labelled crops of this microscope (fit_labelled_crops)
                label[rows], conf[rows] = self._labelled.predict(codes["image"][rows])
                continue
            z = out.obsm["X_vae"][rows] if lm == "joint" else codes[lm][rows]
            lab = self.transfer_labels(z, modality=lm)
            label[rows] = lab["label"].to_numpy().astype(str)
            conf[rows] = lab["confidence"].to_numpy()
        # the study's classes as categories whichever were called: one colour per label
        # in the study's UMAP and the query's ("" where no code: NaN when written);
        # vae_label's and vae_call's alike, so the two compare (pandas refuses otherwise)
        classes = [*self.call_labels, UNCLASSIFIED]
        out.obs["vae_label"] = label_categorical(label.astype(str), classes)
        out.obs["vae_label_confidence"] = conf
        # the call a differential counts: a cell whose neighbours disagree, or that is
        # less like the study's cells than its own held-out cells (a doublet, debris,
        # a kind it never saw), is left unclassified, as a counter flags it
        thr = self.atypical_thresholds()
        limit = np.array([thr[m] for m in mod], dtype=np.float64)
        score = out.obs[ANOMALY_COLUMNS["combined"]].to_numpy(np.float64)
        with np.errstate(invalid="ignore"):
            atypical = np.isfinite(limit) & (score > limit)
        out.obs["vae_atypical"] = atypical
        doubt = atypical | ~(conf >= self._min_confidence)
        call = np.where(doubt, UNCLASSIFIED, label.astype(str)).astype(str)
        out.obs["vae_call"] = label_categorical(call, classes)
        try:
            # a cell not called a class of the path (a lymphocyte on the granulocyte
            # path, an unclassified cell) has a projection but no position and no
            # stage: the rule of samples.csv's n_on_path (on_maturation_path)
            mp = self.maturation_position(out.obsm["X_vae_full"], call)
            out.obs["vae_maturation"] = mp["position"].to_numpy()
            out.obs["vae_stage"] = mp["stage"].to_numpy().astype(str)
        except StudyError as e:
            log.warning("no maturation position: %s", e)
            out.obs["vae_maturation"] = np.nan
            out.obs["vae_stage"] = ""
        out.uns["latent_layout"] = {"n_shared": ns, "n_private": npv}
        out.uns["genes"] = json.dumps(report.as_dict()) if report else "{}"
        if report is not None and report.imputed is not None:
            # the values the missing genes were given (NaN for rows without expression)
            imp = np.where(he[:, None], report.imputed, np.nan).astype(np.float32)
            out.obsm["X_vae_imputed"] = imp[keep]
            out.uns["imputed_genes"] = list(report.missing)
        out.uns["dropped"] = dropped
        # cells the study's reference already holds (its own images or profiles): counted
        # in uns["seen_by_study"] and warned, once for a file embedded a block at a time
        seen = self.seen_cells(out)
        out.uns["seen_by_study"] = {k: int(v.sum()) for k, v in seen.items()}
        if warn_seen and (whole is None or not whole.plans.get(("seen", source), False)):
            # a block's count is not the file's: said so (stage=embed warns with totals)
            self.warn_seen(out, source if whole is None else f"{source} (a block)", seen)
            if whole is not None and any(v.any() for v in seen.values()):
                whole.plans["seen", source] = True
        if warn_atypical:
            self.warn_atypical(out, source if whole is None else f"{source} (a block)")
        out.uns["study"] = {"model": str(self.model_path), "latent": str(self.latent_path)}
        digest = self.reference.uns.get("model_digest")
        if digest is not None:  # ties a moved query to its model (paths alone do not)
            out.uns["study"]["model_digest"] = str(digest)
        return out


def _paired_names(adata, source: str, whole=None) -> np.ndarray | None:
    """The names of ``adata``'s rows where it is (a block of) a paired table, else None
    (:func:`vae.inputs.query.paired_row_names`); for a block of ``whole``, named over the
    whole file once (a repeat's suffix depends on the rows before it)."""
    from vae.inputs.query import paired_row_names

    if whole is None or getattr(whole, "obs", None) is None:
        names = paired_row_names(adata.obs)
        return None if names is None else names.to_numpy()
    if ("names", source) not in whole.plans:
        whole.plans["names", source] = paired_row_names(whole.obs)
    names = whole.plans["names", source]
    if names is None:
        return None
    return names.to_numpy()[whole.obs_names.get_indexer(adata.obs_names)]


def label_categorical(values: np.ndarray, categories: list[str]) -> pd.Categorical:
    """``values`` as a categorical over ``categories`` in their order; a value outside
    them (``""``: no code; a label absent from an old reference) is added after them."""
    extra = sorted(set(values.tolist()) - set(categories))
    return pd.Categorical(values, categories=[*categories, *extra])


__all__ = [
    "Study",
    "StudyError",
    "GeneReport",
    "TrainingCrops",
    "UNCLASSIFIED",
    "ATYPICAL_MOSTLY",
    "label_categorical",
]
