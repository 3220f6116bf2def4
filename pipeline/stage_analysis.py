"""``stage=evaluate`` and ``stage=traverse``: what researchers use the trained VAE for.

evaluate (held-out split of the run, ``analysis.split``):
    reconstruction (masked image MSE/SSIM, per-gene r, NB log-likelihood),
    cross-modal prediction (image -> expression, expression -> image),
    latent structure (kNN accuracy, silhouette, Leiden ARI/NMI) of the shared
    and per-modality latents, retrieval of paired partners (Recall@k,
    FOSCTTM), disentanglement against simulator truth (MIG, DCI, best-dim
    Spearman); ``metrics.json``, one CSV per table, UMAP figures, TensorBoard.

traverse:
    per-dimension sweeps of the top-k latent dims by KL, straight and GP paths
    from the earliest to the latest maturation class, genes ranked along the
    path, granule features measured (scikit-image) on decoded and real crops
    and correlated with latent dims and path position, recovery of simulator
    truth, and a self-contained ``report.html``.

Library code lives in ``vae.metrics``, ``vae.granules``, ``vae.traverse``,
``vae.figures`` and ``vae.report``; this module reads the config and wires them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from pipeline.artifacts import atomic_path, write_json
from pipeline.stages import StageContext, StageError, stage

log = logging.getLogger(__name__)

LATENTS = {"joint": "X_vae", "image": "X_vae_image", "expression": "X_vae_expression"}


# ----------------------------------------------------------------------------
# shared loading
# ----------------------------------------------------------------------------


@dataclass
class RunData:
    """What both stages read: latent table, model, and (optionally) the paired data."""

    latent: Any  # AnnData of latent.h5ad
    model: Any  # vae.model.TwoBranchVAE in eval mode
    meta: dict
    data: Any | None  # vae.data.PairedTensors aligned with latent rows, or None
    gene_names: list[str]
    device: Any
    gene_program: dict[str, str]  # gene -> program from paired var["program"] (may be empty)


def _load(ctx: StageContext, need_paired: bool = False) -> RunData:
    import anndata as ad

    from vae.checkpoint import CheckpointError, load_model

    lat_path = ctx.input("latent")
    latent = ad.read_h5ad(lat_path)
    for key in ("X_vae",):
        if key not in latent.obsm:
            raise StageError(
                f"{lat_path}: obsm['{key}'] is missing (not a latent.h5ad of stage=train?)"
            )
    device = ctx.dist.device if ctx.dist is not None else "cpu"
    try:
        model, meta = load_model(ctx.input("model"), device)
    except CheckpointError as e:
        raise StageError(str(e)) from e
    data = None
    if ctx.has_input("paired"):
        from vae.data import PairedDataError, load_paired

        p = ctx.input("paired")
        try:
            data = load_paired(p, image_size=int(model.args.crop_size))
        except PairedDataError as e:
            raise StageError(str(e)) from e
        if list(data.obs_names) != [str(s) for s in latent.obs_names]:
            raise StageError(
                f"{p} and {lat_path} hold different rows ({data.n} vs {latent.n_obs}); "
                f"use the paired.h5ad the model was trained on (paths.inputs.paired=...)"
            )
    elif need_paired:
        raise StageError("this step needs paired.h5ad (stage=pair or paths.inputs.paired=PATH)")
    genes = list(meta.get("gene_names") or (data.gene_names if data is not None else []))
    gene_program: dict[str, str] = {}
    if data is not None:
        var = ad.read_h5ad(ctx.input("paired"), backed="r").var
        if "program" in var:
            gene_program = dict(zip(var.index.astype(str), var["program"].astype(str)))
    return RunData(latent, model, meta, data, genes, device, gene_program)


def _full_codes(latent) -> np.ndarray:
    """(N, d) full latent means (shared + private) used for decoding."""
    return np.asarray(latent.obsm.get("X_vae_full", latent.obsm["X_vae"]), dtype=np.float64)


def _split_rows(latent, split: str) -> np.ndarray:
    if split == "all":
        return np.arange(latent.n_obs)
    if "split" not in latent.obs:
        raise StageError("latent.h5ad: obs['split'] is missing; set analysis.split=all")
    rows = np.flatnonzero(latent.obs["split"].astype(str).to_numpy() == split)
    if rows.size == 0:
        vals = sorted(set(latent.obs["split"].astype(str)))
        raise StageError(f"analysis.split={split!r}: no rows of latent.h5ad (splits: {vals})")
    return rows


def _obs_col(latent, key: str) -> np.ndarray | None:
    return latent.obs[key].to_numpy() if key in latent.obs else None


def _labels(latent, key: str) -> np.ndarray:
    if key not in latent.obs:
        raise StageError(f"latent.h5ad: obs[{key!r}] is missing (analysis.label_key)")
    return latent.obs[key].astype(str).to_numpy()


def _programs(cfg_programs, genes: list[str]) -> dict[str, list[str]]:
    progs = OmegaConf.to_container(cfg_programs, resolve=True) if cfg_programs is not None else {}
    return {str(k): [str(g) for g in v] for k, v in (progs or {}).items()}


def _heatmap_genes(programs: dict[str, list[str]], genes: list[str], meta: dict) -> list[int]:
    from vae.traverse import match_genes

    idx: list[int] = []
    for gl in programs.values():
        idx += [i for i in match_genes(genes, gl) if i not in idx]
    if not idx and meta.get("granule_genes"):
        idx = match_genes(genes, list(meta["granule_genes"]))
    return idx or list(range(min(12, len(genes))))


def _tb(ctx: StageContext):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(ctx.output("tb")))


def _fig_out(ctx, tb, fig, name: str, tag: str | None = None) -> Path:
    """Save a figure PNG into the stage folder and log it to TensorBoard."""
    from vae import figures as F

    if tb is not None:
        tb.add_image(tag or name, F.to_image(fig), 0, dataformats="HWC")
    return F.save(fig, ctx.output(f"{name}.png"))


def _csv(ctx, df: pd.DataFrame, name: str) -> Path:
    with atomic_path(ctx.output(f"{name}.csv")) as tmp:
        df.to_csv(tmp, index=False)
    return ctx.output(f"{name}.csv")


def _clean(v):
    """NaN/inf -> None for strict JSON."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, float | np.floating):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


