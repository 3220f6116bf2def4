"""stage=embed: put new smears, crops, cells and/or expression into a finished study's latent.

The stage maps ``cfg.embed`` onto :class:`vae.api.Study` (the same API a user
calls from Python) and writes into ``outputs/<experiment>/embed/``:
``query.h5ad`` (the inputs' obs untouched + ``vae_*`` columns, latents in
``obsm``), ``samples.csv`` and ``samples.html`` (per-sample profile),
``rejects.csv`` (``input``, ``item``, ``reason``) and ``summary.json``
(gene matching per input, counts). See docs/embed.md.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.artifacts import spreadsheet_safe, write_json
from pipeline.runner import StageContext, StageError, interrupted, resolve_data_path, stage
from pipeline.streaming import h5ad_blocks, streams
from segmentation.io import add_obsm_rows, array_bytes, check_h5ad_fits, error_line

log = logging.getLogger(__name__)

INPUT_KINDS = ("smears", "crops", "h5ad", "expression")
# the string columns embed adds to a query's obs ("" written as NaN; the user's stay)
QUERY_STRING_COLUMNS = (
    "vae_input",
    "vae_sample",
    "vae_modality",
    "vae_label",
    "vae_call",
    "vae_stage",
)


def _inputs(cfg) -> list[tuple[str, str]]:
    return [(k, cfg.embed[k]) for k in INPUT_KINDS if cfg.embed[k]]


def _needs(cfg) -> list[str]:
    return [] if cfg.embed.study else ["model", "latent"]


def _uses_detector(cfg, cuts: dict[str, str] | None = None) -> bool:
    """Smear folders, and crop folders whose masks come from the detector: ``cuts`` (the
    cut of each image input, :func:`_cuts`) once the study is known; before, a crop
    folder may be (``embed.crop_masks=auto`` follows the study)."""
    if cfg.embed.smears:
        return True
    if not (cfg.embed.crops or cfg.embed.labelled_crops):  # both crop folders: one cut
        return False
    cut = cuts.get("crops") if cuts is not None else cfg.embed.crop_masks
    return cut != "whole"


def _cuts(cfg, study) -> dict[str, str]:
    """``crops`` / ``smears`` -> the cut ``embed.crop_masks`` gives its cells
    (``detector`` / ``whole``; ``auto``: as the study's training crops were cut), each
    said in the log once (a cut unlike the study's training crops: a warning naming
    ``embed.crop_masks``: :meth:`vae.api.Study.crop_masks_for`)."""
    from vae.api import StudyError

    kinds = {k for k, _ in _inputs(cfg) if k in ("crops", "smears")}
    if cfg.embed.labelled_crops:  # a crop folder, cut as embed.crops is
        kinds.add("crops")
    try:
        return {
            kind: study.crop_masks_for(kind, cfg.embed.crop_masks, setting="embed.crop_masks")
            for kind in sorted(kinds, key=INPUT_KINDS.index)
        }
    except StudyError as e:
        raise StageError(str(e)) from e


def _optional(cfg) -> list[str]:
    """The detector is an input only where a detector is used; with ``embed.study`` it is
    the study's (``Study.load``), so this experiment's own artifacts are not looked up
    (that lookup logged the shipped detector while the study's was used)."""
    if not _uses_detector(cfg):
        return []
    if cfg.embed.study and not cfg.paths.inputs.get("segmentation_model"):
        return []
    return ["segmentation_model"]


def _validate(cfg) -> None:
    e = cfg.embed
    if not _inputs(cfg):
        raise StageError(
            "stage=embed needs at least one input: embed.smears=DIR, embed.crops=DIR, "
            "embed.h5ad=FILE or embed.expression=FILE"
        )
    for k, p in _inputs(cfg):
        path = resolve_data_path(cfg, p, f"embed.{k}")
        if k in ("smears", "crops") and path.is_file():
            # refused before the study and its detector load (the reader said it after)
            raise StageError(
                f"embed.{k}={p}: reads a folder of images (sub-folders = samples); this is "
                "a file: give the folder that holds it"
            )
    if e.study and not Path(e.study).is_dir():
        raise StageError(f"embed.study={e.study}: no such folder (outputs/<experiment> of a study)")
    for key in ("model", "latent"):
        given = cfg.paths.inputs.get(key)
        if e.study and given:
            # the study's own model and latent are used: a second one would be ignored
            raise StageError(
                f"paths.inputs.{key}={given} and embed.study={e.study}: give one (the study "
                f"brings its own train/{'model.pt' if key == 'model' else 'latent.h5ad'})"
            )
    if (
        e.labelled_crops
        and not resolve_data_path(cfg, e.labelled_crops, "embed.labelled_crops").is_dir()
    ):
        raise StageError(
            f"embed.labelled_crops={e.labelled_crops}: no such folder (one sub-folder of "
            "crops per class, named after the study's classes)"
        )
    if e.samples_csv and not Path(e.samples_csv).is_file():
        raise StageError(f"embed.samples_csv={e.samples_csv}: no such file")
    if not 0 <= float(e.max_missing_genes) <= 1:
        raise StageError(f"embed.max_missing_genes={e.max_missing_genes}: must be in [0, 1]")
    from vae.api import CROP_MASKS, IMPUTE_METHODS

    if e.impute not in IMPUTE_METHODS:
        raise StageError(f"embed.impute={e.impute}: valid: {', '.join(IMPUTE_METHODS)}")
    if e.crop_masks not in CROP_MASKS:
        raise StageError(f"embed.crop_masks={e.crop_masks}: valid: {', '.join(CROP_MASKS)}")
    if int(e.impute_iterations) < 1:
        raise StageError(f"embed.impute_iterations={e.impute_iterations}: must be >= 1")
    if e.knn_k is not None and int(e.knn_k) < 1:
        raise StageError(f"embed.knn_k={e.knn_k}: must be >= 1")
    _read_mapping(cfg, say=False)  # a broken samples CSV fails before any folder is made


def load_study(ctx: StageContext):
    """The :class:`vae.api.Study` of ``embed.study`` or of this experiment's inputs."""
    from vae.api import Study, StudyError

    cfg = ctx.cfg
    seg = cfg.paths.inputs.get("segmentation_model")
    imp = {
        "impute": cfg.embed.impute,
        "impute_iterations": int(cfg.embed.impute_iterations),
        "min_confidence": float(cfg.embed.min_confidence),
        "atypical_quantile": cfg.embed.atypical_quantile,
    }
    # hardware.*: the model (and the detector of smear folders) on this run's device
    imp["device"] = str(ctx.dist.device) if ctx.dist is not None else "cpu"
    try:
        if cfg.embed.study:
            return Study.load(
                cfg.embed.study, variant=_study_variant(cfg), segmentation_model=seg, **imp
            )
        if not seg and ctx.has_input("segmentation_model"):
            seg = ctx.input("segmentation_model")
        return Study.load(
            ctx.run_dir,
            model=ctx.input("model"),
            latent=ctx.input("latent"),
            variant=cfg.variant,
            segmentation_model=seg,
            **imp,
        )
    except StudyError as e:
        raise StageError(str(e)) from e


def _fit_labelled(ctx: StageContext, study, cut: str | None, rejects: list) -> dict | None:
    """``embed.labelled_crops``: fit the study's image-only calls on them
    (:meth:`vae.api.Study.fit_labelled_crops`), cut as ``embed.crops`` is (``cut``); their
    skipped images join ``rejects``. Returns their summary for ``summary.json`` (None:
    not given)."""
    from vae.api import StudyError

    cfg = ctx.cfg
    p = cfg.embed.labelled_crops
    if not p:
        return None
    path = resolve_data_path(cfg, p, "embed.labelled_crops")
    setting = f"embed.labelled_crops={p}"
    try:
        fitted = study.fit_labelled_crops(path, **_segment_args(cfg, "crops", cut))
    except StudyError as e:
        raise _study_error(e, setting, path) from e
    log_read_rejects(setting, fitted.rejects)
    rejects += [{**r, "input": setting} for r in fitted.rejects]
    ctx.inputs["labelled_crops"] = path
    return fitted.as_dict()


def _study_variant(cfg, say: bool = True) -> str:
    """The train variant of ``embed.study`` to read: ``variant`` when the study has that
    train run, else its main one. ``variant=NAME`` names this embed's own folder (the
    documented way to run a second embed beside the first), and was taken as the
    study's: ``<study>/train/NAME/model.pt: no such file`` (concurrency audit). A
    study's sweep run is given as ``embed.study=<study>/train/<variant>``."""
    variant = str(cfg.variant or "")
    if not variant:
        return ""
    study = Path(str(cfg.embed.study)).expanduser()
    if (study / "train" / variant / "model.pt").exists():
        return variant
    if say:
        log.info(
            "embed.study=%s has no train/%s: its main train run is read (variant=%s names "
            "this embed's folder; a sweep run of the study: embed.study=%s/train/<variant>)",
            cfg.embed.study,
            variant,
            variant,
            cfg.embed.study,
        )
    return ""


def _nfc(values) -> np.ndarray:
    """Strings in Unicode NFC, other values (NaN) as they are.

    One name has two spellings: macOS writes file names decomposed (NFD: ``u`` +
    combining diaeresis), a spreadsheet composed (NFC: ``ü``). They look alike and
    compare unequal, so ``embed.samples_csv`` named none of the cells of
    ``Müller_1.png``; every side of a match is compared in NFC.
    """
    return np.array(
        [unicodedata.normalize("NFC", v) if isinstance(v, str) else v for v in values],
        dtype=object,
    )


def _samples(
    adata, kind: str, path: Path, cfg, mapping: pd.DataFrame | None, setting: str
) -> tuple[np.ndarray, int, np.ndarray, dict[str, set]]:
    """Sample of each row: the obs column ``embed.sample_key``, else the reader's
    sub-folder (image folders), else the input's name; the samples CSV overrides where it
    names a cell (or its image). A row whose column holds no value (NaN, ``""``), or that
    the samples CSV was given to name and does not, gets the input's name too, as a cell
    of an input without samples does (never a sample named ``""``).

    Returns
    -------
    (samples, named, fallback, matched)
        The samples (str), how many rows the samples CSV named, which rows got the
        input's name for want of their own (:func:`_warn_unnamed` says so), and the CSV's
        ``cell_id`` / ``image`` values that named a row (:func:`_warn_unmatched_rows`)."""
    from pipeline.config_embed import EmbedConfig
    from vae.analysis.samples import sample_names
    from vae.inputs.query import FOLDER_SAMPLE
    from vae.scverse import ROW_KEY

    key = cfg.embed.sample_key
    name = path.stem if path.is_file() else path.name
    has_own = True  # a column or folder gives the rows their samples
    if key in adata.obs:
        col = adata.obs[key]
    elif kind in ("smears", "crops") and FOLDER_SAMPLE in adata.obs:
        col = adata.obs[FOLDER_SAMPLE]
    elif key != EmbedConfig.sample_key and kind in ("h5ad", "expression"):
        # a column the user named that is not there would pool every cell into one sample
        raise StageError(
            f"embed.sample_key={key}: {setting} has no obs column {key!r} "
            f"(columns: {list(adata.obs.columns)[:20]})"
        )
    else:
        col, has_own = None, False
    if col is None:
        out = np.full(adata.n_obs, name, dtype=object)
        missing = np.ones(adata.n_obs, bool)
    else:
        v = pd.Series(col.to_numpy(dtype=object))
        # NaN (no value; astype(str) made it a sample "nan") and "" (a sample "" in
        # samples.csv): the input's name, as a cell of an input without samples
        missing = (v.isna() | (v.astype(str).str.strip() == "")).to_numpy()
        # as sample_profile reads a sample (7.0 of a column with gaps is "7", as without)
        out = sample_names(pd.DataFrame({"s": v}), "s", name)
    named = np.zeros(adata.n_obs, bool)
    matched: dict[str, set] = {"cell_id": set(), "image": set()}
    if mapping is not None:
        if "cell_id" in mapping:
            # rows naming an image only have no cell_id; a repeat (other columns aside)
            # names the same sample (_read_mapping refused clashes)
            ids_m = mapping.dropna(subset=["cell_id", "sample"]).drop_duplicates("cell_id")
            m = ids_m.set_index("cell_id")["sample"]
            ids = adata.obs["cell_id"] if "cell_id" in adata.obs else adata.obs_names.to_series()
            ids = pd.Series(_nfc(ids.astype(str)))  # the CSV's are NFC
            hit = ids.map(m).to_numpy()
            matched["cell_id"] |= set(ids[pd.notna(hit)])
            if "cell_id" not in adata.obs and ROW_KEY in adata.obs:
                # a paired table's rows, named by their cells (Study.embed): their row ids
                # (r000000 ..., obs["row"]), which named them before, name them too
                rows = pd.Series(_nfc(adata.obs[ROW_KEY].astype(str)))
                by_row = rows.map(m).to_numpy()
                matched["cell_id"] |= set(rows[pd.notna(by_row)])
                hit = np.where(pd.notna(hit), hit, by_row)
            named |= pd.notna(hit)
            out = np.where(pd.notna(hit), hit, out)
        if "image" in mapping and "image" in adata.obs:
            m = (
                mapping.dropna(subset=["image", "sample"])
                .drop_duplicates("image")
                .set_index("image")["sample"]
            )
            images = pd.Series(_nfc(adata.obs["image"].astype(str)))
            hit = images.map(m).to_numpy()
            matched["image"] |= set(images[pd.notna(hit)])
            named |= pd.notna(hit)
            out = np.where(pd.notna(hit), hit, out)
    # the input's name for want of a sample: said when the rows had a column (or folder)
    # to give them one, or a samples CSV to (an input of one sample is its own name)
    fallback = missing & ~named
    if not has_own and mapping is None:
        fallback[:] = False
    # a sample named by a folder (NFD on macOS) and by the CSV (NFC) is one sample
    return _nfc(out.astype(str)).astype(str), int(named.sum()), fallback, matched


def _json_shift(shift: dict | None) -> dict | None:
    """:meth:`vae.api.Study.input_shift` for summary.json (plain floats, rounded)."""
    if shift is None:
        return None
    return {**shift, "share": round(shift["share"], 4), "p": float(f"{shift['p']:.3g}")}


def _warn_unnamed(setting: str, tally: dict, key: str, samples_csv: str | None) -> None:
    """One warning per input for its cells given the input's name as their sample for
    want of one (``tally``: ``n``, ``ids`` (first few), ``sample``, ``column``: whether
    the input had the ``embed.sample_key`` column or sub-folders)."""
    if not tally.get("n"):
        return
    why = []
    if tally["column"]:
        why.append(f"no value in obs[{key!r}]")
    if samples_csv:
        why.append(f"not named by embed.samples_csv={samples_csv}")
    log.warning(
        "%s: %d cell(s) have no sample (%s), e.g. %s: they are put in sample %r (the "
        "input's name); give every cell its sample to keep patients apart",
        setting,
        tally["n"],
        " and ".join(why),
        ", ".join(tally["ids"][:3]),
        tally["sample"],
    )


def _warn_unmatched_rows(mapping: pd.DataFrame, matched: dict[str, set], samples_csv) -> None:
    """A warning for the rows of the samples CSV that named no embedded cell (another
    barcode format, a typo, a cell rejected or not given): with their count and a few."""
    hit = np.zeros(len(mapping), bool)
    for col in ("cell_id", "image"):
        if col in mapping:
            hit |= mapping[col].isin(matched[col]).to_numpy()
    miss = mapping[~hit]
    if not len(miss):
        return
    shown = [
        str(r.get("cell_id") if isinstance(r.get("cell_id"), str) else r.get("image"))
        for _, r in miss.head(3).iterrows()
    ]
    log.warning(
        "embed.samples_csv=%s: %d of its %d rows name no embedded cell, e.g. %s",
        samples_csv,
        len(miss),
        mapping.attrs.get("rows", len(mapping)),  # its rows with an empty sample counted too
        ", ".join(shown),
    )


def _read_mapping(cfg, say: bool = True) -> pd.DataFrame | None:
    """``embed.samples_csv`` read and checked (None without one); ``say``: warn of its rows
    without a sample (run_embed's reading; _validate's only refuses)."""
    if not cfg.embed.samples_csv:
        return None
    try:
        m = pd.read_csv(cfg.embed.samples_csv, dtype=str)
    except (OSError, ValueError, UnicodeDecodeError) as e:  # pandas' ParserError is a ValueError
        raise StageError(
            f"embed.samples_csv={cfg.embed.samples_csv}: not a readable CSV ({error_line(e)})"
        ) from e
    if "sample" not in m or not ({"cell_id", "image"} & set(m.columns)):
        raise StageError(
            f"embed.samples_csv={cfg.embed.samples_csv}: needs a 'sample' column and a "
            f"'cell_id' or 'image' column; has {list(m.columns)}"
        )
    for key in ("cell_id", "image", "sample"):
        if key in m:  # compared with the cells' names in NFC (_nfc); clashes too
            m[key] = _nfc(m[key])
    if not len(m):
        raise StageError(
            f"embed.samples_csv={cfg.embed.samples_csv}: no rows under its header {list(m.columns)}"
        )
    # a row without a sample names no patient: all of them is a CSV of empty samples
    # (said to name none of the cells before), some of them are said and skipped
    blank = (m["sample"].isna() | (m["sample"].astype(str).str.strip() == "")).to_numpy()
    if blank.all():
        raise StageError(
            f"embed.samples_csv={cfg.embed.samples_csv}: its 'sample' column is empty in all "
            f"{len(m)} rows: give each cell_id / image its sample"
        )
    if blank.any() and say:
        ids = [str(x) for x in m.loc[blank, "cell_id" if "cell_id" in m else "image"].head(3)]
        log.warning(
            "embed.samples_csv=%s: %d of its %d rows have an empty 'sample' (e.g. %s): "
            "skipped, as if not given",
            cfg.embed.samples_csv,
            int(blank.sum()),
            len(m),
            ", ".join(ids),
        )
    if blank.any():
        m = m[~blank].reset_index(drop=True)
    m.attrs["rows"] = len(blank)  # every row of the CSV, those skipped too (M of "N of its M")
    for key in ("cell_id", "image"):
        if key not in m:
            continue
        # one id given two samples: which patient the cell belongs to is unknown
        rows = m.dropna(subset=[key]).drop_duplicates([key, "sample"])
        clash = rows[rows[key].duplicated(keep=False)]
        if len(clash):
            first = clash[key].iloc[0]
            samples = sorted(clash.loc[clash[key] == first, "sample"].astype(str))
            raise StageError(
                f"embed.samples_csv={cfg.embed.samples_csv}: {key} {first!r} is given "
                f"{len(samples)} samples ({', '.join(samples)}); "
                f"{clash[key].nunique()} {key} value(s) are given more than one"
            )
    return m  # repeats with one sample: _samples keeps each id once


def _study_reads(cfg) -> dict[str, Path]:
    """The folders of ``embed.study`` this run reads (train run, detector), read-locked
    for the whole stage: unlocked, a study retrained meanwhile gave a query of the old
    model whose manifest named the new one (concurrency audit)."""
    from vae.api import StudyError, study_files

    if not cfg.embed.study:
        return {}
    try:  # the variant is said when the study is loaded
        files = study_files(cfg.embed.study, variant=_study_variant(cfg, say=False))
    except StudyError:
        return {}  # refused by Study.load, with its message, before anything is read
    out = {"embed.study's train run": files.train}
    seg = files.root / "segment_train" if files.root is not None else None
    if not cfg.paths.inputs.get("segmentation_model") and seg is not None and seg.is_dir():
        out["embed.study's detector"] = seg
    return out


@stage(
    "embed",
    needs=_needs,
    optional=_optional,
    produces=["query"],
    validate=_validate,
    reads=_study_reads,
)
def run_embed(ctx: StageContext) -> None:

    from vae.analysis.samples import sample_profile, write_samples_html
    from vae.api import StudyError
    from vae.data import PairedDataError
    from vae.inputs.expression import ExpressionInputError
    from vae.inputs.query import REJECT_COLUMNS, name_paired_rows
    from vae.scverse import ROW_KEY

    cfg = ctx.cfg
    study = load_study(ctx)
    if cfg.embed.knn_k is not None:
        from vae.inputs.schema import known_labels

        obs = study.reference.obs
        key = study.label_key
        n_known = int(np.sum(known_labels(obs[key].astype(str).to_numpy()))) if key in obs else 0
        if int(cfg.embed.knn_k) > n_known:
            # more neighbours than labelled cells: every call would be the commonest label
            raise StageError(
                f"embed.knn_k={cfg.embed.knn_k} is more than the study's {n_known} reference "
                "cells with a label"
            )
        study.analysis["knn_k"] = int(cfg.embed.knn_k)
    mapping = _read_mapping(cfg)
    parts, rejects, genes = [], [], {}
    log.info(
        "study: %s (%d reference cells, %d genes, %d px crops)",
        study.model_path,
        study.reference.n_obs,
        len(study.gene_names),
        study.crop_size,
    )
    # the manifest names what was used: the study's model and latent, and its detector
    ctx.inputs["model"], ctx.inputs["latent"] = Path(study.model_path), Path(study.latent_path)
    cuts = _cuts(cfg, study)  # auto: as the study's training crops (masked or whole)
    if _uses_detector(cfg, cuts):
        _report_detector(ctx, study)
        _warn_cut_unlike_study(cfg, study)
    labelled = _fit_labelled(ctx, study, cuts.get("crops"), rejects)
    seen = {"images": 0, "expression": 0}  # cells the study already holds, by kind
    # per part: (input file, its rows) where its crops stayed in a streamed input, else None
    crop_files: list[tuple[Path, np.ndarray] | None] = []
    named_by_csv = 0  # cells embed.samples_csv names, over every input
    matched: dict[str, set] = {"cell_id": set(), "image": set()}  # CSV values that named one
    # the expression file, before any input is embedded: its blocks (an .h5ad, 10x .h5
    # or table of cells as rows: a block of rows at a time whatever its size, only the
    # study's genes of a block made dense), else None (read whole: a 10x matrix folder,
    # genes as rows...) once its whole read was found to fit. Before, a file too large to
    # read whole was refused only when its turn came, after the smears were segmented
    whole = _expression_input(study, cfg)
    for kind, p in _inputs(cfg):
        path = resolve_data_path(cfg, p, f"embed.{kind}")
        setting = f"embed.{kind}={p}"
        stream = kind == "h5ad" and streams(cfg, path)
        names, paired = _h5ad_obs_names(path) if stream else (None, None)
        first = len(parts)  # this input's parts: parts[first:] (one per block)
        unnamed = {"n": 0, "ids": [], "sample": "", "column": False}  # cells without a sample
        try:
            blocks = h5ad_blocks(path) if stream else [None]
            if kind == "expression" and whole is not None:
                blocks = whole
            for block in blocks:
                if interrupted():  # a Ctrl-C a library swallowed: no next block
                    raise KeyboardInterrupt
                if paired is not None:  # named over the whole table, not block by block
                    obs = block.obs.copy()
                    name_paired_rows(obs, paired[names.get_indexer(block.obs_names)])
                    block.obs = obs
                q = _embed_one(
                    study,
                    cfg,
                    path,
                    kind,
                    setting,
                    block,
                    rejects,
                    whole if kind == "expression" else None,
                    cuts.get(kind),
                )
                if q is None:
                    continue
                if stream:  # crops stay in the input file (same obs_names), not in memory
                    q.obsm.pop("crops", None)
                    q.obsm.pop("masks", None)
                before = len(parts)
                named_by_csv += _collect(
                    q, cfg, kind, path, setting, mapping, genes, rejects, parts, unnamed, matched
                )
                if len(parts) > before:  # the page's example crops are read from there
                    own = q.obs[ROW_KEY] if paired is not None else q.obs_names  # file's names
                    crop_files.append((path, names.get_indexer(own)) if stream else None)
        except PairedDataError as e:
            raise StageError(f"{setting}: {e}") from e
        except ExpressionInputError as e:
            # a table's blocks are read as they are embedded: one changed since its
            # first pass is refused then (it gave an uncaught error, or fewer cells)
            raise _study_error(e, setting, path) from e
        _warn_unnamed(setting, unnamed, cfg.embed.sample_key, cfg.embed.samples_csv)
        if len(parts) > first:
            # cells the study's reference already holds (images named like its crops': a
            # review embedded TXL-PBC val smears, which +preset=real trains on; profiles
            # with its cell ids: an audit embedded 400 of the study's own Paul15 cells), by
            # name only: one warning per input with its totals (Study.embed, told not to,
            # warned once a block: 132 of 8192, 133 of 8192, 133 of 3616 for one file)
            obs = parts[first].obs if len(parts) == first + 1 else _obs_of(parts[first:])
            for k, n in study.warn_seen(obs, setting).items():
                seen[k] += n
            # most of the input atypical: said with its totals and the usual causes
            study.warn_atypical(obs, setting)
    if not parts:
        with ctx.atomic("rejects.csv") as tmp:  # what was skipped, kept with the failed run
            spreadsheet_safe(pd.DataFrame(rejects, columns=REJECT_COLUMNS)).to_csv(tmp, index=False)
        shown = "; ".join(f"{r.get('item')}: {r.get('reason')}" for r in rejects[:3])
        raise StageError(
            f"stage=embed: no cell in any input ({len(rejects)} reject row(s), e.g. {shown}; "
            f"all in this run's rejects.csv)"
        )
    if mapping is not None and not named_by_csv:
        # ids that match no cell (another barcode format?) would pool every patient
        with ctx.atomic("rejects.csv") as tmp:
            spreadsheet_safe(pd.DataFrame(rejects, columns=REJECT_COLUMNS)).to_csv(tmp, index=False)
        ids = [str(x) for x in parts[0].obs_names[:3]]
        raise StageError(
            f"embed.samples_csv={cfg.embed.samples_csv}: names none of the {sum(q.n_obs for q in parts)} "
            f"cells embedded (its cell_id / image values vs the cells' ids, e.g. {ids})"
        )
    if mapping is not None:
        _warn_unmatched_rows(mapping, matched, cfg.embed.samples_csv)
    sizes = [q.n_obs for q in parts]
    # crops and masks leave the parts before the concat and are written after the table,
    # input by input (add_obsm_rows): an input without images is never padded with zero
    # crops in memory (100k expression cells beside 1000 crops held 1.6 GB of zeros)
    images = {k: [q.obsm.pop(k, None) for q in parts] for k in ("crops", "masks")}
    out = _concat(parts) if len(parts) > 1 else parts[0]
    out.uns["genes"] = json.dumps(genes)
    try:  # the histogram is of the cells on the path's lineage
        path_classes = list(study.maturation_path()[0].names)
    except StudyError:
        path_classes = None  # no path: maturation is NaN anyway
    # the classes a cell of each modality can be called: samples.csv's not_callable
    # (NaN shares) and the page's "not callable from ..." read the same
    callable_calls = {
        m: study.callable_labels(m) for m in out.obs["vae_modality"].astype(str).unique()
    }
    prof = sample_profile(
        out.obs,
        "vae_sample",
        int(cfg.embed.histogram_bins),
        path_classes,
        study.call_labels,  # the study's classes and those of embed.labelled_crops
        callable_calls,
    )
    crops = None  # the page's example crops (None: "No images among the inputs")
    if any(c is not None for c in images["crops"]) or any(crop_files):
        crops = _CropLookup(images["crops"], sizes, crop_files)
    with ctx.atomic("rejects.csv") as tmp:
        spreadsheet_safe(pd.DataFrame(rejects, columns=REJECT_COLUMNS)).to_csv(tmp, index=False)
    with ctx.atomic("samples.csv") as tmp:
        spreadsheet_safe(prof).to_csv(tmp, index=False)
    with ctx.atomic("samples.html") as tmp:
        write_samples_html(
            tmp,
            prof,
            out.obs,
            crops,
            int(cfg.embed.examples_per_call),
            title=f"Per-sample maturation profile ({cfg.experiment})",
            seed=int(cfg.seed),
            notes=_page_notes(
                study,
                path_classes,
                bool((out.obs["vae_input"] == "smears").any()),
                seen=seen,
                n_cells=int(out.n_obs),
                genes=genes,
            ),
            min_confidence=study.min_confidence,
            atypical_quantile=study.atypical_quantile,
            atypical_off=study.atypical_off,
            callable_calls=callable_calls,
        )
    write_json(
        ctx.output("summary.json"),
        {
            "study": {"model": str(study.model_path), "latent": str(study.latent_path)},
            "cells": int(out.n_obs),
            "by_input": out.obs["vae_input"].value_counts().to_dict(),
            "by_modality": out.obs["vae_modality"].value_counts().to_dict(),
            # the labels called (categories the study has but none was called: not listed)
            "by_label": out.obs["vae_label"].astype(str).value_counts().to_dict(),
            "by_call": out.obs["vae_call"].astype(str).value_counts().to_dict(),
            "unclassified": {
                "atypical": int(out.obs["vae_atypical"].sum()),
                "low_confidence": int(
                    (out.obs["vae_label_confidence"] < study.min_confidence).sum()
                ),
                "min_confidence": study.min_confidence,
                "atypical_quantile": study.atypical_quantile,
                # "off: <why>" where the study cannot flag any cell (an old latent.h5ad
                # without its held-out scores), so a 0 above is not read as "none seen"
                "atypical_flagging": (
                    "off: embed.atypical_quantile=null"
                    if study.atypical_quantile is None
                    else f"off: {study.atypical_off}"
                    if study.atypical_off
                    else "on"
                ),
                # NaN (no threshold) as null: summary.json stays strict JSON
                "atypical_thresholds": {
                    k: (v if np.isfinite(v) else None)
                    for k, v in study.atypical_thresholds().items()
                },
            },
            # the cells as a whole against the study's own held-out cells (Study.input_shift:
            # the share above their 75th percentile, a quarter expected; null: no scores),
            # which a new microscope moves where few of its cells are atypical
            "shift_from_study": _json_shift(study.input_shift(out)),
            # embed.labelled_crops: what the image-only cells were called from (null: the
            # study's own labelled cells)
            "labelled_crops": labelled,
            # how each image input's cells were cut (detector mask / whole square): a
            # reader comparing two embeds sees whether their crops were cut alike
            "crop_masks": {"setting": str(cfg.embed.crop_masks), **cuts},
            "samples": int(len(prof)),
            "rejects": len(rejects),
            "cells_from_images_the_study_trained_on": seen["images"],
            "cells_from_expression_the_study_trained_on": seen["expression"],
            "genes": genes,
        },
    )
    starts = np.cumsum([0, *sizes])
    _write_qupath(ctx, out.obs, images["masks"], starts, study.call_labels)
    _query_obs_for_writing(out, study.call_labels)
    blocks = {
        k: [(int(b), a) for b, a in zip(starts, arrays) if a is not None]
        for k, arrays in images.items()
    }
    with ctx.atomic("query") as tmp:
        # gzip: rows of an input without images read as zero crops, which took 1.6 GB for
        # 100k expression cells beside 1000 crops uncompressed (scale audit); now they
        # are chunks never written (add_obsm_rows) and take no space at all
        extra = sum(array_bytes(a, "gzip") for b in blocks.values() for _, a in b)
        check_h5ad_fits(out, tmp, "gzip", extra)  # the user's obs columns stay as given
        out.write_h5ad(tmp, compression="gzip")
        for key, b in blocks.items():
            if b:
                add_obsm_rows(tmp, key, out.n_obs, b, compression="gzip")
    log.info("embed: %d cells, %d samples, %d rejects", out.n_obs, len(prof), len(rejects))


# what each cell carries into QuPath's measurement table (query.h5ad's columns)
QUPATH_MEASUREMENTS = (
    "vae_label_confidence",
    "vae_maturation",
    "anomaly_score",
    "score",
    "area",
    "cell_diameter",
)


def qupath_file_names(obs: pd.DataFrame) -> list[str]:
    """Each smear cell's ``qupath/`` file: ``<sample>/<image stem>`` (``<stem>_<ext>``
    where two images of a sample share a stem), so a slide's objects are found beside
    the patient they belong to and imported into the image of that name."""
    from pipeline.stages.segment import short_stem

    def safe(text: str) -> str:
        return short_stem(str(text).replace("/", "_").replace("\\", "_")) or "_"

    pairs = list(zip(obs["vae_sample"].astype(str), obs["image"].astype(str)))
    stems: dict[tuple[str, str], set[str]] = {}
    for sample, image in set(pairs):
        stems.setdefault((sample, Path(image).stem), set()).add(image)
    names = {}
    for sample, image in set(pairs):
        p = Path(image)
        twin = len(stems[(sample, p.stem)]) > 1
        stem = f"{p.stem}_{p.suffix[1:].lower()}" if twin else p.stem
        names[(sample, image)] = f"{safe(sample)}/{safe(stem)}"
    return [names[k] for k in pairs]


def _write_qupath(ctx: StageContext, obs, masks: list, starts, classes: list[str]) -> None:
    """``qupath/``: the smear cells' outlines with their calls, for review on the slide
    in QuPath (segment's ``write_qupath``); crops and expression rows have no slide."""
    from pipeline.stages.segment import write_qupath
    from vae.api import UNCLASSIFIED

    on_smears = [
        k
        for k, m in enumerate(masks)
        if m is not None and (obs["vae_input"].iloc[starts[k] : starts[k + 1]] == "smears").all()
    ]
    if not on_smears:
        return
    sub = obs.iloc[np.concatenate([np.arange(starts[k], starts[k + 1]) for k in on_smears])]
    m = np.concatenate([masks[k] for k in on_smears])
    said = write_qupath(
        ctx,
        sub,
        m,
        qupath_file_names(sub),
        classification="vae_call",
        measurements=QUPATH_MEASUREMENTS,
        classes=[*classes, UNCLASSIFIED],
    )
    log.info("%s", said)


def _query_obs_for_writing(out, classes: list[str]) -> None:
    """The pipeline's ``vae_*`` string columns of ``out.obs`` as written, in place:
    ``vae_label`` / ``vae_call`` categoricals over the study's classes in its order, then
    ``unclassified`` (the colours of the study's plots, whichever classes were called; a
    concat of several inputs loses them), and ``""`` (no value) as NaN, which scanpy
    greys as NA. The user's own obs columns stay as given."""
    from segmentation.io import blank_as_missing
    from vae.api import UNCLASSIFIED, label_categorical

    obs = out.obs
    for col in ("vae_label", "vae_call"):
        obs[col] = label_categorical(obs[col].astype(str).to_numpy(), [*classes, UNCLASSIFIED])
    out.obs = blank_as_missing(obs, [c for c in obs.columns if c in QUERY_STRING_COLUMNS])


def _page_notes(
    study,
    path_classes: list[str] | None,
    smears: bool = False,
    seen: dict[str, int] | None = None,
    n_cells: int = 0,
    genes: dict[str, dict] | None = None,
) -> list[str]:
    """What samples.html says about the study it read the cells with (``smears``: cells
    of smears were embedded, so qupath/ holds them on their images), about cells it
    already holds (``seen``, of ``n_cells``: summary.json's counts) and about the genes
    an input lacked (``genes``: summary.json's gene reports by input)."""
    from vae.inputs.schema import HAS_IMAGE

    notes = [f"Study: model {study.model_path}, reference latent {study.latent_path}."]
    fitted = study.labelled_crops
    if fitted is not None:  # embed.labelled_crops: where the image-only calls come from
        notes.append(
            f"Cells with an image only are called from {sum(fitted.counts.values())} labelled "
            f"crops of {fitted.source} ({', '.join(f'{c} {n}' for c, n in fitted.counts.items())}; "
            f"cross-validated accuracy {fitted.cv_accuracy:.2f}), not from the study's "
            "own labelled cells (embed.labelled_crops; summary.json labelled_crops). Such a "
            f"cell is unclassified where that call's probability is below "
            f"{study.min_confidence:g} or it is less like the study's cells than "
            + (
                f"{100 * study.atypical_quantile:g} % of the labelled crops"
                if study.atypical_quantile is not None
                else "any (atypical flagging off)"
            )
            + "."
        )
        off = {c: v for c, v in fitted.path_check.items() if v["nearest"] != c}
        if off:  # the crops change the calls, not the codes (Study._path_check)
            notes.append(
                "The maturation positions and the histogram are not to be read for these "
                "cells: the labelled "
                + ", ".join(
                    f"{c} crops lie nearest {v['nearest']} on the path" for c, v in off.items()
                )
                + " (median position "
                + ", ".join(
                    f"{v['median']:.2f} vs their place {v['knot']:.2f}" for v in off.values()
                )
                + "): the crops set the calls, but a position is still the code's "
                "projection onto a path of the study's microscopes (summary.json "
                "labelled_crops.path_check)."
            )
    seen = seen or {}
    if seen.get("images"):
        notes.append(
            f"{seen['images']} of the {n_cells} cells come from image files named like "
            "images the study's reference holds (its training, validation or test cells; "
            "matched by file name only; summary.json cells_from_images_the_study_trained_on): "
            "if they are those images, these cells are the study's own, and their calls "
            "are not those of new patients."
        )
    if seen.get("expression"):
        notes.append(
            f"{seen['expression']} of the {n_cells} cells have the cell ids of expression "
            "profiles the study's reference holds (its training, validation or test cells; "
            "matched by id only; summary.json cells_from_expression_the_study_trained_on): "
            "if they are those cells, they are the study's own, and their calls are not "
            "those of new patients."
        )
    for setting, g in (genes or {}).items():
        missing = g.get("missing") or []
        if missing:
            notes.append(
                f"{setting}: {len(missing)} of the model's {g.get('n_model_genes')} genes "
                f"are missing from this input and were imputed (embed.impute="
                f"{g.get('impute')}): their values are the model's estimates, not "
                "measurements (summary.json genes)."
            )
    if smears:
        notes.append(
            "Each smear's cells with their calls, confidence and maturation position, on "
            "the image: qupath/<sample>/<image>.geojson beside this page (QuPath: open the "
            "image, then File > Import objects from file)."
        )
    if not path_classes:
        return notes
    notes.append(
        f"Maturation path of this study: {' -> '.join(path_classes)} (position 0 = "
        f"{path_classes[0]}, 1 = {path_classes[-1]})."
    )
    ref = study.reference.obs
    if HAS_IMAGE in ref and study.label_key in ref:
        from vae.data import parse_flag  # the text "False" is False (astype(bool): True)

        crop = parse_flag(ref[HAS_IMAGE], str(study.latent_path), HAS_IMAGE, ref.index)
        with_crop = set(ref[study.label_key].astype(str)[crop])
        missing = [c for c in path_classes if c not in with_crop]
        if missing:
            notes.append(
                f"The study has no crop labelled {', '.join(missing)}: a cell seen only as "
                "an image is placed on that part of the path by a projection of its image "
                "code, not because it looks like such a cell, so positions and stages "
                "there are not evidence of immature cells."
            )
    return notes


MAX_LOGGED_REJECTS = 20  # reasons logged, one line each; every skipped file is in rejects.csv
NAMES_PER_REASON = 3  # files a grouped line names as examples


def log_read_rejects(setting: str, read_rejects: list[dict]) -> None:
    """One WARNING line per distinct reason, not per file.

    The terminal audit (docs/reliability.md) found ``embed.smears=DIR`` logging one
    ``skipped FILE: no cells kept`` line per smear (up to 20): a folder of smears where
    the detector keeps nothing filled the screen with the same sentence. Files that share
    a reason are now counted in one line naming a few of them; a reason of one file keeps
    the old wording. rejects.csv still lists every file.
    """
    groups: dict[str, list[str]] = {}
    for r in read_rejects:
        groups.setdefault(str(r.get("reason", "")), []).append(str(r.get("item", "?")))
    for k, (reason, items) in enumerate(groups.items()):
        if k == MAX_LOGGED_REJECTS:
            rest = sum(len(v) for v in list(groups.values())[k:])
            log.warning("%s: %d more skipped (rejects.csv)", setting, rest)
            break
        if len(items) == 1:
            log.warning("%s: skipped %s: %s", setting, items[0], reason)
            continue
        names = ", ".join(Path(i).name for i in items[:NAMES_PER_REASON])
        more = ", ..." if len(items) > NAMES_PER_REASON else ""
        log.warning(
            "%s: %d files skipped: %s (%s%s; each in rejects.csv)",
            setting,
            len(items),
            reason,
            names,
            more,
        )


def _study_error(e, setting: str, path) -> StageError:
    """A :class:`vae.api.StudyError` as the stage's error, naming the setting once."""
    msg = str(e)
    for prefix in (f"{setting}: ", f"{path}: "):  # the error may already name them
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return StageError(f"{setting}: {msg}")


def _expression_input(study, cfg):
    """``embed.expression``'s blocks (:func:`_expression_blocks`), or None: no such input,
    or a file read whole whose whole read fits in the memory available (else refused
    here, before any input is embedded, with what to do)."""
    from vae.api import StudyError

    if not cfg.embed.expression:
        return None
    p = cfg.embed.expression
    path = resolve_data_path(cfg, p, "embed.expression")
    setting = f"embed.expression={p}"
    if not study.gene_names:
        raise StageError(
            f"{setting}: the study's model has no gene (trained with pair=image_only), "
            "so it cannot embed expression profiles; embed smears or crops instead"
        )
    blocks = _expression_blocks(study, cfg, path, setting)
    if blocks is None:
        try:
            study.check_whole_read_fits(path, cfg.expression.orientation)
        except StudyError as e:
            raise _study_error(e, setting, path) from e
    return blocks


def _expression_blocks(study, cfg, path, setting):
    """``embed.expression`` as blocks of rows (:meth:`vae.api.Study.read_blocks`), or
    None where the file is read whole (a 10x matrix folder, CSC, transposed...).

    Read whole, a 300k cells x 20k genes ``.h5ad`` took 7.55 GiB and a 1M-cell atlas
    did not fit (docs/embed.md, "Large expression files")."""
    from vae.api import StudyError

    try:
        blocks = study.read_blocks(
            path,
            orientation=cfg.expression.orientation,
            counts_layer=cfg.expression.counts_layer,
        )
    except StudyError as e:
        raise _study_error(e, setting, path) from e
    if blocks is not None and blocks.n_obs > blocks.rows:
        log.info("%s: %d cells, read and embedded %d at a time", setting, blocks.n_obs, blocks.rows)
    return blocks


def _embed_one(study, cfg, path, kind, setting, block, rejects, whole=None, cut=None):
    """One input (or one block of a streamed h5ad; ``whole``: the expression file
    ``block`` is a block of; ``cut``: how an image folder's cells are cut, :func:`_cuts`)
    through ``Study.embed``; None: no cells."""
    from vae.api import StudyError

    try:
        # an expression file is read with stage=expression's settings of its layout
        # (expression.orientation, expression.counts_layer), as its errors name them
        how = (
            {"orientation": cfg.expression.orientation, "counts_layer": cfg.expression.counts_layer}
            if kind == "expression"
            else _segment_args(cfg, kind, cut)
        )
        adata = study.read(path, kind, **how) if block is None else block
        read_rejects = list(adata.uns.pop("rejects", []))
        log_read_rejects(setting, read_rejects)
        # every row names its input as the setting that gave it (embed.crops=DIR)
        rejects += [{**r, "input": setting} for r in read_rejects]
        if kind == "expression" and adata.n_vars == 0:
            raise StageError(f"{setting}: var_names: no genes (an expression input with 0 columns)")
        # too few of the model's genes: refused before the imputation runs (the genes the
        # study reads: .raw's when the counts are there; none at all: Study names the
        # model's and the input's genes itself); Study.embed's own check, with the
        # setting's name here
        missing = study.missing_genes(adata, whole)
        if missing is not None:
            n_model = len(study.gene_names)
            if len(missing) > cfg.embed.max_missing_genes * n_model:
                raise StageError(
                    f"{setting}: var_names match only {n_model - len(missing)} of the model's "
                    f"{n_model} genes (missing e.g. {missing[:5]}); more than "
                    f"embed.max_missing_genes={cfg.embed.max_missing_genes} of them are missing"
                )
        if adata.n_obs == 0:
            why = f"{len(read_rejects)} file(s) skipped" if read_rejects else "no cell found"
            if kind in ("smears", "crops") and block is None and path.is_dir():
                from vae.inputs.query import sample_images

                if not sample_images(path):  # the reader's own walk (linked folders too)
                    why = "no image file in the folder or its sub-folders"
            rejects.append({"input": setting, "item": str(path), "reason": f"no cells ({why})"})
            log.warning("%s: no cells (%s)", setting, why)
            return None
        # cells the study holds, and most cells atypical: warned by run_embed once for the
        # input, not per block
        return study.embed(
            adata,
            setting,
            int(cfg.embed.batch_size),
            whole=whole,
            warn_seen=False,
            warn_atypical=False,
            max_missing_genes=None,  # checked above against embed.max_missing_genes
        )
    except StudyError as e:
        raise _study_error(e, setting, path) from e


def _collect(
    q, cfg, kind, path, setting, mapping, genes, rejects, parts, unnamed=None, matched=None
) -> int:
    """Record the gene match of an embedded input (checked in :func:`_embed_one`), label
    its rows and keep it in ``parts``; returns how many of its cells the samples CSV
    names (0 without one). ``unnamed`` tallies the input's cells put in its name's sample
    for want of their own, ``matched`` the samples CSV's values that named a cell
    (:func:`_samples`)."""
    genes[setting] = json.loads(q.uns.get("genes", "{}"))
    for cid in q.uns.get("dropped", []):
        rejects.append(
            {
                "input": setting,
                "item": cid,
                "reason": "no usable image (none, or an empty mask) and no expression (a "
                "profile of zero counts is none)",
            }
        )
    if q.n_obs == 0:  # every cell dropped: the rows above say why; no empty part kept
        log.warning("%s: no cell left to embed (rejects.csv)", setting)
        return 0
    q.obs["vae_input"] = kind
    q.obs["vae_sample"], named, fallback, hits = _samples(q, kind, path, cfg, mapping, setting)
    if unnamed is not None and fallback.any():
        unnamed["n"] += int(fallback.sum())
        unnamed["ids"] += [str(x) for x in q.obs_names[fallback][: 3 - len(unnamed["ids"])]]
        unnamed["sample"] = str(q.obs["vae_sample"].to_numpy()[fallback][0])
        unnamed["column"] = cfg.embed.sample_key in q.obs or (
            kind in ("smears", "crops") and "sample" in q.obs
        )
    if matched is not None:
        for k in matched:
            matched[k] |= hits[k]
    if mapping is not None:
        log.info("%s: embed.samples_csv names %d of its %d cells", setting, named, q.n_obs)
    # seen_by_study: a block's count; run_embed counts (and warns of) the whole input
    for k in ("genes", "dropped", "rejects", "seen_by_study"):
        q.uns.pop(k, None)
    parts.append(q)
    log.info("%s: %d cells embedded", setting, q.n_obs)
    return named


def _report_detector(ctx: StageContext, study) -> None:
    """Log the detector the smears / crop masks go through and why, record it as an input,
    and warn when it was trained on simulated smears only (a demo study's detector on
    real smears keeps fragments and misses cells: use the shipped one there)."""
    from segmentation.shipped import SHIPPED_DETECTOR

    cfg = ctx.cfg
    seg = study.segmentation_model
    if seg is None or Path(seg) == SHIPPED_DETECTOR:
        seg = SHIPPED_DETECTOR
        why = "the detector shipped with the package (no segment_train run in the study)"
    elif cfg.paths.inputs.get("segmentation_model"):
        why = "paths.inputs.segmentation_model"
    else:
        why = "the study's segment_train model"
    log.info("detector: %s (%s)", seg, why)
    if Path(seg).is_file():
        ctx.inputs["segmentation_model"] = Path(seg)
    if Path(seg) == SHIPPED_DETECTOR:
        return
    data = _detector_data(Path(seg))
    if data == "synthetic":
        log.warning(
            "detector %s was trained on simulated smears only (data=synthetic), at a fixed "
            "scale: on real smears it keeps fragments and misses cells. For real smears "
            "pass paths.inputs.segmentation_model=%s (the detector shipped with the "
            "package, which measures each smear's magnification)",
            seg,
            SHIPPED_DETECTOR,
        )


def _detector_data(path: Path) -> str | None:
    """``data.name`` a segment_train model was trained on: from its stage manifest, else
    from the checkpoint's saved config; None when neither says."""
    from pipeline.artifacts import read_manifest

    man = read_manifest(path.parent) if path.name == "model.pt" else None
    if man and man.get("stage") == "segment_train":
        return (man.get("config", {}).get("data") or {}).get("name")
    return ((_detector_ckpt(path).get("config") or {}).get("data") or {}).get("name")


def _study_segment_run(study) -> tuple[dict, Path] | None:
    """The manifest of the study's own ``stage=segment`` run (``<study>/segment`` beside
    ``train``) and the study folder holding it, or None (no such run: crops from
    elsewhere)."""
    from pipeline.artifacts import read_manifest

    for d in list(Path(study.model_path).parents)[:3]:  # train/, train/<variant>/
        man = read_manifest(d / "segment")
        if man and man.get("stage") == "segment":
            return man, d
    return None


# the segmentation.* settings that set the scale a smear is read at
SCALE_SETTINGS = ("input_scale", "estimate_scale", "refine_scale", "scale_spread", "cell_px")


def study_smear_scales(run_config: dict) -> tuple[list[str], list[float]] | None:
    """The fixed scales a study's ``stage=segment`` read its smears at, when it read
    ``data.segment_sources`` and every smear source there has one (``scale``, and
    ``scale_by_width`` per image width); None otherwise (one folder read with
    ``segmentation.*``, or a source some of whose images were measured, which those
    settings describe: no ``scale``, even with ``scale_by_width`` for some widths).

    Returns
    -------
    (descriptions, scales): one description per smear source (``"bccd 0.21"``,
    ``"txl_pbc_train 0.2 (by image width 575 px: 0.15, ...)"``) and every scale named.
    """
    srcs = ((run_config.get("data") or {}).get("segment_sources")) or []
    smears = [s for s in srcs if isinstance(s, dict) and s.get("kind", "smears") == "smears"]
    if not smears:
        return None
    text, scales = [], []
    for s in smears:
        by = s.get("scale_by_width") or {}
        if s.get("scale") is None:
            # measured per image, with the segmentation.* settings (with scale_by_width
            # alone, every image of a width it does not list: review of ae89767)
            return None
        d = f"{s.get('name') or s.get('path')} {s['scale']}"
        scales.append(float(s["scale"]))
        if by:
            d += " (by image width " + ", ".join(f"{w} px: {v}" for w, v in by.items()) + ")"
            scales += [float(v) for v in by.values()]
        text.append(d)
    return text, scales


# segmentation.* settings that change which cells of a smear are kept or how they are
# cut and framed (settings_from_config, detector_kwargs, the scale): new cells read with
# other values than the study's own stage=segment are not cut like its reference cells
CUT_SETTINGS = (
    # the scale the smear is read at
    "input_scale",
    "estimate_scale",
    "refine_scale",
    "scale_spread",
    "cell_px",
    # detection and the tiles' merge
    "tile_size",
    "tile_overlap",
    "detect_score_floor",
    "mask_threshold",
    "max_detections_per_tile",
    "rpn_post_nms_top_n",
    "merge_iou",
    "merge_containment",
    # the crop
    "crop_size",
    "crop_margin",
    "background_value",
    "trim_rim",
    # the filters
    "score_threshold",
    "min_area",
    "max_area",
    "drop_border",
    "border_margin",
    "max_overlap_iou",
    "duplicate_containment",
    "drop_multi_piece",
    "min_piece_area",
    "drop_tile_cut",
    "touch_px",
    "min_solidity",
    "max_area_ratio",
    "min_cells_area_ratio",
)

# a cut setting added after studies were segmented: the value that does what the code
# did before it existed (the filters of 2026-11-30, 835515b, were new; the rim trim of
# 2026-12-04, 5799a34; the measured scale of 2026-11-30, 16cef77)
CUT_LEGACY: dict[str, Any] = {
    "trim_rim": 0.0,
    "drop_tile_cut": False,
    "touch_px": None,
    "min_solidity": None,
    "max_area_ratio": None,
    "estimate_scale": False,
    "refine_scale": False,  # 2026-11-30 (965a1d6): the estimate alone
    "scale_spread": None,  # 2026-12-01 (c19c46e): each image on its own
}

# settings read only while another is on: setting -> (switch, the switch's "off" test)
CUT_MOOT: dict[str, tuple[str, Any]] = {
    "border_margin": ("drop_border", lambda v: not v),
    "min_piece_area": ("drop_multi_piece", lambda v: not v),
    "min_cells_area_ratio": ("max_area_ratio", lambda v: v is None),
}


def _detector_ckpt(path) -> dict:
    """The checkpoint dict of a detector (its scale flags), {} when unreadable."""
    try:
        from segmentation.io import load_torch_file

        ck = load_torch_file(path)
    except Exception:  # noqa: BLE001 - the study loads it and names a broken file itself
        return {}
    return ck if isinstance(ck, dict) else {}


def _study_detector(study) -> Path | None:
    """The detector the study's own stage=segment ran with (its manifest's input; in a
    copied study, the copy's own), or None when it is gone."""
    from pipeline.artifacts import recorded_input_path

    run = _study_segment_run(study)
    if run is None:
        return None
    man, d = run
    rec = (man.get("inputs") or {}).get("segmentation_model")
    if not isinstance(rec, dict):
        return None
    p = recorded_input_path(rec, man, d)
    return p if p.is_file() else None


def cut_differences(now: dict, rec: dict, now_ckpt: dict, rec_ckpt: dict) -> list[tuple]:
    """The cut settings (:data:`CUT_SETTINGS`) of this run that differ from a study's.

    Parameters
    ----------
    now : this run's ``segmentation`` settings; rec : the study's segment run's
    now_ckpt, rec_ckpt : the checkpoints of the detectors each reads smears with: a
        ``null`` scale flag follows its detector
        (:func:`segmentation.shipped.wants_scale_estimate`)

    Returns
    -------
    ``(key, study value, this run's value, recorded)`` for each difference, in
    :data:`CUT_SETTINGS` order; ``recorded`` False: the study's run predates the setting
    (its value is the one in :data:`CUT_LEGACY`, or None when unknown).
    """
    from segmentation.shipped import wants_scale_estimate, wants_scale_refinement

    def value(side: dict, key: str, ckpt: dict):
        v = side.get(key, CUT_LEGACY.get(key))
        if key == "estimate_scale":
            return wants_scale_estimate(v, ckpt)
        if key == "refine_scale":
            return wants_scale_refinement(v, ckpt)
        return v

    est_now = value(now, "estimate_scale", now_ckpt)
    est_rec = value(rec, "estimate_scale", rec_ckpt)
    out = []
    for key in CUT_SETTINGS:
        if key in ("refine_scale", "scale_spread") and not (est_now or est_rec):
            continue  # read only when the scale is measured
        if key == "cell_px" and not now.get("estimate_scale"):
            continue  # embed measures at the detector's own cell_px unless told to measure
        if key == "input_scale" and est_now and est_rec:
            continue  # a fallback only, where both measure the scale
        if key in CUT_MOOT:
            switch, off = CUT_MOOT[key]
            if off(value(now, switch, now_ckpt)) and off(value(rec, switch, rec_ckpt)):
                continue
        recorded = key in rec
        if (
            not recorded
            and key in CUT_MOOT
            and CUT_MOOT[key][1](value(rec, *CUT_MOOT[key][:1], rec_ckpt))
        ):
            continue  # the study had no such filter: its switch's line says so
        if not recorded and key not in CUT_LEGACY:
            out.append((key, None, value(now, key, now_ckpt), False))  # what it was: unknown
            continue
        a, b = value(rec, key, rec_ckpt), value(now, key, now_ckpt)
        if a != b and not (_number(a) and _number(b) and float(a) == float(b)):
            out.append((key, a, b, recorded))
    return out


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _warn_cut_unlike_study(cfg, study) -> None:
    """Warn once when new cells are segmented with other cut settings than the study's
    own cells (:data:`CUT_SETTINGS`), naming each difference and the overrides that cut
    them alike. An audit embedded 4 smears with an old study: filters it never applied
    (``drop_tile_cut``, ``touch_px``, ``min_solidity``, ``max_area_ratio``) and
    ``border_margin`` 2 instead of 1 kept 15 cells where its own run kept 18, and the
    image code then reads mask edges the reference never had (the rim trim: on the real
    chain's own TXL-PBC val smears, re-embedded, the codes lie a median 1.5 / 1.25 from
    the cells' reference codes with / without it)."""
    from omegaconf import OmegaConf

    from pipeline.guards import override
    from segmentation.shipped import wants_scale_estimate

    run = _study_segment_run(study)
    if run is None:
        return
    config = run[0].get("config") or {}  # the study's segment run, read once
    rec = dict(config.get("segmentation") or {})
    now = OmegaConf.to_container(cfg.segmentation, resolve=True)
    now_det = study.segmentation_model
    rec_det = _study_detector(study)
    now_ckpt = _detector_ckpt(now_det) if now_det else {}
    rec_ckpt = now_ckpt if rec_det is None or rec_det == now_det else _detector_ckpt(rec_det)
    diffs = cut_differences(now, rec, now_ckpt, rec_ckpt)
    lines, fixes = [], []
    fixed = study_smear_scales(config)
    if fixed is not None:
        # the study read its smears at the fixed scales of data.segment_sources, not at
        # segmentation.input_scale / estimate_scale: compared with those (an audit was told
        # "study input_scale 0.6 ... add segmentation.input_scale=0.6
        # segmentation.estimate_scale=true", the reverse of how the study cut its cells)
        diffs = [d for d in diffs if d[0] not in SCALE_SETTINGS]
        text, scales = fixed
        if wants_scale_estimate(now.get("estimate_scale"), now_ckpt):
            lines.append(
                f"scale: the study read its smears at fixed scales per source ({'; '.join(text)}), "
                "this run measures each image's (segmentation.estimate_scale)"
            )
            fixes.append(
                "segmentation.estimate_scale=false segmentation.input_scale=<the scale of the "
                "study's source these smears come from>"
            )
        elif not any(abs(float(now.get("input_scale") or 0) - v) < 1e-9 for v in scales):
            lines.append(
                f"input_scale: the study read its smears at fixed scales per source "
                f"({'; '.join(text)}), this run {now.get('input_scale')!r}"
            )
            fixes.append(
                "segmentation.input_scale=<the scale of the study's source these smears come from>"
            )
    if not diffs and not lines:
        return
    for key, was, mine, recorded in diffs:
        if recorded:
            lines.append(f"{key}: study {was!r}, this run {mine!r}")
        elif key in CUT_LEGACY:
            lines.append(
                f"{key}: not in the study (predates it, cut as {was!r}): this run {mine!r}"
            )
        else:
            lines.append(f"{key}: not in the study (predates it): this run {mine!r}")
            continue
        # a null scale flag was resolved by the detector: the override says it outright
        fixes.append(override(f"segmentation.{key}", was))
    log.warning(
        "new cells are segmented unlike the study's own cells (its segment/manifest.json), "
        "so other cells are kept or cut otherwise than its reference: %s. To cut them "
        "alike, add %s",
        "; ".join(lines),
        " ".join(fixes) if fixes else "(no override known: the study's run predates these)",
    )


def _segment_args(cfg, kind: str, cut: str | None = None) -> dict:
    """``Study.read`` settings: smears and detector-masked crops use stage=segment's;
    ``cut``: the cut of the input's cells (:func:`_cuts`; None: ``embed.crop_masks``)."""
    if kind not in ("crops", "smears"):
        return {}
    cut = cut or cfg.embed.crop_masks
    if kind == "crops" and cut == "whole":
        return {"crop_masks": "whole"}
    from pipeline.stages.segment import detector_kwargs, settings_from_config

    sc = cfg.segmentation
    return {
        "segment_settings": settings_from_config(sc),
        "detector_kwargs": detector_kwargs(sc),
        # null: estimated where the study's detector asks for it, at the cell size it was
        # trained at (its checkpoint's cell_px), not this run's default
        "estimate_cell_px": float(sc.cell_px) if sc.estimate_scale else None,
        "refine_scale": sc.refine_scale,  # null: as the detector says (shipped: on)
        "estimate_scale": sc.estimate_scale,  # null: as the detector says (shipped: on)
        "scale_spread": sc.scale_spread,  # held near the median of a sub-folder and size
        "crop_masks": cut,  # smears: whole = each cell's square box, unmasked
    }


def _h5ad_obs_names(path: Path) -> tuple[pd.Index, np.ndarray | None]:
    """The obs names of an ``.h5ad``, read alone (its obs table; no matrix, no crops), and
    where it is a paired table the names its rows get in the query, over the whole table
    (:func:`vae.inputs.query.paired_row_names`), else None."""
    import h5py
    from anndata.io import read_elem

    from vae.inputs.query import paired_row_names

    with h5py.File(path, "r") as f:
        obs = read_elem(f["obs"])
    names = pd.Index(obs.index.astype(str))
    dup = names.duplicated()
    if dup.any():  # Study.embed's refusal, before rows are looked up by name (review)
        raise StageError(
            f"{path}: obs_names holds duplicated cell ids "
            f"{list(dict.fromkeys(names[dup]))[:5]}; make them unique "
            "(anndata's obs_names_make_unique) and embed it again"
        )
    paired = paired_row_names(obs)
    return names, None if paired is None else paired.to_numpy()


class _CropLookup:
    """Crops of the query's rows by index, for the page's examples: rows of a streamed
    ``.h5ad`` input read one by one from that file (its crops never sat in memory and
    ``query.h5ad`` holds none for them: the page showed them black, or said "no images"
    when that input was the only one), the others from their input's crops."""

    def __init__(self, crops: list, sizes: list[int], files: list):
        self.crops = crops  # per input: (n, S, S, 3) uint8, or None (no image)
        self.starts = np.cumsum([0, *sizes])
        self.files = files  # per input: (its .h5ad, its rows there) when streamed, or None

    def __getitem__(self, i: int) -> np.ndarray:
        import h5py

        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        j = int(i - self.starts[k])
        if self.files[k] is not None:
            path, rows = self.files[k]
            with h5py.File(path, "r") as f:
                return np.asarray(f["obsm/crops"][int(rows[j])])
        if self.crops[k] is None:
            raise LookupError(f"query row {i} has no crop (its input had no images)")
        return np.asarray(self.crops[k][j])


def _obs_of(parts):
    """The obs of several blocks of one input, stacked (what :meth:`Study.warn_seen`
    reads: each block's categoricals may differ, so as objects)."""
    return pd.concat([p.obs for p in parts], copy=False)


def _concat(parts):
    """Rows of several inputs (their crops already taken out), obs columns an outer union."""
    import anndata as ad

    # imputed genes: one column per gene missing from any input, NaN where not imputed
    genes = sorted({g for p in parts for g in p.uns.get("imputed_genes", [])})
    if genes:
        for p in parts:
            m = np.full((p.n_obs, len(genes)), np.nan, np.float32)
            have = list(p.uns.get("imputed_genes", []))
            if have:
                m[:, [genes.index(g) for g in have]] = p.obsm["X_vae_imputed"]
            p.obsm["X_vae_imputed"] = m
            p.uns["imputed_genes"] = genes
    out = ad.concat(parts, join="outer", merge="first", uns_merge="first")
    repeat = out.obs_names.duplicated()
    if repeat.any():
        # one name in two inputs (or two blocks): made unique, never two rows of one name,
        # and said (a user joining query.h5ad by name finds the repeats renamed)
        was = list(out.obs_names[repeat][:3])
        out.obs_names_make_unique()
        now = list(out.obs_names[repeat][:3])
        log.warning(
            "%d cell id(s) of the query repeat an earlier input's (or block's) ids (e.g. %s): "
            "the repeats are named %s in query.h5ad (anndata's obs_names_make_unique: a "
            "suffix -1, -2 ...; vae_input names each row's input)",
            int(repeat.sum()),
            ", ".join(map(str, was)),
            ", ".join(map(str, now)),
        )
    return out
