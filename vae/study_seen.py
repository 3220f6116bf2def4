"""Which cells of a query the study has already seen, for :class:`vae.api.Study` (the
public class).

:class:`StudySeenMixin` matches a query's image file names and cell ids against the
study's reference (:meth:`vae.api.Study.seen_cells`, :meth:`vae.api.Study.seen_images`,
:meth:`vae.api.Study.seen_expression`) and warns of the cells it holds
(:meth:`vae.api.Study.warn_seen`): their calls are not those of new cells.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vae.inputs.schema import HAS_EXPRESSION
from vae.study_common import _flag, log


class StudySeenMixin:
    """The seen-cell checks of :class:`vae.api.Study`: a query's cells the reference holds.

    Relies on these attributes of :class:`vae.api.Study`: ``reference`` (the AnnData of
    ``latent.h5ad``: its ``image_ref``, ``expression_ref`` and ``has_expression``
    columns) and ``latent_path`` (named in errors).
    """

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
