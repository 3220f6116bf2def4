"""Encode a whole data set: fused and per-modality latent means, cross-modal predictions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vae.data import Batch, PairedTensors, raw_batch, to_batch
from vae.model import Posteriors, TwoBranchVAE


@dataclass
class Latents:
    """Posterior means for every row (float32 numpy).

    joint : (N, d) fused posterior mean (all latent dims)
    image : (N, d) image-only posterior mean, NaN rows where there is no image
    expression : (N, d) expression-only posterior mean, NaN rows without expression
    joint_logvar : (N, d)
    expression_from_image : (N, G) log-normalised expression decoded from the
        image-only mean (NaN rows without image); when no row has an image, a
        read-only all-NaN view that takes no memory (``np.broadcast_to``)
    """

    joint: np.ndarray
    image: np.ndarray
    expression: np.ndarray
    joint_logvar: np.ndarray
    expression_from_image: np.ndarray
    decoded: Decoded | None = None  # with decode=True


@dataclass
class Decoded:
    """Inputs and decodings of the encoded rows (numpy, channel-last images).

    Filled by ``encode_dataset(..., decode=True)`` for the analyses; unlike
    :class:`Latents` nothing is NaN-masked, use ``has_image``/``has_expression``.
    """

    rows: np.ndarray  # (n,) row indices into the data set
    image: np.ndarray  # (n, S, S, 3) masked input crops in [0, 1]
    mask: np.ndarray  # (n, S, S) bool
    x: np.ndarray  # (n, G) observed log-normalised expression
    counts: np.ndarray | None  # (n, G)
    library: np.ndarray  # (n,)
    has_image: np.ndarray  # (n,) bool
    has_expression: np.ndarray
    rec_image: np.ndarray  # (n, S, S, 3) decoded from the joint mean (RGB of the whole square)
    rec_mask: np.ndarray | None  # (n, S, S) its decoded mask probability (None: no mask)
    rec_expression: np.ndarray  # (n, G)
    nb_mu: np.ndarray | None  # (n, G) NB mean of the joint decoding (counts models)
    nb_theta: np.ndarray | None  # (G,)
    expr_from_image: np.ndarray  # (n, G) decoded from the image-only mean
    image_from_expr: np.ndarray  # (n, S, S, 3) decoded from the expression-only mean
    image_from_expr_mask: np.ndarray | None  # (n, S, S) its decoded cell-mask probability

    def rec_cells(self) -> np.ndarray:
        """(n, S, S, 3) the joint reconstructions drawn as figures draw decoded cells
        (:func:`vae.analysis.traverse.draw_cells`: the decoded mask, nothing outside)."""
        from vae.analysis.traverse import draw_cells

        return draw_cells(self.rec_image, self.rec_mask)

    def image_from_expr_cells(self) -> np.ndarray:
        """(n, S, S, 3) the images decoded from expression, drawn the same way."""
        from vae.analysis.traverse import draw_cells

        return draw_cells(self.image_from_expr, self.image_from_expr_mask)


def _chw_to_hwc(t: torch.Tensor) -> np.ndarray:
    return t.float().permute(0, 2, 3, 1).cpu().numpy()


def _encoded_batches(
    model: TwoBranchVAE,
    data: PairedTensors,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device | str,
    images: bool = True,
    views: int = 1,
) -> Iterator[tuple[Batch, Posteriors]]:
    """``rows`` in batches on ``device`` with their posteriors, the model in eval mode
    (its train/eval state restored afterwards); ``images=False`` reads no crops;
    ``views``: see :meth:`TwoBranchVAE.encode`."""
    was_training = model.training
    model.eval()
    try:
        for s in range(0, rows.size, batch_size):
            idx = torch.as_tensor(rows[s : s + batch_size], dtype=torch.long)
            b = to_batch(raw_batch(data, idx, images), torch.device(device))
            yield b, encode_batch(model, b, views)
    finally:
        if was_training:
            model.train()


def encode_batch(model: TwoBranchVAE, b: Batch, views: int = 1) -> Posteriors:
    """The posteriors of one :class:`vae.data.Batch`: every modality it holds, the
    cells' sizes included (read by a model with a size head).

    Parameters
    ----------
    model : TwoBranchVAE
        Used as it is: its train/eval mode is not changed and gradients are recorded
        unless the caller turns them off (:func:`encode_dataset` does both).
    b : vae.data.Batch
        On the model's device (:func:`vae.data.to_batch`): ``image`` (B, 3, S, S)
        float in [0, 1] and ``mask`` (B, 1, S, S) {0, 1}, or both None; ``x`` (B, G)
        log1p-normalised expression; ``log_library`` (B,) log total counts;
        ``has_image`` / ``has_expression`` (B,) bool; ``diameter`` (B,) px or None.
    views : int, default 1
        1: the image expert of each crop as given; 8: its mean over the square's 8
        symmetries (:func:`vae.model.dihedral_mean`).

    Returns
    -------
    vae.model.Posteriors
        ``joint``, ``image``, ``expression``: each a ``(mu, logvar)`` pair of (B, d)
        tensors on ``b``'s device, d = ``model.n_latent`` = n_shared + 2 * n_private;
        ``image`` None when ``b.image`` is None, ``expression`` None for a model
        without genes. The unimodal posteriors are not NaN-masked (rows without an
        image hold N(0, 1) placeholders, rows without expression the expert's reading
        of their zero ``x``): read them with ``has_image`` / ``has_expression``.
        ``joint``'s private blocks are 0 (the prior) where the modality is absent.
    """
    return model.encode(
        b.image,
        b.x,
        b.has_image,
        b.has_expression,
        b.mask,
        b.log_library,
        views=views,
        diameter=b.diameter,
    )


@torch.no_grad()
def encode_dataset(
    model: TwoBranchVAE,
    data: PairedTensors,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    rows: np.ndarray | None = None,
    decode: bool = False,
    views: int | None = None,
) -> Latents:
    """Posterior means of ``rows`` (default all) with the model in eval mode.

    ``decode=True`` also decodes the joint, image-only and expression-only
    means and keeps the inputs (``Latents.decoded``), for the analyses. Without
    ``decode``, no CNN runs on a row without an image (none at all when no row of
    ``rows`` has one).

    ``views`` (default ``model.args.encode_views``): how many symmetries of each
    crop the image expert averages for the reported latents (1 or 8,
    :func:`vae.model.dihedral_mean`). Reconstructions (``decode=True``) are always
    decoded from the single-view posterior: the averaged code has no pose, so it
    decodes a cell in no particular orientation, not the input's.

    Parameters
    ----------
    model : TwoBranchVAE
        Put in eval mode while encoding, its previous mode restored after.
    data : vae.data.PairedTensors
        The rows: ``crops`` (N, 3, S, S) uint8, ``masks`` (N, 1, S, S), ``x`` (N, G)
        float32 log1p-normalised expression, ``has_image`` / ``has_expression`` (N,)
        bool.
    device : torch.device or str, default ``"cpu"``
        Where the batches are encoded (the model must already be there).
    batch_size : int, default 256
        Rows per forward pass (memory, not results).
    rows : (n,) int array, optional
        Row indices into ``data``, in the order returned; default all N rows.
    decode : bool, default False
        Also fill ``Latents.decoded`` (:class:`Decoded`).
    views : int, optional
        1 or 8, see above; default ``model.args.encode_views`` (1 where unset).

    Returns
    -------
    Latents
        float32 numpy arrays, one row per entry of ``rows`` (n): ``joint``,
        ``image``, ``expression`` posterior means and ``joint_logvar``, each (n, d),
        d = ``model.n_latent`` = n_shared + 2 * n_private (``[shared | image private
        | expression private]``); ``image`` NaN on rows without an image,
        ``expression`` NaN on rows without expression (every row for a model without
        genes); ``joint`` and ``joint_logvar`` are never masked.
        ``expression_from_image`` (n, G) log1p-normalised expression decoded from the
        image mean, NaN on rows without an image. ``decoded``: None unless ``decode``.
    """
    rows = np.arange(data.n) if rows is None else np.asarray(rows)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("j", "lv", "i", "e")}
    dec: dict[str, list[np.ndarray]] = {}
    theta = None
    any_image = bool(data.has_image[torch.as_tensor(rows, dtype=torch.long)].any())
    images = decode or any_image
    views = int(getattr(model.args, "encode_views", 1)) if views is None else int(views)
    d, g = model.n_latent, data.n_genes
    # expression decoded from the image mean, NaN on rows without an image: with no image
    # row at all a read-only all-NaN view, no memory (audit: 1.6 GB at 20k rows x 19,899
    # genes, twice over while a list of batches was concatenated); else one array filled
    # in place
    x_img_all = np.full((rows.size, g), np.nan, np.float32) if any_image else None
    start = 0
    for b, post in _encoded_batches(model, data, rows, batch_size, device, images, views):
        stop = start + int(b.has_image.shape[0])
        nan_i = (~b.has_image).view(-1, 1)
        nan_e = (~b.has_expression).view(-1, 1)
        mj = post.joint[0].float()
        nan = torch.tensor(float("nan"), device=mj.device)
        # a model without genes (pair=image_only) has no expression posterior
        me = post.expression[0].float() if post.expression is not None else mj * nan
        if post.image is None:  # no image in these rows: the image latent is NaN throughout
            mi = torch.full_like(mj, float("nan"))
            di = None
        else:
            mi = post.image[0].float()
            # expression decoded from the image mean; the image decoder on image rows only
            di = model.decode(
                post.image[0],
                image_rows=None if decode else b.has_image,
                batch=b.batch,
                image_batch=b.image_batch,
            )
            if x_img_all is not None and bool(b.has_image.any()):
                x_img = di.expression_log.float()
                x_img_all[start:stop] = torch.where(nan_i, nan, x_img).cpu().numpy()
        start = stop
        out["j"].append(post.joint[0].float().cpu().numpy())
        out["lv"].append(post.joint[1].float().cpu().numpy())
        out["i"].append(torch.where(nan_i, nan, mi).cpu().numpy())
        out["e"].append(torch.where(nan_e, nan, me).cpu().numpy())
        if decode:
            if views != 1:  # reconstructions from the posterior of the crop as given
                post = encode_batch(model, b)
                di = (
                    model.decode(post.image[0], batch=b.batch, image_batch=b.image_batch)
                    if post.image is not None
                    else None
                )
            t = _decode_batch(model, b, post, di, dec)
            theta = t if t is not None else theta

    def cat(k: str, width: int) -> np.ndarray:
        return np.concatenate(out[k]) if out[k] else np.zeros((0, width), np.float32)

    if x_img_all is None:
        x_img_all = np.broadcast_to(np.float32(np.nan), (rows.size, g))
    return Latents(
        joint=cat("j", d),
        image=cat("i", d),
        expression=cat("e", d),
        joint_logvar=cat("lv", d),
        expression_from_image=x_img_all,
        decoded=_decoded(rows, dec, theta) if decode else None,
    )


def _decode_batch(model: TwoBranchVAE, b, post, di, acc: dict) -> np.ndarray | None:
    """Append one batch's inputs and decodings to ``acc``; the NB theta when the model has one."""
    # decoded cells as a user sees them: with granules drawn when the model has a head
    # each profile decoded in its own batch (a model with a batch covariate; None: average)
    dj = model.decode(post.joint[0], render=True, batch=b.batch, image_batch=b.image_batch)
    # no expression posterior without genes: nothing decoded from it (zeros, has_expression
    # is False on every row)
    de = (
        model.decode(post.expression[0], render=True, batch=b.batch, image_batch=b.image_batch)
        if post.expression is not None
        else None
    )
    add = lambda k, v: acc.setdefault(k, []).append(v)  # noqa: E731
    add("img", _chw_to_hwc(b.image))
    add("m", b.mask[:, 0].bool().cpu().numpy())
    add("x", b.x.float().cpu().numpy())
    if b.counts is not None:
        add("c", b.counts.float().cpu().numpy())
    add("lib", b.library.float().cpu().numpy())
    add("hi", b.has_image.cpu().numpy())
    add("he", b.has_expression.cpu().numpy())
    add("ri", _chw_to_hwc(dj.image))
    if dj.mask is not None:  # a model without a mask channel decodes none
        add("rm", dj.mask[:, 0].float().cpu().numpy())
        dm = de.mask if de is not None else torch.zeros_like(dj.mask)
        add("iem", dm[:, 0].float().cpu().numpy())
    add("re", dj.expression_log.float().cpu().numpy())
    add("xi", di.expression_log.float().cpu().numpy())
    add("ie", _chw_to_hwc(de.image if de is not None else torch.zeros_like(dj.image)))
    theta = None
    if getattr(dj, "expression_scale", None) is not None:
        add("mu", (dj.expression_scale * b.library[:, None]).float().cpu().numpy())
        if getattr(dj, "expression_log_theta", None) is not None:
            theta = dj.expression_log_theta.float().exp().cpu().numpy()
    return theta


