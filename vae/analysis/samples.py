"""Per-sample maturation profile of an embedded query (``embed/samples.csv`` and ``samples.html``).

Definitions (docs/embed.md, "Per-sample profile"), over the cells of one sample with
their call (``vae_call``: the transferred label, or ``unclassified`` for a doubtful or
atypical cell, :meth:`vae.api.Study.embed`; ``vae_label`` where obs has no call) and
maturation position (``vae_maturation``). Stage names are read by
:func:`vae.inputs.schema.stage_name` ("Segmented neutrophils", "PMY" and "band" all
count). Every fraction's denominator is the sample's cells (``n_cells``, unclassified
ones included, as a manual differential counts its unidentified cells) unless said:

* differential count: cells per call (``n_<call>``, ``n_unclassified``) and its
  fraction of the sample (``frac_<call>``);
* blast fraction ``blast_fraction`` = myeloblasts / all cells;
* immature granulocyte fraction ``ig_fraction`` = (promyelocyte + myelocyte +
  metamyelocyte) / all cells (as the IG% of a haematology analyser: bands and blasts
  are not IG);
* left-shift index ``left_shift_index``: the immature-to-total neutrophil (I:T) ratio,
  (promyelocyte + myelocyte + metamyelocyte + band) / (those + segmented neutrophils)
  (``it_denominator``). Blasts are in neither: a blast count is reported on its own
  (``blast_fraction``), never read as a reactive left shift;
* ``n_classified``: the cells called one of the study's classes (not ``unclassified``,
  not without a call). A sample none of whose cells was called a class (every cell
  doubtful or atypical: 20 of 20 unclassified) has NaN ``frac_<call>`` of every class
  (with their intervals and edge-corrected shares) and NaN ratios: 0 of 0 classified
  cells is no measured 0, and its counting interval (0 - 16.8 % for 20 cells) would
  claim a bound the unclassified cells, which may be any kind, do not give.
  ``n_<call>`` stays 0 and ``frac_unclassified`` (1.0) is measured;
* ``mostly_unclassified`` (bool): at least :data:`MOSTLY_UNCLASSIFIED` (half) of the
  sample's cells were called no class; its shares then count the few called cells
  among all of them and say little. samples.html names these samples in a box above
  its tables, with the usual cause (most cells atypical: inputs unlike the study's
  training crops, e.g. unmasked crops for a study trained on masked ones, another
  stain or magnification);
* each of the three is NaN, not 0, when the study's labels cannot call what it counts
  (no myeloblast class; no immature granulocyte class; no promyelocyte ... band class):
  0 would read as a measured normal value. The I:T ratio is NaN too for a sample with no
  neutrophil;
* per sample, the classes none of its cells could be called given the modalities they
  were seen with (:func:`uncallable_calls`, the one rule of this and of the page's "not
  callable from images"; e.g. an image-only sample in a study paired by label, a class no
  labelled crop has) are listed in ``not_callable`` ("; "-joined, "" when none), and
  their ``frac_<call>``, its interval and ``frac_<call>_edge_corrected`` are NaN: a 0 %
  with a counting interval would read as a measured absence. ``n_<call>`` stays 0 (no
  cell was called it: a true count, and what :func:`uncallable_calls` reads). A ratio is
  NaN for that sample too (with its interval) when none of the classes left to it names
  a stage it counts, the study-level rule above for this sample's modalities;
* every count share (``frac_<call>`` and the three ratios) has its 95 % confidence
  interval, ``<column>_ci_low`` / ``<column>_ci_high``: the exact (Clopper-Pearson)
  binomial interval of k cells of the denominator, the intervals of Rümke's table that
  a manual differential is read with (5 blasts in 100 cells: 1.6 - 11.3 %). It is the
  sampling error of counting that many cells only, not the error of the calls; NaN
  where the share is. The edge-corrected shares have none (their cells are weighted);
* ``maturation_mean`` / ``maturation_median`` of the path position, and its histogram
  ``hist_00 .. hist_<B-1>``: fraction of the on-path cells in each of B equal bins of
  [0, 1]. With the study's path classes given, only the cells called one of them
  (``n_on_path``): a lymphocyte projected onto the granulocyte path lands near its start
  and would read as an immature cell. A cell beyond the first or last class centre
  projects onto the path's end (0 or 1);
* where the cells come from smears with the edge filter (``obs["edge_weight"]``,
  stage=segment's), ``frac_<call>_edge_corrected`` and the three ratios'
  ``*_edge_corrected``: the same shares with each cell weighted by the inverse of its
  chance to escape the edge filter (:func:`segmentation.crops.edge_weights`).
  Dropping the cells cut by the image edge drops large cells (monocytes,
  promyelocytes, myelocytes) more often than small ones (lymphocytes); on BCCD's
  labelled one-cell photos it kept 55 % of the monocytes but 85 % of the lymphocytes
  (docs/embed.md, "Cells cut by the image edge"). The weights are rescaled to a mean of
  1 over a sample's weighted cells, so they move shares among the smear cells only; cells
  without a weight (crop folders, expression-only rows) count 1.
"""

from __future__ import annotations

import base64
import html
import io
import logging

import numpy as np
import pandas as pd

from segmentation.schema import EDGE_WEIGHT
from vae.defaults import ATYPICAL_QUANTILE, MIN_CONFIDENCE
from vae.inputs.schema import ANOMALY_SCORE, known_labels, stage_name

log = logging.getLogger(__name__)

