"""TensorBoard logging of β-VAE training.

Tags written (all by rank 0 only), every one at the optimizer step (the usual TensorBoard
x-axis): per-step values at that step, per-epoch values (``val/*``, ``epoch_train/*``,
``kl_dim/*``, figures) at the global step reached at the end of that epoch; the scalar
``epoch`` maps the one to the other. A resumed run purges what the earlier run wrote after
the step it resumes from (``purge_step``), so no step holds two values.

* ``epoch``: the epoch just ended, at the step that ended it

* ``train/<term>``, ``val/<term>``: every loss term (see :class:`vae.losses.LossTerms`)
* ``schedule/beta``, ``schedule/capacity``, ``schedule/lr``, ``train/grad_norm``
* ``kl_dim/NN``: KL of the fused posterior per latent dim (val, per epoch)
* ``reconstruction/val``: image grid, rows = input | reconstruction (fused) |
  reconstruction from the image alone | cross-modal (image decoded from expression, in
  the pose of the nearest other cell of the batch: :func:`lend_batch_poses`)
* ``expression/granule_genes``: observed vs reconstructed (fused and from image)
* ``reconstruction/val/rows``: text, once: what the grid's rows and columns are
* ``latent/mu_NN``: histograms of the fused posterior means of the figure batch's cells
* ``latent/dims``: text, once: which dims (``NN``) are shared and which private
* ``loss/weights``: text, once: each term's weight in ``total`` (terms of weight 0 are
  not logged)
* projector: fused latent of (up to) N cells with crop thumbnails and labels
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vae.data import Batch
from vae.infer import encode_batch
from vae.model import TwoBranchVAE

RECON_TAG = "reconstruction/val"
EXPRESSION_TAG = "expression/granule_genes"


def lend_batch_poses(model: TwoBranchVAE, batch: Batch, post) -> torch.Tensor:
    """(B, d) the expression experts' codes of ``batch``, each in the pose of the nearest
    *other* cell of the batch with a crop; the codes as they are where none can lend.

    The figure batch's own version of :func:`vae.analysis.run.in_training_poses` (a
    training run has no finished reference to lend poses): the expression code is
    pose-free and decodes a nucleus averaged over orientations (a band drawn as a ring);
    a cell's pose is its single-view fused code minus its code over the crop's 8
    symmetries (``vae.encode_views``), lent by the cell whose 8-view code lies nearest,
    never the cell itself.

    Parameters
    ----------
    model : TwoBranchVAE
    batch : vae.data.Batch
        The figure batch, with images.
    post : vae.model.Posteriors
        ``batch``'s single-view posteriors (:func:`vae.infer.encode_batch`).
    """
    ze = post.expression[0]
    views = int(getattr(model.args, "encode_views", 1) or 1)
    lenders = batch.has_image.bool()
    if views == 1 or batch.image is None or int(lenders.sum()) < 2:
        return ze
    rep = encode_batch(model, batch, views=views).joint[0]
    pose = post.joint[0] - rep
    dist = torch.cdist(ze.float(), rep.float())
    dist[:, ~lenders] = float("inf")
    dist.fill_diagonal_(float("inf"))  # never the cell's own crop
    return ze + pose[dist.argmin(1)]


def pick_granule_genes(gene_names: list[str], var=None, max_genes: int = 12) -> list[int]:
    """Indices of the genes shown in the expression figure.

    ``var["program"]`` containing "granule" (simulator), else known
    granule-protein genes by name (MPO, ELANE, ...), else
    ``var["gene_of_interest"]``, else the first ``max_genes`` genes.
    """
    if var is not None:
        if "program" in var:
            prog = var["program"].astype(str).str.lower()
            hit = np.flatnonzero(prog.str.contains("granul").to_numpy())
            if hit.size:
                return hit[:max_genes].tolist()
    known = {"MPO", "ELANE", "PRTN3", "CTSG", "AZU1", "LTF", "CAMP", "LCN2", "MMP8", "MMP9"}
    hit = [i for i, g in enumerate(gene_names) if g.upper() in known]
    if hit:
        return hit[:max_genes]
    if var is not None and "gene_of_interest" in var:
        hit = np.flatnonzero(var["gene_of_interest"].to_numpy().astype(bool)).tolist()
    return (hit or list(range(min(max_genes, len(gene_names)))))[:max_genes]


def _cells(dec) -> torch.Tensor:
    """(B, 3, S, S) decoded cells on CPU as every figure draws them
    (:func:`vae.analysis.traverse.draw_cells`: the decoded mask, nothing outside)."""
    from vae.analysis.traverse import draw_cells

    img = dec.image.float().permute(0, 2, 3, 1).cpu().numpy()
    mask = dec.mask[:, 0].float().cpu().numpy() if dec.mask is not None else None
    return torch.from_numpy(draw_cells(img, mask)).permute(0, 3, 1, 2)


class TBLogger:
    """Thin wrapper around ``SummaryWriter`` with the figures of this model.

    Parameters
    ----------
    log_dir : folder of the event files
    gene_names : list of str
    granule_genes : indices of the genes for the expression figure
    """

    def __init__(self, log_dir: str | Path, gene_names: list[str], granule_genes: list[int]):
        self.log_dir = Path(log_dir)
        self.gene_names = gene_names
        self.granule_genes = granule_genes
        self._legend_written = False
        self._writer = None  # opened at the first write: a resume sets purge_step first
        self._purge_step: int | None = None

    @property
    def writer(self):
        """The ``SummaryWriter`` (opened on first use)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self._purge_step)
            if self._purge_step is not None:
                # a second START at the same step: TensorBoard's Python reader (and
                # --load_fast=false) reads a run's first START as its beginning, not as a
                # restart, and purged nothing on a first resume (a fresh run writes none)
                from tensorboard.compat.proto.event_pb2 import Event, SessionLog

                start = SessionLog(status=SessionLog.START)
                self._writer.file_writer.add_event(Event(step=self._purge_step, session_log=start))
        return self._writer

    def resume_at(self, step: int) -> None:
        """A resumed run continues after optimizer step ``step``: TensorBoard drops what
        earlier event files hold at later steps (written after the checkpoint the run
        resumes from), so no step holds two values. Values at ``step`` itself (the last
        kept epoch's) stay."""
        self._purge_step = int(step) + 1
        if self._writer is not None:  # already written to: a new file that purges
            self._writer.close()
            self._writer = None

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def dims_legend(self, n_shared: int, n_private: int) -> None:
        """Say once which of the ``NN`` of ``kl_dim/NN`` and ``latent/mu_NN`` are what (the
        full code is the shared dims, then each modality's private ones)."""
        last = n_shared + 2 * n_private - 1
        text = f"kl_dim/NN and latent/mu_NN: dims 00-{n_shared - 1:02d} shared (fused)"
        if n_private:
            text += (
                f", {n_shared:02d}-{n_shared + n_private - 1:02d} private to the image, "
                f"{n_shared + n_private:02d}-{last:02d} private to the expression"
            )
        self.writer.add_text("latent/dims", text + ".", 0)

    def weights_legend(self, weights: dict[str, str], off: set[str], moe: bool = False) -> None:
        """Say once how each logged (unweighted) loss term enters ``total``, and which are
        not logged because their weight is 0."""
        rows = [f"| `{t}` | {v} |" for t, v in weights.items() if t not in off]
        text = (
            "Loss terms are logged unweighted; `total` = Σ weight × term.\n\n"
            "| term | weight in total |\n|---|---|\n" + "\n".join(rows)
        )
        if moe:
            text += (
                "\n\nvae.fusion=moe: the cross-modal and unimodal terms are reported only "
                "(they are inside `image` / `expression`); `kl_image` + `kl_expression` = `kl`."
            )
        if off:
            text += "\n\nNot logged (weight 0, always 0): " + ", ".join(sorted(off)) + "."
        self.writer.add_text("loss/weights", text, 0)

    def kl_per_dim(self, kl: np.ndarray, step: int) -> None:
        for i, v in enumerate(np.asarray(kl).ravel()):
            self.writer.add_scalar(f"kl_dim/{i:02d}", float(v), step)

    @torch.no_grad()
    def epoch_figures(self, model: TwoBranchVAE, batch: Batch, step: int) -> None:
        """Reconstruction grid, expression figure and latent histograms on a fixed batch,
        at ``step`` (the optimizer step that ended the epoch)."""
        import torchvision

        was = model.training
        model.eval()
        post = encode_batch(model, batch)
        use_image = batch.image is not None
        # each profile decoded in its own batch (a model with vae.batch_key), as evaluate does
        joint = model.decode(
            post.joint[0],
            render=use_image,
            use_image=use_image,
            batch=batch.batch,
            image_batch=batch.image_batch,
        )
        if use_image:
            from_img = model.decode(post.image[0], render=True, image_batch=batch.image_batch)
            rows = [batch.image.float().cpu(), _cells(joint), _cells(from_img)]
            if post.expression is not None:  # none without genes (pair=image_only)
                ze = lend_batch_poses(model, batch, post)
                rows.append(_cells(model.decode(ze, render=True, image_batch=batch.image_batch)))
            grid = torchvision.utils.make_grid(
                torch.cat(rows).clamp(0, 1),
                nrow=batch.image.shape[0],
                padding=2,
                pad_value=1.0,
            )
            self.writer.add_image(RECON_TAG, grid, step)
            if not self._legend_written:  # the image card has no room for row titles
                names = ["input (masked crop)", "fused reconstruction", "from the image alone"]
                if len(rows) > 3:
                    names.append(
                        "from expression alone (cross-modal; in the pose of the nearest other "
                        "cell of these, when the model's codes are pose-free)"
                    )
                self.writer.add_text(
                    f"{RECON_TAG}/rows",
                    "Rows, top to bottom: "
                    + " | ".join(names)
                    + f". Columns: the same {batch.image.shape[0]} cells every epoch (the "
                    "validation split's when there is one); decoded cells drawn as every "
                    "figure draws them.",
                    step,
                )
                self._legend_written = True
        else:  # no image in the data: no reconstruction grid, no image -> expression
            from_img = joint
        # no expression figure without genes (pair=image_only)
        if joint.expression_log is not None and joint.expression_log.shape[1] > 0:
            self.writer.add_figure(
                EXPRESSION_TAG,
                self._expression_figure(
                    batch.x.cpu().numpy(),
                    joint.expression_log.float().cpu().numpy(),
                    from_img.expression_log.float().cpu().numpy(),
                    batch.has_expression.cpu().numpy(),
                ),
                step,
            )
        mu = post.joint[0].float().cpu()
        for i in range(mu.shape[1]):
            self.writer.add_histogram(f"latent/mu_{i:02d}", mu[:, i], step)
        if was:
            model.train()

    def _expression_figure(self, obs, rec, from_img, has_expr):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        genes = self.granule_genes
        n = len(genes)
        cols = min(4, max(1, n))
        rows = int(np.ceil(n / cols)) or 1
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), squeeze=False)
        keep = has_expr.astype(bool)
        for ax, g in zip(axes.ravel(), genes):
            ax.scatter(obs[keep, g], rec[keep, g], s=6, alpha=0.6, label="fused")
            ax.scatter(obs[keep, g], from_img[keep, g], s=6, alpha=0.6, label="from image")
            hi = float(max(obs[keep, g].max(initial=0), rec[keep, g].max(initial=0), 1e-3))
            ax.plot([0, hi], [0, hi], "k--", lw=0.5)
            ax.set_title(self.gene_names[g], fontsize=8)
            ax.tick_params(labelsize=6)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        axes.ravel()[0].legend(fontsize=6)
        fig.supxlabel("observed log-normalised", fontsize=8)
        fig.supylabel("reconstructed", fontsize=8)
        fig.tight_layout()
        return fig

    def projector(
        self, latent: np.ndarray, labels: list[str], thumbnails: torch.Tensor | None, step: int
    ) -> None:
        """Embedding projector: (N, d) latent, N labels, (N, 3, h, w) thumbnails in [0, 1]."""
        keep = np.isfinite(latent).all(1)
        if not keep.any():
            return
        lab = [labels[i] for i in np.flatnonzero(keep)]
        thumbs = thumbnails[torch.from_numpy(keep)] if thumbnails is not None else None
        self.writer.add_embedding(
            torch.from_numpy(latent[keep]),
            metadata=lab,
            label_img=thumbs,
            global_step=step,
            tag="vae_latent",
        )

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
