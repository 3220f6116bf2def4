"""Keys of ``expression.h5ad`` and ``paired.h5ad`` and the label vocabulary; one owner each.

Every module that writes or reads these artifacts imports the names from here
(see docs/artifacts.md): the pairing writes them, :mod:`vae.data` reads them,
the stages count them, the analyses colour by them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from segmentation.schema import CELL_DIAMETER, TRUTH_FIELDS  # noqa: F401 - re-exported

# paired.h5ad obs: which modality a row has, and whether its crop has a true mask
HAS_IMAGE = "has_image"
HAS_EXPRESSION = "has_expression"
HAS_MASK = "has_mask"
# a crop's label before pair.label_corrections (obs of paired.h5ad; absent without them)
LABEL_ORIGINAL = "image_label_original"
# expression.h5ad / paired.h5ad uns: layers["counts"] holds raw counts
HAS_COUNTS = "has_counts"
# paired.h5ad uns: JSON {expression obs column: its name in paired obs} of the columns
# stage=pair renamed (a name the paired table already uses: specimen -> expression_specimen)
OBS_RENAMED = "expression_obs_renamed"
# paired.h5ad obsm: (N, S, S) uint8 granule centres per pixel, found by stage=pair on each
# crop at the resolution it was cut (pair.granule_centres); the granule layer's targets
GRANULE_CENTRES = "granule_centres"
# paired.h5ad obsm: (N, 3) float32 each crop's mean granule optical density (R, G, B) at
# those centres, measured at the same resolution (NaN: no granule); the layer's stain target
GRANULE_OD = "granule_od"
# paired.h5ad obs: each crop's image maturation within its class, lobes + (1 - nucleus
# solidity) (vae.lobes.nucleus_segmentation), written with pair.within_label=maturation
NUCLEUS_SEGMENTATION = "nucleus_segmentation"


def cell_diameters(frame: pd.DataFrame) -> np.ndarray | None:
    """The cells' sizes, read the one way every reader of ``obs['cell_diameter']`` uses.

    Parameters
    ----------
    frame : DataFrame
        ``cells.h5ad`` / ``paired.h5ad`` obs, or a query table.

    Returns
    -------
    ndarray of float32, shape (N,), or None
        Diameter in working px (``stage=segment``); NaN where the value is missing,
        not a number or not positive. None when the column is absent.
    """
    if CELL_DIAMETER not in frame:
        return None
    d = pd.to_numeric(frame[CELL_DIAMETER], errors="coerce").to_numpy(dtype=np.float64)
    return np.where(np.isfinite(d) & (d > 0), d, np.nan).astype(np.float32)


# obs["label"]: the cell class of a row; rows whose class is not known hold one of these
# (NaN read through ``astype(str)`` is "nan"); vae.data codes them all as UNKNOWN_LABEL
UNKNOWN_LABEL = "NA"
UNKNOWN_LABELS = ("", "nan", "None", UNKNOWN_LABEL)


def label_typos(names, labels, cutoff: float = 0.9) -> dict[str, str]:
    """Names that are not labels but a near miss of one: name -> the label it misses.

    A typo ("Neutrophil", "neutrophil" for "Neutrophils") in a setting that names classes
    would silently drop that class, where a name unlike every label is a class the data
    simply lack. Case is no difference; near = difflib ratio >= ``cutoff``.

    Parameters
    ----------
    names : the class names a setting gives
    labels : the labels the data hold
    """
    import difflib

    have = {str(x) for x in labels}
    lower = {x.lower(): x for x in sorted(have)}
    out = {}
    for c in map(str, names):
        if c not in have:
            near = difflib.get_close_matches(c.lower(), list(lower), n=1, cutoff=cutoff)
            if near:
                out[c] = lower[near[0]]
    return out


def known_labels(labels) -> np.ndarray:
    """Which rows name a class.

    Parameters
    ----------
    labels : array-like, shape (N,)
        ``obs['label']`` values (strings, categoricals, NaN / None allowed).

    Returns
    -------
    ndarray of bool, shape (N,)
        False where the value is missing or one of :data:`UNKNOWN_LABELS`.
    """
    lab = np.asarray(labels, dtype=object)
    return ~(pd.isna(lab) | np.isin(lab.astype(str), UNKNOWN_LABELS))


def batch_text(values) -> np.ndarray:
    """Each row's batch (patient, run, site) as text, None where unknown.

    The one reading of a batch column, shared by ``stage=expression`` (HVGs and ComBat
    per batch) and the VAE (``vae.batch_key``), so both group cells the same way: a
    whole-number float is written as an integer (a patient id 7 read back as 7.0 from a
    column with gaps is still batch ``"7"``) and text is stripped (``"7 "`` is ``"7"``).

    Parameters
    ----------
    values : array-like, shape (N,)
        A batch column's values (numbers, strings, categoricals; NaN / None / "" /
        "nan" are unknown, as for labels: :func:`known_labels`).

    Returns
    -------
    ndarray of object, shape (N,)
        str per row, None where unknown.
    """
    v = np.asarray(values, dtype=object)

    def text(x) -> str:
        if isinstance(x, float | np.floating) and float(x).is_integer():
            return str(int(x))
        return str(x).strip()

    # stripped first, so a blank "  " is unknown like ""
    out = np.array([None if pd.isna(x) else text(x) for x in v], dtype=object)
    out[~known_labels(out)] = None
    return out


# simulator ground truth carried from crops / expression obs into paired obs
TRUTH_COLUMNS = TRUTH_FIELDS

# the neutrophil lineage, earliest to latest: the simulator's stages and the
# default path of stage=traverse (analysis.path_classes)
MATURATION_ORDER = (
    "myeloblast",
    "promyelocyte",
    "myelocyte",
    "metamyelocyte",
    "band",
    "segmented_neutrophil",
)

# other names of the lineage's stages (lower case, "_" for spaces and dashes): the
# abbreviations of haematology (PMY, MY, MMY; the Munich AML set's MYB, PMO, MYO, MMZ,
# NGB, NGS; PBC's BNE, SNE) and a mature "neutrophil", which a study labelled by stage
# names its segmented neutrophils by (the figures colour it so too)
STAGE_ALIASES: dict[str, str] = {
    "mb": "myeloblast",
    "myb": "myeloblast",
    "pmy": "promyelocyte",
    "pmo": "promyelocyte",
    "my": "myelocyte",
    "myo": "myelocyte",
    "mmy": "metamyelocyte",
    "mmz": "metamyelocyte",
    "band_neutrophil": "band",
    "band_cell": "band",
    "bne": "band",
    "ngb": "band",
    "segmented": "segmented_neutrophil",
    "seg": "segmented_neutrophil",
    "sne": "segmented_neutrophil",
    "ngs": "segmented_neutrophil",
    "neutrophil": "segmented_neutrophil",
}


def stage_name(label: object) -> str | None:
    """The :data:`MATURATION_ORDER` stage a label names, or None.

    Case, spaces, dashes and a plural ``s`` do not matter ("Segmented neutrophils",
    "band-neutrophil"), nor the aliases of :data:`STAGE_ALIASES` ("PMY", "NGS").
    """
    k = str(label).strip().lower().replace(" ", "_").replace("-", "_")
    for key in (k, k[:-1] if k.endswith("s") else None):
        if key in MATURATION_ORDER:
            return key
        if key in STAGE_ALIASES:
            return STAGE_ALIASES[key]
    return None


def say_class_labels(
    logger, setting: str, taken: dict[str, str], ambiguous: dict[str, list[str]]
) -> None:
    """Log what :func:`class_labels` resolved: each name taken as a label through its
    stage (INFO), each default stage left out because several labels name it (WARNING).
    One wording for ``vae.maturation_classes`` and ``analysis.path_classes``."""
    for c, lab in taken.items():
        logger.info(
            "%s: %r taken as the label %r (the same stage, %s)", setting, c, lab, stage_name(c)
        )
    for c, cands in ambiguous.items():
        logger.warning(
            "%s (default): %s left out: %d labels name that stage (%s); set %s to the labels "
            "meant, in order",
            setting,
            c,
            len(cands),
            ", ".join(map(repr, cands)),
            setting,
        )


def class_labels(
    names, labels, setting: str, given: bool = True
) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """The classes a setting names (``vae.maturation_classes``, ``analysis.path_classes``)
    as the data spell them.

    A name that is a label stays. A name of a maturation stage (:func:`stage_name`) that
    no label spells so, where exactly one label names that same stage, is that label
    ("promyelocyte" -> "Promyelocytes", "segmented_neutrophil" -> "Neutrophils"): a
    study labelled its own way still gets its stages, where an exact comparison dropped
    them (or refused them as typos). Any other name stays as given: a class the data
    lack, which the caller drops (a preset's stages on data without some). A label
    named twice (two spellings of one stage) is kept once, where it first comes.

    Parameters
    ----------
    names : the class names the setting gives, in order
    labels : the labels the data hold (unknown ones, :data:`UNKNOWN_LABELS`, ignored)
    setting : the setting's name, for the messages
    given : the user gave the list; False for the setting's default (the six stages),
        where a stage two labels name is left out (``ambiguous``) instead of refused:
        real data often hold two spellings of one stage ("neutrophil" crops beside
        Paul15's "Neutrophils" profiles) and the user named neither

    Returns
    -------
    (names, taken, ambiguous) : the names as labels, in order; ``{name: label}`` of those
        taken through their stage (the caller says so); ``{name: [labels]}`` of the
        default's stages left out because several labels name them (the caller says so).

    Raises
    ------
    ValueError
        A stage name the user gave that two or more labels name (which one is meant cannot
        be told), or a near miss of a label (:func:`label_typos`: a typo that would drop
        a class).
    """
    have = sorted({str(x) for x in labels} - set(UNKNOWN_LABELS))
    by_stage: dict[str, list[str]] = {}
    for lab in have:
        s = stage_name(lab)
        if s is not None:
            by_stage.setdefault(s, []).append(lab)
    shown = ", ".join(have[:20]) + (", ..." if len(have) > 20 else "")
    out: list[str] = []
    taken: dict[str, str] = {}
    ambiguous: dict[str, list[str]] = {}
    for c in map(str, names):
        lab = c
        if c not in have:
            stage = stage_name(c)
            cands = by_stage.get(stage, []) if stage else []
            if len(cands) > 1 and not given:
                ambiguous[c] = cands
                continue
            if len(cands) > 1:
                raise ValueError(
                    f"{setting}: {c!r} is not a label, and {len(cands)} labels name its "
                    f"stage ({stage}): {', '.join(map(repr, cands))}; name the one meant "
                    f"(labels: {shown})"
                )
            if cands:
                lab = taken[c] = cands[0]
            else:
                near = label_typos([c], have).get(c)
                if near is not None:
                    raise ValueError(
                        f"{setting}: {c!r} is not a label; did you mean {near!r}? (labels: {shown})"
                    )
        if lab not in out:
            out.append(lab)
    return out, taken, ambiguous


# granule gene programs (human symbols; matched case-insensitively, so mouse
# Mpo/Elane map too): expression.programs and analysis.programs default to these,
# and obs["score_<program>"] of expression.h5ad is keyed by them
GRANULE_PROGRAMS: dict[str, tuple[str, ...]] = {
    "primary": ("MPO", "ELANE", "AZU1", "PRTN3", "CTSG"),  # azurophilic granules
    "specific": ("LTF", "CAMP", "LCN2", "CEACAM8"),
    "tertiary": ("MMP9",),
    "maturation": ("CXCR2", "FCGR3B", "CSF3R", "ITGAM", "MME"),
}


def granule_programs() -> dict[str, list[str]]:
    """A fresh, mutable copy of :data:`GRANULE_PROGRAMS` (for dataclass defaults)."""
    return {k: list(v) for k, v in GRANULE_PROGRAMS.items()}


# latent.h5ad obs (stage=train) and embed/query.h5ad obs (stage=embed): atypical-cell
# scores (vae/analysis/anomaly.py);
# raw per-modality scores (NaN where the row lacks the modality) and the combined
# robust z-score against the training rows (higher = more atypical)
ANOMALY_SCORE = "anomaly_score"
ANOMALY_COLUMNS: dict[str, str] = {
    "image_reconstruction": "anomaly_image_reconstruction",
    "expression_reconstruction": "anomaly_expression_reconstruction",
    "image_latent": "anomaly_image_latent",
    "expression_latent": "anomaly_expression_latent",
    "image_class_distance": "anomaly_image_class_distance",
    "expression_class_distance": "anomaly_expression_class_distance",
    "combined": ANOMALY_SCORE,
}


# --- the named options of the expression and pair stages (checked at start by
# pipeline/ranges.py, and by the readers themselves) --------------------------
INPUT_FORMATS = ("auto", "h5ad", "10x_h5", "10x_mtx", "csv", "tsv", "loom")
ORIENTATIONS = ("auto", "cells_by_genes", "genes_by_cells")
VALUE_KINDS = ("auto", "counts", "lognorm")
MATURATION_MODES = ("auto", "column", "dpt", "none")
PAIR_MODES = ("same_cell", "by_label", "by_maturation", "unpaired", "image_only")
# pair.within_label: which profile of its class a by_label crop draws (any; same rank)
WITHIN_LABEL = ("random", "maturation")