BLASTS = ("myeloblast",)
IMMATURE_GRANULOCYTES = ("promyelocyte", "myelocyte", "metamyelocyte")
IMMATURE_NEUTROPHILS = (*IMMATURE_GRANULOCYTES, "band")  # the I of the I:T ratio
NEUTROPHILS = (*IMMATURE_NEUTROPHILS, "segmented_neutrophil")  # its T
UNCLASSIFIED = "unclassified"  # vae.api's vae_call of a doubtful or atypical cell
# share of a sample's cells called no class from which samples.csv's mostly_unclassified
# is true and samples.html flags the sample above its tables: its shares say little
MOSTLY_UNCLASSIFIED = 0.5
# flagged samples named one by one in the page's box (the rest counted, in samples.csv)
FLAGGED_SAMPLES_SHOWN = 10
# samples shown as columns of the differential count, as on a lab report; more are shown
# one row each (301 samples as columns made a table ~25,000 px wide, the calls out of view)
DIFFERENTIAL_SAMPLE_COLUMNS = 6
# the sample of cells whose sample column holds no value (NaN, "" or blanks), where the
# caller gives no name for it: such cells were dropped from the profile (pandas' groupby
# leaves NaN keys out). stage=embed names them after their input before (docs/embed.md)
NO_SAMPLE = "(no sample)"
# confidence level of the count intervals (<column>_ci_low / _ci_high): 95 %, as Rümke's
# table that haematology reads a manual differential with
CI_LEVEL = 0.95
# (column, stages it counts, what a study must be able to call for it to be measurable)
RATIOS = (
    ("blast_fraction", BLASTS, BLASTS),
    ("ig_fraction", IMMATURE_GRANULOCYTES, IMMATURE_GRANULOCYTES),
    ("left_shift_index", IMMATURE_NEUTROPHILS, IMMATURE_NEUTROPHILS),
)


def call_column(obs: pd.DataFrame) -> str:
    """The column a profile counts: ``vae_call`` (stage=embed's) when obs has it, else
    ``vae_label`` (an obs from before the call existed, or a hand-made one)."""
    return "vae_call" if "vae_call" in obs else "vae_label"


def on_maturation_path(calls, path_classes) -> np.ndarray:
    """(n,) bool: which cells are on the study's maturation path: those called one of the
    classes the path runs through (``path_classes``,
    :meth:`vae.api.Study.maturation_path`). ``calls`` are the cells' calls
    (``vae_call``: the transferred label, or ``unclassified`` for a doubtful or atypical
    cell); NaN or ``""`` is no call.

    The one rule of ``n_on_path`` and the position columns here, of ``vae_maturation`` /
    ``vae_stage`` (:meth:`vae.api.Study.maturation_position` given the calls,
    :meth:`vae.api.Study.embed`) and so of the QuPath measurement: every code has a
    projection onto the path, but a lymphocyte's lands near a granulocyte path's start
    and would read as an immature cell, and an unclassified cell (a platelet-sized
    object, a doublet) is no cell the study can place. Those get no position and no stage.
    """
    names = [str(c) for c in path_classes]
    s = pd.Series(np.asarray(calls, dtype=object))
    return s.where(s.notna(), "").astype(str).isin(names).to_numpy()


def sample_names(obs: pd.DataFrame, sample_key: str, no_sample: str = NO_SAMPLE) -> np.ndarray:
    """Each cell's sample as text, the one reading of every table of this module.

    A missing sample (NaN / None, ``""`` or blanks) is ``no_sample``: never left out (a
    groupby drops NaN keys, so an API caller's cells with a NaN sample vanished from the
    profile without a word). A whole-number float is written as an integer (a patient id
    7 read back as 7.0 from a column with gaps is sample ``"7"``, as
    :func:`vae.inputs.schema.batch_text` reads a batch).

    >>> obs = pd.DataFrame({"sample": [None, "pA", " ", 7.0]})
    >>> sample_names(obs, "sample").tolist()
    ['(no sample)', 'pA', '(no sample)', '7']
    """

    def text(x) -> str:
        if x is None or (not isinstance(x, str) and pd.isna(x)):
            return no_sample
        if isinstance(x, float | np.floating) and float(x).is_integer():
            return str(int(x))
        x = str(x)
        return no_sample if not x.strip() else x

    return np.array([text(x) for x in obs[sample_key].to_numpy(dtype=object)], dtype=object)


def _with_sample_names(
    obs: pd.DataFrame, sample_key: str, no_sample: str, warn: bool = False
) -> pd.DataFrame:
    """``obs`` with its ``sample_key`` column read by :func:`sample_names`; ``warn``: log
    how many cells had no sample and the name they are counted under."""
    names = sample_names(obs, sample_key, no_sample)
    if warn:
        raw = obs[sample_key].to_numpy(dtype=object)
        missing = np.array(
            [
                x is None or (not isinstance(x, str) and pd.isna(x)) or not str(x).strip()
                for x in raw
            ],
            dtype=bool,
        )
        if missing.any():
            log.warning(
                "%d of %d cells have no sample (obs[%r] NaN or empty, e.g. %s): they are "
                "counted as sample %r; give every cell its sample to keep patients apart",
                int(missing.sum()),
                len(missing),
                sample_key,
                ", ".join(str(i) for i in obs.index[missing][:3]),
                no_sample,
            )
    return obs.assign(**{sample_key: names})