# ----------------------------------------------------------------------------
# model passes on a set of rows
# ----------------------------------------------------------------------------


@dataclass
class Passes:
    """Encodings and decodings of some rows (numpy, channel-last images)."""

    rows: np.ndarray  # (n,) row indices into the run
    image: np.ndarray  # (n, S, S, 3) masked input crops in [0, 1]
    mask: np.ndarray  # (n, S, S) bool
    x: np.ndarray  # (n, G) observed log-normalised expression
    counts: np.ndarray | None  # (n, G)
    library: np.ndarray  # (n,)
    has_image: np.ndarray  # (n,) bool
    has_expression: np.ndarray
    rec_image: np.ndarray  # (n, S, S, 3) decoded from the joint mean
    rec_expression: np.ndarray  # (n, G)
    nb_mu: np.ndarray | None  # (n, G) NB mean of the joint decoding (counts models)
    nb_theta: np.ndarray | None  # (G,)
    expr_from_image: np.ndarray  # (n, G) decoded from the image-only mean
    image_from_expr: np.ndarray  # (n, S, S, 3) decoded from the expression-only mean


def _passes(model, data, rows: np.ndarray, device, batch_size: int) -> Passes:
    import torch

    from vae.data import raw_batch, to_batch

    keys = ("img", "m", "x", "c", "lib", "hi", "he", "ri", "re", "mu", "xi", "ie")
    acc: dict[str, list] = {k: [] for k in keys}
    theta = None
    model.eval()
    chw = lambda t: t.float().permute(0, 2, 3, 1).cpu().numpy()  # noqa: E731 (B,3,S,S)->(B,S,S,3)
    with torch.inference_mode():
        for s in range(0, rows.size, batch_size):
            idx = torch.as_tensor(rows[s : s + batch_size], dtype=torch.long)
            b = to_batch(raw_batch(data, idx), torch.device(device))
            post = model.encode(b.image, b.x, b.has_image, b.has_expression, b.mask, b.log_library)
            dj = model.decode(post.joint[0])
            di = model.decode(post.image[0])
            de = model.decode(post.expression[0])
            acc["img"].append(chw(b.image))
            acc["m"].append(b.mask[:, 0].bool().cpu().numpy())
            acc["x"].append(b.x.float().cpu().numpy())
            if b.counts is not None:
                acc["c"].append(b.counts.float().cpu().numpy())
            acc["lib"].append(b.library.float().cpu().numpy())
            acc["hi"].append(b.has_image.cpu().numpy())
            acc["he"].append(b.has_expression.cpu().numpy())
            acc["ri"].append(chw(dj.image))
            acc["re"].append(dj.expression_log.float().cpu().numpy())
            if getattr(dj, "expression_scale", None) is not None:
                acc["mu"].append((dj.expression_scale * b.library[:, None]).float().cpu().numpy())
                if getattr(dj, "expression_log_theta", None) is not None:
                    theta = dj.expression_log_theta.float().exp().cpu().numpy()
            acc["xi"].append(di.expression_log.float().cpu().numpy())
            acc["ie"].append(chw(de.image))
    cat = lambda k: np.concatenate(acc[k]) if acc[k] else None  # noqa: E731
    mu = cat("mu")
    return Passes(
        rows=rows,
        image=cat("img"),
        mask=cat("m"),
        x=cat("x"),
        counts=cat("c"),
        library=cat("lib"),
        has_image=cat("hi").astype(bool),
        has_expression=cat("he").astype(bool),
        rec_image=np.clip(cat("ri"), 0, 1),
        rec_expression=cat("re"),
        nb_mu=mu if theta is not None else None,
        nb_theta=theta,
        expr_from_image=cat("xi"),
        image_from_expr=np.clip(cat("ie"), 0, 1),
    )


# ----------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------


def _embedding(
    z: np.ndarray, n_neighbors: int, use_umap: bool, seed: int
) -> tuple[np.ndarray, str]:
    import anndata as ad
    import scanpy as sc

    if len(z) < 5 or not use_umap:
        from sklearn.decomposition import PCA

        k = min(2, z.shape[1], len(z))
        e = PCA(k, random_state=seed).fit_transform(z) if len(z) >= 2 else np.zeros((len(z), 2))
        if e.shape[1] < 2:
            e = np.c_[e, np.zeros(len(e))]
        return e, "PCA"
    a = ad.AnnData(np.zeros((len(z), 1), np.float32))
    a.obsm["X_lat"] = z.astype(np.float32)
    sc.pp.neighbors(
        a, n_neighbors=max(2, min(n_neighbors, len(z) - 1)), use_rep="X_lat", random_state=seed
    )
    sc.tl.umap(a, random_state=seed)
    return np.asarray(a.obsm["X_umap"]), "UMAP"


def observed_program_scores(latent, data, genes, programs) -> dict[str, np.ndarray]:
    """Per-row program scores: obs['score_<p>'] when present, else the mean observed
    log expression of the program genes (NaN for rows without expression)."""
    from vae.traverse import program_scores

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


def _gene_row(what: str, n: int, gc, gidx: list[int]) -> dict:
    """One reconstruction-table row from per-gene correlations (granule genes apart)."""
    row = {"what": what, "n": n, "gene_pearson": gc.mean_pearson, "gene_spearman": gc.mean_spearman}
    if gidx:
        row["granule_gene_pearson"] = float(np.nanmean(gc.pearson[gidx]))
    return row