def _decoded(rows: np.ndarray, acc: dict, theta: np.ndarray | None) -> Decoded:
    cat = lambda k: np.concatenate(acc[k]) if acc.get(k) else None  # noqa: E731
    mu = cat("mu")
    return Decoded(
        rows=rows,
        image=cat("img"),
        mask=cat("m"),
        x=cat("x"),
        counts=cat("c"),
        library=cat("lib"),
        has_image=cat("hi").astype(bool),
        has_expression=cat("he").astype(bool),
        rec_image=np.clip(cat("ri"), 0, 1),
        rec_mask=cat("rm"),
        rec_expression=cat("re"),
        nb_mu=mu if theta is not None else None,
        nb_theta=theta,
        expr_from_image=cat("xi"),
        image_from_expr=np.clip(cat("ie"), 0, 1),
        image_from_expr_mask=cat("iem"),
    )


@dataclass
class ReconstructionNLL:
    """Per-row reconstruction cost of each modality from its own posterior mean.

    image : (n,) mean squared error per scored value inside the cell mask
        (NaN without an image); the Gaussian NLL up to a shared constant
    expression : (n,) negative log-likelihood per gene under the model's
        expression likelihood (NB/ZINB over counts, Gaussian over log values;
        NaN without expression, and for a count model given no counts)
    """

    image: np.ndarray
    expression: np.ndarray


