"""What both analyses share: the run's files loaded together, where they write, small helpers.

Library code: paths and typed settings in, no config objects (``pipeline/stages/evaluate.py``
and ``pipeline/stages/traverse.py`` wire it).
"""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segmentation.io import blank_as_read

LATENTS = {"joint": "X_vae", "image": "X_vae_image", "expression": "X_vae_expression"}

log = logging.getLogger(__name__)

# what a message suggests when paired.h5ad is not the data the model learned
RETRAIN = "re-run stage=train on this paired.h5ad, or pass the paired.h5ad train used"


class AnalysisError(ValueError):
    """The run's files do not fit together or a setting does not fit the data."""


class Outputs:
    """Where an analysis writes: PNG and CSV files in ``folder``, figures also to TensorBoard."""

    def __init__(self, folder: Path, tb: Any = None):
        self.folder = Path(folder)
        self.tb = tb  # a torch SummaryWriter or None
        self.tables: dict[str, pd.DataFrame] = {}  # every CSV written, by name (for TB text)

    def path(self, name: str) -> Path:
        return self.folder / name

    def figure(self, fig, name: str, tag: str | None = None) -> Path:
        """Save a figure PNG into the folder and log it to TensorBoard."""
        from vae.analysis import figures as F

        if self.tb is not None:
            self.tb.add_image(tag or name, F.to_image(fig), 0, dataformats="HWC")
        return F.save(fig, self.path(f"{name}.png"))

    def csv(self, df: pd.DataFrame, name: str) -> Path:
        from segmentation.io import atomic_path, spreadsheet_safe

        with atomic_path(self.path(f"{name}.csv")) as tmp:
            # crop files, labels and gene names are the user's: "=..." quoted as text
            spreadsheet_safe(df).to_csv(tmp, index=False)
        self.tables[name] = df
        return self.path(f"{name}.csv")


def read_table(path: Path | str, **kw) -> pd.DataFrame:
    """A CSV this package wrote (formula-safe: :func:`segmentation.io.spreadsheet_safe`)
    with its text as it was before quoting, for the report's tables: a label ``=x``
    showed as ``'=x`` in report.html."""
    from segmentation.io import spreadsheet_unquote

    df = pd.read_csv(path, **kw)
    for c in df.columns:
        # object today; pandas 3 reads text as its own string dtype
        if pd.api.types.is_object_dtype(df[c]) or pd.api.types.is_string_dtype(df[c]):
            df[c] = df[c].map(spreadsheet_unquote)
    return df


def read_split(path: Path | str) -> pd.Series:
    """``split.csv`` of a train run: its split (``train`` / ``val`` / ``test``) per cell,
    indexed by the cell names as they were before quoting (the writer quotes a name
    like ``=x`` as ``'=x`` so a spreadsheet opens it as text; matching by name needs the
    name back). The one reader of that file, for the stages and the scripts alike."""
    # text as written: a cell named "001" or "NA" is not a number or a missing value
    df = read_table(path, dtype=str, keep_default_na=False)
    return pd.Series(
        df["split"].to_numpy(),
        index=pd.Index(df.iloc[:, 0].astype(str), name="obs"),
        name="split",
    )


@dataclass
class RunData:
    """What both stages read: latent table, model, and (optionally) the paired data."""

    latent: Any  # AnnData of latent.h5ad
    model: Any  # vae.model.TwoBranchVAE in eval mode
    meta: dict
    data: Any | None  # vae.data.PairedTensors aligned with latent rows, or None
    gene_names: list[str]
    device: Any
    # gene -> program: paired var["program"] or uns["expression_programs"]
    gene_program: dict[str, str]
    # what the expression data cannot tell (expression.notes, via paired uns)
    data_notes: list[str] = field(default_factory=list)
    # pixel value outside the cell masks of the paired crops (stage=pair records it in
    # uns["background_value"]), or None: not known from the data
    background_value: int | None = None
    # expression obs columns stage=pair renamed (vae.data.obs_renames; {} without paired)
    obs_renamed: dict[str, str] = field(default_factory=dict)


