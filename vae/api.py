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
import logging
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segmentation.io import MANIFEST, blank_as_read
from segmentation.schema import SCALE_SPREAD
from vae.defaults import (
    ATYPICAL_QUANTILE,
    IMPUTE,
    IMPUTE_ITERATIONS,
    MAX_MISSING_GENES,
    MIN_CONFIDENCE,
)
from vae.inputs.schema import (
    ANOMALY_COLUMNS,
    CELL_DIAMETER,
    HAS_COUNTS,
    HAS_EXPRESSION,
    HAS_IMAGE,
    cell_diameters,
    known_labels,
)
from vae.scverse import latent_obsm

log = logging.getLogger(__name__)

# label transfer: which reference cells and codes a query is read against
LABEL_MODALITIES = ("joint", "image", "expression")
# how crops and smears are cut for the model (Study.read's crop_masks, embed.crop_masks):
# auto = as the study's training crops (Study.training_crops: detector where they were
# masked, whole where they were unmasked squares, detector where it cannot be told) |
# detector = each cell cut out with the detector's instance mask (a crop folder: its
# centre cell) | whole = unmasked (a crop image whole; a smear's cell as its square box)
CROP_MASKS = ("auto", "detector", "whole")
# largest value a log1p-normalised matrix can hold and still be one: log1p(1e6) = 13.8
# (counts per million, one gene holding the whole cell); above it, values are not logged
LOGNORM_MAX = 14.0
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
# why a study's paired data cannot be read, when it names none
NO_PAIRED = "no paired.h5ad it was trained on is known (meta 'source')"
# Study.decode: codes drawn as they are, or each in the pose of the nearest training crop
POSES = ("as_given", "training")
UNCLASSIFIED = "unclassified"  # vae_call of a doubtful or atypical cell
# an input more than this share of whose cells are atypical (vae_atypical) is warned of
# with the usual causes (Study.warn_atypical): no patient is mostly cells unlike every
# cell the study saw; crops cut unlike its training crops, another stain or
# magnification, or kinds it never saw are
ATYPICAL_MOSTLY = 0.5
# a study's training crops whole (unmasked) when more than this share of its paired rows'
# masks read whole (vae.inputs.query.whole_masks), else masked: a tie keeps the
# detector's cut, the behaviour before the study's cut was read
WHOLE_CROPS_SHARE = 0.5
# a study's paired data is read into memory (Study._read_paired: a latent.h5ad older than
# its anomaly columns is scored from it, training poses are encoded from it) up to this
# size; a larger one leaves atypical flagging off and decode(pose="training") refused
RESCORE_MAX_GIB = 8.0


class StudyError(ValueError):
    """The study or a query input does not fit; the message names the file and field."""


def _flag(obs: pd.DataFrame, col: str, source: str) -> np.ndarray:
    """(N,) bool ``obs[col]`` (``has_image`` / ``has_expression``) read strictly
    (:func:`vae.data.parse_flag`: ``astype(bool)`` read the text "False" as True);
    a value that is no flag raises StudyError naming ``source`` and the row."""
    from vae.data import PairedDataError, parse_flag

    try:
        return parse_flag(obs[col], source, col, obs.index)
    except PairedDataError as e:
        raise StudyError(str(e)) from None


@dataclass
class GeneReport:
    """How a query's genes matched the model's.

    n_model : genes of the model; matched : found in the query (by name);
    missing : model genes absent from the query (filled as described in the
    module docstring); n_extra : query genes the model does not know (ignored);
    repeated : gene names the query holds more than once (made unique ``NAME-1``, ...
    as stage=expression does; a model gene takes the first occurrence);
    values : ``counts`` or ``lognorm`` (what the query's expression held).
    """

    n_model: int
    matched: int
    missing: list[str] = field(default_factory=list)
    n_extra: int = 0
    # names the query repeats (made unique NAME-1, ...; a model gene takes the first)
    repeated: list[str] = field(default_factory=list)
    values: str = "counts"
    impute: str = "model"  # how the missing genes were filled: model | mean
    # (n, len(missing)) log1p-normalised values given to the missing genes (None: none missing)
    imputed: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {
            "n_model_genes": self.n_model,
            "matched": self.matched,
            "missing": self.missing,
            "n_extra_ignored": self.n_extra,
            "repeated_genes": self.repeated,
            "values": self.values,
            "impute": self.impute if self.missing else None,
        }


def _dense(m) -> np.ndarray:
    return np.asarray(m.toarray() if hasattr(m, "toarray") else m)


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


# values checked at a time by _is_counts: np.allclose makes several float temporaries of
# its input (+0.64 GiB for 43 M values; a 30k-gene 10x matrix holds ~600 M)
COUNT_CHECK_VALUES = 1 << 22


def _file_stamp(path) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file, None when there is none (or no path)."""
    try:
        st = Path(path).stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_size, st.st_mtime_ns)


def _is_counts(m: np.ndarray) -> bool:
    """Whether every value of ``m`` is a non-negative whole number (checked by chunks of
    :data:`COUNT_CHECK_VALUES`, the same answer as on the whole array)."""
    flat = np.asarray(m).reshape(-1)
    for s in range(0, flat.size, COUNT_CHECK_VALUES):
        c = flat[s : s + COUNT_CHECK_VALUES]
        if not ((c >= 0).all() and np.allclose(c, np.round(c))):
            return False
    return True


def _lognorm_problem(neg: int, top: float) -> str | None:
    """Why X's values cannot be log1p-normalised, or None (stage=expression refuses the
    same; a scaled or CPM matrix would embed as silent garbage): ``neg`` negative values,
    ``top`` the largest (NaN: none but NaN; 0 for no value), of the whole matrix
    (:class:`vae.inputs.expression.ValueStats`)."""
    if neg:
        return (
            f"X holds {neg} negative values (scaled or centred?): give raw "
            "counts (layers['counts'] or X) or log1p-normalised values"
        )
    if top > LOGNORM_MAX:
        return (
            f"X is neither integer counts nor log1p-normalised values "
            f"(largest {top:.4g}; normalised but not logged, e.g. CPM / TPM?): give raw "
            "counts (layers['counts'] or X) or log1p-normalised values"
        )
    return None


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reader_error(e) -> StudyError:
    """An expression reader's error, naming the :meth:`Study.read` argument of its field."""
    hint = {
        "expression.orientation": " (Study.read: orientation=...)",
        "expression.counts_layer": " (Study.read: counts_layer=...)",
    }.get(e.field, "")
    return StudyError(str(e) + hint)


def _nonfinite_in(facts, key: str, cols: np.ndarray) -> int:
    """NaN / infinite values of matrix ``key`` in the model's columns ``cols`` (each as
    often as ``cols`` names it), from ``facts`` (:meth:`Study._expression_plan`); the
    columns are read only where the whole matrix holds any (a file's column scan
    took 20 s of a 300k-cell embed)."""
    return facts.stats(key, cols).nonfinite if facts.stats(key).nonfinite else 0


@dataclass(frozen=True)
class _ExpressionPlan:
    """How :meth:`Study._expression` reads a query's expression, decided on the whole
    input (:meth:`Study._expression_plan`) and applied to its rows, a block at a time
    where the file is read so.

    from_raw : the counts are ``.raw.X`` (X holds none); names : the genes read (unique);
    repeated : names the input repeats; ok : (G,) model genes found; cols : their columns;
    layer : ``layers["counts"]`` holds the counts; x_log : (with ``layer``) X's
    log-normalised values used as given; x_counts : (without) X holds counts;
    values : ``counts`` or ``lognorm``; want_counts : the model reads counts;
    raw_library : each cell's library is ``obs[RAW_LIBRARY]`` (``counts_layer=.raw``).
    """

    from_raw: bool
    names: pd.Index
    repeated: list[str]
    ok: np.ndarray
    cols: np.ndarray
    layer: bool
    x_log: bool
    x_counts: bool
    values: str
    want_counts: bool
    raw_library: bool


@dataclass(frozen=True)
class TrainingCrops:
    """How a study's training crops were made (:meth:`Study.training_crops`).

    ``kind``: ``masked`` (each cell cut out with its instance mask, the background painted
    ``pair.background_value``: ``stage=segment``'s cells, ``segmentation_wbc``, ``coco``),
    ``whole`` (unmasked squares, background and red cells in view: ``pair.crop_sources``
    of kind ``image_folder``) or None (not known: no paired data, no record of the pair
    run; or no crop at all). ``evidence``: what it was read from, for the log.
    ``whole_share``: the share of the paired rows' masks read that are whole squares
    (None where read from the pair run's record)."""

    kind: str | None
    evidence: str
    whole_share: float | None = None

    @property
    def crop_masks(self) -> str:
        """The ``crop_masks`` that reads new cells like these: ``whole`` for unmasked
        crops, else ``detector`` (also where not known: the reading before 2026-12-06)."""
        return "whole" if self.kind == "whole" else "detector"

    @property
    def what(self) -> str:
        """The cut in a few words (``unmasked square crops`` ...)."""
        return {"whole": "unmasked square crops", "masked": "crops masked to the cell"}.get(
            str(self.kind), "crops of an unknown cut"
        )

    def describe(self) -> str:
        """The cut, what it shows and where it was read, for the log."""
        shows = {
            "whole": "background and red cells in view; ",
            "masked": "background blacked out; ",
        }.get(str(self.kind), "")
        return f"{self.what} ({shows}{self.evidence})"


