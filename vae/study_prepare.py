"""Preparing a query for the model: its images and expression as the model's input
tensors, for :class:`vae.api.Study` (the public class).

:class:`StudyPrepareMixin` holds :meth:`vae.api.Study.prepare` and what it reads a query
with: the crops checked and resized; the genes matched by name
(:meth:`vae.api.Study.gene_columns`, :meth:`vae.api.Study.missing_genes`); counts or
log-normalised values told apart and normalised as the training data were, decided on
the whole file for a file read a block of rows at a time (:class:`_ExpressionPlan`);
missing genes imputed (:meth:`vae.api.Study.reference_expression`); and the expression
batches of a query named. :class:`GeneReport` says how a query's genes matched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vae.inputs.schema import (
    CELL_DIAMETER,
    HAS_COUNTS,
    HAS_EXPRESSION,
    HAS_IMAGE,
    cell_diameters,
)
from vae.study_common import StudyError, _flag, log

# largest value a log1p-normalised matrix can hold and still be one: log1p(1e6) = 13.8
# (counts per million, one gene holding the whole cell); above it, values are not logged
LOGNORM_MAX = 14.0
# values checked at a time by _is_counts: np.allclose makes several float temporaries of
# its input (+0.64 GiB for 43 M values; a 30k-gene 10x matrix holds ~600 M)
COUNT_CHECK_VALUES = 1 << 22


@dataclass
class GeneReport:
    """How a query's genes matched the model's.

    n_model : genes of the model; matched : found in the query (by name);
    missing : model genes absent from the query (filled as described in the
    :mod:`vae.api` docstring); n_extra : query genes the model does not know (ignored);
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


class StudyPrepareMixin:
    """The preparation of queries of :class:`vae.api.Study`: AnnData to the model's tensors.

    Relies on these attributes of :class:`vae.api.Study`: ``model`` (its ``args``,
    ``encode`` and ``decode``), ``meta``, ``config`` (``pair.background_value``,
    ``expression.target_sum``), ``reference``, ``latent_path``, ``device``,
    ``gene_names``, ``crop_size``, ``pair_crop_size``, ``impute``,
    ``impute_iterations``, and the caches ``_ref_expr`` (None until computed; the
    ``reference`` setter clears it) and ``_said`` (set of notes logged).
    """

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
        self._query_image_sources(data, adata.obs)
        return data, report

    def _query_image_sources(self, data, obs) -> None:
        """A model with image sources (``vae.image_batch_key``) decodes each query crop in
        its own source when the query names one the study knows (its reconstruction and
        anomaly score then read like the study's own crops'); any other crop, or a query
        without the column, is drawn in the average of the sources. The code itself never
        reads a source."""
        from vae.data import assign_image_batches

        args = self.model.args
        key = getattr(args, "image_batch_key", None)
        if not getattr(args, "image_batch_names", None) or not key:
            return
        if not bool(data.has_image.any()):
            return  # no crop to decode
        if key not in obs:
            self._note(
                logging.INFO,
                "the study draws cells by image source (obs['%s']); the query has no such "
                "column: its crops are drawn in the average of the sources",
                key,
            )
            return
        assign_image_batches(data, obs, key, "query", list(args.image_batch_names))
        unknown = (data.image_batch.numpy() < 0) & data.has_image.numpy().astype(bool)
        if unknown.any():
            self._note(
                logging.INFO,
                "query crops of a source the study never saw (obs['%s']; the study's: %s): "
                "drawn in the average of the sources",
                key,
                ", ".join(map(str, args.image_batch_names)),
            )

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