def load_run(
    lat_path: Path,
    model_path: Path,
    paired_path: Path | None,
    device: Any = "cpu",
    advice: str | None = None,
) -> RunData:
    """Read latent.h5ad, the trained model and (when given) the paired data it was trained on.

    Parameters
    ----------
    advice : what a message says to do when the paired data are not the model's (the
        pipeline's, from the train run's manifest: the command, the file train used);
        None: :data:`RETRAIN`.

    Raises :class:`AnalysisError` when they do not belong together: other rows than the
    latent's, or other genes than the model's (another set, or the same in another order:
    each gene's values would be read as another's). Crops of another size than the
    model's are warned of (they are resized to it, as a model trained on them never was).
    """
    import anndata as ad

    from vae.checkpoint import CheckpointError, check_model_digest, load_model

    latent = blank_as_read(ad.read_h5ad(lat_path))
    for key in ("X_vae",):
        if key not in latent.obsm:
            raise AnalysisError(
                f"{lat_path}: obsm['{key}'] is missing (not a latent.h5ad of stage=train?)"
            )
    try:
        model, meta = load_model(model_path, device)
        # a model and a latent of two studies would analyse one's codes with the other
        check_model_digest(latent.uns.get("model_digest"), model_path, lat_path)
    except CheckpointError as e:
        raise AnalysisError(str(e)) from e
    data = None
    if paired_path is not None:
        from vae.data import PairedDataError, load_paired

        p = paired_path
        try:
            data = load_paired(p, image_size=int(model.args.crop_size))
        except PairedDataError as e:
            raise AnalysisError(str(e)) from e
        from vae.scverse import ROW_KEY

        fix = advice or RETRAIN
        # a reversed gene order ran silently (per-gene r against other genes); fewer genes
        # stopped in the encoder with torch's "mat1 and mat2 shapes cannot be multiplied"
        model_genes = [str(g) for g in (meta.get("gene_names") or [])]
        differ = gene_difference(model_genes, [str(g) for g in data.gene_names])
        n_model = int(getattr(model.args, "n_genes", 0) or 0)
        if not differ and not model_genes and n_model and n_model != len(data.gene_names):
            differ = f"{len(data.gene_names)} genes against the model's {n_model}"
        if differ:
            raise AnalysisError(
                f"{p} does not hold the genes {model_path} was trained on: {differ}; {fix}"
            )
        # latent.h5ad rows carry paired.h5ad's row ID in obs["row"] (older runs: obs_names)
        rows = latent.obs[ROW_KEY] if ROW_KEY in latent.obs else latent.obs_names
        if list(data.obs_names) != [str(s) for s in rows]:
            raise AnalysisError(
                f"{p} and {lat_path} hold different rows ({data.n} vs {latent.n_obs}); "
                f"use the paired.h5ad the model was trained on (paths.inputs.paired=...)"
            )
    genes = list(meta.get("gene_names") or (data.gene_names if data is not None else []))
    gene_program: dict[str, str] = {}
    notes: list[str] = []
    background = None
    renamed: dict[str, str] = {}
    if data is not None:
        from vae.data import PairedDataError, assign_batches, assign_image_batches, obs_renames

        paired = blank_as_read(ad.read_h5ad(paired_path, backed="r"))
        renamed = obs_renames(paired.uns)

        args, where = model.args, str(paired_path)
        try:
            if args.batch_names:  # each profile decoded in its own batch
                keep = list(args.batch_names)
                assign_batches(data, paired.obs, str(args.batch_key), where, keep, renamed)
            if args.image_batch_names:  # each crop drawn in its own source
                keep = list(args.image_batch_names)
                assign_image_batches(data, paired.obs, str(args.image_batch_key), where, keep)
        except PairedDataError as e:
            raise AnalysisError(str(e)) from e
        crops = paired.obsm["crops"] if "crops" in paired.obsm else None
        size = int(crops.shape[1]) if crops is not None and len(crops.shape) == 4 else None
        if size is not None and size != int(model.args.crop_size):
            # stage=train takes the crops' own size: these are not the crops it learned
            log.warning(
                "%s holds crops of %d px, %s was trained on %d px crops: they are resized to "
                "%d px, and the image numbers are of crops unlike those the model learned "
                "(pair.crop_size changed since stage=train?); %s",
                paired_path,
                size,
                model_path,
                int(model.args.crop_size),
                int(model.args.crop_size),
                fix,
            )
        notes = [str(n) for n in np.atleast_1d(paired.uns.get("expression_data_notes", []))]
        if "background_value" in paired.uns:
            background = int(paired.uns["background_value"])
        var = paired.var
        if "program" in var:
            gene_program = dict(zip(var.index.astype(str), var["program"].astype(str)))
        else:  # stage=pair keeps the programs in uns (expression.programs, matched genes)
            for prog, members in (paired.uns.get("expression_programs") or {}).items():
                for g in members:
                    gene_program.setdefault(str(g), str(prog))
    return RunData(
        latent, model, meta, data, genes, device, gene_program, notes, background, renamed
    )