# what each crop_masks does to the cells of a crop folder / of a smear
_CROP_MASKS_READS = {
    ("crops", "detector"): "each crop's centre cell cut out by the detector's mask",
    ("crops", "whole"): "each crop image whole, unmasked",
    ("smears", "detector"): "each cell cut out by the detector's mask",
    ("smears", "whole"): "each cell as its square box, unmasked",
}


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


class Study:
    """A trained study: model, reference latent and (optionally) the detector.

    Build it with :meth:`load`. Attributes: ``model`` (eval mode), ``meta``
    (checkpoint meta: ``gene_names``, ``crop_size`` ...), ``reference`` (the
    AnnData of ``latent.h5ad``), ``config`` (the resolved config the model was
    trained with), ``segmentation_model`` (path or None), ``device``.
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
        (``st.reference = st.reference.copy()``) to fit them anew."""
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

    def atypical_thresholds(self) -> dict[str, float]:
        """``image`` / ``expression`` / ``both`` -> the ``anomaly_score`` above which a
        query cell with those modalities is atypical (NaN: none is; every value NaN
        when :attr:`atypical_quantile` is None, or when the study's held-out scores
        cannot be had: :attr:`atypical_off` says why)."""
        if self._atypical_q is None:
            return {m: float("nan") for m in ("image", "expression", "both")}
        if self._atypical_thr is None:
            from vae.analysis import anomaly as A

            self._atypical_thr = A.held_out_thresholds(
                self._scored_reference(), self._anomaly_reference(), self._atypical_q
            )
        return self._atypical_thr

    @property
    def atypical_off(self) -> str | None:
        """Why no cell can be flagged atypical although :attr:`atypical_quantile` is set
        (the study's latent.h5ad predates the anomaly scores and they could not be
        computed from its paired data), else None."""
        if self._atypical_q is None:
            return None
        self._scored_reference()
        return self._atypical_why

    def _anomaly_reference(self):
        if self._anomaly_ref is None:
            from vae.analysis import anomaly as A

            self._anomaly_ref = A.reference_from_latent(
                self._scored_reference(), self.n_shared, int(self.meta["n_private"])
            )
        return self._anomaly_ref

    def _scored_reference(self):
        """The reference latent with the anomaly columns ``stage=train`` writes.

        A ``latent.h5ad`` written before 2026-11-30 has none: without the held-out
        rows' scores there is no threshold and no reconstruction scale, and atypical
        flagging was silently off. Those columns depend on the model and the training
        rows only, so they are computed here as ``stage=train`` computes them
        (:func:`vae.analysis.anomaly.anomaly_scores`), from the paired.h5ad the study
        was trained on, once it is shown to be that file (same rows, and the model
        encodes them to the codes the latent holds). Where that is not possible the
        latent is used as it is, :attr:`atypical_off` says why and a warning names
        what to do.
        """
        if self._scored_ref is not None:
            return self._scored_ref
        from vae.analysis.anomaly import RAW_KEYS
        from vae.inputs.schema import ANOMALY_COLUMNS

        self._scored_ref = self.reference
        missing = [
            ANOMALY_COLUMNS[k] for k in RAW_KEYS if ANOMALY_COLUMNS[k] not in self.reference.obs
        ]
        if not missing:
            return self._scored_ref
        frame, why = self._rescore_reference()
        if frame is not None:
            ref = self.reference.copy()
            for col in frame.columns:
                ref.obs[col] = frame[col].to_numpy(dtype=np.float32)  # as stage=train writes
            self._scored_ref = ref
            return ref
        self._atypical_why = (
            f"the study's latent {self.latent_path} predates the atypical-cell scores "
            f"(no {missing[0]}) and {why}"
        )
        if self._atypical_q is not None:
            log.warning(
                "atypical flagging off: %s; no cell is flagged atypical (vae_atypical). Make "
                "the paired.h5ad the study was trained on readable at %s, or train the study "
                "again (stage=train overwrite=true) to write the scores",
                self._atypical_why,
                " or ".join(str(p) for p in self._paired_candidates) or "its recorded path",
            )
        return self._scored_ref

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

    def _rescore_reference(self) -> tuple[pd.DataFrame | None, str]:
        """The reference rows' anomaly scores from the study's paired data, or
        ``(None, why not)``."""
        from vae.analysis import anomaly as A

        ref = self.reference
        why = NO_PAIRED
        for p, data, why_not in self._read_paired():
            if data is None:
                why = why_not
                continue
            log.info(
                "%s predates the atypical-cell scores: computing them for its %d cells from "
                "%s, as stage=train does (once)",
                self.latent_path,
                data.n,
                p,
            )
            lat = self.encode(data)
            stored = (
                np.asarray(ref.obsm["X_vae_full"], np.float64) if "X_vae_full" in ref.obsm else None
            )
            if stored is None or stored.shape != lat.joint.shape:
                why = f"{self.latent_path} has no full codes (obsm['X_vae_full']) to check {p} by"
                continue
            # the same file and model give the same codes; another file with the same
            # row names (paired again since) would give a reference the study never had
            gap = float(np.nanmax(np.abs(lat.joint - stored))) if stored.size else 0.0
            if not gap <= 1e-3 * max(1.0, float(np.nanmax(np.abs(stored)))):
                why = (
                    f"the model does not encode the rows of {p} to the codes the latent "
                    f"holds (largest difference {gap:.3g}): not the data it was trained on"
                )
                continue
            train = (
                ref.obs["split"].astype(str).to_numpy() == "train"
                if "split" in ref.obs
                else np.ones(ref.n_obs, bool)
            )
            frame = A.anomaly_scores(self.model, data, train, self.device, latents=lat)
            frame.index = ref.obs_names
            return frame, ""
        return None, why

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

    # ---------------------------------------------------------------- inputs
    def training_crops(self) -> TrainingCrops:
        """How the crops the study was trained on were made: masked to the cell or whole
        unmasked squares (:class:`TrainingCrops`), read once.

        The paired data it was trained on (its own ``pair/paired.h5ad``, else the one its
        checkpoint names) holds it in its masks: ``pair.crop_sources`` of kind
        ``image_folder`` give every crop an all-True mask (the file read whole as the
        cell), every other kind the cell's instance mask
        (:func:`vae.inputs.query.paired_masks`: 256 image rows spread over the table).
        Whole more than :data:`WHOLE_CROPS_SHARE` of them: ``whole``. Without readable
        paired data, the pair run's record (``manifest.json`` beside it: the kinds of
        its ``pair.crop_sources``) says it where every source is of one cut. Neither:
        ``kind`` None (studies of any age: nothing new is needed from the study).

        Returns
        -------
        TrainingCrops
            ``kind`` (``"masked"``, ``"whole"`` or None: not known, or a study without
            crops), ``evidence`` (what it was read from, for the log) and
            ``whole_share`` (float in [0, 1], the share of the paired rows' masks read
            that are whole squares; None where read from the pair run's record). Read
            once per study and cached.
        """
        if self._training_crops is not None:
            return self._training_crops
        from vae.inputs.query import paired_masks

        found = None
        for p in self._paired_candidates:
            if not p.is_file():
                continue
            try:
                got = paired_masks(p)
            except (OSError, KeyError, ValueError, TypeError) as e:
                log.info("%s: its masks cannot be read (%s)", p, e)
                continue
            if got is None:  # a study without crops (expression only): nothing to match
                found = TrainingCrops(None, f"{p} holds no crop")
                break
            share = got.share
            kind = "whole" if share > WHOLE_CROPS_SHARE else "masked"
            found = TrainingCrops(
                kind,
                f"the masks of {p}: {got.whole} of {got.n} image rows read are whole squares",
                share,
            )
            if 0.05 < share < 0.95:
                log.warning(
                    "the study's training crops are mixed: %d of %d read in %s are unmasked "
                    "squares, the others masked to the cell; new cells are read as the "
                    "most (%s)",
                    got.whole,
                    got.n,
                    p,
                    kind,
                )
            break
        if found is None:
            found = self._training_crops_by_manifest()
        self._training_crops = found
        return found

    def _training_crops_by_manifest(self) -> TrainingCrops:
        """:meth:`training_crops` from the pair run's ``manifest.json`` (the kinds of its
        ``pair.crop_sources``), where the paired data are gone."""
        for p in self._paired_candidates:
            man = p.parent / MANIFEST
            try:
                rec = json.loads(man.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(rec, dict) or rec.get("stage") != "pair":
                continue
            sources = ((rec.get("config") or {}).get("pair") or {}).get("crop_sources") or []
            kinds = {str((src or {}).get("kind")) for src in sources if isinstance(src, dict)}
            if not kinds:
                continue
            said = f"{man}: pair.crop_sources of kind {', '.join(sorted(kinds))}"
            if kinds == {"image_folder"}:
                return TrainingCrops("whole", said)
            if "image_folder" not in kinds:
                return TrainingCrops("masked", said)
            return TrainingCrops(None, f"{said} (unmasked and masked; their shares unknown)")
        return TrainingCrops(
            None,
            "no paired data of the study to read its crops' masks from "
            f"({', '.join(map(str, self._paired_candidates)) or 'none recorded'}) and no "
            "record of its pair run",
        )

    def crop_masks_for(self, kind: str, crop_masks: str | None = "auto", setting: str = "") -> str:
        """The cut (``detector`` / ``whole``) that ``crop_masks`` gives the cells of a
        ``kind`` (``crops`` / ``smears``) input, said in the log once per study.

        ``auto`` (or None) follows :meth:`training_crops`: a study trained on unmasked
        square crops reads a crop folder whole and a smear's cells as their square boxes,
        unmasked; a masked one (or one whose crops cannot be told) the detector's masks
        (an info line says which and why). Given another cut than the study's training
        crops, a warning names ``setting`` (default ``crop_masks``) and what follows:
        the cells look unlike the study's training crops and most come out atypical.

        Parameters
        ----------
        kind : str
            The input's kind: ``"crops"`` (a crop folder) or ``"smears"`` (whole smears
            the detector segments); only the log's wording depends on it.
        crop_masks : str or None, default ``"auto"``
            ``"auto"`` (None reads the same), ``"detector"`` or ``"whole"``
            (:data:`CROP_MASKS`).
        setting : str, default ``""``
            The setting's name as the user gave it, for the messages (``""``:
            ``crop_masks``; ``stage=embed`` passes ``embed.crop_masks``).

        Returns
        -------
        str
            ``"detector"`` (each cell cut out with the detector's instance mask) or
            ``"whole"`` (unmasked: a crop image whole, a smear's cell as its square box).

        Raises
        ------
        StudyError
            ``crop_masks`` not one of :data:`CROP_MASKS`.
        """
        if crop_masks is None:
            crop_masks = "auto"
        if crop_masks not in CROP_MASKS:
            raise StudyError(f"crop_masks={crop_masks!r}; valid: {', '.join(CROP_MASKS)}")
        setting = setting or "crop_masks"
        study = self.training_crops()
        use = study.crop_masks if crop_masks == "auto" else crop_masks
        key = (kind, use)
        if key in self._crop_masks_said:
            return use
        self._crop_masks_said.add(key)
        reads = _CROP_MASKS_READS.get((kind, use), use)
        if crop_masks == "auto":
            log.info(
                "%s: %s=auto reads %s (%s), as the study's training crops: %s",
                kind,
                setting,
                reads,
                use,
                study.describe(),
            )
        elif study.kind is not None and use != study.crop_masks:
            premasked = (
                " (crops already cut out on the background value are found so and keep "
                "their own mask under the default)"
                if kind == "crops" and use == "whole"
                else ""
            )
            log.warning(
                "%s=%s reads %s %s, but the study was trained on %s: cells will look unlike "
                "the study's training crops and most will be called unclassified (atypical)"
                "%s. Leave %s unset (auto) to read them as the study's training crops",
                setting,
                use,
                kind,
                f"as {reads}",
                study.describe(),
                premasked,
                setting,
            )
        return use

    def read(
        self,
        path: str | Path,
        kind: str = "auto",
        background: int | None = None,
        segment_settings: Any = None,
        detector_kwargs: dict | None = None,
        estimate_cell_px: float | None = None,
        refine_scale: bool | None = None,
        estimate_scale: bool | None = None,
        scale_spread: float | None = SCALE_SPREAD,
        crop_masks: str | None = "auto",
        orientation: str = "auto",
        counts_layer: str | None = None,
    ):
        """Read one input into an AnnData (a folder's unreadable items in ``uns["rejects"]``).

        Parameters
        ----------
        path : ``.h5ad`` (cells.h5ad, paired.h5ad, expression), expression
            file (10x, CSV/TSV...), a folder of crops or of smears
        kind : ``auto`` (h5ad / expression file by suffix, a 10x matrix folder or Cell
            Ranger output folder as expression, other folders as crops), ``h5ad``,
            ``expression``, ``crops``, ``smears``
        orientation : for ``expression``: ``auto`` (default) tells which axis holds the
            genes from the model's gene names (a table or AnnData with them on the rows
            is transposed / refused as :func:`vae.inputs.expression.read_expression`
            says), ``cells_by_genes`` or ``genes_by_cells`` to say it
            (``expression.orientation`` of stage=embed)
        counts_layer : for ``expression``: where the raw counts are when not in ``X``
            or ``layers["counts"]``: a layer's name, or ``".raw"``
            (``expression.counts_layer`` of stage=embed, as for stage=expression).
            Without it, integer counts in ``.raw`` holding every gene of ``X`` are used
            (scanpy's usual layout: log-normalised ``X``, counts in ``.raw.X``)
        background : pixel value outside the mask (default: the study's ``pair.background_value``)
        crop_masks : for ``crops`` and ``smears``: how each cell is cut for the model.
            ``auto`` (default; None alike) as the study's training crops were
            (:meth:`training_crops`, :meth:`crop_masks_for`): ``whole`` for a study
            trained on unmasked square crops (``pair.crop_sources`` of kind
            ``image_folder``), else ``detector``. ``detector``: the study's detector
            finds the cell of each crop and keeps it with its instance mask, as
            ``stage=segment`` masks a crop folder
            (:func:`vae.inputs.query.segment_crop_folder`; a crop with no cell at its
            centre is a reject row), and cuts each smear cell out with its mask.
            ``whole``: a crop image is taken whole as the cell; a smear cell is cut as
            its square box with its surroundings, unmasked
            (:func:`vae.inputs.query.square_cells`). A cut other than the study's
            training crops' is warned of: on the real chain's (masked) test crops
            label transfer 0.849 masked by the detector vs 0.604 whole, five seeds
            (docs/embed.md, "Crop folders: what the mask buys"); an unmasked study
            called 24 of 24 detector-masked cells unclassified (atypical)
        segment_settings, detector_kwargs, estimate_cell_px : for ``smears`` and
            ``crops`` read by the detector
            (:func:`vae.inputs.query.segment_smear_folder`; ``estimate_cell_px``
            measures each image's magnification from its white cells, else red cells)
        refine_scale : when the scale is estimated: the detector's own confident white
            boxes refine each image's estimate (one more detector pass where they
            disagree; :func:`segmentation.magnification.refine_scale`); None (default):
            as the detector asks (the shipped one: on;
            :func:`segmentation.shipped.wants_scale_refinement`)
        estimate_scale : for ``smears`` without ``estimate_cell_px``: None (default)
            measures the magnification when the detector asks for it (the shipped one)
        scale_spread : when the scale is estimated, each image's estimate is held
            within this factor of the median estimate of the images of its
            (sub-)folder and pixel size (one microscope); 1: the median for all;
            None: each image on its own

        Returns
        -------
        AnnData; the reject rows of unreadable images are in ``uns["rejects"]``
        (list of dicts with ``input``, ``item``, ``reason``).
        """
        import anndata as ad

        from segmentation.magnification import RefineSettings
        from vae.inputs import query as Q

        p = Path(path)
        if not p.exists():
            raise StudyError(f"{p}: no such file or folder")
        if kind == "auto":
            from vae.inputs.expression import is_10x_folder

            if p.is_dir():  # a 10x folder read as crops gave 0 cells and no reject
                kind = "expression" if is_10x_folder(p) else "crops"
            else:
                kind = "h5ad" if p.suffix == ".h5ad" else "expression"
        bg = int(
            (self.config.get("pair") or {}).get("background_value", 0)
            if background is None
            else background
        )
        if kind == "h5ad":
            try:
                a = ad.read_h5ad(p)
            except Exception as e:  # noqa: BLE001
                raise StudyError(f"{p}: cannot read h5ad ({e})") from e
            a.uns["rejects"] = []
            return a
        if kind == "expression":
            from vae.inputs.expression import ExpressionInputError, counts_from, read_expression

            self.check_whole_read_fits(p, orientation)
            try:
                # the axes told by the model's own genes: the granule programs' few genes
                # (the default) may be absent from a query that holds every model gene
                a = read_expression(p, orientation=orientation, known_genes=self.gene_names)
                if counts_layer:
                    a = counts_from(a, counts_layer, str(p))
            except ExpressionInputError as e:
                raise _reader_error(e) from e
            a.uns["rejects"] = []
            return a
        if kind not in ("crops", "smears"):
            raise StudyError(f"kind={kind!r}; valid: auto, h5ad, expression, crops, smears")
        if crop_masks is not None and crop_masks not in CROP_MASKS:
            raise StudyError(f"crop_masks={crop_masks!r}; valid: {', '.join(CROP_MASKS)}")
        if not p.is_dir():
            raise StudyError(
                f"{p}: kind={kind!r} reads a folder of images (sub-folders = samples); this "
                "is a file: give the folder that holds it"
            )
        crop_masks = self.crop_masks_for(kind, crop_masks)
        if kind == "crops" and crop_masks == "whole":
            # each crop held at the model's side as it is read (20k crops: 3.85 -> 2.75
            # GiB peak); the resize prepare() would do later, so the same values
            model_crops = Q.ModelCrops(self.pair_crop_size, self.crop_size, bg)
            a, rej = Q.read_crop_folder(p, self.pair_crop_size, bg, model_crops=model_crops)
        else:
            from segmentation.io import UnsafeCheckpointError
            from segmentation.shipped import shipped_detector

            try:
                if self.segmentation_model is None:  # no study detector: the shipped one
                    self.segmentation_model = shipped_detector()
                    self._detector_stamp = _file_stamp(self.segmentation_model)
                self._check_detector_unchanged()
                if kind == "crops":
                    read = Q.segment_crop_folder
                else:  # a study trained on unmasked squares: each cell's square, unmasked
                    read = partial(Q.segment_smear_folder, unmasked=crop_masks == "whole")
                a, rej = read(
                    p,
                    self.segmentation_model,
                    settings=segment_settings,
                    device=self.device,
                    detector_kwargs=detector_kwargs,
                    estimate_cell_px=estimate_cell_px,
                    refine=RefineSettings() if refine_scale else refine_scale,  # None: as saved
                    estimate_scale=estimate_scale,
                    scale_spread=scale_spread,
                    model_crops=Q.ModelCrops(self.pair_crop_size, self.crop_size, bg),
                )
            except (RuntimeError, UnsafeCheckpointError) as e:
                raise StudyError(str(e)) from e
        a.uns["rejects"] = rej
        return a

    def check_whole_read_fits(self, path: Path, orientation: str = "auto") -> None:
        """Refuse an expression file read whole (:meth:`read`) that cannot fit in the
        memory available, with what to do: an OOM kill says nothing. The least it takes:
        the file read whole (:func:`vae.inputs.expression.whole_read_size`: an ``.h5ad``
        or 10x ``.h5``'s matrices as stored, a 10x matrix folder's entries, a table's
        values) and the model's genes of every cell made dense (float64 values, float32
        ``x`` and counts: 16 bytes a value).

        The advice follows why the file is read whole: where :meth:`read_blocks` gave
        None for it, the reason it found (a table's cells are counted on the axis it
        found too); else, for a file :meth:`read_blocks` may read by rows, that method.

        Parameters
        ----------
        path : an expression file or 10x matrix folder that :meth:`read` reads whole
        orientation : as :meth:`read` (a table's cells are its rows or its columns)

        Raises
        ------
        StudyError
            It does not fit: the message names the file, what it takes, what is
            available and what to give instead. A format not estimated passes.
        """
        from vae.inputs.expression import whole_read_size

        why = self._read_whole_why(path, orientation)
        if orientation == "auto" and why is not None:
            orientation = why.orientation  # the axis the table's names gave
        size, avail = whole_read_size(path, orientation), _available_memory()
        if size is None or avail is None:
            return
        need = size.need + size.cells * len(self.gene_names) * 16
        if need <= avail:
            return
        raise StudyError(
            f"{path}: read whole it takes at least {need / 2**30:.1f} GiB ({size.cells} "
            f"cells; {size.what}: {size.need / 2**30:.1f} GiB), more than the "
            f"{avail / 2**30:.1f} GiB available. {self._whole_read_fix(path, orientation, why)} "
            "(docs/embed.md, 'Large expression files')"
        )

    def _read_whole_why(self, path, orientation: str):
        """Why :meth:`read_blocks` last read ``path`` whole (a
        :class:`vae.inputs.expression.ReadWhole`), or None: not asked, asked with another
        orientation, or the file changed since."""
        got = self._read_whole.get(str(path))
        if got is None or got[0] != orientation or got[1] != _file_stamp(path):
            return None
        return got[2]

    @staticmethod
    def _whole_read_fix(path, orientation: str, why) -> str:
        """What to do about a file too large to read whole, by why it is read whole
        (``why``: a :class:`vae.inputs.expression.ReadWhole` or None, see
        :meth:`check_whole_read_fits`)."""
        from vae.inputs.expression import is_table, row_blocks_unsupported

        p = Path(path)
        if why is None and row_blocks_unsupported(p, orientation) is None:
            # Study.read: this file may be read by rows, which Study.read never does
            return (
                "Study.read reads a file whole; Study.read_blocks reads an .h5ad, a 10x .h5 "
                "or a table of cells as rows a block of rows at a time: blocks = "
                "st.read_blocks(path); parts = [st.embed(b, 'query', whole=blocks) for b in "
                "blocks] (None, and the log says why, where the file must be read whole)"
            )
        if p.is_dir():
            return (
                "A 10x matrix folder is read whole; an .h5ad or Cell Ranger's "
                "filtered_feature_bc_matrix.h5 is read a block of rows at a time: give that "
                "file, or convert the folder once (scanpy: sc.read_10x_mtx(FOLDER)"
                ".write_h5ad('query.h5ad'), which holds its entries only) and set "
                "embed.expression=query.h5ad"
            )
        if not is_table(p):
            return (
                "An .h5ad whose X, layers and .raw are stored as CSR (or dense), cells x "
                "genes, is read and embedded a block of rows at a time: write it so "
                "(anndata: adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(...))"
            )
        rows = "A table of cells as rows is read a block of rows at a time; this one is read whole"
        if why is None or why.reason == "genes_as_rows":  # why None: genes_by_cells said
            detail = f"expression.orientation={orientation}" if why is None else str(why)
            return f"{rows} ({detail}): write it with cells as rows, or as a CSR .h5ad"
        if why.reason == "mixed_ids":
            return (
                f"{rows}: its cell ids read as numbers in some blocks and as text in others "
                f"({why}), so read by blocks they would not be the ids the whole table "
                "gives: make every id text (e.g. prefix 'c': c001 for 001) and it is read "
                "by blocks"
            )
        if why.reason in ("text_value", "unparsed"):
            return (
                f"{rows}: it holds {why}; read whole it is refused for that too: correct "
                "the table (numbers only, one field a gene on every row)"
            )
        if why.reason == "counts_layer":
            return f"{rows}: {why}: a table has no layer, unset expression.counts_layer"
        return f"{rows} ({why}): write it with cells as rows and numbers only, or as a CSR .h5ad"

    def read_blocks(
        self,
        path: str | Path,
        orientation: str = "auto",
        counts_layer: str | None = None,
        rows: int | None = None,
    ):
        """An ``.h5ad``, 10x ``.h5`` or CSV / TSV expression file as blocks of rows, for
        :meth:`embed` a block at a time (``embed(block, source, whole=blocks)``), or None
        where the file is read whole by :meth:`read` instead (another format, a table
        with genes as rows; see :func:`vae.inputs.expression.row_blocks_unsupported`).

        Only ``obs`` and ``var`` are held whole: a block holds its rows of ``X``, of every
        layer and of ``.raw`` (all genes), the reading :meth:`read` with
        ``kind="expression"`` gives of them. Peak memory goes with the block, not the
        file (docs/embed.md, "Large expression files"). A table is parsed once here (its
        row names and each column's value tests) and once more as its blocks are read.

        Parameters
        ----------
        path : the expression file
        orientation, counts_layer : as :meth:`read`
        rows : cells a block (default
            :data:`vae.inputs.expression.EMBED_BLOCK_ROWS`; a wide table's blocks hold at
            most :data:`vae.inputs.expression.TABLE_BLOCK_VALUES` values)

        Returns
        -------
        :class:`vae.inputs.expression.H5adRowBlocks` (or its 10x ``.h5`` kind, or
        :class:`vae.inputs.expression.CsvRowBlocks`; iterable of AnnData blocks;
        ``n_obs``, ``obs``, ``var``) or None. Why it is None is logged and kept for
        :meth:`check_whole_read_fits` of the same file (its advice follows it).
        Iterating a table's blocks raises
        :class:`vae.inputs.expression.ExpressionInputError` where the table changed
        since this first pass.
        """
        from vae.inputs.expression import (
            CsvRowBlocks,
            ExpressionInputError,
            H5adRowBlocks,
            ReadWhole,
            TenxH5RowBlocks,
            is_table,
            row_blocks_unsupported,
        )

        self._read_whole.pop(str(path), None)
        stamp = _file_stamp(path)

        def whole(why: ReadWhole) -> None:
            # kept for check_whole_read_fits, whose refusal says what to do about it; a
            # copy: the raised one's traceback holds the reader's frames (a block of values)
            kept = ReadWhole(str(why), reason=why.reason, orientation=why.orientation)
            self._read_whole[str(path)] = (orientation, stamp, kept)

        why = row_blocks_unsupported(path, orientation)
        if why is not None:
            log.debug("%s: read whole (%s)", path, why)
            return whole(
                ReadWhole(
                    why,
                    reason="genes_as_rows" if orientation == "genes_by_cells" else "layout",
                    orientation=orientation,
                )
            )
        if is_table(path):
            if counts_layer:  # a table has no layer: read whole, which says so
                return whole(
                    ReadWhole(f"expression.counts_layer={counts_layer}", reason="counts_layer")
                )
            try:
                return CsvRowBlocks(
                    path, orientation=orientation, known_genes=self.gene_names, rows=rows
                )
            except ReadWhole as e:
                log.info("%s: read whole (%s)", path, e)
                return whole(e)
            except ExpressionInputError as e:
                raise _reader_error(e) from e
        reader = TenxH5RowBlocks if str(path).lower().endswith(".h5") else H5adRowBlocks
        try:
            return reader(
                path,
                orientation=orientation,
                known_genes=self.gene_names,
                counts_layer=counts_layer,
                rows=rows,
            )
        except ExpressionInputError as e:
            raise _reader_error(e) from e

    def _check_detector_unchanged(self) -> None:
        """Raise when the detector file is gone or changed since the study was loaded."""
        seg, was = self.segmentation_model, self._detector_stamp
        if seg is None or was is None:
            return
        now = _file_stamp(seg)
        if now == was:
            return
        what = (
            "is gone (being rewritten by stage=segment_train?)"
            if now is None
            else "changed since this study was loaded (retrained or replaced)"
        )
        raise StudyError(
            f"segmentation model={seg}: {what}; load the study again (Study.load) to read "
            f"images with the detector it has now"
        )

    def _as_adata(self, data, kind: str):
        return self.read(data, kind) if isinstance(data, str | Path) else data

    # -------------------------------------------------------- preparation
    def prepare(self, adata, source: str = "query", whole=None):
        """A query AnnData -> the model's input tensors and the gene report.

        ``adata`` may hold images (``obsm["crops"]`` (N, S, S, 3) uint8 and
        optionally ``obsm["masks"]``), expression (``X`` and/or
        ``layers["counts"]`` with gene names in ``var_names``), or both; the
        optional ``obs["has_image"]`` / ``obs["has_expression"]`` say which
        rows hold which. ``whole``: the file ``adata`` is a block of rows of (see
        :meth:`embed`). Returns ``(PairedTensors, GeneReport | None)``.
        """
        import anndata as ad

        from vae.data import PairedDataError, from_anndata

        n = adata.n_obs
        if n == 0:  # an empty folder, nothing readable, or no cell found
            rej = adata.uns.get("rejects")
            rows = rej.to_dict("records") if isinstance(rej, pd.DataFrame) else list(rej or [])
            why = f"; {len(rows)} rejected, e.g. {rows[0]}" if rows else ""
            raise StudyError(
                f"{source}: no cells to embed (an empty folder, no readable image, or no "
                f"cell found){why}"
            )
        has_img = np.zeros(n, bool)
        crops = masks = None  # no image: no crop tensors at all (ZeroRows below)
        if "crops" in adata.obsm:
            crops, masks, has_img = self._images(adata, source)
        report = None
        g = len(self.gene_names)
        x = np.zeros((n, g), np.float32)
        counts = None
        has_expr = np.zeros(n, bool)
        if adata.n_vars > 0:
            x, counts, has_expr, report = self._expression(adata, source, whole)
        if HAS_IMAGE in adata.obs:
            has_img &= _flag(adata.obs, HAS_IMAGE, source)
        if HAS_EXPRESSION in adata.obs:
            has_expr &= _flag(adata.obs, HAS_EXPRESSION, source)
        a = ad.AnnData(X=x, obs=pd.DataFrame(index=[str(i) for i in range(n)]))
        a.var_names = self.gene_names
        a.obs[HAS_IMAGE] = has_img
        a.obs[HAS_EXPRESSION] = has_expr
        if has_img.any():
            a.obsm["crops"] = crops
            a.obsm["masks"] = masks
        diameter = cell_diameters(adata.obs)  # the cells' sizes (stage=segment), a size head's
        if diameter is not None:
            a.obs[CELL_DIAMETER] = diameter
        if counts is not None:
            a.layers["counts"] = counts
        a.uns[HAS_COUNTS] = counts is not None
        try:
            if has_img.any():
                data = from_anndata(a, source, image_size=self.crop_size)
            else:
                # expression alone: zero crops held for every row took 37 KB a cell
                # (7 GiB for 200k cells); ZeroRows are read as zeros, hold nothing
                from vae.store import ZeroRows

                s = self.crop_size
                data = from_anndata(a, source, crops=ZeroRows(n, 3, s), masks=ZeroRows(n, 1, s))
        except PairedDataError as e:
            raise StudyError(str(e)) from e
        self._query_batches(data, adata.obs, adata.uns)
        return data, report

    def _query_batches(self, data, obs, uns=None) -> None:
        """A model with expression batches (``vae.batch_key``) decodes each query profile in
        its own batch when the query names it (the column the study was trained with; in a
        paired table, where stage=pair put it), as the study's own cells were scored: the
        anomaly and imputation of a query cell of a known batch read like the reference's.
        A batch the study never saw, or no such column: the average of the batches (the
        code itself never reads a batch). Each note is logged once per study object (a
        large file is prepared a block at a time)."""
        from vae.data import assign_batches, batch_column, obs_renames

        args = self.model.args
        key = getattr(args, "batch_key", None)
        if not getattr(args, "batch_names", None) or not key:
            return
        if not bool(data.has_expression.any()):
            return  # no profile to decode
        col = batch_column(key, obs_renames(uns))
        if col not in obs:
            self._note(
                logging.INFO,
                "the study decodes expression by batch (obs['%s']); the query has no such "
                "column: its profiles are decoded in the average batch",
                key,
            )
            return
        assign_batches(data, obs, key, "query", list(args.batch_names), obs_renames(uns))
        profiles = data.has_expression.numpy().astype(bool)
        unknown = (data.batch.numpy() < 0) & profiles
        if unknown.all():
            self._note(
                logging.WARNING,
                "none of the query's batches in obs['%s'] is one the study was trained on "
                "(%s): every profile is decoded in the average batch",
                col,
                ", ".join(map(str, args.batch_names)),
            )
        elif unknown.any():
            self._note(
                logging.INFO,
                "query profiles of a batch the study never saw (obs['%s']): decoded in the "
                "average batch",
                col,
            )

    def _note(self, level: int, msg: str, *args) -> None:
        """``log.log(level, msg, *args)`` the first time this study says it."""
        if (msg, args) not in self._said:
            self._said.add((msg, args))
            log.log(level, msg, *args)

    def _images(self, adata, source: str):
        from vae.inputs.pairing import resize_crop

        crops = np.asarray(adata.obsm["crops"])
        n = adata.n_obs
        if crops.ndim != 4 or crops.shape[-1] != 3 or crops.shape[1] != crops.shape[2]:
            raise StudyError(
                f"{source}: obsm['crops'] must be (N, S, S, 3) square RGB crops; got {crops.shape}"
            )
        if crops.dtype != np.uint8:
            raise StudyError(f"{source}: obsm['crops'] must be uint8; got {crops.dtype}")
        if "masks" in adata.obsm:
            masks = np.asarray(adata.obsm["masks"]).astype(bool)
            if masks.shape != crops.shape[:3]:
                raise StudyError(
                    f"{source}: obsm['masks'] must be (N, S, S) = {crops.shape[:3]}; got {masks.shape}"
                )
        else:
            log.warning(
                "%s: no obsm['masks']: each crop is taken whole as the cell (red cells and "
                "background included), which a study trained on masked cells reads badly "
                "(docs/embed.md, 'Crop folders: what the mask buys'); a folder of crop images "
                "read with kind='crops' gets the detector's masks",
                source,
            )
            masks = np.ones(crops.shape[:3], bool)
        side = crops.shape[1]
        if side < 8:
            raise StudyError(
                f"{source}: obsm['crops'] are {side} px; the model needs cells of >= 8 px"
            )
        if side not in (self.pair_crop_size, self.crop_size):
            # as stage=pair does for cells.h5ad: resize the whole crop, keep the framing
            bg = int((self.config.get("pair") or {}).get("background_value", 0))
            out = [resize_crop(c, m, self.pair_crop_size, bg) for c, m in zip(crops, masks)]
            s = self.pair_crop_size
            crops = np.stack([o[0] for o in out]) if out else np.zeros((0, s, s, 3), np.uint8)
            masks = np.stack([o[1] for o in out]) if out else np.zeros((0, s, s), bool)
        has = masks.reshape(n, -1).any(1)
        return crops, masks, has

    def missing_genes(self, adata, whole=None) -> list[str] | None:
        """The model's genes ``adata`` lacks (as :meth:`embed` reads its genes:
        :meth:`expression_var_names`), or None where the check does not apply: an input
        without genes (images only) or one with none of the model's (:meth:`prepare` names
        both gene lists then). What ``Study.embed(max_missing_genes=)`` and
        ``embed.max_missing_genes`` compare with the model's gene count."""
        if not adata.n_vars or not self.gene_names:
            return None
        cols = self.gene_columns(self.expression_var_names(adata, whole))
        missing = [g for g, c in zip(self.gene_names, cols) if c < 0]
        return missing if len(missing) < len(cols) else None

    def gene_columns(self, var_names) -> np.ndarray:
        """(n_model_genes,) column of each model gene in ``var_names``, -1 when missing.

        Genes are matched by name: exactly, else ignoring case; order is irrelevant and
        extra genes are ignored.

        Parameters
        ----------
        var_names : sequence of str, length n_input_genes
            The input's gene names (e.g. ``adata.var_names``), expected unique (a
            query's are made unique, ``NAME-1`` ..., before they are matched); of a
            name repeated here the exact match takes its last column, the
            case-insensitive match its first.

        Returns
        -------
        numpy.ndarray
            (n_model_genes,) int (``np.int_``), one entry per :attr:`gene_names` in
            its order: the gene's column index into ``var_names``, or -1 where the
            input lacks it.
        """
        names = [str(v) for v in var_names]
        pos = {g: i for i, g in enumerate(names)}
        low: dict[str, int] = {}
        for i, g in enumerate(names):
            low.setdefault(g.lower(), i)
        return np.array([pos.get(g, low.get(g.lower(), -1)) for g in self.gene_names], int)

    def _expression(self, adata, source: str, whole=None):
        """(n, G) log1p-normalised ``x``, (n, G) ``counts`` or None, (n,) ``has_expr`` and
        the :class:`GeneReport` of ``adata``'s expression.

        ``whole``: the file ``adata`` is a block of rows of
        (:class:`vae.inputs.expression.H5adRowBlocks`); what is decided over the whole
        matrix (counts or log-normalised values, which matrix holds the counts, the
        errors and warnings) is then decided once, on the whole file, as for the file read
        in memory (:meth:`_expression_plan`), and only the rows are computed here.
        """
        if whole is None:
            from vae.inputs.expression import InMemoryFacts

            plan = self._expression_plan(adata, source, InMemoryFacts(adata))
        else:
            plan = whole.plans.get(source)
            if plan is None:  # the first block: the file's plan (and its log lines) once
                plan = whole.plans[source] = self._expression_plan(adata, source, whole)
        return self._expression_rows(adata, plan)

    def _expression_plan(self, adata, source: str, facts) -> _ExpressionPlan:
        """How :meth:`_expression` reads a query: its genes, which matrix holds the counts
        and whether values are counts or log-normalised, from ``adata``'s names and layers
        and ``facts.stats(key, cols)`` (:class:`vae.inputs.expression.ValueStats` of a
        whole matrix: ``X``, ``.raw``, a layer); raises what the values refuse."""
        import anndata as ad

        from vae.inputs.expression import RAW_LIBRARY, make_gene_names_unique

        layer = "counts" in adata.layers
        from_raw = not layer and self._counts_in_raw(adata, facts)
        if from_raw:
            # the counts are the data the model was trained on (its library covariate,
            # the normalisation over all genes): reading X alone embedded such a file as
            # log values with the library taken from expm1(X), shifting its latent
            log.info(
                "%s: raw counts from .raw.X (%d genes; X holds no counts), normalised as "
                "stage=expression normalises counts",
                source,
                adata.raw.n_vars,
            )
            names = pd.Index([str(v) for v in adata.raw.var_names])
        else:
            names = pd.Index([str(v) for v in adata.var_names])
        repeated: list[str] = []
        if names.duplicated().any():
            # 10x features.tsv names two Ensembl ids by one symbol: repaired as
            # stage=expression repairs them (same function, same warning), so a model
            # gene matches its first occurrence, as in training; on the names only
            repeated = [str(g) for g in names[names.duplicated()].unique()]
            only = ad.AnnData(var=pd.DataFrame(index=names))
            make_gene_names_unique(only, source)
            names = pd.Index([str(v) for v in only.var_names])
        genes = self.gene_names
        idx = self.gene_columns(names)
        ok = idx >= 0
        if not ok.any():
            raise StudyError(
                f"{source}: var_names: none of the model's {len(genes)} genes found "
                f"(model: {genes[:5]}...; input: {list(names[:5])}...)"
            )
        cols = idx[ok]  # only the matched columns are made dense (a query may hold 30k genes)
        xkey = ".raw" if from_raw else "X"
        x_log = x_counts = False
        if layer:
            cv = facts.stats("counts")
            if cv.nonfinite or cv.negative:
                raise StudyError(f"{source}: layers['counts'] holds negative or non-finite counts")
            if not cv.whole:
                # stage=expression refuses the same: normalised values under the counts' name
                raise StudyError(
                    f"{source}: layers['counts'] holds non-integer values (normalised or "
                    "corrected?): give raw integer counts there, or drop the layer"
                )
            values = "counts"
            xv = facts.stats("X")
            if xv.size and xv.whole and xv.top > 0:
                # X holds counts too (e.g. the simulator's expression_raw.h5ad), not the
                # pipeline's log-normalised values: normalised below, as stage=expression does
                pass
            elif why := _lognorm_problem(xv.negative, xv.top if xv.size else 0.0):
                # scaled / CPM X beside raw counts (scanpy's usual layout): the counts are
                # the data, normalised below as the training data were
                log.warning("%s: %s; normalising layers['counts'] instead", source, why)
            else:
                x_log = True  # the pipeline's log-normalised X, used as given
                # the counts were checked finite and >= 0 above; a log-normalised X was not
                if _nonfinite_in(facts, "X", cols):
                    raise StudyError(f"{source}: X holds non-finite values")
        else:
            nonfinite = _nonfinite_in(facts, xkey, cols)
            if nonfinite > 0:
                # said first: NaN fails the counts test and would read as "not log1p"
                raise StudyError(
                    f"{source}: X holds {nonfinite} NaN or infinite values in the model's genes"
                )
            xv = facts.stats(xkey)
            if xv.whole:
                values, x_counts = "counts", True
            else:
                why = _lognorm_problem(xv.negative, xv.top if xv.size else 0.0)
                if why:
                    raise StudyError(f"{source}: {why}")
                values = "lognorm"
        want_counts = bool(self.meta.get("has_counts", self.model.args.has_counts))
        if want_counts and not (layer or x_counts):
            # integer layers besides X and layers['counts'] (counts_elsewhere; .raw read
            # above when it holds X's counts; none once X is taken from .raw)
            found = (
                []
                if from_raw
                else [k for k in adata.layers if k != "counts" and facts.stats(k).counts]
            )
            hint = (
                f"; layers[{found[0]!r}] holds integer values: if these are the raw counts, "
                f"set expression.counts_layer={found[0]} (Study.read: counts_layer=...)"
                if found
                else "; give raw counts in layers['counts'] (or set expression.counts_layer "
                "to the layer, or .raw, that holds them)"
            )
            log.warning(
                "%s: no raw counts; the model was trained on counts, its library covariate "
                "is taken from expm1(X)%s",
                source,
                hint,
            )
        if not ok.all():
            # said here too, not only by stage=embed (which refuses above
            # embed.max_missing_genes): a cell's code leans on the genes it has
            missing = [genes[i] for i in np.flatnonzero(~ok)]
            log.warning(
                "%s: %d of the model's %d genes missing (%.0f %%), filled by impute=%s: %s%s",
                source,
                len(missing),
                len(genes),
                100.0 * len(missing) / len(genes),
                self.impute,
                ", ".join(missing[:10]),
                " ..." if len(missing) > 10 else "",
            )
        return _ExpressionPlan(
            from_raw=from_raw,
            names=names,
            repeated=repeated,
            ok=ok,
            cols=cols,
            layer=layer,
            x_log=x_log,
            x_counts=x_counts,
            values=values,
            want_counts=want_counts,
            raw_library=layer and RAW_LIBRARY in adata.obs,
        )

    def _expression_rows(self, adata, plan: _ExpressionPlan):
        """:meth:`_expression` of ``adata``'s rows as ``plan`` reads them (row by row:
        a block of a file gives its rows of the whole file's result)."""
        import anndata as ad

        from vae.inputs.expression import RAW_LIBRARY

        if plan.from_raw:
            raw = adata.raw
            adata = ad.AnnData(X=raw.X, obs=adata.obs, var=pd.DataFrame(index=raw.var_names))
        cols, ok = plan.cols, plan.ok

        def sub(m) -> np.ndarray:
            return _dense(m[:, cols]).astype(np.float64)

        def rowsum(m) -> np.ndarray:
            return np.asarray(m.sum(1), dtype=np.float64).ravel()

        if plan.layer:
            full = adata.layers["counts"]
            raw, total = sub(full), rowsum(full)
            if plan.raw_library:  # counts_layer=.raw: the library over all of .raw
                total = adata.obs[RAW_LIBRARY].to_numpy(np.float64)
            logx = sub(adata.X).astype(np.float32) if plan.x_log else None
        else:
            xs = sub(adata.X)  # the model's genes, dense: read once
            if plan.x_counts:
                raw, total, logx = xs, rowsum(adata.X), None
            else:
                raw, logx = None, xs.astype(np.float32)
                total = np.expm1(logx).sum(1)
        has_expr = total > 0
        target = float((self.config.get("expression") or {}).get("target_sum") or 1e4)
        normalised_here = logx is None
        if logx is None:
            # as stage=expression: normalize_total over all genes of the input, then log1p
            logx = np.log1p(raw / np.maximum(total, 1e-12)[:, None] * target).astype(np.float32)
        genes = self.gene_names
        n, g = adata.n_obs, len(genes)
        x = np.zeros((n, g), np.float32)
        x[:, ok] = logx
        counts = None
        if raw is not None and plan.want_counts:
            counts = np.zeros((n, g), np.float32)
            counts[:, ok] = raw
        if not ok.all():
            mean_log, prop = self.reference_expression()
            x[:, ~ok] = mean_log[~ok]
            if counts is not None:
                # library of the present genes scaled up by their reference share
                share = max(float(prop[ok].sum()), 1e-6)
                lib = counts[:, ok].sum(1, keepdims=True) / share
                counts[:, ~ok] = lib * prop[~ok][None, :]
            if self.impute == "model":
                # the library is corrected only where this function normalised the counts
                own = raw if normalised_here else None
                self._impute(x, counts, ok, has_expr, own, total, target)
        x[~has_expr] = 0
        if counts is not None:
            counts[~has_expr] = 0
        rep = GeneReport(
            n_model=g,
            matched=int(ok.sum()),
            missing=[genes[i] for i in np.flatnonzero(~ok)],
            n_extra=int(len(plan.names) - ok.sum()),
            repeated=plan.repeated,
            values=plan.values,
            impute=self.impute,
            imputed=x[:, ~ok].copy() if not ok.all() else None,
        )
        return x, counts, has_expr, rep

    def expression_var_names(self, adata, whole=None) -> pd.Index:
        """Gene names :meth:`embed` reads from ``adata``: ``.raw``'s where ``X`` holds no
        counts and ``.raw.X`` does (see :meth:`_counts_in_raw`), else ``X``'s.

        What a check of the model's genes against an input must count: a scanpy file
        with a few highly variable genes in ``X`` and every gene in ``.raw`` is embedded
        from ``.raw``. ``whole``: the file ``adata`` is a block of (as :meth:`embed`).

        Parameters
        ----------
        adata : anndata.AnnData
            The query (in memory, or a block of rows of a file).
        whole : optional
            Facts of the whole file ``adata`` is a block of (whether its ``X`` /
            ``.raw.X`` hold counts), as :meth:`embed` passes them; None: read from
            ``adata`` itself.

        Returns
        -------
        pandas.Index
            (n_vars,) str gene names: ``adata.raw.var_names`` where the counts are read
            from ``.raw``, else ``adata.var_names``.
        """
        from vae.inputs.expression import InMemoryFacts

        facts = whole if whole is not None else InMemoryFacts(adata)
        if "counts" not in adata.layers and self._counts_in_raw(adata, facts):
            return pd.Index([str(v) for v in adata.raw.var_names])
        return pd.Index([str(v) for v in adata.var_names])

    @staticmethod
    def _counts_in_raw(adata, facts=None) -> bool:
        """Whether ``.raw.X`` holds the counts of ``X``: ``X`` is not counts, ``.raw.X``
        is (stage=expression's test), and ``.raw`` has every gene of ``X`` and its cells.

        The counts are the data the model was trained on (scanpy's usual layout:
        log-normalised ``X``, counts in ``.raw.X``). ``facts``: the whole matrices'
        :class:`vae.inputs.expression.ValueStats` (default: ``adata``'s own).
        """
        from vae.inputs.expression import InMemoryFacts

        raw = adata.raw
        if raw is None or raw.n_obs != adata.n_obs or adata.n_vars == 0:
            return False
        if not pd.Index(adata.var_names).isin(raw.var_names).all():
            return False  # not the same genes: not known to be the counts of X
        facts = facts if facts is not None else InMemoryFacts(adata)
        xv = facts.stats("X")
        if xv.size and xv.whole:
            return False  # X holds the counts itself
        return facts.stats(".raw").counts  # stage=expression's test of .raw (counts_elsewhere)

    def _impute(
        self,
        x: np.ndarray,
        counts: np.ndarray | None,
        observed: np.ndarray,
        rows: np.ndarray,
        raw: np.ndarray | None = None,
        total: np.ndarray | None = None,
        target: float = 1e4,
    ) -> None:
        """Fill the missing genes of ``rows`` in place from each cell's observed genes.

        Parameters
        ----------
        x : (n, G) log1p-normalised input, missing genes pre-filled (reference mean)
        counts : (n, G) raw counts for the model (missing genes pre-filled) or None
        observed : (G,) bool, genes the query holds
        rows : (n,) bool, cells with expression
        raw : (n, observed.sum()) the query's counts of the observed genes, or None
            (log-normalised input: its normalisation is taken as given)
        total : (n,) the query's library (all its genes) that normalised ``x``
        target : normalisation target sum of the study

        A fixed-point iteration: the encoder was trained on complete profiles, so
        a gene-masked input it never saw is avoided; instead the missing genes
        are set to the model's reconstruction of the cell, ``impute_iterations``
        times (each pass the latent moves toward what the observed genes say).
        With raw counts, the counts the missing genes would have added to the
        library are added back to it, so the observed genes are normalised as
        if every gene had been measured (a file lacking genes otherwise inflates
        every observed value by 1 / (share of the observed genes)).
        """
        import torch

        miss = ~observed
        idx = np.flatnonzero(rows)
        dev = self.device
        for s in range(0, idx.size, 512):
            r = idx[s : s + 512]
            xb = x[r]
            cb = counts[r] if counts is not None else None
            rb = raw[r] if raw is not None else None
            for _ in range(self.impute_iterations):
                lib = cb.sum(1) if cb is not None else np.expm1(xb).sum(1)
                with torch.inference_mode():
                    log_lib = torch.log(torch.from_numpy(lib.astype(np.float32)).clamp_min(1.0))
                    post = self.model.encode(
                        None, torch.from_numpy(xb).to(dev), log_library=log_lib.to(dev)
                    )
                    d = self.model.decode(post.expression[0], use_image=False)
                pred = d.expression_log.float().cpu().numpy()
                sc = getattr(d, "expression_scale", None)
                sc = np.expm1(pred) if sc is None else sc.float().cpu().numpy()
                sc = sc / np.maximum(sc.sum(1, keepdims=True), 1e-12)
                # the model-gene library the observed genes imply, given the cell's proportions
                share = np.maximum(sc[:, observed].sum(1, keepdims=True), 1e-6)
                if rb is None:
                    xb[:, miss] = pred[:, miss]
                    if cb is not None:
                        cb[:, miss] = cb[:, observed].sum(1, keepdims=True) / share * sc[:, miss]
                    continue
                c_miss = rb.sum(1, keepdims=True) / share * sc[:, miss]
                tot = np.maximum(total[r][:, None] + c_miss.sum(1, keepdims=True), 1e-12)
                xb[:, observed] = np.log1p(rb / tot * target)
                xb[:, miss] = np.log1p(c_miss / tot * target)
                if cb is not None:
                    cb[:, miss] = c_miss
            x[r] = xb
            if cb is not None:
                counts[r] = cb

    def reference_expression(self) -> tuple[np.ndarray, np.ndarray]:
        """(G,) mean log-expression and (G,) mean proportion of each model gene.

        Decoded from the reference latent (``X_vae_full`` of rows with
        expression), so nothing but ``model.pt`` and ``latent.h5ad`` is needed.

        Returns
        -------
        mean_log : numpy.ndarray
            (G,) float32, G = ``len(gene_names)``: the mean over the reference cells
            with expression (all cells where none is marked) of the decoded
            expression, on the model's log1p-normalised scale (that of the training
            data's ``X``, ``log1p(normalize_total(counts, expression.target_sum))``).
        mean_prop : numpy.ndarray
            (G,) float32, sums to 1: the mean share of a cell's counts each gene takes
            (the decoder's NB/ZINB proportions; for a Gaussian model ``expm1`` of its
            decoded log-expression, each cell normalised to sum 1).

        Computed once per reference and cached (a new :attr:`reference` clears it).
        """
        import torch

        if self._ref_expr is None:
            ref = self.reference
            z = np.asarray(ref.obsm.get("X_vae_full", ref.obsm["X_vae"]), np.float32)
            with_expr = (
                _flag(ref.obs, HAS_EXPRESSION, str(self.latent_path))
                if HAS_EXPRESSION in ref.obs
                else None
            )
            if with_expr is not None and with_expr.any():
                z = z[with_expr]
            logs, props = [], []
            with torch.inference_mode():
                for i in range(0, len(z), 512):
                    d = self.model.decode(torch.from_numpy(z[i : i + 512]).to(self.device))
                    logs.append(d.expression_log.float().cpu().numpy())
                    sc = getattr(d, "expression_scale", None)
                    if sc is None:
                        sc = torch.expm1(d.expression_log.float())
                        sc = sc / sc.sum(1, keepdim=True).clamp_min(1e-12)
                    props.append(sc.float().cpu().numpy())
            mp = np.concatenate(props).mean(0)
            self._ref_expr = (np.concatenate(logs).mean(0), mp / mp.sum())
        return self._ref_expr

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
        self, z: np.ndarray, batch_size: int = 256, render: bool = True, pose: str = "as_given"
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

        Returns :class:`vae.analysis.traverse.DecodedArrays` (``images``
        (n, S, S, 3) in [0, 1], ``masks``, ``expression`` (n, G) log1p-normalised
        in the order of :attr:`gene_names`; ``diameter`` (n,) px of the detector's
        working frame for a model trained with ``vae.size_weight``, else None);
        ``.cells()`` draws the decoded cells through their decoded masks, as every
        figure does.
        """
        from vae.analysis.traverse import decode

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
        if pose == "training":
            z = self.training_poses(z, batch_size).astype(np.float32)
        return decode(self.model, z, batch_size, self.device, render=render)

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

    def seen_images(self, names) -> np.ndarray:
        """(n,) bool: whether each image file name is one the study's reference holds a
        crop of (matched by stem: ``x.jpg`` vs the reference's ``image_ref``, detection
        suffix ``_d000`` and folders dropped). A cell so marked is not new to the model,
        which trained on it (e.g. TXL-PBC val smears, which ``+preset=real`` segments
        into the study). Stems shorter than 6 characters (``001``) are never matched:
        too many data sets reuse them.

        Parameters
        ----------
        names : sequence of str, length n
            Image file names or paths (folders and extension are dropped).

        Returns
        -------
        numpy.ndarray
            (n,) bool, True where the reference holds a crop of that file; all False
            for a reference without ``obs["image_ref"]``.
        """
        import re

        ref = self.reference.obs
        if "image_ref" not in ref:
            return np.zeros(len(names), bool)

        def stem(x: str) -> str:
            base = re.sub(r"\.[A-Za-z0-9]{2,5}$", "", str(x).replace("\\", "/").rsplit("/", 1)[-1])
            return re.sub(r"_d\d+$", "", base)

        known = {stem(x) for x in ref["image_ref"].astype(str) if x}
        return np.array([len(stem(n)) >= 6 and stem(n) in known for n in names], bool)

    def seen_expression(self, ids) -> np.ndarray:
        """(n,) bool: whether each expression cell id (a query's ``obs_names``) is one the
        study's reference holds the profile of (``latent.h5ad``'s ``expression_ref`` of
        its rows with expression; a latent without that column: their ``obs_names``). A
        cell so marked is not new to the model if it is that cell (an audit embedded 400
        of the study's own Paul15 cells as "new"). Matched by id only: 10x barcodes
        repeat between runs, so a few matches among many cells can be chance.

        Parameters
        ----------
        ids : sequence, length n
            Cell ids, compared as ``str`` exactly (case and all).

        Returns
        -------
        numpy.ndarray
            (n,) bool, True where the id is one of the reference's expression cells.
        """
        obs = self.reference.obs
        rows = (
            _flag(obs, HAS_EXPRESSION, str(self.latent_path))
            if HAS_EXPRESSION in obs
            else np.ones(len(obs), bool)
        )
        refs = obs["expression_ref"] if "expression_ref" in obs else pd.Series(obs.index)
        refs = refs.astype(object).to_numpy()[rows]
        known = {str(x) for x in refs if isinstance(x, str) and x}
        return np.array([str(i) in known for i in ids], bool)

    def seen_cells(self, q) -> dict[str, np.ndarray]:
        """Which cells of an embedded query (:meth:`embed`'s AnnData, or its obs) the
        study's reference already holds: ``{"images": ..., "expression": ...}``, (n,)
        bool each, by name only. ``images``: a cell with an image whose file is named like
        one the study holds a crop of (:meth:`seen_images`); ``expression``: a cell with
        expression whose id is one of the study's profiles (:meth:`seen_expression`).

        Each side is named as ``latent.h5ad`` names it: a query that carries the columns
        (the study's own ``paired.h5ad``, or a ``latent.h5ad``: rows ``r000000``, the crop
        in ``image_ref``, the cell id in ``expression_ref``) is read by them, a row where
        they are empty and a query without them by ``obs["image"]`` (``cells.h5ad``, a
        folder read by :meth:`read`) and ``obs_names`` (an expression file). An
        ``image_ref`` equal to one of the reference's counts whatever its stem's length.

        Parameters
        ----------
        q : anndata.AnnData or pandas.DataFrame
            The query, or its ``obs`` (n rows). Its ``vae_modality`` column, where
            present, limits each side to the cells with that modality (``image`` /
            ``expression`` / ``both``); without it every row is read for both.

        Returns
        -------
        dict of str to numpy.ndarray
            ``{"images": (n,) bool, "expression": (n,) bool}``, in the rows' order.
        """
        obs = getattr(q, "obs", q)
        mod = (
            obs["vae_modality"].astype(str).to_numpy()
            if "vae_modality" in obs
            else np.full(len(obs), "both")
        )
        images = np.zeros(len(obs), bool)
        names = _names_by(obs, "image_ref", obs["image"] if "image" in obs else None)
        if names is not None:
            has = np.isin(mod, ("image", "both")) & (names != "")
            images[has] = self.seen_images(names[has])
            ref = self.reference.obs
            if "image_ref" in obs and "image_ref" in ref:
                # an image_ref the reference holds as it is: the study's crop whatever its
                # stem (segmentation_wbc/dataset1/001, too short for a file name's match)
                known = set(ref["image_ref"].dropna().astype(str))
                images |= has & np.isin(names, list(known))
        expression = np.zeros(len(obs), bool)
        ids = _names_by(obs, "expression_ref", obs.index)
        has = np.isin(mod, ("expression", "both")) & (ids != "")
        expression[has] = self.seen_expression(ids[has])
        return {"images": images, "expression": expression}

    def warn_seen(self, q, source: str = "query", seen=None) -> dict[str, int]:
        """Log a warning for the cells of ``q`` the study's reference already holds
        (:meth:`seen_cells`, or ``seen`` when given; if they are those cells their calls
        are not those of new cells: a review embedded TXL-PBC val smears, which
        ``+preset=real`` trains on, an audit 400 of the study's own Paul15 cells) and
        return the counts, ``{"images": n, "expression": n}``: one line per kind, with
        ``q``'s totals (the stage passes the obs of every block of an input at once)."""
        seen = self.seen_cells(q) if seen is None else seen
        obs = getattr(q, "obs", q)
        n = len(obs)
        if seen["images"].any():
            names = _names_by(obs, "image_ref", obs["image"] if "image" in obs else None)
            log.warning(
                "%s: %d of the %d embedded cells come from image files named like images the "
                "study's reference holds (its latent.h5ad image_ref, e.g. %s; matched by file "
                "name only): if they are those images, their calls are not those of new cells",
                source,
                int(seen["images"].sum()),
                n,
                names[seen["images"]][0],
            )
        if seen["expression"].any():
            log.warning(
                "%s: %d of the %d embedded cells have the cell ids of expression profiles "
                "the study's reference holds (its latent.h5ad expression_ref, e.g. %s; "
                "matched by id only, and 10x barcodes repeat between runs): if they are "
                "those cells, their calls are not those of new cells",
                source,
                int(seen["expression"].sum()),
                n,
                _names_by(obs, "expression_ref", obs.index)[seen["expression"]][0],
            )
        return {k: int(v.sum()) for k, v in seen.items()}

    def warn_atypical(self, q, source: str = "query") -> float | None:
        """Log a warning where more than :data:`ATYPICAL_MOSTLY` of the cells of ``q``
        (an embedded query, or its obs) are atypical (``vae_atypical``: called
        unclassified), with the share and the usual causes, whatever the cause: that
        many cells unlike every cell the study saw says more of the inputs than of the
        patient (an unmasked study read 24 of 24 detector-masked cells so, without a
        word in the log). The stage passes the obs of every block of an input at once.

        Returns
        -------
        The share of atypical cells (None: ``q`` has no cell or no ``vae_atypical``).
        """
        obs = getattr(q, "obs", q)
        if not len(obs) or "vae_atypical" not in obs:
            return None
        atypical = obs["vae_atypical"].to_numpy(dtype=bool)
        share = float(atypical.mean())
        if share <= ATYPICAL_MOSTLY:
            return share
        causes = []
        mod = obs["vae_modality"].astype(str) if "vae_modality" in obs else None
        if mod is None or mod.isin(["image", "both"]).any():
            crops = self.training_crops()
            study = f"; the study was trained on {crops.what}" if crops.kind else ""
            causes.append(
                "cells cut unlike the study's training crops (masked where it saw unmasked "
                f"squares or the reverse: crop_masks / embed.crop_masks{study})"
            )
            causes.append("images of another stain or magnification than the study's")
        if mod is None or mod.isin(["expression", "both"]).any():
            causes.append("profiles of another platform, species or normalisation")
        causes.append("cells of kinds the study never saw")
        log.warning(
            "%s: %d of %d cells (%.0f %%) are atypical (anomaly_score above the study's "
            "threshold from its own held-out cells) and called unclassified: more than "
            "%.0f %% says more of the inputs than of the sample. Usual causes: %s",
            source,
            int(atypical.sum()),
            len(obs),
            100 * share,
            100 * ATYPICAL_MOSTLY,
            "; ".join(causes),
        )
        return share

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

    # --------------------------------------------------------------- anomaly
    def anomaly_scores(self, data, latents=None, batch_size: int = 256) -> pd.DataFrame:
        """Atypical-cell scores of prepared rows against the study's training rows.

        The score functions of ``stage=train`` (:mod:`vae.analysis.anomaly`): per
        modality the reconstruction cost, the kNN distance and the class distance of
        the unimodal mean, each a robust z against the training rows of
        ``latent.h5ad``, and their mean ``anomaly_score``.

        Parameters
        ----------
        data : prepared tensors (:meth:`prepare`)
        latents : :class:`vae.infer.Latents` of ``data`` when already encoded

        Returns
        -------
        DataFrame, one row per row of ``data``, columns
        ``vae.inputs.schema.ANOMALY_COLUMNS``' values (NaN where a row lacks the
        modality).
        """
        from vae.analysis import anomaly as A
        from vae.infer import reconstruction_nll

        ns, npv = self.n_shared, int(self.meta["n_private"])
        ref = self._anomaly_reference()
        lat = latents if latents is not None else self.encode(data, batch_size)
        rec = reconstruction_nll(self.model, data, self.device, batch_size)
        z = {
            "image": A.modality_latent(lat.image, ns, npv, "image"),
            "expression": A.modality_latent(lat.expression, ns, npv, "expression"),
        }
        recs = {"image": rec.image, "expression": rec.expression}
        return A.score_rows(recs, z, ref)

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
            if rows.size:
                z = out.obsm["X_vae"][rows] if lm == "joint" else codes[lm][rows]
                lab = self.transfer_labels(z, modality=lm)
                label[rows] = lab["label"].to_numpy().astype(str)
                conf[rows] = lab["confidence"].to_numpy()
        # the study's classes as categories whichever were called: one colour per label
        # in the study's UMAP and the query's ("" where no code: NaN when written);
        # vae_label's and vae_call's alike, so the two compare (pandas refuses otherwise)
        classes = [*self.labels, UNCLASSIFIED]
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


def _names_by(obs, column: str, fallback) -> np.ndarray | None:
    """(n,) str: ``obs[column]`` where it holds a name, else ``fallback``'s (a column
    or index of the same rows; None: ``""``); None where neither exists. The names
    :meth:`Study.seen_cells` matches a query by (``image_ref`` / ``expression_ref``:
    as ``latent.h5ad`` names the reference's cells)."""
    if column not in obs and fallback is None:
        return None
    out = np.full(len(obs), "", dtype=object)
    if fallback is not None:
        fb = pd.Series(np.asarray(fallback, dtype=object))
        out[:] = fb.where(fb.notna(), "").astype(str).to_numpy()
    if column in obs:
        col = pd.Series(obs[column].to_numpy(dtype=object))
        ok = (col.notna() & (col.astype(str) != "")).to_numpy()
        out[ok] = col[ok].astype(str).to_numpy()
    return out.astype(str)


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