def sample_profile(
    obs: pd.DataFrame,
    sample_key: str | None = None,
    bins: int = 10,
    path_classes: list[str] | None = None,
    study_labels: list[str] | None = None,
    callable_calls: dict[str, list[str]] | None = None,
    no_sample: str = NO_SAMPLE,
) -> pd.DataFrame:
    """One row per sample: counts, fractions, blast / IG fractions, I:T ratio, histogram.

    Parameters
    ----------
    obs : query obs with ``sample_key``, ``vae_call`` (or ``vae_label``) and
        ``vae_maturation``
    sample_key : the sample column; None: ``vae_sample`` (``stage=embed``'s) when obs has
        it, else ``sample`` (``Study.read``'s)
    bins : histogram bins over the path position [0, 1]
    path_classes : the classes the study's maturation path runs through
        (:meth:`vae.api.Study.maturation_path`); when given, the position's mean,
        median and histogram are over the cells called one of them (``n_on_path``)
    study_labels : every label the study can call (its reference's); a ratio whose
        stages none of them names is NaN (module docstring), and each has its
        ``n_``/``frac_`` columns (zeros where none was called), so samples tables of
        two queries of one study have the same columns. None: every ratio is taken as
        callable, and the columns are of the labels called
    callable_calls : the classes a cell of each ``vae_modality`` can be called
        (:meth:`vae.api.Study.callable_labels`, as stage=embed passes it and
        :func:`write_samples_html` takes it); per sample the classes none of its cells
        could be called (:func:`uncallable_calls`) are named in ``not_callable`` with
        NaN shares, and a ratio none of the rest can count is NaN (module docstring;
        the ratios only where ``study_labels`` is given, as the study-level rule). None,
        or obs without ``vae_modality``: nothing is marked, ``not_callable`` is ""
    no_sample : the sample of the cells whose sample is missing (NaN, ``""`` or blanks:
        :func:`sample_names`), with a warning naming how many; give the input's name
        (its file stem or folder name) to name them as ``stage=embed`` does, whose
        ``vae_sample`` is never missing. Default :data:`NO_SAMPLE`. Kept in the result's
        ``attrs["no_sample"]`` for :func:`write_samples_html`

    Returns
    -------
    DataFrame, one row per sample (sorted), the columns of the module docstring; sample
    names are text (:func:`sample_names`)
    """
    if sample_key is None:
        sample_key = next((k for k in ("vae_sample", "sample") if k in obs), None)
        if sample_key is None:
            raise KeyError("sample_profile: obs has neither 'vae_sample' nor 'sample'")
    elif sample_key not in obs:
        raise KeyError(f"sample_profile: obs has no column {sample_key!r}")
    # a cell with no sample is counted under no_sample (a groupby would drop it)
    obs = _with_sample_names(obs, sample_key, no_sample, warn=True)
    col = call_column(obs)
    # a query.h5ad read back holds NaN where no label was called: an unclassified cell
    # where the column is the call, else no label ("", counted in n_cells only: never a
    # class column of its own, which gave one query an n_ / frac_ column another lacked)
    none = UNCLASSIFIED if col == "vae_call" else ""
    obs = obs.assign(**{col: obs[col].astype(object).where(obs[col].notna(), none).astype(str)})
    every_label = set(obs[col]) - {""}
    if study_labels is not None:
        names = np.asarray([str(c) for c in study_labels], dtype=object)
        every_label |= set(names[known_labels(names)].tolist())
    labels = sorted(every_label | ({UNCLASSIFIED} if col == "vae_call" else set()))
    callable_stages = (
        None if study_labels is None else {stage_name(c) for c in study_labels} - {None}
    )
    weighted = EDGE_WEIGHT in obs
    rows = []
    for sample, g in obs.groupby(sample_key, sort=True, observed=True):
        calls = g[col].astype(str)
        stage = calls.map(stage_name).to_numpy()
        n = len(g)
        every = np.ones(n, bool)
        # cells called a class: none (all unclassified) leaves no share measured
        n_classified = int((known_labels(calls.to_numpy()) & (calls != UNCLASSIFIED)).sum())
        row: dict = {
            "sample": sample,
            "n_cells": n,
            "n_classified": n_classified,
            "mostly_unclassified": bool(n - n_classified >= MOSTLY_UNCLASSIFIED * n),
        }
        w = _weights(g) if weighted else None
        for c in labels:
            hit = (calls == c).to_numpy()
            k = int(hit.sum())
            row[f"n_{c}"] = k
            # a class's share of a sample with no classified cell: not measured (NaN)
            measured = n_classified > 0 or c == UNCLASSIFIED or not known_labels([c])[0]
            row[f"frac_{c}"] = k / n if n and measured else np.nan
            ci = proportion_ci(k, n) if measured else (np.nan, np.nan)
            row[f"frac_{c}_ci_low"], row[f"frac_{c}_ci_high"] = ci
            if w is not None:
                row[f"frac_{c}_edge_corrected"] = _share(w, hit, every) if measured else np.nan
        row["n_neutrophil_lineage"] = int(np.isin(stage, (*BLASTS, *NEUTROPHILS)).sum())
        neut = np.isin(stage, NEUTROPHILS)
        row["it_denominator"] = int(neut.sum())
        for name, counted, needs in RATIOS:
            num = np.isin(stage, counted)
            den = neut if name == "left_shift_index" else every
            ok = callable_stages is None or bool(callable_stages & set(needs))
            ok = ok and n_classified > 0  # 0 of 0 classified cells is no measured 0
            row[name] = float(num.sum() / den.sum()) if ok and den.any() else np.nan
            k, m = int((num & den).sum()), int(den.sum()) if ok else 0
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = proportion_ci(k, m)
            if w is not None:
                row[f"{name}_edge_corrected"] = _share(w, num, den) if ok else np.nan
        pos = pd.to_numeric(g["vae_maturation"], errors="coerce").to_numpy(float)
        if path_classes is not None:
            pos = pos[on_maturation_path(calls, path_classes)]
            row["n_on_path"] = int(pos.size)
        pos = pos[np.isfinite(pos)]
        row["maturation_mean"] = float(pos.mean()) if pos.size else np.nan
        row["maturation_median"] = float(np.median(pos)) if pos.size else np.nan
        hist = np.histogram(pos, bins=bins, range=(0.0, 1.0))[0]
        for b, v in enumerate(hist):
            row[f"hist_{b:02d}"] = v / pos.size if pos.size else np.nan
        rows.append(row)
    prof = pd.DataFrame(rows)
    # the column is always there (a table without marks too), so the samples tables of
    # two queries of one study have the same columns
    prof.insert(prof.columns.get_loc("n_cells") + 1, "not_callable", "")
    marks = uncallable_calls(prof, obs, callable_calls, sample_key)
    prof = _blank_not_callable(prof, marks, study_labels) if marks else prof
    prof.attrs["no_sample"] = no_sample
    return prof


def _blank_not_callable(
    prof: pd.DataFrame,
    marks: dict[str, tuple[set[str], str]],
    study_labels: list[str] | None,
) -> pd.DataFrame:
    """``prof`` with each sample's not-callable classes (``marks``,
    :func:`uncallable_calls`) named in ``not_callable`` and their shares, intervals and
    edge-corrected shares NaN; a ratio NaN (interval, edge-corrected too) where none of
    the study's classes left to the sample names a stage it counts. ``n_<call>`` is
    kept: 0 cells were called it, and :func:`uncallable_calls` reads that 0, so the page
    given this profile marks the same classes."""
    names = _call_names(prof)  # column order, for a stable not_callable
    for i, sample in zip(prof.index, prof["sample"]):
        if sample not in marks:
            continue
        cannot = marks[sample][0]
        prof.at[i, "not_callable"] = "; ".join(c for c in names if c in cannot)
        parts = ("", "_ci_low", "_ci_high", "_edge_corrected")  # a share and its companions
        blank = [f"frac_{c}{part}" for c in cannot for part in parts]
        if study_labels is not None:
            # the study-level rule of sample_profile over the classes this sample's cells
            # can still be called (by class, not stage: two classes may name one stage)
            left = {stage_name(str(c)) for c in study_labels if str(c) not in cannot}
            for name, _, needs in RATIOS:
                if not left & set(needs):
                    blank += [f"{name}{part}" for part in parts]
        prof.loc[i, [c for c in blank if c in prof]] = np.nan
    return prof