@stage("evaluate", needs=["latent", "model"], optional=["paired"], produces=["evaluation"])
def run_evaluate(ctx: StageContext) -> None:
    from vae import figures as F
    from vae import metrics as M

    cfg, a = ctx.cfg, ctx.cfg.analysis
    t0 = time.time()
    rd = _load(ctx)
    lat = rd.latent
    rows = _split_rows(lat, a.split)
    ref = (
        np.flatnonzero(lat.obs["split"].astype(str).to_numpy() == "train")
        if "split" in lat.obs
        else rows
    )
    if a.split == "all" or ref.size == 0:
        ref = None
    labels = _labels(lat, a.label_key)
    programs = _programs(a.programs, rd.gene_names)
    gidx = _heatmap_genes(programs, rd.gene_names, rd.meta)
    out: dict[str, Any] = {
        "split": a.split,
        "n_rows": int(rows.size),
        "n_reference_rows": int(ref.size) if ref is not None else 0,
    }
    tables: dict[str, pd.DataFrame] = {}
    tb = _tb(ctx) if ctx.is_main else None

    # ---- latent structure
    struct = []
    for name, key in LATENTS.items():
        if key not in lat.obsm:
            continue
        z = np.asarray(lat.obsm[key], dtype=np.float64)
        ok = rows[np.isfinite(z[rows]).all(1)]
        if ok.size < 3:
            continue
        row = {"latent": name, "n": int(ok.size)}
        if ref is not None:
            rok = ref[np.isfinite(z[ref]).all(1)]
            row["knn_accuracy"] = (
                M.knn_accuracy(z[ok], labels[ok], a.knn_k, z[rok], labels[rok])
                if rok.size
                else np.nan
            )
        else:
            row["knn_accuracy"] = M.knn_accuracy(z[ok], labels[ok], a.knn_k)
        row["silhouette"] = M.silhouette(z[ok], labels[ok])
        if len(set(labels[ok])) >= 2:
            agree = M.leiden_agreement(
                z[ok], labels[ok], a.n_neighbors, a.leiden_resolution, cfg.seed
            )
            row.update(leiden_ari=agree.ari, leiden_nmi=agree.nmi, leiden_clusters=agree.n_clusters)
        struct.append(row)
    if struct:
        tables["latent_structure"] = pd.DataFrame(struct)
        out["latent_structure"] = {
            r["latent"]: {k: v for k, v in r.items() if k != "latent"} for r in struct
        }

    # ---- matching of paired rows (image-only vs expression-only latents)
    if "X_vae_image" in lat.obsm and "X_vae_expression" in lat.obsm:
        zi = np.asarray(lat.obsm["X_vae_image"], dtype=np.float64)
        ze = np.asarray(lat.obsm["X_vae_expression"], dtype=np.float64)
        both = rows[np.isfinite(zi[rows]).all(1) & np.isfinite(ze[rows]).all(1)]
        if both.size >= 2:
            r = M.retrieval(zi[both], ze[both])
            out["retrieval"] = M.to_dict(r)
            tables["retrieval"] = pd.DataFrame([{"query": "image -> expression", **M.to_dict(r)}])

    # ---- disentanglement against known factors (simulator truth)
    z = np.asarray(lat.obsm["X_vae"], dtype=np.float64)[rows]
    factors = {f: _obs_col(lat, f)[rows] for f in a.factors if f in lat.obs}
    factors = {f: v for f, v in factors.items() if M.known_rows(v).sum() >= 4}
    if factors:
        mg = M.mig(z, factors, a.mig_bins)
        dc = M.dci(z, factors, n_estimators=a.dci_trees, seed=cfg.seed)
        drows = []
        for f, v in factors.items():
            bd = (
                M.best_dim_spearman(z, v.astype(float))
                if np.asarray(v).dtype.kind in "fiub"
                else None
            )
            drows.append(
                {
                    "factor": f,
                    "n_known": int(M.known_rows(v).sum()),
                    "mig_gap": mg.per_factor.get(f, np.nan),
                    "mig_best_dim": mg.best_dim.get(f, -1),
                    "dci_informativeness": dc.informativeness.get(f, np.nan),
                    "best_dim_spearman": bd.spearman if bd else np.nan,
                    "best_dim": bd.dim if bd else -1,
                }
            )
        tables["disentanglement"] = pd.DataFrame(drows)
        out["disentanglement"] = {
            "mig": mg.mig,
            "dci_disentanglement": dc.disentanglement,
            "dci_completeness": dc.completeness,
            "per_factor": {
                r["factor"]: {k: v for k, v in r.items() if k != "factor"} for r in drows
            },
        }
        imp = pd.DataFrame(dc.importance, columns=dc.factors)
        imp.insert(0, "dim", np.arange(len(imp)))
        tables["dci_importance"] = imp

    # ---- reconstruction and cross-modal prediction (needs the paired data)
    if rd.data is not None:
        P = _passes(rd.model, rd.data, rows, rd.device, a.batch_size)
        rec, gene_rows = [], []
        hi, he = P.has_image, P.has_expression
        if hi.any():
            mse = M.masked_mse(P.rec_image[hi], P.image[hi], P.mask[hi])
            ssim = M.masked_ssim(P.rec_image[hi], P.image[hi], P.mask[hi])
            rec.append(
                {
                    "what": "image (joint)",
                    "n": int(hi.sum()),
                    "masked_mse": np.nanmean(mse),
                    "masked_ssim": np.nanmean(ssim),
                }
            )
        if he.sum() >= 3:
            gc = M.per_gene_correlation(P.rec_expression[he], P.x[he])
            row = _gene_row("expression (joint)", int(he.sum()), gc, gidx)
            if P.nb_mu is not None and P.counts is not None:
                ll = M.nb_log_likelihood(P.counts[he], np.maximum(P.nb_mu[he], 1e-8), P.nb_theta)
                row["nb_loglik_per_cell"] = float(ll.mean())
                row["nb_loglik_per_count"] = float(ll.sum() / max(P.counts[he].sum(), 1))
            rec.append(row)
            gene_rows.append(("joint", gc))
        both = hi & he
        if both.sum() >= 3:
            gi = M.per_gene_correlation(P.expr_from_image[both], P.x[both])
            row = _gene_row("image -> expression", int(both.sum()), gi, gidx)
            rec.append(row)
            gene_rows.append(("image_to_expression", gi))
            mse = M.masked_mse(P.image_from_expr[both], P.image[both], P.mask[both])
            ssim = M.masked_ssim(P.image_from_expr[both], P.image[both], P.mask[both])
            rec.append(
                {
                    "what": "expression -> image",
                    "n": int(both.sum()),
                    "masked_mse": np.nanmean(mse),
                    "masked_ssim": np.nanmean(ssim),
                }
            )
        if rec:
            tables["reconstruction"] = pd.DataFrame(rec)
            out["reconstruction"] = {
                r["what"]: {k: v for k, v in r.items() if k != "what"} for r in rec
            }
        if gene_rows:
            g = pd.DataFrame({"gene": rd.gene_names})
            g["granule_gene"] = np.isin(np.arange(len(rd.gene_names)), gidx)
            for nm, gc in gene_rows:
                g[f"{nm}_pearson"] = gc.pearson
                g[f"{nm}_spearman"] = gc.spearman
            tables["per_gene"] = g
        # reconstruction figure: input | joint | from expression, a few rows
        show = np.flatnonzero(hi)[:8]
        if show.size:
            fig = F.image_grid(
                [np.stack([P.image[i], P.rec_image[i], P.image_from_expr[i]]) for i in show],
                [labels[P.rows[i]] for i in show],
                ["input (masked)", "joint recon", "from expression"],
                "held-out reconstructions",
            )
            _fig_out(ctx, tb, fig, "reconstructions", "evaluate/reconstructions")

    # ---- UMAPs of all rows (the embedding needs more cells than the test split)
    emb, method = _embedding(
        z=np.asarray(lat.obsm["X_vae"], dtype=np.float64),
        n_neighbors=a.n_neighbors,
        use_umap=a.umap,
        seed=cfg.seed,
    )
    cols: dict[str, np.ndarray] = {"label": labels}
    if "split" in lat.obs:
        cols["split"] = lat.obs["split"].astype(str).to_numpy()
    mat = _obs_col(lat, a.maturation_key)
    if mat is not None:
        cols["maturation"] = mat.astype(float)
    fig = F.scatter_panel(emb, cols, f"{method} of the shared latent (all {lat.n_obs} rows)")
    _fig_out(ctx, tb, fig, "umap_labels", "evaluate/umap_labels")
    scores = observed_program_scores(lat, rd.data, rd.gene_names, programs)
    if scores:
        fig = F.scatter_panel(
            emb, scores, f"{method} coloured by granule program scores (observed)"
        )
        _fig_out(ctx, tb, fig, "umap_programs", "evaluate/umap_programs")
    for name, key in LATENTS.items():
        if name == "joint" or key not in lat.obsm:
            continue
        zz = np.asarray(lat.obsm[key], dtype=np.float64)
        ok = np.isfinite(zz).all(1)
        if ok.sum() >= 5:
            e2, m2 = _embedding(zz[ok], a.n_neighbors, a.umap, cfg.seed)
            fig = F.scatter_panel(e2, {"label": labels[ok]}, f"{m2} of the {name}-only latent")
            _fig_out(ctx, tb, fig, f"umap_{name}", f"evaluate/umap_{name}")

    # ---- write
    for name, df in tables.items():
        _csv(ctx, df, name)
    out["tables"] = sorted(f"{n}.csv" for n in tables)
    out["seconds"] = round(time.time() - t0, 2)
    if tb is not None:
        for sect, vals in out.items():
            if isinstance(vals, dict):
                _tb_scalars(tb, f"evaluate/{sect}", vals)
        for name, df in tables.items():
            tb.add_text(
                f"evaluate/{name}",
                df.head(50).to_markdown(index=False)
                if _has_tabulate()
                else df.head(50).to_string(index=False),
                0,
            )
        tb.close()
    write_json(ctx.output("evaluation"), _clean(out))
    log.info(
        "evaluate: %d %s rows, tables %s, %.1fs", rows.size, a.split, out["tables"], out["seconds"]
    )


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def _tb_scalars(tb, prefix: str, d: dict) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            _tb_scalars(tb, f"{prefix}/{k}", v)
        elif isinstance(v, int | float | np.floating | np.integer) and np.isfinite(v):
            tb.add_scalar(f"{prefix}/{k}", float(v), 0)