def full_codes(latent) -> np.ndarray:
    """(N, d) full latent means (shared + private) used for decoding."""
    return np.asarray(latent.obsm.get("X_vae_full", latent.obsm["X_vae"]), dtype=np.float64)


def split_rows(latent, split: str) -> np.ndarray:
    if split == "all":
        return np.arange(latent.n_obs)
    if "split" not in latent.obs:
        raise AnalysisError("latent.h5ad: obs['split'] is missing; set analysis.split=all")
    rows = np.flatnonzero(latent.obs["split"].astype(str).to_numpy() == split)
    if rows.size == 0:
        vals = sorted(set(latent.obs["split"].astype(str)))
        raise AnalysisError(f"analysis.split={split!r}: no rows of latent.h5ad (splits: {vals})")
    return rows


def image_reference_rows(latent, has_image: np.ndarray | None = None) -> np.ndarray:
    """Rows whose codes the image decoder was trained on, (m,) int: training rows
    (``obs["split"] == "train"``; every row when there is no split) with a crop
    (``obs["has_image"]``, else ``has_image`` (N,) bool, else none)."""
    from vae.inputs.schema import HAS_IMAGE

    obs = latent.obs
    if HAS_IMAGE in obs:
        crop = obs[HAS_IMAGE].to_numpy().astype(bool)
    elif has_image is not None:
        crop = np.asarray(has_image, bool)
    else:
        crop = np.zeros(latent.n_obs, bool)
    train = obs["split"].astype(str).to_numpy() == "train" if "split" in obs else True
    return np.flatnonzero(crop & train)


def obs_col(latent, key: str) -> np.ndarray | None:
    return latent.obs[key].to_numpy() if key in latent.obs else None


def labels_of(latent, key: str) -> np.ndarray:
    """(N,) str: each row's class, ``""`` where it is not known.

    Unknown is what :func:`vae.inputs.schema.known_labels` says (NaN, None, ``""``,
    ``"nan"``, ``"NA"``): ``astype(str)`` read a missing label as the class ``"nan"``
    (an unlabelled study's traverse offered "did you mean nan?").
    """
    from vae.inputs.schema import known_labels

    if key not in latent.obs:
        raise AnalysisError(f"latent.h5ad: obs[{key!r}] is missing (analysis.label_key)")
    lab = latent.obs[key].astype(object).to_numpy()
    return np.where(known_labels(lab), lab.astype(str), "").astype(str)


def gene_difference(model_genes: list[str], genes: list[str]) -> str:
    """How the genes of a paired table (``genes``, its column order) differ from those a
    model was trained on (``model_genes``, its output order): ``""`` when they are the same
    in the same order, else a clause for a message. ``model_genes`` empty: not known
    (nothing to compare)."""
    if not model_genes or list(model_genes) == list(genes):
        return ""

    def few(names) -> str:
        names = list(names)
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    if sorted(model_genes) == sorted(genes):
        moved = [g for g, h in zip(model_genes, genes) if g != h]
        return (
            f"the same {len(genes)} genes in another order ({len(moved)} of them at another "
            f"column: {few(moved)}), so each gene's values would be read as another gene's"
        )
    have, want = set(genes), set(model_genes)
    missing = [g for g in model_genes if g not in have]
    extra = [g for g in genes if g not in want]
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} of the model's {len(model_genes)} are missing ({few(missing)})"
        )
    if extra:
        parts.append(f"{len(extra)} of its {len(genes)} are new to the model ({few(extra)})")
    if not parts:  # same set, a gene twice in one of them
        parts.append("the same names, some repeated")
    return f"{len(genes)} genes against the model's {len(model_genes)}: " + ", ".join(parts)


def programs_of(programs: dict | None, genes: list[str]) -> dict[str, list[str]]:
    return {str(k): [str(g) for g in v] for k, v in (programs or {}).items()}


def heatmap_genes(programs: dict[str, list[str]], genes: list[str], meta: dict) -> list[int]:
    from vae.analysis.traverse import match_genes

    idx: list[int] = []
    for gl in programs.values():
        idx += [i for i in match_genes(genes, gl) if i not in idx]
    if not idx and meta.get("granule_genes"):
        idx = match_genes(genes, list(meta["granule_genes"]))
    return idx or list(range(min(12, len(genes))))