def proportion_ci(k: int, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Exact (Clopper-Pearson) binomial confidence interval of a share of ``k`` in ``n``.

    The interval Rümke's table gives for a manual differential count: the sampling error
    of counting ``n`` cells, at least ``level`` coverage for any true share.

    Parameters
    ----------
    k, n : cells counted with the feature, cells counted (0 <= k <= n)
    level : coverage, e.g. 0.95

    Returns
    -------
    (low, high) as fractions in [0, 1]; (NaN, NaN) for n == 0.

    >>> [round(v, 4) for v in proportion_ci(5, 100)]
    [0.0164, 0.1128]
    >>> proportion_ci(0, 20)[0], round(proportion_ci(0, 20)[1], 4)
    (0.0, 0.1684)
    """
    from scipy import stats

    if n <= 0:
        return np.nan, np.nan
    a = (1.0 - level) / 2.0
    low = 0.0 if k <= 0 else float(stats.beta.ppf(a, k, n - k + 1))
    high = 1.0 if k >= n else float(stats.beta.ppf(1.0 - a, k + 1, n - k))
    return low, high


def _weights(g: pd.DataFrame) -> np.ndarray:
    """(n,) edge weights of a sample's cells, rescaled to a mean of 1 over the cells that
    have one; 1 for the others (crop folders, expression).

    The rescaling lets the weights move shares only among the smear cells: their raw
    weights say how many cells each stands for in a field of randomly placed cells
    (2-3 on BCCD), but photos centred on their cell keep more of them than that, so
    mixed with unweighted crop-folder cells the raw weights would inflate the smear
    cells' total share.
    """
    w = pd.to_numeric(g[EDGE_WEIGHT], errors="coerce").to_numpy(float)
    has = np.isfinite(w) & (w > 0)
    out = np.ones(len(w))
    if has.any():
        out[has] = w[has] / w[has].mean()
    return out


def _share(w: np.ndarray, num: np.ndarray, den: np.ndarray) -> float:
    """Weighted share sum(w[num & den]) / sum(w[den]); NaN for an empty denominator."""
    total = float(w[den].sum())
    return float(w[num & den].sum() / total) if total > 0 else np.nan


MODALITY_WORDS = {"image": "images", "expression": "expression", "both": "image + expression"}
# what the reference lacks that a class is never called for cells seen as these only
MODALITY_LACKS = {
    "images": "no crop of the class",
    "expression": "no expression profile of the class",
    "image + expression": "no cell of the class with both",
}


def _call_names(profile: pd.DataFrame) -> list[str]:
    """The calls the differential counts, in column order: each ``n_<call>`` that has its
    ``frac_<call>`` (not ``n_cells``, ``n_on_path``, ...)."""
    return [c[2:] for c in profile.columns if c.startswith("n_") and f"frac_{c[2:]}" in profile]


def uncallable_calls(
    profile: pd.DataFrame,
    obs: pd.DataFrame,
    callable_calls: dict[str, list[str]] | None,
    sample_key: str | None = None,
) -> dict[str, tuple[set[str], str]]:
    """Per sample (``profile["sample"]``): the classes none of its cells could be called,
    and the words for why (``"images"``: every cell of the sample was seen as an image
    only). ``callable_calls``: the classes a cell of each ``vae_modality`` can be called
    (:meth:`vae.api.Study.callable_labels`: in a study paired by label, an image-only
    cell takes its label from the reference cells with a crop, so a class no crop has,
    e.g. the real chain's Erythrocyte or GMP, is never its call and its 0 % with a
    counting interval would read as a measured absence). A class a cell was called
    anyway is not listed. None, or obs without ``vae_modality``: nothing listed.

    The one rule of both outputs: :func:`sample_profile` names these classes in
    samples.csv's ``not_callable`` with NaN shares (and NaN ratios none of the rest can
    count), :func:`write_samples_html` marks them "not callable from ..."; it reads
    ``n_<call>``, which both keep."""
    if not callable_calls or "vae_modality" not in obs or "sample" not in profile:
        return {}
    if sample_key is None:
        sample_key = next((k for k in ("vae_sample", "sample") if k in obs), None)
    if sample_key is None or sample_key not in obs:
        return {}
    # the profile's names: a missing sample is its no_sample (sample_profile)
    obs = _with_sample_names(obs, sample_key, profile.attrs.get("no_sample", NO_SAMPLE))
    every = set(_call_names(profile))
    every.discard(UNCLASSIFIED)
    mods = obs.groupby(sample_key, sort=False, observed=True)["vae_modality"].agg(
        lambda m: set(m.astype(str))
    )
    out = {}
    for _, r in profile.iterrows():
        present = mods.get(r["sample"], set())
        if not present or any(m not in callable_calls for m in present):
            continue
        can = set().union(*(set(callable_calls[m]) for m in present))
        cannot = {c for c in every - can if int(r.get(f"n_{c}", 0)) == 0}
        if cannot:
            words = " or ".join(MODALITY_WORDS.get(m, m) for m in sorted(present))
            out[r["sample"]] = (cannot, words)
    return out


def _not_callable_note(dropped: list[str], marks: dict[str, tuple[set[str], str]]) -> str:
    """The page's words for the classes left out of the differential (``dropped``: no
    sample's cells could be called them) and the cells marked "not callable"."""
    if not dropped and not marks:
        return ""
    # the example by the modalities the marked samples' cells were seen with (an
    # expression-only sample's note spoke of crops)
    seen_as = {x for _, w in marks.values() for x in w.split(" or ")}
    why = "; ".join(
        f"{w} only: {MODALITY_LACKS[w]}" for w in sorted(seen_as) if w in MODALITY_LACKS
    )
    text = (
        "<p>Not callable: classes the study cannot give these cells, having no labelled "
        "reference cell with the modalities they were seen with"
        + (f" (cells seen as {why})" if why else "")
        + "; their count is 0 by construction, not a measured absence."
    )
    if dropped:
        text += f" Left out for every sample: {html.escape(', '.join(dropped))}."
    return text + (
        " samples.csv keeps their columns: n_&lt;call&gt; 0, frac_&lt;call&gt; and its "
        "interval empty (NaN), the classes named in not_callable.</p>"
    )


