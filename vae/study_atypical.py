"""Atypical cells, for :class:`vae.api.Study` (the public class).

:class:`StudyAtypicalMixin` scores query cells against the study's training cells
(:meth:`vae.api.Study.anomaly_scores`), sets the scores above which a cell is atypical
from the study's own held-out cells (:meth:`vae.api.Study.atypical_thresholds`; a
reference written before those scores existed is scored from the paired data it was
trained on, else :attr:`vae.api.Study.atypical_off` says why none is flagged) and warns
of an input most of whose cells are atypical, or that scores above the held-out cells
as a whole (:meth:`vae.api.Study.warn_atypical`, :meth:`vae.api.Study.input_shift`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vae.study_common import NO_PAIRED, log

# an input more than this share of whose cells are atypical (vae_atypical) is warned of
# with the usual causes (Study.warn_atypical): no patient is mostly cells unlike every
# cell the study saw; crops cut unlike its training crops, another stain or
# magnification, or kinds it never saw are
ATYPICAL_MOSTLY = 0.5

# an input whose cells, as a whole, score higher than the study's own held-out cells:
# more than SHIFT_MOSTLY of them above the held-out cells' SHIFT_QUANTILE (a quarter of
# held-out cells are), and more than chance allows (one-sided binomial p < SHIFT_P, so a
# handful of cells cannot trip it). One labelled source left out of a real-preset study
# (scripts/unseen_source_check.py, seed 0): its cells were 0.3 % atypical, so the warning
# above stayed silent, and their label calls right 0.58 of the time, while 94 % of them
# scored above this quantile (another source 99 %; the same crops through a study that
# trained on them 0.9 % and 20.5 %; docs/vae.md, "A microscope the study never saw")
SHIFT_QUANTILE = 0.75
SHIFT_MOSTLY = 0.5
SHIFT_P = 1e-3


class StudyAtypicalMixin:
    """The atypical-cell scoring of :class:`vae.api.Study`.

    Relies on these attributes of :class:`vae.api.Study`: ``model``, ``meta``
    (``n_private``), ``n_shared``, ``reference``, ``latent_path``, ``device``,
    ``_atypical_q`` (the ``atypical_quantile`` property's value), ``_paired_candidates``,
    the caches ``_anomaly_ref``, ``_scored_ref``, ``_atypical_thr`` and
    ``_atypical_why`` (reset by the ``reference`` setter; ``_atypical_thr`` also by the
    ``atypical_quantile`` setter), ``_labelled`` (:meth:`fit_labelled_crops`), and the
    methods ``encode``, ``_read_paired`` (the study's paired data) and ``training_crops``
    (:class:`vae.study_read.StudyReadMixin`).
    """

    def atypical_thresholds(self) -> dict[str, float]:
        """``image`` / ``expression`` / ``both`` -> the ``anomaly_score`` above which a
        query cell with those modalities is atypical (NaN: none is; every value NaN
        when :attr:`atypical_quantile` is None, or when the study's held-out scores
        cannot be had: :attr:`atypical_off` says why). With :attr:`labelled_crops`,
        ``image`` is that quantile of the labelled crops' own scores."""
        if self._atypical_q is None:
            return {m: float("nan") for m in ("image", "expression", "both")}
        if self._atypical_thr is None:
            from vae.analysis import anomaly as A

            self._atypical_thr = A.held_out_thresholds(
                self._scored_reference(), self._anomaly_reference(), self._atypical_q
            )
        if self._labelled is not None and not self.atypical_off:
            # image-only cells against the user's labelled crops of their microscope
            # (vae.study_labelled), not the study's held-out cells of other microscopes
            return {**self._atypical_thr, "image": self._labelled.threshold(self._atypical_q)}
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
            self._warn_shift(obs, source)
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
            causes.append(
                "images of another stain or magnification than the study's (labelled crops "
                "of that microscope: embed.labelled_crops, Study.fit_labelled_crops)"
            )
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

    def input_shift(self, q) -> dict | None:
        """How far the cells of ``q`` (an embedded query, or its obs: ``anomaly_score``
        and ``vae_modality``), as a whole, score above the study's own held-out cells.

        Each cell is compared with the :data:`SHIFT_QUANTILE` quantile of the held-out
        cells' ``anomaly_score`` for its modality set (:func:`vae.analysis.anomaly.
        held_out_thresholds`); an input like the study's held-out cells has about
        ``1 - SHIFT_QUANTILE`` of its cells above it.

        Returns
        -------
        dict or None
            ``n`` (cells with a score), ``above`` (how many are above), ``share``,
            ``expected`` (``1 - SHIFT_QUANTILE``), ``p`` (one-sided binomial test of
            ``above`` against ``expected``) and ``shifted`` (``share`` >
            :data:`SHIFT_MOSTLY` and ``p`` < :data:`SHIFT_P`); None where ``q`` has no
            scored cell or the study no held-out scores.
        """
        from scipy.stats import binomtest

        from vae.analysis import anomaly as A

        obs = getattr(q, "obs", q)
        if not len(obs) or "anomaly_score" not in obs or "vae_modality" not in obs:
            return None
        if self.atypical_off is not None:  # the study has no held-out scores
            return None
        thr = A.held_out_thresholds(
            self._scored_reference(), self._anomaly_reference(), SHIFT_QUANTILE
        )
        # the threshold of each cell's modality set (image / expression / both)
        cut = obs["vae_modality"].astype(str).map(thr).to_numpy(dtype=np.float64)
        score = obs["anomaly_score"].to_numpy(dtype=np.float64)
        ok = np.isfinite(score) & np.isfinite(cut)
        n = int(ok.sum())
        if n == 0:
            return None
        above = int((score[ok] > cut[ok]).sum())
        expected = 1.0 - SHIFT_QUANTILE
        p = float(binomtest(above, n, expected, alternative="greater").pvalue)
        share = above / n
        return {
            "n": n,
            "above": above,
            "share": share,
            "expected": expected,
            "p": p,
            "shifted": bool(share > SHIFT_MOSTLY and p < SHIFT_P),
        }

    def _warn_shift(self, obs, source: str) -> None:
        """Log a warning where :meth:`input_shift` finds the input shifted as a whole."""
        shift = self.input_shift(obs)
        if shift is None or not shift["shifted"]:
            return
        if self._labelled is None:
            calls = (
                "Label calls (vae_call) on a microscope the study never saw were right about "
                "half the time when measured (docs/vae.md, 'A microscope the study never "
                "saw'); some crops of this microscope sorted into one sub-folder per class "
                "(embed.labelled_crops, Study.fit_labelled_crops) call its image-only cells "
                "from your own labels"
            )
        else:
            calls = (
                "Its image-only cells are called from the labelled crops of "
                f"{self._labelled.source} (cross-validated accuracy "
                f"{self._labelled.cv_accuracy:.2f})"
            )
        log.warning(
            "%s: %d of %d cells (%.0f %%) score above the %.0fth percentile of the study's "
            "own held-out cells (about %.0f %% would; binomial p = %.1g): few are atypical, "
            "but the input as a whole is unlike the cells the study was trained on: images "
            "of another microscope, stain or magnification, cells cut otherwise, or a mix "
            "of kinds the study rarely saw. %s",
            source,
            shift["above"],
            shift["n"],
            100 * shift["share"],
            100 * SHIFT_QUANTILE,
            100 * shift["expected"],
            shift["p"],
            calls,
        )