# ----------------------------------------------------------------------------
# traverse
# ----------------------------------------------------------------------------


def _show(dec) -> np.ndarray:
    """Decoded images for display: the cell only (decoded mask applied when there is one)."""
    if dec.masks is None:
        return dec.images
    return dec.images * (dec.masks[..., None] > 0.5)


def _measure(images: np.ndarray, masks: np.ndarray | None, params, background: float):
    """Granule features of decoded images; masks from the decoder or the background."""
    from vae import granules as G

    if masks is not None:
        m = masks > 0.5
    else:
        m = np.stack([G.mask_from_background(im, background) for im in images])
    return G.measure_batch(images, m, params)


@stage(
    "traverse",
    needs=["latent", "model"],
    optional=["paired", "evaluation"],
    produces=["report"],
)
def run_traverse(ctx: StageContext) -> None:
    from vae import figures as F
    from vae import granules as G
    from vae import metrics as M
    from vae import traverse as T
    from vae.report import FigureItem, Section, TableItem, write_report

    cfg, a = ctx.cfg, ctx.cfg.analysis
    t0 = time.time()
    rd = _load(ctx)
    lat = rd.latent
    genes = rd.gene_names
    programs = _programs(a.programs, genes)
    gidx = _heatmap_genes(programs, genes, rd.meta)
    gnames = [genes[i] for i in gidx]
    # program of each gene for the ranking table: the data's own (simulator) programs,
    # then the configured granule programs
    annot: dict[str, list[str]] = {}
    for g, p_ in rd.gene_program.items():
        annot.setdefault(p_, []).append(g)
    for p_, gl in programs.items():
        annot.setdefault(p_, []).extend(
            g for g in gl if g.upper() not in {x.upper() for x in rd.gene_program}
        )
    labels = _labels(lat, a.label_key)
    Z = _full_codes(lat)  # (N, d)
    d = Z.shape[1]
    rows = _split_rows(lat, a.split)
    params = G.GranuleParams(
        min_sigma=a.granule_min_sigma,
        max_sigma=a.granule_max_sigma,
        threshold=a.granule_threshold,
        border_px=a.granule_border_px,
        nucleus_margin_px=a.granule_nucleus_margin_px,
        core_fraction=a.lobe_core_fraction,
    )
    bg = float(cfg.pair.background_value) / 255.0 if "pair" in cfg else 0.0
    tb = _tb(ctx)
    figs: dict[str, list] = {k: [] for k in ("dims", "path", "granules", "truth")}
    tables: dict[str, pd.DataFrame] = {}
    summary: dict[str, Any] = {"n_latent": d, "split": a.split}

    # ---- per-dimension traversals
    kl = np.asarray(lat.uns.get("kl_per_dim", np.ones(d)), dtype=np.float64).ravel()
    if kl.size != d:  # KL of the shared block only: private dims come after it
        kl = np.r_[kl, np.zeros(d - kl.size)] if kl.size < d else kl[:d]
    dims = T.top_dims_by_kl(kl, a.top_k_dims)
    sd = Z.std(0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    try:
        anchor = T.anchor_point(Z, labels, np.asarray(lat.obs_names), a.anchor_class, a.anchor_cell)
    except ValueError as e:
        raise StageError(f"analysis.anchor_*: {e}") from e
    anchor_desc = (
        f"cell {a.anchor_cell}"
        if a.anchor_cell
        else f"mean of class {a.anchor_class}"
        if a.anchor_class
        else "mean of all cells"
    )
    trs = T.traverse_dims(rd.model, anchor, dims, sd, a.span_sd, a.n_steps, rd.device)
    dim_rows = []
    step_lab = [f"{o:+.1f}sd" for o in trs[0].offsets] if trs else []
    for tr in trs:
        fig = F.strip_with_heatmap(
            _show(tr.decoded),
            tr.decoded.expression[:, gidx],
            gnames,
            step_lab,
            f"z{tr.dim} (KL {kl[tr.dim]:.2f} nats), anchor: {anchor_desc}",
        )
        p = _fig_out(ctx, tb, fig, f"traverse_dim{tr.dim:02d}", f"traverse/dim{tr.dim:02d}")
        figs["dims"].append(
            FigureItem(
                p,
                f"Latent dim z{tr.dim} swept from -{a.span_sd} to +{a.span_sd} sd around the {anchor_desc}: decoded images (top) and granule-gene expression (heatmap).",
            )
        )
        feats = _measure(tr.decoded.images, tr.decoded.masks, params, bg)
        prog = T.program_scores(tr.decoded.expression, genes, programs)
        row = {"dim": tr.dim, "kl": kl[tr.dim]}
        for f in G.FEATURES:
            row[f] = M.correlation_matrix(tr.offsets, feats[f].to_numpy(float))[0, 0]
        for p_, v in prog.items():
            row[f"program:{p_}"] = M.correlation_matrix(tr.offsets, v)[0, 0]
        dim_rows.append(row)
    if trs:
        fig = F.image_grid(
            [_show(tr.decoded) for tr in trs],
            [f"z{tr.dim}" for tr in trs],
            step_lab,
            f"top {len(trs)} latent dims by KL, anchor: {anchor_desc}",
        )
        p = _fig_out(ctx, tb, fig, "traverse_grid", "traverse/grid")
        figs["dims"].insert(
            0,
            FigureItem(
                p,
                f"Summary: each row sweeps one of the {len(trs)} highest-KL latent dims over -{a.span_sd}..+{a.span_sd} sd (decoded images).",
            ),
        )
        tables["dim_feature_correlation"] = pd.DataFrame(dim_rows)
        cols = [c for c in tables["dim_feature_correlation"].columns if c not in ("dim", "kl")]
        fig = F.heatmap(
            tables["dim_feature_correlation"][cols].to_numpy(float),
            [f"z{r['dim']}" for r in dim_rows],
            cols,
            "Spearman: traversal offset vs feature of decoded cell",
        )
        p = _fig_out(ctx, tb, fig, "dim_feature_heatmap", "traverse/dim_feature_heatmap")
        figs["granules"].append(
            FigureItem(
                p,
                "Spearman correlation between each swept dim's offset and granule/nucleus features measured on the decoded images and program scores of the decoded expression.",
            )
        )

    # ---- path from the earliest to the latest class
    mat = _obs_col(lat, a.maturation_key)
    order = list(a.path_classes) if a.path_classes else None
    if order is not None and sum(c in set(labels) for c in order) < 2:
        log.warning(
            "analysis.path_classes: fewer than 2 present in labels; ordering by %s",
            a.maturation_key,
        )
        order = None
    path_ok = True
    try:
        cents = T.class_centroids(Z, labels, mat.astype(float) if mat is not None else None, order)
    except ValueError as e:
        log.warning("no path traversal: %s", e)
        path_ok = False
    path_info: dict[str, Any] = {}
    if path_ok:
        paths = {
            "straight": T.straight_path(cents.points[0], cents.points[-1], a.path_steps),
            "gp": T.gp_path(cents.points, a.path_steps, a.gp_length_scale, a.gp_noise, cfg.seed),
        }
        summary["path_classes"] = cents.names
        for kind, pth in paths.items():
            dec = T.decode(rd.model, pth.points, a.batch_size, rd.device)
            fig = F.strip_with_heatmap(
                _show(dec),
                dec.expression[:, gidx],
                gnames,
                [f"{s:.2f}" for s in pth.s],
                f"{kind} path {cents.names[0]} -> {cents.names[-1]}",
            )
            p = _fig_out(ctx, tb, fig, f"path_{kind}", f"traverse/path_{kind}")
            how = (
                "a straight line between the two end centroids"
                if kind == "straight"
                else "a Gaussian-process path through the class centroids "
                + " -> ".join(cents.names)
            )
            figs["path"].append(
                FigureItem(
                    p, f"Decoded cells and granule-gene expression along {how} (position 0..1)."
                )
            )
            rank = T.rank_genes(dec.expression, genes, pth.s, annot)
            _csv(ctx, rank, f"gene_ranking_{kind}")
            tables[f"gene_ranking_{kind}"] = rank
            feats = _measure(dec.images, dec.masks, params, bg)
            feats.insert(0, "s", pth.s)
            for p_, v in T.program_scores(dec.expression, genes, programs).items():
                feats[f"program:{p_}"] = v
            _csv(ctx, feats, f"path_features_{kind}")
            tables[f"path_features_{kind}"] = feats
            corr = {
                c: M.correlation_matrix(pth.s, feats[c].to_numpy(float))[0, 0]
                for c in feats.columns
                if c != "s"
            }
            path_info[kind] = {
                "position_vs_feature_spearman": corr,
                "top_genes": rank["gene"].head(a.top_genes).tolist(),
            }
            series = {
                c: _minmax(feats[c].to_numpy(float))
                for c in [
                    "granule_density",
                    "lobes",
                    "nucleus_fraction",
                    *[k for k in feats if k.startswith("program:")],
                ]
            }
            fig = F.line_plot(
                pth.s, series, "path position", "min-max scaled", f"features along the {kind} path"
            )
            p = _fig_out(ctx, tb, fig, f"path_features_{kind}", f"traverse/path_features_{kind}")
            figs["path"].append(
                FigureItem(
                    p,
                    f"Granule density, lobes and nucleus share measured on the decoded images, and decoded program scores, along the {kind} path (each scaled to 0..1).",
                )
            )
        summary["path"] = path_info

    # ---- real crops: granule features vs latent dims
    real = None
    if rd.data is not None:
        rng = np.random.default_rng(int(cfg.seed))
        cand = rows[rd.data.has_image.numpy()[rows]]
        if cand.size > a.max_cells_measured:
            cand = np.sort(rng.choice(cand, a.max_cells_measured, replace=False))
        if cand.size:
            crops = rd.data.crops[cand].permute(0, 2, 3, 1).numpy()
            masks = rd.data.masks[cand, 0].numpy().astype(bool)
            real = G.measure_batch(crops, masks, params)
            real.insert(0, "cell", np.asarray(lat.obs_names)[cand])
            zc = Z[cand]
            # granule program scores of the expression decoded from each cell's code
            dec_c = T.decode(rd.model, zc, a.batch_size, rd.device)
            for p_, v in T.program_scores(dec_c.expression, genes, programs).items():
                real[f"program:{p_}"] = v
            fcols = [f for f in G.FEATURES if f in real] + [
                c for c in real if c.startswith("program:")
            ]
            cm = M.correlation_matrix(real[fcols].to_numpy(float), zc)  # (F, d)
            corr_df = pd.DataFrame(cm, columns=[f"z{i}" for i in range(d)])
            corr_df.insert(0, "feature", fcols)
            if path_ok:
                pos = T.project_onto_path(zc, paths["gp"])
                real["gp_path_position"] = pos
                corr_df["gp_path_position"] = M.correlation_matrix(
                    real[fcols].to_numpy(float), pos
                )[:, 0]
            tables["real_feature_correlation"] = corr_df
            _csv(ctx, real, "real_crop_features")
            fig = F.heatmap(
                corr_df.drop(columns="feature").to_numpy(float),
                fcols,
                list(corr_df.columns[1:]),
                f"Spearman: features of {len(cand)} real {a.split} crops vs latent dims",
            )
            p = _fig_out(ctx, tb, fig, "real_feature_heatmap", "traverse/real_feature_heatmap")
            figs["granules"].append(
                FigureItem(
                    p,
                    f"Spearman correlation of granule/nucleus features measured on {len(cand)} real {a.split} crops, and of program scores of the expression decoded from their codes, with each latent dim and with their position on the GP path.",
                )
            )

    # ---- simulator truth recovery
    truth: dict[str, Any] = {}
    t_true = _obs_col(lat, "t")
    if path_ok and t_true is not None:
        t_true = t_true.astype(float)
        ok = rows[np.isfinite(t_true[rows])]
        if ok.size >= 3:
            for kind, pth in paths.items():
                pos = T.project_onto_path(Z[ok], pth)
                truth[f"{kind}_path_position_vs_true_t_spearman"] = M.correlation_matrix(
                    pos, t_true[ok]
                )[0, 0]
            pos = T.project_onto_path(Z[ok], paths["gp"])
            fig = F.truth_scatter(
                t_true[ok],
                pos,
                "true maturation t",
                "GP path position",
                f"rho={truth['gp_path_position_vs_true_t_spearman']:.2f}",
            )
            p = _fig_out(ctx, tb, fig, "truth_t_vs_path", "traverse/truth_t_vs_path")
            figs["truth"].append(
                FigureItem(
                    p,
                    f"Held-out neutrophil-lineage cells ({ok.size}): position of their code projected on the GP path vs the simulator's true maturation t.",
                )
            )
    dens = _obs_col(lat, "granule_density")
    if dens is not None and rd.data is not None:
        dens = dens.astype(float)
        ok = rows[np.isfinite(dens[rows]) & rd.data.has_image.numpy()[rows]]
        if ok.size >= 3:
            dec = T.decode(rd.model, Z[ok], a.batch_size, rd.device)
            fd = _measure(dec.images, dec.masks, params, bg)
            truth["decoded_granule_density_vs_true_spearman"] = M.correlation_matrix(
                fd["granule_density"].to_numpy(float), dens[ok]
            )[0, 0]
            crops = rd.data.crops[ok].permute(0, 2, 3, 1).numpy()
            fr = G.measure_batch(crops, rd.data.masks[ok, 0].numpy().astype(bool), params)
            truth["real_crop_granule_density_vs_true_spearman"] = M.correlation_matrix(
                fr["granule_density"].to_numpy(float), dens[ok]
            )[0, 0]
            azu = _azurophilic_truth(lat, ok)
            if azu is not None:
                # the blob counter sees the large azurophilic granules; the fine specific
                # ones (part of the simulator's total density) are below 64 px resolution
                for nm, fx in (("decoded", fd), ("real_crop", fr)):
                    truth[f"{nm}_granule_density_vs_true_azurophilic_spearman"] = (
                        M.correlation_matrix(fx["granule_density"].to_numpy(float), azu)[0, 0]
                    )
            lob = _obs_col(lat, "lobes")
            if lob is not None:
                lob = lob.astype(float)[ok]
                truth["decoded_lobes_vs_true_spearman"] = M.correlation_matrix(
                    fd["lobes"].to_numpy(float), lob
                )[0, 0]
                truth["real_crop_lobes_vs_true_spearman"] = M.correlation_matrix(
                    fr["lobes"].to_numpy(float), lob
                )[0, 0]
            fig = F.truth_scatter(
                dens[ok],
                fd["granule_density"].to_numpy(float),
                "true granule density",
                "granules / 100 px^2 (decoded)",
                f"rho={truth['decoded_granule_density_vs_true_spearman']:.2f}",
            )
            p = _fig_out(ctx, tb, fig, "truth_granules_decoded", "traverse/truth_granules_decoded")
            figs["truth"].append(
                FigureItem(
                    p,
                    f"Granule density counted on images decoded from {ok.size} held-out cells' codes vs the simulator's true granule density.",
                )
            )
            truth["n_cells"] = int(ok.size)
    if truth:
        summary["truth_recovery"] = truth
        tables["truth_recovery"] = pd.DataFrame(
            [{"measure": k, "value": v} for k, v in truth.items()]
        )
        _csv(ctx, tables["truth_recovery"], "truth_recovery")

    for name in ("dim_feature_correlation", "real_feature_correlation"):
        if name in tables:
            _csv(ctx, tables[name], name)
    summary["seconds"] = round(time.time() - t0, 2)
    _tb_scalars(tb, "traverse/truth", truth)
    tb.close()

    # ---- report
    key = _key_findings(tables, truth, cents.names if path_ok else [], a.top_genes)
    summary["key_findings"] = key
    write_json(ctx.output("traverse_summary.json"), _clean(summary))
    sections = [Section("Key findings", text="\n\n".join(key))] if key else []
    sections += _eval_sections(ctx, lat, rd)
    text = (
        f"Top {len(trs)} latent dimensions by KL swept around the {anchor_desc}. "
        "Features are measured with scikit-image on the decoded crops (vae/granules.py)."
    )
    sections.append(Section("Per-dimension traversals", text=text, figures=figs["dims"]))
    if path_ok:
        top = tables["gene_ranking_gp"].head(a.top_genes)
        sections.append(
            Section(
                "Path from the earliest to the latest class",
                text=f"Classes in maturation order: {' -> '.join(cents.names)} "
                f"(rows per class: {', '.join(map(str, cents.counts))}).",
                tables=[
                    TableItem(
                        "Genes ranked along the GP path",
                        top,
                        "log2fc: end vs start; spearman: monotonic trend with path position; "
                        "score = |spearman| x |log2fc|. Full table: gene_ranking_gp.csv",
                    ),
                    TableItem(
                        "Genes ranked along the straight path",
                        tables["gene_ranking_straight"].head(a.top_genes),
                        "Full table: gene_ranking_straight.csv",
                    ),
                ],
                figures=figs["path"],
            )
        )
    gt = []
    if "dim_feature_correlation" in tables:
        gt.append(
            TableItem(
                "Traversal offset vs decoded features (Spearman)", tables["dim_feature_correlation"]
            )
        )
    if "real_feature_correlation" in tables:
        gt.append(
            TableItem(
                "Real crop features vs latent dims (Spearman)", tables["real_feature_correlation"]
            )
        )
    sections.append(
        Section(
            "Granule formation in the latent space",
            text=(
                "Which latent directions carry granule formation: correlations of granule count/density, "
                "GLCM contrast, cytoplasm hue, lobe count and nucleus share with each latent dim and with the "
                "path position."
            ),
            tables=gt,
            figures=figs["granules"],
        )
    )
    if truth:
        sections.append(
            Section(
                "Recovery of the simulator's ground truth",
                tables=[TableItem("Truth recovery (Spearman)", tables["truth_recovery"])],
                figures=figs["truth"],
            )
        )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    write_report(
        ctx.output("report"),
        f"WBC beta-VAE study: {cfg.experiment}",
        sections,
        resolved,
        subtitle=f"run folder {ctx.run_dir}; model epoch {rd.meta.get('epoch')}; "
        f"written {time.strftime('%Y-%m-%d %H:%M')}",
    )
    log.info(
        "traverse: %d dims, path %s, %.1fs; report %s",
        len(trs),
        "yes" if path_ok else "no",
        time.time() - t0,
        ctx.output("report"),
    )
    print(f"report: {ctx.output('report')}\ntensorboard --logdir {ctx.run_dir}")


def _key_findings(tables: dict, truth: dict, path_classes: list[str], top: int) -> list[str]:
    """One-line findings for the top of the report (from the tables just computed)."""
    out = []
    if "real_feature_correlation" in tables:
        df = tables["real_feature_correlation"].set_index("feature")
        zcols = [c for c in df.columns if c.startswith("z")]
        for feat in ["granule_density", *[f for f in df.index if f.startswith("program:")]]:
            if feat not in df.index:
                continue
            r = df.loc[feat, zcols].astype(float)
            if not np.isfinite(r).any():
                continue
            best = r.abs().sort_values(ascending=False).index[:3]
            dims = ", ".join(f"{c} (rho {r[c]:+.2f})" for c in best)
            extra = ""
            if "gp_path_position" in df.columns and np.isfinite(df.loc[feat, "gp_path_position"]):
                extra = f"; with GP path position rho {df.loc[feat, 'gp_path_position']:+.2f}"
            out.append(f"Latent dims most correlated with {feat} of held-out cells: {dims}{extra}.")
    if "gene_ranking_gp" in tables and path_classes:
        g = tables["gene_ranking_gp"]
        up = g[g["log2fc"] > 0].head(min(top, 8))["gene"].tolist()
        down = g[g["log2fc"] < 0].head(min(top, 8))["gene"].tolist()
        out.append(
            f"Along the GP path {path_classes[0]} -> {path_classes[-1]}, genes rising most "
            f"(fold change x monotonic trend): {', '.join(up) or 'none'}; falling: "
            f"{', '.join(down) or 'none'}."
        )
    for k, v in truth.items():
        if k != "n_cells" and v is not None and np.isfinite(v):
            out.append(f"Truth recovery: {k.replace('_', ' ')} = {v:.3f}.")
        elif k != "n_cells":
            out.append(
                f"Truth recovery: {k.replace('_', ' ')} undefined (the measured feature is "
                f"constant, e.g. no granules detected on the decoded images)."
            )
    return out


def _azurophilic_truth(lat, rows: np.ndarray) -> np.ndarray | None:
    """Simulator truth of the large (azurophilic) granule density of ``rows``, from t.

    NaN outside the neutrophil lineage; None when the data are not simulated.
    """
    if "t" not in lat.obs or "kind" not in lat.obs:
        return None
    try:
        from pipeline.simulator.morphology import azurophilic_density
    except ImportError:  # pragma: no cover
        return None
    t = lat.obs["t"].to_numpy().astype(float)[rows]
    return np.array([azurophilic_density(x) if np.isfinite(x) else np.nan for x in t])


def _minmax(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    r = np.nanmax(v) - np.nanmin(v) if np.isfinite(v).any() else 0
    return (v - np.nanmin(v)) / r if r > 0 else np.zeros_like(v)


def _eval_sections(ctx: StageContext, lat, rd: RunData) -> list:
    """Report sections from stage=evaluate's outputs, when it ran."""
    import json

    from vae.report import FigureItem, Section, TableItem

    if "evaluation" not in ctx.inputs and not ctx.has_input("evaluation"):
        return [Section("Evaluation", text="stage=evaluate has not run for this experiment.")]
    ev_dir = ctx.input("evaluation").parent
    metrics = json.loads(ctx.input("evaluation").read_text())
    tables, figs = [], []
    captions = {
        "latent_structure": "kNN accuracy (reference: train split), silhouette and Leiden ARI/NMI of each latent on the held-out split.",
        "reconstruction": "Held-out reconstruction: masked image MSE/SSIM; expression per-gene r; cross-modal prediction.",
        "retrieval": "Finding each cell's own expression profile from its image latent (Recall@k, FOSCTTM: 0 perfect, 0.5 random).",
        "disentanglement": "Against simulator truth: MIG gap, DCI informativeness and the best single dim's Spearman per factor.",
    }
    for name, cap in captions.items():
        f = ev_dir / f"{name}.csv"
        if f.exists():
            tables.append(TableItem(name.replace("_", " "), pd.read_csv(f), cap))
    fcaps = {
        "umap_labels.png": "Embedding of the shared latent, coloured by label, split and maturation.",
        "umap_programs.png": "Same embedding coloured by observed granule program scores.",
        "umap_image.png": "Embedding of the image-only latent, coloured by label.",
        "umap_expression.png": "Embedding of the expression-only latent, coloured by label.",
        "reconstructions.png": "Held-out cells: masked input, joint reconstruction, and the image decoded from expression alone.",
    }
    for fn, cap in fcaps.items():
        if (ev_dir / fn).exists():
            figs.append(FigureItem(ev_dir / fn, cap))
    dis = metrics.get("disentanglement", {})
    text = f"{metrics.get('n_rows')} rows of split '{metrics.get('split')}'."
    if dis:
        text += (
            f" MIG {dis.get('mig')}, DCI disentanglement {dis.get('dci_disentanglement')}, "
            f"completeness {dis.get('dci_completeness')}."
        )
    return [Section("Evaluation (held-out cells)", text=text, tables=tables, figures=figs)]


__all__ = ["run_evaluate", "run_traverse", "observed_program_scores"]