def _differential_html(
    profile: pd.DataFrame, marks: dict[str, tuple[set[str], str]] | None = None
) -> str:
    """The differential count as a haematologist reads it: one row per call, per sample
    the cells, their percentage and (with edge weights) the edge-corrected percentage.
    ``marks`` (:func:`uncallable_calls`): per sample the classes its cells cannot be
    called, shown "not callable from ..." instead of a 0 % and its interval; a class no
    sample can be called is left out."""
    from vae.analysis.palette import label_order

    marks = marks or {}
    labels = _call_names(profile)
    labels = label_order(labels)  # maturation order, as the study's figures list them
    if UNCLASSIFIED in labels:  # after every call, as a counter lists its flagged cells
        labels = [c for c in labels if c != UNCLASSIFIED] + [UNCLASSIFIED]
    samples = list(profile["sample"]) if "sample" in profile else []
    dropped = [
        c for c in labels if samples and all(s in marks and c in marks[s][0] for s in samples)
    ]
    labels = [c for c in labels if c not in dropped]
    note = _not_callable_note(dropped, marks)
    edge = any(f"frac_{c}_edge_corrected" in profile for c in labels)
    if len(profile) > DIFFERENTIAL_SAMPLE_COLUMNS:
        return _differential_rows_html(profile, labels, edge, marks) + note
    cols = ["n", "%", "% edge-corrected"] if edge else ["n", "%"]
    head = "".join(
        f"<th colspan='{len(cols)}'>{html.escape(str(r['sample']))} "
        f"({int(r['n_cells'])} cells)</th>"
        for _, r in profile.iterrows()
    )
    sub = "".join(f"<th>{c}</th>" for _ in range(len(profile)) for c in cols)
    rows = []
    for c in labels:
        cells = []
        for _, r in profile.iterrows():
            if c in marks.get(r["sample"], (set(),))[0]:
                why = marks[r["sample"]][1]
                cells.append(
                    f"<td colspan='{len(cols)}'><small>not callable from {why}</small></td>"
                )
                continue
            if not np.isfinite(r[f"frac_{c}"]):  # no cell of the sample classified
                cells.append(
                    f"<td>{int(r[f'n_{c}'])}</td><td colspan='{len(cols) - 1}'>"
                    "<small>no cell classified</small></td>"
                )
                continue
            ci = _ci_text(r, f"frac_{c}", 100.0, 1)
            cells.append(f"<td>{int(r[f'n_{c}'])}</td><td>{100 * r[f'frac_{c}']:.1f}{ci}</td>")
            if edge:
                v = r.get(f"frac_{c}_edge_corrected", np.nan)
                cells.append(f"<td>{100 * v:.1f}</td>" if np.isfinite(v) else "<td>n/a</td>")
        rows.append(f"<tr><th>{html.escape(c)}</th>{''.join(cells)}</tr>")
    return (
        f"<table><tr><th rowspan='2'>call</th>{head}</tr><tr>{sub}</tr>{''.join(rows)}</table>"
        f"<p>% (low-high): the share and its {100 * CI_LEVEL:.0f} % confidence interval. "
        "Every column is in samples.csv (n_&lt;call&gt;, frac_&lt;call&gt;, "
        "frac_&lt;call&gt;_ci_low / _ci_high, frac_&lt;call&gt;_edge_corrected).</p>"
        f"{note}"
    )


def _differential_rows_html(
    profile: pd.DataFrame,
    labels: list[str],
    edge: bool,
    marks: dict[str, tuple[set[str], str]] | None = None,
) -> str:
    """The differential count with one row per sample (more samples than
    :data:`DIFFERENTIAL_SAMPLE_COLUMNS`): calls across, each cell "n (x.x %)" and, with
    edge weights, the edge-corrected percentage under it; the sample column stays in
    view while the table scrolls sideways. ``marks``: as :func:`_differential_html`."""
    marks = marks or {}
    sticky = "position:sticky;left:0;background:#fff"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in labels)
    rows = []
    for _, r in profile.iterrows():
        cells = []
        for c in labels:
            if c in marks.get(r["sample"], (set(),))[0]:
                cells.append(f"<td><small>not callable from {marks[r['sample']][1]}</small></td>")
                continue
            if not np.isfinite(r[f"frac_{c}"]):  # no cell of the sample classified
                cells.append(f"<td>{int(r[f'n_{c}'])} <small>(no cell classified)</small></td>")
                continue
            ci = _ci_text(r, f"frac_{c}", 100.0, 1)
            text = f"{int(r[f'n_{c}'])} ({100 * r[f'frac_{c}']:.1f} %{ci})"
            if edge:
                v = r.get(f"frac_{c}_edge_corrected", np.nan)
                text += f"<br><small>{100 * v:.1f} % e.c.</small>" if np.isfinite(v) else ""
            cells.append(f"<td>{text}</td>")
        rows.append(
            f"<tr><th style='{sticky}'>{html.escape(str(r['sample']))}</th>"
            f"<td>{int(r['n_cells'])}</td>{''.join(cells)}</tr>"
        )
    note = " e.c.: edge-corrected (frac_&lt;call&gt;_edge_corrected)." if edge else ""
    return (
        f"<div style='overflow-x:auto'><table><tr><th style='{sticky}'>sample</th>"
        f"<th>cells</th>{head}</tr>{''.join(rows)}</table></div>"
        f"<p>One row per sample ({len(profile)} samples); % (low-high): the share and "
        f"its {100 * CI_LEVEL:.0f} % confidence interval; every column is in samples.csv "
        f"(n_&lt;call&gt;, frac_&lt;call&gt;, frac_&lt;call&gt;_ci_low / _ci_high).{note}</p>"
    )