def clean_json(v):
    """NaN/inf -> None for strict JSON."""
    if isinstance(v, dict):
        return {k: clean_json(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [clean_json(x) for x in v]
    if isinstance(v, float | np.floating):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def embedding(z: np.ndarray, n_neighbors: int, use_umap: bool, seed: int) -> tuple[np.ndarray, str]:
    import anndata as ad
    import scanpy as sc

    from vae.inputs.neighbors import knn_graph

    if len(z) < 5 or not use_umap:
        from sklearn.decomposition import PCA

        k = min(2, z.shape[1], len(z))
        e = PCA(k, random_state=seed).fit_transform(z) if len(z) >= 2 else np.zeros((len(z), 2))
        if e.shape[1] < 2:
            e = np.c_[e, np.zeros(len(e))]
        return e, "PCA"
    a = ad.AnnData(np.zeros((len(z), 1), np.float32))
    a.obsm["X_lat"] = z.astype(np.float32)
    # not sc.pp.neighbors itself: it stopped at >= 8192 rows (vae.inputs.neighbors)
    knn_graph(a, n_neighbors=n_neighbors, use_rep="X_lat", random_state=seed)
    sc.tl.umap(a, random_state=seed)
    return np.asarray(a.obsm["X_umap"]), "UMAP"


def observed_program_scores(latent, data, genes, programs) -> dict[str, np.ndarray]:
    """Per-row program scores: obs['score_<p>'] when present, else the mean observed
    log expression of the program genes (NaN for rows without expression)."""
    from vae.analysis.traverse import program_scores

    out = {}
    for p in programs:
        col = f"score_{p}"
        if col in latent.obs:
            out[p] = latent.obs[col].to_numpy().astype(float)
    if data is not None:
        x = data.x.numpy()
        he = data.has_expression.numpy()
        for p, v in program_scores(x, genes, programs).items():
            if p not in out:
                out[p] = np.where(he, v, np.nan)
    return out


def markdown_table(df: pd.DataFrame, name: str, max_rows: int = 50) -> str:
    """``df`` as a Markdown pipe table (what TensorBoard's text tab renders as a table).

    Numbers to 4 significant digits; at most ``max_rows`` rows, with a line saying how
    many were left out and where the whole table is (``name``.csv). Written here, not
    with ``DataFrame.to_markdown``, which needs the optional ``tabulate`` (without it
    the plain-text fallback rendered as a garbled paragraph).
    """

    def text(v) -> str:
        # a class or sample name is shown as written: HTML in it (TensorBoard's sanitiser
        # kept an "<img src=...>" as an image fetching that address) and Markdown's link,
        # emphasis and code marks ("[x](http://...)" became a link) escaped
        t = html.escape(str(v), quote=False).replace("\n", " ")
        return re.sub(r"([\\`*_\[\]|])", r"\\\1", t)

    def cell(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else f"{float(v):.4g}"
        return text(v)

    cols = [str(c) for c in df.columns]
    lines = [
        "| " + " | ".join(text(c) for c in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in df.head(max_rows).itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    if len(df) > max_rows:
        lines.append(f"\n{max_rows} of {len(df)} rows; all in {name}.csv")
    return "\n".join(lines)


def tb_scalars(tb, prefix: str, d: dict) -> None:
    """The float metrics of ``d`` (nested dicts as tag paths) as TensorBoard scalars at
    step 0. Integers (counts, dim indices) are left to metrics.json: a one-point chart of
    a cell count or a dim number reads as a measurement."""
    names = tb_names(list(d))
    for k, v in d.items():
        if isinstance(v, dict):
            tb_scalars(tb, f"{prefix}/{names[k]}", v)
        elif isinstance(v, float | np.floating) and np.isfinite(v):
            tb.add_scalar(f"{prefix}/{names[k]}", float(v), 0)


def tb_names(keys: list) -> dict:
    """Each key of one dict as one TensorBoard tag part: ``image (joint)`` ->
    ``image_joint``, ``image -> expression`` -> ``image_to_expression`` (spaces, brackets
    and arrows make tags awkward to filter in TensorBoard's search box); letters of any
    script kept (``γδ T cells`` -> ``γδ_T_cells``); two keys that would meet get
    ``_2``, ``_3`` ... in key order, so no tag holds two metrics."""
    import re

    out: dict = {}
    used: set[str] = set()
    for key in keys:
        base = re.sub(r"[^\w.+-]+", "_", str(key).replace("->", " to ")).strip("_") or "_"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        out[key] = name
    return out


def cell_codes(rd: RunData, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """(n, d) fused codes of ``rows`` from each crop as given (one view), for decoding a
    cell to compare it with its own input or truth.

    The reported latent (``X_vae_full``, ``encode_views`` 8 by default) takes the image
    expert as the mean over the crop's 8 symmetries: pose-free, so it decodes a cell in
    an average pose (a nucleus smeared over the orientations, lobes merged). Positions
    along paths, class centroids and traversal steps use that reported latent; a decoded
    cell meant to look like its input comes from the single-view code, as the
    reconstructions of ``stage=evaluate`` do (:func:`vae.infer.encode_dataset`).
    """
    from vae.infer import encode_dataset

    if rd.data is None:
        raise AnalysisError("decoding cells from their crops needs the paired data")
    lat = encode_dataset(rd.model, rd.data, rd.device, batch_size, rows=rows, views=1)
    return np.asarray(lat.joint, dtype=np.float64)


def crop_background(rd: RunData) -> float:
    """The paired crops' background outside the cell, 0-1 (``stage=pair``'s
    ``uns["background_value"]``; 0 where not recorded): what a decoded cell is drawn on
    to be read as a crop is."""
    return (rd.background_value or 0) / 255.0


def pose_lenders(
    latent, data, model, device, batch_size: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The codes of the training crops that lend their poses (:func:`in_training_poses`):
    ``(reported, single_view)``, (m, d) float64 each; None when there is no pose to lend.

    Parameters
    ----------
    latent : AnnData
        The run's ``latent.h5ad`` (its reported full codes, ``obsm["X_vae_full"]``).
    data : vae.data.PairedTensors or None
        The paired data the run was trained on, rows as ``latent``'s.
    model : vae.model.TwoBranchVAE
    device, batch_size
        Where and how many crops at once their single-view codes are encoded.

    Returns
    -------
    tuple or None
        None without paired data or a training crop, for a model whose reported latent
        is single-view (``vae.encode_views`` 1: no pose was taken out of it), or a latent
        table without full codes of the model's width.
    """
    from vae.infer import encode_dataset

    if int(getattr(model.args, "encode_views", 1) or 1) == 1 or data is None:
        return None
    lenders = image_reference_rows(latent, data.has_image.numpy().astype(bool))
    reported = full_codes(latent)
    # a latent table without its full codes (obsm["X_vae_full"]) holds the shared dims only
    if lenders.size == 0 or reported.shape[1] != int(model.n_latent):
        return None
    one = encode_dataset(model, data, device, batch_size, rows=lenders, views=1).joint
    return reported[lenders], np.asarray(one, dtype=np.float64)


def in_training_poses(
    rd: RunData, codes: np.ndarray, batch_size: int, lenders: tuple | None = None
) -> np.ndarray | None:
    """``codes`` each given the pose of the training crop nearest it, to be drawn in a
    real cell's orientation; None when there is no pose to lend.

    A pose-free code (the expression expert's: expression knows the kind of cell, not how
    its crop lies on the slide; or a mean of reported codes) decodes a nucleus averaged
    over orientations: a band or a segmented neutrophil is drawn as a ring that the lobe
    layer cuts into a pale cross. As the traversal poses its path steps
    (:func:`vae.analysis.traverse.posed_codes`), each code gets the pose (single-view
    minus reported code) of the *training* crop whose reported code lies nearest it, so
    a held-out cell's own crop never reaches its drawing.

    Parameters
    ----------
    rd : RunData
        With its paired data (``rd.data``): the training crops lend the poses.
    codes : (n, d) float
        Full-layout codes (``[shared | image private | expression private]``), e.g.
        :attr:`vae.infer.Latents.expression`; finite.
    batch_size : int
        Rows per forward pass (memory, not results).
    lenders : tuple, optional
        :func:`pose_lenders` of ``rd``, where the caller poses several sets of codes
        (the training crops are then encoded once); default: encoded here.

    Returns
    -------
    (n, d) float64, or None: :func:`pose_lenders` has none, or ``codes`` are empty or
    not of the lenders' width.
    """
    from vae.analysis.traverse import posed_codes

    z = np.asarray(codes, dtype=np.float64)
    if not np.isfinite(z).all():
        raise AnalysisError("in_training_poses: a code is not finite (a row without its modality?)")
    if len(z) == 0:
        return None
    if lenders is None:
        lenders = pose_lenders(rd.latent, rd.data, rd.model, rd.device, batch_size)
    if lenders is None or lenders[0].shape[1] != z.shape[1]:
        return None
    return posed_codes(z, lenders[0], lenders[1], k=1).codes[:, 0]


def measure(images: np.ndarray, masks: np.ndarray | None, params, background: float):
    """Granule features of decoded images; masks from the decoder or the background."""
    from vae.analysis import granules as G

    if masks is not None:
        from vae.analysis.traverse import cell_masks

        m = cell_masks(masks)  # the cell as the figures draw it
    else:
        m = np.stack([G.mask_from_background(im, background) for im in images])
    return G.measure_batch(images, m, params)