@torch.no_grad()
def reconstruction_nll(
    model: TwoBranchVAE,
    data: PairedTensors,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    rows: np.ndarray | None = None,
) -> ReconstructionNLL:
    """How badly each row's image / profile is reconstructed from itself (anomaly scores)."""
    from vae.losses import expression_nll  # the training likelihood, one owner

    rows = np.arange(data.n) if rows is None else np.asarray(rows)
    img_out, expr_out = [], []
    for b, post in _encoded_batches(model, data, rows, batch_size, device):
        di = model.decode(post.image[0], b.has_image, batch=b.batch, image_batch=b.image_batch)
        n_val = (b.mask.sum(dim=(1, 2, 3)) * b.image.shape[1]).clamp_min(1.0)
        mse = ((di.image.float() - b.image) * b.mask).pow(2).sum(dim=(1, 2, 3)) / n_val
        img_out.append(torch.where(b.has_image, mse, torch.nan).cpu().numpy())
        if post.expression is None:  # a model without genes: no profile to score
            expr_out.append(np.full(b.x.shape[0], np.nan, np.float32))
            continue
        de = model.decode(
            post.expression[0],
            torch.zeros_like(b.has_image),
            batch=b.batch,
            image_batch=b.image_batch,
        )
        if b.counts is None and de.expression_log_sd is None:
            # a count likelihood without counts (a log-normalised query): not on the
            # training scale, so not scored
            expr_out.append(np.full(b.x.shape[0], np.nan, np.float32))
            continue
        nll = expression_nll(de, b.x, b.counts, b.library, late_mask=False) / data.n_genes
        expr_out.append(torch.where(b.has_expression, nll.float(), torch.nan).cpu().numpy())
    cat = lambda v: np.concatenate(v) if v else np.zeros(0, np.float32)  # noqa: E731
    return ReconstructionNLL(image=cat(img_out), expression=cat(expr_out))