def _ci_text(row: pd.Series, column: str, scale: float, digits: int) -> str:
    """`` <small>(low-high)</small>`` of ``column``'s confidence interval in a profile row
    (values times ``scale``), or "" where it has none (NaN, or no such columns)."""
    lo, hi = row.get(f"{column}_ci_low", np.nan), row.get(f"{column}_ci_high", np.nan)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return ""
    return f" <small>({scale * lo:.{digits}f}-{scale * hi:.{digits}f})</small>"


def _png(a: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _unclassified_rule(
    min_confidence: float, atypical_quantile: float | None, atypical_off: str | None = None
) -> str:
    """The page's words for the ``vae_call`` settings used (``atypical_off``: why no cell
    could be flagged atypical although the quantile is set)."""
    parts = []
    if min_confidence > 0:
        parts.append(
            f"fewer than {100 * min_confidence:.0f} % of their nearest reference cells agree "
            "on a label (embed.min_confidence)"
        )
    if atypical_quantile is not None and not atypical_off:
        parts.append(
            f"they are less like the study's cells than {100 * atypical_quantile:.3g} % of "
            "its own held-out cells (a doublet, debris, a kind it never saw; "
            "embed.atypical_quantile)"
        )
    rule = (" or ".join(parts) + ".") if parts else "none (both flags switched off)."
    if atypical_quantile is not None and atypical_off:
        # said, not left out: a reader would take every cell for one the study knows
        rule += (
            f" Atypical flagging off: {html.escape(atypical_off)}; no cell is left out as atypical."
        )
    return rule


def _n_uncalled(row: pd.Series) -> int:
    """Cells of a profile row called no class: ``n_cells - n_classified`` (a profile
    without ``n_classified``: its ``n_unclassified``, else 0)."""
    if "n_classified" in row:
        return int(row["n_cells"]) - int(row["n_classified"])
    return int(row.get(f"n_{UNCLASSIFIED}", 0))


def _is_flagged(row: pd.Series) -> bool:
    """Whether a profile row is mostly unclassified (``mostly_unclassified``, or the same
    rule on a profile without it)."""
    if "mostly_unclassified" in row:
        return bool(row["mostly_unclassified"])
    n = int(row["n_cells"])
    return n > 0 and _n_uncalled(row) >= MOSTLY_UNCLASSIFIED * n


# why most of a sample's cells come out atypical: the inputs, seldom the patient
UNLIKE_INPUTS = (
    "images unlike the crops the study was trained on, such as crops read whole (unmasked, "
    "embed.crop_masks=whole) by a study trained on crops cut out with their mask (or the "
    "reverse), another stain, another magnification or camera"
)
COMPARE_CROPS = (
    "Compare the unclassified example crops at the foot of this page with the study's own "
    'crops (study.html) before reading any share (docs/embed.md, "Mostly unclassified '
    'samples" and "Crop folders: what the mask buys").'
)


def _unclassified_flag_html(
    profile: pd.DataFrame,
    obs: pd.DataFrame,
    sample_key: str | None,
    min_confidence: float,
    atypical_quantile: float | None,
    atypical_off: str | None,
) -> str:
    """The page's box above its tables naming the samples with most cells called no class
    (:func:`_is_flagged`), each with its unclassified cells (atypical / doubtful where
    obs says which) and what that leaves of its shares, then the usual cause; "" when
    no sample is flagged."""
    flagged = [r for _, r in profile.iterrows() if _is_flagged(r)]
    if not flagged:
        return ""
    if sample_key is None:
        sample_key = next((k for k in ("vae_sample", "sample") if k in obs), None)
    col = call_column(obs) if len(obs) else None
    split = (
        col == "vae_call" and "vae_atypical" in obs and sample_key is not None and sample_key in obs
    )
    if split:  # per sample: its unclassified cells, and the atypical among them
        unc = obs[col].astype(str).to_numpy() == UNCLASSIFIED
        atyp = pd.to_numeric(obs["vae_atypical"], errors="coerce").fillna(0).to_numpy() > 0
        by = pd.DataFrame({"u": unc, "a": unc & atyp}, index=obs.index)
        no_sample = profile.attrs.get("no_sample", NO_SAMPLE)
        by = by.groupby(sample_names(obs, sample_key, no_sample), sort=False).sum()
    n_atyp = n_unc = 0
    items = []
    for r in flagged:
        n, u = int(r["n_cells"]), _n_uncalled(r)
        kinds = ""
        if split and r["sample"] in by.index:
            nu, a = int(by.at[r["sample"], "u"]), int(by.at[r["sample"], "a"])
            n_atyp, n_unc = n_atyp + a, n_unc + nu
            kinds = f": {a} atypical, {nu - a} doubtful"
        k = n - u
        what = (
            "no cell was called a class, so its shares and ratios are empty (NaN), not 0 %"
            if k == 0
            else f"its shares count the {k} called cell{'s' if k != 1 else ''} among all "
            f"{n}: its differential, blast and IG fractions and I:T ratio say little"
        )
        items.append(
            f"<li><b>{html.escape(str(r['sample']))}</b>: {u} of {n} cells unclassified "
            f"({100 * u / max(n, 1):.0f} %{kinds}); {what}.</li>"
        )
    more = len(items) - FLAGGED_SAMPLES_SHOWN
    items = items[:FLAGGED_SAMPLES_SHOWN] + (
        [f"<li>and {more} more (samples.csv, mostly_unclassified)</li>"] if more > 0 else []
    )
    if split and n_unc and n_atyp >= n_unc / 2:
        q = f"{100 * atypical_quantile:.3g} %" if atypical_quantile is not None else "most"
        cause = (
            f"Most of these cells are atypical: less like the study's cells than {q} of its "
            "own held-out cells. The usual cause is the inputs, not the patient: "
            f"{UNLIKE_INPUTS}. {COMPARE_CROPS}"
        )
    elif split and n_unc:
        cause = (
            f"Most of these cells are doubtful: fewer than {100 * min_confidence:.0f} % of "
            "their nearest reference cells agree on a label: cells between the study's "
            "classes or of a kind it has no class for, or cells the study reads poorly, as "
            f"it reads {UNLIKE_INPUTS}. {COMPARE_CROPS}"
        )
    else:  # no vae_atypical to tell the two apart
        cause = (
            "When most cells are atypical, the usual cause is the inputs, not the patient: "
            f"{UNLIKE_INPUTS}. {COMPARE_CROPS}"
        )
    if atypical_off:
        cause += f" (Atypical flagging was off here: {html.escape(atypical_off)}.)"
    n_flag = len(flagged)
    return (
        "<section aria-labelledby='mostly-unclassified' style='border:3px solid #a40000;"
        "background:#fff4f4;padding:0 1em;margin:1em 0'>"
        f"<h2 id='mostly-unclassified' style='color:#a40000'>{n_flag} sample"
        f"{'s' if n_flag != 1 else ''} mostly unclassified: "
        f"{'their' if n_flag != 1 else 'its'} shares say little</h2>"
        f"<p>Half or more of the cells of {'these samples' if n_flag != 1 else 'this sample'} "
        "were called no class (unclassified: doubtful or atypical, defined below). They "
        "count in n_cells as a manual differential counts its unidentified cells, so a "
        "0 % here is no measured absence: the unclassified cells may be of any kind.</p>"
        f"<ul>{''.join(items)}</ul><p>{cause}</p>"
        "<p>samples.csv: mostly_unclassified (true for these), n_classified, "
        "n_unclassified and frac_unclassified.</p></section>"
    )


def _hist_svg(h: np.ndarray, width: int = 160, height: int = 40) -> str:
    """A small bar chart of one sample's position histogram: x = the path position
    0 (earliest class) .. 1 (latest), bar height = fraction of the on-path cells, the
    tallest bar's share written above the plot (on the bars it was dark on blue, ~3:1),
    and said in words as the chart's aria-label."""
    h = np.nan_to_num(np.asarray(h, float))
    top = max(h.max(), 1e-9)
    w = width / max(len(h), 1)
    y0 = 11  # px of the share line above the plot
    bars = "".join(
        f'<rect x="{i * w:.1f}" y="{y0 + height - v / top * height:.1f}" width="{w - 1:.1f}" '
        f'height="{v / top * height:.1f}" fill="#5b6bbf"/>'
        for i, v in enumerate(h)
    )
    text = 'font-size="9" fill="#333"'
    axis = (
        f'<text x="1" y="9" {text}>tallest bar {100 * h.max():.0f} %</text>'
        f'<text x="0" y="{y0 + height + 10}" {text}>0</text>'
        f'<text x="{width / 2}" y="{y0 + height + 10}" {text} text-anchor="middle">position</text>'
        f'<text x="{width}" y="{y0 + height + 10}" {text} text-anchor="end">1</text>'
    )
    peak = int(np.argmax(h)) if len(h) else 0
    at = (peak + 0.5) / max(len(h), 1)
    label = (
        f"maturation histogram, {len(h)} bins over path position 0 to 1: tallest bar "
        f"{100 * h.max():.0f} % of the on-path cells, at position {at:.2f}"
        if len(h) and h.max() > 0
        else "maturation histogram: no cell on the path"
    )
    return (
        f'<svg width="{width}" height="{y0 + height + 12}" role="img" aria-label="{label}">'
        f'<rect y="{y0}" width="{width}" height="{height}" fill="#eee"/>{bars}{axis}</svg>'
    )


def write_samples_html(
    path,
    profile: pd.DataFrame,
    obs: pd.DataFrame,
    crops: np.ndarray | None,
    per_call: int = 8,
    title: str = "Per-sample maturation profile",
    seed: int = 0,
    notes: list[str] | None = None,
    min_confidence: float = MIN_CONFIDENCE,
    atypical_quantile: float | None = ATYPICAL_QUANTILE,
    atypical_off: str | None = None,
    callable_calls: dict[str, list[str]] | None = None,
    sample_key: str | None = None,
) -> None:
    """A self-contained HTML page: the profile table, histograms, example crops per call.

    Parameters
    ----------
    path : output file (written as given; the caller makes it atomic)
    obs : query obs aligned with ``crops`` (``vae_call`` or ``vae_label``, ``vae_label``,
        ``vae_label_confidence``, ``anomaly_score`` when there)
    crops : (n, S, S, 3) uint8 crops of the query rows, or None (no images)
    per_call : example crops per call, in maturation order (the most confident ones
        first among a seeded sample of rows with an image; the unclassified: the most
        atypical first)
    notes : sentences shown under the title (the study read, its path, its limits)
    min_confidence, atypical_quantile : the settings ``vae_call`` was made with (the
        page's definition of unclassified says them)
    atypical_off : why no cell could be flagged atypical although ``atypical_quantile``
        is set (:attr:`vae.api.Study.atypical_off`); the page says so instead of the
        held-out rule
    callable_calls : the classes a cell of each ``vae_modality`` can be called
        (:meth:`vae.api.Study.callable_labels`); a sample's classes none of its cells
        could be called read "not callable from images" in the differential, not 0 %
        with an interval (:func:`uncallable_calls`); None: every class is callable.
        The one :func:`sample_profile` was given, so the page marks the classes its
        ``not_callable`` names
    sample_key : obs column of the profile's samples (None: ``vae_sample``, else
        ``sample``, as :func:`sample_profile`)
    """
    from vae.analysis.palette import label_order

    hist_cols = [c for c in profile.columns if c.startswith("hist_")]
    main = ["sample", "n_cells"]
    if f"n_{UNCLASSIFIED}" in profile:
        main.append(f"n_{UNCLASSIFIED}")
    for name, _, _ in RATIOS:
        main.append(name)
        if f"{name}_edge_corrected" in profile:  # beside its uncorrected column
            main.append(f"{name}_edge_corrected")
    main += [c for c in ("n_on_path", "maturation_median") if c in profile]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}"
        "img{margin:1px;image-rendering:pixelated}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        # first thing on the page: a sample whose shares say little (most cells called
        # no class) read as a normal measured count in the table below
        _unclassified_flag_html(
            profile, obs, sample_key, min_confidence, atypical_quantile, atypical_off
        ),
        *(f"<p><b>{html.escape(n)}</b></p>" for n in (notes or [])),
        "<p>Definitions (every fraction but the left-shift index is over all the sample's "
        "cells, n_cells):</p><ul>"
        f"<li><b>unclassified</b>: cells the study does not call: {_unclassified_rule(min_confidence, atypical_quantile, atypical_off)} "
        "They count in n_cells and in no call; a sample with half or more of its cells "
        "called no class is named in a box at the top of this page "
        "(samples.csv mostly_unclassified).</li>"
        "<li><b>blast fraction</b> = myeloblasts / all cells.</li>"
        "<li><b>immature granulocyte fraction</b> = (promyelocyte + myelocyte + "
        "metamyelocyte) / all cells, as an analyser's IG% (bands and blasts are not IG).</li>"
        "<li><b>left-shift index</b> = the immature-to-total neutrophil (I:T) ratio, "
        "(promyelocyte + myelocyte + metamyelocyte + band) / (those + segmented "
        "neutrophils); blasts are in neither part, they are reported on their own.</li>"
        "<li><b>NaN</b>: not measurable here: the study's labels name none of the stages a "
        "column counts (a study labelled by cell kind, e.g. with Paul15's 'Neutrophils', "
        "names no immature stage), or none of the study's classes that name them can be "
        "given this sample's cells from the modalities they were seen with (not_callable), "
        "or the sample has no neutrophil (I:T), or none of its cells was called a class "
        "(every cell unclassified: 0 of 0 classified cells is no measured 0; its calls' "
        "shares read 'no cell classified').</li>"
        "<li><b>histogram</b>: the position along the study's maturation path (0 = the "
        "earliest class's centre, 1 = the latest's; cells beyond either centre sit at the "
        "end) of the cells called one of the path's classes (n_on_path).</li>"
        f"<li><b>(low-high)</b>: the {100 * CI_LEVEL:.0f} % confidence interval of a "
        "share from the number of cells counted (exact binomial, as Rümke's table for a "
        "manual differential): 5 blasts in 100 cells is 1.6-11.3 %, in 20 cells 1 blast "
        "is 0.1-24.9 %. It does not include errors of the calls themselves.</li>"
        "<li><b>edge-corrected</b>: each cell weighted by the inverse of its chance to "
        "escape the filter that drops cells cut by the image edge, which drops large cells "
        "(monocytes, promyelocytes) more often than small ones (lymphocytes).</li>"
        "</ul><p>See docs/embed.md.</p>",
        "<h2>Samples</h2><table><tr>",
        # headers wrap at the underscores of samples.csv's names: the page fits its width
        "".join(
            f"<th>{html.escape(c).replace('_', '_<wbr>')}</th>"
            for c in [*main, "maturation histogram"]
        ),
        "</tr>",
    ]
    for _, r in profile.iterrows():
        cells = []
        flag = _is_flagged(r)
        for c in main:
            v = r[c]
            if isinstance(v, float):  # NaN as the definitions above spell it
                ci = _ci_text(r, c, 1.0, 3)
                cells.append("<td>NaN</td>" if np.isnan(v) else f"<td>{v:.3f}{ci}</td>")
            elif flag and c == "sample":  # the box at the top names it too
                cells.append(
                    f"<td>{html.escape(str(v))}<br><small><b>mostly unclassified</b></small></td>"
                )
            elif flag and c == f"n_{UNCLASSIFIED}":
                cells.append(
                    f"<td>{v} <b>({100 * int(v) / max(int(r['n_cells']), 1):.0f} %)</b></td>"
                )
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        cells.append(f"<td>{_hist_svg(r[hist_cols].to_numpy(float))}</td>")
        style = " style='background:#fff4f4'" if flag else ""
        parts.append(f"<tr{style}>" + "".join(cells) + "</tr>")
    parts.append("</table><h2>Differential count</h2>")
    marks = uncallable_calls(profile, obs, callable_calls, sample_key)
    parts.append(_differential_html(profile, marks))
    parts.append("<h2>Example crops per call</h2>")
    has = "vae_modality" in obs and crops is not None
    if not has:
        parts.append("<p>No images among the inputs.</p>")
    else:
        rng = np.random.default_rng(seed)
        img_rows = obs["vae_modality"].astype(str).isin(["image", "both"]).to_numpy()
        call = obs[call_column(obs)].astype(str).to_numpy()
        lab = obs["vae_label"].astype(str).to_numpy()
        conf = obs["vae_label_confidence"].to_numpy(float)
        odd = (
            pd.to_numeric(obs[ANOMALY_SCORE], errors="coerce").to_numpy(float)
            if ANOMALY_SCORE in obs
            else np.full(len(obs), np.nan)
        )
        order = label_order(set(call[img_rows]))
        order = [c for c in order if c != UNCLASSIFIED] + [c for c in order if c == UNCLASSIFIED]
        for c in order:
            idx = np.flatnonzero(img_rows & (call == c))
            idx = rng.permutation(idx)[: 4 * per_call]
            # a call's examples: its most confident cells; the unclassified: the most atypical
            rank = -np.nan_to_num(odd[idx], nan=-np.inf) if c == UNCLASSIFIED else -conf[idx]
            idx = idx[np.argsort(rank, kind="stable")][:per_call]
            # alt: what a screen reader says for the crop (title: the tooltip, with the id)
            imgs = "".join(
                f'<img src="{_png(crops[i])}" width="64" '
                f'alt="{html.escape(lab[i])}, confidence {conf[i]:.2f}'
                f'{"" if lab[i] == c else ", called " + html.escape(c)}" '
                f'title="{html.escape(str(obs.index[i]))} '
                f"{html.escape(lab[i])}, confidence {conf[i]:.2f}, "
                f'atypical score {odd[i]:.2f}">'
                for i in idx
            )
            parts.append(
                f"<h3>{html.escape(c)} ({int((img_rows & (call == c)).sum())} cells)</h3>{imgs}"
            )
    parts.append("</body></html>")
    # UTF-8 as the page declares (not the locale's); a name that is no text (a file
    # name's surrogates, from an API caller's obs) is escaped, not a failure after the
    # whole embedding ran
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write("\n".join(parts))
